//! Checking pages against the pattern and collecting what failed, for the `guest: verify ...` lines.

use crate::pattern::{self, Mismatch, Page};

/// Most failing pages named per verification; the rest are only counted.
pub const MAX_NAMED: usize = 16;

/// One page that did not hold what it should.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Failure {
    /// Virtual address of the page.
    pub addr: u64,
    /// The generation it should hold.
    pub generation: u64,
    /// Its first bad word.
    pub mismatch: Mismatch,
}

/// The failures of one verification: the first [`MAX_NAMED`] in full, all of them counted.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct FailureLog {
    named: Vec<Failure>,
    total: u64,
}

impl FailureLog {
    /// Records a failure.
    pub fn record(&mut self, failure: Failure) {
        self.total += 1;
        if self.named.len() < MAX_NAMED {
            self.named.push(failure);
        }
    }

    /// Adds the failures of `other` (e.g. those the hot writer found).
    pub fn absorb(&mut self, other: FailureLog) {
        for failure in other.named {
            if self.named.len() < MAX_NAMED {
                self.named.push(failure);
            }
        }
        self.total += other.total;
    }

    /// The failures kept in full, oldest first.
    pub fn named(&self) -> &[Failure] {
        &self.named
    }

    /// How many pages failed in all.
    pub fn total(&self) -> u64 {
        self.total
    }

    /// Whether nothing failed.
    pub fn is_empty(&self) -> bool {
        self.total == 0
    }
}

/// Checks every `(addr, page)` against generation `generation`, recording failures in `log`.
/// Returns the number of pages checked.
pub fn verify_pages<'a>(
    pages: impl IntoIterator<Item = (u64, &'a Page)>,
    generation: u64,
    log: &mut FailureLog,
) -> u64 {
    let mut checked = 0;
    for (addr, page) in pages {
        if let Err(mismatch) = pattern::check(page, addr, generation) {
            log.record(Failure {
                addr,
                generation,
                mismatch,
            });
        }
        checked += 1;
    }
    checked
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pattern::{PAGE_SIZE, WORDS};

    fn filled(count: usize, generation: u64) -> Vec<(u64, Page)> {
        (0..count)
            .map(|i| {
                let addr = 0x10_0000 + (i * PAGE_SIZE) as u64;
                let mut page = [0u64; WORDS];
                pattern::fill(&mut page, addr, generation);
                (addr, page)
            })
            .collect()
    }

    #[test]
    fn intact_pages_pass() {
        let pages = filled(8, 1);
        let mut log = FailureLog::default();
        assert_eq!(
            verify_pages(pages.iter().map(|(a, p)| (*a, p)), 1, &mut log),
            8
        );
        assert!(log.is_empty());
    }

    #[test]
    fn a_corrupted_page_is_reported_by_address_and_word() {
        let mut pages = filled(8, 1);
        pages[5].1[77] ^= 0x8000;
        let mut log = FailureLog::default();
        assert_eq!(
            verify_pages(pages.iter().map(|(a, p)| (*a, p)), 1, &mut log),
            8
        );
        assert_eq!(log.total(), 1);
        let failure = log.named()[0];
        assert_eq!(
            (failure.addr, failure.generation, failure.mismatch.word),
            (pages[5].0, 1, 77)
        );
        assert_eq!(failure.mismatch.got ^ failure.mismatch.want, 0x8000);
    }

    #[test]
    fn a_lost_page_and_a_stale_generation_are_reported() {
        let mut pages = filled(4, 2);
        pages[1].1 = [0; WORDS];
        let mut log = FailureLog::default();
        verify_pages(pages.iter().map(|(a, p)| (*a, p)), 2, &mut log);
        assert_eq!(
            log.named().iter().map(|f| f.addr).collect::<Vec<_>>(),
            [pages[1].0]
        );

        let mut stale = FailureLog::default();
        verify_pages(pages.iter().map(|(a, p)| (*a, p)), 3, &mut stale);
        assert_eq!(stale.total(), 4);
    }

    #[test]
    fn many_failures_are_counted_but_named_only_up_to_the_limit() {
        let pages = filled(MAX_NAMED + 10, 1);
        let mut log = FailureLog::default();
        verify_pages(pages.iter().map(|(a, p)| (*a, p)), 9, &mut log);
        assert_eq!(log.total(), (MAX_NAMED + 10) as u64);
        assert_eq!(log.named().len(), MAX_NAMED);

        let mut merged = FailureLog::default();
        merged.record(log.named()[0]);
        merged.absorb(log);
        assert_eq!(merged.total(), (MAX_NAMED + 11) as u64);
        assert_eq!(merged.named().len(), MAX_NAMED);
    }
}

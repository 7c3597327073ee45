//! One bit per page of guest RAM, region by region. A hinting round keeps what it has seen in
//! these, so its memory is bounded by the size of RAM (32 KiB per GiB) whatever the driver
//! sends: a hostile driver cannot grow it with more and more small ranges.

use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};

use super::HintRange;
use crate::balloon::{BALLOON_PAGE_SHIFT, BALLOON_PAGE_SIZE};
use crate::GuestMemoryMmap;

const WORD_BITS: u64 = u64::BITS as u64;

#[derive(Clone, Debug)]
struct Region {
    /// Guest physical address of the first page.
    gpa: u64,
    pages: u64,
    words: Vec<u64>,
}

/// A set of guest pages.
#[derive(Clone, Debug)]
pub(crate) struct RamPages {
    regions: Vec<Region>,
    count: u64,
}

impl RamPages {
    /// An empty set over RAM regions given as `(gpa, length in bytes)`, in ascending order;
    /// partial pages at a region's end are left out.
    pub(crate) fn new(layout: impl IntoIterator<Item = (u64, u64)>) -> Self {
        let regions = layout
            .into_iter()
            .map(|(gpa, len)| {
                let pages = len >> BALLOON_PAGE_SHIFT;
                let words = usize::try_from(pages.div_ceil(WORD_BITS)).unwrap_or(0);
                Region {
                    gpa,
                    pages,
                    words: vec![0; words],
                }
            })
            .collect();
        RamPages { regions, count: 0 }
    }

    /// An empty set over the RAM regions of `mem`.
    pub(crate) fn for_memory(mem: &GuestMemoryMmap) -> Self {
        Self::new(mem.iter().map(|r| (r.start_addr().0, r.len())))
    }

    /// An empty set over the same regions.
    pub(crate) fn empty_like(&self) -> Self {
        Self::new(
            self.regions
                .iter()
                .map(|r| (r.gpa, r.pages << BALLOON_PAGE_SHIFT)),
        )
    }

    /// Bytes of RAM the set is over.
    pub(crate) fn ram_bytes(&self) -> u64 {
        self.regions
            .iter()
            .map(|r| r.pages << BALLOON_PAGE_SHIFT)
            .sum()
    }

    /// Pages in the set.
    #[cfg(test)]
    pub(crate) fn count(&self) -> u64 {
        self.count
    }

    /// Calls `f(region, first page, pages)` for each piece of the page-aligned range
    /// `[gpa, gpa + len)` (it may span regions that touch); false if some page is not in RAM,
    /// in which case `f` has not been called at all.
    fn pieces(&self, gpa: u64, len: u64, mut f: impl FnMut(usize, u64, u64)) -> bool {
        self.split(gpa, len, &mut |_, _, _| {}) && self.split(gpa, len, &mut f)
    }

    fn split(&self, gpa: u64, len: u64, f: &mut dyn FnMut(usize, u64, u64)) -> bool {
        let (mut at, mut left) = (gpa, len >> BALLOON_PAGE_SHIFT);
        while left > 0 {
            let Some((i, first, n)) = self.locate(at, left) else {
                return false;
            };
            f(i, first, n);
            left -= n;
            at = self.regions[i].gpa + ((first + n) << BALLOON_PAGE_SHIFT);
        }
        true
    }

    /// The region holding the page at `at`, that page's index in it, and how many of the
    /// `pages` from there on the region holds.
    fn locate(&self, at: u64, pages: u64) -> Option<(usize, u64, u64)> {
        let i = self
            .regions
            .iter()
            .position(|r| at >= r.gpa && (at - r.gpa) >> BALLOON_PAGE_SHIFT < r.pages)?;
        let r = &self.regions[i];
        let first = (at - r.gpa) >> BALLOON_PAGE_SHIFT;
        Some((i, first, pages.min(r.pages - first)))
    }

    /// Whether every page of the range is in RAM.
    pub(crate) fn covers(&self, gpa: u64, len: u64) -> bool {
        gpa.is_multiple_of(BALLOON_PAGE_SIZE) && self.pieces(gpa, len, |_, _, _| {})
    }

    /// Whether any page of the range is in the set (pages outside RAM are not).
    pub(crate) fn any(&self, gpa: u64, len: u64) -> bool {
        let mut hit = false;
        self.pieces(gpa, len, |i, first, n| {
            let words = &self.regions[i].words;
            hit |= for_each_word(first, n).any(|(w, mask)| words[w] & mask != 0);
        });
        hit
    }

    /// Adds the range's pages; false (and nothing added) if some page is not in RAM.
    pub(crate) fn insert(&mut self, gpa: u64, len: u64) -> bool {
        if !self.split(gpa, len, &mut |_, _, _| {}) {
            return false;
        }
        let (mut at, mut left) = (gpa, len >> BALLOON_PAGE_SHIFT);
        while let Some((i, first, n)) = self.locate(at, left).filter(|_| left > 0) {
            let r = &mut self.regions[i];
            for (w, mask) in for_each_word(first, n) {
                self.count += u64::from((mask & !r.words[w]).count_ones());
                r.words[w] |= mask;
            }
            left -= n;
            at = r.gpa + ((first + n) << BALLOON_PAGE_SHIFT);
        }
        true
    }

    /// Empties the set into `out`, one range per run of pages within a region, in ascending
    /// address order per region.
    pub(crate) fn drain_into(&mut self, out: &mut Vec<HintRange>) {
        if self.count == 0 {
            return;
        }
        self.count = 0;
        for r in &mut self.regions {
            let mut emit = |from: u64, to: u64| {
                out.push(HintRange {
                    gpa: r.gpa + (from << BALLOON_PAGE_SHIFT),
                    len: (to - from) << BALLOON_PAGE_SHIFT,
                });
            };
            let mut run: Option<u64> = None;
            for (i, word) in r.words.iter_mut().enumerate() {
                let word = std::mem::take(word);
                let base = i as u64 * WORD_BITS;
                let mut bit = 0u64;
                while bit < WORD_BITS {
                    // The bits from `bit` on that would change the run's state.
                    let rest = if run.is_some() { !word } else { word } >> bit;
                    if rest == 0 {
                        break;
                    }
                    bit += u64::from(rest.trailing_zeros());
                    match run.take() {
                        Some(from) => emit(from, base + bit),
                        None => run = Some(base + bit),
                    }
                }
            }
            if let Some(from) = run {
                emit(from, r.pages);
            }
        }
    }
}

/// The words and bit masks covering bits `[first, first + n)`.
fn for_each_word(first: u64, n: u64) -> impl Iterator<Item = (usize, u64)> {
    let end = first + n;
    let mut at = first;
    std::iter::from_fn(move || {
        if at >= end {
            return None;
        }
        let bit = at % WORD_BITS;
        let take = (WORD_BITS - bit).min(end - at);
        let mask = if take == WORD_BITS {
            u64::MAX
        } else {
            ((1u64 << take) - 1) << bit
        };
        let word = (at / WORD_BITS) as usize;
        at += take;
        Some((word, mask))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const P: u64 = BALLOON_PAGE_SIZE;

    fn two_touching_and_one_apart() -> RamPages {
        RamPages::new([(0, 100 * P), (100 * P, 64 * P), (1000 * P, 70 * P)])
    }

    fn range(page: u64, pages: u64) -> HintRange {
        HintRange {
            gpa: page * P,
            len: pages * P,
        }
    }

    #[test]
    fn insert_any_and_drain() {
        let mut s = two_touching_and_one_apart();
        assert!(s.insert(3 * P, P));
        assert!(s.insert(60 * P, 70 * P), "spans two touching regions");
        assert!(s.insert(1000 * P, 70 * P), "a whole region");
        assert!(!s.insert(160 * P, 8 * P), "runs past RAM into the hole");
        assert!(!s.insert(2000 * P, P));
        assert_eq!(s.count(), 1 + 70 + 70);
        assert!(s.any(0, 4 * P) && !s.any(0, 3 * P) && !s.any(4 * P, 56 * P));
        assert!(s.any(129 * P, P) && !s.any(130 * P, 30 * P));
        let mut out = Vec::new();
        s.drain_into(&mut out);
        assert_eq!(
            out,
            vec![range(3, 1), range(60, 40), range(100, 30), range(1000, 70)]
        );
        assert_eq!(s.count(), 0);
        assert!(!s.any(0, 164 * P));
        s.drain_into(&mut out);
        assert_eq!(out.len(), 4, "nothing more");
    }

    #[test]
    fn runs_at_every_word_boundary() {
        let mut s = RamPages::new([(0, 1024 * P)]);
        let mut want = Vec::new();
        // Runs of every length 1..=130 with gaps of 1..=3 pages, across word boundaries.
        let mut at = 1;
        for len in 1..=130u64 {
            if at + len > 1024 {
                break;
            }
            assert!(s.insert(at * P, len * P));
            want.push(range(at, len));
            at += len + 1 + len % 3;
        }
        let mut out = Vec::new();
        s.drain_into(&mut out);
        assert_eq!(out, want);
        assert!(s.insert(0, 1024 * P));
        s.drain_into(&mut out);
        assert_eq!(out.last(), Some(&range(0, 1024)));
    }

    #[test]
    fn covers_needs_aligned_ram() {
        let s = two_touching_and_one_apart();
        assert!(s.covers(0, 164 * P));
        assert!(!s.covers(0, 165 * P));
        assert!(!s.covers(1, P));
        assert!(s.covers(1069 * P, P) && !s.covers(1070 * P, P));
        assert_eq!(s.empty_like().count(), 0);
    }
}

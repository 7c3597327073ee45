//! The last pre-copy round, completed while the VM is paused.
//!
//! The round that fits the downtime budget is known before the pause: it becomes a range table
//! while the guest still runs. What the guest (or the VMM) wrote between that sync and the
//! pause arrives afterwards, from the final dirty-log sync, as pages or as a bitmap, and is
//! merged in. So the paused part costs in proportion to what was written, not to RAM size:
//! no full bitmap is allocated, combined or scanned for runs while the VM is stopped (except
//! the kernel's own bitmap when only the bitmap log exists, see [`DirtySink::add_log`]).
//!
//! ```text
//!  running:  last live sync ──► DirtyRound ──► into_table() ──► LastRound::new(table)
//!  paused:   final sync ──► add_pages / add_log ──► into_table() ──► sent as the last round
//! ```

use crate::bitmap::SetBitRuns;
use crate::hints::{DirtyRound, HintError};
use crate::ranges::{MemoryRange, MemoryRangeTable, RamRegions, PAGE_SIZE};

/// Something a dirty-log sync reports into: a live [`DirtyRound`] or the [`LastRound`].
pub trait DirtySink {
    /// ORs a KVM-layout dirty bitmap (bit `p` = page `p`) of RAM region `index` in.
    fn add_log(&mut self, index: usize, words: &[u64]) -> Result<(), HintError>;
    /// Marks pages of RAM region `index` (page numbers within the region; repeats allowed).
    fn add_pages(&mut self, index: usize, pages: &[u64]) -> Result<(), HintError>;
}

impl DirtySink for DirtyRound {
    fn add_log(&mut self, index: usize, words: &[u64]) -> Result<(), HintError> {
        DirtyRound::add_log(self, index, words)
    }

    fn add_pages(&mut self, index: usize, pages: &[u64]) -> Result<(), HintError> {
        DirtyRound::add_pages(self, index, pages)
    }
}

/// The last round: a table computed before the pause plus what the final sync adds.
#[derive(Clone, Debug)]
pub struct LastRound {
    ram: RamRegions,
    before: MemoryRangeTable,
    /// Ranges added by the final sync, unsorted, possibly overlapping.
    added: Vec<MemoryRange>,
}

impl LastRound {
    /// The last round, starting from `before` (the last live sync's pages).
    pub fn new(ram: &RamRegions, before: MemoryRangeTable) -> Self {
        LastRound {
            ram: ram.clone(),
            before,
            added: Vec::new(),
        }
    }

    fn region(&self, index: usize) -> Result<MemoryRange, HintError> {
        self.ram
            .regions()
            .get(index)
            .copied()
            .ok_or(HintError::NoSuchRegion {
                index,
                regions: self.ram.regions().len(),
            })
    }

    /// Pages added by the final sync so far (repeats and overlap with the table counted).
    pub fn added_pages(&self) -> u64 {
        self.added.iter().map(MemoryRange::pages).sum()
    }

    /// The round's table: the pages known before the pause and those added since, merged.
    pub fn into_table(mut self) -> Result<MemoryRangeTable, HintError> {
        self.added.sort_unstable();
        let mut merged = Vec::with_capacity(self.before.len() + self.added.len());
        let (mut a, mut b) = (self.before.iter().peekable(), self.added.iter().peekable());
        loop {
            let next = match (a.peek(), b.peek()) {
                (Some(x), Some(y)) if x.gpa <= y.gpa => a.next(),
                (Some(_), Some(_)) => b.next(),
                (Some(_), None) => a.next(),
                (None, Some(_)) => b.next(),
                (None, None) => break,
            };
            let Some(&range) = next else { break };
            match merged.last_mut() {
                Some(last) if range.gpa <= last_end(last) => {
                    let end = last_end(last).max(last_end(&range));
                    last.length = end - last.gpa;
                }
                _ => merged.push(range),
            }
        }
        MemoryRangeTable::from_ranges(merged).map_err(HintError::Merge)
    }
}

/// The end of a range that is inside guest RAM (so it does not overflow).
fn last_end(r: &MemoryRange) -> u64 {
    r.gpa.saturating_add(r.length)
}

impl DirtySink for LastRound {
    /// Scans the bitmap for runs (skipping zero words): what the bitmap log costs.
    fn add_log(&mut self, index: usize, words: &[u64]) -> Result<(), HintError> {
        let region = self.region(index)?;
        let pages = region.length / PAGE_SIZE;
        for (first, n) in SetBitRuns::new(words, pages) {
            self.added.push(MemoryRange::new(
                region.gpa + first * PAGE_SIZE,
                n * PAGE_SIZE,
            ));
        }
        Ok(())
    }

    fn add_pages(&mut self, index: usize, pages: &[u64]) -> Result<(), HintError> {
        let region = self.region(index)?;
        for &page in pages {
            let outside = HintError::DirtyOutsideRam {
                gpa: page.saturating_mul(PAGE_SIZE),
                length: PAGE_SIZE,
            };
            if page >= region.length / PAGE_SIZE {
                return Err(outside);
            }
            self.added
                .push(MemoryRange::new(region.gpa + page * PAGE_SIZE, PAGE_SIZE));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bitmap::tests::Rng;
    use crate::bitmap::DirtyBitmap;

    const P: u64 = PAGE_SIZE;

    fn two_regions() -> RamRegions {
        RamRegions::new([
            MemoryRange::new(0, 300 * P),
            MemoryRange::new(1 << 32, 200 * P),
        ])
        .unwrap()
    }

    /// The last round equals what one big DirtyRound with every sync in it would give.
    #[test]
    fn equals_the_round_built_all_at_once() {
        let ram = two_regions();
        let mut rng = Rng::new(7);
        for _ in 0..100 {
            let mut live = DirtyRound::new(&ram);
            let mut whole = DirtyRound::new(&ram);
            for (index, region) in ram.regions().iter().enumerate() {
                let pages = region.length / P;
                let mut b = DirtyBitmap::new_clear(pages);
                for _ in 0..rng.below(20) {
                    let first = rng.below(pages);
                    b.set_range(first, 1 + rng.below((pages - first).min(9)))
                        .unwrap();
                }
                live.add_log(index, b.words()).unwrap();
                whole.add_log(index, b.words()).unwrap();
            }
            let mut last = LastRound::new(&ram, live.into_table().unwrap());
            for (index, region) in ram.regions().iter().enumerate() {
                let pages = region.length / P;
                let list: Vec<u64> = (0..rng.below(30)).map(|_| rng.below(pages)).collect();
                DirtySink::add_pages(&mut last, index, &list).unwrap();
                whole.add_pages(index, &list).unwrap();
                let mut b = DirtyBitmap::new_clear(pages);
                let first = rng.below(pages);
                b.set_range(first, rng.below(pages - first + 1)).unwrap();
                DirtySink::add_log(&mut last, index, b.words()).unwrap();
                DirtySink::add_log(&mut whole, index, b.words()).unwrap();
            }
            assert_eq!(last.into_table().unwrap(), whole.into_table().unwrap());
        }
    }

    #[test]
    fn pages_outside_a_region_are_refused() {
        let ram = two_regions();
        let mut last = LastRound::new(&ram, MemoryRangeTable::new());
        assert!(DirtySink::add_pages(&mut last, 1, &[200]).is_err());
        assert!(DirtySink::add_pages(&mut last, 2, &[0]).is_err());
        DirtySink::add_pages(&mut last, 1, &[199, 199, 0]).unwrap();
        assert_eq!(last.added_pages(), 3);
        let table = last.into_table().unwrap();
        assert_eq!(
            table.ranges(),
            &[
                MemoryRange::new(1 << 32, P),
                MemoryRange::new((1 << 32) + 199 * P, P)
            ]
        );
    }
}

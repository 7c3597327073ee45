//! Dirty page bitmaps: one bit per 4 KiB page of a memory region.
//!
//! The layout is KVM's `KVM_GET_DIRTY_LOG` layout (and vm-memory's `AtomicBitmap::get_and_reset`):
//! page `p` is bit `p % 64` of `u64` word `p / 64`. Bits past the last page are always kept clear,
//! so counts and run iteration never see them.

use thiserror::Error;

use crate::ranges::{MemoryRange, MemoryRangeTable, RangeError, PAGE_SIZE};

const WORD_BITS: u64 = u64::BITS as u64;

/// Errors from bitmap operations.
#[derive(Debug, Error)]
pub enum BitmapError {
    /// The word slice does not have the length the page count needs.
    #[error("bitmap for {pages} pages needs {expected} words, got {actual}")]
    WordCount {
        /// Pages the bitmap covers.
        pages: u64,
        /// Words needed.
        expected: usize,
        /// Words supplied.
        actual: usize,
    },
    /// Two bitmaps of different sizes were combined.
    #[error("bitmaps cover {left} and {right} pages")]
    SizeMismatch {
        /// Pages in `self`.
        left: u64,
        /// Pages in the other bitmap.
        right: u64,
    },
    /// A page range does not fit in the bitmap.
    #[error("pages {first}..+{count} are outside a bitmap of {pages} pages")]
    OutOfRange {
        /// First page of the range.
        first: u64,
        /// Number of pages.
        count: u64,
        /// Pages in the bitmap.
        pages: u64,
    },
    /// Turning the bitmap into address ranges failed.
    #[error("bitmap cannot be expressed as memory ranges at base {base_gpa:#x}")]
    Ranges {
        /// Base address given.
        base_gpa: u64,
        /// The failure.
        #[source]
        source: RangeError,
    },
}

/// Number of `u64` words needed for `pages` bits.
pub fn words_for_pages(pages: u64) -> usize {
    // Bitmaps cover local memory regions; a count that does not fit in usize cannot be mapped.
    usize::try_from(pages.div_ceil(WORD_BITS)).unwrap_or(usize::MAX)
}

/// Number of pages covering `bytes` (rounded up).
pub fn pages_for_bytes(bytes: u64) -> u64 {
    bytes.div_ceil(PAGE_SIZE)
}

/// A bitmap of pages, one bit per [`PAGE_SIZE`] page of one memory region.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DirtyBitmap {
    words: Vec<u64>,
    pages: u64,
}

impl DirtyBitmap {
    /// A bitmap of `pages` pages with every bit clear.
    pub fn new_clear(pages: u64) -> Self {
        DirtyBitmap {
            words: vec![0; words_for_pages(pages)],
            pages,
        }
    }

    /// A bitmap of `pages` pages with every bit set.
    pub fn new_set(pages: u64) -> Self {
        let mut bitmap = DirtyBitmap {
            words: vec![u64::MAX; words_for_pages(pages)],
            pages,
        };
        bitmap.clear_tail();
        bitmap
    }

    /// Takes a KVM-layout dirty log for a region of `pages` pages. Bits past `pages` are dropped.
    pub fn from_kvm_words(words: Vec<u64>, pages: u64) -> Result<Self, BitmapError> {
        let expected = words_for_pages(pages);
        if words.len() != expected {
            return Err(BitmapError::WordCount {
                pages,
                expected,
                actual: words.len(),
            });
        }
        let mut bitmap = DirtyBitmap { words, pages };
        bitmap.clear_tail();
        Ok(bitmap)
    }

    fn clear_tail(&mut self) {
        let used = self.pages % WORD_BITS;
        if used != 0 {
            if let Some(last) = self.words.last_mut() {
                *last &= (1u64 << used) - 1;
            }
        }
    }

    /// Number of pages covered.
    pub fn pages(&self) -> u64 {
        self.pages
    }

    /// The words, KVM layout.
    pub fn words(&self) -> &[u64] {
        &self.words
    }

    /// Whether page `page` is set (`false` past the end).
    pub fn is_set(&self, page: u64) -> bool {
        page < self.pages
            && self.words[(page / WORD_BITS) as usize] & (1 << (page % WORD_BITS)) != 0
    }

    /// Number of set pages.
    pub fn count(&self) -> u64 {
        self.words.iter().map(|w| u64::from(w.count_ones())).sum()
    }

    /// Whether no page is set.
    pub fn is_clear(&self) -> bool {
        self.words.iter().all(|&w| w == 0)
    }

    fn check_range(&self, first: u64, count: u64) -> Result<(), BitmapError> {
        match first.checked_add(count) {
            Some(end) if end <= self.pages => Ok(()),
            _ => Err(BitmapError::OutOfRange {
                first,
                count,
                pages: self.pages,
            }),
        }
    }

    /// Applies `op(word, mask)` to every word overlapping pages `first..first + count`
    /// (already checked to be in range).
    fn for_each_masked(&mut self, first: u64, count: u64, op: impl Fn(&mut u64, u64)) {
        let mut page = first;
        let end = first + count;
        while page < end {
            let bit = page % WORD_BITS;
            let n = (WORD_BITS - bit).min(end - page);
            let mask = if n == WORD_BITS {
                u64::MAX
            } else {
                ((1u64 << n) - 1) << bit
            };
            op(&mut self.words[(page / WORD_BITS) as usize], mask);
            page += n;
        }
    }

    /// Sets pages `first..first + count`.
    pub fn set_range(&mut self, first: u64, count: u64) -> Result<(), BitmapError> {
        self.check_range(first, count)?;
        self.for_each_masked(first, count, |w, m| *w |= m);
        Ok(())
    }

    /// Clears pages `first..first + count`.
    pub fn clear_range(&mut self, first: u64, count: u64) -> Result<(), BitmapError> {
        self.check_range(first, count)?;
        self.for_each_masked(first, count, |w, m| *w &= !m);
        Ok(())
    }

    /// Number of set pages in `first..first + count`.
    pub fn count_range(&self, first: u64, count: u64) -> Result<u64, BitmapError> {
        self.check_range(first, count)?;
        let mut total = 0u64;
        let mut page = first;
        let end = first + count;
        while page < end {
            let bit = page % WORD_BITS;
            let n = (WORD_BITS - bit).min(end - page);
            let mask = if n == WORD_BITS {
                u64::MAX
            } else {
                ((1u64 << n) - 1) << bit
            };
            total += u64::from((self.words[(page / WORD_BITS) as usize] & mask).count_ones());
            page += n;
        }
        Ok(total)
    }

    /// ORs another bitmap of the same size into this one.
    pub fn union(&mut self, other: &DirtyBitmap) -> Result<(), BitmapError> {
        if other.pages != self.pages {
            return Err(BitmapError::SizeMismatch {
                left: self.pages,
                right: other.pages,
            });
        }
        self.union_words(&other.words)
    }

    /// ORs KVM-layout words (a dirty log of the same region) into this bitmap.
    pub fn union_words(&mut self, words: &[u64]) -> Result<(), BitmapError> {
        if words.len() != self.words.len() {
            return Err(BitmapError::WordCount {
                pages: self.pages,
                expected: self.words.len(),
                actual: words.len(),
            });
        }
        // Only words with a page set are written: the untouched pages of a big fresh bitmap
        // then stay unbacked (writing all 8 MiB of a 256 GiB guest's bitmap, each page a
        // copy-on-write fault and a TLB flush, took 40-90 ms per dirty round).
        for (w, o) in self.words.iter_mut().zip(words) {
            if *o != 0 {
                *w |= o;
            }
        }
        self.clear_tail();
        Ok(())
    }

    /// Clears every page that is set in `other` (same size). Returns how many were cleared.
    pub fn subtract(&mut self, other: &DirtyBitmap) -> Result<u64, BitmapError> {
        if other.pages != self.pages {
            return Err(BitmapError::SizeMismatch {
                left: self.pages,
                right: other.pages,
            });
        }
        let mut cleared = 0u64;
        for (w, o) in self.words.iter_mut().zip(&other.words) {
            cleared += u64::from((*w & o).count_ones());
            *w &= !o;
        }
        Ok(cleared)
    }

    /// Clears the pages of `ranges` that fall in this bitmap, where page 0 is at `base_gpa`.
    /// Parts of ranges outside the bitmap are ignored. Returns how many set pages were cleared.
    pub fn subtract_ranges(&mut self, ranges: &MemoryRangeTable, base_gpa: u64) -> u64 {
        let region_end = base_gpa.saturating_add(self.pages.saturating_mul(PAGE_SIZE));
        let mut cleared = 0u64;
        for range in ranges {
            let start = range.gpa.max(base_gpa);
            let end = range.end().unwrap_or(u64::MAX).min(region_end);
            if start >= end {
                continue;
            }
            let first = (start - base_gpa) / PAGE_SIZE;
            let count = pages_for_bytes(end - base_gpa) - first;
            // In range by construction: first + count <= pages.
            cleared += self.count_range(first, count).unwrap_or(0);
            self.for_each_masked(first, count, |w, m| *w &= !m);
        }
        cleared
    }

    /// Iterates over runs of set pages as `(first_page, npages)`, in order.
    pub fn runs(&self) -> SetBitRuns<'_> {
        SetBitRuns::new(&self.words, self.pages)
    }

    /// The set pages as guest physical ranges, page 0 being at `base_gpa`.
    pub fn to_range_table(&self, base_gpa: u64) -> Result<MemoryRangeTable, BitmapError> {
        let mut table = MemoryRangeTable::new();
        for (first, npages) in self.runs() {
            let range = first
                .checked_mul(PAGE_SIZE)
                .and_then(|off| base_gpa.checked_add(off))
                .zip(npages.checked_mul(PAGE_SIZE))
                .map(|(gpa, length)| MemoryRange::new(gpa, length))
                .unwrap_or(MemoryRange::new(u64::MAX, PAGE_SIZE));
            table
                .push(range)
                .map_err(|source| BitmapError::Ranges { base_gpa, source })?;
        }
        Ok(table)
    }
}

/// Iterator over runs of consecutive set bits of a KVM-layout word slice, as
/// `(first_bit, nbits)`. Works a word at a time with `trailing_zeros`, so sparse and dense
/// bitmaps both cost about one step per word plus one per run.
#[derive(Clone, Debug)]
pub struct SetBitRuns<'a> {
    words: &'a [u64],
    nbits: u64,
    pos: u64,
}

impl<'a> SetBitRuns<'a> {
    /// Iterates over the runs among the first `nbits` bits of `words`.
    pub fn new(words: &'a [u64], nbits: u64) -> Self {
        let nbits = nbits.min(words.len() as u64 * WORD_BITS);
        SetBitRuns {
            words,
            nbits,
            pos: 0,
        }
    }

    /// The first set bit at or after `from` (`invert == 0`), or the first clear bit
    /// (`invert == u64::MAX`); `None` past the end of `words`.
    fn next_bit(&self, from: u64, invert: u64) -> Option<u64> {
        let mut idx = usize::try_from(from / WORD_BITS).ok()?;
        let mut word = (*self.words.get(idx)? ^ invert) & (u64::MAX << (from % WORD_BITS));
        loop {
            if word != 0 {
                return Some(idx as u64 * WORD_BITS + u64::from(word.trailing_zeros()));
            }
            idx += 1;
            word = *self.words.get(idx)? ^ invert;
        }
    }
}

impl Iterator for SetBitRuns<'_> {
    type Item = (u64, u64);

    fn next(&mut self) -> Option<(u64, u64)> {
        if self.pos >= self.nbits {
            return None;
        }
        let start = self.next_bit(self.pos, 0).filter(|&s| s < self.nbits)?;
        let end = self
            .next_bit(start, u64::MAX)
            .map_or(self.nbits, |e| e.min(self.nbits));
        self.pos = end;
        Some((start, end - start))
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A small deterministic PRNG (xorshift64*) for randomized tests.
    pub(crate) struct Rng(u64);

    impl Rng {
        pub(crate) fn new(seed: u64) -> Self {
            Rng(seed.max(1))
        }
        pub(crate) fn next(&mut self) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
        }
        pub(crate) fn below(&mut self, n: u64) -> u64 {
            if n == 0 {
                0
            } else {
                self.next() % n
            }
        }
    }

    fn model_runs(model: &[bool]) -> Vec<(u64, u64)> {
        let mut runs = Vec::new();
        let mut i = 0;
        while i < model.len() {
            if model[i] {
                let s = i;
                while i < model.len() && model[i] {
                    i += 1;
                }
                runs.push((s as u64, (i - s) as u64));
            } else {
                i += 1;
            }
        }
        runs
    }

    fn assert_matches(b: &DirtyBitmap, model: &[bool]) {
        assert_eq!(b.count(), model.iter().filter(|&&x| x).count() as u64);
        for (p, &m) in model.iter().enumerate() {
            assert_eq!(b.is_set(p as u64), m, "page {p}");
        }
        assert!(!b.is_set(model.len() as u64));
        assert_eq!(b.runs().collect::<Vec<_>>(), model_runs(model));
    }

    #[test]
    fn runs_basic() {
        let words = [0b1011_0000u64, u64::MAX, 1 << 63, 0];
        let runs: Vec<_> = SetBitRuns::new(&words, 256).collect();
        assert_eq!(runs, vec![(4, 2), (7, 1), (64, 64), (191, 1)]);
        // A run crossing a word boundary.
        let words = [0xffff_ffff_ffff_ffb0u64, u64::MAX, 1 << 63, 0];
        let runs: Vec<_> = SetBitRuns::new(&words, 256).collect();
        assert_eq!(runs, vec![(4, 2), (7, 121), (191, 1)]);
        // Truncated by nbits in the middle of a run.
        let runs: Vec<_> = SetBitRuns::new(&words, 100).collect();
        assert_eq!(runs, vec![(4, 2), (7, 93)]);
        assert_eq!(SetBitRuns::new(&[], 10).count(), 0);
        assert_eq!(SetBitRuns::new(&[0, 0], 128).count(), 0);
        assert_eq!(
            SetBitRuns::new(&[u64::MAX; 3], 192).collect::<Vec<_>>(),
            vec![(0, 192)]
        );
    }

    #[test]
    fn new_set_and_clear_tail() {
        for pages in [0u64, 1, 63, 64, 65, 130] {
            let b = DirtyBitmap::new_set(pages);
            assert_eq!(b.count(), pages);
            assert_eq!(b.words().len(), words_for_pages(pages));
            assert_eq!(DirtyBitmap::new_clear(pages).count(), 0);
        }
        let b = DirtyBitmap::from_kvm_words(vec![u64::MAX, u64::MAX], 70).unwrap();
        assert_eq!(b.count(), 70);
        assert!(matches!(
            DirtyBitmap::from_kvm_words(vec![0], 70),
            Err(BitmapError::WordCount { expected: 2, .. })
        ));
    }

    #[test]
    fn range_errors() {
        let mut b = DirtyBitmap::new_clear(100);
        assert!(b.set_range(90, 11).is_err());
        assert!(b.clear_range(u64::MAX, 2).is_err());
        assert!(b.set_range(90, 10).is_ok());
        assert!(b.union(&DirtyBitmap::new_clear(99)).is_err());
        assert!(b.union_words(&[0]).is_err());
        assert!(b.subtract(&DirtyBitmap::new_clear(1)).is_err());
    }

    #[test]
    fn to_range_table_uses_base() {
        let mut b = DirtyBitmap::new_clear(200);
        b.set_range(0, 2).unwrap();
        b.set_range(64, 70).unwrap();
        let t = b.to_range_table(0x10_0000).unwrap();
        assert_eq!(
            t.ranges(),
            &[
                MemoryRange::new(0x10_0000, 2 * PAGE_SIZE),
                MemoryRange::new(0x10_0000 + 64 * PAGE_SIZE, 70 * PAGE_SIZE)
            ]
        );
        assert!(b.to_range_table(u64::MAX - PAGE_SIZE + 1).is_err());
    }

    #[test]
    fn randomized_against_model() {
        let mut rng = Rng::new(0x5eed);
        for round in 0..200 {
            let pages = 1 + rng.below(if round % 2 == 0 { 300 } else { 2000 });
            let mut b = DirtyBitmap::new_clear(pages);
            let mut model = vec![false; pages as usize];
            for _ in 0..40 {
                let first = rng.below(pages);
                let count = rng.below(pages - first + 1);
                match rng.below(6) {
                    0 => {
                        b.set_range(first, count).unwrap();
                        model[first as usize..(first + count) as usize].fill(true);
                    }
                    1 => {
                        b.clear_range(first, count).unwrap();
                        model[first as usize..(first + count) as usize].fill(false);
                    }
                    2 => {
                        let words: Vec<u64> = (0..b.words().len()).map(|_| rng.next()).collect();
                        let other = DirtyBitmap::from_kvm_words(words, pages).unwrap();
                        b.union(&other).unwrap();
                        for (p, m) in model.iter_mut().enumerate() {
                            *m |= other.is_set(p as u64);
                        }
                    }
                    3 => {
                        let mut other = DirtyBitmap::new_clear(pages);
                        other.set_range(first, count).unwrap();
                        let cleared = b.subtract(&other).unwrap();
                        let expect = model[first as usize..(first + count) as usize]
                            .iter()
                            .filter(|&&x| x)
                            .count() as u64;
                        assert_eq!(cleared, expect);
                        model[first as usize..(first + count) as usize].fill(false);
                    }
                    4 => {
                        let base = 0x4000_0000u64;
                        // Ranges partly before and after the region are clipped.
                        let t = MemoryRangeTable::from_ranges([
                            MemoryRange::new(base - PAGE_SIZE, (1 + first) * PAGE_SIZE),
                            MemoryRange::new(base + (first + 1 + count) * PAGE_SIZE, 3 * PAGE_SIZE),
                        ])
                        .unwrap();
                        let expect = model[..first as usize]
                            .iter()
                            .chain(model.iter().skip((first + 1 + count) as usize).take(3))
                            .filter(|&&x| x)
                            .count() as u64;
                        assert_eq!(b.subtract_ranges(&t, base), expect);
                        model[..first as usize].fill(false);
                        for m in model.iter_mut().skip((first + 1 + count) as usize).take(3) {
                            *m = false;
                        }
                    }
                    _ => {
                        let expect = model[first as usize..(first + count) as usize]
                            .iter()
                            .filter(|&&x| x)
                            .count() as u64;
                        assert_eq!(b.count_range(first, count).unwrap(), expect);
                    }
                }
                assert_matches(&b, &model);
            }
            let table = b.to_range_table(0).unwrap();
            assert_eq!(table.total_pages(), b.count());
            let runs: Vec<_> = table
                .iter()
                .map(|r| (r.gpa / PAGE_SIZE, r.length / PAGE_SIZE))
                .collect();
            assert_eq!(runs, model_runs(&model));
        }
    }
}

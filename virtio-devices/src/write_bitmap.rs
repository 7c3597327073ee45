//! The bitmap that records the VMM's own writes to guest memory (virtio rings, balloon
//! metadata, ...), which KVM's dirty log does not see.
//!
//! One bit per 4 KiB page, like vm-memory's `AtomicBitmap`, plus a summary level: one bit per
//! 64 words (4096 pages, 16 MiB). Taking the written pages walks the summary (2 KiB per TiB of
//! RAM) and only the words it points to, so a migration's final sync while the VM is paused
//! costs in proportion to what the VMM wrote, not to the size of guest RAM.
//!
//! ```text
//!  writer: word |= page bit ──► summary |= chunk bit       (SeqCst, in this order)
//!  taker:  summary chunk bit swapped to 0 ──► each word of the chunk swapped to 0
//! ```
//! A write whose summary bit lands after the taker cleared it stays marked for the next take;
//! one whose summary bit landed before has its word bit set already, so the taker sees it.

use std::sync::atomic::{AtomicU64, Ordering};

use vm_memory::bitmap::{Bitmap, NewBitmap, RefSlice, WithBitmapSlice};

const PAGE_SHIFT: usize = 12;
const WORD_BITS: usize = 64;

/// A page bitmap with a summary level; see the module documentation.
#[derive(Debug, Default)]
pub struct WriteBitmap {
    words: Box<[AtomicU64]>,
    summary: Box<[AtomicU64]>,
    pages: usize,
}

/// `len` zeroed atomics from a zeroed allocation: the kernel hands out its pages lazily, so a
/// bitmap only costs memory where pages were written (8 MiB of a 256 GiB guest's bitmap stayed
/// resident on every destination when each word was written at creation).
fn zeroed_words(len: usize) -> Box<[AtomicU64]> {
    let words = Box::<[AtomicU64]>::new_zeroed_slice(len);
    // SAFETY: an AtomicU64 has the size and bit validity of a u64, so all-zero bytes are a valid
    // AtomicU64 holding 0.
    unsafe { words.assume_init() }
}

impl WriteBitmap {
    /// A clear bitmap covering `bytes` bytes.
    pub fn new(bytes: usize) -> Self {
        let pages = bytes.div_ceil(1 << PAGE_SHIFT);
        let words = pages.div_ceil(WORD_BITS);
        let chunks = words.div_ceil(WORD_BITS);
        WriteBitmap {
            words: zeroed_words(words),
            summary: zeroed_words(chunks.div_ceil(WORD_BITS)),
            pages,
        }
    }

    /// Number of pages covered.
    pub fn pages(&self) -> usize {
        self.pages
    }

    fn set_page(&self, page: usize) {
        let word = page / WORD_BITS;
        self.words[word].fetch_or(1 << (page % WORD_BITS), Ordering::SeqCst);
        let chunk = word / WORD_BITS;
        self.summary[chunk / WORD_BITS].fetch_or(1 << (chunk % WORD_BITS), Ordering::SeqCst);
    }

    /// Whether page `page` is marked (`false` past the end).
    pub fn is_page_set(&self, page: usize) -> bool {
        page < self.pages
            && self.words[page / WORD_BITS].load(Ordering::SeqCst) & (1 << (page % WORD_BITS)) != 0
    }

    /// Takes the marked pages and clears them: calls `f(first_page, bits)` for every non-zero
    /// 64-page word, in address order (bit `i` of `bits` is page `first_page + i`).
    pub fn take(&self, mut f: impl FnMut(u64, u64)) {
        for (s, summary) in self.summary.iter().enumerate() {
            let mut chunks = summary.swap(0, Ordering::SeqCst);
            while chunks != 0 {
                let chunk = s * WORD_BITS + chunks.trailing_zeros() as usize;
                chunks &= chunks - 1;
                let first = chunk * WORD_BITS;
                let last = (first + WORD_BITS).min(self.words.len());
                for (w, word) in self.words[first..last].iter().enumerate() {
                    let bits = word.swap(0, Ordering::SeqCst);
                    if bits != 0 {
                        f(((first + w) * WORD_BITS) as u64, bits);
                    }
                }
            }
        }
    }

    /// Clears every page.
    pub fn reset(&self) {
        self.take(|_, _| {});
    }
}

impl<'a> WithBitmapSlice<'a> for WriteBitmap {
    type S = RefSlice<'a, Self>;
}

impl Bitmap for WriteBitmap {
    fn mark_dirty(&self, offset: usize, len: usize) {
        if len == 0 {
            return;
        }
        let first = offset >> PAGE_SHIFT;
        let last = offset.saturating_add(len - 1) >> PAGE_SHIFT;
        // Pages past the end are ignored, as vm-memory's own bitmap does.
        for page in first..=last.min(self.pages.saturating_sub(1)) {
            self.set_page(page);
        }
    }

    fn dirty_at(&self, offset: usize) -> bool {
        self.is_page_set(offset >> PAGE_SHIFT)
    }

    fn slice_at(&self, offset: usize) -> RefSlice<'_, Self> {
        RefSlice::new(self, offset)
    }
}

impl NewBitmap for WriteBitmap {
    fn with_len(len: usize) -> Self {
        WriteBitmap::new(len)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Resident memory of this process, in KiB.
    fn rss_kib() -> u64 {
        let status = std::fs::read_to_string("/proc/self/status").unwrap();
        let line = status.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
        line.split_whitespace().nth(1).unwrap().parse().unwrap()
    }

    #[test]
    fn an_unwritten_bitmap_costs_no_memory() {
        // 1 TiB of guest RAM: 32 MiB of bitmap words, none written.
        let before = rss_kib();
        let b = WriteBitmap::new(1 << 40);
        let after = rss_kib();
        assert_eq!(b.pages(), 1 << 28);
        assert!(!b.is_page_set((1 << 28) - 1));
        assert!(
            after.saturating_sub(before) < 8 << 10,
            "{} KiB resident for an empty bitmap",
            after.saturating_sub(before)
        );
    }

    fn taken(b: &WriteBitmap) -> Vec<u64> {
        let mut pages = Vec::new();
        b.take(|first, mut bits| {
            while bits != 0 {
                pages.push(first + u64::from(bits.trailing_zeros()));
                bits &= bits - 1;
            }
        });
        pages
    }

    #[test]
    fn take_returns_each_marked_page_once_in_order() {
        // 5 summary chunks and a bit: crosses chunk and summary-word boundaries.
        let b = WriteBitmap::new((64 * 64 * 65 + 3) << PAGE_SHIFT);
        assert!(taken(&b).is_empty());
        let pages = [
            0usize,
            1,
            63,
            64,
            4095,
            4096,
            64 * 64 * 64,
            64 * 64 * 65 + 2,
        ];
        for &p in pages.iter().rev() {
            b.mark_dirty(p << PAGE_SHIFT, 1);
        }
        assert!(b.dirty_at(4096 << PAGE_SHIFT));
        let want: Vec<u64> = pages.iter().map(|&p| p as u64).collect();
        assert_eq!(taken(&b), want);
        assert!(taken(&b).is_empty(), "taking clears");
        assert!(!b.dirty_at(4096 << PAGE_SHIFT));
    }

    #[test]
    fn ranges_straddle_pages_and_stop_at_the_end() {
        let b = WriteBitmap::new(10 << PAGE_SHIFT);
        b.mark_dirty((2 << PAGE_SHIFT) - 1, 2);
        b.mark_dirty((9 << PAGE_SHIFT) + 5, 1 << 20);
        b.mark_dirty(usize::MAX - 1, 100);
        b.mark_dirty(0, 0);
        assert_eq!(taken(&b), vec![1, 2, 9]);
        // Through a slice at an offset, as vm-memory hands them to devices.
        b.slice_at(3 << PAGE_SHIFT).mark_dirty(1 << PAGE_SHIFT, 1);
        assert_eq!(taken(&b), vec![4]);
        b.mark_dirty(0, 1);
        b.reset();
        assert!(taken(&b).is_empty());
    }

    #[test]
    fn no_write_is_lost_while_another_thread_takes() {
        let b = std::sync::Arc::new(WriteBitmap::new(1 << 30));
        let pages = b.pages();
        let writer = {
            let b = b.clone();
            std::thread::spawn(move || {
                for i in 0..20_000usize {
                    b.mark_dirty(((i * 7919) % pages) << PAGE_SHIFT, 1);
                }
            })
        };
        let mut seen = std::collections::BTreeSet::new();
        while !writer.is_finished() {
            seen.extend(taken(&b));
        }
        writer.join().unwrap();
        seen.extend(taken(&b));
        let want: std::collections::BTreeSet<u64> = (0..20_000usize)
            .map(|i| ((i * 7919) % pages) as u64)
            .collect();
        assert_eq!(seen, want);
    }
}

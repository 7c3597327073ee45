//! Zero page detection: all-zero pages need not be sent to a destination whose memory is still
//! fresh (zero) there.
//!
//! Skipping is only safe for pages the destination has never received: a page sent with data
//! in one round and zeroed by the guest before the next must be sent again. [`ZeroPageFilter`]
//! tracks the pages already sent and applies that rule; [`split_zero_pages`] is the stateless
//! building block, for tables whose pages have never been sent (round 0).
//!
//! The scan never costs much more than it saves ([`ScanPacer`]): it looks at pages in chunks,
//! and after a chunk where too few pages were zero to pay for reading them (checking a page
//! that turns out not to be zero costs a copy of its first bytes; a zero page skipped saves
//! sending 4 KiB and the destination's first touch of it), it sends the next chunks unchecked,
//! twice as many each time it finds nothing, up to [`MAX_BACKOFF_CHUNKS`], and checks again.
//! Sending a zero page is always correct; only the bytes grow. Round 0 holds only pages the
//! host ever backed (`populated`), so the memory a guest never touched is not scanned at all.

use thiserror::Error;
use vm_memory::bitmap::BitmapSlice;
use vm_memory::{GuestAddress, GuestMemoryBackend, VolatileMemoryError, VolatileSlice};

use crate::bitmap::{pages_for_bytes, DirtyBitmap};
use crate::ranges::{MemoryRange, MemoryRangeTable, RamRegions, RangeError, PAGE_SIZE};

/// Page size as a `usize`.
pub const PAGE_BYTES: usize = PAGE_SIZE as usize;

/// Bytes copied out of guest memory per step when checking a page; most non-zero pages are
/// recognised in the first step.
const PROBE_BYTES: usize = 512;

/// Errors scanning guest memory for zero pages.
#[derive(Debug, Error)]
pub enum ZeroPageError {
    /// A range is larger than this host can address.
    #[error("range at {gpa:#x} (+{length:#x}) is too large for this host")]
    TooLarge {
        /// Start of the range.
        gpa: u64,
        /// Its length.
        length: u64,
    },
    /// A range is not backed by guest memory.
    #[error("range at {gpa:#x} (+{length:#x}) is not in guest memory")]
    GuestMemory {
        /// Start of the range.
        gpa: u64,
        /// Its length.
        length: u64,
        /// The failure.
        #[source]
        source: vm_memory::GuestMemoryError,
    },
    /// Slicing guest memory failed.
    #[error("cannot read guest page at {gpa:#x}")]
    Slice {
        /// The page.
        gpa: u64,
        /// The failure.
        #[source]
        source: VolatileMemoryError,
    },
    /// Building the output table failed.
    #[error("cannot build the table of non-zero pages")]
    Table(#[source] RangeError),
}

/// Whether `buf` is all zero bytes. Reads 16 bytes at a time and ORs them together, which the
/// compiler turns into vector instructions.
pub fn is_zero(buf: &[u8]) -> bool {
    let (blocks, rest) = buf.as_chunks::<64>();
    for block in blocks {
        let (words, _) = block.as_chunks::<16>();
        let acc = words
            .iter()
            .fold(0u128, |acc, w| acc | u128::from_ne_bytes(*w));
        if acc != 0 {
            return false;
        }
    }
    rest.iter().all(|&b| b == 0)
}

/// Whether a 4 KiB page is all zero.
pub fn is_zero_page(page: &[u8; PAGE_BYTES]) -> bool {
    is_zero(page)
}

/// Whether a slice of guest memory is all zero. Copies it out in small blocks (guest memory is
/// volatile and must not be borrowed as `&[u8]`), stopping at the first non-zero block.
pub fn is_zero_volatile<B: BitmapSlice>(slice: &VolatileSlice<B>) -> bool {
    let mut buf = [0u8; PROBE_BYTES];
    let mut off = 0;
    while off < slice.len() {
        let n = (slice.len() - off).min(PROBE_BYTES);
        let Ok(part) = slice.subslice(off, n) else {
            return false;
        };
        let copied = part.copy_to(&mut buf[..n]);
        if copied != n || !is_zero(&buf[..n]) {
            return false;
        }
        off += n;
    }
    true
}

/// A table split into the pages to send and a count of the zero pages left out.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ZeroSplit {
    /// Pages to send.
    pub to_send: MemoryRangeTable,
    /// Zero pages left out.
    pub zero_pages: u64,
    /// Pages sent without being checked, because the scan did not pay where it last looked
    /// (pages sent before, which are sent again anyway, included).
    pub unchecked_pages: u64,
}

/// Pages per scan chunk (16 MiB).
pub const CHUNK_PAGES: u64 = 4096;
/// A chunk pays for its scan when at least 1 page in this many was zero. Measured here:
/// checking a non-zero page costs ~0.05 µs (a 512-byte copy, mostly the first 64 bytes
/// decide), sending one and the destination's first touch ~2-5 µs, so even 1 in 64 pays
/// several times over.
pub const PAYING_ZERO_RATIO: u64 = 64;
/// Most chunks sent unchecked in a row before the scan looks again (1 GiB).
pub const MAX_BACKOFF_CHUNKS: u64 = 64;

/// Decides, chunk by chunk, whether checking pages for zero pays (see the module docs).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ScanPacer {
    /// Pages seen in the current chunk.
    seen: u64,
    /// Pages checked / found zero in the current chunk.
    checked: u64,
    zero: u64,
    /// Chunks still to send unchecked.
    skip_chunks: u64,
    /// Chunks to skip after the next chunk that does not pay.
    backoff: u64,
}

impl ScanPacer {
    /// Whether the next page should be checked.
    pub fn check_next(&self) -> bool {
        self.skip_chunks == 0
    }

    /// Pages that may be sent unchecked from here, in one go (0 when the next page should be
    /// checked).
    pub fn unchecked_run(&self) -> u64 {
        if self.skip_chunks == 0 {
            0
        } else {
            CHUNK_PAGES - self.seen
        }
    }

    /// Records `pages` pages sent unchecked (at most [`Self::unchecked_run`]).
    pub fn skip(&mut self, pages: u64) {
        self.seen += pages - 1;
        self.record(false, false);
    }

    /// Records one page: `checked` if it was looked at, `zero` if it was found zero.
    pub fn record(&mut self, checked: bool, zero: bool) {
        self.seen += 1;
        self.checked += u64::from(checked);
        self.zero += u64::from(zero);
        if self.seen < CHUNK_PAGES {
            return;
        }
        if self.skip_chunks > 0 {
            self.skip_chunks -= 1;
        } else if self.checked > 0 {
            if self.zero * PAYING_ZERO_RATIO >= self.checked {
                self.backoff = 0;
            } else {
                self.backoff = (self.backoff * 2).clamp(1, MAX_BACKOFF_CHUNKS);
                self.skip_chunks = self.backoff;
            }
        }
        (self.seen, self.checked, self.zero) = (0, 0, 0);
    }
}

/// Splits `table` into its non-zero pages and counts the zero ones. Only correct when none of
/// the table's pages has been sent before (see [`ZeroPageFilter`]).
pub fn split_zero_pages<M: GuestMemoryBackend + ?Sized>(
    mem: &M,
    table: &MemoryRangeTable,
) -> Result<ZeroSplit, ZeroPageError> {
    scan(mem, table, |_| false)
}

/// Walks every page of `table`; a page is sent if `must_send(gpa)` or it is not all zero.
fn scan<M: GuestMemoryBackend + ?Sized>(
    mem: &M,
    table: &MemoryRangeTable,
    mut must_send: impl FnMut(u64) -> bool,
) -> Result<ZeroSplit, ZeroPageError> {
    let mut out = ZeroSplit::default();
    let mut pacer = ScanPacer::default();
    for range in table {
        let (gpa, length) = (range.gpa, range.length);
        let len = usize::try_from(length).map_err(|_| ZeroPageError::TooLarge { gpa, length })?;
        let mut page_gpa = gpa;
        for slice in GuestMemoryBackend::get_slices(mem, GuestAddress(gpa), len) {
            let slice = slice.map_err(|source| ZeroPageError::GuestMemory {
                gpa,
                length,
                source,
            })?;
            let mut off = 0;
            while off < slice.len() {
                // Where the scan does not pay, the rest of the chunk goes out as one run.
                let run = pacer
                    .unchecked_run()
                    .min(((slice.len() - off) / PAGE_BYTES) as u64);
                if run > 0 {
                    let bytes = run * PAGE_SIZE;
                    out.to_send
                        .push(MemoryRange::new(page_gpa, bytes))
                        .map_err(ZeroPageError::Table)?;
                    pacer.skip(run);
                    out.unchecked_pages += run;
                    off += bytes as usize;
                    page_gpa += bytes;
                    continue;
                }
                let n = (slice.len() - off).min(PAGE_BYTES);
                let page = slice
                    .subslice(off, n)
                    .map_err(|source| ZeroPageError::Slice {
                        gpa: page_gpa,
                        source,
                    })?;
                // Pages sent before are sent again unchecked (counted by the pacer as seen).
                let check = !must_send(page_gpa);
                let zero = check && is_zero_volatile(&page);
                pacer.record(check, zero);
                if zero {
                    out.zero_pages += 1;
                } else {
                    out.to_send
                        .push(MemoryRange::new(page_gpa, n as u64))
                        .map_err(ZeroPageError::Table)?;
                }
                off += n;
                page_gpa += n as u64;
            }
        }
    }
    Ok(out)
}

/// Skips zero pages the destination has never received, and remembers what was sent.
#[derive(Clone, Debug)]
pub struct ZeroPageFilter {
    ram: RamRegions,
    sent: Vec<DirtyBitmap>,
}

impl ZeroPageFilter {
    /// A filter for a destination whose RAM is all fresh (nothing sent yet).
    pub fn new(ram: &RamRegions) -> Self {
        let sent = ram
            .regions()
            .iter()
            .map(|r| DirtyBitmap::new_clear(pages_for_bytes(r.length)))
            .collect();
        ZeroPageFilter {
            ram: ram.clone(),
            sent,
        }
    }

    fn was_sent(&self, gpa: u64) -> bool {
        self.ram.region_index(gpa).is_some_and(|idx| {
            let base = self.ram.regions()[idx].gpa;
            self.sent[idx].is_set((gpa - base) / PAGE_SIZE)
        })
    }

    /// Returns the pages of `table` to send: every page sent before (the destination holds old
    /// data there) and every non-zero page. Zero pages never sent are left out and counted.
    /// The pages returned are recorded as sent.
    pub fn filter<M: GuestMemoryBackend + ?Sized>(
        &mut self,
        mem: &M,
        table: &MemoryRangeTable,
    ) -> Result<ZeroSplit, ZeroPageError> {
        let split = {
            let this = &*self;
            scan(mem, table, |gpa| this.was_sent(gpa))?
        };
        self.mark_sent(&split.to_send);
        Ok(split)
    }

    /// Records the pages of `table` as sent (for tables sent without filtering). Parts of
    /// ranges outside guest RAM are ignored.
    pub fn mark_sent(&mut self, table: &MemoryRangeTable) {
        for range in table {
            for s in self.ram.region_pages(range) {
                // In range by construction of `region_pages`, so this cannot fail.
                let _ = self.sent[s.region].set_range(s.first_page, s.pages);
            }
        }
    }

    /// Pages recorded as sent so far.
    pub fn sent_pages(&self) -> u64 {
        self.sent.iter().map(DirtyBitmap::count).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::{Bytes, GuestMemoryMmap};

    const P: u64 = PAGE_SIZE;

    #[test]
    fn zero_checks() {
        let mut page = [0u8; PAGE_BYTES];
        assert!(is_zero_page(&page));
        for pos in [0, 15, 16, 63, 64, 2047, 4095] {
            page[pos] = 1;
            assert!(!is_zero_page(&page), "byte {pos}");
            page[pos] = 0;
        }
        assert!(is_zero(&[0u8; 70]));
        assert!(!is_zero(&{
            let mut b = [0u8; 70];
            b[69] = 1;
            b
        }));
        assert!(is_zero(&[]));
    }

    fn mem() -> GuestMemoryMmap<()> {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 16 * P as usize)]).unwrap()
    }

    fn ram() -> RamRegions {
        RamRegions::new([MemoryRange::new(0, 16 * P)]).unwrap()
    }

    #[test]
    fn split_skips_zero_pages() {
        let mem = mem();
        mem.write_obj(1u8, GuestAddress(2 * P + 4095)).unwrap();
        mem.write_obj(1u8, GuestAddress(3 * P)).unwrap();
        mem.write_obj(1u8, GuestAddress(9 * P + 1000)).unwrap();
        let table = MemoryRangeTable::from_ranges([MemoryRange::new(0, 16 * P)]).unwrap();
        let split = split_zero_pages(&mem, &table).unwrap();
        assert_eq!(split.zero_pages, 13);
        assert_eq!(
            split.to_send.ranges(),
            &[MemoryRange::new(2 * P, 2 * P), MemoryRange::new(9 * P, P)]
        );
        let outside = MemoryRangeTable::from_ranges([MemoryRange::new(32 * P, P)]).unwrap();
        assert!(matches!(
            split_zero_pages(&mem, &outside),
            Err(ZeroPageError::GuestMemory { .. })
        ));
    }

    #[test]
    fn the_pacer_backs_off_where_nothing_is_zero_and_looks_again() {
        let mut p = ScanPacer::default();
        let chunk = |p: &mut ScanPacer, zero_every: u64| -> (u64, u64) {
            let (mut checked, mut zero) = (0, 0);
            for i in 0..CHUNK_PAGES {
                let c = p.check_next();
                let z = c && zero_every > 0 && i % zero_every == 0;
                p.record(c, z);
                checked += u64::from(c);
                zero += u64::from(z);
            }
            (checked, zero)
        };
        // A chunk with enough zero pages keeps the scan on.
        assert_eq!(chunk(&mut p, 8), (CHUNK_PAGES, CHUNK_PAGES / 8));
        assert!(p.check_next());
        // Nothing zero: 1, then 2, 4, ... chunks unchecked, each time it looks again.
        let mut unchecked_runs = Vec::new();
        for _ in 0..12 {
            assert_eq!(chunk(&mut p, 0), (CHUNK_PAGES, 0));
            let mut run = 0;
            while !p.check_next() {
                assert_eq!(chunk(&mut p, 1), (0, 0));
                run += 1;
            }
            unchecked_runs.push(run);
        }
        assert_eq!(
            unchecked_runs,
            [1, 2, 4, 8, 16, 32, 64, 64, 64, 64, 64, 64],
            "backs off up to {MAX_BACKOFF_CHUNKS} chunks"
        );
        // Zero pages again: the scan stays on.
        assert_eq!(chunk(&mut p, 2).1, CHUNK_PAGES / 2);
        assert!(p.check_next());
        assert_eq!(chunk(&mut p, 2).1, CHUNK_PAGES / 2);
        // 1 zero page in PAYING_ZERO_RATIO pays; 1 in twice that does not.
        chunk(&mut p, PAYING_ZERO_RATIO);
        assert!(p.check_next());
        chunk(&mut p, 2 * PAYING_ZERO_RATIO);
        assert!(!p.check_next());
    }

    /// Where the first chunks hold no zero page, later zero pages are still found, and every
    /// page is either sent or zero.
    #[test]
    fn a_scan_that_backs_off_sends_unchecked_pages_and_finds_later_zero_pages() {
        let pages = 8 * CHUNK_PAGES;
        let mem =
            GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), (pages * P) as usize)]).unwrap();
        // Chunks 0..4 all data, chunks 4..8 all zero.
        for page in 0..4 * CHUNK_PAGES {
            mem.write_obj(1u8, GuestAddress(page * P + 100)).unwrap();
        }
        let table = MemoryRangeTable::from_ranges([MemoryRange::new(0, pages * P)]).unwrap();
        let split = split_zero_pages(&mem, &table).unwrap();
        // Chunk 0 checked (no zero) -> chunk 1 unchecked; chunk 2 checked -> 3, 4 unchecked;
        // chunk 5 checked (all zero): the scan stays on for 6 and 7.
        assert_eq!(split.unchecked_pages, 3 * CHUNK_PAGES);
        assert_eq!(split.zero_pages, 3 * CHUNK_PAGES);
        assert_eq!(split.to_send.total_pages() + split.zero_pages, pages);
        for r in &split.to_send {
            assert!(r.gpa + r.length <= 5 * CHUNK_PAGES * P, "{r:?}");
        }
    }

    /// A page sent with data, then zeroed by the guest, must be sent again (the destination
    /// still holds the old data).
    #[test]
    fn filter_resends_pages_zeroed_after_sending() {
        let mem = mem();
        let mut filter = ZeroPageFilter::new(&ram());
        mem.write_obj(7u64, GuestAddress(P)).unwrap();
        let all = MemoryRangeTable::from_ranges([MemoryRange::new(0, 16 * P)]).unwrap();
        let r0 = filter.filter(&mem, &all).unwrap();
        assert_eq!(r0.to_send.ranges(), &[MemoryRange::new(P, P)]);
        assert_eq!(r0.zero_pages, 15);
        assert_eq!(filter.sent_pages(), 1);

        // The guest zeroes page 1 and leaves page 5 zero; both are dirty.
        mem.write_obj(0u64, GuestAddress(P)).unwrap();
        let dirty =
            MemoryRangeTable::from_ranges([MemoryRange::new(P, P), MemoryRange::new(5 * P, P)])
                .unwrap();
        let r1 = filter.filter(&mem, &dirty).unwrap();
        assert_eq!(r1.to_send.ranges(), &[MemoryRange::new(P, P)]);
        assert_eq!(r1.zero_pages, 1);

        filter.mark_sent(&MemoryRangeTable::from_ranges([MemoryRange::new(5 * P, 2 * P)]).unwrap());
        assert_eq!(filter.sent_pages(), 3);
        let r2 = filter.filter(&mem, &dirty).unwrap();
        assert_eq!(r2.to_send, dirty);
        assert_eq!(r2.zero_pages, 0);
    }
}

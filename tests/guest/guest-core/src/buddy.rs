//! A binary buddy page allocator in the style of Linux's: one free list per order 0..=[`MAX_ORDER`]
//! (4 KiB .. 4 MiB blocks), blocks split on allocation and coalesced with their buddy on free.
//!
//! Metadata lives *outside* the managed memory (like Linux's `struct page` array), so free pages
//! are never touched: a guest that never used a page never faults it in. Per page frame there is
//! one [`Link`] (8 bytes, used only while the frame heads a free block) and one state byte.
//! Frames are addressed by absolute page frame numbers (PFN = physical address / 4 KiB) from
//! `base_pfn` to `base_pfn + len`; frames never handed to [`Buddy::add_free_range`] (holes,
//! reserved memory) simply never become free and never coalesce.

/// Highest order: blocks of 2^10 pages = 4 MiB, like Linux's `MAX_ORDER` on x86-64.
pub const MAX_ORDER: usize = 10;
/// Number of free lists.
pub const NR_ORDERS: usize = MAX_ORDER + 1;
/// "No frame" in the intrusive lists.
pub const NIL: u32 = u32::MAX;

/// State byte: frame heads a free block; the low bits give the order.
const FREE: u8 = 0x80;

/// Free list links of one frame (valid only while it heads a free block).
#[derive(Clone, Copy, Debug, Default)]
#[repr(C)]
pub struct Link {
    next: u32,
    prev: u32,
}

/// Why [`Buddy::free`] or [`Buddy::add_free_range`] refused a request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Error {
    /// The block lies (partly) outside the metadata arrays.
    OutOfRange,
    /// The PFN is not aligned to the block size, or the order is too big.
    BadOrder,
    /// (Part of) the block is already free.
    DoubleFree,
}

/// The allocator. `'a` is the lifetime of the metadata arrays.
pub struct Buddy<'a> {
    links: &'a mut [Link],
    state: &'a mut [u8],
    base_pfn: u32,
    heads: [u32; NR_ORDERS],
    blocks: [u64; NR_ORDERS],
    free_pages: u64,
    managed_pages: u64,
}

impl<'a> Buddy<'a> {
    /// Creates an empty allocator for frames `base_pfn .. base_pfn + links.len()`.
    /// The arrays may hold garbage; they are initialised here. Returns `None` if the array
    /// lengths differ or the range does not fit in 32-bit PFNs.
    pub fn new(links: &'a mut [Link], state: &'a mut [u8], base_pfn: u32) -> Option<Self> {
        if links.len() != state.len() || (base_pfn as u64 + links.len() as u64) >= NIL as u64 {
            return None;
        }
        state.fill(0);
        Some(Buddy {
            links,
            state,
            base_pfn,
            heads: [NIL; NR_ORDERS],
            blocks: [0; NR_ORDERS],
            free_pages: 0,
            managed_pages: 0,
        })
    }

    /// Bytes of metadata needed per managed frame (for sizing the arrays).
    pub const fn metadata_bytes_per_page() -> usize {
        core::mem::size_of::<Link>() + 1
    }

    /// Gives the frames `start .. end` to the allocator (as the largest aligned blocks that fit;
    /// they coalesce with adjacent free blocks).
    pub fn add_free_range(&mut self, start: u32, end: u32) -> Result<(), Error> {
        if start > end || !self.in_range(start, 0) || (end > start && !self.in_range(end - 1, 0)) {
            return Err(Error::OutOfRange);
        }
        let mut pfn = start;
        while pfn < end {
            let mut order = (pfn.trailing_zeros() as usize).min(MAX_ORDER);
            while (1u32 << order) > end - pfn {
                order -= 1;
            }
            self.free(pfn, order)?;
            self.managed_pages += 1 << order;
            pfn += 1 << order;
        }
        Ok(())
    }

    /// Allocates a block of 2^`order` frames, aligned to its size. Returns its first PFN.
    pub fn alloc(&mut self, order: usize) -> Option<u32> {
        if order > MAX_ORDER {
            return None;
        }
        let mut o = order;
        while o <= MAX_ORDER && self.heads[o] == NIL {
            o += 1;
        }
        if o > MAX_ORDER {
            return None;
        }
        let pfn = self.heads[o];
        self.unlink(pfn, o);
        // Split: keep the lower half, hand the upper halves back to the lower lists.
        while o > order {
            o -= 1;
            self.push(pfn + (1 << o), o);
        }
        self.free_pages -= 1 << order;
        Some(pfn)
    }

    /// Frees a block of 2^`order` frames starting at `pfn` and coalesces it with free buddies.
    pub fn free(&mut self, pfn: u32, order: usize) -> Result<(), Error> {
        if order > MAX_ORDER || pfn & ((1u32 << order) - 1) != 0 {
            return Err(Error::BadOrder);
        }
        if !self.in_range(pfn, order) {
            return Err(Error::OutOfRange);
        }
        if self.overlaps_free(pfn, order) {
            return Err(Error::DoubleFree);
        }
        self.free_pages += 1 << order;
        let (mut pfn, mut order) = (pfn, order);
        while order < MAX_ORDER {
            let buddy = pfn ^ (1 << order);
            if !self.in_range(buddy, order) || self.state_of(buddy) != FREE | order as u8 {
                break;
            }
            self.unlink(buddy, order);
            pfn &= !(1 << order);
            order += 1;
        }
        self.push(pfn, order);
        Ok(())
    }

    /// Free frames.
    pub fn free_pages(&self) -> u64 {
        self.free_pages
    }

    /// Frames ever given to the allocator.
    pub fn managed_pages(&self) -> u64 {
        self.managed_pages
    }

    /// Number of free blocks of `order`.
    pub fn free_blocks(&self, order: usize) -> u64 {
        self.blocks.get(order).copied().unwrap_or(0)
    }

    /// Calls `f(pfn, order)` for every free block, walking the free lists from order 0 up.
    pub fn for_each_free_block(&self, mut f: impl FnMut(u32, usize)) {
        for order in 0..NR_ORDERS {
            let mut pfn = self.heads[order];
            while pfn != NIL {
                f(pfn, order);
                pfn = self.links[self.idx(pfn)].next;
            }
        }
    }

    /// Calls `f(first_pfn, pages)` for every maximal run of free frames, in address order
    /// (adjacent free blocks of any order are merged). Allocates nothing, writes nothing.
    pub fn for_each_free_range(&self, mut f: impl FnMut(u32, u64)) {
        let mut run: Option<(u32, u64)> = None;
        let mut i = 0usize;
        let n = self.state.len();
        while i < n {
            let s = self.state[i];
            if s & FREE != 0 {
                let pages = 1u64 << (s & 0x7f);
                let pfn = self.base_pfn + i as u32;
                run = match run {
                    Some((start, len)) if start as u64 + len == pfn as u64 => Some((start, len + pages)),
                    Some((start, len)) => {
                        f(start, len);
                        Some((pfn, pages))
                    }
                    None => Some((pfn, pages)),
                };
                i += pages as usize;
            } else if i.is_multiple_of(8) && i + 8 <= n && self.state[i..i + 8].iter().all(|&b| b == 0) {
                i += 8; // fast skip over allocated / reserved memory
            } else {
                i += 1;
            }
        }
        if let Some((start, len)) = run {
            f(start, len);
        }
    }

    /// Checks every invariant (list integrity, counts, alignment, no overlap, full coalescing).
    /// O(free pages); meant for tests and debugging.
    pub fn check(&self) -> Result<(), &'static str> {
        let mut total = 0u64;
        for order in 0..NR_ORDERS {
            let mut pfn = self.heads[order];
            let mut prev = NIL;
            let mut count = 0u64;
            while pfn != NIL {
                if !self.in_range(pfn, order) {
                    return Err("free block out of range");
                }
                if pfn & ((1 << order) - 1) != 0 {
                    return Err("free block misaligned");
                }
                if self.state_of(pfn) != FREE | order as u8 {
                    return Err("list entry without matching state");
                }
                let l = self.links[self.idx(pfn)];
                if l.prev != prev {
                    return Err("broken prev link");
                }
                for p in pfn + 1..pfn + (1 << order) {
                    if self.state_of(p) != 0 {
                        return Err("free blocks overlap");
                    }
                }
                if order < MAX_ORDER {
                    let buddy = pfn ^ (1 << order);
                    if self.in_range(buddy, order) && self.state_of(buddy) == FREE | order as u8 {
                        return Err("free buddies not coalesced");
                    }
                }
                count += 1;
                if count > self.state.len() as u64 {
                    return Err("list cycle");
                }
                prev = pfn;
                pfn = l.next;
            }
            if count != self.blocks[order] {
                return Err("block count mismatch");
            }
            total += count << order;
        }
        let heads = self.state.iter().filter(|&&s| s & FREE != 0).count() as u64;
        if heads != self.blocks.iter().sum::<u64>() {
            return Err("free state bytes not on any list");
        }
        if total != self.free_pages {
            return Err("free page count mismatch");
        }
        Ok(())
    }

    fn idx(&self, pfn: u32) -> usize {
        (pfn - self.base_pfn) as usize
    }

    fn state_of(&self, pfn: u32) -> u8 {
        self.state[self.idx(pfn)]
    }

    fn in_range(&self, pfn: u32, order: usize) -> bool {
        pfn >= self.base_pfn && (pfn - self.base_pfn) as u64 + (1u64 << order) <= self.state.len() as u64
    }

    /// Is any frame of the block already free? (The block itself, a free block containing it,
    /// or a smaller free block inside it.)
    fn overlaps_free(&self, pfn: u32, order: usize) -> bool {
        for o in 0..=MAX_ORDER {
            let head = pfn & !((1u32 << o) - 1);
            if self.in_range(head, 0) {
                let s = self.state_of(head);
                if s & FREE != 0 && (s & 0x7f) as usize >= o && head as u64 + (1u64 << (s & 0x7f)) > pfn as u64 {
                    return true;
                }
            }
        }
        let (start, len) = (self.idx(pfn), 1usize << order);
        self.state[start..start + len].iter().any(|&s| s & FREE != 0)
    }

    fn push(&mut self, pfn: u32, order: usize) {
        let i = self.idx(pfn);
        let head = self.heads[order];
        self.links[i] = Link { next: head, prev: NIL };
        if head != NIL {
            let h = self.idx(head);
            self.links[h].prev = pfn;
        }
        self.heads[order] = pfn;
        self.state[i] = FREE | order as u8;
        self.blocks[order] += 1;
    }

    fn unlink(&mut self, pfn: u32, order: usize) {
        let i = self.idx(pfn);
        let Link { next, prev } = self.links[i];
        if prev == NIL {
            self.heads[order] = next;
        } else {
            let p = self.idx(prev);
            self.links[p].next = next;
        }
        if next != NIL {
            let n = self.idx(next);
            self.links[n].prev = prev;
        }
        self.state[i] = 0;
        self.blocks[order] -= 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    fn arrays(n: usize) -> (Vec<Link>, Vec<u8>) {
        (vec![Link { next: 7, prev: 9 }; n], vec![0xAB; n])
    }

    #[test]
    fn init_coalesces_to_max_order_blocks() {
        let (mut l, mut s) = arrays(8192);
        let mut b = Buddy::new(&mut l, &mut s, 0).unwrap();
        b.add_free_range(0, 8192).unwrap();
        assert_eq!(b.free_pages(), 8192);
        assert_eq!(b.free_blocks(MAX_ORDER), 8);
        for o in 0..MAX_ORDER {
            assert_eq!(b.free_blocks(o), 0);
        }
        b.check().unwrap();
    }

    #[test]
    fn unaligned_ranges_and_holes() {
        let (mut l, mut s) = arrays(6000);
        let mut b = Buddy::new(&mut l, &mut s, 1000).unwrap();
        // two ranges separated by a hole: must never coalesce across it
        b.add_free_range(1003, 3000).unwrap();
        b.add_free_range(3001, 6999).unwrap();
        assert_eq!(b.free_pages(), (3000 - 1003) + (6999 - 3001));
        b.check().unwrap();
        let mut seen = HashSet::new();
        b.for_each_free_block(|pfn, o| {
            for p in pfn..pfn + (1 << o) {
                assert!(seen.insert(p));
                assert!(p != 3000 && (1003..6999).contains(&p));
            }
        });
        assert_eq!(seen.len() as u64, b.free_pages());
        assert_eq!(b.add_free_range(900, 1001), Err(Error::OutOfRange));
        assert_eq!(b.add_free_range(6990, 7001), Err(Error::OutOfRange));
    }

    #[test]
    fn no_double_allocation_and_full_coalescing() {
        let n = 4096 * 2;
        let (mut l, mut s) = arrays(n);
        let mut b = Buddy::new(&mut l, &mut s, 0).unwrap();
        b.add_free_range(0, n as u32).unwrap();
        let mut owned = HashSet::new();
        let mut blocks = Vec::new();
        let mut rng = 12345u64;
        let mut next = || {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            rng
        };
        // random mixed-order allocations until exhaustion
        loop {
            let order = (next() % 4) as usize;
            match b.alloc(order) {
                Some(pfn) => {
                    assert_eq!(pfn & ((1 << order) - 1), 0, "alignment");
                    for p in pfn..pfn + (1 << order) {
                        assert!(owned.insert(p), "page {p} allocated twice");
                    }
                    blocks.push((pfn, order));
                }
                None => {
                    if b.alloc(0).map(|p| {
                        assert!(owned.insert(p));
                        blocks.push((p, 0));
                    }).is_none() {
                        break;
                    }
                }
            }
        }
        assert_eq!(b.free_pages(), 0);
        assert_eq!(owned.len(), n);
        b.check().unwrap();
        // free in random order, checking invariants now and then
        while !blocks.is_empty() {
            let i = (next() % blocks.len() as u64) as usize;
            let (pfn, o) = blocks.swap_remove(i);
            b.free(pfn, o).unwrap();
            if blocks.len() % 97 == 0 {
                b.check().unwrap();
            }
        }
        b.check().unwrap();
        assert_eq!(b.free_pages(), n as u64);
        assert_eq!(b.free_blocks(MAX_ORDER), (n >> MAX_ORDER) as u64);
    }

    #[test]
    fn double_free_is_refused() {
        let (mut l, mut s) = arrays(2048);
        let mut b = Buddy::new(&mut l, &mut s, 0).unwrap();
        b.add_free_range(0, 2048).unwrap();
        let a = b.alloc(3).unwrap();
        let c = b.alloc(0).unwrap();
        b.free(a, 3).unwrap();
        assert_eq!(b.free(a, 3), Err(Error::DoubleFree));
        assert_eq!(b.free(a + 1, 0), Err(Error::DoubleFree), "page inside a free block");
        assert_eq!(b.free(c & !7, 3), Err(Error::DoubleFree), "block holding smaller free blocks");
        assert_eq!(b.free(5, 1), Err(Error::BadOrder));
        assert_eq!(b.free(0, 11), Err(Error::BadOrder));
        assert_eq!(b.free(4096, 0), Err(Error::OutOfRange));
        b.free(c, 0).unwrap();
        b.check().unwrap();
        assert_eq!(b.free_pages(), 2048);
        assert_eq!(b.free_blocks(MAX_ORDER), 2);
    }

    #[test]
    fn alloc_splits_smallest_fitting_block() {
        let (mut l, mut s) = arrays(1024);
        let mut b = Buddy::new(&mut l, &mut s, 0).unwrap();
        b.add_free_range(0, 1024).unwrap();
        let p = b.alloc(0).unwrap();
        assert_eq!(p, 0);
        // one block of each order 0..9 remains
        for o in 0..MAX_ORDER {
            assert_eq!(b.free_blocks(o), 1, "order {o}");
        }
        assert_eq!(b.free_blocks(MAX_ORDER), 0);
        assert_eq!(b.alloc(MAX_ORDER), None);
        assert_eq!(b.alloc(MAX_ORDER + 1), None);
        b.free(p, 0).unwrap();
        assert_eq!(b.free_blocks(MAX_ORDER), 1);
        b.check().unwrap();
    }

    #[test]
    fn fragmentation_every_other_64k() {
        // 64 MiB, allocate everything in 64 KiB (order 4) pieces, free every other one:
        // half the memory is free, but no block of order > 4 can exist.
        let n = 16384;
        let (mut l, mut s) = arrays(n);
        let mut b = Buddy::new(&mut l, &mut s, 0).unwrap();
        b.add_free_range(0, n as u32).unwrap();
        let mut v = Vec::new();
        while let Some(p) = b.alloc(4) {
            v.push(p);
        }
        v.sort();
        for p in v.iter().step_by(2) {
            b.free(*p, 4).unwrap();
        }
        b.check().unwrap();
        assert_eq!(b.free_pages(), n as u64 / 2);
        assert_eq!(b.free_blocks(4), (n / 32) as u64);
        for o in 5..=MAX_ORDER {
            assert_eq!(b.free_blocks(o), 0);
        }
        assert_eq!(b.alloc(MAX_ORDER), None, "no 4 MiB block although half is free");
        // ranges: one per free 64 KiB piece, none merged
        let mut ranges = 0;
        b.for_each_free_range(|pfn, len| {
            assert_eq!(len, 16);
            assert_eq!(pfn % 32, 0);
            ranges += 1;
        });
        assert_eq!(ranges, n / 32);
        // freeing the other halves restores max-order blocks
        for p in v.iter().skip(1).step_by(2) {
            b.free(*p, 4).unwrap();
        }
        assert_eq!(b.free_blocks(MAX_ORDER), (n >> MAX_ORDER) as u64);
        b.check().unwrap();
    }

    #[test]
    fn free_ranges_match_free_blocks() {
        let n = 5000;
        let (mut l, mut s) = arrays(n);
        let mut b = Buddy::new(&mut l, &mut s, 100).unwrap();
        b.add_free_range(100, 100 + n as u32).unwrap();
        let mut held = Vec::new();
        for i in 0..300 {
            if let Some(p) = b.alloc(i % 3) {
                held.push((p, i % 3));
            }
        }
        for (p, o) in held.iter().step_by(3) {
            b.free(*p, *o).unwrap();
        }
        let mut from_blocks = HashSet::new();
        b.for_each_free_block(|p, o| from_blocks.extend(p..p + (1 << o)));
        let mut from_ranges = HashSet::new();
        let mut last_end = 0u64;
        b.for_each_free_range(|p, len| {
            assert!(p as u64 > last_end || last_end == 0, "ranges sorted and not adjacent");
            last_end = p as u64 + len;
            from_ranges.extend(p..p + len as u32);
        });
        assert_eq!(from_blocks, from_ranges);
        assert_eq!(from_ranges.len() as u64, b.free_pages());
    }

    #[test]
    fn bad_arrays_rejected() {
        let mut l = vec![Link::default(); 10];
        let mut s = vec![0u8; 11];
        assert!(Buddy::new(&mut l, &mut s, 0).is_none());
    }
}

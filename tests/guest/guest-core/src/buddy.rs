//! A binary buddy page allocator in the style of Linux's: free blocks of every order
//! 0..=[`MAX_ORDER`] (4 KiB .. 4 MiB), split on allocation and coalesced with their buddy on free.
//!
//! Bookkeeping is a set of bitmaps, one per order, with one bit per *aligned* block of that order:
//! the bit is set iff that block is currently a free block of exactly that order. A page frame is
//! free iff exactly one of the (at most 11) blocks containing it has its bit set. Each bitmap is
//! hierarchical: level `l + 1` has one bit per 64-bit word of level `l`, set iff that word is
//! non-zero, up to a single top word. So finding the lowest free block of an order, or the next
//! one after some position, costs one word per level (at most 6 levels for 32-bit PFNs).
//!
//! Size: order `o` has `pages >> o` bits, so all orders together take about 2 bits per page plus
//! 1/64 for the summaries: ~66 KiB per GiB of covered PFN space, against the 9 bytes per page
//! (2.3 MiB per GiB) of a `struct page`-like array with intrusive free lists. The metadata lives
//! *outside* the managed memory and free pages are never written (a guest that never used a page
//! never faults it in). Frames are addressed by absolute page frame numbers (PFN = physical
//! address / 4 KiB) from `base_pfn` to `base_pfn + pages`; frames never handed to
//! [`Buddy::add_free_range`] (holes, reserved memory) simply never become free and never
//! coalesce.
//!
//! Allocation takes the lowest-addressed free block of the smallest order that fits (Linux takes
//! the head of that order's free list; both split the same way, keeping the lower half). Freeing
//! needs the block's order, which every caller knows (it is the order it allocated with).

/// Highest order: blocks of 2^10 pages = 4 MiB, like Linux's `MAX_ORDER` on x86-64.
pub const MAX_ORDER: usize = 10;
/// Number of orders.
pub const NR_ORDERS: usize = MAX_ORDER + 1;
/// "No frame" (PFNs must stay below it).
pub const NIL: u32 = u32::MAX;

/// Summary levels per order bitmap: 2^32 bits need 6 levels of 64-ary summaries.
const LEVELS: usize = 6;

/// Why [`Buddy::free`] or [`Buddy::add_free_range`] refused a request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Error {
    /// The block lies (partly) outside the managed PFN range.
    OutOfRange,
    /// The PFN is not aligned to the block size, or the order is too big.
    BadOrder,
    /// (Part of) the block is already free.
    DoubleFree,
}

/// Where the hierarchical bitmap of one order lives in the metadata words.
#[derive(Clone, Copy, Debug, Default)]
struct Map {
    /// Absolute block index (`pfn >> order`) of bit 0.
    first: u64,
    /// Bits at level 0 (blocks of this order touching the PFN range, even partially).
    nbits: u64,
    /// Number of levels (>= 1); the last one is a single word.
    levels: usize,
    /// Word offset of each level.
    off: [usize; LEVELS],
    /// Words in each level.
    words: [usize; LEVELS],
}

impl Map {
    fn set(&self, w: &mut [u64], bit: u64) {
        let mut bit = bit as usize;
        for l in 0..self.levels {
            let i = self.off[l] + (bit >> 6);
            let old = w[i];
            w[i] = old | 1 << (bit & 63);
            if old != 0 {
                break;
            }
            bit >>= 6;
        }
    }

    fn clear(&self, w: &mut [u64], bit: u64) {
        let mut bit = bit as usize;
        for l in 0..self.levels {
            let i = self.off[l] + (bit >> 6);
            let new = w[i] & !(1 << (bit & 63));
            w[i] = new;
            if new != 0 {
                break;
            }
            bit >>= 6;
        }
    }

    fn get(&self, w: &[u64], bit: u64) -> bool {
        w[self.off[0] + (bit >> 6) as usize] & (1 << (bit & 63)) != 0
    }

    /// Lowest set bit, from the top word down.
    fn first_set(&self, w: &[u64]) -> Option<u64> {
        let top = self.levels - 1;
        if self.words[top] == 0 || w[self.off[top]] == 0 {
            return None;
        }
        let mut i = w[self.off[top]].trailing_zeros() as usize;
        for l in (0..top).rev() {
            i = (i << 6) | w[self.off[l] + i].trailing_zeros() as usize;
        }
        Some(i as u64)
    }

    /// Lowest set bit at or after `from`.
    fn next_set(&self, w: &[u64], from: u64) -> Option<u64> {
        let mut i = from as usize;
        let mut l = 0;
        loop {
            if i >> 6 >= self.words[l] {
                return None;
            }
            let word = w[self.off[l] + (i >> 6)] & (!0u64 << (i & 63));
            if word != 0 {
                i = (i & !63) | word.trailing_zeros() as usize;
                break;
            }
            if l + 1 == self.levels {
                return None;
            }
            // the rest of this word is empty: continue with the next word, one level up
            i = (i >> 6) + 1;
            l += 1;
        }
        while l > 0 {
            l -= 1;
            i = (i << 6) | w[self.off[l] + i].trailing_zeros() as usize;
        }
        Some(i as u64)
    }

    /// Is any bit in `lo..hi` set (level 0 only)?
    fn any_in(&self, w: &[u64], lo: u64, hi: u64) -> bool {
        let mut i = lo;
        while i < hi {
            let n = (64 - (i & 63)).min(hi - i);
            let mask = if n == 64 {
                !0
            } else {
                ((1u64 << n) - 1) << (i & 63)
            };
            if w[self.off[0] + (i >> 6) as usize] & mask != 0 {
                return true;
            }
            i += n;
        }
        false
    }
}

/// Bitmap placement for `pages` frames from `base_pfn`, and the total words needed.
fn layout(base_pfn: u32, pages: u32) -> ([Map; NR_ORDERS], usize) {
    let mut maps = [Map::default(); NR_ORDERS];
    let mut off = 0usize;
    let (lo, hi) = (base_pfn as u64, base_pfn as u64 + pages as u64);
    for (o, m) in maps.iter_mut().enumerate() {
        m.first = lo >> o;
        m.nbits = if pages == 0 {
            0
        } else {
            ((hi - 1) >> o) - m.first + 1
        };
        let mut bits = m.nbits as usize;
        loop {
            let words = bits.div_ceil(64);
            m.off[m.levels] = off;
            m.words[m.levels] = words;
            m.levels += 1;
            off += words;
            if words <= 1 {
                break;
            }
            bits = words;
        }
    }
    (maps, off)
}

/// The allocator. `'a` is the lifetime of the metadata words.
pub struct Buddy<'a> {
    bits: &'a mut [u64],
    maps: [Map; NR_ORDERS],
    base_pfn: u32,
    pages: u32,
    blocks: [u64; NR_ORDERS],
    free_pages: u64,
    managed_pages: u64,
}

impl<'a> Buddy<'a> {
    /// 64-bit words of metadata needed for frames `base_pfn .. base_pfn + pages`
    /// (about `pages / 32`, i.e. ~2 bits per page).
    pub fn metadata_words(base_pfn: u32, pages: u32) -> usize {
        layout(base_pfn, pages).1
    }

    /// Bytes of metadata needed for frames `base_pfn .. base_pfn + pages`.
    pub fn metadata_bytes(base_pfn: u32, pages: u32) -> usize {
        Self::metadata_words(base_pfn, pages) * 8
    }

    /// Creates an empty allocator for frames `base_pfn .. base_pfn + pages`, keeping its bitmaps
    /// in the first [`Buddy::metadata_words`] words of `bits`. The words may hold garbage; they
    /// are cleared here. Returns `None` if `bits` is too short or the range does not fit in
    /// 32-bit PFNs.
    pub fn new(bits: &'a mut [u64], base_pfn: u32, pages: u32) -> Option<Self> {
        if base_pfn as u64 + pages as u64 >= NIL as u64 {
            return None;
        }
        let (maps, need) = layout(base_pfn, pages);
        let bits = bits.get_mut(..need)?;
        bits.fill(0);
        Some(Buddy {
            bits,
            maps,
            base_pfn,
            pages,
            blocks: [0; NR_ORDERS],
            free_pages: 0,
            managed_pages: 0,
        })
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
        let mut o = (order..NR_ORDERS).find(|&o| self.blocks[o] > 0)?;
        let bit = self.maps[o].first_set(self.bits)?;
        let pfn = ((self.maps[o].first + bit) << o) as u32;
        self.unmark(pfn, o);
        // Split: keep the lower half, give the upper halves back as free blocks of lower orders.
        while o > order {
            o -= 1;
            self.mark(pfn + (1 << o), o);
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
            if !self.is_free_block(buddy, order) {
                break;
            }
            self.unmark(buddy, order);
            pfn &= !(1 << order);
            order += 1;
        }
        self.mark(pfn, order);
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

    /// Bytes of metadata in use.
    pub fn metadata_len(&self) -> usize {
        self.bits.len() * 8
    }

    /// Calls `f(pfn, order)` for every free block: order 0 first, in address order within an order.
    pub fn for_each_free_block(&self, mut f: impl FnMut(u32, usize)) {
        for (o, m) in self.maps.iter().enumerate() {
            let mut next = m.first_set(self.bits);
            while let Some(bit) = next {
                f(((m.first + bit) << o) as u32, o);
                next = m.next_set(self.bits, bit + 1);
            }
        }
    }

    /// Calls `f(first_pfn, pages)` for every maximal run of free frames, in address order
    /// (adjacent free blocks of any order are merged). Allocates nothing, writes nothing.
    /// A merge of the per-order bitmaps: O(free blocks x orders).
    pub fn for_each_free_range(&self, mut f: impl FnMut(u32, u64)) {
        // next free block of each order, as (bit, pfn)
        let mut next: [Option<(u64, u64)>; NR_ORDERS] = [None; NR_ORDERS];
        for (o, m) in self.maps.iter().enumerate() {
            next[o] = m.first_set(self.bits).map(|b| (b, (m.first + b) << o));
        }
        let mut run: Option<(u64, u64)> = None;
        loop {
            let mut best: Option<(u64, usize)> = None;
            for (o, n) in next.iter().enumerate() {
                if let Some((_, pfn)) = *n {
                    if best.is_none_or(|(p, _)| pfn < p) {
                        best = Some((pfn, o));
                    }
                }
            }
            let Some((pfn, o)) = best else { break };
            let pages = 1u64 << o;
            run = match run {
                Some((start, len)) if start + len == pfn => Some((start, len + pages)),
                Some((start, len)) => {
                    f(start as u32, len);
                    Some((pfn, pages))
                }
                None => Some((pfn, pages)),
            };
            let m = &self.maps[o];
            let bit = next[o].map_or(0, |(b, _)| b);
            next[o] = m
                .next_set(self.bits, bit + 1)
                .map(|b| (b, (m.first + b) << o));
        }
        if let Some((start, len)) = run {
            f(start as u32, len);
        }
    }

    /// Checks every invariant (bitmap summaries, counts, range, no overlap, full coalescing).
    /// O(metadata + free blocks); meant for tests and debugging.
    pub fn check(&self) -> Result<(), &'static str> {
        let w = &*self.bits;
        let mut total = 0u64;
        for (o, m) in self.maps.iter().enumerate() {
            // summaries: bit j of level l+1 set iff word j of level l is non-zero; no stray bits
            for l in 0..m.levels {
                let bits_here = if l == 0 {
                    m.nbits
                } else {
                    m.words[l - 1] as u64
                };
                for j in 0..m.words[l] {
                    let word = w[m.off[l] + j];
                    let valid = bits_here - 64 * j as u64;
                    if valid < 64 && word >> valid != 0 {
                        return Err("bit set past the end of a bitmap level");
                    }
                    if l + 1 < m.levels {
                        let up = w[m.off[l + 1] + j / 64] & (1 << (j % 64)) != 0;
                        if up != (word != 0) {
                            return Err("summary bit disagrees with its word");
                        }
                    }
                }
            }
            let mut count = 0u64;
            let mut next = m.first_set(w);
            while let Some(bit) = next {
                let pfn = (m.first + bit) << o;
                if pfn > u32::MAX as u64 || !self.in_range(pfn as u32, o) {
                    return Err("free block out of range");
                }
                let pfn = pfn as u32;
                for up in o + 1..NR_ORDERS {
                    if self.is_free_block(pfn & !((1 << up) - 1), up) {
                        return Err("free blocks overlap");
                    }
                }
                if o < MAX_ORDER && self.is_free_block(pfn ^ (1 << o), o) {
                    return Err("free buddies not coalesced");
                }
                count += 1;
                next = m.next_set(w, bit + 1);
            }
            let pop: u64 = w[m.off[0]..m.off[0] + m.words[0]]
                .iter()
                .map(|x| x.count_ones() as u64)
                .sum();
            if pop != count {
                return Err("bitmap walk misses set bits");
            }
            if count != self.blocks[o] {
                return Err("block count mismatch");
            }
            total += count << o;
        }
        if total != self.free_pages {
            return Err("free page count mismatch");
        }
        if self.free_pages > self.managed_pages.max(self.pages as u64) {
            return Err("more free pages than frames");
        }
        Ok(())
    }

    fn in_range(&self, pfn: u32, order: usize) -> bool {
        pfn >= self.base_pfn && (pfn - self.base_pfn) as u64 + (1u64 << order) <= self.pages as u64
    }

    /// Is `pfn` the start of a free block of exactly `order`? (False outside the range.)
    fn is_free_block(&self, pfn: u32, order: usize) -> bool {
        if !self.in_range(pfn, order) {
            return false;
        }
        let m = &self.maps[order];
        m.get(self.bits, (pfn as u64 >> order) - m.first)
    }

    /// Is any frame of the (in-range, aligned) block already free? (The block itself, a free
    /// block containing it, or a smaller free block inside it.)
    fn overlaps_free(&self, pfn: u32, order: usize) -> bool {
        if (order..NR_ORDERS).any(|o| self.is_free_block(pfn & !((1u32 << o) - 1), o)) {
            return true;
        }
        let end = pfn as u64 + (1u64 << order);
        (0..order).any(|o| {
            let m = &self.maps[o];
            m.any_in(self.bits, (pfn as u64 >> o) - m.first, (end >> o) - m.first)
        })
    }

    fn mark(&mut self, pfn: u32, order: usize) {
        let m = self.maps[order];
        m.set(self.bits, (pfn as u64 >> order) - m.first);
        self.blocks[order] += 1;
    }

    fn unmark(&mut self, pfn: u32, order: usize) {
        let m = self.maps[order];
        m.clear(self.bits, (pfn as u64 >> order) - m.first);
        self.blocks[order] -= 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::{BTreeMap, BTreeSet, HashSet};

    /// Metadata for `n` frames from `base`, filled with garbage (`new` must clear it).
    fn words(base: u32, n: usize) -> Vec<u64> {
        vec![0xdead_beef_a5a5_5a5a; Buddy::metadata_words(base, n as u32)]
    }

    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }
        fn below(&mut self, n: u64) -> u64 {
            self.next() % n
        }
    }

    #[test]
    fn init_coalesces_to_max_order_blocks() {
        let mut w = words(0, 8192);
        let mut b = Buddy::new(&mut w, 0, 8192).unwrap();
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
        let mut w = words(1000, 6000);
        let mut b = Buddy::new(&mut w, 1000, 6000).unwrap();
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
        let mut w = words(0, n);
        let mut b = Buddy::new(&mut w, 0, n as u32).unwrap();
        b.add_free_range(0, n as u32).unwrap();
        let mut owned = HashSet::new();
        let mut blocks = Vec::new();
        let mut rng = Rng(12345);
        // random mixed-order allocations until exhaustion
        loop {
            let order = rng.below(4) as usize;
            match b.alloc(order) {
                Some(pfn) => {
                    assert_eq!(pfn & ((1 << order) - 1), 0, "alignment");
                    for p in pfn..pfn + (1 << order) {
                        assert!(owned.insert(p), "page {p} allocated twice");
                    }
                    blocks.push((pfn, order));
                }
                None => {
                    if b.alloc(0)
                        .map(|p| {
                            assert!(owned.insert(p));
                            blocks.push((p, 0));
                        })
                        .is_none()
                    {
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
            let i = rng.below(blocks.len() as u64) as usize;
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
        let mut w = words(0, 2048);
        let mut b = Buddy::new(&mut w, 0, 2048).unwrap();
        b.add_free_range(0, 2048).unwrap();
        let a = b.alloc(3).unwrap();
        let c = b.alloc(0).unwrap();
        b.free(a, 3).unwrap();
        assert_eq!(b.free(a, 3), Err(Error::DoubleFree));
        assert_eq!(
            b.free(a + 1, 0),
            Err(Error::DoubleFree),
            "page inside a free block"
        );
        assert_eq!(
            b.free(c & !7, 3),
            Err(Error::DoubleFree),
            "block holding smaller free blocks"
        );
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
        let mut w = words(0, 1024);
        let mut b = Buddy::new(&mut w, 0, 1024).unwrap();
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
        let mut w = words(0, n);
        let mut b = Buddy::new(&mut w, 0, n as u32).unwrap();
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
        assert_eq!(
            b.alloc(MAX_ORDER),
            None,
            "no 4 MiB block although half is free"
        );
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
        let mut w = words(100, n);
        let mut b = Buddy::new(&mut w, 100, n as u32).unwrap();
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
            assert!(
                p as u64 > last_end || last_end == 0,
                "ranges sorted and not adjacent"
            );
            last_end = p as u64 + len;
            from_ranges.extend(p..p + len as u32);
        });
        assert_eq!(from_blocks, from_ranges);
        assert_eq!(from_ranges.len() as u64, b.free_pages());
    }

    #[test]
    fn bad_arrays_rejected() {
        let mut w = vec![0u64; Buddy::metadata_words(0, 10_000) - 1];
        assert!(
            Buddy::new(&mut w, 0, 10_000).is_none(),
            "metadata too short"
        );
        let mut w = vec![0u64; 1];
        assert!(
            Buddy::new(&mut w, u32::MAX - 10, 10).is_none(),
            "PFNs past 32 bits"
        );
        // longer than needed is fine; only the needed prefix is used
        let mut w = vec![7u64; Buddy::metadata_words(0, 10_000) + 5];
        let b = Buddy::new(&mut w, 0, 10_000).unwrap();
        assert_eq!(b.metadata_len(), Buddy::metadata_bytes(0, 10_000));
    }

    // ---- the bitmap structure ----

    #[test]
    fn metadata_is_about_two_bits_per_page() {
        let gib = 1u32 << 18; // pages per GiB
        for g in [1u32, 4, 8, 64, 128, 256, 1024] {
            let bytes = Buddy::metadata_bytes(0, g * gib) as u64;
            assert!(bytes <= 68 * 1024 * g as u64, "{g} GiB: {bytes} bytes");
            assert!(bytes >= 64 * 1024 * g as u64, "{g} GiB: {bytes} bytes");
        }
        // the largest range fits the level limit
        assert!(Buddy::metadata_words(0, u32::MAX - 1) < (u32::MAX as usize / 30));
        assert_eq!(Buddy::metadata_words(5, 0), 0);
        // zero frames: nothing is ever free
        let mut w = words(5, 0);
        let mut b = Buddy::new(&mut w, 5, 0).unwrap();
        assert_eq!(b.alloc(0), None);
        assert_eq!(b.free(5, 0), Err(Error::OutOfRange));
        b.for_each_free_range(|_, _| panic!("nothing is free"));
        b.check().unwrap();
    }

    #[test]
    fn hierarchical_bitmap_find_next() {
        // big enough for 4 levels at order 0
        let n = 64 * 64 * 64 * 3 + 17;
        let (maps, need) = layout(3, n);
        let m = maps[0];
        assert_eq!(m.levels, 4);
        let mut w = vec![0u64; need];
        let mut set = BTreeSet::new();
        let mut rng = Rng(99);
        for _ in 0..2000 {
            let bit = rng.below(m.nbits);
            if rng.below(3) == 0 && !set.is_empty() {
                let x = *set
                    .iter()
                    .nth(rng.below(set.len() as u64) as usize)
                    .unwrap();
                m.clear(&mut w, x);
                set.remove(&x);
            } else if set.insert(bit) {
                m.set(&mut w, bit);
            }
            let from = rng.below(m.nbits + 2);
            assert_eq!(m.next_set(&w, from), set.range(from..).next().copied());
            assert_eq!(m.first_set(&w), set.iter().next().copied());
        }
        for &x in set.clone().iter() {
            m.clear(&mut w, x);
        }
        assert!(
            w.iter().all(|&x| x == 0),
            "summaries cleared with their words"
        );
        m.set(&mut w, m.nbits - 1);
        assert_eq!(m.next_set(&w, 0), Some(m.nbits - 1));
        assert_eq!(m.next_set(&w, m.nbits), None);
    }

    /// The reference model: a set of free page frames, and the allocated blocks.
    struct Model {
        free: BTreeSet<u32>,
        owned: BTreeMap<u32, usize>,
    }

    impl Model {
        /// Free runs of the model.
        fn runs(&self) -> Vec<(u32, u64)> {
            let mut v: Vec<(u32, u64)> = Vec::new();
            for &p in &self.free {
                match v.last_mut() {
                    Some((s, l)) if *s as u64 + *l == p as u64 => *l += 1,
                    _ => v.push((p, 1)),
                }
            }
            v
        }
    }

    fn ranges_of(b: &Buddy) -> Vec<(u32, u64)> {
        let mut v = Vec::new();
        b.for_each_free_range(|p, l| v.push((p, l)));
        v
    }

    /// Random alloc/free of every order over a range with holes and an unaligned base,
    /// cross-checked against the model after every step.
    fn randomized(seed: u64, base: u32, n: u32, holes: &[(u32, u32)], steps: usize) {
        let mut w = words(base, n as usize);
        let mut b = Buddy::new(&mut w, base, n).unwrap();
        let mut m = Model {
            free: BTreeSet::new(),
            owned: BTreeMap::new(),
        };
        // managed: the range minus the holes
        let mut start = base;
        for &(hs, he) in holes.iter().chain([(base + n, base + n)].iter()) {
            b.add_free_range(start, hs).unwrap();
            m.free.extend(start..hs);
            start = he;
        }
        b.check().unwrap();
        let mut rng = Rng(seed);
        for step in 0..steps {
            let r = rng.below(100);
            if r < 55 || m.owned.is_empty() {
                // skewed towards small orders, like real workloads
                let order = match rng.below(10) {
                    0..=4 => 0,
                    5..=6 => rng.below(4) as usize,
                    7..=8 => rng.below(NR_ORDERS as u64) as usize,
                    _ => MAX_ORDER,
                };
                match b.alloc(order) {
                    Some(p) => {
                        assert_eq!(p & ((1 << order) - 1), 0, "alignment");
                        for q in p..p + (1 << order) {
                            assert!(
                                m.free.remove(&q),
                                "step {step}: frame {q} handed out but not free"
                            );
                        }
                        m.owned.insert(p, order);
                    }
                    None => {
                        // the model must agree that no aligned free block of that order exists
                        let size = 1u32 << order;
                        for &p in m.free.iter().filter(|&&p| p & (size - 1) == 0) {
                            assert!(
                                !(p..p + size).all(|q| m.free.contains(&q)),
                                "step {step}: alloc({order}) failed but {p} is free"
                            );
                        }
                    }
                }
            } else {
                let k = rng.below(m.owned.len() as u64) as usize;
                let (&p, &o) = m.owned.iter().nth(k).unwrap();
                if rng.below(20) == 0 {
                    // deliberate misuse: refused, nothing changes
                    if o < MAX_ORDER
                        && p & ((2 << o) - 1) == 0
                        && p + (2 << o) <= base + n
                        && m.free.contains(&(p + (1 << o)))
                    {
                        assert_eq!(
                            b.free(p, o + 1),
                            Err(Error::DoubleFree),
                            "overlaps a free buddy"
                        );
                    }
                    if let Some(&f) = m.free.iter().next() {
                        assert_eq!(b.free(f, 0), Err(Error::DoubleFree));
                    }
                }
                b.free(p, o).unwrap();
                m.owned.remove(&p);
                m.free.extend(p..p + (1 << o));
            }
            assert_eq!(
                b.free_pages(),
                m.free.len() as u64,
                "step {step}: free count"
            );
            if step % 16 == 0 || step + 1 == steps {
                b.check().unwrap_or_else(|e| panic!("step {step}: {e}"));
                assert_eq!(ranges_of(&b), m.runs(), "step {step}: range walk");
                let mut from_blocks = BTreeSet::new();
                let mut per_order = [0u64; NR_ORDERS];
                b.for_each_free_block(|p, o| {
                    per_order[o] += 1;
                    for q in p..p + (1 << o) {
                        assert!(from_blocks.insert(q), "frame {q} in two free blocks");
                    }
                });
                assert_eq!(from_blocks, m.free, "step {step}: block walk");
                for (o, &count) in per_order.iter().enumerate() {
                    assert_eq!(count, b.free_blocks(o));
                }
            }
        }
        // give everything back: full coalescing to the largest blocks the holes allow
        let owned: Vec<_> = m.owned.iter().map(|(&p, &o)| (p, o)).collect();
        for (p, o) in owned {
            b.free(p, o).unwrap();
            m.free.extend(p..p + (1 << o));
        }
        m.owned.clear();
        b.check().unwrap();
        assert_eq!(ranges_of(&b), m.runs());
        let mut w2 = words(base, n as usize);
        let mut fresh = Buddy::new(&mut w2, base, n).unwrap();
        for &(s, l) in &m.runs() {
            fresh.add_free_range(s, s + l as u32).unwrap();
        }
        for o in 0..NR_ORDERS {
            assert_eq!(
                b.free_blocks(o),
                fresh.free_blocks(o),
                "order {o} after freeing everything"
            );
        }
    }

    #[test]
    fn randomized_against_model_aligned() {
        randomized(1, 0, 8192, &[], 6000);
    }

    #[test]
    fn randomized_against_model_unaligned_with_holes() {
        randomized(
            2,
            777,
            3 * 4096 + 300,
            &[(900, 901), (2048, 3100), (5000, 5003), (9000, 9500)],
            6000,
        );
    }

    #[test]
    fn randomized_against_model_many_seeds() {
        for seed in 3..15 {
            randomized(
                seed,
                (seed as u32 * 131) % 2048,
                2048 + (seed as u32 * 977) % 4096,
                &[],
                1500,
            );
        }
    }

    #[test]
    fn lowest_address_first_and_workload_pattern() {
        // 1 GiB: order-0 pages come out in address order (the split keeps the lower half)
        let end = 1024 + (1u32 << 18);
        let mut w = words(0, end as usize);
        let mut b = Buddy::new(&mut w, 0, end).unwrap();
        b.add_free_range(1024, end).unwrap();
        let first: Vec<u32> = (0..1000).map(|_| b.alloc(0).unwrap()).collect();
        assert_eq!(first, (1024..2024).collect::<Vec<_>>());
        // "dirty": allocate most of the rest page by page, then free it all again
        let before = b.free_pages();
        let mut dirty = Vec::new();
        while b.free_pages() > 1000 {
            dirty.push(b.alloc(0).unwrap());
        }
        for p in dirty.into_iter().rev() {
            b.free(p, 0).unwrap();
        }
        assert_eq!(b.free_pages(), before);
        b.check().unwrap();
        // stock hint: every 4 MiB block that can exist is handed out, in address order
        let mut held = Vec::new();
        while let Some(p) = b.alloc(MAX_ORDER) {
            held.push(p);
        }
        assert_eq!(held.len() as u32, (end - 2048) / 1024);
        assert!(
            held.windows(2).all(|x| x[0] + 1024 == x[1]),
            "in address order"
        );
        for p in held {
            b.free(p, MAX_ORDER).unwrap();
        }
        assert_eq!(b.free_pages(), before);
        assert_eq!(ranges_of(&b), vec![(2024, (end - 2024) as u64)]);
        b.check().unwrap();
    }
}

//! Guest physical memory ranges: the [`MemoryRangeTable`] that says which pages a `Memory` request
//! carries, and the [`RamRegions`] every range received from a peer is checked against.
//!
//! On the wire a table is a packed array of 16-byte entries, each `gpa: u64` then `length: u64`,
//! little-endian. A table read from a peer is only accepted if every range is non-empty,
//! page-aligned, free of overflow, sorted, non-overlapping and inside guest RAM.

use std::io::{self, Read, Write};

use thiserror::Error;
use vm_memory::{Address, GuestMemoryBackend, GuestMemoryRegion};
use zerocopy::byteorder::little_endian::U64;
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned};

/// Size of the page every range, bitmap bit and hint is expressed in.
pub const PAGE_SIZE: u64 = 4096;

/// Largest serialized range table accepted from a peer, in bytes (4 Mi ranges).
pub const MAX_RANGE_TABLE_BYTES: u64 = 64 << 20;

/// Size of one serialized range on the wire.
pub const RANGE_WIRE_SIZE: u64 = 16;

/// Errors building, validating or transferring memory range tables.
#[derive(Debug, Error)]
pub enum RangeError {
    /// A range has length zero.
    #[error("range {index} at {gpa:#x} has zero length")]
    ZeroLength {
        /// Position of the range in its table.
        index: usize,
        /// Its guest physical address.
        gpa: u64,
    },
    /// A range's address or length is not a multiple of the page size.
    #[error("range {index} at {gpa:#x} (+{length:#x}) is not page aligned")]
    Misaligned {
        /// Position of the range in its table.
        index: usize,
        /// Its guest physical address.
        gpa: u64,
        /// Its length in bytes.
        length: u64,
    },
    /// `gpa + length` does not fit in 64 bits.
    #[error("range {index} at {gpa:#x} (+{length:#x}) overflows the address space")]
    Overflow {
        /// Position of the range in its table.
        index: usize,
        /// Its guest physical address.
        gpa: u64,
        /// Its length in bytes.
        length: u64,
    },
    /// A range starts before the end of the one before it.
    #[error("range {index} at {gpa:#x} is out of order or overlaps the range before it")]
    Unsorted {
        /// Position of the range in its table.
        index: usize,
        /// Its guest physical address.
        gpa: u64,
    },
    /// A range is not entirely inside guest RAM.
    #[error("range {index} at {gpa:#x} (+{length:#x}) is outside guest RAM")]
    OutsideRam {
        /// Position of the range in its table.
        index: usize,
        /// Its guest physical address.
        gpa: u64,
        /// Its length in bytes.
        length: u64,
    },
    /// A serialized table's size is not a whole number of entries.
    #[error("range table of {bytes} bytes is not a whole number of 16-byte entries")]
    BadTableLength {
        /// Size announced for the table.
        bytes: u64,
    },
    /// A serialized table is larger than [`MAX_RANGE_TABLE_BYTES`].
    #[error("range table of {bytes} bytes exceeds the limit of {max} bytes")]
    TableTooLarge {
        /// Size announced for the table.
        bytes: u64,
        /// The limit.
        max: u64,
    },
    /// The peer closed the stream inside a table.
    #[error("range table truncated: expected {expected} bytes, got {got}")]
    Truncated {
        /// Bytes announced.
        expected: u64,
        /// Bytes received before end of stream.
        got: u64,
    },
    /// Reading a table failed.
    #[error("failed to read a range table")]
    Read(#[source] io::Error),
    /// Writing a table failed.
    #[error("failed to write a range table")]
    Write(#[source] io::Error),
}

/// A contiguous, page-aligned span of guest physical memory.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct MemoryRange {
    /// Guest physical address of the first byte.
    pub gpa: u64,
    /// Length in bytes.
    pub length: u64,
}

impl MemoryRange {
    /// Creates a range; no checks are made (see [`MemoryRange::check`]).
    pub const fn new(gpa: u64, length: u64) -> Self {
        MemoryRange { gpa, length }
    }

    /// One past the last byte, or `None` if that overflows.
    pub fn end(&self) -> Option<u64> {
        self.gpa.checked_add(self.length)
    }

    /// Number of whole pages in the range.
    pub fn pages(&self) -> u64 {
        self.length / PAGE_SIZE
    }

    /// Checks the range on its own: non-empty, page-aligned, no overflow. Returns its end.
    /// `index` only labels the error.
    pub fn check(&self, index: usize) -> Result<u64, RangeError> {
        let (gpa, length) = (self.gpa, self.length);
        if length == 0 {
            return Err(RangeError::ZeroLength { index, gpa });
        }
        if !gpa.is_multiple_of(PAGE_SIZE) || !length.is_multiple_of(PAGE_SIZE) {
            return Err(RangeError::Misaligned { index, gpa, length });
        }
        self.end()
            .ok_or(RangeError::Overflow { index, gpa, length })
    }
}

/// The wire form of one range.
#[repr(C)]
#[derive(Clone, Copy, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
struct WireRange {
    gpa: U64,
    length: U64,
}

/// A sorted list of non-overlapping, page-aligned memory ranges.
///
/// Every way of building one keeps those invariants, so a table in hand is always well formed;
/// tables read from a peer are additionally checked against guest RAM.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MemoryRangeTable {
    ranges: Vec<MemoryRange>,
}

impl MemoryRangeTable {
    /// An empty table.
    pub fn new() -> Self {
        Self::default()
    }

    /// Builds a table from ranges that must already be sorted and non-overlapping.
    pub fn from_ranges(ranges: impl IntoIterator<Item = MemoryRange>) -> Result<Self, RangeError> {
        let mut table = Self::new();
        for range in ranges {
            table.push(range)?;
        }
        Ok(table)
    }

    /// Appends a range after the last one, merging it into the last one when they touch.
    pub fn push(&mut self, range: MemoryRange) -> Result<(), RangeError> {
        let index = self.ranges.len();
        range.check(index)?;
        match self.ranges.last_mut() {
            Some(last) => {
                // `last` passed `check`, so its end does not overflow.
                let last_end = last.gpa + last.length;
                if range.gpa < last_end {
                    return Err(RangeError::Unsorted {
                        index,
                        gpa: range.gpa,
                    });
                }
                if range.gpa == last_end {
                    last.length += range.length;
                } else {
                    self.ranges.push(range);
                }
            }
            None => self.ranges.push(range),
        }
        Ok(())
    }

    /// Appends every range of `other`, which must all lie after this table's last range.
    pub fn append(&mut self, other: &MemoryRangeTable) -> Result<(), RangeError> {
        other.iter().try_for_each(|r| self.push(*r))
    }

    /// The ranges, sorted by address.
    pub fn ranges(&self) -> &[MemoryRange] {
        &self.ranges
    }

    /// Iterates over the ranges in address order.
    pub fn iter(&self) -> std::slice::Iter<'_, MemoryRange> {
        self.ranges.iter()
    }

    /// Number of ranges.
    pub fn len(&self) -> usize {
        self.ranges.len()
    }

    /// Whether the table has no ranges.
    pub fn is_empty(&self) -> bool {
        self.ranges.is_empty()
    }

    /// Sum of all range lengths in bytes.
    pub fn total_bytes(&self) -> u64 {
        self.ranges.iter().map(|r| r.length).sum()
    }

    /// Sum of all range lengths in pages.
    pub fn total_pages(&self) -> u64 {
        self.total_bytes() / PAGE_SIZE
    }

    /// Splits the table into consecutive tables each covering at most `max_bytes` (rounded down
    /// to whole pages, at least one page), so a round can be sent as several bounded requests.
    pub fn split(&self, max_bytes: u64) -> Vec<MemoryRangeTable> {
        let chunk = (max_bytes / PAGE_SIZE).max(1) * PAGE_SIZE;
        let mut out = Vec::new();
        let mut current = MemoryRangeTable::new();
        let mut room = chunk;
        for range in &self.ranges {
            let mut gpa = range.gpa;
            let mut left = range.length;
            while left > 0 {
                let take = left.min(room);
                current.ranges.push(MemoryRange::new(gpa, take));
                gpa += take;
                left -= take;
                room -= take;
                if room == 0 {
                    out.push(std::mem::take(&mut current));
                    room = chunk;
                }
            }
        }
        if !current.is_empty() {
            out.push(current);
        }
        out
    }

    /// Size of the serialized table in bytes.
    pub fn wire_len(&self) -> u64 {
        self.ranges.len() as u64 * RANGE_WIRE_SIZE
    }

    /// Serializes the table.
    pub fn to_wire_bytes(&self) -> Vec<u8> {
        let mut bytes = Vec::with_capacity(self.ranges.len() * RANGE_WIRE_SIZE as usize);
        for range in &self.ranges {
            let wire = WireRange {
                gpa: U64::new(range.gpa),
                length: U64::new(range.length),
            };
            bytes.extend_from_slice(wire.as_bytes());
        }
        bytes
    }

    /// Writes the serialized table ([`MemoryRangeTable::wire_len`] bytes).
    pub fn write_to<W: Write>(&self, writer: &mut W) -> Result<(), RangeError> {
        writer
            .write_all(&self.to_wire_bytes())
            .map_err(RangeError::Write)
    }

    /// Parses and validates a serialized table against guest RAM.
    pub fn from_wire_bytes(bytes: &[u8], ram: &RamRegions) -> Result<Self, RangeError> {
        let len = bytes.len() as u64;
        check_table_len(len)?;
        let mut table = MemoryRangeTable {
            ranges: Vec::with_capacity(bytes.len() / RANGE_WIRE_SIZE as usize),
        };
        let mut prev_end = 0u64;
        for (index, chunk) in bytes.chunks_exact(RANGE_WIRE_SIZE as usize).enumerate() {
            let wire = WireRange::read_from_bytes(chunk)
                .map_err(|_| RangeError::BadTableLength { bytes: len })?;
            let range = MemoryRange::new(wire.gpa.get(), wire.length.get());
            let end = range.check(index)?;
            if index > 0 && range.gpa < prev_end {
                return Err(RangeError::Unsorted {
                    index,
                    gpa: range.gpa,
                });
            }
            if !ram.contains(&range) {
                return Err(RangeError::OutsideRam {
                    index,
                    gpa: range.gpa,
                    length: range.length,
                });
            }
            prev_end = end;
            // Kept as sent (adjacent ranges are not merged) so the data that follows lines up.
            table.ranges.push(range);
        }
        Ok(table)
    }

    /// Reads `len` bytes of serialized table from `reader` and validates them against guest RAM.
    ///
    /// `len` comes from the peer: it is checked against [`MAX_RANGE_TABLE_BYTES`] first, and the
    /// buffer only grows as bytes actually arrive.
    pub fn read_from<R: Read>(
        reader: &mut R,
        len: u64,
        ram: &RamRegions,
    ) -> Result<Self, RangeError> {
        check_table_len(len)?;
        let mut bytes = Vec::new();
        let got = reader
            .take(len)
            .read_to_end(&mut bytes)
            .map_err(RangeError::Read)? as u64;
        if got != len {
            return Err(RangeError::Truncated { expected: len, got });
        }
        Self::from_wire_bytes(&bytes, ram)
    }
}

impl<'a> IntoIterator for &'a MemoryRangeTable {
    type Item = &'a MemoryRange;
    type IntoIter = std::slice::Iter<'a, MemoryRange>;

    fn into_iter(self) -> Self::IntoIter {
        self.ranges.iter()
    }
}

fn check_table_len(bytes: u64) -> Result<(), RangeError> {
    if bytes > MAX_RANGE_TABLE_BYTES {
        return Err(RangeError::TableTooLarge {
            bytes,
            max: MAX_RANGE_TABLE_BYTES,
        });
    }
    if !bytes.is_multiple_of(RANGE_WIRE_SIZE) {
        return Err(RangeError::BadTableLength { bytes });
    }
    Ok(())
}

/// A run of pages inside one RAM region (see [`RamRegions::region_pages`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RegionPages {
    /// Index of the region in [`RamRegions::regions`].
    pub region: usize,
    /// First page, counted from the region's start.
    pub first_page: u64,
    /// Number of pages.
    pub pages: u64,
}

/// The guest RAM regions of a VM: sorted, non-overlapping, page-aligned ranges, in the same
/// order and granularity as the VMM's memory regions (so region `i` matches dirty log `i`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RamRegions {
    regions: Vec<MemoryRange>,
}

impl RamRegions {
    /// Builds the set from regions in any order; they must be page-aligned, non-empty and must
    /// not overlap.
    pub fn new(regions: impl IntoIterator<Item = MemoryRange>) -> Result<Self, RangeError> {
        let mut regions: Vec<MemoryRange> = regions.into_iter().collect();
        regions.sort_unstable();
        let mut prev_end = 0u64;
        for (index, region) in regions.iter().enumerate() {
            let end = region.check(index)?;
            if index > 0 && region.gpa < prev_end {
                return Err(RangeError::Unsorted {
                    index,
                    gpa: region.gpa,
                });
            }
            prev_end = end;
        }
        Ok(RamRegions { regions })
    }

    /// Reads the regions of a vm-memory guest memory object (for example the VMM's
    /// `GuestMemoryMmap<AtomicBitmap>`), in its iteration order sorted by address.
    pub fn from_guest_memory<M: GuestMemoryBackend + ?Sized>(mem: &M) -> Result<Self, RangeError> {
        Self::new(
            mem.iter()
                .map(|r| MemoryRange::new(r.start_addr().raw_value(), r.len())),
        )
    }

    /// The regions in address order.
    pub fn regions(&self) -> &[MemoryRange] {
        &self.regions
    }

    /// Total RAM in bytes.
    pub fn total_bytes(&self) -> u64 {
        self.regions.iter().map(|r| r.length).sum()
    }

    /// Index of the region holding `gpa`, if any.
    pub fn region_index(&self, gpa: u64) -> Option<usize> {
        let idx = self
            .regions
            .partition_point(|r| r.gpa <= gpa)
            .checked_sub(1)?;
        let region = &self.regions[idx];
        (gpa - region.gpa < region.length).then_some(idx)
    }

    /// The parts of `range` inside guest RAM, as pages of each region it touches, in address
    /// order. Parts outside RAM are left out; partial pages count as whole ones.
    pub fn region_pages(&self, range: &MemoryRange) -> Vec<RegionPages> {
        let end = range.end().unwrap_or(u64::MAX);
        let first_region = self
            .regions
            .partition_point(|r| r.gpa + r.length <= range.gpa);
        let mut out = Vec::new();
        for (region, r) in self.regions.iter().enumerate().skip(first_region) {
            if r.gpa >= end {
                break;
            }
            // `new` checked that `r.gpa + r.length` does not overflow.
            let start = range.gpa.max(r.gpa);
            let stop = end.min(r.gpa + r.length);
            if start < stop {
                let first_page = (start - r.gpa) / PAGE_SIZE;
                let pages = (stop - r.gpa).div_ceil(PAGE_SIZE) - first_page;
                out.push(RegionPages {
                    region,
                    first_page,
                    pages,
                });
            }
        }
        out
    }

    /// Whether `range` lies entirely in guest RAM (it may span regions that touch).
    pub fn contains(&self, range: &MemoryRange) -> bool {
        let Some(end) = range.end() else {
            return false;
        };
        if range.length == 0 {
            return false;
        }
        let Some(mut idx) = self.region_index(range.gpa) else {
            return false;
        };
        loop {
            let region = &self.regions[idx];
            let region_end = region.gpa + region.length;
            if end <= region_end {
                return true;
            }
            idx += 1;
            match self.regions.get(idx) {
                Some(next) if next.gpa == region_end => {}
                _ => return false,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::{GuestAddress, GuestMemoryMmap};

    const P: u64 = PAGE_SIZE;

    fn ram() -> RamRegions {
        RamRegions::new([
            MemoryRange::new(0x1_0000_0000, 16 * P),
            MemoryRange::new(0, 256 * P),
            MemoryRange::new(256 * P, 64 * P),
        ])
        .unwrap()
    }

    #[test]
    fn push_merges_and_keeps_order() {
        let mut t = MemoryRangeTable::new();
        t.push(MemoryRange::new(0, P)).unwrap();
        t.push(MemoryRange::new(P, 2 * P)).unwrap();
        t.push(MemoryRange::new(8 * P, P)).unwrap();
        assert_eq!(t.len(), 2);
        assert_eq!(t.total_bytes(), 4 * P);
        assert_eq!(t.total_pages(), 4);
        assert!(matches!(
            t.push(MemoryRange::new(8 * P, P)),
            Err(RangeError::Unsorted { index: 2, .. })
        ));
        assert!(matches!(
            t.push(MemoryRange::new(20 * P, 0)),
            Err(RangeError::ZeroLength { .. })
        ));
        assert!(matches!(
            t.push(MemoryRange::new(20 * P + 1, P)),
            Err(RangeError::Misaligned { .. })
        ));
        assert!(matches!(
            t.push(MemoryRange::new(u64::MAX - P + 1, 2 * P)),
            Err(RangeError::Overflow { .. })
        ));
    }

    #[test]
    fn wire_round_trip() {
        let t = MemoryRangeTable::from_ranges([
            MemoryRange::new(0, P),
            MemoryRange::new(4 * P, 300 * P),
            MemoryRange::new(0x1_0000_0000 + P, 2 * P),
        ])
        .unwrap();
        let bytes = t.to_wire_bytes();
        assert_eq!(bytes.len() as u64, t.wire_len());
        assert_eq!(
            MemoryRangeTable::from_wire_bytes(&bytes, &ram()).unwrap(),
            t
        );
        let mut buf = Vec::new();
        t.write_to(&mut buf).unwrap();
        let back = MemoryRangeTable::read_from(&mut buf.as_slice(), t.wire_len(), &ram()).unwrap();
        assert_eq!(back, t);
        assert!(MemoryRangeTable::from_wire_bytes(&[], &ram())
            .unwrap()
            .is_empty());
    }

    fn wire(ranges: &[(u64, u64)]) -> Vec<u8> {
        let mut v = Vec::new();
        for (g, l) in ranges {
            v.extend_from_slice(&g.to_le_bytes());
            v.extend_from_slice(&l.to_le_bytes());
        }
        v
    }

    #[test]
    fn wire_rejects_bad_tables() {
        let ram = ram();
        let check = |ranges: &[(u64, u64)]| MemoryRangeTable::from_wire_bytes(&wire(ranges), &ram);
        assert!(matches!(
            check(&[(0, 0)]),
            Err(RangeError::ZeroLength { .. })
        ));
        assert!(matches!(
            check(&[(1, P)]),
            Err(RangeError::Misaligned { .. })
        ));
        assert!(matches!(
            check(&[(0, 100)]),
            Err(RangeError::Misaligned { .. })
        ));
        assert!(matches!(
            check(&[(!(P - 1), P)]),
            Err(RangeError::Overflow { .. })
        ));
        assert!(matches!(
            check(&[(4 * P, P), (0, P)]),
            Err(RangeError::Unsorted { index: 1, .. })
        ));
        assert!(matches!(
            check(&[(0, 4 * P), (2 * P, P)]),
            Err(RangeError::Unsorted { index: 1, .. })
        ));
        // Beyond the end of RAM, in a hole, straddling the end of a region.
        assert!(matches!(
            check(&[(320 * P, P)]),
            Err(RangeError::OutsideRam { .. })
        ));
        assert!(matches!(
            check(&[(0x1_0000_0000 + 15 * P, 2 * P)]),
            Err(RangeError::OutsideRam { .. })
        ));
        // Spanning two regions that touch is fine.
        assert!(check(&[(255 * P, 2 * P)]).is_ok());
        // Not a whole number of entries.
        assert!(matches!(
            MemoryRangeTable::from_wire_bytes(&[0u8; 17], &ram),
            Err(RangeError::BadTableLength { bytes: 17 })
        ));
    }

    #[test]
    fn read_rejects_huge_and_truncated() {
        let ram = ram();
        let mut empty: &[u8] = &[];
        assert!(matches!(
            MemoryRangeTable::read_from(&mut empty, !15, &ram),
            Err(RangeError::TableTooLarge { .. })
        ));
        let bytes = wire(&[(0, P)]);
        assert!(matches!(
            MemoryRangeTable::read_from(&mut bytes.as_slice(), 32, &ram),
            Err(RangeError::Truncated {
                expected: 32,
                got: 16
            })
        ));
    }

    #[test]
    fn split_bounds_each_chunk() {
        let t = MemoryRangeTable::from_ranges([
            MemoryRange::new(0, 5 * P),
            MemoryRange::new(10 * P, 2 * P),
        ])
        .unwrap();
        let chunks = t.split(3 * P);
        assert_eq!(chunks.len(), 3);
        assert!(chunks.iter().all(|c| c.total_bytes() <= 3 * P));
        let mut joined = MemoryRangeTable::new();
        for c in &chunks {
            joined.append(c).unwrap();
        }
        assert_eq!(joined, t);
        assert_eq!(t.split(0).len(), 7);
    }

    #[test]
    fn ram_regions() {
        let ram = ram();
        assert_eq!(ram.regions()[0].gpa, 0);
        assert_eq!(ram.total_bytes(), 336 * P);
        assert_eq!(ram.region_index(0), Some(0));
        assert_eq!(ram.region_index(256 * P), Some(1));
        assert_eq!(ram.region_index(320 * P), None);
        assert_eq!(ram.region_index(0x1_0000_0000 + 15 * P), Some(2));
        assert!(!ram.contains(&MemoryRange::new(0, 0)));
        let span = |region, first_page, pages| RegionPages {
            region,
            first_page,
            pages,
        };
        assert_eq!(
            ram.region_pages(&MemoryRange::new(250 * P, 0x1_0000_0000)),
            vec![span(0, 250, 6), span(1, 0, 64), span(2, 0, 16)]
        );
        assert_eq!(
            ram.region_pages(&MemoryRange::new(0x1_0000_0000 + 15 * P + 1, 100)),
            vec![span(2, 15, 1)]
        );
        assert!(ram.region_pages(&MemoryRange::new(400 * P, P)).is_empty());
        assert!(matches!(
            RamRegions::new([MemoryRange::new(0, 2 * P), MemoryRange::new(P, P)]),
            Err(RangeError::Unsorted { .. })
        ));
        let mem = GuestMemoryMmap::<()>::from_ranges(&[
            (GuestAddress(0), 0x10000),
            (GuestAddress(0x20000), 0x4000),
        ])
        .unwrap();
        let from_mem = RamRegions::from_guest_memory(&mem).unwrap();
        assert_eq!(
            from_mem.regions(),
            &[
                MemoryRange::new(0, 0x10000),
                MemoryRange::new(0x20000, 0x4000)
            ]
        );
    }
}

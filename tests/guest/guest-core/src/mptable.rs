//! Intel MultiProcessor Specification 1.4 tables: where the processors are when there is no ACPI.
//!
//! The floating pointer structure (`_MP_`, 16 bytes, 16-byte aligned) is searched in the places
//! the specification names: the first KiB of the EBDA, the last KiB of base memory, and the BIOS
//! ROM area 0xF0000..0xFFFFF. Its byte sum must be zero. It points to the configuration table
//! (`PCMP`, 44-byte header, checksummed over its base length) whose processor entries (type 0,
//! 20 bytes, flag bit 0 = enabled, bit 1 = bootstrap processor) give the CPUs and their local
//! APIC ids. A pointer with a non-zero "default configuration" byte and no table means one of the
//! specification's default two-processor configurations (APIC ids 0 and 1).
//!
//! All memory is read through a caller-supplied `read(addr) -> Option<u8>` (None = not
//! readable), so the parser is tested on the host against a fake memory.

use crate::firmware::{le, sig, sum};

/// Most processors recorded; further enabled entries are counted but their ids are dropped.
pub const MAX_IDS: usize = 64;

/// Processors found in an MP table.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MpCpus {
    /// Guest-physical address of the floating pointer structure.
    pub pointer: u64,
    /// Guest-physical address of the configuration table (0 for a default configuration).
    pub table: u64,
    /// Enabled processors.
    pub count: u32,
    /// Local APIC id of the bootstrap processor, if an entry is flagged as such.
    pub bsp_apic_id: Option<u8>,
    /// Local APIC ids of the first `min(count, MAX_IDS)` enabled processors, in table order.
    pub apic_ids: [u8; MAX_IDS],
}

impl MpCpus {
    /// The recorded APIC ids.
    pub fn ids(&self) -> &[u8] {
        &self.apic_ids[..(self.count as usize).min(MAX_IDS)]
    }
}

/// Why a found floating pointer was not usable.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MpError {
    /// No valid floating pointer structure in any of the standard places.
    NotFound,
    /// The configuration table is missing, unreadable, or has a bad signature, length or checksum.
    BadTable(u64),
}

const FP_SIG: &[u8; 4] = b"_MP_";
const TABLE_SIG: &[u8; 4] = b"PCMP";
const HEADER_LEN: u64 = 44;

/// The standard search ranges `(start, len)`: EBDA first KiB (from the BIOS data area word at
/// 0x40E), the last KiB of base memory (from the word at 0x413, else 639 KiB), 0xF0000..0xFFFFF.
pub fn search_ranges(read: &impl Fn(u64) -> Option<u8>) -> [(u64, u64); 3] {
    let word = |a: u64| Some(read(a)? as u64 | (read(a + 1)? as u64) << 8);
    // An EBDA lives below 640 KiB and above the first 64 KiB; anything else is not a real one.
    let ebda = word(0x40e)
        .map(|seg| seg << 4)
        .filter(|&a| (0x1_0000..0xa_0000).contains(&a))
        .unwrap_or(0);
    let base_kib = word(0x413)
        .filter(|&k| (64..=640).contains(&k))
        .unwrap_or(640);
    [
        (ebda, if ebda != 0 { 1024 } else { 0 }),
        ((base_kib - 1) * 1024, 1024),
        (0xf_0000, 0x1_0000),
    ]
}

/// Finds a floating pointer structure (signature, length >= 1, zero byte sum) in `ranges`.
pub fn find_pointer(read: &impl Fn(u64) -> Option<u8>, ranges: &[(u64, u64)]) -> Option<u64> {
    for &(start, len) in ranges {
        let start = (start + 15) & !15;
        let mut a = start;
        while a + 16 <= start + len {
            if sig(read, a, FP_SIG) {
                let units = read(a + 8).unwrap_or(0) as u64;
                if units >= 1 && sum(read, a, units * 16) == Some(0) {
                    return Some(a);
                }
            }
            a += 16;
        }
    }
    None
}

/// Parses the MP configuration the floating pointer at `fp` describes.
pub fn parse(read: &impl Fn(u64) -> Option<u8>, fp: u64) -> Result<MpCpus, MpError> {
    let mut out = MpCpus {
        pointer: fp,
        table: 0,
        count: 0,
        bsp_apic_id: None,
        apic_ids: [0; MAX_IDS],
    };
    let table = le(read, fp + 4, 4).ok_or(MpError::BadTable(0))?;
    let default_cfg = read(fp + 11).unwrap_or(0);
    if table == 0 {
        if default_cfg == 0 {
            return Err(MpError::BadTable(0));
        }
        // Default configurations: two processors, APIC ids 0 (BSP) and 1.
        out.count = 2;
        out.bsp_apic_id = Some(0);
        out.apic_ids[1] = 1;
        return Ok(out);
    }
    out.table = table;
    let bad = MpError::BadTable(table);
    if !sig(read, table, TABLE_SIG) {
        return Err(bad);
    }
    let len = le(read, table + 4, 2).ok_or(bad)?;
    if len < HEADER_LEN || sum(read, table, len) != Some(0) {
        return Err(bad);
    }
    let entries = le(read, table + 34, 2).ok_or(bad)?;
    let (mut p, end) = (table + HEADER_LEN, table + len);
    for _ in 0..entries {
        let Some(ty) = read(p).filter(|_| p < end) else {
            break;
        };
        let size = match ty {
            0 => 20,
            1..=4 => 8,
            _ => break, // unknown entry type: its length is unknown, stop here
        };
        if p + size > end {
            break;
        }
        if ty == 0 {
            let (id, flags) = (read(p + 1).ok_or(bad)?, read(p + 3).ok_or(bad)?);
            if flags & 1 != 0 {
                if (out.count as usize) < MAX_IDS {
                    out.apic_ids[out.count as usize] = id;
                }
                out.count += 1;
                if flags & 2 != 0 {
                    out.bsp_apic_id = Some(id);
                }
            }
        }
        p += size;
    }
    if out.count == 0 {
        return Err(bad);
    }
    Ok(out)
}

/// Searches the standard places and parses the table found.
pub fn find(read: &impl Fn(u64) -> Option<u8>) -> Result<MpCpus, MpError> {
    let fp = find_pointer(read, &search_ranges(read)).ok_or(MpError::NotFound)?;
    parse(read, fp)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// 1 MiB of fake low memory.
    struct Mem(Vec<u8>);
    impl Mem {
        fn new() -> Mem {
            Mem(vec![0; 0x10_0000])
        }
        fn put(&mut self, a: u64, b: &[u8]) {
            self.0[a as usize..a as usize + b.len()].copy_from_slice(b);
        }
        fn reader(&self) -> impl Fn(u64) -> Option<u8> + '_ {
            |a| self.0.get(a as usize).copied()
        }
    }

    fn fix(b: &mut [u8], at: usize) {
        b[at] = 0;
        let s = b.iter().fold(0u8, |s, x| s.wrapping_add(*x));
        b[at] = s.wrapping_neg();
    }

    fn pointer(table: u32, default_cfg: u8) -> Vec<u8> {
        let mut fp = Vec::new();
        fp.extend_from_slice(b"_MP_");
        fp.extend_from_slice(&table.to_le_bytes());
        fp.extend_from_slice(&[1, 4, 0, default_cfg, 0, 0, 0, 0]);
        fix(&mut fp, 10);
        fp
    }

    /// A configuration table with `cpus` as (apic id, flags), plus a bus and an IOAPIC entry.
    fn table(cpus: &[(u8, u8)]) -> Vec<u8> {
        let mut e = Vec::new();
        for &(id, flags) in cpus {
            e.extend_from_slice(&[0, id, 0x14, flags]);
            e.extend_from_slice(&[0; 16]);
        }
        e.extend_from_slice(&[1, 0, b'I', b'S', b'A', b' ', b' ', b' ']);
        e.extend_from_slice(&[2, 9, 0x11, 1, 0, 0, 0xc0, 0xfe]);
        let mut t = Vec::new();
        t.extend_from_slice(b"PCMP");
        t.extend_from_slice(&((44 + e.len()) as u16).to_le_bytes());
        t.extend_from_slice(&[4, 0]);
        t.extend_from_slice(b"OEM00000PRODUCT00000");
        t.extend_from_slice(&[0; 6]);
        t.extend_from_slice(&((cpus.len() + 2) as u16).to_le_bytes());
        t.extend_from_slice(&0xfee0_0000u32.to_le_bytes());
        t.extend_from_slice(&[0; 4]);
        assert_eq!(t.len(), 44);
        t.extend_from_slice(&e);
        fix(&mut t, 7);
        t
    }

    #[test]
    fn finds_table_in_bios_area() {
        let mut m = Mem::new();
        m.put(0xf0000, &pointer(0xf0010, 0));
        m.put(0xf0010, &table(&[(0, 3), (1, 1)]));
        let c = find(&m.reader()).unwrap();
        assert_eq!(
            (c.pointer, c.table, c.count, c.bsp_apic_id),
            (0xf0000, 0xf0010, 2, Some(0))
        );
        assert_eq!(c.ids(), &[0, 1]);
    }

    #[test]
    fn skips_disabled_and_counts_many() {
        let mut m = Mem::new();
        m.put(0xfe550, &pointer(0xe8000, 0));
        m.put(0xe8000, &table(&[(4, 1), (5, 0), (6, 3), (7, 1)]));
        let c = find(&m.reader()).unwrap();
        assert_eq!((c.count, c.bsp_apic_id), (3, Some(6)));
        assert_eq!(c.ids(), &[4, 6, 7]);
    }

    #[test]
    fn ebda_and_base_memory_end() {
        let mut m = Mem::new();
        // EBDA at segment 0x9000 (0x90000): the pointer in its first KiB.
        m.put(0x40e, &0x9000u16.to_le_bytes());
        m.put(0x90020, &pointer(0x80000, 0));
        m.put(0x80000, &table(&[(0, 3)]));
        assert_eq!(find(&m.reader()).unwrap().pointer, 0x90020);
        // no EBDA: last KiB of 639 KiB base memory (BDA word says 639)
        let mut m = Mem::new();
        m.put(0x413, &639u16.to_le_bytes());
        m.put(0x9f800 + 0x3f0, &pointer(0x80000, 0));
        m.put(0x80000, &table(&[(0, 3), (2, 1)]));
        assert_eq!(find(&m.reader()).unwrap().pointer, 0x9fbf0);
        // no BDA at all: 639..640 KiB
        let mut m = Mem::new();
        m.put(0x9fc00, &pointer(0x80000, 0));
        m.put(0x80000, &table(&[(0, 3), (2, 1)]));
        assert_eq!(find(&m.reader()).unwrap().count, 2);
    }

    #[test]
    fn bad_checksums_and_alignment() {
        let mut m = Mem::new();
        let mut fp = pointer(0xf0010, 0);
        fp[10] ^= 1;
        m.put(0xf0000, &fp);
        m.put(0xf0010, &table(&[(0, 3)]));
        assert_eq!(find(&m.reader()), Err(MpError::NotFound));
        // not on a 16-byte boundary
        let mut m = Mem::new();
        m.put(0xf0008, &pointer(0xf0020, 0));
        assert_eq!(find(&m.reader()), Err(MpError::NotFound));
        // good pointer, corrupted table
        let mut m = Mem::new();
        m.put(0xf0000, &pointer(0xf0010, 0));
        let mut t = table(&[(0, 3), (1, 1)]);
        t[50] ^= 0x40;
        m.put(0xf0010, &t);
        assert_eq!(find(&m.reader()), Err(MpError::BadTable(0xf0010)));
        // pointer to unreadable memory
        let mut m = Mem::new();
        m.put(0xf0000, &pointer(0x4000_0000, 0));
        assert_eq!(find(&m.reader()), Err(MpError::BadTable(0x4000_0000)));
    }

    #[test]
    fn default_configuration() {
        let mut m = Mem::new();
        m.put(0xf0000, &pointer(0, 5));
        let c = find(&m.reader()).unwrap();
        assert_eq!((c.count, c.table), (2, 0));
        assert_eq!(c.ids(), &[0, 1]);
        let mut m = Mem::new();
        m.put(0xf0000, &pointer(0, 0));
        assert_eq!(find(&m.reader()), Err(MpError::BadTable(0)));
    }
}

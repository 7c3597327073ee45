//! The root of the ACPI tables: the RSDP (ACPI 2.0+ form, section 5.2.5) that guests find
//! through the boot protocol or by scanning the BIOS area, and the XSDT (section 5.2.8) that
//! lists the other tables by 64-bit address.

use super::sdt::{byte_sum, table, Writer, OEM_ID};

/// Size of the ACPI 2.0+ RSDP.
pub const RSDP_LEN: usize = 36;
/// RSDP revision 2: the XSDT address and extended checksum are valid.
const RSDP_REVISION: u8 = 2;
/// Bytes the ACPI 1.0 checksum covers.
const RSDP_V1_LEN: usize = 20;

/// Builds the RSDP pointing at the XSDT at guest-physical `xsdt` (no RSDT).
pub fn rsdp(xsdt: u64) -> Vec<u8> {
    let mut w = Writer::default();
    w.bytes(b"RSD PTR ")
        .u8(0) // checksum of the first 20 bytes, below
        .bytes(&OEM_ID)
        .u8(RSDP_REVISION)
        .u32(0) // RSDT address: none, the XSDT serves
        .u32(RSDP_LEN as u32)
        .u64(xsdt)
        .u8(0) // extended checksum of all 36 bytes, below
        .bytes(&[0; 3]);
    let mut r = w.0;
    r[8] = byte_sum(&r[..RSDP_V1_LEN]).wrapping_neg();
    r[32] = byte_sum(&r).wrapping_neg();
    r
}

/// Builds the XSDT listing the tables at `entries`.
pub fn xsdt(entries: &[u64]) -> Vec<u8> {
    let mut w = Writer::default();
    for &e in entries {
        w.u64(e);
    }
    table(b"XSDT", 1, b"FPVMXSDT", &w.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rsdp_checksums_and_pointer() {
        let r = rsdp(0xe_0040);
        assert_eq!(r.len(), RSDP_LEN);
        assert_eq!(&r[..8], b"RSD PTR ");
        assert_eq!(byte_sum(&r[..20]), 0, "ACPI 1.0 checksum");
        assert_eq!(byte_sum(&r), 0, "extended checksum");
        assert_eq!(r[15], 2, "revision");
        assert_eq!(u32::from_le_bytes(r[16..20].try_into().unwrap()), 0);
        assert_eq!(u32::from_le_bytes(r[20..24].try_into().unwrap()), 36);
        assert_eq!(u64::from_le_bytes(r[24..32].try_into().unwrap()), 0xe_0040);
    }

    #[test]
    fn xsdt_lists_entries() {
        let x = xsdt(&[0xe_0100, 0x1_0000_0000]);
        assert_eq!(&x[..4], b"XSDT");
        assert_eq!(x.len(), 36 + 16);
        assert_eq!(byte_sum(&x), 0);
        assert_eq!(u64::from_le_bytes(x[36..44].try_into().unwrap()), 0xe_0100);
        assert_eq!(
            u64::from_le_bytes(x[44..52].try_into().unwrap()),
            0x1_0000_0000
        );
    }
}

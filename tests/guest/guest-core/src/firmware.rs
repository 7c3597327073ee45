//! Reading firmware tables (MP table, ACPI) through a byte reader: `read(gpa)` gives the byte
//! at a guest-physical address, or `None` where there is no readable memory.

/// The `n`-byte little-endian number at `at`.
pub(crate) fn le(read: &impl Fn(u64) -> Option<u8>, at: u64, n: u64) -> Option<u64> {
    let mut v = 0u64;
    for i in 0..n {
        v |= u64::from(read(at + i)?) << (8 * i);
    }
    Some(v)
}

/// Whether the bytes at `at` are the signature `s`.
pub(crate) fn sig(read: &impl Fn(u64) -> Option<u8>, at: u64, s: &[u8]) -> bool {
    s.iter()
        .enumerate()
        .all(|(i, &c)| read(at + i as u64) == Some(c))
}

/// The byte sum (mod 256) of `len` bytes at `at`: 0 for a valid checksummed structure.
pub(crate) fn sum(read: &impl Fn(u64) -> Option<u8>, at: u64, len: u64) -> Option<u8> {
    let mut s = 0u8;
    for i in 0..len {
        s = s.wrapping_add(read(at + i)?);
    }
    Some(s)
}

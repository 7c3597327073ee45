//! A small encoder for the ACPI Machine Language (ACPI 6.5, chapter 20) objects the DSDT
//! needs: names, integers, strings, packages, buffers, scopes and devices, and the resource
//! descriptors of `_CRS` (section 6.4).
//!
//! Every function returns the encoded bytes of one object; composite objects take their
//! already encoded children. Nothing here evaluates AML.

use thiserror::Error;

/// Errors from encoding AML.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum AmlError {
    /// A name path that is not `\`, `^` prefixes and 1-4 character segments of `A-Z`, `0-9`,
    /// `_` (not starting with a digit) separated by dots.
    #[error("invalid AML name {0:?}")]
    InvalidName(String),
    /// An object longer than a package length can express (2^28 - 1 bytes).
    #[error("AML object of {0} bytes is too long")]
    TooLong(usize),
    /// A package with more than 255 elements.
    #[error("AML package with {0} elements (at most 255)")]
    TooManyElements(usize),
    /// A string with a NUL or a non-ASCII character.
    #[error("invalid AML string {0:?}")]
    InvalidString(String),
    /// Not a compressed EISA id of the form `AAA####` (three letters, four hex digits).
    #[error("invalid EISA id {0:?}")]
    InvalidEisaId(String),
    /// An ISA interrupt number above 15.
    #[error("ISA IRQ {0} does not exist")]
    InvalidIrq(u8),
}

const ZERO_OP: u8 = 0x00;
const ONE_OP: u8 = 0x01;
const NAME_OP: u8 = 0x08;
const BYTE_PREFIX: u8 = 0x0a;
const WORD_PREFIX: u8 = 0x0b;
const DWORD_PREFIX: u8 = 0x0c;
const STRING_PREFIX: u8 = 0x0d;
const QWORD_PREFIX: u8 = 0x0e;
const SCOPE_OP: u8 = 0x10;
const BUFFER_OP: u8 = 0x11;
const PACKAGE_OP: u8 = 0x12;
const DUAL_NAME_PREFIX: u8 = 0x2e;
const MULTI_NAME_PREFIX: u8 = 0x2f;
const EXT_OP_PREFIX: u8 = 0x5b;
const DEVICE_OP: u8 = 0x82;
const ROOT_CHAR: u8 = b'\\';
const PARENT_PREFIX_CHAR: u8 = b'^';

/// The largest value a package length encodes (28 bits).
const PKG_LENGTH_MAX: usize = (1 << 28) - 1;

/// Encodes the PkgLength of an object whose contents after the PkgLength are `len` bytes: the
/// encoded value counts its own bytes too. One byte holds up to 63; two to four bytes put the
/// byte count less one in bits 7:6 of the lead byte, the low 4 bits of the length in its
/// bits 3:0, and the rest in the following bytes.
pub fn pkg_length(len: usize) -> Result<Vec<u8>, AmlError> {
    if len + 1 < 1 << 6 {
        return Ok(vec![(len + 1) as u8]);
    }
    for extra in 1..=3usize {
        let total = len + 1 + extra;
        if total < 1 << (4 + 8 * extra) {
            let mut out = vec![((extra as u8) << 6) | (total & 0xf) as u8];
            for i in 0..extra {
                out.push((total >> (4 + 8 * i)) as u8);
            }
            return Ok(out);
        }
    }
    Err(AmlError::TooLong(len.min(PKG_LENGTH_MAX) + 1))
}

/// `contents` with its PkgLength in front.
fn with_pkg_length(contents: &[u8]) -> Result<Vec<u8>, AmlError> {
    let mut out = pkg_length(contents.len())?;
    out.extend_from_slice(contents);
    Ok(out)
}

fn name_seg(seg: &str, path: &str) -> Result<[u8; 4], AmlError> {
    let bad = || AmlError::InvalidName(path.to_string());
    let bytes = seg.as_bytes();
    if bytes.is_empty() || bytes.len() > 4 || bytes[0].is_ascii_digit() {
        return Err(bad());
    }
    let mut out = [b'_'; 4];
    for (o, &c) in out.iter_mut().zip(bytes) {
        if !(c.is_ascii_uppercase() || c.is_ascii_digit() || c == b'_') {
            return Err(bad());
        }
        *o = c;
    }
    Ok(out)
}

/// Encodes a NameString: `\` (root) or `^` (parent) prefixes, then dot-separated segments
/// of up to four characters, padded with `_` (`"\\_SB.PCI0"`, `"_HID"`, `"_S5"`).
pub fn name_string(path: &str) -> Result<Vec<u8>, AmlError> {
    let mut out = Vec::new();
    let mut rest = path;
    if let Some(r) = rest.strip_prefix('\\') {
        out.push(ROOT_CHAR);
        rest = r;
    } else {
        while let Some(r) = rest.strip_prefix('^') {
            out.push(PARENT_PREFIX_CHAR);
            rest = r;
        }
    }
    let segs = if rest.is_empty() {
        Vec::new()
    } else {
        rest.split('.')
            .map(|s| name_seg(s, path))
            .collect::<Result<Vec<_>, _>>()?
    };
    match segs.len() {
        0 => out.push(ZERO_OP), // NullName: only valid after a root or parent prefix
        1 => {}
        2 => out.push(DUAL_NAME_PREFIX),
        n => {
            out.push(MULTI_NAME_PREFIX);
            out.push(u8::try_from(n).map_err(|_| AmlError::InvalidName(path.to_string()))?);
        }
    }
    if segs.is_empty() && out.len() == 1 {
        return Err(AmlError::InvalidName(path.to_string()));
    }
    for s in segs {
        out.extend_from_slice(&s);
    }
    Ok(out)
}

/// Encodes an integer in the shortest form: ZeroOp, OneOp, or a byte, word, dword or qword
/// constant.
pub fn integer(v: u64) -> Vec<u8> {
    match v {
        0 => vec![ZERO_OP],
        1 => vec![ONE_OP],
        2..=0xff => vec![BYTE_PREFIX, v as u8],
        0x100..=0xffff => {
            let mut out = vec![WORD_PREFIX];
            out.extend_from_slice(&(v as u16).to_le_bytes());
            out
        }
        0x1_0000..=0xffff_ffff => {
            let mut out = vec![DWORD_PREFIX];
            out.extend_from_slice(&(v as u32).to_le_bytes());
            out
        }
        _ => {
            let mut out = vec![QWORD_PREFIX];
            out.extend_from_slice(&v.to_le_bytes());
            out
        }
    }
}

/// Encodes a string constant (ASCII, no NUL).
pub fn string(s: &str) -> Result<Vec<u8>, AmlError> {
    if !s.bytes().all(|c| (1..0x80).contains(&c)) {
        return Err(AmlError::InvalidString(s.to_string()));
    }
    let mut out = vec![STRING_PREFIX];
    out.extend_from_slice(s.as_bytes());
    out.push(0);
    Ok(out)
}

/// Encodes a PNP id such as `"PNP0A08"` as the 32-bit compressed EISA id integer.
pub fn eisa_id(id: &str) -> Result<Vec<u8>, AmlError> {
    let bad = || AmlError::InvalidEisaId(id.to_string());
    let b = id.as_bytes();
    if b.len() != 7 || !b[..3].iter().all(u8::is_ascii_uppercase) {
        return Err(bad());
    }
    let letters = b[..3]
        .iter()
        .fold(0u16, |acc, &c| (acc << 5) | u16::from(c - b'@'));
    let digits = u16::from_str_radix(&id[3..], 16).map_err(|_| bad())?;
    if !id[3..].bytes().all(|c| c.is_ascii_hexdigit()) {
        return Err(bad());
    }
    // The id is stored big-endian: letters first, then the product number.
    let [l0, l1] = letters.to_be_bytes();
    let [d0, d1] = digits.to_be_bytes();
    Ok(integer(u64::from(u32::from_le_bytes([l0, l1, d0, d1]))))
}

/// `Name (path, value)`.
pub fn name(path: &str, value: &[u8]) -> Result<Vec<u8>, AmlError> {
    let mut out = vec![NAME_OP];
    out.extend_from_slice(&name_string(path)?);
    out.extend_from_slice(value);
    Ok(out)
}

/// `Package (n) { elements }`.
pub fn package(elements: &[Vec<u8>]) -> Result<Vec<u8>, AmlError> {
    let count =
        u8::try_from(elements.len()).map_err(|_| AmlError::TooManyElements(elements.len()))?;
    let mut contents = vec![count];
    for e in elements {
        contents.extend_from_slice(e);
    }
    let mut out = vec![PACKAGE_OP];
    out.extend_from_slice(&with_pkg_length(&contents)?);
    Ok(out)
}

/// `Buffer (n) { bytes }`.
pub fn buffer(bytes: &[u8]) -> Result<Vec<u8>, AmlError> {
    let mut contents = integer(bytes.len() as u64);
    contents.extend_from_slice(bytes);
    let mut out = vec![BUFFER_OP];
    out.extend_from_slice(&with_pkg_length(&contents)?);
    Ok(out)
}

fn named_block(op: &[u8], path: &str, body: &[Vec<u8>]) -> Result<Vec<u8>, AmlError> {
    let mut contents = name_string(path)?;
    for term in body {
        contents.extend_from_slice(term);
    }
    let mut out = op.to_vec();
    out.extend_from_slice(&with_pkg_length(&contents)?);
    Ok(out)
}

/// `Scope (path) { body }`.
pub fn scope(path: &str, body: &[Vec<u8>]) -> Result<Vec<u8>, AmlError> {
    named_block(&[SCOPE_OP], path, body)
}

/// `Device (path) { body }`.
pub fn device(path: &str, body: &[Vec<u8>]) -> Result<Vec<u8>, AmlError> {
    named_block(&[EXT_OP_PREFIX, DEVICE_OP], path, body)
}

/// Resource descriptors (ACPI 6.5 section 6.4) for a `ResourceTemplate`.
pub mod resource {
    use super::{buffer, AmlError};

    const SMALL_IRQ_NO_FLAGS: u8 = 0x22; // type 0x04, length 2
    const SMALL_IO_PORT: u8 = 0x47; // type 0x08, length 7
    const SMALL_END_TAG: u8 = 0x79; // type 0x0f, length 1
    const LARGE_DWORD_ADDRESS_SPACE: u8 = 0x87;
    const LARGE_WORD_ADDRESS_SPACE: u8 = 0x88;
    const SPACE_MEMORY: u8 = 0;
    const SPACE_IO: u8 = 1;
    const SPACE_BUS_NUMBER: u8 = 2;
    /// General flags: minimum and maximum fixed, positive decode, resource producer.
    const FIXED_WINDOW: u8 = 0b1100;
    /// I/O type-specific flags: the window covers ISA and non-ISA ranges.
    const IO_ENTIRE_RANGE: u8 = 0b11;
    /// Memory type-specific flags: read/write, non-cacheable, address range memory.
    const MEMORY_READ_WRITE_NON_CACHEABLE: u8 = 0b1;

    /// `IO (Decode16, base, base, 1, len)`: a fixed 16-bit decoded port range.
    pub fn io_port(base: u16, len: u8) -> Vec<u8> {
        let mut out = vec![SMALL_IO_PORT, 1];
        out.extend_from_slice(&base.to_le_bytes());
        out.extend_from_slice(&base.to_le_bytes());
        out.push(1);
        out.push(len);
        out
    }

    /// `IRQNoFlags () { irq }`: an edge-triggered, active-high ISA interrupt.
    pub fn irq_no_flags(irq: u8) -> Result<Vec<u8>, AmlError> {
        let mask = 1u16
            .checked_shl(u32::from(irq))
            .ok_or(AmlError::InvalidIrq(irq))?;
        let mut out = vec![SMALL_IRQ_NO_FLAGS];
        out.extend_from_slice(&mask.to_le_bytes());
        Ok(out)
    }

    fn word_space(space: u8, type_flags: u8, min: u16, max: u16) -> Vec<u8> {
        let mut out = vec![LARGE_WORD_ADDRESS_SPACE];
        out.extend_from_slice(&13u16.to_le_bytes());
        out.extend_from_slice(&[space, FIXED_WINDOW, type_flags]);
        let len = max.wrapping_sub(min).wrapping_add(1);
        for v in [0, min, max, 0, len] {
            out.extend_from_slice(&v.to_le_bytes());
        }
        out
    }

    /// `WordBusNumber (ResourceProducer, MinFixed, MaxFixed, PosDecode, 0, min, max, 0, n)`.
    pub fn word_bus_number(min: u8, max: u8) -> Vec<u8> {
        word_space(SPACE_BUS_NUMBER, 0, u16::from(min), u16::from(max))
    }

    /// `WordIO (ResourceProducer, MinFixed, MaxFixed, PosDecode, EntireRange, 0, min, max,
    /// 0, n)`: an I/O window of a bridge.
    pub fn word_io(min: u16, max: u16) -> Vec<u8> {
        word_space(SPACE_IO, IO_ENTIRE_RANGE, min, max)
    }

    /// `DWordMemory (ResourceProducer, PosDecode, MinFixed, MaxFixed, NonCacheable, ReadWrite,
    /// 0, min, max, 0, n)`: a 32-bit memory window of a bridge.
    pub fn dword_memory(min: u32, max: u32) -> Vec<u8> {
        let mut out = vec![LARGE_DWORD_ADDRESS_SPACE];
        out.extend_from_slice(&23u16.to_le_bytes());
        out.extend_from_slice(&[SPACE_MEMORY, FIXED_WINDOW, MEMORY_READ_WRITE_NON_CACHEABLE]);
        let len = max.wrapping_sub(min).wrapping_add(1);
        for v in [0, min, max, 0, len] {
            out.extend_from_slice(&v.to_le_bytes());
        }
        out
    }

    /// `ResourceTemplate () { descriptors }`: a buffer of the descriptors and an end tag
    /// (checksum 0: "treat as correct").
    pub fn template(descriptors: &[Vec<u8>]) -> Result<Vec<u8>, AmlError> {
        let mut bytes: Vec<u8> = descriptors.concat();
        bytes.extend_from_slice(&[SMALL_END_TAG, 0]);
        buffer(&bytes)
    }
}

#[cfg(test)]
mod tests {
    use super::resource::*;
    use super::*;

    #[test]
    fn pkg_length_one_to_four_bytes() {
        // The encoded length counts the PkgLength bytes themselves.
        assert_eq!(pkg_length(0).unwrap(), vec![0x01]);
        assert_eq!(pkg_length(62).unwrap(), vec![0x3f]);
        // 63 + 2 = 65 = 0x41: two bytes, low nibble 1, then 0x41 >> 4.
        assert_eq!(pkg_length(63).unwrap(), vec![0x41, 0x04]);
        assert_eq!(pkg_length(0xffd).unwrap(), vec![0x4f, 0xff]);
        // 0xffe + 3 = 0x1001: three bytes.
        assert_eq!(pkg_length(0xffe).unwrap(), vec![0x81, 0x00, 0x01]);
        assert_eq!(pkg_length(0xf_fffc).unwrap(), vec![0x8f, 0xff, 0xff]);
        // 0xffffd + 4 = 0x100001: four bytes.
        assert_eq!(pkg_length(0xf_fffd).unwrap(), vec![0xc1, 0x00, 0x00, 0x01]);
        assert_eq!(
            pkg_length((1 << 28) - 5).unwrap(),
            vec![0xcf, 0xff, 0xff, 0xff]
        );
        assert!(pkg_length((1 << 28) - 4).is_err());
    }

    #[test]
    fn pkg_length_decodes_back() {
        for len in [
            0usize, 1, 61, 62, 63, 64, 300, 4093, 4094, 4095, 70_000, 1_048_573, 1_048_574,
        ] {
            let enc = pkg_length(len).unwrap();
            let follow = usize::from(enc[0] >> 6);
            assert_eq!(enc.len(), follow + 1);
            let value = if follow == 0 {
                usize::from(enc[0] & 0x3f)
            } else {
                enc[1..]
                    .iter()
                    .enumerate()
                    .fold(usize::from(enc[0] & 0xf), |v, (i, &b)| {
                        v | usize::from(b) << (4 + 8 * i)
                    })
            };
            assert_eq!(value, len + enc.len(), "length {len}");
        }
    }

    #[test]
    fn integers_of_each_width() {
        assert_eq!(integer(0), vec![0x00]);
        assert_eq!(integer(1), vec![0x01]);
        assert_eq!(integer(5), vec![0x0a, 0x05]);
        assert_eq!(integer(0xff), vec![0x0a, 0xff]);
        assert_eq!(integer(0x100), vec![0x0b, 0x00, 0x01]);
        assert_eq!(integer(0xcf8), vec![0x0b, 0xf8, 0x0c]);
        assert_eq!(integer(0x1_0000), vec![0x0c, 0x00, 0x00, 0x01, 0x00]);
        assert_eq!(integer(0x1_ffff), vec![0x0c, 0xff, 0xff, 0x01, 0x00]);
        assert_eq!(integer(0x1_0000_0000), vec![0x0e, 0, 0, 0, 0, 1, 0, 0, 0]);
    }

    #[test]
    fn names() {
        assert_eq!(name_string("_HID").unwrap(), b"_HID".to_vec());
        assert_eq!(name_string("_S5").unwrap(), b"_S5_".to_vec());
        assert_eq!(name_string("\\_SB").unwrap(), b"\\_SB_".to_vec());
        assert_eq!(
            name_string("\\_SB.PCI0").unwrap(),
            b"\\\x2e_SB_PCI0".to_vec()
        );
        assert_eq!(name_string("^^COM1").unwrap(), b"^^COM1".to_vec());
        assert_eq!(
            name_string("\\_SB.PCI0.S01").unwrap(),
            b"\\\x2f\x03_SB_PCI0S01_".to_vec()
        );
        assert_eq!(name_string("\\").unwrap(), vec![b'\\', 0x00]);
        for bad in ["", "TOOLONG", "1ABC", "ab", "A..B", "\\_SB.", "A-B"] {
            assert!(name_string(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn name_with_package() {
        // Name (_S5, Package (2) { 5, 5 }): as iasl encodes it.
        let p = package(&[integer(5), integer(5)]).unwrap();
        assert_eq!(
            name("_S5", &p).unwrap(),
            vec![0x08, b'_', b'S', b'5', b'_', 0x12, 0x06, 0x02, 0x0a, 0x05, 0x0a, 0x05]
        );
    }

    #[test]
    fn eisa_ids() {
        // "PNP0A03" compresses to 0x41d0 followed by 0x0a03, read as a little-endian dword.
        assert_eq!(
            eisa_id("PNP0A03").unwrap(),
            vec![0x0c, 0x41, 0xd0, 0x0a, 0x03]
        );
        assert_eq!(
            eisa_id("PNP0A08").unwrap(),
            vec![0x0c, 0x41, 0xd0, 0x0a, 0x08]
        );
        assert_eq!(
            eisa_id("PNP0501").unwrap(),
            vec![0x0c, 0x41, 0xd0, 0x05, 0x01]
        );
        for bad in ["PNP0A0", "pnp0A03", "PNP0G03", "PN10A03", "PNP0A030"] {
            assert!(eisa_id(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn strings() {
        assert_eq!(string("ab").unwrap(), vec![0x0d, b'a', b'b', 0]);
        assert!(string("a\0b").is_err());
        assert!(string("é").is_err());
    }

    #[test]
    fn device_and_scope_wrap_their_bodies() {
        let hid = name("_HID", &eisa_id("PNP0501").unwrap()).unwrap();
        let dev = device("COM1", std::slice::from_ref(&hid)).unwrap();
        assert_eq!(&dev[..2], &[0x5b, 0x82]);
        assert_eq!(
            usize::from(dev[2]),
            dev.len() - 2,
            "PkgLength covers itself and the rest"
        );
        assert_eq!(&dev[3..7], b"COM1");
        assert_eq!(&dev[7..], &hid[..]);
        let sc = scope("\\_SB", std::slice::from_ref(&dev)).unwrap();
        assert_eq!(sc[0], 0x10);
        assert_eq!(usize::from(sc[1]), sc.len() - 1);
        assert_eq!(&sc[2..7], b"\\_SB_");
        assert_eq!(&sc[7..], &dev[..]);
    }

    #[test]
    fn package_limits() {
        let many = vec![integer(0); 256];
        assert_eq!(package(&many), Err(AmlError::TooManyElements(256)));
        let big = package(&vec![integer(0x1234_5678); 100]).unwrap();
        // 1 count byte + 100 * 5 bytes = 501, plus a 2-byte PkgLength.
        assert_eq!(big.len(), 1 + 2 + 501);
        assert_eq!(big[1] >> 6, 1);
    }

    #[test]
    fn resource_descriptors() {
        assert_eq!(
            io_port(0x3f8, 8),
            vec![0x47, 0x01, 0xf8, 0x03, 0xf8, 0x03, 0x01, 0x08]
        );
        assert_eq!(irq_no_flags(4).unwrap(), vec![0x22, 0x10, 0x00]);
        assert!(irq_no_flags(16).is_err());
        let bus = word_bus_number(0, 0);
        assert_eq!(bus.len(), 16);
        assert_eq!(&bus[..6], &[0x88, 13, 0, 2, 0x0c, 0]);
        assert_eq!(&bus[14..], &[1, 0], "one bus");
        let io = word_io(0x1000, 0xffff);
        assert_eq!(&io[3..6], &[1, 0x0c, 0x03]);
        assert_eq!(&io[8..12], &[0x00, 0x10, 0xff, 0xff]);
        assert_eq!(&io[14..], &[0x00, 0xf0]);
        let mem = dword_memory(0xc000_0000, 0xdfff_ffff);
        assert_eq!(mem.len(), 26);
        assert_eq!(&mem[..6], &[0x87, 23, 0, 0, 0x0c, 0x01]);
        assert_eq!(&mem[22..], &0x2000_0000u32.to_le_bytes());
        let t = template(&[io_port(0x3f8, 8), irq_no_flags(4).unwrap()]).unwrap();
        // Buffer op, PkgLength, BufferSize (byte 13), 11 descriptor bytes and the end tag.
        assert_eq!(&t[..4], &[0x11, 0x10, 0x0a, 13]);
        assert_eq!(&t[t.len() - 2..], &[0x79, 0]);
    }
}

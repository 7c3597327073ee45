//! The header every ACPI system description table starts with (ACPI 6.5 section 5.2.6), and
//! a little-endian writer for table bodies.

/// The OEM id in every table and the RSDP.
pub const OEM_ID: [u8; 6] = *b"FPHINT";
/// The creator id (the VMM).
pub const CREATOR_ID: [u8; 4] = *b"FPVM";
/// Length of the common table header.
pub const HEADER_LEN: usize = 36;
/// Offset of the checksum byte in the header.
const CHECKSUM_OFFSET: usize = 9;
/// Offset of the length field in the header.
const LENGTH_OFFSET: usize = 4;

/// Appends little-endian fields to a table.
#[derive(Default)]
pub struct Writer(pub Vec<u8>);

impl Writer {
    /// One byte.
    pub fn u8(&mut self, v: u8) -> &mut Self {
        self.0.push(v);
        self
    }
    /// A 16-bit field.
    pub fn u16(&mut self, v: u16) -> &mut Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
    /// A 32-bit field.
    pub fn u32(&mut self, v: u32) -> &mut Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
    /// A 64-bit field.
    pub fn u64(&mut self, v: u64) -> &mut Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
    /// Raw bytes.
    pub fn bytes(&mut self, v: &[u8]) -> &mut Self {
        self.0.extend_from_slice(v);
        self
    }
}

/// The wrapping byte sum of `bytes`.
pub fn byte_sum(bytes: &[u8]) -> u8 {
    bytes.iter().fold(0u8, |s, b| s.wrapping_add(*b))
}

/// Sets the byte at `at` so that `bytes` sums to zero.
pub fn fix_checksum(bytes: &mut [u8], at: usize) {
    bytes[at] = 0;
    bytes[at] = byte_sum(bytes).wrapping_neg();
}

/// A table: the header for `signature`/`revision`/`oem_table_id` followed by `body`, with
/// its length and checksum filled in.
pub fn table(signature: &[u8; 4], revision: u8, oem_table_id: &[u8; 8], body: &[u8]) -> Vec<u8> {
    let mut w = Writer(Vec::with_capacity(HEADER_LEN + body.len()));
    w.bytes(signature)
        .u32(0) // length, below
        .u8(revision)
        .u8(0) // checksum, below
        .bytes(&OEM_ID)
        .bytes(oem_table_id)
        .u32(1) // OEM revision
        .bytes(&CREATOR_ID)
        .u32(1); // creator revision
    let mut t = w.0;
    t.extend_from_slice(body);
    let len = t.len() as u32;
    t[LENGTH_OFFSET..LENGTH_OFFSET + 4].copy_from_slice(&len.to_le_bytes());
    fix_checksum(&mut t, CHECKSUM_OFFSET);
    t
}

/// A Generic Address Structure (ACPI 6.5 section 5.2.3.2) for a byte-wide I/O port.
pub fn io_port_gas(port: u16) -> [u8; 12] {
    const SYSTEM_IO: u8 = 1;
    const BYTE_ACCESS: u8 = 1;
    let mut g = [0u8; 12];
    g[0] = SYSTEM_IO;
    g[1] = 8; // register bit width
    g[2] = 0; // bit offset
    g[3] = BYTE_ACCESS;
    g[4..6].copy_from_slice(&port.to_le_bytes());
    g
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_fields_length_and_checksum() {
        let t = table(b"TEST", 3, b"TESTTABL", &[1, 2, 3]);
        assert_eq!(t.len(), HEADER_LEN + 3);
        assert_eq!(&t[0..4], b"TEST");
        assert_eq!(u32::from_le_bytes(t[4..8].try_into().unwrap()), 39);
        assert_eq!(t[8], 3);
        assert_eq!(&t[10..16], &OEM_ID);
        assert_eq!(&t[16..24], b"TESTTABL");
        assert_eq!(&t[28..32], &CREATOR_ID);
        assert_eq!(byte_sum(&t), 0);
        assert_eq!(&t[HEADER_LEN..], &[1, 2, 3]);
    }

    #[test]
    fn io_gas_layout() {
        assert_eq!(
            io_port_gas(0x600),
            [1, 8, 0, 1, 0x00, 0x06, 0, 0, 0, 0, 0, 0]
        );
    }
}

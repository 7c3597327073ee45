//! Moving guest pages between guest memory and the migration stream without intermediate
//! copies, and the Memory request that frames them.
//!
//! The sender writes each range straight from guest memory to the socket
//! (`write_all_volatile`, i.e. `write(2)` from the host mapping); the receiver reads each
//! range straight into guest memory (`read_exact_volatile`, `read(2)` into the mapping; note
//! that vm-memory's `Bytes::read_exact_volatile_from` does a single read per region and fails
//! on a short socket read, so it is not used). The receiver checks every
//! range against its own RAM before writing, and touches no page that was not sent, so its
//! resident memory is what was sent.
//!
//! Works with any vm-memory `GuestMemoryBackend`, in particular the VMM's
//! `GuestMemoryMmap<AtomicBitmap>`.

use std::io::{Read, Write};

use thiserror::Error;
use vm_memory::{
    GuestAddress, GuestMemoryBackend, ReadVolatile, VolatileMemoryError, WriteVolatile,
};

use crate::protocol::{Command, ErrorReason, ProtocolError, RequestHeader};
use crate::ranges::{MemoryRangeTable, RamRegions, RangeError};

/// Errors sending or receiving guest memory.
#[derive(Debug, Error)]
pub enum MemoryStreamError {
    /// A range is larger than this host can address.
    #[error("range at {gpa:#x} (+{length:#x}) is too large for this host")]
    TooLarge {
        /// Start of the range.
        gpa: u64,
        /// Its length.
        length: u64,
    },
    /// A range is not entirely backed by this side's guest memory.
    #[error("range at {gpa:#x} (+{length:#x}) is not in guest memory")]
    NotInMemory {
        /// Start of the range.
        gpa: u64,
        /// Its length.
        length: u64,
    },
    /// Guest memory could not be sliced for a range.
    #[error("cannot access guest memory at {gpa:#x} (+{length:#x})")]
    GuestMemory {
        /// Start of the range.
        gpa: u64,
        /// Its length.
        length: u64,
        /// The failure.
        #[source]
        source: vm_memory::GuestMemoryError,
    },
    /// Copying guest memory to the stream failed.
    #[error("failed to send guest memory at {gpa:#x} (+{length:#x})")]
    Send {
        /// Start of the range.
        gpa: u64,
        /// Its length.
        length: u64,
        /// The failure.
        #[source]
        source: VolatileMemoryError,
    },
    /// Copying the stream into guest memory failed.
    #[error("failed to receive guest memory at {gpa:#x} (+{length:#x})")]
    Receive {
        /// Start of the range.
        gpa: u64,
        /// Its length.
        length: u64,
        /// The failure.
        #[source]
        source: VolatileMemoryError,
    },
    /// The range table was invalid or could not be transferred.
    #[error("bad memory range table")]
    Table(#[source] RangeError),
    /// The request framing failed.
    #[error("memory request failed")]
    Protocol(#[source] ProtocolError),
}

impl MemoryStreamError {
    /// The reason code to answer the peer with when this error ends a Memory request.
    pub fn reason(&self) -> ErrorReason {
        match self {
            MemoryStreamError::TooLarge { .. }
            | MemoryStreamError::NotInMemory { .. }
            | MemoryStreamError::Table(_) => ErrorReason::InvalidMemory,
            MemoryStreamError::GuestMemory { .. }
            | MemoryStreamError::Send { .. }
            | MemoryStreamError::Receive { .. } => ErrorReason::Memory,
            MemoryStreamError::Protocol(e) => e.reason(),
        }
    }
}

fn checked_len<M: GuestMemoryBackend + ?Sized>(
    mem: &M,
    gpa: u64,
    length: u64,
) -> Result<usize, MemoryStreamError> {
    let len = usize::try_from(length).map_err(|_| MemoryStreamError::TooLarge { gpa, length })?;
    if !GuestMemoryBackend::check_range(mem, GuestAddress(gpa), len) {
        return Err(MemoryStreamError::NotInMemory { gpa, length });
    }
    Ok(len)
}

/// Writes the pages of `table`, in order, from guest memory to `out`. Returns bytes written.
pub fn send_ranges<M, W>(
    mem: &M,
    table: &MemoryRangeTable,
    out: &mut W,
) -> Result<u64, MemoryStreamError>
where
    M: GuestMemoryBackend + ?Sized,
    W: WriteVolatile,
{
    let mut total = 0u64;
    for range in table {
        let (gpa, length) = (range.gpa, range.length);
        let len = checked_len(mem, gpa, length)?;
        for slice in GuestMemoryBackend::get_slices(mem, GuestAddress(gpa), len) {
            let slice = slice.map_err(|source| MemoryStreamError::GuestMemory {
                gpa,
                length,
                source,
            })?;
            out.write_all_volatile(&slice)
                .map_err(|source| MemoryStreamError::Send {
                    gpa,
                    length,
                    source: crate::io_errors::explain_volatile(source),
                })?;
        }
        total += length;
    }
    Ok(total)
}

/// Reads the pages of `table`, in order, from `input` into guest memory. Every range is checked
/// against guest memory before anything is written to it. Returns bytes received.
pub fn receive_ranges<M, R>(
    mem: &M,
    table: &MemoryRangeTable,
    input: &mut R,
) -> Result<u64, MemoryStreamError>
where
    M: GuestMemoryBackend + ?Sized,
    R: ReadVolatile,
{
    let mut total = 0u64;
    for range in table {
        let (gpa, length) = (range.gpa, range.length);
        let len = checked_len(mem, gpa, length)?;
        // One `read_exact` per region slice: a socket read may return less than asked.
        for slice in GuestMemoryBackend::get_slices(mem, GuestAddress(gpa), len) {
            let mut slice = slice.map_err(|source| MemoryStreamError::GuestMemory {
                gpa,
                length,
                source,
            })?;
            input
                .read_exact_volatile(&mut slice)
                .map_err(|source| MemoryStreamError::Receive {
                    gpa,
                    length,
                    source: crate::io_errors::explain_volatile(source),
                })?;
        }
        total += length;
    }
    Ok(total)
}

/// Sends one Memory request: header, range table, then the pages. Does not wait for the
/// response. Returns the guest memory bytes sent (the table's total).
pub fn send_memory<M, W>(
    mem: &M,
    table: &MemoryRangeTable,
    out: &mut W,
) -> Result<u64, MemoryStreamError>
where
    M: GuestMemoryBackend + ?Sized,
    W: Write + WriteVolatile,
{
    let header = RequestHeader::new(Command::Memory, table.wire_len())
        .map_err(MemoryStreamError::Protocol)?;
    header.write_to(out).map_err(MemoryStreamError::Protocol)?;
    table.write_to(out).map_err(MemoryStreamError::Table)?;
    let sent = send_ranges(mem, table, out)?;
    out.flush()
        .map_err(|e| MemoryStreamError::Protocol(ProtocolError::write(e)))?;
    Ok(sent)
}

/// Receives the body of a Memory request whose header was just read: reads the range table,
/// validates it against `ram` (the destination's RAM), then reads the pages into guest memory.
/// Returns the table received.
pub fn receive_memory<M, R>(
    mem: &M,
    ram: &RamRegions,
    header: &RequestHeader,
    input: &mut R,
) -> Result<MemoryRangeTable, MemoryStreamError>
where
    M: GuestMemoryBackend + ?Sized,
    R: Read + ReadVolatile,
{
    header
        .check_command(Command::Memory)
        .map_err(MemoryStreamError::Protocol)?;
    let table = MemoryRangeTable::read_from(input, header.length(), ram)
        .map_err(MemoryStreamError::Table)?;
    receive_ranges(mem, &table, input)?;
    Ok(table)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bitmap::tests::Rng;
    use crate::ranges::{MemoryRange, PAGE_SIZE};
    use crate::zero::split_zero_pages;
    use std::os::unix::net::UnixStream;
    use std::thread;
    use vm_memory::bitmap::{AtomicBitmap, Bitmap};
    use vm_memory::Bytes;
    use vm_memory::GuestMemoryMmap;

    const P: u64 = PAGE_SIZE;

    type Mem = GuestMemoryMmap<AtomicBitmap>;

    fn layout() -> Vec<(GuestAddress, usize)> {
        vec![
            (GuestAddress(0), 64 * P as usize),
            (GuestAddress(64 * P), 32 * P as usize),
            (GuestAddress(0x10_0000), 16 * P as usize),
        ]
    }

    fn mem() -> Mem {
        GuestMemoryMmap::from_ranges(&layout()).unwrap()
    }

    fn ram(m: &Mem) -> RamRegions {
        RamRegions::from_guest_memory(m).unwrap()
    }

    fn fill_random(m: &Mem, rng: &mut Rng) {
        for (base, len) in layout() {
            for off in (0..len as u64).step_by(8) {
                m.write_obj(rng.next(), GuestAddress(base.0 + off)).unwrap();
            }
        }
    }

    fn read_page(m: &Mem, gpa: u64) -> Vec<u8> {
        let mut buf = vec![0u8; P as usize];
        m.read_slice(&mut buf, GuestAddress(gpa)).unwrap();
        buf
    }

    #[test]
    fn memory_request_over_a_socket() {
        let src = mem();
        fill_random(&src, &mut Rng::new(7));
        let dst = mem();
        // Spans the two touching regions, plus one range in the third.
        let table = MemoryRangeTable::from_ranges([
            MemoryRange::new(60 * P, 8 * P),
            MemoryRange::new(0x10_0000 + 3 * P, 2 * P),
        ])
        .unwrap();
        let (mut a, b) = UnixStream::pair().unwrap();
        let dst_ram = ram(&dst);
        let receiver = thread::spawn(move || {
            let mut b = b;
            let header = RequestHeader::read_from(&mut b).unwrap();
            let got = receive_memory(&dst, &dst_ram, &header, &mut b).unwrap();
            (dst, got)
        });
        let sent = send_memory(&src, &table, &mut a).unwrap();
        assert_eq!(sent, 10 * P);
        let (dst, got) = receiver.join().unwrap();
        assert_eq!(got, table);
        for r in &table {
            for p in (r.gpa..r.gpa + r.length).step_by(P as usize) {
                assert_eq!(read_page(&src, p), read_page(&dst, p), "page {p:#x}");
            }
        }
        // Pages that were not sent stay untouched (zero, and never marked written).
        assert!(read_page(&dst, 0).iter().all(|&b| b == 0));
        let region = dst.find_region(GuestAddress(0)).unwrap();
        let bitmap = vm_memory::GuestMemoryRegion::bitmap(region);
        assert!(!bitmap.dirty_at(0));
        assert!(bitmap.dirty_at(60 * P as usize));
    }

    #[test]
    fn receiver_rejects_ranges_outside_its_ram() {
        let dst = mem();
        let dst_ram = ram(&dst);
        // A hostile table: a page just past the first region's hole.
        let mut wire = Vec::new();
        RequestHeader::new(Command::Memory, 16)
            .unwrap()
            .write_to(&mut wire)
            .unwrap();
        wire.extend_from_slice(&(96 * P).to_le_bytes());
        wire.extend_from_slice(&P.to_le_bytes());
        wire.extend_from_slice(&[0xffu8; P as usize]);
        let mut input = wire.as_slice();
        let header = RequestHeader::read_from(&mut input).unwrap();
        let err = receive_memory(&dst, &dst_ram, &header, &mut input).unwrap_err();
        assert!(matches!(
            err,
            MemoryStreamError::Table(RangeError::OutsideRam { .. })
        ));
        assert_eq!(err.reason(), ErrorReason::InvalidMemory);

        // A table valid for a bigger RAM description is still checked against real memory.
        let table = MemoryRangeTable::from_ranges([MemoryRange::new(200 * P, P)]).unwrap();
        assert!(matches!(
            receive_ranges(&dst, &table, &mut &[0u8; 4096][..]),
            Err(MemoryStreamError::NotInMemory { .. })
        ));
        // The stream ends inside the page data.
        let table = MemoryRangeTable::from_ranges([MemoryRange::new(0, P)]).unwrap();
        assert!(matches!(
            receive_ranges(&dst, &table, &mut &[0u8; 100][..]),
            Err(MemoryStreamError::Receive { .. })
        ));
        // A request of another kind.
        let h = RequestHeader::new(Command::State, 0).unwrap();
        assert!(matches!(
            receive_memory(&dst, &dst_ram, &h, &mut &[][..]),
            Err(MemoryStreamError::Protocol(_))
        ));
    }

    /// A reader that returns at most 1000 bytes per read, as a socket may.
    struct Trickle<'a>(&'a [u8]);

    impl ReadVolatile for Trickle<'_> {
        fn read_volatile<B: vm_memory::bitmap::BitmapSlice>(
            &mut self,
            buf: &mut vm_memory::VolatileSlice<B>,
        ) -> Result<usize, VolatileMemoryError> {
            let mut part = buf.subslice(0, buf.len().min(1000))?;
            self.0.read_volatile(&mut part)
        }
    }

    /// Regression: vm-memory's `read_exact_volatile_from` on guest memory does one read per
    /// region and failed with `PartialBuffer` when a socket returned a short read.
    #[test]
    fn regression_short_reads_fill_guest_memory() {
        let dst = mem();
        let data: Vec<u8> = (0..70 * P).map(|i| (i % 251) as u8).collect();
        let table = MemoryRangeTable::from_ranges([MemoryRange::new(20 * P, 70 * P)]).unwrap();
        let got = receive_ranges(&dst, &table, &mut Trickle(&data)).unwrap();
        assert_eq!(got, 70 * P);
        for p in 0..70 {
            let expected = &data[(p * P) as usize..((p + 1) * P) as usize];
            assert_eq!(read_page(&dst, (20 + p) * P), expected);
        }
    }

    #[test]
    fn sender_rejects_ranges_outside_memory() {
        let src = mem();
        let table = MemoryRangeTable::from_ranges([MemoryRange::new(96 * P, P)]).unwrap();
        let mut out = Vec::new();
        assert!(matches!(
            send_ranges(&src, &table, &mut out),
            Err(MemoryStreamError::NotInMemory { .. })
        ));
        assert!(out.is_empty());
    }

    #[test]
    fn zero_skipping_round_trip() {
        let src = mem();
        src.write_obj(0xdead_beefu32, GuestAddress(5 * P + 12))
            .unwrap();
        src.write_obj(1u8, GuestAddress(0x10_0000 + 15 * P + 4095))
            .unwrap();
        let all = MemoryRangeTable::from_ranges(ram(&src).regions().iter().copied()).unwrap();
        let split = split_zero_pages(&src, &all).unwrap();
        assert_eq!(split.to_send.total_pages(), 2);
        assert_eq!(split.zero_pages, all.total_pages() - 2);
        let mut wire = Vec::new();
        send_memory(&src, &split.to_send, &mut wire).unwrap();
        let dst = mem();
        let mut input = wire.as_slice();
        let header = RequestHeader::read_from(&mut input).unwrap();
        receive_memory(&dst, &ram(&dst), &header, &mut input).unwrap();
        assert!(input.is_empty());
        for r in ram(&src).regions() {
            for p in (r.gpa..r.gpa + r.length).step_by(P as usize) {
                assert_eq!(read_page(&src, p), read_page(&dst, p));
            }
        }
    }
}

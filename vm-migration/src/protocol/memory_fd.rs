//! The MemoryFd request of local mode: guest RAM regions handed over as file descriptors
//! (memfds) with SCM_RIGHTS, instead of being copied.
//!
//! The header is written normally; the payload, one 24-byte entry per region
//! (`gpa`, `size`, `offset` in the file, little-endian), is sent in one `sendmsg` carrying the
//! regions' descriptors in the same order. The receiver must read the header with an exact
//! 24-byte read (no buffering), so the descriptors arrive with the payload's first byte.

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;

use libc::{c_void, iovec};
use vmm_sys_util::sock_ctrl_msg::ScmSocket;
use zerocopy::byteorder::little_endian::U64;
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned};

use super::request::{Command, RequestHeader};
use super::ProtocolError;
use crate::ranges::{MemoryRange, RangeError, PAGE_SIZE};

/// Most memory regions one MemoryFd request may carry.
pub const MAX_MEMORY_FDS: usize = 64;

/// Size of one region entry on the wire.
pub const MEMORY_FD_ENTRY_SIZE: u64 = std::mem::size_of::<MemoryFdWire>() as u64;

#[repr(C)]
#[derive(Clone, Copy, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
struct MemoryFdWire {
    gpa: U64,
    size: U64,
    offset: U64,
}

/// One guest RAM region shared through a file descriptor.
#[derive(Debug)]
pub struct MemoryFdRegion<F> {
    /// Guest physical address of the region.
    pub gpa: u64,
    /// Size of the region in bytes.
    pub size: u64,
    /// Offset of the region in the file.
    pub offset: u64,
    /// The file (a `BorrowedFd` when sending, an `OwnedFd` when received).
    pub fd: F,
}

/// Checks a list of regions: page-aligned, non-empty, no overflow (also of `offset + size`),
/// sorted and non-overlapping by address.
fn validate<F>(regions: &[MemoryFdRegion<F>]) -> Result<(), ProtocolError> {
    if regions.len() > MAX_MEMORY_FDS {
        return Err(ProtocolError::TooManyFds {
            count: regions.len(),
            max: MAX_MEMORY_FDS,
        });
    }
    let mut prev_end = 0u64;
    for (index, r) in regions.iter().enumerate() {
        let bad = |source| ProtocolError::BadMemoryRegion { index, source };
        let end = MemoryRange::new(r.gpa, r.size).check(index).map_err(bad)?;
        if !r.offset.is_multiple_of(PAGE_SIZE) {
            return Err(bad(RangeError::Misaligned {
                index,
                gpa: r.gpa,
                length: r.size,
            }));
        }
        if r.offset.checked_add(r.size).is_none() {
            return Err(bad(RangeError::Overflow {
                index,
                gpa: r.gpa,
                length: r.size,
            }));
        }
        if index > 0 && r.gpa < prev_end {
            return Err(bad(RangeError::Unsorted { index, gpa: r.gpa }));
        }
        prev_end = end;
    }
    Ok(())
}

/// Sends a MemoryFd request (header, entries and descriptors) over a UNIX socket. Returns the
/// bytes written. The caller then reads the [`super::Response`].
pub fn send_memory_fds(
    socket: &UnixStream,
    regions: &[MemoryFdRegion<BorrowedFd<'_>>],
) -> Result<u64, ProtocolError> {
    validate(regions)?;
    let mut payload = Vec::with_capacity(regions.len() * MEMORY_FD_ENTRY_SIZE as usize);
    for r in regions {
        let wire = MemoryFdWire {
            gpa: U64::new(r.gpa),
            size: U64::new(r.size),
            offset: U64::new(r.offset),
        };
        payload.extend_from_slice(wire.as_bytes());
    }
    let header = RequestHeader::new(Command::MemoryFd, payload.len() as u64)?;
    let mut writer = socket;
    header.write_to(&mut writer)?;
    if !payload.is_empty() {
        let fds: Vec<RawFd> = regions.iter().map(|r| r.fd.as_raw_fd()).collect();
        let sent = socket
            .send_with_fds(&[payload.as_slice()], &fds)
            .map_err(ProtocolError::SendFds)?;
        // The descriptors travel with the first byte; any rest is plain data.
        writer
            .write_all(&payload[sent.min(payload.len())..])
            .map_err(ProtocolError::write)?;
    }
    writer.flush().map_err(ProtocolError::write)?;
    Ok((RequestHeader::WIRE_SIZE + payload.len()) as u64)
}

/// Decodes a MemoryFd payload (one 24-byte entry per region) and pairs the entries, in order,
/// with the descriptors that came with it: the count must match and the regions must be valid
/// (page aligned, non-empty, sorted, not overlapping, offset + size not overflowing). The pure
/// half of [`receive_memory_fds`], which also checks each file's size.
pub fn decode_memory_fd_entries<F>(
    payload: &[u8],
    fds: Vec<F>,
) -> Result<Vec<MemoryFdRegion<F>>, ProtocolError> {
    let len = payload.len() as u64;
    if !len.is_multiple_of(MEMORY_FD_ENTRY_SIZE) {
        return Err(ProtocolError::BadPayloadLength {
            command: Command::MemoryFd,
            length: len,
        });
    }
    let entries = (len / MEMORY_FD_ENTRY_SIZE) as usize;
    if entries > MAX_MEMORY_FDS {
        return Err(ProtocolError::TooManyFds {
            count: entries,
            max: MAX_MEMORY_FDS,
        });
    }
    if fds.len() != entries {
        return Err(ProtocolError::FdCount {
            entries,
            fds: fds.len(),
        });
    }
    let mut regions = Vec::with_capacity(entries);
    for (chunk, fd) in payload.chunks_exact(MEMORY_FD_ENTRY_SIZE as usize).zip(fds) {
        let wire = MemoryFdWire::read_from_bytes(chunk).map_err(|_| ProtocolError::Truncated {
            expected: len,
            got: chunk.len() as u64,
        })?;
        regions.push(MemoryFdRegion {
            gpa: wire.gpa.get(),
            size: wire.size.get(),
            offset: wire.offset.get(),
            fd,
        });
    }
    validate(&regions)?;
    Ok(regions)
}

/// Receives the payload and descriptors of a MemoryFd request whose header was just read.
/// Checks the entries and that each file is large enough for `offset + size`. Descriptors are
/// owned (closed on drop) from the moment they arrive, including on every error path.
pub fn receive_memory_fds(
    socket: &UnixStream,
    header: &RequestHeader,
) -> Result<Vec<MemoryFdRegion<OwnedFd>>, ProtocolError> {
    header.check_command(Command::MemoryFd)?;
    let len = header.length();
    if !len.is_multiple_of(MEMORY_FD_ENTRY_SIZE) {
        return Err(ProtocolError::BadPayloadLength {
            command: Command::MemoryFd,
            length: len,
        });
    }
    // Bounded by the header's MemoryFd limit (MAX_MEMORY_FDS entries).
    let mut payload = vec![0u8; len as usize];
    let mut owned: Vec<OwnedFd> = Vec::new();
    if !payload.is_empty() {
        let mut raw = [-1 as RawFd; MAX_MEMORY_FDS];
        let mut iov = [iovec {
            iov_base: payload.as_mut_ptr() as *mut c_void,
            iov_len: payload.len(),
        }];
        // SAFETY: the single iovec points at `payload`, a live buffer of exactly `iov_len`
        // bytes that nothing else references during the call, so the kernel may write any
        // bytes into it.
        let (got, nfds) = unsafe { socket.recv_with_fds(&mut iov, &mut raw) }
            .map_err(ProtocolError::ReceiveFds)?;
        for &fd in raw.iter().take(nfds) {
            // SAFETY: recvmsg just installed `fd` in this process for us; nobody else owns
            // it, and wrapping it at once means it is closed on every path.
            owned.push(unsafe { OwnedFd::from_raw_fd(fd) });
        }
        if got == 0 {
            return Err(ProtocolError::Truncated {
                expected: len,
                got: 0,
            });
        }
        let mut reader = socket;
        reader
            .read_exact(&mut payload[got..])
            .map_err(ProtocolError::read)?;
    }
    let mut regions = decode_memory_fd_entries(&payload, owned)?;
    for (index, r) in regions.iter_mut().enumerate() {
        let file = File::from(r.fd.try_clone().map_err(ProtocolError::FdStat)?);
        let actual = file.metadata().map_err(ProtocolError::FdStat)?.len();
        // No overflow: checked by `validate`.
        let needed = r.offset + r.size;
        if actual < needed {
            return Err(ProtocolError::FdTooSmall {
                index,
                needed,
                actual,
            });
        }
    }
    Ok(regions)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Seek, SeekFrom};
    use std::os::fd::AsFd;

    fn memfd(size: u64, fill: u8) -> File {
        let f = vmm_sys_util::tempfile::TempFile::new().unwrap().into_file();
        f.set_len(size).unwrap();
        let mut w = &f;
        w.write_all(&[fill; 16]).unwrap();
        f
    }

    fn receive(socket: &UnixStream) -> Result<Vec<MemoryFdRegion<OwnedFd>>, ProtocolError> {
        let mut r = socket;
        let header = RequestHeader::read_from(&mut r)?;
        receive_memory_fds(socket, &header)
    }

    #[test]
    fn fds_round_trip() {
        let (a, b) = UnixStream::pair().unwrap();
        let f1 = memfd(0x10000, 0xaa);
        let f2 = memfd(0x20000, 0xbb);
        let regions = [
            MemoryFdRegion {
                gpa: 0,
                size: 0x10000,
                offset: 0,
                fd: f1.as_fd(),
            },
            MemoryFdRegion {
                gpa: 0x100000,
                size: 0x10000,
                offset: 0x10000,
                fd: f2.as_fd(),
            },
        ];
        let sent = send_memory_fds(&a, &regions).unwrap();
        assert_eq!(sent, 24 + 48);
        let got = receive(&b).unwrap();
        assert_eq!(got.len(), 2);
        assert_eq!(
            (got[1].gpa, got[1].size, got[1].offset),
            (0x100000, 0x10000, 0x10000)
        );
        // The received descriptor is the same file.
        let mut file = File::from(got[1].fd.try_clone().unwrap());
        file.seek(SeekFrom::Start(0)).unwrap();
        let mut byte = [0u8; 1];
        file.read_exact(&mut byte).unwrap();
        assert_eq!(byte[0], 0xbb);
    }

    #[test]
    fn empty_list_round_trips() {
        let (a, b) = UnixStream::pair().unwrap();
        send_memory_fds(&a, &[]).unwrap();
        assert!(receive(&b).unwrap().is_empty());
    }

    #[test]
    fn sender_rejects_bad_regions() {
        let (a, _b) = UnixStream::pair().unwrap();
        let f = memfd(0x1000, 0);
        let one = |gpa, size, offset| {
            [MemoryFdRegion {
                gpa,
                size,
                offset,
                fd: f.as_fd(),
            }]
        };
        for (gpa, size, offset) in [
            (1, 0x1000, 0),
            (0, 0, 0),
            (0, 0x1000, 7),
            (0, 0x1000, !0xfff),
        ] {
            assert!(matches!(
                send_memory_fds(&a, &one(gpa, size, offset)),
                Err(ProtocolError::BadMemoryRegion { index: 0, .. })
            ));
        }
        let many: Vec<_> = (0..65u64)
            .map(|i| MemoryFdRegion {
                gpa: i << 20,
                size: 0x1000,
                offset: 0,
                fd: f.as_fd(),
            })
            .collect();
        assert!(matches!(
            send_memory_fds(&a, &many),
            Err(ProtocolError::TooManyFds { count: 65, .. })
        ));
    }

    /// Writes a MemoryFd request by hand, so the receiver sees what a hostile peer could send.
    fn send_raw(socket: &UnixStream, entries: &[(u64, u64, u64)], fds: &[RawFd]) {
        let mut payload = Vec::new();
        for (g, s, o) in entries {
            payload.extend_from_slice(&g.to_le_bytes());
            payload.extend_from_slice(&s.to_le_bytes());
            payload.extend_from_slice(&o.to_le_bytes());
        }
        let mut w = socket;
        RequestHeader::new(Command::MemoryFd, payload.len() as u64)
            .unwrap()
            .write_to(&mut w)
            .unwrap();
        socket.send_with_fds(&[payload.as_slice()], fds).unwrap();
    }

    #[test]
    fn decode_pairs_entries_with_descriptors() {
        let mut payload = Vec::new();
        for (g, s, o) in [(0u64, 0x1000u64, 0u64), (0x2000, 0x2000, 0x1000)] {
            payload.extend_from_slice(&g.to_le_bytes());
            payload.extend_from_slice(&s.to_le_bytes());
            payload.extend_from_slice(&o.to_le_bytes());
        }
        let regions = decode_memory_fd_entries(&payload, vec!['a', 'b']).unwrap();
        assert_eq!(
            regions
                .iter()
                .map(|r| (r.gpa, r.size, r.offset, r.fd))
                .collect::<Vec<_>>(),
            [(0, 0x1000, 0, 'a'), (0x2000, 0x2000, 0x1000, 'b')]
        );
        assert!(matches!(
            decode_memory_fd_entries(&payload, vec!['a']),
            Err(ProtocolError::FdCount { entries: 2, fds: 1 })
        ));
        assert!(matches!(
            decode_memory_fd_entries(&payload[..30], vec!['a']),
            Err(ProtocolError::BadPayloadLength { length: 30, .. })
        ));
        let too_many = vec![0u8; 65 * MEMORY_FD_ENTRY_SIZE as usize];
        assert!(matches!(
            decode_memory_fd_entries(&too_many, vec![(); 65]),
            Err(ProtocolError::TooManyFds { count: 65, .. })
        ));
    }

    #[test]
    fn receiver_rejects_hostile_requests() {
        let f = memfd(0x2000, 0);
        let fd = f.as_raw_fd();
        type Case = (Vec<(u64, u64, u64)>, Vec<RawFd>);
        let cases: Vec<Case> = vec![
            // Fewer descriptors than entries.
            (vec![(0, 0x1000, 0), (0x1000, 0x1000, 0)], vec![fd]),
            // More descriptors than entries.
            (vec![(0, 0x1000, 0)], vec![fd, fd]),
            // Overlapping regions.
            (vec![(0, 0x2000, 0), (0x1000, 0x1000, 0)], vec![fd, fd]),
            // Misaligned.
            (vec![(0x10, 0x1000, 0)], vec![fd]),
            // File too small for offset + size.
            (vec![(0, 0x2000, 0x1000)], vec![fd]),
        ];
        for (entries, fds) in cases {
            let (a, b) = UnixStream::pair().unwrap();
            send_raw(&a, &entries, &fds);
            let err = receive(&b).unwrap_err();
            assert!(
                matches!(
                    err,
                    ProtocolError::FdCount { .. }
                        | ProtocolError::BadMemoryRegion { .. }
                        | ProtocolError::FdTooSmall { .. }
                ),
                "{entries:?}: {err:?}"
            );
        }
        // No descriptors at all.
        let (a, b) = UnixStream::pair().unwrap();
        let mut w = &a;
        RequestHeader::new(Command::MemoryFd, 24)
            .unwrap()
            .write_to(&mut w)
            .unwrap();
        w.write_all(&[0u8; 24]).unwrap();
        assert!(matches!(
            receive(&b),
            Err(ProtocolError::FdCount { entries: 1, fds: 0 })
        ));
        // A header of another command.
        let h = RequestHeader::new(Command::State, 0).unwrap();
        assert!(matches!(
            receive_memory_fds(&b, &h),
            Err(ProtocolError::UnexpectedCommand { .. })
        ));
    }
}

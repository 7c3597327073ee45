//! Request headers and the commands they carry.

use std::fmt;
use std::io::{Read, Write};

use zerocopy::byteorder::little_endian::{U16, U32, U64};
use zerocopy::{FromBytes, FromZeros, Immutable, IntoBytes, KnownLayout, Unaligned};

use super::memory_fd::{MAX_MEMORY_FDS, MEMORY_FD_ENTRY_SIZE};
use super::{ProtocolError, Response, MAX_PAYLOAD_BYTES, PROTOCOL_VERSION, REQUEST_MAGIC};
use crate::ranges::MAX_RANGE_TABLE_BYTES;

/// What a request asks the destination to do.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u16)]
pub enum Command {
    /// Begin a migration. No payload.
    Start = 1,
    /// The VM configuration (opaque bytes to this crate, JSON in the VMM).
    Config = 2,
    /// A range table, followed by the pages it names.
    Memory = 3,
    /// Local mode: memory regions shared as file descriptors (SCM_RIGHTS).
    MemoryFd = 4,
    /// Device and vCPU state (opaque bytes to this crate).
    State = 5,
    /// The migration is complete; the destination resumes the VM. No payload.
    Complete = 6,
    /// The migration is abandoned; the destination drops the VM. No payload.
    Abandon = 7,
    /// More connections will carry memory (`connections=<n>`); see [`crate::striping`].
    Connections = 8,
    /// The first request on an added connection; see [`crate::striping`].
    Join = 9,
}

impl Command {
    /// Decodes a command code.
    pub fn from_code(code: u16) -> Result<Self, ProtocolError> {
        Ok(match code {
            1 => Command::Start,
            2 => Command::Config,
            3 => Command::Memory,
            4 => Command::MemoryFd,
            5 => Command::State,
            6 => Command::Complete,
            7 => Command::Abandon,
            8 => Command::Connections,
            9 => Command::Join,
            other => return Err(ProtocolError::UnknownCommand(other)),
        })
    }

    /// The wire code.
    pub fn code(self) -> u16 {
        self as u16
    }

    /// Largest payload length this command allows. For Memory it bounds the range table; the
    /// page data after it is sized by the table.
    pub fn max_payload(self) -> u64 {
        match self {
            Command::Start | Command::Complete | Command::Abandon => 0,
            Command::Config | Command::State => MAX_PAYLOAD_BYTES,
            Command::Memory => MAX_RANGE_TABLE_BYTES,
            Command::MemoryFd => MAX_MEMORY_FDS as u64 * MEMORY_FD_ENTRY_SIZE,
            Command::Connections | Command::Join => crate::striping::STRIPE_PAYLOAD_BYTES,
        }
    }
}

impl fmt::Display for Command {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self, f)
    }
}

/// The 24-byte wire form of a request header.
#[repr(C)]
#[derive(Clone, Copy, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
struct RequestWire {
    magic: U32,
    version: U16,
    command: U16,
    /// Reserved for flags; must be zero.
    reserved: [u8; 8],
    length: U64,
}

const _: () = assert!(std::mem::size_of::<RequestWire>() == 24);

/// A validated request header: a known command and a payload length within its limit.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RequestHeader {
    command: Command,
    length: u64,
}

impl RequestHeader {
    /// Size of a header on the wire.
    pub const WIRE_SIZE: usize = std::mem::size_of::<RequestWire>();

    /// A header for `command` with a payload of `length` bytes.
    pub fn new(command: Command, length: u64) -> Result<Self, ProtocolError> {
        let max = command.max_payload();
        if length > max {
            return Err(ProtocolError::PayloadTooLarge {
                command,
                length,
                max,
            });
        }
        Ok(RequestHeader { command, length })
    }

    /// The command.
    pub fn command(&self) -> Command {
        self.command
    }

    /// The payload length in bytes.
    pub fn length(&self) -> u64 {
        self.length
    }

    /// Checks that this is a `command` request.
    pub fn check_command(&self, command: Command) -> Result<(), ProtocolError> {
        if self.command != command {
            return Err(ProtocolError::UnexpectedCommand {
                expected: command,
                got: self.command,
            });
        }
        Ok(())
    }

    /// Encodes the header.
    pub fn to_bytes(&self) -> [u8; Self::WIRE_SIZE] {
        let wire = RequestWire {
            magic: U32::new(REQUEST_MAGIC),
            version: U16::new(PROTOCOL_VERSION),
            command: U16::new(self.command.code()),
            reserved: [0; 8],
            length: U64::new(self.length),
        };
        let mut out = [0u8; Self::WIRE_SIZE];
        out.copy_from_slice(wire.as_bytes());
        out
    }

    /// Decodes and validates a header.
    pub fn from_bytes(bytes: &[u8; Self::WIRE_SIZE]) -> Result<Self, ProtocolError> {
        let mut wire = RequestWire::new_zeroed();
        wire.as_mut_bytes().copy_from_slice(bytes);
        if wire.magic.get() != REQUEST_MAGIC {
            return Err(ProtocolError::BadMagic {
                found: wire.magic.get(),
            });
        }
        if wire.version.get() != PROTOCOL_VERSION {
            return Err(ProtocolError::UnsupportedVersion {
                found: wire.version.get(),
                supported: PROTOCOL_VERSION,
            });
        }
        let command = Command::from_code(wire.command.get())?;
        if wire.reserved != [0; 8] {
            return Err(ProtocolError::ReservedNotZero);
        }
        Self::new(command, wire.length.get())
    }

    /// Reads and validates a header.
    pub fn read_from<R: Read>(reader: &mut R) -> Result<Self, ProtocolError> {
        let mut bytes = [0u8; Self::WIRE_SIZE];
        reader.read_exact(&mut bytes).map_err(ProtocolError::read)?;
        Self::from_bytes(&bytes)
    }

    /// Writes the header.
    pub fn write_to<W: Write>(&self, writer: &mut W) -> Result<(), ProtocolError> {
        writer
            .write_all(&self.to_bytes())
            .map_err(ProtocolError::write)
    }
}

/// Reads the payload announced by `header` (already bounded by its command's limit). The
/// buffer grows only as bytes arrive, so a lying length cannot make it allocate up front.
pub fn read_payload<R: Read>(
    reader: &mut R,
    header: &RequestHeader,
) -> Result<Vec<u8>, ProtocolError> {
    let expected = header.length();
    let mut payload = Vec::new();
    let got = reader
        .take(expected)
        .read_to_end(&mut payload)
        .map_err(ProtocolError::read)? as u64;
    if got != expected {
        return Err(ProtocolError::Truncated { expected, got });
    }
    Ok(payload)
}

/// Writes a request header and its payload.
pub fn write_request<W: Write>(
    writer: &mut W,
    command: Command,
    payload: &[u8],
) -> Result<(), ProtocolError> {
    let header = RequestHeader::new(command, payload.len() as u64)?;
    let mut frame = Vec::with_capacity(RequestHeader::WIRE_SIZE + payload.len());
    frame.extend_from_slice(&header.to_bytes());
    frame.extend_from_slice(payload);
    writer.write_all(&frame).map_err(ProtocolError::write)?;
    writer.flush().map_err(ProtocolError::write)
}

/// Sends a request with its payload and waits for the response; an Error response becomes
/// [`ProtocolError::Refused`].
pub fn request<S: Read + Write>(
    stream: &mut S,
    command: Command,
    payload: &[u8],
) -> Result<(), ProtocolError> {
    write_request(stream, command, payload)?;
    Response::read_from(stream)?.into_result()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::ErrorReason;

    const ALL: [Command; 7] = [
        Command::Start,
        Command::Config,
        Command::Memory,
        Command::MemoryFd,
        Command::State,
        Command::Complete,
        Command::Abandon,
    ];

    #[test]
    fn header_round_trip_every_command() {
        for cmd in ALL {
            let len = cmd.max_payload().min(1234);
            let h = RequestHeader::new(cmd, len).unwrap();
            let mut buf = Vec::new();
            h.write_to(&mut buf).unwrap();
            assert_eq!(buf.len(), RequestHeader::WIRE_SIZE);
            let back = RequestHeader::read_from(&mut buf.as_slice()).unwrap();
            assert_eq!(back, h);
            assert_eq!(Command::from_code(cmd.code()).unwrap(), cmd);
            back.check_command(cmd).unwrap();
        }
    }

    #[test]
    fn header_layout_is_little_endian() {
        let bytes = RequestHeader::new(Command::State, 0x0102_0304)
            .unwrap()
            .to_bytes();
        assert_eq!(&bytes[0..4], b"VMMQ");
        assert_eq!(&bytes[4..6], &[1, 0]);
        assert_eq!(&bytes[6..8], &[5, 0]);
        assert_eq!(&bytes[8..16], &[0; 8]);
        assert_eq!(&bytes[16..24], &[4, 3, 2, 1, 0, 0, 0, 0]);
    }

    fn tweak(f: impl FnOnce(&mut [u8; 24])) -> Result<RequestHeader, ProtocolError> {
        let mut b = RequestHeader::new(Command::Config, 10).unwrap().to_bytes();
        f(&mut b);
        RequestHeader::from_bytes(&b)
    }

    #[test]
    fn header_rejects() {
        assert!(matches!(
            tweak(|b| b[0] = b'X'),
            Err(ProtocolError::BadMagic { .. })
        ));
        assert!(matches!(
            tweak(|b| b[4] = 2),
            Err(ProtocolError::UnsupportedVersion {
                found: 2,
                supported: 1
            })
        ));
        for code in [0u8, 10, 0xff] {
            assert!(matches!(
                tweak(|b| b[6] = code),
                Err(ProtocolError::UnknownCommand(_))
            ));
        }
        assert!(matches!(
            tweak(|b| b[12] = 1),
            Err(ProtocolError::ReservedNotZero)
        ));
        // Absurd lengths, per command.
        assert!(matches!(
            tweak(|b| b[16..24].copy_from_slice(&u64::MAX.to_le_bytes())),
            Err(ProtocolError::PayloadTooLarge { .. })
        ));
        assert!(matches!(
            tweak(|b| {
                b[6] = Command::Start.code() as u8;
                b[16] = 1;
            }),
            Err(ProtocolError::PayloadTooLarge { max: 0, .. })
        ));
        assert!(RequestHeader::new(Command::Config, MAX_PAYLOAD_BYTES).is_ok());
        assert!(RequestHeader::new(Command::Config, MAX_PAYLOAD_BYTES + 1).is_err());
        assert!(RequestHeader::new(Command::MemoryFd, 65 * MEMORY_FD_ENTRY_SIZE).is_err());
        // Short read.
        assert!(matches!(
            RequestHeader::read_from(&mut &[0u8; 10][..]),
            Err(ProtocolError::Read(_))
        ));
        let h = RequestHeader::new(Command::Start, 0).unwrap();
        assert!(matches!(
            h.check_command(Command::Config),
            Err(ProtocolError::UnexpectedCommand {
                expected: Command::Config,
                got: Command::Start
            })
        ));
    }

    #[test]
    fn payload_round_trip_and_truncation() {
        let mut buf = Vec::new();
        write_request(&mut buf, Command::Config, b"{\"cpus\":1}").unwrap();
        let mut r = buf.as_slice();
        let h = RequestHeader::read_from(&mut r).unwrap();
        assert_eq!(h.command(), Command::Config);
        assert_eq!(read_payload(&mut r, &h).unwrap(), b"{\"cpus\":1}");
        // The header promises more than the stream holds.
        let h = RequestHeader::new(Command::State, 100).unwrap();
        assert!(matches!(
            read_payload(&mut &b"abc"[..], &h),
            Err(ProtocolError::Truncated {
                expected: 100,
                got: 3
            })
        ));
        assert!(matches!(
            write_request(&mut Vec::new(), Command::Complete, b"x"),
            Err(ProtocolError::PayloadTooLarge { .. })
        ));
    }

    /// A duplex in-memory stream: reads come from `input`, writes go to `output`.
    struct Duplex {
        input: std::io::Cursor<Vec<u8>>,
        output: Vec<u8>,
    }

    impl Read for Duplex {
        fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
            self.input.read(buf)
        }
    }

    impl Write for Duplex {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.output.write(buf)
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn request_reports_refusal() {
        let mut input = Vec::new();
        Response::Ok.write_to(&mut input).unwrap();
        Response::error(ErrorReason::Config, "bad config")
            .write_to(&mut input)
            .unwrap();
        let mut s = Duplex {
            input: std::io::Cursor::new(input),
            output: Vec::new(),
        };
        request(&mut s, Command::Start, &[]).unwrap();
        match request(&mut s, Command::Config, b"x") {
            Err(ProtocolError::Refused { reason, message }) => {
                assert_eq!(reason, ErrorReason::Config);
                assert_eq!(message, "bad config");
            }
            other => panic!("unexpected {other:?}"),
        }
        assert_eq!(s.output.len(), 2 * RequestHeader::WIRE_SIZE + 1);
    }
}

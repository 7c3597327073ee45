//! Responses: every request is answered with Ok, or Error with a reason code and a message.

use std::fmt;
use std::io::{Read, Write};

use zerocopy::byteorder::little_endian::{U16, U32};
use zerocopy::{FromBytes, FromZeros, Immutable, IntoBytes, KnownLayout, Unaligned};

use super::{ProtocolError, PROTOCOL_VERSION, RESPONSE_MAGIC};

/// Longest error message carried by a response, in bytes; longer ones are cut when sent.
pub const MAX_MESSAGE_BYTES: u32 = 4096;

const STATUS_OK: u16 = 1;
const STATUS_ERROR: u16 = 2;

/// Why the destination refused a request.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ErrorReason {
    /// A malformed or unexpected message.
    Protocol,
    /// A memory range or region outside the destination's RAM, or malformed.
    InvalidMemory,
    /// The VM configuration could not be used.
    Config,
    /// The device state could not be restored.
    State,
    /// Writing guest memory failed.
    Memory,
    /// A feature or version the destination does not support.
    Unsupported,
    /// Anything else that went wrong on the destination.
    Internal,
    /// A code this side does not know (from a newer peer); kept as received.
    Unknown(u16),
}

impl ErrorReason {
    /// The wire code.
    pub fn code(self) -> u16 {
        match self {
            ErrorReason::Protocol => 1,
            ErrorReason::InvalidMemory => 2,
            ErrorReason::Config => 3,
            ErrorReason::State => 4,
            ErrorReason::Memory => 5,
            ErrorReason::Unsupported => 6,
            ErrorReason::Internal => 7,
            ErrorReason::Unknown(code) => code,
        }
    }

    /// Decodes a wire code; unknown codes are kept as [`ErrorReason::Unknown`].
    pub fn from_code(code: u16) -> Self {
        match code {
            1 => ErrorReason::Protocol,
            2 => ErrorReason::InvalidMemory,
            3 => ErrorReason::Config,
            4 => ErrorReason::State,
            5 => ErrorReason::Memory,
            6 => ErrorReason::Unsupported,
            7 => ErrorReason::Internal,
            other => ErrorReason::Unknown(other),
        }
    }
}

impl fmt::Display for ErrorReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ErrorReason::Protocol => f.write_str("protocol error"),
            ErrorReason::InvalidMemory => f.write_str("invalid memory range"),
            ErrorReason::Config => f.write_str("configuration error"),
            ErrorReason::State => f.write_str("state error"),
            ErrorReason::Memory => f.write_str("guest memory error"),
            ErrorReason::Unsupported => f.write_str("unsupported"),
            ErrorReason::Internal => f.write_str("internal error"),
            ErrorReason::Unknown(code) => write!(f, "error code {code}"),
        }
    }
}

/// The 16-byte wire form of a response header; an Error's message follows it.
#[repr(C)]
#[derive(Clone, Copy, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
struct ResponseWire {
    magic: U32,
    version: U16,
    status: U16,
    reason: U16,
    /// Explicit padding; must be zero.
    padding: [u8; 2],
    message_len: U32,
}

const _: () = assert!(std::mem::size_of::<ResponseWire>() == 16);

/// The destination's answer to a request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Response {
    /// The request was carried out.
    Ok,
    /// The request was refused; the migration ends.
    Error {
        /// Reason code.
        reason: ErrorReason,
        /// A short human-readable explanation.
        message: String,
    },
}

impl Response {
    /// Size of a response header on the wire.
    pub const WIRE_SIZE: usize = std::mem::size_of::<ResponseWire>();

    /// An Error response.
    pub fn error(reason: ErrorReason, message: impl Into<String>) -> Self {
        Response::Error {
            reason,
            message: message.into(),
        }
    }

    /// Turns an Error response into [`ProtocolError::Refused`].
    pub fn into_result(self) -> Result<(), ProtocolError> {
        match self {
            Response::Ok => Ok(()),
            Response::Error { reason, message } => Err(ProtocolError::Refused { reason, message }),
        }
    }

    /// Encodes the response; a message longer than [`MAX_MESSAGE_BYTES`] is cut at a character
    /// boundary.
    pub fn to_bytes(&self) -> Vec<u8> {
        let (status, reason, message) = match self {
            Response::Ok => (STATUS_OK, 0, ""),
            Response::Error { reason, message } => (STATUS_ERROR, reason.code(), truncate(message)),
        };
        let wire = ResponseWire {
            magic: U32::new(RESPONSE_MAGIC),
            version: U16::new(PROTOCOL_VERSION),
            status: U16::new(status),
            reason: U16::new(reason),
            padding: [0; 2],
            message_len: U32::new(message.len() as u32),
        };
        let mut out = Vec::with_capacity(Self::WIRE_SIZE + message.len());
        out.extend_from_slice(wire.as_bytes());
        out.extend_from_slice(message.as_bytes());
        out
    }

    /// Writes the response and flushes.
    pub fn write_to<W: Write>(&self, writer: &mut W) -> Result<(), ProtocolError> {
        writer
            .write_all(&self.to_bytes())
            .map_err(ProtocolError::write)?;
        writer.flush().map_err(ProtocolError::write)
    }

    /// Reads and validates a response.
    pub fn read_from<R: Read>(reader: &mut R) -> Result<Self, ProtocolError> {
        let mut wire = ResponseWire::new_zeroed();
        reader
            .read_exact(wire.as_mut_bytes())
            .map_err(ProtocolError::read)?;
        if wire.magic.get() != RESPONSE_MAGIC {
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
        if wire.padding != [0; 2] {
            return Err(ProtocolError::ReservedNotZero);
        }
        let message_len = wire.message_len.get();
        match wire.status.get() {
            STATUS_OK if wire.reason.get() == 0 && message_len == 0 => Ok(Response::Ok),
            STATUS_OK => Err(ProtocolError::MalformedOk),
            STATUS_ERROR => {
                if message_len > MAX_MESSAGE_BYTES {
                    return Err(ProtocolError::MessageTooLong {
                        length: message_len,
                        max: MAX_MESSAGE_BYTES,
                    });
                }
                let mut bytes = vec![0u8; message_len as usize];
                reader.read_exact(&mut bytes).map_err(ProtocolError::read)?;
                Ok(Response::Error {
                    reason: ErrorReason::from_code(wire.reason.get()),
                    message: String::from_utf8_lossy(&bytes).into_owned(),
                })
            }
            other => Err(ProtocolError::UnknownStatus(other)),
        }
    }
}

fn truncate(message: &str) -> &str {
    let max = MAX_MESSAGE_BYTES as usize;
    if message.len() <= max {
        return message;
    }
    let mut end = max;
    while !message.is_char_boundary(end) {
        end -= 1;
    }
    &message[..end]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn round_trip(r: &Response) -> Response {
        let mut buf = Vec::new();
        r.write_to(&mut buf).unwrap();
        let mut slice = buf.as_slice();
        let back = Response::read_from(&mut slice).unwrap();
        assert!(slice.is_empty());
        back
    }

    #[test]
    fn responses_round_trip() {
        assert_eq!(round_trip(&Response::Ok), Response::Ok);
        for code in 1..=9u16 {
            let r = Response::error(ErrorReason::from_code(code), format!("failed {code}"));
            assert_eq!(round_trip(&r), r);
        }
        assert_eq!(Response::Ok.to_bytes().len(), Response::WIRE_SIZE);
        assert_eq!(ErrorReason::from_code(99), ErrorReason::Unknown(99));
        assert_eq!(ErrorReason::Unknown(99).code(), 99);
    }

    #[test]
    fn long_messages_are_cut_on_a_char_boundary() {
        let long = "é".repeat(3000);
        match round_trip(&Response::error(ErrorReason::Internal, long)) {
            Response::Error { message, .. } => {
                assert!(message.len() <= MAX_MESSAGE_BYTES as usize);
                assert!(message.chars().all(|c| c == 'é'));
            }
            Response::Ok => panic!("expected an error"),
        }
    }

    fn tweak(f: impl FnOnce(&mut Vec<u8>)) -> Result<Response, ProtocolError> {
        let mut b = Response::error(ErrorReason::State, "no").to_bytes();
        f(&mut b);
        Response::read_from(&mut b.as_slice())
    }

    #[test]
    fn response_rejects() {
        assert!(matches!(
            tweak(|b| b[0] = 0),
            Err(ProtocolError::BadMagic { .. })
        ));
        assert!(matches!(
            tweak(|b| b[4] = 9),
            Err(ProtocolError::UnsupportedVersion { found: 9, .. })
        ));
        assert!(matches!(
            tweak(|b| b[6] = 3),
            Err(ProtocolError::UnknownStatus(3))
        ));
        assert!(matches!(
            tweak(|b| b[10] = 1),
            Err(ProtocolError::ReservedNotZero)
        ));
        assert!(matches!(
            tweak(|b| b[12..16].copy_from_slice(&u32::MAX.to_le_bytes())),
            Err(ProtocolError::MessageTooLong { .. })
        ));
        assert!(matches!(tweak(|b| b[12] = 50), Err(ProtocolError::Read(_))));
        assert!(matches!(
            tweak(|b| b[6] = STATUS_OK as u8),
            Err(ProtocolError::MalformedOk)
        ));
    }
}

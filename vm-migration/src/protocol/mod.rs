//! The migration wire protocol: framed, versioned requests, each acknowledged by a response.
//!
//! Every request is a 24-byte [`RequestHeader`] (magic, version, command, payload length)
//! followed by its payload; the destination answers each one with a 16-byte response header
//! ([`Response`]: Ok, or Error with a reason code and a short message). All integers are
//! little-endian. One file per message family: `request.rs` (header and commands),
//! `response.rs`, `memory_fd.rs` (local mode's memory file descriptors).
//!
//! ```text
//!   source (send-migration)                          destination (receive-migration)
//!   ───────────────────────                          ──────────────────────────────
//!   connect ───────────────────────────────────────► accept one connection
//!   Start   ───────────────────────────────────────►
//!           ◄─────────────────────────────────────── Ok
//!   Config  [VM config, ≤ 64 MiB] ─────────────────► create the VM and its RAM
//!           ◄─────────────────────────────────────── Ok
//!  ┌ local mode only:
//!  │MemoryFd [gpa,size,offset]×n + n memfds ───────► map the source's RAM (SCM_RIGHTS)
//!  │        ◄─────────────────────────────────────── Ok
//!  └ otherwise, pre-copy rounds:
//!   start dirty logging, request free page hints, round 0 = RAM − hints − zero pages
//!   Memory  [range table][page data...] ───────────► check table against RAM, read pages
//!           ◄─────────────────────────────────────── Ok           (repeat per round/chunk)
//!   dirty sync → Memory ... ────────────────────────►
//!   pause the VM, last dirty sync → Memory ────────►
//!           ◄─────────────────────────────────────── Ok
//!   State   [device state, ≤ 64 MiB] ──────────────► restore devices
//!           ◄─────────────────────────────────────── Ok
//!   Complete ──────────────────────────────────────► resume the VM
//!           ◄─────────────────────────────────────── Ok
//!   (Abandon may replace any request: the destination drops the VM and answers Ok)
//! ```
//!
//! A Memory request's header length is the size of its range table only; the page data that
//! follows is exactly the table's total length, read straight into guest memory. An Error
//! response, or any malformed request, ends the migration: the destination answers and closes
//! the connection, since the stream can no longer be trusted to be in sync.

mod memory_fd;
mod request;
mod response;

use std::io;

use thiserror::Error;

pub use memory_fd::{
    decode_memory_fd_entries, receive_memory_fds, send_memory_fds, MemoryFdRegion, MAX_MEMORY_FDS,
    MEMORY_FD_ENTRY_SIZE,
};
pub use request::{read_payload, request, write_request, Command, RequestHeader};
pub use response::{ErrorReason, Response, MAX_MESSAGE_BYTES};

use crate::ranges::RangeError;

/// Magic number opening every request header ("VMMQ" in memory order).
pub const REQUEST_MAGIC: u32 = u32::from_le_bytes(*b"VMMQ");

/// Magic number opening every response header ("VMMR" in memory order).
pub const RESPONSE_MAGIC: u32 = u32::from_le_bytes(*b"VMMR");

/// The protocol version this crate speaks; peers must use the same.
pub const PROTOCOL_VERSION: u16 = 1;

/// Largest payload of a Config or State request, and of a Memory request's range table.
pub const MAX_PAYLOAD_BYTES: u64 = 64 << 20;

/// Errors encoding, decoding or exchanging protocol messages.
#[derive(Debug, Error)]
pub enum ProtocolError {
    /// A header did not start with the expected magic number.
    #[error("bad magic number {found:#010x}")]
    BadMagic {
        /// The value received.
        found: u32,
    },
    /// The peer speaks another protocol version.
    #[error("unsupported protocol version {found} (this side speaks {supported})")]
    UnsupportedVersion {
        /// The version received.
        found: u16,
        /// The version supported here.
        supported: u16,
    },
    /// The command code is not one this side knows.
    #[error("unknown command code {0}")]
    UnknownCommand(u16),
    /// The response status is neither Ok nor Error.
    #[error("unknown response status {0}")]
    UnknownStatus(u16),
    /// Reserved or padding bytes were not zero.
    #[error("reserved header bytes are not zero")]
    ReservedNotZero,
    /// An Ok response carried a reason or a message.
    #[error("malformed Ok response")]
    MalformedOk,
    /// A payload is longer than its command allows.
    #[error("{command} payload of {length} bytes exceeds the limit of {max} bytes")]
    PayloadTooLarge {
        /// The command.
        command: Command,
        /// The announced length.
        length: u64,
        /// The limit for this command.
        max: u64,
    },
    /// A request of another command was expected here.
    #[error("expected a {expected} request, got {got}")]
    UnexpectedCommand {
        /// What the caller expected.
        expected: Command,
        /// What arrived.
        got: Command,
    },
    /// A payload's length is not a whole number of its entries.
    #[error("{command} payload of {length} bytes is not a whole number of entries")]
    BadPayloadLength {
        /// The command.
        command: Command,
        /// The announced length.
        length: u64,
    },
    /// The stream ended inside a payload.
    #[error("payload truncated: expected {expected} bytes, got {got}")]
    Truncated {
        /// Bytes announced.
        expected: u64,
        /// Bytes received.
        got: u64,
    },
    /// A response message is longer than [`MAX_MESSAGE_BYTES`].
    #[error("response message of {length} bytes exceeds the limit of {max} bytes")]
    MessageTooLong {
        /// Announced length.
        length: u32,
        /// The limit.
        max: u32,
    },
    /// The peer answered with an Error response.
    #[error("the destination refused the request ({reason}): {message}")]
    Refused {
        /// The reason code.
        reason: ErrorReason,
        /// The destination's message.
        message: String,
    },
    /// More memory regions than [`MAX_MEMORY_FDS`].
    #[error("{count} memory file descriptors exceed the limit of {max}")]
    TooManyFds {
        /// Regions given or announced.
        count: usize,
        /// The limit.
        max: usize,
    },
    /// The number of file descriptors received does not match the entries.
    #[error("{entries} memory regions announced but {fds} file descriptors received")]
    FdCount {
        /// Entries in the payload.
        entries: usize,
        /// Descriptors received.
        fds: usize,
    },
    /// A memory region entry is invalid.
    #[error("memory region entry {index} is invalid")]
    BadMemoryRegion {
        /// Position of the entry.
        index: usize,
        /// What is wrong with it.
        #[source]
        source: RangeError,
    },
    /// A memory region's file is smaller than `offset + size`.
    #[error("memory region entry {index} needs {needed} bytes of its file, which has {actual}")]
    FdTooSmall {
        /// Position of the entry.
        index: usize,
        /// Bytes the entry needs.
        needed: u64,
        /// File size.
        actual: u64,
    },
    /// Querying a received file descriptor failed.
    #[error("failed to query a received memory file descriptor")]
    FdStat(#[source] io::Error),
    /// `sendmsg` with SCM_RIGHTS failed.
    #[error("failed to send memory file descriptors")]
    SendFds(#[source] vmm_sys_util::errno::Error),
    /// `recvmsg` with SCM_RIGHTS failed.
    #[error("failed to receive memory file descriptors")]
    ReceiveFds(#[source] vmm_sys_util::errno::Error),
    /// Reading from the transport failed.
    #[error("failed to read from the migration stream")]
    Read(#[source] io::Error),
    /// Writing to the transport failed.
    #[error("failed to write to the migration stream")]
    Write(#[source] io::Error),
}

impl ProtocolError {
    /// [`ProtocolError::Read`], worded to say what happened to the peer.
    pub fn read(err: io::Error) -> Self {
        ProtocolError::Read(crate::io_errors::explain(err))
    }

    /// [`ProtocolError::Write`], worded to say what happened to the peer.
    pub fn write(err: io::Error) -> Self {
        ProtocolError::Write(crate::io_errors::explain(err))
    }

    /// The reason code to answer the peer with when this error ends a request.
    pub fn reason(&self) -> ErrorReason {
        match self {
            ProtocolError::BadMemoryRegion { .. } | ProtocolError::FdTooSmall { .. } => {
                ErrorReason::InvalidMemory
            }
            ProtocolError::UnsupportedVersion { .. } => ErrorReason::Unsupported,
            ProtocolError::FdStat(_) | ProtocolError::SendFds(_) | ProtocolError::Write(_) => {
                ErrorReason::Internal
            }
            _ => ErrorReason::Protocol,
        }
    }
}

//! Live migration: the sending side ([`send`]), the receiving side ([`receive`]), and the free
//! page hints the sender asks the guest for ([`hints`]).
//!
//! ```text
//!  source VMM                                      destination VMM
//!  ──────────                                      ───────────────
//!  Start ───────────────────────────────────────▶  (accept)            ◀── Ok
//!  Config (VM config, JSON) ────────────────────▶  check it            ◀── Ok
//!  start dirty logging; ask the guest for hints;
//!  round 0 = RAM − hinted − never-sent zero pages
//!  Memory (range table + pages) ────────────────▶  build VM, write     ◀── Ok
//!  Memory (dirty log sync) … until it fits the downtime
//!  pause
//!  Memory (last dirty log sync) ────────────────▶  write               ◀── Ok
//!  State (vCPUs, irqchips, devices, JSON) ──────▶  restore             ◀── Ok
//!  Complete ────────────────────────────────────▶  resume the guest    ◀── Ok
//!  exit                                            run
//! ```
//! In local mode (`shared=on` memory), a MemoryFd request hands the guest memory files over
//! instead of the Memory rounds. On any error the source sends Abandon (if it still can),
//! resumes the guest and keeps running.

pub mod decode;
pub mod hints;
pub mod receive;
pub mod send;

use thiserror::Error;
use vm_migration::protocol::ProtocolError;
use vm_migration::{
    ErrorReason, HintError, MemoryStreamError, RangeError, TransportError, ZeroPageError,
};

use crate::vm::VmError;

/// Everything a migration can fail on, either side.
#[derive(Debug, Error)]
pub enum MigrationError {
    /// The URL is not `unix:<path>` or `tcp:<host>:<port>`.
    #[error("invalid migration URL")]
    Url(#[source] TransportError),
    /// Connecting, listening or accepting failed.
    #[error("migration transport failed")]
    Transport(#[source] TransportError),
    /// The peer broke the protocol, refused a request, or vanished.
    #[error("migration protocol failed")]
    Protocol(#[source] ProtocolError),
    /// Streaming guest memory failed.
    #[error("streaming guest memory failed")]
    Memory(#[source] MemoryStreamError),
    /// Building a round from hints or the dirty log failed.
    #[error("building a memory round failed")]
    Round(#[source] HintError),
    /// Scanning for zero pages failed.
    #[error("zero page scan failed")]
    ZeroScan(#[source] ZeroPageError),
    /// Guest RAM does not form a valid region list.
    #[error("invalid guest RAM layout")]
    Ram(#[source] RangeError),
    /// A VM operation failed.
    #[error("VM operation failed")]
    Vm(#[source] VmError),
    /// The VM configuration or state could not be encoded or decoded.
    #[error("invalid migration {0} payload")]
    Json(&'static str, #[source] serde_json::Error),
    /// The configuration sent by the source cannot be used here.
    #[error("unusable VM configuration from the source")]
    Config(#[source] crate::config::ConfigError),
    /// Local mode needs guest memory backed by shared files.
    #[error("local migration needs guest memory with shared=on")]
    LocalNeedsSharedMemory,
    /// Local mode needs a UNIX socket.
    #[error("local migration needs a unix: URL")]
    LocalNeedsUnixSocket,
    /// A request came before the one it depends on (e.g. Memory before Config).
    #[error("unexpected {0} request")]
    Unexpected(&'static str),
    /// The source gave up.
    #[error("the source abandoned the migration")]
    Abandoned,
    /// The VM must be running to be migrated.
    #[error("the VM is not running")]
    NotRunning,
    /// The VMM was shut down (or the VM deleted) while a migration was being received.
    #[error("the incoming migration was cancelled")]
    Cancelled,
    /// The receiving thread could not be started.
    #[error("cannot start the migration-recv thread")]
    Spawn(#[source] std::io::Error),
    /// The receiving thread could not install its seccomp filter.
    #[error("cannot filter the migration-recv thread")]
    Seccomp(#[source] crate::seccomp::SeccompError),
}

impl MigrationError {
    /// The reason code to answer the peer with.
    pub fn reason(&self) -> ErrorReason {
        match self {
            MigrationError::Protocol(e) => e.reason(),
            MigrationError::Memory(e) => e.reason(),
            MigrationError::Config(_) | MigrationError::Json("config", _) => ErrorReason::Config,
            MigrationError::Json(..) => ErrorReason::State,
            MigrationError::Vm(_) => ErrorReason::State,
            MigrationError::Unexpected(_) => ErrorReason::Protocol,
            MigrationError::Ram(_) => ErrorReason::InvalidMemory,
            _ => ErrorReason::Internal,
        }
    }
}

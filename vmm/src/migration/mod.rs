//! Live migration: the sending side ([`send`]), the receiving side ([`receive`]), and the free
//! page hints the sender asks the guest for ([`hints`]).
//!
//! ```text
//!  source VMM                                      destination VMM
//!  ──────────                                      ───────────────
//!  Start ───────────────────────────────────────▶  (accept)            ◀── Ok
//!  Config (VM config, JSON) ────────────────────▶  check it            ◀── Ok
//!  start dirty logging; ask the guest for hints;
//!  round 0 = RAM − hinted − never backed − never-sent zero pages
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
pub mod dirty;
pub mod hints;
pub mod outgoing;
pub mod populated;
pub mod progress;
pub mod receive;
pub mod send;
pub mod source_vm;
pub mod stripes;

use thiserror::Error;
use vm_migration::protocol::ProtocolError;
use vm_migration::striping::StripeError;
use vm_migration::{
    ErrorReason, HintError, MemoryStreamError, RangeError, TlsError, TransportError, ZeroPageError,
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
    /// The guest powered off, reset or crashed during the migration: nothing was handed over.
    #[error("the guest ended during the migration, so it was not migrated: {0}")]
    GuestEnded(String),
    /// The VM must be running to be migrated.
    #[error("the VM is not running")]
    NotRunning,
    /// The VMM was shut down (or the VM deleted) while a migration was being received.
    #[error("the incoming migration was cancelled")]
    Cancelled,
    /// `vm.migration-cancel` stopped the migration being sent.
    #[error("the migration was cancelled (vm.migration-cancel)")]
    SendCancelled,
    /// `timeout_strategy=cancel` and the dirty rounds did not fit the downtime in time.
    #[error("did not converge within timeout_s={timeout_s} (timeout_strategy=cancel)")]
    NotConverged {
        /// The time allowed, in seconds.
        timeout_s: u64,
    },
    /// The `migration-send` thread could not be started or filtered.
    #[error("cannot start the migration-send thread")]
    SendThread(#[source] std::io::Error),
    /// The receiving thread could not be started.
    #[error("cannot start the migration-recv thread")]
    Spawn(#[source] std::io::Error),
    /// The receiving thread could not install its seccomp filter.
    #[error("cannot filter the migration-recv thread")]
    Seccomp(#[source] crate::seccomp::SeccompError),
    /// Loading the TLS files, or the TLS handshake, failed (the message says which).
    #[error(transparent)]
    Tls(TlsError),
    /// A Connections or Join request was malformed or did not fit.
    #[error("bad added connection")]
    Stripe(#[source] StripeError),
    /// An added connection (`connections=<n>`) failed.
    #[error("migration connection {index} failed")]
    Connection {
        /// Its index (1 for the first added one).
        index: usize,
        /// What went wrong.
        #[source]
        source: Box<MigrationError>,
    },
    /// Not every added connection arrived in time.
    #[error("only {joined} of {expected} added migration connections arrived")]
    JoinTimeout {
        /// Connections that joined.
        joined: usize,
        /// Connections announced.
        expected: usize,
    },
    /// A `migration-tx` thread ended early.
    #[error("a migration connection thread ended")]
    StreamThreadGone,
    /// A migration connection thread could not install its seccomp filter.
    #[error("cannot filter a migration connection thread: {0}")]
    StreamSeccomp(String),
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
            MigrationError::Stripe(_) => ErrorReason::Protocol,
            MigrationError::Connection { source, .. } => source.reason(),
            _ => ErrorReason::Internal,
        }
    }
}

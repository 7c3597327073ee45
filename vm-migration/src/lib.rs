//! Live migration building blocks for a VMM whose migration skips the guest's free memory.
//!
//! - [`protocol`]: the framed, versioned wire protocol (requests, responses, local mode's
//!   memory descriptors), with the exchange drawn in its module docs.
//! - [`ranges`]: [`MemoryRangeTable`] and the [`RamRegions`] every peer-supplied range is
//!   checked against.
//! - [`bitmap`]: [`DirtyBitmap`] in KVM's dirty-log layout, and the [`SetBitRuns`] iterator.
//! - [`hints`]: free page hints applied to round 0 only, with the data-safety rule enforced by
//!   the types ([`HintRound`], [`DirtyRound`]).
//! - [`transport`]: `unix:`/`tcp:` URLs, connect and accept-one, with timeouts.
//! - [`memory`]: zero-copy page streaming between guest memory and the socket.
//! - [`zero`]: zero page detection and the rule for when skipping them is safe.
//! - [`counting`]: byte counting for `wire_bytes`.
//! - [`report`]: the migration report returned by `vm.send-migration`.

pub mod bitmap;
pub mod counting;
pub mod hints;
pub mod memory;
pub mod protocol;
pub mod ranges;
pub mod report;
pub mod transport;
pub mod zero;

pub use bitmap::{BitmapError, DirtyBitmap, SetBitRuns};
pub use counting::CountingStream;
pub use hints::{
    DirtyLoggingStarted, DirtyRound, HintError, HintIgnored, HintRejection, HintRound, HintStats,
    HintVerdict, RoundZero,
};
pub use memory::{receive_memory, receive_ranges, send_memory, send_ranges, MemoryStreamError};
pub use protocol::{Command, ErrorReason, ProtocolError, RequestHeader, Response};
pub use ranges::{MemoryRange, MemoryRangeTable, RamRegions, RangeError, PAGE_SIZE};
pub use report::{HintMode, HintsReport, MigrationReport, MigrationStatus};
pub use transport::{MigrationListener, MigrationStream, MigrationUrl, TransportError};
pub use zero::{is_zero_page, split_zero_pages, ZeroPageError, ZeroPageFilter, ZeroSplit};

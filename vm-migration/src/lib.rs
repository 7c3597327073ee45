//! Live migration building blocks for a VMM whose migration skips the guest's free memory.
//!
//! - [`protocol`]: the framed, versioned wire protocol (requests, responses, local mode's
//!   memory descriptors), with the exchange drawn in its module docs.
//! - [`ranges`]: [`MemoryRangeTable`] and the [`RamRegions`] every peer-supplied range is
//!   checked against.
//! - [`bitmap`]: [`DirtyBitmap`] in KVM's dirty-log layout, and the [`SetBitRuns`] iterator.
//! - [`last_round`]: the last round, merged from a table made before the pause and the final sync.
//! - [`hints`]: free page hints applied to round 0 only, with the data-safety rule enforced by
//!   the types ([`HintRound`], [`DirtyRound`]).
//! - [`populated`]: which guest pages the host ever backed, found without reading them; the
//!   rest is left out of round 0 ([`HintRound::leave_out_unpopulated`]).
//! - [`transport`]: `unix:`/`tcp:` URLs, connect and accept-one, with timeouts.
//! - [`striping`]: `connections=<n>`: added connections joining, rounds split across them.
//! - [`tls`]: TLS 1.3 with mutual authentication over TCP (`tls_dir=`), with rustls.
//! - [`memory`]: zero-copy page streaming between guest memory and the socket.
//! - [`zero`]: zero page detection and the rule for when skipping zero pages is safe.
//! - [`counting`]: byte counting for `wire_bytes`.
//! - [`report`]: the migration report returned by `vm.send-migration`.
//!
//! # Driving a migration
//!
//! Source (RAM region `i` of [`RamRegions`] is the `i`-th region of the VMM's
//! `GuestMemoryMmap`, which is sorted by address):
//!
//! 1. `MigrationStream::connect(&url.parse()?, ..)`, wrapped in a [`CountingStream`].
//! 2. `protocol::request(&mut s, Command::Start, &[])`, then `Command::Config` with the config.
//! 3. Local mode: `protocol::send_memory_fds(s.get_ref().as_unix()?, &regions)`,
//!    `s.record_written(n)`, read the [`Response`]; pause; go to step 7.
//! 4. Start dirty logging (KVM and vm-memory bitmaps), then
//!    `HintRound::new(&ram, DirtyLoggingStarted::confirm())`. With hints on:
//!    `round.request(id)`, *then* write `id` to the balloon; feed each hinted buffer to
//!    `round.apply(id, range)` and STOP to `round.stop(id)`, until STOP or `hint_wait_ms`.
//!    `round.finish()` gives round 0; tell the balloon DONE.
//! 5. For each round: `ZeroPageFilter::filter` (if `zero_pages=on`), `send_memory`, read the
//!    [`Response`]. The next round is a [`DirtyRound`] fed by `add_log` for every region's KVM
//!    log and vm-memory bitmap; repeat until small enough for `downtime_ms`.
//! 6. Pause the VM, last [`DirtyRound`], `send_memory`, read the response.
//! 7. `Command::State` with the device state, then `Command::Complete`; fill the
//!    [`MigrationReport`] (`wire_bytes` from [`CountingStream::bytes_written`]). On any error,
//!    try `Command::Abandon`, resume the source VM.
//!
//! Destination: `MigrationListener::bind`, `accept_one`, then loop on
//! `RequestHeader::read_from` (no buffered reader: local mode's descriptors ride on the
//! payload's first byte) and dispatch by [`Command`]: `read_payload` for Config and State,
//! [`receive_memory`] for Memory, `protocol::receive_memory_fds` for MemoryFd. Answer each
//! with [`Response::Ok`], or `Response::error(e.reason(), ..)` and close the connection.

pub mod bitmap;
pub mod counting;
pub mod hints;
pub mod io_errors;
pub mod last_round;
pub mod memory;
pub mod populated;
pub mod protocol;
pub mod ranges;
pub mod report;
pub mod striping;
pub mod tls;
pub mod transport;
pub mod zero;

pub use bitmap::{BitmapError, DirtyBitmap, SetBitRuns};
pub use counting::{CountingStream, StreamWatch};
pub use hints::{
    DirtyLoggingStarted, DirtyRound, HintError, HintIgnored, HintRejection, HintRound, HintStats,
    HintVerdict, RoundZero, UnpopulatedStats,
};
pub use last_round::{DirtySink, LastRound};
pub use memory::{receive_memory, receive_ranges, send_memory, send_ranges, MemoryStreamError};
pub use populated::{DiscoveryMethod, PopulatedError, PopulatedMemory};
pub use protocol::{Command, ErrorReason, ProtocolError, RequestHeader, Response};
pub use ranges::{MemoryRange, MemoryRangeTable, RamRegions, RangeError, RegionPages, PAGE_SIZE};
pub use report::{
    DowntimeBreakdown, HintMode, HintsReport, MigrationReport, MigrationStatus, PhaseTimes,
    TransportReport,
};
pub use tls::{TlsClient, TlsError, TlsServer, TlsStream};
pub use transport::{MigrationListener, MigrationStream, MigrationUrl, TransportError};
pub use zero::{is_zero_page, split_zero_pages, ZeroPageError, ZeroPageFilter, ZeroSplit};

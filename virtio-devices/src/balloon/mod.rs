//! virtio-balloon: inflate/deflate, statistics, free page reporting and free page hinting.
//!
//! Queues are numbered compactly by the *negotiated* features:
//!
//! ```text
//!  inflate, deflate, [stats if STATS_VQ], [free page if FREE_PAGE_HINT], [reporting if REPORTING]
//! ```
//!
//! A driver need not enable every queue (virtio 1.2, 4.1.4.3). The device runs with whatever
//! subset it gets, and each feature that lacks its queue is unavailable: no inflate or deflate
//! queue, resizing is refused; no stats queue, no statistics; no free page queue, no hinting
//! ([`BalloonHandle::hint_mode`] answers `None`); no reporting queue, nothing is reported.
//!
//! A hinting round (see [`hinting`] for the state machine):
//!
//! ```text
//!  VMM                         device                          driver
//!   │ start_hint_round() ─────► cmd_id := N (>= 2), config irq ──►│
//!   │                           │◄── out: N (4 bytes)             │
//!   │◄── HintRound ranges ──────│◄── in: 4 MiB blocks / out: {gpa,len}[] (HINT_RANGES)
//!   │◄── wait_stopped() ────────│◄── out: STOP (0)                │
//!   │ hint_done() ────────────► cmd_id := DONE (1), config irq ──►│ frees its blocks
//! ```

mod device;
#[cfg(feature = "fuzzing")]
pub mod fuzzing;
pub mod hinting;
mod release;
mod state;
mod stats;
mod worker;

#[cfg(test)]
mod tests;

pub use device::{Balloon, BalloonHandle, WorkerStartHook};
pub use hinting::{HintMode, HintRange, HintRound, HintState, HintStatus};
pub use state::{BalloonCounters, BalloonState, HintingState};
pub use stats::BalloonStats;

use std::time::Duration;

use thiserror::Error;

/// Feature bit: the host must be told before pages are deflated (not offered).
pub const VIRTIO_BALLOON_F_MUST_TELL_HOST: u32 = 0;
/// Feature bit: the statistics queue exists.
pub const VIRTIO_BALLOON_F_STATS_VQ: u32 = 1;
/// Feature bit: the guest may deflate on OOM.
pub const VIRTIO_BALLOON_F_DEFLATE_ON_OOM: u32 = 2;
/// Feature bit: free page hinting (the free page queue exists).
pub const VIRTIO_BALLOON_F_FREE_PAGE_HINT: u32 = 3;
/// Feature bit: the driver reports its page poison value.
pub const VIRTIO_BALLOON_F_PAGE_POISON: u32 = 4;
/// Feature bit: free page reporting (the reporting queue exists).
pub const VIRTIO_BALLOON_F_REPORTING: u32 = 5;
/// Our own feature bit: hints may also come as out buffers of `{le64 gpa; le64 len}` ranges.
/// (Bit 6 is claimed by an out-of-tree proposal and must not be used.)
pub const VIRTIO_BALLOON_F_HINT_RANGES: u32 = 60;

/// Command id: the driver stops hinting and keeps its pages.
pub const FREE_PAGE_HINT_CMD_ID_STOP: u32 = 0;
/// Command id: the driver gives every hinted page back to its allocator.
pub const FREE_PAGE_HINT_CMD_ID_DONE: u32 = 1;
/// Smallest command id of a real round.
pub const FREE_PAGE_HINT_CMD_ID_MIN: u32 = 2;

/// Balloon page size (PFNs are in these units).
pub const BALLOON_PAGE_SIZE: u64 = 4096;
/// Shift of [`BALLOON_PAGE_SIZE`].
pub const BALLOON_PAGE_SHIFT: u32 = 12;
/// Size of the device configuration space.
pub const BALLOON_CONFIG_SIZE: usize = 16;

/// Maximum size of the inflate, deflate, stats and reporting queues.
pub const QUEUE_SIZE: u16 = 256;
/// Maximum size of the free page queue (3 GiB of 4 MiB blocks is 768 buffers).
pub const FREE_PAGE_QUEUE_SIZE: u16 = 1024;

/// The role of a queue.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum QueueKind {
    /// PFNs the guest gives up.
    Inflate,
    /// PFNs the guest takes back.
    Deflate,
    /// The statistics buffer.
    Stats,
    /// Command ids and free page hints.
    FreePage,
    /// Free page reports.
    Reporting,
}

impl QueueKind {
    /// The queue's name as users see it (`vm.counters`, error messages).
    pub fn name(self) -> &'static str {
        match self {
            QueueKind::Inflate => "inflate",
            QueueKind::Deflate => "deflate",
            QueueKind::Stats => "stats",
            QueueKind::FreePage => "free_page",
            QueueKind::Reporting => "reporting",
        }
    }
}

/// The queue roles in index order for a feature set (compact numbering: only queues whose
/// feature is in `features` take an index).
pub fn queue_layout(features: u64) -> Vec<QueueKind> {
    let has = |bit: u32| features & (1 << bit) != 0;
    let mut kinds = vec![QueueKind::Inflate, QueueKind::Deflate];
    if has(VIRTIO_BALLOON_F_STATS_VQ) {
        kinds.push(QueueKind::Stats);
    }
    if has(VIRTIO_BALLOON_F_FREE_PAGE_HINT) {
        kinds.push(QueueKind::FreePage);
    }
    if has(VIRTIO_BALLOON_F_REPORTING) {
        kinds.push(QueueKind::Reporting);
    }
    kinds
}

/// How the balloon is configured (`--balloon`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct BalloonConfig {
    /// Initial target size of the balloon in bytes.
    pub size: u64,
    /// Offer DEFLATE_ON_OOM.
    pub deflate_on_oom: bool,
    /// Offer free page reporting.
    pub free_page_reporting: bool,
    /// Offer free page hinting (and our HINT_RANGES extension).
    pub free_page_hinting: bool,
    /// Offer the statistics queue.
    pub statistics: bool,
    /// Ask the guest for fresh statistics this often (`None`: only on request).
    pub stats_interval: Option<Duration>,
}

/// Errors of the balloon device.
#[derive(Debug, Error)]
pub enum BalloonError {
    /// Creating an event descriptor failed.
    #[error("Failed to create an event descriptor")]
    EventFd(#[source] std::io::Error),
    /// Setting up or waiting on epoll failed.
    #[error("Epoll failed")]
    Epoll(#[source] std::io::Error),
    /// Guest memory named by the driver could not be accessed.
    #[error("Failed to access guest memory at {addr:#x}")]
    GuestMemory {
        /// Guest physical address.
        addr: u64,
        /// What went wrong.
        #[source]
        source: vm_memory::GuestMemoryError,
    },
    /// A descriptor points outside guest RAM.
    #[error("Buffer {addr:#x}+{len:#x} is outside guest RAM")]
    BufferOutsideRam {
        /// Guest physical address.
        addr: u64,
        /// Length.
        len: u64,
    },
    /// `madvise(MADV_DONTNEED)` failed.
    #[error("Failed to release {len:#x} bytes at {addr:#x}")]
    Madvise {
        /// Guest physical address.
        addr: u64,
        /// Length.
        len: u64,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// Punching a hole in the memory file failed.
    #[error("Failed to punch a hole of {len:#x} bytes at {addr:#x}")]
    PunchHole {
        /// Guest physical address.
        addr: u64,
        /// Length.
        len: u64,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// The driver did not negotiate free page hinting.
    #[error("The guest driver did not negotiate free page hinting")]
    HintingNotNegotiated,
    /// The driver has not started the device.
    #[error("The balloon device is not active")]
    NotActive,
    /// The driver started the device without a queue that the request needs.
    #[error(
        "The guest driver did not enable the balloon's {queue} queue, which {needed_for} needs"
    )]
    QueueNotEnabled {
        /// The queue's name ([`QueueKind::name`]).
        queue: &'static str,
        /// What cannot be done without it.
        needed_for: &'static str,
    },
    /// The target does not fit the 32-bit page count.
    #[error("Balloon target of {0} bytes is too large")]
    TargetTooLarge(u64),
}

//! Counters and migration state of the balloon (plain serde data, validated on restore).

use serde::{Deserialize, Serialize};

use super::hinting::HintState;
use super::stats::BalloonStats;

/// Event counters, for `vm.counters`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct BalloonCounters {
    /// Valid PFNs received on the inflate queue.
    pub inflated_pages: u64,
    /// Valid PFNs received on the deflate queue.
    pub deflated_pages: u64,
    /// Pages released to the host (inflate and reporting).
    pub released_pages: u64,
    /// Release calls (madvise/fallocate) that failed.
    pub release_errors: u64,
    /// PFNs outside guest RAM (inflate and deflate).
    pub invalid_pfns: u64,
    /// Pages reported free by free page reporting.
    pub reported_pages: u64,
    /// Reported pages kept because the driver poisons free pages.
    pub reported_pages_kept: u64,
    /// Hinting rounds started.
    pub hint_rounds: u64,
    /// Pages accepted as free by hinting, all rounds.
    pub hinted_pages: u64,
    /// Hints rejected as malformed, all rounds.
    pub hint_rejected: u64,
    /// Hints ignored (wrong id, before the id, after STOP), all rounds.
    pub hint_ignored: u64,
    /// Hinting rounds that ended without the driver's STOP (the host's time limit, a newer
    /// round, DONE or a reset came first): the driver may not have hinted all it had.
    #[serde(default)]
    pub hint_rounds_incomplete: u64,
    /// Buffers of the wrong direction, size or place (all queues).
    pub malformed_buffers: u64,
    /// Queue errors that stopped a queue (available index jumps, unreadable rings).
    pub queue_errors: u64,
    /// Statistics buffers received.
    pub stats_updates: u64,
}

/// Saved hinting state.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct HintingState {
    /// Where the round was.
    pub state: HintState,
    /// The round's command id.
    pub cmd_id: u32,
    /// The last id handed out (ids only grow).
    pub last_id: u32,
    /// Pages accepted in the round.
    pub pages: u64,
    /// Rejected in the round.
    pub rejected: u64,
    /// Ignored in the round.
    pub ignored: u64,
    /// Request-to-STOP time, if STOP arrived.
    pub wait_ms: Option<f64>,
    /// Rounds started.
    pub rounds: u64,
    /// Pages over all rounds.
    pub total_pages: u64,
    /// Rejected over all rounds.
    pub total_rejected: u64,
    /// Ignored over all rounds.
    pub total_ignored: u64,
    /// Rounds that ended without the driver's STOP.
    #[serde(default)]
    pub total_incomplete: u64,
}

/// Everything the balloon needs on the destination.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct BalloonState {
    /// Features offered (must match the destination's device).
    pub avail_features: u64,
    /// Features the driver accepted.
    pub acked_features: u64,
    /// Config: target in pages.
    pub num_pages: u32,
    /// Config: pages the driver holds.
    pub actual: u32,
    /// Config: free_page_hint_cmd_id.
    pub free_page_hint_cmd_id: u32,
    /// Config: poison_val.
    pub poison_val: u32,
    /// Counters.
    pub counters: BalloonCounters,
    /// Last statistics.
    pub stats: BalloonStats,
    /// Head of the statistics buffer the device holds, if any.
    pub stats_desc_head: Option<u16>,
    /// Hinting.
    pub hinting: HintingState,
}

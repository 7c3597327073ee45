//! The free page hinting state machine and the handle through which a round's hints reach
//! whoever started it.
//!
//! ```text
//!            start_round()            driver: out N            driver: out STOP
//!   Idle ──────────────────► Requested ─────────────► Receiving ─────────────► Stopped
//!    ▲                          │  (STOP before N) ─────────────────────────────▲  │
//!    │ reset                    └─────── done() / start_round() ─────────────────┴──┴─► Done
//! ```
//!
//! Only hints that arrive while *Receiving* are accepted; anything else (before the id, for an
//! old id, after STOP or DONE) is ignored and counted. Accepted ranges must be page aligned,
//! non-empty, inside guest RAM and must not overlap an earlier range of the same round;
//! anything else is rejected and counted. Command ids are never reused (they only grow).

use std::collections::BTreeMap;
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

use super::state::HintingState;
use super::{
    BALLOON_PAGE_SHIFT, BALLOON_PAGE_SIZE, FREE_PAGE_HINT_CMD_ID_MIN, FREE_PAGE_HINT_CMD_ID_STOP,
};
use crate::sync::lock;
use crate::GuestMemoryMmap;

/// Where the current (or last) hinting round is.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum HintState {
    /// No round was ever started (or the device was reset).
    #[default]
    Idle,
    /// The id is in config space; the driver has not answered yet.
    Requested,
    /// The driver sent the id; hints are accepted.
    Receiving,
    /// The driver sent STOP; it holds its blocks until DONE.
    Stopped,
    /// DONE was written; the driver gives its blocks back.
    Done,
}

/// Which hint protocol the driver negotiated.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum HintMode {
    /// Standard FREE_PAGE_HINT: in buffers of whole blocks.
    Stock,
    /// HINT_RANGES negotiated: out buffers of `{le64 gpa; le64 len}` ranges as well.
    Ranges,
}

/// A validated range of guest memory that was free when the driver reported it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct HintRange {
    /// Guest physical address (page aligned).
    pub gpa: u64,
    /// Length in bytes (a multiple of the page size).
    pub len: u64,
}

/// State and counters of the last round, for `vm.balloon-hints` and `vm.counters`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct HintStatus {
    /// Where the round is.
    pub state: HintState,
    /// Its command id (0 if none yet).
    pub cmd_id: u32,
    /// Pages accepted in this round.
    pub pages: u64,
    /// Buffers or ranges rejected in this round.
    pub rejected: u64,
    /// Hints ignored in this round (wrong id, before the id, after STOP).
    pub ignored: u64,
    /// Milliseconds from the request to the driver's STOP (while running: so far).
    pub wait_ms: f64,
    /// Rounds started since boot.
    pub rounds: u64,
    /// Pages accepted over all rounds.
    pub total_pages: u64,
    /// Rejected hints over all rounds.
    pub total_rejected: u64,
    /// Ignored hints over all rounds.
    pub total_ignored: u64,
}

#[derive(Debug, Default)]
struct RoundData {
    ranges: Vec<HintRange>,
    pages: u64,
    stopped: bool,
    finished: bool,
}

#[derive(Debug)]
struct RoundInner {
    cmd_id: u32,
    data: Mutex<RoundData>,
    cond: Condvar,
}

/// The receiving end of one hinting round.
#[derive(Clone, Debug)]
pub struct HintRound {
    inner: Arc<RoundInner>,
}

impl HintRound {
    fn new(cmd_id: u32) -> Self {
        HintRound {
            inner: Arc::new(RoundInner {
                cmd_id,
                data: Mutex::new(RoundData::default()),
                cond: Condvar::new(),
            }),
        }
    }

    /// The round's command id.
    pub fn cmd_id(&self) -> u32 {
        self.inner.cmd_id
    }

    /// Take the ranges received since the last call.
    pub fn take_ranges(&self) -> Vec<HintRange> {
        std::mem::take(&mut lock(&self.inner.data).ranges)
    }

    /// Pages accepted so far in this round.
    pub fn pages(&self) -> u64 {
        lock(&self.inner.data).pages
    }

    /// Whether the driver sent STOP for this round.
    pub fn is_stopped(&self) -> bool {
        lock(&self.inner.data).stopped
    }

    /// Whether no more hints will arrive (STOP, DONE, a newer round or a reset).
    pub fn is_finished(&self) -> bool {
        lock(&self.inner.data).finished
    }

    /// Wait until the round is finished or `timeout` passed; true if the driver sent STOP.
    pub fn wait_stopped(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        let mut data = lock(&self.inner.data);
        while !data.finished {
            let now = Instant::now();
            if now >= deadline {
                break;
            }
            data = match self.inner.cond.wait_timeout(data, deadline - now) {
                Ok((d, _)) => d,
                Err(poisoned) => poisoned.into_inner().0,
            };
        }
        data.stopped
    }

    fn push(&self, ranges: &mut Vec<HintRange>, pages: u64) {
        let mut data = lock(&self.inner.data);
        data.ranges.append(ranges);
        data.pages += pages;
    }

    fn finish(&self, stopped: bool) {
        let mut data = lock(&self.inner.data);
        data.stopped |= stopped;
        data.finished = true;
        self.inner.cond.notify_all();
    }
}

/// Why a hinted range was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HintReject {
    /// Zero length.
    Empty,
    /// Address or length not page aligned.
    Misaligned,
    /// Longer than guest RAM, or wraps around.
    TooLong,
    /// Not entirely inside guest RAM.
    OutsideRam,
    /// Overlaps a range accepted earlier in the same round.
    Overlap,
}

/// The device side of hinting (kept under the balloon's lock).
#[derive(Debug, Default)]
pub(crate) struct HintEngine {
    state: HintState,
    cmd_id: u32,
    last_id: u32,
    round: Option<HintRound>,
    seen: BTreeMap<u64, u64>,
    pending: Vec<HintRange>,
    pending_pages: u64,
    requested_at: Option<Instant>,
    wait: Option<Duration>,
    pages: u64,
    rejected: u64,
    ignored: u64,
    rounds: u64,
    total_pages: u64,
    total_rejected: u64,
    total_ignored: u64,
}

impl HintEngine {
    /// Begin a round with a fresh id; returns the id to show in config space and the handle.
    pub(crate) fn start_round(&mut self) -> (u32, HintRound) {
        self.finish_round(false);
        let id = match self.last_id.checked_add(1) {
            Some(id) if id >= FREE_PAGE_HINT_CMD_ID_MIN => id,
            _ => FREE_PAGE_HINT_CMD_ID_MIN,
        };
        self.last_id = id;
        self.cmd_id = id;
        self.state = HintState::Requested;
        self.seen.clear();
        self.pages = 0;
        self.rejected = 0;
        self.ignored = 0;
        self.rounds += 1;
        self.requested_at = Some(Instant::now());
        self.wait = None;
        let round = HintRound::new(id);
        self.round = Some(round.clone());
        (id, round)
    }

    /// DONE: the round is over and its ranges forgotten.
    pub(crate) fn done(&mut self) {
        self.finish_round(false);
        self.seen.clear();
        if self.state != HintState::Idle || self.cmd_id != 0 {
            self.state = HintState::Done;
        }
    }

    /// The device ended the round itself (STOP written to config, e.g. on a time limit): the
    /// round is over, and anything the driver still sends for it is ignored.
    pub(crate) fn stop_by_device(&mut self) {
        if matches!(self.state, HintState::Requested | HintState::Receiving) {
            self.state = HintState::Stopped;
            self.wait = self.requested_at.map(|t| t.elapsed());
            self.finish_round(false);
        }
    }

    /// Device reset: back to idle, the round (if any) is abandoned.
    pub(crate) fn reset(&mut self) {
        self.finish_round(false);
        self.seen.clear();
        self.state = HintState::Idle;
    }

    fn finish_round(&mut self, stopped: bool) {
        self.flush();
        if let Some(round) = self.round.take() {
            round.finish(stopped);
        }
    }

    /// Hand buffered ranges to the round's receiver.
    pub(crate) fn flush(&mut self) {
        if self.pending.is_empty() {
            return;
        }
        match &self.round {
            Some(round) => round.push(&mut self.pending, self.pending_pages),
            None => self.pending.clear(),
        }
        self.pending_pages = 0;
    }

    /// A 4-byte command id buffer from the driver.
    pub(crate) fn on_cmd_id(&mut self, id: u32) {
        match (id, self.state) {
            (FREE_PAGE_HINT_CMD_ID_STOP, HintState::Requested | HintState::Receiving) => {
                self.state = HintState::Stopped;
                self.wait = self.requested_at.map(|t| t.elapsed());
                self.finish_round(true);
            }
            (id, HintState::Requested) if id == self.cmd_id => self.state = HintState::Receiving,
            (id, HintState::Receiving) if id == self.cmd_id => {}
            _ => self.ignore(1),
        }
    }

    /// Whether hints are accepted right now.
    pub(crate) fn receiving(&self) -> bool {
        self.state == HintState::Receiving
    }

    /// Count `n` hints that arrived outside a receiving round.
    pub(crate) fn ignore(&mut self, n: u64) {
        self.ignored += n;
        self.total_ignored += n;
    }

    /// Count `n` malformed buffers or ranges.
    pub(crate) fn reject(&mut self, n: u64) {
        self.rejected += n;
        self.total_rejected += n;
    }

    /// One hinted range; validated and buffered for the receiver.
    pub(crate) fn on_hint(&mut self, mem: &GuestMemoryMmap, gpa: u64, len: u64) {
        if !self.receiving() {
            self.ignore(1);
            return;
        }
        match self.validate(mem, gpa, len) {
            Ok(end) => {
                self.remember(gpa, end);
                let pages = len >> BALLOON_PAGE_SHIFT;
                self.pending.push(HintRange { gpa, len });
                self.pending_pages += pages;
                self.pages += pages;
                self.total_pages += pages;
            }
            Err(why) => {
                log::debug!("balloon: hint {gpa:#x}+{len:#x} rejected: {why:?}");
                self.reject(1);
            }
        }
    }

    /// Record `[gpa, end)` as hinted, merging it with touching neighbours so that a round of
    /// contiguous hints keeps the map small.
    fn remember(&mut self, gpa: u64, end: u64) {
        let mut start = gpa;
        let mut end = end;
        if let Some((&prev_start, &prev_end)) = self.seen.range(..gpa).next_back() {
            if prev_end == gpa {
                start = prev_start;
            }
        }
        if let Some(next_end) = self.seen.remove(&end) {
            end = next_end;
        }
        self.seen.insert(start, end);
    }

    fn validate(&self, mem: &GuestMemoryMmap, gpa: u64, len: u64) -> Result<u64, HintReject> {
        if len == 0 {
            return Err(HintReject::Empty);
        }
        if !gpa.is_multiple_of(BALLOON_PAGE_SIZE) || !len.is_multiple_of(BALLOON_PAGE_SIZE) {
            return Err(HintReject::Misaligned);
        }
        let ram: u64 = mem.iter().map(|r| r.len()).sum();
        let end = gpa.checked_add(len).ok_or(HintReject::TooLong)?;
        if len > ram {
            return Err(HintReject::TooLong);
        }
        let size = usize::try_from(len).map_err(|_| HintReject::TooLong)?;
        if !GuestMemoryBackend::check_range(mem, GuestAddress(gpa), size) {
            return Err(HintReject::OutsideRam);
        }
        if let Some((_, prev_end)) = self.seen.range(..end).next_back() {
            if *prev_end > gpa {
                return Err(HintReject::Overlap);
            }
        }
        Ok(end)
    }

    /// Status for the API.
    pub(crate) fn status(&self) -> HintStatus {
        let wait = self.wait.or_else(|| match self.state {
            HintState::Requested | HintState::Receiving => self.requested_at.map(|t| t.elapsed()),
            _ => None,
        });
        HintStatus {
            state: self.state,
            cmd_id: self.cmd_id,
            pages: self.pages,
            rejected: self.rejected,
            ignored: self.ignored,
            wait_ms: wait.map_or(0.0, |w| w.as_secs_f64() * 1000.0),
            rounds: self.rounds,
            total_pages: self.total_pages,
            total_rejected: self.total_rejected,
            total_ignored: self.total_ignored,
        }
    }

    /// Copy the hint totals into `c`.
    pub(crate) fn fill_counters(&self, c: &mut super::BalloonCounters) {
        c.hint_rounds = self.rounds;
        c.hinted_pages = self.total_pages;
        c.hint_rejected = self.total_rejected;
        c.hint_ignored = self.total_ignored;
    }

    /// Plain state for migration.
    pub(crate) fn save(&self) -> HintingState {
        HintingState {
            state: self.state,
            cmd_id: self.cmd_id,
            last_id: self.last_id,
            pages: self.pages,
            rejected: self.rejected,
            ignored: self.ignored,
            wait_ms: self.wait.map(|w| w.as_secs_f64() * 1000.0),
            rounds: self.rounds,
            total_pages: self.total_pages,
            total_rejected: self.total_rejected,
            total_ignored: self.total_ignored,
        }
    }

    /// Load a validated saved state. The round's receiver stays on the source: hints that
    /// still arrive here are counted but go nowhere.
    pub(crate) fn load(&mut self, s: &HintingState) {
        *self = HintEngine {
            state: s.state,
            cmd_id: s.cmd_id,
            last_id: s.last_id,
            pages: s.pages,
            rejected: s.rejected,
            ignored: s.ignored,
            wait: s
                .wait_ms
                .map(|ms| Duration::from_secs_f64(ms.max(0.0) / 1000.0)),
            rounds: s.rounds,
            total_pages: s.total_pages,
            total_rejected: s.total_rejected,
            total_ignored: s.total_ignored,
            ..Default::default()
        };
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_utils::guest_memory;

    const MIB: u64 = 1 << 20;

    #[test]
    fn ids_are_fresh_and_at_least_two() {
        let mut e = HintEngine::default();
        let (a, _) = e.start_round();
        let (b, _) = e.start_round();
        assert_eq!((a, b), (2, 3));
        e.last_id = u32::MAX;
        assert_eq!(e.start_round().0, 2);
    }

    #[test]
    fn round_lifecycle_and_validation() {
        let mem = guest_memory(64 << 20);
        let mut e = HintEngine::default();
        e.on_hint(&mem, 0, 4096);
        assert_eq!(e.status().ignored, 1);
        let (id, round) = e.start_round();
        e.on_hint(&mem, 0, 4096);
        assert_eq!(e.status().state, HintState::Requested);
        assert_eq!(e.status().ignored, 1, "before the id");
        e.on_cmd_id(id + 7);
        assert_eq!(e.status().ignored, 2, "wrong id");
        e.on_cmd_id(id);
        assert_eq!(e.status().state, HintState::Receiving);
        e.on_hint(&mem, 4 * MIB, 4 * MIB);
        e.on_hint(&mem, 8 * MIB, 4 * MIB);
        for (gpa, len) in [
            (6 * MIB, 4096),         // overlap
            (0x1001, 4096),          // misaligned
            (0, 100),                // misaligned length
            (0, 0),                  // empty
            (60 * MIB, 8 * MIB),     // beyond RAM
            (u64::MAX - 4095, 4096), // wraps
            (0, 1 << 40),            // absurd
        ] {
            e.on_hint(&mem, gpa, len);
        }
        assert_eq!(e.status().rejected, 7);
        e.on_hint(&mem, 12 * MIB, 4096);
        assert!(round.take_ranges().is_empty(), "buffered until flushed");
        e.flush();
        assert_eq!(round.take_ranges().len(), 3);
        e.on_hint(&mem, 16 * MIB, 4096);
        e.on_cmd_id(FREE_PAGE_HINT_CMD_ID_STOP);
        assert!(round.wait_stopped(Duration::from_millis(1)));
        assert_eq!(
            round.take_ranges(),
            vec![HintRange {
                gpa: 16 * MIB,
                len: 4096
            }]
        );
        assert_eq!(round.pages(), 2050);
        let st = e.status();
        assert_eq!((st.state, st.pages), (HintState::Stopped, 2050));
        e.on_hint(&mem, 20 * MIB, 4096);
        assert_eq!(e.status().ignored, 3, "after STOP");
        e.done();
        assert_eq!(e.status().state, HintState::Done);
    }

    #[test]
    fn touching_ranges_are_merged() {
        let mem = guest_memory(64 << 20);
        let mut e = HintEngine::default();
        let (id, _round) = e.start_round();
        e.on_cmd_id(id);
        for block in [8, 0, 4, 12] {
            e.on_hint(&mem, block * MIB, 4 * MIB);
        }
        assert_eq!(e.seen.len(), 1);
        assert_eq!(e.seen.get(&0), Some(&(16 * MIB)));
        e.on_hint(&mem, 15 * MIB, 4096);
        assert_eq!(e.status().rejected, 1, "overlap with the merged range");
    }

    #[test]
    fn superseded_round_finishes_without_stop() {
        let mut e = HintEngine::default();
        let (_, first) = e.start_round();
        let (_, second) = e.start_round();
        assert!(first.is_finished());
        assert!(!first.wait_stopped(Duration::from_millis(1)));
        assert!(!second.is_finished());
        e.on_cmd_id(FREE_PAGE_HINT_CMD_ID_STOP);
        assert!(second.is_stopped());
        assert_eq!(e.status().rounds, 2);
    }

    #[test]
    fn wait_stopped_times_out() {
        let mut e = HintEngine::default();
        let (_, round) = e.start_round();
        let t = Instant::now();
        assert!(!round.wait_stopped(Duration::from_millis(20)));
        assert!(t.elapsed() >= Duration::from_millis(20));
    }
}

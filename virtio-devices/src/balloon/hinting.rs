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
//!
//! A round may hold any number of ranges: the only limit is that they cannot overlap, so
//! together they name at most all of RAM. What a round keeps is bounded by RAM size too: the
//! pages seen so far are a bitmap ([`pages::RamPages`], 32 KiB per GiB), ranges wait for the
//! receiver in a list of at most [`QUEUED_RANGES_MAX`] and, past that, in a second bitmap.

mod pages;

use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use vm_memory::{GuestAddress, GuestMemoryBackend};

use pages::RamPages;

use super::state::HintingState;
use super::{
    BALLOON_PAGE_SHIFT, BALLOON_PAGE_SIZE, FREE_PAGE_HINT_CMD_ID_MIN, FREE_PAGE_HINT_CMD_ID_STOP,
};
use crate::sync::lock;
use crate::GuestMemoryMmap;

/// Ranges a round hands to its receiver as they came; ranges beyond this, not yet taken, are
/// kept as pages in a bitmap and handed over merged (16 bytes each: 1 MiB).
pub const QUEUED_RANGES_MAX: usize = 1 << 16;
/// Accepted ranges the device buffers before handing them to the round (64 KiB).
const PENDING_RANGES_MAX: usize = 4096;

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
    /// Rounds that ended without the driver's STOP (the host's time limit, a newer round,
    /// DONE or a reset came first), over all rounds.
    pub total_incomplete: u64,
}

#[derive(Debug, Default)]
struct RoundData {
    /// Ranges not taken yet, as they came (at most [`QUEUED_RANGES_MAX`]).
    ranges: Vec<HintRange>,
    /// Pages of later ranges not taken yet.
    overflow: Option<RamPages>,
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

    /// Take the ranges received since the last call. Normally they come as the driver sent
    /// them; if more than [`QUEUED_RANGES_MAX`] were waiting, the rest come merged per run of
    /// pages (the same pages either way).
    pub fn take_ranges(&self) -> Vec<HintRange> {
        let mut data = lock(&self.inner.data);
        let mut ranges = std::mem::take(&mut data.ranges);
        if let Some(mut overflow) = data.overflow.take() {
            overflow.drain_into(&mut ranges);
        }
        ranges
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

    /// Hand over accepted ranges; `layout` is an (empty or not) page set over guest RAM.
    fn push(&self, ranges: &mut Vec<HintRange>, pages: u64, layout: &RamPages) {
        let mut data = lock(&self.inner.data);
        let room = QUEUED_RANGES_MAX.saturating_sub(data.ranges.len());
        let rest = ranges.split_off(room.min(ranges.len()));
        data.ranges.append(ranges);
        for r in rest {
            data.overflow
                .get_or_insert_with(|| layout.empty_like())
                .insert(r.gpa, r.len);
        }
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
    /// Pages accepted in this round (made at its first hint).
    seen: Option<RamPages>,
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
    total_incomplete: u64,
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
        self.seen = None;
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
        self.seen = None;
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
        self.seen = None;
        self.state = HintState::Idle;
    }

    fn finish_round(&mut self, stopped: bool) {
        self.flush();
        if let Some(round) = self.round.take() {
            if !stopped {
                self.total_incomplete += 1;
            }
            round.finish(stopped);
        }
    }

    /// Hand buffered ranges to the round's receiver.
    pub(crate) fn flush(&mut self) {
        if self.pending.is_empty() {
            return;
        }
        match (&self.round, &self.seen) {
            (Some(round), Some(seen)) => round.push(&mut self.pending, self.pending_pages, seen),
            _ => self.pending.clear(),
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
        let seen = self.seen.get_or_insert_with(|| RamPages::for_memory(mem));
        match Self::validate(seen, mem, gpa, len) {
            Ok(()) => {
                seen.insert(gpa, len);
                let pages = len >> BALLOON_PAGE_SHIFT;
                self.pending.push(HintRange { gpa, len });
                self.pending_pages += pages;
                self.pages += pages;
                self.total_pages += pages;
                if self.pending.len() >= PENDING_RANGES_MAX {
                    self.flush();
                }
            }
            Err(why) => {
                log::debug!("balloon: hint {gpa:#x}+{len:#x} rejected: {why:?}");
                self.reject(1);
            }
        }
    }

    fn validate(
        seen: &RamPages,
        mem: &GuestMemoryMmap,
        gpa: u64,
        len: u64,
    ) -> Result<(), HintReject> {
        if len == 0 {
            return Err(HintReject::Empty);
        }
        if !gpa.is_multiple_of(BALLOON_PAGE_SIZE) || !len.is_multiple_of(BALLOON_PAGE_SIZE) {
            return Err(HintReject::Misaligned);
        }
        let ram = seen.ram_bytes();
        gpa.checked_add(len).ok_or(HintReject::TooLong)?;
        if len > ram {
            return Err(HintReject::TooLong);
        }
        let size = usize::try_from(len).map_err(|_| HintReject::TooLong)?;
        if !GuestMemoryBackend::check_range(mem, GuestAddress(gpa), size) || !seen.covers(gpa, len)
        {
            return Err(HintReject::OutsideRam);
        }
        if seen.any(gpa, len) {
            return Err(HintReject::Overlap);
        }
        Ok(())
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
            total_incomplete: self.total_incomplete,
        }
    }

    /// Copy the hint totals into `c`.
    pub(crate) fn fill_counters(&self, c: &mut super::BalloonCounters) {
        c.hint_rounds = self.rounds;
        c.hinted_pages = self.total_pages;
        c.hint_rejected = self.total_rejected;
        c.hint_ignored = self.total_ignored;
        c.hint_rounds_incomplete = self.total_incomplete;
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
            total_incomplete: self.total_incomplete,
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
            total_incomplete: s.total_incomplete,
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
    fn touching_ranges_are_accepted_and_overlaps_refused() {
        let mem = guest_memory(64 << 20);
        let mut e = HintEngine::default();
        let (id, round) = e.start_round();
        e.on_cmd_id(id);
        for block in [8, 0, 4, 12] {
            e.on_hint(&mem, block * MIB, 4 * MIB);
        }
        e.on_hint(&mem, 15 * MIB, 4096);
        e.on_hint(&mem, 0, 64 * MIB);
        assert_eq!(e.status().rejected, 2, "overlaps with earlier ranges");
        e.on_hint(&mem, 16 * MIB, 48 * MIB);
        assert_eq!(e.status().pages, 16 * 1024);
        e.flush();
        assert_eq!(round.take_ranges().len(), 5);
    }

    #[test]
    fn a_round_takes_any_number_of_ranges_in_bounded_memory() {
        // Every other page of 1 GiB: 131,072 ranges, twice what waits in the list.
        let mem = guest_memory(1 << 30);
        let mut e = HintEngine::default();
        let (id, round) = e.start_round();
        e.on_cmd_id(id);
        let n = 2 * QUEUED_RANGES_MAX as u64;
        for i in 0..n {
            e.on_hint(&mem, 2 * i * 4096, 4096);
            assert!(e.pending.len() < PENDING_RANGES_MAX);
        }
        e.on_cmd_id(FREE_PAGE_HINT_CMD_ID_STOP);
        assert!(round.is_stopped());
        assert_eq!(round.pages(), n);
        assert_eq!(lock(&round.inner.data).ranges.len(), QUEUED_RANGES_MAX);
        let ranges = round.take_ranges();
        assert_eq!(ranges.len() as u64, n, "no two of them touch: none merged");
        for (i, r) in ranges.iter().enumerate() {
            assert_eq!((r.gpa, r.len), (2 * i as u64 * 4096, 4096));
        }
        assert!(round.take_ranges().is_empty());
        let st = e.status();
        assert_eq!((st.pages, st.rejected, st.total_incomplete), (n, 0, 0));
    }

    #[test]
    fn overflowing_ranges_that_touch_come_merged() {
        let mem = guest_memory(1 << 30);
        let mut e = HintEngine::default();
        let (id, round) = e.start_round();
        e.on_cmd_id(id);
        let n = QUEUED_RANGES_MAX as u64 + 10;
        for i in 0..n {
            e.on_hint(&mem, i * 4096, 4096);
        }
        e.flush();
        let ranges = round.take_ranges();
        assert_eq!(ranges.len(), QUEUED_RANGES_MAX + 1);
        assert_eq!(
            ranges.last(),
            Some(&HintRange {
                gpa: QUEUED_RANGES_MAX as u64 * 4096,
                len: 10 * 4096
            })
        );
    }

    #[test]
    fn rounds_without_the_drivers_stop_are_counted_incomplete() {
        let mem = guest_memory(64 << 20);
        let mut e = HintEngine::default();
        let (id, _) = e.start_round();
        e.on_cmd_id(id);
        e.on_cmd_id(FREE_PAGE_HINT_CMD_ID_STOP);
        e.done();
        assert_eq!(e.status().total_incomplete, 0, "finished with STOP");
        let (id, round) = e.start_round();
        e.on_cmd_id(id);
        e.on_hint(&mem, 0, 4096);
        e.stop_by_device();
        assert!(round.is_finished() && !round.is_stopped());
        assert_eq!(
            round.take_ranges().len(),
            1,
            "what came before the limit counts"
        );
        e.start_round();
        e.start_round(); // supersedes the one before
        e.reset();
        let mut c = super::super::BalloonCounters::default();
        e.fill_counters(&mut c);
        assert_eq!(c.hint_rounds_incomplete, 3);
        let mut back = HintEngine::default();
        back.load(&e.save());
        assert_eq!(back.status().total_incomplete, 3);
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

//! What a migration being sent shows of itself while it runs (`GET vm.migration-progress`), and
//! the switch that cancels it (`PUT vm.migration-cancel`).
//!
//! The sending thread updates a [`MigrationProgress`] a few times per round (a mutex touched per
//! phase, per round and per batch of hints, never per page); the bytes of the round being
//! written come from the stream's [`StreamWatch`], an atomic counter bumped once per write call.
//! Every phase change is also written to the event monitor, if there is one.

use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use serde::Serialize;
use vm_migration::{MigrationReport, StreamWatch};

use crate::event_monitor;
use crate::vm::lock;

/// Where a migration being sent is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Phase {
    /// Connecting and sending the configuration.
    Setup,
    /// Waiting for the guest's free page hints.
    Hinting,
    /// Sending a round of memory (round 0 is all of RAM less hinted and zero pages).
    Round,
    /// The VM is paused: the last round and the device state.
    Stopped,
    /// The destination runs the guest.
    Completed,
    /// It failed; the VM runs on here.
    Failed,
    /// It was cancelled (by request or by `timeout_strategy=cancel`); the VM runs on here.
    Cancelled,
}

impl Phase {
    /// The name used in the progress JSON and the events.
    pub fn name(self) -> &'static str {
        match self {
            Phase::Setup => "setup",
            Phase::Hinting => "hinting",
            Phase::Round => "round",
            Phase::Stopped => "stopped",
            Phase::Completed => "completed",
            Phase::Failed => "failed",
            Phase::Cancelled => "cancelled",
        }
    }

    /// Whether the migration has ended.
    pub fn is_final(self) -> bool {
        matches!(self, Phase::Completed | Phase::Failed | Phase::Cancelled)
    }
}

/// The progress JSON (`GET vm.migration-progress` on the source).
#[derive(Clone, Debug, Default, Serialize)]
pub struct ProgressView {
    /// `setup`, `hinting`, `round`, `stopped`, `completed`, `failed` or `cancelled`.
    pub state: &'static str,
    /// The round being sent (0 is the first), or the number of rounds once it has ended.
    pub round: u32,
    /// Pages this round sends (hinted and zero pages already left out).
    pub round_pages_planned: u64,
    /// Bytes of page data this round sends.
    pub round_bytes_planned: u64,
    /// Bytes of this round written so far (page data and framing).
    pub round_bytes_sent: u64,
    /// Pages sent in the rounds acknowledged so far.
    pub pages_sent: u64,
    /// Page bytes sent in the rounds acknowledged so far.
    pub bytes_sent: u64,
    /// Everything written to the connection so far.
    pub wire_bytes: u64,
    /// Pages the guest hinted free so far.
    pub pages_hinted: u64,
    /// Hinted pages left out of round 0 (known once round 0 is built).
    pub pages_left_out: u64,
    /// All-zero pages not sent so far.
    pub zero_pages_skipped: u64,
    /// Bytes per second: the pace of the round being sent once it has run for 100 ms, else
    /// what the last round large enough to measure it (16 MiB) measured (1 GB/s is assumed
    /// before that; 0 before the first round).
    pub bandwidth_bytes_per_s: f64,
    /// Pages the guest dirtied per second, from the last dirty-log sync (0 until then).
    pub dirty_pages_per_s: f64,
    /// What stopping the VM now would cost, from the last sync and the bandwidth.
    pub downtime_estimate_ms: f64,
    /// The downtime target (`downtime_ms`).
    pub downtime_ms: u64,
    /// Since the request.
    pub elapsed_ms: f64,
    /// Time left for the current round and the final stop, when the bandwidth is known.
    pub eta_ms: Option<f64>,
    /// The final report (the JSON `send-migration` answered when it blocked), once completed.
    pub report: Option<MigrationReport>,
    /// Why it failed or was cancelled, one line.
    pub error: Option<String>,
}

/// How long a round runs before its own pace counts as the bandwidth, in seconds.
const LIVE_BANDWIDTH_AFTER: f64 = 0.1;

/// The migration may still be cancelled.
const RUNNING: u8 = 0;
/// It was cancelled.
const CANCELLED: u8 = 1;
/// The destination was told to take over: too late to cancel.
const COMMITTED: u8 = 2;

/// The shared progress of one migration being sent.
#[derive(Debug)]
pub struct MigrationProgress {
    started: Instant,
    watch: Arc<StreamWatch>,
    /// [`RUNNING`], [`CANCELLED`] or [`COMMITTED`].
    cancel: AtomicU8,
    view: Mutex<(Phase, ProgressView)>,
    /// `wire_bytes` when the current round started, and when.
    round_start: Mutex<(u64, Instant)>,
    /// A second handle on the connection, to end a read the sender is blocked in.
    connection: Mutex<Option<OwnedFd>>,
}

impl MigrationProgress {
    /// A migration starting now, aiming for `downtime_ms` of downtime.
    pub fn new(downtime_ms: u64) -> Self {
        let view = ProgressView {
            state: Phase::Setup.name(),
            downtime_ms,
            ..Default::default()
        };
        let progress = MigrationProgress {
            started: Instant::now(),
            watch: Arc::new(StreamWatch::default()),
            cancel: AtomicU8::new(RUNNING),
            view: Mutex::new((Phase::Setup, view)),
            round_start: Mutex::new((0, Instant::now())),
            connection: Mutex::new(None),
        };
        progress.event(Phase::Setup, 0);
        progress
    }

    /// The watch to put on the migration stream.
    pub fn watch(&self) -> Arc<StreamWatch> {
        self.watch.clone()
    }

    /// Gives the progress a handle on the connection (see [`MigrationProgress::cancel`]).
    pub fn set_connection(&self, connection: OwnedFd) {
        *lock(&self.connection) = Some(connection);
    }

    /// Drops the handle on the connection (the sender is done with it), so that closing the
    /// stream closes the connection.
    pub fn clear_connection(&self) {
        lock(&self.connection).take();
    }

    /// Asks the sender to stop: later writes fail at once, a read it waits in (a round's
    /// acknowledgement) ends, and it stops at its next check (between rounds, during the hint
    /// wait). Writing stays possible, so a sender between two requests still tells the
    /// destination with Abandon. False when it is too late: the destination was told to take
    /// over ([`MigrationProgress::commit`]).
    pub fn cancel(&self) -> bool {
        let swap =
            self.cancel
                .compare_exchange(RUNNING, CANCELLED, Ordering::SeqCst, Ordering::SeqCst);
        if matches!(swap, Err(COMMITTED)) {
            return false;
        }
        self.watch.stop();
        if let Some(fd) = lock(&self.connection).as_ref() {
            // SAFETY: shutdown on a descriptor this struct owns; it changes no memory.
            unsafe { libc::shutdown(fd.as_raw_fd(), libc::SHUT_RD) };
        }
        true
    }

    /// Whether [`MigrationProgress::cancel`] succeeded.
    pub fn is_cancelled(&self) -> bool {
        self.cancel.load(Ordering::SeqCst) == CANCELLED
    }

    /// The sender is about to tell the destination to run the guest: from here on a cancel is
    /// refused. False when it was cancelled first.
    pub fn commit(&self) -> bool {
        let swap =
            self.cancel
                .compare_exchange(RUNNING, COMMITTED, Ordering::SeqCst, Ordering::SeqCst);
        swap.is_ok()
    }

    /// The phase now.
    pub fn phase(&self) -> Phase {
        lock(&self.view).0
    }

    fn event(&self, phase: Phase, round: u32) {
        let mut props = serde_json::Map::new();
        props.insert("role".into(), "source".into());
        if phase == Phase::Round {
            props.insert("round".into(), round.to_string().into());
        }
        event_monitor::emit(
            "vm",
            &format!("migration-{}", phase.name()),
            Some(serde_json::Value::Object(props)),
        );
    }

    fn update(&self, f: impl FnOnce(&mut ProgressView)) {
        f(&mut lock(&self.view).1);
    }

    /// Moves to `phase` (each new round counts as a change); writes an event.
    pub fn enter(&self, phase: Phase) {
        let round = {
            let mut guard = lock(&self.view);
            let (current, view) = &mut *guard;
            if current.is_final() {
                return;
            }
            if phase == Phase::Round && *current == Phase::Round {
                view.round += 1;
            }
            *current = phase;
            view.state = phase.name();
            view.round
        };
        self.event(phase, round);
    }

    /// Hints arrived (per batch).
    pub fn hinted(&self, pages: u64) {
        self.update(|v| v.pages_hinted += pages);
    }

    /// Round 0 was built: how many hinted pages it leaves out.
    pub fn left_out(&self, pages: u64) {
        self.update(|v| v.pages_left_out = pages);
    }

    /// A round starts (the phase is already [`Phase::Round`] or [`Phase::Stopped`]).
    pub fn round_planned(&self, pages: u64, zero_pages_skipped: u64) {
        *lock(&self.round_start) = (self.watch.bytes_written(), Instant::now());
        self.update(|v| {
            v.round_pages_planned = pages;
            v.round_bytes_planned = pages * 4096;
            v.zero_pages_skipped = zero_pages_skipped;
        });
    }

    /// A round was acknowledged; the totals so far.
    pub fn round_done(&self, pages_sent: u64, bytes_sent: u64, bandwidth: f64) {
        self.update(|v| {
            v.pages_sent = pages_sent;
            v.bytes_sent = bytes_sent;
            v.bandwidth_bytes_per_s = bandwidth;
        });
    }

    /// A dirty-log sync found `dirty_pages` written over `secs`; stopping now would take
    /// `estimate_ms`.
    pub fn synced(&self, dirty_pages: u64, secs: f64, estimate_ms: f64) {
        self.update(|v| {
            if secs > 0.0 {
                v.dirty_pages_per_s = dirty_pages as f64 / secs;
            }
            v.downtime_estimate_ms = estimate_ms;
        });
    }

    /// The migration ended: completed with `report`, or with the error (`cancelled` when it was
    /// cancelled).
    pub fn finish(&self, result: Result<&MigrationReport, (bool, String)>) {
        let phase = {
            let mut guard = lock(&self.view);
            let (current, view) = &mut *guard;
            let phase = match result {
                Ok(report) => {
                    view.report = Some(report.clone());
                    view.round = report.rounds;
                    view.pages_sent = report.pages_sent;
                    view.bytes_sent = report.bytes_sent;
                    view.zero_pages_skipped = report.zero_pages_skipped;
                    Phase::Completed
                }
                Err((cancelled, why)) => {
                    view.error = Some(why);
                    if cancelled {
                        Phase::Cancelled
                    } else {
                        Phase::Failed
                    }
                }
            };
            *current = phase;
            view.state = phase.name();
            view.elapsed_ms = self.started.elapsed().as_secs_f64() * 1000.0;
            view.eta_ms = Some(0.0);
            phase
        };
        self.event(phase, 0);
    }

    /// The progress JSON now.
    pub fn view(&self) -> ProgressView {
        let (phase, mut view) = lock(&self.view).clone();
        let wire = self.watch.bytes_written();
        view.wire_bytes = wire;
        if phase.is_final() {
            return view;
        }
        let (round_start, round_started) = *lock(&self.round_start);
        view.round_bytes_sent = wire.saturating_sub(round_start);
        view.elapsed_ms = self.started.elapsed().as_secs_f64() * 1000.0;
        // Within a round, its own pace so far (once it has run for a moment) is the better guess.
        let secs = round_started.elapsed().as_secs_f64();
        if phase == Phase::Round && secs >= LIVE_BANDWIDTH_AFTER && view.round_bytes_sent > 0 {
            view.bandwidth_bytes_per_s = view.round_bytes_sent as f64 / secs;
        }
        if matches!(phase, Phase::Round | Phase::Stopped) && view.bandwidth_bytes_per_s > 0.0 {
            let left = view
                .round_bytes_planned
                .saturating_sub(view.round_bytes_sent);
            let round_ms = left as f64 / view.bandwidth_bytes_per_s * 1000.0;
            view.eta_ms = Some(round_ms + view.downtime_estimate_ms);
        }
        view
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn phases_rounds_and_the_end() {
        let p = MigrationProgress::new(300);
        assert_eq!(p.view().state, "setup");
        p.enter(Phase::Hinting);
        p.hinted(10);
        p.hinted(5);
        assert_eq!(p.view().pages_hinted, 15);
        p.enter(Phase::Round);
        assert_eq!(p.view().round, 0);
        p.round_planned(100, 7);
        p.round_done(100, 409_600, 1e9);
        p.enter(Phase::Round);
        let v = p.view();
        assert_eq!((v.state, v.round, v.zero_pages_skipped), ("round", 1, 7));
        assert_eq!(v.round_bytes_planned, 409_600);
        assert!(v.eta_ms.is_some());
        p.enter(Phase::Stopped);
        let report = MigrationReport {
            rounds: 3,
            ..Default::default()
        };
        p.finish(Ok(&report));
        let v = p.view();
        assert_eq!((v.state, v.round), ("completed", 3));
        assert_eq!(v.report.map(|r| r.rounds), Some(3));
        // Nothing moves it out of a final phase.
        p.enter(Phase::Round);
        assert_eq!(p.phase(), Phase::Completed);
    }

    #[test]
    fn a_committed_migration_cannot_be_cancelled() {
        let p = MigrationProgress::new(300);
        assert!(p.commit());
        assert!(!p.cancel());
        assert!(!p.is_cancelled() && !p.watch().is_stopped());
    }

    #[test]
    fn cancel_stops_the_stream_and_ends_cancelled() {
        let p = MigrationProgress::new(300);
        let watch = p.watch();
        assert!(!p.is_cancelled() && !watch.is_stopped());
        assert!(p.cancel());
        assert!(p.is_cancelled() && watch.is_stopped());
        assert!(!p.commit(), "a cancelled migration cannot commit");
        p.finish(Err((true, "cancelled by request".into())));
        let v = p.view();
        assert_eq!(v.state, "cancelled");
        assert_eq!(v.error.as_deref(), Some("cancelled by request"));
    }
}

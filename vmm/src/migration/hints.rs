//! Where free page hints come from during a migration (the VM's virtio-balloon, seen through two
//! small traits so the send path does not depend on the device's internals), how long a round
//! is waited for, and why hints were not used when they were not.
//!
//! A round ends at the first of:
//!
//! ```text
//!  request ──▶ hints … hints … STOP                      → stopped (all hints used)
//!  request ──▶ hints … hints …  (HINT_IDLE, nothing new) → the guest stopped hinting
//!  request ──▶ hints … hints … hints … │ hint_wait_ms    → timed out (what came is used)
//! ```
//!
//! The stock Linux driver allocates (and, with `init_on_alloc=1`, zeroes) each 4 MiB block it
//! hints, so a round of a large guest takes seconds; a fixed one-second wait cut it short. The
//! wait now follows the guest's progress instead, with `hint_wait_ms` only as the upper bound.

use std::time::{Duration, Instant};

use thiserror::Error;
use vm_migration::HintMode;

/// How long a round may go without a new hint before the guest counts as done.
///
/// 500 ms is over four times the slowest pace measured (the nested lab: a stock Debian driver
/// with `init_on_alloc=1` under emulated guest ring 0, about 110 ms per zeroed 4 MiB block),
/// and a guest that never answers costs half a second instead of the whole `hint_wait_ms`.
pub const HINT_IDLE: Duration = Duration::from_millis(500);
/// Once hints flow, a round ends after this many times the longest gap seen between two
/// batches without a new one (see [`HintWait::run`]), if that is longer than [`HINT_IDLE`].
const IDLE_GAPS: u32 = 3;

/// The longest single wait for the driver's STOP before looking at new hints again.
const POLL: Duration = Duration::from_millis(5);

/// A hint round requested from the guest's driver.
pub trait HintSource {
    /// The round's command id (>= 2).
    fn cmd_id(&self) -> u32;
    /// The (gpa, length) ranges reported since the last call, already checked by the device.
    fn take_ranges(&mut self) -> Vec<(u64, u64)>;
    /// Waits up to `timeout` for the driver's STOP; true once it came.
    fn wait_stopped(&self, timeout: Duration) -> bool;
    /// Whether no more hints will come (STOP, or the device ended the round).
    fn is_finished(&self) -> bool;
}

/// Why no hint round runs (the `hints.reason` of the migration report, and the answer of
/// `vm.balloon-hints` when a round cannot start).
#[derive(Clone, Debug, Error, PartialEq, Eq)]
pub enum HintsUnavailable {
    /// `free_page_hints=off`.
    #[error("disabled by request")]
    DisabledByRequest,
    /// The VM has no virtio-balloon.
    #[error("no balloon device")]
    NoBalloon,
    /// The guest's driver did not accept FREE_PAGE_HINT (or has not loaded).
    #[error("not negotiated by the driver")]
    NotNegotiated,
    /// The driver has not started the device (DRIVER_OK).
    #[error("device not active")]
    NotActive,
    /// The driver did not enable the free page queue.
    #[error("hint queue not enabled")]
    QueueNotEnabled,
    /// The user paused the VM: its driver cannot answer a round.
    #[error("the VM is paused, so its driver cannot answer")]
    VmPaused,
    /// Local migration hands memory over: there is nothing to leave out.
    #[error("not needed in local mode")]
    LocalMode,
    /// Anything else that kept the round from starting.
    #[error("round could not start: {0}")]
    Other(String),
}

/// Something that can ask the guest for free page hints.
pub trait FreePageHinter {
    /// Which protocol the driver negotiated ([`HintMode::None`]: no hinting).
    fn mode(&self) -> HintMode;
    /// Why a round cannot start now, if it cannot.
    fn unavailable(&self) -> Option<HintsUnavailable>;
    /// Writes a fresh command id and raises a config interrupt.
    fn start_round(&self) -> Result<Box<dyn HintSource>, HintsUnavailable>;
    /// Tells the driver to stop hinting (STOP in the config id).
    fn stop_round(&self);
    /// Tells the driver to give back the blocks it holds (DONE in the config id).
    fn done(&self);
}

/// Time as the wait sees it: real in the VMM, scripted in tests.
pub trait Clock {
    /// Time since some fixed origin.
    fn now(&self) -> Duration;
}

/// The monotonic clock, from when it was made.
pub struct MonotonicClock(Instant);

impl MonotonicClock {
    /// A clock starting now.
    pub fn new() -> Self {
        MonotonicClock(Instant::now())
    }
}

impl Default for MonotonicClock {
    fn default() -> Self {
        Self::new()
    }
}

impl Clock for MonotonicClock {
    fn now(&self) -> Duration {
        self.0.elapsed()
    }
}

/// How a round's wait ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RoundEnd {
    /// The driver sent STOP.
    Stopped,
    /// The device ended the round without the driver's STOP (reset, a newer round).
    EndedByDevice,
    /// No new hint for [`HintWait::idle`]; the last came this long after the request.
    Idle {
        /// When the last hint arrived (`None`: none did).
        last_hint: Option<Duration>,
    },
    /// The limit (`hint_wait_ms`) ran out while hints were still coming.
    TimedOut {
        /// The limit.
        limit: Duration,
    },
}

/// The end of a round and how long it was waited for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RoundOutcome {
    /// Why it ended.
    pub end: RoundEnd,
    /// From the request to the end of the wait.
    pub waited: Duration,
}

impl RoundOutcome {
    /// Whether the driver still hints: the caller should write STOP.
    pub fn needs_stop(&self) -> bool {
        matches!(self.end, RoundEnd::Idle { .. } | RoundEnd::TimedOut { .. })
    }

    /// Why the round's hints were not (all) used, given how many pages it hinted; `None` when
    /// the driver finished the round normally.
    pub fn reason(&self, pages_hinted: u64) -> Option<String> {
        let ms = |d: Duration| d.as_millis();
        match self.end {
            RoundEnd::TimedOut { limit } => Some(format!("round timed out after {} ms", ms(limit))),
            _ if pages_hinted == 0 => Some("guest sent no hints".into()),
            RoundEnd::Stopped => None,
            RoundEnd::EndedByDevice => Some("device ended the round before STOP".into()),
            RoundEnd::Idle { last_hint } => Some(format!(
                "guest stopped hinting after {} ms",
                ms(last_hint.unwrap_or(self.waited))
            )),
        }
    }
}

/// How long to wait for a round: until STOP, until the guest makes no progress for `idle`,
/// and never longer than `limit`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HintWait {
    /// The upper bound (`hint_wait_ms`).
    pub limit: Duration,
    /// How long without a new hint ends the round ([`HINT_IDLE`]).
    pub idle: Duration,
}

impl HintWait {
    /// Waits up to `limit` with the default idle interval.
    pub fn new(limit: Duration) -> Self {
        HintWait {
            limit,
            idle: HINT_IDLE,
        }
    }

    /// The idle interval for a guest whose hints came as much as `gap` apart: a guest that
    /// hints slowly but steadily (a busy host, a guest zeroing every block it hints) is given
    /// three of its own gaps, between `idle` and four times `idle`.
    fn idle_for_gap(&self, gap: Duration) -> Duration {
        (gap * IDLE_GAPS).clamp(self.idle, self.idle * 4)
    }

    /// Waits for `source`'s round to end, passing every batch of hints to `on_hints` as it
    /// arrives. `clock` starts at the request.
    pub fn run(
        &self,
        source: &mut dyn HintSource,
        clock: &dyn Clock,
        mut on_hints: impl FnMut(Vec<(u64, u64)>),
    ) -> RoundOutcome {
        let start = clock.now();
        let mut last_progress = start;
        let mut last_hint = None;
        let mut idle = self.idle;
        loop {
            let now = clock.now();
            let deadline = (start + self.limit).min(last_progress + idle);
            let stopped = source.wait_stopped(deadline.saturating_sub(now).min(POLL));
            // Read before taking the hints: a finished round has handed over all of its own,
            // so none can arrive after the last take. STOP may have come just after the wait.
            let finished = stopped || source.is_finished();
            let hints = source.take_ranges();
            let now = clock.now();
            if !hints.is_empty() {
                if last_hint.is_some() {
                    idle = idle.max(self.idle_for_gap(now - last_progress));
                }
                last_progress = now;
                last_hint = Some(now - start);
                on_hints(hints);
            }
            let end = if finished {
                if stopped || source.wait_stopped(Duration::ZERO) {
                    Some(RoundEnd::Stopped)
                } else {
                    Some(RoundEnd::EndedByDevice)
                }
            } else if now >= start + self.limit {
                Some(RoundEnd::TimedOut { limit: self.limit })
            } else if now >= last_progress + idle {
                Some(RoundEnd::Idle { last_hint })
            } else {
                None
            };
            if let Some(end) = end {
                return RoundOutcome {
                    end,
                    waited: now - start,
                };
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::cell::{Cell, RefCell};
    use std::rc::Rc;

    use super::*;

    /// A clock the fake source moves forward.
    #[derive(Clone, Default)]
    struct FakeClock(Rc<Cell<Duration>>);

    impl Clock for FakeClock {
        fn now(&self) -> Duration {
            self.0.get()
        }
    }

    /// What the fake driver does at a time after the request.
    enum Step {
        Hint(u64),
        Stop,
        Vanish,
    }

    #[derive(Default)]
    struct Played {
        next: usize,
        ready: Vec<(u64, u64)>,
        stopped: bool,
        finished: bool,
    }

    /// A driver that follows a script; waiting moves the fake clock to the next step (or the
    /// timeout) and plays what is due, as a device would have received it.
    struct ScriptedSource {
        clock: FakeClock,
        script: Vec<(Duration, Step)>,
        played: RefCell<Played>,
    }

    impl HintSource for ScriptedSource {
        fn cmd_id(&self) -> u32 {
            2
        }

        fn take_ranges(&mut self) -> Vec<(u64, u64)> {
            std::mem::take(&mut self.played.borrow_mut().ready)
        }

        fn wait_stopped(&self, timeout: Duration) -> bool {
            let mut p = self.played.borrow_mut();
            let now = self.clock.now();
            let wake = match self.script.get(p.next) {
                Some((at, _)) if *at < now + timeout => (*at).max(now),
                _ => now + timeout,
            };
            self.clock.0.set(wake);
            while let Some((at, step)) = self.script.get(p.next) {
                if *at > wake {
                    break;
                }
                match step {
                    Step::Hint(gpa) => p.ready.push((*gpa << 22, 4 << 20)),
                    Step::Stop => {
                        p.stopped = true;
                        p.finished = true;
                    }
                    Step::Vanish => p.finished = true,
                }
                p.next += 1;
            }
            p.stopped
        }

        fn is_finished(&self) -> bool {
            self.played.borrow().finished
        }
    }

    /// Runs a script (steps at milliseconds after the request) through a wait of `limit_ms`
    /// with the default idle interval; returns the outcome and the hints handed over.
    fn run(limit_ms: u64, script: Vec<(u64, Step)>) -> (RoundOutcome, Vec<(u64, u64)>) {
        let clock = FakeClock::default();
        let mut source = ScriptedSource {
            clock: clock.clone(),
            script: script
                .into_iter()
                .map(|(ms, s)| (Duration::from_millis(ms), s))
                .collect(),
            played: RefCell::default(),
        };
        let mut got = Vec::new();
        let outcome =
            HintWait::new(Duration::from_millis(limit_ms))
                .run(&mut source, &clock, |h| got.extend(h));
        (outcome, got)
    }

    const MS: fn(u64) -> Duration = Duration::from_millis;

    /// A driver whose last hints and STOP land just after a wait gave up: between the wait and
    /// the next look at the round.
    #[derive(Default)]
    struct LateStop {
        ready: RefCell<Vec<(u64, u64)>>,
        stopped: Cell<bool>,
    }

    impl HintSource for LateStop {
        fn cmd_id(&self) -> u32 {
            2
        }

        fn take_ranges(&mut self) -> Vec<(u64, u64)> {
            self.ready.take()
        }

        fn wait_stopped(&self, _: Duration) -> bool {
            if !self.stopped.get() {
                self.ready.borrow_mut().push((1 << 22, 4 << 20));
                return false;
            }
            true
        }

        fn is_finished(&self) -> bool {
            if !self.stopped.get() {
                self.ready.borrow_mut().push((2 << 22, 4 << 20));
                self.stopped.set(true);
            }
            true
        }
    }

    #[test]
    fn a_stop_just_after_a_wait_counts_as_stop_and_keeps_the_last_hints() {
        let clock = FakeClock::default();
        let mut got = Vec::new();
        let outcome =
            HintWait::new(MS(1000)).run(&mut LateStop::default(), &clock, |h| got.extend(h));
        assert_eq!(outcome.end, RoundEnd::Stopped);
        assert_eq!(got, vec![(1 << 22, 4 << 20), (2 << 22, 4 << 20)]);
        assert_eq!(outcome.reason(2048), None);
    }

    #[test]
    fn a_slow_but_steady_guest_is_waited_for_until_stop() {
        // A block every 110 ms (the nested lab's pace) for 3 s, far past the old 1 s limit.
        let mut script: Vec<(u64, Step)> = (1..=27).map(|i| (i * 110, Step::Hint(i))).collect();
        script.push((3000, Step::Stop));
        let (outcome, got) = run(10_000, script);
        assert_eq!(outcome.end, RoundEnd::Stopped);
        assert_eq!(outcome.waited, MS(3000));
        assert_eq!(got.len(), 27);
        assert_eq!(outcome.reason(27 * 1024), None);
        assert!(!outcome.needs_stop());
    }

    #[test]
    fn a_guest_that_never_answers_ends_after_the_idle_interval() {
        let (outcome, got) = run(10_000, vec![]);
        assert_eq!(outcome.end, RoundEnd::Idle { last_hint: None });
        assert_eq!(outcome.waited, HINT_IDLE);
        assert!(got.is_empty());
        assert!(outcome.needs_stop());
        assert_eq!(outcome.reason(0).as_deref(), Some("guest sent no hints"));
    }

    #[test]
    fn a_guest_that_stops_sending_without_stop_ends_an_idle_interval_later() {
        // Batches 200 ms apart: the interval is three gaps (600 ms), more than HINT_IDLE.
        let script = vec![(100, Step::Hint(1)), (300, Step::Hint(2))];
        let (outcome, got) = run(10_000, script);
        assert_eq!(
            outcome.end,
            RoundEnd::Idle {
                last_hint: Some(MS(300))
            }
        );
        assert_eq!(outcome.waited, MS(900));
        assert_eq!(got.len(), 2);
        assert_eq!(
            outcome.reason(2048).as_deref(),
            Some("guest stopped hinting after 300 ms")
        );
    }

    #[test]
    fn a_slow_but_steady_guest_gets_three_of_its_gaps() {
        // Batches 400 ms apart (a guest zeroing each block on a busy host): a 400 ms pause is
        // not the end; 1200 ms without a batch is.
        let script = vec![
            (100, Step::Hint(1)),
            (500, Step::Hint(2)),
            (900, Step::Hint(3)),
        ];
        let (outcome, got) = run(10_000, script);
        assert_eq!(
            outcome.end,
            RoundEnd::Idle {
                last_hint: Some(MS(900))
            }
        );
        assert_eq!(outcome.waited, MS(2100));
        assert_eq!(got.len(), 3);
        // Never more than four idle intervals, however slow.
        let script = vec![
            (100, Step::Hint(1)),
            (550, Step::Hint(2)),
            (1800, Step::Hint(3)),
        ];
        let (outcome, _) = run(10_000, script);
        assert_eq!(outcome.waited, MS(1800) + HINT_IDLE * 4);
    }

    #[test]
    fn the_limit_ends_a_round_that_still_makes_progress() {
        let script: Vec<(u64, Step)> = (1..=100).map(|i| (i * 100, Step::Hint(i))).collect();
        let (outcome, got) = run(1_000, script);
        assert_eq!(outcome.end, RoundEnd::TimedOut { limit: MS(1000) });
        assert_eq!(outcome.waited, MS(1000));
        // Every hint up to the limit is kept.
        assert_eq!(got.len(), 10);
        assert!(outcome.needs_stop());
        assert_eq!(
            outcome.reason(10 * 1024).as_deref(),
            Some("round timed out after 1000 ms")
        );
    }

    #[test]
    fn stop_without_hints_and_a_vanished_round_say_so() {
        let (outcome, _) = run(10_000, vec![(50, Step::Stop)]);
        assert_eq!(outcome.end, RoundEnd::Stopped);
        assert_eq!(outcome.reason(0).as_deref(), Some("guest sent no hints"));
        let (outcome, got) = run(10_000, vec![(50, Step::Hint(1)), (60, Step::Vanish)]);
        assert_eq!(outcome.end, RoundEnd::EndedByDevice);
        assert_eq!(got.len(), 1);
        assert!(!outcome.needs_stop());
        assert!(outcome.reason(1024).is_some());
    }

    #[test]
    fn unavailable_reasons_are_the_documented_strings() {
        for (why, text) in [
            (HintsUnavailable::DisabledByRequest, "disabled by request"),
            (HintsUnavailable::NoBalloon, "no balloon device"),
            (
                HintsUnavailable::NotNegotiated,
                "not negotiated by the driver",
            ),
            (HintsUnavailable::NotActive, "device not active"),
            (HintsUnavailable::QueueNotEnabled, "hint queue not enabled"),
        ] {
            assert_eq!(why.to_string(), text);
        }
    }
}

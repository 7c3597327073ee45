//! The sending side of a live migration.
//!
//! Order matters for guest data (see `free-page-hinting.md`, section 3): dirty logging starts
//! first, only then are hints requested, and hints only ever shrink round 0 (all of RAM),
//! computed before the request. Every later round is a dirty-log sync, which includes any
//! hinted page the guest wrote after hinting it.

use std::time::{Duration, Instant};

use vm_migration::protocol::{self, Command};
use vm_migration::report::duration_ms;
use vm_migration::{
    send_memory, CountingStream, DirtyLoggingStarted, DirtyRound, DirtySink, HintRound,
    HintsReport, LastRound, MemoryRange, MemoryRangeTable, MigrationReport, MigrationStream,
    MigrationUrl, RamRegions, Response, ZeroPageFilter,
};

use super::dirty::DirtyTracker;
use super::hints::{FreePageHinter, HintWait, HintsUnavailable, MonotonicClock, RoundEnd};
use super::MigrationError;
use crate::config::SendMigrationData;
use crate::memory::GuestMemoryMmap;
use crate::vm::{Vm, VmState};

/// How long to wait for the destination to accept the connection.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long any single read or write on the connection may block.
const IO_TIMEOUT: Duration = Duration::from_secs(60);
/// Pre-copy rounds after round 0 before the VM is paused whatever the estimate says.
const MAX_DIRTY_ROUNDS: u32 = 30;
/// Bandwidth assumed before the first round has measured one (bytes per second).
const INITIAL_BANDWIDTH: f64 = 1e9;

/// Migrates `vm` to the destination in `data`. On success the destination runs the guest and
/// the caller should stop this VM; on failure the VM is running again here, memory intact.
pub fn send_migration(
    vm: &mut Vm,
    data: &SendMigrationData,
    hinter: Option<&dyn FreePageHinter>,
) -> Result<MigrationReport, MigrationError> {
    if vm.state() != VmState::Running {
        return Err(MigrationError::NotRunning);
    }
    let start = Instant::now();
    let url: MigrationUrl = data.destination_url.parse().map_err(MigrationError::Url)?;
    if data.local {
        if !matches!(url, MigrationUrl::Unix(_)) {
            return Err(MigrationError::LocalNeedsUnixSocket);
        }
        if !vm.config().memory.shared {
            return Err(MigrationError::LocalNeedsSharedMemory);
        }
    }
    let stream = MigrationStream::connect(&url, CONNECT_TIMEOUT, Some(IO_TIMEOUT))
        .map_err(MigrationError::Transport)?;
    let mut sender = Sender {
        vm,
        stream: CountingStream::new(stream),
        report: MigrationReport::default(),
        bandwidth: INITIAL_BANDWIDTH,
        logging: false,
        paused: false,
        hints_held: false,
        hinter,
        dirty: DirtyTracker::default(),
    };
    match sender.run(data, start) {
        Ok(()) => Ok(sender.report),
        Err(e) => {
            sender.abort();
            Err(e)
        }
    }
}

/// How long the parts of one round took.
struct RoundTimes {
    /// Writing the round and waiting for its acknowledgement (the zero scan excluded).
    send_ms: f64,
}

struct Sender<'a, 'h> {
    vm: &'a mut Vm,
    stream: CountingStream<MigrationStream>,
    report: MigrationReport,
    /// Measured by the last round, bytes per second.
    bandwidth: f64,
    logging: bool,
    paused: bool,
    /// The guest's driver may hold hinted blocks until it hears DONE.
    hints_held: bool,
    hinter: Option<&'h dyn FreePageHinter>,
    /// Reads the dirty log; set up when logging starts.
    dirty: DirtyTracker,
}

impl Sender<'_, '_> {
    fn request(&mut self, command: Command, payload: &[u8]) -> Result<(), MigrationError> {
        protocol::request(&mut self.stream, command, payload).map_err(MigrationError::Protocol)
    }

    fn run(&mut self, data: &SendMigrationData, start: Instant) -> Result<(), MigrationError> {
        let memory = self.vm.memory().clone();
        self.report.memory_bytes = crate::memory::ram_size(&memory);
        self.request(Command::Start, &[])?;
        let config =
            serde_json::to_vec(self.vm.config()).map_err(|e| MigrationError::Json("config", e))?;
        self.request(Command::Config, &config)?;
        self.report.phases.setup_ms = duration_ms(start.elapsed());

        if data.local {
            self.report.hints = HintsReport::unused(HintsUnavailable::LocalMode.to_string());
            self.send_memory_files(&memory)?;
            self.pause()?;
        } else {
            self.precopy(&memory, data, start)?;
        }
        let pause_at = Instant::now();
        let snapshot = self.vm.snapshot().map_err(MigrationError::Vm)?;
        let state = serde_json::to_vec(&snapshot).map_err(|e| MigrationError::Json("state", e))?;
        self.request(Command::State, &state)?;
        self.report.downtime_breakdown.state_ms = duration_ms(pause_at.elapsed());
        let complete_at = Instant::now();
        self.request(Command::Complete, &[])?;
        // The destination now owns the guest, and the hinted blocks with it.
        self.hints_held = false;
        self.report.downtime_breakdown.complete_ms = duration_ms(complete_at.elapsed());
        self.report.downtime_ms += duration_ms(pause_at.elapsed());
        self.report.phases.stopped_ms = self.report.downtime_ms;
        self.report.total_ms = duration_ms(start.elapsed());
        self.report.wire_bytes = self.stream.bytes_written();
        Ok(())
    }

    fn pause(&mut self) -> Result<(), MigrationError> {
        self.vm.pause().map_err(MigrationError::Vm)?;
        self.paused = true;
        Ok(())
    }

    /// Local mode: hand the guest memory files to the destination; nothing is copied.
    fn send_memory_files(&mut self, memory: &GuestMemoryMmap) -> Result<(), MigrationError> {
        use std::os::fd::AsFd;
        use vm_memory::{Address, GuestMemoryBackend, GuestMemoryRegion};
        let mut regions = Vec::new();
        for region in memory.iter() {
            let file = region
                .file_offset()
                .ok_or(MigrationError::LocalNeedsSharedMemory)?;
            regions.push(protocol::MemoryFdRegion {
                gpa: region.start_addr().raw_value(),
                size: region.len(),
                offset: file.start(),
                fd: file.file().as_fd(),
            });
        }
        let socket = self
            .stream
            .get_ref()
            .as_unix()
            .ok_or(MigrationError::LocalNeedsUnixSocket)?;
        let n = protocol::send_memory_fds(socket, &regions).map_err(MigrationError::Protocol)?;
        self.stream.record_written(n);
        Response::read_from(&mut self.stream)
            .and_then(Response::into_result)
            .map_err(MigrationError::Protocol)
    }

    fn precopy(
        &mut self,
        memory: &GuestMemoryMmap,
        data: &SendMigrationData,
        start: Instant,
    ) -> Result<(), MigrationError> {
        let ram = RamRegions::from_guest_memory(memory).map_err(MigrationError::Ram)?;
        // 1. Dirty logging first: from here on every guest write shows up in a later sync.
        let phase = Instant::now();
        self.vm.start_dirty_log().map_err(MigrationError::Vm)?;
        self.logging = true;
        self.dirty = DirtyTracker::new(self.vm);
        self.report.downtime_breakdown.dirty_log = DirtyTracker::kind_name(self.vm).into();
        self.report.phases.dirty_log_start_ms = duration_ms(phase.elapsed());
        // 2. Only then ask for hints, and apply them to round 0 (all of RAM).
        let mut round0 = HintRound::new(&ram, DirtyLoggingStarted::confirm());
        let hinter = match self.hinter {
            _ if !data.free_page_hints => Err(HintsUnavailable::DisabledByRequest),
            None => Err(HintsUnavailable::NoBalloon),
            Some(h) => Ok(h),
        };
        self.report.hints = match hinter {
            Ok(hinter) => self.collect_hints(
                hinter,
                &mut round0,
                HintWait::new(Duration::from_millis(data.hint_wait_ms)),
            ),
            Err(why) => HintsReport::unused(why.to_string()),
        };
        self.report.phases.hints_ms = self.report.hints.wait_ms;
        let phase = Instant::now();
        let round0 = round0.finish().map_err(MigrationError::Round)?;
        let mut zero = data.zero_pages.then(|| ZeroPageFilter::new(&ram));
        // 3. Round 0.
        let build_ms = self.send_round(memory, round0.table, zero.as_mut())?;
        self.report.phases.round0_build_ms = duration_ms(phase.elapsed()) - build_ms.send_ms;
        self.report.phases.round0_send_ms = build_ms.send_ms;
        let phase = Instant::now();

        // 4. Dirty rounds until the rest fits the downtime budget, or time is up.
        let deadline = start + Duration::from_secs(data.timeout_s);
        let mut dirty_rounds = 0;
        let pending = loop {
            let round = self.sync(&ram)?;
            let estimate_ms = round.dirty_pages() as f64 * 4096.0 / self.bandwidth * 1000.0;
            if estimate_ms <= data.downtime_ms as f64
                || dirty_rounds >= MAX_DIRTY_ROUNDS
                || Instant::now() >= deadline
            {
                break round;
            }
            self.send_round(
                memory,
                round.into_table().map_err(MigrationError::Round)?,
                zero.as_mut(),
            )?;
            dirty_rounds += 1;
        };
        self.report.phases.dirty_rounds_ms = duration_ms(phase.elapsed());
        // 5. Pause; what was written since the last sync joins the last round (whose table is
        // made before the pause, so that the paused part costs what was written, not RAM size).
        let mut last = LastRound::new(&ram, pending.into_table().map_err(MigrationError::Round)?);
        let pause_at = Instant::now();
        self.pause()?;
        let step = Instant::now();
        self.report.downtime_breakdown.pause_ms = duration_ms(pause_at.elapsed());
        self.dirty.final_sync(self.vm, &mut last)?;
        let last = last.into_table().map_err(MigrationError::Round)?;
        self.report.downtime_breakdown.final_sync_ms = duration_ms(step.elapsed());
        self.report.downtime_breakdown.last_round_pages = last.total_pages();
        let step = Instant::now();
        self.send_round(memory, last, zero.as_mut())?;
        self.report.downtime_breakdown.last_round_ms = duration_ms(step.elapsed());
        // The downtime so far; the state transfer adds to it in `run`.
        self.report.downtime_ms = duration_ms(pause_at.elapsed());
        Ok(())
    }

    /// Asks the guest for hints and applies them to round 0 as they arrive, for as long as
    /// `wait` says; the report says why hints were not (all) used.
    fn collect_hints(
        &mut self,
        hinter: &dyn FreePageHinter,
        round0: &mut HintRound,
        wait: HintWait,
    ) -> HintsReport {
        let clock = MonotonicClock::new();
        let mut session = match hinter.start_round() {
            Ok(s) => s,
            Err(why) => {
                log::info!("no free page hints this time: {why}");
                return HintsReport::unused(why.to_string());
            }
        };
        self.hints_held = true;
        let cmd_id = session.cmd_id();
        if let Err(e) = round0.request(cmd_id) {
            log::warn!("free page hint round refused: {e}");
            hinter.stop_round();
            return HintsReport::unused(format!("round refused: {e}"));
        }
        let outcome = wait.run(session.as_mut(), &clock, |hints| {
            for (gpa, len) in hints {
                round0.apply(cmd_id, MemoryRange::new(gpa, len));
            }
        });
        if outcome.end == RoundEnd::Stopped {
            round0.stop(cmd_id);
        }
        if outcome.needs_stop() {
            // What arrived so far is used; the driver is told to stop sending more.
            hinter.stop_round();
        }
        let stats = round0.stats();
        let mut report = HintsReport::from_stats(hinter.mode(), &stats, outcome.waited);
        report.reason = outcome.reason(stats.pages_hinted).or_else(|| {
            (stats.rejected > 0).then(|| format!("{} hints rejected as invalid", stats.rejected))
        });
        if let Some(why) = &report.reason {
            log::info!("free page hints: {why}");
        }
        report
    }

    /// One dirty-log sync of KVM's log and the VMM's own writes.
    fn sync(&mut self, ram: &RamRegions) -> Result<DirtyRound, MigrationError> {
        let mut round = DirtyRound::new(ram);
        self.add_dirty_log(&mut round)?;
        Ok(round)
    }

    /// Adds what was written since the last sync to `round`.
    fn add_dirty_log(&mut self, round: &mut dyn DirtySink) -> Result<(), MigrationError> {
        self.dirty.sync(self.vm, round)
    }

    /// Sends one round (less zero pages the destination never received) and waits for the ack.
    fn send_round(
        &mut self,
        memory: &GuestMemoryMmap,
        table: MemoryRangeTable,
        zero: Option<&mut ZeroPageFilter>,
    ) -> Result<RoundTimes, MigrationError> {
        let started = Instant::now();
        let table = match zero {
            Some(filter) => {
                let split = filter
                    .filter(memory, &table)
                    .map_err(MigrationError::ZeroScan)?;
                self.report.zero_pages_skipped += split.zero_pages;
                split.to_send
            }
            None => table,
        };
        let filtered = started.elapsed();
        let sent = send_memory(memory, &table, &mut self.stream).map_err(MigrationError::Memory)?;
        let written = started.elapsed();
        log::debug!(
            "round {}: {} ranges, zero scan {:?}, write {:?}",
            self.report.rounds + 1,
            table.len(),
            filtered,
            written - filtered
        );
        Response::read_from(&mut self.stream)
            .and_then(Response::into_result)
            .map_err(MigrationError::Protocol)?;
        let secs = started.elapsed().as_secs_f64();
        if sent >= (16 << 20) && secs > 0.0 {
            self.bandwidth = sent as f64 / secs;
        }
        self.report.rounds += 1;
        self.report.bytes_sent += sent;
        self.report.pages_sent += table.total_pages();
        log::info!(
            "migration round {}: {} pages in {:.1} ms",
            self.report.rounds,
            table.total_pages(),
            secs * 1000.0
        );
        Ok(RoundTimes {
            send_ms: duration_ms(started.elapsed() - filtered),
        })
    }

    /// Undoes what a failed migration changed here: the guest runs on, with its memory intact.
    fn abort(&mut self) {
        if let Err(e) = protocol::write_request(&mut self.stream, Command::Abandon, &[]) {
            log::debug!("could not tell the destination to abandon: {e}");
        }
        if self.logging {
            if let Err(e) = self.vm.stop_dirty_log() {
                log::warn!("cannot stop dirty logging: {e}");
            }
        }
        if self.hints_held {
            if let Some(h) = self.hinter {
                h.done();
            }
        }
        if self.paused {
            if let Err(e) = self.vm.resume() {
                log::error!("cannot resume the VM after a failed migration: {e}");
            }
        }
    }
}

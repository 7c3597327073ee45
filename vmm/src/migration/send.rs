//! The sending side of a live migration.
//!
//! Order matters for guest data (see `free-page-hinting.md`, section 3): dirty logging starts
//! first, only then are hints requested, and hints only ever shrink round 0 (all of RAM),
//! computed before the request. Every later round is a dirty-log sync, which includes any
//! hinted page the guest wrote after hinting it. Pages the host never backed leave round 0 by
//! the same rule (README, "Never-backed memory").

use std::time::{Duration, Instant};

use vm_migration::protocol::{self, Command};
use vm_migration::report::duration_ms;
use vm_migration::{
    CountingStream, DirtyLoggingStarted, DirtyRound, DirtySink, HintRound, HintsReport, LastRound,
    MemoryRange, MemoryRangeTable, MigrationReport, MigrationStream, MigrationUrl, RamRegions,
    Response, TlsClient, TransportReport, ZeroPageFilter,
};

use super::dirty::DirtyTracker;
use super::hints::{
    FreePageHinter, HintSource, HintWait, HintsUnavailable, MonotonicClock, RoundEnd,
};
use super::progress::{MigrationProgress, Phase};
use super::source_vm::SourceVm;
use super::stripes::{self, send::SendStripes};
use super::MigrationError;
use crate::config::{SendMigrationData, TimeoutStrategy};
use crate::memory::GuestMemoryMmap;
use crate::vm::{Vm, VmState};

/// How long telling the destination to abandon may block: the connection may be what failed,
/// and a peer that stopped reading must not cost another I/O timeout.
const ABANDON_TIMEOUT: Duration = Duration::from_secs(1);
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
    let progress = MigrationProgress::new(data.downtime_ms);
    send_migration_with(vm, data, hinter, &progress)
}

/// [`send_migration`] for any [`SourceVm`], showing its progress in `progress` and stopping
/// when `progress` is cancelled (then or on `timeout_strategy=cancel` the error is
/// [`MigrationError::SendCancelled`] or [`MigrationError::NotConverged`]).
pub fn send_migration_with(
    vm: &mut dyn SourceVm,
    data: &SendMigrationData,
    hinter: Option<&dyn FreePageHinter>,
    progress: &MigrationProgress,
) -> Result<MigrationReport, MigrationError> {
    // A VM the user paused is migrated too, and stays paused over there (as with QEMU).
    let user_paused = match vm.state() {
        VmState::Running => false,
        VmState::Paused => true,
        _ => return Err(MigrationError::NotRunning),
    };
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
    let tls = stripes::load_client(data.tls_dir.as_deref())?;
    let stream = stripes::connect(&url, tls.as_ref())?;
    let mut stream = CountingStream::new(stream).with_stall_limit(stripes::IO_TIMEOUT);
    stream.set_watch(progress.watch());
    match std::os::fd::AsFd::as_fd(&stream).try_clone_to_owned() {
        Ok(fd) => progress.set_connection(fd),
        Err(e) => log::warn!("a cancel will wait for the current read: {e}"),
    }
    let mut sender = Sender {
        vm,
        stream,
        report: MigrationReport::default(),
        bandwidth: INITIAL_BANDWIDTH,
        logging: false,
        paused: false,
        user_paused,
        hints_held: false,
        hinter,
        url,
        tls,
        stripes: SendStripes::default(),
        progress,
        dirty: DirtyTracker::default(),
    };
    let result = sender.run(data, start);
    progress.clear_connection();
    match result {
        Ok(()) => Ok(sender.report),
        Err(e) => {
            let e = match e {
                // A write cut by the cancel switch: the stream may be mid-request, so the
                // destination learns it from the closed connection instead of Abandon.
                MigrationError::Memory(_) | MigrationError::Protocol(_)
                    if progress.is_cancelled() =>
                {
                    let _ = sender.stream.get_ref().shutdown();
                    match sender.vm.guest_end() {
                        Some(why) => MigrationError::GuestEnded(why),
                        None => MigrationError::SendCancelled,
                    }
                }
                e => e,
            };
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
    vm: &'a mut dyn SourceVm,
    stream: CountingStream<MigrationStream>,
    report: MigrationReport,
    /// Measured by the last round, bytes per second.
    bandwidth: f64,
    logging: bool,
    /// This migration paused the VM (a failed one resumes it).
    paused: bool,
    /// The user had paused the VM before: it is neither paused nor resumed here, and the
    /// destination keeps it paused.
    user_paused: bool,
    /// The guest's driver may hold hinted blocks until it hears DONE.
    hints_held: bool,
    hinter: Option<&'h dyn FreePageHinter>,
    url: MigrationUrl,
    tls: Option<TlsClient>,
    /// The added connections of `connections=<n>` (none by default).
    stripes: SendStripes,
    progress: &'h MigrationProgress,
    /// Reads the dirty log; set up when logging starts.
    dirty: DirtyTracker,
}

/// A hint source that ends its round early when the migration is cancelled.
struct CancellableHints<'s, 'p> {
    inner: &'s mut dyn HintSource,
    progress: &'p MigrationProgress,
}

impl HintSource for CancellableHints<'_, '_> {
    fn cmd_id(&self) -> u32 {
        self.inner.cmd_id()
    }
    fn take_ranges(&mut self) -> Vec<(u64, u64)> {
        self.inner.take_ranges()
    }
    fn wait_stopped(&self, timeout: Duration) -> bool {
        self.inner.wait_stopped(timeout)
    }
    fn is_finished(&self) -> bool {
        self.progress.is_cancelled() || self.inner.is_finished()
    }
}

impl Sender<'_, '_> {
    /// Fails once the migration was cancelled, or the guest ended (which cancels it too).
    fn check_cancel(&self) -> Result<(), MigrationError> {
        self.check_guest()?;
        match self.progress.is_cancelled() {
            true => Err(MigrationError::SendCancelled),
            false => Ok(()),
        }
    }

    fn request(&mut self, command: Command, payload: &[u8]) -> Result<(), MigrationError> {
        protocol::request(&mut self.stream, command, payload).map_err(MigrationError::Protocol)
    }

    fn run(&mut self, data: &SendMigrationData, start: Instant) -> Result<(), MigrationError> {
        let memory = self.vm.memory().clone();
        self.report.memory_bytes = crate::memory::ram_size(&memory);
        self.request(Command::Start, &[])?;
        if !data.local {
            // Dirty logging before Config: the destination builds its VM on Config, and KVM's
            // work for a large guest on both sides at once made either one up to 30x slower
            // here (256 GiB: 1.6 s to start logging while the destination set up its slots).
            self.start_dirty_log()?;
        }
        let config =
            serde_json::to_vec(self.vm.config()).map_err(|e| MigrationError::Json("config", e))?;
        self.request(Command::Config, &config)?;
        if !data.local {
            let seccomp = self.vm.seccomp_mode();
            let (url, tls) = (&self.url, self.tls.as_ref());
            self.stripes = SendStripes::open(
                &mut self.stream,
                url,
                data.connections,
                tls,
                &memory,
                seccomp,
            )?;
        }
        self.report.phases.setup_ms =
            duration_ms(start.elapsed()) - self.report.phases.dirty_log_start_ms;

        if data.local {
            self.report.hints = HintsReport::unused(HintsUnavailable::LocalMode.to_string());
            self.send_memory_files(&memory)?;
            self.check_cancel()?;
            self.progress.enter(Phase::Stopped);
            self.pause()?;
        } else {
            self.precopy(&memory, data, start)?;
        }
        let pause_at = Instant::now();
        // A guest that powered off, reset or crashed while it was being copied must not be
        // resumed over there from whatever state its vCPUs were left in (checked with the
        // cancel).
        self.check_cancel()?;
        let mut snapshot = self.vm.snapshot().map_err(MigrationError::Vm)?;
        snapshot.paused = self.user_paused;
        let state = serde_json::to_vec(&snapshot).map_err(|e| MigrationError::Json("state", e))?;
        self.report.downtime_breakdown.snapshot_ms = duration_ms(pause_at.elapsed());
        self.request(Command::State, &state)?;
        self.report.downtime_breakdown.state_ms = duration_ms(pause_at.elapsed());
        // The point of no return: from here on the destination may run the guest.
        if !self.progress.commit() {
            return Err(MigrationError::SendCancelled);
        }
        let complete_at = Instant::now();
        self.request(Command::Complete, &[])?;
        // The destination now owns the guest, and the hinted blocks with it.
        self.hints_held = false;
        self.report.downtime_breakdown.complete_ms = duration_ms(complete_at.elapsed());
        self.report.downtime_ms += duration_ms(pause_at.elapsed());
        self.report.phases.stopped_ms = self.report.downtime_ms;
        self.report.total_ms = duration_ms(start.elapsed());
        self.report.wire_bytes = self.stream.bytes_written() + self.stripes.wire_bytes();
        self.report.transport = Some(TransportReport {
            connections: self.stripes.connections(),
            tls: self.tls.is_some(),
        });
        Ok(())
    }

    /// Fails once the guest has ended (it is not carried on as if it still ran).
    fn check_guest(&self) -> Result<(), MigrationError> {
        match self.vm.guest_end() {
            Some(why) => Err(MigrationError::GuestEnded(why)),
            None => Ok(()),
        }
    }

    /// Turns dirty logging on (KVM and the VMM's own write tracking).
    fn start_dirty_log(&mut self) -> Result<(), MigrationError> {
        let phase = Instant::now();
        self.vm.start_dirty_log().map_err(MigrationError::Vm)?;
        self.logging = true;
        self.report.phases.dirty_log_start_ms = duration_ms(phase.elapsed());
        Ok(())
    }

    fn pause(&mut self) -> Result<(), MigrationError> {
        if self.user_paused {
            return Ok(());
        }
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
        // 1. Dirty logging first (started in `run`): from here on every guest write shows up
        // in a later sync.
        debug_assert!(self.logging);
        // 2. Only then ask for hints, and apply them to round 0 (all of RAM).
        let mut round0 = HintRound::new(&ram, DirtyLoggingStarted::confirm());
        let hinter = match self.hinter {
            _ if !data.free_page_hints => Err(HintsUnavailable::DisabledByRequest),
            None => Err(HintsUnavailable::NoBalloon),
            Some(_) if self.user_paused => Err(HintsUnavailable::VmPaused),
            Some(h) => Ok(h),
        };
        if hinter.is_ok() {
            self.progress.enter(Phase::Hinting);
        }
        self.report.hints = match hinter {
            Ok(hinter) => self.collect_hints(
                hinter,
                &mut round0,
                HintWait::new(Duration::from_millis(data.hint_wait_ms)),
            ),
            Err(why) => HintsReport::unused(why.to_string()),
        };
        self.report.phases.hints_ms = self.report.hints.wait_ms;
        self.check_cancel()?;
        self.progress.left_out(self.report.hints.pages_skipped);
        let phase = Instant::now();
        // ... and leave out what the host never backed (it is zero; a later write is logged).
        super::populated::leave_out_unpopulated(memory, &mut round0, data, &mut self.report);
        let round0 = round0.finish().map_err(MigrationError::Round)?;
        let mut zero = data.zero_pages.then(|| ZeroPageFilter::new(&ram));
        // 3. Round 0.
        self.progress.enter(Phase::Round);
        let build_ms = self.send_round(memory, round0.table, zero.as_mut())?;
        self.report.phases.round0_build_ms = duration_ms(phase.elapsed()) - build_ms.send_ms;
        self.report.phases.round0_send_ms = build_ms.send_ms;
        let phase = Instant::now();

        // 4. Dirty rounds until the rest fits the downtime budget, or time is up.
        let deadline = start + Duration::from_secs(data.timeout_s);
        let mut dirty_rounds = 0;
        let mut last_sync = phase;
        let pending = loop {
            self.check_cancel()?;
            let round = self.sync(&ram)?;
            let estimate_ms = round.dirty_pages() as f64 * 4096.0 / self.bandwidth * 1000.0;
            let since = std::mem::replace(&mut last_sync, Instant::now());
            let secs = since.elapsed().as_secs_f64();
            self.progress.synced(round.dirty_pages(), secs, estimate_ms);
            if estimate_ms <= data.downtime_ms as f64 || dirty_rounds >= MAX_DIRTY_ROUNDS {
                break round;
            }
            if Instant::now() >= deadline {
                // Cloud Hypervisor's timeout strategies: give up, or stop the VM anyway.
                match data.timeout_strategy {
                    TimeoutStrategy::Cancel => {
                        return Err(MigrationError::NotConverged {
                            timeout_s: data.timeout_s,
                        })
                    }
                    TimeoutStrategy::Ignore => break round,
                }
            }
            self.progress.enter(Phase::Round);
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
        self.check_cancel()?;
        self.progress.enter(Phase::Stopped);
        let mut last = LastRound::new(&ram, pending.into_table().map_err(MigrationError::Round)?);
        let pause_at = Instant::now();
        self.pause()?;
        let step = Instant::now();
        self.report.downtime_breakdown.pause_ms = duration_ms(pause_at.elapsed());
        self.dirty.final_sync(self.vm, &mut last)?;
        self.report.downtime_breakdown.dirty_log = self.dirty.kind_name().into();
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
        let progress = self.progress;
        let mut source = CancellableHints {
            inner: session.as_mut(),
            progress,
        };
        let outcome = wait.run(&mut source, &clock, |hints| {
            progress.hinted(hints.iter().map(|(_, len)| len / 4096).sum());
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
        self.check_cancel()?;
        let started = Instant::now();
        let table = match zero {
            Some(filter) => {
                let split = filter
                    .filter(memory, &table)
                    .map_err(MigrationError::ZeroScan)?;
                self.report.zero_pages_skipped += split.zero_pages;
                self.report.zero_scan_unchecked_pages += split.unchecked_pages;
                split.to_send
            }
            None => table,
        };
        let filtered = started.elapsed();
        self.progress
            .round_planned(table.total_pages(), self.report.zero_pages_skipped);
        // Part by part on every connection, each acknowledged.
        let sent = self.stripes.send_round(memory, &table, &mut self.stream)?;
        let written = started.elapsed();
        log::debug!(
            "round {}: {} ranges, zero scan {:?}, write and ack {:?}",
            self.report.rounds + 1,
            table.len(),
            filtered,
            written - filtered
        );
        let secs = started.elapsed().as_secs_f64();
        if sent >= (16 << 20) && secs > 0.0 {
            self.bandwidth = sent as f64 / secs;
        }
        self.report.rounds += 1;
        self.report.bytes_sent += sent;
        self.report.pages_sent += table.total_pages();
        self.progress.round_done(
            self.report.pages_sent,
            self.report.bytes_sent,
            self.bandwidth,
        );
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
        if let Err(e) = self.stream.get_ref().configure(Some(ABANDON_TIMEOUT)) {
            log::debug!("cannot shorten the timeout for abandoning: {e}");
        }
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

//! [`Balloon`], the virtio device front, and [`BalloonHandle`], the VMM's side of it.

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use log::{error, info, warn};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::hinting::{HintEngine, HintMode, HintRound, HintStatus};
use super::state::{BalloonCounters, BalloonState};
use super::stats::BalloonStats;
use super::worker::BalloonWorker;
use super::*;
use crate::interrupt::{VirtioInterrupt, VirtioInterruptType};
use crate::sync::lock;
use crate::virtio::{VirtioDevice, VirtioDeviceError, VirtioQueue, VIRTIO_ID_BALLOON};
use crate::GuestMemoryMmap;

/// State shared by the device front (vCPU threads), the worker and the handles.
pub(crate) struct BalloonShared {
    pub(crate) num_pages: AtomicU32,
    pub(crate) actual: AtomicU32,
    pub(crate) cmd_id: AtomicU32,
    pub(crate) poison_val: AtomicU32,
    pub(crate) avail_features: u64,
    pub(crate) acked_features: AtomicU64,
    pub(crate) interrupt: Mutex<Option<Arc<dyn VirtioInterrupt>>>,
    /// The roles of the queues the driver enabled, while the device is active.
    pub(crate) active_queues: Mutex<Vec<QueueKind>>,
    /// Why the worker of the current activation does not run, if it does not.
    pub(crate) worker_error: Mutex<Option<String>>,
    pub(crate) counters: Mutex<BalloonCounters>,
    pub(crate) stats: Mutex<BalloonStats>,
    pub(crate) stats_head: Mutex<Option<u16>>,
    pub(crate) hints: Mutex<HintEngine>,
    /// Wakes the worker: stop, stats request, resume.
    pub(crate) control: EventFd,
    pub(crate) kill: AtomicBool,
    pub(crate) stats_requested: AtomicBool,
    pub(crate) paused: AtomicBool,
    /// Held by the worker while it processes a batch (see [`Balloon::pause`]).
    pub(crate) processing: Mutex<()>,
    pub(crate) stats_interval: Option<std::time::Duration>,
}

impl BalloonShared {
    pub(crate) fn has(&self, bit: u32) -> bool {
        self.acked_features.load(Ordering::SeqCst) & (1 << bit) != 0
    }

    /// Raise a configuration interrupt if the driver is running.
    pub(crate) fn config_changed(&self) {
        let irq = lock(&self.interrupt).clone();
        if let Some(irq) = irq {
            if let Err(e) = irq.trigger(VirtioInterruptType::Config) {
                warn!("balloon: config interrupt failed: {e}");
            }
        }
    }

    fn wake(&self) {
        if let Err(e) = self.control.write(1) {
            error!("balloon: failed to wake the worker: {e}");
        }
    }

    /// Free page reporting must keep pages when the driver poisons free memory.
    pub(crate) fn poison_active(&self) -> bool {
        self.has(VIRTIO_BALLOON_F_PAGE_POISON) && self.poison_val.load(Ordering::SeqCst) != 0
    }
}

/// Run first thing on the balloon's worker thread, before it touches the queues: the VMM uses
/// it to install the thread's seccomp filter. If it fails, the worker does not run (the error is
/// logged and the device stays idle until it is reset).
pub type WorkerStartHook = Arc<dyn Fn() -> std::io::Result<()> + Send + Sync>;

/// The virtio-balloon device.
pub struct Balloon {
    shared: Arc<BalloonShared>,
    worker: Option<JoinHandle<()>>,
    on_worker_start: Option<WorkerStartHook>,
}

impl std::fmt::Debug for Balloon {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Balloon")
            .field("avail_features", &self.shared.avail_features)
            .field("active", &self.worker.is_some())
            .finish()
    }
}

fn pages_of(bytes: u64) -> Result<u32, BalloonError> {
    u32::try_from(bytes >> BALLOON_PAGE_SHIFT).map_err(|_| BalloonError::TargetTooLarge(bytes))
}

impl Balloon {
    /// A balloon offering the features `config` enables.
    pub fn new(config: &BalloonConfig) -> Result<Self, BalloonError> {
        let mut features = 0u64;
        let mut offer = |bit: u32, on: bool| {
            if on {
                features |= 1 << bit;
            }
        };
        offer(VIRTIO_BALLOON_F_STATS_VQ, config.statistics);
        offer(VIRTIO_BALLOON_F_DEFLATE_ON_OOM, config.deflate_on_oom);
        offer(VIRTIO_BALLOON_F_FREE_PAGE_HINT, config.free_page_hinting);
        offer(VIRTIO_BALLOON_F_HINT_RANGES, config.free_page_hinting);
        offer(VIRTIO_BALLOON_F_REPORTING, config.free_page_reporting);
        offer(
            VIRTIO_BALLOON_F_PAGE_POISON,
            config.free_page_hinting || config.free_page_reporting,
        );
        features |= 1 << crate::virtio::VIRTIO_F_VERSION_1;
        let shared = BalloonShared {
            num_pages: AtomicU32::new(pages_of(config.size)?),
            actual: AtomicU32::new(0),
            cmd_id: AtomicU32::new(0),
            poison_val: AtomicU32::new(0),
            avail_features: features,
            acked_features: AtomicU64::new(0),
            interrupt: Mutex::new(None),
            active_queues: Mutex::new(Vec::new()),
            worker_error: Mutex::new(None),
            counters: Mutex::new(BalloonCounters::default()),
            stats: Mutex::new(BalloonStats::default()),
            stats_head: Mutex::new(None),
            hints: Mutex::new(HintEngine::default()),
            control: EventFd::new(EFD_NONBLOCK).map_err(BalloonError::EventFd)?,
            kill: AtomicBool::new(false),
            stats_requested: AtomicBool::new(false),
            paused: AtomicBool::new(false),
            processing: Mutex::new(()),
            stats_interval: config.stats_interval,
        };
        Ok(Balloon {
            shared: Arc::new(shared),
            worker: None,
            on_worker_start: None,
        })
    }

    /// Sets the hook run on each new worker thread before it starts (see [`WorkerStartHook`]).
    pub fn set_on_worker_start(&mut self, hook: Option<WorkerStartHook>) {
        self.on_worker_start = hook;
    }

    /// A handle for the VMM's other threads.
    pub fn handle(&self) -> BalloonHandle {
        BalloonHandle {
            shared: self.shared.clone(),
        }
    }

    /// Map the queues to their roles by the negotiated features and build the worker. Any subset
    /// of the queues works; what lacks its queue is unavailable (see the module documentation).
    pub(crate) fn prepare_worker(
        &mut self,
        mem: Arc<GuestMemoryMmap>,
        interrupt: Arc<dyn VirtioInterrupt>,
        queues: Vec<VirtioQueue>,
    ) -> Result<BalloonWorker, VirtioDeviceError> {
        if self.worker.is_some() {
            return Err(VirtioDeviceError::AlreadyActive);
        }
        let layout = queue_layout(self.shared.acked_features.load(Ordering::SeqCst));
        let mut mapped = Vec::new();
        for vq in queues {
            match layout.get(usize::from(vq.index)) {
                Some(kind) => mapped.push((*kind, vq)),
                None => warn!("balloon: queue {} has no role; ignored", vq.index),
            }
        }
        let active: Vec<QueueKind> = mapped.iter().map(|(k, _)| *k).collect();
        let missing: Vec<&str> = layout
            .iter()
            .filter(|k| !active.contains(k))
            .map(|k| k.name())
            .collect();
        if !missing.is_empty() {
            info!(
                "balloon: the driver did not enable the {} queue(s); they stay unused",
                missing.join(", ")
            );
        }
        *lock(&self.shared.active_queues) = active;
        *lock(&self.shared.worker_error) = None;
        *lock(&self.shared.interrupt) = Some(interrupt.clone());
        Ok(BalloonWorker::new(
            mem,
            interrupt,
            self.shared.clone(),
            mapped,
        ))
    }

    fn stop_worker(&mut self) {
        if let Some(worker) = self.worker.take() {
            self.shared.kill.store(true, Ordering::SeqCst);
            self.shared.wake();
            if worker.join().is_err() {
                error!("balloon: worker thread panicked");
            }
            self.shared.kill.store(false, Ordering::SeqCst);
        }
    }

    fn config_image(&self) -> [u8; BALLOON_CONFIG_SIZE] {
        let s = &self.shared;
        let mut img = [0u8; BALLOON_CONFIG_SIZE];
        let fields = [&s.num_pages, &s.actual, &s.cmd_id, &s.poison_val];
        for (i, f) in fields.iter().enumerate() {
            img[i * 4..i * 4 + 4].copy_from_slice(&f.load(Ordering::SeqCst).to_le_bytes());
        }
        img
    }
}

impl Drop for Balloon {
    fn drop(&mut self) {
        self.stop_worker();
    }
}

impl VirtioDevice for Balloon {
    type State = BalloonState;

    fn device_type(&self) -> u32 {
        VIRTIO_ID_BALLOON
    }

    fn queue_max_sizes(&self) -> Vec<u16> {
        queue_layout(self.shared.avail_features)
            .into_iter()
            .map(|k| match k {
                QueueKind::FreePage => FREE_PAGE_QUEUE_SIZE,
                _ => QUEUE_SIZE,
            })
            .collect()
    }

    fn features(&self) -> u64 {
        self.shared.avail_features
    }

    fn ack_features(&mut self, features: u64) {
        self.shared
            .acked_features
            .store(features & self.shared.avail_features, Ordering::SeqCst);
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        let img = self.config_image();
        for (i, b) in data.iter_mut().enumerate() {
            *b = usize::try_from(offset)
                .ok()
                .and_then(|o| o.checked_add(i))
                .and_then(|o| img.get(o))
                .copied()
                .unwrap_or(0);
        }
    }

    fn write_config(&mut self, offset: u64, data: &[u8]) {
        let mut img = self.config_image();
        for (i, b) in data.iter().enumerate() {
            let Some(slot) = usize::try_from(offset)
                .ok()
                .and_then(|o| o.checked_add(i))
                .and_then(|o| img.get_mut(o))
            else {
                return;
            };
            *slot = *b;
        }
        let word = |i: usize| u32::from_le_bytes([img[i], img[i + 1], img[i + 2], img[i + 3]]);
        // Only `actual` and `poison_val` belong to the driver.
        self.shared.actual.store(word(4), Ordering::SeqCst);
        self.shared.poison_val.store(word(12), Ordering::SeqCst);
    }

    fn activate(
        &mut self,
        mem: Arc<GuestMemoryMmap>,
        interrupt: Arc<dyn VirtioInterrupt>,
        queues: Vec<VirtioQueue>,
    ) -> Result<(), VirtioDeviceError> {
        let worker = self.prepare_worker(mem, interrupt, queues)?;
        let on_start = self.on_worker_start.clone();
        let shared = self.shared.clone();
        let handle = std::thread::Builder::new()
            .name("balloon-worker".into())
            .spawn(move || {
                if let Some(hook) = on_start {
                    if let Err(e) = hook() {
                        let why = format!("The balloon worker's start hook failed: {e}");
                        error!("balloon: {why}; the worker does not run");
                        *lock(&shared.worker_error) = Some(why.replace(['\r', '\n'], " "));
                        return;
                    }
                }
                worker.run()
            })
            .map_err(VirtioDeviceError::SpawnWorker)?;
        self.worker = Some(handle);
        Ok(())
    }

    fn reset(&mut self) {
        self.stop_worker();
        let s = &self.shared;
        *lock(&s.interrupt) = None;
        lock(&s.active_queues).clear();
        *lock(&s.worker_error) = None;
        s.acked_features.store(0, Ordering::SeqCst);
        s.actual.store(0, Ordering::SeqCst);
        s.poison_val.store(0, Ordering::SeqCst);
        *lock(&s.stats_head) = None;
        let mut hints = lock(&s.hints);
        hints.reset();
        s.cmd_id.store(FREE_PAGE_HINT_CMD_ID_STOP, Ordering::SeqCst);
        s.paused.store(false, Ordering::SeqCst);
    }

    fn failure(&self) -> Option<String> {
        lock(&self.shared.worker_error).clone()
    }

    fn pause(&mut self) {
        self.shared.paused.store(true, Ordering::SeqCst);
        // Wait for a batch in progress; later batches see the flag.
        drop(lock(&self.shared.processing));
    }

    fn resume(&mut self) {
        self.shared.paused.store(false, Ordering::SeqCst);
        self.shared.wake();
    }

    fn state(&self) -> BalloonState {
        let s = &self.shared;
        let hints = lock(&s.hints);
        let mut counters = lock(&s.counters).clone();
        hints.fill_counters(&mut counters);
        BalloonState {
            avail_features: s.avail_features,
            acked_features: s.acked_features.load(Ordering::SeqCst),
            num_pages: s.num_pages.load(Ordering::SeqCst),
            actual: s.actual.load(Ordering::SeqCst),
            free_page_hint_cmd_id: s.cmd_id.load(Ordering::SeqCst),
            poison_val: s.poison_val.load(Ordering::SeqCst),
            counters,
            stats: lock(&s.stats).clone(),
            stats_desc_head: *lock(&s.stats_head),
            hinting: hints.save(),
        }
    }

    fn restore(&mut self, state: BalloonState) -> Result<(), VirtioDeviceError> {
        let invalid = |m: &str| Err(VirtioDeviceError::InvalidState(m.into()));
        let s = &self.shared;
        if self.worker.is_some() {
            return Err(VirtioDeviceError::AlreadyActive);
        }
        if state.avail_features != s.avail_features {
            return invalid("offered features differ");
        }
        if state.acked_features & !s.avail_features != 0 {
            return invalid("acked features were never offered");
        }
        let id = state.free_page_hint_cmd_id;
        if id > FREE_PAGE_HINT_CMD_ID_DONE && id != state.hinting.cmd_id {
            return invalid("command id in config does not match the hinting state");
        }
        if state.hinting.cmd_id > state.hinting.last_id {
            return invalid("command id newer than the last id handed out");
        }
        let stats_negotiated = state.acked_features & (1 << VIRTIO_BALLOON_F_STATS_VQ) != 0;
        if state.stats_desc_head.is_some() && !stats_negotiated {
            return invalid("statistics buffer without a statistics queue");
        }
        s.acked_features
            .store(state.acked_features, Ordering::SeqCst);
        s.num_pages.store(state.num_pages, Ordering::SeqCst);
        s.actual.store(state.actual, Ordering::SeqCst);
        s.cmd_id.store(id, Ordering::SeqCst);
        s.poison_val.store(state.poison_val, Ordering::SeqCst);
        // The hint counters are restored with the engine below.
        *lock(&s.counters) = state.counters;
        *lock(&s.stats) = state.stats;
        *lock(&s.stats_head) = state.stats_desc_head;
        lock(&s.hints).load(&state.hinting);
        Ok(())
    }
}

/// What the VMM uses to drive the balloon from its API and migration threads.
#[derive(Clone)]
pub struct BalloonHandle {
    shared: Arc<BalloonShared>,
}

impl std::fmt::Debug for BalloonHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BalloonHandle").finish()
    }
}

impl BalloonHandle {
    /// Set the balloon's target size in bytes (rounded down to pages) and tell the driver.
    /// Before the driver starts the device the target waits for it; a driver that started the
    /// device without the inflate or deflate queue could never follow it, so that is refused.
    pub fn resize(&self, target_bytes: u64) -> Result<(), BalloonError> {
        let pages = pages_of(target_bytes)?;
        if self.is_active() {
            for kind in [QueueKind::Inflate, QueueKind::Deflate] {
                self.require_queue(kind, "resizing the balloon")?;
            }
        }
        self.shared.num_pages.store(pages, Ordering::SeqCst);
        self.shared.config_changed();
        Ok(())
    }

    /// The target in pages.
    pub fn target_pages(&self) -> u32 {
        self.shared.num_pages.load(Ordering::SeqCst)
    }

    /// Pages the driver says it holds (`actual`).
    pub fn actual_pages(&self) -> u32 {
        self.shared.actual.load(Ordering::SeqCst)
    }

    /// Bytes the driver holds in the balloon.
    pub fn actual_bytes(&self) -> u64 {
        u64::from(self.actual_pages()) << BALLOON_PAGE_SHIFT
    }

    /// Whether the driver has started the device (DRIVER_OK) and not reset it since.
    pub fn is_active(&self) -> bool {
        lock(&self.shared.interrupt).is_some()
    }

    /// The roles of the queues the driver enabled, in index order (empty while not active).
    pub fn active_queues(&self) -> Vec<QueueKind> {
        lock(&self.shared.active_queues).clone()
    }

    fn require_queue(&self, kind: QueueKind, needed_for: &'static str) -> Result<(), BalloonError> {
        if lock(&self.shared.active_queues).contains(&kind) {
            Ok(())
        } else {
            Err(BalloonError::QueueNotEnabled {
                queue: kind.name(),
                needed_for,
            })
        }
    }

    /// The hint protocol in use, or why hinting is unavailable: the driver did not negotiate
    /// it, has not started the device, or started it without the free page queue.
    pub fn hint_availability(&self) -> Result<HintMode, BalloonError> {
        if !self.shared.has(VIRTIO_BALLOON_F_FREE_PAGE_HINT) {
            return Err(BalloonError::HintingNotNegotiated);
        }
        if !self.is_active() {
            return Err(BalloonError::NotActive);
        }
        self.require_queue(QueueKind::FreePage, "free page hinting")?;
        if self.shared.has(VIRTIO_BALLOON_F_HINT_RANGES) {
            Ok(HintMode::Ranges)
        } else {
            Ok(HintMode::Stock)
        }
    }

    /// The hint protocol in use; `None` whenever hinting is unavailable (see
    /// [`BalloonHandle::hint_availability`] for why).
    pub fn hint_mode(&self) -> Option<HintMode> {
        self.hint_availability().ok()
    }

    fn hinting_ready(&self) -> Result<(), BalloonError> {
        self.hint_availability().map(|_| ())
    }

    /// Ask the driver for free page hints: a fresh command id goes into config space (where it
    /// stays while the round runs) and a configuration interrupt is raised. Start dirty
    /// logging *before* calling this.
    pub fn start_hint_round(&self) -> Result<HintRound, BalloonError> {
        self.hinting_ready()?;
        let round = {
            let mut hints = lock(&self.shared.hints);
            let (id, round) = hints.start_round();
            self.shared.cmd_id.store(id, Ordering::SeqCst);
            round
        };
        self.shared.config_changed();
        Ok(round)
    }

    /// Ask the driver to stop hinting (config id := STOP); it keeps its blocks.
    pub fn stop_hint_round(&self) -> Result<(), BalloonError> {
        self.hinting_ready()?;
        {
            let mut hints = lock(&self.shared.hints);
            hints.stop_by_device();
            self.shared
                .cmd_id
                .store(FREE_PAGE_HINT_CMD_ID_STOP, Ordering::SeqCst);
        }
        self.shared.config_changed();
        Ok(())
    }

    /// Tell the driver to give its hinted blocks back (config id := DONE). Call it when the
    /// hints are no longer needed, e.g. on the destination after a migration.
    pub fn hint_done(&self) -> Result<(), BalloonError> {
        self.hinting_ready()?;
        {
            let mut hints = lock(&self.shared.hints);
            hints.done();
            self.shared
                .cmd_id
                .store(FREE_PAGE_HINT_CMD_ID_DONE, Ordering::SeqCst);
        }
        self.shared.config_changed();
        Ok(())
    }

    /// State of the last hinting round.
    pub fn hint_status(&self) -> HintStatus {
        lock(&self.shared.hints).status()
    }

    /// All counters.
    pub fn counters(&self) -> BalloonCounters {
        let mut c = lock(&self.shared.counters).clone();
        lock(&self.shared.hints).fill_counters(&mut c);
        c
    }

    /// The latest guest statistics.
    pub fn stats(&self) -> BalloonStats {
        lock(&self.shared.stats).clone()
    }

    /// Ask the driver for fresh statistics (gives the statistics buffer back).
    pub fn request_stats(&self) -> Result<(), BalloonError> {
        if !self.shared.has(VIRTIO_BALLOON_F_STATS_VQ) || !self.is_active() {
            return Err(BalloonError::NotActive);
        }
        self.require_queue(QueueKind::Stats, "guest statistics")?;
        self.shared.stats_requested.store(true, Ordering::SeqCst);
        self.shared.wake();
        Ok(())
    }
}

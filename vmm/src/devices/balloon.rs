//! The virtio-balloon on the PCI bus, and the free page hints it gives migration.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use hypervisor::Vm;
use virtio_devices::{Balloon, BalloonHandle, HintRound, MsiVectors, VirtioPciDevice};
use vm_migration::HintMode;

use super::pci::PciSegment;
use super::DeviceError;
use crate::config::BalloonConfig;
use crate::interrupts::{InterruptManager, IrqfdLine, MsiVectorGroup};
use crate::memory::GuestMemoryMmap;
use crate::migration::hints::{FreePageHinter, HintSource, HintsUnavailable};
use crate::seccomp::{self, SeccompMode, ThreadKind};

/// MSI-X vectors for the balloon: configuration changes plus up to five queues.
const BALLOON_MSI_VECTORS: u32 = 6;
/// How often the device asks the guest for fresh statistics.
const STATS_INTERVAL: Duration = Duration::from_secs(2);

/// The balloon's PCI function and the handle the VMM drives it through.
pub struct BalloonDevice {
    /// The virtio-pci function.
    pub pci: Arc<Mutex<VirtioPciDevice<Balloon>>>,
    /// Resize, hint rounds, counters.
    pub handle: BalloonHandle,
    /// Its PCI slot.
    pub slot: u8,
}

/// The GSI of a PCI slot's INTA# line (the MP table wires it the same way).
pub fn intx_gsi(slot: u8) -> u32 {
    16 + u32::from(slot % 8)
}

impl BalloonDevice {
    /// Creates the balloon and puts it on the PCI bus. Its worker thread installs the balloon
    /// worker's seccomp filter as `seccomp` says before it serves the queues.
    pub fn new(
        vm: &Arc<dyn Vm>,
        interrupts: &Arc<InterruptManager>,
        memory: &Arc<GuestMemoryMmap>,
        segment: &PciSegment,
        config: &BalloonConfig,
        seccomp: SeccompMode,
    ) -> Result<Self, DeviceError> {
        let mut balloon = Balloon::new(&virtio_devices::BalloonConfig {
            size: config.size,
            deflate_on_oom: config.deflate_on_oom,
            free_page_reporting: config.free_page_reporting,
            free_page_hinting: config.free_page_hinting,
            statistics: config.statistics,
            stats_interval: config.statistics.then_some(STATS_INTERVAL),
        })
        .map_err(|e| DeviceError::Balloon(Box::new(e)))?;
        if seccomp != SeccompMode::Disabled {
            balloon.set_on_worker_start(Some(Arc::new(move || {
                seccomp::apply(ThreadKind::BalloonWorker, seccomp)
                    .map_err(|e| std::io::Error::other(crate::api::error_chain(&e)))
            })));
        }
        let handle = balloon.handle();
        let msi: Arc<dyn MsiVectors> = Arc::new(
            MsiVectorGroup::new(interrupts.clone(), BALLOON_MSI_VECTORS)
                .map_err(DeviceError::Irq)?,
        );
        let slot = segment.next_slot();
        let gsi = intx_gsi(slot);
        let intx = IrqfdLine::new(vm.as_ref(), gsi).map_err(DeviceError::Irq)?;
        let pci = VirtioPciDevice::new(
            balloon,
            memory.clone(),
            msi,
            Some((Arc::new(intx), gsi as u8)),
        )
        .map_err(|e| DeviceError::Balloon(Box::new(e)))?;
        let pci = Arc::new(Mutex::new(pci));
        segment
            .add_device_at(slot, pci.clone())
            .map_err(DeviceError::Pci)?;
        Ok(BalloonDevice { pci, handle, slot })
    }

    /// The free page hinter for migration.
    pub fn hinter(&self) -> BalloonHinter {
        BalloonHinter {
            handle: self.handle.clone(),
            pci: self.pci.clone(),
        }
    }
}

/// Free page hints from the balloon.
pub struct BalloonHinter {
    handle: BalloonHandle,
    pci: Arc<Mutex<VirtioPciDevice<Balloon>>>,
}

impl BalloonHinter {
    /// Whether the driver enabled the free page queue (its `queue_enable`).
    fn free_page_queue_enabled(&self) -> bool {
        let state = self.pci.lock().unwrap_or_else(|e| e.into_inner()).state();
        let layout = virtio_devices::balloon::queue_layout(state.device.acked_features);
        layout
            .iter()
            .position(|k| *k == virtio_devices::balloon::QueueKind::FreePage)
            .and_then(|i| state.queues.get(i))
            .is_some_and(|q| q.ready)
    }
}

/// Why the balloon refused to start a round.
fn unavailable_because(e: &virtio_devices::BalloonError) -> HintsUnavailable {
    match e {
        virtio_devices::BalloonError::HintingNotNegotiated => HintsUnavailable::NotNegotiated,
        virtio_devices::BalloonError::NotActive => HintsUnavailable::NotActive,
        other => HintsUnavailable::Other(crate::api::error_chain(other)),
    }
}

struct BalloonHintRound(HintRound);

impl HintSource for BalloonHintRound {
    fn cmd_id(&self) -> u32 {
        self.0.cmd_id()
    }

    fn take_ranges(&mut self) -> Vec<(u64, u64)> {
        self.0
            .take_ranges()
            .into_iter()
            .map(|r| (r.gpa, r.len))
            .collect()
    }

    fn wait_stopped(&self, timeout: Duration) -> bool {
        self.0.wait_stopped(timeout)
    }

    fn is_finished(&self) -> bool {
        self.0.is_finished()
    }
}

impl FreePageHinter for BalloonHinter {
    fn mode(&self) -> HintMode {
        match self.handle.hint_mode() {
            Some(virtio_devices::HintMode::Stock) => HintMode::Stock,
            Some(virtio_devices::HintMode::Ranges) => HintMode::Ranges,
            None => HintMode::None,
        }
    }

    fn unavailable(&self) -> Option<HintsUnavailable> {
        if self.handle.hint_mode().is_none() {
            return Some(HintsUnavailable::NotNegotiated);
        }
        let pci = self.pci.lock().unwrap_or_else(|e| e.into_inner());
        if !pci.is_activated() {
            return Some(HintsUnavailable::NotActive);
        }
        drop(pci);
        if !self.free_page_queue_enabled() {
            return Some(HintsUnavailable::QueueNotEnabled);
        }
        None
    }

    fn start_round(&self) -> Result<Box<dyn HintSource>, HintsUnavailable> {
        if let Some(why) = self.unavailable() {
            return Err(why);
        }
        self.handle
            .start_hint_round()
            .map(|r| Box::new(BalloonHintRound(r)) as Box<dyn HintSource>)
            .map_err(|e| unavailable_because(&e))
    }

    fn stop_round(&self) {
        if let Err(e) = self.handle.stop_hint_round() {
            log::warn!("cannot stop the hint round: {e}");
        }
    }

    fn done(&self) {
        if let Err(e) = self.handle.hint_done() {
            log::warn!("cannot end the hint round: {e}");
        }
    }
}

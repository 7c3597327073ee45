//! The virtio-balloon on the PCI bus, and the free page hints it gives migration.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use hypervisor::Vm;
use virtio_devices::transport::{error_line, ActivationReport};
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
        BalloonHinter(self.handle.clone())
    }

    /// The `balloon` entry of `vm.counters`.
    pub fn counters(&self) -> serde_json::Value {
        // Taken alone: the transport's lock is never held together with the device's own.
        let activation = self
            .pci
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .activation();
        counters_json(&self.handle, &activation)
    }
}

/// The `balloon` entry of `vm.counters`: the device's counters, the driver's target and
/// statistics, and whether the driver got the device running (and if not, why):
/// `device_status`, `activated`, `queues_enabled` (indexes), `activation_error`,
/// `queues_in_use` (the roles the device serves), `hint_mode` and `hinting_unavailable`.
pub fn counters_json(handle: &BalloonHandle, activation: &ActivationReport) -> serde_json::Value {
    let mut entry = serde_json::to_value(handle.counters()).unwrap_or_default();
    if let Some(map) = entry.as_object_mut() {
        map.insert("actual_pages".into(), handle.actual_pages().into());
        map.insert("target_pages".into(), handle.target_pages().into());
        map.insert(
            "stats".into(),
            serde_json::to_value(handle.stats()).unwrap_or_default(),
        );
        map.insert("device_status".into(), activation.device_status.into());
        map.insert("activated".into(), activation.activated.into());
        map.insert(
            "queues_enabled".into(),
            activation.queues_enabled.clone().into(),
        );
        map.insert(
            "activation_error".into(),
            activation.activation_error.clone().into(),
        );
        let in_use: Vec<&str> = handle.active_queues().iter().map(|k| k.name()).collect();
        map.insert("queues_in_use".into(), in_use.into());
        let hinter = BalloonHinter(handle.clone());
        map.insert(
            "hint_mode".into(),
            serde_json::to_value(hinter.mode()).unwrap_or_default(),
        );
        map.insert(
            "hinting_unavailable".into(),
            hinter.unavailable_reason().into(),
        );
    }
    entry
}

/// Free page hints from the balloon.
pub struct BalloonHinter(BalloonHandle);

/// Why the balloon refused to start a round.
fn unavailable_because(e: &virtio_devices::BalloonError) -> HintsUnavailable {
    match e {
        virtio_devices::BalloonError::HintingNotNegotiated => HintsUnavailable::NotNegotiated,
        virtio_devices::BalloonError::NotActive => HintsUnavailable::NotActive,
        virtio_devices::BalloonError::QueueNotEnabled { .. } => HintsUnavailable::QueueNotEnabled,
        other => HintsUnavailable::Other(crate::api::error_chain(other)),
    }
}

impl BalloonHinter {
    /// Why hinting is unavailable (not negotiated, device not started, or started without the
    /// free page queue), as one line; `None` when it is available.
    pub fn unavailable_reason(&self) -> Option<String> {
        self.0.hint_availability().err().map(|e| error_line(&e))
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
    /// [`HintMode::None`] whenever the driver cannot hint, including when it started the
    /// device without enabling the free page queue.
    fn mode(&self) -> HintMode {
        match self.0.hint_mode() {
            Some(virtio_devices::HintMode::Stock) => HintMode::Stock,
            Some(virtio_devices::HintMode::Ranges) => HintMode::Ranges,
            None => HintMode::None,
        }
    }

    fn unavailable(&self) -> Option<HintsUnavailable> {
        self.0
            .hint_availability()
            .err()
            .map(|e| unavailable_because(&e))
    }

    fn start_round(&self) -> Result<Box<dyn HintSource>, HintsUnavailable> {
        // The device checks availability itself and says why it refuses.
        self.0
            .start_hint_round()
            .map(|r| Box::new(BalloonHintRound(r)) as Box<dyn HintSource>)
            .map_err(|e| unavailable_because(&e))
    }

    fn stop_round(&self) {
        if let Err(e) = self.0.stop_hint_round() {
            log::warn!("cannot stop the hint round: {e}");
        }
    }

    fn done(&self) {
        if let Err(e) = self.0.hint_done() {
            log::warn!("cannot end the hint round: {e}");
        }
    }
}

#[cfg(test)]
mod tests {
    use virtio_devices::{InterruptError, MsiMessage, PciDevice, VirtioDevice};
    use vm_memory::GuestAddress;

    use super::*;

    struct NoVectors;

    impl MsiVectors for NoVectors {
        fn len(&self) -> usize {
            6
        }
        fn set_route(&self, _: u16, _: Option<MsiMessage>) -> Result<(), InterruptError> {
            Ok(())
        }
        fn trigger(&self, _: u16) -> Result<(), InterruptError> {
            Ok(())
        }
    }

    fn hinting_balloon() -> (VirtioPciDevice<Balloon>, BalloonHandle) {
        let balloon = Balloon::new(&virtio_devices::BalloonConfig {
            free_page_hinting: true,
            statistics: true,
            ..Default::default()
        })
        .unwrap();
        let handle = balloon.handle();
        let mem = Arc::new(GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 4 << 20)]).unwrap());
        let pci = VirtioPciDevice::new(balloon, mem, Arc::new(NoVectors), None).unwrap();
        (pci, handle)
    }

    /// Status writes and both feature halves, as a driver makes them.
    fn drive(pci: &mut VirtioPciDevice<Balloon>, features: u64, statuses: &[u8]) {
        for half in 0..2u32 {
            pci.write_bar(0, 0x08, &half.to_le_bytes());
            pci.write_bar(0, 0x0C, &((features >> (32 * half)) as u32).to_le_bytes());
        }
        for s in statuses {
            pci.write_bar(0, 0x14, &[*s]);
        }
    }

    #[test]
    fn counters_show_a_device_started_without_its_hint_queue() {
        let (mut pci, handle) = hinting_balloon();
        let features = pci.device().features();
        // ACKNOWLEDGE, DRIVER, FEATURES_OK, DRIVER_OK, and no queue enabled at all.
        drive(&mut pci, features, &[1, 3, 11, 15]);
        let c = counters_json(&handle, &pci.activation());
        assert_eq!(c["device_status"], 15);
        assert_eq!(c["activated"], true);
        assert_eq!(c["queues_enabled"], serde_json::json!([]));
        assert_eq!(c["queues_in_use"], serde_json::json!([]));
        assert_eq!(c["activation_error"], serde_json::Value::Null);
        assert_eq!(c["hint_mode"], "none");
        let why = c["hinting_unavailable"].as_str().unwrap();
        assert!(why.contains("free_page queue"), "{why}");
        for kept in [
            "inflated_pages",
            "hint_rounds",
            "hinted_pages",
            "reported_pages",
        ] {
            assert_eq!(c[kept], 0, "{kept}");
        }
        // Every way the VMM asks about hinting says no.
        let hinter = BalloonHinter(handle.clone());
        assert_eq!(hinter.mode(), HintMode::None);
        assert!(hinter.start_round().is_err());
        assert!(handle.resize(1 << 20).is_err());
    }

    #[test]
    fn counters_say_why_the_device_was_refused() {
        let (mut pci, handle) = hinting_balloon();
        // DRIVER_OK without FEATURES_OK.
        drive(&mut pci, 1 << 32, &[1, 3, 7]);
        let c = counters_json(&handle, &pci.activation());
        assert_eq!(c["activated"], false);
        assert_eq!(
            c["activation_error"],
            "The driver set DRIVER_OK without FEATURES_OK"
        );
        assert_ne!(
            c["device_status"].as_u64().unwrap() & 0x40,
            0,
            "NEEDS_RESET"
        );
        assert_eq!(c["hint_mode"], "none");
        assert_eq!(
            c["hinting_unavailable"],
            "The guest driver did not negotiate free page hinting"
        );
    }
}

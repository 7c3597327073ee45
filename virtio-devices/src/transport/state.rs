//! Migration state of a virtio-pci function: plain data, validated on restore.

use std::sync::atomic::Ordering;

use serde::{Deserialize, Serialize};
use virtio_queue::{Queue, QueueState, QueueT};

use super::device::VirtioPciDevice;
use super::{VirtioPciError, VIRTIO_MSI_NO_VECTOR};
use crate::pci::MsixState;
use crate::sync::lock;
use crate::virtio::{VirtioDevice, DEVICE_DRIVER_OK, DEVICE_FEATURES_OK, VIRTIO_F_VERSION_1};

/// The driver-visible registers of the common configuration that are not queue state.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CommonConfigState {
    /// `device_feature_select`.
    pub device_feature_select: u32,
    /// `driver_feature_select`.
    pub driver_feature_select: u32,
    /// Features written by the driver (all 64 bits).
    pub driver_features: u64,
    /// `device_status` (without DEVICE_NEEDS_RESET, which is saved separately).
    pub device_status: u8,
    /// `queue_select`.
    pub queue_select: u16,
}

/// A serializable copy of virtio-queue's [`QueueState`]. Untrusted: checked on restore.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueueSnapshot {
    /// Maximum size offered by the device.
    pub max_size: u16,
    /// Next available ring index to consume.
    pub next_avail: u16,
    /// Next used ring index to fill.
    pub next_used: u16,
    /// Whether VIRTIO_F_RING_EVENT_IDX is in use.
    pub event_idx_enabled: bool,
    /// Size chosen by the driver.
    pub size: u16,
    /// `queue_enable`.
    pub ready: bool,
    /// Descriptor table address.
    pub desc_table: u64,
    /// Available (driver) ring address.
    pub avail_ring: u64,
    /// Used (device) ring address.
    pub used_ring: u64,
}

impl From<QueueState> for QueueSnapshot {
    fn from(s: QueueState) -> Self {
        QueueSnapshot {
            max_size: s.max_size,
            next_avail: s.next_avail,
            next_used: s.next_used,
            event_idx_enabled: s.event_idx_enabled,
            size: s.size,
            ready: s.ready,
            desc_table: s.desc_table,
            avail_ring: s.avail_ring,
            used_ring: s.used_ring,
        }
    }
}

impl From<QueueSnapshot> for QueueState {
    fn from(s: QueueSnapshot) -> Self {
        QueueState {
            max_size: s.max_size,
            next_avail: s.next_avail,
            next_used: s.next_used,
            event_idx_enabled: s.event_idx_enabled,
            size: s.size,
            ready: s.ready,
            desc_table: s.desc_table,
            avail_ring: s.avail_ring,
            used_ring: s.used_ring,
        }
    }
}

/// Everything needed to recreate a virtio-pci function on the destination.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct VirtioPciState<S> {
    /// The 64 configuration space registers (BAR addresses and capabilities included).
    pub config_registers: Vec<u32>,
    /// MSI-X table, PBA and control bits.
    pub msix: MsixState,
    /// Common configuration registers.
    pub common: CommonConfigState,
    /// `msix_config`.
    pub config_vector: u16,
    /// `queue_msix_vector` of each queue.
    pub queue_vectors: Vec<u16>,
    /// Each queue.
    pub queues: Vec<QueueSnapshot>,
    /// Pending ISR bits.
    pub isr: u8,
    /// `config_generation`.
    pub config_generation: u8,
    /// Whether DEVICE_NEEDS_RESET was raised.
    pub needs_reset: bool,
    /// The device's own state.
    pub device: S,
}

fn invalid(msg: impl Into<String>) -> VirtioPciError {
    VirtioPciError::InvalidState(msg.into())
}

impl<D: VirtioDevice> VirtioPciDevice<D> {
    /// Capture the state. Pause the device first ([`VirtioPciDevice::pause`]) so that the
    /// queues do not move afterwards.
    pub fn state(&self) -> VirtioPciState<D::State> {
        VirtioPciState {
            config_registers: self.config.registers(),
            msix: lock(&self.msix).state(),
            common: self.common,
            config_vector: self.interrupt.config_vector.load(Ordering::SeqCst),
            queue_vectors: self
                .interrupt
                .queue_vectors
                .iter()
                .map(|v| v.load(Ordering::SeqCst))
                .collect(),
            queues: self.queues.iter().map(|q| lock(q).state().into()).collect(),
            isr: self.interrupt.isr.load(Ordering::SeqCst),
            config_generation: self.interrupt.config_generation.load(Ordering::SeqCst),
            needs_reset: self.interrupt.needs_reset.load(Ordering::SeqCst),
            device: self.device.state(),
        }
    }

    /// Load a saved state into this freshly created (never activated) device, then start the
    /// device if the driver had it running. Pushes MSI routes to the VMM. Afterwards, register
    /// [`crate::PciDevice::ioeventfds`] at the restored BAR address.
    pub fn restore(&mut self, state: VirtioPciState<D::State>) -> Result<(), VirtioPciError> {
        if self.activated || self.common.device_status != 0 {
            return Err(invalid("the device is already in use"));
        }
        let n = self.queues.len();
        if state.queues.len() != n || state.queue_vectors.len() != n {
            return Err(invalid(format!(
                "{} queues, expected {n}",
                state.queues.len()
            )));
        }
        let num_vectors = lock(&self.msix).num_vectors();
        let vector_ok = |v: u16| v == VIRTIO_MSI_NO_VECTOR || usize::from(v) < num_vectors;
        if !vector_ok(state.config_vector) || !state.queue_vectors.iter().all(|v| vector_ok(*v)) {
            return Err(invalid("MSI-X vector out of range"));
        }
        let c = &state.common;
        if c.device_status & DEVICE_FEATURES_OK != 0
            && (c.driver_features & !self.offered_features != 0
                || c.driver_features & (1 << VIRTIO_F_VERSION_1) == 0)
        {
            return Err(invalid("negotiated features were never offered"));
        }
        if c.device_status & DEVICE_DRIVER_OK != 0 && c.device_status & DEVICE_FEATURES_OK == 0 {
            return Err(invalid("DRIVER_OK without FEATURES_OK"));
        }
        let mut queues = Vec::with_capacity(n);
        for (i, (snap, shared)) in state.queues.iter().zip(&self.queues).enumerate() {
            let max = lock(shared).max_size();
            if snap.max_size != max {
                return Err(invalid(format!("queue {i} max size {}", snap.max_size)));
            }
            let q = Queue::try_from(QueueState::from(*snap))
                .map_err(|e| invalid(format!("queue {i}: {e}")))?;
            if q.ready() && !q.is_valid(self.mem.as_ref()) {
                return Err(invalid(format!("queue {i} is outside guest memory")));
            }
            queues.push(q);
        }

        let mut config = self.config.clone();
        config
            .restore_registers(&state.config_registers)
            .map_err(VirtioPciError::InvalidPciState)?;
        self.device
            .restore(state.device)
            .map_err(VirtioPciError::InvalidDeviceState)?;
        lock(&self.msix)
            .restore(&state.msix)
            .map_err(VirtioPciError::InvalidPciState)?;
        self.config = config;
        for (shared, q) in self.queues.iter().zip(queues) {
            *lock(shared) = q;
        }
        let irq = &self.interrupt;
        irq.config_vector
            .store(state.config_vector, Ordering::SeqCst);
        for (v, saved) in irq.queue_vectors.iter().zip(&state.queue_vectors) {
            v.store(*saved, Ordering::SeqCst);
        }
        irq.isr.store(state.isr, Ordering::SeqCst);
        irq.config_generation
            .store(state.config_generation, Ordering::SeqCst);
        irq.needs_reset.store(state.needs_reset, Ordering::SeqCst);
        self.common = state.common;
        if self.common.device_status & DEVICE_DRIVER_OK != 0 && !state.needs_reset {
            self.activate().map_err(VirtioPciError::Activate)?;
        }
        Ok(())
    }
}

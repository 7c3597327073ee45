//! The common configuration structure and the device status state machine.
//!
//! ```text
//!  0  ──► ACKNOWLEDGE ──► DRIVER ──► FEATURES_OK ──► DRIVER_OK (activate)
//!                                    │ refused if the driver acked a bit that was not
//!                                    │ offered, or not VERSION_1
//!  any state ── write 0 ──► reset;  errors ──► DEVICE_NEEDS_RESET (+ config interrupt)
//! ```
//!
//! At DRIVER_OK the device gets the queues the driver enabled, whichever and however many
//! (enabling is up to the driver, in any order), each under its own index. Every refusal is
//! kept, as one line, for [`VirtioPciDevice::activation`].

use std::sync::atomic::Ordering;
use std::sync::Arc;

use log::{debug, warn};
use virtio_queue::{Queue, QueueT};
use vm_memory::GuestAddress;

use super::activation::{error_line, ActivationError};
use super::device::{le_value, VirtioPciDevice};
use super::state::CommonConfigState;
use super::VIRTIO_MSI_NO_VECTOR;
use crate::interrupt::VirtioInterrupt;
use crate::sync::lock;
use crate::virtio::{
    VirtioDevice, VirtioQueue, DEVICE_DRIVER_OK, DEVICE_FEATURES_OK, DEVICE_NEEDS_RESET,
    VIRTIO_F_RING_EVENT_IDX, VIRTIO_F_VERSION_1,
};

// Offsets in the common configuration structure (virtio 1.2, 4.1.4.3).
const DEVICE_FEATURE_SELECT: u64 = 0x00;
const DEVICE_FEATURE: u64 = 0x04;
const DRIVER_FEATURE_SELECT: u64 = 0x08;
const DRIVER_FEATURE: u64 = 0x0C;
const MSIX_CONFIG: u64 = 0x10;
const NUM_QUEUES: u64 = 0x12;
const DEVICE_STATUS: u64 = 0x14;
const CONFIG_GENERATION: u64 = 0x15;
const QUEUE_SELECT: u64 = 0x16;
const QUEUE_SIZE: u64 = 0x18;
const QUEUE_MSIX_VECTOR: u64 = 0x1A;
const QUEUE_ENABLE: u64 = 0x1C;
const QUEUE_NOTIFY_OFF: u64 = 0x1E;
const QUEUE_DESC: u64 = 0x20;
const QUEUE_DRIVER: u64 = 0x28;
const QUEUE_DEVICE: u64 = 0x30;
const COMMON_CFG_LEN: usize = 0x38;

#[derive(Clone, Copy)]
enum RingPart {
    Desc,
    Driver,
    Device,
}

fn split(v: u64) -> (u32, u32) {
    (v as u32, (v >> 32) as u32)
}

impl<D: VirtioDevice> VirtioPciDevice<D> {
    fn selected_queue(&self) -> Option<usize> {
        let q = usize::from(self.common.queue_select);
        (q < self.queues.len()).then_some(q)
    }

    fn image(&self) -> [u8; COMMON_CFG_LEN] {
        let mut img = [0u8; COMMON_CFG_LEN];
        let mut put = |off: u64, bytes: &[u8]| {
            img[off as usize..off as usize + bytes.len()].copy_from_slice(bytes);
        };
        let c = &self.common;
        let half = |v: u64, sel: u32| match sel {
            0 => v as u32,
            1 => (v >> 32) as u32,
            _ => 0,
        };
        put(
            DEVICE_FEATURE_SELECT,
            &c.device_feature_select.to_le_bytes(),
        );
        put(
            DEVICE_FEATURE,
            &half(self.offered_features, c.device_feature_select).to_le_bytes(),
        );
        put(
            DRIVER_FEATURE_SELECT,
            &c.driver_feature_select.to_le_bytes(),
        );
        put(
            DRIVER_FEATURE,
            &half(c.driver_features, c.driver_feature_select).to_le_bytes(),
        );
        let config_vector = self.interrupt.config_vector.load(Ordering::SeqCst);
        put(MSIX_CONFIG, &config_vector.to_le_bytes());
        put(NUM_QUEUES, &(self.queues.len() as u16).to_le_bytes());
        put(DEVICE_STATUS, &[self.device_status()]);
        put(
            CONFIG_GENERATION,
            &[self.interrupt.config_generation.load(Ordering::SeqCst)],
        );
        put(QUEUE_SELECT, &c.queue_select.to_le_bytes());
        if let Some(i) = self.selected_queue() {
            let q = lock(&self.queues[i]);
            let vector = self.interrupt.queue_vectors[i].load(Ordering::SeqCst);
            put(QUEUE_SIZE, &q.size().to_le_bytes());
            put(QUEUE_MSIX_VECTOR, &vector.to_le_bytes());
            put(QUEUE_ENABLE, &u16::from(q.ready()).to_le_bytes());
            put(QUEUE_NOTIFY_OFF, &(i as u16).to_le_bytes());
            put(QUEUE_DESC, &q.desc_table().to_le_bytes());
            put(QUEUE_DRIVER, &q.avail_ring().to_le_bytes());
            put(QUEUE_DEVICE, &q.used_ring().to_le_bytes());
        }
        img
    }

    /// Guest read of the common configuration (any width).
    pub(super) fn read_common(&self, offset: u64, data: &mut [u8]) {
        let img = self.image();
        for (i, b) in data.iter_mut().enumerate() {
            *b = img.get(offset as usize + i).copied().unwrap_or(0);
        }
    }

    /// Guest write of the common configuration: each field only at its natural width (64-bit
    /// addresses also as two 32-bit halves); anything else is ignored.
    pub(super) fn write_common(&mut self, offset: u64, data: &[u8]) {
        let v = le_value(data);
        match (offset, data.len()) {
            (DEVICE_FEATURE_SELECT, 4) => self.common.device_feature_select = v as u32,
            (DRIVER_FEATURE_SELECT, 4) => self.common.driver_feature_select = v as u32,
            (DRIVER_FEATURE, 4) => self.write_driver_features(v as u32),
            (MSIX_CONFIG, 2) => {
                let vector = self.checked_vector(v as u16);
                self.interrupt.config_vector.store(vector, Ordering::SeqCst);
            }
            (DEVICE_STATUS, 1) => self.set_status(v as u8),
            (QUEUE_SELECT, 2) => self.common.queue_select = v as u16,
            (QUEUE_SIZE, 2) => self.with_config_queue(|q| {
                if q.try_set_size(v as u16).is_err() {
                    debug!("virtio-pci: refusing queue size {v}");
                }
            }),
            (QUEUE_MSIX_VECTOR, 2) => {
                if let Some(i) = self.selected_queue() {
                    let vector = self.checked_vector(v as u16);
                    self.interrupt.queue_vectors[i].store(vector, Ordering::SeqCst);
                }
            }
            (QUEUE_ENABLE, 2) => {
                if v == 1 {
                    self.enable_queue();
                }
            }
            (QUEUE_DESC, 4) | (QUEUE_DRIVER, 4) | (QUEUE_DEVICE, 4) => {
                self.set_ring_address(offset, Some(v as u32), None)
            }
            (o, 4) if matches!(o, 0x24 | 0x2C | 0x34) => {
                self.set_ring_address(o - 4, None, Some(v as u32))
            }
            (QUEUE_DESC, 8) | (QUEUE_DRIVER, 8) | (QUEUE_DEVICE, 8) => {
                let (lo, hi) = split(v);
                self.set_ring_address(offset, Some(lo), Some(hi))
            }
            (o, l) => debug!("virtio-pci: ignoring {l}-byte common config write at {o:#x}"),
        }
    }

    fn write_driver_features(&mut self, value: u32) {
        if self.common.device_status & DEVICE_FEATURES_OK != 0 {
            debug!("virtio-pci: driver features written after FEATURES_OK");
            return;
        }
        let f = &mut self.common.driver_features;
        match self.common.driver_feature_select {
            0 => *f = (*f & !0xFFFF_FFFF) | u64::from(value),
            1 => *f = (*f & 0xFFFF_FFFF) | u64::from(value) << 32,
            sel => debug!("virtio-pci: driver feature select {sel} has no features"),
        }
    }

    /// A vector the driver asked for, or NO_VECTOR when the table has no such entry.
    fn checked_vector(&self, vector: u16) -> u16 {
        if usize::from(vector) < lock(&self.msix).num_vectors() {
            vector
        } else {
            VIRTIO_MSI_NO_VECTOR
        }
    }

    /// Run `f` on the selected queue if the driver may still configure it.
    fn with_config_queue(&mut self, f: impl FnOnce(&mut Queue)) {
        if self.common.device_status & DEVICE_DRIVER_OK != 0 {
            debug!("virtio-pci: queue configuration after DRIVER_OK ignored");
            return;
        }
        if let Some(i) = self.selected_queue() {
            let mut q = lock(&self.queues[i]);
            if q.ready() {
                debug!("virtio-pci: queue {i} is enabled; configuration ignored");
                return;
            }
            f(&mut q);
        }
    }

    fn set_ring_address(&mut self, field: u64, lo: Option<u32>, hi: Option<u32>) {
        let part = match field {
            QUEUE_DESC => RingPart::Desc,
            QUEUE_DRIVER => RingPart::Driver,
            _ => RingPart::Device,
        };
        self.with_config_queue(|q| {
            let old = match part {
                RingPart::Desc => q.desc_table(),
                RingPart::Driver => q.avail_ring(),
                RingPart::Device => q.used_ring(),
            };
            let (old_lo, old_hi) = split(old);
            let addr = u64::from(hi.unwrap_or(old_hi)) << 32 | u64::from(lo.unwrap_or(old_lo));
            let res = match part {
                RingPart::Desc => q.try_set_desc_table_address(GuestAddress(addr)),
                RingPart::Driver => q.try_set_avail_ring_address(GuestAddress(addr)),
                RingPart::Device => q.try_set_used_ring_address(GuestAddress(addr)),
            };
            if res.is_err() {
                debug!("virtio-pci: misaligned ring address {addr:#x} refused");
            }
        });
    }

    fn enable_queue(&mut self) {
        let mem = self.mem.clone();
        let mut invalid = false;
        self.with_config_queue(|q| {
            q.set_ready(true);
            if !q.is_valid(mem.as_ref()) {
                q.set_ready(false);
                invalid = true;
            }
        });
        if invalid {
            let queue = self.common.queue_select;
            self.refuse(ActivationError::QueueOutsideMemory(queue), true);
        }
    }

    /// Record why the driver's setup was refused (shown in [`VirtioPciDevice::activation`]),
    /// and ask the driver for a reset when the device cannot go on.
    fn refuse(&mut self, error: ActivationError, needs_reset: bool) {
        let line = error_line(&error);
        warn!("virtio-pci: {line}");
        self.activation_error = Some(line);
        if needs_reset {
            self.interrupt.signal_needs_reset();
        }
    }

    fn features_acceptable(&self) -> bool {
        let f = self.common.driver_features;
        f & !self.offered_features == 0 && f & (1 << VIRTIO_F_VERSION_1) != 0
    }

    /// Guest write of `device_status`.
    pub(super) fn set_status(&mut self, value: u8) {
        if value == 0 {
            self.reset();
            return;
        }
        let old = self.common.device_status;
        let mut new = value & !DEVICE_NEEDS_RESET;
        if new & old != old {
            debug!("virtio-pci: driver cleared status bits ({old:#x} -> {new:#x}); ignored");
            return;
        }
        let added = new & !old;
        if added & DEVICE_FEATURES_OK != 0 {
            if self.features_acceptable() {
                self.device
                    .ack_features(self.common.driver_features & self.offered_features);
            } else {
                let refused = ActivationError::FeaturesRefused {
                    acked: self.common.driver_features,
                    offered: self.offered_features,
                };
                self.refuse(refused, false);
                new &= !DEVICE_FEATURES_OK;
            }
        }
        if added & DEVICE_DRIVER_OK != 0 && new & DEVICE_FEATURES_OK == 0 {
            new &= !DEVICE_DRIVER_OK;
            self.common.device_status = new;
            self.refuse(ActivationError::DriverOkWithoutFeaturesOk, true);
            return;
        }
        self.common.device_status = new;
        if added & DEVICE_DRIVER_OK != 0 {
            if let Err(e) = self.activate() {
                self.refuse(ActivationError::Device(e), true);
            }
        }
    }

    /// Hand the queues the driver enabled (any subset; the rest stay with the transport) to the
    /// device, each with its index.
    pub(super) fn activate(&mut self) -> Result<(), crate::virtio::VirtioDeviceError> {
        let negotiated = self.common.driver_features & self.offered_features;
        let mut queues = Vec::new();
        for (i, shared) in self.queues.iter().enumerate() {
            let mut q = lock(shared);
            if !q.ready() {
                continue;
            }
            if !q.is_valid(self.mem.as_ref()) {
                return Err(crate::virtio::VirtioDeviceError::InvalidQueue(i as u16));
            }
            q.set_event_idx(negotiated & (1 << VIRTIO_F_RING_EVENT_IDX) != 0);
            queues.push(VirtioQueue {
                index: i as u16,
                queue: shared.clone(),
                event: self.queue_events[i].clone(),
            });
        }
        let interrupt: Arc<dyn VirtioInterrupt> = self.interrupt.clone();
        self.device.activate(self.mem.clone(), interrupt, queues)?;
        self.activated = true;
        self.activation_error = None;
        Ok(())
    }

    /// Device reset (status written to 0). The last activation error stays visible until the
    /// device activates again.
    pub(super) fn reset(&mut self) {
        if let Some(failure) = self.activated.then(|| self.device.failure()).flatten() {
            self.activation_error = Some(failure);
        }
        self.device.reset();
        self.activated = false;
        for q in &self.queues {
            lock(q).reset();
        }
        // Drain stale notifications.
        for evt in &self.queue_events {
            let _ = evt.read();
        }
        self.interrupt.reset();
        self.common = CommonConfigState::default();
    }
}

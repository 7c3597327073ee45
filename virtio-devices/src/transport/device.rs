//! [`VirtioPciDevice`]: a [`VirtioDevice`] behind a modern virtio-pci function.

use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};

use log::debug;
use virtio_queue::{Queue, QueueT};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::interrupt::PciInterrupt;
use super::state::CommonConfigState;
use super::*;
use crate::interrupt::{IntxLine, MsiVectors};
use crate::pci::{
    merge_bytes_le, MsixConfig, PciBarInfo, PciBarKind, PciConfiguration, PciConfigurationParams,
    PciDevice, PciError, PciIoEvent, PCI_CAP_ID_VENDOR, PCI_STATUS_INTERRUPT,
};
use crate::sync::lock;
use crate::virtio::{SharedQueue, VirtioDevice, VIRTIO_F_VERSION_1, VIRTIO_ID_BALLOON};
use crate::GuestMemoryMmap;

const MSIX_CONTROL_WMASK: u8 = 0xC0;

/// A virtio device on the PCI bus (modern interface only, device id 0x1040 + type).
pub struct VirtioPciDevice<D: VirtioDevice> {
    pub(super) config: PciConfiguration,
    pub(super) device: D,
    pub(super) mem: Arc<GuestMemoryMmap>,
    pub(super) msix: Arc<Mutex<MsixConfig>>,
    pub(super) msix_cap: usize,
    pub(super) pci_cfg_cap: usize,
    pub(super) interrupt: Arc<PciInterrupt>,
    pub(super) common: CommonConfigState,
    pub(super) queues: Vec<SharedQueue>,
    pub(super) queue_events: Vec<Arc<EventFd>>,
    pub(super) offered_features: u64,
    pub(super) activated: bool,
    pub(super) activation_error: Option<String>,
}

impl<D: VirtioDevice> std::fmt::Debug for VirtioPciDevice<D> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VirtioPciDevice")
            .field("device_type", &self.device.device_type())
            .field("status", &self.common.device_status)
            .field("activated", &self.activated)
            .finish()
    }
}

fn class_of(device_type: u32) -> (u8, u8) {
    match device_type {
        // Memory controller, other.
        VIRTIO_ID_BALLOON => (0x05, 0x80),
        _ => (0xFF, 0x00),
    }
}

fn virtio_cap(cfg_type: u8, offset: u64, length: u64, extra: &[u8]) -> Vec<u8> {
    let mut cap = vec![
        PCI_CAP_ID_VENDOR,
        0,
        (16 + extra.len()) as u8,
        cfg_type,
        0,
        0,
        0,
        0,
    ];
    cap.extend_from_slice(&(offset as u32).to_le_bytes());
    cap.extend_from_slice(&(length as u32).to_le_bytes());
    cap.extend_from_slice(extra);
    cap
}

impl<D: VirtioDevice> VirtioPciDevice<D> {
    /// Wrap `device`. `msi` delivers MSI-X vectors (one for configuration changes plus one per
    /// queue, or fewer if `msi` has fewer); `intx` is the optional legacy line and the
    /// interrupt line number shown in configuration space. BAR 0 is left unassigned.
    pub fn new(
        device: D,
        mem: Arc<GuestMemoryMmap>,
        msi: Arc<dyn MsiVectors>,
        intx: Option<(Arc<dyn IntxLine>, u8)>,
    ) -> Result<Self, VirtioPciError> {
        let max_sizes = device.queue_max_sizes();
        let num_queues = max_sizes.len();
        if num_queues as u64 * u64::from(NOTIFY_OFF_MULTIPLIER) > NOTIFY_CFG_SIZE {
            return Err(VirtioPciError::TooManyQueues(num_queues));
        }
        let device_type = device.device_type();
        let (class_code, subclass) = class_of(device_type);
        let mut config = PciConfiguration::new(&PciConfigurationParams {
            vendor_id: VIRTIO_PCI_VENDOR_ID,
            device_id: VIRTIO_PCI_DEVICE_ID_BASE.wrapping_add(device_type as u16),
            revision_id: 1,
            class_code,
            subclass,
            prog_if: 0,
            subsystem_vendor_id: VIRTIO_PCI_VENDOR_ID,
            subsystem_id: VIRTIO_PCI_SUBSYSTEM_ID,
        });
        config
            .add_bar(0, BAR_SIZE, PciBarKind::Memory32, false)
            .map_err(VirtioPciError::Pci)?;

        let vectors = (num_queues + 1).min(msi.len()).min(MAX_MSIX_VECTORS);
        let msix = MsixConfig::new(vectors, msi).map_err(VirtioPciError::Pci)?;
        let msix_cap = config
            .add_capability(&msix.capability(
                0,
                MSIX_TABLE_OFFSET as u32,
                0,
                MSIX_PBA_OFFSET as u32,
            ))
            .map_err(VirtioPciError::Pci)?;
        config.set_wmask_bytes(msix_cap + 3, &[MSIX_CONTROL_WMASK]);

        let notify_extra = NOTIFY_OFF_MULTIPLIER.to_le_bytes();
        let caps = [
            virtio_cap(
                VIRTIO_PCI_CAP_COMMON_CFG,
                COMMON_CFG_OFFSET,
                COMMON_CFG_SIZE,
                &[],
            ),
            virtio_cap(
                VIRTIO_PCI_CAP_NOTIFY_CFG,
                NOTIFY_CFG_OFFSET,
                NOTIFY_CFG_SIZE,
                &notify_extra,
            ),
            virtio_cap(VIRTIO_PCI_CAP_ISR_CFG, ISR_CFG_OFFSET, ISR_CFG_SIZE, &[]),
            virtio_cap(
                VIRTIO_PCI_CAP_DEVICE_CFG,
                DEVICE_CFG_OFFSET,
                DEVICE_CFG_SIZE,
                &[],
            ),
        ];
        for cap in caps {
            config.add_capability(&cap).map_err(VirtioPciError::Pci)?;
        }
        let pci_cfg_cap = config
            .add_capability(&virtio_cap(VIRTIO_PCI_CAP_PCI_CFG, 0, 0, &[0; 4]))
            .map_err(VirtioPciError::Pci)?;
        // bar, offset, length and the data window are the driver's to write.
        config.set_wmask_bytes(pci_cfg_cap + 4, &[0xFF]);
        config.set_wmask_bytes(pci_cfg_cap + 8, &[0xFF; 12]);

        let intx_line = intx.as_ref().map(|(line, _)| line.clone());
        if let Some((_, irq)) = intx {
            config.set_interrupt(1, irq);
        }

        let mut queues = Vec::with_capacity(num_queues);
        let mut queue_events = Vec::with_capacity(num_queues);
        for (i, max) in max_sizes.iter().enumerate() {
            let q = Queue::new(*max).map_err(|_| VirtioPciError::Queue(i as u16))?;
            queues.push(Arc::new(Mutex::new(q)));
            queue_events.push(Arc::new(
                EventFd::new(EFD_NONBLOCK).map_err(VirtioPciError::EventFd)?,
            ));
        }
        let msix = Arc::new(Mutex::new(msix));
        let interrupt = Arc::new(PciInterrupt::new(msix.clone(), intx_line, num_queues));
        let offered_features = device.features() | 1 << VIRTIO_F_VERSION_1;
        Ok(VirtioPciDevice {
            config,
            device,
            mem,
            msix,
            msix_cap,
            pci_cfg_cap,
            interrupt,
            common: CommonConfigState::default(),
            queues,
            queue_events,
            offered_features,
            activated: false,
            activation_error: None,
        })
    }

    /// The wrapped device.
    pub fn device(&self) -> &D {
        &self.device
    }

    /// The wrapped device, mutably.
    pub fn device_mut(&mut self) -> &mut D {
        &mut self.device
    }

    /// Whether the device is running (the driver set DRIVER_OK and activation worked).
    pub fn is_activated(&self) -> bool {
        self.activated
    }

    /// The driver's status byte, the queues it enabled, whether the device runs and, if it
    /// refused the driver's setup or stopped working, why.
    pub fn activation(&self) -> ActivationReport {
        let queues_enabled = self
            .queues
            .iter()
            .enumerate()
            .filter(|(_, q)| lock(q).ready())
            .map(|(i, _)| i as u16)
            .collect();
        let failure = self.activated.then(|| self.device.failure()).flatten();
        ActivationReport {
            device_status: self.device_status(),
            activated: self.activated && failure.is_none(),
            queues_enabled,
            activation_error: failure.or_else(|| self.activation_error.clone()),
        }
    }

    /// The device status register as the driver reads it.
    pub fn device_status(&self) -> u8 {
        let mut status = self.common.device_status;
        if self.interrupt.needs_reset.load(Ordering::SeqCst) {
            status |= crate::virtio::DEVICE_NEEDS_RESET;
        }
        status
    }

    /// The address of BAR 0 (0 while unassigned).
    pub fn bar_address(&self) -> u64 {
        self.config.bar_address(0).unwrap_or(0)
    }

    /// The notification event of each queue, in queue order.
    pub fn queue_events(&self) -> &[Arc<EventFd>] {
        &self.queue_events
    }

    /// Stop the device's processing (before taking a snapshot).
    pub fn pause(&mut self) {
        self.device.pause();
    }

    /// Resume processing after [`VirtioPciDevice::pause`].
    pub fn resume(&mut self) {
        self.device.resume();
    }

    fn sync_msix_control(&mut self) {
        let ctl = self.config.read_u16(self.msix_cap + 2);
        let mut msix = lock(&self.msix);
        msix.set_message_control(ctl);
        let actual = msix.message_control();
        drop(msix);
        self.config
            .write_bytes_raw(self.msix_cap + 2, &actual.to_le_bytes());
    }

    /// The BAR access a write or read of the PCI configuration access capability's data
    /// window stands for: (offset in BAR 0, length).
    fn pci_cfg_target(&self) -> Option<(u64, usize)> {
        let cap = self.pci_cfg_cap;
        let mut bar = [0u8; 1];
        self.config.read_bytes(cap + 4, &mut bar);
        let offset = u64::from(self.config.read_u32(cap + 8));
        let len = self.config.read_u32(cap + 12) as usize;
        (bar[0] == 0 && matches!(len, 1 | 2 | 4) && offset % len as u64 == 0)
            .then_some((offset, len))
    }

    fn overlaps(reg: usize, offset: u64, len: usize, start: usize, size: usize) -> bool {
        let a = reg * 4 + offset as usize;
        a < start + size && start < a + len
    }
}

impl<D: VirtioDevice> PciDevice for VirtioPciDevice<D> {
    fn read_config_register(&mut self, reg: usize) -> u32 {
        let data_reg = (self.pci_cfg_cap + 16) / 4;
        if reg == data_reg {
            if let Some((offset, len)) = self.pci_cfg_target() {
                let mut buf = [0u8; 4];
                self.read_bar(0, offset, &mut buf[..len]);
                self.config.write_bytes_raw(self.pci_cfg_cap + 16, &buf);
            }
        }
        let mut value = self.config.read_reg(reg);
        if reg == 1 && !lock(&self.msix).enabled() && self.interrupt.isr.load(Ordering::SeqCst) != 0
        {
            value |= u32::from(PCI_STATUS_INTERRUPT) << 16;
        }
        value
    }

    fn write_config_register(&mut self, reg: usize, offset: u64, data: &[u8]) {
        self.config.write_reg(reg, offset, data);
        if Self::overlaps(reg, offset, data.len(), self.msix_cap + 2, 2) {
            self.sync_msix_control();
        }
        if Self::overlaps(reg, offset, data.len(), self.pci_cfg_cap + 16, 4) {
            if let Some((bar_offset, len)) = self.pci_cfg_target() {
                let mut buf = [0u8; 4];
                self.config.read_bytes(self.pci_cfg_cap + 16, &mut buf);
                self.write_bar(0, bar_offset, &buf[..len]);
            }
        }
    }

    fn bars(&self) -> Vec<PciBarInfo> {
        self.config.bars()
    }

    fn set_bar_address(&mut self, index: usize, addr: u64) -> Result<(), PciError> {
        self.config.set_bar_address(index, addr)
    }

    fn read_bar(&mut self, index: usize, offset: u64, data: &mut [u8]) {
        data.fill(0);
        if index != 0 {
            return;
        }
        match offset {
            o if o < COMMON_CFG_OFFSET + COMMON_CFG_SIZE => self.read_common(o, data),
            o if (ISR_CFG_OFFSET..ISR_CFG_OFFSET + ISR_CFG_SIZE).contains(&o) => {
                if let Some(b) = data.first_mut() {
                    // Reading the ISR acknowledges it.
                    *b = self.interrupt.isr.swap(0, Ordering::SeqCst);
                }
            }
            o if (DEVICE_CFG_OFFSET..DEVICE_CFG_OFFSET + DEVICE_CFG_SIZE).contains(&o) => {
                self.device.read_config(o - DEVICE_CFG_OFFSET, data)
            }
            o if (MSIX_TABLE_OFFSET..MSIX_PBA_OFFSET).contains(&o) => {
                lock(&self.msix).read_table(o - MSIX_TABLE_OFFSET, data)
            }
            o if (MSIX_PBA_OFFSET..BAR_SIZE).contains(&o) => {
                lock(&self.msix).read_pba(o - MSIX_PBA_OFFSET, data)
            }
            _ => {}
        }
    }

    fn write_bar(&mut self, index: usize, offset: u64, data: &[u8]) {
        if index != 0 {
            return;
        }
        match offset {
            o if o < COMMON_CFG_OFFSET + COMMON_CFG_SIZE => self.write_common(o, data),
            o if (DEVICE_CFG_OFFSET..DEVICE_CFG_OFFSET + DEVICE_CFG_SIZE).contains(&o) => {
                self.device.write_config(o - DEVICE_CFG_OFFSET, data)
            }
            o if (NOTIFY_CFG_OFFSET..NOTIFY_CFG_OFFSET + NOTIFY_CFG_SIZE).contains(&o) => {
                let queue = ((o - NOTIFY_CFG_OFFSET) / u64::from(NOTIFY_OFF_MULTIPLIER)) as usize;
                match self.queue_events.get(queue) {
                    Some(evt) => {
                        if let Err(e) = evt.write(1) {
                            log::warn!("virtio-pci: failed to signal queue {queue}: {e}");
                        }
                    }
                    None => debug!("virtio-pci: notify for missing queue {queue}"),
                }
            }
            o if (MSIX_TABLE_OFFSET..MSIX_PBA_OFFSET).contains(&o) => {
                lock(&self.msix).write_table(o - MSIX_TABLE_OFFSET, data)
            }
            _ => debug!("virtio-pci: ignoring write at BAR offset {offset:#x}"),
        }
    }

    fn ioeventfds(&self) -> Vec<PciIoEvent> {
        let base = self.bar_address();
        if base == 0 {
            return Vec::new();
        }
        self.queue_events
            .iter()
            .enumerate()
            .map(|(i, event)| PciIoEvent {
                addr: base + NOTIFY_CFG_OFFSET + i as u64 * u64::from(NOTIFY_OFF_MULTIPLIER),
                datamatch: None,
                event: event.clone(),
            })
            .collect()
    }
}

/// Little-endian value of a 1..=8 byte access.
pub(super) fn le_value(data: &[u8]) -> u64 {
    merge_bytes_le(data)
}

//! The PCI side of the device model: the conf1 ports, the 32-bit MMIO window where BARs live,
//! and the ioeventfds of each device's BARs, moved when the guest moves a BAR.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use hypervisor::{DataMatch, IoEventAddress, Vm, VmError};
use virtio_devices::{BarAllocator, PciBus, PciConfigIo, PciIoEvent, SharedPciDevice};

use super::bus::BusDevice;

/// PCI bus 0, its BAR allocator and the ioeventfds registered for its devices.
pub struct PciSegment {
    bus: Arc<PciBus>,
    bars: Mutex<BarAllocator>,
    vm: Arc<dyn Vm>,
    registered: Mutex<HashMap<u8, Vec<PciIoEvent>>>,
    next_slot: std::sync::atomic::AtomicU8,
}

impl PciSegment {
    /// An empty bus (host bridge only).
    pub fn new(vm: Arc<dyn Vm>) -> Self {
        PciSegment {
            bus: Arc::new(PciBus::new()),
            bars: Mutex::new(BarAllocator::default()),
            vm,
            registered: Mutex::new(HashMap::new()),
            next_slot: std::sync::atomic::AtomicU8::new(1),
        }
    }

    /// The bus.
    pub fn bus(&self) -> &Arc<PciBus> {
        &self.bus
    }

    /// Reserves the next slot (1, 2, ...) for a device about to be added: a device's
    /// interrupt line depends on its slot.
    pub fn next_slot(&self) -> u8 {
        self.next_slot
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    }

    /// Adds a device in `slot`, assigns its BARs and registers its ioeventfds.
    pub fn add_device_at(&self, slot: u8, device: SharedPciDevice) -> Result<(), PciSetupError> {
        {
            let mut bars = self.bars.lock().unwrap_or_else(|e| e.into_inner());
            self.bus
                .add_device_at(slot, device, &mut bars)
                .map_err(PciSetupError::Pci)?;
        }
        self.register_ioevents(slot)
    }

    /// (Re-)registers the ioeventfds of the device in `slot` at its BARs' current addresses.
    pub fn register_ioevents(&self, slot: u8) -> Result<(), PciSetupError> {
        let mut registered = self.registered.lock().unwrap_or_else(|e| e.into_inner());
        for old in registered.remove(&slot).unwrap_or_default() {
            if let Err(e) = self.vm.unregister_ioevent(
                &old.event,
                IoEventAddress::Mmio(old.addr),
                datamatch(&old),
            ) {
                log::warn!("cannot unregister ioeventfd at {:#x}: {e}", old.addr);
            }
        }
        let Some(device) = self.bus.device(slot) else {
            return Ok(());
        };
        let events = device
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .ioeventfds();
        let mut done = Vec::new();
        for ev in events {
            if ev.addr == 0 {
                continue;
            }
            self.vm
                .register_ioevent(&ev.event, IoEventAddress::Mmio(ev.addr), datamatch(&ev))
                .map_err(PciSetupError::Ioevent)?;
            done.push(ev);
        }
        registered.insert(slot, done);
        Ok(())
    }

    /// The port I/O device for 0xCF8..0xD00.
    pub fn config_io(self: &Arc<Self>) -> ConfigIoPorts {
        ConfigIoPorts {
            conf1: PciConfigIo::new(self.bus.clone()),
            segment: self.clone(),
        }
    }

    /// The MMIO device for the BAR window.
    pub fn mmio_window(&self) -> MmioWindow {
        MmioWindow(self.bus.clone())
    }
}

fn datamatch(ev: &PciIoEvent) -> DataMatch {
    match ev.datamatch {
        None => DataMatch::Any,
        Some(v) => match u32::try_from(v) {
            Ok(v32) => DataMatch::U32(v32),
            Err(_) => DataMatch::U64(v),
        },
    }
}

/// Errors from setting up PCI devices.
#[derive(Debug, thiserror::Error)]
pub enum PciSetupError {
    /// The bus refused the device.
    #[error("cannot add a PCI device")]
    Pci(#[source] virtio_devices::PciError),
    /// An ioeventfd could not be registered.
    #[error("cannot register a PCI ioeventfd")]
    Ioevent(#[source] VmError),
}

/// The conf1 ports; moves ioeventfds when the guest reprograms a BAR.
pub struct ConfigIoPorts {
    conf1: PciConfigIo,
    segment: Arc<PciSegment>,
}

impl BusDevice for ConfigIoPorts {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        self.conf1.read(offset, data);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        for moved in self.conf1.write(offset, data) {
            log::debug!(
                "PCI slot {} BAR {} moved {:#x} -> {:#x}",
                moved.slot,
                moved.bar_index,
                moved.old_addr,
                moved.new_addr
            );
            if let Err(e) = self.segment.register_ioevents(moved.slot) {
                log::error!("cannot move ioeventfds of slot {}: {e}", moved.slot);
            }
        }
    }
}

/// The 32-bit MMIO window: BAR accesses by guest-physical address.
pub struct MmioWindow(Arc<PciBus>);

impl BusDevice for MmioWindow {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if !self
            .0
            .mmio_read(virtio_devices::MMIO32_WINDOW_START + offset, data)
        {
            data.fill(0xff);
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        self.0
            .mmio_write(virtio_devices::MMIO32_WINDOW_START + offset, data);
    }
}

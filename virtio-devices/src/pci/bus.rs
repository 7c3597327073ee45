//! The PCI device trait, a single PCI bus (bus 0) with a host bridge at 00:00.0, and MMIO
//! dispatch to the devices' BARs.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, RwLock};

use log::debug;
use vmm_sys_util::eventfd::EventFd;

use super::configuration::{PciBarInfo, PciBarKind, PciConfiguration, PciConfigurationParams};
use super::{BarAllocator, PciError, NUM_SLOTS};
use crate::sync::{lock, read, write};

/// An ioeventfd the VMM should register with KVM: a guest write to `addr` (MMIO) signals
/// `event` without a userspace exit.
#[derive(Clone, Debug)]
pub struct PciIoEvent {
    /// Guest physical MMIO address.
    pub addr: u64,
    /// Only writes of this value match (`None`: any value, any length).
    pub datamatch: Option<u64>,
    /// The event signalled.
    pub event: Arc<EventFd>,
}

/// A BAR moved because the guest reprogrammed it. The VMM should move the device's
/// ioeventfds in that BAR by `new_addr - old_addr` (an address of 0 means "not decoded").
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BarReprogram {
    /// Slot of the device.
    pub slot: u8,
    /// BAR index.
    pub bar_index: usize,
    /// Previous decoded address (0 if none).
    pub old_addr: u64,
    /// New decoded address (0 if none).
    pub new_addr: u64,
    /// BAR size.
    pub size: u64,
}

/// A PCI function on the bus. All calls come from vCPU threads through the bus, one at a
/// time per device (the bus wraps each device in a `Mutex`).
pub trait PciDevice: Send {
    /// Read configuration register `reg` (0..64).
    fn read_config_register(&mut self, reg: usize) -> u32;

    /// Write `data` (1..=4 bytes) at byte `offset` of configuration register `reg`.
    fn write_config_register(&mut self, reg: usize, offset: u64, data: &[u8]);

    /// The device's BARs with their current addresses.
    fn bars(&self) -> Vec<PciBarInfo>;

    /// Assign an address to BAR `index` (done by the VMM, as firmware would).
    fn set_bar_address(&mut self, index: usize, addr: u64) -> Result<(), PciError>;

    /// MMIO read at `offset` inside BAR `index`.
    fn read_bar(&mut self, index: usize, offset: u64, data: &mut [u8]) {
        let _ = (index, offset);
        data.fill(0xFF);
    }

    /// MMIO write at `offset` inside BAR `index`.
    fn write_bar(&mut self, index: usize, offset: u64, data: &[u8]) {
        let _ = (index, offset, data);
    }

    /// The ioeventfds to register at the BARs' current addresses.
    fn ioeventfds(&self) -> Vec<PciIoEvent> {
        Vec::new()
    }
}

/// The host bridge at 00:00.0: configuration space only.
#[derive(Debug)]
pub struct PciHostBridge {
    config: PciConfiguration,
}

impl Default for PciHostBridge {
    fn default() -> Self {
        Self::new()
    }
}

impl PciHostBridge {
    /// A host bridge (class 06/00).
    pub fn new() -> Self {
        PciHostBridge {
            config: PciConfiguration::new(&PciConfigurationParams {
                vendor_id: 0x8086,
                device_id: 0x0D57,
                class_code: 0x06,
                subclass: 0x00,
                ..Default::default()
            }),
        }
    }
}

impl PciDevice for PciHostBridge {
    fn read_config_register(&mut self, reg: usize) -> u32 {
        self.config.read_reg(reg)
    }

    fn write_config_register(&mut self, reg: usize, offset: u64, data: &[u8]) {
        self.config.write_reg(reg, offset, data);
    }

    fn bars(&self) -> Vec<PciBarInfo> {
        Vec::new()
    }

    fn set_bar_address(&mut self, index: usize, _addr: u64) -> Result<(), PciError> {
        Err(PciError::NoSuchBar(index))
    }
}

#[derive(Clone, Copy, Debug)]
struct MmioRange {
    base: u64,
    size: u64,
    slot: u8,
    bar: usize,
}

/// A shared PCI device.
pub type SharedPciDevice = Arc<Mutex<dyn PciDevice>>;

/// PCI bus 0: devices by slot and the MMIO ranges of their BARs.
pub struct PciBus {
    devices: RwLock<BTreeMap<u8, SharedPciDevice>>,
    mmio: RwLock<Vec<MmioRange>>,
}

impl std::fmt::Debug for PciBus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PciBus")
            .field("slots", &read(&self.devices).keys().collect::<Vec<_>>())
            .finish()
    }
}

impl Default for PciBus {
    fn default() -> Self {
        Self::new()
    }
}

/// Whether a BAR address is one the device decodes: assigned, and not the all-ones value left
/// by size probing.
fn decoded(bar: &PciBarInfo) -> bool {
    let width_mask = match bar.kind {
        PciBarKind::Memory64 => u64::MAX,
        _ => u64::from(u32::MAX),
    };
    let probe = !(bar.size - 1) & width_mask & !0xF;
    bar.addr != 0 && (bar.addr & !0xF) != probe
}

impl PciBus {
    /// A bus with the host bridge in slot 0.
    pub fn new() -> Self {
        let bus = PciBus {
            devices: RwLock::new(BTreeMap::new()),
            mmio: RwLock::new(Vec::new()),
        };
        write(&bus.devices).insert(0, Arc::new(Mutex::new(PciHostBridge::new())));
        bus
    }

    /// Add a device in the first free slot, assigning its unassigned memory BARs from
    /// `allocator`. Returns the slot (device number on bus 0).
    pub fn add_device(
        &self,
        device: SharedPciDevice,
        allocator: &mut BarAllocator,
    ) -> Result<u8, PciError> {
        let slot = {
            let devices = read(&self.devices);
            (0..NUM_SLOTS)
                .find(|s| !devices.contains_key(s))
                .ok_or(PciError::NoFreeSlot)?
        };
        self.add_device_at(slot, device, allocator)?;
        Ok(slot)
    }

    /// Add a device in `slot` (1..32), assigning its unassigned memory BARs from `allocator`.
    pub fn add_device_at(
        &self,
        slot: u8,
        device: SharedPciDevice,
        allocator: &mut BarAllocator,
    ) -> Result<(), PciError> {
        let mut devices = write(&self.devices);
        if slot >= NUM_SLOTS || devices.contains_key(&slot) {
            return Err(PciError::SlotUnavailable(slot));
        }
        {
            let mut dev = lock(&device);
            for bar in dev.bars() {
                if bar.addr == 0 && bar.kind != PciBarKind::Io {
                    let addr = allocator.allocate(bar.size)?;
                    dev.set_bar_address(bar.index, addr)?;
                }
            }
            self.update_mmio(slot, &dev.bars());
        }
        devices.insert(slot, device);
        Ok(())
    }

    /// The device in `slot`, if any.
    pub fn device(&self, slot: u8) -> Option<SharedPciDevice> {
        read(&self.devices).get(&slot).cloned()
    }

    fn update_mmio(&self, slot: u8, bars: &[PciBarInfo]) {
        let mut mmio = write(&self.mmio);
        mmio.retain(|r| r.slot != slot);
        mmio.extend(
            bars.iter()
                .filter(|b| b.kind != PciBarKind::Io && decoded(b))
                .map(|b| MmioRange {
                    base: b.addr,
                    size: b.size,
                    slot,
                    bar: b.index,
                }),
        );
    }

    /// Configuration read of bus/device/function/register. Absent functions read all-ones.
    pub fn config_read(&self, bus: u8, device: u8, function: u8, reg: usize) -> u32 {
        if bus != 0 || function != 0 {
            return 0xFFFF_FFFF;
        }
        match self.device(device) {
            Some(dev) => lock(&dev).read_config_register(reg),
            None => 0xFFFF_FFFF,
        }
    }

    /// Configuration write. Returns the BARs that moved as a result.
    pub fn config_write(
        &self,
        bus: u8,
        device: u8,
        function: u8,
        reg: usize,
        offset: u64,
        data: &[u8],
    ) -> Vec<BarReprogram> {
        if bus != 0 || function != 0 {
            return Vec::new();
        }
        let Some(dev) = self.device(device) else {
            return Vec::new();
        };
        let mut dev = lock(&dev);
        if !(4..=9).contains(&reg) {
            dev.write_config_register(reg, offset, data);
            return Vec::new();
        }
        let before = dev.bars();
        dev.write_config_register(reg, offset, data);
        let after = dev.bars();
        let moves: Vec<BarReprogram> = before
            .iter()
            .zip(after.iter())
            .filter(|(b, a)| b.addr != a.addr)
            .map(|(b, a)| BarReprogram {
                slot: device,
                bar_index: a.index,
                old_addr: if decoded(b) { b.addr } else { 0 },
                new_addr: if decoded(a) { a.addr } else { 0 },
                size: a.size,
            })
            .filter(|m| m.old_addr != m.new_addr)
            .collect();
        if !moves.is_empty() {
            debug!("PCI: slot {device} BARs moved: {moves:?}");
            self.update_mmio(device, &after);
        }
        moves
    }

    fn find_mmio(&self, addr: u64) -> Option<(MmioRange, u64)> {
        read(&self.mmio)
            .iter()
            .find(|r| addr >= r.base && addr - r.base < r.size)
            .map(|r| (*r, addr - r.base))
    }

    /// Dispatch an MMIO read. Returns false when no BAR claims `addr`.
    pub fn mmio_read(&self, addr: u64, data: &mut [u8]) -> bool {
        let Some((range, offset)) = self.find_mmio(addr) else {
            return false;
        };
        match self.device(range.slot) {
            Some(dev) => {
                lock(&dev).read_bar(range.bar, offset, data);
                true
            }
            None => false,
        }
    }

    /// Dispatch an MMIO write. Returns false when no BAR claims `addr`.
    pub fn mmio_write(&self, addr: u64, data: &[u8]) -> bool {
        let Some((range, offset)) = self.find_mmio(addr) else {
            return false;
        };
        match self.device(range.slot) {
            Some(dev) => {
                lock(&dev).write_bar(range.bar, offset, data);
                true
            }
            None => false,
        }
    }
}

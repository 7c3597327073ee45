//! Shared pieces of the fuzz targets: guest memory, stub interrupt sinks and a split virtqueue
//! laid out in guest memory from fuzz input.

use std::sync::{Arc, Mutex};

use virtio_devices::{
    GuestMemoryMmap, InterruptError, MsiMessage, MsiVectors, VirtioInterrupt, VirtioInterruptType,
};
use vm_memory::GuestAddress;

/// Guest RAM: one region per `(start, size)`.
pub fn guest_memory(regions: &[(u64, usize)]) -> Arc<GuestMemoryMmap> {
    let ranges: Vec<(GuestAddress, usize)> = regions
        .iter()
        .map(|(start, size)| (GuestAddress(*start), *size))
        .collect();
    Arc::new(GuestMemoryMmap::from_ranges(&ranges).expect("fixed guest memory layout"))
}

/// MSI vectors that accept every route and trigger.
pub struct NullMsi(pub usize);

impl MsiVectors for NullMsi {
    fn len(&self) -> usize {
        self.0
    }

    fn set_route(&self, vector: u16, _msg: Option<MsiMessage>) -> Result<(), InterruptError> {
        if usize::from(vector) >= self.0 {
            return Err(InterruptError::InvalidVector(vector));
        }
        Ok(())
    }

    fn trigger(&self, vector: u16) -> Result<(), InterruptError> {
        if usize::from(vector) >= self.0 {
            return Err(InterruptError::InvalidVector(vector));
        }
        Ok(())
    }
}

/// Counts the interrupts a device raises.
#[derive(Default)]
pub struct CountingInterrupt {
    /// Interrupts raised.
    pub count: Mutex<u64>,
}

impl VirtioInterrupt for CountingInterrupt {
    fn trigger(&self, _int_type: VirtioInterruptType) -> Result<(), InterruptError> {
        *self.count.lock().expect("not poisoned") += 1;
        Ok(())
    }

    fn signal_needs_reset(&self) {}
}

/// A PCI bus with the host bridge and a virtio-balloon (every feature offered) behind conf1.
pub struct PciMachine {
    /// Guest RAM (16 MiB at 0).
    pub mem: Arc<GuestMemoryMmap>,
    /// The bus.
    pub bus: Arc<virtio_devices::PciBus>,
    /// Ports 0xCF8..0xD00.
    pub conf1: virtio_devices::PciConfigIo,
    /// The balloon's virtio-pci function.
    pub dev: Arc<Mutex<VirtioPciDevice<virtio_devices::Balloon>>>,
    /// Its slot.
    pub slot: u8,
}

use virtio_devices::VirtioPciDevice;

/// A balloon offering every feature (deflate on OOM, reporting, hinting, statistics).
pub fn every_feature_balloon() -> virtio_devices::Balloon {
    virtio_devices::Balloon::new(&virtio_devices::BalloonConfig {
        deflate_on_oom: true,
        free_page_reporting: true,
        free_page_hinting: true,
        statistics: true,
        ..Default::default()
    })
    .expect("balloon")
}

/// Guest RAM of [`PciMachine`].
pub const PCI_RAM_SIZE: usize = 16 << 20;

impl PciMachine {
    /// Builds the machine.
    pub fn new() -> Self {
        let mem = guest_memory(&[(0, PCI_RAM_SIZE)]);
        let bus = Arc::new(virtio_devices::PciBus::new());
        let mut bars = virtio_devices::BarAllocator::default();
        let balloon = every_feature_balloon();
        let dev = Arc::new(Mutex::new(
            VirtioPciDevice::new(balloon, mem.clone(), Arc::new(NullMsi(8)), None)
                .expect("virtio-pci device"),
        ));
        let slot = bus.add_device(dev.clone(), &mut bars).expect("free slot");
        let conf1 = virtio_devices::PciConfigIo::new(bus.clone());
        PciMachine {
            mem,
            bus,
            conf1,
            dev,
            slot,
        }
    }
}

impl Default for PciMachine {
    fn default() -> Self {
        Self::new()
    }
}

/// Reads fuzz input front to back; past the end everything reads as zero.
pub struct FuzzInput<'a>(pub &'a [u8]);

impl FuzzInput<'_> {
    /// Whether input is left.
    pub fn more(&self) -> bool {
        !self.0.is_empty()
    }

    /// Next byte.
    pub fn u8(&mut self) -> u8 {
        match self.0.split_first() {
            Some((b, rest)) => {
                self.0 = rest;
                *b
            }
            None => 0,
        }
    }

    /// Next little-endian u16.
    pub fn u16(&mut self) -> u16 {
        u16::from_le_bytes([self.u8(), self.u8()])
    }

    /// Next little-endian u32.
    pub fn u32(&mut self) -> u32 {
        u32::from(self.u16()) | u32::from(self.u16()) << 16
    }

    /// Next little-endian u64.
    pub fn u64(&mut self) -> u64 {
        u64::from(self.u32()) | u64::from(self.u32()) << 32
    }

    /// Next `n` bytes (fewer at the end).
    pub fn take(&mut self, n: usize) -> Vec<u8> {
        let n = n.min(self.0.len());
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        head.to_vec()
    }
}

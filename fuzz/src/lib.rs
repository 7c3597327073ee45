//! Shared pieces of the fuzz targets: guest memory, stub interrupt sinks and a split virtqueue
//! laid out in guest memory from fuzz input.

use std::sync::{Arc, Mutex};

use virtio_devices::{
    GuestMemoryMmap, InterruptError, MsiMessage, MsiVectors, VirtioInterrupt, VirtioInterruptType,
};
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress};

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

/// The driver side of a split virtqueue in guest memory.
pub struct DriverQueue {
    /// Queue size.
    pub size: u16,
    /// Descriptor table address.
    pub desc: u64,
    /// Available ring address.
    pub avail: u64,
    /// Used ring address.
    pub used: u64,
    next_desc: u16,
    avail_idx: u16,
}

impl DriverQueue {
    /// Rings at `base` (16-byte aligned), `size` entries.
    pub fn new(base: u64, size: u16) -> Self {
        let desc = base;
        let avail = desc + 16 * u64::from(size);
        let used = (avail + 6 + 2 * u64::from(size) + 3) & !3;
        DriverQueue {
            size,
            desc,
            avail,
            used,
            next_desc: 0,
            avail_idx: 0,
        }
    }

    /// Bytes the rings take.
    pub fn footprint(&self) -> u64 {
        self.used + 6 + 8 * u64::from(self.size) - self.desc
    }

    /// The device-side queue, configured and ready.
    pub fn queue(&self) -> Queue {
        let mut q = Queue::new(self.size).expect("power-of-two size");
        q.set_size(self.size);
        q.try_set_desc_table_address(GuestAddress(self.desc))
            .expect("aligned");
        q.try_set_avail_ring_address(GuestAddress(self.avail))
            .expect("aligned");
        q.try_set_used_ring_address(GuestAddress(self.used))
            .expect("aligned");
        q.set_ready(true);
        q
    }

    /// Writes descriptor `index` (modulo the size) as given.
    pub fn write_desc(
        &self,
        mem: &GuestMemoryMmap,
        index: u16,
        addr: u64,
        len: u32,
        flags: u16,
        next: u16,
    ) {
        let at = self.desc + 16 * u64::from(index % self.size);
        let mut raw = [0u8; 16];
        raw[0..8].copy_from_slice(&addr.to_le_bytes());
        raw[8..12].copy_from_slice(&len.to_le_bytes());
        raw[12..14].copy_from_slice(&flags.to_le_bytes());
        raw[14..16].copy_from_slice(&next.to_le_bytes());
        let _ = mem.write_slice(&raw, GuestAddress(at));
    }

    /// Adds a well-formed chain of `(addr, len, device_writable)` buffers and publishes it.
    pub fn add_chain(&mut self, mem: &GuestMemoryMmap, bufs: &[(u64, u32, bool)]) {
        if bufs.is_empty() {
            return;
        }
        let head = self.next_desc;
        for (i, (addr, len, write)) in bufs.iter().enumerate() {
            let index = head.wrapping_add(i as u16) % self.size;
            let mut flags = if *write {
                virtio_bindings::bindings::virtio_ring::VRING_DESC_F_WRITE as u16
            } else {
                0
            };
            if i + 1 < bufs.len() {
                flags |= virtio_bindings::bindings::virtio_ring::VRING_DESC_F_NEXT as u16;
            }
            self.write_desc(mem, index, *addr, *len, flags, (index + 1) % self.size);
        }
        self.next_desc = head.wrapping_add(bufs.len() as u16) % self.size;
        self.publish(mem, head);
    }

    /// Puts `head` in the available ring and bumps its index.
    pub fn publish(&mut self, mem: &GuestMemoryMmap, head: u16) {
        let slot = self.avail + 4 + 2 * u64::from(self.avail_idx % self.size);
        let _ = mem.write_obj(head, GuestAddress(slot));
        self.avail_idx = self.avail_idx.wrapping_add(1);
        self.set_avail_idx(mem, self.avail_idx);
    }

    /// Overwrites the available index (a misbehaving driver).
    pub fn set_avail_idx(&self, mem: &GuestMemoryMmap, idx: u16) {
        let _ = mem.write_obj(idx, GuestAddress(self.avail + 2));
    }

    /// The used ring's index.
    pub fn used_idx(&self, mem: &GuestMemoryMmap) -> u16 {
        mem.read_obj(GuestAddress(self.used + 2)).unwrap_or(0)
    }
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

//! Test helpers: a recording `MsiVectors`, guest memory and a driver-side split virtqueue;
//! the unit tests and, with the `fuzzing` feature, the fuzz targets drive devices with them.

use std::sync::Mutex;

use crate::interrupt::{InterruptError, MsiMessage, MsiVectors};

/// Records routes and triggered vectors.
pub struct MockMsi {
    routes: Mutex<Vec<Option<MsiMessage>>>,
    triggered: Mutex<Vec<u16>>,
}

impl MockMsi {
    /// `n` vectors, none routed.
    pub fn new(n: usize) -> Self {
        MockMsi {
            routes: Mutex::new(vec![None; n]),
            triggered: Mutex::new(Vec::new()),
        }
    }

    /// The route of vector `v`.
    pub fn route(&self, v: u16) -> Option<MsiMessage> {
        self.routes.lock().unwrap()[usize::from(v)]
    }

    /// The vectors triggered so far, in order.
    pub fn triggered(&self) -> Vec<u16> {
        self.triggered.lock().unwrap().clone()
    }
}

impl MsiVectors for MockMsi {
    fn len(&self) -> usize {
        self.routes.lock().unwrap().len()
    }

    fn set_route(&self, vector: u16, msg: Option<MsiMessage>) -> Result<(), InterruptError> {
        let mut r = self.routes.lock().unwrap();
        let slot = r
            .get_mut(usize::from(vector))
            .ok_or(InterruptError::InvalidVector(vector))?;
        *slot = msg;
        Ok(())
    }

    fn trigger(&self, vector: u16) -> Result<(), InterruptError> {
        self.triggered.lock().unwrap().push(vector);
        Ok(())
    }
}

use std::sync::Arc;

use virtio_bindings::bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress};

use crate::interrupt::{IntxLine, VirtioInterrupt, VirtioInterruptType};
use crate::GuestMemoryMmap;

/// Guest RAM of `size` bytes at 0.
pub fn guest_memory(size: usize) -> Arc<GuestMemoryMmap> {
    Arc::new(GuestMemoryMmap::from_ranges(&[(GuestAddress(0), size)]).unwrap())
}

/// Counts INTx assertions.
#[derive(Default)]
pub struct MockIntx {
    /// Assertions so far.
    pub count: Mutex<usize>,
}

impl IntxLine for MockIntx {
    fn trigger(&self) -> Result<(), InterruptError> {
        *self.count.lock().unwrap() += 1;
        Ok(())
    }
}

/// Records the interrupts a device raises.
#[derive(Default)]
pub struct MockInterrupt {
    /// Every interrupt raised, in order.
    pub events: Mutex<Vec<VirtioInterruptType>>,
    /// Whether the device asked for a reset.
    pub needs_reset: Mutex<bool>,
}

impl MockInterrupt {
    /// Configuration-change interrupts raised so far.
    pub fn config_count(&self) -> usize {
        self.events
            .lock()
            .unwrap()
            .iter()
            .filter(|e| **e == VirtioInterruptType::Config)
            .count()
    }
}

impl VirtioInterrupt for MockInterrupt {
    fn trigger(&self, int_type: VirtioInterruptType) -> Result<(), InterruptError> {
        self.events.lock().unwrap().push(int_type);
        Ok(())
    }

    fn signal_needs_reset(&self) {
        *self.needs_reset.lock().unwrap() = true;
    }
}

/// The driver side of a split virtqueue living in guest memory.
pub struct TestQueue {
    mem: Arc<GuestMemoryMmap>,
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

/// One buffer of a chain: address, length, device-writable.
pub type Buf = (u64, u32, bool);

impl TestQueue {
    /// Rings at `base` (16-byte aligned).
    pub fn new(mem: &Arc<GuestMemoryMmap>, base: u64, size: u16) -> Self {
        let desc = base;
        let avail = desc + 16 * u64::from(size);
        let used = (avail + 6 + 2 * u64::from(size) + 3) & !3;
        TestQueue {
            mem: mem.clone(),
            size,
            desc,
            avail,
            used,
            next_desc: 0,
            avail_idx: 0,
        }
    }

    /// The device-side queue, configured and ready.
    pub fn queue(&self) -> Queue {
        let mut q = Queue::new(self.size).unwrap();
        q.set_size(self.size);
        q.try_set_desc_table_address(GuestAddress(self.desc))
            .unwrap();
        q.try_set_avail_ring_address(GuestAddress(self.avail))
            .unwrap();
        q.try_set_used_ring_address(GuestAddress(self.used))
            .unwrap();
        q.set_ready(true);
        q
    }

    /// Write descriptor `index` (modulo the size) directly.
    pub fn write_desc(&self, index: u16, addr: u64, len: u32, flags: u16, next: u16) {
        let at = self.desc + 16 * u64::from(index % self.size);
        self.mem.write_obj(addr, GuestAddress(at)).unwrap();
        self.mem.write_obj(len, GuestAddress(at + 8)).unwrap();
        self.mem.write_obj(flags, GuestAddress(at + 12)).unwrap();
        self.mem.write_obj(next, GuestAddress(at + 14)).unwrap();
    }

    /// Put `head` in the available ring and bump the index.
    pub fn publish(&mut self, head: u16) {
        let slot = self.avail + 4 + 2 * u64::from(self.avail_idx % self.size);
        self.mem.write_obj(head, GuestAddress(slot)).unwrap();
        self.avail_idx = self.avail_idx.wrapping_add(1);
        self.set_avail_idx(self.avail_idx);
    }

    /// Overwrite the available ring index (to misbehave on purpose).
    pub fn set_avail_idx(&self, idx: u16) {
        self.mem
            .write_obj(idx, GuestAddress(self.avail + 2))
            .unwrap();
    }

    /// Add a chain of buffers and publish it; returns the head index.
    pub fn add_chain(&mut self, bufs: &[Buf]) -> u16 {
        let head = self.next_desc;
        for (i, (addr, len, write)) in bufs.iter().enumerate() {
            let index = (head + i as u16) % self.size;
            let mut flags = if *write { VRING_DESC_F_WRITE as u16 } else { 0 };
            let next = (index + 1) % self.size;
            if i + 1 < bufs.len() {
                flags |= VRING_DESC_F_NEXT as u16;
            }
            self.write_desc(index, *addr, *len, flags, next);
        }
        self.next_desc = (head + bufs.len() as u16) % self.size;
        self.publish(head);
        head
    }

    /// The used ring's flags (bit 0: VRING_USED_F_NO_NOTIFY, the device needs no kick).
    pub fn used_flags(&self) -> u16 {
        self.mem.read_obj(GuestAddress(self.used)).unwrap()
    }

    /// The used ring index.
    pub fn used_idx(&self) -> u16 {
        self.mem.read_obj(GuestAddress(self.used + 2)).unwrap()
    }

    /// Used element `i`: (descriptor id, length).
    pub fn used_elem(&self, i: u16) -> (u32, u32) {
        let at = self.used + 4 + 8 * u64::from(i % self.size);
        (
            self.mem.read_obj(GuestAddress(at)).unwrap(),
            self.mem.read_obj(GuestAddress(at + 4)).unwrap(),
        )
    }
}

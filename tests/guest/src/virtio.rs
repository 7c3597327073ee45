//! Modern virtio-pci transport (virtio 1.0+: vendor capabilities for common, notify, ISR and
//! device configuration) and a polled split virtqueue.
//!
//! Memory for rings comes from the page allocator; descriptors carry guest-physical addresses
//! (identity map). Used rings are polled (the avail ring asks for no interrupts).

use crate::kernel::{
    mmio_read16, mmio_read32, mmio_read8, mmio_write16, mmio_write32, mmio_write64, mmio_write8,
};
use crate::pci::Device;
use core::sync::atomic::{fence, Ordering};
use guest_core::buddy::Buddy;
use guest_core::PAGE_SIZE;

/// Device status bits.
pub mod status {
    /// ACKNOWLEDGE
    pub const ACK: u8 = 1;
    /// DRIVER
    pub const DRIVER: u8 = 2;
    /// DRIVER_OK
    pub const DRIVER_OK: u8 = 4;
    /// FEATURES_OK
    pub const FEATURES_OK: u8 = 8;
    /// FAILED
    pub const FAILED: u8 = 128;
}

/// VIRTIO_F_VERSION_1
pub const F_VERSION_1: u64 = 1 << 32;
/// "No MSI-X vector".
pub const NO_VECTOR: u16 = 0xffff;

/// MSI-X capability of the device.
pub struct Msix {
    cap: u16,
    table: u64,
    size: u16,
}

/// The mapped configuration structures.
pub struct Transport {
    pci: Device,
    common: u64,
    notify: u64,
    notify_mul: u32,
    /// Device-specific configuration.
    pub device: u64,
    /// MSI-X, if the device has it.
    pub msix: Option<Msix>,
}

impl Transport {
    /// Finds the virtio vendor capabilities (id 9) and MSI-X (id 0x11) and maps their BARs.
    pub fn new(pci: Device) -> Option<Transport> {
        let (mut common, mut notify, mut device, mut mul) = (None, None, None, 0);
        let mut msix = None;
        pci.for_each_cap(|p, id| {
            if id == 0x11 {
                let ctrl = pci.read16(p + 2);
                let t = pci.read32(p + 4);
                if let Some(bar) = pci.bar((t & 7) as u8) {
                    msix = Some(Msix {
                        cap: p,
                        table: bar + (t & !7) as u64,
                        size: (ctrl & 0x7ff) + 1,
                    });
                }
            }
            if id != 9 {
                return;
            }
            let ty = pci.read8(p + 3);
            let bar = pci.read8(p + 4);
            let off = pci.read32(p + 8) as u64;
            let Some(base) = pci.bar(bar) else { return };
            match ty {
                1 if common.is_none() => common = Some(base + off),
                2 if notify.is_none() => {
                    notify = Some(base + off);
                    mul = pci.read32(p + 16);
                }
                4 if device.is_none() => device = Some(base + off),
                _ => {}
            }
        });
        // memory decoding and bus mastering on, INTx off
        pci.write16(4, pci.read16(4) | 0x0406);
        Some(Transport {
            pci,
            common: common?,
            notify: notify?,
            notify_mul: mul,
            device: device?,
            msix,
        })
    }

    fn c8(&self, off: u64) -> u8 {
        // SAFETY: inside the mapped common configuration structure.
        unsafe { mmio_read8(self.common + off) }
    }
    fn w8(&self, off: u64, v: u8) {
        // SAFETY: as c8.
        unsafe { mmio_write8(self.common + off, v) }
    }
    fn c16(&self, off: u64) -> u16 {
        // SAFETY: as c8.
        unsafe { mmio_read16(self.common + off) }
    }
    fn w16(&self, off: u64, v: u16) {
        // SAFETY: as c8.
        unsafe { mmio_write16(self.common + off, v) }
    }
    fn c32(&self, off: u64) -> u32 {
        // SAFETY: as c8.
        unsafe { mmio_read32(self.common + off) }
    }
    fn w32(&self, off: u64, v: u32) {
        // SAFETY: as c8.
        unsafe { mmio_write32(self.common + off, v) }
    }

    /// Device status.
    pub fn status(&self) -> u8 {
        self.c8(20)
    }

    /// Sets the device status.
    pub fn set_status(&self, s: u8) {
        self.w8(20, s)
    }

    /// Resets the device and waits (bounded) for the reset to complete.
    pub fn reset(&self) -> bool {
        self.set_status(0);
        for _ in 0..100_000 {
            if self.status() == 0 {
                return true;
            }
            core::hint::spin_loop();
        }
        false
    }

    /// The 64 device feature bits.
    pub fn device_features(&self) -> u64 {
        self.w32(0, 0);
        let lo = self.c32(4) as u64;
        self.w32(0, 1);
        let hi = self.c32(4) as u64;
        hi << 32 | lo
    }

    /// Writes the driver feature bits.
    pub fn set_driver_features(&self, f: u64) {
        self.w32(8, 0);
        self.w32(12, f as u32);
        self.w32(8, 1);
        self.w32(12, (f >> 32) as u32);
    }

    /// Programs MSI-X table entry 0 to deliver `vector` to the local APIC `apic_id`, enables
    /// MSI-X, and routes configuration changes to entry 0. Returns false if the device refused.
    pub fn setup_config_irq(&self, apic_id: u32, vector: u8) -> bool {
        let Some(m) = &self.msix else {
            crate::println!("guest: balloon has no MSI-X capability");
            return false;
        };
        if m.size == 0 {
            return false;
        }
        // SAFETY: MSI-X table entry 0 inside the mapped table BAR.
        unsafe {
            mmio_write32(m.table, 0xfee0_0000 | (apic_id & 0xff) << 12);
            mmio_write32(m.table + 4, 0);
            mmio_write32(m.table + 8, vector as u32);
            mmio_write32(m.table + 12, 0); // unmasked
        }
        let ctrl = self.pci.read16(m.cap + 2);
        self.pci.write16(m.cap + 2, (ctrl | 0x8000) & !0x4000);
        self.w16(16, 0);
        let back = self.c16(16);
        if back != 0 {
            crate::println!("guest: balloon refused MSI-X config vector (table {:#x} size {} ctrl {:#x} readback {:#x})",
                            m.table, m.size, self.pci.read16(m.cap + 2), back);
        }
        back == 0
    }

    /// Sets up queue `index` with up to `max` entries (rings from the allocator) and enables it.
    pub fn setup_queue(&self, index: u16, max: u16, b: &mut Buddy) -> Option<Queue> {
        self.w16(22, index);
        let dev_size = self.c16(24);
        if dev_size == 0 {
            return None;
        }
        let mut size = dev_size.min(max).min(QMAX as u16);
        // keep a power of two (split rings)
        while size & (size - 1) != 0 {
            size &= size - 1;
        }
        // desc 16*n, avail 6+2n, used 6+8n: one order-2 block (16 KiB) covers n = 256
        let pfn = b.alloc(2)?;
        let base = pfn as u64 * PAGE_SIZE;
        // SAFETY: a fresh 16 KiB block owned by this queue.
        unsafe { core::ptr::write_bytes(base as *mut u8, 0, 4 * PAGE_SIZE as usize) };
        let (desc, avail, used) = (base, base + 4096, base + 8192);
        self.w16(24, size);
        self.w16(26, NO_VECTOR);
        // SAFETY: common config writes of 64-bit addresses.
        unsafe {
            mmio_write64(self.common + 32, desc);
            mmio_write64(self.common + 40, avail);
            mmio_write64(self.common + 48, used);
        }
        let noff = self.c16(30) as u64;
        self.w16(28, 1);
        let mut q = Queue {
            index,
            size,
            desc,
            avail,
            used,
            notify: self.notify + noff * self.notify_mul as u64,
            free_head: 0,
            num_free: size,
            last_used: 0,
            avail_idx: 0,
            tokens: [0; QMAX],
            next: [0; QMAX],
        };
        for i in 0..size {
            q.next[i as usize] = i + 1;
        }
        // SAFETY: avail flags: no interrupts wanted (we poll).
        unsafe { core::ptr::write_volatile(avail as *mut u16, 1) };
        Some(q)
    }
}

/// Largest queue we use.
pub const QMAX: usize = 256;

/// A split virtqueue with single-descriptor buffers.
pub struct Queue {
    index: u16,
    size: u16,
    desc: u64,
    avail: u64,
    used: u64,
    notify: u64,
    free_head: u16,
    num_free: u16,
    last_used: u16,
    avail_idx: u16,
    tokens: [u64; QMAX],
    next: [u16; QMAX],
}

impl Queue {
    /// Free descriptors.
    pub fn num_free(&self) -> u16 {
        self.num_free
    }

    /// Adds one buffer (device-writable if `write`). Returns false if the ring is full.
    pub fn add(&mut self, addr: u64, len: u32, write: bool, token: u64) -> bool {
        if self.num_free == 0 {
            return false;
        }
        let id = self.free_head;
        self.free_head = self.next[id as usize];
        self.num_free -= 1;
        self.tokens[id as usize] = token;
        let d = self.desc + 16 * id as u64;
        // SAFETY: descriptor `id` belongs to the driver until made available.
        unsafe {
            core::ptr::write_volatile(d as *mut u64, addr);
            core::ptr::write_volatile((d + 8) as *mut u32, len);
            core::ptr::write_volatile((d + 12) as *mut u16, if write { 2 } else { 0 });
            core::ptr::write_volatile((d + 14) as *mut u16, 0);
            let slot = self.avail + 4 + 2 * (self.avail_idx % self.size) as u64;
            core::ptr::write_volatile(slot as *mut u16, id);
            fence(Ordering::SeqCst);
            self.avail_idx = self.avail_idx.wrapping_add(1);
            core::ptr::write_volatile((self.avail + 2) as *mut u16, self.avail_idx);
        }
        true
    }

    /// Tells the device about new buffers, unless it said it is taking them anyway
    /// (VRING_USED_F_NO_NOTIFY in the used ring's flags, read after the avail index was
    /// published, as the virtio spec's split-ring algorithm has it).
    pub fn kick(&self) {
        fence(Ordering::SeqCst);
        // SAFETY: the used ring's flags, in the queue memory we allocated.
        let flags = unsafe { core::ptr::read_volatile(self.used as *const u16) };
        if flags & 1 != 0 {
            return;
        }
        // SAFETY: the queue's notify address in the mapped notify BAR.
        unsafe { mmio_write16(self.notify, self.index) };
    }

    /// Takes one used buffer: (token, written length).
    pub fn pop_used(&mut self) -> Option<(u64, u32)> {
        // SAFETY: the used ring is written by the device; volatile reads.
        unsafe {
            let idx = core::ptr::read_volatile((self.used + 2) as *const u16);
            if idx == self.last_used {
                return None;
            }
            fence(Ordering::SeqCst);
            let e = self.used + 4 + 8 * (self.last_used % self.size) as u64;
            let id = core::ptr::read_volatile(e as *const u32) as u16 % self.size;
            let len = core::ptr::read_volatile((e + 4) as *const u32);
            self.last_used = self.last_used.wrapping_add(1);
            self.next[id as usize] = self.free_head;
            self.free_head = id;
            self.num_free += 1;
            Some((self.tokens[id as usize], len))
        }
    }
}

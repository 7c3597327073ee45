//! The balloon behind the virtio-pci transport, driven the way Linux's virtio_pci and
//! virtio_balloon drive it, with a driver that enables only some queues, resets and starts
//! over, or meets a worker that cannot start.

use crate::pci::{BarAllocator, PciBus, PciConfigIo, SharedPciDevice};
use crate::test_utils::MockMsi;
use crate::transport::{VirtioPciDevice, VIRTIO_MSI_NO_VECTOR};
use crate::virtio::{
    DEVICE_ACKNOWLEDGE, DEVICE_DRIVER, DEVICE_DRIVER_OK, DEVICE_FEATURES_OK, DEVICE_NEEDS_RESET,
};

use super::*;

type Pci = Arc<Mutex<VirtioPciDevice<Balloon>>>;

/// The guest's side: BAR 0 accesses through the PCI bus.
struct Driver {
    bus: Arc<PciBus>,
    base: u64,
    mem: Arc<GuestMemoryMmap>,
}

impl Driver {
    fn w(&self, off: u64, data: &[u8]) {
        assert!(self.bus.mmio_write(self.base + off, data));
    }

    fn r(&self, off: u64, len: usize) -> u64 {
        let mut b = [0u8; 8];
        assert!(self.bus.mmio_read(self.base + off, &mut b[..len]));
        u64::from_le_bytes(b)
    }

    fn status(&self) -> u8 {
        self.r(0x14, 1) as u8
    }

    /// Reset, and wait until the status reads 0 as Linux does.
    fn reset(&self) {
        self.w(0x14, &[0]);
        assert_eq!(self.status(), 0);
    }

    /// Negotiate `features` (two 32-bit halves), set up the queues `enabled` (by index) with
    /// `size` entries each, enable them in the order given, and set DRIVER_OK.
    fn init(&self, features: u64, enabled: &[u16], size: u16) -> Vec<(u16, TestQueue)> {
        self.w(0x14, &[DEVICE_ACKNOWLEDGE]);
        self.w(0x14, &[DEVICE_ACKNOWLEDGE | DEVICE_DRIVER]);
        for half in 0..2u32 {
            self.w(0x08, &half.to_le_bytes());
            self.w(0x0C, &((features >> (32 * half)) as u32).to_le_bytes());
        }
        let ok = DEVICE_ACKNOWLEDGE | DEVICE_DRIVER | DEVICE_FEATURES_OK;
        self.w(0x14, &[ok]);
        assert_eq!(self.status(), ok, "features accepted");
        let mut queues = Vec::new();
        for &q in enabled {
            let tq = TestQueue::new(&self.mem, 0x10_0000 + u64::from(q) * 0x1_0000, size);
            self.w(0x16, &q.to_le_bytes());
            assert!(self.r(0x18, 2) >= u64::from(size));
            self.w(0x18, &size.to_le_bytes());
            self.w(0x1A, &VIRTIO_MSI_NO_VECTOR.to_le_bytes());
            for (off, addr) in [(0x20, tq.desc), (0x28, tq.avail), (0x30, tq.used)] {
                self.w(off, &(addr as u32).to_le_bytes());
                self.w(off + 4, &((addr >> 32) as u32).to_le_bytes());
            }
            queues.push((q, tq));
        }
        for &q in enabled.iter().rev() {
            self.w(0x16, &q.to_le_bytes());
            self.w(0x1C, &1u16.to_le_bytes());
        }
        self.w(0x14, &[ok | DEVICE_DRIVER_OK]);
        queues
    }

    /// Inflate two pages through queue `tq` (index `index`) and wait for the device to use them.
    fn inflate(&self, index: u16, tq: &mut TestQueue) -> bool {
        self.mem
            .write_slice(&pfn_bytes(&[4096, 4097]), GuestAddress(BUF))
            .unwrap();
        let before = tq.used_idx();
        tq.add_chain(&[(BUF, 8, false)]);
        self.w(0x16, &index.to_le_bytes());
        let notify_off = self.r(0x1E, 2);
        self.w(0x3000 + 4 * notify_off, &index.to_le_bytes());
        let deadline = Instant::now() + Duration::from_secs(5);
        while tq.used_idx() == before && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(2));
        }
        tq.used_idx() != before
    }
}

fn plugged(balloon: Balloon) -> (Pci, Driver) {
    let mem = guest_memory(64 << 20);
    let pci = VirtioPciDevice::new(balloon, mem.clone(), Arc::new(MockMsi::new(8)), None).unwrap();
    let pci = Arc::new(Mutex::new(pci));
    let bus = Arc::new(PciBus::new());
    let shared: SharedPciDevice = pci.clone();
    let slot = bus
        .add_device(shared, &mut BarAllocator::default())
        .unwrap();
    let io = PciConfigIo::new(bus.clone());
    io.write(0, &(0x8000_0010u32 | u32::from(slot) << 11).to_le_bytes());
    let mut bar = [0u8; 4];
    io.read(4, &mut bar);
    let base = u64::from(u32::from_le_bytes(bar) & !0xF);
    (pci, Driver { bus, base, mem })
}

fn everything() -> u64 {
    Balloon::new(&all_features()).unwrap().features()
}

#[test]
fn a_driver_enabling_only_inflate_and_deflate_gets_a_working_device() {
    let balloon = Balloon::new(&all_features()).unwrap();
    let handle = balloon.handle();
    let (pci, drv) = plugged(balloon);
    let mut queues = drv.init(everything(), &[0, 1], 64);
    let report = pci.lock().unwrap().activation();
    assert!(report.activated, "{report:?}");
    assert_eq!(report.queues_enabled, vec![0, 1]);
    assert_eq!(report.activation_error, None);
    assert_eq!(drv.status() & DEVICE_NEEDS_RESET, 0);
    assert!(drv.inflate(0, &mut queues[0].1));
    assert_eq!(handle.counters().inflated_pages, 2);
    handle.resize(4 * MIB).unwrap();
    assert_eq!(handle.hint_mode(), None);
    assert!(handle.start_hint_round().is_err());
}

#[test]
fn reset_and_initialise_again_with_other_queues() {
    let balloon = Balloon::new(&all_features()).unwrap();
    let handle = balloon.handle();
    let (pci, drv) = plugged(balloon);
    drv.init(everything(), &[2, 3], 16);
    assert!(pci.lock().unwrap().is_activated());
    assert_eq!(handle.hint_mode(), Some(HintMode::Ranges));
    assert!(handle.resize(MIB).is_err(), "no inflate queue");

    drv.reset();
    assert!(!pci.lock().unwrap().activation().activated);
    assert_eq!(handle.hint_mode(), None);
    // Second time round: stock hinting only, every queue, and smaller rings.
    let stock = bit(VIRTIO_F_VERSION_1) | bit(VIRTIO_BALLOON_F_FREE_PAGE_HINT);
    let mut queues = drv.init(stock, &[0, 1, 2], 8);
    let report = pci.lock().unwrap().activation();
    assert!(report.activated);
    assert_eq!(report.queues_enabled, vec![0, 1, 2]);
    assert_eq!(handle.hint_mode(), Some(HintMode::Stock));
    assert_eq!(
        handle.active_queues(),
        vec![QueueKind::Inflate, QueueKind::Deflate, QueueKind::FreePage]
    );
    assert!(drv.inflate(0, &mut queues[0].1));
    handle.resize(MIB).unwrap();
}

#[test]
fn a_worker_that_cannot_start_is_reported() {
    let mut balloon = Balloon::new(&all_features()).unwrap();
    let hook: WorkerStartHook = Arc::new(|| Err(std::io::Error::other("no filter")));
    balloon.set_on_worker_start(Some(hook));
    let (pci, drv) = plugged(balloon);
    let mut queues = drv.init(everything(), &[0, 1, 2, 3, 4], 16);
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut report = pci.lock().unwrap().activation();
    while report.activation_error.is_none() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(2));
        report = pci.lock().unwrap().activation();
    }
    assert!(!report.activated);
    assert_eq!(report.queues_enabled, vec![0, 1, 2, 3, 4]);
    assert_eq!(
        report.activation_error.as_deref(),
        Some("The balloon worker's start hook failed: no filter")
    );
    assert!(!drv.inflate(0, &mut queues[0].1));
    // It stays visible after a reset, until the device starts again.
    drv.reset();
    let report = pci.lock().unwrap().activation();
    assert!(report.activation_error.is_some());
    assert_eq!(report.device_status, 0);
    pci.lock().unwrap().device_mut().set_on_worker_start(None);
    let mut queues = drv.init(everything(), &[0, 1], 16);
    assert!(drv.inflate(0, &mut queues[0].1));
    let report = pci.lock().unwrap().activation();
    assert!(report.activated);
    assert_eq!(report.activation_error, None);
}

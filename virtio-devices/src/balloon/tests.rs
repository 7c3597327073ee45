//! Device tests: the balloon driven through real split virtqueues in guest memory.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::worker::BalloonWorker;
use super::*;
use crate::interrupt::VirtioInterruptType;
use crate::test_utils::{guest_memory, Buf, MockInterrupt, TestQueue};
use crate::virtio::{VirtioDevice, VirtioQueue, VIRTIO_F_VERSION_1};
use crate::GuestMemoryMmap;

mod pci_driver;
mod queue_subsets;

const MIB: u64 = 1 << 20;
const PAGE: u64 = BALLOON_PAGE_SIZE;
/// Scratch area for the driver's buffers.
const BUF: u64 = 0x80_0000;

fn bit(b: u32) -> u64 {
    1 << b
}

fn all_features() -> BalloonConfig {
    BalloonConfig {
        size: 0,
        deflate_on_oom: true,
        free_page_reporting: true,
        free_page_hinting: true,
        statistics: true,
        stats_interval: None,
    }
}

struct Harness {
    mem: Arc<GuestMemoryMmap>,
    balloon: Balloon,
    handle: BalloonHandle,
    irq: Arc<MockInterrupt>,
    queues: Vec<TestQueue>,
    kinds: Vec<QueueKind>,
    worker: BalloonWorker,
}

impl Harness {
    fn with_memory(config: &BalloonConfig, acked: u64, mem: Arc<GuestMemoryMmap>) -> Self {
        Self::enabling(config, acked, mem, &queue_layout(acked))
    }

    /// A balloon whose driver negotiated `acked` but enabled only the queues in `enabled`.
    fn enabling(
        config: &BalloonConfig,
        acked: u64,
        mem: Arc<GuestMemoryMmap>,
        enabled: &[QueueKind],
    ) -> Self {
        let mut balloon = Balloon::new(config).unwrap();
        balloon.ack_features(acked);
        let mut kinds = Vec::new();
        let irq = Arc::new(MockInterrupt::default());
        let mut queues = Vec::new();
        let mut vqs = Vec::new();
        for (i, kind) in queue_layout(acked).iter().enumerate() {
            if !enabled.contains(kind) {
                continue;
            }
            kinds.push(*kind);
            let size = if *kind == QueueKind::FreePage {
                1024
            } else {
                64
            };
            let tq = TestQueue::new(&mem, 0x10_0000 + 0x1_0000 * i as u64, size);
            vqs.push(VirtioQueue {
                index: i as u16,
                queue: Arc::new(Mutex::new(tq.queue())),
                event: Arc::new(EventFd::new(EFD_NONBLOCK).unwrap()),
            });
            queues.push(tq);
        }
        let worker = balloon
            .prepare_worker(mem.clone(), irq.clone(), vqs)
            .unwrap();
        let handle = balloon.handle();
        Harness {
            mem,
            balloon,
            handle,
            irq,
            queues,
            kinds,
            worker,
        }
    }

    fn new(config: &BalloonConfig, acked: u64) -> Self {
        Self::with_memory(config, acked, guest_memory(64 << 20))
    }

    fn all() -> Self {
        let b = Balloon::new(&all_features()).unwrap();
        Self::new(&all_features(), b.features())
    }

    fn q(&mut self, kind: QueueKind) -> &mut TestQueue {
        let i = self.kinds.iter().position(|k| *k == kind).unwrap();
        &mut self.queues[i]
    }

    fn add(&mut self, kind: QueueKind, bufs: &[Buf]) -> u16 {
        self.q(kind).add_chain(bufs)
    }

    /// Write `data` at `gpa` and return an out buffer for it.
    fn out(&self, gpa: u64, data: &[u8]) -> Buf {
        self.mem.write_slice(data, GuestAddress(gpa)).unwrap();
        (gpa, data.len() as u32, false)
    }

    fn run(&mut self) {
        self.worker.process_all();
    }

    fn used(&mut self, kind: QueueKind) -> u16 {
        self.q(kind).used_idx()
    }

    fn counters(&self) -> BalloonCounters {
        self.handle.counters()
    }

    fn config_u32(&self, offset: u64) -> u32 {
        let mut b = [0u8; 4];
        self.balloon.read_config(offset, &mut b);
        u32::from_le_bytes(b)
    }
}

fn pfn_bytes(pfns: &[u32]) -> Vec<u8> {
    pfns.iter().flat_map(|p| p.to_le_bytes()).collect()
}

fn ranges_bytes(ranges: &[(u64, u64)]) -> Vec<u8> {
    ranges
        .iter()
        .flat_map(|(g, l)| g.to_le_bytes().into_iter().chain(l.to_le_bytes()))
        .collect()
}

fn fill(mem: &GuestMemoryMmap, gpa: u64, len: usize, byte: u8) {
    mem.write_slice(&vec![byte; len], GuestAddress(gpa))
        .unwrap();
}

fn read_byte(mem: &GuestMemoryMmap, gpa: u64) -> u8 {
    mem.read_obj(GuestAddress(gpa)).unwrap()
}

fn reset_dirty(mem: &GuestMemoryMmap) {
    for r in mem.iter() {
        r.get_mmap().bitmap().reset();
    }
}

fn dirty(mem: &GuestMemoryMmap, gpa: u64) -> bool {
    use vm_memory::bitmap::Bitmap;
    let r = mem.find_region(GuestAddress(gpa)).unwrap();
    r.bitmap().dirty_at((gpa - r.start_addr().0) as usize)
}

// ---- features, config space, queue layout ----

#[test]
fn offered_features_follow_config() {
    let b = Balloon::new(&BalloonConfig::default()).unwrap();
    assert_eq!(b.features(), bit(VIRTIO_F_VERSION_1));
    assert_eq!(b.queue_max_sizes(), vec![256, 256]);
    let b = Balloon::new(&all_features()).unwrap();
    let f = b.features();
    for want in [1, 2, 3, 4, 5, 60, VIRTIO_F_VERSION_1] {
        assert_ne!(f & bit(want), 0, "bit {want}");
    }
    assert_eq!(f & bit(6), 0, "bit 6 is not ours");
    assert_eq!(f & bit(0), 0);
    assert_eq!(b.queue_max_sizes(), vec![256, 256, 256, 1024, 256]);
    let b = Balloon::new(&BalloonConfig {
        free_page_reporting: true,
        ..Default::default()
    })
    .unwrap();
    assert_ne!(b.features() & bit(VIRTIO_BALLOON_F_PAGE_POISON), 0);
    assert_eq!(b.features() & bit(VIRTIO_BALLOON_F_HINT_RANGES), 0);
    assert!(Balloon::new(&BalloonConfig {
        size: 1 << 50,
        ..Default::default()
    })
    .is_err());
}

#[test]
fn queue_layout_is_compacted_by_negotiated_features() {
    use QueueKind::*;
    let s = bit(VIRTIO_BALLOON_F_STATS_VQ);
    let h = bit(VIRTIO_BALLOON_F_FREE_PAGE_HINT);
    let r = bit(VIRTIO_BALLOON_F_REPORTING);
    assert_eq!(queue_layout(0), vec![Inflate, Deflate]);
    assert_eq!(queue_layout(s), vec![Inflate, Deflate, Stats]);
    assert_eq!(queue_layout(h), vec![Inflate, Deflate, FreePage]);
    assert_eq!(queue_layout(r), vec![Inflate, Deflate, Reporting]);
    assert_eq!(
        queue_layout(h | r),
        vec![Inflate, Deflate, FreePage, Reporting]
    );
    assert_eq!(
        queue_layout(s | r),
        vec![Inflate, Deflate, Stats, Reporting]
    );
    assert_eq!(
        queue_layout(s | h | r),
        vec![Inflate, Deflate, Stats, FreePage, Reporting]
    );
}

#[test]
fn activation_maps_queues_by_negotiated_features() {
    // Everything offered, but the driver took hinting only: the free page queue is index 2.
    let acked = bit(VIRTIO_F_VERSION_1) | bit(VIRTIO_BALLOON_F_FREE_PAGE_HINT);
    let mut h = Harness::new(&all_features(), acked);
    assert_eq!(h.kinds[2], QueueKind::FreePage);
    let round = h.handle.start_hint_round().unwrap();
    let id = round.cmd_id().to_le_bytes();
    let b = h.out(BUF, &id);
    h.add(QueueKind::FreePage, &[b]);
    h.add(QueueKind::FreePage, &[(16 * MIB, 4 * MIB as u32, true)]);
    h.run();
    assert_eq!(round.pages(), 1024);
    assert_eq!(h.handle.hint_mode(), Some(HintMode::Stock));

    // A queue index the negotiated features give no role is ignored.
    let mut b = Balloon::new(&all_features()).unwrap();
    b.ack_features(acked);
    let mem = guest_memory(1 << 20);
    let vq = VirtioQueue {
        index: 4,
        queue: Arc::new(Mutex::new(TestQueue::new(&mem, 0, 16).queue())),
        event: Arc::new(EventFd::new(EFD_NONBLOCK).unwrap()),
    };
    let _worker = b
        .prepare_worker(mem.clone(), Arc::new(MockInterrupt::default()), vec![vq])
        .unwrap();
    assert!(b.handle().is_active());
    assert_eq!(b.handle().active_queues(), vec![]);
}

#[test]
fn config_space_fields() {
    let h = Harness::all();
    let mut b = h.balloon;
    h.handle.resize(8 * MIB + 100).unwrap();
    let mut cfg = [0u8; 16];
    b.read_config(0, &mut cfg);
    assert_eq!(u32::from_le_bytes(cfg[0..4].try_into().unwrap()), 2048);
    assert_eq!(h.irq.config_count(), 1);
    assert!(h.handle.resize(1 << 50).is_err());
    // num_pages and the command id are read-only for the driver.
    b.write_config(0, &[9; 4]);
    b.write_config(8, &[9; 4]);
    b.write_config(4, &100u32.to_le_bytes());
    b.write_config(12, &[0xAA]);
    b.write_config(14, &[0xBB, 0xCC, 0xDD]); // runs past the end: ignored entirely
    b.read_config(0, &mut cfg);
    assert_eq!(u32::from_le_bytes(cfg[0..4].try_into().unwrap()), 2048);
    assert_eq!(u32::from_le_bytes(cfg[4..8].try_into().unwrap()), 100);
    assert_eq!(u32::from_le_bytes(cfg[8..12].try_into().unwrap()), 0);
    assert_eq!(u32::from_le_bytes(cfg[12..16].try_into().unwrap()), 0xAA);
    assert_eq!(h.handle.actual_pages(), 100);
    assert_eq!(h.handle.actual_bytes(), 100 * PAGE);
    let mut two = [0u8; 2];
    b.read_config(5, &mut two);
    assert_eq!(two, [0, 0]);
    b.read_config(15, &mut two);
    assert_eq!(two, [0, 0]);
    b.read_config(u64::MAX, &mut two);
}

// ---- inflate / deflate ----

#[test]
fn inflate_releases_memory() {
    let mut h = Harness::all();
    let target = 16 * MIB;
    fill(&h.mem, target, 4 * PAGE as usize, 0xAB);
    fill(&h.mem, 32 * MIB, PAGE as usize, 0xCD);
    reset_dirty(&h.mem);
    let first = (target / PAGE) as u32;
    let pfns = [
        first,
        first + 1,
        first + 2,
        first + 3,
        (32 * MIB / PAGE) as u32,
        0xF_FFFF,
    ];
    let b = h.out(BUF, &pfn_bytes(&pfns));
    let head = h.add(QueueKind::Inflate, &[b]);
    h.run();
    assert_eq!(h.used(QueueKind::Inflate), 1);
    assert_eq!(h.q(QueueKind::Inflate).used_elem(0), (u32::from(head), 0));
    for p in 0..4 {
        assert_eq!(
            read_byte(&h.mem, target + p * PAGE),
            0,
            "page {p} reads zero"
        );
        assert!(
            dirty(&h.mem, target + p * PAGE),
            "released page marked dirty"
        );
    }
    assert_eq!(read_byte(&h.mem, 32 * MIB), 0);
    assert_eq!(read_byte(&h.mem, target + 4 * PAGE), 0, "untouched page");
    let c = h.counters();
    assert_eq!(c.inflated_pages, 5);
    assert_eq!(c.released_pages, 5);
    assert_eq!(c.invalid_pfns, 1);
    assert!(h
        .irq
        .events
        .lock()
        .unwrap()
        .contains(&VirtioInterruptType::Queue(0)));
}

#[test]
fn inflate_file_backed_punches_hole() {
    use std::os::unix::fs::FileExt;
    // SAFETY: memfd_create with a valid NUL-terminated name has no memory-safety preconditions.
    let fd = unsafe { libc::memfd_create(c"balloon-test".as_ptr(), 0) };
    assert!(fd >= 0);
    // SAFETY: `fd` is a fresh descriptor that nothing else owns.
    let file = unsafe { <std::fs::File as std::os::unix::io::FromRawFd>::from_raw_fd(fd) };
    file.set_len(32 << 20).unwrap();
    let file = Arc::new(file);
    let mem = Arc::new(
        GuestMemoryMmap::from_ranges_with_files([(
            GuestAddress(0),
            32 << 20,
            Some(vm_memory::FileOffset::from_arc(file.clone(), 0)),
        )])
        .unwrap(),
    );
    let mut h = Harness::with_memory(
        &all_features(),
        Balloon::new(&all_features()).unwrap().features(),
        mem,
    );
    fill(&h.mem, 16 * MIB, PAGE as usize, 0x5A);
    let mut b = [0u8; 1];
    file.read_at(&mut b, 16 * MIB).unwrap();
    assert_eq!(b, [0x5A]);
    let buf = h.out(BUF, &pfn_bytes(&[(16 * MIB / PAGE) as u32]));
    h.add(QueueKind::Inflate, &[buf]);
    h.run();
    assert_eq!(h.counters().released_pages, 1);
    assert_eq!(h.counters().release_errors, 0);
    file.read_at(&mut b, 16 * MIB).unwrap();
    assert_eq!(b, [0], "the file no longer holds the page");
    assert_eq!(read_byte(&h.mem, 16 * MIB), 0);
}

#[test]
fn deflate_accepts_pfns() {
    let mut h = Harness::all();
    fill(&h.mem, 16 * MIB, PAGE as usize, 0x11);
    let b = h.out(BUF, &pfn_bytes(&[(16 * MIB / PAGE) as u32, 0xFFFF_FFFF]));
    h.add(QueueKind::Deflate, &[b]);
    h.run();
    assert_eq!(h.used(QueueKind::Deflate), 1);
    let c = h.counters();
    assert_eq!(
        (c.deflated_pages, c.invalid_pfns, c.released_pages),
        (1, 1, 0)
    );
    assert_eq!(
        read_byte(&h.mem, 16 * MIB),
        0x11,
        "deflate does not touch memory"
    );
}

#[test]
fn inflate_batches_huge_runs() {
    let mut h = Harness::all();
    // 16 MiB of contiguous PFNs in one buffer, plus a long run beyond RAM.
    let start = (16 * MIB / PAGE) as u32;
    let mut pfns: Vec<u32> = (start..start + 4096).collect();
    pfns.extend(0x10_0000u32..0x10_0000 + 4096);
    let b = h.out(BUF, &pfn_bytes(&pfns));
    h.add(QueueKind::Inflate, &[b]);
    let t = Instant::now();
    h.run();
    let c = h.counters();
    assert_eq!((c.inflated_pages, c.invalid_pfns), (4096, 4096));
    assert!(t.elapsed() < Duration::from_secs(1));
}

// ---- malformed input ----

#[test]
fn malformed_pfn_buffers_are_counted() {
    let mut h = Harness::all();
    let good = (16 * MIB / PAGE) as u32;
    let b = h.out(BUF, &pfn_bytes(&[good]));
    // Device-writable buffer, odd length, outside RAM, wrapping address.
    h.add(QueueKind::Inflate, &[(BUF, 4, true)]);
    h.add(QueueKind::Inflate, &[(BUF, 6, false)]);
    h.add(QueueKind::Inflate, &[(0x1_0000_0000, 4, false)]);
    h.add(QueueKind::Inflate, &[(u64::MAX - 1, 4, false)]);
    h.add(QueueKind::Inflate, &[(63 * MIB, 2 * MIB as u32, false)]);
    h.add(QueueKind::Inflate, &[b]);
    h.run();
    assert_eq!(h.used(QueueKind::Inflate), 6, "every chain is used");
    let c = h.counters();
    assert_eq!(c.malformed_buffers, 5);
    assert_eq!(c.inflated_pages, 1, "the device keeps working");
}

#[test]
fn descriptor_loop_and_long_chain_terminate() {
    let mut h = Harness::all();
    let b = h.out(BUF, &pfn_bytes(&[(16 * MIB / PAGE) as u32]));
    let q = h.q(QueueKind::Inflate);
    // Descriptor 0 points to itself.
    q.write_desc(
        0,
        b.0,
        4,
        virtio_bindings::bindings::virtio_ring::VRING_DESC_F_NEXT as u16,
        0,
    );
    q.publish(0);
    h.run();
    assert_eq!(h.used(QueueKind::Inflate), 1);
    // The loop was cut at the queue size: the same PFN seen 64 times.
    assert_eq!(h.counters().inflated_pages, 64);
    // A chain of the whole ring.
    let bufs: Vec<Buf> = (0..64).map(|_| b).collect();
    h.add(QueueKind::Inflate, &bufs);
    h.run();
    assert_eq!(h.used(QueueKind::Inflate), 2);
}

#[test]
fn bad_head_index_is_counted() {
    let mut h = Harness::all();
    let q = h.q(QueueKind::Deflate);
    q.publish(500);
    h.run();
    assert_eq!(h.used(QueueKind::Deflate), 0);
    assert_eq!(h.counters().malformed_buffers, 1);
    let b = h.out(BUF, &pfn_bytes(&[1]));
    h.add(QueueKind::Deflate, &[b]);
    h.run();
    assert_eq!(h.used(QueueKind::Deflate), 1);
}

#[test]
fn avail_index_jump_stops_the_queue() {
    let mut h = Harness::all();
    h.q(QueueKind::Inflate).set_avail_idx(65);
    h.run();
    assert!(*h.irq.needs_reset.lock().unwrap());
    assert_eq!(h.counters().queue_errors, 1);
    h.run();
    assert_eq!(
        h.counters().queue_errors,
        1,
        "the broken queue stays stopped"
    );
    // Other queues keep working.
    let b = h.out(BUF, &pfn_bytes(&[1]));
    h.add(QueueKind::Deflate, &[b]);
    h.run();
    assert_eq!(h.used(QueueKind::Deflate), 1);
}

// ---- statistics ----

fn stats_bytes(pairs: &[(u16, u64)]) -> Vec<u8> {
    pairs
        .iter()
        .flat_map(|(t, v)| t.to_le_bytes().into_iter().chain(v.to_le_bytes()))
        .collect()
}

#[test]
fn statistics_buffer_is_kept_and_given_back_on_request() {
    let mut h = Harness::all();
    let b = h.out(BUF, &stats_bytes(&[(4, 1000), (5, 8000)]));
    let head = h.add(QueueKind::Stats, &[b]);
    h.run();
    assert_eq!(h.used(QueueKind::Stats), 0, "the device keeps the buffer");
    let s = h.handle.stats();
    assert_eq!(
        (s.free_memory, s.total_memory, s.updates),
        (Some(1000), Some(8000), 1)
    );
    h.handle.request_stats().unwrap();
    h.run();
    assert_eq!(h.used(QueueKind::Stats), 1);
    assert_eq!(h.q(QueueKind::Stats).used_elem(0).0, u32::from(head));
    assert!(h
        .irq
        .events
        .lock()
        .unwrap()
        .contains(&VirtioInterruptType::Queue(2)));
    // The driver refills it.
    let b = h.out(BUF, &stats_bytes(&[(4, 500)]));
    h.add(QueueKind::Stats, &[b]);
    h.run();
    assert_eq!(h.handle.stats().free_memory, Some(500));
    // A second buffer while one is held: the older one goes back.
    let b2 = h.out(BUF + 0x100, &stats_bytes(&[(6, 7)]));
    h.add(QueueKind::Stats, &[b2]);
    h.run();
    assert_eq!(h.used(QueueKind::Stats), 2);
    assert_eq!(h.counters().stats_updates, 3);
}

#[test]
fn statistics_on_an_interval() {
    let config = BalloonConfig {
        statistics: true,
        stats_interval: Some(Duration::from_millis(10)),
        ..Default::default()
    };
    let mut balloon = Balloon::new(&config).unwrap();
    balloon.ack_features(balloon.features());
    let mem = guest_memory(16 << 20);
    let mut tqs: Vec<TestQueue> = (0..3)
        .map(|i| TestQueue::new(&mem, 0x10_0000 + i * 0x1_0000, 16))
        .collect();
    let vqs: Vec<VirtioQueue> = tqs
        .iter()
        .enumerate()
        .map(|(i, tq)| VirtioQueue {
            index: i as u16,
            queue: Arc::new(Mutex::new(tq.queue())),
            event: Arc::new(EventFd::new(EFD_NONBLOCK).unwrap()),
        })
        .collect();
    let stats_evt = vqs[2].event.clone();
    balloon
        .activate(mem.clone(), Arc::new(MockInterrupt::default()), vqs)
        .unwrap();
    mem.write_slice(&stats_bytes(&[(4, 1)]), GuestAddress(BUF))
        .unwrap();
    tqs[2].add_chain(&[(BUF, 10, false)]);
    stats_evt.write(1).unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    while tqs[2].used_idx() == 0 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(5));
    }
    assert_eq!(
        tqs[2].used_idx(),
        1,
        "the worker asked for fresh statistics by itself"
    );
    balloon.reset();
}

// ---- free page reporting ----

#[test]
fn reporting_releases_ranges() {
    let mut h = Harness::all();
    fill(&h.mem, 16 * MIB, 2 * MIB as usize, 0x77);
    h.add(
        QueueKind::Reporting,
        &[
            (16 * MIB, 2 * MIB as u32, true),
            (20 * MIB, 2 * MIB as u32, true),
        ],
    );
    // Malformed: read-only, misaligned, outside RAM, empty.
    h.add(
        QueueKind::Reporting,
        &[
            (24 * MIB, 4096, false),
            (24 * MIB + 1, 4096, true),
            (128 * MIB, 4096, true),
            (0, 0, true),
        ],
    );
    h.run();
    assert_eq!(h.used(QueueKind::Reporting), 2);
    assert_eq!(read_byte(&h.mem, 16 * MIB + MIB), 0);
    let c = h.counters();
    assert_eq!(
        (c.reported_pages, c.released_pages, c.malformed_buffers),
        (1024, 1024, 4)
    );
}

#[test]
fn reporting_keeps_pages_when_poisoned() {
    let mut h = Harness::all();
    h.balloon.write_config(12, &0xAAu32.to_le_bytes());
    fill(&h.mem, 16 * MIB, 2 * MIB as usize, 0xAA);
    h.add(QueueKind::Reporting, &[(16 * MIB, 2 * MIB as u32, true)]);
    h.run();
    assert_eq!(h.used(QueueKind::Reporting), 1);
    assert_eq!(
        read_byte(&h.mem, 16 * MIB),
        0xAA,
        "poisoned pages are not discarded"
    );
    let c = h.counters();
    assert_eq!(
        (c.reported_pages, c.reported_pages_kept, c.released_pages),
        (512, 512, 0)
    );

    // Without PAGE_POISON negotiated the value does not matter.
    let acked = bit(VIRTIO_F_VERSION_1) | bit(VIRTIO_BALLOON_F_REPORTING);
    let mut h = Harness::new(&all_features(), acked);
    h.balloon.write_config(12, &0xAAu32.to_le_bytes());
    h.add(QueueKind::Reporting, &[(16 * MIB, 2 * MIB as u32, true)]);
    h.run();
    assert_eq!(h.counters().released_pages, 512);
}

// ---- free page hinting ----

fn cmd(h: &mut Harness, at: u64, id: u32) {
    let b = h.out(at, &id.to_le_bytes());
    h.add(QueueKind::FreePage, &[b]);
}

#[test]
fn hinting_round_stock_mode() {
    let acked = bit(VIRTIO_F_VERSION_1) | bit(VIRTIO_BALLOON_F_FREE_PAGE_HINT);
    let mut h = Harness::new(&all_features(), acked);
    assert_eq!(h.handle.hint_status().state, HintState::Idle);
    let round = h.handle.start_hint_round().unwrap();
    assert_eq!(round.cmd_id(), 2);
    assert_eq!(h.config_u32(8), 2);
    assert_eq!(h.irq.config_count(), 1);
    assert_eq!(h.handle.hint_status().state, HintState::Requested);
    cmd(&mut h, BUF, 2);
    for block in [16, 20, 24] {
        h.add(QueueKind::FreePage, &[(block * MIB, 4 * MIB as u32, true)]);
    }
    h.run();
    assert_eq!(h.handle.hint_status().state, HintState::Receiving);
    assert_eq!(
        h.config_u32(8),
        2,
        "the id stays visible while the round runs"
    );
    assert_eq!(round.take_ranges().len(), 3);
    h.add(QueueKind::FreePage, &[(28 * MIB, 4 * MIB as u32, true)]);
    cmd(&mut h, BUF + 8, FREE_PAGE_HINT_CMD_ID_STOP);
    // After STOP: ignored.
    h.add(QueueKind::FreePage, &[(40 * MIB, 4 * MIB as u32, true)]);
    h.run();
    assert!(round.wait_stopped(Duration::from_millis(1)));
    assert_eq!(
        round.take_ranges(),
        vec![HintRange {
            gpa: 28 * MIB,
            len: 4 * MIB
        }]
    );
    assert_eq!(round.pages(), 4 * 1024);
    let fp = h.q(QueueKind::FreePage);
    assert_eq!(fp.used_idx(), 7);
    for i in 0..7 {
        assert_eq!(fp.used_elem(i).1, 0, "used with length 0");
    }
    let st = h.handle.hint_status();
    assert_eq!(
        (st.state, st.cmd_id, st.pages, st.ignored),
        (HintState::Stopped, 2, 4096, 1)
    );
    let c = h.counters();
    assert_eq!(
        (c.hint_rounds, c.hinted_pages, c.hint_ignored),
        (1, 4096, 1)
    );
    // No interrupt on the free page queue is required, but none is forbidden either; DONE:
    h.handle.hint_done().unwrap();
    assert_eq!(h.config_u32(8), FREE_PAGE_HINT_CMD_ID_DONE);
    assert_eq!(h.handle.hint_status().state, HintState::Done);
    // The next round gets a fresh id.
    assert_eq!(h.handle.start_hint_round().unwrap().cmd_id(), 3);
}

#[test]
fn hinting_round_ranges_mode() {
    let mut h = Harness::all();
    assert_eq!(h.handle.hint_mode(), Some(HintMode::Ranges));
    let round = h.handle.start_hint_round().unwrap();
    let id = round.cmd_id();
    cmd(&mut h, BUF, id);
    let ranges = [
        (16 * MIB, 64 * 1024),
        (16 * MIB + 128 * 1024, 4096),
        (16 * MIB + 130 * 1024, 4096), // overlaps the previous one
        (16 * MIB + 1, 4096),          // misaligned
        (200 * MIB, 4096),             // outside RAM
        (0, 0),                        // empty
        (32 * MIB, u64::MAX),          // absurd
    ];
    let b = h.out(BUF + 0x100, &ranges_bytes(&ranges));
    h.add(QueueKind::FreePage, &[b]);
    // A stock block works in ranges mode too.
    h.add(QueueKind::FreePage, &[(40 * MIB, 4 * MIB as u32, true)]);
    // A range buffer whose length is not a multiple of 16.
    let b = h.out(BUF + 0x400, &[0u8; 24]);
    h.add(QueueKind::FreePage, &[b]);
    cmd(&mut h, BUF + 0x500, FREE_PAGE_HINT_CMD_ID_STOP);
    h.run();
    assert!(round.is_stopped());
    assert_eq!(
        round.take_ranges(),
        vec![
            HintRange {
                gpa: 16 * MIB,
                len: 64 * 1024
            },
            HintRange {
                gpa: 16 * MIB + 128 * 1024,
                len: 4096
            },
            HintRange {
                gpa: 40 * MIB,
                len: 4 * MIB
            },
        ]
    );
    let st = h.handle.hint_status();
    assert_eq!((st.pages, st.rejected), (16 + 1 + 1024, 6));
    assert_eq!(h.used(QueueKind::FreePage), 5);
}

#[test]
fn stale_ids_and_hints_outside_a_round_are_ignored() {
    let mut h = Harness::all();
    // Hints before any round.
    h.add(QueueKind::FreePage, &[(16 * MIB, 4 * MIB as u32, true)]);
    h.run();
    let first = h.handle.start_hint_round().unwrap();
    let second = h.handle.start_hint_round().unwrap();
    assert!(first.is_finished() && !first.is_stopped());
    // The driver still answers the first id: everything until the current id is ignored.
    cmd(&mut h, BUF, first.cmd_id());
    h.add(QueueKind::FreePage, &[(16 * MIB, 4 * MIB as u32, true)]);
    let ranges = h.out(BUF + 0x100, &ranges_bytes(&[(32 * MIB, 4096)]));
    h.add(QueueKind::FreePage, &[ranges]);
    h.run();
    assert!(second.take_ranges().is_empty());
    assert_eq!(h.handle.hint_status().ignored, 3);
    cmd(&mut h, BUF + 8, second.cmd_id());
    h.add(QueueKind::FreePage, &[(16 * MIB, 4 * MIB as u32, true)]);
    h.run();
    assert_eq!(second.take_ranges().len(), 1);
    // Device-side stop (a time limit): config shows STOP and the round is over at once, so a
    // driver that never answers cannot leave it open; what the driver sends later is ignored.
    h.handle.stop_hint_round().unwrap();
    assert_eq!(h.config_u32(8), FREE_PAGE_HINT_CMD_ID_STOP);
    assert!(second.is_finished() && !second.is_stopped());
    assert_eq!(h.handle.hint_status().state, HintState::Stopped);
    h.add(QueueKind::FreePage, &[(20 * MIB, 4 * MIB as u32, true)]);
    cmd(&mut h, BUF + 16, FREE_PAGE_HINT_CMD_ID_STOP);
    h.run();
    assert!(
        second.take_ranges().is_empty(),
        "hints after the device's STOP are not delivered"
    );
    // A second STOP, DONE from the driver, and a late id: ignored too.
    cmd(&mut h, BUF + 24, FREE_PAGE_HINT_CMD_ID_STOP);
    cmd(&mut h, BUF + 32, FREE_PAGE_HINT_CMD_ID_DONE);
    cmd(&mut h, BUF + 40, second.cmd_id());
    h.run();
    assert_eq!(h.handle.hint_status().ignored, 8);
    assert_eq!(h.handle.hint_status().state, HintState::Stopped);
    assert_eq!(
        h.counters().hint_ignored,
        9,
        "one more before the first round"
    );
}

#[test]
fn malformed_hint_buffers_are_rejected() {
    let acked = bit(VIRTIO_F_VERSION_1) | bit(VIRTIO_BALLOON_F_FREE_PAGE_HINT);
    let mut h = Harness::new(&all_features(), acked);
    let round = h.handle.start_hint_round().unwrap();
    cmd(&mut h, BUF, round.cmd_id());
    // Ranges were not negotiated: a 16-byte out buffer is a command id of the wrong size.
    let b = h.out(BUF + 0x100, &ranges_bytes(&[(16 * MIB, 4096)]));
    h.add(QueueKind::FreePage, &[b]);
    let b = h.out(BUF + 0x200, &[1, 2, 3]);
    h.add(QueueKind::FreePage, &[b]);
    // Command id outside RAM, a device-writable 4-byte buffer.
    h.add(QueueKind::FreePage, &[(1 << 40, 4, false)]);
    h.add(QueueKind::FreePage, &[(BUF, 4, true)]);
    // Block beyond RAM and a block that wraps.
    h.add(QueueKind::FreePage, &[(62 * MIB, 4 * MIB as u32, true)]);
    h.add(QueueKind::FreePage, &[(u64::MAX - 4095, 4096, true)]);
    h.add(QueueKind::FreePage, &[(16 * MIB, 4 * MIB as u32, true)]);
    h.run();
    let st = h.handle.hint_status();
    assert_eq!((st.rejected, st.pages), (6, 1024));
    assert_eq!(h.used(QueueKind::FreePage), 8);
    assert_eq!(round.take_ranges().len(), 1);
}

#[test]
fn hinting_requires_negotiation() {
    let acked = bit(VIRTIO_F_VERSION_1);
    let h = Harness::new(&all_features(), acked);
    assert_eq!(h.handle.hint_mode(), None);
    assert!(matches!(
        h.handle.start_hint_round(),
        Err(BalloonError::HintingNotNegotiated)
    ));
    assert!(h.handle.hint_done().is_err());
    let b = Balloon::new(&all_features()).unwrap();
    assert!(b.handle().start_hint_round().is_err());
}

#[test]
fn hinting_3gib_in_4mib_blocks_is_fast() {
    let mem = Arc::new(
        GuestMemoryMmap::from_ranges(&[
            (GuestAddress(0), 3 << 30),
            (GuestAddress(4 << 30), 1 << 30),
        ])
        .unwrap(),
    );
    let acked = bit(VIRTIO_F_VERSION_1) | bit(VIRTIO_BALLOON_F_FREE_PAGE_HINT);
    let mut h = Harness::with_memory(&all_features(), acked, mem);
    let round = h.handle.start_hint_round().unwrap();
    cmd(&mut h, BUF, round.cmd_id());
    h.run();
    // 768 blocks of 4 MiB: 0x4000_0000.. (3 GiB, part below and part above the hole).
    let blocks: Vec<u64> = (0..768u64)
        .map(|i| {
            if i < 512 {
                (1 << 30) + i * 4 * MIB
            } else {
                (4 << 30) + (i - 512) * 4 * MIB
            }
        })
        .collect();
    let q = h.q(QueueKind::FreePage);
    for (n, b) in blocks.iter().enumerate() {
        q.write_desc(
            n as u16 + 1,
            *b,
            4 * MIB as u32,
            virtio_bindings::bindings::virtio_ring::VRING_DESC_F_WRITE as u16,
            0,
        );
        q.publish(n as u16 + 1);
    }
    let t = Instant::now();
    h.run();
    let elapsed = t.elapsed();
    eprintln!("768 hint blocks processed in {elapsed:?}");
    assert_eq!(round.pages(), 768 * 1024);
    assert_eq!(h.used(QueueKind::FreePage), 769);
    // Debug builds are ~10x slower than release; the release target is well under 10 ms.
    assert!(elapsed < Duration::from_millis(if cfg!(debug_assertions) { 200 } else { 10 }));
}

// ---- threads, pause, reset, state ----

#[test]
fn worker_thread_processes_notifications_and_pauses() {
    let config = all_features();
    let mut balloon = Balloon::new(&config).unwrap();
    balloon.ack_features(balloon.features());
    let mem = guest_memory(64 << 20);
    let mut tqs: Vec<TestQueue> = (0..5)
        .map(|i| TestQueue::new(&mem, 0x10_0000 + i * 0x1_0000, 16))
        .collect();
    let vqs: Vec<VirtioQueue> = tqs
        .iter()
        .enumerate()
        .map(|(i, tq)| VirtioQueue {
            index: i as u16,
            queue: Arc::new(Mutex::new(tq.queue())),
            event: Arc::new(EventFd::new(EFD_NONBLOCK).unwrap()),
        })
        .collect();
    let evt = vqs[0].event.clone();
    balloon
        .activate(mem.clone(), Arc::new(MockInterrupt::default()), vqs.clone())
        .unwrap();
    assert!(balloon
        .activate(mem.clone(), Arc::new(MockInterrupt::default()), vqs)
        .is_err());
    let wait_used = |tq: &TestQueue, n: u16| {
        let deadline = Instant::now() + Duration::from_secs(5);
        while tq.used_idx() < n && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(2));
        }
        tq.used_idx()
    };
    mem.write_slice(&pfn_bytes(&[4096]), GuestAddress(BUF))
        .unwrap();
    tqs[0].add_chain(&[(BUF, 4, false)]);
    evt.write(1).unwrap();
    assert_eq!(wait_used(&tqs[0], 1), 1);

    balloon.pause();
    tqs[0].add_chain(&[(BUF, 4, false)]);
    evt.write(1).unwrap();
    std::thread::sleep(Duration::from_millis(50));
    assert_eq!(tqs[0].used_idx(), 1, "nothing moves while paused");
    let state = balloon.state();
    balloon.resume();
    assert_eq!(wait_used(&tqs[0], 2), 2);
    assert_eq!(state.counters.inflated_pages, 1);
    balloon.reset();
    assert_eq!(balloon.handle().counters().inflated_pages, 2);
}

#[test]
fn reset_abandons_the_round() {
    let mut h = Harness::all();
    let round = h.handle.start_hint_round().unwrap();
    h.balloon.reset();
    assert!(round.is_finished());
    assert_eq!(h.handle.hint_status().state, HintState::Idle);
    assert_eq!(h.config_u32(8), 0);
    assert_eq!(h.handle.hint_mode(), None);
}

#[test]
fn state_round_trip() {
    let mut h = Harness::all();
    h.handle.resize(4 * MIB).unwrap();
    h.balloon.write_config(4, &7u32.to_le_bytes());
    let b = h.out(BUF, &pfn_bytes(&[4096, 4097]));
    h.add(QueueKind::Inflate, &[b]);
    let s = h.out(BUF + 0x100, &stats_bytes(&[(4, 99)]));
    let stats_head = h.add(QueueKind::Stats, &[s]);
    let round = h.handle.start_hint_round().unwrap();
    cmd(&mut h, BUF + 0x200, round.cmd_id());
    h.add(QueueKind::FreePage, &[(16 * MIB, 4 * MIB as u32, true)]);
    cmd(&mut h, BUF + 0x208, FREE_PAGE_HINT_CMD_ID_STOP);
    h.run();

    let state = h.balloon.state();
    assert_eq!(state.stats_desc_head, Some(stats_head));
    assert_eq!(state.hinting.state, HintState::Stopped);
    let json = serde_json::to_string(&state).unwrap();
    let back: BalloonState = serde_json::from_str(&json).unwrap();
    assert_eq!(back, state);

    let mut dst = Balloon::new(&all_features()).unwrap();
    dst.restore(back.clone()).unwrap();
    assert_eq!(dst.state(), state);
    let handle = dst.handle();
    assert_eq!(handle.actual_pages(), 7);
    assert_eq!(handle.counters(), h.handle.counters());
    assert_eq!(handle.hint_status().cmd_id, round.cmd_id());
    // On the destination the VMM gives the blocks back, and new ids keep growing.
    let mem = guest_memory(64 << 20);
    let vqs: Vec<VirtioQueue> = (0..5)
        .map(|i| VirtioQueue {
            index: i,
            queue: Arc::new(Mutex::new(
                TestQueue::new(&mem, 0x10_0000 + u64::from(i) * 0x1_0000, 16).queue(),
            )),
            event: Arc::new(EventFd::new(EFD_NONBLOCK).unwrap()),
        })
        .collect();
    let irq = Arc::new(MockInterrupt::default());
    let _worker = dst.prepare_worker(mem, irq.clone(), vqs).unwrap();
    handle.hint_done().unwrap();
    assert_eq!(irq.config_count(), 1);
    assert_eq!(
        handle.start_hint_round().unwrap().cmd_id(),
        round.cmd_id() + 1
    );

    // Invalid states are refused.
    let mut bad = state.clone();
    bad.avail_features = 0;
    assert!(Balloon::new(&all_features()).unwrap().restore(bad).is_err());
    let mut bad = state.clone();
    bad.acked_features |= bit(6);
    assert!(Balloon::new(&all_features()).unwrap().restore(bad).is_err());
    let mut bad = state.clone();
    bad.free_page_hint_cmd_id = 77;
    assert!(Balloon::new(&all_features()).unwrap().restore(bad).is_err());
    let mut bad = state.clone();
    bad.hinting.last_id = 0;
    assert!(Balloon::new(&all_features()).unwrap().restore(bad).is_err());
    let mut bad = state;
    bad.acked_features &= !bit(VIRTIO_BALLOON_F_STATS_VQ);
    assert!(Balloon::new(&all_features()).unwrap().restore(bad).is_err());
}

#[test]
fn balloon_end_to_end_through_the_pci_bus() {
    use crate::pci::{BarAllocator, PciBus, PciConfigIo, PciDevice, SharedPciDevice};
    use crate::test_utils::MockMsi;
    use crate::transport::VirtioPciDevice;

    let mem = guest_memory(64 << 20);
    let balloon = Balloon::new(&all_features()).unwrap();
    let handle = balloon.handle();
    let pci = VirtioPciDevice::new(balloon, mem.clone(), Arc::new(MockMsi::new(8)), None).unwrap();
    let pci = Arc::new(Mutex::new(pci));
    let bus = Arc::new(PciBus::new());
    let mut alloc = BarAllocator::default();
    let shared: SharedPciDevice = pci.clone();
    let slot = bus.add_device(shared, &mut alloc).unwrap();
    let io = PciConfigIo::new(bus.clone());
    io.write(0, &(0x8000_0000u32 | u32::from(slot) << 11).to_le_bytes());
    let mut id = [0u8; 4];
    io.read(4, &mut id);
    assert_eq!(u32::from_le_bytes(id), 0x1045_1AF4);
    io.write(0, &(0x8000_0010u32 | u32::from(slot) << 11).to_le_bytes());
    io.read(4, &mut id);
    let base = u64::from(u32::from_le_bytes(id) & !0xF);
    assert_eq!(base, 0xC000_0000);

    let w = |off: u64, data: &[u8]| assert!(bus.mmio_write(base + off, data));
    let r16 = |off: u64| {
        let mut b = [0u8; 2];
        assert!(bus.mmio_read(base + off, &mut b));
        u16::from_le_bytes(b)
    };
    assert_eq!(r16(0x12), 5);
    // Driver initialisation: VERSION_1 and inflate/deflate only.
    w(0x14, &[1]);
    w(0x14, &[3]);
    w(0x08, &1u32.to_le_bytes());
    w(0x0C, &1u32.to_le_bytes());
    w(0x14, &[11]);
    assert_eq!(r16(0x14) & 0xFF, 11);
    let mut tqs = Vec::new();
    for q in 0..2u16 {
        let tq = TestQueue::new(&mem, 0x10_0000 + u64::from(q) * 0x1_0000, 64);
        w(0x16, &q.to_le_bytes());
        w(0x18, &64u16.to_le_bytes());
        w(0x20, &tq.desc.to_le_bytes());
        w(0x28, &tq.avail.to_le_bytes());
        w(0x30, &tq.used.to_le_bytes());
        w(0x1C, &1u16.to_le_bytes());
        tqs.push(tq);
    }
    w(0x14, &[15]);
    assert!(pci.lock().unwrap().is_activated());
    let fds = pci.lock().unwrap().ioeventfds();
    assert_eq!(fds[0].addr, base + 0x3000);
    assert_eq!(handle.hint_mode(), None);

    let wait_used = |tq: &TestQueue, n: u16| {
        let deadline = Instant::now() + Duration::from_secs(5);
        while tq.used_idx() < n && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(2));
        }
        tq.used_idx()
    };
    mem.write_slice(&pfn_bytes(&[4096, 4097]), GuestAddress(BUF))
        .unwrap();
    tqs[0].add_chain(&[(BUF, 8, false)]);
    // As KVM would: the ioeventfd fires.
    fds[0].event.write(1).unwrap();
    assert_eq!(wait_used(&tqs[0], 1), 1);
    // A notify that comes as an MMIO exit.
    tqs[1].add_chain(&[(BUF, 8, false)]);
    w(0x3004, &1u16.to_le_bytes());
    assert_eq!(wait_used(&tqs[1], 1), 1);
    let c = handle.counters();
    assert_eq!((c.inflated_pages, c.deflated_pages), (2, 2));

    // Migration state of the whole function, restored into a fresh one.
    pci.lock().unwrap().pause();
    let state = pci.lock().unwrap().state();
    let json = serde_json::to_string(&state).unwrap();
    let mut dst = VirtioPciDevice::new(
        Balloon::new(&all_features()).unwrap(),
        mem.clone(),
        Arc::new(MockMsi::new(8)),
        None,
    )
    .unwrap();
    dst.restore(serde_json::from_str(&json).unwrap()).unwrap();
    assert!(dst.is_activated());
    assert_eq!(dst.device().handle().counters(), c);
    // Reset by the driver stops the worker.
    w(0x14, &[0]);
    assert!(!pci.lock().unwrap().is_activated());
}

// ---- the worker start hook ----

/// Activates a statistics-only balloon with `hook`, queues a stats buffer and kicks the worker;
/// returns whether the worker gave the buffer back (asking for fresh statistics) within `wait`.
fn stats_served_with_hook(hook: Option<WorkerStartHook>, wait: Duration) -> bool {
    let config = BalloonConfig {
        statistics: true,
        stats_interval: Some(Duration::from_millis(10)),
        ..Default::default()
    };
    let mut balloon = Balloon::new(&config).unwrap();
    balloon.set_on_worker_start(hook);
    balloon.ack_features(balloon.features());
    let mem = guest_memory(16 << 20);
    let mut tqs: Vec<TestQueue> = (0..3)
        .map(|i| TestQueue::new(&mem, 0x10_0000 + i * 0x1_0000, 16))
        .collect();
    let vqs: Vec<VirtioQueue> = tqs
        .iter()
        .enumerate()
        .map(|(i, tq)| VirtioQueue {
            index: i as u16,
            queue: Arc::new(Mutex::new(tq.queue())),
            event: Arc::new(EventFd::new(EFD_NONBLOCK).unwrap()),
        })
        .collect();
    let stats_evt = vqs[2].event.clone();
    balloon
        .activate(mem.clone(), Arc::new(MockInterrupt::default()), vqs)
        .unwrap();
    mem.write_slice(&stats_bytes(&[(4, 1)]), GuestAddress(BUF))
        .unwrap();
    tqs[2].add_chain(&[(BUF, 10, false)]);
    stats_evt.write(1).unwrap();
    let deadline = Instant::now() + wait;
    while tqs[2].used_idx() == 0 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(5));
    }
    let served = tqs[2].used_idx() == 1;
    balloon.reset();
    served
}

#[test]
fn worker_start_hook_runs_on_the_worker_before_it_serves() {
    let ran_on = Arc::new(Mutex::new(None));
    let seen = ran_on.clone();
    let hook: WorkerStartHook = Arc::new(move || {
        *seen.lock().unwrap() = std::thread::current().name().map(str::to_string);
        Ok(())
    });
    assert!(stats_served_with_hook(Some(hook), Duration::from_secs(5)));
    assert_eq!(ran_on.lock().unwrap().as_deref(), Some("balloon-worker"));
}

#[test]
fn a_failing_worker_start_hook_keeps_the_worker_from_running() {
    let hook: WorkerStartHook = Arc::new(|| Err(std::io::Error::other("no filter")));
    let wait = Duration::from_millis(300);
    assert!(!stats_served_with_hook(Some(hook), wait));
    // Without a hook the same set-up is served.
    assert!(stats_served_with_hook(None, Duration::from_secs(5)));
}

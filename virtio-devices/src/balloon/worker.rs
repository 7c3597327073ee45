//! The balloon's worker thread: an epoll loop over the queue notifications and a control
//! event, and the processing of each queue. Everything in the queues is guest-controlled and
//! is checked before use; bad buffers are counted and used with length 0, a broken ring stops
//! its queue and raises DEVICE_NEEDS_RESET.

use std::os::unix::io::AsRawFd;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use log::{debug, error, warn};
use virtio_queue::{DescriptorChain, Queue, QueueT};
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryBackend};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};

use super::device::BalloonShared;
use super::release::{for_each_ram_piece, release_range, PfnRuns};
use super::state::BalloonCounters;
use super::VIRTIO_BALLOON_F_HINT_RANGES;
use super::{BalloonError, QueueKind, BALLOON_PAGE_SHIFT, BALLOON_PAGE_SIZE};
use crate::interrupt::{VirtioInterrupt, VirtioInterruptType};
use crate::sync::lock;
use crate::virtio::VirtioQueue;
use crate::GuestMemoryMmap;

const CONTROL_TOKEN: u64 = u64::MAX;
/// Rings' worth of buffers taken from one queue before the others get a turn.
const MAX_BATCHES: u32 = 16;
/// Guest buffers are read in pieces of this size (a multiple of 4 and of 16).
const CHUNK: usize = 4096;
/// The statistics buffer is small; anything beyond this is ignored.
const MAX_STATS_BYTES: usize = 4096;
/// Longest PFN array or range array accepted in one descriptor (256 Ki PFNs, 64 Ki ranges);
/// longer buffers are malformed (Linux sends at most 1 KiB of PFNs per buffer).
const MAX_ARRAY_BYTES: u32 = 1 << 20;

/// One descriptor of a chain.
#[derive(Clone, Copy, Debug)]
struct Desc {
    addr: u64,
    len: u32,
    write: bool,
}

fn collect(chain: DescriptorChain<&GuestMemoryMmap>) -> Vec<Desc> {
    chain
        .map(|d| Desc {
            addr: d.addr().raw_value(),
            len: d.len(),
            write: d.is_write_only(),
        })
        .collect()
}

/// Call `f` on the buffer's bytes, `CHUNK` at a time, after checking it is inside RAM.
fn for_each_chunk(
    mem: &GuestMemoryMmap,
    d: &Desc,
    mut f: impl FnMut(&[u8]),
) -> Result<(), BalloonError> {
    let len = u64::from(d.len);
    let outside = || BalloonError::BufferOutsideRam { addr: d.addr, len };
    d.addr.checked_add(len).ok_or_else(outside)?;
    if !GuestMemoryBackend::check_range(mem, GuestAddress(d.addr), d.len as usize) {
        return Err(outside());
    }
    let mut buf = vec![0u8; (d.len as usize).min(CHUNK)];
    let mut done = 0usize;
    while done < d.len as usize {
        let n = (d.len as usize - done).min(CHUNK);
        let addr = GuestAddress(d.addr + done as u64);
        mem.read_slice(&mut buf[..n], addr)
            .map_err(|source| BalloonError::GuestMemory {
                addr: addr.0,
                source,
            })?;
        f(&buf[..n]);
        done += n;
    }
    Ok(())
}

fn le_u64(b: &[u8]) -> u64 {
    let mut v = [0u8; 8];
    v.copy_from_slice(&b[..8]);
    u64::from_le_bytes(v)
}

/// What one inflate/deflate buffer contained.
#[derive(Default)]
struct PfnTally {
    valid: u64,
    invalid: u64,
    released: u64,
    errors: u64,
    malformed: u64,
}

/// Owns the queues while the device runs.
pub(crate) struct BalloonWorker {
    mem: Arc<GuestMemoryMmap>,
    interrupt: Arc<dyn VirtioInterrupt>,
    shared: Arc<BalloonShared>,
    queues: Vec<(QueueKind, VirtioQueue)>,
    broken: Vec<bool>,
    pending: Vec<bool>,
    last_stats: Instant,
}

impl BalloonWorker {
    pub(crate) fn new(
        mem: Arc<GuestMemoryMmap>,
        interrupt: Arc<dyn VirtioInterrupt>,
        shared: Arc<BalloonShared>,
        queues: Vec<(QueueKind, VirtioQueue)>,
    ) -> Self {
        let n = queues.len();
        BalloonWorker {
            mem,
            interrupt,
            shared,
            queues,
            broken: vec![false; n],
            // Buffers may have been queued before activation (or before a restore).
            pending: vec![true; n],
            last_stats: Instant::now(),
        }
    }

    /// The thread body: returns when the device is reset or dropped.
    pub(crate) fn run(mut self) {
        if let Err(e) = self.run_loop() {
            error!("balloon: worker stopped: {e}");
        }
    }

    fn run_loop(&mut self) -> Result<(), BalloonError> {
        let epoll = Epoll::new().map_err(BalloonError::Epoll)?;
        let add = |fd, token| {
            epoll
                .ctl(
                    ControlOperation::Add,
                    fd,
                    EpollEvent::new(EventSet::IN, token),
                )
                .map_err(BalloonError::Epoll)
        };
        add(self.shared.control.as_raw_fd(), CONTROL_TOKEN)?;
        for (i, (_, vq)) in self.queues.iter().enumerate() {
            add(vq.event.as_raw_fd(), i as u64)?;
        }
        let interval = self.shared.stats_interval;
        let timeout = interval.map_or(-1, |d| i32::try_from(d.as_millis()).unwrap_or(i32::MAX));
        let mut events = vec![EpollEvent::default(); self.queues.len() + 1];
        self.process_pending();
        loop {
            let n = match epoll.wait(timeout, &mut events) {
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(BalloonError::Epoll(e)),
            };
            for ev in &events[..n] {
                if ev.data() == CONTROL_TOKEN {
                    let _ = self.shared.control.read();
                } else if let Some((_, vq)) = self.queues.get(ev.data() as usize) {
                    let _ = vq.event.read();
                    self.pending[ev.data() as usize] = true;
                }
            }
            if self.shared.kill.load(Ordering::SeqCst) {
                return Ok(());
            }
            if interval.is_some_and(|i| self.last_stats.elapsed() >= i) {
                self.shared.stats_requested.store(true, Ordering::SeqCst);
            }
            self.process_pending();
        }
    }

    /// Process every queue with pending work, unless paused.
    pub(crate) fn process_pending(&mut self) {
        let shared = self.shared.clone();
        let _busy = lock(&shared.processing);
        if shared.paused.load(Ordering::SeqCst) {
            return;
        }
        if shared.stats_requested.swap(false, Ordering::SeqCst) {
            self.last_stats = Instant::now();
            self.give_back_stats();
        }
        for i in 0..self.queues.len() {
            if std::mem::take(&mut self.pending[i]) {
                if let Err(e) = self.process_queue(i) {
                    warn!("balloon: queue {i}: {e}");
                }
            }
        }
    }

    fn count(&self, f: impl FnOnce(&mut BalloonCounters)) {
        f(&mut lock(&self.shared.counters));
    }

    fn notify(&self, q: &mut Queue, index: u16) {
        if q.needs_notification(self.mem.as_ref()).unwrap_or(true) {
            if let Err(e) = self.interrupt.trigger(VirtioInterruptType::Queue(index)) {
                warn!("balloon: interrupt for queue {index} failed: {e}");
            }
        }
    }

    fn broken_queue(&mut self, i: usize, why: &str) {
        warn!("balloon: queue {i} stopped: {why}");
        self.broken[i] = true;
        self.count(|c| c.queue_errors += 1);
        self.interrupt.signal_needs_reset();
    }

    /// Consume the available buffers of queue `i`.
    pub(crate) fn process_queue(&mut self, i: usize) -> Result<(), BalloonError> {
        if self.broken[i] {
            return Ok(());
        }
        let (kind, vq) = (self.queues[i].0, self.queues[i].1.clone());
        let mem = self.mem.clone();
        let mut q = lock(&vq.queue);
        if !q.ready() {
            return Ok(());
        }
        let avail = match q.avail_idx(mem.as_ref(), Ordering::Acquire) {
            Ok(idx) => idx.0,
            Err(_) => {
                drop(q);
                self.broken_queue(i, "available ring unreadable");
                return Ok(());
            }
        };
        if avail.wrapping_sub(q.next_avail()) > q.size() {
            drop(q);
            self.broken_queue(i, "available index moved by more than the queue size");
            return Ok(());
        }
        // While the queue is drained the driver need not kick (VRING_USED_F_NO_NOTIFY): a stock
        // driver hinting a big guest would otherwise exit once per 4 MiB block.
        if q.disable_notification(mem.as_ref()).is_err() {
            drop(q);
            self.broken_queue(i, "used ring flags unwritable");
            return Ok(());
        }
        let mut used = false;
        let mut batches = 0;
        loop {
            used |= self.drain_batch(kind, &mut q, mem.as_ref());
            if kind == QueueKind::FreePage {
                lock(&self.shared.hints).flush();
            }
            batches += 1;
            // Notifications back on; buffers that came meanwhile are taken now.
            match q.enable_notification(mem.as_ref()) {
                Ok(false) => break,
                Ok(true) if batches < MAX_BATCHES => {
                    if q.disable_notification(mem.as_ref()).is_err() {
                        drop(q);
                        self.broken_queue(i, "used ring flags unwritable");
                        return Ok(());
                    }
                }
                Ok(true) => {
                    // Other queues get their turn; this one is looked at again at once.
                    if let Err(e) = vq.event.write(1) {
                        warn!("balloon: cannot re-arm queue {i}: {e}");
                    }
                    break;
                }
                Err(_) => {
                    drop(q);
                    self.broken_queue(i, "available ring unreadable");
                    return Ok(());
                }
            }
        }
        if used {
            self.notify(&mut q, vq.index);
        }
        Ok(())
    }

    /// Takes up to one ring's worth of buffers; true if any was used.
    fn drain_batch(&mut self, kind: QueueKind, q: &mut Queue, mem: &GuestMemoryMmap) -> bool {
        let mut used = false;
        for _ in 0..q.size() {
            let Some(chain) = q.pop_descriptor_chain(mem) else {
                break;
            };
            let head = chain.head_index();
            let descs = collect(chain);
            match kind {
                QueueKind::Inflate => self.pfns(&descs, true),
                QueueKind::Deflate => self.pfns(&descs, false),
                QueueKind::Reporting => self.reporting(&descs),
                QueueKind::FreePage => self.free_page(&descs),
                QueueKind::Stats => {
                    self.stats(&descs);
                    match lock(&self.shared.stats_head).replace(head) {
                        // The driver sent a second buffer: give the older one back.
                        Some(old) => self.add_used(q, old),
                        None => continue,
                    }
                    used = true;
                    continue;
                }
            }
            self.add_used(q, head);
            used = true;
        }
        used
    }

    fn add_used(&self, q: &mut Queue, head: u16) {
        if let Err(e) = q.add_used(self.mem.as_ref(), head, 0) {
            debug!("balloon: cannot use descriptor {head}: {e}");
            self.count(|c| c.malformed_buffers += 1);
        }
    }

    fn apply_run(&self, (start, count): (u64, u64), release: bool, t: &mut PfnTally) {
        let mem = self.mem.as_ref();
        t.invalid += for_each_ram_piece(mem, start, count, |gpa, len| {
            let pages = len >> BALLOON_PAGE_SHIFT;
            t.valid += pages;
            if release {
                match release_range(mem, gpa, len) {
                    Ok(()) => t.released += pages,
                    Err(e) => {
                        debug!("balloon: {e}");
                        t.errors += 1;
                    }
                }
            }
        });
    }

    /// Inflate (`release`) or deflate buffers: arrays of le32 PFNs.
    fn pfns(&self, descs: &[Desc], release: bool) {
        let mut t = PfnTally::default();
        let mut runs = PfnRuns::default();
        for d in descs {
            if d.write || d.len % 4 != 0 || d.len > MAX_ARRAY_BYTES {
                t.malformed += 1;
                continue;
            }
            let mut finished = Vec::new();
            let res = for_each_chunk(self.mem.as_ref(), d, |bytes| {
                for pfn in bytes.chunks_exact(4) {
                    let pfn = u32::from_le_bytes([pfn[0], pfn[1], pfn[2], pfn[3]]);
                    finished.extend(runs.push(u64::from(pfn)));
                }
            });
            for run in finished {
                self.apply_run(run, release, &mut t);
            }
            if res.is_err() {
                t.malformed += 1;
            }
        }
        if let Some(run) = runs.finish() {
            self.apply_run(run, release, &mut t);
        }
        self.count(|c| {
            if release {
                c.inflated_pages += t.valid;
            } else {
                c.deflated_pages += t.valid;
            }
            c.released_pages += t.released;
            c.release_errors += t.errors;
            c.invalid_pfns += t.invalid;
            c.malformed_buffers += t.malformed;
        });
    }

    /// Free page reporting: device-writable buffers naming free memory.
    fn reporting(&self, descs: &[Desc]) {
        let mem = self.mem.as_ref();
        let keep = self.shared.poison_active();
        let (mut reported, mut kept, mut released, mut errors, mut malformed) = (0, 0, 0, 0, 0);
        for d in descs {
            let len = u64::from(d.len);
            let aligned = d.addr % BALLOON_PAGE_SIZE == 0 && len % BALLOON_PAGE_SIZE == 0;
            let inside = d.addr.checked_add(len).is_some()
                && GuestMemoryBackend::check_range(mem, GuestAddress(d.addr), d.len as usize);
            if !d.write || len == 0 || !aligned || !inside {
                malformed += 1;
                continue;
            }
            let pages = len >> BALLOON_PAGE_SHIFT;
            reported += pages;
            if keep {
                kept += pages;
                continue;
            }
            // A range may span regions that touch; release it region by region.
            for_each_ram_piece(mem, d.addr >> BALLOON_PAGE_SHIFT, pages, |gpa, len| {
                match release_range(mem, gpa, len) {
                    Ok(()) => released += len >> BALLOON_PAGE_SHIFT,
                    Err(e) => {
                        debug!("balloon: {e}");
                        errors += 1;
                    }
                }
            });
        }
        self.count(|c| {
            c.reported_pages += reported;
            c.reported_pages_kept += kept;
            c.released_pages += released;
            c.release_errors += errors;
            c.malformed_buffers += malformed;
        });
    }

    /// The statistics buffer: read its tagged values.
    fn stats(&self, descs: &[Desc]) {
        let mut buf = Vec::new();
        let mut malformed = 0;
        for d in descs {
            if d.write {
                malformed += 1;
                continue;
            }
            let room = MAX_STATS_BYTES.saturating_sub(buf.len());
            let d = Desc {
                len: d.len.min(room as u32),
                ..*d
            };
            let res = for_each_chunk(self.mem.as_ref(), &d, |bytes| buf.extend_from_slice(bytes));
            if res.is_err() {
                malformed += 1;
            }
        }
        lock(&self.shared.stats).update(&buf);
        self.count(|c| {
            c.stats_updates += 1;
            c.malformed_buffers += malformed;
        });
    }

    /// Give the statistics buffer back so that the driver refills it.
    fn give_back_stats(&mut self) {
        let Some(i) = self.queues.iter().position(|(k, _)| *k == QueueKind::Stats) else {
            return;
        };
        if self.broken[i] {
            return;
        }
        let vq = self.queues[i].1.clone();
        let Some(head) = lock(&self.shared.stats_head).take() else {
            return;
        };
        let mut q = lock(&vq.queue);
        self.add_used(&mut q, head);
        self.notify(&mut q, vq.index);
    }

    /// The free page queue: command ids, stock hints (in buffers) and, with HINT_RANGES,
    /// out buffers of `{le64 gpa; le64 len}` ranges. Nothing here is ever written back.
    fn free_page(&self, descs: &[Desc]) {
        let mem = self.mem.as_ref();
        let ranges_mode = self.shared.has(VIRTIO_BALLOON_F_HINT_RANGES);
        let mut hints = lock(&self.shared.hints);
        for d in descs {
            if d.write {
                hints.on_hint(mem, d.addr, u64::from(d.len));
            } else if d.len == 4 {
                match mem.read_obj::<u32>(GuestAddress(d.addr)) {
                    Ok(id) => hints.on_cmd_id(u32::from_le(id)),
                    Err(_) => hints.reject(1),
                }
            } else if ranges_mode && d.len > 0 && d.len % 16 == 0 && d.len <= MAX_ARRAY_BYTES {
                if !hints.receiving() {
                    hints.ignore(u64::from(d.len / 16));
                    continue;
                }
                let res = for_each_chunk(mem, d, |bytes| {
                    for r in bytes.chunks_exact(16) {
                        hints.on_hint(mem, le_u64(&r[..8]), le_u64(&r[8..]));
                    }
                });
                if res.is_err() {
                    hints.reject(1);
                }
            } else {
                // A command id of the wrong size, or ranges that were not negotiated.
                hints.reject(1);
            }
        }
    }
}

#[cfg(any(test, feature = "fuzzing"))]
impl BalloonWorker {
    /// Mark every queue pending and process them on the calling thread.
    pub(crate) fn process_all(&mut self) {
        self.pending.fill(true);
        self.process_pending();
    }

    /// Process queue `i` (if there is one) as its notification would, on the calling thread.
    #[cfg(feature = "fuzzing")]
    pub(crate) fn notify_queue(&mut self, i: usize) {
        if let Some(pending) = self.pending.get_mut(i) {
            *pending = true;
            self.process_pending();
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;
    use std::time::Duration;

    use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

    use super::super::{
        queue_layout, Balloon, BalloonConfig, HintRange, FREE_PAGE_HINT_CMD_ID_STOP,
        VIRTIO_BALLOON_F_FREE_PAGE_HINT,
    };
    use super::*;
    use crate::test_utils::{guest_memory, MockInterrupt, TestQueue};
    use crate::virtio::{VirtioDevice, VIRTIO_F_VERSION_1};

    const MIB: u64 = 1 << 20;
    /// The driver's buffer pages.
    const BUF: u64 = 8 * MIB;

    /// A balloon with only free page hinting (ranges) negotiated, its worker, the driver side
    /// of the free page queue (`fpq_size` descriptors) and a handle.
    fn ranges_balloon(
        mem: &Arc<GuestMemoryMmap>,
        fpq_size: u16,
    ) -> (Balloon, BalloonWorker, TestQueue) {
        let config = BalloonConfig {
            free_page_hinting: true,
            ..Default::default()
        };
        let mut balloon = Balloon::new(&config).unwrap();
        let acked = 1 << VIRTIO_F_VERSION_1
            | 1 << VIRTIO_BALLOON_F_FREE_PAGE_HINT
            | 1 << VIRTIO_BALLOON_F_HINT_RANGES;
        balloon.ack_features(acked);
        let mut fpq = None;
        let vqs = queue_layout(acked)
            .iter()
            .enumerate()
            .map(|(i, kind)| {
                let size = if *kind == QueueKind::FreePage {
                    fpq_size
                } else {
                    16
                };
                let tq = TestQueue::new(mem, 0x10_0000 + 0x1_0000 * i as u64, size);
                let vq = VirtioQueue {
                    index: i as u16,
                    queue: Arc::new(Mutex::new(tq.queue())),
                    event: Arc::new(EventFd::new(EFD_NONBLOCK).unwrap()),
                };
                if *kind == QueueKind::FreePage {
                    fpq = Some(tq);
                }
                vq
            })
            .collect();
        let worker = balloon
            .prepare_worker(mem.clone(), Arc::new(MockInterrupt::default()), vqs)
            .unwrap();
        (balloon, worker, fpq.unwrap())
    }

    fn out(mem: &GuestMemoryMmap, gpa: u64, data: &[u8]) -> (u64, u32, bool) {
        mem.write_slice(data, GuestAddress(gpa)).unwrap();
        (gpa, data.len() as u32, false)
    }

    #[test]
    fn a_ranges_round_reuses_a_few_buffers_for_many_ranges() {
        // 100 buffers of 256 ranges (the old guest's cap was 64 buffers), through 8 buffer
        // pages and a free page queue of 16 descriptors, as the Linux patch sends them:
        // each buffer is refilled and queued again once the device has used it.
        const BUFFERS: u64 = 100;
        let mem = guest_memory(512 << 20);
        let (balloon, mut worker, mut fpq) = ranges_balloon(&mem, 16);
        let handle = balloon.handle();
        let round = handle.start_hint_round().unwrap();
        let cmd = out(&mem, BUF - 8, &round.cmd_id().to_le_bytes());
        fpq.add_chain(&[cmd]);
        worker.process_all();
        let mut taken: Vec<HintRange> = Vec::new();
        let mut next = 16 * MIB;
        let t = Instant::now();
        for i in 0..BUFFERS {
            let page = BUF + (i % 8) * 4096;
            let bytes: Vec<u8> = (0..256)
                .flat_map(|_| {
                    // one page free, one page used
                    let r = (next, 4096u64);
                    next += 2 * 4096;
                    r.0.to_le_bytes().into_iter().chain(r.1.to_le_bytes())
                })
                .collect();
            fpq.add_chain(&[out(&mem, page, &bytes)]);
            worker.process_all();
            assert_eq!(u64::from(fpq.used_idx()), i + 2, "buffer {i} handed back");
            taken.extend(round.take_ranges());
        }
        let elapsed = t.elapsed();
        let stop = out(&mem, BUF - 4, &FREE_PAGE_HINT_CMD_ID_STOP.to_le_bytes());
        fpq.add_chain(&[stop]);
        worker.process_all();
        assert!(round.wait_stopped(Duration::ZERO));
        taken.extend(round.take_ranges());
        eprintln!("{BUFFERS} buffers of 256 ranges in {elapsed:?}");
        assert_eq!(taken.len() as u64, BUFFERS * 256);
        assert!(taken
            .iter()
            .enumerate()
            .all(|(i, r)| r.gpa == 16 * MIB + 2 * 4096 * i as u64 && r.len == 4096));
        let st = handle.hint_status();
        assert_eq!((st.pages, st.rejected, st.ignored), (BUFFERS * 256, 0, 0));
        let c = handle.counters();
        assert_eq!(
            (c.hinted_pages, c.hint_rounds_incomplete),
            (BUFFERS * 256, 0)
        );
        // Debug builds are ~10x slower than release.
        let limit = if cfg!(debug_assertions) { 2000 } else { 200 };
        assert!(elapsed < Duration::from_millis(limit), "{elapsed:?}");
    }

    #[test]
    fn notifications_are_back_on_after_every_drain() {
        // The device turns kicks off while it drains a queue; if it left them off, a driver
        // that honours VRING_USED_F_NO_NOTIFY would never kick again and hints would stall.
        let mem = guest_memory(512 << 20);
        let (balloon, mut worker, mut fpq) = ranges_balloon(&mem, 16);
        let round = balloon.handle().start_hint_round().unwrap();
        fpq.add_chain(&[out(&mem, BUF - 8, &round.cmd_id().to_le_bytes())]);
        for i in 0..40u64 {
            // A full ring at times, one buffer at others.
            let n = if i % 4 == 0 { 15 } else { 1 };
            for j in 0..n {
                let range = [
                    (32 * MIB + (i * 16 + j) * 4096).to_le_bytes(),
                    4096u64.to_le_bytes(),
                ];
                fpq.add_chain(&[out(&mem, BUF + j * 4096, &range.concat())]);
            }
            worker.process_all();
            assert_eq!(fpq.used_flags() & 1, 0, "kicks left off after drain {i}");
            assert_eq!(
                fpq.used_idx(),
                fpq_avail(&mem, &fpq),
                "drain {i} took everything"
            );
        }
    }

    fn fpq_avail(mem: &GuestMemoryMmap, q: &TestQueue) -> u16 {
        mem.read_obj(GuestAddress(q.avail + 2)).unwrap()
    }

    #[test]
    fn a_round_the_host_stops_is_counted_incomplete() {
        let mem = guest_memory(64 << 20);
        let (balloon, mut worker, mut fpq) = ranges_balloon(&mem, 16);
        let handle = balloon.handle();
        let round = handle.start_hint_round().unwrap();
        fpq.add_chain(&[out(&mem, BUF, &round.cmd_id().to_le_bytes())]);
        let ranges: Vec<u8> = [16 * MIB, 4096]
            .into_iter()
            .flat_map(u64::to_le_bytes)
            .collect();
        fpq.add_chain(&[out(&mem, BUF + 4096, &ranges)]);
        worker.process_all();
        handle.stop_hint_round().unwrap();
        assert!(round.is_finished() && !round.is_stopped());
        assert_eq!(round.take_ranges().len(), 1);
        assert_eq!(handle.counters().hint_rounds_incomplete, 1);
        assert_eq!(handle.hint_status().total_incomplete, 1);
    }
}

//! virtio-balloon driver: inflate/deflate following `num_pages`, the statistics queue, and free
//! page hinting in three flavours (`hint=stock|none|ranges`).
//!
//! * stock: like Linux. On a new `free_page_hint_cmd_id` (>= 2): an out buffer with the id, then
//!   order-10 (4 MiB) blocks taken from the allocator, each one device-writable in buffer, until
//!   allocation fails or the id changes (seen through a config interrupt); then an out buffer
//!   with STOP (0). The blocks are held until DONE (1), or given back early when an inflate
//!   cannot get memory.
//! * none: FREE_PAGE_HINT is negotiated but requests are never answered.
//! * ranges (needs our feature bit 60, else stock): the id, then the allocator's free memory as
//!   merged ranges without allocating it, in out buffers of up to 256 `{le64 gpa, le64 len}`
//!   (a few buffer pages, each refilled once the device has used it, so any number of ranges),
//!   then STOP. Nothing is held; DONE is a no-op.
//!
//! Configuration changes arrive by MSI-X (vector [`CONFIG_VECTOR`] on the BSP) when the device
//! has MSI-X; the configuration is also polled every 20 ms as a fallback (the hint id is only
//! re-read mid-round after an interrupt, since QEMU shows 0 there while a round runs).

use crate::kernel::{mmio_read32, mmio_write32, rdtsc};
use crate::mm::{OwnedPages, PfnList};
use crate::pci::{self, Access};
use crate::println;
use crate::smp::irq_counts;
use crate::time::{ticks_to_us, us_to_ticks};
use crate::virtio::{self, status, Queue, Transport};
use core::sync::atomic::Ordering;
use guest_core::buddy::{Buddy, MAX_ORDER};
use guest_core::cmdline::{Config, HintMode};
use guest_core::pfnstack::PfnStack;
use guest_core::PAGE_SIZE;

/// Interrupt vector for configuration changes.
pub const CONFIG_VECTOR: u8 = 0x40;

const F_STATS_VQ: u64 = 1 << 1;
const F_DEFLATE_ON_OOM: u64 = 1 << 2;
const F_FREE_PAGE_HINT: u64 = 1 << 3;
const F_REPORTING: u64 = 1 << 5;
/// Our guest-patch protocol: hints as merged ranges.
const F_HINT_RANGES: u64 = 1 << 60;

const CMD_STOP: u32 = 0;
const CMD_DONE: u32 = 1;

// scratch page layout
const SCR_INFLATE: u64 = 0;
const SCR_DEFLATE: u64 = 1024;
const SCR_STATS: u64 = 2048;
const SCR_CMD: u64 = 3072; // 64 slots of 4 bytes

// free page queue tokens
const TOK_CMD: u64 = 1 << 62;
const TOK_BLOCK: u64 = 1 << 61;
const TOK_RANGES: u64 = 1 << 60; // | pfn of the buffer page (freed when used)

/// Range buffer pages of a ranges round, reused as the device hands them back (as many as
/// the Linux patch keeps in flight).
const RANGE_BUFS: usize = 8;
/// Ranges per buffer page (the protocol's most per buffer).
const RANGES_PER_BUF: u32 = 256;
/// A ranges round sends STOP after this long, even if the walk is not done: a device that
/// never hands buffers back cannot keep the driver busy for ever.
const RANGES_ROUND_LIMIT_US: u64 = 5_000_000;

/// The driver state.
pub struct Balloon {
    t: Transport,
    hint: HintMode,
    features: u64,
    inflate: Queue,
    deflate: Queue,
    stats: Option<Queue>,
    fpq: Option<Queue>,
    /// Inflated pages, kept in pages of their own (one per 1022 entries, taken from the pages
    /// being inflated), so an empty balloon costs no memory.
    pages: PfnStack,
    held: PfnList,
    scratch: u64,
    inflating: u32,
    deflating: u32,
    irq_seen: u32,
    msix: bool,
    next_poll: u64,
    cmd_slot: u64,
    last_cmd: u32,
    managed: u64,
    target: u32,
}

impl Balloon {
    /// Finds the balloon (conf1, or ECAM when `pci_ecam=` is given) and initialises it.
    pub fn probe(cfg: &Config, apic_id: u32, held: PfnList, b: &mut Buddy) -> Option<Balloon> {
        let access = match cfg.pci_ecam {
            Some(e) => Access::Ecam(e),
            None => Access::Conf1,
        };
        let Some(dev) = pci::find(access, 0x1af4, &[0x1045, 0x1002]) else {
            println!(
                "guest: balloon not found ({})",
                if cfg.pci_ecam.is_some() {
                    "ecam"
                } else {
                    "conf1"
                }
            );
            return None;
        };
        let Some(t) = Transport::new(dev) else {
            println!(
                "guest: balloon {:02x}.{} has no modern virtio capabilities",
                dev.dev, dev.func
            );
            return None;
        };
        let r = Self::init(cfg, apic_id, t, held, b);
        if r.is_none() {
            println!("guest: balloon init failed");
        }
        r
    }

    fn init(
        cfg: &Config,
        apic_id: u32,
        t: Transport,
        held: PfnList,
        b: &mut Buddy,
    ) -> Option<Balloon> {
        if !t.reset() {
            return None;
        }
        t.set_status(status::ACK);
        t.set_status(status::ACK | status::DRIVER);
        let offered = t.device_features();
        if offered & virtio::F_VERSION_1 == 0 {
            println!("guest: balloon without VERSION_1 (features {:#x})", offered);
            t.set_status(status::FAILED);
            return None;
        }
        let mut want =
            virtio::F_VERSION_1 | F_STATS_VQ | F_DEFLATE_ON_OOM | F_FREE_PAGE_HINT | F_REPORTING;
        if cfg.hint == HintMode::Ranges {
            want |= F_HINT_RANGES;
        }
        let features = offered & want;
        t.set_driver_features(features);
        t.set_status(status::ACK | status::DRIVER | status::FEATURES_OK);
        if t.status() & status::FEATURES_OK == 0 {
            t.set_status(status::FAILED);
            return None;
        }
        // MSI-X before the queues (vectors are only accepted with MSI-X on)
        let msix = t.setup_config_irq(apic_id, CONFIG_VECTOR);
        let mut idx = 0u16;
        let mut next = |b: &mut Buddy| {
            let q = t.setup_queue(idx, 256, b);
            idx += 1;
            q
        };
        let inflate = next(b)?;
        let deflate = next(b)?;
        let stats = if features & F_STATS_VQ != 0 {
            Some(next(b)?)
        } else {
            None
        };
        let fpq = if features & F_FREE_PAGE_HINT != 0 {
            Some(next(b)?)
        } else {
            None
        };
        if features & F_REPORTING != 0 {
            next(b)?; // set up but unused: this guest does not report free pages
        }
        let scratch = b.alloc(0)? as u64 * PAGE_SIZE;
        // SAFETY: a fresh page owned by the driver.
        unsafe { core::ptr::write_bytes(scratch as *mut u8, 0, PAGE_SIZE as usize) };
        let hint = match cfg.hint {
            HintMode::Ranges if features & F_HINT_RANGES == 0 => HintMode::Stock,
            h => h,
        };
        let mut bl = Balloon {
            t,
            hint,
            features,
            inflate,
            deflate,
            stats,
            fpq,
            pages: PfnStack::new(),
            held,
            scratch,
            inflating: 0,
            deflating: 0,
            irq_seen: irq_counts[CONFIG_VECTOR as usize].load(Ordering::Relaxed),
            msix,
            next_poll: 0,
            cmd_slot: 0,
            last_cmd: 0,
            managed: b.managed_pages(),
            target: 0,
        };
        bl.t.set_status(status::ACK | status::DRIVER | status::FEATURES_OK | status::DRIVER_OK);
        if bl.stats.is_some() {
            bl.fill_stats(b);
            let a = bl.scratch + SCR_STATS;
            if let Some(q) = bl.stats.as_mut() {
                q.add(a, 100, false, 0);
                q.kick();
            }
        }
        // a hint request pending from before we started is not answered (its id is "seen")
        bl.last_cmd = bl.cfg(8);
        println!(
            "guest: balloon ready features={:#x} hint={} msix={} queues={} fpq={} actual=0",
            bl.features,
            bl.hint.name(),
            bl.msix,
            idx,
            bl.fpq.is_some()
        );
        Some(bl)
    }

    fn cfg(&self, off: u64) -> u32 {
        // SAFETY: the mapped device configuration structure.
        unsafe { mmio_read32(self.t.device + off) }
    }

    fn set_actual(&self) {
        // SAFETY: `actual` is driver-writable.
        unsafe { mmio_write32(self.t.device + 4, self.pages.len() as u32) };
    }

    /// Pages held by the balloon (inflated).
    #[allow(dead_code)]
    pub fn inflated(&self) -> usize {
        self.pages.len()
    }

    /// Does pending work: used buffers, config changes (interrupt or 20 ms poll), resizes.
    pub fn poll(&mut self, b: &mut Buddy) {
        self.reap(b);
        let irqs = irq_counts[CONFIG_VECTOR as usize].load(Ordering::Acquire);
        let now = rdtsc();
        let irq = irqs != self.irq_seen;
        if !irq && now < self.next_poll {
            if self.target as usize != self.pages.len() {
                self.resize(b); // keep going at full speed towards the last known target
            }
            return;
        }
        self.target = self.cfg(0);
        self.irq_seen = irqs;
        self.next_poll = now + us_to_ticks(20_000);
        // hint command
        if self.fpq.is_some() && self.hint != HintMode::None {
            let cmd = self.cfg(8);
            if cmd != self.last_cmd {
                self.last_cmd = cmd;
                match cmd {
                    CMD_DONE => {
                        let n = self.held.len();
                        self.release_held(b);
                        println!("guest: hint done released_blocks={}", n);
                    }
                    CMD_STOP => {}
                    id => match self.hint {
                        HintMode::Ranges => self.ranges_round(id, b),
                        _ => self.stock_round(id, b),
                    },
                }
            }
        }
        self.resize(b);
    }

    fn reap(&mut self, b: &mut Buddy) {
        if self.inflating > 0 && self.inflate.pop_used().is_some() {
            self.inflating = 0;
            self.set_actual();
        }
        if self.deflating > 0 && self.deflate.pop_used().is_some() {
            // SAFETY: the deflate buffer in the scratch page holds the PFNs just given back.
            let pfns = unsafe {
                core::slice::from_raw_parts(
                    (self.scratch + SCR_DEFLATE) as *const u32,
                    self.deflating as usize,
                )
            };
            for &p in pfns {
                let _ = b.free(p, 0);
            }
            self.deflating = 0;
            self.set_actual();
        }
        if self.stats.as_mut().and_then(|q| q.pop_used()).is_some() {
            self.fill_stats(b);
            let a = self.scratch + SCR_STATS;
            if let Some(q) = self.stats.as_mut() {
                q.add(a, 100, false, 0);
                q.kick();
            }
        }
        if let Some(q) = self.fpq.as_mut() {
            while let Some((tok, _)) = q.pop_used() {
                if tok & TOK_RANGES != 0 {
                    let _ = b.free((tok & 0xffff_ffff) as u32, 0);
                }
            }
        }
    }

    fn resize(&mut self, b: &mut Buddy) {
        if self.inflating > 0 || self.deflating > 0 {
            return;
        }
        let target = self.target as usize;
        let have = self.pages.len();
        if target > have {
            let n = (target - have).min(256);
            let buf = (self.scratch + SCR_INFLATE) as *mut u32;
            let mut got = 0;
            while got < n {
                let p = match b.alloc(0) {
                    Some(p) => p,
                    None if self.held.len() > 0 => {
                        self.release_held(b); // memory pressure: give hinted blocks back early
                        continue;
                    }
                    None => break,
                };
                if !self.pages.push(&mut OwnedPages, p) {
                    continue; // `p` became a page of the list itself
                }
                // SAFETY: the inflate area of the scratch page has room for 256 PFNs.
                unsafe { buf.add(got).write(p) };
                got += 1;
            }
            if got > 0 {
                self.inflate
                    .add(self.scratch + SCR_INFLATE, 4 * got as u32, false, 0);
                self.inflate.kick();
                self.inflating = got as u32;
            }
        } else if target < have {
            let n = (have - target).min(256);
            let buf = (self.scratch + SCR_DEFLATE) as *mut u32;
            for i in 0..n {
                let Some(p) = self.pages.pop(&mut OwnedPages, |node| {
                    let _ = b.free(node, 0);
                }) else {
                    break;
                };
                // SAFETY: the deflate area has room for 256 PFNs.
                unsafe { buf.add(i).write(p) };
                self.deflating += 1;
            }
            if self.deflating > 0 {
                self.deflate
                    .add(self.scratch + SCR_DEFLATE, 4 * self.deflating, false, 0);
                self.deflate.kick();
            }
        }
    }

    fn fill_stats(&self, b: &Buddy) {
        let free = b.free_pages() * PAGE_SIZE;
        let total = self.managed * PAGE_SIZE;
        let tags: [(u16, u64); 10] = [
            (0, 0),                                                        // swap in
            (1, 0),                                                        // swap out
            (2, 0),                                                        // major faults
            (3, 0),                                                        // minor faults
            (4, free),                                                     // free memory
            (5, total),                                                    // total memory
            (6, free + self.held.len() as u64 * (PAGE_SIZE << MAX_ORDER)), // available
            (7, 0),                                                        // caches
            (8, 0),                                                        // hugetlb allocations
            (9, 0),                                                        // hugetlb failures
        ];
        let p = (self.scratch + SCR_STATS) as *mut u8;
        for (i, (tag, val)) in tags.iter().enumerate() {
            // SAFETY: 10 entries of 10 bytes in the stats area of the scratch page.
            unsafe {
                core::ptr::write_unaligned(p.add(10 * i) as *mut u16, tag.to_le());
                core::ptr::write_unaligned(p.add(10 * i + 2) as *mut u64, val.to_le());
            }
        }
    }

    /// Puts a command id into a fresh scratch slot and queues it as an out buffer.
    fn send_cmd(&mut self, id: u32) -> bool {
        let a = self.scratch + SCR_CMD + 4 * (self.cmd_slot % 64);
        self.cmd_slot += 1;
        // SAFETY: a 4-byte slot of the scratch page.
        unsafe { core::ptr::write_volatile(a as *mut u32, id.to_le()) };
        let Some(q) = self.fpq.as_mut() else {
            return false;
        };
        let ok = q.add(a, 4, false, TOK_CMD);
        q.kick();
        ok
    }

    /// Waits (up to 200 ms) until the free page queue has `n` free descriptors.
    fn wait_fpq(&mut self, n: u16, b: &mut Buddy) -> bool {
        let deadline = rdtsc() + us_to_ticks(200_000);
        loop {
            self.reap(b);
            if self.fpq.as_ref().is_some_and(|q| q.num_free() >= n) {
                return true;
            }
            if rdtsc() > deadline {
                return false;
            }
            core::hint::spin_loop();
        }
    }

    /// Has the device moved on from `id` (seen through a config interrupt)?
    fn cmd_changed(&mut self, id: u32) -> bool {
        let irqs = irq_counts[CONFIG_VECTOR as usize].load(Ordering::Acquire);
        if irqs == self.irq_seen {
            return false;
        }
        self.irq_seen = irqs;
        let c = self.cfg(8);
        c != id
    }

    fn stock_round(&mut self, id: u32, b: &mut Buddy) {
        let t0 = rdtsc();
        if !self.wait_fpq(2, b) || !self.send_cmd(id) {
            return;
        }
        let (mut blocks, mut n) = (0u64, 0u32);
        loop {
            if self.cmd_changed(id) {
                break;
            }
            if self.fpq.as_ref().is_some_and(|q| q.num_free() < 2) && !self.wait_fpq(2, b) {
                break;
            }
            let Some(pfn) = b.alloc(MAX_ORDER) else { break };
            if !self.held.push(pfn) {
                let _ = b.free(pfn, MAX_ORDER);
                break;
            }
            let Some(q) = self.fpq.as_mut() else { break };
            q.add(
                pfn as u64 * PAGE_SIZE,
                (PAGE_SIZE << MAX_ORDER) as u32,
                true,
                TOK_BLOCK,
            );
            blocks += 1;
            n += 1;
            if n % 16 == 0 {
                q.kick();
            }
        }
        let _ = self.wait_fpq(1, b);
        self.send_cmd(CMD_STOP);
        println!(
            "guest: hint cmd_id={} blocks={} pages={}",
            id,
            blocks,
            blocks << MAX_ORDER
        );
        println!(
            "guest: hint_us={} held_blocks={}",
            ticks_to_us(rdtsc() - t0),
            self.held.len()
        );
    }

    fn release_held(&mut self, b: &mut Buddy) {
        while let Some(p) = self.held.pop() {
            let _ = b.free(p, MAX_ORDER);
        }
    }

    /// A ranges round: the free lists are walked once, in address order, and every merged
    /// free range goes into one of [`RANGE_BUFS`] buffer pages, each sent when full and reused
    /// once the device hands it back, so any number of ranges fits in a round. The round ends
    /// with STOP when the walk is done, when the device moves on from `id`, or after
    /// [`RANGES_ROUND_LIMIT_US`]; ranges not sent by then are counted as dropped.
    fn ranges_round(&mut self, id: u32, b: &mut Buddy) {
        let t0 = rdtsc();
        if !self.wait_fpq(2, b) || !self.send_cmd(id) {
            return;
        }
        // the buffer pages are the only allocation of the round
        let mut s = RangeSender::new(id, t0 + us_to_ticks(RANGES_ROUND_LIMIT_US));
        while s.free_len < RANGE_BUFS {
            let Some(p) = b.alloc(0) else { break };
            s.free[s.free_len] = p;
            s.free_len += 1;
        }
        let nbufs = s.free_len;
        b.for_each_free_range(|pfn, len| s.add(self, pfn, len));
        s.send_current(self);
        s.collect_used(self);
        let end = s.ended.unwrap_or(RangesEnd::Walked);
        // buffers still with the device are freed by `reap` when it hands them back
        for &p in &s.free[..s.free_len] {
            let _ = b.free(p, 0);
        }
        let _ = self.wait_fpq(1, b);
        self.send_cmd(CMD_STOP);
        println!(
            "guest: hint cmd_id={} blocks={} pages={}",
            id, s.ranges, s.pages
        );
        println!(
            "guest: hint_us={} range_buffers={} buffers_sent={} dropped_ranges={} end={}",
            ticks_to_us(rdtsc() - t0),
            nbufs,
            s.sent,
            s.dropped,
            end.name()
        );
    }
}

/// Why a ranges round ended.
#[derive(Clone, Copy, PartialEq, Eq)]
enum RangesEnd {
    /// Every free range was read (and sent, unless dropped for want of a buffer page).
    Walked,
    /// [`RANGES_ROUND_LIMIT_US`] passed.
    TimeLimit,
    /// The device showed another command id (a newer round, STOP or DONE).
    Cancelled,
    /// No buffer page could be allocated, or the queue refused a buffer.
    NoBuffer,
}

impl RangesEnd {
    fn name(self) -> &'static str {
        match self {
            RangesEnd::Walked => "walked",
            RangesEnd::TimeLimit => "time_limit",
            RangesEnd::Cancelled => "cancelled",
            RangesEnd::NoBuffer => "no_buffer",
        }
    }
}

/// The range buffers of one round: pages free to fill, the one being filled, and counters.
struct RangeSender {
    id: u32,
    deadline: u64,
    /// Pages free to fill: this round's, and any of an earlier round the device hands back
    /// now (at most [`RANGE_BUFS`] more).
    free: [u32; 2 * RANGE_BUFS],
    free_len: usize,
    /// The page being filled and its number of entries.
    current: Option<(u32, u32)>,
    /// Set once the round ends early; every later range is dropped.
    ended: Option<RangesEnd>,
    ranges: u64,
    pages: u64,
    dropped: u64,
    sent: u64,
}

impl RangeSender {
    fn new(id: u32, deadline: u64) -> Self {
        RangeSender {
            id,
            deadline,
            free: [0; 2 * RANGE_BUFS],
            free_len: 0,
            current: None,
            ended: None,
            ranges: 0,
            pages: 0,
            dropped: 0,
            sent: 0,
        }
    }

    /// One free range from the walk.
    fn add(&mut self, bl: &mut Balloon, pfn: u32, len: u64) {
        if self.ended.is_none() && self.current.is_none() {
            self.take_buffer(bl);
        }
        let Some((page, fill)) = self.current else {
            self.dropped += 1;
            return;
        };
        let e = page as u64 * PAGE_SIZE + 16 * fill as u64;
        // SAFETY: entry `fill` (< 256) of a buffer page owned by this round.
        unsafe {
            core::ptr::write_volatile(e as *mut u64, (pfn as u64 * PAGE_SIZE).to_le());
            core::ptr::write_volatile((e + 8) as *mut u64, (len * PAGE_SIZE).to_le());
        }
        self.current = Some((page, fill + 1));
        self.ranges += 1;
        self.pages += len;
        if fill + 1 == RANGES_PER_BUF {
            self.send_current(bl);
        }
    }

    /// Queues the page being filled (if it has entries) and tells the device.
    fn send_current(&mut self, bl: &mut Balloon) {
        let Some((page, fill)) = self.current.take() else {
            return;
        };
        if fill == 0 {
            self.give_back(page);
            return;
        }
        let Some(q) = bl.fpq.as_mut() else { return };
        if q.add(
            page as u64 * PAGE_SIZE,
            16 * fill,
            false,
            TOK_RANGES | page as u64,
        ) {
            q.kick();
            self.sent += 1;
        } else {
            // cannot happen (a descriptor is kept free), but then these ranges are lost
            self.dropped += fill as u64;
            self.ranges -= fill as u64;
            self.give_back(page);
            self.ended.get_or_insert(RangesEnd::NoBuffer);
        }
    }

    /// Waits for a free buffer page and a descriptor (one always stays free for STOP), taking
    /// back pages the device has used. Ends the round instead on a new command id (checked
    /// before every buffer, as Linux does after every full one) or the time limit.
    fn take_buffer(&mut self, bl: &mut Balloon) {
        loop {
            let end = if bl.cmd_changed(self.id) {
                Some(RangesEnd::Cancelled)
            } else if rdtsc() > self.deadline {
                Some(RangesEnd::TimeLimit)
            } else {
                self.collect_used(bl);
                let room = bl.fpq.as_ref().is_some_and(|q| q.num_free() > 1);
                if self.free_len > 0 && room {
                    self.free_len -= 1;
                    self.current = Some((self.free[self.free_len], 0));
                    return;
                }
                (bl.fpq.is_none() || (self.free_len == 0 && self.sent == 0))
                    .then_some(RangesEnd::NoBuffer)
            };
            if let Some(end) = end {
                self.ended = Some(end);
                return;
            }
            core::hint::spin_loop();
        }
    }

    /// Takes used buffers off the free page queue; range pages become free to fill again.
    fn collect_used(&mut self, bl: &mut Balloon) {
        let Some(q) = bl.fpq.as_mut() else { return };
        while let Some((tok, _)) = q.pop_used() {
            if tok & TOK_RANGES != 0 {
                self.give_back((tok & 0xffff_ffff) as u32);
            }
        }
    }

    fn give_back(&mut self, page: u32) {
        if self.free_len < self.free.len() {
            self.free[self.free_len] = page;
            self.free_len += 1;
        }
    }
}

//! The memory workload: live pages (`used`, the kept halves of `fragment`), hot pages rewritten
//! continuously, and `dirty` pages written then freed. Every page carries the self-describing
//! pattern of `guest_core::pattern`, so any page can be checked alone.
//!
//! Hot pages are rewritten in passes: pass `g` first checks that each page still holds
//! generation `g - 1`, then writes generation `g`. The owner of the hot loop (the AP when one
//! runs, else the BSP's main loop) is the only one touching hot pages, so there is no race with
//! verification; failures are queued for the BSP to print with its next `verify` line.

use crate::mm::PfnList;
use crate::println;
use core::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use guest_core::buddy::Buddy;
use guest_core::pattern::{self, Mismatch, WORDS};
use guest_core::PAGE_SIZE;

/// Generation of live pages.
pub const LIVE_GEN: u64 = 1;
/// Generation written to dirty pages before they are freed.
const DIRTY_GEN: u64 = 0xd1d1;
/// Order of a `fragment` piece: 64 KiB.
const FRAG_ORDER: usize = 4;
/// Most failing pages printed per verification.
pub const MAX_REPORTED: usize = 16;

/// What the workload holds.
pub struct Workload {
    /// Live pages (used + kept fragment halves), generation [`LIVE_GEN`].
    pub live: PfnList,
    /// Hot pages.
    pub hot: PfnList,
    /// Pages of `used` actually obtained.
    pub used_pages: u64,
    /// Pages of `fragment` kept.
    pub fragment_kept: u64,
    /// Pages of `dirty` written and freed.
    pub dirty_pages: u64,
}

fn page(pfn: u32) -> &'static mut [u64; WORDS] {
    // SAFETY: the PFN was allocated from the buddy allocator over identity-mapped RAM and is
    // owned by the workload; only its owner touches it.
    unsafe { &mut *((pfn as u64 * PAGE_SIZE) as *mut [u64; WORDS]) }
}

fn gpa(pfn: u32) -> u64 {
    pfn as u64 * PAGE_SIZE
}

/// Allocates and fills the workload. `live`/`hot` are empty lists with enough capacity.
pub fn setup(
    b: &mut Buddy,
    used_mib: u64,
    fragment_mib: u64,
    hot_mib: u64,
    dirty_mib: u64,
    mut live: PfnList,
    mut hot: PfnList,
) -> Workload {
    // used: order-0 pages, like anonymous memory of a process
    let mut used_pages = 0;
    for _ in 0..used_mib * 256 {
        let Some(pfn) = b.alloc(0) else { break };
        if !live.push(pfn) {
            let _ = b.free(pfn, 0);
            break;
        }
        pattern::fill(page(pfn), gpa(pfn), LIVE_GEN);
        used_pages += 1;
    }
    if used_pages < used_mib * 256 {
        println!(
            "guest: warning used={}MiB: only {} pages available",
            used_mib, used_pages
        );
    }
    // fragment: 64 KiB pieces, all written; then every other piece is freed. The freed pieces
    // are chained through their first word until then.
    let mut chain = u32::MAX;
    let mut kept = 0u64;
    for i in 0..fragment_mib * 16 {
        let Some(pfn) = b.alloc(FRAG_ORDER) else {
            break;
        };
        if i % 2 == 0 {
            let mut ok = true;
            for p in pfn..pfn + (1 << FRAG_ORDER) {
                ok &= live.push(p);
                pattern::fill(page(p), gpa(p), LIVE_GEN);
            }
            if !ok {
                println!("guest: warning fragment list full");
            }
            kept += 1 << FRAG_ORDER;
        } else {
            for p in pfn..pfn + (1 << FRAG_ORDER) {
                pattern::fill(page(p), gpa(p), DIRTY_GEN);
            }
            page(pfn)[0] = chain as u64;
            chain = pfn;
        }
    }
    while chain != u32::MAX {
        let next = page(chain)[0] as u32;
        let _ = b.free(chain, FRAG_ORDER);
        chain = next;
    }
    // hot
    for _ in 0..hot_mib * 256 {
        let Some(pfn) = b.alloc(0) else { break };
        if !hot.push(pfn) {
            let _ = b.free(pfn, 0);
            break;
        }
        pattern::fill(page(pfn), gpa(pfn), 1);
    }
    HOT_GEN.store(1, Ordering::Release);
    // dirty: written, chained through word 0, then freed (the "workload that just ended")
    let mut dirty_pages = 0;
    let mut chain = u32::MAX;
    for _ in 0..dirty_mib * 256 {
        let Some(pfn) = b.alloc(0) else { break };
        pattern::fill(page(pfn), gpa(pfn), DIRTY_GEN);
        page(pfn)[0] = chain as u64;
        chain = pfn;
        dirty_pages += 1;
    }
    while chain != u32::MAX {
        let next = page(chain)[0] as u32;
        let _ = b.free(chain, 0);
        chain = next;
    }
    Workload {
        live,
        hot,
        used_pages,
        fragment_kept: kept,
        dirty_pages,
    }
}

impl Workload {
    /// `grow=`: allocates up to `pages` more live pages, writes them and adds them to the live
    /// set (verified from then on). Returns how many it added (fewer when memory or the live
    /// list runs out).
    pub fn grow(&mut self, b: &mut Buddy, pages: u64) -> u64 {
        let mut added = 0;
        while added < pages {
            let Some(pfn) = b.alloc(0) else { break };
            if !self.live.push(pfn) {
                let _ = b.free(pfn, 0);
                break;
            }
            pattern::fill(page(pfn), gpa(pfn), LIVE_GEN);
            added += 1;
        }
        added
    }

    /// Pages the workload holds (live + hot).
    pub fn held_pages(&self) -> u64 {
        (self.live.len() + self.hot.len()) as u64
    }

    /// Verifies every live page; `report(gpa, mismatch)` for each failing page.
    pub fn verify_live(&self, mut report: impl FnMut(u64, Mismatch)) -> u64 {
        let mut failed = 0;
        for &pfn in self.live.as_slice() {
            if let Err(m) = pattern::check(page(pfn), gpa(pfn), LIVE_GEN) {
                failed += 1;
                report(gpa(pfn), m);
            }
        }
        failed
    }

    /// Publishes the hot list for the AP's hot loop.
    pub fn share_hot(&self) {
        HOT_PTR.store(self.hot.as_ptr() as usize, Ordering::Relaxed);
        HOT_LEN.store(self.hot.len(), Ordering::Release);
    }
}

// ---- hot loop state, shared between vCPUs ----

static HOT_PTR: AtomicUsize = AtomicUsize::new(0);
static HOT_LEN: AtomicUsize = AtomicUsize::new(0);
/// Last completed hot generation.
pub static HOT_GEN: AtomicU64 = AtomicU64::new(0);
/// Set when an AP owns the hot loop.
pub static HOT_ON_AP: AtomicBool = AtomicBool::new(false);
/// Total hot page check failures.
pub static HOT_FAILS: AtomicU64 = AtomicU64::new(0);

/// A queued hot failure.
#[derive(Clone, Copy)]
pub struct HotFailure {
    /// Page address.
    pub gpa: u64,
    /// Expected generation.
    pub gen: u64,
    /// The mismatch.
    pub m: Mismatch,
}

static QLOCK: AtomicU32 = AtomicU32::new(0);
static mut QUEUE: [Option<HotFailure>; MAX_REPORTED] = [None; MAX_REPORTED];

fn queue_failure(f: HotFailure) {
    while QLOCK
        .compare_exchange_weak(0, 1, Ordering::Acquire, Ordering::Relaxed)
        .is_err()
    {
        core::hint::spin_loop();
    }
    // SAFETY: QUEUE is only accessed under QLOCK.
    let q = unsafe { &mut *core::ptr::addr_of_mut!(QUEUE) };
    if let Some(slot) = q.iter_mut().find(|s| s.is_none()) {
        *slot = Some(f);
    }
    QLOCK.store(0, Ordering::Release);
}

/// Takes the queued hot failures.
pub fn drain_hot_failures(mut f: impl FnMut(HotFailure)) {
    while QLOCK
        .compare_exchange_weak(0, 1, Ordering::Acquire, Ordering::Relaxed)
        .is_err()
    {
        core::hint::spin_loop();
    }
    // SAFETY: under QLOCK.
    let q = unsafe { &mut *core::ptr::addr_of_mut!(QUEUE) };
    for s in q.iter_mut() {
        if let Some(x) = s.take() {
            f(x);
        }
    }
    QLOCK.store(0, Ordering::Release);
}

/// One hot pass over the shared hot list: check generation g-1, write g. Returns pages done.
pub fn hot_pass() -> usize {
    let len = HOT_LEN.load(Ordering::Acquire);
    let ptr = HOT_PTR.load(Ordering::Relaxed) as *const u32;
    if len == 0 || ptr.is_null() {
        return 0;
    }
    // SAFETY: the hot list is fixed after setup and lives in carved memory forever.
    let pfns = unsafe { core::slice::from_raw_parts(ptr, len) };
    let prev = HOT_GEN.load(Ordering::Acquire);
    let gen = prev + 1;
    for &pfn in pfns {
        let p = page(pfn);
        if let Err(m) = pattern::check(p, gpa(pfn), prev) {
            HOT_FAILS.fetch_add(1, Ordering::Relaxed);
            queue_failure(HotFailure {
                gpa: gpa(pfn),
                gen: prev,
                m,
            });
        }
        pattern::fill(p, gpa(pfn), gen);
    }
    HOT_GEN.store(gen, Ordering::Release);
    len
}

//! Setting the workload up: `used` and the kept halves of `fragment` become the live data, `hot`
//! is handed to the writer thread, `dirty` is written and given back. Every page is written, so
//! every page the workload keeps is really resident (the guest has no swap).
//!
//! Sizes that do not fit are capped at what `/proc/meminfo` calls available minus a reserve for
//! the kernel, with a warning, rather than letting the OOM killer end the workload.

use crate::pattern::{self, Page};
use crate::region::{HugePages, Region, RegionError};
use crate::verify::{self, FailureLog};

/// Generation of live pages (they are written once).
pub const LIVE_GENERATION: u64 = 1;
/// Generation written to pages that are then given back (never checked; nonzero like all data).
const DIRTY_GENERATION: u64 = 0xd1d1;
/// Pages in a `fragment` piece: 64 KiB.
pub const FRAGMENT_PIECE_PAGES: usize = 16;
/// 4 KiB pages per MiB.
const PAGES_PER_MIB: u64 = 256;
/// KiB of available memory never taken, so the kernel and the init keep some.
const RESERVE_KIB: u64 = 32 * 1024;

/// How much memory each part should get, in MiB.
pub struct Plan {
    /// `used=`.
    pub used_mib: u64,
    /// `fragment=`.
    pub fragment_mib: u64,
    /// `hot=`.
    pub hot_mib: u64,
    /// `dirty=`.
    pub dirty_mib: u64,
}

/// What setup built.
pub struct Workload {
    used: Option<Region>,
    /// The fragment region: even-numbered 64 KiB pieces are kept, odd ones were given back.
    fragment: Option<Region>,
    /// Hot pages, filled with generation 1, for the writer thread to take.
    pub hot: Option<Region>,
    /// Pages of `dirty` written and given back.
    pub dirty_pages: u64,
}

/// The pages a part may take: `want_pages`, capped when `available_kib` is known and too small.
pub fn capped_pages(want_pages: u64, available_kib: Option<u64>) -> u64 {
    match available_kib {
        Some(kib) => want_pages.min(kib.saturating_sub(RESERVE_KIB) / 4),
        None => want_pages,
    }
}

/// Maps `pages` pages and writes generation `generation` to every one.
fn filled_region(pages: u64, huge: HugePages, generation: u64) -> Result<Region, RegionError> {
    let mut region = Region::map(pages as usize, huge)?;
    let count = region.pages();
    for (addr, page) in region.pages_in_mut(0..count) {
        pattern::fill(page, addr, generation);
    }
    Ok(region)
}

impl Workload {
    /// Builds the workload in the order of the freestanding guest: used, fragment, hot, dirty.
    /// `available_kib()` is asked before each part; `warn` gets one line per capped part.
    pub fn set_up(
        plan: &Plan,
        mut available_kib: impl FnMut() -> Option<u64>,
        mut warn: impl FnMut(String),
    ) -> Result<Workload, RegionError> {
        let mut pages_for = |name: &str, mib: u64| {
            let want = mib * PAGES_PER_MIB;
            let got = capped_pages(want, available_kib());
            if got < want {
                warn(format!("{name}={mib}MiB: only {got} pages available"));
            }
            got
        };
        let used_pages = pages_for("used", plan.used_mib);
        let used = (used_pages > 0)
            .then(|| filled_region(used_pages, HugePages::Default, LIVE_GENERATION))
            .transpose()?;

        // Whole 64 KiB pieces: all written, then every other one given back. No huge pages, or
        // the kernel could back a piece and its freed neighbour with one 2 MiB page.
        let piece = FRAGMENT_PIECE_PAGES as u64;
        let fragment_pages = pages_for("fragment", plan.fragment_mib) / piece * piece;
        let fragment = match fragment_pages {
            0 => None,
            pages => {
                let mut region = filled_region(pages, HugePages::Never, LIVE_GENERATION)?;
                let pieces = region.pages() / FRAGMENT_PIECE_PAGES;
                for odd in (1..pieces).step_by(2) {
                    region
                        .give_back(odd * FRAGMENT_PIECE_PAGES..(odd + 1) * FRAGMENT_PIECE_PAGES)?;
                }
                Some(region)
            }
        };

        let hot_pages = pages_for("hot", plan.hot_mib);
        let hot = (hot_pages > 0)
            .then(|| filled_region(hot_pages, HugePages::Default, 1))
            .transpose()?;

        // The workload that just ended: its memory is free again, but was written.
        let dirty_pages = pages_for("dirty", plan.dirty_mib);
        if dirty_pages > 0 {
            drop(filled_region(
                dirty_pages,
                HugePages::Default,
                DIRTY_GENERATION,
            )?);
        }
        Ok(Workload {
            used,
            fragment,
            hot,
            dirty_pages,
        })
    }

    /// Pages of `used` held.
    pub fn used_pages(&self) -> u64 {
        self.used.as_ref().map_or(0, |r| r.pages() as u64)
    }

    /// Pages of `fragment` kept.
    pub fn fragment_kept_pages(&self) -> u64 {
        self.fragment.as_ref().map_or(0, |r| {
            (r.pages() / FRAGMENT_PIECE_PAGES).div_ceil(2) * FRAGMENT_PIECE_PAGES
        }) as u64
    }

    /// The live pages (used, then the kept fragment pieces) with their addresses.
    pub fn live_pages(&self) -> impl Iterator<Item = (u64, &Page)> {
        let used = self.used.iter().flat_map(|r| r.pages_in(0..r.pages()));
        let kept = self.fragment.iter().flat_map(|r| {
            (0..r.pages() / FRAGMENT_PIECE_PAGES)
                .step_by(2)
                .flat_map(move |p| {
                    r.pages_in(p * FRAGMENT_PIECE_PAGES..(p + 1) * FRAGMENT_PIECE_PAGES)
                })
        });
        used.chain(kept)
    }

    /// Checks every live page; returns the number checked.
    pub fn verify_live(&self, log: &mut FailureLog) -> u64 {
        verify::verify_pages(self.live_pages(), LIVE_GENERATION, log)
    }

    /// `selftest=corrupt`: flips one bit in the last page of `used`; returns its address.
    pub fn corrupt_one_live_page(&mut self) -> Option<u64> {
        let region = self.used.as_mut()?;
        let last = region.pages() - 1;
        let (addr, page) = region.pages_in_mut(last..last + 1).next()?;
        page[100] ^= 1 << 7;
        Some(addr)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan(used_mib: u64, fragment_mib: u64, hot_mib: u64, dirty_mib: u64) -> Plan {
        Plan {
            used_mib,
            fragment_mib,
            hot_mib,
            dirty_mib,
        }
    }

    #[test]
    fn capping() {
        assert_eq!(capped_pages(1000, None), 1000);
        assert_eq!(capped_pages(1000, Some(RESERVE_KIB + 400)), 100);
        assert_eq!(capped_pages(1000, Some(1)), 0);
        assert_eq!(capped_pages(10, Some(u64::MAX)), 10);
    }

    #[test]
    fn set_up_holds_verified_live_data() {
        let mut warnings = Vec::new();
        let workload = Workload::set_up(&plan(2, 1, 1, 2), || None, |w| warnings.push(w)).unwrap();
        assert!(warnings.is_empty());
        assert_eq!(workload.used_pages(), 512);
        assert_eq!(
            workload.fragment_kept_pages(),
            128,
            "8 of 16 pieces of 64 KiB"
        );
        assert_eq!(workload.hot.as_ref().map(|r| r.pages()), Some(256));
        assert_eq!(workload.dirty_pages, 512);
        let mut log = FailureLog::default();
        assert_eq!(workload.verify_live(&mut log), 512 + 128);
        assert!(log.is_empty(), "{log:?}");
    }

    #[test]
    fn a_corrupted_live_page_is_reported() {
        let mut workload = Workload::set_up(&plan(1, 1, 0, 0), || None, |_| {}).unwrap();
        let addr = workload.corrupt_one_live_page().unwrap();
        let mut log = FailureLog::default();
        workload.verify_live(&mut log);
        assert_eq!(log.total(), 1);
        assert_eq!(
            (log.named()[0].addr, log.named()[0].mismatch.word),
            (addr, 100)
        );
    }

    #[test]
    fn sizes_beyond_what_is_available_are_capped_with_a_warning() {
        let mut warnings = Vec::new();
        let available = Some(RESERVE_KIB + 4 * 100);
        let workload =
            Workload::set_up(&plan(1, 0, 0, 0), || available, |w| warnings.push(w)).unwrap();
        assert_eq!(workload.used_pages(), 100);
        assert_eq!(warnings, ["used=1MiB: only 100 pages available"]);
    }
}

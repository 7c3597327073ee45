//! Free page hints, applied so that they can never drop a page the guest has written.
//!
//! The rule (design doc, section 3): a hint may only remove a page from a set of pages to send
//! that was computed *before* the hint round was requested. The types here make that the only
//! thing a caller can do:
//!
//! - [`HintRound`] is the round-0 set. It can only be created from a [`DirtyLoggingStarted`]
//!   token, and it always starts as *all of guest RAM*: no caller-supplied set can take hints.
//! - Hints are accepted only after [`HintRound::request`] has fixed the command id, only for
//!   that id, and only until [`HintRound::stop`]. Everything else is ignored and counted.
//! - Each hint is validated against guest RAM; a bad one is rejected and counted, never trusted.
//! - [`HintRound::leave_out_unpopulated`] removes the pages the host never backed, by the same
//!   rule (they are zero; one written later is in a later sync).
//! - [`HintRound::finish`] consumes the round and yields round 0's [`MemoryRangeTable`].
//! - Later rounds are built by [`DirtyRound`] from dirty-log syncs; it has no way to take hints.
//!   A page hinted and then written by the guest is in the next sync, so it is sent then.
//!
//! ```text
//!  start dirty logging ──► DirtyLoggingStarted::confirm()
//!                              │
//!                              ▼
//!                    HintRound::new(ram)          round 0 = all RAM
//!                    round.request(cmd_id) ──────► balloon: write cmd_id, config interrupt
//!                    round.apply(id, range) ◄───── balloon: hinted buffers (id checked)
//!                    round.stop(id)         ◄───── balloon: STOP
//!                    round.finish() ──► round-0 table (RAM − hints), HintStats
//!                                                  balloon: DONE
//!  sync dirty log ──► DirtyRound::add_log(..) ──► into_table() ──► round 1, 2, ...
//! ```

use thiserror::Error;

use crate::bitmap::{pages_for_bytes, BitmapError, DirtyBitmap};
use vm_memory::GuestMemoryBackend;

use crate::populated::{DiscoveryMethod, PopulatedError, PopulatedMemory};
use crate::ranges::{MemoryRange, MemoryRangeTable, RamRegions, PAGE_SIZE};

/// Smallest command id that starts a hinting round (0 is STOP, 1 is DONE).
pub const MIN_HINT_CMD_ID: u32 = 2;

/// Errors from hint rounds and dirty rounds.
#[derive(Debug, Error)]
pub enum HintError {
    /// The command id is one of the reserved values STOP (0) or DONE (1).
    #[error("hint command id {0} is reserved")]
    ReservedCmdId(u32),
    /// Hints were already requested for this round.
    #[error("hints were already requested for this round (command id {0})")]
    AlreadyRequested(u32),
    /// No RAM region has this index.
    #[error("no RAM region {index} (there are {regions})")]
    NoSuchRegion {
        /// Index given.
        index: usize,
        /// Number of regions.
        regions: usize,
    },
    /// A dirty log did not match its region.
    #[error("dirty log for RAM region {index} does not match the region")]
    DirtyLog {
        /// Region index.
        index: usize,
        /// The mismatch.
        #[source]
        source: BitmapError,
    },
    /// A range marked dirty is not in guest RAM.
    #[error("dirty range at {gpa:#x} (+{length:#x}) is outside guest RAM")]
    DirtyOutsideRam {
        /// Start of the range.
        gpa: u64,
        /// Its length.
        length: u64,
    },
    /// A set of pages could not be turned into memory ranges.
    #[error("pages of RAM region {index} cannot be expressed as memory ranges")]
    Table {
        /// Region index.
        index: usize,
        /// The failure.
        #[source]
        source: BitmapError,
    },
    /// The last round's ranges could not be merged into a table.
    #[error("the last round's ranges cannot be merged")]
    Merge(#[source] crate::ranges::RangeError),
}

/// Proof that dirty logging is running: KVM's dirty log on every RAM slot *and* the VMM's own
/// write tracking (device writes to guest memory). A [`HintRound`] can only be made with one.
#[derive(Debug)]
pub struct DirtyLoggingStarted {
    _private: (),
}

impl DirtyLoggingStarted {
    /// Declares that dirty logging has been started. Call this only *after* enabling it; the
    /// hint round created from it is then computed before hints are requested.
    pub fn confirm() -> Self {
        DirtyLoggingStarted { _private: () }
    }
}

/// Why a hint was rejected (it named memory that cannot be free guest RAM).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HintRejection {
    /// Length zero.
    ZeroLength,
    /// Address or length not a multiple of the page size.
    Misaligned,
    /// Longer than all of guest RAM together: absurd whatever it names.
    TooLong,
    /// `gpa + length` overflows.
    Overflow,
    /// Not entirely inside guest RAM.
    OutsideRam,
    /// Overlaps a hint already accepted in this round.
    Overlap,
}

/// Why a hint was ignored (it was well formed but not for the running round).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HintIgnored {
    /// Hints have not been requested yet.
    NotRequested,
    /// The hint carries another command id than the running round's.
    StaleCmdId {
        /// The running round's id.
        expected: u32,
        /// The hint's id.
        got: u32,
    },
    /// The driver already sent STOP for this round.
    AfterStop,
}

/// What [`HintRound::apply`] did with a hint.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HintVerdict {
    /// Removed from round 0.
    Accepted {
        /// Pages removed.
        pages: u64,
    },
    /// Invalid; counted in [`HintStats::rejected`].
    Rejected(HintRejection),
    /// Not for this round; counted in [`HintStats::ignored`].
    Ignored(HintIgnored),
}

/// Counters of one hint round.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct HintStats {
    /// The round's command id (0 if hints were never requested).
    pub cmd_id: u32,
    /// Whether the driver sent STOP for the round.
    pub stopped: bool,
    /// Hints accepted.
    pub hints_accepted: u64,
    /// Pages named by accepted hints.
    pub pages_hinted: u64,
    /// Pages actually removed from round 0.
    pub pages_skipped: u64,
    /// Hints rejected as invalid.
    pub rejected: u64,
    /// Hints ignored as stale (wrong id, before the request or after STOP).
    pub ignored: u64,
}

/// What [`HintRound::leave_out_unpopulated`] found.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct UnpopulatedStats {
    /// How the backed pages were found.
    pub method: Option<DiscoveryMethod>,
    /// Pages the host backs.
    pub pages_populated: u64,
    /// Pages left out of round 0 because the host never backed them (and not hinted).
    pub pages_left_out: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    NotRequested,
    Collecting(u32),
    Stopped(u32),
}

/// Round 0 of a pre-copy migration: all of guest RAM, minus validated free page hints.
#[derive(Debug)]
pub struct HintRound {
    ram: RamRegions,
    /// One bitmap per RAM region; starts all set. Only accepted hints clear bits, so a clear
    /// bit always means "already hinted in this round".
    round0: Vec<DirtyBitmap>,
    phase: Phase,
    stats: HintStats,
}

/// The result of a finished [`HintRound`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RoundZero {
    /// Pages to send in round 0.
    pub table: MemoryRangeTable,
    /// The round's counters.
    pub stats: HintStats,
}

impl HintRound {
    /// Computes round 0 as all of guest RAM. Dirty logging must already be running (the token
    /// says so), so any page written from now on will be in a later dirty sync.
    pub fn new(ram: &RamRegions, _logging: DirtyLoggingStarted) -> Self {
        let round0 = ram
            .regions()
            .iter()
            .map(|r| DirtyBitmap::new_set(pages_for_bytes(r.length)))
            .collect();
        HintRound {
            ram: ram.clone(),
            round0,
            phase: Phase::NotRequested,
            stats: HintStats::default(),
        }
    }

    /// Fixes the command id of this round's hint request; returns it. Call this *before*
    /// writing the id to the balloon's config space. Only one request per round.
    pub fn request(&mut self, cmd_id: u32) -> Result<u32, HintError> {
        if cmd_id < MIN_HINT_CMD_ID {
            return Err(HintError::ReservedCmdId(cmd_id));
        }
        match self.phase {
            Phase::NotRequested => {
                self.phase = Phase::Collecting(cmd_id);
                self.stats.cmd_id = cmd_id;
                Ok(cmd_id)
            }
            Phase::Collecting(id) | Phase::Stopped(id) => Err(HintError::AlreadyRequested(id)),
        }
    }

    /// The requested command id, if any.
    pub fn cmd_id(&self) -> Option<u32> {
        match self.phase {
            Phase::NotRequested => None,
            Phase::Collecting(id) | Phase::Stopped(id) => Some(id),
        }
    }

    /// Whether the driver has sent STOP for this round.
    pub fn is_stopped(&self) -> bool {
        matches!(self.phase, Phase::Stopped(_))
    }

    /// Records the driver's STOP for `cmd_id`. Returns `false` (and changes nothing) if `cmd_id`
    /// is not the running round's id.
    pub fn stop(&mut self, cmd_id: u32) -> bool {
        match self.phase {
            Phase::Collecting(id) if id == cmd_id => {
                self.phase = Phase::Stopped(id);
                self.stats.stopped = true;
                true
            }
            _ => false,
        }
    }

    /// The counters so far.
    pub fn stats(&self) -> HintStats {
        self.stats
    }

    /// Pages currently left in round 0.
    pub fn pages_remaining(&self) -> u64 {
        self.round0.iter().map(DirtyBitmap::count).sum()
    }

    /// Applies one hint reported with command id `cmd_id`: removes its pages from round 0 if it
    /// belongs to the running round and is valid.
    pub fn apply(&mut self, cmd_id: u32, hint: MemoryRange) -> HintVerdict {
        let verdict = self.judge(cmd_id, hint);
        match verdict {
            HintVerdict::Accepted { .. } => {}
            HintVerdict::Rejected(why) => {
                self.stats.rejected += 1;
                log::debug!(
                    "rejected free page hint {:#x}+{:#x}: {:?}",
                    hint.gpa,
                    hint.length,
                    why
                );
            }
            HintVerdict::Ignored(_) => self.stats.ignored += 1,
        }
        verdict
    }

    fn judge(&mut self, cmd_id: u32, hint: MemoryRange) -> HintVerdict {
        match self.phase {
            Phase::NotRequested => return HintVerdict::Ignored(HintIgnored::NotRequested),
            Phase::Stopped(_) => return HintVerdict::Ignored(HintIgnored::AfterStop),
            Phase::Collecting(id) if id != cmd_id => {
                return HintVerdict::Ignored(HintIgnored::StaleCmdId {
                    expected: id,
                    got: cmd_id,
                })
            }
            Phase::Collecting(_) => {}
        }
        if let Err(why) = self.validate(hint) {
            return HintVerdict::Rejected(why);
        }
        let spans = self.ram.region_pages(&hint);
        // Overlap check first, so a rejected hint changes nothing.
        for s in &spans {
            if self.round0[s.region]
                .count_range(s.first_page, s.pages)
                .ok()
                != Some(s.pages)
            {
                return HintVerdict::Rejected(HintRejection::Overlap);
            }
        }
        let mut skipped = 0;
        for s in spans {
            if self.round0[s.region]
                .clear_range(s.first_page, s.pages)
                .is_ok()
            {
                skipped += s.pages;
            }
        }
        let pages = hint.pages();
        self.stats.hints_accepted += 1;
        self.stats.pages_hinted += pages;
        self.stats.pages_skipped += skipped;
        HintVerdict::Accepted { pages }
    }

    fn validate(&self, hint: MemoryRange) -> Result<(), HintRejection> {
        if hint.length == 0 {
            return Err(HintRejection::ZeroLength);
        }
        if !hint.gpa.is_multiple_of(PAGE_SIZE) || !hint.length.is_multiple_of(PAGE_SIZE) {
            return Err(HintRejection::Misaligned);
        }
        // Stock drivers hint 4 MiB blocks, but the ranges protocol merges neighbouring free
        // blocks, so one hint may legitimately cover most of a region (or run across two
        // adjacent ones): only a hint longer than all of RAM is absurd on its face.
        let ram_bytes: u64 = self.ram.regions().iter().map(|r| r.length).sum();
        if hint.length > ram_bytes {
            return Err(HintRejection::TooLong);
        }
        if hint.end().is_none() {
            return Err(HintRejection::Overflow);
        }
        if !self.ram.contains(&hint) {
            return Err(HintRejection::OutsideRam);
        }
        Ok(())
    }

    /// Leaves out of round 0 every page the host has never backed (or the balloon released),
    /// found by [`PopulatedMemory::discover`] now, while dirty logging runs (this round exists,
    /// so it does): such a page is zero here and on the destination, and a write to it from now
    /// on is in a later dirty sync. Returns the pages left out that were still in round 0
    /// (hinted pages are counted as hinted, not here).
    pub fn leave_out_unpopulated<M: GuestMemoryBackend + ?Sized>(
        &mut self,
        mem: &M,
    ) -> Result<UnpopulatedStats, PopulatedError> {
        let populated = PopulatedMemory::discover(mem)?;
        let mut stats = UnpopulatedStats {
            method: populated.method,
            pages_populated: populated.pages(),
            pages_left_out: 0,
        };
        for (index, region) in self.ram.regions().iter().enumerate() {
            let (Some(bitmap), Some(runs)) =
                (self.round0.get_mut(index), populated.regions.get(index))
            else {
                continue;
            };
            // Clear every gap between backed runs.
            let mut next = 0u64;
            let pages = bitmap.pages();
            let gaps = runs
                .iter()
                .map(|r| (r.gpa.saturating_sub(region.gpa) / PAGE_SIZE, r.pages()))
                .chain(std::iter::once((pages, 0)));
            for (first, count) in gaps {
                let first = first.min(pages);
                if first > next {
                    let gap = first - next;
                    stats.pages_left_out += bitmap.count_range(next, gap).unwrap_or(0);
                    // In range by construction (`first` is capped at `pages`).
                    let _ = bitmap.clear_range(next, gap);
                }
                next = next.max(first.saturating_add(count).min(pages));
            }
        }
        Ok(stats)
    }

    /// Ends hint collection and returns the pages to send in round 0.
    pub fn finish(self) -> Result<RoundZero, HintError> {
        let table = tables_to_ranges(&self.ram, &self.round0)?;
        Ok(RoundZero {
            table,
            stats: self.stats,
        })
    }
}

fn tables_to_ranges(
    ram: &RamRegions,
    bitmaps: &[DirtyBitmap],
) -> Result<MemoryRangeTable, HintError> {
    let mut table = MemoryRangeTable::new();
    for (index, (region, bitmap)) in ram.regions().iter().zip(bitmaps).enumerate() {
        let part = bitmap
            .to_range_table(region.gpa)
            .map_err(|source| HintError::Table { index, source })?;
        table.append(&part).map_err(|e| HintError::Table {
            index,
            source: BitmapError::Ranges {
                base_gpa: region.gpa,
                source: e,
            },
        })?;
    }
    Ok(table)
}

/// A later pre-copy round: the union of dirty-log syncs taken after the previous round's set
/// was computed. There is deliberately no way to apply hints to it.
#[derive(Clone, Debug)]
pub struct DirtyRound {
    ram: RamRegions,
    dirty: Vec<DirtyBitmap>,
}

impl DirtyRound {
    /// An empty round over guest RAM.
    pub fn new(ram: &RamRegions) -> Self {
        let dirty = ram
            .regions()
            .iter()
            .map(|r| DirtyBitmap::new_clear(pages_for_bytes(r.length)))
            .collect();
        DirtyRound {
            ram: ram.clone(),
            dirty,
        }
    }

    /// ORs a KVM-layout dirty log (KVM's, or vm-memory's `AtomicBitmap::get_and_reset`) of RAM
    /// region `index` into the round.
    pub fn add_log(&mut self, index: usize, words: &[u64]) -> Result<(), HintError> {
        let regions = self.dirty.len();
        let bitmap = self
            .dirty
            .get_mut(index)
            .ok_or(HintError::NoSuchRegion { index, regions })?;
        bitmap
            .union_words(words)
            .map_err(|source| HintError::DirtyLog { index, source })
    }

    /// Marks the pages touching `[gpa, gpa + length)` dirty (writes the VMM tracked itself).
    pub fn add_range(&mut self, gpa: u64, length: u64) -> Result<(), HintError> {
        if length == 0 {
            return Ok(());
        }
        let range = MemoryRange::new(gpa, length);
        let page_start = gpa - gpa % PAGE_SIZE;
        let page_end = range
            .end()
            .and_then(|e| e.checked_next_multiple_of(PAGE_SIZE));
        let whole_pages = page_end.map(|e| MemoryRange::new(page_start, e - page_start));
        if !whole_pages.is_some_and(|r| self.ram.contains(&r)) {
            return Err(HintError::DirtyOutsideRam { gpa, length });
        }
        for s in self.ram.region_pages(&range) {
            self.dirty[s.region]
                .set_range(s.first_page, s.pages)
                .map_err(|source| HintError::DirtyLog {
                    index: s.region,
                    source,
                })?;
        }
        Ok(())
    }

    /// Marks pages of RAM region `index` dirty (page numbers within the region, as the dirty
    /// ring reports them; repeats allowed).
    pub fn add_pages(&mut self, index: usize, pages: &[u64]) -> Result<(), HintError> {
        let regions = self.dirty.len();
        let bitmap = self
            .dirty
            .get_mut(index)
            .ok_or(HintError::NoSuchRegion { index, regions })?;
        for &page in pages {
            bitmap
                .set_range(page, 1)
                .map_err(|source| HintError::DirtyLog { index, source })?;
        }
        Ok(())
    }

    /// Number of dirty pages so far.
    pub fn dirty_pages(&self) -> u64 {
        self.dirty.iter().map(DirtyBitmap::count).sum()
    }

    /// The pages to send in this round.
    pub fn into_table(self) -> Result<MemoryRangeTable, HintError> {
        tables_to_ranges(&self.ram, &self.dirty)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bitmap::tests::Rng;

    const P: u64 = PAGE_SIZE;

    fn ram() -> RamRegions {
        // Two touching regions and one after a hole.
        RamRegions::new([
            MemoryRange::new(0, 64 * P),
            MemoryRange::new(64 * P, 64 * P),
            MemoryRange::new(1024 * P, 32 * P),
        ])
        .unwrap()
    }

    fn round() -> HintRound {
        HintRound::new(&ram(), DirtyLoggingStarted::confirm())
    }

    fn pages_of(table: &MemoryRangeTable) -> Vec<u64> {
        table
            .iter()
            .flat_map(|r| (r.gpa / P)..(r.gpa + r.length) / P)
            .collect()
    }

    #[test]
    fn no_hints_means_all_ram() {
        let r0 = round().finish().unwrap();
        assert_eq!(r0.table.total_bytes(), ram().total_bytes());
        assert_eq!(r0.stats, HintStats::default());
    }

    #[test]
    fn request_rules() {
        let mut r = round();
        assert!(matches!(r.request(0), Err(HintError::ReservedCmdId(0))));
        assert!(matches!(r.request(1), Err(HintError::ReservedCmdId(1))));
        assert_eq!(r.cmd_id(), None);
        assert_eq!(r.request(7).unwrap(), 7);
        assert!(matches!(r.request(8), Err(HintError::AlreadyRequested(7))));
        assert!(!r.stop(8));
        assert!(!r.is_stopped());
        assert!(r.stop(7));
        assert!(r.is_stopped());
        assert!(matches!(r.request(9), Err(HintError::AlreadyRequested(7))));
    }

    /// Section 3: a page hinted free, then allocated and written by the guest, must be sent in
    /// the next round, because it appears in the dirty sync that follows.
    #[test]
    fn safety_rule_hinted_then_written_is_sent_in_round_1() {
        let ram = ram();
        let mut r = HintRound::new(&ram, DirtyLoggingStarted::confirm());
        let id = r.request(2).unwrap();
        assert_eq!(
            r.apply(id, MemoryRange::new(8 * P, 8 * P)),
            HintVerdict::Accepted { pages: 8 }
        );
        assert!(r.stop(id));
        let r0 = r.finish().unwrap();
        assert!(!pages_of(&r0.table).contains(&10));
        assert_eq!(r0.stats.pages_skipped, 8);

        // The guest reuses page 10 after hinting it; dirty logging catches the write.
        let mut log = vec![0u64; 1];
        log[0] |= 1 << 10;
        let mut r1 = DirtyRound::new(&ram);
        r1.add_log(0, &log).unwrap();
        let t1 = r1.into_table().unwrap();
        assert_eq!(pages_of(&t1), vec![10]);
    }

    /// End-to-end model of the rule: a source whose guest hints, then writes some hinted and
    /// some unhinted pages; after round 0, round 1 and a final round the destination must
    /// equal the source on every page that is not free.
    #[test]
    fn safety_rule_simulated_migration() {
        let ram = RamRegions::new([MemoryRange::new(0, 512 * P)]).unwrap();
        let mut rng = Rng::new(42);
        for _ in 0..50 {
            let pages = 512usize;
            let mut src: Vec<u64> = (0..pages as u64).map(|p| p + 1).collect();
            let mut free = vec![false; pages];
            let mut dirty = DirtyBitmap::new_clear(pages as u64);
            let write = |p: usize, v: u64, src: &mut Vec<u64>, dirty: &mut DirtyBitmap| {
                src[p] = v;
                dirty.set_range(p as u64, 1).unwrap();
            };
            // Dirty logging starts, then round 0 is computed, then hints are requested.
            let mut r = HintRound::new(&ram, DirtyLoggingStarted::confirm());
            let id = r.request(3).unwrap();
            for block in 0..(pages / 8) {
                if rng.below(2) == 0 {
                    free[block * 8..block * 8 + 8].fill(true);
                    r.apply(id, MemoryRange::new(block as u64 * 8 * P, 8 * P));
                }
            }
            // The guest allocates and writes some hinted pages while hints are still arriving.
            for _ in 0..30 {
                let p = rng.below(pages as u64) as usize;
                free[p] = false;
                write(p, rng.next() | 1, &mut src, &mut dirty);
            }
            r.stop(id);
            // A stale hint for an old id and one after STOP are ignored.
            assert!(matches!(
                r.apply(2, MemoryRange::new(0, P)),
                HintVerdict::Ignored(_)
            ));
            assert!(matches!(
                r.apply(id, MemoryRange::new(0, P)),
                HintVerdict::Ignored(HintIgnored::AfterStop)
            ));
            let mut dst = vec![0u64; pages];
            let t0 = r.finish().unwrap().table;
            // Round 0 is read from guest memory while the guest keeps writing.
            let mut sends = vec![t0];
            for round in 0..3 {
                let table = sends.pop().unwrap();
                for p in pages_of(&table) {
                    dst[p as usize] = src[p as usize];
                    if round < 2 && rng.below(20) == 0 {
                        let q = rng.below(pages as u64) as usize;
                        free[q] = false;
                        write(q, rng.next() | 1, &mut src, &mut dirty);
                    }
                }
                let mut next = DirtyRound::new(&ram);
                next.add_log(0, dirty.words()).unwrap();
                dirty = DirtyBitmap::new_clear(pages as u64);
                sends.push(next.into_table().unwrap());
            }
            // Final round: guest paused, last sync.
            for p in pages_of(&sends[0]) {
                dst[p as usize] = src[p as usize];
            }
            for p in 0..pages {
                if !free[p] {
                    assert_eq!(dst[p], src[p], "page {p} lost");
                }
            }
        }
    }

    #[test]
    fn stale_hints_are_ignored() {
        let mut r = round();
        assert_eq!(
            r.apply(5, MemoryRange::new(0, P)),
            HintVerdict::Ignored(HintIgnored::NotRequested)
        );
        r.request(5).unwrap();
        assert_eq!(
            r.apply(4, MemoryRange::new(0, P)),
            HintVerdict::Ignored(HintIgnored::StaleCmdId {
                expected: 5,
                got: 4
            })
        );
        assert_eq!(
            r.apply(5, MemoryRange::new(0, P)),
            HintVerdict::Accepted { pages: 1 }
        );
        assert!(r.stop(5));
        assert_eq!(
            r.apply(5, MemoryRange::new(P, P)),
            HintVerdict::Ignored(HintIgnored::AfterStop)
        );
        let s = r.stats();
        assert_eq!((s.ignored, s.hints_accepted, s.pages_hinted), (3, 1, 1));
        let r0 = r.finish().unwrap();
        assert_eq!(r0.table.total_pages(), 160 - 1);
    }

    /// Regression: the ranges protocol merged 1.2 GiB of neighbouring free blocks into one
    /// hint, which a fixed 1 GiB cap rejected, so nearly nothing was skipped.
    #[test]
    fn one_hint_may_cover_a_whole_region() {
        let big = RamRegions::new([MemoryRange::new(0, 2 << 30)]).unwrap();
        let mut r = HintRound::new(&big, DirtyLoggingStarted::confirm());
        r.request(2).unwrap();
        let verdict = r.apply(2, MemoryRange::new(1 << 20, (2 << 30) - (1 << 20)));
        assert!(
            matches!(verdict, HintVerdict::Accepted { .. }),
            "{verdict:?}"
        );
        assert_eq!(r.finish().unwrap().table.total_bytes(), 1 << 20);
    }

    #[test]
    fn invalid_hints_are_rejected_and_counted() {
        let mut r = round();
        r.request(2).unwrap();
        let cases = [
            (MemoryRange::new(0, 0), HintRejection::ZeroLength),
            (MemoryRange::new(1, P), HintRejection::Misaligned),
            (MemoryRange::new(0, P + 1), HintRejection::Misaligned),
            (MemoryRange::new(0, 1 << 40), HintRejection::TooLong),
            (
                MemoryRange::new(u64::MAX - P + 1, P),
                HintRejection::Overflow,
            ),
            (MemoryRange::new(128 * P, P), HintRejection::OutsideRam),
            (MemoryRange::new(1050 * P, 8 * P), HintRejection::OutsideRam),
        ];
        for (hint, why) in cases {
            assert_eq!(r.apply(2, hint), HintVerdict::Rejected(why), "{hint:?}");
        }
        // A hint spanning two touching regions is fine.
        assert_eq!(
            r.apply(2, MemoryRange::new(60 * P, 8 * P)),
            HintVerdict::Accepted { pages: 8 }
        );
        // The same pages again, or partly, are overlaps and change nothing.
        assert_eq!(
            r.apply(2, MemoryRange::new(60 * P, 8 * P)),
            HintVerdict::Rejected(HintRejection::Overlap)
        );
        assert_eq!(
            r.apply(2, MemoryRange::new(56 * P, 8 * P)),
            HintVerdict::Rejected(HintRejection::Overlap)
        );
        let s = r.stats();
        assert_eq!(s.rejected, 9);
        assert_eq!(s.pages_hinted, 8);
        assert_eq!(s.pages_skipped, 8);
        assert_eq!(r.pages_remaining(), 160 - 8);
        let t = r.finish().unwrap().table;
        assert!(pages_of(&t).contains(&56));
        assert!(!pages_of(&t).contains(&64));
    }

    #[test]
    fn dirty_round_ranges_and_errors() {
        let mut d = DirtyRound::new(&ram());
        d.add_range(63 * P + 100, P).unwrap();
        d.add_range(1024 * P, 0).unwrap();
        assert_eq!(d.dirty_pages(), 2);
        assert!(matches!(
            d.add_range(200 * P, P),
            Err(HintError::DirtyOutsideRam { .. })
        ));
        assert!(matches!(
            d.add_range(u64::MAX, 2),
            Err(HintError::DirtyOutsideRam { .. })
        ));
        assert!(matches!(
            d.add_log(3, &[0]),
            Err(HintError::NoSuchRegion { index: 3, .. })
        ));
        assert!(matches!(
            d.add_log(0, &[0, 0, 0]),
            Err(HintError::DirtyLog { index: 0, .. })
        ));
        d.add_log(2, &[1 << 31]).unwrap();
        assert_eq!(pages_of(&d.into_table().unwrap()), vec![63, 64, 1055]);
    }
}

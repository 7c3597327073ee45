//! Round 0 leaves out the guest pages the host never backed (see
//! `vm_migration::populated`) unless `zero_pages=off` asks for every page; this puts what
//! that did into the migration report.

use std::time::Instant;

use vm_migration::report::duration_ms;
use vm_migration::{HintRound, MigrationReport};

use crate::config::SendMigrationData;
use crate::memory::GuestMemoryMmap;

/// The report's `unpopulated_reason` with `zero_pages=off`, which sends every page of RAM as
/// Cloud Hypervisor does (never-backed pages are zero pages).
pub const SENT_WITH_ZERO_PAGES: &str = "zero_pages=off sends them as zero pages";

/// Leaves the never-backed pages of `memory` out of `round0` (unless `zero_pages=off`) and
/// records the count, the time and (when round 0 keeps them) why in `report`.
pub fn leave_out_unpopulated(
    memory: &GuestMemoryMmap,
    round0: &mut HintRound,
    data: &SendMigrationData,
    report: &mut MigrationReport,
) {
    if !data.zero_pages {
        report.unpopulated_reason = Some(SENT_WITH_ZERO_PAGES.into());
        return;
    }
    let started = Instant::now();
    match round0.leave_out_unpopulated(memory) {
        Ok(stats) => {
            report.pages_unpopulated = stats.pages_left_out;
            log::info!(
                "round 0: {} pages never backed left out ({} backed, found by {})",
                stats.pages_left_out,
                stats.pages_populated,
                stats.method.map_or("nothing", |m| m.name())
            );
        }
        Err(e) => {
            let why = crate::api::error_chain(&e);
            log::warn!("sending never-backed pages too: {why}");
            report.unpopulated_reason = Some(why);
        }
    }
    report.phases.unpopulated_scan_ms = duration_ms(started.elapsed());
}

//! The hot writer: a thread that owns the hot pages and rewrites them without pause, so they are
//! dirtied again and again while a migration runs.
//!
//! Pass `g` checks that every page still holds generation `g - 1`, then writes generation `g`
//! (setup wrote generation 1). The writer is the only one touching hot pages, so checking never
//! races with writing; a complete pass is a full verification of the hot data. The main thread
//! learns about passes from [`HotWriter::completed_generation`] and takes the failures with
//! [`HotWriter::take_failures`].

use crate::pattern;
use crate::region::Region;
use crate::verify::{Failure, FailureLog};
use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

/// What the writer thread shares with the main thread.
#[derive(Default)]
struct Shared {
    /// The last generation written to every hot page.
    completed: AtomicU64,
    /// Failures found since the main thread last took them.
    failures: Mutex<FailureLog>,
}

/// The main thread's handle on the running writer.
pub struct HotWriter {
    shared: Arc<Shared>,
    pages: u64,
}

/// One pass over `region`: checks generation `generation - 1` and writes `generation` to each page.
pub fn rewrite_pass(region: &mut Region, generation: u64, log: &mut FailureLog) {
    let count = region.pages();
    for (addr, page) in region.pages_in_mut(0..count) {
        if let Err(mismatch) = pattern::check(page, addr, generation - 1) {
            log.record(Failure {
                addr,
                generation: generation - 1,
                mismatch,
            });
        }
        pattern::fill(page, addr, generation);
    }
}

impl HotWriter {
    /// Starts the writer thread on `region`, whose pages hold generation 1.
    pub fn start(mut region: Region) -> io::Result<HotWriter> {
        let shared = Arc::new(Shared {
            completed: AtomicU64::new(1),
            ..Shared::default()
        });
        let pages = region.pages() as u64;
        let theirs = Arc::clone(&shared);
        std::thread::Builder::new()
            .name("hot-writer".into())
            .spawn(move || {
                let mut generation = 2u64;
                loop {
                    let mut log = FailureLog::default();
                    rewrite_pass(&mut region, generation, &mut log);
                    if !log.is_empty() {
                        theirs
                            .failures
                            .lock()
                            .unwrap_or_else(PoisonError::into_inner)
                            .absorb(log);
                    }
                    theirs.completed.store(generation, Ordering::Release);
                    generation += 1;
                }
            })?;
        Ok(HotWriter { shared, pages })
    }

    /// Number of hot pages.
    pub fn pages(&self) -> u64 {
        self.pages
    }

    /// The last generation completed on every hot page.
    pub fn completed_generation(&self) -> u64 {
        self.shared.completed.load(Ordering::Acquire)
    }

    /// Waits until generation `generation` is complete; false if `limit` passed first.
    pub fn wait_for(&self, generation: u64, limit: Duration) -> bool {
        let start = Instant::now();
        while self.completed_generation() < generation {
            if start.elapsed() >= limit {
                return false;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        true
    }

    /// Takes the failures found since the last call.
    pub fn take_failures(&self) -> FailureLog {
        std::mem::take(
            &mut *self
                .shared
                .failures
                .lock()
                .unwrap_or_else(PoisonError::into_inner),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::region::HugePages;
    use crate::verify::verify_pages;

    fn hot_region(pages: usize) -> Region {
        let mut region = Region::map(pages, HugePages::Default).unwrap();
        for (addr, page) in region.pages_in_mut(0..pages) {
            pattern::fill(page, addr, 1);
        }
        region
    }

    #[test]
    fn a_pass_advances_the_generation_and_reports_a_corrupted_page() {
        let mut region = hot_region(8);
        let mut log = FailureLog::default();
        rewrite_pass(&mut region, 2, &mut log);
        assert!(log.is_empty());
        let (bad_addr, page) = region.pages_in_mut(3..4).next().unwrap();
        page[9] = 0;
        rewrite_pass(&mut region, 3, &mut log);
        assert_eq!(log.total(), 1);
        assert_eq!(
            (
                log.named()[0].addr,
                log.named()[0].generation,
                log.named()[0].mismatch.word
            ),
            (bad_addr, 2, 9)
        );
        let mut after = FailureLog::default();
        assert_eq!(verify_pages(region.pages_in(0..8), 3, &mut after), 8);
        assert!(after.is_empty(), "the pass rewrote the bad page");
    }

    #[test]
    fn the_thread_keeps_writing() {
        let writer = HotWriter::start(hot_region(16)).unwrap();
        assert_eq!(writer.pages(), 16);
        assert!(writer.wait_for(5, Duration::from_secs(10)));
        assert!(writer.take_failures().is_empty());
    }
}

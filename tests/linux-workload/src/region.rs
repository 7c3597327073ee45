//! An anonymous private memory mapping owned by one [`Region`], seen as 4 KiB pages. The only
//! place that touches raw memory: everything else gets `&Page`/`&mut Page` from here.

use crate::pattern::{Page, PAGE_SIZE};
use std::fmt;
use std::io;
use std::ops::Range;
use std::ptr::NonNull;

/// A system call on a region failed.
#[derive(Debug)]
pub enum RegionError {
    /// `mmap` refused the mapping.
    Map {
        /// Bytes asked for.
        bytes: usize,
        /// The errno.
        source: io::Error,
    },
    /// `madvise` failed.
    Advise {
        /// What was asked (`MADV_NOHUGEPAGE`, `MADV_DONTNEED`).
        advice: &'static str,
        /// The errno.
        source: io::Error,
    },
}

impl fmt::Display for RegionError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RegionError::Map { bytes, .. } => {
                write!(f, "cannot map {} KiB of anonymous memory", bytes / 1024)
            }
            RegionError::Advise { advice, .. } => write!(f, "madvise({advice}) failed"),
        }
    }
}

impl std::error::Error for RegionError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            RegionError::Map { source, .. } | RegionError::Advise { source, .. } => Some(source),
        }
    }
}

/// Whether transparent huge pages may back a region.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HugePages {
    /// The kernel's default policy.
    Default,
    /// `MADV_NOHUGEPAGE`: 4 KiB pages only, so that giving back 64 KiB really frees 64 KiB.
    Never,
}

/// An anonymous private mapping of whole pages, unmapped on drop.
pub struct Region {
    base: NonNull<u8>,
    pages: usize,
}

// SAFETY: a Region is the only handle to its mapping (it is neither Clone nor Copy, and no
// pointer into it escapes except as borrows of the Region), so moving it to another thread moves
// exclusive access with it.
unsafe impl Send for Region {}

impl Region {
    /// Maps `pages` pages (at least one) of fresh zero memory; nothing is resident yet.
    pub fn map(pages: usize, huge: HugePages) -> Result<Region, RegionError> {
        let bytes = pages.max(1).saturating_mul(PAGE_SIZE);
        // SAFETY: a fresh anonymous mapping at an address the kernel chooses; no existing memory
        // is affected. The result is checked before use.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                bytes,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        let base = match NonNull::new(ptr.cast::<u8>()) {
            Some(base) if ptr != libc::MAP_FAILED => base,
            _ => {
                return Err(RegionError::Map {
                    bytes,
                    source: io::Error::last_os_error(),
                })
            }
        };
        let region = Region {
            base,
            pages: pages.max(1),
        };
        if huge == HugePages::Never {
            region.advise(0..region.pages, libc::MADV_NOHUGEPAGE, "MADV_NOHUGEPAGE")?;
        }
        Ok(region)
    }

    /// Number of pages.
    pub fn pages(&self) -> usize {
        self.pages
    }

    /// Virtual address of page `index` (the address the pattern is keyed on).
    pub fn addr(&self, index: usize) -> u64 {
        self.base.as_ptr() as u64 + (index * PAGE_SIZE) as u64
    }

    /// The pages in `range` (clipped to the region) with their addresses.
    pub fn pages_in(&self, range: Range<usize>) -> impl Iterator<Item = (u64, &Page)> {
        let range = range.start.min(self.pages)..range.end.min(self.pages);
        range.map(move |index| {
            // SAFETY: index < self.pages, so the page lies inside the mapping, which is readable,
            // page-aligned (so aligned for u64) and lives as long as &self. Writers need
            // &mut self, so no write can overlap this shared borrow.
            let page = unsafe { &*self.base.as_ptr().add(index * PAGE_SIZE).cast::<Page>() };
            (self.addr(index), page)
        })
    }

    /// The pages in `range` (clipped to the region), mutable, with their addresses.
    pub fn pages_in_mut(&mut self, range: Range<usize>) -> impl Iterator<Item = (u64, &mut Page)> {
        let range = range.start.min(self.pages)..range.end.min(self.pages);
        let base = self.base;
        range.map(move |index| {
            // SAFETY: as in pages_in, and each index is yielded once, so the &mut pages never
            // overlap; &mut self keeps every other access out for their lifetime.
            let page = unsafe { &mut *base.as_ptr().add(index * PAGE_SIZE).cast::<Page>() };
            (base.as_ptr() as u64 + (index * PAGE_SIZE) as u64, page)
        })
    }

    /// Gives the pages in `range` back to the kernel (`MADV_DONTNEED`); they read as zero after.
    /// The mapping stays, so giving back many small pieces does not split it into many VMAs.
    pub fn give_back(&mut self, range: Range<usize>) -> Result<(), RegionError> {
        self.advise(range, libc::MADV_DONTNEED, "MADV_DONTNEED")
    }

    fn advise(
        &self,
        range: Range<usize>,
        advice: libc::c_int,
        name: &'static str,
    ) -> Result<(), RegionError> {
        let range = range.start.min(self.pages)..range.end.min(self.pages);
        if range.is_empty() {
            return Ok(());
        }
        // SAFETY: the range lies inside our mapping; MADV_NOHUGEPAGE changes no contents and
        // MADV_DONTNEED only drops pages of a private anonymous mapping we own (callers hold
        // &mut self for it), which is what the caller asked for.
        let rc = unsafe {
            libc::madvise(
                self.base.as_ptr().add(range.start * PAGE_SIZE).cast(),
                range.len() * PAGE_SIZE,
                advice,
            )
        };
        if rc != 0 {
            return Err(RegionError::Advise {
                advice: name,
                source: io::Error::last_os_error(),
            });
        }
        Ok(())
    }
}

impl Drop for Region {
    fn drop(&mut self) {
        // SAFETY: base/pages describe exactly the mapping made in map(); no borrow of it can
        // outlive self. An error here could only mean a bad range, which cannot happen.
        unsafe {
            libc::munmap(self.base.as_ptr().cast(), self.pages * PAGE_SIZE);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pattern;

    #[test]
    fn fill_give_back_and_read_zero() {
        let mut region = Region::map(32, HugePages::Never).unwrap();
        assert_eq!(region.pages(), 32);
        assert_eq!(region.addr(1) - region.addr(0), PAGE_SIZE as u64);
        for (addr, page) in region.pages_in_mut(0..32) {
            pattern::fill(page, addr, 1);
        }
        region.give_back(16..32).unwrap();
        assert!(region
            .pages_in(0..16)
            .all(|(addr, page)| pattern::check(page, addr, 1).is_ok()));
        assert!(region
            .pages_in(16..32)
            .all(|(_, page)| page.iter().all(|&w| w == 0)));
        assert_eq!(region.pages_in(30..99).count(), 2, "ranges are clipped");
    }
}

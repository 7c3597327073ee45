//! Which guest pages the host has ever backed, found without reading guest memory.
//!
//! A page the host has never backed reads as zero, and so does a page the balloon released
//! (`MADV_DONTNEED`, or a hole punched in the memory file). The destination's memory is zero
//! too, so such a page need not be sent in round 0, provided dirty logging was already running
//! when it was found unbacked: a page the guest (or the VMM) writes afterwards is in a later
//! dirty sync and is sent then. That is the same rule that makes free page hints safe, and
//! [`crate::HintRound::leave_out_unpopulated`] is the only way to apply it (a `HintRound`
//! exists only once dirty logging runs).
//!
//! How the backed pages are found, per kind of mapping:
//!
//! | guest memory | method | cost |
//! |---|---|---|
//! | shared (memfd) | `lseek(SEEK_DATA / SEEK_HOLE)` on the file | one call per populated run |
//! | private anonymous, Linux 6.7+ | `PAGEMAP_SCAN` ioctl on `/proc/self/pagemap` | one call per 4096 runs |
//! | private anonymous, older | reading `/proc/self/pagemap` | 8 bytes per page |
//!
//! For anonymous memory a page counts as backed when it is present or swapped out (pagemap has
//! a bit for each), so a page in swap is never taken for an empty one; `mincore` was not used
//! because it reports swapped-out anonymous pages as absent. A page mapped to the kernel's
//! shared zero page (read, never written) counts as unbacked: it is zero, and a write replaces
//! it with a page of its own, through a fault that dirty logging sees. A transparent huge page
//! is backed as a whole (all its 4 KiB pages are present), even if the guest wrote one byte of
//! it; the zero page scan then leaves its zero parts out.

use std::fs::File;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};
use std::os::unix::fs::FileExt as _;

use thiserror::Error;
use vm_memory::{Address, GuestMemoryBackend, GuestMemoryRegion, MemoryRegionAddress};

use crate::ranges::{MemoryRange, PAGE_SIZE};

/// Errors finding the backed pages of guest memory. None of them is fatal to a migration: the
/// caller sends the region whole instead.
#[derive(Debug, Error)]
pub enum PopulatedError {
    /// `/proc/self/pagemap` could not be opened.
    #[error("cannot open /proc/self/pagemap")]
    OpenPagemap(#[source] std::io::Error),
    /// Reading `/proc/self/pagemap` failed.
    #[error("cannot read /proc/self/pagemap at {offset:#x}")]
    ReadPagemap {
        /// Byte offset in the pagemap file.
        offset: u64,
        /// The failure.
        #[source]
        source: std::io::Error,
    },
    /// The `PAGEMAP_SCAN` ioctl failed with something other than "not supported".
    #[error("PAGEMAP_SCAN failed at {addr:#x}")]
    PagemapScan {
        /// Host address the walk had reached.
        addr: u64,
        /// The failure.
        #[source]
        source: std::io::Error,
    },
    /// `lseek(SEEK_DATA / SEEK_HOLE)` on the memory file failed.
    #[error("cannot find the data in the guest memory file at offset {offset:#x}")]
    Seek {
        /// File offset.
        offset: u64,
        /// The failure.
        #[source]
        source: std::io::Error,
    },
    /// A guest memory region has no host mapping.
    #[error("guest memory region at {gpa:#x} has no host address")]
    NoHostAddress {
        /// Start of the region.
        gpa: u64,
    },
}

/// How the backed pages of a mapping were found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DiscoveryMethod {
    /// `lseek(SEEK_DATA / SEEK_HOLE)` on the memory file.
    SeekData,
    /// The `PAGEMAP_SCAN` ioctl (Linux 6.7+).
    PagemapScan,
    /// Reading `/proc/self/pagemap` entry by entry.
    PagemapRead,
}

impl DiscoveryMethod {
    /// The name the migration report uses.
    pub fn name(self) -> &'static str {
        match self {
            DiscoveryMethod::SeekData => "seek_data",
            DiscoveryMethod::PagemapScan => "pagemap_scan",
            DiscoveryMethod::PagemapRead => "pagemap_read",
        }
    }
}

/// One host mapping of guest memory to look at.
#[derive(Clone, Copy, Debug)]
pub struct Mapping<'a> {
    /// Host address of its first byte (page-aligned).
    pub addr: u64,
    /// Its length in bytes.
    pub len: u64,
    /// The file and offset it maps when it is a shared file mapping; `None` for private
    /// anonymous memory.
    pub file: Option<(BorrowedFd<'a>, u64)>,
}

/// Runs of backed pages of one mapping, as `(offset, length)` from its start, page-aligned,
/// sorted and not touching each other.
pub type Runs = Vec<(u64, u64)>;

/// Finds the backed pages of `mapping`. Looking changes nothing: no page is read or faulted in.
pub fn populated_runs(mapping: &Mapping<'_>) -> Result<(Runs, DiscoveryMethod), PopulatedError> {
    if let Some((fd, offset)) = mapping.file {
        return seek_data_runs(fd, offset, mapping.len).map(|r| (r, DiscoveryMethod::SeekData));
    }
    let pagemap = File::open("/proc/self/pagemap").map_err(PopulatedError::OpenPagemap)?;
    match pagemap_scan_runs(&pagemap, mapping.addr, mapping.len) {
        Ok(runs) => Ok((runs, DiscoveryMethod::PagemapScan)),
        Err(ScanUnsupported::No(e)) => Err(e),
        Err(ScanUnsupported::Yes) => pagemap_read_runs(&pagemap, mapping.addr, mapping.len)
            .map(|r| (r, DiscoveryMethod::PagemapRead)),
    }
}

/// Appends `[start, start + len)` to `runs`, merging it with the last run when they touch.
fn push_run(runs: &mut Runs, start: u64, len: u64) {
    if len == 0 {
        return;
    }
    if let Some(last) = runs.last_mut() {
        if last.0 + last.1 == start {
            last.1 += len;
            return;
        }
    }
    runs.push((start, len));
}

/// The data runs of `len` bytes of `fd` from `offset`: holes are pages never written, or
/// punched out (`FALLOC_FL_PUNCH_HOLE`). Moves the file position, which nothing else uses.
pub fn seek_data_runs(fd: BorrowedFd<'_>, offset: u64, len: u64) -> Result<Runs, PopulatedError> {
    let end = offset.saturating_add(len);
    let mut runs = Runs::new();
    let mut pos = offset;
    while pos < end {
        let Some(data) = seek(fd, pos, libc::SEEK_DATA)? else {
            break;
        };
        if data >= end {
            break;
        }
        let hole = seek(fd, data, libc::SEEK_HOLE)?.unwrap_or(end).min(end);
        // Data runs come page-aligned from shmem; round outwards to be sure.
        let first = data - data % PAGE_SIZE;
        let last = hole.next_multiple_of(PAGE_SIZE).min(end);
        let start = first.max(offset) - offset;
        push_run(&mut runs, start, (last - offset).saturating_sub(start));
        pos = last.max(pos + PAGE_SIZE);
    }
    Ok(runs)
}

/// `lseek`; `None` when there is no data (or hole) at or after `pos` (`ENXIO`).
fn seek(fd: BorrowedFd<'_>, pos: u64, whence: libc::c_int) -> Result<Option<u64>, PopulatedError> {
    let err = |source| PopulatedError::Seek {
        offset: pos,
        source,
    };
    let off = libc::off_t::try_from(pos)
        .map_err(|_| err(std::io::Error::from_raw_os_error(libc::EOVERFLOW)))?;
    // SAFETY: lseek on a descriptor we borrow; it reads no memory of ours.
    let r = unsafe { libc::lseek(fd.as_raw_fd(), off, whence) };
    if r < 0 {
        let e = std::io::Error::last_os_error();
        return match e.raw_os_error() {
            Some(libc::ENXIO) => Ok(None),
            _ => Err(err(e)),
        };
    }
    Ok(Some(r as u64))
}

// The PAGEMAP_SCAN interface (include/uapi/linux/fs.h, Linux 6.7).
const PAGE_IS_PRESENT: u64 = 1 << 3;
const PAGE_IS_SWAPPED: u64 = 1 << 4;
const PAGE_IS_PFNZERO: u64 = 1 << 5;

/// `struct page_region`.
#[repr(C)]
#[derive(Clone, Copy, Default)]
struct PageRegion {
    start: u64,
    end: u64,
    categories: u64,
}

/// `struct pm_scan_arg`.
#[repr(C)]
#[derive(Default)]
struct PmScanArg {
    size: u64,
    flags: u64,
    start: u64,
    end: u64,
    walk_end: u64,
    vec: u64,
    vec_len: u64,
    max_pages: u64,
    category_inverted: u64,
    category_mask: u64,
    category_anyof_mask: u64,
    return_mask: u64,
}

/// `_IOWR('f', 16, struct pm_scan_arg)`.
pub const PAGEMAP_SCAN: u64 =
    (3 << 30) | ((std::mem::size_of::<PmScanArg>() as u64) << 16) | ((b'f' as u64) << 8) | 16;

/// Runs asked of the kernel per `PAGEMAP_SCAN` call.
const SCAN_BATCH: usize = 4096;

enum ScanUnsupported {
    /// The kernel has no `PAGEMAP_SCAN`.
    Yes,
    /// It has, and it failed.
    No(PopulatedError),
}

/// Backed pages by `PAGEMAP_SCAN`: present or swapped, and not the shared zero page.
fn pagemap_scan_runs(pagemap: &File, addr: u64, len: u64) -> Result<Runs, ScanUnsupported> {
    let end = addr.saturating_add(len);
    let mut runs = Runs::new();
    let mut regions = vec![PageRegion::default(); SCAN_BATCH];
    let mut start = addr;
    while start < end {
        let mut arg = PmScanArg {
            size: std::mem::size_of::<PmScanArg>() as u64,
            start,
            end,
            vec: regions.as_mut_ptr() as u64,
            vec_len: regions.len() as u64,
            // Not the zero page, and present or swapped out.
            category_inverted: PAGE_IS_PFNZERO,
            category_mask: PAGE_IS_PFNZERO,
            category_anyof_mask: PAGE_IS_PRESENT | PAGE_IS_SWAPPED,
            return_mask: PAGE_IS_PRESENT | PAGE_IS_SWAPPED,
            ..Default::default()
        };
        // SAFETY: `arg` is a valid pm_scan_arg whose `vec` points at `regions.len()` writable
        // page_region entries that outlive the call; the ioctl writes only there and to `arg`.
        let n = unsafe { libc::ioctl(pagemap.as_raw_fd(), PAGEMAP_SCAN as _, &mut arg) };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            return Err(match e.raw_os_error() {
                Some(libc::ENOTTY) | Some(libc::EINVAL) if runs.is_empty() && start == addr => {
                    ScanUnsupported::Yes
                }
                _ => ScanUnsupported::No(PopulatedError::PagemapScan {
                    addr: start,
                    source: e,
                }),
            });
        }
        // A call that fills `regions` may report again, in the next call, pages it already
        // reported (seen on 6.18): only what lies past the last run counts.
        let reported = runs.last().map_or(addr, |&(off, len)| addr + off + len);
        for r in regions.iter().take(n as usize) {
            let (s, e) = (r.start.max(reported), r.end.min(end));
            if s < e {
                push_run(&mut runs, s - addr, e - s);
            }
        }
        if arg.walk_end <= start {
            break;
        }
        start = arg.walk_end;
    }
    Ok(runs)
}

/// Entries of `/proc/self/pagemap` read per call.
const PAGEMAP_BATCH: usize = 64 * 1024;
const PM_PRESENT: u64 = 1 << 63;
const PM_SWAPPED: u64 = 1 << 62;

/// Backed pages by reading `/proc/self/pagemap`: present or swapped.
pub fn pagemap_read_runs(pagemap: &File, addr: u64, len: u64) -> Result<Runs, PopulatedError> {
    let mut runs = Runs::new();
    let pages = len / PAGE_SIZE;
    let mut buf = vec![0u8; PAGEMAP_BATCH * 8];
    let mut page = 0;
    while page < pages {
        let n = (pages - page).min(PAGEMAP_BATCH as u64) as usize;
        let offset = (addr / PAGE_SIZE + page) * 8;
        let bytes = &mut buf[..n * 8];
        pagemap
            .read_exact_at(bytes, offset)
            .map_err(|source| PopulatedError::ReadPagemap { offset, source })?;
        for (i, entry) in bytes.as_chunks::<8>().0.iter().enumerate() {
            if u64::from_ne_bytes(*entry) & (PM_PRESENT | PM_SWAPPED) != 0 {
                push_run(&mut runs, (page + i as u64) * PAGE_SIZE, PAGE_SIZE);
            }
        }
        page += n as u64;
    }
    Ok(runs)
}

/// The backed pages of all of guest RAM, as guest-physical ranges.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PopulatedMemory {
    /// Per RAM region (in address order): its backed runs as guest-physical ranges.
    pub regions: Vec<Vec<MemoryRange>>,
    /// The method used for the first region (all regions of one VM are backed alike).
    pub method: Option<DiscoveryMethod>,
}

impl PopulatedMemory {
    /// Looks at every region of `mem`. Use it only through
    /// [`crate::HintRound::leave_out_unpopulated`], which makes sure dirty logging runs.
    pub fn discover<M: GuestMemoryBackend + ?Sized>(mem: &M) -> Result<Self, PopulatedError> {
        let mut out = PopulatedMemory::default();
        for region in mem.iter() {
            let gpa = region.start_addr().raw_value();
            let host = region
                .get_host_address(MemoryRegionAddress(0))
                .map_err(|_| PopulatedError::NoHostAddress { gpa })?;
            let mapping = Mapping {
                addr: host as u64,
                len: region.len(),
                file: region.file_offset().map(|f| (f.file().as_fd(), f.start())),
            };
            let (runs, method) = populated_runs(&mapping)?;
            out.method.get_or_insert(method);
            out.regions.push(
                runs.into_iter()
                    .map(|(off, len)| MemoryRange::new(gpa + off, len))
                    .collect(),
            );
        }
        Ok(out)
    }

    /// Backed pages in all.
    pub fn pages(&self) -> u64 {
        self.regions
            .iter()
            .flatten()
            .map(|r| r.length / PAGE_SIZE)
            .sum()
    }
}

#[cfg(test)]
mod tests;

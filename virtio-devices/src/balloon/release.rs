//! Giving guest pages back to the host, and walking PFN lists in contiguous runs.

use vm_memory::bitmap::Bitmap;
use vm_memory::{
    Address, GuestAddress, GuestMemoryBackend, GuestMemoryRegion, MemoryRegionAddress,
};

use super::{BalloonError, BALLOON_PAGE_SHIFT};
use crate::GuestMemoryMmap;

/// Release `[gpa, gpa + len)`, which must lie inside one region, to the host:
/// `madvise(MADV_DONTNEED)` on the mapping, plus a punched hole when the region is a shared
/// file mapping (otherwise the file keeps the pages). The range is marked dirty in the VMM's
/// bitmap: its content changed (to zeroes) behind the guest's back, and a migration must not
/// keep an older copy on the destination.
pub(crate) fn release_range(mem: &GuestMemoryMmap, gpa: u64, len: u64) -> Result<(), BalloonError> {
    let outside = BalloonError::BufferOutsideRam { addr: gpa, len };
    let region = mem.find_region(GuestAddress(gpa)).ok_or(outside)?;
    let offset = gpa - region.start_addr().raw_value();
    let end = offset.checked_add(len);
    if len == 0 || end.is_none_or(|end| end > region.len()) {
        return Err(BalloonError::BufferOutsideRam { addr: gpa, len });
    }
    let size =
        usize::try_from(len).map_err(|_| BalloonError::BufferOutsideRam { addr: gpa, len })?;
    let host = region
        .get_host_address(MemoryRegionAddress(offset))
        .map_err(|source| BalloonError::GuestMemory { addr: gpa, source })?;
    // SAFETY: `host..host + size` lies inside this region's mapping (offset + len <= region
    // length, checked above), which stays mapped while `mem` is alive. MADV_DONTNEED does not
    // unmap anything: it only drops the contents of pages the guest gave up, and no Rust
    // reference into guest memory exists (all accesses go through volatile slices).
    let ret = unsafe { libc::madvise(host.cast(), size, libc::MADV_DONTNEED) };
    if ret != 0 {
        return Err(BalloonError::Madvise {
            addr: gpa,
            len,
            source: std::io::Error::last_os_error(),
        });
    }
    if let Some(file) = region.file_offset() {
        if region.flags() & libc::MAP_SHARED != 0 {
            punch_hole(file, offset, gpa, len)?;
        }
    }
    region.bitmap().mark_dirty(offset as usize, size);
    Ok(())
}

fn punch_hole(
    file: &vm_memory::FileOffset,
    offset: u64,
    gpa: u64,
    len: u64,
) -> Result<(), BalloonError> {
    use std::os::unix::io::AsRawFd;
    let err = |source| BalloonError::PunchHole {
        addr: gpa,
        len,
        source,
    };
    let start = file
        .start()
        .checked_add(offset)
        .and_then(|s| libc::off_t::try_from(s).ok())
        .ok_or_else(|| err(std::io::Error::from_raw_os_error(libc::EOVERFLOW)))?;
    let flen = libc::off_t::try_from(len)
        .map_err(|_| err(std::io::Error::from_raw_os_error(libc::EOVERFLOW)))?;
    // SAFETY: fallocate only acts on the file descriptor, which `file` keeps open; punching a
    // hole with KEEP_SIZE frees the backing blocks of pages the guest gave up and leaves the
    // file's size (and so every mapping of it) intact.
    let ret = unsafe {
        libc::fallocate(
            file.file().as_raw_fd(),
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            start,
            flen,
        )
    };
    if ret != 0 {
        return Err(err(std::io::Error::last_os_error()));
    }
    Ok(())
}

/// Split the PFN run `[start, start + count)` into the pieces inside guest RAM, each within
/// one region; `f(gpa, len)` is called for every piece. Returns the number of PFNs outside RAM.
/// Gaps are skipped region by region, so a huge invalid run costs no more than a valid one.
pub(crate) fn for_each_ram_piece(
    mem: &GuestMemoryMmap,
    start: u64,
    count: u64,
    mut f: impl FnMut(u64, u64),
) -> u64 {
    let mut invalid = 0;
    let mut pfn = start;
    let end = start.saturating_add(count);
    while pfn < end {
        let gpa = pfn << BALLOON_PAGE_SHIFT;
        match mem.find_region(GuestAddress(gpa)) {
            Some(r) => {
                let region_end = (r.start_addr().raw_value() + r.len()) >> BALLOON_PAGE_SHIFT;
                let n = end.min(region_end) - pfn;
                if n == 0 {
                    // A region smaller than a page: treat the page as invalid.
                    invalid += 1;
                    pfn += 1;
                    continue;
                }
                f(gpa, n << BALLOON_PAGE_SHIFT);
                pfn += n;
            }
            None => {
                let next = mem
                    .iter()
                    .map(|r| r.start_addr().raw_value() >> BALLOON_PAGE_SHIFT)
                    .filter(|s| *s > pfn)
                    .min()
                    .unwrap_or(end)
                    .min(end);
                invalid += next - pfn;
                pfn = next;
            }
        }
    }
    invalid
}

/// Collects PFNs into contiguous ascending runs.
#[derive(Debug, Default)]
pub(crate) struct PfnRuns {
    run: Option<(u64, u64)>,
}

impl PfnRuns {
    /// Add a PFN; returns the finished run when `pfn` does not extend the current one.
    pub(crate) fn push(&mut self, pfn: u64) -> Option<(u64, u64)> {
        match &mut self.run {
            Some((start, count)) if *start + *count == pfn => {
                *count += 1;
                None
            }
            run => run.replace((pfn, 1)),
        }
    }

    /// The run in progress, if any.
    pub(crate) fn finish(&mut self) -> Option<(u64, u64)> {
        self.run.take()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn two_regions() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[
            (GuestAddress(0), 0x10_0000),
            (GuestAddress(0x20_0000), 0x10_0000),
        ])
        .unwrap()
    }

    #[test]
    fn runs() {
        let mut r = PfnRuns::default();
        let mut out = Vec::new();
        for pfn in [5, 6, 7, 9, 10, 3] {
            out.extend(r.push(pfn));
        }
        out.extend(r.finish());
        assert_eq!(out, vec![(5, 3), (9, 2), (3, 1)]);
    }

    #[test]
    fn pieces_skip_holes() {
        let mem = two_regions();
        let mut pieces = Vec::new();
        // From PFN 0xF0 (inside region 0) across the hole into region 1 and beyond RAM.
        let invalid = for_each_ram_piece(&mem, 0xF0, 0x400, |g, l| pieces.push((g, l)));
        assert_eq!(pieces, vec![(0xF_0000, 0x1_0000), (0x20_0000, 0x10_0000)]);
        assert_eq!(invalid, 0x400 - 0x10 - 0x100);
        // A huge run entirely beyond RAM.
        let invalid = for_each_ram_piece(&mem, 1 << 30, u64::from(u32::MAX), |_, _| panic!());
        assert_eq!(invalid, u64::from(u32::MAX));
    }

    #[test]
    fn release_checks_bounds() {
        let mem = two_regions();
        assert!(release_range(&mem, 0xF_F000, 0x2000).is_err());
        assert!(release_range(&mem, 0x10_0000, 0x1000).is_err());
        assert!(release_range(&mem, 0, 0).is_err());
        release_range(&mem, 0x20_0000, 0x1000).unwrap();
    }
}

//! Tests of populated-range discovery on real host mappings, and of the rule that leaving
//! unbacked pages out of round 0 is safe.

use std::os::fd::AsFd;
use std::time::Instant;

use vm_memory::bitmap::AtomicBitmap;
use vm_memory::{Bytes, FileOffset, GuestAddress, GuestMemoryMmap, GuestRegionMmap, MmapRegion};

use super::*;
use crate::hints::{DirtyLoggingStarted, DirtyRound, HintRound};
use crate::ranges::{MemoryRangeTable, RamRegions};

const P: u64 = PAGE_SIZE;
const HUGE: u64 = 2 << 20;

/// An anonymous private mapping, unmapped on drop.
struct Anon {
    addr: *mut u8,
    len: usize,
}

impl Anon {
    fn new(len: usize) -> Anon {
        // SAFETY: a fresh private anonymous mapping; nothing else refers to it.
        let addr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        assert_ne!(addr, libc::MAP_FAILED);
        Anon {
            addr: addr.cast(),
            len,
        }
    }

    /// A mapping of `len` bytes starting on a 2 MiB boundary.
    fn huge_aligned(len: usize) -> (Anon, u64) {
        let a = Anon::new(len + HUGE as usize);
        let skip = (a.addr as u64).next_multiple_of(HUGE) - a.addr as u64;
        (a, skip)
    }

    fn write(&self, off: u64, v: u8) {
        assert!(off < self.len as u64);
        // SAFETY: inside the mapping, which is readable and writable.
        unsafe { self.addr.add(off as usize).write_volatile(v) }
    }

    fn read(&self, off: u64) -> u8 {
        // SAFETY: inside the mapping, which is readable.
        unsafe { self.addr.add(off as usize).read_volatile() }
    }

    fn advise(&self, off: u64, len: u64, advice: libc::c_int) {
        // SAFETY: advice on part of our own mapping.
        let r = unsafe { libc::madvise(self.addr.add(off as usize).cast(), len as usize, advice) };
        assert_eq!(r, 0, "{}", std::io::Error::last_os_error());
    }

    fn mapping(&self, off: u64, len: u64) -> Mapping<'static> {
        Mapping {
            addr: self.addr as u64 + off,
            len,
            file: None,
        }
    }
}

impl Drop for Anon {
    fn drop(&mut self) {
        // SAFETY: unmapping exactly what `new` mapped.
        unsafe { libc::munmap(self.addr.cast(), self.len) };
    }
}

fn pagemap() -> File {
    File::open("/proc/self/pagemap").unwrap()
}

#[test]
fn anonymous_holes_and_written_pages() {
    let a = Anon::new(64 << 20);
    let m = a.mapping(0, 64 << 20);
    let (runs, method) = populated_runs(&m).unwrap();
    assert_eq!(
        method,
        DiscoveryMethod::PagemapScan,
        "this host's kernel is 6.7+"
    );
    assert!(runs.is_empty(), "{runs:?}");
    for page in [3, 4, 100, 16383] {
        a.write(page * P + 17, 1);
    }
    let expected = vec![(3 * P, 2 * P), (100 * P, P), (16383 * P, P)];
    assert_eq!(populated_runs(&m).unwrap().0, expected);
    // The fallback reads the same from the pagemap entries.
    assert_eq!(
        pagemap_read_runs(&pagemap(), m.addr, m.len).unwrap(),
        expected
    );
    // A window of the mapping: offsets are from the window's start.
    let w = a.mapping(4 * P, 100 * P);
    assert_eq!(populated_runs(&w).unwrap().0, vec![(0, P), (96 * P, P)]);
}

#[test]
fn pages_only_read_map_the_zero_page_and_count_as_unbacked() {
    let a = Anon::new(1 << 20);
    assert_eq!(a.read(5 * P), 0);
    a.write(9 * P, 3);
    let (runs, _) = populated_runs(&a.mapping(0, 1 << 20)).unwrap();
    assert_eq!(runs, vec![(9 * P, P)]);
}

#[test]
fn memory_the_balloon_released_with_madv_dontneed_is_unbacked_again() {
    let a = Anon::new(1 << 20);
    for page in 0..8 {
        a.write(page * P, 0xaa);
    }
    a.advise(2 * P, 3 * P, libc::MADV_DONTNEED);
    let (runs, _) = populated_runs(&a.mapping(0, 1 << 20)).unwrap();
    assert_eq!(runs, vec![(0, 2 * P), (5 * P, 3 * P)]);
}

#[test]
fn a_huge_page_counts_whole_and_a_partly_released_one_by_its_pages() {
    let (a, base) = Anon::huge_aligned(4 * HUGE as usize);
    a.advise(base, 4 * HUGE, libc::MADV_HUGEPAGE);
    a.write(base + HUGE + 5 * P, 1);
    let m = a.mapping(base, 4 * HUGE);
    let (runs, _) = populated_runs(&m).unwrap();
    // Whether the kernel gave a huge page depends on free memory; either way what is backed
    // lies inside that 2 MiB and covers the written page.
    assert_eq!(runs.len(), 1, "{runs:?}");
    let (start, len) = runs[0];
    assert!(start >= HUGE && start + len <= 2 * HUGE, "{runs:?}");
    assert!(
        start <= HUGE + 5 * P && start + len > HUGE + 5 * P,
        "{runs:?}"
    );
    // Releasing 4 KiB of it splits the huge page: the rest stays backed, that page does not.
    a.write(base + 2 * HUGE, 1);
    a.advise(base + 2 * HUGE + 7 * P, P, libc::MADV_DONTNEED);
    let (runs, _) = populated_runs(&m).unwrap();
    let covers = |off: u64| runs.iter().any(|&(s, l)| s <= off && off < s + l);
    assert!(covers(2 * HUGE));
    assert!(!covers(2 * HUGE + 7 * P), "{runs:?}");
    assert!(!covers(3 * HUGE) && !covers(0), "{runs:?}");
}

fn memfd(len: u64) -> File {
    // SAFETY: a valid NUL-terminated name.
    let fd = unsafe { libc::memfd_create(c"populated-test".as_ptr(), libc::MFD_CLOEXEC) };
    assert!(fd >= 0);
    // SAFETY: a fresh descriptor owned by nobody else.
    let f = unsafe { <File as std::os::fd::FromRawFd>::from_raw_fd(fd) };
    f.set_len(len).unwrap();
    f
}

#[test]
fn memfd_holes_written_pages_and_punched_holes() {
    let f = memfd(64 << 20);
    let runs = |off, len| seek_data_runs(f.as_fd(), off, len).unwrap();
    assert!(runs(0, 64 << 20).is_empty());
    f.write_all_at(&[1], 0).unwrap();
    f.write_all_at(&[1; 3 * 4096], 10 * P).unwrap();
    f.write_all_at(&[1], (64 << 20) - 1).unwrap();
    assert_eq!(
        runs(0, 64 << 20),
        vec![(0, P), (10 * P, 3 * P), ((64 << 20) - P, P)]
    );
    // The balloon punches a hole into file-backed guest memory.
    // SAFETY: fallocate on our own file descriptor.
    let r = unsafe {
        libc::fallocate(
            f.as_raw_fd(),
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            (11 * P) as libc::off_t,
            P as libc::off_t,
        )
    };
    assert_eq!(r, 0);
    assert_eq!(runs(0, 32 * P), vec![(0, P), (10 * P, P), (12 * P, P)]);
    // A window at a file offset: offsets are from the window's start, clipped to it.
    assert_eq!(runs(8 * P, 4 * P), vec![(2 * P, P)]);
    assert_eq!(runs(12 * P, 100 * P), vec![(0, P)]);
    // Through the mapping, as a shared guest region is found.
    let m = Mapping {
        addr: 0,
        len: 16 * P,
        file: Some((f.as_fd(), 0)),
    };
    assert_eq!(
        populated_runs(&m).unwrap(),
        (
            vec![(0, P), (10 * P, P), (12 * P, P)],
            DiscoveryMethod::SeekData
        )
    );
}

type Mem = GuestMemoryMmap<AtomicBitmap>;

/// Guest memory like the VMM's: 1 MiB at 0 and 1 MiB at 4 GiB, VMM writes tracked.
fn guest_memory(shared: bool) -> (Mem, RamRegions) {
    let f = shared.then(|| std::sync::Arc::new(memfd(2 << 20)));
    let regions = [(0u64, 0u64), (4 << 30, 1 << 20)]
        .into_iter()
        .map(|(gpa, off)| {
            let mmap = match &f {
                Some(f) => MmapRegion::from_file(FileOffset::from_arc(f.clone(), off), 1 << 20),
                None => MmapRegion::new(1 << 20),
            }
            .unwrap();
            GuestRegionMmap::new(mmap, GuestAddress(gpa)).unwrap()
        })
        .collect();
    let mem = Mem::from_regions(regions).unwrap();
    let ram = RamRegions::from_guest_memory(&mem).unwrap();
    (mem, ram)
}

fn take_vmm_writes(mem: &Mem, round: &mut DirtyRound) {
    for (i, region) in mem.iter().enumerate() {
        let words = region.get_mmap().bitmap().get_and_reset();
        round.add_log(i, &words).unwrap();
    }
}

/// The safety argument: round 0 leaves out what is unbacked once logging runs; a page first
/// written after that is in the next dirty sync, and so reaches the destination.
#[test]
fn unbacked_pages_leave_round_zero_and_a_later_write_is_in_the_next_sync() {
    for shared in [false, true] {
        let (mem, ram) = guest_memory(shared);
        mem.write_obj(0x1111u64, GuestAddress(3 * P)).unwrap();
        mem.write_obj(0x2222u64, GuestAddress((4 << 30) + 200 * P))
            .unwrap();
        for region in mem.iter() {
            region.get_mmap().bitmap().get_and_reset();
        }
        // 1. Dirty logging runs (the bitmaps were just cleared); 2. round 0 without the unbacked.
        let mut round0 = HintRound::new(&ram, DirtyLoggingStarted::confirm());
        let stats = round0.leave_out_unpopulated(&mem).unwrap();
        assert_eq!(stats.pages_populated, 2, "shared={shared}");
        assert_eq!(stats.pages_left_out, 512 - 2);
        let r0 = round0.finish().unwrap();
        assert_eq!(
            r0.table,
            MemoryRangeTable::from_ranges([
                MemoryRange::new(3 * P, P),
                MemoryRange::new((4 << 30) + 200 * P, P)
            ])
            .unwrap()
        );
        // 3. A page unbacked at discovery is written while round 0 is sent...
        mem.write_obj(0x3333u64, GuestAddress(77 * P)).unwrap();
        // 4. ...and the next sync has it.
        let mut round1 = DirtyRound::new(&ram);
        take_vmm_writes(&mem, &mut round1);
        let t = round1.into_table().unwrap();
        assert!(t
            .iter()
            .any(|r| r.gpa <= 77 * P && 77 * P < r.gpa + r.length));
    }
}

/// Hinted pages are counted as hinted; only what is left is counted as unbacked.
#[test]
fn hinted_pages_are_not_counted_twice() {
    let (mem, ram) = guest_memory(false);
    mem.write_obj(1u8, GuestAddress(0)).unwrap();
    let mut round0 = HintRound::new(&ram, DirtyLoggingStarted::confirm());
    round0.request(2).unwrap();
    round0.apply(2, MemoryRange::new(16 * P, 16 * P));
    let stats = round0.leave_out_unpopulated(&mem).unwrap();
    assert_eq!(stats.pages_left_out, 512 - 1 - 16);
    assert_eq!(round0.stats().pages_skipped, 16);
    assert_eq!(round0.finish().unwrap().table.total_pages(), 1);
}

/// Measures the three ways of finding backed anonymous memory (`cargo test -p vm-migration
/// --release -- --ignored --nocapture measure_discovery`): 256 MiB written in 4 KiB pages
/// scattered over 64 and 256 GiB mappings.
#[test]
#[ignore]
fn measure_discovery_methods() {
    for gib in [64u64, 256] {
        let len = gib << 30;
        let a = Anon::new(len as usize);
        let step = len / (256 << 8);
        for i in 0..(256u64 << 8) {
            a.write(i * step, 1);
        }
        let m = a.mapping(0, len);
        let t = Instant::now();
        let scan = populated_runs(&m).unwrap().0;
        let scan_ms = t.elapsed().as_secs_f64() * 1e3;
        let t = Instant::now();
        let read = pagemap_read_runs(&pagemap(), m.addr, m.len).unwrap();
        let read_ms = t.elapsed().as_secs_f64() * 1e3;
        let t = Instant::now();
        let mut vec = vec![0u8; (len / P) as usize];
        // SAFETY: `vec` has one byte per page of the mapping.
        let r = unsafe { libc::mincore(a.addr.cast(), a.len, vec.as_mut_ptr()) };
        assert_eq!(r, 0);
        let resident = vec.iter().filter(|&&b| b & 1 != 0).count();
        let mincore_ms = t.elapsed().as_secs_f64() * 1e3;
        let first_diff = scan.iter().zip(&read).position(|(a, b)| a != b);
        assert!(
            scan == read,
            "{} vs {} runs, first difference at {first_diff:?}: {:?} vs {:?}",
            scan.len(),
            read.len(),
            first_diff.map(|i| scan[i]),
            first_diff.map(|i| read[i])
        );
        assert_eq!(resident as u64, 256 << 8);
        println!(
            "{gib} GiB, 256 MiB backed: PAGEMAP_SCAN {scan_ms:.1} ms, pagemap read {read_ms:.1} ms, mincore {mincore_ms:.1} ms"
        );
    }
}

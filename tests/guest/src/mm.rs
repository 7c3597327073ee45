//! Guest memory management: a bump "carve" for metadata (allocator bitmaps, the workload's page
//! lists) taken from RAM before the allocator exists, and the buddy allocator over everything
//! else. The balloon keeps its inflated pages in pages of their own ([`OwnedPages`]), not here.
//!
//! Never managed: the first 1 MiB, the guest image with its stacks and page tables (up to
//! `__image_end`), and the carved metadata.

use crate::boot::__image_end;
use crate::bootinfo::BootInfo;
use guest_core::buddy::Buddy;
use guest_core::pfnstack::PageWords;
use guest_core::PAGE_SIZE;

/// A growable-up-to-capacity list of u32 PFNs in carved memory.
pub struct PfnList {
    ptr: *mut u32,
    len: usize,
    cap: usize,
}

impl PfnList {
    /// Appends; returns false when full.
    pub fn push(&mut self, pfn: u32) -> bool {
        if self.len >= self.cap {
            return false;
        }
        // SAFETY: ptr..ptr+cap is carved memory owned by this list.
        unsafe { self.ptr.add(self.len).write(pfn) };
        self.len += 1;
        true
    }

    /// Removes the last entry.
    pub fn pop(&mut self) -> Option<u32> {
        if self.len == 0 {
            return None;
        }
        self.len -= 1;
        // SAFETY: index < cap.
        Some(unsafe { self.ptr.add(self.len).read() })
    }

    /// The entries.
    pub fn as_slice(&self) -> &[u32] {
        if self.len == 0 {
            return &[];
        }
        // SAFETY: the first len entries are initialised.
        unsafe { core::slice::from_raw_parts(self.ptr, self.len) }
    }

    /// Number of entries.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Raw base pointer (for sharing read-only with another vCPU).
    pub fn as_ptr(&self) -> *const u32 {
        self.ptr
    }
}

/// Bump allocator over one RAM range, used before the buddy allocator exists.
pub struct Carve {
    /// First carved byte.
    pub start: u64,
    next: u64,
    end: u64,
}

impl Carve {
    /// Finds `need` bytes of RAM above the image (and above 1 MiB) for metadata.
    pub fn find(bi: &BootInfo, need: u64, limit: u64) -> Option<Carve> {
        let lo = image_end().max(1 << 20);
        bi.ram()
            .map(|(s, e)| (s.max(lo), e.min(limit)))
            .find(|(s, e)| e > s && e - s >= need)
            .map(|(s, _)| Carve {
                start: s,
                next: s,
                end: s + need,
            })
    }

    /// Takes `bytes` (rounded up to 64) and returns its address.
    pub fn take(&mut self, bytes: u64) -> Option<u64> {
        let b = (bytes + 63) & !63;
        if self.next + b > self.end {
            return None;
        }
        let a = self.next;
        self.next += b;
        Some(a)
    }

    /// A slice of `n` `T`s (contents arbitrary: callers initialise them).
    pub fn slice<T>(&mut self, n: usize) -> Option<&'static mut [T]> {
        let a = self.take((n * core::mem::size_of::<T>()) as u64)?;
        // SAFETY: fresh carved memory, never handed out twice, aligned to 64; T are plain data.
        Some(unsafe { core::slice::from_raw_parts_mut(a as *mut T, n) })
    }

    /// A [`PfnList`] of capacity `n`.
    pub fn list(&mut self, n: usize) -> Option<PfnList> {
        let a = self.take(n as u64 * 4)?;
        Some(PfnList {
            ptr: a as *mut u32,
            len: 0,
            cap: n,
        })
    }

    /// One past the carved area (page aligned).
    pub fn end(&self) -> u64 {
        (self.end + PAGE_SIZE - 1) & !(PAGE_SIZE - 1)
    }
}

/// One past the guest image (bss, stacks and page tables included).
pub fn image_end() -> u64 {
    // Linker-provided symbol; only its address is used.
    core::ptr::addr_of!(__image_end) as u64
}

/// Bytes of carve needed for allocator metadata covering PFNs `0..max_pfn` (~2 bits per page).
pub fn buddy_metadata_bytes(max_pfn: u64) -> u64 {
    Buddy::metadata_bytes(0, max_pfn as u32) as u64 + 256
}

/// Builds the allocator for PFNs `0..max_pfn` and frees every usable RAM page into it.
pub fn build_allocator(bi: &BootInfo, carve: &mut Carve, max_pfn: u64) -> Option<Buddy<'static>> {
    let bits: &'static mut [u64] = carve.slice(Buddy::metadata_words(0, max_pfn as u32))?;
    let mut b = Buddy::new(bits, 0, max_pfn as u32)?;
    let lo = image_end().max(1 << 20);
    let limit = max_pfn * PAGE_SIZE;
    let (cs, ce) = (carve.start & !(PAGE_SIZE - 1), carve.end());
    for (s, e) in bi.ram() {
        let (s, e) = (s.max(lo), e.min(limit));
        // RAM minus the carve: up to two pieces
        for (a, z) in [(s, e.min(cs)), (s.max(ce), e)] {
            if z > a {
                let _ = b.add_free_range((a / PAGE_SIZE) as u32, (z / PAGE_SIZE) as u32);
            }
        }
    }
    Some(b)
}

/// Word access to pages the caller owns, through the identity map (for [`guest_core::pfnstack`]).
pub struct OwnedPages;

impl PageWords for OwnedPages {
    fn read(&self, pfn: u32, i: usize) -> u32 {
        debug_assert!(i < 1024);
        // SAFETY: the caller owns page `pfn` (allocated from the buddy allocator, identity mapped).
        unsafe { ((pfn as u64 * PAGE_SIZE) as *const u32).add(i).read() }
    }

    fn write(&mut self, pfn: u32, i: usize, v: u32) {
        debug_assert!(i < 1024);
        // SAFETY: as above.
        unsafe { ((pfn as u64 * PAGE_SIZE) as *mut u32).add(i).write(v) }
    }
}

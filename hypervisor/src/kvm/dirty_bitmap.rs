//! KVM's dirty bitmap read into a buffer the VMM keeps, and re-armed only where it has bits.
//!
//! `KVM_GET_DIRTY_LOG` copies a slot's whole bitmap (one bit per 4 KiB page: 8 MiB for
//! 256 GiB). Classic mode also walks it and write-protects the dirty pages again; with
//! `KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2` the read is a plain copy and the VMM re-protects with
//! `KVM_CLEAR_DIRTY_LOG`, here only for the 1 GiB chunks that have dirty pages. Reusing the
//! caller's buffer spares a fresh 8 MiB allocation (and its page faults) on every sync.

use kvm_bindings::{kvm_clear_dirty_log, kvm_dirty_log};
use kvm_ioctls::VmFd;
use vmm_sys_util::ioctl::ioctl_with_ref;
use vmm_sys_util::{ioctl_iow_nr, ioctl_iowr_nr};

const KVMIO: u32 = 0xAE;
ioctl_iow_nr!(KVM_GET_DIRTY_LOG, KVMIO, 0x42, kvm_dirty_log);
ioctl_iowr_nr!(KVM_CLEAR_DIRTY_LOG, KVMIO, 0xc0, kvm_clear_dirty_log);

/// Pages re-armed by one `KVM_CLEAR_DIRTY_LOG` (1 GiB; a multiple of 64, as KVM wants).
pub(crate) const CLEAR_CHUNK_PAGES: u64 = 1 << 18;

/// Copies the dirty bitmap of `slot` into `bitmap`, which must hold at least one bit per page.
pub(crate) fn get(fd: &VmFd, slot: u32, bitmap: &mut [u64]) -> std::io::Result<()> {
    let mut arg = kvm_dirty_log {
        slot,
        ..Default::default()
    };
    arg.__bindgen_anon_1.dirty_bitmap = bitmap.as_mut_ptr().cast();
    // SAFETY: `arg` points at `bitmap`, which the caller sized for every page of the slot and
    // which outlives the call; KVM writes at most that many bits.
    let ret = unsafe { ioctl_with_ref(fd, KVM_GET_DIRTY_LOG(), &arg) };
    if ret < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Re-protects the pages set in `bitmap[first_page / 64 ..]`, `num_pages` of them.
pub(crate) fn clear(
    fd: &VmFd,
    slot: u32,
    first_page: u64,
    num_pages: u32,
    bitmap: &[u64],
) -> std::io::Result<()> {
    let mut arg = kvm_clear_dirty_log {
        slot,
        num_pages,
        first_page,
        ..Default::default()
    };
    arg.__bindgen_anon_1.dirty_bitmap = bitmap.as_ptr() as *mut libc::c_void;
    // SAFETY: `arg` points at `bitmap`, which holds at least `num_pages` bits (the callers
    // check) and outlives the call; the kernel only reads it.
    let ret = unsafe { ioctl_with_ref(fd, KVM_CLEAR_DIRTY_LOG(), &arg) };
    if ret < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// The chunks of a slot of `pages` pages that have a bit set in `bitmap`, as
/// `(first_page, num_pages)`: what to re-arm after a read in manual mode.
pub(crate) fn dirty_chunks(bitmap: &[u64], pages: u64) -> impl Iterator<Item = (u64, u32)> + '_ {
    let words_per_chunk = (CLEAR_CHUNK_PAGES / 64) as usize;
    bitmap
        .chunks(words_per_chunk)
        .enumerate()
        .filter(|(_, words)| words.iter().any(|&w| w != 0))
        .filter_map(move |(i, _)| {
            let first = i as u64 * CLEAR_CHUNK_PAGES;
            let n = CLEAR_CHUNK_PAGES.min(pages.checked_sub(first)?);
            Some((first, n as u32)).filter(|&(_, n)| n > 0)
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_chunks_with_bits_are_rearmed() {
        let words = (CLEAR_CHUNK_PAGES / 64) as usize;
        let pages = 3 * CLEAR_CHUNK_PAGES + 100;
        let mut bitmap = vec![0u64; (pages as usize).div_ceil(64)];
        assert_eq!(dirty_chunks(&bitmap, pages).count(), 0);
        bitmap[words - 1] = 1 << 63; // the last page of chunk 0
        bitmap[3 * words + 1] = 1; // in the short last chunk
        let chunks: Vec<_> = dirty_chunks(&bitmap, pages).collect();
        assert_eq!(
            chunks,
            vec![(0, CLEAR_CHUNK_PAGES as u32), (3 * CLEAR_CHUNK_PAGES, 100)]
        );
    }
}

//! A bump allocator for BAR addresses inside the VMM's 32-bit MMIO window.

use super::PciError;

/// Start of the 32-bit PCI MMIO window.
pub const MMIO32_WINDOW_START: u64 = 0xC000_0000;
/// Size of the 32-bit PCI MMIO window (512 MiB).
pub const MMIO32_WINDOW_SIZE: u64 = 0x2000_0000;
/// BARs are never placed closer than a page apart.
const MIN_BAR_ALIGN: u64 = 0x1000;

/// Hands out naturally aligned BAR addresses from a window, lowest first.
#[derive(Clone, Debug)]
pub struct BarAllocator {
    next: u64,
    end: u64,
}

impl Default for BarAllocator {
    /// The VMM's 32-bit window, 0xC000_0000..0xE000_0000.
    fn default() -> Self {
        Self::new(MMIO32_WINDOW_START, MMIO32_WINDOW_SIZE)
    }
}

impl BarAllocator {
    /// An allocator over `[start, start + size)`.
    pub fn new(start: u64, size: u64) -> Self {
        BarAllocator {
            next: start,
            end: start.saturating_add(size),
        }
    }

    /// Allocate `size` bytes (a power of two) aligned to `max(size, 4 KiB)`.
    pub fn allocate(&mut self, size: u64) -> Result<u64, PciError> {
        if !size.is_power_of_two() {
            return Err(PciError::InvalidBarSize(size));
        }
        let align = size.max(MIN_BAR_ALIGN);
        let base = self
            .next
            .checked_add(align - 1)
            .map(|v| v & !(align - 1))
            .ok_or(PciError::OutOfBarSpace(size))?;
        let end = base
            .checked_add(size.max(MIN_BAR_ALIGN))
            .filter(|end| *end <= self.end)
            .ok_or(PciError::OutOfBarSpace(size))?;
        self.next = end;
        Ok(base)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn natural_alignment_and_exhaustion() {
        let mut a = BarAllocator::default();
        assert_eq!(a.allocate(0x100).unwrap(), 0xC000_0000);
        assert_eq!(a.allocate(0x8000).unwrap(), 0xC000_8000);
        assert_eq!(a.allocate(0x1000).unwrap(), 0xC001_0000);
        assert_eq!(a.allocate(0x1000_0000).unwrap(), 0xD000_0000);
        assert_eq!(
            a.allocate(0x1000_0000),
            Err(PciError::OutOfBarSpace(0x1000_0000))
        );
        assert_eq!(a.allocate(0x3000), Err(PciError::InvalidBarSize(0x3000)));
        let mut b = BarAllocator::new(u64::MAX - 0x1000, 0x2000);
        assert!(b.allocate(0x1000).is_err());
    }
}

//! A 256-byte type-0 PCI configuration space with write masks, BARs and a capability list.

use super::{PciError, NUM_BARS, NUM_CONFIG_REGISTERS, PCI_STATUS_CAP_LIST};

const COMMAND_REG: usize = 1;
const BAR0_REG: usize = 4;
const CAP_POINTER_REG: usize = 13;
const INTERRUPT_REG: usize = 15;
const FIRST_CAP_OFFSET: usize = 0x40;
const CONFIG_SPACE_SIZE: usize = NUM_CONFIG_REGISTERS * 4;

/// Command bits a driver may change: I/O, memory, bus master, parity, SERR, INTx disable.
const COMMAND_WMASK: u32 = 0x0547;
/// Status bits that are write-one-to-clear (error bits), in the upper half of register 1.
const STATUS_W1C: u32 = 0xF900 << 16;

const BAR_MEM_ADDR_MASK: u32 = 0xFFFF_FFF0;
const BAR_IO_ADDR_MASK: u32 = 0xFFFF_FFFC;
const BAR_IO_BIT: u32 = 0x1;
const BAR_MEM64_BITS: u32 = 0x4;
const BAR_PREFETCH_BIT: u32 = 0x8;

/// The kind of a base address register.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PciBarKind {
    /// I/O space.
    Io,
    /// 32-bit memory space.
    Memory32,
    /// 64-bit memory space (uses two BAR registers).
    Memory64,
}

/// A BAR as seen from outside: where it is and how big it is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PciBarInfo {
    /// Index of the (first) BAR register.
    pub index: usize,
    /// Current base address (0 = unassigned).
    pub addr: u64,
    /// Size in bytes, a power of two.
    pub size: u64,
    /// Address space and width.
    pub kind: PciBarKind,
    /// Whether the BAR is marked prefetchable.
    pub prefetchable: bool,
}

#[derive(Clone, Copy, Debug)]
enum BarSlot {
    Bar {
        size: u64,
        kind: PciBarKind,
        prefetchable: bool,
    },
    /// The upper half of the 64-bit BAR below it.
    Upper,
}

/// Identity of a PCI function, written into the read-only header fields.
#[derive(Clone, Copy, Debug, Default)]
pub struct PciConfigurationParams {
    /// Vendor id.
    pub vendor_id: u16,
    /// Device id.
    pub device_id: u16,
    /// Revision id.
    pub revision_id: u8,
    /// Base class code.
    pub class_code: u8,
    /// Sub-class code.
    pub subclass: u8,
    /// Programming interface.
    pub prog_if: u8,
    /// Subsystem vendor id.
    pub subsystem_vendor_id: u16,
    /// Subsystem id.
    pub subsystem_id: u16,
}

/// The configuration space of one PCI function.
#[derive(Clone, Debug)]
pub struct PciConfiguration {
    regs: [u32; NUM_CONFIG_REGISTERS],
    wmask: [u32; NUM_CONFIG_REGISTERS],
    w1c: [u32; NUM_CONFIG_REGISTERS],
    bars: [Option<BarSlot>; NUM_BARS],
    last_cap: Option<usize>,
    next_cap: usize,
}

impl PciConfiguration {
    /// Create a type-0 configuration space with the given identity.
    pub fn new(params: &PciConfigurationParams) -> Self {
        let mut regs = [0u32; NUM_CONFIG_REGISTERS];
        let mut wmask = [0u32; NUM_CONFIG_REGISTERS];
        let mut w1c = [0u32; NUM_CONFIG_REGISTERS];
        regs[0] = u32::from(params.device_id) << 16 | u32::from(params.vendor_id);
        wmask[COMMAND_REG] = COMMAND_WMASK;
        w1c[COMMAND_REG] = STATUS_W1C;
        regs[2] = u32::from(params.class_code) << 24
            | u32::from(params.subclass) << 16
            | u32::from(params.prog_if) << 8
            | u32::from(params.revision_id);
        // Cache line size and latency timer are plain read/write bytes.
        wmask[3] = 0x0000_FFFF;
        regs[11] = u32::from(params.subsystem_id) << 16 | u32::from(params.subsystem_vendor_id);
        // Interrupt line is read/write; the pin is read-only (0 = no INTx until set).
        wmask[INTERRUPT_REG] = 0xFF;
        PciConfiguration {
            regs,
            wmask,
            w1c,
            bars: [None; NUM_BARS],
            last_cap: None,
            next_cap: FIRST_CAP_OFFSET,
        }
    }

    /// Read register `reg` (0..64); out of range reads all-ones.
    pub fn read_reg(&self, reg: usize) -> u32 {
        self.regs.get(reg).copied().unwrap_or(0xFFFF_FFFF)
    }

    /// Write `data` (1..=4 bytes) at byte `offset` of register `reg`, honouring the write
    /// masks and write-one-to-clear bits. Accesses that cross the register are ignored.
    pub fn write_reg(&mut self, reg: usize, offset: u64, data: &[u8]) {
        let Some((val, mask)) = merge_bytes(offset, data) else {
            return;
        };
        if reg >= NUM_CONFIG_REGISTERS {
            return;
        }
        let writable = self.wmask[reg] & mask;
        let clear = self.w1c[reg] & mask & val;
        self.regs[reg] = ((self.regs[reg] & !writable) | (val & writable)) & !clear;
    }

    /// Read `data.len()` bytes at configuration-space byte `offset` (device-internal view).
    pub fn read_bytes(&self, offset: usize, data: &mut [u8]) {
        for (i, b) in data.iter_mut().enumerate() {
            *b = self.byte(offset + i).unwrap_or(0xFF);
        }
    }

    /// Write bytes bypassing the write masks (device-internal updates of read-only fields).
    pub fn write_bytes_raw(&mut self, offset: usize, data: &[u8]) {
        for (i, b) in data.iter().enumerate() {
            let off = offset + i;
            if off < CONFIG_SPACE_SIZE {
                let shift = (off % 4) * 8;
                let reg = &mut self.regs[off / 4];
                *reg = (*reg & !(0xFF << shift)) | (u32::from(*b) << shift);
            }
        }
    }

    /// Make bits writable by the guest, byte by byte from `offset`.
    pub fn set_wmask_bytes(&mut self, offset: usize, mask: &[u8]) {
        for (i, m) in mask.iter().enumerate() {
            let off = offset + i;
            if off < CONFIG_SPACE_SIZE {
                let shift = (off % 4) * 8;
                let reg = &mut self.wmask[off / 4];
                *reg = (*reg & !(0xFF << shift)) | (u32::from(*m) << shift);
            }
        }
    }

    fn byte(&self, off: usize) -> Option<u8> {
        self.regs.get(off / 4).map(|r| (r >> ((off % 4) * 8)) as u8)
    }

    /// Read a little-endian u16 at byte `offset`.
    pub fn read_u16(&self, offset: usize) -> u16 {
        let mut b = [0u8; 2];
        self.read_bytes(offset, &mut b);
        u16::from_le_bytes(b)
    }

    /// Read a little-endian u32 at byte `offset`.
    pub fn read_u32(&self, offset: usize) -> u32 {
        let mut b = [0u8; 4];
        self.read_bytes(offset, &mut b);
        u32::from_le_bytes(b)
    }

    /// The command register.
    pub fn command(&self) -> u16 {
        self.regs[COMMAND_REG] as u16
    }

    /// The status register as stored (dynamic bits such as the interrupt status are the
    /// device's business).
    pub fn status(&self) -> u16 {
        (self.regs[COMMAND_REG] >> 16) as u16
    }

    /// Set the interrupt pin (1 = INTA#) and line reported to the guest.
    pub fn set_interrupt(&mut self, pin: u8, line: u8) {
        self.regs[INTERRUPT_REG] =
            (self.regs[INTERRUPT_REG] & 0xFFFF_0000) | u32::from(pin) << 8 | u32::from(line);
    }

    /// Declare a BAR. Its address starts unassigned (0).
    pub fn add_bar(
        &mut self,
        index: usize,
        size: u64,
        kind: PciBarKind,
        prefetchable: bool,
    ) -> Result<(), PciError> {
        let min = if kind == PciBarKind::Io { 4 } else { 16 };
        let max = if kind == PciBarKind::Memory64 {
            1 << 63
        } else {
            1 << 31
        };
        if !size.is_power_of_two() || size < min || size > max {
            return Err(PciError::InvalidBarSize(size));
        }
        let last = if kind == PciBarKind::Memory64 {
            index + 1
        } else {
            index
        };
        if last >= NUM_BARS {
            return Err(PciError::InvalidBarIndex(index));
        }
        if let Some(i) = (index..=last).find(|i| self.bars[*i].is_some()) {
            return Err(PciError::BarInUse(i));
        }
        let size_mask = !(size - 1);
        let reg = BAR0_REG + index;
        match kind {
            PciBarKind::Io => {
                self.regs[reg] = BAR_IO_BIT;
                self.wmask[reg] = size_mask as u32 & BAR_IO_ADDR_MASK;
            }
            PciBarKind::Memory32 | PciBarKind::Memory64 => {
                let mut bits = if prefetchable { BAR_PREFETCH_BIT } else { 0 };
                if kind == PciBarKind::Memory64 {
                    bits |= BAR_MEM64_BITS;
                    self.wmask[reg + 1] = (size_mask >> 32) as u32;
                    self.bars[index + 1] = Some(BarSlot::Upper);
                }
                self.regs[reg] = bits;
                self.wmask[reg] = size_mask as u32 & BAR_MEM_ADDR_MASK;
            }
        }
        self.bars[index] = Some(BarSlot::Bar {
            size,
            kind,
            prefetchable,
        });
        Ok(())
    }

    fn bar_slot(&self, index: usize) -> Result<(u64, PciBarKind, bool), PciError> {
        match self.bars.get(index) {
            Some(Some(BarSlot::Bar {
                size,
                kind,
                prefetchable,
            })) => Ok((*size, *kind, *prefetchable)),
            Some(_) => Err(PciError::NoSuchBar(index)),
            None => Err(PciError::InvalidBarIndex(index)),
        }
    }

    /// Current address of BAR `index` as programmed (0 = unassigned).
    pub fn bar_address(&self, index: usize) -> Result<u64, PciError> {
        let (_, kind, _) = self.bar_slot(index)?;
        let reg = BAR0_REG + index;
        Ok(match kind {
            PciBarKind::Io => u64::from(self.regs[reg] & BAR_IO_ADDR_MASK),
            PciBarKind::Memory32 => u64::from(self.regs[reg] & BAR_MEM_ADDR_MASK),
            PciBarKind::Memory64 => {
                u64::from(self.regs[reg] & BAR_MEM_ADDR_MASK) | u64::from(self.regs[reg + 1]) << 32
            }
        })
    }

    /// Program BAR `index` with `addr`, which must be aligned to the BAR's size.
    pub fn set_bar_address(&mut self, index: usize, addr: u64) -> Result<(), PciError> {
        let (size, kind, _) = self.bar_slot(index)?;
        let fits = match kind {
            PciBarKind::Memory64 => addr.checked_add(size).is_some(),
            _ => addr.checked_add(size).is_some_and(|end| end <= 1 << 32),
        };
        if addr & (size - 1) != 0 || !fits {
            return Err(PciError::InvalidBarAddress { index, addr });
        }
        let reg = BAR0_REG + index;
        let type_mask = if kind == PciBarKind::Io { 0x3 } else { 0xF };
        self.regs[reg] = (self.regs[reg] & type_mask) | (addr as u32 & !type_mask);
        if kind == PciBarKind::Memory64 {
            self.regs[reg + 1] = (addr >> 32) as u32;
        }
        Ok(())
    }

    /// All declared BARs with their current addresses.
    pub fn bars(&self) -> Vec<PciBarInfo> {
        (0..NUM_BARS)
            .filter_map(|index| {
                let (size, kind, prefetchable) = self.bar_slot(index).ok()?;
                let addr = self.bar_address(index).ok()?;
                Some(PciBarInfo {
                    index,
                    addr,
                    size,
                    kind,
                    prefetchable,
                })
            })
            .collect()
    }

    /// Append a capability. `body[0]` is the capability id; `body[1]` (next pointer) is filled
    /// in. Returns the capability's offset in configuration space. The capability is read-only
    /// until bits are opened with [`PciConfiguration::set_wmask_bytes`].
    pub fn add_capability(&mut self, body: &[u8]) -> Result<usize, PciError> {
        if body.len() < 2 {
            return Err(PciError::CapabilityTooShort(body.len()));
        }
        let offset = self.next_cap;
        let end = offset
            .checked_add(body.len())
            .filter(|end| *end <= CONFIG_SPACE_SIZE)
            .ok_or(PciError::CapabilitySpace(body.len()))?;
        self.write_bytes_raw(offset, body);
        self.write_bytes_raw(offset + 1, &[0]);
        match self.last_cap {
            Some(prev) => self.write_bytes_raw(prev + 1, &[offset as u8]),
            None => self.write_bytes_raw(CAP_POINTER_REG * 4, &[offset as u8]),
        }
        self.regs[COMMAND_REG] |= u32::from(PCI_STATUS_CAP_LIST) << 16;
        self.last_cap = Some(offset);
        self.next_cap = (end + 3) & !3;
        Ok(offset)
    }

    /// A copy of all 64 registers (for migration).
    pub fn registers(&self) -> Vec<u32> {
        self.regs.to_vec()
    }

    /// Load saved registers. Every bit the guest cannot write must match this configuration
    /// (same device, same capabilities, same BAR layout), otherwise the state is refused.
    pub fn restore_registers(&mut self, regs: &[u32]) -> Result<(), PciError> {
        if regs.len() != NUM_CONFIG_REGISTERS {
            return Err(PciError::InvalidState(format!(
                "{} configuration registers",
                regs.len()
            )));
        }
        for (i, saved) in regs.iter().enumerate() {
            let fixed = !(self.wmask[i] | self.w1c[i]);
            if (saved ^ self.regs[i]) & fixed != 0 {
                return Err(PciError::InvalidState(format!(
                    "read-only bits of configuration register {i} differ"
                )));
            }
        }
        self.regs.copy_from_slice(regs);
        Ok(())
    }
}

/// Turn a 1..=4 byte access at `offset` of a register into (value, byte mask), or `None` when
/// the access does not fit in the register.
pub(crate) fn merge_bytes(offset: u64, data: &[u8]) -> Option<(u32, u32)> {
    let offset = usize::try_from(offset).ok()?;
    if data.is_empty() || offset.checked_add(data.len())? > 4 {
        return None;
    }
    let mut val = 0u32;
    let mut mask = 0u32;
    for (i, b) in data.iter().enumerate() {
        let shift = (offset + i) * 8;
        val |= u32::from(*b) << shift;
        mask |= 0xFF << shift;
    }
    Some((val, mask))
}

/// Little-endian value of an access of up to 8 bytes (extra bytes are ignored).
pub(crate) fn merge_bytes_le(data: &[u8]) -> u64 {
    data.iter()
        .take(8)
        .enumerate()
        .fold(0u64, |v, (i, b)| v | u64::from(*b) << (i * 8))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pci::{PCI_CAP_ID_MSIX, PCI_CAP_ID_VENDOR};

    fn config() -> PciConfiguration {
        PciConfiguration::new(&PciConfigurationParams {
            vendor_id: 0x1AF4,
            device_id: 0x1045,
            revision_id: 1,
            class_code: 0x05,
            subclass: 0x80,
            ..Default::default()
        })
    }

    #[test]
    fn identity_is_read_only() {
        let mut c = config();
        assert_eq!(c.read_reg(0), 0x1045_1AF4);
        c.write_reg(0, 0, &[0xFF, 0xFF, 0xFF, 0xFF]);
        assert_eq!(c.read_reg(0), 0x1045_1AF4);
        assert_eq!(c.read_reg(2) >> 8, 0x0005_8000);
        assert_eq!(c.read_reg(64), 0xFFFF_FFFF);
    }

    #[test]
    fn command_register_mask() {
        let mut c = config();
        c.write_reg(1, 0, &[0xFF, 0xFF]);
        assert_eq!(c.command(), 0x0547);
        // A write that crosses the register is ignored.
        c.write_reg(1, 3, &[0, 0]);
        assert_eq!(c.command(), 0x0547);
    }

    #[test]
    fn bar32_sizing_and_assignment() {
        let mut c = config();
        c.add_bar(0, 0x8000, PciBarKind::Memory32, false).unwrap();
        c.write_reg(4, 0, &0xFFFF_FFFFu32.to_le_bytes());
        assert_eq!(c.read_reg(4), 0xFFFF_8000);
        c.write_reg(4, 0, &0xC000_0000u32.to_le_bytes());
        assert_eq!(c.bar_address(0).unwrap(), 0xC000_0000);
        assert_eq!(c.bars()[0].size, 0x8000);
        assert!(c.set_bar_address(0, 0xC000_1000).is_err());
        c.set_bar_address(0, 0xD000_0000).unwrap();
        assert_eq!(c.read_reg(4), 0xD000_0000);
    }

    #[test]
    fn bar64_and_io_sizing() {
        let mut c = config();
        c.add_bar(2, 0x1_0000_0000, PciBarKind::Memory64, true)
            .unwrap();
        assert_eq!(
            c.add_bar(3, 16, PciBarKind::Memory32, false),
            Err(PciError::BarInUse(3))
        );
        assert_eq!(
            c.add_bar(5, 16, PciBarKind::Memory64, false),
            Err(PciError::InvalidBarIndex(5))
        );
        c.write_reg(6, 0, &[0xFF; 4]);
        c.write_reg(7, 0, &[0xFF; 4]);
        assert_eq!(c.read_reg(6), 0x0000_000C);
        assert_eq!(c.read_reg(7), 0xFFFF_FFFF);
        c.set_bar_address(2, 0x40_0000_0000).unwrap();
        assert_eq!(c.bar_address(2).unwrap(), 0x40_0000_0000);

        c.add_bar(0, 0x20, PciBarKind::Io, false).unwrap();
        c.write_reg(4, 0, &[0xFF; 4]);
        assert_eq!(c.read_reg(4), 0xFFFF_FFE1);
        assert_eq!(
            c.add_bar(1, 24, PciBarKind::Memory32, false),
            Err(PciError::InvalidBarSize(24))
        );
        assert_eq!(c.bars().len(), 2);
    }

    #[test]
    fn capability_chain_walk() {
        let mut c = config();
        let a = c.add_capability(&[PCI_CAP_ID_VENDOR, 0, 5, 1, 2]).unwrap();
        let b = c
            .add_capability(&[PCI_CAP_ID_MSIX, 0xEE, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0])
            .unwrap();
        assert_eq!(c.status() & PCI_STATUS_CAP_LIST, PCI_STATUS_CAP_LIST);
        let mut ids = Vec::new();
        let mut ptr = c.read_reg(CAP_POINTER_REG) as u8 as usize;
        while ptr != 0 {
            let mut hdr = [0u8; 2];
            c.read_bytes(ptr, &mut hdr);
            ids.push((ptr, hdr[0]));
            ptr = usize::from(hdr[1]);
        }
        assert_eq!(ids, vec![(a, PCI_CAP_ID_VENDOR), (b, PCI_CAP_ID_MSIX)]);
        assert_eq!(a, 0x40);
        assert_eq!(b, 0x48);
        // Capabilities are read-only unless opened.
        c.write_reg(b / 4, 2, &[0xFF, 0xFF]);
        assert_eq!(c.read_u16(b + 2), 0);
        c.set_wmask_bytes(b + 3, &[0xC0]);
        c.write_reg(b / 4, 2, &[0xFF, 0xFF]);
        assert_eq!(c.read_u16(b + 2), 0xC000);
        assert!(c.add_capability(&[0u8; 200]).is_err());
    }

    #[test]
    fn restore_checks_read_only_bits() {
        let mut c = config();
        c.add_bar(0, 0x1000, PciBarKind::Memory32, false).unwrap();
        c.set_bar_address(0, 0xC000_0000).unwrap();
        let regs = c.registers();
        let mut fresh = config();
        fresh
            .add_bar(0, 0x1000, PciBarKind::Memory32, false)
            .unwrap();
        fresh.restore_registers(&regs).unwrap();
        assert_eq!(fresh.bar_address(0).unwrap(), 0xC000_0000);
        let mut bad = regs.clone();
        bad[0] = 0x1234_5678;
        assert!(fresh.restore_registers(&bad).is_err());
        assert!(fresh.restore_registers(&regs[..10]).is_err());
    }
}

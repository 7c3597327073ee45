//! The conf1 configuration mechanism: an address register at port 0xCF8 and a data window at
//! 0xCFC..0xCFF.
//!
//! ```text
//!  0xCF8 (32-bit):  31 enable | 23..16 bus | 15..11 device | 10..8 function | 7..2 register
//!  0xCFC + n:       bytes n.. of the selected register (1, 2 or 4 byte accesses)
//! ```

use std::sync::{Arc, Mutex};

use super::bus::{BarReprogram, PciBus};
use crate::sync::lock;

/// First port of the conf1 mechanism.
pub const PCI_CONFIG_IO_PORT: u16 = 0xCF8;
/// Number of ports (address register and data window).
pub const PCI_CONFIG_IO_PORT_SIZE: u16 = 8;
const ENABLE_BIT: u32 = 0x8000_0000;

/// Port I/O front end of the PCI bus.
#[derive(Debug)]
pub struct PciConfigIo {
    bus: Arc<PciBus>,
    address: Mutex<u32>,
}

struct Target {
    bus: u8,
    device: u8,
    function: u8,
    reg: usize,
}

impl PciConfigIo {
    /// Decode conf1 accesses for `bus`.
    pub fn new(bus: Arc<PciBus>) -> Self {
        PciConfigIo {
            bus,
            address: Mutex::new(0),
        }
    }

    /// The bus behind this mechanism.
    pub fn bus(&self) -> &Arc<PciBus> {
        &self.bus
    }

    fn target(&self) -> Option<Target> {
        let addr = *lock(&self.address);
        (addr & ENABLE_BIT != 0).then_some(Target {
            bus: (addr >> 16) as u8,
            device: ((addr >> 11) & 0x1F) as u8,
            function: ((addr >> 8) & 0x7) as u8,
            reg: ((addr >> 2) & 0x3F) as usize,
        })
    }

    /// Port read at `offset` from 0xCF8 (0..8). Anything not decoded reads all-ones.
    pub fn read(&self, offset: u64, data: &mut [u8]) {
        data.fill(0xFF);
        match offset {
            0 if data.len() == 4 => data.copy_from_slice(&lock(&self.address).to_le_bytes()),
            4..=7 => {
                let byte = (offset - 4) as usize;
                if data.is_empty() || byte + data.len() > 4 {
                    return;
                }
                let Some(t) = self.target() else {
                    return;
                };
                let value = self
                    .bus
                    .config_read(t.bus, t.device, t.function, t.reg)
                    .to_le_bytes();
                data.copy_from_slice(&value[byte..byte + data.len()]);
            }
            _ => {}
        }
    }

    /// Port write at `offset` from 0xCF8 (0..8). Returns the BARs the write moved, so the VMM
    /// can move the matching ioeventfds.
    pub fn write(&self, offset: u64, data: &[u8]) -> Vec<BarReprogram> {
        match offset {
            0 if data.len() == 4 => {
                let v = u32::from_le_bytes([data[0], data[1], data[2], data[3]]);
                // Bits 1..0 and 30..24 are reserved.
                *lock(&self.address) = v & 0x80FF_FFFC;
                Vec::new()
            }
            4..=7 => {
                let byte = offset - 4;
                match self.target() {
                    Some(t) if !data.is_empty() && byte as usize + data.len() <= 4 => self
                        .bus
                        .config_write(t.bus, t.device, t.function, t.reg, byte, data),
                    _ => Vec::new(),
                }
            }
            _ => Vec::new(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pci::{
        BarAllocator, PciBarInfo, PciBarKind, PciConfiguration, PciConfigurationParams, PciDevice,
        PciError,
    };

    struct Dummy {
        config: PciConfiguration,
        mem: Vec<u8>,
    }

    impl Dummy {
        fn new(bar_size: u64) -> Self {
            let mut config = PciConfiguration::new(&PciConfigurationParams {
                vendor_id: 0x1234,
                device_id: 0x5678,
                class_code: 0xFF,
                ..Default::default()
            });
            config
                .add_bar(0, bar_size, PciBarKind::Memory32, false)
                .unwrap();
            Dummy {
                config,
                mem: vec![0; bar_size as usize],
            }
        }
    }

    impl PciDevice for Dummy {
        fn read_config_register(&mut self, reg: usize) -> u32 {
            self.config.read_reg(reg)
        }
        fn write_config_register(&mut self, reg: usize, offset: u64, data: &[u8]) {
            self.config.write_reg(reg, offset, data)
        }
        fn bars(&self) -> Vec<PciBarInfo> {
            self.config.bars()
        }
        fn set_bar_address(&mut self, index: usize, addr: u64) -> Result<(), PciError> {
            self.config.set_bar_address(index, addr)
        }
        fn read_bar(&mut self, _index: usize, offset: u64, data: &mut [u8]) {
            let o = offset as usize;
            data.copy_from_slice(&self.mem[o..o + data.len()]);
        }
        fn write_bar(&mut self, _index: usize, offset: u64, data: &[u8]) {
            let o = offset as usize;
            self.mem[o..o + data.len()].copy_from_slice(data);
        }
    }

    fn setup() -> (PciConfigIo, u8) {
        let bus = Arc::new(PciBus::new());
        let mut alloc = BarAllocator::default();
        let slot = bus
            .add_device(Arc::new(Mutex::new(Dummy::new(0x2000))), &mut alloc)
            .unwrap();
        (PciConfigIo::new(bus), slot)
    }

    fn select(io: &PciConfigIo, bus: u32, dev: u32, func: u32, reg_byte: u32) {
        let addr = 0x8000_0000 | bus << 16 | dev << 11 | func << 8 | reg_byte;
        io.write(0, &addr.to_le_bytes());
    }

    fn read32(io: &PciConfigIo) -> u32 {
        let mut b = [0u8; 4];
        io.read(4, &mut b);
        u32::from_le_bytes(b)
    }

    #[test]
    fn address_register_latches_dword_writes_only() {
        let (io, _) = setup();
        select(&io, 0, 1, 0, 0x10);
        let mut b = [0u8; 4];
        io.read(0, &mut b);
        assert_eq!(u32::from_le_bytes(b), 0x8000_0810);
        io.write(0, &[0xAA]);
        io.read(0, &mut b);
        assert_eq!(u32::from_le_bytes(b), 0x8000_0810);
        let mut one = [0u8; 1];
        io.read(1, &mut one);
        assert_eq!(one, [0xFF]);
    }

    #[test]
    fn host_bridge_and_device_ids() {
        let (io, slot) = setup();
        assert_eq!(slot, 1);
        select(&io, 0, 0, 0, 0);
        assert_eq!(read32(&io), 0x0D57_8086);
        select(&io, 0, 0, 0, 8);
        assert_eq!(read32(&io) >> 16, 0x0600);
        select(&io, 0, 1, 0, 0);
        assert_eq!(read32(&io), 0x5678_1234);
    }

    #[test]
    fn partial_and_unaligned_accesses() {
        let (io, _) = setup();
        select(&io, 0, 1, 0, 0);
        let mut w = [0u8; 2];
        io.read(6, &mut w);
        assert_eq!(u16::from_le_bytes(w), 0x5678);
        let mut b = [0u8; 1];
        io.read(5, &mut b);
        assert_eq!(b, [0x12]);
        // A 2-byte access at 0xCFF would cross the register: all-ones.
        io.read(7, &mut w);
        assert_eq!(w, [0xFF, 0xFF]);
        let mut d = [0u8; 4];
        io.read(5, &mut d);
        assert_eq!(d, [0xFF; 4]);
        // Byte write to the command register through 0xCFC.
        select(&io, 0, 1, 0, 4);
        io.write(4, &[0x06]);
        assert_eq!(read32(&io) & 0xFFFF, 0x6);
        // Interrupt line (byte 0 of register 15) through 0xCFC, read back through 0xCFC.
        select(&io, 0, 1, 0, 0x3C);
        io.write(4, &[0x0B]);
        io.read(4, &mut b);
        assert_eq!(b, [0x0B]);
    }

    #[test]
    fn absent_devices_read_all_ones() {
        let (io, _) = setup();
        for (bus, dev, func) in [(0, 7, 0), (1, 0, 0), (0, 1, 1), (0, 31, 7)] {
            select(&io, bus, dev, func, 0);
            assert_eq!(read32(&io), 0xFFFF_FFFF, "{bus}:{dev}.{func}");
            io.write(4, &[0; 4]);
        }
        // Enable bit clear: not a configuration cycle.
        io.write(0, &0x0000_0800u32.to_le_bytes());
        assert_eq!(read32(&io), 0xFFFF_FFFF);
    }

    #[test]
    fn bar_sizing_through_config_cycles_and_mmio() {
        let (io, _) = setup();
        let bus = io.bus().clone();
        select(&io, 0, 1, 0, 0x10);
        let assigned = read32(&io);
        assert_eq!(assigned, 0xC000_0000);
        assert!(bus.mmio_write(0xC000_0010, &[1, 2, 3, 4]));
        let mut d = [0u8; 4];
        assert!(bus.mmio_read(0xC000_0010, &mut d));
        assert_eq!(d, [1, 2, 3, 4]);

        let moves = io.write(4, &[0xFF; 4]);
        assert_eq!(read32(&io), 0xFFFF_E000);
        assert_eq!(moves.len(), 1);
        assert_eq!(moves[0].new_addr, 0, "probe value is not decoded");
        assert!(!bus.mmio_read(0xC000_0010, &mut d));

        let moves = io.write(4, &0xD000_0000u32.to_le_bytes());
        assert_eq!(
            moves,
            vec![BarReprogram {
                slot: 1,
                bar_index: 0,
                old_addr: 0,
                new_addr: 0xD000_0000,
                size: 0x2000
            }]
        );
        assert!(bus.mmio_read(0xD000_0010, &mut d));
        assert_eq!(d, [1, 2, 3, 4]);
        assert!(!bus.mmio_read(0xD000_2000, &mut d));
    }

    #[test]
    fn slots_fill_up() {
        let bus = PciBus::new();
        let mut alloc = BarAllocator::default();
        for _ in 1..32 {
            bus.add_device(Arc::new(Mutex::new(Dummy::new(0x1000))), &mut alloc)
                .unwrap();
        }
        assert_eq!(
            bus.add_device(Arc::new(Mutex::new(Dummy::new(0x1000))), &mut alloc),
            Err(PciError::NoFreeSlot)
        );
        assert!(bus.device(31).is_some());
    }
}

//! A minimal conventional PCI subsystem: type-0 configuration space, MSI-X, a single bus with a
//! host bridge, the conf1 (0xCF8/0xCFC) access mechanism and a BAR allocator.

mod allocator;
mod bus;
mod config_io;
mod configuration;
mod msix;

pub use allocator::{BarAllocator, MMIO32_WINDOW_SIZE, MMIO32_WINDOW_START};
pub use bus::{BarReprogram, PciBus, PciDevice, PciHostBridge, PciIoEvent, SharedPciDevice};
pub use config_io::{PciConfigIo, PCI_CONFIG_IO_PORT, PCI_CONFIG_IO_PORT_SIZE};
pub(crate) use configuration::merge_bytes_le;
pub use configuration::{PciBarInfo, PciBarKind, PciConfiguration, PciConfigurationParams};
pub use msix::{
    MsixConfig, MsixState, MsixTableEntry, MsixTrigger, MSIX_CTL_ENABLE, MSIX_CTL_FUNCTION_MASK,
};

use thiserror::Error;

/// Number of 32-bit registers in a type-0 configuration space.
pub const NUM_CONFIG_REGISTERS: usize = 64;
/// Number of BAR registers in a type-0 header.
pub const NUM_BARS: usize = 6;
/// Number of device slots on a bus.
pub const NUM_SLOTS: u8 = 32;

/// Capability id of MSI-X.
pub const PCI_CAP_ID_MSIX: u8 = 0x11;
/// Capability id of a vendor-specific capability (used by virtio).
pub const PCI_CAP_ID_VENDOR: u8 = 0x09;

/// Command register bit: respond to I/O space accesses.
pub const PCI_COMMAND_IO: u16 = 0x1;
/// Command register bit: respond to memory space accesses.
pub const PCI_COMMAND_MEMORY: u16 = 0x2;
/// Command register bit: the device may master the bus (DMA, MSI).
pub const PCI_COMMAND_MASTER: u16 = 0x4;
/// Command register bit: INTx is disabled.
pub const PCI_COMMAND_INTX_DISABLE: u16 = 0x400;
/// Status register bit: INTx is asserted.
pub const PCI_STATUS_INTERRUPT: u16 = 0x8;
/// Status register bit: the capability list is valid.
pub const PCI_STATUS_CAP_LIST: u16 = 0x10;

/// Errors of the PCI subsystem.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum PciError {
    /// BAR index out of range, or the second half of a 64-bit BAR is not free.
    #[error("Invalid BAR index {0}")]
    InvalidBarIndex(usize),
    /// The BAR is already in use.
    #[error("BAR {0} is already in use")]
    BarInUse(usize),
    /// BAR sizes are powers of two, at least 16 bytes (4 for I/O).
    #[error("Invalid BAR size {0:#x}")]
    InvalidBarSize(u64),
    /// The BAR does not exist.
    #[error("BAR {0} is not present")]
    NoSuchBar(usize),
    /// A BAR address must be aligned to its size and fit its width.
    #[error("Invalid address {addr:#x} for BAR {index}")]
    InvalidBarAddress {
        /// The BAR index.
        index: usize,
        /// The rejected address.
        addr: u64,
    },
    /// The capability does not fit in the 256-byte configuration space.
    #[error("No room for a capability of {0} bytes")]
    CapabilitySpace(usize),
    /// A capability must hold at least its id and next pointer.
    #[error("Capability of {0} bytes is too short")]
    CapabilityTooShort(usize),
    /// All 32 slots of the bus are taken.
    #[error("No free PCI slot")]
    NoFreeSlot,
    /// The requested slot is taken or out of range.
    #[error("PCI slot {0} is not available")]
    SlotUnavailable(u8),
    /// The BAR window has no room left.
    #[error("No room for a BAR of {0:#x} bytes")]
    OutOfBarSpace(u64),
    /// More MSI-X vectors were asked for than the table or the VMM supports.
    #[error("Invalid number of MSI-X vectors: {0}")]
    InvalidMsixVectors(usize),
    /// A saved state does not fit this device.
    #[error("Invalid PCI state: {0}")]
    InvalidState(String),
}

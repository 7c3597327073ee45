//! The modern (virtio 1.0+) virtio-pci transport.
//!
//! Everything lives in one 32-bit memory BAR (BAR 0):
//!
//! ```text
//!  0x0000  common configuration (0x38 bytes)        cfg_type 1
//!  0x1000  ISR status (1 byte, read clears)          cfg_type 3
//!  0x2000  device configuration                      cfg_type 4
//!  0x3000  notifications: queue n at 0x3000 + 4n     cfg_type 2, notify_off_multiplier 4
//!  0x4000  MSI-X table (config vector + one per queue)
//!  0x5000  MSI-X pending bit array
//! ```
//!
//! A PCI configuration access capability (cfg_type 5) gives access to the BAR through
//! configuration space.

mod activation;
mod common_config;
mod device;
mod interrupt;
mod state;
#[cfg(test)]
mod tests;

pub use activation::{error_line, ActivationError, ActivationReport};
pub use device::VirtioPciDevice;
pub use state::{CommonConfigState, QueueSnapshot, VirtioPciState};

use thiserror::Error;

use crate::pci::PciError;
use crate::virtio::VirtioDeviceError;

/// PCI vendor id of virtio devices.
pub const VIRTIO_PCI_VENDOR_ID: u16 = 0x1AF4;
/// Modern virtio devices have device id 0x1040 + device type.
pub const VIRTIO_PCI_DEVICE_ID_BASE: u16 = 0x1040;
/// Subsystem id reported by our devices.
pub const VIRTIO_PCI_SUBSYSTEM_ID: u16 = 0x1100;
/// "No MSI-X vector" in `msix_config` and `queue_msix_vector`.
pub const VIRTIO_MSI_NO_VECTOR: u16 = 0xFFFF;

/// ISR bit: a queue was used.
pub const VIRTIO_PCI_ISR_QUEUE: u8 = 0x1;
/// ISR bit: the device configuration changed.
pub const VIRTIO_PCI_ISR_CONFIG: u8 = 0x2;

/// Virtio capability type: common configuration.
pub const VIRTIO_PCI_CAP_COMMON_CFG: u8 = 1;
/// Virtio capability type: notifications.
pub const VIRTIO_PCI_CAP_NOTIFY_CFG: u8 = 2;
/// Virtio capability type: ISR status.
pub const VIRTIO_PCI_CAP_ISR_CFG: u8 = 3;
/// Virtio capability type: device-specific configuration.
pub const VIRTIO_PCI_CAP_DEVICE_CFG: u8 = 4;
/// Virtio capability type: PCI configuration access.
pub const VIRTIO_PCI_CAP_PCI_CFG: u8 = 5;

/// Size of BAR 0.
pub const BAR_SIZE: u64 = 0x8000;
/// Offset of the common configuration in BAR 0.
pub const COMMON_CFG_OFFSET: u64 = 0x0000;
/// Size of the common configuration structure.
pub const COMMON_CFG_SIZE: u64 = 0x38;
/// Offset of the ISR status byte in BAR 0.
pub const ISR_CFG_OFFSET: u64 = 0x1000;
/// Size of the ISR region.
pub const ISR_CFG_SIZE: u64 = 1;
/// Offset of the device configuration in BAR 0.
pub const DEVICE_CFG_OFFSET: u64 = 0x2000;
/// Size of the device configuration window.
pub const DEVICE_CFG_SIZE: u64 = 0x1000;
/// Offset of the notification area in BAR 0.
pub const NOTIFY_CFG_OFFSET: u64 = 0x3000;
/// Size of the notification area (up to 1024 queues).
pub const NOTIFY_CFG_SIZE: u64 = 0x1000;
/// Bytes between two queues' notification addresses.
pub const NOTIFY_OFF_MULTIPLIER: u32 = 4;
/// Offset of the MSI-X table in BAR 0.
pub const MSIX_TABLE_OFFSET: u64 = 0x4000;
/// Offset of the MSI-X pending bit array in BAR 0.
pub const MSIX_PBA_OFFSET: u64 = 0x5000;
/// Most MSI-X vectors a transport uses (the table fits in one page).
pub const MAX_MSIX_VECTORS: usize = 256;

/// Errors of the virtio-pci transport.
#[derive(Debug, Error)]
pub enum VirtioPciError {
    /// Setting up the PCI side (BAR, capabilities, MSI-X) failed.
    #[error("PCI setup failed")]
    Pci(#[source] PciError),
    /// Creating a queue or its event failed.
    #[error("Failed to create queue {0}")]
    Queue(u16),
    /// Creating a notification event failed.
    #[error("Failed to create a queue notification event")]
    EventFd(#[source] std::io::Error),
    /// The device offers more queues than the notification area holds.
    #[error("Too many queues: {0}")]
    TooManyQueues(usize),
    /// A saved state does not fit this device.
    #[error("Invalid virtio-pci state: {0}")]
    InvalidState(String),
    /// The saved PCI state does not fit this device.
    #[error("Invalid saved PCI state")]
    InvalidPciState(#[source] PciError),
    /// The saved device state does not fit this device.
    #[error("Invalid saved device state")]
    InvalidDeviceState(#[source] VirtioDeviceError),
    /// The device refused to start with the restored queues.
    #[error("Failed to activate the restored device")]
    Activate(#[source] VirtioDeviceError),
}

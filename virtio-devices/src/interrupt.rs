//! The interrupt boundary between this crate and the VMM.
//!
//! The VMM implements [`MsiVectors`] (irqfds plus KVM MSI routing) and optionally [`IntxLine`];
//! the virtio-pci transport implements [`VirtioInterrupt`] on top of them for the devices.

use thiserror::Error;

/// Errors raised while delivering or routing an interrupt.
#[derive(Debug, Error)]
pub enum InterruptError {
    /// The vector does not exist.
    #[error("Interrupt vector {0} is out of range")]
    InvalidVector(u16),
    /// The queue index has no interrupt.
    #[error("Queue {0} has no interrupt")]
    InvalidQueue(u16),
    /// Writing the irqfd (or whatever the VMM uses) failed.
    #[error("Failed to signal the interrupt")]
    Signal(#[source] std::io::Error),
    /// Programming the interrupt route failed.
    #[error("Failed to update the interrupt route of vector {vector}")]
    Route {
        /// The vector whose route was being updated.
        vector: u16,
        /// What went wrong.
        #[source]
        source: std::io::Error,
    },
}

/// One MSI message as programmed by the guest in an MSI-X table entry.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MsiMessage {
    /// Message address (low and high dwords combined).
    pub address: u64,
    /// Message data.
    pub data: u32,
}

/// A device's set of MSI vectors, implemented by the VMM (irqfd + KVM GSI routing).
pub trait MsiVectors: Send + Sync {
    /// Number of vectors available; the MSI-X table never has more entries than this.
    fn len(&self) -> usize;

    /// Whether there are no vectors at all.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Route `vector` to `msg`, or remove its route when `msg` is `None` (MSI-X disabled).
    fn set_route(&self, vector: u16, msg: Option<MsiMessage>) -> Result<(), InterruptError>;

    /// Deliver `vector` through its current route.
    fn trigger(&self, vector: u16) -> Result<(), InterruptError>;
}

/// A legacy INTx line, used when the guest has not enabled MSI-X.
pub trait IntxLine: Send + Sync {
    /// Assert the line (edge-triggered through an irqfd).
    fn trigger(&self) -> Result<(), InterruptError>;
}

/// What a virtio device wants to tell the driver.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VirtioInterruptType {
    /// The device configuration space changed.
    Config,
    /// Buffers were used on the queue with this index.
    Queue(u16),
}

/// How a device raises interrupts; the transport implements it.
pub trait VirtioInterrupt: Send + Sync {
    /// Raise an interrupt of the given type.
    fn trigger(&self, int_type: VirtioInterruptType) -> Result<(), InterruptError>;

    /// Tell the driver the device hit an unrecoverable error (sets `DEVICE_NEEDS_RESET` and
    /// raises a configuration interrupt).
    fn signal_needs_reset(&self) {}
}

//! The transport-independent virtio device interface.

use std::fmt::Debug;
use std::sync::{Arc, Mutex};

use serde::de::DeserializeOwned;
use serde::Serialize;
use thiserror::Error;
use virtio_queue::Queue;
use vmm_sys_util::eventfd::EventFd;

use crate::interrupt::VirtioInterrupt;
use crate::GuestMemoryMmap;

/// Feature bit: the device complies with virtio 1.0 or later (modern).
pub const VIRTIO_F_VERSION_1: u32 = 32;
/// Feature bit: the driver may use `used_event`/`avail_event`.
pub const VIRTIO_F_RING_EVENT_IDX: u32 = 29;

/// Device status bit: the guest noticed the device.
pub const DEVICE_ACKNOWLEDGE: u8 = 1;
/// Device status bit: the guest knows how to drive the device.
pub const DEVICE_DRIVER: u8 = 2;
/// Device status bit: the driver is ready.
pub const DEVICE_DRIVER_OK: u8 = 4;
/// Device status bit: feature negotiation is complete.
pub const DEVICE_FEATURES_OK: u8 = 8;
/// Device status bit: the device hit an error it cannot recover from.
pub const DEVICE_NEEDS_RESET: u8 = 64;
/// Device status bit: the driver gave up on the device.
pub const DEVICE_FAILED: u8 = 128;

/// Device type of the memory balloon.
pub const VIRTIO_ID_BALLOON: u32 = 5;

/// A queue shared between the transport (configuration, migration state) and the device worker
/// (processing). The worker holds the lock while it consumes a batch of buffers.
pub type SharedQueue = Arc<Mutex<Queue>>;

/// One queue handed to a device at activation.
#[derive(Clone, Debug)]
pub struct VirtioQueue {
    /// The queue index as the driver numbered it.
    pub index: u16,
    /// The queue itself.
    pub queue: SharedQueue,
    /// Signalled when the driver notifies the queue.
    pub event: Arc<EventFd>,
}

/// Errors a virtio device returns to its transport.
#[derive(Debug, Error)]
pub enum VirtioDeviceError {
    /// A queue the device cannot work without was not enabled by the driver.
    #[error("Required queue {0} is missing")]
    MissingQueue(&'static str),
    /// The worker thread could not be started.
    #[error("Failed to spawn the device worker thread")]
    SpawnWorker(#[source] std::io::Error),
    /// An enabled queue does not fit in guest memory.
    #[error("Queue {0} is outside guest memory")]
    InvalidQueue(u16),
    /// A saved state does not fit this device.
    #[error("Invalid device state: {0}")]
    InvalidState(String),
    /// The device is already active.
    #[error("Device already activated")]
    AlreadyActive,
}

/// A virtio device, independent of its transport.
pub trait VirtioDevice: Send {
    /// The device's plain, serializable migration state.
    type State: Serialize + DeserializeOwned + Clone + Debug + Send;

    /// The virtio device type (`VIRTIO_ID_*`).
    fn device_type(&self) -> u32;

    /// The maximum size of each queue; the length is the number of queues offered.
    fn queue_max_sizes(&self) -> Vec<u16>;

    /// The feature bits the device offers.
    fn features(&self) -> u64;

    /// Called once the driver's features were accepted (`FEATURES_OK`), with only offered bits.
    fn ack_features(&mut self, features: u64);

    /// Read the device configuration space at `offset`.
    fn read_config(&self, offset: u64, data: &mut [u8]);

    /// Write the device configuration space at `offset` (read-only fields are ignored).
    fn write_config(&mut self, offset: u64, data: &[u8]);

    /// Start the device with the queues the driver enabled: a driver need not enable every
    /// queue (virtio 1.2, 4.1.4.3), so `queues` may be any subset, each with the index the
    /// negotiated features give it. Refuse only when the device cannot work at all.
    fn activate(
        &mut self,
        mem: Arc<GuestMemoryMmap>,
        interrupt: Arc<dyn VirtioInterrupt>,
        queues: Vec<VirtioQueue>,
    ) -> Result<(), VirtioDeviceError>;

    /// Stop the device and forget the driver's state (device status written to 0).
    fn reset(&mut self);

    /// Why the device stopped serving its queues after a successful [`VirtioDevice::activate`]
    /// (e.g. its worker could not start), as one line; `None` while it works. Default: never.
    fn failure(&self) -> Option<String> {
        None
    }

    /// Stop consuming buffers (the VM is paused for a snapshot). Default: nothing to do.
    fn pause(&mut self) {}

    /// Resume consuming buffers after [`VirtioDevice::pause`]. Default: nothing to do.
    fn resume(&mut self) {}

    /// Capture the device state (call with the device paused for a consistent snapshot).
    fn state(&self) -> Self::State;

    /// Load a saved state into a fresh, not yet activated device; the state is validated.
    fn restore(&mut self, state: Self::State) -> Result<(), VirtioDeviceError>;
}

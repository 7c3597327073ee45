//! Why a device is or is not running: what the transport refused, and the report the VMM shows
//! users (`vm.counters`).
//!
//! ```text
//!  FEATURES_OK with bits never offered / no VERSION_1 ─► FeaturesRefused   (FEATURES_OK cleared)
//!  queue_enable on a ring outside guest memory ───────► QueueOutsideMemory (DEVICE_NEEDS_RESET)
//!  DRIVER_OK without FEATURES_OK ─────────────────────► DriverOkWithoutFeaturesOk (NEEDS_RESET)
//!  DRIVER_OK, the device's activate() fails ──────────► Device(cause)      (NEEDS_RESET)
//! ```
//!
//! The last refusal stays visible until the device next activates successfully.

use serde::Serialize;
use thiserror::Error;

use crate::virtio::VirtioDeviceError;

/// What the transport refused while the driver set the device up.
#[derive(Debug, Error)]
pub enum ActivationError {
    /// The driver accepted feature bits the device never offered, or not VERSION_1.
    #[error("The driver's features {acked:#x} were refused (offered {offered:#x}; VERSION_1 is required)")]
    FeaturesRefused {
        /// All 64 bits the driver wrote.
        acked: u64,
        /// The bits the device offers.
        offered: u64,
    },
    /// The driver enabled a queue whose rings do not fit in guest memory.
    #[error("Queue {0} does not fit in guest memory")]
    QueueOutsideMemory(u16),
    /// The driver set DRIVER_OK before its features were accepted.
    #[error("The driver set DRIVER_OK without FEATURES_OK")]
    DriverOkWithoutFeaturesOk,
    /// The device refused to start with the queues the driver enabled.
    #[error("The device refused to start")]
    Device(#[source] VirtioDeviceError),
}

/// The driver's view of the device and why it is not running, if it is not.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct ActivationReport {
    /// The `device_status` byte as the driver reads it (DEVICE_NEEDS_RESET included).
    pub device_status: u8,
    /// The device is serving its queues: DRIVER_OK was accepted and nothing failed since.
    pub activated: bool,
    /// Indexes of the queues the driver has enabled (`queue_enable` = 1), in index order.
    pub queues_enabled: Vec<u16>,
    /// Why the device refused the driver's setup or stopped working, as one line; `None`
    /// when nothing went wrong since the device last activated.
    pub activation_error: Option<String>,
}

/// `error` and its causes on one line, separated by ": ".
pub fn error_line(error: &dyn std::error::Error) -> String {
    let mut line = error.to_string();
    let mut cause = error.source();
    while let Some(e) = cause {
        line.push_str(": ");
        line.push_str(&e.to_string());
        cause = e.source();
    }
    line.replace(['\r', '\n'], " ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_line_joins_causes_on_one_line() {
        let e = ActivationError::Device(VirtioDeviceError::InvalidQueue(3));
        assert_eq!(
            error_line(&e),
            "The device refused to start: Queue 3 is outside guest memory"
        );
        let e = ActivationError::FeaturesRefused {
            acked: 0x3,
            offered: 0x1_0000_0001,
        };
        assert!(!error_line(&e).contains('\n'));
        assert!(error_line(&e).contains("0x3"));
    }
}

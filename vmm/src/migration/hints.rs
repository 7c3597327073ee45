//! Where free page hints come from during a migration: the VM's virtio-balloon, seen through
//! two small traits so the send path does not depend on the device's internals.

use std::time::Duration;

use vm_migration::HintMode;

/// A hint round requested from the guest's driver.
pub trait HintSource {
    /// The round's command id (>= 2).
    fn cmd_id(&self) -> u32;
    /// The (gpa, length) ranges reported since the last call, already checked by the device.
    fn take_ranges(&mut self) -> Vec<(u64, u64)>;
    /// Waits up to `timeout` for the driver's STOP; true once it came.
    fn wait_stopped(&self, timeout: Duration) -> bool;
}

/// Something that can ask the guest for free page hints.
pub trait FreePageHinter {
    /// Which protocol the driver negotiated ([`HintMode::None`]: no hinting).
    fn mode(&self) -> HintMode;
    /// Writes a fresh command id and raises a config interrupt.
    fn start_round(&self) -> Result<Box<dyn HintSource>, String>;
    /// Tells the driver to stop hinting (STOP in the config id).
    fn stop_round(&self);
    /// Tells the driver to give back the blocks it holds (DONE in the config id).
    fn done(&self);
}

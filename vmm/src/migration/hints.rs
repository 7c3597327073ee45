//! Where free page hints come from during a migration: the VM's virtio-balloon, seen through a
//! small trait so the send path does not depend on the device's internals.

use std::sync::mpsc::Receiver;

use vm_migration::HintMode;

/// One thing the guest's driver did in a hint round.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HintEvent {
    /// The driver reported `[gpa, gpa + len)` free, for round `cmd_id`.
    Range {
        /// The round the hint was sent for.
        cmd_id: u32,
        /// First guest-physical address.
        gpa: u64,
        /// Length in bytes.
        len: u64,
    },
    /// The driver sent STOP for round `cmd_id`.
    Stop {
        /// The round that stopped.
        cmd_id: u32,
    },
}

/// A hint round that was requested from the guest.
pub struct HintSession {
    /// The round's command id (>= 2).
    pub cmd_id: u32,
    /// What the driver reports, as it arrives.
    pub events: Receiver<HintEvent>,
}

/// Something that can ask the guest for free page hints.
pub trait FreePageHinter {
    /// Which protocol the driver negotiated; `None` when it did not negotiate hinting.
    fn mode(&self) -> HintMode;
    /// Writes a fresh command id and raises a config interrupt.
    fn start_round(&self) -> Result<HintSession, String>;
    /// Tells the driver to stop hinting (STOP in the config id).
    fn stop_round(&self);
    /// Tells the driver to give back the blocks it holds (DONE in the config id).
    fn done(&self);
}

//! virtio-balloon driver (placeholder until deliverable 2).
use crate::mm::PfnList;
use guest_core::buddy::Buddy;
use guest_core::cmdline::Config;

/// The balloon device state.
pub struct Balloon;

impl Balloon {
    /// Finds and initialises the device.
    pub fn probe(_cfg: &Config, _apic: u32, _b: PfnList, _h: PfnList) -> Option<Balloon> {
        None
    }
    /// Does pending work.
    pub fn poll(&mut self, _b: &mut Buddy) {}
}

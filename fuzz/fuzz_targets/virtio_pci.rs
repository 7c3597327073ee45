//! The virtio-pci transport of the balloon: reads and writes of any size at any offset of its
//! BAR (common configuration, ISR, device configuration, notifications, MSI-X table and PBA,
//! and beyond), configuration space writes, guest memory the rings may live in, and a save and
//! restore of the function's state into a fresh device. Nothing may panic or hang.
//!
//! Input: records of `op`, then per op:
//! - 0: BAR read: offset (u16), size (u8, 0..=16)
//! - 1: BAR write: offset (u16), size (u8, 0..=16), data
//! - 2: configuration register write: register (u8, 0..64), byte offset (0..4), size, data
//! - 3: guest memory write: address (u32, within RAM), size (u8), data
//! - 4: save the state, restore it into a new device
//! - 5: pause, 6: resume
#![no_main]

use std::sync::Arc;

use libfuzzer_sys::fuzz_target;
use virtio_devices::{PciDevice, VirtioPciDevice};
use vm_memory::{Bytes, GuestAddress};
use vmm_fuzz::{every_feature_balloon, FuzzInput, NullMsi, PciMachine, PCI_RAM_SIZE};

fuzz_target!(|data: &[u8]| {
    let m = PciMachine::new();
    let bar = m.dev.lock().expect("not poisoned").bar_address();
    // Memory decoding on, as firmware leaves it.
    m.bus.config_write(0, m.slot, 0, 1, 0, &[0x06, 0]);
    let mut input = FuzzInput(data);
    let mut steps = 0;
    while input.more() && steps < 512 {
        steps += 1;
        match input.u8() % 7 {
            0 => {
                let offset = u64::from(input.u16());
                let mut buf = vec![0u8; usize::from(input.u8() % 17)];
                if !m.bus.mmio_read(bar + offset, &mut buf) {
                    m.dev
                        .lock()
                        .expect("not poisoned")
                        .read_bar(0, offset, &mut buf);
                }
            }
            1 => {
                let offset = u64::from(input.u16());
                let size = usize::from(input.u8() % 17);
                let buf = input.take(size);
                if !m.bus.mmio_write(bar + offset, &buf) {
                    m.dev
                        .lock()
                        .expect("not poisoned")
                        .write_bar(0, offset, &buf);
                }
            }
            2 => {
                let reg = usize::from(input.u8() % 64);
                let offset = u64::from(input.u8() % 4);
                let size = usize::from(input.u8() % 5);
                let buf = input.take(size);
                m.bus.config_write(0, m.slot, 0, reg, offset, &buf);
            }
            3 => {
                let addr = u64::from(input.u32()) % PCI_RAM_SIZE as u64;
                let size = usize::from(input.u8());
                let buf = input.take(size);
                let _ = m.mem.write_slice(&buf, GuestAddress(addr));
            }
            4 => {
                let state = m.dev.lock().expect("not poisoned").state();
                let json = serde_json::to_vec(&state).expect("state serializes");
                let state = serde_json::from_slice(&json).expect("state deserializes");
                let balloon = every_feature_balloon();
                let mut fresh =
                    VirtioPciDevice::new(balloon, m.mem.clone(), Arc::new(NullMsi(8)), None)
                        .expect("virtio-pci device");
                fresh
                    .set_bar_address(0, bar)
                    .expect("the BAR address was valid on the first device");
                if let Err(e) = fresh.restore(state) {
                    panic!("a state saved from a live device is refused: {e}");
                }
            }
            5 => m.dev.lock().expect("not poisoned").pause(),
            _ => m.dev.lock().expect("not poisoned").resume(),
        }
    }
});

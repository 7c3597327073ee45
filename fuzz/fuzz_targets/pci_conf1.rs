//! PCI configuration space through the conf1 ports (0xCF8 address, 0xCFC..0xCFF data): any
//! sequence of port reads and writes of any size, on the host bridge, the virtio-balloon
//! function and absent slots, including BAR sizing and moves, the command register and
//! capability walks. Nothing may panic; identity registers stay read-only; every BAR move the
//! bus reports is where the device's MMIO then decodes.
//!
//! Input: records of `op` (even: read, odd: write), port offset (0..8), size (0..=4), then the
//! data for a write.
#![no_main]

use libfuzzer_sys::fuzz_target;
use virtio_devices::PciDevice;
use vmm_fuzz::{FuzzInput, PciMachine};

fuzz_target!(|data: &[u8]| {
    let m = PciMachine::new();
    let mut input = FuzzInput(data);
    let id = m.bus.config_read(0, m.slot, 0, 0);
    let bridge_id = m.bus.config_read(0, 0, 0, 0);
    let mut steps = 0;
    while input.more() && steps < 512 {
        steps += 1;
        let op = input.u8();
        let port = u64::from(input.u8() % 8);
        let size = usize::from(input.u8() % 5);
        if op & 1 == 0 {
            let mut buf = vec![0u8; size];
            m.conf1.read(port, &mut buf);
        } else {
            let buf = input.take(size);
            for moved in m.conf1.write(port, &buf) {
                assert_eq!(moved.slot, m.slot, "only the balloon has BARs");
                let bars = m.dev.lock().expect("not poisoned").bars();
                let bar = bars
                    .iter()
                    .find(|b| b.index == moved.bar_index)
                    .expect("a reported BAR exists");
                assert_eq!(bar.size, moved.size);
                if moved.new_addr != 0 {
                    let mut b = [0u8; 1];
                    assert!(
                        m.bus.mmio_read(moved.new_addr, &mut b),
                        "BAR moved to {:#x} but does not decode there",
                        moved.new_addr
                    );
                }
            }
        }
    }
    assert_eq!(m.bus.config_read(0, m.slot, 0, 0), id, "device id changed");
    assert_eq!(
        m.bus.config_read(0, 0, 0, 0),
        bridge_id,
        "host bridge id changed"
    );
});

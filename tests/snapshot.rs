//! End to end: a running test guest is paused, its vCPU and VM state saved and restored into a
//! fresh VM with a copy of its memory, and it continues there, still verifying its data.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::{guest_elf, last_verify_seq, require_kvm, wait_line_in, Scratch};
use vm_memory::{Bytes, GuestMemoryBackend, GuestMemoryRegion};
use vmm::config::{ConsoleConfig, ConsoleOutputMode, MemoryConfig, PayloadConfig, VmConfig};
use vmm::vm::Vm;

fn config(serial: std::path::PathBuf) -> VmConfig {
    VmConfig {
        memory: MemoryConfig {
            size: 1 << 30,
            ..Default::default()
        },
        payload: PayloadConfig {
            kernel: Some(guest_elf().to_path_buf()),
            cmdline: Some("used=64 hot=4".into()),
            initramfs: None,
        },
        serial: ConsoleConfig {
            mode: ConsoleOutputMode::File,
            file: Some(serial),
        },
        ..Default::default()
    }
}

#[test]
fn vcpu_state_restored_into_a_fresh_vm_continues_the_guest() {
    require_kvm();
    let scratch = Scratch::new("snapshot");
    let (serial1, serial2) = (scratch.path("serial1.log"), scratch.path("serial2.log"));
    let hv = hypervisor::KvmHypervisor::new().expect("KVM");
    let sink: vmm::vcpu::ExitSink = Arc::new(|e| panic!("guest ended unexpectedly: {e:?}"));

    let mut source = Vm::new(config(serial1.clone()), &hv, sink.clone()).unwrap();
    source.boot().unwrap();
    wait_line_in(&serial1, "guest: verify ok", 2, Duration::from_secs(30));
    source.pause().unwrap();
    let snapshot = source.snapshot().unwrap();
    let json = serde_json::to_vec(&snapshot).unwrap();
    let snapshot: vmm::vm::VmSnapshot = serde_json::from_slice(&json).unwrap();
    let seq_before = last_verify_seq(&common::complete_lines(&serial1)).unwrap();

    let mut dest = Vm::new(config(serial2.clone()), &hv, sink).unwrap();
    let mut buf = vec![0u8; 1 << 20];
    for region in source.memory().iter() {
        let mut addr = region.start_addr();
        let end = region.start_addr().0 + region.len();
        while addr.0 < end {
            source.memory().read_slice(&mut buf, addr).unwrap();
            dest.memory().write_slice(&buf, addr).unwrap();
            addr = vm_memory::GuestAddress(addr.0 + buf.len() as u64);
        }
    }
    dest.restore(&snapshot).unwrap();
    source.shutdown();
    dest.resume().unwrap();

    let line = wait_line_in(&serial2, "guest: verify ok", 1, Duration::from_secs(30));
    let text = common::complete_lines(&serial2);
    assert!(!text.contains("FAILED"), "{text}");
    let seq_after = last_verify_seq(&text).unwrap();
    assert!(
        seq_after > seq_before,
        "seq {seq_after} after restore, {seq_before} before ({line})"
    );
    dest.shutdown();
}

//! End to end: the guest finds its CPUs in the ACPI MADT and powers off through the FADT's
//! sleep control register (`\_S5`), which ends the VM as a guest shutdown does.

mod common;

use std::time::{Duration, Instant};

use common::Vmm;

const READY: Duration = Duration::from_secs(30);

#[test]
fn two_vcpus_from_the_madt_and_acpi_poweroff_exits_the_vmm() {
    let mut vmm = Vmm::boot(
        "acpi-off",
        "512M",
        "used=16 poweroff=3",
        &["--cpus", "boot=2"],
    );
    vmm.wait_line("guest: cpus source=acpi count=2", READY);
    vmm.wait_line("guest: cpus online=2", READY);
    let off = vmm.wait_line("guest: poweroff", READY);
    assert!(off.contains("port=0x600 value=0x34"), "{off}");
    assert_eq!(
        vmm.wait_exit(Duration::from_secs(10)),
        0,
        "{}",
        vmm.stderr_text()
    );
    let serial = vmm.serial_text();
    assert!(!serial.contains("FAILED"), "{serial}");
    assert_eq!(
        common::last_verify_seq(&serial),
        Some(3),
        "the guest stopped at the power-off"
    );
}

#[test]
fn acpi_poweroff_of_an_api_created_vm_leaves_the_vmm_running() {
    let mut vmm = Vmm::waiting("acpi-off-api");
    let config = serde_json::json!({
        "cpus": {"boot_vcpus": 1},
        "memory": {"size": 256u64 << 20},
        "payload": {"kernel": common::guest_elf(), "cmdline": "used=8 poweroff=2"},
        "serial": {"mode": "File", "file": vmm.serial},
    });
    let path = vmm.scratch.path("vm.json");
    std::fs::write(&path, config.to_string()).unwrap();
    assert!(vmm
        .remote(&["create", path.to_str().unwrap()])
        .status
        .success());
    assert!(vmm.remote(&["boot"]).status.success());
    vmm.wait_line("guest: cpus source=acpi count=1", READY);
    vmm.wait_line("guest: poweroff", READY);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let out = vmm.remote(&["info"]);
        let info: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
        if info["state"] == "Shutdown" {
            break;
        }
        assert!(Instant::now() < deadline, "VM not shut down: {info}");
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(vmm.running(), "the VMM outlives a VM made through the API");
    assert!(vmm.remote(&["shutdown-vmm"]).status.success());
    assert_eq!(vmm.wait_exit(Duration::from_secs(10)), 0);
}

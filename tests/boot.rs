//! End to end: boot the test guest, drive it through the API, shut it down.

mod common;

use std::time::{Duration, Instant};

use common::{field, Vmm};

const READY: Duration = Duration::from_secs(30);

fn info_state(vmm: &Vmm) -> String {
    let out = vmm.remote(&["info"]);
    assert!(
        out.status.success(),
        "ch-remote info failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let info: serde_json::Value = serde_json::from_slice(&out.stdout).expect("info is JSON");
    info["state"].as_str().unwrap_or_default().to_string()
}

#[test]
fn boots_1g_and_is_driven_through_the_api() {
    let start = Instant::now();
    let mut vmm = Vmm::boot("boot1g", "1G", "used=64 hot=4", &[]);
    let ready = vmm.wait_line("guest: ready", READY);
    eprintln!("1 GiB guest ready after {:?}: {ready}", start.elapsed());
    assert_eq!(field(&ready, "used_pages"), Some(64 * 256 + 4 * 256));
    let seq = vmm.wait_seq_above(0, READY);
    assert_eq!(info_state(&vmm), "Running");

    // Paused: no verification runs.
    assert!(vmm.remote(&["pause"]).status.success());
    assert_eq!(info_state(&vmm), "Paused");
    let paused_at = vmm.last_seq().unwrap_or(seq);
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(
        vmm.last_seq(),
        Some(paused_at),
        "guest kept running while paused"
    );

    // Resumed: seq keeps rising.
    assert!(vmm.remote(&["resume"]).status.success());
    vmm.wait_seq_above(paused_at, Duration::from_secs(10));
    assert_eq!(info_state(&vmm), "Running");

    // Resume of a running VM is refused with a clear error.
    let again = vmm.remote(&["resume"]);
    assert!(!again.status.success());
    assert!(!again.stderr.is_empty());

    let out = vmm.remote(&["shutdown"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(vmm.wait_exit(Duration::from_secs(10)), 0);
    assert!(!vmm.serial_text().contains("FAILED"));
}

#[test]
fn boots_4g_with_ram_above_4g() {
    let mut vmm = Vmm::boot("boot4g", "4G", "used=1536 dirty=512", &[]);
    let ready = vmm.wait_line("guest: ready", READY);
    assert_eq!(field(&ready, "used_pages"), Some(1536 * 256));
    // Above 3 GiB of RAM the guest must have used memory from 4 GiB up: the free count shows it.
    let free = field(&ready, "free_pages").unwrap();
    assert!(
        free > (2048 + 256) * 256,
        "free_pages {free} too low for a 4 GiB guest"
    );
    vmm.wait_seq_above(1, READY);
    assert!(vmm.remote(&["shutdown"]).status.success());
    assert_eq!(vmm.wait_exit(Duration::from_secs(10)), 0);
}

#[test]
fn create_and_boot_through_the_api() {
    let mut vmm = Vmm::waiting("api-create");
    let config = serde_json::json!({
        "cpus": {"boot_vcpus": 2},
        "memory": {"size": 1u64 << 30},
        "payload": {"kernel": common::guest_elf(), "cmdline": "used=32"},
        "serial": {"mode": "File", "file": vmm.serial},
    });
    let path = vmm.scratch.path("vm.json");
    std::fs::write(&path, config.to_string()).unwrap();
    assert_eq!(info_state_or_error(&vmm), None, "no VM before vm.create");
    let out = vmm.remote(&["create", path.to_str().unwrap()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(info_state(&vmm), "Created");
    assert!(vmm.remote(&["boot"]).status.success());
    vmm.wait_line("guest: ready", READY);
    vmm.wait_seq_above(0, READY);
    assert_eq!(info_state(&vmm), "Running");
    // A VM made through the API outlives its shutdown; the VMM waits for more requests.
    assert!(vmm.remote(&["shutdown"]).status.success());
    assert_eq!(info_state(&vmm), "Shutdown");
    assert!(vmm.running());
    assert!(vmm.remote(&["delete"]).status.success());
    assert_eq!(info_state_or_error(&vmm), None);
    assert!(vmm.remote(&["ping"]).status.success());
    assert!(vmm.remote(&["shutdown-vmm"]).status.success());
    assert_eq!(vmm.wait_exit(Duration::from_secs(10)), 0);
}

/// `Some(state)`, or `None` when vm.info answers an error (no VM).
fn info_state_or_error(vmm: &Vmm) -> Option<String> {
    let out = vmm.remote(&["info"]);
    out.status.success().then(|| info_state(vmm))
}

#[test]
fn send_migration_to_nowhere_fails_and_the_guest_runs_on() {
    let mut vmm = Vmm::boot("mig-nowhere", "1G", "used=32", &[]);
    vmm.wait_line("guest: ready", READY);
    let seq = vmm.wait_seq_above(0, READY);
    let nowhere = vmm.scratch.path("nobody-listens.sock");
    let out = vmm.remote(&["send-migration", &format!("unix:{}", nowhere.display())]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    let bad = vmm.remote(&["send-migration", "destination_url=http://example"]);
    assert!(!bad.status.success());
    assert_eq!(info_state(&vmm), "Running");
    vmm.wait_seq_above(seq, Duration::from_secs(20));
    assert!(vmm.remote(&["shutdown"]).status.success());
    assert_eq!(vmm.wait_exit(Duration::from_secs(10)), 0);
}

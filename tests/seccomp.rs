//! End to end: the VMM's threads run under their seccomp filters by default, and the API,
//! the balloon and migration keep working under them (a call outside a list is refused with
//! EPERM and named once on standard error; one that could escape the sandbox kills the VMM with
//! `cloud-hypervisor: seccomp: thread <name> made forbidden syscall <nr>`).

mod common;

use std::time::{Duration, Instant};

use common::Vmm;

const READY: Duration = Duration::from_secs(60);
const BALLOON: &str = "size=0,free_page_hinting=on,statistics=on";

/// Each thread of `pid` as (name, seccomp mode, number of filters), from /proc.
fn threads(pid: u32) -> Vec<(String, u32, u32)> {
    let mut out = Vec::new();
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return out;
    };
    for task in tasks.flatten() {
        let dir = task.path();
        let (Ok(comm), Ok(status)) = (
            std::fs::read_to_string(dir.join("comm")),
            std::fs::read_to_string(dir.join("status")),
        ) else {
            continue;
        };
        let field = |name: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(name))
                .and_then(|v| v.trim().parse().ok())
                .unwrap_or(0)
        };
        out.push((
            comm.trim().to_string(),
            field("Seccomp:"),
            field("Seccomp_filters:"),
        ));
    }
    out
}

/// Waits until threads whose names start with each of `names` exist and every thread of the
/// VMM is in seccomp filter mode (2) with at least two filters (the allowlist and the `clone3`
/// one); the VMM thread installs its filter just after the API socket appears.
fn assert_all_filtered(vmm: &Vmm, names: &[&str]) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let all = threads(vmm.child.id());
        let present = names
            .iter()
            .all(|n| all.iter().any(|(t, _, _)| t.starts_with(n)));
        let filtered = all
            .iter()
            .all(|(_, mode, filters)| *mode == 2 && *filters >= 2);
        if present && filtered {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "threads {names:?} missing or not all filtered (name, mode, filters): {all:?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn json(out: std::process::Output) -> serde_json::Value {
    assert!(
        out.status.success(),
        "ch-remote failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("JSON answer")
}

fn ok(vmm: &Vmm, args: &[&str]) {
    let out = vmm.remote(args);
    assert!(
        out.status.success(),
        "ch-remote {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The VMM exited 0 and said nothing about seccomp.
fn assert_clean_exit(vmm: &mut Vmm) {
    let code = vmm.wait_exit(Duration::from_secs(15));
    let stderr = vmm.stderr_text();
    assert!(!stderr.contains("seccomp"), "{stderr}");
    assert_eq!(code, 0, "{stderr}");
}

/// Migrates `src` to `dst` through `url`, with `send_args` for send-migration; returns the report.
fn migrate(src: &Vmm, dst: &Vmm, url: &str, send_args: &str) -> serde_json::Value {
    let dst_api = dst.api.clone();
    let receive_url = url.to_string();
    let receiver = std::thread::spawn(move || {
        common::ch_remote(&dst_api, &["receive-migration", &receive_url])
    });
    let path = url.strip_prefix("unix:").expect("a unix: URL");
    let deadline = Instant::now() + Duration::from_secs(10);
    while !std::path::Path::new(path).exists() {
        assert!(Instant::now() < deadline, "the destination never listened");
        std::thread::sleep(Duration::from_millis(10));
    }
    let report = json(src.remote(&["send-migration", send_args]));
    let received = receiver.join().expect("receiver thread");
    assert!(
        received.status.success(),
        "{}",
        String::from_utf8_lossy(&received.stderr)
    );
    assert_eq!(report["status"], "completed", "{report}");
    report
}

/// After a migration: the guest goes on verifying on the destination, whose threads are all
/// filtered; the balloon there still inflates; both VMMs exit cleanly.
fn check_destination(mut src: Vmm, mut dst: Vmm) {
    assert_clean_exit(&mut src);
    let before = src.last_seq().unwrap_or(0);
    src.wait_seq_above(before, Duration::from_secs(20));
    assert_all_filtered(&dst, &["vcpu", "http-server", "balloon-worker"]);
    let info = json(dst.remote(&["info"]));
    assert_eq!(info["state"], "Running");
    ok(&dst, &["resize", "--balloon", "64M"]);
    dst.wait_balloon_pages(64 * 256);
    ok(&dst, &["pause"]);
    ok(&dst, &["resume"]);
    json(dst.remote(&["counters"]));
    ok(&dst, &["shutdown"]);
    assert_clean_exit(&mut dst);
    assert!(!src.serial_text().contains("FAILED"));
}

#[test]
fn api_calls_and_a_migration_run_under_the_default_filters() {
    let src = Vmm::boot(
        "seccomp-src",
        "1G",
        "used=64 hot=4",
        &["--balloon", BALLOON],
    );
    src.wait_line("guest: ready", READY);
    let seq = src.wait_seq_above(0, READY);
    assert_all_filtered(&src, &["vcpu0", "http-server", "balloon-worker"]);

    json(src.remote(&["ping"]));
    let info = json(src.remote(&["info"]));
    assert_eq!(info["state"], "Running");
    json(src.remote(&["counters"]));
    ok(&src, &["pause"]);
    assert_eq!(json(src.remote(&["info"]))["state"], "Paused");
    ok(&src, &["resume"]);
    ok(&src, &["resize", "--balloon", "128M"]);
    src.wait_balloon_pages(128 * 256);
    ok(&src, &["resize", "--balloon", "0"]);
    src.wait_balloon_pages(0);
    let hints = json(src.remote(&["balloon-hints", "start"]));
    assert!(hints["pages"].as_u64().unwrap() > 0, "{hints}");
    json(src.remote(&["balloon-hints"]));
    src.wait_seq_above(seq, Duration::from_secs(20));
    assert_all_filtered(&src, &["vcpu0", "http-server", "balloon-worker"]);

    let dst = Vmm::waiting("seccomp-dst");
    // The waiting VMM filters its main thread before any VM exists.
    assert_all_filtered(&dst, &["http-server"]);
    let url = format!("unix:{}", dst.scratch.path("mig.sock").display());
    let report = migrate(&src, &dst, &url, &format!("destination_url={url}"));
    assert!(report["bytes_sent"].as_u64().unwrap() > 0, "{report}");
    check_destination(src, dst);
}

#[test]
fn local_migration_of_shared_memory_runs_under_the_filters() {
    // Shared guest RAM: the balloon punches holes (fallocate) and local migration passes the
    // memfd with SCM_RIGHTS.
    let src = Vmm::boot(
        "seccomp-local-src",
        "1G,shared=on",
        "used=64 hot=4",
        &["--balloon", BALLOON],
    );
    src.wait_line("guest: ready", READY);
    src.wait_seq_above(0, READY);
    ok(&src, &["resize", "--balloon", "128M"]);
    src.wait_balloon_pages(128 * 256);
    let counters = json(src.remote(&["counters"]));
    assert_eq!(counters["balloon"]["release_errors"], 0, "{counters}");
    ok(&src, &["resize", "--balloon", "0"]);
    src.wait_balloon_pages(0);

    let dst = Vmm::waiting("seccomp-local-dst");
    let url = format!("unix:{}", dst.scratch.path("mig.sock").display());
    let report = migrate(&src, &dst, &url, &format!("destination_url={url},local=on"));
    assert_eq!(
        report["bytes_sent"], 0,
        "local mode copies no memory: {report}"
    );
    check_destination(src, dst);
}

#[test]
fn a_vm_created_through_the_api_runs_under_the_filters() {
    // The VMM thread is filtered before the VM exists: it loads the kernel, builds the VM and
    // starts the vCPUs under its filter; the http-server validates the payload under its own.
    let mut vmm = Vmm::waiting("seccomp-create");
    assert_all_filtered(&vmm, &["http-server"]);
    let config = serde_json::json!({
        "cpus": {"boot_vcpus": 2},
        "memory": {"size": 1u64 << 30},
        "payload": {"kernel": common::guest_elf(), "cmdline": "used=32"},
        "serial": {"mode": "File", "file": vmm.serial},
        "balloon": {"size": 0, "free_page_hinting": true, "statistics": true},
    });
    let path = vmm.scratch.path("vm.json");
    std::fs::write(&path, config.to_string()).unwrap();
    ok(&vmm, &["create", path.to_str().unwrap()]);
    ok(&vmm, &["boot"]);
    vmm.wait_line("guest: ready", READY);
    vmm.wait_seq_above(0, READY);
    assert_all_filtered(&vmm, &["vcpu0", "vcpu1", "http-server", "balloon-worker"]);
    ok(&vmm, &["resize", "--balloon", "64M"]);
    vmm.wait_balloon_pages(64 * 256);
    ok(&vmm, &["shutdown"]);
    ok(&vmm, &["delete"]);
    ok(&vmm, &["ping"]);
    ok(&vmm, &["shutdown-vmm"]);
    assert_clean_exit(&mut vmm);
    assert!(!vmm.api.exists(), "the API socket is removed");
}

#[test]
fn seccomp_flag_turns_the_filters_off_or_to_logging() {
    let mut off = Vmm::boot("seccomp-off", "256M", "used=16", &["--seccomp", "false"]);
    off.wait_line("guest: ready", READY);
    let all = threads(off.child.id());
    assert!(all.iter().any(|(t, _, _)| t == "vcpu0"), "{all:?}");
    assert!(all.iter().all(|(_, mode, _)| *mode == 0), "{all:?}");
    ok(&off, &["shutdown"]);
    assert_clean_exit(&mut off);

    let mut log = Vmm::boot("seccomp-log", "256M", "used=16", &["--seccomp", "log"]);
    log.wait_line("guest: ready", READY);
    assert_all_filtered(&log, &["vcpu0", "http-server"]);
    ok(&log, &["shutdown"]);
    assert_clean_exit(&mut log);

    let out = std::process::Command::new(env!("CARGO_BIN_EXE_cloud-hypervisor"))
        .args([
            "--api-socket",
            "/nonexistent/seccomp.sock",
            "--seccomp",
            "on",
        ])
        .output()
        .expect("run cloud-hypervisor");
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("--seccomp: invalid value \"on\" (expected true, false or log)"),
        "{stderr}"
    );
}

//! End to end: the virtio-balloon with the test guest's driver: inflate and deflate through
//! `vm.resize`, and free page hinting rounds through `vm.balloon-hints`.

mod common;

use std::time::{Duration, Instant};

use common::{field, Vmm};

const READY: Duration = Duration::from_secs(60);
const BALLOON: &str = "size=0,free_page_hinting=on,statistics=on,deflate_on_oom=on";

fn json(out: std::process::Output) -> serde_json::Value {
    assert!(
        out.status.success(),
        "ch-remote failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("JSON answer")
}

fn rss_mib(vmm: &Vmm) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{}/status", vmm.child.id())).unwrap();
    let kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap();
    kib / 1024
}

#[test]
fn inflate_and_deflate_follow_resize() {
    let mut vmm = Vmm::boot(
        "balloon-resize",
        "2G",
        "used=64 dirty=1536",
        &["--balloon", BALLOON],
    );
    vmm.wait_line("guest: ready", READY);
    let seq = vmm.wait_seq_above(0, READY);
    let rss_before = rss_mib(&vmm);

    assert!(vmm
        .remote(&["resize", "--balloon", "256M"])
        .status
        .success());
    vmm.wait_balloon_pages(256 * 256);
    let info = json(vmm.remote(&["info"]));
    assert_eq!(info["memory_actual_size"], (2048u64 - 256) << 20);
    let rss_inflated = rss_mib(&vmm);
    assert!(
        rss_before.saturating_sub(rss_inflated) >= 200,
        "inflating 256 MiB of touched memory must give it back to the host: {rss_before} -> {rss_inflated} MiB"
    );
    let seq = vmm.wait_seq_above(seq + 1, Duration::from_secs(20));

    assert!(vmm.remote(&["resize", "--balloon", "0"]).status.success());
    vmm.wait_balloon_pages(0);
    let info = json(vmm.remote(&["info"]));
    assert_eq!(info["memory_actual_size"], 2048u64 << 20);
    let counters = json(vmm.remote(&["counters"]));
    assert!(counters["balloon"]["inflated_pages"].as_u64().unwrap() >= 256 * 256);
    assert!(counters["balloon"]["deflated_pages"].as_u64().unwrap() >= 256 * 256);
    vmm.wait_seq_above(seq + 1, Duration::from_secs(20));

    // A balloon as large as the VM's memory is refused with a clear error.
    let too_big = vmm.remote(&["resize", "--balloon", "2G"]);
    assert!(!too_big.status.success());
    assert!(vmm.remote(&["shutdown"]).status.success());
    assert_eq!(vmm.wait_exit(Duration::from_secs(10)), 0);
}

#[test]
fn hint_round_covers_the_free_memory() {
    let mut vmm = Vmm::boot(
        "balloon-hints",
        "2G",
        "used=128 dirty=1024",
        &["--balloon", BALLOON],
    );
    let ready = vmm.wait_line("guest: ready", READY);
    let free = field(&ready, "free_pages").unwrap();
    let seq = vmm.wait_seq_above(0, READY);

    let status = json(vmm.remote(&["balloon-hints", "start"]));
    assert_eq!(status["timed_out"], false, "{status}");
    assert_eq!(status["state"], "stopped");
    let hinted = status["pages"].as_u64().unwrap();
    assert!(
        hinted * 10 >= free * 9,
        "hinted {hinted} of {free} free pages"
    );
    assert_eq!(status["rejected"], 0);
    let line = vmm.wait_line("guest: hint cmd_id=", Duration::from_secs(5));
    assert_eq!(field(&line, "pages"), Some(hinted));

    // DONE gives the blocks back; the counters keep the round.
    assert!(vmm.remote(&["balloon-hints", "done"]).status.success());
    let get = json(vmm.remote(&["balloon-hints"]));
    assert_eq!(get["rounds"], 1);
    let counters = json(vmm.remote(&["counters"]));
    assert_eq!(counters["balloon"]["hint_rounds"], 1);
    assert_eq!(counters["balloon"]["hinted_pages"], hinted);
    vmm.wait_seq_above(seq + 1, Duration::from_secs(20));
    assert!(vmm.remote(&["shutdown"]).status.success());
    assert_eq!(vmm.wait_exit(Duration::from_secs(10)), 0);
}

#[test]
fn a_driver_that_never_answers_times_out_cleanly() {
    let mut vmm = Vmm::boot(
        "balloon-nohint",
        "1G",
        "used=64 hint=none",
        &["--balloon", BALLOON],
    );
    vmm.wait_line("guest: ready", READY);
    let seq = vmm.wait_seq_above(0, READY);
    let started = Instant::now();
    let status = json(vmm.remote(&["balloon-hints", "start"]));
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "the round must end by its time limit"
    );
    assert_eq!(status["timed_out"], true, "{status}");
    assert_eq!(status["pages"], 0);
    let get = json(vmm.remote(&["balloon-hints"]));
    assert_ne!(get["state"], "requested", "{get}");
    assert_ne!(get["state"], "receiving", "{get}");
    vmm.wait_seq_above(seq + 1, Duration::from_secs(20));
    assert!(vmm.remote(&["shutdown"]).status.success());
    assert_eq!(vmm.wait_exit(Duration::from_secs(10)), 0);
}

#[test]
fn balloon_requests_without_a_balloon_are_refused() {
    let mut vmm = Vmm::boot("balloon-none", "1G", "used=64", &[]);
    vmm.wait_line("guest: ready", READY);
    for args in [
        &["resize", "--balloon", "128M"][..],
        &["balloon-hints", "start"][..],
        &["balloon-hints"][..],
    ] {
        let out = vmm.remote(args);
        assert!(
            !out.status.success(),
            "{args:?} must fail without a balloon"
        );
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("balloon"), "{err}");
    }
    assert!(vmm.remote(&["shutdown"]).status.success());
    assert_eq!(vmm.wait_exit(Duration::from_secs(10)), 0);
}

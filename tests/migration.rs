//! End to end: live migration of the test guest between two VMM processes, with the guest's
//! own verification of every live page as the judge of integrity.

mod common;

use std::process::Output;
use std::time::{Duration, Instant};

use common::{field, Vmm};

const READY: Duration = Duration::from_secs(60);

/// Starts receive-migration on `dst` in a thread, then send-migration on `src`; returns both.
fn migrate(src: &Vmm, dst: &Vmm, receiver_url: &str, send_args: &str) -> (Output, Output) {
    let dst_api = dst.api.clone();
    let url = receiver_url.to_string();
    let receiver =
        std::thread::spawn(move || common::ch_remote(&dst_api, &["receive-migration", &url]));
    // Wait until the destination listens.
    if let Some(path) = receiver_url.strip_prefix("unix:") {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !std::path::Path::new(path).exists() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
    } else if let Some(port) = receiver_url.rsplit(':').next().and_then(|p| p.parse().ok()) {
        wait_tcp_listen(port, Duration::from_secs(10));
    }
    let sent = src.remote(&["send-migration", send_args]);
    let received = receiver.join().expect("receiver thread");
    (sent, received)
}

/// Waits until something listens on TCP `port` (without connecting: the receiver accepts
/// exactly one connection).
fn wait_tcp_listen(port: u16, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    let needle = format!(":{port:04X} ");
    while Instant::now() < deadline {
        let listening = ["/proc/net/tcp", "/proc/net/tcp6"].iter().any(|f| {
            std::fs::read_to_string(f)
                .unwrap_or_default()
                .lines()
                .any(|l| {
                    let cols: Vec<&str> = l.split_whitespace().collect();
                    cols.len() > 3 && format!("{} ", cols[1]).ends_with(&needle) && cols[3] == "0A"
                })
        });
        if listening {
            return;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    panic!("nothing listens on TCP port {port}");
}

fn report(out: &Output) -> serde_json::Value {
    assert!(
        out.status.success(),
        "send-migration failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("the report is JSON")
}

/// Boots a source guest and a waiting destination.
fn pair(tag: &str, memory: &str, cmdline: &str, extra: &[&str]) -> (Vmm, Vmm) {
    let src = Vmm::boot(&format!("{tag}-src"), memory, cmdline, extra);
    src.wait_line("guest: ready", READY);
    src.wait_seq_above(0, READY);
    let dst = Vmm::waiting(&format!("{tag}-dst"));
    (src, dst)
}

/// After a migration: the source exited 0, the guest verifies with a higher seq, no failure.
fn check_moved(mut src: Vmm, mut dst: Vmm) {
    assert_eq!(
        src.wait_exit(Duration::from_secs(10)),
        0,
        "the source VMM exits after migrating"
    );
    let before = src.last_seq().unwrap_or(0);
    let after = src.wait_seq_above(before, Duration::from_secs(20));
    assert!(after > before);
    assert!(!src.serial_text().contains("FAILED"));
    let info = dst.remote(&["info"]);
    let info: serde_json::Value = serde_json::from_slice(&info.stdout).expect("info JSON");
    assert_eq!(info["state"], "Running");
    assert!(dst.remote(&["shutdown"]).status.success());
    assert_eq!(dst.wait_exit(Duration::from_secs(10)), 0);
}

#[test]
fn unix_without_hints_skips_zero_pages() {
    let (src, dst) = pair("mig-unix", "1G", "used=64 hot=4 dirty=256", &[]);
    let url = format!("unix:{}", dst.scratch.path("mig.sock").display());
    let (sent, received) = migrate(
        &src,
        &dst,
        &url,
        &format!("destination_url={url},free_page_hints=off"),
    );
    let r = report(&sent);
    assert!(
        received.status.success(),
        "{}",
        String::from_utf8_lossy(&received.stderr)
    );
    assert_eq!(r["status"], "completed");
    assert_eq!(r["memory_bytes"], 1u64 << 30);
    assert_eq!(r["hints"]["used"], false);
    let sent_bytes = r["bytes_sent"].as_u64().unwrap();
    let zero = r["zero_pages_skipped"].as_u64().unwrap();
    assert!(
        sent_bytes >= (64 + 256) << 20,
        "live and dirtied data must be sent: {sent_bytes}"
    );
    assert!(
        zero > 100_000,
        "most of the untouched 1 GiB is zero pages: {zero}"
    );
    assert!(r["wire_bytes"].as_u64().unwrap() > sent_bytes);
    check_moved(src, dst);
}

#[test]
fn tcp_with_zero_pages_sent_too() {
    let (src, dst) = pair("mig-tcp", "1G", "used=64 hot=4", &[]);
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let url = format!("tcp:127.0.0.1:{port}");
    let (sent, received) = migrate(
        &src,
        &dst,
        &url,
        &format!("destination_url={url},zero_pages=off"),
    );
    let r = report(&sent);
    assert!(received.status.success());
    assert_eq!(r["zero_pages_skipped"], 0);
    assert!(
        r["bytes_sent"].as_u64().unwrap() >= 1 << 30,
        "all of RAM is sent"
    );
    check_moved(src, dst);
}

#[test]
fn hot_pages_written_during_migration_arrive_with_two_vcpus() {
    let (src, dst) = pair(
        "mig-hot",
        "2G",
        "used=128 hot=64 dirty=512",
        &["--cpus", "boot=2"],
    );
    let url = format!("unix:{}", dst.scratch.path("mig.sock").display());
    let (sent, _) = migrate(
        &src,
        &dst,
        &url,
        &format!("destination_url={url},downtime_ms=50"),
    );
    let r = report(&sent);
    assert!(
        r["rounds"].as_u64().unwrap() >= 2,
        "a hot guest needs dirty rounds: {r}"
    );
    check_moved(src, dst);
}

#[test]
fn local_mode_hands_memory_over() {
    let (src, dst) = pair("mig-local", "1G,shared=on", "used=64 hot=4", &[]);
    let url = format!("unix:{}", dst.scratch.path("mig.sock").display());
    let (sent, _) = migrate(&src, &dst, &url, &format!("destination_url={url},local=on"));
    let r = report(&sent);
    assert_eq!(r["bytes_sent"], 0, "local mode copies no memory: {r}");
    check_moved(src, dst);
}

#[test]
fn destination_killed_during_round_zero_leaves_the_source_running() {
    let (mut src, mut dst) = pair("mig-kill", "4G", "used=64 dirty=2048", &[]);
    let url = format!("unix:{}", dst.scratch.path("mig.sock").display());
    let dst_api = dst.api.clone();
    let u = url.clone();
    let receiver =
        std::thread::spawn(move || common::ch_remote(&dst_api, &["receive-migration", &u]));
    std::thread::sleep(Duration::from_millis(300));
    let src_api = src.api.clone();
    let args = format!("destination_url={url},zero_pages=off,free_page_hints=off");
    let sender =
        std::thread::spawn(move || common::ch_remote(&src_api, &["send-migration", &args]));
    // Round 0 of 4 GiB takes seconds here: kill the destination in the middle of it.
    std::thread::sleep(Duration::from_millis(1500));
    dst.child.kill().unwrap();
    let _ = dst.child.wait();
    let sent = sender.join().unwrap();
    let _ = receiver.join();
    assert!(
        !sent.status.success(),
        "send-migration must fail when the destination dies"
    );
    let err = String::from_utf8_lossy(&sent.stderr);
    assert_eq!(err.trim().lines().count(), 1, "one-line error: {err}");
    assert!(src.running(), "the source VMM keeps running");
    let seq = src.last_seq().unwrap_or(0);
    src.wait_seq_above(seq + 1, Duration::from_secs(20));
    let info = src.remote(&["info"]);
    let info: serde_json::Value = serde_json::from_slice(&info.stdout).unwrap();
    assert_eq!(info["state"], "Running");
    assert!(src.remote(&["shutdown"]).status.success());
    assert_eq!(src.wait_exit(Duration::from_secs(10)), 0);
}

#[test]
fn garbage_to_a_receiving_vmm_is_refused_cleanly() {
    use std::io::Write;
    let mut dst = Vmm::waiting("mig-garbage");
    let path = dst.scratch.path("mig.sock");
    let url = format!("unix:{}", path.display());
    let dst_api = dst.api.clone();
    let receiver =
        std::thread::spawn(move || common::ch_remote(&dst_api, &["receive-migration", &url]));
    let deadline = Instant::now() + Duration::from_secs(10);
    while !path.exists() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
    // The socket file appears at bind(), a moment before listen(): retry a refused connect.
    let mut conn = loop {
        match std::os::unix::net::UnixStream::connect(&path) {
            Ok(c) => break c,
            Err(e) if Instant::now() < deadline => {
                eprintln!("waiting for the receiver: {e}");
                std::thread::sleep(Duration::from_millis(10));
            }
            Err(e) => panic!("the receiver never listened: {e}"),
        }
    };
    let _ = conn.write_all(b"GET / HTTP/1.1\r\nHost: nonsense\r\n\r\n and more garbage bytes");
    let received = receiver.join().unwrap();
    assert!(!received.status.success());
    let err = String::from_utf8_lossy(&received.stderr);
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert!(err.contains("migration"), "{err}");
    // The VMM is still there and can take another migration.
    assert!(dst.running());
    assert!(dst.remote(&["ping"]).status.success());
    let _ = field("", "");
}

const BALLOON: &str = "--balloon";
const HINTING: &str = "size=0,free_page_hinting=on";

#[test]
fn hints_leave_the_freed_memory_out_of_round_zero() {
    let (src, dst) = pair(
        "mig-hints",
        "2G",
        "used=128 dirty=1536",
        &[BALLOON, HINTING],
    );
    let ready = src.wait_line("guest: ready", READY);
    let free = field(&ready, "free_pages").unwrap();
    let url = format!("unix:{}", dst.scratch.path("mig.sock").display());
    let (sent, _) = migrate(&src, &dst, &url, &url);
    let r = report(&sent);
    assert_eq!(r["hints"]["used"], true, "{r}");
    assert_eq!(r["hints"]["mode"], "stock");
    assert_eq!(r["hints"]["rejected"], 0);
    let skipped = r["hints"]["pages_skipped"].as_u64().unwrap();
    assert!(
        skipped * 10 >= free * 9,
        "skipped {skipped} of {free} free pages: {r}"
    );
    let bytes = r["bytes_sent"].as_u64().unwrap();
    assert!(
        bytes < (128 + 64) << 20,
        "only about the live data is sent: {bytes}"
    );
    check_moved_with_done(src, dst);
}

/// Like `check_moved`, and the destination's balloon told the driver DONE.
fn check_moved_with_done(src: Vmm, dst: Vmm) {
    let line = src.wait_line("guest: hint done", Duration::from_secs(20));
    assert!(field(&line, "released_blocks").unwrap_or(0) > 0, "{line}");
    check_moved(src, dst);
}

#[test]
fn pages_written_after_their_hint_arrive() {
    // hot pages are rewritten all along, also the ones hinted free and then allocated again.
    let (src, dst) = pair(
        "mig-hints-hot",
        "2G",
        "used=128 hot=64 dirty=1024",
        &[BALLOON, HINTING, "--cpus", "boot=2"],
    );
    let url = format!("unix:{}", dst.scratch.path("mig.sock").display());
    let (sent, _) = migrate(
        &src,
        &dst,
        &url,
        &format!("destination_url={url},downtime_ms=50"),
    );
    let r = report(&sent);
    assert_eq!(r["hints"]["used"], true);
    assert!(r["rounds"].as_u64().unwrap() >= 2);
    check_moved(src, dst);
}

#[test]
fn ranges_protocol_hints_every_free_page() {
    let (src, dst) = pair(
        "mig-ranges",
        "2G",
        "used=128 dirty=1024 fragment=256 hint=ranges",
        &[BALLOON, HINTING],
    );
    let ready = src.wait_line("guest: ready", READY);
    let free = field(&ready, "free_pages").unwrap();
    let url = format!("unix:{}", dst.scratch.path("mig.sock").display());
    let (sent, _) = migrate(&src, &dst, &url, &url);
    let r = report(&sent);
    assert_eq!(r["hints"]["mode"], "ranges", "{r}");
    let skipped = r["hints"]["pages_skipped"].as_u64().unwrap();
    // Fragmented free memory (64 KiB holes) is hinted too: nearly every free page.
    assert!(
        skipped * 100 >= free * 97,
        "skipped {skipped} of {free} free pages"
    );
    check_moved(src, dst);
}

#[test]
fn a_guest_that_never_hints_is_migrated_after_the_wait() {
    let (src, dst) = pair(
        "mig-nohint",
        "1G",
        "used=64 dirty=256 hint=none",
        &[BALLOON, HINTING],
    );
    let url = format!("unix:{}", dst.scratch.path("mig.sock").display());
    let (sent, _) = migrate(
        &src,
        &dst,
        &url,
        &format!("destination_url={url},hint_wait_ms=300"),
    );
    let r = report(&sent);
    assert_eq!(r["hints"]["used"], true);
    assert_eq!(r["hints"]["pages_hinted"], 0);
    let wait = r["hints"]["wait_ms"].as_f64().unwrap();
    assert!(
        (290.0..2000.0).contains(&wait),
        "waited {wait} ms for a 300 ms limit"
    );
    assert!(r["bytes_sent"].as_u64().unwrap() >= (64 + 256) << 20);
    check_moved(src, dst);
}

#[test]
fn an_inflated_balloon_stays_inflated() {
    let (src, dst) = pair(
        "mig-inflated",
        "2G",
        "used=64 dirty=512",
        &[BALLOON, HINTING],
    );
    assert!(src
        .remote(&["resize", "--balloon", "256M"])
        .status
        .success());
    src.wait_balloon_pages(65536);
    let url = format!("unix:{}", dst.scratch.path("mig.sock").display());
    let (sent, _) = migrate(&src, &dst, &url, &url);
    report(&sent);
    let info: serde_json::Value = serde_json::from_slice(&dst.remote(&["info"]).stdout).unwrap();
    assert_eq!(info["memory_actual_size"], (2048u64 - 256) << 20, "{info}");
    let c: serde_json::Value = serde_json::from_slice(&dst.remote(&["counters"]).stdout).unwrap();
    assert_eq!(c["balloon"]["actual_pages"], 65536);
    assert_eq!(c["balloon"]["target_pages"], 65536);
    check_moved(src, dst);
}

#[test]
fn ranges_protocol_hints_any_fragmentation() {
    // 3 GiB fragmented into 64 KiB holes: about 25,000 free ranges, many more than the range
    // buffers the guest has, so the guest must reuse them as the device hands them back.
    let (src, dst) = pair(
        "mig-ranges-frag",
        "4G",
        "used=256 fragment=3072 hint=ranges",
        &[BALLOON, HINTING],
    );
    let ready = src.wait_line("guest: ready", READY);
    let free = field(&ready, "free_pages").unwrap();
    let url = format!("unix:{}", dst.scratch.path("mig.sock").display());
    let started = Instant::now();
    let (sent, _) = migrate(&src, &dst, &url, &url);
    let elapsed = started.elapsed();
    let r = report(&sent);
    eprintln!("{free} free pages; migrated in {elapsed:?}; report: {r}");
    let hint = src.wait_line("guest: hint_us=", Duration::from_secs(10));
    eprintln!("guest: {hint}");
    assert_eq!(
        field(&hint, "dropped_ranges"),
        Some(0),
        "the guest hinted every free range: {hint}"
    );
    assert_eq!(r["hints"]["mode"], "ranges", "{r}");
    assert_eq!(r["hints"]["rejected"], 0, "{r}");
    let skipped = r["hints"]["pages_skipped"].as_u64().unwrap();
    let hinted = r["hints"]["pages_hinted"].as_u64().unwrap();
    assert!(hinted >= skipped, "{r}");
    assert!(
        skipped * 100 >= free * 95,
        "skipped {skipped} of {free} free pages: {r}"
    );
    check_moved(src, dst);
}

#[test]
fn a_hint_round_cut_by_the_time_limit_is_counted_incomplete() {
    let (src, dst) = pair(
        "mig-incomplete",
        "1G",
        "used=64 hint=none",
        &[BALLOON, HINTING],
    );
    let before: serde_json::Value =
        serde_json::from_slice(&src.remote(&["counters"]).stdout).unwrap();
    assert_eq!(before["balloon"]["hint_rounds_incomplete"], 0, "{before}");
    let url = format!("unix:{}", dst.scratch.path("mig.sock").display());
    let (sent, _) = migrate(
        &src,
        &dst,
        &url,
        &format!("destination_url={url},hint_wait_ms=200"),
    );
    let r = report(&sent);
    assert_eq!(r["hints"]["pages_hinted"], 0, "{r}");
    // The counters travel with the balloon's state.
    let c: serde_json::Value = serde_json::from_slice(&dst.remote(&["counters"]).stdout).unwrap();
    assert_eq!(c["balloon"]["hint_rounds"], 1, "{c}");
    assert_eq!(c["balloon"]["hint_rounds_incomplete"], 1, "{c}");
    check_moved(src, dst);
}

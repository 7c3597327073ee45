//! End to end: a migration that runs on its own thread while the API answers, its progress,
//! cancelling it in every phase, `timeout_strategy`, the event monitor, and `ch-remote`'s
//! progress line on a terminal.

mod common;

use std::io::Read;
use std::os::fd::{FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use common::Vmm;
use vmm::api::client::send_request;
use vmm::api::ApiRequest;

const READY: Duration = Duration::from_secs(60);
const BALLOON: &str = "--balloon";
const HINTING: &str = "size=0,free_page_hinting=on";

/// `vm.migration-progress` of the VMM at `api`, if it answers with one.
fn progress(api: &Path) -> Option<serde_json::Value> {
    let r = send_request(api, &ApiRequest::VmMigrationProgress).ok()?;
    if !r.is_success() {
        return None;
    }
    serde_json::from_slice(&r.body).ok()
}

/// Polls the progress every 10 ms until `want` holds; returns that progress.
fn wait_progress(
    api: &Path,
    what: &str,
    want: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut last = None;
    while Instant::now() < deadline {
        if let Some(p) = progress(api) {
            if want(&p) {
                return p;
            }
            last = Some(p);
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    panic!("progress never showed {what}; last: {last:?}");
}

/// `ch-remote receive-migration` on `dst` in a thread, once the socket is listening.
fn receive(dst: &Vmm, url: &str) -> JoinHandle<Output> {
    let path = PathBuf::from(url.trim_start_matches("unix:"));
    let _ = std::fs::remove_file(&path);
    let api = dst.api.clone();
    let u = url.to_string();
    let handle = std::thread::spawn(move || common::ch_remote(&api, &["receive-migration", &u]));
    let deadline = Instant::now() + Duration::from_secs(10);
    while !path.exists() {
        assert!(Instant::now() < deadline, "the destination never listened");
        std::thread::sleep(Duration::from_millis(10));
    }
    handle
}

/// `ch-remote send-migration --no-wait`: answered at once with the progress.
fn send_no_wait(src: &Vmm, args: &str) {
    let started = Instant::now();
    let out = src.remote(&["send-migration", "--no-wait", args]);
    assert!(
        out.status.success(),
        "send-migration --no-wait: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let p: serde_json::Value = serde_json::from_slice(&out.stdout).expect("progress JSON");
    assert!(
        !p["state"].as_str().unwrap_or("completed").is_empty(),
        "{p}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "--no-wait returned after {:?}",
        started.elapsed()
    );
}

/// How long a cancel took: the `ch-remote migration-cancel` round trip (the API server looks for
/// late answers every 100 ms), and from the request to the migration's end as its progress
/// shows it.
#[derive(Debug)]
#[allow(dead_code)]
struct CancelTimes {
    round_trip: Duration,
    to_the_end_ms: f64,
}

/// Cancels the running migration on `src`, whose progress was `seen` at `seen_at`.
fn cancel(src: &Vmm, seen: &serde_json::Value, seen_at: Instant) -> CancelTimes {
    let started = Instant::now();
    let out = src.remote(&["migration-cancel"]);
    let round_trip = started.elapsed();
    assert!(
        out.status.success(),
        "migration-cancel: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let p: serde_json::Value = serde_json::from_slice(&out.stdout).expect("progress JSON");
    assert_eq!(p["state"], "cancelled", "{p}");
    let requested_ms =
        seen["elapsed_ms"].as_f64().unwrap_or(0.0) + (started - seen_at).as_secs_f64() * 1000.0;
    CancelTimes {
        round_trip,
        to_the_end_ms: p["elapsed_ms"].as_f64().unwrap_or(0.0) - requested_ms,
    }
}

/// After a cancel: the receiver failed, the source VM runs and verifies on, and the API does
/// what it did before the migration.
fn check_source_runs_on(src: &mut Vmm, receiver: JoinHandle<Output>) {
    let received = receiver.join().expect("receiver thread");
    assert!(
        !received.status.success(),
        "the destination must drop a cancelled migration"
    );
    assert!(src.running(), "the source VMM keeps running");
    let info: serde_json::Value =
        serde_json::from_slice(&src.remote(&["info"]).stdout).expect("info JSON");
    assert_eq!(info["state"], "Running", "{info}");
    let seq = src.last_seq().unwrap_or(0);
    src.wait_seq_above(seq + 1, Duration::from_secs(30));
    let p = progress(&src.api).expect("progress after the end");
    assert_eq!(p["state"], "cancelled", "{p}");
    assert!(p["error"].as_str().is_some_and(|e| !e.is_empty()), "{p}");
}

/// The order of the phases, for checking that progress never goes back.
fn rank(p: &serde_json::Value) -> (u32, u64) {
    let order = match p["state"].as_str().unwrap_or("") {
        "setup" => 0,
        "hinting" => 1,
        "round" => 2,
        "stopped" => 3,
        _ => 4,
    };
    (order, p["round"].as_u64().unwrap_or(0))
}

/// The `migration-*` events of an event monitor file, each line checked to be one JSON event.
fn migration_events(path: &Path) -> Vec<String> {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    text.lines()
        .map(|line| {
            let v: serde_json::Value = serde_json::from_str(line).expect("one JSON event per line");
            assert!(v["timestamp"]["secs"].is_u64(), "{line}");
            assert!(v["timestamp"]["nanos"].is_u64(), "{line}");
            assert!(v["source"].is_string(), "{line}");
            assert!(v.get("properties").is_some(), "{line}");
            v["event"].as_str().unwrap_or_default().to_string()
        })
        .filter(|e| e.starts_with("migration-"))
        .collect()
}

#[test]
fn progress_moves_forward_while_the_api_answers_and_ends_with_the_report() {
    let events = std::env::temp_dir().join(format!("ch-e2e-events-{}", std::process::id()));
    let _ = std::fs::remove_file(&events);
    let monitor = format!("path={}", events.display());
    let src = Vmm::boot(
        "ctl-progress-src",
        "2G",
        "used=128 dirty=1536",
        &[BALLOON, HINTING, "--event-monitor", &monitor],
    );
    src.wait_line("guest: ready", READY);
    src.wait_seq_above(0, READY);
    let dst = Vmm::waiting_with("ctl-progress-dst", |s| {
        vec![
            "--event-monitor".into(),
            format!("path={}", s.path("events").display()),
        ]
    });
    let dst_events = dst.scratch.path("events");
    let url = format!("unix:{}", dst.scratch.path("mig.sock").display());
    let receiver = receive(&dst, &url);

    // Watch from another thread: the progress, and the API's other answers meanwhile.
    let api = src.api.clone();
    let watcher = std::thread::spawn(move || {
        let mut seen = Vec::new();
        let mut answered = 0;
        let deadline = Instant::now() + Duration::from_secs(120);
        while Instant::now() < deadline {
            let Some(p) = progress(&api) else {
                std::thread::sleep(Duration::from_millis(5));
                continue;
            };
            let running = !matches!(
                p["state"].as_str(),
                Some("completed" | "failed" | "cancelled")
            );
            if running && ["hinting", "round"].contains(&p["state"].as_str().unwrap_or("")) {
                let info = send_request(&api, &ApiRequest::VmInfo).map(|r| r.status);
                let ping = send_request(&api, &ApiRequest::VmmPing).map(|r| r.status);
                let counters = send_request(&api, &ApiRequest::VmCounters).map(|r| r.status);
                let pause = send_request(&api, &ApiRequest::VmPause).map(|r| r.status);
                assert_eq!(pause.ok(), Some(409), "vm.pause must be refused meanwhile");
                if [info, ping, counters].iter().all(|s| matches!(s, Ok(200))) {
                    answered += 1;
                }
            }
            seen.push(p.clone());
            if !running {
                break;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        (seen, answered)
    });
    let sent = src.remote(&["send-migration", &url]);
    let (seen, answered) = watcher.join().expect("watcher");
    assert!(
        sent.status.success(),
        "send-migration: {}",
        String::from_utf8_lossy(&sent.stderr)
    );
    assert!(
        sent.stderr.is_empty(),
        "no progress line without a terminal"
    );
    let report: serde_json::Value = serde_json::from_slice(&sent.stdout).expect("report JSON");
    assert_eq!(report["status"], "completed");

    // Monotonic phases, and the hint and round phases were seen while the API answered.
    for pair in seen.windows(2) {
        assert!(
            rank(&pair[0]) <= rank(&pair[1]),
            "progress went back: {} then {}",
            pair[0],
            pair[1]
        );
    }
    let states: Vec<&str> = seen.iter().filter_map(|p| p["state"].as_str()).collect();
    assert!(states.contains(&"round"), "{states:?}");
    assert!(answered > 0, "the API answered while the migration ran");
    let last = seen.last().expect("progress seen");
    assert_eq!(last["state"], "completed", "{last}");
    assert_eq!(
        last["report"], report,
        "the final progress holds the same report"
    );
    assert!(last["pages_hinted"].as_u64().unwrap_or(0) > 0, "{last}");
    let received = receiver.join().expect("receiver");
    assert!(received.status.success());
    // The destination answers the same endpoint with what it received.
    let arrived = progress(&dst.api).expect("destination progress");
    assert_eq!(arrived["role"], "destination", "{arrived}");
    assert_eq!(arrived["state"], "completed", "{arrived}");
    assert_eq!(arrived["rounds_received"], report["rounds"], "{arrived}");
    assert_eq!(arrived["pages_received"], report["pages_sent"], "{arrived}");

    // One event per phase change: setup, hinting, one per round before the stop, stopped,
    // completed; the destination: listening, receiving, restoring, completed.
    let mut src = src;
    assert_eq!(src.wait_exit(Duration::from_secs(15)), 0);
    let src_events = migration_events(&events);
    let rounds = report["rounds"].as_u64().expect("rounds") as usize;
    assert_eq!(src_events.len(), rounds + 3, "{src_events:?}");
    assert_eq!(
        src_events.first().map(String::as_str),
        Some("migration-setup")
    );
    assert_eq!(
        src_events.last().map(String::as_str),
        Some("migration-completed")
    );
    let dst_seen = migration_events(&dst_events);
    assert_eq!(
        dst_seen,
        [
            "migration-listening",
            "migration-receiving",
            "migration-restoring",
            "migration-completed"
        ],
    );
    let _ = std::fs::remove_file(&events);
    let seq = src.last_seq().unwrap_or(0);
    src.wait_seq_above(seq, Duration::from_secs(20));
    let mut dst = dst;
    assert!(dst.remote(&["shutdown"]).status.success());
    assert_eq!(dst.wait_exit(Duration::from_secs(10)), 0);
}

#[test]
fn a_cancel_in_any_phase_leaves_the_source_running_and_the_destination_ready() {
    // hint=none: the hint round lasts the 500 ms idle interval; hot=768: dirty rounds never
    // fit a 1 ms downtime, and the last round after a pause (hundreds of MiB of hot pages)
    // takes long enough to be caught and cancelled.
    let mut src = Vmm::boot(
        "ctl-cancel-src",
        "2G",
        "used=64 hot=768 hint=none",
        &[BALLOON, HINTING],
    );
    src.wait_line("guest: ready", READY);
    src.wait_seq_above(0, READY);
    let dst = Vmm::waiting("ctl-cancel-dst");
    let url = format!("unix:{}", dst.scratch.path("mig.sock").display());
    let mut latencies = Vec::new();

    // 1. During the hint round.
    let receiver = receive(&dst, &url);
    send_no_wait(&src, &url);
    let seen = wait_progress(&src.api, "hinting", |p| p["state"] == "hinting");
    latencies.push(("hinting", cancel(&src, &seen, Instant::now())));
    check_source_runs_on(&mut src, receiver);

    // 2. During round 0 (no hints, no zero page scan: all 2 GiB are sent).
    let receiver = receive(&dst, &url);
    send_no_wait(
        &src,
        &format!("destination_url={url},free_page_hints=off,zero_pages=off"),
    );
    let seen = wait_progress(&src.api, "round 0 under way", |p| {
        p["state"] == "round" && p["round"] == 0 && p["round_bytes_sent"].as_u64() > Some(0)
    });
    latencies.push(("round 0", cancel(&src, &seen, Instant::now())));
    check_source_runs_on(&mut src, receiver);

    // 3. During a dirty round.
    let receiver = receive(&dst, &url);
    send_no_wait(
        &src,
        &format!("destination_url={url},free_page_hints=off,downtime_ms=1"),
    );
    let seen = wait_progress(&src.api, "a dirty round", |p| {
        p["state"] == "round" && p["round"].as_u64() >= Some(1)
    });
    latencies.push(("dirty round", cancel(&src, &seen, Instant::now())));
    check_source_runs_on(&mut src, receiver);

    // 4. While paused, after timeout_strategy=ignore gave up converging.
    let receiver = receive(&dst, &url);
    send_no_wait(
        &src,
        &format!(
            "destination_url={url},free_page_hints=off,downtime_ms=1,timeout_s=1,\
             timeout_strategy=ignore"
        ),
    );
    let stopped = wait_progress(&src.api, "stopped", |p| {
        p["state"] == "stopped" || p["state"] == "completed"
    });
    assert_eq!(stopped["state"], "stopped", "caught too late: {stopped}");
    latencies.push(("stopped", cancel(&src, &stopped, Instant::now())));
    check_source_runs_on(&mut src, receiver);
    eprintln!("cancel latencies: {latencies:?}");
    for (phase, times) in &latencies {
        // 100 ms, plus one write timeout the source never waits for here.
        assert!(
            times.to_the_end_ms < 1000.0,
            "a cancel during {phase} took {times:?}"
        );
    }

    // Finally a migration that completes, to the same destination.
    let receiver = receive(&dst, &url);
    let sent = src.remote(&[
        "send-migration",
        &format!("destination_url={url},downtime_ms=5000"),
    ]);
    assert!(
        sent.status.success(),
        "the migration after the cancels: {}",
        String::from_utf8_lossy(&sent.stderr)
    );
    assert!(receiver.join().expect("receiver").status.success());
    assert_eq!(src.wait_exit(Duration::from_secs(15)), 0);
    let seq = src.last_seq().unwrap_or(0);
    src.wait_seq_above(seq, Duration::from_secs(30));
    let mut dst = dst;
    let info: serde_json::Value =
        serde_json::from_slice(&dst.remote(&["info"]).stdout).expect("info JSON");
    assert_eq!(info["state"], "Running");
    assert!(dst.remote(&["shutdown"]).status.success());
    assert_eq!(dst.wait_exit(Duration::from_secs(10)), 0);
}

/// Opens a pseudo-terminal of 100 columns: (controller, terminal).
fn open_pty() -> (OwnedFd, OwnedFd) {
    let (mut controller, mut terminal) = (-1, -1);
    let size = libc::winsize {
        ws_row: 24,
        ws_col: 100,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: openpty writes two descriptors into the two ints; the name is not asked for and
    // the sizes are read from a live struct.
    let rc = unsafe {
        libc::openpty(
            &mut controller,
            &mut terminal,
            std::ptr::null_mut(),
            std::ptr::null(),
            &size,
        )
    };
    assert_eq!(rc, 0, "openpty: {}", std::io::Error::last_os_error());
    // SAFETY: both descriptors were just opened and are owned by nobody else.
    unsafe {
        (
            OwnedFd::from_raw_fd(controller),
            OwnedFd::from_raw_fd(terminal),
        )
    }
}

#[test]
fn timeout_strategy_cancel_gives_up_and_a_terminal_shows_a_progress_line() {
    let mut src = Vmm::boot(
        "ctl-timeout-src",
        "2G",
        "used=64 hot=256",
        &[BALLOON, HINTING],
    );
    src.wait_line("guest: ready", READY);
    src.wait_seq_above(0, READY);
    let dst = Vmm::waiting("ctl-timeout-dst");
    let url = format!("unix:{}", dst.scratch.path("mig.sock").display());

    // ch-remote with its standard error on a terminal, its standard output a pipe.
    let receiver = receive(&dst, &url);
    let (controller, terminal) = open_pty();
    let child = Command::new(env!("CARGO_BIN_EXE_ch-remote"))
        .arg("--api-socket")
        .arg(&src.api)
        .args([
            "send-migration",
            // Round 0 of all 2 GiB takes seconds here: the timeout passes during it.
            &format!(
                "destination_url={url},free_page_hints=off,zero_pages=off,downtime_ms=1,\
                 timeout_s=1,timeout_strategy=cancel"
            ),
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::from(terminal))
        .spawn()
        .expect("spawn ch-remote");
    let reader = std::thread::spawn(move || {
        let mut file = std::fs::File::from(controller);
        let mut text = Vec::new();
        let mut buf = [0u8; 4096];
        // Ends with EIO once the terminal's last user has gone.
        while let Ok(n) = file.read(&mut buf) {
            if n == 0 {
                break;
            }
            text.extend_from_slice(&buf[..n]);
        }
        String::from_utf8_lossy(&text).into_owned()
    });
    let out = child.wait_with_output().expect("ch-remote");
    let screen = reader.join().expect("pty reader");
    assert_eq!(out.status.code(), Some(1), "a migration that gave up fails");
    assert!(out.stdout.is_empty(), "nothing on stdout: {:?}", out.stdout);
    assert!(screen.contains("% round 0, "), "progress line: {screen:?}");
    assert!(screen.contains("MiB/s"), "{screen:?}");
    assert!(
        screen.contains("was cancelled: did not converge within timeout_s=1"),
        "{screen:?}"
    );
    let p = progress(&src.api).expect("progress");
    assert_eq!(p["state"], "cancelled", "{p}");
    check_source_runs_on(&mut src, receiver);

    // The same migration with time to spare for the 256 MiB hot set completes.
    let receiver = receive(&dst, &url);
    let sent = src.remote(&[
        "send-migration",
        &format!("destination_url={url},downtime_ms=5000"),
    ]);
    assert!(
        sent.status.success(),
        "{}",
        String::from_utf8_lossy(&sent.stderr)
    );
    assert!(
        sent.stderr.is_empty(),
        "no progress line without a terminal"
    );
    assert!(receiver.join().expect("receiver").status.success());
    assert_eq!(src.wait_exit(Duration::from_secs(15)), 0);
    let mut dst = dst;
    assert!(dst.remote(&["shutdown"]).status.success());
    assert_eq!(dst.wait_exit(Duration::from_secs(10)), 0);
}

//! End to end: migration over TLS (`tls_dir=`) and over several connections (`connections=`),
//! with the test guest's own verification of every live page as the judge of integrity.

mod common;

use std::path::Path;
use std::process::Output;
use std::time::Duration;

use common::{migration_report as report, wait_tcp_listen, Scratch, Vmm};

const READY: Duration = Duration::from_secs(60);

/// A directory of TLS files made by scripts/make-test-certs.sh (a fresh CA each time).
fn certs(scratch: &Scratch, name: &str) -> String {
    let dir = scratch.path(name);
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/make-test-certs.sh");
    let out = std::process::Command::new("bash")
        .arg(script)
        .arg(&dir)
        .output()
        .expect("run make-test-certs.sh");
    assert!(
        out.status.success(),
        "make-test-certs.sh failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    dir.display().to_string()
}

/// A free TCP port on the loopback.
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port()
}

/// Runs receive-migration on `dst` (in a thread) and send-migration on `src`.
fn migrate(src: &Vmm, dst: &Vmm, port: u16, receive: &str, send: &str) -> (Output, Output) {
    let dst_api = dst.api.clone();
    let receive = receive.to_string();
    let receiver =
        std::thread::spawn(move || common::ch_remote(&dst_api, &["receive-migration", &receive]));
    wait_tcp_listen(port, Duration::from_secs(10));
    let sent = src.remote(&["send-migration", send]);
    (sent, receiver.join().expect("receiver thread"))
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// A running source guest (live, hot and recently freed data) and a waiting destination.
fn pair(tag: &str) -> (Vmm, Vmm) {
    let src = Vmm::boot(
        &format!("{tag}-src"),
        "1G",
        "used=96 hot=8 dirty=128",
        &["--cpus", "boot=2"],
    );
    src.wait_line("guest: ready", READY);
    src.wait_seq_above(0, READY);
    (src, Vmm::waiting(&format!("{tag}-dst")))
}

/// After a migration: the source exited 0, the guest verifies on with a higher seq.
fn check_moved(mut src: Vmm, mut dst: Vmm) {
    assert_eq!(src.wait_exit(Duration::from_secs(10)), 0);
    let before = src.last_seq().unwrap_or(0);
    assert!(src.wait_seq_above(before, Duration::from_secs(20)) > before);
    assert!(!src.serial_text().contains("FAILED"));
    // No thread made a call outside its seccomp list (such a call prints a line).
    for vmm in [&src, &dst] {
        assert!(
            !vmm.stderr_text().contains("seccomp"),
            "{}",
            vmm.stderr_text()
        );
    }
    assert!(dst.remote(&["shutdown"]).status.success());
    assert_eq!(dst.wait_exit(Duration::from_secs(10)), 0);
}

/// The guest still runs on `src` and keeps verifying.
fn check_still_running(src: &mut Vmm) {
    assert!(src.running(), "the source VMM must keep running");
    let before = src.last_seq().unwrap_or(0);
    assert!(src.wait_seq_above(before, Duration::from_secs(20)) > before);
    let info = src.remote(&["info"]);
    let info: serde_json::Value = serde_json::from_slice(&info.stdout).expect("info JSON");
    assert_eq!(info["state"], "Running");
}

/// One line on stderr (ch-remote's error), containing `needle`.
fn one_error_line(out: &Output, needle: &str) -> String {
    assert!(!out.status.success(), "expected a failure");
    let text = stderr(out);
    assert_eq!(text.trim_end().lines().count(), 1, "one line: {text}");
    assert!(text.contains(needle), "{needle:?} not in: {text}");
    text
}

#[test]
fn tls_migration_arrives_intact() {
    let (src, dst) = pair("tls");
    let dir = certs(&dst.scratch, "tls");
    let port = free_port();
    let (sent, received) = migrate(
        &src,
        &dst,
        port,
        &format!("receiver_url=tcp:127.0.0.1:{port},tls_dir={dir}"),
        &format!("destination_url=tcp:127.0.0.1:{port},tls_dir={dir},downtime_ms=50"),
    );
    let r = report(&sent);
    assert!(received.status.success(), "{}", stderr(&received));
    assert_eq!(r["transport"]["tls"], true, "{r}");
    assert_eq!(r["transport"]["connections"], 1, "{r}");
    assert!(r["bytes_sent"].as_u64().unwrap() >= 96 << 20, "{r}");
    // wire_bytes counts the protocol's bytes (headers, tables, pages) before encryption.
    assert!(r["wire_bytes"].as_u64().unwrap() > r["bytes_sent"].as_u64().unwrap());
    check_moved(src, dst);
}

#[test]
fn four_connections_arrive_intact() {
    let (src, dst) = pair("conn4");
    let port = free_port();
    let url = format!("tcp:127.0.0.1:{port}");
    let (sent, received) = migrate(
        &src,
        &dst,
        port,
        &url,
        &format!("destination_url={url},connections=4,free_page_hints=off,downtime_ms=50"),
    );
    let r = report(&sent);
    assert!(received.status.success(), "{}", stderr(&received));
    assert_eq!(r["transport"]["connections"], 4, "{r}");
    assert_eq!(r["transport"]["tls"], false, "{r}");
    // Without hints the freed (dirty) data is sent too, in parts on every connection.
    assert!(r["bytes_sent"].as_u64().unwrap() >= (96 + 128) << 20, "{r}");
    check_moved(src, dst);
}

#[test]
fn tls_with_three_connections_arrives_intact() {
    let (src, dst) = pair("tls-conn3");
    let dir = certs(&dst.scratch, "tls");
    let port = free_port();
    let (sent, received) = migrate(
        &src,
        &dst,
        port,
        &format!("receiver_url=tcp:localhost:{port},tls_dir={dir}"),
        &format!("destination_url=tcp:localhost:{port},tls_dir={dir},connections=3"),
    );
    let r = report(&sent);
    assert!(received.status.success(), "{}", stderr(&received));
    assert_eq!(r["transport"]["connections"], 3, "{r}");
    assert_eq!(r["transport"]["tls"], true, "{r}");
    check_moved(src, dst);
}

#[test]
fn a_peer_of_another_ca_is_refused_and_the_source_runs_on() {
    let (mut src, mut dst) = pair("tls-wrong-ca");
    let ours = certs(&src.scratch, "ours");
    let theirs = certs(&dst.scratch, "theirs");

    // Missing files: one line before anything starts.
    let missing = src.scratch.path("no-such-dir");
    let out = src.remote(&[
        "send-migration",
        &format!(
            "destination_url=tcp:127.0.0.1:9,tls_dir={}",
            missing.display()
        ),
    ]);
    one_error_line(&out, "no-such-dir/ca-cert.pem");
    check_still_running(&mut src);

    // The destination's certificate is from another CA: the source refuses it.
    let port = free_port();
    let (sent, received) = migrate(
        &src,
        &dst,
        port,
        &format!("receiver_url=tcp:127.0.0.1:{port},tls_dir={theirs}"),
        &format!("destination_url=tcp:127.0.0.1:{port},tls_dir={ours}"),
    );
    one_error_line(
        &sent,
        "the destination's certificate does not chain to our ca-cert.pem",
    );
    one_error_line(&received, "the source refused our certificate");
    check_still_running(&mut src);

    // The source trusts the destination's CA, but its own certificate is from another CA:
    // the destination refuses it.
    let mixed = src.scratch.path("mixed");
    std::fs::create_dir_all(&mixed).unwrap();
    for (from, file) in [
        (&theirs, "ca-cert.pem"),
        (&ours, "client-cert.pem"),
        (&ours, "client-key.pem"),
    ] {
        std::fs::copy(Path::new(from).join(file), mixed.join(file)).unwrap();
    }
    let port = free_port();
    let (sent, received) = migrate(
        &src,
        &dst,
        port,
        &format!("receiver_url=tcp:127.0.0.1:{port},tls_dir={theirs}"),
        &format!(
            "destination_url=tcp:127.0.0.1:{port},tls_dir={}",
            mixed.display()
        ),
    );
    one_error_line(&sent, "the destination refused our certificate");
    one_error_line(
        &received,
        "the source's certificate does not chain to our ca-cert.pem",
    );
    check_still_running(&mut src);
    assert!(!src.serial_text().contains("FAILED"));

    // Both VMMs are fine: the destination answers, and the source still migrates with the
    // right files.
    assert!(dst.running());
    assert!(dst.remote(&["ping"]).status.success());
    let port = free_port();
    let (sent, received) = migrate(
        &src,
        &dst,
        port,
        &format!("receiver_url=tcp:127.0.0.1:{port},tls_dir={theirs}"),
        &format!("destination_url=tcp:127.0.0.1:{port},tls_dir={theirs}"),
    );
    report(&sent);
    assert!(received.status.success(), "{}", stderr(&received));
    check_moved(src, dst);
}

//! `ch-remote`: argument errors, transport errors, and what it sends and prints, against a small
//! fake API server in the test (no KVM needed).

use std::io::{Read, Write};
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::thread;

fn ch_remote(socket: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_ch-remote"))
        .arg("--api-socket")
        .arg(socket)
        .args(args)
        .output()
        .unwrap()
}

fn socket_path(name: &str) -> PathBuf {
    std::env::temp_dir().join(format!("cli-rem-{}-{name}.sock", std::process::id()))
}

/// Expects exit 1 and one stderr line starting `ch-remote: ` that contains `needle`.
fn fails(out: &Output, needle: &str) {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(out.stdout.is_empty(), "{:?}", out.stdout);
    assert_eq!(stderr.lines().count(), 1, "{stderr:?}");
    assert!(stderr.starts_with("ch-remote: "), "{stderr:?}");
    assert!(stderr.contains(needle), "{stderr:?} lacks {needle:?}");
}

#[test]
fn missing_socket() {
    let out = ch_remote(Path::new("/nonexistent/api.sock"), &["ping"]);
    fails(&out, "cannot connect to API socket /nonexistent/api.sock");
}

#[test]
fn argument_errors() {
    // All caught before connecting: the socket does not exist.
    let s = Path::new("/nonexistent/api.sock");
    let out = Command::new(env!("CARGO_BIN_EXE_ch-remote"))
        .arg("ping")
        .output()
        .unwrap();
    fails(&out, "--api-socket");
    fails(&ch_remote(s, &[]), "no command given");
    fails(
        &ch_remote(s, &["frobnicate"]),
        "unrecognized subcommand 'frobnicate'",
    );
    fails(
        &ch_remote(s, &["ping", "extra"]),
        "unexpected argument 'extra'",
    );
    fails(&ch_remote(s, &["resize"]), "--balloon");
    fails(
        &ch_remote(s, &["resize", "--balloon", "12Q"]),
        "invalid size \"12Q\"",
    );
    fails(&ch_remote(s, &["send-migration"]), "<URL>");
    fails(
        &ch_remote(s, &["send-migration", "http://x"]),
        "is not unix:<path> or tcp:<host>:<port>",
    );
    fails(
        &ch_remote(s, &["send-migration", "tcp:host"]),
        "is not unix:<path>",
    );
    fails(
        &ch_remote(s, &["send-migration", "downtime_ms=5"]),
        "\"destination_url\" is required",
    );
    fails(
        &ch_remote(
            s,
            &["send-migration", "destination_url=unix:/x,zero_pages=maybe"],
        ),
        "zero_pages must be on or off",
    );
    fails(
        &ch_remote(s, &["send-migration", "destination_url=unix:/x,speed=9"]),
        "unknown option \"speed\"",
    );
    fails(
        &ch_remote(s, &["receive-migration", "/tmp/x"]),
        "is not unix:<path>",
    );
    fails(
        &ch_remote(s, &["balloon-hints", "go"]),
        "expected start, stop or done",
    );
    fails(
        &ch_remote(s, &["create", "/nonexistent/vm.json"]),
        "cannot read /nonexistent/vm.json",
    );
    let json = std::env::temp_dir().join(format!("cli-rem-{}-vm.json", std::process::id()));
    std::fs::write(&json, br#"{"disks": []}"#).unwrap();
    fails(
        &ch_remote(s, &["create", json.to_str().unwrap()]),
        "unknown field `disks`",
    );
    let _ = std::fs::remove_file(&json);
}

/// Serves one connection: returns the raw request, answers `response`.
fn serve_once(listener: &UnixListener, response: &str) -> String {
    let (mut stream, _) = listener.accept().unwrap();
    let mut request = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        let n = stream.read(&mut chunk).unwrap();
        request.extend_from_slice(&chunk[..n]);
        let text = String::from_utf8_lossy(&request).into_owned();
        if let Some(end) = text.find("\r\n\r\n") {
            let length = text
                .lines()
                .find_map(|l| l.strip_prefix("Content-Length: "))
                .map_or(0, |v| v.trim().parse::<usize>().unwrap());
            if request.len() >= end + 4 + length {
                break;
            }
        }
        if n == 0 {
            break;
        }
    }
    stream.write_all(response.as_bytes()).unwrap();
    String::from_utf8(request).unwrap()
}

#[test]
fn requests_and_output() {
    let path = socket_path("fake");
    let _ = std::fs::remove_file(&path);
    let listener = UnixListener::bind(&path).unwrap();
    let server = thread::spawn(move || {
        let mut requests = Vec::new();
        for response in [
            "HTTP/1.1 200 OK\r\nContent-Length: 22\r\n\r\n{\"status\":\"completed\"}",
            "HTTP/1.1 204 No Content\r\n\r\n",
            "HTTP/1.1 409 Conflict\r\nContent-Length: 29\r\n\r\n{\"error\":\"VM is not running\"}",
            "HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}",
            "garbage",
        ] {
            requests.push(serve_once(&listener, response));
        }
        requests
    });

    let out = ch_remote(
        &path,
        &[
            "send-migration",
            "destination_url=unix:/tmp/dst,zero_pages=off,hint_wait_ms=50",
        ],
    );
    assert_eq!(out.status.code(), Some(0));
    assert_eq!(out.stdout, b"{\"status\":\"completed\"}\n");
    assert!(out.stderr.is_empty());

    let out = ch_remote(&path, &["balloon-hints", "start"]);
    assert_eq!(out.status.code(), Some(0));
    assert!(out.stdout.is_empty());

    let out = ch_remote(&path, &["pause"]);
    fails(&out, "VM is not running");
    assert_eq!(
        String::from_utf8_lossy(&out.stderr),
        "ch-remote: VM is not running\n"
    );

    let out = ch_remote(&path, &["resize", "--balloon", "64M"]);
    assert_eq!(out.status.code(), Some(0));

    fails(&ch_remote(&path, &["info"]), "malformed API response");

    let requests = server.join().unwrap();
    assert!(requests[0].starts_with("PUT /api/v1/vm.send-migration HTTP/1.1\r\n"));
    let body = requests[0].split("\r\n\r\n").nth(1).unwrap();
    let body: serde_json::Value = serde_json::from_str(body).unwrap();
    assert_eq!(
        body,
        serde_json::json!({"destination_url": "unix:/tmp/dst", "local": false, "downtime_ms": 300,
            "timeout_s": 3600, "free_page_hints": true, "zero_pages": false, "hint_wait_ms": 50})
    );
    assert!(requests[1].starts_with("PUT /api/v1/vm.balloon-hints HTTP/1.1\r\n"));
    assert!(requests[1].ends_with("\r\n\r\n{\"action\":\"start\"}"));
    assert!(requests[2].starts_with("PUT /api/v1/vm.pause HTTP/1.1\r\n"));
    assert!(requests[3].ends_with("\r\n\r\n{\"desired_balloon\":67108864}"));
    assert!(requests[4].starts_with("GET /api/v1/vm.info HTTP/1.1\r\n"));
    let _ = std::fs::remove_file(&path);
}

/// An HTTP response with a JSON body.
fn json_response(status: &str, body: &str) -> String {
    format!(
        "HTTP/1.1 {status}\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
}

/// `send-migration` answered 202: ch-remote follows vm.migration-progress to the end, prints the
/// report on success and one error line on failure; `--no-wait` prints the first answer.
#[test]
fn send_migration_follows_the_progress() {
    let path = socket_path("follow");
    let _ = std::fs::remove_file(&path);
    let listener = UnixListener::bind(&path).unwrap();
    let report = r#"{"status":"completed","rounds":2}"#;
    let server = thread::spawn(move || {
        let mut requests = Vec::new();
        for response in [
            // 1. Followed to a completed migration.
            json_response("202 Accepted", r#"{"state":"setup"}"#),
            json_response(
                "200 OK",
                r#"{"state":"round","round":0,"round_bytes_planned":8192}"#,
            ),
            json_response(
                "200 OK",
                &format!(r#"{{"state":"completed","report":{report},"error":null}}"#),
            ),
            // 2. Followed to a cancelled one.
            json_response("202 Accepted", r#"{"state":"setup"}"#),
            json_response(
                "200 OK",
                r#"{"state":"cancelled","report":null,"error":"did not converge"}"#,
            ),
            // 3. --no-wait.
            json_response("202 Accepted", r#"{"state":"setup"}"#),
        ] {
            requests.push(serve_once(&listener, &response));
        }
        requests
    });

    let out = ch_remote(&path, &["send-migration", "unix:/tmp/dst"]);
    assert_eq!(out.status.code(), Some(0), "{:?}", out);
    assert!(out.stdout.ends_with(b"}\n"), "{:?}", out.stdout);
    let printed: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        printed,
        serde_json::from_str::<serde_json::Value>(report).unwrap()
    );
    assert!(out.stderr.is_empty(), "no progress line without a terminal");

    let out = ch_remote(&path, &["send-migration", "unix:/tmp/dst"]);
    fails(&out, "migration was cancelled: did not converge");

    let out = ch_remote(&path, &["send-migration", "--no-wait", "unix:/tmp/dst"]);
    assert_eq!(out.status.code(), Some(0));
    assert_eq!(out.stdout, b"{\"state\":\"setup\"}\n");

    let requests = server.join().unwrap();
    for i in [0, 3, 5] {
        assert!(requests[i].starts_with("PUT /api/v1/vm.send-migration HTTP/1.1\r\n"));
    }
    for i in [1, 2, 4] {
        assert!(requests[i].starts_with("GET /api/v1/vm.migration-progress HTTP/1.1\r\n"));
    }
    let _ = std::fs::remove_file(&path);
}

/// Against the real VMM: ping, then shutdown-vmm ends the process. Needs /dev/kvm (the VMM opens
/// it at start): without it the test fails rather than skipping.
#[test]
fn ping_and_shutdown_vmm() {
    assert!(
        std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/kvm")
            .is_ok(),
        "/dev/kvm is not usable: this test needs KVM"
    );
    let path = socket_path("vmm");
    let _ = std::fs::remove_file(&path);
    let mut vmm = Command::new(env!("CARGO_BIN_EXE_cloud-hypervisor"))
        .arg("--api-socket")
        .arg(format!("path={}", path.display()))
        .spawn()
        .unwrap();
    for _ in 0..200 {
        if path.exists() {
            break;
        }
        thread::sleep(std::time::Duration::from_millis(25));
    }
    let out = ch_remote(&path, &["ping"]);
    if out.status.code() != Some(0) {
        let _ = vmm.kill();
    }
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice::<serde_json::Value>(&out.stdout).unwrap();
    // A client that sends half a request and stalls does not hold the API for others (the
    // server's read deadline is 10 s).
    let mut stalled = std::os::unix::net::UnixStream::connect(&path).unwrap();
    stalled.write_all(b"GET /api/v1/vm").unwrap();
    let asked = std::time::Instant::now();
    let out = ch_remote(&path, &["ping"]);
    assert_eq!(out.status.code(), Some(0));
    assert!(
        asked.elapsed() < std::time::Duration::from_secs(5),
        "ping took {:?} next to a stalled client",
        asked.elapsed()
    );
    drop(stalled);
    let out = ch_remote(&path, &["shutdown-vmm"]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let status = vmm.wait().unwrap();
    assert!(status.success());
    let _ = std::fs::remove_file(&path);
}

/// The VMM never replaces an API socket path that is not a socket: it refuses to start with one
/// line, and the file is left as it was.
#[test]
fn an_api_socket_path_that_is_not_a_socket_is_refused() {
    let path = socket_path("plain-file");
    std::fs::write(&path, b"precious").unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_cloud-hypervisor"))
        .arg("--api-socket")
        .arg(&path)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");
    assert!(stderr.contains("is not a socket"), "{stderr}");
    assert_eq!(std::fs::read(&path).unwrap(), b"precious");
    std::fs::remove_file(&path).unwrap();
}

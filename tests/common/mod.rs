//! Shared helpers for the end-to-end tests: the test guest, a VMM process with an API socket
//! and a serial log, and `ch-remote`.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// Fails loudly when KVM is missing: these tests must never pass by skipping.
pub fn require_kvm() {
    assert!(
        Path::new("/dev/kvm").exists(),
        "/dev/kvm is missing: the end-to-end tests need KVM"
    );
}

/// The test guest ELF, built once per test binary by scripts/build-test-guest.sh.
pub fn guest_elf() -> &'static Path {
    static ELF: OnceLock<PathBuf> = OnceLock::new();
    ELF.get_or_init(|| {
        let root = Path::new(env!("CARGO_MANIFEST_DIR"));
        let out = Command::new("bash")
            .arg(root.join("scripts/build-test-guest.sh"))
            .stderr(Stdio::inherit())
            .output()
            .expect("run scripts/build-test-guest.sh");
        assert!(out.status.success(), "building the test guest failed");
        let stdout = String::from_utf8_lossy(&out.stdout);
        let last = stdout
            .lines()
            .last()
            .expect("build script printed the ELF path");
        PathBuf::from(last.trim())
    })
}

/// A scratch directory removed at drop.
pub struct Scratch(pub PathBuf);

impl Scratch {
    /// A new empty directory under the system temp dir.
    pub fn new(tag: &str) -> Self {
        static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("ch-e2e-{tag}-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("create scratch dir");
        Scratch(dir)
    }

    /// A path inside the directory.
    pub fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A `cloud-hypervisor` process with an API socket and its serial port in a file.
pub struct Vmm {
    pub child: Child,
    pub api: PathBuf,
    pub serial: PathBuf,
    pub scratch: Scratch,
}

impl Vmm {
    /// Boots the test guest: `memory` like "1G", `cmdline` the guest's, `extra` more flags.
    pub fn boot(tag: &str, memory: &str, cmdline: &str, extra: &[&str]) -> Vmm {
        require_kvm();
        let scratch = Scratch::new(tag);
        let api = scratch.path("api.sock");
        let serial = scratch.path("serial.log");
        let mut args: Vec<String> = vec![
            "--api-socket".into(),
            api.display().to_string(),
            "--kernel".into(),
            guest_elf().display().to_string(),
            "--memory".into(),
            format!("size={memory}"),
            "--cmdline".into(),
            cmdline.into(),
            "--serial".into(),
            format!("file={}", serial.display()),
        ];
        args.extend(extra.iter().map(|s| s.to_string()));
        Self::spawn(scratch, api, serial, &args)
    }

    /// Starts a VMM that only serves its API (to receive a migration, say).
    pub fn waiting(tag: &str) -> Vmm {
        Self::waiting_with(tag, |_| Vec::new())
    }

    /// Like [`Vmm::waiting`], with more flags, made from the scratch directory.
    pub fn waiting_with(tag: &str, extra: impl FnOnce(&Scratch) -> Vec<String>) -> Vmm {
        require_kvm();
        let scratch = Scratch::new(tag);
        let api = scratch.path("api.sock");
        let serial = scratch.path("serial.log");
        let mut args = vec!["--api-socket".to_string(), api.display().to_string()];
        args.extend(extra(&scratch));
        Self::spawn(scratch, api, serial, &args)
    }

    fn spawn(scratch: Scratch, api: PathBuf, serial: PathBuf, args: &[String]) -> Vmm {
        let stderr = std::fs::File::create(scratch.path("vmm.stderr")).expect("stderr file");
        let child = Command::new(env!("CARGO_BIN_EXE_cloud-hypervisor"))
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr)
            .spawn()
            .expect("spawn cloud-hypervisor");
        let vmm = Vmm {
            child,
            api,
            serial,
            scratch,
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        while !vmm.api.exists() {
            assert!(Instant::now() < deadline, "API socket did not appear");
            std::thread::sleep(Duration::from_millis(20));
        }
        vmm
    }

    /// Runs `ch-remote --api-socket <this VMM's socket> args...`.
    pub fn remote(&self, args: &[&str]) -> Output {
        ch_remote(&self.api, args)
    }

    /// The complete lines of the serial log so far.
    pub fn serial_text(&self) -> String {
        complete_lines(&self.serial)
    }

    /// Waits for a serial line starting with `prefix`; returns it. Panics with the log on timeout.
    pub fn wait_line(&self, prefix: &str, timeout: Duration) -> String {
        wait_line_in(&self.serial, prefix, 0, timeout)
    }

    /// The highest `verify ok seq=` seen so far.
    pub fn last_seq(&self) -> Option<u64> {
        last_verify_seq(&self.serial_text())
    }

    /// Waits until a `verify ok` with seq above `above` appears; returns that seq.
    pub fn wait_seq_above(&self, above: u64, timeout: Duration) -> u64 {
        let deadline = Instant::now() + timeout;
        loop {
            let text = self.serial_text();
            assert!(
                !text.contains("verify FAILED"),
                "guest reported a failure:\n{text}"
            );
            if let Some(seq) = last_verify_seq(&text) {
                if seq > above {
                    return seq;
                }
            }
            assert!(
                Instant::now() < deadline,
                "no verify ok above seq {above} within {timeout:?}; serial:\n{text}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Waits until the guest's balloon driver holds exactly `pages` pages (vm.counters).
    pub fn wait_balloon_pages(&self, pages: u64) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let out = self.remote(&["counters"]);
            let c: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
            if c["balloon"]["actual_pages"] == pages {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "balloon never reached {pages} pages: {c}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Waits for the process to exit; returns its exit code.
    pub fn wait_exit(&mut self, timeout: Duration) -> i32 {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().expect("wait for VMM") {
                return status.code().unwrap_or(-1);
            }
            assert!(
                Instant::now() < deadline,
                "VMM did not exit within {timeout:?}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Whether the process is still running.
    pub fn running(&mut self) -> bool {
        self.child.try_wait().ok().flatten().is_none()
    }

    /// Everything the process wrote on stderr so far.
    pub fn stderr_text(&self) -> String {
        std::fs::read_to_string(self.scratch.path("vmm.stderr")).unwrap_or_default()
    }
}

impl Drop for Vmm {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            // The scratch directory goes away with us: show what the VMM said first.
            eprintln!(
                "--- VMM stderr ({}):\n{}",
                self.api.display(),
                self.stderr_text()
            );
            let serial = self.serial_text();
            let tail: Vec<&str> = serial.lines().rev().take(20).collect();
            eprintln!("--- serial, last lines:");
            for line in tail.iter().rev() {
                eprintln!("{line}");
            }
        }
    }
}

/// Runs ch-remote against `api`.
pub fn ch_remote(api: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_ch-remote"))
        .arg("--api-socket")
        .arg(api)
        .args(args)
        .output()
        .expect("run ch-remote")
}

/// The highest `guest: verify ok seq=<n>` in `text`.
pub fn last_verify_seq(text: &str) -> Option<u64> {
    text.lines()
        .filter_map(|l| l.strip_prefix("guest: verify ok seq="))
        .filter_map(|rest| rest.split_whitespace().next()?.parse().ok())
        .max()
}

/// Waits for a line starting with `prefix` in a file, skipping the first `skip` matches.
pub fn wait_line_in(path: &Path, prefix: &str, skip: usize, timeout: Duration) -> String {
    let deadline = Instant::now() + timeout;
    loop {
        let text = complete_lines(path);
        let line = text.lines().filter(|l| l.starts_with(prefix)).nth(skip);
        if let Some(line) = line {
            return line.to_string();
        }
        if Instant::now() >= deadline {
            let text = std::fs::read_to_string(path).unwrap_or_default();
            panic!("no line '{prefix}' within {timeout:?}; serial:\n{text}");
        }
        std::thread::sleep(Duration::from_millis(25));
    }
}

/// The file's text up to its last newline: a line still being written is left out.
pub fn complete_lines(path: &Path) -> String {
    let mut text = std::fs::read_to_string(path).unwrap_or_default();
    let end = text.rfind('\n').map_or(0, |i| i + 1);
    text.truncate(end);
    text
}

/// Parses `key=<n>` out of a line.
pub fn field(line: &str, key: &str) -> Option<u64> {
    line.split_whitespace()
        .find_map(|w| w.strip_prefix(key)?.strip_prefix('=')?.parse().ok())
}

/// Receives on `dst` over a UNIX socket in its scratch directory (ch-remote in a thread) and
/// sends from `src` with `options` (`,key=value...` after the URL); returns the send's and
/// the receive's outputs.
pub fn migrate_unix(src: &Vmm, dst: &Vmm, options: &str) -> (Output, Output) {
    let path = dst.scratch.path("mig.sock");
    let url = format!("unix:{}", path.display());
    let dst_api = dst.api.clone();
    let receive_url = url.clone();
    let receiver =
        std::thread::spawn(move || ch_remote(&dst_api, &["receive-migration", &receive_url]));
    let deadline = Instant::now() + Duration::from_secs(10);
    while !path.exists() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
    let sent = src.remote(&["send-migration", &format!("destination_url={url}{options}")]);
    (sent, receiver.join().expect("receiver thread"))
}

/// Waits until something listens on TCP `port`, IPv4 or IPv6, without connecting (a receiver
/// accepts exactly one connection).
pub fn wait_tcp_listen(port: u16, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    let needle = format!(":{port:04X}");
    while Instant::now() < deadline {
        let listening = ["/proc/net/tcp", "/proc/net/tcp6"].iter().any(|table| {
            std::fs::read_to_string(table)
                .unwrap_or_default()
                .lines()
                .any(|l| {
                    let cols: Vec<&str> = l.split_whitespace().collect();
                    cols.len() > 3 && cols[1].ends_with(&needle) && cols[3] == "0A"
                })
        });
        if listening {
            return;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    panic!("nothing listens on TCP port {port}");
}

/// The migration report a successful send-migration printed.
pub fn migration_report(out: &Output) -> serde_json::Value {
    assert!(
        out.status.success(),
        "send-migration failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("the report is JSON")
}

/// Resident bytes of a process's mappings of at least `min_size` bytes (guest RAM), from
/// /proc/<pid>/smaps.
pub fn resident_in_large_mappings(pid: u32, min_size: u64) -> u64 {
    let smaps = std::fs::read_to_string(format!("/proc/{pid}/smaps")).expect("read smaps");
    let kib = |l: &str| -> u64 {
        l.split_whitespace()
            .nth(1)
            .and_then(|n| n.parse().ok())
            .unwrap_or(0)
            * 1024
    };
    let (mut total, mut large) = (0, false);
    for line in smaps.lines() {
        if line.starts_with("Size:") {
            large = kib(line) >= min_size;
        } else if line.starts_with("Rss:") && large {
            total += kib(line);
        }
    }
    total
}

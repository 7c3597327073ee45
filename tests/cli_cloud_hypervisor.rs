//! Command line errors of the `cloud-hypervisor` binary: each gives exit code 1 and exactly one
//! line on standard error, before any VM is built (no KVM needed).

use std::path::PathBuf;
use std::process::Command;

/// A file in the temp directory, removed when dropped.
struct TempFile(PathBuf);

impl TempFile {
    fn new(name: &str, contents: &[u8]) -> Self {
        let path = std::env::temp_dir().join(format!("cli-ch-{}-{name}", std::process::id()));
        std::fs::write(&path, contents).unwrap();
        TempFile(path)
    }

    fn path(&self) -> &str {
        self.0.to_str().unwrap()
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

fn run(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_cloud-hypervisor"))
        .args(args)
        .env_remove("RUST_LOG")
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Runs with `args`, expecting exit 1 and one stderr line that contains `needle`.
fn fails(args: &[&str], needle: &str) {
    let (code, stdout, stderr) = run(args);
    assert_eq!(code, 1, "{args:?}: stderr {stderr:?}");
    assert_eq!(stdout, "", "{args:?}");
    assert_eq!(stderr.lines().count(), 1, "{args:?}: {stderr:?}");
    assert!(stderr.ends_with('\n'), "{args:?}: {stderr:?}");
    assert!(
        stderr.starts_with("cloud-hypervisor: error: "),
        "{args:?}: {stderr:?}"
    );
    assert!(
        stderr.contains(needle),
        "{args:?}: {stderr:?} lacks {needle:?}"
    );
}

fn elf() -> TempFile {
    TempFile::new("elf", b"\x7fELF\x02\x01\x01\x00")
}

#[test]
fn bad_flags() {
    fails(&["--foo"], "unexpected argument '--foo'");
    fails(&["extra"], "unexpected argument 'extra'");
    fails(&["--kernel"], "--kernel");
    fails(&["--memory", "size=1G", "--memory", "size=2G"], "--memory");
    fails(&[], "nothing to do");
    fails(
        &["--api-socket", "fd=3"],
        "--api-socket: unknown option \"fd\"",
    );
    fails(&["--api-socket", "path="], "--api-socket: empty path");
    fails(
        &["--api-socket", "/tmp/x.sock", "--memory", "size=1G"],
        "--memory needs --kernel",
    );
}

#[test]
fn bad_sizes_and_options() {
    let k = elf();
    let kernel = ["--kernel", k.path()];
    let with = |extra: &[&'static str]| -> Vec<&str> {
        kernel
            .iter()
            .copied()
            .chain(extra.iter().copied())
            .collect()
    };
    fails(
        &with(&["--memory", "size=12Q"]),
        "--memory: invalid size \"12Q\"",
    );
    fails(&with(&["--memory", "size="]), "--memory: invalid size");
    fails(
        &with(&["--memory", "size=99999999999G"]),
        "--memory: invalid size",
    );
    fails(&with(&["--memory", "size=0"]), "--memory: size 0 is below");
    fails(
        &with(&["--memory", "size=1G,shared=yes"]),
        "shared must be on or off",
    );
    fails(
        &with(&["--memory", "size=1G,hugepages=on"]),
        "unknown option \"hugepages\"",
    );
    fails(
        &with(&["--memory", "size=1G,size=2G"]),
        "given more than once",
    );
    fails(
        &with(&["--cpus", "boot=0"]),
        "--cpus: boot must be between 1 and 255",
    );
    fails(
        &with(&["--cpus", "boot=300"]),
        "--cpus: invalid number \"300\"",
    );
    fails(&with(&["--balloon", "size=1X"]), "--balloon: invalid size");
    fails(
        &with(&["--memory", "size=128M", "--balloon", "size=1G"]),
        "--balloon: size 1073741824 must be smaller",
    );
    fails(
        &with(&["--serial", "pty"]),
        "--serial: invalid value \"pty\"",
    );
    fails(&with(&["--serial", "file="]), "--serial");
    fails(
        &with(&["--console", "file=/tmp/c"]),
        "--console: invalid value",
    );
}

#[test]
fn bad_kernels() {
    fails(
        &["--kernel", "/nonexistent/vmlinux"],
        "cannot read kernel /nonexistent/vmlinux",
    );
    let text = TempFile::new("text", b"#!/bin/sh\nexit 0\n");
    fails(
        &["--kernel", text.path()],
        "is neither an ELF image nor a bzImage",
    );
    let empty = TempFile::new("empty", b"");
    fails(
        &["--kernel", empty.path()],
        "is neither an ELF image nor a bzImage",
    );
    let dir = std::env::temp_dir();
    fails(&["--kernel", dir.to_str().unwrap()], "cannot read kernel");
    let k = elf();
    fails(
        &["--kernel", k.path(), "--initramfs", "/nonexistent/initrd"],
        "cannot open initramfs /nonexistent/initrd",
    );
}

#[test]
fn bad_log_file() {
    fails(
        &[
            "--api-socket",
            "/tmp/x.sock",
            "--log-file",
            "/nonexistent/dir/log",
        ],
        "cannot open log file /nonexistent/dir/log",
    );
}

#[test]
fn help_and_version() {
    let (code, stdout, _) = run(&["--version"]);
    assert_eq!(code, 0);
    assert!(stdout.starts_with("cloud-hypervisor "), "{stdout}");
    let (code, stdout, _) = run(&["--help"]);
    assert_eq!(code, 0);
    for flag in [
        "--api-socket",
        "--kernel",
        "--memory",
        "--balloon",
        "--serial",
        "--log-file",
    ] {
        assert!(stdout.contains(flag), "{flag}");
    }
}

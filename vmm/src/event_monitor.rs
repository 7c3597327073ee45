//! `--event-monitor path=<file>|fd=<n>`: one JSON object per line for each event, in Cloud
//! Hypervisor's shape: `timestamp` (time since the monitor started, `{"secs", "nanos"}`),
//! `source`, `event` and `properties` (string values, or null).
//!
//! There is one monitor per process, set once at start; [`emit`] does nothing without one. A
//! line is written with a single `write` call, so lines from different threads never mix.

use std::fs::File;
use std::io::Write;
use std::os::fd::{FromRawFd, RawFd};
use std::path::PathBuf;
use std::sync::{Mutex, OnceLock};
use std::time::Instant;

use thiserror::Error;

use crate::vm::lock;

/// Where events go.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum EventTarget {
    /// A file, created if missing, appended to.
    Path(PathBuf),
    /// A descriptor the process inherited, open for writing.
    Fd(RawFd),
}

/// Errors from `--event-monitor`.
#[derive(Debug, Error)]
pub enum EventMonitorError {
    /// The option is not `path=<file>` or `fd=<n>`.
    #[error("--event-monitor takes path=<file> or fd=<n>, not {0:?}")]
    Syntax(String),
    /// The file cannot be opened.
    #[error("cannot open the event monitor file {0}")]
    Open(PathBuf, #[source] std::io::Error),
    /// The descriptor is not open.
    #[error("the event monitor descriptor {0} is not open")]
    BadFd(RawFd),
    /// A monitor was already set.
    #[error("the event monitor is already set")]
    AlreadySet,
}

impl EventTarget {
    /// Parses `path=<file>` or `fd=<n>`.
    pub fn parse(text: &str) -> Result<Self, EventMonitorError> {
        let syntax = || EventMonitorError::Syntax(text.to_string());
        match text.split_once('=') {
            Some(("path", p)) if !p.is_empty() => Ok(EventTarget::Path(PathBuf::from(p))),
            Some(("fd", n)) => n.parse().map(EventTarget::Fd).map_err(|_| syntax()),
            _ => Err(syntax()),
        }
    }
}

struct Monitor {
    out: Mutex<File>,
    start: Instant,
}

static MONITOR: OnceLock<Monitor> = OnceLock::new();

/// Opens `target` and makes it the process's event monitor.
pub fn start(target: &EventTarget) -> Result<(), EventMonitorError> {
    let file = match target {
        EventTarget::Path(path) => std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .map_err(|e| EventMonitorError::Open(path.clone(), e))?,
        EventTarget::Fd(fd) => {
            // SAFETY: fcntl(F_GETFD) only asks whether the descriptor is open.
            if *fd < 0 || unsafe { libc::fcntl(*fd, libc::F_GETFD) } < 0 {
                return Err(EventMonitorError::BadFd(*fd));
            }
            // SAFETY: the descriptor is open and was handed to this process for events; the
            // monitor owns it from here on.
            unsafe { File::from_raw_fd(*fd) }
        }
    };
    MONITOR
        .set(Monitor {
            out: Mutex::new(file),
            start: Instant::now(),
        })
        .map_err(|_| EventMonitorError::AlreadySet)
}

/// The line for one event.
fn line(
    elapsed: std::time::Duration,
    source: &str,
    event: &str,
    properties: Option<serde_json::Value>,
) -> Vec<u8> {
    let value = serde_json::json!({
        "timestamp": { "secs": elapsed.as_secs(), "nanos": elapsed.subsec_nanos() },
        "source": source,
        "event": event,
        "properties": properties,
    });
    let mut text = value.to_string().into_bytes();
    text.push(b'\n');
    text
}

/// Writes one event, if there is a monitor. A failed write is logged, never fatal.
pub fn emit(source: &str, event: &str, properties: Option<serde_json::Value>) {
    let Some(monitor) = MONITOR.get() else {
        return;
    };
    let text = line(monitor.start.elapsed(), source, event, properties);
    if let Err(e) = lock(&monitor.out).write_all(&text) {
        log::warn!("cannot write to the event monitor: {e}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets() {
        assert_eq!(
            EventTarget::parse("path=/tmp/ev").unwrap(),
            EventTarget::Path("/tmp/ev".into())
        );
        assert_eq!(EventTarget::parse("fd=3").unwrap(), EventTarget::Fd(3));
        for bad in ["", "path=", "fd=x", "file=/tmp/x", "/tmp/x"] {
            assert!(EventTarget::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn one_json_line_per_event() {
        let text = line(
            std::time::Duration::from_millis(1500),
            "vm",
            "migration-round",
            Some(serde_json::json!({"round": "2"})),
        );
        assert_eq!(text.iter().filter(|&&b| b == b'\n').count(), 1);
        let v: serde_json::Value = serde_json::from_slice(&text).unwrap();
        assert_eq!(v["timestamp"]["secs"], 1);
        assert_eq!(v["timestamp"]["nanos"], 500_000_000);
        assert_eq!(v["source"], "vm");
        assert_eq!(v["event"], "migration-round");
        assert_eq!(v["properties"]["round"], "2");
        let none: serde_json::Value =
            serde_json::from_slice(&line(Default::default(), "vmm", "starting", None)).unwrap();
        assert!(none["properties"].is_null());
    }
}

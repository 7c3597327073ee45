//! `linux-workload`: the memory workload of the freestanding test guest (tests/guest), as a static
//! Linux program that a real Linux guest's `/init` runs. Same command-line keys (read from
//! `/proc/cmdline`), same `guest: ...` lines on stdout, so the same checks serve both guests:
//!
//! ```text
//! guest: ready used_pages=<n> free_pages=<n>          once, when set up (free: MemFree / 4 KiB)
//! guest: verify ok seq=<n> pages=<n>                  after each full verification (live + hot)
//! guest: verify FAILED seq=<n> page=<addr> ...        any mismatch
//! guest: meminfo total_kib=<n> free_kib=<n> available_kib=<n>    once a second
//! ```
//!
//! Page addresses are virtual addresses of this process (a guest program has no physical ones).

mod config;
mod hot;
mod meminfo;
mod output;
mod pattern;
mod region;
mod verify;
mod workload;

use config::{Config, SelfTest};
use hot::HotWriter;
use meminfo::MemInfo;
use std::ffi::OsString;
use std::fmt;
use std::process::ExitCode;
use std::time::{Duration, Instant};
use verify::FailureLog;
use workload::{Plan, Workload};

const USAGE: &str = "usage: linux-workload [--cmdline \"<key=value ...>\"] [--seconds <n>]
  Reads used= dirty= hot= fragment= (MiB), verify_ms= and selftest=corrupt from /proc/cmdline,
  or from --cmdline. Runs until killed, or for --seconds (exit 1 then if anything failed).";

/// How long to wait for the hot writer before saying it is behind (and waiting on).
const HOT_WAIT_WARNING: Duration = Duration::from_secs(10);

/// The program's own arguments.
#[derive(Debug, Default, PartialEq, Eq)]
struct Args {
    /// `--cmdline <text>`: used instead of `/proc/cmdline`.
    cmdline: Option<String>,
    /// `--seconds <n>`: stop after this long.
    seconds: Option<u64>,
    /// `--help`.
    help: bool,
}

/// Arguments that make no sense (exit code 2).
#[derive(Debug, PartialEq, Eq)]
enum ArgsError {
    /// An argument we do not know.
    Unknown(String),
    /// An option without its value.
    MissingValue(&'static str),
    /// `--seconds` with something other than a whole number.
    BadSeconds(String),
    /// An argument that is not UTF-8.
    NotUtf8,
}

impl fmt::Display for ArgsError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ArgsError::Unknown(arg) => write!(f, "unknown argument {arg:?}"),
            ArgsError::MissingValue(option) => write!(f, "{option} needs a value"),
            ArgsError::BadSeconds(value) => {
                write!(f, "--seconds takes a whole number, not {value:?}")
            }
            ArgsError::NotUtf8 => write!(f, "arguments must be UTF-8"),
        }
    }
}

fn parse_args(args: impl IntoIterator<Item = OsString>) -> Result<Args, ArgsError> {
    let mut parsed = Args::default();
    let mut args = args
        .into_iter()
        .map(|a| a.into_string().map_err(|_| ArgsError::NotUtf8));
    while let Some(arg) = args.next() {
        let arg = arg?;
        let (name, inline) = match arg.split_once('=') {
            Some((name, value)) if name.starts_with("--") => {
                (name.to_string(), Some(value.to_string()))
            }
            _ => (arg.clone(), None),
        };
        let mut value = |option: &'static str| match inline.clone() {
            Some(value) => Ok(value),
            None => args.next().unwrap_or(Err(ArgsError::MissingValue(option))),
        };
        match name.as_str() {
            "--cmdline" => parsed.cmdline = Some(value("--cmdline")?),
            "--seconds" => {
                let text = value("--seconds")?;
                parsed.seconds =
                    Some(config::parse_number(&text).ok_or(ArgsError::BadSeconds(text))?);
            }
            "-h" | "--help" => parsed.help = true,
            _ => return Err(ArgsError::Unknown(arg)),
        }
    }
    Ok(parsed)
}

/// `error: cause: cause ...` on one line.
fn with_causes(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut cause = error.source();
    while let Some(c) = cause {
        text.push_str(&format!(": {c}"));
        cause = c.source();
    }
    text
}

fn fatal(what: &str, error: &dyn std::error::Error) -> ExitCode {
    say!("guest: FATAL {what}: {}", with_causes(error));
    complain!("{what}: {}", with_causes(error));
    ExitCode::from(1)
}

/// Prints a `guest: meminfo` line once a second, from its own thread so that a long verification
/// does not delay it.
fn start_meminfo_lines() -> std::io::Result<()> {
    std::thread::Builder::new()
        .name("meminfo".into())
        .spawn(|| {
            let mut warned = false;
            loop {
                match MemInfo::read() {
                    Ok(m) => say!(
                        "guest: meminfo total_kib={} free_kib={} available_kib={}",
                        m.total_kib,
                        m.free_kib,
                        m.available_kib
                    ),
                    Err(e) if !warned => {
                        say!("guest: warning cannot read /proc/meminfo: {e}");
                        warned = true;
                    }
                    Err(_) => {}
                }
                std::thread::sleep(Duration::from_secs(1));
            }
        })?;
    Ok(())
}

/// The lines that report one verification: one `verify ok`, or a `verify FAILED` per named page
/// (plus a count when more failed than are named).
fn report_lines(seq: u64, pages: u64, log: &FailureLog) -> Vec<String> {
    if log.is_empty() {
        return vec![format!("guest: verify ok seq={seq} pages={pages}")];
    }
    let mut lines: Vec<String> = log
        .named()
        .iter()
        .map(|f| {
            format!(
                "guest: verify FAILED seq={seq} page={:#x} gen={} word={} got={:#x} want={:#x}",
                f.addr, f.generation, f.mismatch.word, f.mismatch.got, f.mismatch.want
            )
        })
        .collect();
    if log.total() > log.named().len() as u64 {
        let first = log.named().first().map_or(0, |f| f.addr);
        lines.push(format!(
            "guest: verify FAILED seq={seq} page={first:#x} failed_pages={} (only the first {} listed)",
            log.total(),
            log.named().len()
        ));
    }
    lines
}

fn run(config: &Config, seconds: Option<u64>) -> ExitCode {
    let started = Instant::now();
    let plan = Plan {
        used_mib: config.used_mib,
        fragment_mib: config.fragment_mib,
        hot_mib: config.hot_mib,
        dirty_mib: config.dirty_mib,
    };
    let available = || MemInfo::read().ok().map(|m| m.available_kib);
    let mut workload = match Workload::set_up(&plan, available, |w| say!("guest: warning {w}")) {
        Ok(workload) => workload,
        Err(e) => return fatal("workload setup", &e),
    };
    let dirty_pages = workload.dirty_pages;
    let hot = match workload.hot.take().map(HotWriter::start).transpose() {
        Ok(hot) => hot,
        Err(e) => return fatal("hot writer thread", &e),
    };
    let hot_pages = hot.as_ref().map_or(0, HotWriter::pages);
    let held = workload.used_pages() + workload.fragment_kept_pages() + hot_pages;
    say!(
        "guest: setup_ms={} used={} fragment_kept={} hot={} dirty={}",
        started.elapsed().as_millis(),
        workload.used_pages(),
        workload.fragment_kept_pages(),
        hot_pages,
        dirty_pages
    );
    let free_pages = match MemInfo::read() {
        Ok(m) => m.free_pages(),
        Err(e) => {
            say!("guest: warning cannot read /proc/meminfo: {e}; free_pages=0 below");
            0
        }
    };
    say!("guest: ready used_pages={held} free_pages={free_pages}");
    if let Err(e) = start_meminfo_lines() {
        say!("guest: warning no meminfo lines: cannot start a thread: {e}");
    }

    let period = Duration::from_millis(config.verify_ms);
    let mut all_passed = true;
    for seq in 1u64.. {
        let round_start = Instant::now();
        // A hot pass that started before this round may have checked some pages earlier: wait
        // for the one after it, which starts and ends within this round.
        let hot_target = hot.as_ref().map(|h| h.completed_generation() + 2);
        let mut log = FailureLog::default();
        let mut pages = workload.verify_live(&mut log);
        if let (Some(hot), Some(target)) = (&hot, hot_target) {
            while !hot.wait_for(target, HOT_WAIT_WARNING) {
                say!(
                    "guest: warning hot writer at generation {}, waiting for {target}",
                    hot.completed_generation()
                );
            }
            log.absorb(hot.take_failures());
            pages += hot.pages();
        }
        let verify_us = round_start.elapsed().as_micros();
        all_passed &= log.is_empty();
        for line in report_lines(seq, pages, &log) {
            say!("{line}");
        }
        if seq == 1 || seq % 64 == 0 {
            let hot_gen = hot.as_ref().map_or(0, HotWriter::completed_generation);
            say!("guest: verify_us={verify_us} hot_gen={hot_gen}");
        }
        if seq == 3 && config.selftest == SelfTest::Corrupt {
            match workload.corrupt_one_live_page() {
                Some(addr) => say!("guest: selftest corrupted page {addr:#x}"),
                None => say!("guest: warning selftest=corrupt needs used > 0"),
            }
        }
        if seconds.is_some_and(|s| started.elapsed() >= Duration::from_secs(s)) {
            break;
        }
        std::thread::sleep((round_start + period).saturating_duration_since(Instant::now()));
    }
    if all_passed {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    }
}

fn main() -> ExitCode {
    let args = match parse_args(std::env::args_os().skip(1)) {
        Ok(args) => args,
        Err(e) => {
            complain!("{e} (see --help)");
            return ExitCode::from(2);
        }
    };
    if args.help {
        say!("{USAGE}");
        return ExitCode::SUCCESS;
    }
    let cmdline = match args.cmdline {
        Some(text) => text,
        None => match std::fs::read("/proc/cmdline") {
            Ok(bytes) => String::from_utf8_lossy(&bytes).into_owned(),
            Err(e) => {
                complain!("cannot read /proc/cmdline ({e}), using the defaults");
                String::new()
            }
        },
    };
    let (config, bad) = Config::parse(&cmdline);
    for b in &bad {
        complain!("{b}");
    }
    say!("guest: cmdline \"{}\"", cmdline.trim_end());
    run(&config, args.seconds)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(list: &[&str]) -> Result<Args, ArgsError> {
        parse_args(list.iter().map(OsString::from))
    }

    #[test]
    fn arguments() {
        assert_eq!(args(&[]), Ok(Args::default()));
        let both = args(&["--cmdline", "used=8 hot=1", "--seconds", "3"]).unwrap();
        assert_eq!(
            (both.cmdline.as_deref(), both.seconds),
            (Some("used=8 hot=1"), Some(3))
        );
        assert_eq!(
            args(&["--cmdline=used=8"]).unwrap().cmdline.as_deref(),
            Some("used=8")
        );
        assert!(args(&["--help"]).unwrap().help);
    }

    #[test]
    fn bad_arguments_are_errors_not_panics() {
        assert_eq!(
            args(&["--cmdline"]),
            Err(ArgsError::MissingValue("--cmdline"))
        );
        assert_eq!(
            args(&["--seconds", "-1"]),
            Err(ArgsError::BadSeconds("-1".into()))
        );
        assert_eq!(args(&["used=8"]), Err(ArgsError::Unknown("used=8".into())));
        assert_eq!(
            args(&["--bogus=1"]),
            Err(ArgsError::Unknown("--bogus=1".into()))
        );
    }

    #[test]
    fn report_lines_follow_the_contract() {
        assert_eq!(
            report_lines(7, 10, &FailureLog::default()),
            ["guest: verify ok seq=7 pages=10"]
        );
        let mut log = FailureLog::default();
        let failure = verify::Failure {
            addr: 0x7f00_0000_1000,
            generation: 1,
            mismatch: pattern::Mismatch {
                word: 2,
                got: 0,
                want: 5,
            },
        };
        log.record(failure);
        assert_eq!(
            report_lines(8, 10, &log),
            ["guest: verify FAILED seq=8 page=0x7f0000001000 gen=1 word=2 got=0x0 want=0x5"]
        );
        for _ in 0..verify::MAX_NAMED {
            log.record(failure);
        }
        let lines = report_lines(9, 10, &log);
        assert_eq!(lines.len(), verify::MAX_NAMED + 1);
        assert!(lines
            .iter()
            .all(|l| l.starts_with("guest: verify FAILED seq=9 page=0x7f0000001000 ")));
        assert!(
            lines[verify::MAX_NAMED].contains("failed_pages=17 "),
            "{}",
            lines[verify::MAX_NAMED]
        );
    }
}

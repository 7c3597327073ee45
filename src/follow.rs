//! `ch-remote send-migration` without `--no-wait`: follows `vm.migration-progress` until the
//! migration ends, prints the final report on standard output (exit 0) or the error on
//! standard error (exit 1), and, when standard error is a terminal, draws a one-line progress
//! bar there meanwhile.

use std::io::IsTerminal;
use std::path::Path;
use std::time::Duration;

use indicatif::{ProgressBar, ProgressStyle};
use vmm::api::client::send_request;
use vmm::api::ApiRequest;

/// How often the progress is read.
const POLL: Duration = Duration::from_millis(100);

/// Follows the migration; returns the exit code.
pub fn follow_migration(api_socket: &Path) -> anyhow::Result<i32> {
    let bar = std::io::stderr().is_terminal().then(new_bar);
    loop {
        std::thread::sleep(POLL);
        let response = match send_request(api_socket, &ApiRequest::VmMigrationProgress) {
            Ok(r) => r,
            Err(e) => {
                clear(&bar);
                anyhow::bail!("lost the VMM before the migration's end was read: {e}");
            }
        };
        if !response.is_success() {
            clear(&bar);
            eprintln!("ch-remote: {}", response.error_message());
            return Ok(1);
        }
        let progress: serde_json::Value = serde_json::from_slice(&response.body)?;
        match progress["state"].as_str().unwrap_or_default() {
            "completed" => {
                clear(&bar);
                super::print_body(serde_json::to_string(&progress["report"])?.as_bytes())?;
                return Ok(0);
            }
            state @ ("failed" | "cancelled") => {
                clear(&bar);
                let why = progress["error"].as_str().unwrap_or("no reason given");
                let what = if state == "failed" {
                    "failed"
                } else {
                    "was cancelled"
                };
                eprintln!("ch-remote: migration {what}: {why}");
                return Ok(1);
            }
            _ => {
                if let Some(bar) = &bar {
                    draw(bar, &progress);
                }
            }
        }
    }
}

fn new_bar() -> ProgressBar {
    let bar = ProgressBar::new(0);
    let style = ProgressStyle::with_template("[{bar:16}] {percent:>3}% {wide_msg}")
        .unwrap_or_else(|_| ProgressStyle::default_bar())
        .progress_chars("=> ");
    bar.set_style(style);
    bar
}

/// One line: percent of the round, phase and round, MiB/s, ETA, hinted GiB left out (what
/// does not fit the terminal's width is cut from the end).
fn draw(bar: &ProgressBar, p: &serde_json::Value) {
    let num = |key: &str| p[key].as_f64().unwrap_or(0.0);
    let state = p["state"].as_str().unwrap_or("?");
    let phase = match state {
        "round" => format!("round {}", p["round"].as_u64().unwrap_or(0)),
        other => other.to_string(),
    };
    bar.set_length(p["round_bytes_planned"].as_u64().unwrap_or(0).max(1));
    bar.set_position(p["round_bytes_sent"].as_u64().unwrap_or(0));
    let left_out = num("pages_left_out").max(num("pages_hinted")) * 4096.0 / (1u64 << 30) as f64;
    let eta = match p["eta_ms"].as_f64() {
        Some(ms) => format!("ETA {:.1} s", ms / 1000.0),
        None => "ETA ?".into(),
    };
    bar.set_message(format!(
        "{phase}, {:.0} MiB/s, {eta}, {left_out:.2} GiB hinted out",
        num("bandwidth_bytes_per_s") / (1u64 << 20) as f64
    ));
}

fn clear(bar: &Option<ProgressBar>) {
    if let Some(bar) = bar {
        bar.finish_and_clear();
    }
}

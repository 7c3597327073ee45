//! Writing lines. Every line goes out whole and is flushed at once (the init sends stdout to the
//! serial console, where the lab and the tests read it line by line). A failed write is dropped:
//! the workload keeps its memory and keeps running even when nobody listens.

use std::fmt;
use std::io::Write;

/// Writes one line to stdout and flushes it.
pub fn line(args: fmt::Arguments<'_>) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{args}");
    let _ = out.flush();
}

/// Writes one line to stderr, prefixed with the program name.
pub fn error_line(args: fmt::Arguments<'_>) {
    let mut err = std::io::stderr().lock();
    let _ = writeln!(err, "linux-workload: {args}");
}

/// `say!(...)`: [`line`] with `format!` arguments.
#[macro_export]
macro_rules! say {
    ($($arg:tt)*) => { $crate::output::line(format_args!($($arg)*)) };
}

/// `complain!(...)`: [`error_line`] with `format!` arguments.
#[macro_export]
macro_rules! complain {
    ($($arg:tt)*) => { $crate::output::error_line(format_args!($($arg)*)) };
}

//! Target-independent core of the freestanding test guest.
//!
//! Everything here is plain, safe(ish) Rust without any hardware access, so it builds for the
//! guest (`no_std`) and is unit-tested on the host with `cargo test -p guest-core`:
//!
//! * [`buddy`]: the page allocator (per-order bitmaps of free blocks, orders 0..=10, split and
//!   coalesce; ~2 bits of metadata per page),
//! * [`pfnstack`]: an unbounded PFN stack kept in pages it is given (the balloon's pages),
//! * [`cmdline`]: the `key=value` command line parser,
//! * [`pattern`]: the self-describing page pattern used to detect lost, stale or zero pages,
//! * [`fmt`]: a tiny fixed-buffer formatter for serial lines,
//! * [`mptable`]: the Intel MP Specification 1.4 table parser (CPUs without ACPI),
//! * [`acpi`]: ACPI power-off (FADT sleep control register and `\_S5`).
#![cfg_attr(not(test), no_std)]
#![warn(missing_docs)]

pub mod acpi;
pub mod buddy;
pub mod cmdline;
mod firmware;
pub mod fmt;
pub mod mptable;
pub mod pattern;
pub mod pfnstack;

/// Size of a base page (the unit of the allocator and of balloon PFNs).
pub const PAGE_SIZE: u64 = 4096;
/// log2 of [`PAGE_SIZE`].
pub const PAGE_SHIFT: u32 = 12;

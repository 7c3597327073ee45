//! The VMM: VM lifecycle, boot, devices, the REST API and migration send/receive.
//!
//! Threads: the VMM thread runs [`controller::Vmm`], which owns the VM and serves every request
//! in turn; the `http-server` thread parses API requests and hands them over; one thread per
//! vCPU runs the guest; the balloon's worker thread serves its queues; a `migration-recv` thread
//! receives an incoming migration and hands the VM to the VMM thread. Each of them runs under a
//! seccomp filter ([`seccomp`]).

pub mod api;
pub mod boot;
pub mod config;
pub mod controller;
pub mod devices;
pub mod event_monitor;
pub mod interrupts;
pub mod layout;
pub mod memory;
pub mod migration;
pub mod seccomp;
pub mod vcpu;
pub mod vm;

pub use controller::{start_vmm, VmmError, VmmParams};
pub use seccomp::SeccompMode;

//! The system-wide hypervisor handle.

use std::sync::Arc;

use thiserror::Error;

use crate::cpu::CpuIdEntry;
use crate::vm::Vm;

/// Errors from the system-wide hypervisor handle.
#[derive(Debug, Error)]
pub enum HypervisorError {
    /// `/dev/kvm` could not be opened.
    #[error("cannot open /dev/kvm (is KVM available on this host?)")]
    Open(#[source] std::io::Error),
    /// The KVM API version is not the stable one.
    #[error("unsupported KVM API version {0}")]
    ApiVersion(i32),
    /// A capability the VMM relies on is missing.
    #[error("KVM lacks a required capability: {0}")]
    MissingCapability(&'static str),
    /// Creating a VM failed.
    #[error("cannot create a KVM VM")]
    CreateVm(#[source] std::io::Error),
    /// Reading the supported CPUID failed.
    #[error("cannot read the supported CPUID")]
    SupportedCpuid(#[source] std::io::Error),
    /// Reading the MSR index list failed.
    #[error("cannot read the MSR index list")]
    MsrList(#[source] std::io::Error),
}

/// An optional hypervisor feature the VMM may use when the host has it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Capability {
    /// The in-kernel local APIC implements the TSC-deadline timer mode, so the guest may be
    /// offered CPUID.1:ECX.TSC_DEADLINE (KVM's supported CPUID never sets that bit itself).
    TscDeadlineTimer,
}

/// Result alias for [`HypervisorError`].
pub type Result<T> = std::result::Result<T, HypervisorError>;

/// The hypervisor as a whole: creates VMs and tells what the host supports.
pub trait Hypervisor: Send + Sync {
    /// Creates a new, empty VM.
    fn create_vm(&self) -> Result<Arc<dyn Vm>>;
    /// The CPUID entries this hypervisor can give a guest.
    fn supported_cpuid(&self) -> Result<Vec<CpuIdEntry>>;
    /// The MSRs whose values make up a vCPU's saved state.
    fn msr_index_list(&self) -> Result<Vec<u32>>;
    /// Whether the host offers the optional feature `cap`.
    fn check_capability(&self, cap: Capability) -> bool;
}

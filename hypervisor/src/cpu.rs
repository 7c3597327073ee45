//! A virtual CPU: running it, its registers, and its whole state for migration.

use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::{FpuState, SpecialRegisters, StandardRegisters};

/// Errors from vCPU operations; each names the operation that failed.
#[derive(Debug, Error)]
pub enum CpuError {
    /// `KVM_RUN` failed (other than by a signal).
    #[error("KVM_RUN failed")]
    Run(#[source] std::io::Error),
    /// Reading a piece of vCPU state failed.
    #[error("cannot read vCPU {0}")]
    Get(&'static str, #[source] std::io::Error),
    /// Writing a piece of vCPU state failed.
    #[error("cannot set vCPU {0}")]
    Set(&'static str, #[source] std::io::Error),
    /// A saved state that does not fit this vCPU.
    #[error("invalid vCPU state: {0}")]
    InvalidState(&'static str),
}

/// Result alias for [`CpuError`].
pub type Result<T> = std::result::Result<T, CpuError>;

/// One CPUID leaf as given to a guest.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CpuIdEntry {
    /// The leaf (EAX input).
    pub function: u32,
    /// The sub-leaf (ECX input), when the leaf has them.
    pub index: u32,
    /// KVM flags (sub-leaf significant, ...).
    pub flags: u32,
    /// EAX output.
    pub eax: u32,
    /// EBX output.
    pub ebx: u32,
    /// ECX output.
    pub ecx: u32,
    /// EDX output.
    pub edx: u32,
}

/// Why `run` returned. The data slices borrow the vCPU's shared run area: an `IoIn` or
/// `MmioRead` answer must be written into them before the next `run`.
#[derive(Debug)]
pub enum VmExit<'a> {
    /// `out` to a port.
    IoOut(u16, &'a [u8]),
    /// `in` from a port; fill the slice.
    IoIn(u16, &'a mut [u8]),
    /// A read of unbacked guest-physical memory; fill the slice.
    MmioRead(u64, &'a mut [u8]),
    /// A write to unbacked guest-physical memory.
    MmioWrite(u64, &'a [u8]),
    /// The guest executed `hlt` with no irqchip to park it.
    Hlt,
    /// The guest triple-faulted or otherwise shut down.
    Shutdown,
    /// The guest asked for a reset through a system event.
    Reset,
    /// The run was interrupted by a signal or `immediate_exit`.
    Interrupted,
    /// This vCPU's dirty ring was nearly full; its pages (and every other vCPU's) have been
    /// collected for the next harvest, and the vCPU can simply run again.
    DirtyRingFull,
    /// KVM could not handle something (emulation failure and the like); the reason is given.
    InternalError(String),
    /// Any other exit, named.
    Other(String),
}

/// Everything needed to continue a vCPU in another VM: registers, FPU/extended state, MSRs,
/// local APIC, pending events and run state. Serialized for migration.
#[derive(Debug, Serialize, Deserialize)]
pub struct VcpuState {
    pub(crate) regs: StandardRegisters,
    pub(crate) sregs: SpecialRegisters,
    pub(crate) xsave: kvm_bindings::kvm_xsave,
    pub(crate) xcrs: Option<kvm_bindings::kvm_xcrs>,
    pub(crate) msrs: Vec<(u32, u64)>,
    pub(crate) lapic: kvm_bindings::kvm_lapic_state,
    pub(crate) events: kvm_bindings::kvm_vcpu_events,
    pub(crate) mp_state: kvm_bindings::kvm_mp_state,
    pub(crate) debugregs: Option<kvm_bindings::kvm_debugregs>,
}

impl VcpuState {
    /// The general-purpose registers in this state.
    pub fn regs(&self) -> &StandardRegisters {
        &self.regs
    }
}

/// A virtual CPU.
pub trait Vcpu: Send {
    /// Runs the vCPU until it exits to the VMM.
    fn run(&mut self) -> Result<VmExit<'_>>;
    /// Makes the next (or the current, once a signal lands) `run` return at once.
    fn set_immediate_exit(&mut self, exit: bool);
    /// Gives the vCPU its CPUID table.
    fn set_cpuid(&self, entries: &[CpuIdEntry]) -> Result<()>;
    /// Reads the general-purpose registers.
    fn regs(&self) -> Result<StandardRegisters>;
    /// Writes the general-purpose registers.
    fn set_regs(&self, regs: &StandardRegisters) -> Result<()>;
    /// Reads the special registers.
    fn sregs(&self) -> Result<SpecialRegisters>;
    /// Writes the special registers.
    fn set_sregs(&self, sregs: &SpecialRegisters) -> Result<()>;
    /// Writes the legacy FPU state.
    fn set_fpu(&self, fpu: &FpuState) -> Result<()>;
    /// Writes MSRs one at a time, skipping those KVM refuses; returns how many were applied.
    fn set_msrs(&self, msrs: &[(u32, u64)]) -> Result<usize>;
    /// Programs the local APIC's LINT0 as ExtINT and LINT1 as NMI, as firmware would.
    fn setup_lint(&self) -> Result<()>;
    /// Saves the whole vCPU state. The vCPU must not be running.
    fn state(&self) -> Result<VcpuState>;
    /// Restores a state saved by [`Vcpu::state`] (possibly in another VM).
    fn set_state(&self, state: &VcpuState) -> Result<()>;
}

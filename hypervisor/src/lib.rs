//! A small trait layer over KVM.
//!
//! The VMM sees three kernel objects, one trait each: the [`Hypervisor`] (the `/dev/kvm` system
//! handle), a [`Vm`] (memory slots, dirty logging, interrupt plumbing, VM-wide state) and a
//! [`Vcpu`] (run loop exits, registers, the whole saved state for migration). The KVM backend lives
//! in [`kvm`]; nothing outside this crate touches `kvm-ioctls` directly.
//!
//! Dirty logging comes in two kinds ([`DirtyLogKind`]), chosen when a VM is created: KVM's
//! bitmap (the default), read into the caller's buffer and re-armed (with manual protection) only
//! where it has dirty pages; or, opted in with [`kvm::KvmHypervisor::with_dirty_ring`], KVM's
//! dirty ring, whose reads cost what the guest wrote (not yet trusted: see
//! [`kvm::KvmHypervisor::new`]).

pub mod cpu;
pub mod hypervisor;
pub mod kvm;
pub mod vm;

pub use crate::cpu::{CpuError, CpuIdEntry, Vcpu, VcpuState, VmExit};
pub use crate::hypervisor::{Capability, Hypervisor, HypervisorError};
pub use crate::kvm::KvmHypervisor;
pub use crate::vm::{
    DataMatch, DirtyLogKind, DirtyPage, IoEventAddress, IrqRoute, UserMemoryRegion, Vm, VmError,
    VmState,
};

/// The legacy FPU/SSE state, as KVM lays it out.
pub use kvm_bindings::kvm_fpu as FpuState;
/// General-purpose registers, as KVM lays them out.
pub use kvm_bindings::kvm_regs as StandardRegisters;
/// A segment register, as KVM lays it out.
pub use kvm_bindings::kvm_segment as SegmentRegister;
/// Control, segment and descriptor-table registers, as KVM lays them out.
pub use kvm_bindings::kvm_sregs as SpecialRegisters;

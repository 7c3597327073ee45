//! A KVM vCPU.

use std::sync::Arc;

use kvm_bindings::{
    kvm_msr_entry, CpuId, Msrs, KVM_EXIT_DIRTY_RING_FULL, KVM_SYSTEM_EVENT_RESET,
    KVM_SYSTEM_EVENT_SHUTDOWN,
};
use kvm_ioctls::{VcpuExit, VcpuFd};

use super::dirty_ring::DirtyRings;
use super::vm::VcpuCaps;
use crate::cpu::{CpuError, CpuIdEntry, Result, Vcpu, VcpuState, VmExit};
use crate::{FpuState, SpecialRegisters, StandardRegisters};

/// Local APIC register offsets and delivery modes used to program LINT0/LINT1.
const APIC_LVT0: usize = 0x350;
const APIC_LVT1: usize = 0x360;
const APIC_MODE_EXTINT: u32 = 0x7;
const APIC_MODE_NMI: u32 = 0x4;

/// A KVM vCPU and the MSR list its state is saved with.
pub struct KvmVcpu {
    fd: VcpuFd,
    msrs: Vec<u32>,
    caps: VcpuCaps,
    /// The VM's dirty rings, collected here when this vCPU's ring fills up.
    rings: Option<Arc<DirtyRings>>,
}

/// `IA32_TSC_DEADLINE`: the LAPIC timer's deadline in TSC-deadline mode.
pub(crate) const MSR_IA32_TSC_DEADLINE: u32 = 0x6e0;

impl KvmVcpu {
    pub(crate) fn new(
        fd: VcpuFd,
        msrs: Vec<u32>,
        caps: VcpuCaps,
        rings: Option<Arc<DirtyRings>>,
    ) -> Self {
        KvmVcpu {
            fd,
            msrs,
            caps,
            rings,
        }
    }

    /// Reads every MSR of the list that KVM will give; the ones it refuses are left out.
    fn read_msrs(&self) -> Result<Vec<(u32, u64)>> {
        let mut wanted: Vec<u32> = self.msrs.clone();
        loop {
            let entries: Vec<kvm_msr_entry> = wanted
                .iter()
                .map(|&index| kvm_msr_entry {
                    index,
                    ..Default::default()
                })
                .collect();
            let mut msrs = Msrs::from_entries(&entries)
                .map_err(|_| CpuError::InvalidState("too many MSRs"))?;
            let n = self
                .fd
                .get_msrs(&mut msrs)
                .map_err(|e| CpuError::Get("MSRs", e.into()))?;
            if n == wanted.len() {
                return Ok(msrs.as_slice().iter().map(|e| (e.index, e.data)).collect());
            }
            // KVM stops at the first MSR it refuses: drop that one and read again.
            wanted.remove(n);
        }
    }
}

fn lapic_reg(lapic: &kvm_bindings::kvm_lapic_state, off: usize) -> u32 {
    let b = &lapic.regs[off..off + 4];
    u32::from_le_bytes([b[0] as u8, b[1] as u8, b[2] as u8, b[3] as u8])
}

fn set_lapic_reg(lapic: &mut kvm_bindings::kvm_lapic_state, off: usize, v: u32) {
    for (i, byte) in v.to_le_bytes().iter().enumerate() {
        lapic.regs[off + i] = *byte as _;
    }
}

impl Vcpu for KvmVcpu {
    fn run(&mut self) -> Result<VmExit<'_>> {
        let run_area: *const kvm_bindings::kvm_run = self.fd.get_kvm_run();
        match self.fd.run() {
            Ok(exit) => Ok(match exit {
                VcpuExit::IoOut(port, data) => VmExit::IoOut(port, data),
                VcpuExit::IoIn(port, data) => VmExit::IoIn(port, data),
                VcpuExit::MmioRead(addr, data) => VmExit::MmioRead(addr, data),
                VcpuExit::MmioWrite(addr, data) => VmExit::MmioWrite(addr, data),
                VcpuExit::Hlt => VmExit::Hlt,
                VcpuExit::Shutdown => VmExit::Shutdown,
                VcpuExit::Intr => VmExit::Interrupted,
                VcpuExit::SystemEvent(kind, _) => match kind {
                    KVM_SYSTEM_EVENT_RESET => VmExit::Reset,
                    KVM_SYSTEM_EVENT_SHUTDOWN => VmExit::Shutdown,
                    other => VmExit::Other(format!("system event {other}")),
                },
                VcpuExit::InternalError => {
                    // SAFETY: `run_area` is the vCPU's mmapped kvm_run, valid while `self.fd` lives;
                    // KVM_EXIT_INTERNAL_ERROR fills the `internal` member of the union.
                    let suberror = unsafe { (*run_area).__bindgen_anon_1.internal.suberror };
                    VmExit::InternalError(format!("KVM internal error, suberror {suberror}"))
                }
                VcpuExit::FailEntry(reason, cpu) => VmExit::InternalError(format!(
                    "VM entry failed: reason {reason:#x} on cpu {cpu}"
                )),
                VcpuExit::Unsupported(KVM_EXIT_DIRTY_RING_FULL) => match &self.rings {
                    Some(rings) => {
                        rings.collect().map_err(CpuError::Run)?;
                        VmExit::DirtyRingFull
                    }
                    None => VmExit::InternalError("dirty ring full without a ring".into()),
                },
                other => VmExit::Other(format!("{other:?}")),
            }),
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                Ok(VmExit::Interrupted)
            }
            Err(e) => Err(CpuError::Run(e.into())),
        }
    }

    fn set_immediate_exit(&mut self, exit: bool) {
        self.fd.set_kvm_immediate_exit(u8::from(exit));
    }

    fn set_cpuid(&self, entries: &[CpuIdEntry]) -> Result<()> {
        let kvm_entries: Vec<kvm_bindings::kvm_cpuid_entry2> = entries
            .iter()
            .map(|e| kvm_bindings::kvm_cpuid_entry2 {
                function: e.function,
                index: e.index,
                flags: e.flags,
                eax: e.eax,
                ebx: e.ebx,
                ecx: e.ecx,
                edx: e.edx,
                ..Default::default()
            })
            .collect();
        let cpuid = CpuId::from_entries(&kvm_entries)
            .map_err(|_| CpuError::InvalidState("too many CPUID entries"))?;
        self.fd
            .set_cpuid2(&cpuid)
            .map_err(|e| CpuError::Set("CPUID", e.into()))
    }

    fn regs(&self) -> Result<StandardRegisters> {
        self.fd
            .get_regs()
            .map_err(|e| CpuError::Get("registers", e.into()))
    }

    fn set_regs(&self, regs: &StandardRegisters) -> Result<()> {
        self.fd
            .set_regs(regs)
            .map_err(|e| CpuError::Set("registers", e.into()))
    }

    fn sregs(&self) -> Result<SpecialRegisters> {
        self.fd
            .get_sregs()
            .map_err(|e| CpuError::Get("special registers", e.into()))
    }

    fn set_sregs(&self, sregs: &SpecialRegisters) -> Result<()> {
        self.fd
            .set_sregs(sregs)
            .map_err(|e| CpuError::Set("special registers", e.into()))
    }

    fn set_fpu(&self, fpu: &FpuState) -> Result<()> {
        self.fd
            .set_fpu(fpu)
            .map_err(|e| CpuError::Set("FPU", e.into()))
    }

    fn set_msrs(&self, msrs: &[(u32, u64)]) -> Result<usize> {
        // One at a time: KVM_SET_MSRS stops at the first MSR it refuses, and some listed MSRs are
        // refused on some hosts (kvm_pvm refuses 0x4b564d06, for one).
        let mut applied = 0;
        for &(index, data) in msrs {
            let one = Msrs::from_entries(&[kvm_msr_entry {
                index,
                data,
                ..Default::default()
            }])
            .map_err(|_| CpuError::InvalidState("MSR list"))?;
            match self.fd.set_msrs(&one) {
                Ok(1) => applied += 1,
                Ok(_) => log::debug!("KVM refused MSR {index:#x}"),
                Err(e) => return Err(CpuError::Set("MSRs", e.into())),
            }
        }
        Ok(applied)
    }

    fn setup_lint(&self) -> Result<()> {
        let mut lapic = self
            .fd
            .get_lapic()
            .map_err(|e| CpuError::Get("LAPIC", e.into()))?;
        let lvt0 = lapic_reg(&lapic, APIC_LVT0);
        set_lapic_reg(
            &mut lapic,
            APIC_LVT0,
            (lvt0 & !0x700) | (APIC_MODE_EXTINT << 8),
        );
        let lvt1 = lapic_reg(&lapic, APIC_LVT1);
        set_lapic_reg(
            &mut lapic,
            APIC_LVT1,
            (lvt1 & !0x700) | (APIC_MODE_NMI << 8),
        );
        self.fd
            .set_lapic(&lapic)
            .map_err(|e| CpuError::Set("LAPIC", e.into()))
    }

    fn state(&self) -> Result<VcpuState> {
        let mp_state = self
            .fd
            .get_mp_state()
            .map_err(|e| CpuError::Get("MP state", e.into()))?;
        let regs = self.regs()?;
        let sregs = self.sregs()?;
        let xsave = self
            .fd
            .get_xsave()
            .map_err(|e| CpuError::Get("XSAVE area", e.into()))?;
        let xcrs = if self.caps.xcrs {
            Some(
                self.fd
                    .get_xcrs()
                    .map_err(|e| CpuError::Get("XCRs", e.into()))?,
            )
        } else {
            None
        };
        let msrs = self.read_msrs()?;
        let lapic = self
            .fd
            .get_lapic()
            .map_err(|e| CpuError::Get("LAPIC", e.into()))?;
        let events = self
            .fd
            .get_vcpu_events()
            .map_err(|e| CpuError::Get("events", e.into()))?;
        let debugregs = if self.caps.debugregs {
            Some(
                self.fd
                    .get_debug_regs()
                    .map_err(|e| CpuError::Get("debug registers", e.into()))?,
            )
        } else {
            None
        };
        Ok(VcpuState {
            regs,
            sregs,
            xsave,
            xcrs,
            msrs,
            lapic,
            events,
            mp_state,
            debugregs,
        })
    }

    fn set_state(&self, state: &VcpuState) -> Result<()> {
        // Order matters: MP state and special registers first (mode, APIC base), then the
        // register file, the extended state, MSRs (TSC among them), the LAPIC, the TSC deadline
        // and finally pending events.
        self.fd
            .set_mp_state(state.mp_state)
            .map_err(|e| CpuError::Set("MP state", e.into()))?;
        self.set_sregs(&state.sregs)?;
        self.set_regs(&state.regs)?;
        // SAFETY: `xsave` is a complete kvm_xsave saved by KVM_GET_XSAVE; the legacy 4 KiB
        // layout has no trailing flexible array that could be read out of bounds.
        unsafe { self.fd.set_xsave(&state.xsave) }
            .map_err(|e| CpuError::Set("XSAVE area", e.into()))?;
        if let Some(xcrs) = &state.xcrs {
            self.fd
                .set_xcrs(xcrs)
                .map_err(|e| CpuError::Set("XCRs", e.into()))?;
        }
        // The TSC-deadline MSR is relative to the guest's TSC (an MSR of its own) and KVM keeps
        // it only while the LAPIC timer is in TSC-deadline mode: written before the LAPIC it is
        // dropped, the timer stays disarmed and a tickless guest stalls after a restore (seen
        // with Linux in 1 of 4 migrations). So: the other MSRs, the LAPIC, then the deadline.
        let is_deadline = |(index, _): &&(u32, u64)| *index == MSR_IA32_TSC_DEADLINE;
        let deadline: Vec<(u32, u64)> = state.msrs.iter().filter(is_deadline).copied().collect();
        let msrs: Vec<(u32, u64)> = state
            .msrs
            .iter()
            .filter(|m| !is_deadline(m))
            .copied()
            .collect();
        self.set_msrs(&msrs)?;
        self.fd
            .set_lapic(&state.lapic)
            .map_err(|e| CpuError::Set("LAPIC", e.into()))?;
        self.set_msrs(&deadline)?;
        if let Some(dr) = &state.debugregs {
            self.fd
                .set_debug_regs(dr)
                .map_err(|e| CpuError::Set("debug registers", e.into()))?;
        }
        self.fd
            .set_vcpu_events(&state.events)
            .map_err(|e| CpuError::Set("events", e.into()))?;
        Ok(())
    }
}

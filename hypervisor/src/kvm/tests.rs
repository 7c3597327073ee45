//! Tests against the real `/dev/kvm`: a tiny 32-bit guest that counts in EAX and reports each
//! count on port 0x80, saved mid-run and continued in a fresh VM.

use std::sync::Arc;

use crate::{Hypervisor, KvmHypervisor, SegmentRegister, UserMemoryRegion, Vcpu, Vm, VmExit};

const MEM_SIZE: usize = 1 << 20;
pub(super) const CODE: u64 = 0x1000;
/// `inc eax; out 0x80, al; jmp -5`
const COUNTER: [u8; 5] = [0x40, 0xe6, 0x80, 0xeb, 0xfb];

/// Anonymous guest memory, unmapped on drop.
pub(super) struct Mem {
    ptr: *mut u8,
    size: usize,
}

impl Mem {
    /// `MEM_SIZE` bytes.
    fn new() -> Self {
        Self::of_size(MEM_SIZE)
    }

    /// `size` bytes, zeroed.
    pub(super) fn of_size(size: usize) -> Self {
        // SAFETY: a fresh anonymous private mapping; no existing memory is affected.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                size,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_ANONYMOUS | libc::MAP_PRIVATE,
                -1,
                0,
            )
        };
        assert_ne!(p, libc::MAP_FAILED);
        Mem {
            ptr: p.cast(),
            size,
        }
    }

    /// Where the mapping starts.
    pub(super) fn host(&self) -> *mut u8 {
        self.ptr
    }

    pub(super) fn bytes(&mut self) -> &mut [u8] {
        // SAFETY: the mapping is `size` bytes, lives as long as `self`, and `&mut self` makes
        // this the only slice over it (a running vCPU writes through KVM, not through Rust).
        unsafe { std::slice::from_raw_parts_mut(self.ptr, self.size) }
    }
}

impl Drop for Mem {
    fn drop(&mut self) {
        // SAFETY: unmapping the mapping created in `of_size`, no longer used by any VM.
        unsafe { libc::munmap(self.ptr.cast(), self.size) };
    }
}

fn vm_with(mem: &Mem, log_dirty: bool) -> Arc<dyn Vm> {
    // The bitmap log, so that these tests read it with get_dirty_log (dirty_ring.rs tests the ring).
    let hv =
        KvmHypervisor::with_dirty_ring(false).expect("/dev/kvm must be usable for these tests");
    vm_from(&hv, mem.host(), MEM_SIZE, log_dirty)
}

/// A VM with slot 0 = `size` bytes at `host` and an irqchip.
pub(super) fn vm_from(hv: &KvmHypervisor, host: *mut u8, size: usize, log: bool) -> Arc<dyn Vm> {
    let vm = hv.create_vm().unwrap();
    let region = UserMemoryRegion {
        slot: 0,
        guest_phys_addr: 0,
        memory_size: size as u64,
        userspace_addr: host as u64,
        log_dirty_pages: log,
    };
    // SAFETY: the memory outlives the VM in every test.
    unsafe { vm.set_user_memory_region(region) }.unwrap();
    vm.create_irqchip().unwrap();
    vm
}

fn flat32(selector: u16, type_: u8) -> SegmentRegister {
    SegmentRegister {
        base: 0,
        limit: 0xffff_ffff,
        selector,
        type_,
        present: 1,
        s: 1,
        db: 1,
        g: 1,
        ..Default::default()
    }
}

pub(super) fn boot_counter(vcpu: &dyn Vcpu) {
    let mut sregs = vcpu.sregs().unwrap();
    sregs.cs = flat32(0x8, 0xb);
    for s in [
        &mut sregs.ds,
        &mut sregs.es,
        &mut sregs.ss,
        &mut sregs.fs,
        &mut sregs.gs,
    ] {
        *s = flat32(0x10, 0x3);
    }
    sregs.cr0 = 0x11;
    vcpu.set_sregs(&sregs).unwrap();
    let regs = crate::StandardRegisters {
        rip: CODE,
        rflags: 2,
        ..Default::default()
    };
    vcpu.set_regs(&regs).unwrap();
}

/// Runs until the next `out 0x80` and returns the byte written.
pub(super) fn next_count(vcpu: &mut dyn Vcpu) -> u8 {
    loop {
        match vcpu.run().unwrap() {
            VmExit::IoOut(0x80, data) => return data[0],
            VmExit::Interrupted => continue,
            other => panic!("unexpected exit {other:?}"),
        }
    }
}

#[test]
fn legacy_pic_starts_initialized_and_masked() {
    let mem = Mem::new();
    let vm = vm_with(&mem, false);
    let state = vm.state().unwrap();
    for (chip, base) in [(&state.pic_master, 0x08), (&state.pic_slave, 0x70)] {
        // SAFETY: the chip came from KVM_GET_IRQCHIP for a PIC, which fills `pic`.
        let pic = unsafe { chip.chip.pic };
        assert_eq!(pic.imr, 0xff, "every line masked");
        assert_eq!(pic.irq_base, base, "vectors clear of CPU exceptions");
    }
    // An ISA line raised through the default routing still reaches the PIC, which holds it
    // pending behind its mask instead of signalling the CPU.
    vm.set_irq_line(4, true).unwrap();
    vm.set_irq_line(4, false).unwrap();
    let after = vm.state().unwrap();
    // SAFETY: as above.
    let master = unsafe { after.pic_master.chip.pic };
    assert_eq!(master.irr & 0x10, 0x10, "IRQ 4 pending");
    assert_eq!((master.imr, master.isr), (0xff, 0));
}

#[test]
fn counter_guest_runs() {
    let mut mem = Mem::new();
    mem.bytes()[CODE as usize..CODE as usize + COUNTER.len()].copy_from_slice(&COUNTER);
    let vm = vm_with(&mem, false);
    let mut vcpu = vm.create_vcpu(0).unwrap();
    boot_counter(vcpu.as_ref());
    for expected in 1..=10u8 {
        assert_eq!(next_count(vcpu.as_mut()), expected);
    }
}

#[test]
fn state_round_trips_into_a_fresh_vm() {
    let mut mem = Mem::new();
    mem.bytes()[CODE as usize..CODE as usize + COUNTER.len()].copy_from_slice(&COUNTER);
    let vm = vm_with(&mem, false);
    let mut vcpu = vm.create_vcpu(0).unwrap();
    boot_counter(vcpu.as_ref());
    for _ in 0..42 {
        next_count(vcpu.as_mut());
    }
    // Finish the pending OUT before saving, as a pause does.
    vcpu.set_immediate_exit(true);
    assert!(matches!(vcpu.run().unwrap(), VmExit::Interrupted));
    vcpu.set_immediate_exit(false);
    let state = vcpu.state().unwrap();
    let vm_state = vm.state().unwrap();
    assert_eq!(state.regs().rax & 0xff, 42);

    // Through JSON, as migration carries it.
    let json = serde_json::to_string(&state).unwrap();
    let state: crate::VcpuState = serde_json::from_str(&json).unwrap();

    let mut mem2 = Mem::new();
    mem2.bytes().copy_from_slice(mem.bytes());
    let vm2 = vm_with(&mem2, false);
    vm2.set_state(&vm_state).unwrap();
    let mut vcpu2 = vm2.create_vcpu(0).unwrap();
    vcpu2.set_state(&state).unwrap();
    for expected in 43..=60u8 {
        assert_eq!(next_count(vcpu2.as_mut()), expected);
    }
    // The original is untouched by the copy and continues too.
    assert_eq!(next_count(vcpu.as_mut()), 43);
}

#[test]
fn dirty_log_sees_guest_writes() {
    let mut mem = Mem::new();
    // `mov byte [0x5000], al; inc eax; out 0x80, al; jmp -10`
    let code = [0xa2, 0x00, 0x50, 0x00, 0x00, 0x40, 0xe6, 0x80, 0xeb, 0xf6];
    mem.bytes()[CODE as usize..CODE as usize + code.len()].copy_from_slice(&code);
    let vm = vm_with(&mem, true);
    let mut vcpu = vm.create_vcpu(0).unwrap();
    boot_counter(vcpu.as_ref());
    // Drain whatever setup dirtied, then run: page 5 must be dirty.
    vm.get_dirty_log(0, MEM_SIZE as u64).unwrap();
    next_count(vcpu.as_mut());
    let log = vm.get_dirty_log(0, MEM_SIZE as u64).unwrap();
    assert_eq!(log.len(), MEM_SIZE / 4096 / 64);
    assert_ne!(log[0] & (1 << 5), 0, "page 5 was written");
    assert_eq!(log[0] & (1 << 7), 0, "page 7 was not");
    // Classic mode clears on read: a run that writes again sets the bit again.
    let again = vm.get_dirty_log(0, MEM_SIZE as u64).unwrap();
    assert_eq!(again[0] & (1 << 5), 0);
    next_count(vcpu.as_mut());
    let third = vm.get_dirty_log(0, MEM_SIZE as u64).unwrap();
    assert_ne!(third[0] & (1 << 5), 0);
}

#[test]
fn unknown_slot_is_an_error() {
    let mem = Mem::new();
    let vm = vm_with(&mem, false);
    assert!(vm.set_dirty_logging(7, true).is_err());
    assert!(vm.remove_user_memory_region(7).is_err());
    vm.set_dirty_logging(0, true).unwrap();
    vm.remove_user_memory_region(0).unwrap();
}

#[test]
fn a_tsc_deadline_timer_survives_a_state_round_trip() {
    // A guest whose LAPIC timer is in TSC-deadline mode with a deadline armed: restored into
    // a fresh VM, the deadline must still be armed (a dropped one stalls a tickless guest).
    const LVT_TIMER: usize = 0x320;
    const TSC_DEADLINE_MODE: u32 = 2 << 17;
    let hv = KvmHypervisor::new().expect("/dev/kvm must be usable for these tests");
    let mut cpuid = hv.supported_cpuid().unwrap();
    for e in cpuid.iter_mut().filter(|e| e.function == 1) {
        e.ecx |= 1 << 24; // TSC-deadline
    }
    let mem = Mem::new();
    let with_deadline = |vm: &Arc<dyn Vm>| {
        let vcpu = vm.create_vcpu(0).unwrap();
        vcpu.set_cpuid(&cpuid).unwrap();
        vcpu
    };
    let vm = vm_with(&mem, false);
    let vcpu = with_deadline(&vm);
    let mut state = vcpu.state().unwrap();
    let lvtt = (0xec | TSC_DEADLINE_MODE).to_le_bytes();
    for (i, b) in lvtt.iter().enumerate() {
        state.lapic.regs[LVT_TIMER + i] = *b as _;
    }
    let tsc = state
        .msrs
        .iter()
        .find(|(i, _)| *i == 0x10)
        .map(|(_, v)| *v)
        .unwrap();
    let deadline = tsc + (1 << 40);
    state
        .msrs
        .retain(|(i, _)| *i != super::vcpu::MSR_IA32_TSC_DEADLINE);
    state
        .msrs
        .push((super::vcpu::MSR_IA32_TSC_DEADLINE, deadline));
    vcpu.set_state(&state).unwrap();
    let armed = |v: &dyn Vcpu| {
        v.state()
            .unwrap()
            .msrs
            .iter()
            .find(|(i, _)| *i == super::vcpu::MSR_IA32_TSC_DEADLINE)
            .map(|(_, v)| *v)
    };
    assert_eq!(armed(vcpu.as_ref()), Some(deadline), "set in place");

    let saved = vcpu.state().unwrap();
    let vm2 = vm_with(&mem, false);
    let vcpu2 = with_deadline(&vm2);
    vcpu2.set_state(&saved).unwrap();
    let restored = armed(vcpu2.as_ref()).unwrap();
    assert_ne!(restored, 0, "the deadline was dropped by the restore");
}

/// The bitmap log is re-armed in 1 GiB chunks (dirty_bitmap.rs): writes on both sides of a
/// chunk boundary and in a short last chunk show up, once per write, sync after sync.
#[test]
fn bitmap_sync_rearms_across_chunk_boundaries() {
    const SIZE: usize = (2 << 30) + (1 << 20);
    // `mov [0x3ffff000], al; mov [0x40000000], al; mov [0x80000000], al; inc eax;
    // out 0x80, al; jmp start`
    let code = [
        0xa2, 0x00, 0xf0, 0xff, 0x3f, 0xa2, 0x00, 0x00, 0x00, 0x40, 0xa2, 0x00, 0x00, 0x00, 0x80,
        0x40, 0xe6, 0x80, 0xeb, 0xec,
    ];
    let written = [0x3ffffu64, 0x40000, 0x80000];
    // SAFETY: a fresh anonymous private mapping (pages appear only where touched).
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            SIZE,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_ANONYMOUS | libc::MAP_PRIVATE | libc::MAP_NORESERVE,
            -1,
            0,
        )
    };
    assert_ne!(p, libc::MAP_FAILED);
    // SAFETY: the code fits at CODE in the fresh mapping, which nothing else uses yet.
    unsafe {
        std::ptr::copy_nonoverlapping(code.as_ptr(), p.cast::<u8>().add(CODE as usize), code.len())
    };
    let hv = KvmHypervisor::with_dirty_ring(false).unwrap();
    let vm = vm_from(&hv, p.cast(), SIZE, true);
    let mut vcpu = vm.create_vcpu(0).unwrap();
    boot_counter(vcpu.as_ref());
    let mut bitmap = vec![0u64; SIZE / 4096 / 64];
    let set = |bitmap: &[u64]| -> Vec<u64> {
        (0..bitmap.len() as u64 * 64)
            .filter(|&p| bitmap[(p / 64) as usize] & (1 << (p % 64)) != 0)
            .collect()
    };
    for round in 0..3 {
        next_count(vcpu.as_mut());
        vm.sync_dirty_bitmap(0, &mut bitmap).unwrap();
        assert_eq!(set(&bitmap), written, "round {round}");
        vm.sync_dirty_bitmap(0, &mut bitmap).unwrap();
        assert!(
            set(&bitmap).is_empty(),
            "round {round}: re-armed, nothing new"
        );
    }
    assert!(
        vm.sync_dirty_bitmap(0, &mut bitmap[..10]).is_err(),
        "too short"
    );
    // A last read leaves the pages dirty (nothing re-armed): a read after it sees them again.
    next_count(vcpu.as_mut());
    vm.read_dirty_bitmap(0, &mut bitmap).unwrap();
    assert_eq!(set(&bitmap), written);
    vm.read_dirty_bitmap(0, &mut bitmap).unwrap();
    assert_eq!(set(&bitmap), written, "not re-armed");
    drop(vcpu);
    drop(vm);
    // SAFETY: unmapping the mapping made above, used by no VM any more.
    unsafe { libc::munmap(p, SIZE) };
}

//! Seccomp filters: every thread that touches guest input runs under an allowlist of the system
//! calls it needs, built with `seccompiler`.
//!
//! | thread           | where it starts                   | what it may do                                   |
//! |------------------|-----------------------------------|--------------------------------------------------|
//! | `vcpuN`          | [`crate::vcpu::VcpuManager::start`] | `KVM_RUN` and the few VM ioctls device models need (ioeventfds, irqfds, GSI routing), re-arming a full dirty ring, eventfd and serial I/O, the kick signal, starting the balloon worker |
//! | `http-server`    | [`crate::api::start_http_server`] | accept, read and answer API connections, hand requests over a channel, remove the socket when told to stop |
//! | `balloon-worker` | the balloon's worker start hook   | epoll over its eventfds, `madvise(MADV_DONTNEED)`, punching holes in shared guest RAM |
//! | `migration-recv` | [`crate::migration::receive::start_receiving`] | what the VMM thread may do, less opening, binding and connecting sockets and reading dirty logs: accept the source on a listener the VMM thread bound, read the stream (memfds with `SCM_RIGHTS`), build and restore the VM, start its vCPUs and balloon worker |
//! | `migration-tx-N` | [`crate::migration::stripes::send`] | read and write one connected migration stream (an added connection of `connections=<n>`), plain or TLS |
//! | `migration-rx-N` | [`crate::migration::stripes::receive`] | the same, on the receiving side, writing into guest memory |
//! | VMM (main)       | [`crate::controller::start_vmm`]  | create and run VMs (KVM system, VM and vCPU ioctls, guest RAM and memfds, kernel and serial files), migrate them over UNIX or TCP sockets (with `SCM_RIGHTS`), start the other threads |
//!
//! Every list also holds what the Rust and C runtimes need on any thread: memory allocation
//! (`mmap`/`mprotect` never with `PROT_EXEC`), futexes, clocks, signal return, logging to
//! standard error or the log file, thread exit, and the `abort` that follows a fatal call.
//!
//! Filters are inherited and stack: a thread started by a filtered thread runs under its parent's
//! filter as well as its own, and a call goes through only if every filter allows it. vCPU
//! threads start the balloon worker (when the guest driver sets DRIVER_OK) and the VMM thread
//! starts vCPUs and, when a VM is restored, the balloon worker; so the vCPU list includes the
//! balloon worker's, and the VMM list includes both. Threads are started with `clone` (only with
//! `CLONE_THREAD`, so never a new process): a second, tiny filter makes `clone3`, whose flags a
//! filter cannot read, fail with `ENOSYS`, and glibc then falls back to `clone`.
//!
//! [`SeccompMode::Enabled`] traps a call outside the list ([`trap`]): one that could escape
//! the sandbox (exec, fork, ptrace, executable memory, ...) prints
//! `cloud-hypervisor: seccomp: thread <name> made forbidden syscall <nr>` and aborts; any other
//! fails with `EPERM` and is counted (`vm.counters`), since libraries make calls the VMM never
//! names and handle their failure: a VMM killed there would lose its guest.
//! [`SeccompMode::Log`] lets it through and has the kernel log it (audit log / `dmesg`).
//! A panic on a filtered thread with `RUST_BACKTRACE` set is such a call (the panic hook reads
//! this executable's debug information): run with `--seccomp false` to get backtraces.

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

use kvm_bindings::{
    kvm_clear_dirty_log, kvm_clock_data, kvm_cpuid2, kvm_debugregs, kvm_dirty_log, kvm_enable_cap,
    kvm_fpu, kvm_ioeventfd, kvm_irq_level, kvm_irq_routing, kvm_irqchip, kvm_irqfd,
    kvm_lapic_state, kvm_mp_state, kvm_msr_list, kvm_msrs, kvm_pit_config, kvm_pit_state2,
    kvm_regs, kvm_sregs, kvm_userspace_memory_region, kvm_vcpu_events, kvm_xcrs, kvm_xsave,
};
use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule, TargetArch,
};
use thiserror::Error;
use vmm_sys_util::ioctl::{ioctl_expr, _IOC_NONE, _IOC_READ, _IOC_WRITE};

pub mod trap;
pub use trap::{refused_calls, RefusedCalls};

/// Whether and how the filters are applied (`--seccomp true|false|log`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum SeccompMode {
    /// A call outside the list fails with `EPERM` (or, if it could escape the sandbox, kills
    /// the process), after one line on standard error.
    #[default]
    Enabled,
    /// A forbidden system call goes through and the kernel logs it.
    Log,
    /// No filters.
    Disabled,
}

/// `--seccomp` was given something other than `true`, `false` or `log`.
#[derive(Debug, Error)]
#[error("--seccomp: invalid value \"{0}\" (expected true, false or log)")]
pub struct ParseSeccompModeError(String);

impl FromStr for SeccompMode {
    type Err = ParseSeccompModeError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "true" => Ok(SeccompMode::Enabled),
            "false" => Ok(SeccompMode::Disabled),
            "log" => Ok(SeccompMode::Log),
            other => Err(ParseSeccompModeError(other.to_string())),
        }
    }
}

impl fmt::Display for SeccompMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            SeccompMode::Enabled => "true",
            SeccompMode::Log => "log",
            SeccompMode::Disabled => "false",
        })
    }
}

/// The kinds of threads that get a filter.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ThreadKind {
    /// A `vcpuN` thread.
    Vcpu,
    /// The `http-server` thread.
    HttpServer,
    /// The balloon's worker thread.
    BalloonWorker,
    /// The VMM thread (the main thread, once the VMM has started).
    Vmm,
    /// The `migration-recv` thread, which receives an incoming migration.
    MigrationReceive,
    /// A `migration-tx-N` thread: sends its part of each round on an added connection.
    MigrationSendStream,
    /// A `migration-rx-N` thread: writes what an added connection brings into guest memory.
    MigrationReceiveStream,
    /// The `migration-send` thread, which sends the VM to another VMM.
    MigrationSend,
}

impl ThreadKind {
    /// Every kind.
    pub const ALL: [ThreadKind; 8] = [
        ThreadKind::Vcpu,
        ThreadKind::HttpServer,
        ThreadKind::BalloonWorker,
        ThreadKind::Vmm,
        ThreadKind::MigrationReceive,
        ThreadKind::MigrationSendStream,
        ThreadKind::MigrationReceiveStream,
        ThreadKind::MigrationSend,
    ];

    /// A short name, for messages.
    pub fn name(self) -> &'static str {
        match self {
            ThreadKind::Vcpu => "vcpu",
            ThreadKind::HttpServer => "http-server",
            ThreadKind::BalloonWorker => "balloon-worker",
            ThreadKind::Vmm => "vmm",
            ThreadKind::MigrationReceive => "migration-recv",
            ThreadKind::MigrationSendStream => "migration-tx",
            ThreadKind::MigrationReceiveStream => "migration-rx",
            ThreadKind::MigrationSend => "migration-send",
        }
    }
}

/// Errors from building or installing a filter.
#[derive(Debug, Error)]
pub enum SeccompError {
    /// The filter could not be built (a bug in the lists).
    #[error("cannot build the {0} seccomp filter")]
    Build(&'static str, #[source] seccompiler::BackendError),
    /// The kernel refused the filter.
    #[error("cannot install the {0} seccomp filter")]
    Install(&'static str, #[source] seccompiler::Error),
}

/// Allowed calls: syscall number to rules, any of which allows it (no rules: any arguments).
#[derive(Default)]
struct Allow(BTreeMap<i64, Vec<SeccompRule>>);

impl Allow {
    /// Allows each of `syscalls` whatever its arguments.
    fn any(&mut self, syscalls: &[libc::c_long]) -> &mut Self {
        for &nr in syscalls {
            self.0.insert(nr, Vec::new());
        }
        self
    }

    /// Allows `syscall` when one of `rules` matches (unless it is already allowed outright).
    fn when(&mut self, syscall: libc::c_long, rules: Vec<SeccompRule>) -> &mut Self {
        match self.0.get_mut(&syscall) {
            Some(existing) if existing.is_empty() => {}
            Some(existing) => {
                for rule in rules {
                    if !existing.contains(&rule) {
                        existing.push(rule);
                    }
                }
            }
            None => {
                self.0.insert(syscall, rules);
            }
        }
        self
    }

    /// Allows everything `other` allows.
    fn merge(&mut self, other: Allow) -> &mut Self {
        for (nr, rules) in other.0 {
            if rules.is_empty() {
                self.any(&[nr]);
            } else {
                self.when(nr, rules);
            }
        }
        self
    }
}

/// One condition on argument `arg` (32 bits are enough for every value used here).
fn cond(arg: u8, op: SeccompCmpOp, value: u64) -> SeccompCondition {
    // Argument indexes are below 6: this cannot fail.
    SeccompCondition::new(arg, SeccompCmpArgLen::Dword, op, value).expect("valid condition")
}

/// A rule of one condition.
fn rule(arg: u8, op: SeccompCmpOp, value: u64) -> SeccompRule {
    SeccompRule::new(vec![cond(arg, op, value)]).expect("non-empty rule")
}

/// Rules allowing argument `arg` to be any of `values`.
fn one_of(arg: u8, values: &[u64]) -> Vec<SeccompRule> {
    values
        .iter()
        .map(|&v| rule(arg, SeccompCmpOp::Eq, v))
        .collect()
}

/// Rules allowing argument `arg` when none of the bits in `mask` is set.
fn without_bits(arg: u8, mask: u64) -> Vec<SeccompRule> {
    vec![rule(arg, SeccompCmpOp::MaskedEq(mask), 0)]
}

/// Rules allowing argument `arg` when all the bits in `mask` are set.
fn with_bits(arg: u8, mask: u64) -> Vec<SeccompRule> {
    vec![rule(arg, SeccompCmpOp::MaskedEq(mask), mask)]
}

// ioctl request numbers (the values are those of <linux/kvm.h> and <asm-generic/ioctls.h>).
const KVMIO: u32 = 0xAE;

const fn io(nr: u32) -> u64 {
    ioctl_expr(_IOC_NONE, KVMIO, nr, 0) as u64
}

const fn ior<T>(nr: u32) -> u64 {
    ioctl_expr(_IOC_READ, KVMIO, nr, std::mem::size_of::<T>() as u32) as u64
}

const fn iow<T>(nr: u32) -> u64 {
    ioctl_expr(_IOC_WRITE, KVMIO, nr, std::mem::size_of::<T>() as u32) as u64
}

const fn iowr<T>(nr: u32) -> u64 {
    ioctl_expr(
        _IOC_READ | _IOC_WRITE,
        KVMIO,
        nr,
        std::mem::size_of::<T>() as u32,
    ) as u64
}

/// KVM ioctl numbers, named as in `<linux/kvm.h>`.
#[allow(missing_docs)]
pub mod kvm_ioctl {
    use super::*;

    // On /dev/kvm.
    pub const KVM_GET_API_VERSION: u64 = io(0x00);
    pub const KVM_CREATE_VM: u64 = io(0x01);
    pub const KVM_GET_MSR_INDEX_LIST: u64 = iowr::<kvm_msr_list>(0x02);
    pub const KVM_CHECK_EXTENSION: u64 = io(0x03);
    pub const KVM_GET_VCPU_MMAP_SIZE: u64 = io(0x04);
    pub const KVM_GET_SUPPORTED_CPUID: u64 = iowr::<kvm_cpuid2>(0x05);
    // On a VM.
    pub const KVM_CREATE_VCPU: u64 = io(0x41);
    pub const KVM_GET_DIRTY_LOG: u64 = iow::<kvm_dirty_log>(0x42);
    pub const KVM_SET_USER_MEMORY_REGION: u64 = iow::<kvm_userspace_memory_region>(0x46);
    pub const KVM_SET_TSS_ADDR: u64 = io(0x47);
    pub const KVM_SET_IDENTITY_MAP_ADDR: u64 = iow::<u64>(0x48);
    pub const KVM_CREATE_IRQCHIP: u64 = io(0x60);
    pub const KVM_IRQ_LINE: u64 = iow::<kvm_irq_level>(0x61);
    pub const KVM_GET_IRQCHIP: u64 = iowr::<kvm_irqchip>(0x62);
    pub const KVM_SET_IRQCHIP: u64 = ior::<kvm_irqchip>(0x63);
    pub const KVM_SET_GSI_ROUTING: u64 = iow::<kvm_irq_routing>(0x6a);
    pub const KVM_IRQFD: u64 = iow::<kvm_irqfd>(0x76);
    pub const KVM_CREATE_PIT2: u64 = iow::<kvm_pit_config>(0x77);
    pub const KVM_IOEVENTFD: u64 = iow::<kvm_ioeventfd>(0x79);
    pub const KVM_SET_CLOCK: u64 = iow::<kvm_clock_data>(0x7b);
    pub const KVM_GET_CLOCK: u64 = ior::<kvm_clock_data>(0x7c);
    pub const KVM_GET_PIT2: u64 = ior::<kvm_pit_state2>(0x9f);
    pub const KVM_SET_PIT2: u64 = iow::<kvm_pit_state2>(0xa0);
    pub const KVM_ENABLE_CAP: u64 = iow::<kvm_enable_cap>(0xa3);
    pub const KVM_CLEAR_DIRTY_LOG: u64 = iowr::<kvm_clear_dirty_log>(0xc0);
    pub const KVM_RESET_DIRTY_RINGS: u64 = io(0xc7);
    // On a vCPU.
    pub const KVM_RUN: u64 = io(0x80);
    pub const KVM_GET_REGS: u64 = ior::<kvm_regs>(0x81);
    pub const KVM_SET_REGS: u64 = iow::<kvm_regs>(0x82);
    pub const KVM_GET_SREGS: u64 = ior::<kvm_sregs>(0x83);
    pub const KVM_SET_SREGS: u64 = iow::<kvm_sregs>(0x84);
    pub const KVM_GET_MSRS: u64 = iowr::<kvm_msrs>(0x88);
    pub const KVM_SET_MSRS: u64 = iow::<kvm_msrs>(0x89);
    pub const KVM_SET_FPU: u64 = iow::<kvm_fpu>(0x8d);
    pub const KVM_GET_LAPIC: u64 = ior::<kvm_lapic_state>(0x8e);
    pub const KVM_SET_LAPIC: u64 = iow::<kvm_lapic_state>(0x8f);
    pub const KVM_SET_CPUID2: u64 = iow::<kvm_cpuid2>(0x90);
    pub const KVM_GET_MP_STATE: u64 = ior::<kvm_mp_state>(0x98);
    pub const KVM_SET_MP_STATE: u64 = iow::<kvm_mp_state>(0x99);
    pub const KVM_GET_VCPU_EVENTS: u64 = ior::<kvm_vcpu_events>(0x9f);
    pub const KVM_SET_VCPU_EVENTS: u64 = iow::<kvm_vcpu_events>(0xa0);
    pub const KVM_GET_DEBUGREGS: u64 = ior::<kvm_debugregs>(0xa1);
    pub const KVM_SET_DEBUGREGS: u64 = iow::<kvm_debugregs>(0xa2);
    pub const KVM_GET_XSAVE: u64 = ior::<kvm_xsave>(0xa4);
    pub const KVM_SET_XSAVE: u64 = iow::<kvm_xsave>(0xa5);
    pub const KVM_GET_XCRS: u64 = ior::<kvm_xcrs>(0xa6);
    pub const KVM_SET_XCRS: u64 = iow::<kvm_xcrs>(0xa7);
}

use kvm_ioctl::*;

/// The ioctls a vCPU thread makes: running the guest, and what device models do on its exits
/// (virtio-pci registers ioeventfds and MSI routes when the driver programs the device).
const VCPU_IOCTLS: &[u64] = &[
    KVM_RUN,
    // A vCPU whose dirty ring fills up collects the rings and has KVM re-arm them.
    KVM_RESET_DIRTY_RINGS,
    KVM_GET_REGS,
    KVM_IOEVENTFD,
    KVM_IRQFD,
    KVM_SET_GSI_ROUTING,
    KVM_IRQ_LINE,
];

/// The ioctls the VMM thread makes: everything the hypervisor crate does, plus `FIONBIO`
/// (connect with a timeout), `FIONREAD` (the DNS resolver), `TCGETS` (is a stream a
/// terminal) and `PAGEMAP_SCAN` (which guest pages are backed, before round 0).
const VMM_IOCTLS: &[u64] = &[
    KVM_GET_API_VERSION,
    KVM_CREATE_VM,
    KVM_GET_MSR_INDEX_LIST,
    KVM_CHECK_EXTENSION,
    KVM_GET_VCPU_MMAP_SIZE,
    KVM_GET_SUPPORTED_CPUID,
    KVM_CREATE_VCPU,
    KVM_GET_DIRTY_LOG,
    KVM_SET_USER_MEMORY_REGION,
    KVM_SET_TSS_ADDR,
    KVM_SET_IDENTITY_MAP_ADDR,
    KVM_CREATE_IRQCHIP,
    KVM_IRQ_LINE,
    KVM_GET_IRQCHIP,
    KVM_SET_IRQCHIP,
    KVM_SET_GSI_ROUTING,
    KVM_IRQFD,
    KVM_CREATE_PIT2,
    KVM_IOEVENTFD,
    KVM_SET_CLOCK,
    KVM_GET_CLOCK,
    KVM_GET_PIT2,
    KVM_SET_PIT2,
    KVM_ENABLE_CAP,
    KVM_CLEAR_DIRTY_LOG,
    KVM_RESET_DIRTY_RINGS,
    KVM_RUN,
    KVM_GET_REGS,
    KVM_SET_REGS,
    KVM_GET_SREGS,
    KVM_SET_SREGS,
    KVM_GET_MSRS,
    KVM_SET_MSRS,
    KVM_SET_FPU,
    KVM_GET_LAPIC,
    KVM_SET_LAPIC,
    KVM_SET_CPUID2,
    KVM_GET_MP_STATE,
    KVM_SET_MP_STATE,
    KVM_GET_VCPU_EVENTS,
    KVM_SET_VCPU_EVENTS,
    KVM_GET_DEBUGREGS,
    KVM_SET_DEBUGREGS,
    KVM_GET_XSAVE,
    KVM_SET_XSAVE,
    KVM_GET_XCRS,
    KVM_SET_XCRS,
    libc::FIONBIO,
    libc::FIONREAD,
    libc::TCGETS,
    // Finding the guest pages the host never backed (on /proc/self/pagemap).
    vm_migration::populated::PAGEMAP_SCAN,
];

/// What any thread of this process may need: memory allocation (never executable), futexes,
/// clocks and sleeps, random keys for hash maps, signal return (the vCPU kick), logging to
/// standard error or the log file, thread exit, and `abort` (after a trapped call).
fn runtime() -> Allow {
    let mut a = Allow::default();
    a.any(&[
        libc::SYS_brk,
        libc::SYS_munmap,
        libc::SYS_mremap,
        libc::SYS_futex,
        libc::SYS_sched_yield,
        libc::SYS_clock_gettime,
        libc::SYS_clock_nanosleep,
        libc::SYS_nanosleep,
        libc::SYS_gettimeofday,
        libc::SYS_getrandom,
        libc::SYS_rt_sigprocmask,
        libc::SYS_rt_sigreturn,
        libc::SYS_restart_syscall,
        libc::SYS_sigaltstack,
        libc::SYS_write,
        libc::SYS_writev,
        libc::SYS_exit,
        libc::SYS_exit_group,
        libc::SYS_getpid,
        libc::SYS_gettid,
    ])
    .when(libc::SYS_mmap, without_bits(2, libc::PROT_EXEC as u64))
    .when(libc::SYS_mprotect, without_bits(2, libc::PROT_EXEC as u64))
    // glibc gives freed thread stacks and heap back with MADV_DONTNEED.
    .when(libc::SYS_madvise, one_of(2, &[libc::MADV_DONTNEED as u64]))
    // abort() raises SIGABRT on itself.
    .when(libc::SYS_tgkill, one_of(2, &[libc::SIGABRT as u64]))
    // Debug builds of the standard library check that a descriptor is open (F_GETFD) before
    // taking ownership of it; the test suite runs debug builds.
    .when(libc::SYS_fcntl, one_of(1, &[libc::F_GETFD as u64]));
    a
}

/// What a thread needs to start another one: the new thread runs under its parent's filters
/// until it has installed its own (which takes `prctl(PR_SET_NO_NEW_PRIVS)` and `seccomp`; adding
/// a filter can only take rights away).
fn spawner() -> Allow {
    let mut a = Allow::default();
    a.any(&[
        libc::SYS_clone3,
        libc::SYS_rseq,
        libc::SYS_set_robust_list,
        libc::SYS_sched_getaffinity,
    ])
    .when(libc::SYS_clone, with_bits(0, libc::CLONE_THREAD as u64))
    .when(
        libc::SYS_prctl,
        one_of(
            0,
            &[libc::PR_SET_NAME as u64, libc::PR_SET_NO_NEW_PRIVS as u64],
        ),
    )
    .when(
        libc::SYS_seccomp,
        one_of(0, &[libc::SECCOMP_SET_MODE_FILTER as u64]),
    );
    a
}

/// The balloon worker: epoll over the queue and control eventfds, guest memory, interrupts
/// (irqfd writes), and giving pages back: `madvise(MADV_DONTNEED)` on the mapping, a punched
/// hole when guest RAM is a shared memfd.
fn balloon_worker() -> Allow {
    let mut a = runtime();
    a.any(&[
        libc::SYS_epoll_create1,
        libc::SYS_epoll_ctl,
        libc::SYS_epoll_wait,
        libc::SYS_epoll_pwait,
        libc::SYS_read,
        libc::SYS_close,
    ])
    .when(
        libc::SYS_fallocate,
        one_of(
            1,
            &[(libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE) as u64],
        ),
    );
    a
}

/// A vCPU: `KVM_RUN` and the exits' device models (serial output to a file or standard output,
/// eventfds, virtio-pci programming), the kick signal, and starting (and joining) the balloon
/// worker, whose calls it must allow too.
fn vcpu() -> Allow {
    let mut a = runtime();
    a.merge(spawner())
        .merge(balloon_worker())
        .any(&[libc::SYS_read, libc::SYS_close])
        .when(libc::SYS_ioctl, one_of(1, VCPU_IOCTLS));
    a
}

/// The API server: UNIX connections watched with `poll`, with timeouts; requests go to the VMM
/// thread over a channel; the socket file is removed when the VMM is told to stop. Validating a
/// `vm.create` body reads the start of the kernel and opens the initramfs: files may be opened
/// read-only.
fn http_server() -> Allow {
    let mut a = runtime();
    a.any(&[
        libc::SYS_accept4,
        libc::SYS_poll,
        libc::SYS_ppoll,
        libc::SYS_read,
        libc::SYS_recvfrom,
        libc::SYS_sendto,
        libc::SYS_shutdown,
        libc::SYS_close,
        libc::SYS_unlink,
        libc::SYS_fstat,
        libc::SYS_newfstatat,
        libc::SYS_statx,
        libc::SYS_lseek,
    ])
    .when(libc::SYS_setsockopt, socket_timeouts())
    .when(libc::SYS_openat, read_only_open());
    a
}

/// `openat` without any flag that writes or creates (`O_WRONLY`, `O_RDWR`, `O_CREAT`,
/// `O_TRUNC`, `O_APPEND`, `O_TMPFILE`).
fn read_only_open() -> Vec<SeccompRule> {
    let writes = libc::O_WRONLY | libc::O_RDWR | libc::O_CREAT | libc::O_TRUNC | libc::O_APPEND;
    // O_TMPFILE includes O_DIRECTORY's bit: only its own bit is checked.
    let tmpfile = libc::O_TMPFILE & !libc::O_DIRECTORY;
    without_bits(2, (writes | tmpfile) as u64)
}

/// `setsockopt` for read and write timeouts.
fn socket_timeouts() -> Vec<SeccompRule> {
    [
        libc::SO_RCVTIMEO,
        libc::SO_SNDTIMEO,
        libc::SO_RCVTIMEO_NEW,
        libc::SO_SNDTIMEO_NEW,
    ]
    .iter()
    .map(|&opt| {
        SeccompRule::new(vec![
            cond(1, SeccompCmpOp::Eq, libc::SOL_SOCKET as u64),
            cond(2, SeccompCmpOp::Eq, opt as u64),
        ])
        .expect("non-empty rule")
    })
    .collect()
}

/// The VMM thread: API requests one at a time. Creating a VM (KVM, guest RAM in anonymous memory
/// or a memfd, reading the kernel and initramfs, opening the serial file), pausing and resuming
/// (kicking vCPUs with SIGRTMIN), and migrating: UNIX or TCP sockets (a host name is resolved
/// from /etc/hosts or DNS), memfds passed with `SCM_RIGHTS`, dirty logging. It starts vCPU
/// threads (and, on restore, the balloon worker), so it allows all they do.
fn vmm() -> Allow {
    let mut a = runtime();
    let kick = libc::SIGRTMIN() as u64;
    a.merge(spawner())
        .merge(vcpu())
        .merge(balloon_worker())
        .any(&[
            // Files: kernel, initramfs, serial output, guest RAM memfds.
            libc::SYS_read,
            libc::SYS_readv,
            libc::SYS_pread64,
            libc::SYS_lseek,
            libc::SYS_openat,
            libc::SYS_close,
            libc::SYS_fstat,
            libc::SYS_newfstatat,
            libc::SYS_statx,
            libc::SYS_ftruncate,
            libc::SYS_memfd_create,
            libc::SYS_eventfd2,
            libc::SYS_unlink,
            libc::SYS_poll,
            libc::SYS_ppoll,
            // Migration sockets.
            libc::SYS_bind,
            libc::SYS_listen,
            libc::SYS_accept4,
            libc::SYS_connect,
            libc::SYS_getsockname,
            libc::SYS_getpeername,
            libc::SYS_getsockopt,
            libc::SYS_sendto,
            libc::SYS_sendmsg,
            libc::SYS_sendmmsg,
            libc::SYS_recvfrom,
            libc::SYS_recvmsg,
            libc::SYS_shutdown,
            // The resolver reads the host name when it loads /etc/resolv.conf.
            libc::SYS_uname,
        ])
        .when(
            libc::SYS_socket,
            one_of(
                0,
                &[
                    libc::AF_UNIX as u64,
                    libc::AF_INET as u64,
                    libc::AF_INET6 as u64,
                ],
            ),
        )
        .when(libc::SYS_setsockopt, socket_timeouts())
        .when(
            libc::SYS_setsockopt,
            vec![
                SeccompRule::new(vec![
                    cond(1, SeccompCmpOp::Eq, libc::SOL_SOCKET as u64),
                    cond(2, SeccompCmpOp::Eq, libc::SO_REUSEADDR as u64),
                ])
                .expect("non-empty rule"),
                SeccompRule::new(vec![
                    cond(1, SeccompCmpOp::Eq, libc::IPPROTO_TCP as u64),
                    cond(2, SeccompCmpOp::Eq, libc::TCP_NODELAY as u64),
                ])
                .expect("non-empty rule"),
                SeccompRule::new(vec![
                    cond(1, SeccompCmpOp::Eq, libc::IPPROTO_IPV6 as u64),
                    cond(2, SeccompCmpOp::Eq, libc::IPV6_V6ONLY as u64),
                ])
                .expect("non-empty rule"),
                // The DNS resolver's UDP sockets.
                SeccompRule::new(vec![
                    cond(1, SeccompCmpOp::Eq, libc::SOL_IP as u64),
                    cond(2, SeccompCmpOp::Eq, libc::IP_RECVERR as u64),
                ])
                .expect("non-empty rule"),
                SeccompRule::new(vec![
                    cond(1, SeccompCmpOp::Eq, libc::SOL_IPV6 as u64),
                    cond(2, SeccompCmpOp::Eq, libc::IPV6_RECVERR as u64),
                ])
                .expect("non-empty rule"),
            ],
        )
        .when(
            libc::SYS_fcntl,
            one_of(
                1,
                &[
                    libc::F_DUPFD_CLOEXEC as u64,
                    libc::F_GETFD as u64,
                    libc::F_SETFD as u64,
                    libc::F_GETFL as u64,
                    libc::F_SETFL as u64,
                ],
            ),
        )
        .when(
            libc::SYS_madvise,
            one_of(
                2,
                &[
                    libc::MADV_HUGEPAGE as u64,
                    libc::MADV_NOHUGEPAGE as u64,
                    libc::MADV_POPULATE_WRITE as u64,
                ],
            ),
        )
        .when(libc::SYS_tgkill, one_of(2, &[kick]))
        .when(libc::SYS_rt_sigaction, one_of(0, &[kick]))
        .when(libc::SYS_ioctl, one_of(1, VMM_IOCTLS));
    a
}

/// The `migration-recv` thread: everything it does is driven by the source's stream. It starts
/// under the VMM thread's filter (which it inherits) and narrows it: the listener is bound by
/// the VMM thread, so it creates, binds and connects no sockets and resolves no names; it reads
/// no dirty logs. It builds and restores the VM and starts the VM's vCPU threads and balloon
/// worker, which keep its filter for life, so it allows all they do.
fn migration_receive() -> Allow {
    let mut a = vmm();
    for nr in [
        libc::SYS_socket,
        libc::SYS_bind,
        libc::SYS_listen,
        libc::SYS_connect,
        libc::SYS_sendmmsg,
        libc::SYS_uname,
    ] {
        a.0.remove(&nr);
    }
    let not_needed = [KVM_GET_DIRTY_LOG, KVM_CLEAR_DIRTY_LOG];
    let ioctls: Vec<u64> = VMM_IOCTLS
        .iter()
        .copied()
        .filter(|nr| !not_needed.contains(nr))
        .collect();
    a.0.insert(libc::SYS_ioctl, one_of(1, &ioctls));
    a
}

/// A `migration-tx-N` or `migration-rx-N` thread: one connected stream (plain or TLS) that
/// it reads and writes, guest memory, and a channel to the thread that started it. Its socket
/// was connected or accepted (and its TLS handshake done) before it started: no socket calls
/// beyond reading, writing and shutting down; TLS draws randomness with `getrandom` (in every
/// list).
fn migration_stream() -> Allow {
    let mut a = runtime();
    a.any(&[
        libc::SYS_read,
        libc::SYS_readv,
        libc::SYS_recvfrom,
        libc::SYS_sendto,
        libc::SYS_sendmsg,
        libc::SYS_shutdown,
        libc::SYS_close,
    ]);
    a
}

/// The `migration-send` thread: it connects (resolving a host name from /etc/hosts or DNS),
/// reads guest memory (shared, no calls) and writes it to the socket, passes memfds in local
/// mode, and starts, stops and ends the balloon's hint rounds (eventfd writes). Everything that
/// touches the VM itself (KVM's dirty log, pausing vCPUs, device state) is done by the VMM thread
/// for it: no KVM ioctl (only [`SOCKET_IOCTLS`]), no file written, no listening socket; new
/// threads only for added connections.
fn migration_send() -> Allow {
    let mut a = vmm();
    for nr in [
        libc::SYS_ioctl,
        libc::SYS_bind,
        libc::SYS_listen,
        libc::SYS_accept4,
        libc::SYS_memfd_create,
        libc::SYS_ftruncate,
        libc::SYS_eventfd2,
        libc::SYS_unlink,
        libc::SYS_openat,
        libc::SYS_fallocate,
        libc::SYS_clone,
        libc::SYS_clone3,
        libc::SYS_prctl,
        libc::SYS_seccomp,
        libc::SYS_rt_sigaction,
        libc::SYS_tgkill,
        libc::SYS_epoll_create1,
        libc::SYS_epoll_ctl,
        libc::SYS_epoll_wait,
        libc::SYS_epoll_pwait,
    ] {
        a.0.remove(&nr);
    }
    a.when(libc::SYS_openat, read_only_open())
        .when(libc::SYS_tgkill, one_of(2, &[libc::SIGABRT as u64]))
        .when(libc::SYS_ioctl, one_of(1, SOCKET_IOCTLS));
    // With connections=<n>, it starts the migration-tx threads (which stack their own filter
    // on this one).
    a.merge(spawner());
    a
}

/// The `migration-send` thread's ioctls: `FIONBIO` (connect with a timeout), `FIONREAD` (the DNS
/// resolver), `TCGETS` (is a stream a terminal) and `PAGEMAP_SCAN`.
const SOCKET_IOCTLS: &[u64] = &[
    libc::FIONBIO,
    libc::FIONREAD,
    libc::TCGETS,
    // Finding the guest pages the host never backed, before round 0 (on /proc/self/pagemap).
    vm_migration::populated::PAGEMAP_SCAN,
];

fn allowlist(kind: ThreadKind) -> Allow {
    match kind {
        ThreadKind::Vcpu => vcpu(),
        ThreadKind::HttpServer => http_server(),
        ThreadKind::BalloonWorker => balloon_worker(),
        ThreadKind::Vmm => vmm(),
        ThreadKind::MigrationReceive => migration_receive(),
        ThreadKind::MigrationSendStream | ThreadKind::MigrationReceiveStream => migration_stream(),
        ThreadKind::MigrationSend => migration_send(),
    }
}

/// The architecture the filters are built for (the VMM is x86-64 only).
const ARCH: TargetArch = TargetArch::x86_64;

/// The BPF program for `kind`'s allowlist: allowed calls go through, others get `on_mismatch`.
pub fn program(kind: ThreadKind, on_mismatch: SeccompAction) -> Result<BpfProgram, SeccompError> {
    let build = |e| SeccompError::Build(kind.name(), e);
    let filter = SeccompFilter::new(allowlist(kind).0, on_mismatch, SeccompAction::Allow, ARCH)
        .map_err(build)?;
    BpfProgram::try_from(filter).map_err(build)
}

/// The second filter: `clone3` fails with `ENOSYS`, so glibc uses `clone`, whose flags the
/// allowlists check.
fn no_clone3() -> Result<BpfProgram, SeccompError> {
    let build = |e| SeccompError::Build("clone3", e);
    let rules = BTreeMap::from([(libc::SYS_clone3, Vec::new())]);
    let filter = SeccompFilter::new(
        rules,
        SeccompAction::Allow,
        SeccompAction::Errno(libc::ENOSYS as u32),
        ARCH,
    )
    .map_err(build)?;
    BpfProgram::try_from(filter).map_err(build)
}

/// Installs `kind`'s filter on the calling thread, as `mode` says. Threads it starts afterwards
/// inherit it.
pub fn apply(kind: ThreadKind, mode: SeccompMode) -> Result<(), SeccompError> {
    let on_mismatch = match mode {
        SeccompMode::Disabled => return Ok(()),
        SeccompMode::Log => SeccompAction::Log,
        SeccompMode::Enabled => SeccompAction::Trap,
    };
    let allow = program(kind, on_mismatch)?;
    let clone3 = no_clone3()?;
    if mode == SeccompMode::Enabled {
        trap::install_handler();
    }
    trap::remember_thread_name(kind.name());
    let install = |e| SeccompError::Install(kind.name(), e);
    seccompiler::apply_filter(&clone3).map_err(install)?;
    seccompiler::apply_filter(&allow).map_err(install)?;
    log::debug!(
        "seccomp: {} filter installed (--seccomp {mode})",
        kind.name()
    );
    Ok(())
}

#[cfg(test)]
mod tests;

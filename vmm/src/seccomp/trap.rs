//! What a filtered thread's call outside its allowlist does (`--seccomp true`).
//!
//! The filter traps such a call (`SIGSYS`) and the handler here decides:
//!
//! - a call that could take the process out of its confinement ([`FATAL`]: running another
//!   program, a new process, tracing or writing another process, executable memory, kernel
//!   modules, mounts, namespaces, credentials, io_uring, ...) prints
//!   `cloud-hypervisor: seccomp: thread <name> made forbidden syscall <nr>` and aborts;
//! - any other call fails with `EPERM`, as if the kernel had refused it, and the VMM goes on.
//!   Libraries make calls the VMM's code never names (glibc's allocator opens
//!   `/proc/sys/vm/overcommit_memory` the first time it shrinks a thread's heap, for one) and
//!   handle their failure; killing the process there would lose the guest. The first refusal of
//!   each system call prints one line on standard error (except the library calls in [`QUIET`]),
//!   and every refusal is counted ([`refused_calls`], shown in `vm.counters`).
//!
//! The handler runs in signal context: it only uses atomics, a stack buffer and `write(2)`.

use std::cell::Cell;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::Once;

/// System calls whose refusal kills the process: each could only be made by code that is not
/// the VMM's (the VMM and its libraries never make them on a filtered thread), and each gives a
/// way out of the sandbox. `clone`, `mmap`, `mprotect` and `pkey_mprotect` trap only with
/// arguments the allowlists refuse: a new process, or executable memory.
pub const FATAL: &[libc::c_long] = &[
    libc::SYS_execve,
    libc::SYS_execveat,
    libc::SYS_fork,
    libc::SYS_vfork,
    libc::SYS_clone,
    libc::SYS_ptrace,
    libc::SYS_process_vm_readv,
    libc::SYS_process_vm_writev,
    libc::SYS_pidfd_getfd,
    libc::SYS_kcmp,
    libc::SYS_mmap,
    libc::SYS_mprotect,
    libc::SYS_pkey_mprotect,
    libc::SYS_kexec_load,
    libc::SYS_kexec_file_load,
    libc::SYS_init_module,
    libc::SYS_finit_module,
    libc::SYS_delete_module,
    libc::SYS_mount,
    libc::SYS_umount2,
    libc::SYS_pivot_root,
    libc::SYS_chroot,
    libc::SYS_unshare,
    libc::SYS_setns,
    libc::SYS_bpf,
    libc::SYS_perf_event_open,
    libc::SYS_userfaultfd,
    libc::SYS_io_uring_setup,
    libc::SYS_io_uring_enter,
    libc::SYS_io_uring_register,
    libc::SYS_open_by_handle_at,
    libc::SYS_setuid,
    libc::SYS_setgid,
    libc::SYS_setreuid,
    libc::SYS_setregid,
    libc::SYS_setresuid,
    libc::SYS_setresgid,
    libc::SYS_setfsuid,
    libc::SYS_setfsgid,
    libc::SYS_setgroups,
    libc::SYS_capset,
    libc::SYS_keyctl,
    libc::SYS_add_key,
    libc::SYS_request_key,
    libc::SYS_iopl,
    libc::SYS_ioperm,
    libc::SYS_reboot,
    libc::SYS_swapon,
    libc::SYS_swapoff,
    libc::SYS_settimeofday,
    libc::SYS_clock_settime,
    libc::SYS_clock_adjtime,
    libc::SYS_adjtimex,
    libc::SYS_sethostname,
    libc::SYS_setdomainname,
    libc::SYS_personality,
];

/// Calls libraries make on their own and handle the refusal of: refused without a line on
/// standard error (still counted). glibc's allocator opens `/proc/sys/vm/overcommit_memory`
/// the first time it shrinks a thread's heap, and treats a failure as "overcommit is not
/// strict".
const QUIET: &[libc::c_long] = &[libc::SYS_openat];

/// How many calls were refused with `EPERM`, process wide.
static REFUSED: AtomicU64 = AtomicU64::new(0);
/// The last refused system call's number (-1: none yet).
static LAST_REFUSED: AtomicI64 = AtomicI64::new(-1);
/// One bit per system call number below 1024: set once its first refusal has been printed.
static REPORTED: [AtomicU64; 16] = [const { AtomicU64::new(0) }; 16];

/// Calls refused so far (with `EPERM`, the process going on), for `vm.counters`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub struct RefusedCalls {
    /// How many calls were refused.
    pub refused_calls: u64,
    /// The number of the last refused system call, if any.
    pub last_refused_syscall: Option<i64>,
}

/// Calls refused so far in this process.
pub fn refused_calls() -> RefusedCalls {
    let last = LAST_REFUSED.load(Ordering::Relaxed);
    RefusedCalls {
        refused_calls: REFUSED.load(Ordering::Relaxed),
        last_refused_syscall: (last >= 0).then_some(last),
    }
}

thread_local! {
    /// The thread's name, NUL padded, for the handler (which must not allocate or lock).
    static THREAD_NAME: Cell<[u8; 16]> = const { Cell::new([0; 16]) };
}

/// Remembers the calling thread's name (or `fallback`) for the handler's messages.
pub fn remember_thread_name(fallback: &str) {
    let current = std::thread::current();
    let name = current.name().unwrap_or(fallback).as_bytes();
    let mut buf = [0u8; 16];
    let n = name.len().min(buf.len());
    buf[..n].copy_from_slice(&name[..n]);
    THREAD_NAME.with(|c| c.set(buf));
}

/// The start of `siginfo_t` as the kernel fills it for SIGSYS (see `<asm-generic/siginfo.h>`).
#[repr(C)]
struct SigsysInfo {
    signo: libc::c_int,
    errno: libc::c_int,
    code: libc::c_int,
    _pad: libc::c_int,
    call_addr: *mut libc::c_void,
    syscall: libc::c_int,
    arch: libc::c_uint,
}

/// A fixed buffer to format a message in without allocating.
struct Line {
    buf: [u8; 192],
    len: usize,
}

impl Line {
    fn new() -> Self {
        Line {
            buf: [0; 192],
            len: 0,
        }
    }

    fn push(&mut self, bytes: &[u8]) {
        for &b in bytes {
            if self.len < self.buf.len() {
                self.buf[self.len] = b;
                self.len += 1;
            }
        }
    }

    fn push_number(&mut self, mut n: i64) {
        if n < 0 {
            self.push(b"-");
            n = -n;
        }
        let mut digits = [0u8; 20];
        let mut i = digits.len();
        loop {
            i -= 1;
            digits[i] = b'0' + (n % 10) as u8;
            n /= 10;
            if n == 0 {
                break;
            }
        }
        self.push(&digits[i..]);
    }

    /// `cloud-hypervisor: seccomp: thread <name>` for the calling thread.
    fn start() -> Self {
        let name = THREAD_NAME.with(|c| c.get());
        let name_len = name.iter().position(|&b| b == 0).unwrap_or(name.len());
        let mut line = Line::new();
        line.push(b"cloud-hypervisor: seccomp: thread ");
        line.push(if name_len == 0 {
            b"?"
        } else {
            &name[..name_len]
        });
        line
    }

    fn write_to_stderr(&self) {
        // SAFETY: write(2) is async-signal-safe and every filter allows it; the buffer outlives
        // the call.
        unsafe {
            libc::write(libc::STDERR_FILENO, self.buf.as_ptr().cast(), self.len);
        }
    }
}

/// Whether `nr`'s refusal is being reported for the first time (true once per number).
fn first_refusal(nr: i64) -> bool {
    let Ok(bit) = usize::try_from(nr) else {
        return true;
    };
    match REPORTED.get(bit / 64) {
        Some(word) => {
            let mask = 1u64 << (bit % 64);
            word.fetch_or(mask, Ordering::Relaxed) & mask == 0
        }
        None => true,
    }
}

extern "C" fn sigsys_handler(_: libc::c_int, info: *mut libc::siginfo_t, ctx: *mut libc::c_void) {
    // SAFETY: the kernel passes a valid siginfo_t for a SA_SIGINFO handler; for SIGSYS its
    // start has the layout of `SigsysInfo`, which is smaller than siginfo_t.
    let nr = i64::from(unsafe { (*(info as *const SigsysInfo)).syscall });
    if FATAL.contains(&nr) {
        let mut line = Line::start();
        line.push(b" made forbidden syscall ");
        line.push_number(nr);
        line.push(b"\n");
        line.write_to_stderr();
        // SAFETY: abort(3) is async-signal-safe; every filter allows what it uses
        // (rt_sigprocmask, getpid, gettid, tgkill(SIGABRT)).
        unsafe { libc::abort() };
    }
    REFUSED.fetch_add(1, Ordering::Relaxed);
    LAST_REFUSED.store(nr, Ordering::Relaxed);
    // SAFETY: for a SA_SIGINFO handler the third argument is the interrupted thread's
    // ucontext_t; the trapped call did not run, and the value left in RAX is what it returns.
    unsafe {
        let uc = ctx.cast::<libc::ucontext_t>();
        (*uc).uc_mcontext.gregs[libc::REG_RAX as usize] = -i64::from(libc::EPERM);
    }
    if !QUIET.contains(&nr) && first_refusal(nr) {
        let mut line = Line::start();
        line.push(b": syscall ");
        line.push_number(nr);
        line.push(b" is not in its seccomp allowlist: refused with EPERM, the VMM goes on\n");
        line.write_to_stderr();
    }
}

/// Installs the SIGSYS handler, once per process.
pub fn install_handler() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        // SAFETY: a zeroed sigaction with a valid handler address and an empty mask is a valid
        // argument; the handler only uses atomics, a stack buffer, write and abort.
        unsafe {
            let mut sa: libc::sigaction = std::mem::zeroed();
            sa.sa_sigaction = sigsys_handler as *const () as usize;
            sa.sa_flags = libc::SA_SIGINFO;
            libc::sigemptyset(&mut sa.sa_mask);
            if libc::sigaction(libc::SIGSYS, &sa, std::ptr::null_mut()) != 0 {
                log::warn!(
                    "seccomp: cannot install the SIGSYS handler: {}",
                    std::io::Error::last_os_error()
                );
            }
        }
    });
}

//! vCPU threads: one per vCPU, running the guest and dispatching its exits, and the control
//! that pauses, resumes and stops them all together.

use std::sync::{Arc, Condvar, Mutex, MutexGuard, Once};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use hypervisor::{Vcpu, VcpuState, VmExit};
use thiserror::Error;

use crate::devices::bus::Bus;
use crate::seccomp::{self, SeccompMode, ThreadKind};

/// Errors from controlling vCPU threads.
#[derive(Debug, Error)]
pub enum VcpuError {
    /// A vCPU thread could not be spawned.
    #[error("cannot spawn a vCPU thread")]
    Spawn(#[source] std::io::Error),
    /// The vCPUs did not stop in time.
    #[error("vCPUs did not pause within {0:?}")]
    PauseTimeout(Duration),
    /// Saving or restoring a vCPU failed.
    #[error("vCPU {0} state")]
    State(u8, #[source] hypervisor::CpuError),
    /// The operation needs paused vCPUs.
    #[error("vCPUs are not paused")]
    NotPaused,
}

/// Why a vCPU thread told the VMM that the VM should end.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VcpuExitEvent {
    /// The guest shut down (triple fault, or a shutdown system event).
    Shutdown,
    /// The guest asked for a reset.
    Reset,
    /// The vCPU failed; the text says how.
    Failed(String),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Request {
    Run,
    Pause,
    Stop,
}

struct ControlState {
    request: Request,
    parked: usize,
    exited: usize,
}

/// Shared by the VMM and every vCPU thread.
struct Control {
    state: Mutex<ControlState>,
    changed: Condvar,
}

impl Control {
    fn lock(&self) -> MutexGuard<'_, ControlState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// The signal that kicks a vCPU thread out of KVM_RUN.
fn kick_signal() -> libc::c_int {
    libc::SIGRTMIN()
}

extern "C" fn noop_signal_handler(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {}

fn install_kick_handler() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        // SAFETY: a zeroed sigaction with a valid handler address and an empty mask is a valid
        // argument; the handler does nothing, so it is async-signal-safe.
        unsafe {
            let mut sa: libc::sigaction = std::mem::zeroed();
            sa.sa_sigaction = noop_signal_handler as *const () as usize;
            sa.sa_flags = libc::SA_SIGINFO;
            libc::sigemptyset(&mut sa.sa_mask);
            libc::sigaction(kick_signal(), &sa, std::ptr::null_mut());
        }
    });
}

/// Where vCPU threads report that the VM should end.
pub type ExitSink = Arc<dyn Fn(VcpuExitEvent) + Send + Sync>;

/// The buses a vCPU dispatches its exits to.
#[derive(Clone)]
pub struct ExitHandlers {
    /// Port I/O.
    pub pio: Arc<Bus>,
    /// MMIO.
    pub mmio: Arc<Bus>,
}

/// The running vCPUs of one VM.
pub struct VcpuManager {
    control: Arc<Control>,
    vcpus: Vec<Arc<Mutex<Box<dyn Vcpu>>>>,
    threads: Vec<(JoinHandle<()>, libc::pthread_t)>,
}

impl VcpuManager {
    /// Takes ownership of the VM's vCPUs (created and set up, not yet running).
    pub fn new(vcpus: Vec<Box<dyn Vcpu>>) -> Self {
        VcpuManager {
            control: Arc::new(Control {
                state: Mutex::new(ControlState {
                    request: Request::Run,
                    parked: 0,
                    exited: 0,
                }),
                changed: Condvar::new(),
            }),
            vcpus: vcpus.into_iter().map(|v| Arc::new(Mutex::new(v))).collect(),
            threads: Vec::new(),
        }
    }

    /// Runs `f` on vCPU `id` (not while the threads run it), if it exists.
    pub fn with_vcpu<R>(&self, id: usize, f: impl FnOnce(&dyn Vcpu) -> R) -> Option<R> {
        let v = self.vcpus.get(id)?;
        let v = v.lock().unwrap_or_else(|e| e.into_inner());
        Some(f(v.as_ref()))
    }

    /// How many vCPUs there are.
    pub fn count(&self) -> usize {
        self.vcpus.len()
    }

    /// Starts a thread per vCPU, each under the vCPU seccomp filter as `seccomp` says. With
    /// `paused`, they park before their first run.
    pub fn start(
        &mut self,
        handlers: ExitHandlers,
        events: ExitSink,
        paused: bool,
        seccomp: SeccompMode,
    ) -> Result<(), VcpuError> {
        install_kick_handler();
        if paused {
            self.control.lock().request = Request::Pause;
        }
        for (id, vcpu) in self.vcpus.iter().enumerate() {
            let (vcpu, control, handlers, events) = (
                vcpu.clone(),
                self.control.clone(),
                handlers.clone(),
                events.clone(),
            );
            let handle = std::thread::Builder::new()
                .name(format!("vcpu{id}"))
                .spawn(move || vcpu_loop(id, &vcpu, &control, &handlers, &events, seccomp))
                .map_err(VcpuError::Spawn)?;
            let tid = std::os::unix::thread::JoinHandleExt::as_pthread_t(&handle);
            self.threads.push((handle, tid));
        }
        Ok(())
    }

    fn kick_all(&self) {
        for (_, tid) in &self.threads {
            // SAFETY: `tid` is a live thread of this process (joined only in `stop`), and the
            // signal has a no-op handler installed.
            unsafe { libc::pthread_kill(*tid, kick_signal()) };
        }
    }

    /// Pauses every vCPU and waits until all are parked, with their pending I/O completed.
    pub fn pause(&self) -> Result<(), VcpuError> {
        let timeout = Duration::from_secs(5);
        self.control.lock().request = Request::Pause;
        let start = Instant::now();
        loop {
            // Kick repeatedly: a signal that lands just before a thread enters KVM_RUN is lost.
            self.kick_all();
            let state = self.control.lock();
            if state.parked + state.exited >= self.threads.len() {
                return Ok(());
            }
            let (_state, _) = self
                .control
                .changed
                .wait_timeout(state, Duration::from_millis(2))
                .unwrap_or_else(|e| e.into_inner());
            if start.elapsed() > timeout {
                return Err(VcpuError::PauseTimeout(timeout));
            }
        }
    }

    /// Lets paused vCPUs run again.
    pub fn resume(&self) {
        self.control.lock().request = Request::Run;
        self.control.changed.notify_all();
    }

    /// Stops and joins every vCPU thread.
    pub fn stop(&mut self) {
        self.control.lock().request = Request::Stop;
        self.control.changed.notify_all();
        let deadline = Instant::now() + Duration::from_secs(5);
        while self.control.lock().exited < self.threads.len() && Instant::now() < deadline {
            self.kick_all();
            std::thread::sleep(Duration::from_millis(2));
        }
        for (handle, _) in self.threads.drain(..) {
            if handle.is_finished() {
                let _ = handle.join();
            } else {
                log::error!("a vCPU thread did not stop; leaving it detached");
            }
        }
    }

    fn ensure_paused(&self) -> Result<(), VcpuError> {
        let state = self.control.lock();
        if state.request != Request::Pause || state.parked + state.exited < self.threads.len() {
            return Err(VcpuError::NotPaused);
        }
        Ok(())
    }

    /// Saves every vCPU's state. The vCPUs must be paused (or never started).
    pub fn states(&self) -> Result<Vec<VcpuState>, VcpuError> {
        if !self.threads.is_empty() {
            self.ensure_paused()?;
        }
        self.vcpus
            .iter()
            .enumerate()
            .map(|(id, v)| {
                let v = v.lock().unwrap_or_else(|e| e.into_inner());
                v.state().map_err(|e| VcpuError::State(id as u8, e))
            })
            .collect()
    }

    /// Restores states saved by [`VcpuManager::states`], before the threads start.
    pub fn restore(&self, states: &[VcpuState]) -> Result<(), VcpuError> {
        for (id, (v, s)) in self.vcpus.iter().zip(states).enumerate() {
            let v = v.lock().unwrap_or_else(|e| e.into_inner());
            v.set_state(s).map_err(|e| VcpuError::State(id as u8, e))?;
        }
        Ok(())
    }
}

impl Drop for VcpuManager {
    fn drop(&mut self) {
        if !self.threads.is_empty() {
            self.stop();
        }
    }
}

/// Runs one vCPU until told to stop or the guest ends.
fn vcpu_loop(
    id: usize,
    vcpu: &Mutex<Box<dyn Vcpu>>,
    control: &Control,
    handlers: &ExitHandlers,
    events: &ExitSink,
    seccomp: SeccompMode,
) {
    let mut finished = false;
    if let Err(e) = seccomp::apply(ThreadKind::Vcpu, seccomp) {
        // Never run the guest unfiltered: report and wait to be stopped.
        let why = crate::api::error_chain(&e);
        events(VcpuExitEvent::Failed(format!("vcpu{id}: {why}")));
        finished = true;
    }
    loop {
        {
            let mut state = control.lock();
            if state.request == Request::Pause {
                // Let KVM complete an in-flight port or MMIO read before the state can be saved.
                {
                    let mut v = vcpu.lock().unwrap_or_else(|e| e.into_inner());
                    v.set_immediate_exit(true);
                    let _ = v.run();
                    v.set_immediate_exit(false);
                }
                state.parked += 1;
                control.changed.notify_all();
                while state.request == Request::Pause {
                    state = control
                        .changed
                        .wait(state)
                        .unwrap_or_else(|e| e.into_inner());
                }
                state.parked -= 1;
            }
            if state.request == Request::Stop || finished {
                if state.request == Request::Stop {
                    state.exited += 1;
                    control.changed.notify_all();
                    return;
                }
                // The guest ended: wait for the VMM to stop us.
                state.parked += 1;
                control.changed.notify_all();
                while state.request != Request::Stop {
                    state = control
                        .changed
                        .wait(state)
                        .unwrap_or_else(|e| e.into_inner());
                }
                state.parked -= 1;
                state.exited += 1;
                control.changed.notify_all();
                return;
            }
        }
        let mut v = vcpu.lock().unwrap_or_else(|e| e.into_inner());
        let event = match v.run() {
            Ok(VmExit::IoOut(port, data)) => {
                if !handlers.pio.write(u64::from(port), data) {
                    log::trace!("vcpu{id}: unhandled out {port:#x}");
                }
                None
            }
            Ok(VmExit::IoIn(port, data)) => {
                if !handlers.pio.read(u64::from(port), data) {
                    data.fill(0xff);
                }
                None
            }
            Ok(VmExit::MmioWrite(addr, data)) => {
                if !handlers.mmio.write(addr, data) {
                    log::trace!("vcpu{id}: unhandled MMIO write at {addr:#x}");
                }
                None
            }
            Ok(VmExit::MmioRead(addr, data)) => {
                if !handlers.mmio.read(addr, data) {
                    data.fill(0xff);
                }
                None
            }
            // A full dirty ring was collected inside `run`: just run on.
            Ok(VmExit::Interrupted) | Ok(VmExit::Hlt) | Ok(VmExit::DirtyRingFull) => None,
            Ok(VmExit::Shutdown) => Some(VcpuExitEvent::Shutdown),
            Ok(VmExit::Reset) => Some(VcpuExitEvent::Reset),
            Ok(VmExit::InternalError(why)) => {
                let rip = v.regs().map(|r| r.rip).unwrap_or(0);
                Some(VcpuExitEvent::Failed(format!(
                    "vcpu{id}: {why} at rip {rip:#x}"
                )))
            }
            Ok(VmExit::Other(what)) => {
                log::warn!("vcpu{id}: unexpected exit {what}");
                None
            }
            Err(e) => Some(VcpuExitEvent::Failed(format!("vcpu{id}: {e}"))),
        };
        drop(v);
        if let Some(event) = event {
            events(event);
            finished = true;
        }
    }
}

//! What the sending side of a migration does to the VM it migrates, as a trait: the VM itself
//! (a migration sent on the thread that owns it), or a [`VmRemote`] on the `migration-send`
//! thread, which asks the VMM thread (the VM's owner) to act for it.
//!
//! Guest memory is shared (an `Arc`), so pages are read and sent on the migration thread; only
//! the few steps that need the VM itself (dirty logging, pause, resume, the device snapshot) go
//! to the VMM thread, one message each.

use std::sync::mpsc::{channel, Sender};
use std::sync::Arc;

use super::dirty::DirtyPages;
use crate::config::VmConfig;
use crate::memory::GuestMemoryMmap;
use crate::seccomp::SeccompMode;
use crate::vm::{GuestEnd, Vm, VmError, VmSnapshot, VmState};

/// The VM as the sender sees it.
pub trait SourceVm {
    /// Lifecycle state.
    fn state(&self) -> VmState;
    /// The configuration it was built from.
    fn config(&self) -> &VmConfig;
    /// Guest RAM.
    fn memory(&self) -> &Arc<GuestMemoryMmap>;
    /// Parks the vCPUs.
    fn pause(&mut self) -> Result<(), VmError>;
    /// Lets them run again.
    fn resume(&mut self) -> Result<(), VmError>;
    /// The CPU and device state of the paused VM.
    fn snapshot(&self) -> Result<VmSnapshot, VmError>;
    /// Starts recording guest writes.
    fn start_dirty_log(&self) -> Result<(), VmError>;
    /// Stops recording them.
    fn stop_dirty_log(&self) -> Result<(), VmError>;
    /// Fills `pages` with the pages written since the last call (see [`DirtyPages::collect`])
    /// and hands them back.
    fn collect_dirty(&self, pages: DirtyPages, rearm: bool) -> Result<DirtyPages, VmError>;
    /// Filters for the threads the migration starts.
    fn seccomp_mode(&self) -> SeccompMode;
    /// Why the guest ended (powered off, reset, a vCPU failed), if it has.
    fn guest_end(&self) -> Option<String>;
}

impl SourceVm for Vm {
    fn state(&self) -> VmState {
        Vm::state(self)
    }
    fn config(&self) -> &VmConfig {
        Vm::config(self)
    }
    fn memory(&self) -> &Arc<GuestMemoryMmap> {
        Vm::memory(self)
    }
    fn pause(&mut self) -> Result<(), VmError> {
        Vm::pause(self)
    }
    fn resume(&mut self) -> Result<(), VmError> {
        Vm::resume(self)
    }
    fn snapshot(&self) -> Result<VmSnapshot, VmError> {
        Vm::snapshot(self)
    }
    fn start_dirty_log(&self) -> Result<(), VmError> {
        Vm::start_dirty_log(self)
    }
    fn stop_dirty_log(&self) -> Result<(), VmError> {
        Vm::stop_dirty_log(self)
    }
    fn collect_dirty(&self, mut pages: DirtyPages, rearm: bool) -> Result<DirtyPages, VmError> {
        pages.collect(self, rearm)?;
        Ok(pages)
    }
    fn seccomp_mode(&self) -> SeccompMode {
        Vm::seccomp_mode(self)
    }
    fn guest_end(&self) -> Option<String> {
        Vm::guest_end(self)
    }
}

/// A step the VMM thread carries out on the VM for the `migration-send` thread.
#[derive(Debug)]
pub enum VmStep {
    /// [`Vm::pause`].
    Pause,
    /// [`Vm::resume`].
    Resume,
    /// [`Vm::snapshot`].
    Snapshot,
    /// [`Vm::start_dirty_log`].
    StartDirtyLog,
    /// [`Vm::stop_dirty_log`].
    StopDirtyLog,
    /// [`DirtyPages::collect`], re-armed or not.
    CollectDirty(Box<DirtyPages>, bool),
}

/// What a [`VmStep`] gave.
pub enum VmStepResult {
    /// The step was done.
    Done,
    /// The snapshot.
    Snapshot(Box<VmSnapshot>),
    /// The dirty pages.
    Dirty(Box<DirtyPages>),
}

/// A step and where its result goes.
pub struct VmStepRequest {
    /// The step.
    pub step: VmStep,
    /// Where to send the result.
    pub reply: Sender<Result<VmStepResult, VmError>>,
}

impl VmStepRequest {
    /// Carries the step out on `vm` (on the thread that owns it) and answers.
    pub fn run_on(self, vm: &mut Vm) {
        let result = match self.step {
            VmStep::Pause => vm.pause().map(|_| VmStepResult::Done),
            VmStep::Resume => vm.resume().map(|_| VmStepResult::Done),
            VmStep::Snapshot => vm.snapshot().map(|s| VmStepResult::Snapshot(Box::new(s))),
            VmStep::StartDirtyLog => vm.start_dirty_log().map(|_| VmStepResult::Done),
            VmStep::StopDirtyLog => vm.stop_dirty_log().map(|_| VmStepResult::Done),
            VmStep::CollectDirty(mut pages, rearm) => {
                pages.collect(vm, rearm).map(|_| VmStepResult::Dirty(pages))
            }
        };
        // The migration thread may be gone; nobody needs the result then.
        let _ = self.reply.send(result);
    }

    /// Answers that there is no VM to act on any more.
    pub fn refuse(self) {
        let _ = self
            .reply
            .send(Err(VmError::InvalidState(VmState::Shutdown)));
    }
}

/// How the `migration-send` thread reaches the VMM thread: sends a request, false when the VMM
/// thread is gone.
pub type StepSender = Box<dyn Fn(VmStepRequest) -> bool + Send>;

/// The VM, seen from the `migration-send` thread.
pub struct VmRemote {
    config: VmConfig,
    memory: Arc<GuestMemoryMmap>,
    state: VmState,
    seccomp: SeccompMode,
    guest_end: GuestEnd,
    send: StepSender,
}

impl VmRemote {
    /// `vm` (its configuration, memory, state and filters), reached through `send`.
    pub fn new(vm: &Vm, send: StepSender) -> Self {
        VmRemote {
            config: vm.config().clone(),
            memory: vm.memory().clone(),
            state: vm.state(),
            seccomp: vm.seccomp_mode(),
            guest_end: vm.guest_end_handle(),
            send,
        }
    }

    fn ask(&self, step: VmStep) -> Result<VmStepResult, VmError> {
        let gone = || VmError::InvalidState(VmState::Shutdown);
        let (reply, answer) = channel();
        if !(self.send)(VmStepRequest { step, reply }) {
            return Err(gone());
        }
        answer.recv().map_err(|_| gone())?
    }

    fn done(&self, step: VmStep) -> Result<(), VmError> {
        self.ask(step).map(|_| ())
    }
}

impl SourceVm for VmRemote {
    fn state(&self) -> VmState {
        self.state
    }
    fn config(&self) -> &VmConfig {
        &self.config
    }
    fn memory(&self) -> &Arc<GuestMemoryMmap> {
        &self.memory
    }
    fn pause(&mut self) -> Result<(), VmError> {
        self.done(VmStep::Pause)?;
        self.state = VmState::Paused;
        Ok(())
    }
    fn resume(&mut self) -> Result<(), VmError> {
        self.done(VmStep::Resume)?;
        self.state = VmState::Running;
        Ok(())
    }
    fn snapshot(&self) -> Result<VmSnapshot, VmError> {
        match self.ask(VmStep::Snapshot)? {
            VmStepResult::Snapshot(s) => Ok(*s),
            _ => Err(VmError::InvalidState(self.state)),
        }
    }
    fn start_dirty_log(&self) -> Result<(), VmError> {
        self.done(VmStep::StartDirtyLog)
    }
    fn stop_dirty_log(&self) -> Result<(), VmError> {
        self.done(VmStep::StopDirtyLog)
    }
    fn collect_dirty(&self, pages: DirtyPages, rearm: bool) -> Result<DirtyPages, VmError> {
        match self.ask(VmStep::CollectDirty(Box::new(pages), rearm))? {
            VmStepResult::Dirty(pages) => Ok(*pages),
            _ => Err(VmError::InvalidState(self.state)),
        }
    }
    fn seccomp_mode(&self) -> SeccompMode {
        self.seccomp
    }
    fn guest_end(&self) -> Option<String> {
        self.guest_end.why()
    }
}

//! One virtual machine: its memory, devices and vCPUs, and its lifecycle
//! (created → running ⇄ paused → shut down).

use std::sync::Arc;

use hypervisor::{Capability, Hypervisor, Vm as HypervisorVm};
use serde::{Deserialize, Serialize};
use thiserror::Error;
use virtio_devices::{BalloonState, VirtioPciState};
use vm_memory::GuestMemoryBackend;

use crate::boot::{self, regs, BootError};
use crate::config::VmConfig;
use crate::devices::legacy::LegacyEvent;
use crate::devices::{DeviceError, DeviceManager};
use crate::interrupts::InterruptManager;
use crate::memory::{self, GuestMemoryMmap, MemoryError};
use crate::seccomp::SeccompMode;
use crate::vcpu::{ExitHandlers, ExitSink, VcpuError, VcpuExitEvent, VcpuManager};

/// Errors from building or driving a VM.
#[derive(Debug, Error)]
pub enum VmError {
    /// The hypervisor refused to create the VM.
    #[error("cannot create the VM")]
    Create(#[source] hypervisor::HypervisorError),
    /// A VM-level hypervisor call failed.
    #[error("VM setup failed")]
    Hypervisor(#[source] hypervisor::VmError),
    /// Guest memory could not be set up.
    #[error("cannot set up guest memory")]
    Memory(#[source] MemoryError),
    /// Devices could not be set up.
    #[error("cannot set up devices")]
    Devices(#[source] DeviceError),
    /// A vCPU could not be set up.
    #[error("cannot set up vCPU {0}")]
    VcpuSetup(u8, #[source] hypervisor::CpuError),
    /// The payload could not be loaded.
    #[error("cannot load the boot payload")]
    Boot(#[source] BootError),
    /// The boot registers could not be set.
    #[error("cannot set the boot registers")]
    Regs(#[source] regs::RegsError),
    /// vCPU control failed.
    #[error("vCPU control failed")]
    Vcpu(#[source] VcpuError),
    /// A device's saved state does not fit this VM.
    #[error("cannot restore device state: {0}")]
    DeviceState(String),
    /// A snapshot for a different number of vCPUs.
    #[error("snapshot has {0} vCPUs, this VM {1}")]
    SnapshotMismatch(usize, usize),
    /// The request does not fit the VM's state.
    #[error("VM is {0:?}")]
    InvalidState(VmState),
}

/// Locks `m`, taking the data of a poisoned lock as it is (a panicked holder is reported
/// where it happened; the VMM goes on).
pub(crate) fn lock<T: ?Sized>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Where a VM is in its life.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub enum VmState {
    /// Built, not yet booted.
    Created,
    /// vCPUs running.
    Running,
    /// vCPUs parked.
    Paused,
    /// Stopped for good.
    Shutdown,
}

/// The CPU-side state of a paused VM: VM-wide interrupt controllers and clock, and every vCPU.
/// Memory travels separately.
#[derive(Debug, Serialize, Deserialize)]
pub struct VmSnapshot {
    /// Irqchips, PIT and clock.
    pub vm: hypervisor::VmState,
    /// One entry per vCPU, in id order.
    pub vcpus: Vec<hypervisor::VcpuState>,
    /// The virtio-balloon's PCI function and device state, if the VM has one.
    #[serde(default)]
    pub balloon: Option<VirtioPciState<BalloonState>>,
    /// The user had paused the VM before it was migrated: it stays paused where it lands.
    #[serde(default)]
    pub paused: bool,
}

/// What the VM reports about itself for `vm.info`.
#[derive(Debug, Serialize)]
pub struct VmInfo<'a> {
    /// Lifecycle state.
    pub state: VmState,
    /// The configuration it was built from.
    pub config: &'a VmConfig,
    /// RAM minus what the balloon holds, in bytes.
    pub memory_actual_size: u64,
}

/// A VM and everything it owns.
pub struct Vm {
    config: VmConfig,
    vm: Arc<dyn HypervisorVm>,
    memory: Arc<GuestMemoryMmap>,
    devices: DeviceManager,
    _interrupts: Arc<InterruptManager>,
    vcpus: VcpuManager,
    state: VmState,
    exit_sink: ExitSink,
    /// Set by the first event that ends the guest (power off, reset, a failed vCPU), on the
    /// thread that saw it, before the VMM thread hears of it.
    guest_end: GuestEnd,
    seccomp: SeccompMode,
}

/// Why the guest ended, once it has: power off, reset, or a vCPU that failed. Shared by the
/// threads that see such events and the code (a migration) that must not carry a guest that
/// ended on as if it still ran.
#[derive(Clone, Debug, Default)]
pub struct GuestEnd(Arc<std::sync::Mutex<Option<String>>>);

impl GuestEnd {
    /// Records `event` unless an earlier event already ended the guest.
    fn record(&self, event: &VcpuExitEvent) {
        let mut end = lock(&self.0);
        if end.is_none() {
            *end = Some(match event {
                VcpuExitEvent::Shutdown => "the guest powered off (or triple-faulted)".into(),
                VcpuExitEvent::Reset => "the guest asked for a reset".into(),
                VcpuExitEvent::Failed(why) => format!("a vCPU failed: {why}"),
            });
        }
    }

    /// Why the guest ended, if it has.
    pub fn why(&self) -> Option<String> {
        lock(&self.0).clone()
    }

    /// An exit sink that records the event here before passing it to `inner`.
    fn wrap(&self, inner: ExitSink) -> ExitSink {
        let end = self.clone();
        Arc::new(move |e| {
            end.record(&e);
            inner(e)
        })
    }
}

impl Vm {
    /// Builds a VM from `config`: KVM VM, guest memory and slots, irqchip, devices and vCPUs.
    /// `exit_sink` hears when the guest shuts down, resets or a vCPU fails.
    pub fn new(
        config: VmConfig,
        hypervisor: &dyn Hypervisor,
        exit_sink: ExitSink,
    ) -> Result<Self, VmError> {
        Self::new_with_seccomp(config, hypervisor, exit_sink, SeccompMode::Enabled)
    }

    /// Like [`Vm::new`], with its vCPU and balloon worker threads under seccomp filters as
    /// `seccomp` says ([`Vm::new`] enables them).
    pub fn new_with_seccomp(
        config: VmConfig,
        hypervisor: &dyn Hypervisor,
        exit_sink: ExitSink,
        seccomp: SeccompMode,
    ) -> Result<Self, VmError> {
        let memory = memory::create_guest_memory(&config.memory).map_err(VmError::Memory)?;
        Self::with_memory(config, memory, hypervisor, exit_sink, seccomp)
    }

    /// Like [`Vm::new_with_seccomp`], with guest memory made elsewhere (shared with a migration
    /// source, say).
    pub fn with_memory(
        config: VmConfig,
        memory: Arc<GuestMemoryMmap>,
        hypervisor: &dyn Hypervisor,
        exit_sink: ExitSink,
        seccomp: SeccompMode,
    ) -> Result<Self, VmError> {
        let guest_end = GuestEnd::default();
        let exit_sink = guest_end.wrap(exit_sink);
        let started = std::time::Instant::now();
        let vm = hypervisor.create_vm().map_err(VmError::Create)?;
        let created = started.elapsed();
        memory::register_slots(vm.as_ref(), &memory, false).map_err(VmError::Memory)?;
        let slots = started.elapsed();
        vm.create_irqchip().map_err(VmError::Hypervisor)?;
        let interrupts = Arc::new(InterruptManager::new(vm.clone()).map_err(VmError::Hypervisor)?);
        let event_sink = exit_sink.clone();
        let devices = DeviceManager::new(
            &vm,
            &interrupts,
            &memory,
            &config,
            Arc::new(move |e| match e {
                LegacyEvent::Reset => event_sink(VcpuExitEvent::Reset),
                LegacyEvent::PowerOff => event_sink(VcpuExitEvent::Shutdown),
            }),
            seccomp,
        )
        .map_err(VmError::Devices)?;

        let supported = hypervisor.supported_cpuid().map_err(VmError::Create)?;
        let features = boot::cpuid::CpuidFeatures {
            tsc_deadline_timer: hypervisor.check_capability(Capability::TscDeadlineTimer),
        };
        let count = config.cpus.boot_vcpus;
        let mut vcpus = Vec::new();
        for id in 0..count {
            let vcpu = vm.create_vcpu(id).map_err(VmError::Hypervisor)?;
            vcpu.set_cpuid(&boot::cpuid::for_vcpu(&supported, id, count, features))
                .map_err(|e| VmError::VcpuSetup(id, e))?;
            vcpu.setup_lint().map_err(|e| VmError::VcpuSetup(id, e))?;
            vcpus.push(vcpu);
        }
        log::info!(
            "VM set up in {:?}: KVM VM {created:?}, memory slots {:?}, devices and vCPUs {:?}",
            started.elapsed(),
            slots - created,
            started.elapsed() - slots
        );
        Ok(Vm {
            config,
            vm,
            memory,
            devices,
            _interrupts: interrupts,
            vcpus: VcpuManager::new(vcpus),
            state: VmState::Created,
            exit_sink,
            guest_end,
            seccomp,
        })
    }

    /// Why the guest ended (powered off, reset, a vCPU failed), if it has, even before the VMM
    /// thread has handled the event.
    pub fn guest_end(&self) -> Option<String> {
        self.guest_end.why()
    }

    /// Where the end of the guest is recorded, for a thread that watches it.
    pub fn guest_end_handle(&self) -> GuestEnd {
        self.guest_end.clone()
    }

    /// The configuration the VM was built from.
    pub fn config(&self) -> &VmConfig {
        &self.config
    }

    /// The VM's lifecycle state.
    pub fn state(&self) -> VmState {
        self.state
    }

    /// Guest memory.
    pub fn memory(&self) -> &Arc<GuestMemoryMmap> {
        &self.memory
    }

    /// How this VM's threads are filtered (threads a migration starts use the same mode).
    pub fn seccomp_mode(&self) -> SeccompMode {
        self.seccomp
    }

    /// The hypervisor VM.
    pub fn hypervisor_vm(&self) -> &Arc<dyn HypervisorVm> {
        &self.vm
    }

    fn handlers(&self) -> ExitHandlers {
        ExitHandlers {
            pio: self.devices.pio.clone(),
            mmio: self.devices.mmio.clone(),
        }
    }

    /// Loads the payload and starts the vCPUs.
    pub fn boot(&mut self) -> Result<(), VmError> {
        if self.state != VmState::Created {
            return Err(VmError::InvalidState(self.state));
        }
        let platform = boot::Platform {
            vcpus: self.config.cpus.boot_vcpus,
            com1: self.devices.has_com1(),
        };
        let entry = boot::load_payload(&self.memory, &self.config.payload, platform)
            .map_err(VmError::Boot)?;
        self.vcpus
            .with_vcpu(0, |bsp| regs::setup_boot_vcpu(bsp, &self.memory, entry))
            .ok_or(VmError::InvalidState(self.state))?
            .map_err(VmError::Regs)?;
        self.vcpus
            .start(self.handlers(), self.exit_sink.clone(), false, self.seccomp)
            .map_err(VmError::Vcpu)?;
        self.state = VmState::Running;
        Ok(())
    }

    /// Parks the vCPUs.
    pub fn pause(&mut self) -> Result<(), VmError> {
        if self.state != VmState::Running {
            return Err(VmError::InvalidState(self.state));
        }
        self.vcpus.pause().map_err(VmError::Vcpu)?;
        if let Some(b) = &self.devices.balloon {
            lock(&b.pci).pause();
        }
        self.state = VmState::Paused;
        Ok(())
    }

    /// Lets parked vCPUs run again.
    pub fn resume(&mut self) -> Result<(), VmError> {
        if self.state != VmState::Paused {
            return Err(VmError::InvalidState(self.state));
        }
        if let Some(b) = &self.devices.balloon {
            lock(&b.pci).resume();
        }
        self.vcpus.resume();
        self.state = VmState::Running;
        Ok(())
    }

    /// Saves the CPU-side state. The VM must be paused.
    pub fn snapshot(&self) -> Result<VmSnapshot, VmError> {
        if self.state != VmState::Paused {
            return Err(VmError::InvalidState(self.state));
        }
        let vcpus = self.vcpus.states().map_err(VmError::Vcpu)?;
        let vm = self.vm.state().map_err(VmError::Hypervisor)?;
        let balloon = self.devices.balloon.as_ref().map(|b| lock(&b.pci).state());
        Ok(VmSnapshot {
            vm,
            vcpus,
            balloon,
            paused: false,
        })
    }

    /// Loads a snapshot into a VM that was built but never booted, and starts its vCPUs paused:
    /// [`Vm::resume`] lets the guest continue. Memory must already hold the guest's contents.
    ///
    /// Order matters for interrupts: the interrupt controllers and the vCPUs (their local APICs)
    /// are restored *before* any device. Restoring a device may raise interrupts at once (the
    /// balloon's DONE, buffers the driver queued before the pause), and KVM records them in the
    /// controllers' current state; restored afterwards, that state would be overwritten with the
    /// source's and the interrupts lost. So they land in the restored state and reach the guest
    /// as soon as its vCPUs run.
    pub fn restore(&mut self, snapshot: &VmSnapshot) -> Result<(), VmError> {
        if self.state != VmState::Created {
            return Err(VmError::InvalidState(self.state));
        }
        if snapshot.vcpus.len() != self.vcpus.count() {
            return Err(VmError::SnapshotMismatch(
                snapshot.vcpus.len(),
                self.vcpus.count(),
            ));
        }
        if self.devices.balloon.is_some() != snapshot.balloon.is_some() {
            return Err(VmError::DeviceState(
                "balloon present on one side only".into(),
            ));
        }
        let started = std::time::Instant::now();
        // 1. Interrupt controllers, PIT and clock; then each vCPU, its local APIC included.
        self.vm
            .set_state(&snapshot.vm)
            .map_err(VmError::Hypervisor)?;
        let vm_state = started.elapsed();
        self.vcpus.restore(&snapshot.vcpus).map_err(VmError::Vcpu)?;
        let vcpus = started.elapsed();
        // 2. Devices: whatever they raise from here on is kept until the guest takes it.
        self.restore_devices(snapshot)?;
        let devices = started.elapsed();
        // 3. vCPU threads, parked until `resume`.
        self.vcpus
            .start(self.handlers(), self.exit_sink.clone(), true, self.seccomp)
            .map_err(VmError::Vcpu)?;
        self.state = VmState::Paused;
        log::info!(
            "restored in {:?}: irqchip and clock {:?}, vCPUs {:?}, devices {:?}, vCPU threads {:?}",
            started.elapsed(),
            vm_state,
            vcpus - vm_state,
            devices - vcpus,
            started.elapsed() - devices
        );
        Ok(())
    }

    /// Restores the devices' state (step 2 of [`Vm::restore`]), and ends the source's hint
    /// round: DONE lets the driver give back the blocks it holds.
    fn restore_devices(&mut self, snapshot: &VmSnapshot) -> Result<(), VmError> {
        let (Some(dev), Some(state)) = (&self.devices.balloon, &snapshot.balloon) else {
            return Ok(());
        };
        lock(&dev.pci)
            .restore(state.clone())
            .map_err(|e| VmError::DeviceState(e.to_string()))?;
        self.devices
            .pci
            .register_ioevents(dev.slot)
            .map_err(|e| VmError::Devices(crate::devices::DeviceError::Pci(e)))?;
        use virtio_devices::HintState;
        if matches!(
            state.device.hinting.state,
            HintState::Requested | HintState::Receiving | HintState::Stopped
        ) {
            // The config interrupt this raises waits in the restored local APIC (see above).
            if let Err(e) = dev.handle.hint_done() {
                log::warn!("cannot tell the balloon driver DONE: {e}");
            }
        }
        Ok(())
    }

    /// Starts recording guest writes: KVM's dirty log on every slot, and a fresh start for the
    /// write-tracking bitmaps of the VMM's own accesses.
    pub fn start_dirty_log(&self) -> Result<(), VmError> {
        for slot in 0..self.memory.num_regions() {
            self.vm
                .set_dirty_logging(slot as u32, true)
                .map_err(VmError::Hypervisor)?;
        }
        for region in self.memory.iter() {
            region.get_mmap().bitmap().reset();
        }
        Ok(())
    }

    /// Stops KVM's dirty logging.
    pub fn stop_dirty_log(&self) -> Result<(), VmError> {
        for slot in 0..self.memory.num_regions() {
            self.vm
                .set_dirty_logging(slot as u32, false)
                .map_err(VmError::Hypervisor)?;
        }
        Ok(())
    }

    /// Stops the vCPUs for good.
    pub fn shutdown(&mut self) {
        self.vcpus.stop();
        self.state = VmState::Shutdown;
    }

    /// What `vm.info` reports.
    pub fn info(&self) -> VmInfo<'_> {
        VmInfo {
            state: self.state,
            config: &self.config,
            memory_actual_size: self
                .config
                .memory
                .size
                .saturating_sub(self.balloon().map_or(0, |b| b.actual_bytes())),
        }
    }

    /// The balloon, if the VM has one.
    pub fn balloon(&self) -> Option<&virtio_devices::BalloonHandle> {
        self.devices.balloon.as_ref().map(|b| &b.handle)
    }

    /// Free page hints for migration, when the VM has a balloon.
    pub fn free_page_hinter(&self) -> Option<crate::devices::balloon::BalloonHinter> {
        self.devices.balloon.as_ref().map(|b| b.hinter())
    }

    /// What `vm.counters` reports.
    pub fn counters(&self) -> serde_json::Value {
        let mut out = serde_json::Map::new();
        if let Some(b) = &self.devices.balloon {
            out.insert("balloon".into(), b.counters());
        }
        out.insert(
            "seccomp".into(),
            serde_json::to_value(crate::seccomp::refused_calls()).unwrap_or_default(),
        );
        serde_json::Value::Object(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_event_that_ends_the_guest_is_kept_and_passed_on() {
        let end = GuestEnd::default();
        let heard = Arc::new(std::sync::Mutex::new(Vec::new()));
        let h = heard.clone();
        let sink = end.wrap(Arc::new(move |e| lock(&h).push(format!("{e:?}"))));
        assert_eq!(end.why(), None);
        sink(VcpuExitEvent::Shutdown);
        sink(VcpuExitEvent::Failed("vcpu0: boom".into()));
        let why = end.why().expect("ended");
        assert!(why.contains("powered off"), "{why}");
        assert_eq!(lock(&heard).len(), 2, "every event still reaches the VMM");
    }
}

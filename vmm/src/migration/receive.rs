//! The receiving side of a live migration: builds the VM from the source's configuration,
//! writes guest memory as it arrives (never touching pages that were not sent), restores the
//! CPU and device state, and resumes the guest.

use std::sync::Arc;
use std::time::Duration;

use hypervisor::Hypervisor;
use vm_migration::protocol::{self, Command, RequestHeader};
use vm_migration::{
    receive_memory, MigrationListener, MigrationStream, MigrationUrl, RamRegions, Response,
};

use super::MigrationError;
use crate::config::{ReceiveMigrationData, VmConfig};
use crate::memory;
use crate::seccomp::SeccompMode;
use crate::vcpu::ExitSink;
use crate::vm::{Vm, VmSnapshot};

/// How long any single read or write may block once the source is connected.
const IO_TIMEOUT: Duration = Duration::from_secs(60);

/// What a request left the receiver to do next.
enum Next {
    Continue,
    Done,
}

struct Receiver<'h> {
    hypervisor: &'h dyn Hypervisor,
    exit_sink: ExitSink,
    seccomp: SeccompMode,
    config: Option<VmConfig>,
    vm: Option<Vm>,
    ram: Option<RamRegions>,
}

/// Waits for one migration on `data.receiver_url` and returns the running VM, whose threads run
/// under seccomp filters as `seccomp` says.
pub fn receive_migration(
    data: &ReceiveMigrationData,
    hypervisor: &dyn Hypervisor,
    exit_sink: ExitSink,
    seccomp: SeccompMode,
) -> Result<Vm, MigrationError> {
    let url: MigrationUrl = data.receiver_url.parse().map_err(MigrationError::Url)?;
    let listener = MigrationListener::bind(&url).map_err(MigrationError::Transport)?;
    let mut stream = listener
        .accept_one(None, Some(IO_TIMEOUT))
        .map_err(MigrationError::Transport)?;
    let mut receiver = Receiver {
        hypervisor,
        exit_sink,
        seccomp,
        config: None,
        vm: None,
        ram: None,
    };
    loop {
        let outcome = RequestHeader::read_from(&mut stream)
            .map_err(MigrationError::Protocol)
            .and_then(|header| receiver.handle(&header, &mut stream));
        match outcome {
            Ok(next) => {
                Response::Ok
                    .write_to(&mut stream)
                    .map_err(MigrationError::Protocol)?;
                if let Next::Done = next {
                    // The source may already be gone: the guest runs here now either way.
                    return receiver.vm.ok_or(MigrationError::Unexpected("Complete"));
                }
            }
            Err(MigrationError::Abandoned) => {
                let _ = Response::Ok.write_to(&mut stream);
                return Err(MigrationError::Abandoned);
            }
            Err(e) => {
                let message = crate::api::error_chain(&e);
                log::error!("incoming migration failed: {message}");
                // The connection is closed after this; the source may not be listening.
                let _ = Response::error(e.reason(), &message).write_to(&mut stream);
                return Err(e);
            }
        }
    }
}

impl Receiver<'_> {
    fn handle(
        &mut self,
        header: &RequestHeader,
        stream: &mut MigrationStream,
    ) -> Result<Next, MigrationError> {
        match header.command() {
            Command::Start => Ok(Next::Continue),
            Command::Config => {
                let payload =
                    protocol::read_payload(stream, header).map_err(MigrationError::Protocol)?;
                let config: VmConfig = serde_json::from_slice(&payload)
                    .map_err(|e| MigrationError::Json("config", e))?;
                config
                    .validate_resources()
                    .map_err(MigrationError::Config)?;
                if self.config.is_some() {
                    return Err(MigrationError::Unexpected("second Config"));
                }
                self.config = Some(config);
                Ok(Next::Continue)
            }
            Command::MemoryFd => {
                let socket = stream
                    .as_unix()
                    .ok_or(MigrationError::LocalNeedsUnixSocket)?;
                let regions = protocol::receive_memory_fds(socket, header)
                    .map_err(MigrationError::Protocol)?;
                if self.vm.is_some() {
                    return Err(MigrationError::Unexpected("MemoryFd after memory"));
                }
                let config = self
                    .config
                    .clone()
                    .ok_or(MigrationError::Unexpected("MemoryFd before Config"))?;
                let mem = memory::guest_memory_from_files(regions, &config.memory)
                    .map_err(|e| MigrationError::Vm(crate::vm::VmError::Memory(e)))?;
                self.build_vm(config, Some(mem))?;
                Ok(Next::Continue)
            }
            Command::Memory => {
                self.ensure_vm()?;
                let (Some(vm), Some(ram)) = (&self.vm, &self.ram) else {
                    return Err(MigrationError::Unexpected("Memory"));
                };
                receive_memory(vm.memory().as_ref(), ram, header, stream)
                    .map_err(MigrationError::Memory)?;
                Ok(Next::Continue)
            }
            Command::State => {
                let payload =
                    protocol::read_payload(stream, header).map_err(MigrationError::Protocol)?;
                let snapshot: VmSnapshot = serde_json::from_slice(&payload)
                    .map_err(|e| MigrationError::Json("state", e))?;
                self.ensure_vm()?;
                let vm = self
                    .vm
                    .as_mut()
                    .ok_or(MigrationError::Unexpected("State"))?;
                vm.restore(&snapshot).map_err(MigrationError::Vm)?;
                Ok(Next::Continue)
            }
            Command::Complete => {
                let vm = self
                    .vm
                    .as_mut()
                    .ok_or(MigrationError::Unexpected("Complete before State"))?;
                if vm.config().memory.thp {
                    memory::advise_huge_pages(vm.memory());
                }
                vm.resume().map_err(MigrationError::Vm)?;
                Ok(Next::Done)
            }
            Command::Abandon => Err(MigrationError::Abandoned),
        }
    }

    fn ensure_vm(&mut self) -> Result<(), MigrationError> {
        if self.vm.is_none() {
            let config = self
                .config
                .clone()
                .ok_or(MigrationError::Unexpected("memory or state before Config"))?;
            self.build_vm(config, None)?;
        }
        Ok(())
    }

    fn build_vm(
        &mut self,
        config: VmConfig,
        mem: Option<Arc<memory::GuestMemoryMmap>>,
    ) -> Result<(), MigrationError> {
        let vm = match mem {
            Some(mem) => Vm::with_memory(
                config,
                mem,
                self.hypervisor,
                self.exit_sink.clone(),
                self.seccomp,
            ),
            None => {
                // Fill RAM with 4 KiB pages: huge page faults stall on compaction whenever host
                // memory is fragmented, which made receiving up to ten times slower here.
                // Huge pages are advised once the guest's memory has arrived.
                let receive_config = crate::config::MemoryConfig {
                    thp: false,
                    ..config.memory.clone()
                };
                let mem = memory::create_guest_memory(&receive_config)
                    .map_err(|e| MigrationError::Vm(crate::vm::VmError::Memory(e)))?;
                Vm::with_memory(
                    config,
                    mem,
                    self.hypervisor,
                    self.exit_sink.clone(),
                    self.seccomp,
                )
            }
        }
        .map_err(MigrationError::Vm)?;
        self.ram =
            Some(RamRegions::from_guest_memory(vm.memory().as_ref()).map_err(MigrationError::Ram)?);
        self.vm = Some(vm);
        Ok(())
    }
}

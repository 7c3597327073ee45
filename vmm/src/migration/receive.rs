//! The receiving side of a live migration: builds the VM from the source's configuration,
//! writes guest memory as it arrives (never touching pages that were not sent), restores the
//! CPU and device state, and resumes the guest.
//!
//! It runs on its own thread, `migration-recv`, under its own seccomp filter (it reads
//! everything the peer sends), so the VMM thread keeps serving the API meanwhile:
//!
//! ```text
//!  VMM thread                              migration-recv thread
//!  vm.receive-migration: bind ──spawn──▶   wait for the source (cancellable)
//!  (serves ping, info: "Receiving")        Config, Memory…, State, Complete
//!  ◀──────────────── done(Ok(vm) | Err) ── the running VM, or why not
//!  owns the VM; answers the request
//!  vmm.shutdown: cancel() ─────────────▶   stops waiting / reading, drops what it built
//! ```

use std::os::fd::{AsFd, AsRawFd};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use hypervisor::Hypervisor;
use vm_migration::protocol::{self, Command, RequestHeader};
use vm_migration::striping::ConnectionsRequest;
use vm_migration::{
    receive_memory, MigrationListener, MigrationStream, MigrationUrl, RamRegions, Response,
    TlsServer,
};

use super::decode::{decode_config, decode_state};
use super::stripes::receive::{ReceiveStripes, StripeContext};
use super::MigrationError;
use crate::config::{ReceiveMigrationData, VmConfig};
use crate::memory;
use crate::seccomp::{self, SeccompMode, ThreadKind};
use crate::vcpu::ExitSink;
use crate::vm::lock;
use crate::vm::{Vm, VmError};

/// How long any single read or write may block once the source is connected.
const IO_TIMEOUT: Duration = Duration::from_secs(60);
/// How often the wait for the source looks whether it was cancelled.
const CANCEL_POLL: Duration = Duration::from_millis(100);
/// How long [`IncomingMigration::cancel`] waits for the thread to end.
const CANCEL_WAIT: Duration = Duration::from_secs(5);

/// What a request left the receiver to do next.
enum Next {
    Continue,
    /// Continue, and build the VM right after answering: creating its memory slots takes time
    /// that grows with RAM (KVM sets up per-page metadata: ~0.33 s at 256 GiB here), which
    /// then overlaps the source's dirty-log start and hint round instead of adding to round 0.
    BuildVm,
    Done,
}

/// Where an incoming migration is, for `vm.info`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum ReceivePhase {
    /// Listening; no source yet.
    Listening = 0,
    /// A source is connected; configuration and memory arrive.
    Receiving = 1,
    /// CPU and device state arrived; the VM is being restored and resumed.
    Restoring = 2,
}

impl ReceivePhase {
    /// The name `vm.info` shows.
    pub fn name(self) -> &'static str {
        match self {
            ReceivePhase::Listening => "listening",
            ReceivePhase::Receiving => "receiving",
            ReceivePhase::Restoring => "restoring",
        }
    }
}

/// Shared between the VMM thread and the receiving thread.
#[derive(Default)]
struct ReceiveControl {
    cancelled: AtomicBool,
    phase: AtomicU8,
    /// A second handle on the connection, to wake a blocked read when cancelled.
    stream: Mutex<Option<MigrationStream>>,
    /// Memory rounds received so far.
    rounds: AtomicU64,
    /// Pages received so far.
    pages: AtomicU64,
}

impl ReceiveControl {
    fn set_phase(&self, phase: ReceivePhase) {
        self.phase.store(phase as u8, Ordering::SeqCst);
        crate::event_monitor::emit(
            "vm",
            &format!("migration-{}", phase.name()),
            Some(serde_json::json!({"role": "destination"})),
        );
    }

    fn check(&self) -> Result<(), MigrationError> {
        if self.cancelled.load(Ordering::SeqCst) {
            return Err(MigrationError::Cancelled);
        }
        Ok(())
    }
}

/// A migration being received on the `migration-recv` thread.
pub struct IncomingMigration {
    control: Arc<ReceiveControl>,
    thread: Option<JoinHandle<()>>,
    url: String,
}

impl IncomingMigration {
    /// The URL it listens on.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// Memory rounds and pages received so far.
    pub fn received(&self) -> (u64, u64) {
        (
            self.control.rounds.load(Ordering::Relaxed),
            self.control.pages.load(Ordering::Relaxed),
        )
    }

    /// Where it is.
    pub fn phase(&self) -> ReceivePhase {
        match self.control.phase.load(Ordering::SeqCst) {
            0 => ReceivePhase::Listening,
            1 => ReceivePhase::Receiving,
            _ => ReceivePhase::Restoring,
        }
    }

    /// Stops the receiving thread (it stops waiting or reading, drops what it built and reports
    /// [`MigrationError::Cancelled`]) and waits a few seconds for it to end.
    pub fn cancel(&mut self) {
        self.control.cancelled.store(true, Ordering::SeqCst);
        if let Some(stream) = lock(&self.control.stream).as_ref() {
            let _ = stream.shutdown();
        }
        let deadline = Instant::now() + CANCEL_WAIT;
        while self.thread.as_ref().is_some_and(|t| !t.is_finished()) {
            if Instant::now() >= deadline {
                log::warn!("the migration-recv thread did not end; leaving it");
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        self.join();
    }

    /// Waits for the thread (after it has reported its outcome).
    pub fn join(&mut self) {
        if let Some(thread) = self.thread.take() {
            if thread.join().is_err() {
                log::error!("the migration-recv thread panicked");
            }
        }
    }
}

/// What the receiving thread needs to build the VM.
pub struct ReceiveContext {
    /// The hypervisor to create the VM on.
    pub hypervisor: Arc<dyn Hypervisor>,
    /// Where the VM's vCPUs report the end of the guest.
    pub exit_sink: ExitSink,
    /// Filters for the receiving thread and the VM's threads.
    pub seccomp: SeccompMode,
}

/// Listens on `data.receiver_url` (binding here, so a bad or busy address is reported at once)
/// and receives one migration on a new `migration-recv` thread, which calls `done` with the
/// running VM (its threads under seccomp filters as `context.seccomp` says) or the error.
pub fn start_receiving(
    data: &ReceiveMigrationData,
    context: ReceiveContext,
    done: impl FnOnce(Result<Vm, MigrationError>) + Send + 'static,
) -> Result<IncomingMigration, MigrationError> {
    let url: MigrationUrl = data.receiver_url.parse().map_err(MigrationError::Url)?;
    let tls = super::stripes::load_server(data.tls_dir.as_deref())?;
    let listener = MigrationListener::bind(&url).map_err(MigrationError::Transport)?;
    let control = Arc::new(ReceiveControl::default());
    let shared = control.clone();
    let thread = std::thread::Builder::new()
        .name("migration-recv".into())
        .spawn(move || {
            let result = seccomp::apply(ThreadKind::MigrationReceive, context.seccomp)
                .map_err(MigrationError::Seccomp)
                .and_then(|()| receive_migration(listener, tls, &context, &shared));
            if let Err(e) = &result {
                log::error!("incoming migration failed: {}", crate::api::error_chain(e));
            }
            done(result);
        })
        .map_err(MigrationError::Spawn)?;
    Ok(IncomingMigration {
        control,
        thread: Some(thread),
        url: url.to_string(),
    })
}

/// Waits until the listener has a connection, or the migration is cancelled.
fn wait_for_source(
    listener: &MigrationListener,
    control: &ReceiveControl,
) -> Result<(), MigrationError> {
    loop {
        control.check()?;
        let mut pfd = libc::pollfd {
            fd: listener.as_fd().as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        let timeout_ms = CANCEL_POLL.as_millis() as libc::c_int;
        // SAFETY: `pfd` is one initialized pollfd that lives across the call, the count is 1,
        // and the listener (and so its descriptor) outlives the call.
        let ret = unsafe { libc::poll(&mut pfd, 1, timeout_ms) };
        if ret > 0 {
            return Ok(());
        }
        if ret < 0 {
            let err = std::io::Error::last_os_error();
            if err.kind() != std::io::ErrorKind::Interrupted {
                return Err(MigrationError::Transport(
                    vm_migration::TransportError::Accept(err),
                ));
            }
        }
    }
}

/// A second handle on the connection (for [`IncomingMigration::cancel`]).
fn clone_stream(stream: &MigrationStream) -> Option<MigrationStream> {
    super::stripes::waker(stream)
}

struct Receiver<'c> {
    context: &'c ReceiveContext,
    control: &'c ReceiveControl,
    config: Option<VmConfig>,
    vm: Option<Vm>,
    /// The guest's memory, there before the VM (pages are received into it while
    /// `builder` sets up the VM around it).
    memory: Option<Arc<memory::GuestMemoryMmap>>,
    ram: Option<RamRegions>,
    /// The VM being built on its own thread (KVM's memory slot setup grows with RAM size:
    /// about 0.1-1.7 s at 256 GiB here), joined before the first round is acknowledged.
    builder: Option<JoinHandle<Result<Vm, VmError>>>,
    /// Kept until the source has said whether more connections come (`connections=<n>`).
    listener: Option<MigrationListener>,
    tls: Option<TlsServer>,
    /// The added connections and their threads.
    stripes: Option<ReceiveStripes>,
    /// The source's guest was paused by its user: Complete leaves it paused.
    stay_paused: bool,
}

/// Waits for one migration on `listener` and returns the running VM.
fn receive_migration(
    listener: MigrationListener,
    tls: Option<TlsServer>,
    context: &ReceiveContext,
    control: &ReceiveControl,
) -> Result<Vm, MigrationError> {
    wait_for_source(&listener, control)?;
    let stream = listener
        .accept(Some(CANCEL_POLL), Some(IO_TIMEOUT))
        .map_err(MigrationError::Transport)?;
    *lock(&control.stream) = clone_stream(&stream);
    // A cancel between the accept and the line above found no stream to shut down.
    control.check()?;
    let mut stream = match &tls {
        Some(tls) => stream.into_tls_server(tls).map_err(MigrationError::Tls)?,
        None => stream,
    };
    control.set_phase(ReceivePhase::Receiving);
    let mut receiver = Receiver {
        context,
        control,
        config: None,
        vm: None,
        memory: None,
        ram: None,
        builder: None,
        listener: Some(listener),
        tls,
        stripes: None,
        stay_paused: false,
    };
    let result = receiver.serve(&mut stream);
    *lock(&control.stream) = None;
    result
}

impl Receiver<'_> {
    /// Answers the source's requests until Complete (the running VM) or an error.
    fn serve(&mut self, stream: &mut MigrationStream) -> Result<Vm, MigrationError> {
        loop {
            let outcome = RequestHeader::read_from(&mut *stream)
                .map_err(MigrationError::Protocol)
                .and_then(|header| {
                    self.control.check()?;
                    self.handle(&header, stream)
                });
            let outcome = outcome.and_then(|next| self.control.check().map(|()| next));
            match outcome {
                Ok(next) => {
                    Response::Ok
                        .write_to(&mut *stream)
                        .map_err(MigrationError::Protocol)?;
                    if let Next::Done = next {
                        // The source may already be gone: the guest runs here now either way.
                        return self.vm.take().ok_or(MigrationError::Unexpected("Complete"));
                    }
                    if let Next::BuildVm = next {
                        // A failure here is reported when the first Memory request tries again.
                        if let Err(e) = self.start_build() {
                            log::warn!("cannot build the VM yet: {}", crate::api::error_chain(&e));
                        }
                    }
                }
                Err(MigrationError::Abandoned) => {
                    let _ = Response::Ok.write_to(&mut *stream);
                    return Err(MigrationError::Abandoned);
                }
                Err(e) => {
                    // A read or write woken by cancel() fails: say why rather than how.
                    let e = match self.control.check() {
                        Err(cancelled) => cancelled,
                        Ok(()) => e,
                    };
                    let message = crate::api::error_chain(&e);
                    // The connection is closed after this; the source may not be listening.
                    let _ = Response::error(e.reason(), &message).write_to(&mut *stream);
                    return Err(e);
                }
            }
        }
    }

    fn handle(
        &mut self,
        header: &RequestHeader,
        stream: &mut MigrationStream,
    ) -> Result<Next, MigrationError> {
        if !matches!(
            header.command(),
            Command::Start | Command::Config | Command::Connections
        ) {
            // No more connections come: the UNIX socket path goes away with the listener.
            self.listener = None;
        }
        match header.command() {
            Command::Start => Ok(Next::Continue),
            Command::Connections => {
                let payload =
                    protocol::read_payload(stream, header).map_err(MigrationError::Protocol)?;
                self.accept_stripes(&payload)?;
                Ok(Next::Continue)
            }
            Command::Join => Err(MigrationError::Unexpected("Join on the first connection")),
            Command::Config => {
                let payload =
                    protocol::read_payload(stream, header).map_err(MigrationError::Protocol)?;
                let config = decode_config(&payload)?;
                if self.config.is_some() {
                    return Err(MigrationError::Unexpected("second Config"));
                }
                // Shared memory may come as the source's files (local mode): built then.
                let next = if config.memory.shared {
                    Next::Continue
                } else {
                    Next::BuildVm
                };
                self.config = Some(config);
                Ok(next)
            }
            Command::MemoryFd => {
                let socket = stream
                    .as_unix()
                    .ok_or(MigrationError::LocalNeedsUnixSocket)?;
                let regions = protocol::receive_memory_fds(socket, header)
                    .map_err(MigrationError::Protocol)?;
                if self.memory.is_some() {
                    return Err(MigrationError::Unexpected("MemoryFd after memory"));
                }
                let config = self
                    .config
                    .clone()
                    .ok_or(MigrationError::Unexpected("MemoryFd before Config"))?;
                let mem = memory::guest_memory_from_files(regions, &config.memory)
                    .map_err(|e| MigrationError::Vm(crate::vm::VmError::Memory(e)))?;
                self.build_vm(config, mem)?;
                Ok(Next::Continue)
            }
            Command::Memory => {
                self.start_build()?;
                let (Some(mem), Some(ram)) = (&self.memory, &self.ram) else {
                    return Err(MigrationError::Unexpected("Memory"));
                };
                let table = receive_memory(mem.as_ref(), ram, header, stream)
                    .map_err(MigrationError::Memory)?;
                // The round was received while the VM was being built; it is acknowledged
                // once the VM is there, so that the wait falls in round 0, never in the
                // downtime (the source pauses only after a round's acknowledgement).
                self.ensure_vm()?;
                self.control.rounds.fetch_add(1, Ordering::Relaxed);
                self.control
                    .pages
                    .fetch_add(table.total_pages(), Ordering::Relaxed);
                Ok(Next::Continue)
            }
            Command::State => {
                self.control.set_phase(ReceivePhase::Restoring);
                // Every part of every round was acknowledged: stop the added connections.
                if let Some(stripes) = self.stripes.take() {
                    stripes.finish()?;
                }
                let started = std::time::Instant::now();
                let payload =
                    protocol::read_payload(stream, header).map_err(MigrationError::Protocol)?;
                let snapshot = decode_state(&payload)?;
                let decoded = started.elapsed();
                self.ensure_vm()?;
                let vm = self
                    .vm
                    .as_mut()
                    .ok_or(MigrationError::Unexpected("State"))?;
                vm.restore(&snapshot).map_err(MigrationError::Vm)?;
                self.stay_paused = snapshot.paused;
                log::info!(
                    "state of {} bytes read and decoded in {decoded:?}, restored {:?} later",
                    payload.len(),
                    started.elapsed() - decoded
                );
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
                if self.stay_paused {
                    log::info!("the guest was paused on the source: it stays paused here");
                } else {
                    vm.resume().map_err(MigrationError::Vm)?;
                }
                Ok(Next::Done)
            }
            Command::Abandon => Err(MigrationError::Abandoned),
        }
    }

    /// `connections=<n>`: makes the guest's memory (written from every connection), then
    /// accepts and starts the added connections on the listener.
    fn accept_stripes(&mut self, payload: &[u8]) -> Result<(), MigrationError> {
        let request = ConnectionsRequest::from_bytes(payload).map_err(MigrationError::Stripe)?;
        self.start_build()?;
        let listener = self
            .listener
            .take()
            .ok_or(MigrationError::Unexpected("second Connections"))?;
        let (Some(memory), Some(ram)) = (&self.memory, &self.ram) else {
            return Err(MigrationError::Unexpected("Connections"));
        };
        let context = StripeContext {
            listener: &listener,
            tls: self.tls.as_ref(),
            memory,
            ram,
            seccomp: self.context.seccomp,
        };
        let control = self.control;
        let stripes = ReceiveStripes::accept(&request, &context, || control.check())?;
        self.stripes = Some(stripes);
        Ok(())
    }

    /// Makes the guest's memory and starts building the VM around it on its own thread,
    /// unless that was done already (so it also serves to make sure the memory is there).
    fn start_build(&mut self) -> Result<(), MigrationError> {
        if self.memory.is_some() {
            return Ok(());
        }
        let config = self
            .config
            .clone()
            .ok_or(MigrationError::Unexpected("memory or state before Config"))?;
        // Fill RAM with 4 KiB pages: huge page faults stall on compaction whenever host
        // memory is fragmented, which made receiving up to ten times slower here.
        // Huge pages are advised once the guest's memory has arrived.
        let receive_config = crate::config::MemoryConfig {
            thp: false,
            ..config.memory.clone()
        };
        let mem = memory::create_guest_memory(&receive_config)
            .map_err(|e| MigrationError::Vm(VmError::Memory(e)))?;
        self.set_memory(mem.clone())?;
        let hypervisor = self.context.hypervisor.clone();
        let exit_sink = self.context.exit_sink.clone();
        let seccomp = self.context.seccomp;
        // The thread starts under this thread's filter, which allows building a VM.
        let builder = std::thread::Builder::new()
            .name("vm-build".into())
            .spawn(move || {
                let started = std::time::Instant::now();
                let vm = Vm::with_memory(config, mem, hypervisor.as_ref(), exit_sink, seccomp);
                log::info!("VM built for the incoming guest in {:?}", started.elapsed());
                vm
            })
            .map_err(MigrationError::Spawn)?;
        self.builder = Some(builder);
        Ok(())
    }

    /// The VM, waiting for its build (or building it now).
    fn ensure_vm(&mut self) -> Result<(), MigrationError> {
        if self.vm.is_some() {
            return Ok(());
        }
        self.start_build()?;
        let builder = self
            .builder
            .take()
            .ok_or(MigrationError::Unexpected("no VM being built"))?;
        let vm = builder
            .join()
            .map_err(|_| MigrationError::Unexpected("the VM build panicked"))?
            .map_err(MigrationError::Vm)?;
        self.vm = Some(vm);
        Ok(())
    }

    /// Local mode: the VM is built at once around the source's memory files.
    fn build_vm(
        &mut self,
        config: VmConfig,
        mem: Arc<memory::GuestMemoryMmap>,
    ) -> Result<(), MigrationError> {
        self.set_memory(mem.clone())?;
        let vm = Vm::with_memory(
            config,
            mem,
            self.context.hypervisor.as_ref(),
            self.context.exit_sink.clone(),
            self.context.seccomp,
        )
        .map_err(MigrationError::Vm)?;
        self.vm = Some(vm);
        Ok(())
    }

    fn set_memory(&mut self, mem: Arc<memory::GuestMemoryMmap>) -> Result<(), MigrationError> {
        self.ram = Some(RamRegions::from_guest_memory(mem.as_ref()).map_err(MigrationError::Ram)?);
        self.memory = Some(mem);
        Ok(())
    }
}

impl Drop for Receiver<'_> {
    /// A migration that ends before its VM was taken waits for the build, so no VM is still
    /// being set up after the migration was reported over.
    fn drop(&mut self) {
        if let Some(builder) = self.builder.take() {
            let _ = builder.join();
        }
    }
}

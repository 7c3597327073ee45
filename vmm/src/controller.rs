//! The VMM thread: owns the VM, serves API requests one at a time, and ends the process when the
//! guest or the API says so.

mod sending;

use std::path::PathBuf;
use std::sync::mpsc::{channel, Receiver, RecvTimeoutError, Sender};
use std::sync::Arc;
use std::time::Instant;

use hypervisor::{Hypervisor, KvmHypervisor};
use thiserror::Error;

use crate::api::{self, ApiError, ApiReply, ApiRequest, ApiResult};
use crate::config::{HintAction, VmConfig};
use crate::migration::hints::{FreePageHinter, HintWait, MonotonicClock, RoundEnd};
use crate::migration::receive::{self, IncomingMigration, ReceiveContext};
use crate::migration::source_vm::VmStepRequest;
use crate::migration::MigrationError;
use crate::seccomp::{self, SeccompMode, ThreadKind};
use crate::vcpu::VcpuExitEvent;
use crate::vm::{Vm, VmError, VmState};

/// The longest a hint round started through the API is waited for (as long as a migration's
/// by default).
const API_HINT_WAIT: std::time::Duration = std::time::Duration::from_secs(10);

/// Errors that end the VMM.
#[derive(Debug, Error)]
pub enum VmmError {
    /// KVM is not usable.
    #[error("cannot use KVM")]
    Hypervisor(#[source] hypervisor::HypervisorError),
    /// The API socket could not be served.
    #[error("cannot start the API server")]
    Api(#[source] crate::api::HttpServerError),
    /// The VM given on the command line could not be built or booted.
    #[error("cannot start the VM")]
    Vm(#[source] VmError),
    /// The VMM thread's seccomp filter could not be installed.
    #[error("cannot filter the VMM thread")]
    Seccomp(#[source] seccomp::SeccompError),
}

/// How the process was started.
#[derive(Debug, Default)]
pub struct VmmParams {
    /// Where to serve the REST API, if anywhere.
    pub api_socket: Option<PathBuf>,
    /// A VM to build and boot at once (from `--kernel` and friends).
    pub vm_config: Option<VmConfig>,
    /// Whether the VMM, API, vCPU and balloon worker threads run under seccomp filters.
    pub seccomp: SeccompMode,
}

/// What reaches the VMM thread.
pub enum VmmEvent {
    /// An API request and where to send its answer.
    Api(ApiRequest, Sender<ApiReply>),
    /// A vCPU reports the end of the guest.
    Vcpu(VcpuExitEvent),
    /// The `migration-recv` thread is done: the VM that arrived, or why none did.
    Received(Box<Result<Vm, MigrationError>>),
    /// The `migration-send` thread needs a step done on the VM.
    MigrationStep(VmStepRequest),
    /// The `migration-send` thread is done: the report, or why the VM did not move.
    Sent(Box<Result<vm_migration::MigrationReport, MigrationError>>),
}

/// A migration being received, and the `vm.receive-migration` request waiting for it.
struct Incoming {
    migration: IncomingMigration,
    answer: Sender<ApiResult>,
}

/// The VMM's state: the hypervisor, the VM (if any) and the event channel.
pub struct Vmm {
    hypervisor: Arc<dyn Hypervisor>,
    vm: Option<Vm>,
    events_tx: Sender<VmmEvent>,
    /// Whether the process ends when the VM does (it was given on the command line, or
    /// arrived by migration).
    exit_with_vm: bool,
    /// Filters for the threads of the VMs it creates.
    seccomp: SeccompMode,
    /// Why the last hint round started through the API was not fully used.
    last_hint_reason: Option<String>,
    /// A migration being received, if any (there is no VM until it has arrived).
    incoming: Option<Incoming>,
    /// A migration being sent, if any.
    outgoing: Option<sending::Outgoing>,
    /// The progress of the last migration sent (running or ended).
    last_sent: Option<sending::SharedProgress>,
    /// How the last incoming migration ended.
    last_received: Option<serde_json::Value>,
    /// Once the VM has moved away: when the process ends if nobody reads the final progress.
    linger_until: Option<Instant>,
    /// The guest ended while a migration was being sent: the exit code, handled once the
    /// migration has failed because of it.
    ended_while_sending: Option<i32>,
    /// What the process exits with when it ends after lingering.
    linger_exit_code: i32,
}

/// Runs the VMM until it is told to stop; returns the process exit code.
pub fn start_vmm(params: VmmParams) -> Result<i32, VmmError> {
    let hypervisor: Arc<dyn Hypervisor> =
        Arc::new(KvmHypervisor::new().map_err(VmmError::Hypervisor)?);
    let (tx, rx) = channel();
    let mut vmm = Vmm {
        hypervisor,
        vm: None,
        events_tx: tx.clone(),
        exit_with_vm: params.vm_config.is_some(),
        seccomp: params.seccomp,
        last_hint_reason: None,
        incoming: None,
        outgoing: None,
        last_sent: None,
        last_received: None,
        linger_until: None,
        ended_while_sending: None,
        linger_exit_code: 0,
    };
    if let Some(path) = &params.api_socket {
        let api_tx = tx.clone();
        let handler = Box::new(move |req: ApiRequest| -> ApiReply {
            let gone = || ApiReply::Now(Err(ApiError::internal_msg("the VMM is shutting down")));
            let (reply_tx, reply_rx) = channel();
            if api_tx.send(VmmEvent::Api(req, reply_tx)).is_err() {
                return gone();
            }
            reply_rx.recv().unwrap_or_else(|_| gone())
        });
        api::start_http_server(path, handler, params.seccomp).map_err(VmmError::Api)?;
    }
    if let Some(config) = params.vm_config {
        vmm.create_vm(config).map_err(VmmError::Vm)?;
        vmm.boot_vm().map_err(VmmError::Vm)?;
    }
    // From here on this thread serves API requests and reads migration streams.
    seccomp::apply(ThreadKind::Vmm, params.seccomp).map_err(VmmError::Seccomp)?;
    let code = vmm.run(rx);
    if let Some(path) = &params.api_socket {
        let _ = std::fs::remove_file(path);
    }
    Ok(code)
}

fn no_vm() -> ApiError {
    ApiError::InvalidState("no VM has been created".into())
}

fn vm_error(e: VmError) -> ApiError {
    match e {
        VmError::InvalidState(s) => ApiError::InvalidState(format!("VM is {s:?}")),
        other => ApiError::internal("VM operation failed", other),
    }
}

impl Vmm {
    fn exit_sink(&self) -> crate::vcpu::ExitSink {
        let tx = self.events_tx.clone();
        Arc::new(move |e| {
            // The VMM thread may be gone during teardown; nobody needs the event then.
            let _ = tx.send(VmmEvent::Vcpu(e));
        })
    }

    fn create_vm(&mut self, config: VmConfig) -> Result<(), VmError> {
        let vm = Vm::new_with_seccomp(
            config,
            self.hypervisor.as_ref(),
            self.exit_sink(),
            self.seccomp,
        )?;
        self.vm = Some(vm);
        Ok(())
    }

    fn boot_vm(&mut self) -> Result<(), VmError> {
        match self.vm.as_mut() {
            Some(vm) => vm.boot(),
            None => Err(VmError::InvalidState(VmState::Shutdown)),
        }
    }

    /// Serves events until the VMM should exit; returns the exit code.
    fn run(&mut self, rx: Receiver<VmmEvent>) -> i32 {
        loop {
            let event = match self.linger_until {
                None => match rx.recv() {
                    Ok(event) => event,
                    Err(_) => break,
                },
                Some(until) => {
                    match rx.recv_timeout(until.saturating_duration_since(Instant::now())) {
                        Ok(event) => event,
                        Err(RecvTimeoutError::Timeout) => {
                            // The VM moved away (or ended) and nobody came for the final
                            // progress.
                            self.teardown();
                            return self.linger_exit_code;
                        }
                        Err(RecvTimeoutError::Disconnected) => break,
                    }
                }
            };
            match event {
                VmmEvent::Api(req, reply) => {
                    let shutdown_vmm = matches!(req, ApiRequest::VmmShutdown);
                    let result = match self.refused_while_sending(&req) {
                        Some(refused) => ApiReply::Now(Err(refused)),
                        None => match req {
                            ApiRequest::VmReceiveMigration(data) => self.start_receiving(&data),
                            ApiRequest::VmSendMigration(data) => self.start_sending(data),
                            ApiRequest::VmMigrationCancel => self.cancel_migration(),
                            req => ApiReply::Now(self.handle_api(req)),
                        },
                    };
                    let vm_gone = self
                        .vm
                        .as_ref()
                        .is_none_or(|vm| vm.state() == VmState::Shutdown);
                    // The client may have hung up; the request was still carried out.
                    let _ = reply.send(result);
                    // A VM that moved away ends the process when its final progress was read
                    // (see `linger_until`).
                    let moved = self.linger_until.is_some();
                    if shutdown_vmm || (self.exit_with_vm && vm_gone && !moved) {
                        self.teardown();
                        return 0;
                    }
                }
                VmmEvent::Received(result) => self.received(*result),
                VmmEvent::MigrationStep(request) => self.migration_step(request),
                VmmEvent::Sent(result) => self.sent(*result),
                VmmEvent::Vcpu(event) => {
                    let code = match &event {
                        VcpuExitEvent::Shutdown | VcpuExitEvent::Reset => {
                            log::info!("guest ended: {event:?}");
                            0
                        }
                        VcpuExitEvent::Failed(why) => {
                            log::error!("{why}");
                            eprintln!("cloud-hypervisor: error: guest stopped: {why}");
                            1
                        }
                    };
                    if self.outgoing.is_some() {
                        // The migration fails on it (it checks the guest before handing it
                        // over); the VM stops, and the process ends, once it has.
                        self.abandon_outgoing();
                        self.ended_while_sending = Some(code);
                        continue;
                    }
                    if let Some(vm) = self.vm.as_mut() {
                        vm.shutdown();
                    }
                    if self.exit_with_vm {
                        self.teardown();
                        return code;
                    }
                }
            }
        }
        0
    }

    fn teardown(&mut self) {
        self.abandon_outgoing();
        self.cancel_incoming();
        if let Some(mut vm) = self.vm.take() {
            vm.shutdown();
        }
    }

    /// `vm.receive-migration`: listens, and receives on the `migration-recv` thread; the request
    /// is answered when the VM has arrived (see [`Vmm::received`]).
    fn start_receiving(&mut self, data: &crate::config::ReceiveMigrationData) -> ApiReply {
        if self.vm.is_some() {
            return Err(ApiError::InvalidState("a VM already exists".into())).into();
        }
        if self.incoming.is_some() {
            return Err(ApiError::InvalidState(
                "a migration is already being received".into(),
            ))
            .into();
        }
        let events = self.events_tx.clone();
        let context = ReceiveContext {
            hypervisor: self.hypervisor.clone(),
            exit_sink: self.exit_sink(),
            seccomp: self.seccomp,
        };
        crate::event_monitor::emit(
            "vm",
            "migration-listening",
            Some(serde_json::json!({"role": "destination"})),
        );
        let started = receive::start_receiving(data, context, move |result| {
            // The VMM thread may be gone (shutting down); nobody needs the VM then.
            let _ = events.send(VmmEvent::Received(Box::new(result)));
        });
        match started {
            Ok(migration) => {
                let (answer, later) = channel();
                self.incoming = Some(Incoming { migration, answer });
                ApiReply::Later(later)
            }
            Err(e) => Err(ApiError::internal("incoming migration failed", e)).into(),
        }
    }

    /// The `migration-recv` thread is done: the VM (if it arrived) is this VMM's now, and the
    /// waiting request is answered.
    fn received(&mut self, result: Result<Vm, MigrationError>) {
        let Some(mut incoming) = self.incoming.take() else {
            // Cancelled meanwhile: whatever arrived is dropped.
            return;
        };
        incoming.migration.join();
        let state = match &result {
            Ok(_) => "completed",
            Err(MigrationError::Cancelled) => "cancelled",
            Err(_) => "failed",
        };
        crate::event_monitor::emit(
            "vm",
            &format!("migration-{state}"),
            Some(serde_json::json!({"role": "destination"})),
        );
        let (rounds, pages) = incoming.migration.received();
        self.last_received = Some(serde_json::json!({
            "role": "destination",
            "state": state,
            "rounds_received": rounds,
            "pages_received": pages,
            "error": result.as_ref().err().map(|e| crate::api::error_chain(e)),
        }));
        let answer = match result {
            Ok(vm) => {
                self.vm = Some(vm);
                self.exit_with_vm = true;
                Ok(None)
            }
            Err(e) => Err(ApiError::internal("incoming migration failed", e)),
        };
        // The client may have hung up; the migration was still carried out.
        let _ = incoming.answer.send(answer);
    }

    /// Stops receiving a migration, if one is being received.
    fn cancel_incoming(&mut self) {
        if let Some(mut incoming) = self.incoming.take() {
            incoming.migration.cancel();
            let _ = incoming.answer.send(Err(ApiError::internal(
                "incoming migration failed",
                MigrationError::Cancelled,
            )));
        }
    }

    /// The error for a VM request when there is no VM.
    fn no_vm(&self) -> ApiError {
        match &self.incoming {
            Some(_) => ApiError::InvalidState("no VM yet: a migration is being received".into()),
            None => no_vm(),
        }
    }

    /// `vm.info` while a migration is being received: there is no VM yet.
    fn receiving_info(&self) -> Option<serde_json::Value> {
        let incoming = self.incoming.as_ref()?;
        Some(serde_json::json!({
            "state": "Receiving",
            "receiving": {
                "receiver_url": incoming.migration.url(),
                "phase": incoming.migration.phase().name(),
            },
        }))
    }

    fn balloon(&self) -> Result<&virtio_devices::BalloonHandle, ApiError> {
        self.vm
            .as_ref()
            .ok_or_else(|| self.no_vm())?
            .balloon()
            .ok_or_else(|| ApiError::InvalidState("the VM has no balloon (--balloon)".into()))
    }

    fn vm_mut(&mut self) -> Result<&mut Vm, ApiError> {
        let missing = self.no_vm();
        self.vm.as_mut().ok_or(missing)
    }

    fn handle_api(&mut self, req: ApiRequest) -> ApiResult {
        match req {
            ApiRequest::VmmPing => Ok(Some(serde_json::json!({
                "build_version": env!("CARGO_PKG_VERSION"),
                "version": env!("CARGO_PKG_VERSION"),
                "pid": std::process::id(),
                "features": ["kvm", "free_page_hinting"],
            }))),
            ApiRequest::VmmShutdown => Ok(None),
            ApiRequest::VmCreate(config) => {
                if self.vm.is_some() {
                    return Err(ApiError::InvalidState("a VM already exists".into()));
                }
                if self.incoming.is_some() {
                    return Err(self.no_vm());
                }
                config
                    .validate_resources()
                    .map_err(|e| ApiError::InvalidConfig {
                        endpoint: "vm.create",
                        source: e,
                    })?;
                self.create_vm(*config).map_err(vm_error)?;
                Ok(None)
            }
            ApiRequest::VmBoot => {
                self.vm_mut()?.boot().map_err(vm_error)?;
                Ok(None)
            }
            ApiRequest::VmInfo => {
                if let Some(info) = self.receiving_info() {
                    return Ok(Some(info));
                }
                let vm = self.vm.as_ref().ok_or_else(|| self.no_vm())?;
                serde_json::to_value(vm.info())
                    .map(Some)
                    .map_err(|e| ApiError::internal("cannot encode vm.info", e))
            }
            ApiRequest::VmCounters => Ok(Some(
                self.vm.as_ref().ok_or_else(|| self.no_vm())?.counters(),
            )),
            ApiRequest::VmPause => {
                self.vm_mut()?.pause().map_err(vm_error)?;
                Ok(None)
            }
            ApiRequest::VmResume => {
                self.vm_mut()?.resume().map_err(vm_error)?;
                Ok(None)
            }
            ApiRequest::VmShutdown => {
                let vm = self.vm_mut()?;
                if vm.state() == VmState::Shutdown {
                    return Err(ApiError::InvalidState("VM is already shut down".into()));
                }
                vm.shutdown();
                Ok(None)
            }
            ApiRequest::VmDelete => {
                // Also stops a migration being received.
                self.teardown();
                Ok(None)
            }
            ApiRequest::VmResize(data) => {
                let vm = self.vm.as_ref().ok_or_else(|| self.no_vm())?;
                let Some(size) = data.desired_balloon else {
                    return Err(ApiError::Unsupported(
                        "resizing anything but the balloon".into(),
                    ));
                };
                let balloon = vm.balloon().ok_or_else(|| {
                    ApiError::InvalidState("the VM has no balloon (--balloon)".into())
                })?;
                if size >= vm.config().memory.size {
                    return Err(ApiError::BadRequest(format!(
                        "desired_balloon {size} must be smaller than the VM's memory ({})",
                        vm.config().memory.size
                    )));
                }
                balloon
                    .resize(size)
                    .map_err(|e| ApiError::internal("cannot resize the balloon", e))?;
                Ok(None)
            }
            ApiRequest::VmMigrationProgress => self.migration_progress(),
            // Answered on the VMM thread's loop (see `run`).
            ApiRequest::VmReceiveMigration(_)
            | ApiRequest::VmSendMigration(_)
            | ApiRequest::VmMigrationCancel => Err(ApiError::internal_msg(format!(
                "{} reached the wrong handler",
                req.endpoint()
            ))),
            ApiRequest::VmBalloonHintsGet => {
                let balloon = self.balloon()?;
                let mut body = serde_json::to_value(balloon.hint_status())
                    .map_err(|e| ApiError::internal("cannot encode the hint status", e))?;
                // Why a round cannot start now, else why the last one was not fully used.
                let reason = self
                    .hinter()
                    .and_then(|h| h.unavailable())
                    .map(|why| why.to_string())
                    .or_else(|| self.last_hint_reason.clone());
                if let Some(map) = body.as_object_mut() {
                    map.insert("reason".into(), reason.into());
                }
                Ok(Some(body))
            }
            ApiRequest::VmBalloonHintsPut(action) => {
                let balloon = self.balloon()?;
                let err = |e: virtio_devices::BalloonError| {
                    ApiError::InvalidState(crate::api::error_chain(&e))
                };
                match action.action {
                    HintAction::Start => self.api_hint_round(),
                    HintAction::Stop => balloon.stop_hint_round().map(|_| None).map_err(err),
                    HintAction::Done => balloon.hint_done().map(|_| None).map_err(err),
                }
            }
        }
    }

    fn hinter(&self) -> Option<crate::devices::balloon::BalloonHinter> {
        self.vm.as_ref().and_then(Vm::free_page_hinter)
    }

    /// `vm.balloon-hints` start: a round outside a migration, whose hints are only counted (as
    /// Firecracker does). It ends like a migration's round (STOP, the guest's progress stalling,
    /// or [`API_HINT_WAIT`]), so a driver that never answers cannot hang it.
    fn api_hint_round(&mut self) -> ApiResult {
        let hinter = self.hinter().ok_or_else(|| self.no_vm())?;
        let mut round = hinter
            .start_round()
            .map_err(|why| ApiError::InvalidState(format!("cannot start a hint round: {why}")))?;
        let mut pages = 0u64;
        let outcome =
            HintWait::new(API_HINT_WAIT).run(round.as_mut(), &MonotonicClock::new(), |hints| {
                pages += hints.iter().map(|(_, len)| len / 4096).sum::<u64>()
            });
        if outcome.needs_stop() {
            hinter.stop_round();
        }
        self.last_hint_reason = outcome.reason(pages);
        let status = self.balloon()?.hint_status();
        let mut body = serde_json::to_value(status)
            .map_err(|e| ApiError::internal("cannot encode the hint status", e))?;
        if let Some(map) = body.as_object_mut() {
            map.insert(
                "timed_out".into(),
                (outcome.end != RoundEnd::Stopped).into(),
            );
            map.insert("reason".into(), self.last_hint_reason.clone().into());
        }
        Ok(Some(body))
    }
}

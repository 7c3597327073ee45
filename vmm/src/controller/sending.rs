//! The VMM thread's side of a migration being sent on the `migration-send` thread: starting it,
//! the VM steps it asks for, its end, progress, cancel, and the requests refused meanwhile.

use std::sync::mpsc::{channel, Sender};
use std::sync::Arc;
use std::time::{Duration, Instant};

use vm_migration::MigrationReport;

use super::{Vmm, VmmEvent};
use crate::api::{ApiError, ApiReply, ApiRequest, ApiResult};
use crate::config::SendMigrationData;
use crate::migration::outgoing::{self, OutgoingMigration, SendContext};
use crate::migration::progress::{MigrationProgress, Phase};
use crate::migration::source_vm::{VmRemote, VmStepRequest};
use crate::migration::MigrationError;
use crate::vm::VmState;

/// How long the source VMM waits, after its VM has moved, for someone to read the final
/// progress (`ch-remote send-migration` does within 100 ms) before it ends anyway.
pub(super) const LINGER_AFTER_MIGRATION: Duration = Duration::from_secs(10);
/// How long it stays once the final progress was read, so that other watchers read it too.
const LINGER_AFTER_READ: Duration = Duration::from_secs(1);

/// A migration being sent, and the `vm.migration-cancel` requests waiting for its end.
pub(super) struct Outgoing {
    migration: OutgoingMigration,
    cancel_waiters: Vec<Sender<ApiResult>>,
}

fn progress_json(progress: &MigrationProgress) -> ApiResult {
    let mut body = serde_json::to_value(progress.view())
        .map_err(|e| ApiError::internal("cannot encode the migration progress", e))?;
    if let Some(map) = body.as_object_mut() {
        map.insert("role".into(), "source".into());
    }
    Ok(Some(body))
}

impl Vmm {
    /// `vm.send-migration`: starts the `migration-send` thread and answers 202 with the
    /// progress at once.
    pub(super) fn start_sending(&mut self, data: SendMigrationData) -> ApiReply {
        if self.outgoing.is_some() {
            return Err(ApiError::InvalidState(
                "a migration is already being sent".into(),
            ))
            .into();
        }
        let steps = self.events_tx.clone();
        let vm = match self.vm_mut() {
            Ok(vm) => vm,
            Err(e) => return Err(e).into(),
        };
        if !matches!(vm.state(), VmState::Running | VmState::Paused) {
            return Err(ApiError::InvalidState(format!(
                "the VM is {:?}: only a running or paused VM can be migrated",
                vm.state()
            )))
            .into();
        }
        let remote = VmRemote::new(
            vm,
            Box::new(move |req| steps.send(VmmEvent::MigrationStep(req)).is_ok()),
        );
        let context = SendContext {
            vm: remote,
            hinter: vm.free_page_hinter(),
            seccomp: self.seccomp,
        };
        let events = self.events_tx.clone();
        let started = outgoing::start_sending(data, context, move |result| {
            // The VMM thread may be gone (shutting down); nobody needs the result then.
            let _ = events.send(VmmEvent::Sent(Box::new(result)));
        });
        match started {
            Ok(migration) => {
                let body = progress_json(migration.progress());
                self.last_sent = Some(migration.progress().clone());
                self.outgoing = Some(Outgoing {
                    migration,
                    cancel_waiters: Vec::new(),
                });
                match body {
                    Ok(body) => ApiReply::Accepted(body.unwrap_or_default()),
                    Err(e) => Err(e).into(),
                }
            }
            Err(e) => Err(ApiError::internal("migration failed", e)).into(),
        }
    }

    /// A step on the VM for the `migration-send` thread.
    pub(super) fn migration_step(&mut self, request: VmStepRequest) {
        match self.vm.as_mut() {
            Some(vm) => request.run_on(vm),
            None => request.refuse(),
        }
    }

    /// The `migration-send` thread is done: on success the guest runs on the destination and
    /// this VM stops (the process ends once the final progress was read, or after
    /// [`LINGER_AFTER_MIGRATION`]); on failure it runs on here.
    pub(super) fn sent(&mut self, result: Result<MigrationReport, MigrationError>) {
        let Some(mut outgoing) = self.outgoing.take() else {
            return;
        };
        outgoing.migration.join();
        if let Ok(report) = &result {
            log::info!("migration completed: {report:?}");
            if let Some(vm) = self.vm.as_mut() {
                vm.shutdown();
            }
            self.linger_until = Some(Instant::now() + LINGER_AFTER_MIGRATION);
        }
        if let Some(code) = self.ended_while_sending.take() {
            // The guest ended during the migration (which failed on it): stop the VM as the
            // event would have, and end the process once the failure was read.
            if let Some(vm) = self.vm.as_mut() {
                vm.shutdown();
            }
            if self.exit_with_vm {
                self.linger_until = Some(Instant::now() + LINGER_AFTER_MIGRATION);
                self.linger_exit_code = code;
            }
        }
        let answer = progress_json(outgoing.migration.progress());
        for waiter in outgoing.cancel_waiters {
            // The client may have hung up; the migration still ended.
            let _ = waiter.send(match &answer {
                Ok(body) => Ok(body.clone()),
                Err(e) => Err(ApiError::internal_msg(e.message())),
            });
        }
    }

    /// `vm.migration-cancel`: the migration being sent stops (answered when it has: the VM runs
    /// on here), or the one being received.
    pub(super) fn cancel_migration(&mut self) -> ApiReply {
        if let Some(outgoing) = self.outgoing.as_mut() {
            if !outgoing.migration.progress().cancel() {
                return Err(ApiError::InvalidState(
                    "too late to cancel: the destination is taking over the guest".into(),
                ))
                .into();
            }
            let (answer, later) = channel();
            outgoing.cancel_waiters.push(answer);
            return ApiReply::Later(later);
        }
        if self.incoming.is_some() {
            self.cancel_incoming();
            self.last_received = Some(serde_json::json!({
                "role": "destination",
                "state": Phase::Cancelled.name(),
            }));
            return ApiReply::Now(Ok(None));
        }
        Err(ApiError::InvalidState("no migration is running".into())).into()
    }

    /// `vm.migration-progress`: the migration being sent or received, else how the last one
    /// ended. Reading the end of a migration that moved the VM away lets the process end
    /// [`LINGER_AFTER_READ`] later.
    pub(super) fn migration_progress(&mut self) -> ApiResult {
        if let Some(incoming) = &self.incoming {
            let (rounds, pages) = incoming.migration.received();
            return Ok(Some(serde_json::json!({
                "role": "destination",
                "state": "receiving",
                "phase": incoming.migration.phase().name(),
                "receiver_url": incoming.migration.url(),
                "rounds_received": rounds,
                "pages_received": pages,
            })));
        }
        if let Some(progress) = self.last_sent.clone() {
            if let Some(until) = self.linger_until {
                self.linger_until = Some(until.min(Instant::now() + LINGER_AFTER_READ));
            }
            return progress_json(&progress);
        }
        if let Some(last) = &self.last_received {
            return Ok(Some(last.clone()));
        }
        Err(ApiError::InvalidState("no migration has run".into()))
    }

    /// Requests that would change the VM under a migration being sent are refused (409).
    pub(super) fn refused_while_sending(&self, req: &ApiRequest) -> Option<ApiError> {
        self.outgoing.as_ref()?;
        let changes_vm = matches!(
            req,
            ApiRequest::VmPause
                | ApiRequest::VmResume
                | ApiRequest::VmResize(_)
                | ApiRequest::VmDelete
                | ApiRequest::VmShutdown
                | ApiRequest::VmBoot
                | ApiRequest::VmCreate(_)
                | ApiRequest::VmSendMigration(_)
                | ApiRequest::VmReceiveMigration(_)
                | ApiRequest::VmBalloonHintsPut(_)
        );
        changes_vm.then(|| {
            ApiError::InvalidState(format!(
                "{} refused: a migration is being sent (wait for it, or vm.migration-cancel)",
                req.endpoint()
            ))
        })
    }

    /// Stops the migration being sent, if any, without waiting for it to end (the VMM is going
    /// away, or the guest ended).
    pub(super) fn abandon_outgoing(&mut self) {
        if let Some(outgoing) = &self.outgoing {
            // Too late to cancel means the guest is moving away anyway.
            let _ = outgoing.migration.progress().cancel();
        }
    }
}

/// The shared progress type, for the fields of [`Vmm`].
pub(super) type SharedProgress = Arc<MigrationProgress>;

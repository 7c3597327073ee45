//! A migration being sent on its own `migration-send` thread, so that `vm.send-migration` is
//! answered as soon as it has started and the API keeps answering while it runs.
//!
//! The VMM thread keeps the `Vm`: the sending thread reads guest memory (shared) and sends it,
//! and asks the VMM thread for the steps that need the VM itself (see [`super::source_vm`]).
//! Progress and the cancel switch are in a shared [`MigrationProgress`].

use std::sync::Arc;
use std::thread::JoinHandle;

use vm_migration::MigrationReport;

use super::hints::FreePageHinter;
use super::progress::MigrationProgress;
use super::send::send_migration_with;
use super::source_vm::VmRemote;
use super::MigrationError;
use crate::config::SendMigrationData;
use crate::devices::balloon::BalloonHinter;
use crate::seccomp::{self, SeccompMode, ThreadKind};

/// What the sending thread works with.
pub struct SendContext {
    /// The VM, through the VMM thread.
    pub vm: VmRemote,
    /// The balloon's free page hints, if the VM has a balloon.
    pub hinter: Option<BalloonHinter>,
    /// The sending thread's filter.
    pub seccomp: SeccompMode,
}

/// A migration being sent.
pub struct OutgoingMigration {
    progress: Arc<MigrationProgress>,
    thread: Option<JoinHandle<()>>,
}

impl OutgoingMigration {
    /// Its progress (and cancel switch).
    pub fn progress(&self) -> &Arc<MigrationProgress> {
        &self.progress
    }

    /// Waits for the thread to end (after it has called `done`).
    pub fn join(&mut self) {
        if let Some(thread) = self.thread.take() {
            if thread.join().is_err() {
                log::error!("the migration-send thread panicked");
            }
        }
    }
}

/// Starts sending the VM on a new `migration-send` thread, which calls `done` with the report
/// or the error once it has ended (and, on error, the VM runs on here). The progress shows the
/// end before `done` is called.
pub fn start_sending(
    data: SendMigrationData,
    context: SendContext,
    done: impl FnOnce(Result<MigrationReport, MigrationError>) + Send + 'static,
) -> Result<OutgoingMigration, MigrationError> {
    let progress = Arc::new(MigrationProgress::new(data.downtime_ms));
    let shared = progress.clone();
    let thread = std::thread::Builder::new()
        .name("migration-send".into())
        .spawn(move || {
            let SendContext {
                mut vm,
                hinter,
                seccomp,
            } = context;
            let result = seccomp::apply(ThreadKind::MigrationSend, seccomp)
                .map_err(MigrationError::Seccomp)
                .and_then(|()| {
                    let hinter = hinter.as_ref().map(|h| h as &dyn FreePageHinter);
                    send_migration_with(&mut vm, &data, hinter, &shared)
                });
            match &result {
                Ok(report) => shared.finish(Ok(report)),
                Err(e) => {
                    let why = crate::api::error_chain(e);
                    log::error!("migration failed: {why}");
                    let cancelled = matches!(
                        e,
                        MigrationError::SendCancelled | MigrationError::NotConverged { .. }
                    );
                    shared.finish(Err((cancelled, why)));
                }
            }
            done(result);
        })
        .map_err(MigrationError::SendThread)?;
    Ok(OutgoingMigration {
        progress,
        thread: Some(thread),
    })
}

//! The destination's added connections (`connections=<n>`): accepted on the migration's
//! listener when the source's Connections request comes, each checked by its Join (the
//! migration's token, an index not seen yet) and served by a `migration-rx-N` thread, under its
//! own seccomp filter, that writes the Memory requests it reads straight into guest memory.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use vm_migration::protocol::{read_payload, Command, RequestHeader};
use vm_migration::striping::{ConnectionsRequest, JoinRequest};
use vm_migration::{
    receive_memory, MigrationListener, MigrationStream, RamRegions, Response, TlsServer,
    TransportError,
};

use super::super::MigrationError;
use super::IO_TIMEOUT;
use crate::memory::GuestMemoryMmap;
use crate::seccomp::{self, SeccompMode, ThreadKind};
use crate::vm::lock;

/// How long the added connections have to arrive and join.
const JOIN_TIMEOUT: Duration = Duration::from_secs(10);
/// How often the wait for them looks whether the migration was cancelled.
const POLL: Duration = Duration::from_millis(100);

/// What the destination needs to serve added connections.
pub struct StripeContext<'a> {
    /// The migration's listener (still bound).
    pub listener: &'a MigrationListener,
    /// TLS, when the destination was given `tls_dir=`.
    pub tls: Option<&'a TlsServer>,
    /// The VM's guest memory.
    pub memory: &'a Arc<GuestMemoryMmap>,
    /// Its RAM regions, which every received range is checked against.
    pub ram: &'a RamRegions,
    /// Filters for the threads.
    pub seccomp: SeccompMode,
}

/// Shared between the receiving thread and the `migration-rx-N` threads.
#[derive(Default)]
struct Shared {
    /// Set before the connections are shut down on purpose: errors after it do not count.
    stopping: AtomicBool,
    /// The first failure of an added connection.
    failure: Mutex<Option<MigrationError>>,
}

struct Worker {
    waker: Option<MigrationStream>,
    thread: Option<JoinHandle<()>>,
}

/// The added connections of one incoming migration and their threads.
pub struct ReceiveStripes {
    workers: Vec<Worker>,
    shared: Arc<Shared>,
}

impl ReceiveStripes {
    /// Accepts the `request.extra` connections the source announced, checks each one's Join,
    /// answers it, and starts its thread. `cancelled` is polled while waiting.
    pub fn accept(
        request: &ConnectionsRequest,
        context: &StripeContext<'_>,
        cancelled: impl Fn() -> Result<(), MigrationError>,
    ) -> Result<Self, MigrationError> {
        let mut stripes = ReceiveStripes {
            workers: Vec::new(),
            shared: Arc::new(Shared::default()),
        };
        let expected = request.extra as usize;
        let mut joined = vec![false; expected];
        let deadline = Instant::now() + JOIN_TIMEOUT;
        while stripes.workers.len() < expected {
            cancelled()?;
            if Instant::now() >= deadline {
                return Err(MigrationError::JoinTimeout {
                    joined: stripes.workers.len(),
                    expected,
                });
            }
            let stream = match context.listener.accept(Some(POLL), Some(IO_TIMEOUT)) {
                Err(TransportError::AcceptTimeout(_)) => continue,
                other => other.map_err(MigrationError::Transport)?,
            };
            let stream = match context.tls {
                Some(tls) => stream.into_tls_server(tls).map_err(MigrationError::Tls)?,
                None => stream,
            };
            let (index, stream) = admit(stream, request, &mut joined)?;
            stripes.start(index, stream, context)?;
        }
        Ok(stripes)
    }

    fn start(
        &mut self,
        index: usize,
        stream: MigrationStream,
        context: &StripeContext<'_>,
    ) -> Result<(), MigrationError> {
        let waker = super::waker(&stream);
        let memory = context.memory.clone();
        let ram = context.ram.clone();
        let shared = self.shared.clone();
        let mode = context.seccomp;
        let thread = std::thread::Builder::new()
            .name(format!("migration-rx-{index}"))
            .spawn(move || {
                let mut stream = stream;
                let result = seccomp::apply(ThreadKind::MigrationReceiveStream, mode)
                    .map_err(|e| MigrationError::StreamSeccomp(e.to_string()))
                    .and_then(|()| receive_parts(&mut stream, &memory, &ram, &shared));
                // The waker keeps the socket open: shut it down so the source sees the end.
                let _ = stream.shutdown();
                if let Err(e) = result {
                    if !shared.stopping.load(Ordering::SeqCst) {
                        log::error!(
                            "added migration connection {index} failed: {}",
                            crate::api::error_chain(&e)
                        );
                        lock(&shared.failure).get_or_insert(MigrationError::Connection {
                            index,
                            source: Box::new(e),
                        });
                    }
                }
            })
            .map_err(MigrationError::Spawn)?;
        self.workers.push(Worker {
            waker,
            thread: Some(thread),
        });
        Ok(())
    }

    /// Stops the threads (every part of every round has been acknowledged when the source
    /// sends its state) and says whether an added connection failed before.
    pub fn finish(mut self) -> Result<(), MigrationError> {
        self.stop();
        match lock(&self.shared.failure).take() {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    fn stop(&mut self) {
        self.shared.stopping.store(true, Ordering::SeqCst);
        for worker in &mut self.workers {
            if let Some(waker) = &worker.waker {
                let _ = waker.shutdown();
            }
            if let Some(thread) = worker.thread.take() {
                if thread.join().is_err() {
                    log::error!("a migration-rx thread panicked");
                }
            }
        }
    }
}

impl Drop for ReceiveStripes {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Reads and checks the Join on a new connection and answers it; returns its index.
fn admit(
    mut stream: MigrationStream,
    request: &ConnectionsRequest,
    joined: &mut [bool],
) -> Result<(usize, MigrationStream), MigrationError> {
    let checked = RequestHeader::read_from(&mut stream)
        .and_then(|header| {
            header.check_command(Command::Join)?;
            read_payload(&mut stream, &header)
        })
        .map_err(MigrationError::Protocol)
        .and_then(|payload| {
            JoinRequest::from_bytes(&payload)
                .and_then(|join| request.admit(&join, joined))
                .map_err(MigrationError::Stripe)
        });
    match checked {
        Ok(slot) => {
            Response::Ok
                .write_to(&mut stream)
                .map_err(MigrationError::Protocol)?;
            Ok((slot + 1, stream))
        }
        Err(e) => {
            let message = crate::api::error_chain(&e);
            let _ = Response::error(e.reason(), &message).write_to(&mut stream);
            Err(e)
        }
    }
}

/// The `migration-rx-N` thread: answers Memory requests until the connection ends.
fn receive_parts(
    stream: &mut MigrationStream,
    memory: &GuestMemoryMmap,
    ram: &RamRegions,
    shared: &Shared,
) -> Result<(), MigrationError> {
    loop {
        let header = RequestHeader::read_from(&mut *stream).map_err(MigrationError::Protocol)?;
        let outcome = match header.command() {
            Command::Memory => receive_memory(memory, ram, &header, &mut *stream)
                .map(drop)
                .map_err(MigrationError::Memory),
            Command::Abandon => {
                let _ = Response::Ok.write_to(&mut *stream);
                return Err(MigrationError::Abandoned);
            }
            _ => Err(MigrationError::Unexpected(
                "request other than Memory on an added connection",
            )),
        };
        if let Err(e) = outcome {
            if !shared.stopping.load(Ordering::SeqCst) {
                let message = crate::api::error_chain(&e);
                let _ = Response::error(e.reason(), &message).write_to(&mut *stream);
            }
            return Err(e);
        }
        Response::Ok
            .write_to(&mut *stream)
            .map_err(MigrationError::Protocol)?;
    }
}

//! The source's added connections (`connections=<n>`): each has a `migration-tx-N` thread,
//! under its own seccomp filter, that sends its part of every round as a Memory request and
//! waits for the acknowledgement; part 0 goes on the first connection from the caller's thread.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::Arc;
use std::thread::JoinHandle;

use vm_migration::protocol::{self, Command, ProtocolError};
use vm_migration::striping::{split_round, ConnectionsRequest, JoinRequest, MIN_PART_PAGES};
use vm_migration::{
    send_memory, CountingStream, MemoryRangeTable, MigrationStream, MigrationUrl, Response,
    TlsClient,
};

use super::super::MigrationError;
use crate::memory::GuestMemoryMmap;
use crate::seccomp::{self, SeccompMode, ThreadKind};

/// One added connection and its thread.
struct Worker {
    /// Parts to send; dropped to tell the thread to finish.
    jobs: Option<mpsc::Sender<MemoryRangeTable>>,
    /// Guest bytes sent for each part, or why not.
    done: mpsc::Receiver<Result<u64, MigrationError>>,
    /// Shuts the socket down to wake the thread when the migration fails.
    waker: Option<MigrationStream>,
    thread: Option<JoinHandle<()>>,
    /// Everything the thread wrote on its connection.
    wire: Arc<AtomicU64>,
}

/// The added connections of one migration (none with `connections=1`).
#[derive(Default)]
pub struct SendStripes {
    workers: Vec<Worker>,
}

impl SendStripes {
    /// Asks the destination (on `main`, after Config) for `connections - 1` more connections,
    /// opens them to `url` (with TLS when `tls` is given), joins each with the migration's
    /// token, and starts their threads. With `connections <= 1` it does nothing.
    pub fn open(
        main: &mut CountingStream<MigrationStream>,
        url: &MigrationUrl,
        connections: u32,
        tls: Option<&TlsClient>,
        memory: &Arc<GuestMemoryMmap>,
        seccomp: SeccompMode,
    ) -> Result<Self, MigrationError> {
        let mut stripes = SendStripes::default();
        if connections <= 1 {
            return Ok(stripes);
        }
        let request = ConnectionsRequest::new(connections).map_err(MigrationError::Stripe)?;
        // The destination answers once every added connection has joined.
        protocol::write_request(main, Command::Connections, &request.to_bytes())
            .map_err(MigrationError::Protocol)?;
        for index in 1..=request.extra {
            let mut stream = super::connect(url, tls)?;
            let join = JoinRequest {
                index,
                token: request.token,
            };
            protocol::request(&mut stream, Command::Join, &join.to_bytes())
                .map_err(MigrationError::Protocol)?;
            stripes.start(index, stream, memory.clone(), seccomp)?;
        }
        Response::read_from(main)
            .and_then(Response::into_result)
            .map_err(MigrationError::Protocol)?;
        Ok(stripes)
    }

    fn start(
        &mut self,
        index: u32,
        stream: MigrationStream,
        memory: Arc<GuestMemoryMmap>,
        seccomp: SeccompMode,
    ) -> Result<(), MigrationError> {
        let (jobs, job_rx) = mpsc::channel();
        let (done_tx, done) = mpsc::channel();
        let wire = Arc::new(AtomicU64::new(0));
        let waker = super::waker(&stream);
        let counted = wire.clone();
        let thread = std::thread::Builder::new()
            .name(format!("migration-tx-{index}"))
            .spawn(move || {
                send_parts(stream, &memory, job_rx, done_tx, &counted, seccomp);
            })
            .map_err(MigrationError::Spawn)?;
        self.workers.push(Worker {
            jobs: Some(jobs),
            done,
            waker,
            thread: Some(thread),
            wire,
        });
        Ok(())
    }

    /// Connections in use, the first one included.
    pub fn connections(&self) -> u32 {
        self.workers.len() as u32 + 1
    }

    /// Bytes written on the added connections.
    pub fn wire_bytes(&self) -> u64 {
        self.workers
            .iter()
            .map(|w| w.wire.load(Ordering::Relaxed))
            .sum()
    }

    /// Sends one round and waits until every part is acknowledged: part 0 on `main` from this
    /// thread, the others on the added connections. Returns the guest bytes sent. With no added
    /// connection this is one Memory request on `main`, as it always was.
    pub fn send_round(
        &mut self,
        memory: &GuestMemoryMmap,
        table: &MemoryRangeTable,
        main: &mut CountingStream<MigrationStream>,
    ) -> Result<u64, MigrationError> {
        let mut parts = split_round(table, self.workers.len() + 1, MIN_PART_PAGES).into_iter();
        let first = parts.next().unwrap_or_default();
        let mut busy = Vec::new();
        let mut outcome = Ok(0u64);
        for (worker, part) in self.workers.iter().zip(parts) {
            let sent = worker
                .jobs
                .as_ref()
                .is_some_and(|jobs| jobs.send(part).is_ok());
            if !sent {
                outcome = Err(MigrationError::StreamThreadGone);
                break;
            }
            busy.push(worker);
        }
        if outcome.is_ok() {
            outcome = send_memory(memory, &first, main)
                .map_err(MigrationError::Memory)
                .and_then(|sent| {
                    Response::read_from(main)
                        .and_then(Response::into_result)
                        .map(|()| sent)
                        .map_err(MigrationError::Protocol)
                });
        }
        for (i, worker) in busy.into_iter().enumerate() {
            if outcome.is_err() {
                // Wake the others instead of waiting for their timeouts.
                self.workers.iter().for_each(Worker::wake);
            }
            let part = worker
                .done
                .recv()
                .unwrap_or(Err(MigrationError::StreamThreadGone));
            outcome = match (outcome, part) {
                (Ok(total), Ok(sent)) => Ok(total + sent),
                (Err(e), _) => Err(e),
                (Ok(_), Err(e)) => Err(MigrationError::Connection {
                    index: i + 1,
                    source: Box::new(e),
                }),
            };
        }
        outcome
    }
}

impl Worker {
    fn wake(&self) {
        if let Some(waker) = &self.waker {
            let _ = waker.shutdown();
        }
    }
}

impl Drop for SendStripes {
    /// Ends the threads: each finishes when its job channel closes (or its socket is shut down)
    /// and closes its connection.
    fn drop(&mut self) {
        for worker in &mut self.workers {
            worker.jobs = None;
        }
        for worker in &mut self.workers {
            worker.wake();
            if let Some(thread) = worker.thread.take() {
                if thread.join().is_err() {
                    log::error!("a migration-tx thread panicked");
                }
            }
        }
    }
}

/// The `migration-tx-N` thread: sends each part it is given on its connection as a Memory
/// request and reports the acknowledgement, until the channel closes or a part fails.
fn send_parts(
    stream: MigrationStream,
    memory: &GuestMemoryMmap,
    jobs: mpsc::Receiver<MemoryRangeTable>,
    done: mpsc::Sender<Result<u64, MigrationError>>,
    wire: &AtomicU64,
    mode: SeccompMode,
) {
    let filtered = seccomp::apply(ThreadKind::MigrationSendStream, mode);
    let mut stream = CountingStream::new(stream);
    for table in jobs {
        let result = match &filtered {
            Err(e) => Err(MigrationError::StreamSeccomp(e.to_string())),
            Ok(()) => send_part(memory, &table, &mut stream),
        };
        wire.store(stream.bytes_written(), Ordering::Relaxed);
        let failed = result.is_err();
        if done.send(result).is_err() || failed {
            // Other handles on the socket may keep it open: make sure the peer sees the end.
            let _ = stream.get_ref().shutdown();
            return;
        }
    }
    if let MigrationStream::Tls(tls) = stream.get_mut() {
        let _ = tls.shutdown();
    }
}

/// Sends one part as a Memory request and waits for its acknowledgement. When the write
/// fails, the destination may have refused the part and closed: its answer says why.
fn send_part(
    memory: &GuestMemoryMmap,
    table: &MemoryRangeTable,
    stream: &mut CountingStream<MigrationStream>,
) -> Result<u64, MigrationError> {
    let sent = match send_memory(memory, table, stream) {
        Ok(sent) => sent,
        Err(e) => {
            return match Response::read_from(stream).and_then(Response::into_result) {
                Err(refused @ ProtocolError::Refused { .. }) => {
                    Err(MigrationError::Protocol(refused))
                }
                _ => Err(MigrationError::Memory(e)),
            };
        }
    };
    Response::read_from(stream)
        .and_then(Response::into_result)
        .map(|()| sent)
        .map_err(MigrationError::Protocol)
}

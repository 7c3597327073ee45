//! A man-in-the-middle for the migration stream: the source connects to the proxy, the proxy
//! connects to the destination and forwards both directions, parsing the frames (see
//! `vm-migration/src/protocol/`) so that it can cut, stall or meddle at a chosen protocol point.
//! Nothing of this ships in the VMM.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::Shutdown;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// Request command codes (`vm-migration/src/protocol/request.rs`).
pub const START: u16 = 1;
/// Config request.
pub const CONFIG: u16 = 2;
/// Memory request (range table + pages).
pub const MEMORY: u16 = 3;
/// State request.
pub const STATE: u16 = 5;
/// Complete request.
pub const COMPLETE: u16 = 6;

/// How long the answer to a Memory request is held back until the fault has struck.
const MEMORY_PACE: Duration = Duration::from_millis(100);

/// Where in the stream the fault strikes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Point {
    /// Before the header of the `nth` (from 0) request with this command reaches the destination.
    Request(u16, usize),
    /// When half of the page data of the `nth` Memory request has reached the destination.
    MemoryHalf(usize),
    /// Instead of passing on the destination's answer to the `nth` request with this command.
    Answer(u16, usize),
    /// Just after passing on the destination's answer to the `nth` request with this command.
    AfterAnswer(u16, usize),
}

/// What the fault does.
pub enum Action {
    /// Close both connections at once.
    Cut,
    /// Stop forwarding both ways and keep both connections open: a peer that hangs.
    Stall,
    /// Run this (kill a process, say), then go on forwarding.
    Run(Box<dyn FnOnce() + Send>),
}

struct Shared {
    point: Point,
    action: Mutex<Option<Action>>,
    hit: AtomicBool,
    stalled: AtomicBool,
    closing: AtomicBool,
    sockets: Mutex<Vec<UnixStream>>,
    connected: Mutex<Option<Instant>>,
}

/// What to do after the fault fired.
enum After {
    Go,
    Stop,
}

impl Shared {
    fn close_all(&self) {
        for s in self.sockets.lock().unwrap().iter() {
            let _ = s.shutdown(Shutdown::Both);
        }
    }

    fn fire(&self) -> After {
        let Some(action) = self.action.lock().unwrap().take() else {
            return After::Go;
        };
        self.hit.store(true, Ordering::SeqCst);
        eprintln!(
            "  proxy: {:?} reached {:.1} s after the source connected",
            self.point,
            self.connected
                .lock()
                .unwrap()
                .map_or(0.0, |t| t.elapsed().as_secs_f64())
        );
        match action {
            Action::Cut => {
                self.close_all();
                After::Stop
            }
            Action::Stall => {
                self.stalled.store(true, Ordering::SeqCst);
                After::Stop
            }
            Action::Run(f) => {
                f();
                After::Go
            }
        }
    }

    /// The end of one direction: the other goes down with it, unless the proxy stalls.
    fn end(&self) {
        if !self.stalled.load(Ordering::SeqCst) {
            self.close_all();
        }
    }
}

/// A running proxy for one migration connection.
pub struct Proxy {
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

impl Proxy {
    /// Listens on `listen` and forwards the one connection it accepts to `dest`, with `action`
    /// at `point`.
    pub fn start(listen: &Path, dest: &Path, point: Point, action: Action) -> Proxy {
        let _ = std::fs::remove_file(listen);
        let listener = UnixListener::bind(listen).expect("bind the proxy socket");
        listener.set_nonblocking(true).unwrap();
        let shared = Arc::new(Shared {
            point,
            action: Mutex::new(Some(action)),
            hit: AtomicBool::new(false),
            stalled: AtomicBool::new(false),
            closing: AtomicBool::new(false),
            sockets: Mutex::new(Vec::new()),
            connected: Mutex::new(None),
        });
        let dest = dest.to_path_buf();
        let thread = std::thread::spawn({
            let shared = shared.clone();
            move || run(listener, dest, shared)
        });
        Proxy {
            shared,
            thread: Some(thread),
        }
    }

    /// Closes everything and says whether the fault fired.
    pub fn finish(mut self) -> bool {
        self.stop();
        self.shared.hit.load(Ordering::SeqCst)
    }

    fn stop(&mut self) {
        self.shared.closing.store(true, Ordering::SeqCst);
        self.shared.close_all();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.stop();
    }
}

fn run(listener: UnixListener, dest: PathBuf, shared: Arc<Shared>) {
    let deadline = Instant::now() + Duration::from_secs(60);
    let source = loop {
        match listener.accept() {
            Ok((s, _)) => break s,
            Err(_) if shared.closing.load(Ordering::SeqCst) || Instant::now() > deadline => return,
            Err(_) => std::thread::sleep(Duration::from_millis(5)),
        }
    };
    source.set_nonblocking(false).unwrap();
    *shared.connected.lock().unwrap() = Some(Instant::now());
    let Ok(dest) = UnixStream::connect(&dest) else {
        return;
    };
    {
        let mut sockets = shared.sockets.lock().unwrap();
        sockets.push(source.try_clone().unwrap());
        sockets.push(dest.try_clone().unwrap());
    }
    if shared.closing.load(Ordering::SeqCst) {
        shared.close_all();
    }
    let (tx, rx) = channel();
    let to_dest = std::thread::spawn({
        let (source, dest) = (source.try_clone().unwrap(), dest.try_clone().unwrap());
        let shared = shared.clone();
        move || {
            requests(source, dest, &shared, tx);
            shared.end();
        }
    });
    answers(dest, source, &shared, rx);
    shared.end();
    let _ = to_dest.join();
    // A stalled proxy holds both connections until the test is done with it.
    while shared.stalled.load(Ordering::SeqCst) && !shared.closing.load(Ordering::SeqCst) {
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn le16(b: &[u8]) -> u16 {
    u16::from_le_bytes([b[0], b[1]])
}

fn le64(b: &[u8]) -> u64 {
    u64::from_le_bytes(b[..8].try_into().unwrap())
}

/// Source to destination: request headers, payloads, and Memory's page data.
fn requests(
    mut source: UnixStream,
    mut dest: UnixStream,
    shared: &Shared,
    tx: Sender<(u16, usize)>,
) {
    let mut counts: HashMap<u16, usize> = HashMap::new();
    loop {
        let mut header = [0u8; 24];
        if source.read_exact(&mut header).is_err() {
            return;
        }
        let command = le16(&header[6..8]);
        let length = le64(&header[16..24]);
        let n = counts.entry(command).or_default();
        let nth = *n;
        *n += 1;
        let _ = tx.send((command, nth));
        if shared.point == Point::Request(command, nth) {
            if let After::Stop = shared.fire() {
                return;
            }
        }
        if dest.write_all(&header).is_err() {
            return;
        }
        let mut payload = vec![0u8; length as usize];
        if source.read_exact(&mut payload).is_err() || dest.write_all(&payload).is_err() {
            return;
        }
        if command != MEMORY {
            continue;
        }
        let data: u64 = payload.chunks_exact(16).map(|e| le64(&e[8..16])).sum();
        let half = (shared.point == Point::MemoryHalf(nth)).then_some(data / 2);
        let mut left = data;
        let mut buf = vec![0u8; 1 << 16];
        // A round with nothing to send is "half sent" once its table is through.
        if half.is_some() && data == 0 {
            if let After::Stop = shared.fire() {
                return;
            }
        }
        while left > 0 {
            if half.is_some_and(|h| data - left >= h) {
                if let After::Stop = shared.fire() {
                    return;
                }
            }
            let chunk = left.min(buf.len() as u64) as usize;
            if source.read_exact(&mut buf[..chunk]).is_err()
                || dest.write_all(&buf[..chunk]).is_err()
            {
                return;
            }
            left -= chunk as u64;
        }
    }
}

/// Destination to source: response headers and error messages.
fn answers(
    mut dest: UnixStream,
    mut source: UnixStream,
    shared: &Shared,
    rx: Receiver<(u16, usize)>,
) {
    loop {
        let mut header = [0u8; 16];
        if dest.read_exact(&mut header).is_err() {
            return;
        }
        let message_len = u32::from_le_bytes(header[12..16].try_into().unwrap()) as usize;
        let mut message = vec![0u8; message_len.min(1 << 16)];
        if dest.read_exact(&mut message).is_err() {
            return;
        }
        let (command, nth) = rx.recv_timeout(Duration::from_secs(1)).unwrap_or((0, 0));
        if command == MEMORY && !shared.hit.load(Ordering::SeqCst) {
            // Give the guest time to dirty pages before the next sync, so that a busy host
            // cannot make the source stop after round 0 before the fault's dirty round.
            std::thread::sleep(MEMORY_PACE);
        }
        if shared.point == Point::Answer(command, nth) {
            if let After::Stop = shared.fire() {
                return;
            }
        }
        if shared.stalled.load(Ordering::SeqCst) {
            return;
        }
        if source.write_all(&header).is_err() || source.write_all(&message).is_err() {
            return;
        }
        if shared.point == Point::AfterAnswer(command, nth) {
            if let After::Stop = shared.fire() {
                return;
            }
        }
    }
}

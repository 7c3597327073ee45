//! A small HTTP/1.1 server for the API socket.
//!
//! One request per connection (every answer carries `Connection: close`), on a thread named
//! `http-server`. The thread `poll`s the listener and every connection whose request is still
//! arriving (up to [`MAX_CONNECTIONS`]; more are answered 503 at once), reads only what has
//! arrived, and handles each request as soon as it is complete: a slow or silent client holds
//! nothing but its own connection. Every request has a deadline and size limits, so such a client
//! gets a 4xx (or is dropped) and the server goes on serving.
//!
//! A handler may answer later ([`ApiReply::Later`], e.g. `vm.receive-migration`, which ends when
//! a migration has arrived): its connection is kept open and answered when the result comes,
//! while the server goes on serving other connections. To notice that result, the `poll` gives up
//! every [`PENDING_POLL`].

use std::fs;
use std::io::{self, Read, Write};
use std::net::Shutdown;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::panic::{self, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use log::{debug, error, info, warn};

use super::{routes, ApiError, ApiRequest, ApiResult};

mod decode;
use crate::seccomp::{self, SeccompError, SeccompMode, ThreadKind};
pub use decode::{decode_request, DecodedRequest};

/// Largest request body accepted, in bytes.
pub const MAX_BODY_SIZE: usize = 64 * 1024;
/// Largest request line plus headers accepted, in bytes.
pub const MAX_HEADER_SIZE: usize = 8 * 1024;
/// Most headers accepted in a request.
const MAX_HEADERS: usize = 32;
/// Time a client has to send a whole request.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// Time a client has to take the response.
const WRITE_TIMEOUT: Duration = Duration::from_secs(10);

/// How often the server looks for results of requests answered later.
const PENDING_POLL: Duration = Duration::from_millis(100);
/// Most connections whose requests are being read at the same time; more are answered 503.
pub const MAX_CONNECTIONS: usize = 32;

/// What a handler gives back for a request.
pub enum ApiReply {
    /// The answer.
    Now(ApiResult),
    /// The answer will come on this channel; the server serves other requests meanwhile.
    Later(std::sync::mpsc::Receiver<ApiResult>),
    /// `202 Accepted` with this body: the work goes on after the answer.
    Accepted(serde_json::Value),
}

impl From<ApiResult> for ApiReply {
    fn from(result: ApiResult) -> Self {
        ApiReply::Now(result)
    }
}

/// The function that executes API requests, called on the `http-server` thread.
pub type ApiHandler = Box<dyn FnMut(ApiRequest) -> ApiReply + Send>;

/// Errors from starting the API server.
#[derive(Debug, thiserror::Error)]
pub enum HttpServerError {
    /// The socket path exists and something accepts connections on it.
    #[error("another process is listening on {}", path.display())]
    InUse {
        /// The socket path.
        path: PathBuf,
    },
    /// The socket path exists and is not a socket: we do not delete it.
    #[error("{} exists and is not a socket", path.display())]
    NotASocket {
        /// The socket path.
        path: PathBuf,
    },
    /// The socket path cannot be inspected.
    #[error("cannot check {}", path.display())]
    Stat {
        /// The socket path.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// A stale socket cannot be removed.
    #[error("cannot remove stale socket {}", path.display())]
    RemoveStale {
        /// The socket path.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// `bind` failed.
    #[error("cannot bind API socket {}", path.display())]
    Bind {
        /// The socket path.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// The socket's mode cannot be set to 0600.
    #[error("cannot set the mode of API socket {}", path.display())]
    Chmod {
        /// The socket path.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// The server thread cannot be spawned.
    #[error("cannot start the http-server thread")]
    Spawn(#[source] io::Error),
    /// The server thread cannot install its seccomp filter (it then serves nothing).
    #[error("cannot filter the http-server thread")]
    Seccomp(#[source] SeccompError),
}

/// Limits applied to each request; tests shorten them.
#[derive(Clone, Copy, Debug)]
struct Limits {
    request_timeout: Duration,
    write_timeout: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            request_timeout: REQUEST_TIMEOUT,
            write_timeout: WRITE_TIMEOUT,
        }
    }
}

/// Binds the API socket at `socket_path` (mode 0600) and serves it on a new thread named
/// `http-server`, under its seccomp filter as `seccomp` says, passing each decoded request to
/// `handler`.
///
/// A socket file left behind by a dead process is removed first; a live one, or a file that is
/// not a socket, is an error. `vmm.shutdown` is answered (204) before the handler sees it; the
/// server then removes the socket and its thread ends.
pub fn start_http_server(
    socket_path: &Path,
    handler: ApiHandler,
    seccomp: SeccompMode,
) -> Result<JoinHandle<()>, HttpServerError> {
    start_with_limits(socket_path, handler, Limits::default(), seccomp)
}

fn start_with_limits(
    socket_path: &Path,
    handler: ApiHandler,
    limits: Limits,
    seccomp: SeccompMode,
) -> Result<JoinHandle<()>, HttpServerError> {
    let listener = bind_socket(socket_path)?;
    let listener =
        with_accept_timeout(listener, PENDING_POLL).map_err(|source| HttpServerError::Bind {
            path: socket_path.to_path_buf(),
            source,
        })?;
    let path = socket_path.to_path_buf();
    let (filtered_tx, filtered_rx) = std::sync::mpsc::sync_channel(1);
    let thread = thread::Builder::new()
        .name("http-server".to_string())
        .spawn(move || {
            let filtered = seccomp::apply(ThreadKind::HttpServer, seccomp);
            let ok = filtered.is_ok();
            let _ = filtered_tx.send(filtered);
            if ok {
                serve(listener, &path, handler, limits);
            }
        })
        .map_err(HttpServerError::Spawn)?;
    match filtered_rx.recv() {
        Ok(Ok(())) => Ok(thread),
        Ok(Err(e)) => {
            let _ = fs::remove_file(socket_path);
            Err(HttpServerError::Seccomp(e))
        }
        // The thread died before answering (it cannot: nothing in between panics).
        Err(_) => Err(HttpServerError::Spawn(io::Error::other(
            "the http-server thread ended",
        ))),
    }
}

/// Removes a stale socket at `path`, then binds a listener there with mode 0600.
fn bind_socket(path: &Path) -> Result<UnixListener, HttpServerError> {
    let owned = || path.to_path_buf();
    match fs::symlink_metadata(path) {
        Ok(meta) if !meta.file_type().is_socket() => {
            return Err(HttpServerError::NotASocket { path: owned() })
        }
        Ok(_) => match UnixStream::connect(path) {
            Ok(_) => return Err(HttpServerError::InUse { path: owned() }),
            Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {
                info!("Removing stale API socket {}", path.display());
                fs::remove_file(path).map_err(|source| HttpServerError::RemoveStale {
                    path: owned(),
                    source,
                })?;
            }
            Err(source) => {
                return Err(HttpServerError::Stat {
                    path: owned(),
                    source,
                })
            }
        },
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(source) => {
            return Err(HttpServerError::Stat {
                path: owned(),
                source,
            })
        }
    }
    // SAFETY: umask only swaps the process's file creation mask and cannot fail. Files other
    // threads create meanwhile get a stricter mode at worst; the chmod below covers the socket
    // in any case.
    let old_mask = unsafe { libc::umask(0o177) };
    let bound = UnixListener::bind(path);
    // SAFETY: as above, restoring the previous mask.
    unsafe { libc::umask(old_mask) };
    let listener = bound.map_err(|source| HttpServerError::Bind {
        path: owned(),
        source,
    })?;
    fs::set_permissions(path, fs::Permissions::from_mode(0o600)).map_err(|source| {
        HttpServerError::Chmod {
            path: owned(),
            source,
        }
    })?;
    Ok(listener)
}

/// Makes `accept` on `listener` give up after `timeout` (`SO_RCVTIMEO`, which Linux applies to
/// accepting on a UNIX socket). Set here, before the server thread's filter is installed.
fn with_accept_timeout(listener: UnixListener, timeout: Duration) -> io::Result<UnixListener> {
    use std::os::fd::OwnedFd;
    // std sets socket options on streams only; the option itself is the same for a listener.
    let socket = UnixStream::from(OwnedFd::from(listener));
    socket.set_read_timeout(Some(timeout))?;
    Ok(UnixListener::from(OwnedFd::from(socket)))
}

/// A connection waiting for its answer.
struct Pending {
    stream: UnixStream,
    endpoint: &'static str,
    answer: std::sync::mpsc::Receiver<ApiResult>,
}

impl Pending {
    /// Answers if the result has come (or can never come); true once answered.
    fn try_answer(&mut self) -> bool {
        use std::sync::mpsc::TryRecvError;
        let result = match self.answer.try_recv() {
            Ok(result) => result,
            Err(TryRecvError::Empty) => return false,
            Err(TryRecvError::Disconnected) => {
                Err(ApiError::internal_msg("the request was abandoned"))
            }
        };
        send(&mut self.stream, &result_response(self.endpoint, result));
        true
    }
}

/// The server loop: wait for the listener and the connections being read, accept, read what has
/// arrived, answer complete requests (now or later) and late ones (408), close.
fn serve(listener: UnixListener, path: &Path, mut handler: ApiHandler, limits: Limits) {
    info!("API server listening on {}", path.display());
    let mut pending: Vec<Pending> = Vec::new();
    let mut reading: Vec<Reading> = Vec::new();
    'serve: loop {
        let ready = wait_ready(&listener, &reading);
        if ready.first().copied().unwrap_or(false) {
            accept(&listener, &mut reading, limits);
        }
        let mut still = Vec::with_capacity(reading.len());
        for (index, mut conn) in std::mem::take(&mut reading).into_iter().enumerate() {
            let outcome = if ready.get(index + 1).copied().unwrap_or(false) {
                conn.advance()
            } else {
                Ok(None)
            };
            match outcome {
                Ok(Some(raw)) => match handle_request(conn.stream, raw, &mut handler) {
                    Flow::Continue => {}
                    Flow::Later(p) => pending.push(p),
                    // Connections still being read are closed with the server.
                    Flow::Stop => break 'serve,
                },
                Ok(None) if Instant::now() >= conn.deadline => {
                    debug!("API request timed out");
                    send(&mut conn.stream, &error_response(&ApiError::RequestTimeout));
                }
                Ok(None) => still.push(conn),
                Err(ReadError::Closed) => {}
                Err(ReadError::Reply(e)) => {
                    debug!("Bad API request: {}", e.message());
                    send(&mut conn.stream, &error_response(&e));
                }
            }
        }
        reading = still;
        pending.retain_mut(|p| !p.try_answer());
    }
    for mut p in pending {
        if !p.try_answer() {
            let e = ApiError::internal_msg("the VMM is shutting down");
            send(&mut p.stream, &error_response(&e));
        }
    }
    match fs::remove_file(path) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => {
            warn!("Cannot remove API socket {}: {e}", path.display())
        }
        _ => {}
    }
    info!("API server stopped");
}

/// Waits until the listener or a connection being read has something, a deadline passes, or
/// [`PENDING_POLL`] is up; says which are ready (the listener first, then `reading` in order).
fn wait_ready(listener: &UnixListener, reading: &[Reading]) -> Vec<bool> {
    use std::os::fd::AsRawFd;
    let now = Instant::now();
    let wait = reading
        .iter()
        .map(|r| r.deadline.saturating_duration_since(now))
        .fold(PENDING_POLL, Duration::min);
    let mut fds: Vec<libc::pollfd> = std::iter::once(listener.as_raw_fd())
        .chain(reading.iter().map(|r| r.stream.as_raw_fd()))
        .map(|fd| libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        })
        .collect();
    // Rounded up, so a deadline is never polled for 0 ms in a loop.
    let timeout_ms = libc::c_int::try_from(wait.as_millis() + 1).unwrap_or(libc::c_int::MAX);
    // SAFETY: `fds` is a valid array of initialized pollfds whose length we pass, alive across
    // the call; the descriptors belong to `listener` and `reading`, which outlive it.
    let ret = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, timeout_ms) };
    if ret < 0 {
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            warn!("API socket poll failed: {e}");
            // Out of memory and the like: do not spin.
            thread::sleep(Duration::from_millis(10));
        }
        return vec![false; fds.len()];
    }
    fds.iter().map(|p| p.revents != 0).collect()
}

/// Accepts one connection: read from now on, or answered 503 when [`MAX_CONNECTIONS`] are
/// being read already.
fn accept(listener: &UnixListener, reading: &mut Vec<Reading>, limits: Limits) {
    let mut stream = match listener.accept() {
        Ok((stream, _)) => stream,
        Err(e)
            if matches!(
                e.kind(),
                io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut | io::ErrorKind::Interrupted
            ) =>
        {
            return
        }
        Err(e) => {
            warn!("API socket accept failed: {e}");
            // Out of file descriptors and the like: do not spin.
            thread::sleep(Duration::from_millis(10));
            return;
        }
    };
    // Reads happen only once `poll` says data is there; the short read timeout is a backstop.
    let configured = stream
        .set_write_timeout(Some(limits.write_timeout))
        .and_then(|()| stream.set_read_timeout(Some(PENDING_POLL)));
    if let Err(e) = configured {
        warn!("Cannot set the API connection's timeouts: {e}");
        return;
    }
    if reading.len() >= MAX_CONNECTIONS {
        warn!("{MAX_CONNECTIONS} API connections are being read already; refusing one more");
        let busy = ApiError::TooManyConnections {
            limit: MAX_CONNECTIONS,
        };
        send(&mut stream, &error_response(&busy));
        return;
    }
    reading.push(Reading {
        stream,
        buf: Vec::with_capacity(1024),
        deadline: Instant::now() + limits.request_timeout,
        continue_sent: false,
    });
}

/// A connection whose request is still arriving.
struct Reading {
    stream: UnixStream,
    buf: Vec<u8>,
    /// When the whole request must have arrived.
    deadline: Instant,
    /// `100 Continue` was sent.
    continue_sent: bool,
}

impl Reading {
    /// Reads what has arrived (`poll` said something has, so this does not wait) and parses the
    /// request once it is complete.
    fn advance(&mut self) -> Result<Option<RawRequest>, ReadError> {
        read_some(
            &mut self.stream,
            &mut self.buf,
            MAX_HEADER_SIZE + MAX_BODY_SIZE,
        )?;
        match parse_request(&self.buf)? {
            Parsed::Complete(raw) => Ok(Some(raw)),
            Parsed::Incomplete { expect_continue } => {
                if expect_continue && !self.continue_sent {
                    // curl waits for this before sending a large body.
                    self.continue_sent = true;
                    if self
                        .stream
                        .write_all(b"HTTP/1.1 100 Continue\r\n\r\n")
                        .is_err()
                    {
                        return Err(ReadError::Closed);
                    }
                }
                Ok(None)
            }
        }
    }
}

enum Flow {
    Continue,
    /// Answer this connection once its result comes.
    Later(Pending),
    Stop,
}

/// A request as read from the socket.
#[derive(Debug)]
struct RawRequest {
    method: String,
    path: String,
    body: Vec<u8>,
}

/// Why no request could be read.
#[derive(Debug)]
enum ReadError {
    /// The client went away: nothing to answer.
    Closed,
    /// Answer with this error, then close.
    Reply(ApiError),
}

/// Handles a complete request and answers it (now, or later through [`Flow::Later`]).
fn handle_request(mut stream: UnixStream, raw: RawRequest, handler: &mut ApiHandler) -> Flow {
    let request = match routes::parse_request(&raw.method, &raw.path, &raw.body) {
        Ok(request) => request,
        Err(e) => {
            info!(
                "API request {} {} rejected: {}",
                raw.method,
                printable(&raw.path),
                e.message()
            );
            send(&mut stream, &error_response(&e));
            return Flow::Continue;
        }
    };
    info!("API request {} {}", raw.method, request.endpoint());
    if request == ApiRequest::VmmShutdown {
        // Answer first: the VMM may exit as soon as the handler returns.
        send(&mut stream, &response(204, None, None));
        drop(stream);
        if let ApiReply::Now(Err(e)) = call(handler, request) {
            error!("vmm.shutdown failed: {}", e.message());
        }
        return Flow::Stop;
    }
    let endpoint = request.endpoint();
    match call(handler, request) {
        ApiReply::Now(result) => {
            send(&mut stream, &result_response(endpoint, result));
            Flow::Continue
        }
        ApiReply::Accepted(body) => {
            send(&mut stream, &response(202, Some(&body), None));
            Flow::Continue
        }
        ApiReply::Later(answer) => Flow::Later(Pending {
            stream,
            endpoint,
            answer,
        }),
    }
}

/// The response to a handler's result.
fn result_response(endpoint: &str, result: ApiResult) -> Vec<u8> {
    match result {
        Ok(Some(body)) => response(200, Some(&body), None),
        Ok(None) => response(204, None, None),
        Err(e) => {
            info!("API request {endpoint} failed: {}", e.message());
            error_response(&e)
        }
    }
}

/// Calls the handler, turning a panic into a 500.
fn call(handler: &mut ApiHandler, request: ApiRequest) -> ApiReply {
    panic::catch_unwind(AssertUnwindSafe(|| handler(request))).unwrap_or_else(|_| {
        ApiReply::Now(Err(ApiError::internal_msg("the request handler panicked")))
    })
}

/// A request parsed so far.
enum Parsed {
    /// More is to come; `expect_continue` once the headers are in and ask for `100 Continue`.
    Incomplete {
        /// The client waits for `100 Continue` before it sends the body.
        expect_continue: bool,
    },
    /// The whole request.
    Complete(RawRequest),
}

/// Parses the bytes of a request received so far: headers up to [`MAX_HEADER_SIZE`], a body up
/// to [`MAX_BODY_SIZE`].
fn parse_request(buf: &[u8]) -> Result<Parsed, ReadError> {
    let Some(header_len) = find_header_end(buf) else {
        if buf.len() >= MAX_HEADER_SIZE {
            return Err(ReadError::Reply(ApiError::HeadersTooLarge));
        }
        return Ok(Parsed::Incomplete {
            expect_continue: false,
        });
    };
    if header_len > MAX_HEADER_SIZE {
        return Err(ReadError::Reply(ApiError::HeadersTooLarge));
    }

    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut parsed = httparse::Request::new(&mut headers);
    match parsed.parse(&buf[..header_len]) {
        Ok(httparse::Status::Complete(_)) => {}
        Ok(httparse::Status::Partial) => return Err(bad("malformed HTTP request")),
        Err(httparse::Error::TooManyHeaders) => {
            return Err(ReadError::Reply(ApiError::HeadersTooLarge))
        }
        Err(e) => return Err(bad(&format!("malformed HTTP request: {e}"))),
    }
    let method = parsed.method.unwrap_or_default().to_string();
    let path = parsed.path.unwrap_or_default().to_string();

    let mut content_length: Option<usize> = None;
    let mut expect_continue = false;
    for header in parsed.headers.iter() {
        let value = std::str::from_utf8(header.value).map(str::trim);
        if header.name.eq_ignore_ascii_case("content-length") {
            let length = value
                .ok()
                .and_then(crate::config::parse_decimal::<usize>)
                .ok_or_else(|| bad("invalid Content-Length"))?;
            if content_length.is_some_and(|l| l != length) {
                return Err(bad("conflicting Content-Length headers"));
            }
            content_length = Some(length);
        } else if header.name.eq_ignore_ascii_case("transfer-encoding") {
            return Err(ReadError::Reply(ApiError::Unsupported(
                "Transfer-Encoding (send a Content-Length)".to_string(),
            )));
        } else if header.name.eq_ignore_ascii_case("expect") {
            expect_continue = value.is_ok_and(|v| v.eq_ignore_ascii_case("100-continue"));
        }
    }
    let length = content_length.unwrap_or(0);
    if length > MAX_BODY_SIZE {
        return Err(ReadError::Reply(ApiError::PayloadTooLarge {
            limit: MAX_BODY_SIZE,
        }));
    }
    let body = &buf[header_len..];
    if body.len() < length {
        return Ok(Parsed::Incomplete { expect_continue });
    }
    // Bytes past the body (a pipelined request) are dropped: we answer one request per connection.
    Ok(Parsed::Complete(RawRequest {
        method,
        path,
        body: body[..length].to_vec(),
    }))
}

/// Reads what is available, up to `limit` bytes in `buf`.
fn read_some(stream: &mut UnixStream, buf: &mut Vec<u8>, limit: usize) -> Result<(), ReadError> {
    let mut chunk = [0u8; 4096];
    let want = chunk.len().min(limit.saturating_sub(buf.len())).max(1);
    loop {
        match stream.read(&mut chunk[..want]) {
            Ok(0) => return Err(ReadError::Closed),
            Ok(n) => {
                buf.extend_from_slice(&chunk[..n]);
                return Ok(());
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            // A wake-up with nothing to read after all: the deadline decides.
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                return Ok(())
            }
            Err(_) => return Err(ReadError::Closed),
        }
    }
}

/// Length of the request line and headers, including the blank line, once it is all in `buf`.
fn find_header_end(buf: &[u8]) -> Option<usize> {
    buf.windows(4).position(|w| w == b"\r\n\r\n").map(|p| p + 4)
}

fn bad(message: &str) -> ReadError {
    ReadError::Reply(ApiError::BadRequest(message.to_string()))
}

fn printable(text: &str) -> String {
    text.chars()
        .take(100)
        .map(|c| if c.is_control() { '?' } else { c })
        .collect()
}

fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        202 => "Accepted",
        204 => "No Content",
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        409 => "Conflict",
        413 => "Payload Too Large",
        431 => "Request Header Fields Too Large",
        500 => "Internal Server Error",
        501 => "Not Implemented",
        503 => "Service Unavailable",
        _ => "Unknown",
    }
}

/// Serializes a response. `allow` adds an `Allow` header (for 405).
fn response(status: u16, body: Option<&serde_json::Value>, allow: Option<&str>) -> Vec<u8> {
    let mut out = format!(
        "HTTP/1.1 {status} {}\r\nServer: cloud-hypervisor\r\nConnection: close\r\n",
        reason(status)
    );
    if let Some(allow) = allow {
        out.push_str(&format!("Allow: {allow}\r\n"));
    }
    let body = body.map(|b| b.to_string()).unwrap_or_default();
    if status != 204 {
        out.push_str(&format!(
            "Content-Type: application/json\r\nContent-Length: {}\r\n",
            body.len()
        ));
    }
    out.push_str("\r\n");
    out.push_str(&body);
    out.into_bytes()
}

fn error_response(e: &ApiError) -> Vec<u8> {
    let allow = match e {
        ApiError::MethodNotAllowed { allowed, .. } => Some(*allowed),
        _ => None,
    };
    response(e.status(), Some(&e.to_body()), allow)
}

/// Writes a response and closes our side; a client that went away is not an error.
fn send(stream: &mut UnixStream, bytes: &[u8]) {
    if let Err(e) = stream.write_all(bytes) {
        debug!("Cannot write the API response: {e}");
    }
    let _ = stream.shutdown(Shutdown::Write);
}

#[cfg(test)]
mod tests {
    use std::sync::mpsc;

    use super::*;
    use crate::api::client::{send_raw, send_request};

    fn socket_path(name: &str) -> PathBuf {
        std::env::temp_dir().join(format!("vmm-http-{}-{name}.sock", std::process::id()))
    }

    /// A handler that records requests and answers a few of them specially.
    fn handler(seen: mpsc::Sender<ApiRequest>) -> ApiHandler {
        Box::new(move |request| {
            let _ = seen.send(request.clone());
            match request {
                ApiRequest::VmmPing => Ok(Some(serde_json::json!({"version": "test"}))).into(),
                ApiRequest::VmInfo => {
                    Err(ApiError::InvalidState("VM is not created".into())).into()
                }
                ApiRequest::VmPause => panic!("handler bug"),
                _ => Ok(None).into(),
            }
        })
    }

    fn start(
        name: &str,
        seccomp: SeccompMode,
    ) -> (PathBuf, JoinHandle<()>, mpsc::Receiver<ApiRequest>) {
        let path = socket_path(name);
        let _ = fs::remove_file(&path);
        let (tx, rx) = mpsc::channel();
        let limits = Limits {
            request_timeout: Duration::from_millis(300),
            write_timeout: Duration::from_secs(1),
        };
        let thread = start_with_limits(&path, handler(tx), limits, seccomp).unwrap();
        (path, thread, rx)
    }

    /// Sends raw bytes, returns everything the server answers.
    fn raw(path: &Path, bytes: &[u8]) -> String {
        let mut stream = UnixStream::connect(path).unwrap();
        let _ = stream.write_all(bytes);
        let mut out = Vec::new();
        let _ = stream.read_to_end(&mut out);
        String::from_utf8_lossy(&out).into_owned()
    }

    fn ping_ok(path: &Path) {
        let r = send_request(path, &ApiRequest::VmmPing).unwrap();
        assert_eq!(r.status, 200);
        assert_eq!(r.body, br#"{"version":"test"}"#);
    }

    #[test]
    fn serves_and_survives_bad_requests() {
        serve_and_survive_bad_requests("serve", SeccompMode::Disabled);
    }

    /// The same under the http-server filter (a forbidden call would abort this test binary).
    #[test]
    fn serves_and_survives_bad_requests_under_its_seccomp_filter() {
        serve_and_survive_bad_requests("serve-seccomp", SeccompMode::Enabled);
    }

    fn serve_and_survive_bad_requests(name: &str, seccomp: SeccompMode) {
        let (path, thread, seen) = start(name, seccomp);
        let mode = fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);

        ping_ok(&path);
        assert_eq!(seen.recv().unwrap(), ApiRequest::VmmPing);
        assert_eq!(
            send_request(&path, &ApiRequest::VmBoot).unwrap().status,
            204
        );
        let r = send_request(&path, &ApiRequest::VmInfo).unwrap();
        assert_eq!(
            (r.status, r.error_message().as_str()),
            (409, "VM is not created")
        );
        // With RUST_BACKTRACE set, the panic hook would read this executable's debug
        // information, which the filter does not allow.
        let backtraces = std::env::var("RUST_BACKTRACE").is_ok_and(|v| v != "0");
        if seccomp == SeccompMode::Disabled || !backtraces {
            let r = send_request(&path, &ApiRequest::VmPause).unwrap();
            assert_eq!(
                (r.status, r.error_message().as_str()),
                (500, "the request handler panicked")
            );
        }
        ping_ok(&path);

        let cases: &[(&[u8], &str)] = &[
            (b"\x00\x01\x02garbage\r\n\r\n", "HTTP/1.1 400 "),
            (b"GET /api/v1/vm.nope HTTP/1.1\r\n\r\n", "HTTP/1.1 404 "),
            (b"GET /api/v1/vm.boot HTTP/1.1\r\n\r\n", "HTTP/1.1 405 "),
            (
                b"PUT /api/v1/vm.create HTTP/1.1\r\nContent-Length: 3\r\n\r\n{x}",
                "HTTP/1.1 400 ",
            ),
            (
                b"PUT /api/v1/vm.create HTTP/1.1\r\nContent-Length: 100000\r\n\r\n",
                "HTTP/1.1 413 ",
            ),
            (
                b"PUT /api/v1/vm.create HTTP/1.1\r\nContent-Length: -1\r\n\r\n",
                "HTTP/1.1 400 ",
            ),
            (
                b"PUT /api/v1/vm.create HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
                "HTTP/1.1 400 ",
            ),
            (
                b"PUT /api/v1/vm.create HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n",
                "HTTP/1.1 501 ",
            ),
            (b"GET /api/v1/vmm.ping HTTP/2.0\r\n\r\n", "HTTP/1.1 400 "),
            (b"GET /api/v1/vmm.ping HTTP/1.1\r\n", "HTTP/1.1 408 "),
            (
                b"PUT /api/v1/vm.resize HTTP/1.1\r\nContent-Length: 30\r\n\r\n{",
                "HTTP/1.1 408 ",
            ),
            (b"", "HTTP/1.1 408 "),
        ];
        for (request, expected) in cases {
            let answer = raw(&path, request);
            assert!(answer.starts_with(expected), "{request:?} -> {answer:?}");
            assert!(answer.contains("{\"error\":\""), "{answer}");
        }
        let answer = raw(&path, b"PUT /api/v1/vm.info HTTP/1.1\r\n\r\n");
        assert!(answer.contains("\r\nAllow: GET\r\n"), "{answer}");

        let mut huge = b"GET /api/v1/vmm.ping HTTP/1.1\r\nX-Big: ".to_vec();
        huge.resize(huge.len() + 2 * MAX_HEADER_SIZE, b'a');
        huge.extend_from_slice(b"\r\n\r\n");
        let answer = raw(&path, &huge);
        assert!(answer.starts_with("HTTP/1.1 431 "), "{answer}");
        assert!(answer.contains("{\"error\":\""), "{answer}");
        let many: String = (0..40).map(|i| format!("X-{i}: y\r\n")).collect();
        let answer = raw(
            &path,
            format!("GET /api/v1/vmm.ping HTTP/1.1\r\n{many}\r\n").as_bytes(),
        );
        assert!(answer.starts_with("HTTP/1.1 431 "), "{answer}");
        assert!(answer.contains("{\"error\":\""), "{answer}");

        // Clients that go away mid-request.
        for partial in [
            &b"GET /api/v1/vm"[..],
            b"PUT /api/v1/vm.resize HTTP/1.1\r\nContent-Length: 30\r\n\r\n{",
        ] {
            let mut stream = UnixStream::connect(&path).unwrap();
            stream.write_all(partial).unwrap();
            drop(stream);
        }
        // A client that never reads its answer.
        let mut stream = UnixStream::connect(&path).unwrap();
        stream
            .write_all(b"GET /api/v1/vmm.ping HTTP/1.1\r\n\r\n")
            .unwrap();
        drop(stream);

        // Expect: 100-continue, and a body in a second write.
        let mut stream = UnixStream::connect(&path).unwrap();
        let body = br#"{"desired_balloon": 4096}"#;
        let head = format!(
            "PUT /api/v1/vm.resize HTTP/1.1\r\nExpect: 100-continue\r\nContent-Length: {}\r\n\r\n",
            body.len()
        );
        stream.write_all(head.as_bytes()).unwrap();
        let mut interim = [0u8; 25];
        stream.read_exact(&mut interim).unwrap();
        assert_eq!(&interim, b"HTTP/1.1 100 Continue\r\n\r\n");
        stream.write_all(body).unwrap();
        let mut rest = String::new();
        stream.read_to_string(&mut rest).unwrap();
        assert!(rest.starts_with("HTTP/1.1 204 "), "{rest}");

        ping_ok(&path);
        let handled: Vec<ApiRequest> = seen.try_iter().collect();
        assert!(
            handled.contains(&ApiRequest::VmResize(crate::config::VmResizeData {
                desired_balloon: Some(4096),
                ..Default::default()
            }))
        );

        // vmm.shutdown: answered, handed to the handler, then the server stops.
        let r = send_raw(&path, "PUT", "/api/v1/vmm.shutdown", None).unwrap();
        assert_eq!(r.status, 204);
        thread.join().unwrap();
        assert_eq!(seen.try_iter().last(), Some(ApiRequest::VmmShutdown));
        assert!(!path.exists());
    }

    #[test]
    fn socket_file_handling() {
        let path = socket_path("stale");
        let _ = fs::remove_file(&path);
        // A socket nobody listens on any more is replaced.
        drop(UnixListener::bind(&path).unwrap());
        assert!(path.exists());
        let (tx, _rx) = mpsc::channel();
        let thread = start_http_server(&path, handler(tx), SeccompMode::Disabled).unwrap();
        ping_ok(&path);

        // A live one is not.
        let (tx, _rx) = mpsc::channel();
        let e = start_http_server(&path, handler(tx), SeccompMode::Disabled).unwrap_err();
        assert!(matches!(e, HttpServerError::InUse { .. }), "{e}");
        ping_ok(&path);
        send_request(&path, &ApiRequest::VmmShutdown).unwrap();
        thread.join().unwrap();

        // Nor is a regular file.
        fs::write(&path, b"precious").unwrap();
        let (tx, _rx) = mpsc::channel();
        let e = start_http_server(&path, handler(tx), SeccompMode::Disabled).unwrap_err();
        assert!(matches!(e, HttpServerError::NotASocket { .. }), "{e}");
        assert_eq!(fs::read(&path).unwrap(), b"precious");
        fs::remove_file(&path).unwrap();

        let (tx, _rx) = mpsc::channel();
        let e = start_http_server(
            Path::new("/nonexistent/dir/api.sock"),
            handler(tx),
            SeccompMode::Disabled,
        )
        .unwrap_err();
        assert!(matches!(e, HttpServerError::Bind { .. }), "{e}");
    }

    #[test]
    fn a_request_answered_later_does_not_hold_the_server() {
        let path = socket_path("later");
        let _ = fs::remove_file(&path);
        let (later_tx, later_rx) = mpsc::channel();
        let handler: ApiHandler = Box::new(move |request| match request {
            ApiRequest::VmReceiveMigration(_) => {
                let (answer_tx, answer_rx) = mpsc::channel();
                let _ = later_tx.send(answer_tx);
                ApiReply::Later(answer_rx)
            }
            ApiRequest::VmmPing => Ok(Some(serde_json::json!({"version": "test"}))).into(),
            _ => Ok(None).into(),
        });
        let thread = start_http_server(&path, handler, SeccompMode::Enabled).unwrap();
        let receive = |path: PathBuf| {
            thread::spawn(move || {
                let data = crate::config::ReceiveMigrationData::parse("unix:/tmp/x").unwrap();
                send_request(&path, &ApiRequest::VmReceiveMigration(data)).unwrap()
            })
        };
        let waiting = receive(path.clone());
        let answer = later_rx.recv().unwrap();
        // The server answers others while the first request waits.
        ping_ok(&path);
        ping_ok(&path);
        assert!(!waiting.is_finished());
        answer
            .send(Err(ApiError::internal_msg("incoming migration failed")))
            .unwrap();
        let r = waiting.join().unwrap();
        assert_eq!(
            (r.status, r.error_message().as_str()),
            (500, "incoming migration failed")
        );
        // A result that never comes (the sender dropped) is an error, not a hang.
        let waiting = receive(path.clone());
        drop(later_rx.recv().unwrap());
        assert_eq!(waiting.join().unwrap().status, 500);
        // Still waiting when the server stops: answered too.
        let waiting = receive(path.clone());
        let _answer = later_rx.recv().unwrap();
        send_request(&path, &ApiRequest::VmmShutdown).unwrap();
        thread.join().unwrap();
        let r = waiting.join().unwrap();
        assert_eq!(
            (r.status, r.error_message().as_str()),
            (500, "the VMM is shutting down")
        );
    }

    /// Clients that send half a request and stall hold only their own connections: others are
    /// answered at once, the stalled ones get a 408 with a JSON body at their deadline, and
    /// beyond [`MAX_CONNECTIONS`] a new connection is answered 503 at once.
    #[test]
    fn a_slow_client_does_not_hold_the_others() {
        let path = socket_path("slow");
        let _ = fs::remove_file(&path);
        let (tx, _rx) = mpsc::channel();
        let request_timeout = Duration::from_secs(4);
        let limits = Limits {
            request_timeout,
            write_timeout: Duration::from_secs(1),
        };
        let thread = start_with_limits(&path, handler(tx), limits, SeccompMode::Enabled).unwrap();
        let stall = |bytes: &[u8]| {
            let mut stream = UnixStream::connect(&path).unwrap();
            stream.write_all(bytes).unwrap();
            stream
        };
        let started = Instant::now();
        let mut slow = vec![
            stall(b""),
            stall(b"GET /api/v1/vm"),
            stall(b"PUT /api/v1/vm.resize HTTP/1.1\r\nContent-Length: 30\r\n\r\n{"),
        ];
        for _ in 0..3 {
            let asked = Instant::now();
            ping_ok(&path);
            assert!(
                asked.elapsed() < request_timeout / 2,
                "a ping took {:?} next to stalled clients",
                asked.elapsed()
            );
        }
        for stream in &mut slow {
            let mut answer = String::new();
            stream.read_to_string(&mut answer).unwrap();
            assert!(answer.starts_with("HTTP/1.1 408 "), "{answer}");
            assert!(answer.contains("{\"error\":\""), "{answer}");
        }
        assert!(started.elapsed() >= request_timeout);

        // As many stalled clients as the server reads at once: one more is refused at once.
        let held: Vec<UnixStream> = (0..MAX_CONNECTIONS).map(|_| stall(b"GET /")).collect();
        let asked = Instant::now();
        let answer = raw(&path, b"GET /api/v1/vmm.ping HTTP/1.1\r\n\r\n");
        assert!(answer.starts_with("HTTP/1.1 503 "), "{answer}");
        assert!(answer.contains("{\"error\":\""), "{answer}");
        assert!(asked.elapsed() < request_timeout / 2);
        drop(held);
        let deadline = Instant::now() + request_timeout;
        loop {
            let r = send_request(&path, &ApiRequest::VmmPing).unwrap();
            if r.status == 200 {
                break;
            }
            assert!(Instant::now() < deadline, "the server never recovered");
            thread::sleep(Duration::from_millis(20));
        }
        send_request(&path, &ApiRequest::VmmShutdown).unwrap();
        thread.join().unwrap();
    }
}

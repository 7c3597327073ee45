//! Migration transports: `unix:<path>` and `tcp:<host>:<port>` URLs, connecting (source) and
//! accepting one connection (destination).
//!
//! Streams get read and write timeouts, so a peer that vanishes produces an error instead of a
//! hang; TCP streams get `TCP_NODELAY`, since every request waits for a small response.
//! [`MigrationStream`] implements `Read`/`Write` and vm-memory's `ReadVolatile`/
//! `WriteVolatile`, so pages move between the socket and guest memory without a copy.

use std::fmt;
use std::io::{self, Read, Write};
use std::net::{TcpListener, TcpStream, ToSocketAddrs};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, RawFd};
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use thiserror::Error;

use crate::tls::TlsStream;
use vm_memory::bitmap::BitmapSlice;
use vm_memory::{ReadVolatile, VolatileMemoryError, VolatileSlice, WriteVolatile};

/// Default read/write timeout on migration streams.
pub const DEFAULT_IO_TIMEOUT: Duration = Duration::from_secs(60);

/// How long [`MigrationStream::connect`] keeps retrying a destination that is not listening yet.
pub const LISTEN_GRACE: Duration = Duration::from_secs(2);

/// Errors parsing URLs or opening migration connections.
#[derive(Debug, Error)]
pub enum TransportError {
    /// The URL has no known scheme.
    #[error("unsupported migration URL {0:?}: expected unix:<path> or tcp:<host>:<port>")]
    UnsupportedUrl(String),
    /// A `unix:` URL with an empty path.
    #[error("migration URL {0:?} has an empty socket path")]
    EmptyPath(String),
    /// A `tcp:` URL without a valid `host:port`.
    #[error("migration URL {0:?} needs tcp:<host>:<port> with a port from 1 to 65535")]
    BadTcpAddress(String),
    /// Resolving the TCP host failed.
    #[error("cannot resolve {host}:{port}")]
    Resolve {
        /// Host name.
        host: String,
        /// Port.
        port: u16,
        /// The failure.
        #[source]
        source: io::Error,
    },
    /// Connecting failed.
    #[error("cannot connect to {url}")]
    Connect {
        /// The destination.
        url: MigrationUrl,
        /// The failure (of the last address tried).
        #[source]
        source: io::Error,
    },
    /// Binding the listening socket failed.
    #[error("cannot listen on {url}")]
    Bind {
        /// The address.
        url: MigrationUrl,
        /// The failure.
        #[source]
        source: io::Error,
    },
    /// The UNIX socket path exists and is not a socket.
    #[error("{0} exists and is not a socket")]
    NotASocket(PathBuf),
    /// Waiting for or accepting the connection failed.
    #[error("failed to accept a migration connection")]
    Accept(#[source] io::Error),
    /// No connection arrived in time.
    #[error("no migration connection arrived within {0:?}")]
    AcceptTimeout(Duration),
    /// Setting socket options failed.
    #[error("failed to configure the migration socket")]
    Configure(#[source] io::Error),
}

/// Where to send a migration to, or receive it from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum MigrationUrl {
    /// `unix:<path>`.
    Unix(PathBuf),
    /// `tcp:<host>:<port>`; an IPv6 host is written in brackets.
    Tcp {
        /// Host name or address (without brackets).
        host: String,
        /// Port.
        port: u16,
    },
}

impl FromStr for MigrationUrl {
    type Err = TransportError;

    fn from_str(url: &str) -> Result<Self, TransportError> {
        if let Some(path) = url.strip_prefix("unix:") {
            if path.is_empty() {
                return Err(TransportError::EmptyPath(url.to_owned()));
            }
            return Ok(MigrationUrl::Unix(PathBuf::from(path)));
        }
        if let Some(addr) = url.strip_prefix("tcp:") {
            let bad = || TransportError::BadTcpAddress(url.to_owned());
            let (host, port) = addr.rsplit_once(':').ok_or_else(bad)?;
            let port: u16 = port.parse().map_err(|_| bad())?;
            let host = match host.strip_prefix('[') {
                Some(inner) => inner.strip_suffix(']').ok_or_else(bad)?,
                None if host.contains(':') => return Err(bad()),
                None => host,
            };
            if host.is_empty() || port == 0 {
                return Err(bad());
            }
            return Ok(MigrationUrl::Tcp {
                host: host.to_owned(),
                port,
            });
        }
        Err(TransportError::UnsupportedUrl(url.to_owned()))
    }
}

impl fmt::Display for MigrationUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            MigrationUrl::Unix(path) => write!(f, "unix:{}", path.display()),
            MigrationUrl::Tcp { host, port } if host.contains(':') => {
                write!(f, "tcp:[{host}]:{port}")
            }
            MigrationUrl::Tcp { host, port } => write!(f, "tcp:{host}:{port}"),
        }
    }
}

/// A connected migration stream.
#[derive(Debug)]
pub enum MigrationStream {
    /// Over a UNIX socket (required for local mode's descriptor passing).
    Unix(UnixStream),
    /// Over TCP.
    Tcp(TcpStream),
    /// Over TLS on TCP (`tls_dir=`), see [`crate::tls`].
    Tls(Box<TlsStream>),
}

impl MigrationStream {
    /// Connects to `url`, giving up after `timeout`, and sets read/write timeouts of
    /// `io_timeout`. A destination that is not listening yet (connection refused, no socket
    /// file) is retried for up to [`LISTEN_GRACE`] of that time, so a receiver started a moment
    /// earlier does not lose the race.
    pub fn connect(
        url: &MigrationUrl,
        timeout: Duration,
        io_timeout: Option<Duration>,
    ) -> Result<Self, TransportError> {
        let deadline = std::time::Instant::now() + timeout.min(LISTEN_GRACE);
        loop {
            match Self::connect_once(url, timeout, io_timeout) {
                Err(TransportError::Connect { source, .. })
                    if matches!(
                        source.kind(),
                        io::ErrorKind::ConnectionRefused | io::ErrorKind::NotFound
                    ) && std::time::Instant::now() < deadline =>
                {
                    std::thread::sleep(Duration::from_millis(20));
                }
                other => return other,
            }
        }
    }

    fn connect_once(
        url: &MigrationUrl,
        timeout: Duration,
        io_timeout: Option<Duration>,
    ) -> Result<Self, TransportError> {
        let connect_err = |source| TransportError::Connect {
            url: url.clone(),
            source,
        };
        let stream = match url {
            MigrationUrl::Unix(path) => {
                MigrationStream::Unix(UnixStream::connect(path).map_err(connect_err)?)
            }
            MigrationUrl::Tcp { host, port } => {
                let addrs = (host.as_str(), *port).to_socket_addrs().map_err(|source| {
                    TransportError::Resolve {
                        host: host.clone(),
                        port: *port,
                        source,
                    }
                })?;
                let mut last = io::Error::new(io::ErrorKind::NotFound, "no address for host");
                let mut connected = None;
                for addr in addrs {
                    match TcpStream::connect_timeout(&addr, timeout) {
                        Ok(s) => {
                            connected = Some(s);
                            break;
                        }
                        Err(e) => last = e,
                    }
                }
                MigrationStream::Tcp(connected.ok_or_else(|| connect_err(last))?)
            }
        };
        stream.configure(io_timeout)?;
        Ok(stream)
    }

    /// Sets TCP_NODELAY (TCP) and the read/write timeouts (`None`: wait forever).
    pub fn configure(&self, io_timeout: Option<Duration>) -> Result<(), TransportError> {
        let res = match self {
            MigrationStream::Unix(s) => s
                .set_read_timeout(io_timeout)
                .and_then(|_| s.set_write_timeout(io_timeout)),
            MigrationStream::Tcp(s) => s
                .set_nodelay(true)
                .and_then(|_| s.set_read_timeout(io_timeout))
                .and_then(|_| s.set_write_timeout(io_timeout)),
            MigrationStream::Tls(s) => s
                .tcp()
                .set_nodelay(true)
                .and_then(|_| s.tcp().set_read_timeout(io_timeout))
                .and_then(|_| s.tcp().set_write_timeout(io_timeout)),
        };
        res.map_err(TransportError::Configure)
    }

    /// The UNIX socket, for descriptor passing in local mode.
    pub fn as_unix(&self) -> Option<&UnixStream> {
        match self {
            MigrationStream::Unix(s) => Some(s),
            MigrationStream::Tcp(_) | MigrationStream::Tls(_) => None,
        }
    }

    /// Shuts down both directions, waking a peer blocked on this connection.
    pub fn shutdown(&self) -> io::Result<()> {
        match self {
            MigrationStream::Unix(s) => s.shutdown(std::net::Shutdown::Both),
            MigrationStream::Tcp(s) => s.shutdown(std::net::Shutdown::Both),
            MigrationStream::Tls(s) => s.tcp().shutdown(std::net::Shutdown::Both),
        }
    }
}

/// Whether an I/O error is a read/write timeout (what a vanished peer looks like).
pub fn is_timeout(err: &io::Error) -> bool {
    matches!(
        err.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
    )
}

impl From<UnixStream> for MigrationStream {
    fn from(s: UnixStream) -> Self {
        MigrationStream::Unix(s)
    }
}

impl From<TcpStream> for MigrationStream {
    fn from(s: TcpStream) -> Self {
        MigrationStream::Tcp(s)
    }
}

impl AsFd for MigrationStream {
    fn as_fd(&self) -> BorrowedFd<'_> {
        match self {
            MigrationStream::Unix(s) => s.as_fd(),
            MigrationStream::Tcp(s) => s.as_fd(),
            MigrationStream::Tls(s) => s.tcp().as_fd(),
        }
    }
}

impl AsRawFd for MigrationStream {
    fn as_raw_fd(&self) -> RawFd {
        self.as_fd().as_raw_fd()
    }
}

impl Read for MigrationStream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            MigrationStream::Unix(s) => s.read(buf),
            MigrationStream::Tcp(s) => s.read(buf),
            MigrationStream::Tls(s) => s.read(buf),
        }
    }
}

impl Write for MigrationStream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            MigrationStream::Unix(s) => s.write(buf),
            MigrationStream::Tcp(s) => s.write(buf),
            MigrationStream::Tls(s) => s.write(buf),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match self {
            MigrationStream::Unix(s) => s.flush(),
            MigrationStream::Tcp(s) => s.flush(),
            MigrationStream::Tls(s) => s.flush(),
        }
    }
}

impl ReadVolatile for MigrationStream {
    fn read_volatile<B: BitmapSlice>(
        &mut self,
        buf: &mut VolatileSlice<B>,
    ) -> Result<usize, VolatileMemoryError> {
        match self {
            MigrationStream::Unix(s) => s.read_volatile(buf),
            MigrationStream::Tcp(s) => s.read_volatile(buf),
            MigrationStream::Tls(s) => s.read_volatile(buf),
        }
    }
}

impl WriteVolatile for MigrationStream {
    fn write_volatile<B: BitmapSlice>(
        &mut self,
        buf: &VolatileSlice<B>,
    ) -> Result<usize, VolatileMemoryError> {
        match self {
            MigrationStream::Unix(s) => s.write_volatile(buf),
            MigrationStream::Tcp(s) => s.write_volatile(buf),
            MigrationStream::Tls(s) => s.write_volatile(buf),
        }
    }
}

/// A listening socket that accepts exactly one migration connection.
#[derive(Debug)]
pub enum MigrationListener {
    /// A UNIX socket; its path is removed when the listener is dropped.
    Unix(UnixListener, PathBuf),
    /// A TCP socket.
    Tcp(TcpListener),
}

impl MigrationListener {
    /// Binds to `url`. A stale UNIX socket file at the path is replaced; any other kind of file
    /// is left alone and reported.
    pub fn bind(url: &MigrationUrl) -> Result<Self, TransportError> {
        let bind_err = |source| TransportError::Bind {
            url: url.clone(),
            source,
        };
        match url {
            MigrationUrl::Unix(path) => {
                remove_stale_socket(path)?;
                let listener = UnixListener::bind(path).map_err(bind_err)?;
                Ok(MigrationListener::Unix(listener, path.clone()))
            }
            MigrationUrl::Tcp { host, port } => {
                let listener = TcpListener::bind((host.as_str(), *port)).map_err(bind_err)?;
                Ok(MigrationListener::Tcp(listener))
            }
        }
    }

    /// The bound TCP port (useful after binding port 0 in tests); `None` for UNIX sockets.
    pub fn tcp_port(&self) -> Option<u16> {
        match self {
            MigrationListener::Tcp(l) => l.local_addr().ok().map(|a| a.port()),
            MigrationListener::Unix(..) => None,
        }
    }

    /// Waits up to `timeout` (`None`: forever) for one connection, accepts it, and configures
    /// it with `io_timeout`. The listener is consumed: a migration has one connection.
    pub fn accept_one(
        self,
        timeout: Option<Duration>,
        io_timeout: Option<Duration>,
    ) -> Result<MigrationStream, TransportError> {
        self.accept(timeout, io_timeout)
    }

    /// Like [`MigrationListener::accept_one`], keeping the listener for more connections
    /// (`connections=<n>`).
    pub fn accept(
        &self,
        timeout: Option<Duration>,
        io_timeout: Option<Duration>,
    ) -> Result<MigrationStream, TransportError> {
        wait_readable(self.as_fd(), timeout)?;
        let stream = match self {
            MigrationListener::Unix(l, _) => {
                MigrationStream::Unix(l.accept().map_err(TransportError::Accept)?.0)
            }
            MigrationListener::Tcp(l) => {
                MigrationStream::Tcp(l.accept().map_err(TransportError::Accept)?.0)
            }
        };
        stream.configure(io_timeout)?;
        Ok(stream)
    }
}

impl AsFd for MigrationListener {
    fn as_fd(&self) -> BorrowedFd<'_> {
        match self {
            MigrationListener::Unix(l, _) => l.as_fd(),
            MigrationListener::Tcp(l) => l.as_fd(),
        }
    }
}

impl Drop for MigrationListener {
    fn drop(&mut self) {
        if let MigrationListener::Unix(_, path) = self {
            let _ = std::fs::remove_file(path);
        }
    }
}

fn remove_stale_socket(path: &Path) -> Result<(), TransportError> {
    match std::fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_socket() => {
            std::fs::remove_file(path).map_err(|source| TransportError::Bind {
                url: MigrationUrl::Unix(path.to_owned()),
                source,
            })
        }
        Ok(_) => Err(TransportError::NotASocket(path.to_owned())),
        Err(_) => Ok(()),
    }
}

/// Waits until `fd` is readable (a connection is pending), up to `timeout`.
fn wait_readable(fd: BorrowedFd<'_>, timeout: Option<Duration>) -> Result<(), TransportError> {
    let timeout_ms = match timeout {
        None => -1,
        Some(t) => libc::c_int::try_from(t.as_millis()).unwrap_or(libc::c_int::MAX),
    };
    loop {
        let mut pfd = libc::pollfd {
            fd: fd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: `pfd` is one valid, initialized pollfd that lives across the call, and we
        // pass a count of 1; `fd` is borrowed, so it stays open during the call.
        let ret = unsafe { libc::poll(&mut pfd, 1, timeout_ms) };
        match ret {
            0 => return Err(TransportError::AcceptTimeout(timeout.unwrap_or_default())),
            n if n > 0 => return Ok(()),
            _ => {
                let err = io::Error::last_os_error();
                if err.kind() != io::ErrorKind::Interrupted {
                    return Err(TransportError::Accept(err));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::thread;
    use std::time::Instant;

    #[test]
    fn parse_urls() {
        assert_eq!(
            "unix:/tmp/m.sock".parse::<MigrationUrl>().unwrap(),
            MigrationUrl::Unix("/tmp/m.sock".into())
        );
        assert_eq!(
            "tcp:127.0.0.1:6000".parse::<MigrationUrl>().unwrap(),
            MigrationUrl::Tcp {
                host: "127.0.0.1".into(),
                port: 6000
            }
        );
        let v6: MigrationUrl = "tcp:[::1]:7".parse().unwrap();
        assert_eq!(
            v6,
            MigrationUrl::Tcp {
                host: "::1".into(),
                port: 7
            }
        );
        for url in ["unix:/a/b", "tcp:host:1", "tcp:[::1]:7"] {
            assert_eq!(url.parse::<MigrationUrl>().unwrap().to_string(), url);
        }
    }

    #[test]
    fn parse_rejects() {
        for url in ["", "/tmp/x", "http://x", "udp:1.2.3.4:5", "unix"] {
            assert!(matches!(
                url.parse::<MigrationUrl>(),
                Err(TransportError::UnsupportedUrl(_))
            ));
        }
        assert!(matches!(
            "unix:".parse::<MigrationUrl>(),
            Err(TransportError::EmptyPath(_))
        ));
        for url in [
            "tcp:host",
            "tcp::80",
            "tcp:host:0",
            "tcp:host:65536",
            "tcp:host:x",
            "tcp:::1:80",
            "tcp:[::1:80",
        ] {
            assert!(
                matches!(
                    url.parse::<MigrationUrl>(),
                    Err(TransportError::BadTcpAddress(_))
                ),
                "{url}"
            );
        }
    }

    #[test]
    fn unix_connect_accept_and_timeout() {
        let dir = vmm_sys_util::tempdir::TempDir::new().unwrap();
        let path = dir.as_path().join("mig.sock");
        let url = MigrationUrl::Unix(path.clone());
        // A stale socket file is replaced.
        drop(UnixListener::bind(&path).unwrap());
        let listener = MigrationListener::bind(&url).unwrap();
        let client = thread::spawn({
            let url = url.clone();
            move || {
                let mut s = MigrationStream::connect(
                    &url,
                    Duration::from_secs(5),
                    Some(DEFAULT_IO_TIMEOUT),
                )
                .unwrap();
                s.write_all(b"ping").unwrap();
                s
            }
        });
        let mut server = listener
            .accept_one(
                Some(Duration::from_secs(5)),
                Some(Duration::from_millis(100)),
            )
            .unwrap();
        assert!(!path.exists(), "socket path removed with the listener");
        let _client = client.join().unwrap();
        let mut buf = [0u8; 4];
        server.read_exact(&mut buf).unwrap();
        assert_eq!(&buf, b"ping");
        assert!(server.as_unix().is_some());
        // The peer sends nothing more: the read times out instead of hanging.
        let start = Instant::now();
        let err = server.read_exact(&mut buf).unwrap_err();
        assert!(is_timeout(&err), "{err:?}");
        assert!(start.elapsed() < Duration::from_secs(5));
    }

    #[test]
    fn tcp_connect_accept() {
        // Port 0 (any free port) is not a valid URL, but binding it is handy here.
        let url = MigrationUrl::Tcp {
            host: "127.0.0.1".into(),
            port: 0,
        };
        let listener = MigrationListener::bind(&url).unwrap();
        let port = listener.tcp_port().unwrap();
        let client = thread::spawn(move || {
            let url = MigrationUrl::Tcp {
                host: "127.0.0.1".into(),
                port,
            };
            let mut s = MigrationStream::connect(&url, Duration::from_secs(5), None).unwrap();
            s.write_all(b"hi").unwrap();
        });
        let mut server = listener
            .accept_one(Some(Duration::from_secs(5)), Some(DEFAULT_IO_TIMEOUT))
            .unwrap();
        let mut buf = [0u8; 2];
        server.read_exact(&mut buf).unwrap();
        client.join().unwrap();
        assert_eq!(&buf, b"hi");
        assert!(server.as_unix().is_none());
        // The peer is gone: end of stream, not a hang.
        assert_eq!(server.read(&mut buf).unwrap(), 0);
    }

    #[test]
    fn accept_times_out_and_connect_fails_cleanly() {
        let dir = vmm_sys_util::tempdir::TempDir::new().unwrap();
        let url = MigrationUrl::Unix(dir.as_path().join("idle.sock"));
        let listener = MigrationListener::bind(&url).unwrap();
        assert!(matches!(
            listener.accept_one(Some(Duration::from_millis(20)), None),
            Err(TransportError::AcceptTimeout(_))
        ));
        assert!(matches!(
            MigrationStream::connect(&url, Duration::from_secs(1), None),
            Err(TransportError::Connect { .. })
        ));
        let file = dir.as_path().join("plain");
        std::fs::write(&file, b"x").unwrap();
        assert!(matches!(
            MigrationListener::bind(&MigrationUrl::Unix(file)),
            Err(TransportError::NotASocket(_))
        ));
    }
}

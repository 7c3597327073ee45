//! Encrypted, mutually authenticated migration streams: TLS 1.3 over TCP with `rustls`.
//!
//! Both VMMs are given the same kind of directory (`tls_dir=<dir>`, as Cloud Hypervisor and
//! QEMU take it), holding PEM files with fixed names:
//!
//! | file | used by |
//! |---|---|
//! | `ca-cert.pem` | both: the only CA a peer's certificate may chain to |
//! | `server-cert.pem`, `server-key.pem` | the destination (`receive-migration`, TLS server) |
//! | `client-cert.pem`, `client-key.pem` | the source (`send-migration`, TLS client) |
//!
//! ```text
//!  source (TLS client)                              destination (TLS server)
//!  TCP connect ───────────────────────────────────▶ accept
//!  ClientHello ───────────────────────────────────▶
//!            ◀─ ServerHello, server-cert.pem, CertificateRequest
//!  checks: chains to ca-cert.pem, valid for the URL's host
//!  client-cert.pem, Finished ─────────────────────▶ checks: chains to ca-cert.pem
//!  the migration protocol, unchanged, inside the encrypted stream
//! ```
//!
//! The name checked in the destination's certificate is the host part of the
//! `destination_url` (a DNS name or an IP address), as QEMU does by default; the destination
//! checks only that the source's certificate chains to the CA. In TLS 1.3 the client finishes
//! its handshake before the server has judged the client certificate, so a refused source
//! learns it from the alert on its first read; [`TlsStream`] turns that alert into a sentence.
//!
//! Crypto provider: `ring`. It builds with the C compiler alone (`aws-lc-rs` needs CMake,
//! which these machines do not have), its AES-GCM uses AES-NI and PCLMULQDQ, and it draws
//! randomness with the `getrandom` system call only, which every seccomp list here allows.
//! Cipher suites: TLS 1.3 only; AES-128-GCM first (the fastest with AES-NI), then AES-256-GCM
//! and ChaCha20-Poly1305.

use std::fmt;
use std::io::{self, BufRead, Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::client::WebPkiServerVerifier;
use rustls::crypto::CryptoProvider;
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, ClientConnection, Connection, RootCertStore, ServerConfig};
use rustls::{ServerConnection, SupportedCipherSuite};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use thiserror::Error;
use vm_memory::bitmap::BitmapSlice;
use vm_memory::{ReadVolatile, VolatileMemoryError, VolatileSlice, WriteVolatile};

use crate::transport::{MigrationStream, MigrationUrl};

/// The CA certificate both sides trust.
pub const CA_CERT_FILE: &str = "ca-cert.pem";
/// The destination's certificate.
pub const SERVER_CERT_FILE: &str = "server-cert.pem";
/// The destination's private key.
pub const SERVER_KEY_FILE: &str = "server-key.pem";
/// The source's certificate.
pub const CLIENT_CERT_FILE: &str = "client-cert.pem";
/// The source's private key.
pub const CLIENT_KEY_FILE: &str = "client-key.pem";

/// Plaintext rustls may hold before it must be written out (per connection).
const BUFFER_LIMIT: usize = 4 << 20;
/// Size of the bounce buffer between guest memory and the TLS stream.
const BOUNCE_BYTES: usize = 256 << 10;
/// Ciphertext read from the socket per `read` call (rustls asks for 4 KiB at a time).
const READ_AHEAD_BYTES: usize = 256 << 10;

/// Errors loading TLS files or setting up an encrypted stream.
#[derive(Debug, Error)]
pub enum TlsError {
    /// A file could not be read.
    #[error("cannot read {}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// The failure.
        #[source]
        source: io::Error,
    },
    /// A file is not valid PEM, or holds none of what it should.
    #[error("{} holds no valid PEM {what}", path.display())]
    Pem {
        /// The file.
        path: PathBuf,
        /// What it should hold.
        what: &'static str,
        /// The failure.
        #[source]
        source: rustls_pki_types::pem::Error,
    },
    /// The CA certificate cannot be used as a trust anchor.
    #[error("{} is not a usable CA certificate", path.display())]
    Ca {
        /// The file.
        path: PathBuf,
        /// The failure.
        #[source]
        source: rustls::Error,
    },
    /// The certificate and key do not make a usable TLS configuration.
    #[error("the TLS files in {} cannot be used", dir.display())]
    Config {
        /// The directory.
        dir: PathBuf,
        /// The failure.
        #[source]
        source: rustls::Error,
    },
    /// The CA cannot verify client certificates.
    #[error("the CA in {} cannot verify client certificates", dir.display())]
    Verifier {
        /// The directory.
        dir: PathBuf,
        /// The failure.
        #[source]
        source: rustls::server::VerifierBuilderError,
    },
    /// The host of the URL is not a name a certificate can be checked against.
    #[error("{0:?} is not a valid TLS server name")]
    ServerName(String),
    /// The handshake failed: refused, or the peer is not who it should be.
    #[error("TLS handshake with the {peer} failed: {reason}")]
    Handshake {
        /// Which peer.
        peer: Peer,
        /// What went wrong, in words.
        reason: String,
    },
    /// TLS runs over TCP only.
    #[error("TLS (tls_dir) needs a tcp: migration URL")]
    NeedsTcp,
    /// The connection failed during the handshake.
    #[error("TLS handshake with the {peer} failed")]
    HandshakeIo {
        /// Which peer.
        peer: Peer,
        /// The failure.
        #[source]
        source: io::Error,
    },
}

/// The other end of a TLS stream, for messages.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Peer {
    /// The sending VMM (the TLS client).
    Source,
    /// The receiving VMM (the TLS server).
    Destination,
}

impl fmt::Display for Peer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Peer::Source => "source",
            Peer::Destination => "destination",
        })
    }
}

/// The crypto provider: `ring`, TLS 1.3 suites only, AES-128-GCM preferred.
fn provider() -> Arc<CryptoProvider> {
    use rustls::crypto::ring::cipher_suite as suite;
    let mut provider = rustls::crypto::ring::default_provider();
    let suites: [SupportedCipherSuite; 3] = [
        suite::TLS13_AES_128_GCM_SHA256,
        suite::TLS13_AES_256_GCM_SHA384,
        suite::TLS13_CHACHA20_POLY1305_SHA256,
    ];
    provider.cipher_suites = suites.to_vec();
    Arc::new(provider)
}

fn read_file(path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read {
        path: path.to_owned(),
        source,
    })
}

fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let pem = read_file(path)?;
    let pem_err = |source| TlsError::Pem {
        path: path.to_owned(),
        what: "certificate",
        source,
    };
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(pem_err)?;
    if certs.is_empty() {
        return Err(pem_err(rustls_pki_types::pem::Error::NoItemsFound));
    }
    Ok(certs)
}

fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    let pem = read_file(path)?;
    PrivateKeyDer::from_pem_slice(&pem).map_err(|source| TlsError::Pem {
        path: path.to_owned(),
        what: "private key",
        source,
    })
}

fn load_roots(dir: &Path) -> Result<Arc<RootCertStore>, TlsError> {
    let path = dir.join(CA_CERT_FILE);
    let mut roots = RootCertStore::empty();
    for cert in load_certs(&path)? {
        roots.add(cert).map_err(|source| TlsError::Ca {
            path: path.clone(),
            source,
        })?;
    }
    Ok(Arc::new(roots))
}

/// The sending side's TLS setup, loaded from a `tls_dir`: the CA to check the destination
/// against and the source's own certificate.
#[derive(Clone)]
pub struct TlsClient {
    config: Arc<ClientConfig>,
}

impl fmt::Debug for TlsClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("TlsClient")
    }
}

impl TlsClient {
    /// Loads `ca-cert.pem`, `client-cert.pem` and `client-key.pem` from `dir`.
    pub fn load(dir: &Path) -> Result<Self, TlsError> {
        let roots = load_roots(dir)?;
        let certs = load_certs(&dir.join(CLIENT_CERT_FILE))?;
        let key = load_key(&dir.join(CLIENT_KEY_FILE))?;
        let config_err = |source| TlsError::Config {
            dir: dir.to_owned(),
            source,
        };
        let provider = provider();
        let verifier = WebPkiServerVerifier::builder_with_provider(roots, provider.clone())
            .build()
            .map_err(|e| TlsError::Config {
                dir: dir.to_owned(),
                source: rustls::Error::General(e.to_string()),
            })?;
        let config = ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(config_err)?
            .with_webpki_verifier(verifier)
            .with_client_auth_cert(certs, key)
            .map_err(config_err)?;
        Ok(TlsClient {
            config: Arc::new(config),
        })
    }

    /// A client from a ready rustls configuration (tests: a client without a certificate).
    pub fn from_config(config: Arc<ClientConfig>) -> Self {
        TlsClient { config }
    }

    /// Runs the handshake on `sock` (already connected, timeouts set) as the source, checking
    /// that the destination's certificate is valid for `host`.
    pub fn connect(&self, sock: TcpStream, host: &str) -> Result<TlsStream, TlsError> {
        let name = ServerName::try_from(host.to_owned())
            .map_err(|_| TlsError::ServerName(host.to_owned()))?;
        let conn =
            ClientConnection::new(self.config.clone(), name).map_err(|e| TlsError::Handshake {
                peer: Peer::Destination,
                reason: e.to_string(),
            })?;
        TlsStream::handshake(conn.into(), sock, Peer::Destination)
    }
}

/// The receiving side's TLS setup, loaded from a `tls_dir`: the destination's certificate and
/// the CA every source's certificate must chain to.
#[derive(Clone)]
pub struct TlsServer {
    config: Arc<ServerConfig>,
}

impl fmt::Debug for TlsServer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("TlsServer")
    }
}

impl TlsServer {
    /// Loads `ca-cert.pem`, `server-cert.pem` and `server-key.pem` from `dir`.
    pub fn load(dir: &Path) -> Result<Self, TlsError> {
        let roots = load_roots(dir)?;
        let certs = load_certs(&dir.join(SERVER_CERT_FILE))?;
        let key = load_key(&dir.join(SERVER_KEY_FILE))?;
        let provider = provider();
        let verifier = WebPkiClientVerifier::builder_with_provider(roots, provider.clone())
            .build()
            .map_err(|source| TlsError::Verifier {
                dir: dir.to_owned(),
                source,
            })?;
        let config_err = |source| TlsError::Config {
            dir: dir.to_owned(),
            source,
        };
        let config = ServerConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(config_err)?
            .with_client_cert_verifier(verifier)
            .with_single_cert(certs, key)
            .map_err(config_err)?;
        Ok(TlsServer {
            config: Arc::new(config),
        })
    }

    /// Runs the handshake on `sock` (just accepted, timeouts set) as the destination; the
    /// source must present a certificate that chains to the CA.
    pub fn accept(&self, sock: TcpStream) -> Result<TlsStream, TlsError> {
        let conn = ServerConnection::new(self.config.clone()).map_err(|e| TlsError::Handshake {
            peer: Peer::Source,
            reason: e.to_string(),
        })?;
        TlsStream::handshake(conn.into(), sock, Peer::Source)
    }
}

/// What a rustls error means here, in a sentence that names the peer.
fn describe(err: &rustls::Error, peer: Peer) -> String {
    use rustls::{AlertDescription as A, CertificateError as C, Error as E};
    match err {
        E::InvalidCertificate(C::UnknownIssuer | C::BadSignature) => {
            format!("the {peer}'s certificate does not chain to our {CA_CERT_FILE}")
        }
        E::InvalidCertificate(C::NotValidForName | C::NotValidForNameContext { .. }) => {
            format!("the {peer}'s certificate is not valid for the host in the URL")
        }
        E::InvalidCertificate(C::Expired | C::ExpiredContext { .. }) => {
            format!("the {peer}'s certificate has expired")
        }
        E::InvalidCertificate(other) => format!("the {peer}'s certificate is invalid ({other:?})"),
        E::NoCertificatesPresented => format!("the {peer} presented no certificate"),
        E::InvalidMessage(rustls::InvalidMessage::InvalidContentType) => {
            format!("the {peer} does not speak TLS (is it given tls_dir too?)")
        }
        E::AlertReceived(A::UnknownCA | A::BadCertificate | A::CertificateUnknown) => format!(
            "the {peer} refused our certificate (it does not chain to the {peer}'s {CA_CERT_FILE})"
        ),
        E::AlertReceived(A::CertificateRequired) => {
            format!("the {peer} requires a client certificate")
        }
        E::AlertReceived(alert) => format!("the {peer} ended the connection (TLS alert {alert:?})"),
        other => other.to_string(),
    }
}

/// A rustls error carried inside an `io::Error`, with a readable message.
#[derive(Debug, Error)]
#[error("{0}")]
struct TlsFailure(String);

/// Turns an I/O error from rustls into one that says what happened, naming the peer.
fn explain(err: io::Error, peer: Peer) -> io::Error {
    let described = err
        .get_ref()
        .and_then(|inner| inner.downcast_ref::<rustls::Error>())
        .map(|tls| describe(tls, peer));
    match described {
        Some(text) => io::Error::new(err.kind(), TlsFailure(text)),
        None => err,
    }
}

/// An established TLS connection over TCP. Reads and writes carry the migration protocol;
/// guest pages are sent through a bounce buffer (rustls encrypts from a byte slice) and
/// received by copying rustls's decrypted records straight into guest memory.
pub struct TlsStream {
    conn: Connection,
    sock: TcpStream,
    peer: Peer,
    bounce: Vec<u8>,
    ahead: ReadAhead,
}

/// Ciphertext read from the socket ahead of rustls: rustls reads at most 4 KiB per call, which
/// made receiving over TLS cost four `recv` calls per 16 KiB record.
#[derive(Default)]
struct ReadAhead {
    buf: Vec<u8>,
    start: usize,
    end: usize,
}

/// The socket as rustls reads it: through [`ReadAhead`].
struct AheadReader<'a> {
    ahead: &'a mut ReadAhead,
    sock: &'a TcpStream,
}

impl Read for AheadReader<'_> {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        let ahead = &mut *self.ahead;
        if ahead.start == ahead.end {
            if ahead.buf.is_empty() {
                ahead.buf = vec![0; READ_AHEAD_BYTES];
            }
            let n = self.sock.read(&mut ahead.buf)?;
            ahead.start = 0;
            ahead.end = n;
        }
        let n = out.len().min(ahead.end - ahead.start);
        out[..n].copy_from_slice(&ahead.buf[ahead.start..ahead.start + n]);
        ahead.start += n;
        Ok(n)
    }
}

impl fmt::Debug for TlsStream {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TlsStream")
            .field("peer", &self.peer)
            .field("sock", &self.sock)
            .finish()
    }
}

impl TlsStream {
    fn handshake(conn: Connection, sock: TcpStream, peer: Peer) -> Result<Self, TlsError> {
        let mut stream = TlsStream {
            conn,
            sock,
            peer,
            bounce: Vec::new(),
            ahead: ReadAhead::default(),
        };
        stream.conn.set_buffer_limit(Some(BUFFER_LIMIT));
        while stream.conn.is_handshaking() {
            if let Err(e) = stream.conn.complete_io(&mut stream.sock) {
                let tls = e
                    .get_ref()
                    .and_then(|inner| inner.downcast_ref::<rustls::Error>())
                    .map(|tls| describe(tls, peer));
                return Err(match tls {
                    Some(reason) => TlsError::Handshake { peer, reason },
                    None if e.kind() == io::ErrorKind::UnexpectedEof => TlsError::Handshake {
                        peer,
                        reason: format!("the {peer} closed the connection (does it use TLS?)"),
                    },
                    None => TlsError::HandshakeIo { peer, source: e },
                });
            }
        }
        Ok(stream)
    }

    /// The TCP socket underneath (for a second handle that can shut it down).
    pub fn tcp(&self) -> &TcpStream {
        &self.sock
    }

    /// Which peer is at the other end.
    pub fn peer(&self) -> Peer {
        self.peer
    }

    /// Sends TLS's close_notify (best effort), then shuts the socket down both ways.
    pub fn shutdown(&mut self) -> io::Result<()> {
        self.conn.send_close_notify();
        let _ = self.write_pending();
        self.sock.shutdown(std::net::Shutdown::Both)
    }

    /// Writes out every encrypted record rustls has queued.
    fn write_pending(&mut self) -> io::Result<()> {
        while self.conn.wants_write() {
            self.conn.write_tls(&mut self.sock)?;
        }
        Ok(())
    }

    /// Reads more records from the socket and decrypts them.
    fn read_records(&mut self) -> io::Result<()> {
        self.write_pending()?;
        let mut reader = AheadReader {
            ahead: &mut self.ahead,
            sock: &self.sock,
        };
        self.conn.read_tls(&mut reader)?;
        if let Err(e) = self.conn.process_new_packets() {
            // rustls queued an alert for the peer: try to tell it why.
            let _ = self.write_pending();
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                TlsFailure(describe(&e, self.peer)),
            ));
        }
        Ok(())
    }
}

impl Read for TlsStream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        loop {
            match self.conn.reader().read(buf) {
                // Ok(0): the peer sent close_notify. An EOF without it is an error from rustls.
                Ok(n) => return Ok(n),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return Err(explain(e, self.peer)),
            }
            self.read_records()?;
        }
    }
}

impl Write for TlsStream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        loop {
            let n = self.conn.writer().write(buf)?;
            self.write_pending()?;
            if n > 0 {
                return Ok(n);
            }
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        self.conn.writer().flush()?;
        self.write_pending()?;
        self.sock.flush()
    }
}

impl ReadVolatile for TlsStream {
    /// Copies decrypted data straight from rustls's buffer into guest memory.
    fn read_volatile<B: BitmapSlice>(
        &mut self,
        buf: &mut VolatileSlice<B>,
    ) -> Result<usize, VolatileMemoryError> {
        if buf.is_empty() {
            return Ok(0);
        }
        loop {
            let mut reader = self.conn.reader();
            match reader.fill_buf() {
                // Empty: the peer sent close_notify.
                Ok(chunk) => {
                    let n = chunk.len().min(buf.len());
                    buf.subslice(0, n)?.copy_from(&chunk[..n]);
                    reader.consume(n);
                    return Ok(n);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return Err(VolatileMemoryError::IOError(explain(e, self.peer))),
            }
            self.read_records().map_err(VolatileMemoryError::IOError)?;
        }
    }
}

impl WriteVolatile for TlsStream {
    fn write_volatile<B: BitmapSlice>(
        &mut self,
        buf: &VolatileSlice<B>,
    ) -> Result<usize, VolatileMemoryError> {
        let len = buf.len().min(BOUNCE_BYTES);
        let mut bounce = std::mem::take(&mut self.bounce);
        bounce.resize(len, 0);
        let copied = buf
            .subslice(0, len)
            .map(|part| part.copy_to(&mut bounce[..]));
        let result = copied.and_then(|n| {
            self.write_all(&bounce[..n])
                .map(|()| n)
                .map_err(VolatileMemoryError::IOError)
        });
        self.bounce = bounce;
        result
    }
}

impl MigrationStream {
    /// Source side: runs the TLS handshake on this TCP stream, checking the destination's
    /// certificate against `url`'s host. Timeouts set on the socket apply to the handshake.
    pub fn into_tls_client(self, tls: &TlsClient, url: &MigrationUrl) -> Result<Self, TlsError> {
        match (self, url) {
            (MigrationStream::Tcp(sock), MigrationUrl::Tcp { host, .. }) => tls
                .connect(sock, host)
                .map(|s| MigrationStream::Tls(Box::new(s))),
            _ => Err(TlsError::NeedsTcp),
        }
    }

    /// Destination side: runs the TLS handshake on this just-accepted TCP stream.
    pub fn into_tls_server(self, tls: &TlsServer) -> Result<Self, TlsError> {
        match self {
            MigrationStream::Tcp(sock) => {
                tls.accept(sock).map(|s| MigrationStream::Tls(Box::new(s)))
            }
            _ => Err(TlsError::NeedsTcp),
        }
    }
}

#[cfg(test)]
mod tests;

//! The connections of a migration: opening them (TLS when `tls_dir=` is given), and
//! `connections=<n>`, where each added connection has its own thread on both sides carrying its
//! part of every round (the protocol is drawn in `vm_migration::striping`).
//!
//! - [`send`]: the source's added connections and their `migration-tx-N` threads.
//! - [`receive`]: the destination's added connections and their `migration-rx-N` threads.
//!
//! With one connection (the default) none of this runs, and the wire is what it always was.

pub mod receive;
pub mod send;

use std::path::Path;
use std::time::Duration;

use vm_migration::{MigrationStream, MigrationUrl, TlsClient, TlsServer};

use super::MigrationError;

/// How long to wait for the destination to accept a connection.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long any single read or write on a connection may block.
pub const IO_TIMEOUT: Duration = Duration::from_secs(60);

/// Loads the source's TLS files when `tls_dir` is given (before anything else starts, so a
/// missing or unreadable file is the one error reported).
pub fn load_client(tls_dir: Option<&Path>) -> Result<Option<TlsClient>, MigrationError> {
    tls_dir
        .map(|dir| TlsClient::load(dir).map_err(MigrationError::Tls))
        .transpose()
}

/// Loads the destination's TLS files when `tls_dir` is given.
pub fn load_server(tls_dir: Option<&Path>) -> Result<Option<TlsServer>, MigrationError> {
    tls_dir
        .map(|dir| TlsServer::load(dir).map_err(MigrationError::Tls))
        .transpose()
}

/// Opens one connection to `url`, with the TLS handshake when `tls` is given.
pub fn connect(
    url: &MigrationUrl,
    tls: Option<&TlsClient>,
) -> Result<MigrationStream, MigrationError> {
    let stream = MigrationStream::connect(url, CONNECT_TIMEOUT, Some(IO_TIMEOUT))
        .map_err(MigrationError::Transport)?;
    match tls {
        Some(tls) => stream
            .into_tls_client(tls, url)
            .map_err(MigrationError::Tls),
        None => Ok(stream),
    }
}

/// A second handle on a connection's socket, which can shut it down to wake a thread blocked on
/// it.
pub fn waker(stream: &MigrationStream) -> Option<MigrationStream> {
    match stream {
        MigrationStream::Unix(s) => s.try_clone().ok().map(MigrationStream::Unix),
        MigrationStream::Tcp(s) => s.try_clone().ok().map(MigrationStream::Tcp),
        MigrationStream::Tls(s) => s.tcp().try_clone().ok().map(MigrationStream::Tcp),
    }
}

#[cfg(test)]
mod tests;

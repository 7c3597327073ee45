//! Words for the I/O errors a broken migration connection produces: "failed to fill whole
//! buffer" or "Resource temporarily unavailable" do not tell a user that the peer went away or
//! stopped answering.

use std::io;

use vm_memory::VolatileMemoryError;

/// Rewrites an I/O error on the migration connection to say what happened to the peer; other
/// errors are returned unchanged. The error kind is kept.
pub fn explain(err: io::Error) -> io::Error {
    let what = match err.kind() {
        io::ErrorKind::UnexpectedEof => {
            return io::Error::new(err.kind(), "the peer closed the connection");
        }
        io::ErrorKind::BrokenPipe
        | io::ErrorKind::ConnectionReset
        | io::ErrorKind::ConnectionAborted => "the peer closed the connection",
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => {
            "the peer sent or took nothing within the I/O timeout"
        }
        _ => return err,
    };
    io::Error::new(err.kind(), format!("{what} ({err})"))
}

/// [`explain`] for the errors of vm-memory's volatile reads and writes.
pub fn explain_volatile(err: VolatileMemoryError) -> VolatileMemoryError {
    match err {
        VolatileMemoryError::IOError(e) => VolatileMemoryError::IOError(explain(e)),
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn says_what_happened_to_the_peer() {
        let eof = explain(io::Error::from(io::ErrorKind::UnexpectedEof));
        assert_eq!(eof.kind(), io::ErrorKind::UnexpectedEof);
        assert_eq!(eof.to_string(), "the peer closed the connection");
        let pipe = explain(io::Error::from_raw_os_error(libc::EPIPE));
        assert_eq!(pipe.kind(), io::ErrorKind::BrokenPipe);
        assert!(pipe
            .to_string()
            .starts_with("the peer closed the connection ("));
        let stalled = explain(io::Error::from_raw_os_error(libc::EAGAIN));
        assert!(
            stalled.to_string().contains("within the I/O timeout"),
            "{stalled}"
        );
        let other = explain(io::Error::from(io::ErrorKind::PermissionDenied));
        assert_eq!(other.kind(), io::ErrorKind::PermissionDenied);
        let volatile = explain_volatile(VolatileMemoryError::IOError(io::Error::from(
            io::ErrorKind::UnexpectedEof,
        )));
        assert!(
            volatile.to_string().contains("the peer closed"),
            "{volatile}"
        );
    }
}

//! What the server makes of one connection's bytes, without a server thread or a handler: the
//! same reading (limits, deadline) and decoding as a real connection, for tests and fuzzing.

use std::io::Read;
use std::os::unix::net::UnixStream;
use std::time::Duration;

use super::{error_response, parse_request, routes, Parsed, ReadError};
use crate::api::{ApiError, ApiRequest};

/// The outcome of reading and decoding one request.
#[derive(Debug)]
pub enum DecodedRequest {
    /// A valid request, ready for the handler.
    Request(ApiRequest),
    /// The client went away before sending a whole request: nothing is answered.
    Closed,
    /// The request is refused with `error`; `response` is exactly what the server answers.
    Rejected {
        /// Why.
        error: ApiError,
        /// The HTTP response (status line, headers, JSON body).
        response: Vec<u8>,
    },
}

/// Reads what `stream` brings until its end (or `timeout`) and decodes it as the API server
/// does with the bytes of one connection.
pub fn decode_request(stream: &mut UnixStream, timeout: Duration) -> DecodedRequest {
    let mut bytes = Vec::new();
    if stream.set_read_timeout(Some(timeout)).is_ok() {
        // A read that times out leaves what arrived before it: decode that.
        let _ = stream.read_to_end(&mut bytes);
    }
    let raw = match parse_request(&bytes) {
        Ok(Parsed::Complete(raw)) => raw,
        // The client went away before sending a whole request.
        Ok(Parsed::Incomplete { .. }) | Err(ReadError::Closed) => return DecodedRequest::Closed,
        Err(ReadError::Reply(error)) => return rejected(error),
    };
    match routes::parse_request(&raw.method, &raw.path, &raw.body) {
        Ok(request) => DecodedRequest::Request(request),
        Err(error) => rejected(error),
    }
}

fn rejected(error: ApiError) -> DecodedRequest {
    let response = error_response(&error);
    DecodedRequest::Rejected { error, response }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::net::Shutdown;

    fn decode(bytes: &[u8]) -> DecodedRequest {
        let (mut client, mut server) = UnixStream::pair().unwrap();
        client.write_all(bytes).unwrap();
        client.shutdown(Shutdown::Write).unwrap();
        decode_request(&mut server, Duration::from_secs(5))
    }

    #[test]
    fn decodes_a_request_like_the_server() {
        assert!(matches!(
            decode(b"GET /api/v1/vmm.ping HTTP/1.1\r\nHost: localhost\r\n\r\n"),
            DecodedRequest::Request(ApiRequest::VmmPing)
        ));
        assert!(matches!(
            decode(b"GET /api/v1/vmm.ping HTTP/1.1\r\n"),
            DecodedRequest::Closed
        ));
        match decode(b"PUT /api/v1/vm.resize HTTP/1.1\r\nContent-Length: 1\r\n\r\n{") {
            DecodedRequest::Rejected { error, response } => {
                assert_eq!(error.status(), 400);
                let text = String::from_utf8(response).unwrap();
                assert!(text.starts_with("HTTP/1.1 400 "), "{text}");
                let body = &text[text.find("\r\n\r\n").unwrap() + 4..];
                serde_json::from_str::<serde_json::Value>(body).unwrap();
            }
            other => panic!("unexpected {other:?}"),
        }
    }
}

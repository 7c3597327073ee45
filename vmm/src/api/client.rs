//! A minimal HTTP/1.1 client for the API socket, used by `ch-remote` and tests.

use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};

use super::ApiRequest;

/// Largest response header block read, in bytes.
const MAX_RESPONSE_HEADER: usize = 64 * 1024;
/// Largest response body read, in bytes.
const MAX_RESPONSE_BODY: usize = 64 * 1024 * 1024;

/// Errors talking to the API server.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The socket cannot be connected to.
    #[error("cannot connect to API socket {}", path.display())]
    Connect {
        /// The socket path.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// Reading the response failed.
    #[error("cannot read the API response")]
    Receive(#[source] io::Error),
    /// The server closed the connection without a complete answer.
    #[error("the API server closed the connection without answering")]
    NoResponse,
    /// The answer is not valid HTTP.
    #[error("malformed API response: {0}")]
    Malformed(&'static str),
}

/// A response from the API server.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ApiResponse {
    /// HTTP status code.
    pub status: u16,
    /// Body, empty when there is none.
    pub body: Vec<u8>,
}

impl ApiResponse {
    /// Whether the status is 2xx.
    pub fn is_success(&self) -> bool {
        (200..300).contains(&self.status)
    }

    /// The message of an error response: the `error` field of its JSON body, else the body as
    /// text, else the status; always one line.
    pub fn error_message(&self) -> String {
        let from_json = serde_json::from_slice::<serde_json::Value>(&self.body)
            .ok()
            .and_then(|v| v.get("error").and_then(|e| e.as_str()).map(str::to_string));
        let text =
            from_json.unwrap_or_else(|| String::from_utf8_lossy(&self.body).trim().to_string());
        let text = if text.is_empty() {
            format!("HTTP status {}", self.status)
        } else {
            text
        };
        text.replace(['\r', '\n'], " ")
    }
}

/// Sends `request` to the API server on `socket` and waits for the answer, however long it takes.
pub fn send_request(socket: &Path, request: &ApiRequest) -> Result<ApiResponse, ClientError> {
    send_raw(
        socket,
        request.method(),
        &request.path(),
        request.body().as_deref(),
    )
}

/// Sends one HTTP request with an optional JSON body and waits for the answer.
pub fn send_raw(
    socket: &Path,
    method: &str,
    path: &str,
    body: Option<&[u8]>,
) -> Result<ApiResponse, ClientError> {
    let mut stream = UnixStream::connect(socket).map_err(|source| ClientError::Connect {
        path: socket.to_path_buf(),
        source,
    })?;
    let mut request = format!("{method} {path} HTTP/1.1\r\nHost: localhost\r\nAccept: application/json\r\nConnection: close\r\n");
    if let Some(body) = body {
        request.push_str(&format!(
            "Content-Type: application/json\r\nContent-Length: {}\r\n",
            body.len()
        ));
    }
    request.push_str("\r\n");
    let mut bytes = request.into_bytes();
    bytes.extend_from_slice(body.unwrap_or_default());
    // If the server refuses the request early (e.g. a body too large) it answers and closes:
    // a failed write is not the end, the answer may be waiting.
    let _ = stream.write_all(&bytes);
    read_response(&mut stream)
}

/// Reads one response, skipping `1xx` interim ones.
fn read_response(stream: &mut impl Read) -> Result<ApiResponse, ClientError> {
    let mut buf = Vec::new();
    loop {
        let (status, header_len, content_length) = loop {
            if let Some(head) = parse_head(&buf)? {
                break head;
            }
            if buf.len() > MAX_RESPONSE_HEADER {
                return Err(ClientError::Malformed("headers too large"));
            }
            if read_chunk(stream, &mut buf)? == 0 {
                return Err(ClientError::NoResponse);
            }
        };
        let mut body = buf.split_off(header_len);
        if (100..200).contains(&status) {
            buf = body;
            continue;
        }
        if status == 204 || status == 304 {
            return Ok(ApiResponse {
                status,
                body: Vec::new(),
            });
        }
        match content_length {
            Some(length) => {
                if length > MAX_RESPONSE_BODY {
                    return Err(ClientError::Malformed("body too large"));
                }
                while body.len() < length {
                    if read_chunk(stream, &mut body)? == 0 {
                        return Err(ClientError::NoResponse);
                    }
                }
                body.truncate(length);
            }
            // No length: the body runs to the end of the connection.
            None => {
                while read_chunk(stream, &mut body)? != 0 {
                    if body.len() > MAX_RESPONSE_BODY {
                        return Err(ClientError::Malformed("body too large"));
                    }
                }
            }
        }
        return Ok(ApiResponse { status, body });
    }
}

/// Parses the status line and headers once they are complete: (status, header length,
/// Content-Length).
fn parse_head(buf: &[u8]) -> Result<Option<(u16, usize, Option<usize>)>, ClientError> {
    let mut headers = [httparse::EMPTY_HEADER; 64];
    let mut response = httparse::Response::new(&mut headers);
    let header_len = match response.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(_) => return Err(ClientError::Malformed("invalid status line or headers")),
    };
    let status = response
        .code
        .ok_or(ClientError::Malformed("no status code"))?;
    let mut content_length = None;
    for header in response.headers.iter() {
        if header.name.eq_ignore_ascii_case("content-length") {
            let length = std::str::from_utf8(header.value)
                .ok()
                .and_then(|v| crate::config::parse_decimal::<usize>(v.trim()))
                .ok_or(ClientError::Malformed("invalid Content-Length"))?;
            content_length = Some(length);
        } else if header.name.eq_ignore_ascii_case("transfer-encoding") {
            return Err(ClientError::Malformed(
                "chunked responses are not supported",
            ));
        }
    }
    Ok(Some((status, header_len, content_length)))
}

/// Reads once, appending to `buf`; returns the number of bytes read (0 at end of stream).
fn read_chunk(stream: &mut impl Read, buf: &mut Vec<u8>) -> Result<usize, ClientError> {
    let mut chunk = [0u8; 8192];
    loop {
        match stream.read(&mut chunk) {
            Ok(n) => {
                buf.extend_from_slice(&chunk[..n]);
                return Ok(n);
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) if e.kind() == io::ErrorKind::ConnectionReset => return Ok(0),
            Err(e) => return Err(ClientError::Receive(e)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(raw: &[u8]) -> Result<ApiResponse, ClientError> {
        read_response(&mut &raw[..])
    }

    #[test]
    fn responses() {
        let r = parse(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}").unwrap();
        assert_eq!(
            r,
            ApiResponse {
                status: 200,
                body: b"{}".to_vec()
            }
        );
        assert!(r.is_success());
        let r = parse(b"HTTP/1.1 204 No Content\r\n\r\n").unwrap();
        assert_eq!(
            r,
            ApiResponse {
                status: 204,
                body: vec![]
            }
        );
        let r = parse(
            b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\n1extra",
        )
        .unwrap();
        assert_eq!(
            r,
            ApiResponse {
                status: 200,
                body: b"1".to_vec()
            }
        );
        let r = parse(b"HTTP/1.0 500 Oops\r\n\r\n{\"error\": \"no\\nway\"}").unwrap();
        assert_eq!(r.status, 500);
        assert_eq!(r.error_message(), "no way");
        let r = parse(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n").unwrap();
        assert_eq!(r.error_message(), "HTTP status 404");
        assert_eq!(
            ApiResponse {
                status: 400,
                body: b"plain\n".to_vec()
            }
            .error_message(),
            "plain"
        );
    }

    #[test]
    fn bad_responses() {
        assert!(matches!(parse(b""), Err(ClientError::NoResponse)));
        assert!(matches!(
            parse(b"HTTP/1.1 200 OK\r\n"),
            Err(ClientError::NoResponse)
        ));
        assert!(matches!(
            parse(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n{}"),
            Err(ClientError::NoResponse)
        ));
        assert!(matches!(
            parse(b"garbage\r\n\r\n"),
            Err(ClientError::Malformed(_))
        ));
        assert!(matches!(
            parse(b"HTTP/1.1 200 OK\r\nContent-Length: x\r\n\r\n"),
            Err(ClientError::Malformed(_))
        ));
    }

    #[test]
    fn missing_socket() {
        let e = send_request(Path::new("/nonexistent/api.sock"), &ApiRequest::VmmPing).unwrap_err();
        assert_eq!(
            e.to_string(),
            "cannot connect to API socket /nonexistent/api.sock"
        );
    }
}

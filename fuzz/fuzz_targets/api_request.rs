//! The API server's request reading and decoding: the bytes a client sends on the API socket
//! (request line, headers, body) go through the same reader (size limits, Content-Length,
//! Expect) and router (endpoints, methods, the JSON bodies of vm.create, vm.resize,
//! vm.send-migration, vm.receive-migration and vm.balloon-hints) as a real connection.
//! Nothing may panic or hang, and every refusal is a well-formed HTTP response with a JSON
//! body.
#![no_main]

use std::io::Write;
use std::net::Shutdown;
use std::os::unix::net::UnixStream;
use std::time::Duration;

use libfuzzer_sys::fuzz_target;
use vmm::api::{decode_request, DecodedRequest};

fuzz_target!(|data: &[u8]| {
    // Stays below the socket buffer, so the whole request is written before it is read.
    let data = &data[..data.len().min(64 * 1024)];
    let (mut client, mut server) = UnixStream::pair().expect("socketpair");
    client.write_all(data).expect("fits the socket buffer");
    client.shutdown(Shutdown::Write).expect("shutdown");
    match decode_request(&mut server, Duration::from_secs(5)) {
        DecodedRequest::Request(request) => {
            let _ = (
                request.method(),
                request.endpoint(),
                request.path(),
                request.body(),
            );
        }
        DecodedRequest::Closed => {}
        DecodedRequest::Rejected { error, response } => {
            let text = String::from_utf8(response).expect("responses are UTF-8");
            let status = format!("HTTP/1.1 {} ", error.status());
            assert!(text.starts_with(&status), "bad status line: {text:?}");
            let (head, body) = text.split_once("\r\n\r\n").expect("header end");
            let length = head
                .lines()
                .find_map(|l| l.strip_prefix("Content-Length: "))
                .expect("a Content-Length");
            assert_eq!(length.parse::<usize>().expect("a number"), body.len());
            serde_json::from_str::<serde_json::Value>(body).expect("a JSON body");
        }
    }
});

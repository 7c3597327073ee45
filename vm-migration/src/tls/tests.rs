//! Tests of the TLS stream: real handshakes over loopback TCP with certificates made by
//! `scripts/make-test-certs.sh` (a fresh CA per directory).

use super::*;
use std::net::TcpListener;
use std::thread;
use std::time::Duration;
use vmm_sys_util::tempdir::TempDir;

/// A directory of TLS files from the project's script.
fn cert_dir() -> TempDir {
    let dir = TempDir::new().unwrap();
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/make-test-certs.sh");
    let out = std::process::Command::new("bash")
        .arg(script)
        .arg(dir.as_path())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "make-test-certs.sh failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    dir
}

/// A connected loopback TCP pair with timeouts (client, server).
fn tcp_pair() -> (TcpStream, TcpStream) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let client = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
    let (server, _) = listener.accept().unwrap();
    for s in [&client, &server] {
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        s.set_write_timeout(Some(Duration::from_secs(10))).unwrap();
    }
    (client, server)
}

/// Runs the server handshake on a thread; returns the client's and the server's outcome.
fn handshake_with(
    client: &TlsClient,
    host: &str,
    server: &TlsServer,
) -> (
    Result<TlsStream, TlsError>,
    thread::JoinHandle<Result<TlsStream, TlsError>>,
) {
    let (c, s) = tcp_pair();
    let server = server.clone();
    let accepted = thread::spawn(move || server.accept(s));
    (client.connect(c, host), accepted)
}

#[test]
fn handshake_and_data_both_ways() {
    let dir = cert_dir();
    let client = TlsClient::load(dir.as_path()).unwrap();
    let server = TlsServer::load(dir.as_path()).unwrap();
    for host in ["localhost", "127.0.0.1"] {
        let (c, s) = handshake_with(&client, host, &server);
        let mut c = c.unwrap();
        let mut s = s.join().unwrap().unwrap();
        assert_eq!(c.peer(), Peer::Destination);
        assert_eq!(s.peer(), Peer::Source);
        // More than the bounce buffer and rustls's buffer limit, through the volatile paths.
        let data: Vec<u8> = (0..(5u32 << 20) + 123)
            .map(|i| (i * 7 + i / 4096) as u8)
            .collect();
        let expected = data.clone();
        let reader = thread::spawn(move || {
            let mut got = vec![0u8; expected.len()];
            s.read_exact_volatile(&mut VolatileSlice::from(&mut got[..]))
                .unwrap();
            assert!(got == expected, "payload differs after the round trip");
            s.write_all(b"ack").unwrap();
            s.flush().unwrap();
            s
        });
        let mut src = data;
        c.write_all_volatile(&VolatileSlice::from(&mut src[..]))
            .unwrap();
        c.flush().unwrap();
        let mut ack = [0u8; 3];
        c.read_exact(&mut ack).unwrap();
        assert_eq!(&ack, b"ack");
        let mut s = reader.join().unwrap();
        // A clean close is end of stream, not an error.
        c.shutdown().unwrap();
        assert_eq!(s.read(&mut ack).unwrap(), 0);
    }
}

#[test]
fn a_destination_of_another_ca_is_refused() {
    let (ours, theirs) = (cert_dir(), cert_dir());
    let client = TlsClient::load(ours.as_path()).unwrap();
    let server = TlsServer::load(theirs.as_path()).unwrap();
    let (c, s) = handshake_with(&client, "localhost", &server);
    let err = c.unwrap_err().to_string();
    assert_eq!(
        err,
        "TLS handshake with the destination failed: the destination's certificate does not \
         chain to our ca-cert.pem"
    );
    let err = s.join().unwrap().unwrap_err().to_string();
    assert!(err.contains("the source refused our certificate"), "{err}");
}

#[test]
fn a_source_of_another_ca_is_refused() {
    let (ours, theirs) = (cert_dir(), cert_dir());
    // The source trusts the destination's CA but its own certificate is from another CA.
    let mixed = TempDir::new().unwrap();
    for (from, file) in [
        (&ours, CA_CERT_FILE),
        (&theirs, CLIENT_CERT_FILE),
        (&theirs, CLIENT_KEY_FILE),
    ] {
        std::fs::copy(from.as_path().join(file), mixed.as_path().join(file)).unwrap();
    }
    let client = TlsClient::load(mixed.as_path()).unwrap();
    let server = TlsServer::load(ours.as_path()).unwrap();
    let (c, s) = handshake_with(&client, "127.0.0.1", &server);
    let err = s.join().unwrap().unwrap_err().to_string();
    assert_eq!(
        err,
        "TLS handshake with the source failed: the source's certificate does not chain to our \
         ca-cert.pem"
    );
    // TLS 1.3: the client's handshake ends first; the refusal arrives on its first read.
    let mut c = match c {
        Ok(c) => c,
        Err(e) => {
            assert!(e.to_string().contains("refused our certificate"), "{e}");
            return;
        }
    };
    let _ = c.write_all(b"Start");
    let err = c.read(&mut [0u8; 8]).unwrap_err().to_string();
    assert_eq!(
        err,
        "the destination refused our certificate (it does not chain to the destination's \
         ca-cert.pem)"
    );
}

#[test]
fn a_source_without_a_certificate_is_refused() {
    let dir = cert_dir();
    let server = TlsServer::load(dir.as_path()).unwrap();
    let roots = load_roots(dir.as_path()).unwrap();
    let config = ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let client = TlsClient::from_config(Arc::new(config));
    let (c, s) = handshake_with(&client, "localhost", &server);
    let err = s.join().unwrap().unwrap_err().to_string();
    assert_eq!(
        err,
        "TLS handshake with the source failed: the source presented no certificate"
    );
    if let Ok(mut c) = c {
        let err = c.read(&mut [0u8; 8]).unwrap_err().to_string();
        assert_eq!(err, "the destination requires a client certificate");
    }
}

#[test]
fn a_certificate_for_another_name_is_refused() {
    let dir = cert_dir();
    let client = TlsClient::load(dir.as_path()).unwrap();
    let server = TlsServer::load(dir.as_path()).unwrap();
    let (c, s) = handshake_with(&client, "migration.example", &server);
    let err = c.unwrap_err().to_string();
    assert!(
        err.ends_with("the destination's certificate is not valid for the host in the URL"),
        "{err}"
    );
    assert!(s.join().unwrap().is_err());
}

#[test]
fn a_plain_tcp_peer_is_refused() {
    let dir = cert_dir();
    let server = TlsServer::load(dir.as_path()).unwrap();
    let (mut c, s) = tcp_pair();
    let accepted = thread::spawn(move || server.accept(s));
    c.write_all(b"VMMQ not a TLS ClientHello at all").unwrap();
    drop(c);
    let err = accepted.join().unwrap().unwrap_err();
    assert_eq!(
        err.to_string(),
        "TLS handshake with the source failed: the source does not speak TLS (is it given \
         tls_dir too?)"
    );
}

#[test]
fn a_plain_destination_is_refused() {
    let dir = cert_dir();
    let client = TlsClient::load(dir.as_path()).unwrap();
    let (c, mut s) = tcp_pair();
    // What our plain receiver does with a ClientHello: an error response, then close.
    let plain = thread::spawn(move || {
        let mut hello = [0u8; 64];
        let _ = s.read(&mut hello);
        let _ = s.write_all(b"VMMR\x01\x00\x02\x00 not TLS at all, sorry");
    });
    let err = client.connect(c, "localhost").unwrap_err();
    plain.join().unwrap();
    assert!(
        err.to_string()
            .ends_with("the destination does not speak TLS (is it given tls_dir too?)"),
        "{err}"
    );
}

#[test]
fn missing_or_bad_files_name_the_file() {
    let dir = cert_dir();
    std::fs::remove_file(dir.as_path().join(CLIENT_KEY_FILE)).unwrap();
    let err = TlsClient::load(dir.as_path()).unwrap_err();
    assert!(matches!(&err, TlsError::Read { path, .. } if path.ends_with(CLIENT_KEY_FILE)));
    assert!(err.to_string().ends_with("client-key.pem"), "{err}");
    // The server side does not need the client's files.
    TlsServer::load(dir.as_path()).unwrap();
    std::fs::write(dir.as_path().join(SERVER_CERT_FILE), b"not PEM").unwrap();
    let err = TlsServer::load(dir.as_path()).unwrap_err();
    assert!(
        matches!(&err, TlsError::Pem { path, what: "certificate", .. } if path.ends_with(SERVER_CERT_FILE)),
        "{err:?}"
    );
    // A key that does not belong to the certificate.
    let other = cert_dir();
    std::fs::copy(
        other.as_path().join(SERVER_CERT_FILE),
        dir.as_path().join(SERVER_CERT_FILE),
    )
    .unwrap();
    let err = TlsServer::load(dir.as_path()).unwrap_err();
    assert!(matches!(err, TlsError::Config { .. }), "{err:?}");
    let empty = TempDir::new().unwrap();
    let err = TlsServer::load(empty.as_path()).unwrap_err();
    assert!(err.to_string().ends_with("ca-cert.pem"), "{err}");
}

//! Plain TCP against TLS on loopback, without VMMs: `send_memory`/`receive_memory` of N bytes
//! from one guest memory into a fresh one (as a destination receives round 0), once over each.
//!
//! `tls_bandwidth <tls_dir> <MiB>` (a directory from scripts/make-test-certs.sh) prints one JSON
//! object per transport: `{"transport":..,"bytes":..,"seconds":..,"mib_per_s":..}`.

use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::time::Instant;

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vm_migration::protocol::RequestHeader;
use vm_migration::{
    receive_memory, send_memory, MemoryRange, MemoryRangeTable, MigrationStream, MigrationUrl,
    RamRegions, TlsClient, TlsServer,
};

fn memory(bytes: usize, fill: bool) -> GuestMemoryMmap {
    let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), bytes)]).expect("memory");
    if fill {
        let pattern: Vec<u8> = (0..1 << 20).map(|i| (i * 31 + 7) as u8).collect();
        for off in (0..bytes).step_by(pattern.len()) {
            mem.write_slice(&pattern, GuestAddress(off as u64))
                .expect("fill");
        }
    }
    mem
}

fn run(bytes: usize, tls: Option<(&TlsClient, &TlsServer)>) -> f64 {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = listener.local_addr().expect("addr").port();
    let server = tls.map(|(_, s)| s.clone());
    let receiver = std::thread::spawn(move || {
        let (sock, _) = listener.accept().expect("accept");
        let mut stream = MigrationStream::Tcp(sock);
        if let Some(server) = server {
            stream = stream.into_tls_server(&server).expect("server handshake");
        }
        let dst = memory(bytes, false);
        let ram = RamRegions::from_guest_memory(&dst).expect("ram");
        let header = RequestHeader::read_from(&mut stream).expect("header");
        receive_memory(&dst, &ram, &header, &mut stream).expect("receive");
    });
    let src = memory(bytes, true);
    let url = MigrationUrl::Tcp {
        host: "127.0.0.1".into(),
        port,
    };
    let mut stream =
        MigrationStream::Tcp(TcpStream::connect(("127.0.0.1", port)).expect("connect"));
    stream.configure(None).expect("configure");
    if let Some((client, _)) = tls {
        stream = stream
            .into_tls_client(client, &url)
            .expect("client handshake");
    }
    let table = MemoryRangeTable::from_ranges([MemoryRange::new(0, bytes as u64)]).expect("table");
    let start = Instant::now();
    send_memory(&src, &table, &mut stream).expect("send");
    receiver.join().expect("receiver");
    start.elapsed().as_secs_f64()
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let (Some(dir), Some(mib)) = (
        args.get(1),
        args.get(2).and_then(|m| m.parse::<usize>().ok()),
    ) else {
        eprintln!("usage: tls_bandwidth <tls_dir> <MiB>");
        std::process::exit(2);
    };
    let client = TlsClient::load(Path::new(dir)).expect("client TLS files");
    let server = TlsServer::load(Path::new(dir)).expect("server TLS files");
    let bytes = mib << 20;
    for (name, tls) in [("tcp", None), ("tls", Some((&client, &server)))] {
        let seconds = run(bytes, tls);
        println!(
            "{{\"transport\":\"{name}\",\"bytes\":{bytes},\"seconds\":{seconds:.3},\"mib_per_s\":{:.0}}}",
            mib as f64 / seconds
        );
    }
}

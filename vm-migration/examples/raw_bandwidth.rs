//! Raw bandwidth of a migration transport: a plain copy of N bytes through a UNIX or TCP
//! socket on this host, written from a filled buffer and read into fresh anonymous memory
//! (transparent huge pages advised), the way a migration destination receives guest RAM.
//!
//! `raw_bandwidth <unix|tcp> <bytes> [fresh|fresh4k|reuse]` prints one JSON object.

use std::io::{Read, Write};
use std::time::Instant;

const CHUNK: usize = 8 << 20;

/// Where the receiver puts the bytes.
#[derive(Clone, Copy, Debug)]
enum Mode {
    /// One reused buffer: the socket's own limit.
    Reuse,
    /// Fresh anonymous memory, as a migration destination's guest RAM.
    Fresh { thp: bool },
}

fn fresh_mapping(len: usize, thp: bool) -> &'static mut [u8] {
    // SAFETY: a new anonymous private mapping, leaked for the life of this short program.
    unsafe {
        let p = libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
            -1,
            0,
        );
        assert_ne!(p, libc::MAP_FAILED, "mmap failed");
        if thp {
            libc::madvise(p, len, libc::MADV_HUGEPAGE);
        }
        std::slice::from_raw_parts_mut(p.cast(), len)
    }
}

fn run<R: Read + Send + 'static, W: Write>(
    mut reader: R,
    mut writer: W,
    bytes: usize,
    mode: Mode,
) -> f64 {
    let receiver = std::thread::spawn(move || {
        let mut reused = vec![0u8; CHUNK];
        let dest = match mode {
            Mode::Reuse => None,
            Mode::Fresh { thp } => Some(fresh_mapping(bytes, thp)),
        };
        let mut done = 0;
        match dest {
            Some(d) => {
                while done < bytes {
                    let n = (bytes - done).min(CHUNK);
                    reader.read_exact(&mut d[done..done + n]).expect("read");
                    done += n;
                }
            }
            None => {
                while done < bytes {
                    let n = (bytes - done).min(CHUNK);
                    reader.read_exact(&mut reused[..n]).expect("read");
                    done += n;
                }
            }
        }
    });
    let src = vec![0x5au8; CHUNK];
    let start = Instant::now();
    let mut sent = 0;
    while sent < bytes {
        let n = (bytes - sent).min(CHUNK);
        writer.write_all(&src[..n]).expect("write");
        sent += n;
    }
    receiver.join().expect("receiver");
    start.elapsed().as_secs_f64()
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let transport = args.get(1).map(String::as_str).unwrap_or("unix");
    let bytes: usize = args.get(2).and_then(|s| s.parse().ok()).unwrap_or(1 << 30);
    let mode = match args.get(3).map(String::as_str) {
        Some("reuse") => Mode::Reuse,
        Some("fresh4k") => Mode::Fresh { thp: false },
        _ => Mode::Fresh { thp: true },
    };
    let secs = match transport {
        "unix" => {
            let (a, b) = std::os::unix::net::UnixStream::pair().expect("socketpair");
            run(b, a, bytes, mode)
        }
        "tcp" => {
            let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
            let addr = listener.local_addr().expect("addr");
            let client = std::net::TcpStream::connect(addr).expect("connect");
            let (server, _) = listener.accept().expect("accept");
            client.set_nodelay(true).ok();
            run(server, client, bytes, mode)
        }
        other => {
            eprintln!("raw_bandwidth: unknown transport {other} (unix or tcp)");
            std::process::exit(1);
        }
    };
    println!(
        "{{\"transport\":\"{transport}\",\"bytes\":{bytes},\"mode\":\"{mode:?}\",\"seconds\":{secs:.6},\"bytes_per_s\":{:.0}}}",
        bytes as f64 / secs
    );
}

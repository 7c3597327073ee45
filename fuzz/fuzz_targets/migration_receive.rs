//! The receiving side of the migration protocol, fed an arbitrary byte stream as if the source
//! had sent it: request headers, Config and State JSON (the state restored into a balloon's
//! virtio-pci function), Memory range tables with their pages written into guest RAM, and
//! MemoryFd entries (paired with stand-in descriptors, since a byte stream carries none).
//! Like the real receiver, the first error ends the stream. Nothing may panic or hang, and no
//! byte may land outside RAM or outside the ranges a request's table named.
#![no_main]

use std::sync::Arc;

use libfuzzer_sys::fuzz_target;
use virtio_devices::{Balloon, BalloonConfig, VirtioPciDevice};
use vm_memory::{Bytes, GuestAddress};
use vm_migration::protocol::{self, decode_memory_fd_entries, Command, RequestHeader};
use vm_migration::{receive_memory, MemoryRangeTable, RamRegions};
use vmm::migration::decode::{decode_config, decode_state};
use vmm_fuzz::{guest_memory, NullMsi};

/// Two RAM regions with a hole, as the receiver's own RAM.
const RAM: [(u64, usize); 2] = [(0, 0x10000), (0x10_0000, 0x10000)];
/// The byte RAM is filled with before the stream is received.
const FILL: u8 = 0x5a;

fn restore_balloon(state: virtio_devices::VirtioPciState<virtio_devices::BalloonState>) {
    let mem = guest_memory(&RAM);
    let config = BalloonConfig {
        deflate_on_oom: true,
        free_page_reporting: true,
        free_page_hinting: true,
        statistics: true,
        ..Default::default()
    };
    let Ok(balloon) = Balloon::new(&config) else {
        return;
    };
    let Ok(mut dev) = VirtioPciDevice::new(balloon, mem, Arc::new(NullMsi(8)), None) else {
        return;
    };
    let _ = dev.restore(state);
}

fuzz_target!(|data: &[u8]| {
    let Some((&fd_bias, mut stream)) = data.split_first() else {
        return;
    };
    let mem = guest_memory(&RAM);
    for (start, size) in RAM {
        mem.write_slice(&vec![FILL; size], GuestAddress(start))
            .expect("inside RAM");
    }
    let ram = RamRegions::from_guest_memory(mem.as_ref()).expect("valid RAM layout");
    let mut written: Vec<(u64, u64)> = Vec::new();
    while let Ok(header) = RequestHeader::read_from(&mut stream) {
        let ok = match header.command() {
            Command::Start => true,
            Command::Config => protocol::read_payload(&mut stream, &header)
                .ok()
                .is_some_and(|p| decode_config(&p).is_ok()),
            Command::State => match protocol::read_payload(&mut stream, &header) {
                Ok(p) => match decode_state(&p) {
                    Ok(snapshot) => {
                        if let Some(state) = snapshot.balloon {
                            restore_balloon(state);
                        }
                        true
                    }
                    Err(_) => false,
                },
                Err(_) => false,
            },
            Command::Memory => {
                // The table as the receiver will see it: a failed request may still have
                // written part of the ranges it named before failing.
                let mut peek = stream;
                if let Ok(table) = MemoryRangeTable::read_from(&mut peek, header.length(), &ram) {
                    for r in &table {
                        assert!(ram.contains(r), "accepted range {r:?} outside RAM");
                        written.push((r.gpa, r.length));
                    }
                }
                receive_memory(mem.as_ref(), &ram, &header, &mut stream).is_ok()
            }
            Command::MemoryFd => match protocol::read_payload(&mut stream, &header) {
                Ok(p) => {
                    let entries = p.len() / protocol::MEMORY_FD_ENTRY_SIZE as usize;
                    let fds = match fd_bias % 3 {
                        0 => entries,
                        1 => entries + 1,
                        _ => entries.saturating_sub(1),
                    };
                    decode_memory_fd_entries(&p, vec![(); fds]).is_ok()
                }
                Err(_) => false,
            },
            // connections=<n>: the request that announces the added connections, and the one
            // that opens each of them (decoded as the receiver does; no connection is made).
            Command::Connections => match protocol::read_payload(&mut stream, &header) {
                Ok(payload) => vm_migration::striping::ConnectionsRequest::from_bytes(&payload)
                    .map(|c| {
                        let join = vm_migration::striping::JoinRequest::from_bytes(&payload);
                        if let Ok(join) = join {
                            let _ = c.admit(&join, &mut [false; 16]);
                        }
                    })
                    .is_ok(),
                Err(_) => false,
            },
            Command::Join => protocol::read_payload(&mut stream, &header)
                .map(|p| vm_migration::striping::JoinRequest::from_bytes(&p).is_ok())
                .unwrap_or(false),
            Command::Complete | Command::Abandon => false,
        };
        if !ok {
            break;
        }
    }
    // Pages outside every range a table named keep their old contents.
    for (start, size) in RAM {
        let mut buf = vec![0u8; size];
        mem.read_slice(&mut buf, GuestAddress(start))
            .expect("inside RAM");
        for (i, page) in buf.chunks(4096).enumerate() {
            let gpa = start + 4096 * i as u64;
            let named = written.iter().any(|(g, l)| gpa >= *g && gpa - g < *l);
            assert!(
                named || page.iter().all(|b| *b == FILL),
                "page {gpa:#x} written but never named"
            );
        }
    }
});

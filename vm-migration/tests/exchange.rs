//! A whole migration through the public API, the way the VMM drives it: a source thread and a
//! destination thread over a UNIX socket, free page hints in round 0, the guest writing during
//! the migration (tracked by vm-memory's `AtomicBitmap`, standing in for KVM's dirty log), zero
//! page skipping, and the final report's counters.

use std::os::unix::net::UnixStream;
use std::thread;
use std::time::{Duration, Instant};

use vm_memory::bitmap::AtomicBitmap;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};
use vm_migration::protocol::{read_payload, request};
use vm_migration::report::duration_ms;
use vm_migration::{
    receive_memory, send_memory, Command, CountingStream, DirtyLoggingStarted, DirtyRound,
    ErrorReason, HintMode, HintRound, HintsReport, MemoryRange, MigrationReport, MigrationStream,
    RamRegions, RequestHeader, Response, ZeroPageFilter, PAGE_SIZE,
};

type Mem = GuestMemoryMmap<AtomicBitmap>;

const P: u64 = PAGE_SIZE;

fn layout() -> [(GuestAddress, usize); 2] {
    [
        (GuestAddress(0), 256 * P as usize),
        (GuestAddress(0x100_0000), 128 * P as usize),
    ]
}

/// Reads and clears the VMM-side dirty log of every region into a new round.
fn sync_dirty_log(mem: &Mem, ram: &RamRegions) -> DirtyRound {
    let mut round = DirtyRound::new(ram);
    for (index, region) in mem.iter().enumerate() {
        round
            .add_log(index, &region.get_mmap().bitmap().get_and_reset())
            .unwrap();
    }
    round
}

fn start_dirty_logging(mem: &Mem) -> DirtyLoggingStarted {
    for region in mem.iter() {
        region.get_mmap().bitmap().reset();
    }
    DirtyLoggingStarted::confirm()
}

fn page(mem: &Mem, gpa: u64) -> Vec<u8> {
    let mut buf = vec![0u8; P as usize];
    mem.read_slice(&mut buf, GuestAddress(gpa)).unwrap();
    buf
}

/// The destination's request loop.
fn destination(stream: UnixStream) -> (Mem, u64) {
    let mut s = MigrationStream::from(stream);
    s.configure(Some(Duration::from_secs(10))).unwrap();
    let mut mem: Option<(Mem, RamRegions)> = None;
    let mut pages_received = 0;
    loop {
        let header = RequestHeader::read_from(&mut s).unwrap();
        let response = match header.command() {
            Command::Start => Response::Ok,
            Command::Config => {
                let config = read_payload(&mut s, &header).unwrap();
                assert_eq!(config, b"{\"memory\":\"1536K\"}");
                let m = Mem::from_ranges(&layout()).unwrap();
                let ram = RamRegions::from_guest_memory(&m).unwrap();
                mem = Some((m, ram));
                Response::Ok
            }
            Command::Memory => {
                let Some((m, ram)) = &mem else {
                    break;
                };
                match receive_memory(m, ram, &header, &mut s) {
                    Ok(table) => {
                        pages_received += table.total_pages();
                        Response::Ok
                    }
                    Err(e) => Response::error(e.reason(), e.to_string()),
                }
            }
            Command::State => {
                read_payload(&mut s, &header).unwrap();
                Response::Ok
            }
            Command::Complete | Command::Abandon => {
                Response::Ok.write_to(&mut s).unwrap();
                break;
            }
            Command::MemoryFd => Response::error(ErrorReason::Unsupported, "not local"),
            Command::Connections | Command::Join => {
                Response::error(ErrorReason::Unsupported, "one connection")
            }
        };
        let fatal = matches!(response, Response::Error { .. });
        response.write_to(&mut s).unwrap();
        if fatal {
            break;
        }
    }
    (mem.unwrap().0, pages_received)
}

#[test]
fn full_migration_with_hints() {
    let src = Mem::from_ranges(&layout()).unwrap();
    let ram = RamRegions::from_guest_memory(&src).unwrap();
    // Live data in the first 64 pages of each region; pages 64..192 of region 0 hold the stale
    // data of a workload that ended (free, but not zero); the rest is zero.
    for (base, _) in layout() {
        for p in 0..64u64 {
            src.write_obj(p + 1, GuestAddress(base.0 + p * P)).unwrap();
        }
    }
    for p in 64..192u64 {
        src.write_obj(0xdead_u64, GuestAddress(p * P)).unwrap();
    }

    let (a, b) = UnixStream::pair().unwrap();
    let dest = thread::spawn(move || destination(b));
    let started = Instant::now();
    let mut s = CountingStream::new(MigrationStream::from(a));
    s.get_ref()
        .configure(Some(Duration::from_secs(10)))
        .unwrap();

    request(&mut s, Command::Start, &[]).unwrap();
    request(&mut s, Command::Config, b"{\"memory\":\"1536K\"}").unwrap();

    // Round 0: logging first, then the round-0 set, then the hint request.
    let mut round = HintRound::new(&ram, start_dirty_logging(&src));
    let hint_started = Instant::now();
    let cmd_id = round.request(2).unwrap();
    // The guest hints its free memory (pages 64..192 of region 0) in 16-page blocks ...
    for block in 0..8u64 {
        round.apply(cmd_id, MemoryRange::new((64 + block * 16) * P, 16 * P));
    }
    // ... a hostile or buggy hint is rejected ...
    round.apply(cmd_id, MemoryRange::new(0x200_0000, 16 * P));
    // ... and the guest reuses a hinted page before STOP.
    src.write_obj(0xbeef_u64, GuestAddress(100 * P)).unwrap();
    assert!(round.stop(cmd_id));
    let wait = hint_started.elapsed();
    let r0 = round.finish().unwrap();

    let mut zero = ZeroPageFilter::new(&ram);
    let mut report = MigrationReport {
        memory_bytes: ram.total_bytes(),
        hints: HintsReport::from_stats(HintMode::Stock, &r0.stats, wait),
        ..Default::default()
    };
    let mut send_round = |table, s: &mut CountingStream<MigrationStream>| {
        let split = zero.filter(&src, table).unwrap();
        let bytes = send_memory(&src, &split.to_send, s).unwrap();
        Response::read_from(s).unwrap().into_result().unwrap();
        report.rounds += 1;
        report.bytes_sent += bytes;
        report.pages_sent += split.to_send.total_pages();
        report.zero_pages_skipped += split.zero_pages;
    };
    send_round(&r0.table, &mut s);

    // The guest keeps writing: one live page, and zeroes another live page.
    src.write_obj(0x1234_u64, GuestAddress(0x100_0000 + 3 * P))
        .unwrap();
    src.write_obj(0_u64, GuestAddress(5 * P)).unwrap();
    let t1 = sync_dirty_log(&src, &ram).into_table().unwrap();
    send_round(&t1, &mut s);

    // Pause, final sync, state, complete.
    let paused = Instant::now();
    let t2 = sync_dirty_log(&src, &ram).into_table().unwrap();
    send_round(&t2, &mut s);
    request(&mut s, Command::State, b"{}").unwrap();
    request(&mut s, Command::Complete, &[]).unwrap();
    report.downtime_ms = duration_ms(paused.elapsed());
    report.total_ms = duration_ms(started.elapsed());
    report.wire_bytes = s.bytes_written();

    let (dst, pages_received) = dest.join().unwrap();
    for r in ram.regions() {
        for gpa in (r.gpa..r.gpa + r.length).step_by(P as usize) {
            let free = (64 * P..192 * P).contains(&gpa) && gpa != 100 * P;
            if !free {
                assert_eq!(page(&src, gpa), page(&dst, gpa), "page {gpa:#x}");
            }
        }
    }
    // Hinted, unwritten pages were never sent: the destination has zero pages there.
    assert!(page(&dst, 70 * P).iter().all(|&b| b == 0));

    // Round 0: the 128 live pages (the other 128 pages left after hints are zero). Round 1:
    // the hinted page the guest reused, a rewritten live page, and page 5, which the guest
    // zeroed but must be re-sent because the destination holds its old data. Round 2: none.
    assert_eq!(report.rounds, 3);
    assert_eq!(report.pages_sent, 128 + 3);
    assert_eq!(pages_received, report.pages_sent);
    assert_eq!(report.bytes_sent, report.pages_sent * P);
    assert_eq!(report.hints.pages_skipped, 128);
    assert_eq!(report.hints.rejected, 1);
    assert_eq!(report.zero_pages_skipped, 384 - 128 - 128);
    assert!(report.wire_bytes > report.bytes_sent);
    let json = serde_json::to_value(&report).unwrap();
    assert_eq!(json["hints"]["pages_skipped"], 128);
}

#[test]
fn destination_refuses_memory_outside_its_ram() {
    let (a, b) = UnixStream::pair().unwrap();
    let dest = thread::spawn(move || destination(b));
    let mut s = MigrationStream::from(a);
    request(&mut s, Command::Start, &[]).unwrap();
    request(&mut s, Command::Config, b"{\"memory\":\"1536K\"}").unwrap();
    // A source with more RAM than the destination.
    let big = Mem::from_ranges(&[(GuestAddress(0), 1024 * P as usize)]).unwrap();
    let table =
        vm_migration::MemoryRangeTable::from_ranges([MemoryRange::new(512 * P, P)]).unwrap();
    // The destination refuses the table and hangs up, possibly before the pages are written:
    // the write may fail, and the refusal is still there to read.
    if let Err(e) = send_memory(&big, &table, &mut s) {
        eprintln!("sending the refused pages: {e}");
    }
    match Response::read_from(&mut s).unwrap() {
        Response::Error { reason, .. } => assert_eq!(reason, ErrorReason::InvalidMemory),
        Response::Ok => panic!("accepted memory outside RAM"),
    }
    let (dst, received) = dest.join().unwrap();
    assert_eq!(received, 0);
    assert!(dst.iter().all(|r| r
        .get_mmap()
        .bitmap()
        .get_and_reset()
        .iter()
        .all(|&w| w == 0)));
}

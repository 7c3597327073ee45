//! Both sides of `connections=<n>` over a real UNIX listener: the source's threads, the
//! destination's threads, and guest memory compared page by page.

use std::sync::Arc;
use std::thread;

use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};
use vm_migration::protocol::{self, Command, RequestHeader};
use vm_migration::striping::ConnectionsRequest;
use vm_migration::{
    receive_memory, CountingStream, MemoryRange, MemoryRangeTable, MigrationListener, RamRegions,
    Response, PAGE_SIZE,
};

use super::receive::{ReceiveStripes, StripeContext};
use super::send::SendStripes;
use super::*;
use crate::memory::GuestMemoryMmap;
use crate::seccomp::SeccompMode;

const MIB: usize = 1 << 20;

fn memory(fill: bool) -> Arc<GuestMemoryMmap> {
    let mem = GuestMemoryMmap::from_ranges(&[
        (GuestAddress(0), 16 * MIB),
        (GuestAddress(1 << 32), 8 * MIB),
    ])
    .unwrap();
    if fill {
        for region_base in [0u64, 1 << 32] {
            for page in 0..(8 * MIB as u64 / PAGE_SIZE) {
                let gpa = region_base + page * PAGE_SIZE;
                mem.write_obj(gpa ^ 0x5a5a_5a5a, GuestAddress(gpa)).unwrap();
            }
        }
    }
    Arc::new(mem)
}

/// The destination: serves Connections, Memory (on the first connection) and Complete.
fn destination(
    listener: MigrationListener,
    mem: Arc<GuestMemoryMmap>,
) -> Result<(), MigrationError> {
    let ram = RamRegions::from_guest_memory(mem.as_ref()).unwrap();
    let mut main = listener.accept(None, Some(IO_TIMEOUT)).unwrap();
    let mut stripes = None;
    loop {
        let header = RequestHeader::read_from(&mut main).map_err(MigrationError::Protocol)?;
        match header.command() {
            Command::Connections => {
                let payload = protocol::read_payload(&mut main, &header).unwrap();
                let request = ConnectionsRequest::from_bytes(&payload).unwrap();
                let context = StripeContext {
                    listener: &listener,
                    tls: None,
                    memory: &mem,
                    ram: &ram,
                    seccomp: SeccompMode::Disabled,
                };
                stripes = Some(ReceiveStripes::accept(&request, &context, || Ok(()))?);
            }
            Command::Memory => {
                receive_memory(mem.as_ref(), &ram, &header, &mut main)
                    .map_err(MigrationError::Memory)?;
            }
            Command::Complete => {
                let result = stripes.take().map_or(Ok(()), ReceiveStripes::finish);
                Response::Ok.write_to(&mut main).unwrap();
                return result;
            }
            Command::Abandon => return Err(MigrationError::Abandoned),
            other => panic!("unexpected {other}"),
        }
        Response::Ok.write_to(&mut main).unwrap();
    }
}

#[test]
fn a_round_split_over_four_connections_arrives_whole() {
    let dir = vmm_sys_util::tempdir::TempDir::new().unwrap();
    let url = MigrationUrl::Unix(dir.as_path().join("mig.sock"));
    let listener = MigrationListener::bind(&url).unwrap();
    let (src, dst) = (memory(true), memory(false));
    let receiver = thread::spawn({
        let dst = dst.clone();
        move || destination(listener, dst)
    });
    let mut main = CountingStream::new(connect(&url, None).unwrap());
    let mut stripes =
        SendStripes::open(&mut main, &url, 4, None, &src, SeccompMode::Disabled).unwrap();
    assert_eq!(stripes.connections(), 4);
    // Two rounds; the second sends some pages again (a dirty round).
    let round0 = MemoryRangeTable::from_ranges([
        MemoryRange::new(0, 8 * MIB as u64),
        MemoryRange::new(1 << 32, 8 * MIB as u64),
    ])
    .unwrap();
    let sent = stripes.send_round(&src, &round0, &mut main).unwrap();
    assert_eq!(sent, 16 * MIB as u64);
    src.write_obj(0xfeed_u64, GuestAddress(5 * PAGE_SIZE))
        .unwrap();
    let dirty =
        MemoryRangeTable::from_ranges([MemoryRange::new(5 * PAGE_SIZE, PAGE_SIZE)]).unwrap();
    assert_eq!(
        stripes.send_round(&src, &dirty, &mut main).unwrap(),
        PAGE_SIZE
    );
    assert!(
        stripes.wire_bytes() > 8 * MIB as u64,
        "the added connections carried parts"
    );
    protocol::request(&mut main, Command::Complete, &[]).unwrap();
    receiver.join().unwrap().unwrap();
    drop(stripes);
    for gpa in (0..8 * MIB as u64)
        .step_by(PAGE_SIZE as usize)
        .chain(((1u64 << 32)..(1u64 << 32) + 8 * MIB as u64).step_by(PAGE_SIZE as usize))
    {
        let (a, b): (u64, u64) = (
            src.read_obj(GuestAddress(gpa)).unwrap(),
            dst.read_obj(GuestAddress(gpa)).unwrap(),
        );
        assert_eq!(a, b, "page {gpa:#x}");
    }
    // The part of RAM that was never sent stays untouched on the destination.
    let untouched: u64 = dst.read_obj(GuestAddress(12 * MIB as u64)).unwrap();
    assert_eq!(untouched, 0);
    assert!(dst.check_range(GuestAddress(0), 16 * MIB));
}

#[test]
fn a_part_outside_the_destination_s_ram_fails_the_round_and_names_its_connection() {
    let dir = vmm_sys_util::tempdir::TempDir::new().unwrap();
    let url = MigrationUrl::Unix(dir.as_path().join("mig.sock"));
    let listener = MigrationListener::bind(&url).unwrap();
    let src = memory(true);
    // The destination has less RAM: the second region is missing there.
    let dst = Arc::new(GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 16 * MIB)]).unwrap());
    let receiver = thread::spawn({
        let dst = dst.clone();
        move || destination(listener, dst)
    });
    let mut main = CountingStream::new(connect(&url, None).unwrap());
    let mut stripes =
        SendStripes::open(&mut main, &url, 2, None, &src, SeccompMode::Disabled).unwrap();
    let table = MemoryRangeTable::from_ranges([
        MemoryRange::new(0, 4 * MIB as u64),
        MemoryRange::new(1 << 32, 4 * MIB as u64),
    ])
    .unwrap();
    let err = stripes.send_round(&src, &table, &mut main).unwrap_err();
    let text = crate::api::error_chain(&err);
    assert!(text.starts_with("migration connection 1 failed:"), "{text}");
    // The destination's answer (the write itself may fail first: the destination closes).
    assert!(text.contains("is outside guest RAM"), "{text}");
    // The source gives up: the destination's first connection ends, and so does its side.
    drop(stripes);
    let _ = protocol::write_request(&mut main, Command::Abandon, &[]);
    drop(main);
    assert!(receiver.join().unwrap().is_err());
}

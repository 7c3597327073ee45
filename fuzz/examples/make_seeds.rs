//! Writes the seed corpus of every fuzz target to `fuzz/corpus/<target>/`, from real encoders
//! and real device states: valid migration streams (the VM state taken from a fresh KVM VM, so
//! it needs /dev/kvm), balloon driver sessions, virtio-pci driver initialisation, conf1 probing
//! and API requests.
//!
//!   cd fuzz && cargo +nightly run --release --example make_seeds

use std::fs;
use std::path::Path;

use hypervisor::{Hypervisor, KvmHypervisor};
use virtio_devices::PciDevice;
use vm_migration::protocol::{Command, RequestHeader, MEMORY_FD_ENTRY_SIZE};
use vm_migration::{MemoryRange, MemoryRangeTable, RamRegions};
use vmm::config::{BalloonConfig, MemoryConfig, VmConfig};
use vmm::vm::VmSnapshot;
use vmm_fuzz::PciMachine;

fn write(target: &str, name: &str, bytes: &[u8]) {
    let dir = Path::new("corpus").join(target);
    fs::create_dir_all(&dir).expect("corpus directory");
    fs::write(dir.join(name), bytes).expect("seed file");
}

fn frame(command: Command, payload: &[u8]) -> Vec<u8> {
    let mut out = RequestHeader::new(command, payload.len() as u64)
        .expect("valid length")
        .to_bytes()
        .to_vec();
    out.extend_from_slice(payload);
    out
}

/// What the fuzz target's RAM looks like.
fn fuzz_ram() -> RamRegions {
    RamRegions::new([
        MemoryRange::new(0, 0x10000),
        MemoryRange::new(0x10_0000, 0x10000),
    ])
    .expect("valid RAM")
}

fn memory_frame(ranges: &[(u64, u64)]) -> Vec<u8> {
    let table = MemoryRangeTable::from_ranges(ranges.iter().map(|(g, l)| MemoryRange::new(*g, *l)))
        .expect("valid table");
    let wire = table.to_wire_bytes();
    assert!(MemoryRangeTable::from_wire_bytes(&wire, &fuzz_ram()).is_ok());
    let mut out = frame(Command::Memory, &wire);
    for (i, (_, len)) in ranges.iter().enumerate() {
        out.extend(std::iter::repeat_n(i as u8 + 1, *len as usize));
    }
    out
}

fn snapshot(balloon: bool) -> Vec<u8> {
    let hv = KvmHypervisor::new().expect("/dev/kvm");
    let vm = hv.create_vm().expect("a KVM VM");
    vm.create_irqchip().expect("an irqchip");
    let vcpu = vm.create_vcpu(0).expect("a vCPU");
    let balloon = balloon.then(|| {
        let m = PciMachine::new();
        driver_init(&m);
        let state = m.dev.lock().expect("not poisoned").state();
        state
    });
    let snap = VmSnapshot {
        vm: vm.state().expect("VM state"),
        vcpus: vec![vcpu.state().expect("vCPU state")],
        balloon,
        paused: false,
    };
    serde_json::to_vec(&snap).expect("serializes")
}

fn migration_seeds() {
    let config = VmConfig {
        memory: MemoryConfig {
            size: 1 << 30,
            ..Default::default()
        },
        ..Default::default()
    };
    let config_json = serde_json::to_vec(&config).expect("serializes");
    let with_balloon = VmConfig {
        balloon: Some(BalloonConfig {
            size: 64 << 20,
            free_page_hinting: true,
            statistics: true,
            ..Default::default()
        }),
        ..config.clone()
    };
    let balloon_json = serde_json::to_vec(&with_balloon).expect("serializes");

    let mut s = vec![0u8];
    s.extend(frame(Command::Start, &[]));
    s.extend(frame(Command::Config, &config_json));
    s.extend(memory_frame(&[(0, 0x2000), (0x10_0000, 0x1000)]));
    s.extend(memory_frame(&[(0x8000, 0x1000)]));
    s.extend(frame(Command::State, &snapshot(false)));
    s.extend(frame(Command::Complete, &[]));
    write("migration_receive", "full-migration", &s);

    let mut s = vec![0u8];
    s.extend(frame(Command::Start, &[]));
    s.extend(frame(Command::Config, &balloon_json));
    s.extend(frame(Command::State, &snapshot(true)));
    s.extend(frame(Command::Complete, &[]));
    write("migration_receive", "state-with-balloon", &s);

    let mut entries = Vec::new();
    for (g, l, o) in [(0u64, 0x10000u64, 0u64), (0x10_0000, 0x10000, 0x10000)] {
        for v in [g, l, o] {
            entries.extend_from_slice(&v.to_le_bytes());
        }
    }
    assert_eq!(entries.len() as u64, 2 * MEMORY_FD_ENTRY_SIZE);
    let mut s = vec![0u8];
    s.extend(frame(Command::Start, &[]));
    s.extend(frame(Command::Config, &config_json));
    s.extend(frame(Command::MemoryFd, &entries));
    s.extend(frame(Command::Abandon, &[]));
    write("migration_receive", "local-mode", &s);
}

// ---- balloon_queues: offer, acked features, enabled queues, operations ----

const VERSION_1: u64 = 1 << 32;
const STATS: u64 = 1 << 1;
const DEFLATE_ON_OOM: u64 = 1 << 2;
const HINT: u64 = 1 << 3;
const POISON: u64 = 1 << 4;
const REPORTING: u64 = 1 << 5;
const HINT_RANGES: u64 = 1 << 60;

fn balloon_header(acked: u64) -> Vec<u8> {
    let mut s = vec![0x0f];
    s.extend_from_slice(&acked.to_le_bytes());
    s.push(0xff);
    s
}

/// Op 0: one buffer with `data` on queue `q`.
fn data_op(s: &mut Vec<u8>, q: u8, write: bool, data: &[u8]) {
    s.extend_from_slice(&[0, q, write as u8]);
    s.extend_from_slice(&(data.len() as u16).to_le_bytes());
    s.extend_from_slice(data);
}

/// Op 15: a buffer of whole pages of RAM on queue `q`.
fn pages_op(s: &mut Vec<u8>, q: u8, page: u16, pages: u16, write: bool) {
    s.extend_from_slice(&[15, q]);
    s.extend_from_slice(&page.to_le_bytes());
    s.extend_from_slice(&pages.to_le_bytes());
    s.push(write as u8);
}

fn balloon_seeds() {
    let all = VERSION_1 | STATS | DEFLATE_ON_OOM | HINT | REPORTING;
    // Queues with every feature: inflate 0, deflate 1, stats 2, free page 3, reporting 4.
    let pfns: Vec<u8> = (0x300u32..0x340).flat_map(|p| p.to_le_bytes()).collect();
    let mut s = balloon_header(all);
    s.extend_from_slice(&[8, 0x00, 0x10, 0, 0]); // resize to 1 MiB
    data_op(&mut s, 0, false, &pfns);
    s.extend_from_slice(&[6, 0]);
    data_op(&mut s, 1, false, &pfns[..64]);
    s.extend_from_slice(&[6, 1]);
    s.extend_from_slice(&[14, 0, 16]);
    write("balloon_queues", "inflate-deflate", &s);

    let stats: Vec<u8> = [(0u16, 4096u64), (4, 1 << 30), (5, 1 << 29), (8, 1 << 28)]
        .iter()
        .flat_map(|(t, v)| t.to_le_bytes().into_iter().chain(v.to_le_bytes()))
        .collect();
    let mut s = balloon_header(all);
    data_op(&mut s, 2, false, &stats);
    s.extend_from_slice(&[6, 2, 12]);
    data_op(&mut s, 2, false, &stats);
    s.extend_from_slice(&[7]);
    write("balloon_queues", "statistics", &s);

    let mut s = balloon_header(all);
    s.push(9); // start a round: id 2
    data_op(&mut s, 3, false, &2u32.to_le_bytes());
    pages_op(&mut s, 3, 0x400, 0x400, true);
    pages_op(&mut s, 3, 0x800, 0x400, true);
    s.extend_from_slice(&[6, 3]);
    data_op(&mut s, 3, false, &0u32.to_le_bytes());
    s.extend_from_slice(&[6, 3, 11]);
    write("balloon_queues", "hints-stock", &s);

    let ranges: Vec<u8> = [(0x40_0000u64, 0x10_0000u64), (0x60_0000, 0x1000)]
        .iter()
        .flat_map(|(g, l)| g.to_le_bytes().into_iter().chain(l.to_le_bytes()))
        .collect();
    let mut s = balloon_header(all | HINT_RANGES);
    s.push(9);
    data_op(&mut s, 3, false, &2u32.to_le_bytes());
    data_op(&mut s, 3, false, &ranges);
    s.extend_from_slice(&[6, 3, 10, 11]);
    write("balloon_queues", "hints-ranges", &s);

    let mut s = balloon_header(all | POISON);
    s.extend_from_slice(&[13, 12, 4, 0xaa, 0xaa, 0xaa, 0xaa]);
    pages_op(&mut s, 4, 0x500, 0x200, true);
    pages_op(&mut s, 4, 0x900, 0x200, true);
    s.extend_from_slice(&[6, 4, 7]);
    write("balloon_queues", "reporting", &s);
}

// ---- virtio_pci and pci_conf1 ----

/// BAR writes (op 1) that bring the balloon up as a Linux driver does: features, five queues
/// with rings in RAM, DRIVER_OK, then a notification per queue.
fn driver_ops() -> Vec<u8> {
    let mut s = Vec::new();
    let mut w = |offset: u16, value: &[u8]| {
        s.push(1);
        s.extend_from_slice(&offset.to_le_bytes());
        s.push(value.len() as u8);
        s.extend_from_slice(value);
    };
    w(0x14, &[1]);
    w(0x14, &[3]);
    w(0x08, &0u32.to_le_bytes());
    w(
        0x0c,
        &((STATS | DEFLATE_ON_OOM | HINT | REPORTING) as u32).to_le_bytes(),
    );
    w(0x08, &1u32.to_le_bytes());
    w(0x0c, &1u32.to_le_bytes());
    w(0x14, &[0x0b]);
    for q in 0..5u16 {
        let base = 0x10_0000u64 + 0x1_0000 * u64::from(q);
        w(0x16, &q.to_le_bytes());
        w(0x18, &64u16.to_le_bytes());
        w(0x1a, &(q + 1).to_le_bytes());
        w(0x20, &base.to_le_bytes());
        w(0x28, &(base + 0x400).to_le_bytes());
        w(0x30, &(base + 0x800).to_le_bytes());
        w(0x1c, &1u16.to_le_bytes());
    }
    w(0x10, &0u16.to_le_bytes());
    w(0x14, &[0x0f]);
    for q in 0..5u16 {
        w(0x3000 + 4 * q, &q.to_le_bytes());
    }
    s
}

/// Runs [`driver_ops`] on a machine's device (for a state with an active device).
fn driver_init(m: &PciMachine) {
    let ops = driver_ops();
    let mut i = 0;
    let mut dev = m.dev.lock().expect("not poisoned");
    while i < ops.len() {
        let offset = u64::from(u16::from_le_bytes([ops[i + 1], ops[i + 2]]));
        let len = usize::from(ops[i + 3]);
        dev.write_bar(0, offset, &ops[i + 4..i + 4 + len]);
        i += 4 + len;
    }
}

fn pci_seeds() {
    let mut s = driver_ops();
    // Read back the common config, the ISR and the device config.
    for (offset, size) in [
        (0x00u16, 4u8),
        (0x04, 4),
        (0x12, 2),
        (0x14, 1),
        (0x1000, 1),
        (0x2000, 8),
    ] {
        s.push(0);
        s.extend_from_slice(&offset.to_le_bytes());
        s.push(size);
    }
    // MSI-X table entry 1, unmasked, then a state round trip.
    s.extend_from_slice(&[1, 0x10, 0x40, 8, 0, 0, 0xe0, 0xfe, 0, 0, 0, 0]);
    s.extend_from_slice(&[1, 0x1c, 0x40, 4, 0, 0, 0, 0]);
    s.extend_from_slice(&[4, 5, 6]);
    write("virtio_pci", "driver-init", &s);
    write("virtio_pci", "driver-init-only", &driver_ops());

    let addr = |slot: u32, reg: u32| (0x8000_0000u32 | slot << 11 | reg << 2).to_le_bytes();
    let mut s = Vec::new();
    let mut out = |port: u8, data: &[u8]| {
        s.extend_from_slice(&[1, port, data.len() as u8]);
        s.extend_from_slice(data);
    };
    for slot in [0, 1, 2] {
        out(0, &addr(slot, 0));
        out(4, &[]);
    }
    let mut probe = Vec::new();
    for (slot, reg) in [
        (0u32, 0u32),
        (1, 0),
        (1, 1),
        (1, 2),
        (1, 3),
        (1, 11),
        (1, 13),
    ] {
        probe.extend_from_slice(&[1, 0, 4]);
        probe.extend_from_slice(&addr(slot, reg));
        probe.extend_from_slice(&[0, 4, 4]);
    }
    // BAR 0 sizing and a move, memory decoding on, a capability walk, 16-bit and 8-bit reads.
    let mut bar = Vec::new();
    for (reg, value) in [(4u32, 0xffff_ffffu32), (4, 0xd000_0000), (1, 0x0006)] {
        bar.extend_from_slice(&[1, 0, 4]);
        bar.extend_from_slice(&addr(1, reg));
        bar.extend_from_slice(&[0, 4, 4, 1, 4, 4]);
        bar.extend_from_slice(&value.to_le_bytes());
        bar.extend_from_slice(&[0, 4, 4]);
    }
    bar.extend_from_slice(&[1, 0, 4]);
    bar.extend_from_slice(&addr(1, 13));
    bar.extend_from_slice(&[0, 4, 1, 0, 6, 2, 0, 7, 1]);
    write("pci_conf1", "probe", &probe);
    write("pci_conf1", "bar-sizing", &bar);
    let _ = s;
}

fn api_seeds() {
    let req = |method: &str, path: &str, body: &str| {
        let mut r = format!("{method} /api/v1/{path} HTTP/1.1\r\nHost: localhost\r\n");
        if !body.is_empty() {
            r.push_str(&format!(
                "Content-Type: application/json\r\nContent-Length: {}\r\n",
                body.len()
            ));
        }
        r.push_str("\r\n");
        r.push_str(body);
        r.into_bytes()
    };
    let create = serde_json::to_string(&VmConfig {
        memory: MemoryConfig {
            size: 1 << 30,
            ..Default::default()
        },
        payload: vmm::config::PayloadConfig {
            kernel: Some("/boot/vmlinuz".into()),
            cmdline: Some("console=ttyS0".into()),
            initramfs: None,
        },
        ..Default::default()
    })
    .expect("serializes");
    let seeds: [(&str, Vec<u8>); 9] = [
        ("ping", req("GET", "vmm.ping", "")),
        ("info", req("GET", "vm.info?verbose=1", "")),
        ("create", req("PUT", "vm.create", &create)),
        ("resize", req("PUT", "vm.resize", r#"{"desired_balloon":268435456}"#)),
        (
            "send-migration",
            req(
                "PUT",
                "vm.send-migration",
                r#"{"destination_url":"tcp:127.0.0.1:6000","downtime_ms":300,"free_page_hints":true}"#,
            ),
        ),
        (
            "receive-migration",
            req("PUT", "vm.receive-migration", r#"{"receiver_url":"unix:/tmp/mig.sock"}"#),
        ),
        ("hints-get", req("GET", "vm.balloon-hints", "")),
        ("hints-put", req("PUT", "vm.balloon-hints", r#"{"action":"start"}"#)),
        (
            "expect-continue",
            b"PUT /api/v1/vm.resize HTTP/1.1\r\nExpect: 100-continue\r\nContent-Length: 26\r\n\r\n{\"desired_balloon\":4096}  "
                .to_vec(),
        ),
    ];
    for (name, bytes) in seeds {
        write("api_request", name, &bytes);
    }
}

fn main() {
    migration_seeds();
    balloon_seeds();
    pci_seeds();
    api_seeds();
}

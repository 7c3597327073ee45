//! The balloon's queue handling (inflate, deflate, statistics, free page reporting, free page
//! hints in stock and ranges mode) driven through real split virtqueues in guest memory, with
//! a driver built from fuzz input: well-formed chains of buffers whose bytes come from the
//! input, raw descriptors, wild available indices, notifications, and the VMM's side (resize,
//! hint rounds, statistics requests, config space). The device must never panic, must account
//! every hint it accepts inside RAM, and must not grow the used ring past what was offered.
//!
//! Input: offered features (u8: deflate-on-OOM, reporting, hinting, statistics), the driver's
//! features (u64), the queues it enables (u8 bit mask), then operations (see the match).
#![no_main]

use std::sync::{Arc, Mutex};

use libfuzzer_sys::fuzz_target;
use virtio_devices::balloon::fuzzing::BalloonQueueDriver;
use virtio_devices::balloon::{queue_layout, QueueKind};
use virtio_devices::test_utils::TestQueue;
use virtio_devices::{Balloon, BalloonConfig, HintRound, VirtioDevice, VirtioQueue};
use vm_memory::{Bytes, GuestAddress};
use vmm_fuzz::{guest_memory, CountingInterrupt, FuzzInput};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

const RAM_SIZE: u64 = 16 << 20;
const RINGS: u64 = 0x10_0000;
const SCRATCH: u64 = 0x20_0000;
const SCRATCH_SIZE: u64 = 0x10_0000;

fuzz_target!(|data: &[u8]| {
    let mut input = FuzzInput(data);
    let offer = input.u8();
    let wanted = input.u64();
    let enabled = input.u8();
    let config = BalloonConfig {
        size: 0,
        deflate_on_oom: offer & 1 != 0,
        free_page_reporting: offer & 2 != 0,
        free_page_hinting: offer & 4 != 0,
        statistics: offer & 8 != 0,
        stats_interval: None,
    };
    let Ok(mut balloon) = Balloon::new(&config) else {
        return;
    };
    let offered = balloon.features();
    balloon.ack_features(wanted & offered);
    let acked = wanted & offered;
    let mem = guest_memory(&[(0, RAM_SIZE as usize)]);
    let mut drivers: Vec<(QueueKind, TestQueue)> = Vec::new();
    let mut vqs = Vec::new();
    for (i, kind) in queue_layout(acked).into_iter().enumerate() {
        if enabled & (1 << i) == 0 {
            continue;
        }
        let size = if kind == QueueKind::FreePage {
            1024
        } else {
            64
        };
        let dq = TestQueue::new(&mem, RINGS + 0x1_0000 * i as u64, size);
        vqs.push(VirtioQueue {
            index: i as u16,
            queue: Arc::new(Mutex::new(dq.queue())),
            event: Arc::new(EventFd::new(EFD_NONBLOCK).expect("eventfd")),
        });
        drivers.push((kind, dq));
    }
    let irq = Arc::new(CountingInterrupt::default());
    let Ok(mut dev) = BalloonQueueDriver::activate(balloon, mem.clone(), irq, vqs) else {
        return;
    };
    let handle = dev.handle();
    let mut rounds: Vec<HintRound> = Vec::new();
    let mut offered_bufs = vec![0u32; drivers.len()];
    let mut cursor = 0u64;
    let pick = |q: u8, n: usize| (n > 0).then(|| usize::from(q) % n);
    let mut steps = 0;
    while input.more() && steps < 256 {
        steps += 1;
        match input.u8() % 16 {
            // One buffer holding input bytes (written to the scratch area).
            0 => {
                let queue = input.u8();
                let write = input.u8() & 1 != 0;
                let len = usize::from(input.u16()) % 0x4001;
                let bytes = input.take(len);
                let Some(q) = pick(queue, drivers.len()) else {
                    continue;
                };
                let len = bytes.len() as u64;
                if cursor + len > SCRATCH_SIZE {
                    cursor = 0;
                }
                let addr = SCRATCH + cursor;
                let _ = mem.write_slice(&bytes, GuestAddress(addr));
                cursor = (cursor + len + 15) & !15;
                drivers[q].1.add_chain(&[(addr, len as u32, write)]);
                offered_bufs[q] += 1;
            }
            // A well-formed chain of arbitrary buffers.
            1 => {
                let queue = input.u8();
                let n = input.u8() % 8;
                let bufs: Vec<(u64, u32, bool)> = (0..n)
                    .map(|_| {
                        let addr = if input.u8() & 1 != 0 {
                            SCRATCH + u64::from(input.u16())
                        } else {
                            input.u64()
                        };
                        (addr, input.u32(), input.u8() & 1 != 0)
                    })
                    .collect();
                let Some(q) = pick(queue, drivers.len()) else {
                    continue;
                };
                if !bufs.is_empty() {
                    drivers[q].1.add_chain(&bufs);
                    offered_bufs[q] += 1;
                }
            }
            // A raw descriptor.
            2 => {
                let queue = input.u8();
                let (index, addr, len) = (input.u16(), input.u64(), input.u32());
                let (flags, next) = (input.u16(), input.u16());
                let Some(q) = pick(queue, drivers.len()) else {
                    continue;
                };
                drivers[q].1.write_desc(index, addr, len, flags, next);
            }
            // A raw head in the available ring.
            3 => {
                let queue = input.u8();
                let head = input.u16();
                let Some(q) = pick(queue, drivers.len()) else {
                    continue;
                };
                drivers[q].1.publish(head);
                offered_bufs[q] += 1;
            }
            // A raw available index.
            4 => {
                let queue = input.u8();
                let idx = input.u16();
                let Some(q) = pick(queue, drivers.len()) else {
                    continue;
                };
                drivers[q].1.set_avail_idx(idx);
                offered_bufs[q] = u32::MAX / 2;
            }
            // Bytes into the scratch area.
            5 => {
                let offset = input.u16();
                let len = usize::from(input.u8());
                let bytes = input.take(len);
                let _ = mem.write_slice(&bytes, GuestAddress(SCRATCH + u64::from(offset)));
            }
            6 => {
                if let Some(q) = pick(input.u8(), drivers.len()) {
                    dev.notify(q);
                }
            }
            7 => dev.process_all(),
            8 => {
                let _ = handle.resize(u64::from(input.u32()) << 12);
            }
            9 => {
                if let Ok(round) = handle.start_hint_round() {
                    rounds.push(round);
                }
            }
            10 => {
                let _ = handle.stop_hint_round();
            }
            11 => {
                let _ = handle.hint_done();
            }
            12 => {
                let _ = handle.request_stats();
            }
            13 => {
                let offset = u64::from(input.u8());
                let len = usize::from(input.u8() % 17);
                let bytes = input.take(len);
                dev.balloon().write_config(offset, &bytes);
            }
            14 => {
                let offset = u64::from(input.u8());
                let mut buf = vec![0u8; usize::from(input.u8())];
                dev.balloon().read_config(offset, &mut buf);
            }
            // A buffer of whole pages of RAM (what a stock-mode hint or a report looks like).
            _ => {
                let queue = input.u8();
                let (page, pages) = (u64::from(input.u16()), u64::from(input.u16()));
                let write = input.u8() & 1 != 0;
                let Some(q) = pick(queue, drivers.len()) else {
                    continue;
                };
                let len = u32::try_from(pages << 12).unwrap_or(u32::MAX);
                drivers[q].1.add_chain(&[(page << 12, len, write)]);
                offered_bufs[q] += 1;
            }
        }
        for round in &rounds {
            for r in round.take_ranges() {
                assert!(
                    r.len > 0 && r.gpa % 4096 == 0 && r.len % 4096 == 0,
                    "hint {r:?} not whole pages"
                );
                assert!(
                    r.gpa.checked_add(r.len).is_some_and(|end| end <= RAM_SIZE),
                    "hint {r:?} outside RAM"
                );
            }
        }
    }
    dev.process_all();
    for ((_, dq), offered) in drivers.iter().zip(&offered_bufs) {
        let used = u32::from(dq.used_idx());
        assert!(
            *offered >= u32::from(u16::MAX) || used <= *offered,
            "{used} buffers used of {offered} offered"
        );
    }
    let _ = handle.counters();
    let _ = handle.hint_status();
    let _ = handle.stats();
});

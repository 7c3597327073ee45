//! What real drivers (Linux virtio_pci among them) do that a minimal driver does not: enable
//! only some queues, in any order, shrink queues, read vectors back, ack features in halves,
//! reset and start over. And how a refused setup shows in [`ActivationReport`].

use super::*;

/// Set up queue `index` with `tq` the way Linux does: size, vector (returns what reads back),
/// rings as 32-bit halves, then `queue_notify_off`; `queue_enable` is left to the caller.
fn configure_queue(p: &mut VirtioPciDevice<Dummy>, index: u16, tq: &TestQueue, vector: u16) -> u16 {
    w16(p, 0x16, index);
    assert_eq!(r16(p, 0x1C), 0, "not enabled yet");
    w16(p, 0x18, tq.size);
    w16(p, 0x1A, vector);
    let got = r16(p, 0x1A);
    for (off, addr) in [(0x20, tq.desc), (0x28, tq.avail), (0x30, tq.used)] {
        w32(p, off, addr as u32);
        w32(p, off + 4, (addr >> 32) as u32);
    }
    assert_eq!(r16(p, 0x1E), index, "queue_notify_off");
    got
}

fn enable(p: &mut VirtioPciDevice<Dummy>, index: u16) {
    w16(p, 0x16, index);
    w16(p, 0x1C, 1);
}

fn queue_indexes(p: &VirtioPciDevice<Dummy>) -> Vec<u16> {
    p.device().queues.iter().map(|q| q.index).collect()
}

#[test]
fn queues_enabled_in_any_order_keep_their_indexes() {
    let mut f = fixture();
    assert_eq!(negotiate(&mut f.pci, V1), OK);
    let q2 = TestQueue::new(&f.mem, 0x1000, 8);
    let q0 = TestQueue::new(&f.mem, 0x4000, 16);
    configure_queue(&mut f.pci, 2, &q2, VIRTIO_MSI_NO_VECTOR);
    configure_queue(&mut f.pci, 0, &q0, VIRTIO_MSI_NO_VECTOR);
    enable(&mut f.pci, 2);
    enable(&mut f.pci, 0);
    w8(&mut f.pci, 0x14, OK | DEVICE_DRIVER_OK);
    let report = f.pci.activation();
    assert!(report.activated);
    assert_eq!(report.queues_enabled, vec![0, 2]);
    assert_eq!(report.activation_error, None);
    assert_eq!(report.device_status, OK | DEVICE_DRIVER_OK);
    // Queue 1 was never enabled: the device gets the other two, by their own index.
    assert_eq!(queue_indexes(&f.pci), vec![0, 2]);
}

#[test]
fn a_smaller_queue_size_is_used() {
    let mut f = fixture();
    assert_eq!(negotiate(&mut f.pci, V1), OK);
    let p = &mut f.pci;
    w16(p, 0x16, 0);
    assert_eq!(r16(p, 0x18), 16, "the maximum");
    // Not a power of two, or above the maximum: refused, the size stays.
    w16(p, 0x18, 12);
    assert_eq!(r16(p, 0x18), 16);
    w16(p, 0x18, 32);
    assert_eq!(r16(p, 0x18), 16);
    let mut tq = TestQueue::new(&f.mem, 0x1000, 4);
    configure_queue(p, 0, &tq, VIRTIO_MSI_NO_VECTOR);
    assert_eq!(r16(p, 0x18), 4);
    enable(p, 0);
    w8(p, 0x14, OK | DEVICE_DRIVER_OK);
    assert!(p.is_activated());
    let q = p.device().queues[0].queue.clone();
    use virtio_queue::QueueT;
    assert_eq!(q.lock().unwrap().size(), 4);
    // The device walks the small ring correctly across its wrap.
    f.mem.write_obj(0u64, GuestAddress(0x8000)).unwrap();
    for round in 0..6u16 {
        tq.add_chain(&[(0x8000, 8, false)]);
        let mut q = q.lock().unwrap();
        let chain = q.pop_descriptor_chain(f.mem.as_ref()).unwrap();
        q.add_used(f.mem.as_ref(), chain.head_index(), 0).unwrap();
        assert_eq!(tq.used_idx(), round + 1);
    }
}

#[test]
fn msix_vectors_read_back_and_may_be_shared() {
    let mut f = fixture();
    enable_msix(&mut f.pci, MSIX_CTL_ENABLE);
    for v in 0..2 {
        program_vector(&mut f.pci, v, 0x40 + v as u32);
    }
    assert_eq!(negotiate(&mut f.pci, V1), OK);
    let p = &mut f.pci;
    // The table has config + 3 queue vectors (0..=3): 4 and beyond read back as NO_VECTOR,
    // which is how Linux learns it must fall back to fewer vectors.
    w16(p, 0x10, 4);
    assert_eq!(r16(p, 0x10), VIRTIO_MSI_NO_VECTOR);
    w16(p, 0x10, 0);
    assert_eq!(r16(p, 0x10), 0);
    let tqs: Vec<TestQueue> = (0..3)
        .map(|i| TestQueue::new(&f.mem, 0x1000 + i * 0x1000, 8))
        .collect();
    assert_eq!(configure_queue(p, 0, &tqs[0], 7), VIRTIO_MSI_NO_VECTOR);
    // Linux's fallback: one vector for configuration changes, one shared by every queue.
    for (i, tq) in tqs.iter().enumerate() {
        assert_eq!(configure_queue(p, i as u16, tq, 1), 1);
        enable(p, i as u16);
    }
    // A queue without a callback gets NO_VECTOR, and reads it back.
    w16(p, 0x16, 2);
    w16(p, 0x1A, VIRTIO_MSI_NO_VECTOR);
    assert_eq!(r16(p, 0x1A), VIRTIO_MSI_NO_VECTOR);
    w8(p, 0x14, OK | DEVICE_DRIVER_OK);
    let irq = p.device().interrupt.clone().unwrap();
    for q in 0..3 {
        irq.trigger(VirtioInterruptType::Queue(q)).unwrap();
    }
    irq.trigger(VirtioInterruptType::Config).unwrap();
    assert_eq!(f.msi.triggered(), vec![1, 1, 0]);
    assert_eq!(*f.intx.count.lock().unwrap(), 0);
}

#[test]
fn features_acked_in_halves_in_either_order() {
    let mut f = fixture();
    let p = &mut f.pci;
    w8(p, 0x14, DEVICE_ACKNOWLEDGE | DEVICE_DRIVER);
    // The high half first (VERSION_1 and bit 40), then the low half.
    w32(p, 0x08, 1);
    w32(p, 0x0C, 1 | 1 << 8);
    w32(p, 0x08, 0);
    w32(p, 0x0C, 0b100);
    // A select beyond the two halves holds nothing and changes nothing.
    w32(p, 0x08, 2);
    w32(p, 0x0C, 0xFFFF_FFFF);
    assert_eq!(r32(p, 0x0C), 0);
    w32(p, 0x08, 1);
    assert_eq!(r32(p, 0x0C), 1 | 1 << 8);
    w8(p, 0x14, OK);
    assert_eq!(r8(p, 0x14), OK);
    assert_eq!(p.device().acked, Some(V1 | 0b100 | 1 << 40));

    // Only the low half written: VERSION_1 is missing, so FEATURES_OK does not stick.
    w8(p, 0x14, 0);
    w8(p, 0x14, DEVICE_ACKNOWLEDGE | DEVICE_DRIVER);
    w32(p, 0x08, 0);
    w32(p, 0x0C, 1);
    w8(p, 0x14, OK);
    assert_eq!(r8(p, 0x14), DEVICE_ACKNOWLEDGE | DEVICE_DRIVER);
    let report = p.activation();
    assert!(!report.activated);
    let why = report.activation_error.unwrap();
    assert!(why.contains("VERSION_1"), "{why}");
}

#[test]
fn reset_then_initialise_again() {
    let mut f = fixture();
    start(&mut f);
    let p = &mut f.pci;
    w16(p, 0x16, 0);
    w16(p, 0x1A, 1);
    w8(p, 0x14, 0);
    // Linux polls until the status reads 0, then starts over.
    assert_eq!(r8(p, 0x14), 0);
    assert!(!p.is_activated());
    assert_eq!(p.activation().queues_enabled, Vec::<u16>::new());
    w16(p, 0x16, 0);
    assert_eq!(r16(p, 0x18), 16, "the size is back to the maximum");
    assert_eq!(r16(p, 0x1A), VIRTIO_MSI_NO_VECTOR);
    assert_eq!(r16(p, 0x1C), 0);

    assert_eq!(negotiate(p, V1 | 1 << 40), OK);
    assert_eq!(p.device().acked, Some(V1 | 1 << 40));
    let tq = TestQueue::new(&f.mem, 0x6000, 8);
    configure_queue(p, 1, &tq, VIRTIO_MSI_NO_VECTOR);
    enable(p, 1);
    w8(p, 0x14, OK | DEVICE_DRIVER_OK);
    assert!(p.is_activated());
    assert_eq!(p.device().resets, 1);
    assert_eq!(queue_indexes(p), vec![1]);
    // The notification address of queue 1 signals queue 1's event.
    let off = u64::from(r16(p, 0x1E));
    w16(
        p,
        NOTIFY_CFG_OFFSET + off * u64::from(NOTIFY_OFF_MULTIPLIER),
        1,
    );
    assert_eq!(p.device().queues[0].event.read().unwrap(), 1);
}

#[test]
fn a_device_that_refuses_shows_why_until_it_starts() {
    let mut f = fixture();
    let p = &mut f.pci;
    assert_eq!(negotiate(p, V1), OK);
    // The dummy device refuses to start without any queue.
    w8(p, 0x14, OK | DEVICE_DRIVER_OK);
    let report = p.activation();
    assert!(!report.activated);
    assert_ne!(report.device_status & DEVICE_NEEDS_RESET, 0);
    assert_eq!(
        report.activation_error.as_deref(),
        Some("The device refused to start: Required queue any is missing")
    );
    // It stays visible across the reset, and goes once the device starts.
    w8(p, 0x14, 0);
    assert!(p.activation().activation_error.is_some());
    assert_eq!(p.activation().device_status, 0);
    start(&mut f);
    let report = f.pci.activation();
    assert!(report.activated);
    assert_eq!(report.activation_error, None);
}

#[test]
fn transport_refusals_are_reported() {
    let mut f = fixture();
    let p = &mut f.pci;
    w8(p, 0x14, DEVICE_ACKNOWLEDGE | DEVICE_DRIVER);
    w8(
        p,
        0x14,
        DEVICE_ACKNOWLEDGE | DEVICE_DRIVER | DEVICE_DRIVER_OK,
    );
    let report = p.activation();
    assert_eq!(
        report.activation_error.as_deref(),
        Some("The driver set DRIVER_OK without FEATURES_OK")
    );
    assert_ne!(report.device_status & DEVICE_NEEDS_RESET, 0);

    w8(p, 0x14, 0);
    assert_eq!(negotiate(p, V1), OK);
    w16(p, 0x16, 1);
    w16(p, 0x18, 16);
    w32(p, 0x20, 0xFFF0_0000);
    w16(p, 0x1C, 1);
    let report = p.activation();
    assert_eq!(
        report.activation_error.as_deref(),
        Some("Queue 1 does not fit in guest memory")
    );
    assert!(report.queues_enabled.is_empty());
    assert!(!report.activated);
}

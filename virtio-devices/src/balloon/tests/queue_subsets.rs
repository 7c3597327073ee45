//! Drivers that enable only some of the queues the negotiated features give them: the device
//! runs with what it got, and every feature without its queue says so.

use super::*;

const ALL: [QueueKind; 5] = [
    QueueKind::Inflate,
    QueueKind::Deflate,
    QueueKind::Stats,
    QueueKind::FreePage,
    QueueKind::Reporting,
];

/// A balloon whose driver acked every offered feature but enabled only `enabled`.
fn enabling(enabled: &[QueueKind]) -> Harness {
    let acked = Balloon::new(&all_features()).unwrap().features();
    Harness::enabling(&all_features(), acked, guest_memory(64 << 20), enabled)
}

fn all_but(missing: QueueKind) -> Vec<QueueKind> {
    ALL.iter().copied().filter(|k| *k != missing).collect()
}

fn queue_missing(e: &BalloonError, want: &str) -> bool {
    matches!(e, BalloonError::QueueNotEnabled { queue, .. } if *queue == want)
}

/// Inflate two pages and deflate them; returns the (inflated, deflated) counters.
fn inflate_and_deflate(h: &mut Harness) -> (u64, u64) {
    let b = h.out(BUF, &pfn_bytes(&[4096, 4097]));
    h.add(QueueKind::Inflate, &[b]);
    h.add(QueueKind::Deflate, &[b]);
    h.run();
    let c = h.counters();
    (c.inflated_pages, c.deflated_pages)
}

/// Run a hint round of one 4 MiB block; returns the pages it accepted.
fn hint_one_block(h: &mut Harness) -> u64 {
    let round = h.handle.start_hint_round().unwrap();
    cmd(h, BUF + 0x100, round.cmd_id());
    h.add(QueueKind::FreePage, &[(16 * MIB, 4 * MIB as u32, true)]);
    cmd(h, BUF + 0x108, FREE_PAGE_HINT_CMD_ID_STOP);
    h.run();
    assert!(round.is_stopped());
    round.pages()
}

#[test]
fn only_inflate_and_deflate() {
    let mut h = enabling(&[QueueKind::Inflate, QueueKind::Deflate]);
    assert_eq!(
        h.handle.active_queues(),
        vec![QueueKind::Inflate, QueueKind::Deflate]
    );
    assert_eq!(inflate_and_deflate(&mut h), (2, 2));
    h.handle.resize(8 * MIB).unwrap();
    assert_eq!(h.config_u32(0), 2048);
    // Hinting was negotiated, but without its queue it is unavailable everywhere.
    assert_eq!(h.handle.hint_mode(), None);
    assert!(queue_missing(
        &h.handle.hint_availability().unwrap_err(),
        "free_page"
    ));
    let e = h.handle.start_hint_round().unwrap_err();
    assert_eq!(
        e.to_string(),
        "The guest driver did not enable the balloon's free_page queue, which free page hinting needs"
    );
    assert!(h.handle.stop_hint_round().is_err());
    assert!(h.handle.hint_done().is_err());
    assert_eq!(h.config_u32(8), 0, "no command id was ever written");
    // No statistics queue: no statistics.
    assert!(queue_missing(
        &h.handle.request_stats().unwrap_err(),
        "stats"
    ));
    h.run();
    assert_eq!(h.handle.stats(), BalloonStats::default());
}

#[test]
fn all_but_stats() {
    let mut h = enabling(&all_but(QueueKind::Stats));
    // The free page queue keeps index 3 (STATS_VQ was negotiated).
    assert_eq!(h.kinds, all_but(QueueKind::Stats));
    assert_eq!(h.handle.hint_mode(), Some(HintMode::Ranges));
    assert_eq!(hint_one_block(&mut h), 1024);
    assert_eq!(inflate_and_deflate(&mut h), (2, 2));
    h.add(QueueKind::Reporting, &[(32 * MIB, 2 * MIB as u32, true)]);
    h.run();
    assert_eq!(h.counters().reported_pages, 512);
    assert!(queue_missing(
        &h.handle.request_stats().unwrap_err(),
        "stats"
    ));
    assert_eq!(h.counters().stats_updates, 0);
    h.handle.resize(4 * MIB).unwrap();
}

#[test]
fn all_but_the_hint_queue() {
    let mut h = enabling(&all_but(QueueKind::FreePage));
    assert_eq!(h.handle.hint_mode(), None);
    assert!(queue_missing(
        &h.handle.start_hint_round().unwrap_err(),
        "free_page"
    ));
    // Reporting keeps index 4 although index 3 is missing.
    h.add(QueueKind::Reporting, &[(32 * MIB, 2 * MIB as u32, true)]);
    let s = h.out(BUF + 0x200, &stats_bytes(&[(4, 77)]));
    h.add(QueueKind::Stats, &[s]);
    h.run();
    assert_eq!(h.counters().reported_pages, 512);
    assert_eq!(h.handle.stats().free_memory, Some(77));
    h.handle.request_stats().unwrap();
    assert_eq!(inflate_and_deflate(&mut h), (2, 2));
    assert_eq!(h.counters().hint_rounds, 0);
}

#[test]
fn no_queues_at_all() {
    let mut h = enabling(&[]);
    assert!(h.handle.is_active());
    assert!(h.handle.active_queues().is_empty());
    h.run();
    let e = h.handle.resize(8 * MIB).unwrap_err();
    assert!(queue_missing(&e, "inflate"));
    assert_eq!(h.config_u32(0), 0, "the refused target is not written");
    assert_eq!(h.irq.config_count(), 0);
    assert_eq!(h.handle.hint_mode(), None);
    assert!(h.handle.request_stats().is_err());
    // After a reset the device waits for a driver again, and a target waits with it.
    h.balloon.reset();
    assert!(!h.handle.is_active());
    h.handle.resize(8 * MIB).unwrap();
    assert_eq!(h.config_u32(0), 2048);
}

#[test]
fn resize_needs_both_inflate_and_deflate() {
    let h = enabling(&[QueueKind::Inflate]);
    let e = h.handle.resize(MIB).unwrap_err();
    assert!(queue_missing(&e, "deflate"), "{e}");
    assert!(e.to_string().contains("resizing the balloon"));
    let h = enabling(&[QueueKind::Deflate, QueueKind::Stats]);
    assert!(queue_missing(&h.handle.resize(MIB).unwrap_err(), "inflate"));
}

//! End to end: guest memory the host never backed (or the balloon released) is left out of
//! round 0, without hints and without a balloon device, and without losing a page the guest
//! first writes while round 0 is sent.

mod common;

use std::time::Duration;

use common::{field, migrate_unix, migration_report, Vmm};

const READY: Duration = Duration::from_secs(120);
const MIB: u64 = 1 << 20;

/// Boots a source guest (waits for its first verification) and a waiting destination.
fn pair(tag: &str, memory: &str, cmdline: &str, extra: &[&str]) -> (Vmm, Vmm, String) {
    let src = Vmm::boot(&format!("{tag}-src"), memory, cmdline, extra);
    let ready = src.wait_line("guest: ready", READY);
    src.wait_seq_above(0, READY);
    (src, Vmm::waiting(&format!("{tag}-dst")), ready)
}

/// After a migration: the source exited 0, the guest verifies with a higher seq, no failure;
/// then the destination is shut down.
fn check_moved(mut src: Vmm, mut dst: Vmm) {
    assert_eq!(src.wait_exit(Duration::from_secs(20)), 0);
    let before = src.last_seq().unwrap_or(0);
    assert!(src.wait_seq_above(before, Duration::from_secs(30)) > before);
    assert!(!src.serial_text().contains("FAILED"));
    assert!(dst.remote(&["shutdown"]).status.success());
    assert_eq!(dst.wait_exit(Duration::from_secs(30)), 0);
}

fn num(v: &serde_json::Value) -> u64 {
    v.as_u64().unwrap_or_else(|| panic!("not a number: {v}"))
}

/// A 64 GiB guest without a balloon device sends about what it uses, and the destination holds
/// no more than that.
#[test]
fn a_64g_guest_without_hints_or_balloon_sends_only_what_it_uses() {
    let (src, dst, ready) = pair("unpop-64g", "64G", "used=256", &[]);
    let used = field(&ready, "used_pages").expect("used_pages") * 4096;
    let (sent, received) = migrate_unix(&src, &dst, "");
    let r = migration_report(&sent);
    assert!(received.status.success());
    assert_eq!(r["hints"]["used"], false, "{r}");
    assert_eq!(r["hints"]["reason"], "no balloon device", "{r}");
    let bytes = num(&r["bytes_sent"]);
    assert!(bytes >= used, "the live data is sent: {bytes} < {used}");
    assert!(
        bytes <= used + used * 3 / 100,
        "at most used + 3%: sent {} MiB, used {} MiB: {r}",
        bytes / MIB,
        used / MIB
    );
    let ram_pages = (64u64 << 30) / 4096;
    let unpopulated = num(&r["pages_unpopulated"]);
    assert!(
        unpopulated * 100 >= ram_pages * 99,
        "nearly all of RAM was never backed: {unpopulated} of {ram_pages} pages: {r}"
    );
    assert!(r.get("unpopulated_reason").is_none(), "{r}");
    let held = common::resident_in_large_mappings(dst.child.id(), 1 << 30);
    assert!(
        held <= used + used * 5 / 100,
        "destination guest RAM resident {} MiB, used {} MiB",
        held / MIB,
        used / MIB
    );
    check_moved(src, dst);
}

/// Live data that grows while the migration runs: pages first written after dirty logging
/// started (some of them while round 0 was sent, unbacked when it was built) arrive, and the
/// guest verifies every one of them on the destination.
#[test]
fn pages_first_written_during_round_zero_arrive() {
    let (src, dst, _) = pair("unpop-grow", "2G", "used=64 grow=192", &[]);
    assert!(
        !src.serial_text().contains("guest: grow done"),
        "the guest must still be growing when the migration starts"
    );
    let (sent, received) = migrate_unix(&src, &dst, ",free_page_hints=off");
    let r = migration_report(&sent);
    assert!(received.status.success());
    assert!(num(&r["pages_unpopulated"]) > 0, "{r}");
    assert!(num(&r["rounds"]) >= 2, "{r}");
    // Growth ends on the destination; every grown page is verified after that.
    let done = src.wait_line("guest: grow done", Duration::from_secs(60));
    assert_eq!(field(&done, "live_pages"), Some((64 + 192) * 256), "{done}");
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let line = loop {
        let text = src.serial_text();
        let after_done = text.split("guest: grow done").nth(1).unwrap_or("");
        if let Some(l) = after_done
            .lines()
            .find(|l| l.starts_with("guest: verify ok"))
        {
            break l.to_string();
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no verification after growth ended:\n{text}"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(field(&line, "pages"), Some((64 + 192) * 256), "{line}");
    check_moved(src, dst);
}

/// Pages the balloon took (released on the host with MADV_DONTNEED after the guest had
/// written them) are not sent, and not even read: they count as never backed, not as zero pages
/// found by the scan. With `zero_pages=off` every page is sent, as Cloud Hypervisor does.
#[test]
fn balloon_inflated_pages_stay_unsent() {
    let (src, dst, _) = pair(
        "unpop-balloon",
        "1G",
        "used=32 dirty=900",
        &["--balloon", "size=0"],
    );
    assert!(src
        .remote(&["resize", "--balloon", "512M"])
        .status
        .success());
    src.wait_balloon_pages(131_072);
    let (sent, received) = migrate_unix(&src, &dst, ",free_page_hints=off");
    let r = migration_report(&sent);
    assert!(received.status.success());
    let bytes = num(&r["bytes_sent"]);
    // The guest wrote ~930 MiB before inflating; only what the balloon did not take is sent.
    assert!(
        bytes <= (1024 - 512) * MIB,
        "sent {} MiB: inflated pages must stay unsent: {r}",
        bytes / MIB
    );
    assert!(bytes >= 32 * MIB, "{r}");
    let inflated = (512 * MIB) / 4096;
    assert!(num(&r["pages_unpopulated"]) >= inflated, "{r}");
    assert!(
        num(&r["zero_pages_skipped"]) < inflated / 8,
        "the released pages were not scanned: {r}"
    );
    check_moved(src, dst);
}

/// `zero_pages=off` sends all of RAM, never-backed pages too, and the report says why they
/// were not left out.
#[test]
fn zero_pages_off_sends_all_of_ram() {
    let (src, dst, _) = pair("unpop-full", "1G", "used=32", &[]);
    let (sent, received) = migrate_unix(&src, &dst, ",zero_pages=off");
    let r = migration_report(&sent);
    assert!(received.status.success());
    assert_eq!(num(&r["pages_unpopulated"]), 0, "{r}");
    assert_eq!(
        r["unpopulated_reason"], "zero_pages=off sends them as zero pages",
        "{r}"
    );
    assert!(num(&r["bytes_sent"]) >= 1 << 30, "{r}");
    check_moved(src, dst);
}

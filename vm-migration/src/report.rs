//! The migration report returned by `vm.send-migration` (the JSON object in contract.md).

use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::hints::HintStats;

/// How a migration ended. Only completed migrations produce a report today.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MigrationStatus {
    /// The destination runs the VM.
    #[default]
    Completed,
}

/// Which free page hinting protocol was used.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum HintMode {
    /// No hinting.
    #[default]
    None,
    /// Standard `VIRTIO_BALLOON_F_FREE_PAGE_HINT` 4 MiB blocks.
    Stock,
    /// The guest-patch protocol reporting free ranges.
    Ranges,
}

/// The `hints` object of the report.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct HintsReport {
    /// Whether hints were requested in this migration.
    pub used: bool,
    /// The protocol used.
    pub mode: HintMode,
    /// The command id of the hint round (0 if none).
    pub cmd_id: u32,
    /// Milliseconds from the hint request to the end of the round: the driver's STOP, the
    /// guest making no more progress, or the time limit.
    pub wait_ms: f64,
    /// Pages named by accepted hints.
    pub pages_hinted: u64,
    /// Pages left out of round 0 because they were hinted free.
    pub pages_skipped: u64,
    /// Hints rejected as invalid.
    pub rejected: u64,
    /// Why hints were not used, or only partly (e.g. `disabled by request`,
    /// `round timed out after 10000 ms`); absent when the round was used in full.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

impl HintsReport {
    /// The report of a migration that used no hints, and why.
    pub fn unused(reason: impl Into<String>) -> Self {
        HintsReport {
            reason: Some(reason.into()),
            ..Default::default()
        }
    }

    /// The report of a hint round run in `mode`, waited on for `wait`.
    pub fn from_stats(mode: HintMode, stats: &HintStats, wait: Duration) -> Self {
        HintsReport {
            used: true,
            mode,
            cmd_id: stats.cmd_id,
            wait_ms: duration_ms(wait),
            pages_hinted: stats.pages_hinted,
            pages_skipped: stats.pages_skipped,
            rejected: stats.rejected,
            reason: None,
        }
    }
}

/// The report of a completed migration, serialized exactly as contract.md shows.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct MigrationReport {
    /// `completed`.
    pub status: MigrationStatus,
    /// Milliseconds from the start of send-migration to completion.
    pub total_ms: f64,
    /// Milliseconds the VM was paused.
    pub downtime_ms: f64,
    /// Memory rounds sent, the final one included.
    pub rounds: u32,
    /// Guest RAM size in bytes.
    pub memory_bytes: u64,
    /// Guest memory payload sent, all rounds.
    pub bytes_sent: u64,
    /// Everything written to the transport.
    pub wire_bytes: u64,
    /// Pages sent, all rounds.
    pub pages_sent: u64,
    /// All-zero pages left out.
    pub zero_pages_skipped: u64,
    /// Pages sent without a check for zero, because the scan found too few zero pages nearby
    /// to pay for reading them (see `zero::ScanPacer`).
    #[serde(default)]
    pub zero_scan_unchecked_pages: u64,
    /// Pages left out of round 0 because the host never backed them (or the balloon released
    /// them) and they were not hinted: found without reading guest memory, with or without
    /// hints.
    #[serde(default)]
    pub pages_unpopulated: u64,
    /// Why never-backed pages were not left out (`zero_pages=off`, or the lookup failed);
    /// absent when they were.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unpopulated_reason: Option<String>,
    /// Free page hinting.
    pub hints: HintsReport,
    /// Where the time went.
    #[serde(default)]
    pub phases: PhaseTimes,
    /// How the memory travelled: connections and encryption (absent in older reports).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub transport: Option<TransportReport>,
    /// What the downtime is made of.
    #[serde(default)]
    pub downtime_breakdown: DowntimeBreakdown,
}

/// The `transport` object of the report (a field added to the contract's report).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TransportReport {
    /// Connections that carried memory (`connections=`).
    pub connections: u32,
    /// Whether the connections were TLS (`tls_dir=`).
    pub tls: bool,
}

/// Milliseconds spent in each step of the stopped phase (a field added to the contract's report:
/// what `downtime_ms` is made of). `downtime_ms` runs from the pause request to the destination's
/// acknowledgement of Complete, which it sends once the guest runs there; these steps add up to it.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct DowntimeBreakdown {
    /// Stopping the vCPUs and devices.
    pub pause_ms: f64,
    /// The last dirty-log sync and building the last round's range table.
    pub final_sync_ms: f64,
    /// Sending the last round (zero scan included) and its acknowledgement.
    pub last_round_ms: f64,
    /// Saving the vCPU, irqchip and device state, sending it and the destination restoring it.
    pub state_ms: f64,
    /// The part of `state_ms` spent saving the state here (the rest is the transfer and the
    /// destination's restore, whose steps the destination logs).
    #[serde(default)]
    pub snapshot_ms: f64,
    /// Complete: the destination resuming the guest and acknowledging it.
    pub complete_ms: f64,
    /// Pages in the last round (sent or found zero) while the VM was paused.
    pub last_round_pages: u64,
    /// Where the guest's writes came from: `ring` (KVM's dirty ring: the final sync costs what
    /// was written) or `bitmap` (KVM's dirty bitmap: one copy and one scan of it, about 4 µs
    /// per GiB of RAM); empty when no dirty log was read (local mode).
    #[serde(default)]
    pub dirty_log: String,
}

/// Milliseconds spent in each phase of a migration, in order (a field added to the contract's
/// report: what `total_ms` is made of).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct PhaseTimes {
    /// Connecting, Start and Config (and the added connections).
    pub setup_ms: f64,
    /// Turning dirty logging on (between Start and Config, so that it does not compete with
    /// the destination setting up its VM).
    pub dirty_log_start_ms: f64,
    /// The hint round, from the request to its end (as `hints.wait_ms`).
    pub hints_ms: f64,
    /// Finding the pages the host never backed (part of `round0_build_ms`).
    #[serde(default)]
    pub unpopulated_scan_ms: f64,
    /// Building round 0 and scanning it for zero pages.
    pub round0_build_ms: f64,
    /// Sending round 0 and its acknowledgement.
    pub round0_send_ms: f64,
    /// Dirty-log rounds while the guest runs.
    pub dirty_rounds_ms: f64,
    /// From the pause to the destination's acknowledgement of Complete.
    pub stopped_ms: f64,
}

/// A duration in (fractional) milliseconds, as the report uses.
pub fn duration_ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::Value;

    #[test]
    fn serializes_with_the_contract_field_names() {
        let stats = HintStats {
            cmd_id: 2,
            pages_hinted: 1024,
            pages_skipped: 1024,
            rejected: 1,
            ..Default::default()
        };
        let report = MigrationReport {
            total_ms: 420.5,
            downtime_ms: 12.25,
            rounds: 3,
            memory_bytes: 1 << 30,
            bytes_sent: 100 << 20,
            wire_bytes: (100 << 20) + 4096,
            pages_sent: 25600,
            zero_pages_skipped: 7,
            hints: HintsReport::from_stats(HintMode::Stock, &stats, Duration::from_millis(35)),
            ..Default::default()
        };
        let json = serde_json::to_value(&report).unwrap();
        let Value::Object(top) = &json else {
            panic!("not an object")
        };
        let keys: Vec<&str> = top.keys().map(String::as_str).collect();
        let mut expected = vec![
            "status",
            "total_ms",
            "downtime_ms",
            "rounds",
            "memory_bytes",
            "bytes_sent",
            "wire_bytes",
            "pages_sent",
            "zero_pages_skipped",
            "hints",
            "pages_unpopulated",
            "zero_scan_unchecked_pages",
            // Added to the contract's fields (adding is allowed; removing is not).
            "phases",
            "downtime_breakdown",
        ];
        let mut sorted = keys.clone();
        sorted.sort_unstable();
        expected.sort_unstable();
        assert_eq!(sorted, expected);
        let Value::Object(hints) = &json["hints"] else {
            panic!("hints not an object")
        };
        let mut hint_keys: Vec<&str> = hints.keys().map(String::as_str).collect();
        hint_keys.sort_unstable();
        let mut expected = vec![
            "used",
            "mode",
            "cmd_id",
            "wait_ms",
            "pages_hinted",
            "pages_skipped",
            "rejected",
        ];
        expected.sort_unstable();
        assert_eq!(hint_keys, expected);
        assert_eq!(json["status"], "completed");
        assert_eq!(json["hints"]["mode"], "stock");
        assert_eq!(json["hints"]["used"], true);
        assert_eq!(json["hints"]["wait_ms"], 35.0);
        assert_eq!(json["downtime_ms"], 12.25);
        assert_eq!(json["rounds"], 3);
        let back: MigrationReport = serde_json::from_value(json).unwrap();
        assert_eq!(back, report);
    }

    #[test]
    fn reason_is_there_only_when_hints_were_not_fully_used() {
        let unused = serde_json::to_value(HintsReport::unused("disabled by request")).unwrap();
        assert_eq!(unused["reason"], "disabled by request");
        assert_eq!(unused["used"], false);
        let mut partly = HintsReport::from_stats(
            HintMode::Stock,
            &HintStats::default(),
            Duration::from_secs(10),
        );
        partly.reason = Some("round timed out after 10000 ms".into());
        let json = serde_json::to_value(&partly).unwrap();
        assert_eq!(json["reason"], "round timed out after 10000 ms");
        assert_eq!(json["used"], true);
        let back: HintsReport = serde_json::from_value(json).unwrap();
        assert_eq!(back, partly);
        let full = HintsReport::from_stats(HintMode::Stock, &HintStats::default(), Duration::ZERO);
        let json = serde_json::to_value(&full).unwrap();
        assert!(json.get("reason").is_none(), "{json}");
    }

    #[test]
    fn default_matches_the_contract_example() {
        let example = r#"{
          "status": "completed",
          "total_ms": 0.0, "downtime_ms": 0.0, "rounds": 0,
          "memory_bytes": 0, "bytes_sent": 0, "wire_bytes": 0,
          "pages_sent": 0, "zero_pages_skipped": 0,
          "hints": { "used": false, "mode": "none", "cmd_id": 0, "wait_ms": 0.0,
                     "pages_hinted": 0, "pages_skipped": 0, "rejected": 0 }
        }"#;
        let parsed: Value = serde_json::from_str(example).unwrap();
        let mut ours = serde_json::to_value(MigrationReport::default()).unwrap();
        // Every field of the contract's example is there, with the same value; ours adds
        // `phases`, `downtime_breakdown` and more counters, which the contract allows ("fields
        // may be added").
        for added in ["phases", "downtime_breakdown"] {
            let value = ours.as_object_mut().unwrap().remove(added);
            assert!(value.is_some_and(|p| p.is_object()), "{added}");
        }
        for added in ["pages_unpopulated", "zero_scan_unchecked_pages"] {
            assert_eq!(
                ours.as_object_mut().unwrap().remove(added),
                Some(Value::from(0))
            );
        }
        assert_eq!(ours, parsed);
        // A report from an older peer (without `phases`) still parses.
        let old: MigrationReport = serde_json::from_value(parsed).unwrap();
        assert_eq!(old, MigrationReport::default());
        for (mode, name) in [
            (HintMode::None, "none"),
            (HintMode::Stock, "stock"),
            (HintMode::Ranges, "ranges"),
        ] {
            assert_eq!(serde_json::to_value(mode).unwrap(), name);
        }
    }
}

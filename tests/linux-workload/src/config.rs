//! The workload's parameters, read from the kernel command line (`/proc/cmdline`): space-separated
//! `key=value` words, all optional. Words without `=` and unknown keys (`console=ttyS0`, `quiet`,
//! the freestanding guest's `hint=`) are ignored. A known key with a bad value keeps its default and
//! is returned as a [`BadValue`] so the caller can say so in one line.

use std::fmt;

/// Largest size accepted for a MiB key (16 TiB): keeps every byte count inside `u64`/`usize`.
const MAX_MIB: u64 = 1 << 24;
/// Bounds of `verify_ms`, as in the freestanding guest.
const VERIFY_MS_RANGE: (u64, u64) = (10, 1000);

/// `selftest=`: a deliberate fault, to prove that the checks downstream notice it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SelfTest {
    /// No self test (default).
    None,
    /// Flip one bit of one live page after the third verification (a `verify FAILED` must follow).
    Corrupt,
}

/// The parsed parameters.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Config {
    /// `used=<MiB>`: live data, filled with the pattern, kept and verified (default 64).
    pub used_mib: u64,
    /// `dirty=<MiB>`: written, then given back to the kernel before `ready` (default 0).
    pub dirty_mib: u64,
    /// `hot=<MiB>`: kept and rewritten continuously by a writer thread (default 0).
    pub hot_mib: u64,
    /// `fragment=<MiB>`: written, then every other 64 KiB given back (default 0).
    pub fragment_mib: u64,
    /// `verify_ms=<n>`: period of the full verification (default 500, clamped to 10..=1000).
    pub verify_ms: u64,
    /// `selftest=corrupt|none` (default none).
    pub selftest: SelfTest,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            used_mib: 64,
            dirty_mib: 0,
            hot_mib: 0,
            fragment_mib: 0,
            verify_ms: 500,
            selftest: SelfTest::None,
        }
    }
}

/// A known key whose value did not parse; the default was kept.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BadValue {
    /// The key.
    pub key: String,
    /// The value as written.
    pub value: String,
    /// What the key takes.
    pub expected: &'static str,
}

impl fmt::Display for BadValue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "bad value {}={} (want {}), using the default",
            self.key, self.value, self.expected
        )
    }
}

/// Parses a whole decimal number, or a hexadecimal one with a `0x` prefix. No sign, no suffix.
pub fn parse_number(text: &str) -> Option<u64> {
    match text.strip_prefix("0x").or_else(|| text.strip_prefix("0X")) {
        Some(hex) if !hex.is_empty() && hex.bytes().all(|c| c.is_ascii_hexdigit()) => {
            u64::from_str_radix(hex, 16).ok()
        }
        Some(_) => None,
        None if !text.is_empty() && text.bytes().all(|c| c.is_ascii_digit()) => text.parse().ok(),
        None => None,
    }
}

impl Config {
    /// Parses `cmdline`; returns the configuration and every known key whose value was bad.
    pub fn parse(cmdline: &str) -> (Config, Vec<BadValue>) {
        let mut config = Config::default();
        let mut bad = Vec::new();
        for word in cmdline.split([' ', '\t', '\n', '\0']) {
            let Some((key, value)) = word.split_once('=') else {
                continue;
            };
            let mib = || parse_number(value).filter(|&n| n <= MAX_MIB);
            let (parsed, expected) = match key {
                "used" => (mib().map(|n| config.used_mib = n), "MiB, 0..=16777216"),
                "dirty" => (mib().map(|n| config.dirty_mib = n), "MiB, 0..=16777216"),
                "hot" => (mib().map(|n| config.hot_mib = n), "MiB, 0..=16777216"),
                "fragment" => (mib().map(|n| config.fragment_mib = n), "MiB, 0..=16777216"),
                "verify_ms" => (
                    parse_number(value)
                        .map(|n| config.verify_ms = n.clamp(VERIFY_MS_RANGE.0, VERIFY_MS_RANGE.1)),
                    "milliseconds",
                ),
                "selftest" => (
                    match value {
                        "corrupt" => Some(SelfTest::Corrupt),
                        "none" => Some(SelfTest::None),
                        _ => None,
                    }
                    .map(|t| config.selftest = t),
                    "corrupt or none",
                ),
                _ => (Some(()), ""),
            };
            if parsed.is_none() {
                bad.push(BadValue {
                    key: key.to_string(),
                    value: value.to_string(),
                    expected,
                });
            }
        }
        (config, bad)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_gives_defaults() {
        let (config, bad) = Config::parse("");
        assert_eq!(config, Config::default());
        assert_eq!(
            (
                config.used_mib,
                config.dirty_mib,
                config.hot_mib,
                config.fragment_mib
            ),
            (64, 0, 0, 0)
        );
        assert_eq!(config.verify_ms, 500);
        assert!(bad.is_empty());
    }

    #[test]
    fn every_key() {
        let (config, bad) = Config::parse(
            "used=128 dirty=2048 hot=8 fragment=0x100 verify_ms=250 selftest=corrupt",
        );
        assert!(bad.is_empty(), "{bad:?}");
        assert_eq!(
            config,
            Config {
                used_mib: 128,
                dirty_mib: 2048,
                hot_mib: 8,
                fragment_mib: 256,
                verify_ms: 250,
                selftest: SelfTest::Corrupt
            }
        );
    }

    #[test]
    fn linux_words_are_ignored() {
        let text =
            "console=ttyS0 panic=-1 quiet init_on_alloc=0 hint=ranges rdinit=/init used=12 hot=3\n";
        let (config, bad) = Config::parse(text);
        assert!(bad.is_empty(), "{bad:?}");
        assert_eq!((config.used_mib, config.hot_mib), (12, 3));
    }

    #[test]
    fn bad_values_keep_defaults_and_are_named() {
        let (config, bad) = Config::parse(
            "used=-1 hot=x dirty==3 fragment=16777217 verify_ms= selftest=maybe used hot=2",
        );
        assert_eq!(
            config,
            Config {
                hot_mib: 2,
                ..Config::default()
            }
        );
        let named: Vec<String> = bad
            .iter()
            .map(|b| format!("{}={}", b.key, b.value))
            .collect();
        assert_eq!(
            named,
            [
                "used=-1",
                "hot=x",
                "dirty==3",
                "fragment=16777217",
                "verify_ms=",
                "selftest=maybe"
            ]
        );
        let line = bad[1].to_string();
        assert!(
            line.contains("hot=x") && line.contains("default") && !line.contains('\n'),
            "{line}"
        );
    }

    #[test]
    fn verify_ms_is_clamped() {
        assert_eq!(Config::parse("verify_ms=1").0.verify_ms, 10);
        assert_eq!(Config::parse("verify_ms=99999").0.verify_ms, 1000);
    }

    #[test]
    fn numbers() {
        assert_eq!(parse_number("0"), Some(0));
        assert_eq!(parse_number("0x10"), Some(16));
        assert_eq!(parse_number("18446744073709551615"), Some(u64::MAX));
        assert_eq!(parse_number("18446744073709551616"), None);
        for bad in ["", "-1", "+1", "1M", "0x", "0xg", " 1", "1.5"] {
            assert_eq!(parse_number(bad), None, "{bad:?}");
        }
    }
}

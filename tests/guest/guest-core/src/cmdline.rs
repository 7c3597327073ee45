//! The guest's kernel command line: space-separated `key=value` pairs, all optional.
//! Unknown keys (e.g. Linux-style options) are ignored; bad values keep the default and are
//! reported through the `warn` callback of [`Config::parse_with`].

/// How the balloon driver answers free page hint requests.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HintMode {
    /// Like the Linux driver: allocate 4 MiB blocks, hint them, hold them until DONE.
    Stock,
    /// Never answer.
    None,
    /// The guest-patch protocol: send merged free ranges without allocating.
    Ranges,
}

impl HintMode {
    /// The name used on the command line.
    pub fn name(self) -> &'static str {
        match self {
            HintMode::Stock => "stock",
            HintMode::None => "none",
            HintMode::Ranges => "ranges",
        }
    }
}

/// `selftest=`: deliberate failures to prove the guest reports them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SelfTest {
    /// No self test (default).
    None,
    /// Read an unmapped address (the fault report must appear on serial).
    Fault,
    /// Corrupt one word of a live page (a `verify FAILED` line must appear).
    Corrupt,
    /// Send a self-IPI on the balloon's config vector (the IRQ path must count it).
    Irq,
}

/// Parsed command line.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Config {
    /// `used=<MiB>`: live data kept and verified (default 64).
    pub used_mib: u64,
    /// `dirty=<MiB>`: written then freed before `ready` (default 0).
    pub dirty_mib: u64,
    /// `hot=<MiB>`: rewritten continuously (default 0).
    pub hot_mib: u64,
    /// `hint=stock|none|ranges` (default stock).
    pub hint: HintMode,
    /// `fragment=<MiB>`: allocated, then every other 64 KiB freed (default 0).
    pub fragment_mib: u64,
    /// `pci_ecam=<hex>`: base of a PCIe ECAM window to scan (default: conf1 ports only).
    pub pci_ecam: Option<u64>,
    /// `cpus=<n>`: number of vCPUs to start when ACPI does not tell (default: from ACPI).
    pub cpus: Option<u32>,
    /// `verify_ms=<n>`: period of the full verification (default 500, clamped to 10..=1000).
    pub verify_ms: u64,
    /// `selftest=fault|corrupt` (default none).
    pub selftest: SelfTest,
    /// `poweroff=<seq>`: power off through ACPI after verification round `seq` (default never).
    pub poweroff_after: Option<u64>,
    /// `grow=<MiB>`: after `ready`, live data grows by [`GROW_STEP_PAGES`] pages every
    /// [`GROW_PERIOD_MS`] until this much more is held (default 0): pages first written while a
    /// migration runs.
    pub grow_mib: u64,
}

/// Pages added to live data per `grow=` step (1 MiB).
pub const GROW_STEP_PAGES: u64 = 256;
/// Milliseconds between `grow=` steps.
pub const GROW_PERIOD_MS: u64 = 10;

impl Default for Config {
    fn default() -> Self {
        Config {
            used_mib: 64,
            dirty_mib: 0,
            hot_mib: 0,
            hint: HintMode::Stock,
            fragment_mib: 0,
            pci_ecam: None,
            cpus: None,
            verify_ms: 500,
            selftest: SelfTest::None,
            poweroff_after: None,
            grow_mib: 0,
        }
    }
}

/// Parses a decimal number, or a hexadecimal one with a `0x` prefix.
pub fn parse_num(s: &str) -> Option<u64> {
    if let Some(h) = s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
        parse_hex(h)
    } else if s.is_empty() {
        None
    } else {
        s.bytes().try_fold(0u64, |acc, c| {
            let d = (c as char).to_digit(10)? as u64;
            acc.checked_mul(10)?.checked_add(d)
        })
    }
}

/// Parses hexadecimal digits (an optional `0x` prefix is accepted).
pub fn parse_hex(s: &str) -> Option<u64> {
    let s = s
        .strip_prefix("0x")
        .or_else(|| s.strip_prefix("0X"))
        .unwrap_or(s);
    if s.is_empty() || s.len() > 16 {
        return None;
    }
    s.bytes().try_fold(0u64, |acc, c| {
        Some((acc << 4) | (c as char).to_digit(16)? as u64)
    })
}

impl Config {
    /// Parses `cmdline`, ignoring bad values silently.
    pub fn parse(cmdline: &str) -> Config {
        Self::parse_with(cmdline, |_, _| {})
    }

    /// Parses `cmdline`; `warn(key, value)` is called for each known key with a bad value.
    pub fn parse_with(cmdline: &str, mut warn: impl FnMut(&str, &str)) -> Config {
        let mut c = Config::default();
        for word in cmdline.split([' ', '\t', '\n', '\0']) {
            let Some((key, val)) = word.split_once('=') else {
                continue;
            };
            let mib = |v: &str| parse_num(v).filter(|&n| n <= 1 << 24);
            let ok = match key {
                "used" => mib(val).map(|n| c.used_mib = n),
                "dirty" => mib(val).map(|n| c.dirty_mib = n),
                "hot" => mib(val).map(|n| c.hot_mib = n),
                "fragment" => mib(val).map(|n| c.fragment_mib = n),
                "grow" => mib(val).map(|n| c.grow_mib = n),
                "hint" => match val {
                    "stock" => Some(HintMode::Stock),
                    "none" => Some(HintMode::None),
                    "ranges" => Some(HintMode::Ranges),
                    _ => None,
                }
                .map(|h| c.hint = h),
                "pci_ecam" => parse_hex(val)
                    .filter(|a| a % 4096 == 0)
                    .map(|a| c.pci_ecam = Some(a)),
                "cpus" => parse_num(val)
                    .filter(|&n| (1..=64).contains(&n))
                    .map(|n| c.cpus = Some(n as u32)),
                "selftest" => match val {
                    "fault" => Some(SelfTest::Fault),
                    "corrupt" => Some(SelfTest::Corrupt),
                    "irq" => Some(SelfTest::Irq),
                    "none" => Some(SelfTest::None),
                    _ => None,
                }
                .map(|t| c.selftest = t),
                "verify_ms" => parse_num(val).map(|n| c.verify_ms = n.clamp(10, 1000)),
                "poweroff" => parse_num(val)
                    .filter(|&n| n >= 1)
                    .map(|n| c.poweroff_after = Some(n)),
                _ => Some(()),
            };
            if ok.is_none() {
                warn(key, val);
            }
        }
        c
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults() {
        assert_eq!(Config::parse(""), Config::default());
        let c = Config::default();
        assert_eq!(
            (c.used_mib, c.dirty_mib, c.hot_mib, c.fragment_mib),
            (64, 0, 0, 0)
        );
        assert_eq!(c.hint, HintMode::Stock);
        assert_eq!(c.pci_ecam, None);
    }

    #[test]
    fn all_keys() {
        let c = Config::parse(
            "used=128 dirty=2048 hot=8 hint=ranges fragment=256 pci_ecam=0xe0000000 cpus=2 grow=32",
        );
        assert_eq!(c.grow_mib, 32);
        assert_eq!(c.used_mib, 128);
        assert_eq!(c.dirty_mib, 2048);
        assert_eq!(c.hot_mib, 8);
        assert_eq!(c.hint, HintMode::Ranges);
        assert_eq!(c.fragment_mib, 256);
        assert_eq!(c.pci_ecam, Some(0xe000_0000));
        assert_eq!(c.cpus, Some(2));
        assert_eq!(
            Config::parse("pci_ecam=e0000000").pci_ecam,
            Some(0xe000_0000)
        );
        assert_eq!(Config::parse("hint=none").hint, HintMode::None);
        assert_eq!(Config::parse("poweroff=3").poweroff_after, Some(3));
        assert_eq!(Config::parse("poweroff=0").poweroff_after, None);
    }

    #[test]
    fn linux_style_and_garbage() {
        let mut bad = Vec::new();
        let c = Config::parse_with(
            "console=ttyS0 reboot=k  panic=1 quiet used=12 hot=x hint=maybe used dirty==3 pci_ecam=0x123\0",
            |k, v| bad.push(format!("{k}={v}")),
        );
        assert_eq!(c.used_mib, 12);
        assert_eq!(c.hot_mib, 0);
        assert_eq!(c.hint, HintMode::Stock);
        assert_eq!(c.dirty_mib, 0);
        assert_eq!(c.pci_ecam, None);
        assert_eq!(bad, ["hot=x", "hint=maybe", "dirty==3", "pci_ecam=0x123"]);
    }

    #[test]
    fn numbers() {
        assert_eq!(parse_num("0"), Some(0));
        assert_eq!(parse_num("0x10"), Some(16));
        assert_eq!(parse_num("99999999999999999999999"), None);
        assert_eq!(parse_num(""), None);
        assert_eq!(parse_num("-1"), None);
        assert_eq!(parse_hex("FEC00000"), Some(0xfec0_0000));
        assert_eq!(parse_hex("0x"), None);
    }
}

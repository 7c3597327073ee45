//! Parsing of Cloud Hypervisor style option strings: `key=value[,key=value...]`, sizes and toggles.

use std::collections::HashMap;

use super::ConfigError;

/// One MiB, in bytes.
pub const MIB: u64 = 1 << 20;

/// A parsed `key=value[,key=value...]` option string.
///
/// Every key must be one of the keys the flag accepts and may appear at most once. Values are
/// taken when a caller asks for them, so each flag converts only the keys it knows.
#[derive(Debug)]
pub struct OptionParser {
    flag: &'static str,
    values: HashMap<String, String>,
}

impl OptionParser {
    /// Splits `input` at commas into `key=value` pairs, checking each key against `known`.
    pub fn parse(
        flag: &'static str,
        input: &str,
        known: &[&'static str],
    ) -> Result<Self, ConfigError> {
        if input.trim().is_empty() {
            return Err(ConfigError::Empty { flag });
        }
        let mut values = HashMap::new();
        for item in input.split(',') {
            let (key, value) = item
                .split_once('=')
                .ok_or_else(|| ConfigError::MissingValue {
                    flag,
                    key: item.to_string(),
                })?;
            if !known.contains(&key) {
                return Err(ConfigError::UnknownKey {
                    flag,
                    key: key.to_string(),
                });
            }
            if values.insert(key.to_string(), value.to_string()).is_some() {
                return Err(ConfigError::DuplicateKey {
                    flag,
                    key: key.to_string(),
                });
            }
        }
        Ok(OptionParser { flag, values })
    }

    /// The raw value of `key`, if it was given.
    pub fn get(&self, key: &str) -> Option<&str> {
        self.values.get(key).map(String::as_str)
    }

    /// The value of `key` as a size in bytes (see [`parse_size`]).
    pub fn size(&self, key: &'static str) -> Result<Option<u64>, ConfigError> {
        self.get(key)
            .map(|value| {
                parse_size(value).ok_or_else(|| ConfigError::InvalidSize {
                    flag: self.flag,
                    key,
                    value: value.to_string(),
                })
            })
            .transpose()
    }

    /// The value of `key` as an `on`/`off` toggle (see [`parse_toggle`]).
    pub fn toggle(&self, key: &'static str) -> Result<Option<bool>, ConfigError> {
        self.get(key)
            .map(|value| {
                parse_toggle(value).ok_or_else(|| ConfigError::InvalidToggle {
                    flag: self.flag,
                    key,
                    value: value.to_string(),
                })
            })
            .transpose()
    }

    /// The value of `key` as an unsigned decimal integer that fits in `T`.
    pub fn number<T: std::str::FromStr>(
        &self,
        key: &'static str,
    ) -> Result<Option<T>, ConfigError> {
        self.get(key)
            .map(|value| {
                parse_decimal::<T>(value).ok_or_else(|| ConfigError::InvalidNumber {
                    flag: self.flag,
                    key,
                    value: value.to_string(),
                })
            })
            .transpose()
    }
}

/// Parses a size: decimal digits with an optional `K`, `M` or `G` suffix (powers of 1024).
///
/// Returns `None` for an empty string, an unknown suffix or a value that overflows `u64`.
/// Lower-case suffixes are accepted too; a `B` or `iB` ending is not.
pub fn parse_size(value: &str) -> Option<u64> {
    let (digits, shift) = match value.as_bytes().last()? {
        b'K' | b'k' => (&value[..value.len() - 1], 10),
        b'M' | b'm' => (&value[..value.len() - 1], 20),
        b'G' | b'g' => (&value[..value.len() - 1], 30),
        _ => (value, 0),
    };
    let base: u64 = parse_decimal(digits)?;
    base.checked_mul(1u64 << shift)
}

/// Parses an unsigned decimal number: digits only, no sign, no spaces.
pub fn parse_decimal<T: std::str::FromStr>(value: &str) -> Option<T> {
    if value.is_empty() || !value.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    value.parse().ok()
}

/// Parses `on`/`off` (also `true`/`false`).
pub fn parse_toggle(value: &str) -> Option<bool> {
    match value {
        "on" | "true" => Some(true),
        "off" | "false" => Some(false),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("0"), Some(0));
        assert_eq!(parse_size("4096"), Some(4096));
        assert_eq!(parse_size("4K"), Some(4096));
        assert_eq!(parse_size("512M"), Some(512 * MIB));
        assert_eq!(parse_size("2G"), Some(2 << 30));
        assert_eq!(parse_size("2g"), Some(2 << 30));
        assert_eq!(parse_size("12Q"), None);
        assert_eq!(parse_size(""), None);
        assert_eq!(parse_size("M"), None);
        assert_eq!(parse_size("-1"), None);
        assert_eq!(parse_size("+1"), None);
        assert_eq!(parse_size(" 1"), None);
        assert_eq!(parse_size("1.5G"), None);
        assert_eq!(parse_size("1MB"), None);
        assert_eq!(parse_size("18446744073709551615"), Some(u64::MAX));
        assert_eq!(parse_size("18446744073709551616"), None);
        assert_eq!(parse_size("17179869184G"), None);
        assert_eq!(parse_size("é"), None);
        assert_eq!(parse_size("1é"), None);
    }

    #[test]
    fn toggles() {
        assert_eq!(parse_toggle("on"), Some(true));
        assert_eq!(parse_toggle("off"), Some(false));
        assert_eq!(parse_toggle("true"), Some(true));
        assert_eq!(parse_toggle("false"), Some(false));
        assert_eq!(parse_toggle("yes"), None);
        assert_eq!(parse_toggle(""), None);
        assert_eq!(parse_toggle("ON "), None);
    }

    #[test]
    fn option_parser() {
        let p = OptionParser::parse("--x", "a=1,b=on", &["a", "b", "c"]).unwrap();
        assert_eq!(p.get("a"), Some("1"));
        assert_eq!(p.toggle("b").unwrap(), Some(true));
        assert_eq!(p.number::<u8>("a").unwrap(), Some(1));
        assert_eq!(p.get("c"), None);
        assert!(matches!(
            OptionParser::parse("--x", "a=1,a=2", &["a"]),
            Err(ConfigError::DuplicateKey { .. })
        ));
        assert!(matches!(
            OptionParser::parse("--x", "d=1", &["a"]),
            Err(ConfigError::UnknownKey { .. })
        ));
        assert!(matches!(
            OptionParser::parse("--x", "a", &["a"]),
            Err(ConfigError::MissingValue { .. })
        ));
        assert!(matches!(
            OptionParser::parse("--x", "a=1,", &["a"]),
            Err(ConfigError::MissingValue { .. })
        ));
        assert!(matches!(
            OptionParser::parse("--x", "", &["a"]),
            Err(ConfigError::Empty { .. })
        ));
        let p = OptionParser::parse("--x", "a=300,b=maybe", &["a", "b"]).unwrap();
        assert!(matches!(
            p.number::<u8>("a"),
            Err(ConfigError::InvalidNumber { .. })
        ));
        assert!(matches!(
            p.toggle("b"),
            Err(ConfigError::InvalidToggle { .. })
        ));
    }
}

//! The three numbers of `/proc/meminfo` the lab needs.

use std::io;

/// `MemTotal`, `MemFree` and `MemAvailable`, in KiB.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MemInfo {
    /// `MemTotal`.
    pub total_kib: u64,
    /// `MemFree`.
    pub free_kib: u64,
    /// `MemAvailable`.
    pub available_kib: u64,
}

impl MemInfo {
    /// Parses the text of `/proc/meminfo`; `None` unless all three lines are there and sane.
    pub fn parse(text: &str) -> Option<MemInfo> {
        let mut total = None;
        let mut free = None;
        let mut available = None;
        for line in text.lines() {
            let Some((key, rest)) = line.split_once(':') else {
                continue;
            };
            let slot = match key {
                "MemTotal" => &mut total,
                "MemFree" => &mut free,
                "MemAvailable" => &mut available,
                _ => continue,
            };
            let mut words = rest.split_whitespace();
            let number = words.next().and_then(|n| n.parse::<u64>().ok());
            if let (Some(number), Some("kB") | None) = (number, words.next()) {
                *slot = Some(number);
            }
        }
        Some(MemInfo {
            total_kib: total?,
            free_kib: free?,
            available_kib: available?,
        })
    }

    /// Reads `/proc/meminfo`.
    pub fn read() -> io::Result<MemInfo> {
        let text = std::fs::read_to_string("/proc/meminfo")?;
        MemInfo::parse(&text).ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                "no MemTotal/MemFree/MemAvailable in /proc/meminfo",
            )
        })
    }

    /// `MemFree` in 4 KiB pages.
    pub fn free_pages(&self) -> u64 {
        self.free_kib / 4
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_kernel_format() {
        let text = "MemTotal:        1004592 kB\nMemFree:          812344 kB\nMemAvailable:     790000 kB\n\
                    Buffers:               0 kB\nHugePages_Total:       0\n";
        let info = MemInfo::parse(text).unwrap();
        assert_eq!(
            info,
            MemInfo {
                total_kib: 1_004_592,
                free_kib: 812_344,
                available_kib: 790_000
            }
        );
        assert_eq!(info.free_pages(), 203_086);
    }

    #[test]
    fn missing_or_garbled_lines_give_none() {
        assert_eq!(MemInfo::parse(""), None);
        assert_eq!(MemInfo::parse("MemTotal: 10 kB\nMemFree: 5 kB\n"), None);
        assert_eq!(
            MemInfo::parse("MemTotal: 10 kB\nMemFree: x kB\nMemAvailable: 3 kB\n"),
            None
        );
    }

    #[test]
    fn this_host_has_meminfo() {
        let info = MemInfo::read().unwrap();
        assert!(
            info.total_kib > 0 && info.free_kib <= info.total_kib,
            "{info:?}"
        );
    }
}

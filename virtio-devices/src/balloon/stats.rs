//! The statistics the driver reports: tagged `(le16 tag, le64 value)` pairs.

use serde::{Deserialize, Serialize};

/// Size of one tagged statistic.
pub const STAT_SIZE: usize = 10;

/// The latest statistics from the guest (`None` until the driver reports the tag).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct BalloonStats {
    /// Tag 0: memory swapped in (bytes).
    pub swap_in: Option<u64>,
    /// Tag 1: memory swapped out (bytes).
    pub swap_out: Option<u64>,
    /// Tag 2: major page faults.
    pub major_faults: Option<u64>,
    /// Tag 3: minor page faults.
    pub minor_faults: Option<u64>,
    /// Tag 4: free memory (bytes).
    pub free_memory: Option<u64>,
    /// Tag 5: total memory (bytes).
    pub total_memory: Option<u64>,
    /// Tag 6: available memory (bytes).
    pub available_memory: Option<u64>,
    /// Tag 7: disk caches (bytes).
    pub disk_caches: Option<u64>,
    /// Tag 8: successful hugetlb allocations.
    pub hugetlb_allocations: Option<u64>,
    /// Tag 9: failed hugetlb allocations.
    pub hugetlb_failures: Option<u64>,
    /// How many statistics buffers were received.
    pub updates: u64,
}

impl BalloonStats {
    /// Apply a buffer of tagged values; unknown tags and a trailing partial entry are
    /// ignored. Returns the number of entries parsed.
    pub fn update(&mut self, buf: &[u8]) -> usize {
        let mut n = 0;
        for entry in buf.chunks_exact(STAT_SIZE) {
            let tag = u16::from_le_bytes([entry[0], entry[1]]);
            let mut v = [0u8; 8];
            v.copy_from_slice(&entry[2..10]);
            let value = Some(u64::from_le_bytes(v));
            match tag {
                0 => self.swap_in = value,
                1 => self.swap_out = value,
                2 => self.major_faults = value,
                3 => self.minor_faults = value,
                4 => self.free_memory = value,
                5 => self.total_memory = value,
                6 => self.available_memory = value,
                7 => self.disk_caches = value,
                8 => self.hugetlb_allocations = value,
                9 => self.hugetlb_failures = value,
                _ => continue,
            }
            n += 1;
        }
        self.updates += 1;
        n
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_tags() {
        let mut buf = Vec::new();
        for (tag, v) in [(4u16, 1000u64), (5, 4096), (99, 1), (6, 2000)] {
            buf.extend_from_slice(&tag.to_le_bytes());
            buf.extend_from_slice(&v.to_le_bytes());
        }
        buf.extend_from_slice(&[1, 2, 3]);
        let mut s = BalloonStats::default();
        assert_eq!(s.update(&buf), 3);
        assert_eq!(s.free_memory, Some(1000));
        assert_eq!(s.total_memory, Some(4096));
        assert_eq!(s.available_memory, Some(2000));
        assert_eq!(s.swap_in, None);
        assert_eq!(s.updates, 1);
    }
}

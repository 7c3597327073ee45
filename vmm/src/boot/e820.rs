//! The guest's physical memory map, as both boot protocols hand it over (e820 entries).

use crate::layout::{BIOS_AREA_START, EBDA_START, HIGH_RAM_START, MEM_32BIT_GAP_START};

/// e820 type of usable RAM.
pub const E820_RAM: u32 = 1;
/// e820 type of reserved memory.
pub const E820_RESERVED: u32 = 2;

/// One memory map entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct E820Entry {
    /// First guest-physical address.
    pub addr: u64,
    /// Length in bytes.
    pub size: u64,
    /// [`E820_RAM`] or [`E820_RESERVED`].
    pub kind: u32,
}

/// The memory map for guest RAM made of `ram` (start, length) ranges, as laid out by
/// [`crate::memory::ram_ranges`]: low RAM up to the EBDA, the BIOS area reserved (it holds the
/// ACPI tables and the MP table), RAM from 1 MiB, then any RAM above 4 GiB.
pub fn memory_map(ram: &[(u64, u64)]) -> Vec<E820Entry> {
    let mut map = Vec::new();
    for &(start, len) in ram {
        let end = start + len;
        if start == 0 {
            map.push(E820Entry {
                addr: 0,
                size: EBDA_START.min(end),
                kind: E820_RAM,
            });
            map.push(E820Entry {
                addr: BIOS_AREA_START,
                size: HIGH_RAM_START - BIOS_AREA_START,
                kind: E820_RESERVED,
            });
            if end > HIGH_RAM_START {
                map.push(E820Entry {
                    addr: HIGH_RAM_START,
                    size: end.min(MEM_32BIT_GAP_START) - HIGH_RAM_START,
                    kind: E820_RAM,
                });
            }
        } else {
            map.push(E820Entry {
                addr: start,
                size: len,
                kind: E820_RAM,
            });
        }
    }
    map
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_guest_map() {
        let map = memory_map(&[(0, 512 << 20)]);
        assert_eq!(
            map,
            vec![
                E820Entry {
                    addr: 0,
                    size: EBDA_START,
                    kind: E820_RAM
                },
                E820Entry {
                    addr: BIOS_AREA_START,
                    size: 0x20000,
                    kind: E820_RESERVED
                },
                E820Entry {
                    addr: HIGH_RAM_START,
                    size: (512 << 20) - HIGH_RAM_START,
                    kind: E820_RAM
                },
            ]
        );
    }

    #[test]
    fn acpi_and_mp_tables_are_reserved_and_clear_of_other_boot_data() {
        use crate::boot::acpi::{build, AcpiConfig};
        use crate::layout::{CMDLINE_MAX_SIZE, CMDLINE_START, MPTABLE_START, ZERO_PAGE_START};
        let map = memory_map(&[(0, 512 << 20)]);
        let acpi = build(AcpiConfig {
            vcpus: 253,
            com1: true,
        })
        .unwrap();
        let mp_len = crate::boot::mptable::build(MPTABLE_START, 253)
            .unwrap()
            .len() as u64;
        let mut spans: Vec<(u64, u64)> = acpi
            .tables
            .iter()
            .map(|(a, b)| (*a, *a + b.len() as u64))
            .collect();
        spans.push((MPTABLE_START, MPTABLE_START + mp_len));
        for (start, end) in spans {
            assert!(
                map.iter()
                    .any(|e| e.kind == E820_RESERVED && e.addr <= start && end <= e.addr + e.size),
                "{start:#x}..{end:#x} is not reserved"
            );
            assert!(
                !map.iter()
                    .any(|e| e.kind == E820_RAM && start < e.addr + e.size && e.addr < end),
                "{start:#x}..{end:#x} overlaps RAM"
            );
            // Below the kernel, above the command line, zero page and boot page tables.
            assert!(end <= HIGH_RAM_START);
            assert!(start >= EBDA_START);
            assert!(CMDLINE_START + CMDLINE_MAX_SIZE as u64 <= start);
            assert!(ZERO_PAGE_START + 0x1000 <= start);
        }
    }

    #[test]
    fn large_guest_map_has_ram_above_4g_and_no_ram_in_the_hole() {
        let map = memory_map(&[(0, 3 << 30), (4 << 30, 5 << 30)]);
        assert_eq!(map.len(), 4);
        assert_eq!(
            map[3],
            E820Entry {
                addr: 4 << 30,
                size: 5 << 30,
                kind: E820_RAM
            }
        );
        let ram: u64 = map
            .iter()
            .filter(|e| e.kind == E820_RAM)
            .map(|e| e.size)
            .sum();
        assert_eq!(ram, (8 << 30) - (HIGH_RAM_START - EBDA_START));
        for e in &map {
            let end = e.addr + e.size;
            assert!(
                end <= MEM_32BIT_GAP_START || e.addr >= 4 << 30,
                "{e:?} overlaps the hole"
            );
        }
    }
}

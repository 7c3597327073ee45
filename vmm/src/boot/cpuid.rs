//! The CPUID table each vCPU gets: KVM's supported set, with the per-vCPU topology filled in.
//!
//! The topology is one package of `count` cores with one thread each; APIC ids are the vCPU
//! indices (as in the MP table and the MADT).

use hypervisor::CpuIdEntry;

const LEAF_FEATURES: u32 = 1;
const LEAF_EXT_TOPOLOGY: u32 = 0xb;
const LEAF_V2_EXT_TOPOLOGY: u32 = 0x1f;
const LEAF_EXT_ADDRESS_SIZES: u32 = 0x8000_0008;
const ECX_TSC_DEADLINE: u32 = 1 << 24;
const ECX_HYPERVISOR: u32 = 1 << 31;
const EDX_HTT: u32 = 1 << 28;
/// Leaf 0x8000_0008 ECX: NC (cores in the package, minus one) in bits 7:0 and ApicIdSize
/// (APIC id bits that number the core) in bits 15:12; bits 11:8 are reserved.
const ECX_CORE_COUNT_MASK: u32 = 0xffff;

/// Host features that decide what the guest may be offered beyond KVM's supported CPUID.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CpuidFeatures {
    /// The in-kernel local APIC implements TSC-deadline mode (`KVM_CAP_TSC_DEADLINE_TIMER`).
    pub tsc_deadline_timer: bool,
}

/// Bits needed to number `count` cores (0 for one core).
fn apic_id_bits(count: u8) -> u32 {
    match count {
        0 | 1 => 0,
        n => u8::BITS - (n - 1).leading_zeros(),
    }
}

/// Patches `supported` for vCPU `id` of `count`: APIC ids (leaf 1 EBX[31:24], leaves 0xb/0x1f
/// EDX), the logical processor and core counts (leaves 1, 0xb/0x1f and 0x8000_0008), the
/// hypervisor-present bit, and TSC-deadline when `features` says the host has it.
pub fn for_vcpu(
    supported: &[CpuIdEntry],
    id: u8,
    count: u8,
    features: CpuidFeatures,
) -> Vec<CpuIdEntry> {
    supported
        .iter()
        .map(|e| {
            let mut e = *e;
            match e.function {
                LEAF_FEATURES => {
                    e.ebx =
                        (e.ebx & 0x0000_ffff) | (u32::from(id) << 24) | (u32::from(count) << 16);
                    e.ecx |= ECX_HYPERVISOR;
                    if features.tsc_deadline_timer {
                        e.ecx |= ECX_TSC_DEADLINE;
                    }
                    // HTT: more than one logical processor in the package.
                    if count > 1 {
                        e.edx |= EDX_HTT;
                    } else {
                        e.edx &= !EDX_HTT;
                    }
                }
                LEAF_EXT_TOPOLOGY | LEAF_V2_EXT_TOPOLOGY => {
                    e.edx = u32::from(id);
                    // Level 0: SMT, one thread per core; level 1: cores, `count` of them.
                    match e.index {
                        0 => {
                            e.eax = 0;
                            e.ebx = 1;
                            e.ecx = 1 << 8;
                        }
                        1 => {
                            e.eax = apic_id_bits(count);
                            e.ebx = u32::from(count);
                            e.ecx = (2 << 8) | 1;
                        }
                        _ => {
                            e.eax = 0;
                            e.ebx = 0;
                            e.ecx = e.index;
                        }
                    }
                }
                LEAF_EXT_ADDRESS_SIZES => {
                    let cores = u32::from(count.max(1));
                    e.ecx =
                        (e.ecx & !ECX_CORE_COUNT_MASK) | (cores - 1) | (apic_id_bits(count) << 12);
                }
                _ => {}
            }
            e
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What KVM's supported CPUID might say on a 64-core host.
    fn host_like() -> Vec<CpuIdEntry> {
        vec![
            CpuIdEntry {
                function: 1,
                ebx: 0xff40_0800,
                edx: EDX_HTT,
                ..Default::default()
            },
            CpuIdEntry {
                function: 0xb,
                index: 0,
                ..Default::default()
            },
            CpuIdEntry {
                function: 0xb,
                index: 1,
                ..Default::default()
            },
            CpuIdEntry {
                function: LEAF_EXT_ADDRESS_SIZES,
                eax: 0x3030,
                ecx: 0x0001_703f, // PerfTscSize 1, ApicIdSize 7, NC 63
                ..Default::default()
            },
        ]
    }

    fn leaf(t: &[CpuIdEntry], function: u32, index: u32) -> CpuIdEntry {
        *t.iter()
            .find(|e| e.function == function && e.index == index)
            .unwrap()
    }

    #[test]
    fn four_vcpus_topology() {
        let t = for_vcpu(&host_like(), 3, 4, CpuidFeatures::default());
        let l1 = leaf(&t, 1, 0);
        assert_eq!(l1.ebx >> 24, 3);
        assert_eq!((l1.ebx >> 16) & 0xff, 4);
        assert_eq!(l1.ebx & 0xffff, 0x0800);
        assert_ne!(l1.ecx & ECX_HYPERVISOR, 0);
        assert_ne!(l1.edx & EDX_HTT, 0);
        assert_eq!(leaf(&t, 0xb, 0).edx, 3);
        assert_eq!(leaf(&t, 0xb, 1).ebx, 4);
        assert_eq!(leaf(&t, 0xb, 1).eax, 2, "two APIC id bits number 4 cores");
        let ext = leaf(&t, LEAF_EXT_ADDRESS_SIZES, 0);
        assert_eq!(ext.ecx & 0xff, 3, "NC = cores - 1");
        assert_eq!((ext.ecx >> 12) & 0xf, 2, "ApicIdSize");
        assert_eq!(ext.ecx >> 16, 1, "bits above the core count are KVM's");
        assert_eq!(ext.eax, 0x3030);
    }

    #[test]
    fn one_vcpu_topology() {
        let t = for_vcpu(&host_like(), 0, 1, CpuidFeatures::default());
        let l1 = leaf(&t, 1, 0);
        assert_eq!(l1.ebx >> 16, 1);
        assert_eq!(l1.edx & EDX_HTT, 0, "one logical processor: no HTT");
        assert_eq!(leaf(&t, 0xb, 1).ebx, 1);
        assert_eq!(leaf(&t, 0xb, 1).eax, 0);
        let ext = leaf(&t, LEAF_EXT_ADDRESS_SIZES, 0);
        assert_eq!(ext.ecx & 0xffff, 0, "NC 0 and ApicIdSize 0: one core");
    }

    #[test]
    fn tsc_deadline_only_when_the_host_has_it() {
        let off = for_vcpu(&host_like(), 0, 1, CpuidFeatures::default());
        assert_eq!(leaf(&off, 1, 0).ecx & ECX_TSC_DEADLINE, 0);
        let on = for_vcpu(
            &host_like(),
            0,
            1,
            CpuidFeatures {
                tsc_deadline_timer: true,
            },
        );
        assert_ne!(leaf(&on, 1, 0).ecx & ECX_TSC_DEADLINE, 0);
    }

    #[test]
    fn apic_id_bits_cover_the_count() {
        for (count, bits) in [
            (1u8, 0u32),
            (2, 1),
            (3, 2),
            (4, 2),
            (5, 3),
            (8, 3),
            (9, 4),
            (254, 8),
        ] {
            assert_eq!(apic_id_bits(count), bits, "{count} cores");
            assert!(count <= 1 || (1u32 << bits) >= u32::from(count));
        }
    }
}

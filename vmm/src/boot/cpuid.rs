//! The CPUID table each vCPU gets: KVM's supported set, with the per-vCPU topology filled in.
//!
//! The topology is one package of `count` cores with one thread each; APIC ids are the vCPU
//! indices (as in the MP table and the MADT).

use hypervisor::CpuIdEntry;

const LEAF_FEATURES: u32 = 1;
const LEAF_EXT_TOPOLOGY: u32 = 0xb;
const LEAF_V2_EXT_TOPOLOGY: u32 = 0x1f;
const LEAF_EXT_ADDRESS_SIZES: u32 = 0x8000_0008;
const LEAF_EXT_APIC_ID: u32 = 0x8000_001e;
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

/// Sub-leaf `index` of an extended topology leaf (0xb or 0x1f) for vCPU `id` of `count`:
/// level 0 is SMT (one thread per core), level 1 the cores of the one package, and level 2
/// ends the list.
fn topology_subleaf(template: &CpuIdEntry, index: u32, id: u8, count: u8) -> CpuIdEntry {
    const LEVEL_SMT: u32 = 1;
    const LEVEL_CORE: u32 = 2;
    let (eax, ebx, ecx) = match index {
        0 => (0, 1, LEVEL_SMT << 8),
        1 => (apic_id_bits(count), u32::from(count), (LEVEL_CORE << 8) | 1),
        _ => (0, 0, index),
    };
    CpuIdEntry {
        function: template.function,
        index,
        flags: template.flags,
        eax,
        ebx,
        ecx,
        edx: u32::from(id),
    }
}

/// Patches `supported` for vCPU `id` of `count`: APIC ids (leaf 1 EBX[31:24], leaves 0xb/0x1f
/// EDX, leaf 0x8000_001e EAX), the logical processor and core counts (leaves 1, 0xb/0x1f,
/// 0x8000_0008 and 0x8000_001e), the hypervisor-present bit, and TSC-deadline when `features`
/// says the host has it. KVM may list only the first sub-leaf of 0xb/0x1f; all three levels
/// are written here.
pub fn for_vcpu(
    supported: &[CpuIdEntry],
    id: u8,
    count: u8,
    features: CpuidFeatures,
) -> Vec<CpuIdEntry> {
    let mut out = Vec::with_capacity(supported.len() + 4);
    for e in supported {
        let mut e = *e;
        match e.function {
            LEAF_FEATURES => {
                e.ebx = (e.ebx & 0x0000_ffff) | (u32::from(id) << 24) | (u32::from(count) << 16);
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
                if e.index == 0 {
                    out.extend((0..3).map(|index| topology_subleaf(&e, index, id, count)));
                }
                continue;
            }
            LEAF_EXT_ADDRESS_SIZES => {
                let cores = u32::from(count.max(1));
                e.ecx = (e.ecx & !ECX_CORE_COUNT_MASK) | (cores - 1) | (apic_id_bits(count) << 12);
            }
            LEAF_EXT_APIC_ID => {
                // Extended APIC id; core id with one thread per core; node 0 of one node.
                e.eax = u32::from(id);
                e.ebx = u32::from(id);
                e.ecx = 0;
            }
            _ => {}
        }
        out.push(e);
    }
    out
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
            // KVM lists only sub-leaf 0 of leaf 0xb, all zero.
            CpuIdEntry {
                function: 0xb,
                index: 0,
                flags: 1,
                ..Default::default()
            },
            CpuIdEntry {
                function: LEAF_EXT_APIC_ID,
                ebx: 0x0100,
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
        let smt = leaf(&t, 0xb, 0);
        assert_eq!(
            (smt.eax, smt.ebx, smt.ecx >> 8, smt.edx),
            (0, 1, 1, 3),
            "SMT level"
        );
        let core = leaf(&t, 0xb, 1);
        assert_eq!((core.ebx, core.ecx >> 8, core.edx), (4, 2, 3), "core level");
        assert_eq!(core.eax, 2, "two APIC id bits number 4 cores");
        let end = leaf(&t, 0xb, 2);
        assert_eq!((end.ebx, end.ecx), (0, 2), "level type 0 ends the list");
        assert!(t.iter().filter(|e| e.function == 0xb).all(|e| e.flags == 1));
        let ext = leaf(&t, LEAF_EXT_APIC_ID, 0);
        assert_eq!(
            (ext.eax, ext.ebx, ext.ecx),
            (3, 3, 0),
            "APIC id, core id, one node"
        );
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

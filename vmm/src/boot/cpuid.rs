//! The CPUID table each vCPU gets: KVM's supported set, with the per-vCPU topology filled in.

use hypervisor::CpuIdEntry;

const LEAF_FEATURES: u32 = 1;
const LEAF_EXT_TOPOLOGY: u32 = 0xb;
const LEAF_V2_EXT_TOPOLOGY: u32 = 0x1f;
const ECX_HYPERVISOR: u32 = 1 << 31;

/// Patches `supported` for vCPU `id` of `count`: APIC ids (leaf 1 EBX[31:24], leaves 0xb/0x1f
/// EDX), the logical processor count, and the hypervisor-present bit.
pub fn for_vcpu(supported: &[CpuIdEntry], id: u8, count: u8) -> Vec<CpuIdEntry> {
    supported
        .iter()
        .map(|e| {
            let mut e = *e;
            match e.function {
                LEAF_FEATURES => {
                    e.ebx =
                        (e.ebx & 0x0000_ffff) | (u32::from(id) << 24) | (u32::from(count) << 16);
                    e.ecx |= ECX_HYPERVISOR;
                    // HTT: more than one logical processor in the package.
                    if count > 1 {
                        e.edx |= 1 << 28;
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
                            e.eax = 8;
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
                _ => {}
            }
            e
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn apic_ids_and_hypervisor_bit() {
        let supported = vec![
            CpuIdEntry {
                function: 1,
                ebx: 0xff00_0800,
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
        ];
        let t = for_vcpu(&supported, 3, 4);
        assert_eq!(t[0].ebx >> 24, 3);
        assert_eq!((t[0].ebx >> 16) & 0xff, 4);
        assert_eq!(t[0].ebx & 0xffff, 0x0800);
        assert_ne!(t[0].ecx & ECX_HYPERVISOR, 0);
        assert_eq!(t[1].edx, 3);
        assert_eq!(t[2].ebx, 4);
    }
}

//! ACPI power-off as a guest OS finds it: the RSDP (given, or found by scanning the BIOS area),
//! the XSDT or RSDT, the FADT's sleep control register (hardware-reduced ACPI) and the
//! SLP_TYP of `\_S5` in the DSDT. The value to write is `SLP_TYP << 2 | SLP_EN`.

use crate::firmware::{le, sig, sum};

/// Where and what to write to power off.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PowerOff {
    /// The sleep control register's I/O port.
    pub port: u16,
    /// `SLP_TYP << 2 | SLP_EN` for S5.
    pub value: u8,
}

const SLP_EN: u8 = 1 << 5;
const SYSTEM_IO: u8 = 1;
const FADT_SLEEP_CONTROL: u64 = 244;
const FADT_X_DSDT: u64 = 140;
const FADT_DSDT: u64 = 40;
const PACKAGE_OP: u8 = 0x12;
const BYTE_PREFIX: u8 = 0x0a;

/// A checksummed table with signature `s` at `at`: its length.
fn table(read: &impl Fn(u64) -> Option<u8>, at: u64, s: &[u8]) -> Option<u64> {
    if at == 0 || !sig(read, at, s) {
        return None;
    }
    let len = le(read, at + 4, 4)?;
    ((36..=1 << 20).contains(&len) && sum(read, at, len) == Some(0)).then_some(len)
}

/// A valid RSDP: `hint` if it is one, else the first in 0xE0000..0x100000.
pub fn find_rsdp(read: &impl Fn(u64) -> Option<u8>, hint: u64) -> Option<u64> {
    let valid = |a: u64| sig(read, a, b"RSD PTR ") && sum(read, a, 20) == Some(0);
    if hint != 0 && valid(hint) {
        return Some(hint);
    }
    (0xe0000..0x100000u64).step_by(16).find(|&a| valid(a))
}

/// The address of the first table with signature `s` listed by the RSDP at `rsdp`.
pub fn find_table(read: &impl Fn(u64) -> Option<u8>, rsdp: u64, s: &[u8]) -> Option<u64> {
    let rev = read(rsdp + 15)?;
    let xsdt = if rev >= 2 { le(read, rsdp + 24, 8)? } else { 0 };
    let (root, entry, root_sig): (u64, u64, &[u8]) = if xsdt != 0 {
        (xsdt, 8, b"XSDT")
    } else {
        (le(read, rsdp + 16, 4)?, 4, b"RSDT")
    };
    let len = table(read, root, root_sig)?;
    (0..(len - 36) / entry)
        .filter_map(|i| le(read, root + 36 + i * entry, entry))
        .find(|&t| table(read, t, s).is_some())
}

/// The SLP_TYP of `\_S5` in the DSDT at `dsdt`: the first element of the package named `_S5_`.
fn s5_sleep_type(read: &impl Fn(u64) -> Option<u8>, dsdt: u64) -> Option<u8> {
    let len = table(read, dsdt, b"DSDT")?;
    let name = (dsdt + 36..dsdt + len.saturating_sub(4)).find(|&a| sig(read, a, b"_S5_"))?;
    let mut p = name + 4;
    if read(p)? != PACKAGE_OP {
        return None;
    }
    p += 1;
    let follow = u64::from(read(p)? >> 6);
    p += 1 + follow + 1; // PkgLength, NumElements
    match read(p)? {
        0 => Some(0),
        1 => Some(1),
        BYTE_PREFIX => read(p + 1),
        _ => None,
    }
}

/// Finds how to power off through ACPI, starting from the RSDP at `rsdp_hint` (0: scan).
pub fn find_power_off(read: &impl Fn(u64) -> Option<u8>, rsdp_hint: u64) -> Option<PowerOff> {
    let rsdp = find_rsdp(read, rsdp_hint)?;
    let fadt = find_table(read, rsdp, b"FACP")?;
    let fadt_len = le(read, fadt + 4, 4)?;
    if fadt_len < FADT_SLEEP_CONTROL + 12 || read(fadt + FADT_SLEEP_CONTROL)? != SYSTEM_IO {
        return None;
    }
    let port = u16::try_from(le(read, fadt + FADT_SLEEP_CONTROL + 4, 8)?).ok()?;
    let x_dsdt = le(read, fadt + FADT_X_DSDT, 8)?;
    let dsdt = if x_dsdt != 0 {
        x_dsdt
    } else {
        le(read, fadt + FADT_DSDT, 4)?
    };
    let slp_typ = s5_sleep_type(read, dsdt)?;
    Some(PowerOff {
        port,
        value: ((slp_typ & 7) << 2) | SLP_EN,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Fixes the checksum byte at `at` of `t`.
    fn fix(t: &mut [u8], at: usize) {
        t[at] = 0;
        let s = t.iter().fold(0u8, |s, b| s.wrapping_add(*b));
        t[at] = s.wrapping_neg();
    }

    fn header(sig: &[u8], len: usize) -> Vec<u8> {
        let mut t = vec![0u8; len];
        t[..4].copy_from_slice(sig);
        t[4..8].copy_from_slice(&(len as u32).to_le_bytes());
        t
    }

    /// A memory image with RSDP at 0xe0000, XSDT, FADT and a DSDT with `\_S5`.
    fn image(s5: &[u8]) -> Vec<(u64, Vec<u8>)> {
        let (xsdt_at, fadt_at, dsdt_at) = (0xe0100u64, 0xe0200u64, 0xe0400u64);
        let mut rsdp = vec![0u8; 36];
        rsdp[..8].copy_from_slice(b"RSD PTR ");
        rsdp[15] = 2;
        rsdp[24..32].copy_from_slice(&xsdt_at.to_le_bytes());
        fix(&mut rsdp[..20], 8);
        let mut xsdt = header(b"XSDT", 36 + 8);
        xsdt[36..44].copy_from_slice(&fadt_at.to_le_bytes());
        fix(&mut xsdt, 9);
        let mut fadt = header(b"FACP", 276);
        fadt[140..148].copy_from_slice(&dsdt_at.to_le_bytes());
        fadt[244..248].copy_from_slice(&[1, 8, 0, 1]);
        fadt[248..250].copy_from_slice(&0x600u16.to_le_bytes());
        fix(&mut fadt, 9);
        let mut dsdt = header(b"DSDT", 36 + 6 + s5.len() + 8);
        dsdt[36 + 6..36 + 6 + s5.len()].copy_from_slice(s5);
        fix(&mut dsdt, 9);
        vec![
            (0xe0000, rsdp),
            (xsdt_at, xsdt),
            (fadt_at, fadt),
            (dsdt_at, dsdt),
        ]
    }

    fn reader(img: &[(u64, Vec<u8>)]) -> impl Fn(u64) -> Option<u8> + '_ {
        move |a| {
            img.iter()
                .find(|(s, b)| a >= *s && a < s + b.len() as u64)
                .map(|(s, b)| b[(a - s) as usize])
                .or(Some(0))
        }
    }

    #[test]
    fn finds_sleep_control_and_s5() {
        // Name (\_S5, Package (4) { 5, 5, 0, 0 })
        let img = image(&[
            0x08, b'\\', b'_', b'S', b'5', b'_', 0x12, 0x08, 0x04, 0x0a, 5, 0x0a, 5, 0, 0,
        ]);
        let r = reader(&img);
        assert_eq!(
            find_power_off(&r, 0),
            Some(PowerOff {
                port: 0x600,
                value: (5 << 2) | 0x20
            })
        );
        assert_eq!(
            find_power_off(&r, 0xe0000),
            Some(PowerOff {
                port: 0x600,
                value: 0x34
            })
        );
    }

    #[test]
    fn zero_sleep_type_and_missing_pieces() {
        let img = image(&[
            0x08, b'_', b'S', b'5', b'_', 0x12, 0x06, 0x04, 0x00, 0x00, 0, 0,
        ]);
        assert_eq!(
            find_power_off(&reader(&img), 0),
            Some(PowerOff {
                port: 0x600,
                value: 0x20
            })
        );
        let none = image(&[
            0x08, b'_', b'S', b'4', b'_', 0x12, 0x06, 0x04, 0x00, 0x00, 0, 0,
        ]);
        assert_eq!(find_power_off(&reader(&none), 0), None);
        let mut broken = image(&[
            0x08, b'_', b'S', b'5', b'_', 0x12, 0x06, 0x04, 0x00, 0x00, 0, 0,
        ]);
        broken[2].1[100] ^= 1; // FADT checksum
        assert_eq!(find_power_off(&reader(&broken), 0), None);
    }
}

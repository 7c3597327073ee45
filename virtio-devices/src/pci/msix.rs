//! MSI-X: the capability's message control, the vector table and the pending bit array.
//!
//! Routes are pushed to the VMM ([`MsiVectors::set_route`]) when the guest enables MSI-X or
//! changes an entry; a vector raised while masked (function mask or entry mask) sets its pending
//! bit and is delivered when unmasked.

use std::sync::Arc;

use log::{debug, warn};
use serde::{Deserialize, Serialize};

use super::{PciError, PCI_CAP_ID_MSIX};
use crate::interrupt::{InterruptError, MsiMessage, MsiVectors};

/// Size of one MSI-X table entry in bytes.
pub const MSIX_ENTRY_SIZE: u64 = 16;
/// Maximum number of MSI-X vectors of one function.
pub const MSIX_MAX_VECTORS: usize = 2048;
/// Message control bit: MSI-X enable.
pub const MSIX_CTL_ENABLE: u16 = 0x8000;
/// Message control bit: function mask.
pub const MSIX_CTL_FUNCTION_MASK: u16 = 0x4000;
const VECTOR_CTL_MASKED: u32 = 1;

/// One entry of the MSI-X table, as the guest programmed it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MsixTableEntry {
    /// Message address, low dword.
    pub msg_addr_lo: u32,
    /// Message address, high dword.
    pub msg_addr_hi: u32,
    /// Message data.
    pub msg_data: u32,
    /// Vector control (bit 0: masked).
    pub vector_ctl: u32,
}

impl MsixTableEntry {
    fn masked(&self) -> bool {
        self.vector_ctl & VECTOR_CTL_MASKED != 0
    }

    fn message(&self) -> MsiMessage {
        MsiMessage {
            address: u64::from(self.msg_addr_hi) << 32 | u64::from(self.msg_addr_lo),
            data: self.msg_data,
        }
    }

    fn bytes(&self) -> [u8; 16] {
        let mut b = [0u8; 16];
        b[0..4].copy_from_slice(&self.msg_addr_lo.to_le_bytes());
        b[4..8].copy_from_slice(&self.msg_addr_hi.to_le_bytes());
        b[8..12].copy_from_slice(&self.msg_data.to_le_bytes());
        b[12..16].copy_from_slice(&self.vector_ctl.to_le_bytes());
        b
    }
}

/// Saved MSI-X state.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MsixState {
    /// The table.
    pub entries: Vec<MsixTableEntry>,
    /// Pending bits, 64 vectors per word.
    pub pba: Vec<u64>,
    /// MSI-X enable bit.
    pub enabled: bool,
    /// Function mask bit.
    pub masked: bool,
}

/// What happened to a raised vector.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MsixTrigger {
    /// Sent to the VMM.
    Delivered,
    /// Masked: the pending bit is set.
    Pending,
    /// MSI-X is disabled: the caller should use INTx.
    Disabled,
}

/// The MSI-X state of one PCI function.
pub struct MsixConfig {
    entries: Vec<MsixTableEntry>,
    pba: Vec<u64>,
    enabled: bool,
    masked: bool,
    vectors: Arc<dyn MsiVectors>,
}

impl std::fmt::Debug for MsixConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MsixConfig")
            .field("entries", &self.entries.len())
            .field("enabled", &self.enabled)
            .field("masked", &self.masked)
            .finish()
    }
}

impl MsixConfig {
    /// A table of `num_vectors` entries, all masked, delivered through `vectors`.
    pub fn new(num_vectors: usize, vectors: Arc<dyn MsiVectors>) -> Result<Self, PciError> {
        if num_vectors == 0 || num_vectors > MSIX_MAX_VECTORS || num_vectors > vectors.len() {
            return Err(PciError::InvalidMsixVectors(num_vectors));
        }
        let entries = vec![
            MsixTableEntry {
                vector_ctl: VECTOR_CTL_MASKED,
                ..Default::default()
            };
            num_vectors
        ];
        Ok(MsixConfig {
            entries,
            pba: vec![0; num_vectors.div_ceil(64)],
            enabled: false,
            masked: false,
            vectors,
        })
    }

    /// Number of table entries.
    pub fn num_vectors(&self) -> usize {
        self.entries.len()
    }

    /// Size of the table in bytes.
    pub fn table_size(&self) -> u64 {
        self.entries.len() as u64 * MSIX_ENTRY_SIZE
    }

    /// Size of the pending bit array in bytes.
    pub fn pba_size(&self) -> u64 {
        self.pba.len() as u64 * 8
    }

    /// Whether MSI-X is enabled.
    pub fn enabled(&self) -> bool {
        self.enabled
    }

    /// Whether the whole function is masked.
    pub fn function_masked(&self) -> bool {
        self.masked
    }

    /// The capability structure (12 bytes) for a table and PBA at the given BAR offsets.
    pub fn capability(
        &self,
        table_bar: u8,
        table_offset: u32,
        pba_bar: u8,
        pba_offset: u32,
    ) -> [u8; 12] {
        let mut cap = [0u8; 12];
        cap[0] = PCI_CAP_ID_MSIX;
        cap[2..4].copy_from_slice(&self.message_control().to_le_bytes());
        cap[4..8].copy_from_slice(&(table_offset | u32::from(table_bar & 7)).to_le_bytes());
        cap[8..12].copy_from_slice(&(pba_offset | u32::from(pba_bar & 7)).to_le_bytes());
        cap
    }

    /// The message control register value.
    pub fn message_control(&self) -> u16 {
        let mut ctl = (self.entries.len() - 1) as u16;
        if self.masked {
            ctl |= MSIX_CTL_FUNCTION_MASK;
        }
        if self.enabled {
            ctl |= MSIX_CTL_ENABLE;
        }
        ctl
    }

    /// Apply a guest write of the message control register.
    pub fn set_message_control(&mut self, ctl: u16) {
        let enable = ctl & MSIX_CTL_ENABLE != 0;
        let mask = ctl & MSIX_CTL_FUNCTION_MASK != 0;
        if enable != self.enabled {
            self.enabled = enable;
            for v in 0..self.entries.len() {
                let msg = enable.then(|| self.entries[v].message());
                self.update_route(v, msg);
            }
        }
        self.masked = mask;
        self.deliver_pending();
    }

    fn update_route(&self, vector: usize, msg: Option<MsiMessage>) {
        if let Err(e) = self.vectors.set_route(vector as u16, msg) {
            warn!("MSI-X: failed to route vector {vector}: {e}");
        }
    }

    fn deliver_pending(&mut self) {
        if !self.enabled || self.masked {
            return;
        }
        for v in 0..self.entries.len() {
            if !self.entries[v].masked() && self.pending(v) {
                self.set_pending(v, false);
                if let Err(e) = self.vectors.trigger(v as u16) {
                    warn!("MSI-X: failed to deliver pending vector {v}: {e}");
                }
            }
        }
    }

    fn pending(&self, v: usize) -> bool {
        self.pba[v / 64] & (1 << (v % 64)) != 0
    }

    fn set_pending(&mut self, v: usize, on: bool) {
        if on {
            self.pba[v / 64] |= 1 << (v % 64);
        } else {
            self.pba[v / 64] &= !(1 << (v % 64));
        }
    }

    /// Guest read of the table at `offset` (any size within one entry; the rest reads 0).
    pub fn read_table(&self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        let Some(entry) = usize::try_from(offset / MSIX_ENTRY_SIZE)
            .ok()
            .and_then(|i| self.entries.get(i))
        else {
            return;
        };
        let start = (offset % MSIX_ENTRY_SIZE) as usize;
        let bytes = entry.bytes();
        let end = (start + data.len()).min(bytes.len());
        data[..end - start].copy_from_slice(&bytes[start..end]);
    }

    /// Guest write of the table: aligned dword or qword accesses only.
    pub fn write_table(&mut self, offset: u64, data: &[u8]) {
        let len = data.len() as u64;
        if !(len == 4 || len == 8) || !offset.is_multiple_of(len) {
            debug!("MSI-X: ignoring {len}-byte table write at {offset:#x}");
            return;
        }
        let Some(index) = usize::try_from(offset / MSIX_ENTRY_SIZE)
            .ok()
            .filter(|i| *i < self.entries.len())
        else {
            return;
        };
        let old = self.entries[index];
        let mut bytes = old.bytes();
        let start = (offset % MSIX_ENTRY_SIZE) as usize;
        bytes[start..start + data.len()].copy_from_slice(data);
        let word =
            |i: usize| u32::from_le_bytes([bytes[i], bytes[i + 1], bytes[i + 2], bytes[i + 3]]);
        let new = MsixTableEntry {
            msg_addr_lo: word(0),
            msg_addr_hi: word(4),
            msg_data: word(8),
            vector_ctl: word(12),
        };
        self.entries[index] = new;
        if self.enabled && old.message() != new.message() {
            self.update_route(index, Some(new.message()));
        }
        if old.masked() && !new.masked() {
            self.deliver_pending();
        }
    }

    /// Guest read of the pending bit array.
    pub fn read_pba(&self, offset: u64, data: &mut [u8]) {
        for (i, b) in data.iter_mut().enumerate() {
            let byte = offset + i as u64;
            *b = usize::try_from(byte / 8)
                .ok()
                .and_then(|w| self.pba.get(w))
                .map_or(0, |w| (w >> ((byte % 8) * 8)) as u8);
        }
    }

    /// Raise `vector`.
    pub fn trigger(&mut self, vector: u16) -> Result<MsixTrigger, InterruptError> {
        if !self.enabled {
            return Ok(MsixTrigger::Disabled);
        }
        let v = usize::from(vector);
        let entry = self
            .entries
            .get(v)
            .ok_or(InterruptError::InvalidVector(vector))?;
        if self.masked || entry.masked() {
            self.set_pending(v, true);
            return Ok(MsixTrigger::Pending);
        }
        self.vectors.trigger(vector)?;
        Ok(MsixTrigger::Delivered)
    }

    /// Capture the state.
    pub fn state(&self) -> MsixState {
        MsixState {
            entries: self.entries.clone(),
            pba: self.pba.clone(),
            enabled: self.enabled,
            masked: self.masked,
        }
    }

    /// Load a saved state (same table size) and push the routes to the VMM.
    pub fn restore(&mut self, state: &MsixState) -> Result<(), PciError> {
        if state.entries.len() != self.entries.len() || state.pba.len() != self.pba.len() {
            return Err(PciError::InvalidState(format!(
                "MSI-X table of {} entries, expected {}",
                state.entries.len(),
                self.entries.len()
            )));
        }
        self.entries.clone_from(&state.entries);
        self.pba.clone_from(&state.pba);
        // Bits beyond the table are reserved.
        if let Some(last) = self.pba.last_mut() {
            let used = self.entries.len() % 64;
            if used != 0 {
                *last &= (1u64 << used) - 1;
            }
        }
        self.enabled = state.enabled;
        self.masked = state.masked;
        for v in 0..self.entries.len() {
            let msg = self.enabled.then(|| self.entries[v].message());
            self.update_route(v, msg);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_utils::MockMsi;

    fn msix(n: usize) -> (MsixConfig, Arc<MockMsi>) {
        let msi = Arc::new(MockMsi::new(8));
        (MsixConfig::new(n, msi.clone()).unwrap(), msi)
    }

    fn program(m: &mut MsixConfig, v: u64, addr: u64, data: u32) {
        m.write_table(v * 16, &addr.to_le_bytes());
        m.write_table(v * 16 + 8, &data.to_le_bytes());
        m.write_table(v * 16 + 12, &0u32.to_le_bytes());
    }

    #[test]
    fn vector_limits() {
        let msi: Arc<dyn MsiVectors> = Arc::new(MockMsi::new(4));
        assert!(MsixConfig::new(5, msi.clone()).is_err());
        assert!(MsixConfig::new(0, msi.clone()).is_err());
        let m = MsixConfig::new(4, msi).unwrap();
        assert_eq!(m.message_control(), 3);
        assert_eq!(
            m.capability(0, 0x4000, 0, 0x5000)[4..8],
            0x4000u32.to_le_bytes()
        );
    }

    #[test]
    fn table_read_write() {
        let (mut m, _) = msix(3);
        let mut buf = [0u8; 4];
        m.read_table(12, &mut buf);
        assert_eq!(u32::from_le_bytes(buf), 1, "entries start masked");
        m.write_table(16, &0xFEE0_1000u32.to_le_bytes());
        m.write_table(20, &0x1u32.to_le_bytes());
        m.write_table(24, &0x41u32.to_le_bytes());
        let mut q = [0u8; 8];
        m.read_table(16, &mut q);
        assert_eq!(u64::from_le_bytes(q), 0x1_FEE0_1000);
        m.read_table(24, &mut buf);
        assert_eq!(u32::from_le_bytes(buf), 0x41);
        // Unaligned and odd-sized writes are ignored, out-of-range reads give 0.
        m.write_table(17, &[1, 2, 3, 4]);
        m.write_table(24, &[9, 9]);
        m.read_table(24, &mut buf);
        assert_eq!(u32::from_le_bytes(buf), 0x41);
        m.read_table(3 * 16, &mut buf);
        assert_eq!(buf, [0; 4]);
        m.write_table(3 * 16, &[1; 4]);
    }

    #[test]
    fn routes_follow_enable_and_writes() {
        let (mut m, msi) = msix(2);
        program(&mut m, 0, 0xFEE0_0000, 0x30);
        assert_eq!(msi.route(0), None, "no route while MSI-X is disabled");
        m.set_message_control(MSIX_CTL_ENABLE);
        assert_eq!(
            msi.route(0),
            Some(MsiMessage {
                address: 0xFEE0_0000,
                data: 0x30
            })
        );
        m.write_table(8, &0x31u32.to_le_bytes());
        assert_eq!(msi.route(0).unwrap().data, 0x31);
        m.set_message_control(0);
        assert_eq!(msi.route(0), None);
    }

    #[test]
    fn masking_and_pending() {
        let (mut m, msi) = msix(2);
        assert_eq!(m.trigger(0).unwrap(), MsixTrigger::Disabled);
        m.set_message_control(MSIX_CTL_ENABLE);
        // Entry 1 is still masked: the vector becomes pending.
        assert_eq!(m.trigger(1).unwrap(), MsixTrigger::Pending);
        let mut pba = [0u8; 8];
        m.read_pba(0, &mut pba);
        assert_eq!(u64::from_le_bytes(pba), 0b10);
        assert!(msi.triggered().is_empty());
        // Unmasking the entry delivers it and clears the bit.
        program(&mut m, 1, 0xFEE0_0000, 0x40);
        assert_eq!(msi.triggered(), vec![1]);
        m.read_pba(0, &mut pba);
        assert_eq!(u64::from_le_bytes(pba), 0);
        // Function mask.
        program(&mut m, 0, 0xFEE0_0000, 0x41);
        m.set_message_control(MSIX_CTL_ENABLE | MSIX_CTL_FUNCTION_MASK);
        assert_eq!(
            m.message_control() & MSIX_CTL_FUNCTION_MASK,
            MSIX_CTL_FUNCTION_MASK
        );
        assert_eq!(m.trigger(0).unwrap(), MsixTrigger::Pending);
        assert_eq!(msi.triggered(), vec![1]);
        m.set_message_control(MSIX_CTL_ENABLE);
        assert_eq!(msi.triggered(), vec![1, 0]);
        assert_eq!(m.trigger(0).unwrap(), MsixTrigger::Delivered);
        assert!(m.trigger(7).is_err());
    }

    #[test]
    fn state_round_trip() {
        let (mut m, _) = msix(3);
        m.set_message_control(MSIX_CTL_ENABLE);
        program(&mut m, 2, 0xFEE0_0000, 0x55);
        m.trigger(0).unwrap();
        let s = m.state();
        let (mut fresh, msi) = msix(3);
        fresh.restore(&s).unwrap();
        assert_eq!(fresh.state(), s);
        assert_eq!(msi.route(2).unwrap().data, 0x55);
        let (mut small, _) = msix(2);
        assert!(small.restore(&s).is_err());
    }
}

use std::sync::Arc;

use serde::{Deserialize, Serialize};
use vm_memory::{Bytes, GuestAddress};

use super::*;
use crate::interrupt::{VirtioInterrupt, VirtioInterruptType};
use crate::pci::{
    PciDevice, MSIX_CTL_ENABLE, MSIX_CTL_FUNCTION_MASK, PCI_CAP_ID_MSIX, PCI_CAP_ID_VENDOR,
};
use crate::test_utils::{guest_memory, MockIntx, MockMsi, TestQueue};
use crate::virtio::*;
use crate::GuestMemoryMmap;

mod linux_driver;

const BASE: u64 = 0xC000_0000;

#[derive(Default)]
struct Dummy {
    acked: Option<u64>,
    interrupt: Option<Arc<dyn VirtioInterrupt>>,
    queues: Vec<VirtioQueue>,
    resets: usize,
    config: [u8; 8],
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
struct DummyState {
    acked: Option<u64>,
    config: [u8; 8],
}

impl VirtioDevice for Dummy {
    type State = DummyState;
    fn device_type(&self) -> u32 {
        VIRTIO_ID_BALLOON
    }
    fn queue_max_sizes(&self) -> Vec<u16> {
        vec![16, 16, 8]
    }
    fn features(&self) -> u64 {
        0b101 | 1 << 40
    }
    fn ack_features(&mut self, features: u64) {
        self.acked = Some(features);
    }
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        for (i, b) in data.iter_mut().enumerate() {
            *b = self.config.get(offset as usize + i).copied().unwrap_or(0);
        }
    }
    fn write_config(&mut self, offset: u64, data: &[u8]) {
        for (i, b) in data.iter().enumerate() {
            if let Some(c) = self.config.get_mut(offset as usize + i) {
                *c = *b;
            }
        }
    }
    fn activate(
        &mut self,
        _mem: Arc<GuestMemoryMmap>,
        interrupt: Arc<dyn VirtioInterrupt>,
        queues: Vec<VirtioQueue>,
    ) -> Result<(), VirtioDeviceError> {
        if queues.is_empty() {
            return Err(VirtioDeviceError::MissingQueue("any"));
        }
        self.interrupt = Some(interrupt);
        self.queues = queues;
        Ok(())
    }
    fn reset(&mut self) {
        self.resets += 1;
        self.acked = None;
        self.interrupt = None;
        self.queues.clear();
    }
    fn state(&self) -> DummyState {
        DummyState {
            acked: self.acked,
            config: self.config,
        }
    }
    fn restore(&mut self, state: DummyState) -> Result<(), VirtioDeviceError> {
        self.acked = state.acked;
        self.config = state.config;
        Ok(())
    }
}

struct Fixture {
    pci: VirtioPciDevice<Dummy>,
    msi: Arc<MockMsi>,
    intx: Arc<MockIntx>,
    mem: Arc<GuestMemoryMmap>,
}

fn fixture() -> Fixture {
    let mem = guest_memory(0x10_0000);
    let msi = Arc::new(MockMsi::new(8));
    let intx = Arc::new(MockIntx::default());
    let mut pci = VirtioPciDevice::new(
        Dummy::default(),
        mem.clone(),
        msi.clone(),
        Some((intx.clone(), 11)),
    )
    .unwrap();
    pci.set_bar_address(0, BASE).unwrap();
    Fixture {
        pci,
        msi,
        intx,
        mem,
    }
}

fn w8(p: &mut VirtioPciDevice<Dummy>, off: u64, v: u8) {
    p.write_bar(0, off, &[v]);
}
fn w16(p: &mut VirtioPciDevice<Dummy>, off: u64, v: u16) {
    p.write_bar(0, off, &v.to_le_bytes());
}
fn w32(p: &mut VirtioPciDevice<Dummy>, off: u64, v: u32) {
    p.write_bar(0, off, &v.to_le_bytes());
}
fn r8(p: &mut VirtioPciDevice<Dummy>, off: u64) -> u8 {
    let mut b = [0u8; 1];
    p.read_bar(0, off, &mut b);
    b[0]
}
fn r16(p: &mut VirtioPciDevice<Dummy>, off: u64) -> u16 {
    let mut b = [0u8; 2];
    p.read_bar(0, off, &mut b);
    u16::from_le_bytes(b)
}
fn r32(p: &mut VirtioPciDevice<Dummy>, off: u64) -> u32 {
    let mut b = [0u8; 4];
    p.read_bar(0, off, &mut b);
    u32::from_le_bytes(b)
}

fn negotiate(p: &mut VirtioPciDevice<Dummy>, features: u64) -> u8 {
    w8(p, 0x14, DEVICE_ACKNOWLEDGE);
    w8(p, 0x14, DEVICE_ACKNOWLEDGE | DEVICE_DRIVER);
    w32(p, 0x08, 0);
    w32(p, 0x0C, features as u32);
    w32(p, 0x08, 1);
    w32(p, 0x0C, (features >> 32) as u32);
    w8(
        p,
        0x14,
        DEVICE_ACKNOWLEDGE | DEVICE_DRIVER | DEVICE_FEATURES_OK,
    );
    r8(p, 0x14)
}

fn setup_queue(p: &mut VirtioPciDevice<Dummy>, index: u16, tq: &TestQueue) {
    w16(p, 0x16, index);
    w16(p, 0x18, tq.size);
    w32(p, 0x20, tq.desc as u32);
    w32(p, 0x24, 0);
    p.write_bar(0, 0x28, &tq.avail.to_le_bytes());
    w32(p, 0x30, tq.used as u32);
    w32(p, 0x34, 0);
    w16(p, 0x1C, 1);
}

const OK: u8 = DEVICE_ACKNOWLEDGE | DEVICE_DRIVER | DEVICE_FEATURES_OK;
const V1: u64 = 1 << VIRTIO_F_VERSION_1;

fn start(f: &mut Fixture) -> TestQueue {
    assert_eq!(negotiate(&mut f.pci, V1 | 1), OK);
    let tq = TestQueue::new(&f.mem, 0x1000, 16);
    setup_queue(&mut f.pci, 0, &tq);
    w8(&mut f.pci, 0x14, OK | DEVICE_DRIVER_OK);
    assert!(f.pci.is_activated());
    tq
}

#[test]
fn identity_and_capabilities() {
    let mut f = fixture();
    let p = &mut f.pci;
    assert_eq!(p.read_config_register(0), 0x1045_1AF4);
    assert_eq!(p.read_config_register(2) & 0xFF, 1, "revision 1");
    assert_eq!(p.read_config_register(11), 0x1100_1AF4);
    assert_eq!(p.read_config_register(15) & 0xFFFF, 0x010B, "INTA, line 11");
    // BAR sizing.
    p.write_config_register(4, 0, &[0xFF; 4]);
    assert_eq!(p.read_config_register(4), 0xFFFF_8000);
    p.write_config_register(4, 0, &(BASE as u32).to_le_bytes());
    assert_eq!(p.bars()[0].addr, BASE);

    let mut ptr = p.read_config_register(13) as usize & 0xFF;
    let mut found = Vec::new();
    while ptr != 0 {
        let reg = p.read_config_register(ptr / 4);
        let id = reg as u8;
        let next = (reg >> 8) as u8 as usize;
        if id == PCI_CAP_ID_VENDOR {
            let cfg_type = (reg >> 24) as u8;
            let bar = p.read_config_register(ptr / 4 + 1) as u8;
            let offset = p.read_config_register(ptr / 4 + 2);
            let length = p.read_config_register(ptr / 4 + 3);
            found.push((cfg_type, bar, offset, length));
            if cfg_type == VIRTIO_PCI_CAP_NOTIFY_CFG {
                assert_eq!(p.read_config_register(ptr / 4 + 4), 4);
            }
        } else {
            assert_eq!(id, PCI_CAP_ID_MSIX);
            let table = p.read_config_register(ptr / 4 + 1);
            assert_eq!(table, 0x4000);
            assert_eq!((reg >> 16) & 0x7FF, 3, "config + 3 queue vectors");
        }
        ptr = next;
    }
    assert_eq!(
        found,
        vec![
            (1, 0, 0, 0x38),
            (2, 0, 0x3000, 0x1000),
            (3, 0, 0x1000, 1),
            (4, 0, 0x2000, 0x1000),
            (5, 0, 0, 0),
        ]
    );
}

#[test]
fn feature_negotiation_refuses_unoffered_bits() {
    let mut f = fixture();
    let p = &mut f.pci;
    w32(p, 0x00, 0);
    assert_eq!(r32(p, 0x04), 0b101);
    w32(p, 0x00, 1);
    assert_eq!(r32(p, 0x04), 1 | 1 << 8);
    w32(p, 0x00, 2);
    assert_eq!(r32(p, 0x04), 0);
    // Bit 1 was never offered.
    assert_eq!(negotiate(p, V1 | 0b10), DEVICE_ACKNOWLEDGE | DEVICE_DRIVER);
    assert_eq!(p.device().acked, None);
    w8(p, 0x14, 0);
    // Without VERSION_1 a modern device refuses too.
    assert_eq!(negotiate(p, 1), DEVICE_ACKNOWLEDGE | DEVICE_DRIVER);
    w8(p, 0x14, 0);
    assert_eq!(negotiate(p, V1 | 1 | 1 << 40), OK);
    assert_eq!(p.device().acked, Some(V1 | 1 | 1 << 40));
    // Features are frozen after FEATURES_OK.
    w32(p, 0x08, 0);
    w32(p, 0x0C, 0);
    assert_eq!(r32(p, 0x0C), 1);
    // Clearing status bits other than by reset is ignored.
    w8(p, 0x14, DEVICE_ACKNOWLEDGE);
    assert_eq!(r8(p, 0x14), OK);
}

#[test]
fn queue_configuration_activation_and_notify() {
    let mut f = fixture();
    assert_eq!(r16(&mut f.pci, 0x12), 3);
    let tq = start(&mut f);
    let p = &mut f.pci;
    w16(p, 0x16, 0);
    assert_eq!(r16(p, 0x18), 16);
    assert_eq!(r16(p, 0x1C), 1);
    assert_eq!(r16(p, 0x1E), 0);
    let mut q = [0u8; 8];
    p.read_bar(0, 0x28, &mut q);
    assert_eq!(u64::from_le_bytes(q), tq.avail);
    assert_eq!(p.device().queues.len(), 1);
    // Queue 2 was never enabled; queue_select beyond num_queues reads zero.
    w16(p, 0x16, 2);
    assert_eq!(r16(p, 0x1C), 0);
    w16(p, 0x16, 9);
    assert_eq!(r16(p, 0x18), 0);
    // Configuration after DRIVER_OK is ignored.
    w16(p, 0x16, 0);
    w16(p, 0x18, 4);
    assert_eq!(r16(p, 0x18), 16);

    let fds = p.ioeventfds();
    assert_eq!(fds.len(), 3);
    assert_eq!(fds[2].addr, BASE + 0x3000 + 8);
    // A notify that arrives as an MMIO exit signals the same event.
    w16(p, 0x3000 + 4, 1);
    assert_eq!(p.queue_events()[1].read().unwrap(), 1);
    w16(p, 0x3000 + 0xFFC, 1);
}

#[test]
fn invalid_queue_sets_needs_reset() {
    let mut f = fixture();
    let p = &mut f.pci;
    assert_eq!(negotiate(p, V1), OK);
    w16(p, 0x16, 0);
    w16(p, 0x18, 16);
    w32(p, 0x20, 0xFFF0_0000);
    w16(p, 0x1C, 1);
    assert_eq!(r16(p, 0x1C), 0);
    assert_ne!(r8(p, 0x14) & DEVICE_NEEDS_RESET, 0);
    // Misaligned and unknown-size writes are ignored.
    w32(p, 0x20, 0x1001);
    let mut b = [0u8; 4];
    p.read_bar(0, 0x20, &mut b);
    assert_eq!(u32::from_le_bytes(b), 0xFFF0_0000);
    w16(p, 0x18, 3);
    assert_eq!(r16(p, 0x18), 16);
    w8(p, 0x14, 0);
    assert_eq!(r8(p, 0x14), 0);
}

#[test]
fn driver_ok_without_queues_fails_activation() {
    let mut f = fixture();
    let p = &mut f.pci;
    assert_eq!(negotiate(p, V1), OK);
    w8(p, 0x14, OK | DEVICE_DRIVER_OK);
    assert!(!p.is_activated());
    assert_ne!(r8(p, 0x14) & DEVICE_NEEDS_RESET, 0);
}

#[test]
fn reset_clears_everything() {
    let mut f = fixture();
    start(&mut f);
    let p = &mut f.pci;
    w16(p, 0x10, 0);
    w8(p, 0x14, 0);
    assert!(!p.is_activated());
    assert_eq!(p.device().resets, 1);
    assert_eq!(r8(p, 0x14), 0);
    assert_eq!(r16(p, 0x10), VIRTIO_MSI_NO_VECTOR);
    w16(p, 0x16, 0);
    assert_eq!(r16(p, 0x1C), 0);
    assert_eq!(r32(p, 0x20), 0);
}

fn enable_msix(p: &mut VirtioPciDevice<Dummy>, ctl: u16) {
    // MSI-X capability is the first one, at 0x40; message control at 0x42.
    p.write_config_register(0x40 / 4, 2, &ctl.to_le_bytes());
}

fn program_vector(p: &mut VirtioPciDevice<Dummy>, v: u64, data: u32) {
    let at = MSIX_TABLE_OFFSET + v * 16;
    p.write_bar(0, at, &0xFEE0_0000u64.to_le_bytes());
    p.write_bar(0, at + 8, &data.to_le_bytes());
    p.write_bar(0, at + 12, &0u32.to_le_bytes());
}

#[test]
fn msix_vectors_masking_and_isr() {
    let mut f = fixture();
    start(&mut f);
    let p = &mut f.pci;
    let irq = p.device().interrupt.clone().unwrap();
    // Vector numbers beyond the table read back as NO_VECTOR.
    w16(p, 0x10, 9);
    assert_eq!(r16(p, 0x10), VIRTIO_MSI_NO_VECTOR);
    w16(p, 0x10, 0);
    w16(p, 0x16, 0);
    w16(p, 0x1A, 1);
    assert_eq!(r16(p, 0x1A), 1);

    enable_msix(p, MSIX_CTL_ENABLE);
    assert_eq!(p.read_config_register(0x40 / 4) >> 16, 0x8003);
    program_vector(p, 0, 0x30);
    assert_eq!(f.msi.route(0).unwrap().data, 0x30);
    // Vector 1 is still masked: pending.
    irq.trigger(VirtioInterruptType::Queue(0)).unwrap();
    assert!(f.msi.triggered().is_empty());
    assert_eq!(r32(p, MSIX_PBA_OFFSET), 0b10);
    program_vector(p, 1, 0x31);
    assert_eq!(f.msi.triggered(), vec![1]);
    irq.trigger(VirtioInterruptType::Config).unwrap();
    assert_eq!(f.msi.triggered(), vec![1, 0]);
    assert_eq!(r8(p, 0x15), 1, "config generation moved");
    // Function mask.
    enable_msix(p, MSIX_CTL_ENABLE | MSIX_CTL_FUNCTION_MASK);
    irq.trigger(VirtioInterruptType::Config).unwrap();
    assert_eq!(f.msi.triggered().len(), 2);
    enable_msix(p, MSIX_CTL_ENABLE);
    assert_eq!(f.msi.triggered(), vec![1, 0, 0]);
    // ISR: both bits set, read clears.
    assert_eq!(r8(p, 0x1000), VIRTIO_PCI_ISR_QUEUE | VIRTIO_PCI_ISR_CONFIG);
    assert_eq!(r8(p, 0x1000), 0);
    assert_eq!(*f.intx.count.lock().unwrap(), 0);
    // Unknown queue.
    assert!(irq.trigger(VirtioInterruptType::Queue(7)).is_err());
}

#[test]
fn intx_fallback_when_msix_disabled() {
    let mut f = fixture();
    start(&mut f);
    let p = &mut f.pci;
    let irq = p.device().interrupt.clone().unwrap();
    irq.trigger(VirtioInterruptType::Queue(0)).unwrap();
    assert_eq!(*f.intx.count.lock().unwrap(), 1);
    assert_ne!(
        p.read_config_register(1) & (1 << 19),
        0,
        "status interrupt bit"
    );
    assert_eq!(r8(p, 0x1000), VIRTIO_PCI_ISR_QUEUE);
    assert_eq!(p.read_config_register(1) & (1 << 19), 0);
    irq.signal_needs_reset();
    assert_ne!(r8(p, 0x14) & DEVICE_NEEDS_RESET, 0);
    assert_eq!(r8(p, 0x1000), VIRTIO_PCI_ISR_CONFIG);
}

#[test]
fn device_config_and_pci_cfg_capability() {
    let mut f = fixture();
    let p = &mut f.pci;
    p.write_bar(0, DEVICE_CFG_OFFSET + 2, &[7, 8]);
    assert_eq!(r32(p, DEVICE_CFG_OFFSET), 0x0807_0000);
    // PCI configuration access capability at 0x40 + 12 + 16 + 20 + 16 + 16 = 0x90.
    let cap = 0x90usize;
    assert_eq!(
        p.read_config_register(cap / 4) >> 24,
        u32::from(VIRTIO_PCI_CAP_PCI_CFG)
    );
    p.write_config_register(cap / 4 + 2, 0, &0x12u32.to_le_bytes()); // num_queues
    p.write_config_register(cap / 4 + 3, 0, &2u32.to_le_bytes());
    assert_eq!(p.read_config_register(cap / 4 + 4) & 0xFFFF, 3);
    // Write device config through the window.
    p.write_config_register(cap / 4 + 2, 0, &0x2000u32.to_le_bytes());
    p.write_config_register(cap / 4 + 3, 0, &1u32.to_le_bytes());
    p.write_config_register(cap / 4 + 4, 0, &[0x5A]);
    assert_eq!(r8(p, DEVICE_CFG_OFFSET), 0x5A);
}

#[test]
fn state_round_trip() {
    let mut f = fixture();
    let mut tq = start(&mut f);
    enable_msix(&mut f.pci, MSIX_CTL_ENABLE);
    program_vector(&mut f.pci, 1, 0x44);
    w16(&mut f.pci, 0x16, 0);
    w16(&mut f.pci, 0x1A, 1);
    // Move the queue a little.
    f.mem.write_obj(0u64, GuestAddress(0x8000)).unwrap();
    tq.add_chain(&[(0x8000, 8, false)]);
    {
        let q = &f.pci.device().queues[0];
        let mut q = q.queue.lock().unwrap();
        use virtio_queue::QueueT;
        let chain = q.pop_descriptor_chain(f.mem.as_ref()).unwrap();
        q.add_used(f.mem.as_ref(), chain.head_index(), 0).unwrap();
    }
    let state = f.pci.state();
    let json = serde_json::to_string(&state).unwrap();
    let state: VirtioPciState<DummyState> = serde_json::from_str(&json).unwrap();

    let msi = Arc::new(MockMsi::new(8));
    let intx = || {
        Some((
            Arc::new(MockIntx::default()) as Arc<dyn crate::IntxLine>,
            11,
        ))
    };
    // A destination built differently (no INTx pin) is refused.
    let mut other =
        VirtioPciDevice::new(Dummy::default(), f.mem.clone(), msi.clone(), None).unwrap();
    assert!(other.restore(state.clone()).is_err());
    let mut dst =
        VirtioPciDevice::new(Dummy::default(), f.mem.clone(), msi.clone(), intx()).unwrap();
    dst.restore(state.clone()).unwrap();
    assert!(dst.is_activated());
    assert_eq!(dst.device().queues.len(), 1);
    assert_eq!(msi.route(1).unwrap().data, 0x44);
    let again = dst.state();
    assert_eq!(again.queues, state.queues);
    assert_eq!(again.queues[0].next_avail, 1);
    assert_eq!(again.config_registers, state.config_registers);
    assert_eq!(again.msix, state.msix);
    assert_eq!(again.common, state.common);
    assert_eq!(again.device, state.device);
    assert_eq!(dst.bar_address(), BASE);

    // Restoring twice, or a state of another shape, is refused.
    assert!(dst.restore(state.clone()).is_err());
    let mut bad = state.clone();
    bad.queues.pop();
    let mut fresh =
        VirtioPciDevice::new(Dummy::default(), f.mem.clone(), msi.clone(), intx()).unwrap();
    assert!(fresh.restore(bad).is_err());
    let mut bad = state.clone();
    bad.common.driver_features |= 1 << 3;
    assert!(fresh.restore(bad).is_err());
    let mut bad = state.clone();
    bad.config_registers[0] = 0;
    assert!(fresh.restore(bad).is_err());
    let mut bad = state;
    bad.queues[0].desc_table = 0xFFFF_0000;
    assert!(fresh.restore(bad).is_err());
    assert!(!fresh.is_activated());
}

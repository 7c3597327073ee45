//! The virtio-pci transport, the PCI bus it sits on, and the virtio-balloon device with free page
//! hinting for live migration.
//!
//! ```text
//!   vCPU exits ──► PciConfigIo (0xCF8/0xCFC) ──► PciBus ──► PciDevice::{read,write}_config_register
//!   vCPU exits ──► PciBus::mmio_{read,write} ──► PciDevice::{read,write}_bar
//!                                                  │
//!                                   VirtioPciDevice<D: VirtioDevice>
//!                                   (common cfg, ISR, notify, device cfg, MSI-X)
//!                                                  │ activate(mem, interrupt, queues)
//!                                               Balloon ──► BalloonWorker thread (epoll)
//!                                                  ▲
//!                   VMM threads ── BalloonHandle ──┘ (resize, hint rounds, counters)
//! ```
//!
//! Guest memory is only ever touched through vm-memory's `Bytes` API (so the dirty bitmap sees
//! every VMM write), except for the documented `madvise`/`fallocate` release of balloon pages.
//!
//! # Wiring it into a VMM
//!
//! ```
//! use std::sync::{Arc, Mutex};
//! use virtio_devices::*;
//! use vm_memory::GuestAddress;
//!
//! // The VMM's MSI vectors: irqfds + KVM GSI routing (a stub here).
//! struct Vectors;
//! impl MsiVectors for Vectors {
//!     fn len(&self) -> usize { 8 }
//!     fn set_route(&self, _v: u16, _msg: Option<MsiMessage>) -> Result<(), InterruptError> { Ok(()) }
//!     fn trigger(&self, _v: u16) -> Result<(), InterruptError> { Ok(()) }
//! }
//!
//! let mem = Arc::new(GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 64 << 20)]).unwrap());
//! let bus = Arc::new(PciBus::new()); // host bridge at 00:00.0
//! let mut bars = BarAllocator::default(); // 0xC000_0000..0xE000_0000
//!
//! let balloon = Balloon::new(&BalloonConfig { free_page_hinting: true, ..Default::default() })?;
//! let handle: BalloonHandle = balloon.handle();
//! let dev = Arc::new(Mutex::new(VirtioPciDevice::new(balloon, mem.clone(), Arc::new(Vectors), None)?));
//! let slot = bus.add_device(dev.clone(), &mut bars)?;
//! for ev in dev.lock().unwrap().ioeventfds() {
//!     // vm.register_ioevent(&*ev.event, &IoEventAddress::Mmio(ev.addr), NoDatamatch)
//!     let _ = (ev.addr, ev.event);
//! }
//! let conf1 = PciConfigIo::new(bus.clone());
//! // Port exits in 0xCF8..0xD00:  conf1.read(port - 0xCF8, data) / conf1.write(port - 0xCF8, data)
//! // MMIO exits:                   bus.mmio_read(addr, data) / bus.mmio_write(addr, data)
//! conf1.write(0, &(0x8000_0000u32 | u32::from(slot) << 11).to_le_bytes());
//! let mut id = [0u8; 4];
//! conf1.read(4, &mut id);
//! assert_eq!(u32::from_le_bytes(id), 0x1045_1AF4);
//!
//! // From the API / migration threads:
//! handle.resize(16 << 20)?;
//! assert!(handle.start_hint_round().is_err()); // no driver yet
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

#![deny(missing_docs)]
#![deny(clippy::undocumented_unsafe_blocks)]

pub mod balloon;
pub mod interrupt;
pub mod pci;
mod sync;
pub mod transport;
pub mod virtio;
pub mod write_bitmap;

#[cfg(any(test, feature = "fuzzing"))]
pub mod test_utils;

/// The guest memory type used by the whole VMM: mmap-backed regions with a dirty bitmap that
/// records the VMM's own writes for migration ([`WriteBitmap`]).
pub type GuestMemoryMmap = vm_memory::GuestMemoryMmap<WriteBitmap>;

pub use balloon::{
    Balloon, BalloonConfig, BalloonCounters, BalloonError, BalloonHandle, BalloonState,
    BalloonStats, HintMode, HintRange, HintRound, HintState, HintStatus, WorkerStartHook,
};
pub use interrupt::{
    InterruptError, IntxLine, MsiMessage, MsiVectors, VirtioInterrupt, VirtioInterruptType,
};
pub use pci::{
    BarAllocator, BarReprogram, PciBarInfo, PciBarKind, PciBus, PciConfigIo, PciConfiguration,
    PciDevice, PciError, PciHostBridge, PciIoEvent, SharedPciDevice, MMIO32_WINDOW_SIZE,
    MMIO32_WINDOW_START, PCI_CONFIG_IO_PORT, PCI_CONFIG_IO_PORT_SIZE,
};
pub use transport::{VirtioPciDevice, VirtioPciError, VirtioPciState};
pub use virtio::{VirtioDevice, VirtioDeviceError, VirtioQueue};
pub use write_bitmap::WriteBitmap;

//! The transport's [`VirtioInterrupt`]: ISR bits, MSI-X vectors and the INTx fallback.

use std::sync::atomic::{AtomicBool, AtomicU16, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};

use super::{VIRTIO_MSI_NO_VECTOR, VIRTIO_PCI_ISR_CONFIG, VIRTIO_PCI_ISR_QUEUE};
use crate::interrupt::{InterruptError, IntxLine, VirtioInterrupt, VirtioInterruptType};
use crate::pci::{MsixConfig, MsixTrigger};
use crate::sync::lock;

/// Interrupt state shared between the transport (register accesses on vCPU threads) and the
/// device's worker (raising interrupts).
pub(crate) struct PciInterrupt {
    pub(crate) msix: Arc<Mutex<MsixConfig>>,
    pub(crate) intx: Option<Arc<dyn IntxLine>>,
    pub(crate) isr: AtomicU8,
    pub(crate) config_vector: AtomicU16,
    pub(crate) queue_vectors: Vec<AtomicU16>,
    pub(crate) config_generation: AtomicU8,
    pub(crate) needs_reset: AtomicBool,
}

impl PciInterrupt {
    pub(crate) fn new(
        msix: Arc<Mutex<MsixConfig>>,
        intx: Option<Arc<dyn IntxLine>>,
        num_queues: usize,
    ) -> Self {
        PciInterrupt {
            msix,
            intx,
            isr: AtomicU8::new(0),
            config_vector: AtomicU16::new(VIRTIO_MSI_NO_VECTOR),
            queue_vectors: (0..num_queues)
                .map(|_| AtomicU16::new(VIRTIO_MSI_NO_VECTOR))
                .collect(),
            config_generation: AtomicU8::new(0),
            needs_reset: AtomicBool::new(false),
        }
    }

    /// Forget the driver's vector assignments and pending status (device reset).
    pub(crate) fn reset(&self) {
        self.isr.store(0, Ordering::SeqCst);
        self.config_vector
            .store(VIRTIO_MSI_NO_VECTOR, Ordering::SeqCst);
        for v in &self.queue_vectors {
            v.store(VIRTIO_MSI_NO_VECTOR, Ordering::SeqCst);
        }
        self.needs_reset.store(false, Ordering::SeqCst);
    }

    fn intx(&self) -> Result<(), InterruptError> {
        match &self.intx {
            Some(line) => line.trigger(),
            None => Ok(()),
        }
    }
}

impl VirtioInterrupt for PciInterrupt {
    fn trigger(&self, int_type: VirtioInterruptType) -> Result<(), InterruptError> {
        let (bit, vector) = match int_type {
            VirtioInterruptType::Config => {
                self.config_generation.fetch_add(1, Ordering::SeqCst);
                (
                    VIRTIO_PCI_ISR_CONFIG,
                    self.config_vector.load(Ordering::SeqCst),
                )
            }
            VirtioInterruptType::Queue(q) => {
                let v = self
                    .queue_vectors
                    .get(usize::from(q))
                    .ok_or(InterruptError::InvalidQueue(q))?;
                (VIRTIO_PCI_ISR_QUEUE, v.load(Ordering::SeqCst))
            }
        };
        // The ISR bit is set in every mode so that a polling driver sees it too.
        self.isr.fetch_or(bit, Ordering::SeqCst);
        let mut msix = lock(&self.msix);
        if !msix.enabled() {
            drop(msix);
            return self.intx();
        }
        if vector == VIRTIO_MSI_NO_VECTOR {
            return Ok(());
        }
        match msix.trigger(vector)? {
            MsixTrigger::Delivered | MsixTrigger::Pending => Ok(()),
            MsixTrigger::Disabled => {
                drop(msix);
                self.intx()
            }
        }
    }

    fn signal_needs_reset(&self) {
        self.needs_reset.store(true, Ordering::SeqCst);
        if let Err(e) = self.trigger(VirtioInterruptType::Config) {
            log::warn!("virtio-pci: failed to signal DEVICE_NEEDS_RESET: {e}");
        }
    }
}

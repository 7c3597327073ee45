//! A balloon whose queues are processed on the caller's thread instead of a worker thread, so
//! a fuzzer can drive the queue handling through real virtqueues in guest memory and see every
//! effect at once. Built with the `fuzzing` feature only.

use std::sync::Arc;

use super::worker::BalloonWorker;
use super::{Balloon, BalloonHandle};
use crate::interrupt::VirtioInterrupt;
use crate::virtio::{VirtioDeviceError, VirtioQueue};
use crate::GuestMemoryMmap;

/// A balloon activated without its worker thread.
pub struct BalloonQueueDriver {
    balloon: Balloon,
    worker: BalloonWorker,
}

impl std::fmt::Debug for BalloonQueueDriver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BalloonQueueDriver")
            .field("balloon", &self.balloon)
            .finish_non_exhaustive()
    }
}

impl BalloonQueueDriver {
    /// Activates `balloon` (whose features the driver has acked) with `queues`, as
    /// [`crate::VirtioDevice::activate`] does, but keeps the worker on this thread.
    pub fn activate(
        mut balloon: Balloon,
        mem: Arc<GuestMemoryMmap>,
        interrupt: Arc<dyn VirtioInterrupt>,
        queues: Vec<VirtioQueue>,
    ) -> Result<Self, VirtioDeviceError> {
        let worker = balloon.prepare_worker(mem, interrupt, queues)?;
        Ok(BalloonQueueDriver { balloon, worker })
    }

    /// The device (for its config space).
    pub fn balloon(&mut self) -> &mut Balloon {
        &mut self.balloon
    }

    /// A handle, as the VMM's other threads hold.
    pub fn handle(&self) -> BalloonHandle {
        self.balloon.handle()
    }

    /// Processes the `i`-th of the activated queues, as its notification would.
    pub fn notify(&mut self, i: usize) {
        self.worker.notify_queue(i);
    }

    /// Processes every queue (and a pending statistics request).
    pub fn process_all(&mut self) {
        self.worker.process_all();
    }
}

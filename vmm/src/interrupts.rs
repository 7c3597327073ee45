//! The VM's GSI routing table: legacy lines wired to the PIC and IOAPIC, and MSI vectors that
//! devices allocate and reprogram.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use hypervisor::{IrqRoute, Vm, VmError};
use virtio_devices::{InterruptError, IntxLine, MsiMessage, MsiVectors};
use vmm_sys_util::eventfd::EventFd;

/// GSIs below this are legacy interrupt lines (24 IOAPIC pins).
pub const NUM_LEGACY_GSIS: u32 = 24;
const PIC_MASTER: u32 = 0;
const PIC_SLAVE: u32 = 1;
const IOAPIC: u32 = 2;

/// The routing table, shared by every device that owns MSI vectors.
pub struct InterruptManager {
    vm: Arc<dyn Vm>,
    inner: Mutex<Routes>,
}

struct Routes {
    msi: BTreeMap<u32, IrqRoute>,
    next_gsi: u32,
}

impl InterruptManager {
    /// A manager with the legacy routes installed: GSI 0-15 to both PICs and the IOAPIC, 16-23
    /// to the IOAPIC only (the layout KVM uses by default).
    pub fn new(vm: Arc<dyn Vm>) -> Result<Self, VmError> {
        let m = InterruptManager {
            vm,
            inner: Mutex::new(Routes {
                msi: BTreeMap::new(),
                next_gsi: NUM_LEGACY_GSIS,
            }),
        };
        m.install(&m.lock())?;
        Ok(m)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Routes> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn legacy_routes() -> Vec<IrqRoute> {
        let mut routes = Vec::new();
        for gsi in 0..NUM_LEGACY_GSIS {
            if gsi < 16 {
                let chip = if gsi < 8 { PIC_MASTER } else { PIC_SLAVE };
                routes.push(IrqRoute::Irqchip {
                    gsi,
                    chip,
                    pin: gsi % 8,
                });
            }
            routes.push(IrqRoute::Irqchip {
                gsi,
                chip: IOAPIC,
                pin: gsi,
            });
        }
        routes
    }

    fn install(&self, routes: &Routes) -> Result<(), VmError> {
        let mut all = Self::legacy_routes();
        all.extend(routes.msi.values().copied());
        self.vm.set_gsi_routing(&all)
    }

    /// Reserves `count` consecutive GSIs for MSI vectors; returns the first.
    pub fn allocate_gsis(&self, count: u32) -> Option<u32> {
        let mut r = self.lock();
        let first = r.next_gsi;
        r.next_gsi = first.checked_add(count)?;
        Some(first)
    }

    /// Points `gsi` at an MSI message, or removes its route (`None`: a masked or unused vector).
    pub fn set_msi_route(&self, gsi: u32, msg: Option<(u64, u32)>) -> Result<(), VmError> {
        let mut r = self.lock();
        let changed = match msg {
            Some((address, data)) => {
                let route = IrqRoute::Msi { gsi, address, data };
                r.msi.insert(gsi, route) != Some(route)
            }
            None => r.msi.remove(&gsi).is_some(),
        };
        if changed {
            self.install(&r)?;
        }
        Ok(())
    }

    /// The VM the routes belong to.
    pub fn vm(&self) -> &Arc<dyn Vm> {
        &self.vm
    }
}

/// A device's MSI vectors: consecutive GSIs, each with an irqfd, routed as the guest programs
/// the device's MSI-X table.
pub struct MsiVectorGroup {
    manager: Arc<InterruptManager>,
    base_gsi: u32,
    irqfds: Vec<EventFd>,
}

impl MsiVectorGroup {
    /// Allocates `count` vectors.
    pub fn new(manager: Arc<InterruptManager>, count: u32) -> Result<Self, VmError> {
        let base_gsi = manager
            .allocate_gsis(count)
            .ok_or_else(|| VmError::GsiRouting(std::io::Error::from_raw_os_error(libc::ENOSPC)))?;
        let mut irqfds = Vec::new();
        for i in 0..count {
            let fd = EventFd::new(libc::EFD_NONBLOCK).map_err(|e| VmError::Irqfd {
                gsi: base_gsi + i,
                source: e,
            })?;
            manager.vm().register_irqfd(&fd, base_gsi + i)?;
            irqfds.push(fd);
        }
        Ok(MsiVectorGroup {
            manager,
            base_gsi,
            irqfds,
        })
    }
}

fn vector_error(vector: u16) -> InterruptError {
    InterruptError::InvalidVector(vector)
}

impl MsiVectors for MsiVectorGroup {
    fn len(&self) -> usize {
        self.irqfds.len()
    }

    fn set_route(&self, vector: u16, msg: Option<MsiMessage>) -> Result<(), InterruptError> {
        if usize::from(vector) >= self.irqfds.len() {
            return Err(vector_error(vector));
        }
        self.manager
            .set_msi_route(
                self.base_gsi + u32::from(vector),
                msg.map(|m| (m.address, m.data)),
            )
            .map_err(|e| InterruptError::Route {
                vector,
                source: std::io::Error::other(crate::api::error_chain(&e)),
            })
    }

    fn trigger(&self, vector: u16) -> Result<(), InterruptError> {
        let fd = self
            .irqfds
            .get(usize::from(vector))
            .ok_or_else(|| vector_error(vector))?;
        fd.write(1).map_err(InterruptError::Signal)
    }
}

/// A legacy interrupt line raised through an irqfd.
pub struct IrqfdLine(pub EventFd);

impl IrqfdLine {
    /// An irqfd on `gsi`.
    pub fn new(vm: &dyn Vm, gsi: u32) -> Result<Self, VmError> {
        let fd = EventFd::new(libc::EFD_NONBLOCK).map_err(|e| VmError::Irqfd { gsi, source: e })?;
        vm.register_irqfd(&fd, gsi)?;
        Ok(IrqfdLine(fd))
    }
}

impl IntxLine for IrqfdLine {
    fn trigger(&self) -> Result<(), InterruptError> {
        self.0.write(1).map_err(InterruptError::Signal)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn legacy_table_shape() {
        let r = InterruptManager::legacy_routes();
        assert_eq!(r.len(), 16 * 2 + 8);
        assert!(r.contains(&IrqRoute::Irqchip {
            gsi: 4,
            chip: IOAPIC,
            pin: 4
        }));
        assert!(r.contains(&IrqRoute::Irqchip {
            gsi: 12,
            chip: PIC_SLAVE,
            pin: 4
        }));
        assert!(!r.iter().any(|e| matches!(
            e,
            IrqRoute::Irqchip {
                gsi: 20,
                chip: PIC_MASTER | PIC_SLAVE,
                ..
            }
        )));
    }
}

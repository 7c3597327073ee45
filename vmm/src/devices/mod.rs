//! The VM's devices: legacy PC ports, the serial port, and the buses that route guest accesses
//! to them.

pub mod acpi_power;
pub mod balloon;
pub mod bus;
pub mod console_input;
pub mod legacy;
pub mod pci;
pub mod serial;

use std::sync::{Arc, Mutex};

use hypervisor::Vm;
use thiserror::Error;
use vmm_sys_util::eventfd::EventFd;

use self::acpi_power::{AcpiPowerRegisters, ACPI_POWER_BASE, ACPI_POWER_LEN};
use self::balloon::BalloonDevice;
use self::bus::{Bus, BusError};
use self::legacy::{Cmos, LegacyEvents, Sink, I8042};
use self::pci::{PciSegment, PciSetupError};
use self::serial::{SerialDevice, COM1_BASE, COM1_IRQ, COM1_LEN};
use crate::config::VmConfig;
use crate::interrupts::InterruptManager;
use crate::memory::GuestMemoryMmap;
use crate::seccomp::SeccompMode;

/// Errors from creating devices.
#[derive(Debug, Error)]
pub enum DeviceError {
    /// Two devices claim the same addresses.
    #[error("device address conflict")]
    Bus(#[source] BusError),
    /// An eventfd could not be created.
    #[error("cannot create an eventfd")]
    EventFd(#[source] std::io::Error),
    /// The serial output could not be opened.
    #[error("cannot open the serial output")]
    SerialOutput(#[source] std::io::Error),
    /// Wiring an interrupt failed.
    #[error("cannot wire a device interrupt")]
    Irq(#[source] hypervisor::VmError),
    /// A PCI device could not be added.
    #[error("cannot set up a PCI device")]
    Pci(#[source] PciSetupError),
    /// The balloon could not be created.
    #[error("cannot create the virtio-balloon")]
    Balloon(#[source] Box<dyn std::error::Error + Send + Sync>),
}

/// The VM's devices and the buses the vCPUs dispatch to.
pub struct DeviceManager {
    /// Port I/O bus.
    pub pio: Arc<Bus>,
    /// MMIO bus.
    pub mmio: Arc<Bus>,
    /// PCI bus 0.
    pub pci: Arc<PciSegment>,
    /// The virtio-balloon, if configured.
    pub balloon: Option<BalloonDevice>,
    serial_irq: Option<EventFd>,
    _stdin: Option<console_input::StdinForwarder>,
}

impl DeviceManager {
    /// Whether the VM has a serial port at COM1.
    pub fn has_com1(&self) -> bool {
        self.serial_irq.is_some()
    }

    /// Creates the legacy devices and the serial port as `config` asks. `on_event` is called when
    /// the guest pulses the i8042 reset line or uses the ACPI power-off or reset register. The
    /// balloon's worker runs under a seccomp filter as `seccomp` says.
    pub fn new(
        vm: &Arc<dyn Vm>,
        interrupts: &Arc<InterruptManager>,
        memory: &Arc<GuestMemoryMmap>,
        config: &VmConfig,
        on_event: LegacyEvents,
        seccomp: SeccompMode,
    ) -> Result<Self, DeviceError> {
        let pio = Arc::new(Bus::new());
        let mmio = Arc::new(Bus::new());
        pio.insert(
            Arc::new(Mutex::new(I8042::new(on_event.clone()))),
            legacy::I8042_BASE,
            legacy::I8042_LEN,
        )
        .map_err(DeviceError::Bus)?;
        pio.insert(
            Arc::new(Mutex::new(AcpiPowerRegisters::new(on_event))),
            ACPI_POWER_BASE,
            ACPI_POWER_LEN,
        )
        .map_err(DeviceError::Bus)?;
        pio.insert(
            Arc::new(Mutex::new(Cmos::default())),
            legacy::CMOS_BASE,
            legacy::CMOS_LEN,
        )
        .map_err(DeviceError::Bus)?;
        pio.insert(Arc::new(Mutex::new(Sink)), 0x80, 1)
            .map_err(DeviceError::Bus)?;

        let mut stdin = None;
        let serial_irq =
            match serial::output_for(&config.serial).map_err(DeviceError::SerialOutput)? {
                Some(out) => {
                    let irq = EventFd::new(libc::EFD_NONBLOCK).map_err(DeviceError::EventFd)?;
                    vm.register_irqfd(&irq, COM1_IRQ)
                        .map_err(DeviceError::Irq)?;
                    let trigger = irq.try_clone().map_err(DeviceError::EventFd)?;
                    let interactive = config.serial.mode == crate::config::ConsoleOutputMode::Tty;
                    let device = Arc::new(Mutex::new(SerialDevice::new(trigger, out, interactive)));
                    pio.insert(device.clone(), COM1_BASE, COM1_LEN)
                        .map_err(DeviceError::Bus)?;
                    if config.serial.mode == crate::config::ConsoleOutputMode::Tty {
                        stdin = Some(
                            console_input::StdinForwarder::start(device)
                                .map_err(DeviceError::SerialOutput)?,
                        );
                    }
                    Some(irq)
                }
                None => None,
            };
        let pci = Arc::new(PciSegment::new(vm.clone()));
        pio.insert(
            Arc::new(Mutex::new(pci.config_io())),
            u64::from(virtio_devices::PCI_CONFIG_IO_PORT),
            u64::from(virtio_devices::PCI_CONFIG_IO_PORT_SIZE),
        )
        .map_err(DeviceError::Bus)?;
        mmio.insert(
            Arc::new(Mutex::new(pci.mmio_window())),
            virtio_devices::MMIO32_WINDOW_START,
            virtio_devices::MMIO32_WINDOW_SIZE,
        )
        .map_err(DeviceError::Bus)?;
        let balloon = match &config.balloon {
            Some(b) => Some(BalloonDevice::new(
                vm, interrupts, memory, &pci, b, seccomp,
            )?),
            None => None,
        };
        Ok(DeviceManager {
            pio,
            mmio,
            pci,
            balloon,
            serial_irq,
            _stdin: stdin,
        })
    }
}

//! The model back end: an in-process device model behind the same [`PciOps`] interface a VFIO
//! function has.
//!
//! A model sees the outside world only through the [`ModelBus`] it gets at [`open`]: DMA through
//! the domain's IOVA view (an access outside every mapping is an IOMMU fault it must record with
//! [`DmaDomain::record_fault`] and not perform), and interrupts by signalling the eventfd the
//! driver wired to an MSI-X vector ([`Irq::signal`]). Config space and BAR accesses arrive through
//! [`DeviceModel`]'s methods from whatever thread the driver runs on; models synchronise their own
//! state.

use std::os::fd::{AsFd, OwnedFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use super::{DmaDomain, Mmio, NotifyArea, PciDevice, PciError, PciOps};

/// What a device model implements: a PCI function seen from the bus.
pub trait DeviceModel: Send + Sync + std::fmt::Debug {
    /// Model name (`sim0`, `ifc0-vf1`, ...).
    fn name(&self) -> &str;
    /// Configuration space size (256 for conventional, 4096 for extended).
    fn config_size(&self) -> u16 {
        256
    }
    /// Reads configuration space (offset and width already checked against `config_size`).
    fn config_read(&self, offset: u16, buf: &mut [u8]);
    /// Writes configuration space.
    fn config_write(&self, offset: u16, buf: &[u8]);
    /// Size of BAR `bar` (0: absent).
    fn bar_len(&self, bar: u8) -> u64;
    /// Reads a register (width 1, 2, 4 or 8, aligned, inside the BAR: checked by the caller).
    fn bar_read(&self, bar: u8, offset: u64, buf: &mut [u8]);
    /// Writes a register.
    fn bar_write(&self, bar: u8, offset: u64, buf: &[u8]);
    /// MSI-X vectors the function has.
    fn msix_vectors(&self) -> u16;
    /// Function-level reset: back to the power-on state (DMA and interrupts stop).
    fn reset(&self);
    /// Connects the model to its bus (DMA domain, interrupt lines). Called once, at open.
    fn attach(&self, bus: ModelBus);
    /// A page another process can map to ring the doorbell at `offset` of BAR `bar` (a model
    /// that polls a shared page for doorbells can offer one).
    fn notify_area(&self, _bar: u8, _offset: u64, _len: u64) -> Option<NotifyArea> {
        None
    }
    /// A raw mapping of a BAR, for models whose registers are plain shared memory.
    fn bar_mapping(&self, _bar: u8) -> Option<Arc<Mmio>> {
        None
    }
}

#[derive(Debug, Default)]
struct IrqTable {
    fds: Vec<Option<Arc<OwnedFd>>>,
}

#[derive(Debug)]
struct IrqInner {
    table: Mutex<Arc<IrqTable>>,
    generation: AtomicU64,
    raised: Vec<AtomicU64>,
    dropped: AtomicU64,
}

/// A model's MSI-X lines: vector `i` signals the eventfd the driver wired to it.
#[derive(Debug, Clone)]
pub struct Irq {
    inner: Arc<IrqInner>,
}

impl Irq {
    fn new(vectors: u16) -> Irq {
        Irq {
            inner: Arc::new(IrqInner {
                table: Mutex::new(Arc::new(IrqTable::default())),
                generation: AtomicU64::new(0),
                raised: (0..vectors).map(|_| AtomicU64::new(0)).collect(),
                dropped: AtomicU64::new(0),
            }),
        }
    }

    fn set(&self, fds: &[Option<Arc<OwnedFd>>]) {
        let t = Arc::new(IrqTable { fds: fds.to_vec() });
        *self.inner.table.lock().unwrap_or_else(|p| p.into_inner()) = t;
        self.inner.generation.fetch_add(1, Ordering::Release);
    }

    /// A per-thread sender that caches the vector table (re-read only when the driver rewires).
    pub fn sender(&self) -> IrqSender {
        IrqSender {
            irq: self.clone(),
            generation: u64::MAX,
            table: Arc::new(IrqTable::default()),
        }
    }

    /// Raises vector `v` (slow path: reads the table under its lock). Returns whether an
    /// eventfd was signalled; a vector with nothing wired counts as dropped.
    pub fn signal(&self, v: u16) -> bool {
        self.sender().signal(v)
    }

    /// Interrupts raised on vector `v` so far (signalled or dropped).
    pub fn raised(&self, v: u16) -> u64 {
        self.inner
            .raised
            .get(v as usize)
            .map_or(0, |c| c.load(Ordering::Relaxed))
    }

    /// Interrupts raised on vectors with no eventfd wired.
    pub fn dropped(&self) -> u64 {
        self.inner.dropped.load(Ordering::Relaxed)
    }

    /// Whether vector `v` is wired to an eventfd.
    pub fn is_wired(&self, v: u16) -> bool {
        let t = self.inner.table.lock().unwrap_or_else(|p| p.into_inner());
        t.fds.get(v as usize).is_some_and(|f| f.is_some())
    }
}

/// A cached view of a model's interrupt table for its engine thread.
#[derive(Debug)]
pub struct IrqSender {
    irq: Irq,
    generation: u64,
    table: Arc<IrqTable>,
}

impl IrqSender {
    /// Raises vector `v`; returns whether an eventfd was signalled.
    pub fn signal(&mut self, v: u16) -> bool {
        let g = self.irq.inner.generation.load(Ordering::Acquire);
        if g != self.generation {
            self.table = Arc::clone(
                &self
                    .irq
                    .inner
                    .table
                    .lock()
                    .unwrap_or_else(|p| p.into_inner()),
            );
            self.generation = g;
        }
        if let Some(c) = self.irq.inner.raised.get(v as usize) {
            c.fetch_add(1, Ordering::Relaxed);
        }
        match self.table.fds.get(v as usize) {
            Some(Some(fd)) => {
                // An eventfd write only fails when the counter would overflow, which means the
                // reader is long gone; the interrupt is then as good as delivered.
                let _ = nix::unistd::write(fd.as_fd(), &1u64.to_ne_bytes());
                true
            }
            _ => {
                self.irq.inner.dropped.fetch_add(1, Ordering::Relaxed);
                false
            }
        }
    }
}

/// What a model is connected to.
#[derive(Debug, Clone)]
pub struct ModelBus {
    /// The DMA domain (IOMMU) the device was opened in.
    pub dma: DmaDomain,
    /// The MSI-X lines.
    pub irq: Irq,
}

/// The [`PciOps`] of a model.
#[derive(Debug)]
pub struct ModelPci {
    name: String,
    model: Arc<dyn DeviceModel>,
    bus: ModelBus,
}

impl ModelPci {
    /// The model behind this function.
    pub fn model(&self) -> &Arc<dyn DeviceModel> {
        &self.model
    }

    /// The bus (interrupt counters, domain).
    pub fn bus(&self) -> &ModelBus {
        &self.bus
    }
}

/// Opens a model as a PCI function in `domain` (which must be a model domain).
pub fn open(model: Arc<dyn DeviceModel>, domain: &DmaDomain) -> Result<PciDevice, PciError> {
    let name = format!("model:{}", model.name());
    if domain.kind() != "model" {
        return Err(PciError::DomainKind {
            dev: name,
            dev_kind: "model",
            domain_kind: domain.kind(),
        });
    }
    let bus = ModelBus {
        dma: domain.clone(),
        irq: Irq::new(model.msix_vectors()),
    };
    model.attach(bus.clone());
    Ok(PciDevice::from_ops(Arc::new(ModelPci { name, model, bus })))
}

impl PciOps for ModelPci {
    fn name(&self) -> &str {
        &self.name
    }
    fn kind(&self) -> &'static str {
        "model"
    }
    fn config_size(&self) -> u16 {
        self.model.config_size()
    }
    fn config_read(&self, offset: u16, buf: &mut [u8]) -> Result<(), PciError> {
        self.model.config_read(offset, buf);
        Ok(())
    }
    fn config_write(&self, offset: u16, buf: &[u8]) -> Result<(), PciError> {
        self.model.config_write(offset, buf);
        Ok(())
    }
    fn bar_len(&self, bar: u8) -> u64 {
        self.model.bar_len(bar)
    }
    fn bar_mapping(&self, bar: u8) -> Option<Arc<Mmio>> {
        self.model.bar_mapping(bar)
    }
    fn bar_read(&self, bar: u8, offset: u64, buf: &mut [u8]) -> Result<(), PciError> {
        self.model.bar_read(bar, offset, buf);
        Ok(())
    }
    fn bar_write(&self, bar: u8, offset: u64, buf: &[u8]) -> Result<(), PciError> {
        self.model.bar_write(bar, offset, buf);
        Ok(())
    }
    fn msix_vectors(&self) -> u16 {
        self.model.msix_vectors()
    }
    fn set_msix(&self, fds: &[Option<Arc<OwnedFd>>]) -> Result<(), PciError> {
        self.bus.irq.set(fds);
        Ok(())
    }
    fn msix_trigger(&self, vector: u16) -> Result<(), PciError> {
        if !self.bus.irq.is_wired(vector) {
            return Err(PciError::Vfio {
                dev: self.name.clone(),
                why: format!("MSI-X vector {vector} is not wired to an eventfd"),
            });
        }
        self.bus.irq.signal(vector);
        Ok(())
    }
    fn reset(&self) -> Result<(), PciError> {
        self.model.reset();
        Ok(())
    }
    fn notify_area(&self, bar: u8, offset: u64, len: u64) -> Option<NotifyArea> {
        self.model.notify_area(bar, offset, len)
    }
    fn domain(&self) -> &DmaDomain {
        &self.bus.dma
    }
}

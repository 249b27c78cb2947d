//! Device models of virtio-PCI functions, on the model kit (`vdpakit_core::model`): a generic
//! modern virtio-net function (like QEMU's `virtio-net-pci` with `page-per-vq=on`), the legacy
//! function Alibaba's ENI presents, and the base the IFC VF model (`vdpakit_pmd_ifc::model`)
//! extends with its live-migration region through a [`BarHook`].
//!
//! A [`VpModel`] is one device with `functions` PCI functions served by one engine thread of the
//! kit (rings and buffers reached only through each function's DMA domain; MSI-X through the
//! vectors the driver wired; doorbell pages a host notifier can map). The functions' wires are
//! the kit's: `loop`, `cable` (function 2k with 2k + 1) or `none`.
//!
//! What the model adds to the engine: the PCI configuration space with the virtio capabilities
//! (modern) or the BAR0 block (legacy), the common configuration / legacy registers with their
//! rules (features only before FEATURES_OK, FEATURES_OK only for a subset with VERSION_1 on a
//! modern function, queue fields fixed once a queue is enabled, vectors beyond the table read
//! back as 0xffff), the virtio-net configuration with `config_generation`, and the control
//! queue (VQ_PAIRS_SET), which it serves on the driver's thread when its doorbell is written.
//!
//! Register offsets are the model's own ([`regs`]), written separately from the drivers'.
//!
//! **Fault injection** ([`Faults`]): a reset that never completes (status keeps its value), a
//! doorbell that is dropped (counted), an IOMMU fault (the next start points queue 0 outside
//! every mapping: the engine records the fault and stops the queue, the status shows
//! NEEDS_RESET), and MSI-X vector writes refused (they read back 0xffff).

pub mod regs;
pub mod spec;

mod function;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, Weak};

use vdpakit_core::model::PollMode;
use vdpakit_core::model::engine::{self, EngineShared, EngineThread, VfShared};
use vdpakit_core::model::eswitch::Wire;
use vdpakit_core::pci::model::DeviceModel;
use vdpakit_core::pci::{DmaDomain, PciDevice};
use vdpakit_core::vdpa::VqStats;
use vdpakit_core::virtio::features as vf;

pub use self::function::{FnCtx, VpFunction};
use self::regs::{CommonLayout, LegacyLayout};
use crate::error::{PmdError, Result};

/// Where one virtio structure lives in a model.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Place {
    /// BAR.
    pub bar: u8,
    /// Offset in the BAR.
    pub offset: u64,
    /// Length the capability announces.
    pub len: u64,
}

/// A modern function's layout.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModernShape {
    /// Common configuration.
    pub common: Place,
    /// Notification area (queue `q`'s doorbell at `offset + q * notify_mult`).
    pub notify: Place,
    /// Bytes between doorbells (4096: a page per queue, mappable).
    pub notify_mult: u32,
    /// ISR.
    pub isr: Place,
    /// Device configuration.
    pub device: Place,
    /// BAR sizes.
    pub bars: [u64; 6],
    /// Field offsets of the common configuration.
    pub common_regs: CommonLayout,
    /// A capability type left out of the list (fault: a missing mandatory capability).
    pub omit_cap: Option<u8>,
}

impl ModernShape {
    /// QEMU-like: everything in BAR4 (common at 0, ISR at 0x1000, device at 0x2000, a page per
    /// queue's doorbell from 0x3000), for `queues` queues.
    pub fn qemu_like(queues: u16) -> ModernShape {
        let notify_len = u64::from(queues) * 4096;
        let bar4 = (0x3000 + notify_len).next_power_of_two();
        ModernShape {
            common: Place {
                bar: 4,
                offset: 0,
                len: CommonLayout::SPEC.len,
            },
            isr: Place {
                bar: 4,
                offset: 0x1000,
                len: 4,
            },
            device: Place {
                bar: 4,
                offset: 0x2000,
                len: regs::net::LEN as u64,
            },
            notify: Place {
                bar: 4,
                offset: 0x3000,
                len: notify_len,
            },
            notify_mult: 4096,
            bars: [0, 0x1000, 0, 0, bar4, 0],
            common_regs: CommonLayout::SPEC,
            omit_cap: None,
        }
    }
}

/// A legacy function's layout.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LegacyShape {
    /// BAR0 size.
    pub bar0: u64,
    /// Register offsets.
    pub regs: LegacyLayout,
}

impl Default for LegacyShape {
    fn default() -> Self {
        LegacyShape {
            bar0: 0x40,
            regs: LegacyLayout::SPEC,
        }
    }
}

/// Register interface of a model.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Shape {
    /// virtio 1.x capabilities.
    Modern(ModernShape),
    /// virtio 0.9.5 BAR0 block.
    Legacy(LegacyShape),
}

/// PCI identity.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Identity {
    /// Vendor ID.
    pub vendor: u16,
    /// Device ID.
    pub device: u16,
    /// Subsystem vendor ID.
    pub subsys_vendor: u16,
    /// Subsystem ID.
    pub subsys_device: u16,
    /// Revision.
    pub revision: u8,
}

/// Where the functions' frames go.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ModelWire {
    /// Each function's transmit comes back to its receive.
    Loop,
    /// Function 2k and 2k + 1 joined back to back.
    Cable,
    /// Transmit is dropped.
    None,
}

/// Everything a model is built from.
#[derive(Debug, Clone)]
pub struct ModelSpec {
    /// Device name (registry key; functions are `NAME-fK`).
    pub name: String,
    /// PCI functions.
    pub functions: u16,
    /// Wires.
    pub wire: ModelWire,
    /// Queue pairs per function.
    pub pairs: u16,
    /// Whether the function has a control queue (after the data queues).
    pub ctrl_vq: bool,
    /// Largest ring (legacy: the fixed size).
    pub max_queue_size: u16,
    /// Feature bits offered.
    pub features: u64,
    /// MTU in the configuration.
    pub mtu: u16,
    /// MAC of function 0 (function k: last byte + k).
    pub mac: [u8; 6],
    /// MSI-X vectors (default 2 × pairs + 2, like QEMU).
    pub msix_vectors: Option<u16>,
    /// Engine polling.
    pub poll: PollMode,
    /// PCI identity.
    pub id: Identity,
    /// Register interface.
    pub shape: Shape,
}

/// Features a modern model offers by default.
pub const MODERN_FEATURES: u64 = vf::VERSION_1
    | vf::ACCESS_PLATFORM
    | vf::RING_PACKED
    | vf::RING_EVENT_IDX
    | vf::RING_INDIRECT_DESC
    | vf::NET_MRG_RXBUF
    | vf::NET_MAC
    | vf::NET_MTU
    | vf::NET_STATUS;

/// Features the legacy model offers by default (32 bits).
pub const LEGACY_FEATURES: u64 = vf::ANY_LAYOUT
    | vf::NOTIFY_ON_EMPTY
    | vf::RING_EVENT_IDX
    | vf::RING_INDIRECT_DESC
    | vf::NET_MRG_RXBUF
    | vf::NET_MAC
    | vf::NET_STATUS;

impl ModelSpec {
    fn base(name: &str, pairs: u16, features: u64, id: Identity, shape: Shape) -> ModelSpec {
        let mut features = features;
        if pairs > 1 {
            features |= vf::NET_MQ | vf::NET_CTRL_VQ;
        }
        ModelSpec {
            name: name.to_string(),
            functions: 1,
            wire: ModelWire::Loop,
            pairs,
            ctrl_vq: pairs > 1,
            max_queue_size: if matches!(shape, Shape::Legacy(_)) {
                256
            } else {
                1024
            },
            features,
            mtu: 1500,
            mac: [0x02, 0x76, 0x6d, 0x00, 0x00, 0x10],
            msix_vectors: None,
            poll: PollMode::Adaptive,
            id,
            shape,
        }
    }

    /// A generic modern virtio-net function (QEMU-like: 1af4:1041, structures in BAR4).
    pub fn virtio(name: &str, pairs: u16) -> ModelSpec {
        let queues = 2 * pairs + u16::from(pairs > 1);
        ModelSpec::base(
            name,
            pairs,
            MODERN_FEATURES,
            Identity {
                vendor: 0x1af4,
                device: 0x1041,
                subsys_vendor: 0x1af4,
                subsys_device: 0x1100,
                revision: 1,
            },
            Shape::Modern(ModernShape::qemu_like(queues)),
        )
    }

    /// A legacy virtio-net function with ENI's identity (1af4:1000 subsystem 1af4:0001,
    /// revision 0, BAR0 block).
    pub fn eni(name: &str, pairs: u16) -> ModelSpec {
        ModelSpec::base(
            name,
            pairs,
            LEGACY_FEATURES,
            Identity {
                vendor: 0x1af4,
                device: 0x1000,
                subsys_vendor: 0x1af4,
                subsys_device: 0x0001,
                revision: 0,
            },
            Shape::Legacy(LegacyShape::default()),
        )
    }

    /// Queues per function (data queues and the control queue).
    pub fn queues(&self) -> u16 {
        2 * self.pairs + u16::from(self.ctrl_vq)
    }

    /// Function `k`'s MAC.
    pub fn mac_of(&self, k: u16) -> [u8; 6] {
        let mut m = self.mac;
        m[5] = m[5].wrapping_add(k as u8);
        m
    }
}

/// Injectable faults of one function (any thread may flip them).
#[derive(Debug, Default)]
pub struct Faults {
    /// Writing 0 to the status does not reset: the status keeps its value.
    pub stuck_reset: AtomicBool,
    /// Doorbell writes are dropped (and counted).
    pub drop_doorbell: AtomicBool,
    /// At the next DRIVER_OK the device points queue 0's descriptors outside every mapping.
    pub iommu_fault: AtomicBool,
    /// MSI-X vector writes are refused (read back 0xffff).
    pub refuse_vectors: AtomicBool,
}

/// Extra registers of a function in one BAR (IFC's live-migration region).
pub trait BarHook: Send + Sync + std::fmt::Debug {
    /// The BAR the registers are in (from offset 0).
    fn bar(&self) -> u8;
    /// Bytes of registers.
    fn size(&self) -> u64;
    /// A read of `buf.len()` bytes at `offset`.
    fn read(&self, f: &FnCtx<'_>, offset: u64, buf: &mut [u8]);
    /// A write.
    fn write(&self, f: &FnCtx<'_>, offset: u64, buf: &[u8]);
    /// The function was reset.
    fn reset(&self, _f: &FnCtx<'_>) {}
}

/// Builds a function's hook (function index → hook).
pub type HookFactory<'a> = &'a dyn Fn(u16) -> Arc<dyn BarHook>;

/// What the functions share; dropping the last handle stops and joins the engine thread.
#[derive(Debug)]
pub(crate) struct ModelCore {
    pub(crate) spec: ModelSpec,
    pub(crate) engine: Arc<EngineShared>,
    _thread: EngineThread,
}

#[derive(Debug)]
struct ModelInner {
    core: Arc<ModelCore>,
    fns: Vec<Arc<VpFunction>>,
}

/// A model device: its functions and their engine. Cheap to clone.
#[derive(Debug, Clone)]
pub struct VpModel {
    inner: Arc<ModelInner>,
}

fn registry() -> MutexGuard<'static, BTreeMap<String, Weak<ModelInner>>> {
    static T: OnceLock<Mutex<BTreeMap<String, Weak<ModelInner>>>> = OnceLock::new();
    T.get_or_init(|| Mutex::new(BTreeMap::new()))
        .lock()
        .unwrap_or_else(|p| p.into_inner())
}

impl VpModel {
    /// Creates the device and starts its engine thread. `hook` adds registers to each function.
    pub fn new(spec: ModelSpec, hook: Option<HookFactory<'_>>) -> Result<VpModel> {
        let err = |what: String| PmdError::Device {
            dev: format!("model:{}", spec.name),
            what,
        };
        if spec.functions == 0 || spec.pairs == 0 {
            return Err(err(
                "a model needs at least one function and one queue pair".into(),
            ));
        }
        let mut shared = Vec::new();
        let mut wires = Vec::new();
        for k in 0..spec.functions {
            shared.push(Arc::new(
                VfShared::new(k, spec.pairs, spec.mac_of(k)).map_err(&err)?,
            ));
            wires.push(match spec.wire {
                ModelWire::Loop => Wire::Loop(None),
                ModelWire::Cable if k ^ 1 < spec.functions => Wire::Cable(usize::from(k ^ 1)),
                _ => Wire::None,
            });
        }
        let engine = Arc::new(EngineShared::new(&spec.name, shared, spec.poll).map_err(&err)?);
        let t = engine::spawn(Arc::clone(&engine), wires).map_err(&err)?;
        let core = Arc::new(ModelCore {
            spec: spec.clone(),
            engine,
            _thread: t,
        });
        let fns = (0..spec.functions)
            .map(|k| Arc::new(VpFunction::new(Arc::clone(&core), k, hook.map(|h| h(k)))))
            .collect();
        tracing::info!(
            "model {}: {} function(s), {} pair(s) each, wire {:?}",
            spec.name,
            spec.functions,
            spec.pairs,
            spec.wire
        );
        Ok(VpModel {
            inner: Arc::new(ModelInner { core, fns }),
        })
    }

    /// The live model named `name`, or a new one from `make()` registered under that name.
    pub fn get_or_create(name: &str, make: impl FnOnce() -> Result<VpModel>) -> Result<VpModel> {
        if let Some(m) = registry().get(name).and_then(Weak::upgrade) {
            return Ok(VpModel { inner: m });
        }
        let m = make()?;
        registry().insert(name.to_string(), Arc::downgrade(&m.inner));
        Ok(m)
    }

    /// The spec.
    pub fn spec(&self) -> &ModelSpec {
        &self.inner.core.spec
    }

    /// Function `k`.
    pub fn function(&self, k: u16) -> Option<Arc<VpFunction>> {
        self.inner.fns.get(usize::from(k)).cloned()
    }

    /// Opens function `k` as a PCI function in `domain` (a model domain).
    pub fn open_in(&self, k: u16, domain: &DmaDomain) -> Result<PciDevice> {
        let f = self.function(k).ok_or_else(|| PmdError::Config {
            dev: format!("model:{}", self.spec().name),
            what: format!(
                "function {k} does not exist (the model has {})",
                self.spec().functions
            ),
        })?;
        Ok(vdpakit_core::pci::model::open(
            f as Arc<dyn DeviceModel>,
            domain,
        )?)
    }

    /// Opens function `k` in a DMA domain of its own.
    pub fn open(&self, k: u16) -> Result<PciDevice> {
        self.open_in(k, &DmaDomain::model())
    }

    /// Engine counters of function `k`'s queue `q` (data queues).
    pub fn stats(&self, k: u16, q: u16) -> Option<VqStats> {
        let vf = self.inner.core.engine.vfs().get(usize::from(k))?;
        Some(vf.counters(q)?.snapshot())
    }

    /// Whether function `k`'s queue `q` stopped on an error.
    pub fn broken(&self, k: u16, q: u16) -> bool {
        self.inner
            .core
            .engine
            .vfs()
            .get(usize::from(k))
            .and_then(|v| v.counters(q))
            .is_some_and(|c| c.is_broken())
    }
}

pub(crate) fn fault_flag(a: &AtomicBool) -> bool {
    a.load(Ordering::Relaxed)
}

//! The `sim` device: the model kit's virtqueue engine and e-switch behind the simplest control
//! interface that can work (like Linux's vdpa_sim), the reference device of the framework tests.
//!
//! A sim device has `vfs` VFs; each is its own PCI function ([`SimVf`], a
//! [`DeviceModel`]) with its own DMA domain and its own vDPA
//! device (`NAME-vfK`), driven by the sim PMD ([`sim_pmd`](crate::model::sim_pmd)). One engine
//! thread serves all VFs of a device. The register map is in [`regs`] (the device's copy).
//!
//! Spec: `sim:name=NAME,vfs=N,wire=loop|cable|cable:A-B/..|tap:IFNAME|rep|none,queues=N,mac=..,
//! mtu=..,log=0|1,filter=0|1,poll=adaptive|busy,queue_size=N` ([`SimConfig`]).
//!
//! Features offered: VERSION_1, ANY_LAYOUT, RING_PACKED, RING_EVENT_IDX, RING_INDIRECT_DESC,
//! NET_MRG_RXBUF, NET_MAC, NET_MTU, NET_STATUS, NET_MQ (with `queues` > 1), and VHOST_F_LOG_ALL
//! with `log=1` (the engine logs dirty pages itself: [`LogSupport::Hardware`]).
//!
//! [`LogSupport::Hardware`]: crate::vdpa::LogSupport::Hardware

pub mod regs;
mod vf;

use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Mutex};

pub use self::vf::SimVf;
use super::ModelError;
use super::engine::{self, EngineShared, EngineThread, VfShared};
use super::eswitch::Wire;
use super::registry;
use super::sim_pmd::SimVdpa;
use super::spec::{SimConfig, WireSpec};
use crate::pci::DmaDomain;
use crate::pci::model::DeviceModel;
use crate::vdpa::{VdpaDevice, VqStats};

/// What the engine thread, the VF models and the registry share. Dropping the last handle stops
/// the engine thread.
#[derive(Debug)]
pub(crate) struct SimCore {
    pub(crate) cfg: SimConfig,
    pub(crate) engine: Arc<EngineShared>,
    thread: Mutex<Option<EngineThread>>,
}

impl Drop for SimCore {
    fn drop(&mut self) {
        // Stops and joins the engine thread.
        drop(
            self.thread
                .get_mut()
                .unwrap_or_else(|p| p.into_inner())
                .take(),
        );
        registry::forget(&self.cfg.name);
    }
}

/// A sim device: its VF models, not yet opened as PCI functions.
#[derive(Debug, Clone)]
pub struct SimDevice {
    core: Arc<SimCore>,
    vfs: Vec<Arc<SimVf>>,
}

static NEXT_INDEX: AtomicU8 = AtomicU8::new(0);

impl SimDevice {
    /// Parses `params` (the spec after `sim:`) and creates the device.
    pub fn from_spec(params: &str) -> Result<SimDevice, ModelError> {
        let i = NEXT_INDEX.fetch_add(1, Ordering::Relaxed);
        let cfg = SimConfig::parse(params, &format!("sim{i}"), i)?;
        SimDevice::new(cfg)
    }

    /// Creates the device: opens its TAP interfaces (`wire=tap:`), starts its engine thread and
    /// registers it by name (names are unique among live devices).
    pub fn new(cfg: SimConfig) -> Result<SimDevice, ModelError> {
        let mut wires = Vec::new();
        for k in 0..cfg.vfs {
            wires.push(match &cfg.wire {
                WireSpec::Loop => Wire::Loop(cfg.filter.then(|| cfg.vf_mac(k))),
                WireSpec::Cable(pairs) => pairs
                    .iter()
                    .find_map(|&(a, b)| {
                        if a == k {
                            Some(Wire::Cable(usize::from(b)))
                        } else if b == k {
                            Some(Wire::Cable(usize::from(a)))
                        } else {
                            None
                        }
                    })
                    .unwrap_or(Wire::None),
                WireSpec::Tap(_) => Wire::tap(&cfg.tap_name(k).unwrap_or_default())?,
                WireSpec::Rep => Wire::Rep,
                WireSpec::None => Wire::None,
            });
        }
        let mut shared = Vec::new();
        for k in 0..cfg.vfs {
            shared.push(Arc::new(
                VfShared::new(k, cfg.queue_pairs, cfg.vf_mac(k)).map_err(ModelError::Io)?,
            ));
        }
        let engine =
            Arc::new(EngineShared::new(&cfg.name, shared, cfg.poll).map_err(ModelError::Io)?);
        let core = Arc::new(SimCore {
            cfg: cfg.clone(),
            engine: Arc::clone(&engine),
            thread: Mutex::new(None),
        });
        registry::register(&cfg.name, &core)?;
        let t = engine::spawn(engine, wires).map_err(ModelError::Io)?;
        *core.thread.lock().unwrap_or_else(|p| p.into_inner()) = Some(t);
        let vfs = (0..cfg.vfs)
            .map(|k| Arc::new(SimVf::new(Arc::clone(&core), k)))
            .collect();
        tracing::info!(
            "sim {}: {} VF(s), {} queue pair(s) each, wire {:?}",
            cfg.name,
            cfg.vfs,
            cfg.queue_pairs,
            cfg.wire
        );
        Ok(SimDevice { core, vfs })
    }

    /// The configuration.
    pub fn config(&self) -> &SimConfig {
        &self.core.cfg
    }

    /// The device name.
    pub fn name(&self) -> &str {
        &self.core.cfg.name
    }

    /// VF `k`'s model, to open with [`crate::pci::model::open`].
    pub fn vf_model(&self, k: u16) -> Option<Arc<dyn DeviceModel>> {
        self.vfs
            .get(usize::from(k))
            .map(|v| Arc::clone(v) as Arc<dyn DeviceModel>)
    }

    /// VF `k`'s counters for queue `q` (as the engine keeps them).
    pub fn stats(&self, k: u16, q: u16) -> Option<VqStats> {
        let vf = self.core.engine.vfs().get(usize::from(k))?;
        Some(vf.counters(q)?.snapshot())
    }

    /// Opens every VF in its own model DMA domain and returns the sim PMD for each (the vDPA
    /// devices `NAME-vf0`, `NAME-vf1`, ...).
    pub fn into_vdpa(self) -> Result<Vec<Box<dyn VdpaDevice>>, ModelError> {
        let mut out: Vec<Box<dyn VdpaDevice>> = Vec::new();
        for k in 0..self.core.cfg.vfs {
            let Some(model) = self.vf_model(k) else { break };
            let domain = DmaDomain::model();
            let name = self.core.cfg.vf_name(k);
            let dev = SimVdpa::open(&name, model, &domain)
                .map_err(|e| ModelError::Io(format!("{name}: {e}")))?;
            out.push(Box::new(dev));
        }
        Ok(out)
    }
}

/// Creates the vDPA devices of a `sim` spec (the part after `sim:`).
pub fn create(params: &str) -> Result<Vec<Box<dyn VdpaDevice>>, ModelError> {
    SimDevice::from_spec(params)?.into_vdpa()
}

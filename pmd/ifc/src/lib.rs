//! vdpakit PMD for Intel's IFC VF (N3000, C5000X-PL, F2000X-PL): a modern virtio-PCI function
//! plus a live-migration region at BAR4 offset 0 (reference facts: `kernel-vdpa-hw.md` §0 and §3,
//! `dpdk-vdpa.md` §2 for the dirty logging and the software relay).
//!
//! The virtio part (capabilities, common configuration, rings, doorbells, MSI-X) is the generic
//! flow of `vdpakit_pmd_virtio`; this crate adds what the IFC VF has beyond virtio:
//!
//! - **probe by ID**: 1af4:1041 subsystem 8086:001a (N3000) and 1af4:1000 subsystem 8086:0001
//!   (C5000X-PL/F2000X-PL); any other modern virtio-net function only with `force=1`;
//! - **ring state** in the live-migration region: a 32-bit slot per queue at 0x20 + 4·qid,
//!   avail index in bits 15:0 and used index in bits 31:16, written before a queue is enabled and
//!   read back when the binding stops the device (so a restart or a migration continues where the
//!   device stopped);
//! - **hardware dirty logging** (`LogSupport::Hardware`): the log bitmap's IOVA range goes to
//!   LOG_BASE (0x10) and LOG_END (0x18) as low/high 32-bit halves, then CONTROL (0x00) =
//!   ENABLE_VF (1); DISABLE (0) stops it. `sw-live-migration=1` reports `LogSupport::None`
//!   instead, and the binding relays used rings in software (like DPDK's ifc option).
//! - **MSI-X** as the IFC driver lays it out: queue *i* on vector *i* and the configuration on
//!   vector `num_queues` when the function has enough vectors, else every queue on vector 0 and
//!   the configuration on vector 1 (fan-out thread), else everything on vector 0.
//!
//! A function forced with `force=1` whose virtio structures sit where the live-migration region
//! would be (QEMU's virtio-net-pci keeps its common configuration at BAR4 offset 0) is driven
//! without that region: no ring state, no hardware logging, exactly the virtio datapath.

pub mod lm;
pub mod model;

use vdpakit_core::pci::{DmaDomain, Doorbell, NotifyArea, PciDevice};
use vdpakit_core::port::{ExternalKind, Port, PortEnv, PortKind, PortSpec};
use vdpakit_core::vdpa::{
    DevConf, LogConfig, LogSupport, NetDevConfig, VdpaDevice, VdpaError, VqConfig, VqState, VqStats,
};
use vdpakit_core::virtio::features as vf;
use vdpakit_core::virtio_pci::ModernTransport;
use vdpakit_pmd_virtio::model::spec::MODEL_KEYS;
use vdpakit_pmd_virtio::port::{COMMON_KEYS, PciPort, PortSetup};
use vdpakit_pmd_virtio::spec::{Params, concat_keys, open_device_functions, open_port_function};
use vdpakit_pmd_virtio::transport::Transport;
use vdpakit_pmd_virtio::vdpa::{Flavor, VpOptions, VpVdpa, VqStateHook};
use vdpakit_pmd_virtio::{PmdError, Result};

pub use lm::LmRegion;

/// IFC's IDs: (device, subsystem vendor, subsystem device, what). Vendor is 0x1af4.
pub const IDS: &[(u16, u16, u16, &str)] = &[
    (0x1041, 0x8086, 0x001a, "IFC VF virtio-net (N3000)"),
    (
        0x1000,
        0x8086,
        0x0001,
        "IFC VF virtio-net (C5000X-PL/F2000X-PL)",
    ),
];

/// The block function of the same family (not driven).
pub const BLK_ID: (u16, u16, u16) = (0x1001, 0x8086, 0x0002);

/// The virtio flavor of IFC: DEVICE capability mandatory, one control queue counted out of
/// `num_queues`, ACCESS_PLATFORM required.
pub const FLAVOR: Flavor = Flavor {
    pmd: "ifc",
    add_features: 0,
    guest_required: 0,
    need_access_platform: true,
    need_device_cfg: true,
    pairs_from_queues: true,
};

/// Checks the function's IDs; `force` accepts any virtio-net function (returns whether the
/// function is a real IFC VF).
pub fn check_ids(dev: &PciDevice, force: bool) -> Result<bool> {
    let (vendor, device) = dev.ids()?;
    let sv = dev.config_read16(vdpakit_core::pci::cfg::SUBSYS_VENDOR)?;
    let sd = dev.config_read16(vdpakit_core::pci::cfg::SUBSYS_ID)?;
    if vendor == 0x1af4 && (device, sv, sd) == BLK_ID {
        return Err(PmdError::Probe {
            dev: dev.name().to_string(),
            what: "an IFC virtio-blk function (1af4:1001 subsystem 8086:0002): vdpakit drives virtio-net only".into(),
        });
    }
    let ifc = vendor == 0x1af4
        && IDS
            .iter()
            .any(|&(d, v, s, _)| (d, v, s) == (device, sv, sd));
    if ifc || force {
        return Ok(ifc);
    }
    Err(PmdError::Probe {
        dev: dev.name().to_string(),
        what: format!(
            "IDs {vendor:04x}:{device:04x} subsystem {sv:04x}:{sd:04x} are not an IFC VF (1af4:1041 subsystem 8086:001a, 1af4:1000 subsystem 8086:0001); force=1 drives another virtio-net function without the live-migration region"
        ),
    })
}

/// Options of an IFC device.
#[derive(Debug, Clone, Copy, Default)]
pub struct IfcOptions {
    /// Accept a function without the IFC IDs.
    pub force: bool,
    /// Report no hardware logging: the binding's software relay handles live migration.
    pub sw_live_migration: bool,
    /// Generic options (MSI-X vector limit).
    pub vp: VpOptions,
}

/// The IFC vDPA device.
#[derive(Debug)]
pub struct IfcVdpa {
    inner: VpVdpa,
    lm: Option<LmRegion>,
    sw_lm: bool,
    log: Option<LogConfig>,
}

impl IfcVdpa {
    /// Probes `dev` (IDs, virtio structures, features, the live-migration region).
    pub fn probe(dev: PciDevice, opts: IfcOptions) -> Result<IfcVdpa> {
        let real = check_ids(&dev, opts.force)?;
        let inner = VpVdpa::probe_modern(dev, FLAVOR, opts.vp)?;
        let Transport::Modern(t) = inner.transport() else {
            return Err(PmdError::Probe {
                dev: inner.transport().name().to_string(),
                what: "not a modern virtio function".into(),
            });
        };
        let lm = match LmRegion::find(t, inner.nr_vring()) {
            Ok(lm) => Some(lm),
            Err(e) if !real => {
                tracing::warn!(
                    "{e}; forced function driven without ring state or hardware dirty logging"
                );
                None
            }
            Err(e) => return Err(e),
        };
        let sw_lm = opts.sw_live_migration || lm.is_none();
        Ok(IfcVdpa {
            inner,
            lm,
            sw_lm,
            log: None,
        })
    }

    /// Whether the live-migration region is in use.
    pub fn has_lm_region(&self) -> bool {
        self.lm.is_some()
    }

    /// The generic part.
    pub fn inner(&self) -> &VpVdpa {
        &self.inner
    }

    fn start_log(&mut self, l: LogConfig) -> Result<()> {
        let Some(lm) = &self.lm else {
            return Err(PmdError::Config {
                dev: self.inner.transport().name().to_string(),
                what: "hardware dirty logging without a live-migration region".into(),
            });
        };
        lm.start_log(self.inner.transport().pci(), l.iova, l.size)?;
        self.log = Some(l);
        Ok(())
    }

    fn stop_log(&mut self) -> Result<()> {
        if let (Some(lm), Some(_)) = (&self.lm, self.log.take()) {
            lm.stop_log(self.inner.transport().pci())?;
        }
        Ok(())
    }
}

struct Hook<'a>(&'a LmRegion);

impl VqStateHook for Hook<'_> {
    fn set_state(&mut self, tr: &Transport, q: &VqConfig) -> Result<()> {
        self.0.set_state(tr.pci(), q.index, q.avail_idx, q.used_idx)
    }
}

impl VdpaDevice for IfcVdpa {
    fn name(&self) -> &str {
        self.inner.name()
    }

    fn max_queue_pairs(&self) -> u16 {
        self.inner.max_queue_pairs()
    }

    fn max_queue_size(&self) -> u16 {
        self.inner.max_queue_size()
    }

    fn features(&self) -> u64 {
        self.inner.features()
    }

    fn protocol_features(&self) -> u64 {
        self.inner.protocol_features()
    }

    fn net_config(&self) -> NetDevConfig {
        self.inner.net_config()
    }

    fn domain(&self) -> &DmaDomain {
        self.inner.domain()
    }

    fn log_support(&self) -> LogSupport {
        if self.sw_lm {
            LogSupport::None
        } else {
            LogSupport::Hardware
        }
    }

    fn configure(&mut self, conf: &DevConf) -> std::result::Result<(), VdpaError> {
        let name = self.inner.name().to_string();
        let _ = self.stop_log();
        let r = match &self.lm {
            Some(lm) => {
                let lm = *lm;
                let mut hook = Hook(&lm);
                self.inner.configure_with(conf, Some(&mut hook))
            }
            None => self.inner.configure_with(conf, None),
        };
        r.map_err(|e| e.into_vdpa(&name))?;
        if let Some(l) = conf.log
            && conf.features & vf::VHOST_F_LOG_ALL != 0
            && let Err(e) = self.start_log(l)
        {
            self.inner.close_quietly();
            return Err(e.into_vdpa(&name));
        }
        Ok(())
    }

    fn set_vring_state(&mut self, qid: u16, enable: bool) -> std::result::Result<(), VdpaError> {
        self.inner.set_vring_state(qid, enable)
    }

    fn set_features(
        &mut self,
        features: u64,
        log: Option<LogConfig>,
    ) -> std::result::Result<(), VdpaError> {
        let name = self.inner.name().to_string();
        self.inner.set_features(features, None)?;
        match log {
            Some(l) if features & vf::VHOST_F_LOG_ALL != 0 => {
                if self.sw_lm {
                    return Err(VdpaError::Unsupported {
                        dev: name,
                        what: "hardware dirty logging (sw-live-migration=1 or no live-migration region)".into(),
                    });
                }
                self.start_log(l).map_err(|e| e.into_vdpa(&name))
            }
            _ => self.stop_log().map_err(|e| e.into_vdpa(&name)),
        }
    }

    fn vring_state(&mut self, qid: u16) -> std::result::Result<VqState, VdpaError> {
        let name = self.inner.name().to_string();
        match &self.lm {
            Some(lm) => {
                if qid >= self.inner.nr_vring() {
                    return Err(VdpaError::BadQueue {
                        dev: name,
                        qid,
                        count: self.inner.nr_vring(),
                    });
                }
                lm.state(self.inner.transport().pci(), qid)
                    .map_err(|e| e.into_vdpa(&name))
            }
            None => self.inner.vring_state(qid),
        }
    }

    fn close(&mut self) -> std::result::Result<(), VdpaError> {
        let _ = self.stop_log();
        self.inner.close()
    }

    fn doorbell(&self, qid: u16) -> std::result::Result<(Doorbell, u32), VdpaError> {
        self.inner.doorbell(qid)
    }

    fn notify_area(&self, qid: u16) -> Option<NotifyArea> {
        self.inner.notify_area(qid)
    }

    fn stats(&self, qid: u16) -> std::result::Result<VqStats, VdpaError> {
        self.inner.stats(qid)
    }
}

/// Keys of `vdpakit vdpa --device ifc:...`.
pub const DEVICE_KEYS: &[(&str, &str)] = &concat_keys::<{ 4 + MODEL_KEYS.len() }>(
    &[
        (
            "pci",
            "PCI address of the VF, bound to vfio-pci (or model=NAME)",
        ),
        (
            "force",
            "1: drive a virtio-net function without the IFC IDs (no live-migration region unless it has one)",
        ),
        (
            "sw-live-migration",
            "1: live migration through the software used-ring relay instead of hardware dirty logging",
        ),
        (
            "irq_vectors",
            "use at most N MSI-X vectors (fewer than queues + 1: queues share vector 0)",
        ),
    ],
    MODEL_KEYS,
);

fn lm_hook(_k: u16) -> std::sync::Arc<dyn vdpakit_pmd_virtio::model::BarHook> {
    model::LmHook::hook(model::regs::LmLayout::FACTS)
}

/// One line about the device kind.
pub const DEVICE_ABOUT: &str = "Intel IFC VF (N3000, C5000X-PL, F2000X-PL) through VFIO (ifc:pci=BDF) or its model (ifc:model[,name=N]) (keys: pci, force, sw-live-migration, irq_vectors; model: vfs, wire=loop|cable|none, pairs, qsize, poll, fault)";

/// Creates the device of an `ifc:pci=BDF[,...]` spec.
pub fn create_devices(params: &str) -> Result<Vec<Box<dyn VdpaDevice>>> {
    let p = Params::parse("ifc", params, DEVICE_KEYS)?;
    let opts = IfcOptions {
        force: p.flag("force", false)?,
        sw_live_migration: p.flag("sw-live-migration", false)?,
        vp: VpOptions {
            irq_limit: p.u16_in("irq_vectors", 1..=2048)?,
        },
    };
    let mut out: Vec<Box<dyn VdpaDevice>> = Vec::new();
    for dev in open_device_functions(&p, model::spec, Some(&lm_hook))? {
        out.push(Box::new(IfcVdpa::probe(dev, opts)?));
    }
    Ok(out)
}

const PORT_KEYS: &[(&str, &str)] = &concat_keys::<{ 8 + MODEL_KEYS.len() }>(
    &[
        (
            "pci",
            "PCI address of the VF, bound to vfio-pci (or model=NAME)",
        ),
        ("queues", "queue pairs (default: --queues)"),
        (
            "queue_size",
            "entries per ring (default: --rxd/--txd, capped by the device)",
        ),
        ("packed", "1: packed rings; 0 (default): split"),
        (
            "iova",
            "va or pa (default: va; pa for a function without ACCESS_PLATFORM)",
        ),
        ("mac", "port MAC (default: the device's)"),
        (
            "force",
            "1: drive a virtio-net function without the IFC IDs (its virtio datapath)",
        ),
        ("vf", "function of the model (default 0)"),
    ],
    MODEL_KEYS,
);

const _: () = assert!(PORT_KEYS.len() == COMMON_KEYS.len() + 2 + MODEL_KEYS.len());

/// The `ifc` port kind of `vdpakit fwd`.
pub const PORT_KIND: ExternalKind = ExternalKind {
    kind: PortKind {
        name: "ifc",
        about: "an Intel IFC VF through VFIO, driven by vdpakit (its virtio datapath; force=1 for other virtio-net functions)",
        keys: PORT_KEYS,
    },
    create: create_port,
};

fn create_port(spec: &PortSpec, env: &PortEnv) -> vdpakit_core::Result<Box<dyn Port>> {
    let a = spec.args(PORT_KEYS)?;
    let name = spec.text();
    let force = a.choice("force", "0", &["0", "1"])? == "1";
    let (dev, keep) = open_port_function(&a, "ifc", name, model::spec, Some(&lm_hook))?;
    check_ids(&dev, force).map_err(|e| e.into_port(name))?;
    let tr = ModernTransport::probe(dev).map_err(|e| PmdError::from(e).into_port(name))?;
    let setup = PortSetup {
        kind: "ifc",
        transport: Transport::Modern(tr),
        required: 0,
        keep,
    };
    Ok(Box::new(PciPort::new(&a, env, name, setup)?))
}

//! The vDPA device: [`Mlx5Vdpa`] implements `core::vdpa::VdpaDevice` over a booted function,
//! and [`create`] builds devices from `mlx5:...` specs.
//!
//! At probe the function is brought up and the per-device resources made (UAR, PD, transport
//! domain, TIS, the null key; MAC and MTU from the NIC vport). `configure` builds the memory keys
//! over what the binding DMA-mapped, at key address = IOVA = guest physical address (one
//! page-list key per mapping, an indirect key over them when there are several; mappings too far
//! apart for an indirect list, such as the software relay's mediated rings far above guest
//! memory, get one physical-address key that the IOMMU alone restricts), creates every queue (three UMEMs,
//! a counters object, the VIRTIO_NET_Q in INIT with ring addresses, positions, key and event
//! target), the steering (RQT over the receive queues, TIR, root flow table with the MAC and
//! multicast rules), wires MSI-X vectors to the guest's call eventfds (or, in QP mode, the event
//! queue's vector to the event thread, [`crate::event`]), moves the enabled queues to RDY and
//! checks that none failed. `close` undoes it in reverse.
//!
//! Devargs, in the spirit of DPDK's mlx5 vDPA driver (`mlx5:model,queues=2,event_mode=poll`):
//! `queues` (queue pairs offered), `queue_size` (largest ring accepted), `event_mode`
//! (`msix`: the device interrupts the guest through MSI-X, one vector per queue; `poll`: no
//! interrupts, NO_MSIX queues; `qp`: each queue notifies through a firmware QP, a driver QP, a
//! CQ and one event queue on MSI-X vector 0, and the event thread signals the call eventfds; in
//! every mode a queue without a call eventfd is NO_MSIX, as DPDK does), `hw_latency_mode`, `hw_max_latency_us`,
//! `hw_max_pending_comp` (completion moderation, passed to the queue objects), `mac`, `mtu`,
//! `name`, `promisc` (every frame to the receive queues), and driver knobs `cmd_timeout_ms`, `dma_mem` (MiB), `mem` (`auto`, `2M`, `1G`,
//! `no-huge`), `cmd_sig` (checksum mode). Model-only: `model=NAME` (the model device, created
//! on first use and found by name after), `vfs` (functions of a new model), `vf` (the function
//! this spec drives; without it a device spec drives all of them), `wire=loop|cable|port|tap:NAME|none`,
//! `poll=adaptive|busy` (the engine thread), `packed`, `freeze_to_rdy`, `log` (0: the model
//! cannot modify ready queues, so no hardware dirty logging: the binding's software relay).

use std::os::fd::OwnedFd;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use vdpakit_core::mem::MemMode;
use vdpakit_core::pci::{Bdf, DmaDomain, Doorbell, NotifyArea, PciDevice};
use vdpakit_core::vdpa::{
    DevConf, LogConfig, LogSupport, NetDevConfig, VdpaDevice, VdpaError, VqConfig, VqState, VqStats,
};
use vdpakit_core::vhost::msg::proto;
use vdpakit_core::virtio::features as vf;

use crate::cmd::CmdOptions;
use crate::error::{Error, Result};
use crate::event::{ChainIds, EventBase, EventStats, Events};
use crate::hca::{Hca, HcaOptions};
use crate::model::{Mlx5Device, Mlx5Model, ModelOptions, Wire};
use crate::prm::{cap, vq};
use crate::res::{KeyPiece, KeySet};
use crate::steer::Steering;
use crate::virtq::{QCounters, VirtqAttr, Vq, state_name};

/// How a queue tells the guest about used buffers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventMode {
    /// No interrupts (NO_MSIX): for pollers.
    Poll,
    /// The device raises the queue's MSI-X vector, wired to the guest's call eventfd.
    Msix,
    /// Through a firmware QP, a driver QP, a CQ and an EQ; the event thread signals the call
    /// eventfds.
    Qp,
}

impl FromStr for EventMode {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<EventMode, String> {
        match s {
            "poll" | "none" => Ok(EventMode::Poll),
            "msix" => Ok(EventMode::Msix),
            "qp" => Ok(EventMode::Qp),
            _ => Err(format!("event_mode '{s}': accepted are msix, poll, qp")),
        }
    }
}

/// A parsed `mlx5:...` spec.
#[derive(Debug, Clone)]
pub struct Devargs {
    /// `pci=BDF`: a function bound to vfio-pci.
    pub pci: Option<Bdf>,
    /// `model`: an in-process model.
    pub model: bool,
    /// `model=NAME`: the model device's name.
    pub model_name: Option<String>,
    /// Model: functions of a new device.
    pub vfs: u16,
    /// Model: the function this spec drives (None: all).
    pub vf: Option<u16>,
    /// Model: the engine's polling.
    pub poll: vdpakit_core::model::PollMode,
    /// Model: modify_ext (hardware dirty logging possible).
    pub log: bool,
    /// Promiscuous steering (every frame to the receive queues, not only the MAC's and
    /// multicast).
    pub promisc: bool,
    /// Device name.
    pub name: Option<String>,
    /// Queue pairs offered (default: what the device has, at most 8).
    pub queues: Option<u16>,
    /// Largest ring accepted.
    pub queue_size: u16,
    /// Event mode.
    pub event_mode: EventMode,
    /// MAC (default: the vport's permanent address).
    pub mac: Option<[u8; 6]>,
    /// MTU (default: the vport's).
    pub mtu: Option<u16>,
    /// Completion moderation: mode, period in µs, completion count.
    pub moderation: (u8, u16, u16),
    /// Command completion limit.
    pub cmd_timeout: Duration,
    /// Driver DMA memory in bytes.
    pub dma_mem: usize,
    /// Page size of that memory.
    pub mem: MemMode,
    /// Checksum mode for commands.
    pub cmd_sig: bool,
    /// Model: where frames go.
    pub wire: Wire,
    /// Model: packed rings.
    pub packed: bool,
    /// Model: resumable queues.
    pub freeze_to_rdy: bool,
}

impl Default for Devargs {
    fn default() -> Devargs {
        Devargs {
            pci: None,
            model: false,
            model_name: None,
            vfs: 1,
            vf: None,
            poll: vdpakit_core::model::PollMode::Adaptive,
            log: true,
            promisc: false,
            name: None,
            queues: None,
            queue_size: 1024,
            event_mode: EventMode::Msix,
            mac: None,
            mtu: None,
            moderation: (0, 0, 0),
            cmd_timeout: Duration::from_secs(60),
            dma_mem: 32 << 20,
            mem: MemMode::Auto,
            cmd_sig: false,
            wire: Wire::Loop,
            packed: true,
            freeze_to_rdy: true,
        }
    }
}

fn parse_mac(s: &str) -> Option<[u8; 6]> {
    let v: Vec<u8> = s
        .split(':')
        .map(|p| u8::from_str_radix(p, 16))
        .collect::<std::result::Result<_, _>>()
        .ok()?;
    v.try_into().ok()
}

impl Devargs {
    /// Parses the part after `mlx5:`.
    pub fn parse(params: &str) -> Result<Devargs> {
        let spec = format!("mlx5:{params}");
        let err = |what: String| Error::Spec {
            spec: spec.clone(),
            what,
        };
        let mut a = Devargs::default();
        for kv in params.split(',').filter(|s| !s.is_empty()) {
            let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
            let num = |max: u64| -> Result<u64> {
                v.parse::<u64>()
                    .ok()
                    .filter(|&n| n <= max)
                    .ok_or_else(|| err(format!("{k}={v}: accepted is a number in 0..={max}")))
            };
            let flag = || -> Result<bool> {
                match v {
                    "0" => Ok(false),
                    "1" | "" => Ok(true),
                    _ => Err(err(format!("{k}={v}: accepted is 0 or 1"))),
                }
            };
            match k {
                "model" => {
                    a.model = true;
                    if !v.is_empty() {
                        a.model_name = Some(v.to_string());
                    }
                }
                "vfs" => {
                    let n = num(64)?;
                    if n == 0 {
                        return Err(err("vfs=0: at least one function".into()));
                    }
                    a.vfs = n as u16;
                }
                "vf" => a.vf = Some(num(63)? as u16),
                "poll" => {
                    a.poll = match v {
                        "adaptive" => vdpakit_core::model::PollMode::Adaptive,
                        "busy" => vdpakit_core::model::PollMode::Busy,
                        _ => return Err(err(format!("poll={v}: accepted are adaptive, busy"))),
                    }
                }
                "log" => a.log = flag()?,
                "promisc" => a.promisc = flag()?,
                "pci" => a.pci = Some(v.parse::<Bdf>().map_err(|e| err(format!("pci={v}: {e}")))?),
                "name" if !v.is_empty() => a.name = Some(v.to_string()),
                "queues" => {
                    let n = num(256)?;
                    if n == 0 {
                        return Err(err("queues=0: at least one pair".into()));
                    }
                    a.queues = Some(n as u16);
                }
                "queue_size" => {
                    let n = num(32768)?;
                    if n == 0 || !n.is_power_of_two() {
                        return Err(err(format!(
                            "queue_size={v}: accepted is a power of two in 1..=32768"
                        )));
                    }
                    a.queue_size = n as u16;
                }
                "event_mode" => a.event_mode = v.parse().map_err(err)?,
                "mac" => {
                    a.mac =
                        Some(parse_mac(v).ok_or_else(|| {
                            err(format!("mac={v}: accepted is xx:xx:xx:xx:xx:xx"))
                        })?)
                }
                "mtu" => {
                    let n = num(9000)?;
                    if n < 68 {
                        return Err(err(format!("mtu={v}: accepted is 68..=9000")));
                    }
                    a.mtu = Some(n as u16);
                }
                "hw_latency_mode" => a.moderation.0 = num(2)? as u8,
                "hw_max_latency_us" => a.moderation.1 = num(4095)? as u16,
                "hw_max_pending_comp" => a.moderation.2 = num(65535)? as u16,
                "cmd_timeout_ms" => {
                    let n = num(3_600_000)?;
                    a.cmd_timeout = Duration::from_millis(n.max(1));
                }
                "dma_mem" => {
                    let n = num(4096)?;
                    a.dma_mem = (n.max(1) as usize) << 20;
                }
                "mem" => a.mem = v.parse().map_err(|e| err(format!("{e}")))?,
                "cmd_sig" => a.cmd_sig = flag()?,
                "wire" => {
                    a.wire = match v {
                        "loop" => Wire::Loop,
                        "port" => Wire::Port,
                        "cable" => Wire::Cable,
                        "none" => Wire::None,
                        t if t.starts_with("tap:") && t.len() > 4 && t.len() <= 4 + 13 => {
                            Wire::Tap(t[4..].to_string())
                        }
                        _ => {
                            return Err(err(format!(
                                "wire={v}: accepted are loop, cable, port, tap:IFNAME (1..=13 characters), none"
                            )));
                        }
                    }
                }
                "packed" => a.packed = flag()?,
                "freeze_to_rdy" => a.freeze_to_rdy = flag()?,
                _ => {
                    return Err(err(format!(
                        "unknown key '{k}': accepted are model, pci, name, queues, queue_size, \
                         event_mode, mac, mtu, hw_latency_mode, hw_max_latency_us, hw_max_pending_comp, \
                         cmd_timeout_ms, dma_mem, mem, cmd_sig, promisc, vfs, vf, wire, poll, packed, freeze_to_rdy, log"
                    )));
                }
            }
        }
        if let Some(k) = a.vf
            && k >= a.vfs
            && a.model_name.is_none()
        {
            return Err(err(format!(
                "vf={k}: the model has functions 0..{} (vfs=)",
                a.vfs
            )));
        }
        match (a.model, a.pci.is_some()) {
            (true, true) => Err(err("model and pci= exclude each other".into())),
            (false, false) => Err(err("say which device: model or pci=BDF".into())),
            _ => Ok(a),
        }
    }

    fn hca_options(&self) -> HcaOptions {
        HcaOptions {
            cmd: CmdOptions {
                timeout: self.cmd_timeout,
                checksum: self.cmd_sig,
            },
            dma_mem: self.dma_mem,
            mem_mode: self.mem,
            ..HcaOptions::default()
        }
    }
}

/// The memory a queue key covers: every DMA mapping except the driver's own memory, at key
/// address = IOVA (descriptors carry guest physical addresses, which are the IOVAs).
#[derive(Debug, Clone, Default)]
struct KeyLayout {
    pieces: Vec<KeyPiece>,
}

impl KeyLayout {
    fn new(domain: &DmaDomain, exclude: &[(u64, u64)]) -> KeyLayout {
        let inside = |iova: u64, len: u64, (b, l): (u64, u64)| iova >= b && iova + len <= b + l;
        let mut pieces: Vec<KeyPiece> = domain
            .mappings()
            .into_iter()
            .filter(|m| !exclude.iter().any(|&x| inside(m.iova, m.len, x)))
            .map(|m| KeyPiece {
                va: m.iova,
                iova: m.iova,
                len: m.len,
            })
            .collect();
        pieces.sort_by_key(|p| p.va);
        KeyLayout { pieces }
    }

    /// Whether `[iova, iova + len)` lies in one piece.
    fn covers(&self, iova: u64, len: u64) -> bool {
        self.pieces
            .iter()
            .any(|p| iova >= p.iova && iova - p.iova + len <= p.len)
    }
}

#[derive(Debug)]
struct Base {
    uar: u32,
    pd: u32,
    td: u32,
    tis: u32,
    null_mkey: u32,
}

#[derive(Debug)]
struct Running {
    features: u64,
    keys: KeySet,
    layout: KeyLayout,
    vqs: Vec<Option<Vq>>,
    /// The rings as configured (for marking used rings dirty at switchover).
    rings: Vec<VqConfig>,
    steering: Option<Steering>,
    events: Option<Events>,
    /// Hardware dirty logging, while on.
    log: Option<HwLog>,
}

/// Hardware dirty logging: the front end's bitmap and the key over it.
#[derive(Debug, Clone, Copy)]
struct HwLog {
    conf: LogConfig,
    key: u32,
}

/// An mlx5 function as a vDPA device.
#[derive(Debug)]
pub struct Mlx5Vdpa {
    name: String,
    hca: Hca,
    args: Devargs,
    mac: [u8; 6],
    mtu: u16,
    pairs: u16,
    base: Option<Base>,
    run: Option<Running>,
    doorbell: Doorbell,
    model: Option<Arc<Mlx5Model>>,
    /// The model device the function belongs to (kept alive).
    device: Option<Arc<Mlx5Device>>,
    /// Counts of queue objects already destroyed, by queue index.
    retired: Vec<VqStats>,
}

/// The MSI-X vector of the QP mode's event queue (the driver has no asynchronous EQ, which
/// would otherwise take vector 0; MSI-X mode uses vectors 1.. for the queues).
const EQ_VECTOR: u16 = 0;

/// virtio feature bit → mlx feature bit.
const FEATURE_MAP: [(u64, u32); 9] = [
    (vf::NET_MRG_RXBUF, vq::feat::MRG_RXBUF),
    (vf::NET_HOST_ECN, vq::feat::HOST_ECN),
    (vf::NET_GUEST_ECN, vq::feat::GUEST_ECN),
    (vf::NET_GUEST_TSO6, vq::feat::GUEST_TSO6),
    (vf::NET_GUEST_TSO4, vq::feat::GUEST_TSO4),
    (vf::NET_GUEST_CSUM, vq::feat::GUEST_CSUM),
    (vf::NET_CSUM, vq::feat::CSUM),
    (vf::NET_HOST_TSO6, vq::feat::HOST_TSO6),
    (vf::NET_HOST_TSO4, vq::feat::HOST_TSO4),
];

impl Mlx5Vdpa {
    /// Brings `pci` up and makes the device's base resources.
    pub fn open(pci: PciDevice, args: Devargs) -> Result<Mlx5Vdpa> {
        let hca = Hca::open(pci, &args.hca_options())?;
        let name = args.name.clone().unwrap_or_else(|| hca.name().to_string());
        let caps = hca.caps().virtio.clone();
        let need = match args.event_mode {
            EventMode::Msix => cap::EVENT_MSIX,
            EventMode::Qp => cap::EVENT_QP,
            EventMode::Poll => cap::EVENT_NO_MSIX,
        };
        if caps.event_modes & need == 0 {
            return Err(Error::NotSupported {
                dev: name,
                what: format!(
                    "event mode {:?}: the device offers modes {:#x}",
                    args.event_mode, caps.event_modes
                ),
            });
        }
        let max_pairs = (caps.max_queues / 2)
            .min(1 << hca.caps().general.log_max_rqt_size)
            .min(u32::from(hca.pci().msix_vectors().saturating_sub(1)) / 2)
            .max(1) as u16;
        let pairs = match args.queues {
            Some(q) if q > max_pairs => {
                return Err(Error::Config {
                    dev: name,
                    what: format!("queues={q}: the device has {max_pairs} queue pairs"),
                });
            }
            Some(q) => q,
            None => max_pairs.min(8),
        };
        let doorbell = hca.pci().doorbell(0, caps.doorbell_offset, 2)?;
        let (vmac, vmtu) = hca.query_vport()?;
        let mut dev = Mlx5Vdpa {
            name,
            mac: args.mac.unwrap_or(vmac),
            mtu: args.mtu.unwrap_or(if vmtu >= 68 { vmtu } else { 1500 }),
            hca,
            args,
            pairs,
            base: None,
            run: None,
            doorbell,
            model: None,
            device: None,
            retired: Vec::new(),
        };
        dev.base = Some(dev.make_base()?);
        tracing::info!(
            "{}: mlx5 vDPA device, {} queue pairs, MAC {}",
            dev.name,
            dev.pairs,
            dev.mac
                .iter()
                .map(|b| format!("{b:02x}"))
                .collect::<Vec<_>>()
                .join(":")
        );
        Ok(dev)
    }

    /// The model device a `mlx5:model` spec names: the live one of that name, or a new one built
    /// from the devargs.
    pub fn model_device(args: &Devargs) -> Result<Arc<Mlx5Device>> {
        let mut o = ModelOptions {
            wire: args.wire.clone(),
            packed: args.packed,
            freeze_to_rdy: args.freeze_to_rdy,
            verify_signatures: args.cmd_sig,
            modify_ext: args.log,
            poll: args.poll,
            ..ModelOptions::default()
        };
        if let Some(n) = args.model_name.as_ref().or(args.name.as_ref()) {
            o.name = n.clone();
        }
        if let Some(m) = args.mac {
            o.mac = m;
        }
        if let Some(m) = args.mtu {
            o.mtu = m;
        }
        if let Some(q) = args.queues {
            o.max_queues = o.max_queues.max(2 * u32::from(q));
            o.msix_vectors = o.msix_vectors.max(2 * q + 1);
            let log = (32 - u32::from(q).saturating_sub(1).leading_zeros()) as u8;
            o.log_max_rqt_size = o.log_max_rqt_size.max(log);
        }
        let name = o.name.clone();
        let vfs = args.vfs;
        Mlx5Device::get_or_create(&name, move || Mlx5Device::new(o, vfs))
    }

    /// A device over function `vf` of `model`, opened in a DMA domain of its own.
    pub fn on_model(model: &Arc<Mlx5Device>, vf: u16, args: Devargs) -> Result<Mlx5Vdpa> {
        let Some(f) = model.functions().get(usize::from(vf)).cloned() else {
            return Err(Error::Config {
                dev: model.name().to_string(),
                what: format!(
                    "vf={vf}: the model has functions 0..{}",
                    model.functions().len()
                ),
            });
        };
        let mut args = args;
        if model.functions().len() > 1 {
            args.name = Some(f.options().name.clone());
        }
        let domain = DmaDomain::model();
        let pci = vdpakit_core::pci::model::open(f.clone(), &domain)?;
        let mut dev = Mlx5Vdpa::open(pci, args)?;
        dev.model = Some(f);
        dev.device = Some(Arc::clone(model));
        Ok(dev)
    }

    /// A device over a model in its own DMA domain (`mlx5:model`): function `vf` (default 0).
    pub fn with_model(args: Devargs) -> Result<Mlx5Vdpa> {
        let d = Mlx5Vdpa::model_device(&args)?;
        let vf = args.vf.unwrap_or(0);
        Mlx5Vdpa::on_model(&d, vf, args)
    }

    /// The model behind a `mlx5:model` device.
    pub fn model(&self) -> Option<&Arc<Mlx5Model>> {
        self.model.as_ref()
    }

    /// The QP event mode's counts (None unless configured in QP mode with a call eventfd).
    pub fn event_stats(&self) -> Option<EventStats> {
        self.run
            .as_ref()
            .and_then(|r| r.events.as_ref())
            .map(|e| e.stats())
    }

    /// The QP event mode's objects: the EQ number and, per queue, (index, cqn, firmware QP,
    /// driver QP).
    pub fn event_objects(&self) -> Option<(u8, Vec<ChainIds>)> {
        let e = self.run.as_ref()?.events.as_ref()?;
        Some((
            e.eq.eqn,
            e.chains
                .iter()
                .map(|c| (c.index, c.cqn, c.fw_qpn, c.drv_qpn))
                .collect(),
        ))
    }

    /// The booted function.
    pub fn hca(&self) -> &Hca {
        &self.hca
    }

    /// Queue object ids by virtio index (None: not configured).
    pub fn queue_objects(&self) -> Vec<Option<u32>> {
        self.run.as_ref().map_or_else(Vec::new, |r| {
            r.vqs.iter().map(|v| v.as_ref().map(|q| q.id)).collect()
        })
    }

    fn make_base(&self) -> Result<Base> {
        let h = &self.hca;
        let uar = h.alloc_uar()?;
        let pd = match h.alloc_pd() {
            Ok(x) => x,
            Err(e) => {
                let _ = h.dealloc_uar(uar);
                return Err(e);
            }
        };
        let td = match h.alloc_td() {
            Ok(x) => x,
            Err(e) => {
                let _ = h.dealloc_pd(pd);
                let _ = h.dealloc_uar(uar);
                return Err(e);
            }
        };
        let tis = match h.create_tis(td) {
            Ok(x) => x,
            Err(e) => {
                let _ = h.dealloc_td(td);
                let _ = h.dealloc_pd(pd);
                let _ = h.dealloc_uar(uar);
                return Err(e);
            }
        };
        let null_mkey = match h.null_mkey() {
            Ok(x) => x,
            Err(e) => {
                let _ = h.destroy_tis(tis);
                let _ = h.dealloc_td(td);
                let _ = h.dealloc_pd(pd);
                let _ = h.dealloc_uar(uar);
                return Err(e);
            }
        };
        Ok(Base {
            uar,
            pd,
            td,
            tis,
            null_mkey,
        })
    }

    fn free_base(&mut self) {
        let Some(b) = self.base.take() else { return };
        let h = &self.hca;
        for r in [
            h.destroy_tis(b.tis),
            h.dealloc_td(b.td),
            h.dealloc_pd(b.pd),
            h.dealloc_uar(b.uar),
        ] {
            if let Err(e) = r {
                tracing::warn!("{e}");
            }
        }
    }

    fn cfg_err(&self, what: String) -> VdpaError {
        VdpaError::Config {
            dev: self.name.clone(),
            what,
        }
    }

    fn mlx_features(&self, features: u64) -> u16 {
        let mask = self.hca.caps().virtio.features_mask;
        FEATURE_MAP
            .iter()
            .filter(|(v, m)| features & v != 0 && mask & (1 << m) != 0)
            .fold(0, |a, (_, m)| a | 1 << m)
    }

    /// Builds everything into `run` (which the caller tears down on failure).
    fn build(&mut self, conf: &DevConf, run: &mut Running) -> std::result::Result<(), VdpaError> {
        let base = self
            .base
            .as_ref()
            .map(|b| (b.pd, b.td, b.tis, b.null_mkey, b.uar));
        let Some((pd, td, tis, null_mkey, uar)) = base else {
            return Err(self.cfg_err("device has no base resources".into()));
        };
        macro_rules! t {
            ($e:expr) => {
                $e.map_err(VdpaError::from)?
            };
        }
        let arena = (self.hca.arena().base(), self.hca.arena().len());
        // Queue keys cover guest memory: neither the driver's memory nor the log bitmap.
        let mut exclude = vec![arena];
        if let Some(l) = conf.log {
            exclude.push((l.iova, l.size));
        }
        run.layout = KeyLayout::new(self.hca.pci().domain(), &exclude);
        run.rings = conf.queues.clone();
        run.keys = t!(KeySet::create(
            &self.hca,
            pd,
            null_mkey,
            &run.layout.pieces,
            0x5a
        ));
        let packed = conf.features & vf::RING_PACKED != 0;
        let version_1 = conf.features & vf::VERSION_1 != 0;
        let features = self.mlx_features(conf.features);
        if let Some(l) = conf.log {
            run.log = Some(t!(self.log_key(pd, l)));
        }
        let dirty = run.log.map(|h| (h.key, h.conf.iova, h.conf.size as u32));
        let nq = conf
            .queues
            .iter()
            .map(|q| usize::from(q.index) + 1)
            .max()
            .unwrap_or(0);
        run.vqs.resize_with(nq, || None);
        let mut fds: Vec<Option<Arc<OwnedFd>>> = Vec::new();
        if self.args.event_mode == EventMode::Qp {
            let calls: Vec<(u16, Arc<OwnedFd>)> = conf
                .queues
                .iter()
                .filter_map(|q| q.call.clone().map(|c| (q.index, c)))
                .collect();
            if !calls.is_empty() {
                let ev = t!(Events::create(
                    &self.hca,
                    EventBase { pd, uar, null_mkey },
                    EQ_VECTOR,
                    &calls
                ));
                fds = vec![Some(ev.irq_fd())];
                run.events = Some(ev);
            }
        }
        for q in &conf.queues {
            let va = |iova: u64, len: u64, what: &str| {
                if run.layout.covers(iova, len) {
                    Ok(iova)
                } else {
                    Err(self.cfg_err(format!(
                        "queue {}: {what} at IOVA {iova:#x} is not DMA-mapped",
                        q.index
                    )))
                }
            };
            let (dl, al, ul) = vdpakit_core::virtio::ring_sizes(q.size, packed, false);
            let desc = va(q.desc, dl, "descriptor table")?;
            let avail = va(q.driver, al, "driver area")?;
            let used = va(q.device, ul, "device area")?;
            let msix = self.args.event_mode == EventMode::Msix && q.call.is_some();
            let vector = u32::from(q.index) + 1;
            let qpn = run.events.as_ref().and_then(|e| e.fw_qpn(q.index));
            if msix {
                let v = vector as usize;
                if fds.len() <= v {
                    fds.resize(v + 1, None);
                }
                fds[v] = q.call.clone();
            }
            let attr = VirtqAttr {
                index: q.index,
                size: q.size,
                packed,
                version_1,
                features,
                event_mode: match (msix, qpn) {
                    (true, _) => vq::EVENT_MSIX,
                    (_, Some(_)) => vq::EVENT_QP,
                    _ => vq::EVENT_NO_MSIX,
                },
                event_target: match (msix, qpn) {
                    (true, _) => vector,
                    (_, Some(qpn)) => qpn,
                    _ => 0,
                },
                desc,
                avail,
                used,
                mkey: run.keys.key,
                avail_idx: q.avail_idx,
                used_idx: q.used_idx,
                tisn: if q.index % 2 == 1 { tis } else { 0 },
                pd,
                moderation: self.args.moderation,
                dirty_bitmap: dirty.unwrap_or_default(),
                dirty_dump: dirty.is_some(),
                ..Default::default()
            };
            let v = t!(Vq::create(&self.hca, &attr));
            run.vqs[usize::from(q.index)] = Some(v);
        }
        if run.vqs.iter().step_by(2).flatten().next().is_none() {
            return Err(self.cfg_err("no receive queue configured".into()));
        }
        let enabled: Vec<u16> = conf
            .queues
            .iter()
            .filter(|q| q.enabled)
            .map(|q| q.index)
            .collect();
        let rqt = rqt_list(&run.vqs, |v| enabled.contains(&v.index));
        run.steering = Some(t!(Steering::create(
            &self.hca,
            td,
            &rqt,
            self.pairs,
            self.mac,
            self.args.promisc
        )));
        t!(self.hca.pci().set_msix(&fds));
        if let Some(ev) = run.events.as_mut() {
            t!(ev.start(&self.hca));
        }
        for q in conf.queues.iter().filter(|q| q.enabled) {
            if let Some(v) = run.vqs[usize::from(q.index)].as_mut() {
                t!(v.set_state(&self.hca, vq::STATE_RDY));
            }
        }
        // A queue the device could not start is in ERR now: say so.
        for v in run
            .vqs
            .iter()
            .flatten()
            .filter(|v| v.state == vq::STATE_RDY)
        {
            let a = t!(self.hca.query_virtq(v.id));
            if a.state != vq::STATE_RDY {
                return Err(VdpaError::Device {
                    dev: self.name.clone(),
                    what: format!(
                        "queue {} went to {} (error type {}) when made ready: its rings do not translate \
                         through the memory key",
                        v.index,
                        state_name(a.state),
                        a.error_type
                    ),
                });
            }
        }
        Ok(())
    }

    fn teardown(&mut self, mut run: Running) -> Result<()> {
        let mut first: Option<Error> = None;
        if let Some(ev) = run.events.as_mut() {
            ev.stop();
        }
        if let Err(e) = self.hca.pci().set_msix(&[]) {
            first.get_or_insert(e.into());
        }
        if let Some(mut s) = run.steering.take() {
            s.destroy(&self.hca);
        }
        for v in run.vqs.drain(..).rev().flatten() {
            // Counters outlive the queue object: keep what it counted.
            match self.hca.query_counters(v.counters) {
                Ok(c) => {
                    let i = usize::from(v.index);
                    if self.retired.len() <= i {
                        self.retired.resize(i + 1, VqStats::default());
                    }
                    let t = &mut self.retired[i];
                    let s = to_stats(&c);
                    t.packets += s.packets;
                    t.errors += s.errors;
                }
                Err(e) => tracing::warn!("{e}"),
            }
            if let Err(e) = v.destroy(&self.hca) {
                tracing::warn!("{e}");
                first.get_or_insert(e);
            }
        }
        // The queue objects named the firmware QPs: the chains go after them.
        if let Some(ev) = run.events.take() {
            let s = ev.stats();
            tracing::info!(
                "{}: QP events: {} wakeups, {} EQEs, {} CQEs, {} signals, {} errors",
                self.name,
                s.wakeups,
                s.eqes,
                s.cqes,
                s.signals,
                s.errors
            );
            if let Err(e) = ev.destroy(&self.hca) {
                tracing::warn!("{e}");
                first.get_or_insert(e);
            }
        }
        run.keys.destroy(&self.hca);
        if let Some(h) = run.log.take()
            && let Err(e) = self.hca.destroy_mkey(h.key)
        {
            tracing::warn!("{e}");
            first.get_or_insert(e);
        }
        first.map_or(Ok(()), Err)
    }

    /// The key over the front end's log bitmap (the bitmap's IOVAs as key addresses).
    fn log_key(&self, pd: u32, l: LogConfig) -> Result<HwLog> {
        if l.size == 0 || l.size > u64::from(u32::MAX) {
            return Err(Error::Config {
                dev: self.name.clone(),
                what: format!(
                    "dirty log of {} bytes: accepted is 1..=4 GiB (dirty_bitmap_size is 32 bits)",
                    l.size
                ),
            });
        }
        let key = self.hca.create_mtt_mkey(
            pd,
            KeyPiece {
                va: l.iova,
                iova: l.iova,
                len: l.size,
            },
            0x1d,
        )?;
        Ok(HwLog { conf: l, key })
    }

    /// Turns hardware dirty logging on (`Some`) or off for every queue: DIRTY_BITMAP_PARAMS
    /// (the bitmap's key, address and size) then DIRTY_BITMAP_DUMP_ENABLE; off in reverse,
    /// clearing the parameters so the key can go.
    fn set_log(&mut self, log: Option<LogConfig>) -> std::result::Result<(), VdpaError> {
        let Some(base) = self.base.as_ref().map(|b| b.pd) else {
            return Ok(());
        };
        let Some(run) = self.run.as_mut() else {
            return Ok(());
        };
        if run.log.map(|h| h.conf) == log {
            return Ok(());
        }
        let ids: Vec<u32> = run
            .vqs
            .iter()
            .flatten()
            .filter(|v| v.state != vq::STATE_ERR)
            .map(|v| v.id)
            .collect();
        if let Some(h) = run.log.take() {
            for &id in &ids {
                self.hca.modify_virtq(
                    id,
                    vq::sel::DIRTY_BITMAP_DUMP_ENABLE,
                    &VirtqAttr::default(),
                )?;
                self.hca
                    .modify_virtq(id, vq::sel::DIRTY_BITMAP_PARAMS, &VirtqAttr::default())?;
            }
            self.hca.destroy_mkey(h.key)?;
            tracing::info!("{}: hardware dirty logging off", self.name);
        }
        let Some(l) = log else { return Ok(()) };
        let h = self.log_key(base, l)?;
        let on = VirtqAttr {
            dirty_bitmap: (h.key, l.iova, l.size as u32),
            dirty_dump: true,
            ..Default::default()
        };
        for &id in &ids {
            let r = self
                .hca
                .modify_virtq(id, vq::sel::DIRTY_BITMAP_PARAMS, &on)
                .and_then(|()| {
                    self.hca
                        .modify_virtq(id, vq::sel::DIRTY_BITMAP_DUMP_ENABLE, &on)
                });
            if let Err(e) = r {
                // Leave the key to teardown: queues may name it already.
                if let Some(run) = self.run.as_mut() {
                    run.log = Some(h);
                }
                return Err(e.into());
            }
        }
        tracing::info!(
            "{}: hardware dirty logging on: bitmap at IOVA {:#x} ({} bytes) through key {:#x}, {} queues",
            self.name,
            l.iova,
            l.size,
            h.key,
            ids.len()
        );
        if let Some(run) = self.run.as_mut() {
            run.log = Some(h);
        }
        Ok(())
    }

    /// At switchover (a ring's position read while logging): the device stopped writing the
    /// ring, and software marks all of it dirty (split: the used ring, 6 + 8 × size bytes;
    /// packed: the descriptor ring the device writes used entries into), as the reference
    /// sequence does. Returns the bytes marked.
    fn mark_used_ring(&self, qid: u16) -> u64 {
        let Some(run) = self.run.as_ref() else {
            return 0;
        };
        let (Some(h), Some(r)) = (run.log, run.rings.iter().find(|r| r.index == qid)) else {
            return 0;
        };
        let (_, view) = self.hca.pci().domain().view();
        let Some(log) =
            vdpakit_core::virtio::DirtyLog::from_memory(&view, h.conf.iova, h.conf.size)
        else {
            tracing::warn!(
                "{}: the dirty log at IOVA {:#x} is not mapped: used ring {qid} not marked",
                self.name,
                h.conf.iova
            );
            return 0;
        };
        let (at, len) = if run.features & vf::RING_PACKED != 0 {
            (r.desc, 16 * u64::from(r.size))
        } else {
            (r.device, 6 + 8 * u64::from(r.size))
        };
        log.mark(at, len);
        len
    }

    fn vq_mut(&mut self, qid: u16) -> std::result::Result<&mut Vq, VdpaError> {
        let count = self.pairs * 2;
        let name = self.name.clone();
        self.run
            .as_mut()
            .and_then(|r| r.vqs.get_mut(usize::from(qid)))
            .and_then(|v| v.as_mut())
            .ok_or(VdpaError::BadQueue {
                dev: name,
                qid,
                count,
            })
    }

    /// Moves every queue in state `from` to `to`: transmit queues first when stopping, receive
    /// queues first when starting, so no frame in flight finds its receive queue stopped.
    fn set_all(&mut self, from: u8, to: u8) -> std::result::Result<(), VdpaError> {
        let Some(run) = self.run.as_mut() else {
            return Ok(());
        };
        let first = if to == vq::STATE_RDY { 0 } else { 1 };
        for parity in [first, 1 - first] {
            for v in run
                .vqs
                .iter_mut()
                .flatten()
                .filter(|v| v.state == from && v.index % 2 == parity)
            {
                v.set_state(&self.hca, to)?;
            }
        }
        Ok(())
    }
}

impl Drop for Mlx5Vdpa {
    fn drop(&mut self) {
        if let Some(run) = self.run.take()
            && let Err(e) = self.teardown(run)
        {
            tracing::warn!("{}: teardown: {e}", self.name);
        }
        self.free_base();
        if let Err(e) = self.hca.close() {
            tracing::warn!("{}: {e}", self.name);
        }
    }
}

impl VdpaDevice for Mlx5Vdpa {
    fn name(&self) -> &str {
        &self.name
    }

    fn max_queue_pairs(&self) -> u16 {
        self.pairs
    }

    fn max_queue_size(&self) -> u16 {
        self.args.queue_size
    }

    fn features(&self) -> u64 {
        let c = &self.hca.caps().virtio;
        let mut f = vf::ANY_LAYOUT
            | vf::NET_MAC
            | vf::NET_MTU
            | vf::NET_STATUS
            | vf::VHOST_F_LOG_ALL
            | vf::ORDER_PLATFORM;
        if c.version_1 {
            f |= vf::VERSION_1;
        }
        if c.queue_types & cap::QUEUE_PACKED != 0 {
            f |= vf::RING_PACKED;
        }
        if self.pairs > 1 {
            f |= vf::NET_MQ;
        }
        for (v, m) in FEATURE_MAP {
            if c.features_mask & (1 << m) != 0 {
                f |= v;
            }
        }
        f
    }

    fn protocol_features(&self) -> u64 {
        proto::MQ
            | proto::LOG_SHMFD
            | proto::REPLY_ACK
            | proto::NET_MTU
            | proto::BACKEND_REQ
            | proto::BACKEND_SEND_FD
            | proto::HOST_NOTIFIER
            | proto::CONFIGURE_MEM_SLOTS
            | proto::STATUS
    }

    fn net_config(&self) -> NetDevConfig {
        NetDevConfig {
            mac: self.mac,
            status: 1,
            max_queue_pairs: self.pairs,
            mtu: self.mtu,
        }
    }

    fn domain(&self) -> &DmaDomain {
        self.hca.pci().domain()
    }

    /// Hardware logging when the function can modify ready queues (vnet_modify_ext: the
    /// dirty bitmap fields change on running queues when migration starts); else the
    /// binding's software relay.
    fn log_support(&self) -> LogSupport {
        if self.hca.caps().virtio.modify_ext {
            LogSupport::Hardware
        } else {
            LogSupport::None
        }
    }

    fn configure(&mut self, conf: &DevConf) -> std::result::Result<(), VdpaError> {
        if let Some(run) = self.run.take() {
            self.teardown(run)?;
        }
        let packed = conf.features & vf::RING_PACKED != 0;
        let c = self.hca.caps().virtio.clone();
        if packed && c.queue_types & cap::QUEUE_PACKED == 0 {
            return Err(
                self.cfg_err("packed rings negotiated, the device has split rings only".into())
            );
        }
        if conf.log.is_some() && self.log_support() != LogSupport::Hardware {
            return Err(VdpaError::Unsupported {
                dev: self.name.clone(),
                what: "dirty page logging in hardware (vnet_modify_ext is 0)".into(),
            });
        }
        for q in &conf.queues {
            if q.index >= self.pairs * 2 {
                return Err(VdpaError::BadQueue {
                    dev: self.name.clone(),
                    qid: q.index,
                    count: self.pairs * 2,
                });
            }
            if q.size == 0
                || q.size > self.args.queue_size
                || (!packed && !q.size.is_power_of_two())
            {
                return Err(self.cfg_err(format!(
                    "queue {}: ring size {} (accepted: {}1..={})",
                    q.index,
                    q.size,
                    if packed { "" } else { "a power of two in " },
                    self.args.queue_size
                )));
            }
        }
        let mut run = Running {
            features: conf.features,
            keys: KeySet::default(),
            layout: KeyLayout::default(),
            vqs: Vec::new(),
            rings: Vec::new(),
            steering: None,
            events: None,
            log: None,
        };
        match self.build(conf, &mut run) {
            Ok(()) => {
                tracing::info!(
                    "{}: configured {} queues (features {:#x}, key {:#x} over {} pieces, {})",
                    self.name,
                    conf.queues.len(),
                    conf.features,
                    run.keys.key,
                    run.layout.pieces.len(),
                    match (&run.events, self.args.event_mode) {
                        (Some(e), _) => format!(
                            "event mode Qp: EQ {} on vector {}, {} chains",
                            e.eq.eqn,
                            e.eq.vector,
                            e.chains.len()
                        ),
                        (None, m) => format!("event mode {m:?}"),
                    }
                );
                self.run = Some(run);
                Ok(())
            }
            Err(e) => {
                if let Err(u) = self.teardown(run) {
                    tracing::warn!("{}: undoing a failed configure: {u}", self.name);
                }
                Err(e)
            }
        }
    }

    fn set_vring_state(&mut self, qid: u16, enable: bool) -> std::result::Result<(), VdpaError> {
        let resumable = self.hca.caps().virtio.freeze_to_rdy;
        let name = self.name.clone();
        let v = self.vq_mut(qid)?;
        let (from, to) = (
            v.state,
            if enable {
                vq::STATE_RDY
            } else {
                vq::STATE_SUSPEND
            },
        );
        if from == to || (from == vq::STATE_INIT && !enable) {
            return Ok(());
        }
        if from == vq::STATE_SUSPEND && enable && !resumable {
            return Err(VdpaError::Unsupported {
                dev: name,
                what: format!(
                    "re-enabling queue {qid} (the device cannot resume a suspended queue)"
                ),
            });
        }
        let id = v.id;
        self.hca.set_virtq_state(id, to)?;
        self.vq_mut(qid)?.state = to;
        // Receive queues coming and going (queue pairs changed): the RQT follows.
        if qid.is_multiple_of(2)
            && let Some(run) = self.run.as_ref()
            && let Some(s) = run.steering.as_ref()
        {
            let list = rqt_list(&run.vqs, |v| v.state == vq::STATE_RDY);
            s.set_queues(&self.hca, &list)?;
        }
        Ok(())
    }

    fn set_features(
        &mut self,
        features: u64,
        log: Option<LogConfig>,
    ) -> std::result::Result<(), VdpaError> {
        let cur = self.run.as_ref().map_or(features, |r| r.features);
        if (features ^ cur) & !vf::VHOST_F_LOG_ALL != 0 {
            return Err(VdpaError::Unsupported {
                dev: self.name.clone(),
                what: format!("changing features from {cur:#x} to {features:#x} while running"),
            });
        }
        if log.is_some() && self.log_support() != LogSupport::Hardware {
            return Err(VdpaError::Unsupported {
                dev: self.name.clone(),
                what: "dirty page logging in hardware (vnet_modify_ext is 0)".into(),
            });
        }
        self.set_log(log)?;
        if let Some(run) = self.run.as_mut() {
            run.features = features;
        }
        Ok(())
    }

    fn vring_state(&mut self, qid: u16) -> std::result::Result<VqState, VdpaError> {
        let id = self.vq_mut(qid)?.id;
        let mut a = self.hca.query_virtq(id)?;
        // The position is final only once the queue stops.
        if a.state == vq::STATE_RDY {
            self.hca.set_virtq_state(id, vq::STATE_SUSPEND)?;
            self.vq_mut(qid)?.state = vq::STATE_SUSPEND;
            a = self.hca.query_virtq(id)?;
        }
        if a.state == vq::STATE_ERR {
            return Err(VdpaError::Device {
                dev: self.name.clone(),
                what: format!("queue {qid} is in ERR (error type {})", a.error_type),
            });
        }
        self.mark_used_ring(qid);
        Ok(VqState {
            avail_idx: a.avail_idx,
            used_idx: a.used_idx,
        })
    }

    fn close(&mut self) -> std::result::Result<(), VdpaError> {
        if let Some(run) = self.run.take() {
            self.teardown(run)?;
        }
        Ok(())
    }

    fn doorbell(&self, qid: u16) -> std::result::Result<(Doorbell, u32), VdpaError> {
        if qid >= self.pairs * 2 {
            return Err(VdpaError::BadQueue {
                dev: self.name.clone(),
                qid,
                count: self.pairs * 2,
            });
        }
        Ok((self.doorbell.clone(), u32::from(qid)))
    }

    /// The doorbell page (every queue's: the queue index written there), when the function
    /// lets it be mapped (a model's shared doorbell page; a VFIO BAR page).
    fn notify_area(&self, qid: u16) -> Option<NotifyArea> {
        if qid >= self.pairs * 2 {
            return None;
        }
        let off = self.hca.caps().virtio.doorbell_offset;
        self.hca.pci().notify_area(0, off, 4)
    }

    fn stats(&self, qid: u16) -> std::result::Result<VqStats, VdpaError> {
        if qid >= self.pairs * 2 {
            return Err(VdpaError::BadQueue {
                dev: self.name.clone(),
                qid,
                count: self.pairs * 2,
            });
        }
        let mut s = self
            .retired
            .get(usize::from(qid))
            .copied()
            .unwrap_or_default();
        if let Some(v) = self
            .run
            .as_ref()
            .and_then(|r| r.vqs.get(usize::from(qid)))
            .and_then(|v| v.as_ref())
        {
            let c = to_stats(&self.hca.query_counters(v.counters)?);
            s.packets += c.packets;
            s.errors += c.errors;
        }
        // A model also tells how many doorbells it saw (hardware counters have no such field).
        if let Some(m) = &self.model {
            s.kicks = m.kicks(qid);
        }
        Ok(s)
    }

    fn suspend(&mut self) -> std::result::Result<(), VdpaError> {
        self.set_all(vq::STATE_RDY, vq::STATE_SUSPEND)
    }

    fn resume(&mut self) -> std::result::Result<(), VdpaError> {
        if !self.hca.caps().virtio.freeze_to_rdy {
            return Err(VdpaError::Unsupported {
                dev: self.name.clone(),
                what: "resume (freeze_to_rdy_supported is 0)".into(),
            });
        }
        self.set_all(vq::STATE_SUSPEND, vq::STATE_RDY)
    }
}

/// The RQT entries: the receive queues `pick` selects (all of them if it selects none),
/// repeated to a power of two so a hash spreads evenly.
fn rqt_list(vqs: &[Option<Vq>], pick: impl Fn(&Vq) -> bool) -> Vec<u32> {
    let all: Vec<&Vq> = vqs.iter().step_by(2).flatten().collect();
    let mut rx: Vec<u32> = all.iter().filter(|v| pick(v)).map(|v| v.id).collect();
    if rx.is_empty() {
        rx = all.iter().map(|v| v.id).collect();
    }
    let n = rx.len().next_power_of_two();
    rx.iter().cycle().take(n).copied().collect()
}

/// Counters as the framework reports them (the device counts chains, not bytes).
fn to_stats(c: &QCounters) -> VqStats {
    VqStats {
        packets: c.completed_desc,
        errors: u64::from(c.bad_desc_errors)
            + u64::from(c.invalid_buffer)
            + u64::from(c.exceed_max_chain)
            + u64::from(c.error_cqes),
        ..VqStats::default()
    }
}

/// Creates the devices of an `mlx5:` spec (`model` or `pci=BDF`, with devargs).
pub fn create(params: &str) -> Result<Vec<Box<dyn VdpaDevice>>> {
    let args = Devargs::parse(params)?;
    if args.model {
        let d = Mlx5Vdpa::model_device(&args)?;
        let vfs: Vec<u16> = match args.vf {
            Some(k) => vec![k],
            None => (0..d.functions().len() as u16).collect(),
        };
        let mut out: Vec<Box<dyn VdpaDevice>> = Vec::new();
        for k in vfs {
            out.push(Box::new(Mlx5Vdpa::on_model(&d, k, args.clone())?));
        }
        return Ok(out);
    }
    Ok(vec![Box::new(create_pci(args)?)])
}

/// A device over the function `args.pci` names (bound to vfio-pci), in a VFIO DMA domain of
/// its own.
pub fn create_pci(args: Devargs) -> Result<Mlx5Vdpa> {
    let bdf = args.pci.ok_or_else(|| Error::Spec {
        spec: "mlx5:".into(),
        what: "pci=BDF missing".into(),
    })?;
    let domain = DmaDomain::vfio()?;
    let pci = PciDevice::open_vfio(bdf, &domain)?;
    Mlx5Vdpa::open(pci, args)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn devargs() {
        let a = Devargs::parse(
            "model,queues=4,queue_size=512,event_mode=poll,mac=02:00:00:00:00:09,mtu=9000,\
             hw_latency_mode=2,hw_max_latency_us=30,hw_max_pending_comp=64,wire=port,packed=0",
        )
        .unwrap();
        assert!(a.model && a.pci.is_none());
        assert_eq!(a.queues, Some(4));
        assert_eq!(a.queue_size, 512);
        assert_eq!(a.event_mode, EventMode::Poll);
        assert_eq!(a.mac, Some([2, 0, 0, 0, 0, 9]));
        assert_eq!(a.mtu, Some(9000));
        assert_eq!(a.moderation, (2, 30, 64));
        assert_eq!(a.wire, Wire::Port);
        assert!(!a.packed);
        let a =
            Devargs::parse("pci=0000:03:00.2,cmd_timeout_ms=500,dma_mem=64,mem=no-huge").unwrap();
        assert_eq!(
            a.pci.map(|b| b.to_string()).as_deref(),
            Some("0000:03:00.2")
        );
        assert_eq!(a.cmd_timeout, Duration::from_millis(500));
        assert_eq!(a.dma_mem, 64 << 20);
        for (bad, says) in [
            ("", "say which device"),
            ("model,pci=03:00.0", "exclude each other"),
            ("model,queue_size=100", "power of two"),
            ("model,queues=0", "at least one pair"),
            ("model,event_mode=irq", "accepted are msix, poll, qp"),
            ("model,mac=1:2", "xx:xx:xx:xx:xx:xx"),
            ("model,mtu=20", "68..=9000"),
            ("model,colour=red", "unknown key 'colour'"),
            ("pci=zz", "pci=zz"),
            ("model,hw_max_latency_us=5000", "0..=4095"),
        ] {
            let e = Devargs::parse(bad).unwrap_err().to_string();
            assert!(
                e.starts_with(&format!("invalid mlx5 device spec 'mlx5:{bad}'")),
                "{e}"
            );
            assert!(e.contains(says), "{bad}: {e}");
        }
    }
}

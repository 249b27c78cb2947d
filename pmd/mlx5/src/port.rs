//! The `vdpakit fwd` port over an mlx5 function (`mlx5:pci=BDF[,queues=N]`, a function bound to
//! vfio-pci, or `mlx5:model[,...]`, the model): vdpakit is the NIC's driver.
//!
//! The function is brought up when the port is created (caps, pages, base resources). `start`
//! lays every ring out in a segment of vdpakit's, DMA-maps that segment and the `fwd` mbuf pool
//! in the function's domain (IOVA = VA, or compact IOVAs when the domain's aperture is small:
//! `vdpakit_pmd_virtio::iova`), and configures the device through its `VdpaDevice` contract with
//! those rings: memory keys over the two mappings, one VIRTIO_NET_Q per ring in NO_MSIX mode
//! (polled: no interrupts), steering (promiscuous by default, as testpmd's ports are), every
//! queue made ready. The queues are the virtio port's datapath over vdpakit-owned rings
//! (`vdpakit_pmd_virtio::port::RingQueues`): receive reaps used buffers and refills in one
//! publish, transmit posts one descriptor per packet and writes the doorbell page (the queue
//! index) at most once per burst. `stop` destroys the queue objects (the device stops touching
//! vdpakit memory) before any buffer is freed, then unmaps.

use std::sync::{Arc, Mutex};

use vdpakit_core::error::{Error as CoreError, Result as CoreResult};
use vdpakit_core::mbuf::Mbuf;
use vdpakit_core::mem::{MemMode, Segment};
use vdpakit_core::mempool::Mempool;
use vdpakit_core::port::{
    ExternalKind, LinkStatus, Port, PortConf, PortEnv, PortKind, PortSpec, PortState, PortStats,
    QueuePair, SpecArgs, StatsBlocks,
};
use vdpakit_core::vdpa::{DevConf, VdpaDevice, VqConfig};
use vdpakit_core::virtio::features as vf;
use vdpakit_core::virtio::{DriverQueue, GuestMemory, QueueConfig, ring_layout};
use vdpakit_pmd_virtio::iova::{DmaSpace, IovaMode};
use vdpakit_pmd_virtio::port::{RingEnd, RingQueues};

use crate::vdpa::{Devargs, EventMode, Mlx5Vdpa};

/// Keys of the `mlx5` port kind.
pub const PORT_KEYS: &[(&str, &str)] = &[
    (
        "pci",
        "PCI address of the function, bound to vfio-pci (vdpakit devices bind BDF)",
    ),
    (
        "model",
        "the device model instead of a PCI function: bare, or model=NAME (created on first use, found by name after)",
    ),
    (
        "name",
        "name of the model with a bare `model` key (default: mlx5-model)",
    ),
    (
        "vfs",
        "functions of a new model (default 1; 2 with wire=cable)",
    ),
    ("vf", "function of the model this port drives (default 0)"),
    (
        "wire",
        "model: loop, cable (function 2k with 2k+1), tap:IFNAME or none (default loop; cable with vfs>1)",
    ),
    (
        "poll",
        "model: adaptive or busy, the engine thread's polling (default adaptive)",
    ),
    (
        "queues",
        "queue pairs, 1..=the device's (default: --queues)",
    ),
    (
        "queue_size",
        "entries per ring (default: --rxd/--txd, at most 32768)",
    ),
    (
        "packed",
        "1: packed rings (the device must offer them); 0 (default): split",
    ),
    ("mac", "the function's MAC (default: its vport's)"),
    (
        "promisc",
        "1 (default): every received frame to the port, as testpmd's ports; 0: its MAC and multicast only",
    ),
    ("dma_mem", "driver memory in MiB (default 32)"),
];

/// The `mlx5` port kind of `vdpakit fwd`.
pub const PORT_KIND: ExternalKind = ExternalKind {
    kind: PortKind {
        name: "mlx5",
        about: "an NVIDIA mlx5 vDPA function (ConnectX-6 Dx/Lx, ConnectX-7, BlueField) through VFIO or its model, driven by vdpakit (rings in vdpakit memory, polled)",
        keys: PORT_KEYS,
    },
    create: create_port,
};

fn invalid(key: &str, value: &str, accepted: &str) -> CoreError {
    CoreError::PortValue {
        kind: "mlx5".into(),
        key: key.into(),
        value: value.into(),
        accepted: accepted.into(),
    }
}

/// The devargs a port spec implies (event mode poll; the port-only keys left out).
fn devargs(a: &SpecArgs<'_>, name: &str) -> CoreResult<Devargs> {
    let mut items: Vec<String> = Vec::new();
    match (a.get("model"), a.get("pci")) {
        (Some(_), Some(_)) => {
            return Err(invalid(
                "pci",
                a.get("pci").unwrap_or(""),
                "either pci=BDF or model, not both",
            ));
        }
        (None, None) => {
            return Err(invalid(
                "pci",
                "",
                "a PCI address bound to vfio-pci (pci=0000:01:00.0), or model",
            ));
        }
        (Some(""), None) => items.push(format!("model={}", a.get("name").unwrap_or("mlx5-model"))),
        (Some(m), None) => items.push(format!("model={m}")),
        (None, Some(p)) => items.push(format!("pci={p}")),
    }
    let cable = a.get("wire") == Some("cable");
    if a.get("model").is_some() && a.get("vfs").is_none() && cable {
        items.push("vfs=2".into());
    }
    for k in ["vfs", "vf", "wire", "poll", "mac", "dma_mem"] {
        if let Some(v) = a.get(k) {
            items.push(format!("{k}={v}"));
        }
    }
    items.push(format!(
        "promisc={}",
        a.choice("promisc", "1", &["0", "1"])?
    ));
    items.push("event_mode=poll".into());
    let text = items.join(",");
    Devargs::parse(&text).map_err(|e| CoreError::PortConfig {
        port: name.to_string(),
        why: e.to_string(),
    })
}

fn create_port(spec: &PortSpec, env: &PortEnv) -> CoreResult<Box<dyn Port>> {
    let a = spec.args(PORT_KEYS)?;
    let name = spec.text().to_string();
    let args = devargs(&a, &name)?;
    let err = |e: crate::Error| CoreError::PortConfig {
        port: name.clone(),
        why: e.to_string(),
    };
    let dev = if args.model {
        let vf = args.vf.unwrap_or(0);
        let model = Mlx5Vdpa::model_device(&args).map_err(err)?;
        Mlx5Vdpa::on_model(&model, vf, args.clone()).map_err(err)?
    } else {
        crate::vdpa::create_pci(args.clone()).map_err(err)?
    };
    let max = dev.max_queue_pairs().max(1);
    let pairs = match a.get("queues") {
        None => None,
        Some(_) => Some(a.u64_in("queues", 1, 1..=u64::from(max))? as u16),
    };
    let packed = a.choice("packed", "0", &["0", "1"])? == "1";
    if packed && dev.features() & vf::RING_PACKED == 0 {
        return Err(invalid(
            "packed",
            "1",
            &format!("0: {} has split rings only", dev.name()),
        ));
    }
    let size = match a.get("queue_size") {
        None => None,
        Some(v) => {
            let n = a.u64_in("queue_size", 256, 1..=32768)? as u16;
            if !packed && !n.is_power_of_two() {
                return Err(invalid("queue_size", v, "a power of two in 1..=32768"));
            }
            Some(n)
        }
    };
    let mac = dev.net_config().mac;
    Ok(Box::new(Mlx5Port {
        name,
        dev,
        mac,
        pairs,
        size,
        packed,
        event_mode: args.event_mode,
        port_id: env.port_id,
        pool: Arc::clone(&env.pool),
        cache_size: env.cache_size,
        conf: PortConf::default(),
        state: PortState::New,
        stats: StatsBlocks::default(),
        run: None,
    }))
}

struct Run {
    queues: Option<Vec<QueuePair>>,
    parked: Arc<Mutex<Vec<Mbuf>>>,
    // Dropped after the queues: the rings and windows outlive every descriptor.
    _ring_seg: Arc<Segment>,
    space: DmaSpace,
}

/// See the module documentation.
pub struct Mlx5Port {
    name: String,
    dev: Mlx5Vdpa,
    mac: [u8; 6],
    pairs: Option<u16>,
    size: Option<u16>,
    packed: bool,
    event_mode: EventMode,
    port_id: u16,
    pool: Arc<Mempool>,
    cache_size: u32,
    conf: PortConf,
    state: PortState,
    stats: StatsBlocks,
    run: Option<Run>,
}

impl std::fmt::Debug for Mlx5Port {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Mlx5Port")
            .field("name", &self.name)
            .field("device", &self.dev.name())
            .field("state", &self.state)
            .finish()
    }
}

impl Mlx5Port {
    /// The device (counters, model).
    pub fn device(&self) -> &Mlx5Vdpa {
        &self.dev
    }

    fn err(&self, why: String) -> CoreError {
        CoreError::PortConfig {
            port: self.name.clone(),
            why,
        }
    }

    fn ring_size(&self, want: u16) -> u16 {
        let n = self
            .size
            .unwrap_or(want)
            .min(self.dev.max_queue_size())
            .max(1);
        if self.packed {
            n
        } else {
            1 << (15 - n.leading_zeros().min(15))
        }
    }

    fn bring_up(&mut self) -> CoreResult<Run> {
        let pairs = self.conf.rx_queues;
        let features = vf::VERSION_1
            | if self.packed { vf::RING_PACKED } else { 0 }
            | if pairs > 1 { vf::NET_MQ } else { 0 };
        let hdr = 12;
        let mut plan: Vec<(u16, u16)> = Vec::new();
        for p in 0..pairs {
            plan.push((2 * p, self.ring_size(self.conf.rx_desc)));
            plan.push((2 * p + 1, self.ring_size(self.conf.tx_desc)));
        }
        let mut offs = Vec::new();
        let mut next = 0u64;
        for &(_, size) in &plan {
            offs.push(next);
            next += ring_layout(size, self.packed, false)
                .total
                .next_multiple_of(4096);
        }
        let ring_seg = Segment::new(
            &format!("mlx5-{}-rings", self.port_id),
            next as usize,
            MemMode::NoHuge,
        )
        .map_err(|e| self.err(format!("ring memory: {e}")))?;
        let dev_name = self.dev.name().to_string();
        let perr = |e: vdpakit_pmd_virtio::PmdError| e.into_port(&self.name);
        let mut space = DmaSpace::new(&dev_name, self.dev.domain(), IovaMode::Va);
        let (_, ring_regions) = space.map(&ring_seg).map_err(perr)?;
        let pool_seg = Arc::clone(self.pool.zone().segment());
        let (pool_x, _) = space.map(&pool_seg).map_err(perr)?;
        let ring_mem = GuestMemory::new(ring_regions)
            .map_err(|e| self.err(format!("ring memory table: {e}")))?;
        let mut drivers = Vec::new();
        let mut queues = Vec::new();
        let start = if self.packed { 0x8000 } else { 0 };
        for (&(q, size), &off) in plan.iter().zip(&offs) {
            let base = ring_mem
                .uva_to_gpa(ring_seg.base() as u64 + off)
                .ok_or_else(|| self.err(format!("ring offset {off:#x} is not mapped")))?;
            let l = ring_layout(size, self.packed, false);
            let qc = QueueConfig {
                size,
                desc: base + l.desc,
                avail: base + l.avail,
                used: base + l.used,
                addr_kind: Default::default(),
                features,
            };
            let mut dq = DriverQueue::new(&qc, &ring_mem)
                .map_err(|e| self.err(format!("queue {q}: {e}")))?;
            dq.set_interrupts(false);
            queues.push(VqConfig {
                index: q,
                size,
                desc: qc.desc,
                driver: qc.avail,
                device: qc.used,
                avail_idx: start,
                used_idx: start,
                call: None,
                enabled: true,
            });
            drivers.push((q, dq));
        }
        let conf = DevConf {
            features,
            queues,
            log: None,
            mtu: None,
        };
        self.dev
            .configure(&conf)
            .map_err(|e| self.err(e.to_string()))?;
        let parked = Arc::new(Mutex::new(Vec::new()));
        let ctx = RingQueues {
            port_id: self.port_id,
            hdr,
            mrg: false,
            xlate: pool_x,
            pool: Arc::clone(&self.pool),
            cache_size: self.cache_size,
            parked: Arc::clone(&parked),
        };
        let mut out = Vec::new();
        let mut it = drivers.into_iter();
        for p in 0..pairs {
            let (Some((rq, rx)), Some((tq, tx))) = (it.next(), it.next()) else {
                break;
            };
            let end = |q: u16, dq: DriverQueue| -> CoreResult<RingEnd> {
                let (bell, bell_val) = self.dev.doorbell(q).map_err(|e| self.err(e.to_string()))?;
                Ok(RingEnd {
                    q: dq,
                    bell,
                    bell_val,
                })
            };
            out.push(ctx.pair(p, end(rq, rx)?, end(tq, tx)?, &self.stats));
        }
        tracing::info!(
            "{}: {} started: {pairs} pair(s), {} rings, event mode {:?} (polled), iova {}{}",
            self.name,
            dev_name,
            if self.packed { "packed" } else { "split" },
            self.event_mode,
            space.mode().as_str(),
            if space.is_compact() { " (compact)" } else { "" },
        );
        Ok(Run {
            queues: Some(out),
            parked,
            _ring_seg: ring_seg,
            space,
        })
    }

    fn teardown(&mut self) {
        let Some(mut run) = self.run.take() else {
            return;
        };
        // The device stops touching vdpakit memory before any buffer is freed or unmapped.
        if let Err(e) = self.dev.close() {
            tracing::warn!("{}: close at stop: {e}", self.name);
        }
        run.queues = None;
        run.parked.lock().unwrap_or_else(|p| p.into_inner()).clear();
        run.space.unmap_all();
    }
}

impl Drop for Mlx5Port {
    fn drop(&mut self) {
        self.teardown();
    }
}

impl Port for Mlx5Port {
    fn kind(&self) -> &'static str {
        "mlx5"
    }

    fn name(&self) -> &str {
        &self.name
    }

    fn mac(&self) -> [u8; 6] {
        self.mac
    }

    fn configure(&mut self, conf: &PortConf) -> CoreResult<()> {
        self.state.check_configure_pairs(
            &self.name,
            conf,
            self.dev.max_queue_pairs().max(1),
            self.pairs,
            "sets up",
        )?;
        self.conf = *conf;
        self.stats = StatsBlocks::new(conf.rx_queues, conf.tx_queues);
        self.state = PortState::Stopped;
        Ok(())
    }

    fn start(&mut self) -> CoreResult<()> {
        self.state.check_start(&self.name)?;
        match self.bring_up() {
            Ok(run) => {
                self.run = Some(run);
                self.state = PortState::Started;
                Ok(())
            }
            Err(e) => {
                let _ = self.dev.close();
                Err(e)
            }
        }
    }

    fn stop(&mut self) -> CoreResult<()> {
        self.teardown();
        if self.state == PortState::Started {
            self.state = PortState::Stopped;
        }
        Ok(())
    }

    fn link(&self) -> LinkStatus {
        LinkStatus {
            up: self.run.is_some(),
            speed_mbps: 0,
        }
    }

    fn take_queues(&mut self) -> CoreResult<Vec<QueuePair>> {
        match self.run.as_mut().and_then(|r| r.queues.take()) {
            Some(q) => Ok(q),
            None => Err(CoreError::PortState {
                port: self.name.clone(),
                op: "take queues",
                state: if self.run.is_some() {
                    "its queues are already taken"
                } else {
                    self.state.as_str()
                },
            }),
        }
    }

    fn stats(&self) -> PortStats {
        self.stats.read()
    }
}

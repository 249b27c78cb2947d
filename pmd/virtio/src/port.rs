//! The `vdpakit fwd` port over a virtio-PCI function (`virtio:pci=BDF`, `ifc:pci=BDF`,
//! `eni:pci=BDF`, or a device model): vdpakit is the virtio-net driver.
//!
//! **Memory.** The rings live in a segment of ours and the packets in the `fwd` mbuf pool; both
//! are DMA-mapped into the function's domain ([`crate::iova`]: IOVA = VA, or IOVA = PA for a
//! device that does not translate), so an mbuf's buffer goes into a descriptor as it is: zero
//! copy both ways.
//!
//! **Queues.** Pair `q` is receive queue `2q` (empty mbufs posted, the device fills them; the
//! virtio-net header lands in the headroom) and transmit queue `2q + 1` (a zeroed header is
//! prepended in the headroom). With more than one pair the control queue (after the last data
//! queue) sets the pair count (`VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET`) once at start.
//!
//! **Bursts.** `rx_burst` reaps used entries, strips the header and refills the ring in one
//! publish; `tx_burst` reaps completions, posts one chain per packet and publishes once. A
//! doorbell is written at most once per burst and only when the device asked for it (EVENT_IDX or
//! the NO_NOTIFY flag); interrupts are turned off (polled). A queue is owned by one lcore: no
//! locks, no allocation, no system calls (except that a legacy I/O-port doorbell is a `pwrite` on
//! the VFIO device: there is nothing to map).
//!
//! **Stop.** The device is reset before any buffer it may still write is freed: queues dropped by
//! the lcores park their mbufs, [`Port::stop`] resets, then frees them and unmaps the windows.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use vdpakit_core::error::{Error, Result};
use vdpakit_core::mbuf::{Burst, Mbuf};
use vdpakit_core::mem::{MemMode, Segment};
use vdpakit_core::mempool::{Mempool, MempoolCache};
use vdpakit_core::pci::Doorbell;
use vdpakit_core::port::{
    LinkStatus, Port, PortConf, PortEnv, PortState, PortStats, QueuePair, QueueStats, RxQueue,
    SpecArgs, StatsBlocks, TxQueue,
};
use vdpakit_core::virtio::features as vf;
use vdpakit_core::virtio::net::hdr_len;
use vdpakit_core::virtio::{DriverQueue, GuestMemory, QueueConfig, ring_layout};
use vdpakit_core::virtio_pci::{NO_VECTOR, legacy_layout};

use crate::error::PmdError;
use crate::iova::{DmaSpace, IovaMode, MAX_PIECES, Xlate};
use crate::transport::{RingAddrs, Transport, read_net_config};

/// Keys every virtio-PCI port kind accepts (a kind adds its own).
pub const COMMON_KEYS: &[(&str, &str)] = &[
    (
        "pci",
        "PCI address of the function, bound to vfio-pci (vdpakit devices bind BDF)",
    ),
    (
        "queues",
        "queue pairs, 1..=the device's (default: --queues; >1 needs MQ and a control queue)",
    ),
    (
        "queue_size",
        "entries per ring (default: --rxd/--txd, capped by the device; legacy: fixed by the device)",
    ),
    (
        "packed",
        "1: packed rings (the device must offer RING_PACKED); 0 (default): split",
    ),
    (
        "iova",
        "va or pa: how the device sees vdpakit memory (default: va when it translates through the IOMMU, i.e. offers ACCESS_PLATFORM; pa otherwise)",
    ),
    (
        "mac",
        "port MAC (default: the device's, else 02:76:64:70:00:<port id>)",
    ),
];

/// Receive buffers are refilled once this many ring entries are free (or the ring is empty).
const REFILL_BATCH: u16 = 32;
/// How long the control queue's answer may take.
const CTRL_TIMEOUT: Duration = Duration::from_millis(1000);

/// What a PMD gives the port besides the function.
#[derive(Debug, Clone)]
pub struct PortSetup {
    /// Port kind (`virtio`, `ifc`, `eni`).
    pub kind: &'static str,
    /// The function.
    pub transport: Transport,
    /// Feature bits the PMD cannot run without (beyond VERSION_1 on modern functions).
    pub required: u64,
    /// Kept alive as long as the port (the device model a `...:model=NAME` port drives).
    pub keep: Option<Arc<dyn std::any::Any + Send + Sync>>,
}

/// Options from the spec.
#[derive(Debug, Clone, Copy)]
struct Opts {
    pairs: Option<u16>,
    size: Option<u16>,
    packed: bool,
}

/// See the module documentation.
pub struct PciPort {
    kind: &'static str,
    name: String,
    tr: Transport,
    required: u64,
    dev_features: u64,
    max_pairs: u16,
    mac: [u8; 6],
    opts: Opts,
    iova: IovaMode,
    port_id: u16,
    pool: Arc<Mempool>,
    cache_size: u32,
    conf: PortConf,
    state: PortState,
    stats: StatsBlocks,
    run: Option<Run>,
    link_up: Arc<AtomicBool>,
    needs_reset: AtomicBool,
    _keep: Option<Arc<dyn std::any::Any + Send + Sync>>,
}

impl std::fmt::Debug for PciPort {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PciPort")
            .field("name", &self.name)
            .field("device", &self.tr.name())
            .field("iova", &self.iova)
            .field("state", &self.state)
            .finish()
    }
}

struct Run {
    queues: Option<Vec<QueuePair>>,
    parked: Arc<Mutex<Vec<Mbuf>>>,
    // Dropped after the queues: the rings and windows outlive every descriptor.
    _ring_seg: Arc<Segment>,
    space: DmaSpace,
    features: u64,
}

impl PciPort {
    /// Builds the port from the spec's common keys and a PMD's function. Probes the function
    /// (features, queue pairs, MAC) but leaves it alone until `start`.
    pub fn new(a: &SpecArgs<'_>, env: &PortEnv, name: &str, setup: PortSetup) -> Result<PciPort> {
        let kind = setup.kind;
        let invalid = |key: &str, value: &str, accepted: &str| Error::PortValue {
            kind: kind.into(),
            key: key.into(),
            value: value.into(),
            accepted: accepted.into(),
        };
        let tr = setup.transport;
        let perr = |e: PmdError| e.into_port(name);
        let dev_features = tr.device_features().map_err(perr)?;
        let cfg = read_net_config(&tr, dev_features).map_err(perr)?;
        let max_pairs = cfg.max_pairs;
        let pairs = match a.get("queues") {
            None => None,
            Some(_) => Some(a.u64_in("queues", 1, 1..=u64::from(max_pairs.max(1)))? as u16),
        };
        let size = match a.get("queue_size") {
            None => None,
            Some(v) => {
                let n = a.u64_in("queue_size", 256, 1..=32768)?;
                if !tr.fixed_queue_size() && !n.is_power_of_two() && a.get("packed") != Some("1") {
                    return Err(invalid("queue_size", v, "a power of two in 1..=32768"));
                }
                Some(n as u16)
            }
        };
        let packed = a.choice("packed", "0", &["0", "1"])? == "1";
        if packed && dev_features & vf::RING_PACKED == 0 {
            return Err(invalid(
                "packed",
                "1",
                &format!(
                    "0: {} does not offer RING_PACKED (features {dev_features:#x})",
                    tr.name()
                ),
            ));
        }
        let translates = dev_features & vf::ACCESS_PLATFORM != 0;
        let iova = match a.choice("iova", "auto", &["auto", "va", "pa"])? {
            "va" => IovaMode::Va,
            "pa" => IovaMode::Pa,
            _ if translates => IovaMode::Va,
            _ => IovaMode::Pa,
        };
        if iova == IovaMode::Pa {
            tracing::info!(
                "{}: {} does not translate DMA through the IOMMU (no ACCESS_PLATFORM): IOVA = physical address",
                name,
                tr.name()
            );
        }
        let default_mac = cfg
            .mac
            .unwrap_or(vdpakit_core::port::default_mac(env.port_id));
        Ok(PciPort {
            kind,
            name: name.to_string(),
            required: setup.required | tr.base_required(),
            tr,
            dev_features,
            max_pairs,
            mac: a.mac("mac", default_mac)?,
            opts: Opts {
                pairs,
                size,
                packed,
            },
            iova,
            port_id: env.port_id,
            pool: Arc::clone(&env.pool),
            cache_size: env.cache_size,
            conf: PortConf::default(),
            state: PortState::New,
            stats: StatsBlocks::default(),
            run: None,
            link_up: Arc::new(AtomicBool::new(false)),
            needs_reset: AtomicBool::new(false),
            _keep: setup.keep,
        })
    }

    /// The function's own feature bits.
    pub fn device_features(&self) -> u64 {
        self.dev_features
    }

    /// Whether the device reported DEVICE_NEEDS_RESET (a queue stopped on a DMA or ring error)
    /// at the last check (checked by [`Port::stats`] and here, never in the burst path).
    pub fn needs_reset(&self) -> bool {
        self.check_device();
        self.needs_reset.load(Ordering::Relaxed)
    }

    fn check_device(&self) {
        if self.run.is_none() {
            return;
        }
        let Ok(st) = self.tr.status() else { return };
        if st & vdpakit_core::virtio_pci::status::NEEDS_RESET != 0
            && !self.needs_reset.swap(true, Ordering::Relaxed)
        {
            tracing::warn!(
                "{}: {} reports DEVICE_NEEDS_RESET (status {st:#04x}): a queue stopped on a DMA or ring error; the port's other queues and vdpakit's other ports keep running, restart the port to recover",
                self.name,
                self.tr.name()
            );
        }
    }

    /// The negotiated features while started.
    pub fn features(&self) -> Option<u64> {
        self.run.as_ref().map(|r| r.features)
    }

    /// How vdpakit memory is addressed for this device.
    pub fn iova_mode(&self) -> IovaMode {
        self.iova
    }

    /// The function.
    pub fn transport(&self) -> &Transport {
        &self.tr
    }

    fn err(&self, why: String) -> Error {
        Error::PortConfig {
            port: self.name.clone(),
            why,
        }
    }

    fn pick_size(&self, q: u16, want: u16) -> Result<u16> {
        let max = self
            .tr
            .queue_max_size(q)
            .map_err(|e| e.into_port(&self.name))?;
        if max == 0 {
            return Err(self.err(format!(
                "{}: queue {q} is not available (queue_size reads 0)",
                self.tr.name()
            )));
        }
        if self.tr.fixed_queue_size() {
            if let Some(k) = self.opts.size
                && k != max
            {
                return Err(self.err(format!(
                    "queue_size={k}: {} fixes queue {q} at {max} entries (legacy QUEUE_NUM)",
                    self.tr.name()
                )));
            }
            return Ok(max);
        }
        let n = self.opts.size.unwrap_or(want).min(max);
        Ok(if self.opts.packed {
            n
        } else {
            // Split rings need a power of two.
            1 << (15 - n.leading_zeros().min(15))
        })
    }

    fn bring_up(&mut self) -> Result<Run> {
        // `queues=` only bounds what `configure` may ask for (checked there).
        let pairs = self.conf.rx_queues;
        let dev = self.tr.name().to_string();
        let perr = |e: PmdError| e.into_port(&self.name);
        let mut wanted = vf::VERSION_1
            | vf::ACCESS_PLATFORM
            | vf::NET_MAC
            | vf::NET_STATUS
            | vf::NET_MRG_RXBUF
            | vf::RING_EVENT_IDX
            | vf::ANY_LAYOUT
            | self.required;
        let mut required = self.required;
        if self.opts.packed {
            wanted |= vf::RING_PACKED;
            required |= vf::RING_PACKED;
        }
        if pairs > 1 {
            wanted |= vf::NET_MQ | vf::NET_CTRL_VQ;
            required |= vf::NET_MQ | vf::NET_CTRL_VQ;
        }
        let features = self.tr.negotiate(wanted, required).map_err(perr)?;
        let cfg = read_net_config(&self.tr, features).map_err(perr)?;
        self.link_up.store(cfg.link_up, Ordering::Relaxed);
        let hdr = hdr_len(features);
        let packed = features & vf::RING_PACKED != 0;
        let event_idx = features & vf::RING_EVENT_IDX != 0;
        let legacy = self.tr.is_legacy();

        // ---- ring memory: one block per queue, never across a page in PA mode ----
        let ctrl_q = (pairs > 1).then_some(2 * self.max_pairs);
        let mut plan: Vec<(u16, u16)> = Vec::new();
        for p in 0..pairs {
            plan.push((2 * p, self.pick_size(2 * p, self.conf.rx_desc)?));
            plan.push((2 * p + 1, self.pick_size(2 * p + 1, self.conf.tx_desc)?));
        }
        if let Some(c) = ctrl_q {
            plan.push((c, self.pick_size(c, 64)?));
        }
        let page: u64 = if self.iova == IovaMode::Pa {
            2 << 20
        } else {
            4096
        };
        let block = |size: u16| {
            if legacy {
                legacy_layout(size).3
            } else {
                ring_layout(size, packed, event_idx).total
            }
        };
        let mut offs = Vec::new();
        let mut next = 0u64;
        for &(q, size) in &plan {
            let len = block(size).next_multiple_of(4096);
            if len > page && self.iova == IovaMode::Pa {
                return Err(self.err(format!(
                    "queue {q}: a ring of {size} entries ({len} bytes) does not fit in one 2 MiB hugepage"
                )));
            }
            if next / page != (next + len - 1) / page {
                next = next.next_multiple_of(page);
            }
            offs.push(next);
            next += len;
        }
        // The control queue's command buffer: one page after the rings.
        let ctrl_buf = next.next_multiple_of(4096);
        next = ctrl_buf + 4096;
        let mode = if self.iova == IovaMode::Pa {
            MemMode::Huge2M
        } else {
            MemMode::NoHuge
        };
        let ring_seg = Segment::new(
            &format!("{}{}-rings", self.kind, self.port_id),
            next as usize,
            mode,
        )
        .map_err(|e| {
            PmdError::Memory {
                dev: dev.clone(),
                what: "ring memory".into(),
                source: Box::new(e),
            }
            .into_port(&self.name)
        })?;
        let mut space = DmaSpace::new(&dev, self.tr.pci().domain(), self.iova);
        if legacy {
            // QUEUE_PFN is 32 bits of 4 KiB frames.
            space = space.with_limit(1 << 44);
        }
        let (_, ring_regions) = space.map(&ring_seg).map_err(perr)?;
        let pool_seg = Arc::clone(self.pool.zone().segment());
        let (pool_x, _) = space.map(&pool_seg).map_err(perr)?;
        let ring_mem = GuestMemory::new(ring_regions)
            .map_err(|e| self.err(format!("ring memory table: {e}")))?;
        let ring_iova = |off: u64| -> Result<u64> {
            ring_mem
                .uva_to_gpa(ring_seg.base() as u64 + off)
                .ok_or_else(|| self.err(format!("ring offset {off:#x} is not mapped")))
        };

        // ---- queues ----
        let mut drivers = Vec::new();
        for (&(q, size), &off) in plan.iter().zip(&offs) {
            let base = ring_iova(off)?;
            let (desc, driver, device) = if legacy {
                let (d, a, u, _) = legacy_layout(size);
                (base + d, base + a, base + u)
            } else {
                let l = ring_layout(size, packed, event_idx);
                (base + l.desc, base + l.avail, base + l.used)
            };
            let qc = QueueConfig {
                size,
                desc,
                avail: driver,
                used: device,
                addr_kind: Default::default(),
                features,
            };
            let mut dq = DriverQueue::new(&qc, &ring_mem)
                .map_err(|e| self.err(format!("queue {q}: {e}")))?;
            dq.set_interrupts(false);
            let r = RingAddrs {
                size,
                desc,
                driver,
                device,
            };
            self.tr.setup_queue(q, &r, NO_VECTOR).map_err(perr)?;
            self.tr.enable_queue(q, true).map_err(perr)?;
            let (bell, val) = self.tr.doorbell(q).map_err(perr)?;
            drivers.push((q, dq, bell, val));
        }
        self.tr.driver_ok().map_err(perr)?;
        let st = self.tr.status().map_err(perr)?;
        if st & vdpakit_core::virtio_pci::status::NEEDS_RESET != 0
            || st & vdpakit_core::virtio_pci::status::DRIVER_OK == 0
        {
            return Err(self.err(format!(
                "{dev}: device status {st:#04x} after DRIVER_OK (NEEDS_RESET or DRIVER_OK lost)"
            )));
        }

        // ---- control queue: set the pair count ----
        let mut drivers = drivers;
        if let Some(c) = ctrl_q {
            let pos = drivers.iter().position(|d| d.0 == c);
            if let Some(i) = pos {
                let (_, mut dq, bell, val) = drivers.remove(i);
                let buf = ring_iova(ctrl_buf)?;
                ctrl_mq(&dev, &mut dq, &bell, val, &ring_mem, buf, pairs).map_err(perr)?;
            }
        }

        // ---- hand-out ----
        let parked = Arc::new(Mutex::new(Vec::new()));
        let ctx = RingQueues {
            port_id: self.port_id,
            hdr,
            mrg: features & vf::NET_MRG_RXBUF != 0,
            xlate: pool_x.clone(),
            pool: Arc::clone(&self.pool),
            cache_size: self.cache_size,
            parked: Arc::clone(&parked),
        };
        let mut queues = Vec::new();
        let mut it = drivers.into_iter();
        for p in 0..pairs {
            let (Some(rx), Some(tx)) = (it.next(), it.next()) else {
                break;
            };
            queues.push(ctx.pair(
                p,
                RingEnd {
                    q: rx.1,
                    bell: rx.2,
                    bell_val: rx.3,
                },
                RingEnd {
                    q: tx.1,
                    bell: tx.2,
                    bell_val: tx.3,
                },
                &self.stats,
            ));
        }
        tracing::info!(
            "{}: {} started: {pairs} pair(s), features {features:#x}, iova {}{}, header {hdr} bytes",
            self.name,
            dev,
            self.iova.as_str(),
            if space.is_compact() { " (compact)" } else { "" },
        );
        Ok(Run {
            queues: Some(queues),
            parked,
            _ring_seg: ring_seg,
            space,
            features,
        })
    }

    fn teardown(&mut self) {
        let Some(mut run) = self.run.take() else {
            return;
        };
        // Stop DMA before any buffer it could reach is freed or unmapped.
        if let Err(e) = self.tr.reset() {
            tracing::warn!("{}: reset at stop: {e}", self.name);
        }
        run.queues = None;
        run.parked.lock().unwrap_or_else(|p| p.into_inner()).clear();
        run.space.unmap_all();
        self.link_up.store(false, Ordering::Relaxed);
        self.needs_reset.store(false, Ordering::Relaxed);
    }
}

impl Drop for PciPort {
    fn drop(&mut self) {
        self.teardown();
    }
}

impl Port for PciPort {
    fn kind(&self) -> &'static str {
        self.kind
    }

    fn name(&self) -> &str {
        &self.name
    }

    fn mac(&self) -> [u8; 6] {
        self.mac
    }

    fn configure(&mut self, conf: &PortConf) -> Result<()> {
        self.state.check_configure_pairs(
            &self.name,
            conf,
            self.max_pairs.max(1),
            self.opts.pairs,
            "sets up",
        )?;
        self.conf = *conf;
        self.stats = StatsBlocks::new(conf.rx_queues, conf.tx_queues);
        self.state = PortState::Stopped;
        Ok(())
    }

    fn start(&mut self) -> Result<()> {
        self.state.check_start(&self.name)?;
        match self.bring_up() {
            Ok(run) => {
                self.run = Some(run);
                self.state = PortState::Started;
                Ok(())
            }
            Err(e) => {
                let _ = self.tr.reset();
                Err(e)
            }
        }
    }

    fn stop(&mut self) -> Result<()> {
        self.teardown();
        if self.state == PortState::Started {
            self.state = PortState::Stopped;
        }
        Ok(())
    }

    fn link(&self) -> LinkStatus {
        LinkStatus {
            up: self.link_up.load(Ordering::Relaxed),
            speed_mbps: 0,
        }
    }

    fn take_queues(&mut self) -> Result<Vec<QueuePair>> {
        match self.run.as_mut().and_then(|r| r.queues.take()) {
            Some(q) => Ok(q),
            None => Err(Error::PortState {
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
        self.check_device();
        self.stats.read()
    }
}

/// Sends `VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET` (class 4, command 0) with `pairs` on the control
/// queue and waits (bounded) for the device's ack (0 = VIRTIO_NET_OK).
pub(crate) fn ctrl_mq(
    dev: &str,
    q: &mut DriverQueue,
    bell: &Doorbell,
    val: u32,
    mem: &GuestMemory,
    buf: u64,
    pairs: u16,
) -> crate::error::Result<()> {
    let fail = |what: String| PmdError::Device {
        dev: dev.to_string(),
        what,
    };
    let [lo, hi] = pairs.to_le_bytes();
    mem.write(buf, &[4, 0, lo, hi, 0xff])
        .map_err(|e| fail(format!("control buffer: {e}")))?;
    q.add(&[(buf, 2, false), (buf + 2, 2, false), (buf + 4, 1, true)])
        .map_err(|e| fail(format!("control queue: {e}")))?;
    q.publish_avail();
    bell.ring(val);
    let end = Instant::now() + CTRL_TIMEOUT;
    loop {
        match q.reap() {
            Ok(Some(_)) => break,
            Ok(None) => {}
            Err(e) => return Err(fail(format!("control queue: {e}"))),
        }
        if Instant::now() > end {
            return Err(fail(format!(
                "no answer on the control queue to VQ_PAIRS_SET {pairs} within {} ms",
                CTRL_TIMEOUT.as_millis()
            )));
        }
        std::thread::sleep(Duration::from_micros(100));
    }
    let mut ack = [0u8];
    mem.read(buf + 4, &mut ack)
        .map_err(|e| fail(format!("control buffer: {e}")))?;
    if ack[0] != 0 {
        return Err(fail(format!(
            "the device refused VQ_PAIRS_SET {pairs} (ack {:#04x})",
            ack[0]
        )));
    }
    Ok(())
}

// =============================================================================================
// Datapath
// =============================================================================================

/// One ring of a port whose rings live in vdpakit's memory: the driver side, the doorbell and
/// the value written to it.
#[derive(Debug)]
pub struct RingEnd {
    /// The driver side of the ring (interrupts off: polled).
    pub q: DriverQueue,
    /// The ring's doorbell.
    pub bell: Doorbell,
    /// The value that rings it.
    pub bell_val: u32,
}

/// What every queue of a port built over vdpakit-owned rings shares: the `fwd` datapath of the
/// virtio-PCI port, also used by PMDs whose devices are not virtio-PCI functions (mlx5).
#[derive(Debug, Clone)]
pub struct RingQueues {
    /// Port id (stamped on received mbufs).
    pub port_id: u16,
    /// virtio-net header bytes.
    pub hdr: usize,
    /// MRG_RXBUF negotiated.
    pub mrg: bool,
    /// The mbuf pool's translation to IOVAs.
    pub xlate: Xlate,
    /// The pool.
    pub pool: Arc<Mempool>,
    /// Per-queue cache size.
    pub cache_size: u32,
    /// Where dropped queues park the mbufs the device may still write (freed by the port once
    /// the device has stopped).
    pub parked: Arc<Mutex<Vec<Mbuf>>>,
}

impl RingQueues {
    /// Queue pair `p` over its two rings: the receive ring is filled once, the transmit ring
    /// starts empty.
    pub fn pair(&self, p: u16, rx: RingEnd, tx: RingEnd, stats: &StatsBlocks) -> QueuePair {
        let mut rxq = PRx {
            run: RxRun {
                slots: (0..rx.q.size()).map(|_| None).collect(),
                q: rx.q,
                bell: rx.bell,
                bell_val: rx.bell_val,
                hdr: self.hdr,
                mrg: self.mrg,
                skip: 0,
                broken: false,
                xlate: self.xlate.clone(),
            },
            port: self.port_id,
            queue: p,
            cache: self.pool.cache(self.cache_size),
            stats: Arc::clone(&stats.rx[p as usize]),
            parked: Arc::clone(&self.parked),
        };
        rxq.run.refill(&mut rxq.cache, true);
        let txq = PTx {
            run: TxRun {
                slots: (0..tx.q.size()).map(|_| None).collect(),
                q: tx.q,
                bell: tx.bell,
                bell_val: tx.bell_val,
                hdr: self.hdr,
                xlate: self.xlate.clone(),
                broken: false,
            },
            cache: self.pool.cache(self.cache_size),
            stats: Arc::clone(&stats.tx[p as usize]),
            parked: Arc::clone(&self.parked),
        };
        QueuePair {
            queue: p,
            rx: Some(Box::new(rxq) as Box<dyn RxQueue>),
            tx: Some(Box::new(txq) as Box<dyn TxQueue>),
        }
    }
}

struct RxRun {
    q: DriverQueue,
    /// Id → the empty mbuf posted under it.
    slots: Box<[Option<Mbuf>]>,
    bell: Doorbell,
    bell_val: u32,
    hdr: usize,
    mrg: bool,
    /// Buffers still to drop of a merged packet that did not fit one mbuf.
    skip: u16,
    broken: bool,
    xlate: Xlate,
}

impl RxRun {
    /// Posts one empty mbuf; gives it back on failure.
    #[inline]
    fn post(&mut self, m: Mbuf) -> std::result::Result<(), Mbuf> {
        // The device writes the virtio-net header into the headroom, the frame at data_off.
        let va = m.data_ptr() as usize - self.hdr;
        let len = (self.hdr + m.tailroom()) as u32;
        let mut pieces = [(0u64, 0u32, false); MAX_PIECES];
        let n = self.xlate.pieces(va, len, true, &mut pieces);
        if n == 0 || m.headroom() < self.hdr {
            return Err(m);
        }
        match self.q.add(&pieces[..n]) {
            Ok(id) => {
                self.slots[id as usize] = Some(m);
                Ok(())
            }
            Err(_) => Err(m),
        }
    }

    #[inline]
    fn refill(&mut self, cache: &mut MempoolCache, force: bool) {
        let free = self.q.free_count();
        if !force && free < REFILL_BATCH && free < self.q.size() {
            return;
        }
        let mut added = 0;
        while self.q.free_count() > 0 {
            let Some(m) = cache.alloc() else { break };
            if let Err(m) = self.post(m) {
                cache.free(m);
                break;
            }
            added += 1;
        }
        if added > 0 && self.q.publish_avail() {
            self.bell.ring(self.bell_val);
        }
    }

    #[inline]
    fn burst(
        &mut self,
        pkts: &mut Burst,
        cache: &mut MempoolCache,
        stats: &QueueStats,
        port: u16,
        queue: u16,
    ) -> usize {
        if self.broken {
            return 0;
        }
        let (mut got, mut bytes, mut drops, mut errors) = (0usize, 0u64, 0u64, 0u64);
        let h = self.hdr;
        while pkts.room() > 0 {
            let (id, len) = match self.q.reap() {
                Ok(Some(x)) => x,
                Ok(None) => break,
                Err(_) => {
                    // The device wrote a used entry for a buffer it does not have.
                    self.broken = true;
                    errors += 1;
                    break;
                }
            };
            let Some(mut m) = self.slots.get_mut(id as usize).and_then(Option::take) else {
                errors += 1;
                continue;
            };
            if self.skip > 0 {
                self.skip -= 1;
                cache.free(m);
                continue;
            }
            let len = len as usize;
            if len <= h || !m.set_data_len(len - h) {
                errors += 1;
                cache.free(m);
                continue;
            }
            let nbuf = match m.prepend(h) {
                Some(hdr) if h >= 12 => u16::from_le_bytes([hdr[10], hdr[11]]),
                _ => 1,
            };
            m.adj(h);
            if self.mrg && nbuf > 1 {
                // Spread over several buffers: not chained into one mbuf; dropped and counted.
                self.skip = nbuf - 1;
                drops += 1;
                cache.free(m);
                continue;
            }
            m.set_rx_port(port, queue);
            bytes += m.data_len() as u64;
            let _ = pkts.push(m);
            got += 1;
        }
        self.refill(cache, false);
        if got > 0 {
            stats.add(got as u64, bytes);
        }
        if drops > 0 {
            stats.add_drops(drops);
        }
        if errors > 0 {
            stats.add_errors(errors);
        }
        got
    }

    fn park(&mut self, to: &Mutex<Vec<Mbuf>>) {
        let mut p = to.lock().unwrap_or_else(|p| p.into_inner());
        p.extend(self.slots.iter_mut().filter_map(Option::take));
    }
}

struct TxRun {
    q: DriverQueue,
    /// Id → the packet posted under it.
    slots: Box<[Option<Mbuf>]>,
    bell: Doorbell,
    bell_val: u32,
    hdr: usize,
    xlate: Xlate,
    broken: bool,
}

impl TxRun {
    /// Frees the packets the device is done with.
    #[inline]
    fn reclaim(&mut self, cache: &mut MempoolCache) {
        loop {
            match self.q.reap() {
                Ok(Some((id, _))) => {
                    if let Some(m) = self.slots.get_mut(id as usize).and_then(Option::take) {
                        cache.free(m);
                    }
                }
                Ok(None) => break,
                Err(_) => {
                    self.broken = true;
                    break;
                }
            }
        }
    }

    #[inline]
    fn burst(&mut self, pkts: &mut Burst, cache: &mut MempoolCache, stats: &QueueStats) -> usize {
        if self.broken {
            return 0;
        }
        self.reclaim(cache);
        let per_pkt = match self.xlate {
            Xlate::Offset { .. } => 1,
            Xlate::Pages { .. } => 2,
        };
        let n = pkts.len().min(usize::from(self.q.free_count()) / per_pkt);
        let (mut posted, mut bytes, mut drops) = (0u64, 0u64, 0u64);
        let h = self.hdr;
        pkts.drain_front(n, |m| {
            let mut m = m;
            let start = m.data_ptr() as usize - m.headroom();
            if !self.xlate.contains(start, m.buf_len()) || m.headroom() < h {
                // Not in memory the device sees (another pool) or no room for the header:
                // copy into one of ours.
                let copy = cache.alloc().and_then(|mut c| {
                    let d = c.append(m.data_len())?;
                    d.copy_from_slice(m.data());
                    Some(c)
                });
                cache.free(m);
                match copy {
                    Some(c) => m = c,
                    None => {
                        drops += 1;
                        return;
                    }
                }
            }
            let len = m.data_len();
            if let Some(hdr) = m.prepend(h) {
                vdpakit_core::virtio::net::clear_hdr(hdr);
            }
            let mut pieces = [(0u64, 0u32, false); MAX_PIECES];
            let k = self
                .xlate
                .pieces(m.data_ptr() as usize, (len + h) as u32, false, &mut pieces);
            match (k > 0).then(|| self.q.add(&pieces[..k])) {
                Some(Ok(id)) => {
                    self.slots[id as usize] = Some(m);
                    posted += 1;
                    bytes += len as u64;
                }
                _ => {
                    drops += 1;
                    cache.free(m);
                }
            }
        });
        if posted > 0 && self.q.publish_avail() {
            self.bell.ring(self.bell_val);
        }
        if posted > 0 {
            stats.add(posted, bytes);
        }
        if drops > 0 {
            stats.add_drops(drops);
        }
        posted as usize
    }

    fn park(&mut self, to: &Mutex<Vec<Mbuf>>) {
        let mut p = to.lock().unwrap_or_else(|p| p.into_inner());
        p.extend(self.slots.iter_mut().filter_map(Option::take));
    }
}

struct PRx {
    run: RxRun,
    port: u16,
    queue: u16,
    cache: MempoolCache,
    stats: Arc<QueueStats>,
    parked: Arc<Mutex<Vec<Mbuf>>>,
}

impl RxQueue for PRx {
    #[inline]
    fn rx_burst(&mut self, pkts: &mut Burst) -> usize {
        let (run, stats, port, queue) = (&mut self.run, &self.stats, self.port, self.queue);
        self.cache
            .local(|cache| run.burst(pkts, cache, stats, port, queue))
    }

    fn stats(&self) -> &Arc<QueueStats> {
        &self.stats
    }
}

impl Drop for PRx {
    fn drop(&mut self) {
        // The device may still write these: the port frees them after its reset.
        self.run.park(&self.parked);
    }
}

struct PTx {
    run: TxRun,
    cache: MempoolCache,
    stats: Arc<QueueStats>,
    parked: Arc<Mutex<Vec<Mbuf>>>,
}

impl TxQueue for PTx {
    #[inline]
    fn tx_burst(&mut self, pkts: &mut Burst) -> usize {
        let (run, stats) = (&mut self.run, &self.stats);
        self.cache.local(|cache| run.burst(pkts, cache, stats))
    }

    fn stats(&self) -> &Arc<QueueStats> {
        &self.stats
    }
}

impl Drop for PTx {
    fn drop(&mut self) {
        self.run.park(&self.parked);
    }
}

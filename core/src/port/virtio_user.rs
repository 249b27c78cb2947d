//! The `virtio-user` port: vdpakit as the vhost-user *front end* (the driver side) of a back end
//! such as DPDK's `net_vhost`, a vDPA daemon or vdpakit's own `vhost-user` port.
//!
//! Memory: the port's mbuf pool lives in one memfd `Segment`, its virtio rings in another; both
//! are shared with the back end by fd in SET_MEM_TABLE with identity addresses (guest physical =
//! front-end virtual = our virtual address, IOVA = VA), so mbuf data addresses go straight into
//! descriptors and nothing is copied on our side.
//!
//! Queues: queue pair `q` is receive vring `2q` (we post empty mbufs, the back end fills them) and
//! transmit vring `2q + 1` (we post packets with a zeroed virtio-net header prepended in the
//! headroom). Each vring's runtime (the driver-side queue, the id → mbuf table, the kick eventfd)
//! sits in a [`Handoff`]: the port's queues enter it once per burst; the control thread builds it
//! when a back end is set up and takes it away when the back end goes.
//!
//! Receive with mergeable rx buffers: a frame spread over several buffers (`num_buffers`) is
//! delivered as one mbuf chain; `rx_buf=` sizes the posted buffers. Transmit posts a chain as
//! one descriptor per segment. With VIRTIO_F_IN_ORDER the driver queues resolve batched used
//! entries ([`DriverQueue::reap`] returns every chain).
//!
//! Control thread: connects (client mode, retrying every second) or listens (`server=1`),
//! negotiates, sets the rings up and then waits for the back end to hang up or for the port to
//! stop. When the back end goes away, packets it had not consumed are counted as transmit drops,
//! posted receive buffers are kept for the next back end, and the thread reconnects; meanwhile
//! `tx_burst` takes nothing (the caller counts drops) and `rx_burst` returns nothing. Buffers
//! are used again only once the back end can no longer touch them: it confirmed each ring
//! stopped (GET_VRING_BASE reply) or its process exited; otherwise they are withheld
//! (see `Withheld`).

use std::os::fd::AsFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use nix::sys::eventfd::{EfdFlags, EventFd};

use super::{
    Counters, LinkStatus, Port, PortConf, PortEnv, PortKind, PortSpec, PortState, PortStats,
    QueuePair, QueueStats, RxQueue, StatsBlocks, TxQueue,
};
use crate::error::{Error, Result};
use crate::mbuf::{Burst, MAX_BURST, Mbuf};
use crate::mem::{MemMode, Segment};
use crate::mempool::{Mempool, MempoolCache};
use crate::vhost::VhostError;
use crate::vhost::device::MAX_QUEUE_PAIRS;
use crate::vhost::frontend::Frontend;
use crate::vhost::handoff::Handoff;
use crate::vhost::msg::{MemRegion, VringAddr, proto};
use crate::vhost::server::{sleep_or_stop, wait_readable};
use crate::virtio::features as vf;
use crate::virtio::net::hdr_len;
use crate::virtio::{DriverQueue, GuestMemory, GuestRegion, QueueConfig, ring_layout};

pub(super) const KIND: PortKind = PortKind {
    name: "virtio-user",
    about: "vhost-user front end on a Unix socket (drives a vhost-user back end such as DPDK's net_vhost), zero-copy",
    keys: &[
        ("path", "socket path (required)"),
        (
            "server",
            "1: listen and wait for the back end; 0 (default): connect, retrying every second",
        ),
        ("queues", "queue pairs, 1..=128 (default: --queues)"),
        (
            "queue_size",
            "entries per ring, a power of two in 64..=32768 (default: --rxd/--txd)",
        ),
        (
            "packed",
            "1: packed rings (fails if the back end lacks them); 0 (default): split",
        ),
        (
            "mrg_rxbuf",
            "1: require mergeable rx buffers; 0: off; default: use if offered",
        ),
        (
            "in_order",
            "1: require VIRTIO_F_IN_ORDER; 0: off; default: use if offered",
        ),
        (
            "rx_buf",
            "bytes of each posted receive buffer, the 12-byte virtio-net header included, 128..=data room + 12 (default: the whole mbuf); with mergeable rx buffers larger frames arrive as mbuf chains",
        ),
        ("mac", "port MAC address (default 02:76:64:70:00:<port id>)"),
        (
            "drop_every",
            "for tests: transmit drops (frees and counts) every Nth packet, 0..=1000000 (default 0: never)",
        ),
    ],
};

/// Receive buffers are refilled once this many ring entries are free (or the ring is empty).
const REFILL_BATCH: u16 = 32;
/// Used receive buffers reaped before any is taken (see `RxRun::burst`).
const RX_REAP: usize = 32;
/// The transmit path reclaims used buffers when fewer descriptors than this (or than the burst
/// needs) are free.
const TX_FREE_THRESH: usize = 64;
/// Most transmitted packets taken back at once (see `TxRun::reclaim`).
const TX_RECLAIM: usize = 2 * TX_FREE_THRESH;

/// A feature the user may require, refuse or leave to negotiation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Want {
    Off,
    Auto,
    On,
}

#[derive(Debug, Clone)]
struct Config {
    path: PathBuf,
    server: bool,
    pairs: u16,
    rx_size: u16,
    tx_size: u16,
    packed: bool,
    mrg: Want,
    in_order: Want,
    /// Bytes of each posted receive buffer (header included); None: all an mbuf holds.
    rx_buf: Option<usize>,
    /// Tests: transmit drops every Nth packet offered (0: never).
    drop_every: u64,
}

/// See the module documentation.
pub struct VirtioUserPort {
    name: String,
    mac: [u8; 6],
    port_id: u16,
    cfg: Config,
    pairs_key: Option<u16>,
    size_key: Option<u16>,
    pool: Arc<Mempool>,
    cache_size: u32,
    conf: PortConf,
    state: PortState,
    stats: StatsBlocks,
    ctl: Option<ControlHandle>,
    taken: bool,
}

impl VirtioUserPort {
    /// Builds the port from its spec (what [`create`](super::create) does for `virtio-user`).
    pub fn new(spec: &PortSpec, env: &PortEnv) -> Result<VirtioUserPort> {
        let a = spec.args(KIND.keys)?;
        let invalid = |key: &str, value: &str, accepted: &str| Error::PortValue {
            kind: "virtio-user".into(),
            key: key.into(),
            value: value.into(),
            accepted: accepted.into(),
        };
        let Some(path) = a.get("path") else {
            return Err(invalid("path", "", "a socket path (path=/tmp/vhost.sock)"));
        };
        let pairs_key = match a.get("queues") {
            None => None,
            Some(_) => Some(a.u64_in("queues", 1, 1..=MAX_QUEUE_PAIRS as u64)? as u16),
        };
        let size_key = match a.get("queue_size") {
            None => None,
            Some(v) => {
                let n = a.u64_in("queue_size", 256, 64..=32768)?;
                if !n.is_power_of_two() {
                    return Err(invalid("queue_size", v, "a power of two in 64..=32768"));
                }
                Some(n as u16)
            }
        };
        let want = |key: &str| -> Result<Want> {
            Ok(match a.get(key) {
                None => Want::Auto,
                Some(_) if a.choice(key, "1", &["0", "1"])? == "1" => Want::On,
                Some(_) => Want::Off,
            })
        };
        let mrg = want("mrg_rxbuf")?;
        let in_order = want("in_order")?;
        let max_buf = u64::from(env.pool.data_room()) + 12;
        let rx_buf = match a.get("rx_buf") {
            None => None,
            Some(_) => Some(a.u64_in("rx_buf", max_buf, 128..=max_buf)? as usize),
        };
        Ok(VirtioUserPort {
            name: spec.text().to_string(),
            mac: a.mac("mac", super::default_mac(env.port_id))?,
            port_id: env.port_id,
            cfg: Config {
                path: PathBuf::from(path),
                server: a.choice("server", "0", &["0", "1"])? == "1",
                pairs: pairs_key.unwrap_or(1),
                rx_size: 0,
                tx_size: 0,
                packed: a.choice("packed", "0", &["0", "1"])? == "1",
                mrg,
                in_order,
                rx_buf,
                drop_every: a.u64_in("drop_every", 0, 0..=1_000_000)?,
            },
            pairs_key,
            size_key,
            pool: Arc::clone(&env.pool),
            cache_size: env.cache_size,
            conf: PortConf::default(),
            state: PortState::New,
            stats: StatsBlocks::default(),
            ctl: None,
            taken: false,
        })
    }

    /// Features negotiated with the current back end (None while none is set up).
    pub fn negotiated_features(&self) -> Option<u64> {
        let s = &self.ctl.as_ref()?.shared;
        s.link_up
            .load(Ordering::Acquire)
            .then(|| s.features.load(Ordering::Relaxed))
    }

    /// Back ends set up so far (connections that got as far as running rings), while started.
    pub fn connections(&self) -> u64 {
        self.ctl
            .as_ref()
            .map_or(0, |c| c.shared.connections.load(Ordering::Relaxed))
    }

    /// Chains the back ends completed implicitly so far (IN_ORDER batches: one used entry for
    /// several chains), over all queues, while started.
    pub fn in_order_implied(&self) -> u64 {
        self.ctl.as_ref().map_or(0, |c| {
            c.shared
                .implied
                .iter()
                .map(|a| a.load(Ordering::Relaxed))
                .sum()
        })
    }

    /// The last set-up error with a back end (a missing feature, a refused request), if any.
    pub fn last_error(&self) -> Option<String> {
        let c = self.ctl.as_ref()?;
        c.shared
            .last_error
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
}

impl Port for VirtioUserPort {
    fn kind(&self) -> &'static str {
        "virtio-user"
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
            MAX_QUEUE_PAIRS,
            self.pairs_key,
            "sets up",
        )?;
        let (rx, tx) = match self.size_key {
            Some(n) => (n, n),
            None => (conf.rx_desc, conf.tx_desc),
        };
        for (what, n) in [("rx", rx), ("tx", tx)] {
            if !self.cfg.packed && !n.is_power_of_two() {
                return Err(Error::PortConfig {
                    port: self.name.clone(),
                    why: format!(
                        "split rings need a power-of-two size: {what} ring of {n} (set queue_size= or packed=1)"
                    ),
                });
            }
        }
        self.cfg.pairs = self.pairs_key.unwrap_or(conf.rx_queues);
        self.cfg.rx_size = rx;
        self.cfg.tx_size = tx;
        self.conf = *conf;
        self.stats = StatsBlocks::new(conf.rx_queues, conf.tx_queues);
        self.state = PortState::Stopped;
        Ok(())
    }

    fn start(&mut self) -> Result<()> {
        self.state.check_start(&self.name)?;
        let ctl = ControlHandle::start(&self.cfg, &self.pool, self.port_id).map_err(|e| {
            Error::PortConfig {
                port: self.name.clone(),
                why: e.to_string(),
            }
        })?;
        self.ctl = Some(ctl);
        self.state = PortState::Started;
        self.taken = false;
        Ok(())
    }

    fn stop(&mut self) -> Result<()> {
        // Dropping the handle stops the control thread, which stops the back end's rings
        // (GET_VRING_BASE) and closes the connection.
        self.ctl = None;
        if self.state == PortState::Started {
            self.state = PortState::Stopped;
        }
        Ok(())
    }

    fn link(&self) -> LinkStatus {
        let up = self
            .ctl
            .as_ref()
            .is_some_and(|c| c.shared.link_up.load(Ordering::Relaxed));
        LinkStatus { up, speed_mbps: 0 }
    }

    fn take_queues(&mut self) -> Result<Vec<QueuePair>> {
        let shared = match (&self.ctl, self.taken) {
            (Some(c), false) => Arc::clone(&c.shared),
            _ => {
                let state = if self.taken {
                    "its queues are already taken"
                } else {
                    self.state.as_str()
                };
                return Err(Error::PortState {
                    port: self.name.clone(),
                    op: "take queues",
                    state,
                });
            }
        };
        self.taken = true;
        Ok((0..self.conf.rx_queues)
            .map(|q| QueuePair {
                queue: q,
                rx: Some(Box::new(VuRx {
                    shared: Arc::clone(&shared),
                    q: q as usize,
                    port: self.port_id,
                    queue: q,
                    cache: self.pool.cache(self.cache_size),
                    stats: Arc::clone(&self.stats.rx[q as usize]),
                }) as Box<dyn RxQueue>),
                tx: Some(Box::new(VuTx {
                    shared: Arc::clone(&shared),
                    q: q as usize,
                    cache: self.pool.cache(self.cache_size),
                    stats: Arc::clone(&self.stats.tx[q as usize]),
                    drop_every: self.cfg.drop_every,
                    offered: 0,
                }) as Box<dyn TxQueue>),
            })
            .collect())
    }

    fn stats(&self) -> PortStats {
        let mut s = self.stats.read();
        let Some(c) = &self.ctl else { return s };
        // Packets a departed back end never consumed were counted as sent by the queue (its
        // owner is the only writer of its block): report them as drops instead. Packets it
        // delivered that no rx_burst saw before it left count as received and dropped.
        for (i, t) in s.tx_queues.iter_mut().enumerate() {
            let lost = c
                .shared
                .tx_lost
                .get(i)
                .map_or(0, |a| a.load(Ordering::Relaxed));
            t.packets = t.packets.saturating_sub(lost);
            t.drops += lost;
        }
        for (i, r) in s.rx_queues.iter_mut().enumerate() {
            let late = c
                .shared
                .rx_late
                .get(i)
                .map_or(0, |a| a.load(Ordering::Relaxed));
            r.packets += late;
            r.drops += late;
        }
        s.tx = Counters::default();
        s.rx = Counters::default();
        for t in &s.tx_queues {
            s.tx += *t;
        }
        for r in &s.rx_queues {
            s.rx += *r;
        }
        s
    }
}

// =============================================================================================
// Datapath
// =============================================================================================

/// State shared by the control thread and the port's queues.
struct Shared {
    rx: Vec<Handoff<RxRun>>,
    tx: Vec<Handoff<TxRun>>,
    link_up: AtomicBool,
    features: AtomicU64,
    /// Back ends set up so far.
    connections: AtomicU64,
    /// Per transmit queue: packets posted (and counted as sent) that a back end left unconsumed.
    tx_lost: Vec<AtomicU64>,
    /// Per receive queue: packets a back end delivered that the queue had not reaped when it left.
    rx_late: Vec<AtomicU64>,
    /// Per vring (2q = rx, 2q + 1 = tx): chains completed by IN_ORDER batches (see
    /// [`DriverQueue::implied`]), over all back ends. Written by the queue's poller only.
    implied: Vec<AtomicU64>,
    last_error: Mutex<Option<String>>,
}

impl Shared {
    fn new(pairs: u16) -> Arc<Shared> {
        let n = pairs as usize;
        Arc::new(Shared {
            rx: (0..n).map(|_| Handoff::new()).collect(),
            tx: (0..n).map(|_| Handoff::new()).collect(),
            link_up: AtomicBool::new(false),
            features: AtomicU64::new(0),
            connections: AtomicU64::new(0),
            tx_lost: (0..n).map(|_| AtomicU64::new(0)).collect(),
            rx_late: (0..n).map(|_| AtomicU64::new(0)).collect(),
            implied: (0..2 * n).map(|_| AtomicU64::new(0)).collect(),
            last_error: Mutex::new(None),
        })
    }
}

/// Adds the chains `q` completed implicitly since the last report to `total` (single writer:
/// the queue's poller; one load and a compare per burst, a store only when batches happened).
#[inline]
fn report_implied(q: &DriverQueue, seen: &mut u64, total: &AtomicU64) {
    let now = q.implied();
    if now != *seen {
        total.store(
            total.load(Ordering::Relaxed) + (now - *seen),
            Ordering::Relaxed,
        );
        *seen = now;
    }
}

/// Rings the back end's kick eventfd (only when it asked for kicks).
#[inline]
fn kick(fd: &EventFd) {
    let _ = fd.write(1);
}

/// A running receive vring.
struct RxRun {
    q: DriverQueue,
    /// Id → the empty mbuf posted under it.
    slots: Box<[Option<Mbuf>]>,
    /// Id → where in this process its buffer's virtio-net header lies: the receive loop asks
    /// for that line without first reading the mbuf (a hint only, never dereferenced).
    hdr_at: Box<[usize]>,
    kick: EventFd,
    hdr_len: usize,
    mrg: bool,
    /// Bytes of each posted buffer, the virtio-net header included (`rx_buf`, at most what an
    /// mbuf holds after its headroom).
    buf_len: Option<usize>,
    /// A packet spread over several buffers (MRG_RXBUF) being chained, with the number of its
    /// buffers still to come.
    pending: Option<(Mbuf, u16)>,
    /// Buffers still to drop of a merged packet that could not be received.
    skip: u16,
    broken: bool,
    /// `q.implied()` as last reported to [`Shared::implied`].
    implied_seen: u64,
    /// Mbufs taken from the cache in bulk for a refill.
    fill: Burst,
}

/// What became of one used receive buffer.
enum RxBuf {
    /// A complete packet.
    Packet(Mbuf),
    /// Part of a packet (kept in `pending`), or a buffer of a dropped one.
    Nothing,
    /// A packet dropped whole (counted once).
    Dropped,
    /// A malformed buffer (counted as an error).
    Error,
}

impl RxRun {
    /// Posts one empty mbuf; gives it back on failure.
    #[inline]
    fn post(&mut self, m: Mbuf) -> std::result::Result<(), Mbuf> {
        // The device writes the virtio-net header into the headroom, the frame at data_off
        // (a packet's later buffers carry frame bytes from the header's place on).
        let addr = m.data_iova() - self.hdr_len as u64;
        let room = self.hdr_len + m.tailroom();
        let len = self.buf_len.map_or(room, |b| b.min(room)) as u32;
        match self.q.add(&[(addr, len, true)]) {
            Ok(id) => {
                self.hdr_at[id as usize] = m.data_ptr() as usize - self.hdr_len;
                self.slots[id as usize] = Some(m);
                Ok(())
            }
            Err(_) => Err(m),
        }
    }

    #[inline]
    fn refill(&mut self, cache: &mut MempoolCache) {
        let free = self.q.free_count();
        if free < REFILL_BATCH && free < self.q.size() {
            return;
        }
        let mut added = 0;
        let mut left = usize::from(free);
        // Whole bursts from the cache at once, then the remainder one by one.
        while left > 0 {
            let n = left.min(MAX_BURST);
            if !cache.alloc_bulk(&mut self.fill, n) {
                break;
            }
            let (fill, q, slots) = (&mut self.fill, &mut self.q, &mut self.slots);
            let hdr_at = &mut self.hdr_at;
            let (h, buf_len) = (self.hdr_len, self.buf_len);
            fill.drain_front(n, |m| {
                let addr = m.data_iova() - h as u64;
                let room = h + m.tailroom();
                let len = buf_len.map_or(room, |b| b.min(room)) as u32;
                match q.add(&[(addr, len, true)]) {
                    Ok(id) => {
                        hdr_at[id as usize] = m.data_ptr() as usize - h;
                        slots[id as usize] = Some(m);
                        added += 1;
                    }
                    // Not reached: `free` descriptors were free.
                    Err(_) => cache.free(m),
                }
            });
            left -= n;
        }
        while self.q.free_count() > 0 {
            let Some(m) = cache.alloc() else { break };
            if let Err(m) = self.post(m) {
                cache.free(m);
                break;
            }
            added += 1;
        }
        if added > 0 && self.q.publish_avail() {
            kick(&self.kick);
        }
    }

    /// Takes one used buffer (`len` bytes written) into a packet.
    #[inline(always)]
    fn take(&mut self, mut m: Mbuf, len: usize, cache: &mut MempoolCache) -> RxBuf {
        let h = self.hdr_len;
        if self.skip > 0 || self.pending.is_some() {
            return self.take_more(m, len, cache);
        }
        if len <= h || !m.set_data_len(len - h) {
            // A runt (header only) or a length beyond the buffer we posted.
            cache.free(m);
            return RxBuf::Error;
        }
        let nbuf = match m.prepend(h) {
            Some(hdr) if self.mrg => u16::from_le_bytes([hdr[10], hdr[11]]),
            _ => 1,
        };
        m.adj(h);
        if nbuf <= 1 {
            return RxBuf::Packet(m);
        }
        if nbuf > self.q.size() {
            // More buffers than the ring holds: the header is garbage; nothing can be trusted
            // about what follows, so this buffer alone is dropped.
            cache.free(m);
            return RxBuf::Error;
        }
        self.pending = Some((m, nbuf - 1));
        RxBuf::Nothing
    }

    /// [`RxRun::take`] for a later buffer of a merged packet, or one of a dropped packet.
    #[inline(never)]
    fn take_more(&mut self, mut m: Mbuf, len: usize, cache: &mut MempoolCache) -> RxBuf {
        let h = self.hdr_len;
        if self.skip > 0 {
            self.skip -= 1;
            cache.free(m);
            return RxBuf::Nothing;
        }
        if let Some((mut head, left)) = self.pending.take() {
            // A later buffer of a merged packet: frame bytes from the header's place on.
            let ok = len > 0 && m.prepend(h).is_some() && m.set_data_len(len);
            if !ok {
                // Empty or longer than the buffer: the packet is lost, its other buffers too.
                self.skip = left - 1;
                cache.free(m);
                cache.free(head);
                return RxBuf::Error;
            }
            if let Err(m) = head.chain(m) {
                self.skip = left - 1;
                cache.free(m);
                cache.free(head);
                return RxBuf::Dropped;
            }
            if left == 1 {
                return RxBuf::Packet(head);
            }
            self.pending = Some((head, left - 1));
            return RxBuf::Nothing;
        }
        // Not reached: the caller checked that a skip or a pending packet is there.
        cache.free(m);
        RxBuf::Error
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
        // Reap first, requesting each buffer's header line (the back end just wrote it, and
        // `take` reads num_buffers there), then take them: the misses overlap instead of
        // costing one round trip between the cores per packet.
        let mut used = [(0u16, 0u32); RX_REAP];
        let mut n = 0;
        while n < pkts.room().min(RX_REAP) {
            match self.q.reap() {
                Ok(Some((id, len))) => {
                    // Both lines `take` reads, neither needed to find the other.
                    if let (Some(Some(m)), Some(&at)) =
                        (self.slots.get(id as usize), self.hdr_at.get(id as usize))
                    {
                        m.prefetch_meta();
                        crate::virtio::mem::prefetch_line(at as *const u8);
                    }
                    used[n] = (id, len);
                    n += 1;
                }
                Ok(None) => break,
                Err(_) => {
                    // The back end wrote a used entry for a buffer it does not have.
                    self.broken = true;
                    errors += 1;
                    break;
                }
            }
        }
        for &(id, len) in &used[..n] {
            let Some(m) = self.slots.get_mut(id as usize).and_then(Option::take) else {
                errors += 1;
                continue;
            };
            match self.take(m, len as usize, cache) {
                RxBuf::Packet(mut m) => {
                    m.set_rx_port(port, queue);
                    bytes += m.pkt_len() as u64;
                    // Cannot fail: the loop runs while there is room.
                    let _ = pkts.push(m);
                    got += 1;
                }
                RxBuf::Nothing => {}
                RxBuf::Dropped => drops += 1,
                RxBuf::Error => errors += 1,
            }
        }
        self.refill(cache);
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
}

/// Most segments of a transmitted chain posted as they are (one descriptor each); longer chains
/// are copied into one buffer.
const TX_MAX_SEGS: usize = 64;

/// A running transmit vring.
struct TxRun {
    q: DriverQueue,
    /// Id → the packet posted under it.
    slots: Box<[Option<Mbuf>]>,
    kick: EventFd,
    hdr_len: usize,
    /// The pool segment the back end can read: packets elsewhere are copied into it first.
    shared_lo: usize,
    shared_hi: usize,
    broken: bool,
    /// `q.implied()` as last reported to [`Shared::implied`].
    implied_seen: u64,
}

impl TxRun {
    /// Frees up to `limit` packets the back end is done with. A few at a time, not the whole
    /// ring: they go to the lcore's cache and come straight back out for the next packets,
    /// where a ring's worth would overflow the cache into the pool's FIFO ring and come back
    /// cold.
    #[inline]
    fn reclaim(&mut self, cache: &mut MempoolCache, limit: usize) {
        for _ in 0..limit {
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

    /// Whether a buffer (start address and length in this process) lies in the memory the back
    /// end can read.
    #[inline(always)]
    fn shared_span(&self, (start, len): (usize, usize)) -> bool {
        start >= self.shared_lo && start + len <= self.shared_hi
    }

    /// Ring descriptors a packet takes: one per segment of a chain posted as it is, one for a
    /// single buffer or a copy.
    #[inline(always)]
    fn descs(m: &Mbuf) -> usize {
        match m.nb_segs() as usize {
            n if n <= TX_MAX_SEGS => n,
            _ => 1,
        }
    }

    /// How many packets from the front of `pkts` surely fit in `free` descriptors when some are
    /// chains (with IN_ORDER a split chain may also skip the table's tail: at most its length
    /// less one, once per burst).
    #[cold]
    fn fit(pkts: &Burst, free: usize) -> usize {
        let (mut need, mut widest, mut n) = (0usize, 1usize, 0usize);
        for m in pkts.as_slice() {
            let d = Self::descs(m);
            if need + d + (widest.max(d) - 1) > free {
                break;
            }
            need += d;
            widest = widest.max(d);
            n += 1;
        }
        n
    }

    /// Posts one packet: in place when it lies in memory the back end reads and its head has
    /// room for the header, else as a copy in a buffer of ours. Gives back (id, the mbuf posted)
    /// or nothing (dropped: no buffer for a copy, too large, or the ring refused it).
    #[inline(always)]
    fn post(&mut self, mut m: Mbuf, cache: &mut MempoolCache) -> Option<u16> {
        let h = self.hdr_len;
        if m.nb_segs() == 1 {
            let start = m.data_ptr() as usize - m.headroom();
            if m.headroom() >= h && self.shared_span((start, m.buf_len())) {
                let len = m.data_len();
                if let Some(hdr) = m.prepend(h) {
                    crate::virtio::net::clear_hdr(hdr);
                }
                return self.add(&[(m.data_iova(), (len + h) as u32, false)], m, cache);
            }
        } else if m.nb_segs() as usize <= TX_MAX_SEGS
            && m.headroom() >= h
            && m.segments().all(|s| self.shared_span(s.buf_span()))
        {
            if let Some(hdr) = m.prepend(h) {
                crate::virtio::net::clear_hdr(hdr);
            }
            let mut bufs = [(0u64, 0u32, false); TX_MAX_SEGS];
            let segs = m.nb_segs() as usize;
            for (b, s) in bufs.iter_mut().zip(m.segments()) {
                *b = (s.data_iova(), s.data_len() as u32, false);
            }
            return self.add(&bufs[..segs], m, cache);
        }
        self.post_copy(m, cache)
    }

    /// Posts `m` as the chain `bufs`; frees it if the ring refuses.
    #[inline(always)]
    fn add(&mut self, bufs: &[(u64, u32, bool)], m: Mbuf, cache: &mut MempoolCache) -> Option<u16> {
        match self.q.add(bufs) {
            Ok(id) => {
                self.slots[id as usize] = Some(m);
                Some(id)
            }
            Err(_) => {
                cache.free(m);
                None
            }
        }
    }

    /// Not in memory the back end sees (another pool), no room for the header, or too many
    /// segments: copied into one of our buffers, which is posted.
    #[cold]
    fn post_copy(&mut self, m: Mbuf, cache: &mut MempoolCache) -> Option<u16> {
        let h = self.hdr_len;
        let len = m.pkt_len();
        let copy = cache.alloc().and_then(|mut c| {
            let ok = c.append(len).map(|d| m.read_at(0, d)) == Some(len);
            match c.prepend(h) {
                Some(hdr) if ok => {
                    crate::virtio::net::clear_hdr(hdr);
                    Some(c)
                }
                _ => {
                    cache.free(c);
                    None
                }
            }
        });
        cache.free(m);
        let c = copy?;
        let iova = c.data_iova();
        self.add(&[(iova, (len + h) as u32, false)], c, cache)
    }

    /// How many packets from the front of `pkts` fit in the free descriptors.
    #[inline(always)]
    fn fitting(&self, pkts: &Burst) -> usize {
        let free = self.q.free_count() as usize;
        let n = pkts.len().min(free);
        if pkts.as_slice()[..n].iter().any(|m| m.nb_segs() > 1) {
            return Self::fit(pkts, free);
        }
        n
    }

    #[inline]
    fn burst(&mut self, pkts: &mut Burst, cache: &mut MempoolCache, stats: &QueueStats) -> usize {
        if self.broken {
            return 0;
        }
        // Transmitted buffers are taken back only when the ring runs short (fewer free
        // descriptors than the threshold, or than this burst needs): reading the used entries
        // every burst meets the back end on the lines it is writing them to.
        let mut reclaimed = false;
        if (self.q.free_count() as usize) < pkts.len().max(TX_FREE_THRESH) {
            self.reclaim(cache, TX_RECLAIM);
            reclaimed = true;
        }
        let mut n = self.fitting(pkts);
        if n < pkts.len() && !reclaimed {
            // Chains need more descriptors than one per packet.
            self.reclaim(cache, usize::from(self.q.size()));
            n = self.fitting(pkts);
        }
        // The header goes in each packet's headroom, a line nothing else in this burst has
        // touched: ask for all of them at once so the misses overlap instead of queueing one
        // behind the other in `post`.
        let back = -(self.hdr_len as isize);
        for m in &pkts.as_slice()[..n] {
            m.prefetch_at(back);
        }
        let (mut posted, mut bytes, mut drops) = (0u64, 0u64, 0u64);
        pkts.drain_front(n, |m| {
            let len = m.pkt_len() as u64;
            if self.post(m, cache).is_some() {
                posted += 1;
                bytes += len;
            } else {
                drops += 1;
            }
        });
        if posted > 0 && self.q.publish_avail() {
            kick(&self.kick);
        }
        if posted > 0 {
            stats.add(posted, bytes);
        }
        if drops > 0 {
            stats.add_drops(drops);
        }
        posted as usize
    }
}

struct VuRx {
    shared: Arc<Shared>,
    q: usize,
    port: u16,
    queue: u16,
    cache: MempoolCache,
    stats: Arc<QueueStats>,
}

impl RxQueue for VuRx {
    #[inline]
    fn rx_burst(&mut self, pkts: &mut Burst) -> usize {
        let (stats, port, queue) = (&self.stats, self.port, self.queue);
        let implied = &self.shared.implied[2 * self.q];
        let rx = &self.shared.rx[self.q];
        self.cache.local(|cache| {
            rx.enter(|run| {
                let n = run.burst(pkts, cache, stats, port, queue);
                report_implied(&run.q, &mut run.implied_seen, implied);
                n
            })
            .unwrap_or(0)
        })
    }

    fn stats(&self) -> &Arc<QueueStats> {
        &self.stats
    }
}

struct VuTx {
    shared: Arc<Shared>,
    q: usize,
    cache: MempoolCache,
    stats: Arc<QueueStats>,
    /// Drop every Nth packet offered (0: never); `offered` packets were offered so far.
    drop_every: u64,
    offered: u64,
}

impl VuTx {
    /// The `drop_every` path (tests only): of the packets the ring has room for, every Nth is
    /// freed and counted as a drop (a packet refused because the ring is full is not counted
    /// again when it is offered again); the others go to the ring, and what it does not take
    /// goes back to `pkts` in order.
    #[cold]
    fn tx_burst_dropping(&mut self, pkts: &mut Burst) -> usize {
        let room = self.shared.tx[self.q]
            .enter(|run| run.q.free_count() as usize)
            .unwrap_or(0);
        let mut keep = Burst::new(MAX_BURST);
        let (every, mut offered, mut dropped) = (self.drop_every, self.offered, 0u64);
        let cache = &mut self.cache;
        pkts.drain_front(pkts.len().min(room), |m| {
            offered += 1;
            if offered % every == 0 {
                dropped += 1;
                cache.free(m);
            } else {
                // Cannot fail: `keep` holds MAX_BURST, a burst holds at most that.
                let _ = keep.push(m);
            }
        });
        self.offered = offered;
        if dropped > 0 {
            self.stats.add_drops(dropped);
        }
        let sent = self.send(&mut keep);
        // Unsent ones go back in front of those never considered, in order.
        let mut rest = Burst::new(MAX_BURST);
        pkts.drain_front(pkts.len(), |m| {
            let _ = rest.push(m);
        });
        for b in [&mut keep, &mut rest] {
            b.drain_front(b.len(), |m| {
                let _ = pkts.push(m);
            });
        }
        sent
    }

    #[inline]
    fn send(&mut self, pkts: &mut Burst) -> usize {
        let stats = &self.stats;
        let implied = &self.shared.implied[2 * self.q + 1];
        let tx = &self.shared.tx[self.q];
        // While no back end is set up nothing is taken: the caller frees and counts the drops.
        self.cache.local(|cache| {
            tx.enter(|run| {
                let n = run.burst(pkts, cache, stats);
                report_implied(&run.q, &mut run.implied_seen, implied);
                n
            })
            .unwrap_or(0)
        })
    }
}

impl TxQueue for VuTx {
    #[inline]
    fn tx_burst(&mut self, pkts: &mut Burst) -> usize {
        if self.drop_every > 0 {
            return self.tx_burst_dropping(pkts);
        }
        self.send(pkts)
    }

    fn stats(&self) -> &Arc<QueueStats> {
        &self.stats
    }
}

// =============================================================================================
// Control thread
// =============================================================================================

/// A running control thread. Dropping it stops the thread (which stops the back end's rings and
/// closes the connection) and removes the socket in server mode.
struct ControlHandle {
    shared: Arc<Shared>,
    stop: Arc<EventFd>,
    thread: Option<JoinHandle<()>>,
    path: PathBuf,
    server: bool,
}

impl ControlHandle {
    fn start(
        cfg: &Config,
        pool: &Arc<Mempool>,
        port_id: u16,
    ) -> std::result::Result<Self, VhostError> {
        let sock_err = |why: String| VhostError::Socket {
            path: cfg.path.clone(),
            why,
        };
        let listener = if cfg.server {
            if cfg.path.exists() {
                if UnixStream::connect(&cfg.path).is_ok() {
                    return Err(sock_err("another process is listening on it".into()));
                }
                let _ = std::fs::remove_file(&cfg.path);
            }
            Some(UnixListener::bind(&cfg.path).map_err(|e| sock_err(format!("bind: {e}")))?)
        } else {
            None
        };
        let pool_seg = Arc::clone(pool.zone().segment());
        let (rings, offsets, mem) = ring_memory(cfg, port_id, &pool_seg).map_err(&sock_err)?;
        let stop = Arc::new(
            EventFd::from_flags(EfdFlags::EFD_CLOEXEC | EfdFlags::EFD_NONBLOCK)
                .map_err(|e| sock_err(format!("eventfd: {e}")))?,
        );
        let shared = Shared::new(cfg.pairs);
        let mut ctl = Control {
            cfg: cfg.clone(),
            port_id,
            pool: Arc::clone(pool),
            pool_seg,
            rings,
            offsets,
            mem,
            shared: Arc::clone(&shared),
            parked: (0..cfg.pairs).map(|_| Vec::new()).collect(),
            listener,
            stop: Arc::clone(&stop),
            withheld: Vec::new(),
            warned_mrg: false,
            warned_in_order: false,
        };
        let thread = std::thread::Builder::new()
            .name("virtio-user-ctl".into())
            .spawn(move || ctl.run())
            .map_err(|e| sock_err(format!("spawn: {e}")))?;
        Ok(ControlHandle {
            shared,
            stop,
            thread: Some(thread),
            path: cfg.path.clone(),
            server: cfg.server,
        })
    }
}

impl Drop for ControlHandle {
    fn drop(&mut self) {
        let _ = self.stop.write(1);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        if self.server {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// Memory for every vring of the port (one slot per vring, big enough for either layout with
/// EVENT_IDX), its slot offsets, and the guest memory (pool + rings) the back end is given.
fn ring_memory(
    cfg: &Config,
    port_id: u16,
    pool_seg: &Arc<Segment>,
) -> std::result::Result<(Arc<Segment>, Vec<u64>, GuestMemory), String> {
    let mut offsets = Vec::with_capacity(cfg.pairs as usize * 2);
    let mut total = 0u64;
    for _ in 0..cfg.pairs {
        for size in [cfg.rx_size, cfg.tx_size] {
            offsets.push(total);
            let need = ring_layout(size, false, true)
                .total
                .max(ring_layout(size, true, true).total);
            total += need.next_multiple_of(4096);
        }
    }
    let rings = Segment::new(
        &format!("virtio-user{port_id}-rings"),
        total as usize,
        MemMode::NoHuge,
    )
    .map_err(|e| format!("ring memory: {e}"))?;
    let mem = GuestMemory::new(vec![
        GuestRegion::from_segment(pool_seg),
        GuestRegion::from_segment(&rings),
    ])
    .map_err(|e| format!("memory table: {e}"))?;
    Ok((rings, offsets, mem))
}

/// The back end's process, to tell after a hang-up whether it can still touch our memory.
enum Peer {
    /// Its pidfd (`SO_PEERPIDFD`, Linux 6.5+): readable once the process has exited.
    Pidfd(std::os::fd::OwnedFd),
    /// Not known (an older kernel): it may still run.
    Unknown,
}

impl Peer {
    fn of(stream: &UnixStream) -> Peer {
        match nix::sys::socket::getsockopt(stream, nix::sys::socket::sockopt::PeerPidfd) {
            Ok(fd) => Peer::Pidfd(fd),
            Err(_) => Peer::Unknown,
        }
    }

    /// Whether the process has exited (none of its threads runs), waiting at most `wait`.
    fn exited(&self, wait: Duration) -> bool {
        let Peer::Pidfd(fd) = self else { return false };
        let mut fds = [PollFd::new(fd.as_fd(), PollFlags::POLLIN)];
        let t = PollTimeout::try_from(wait).unwrap_or(PollTimeout::MAX);
        matches!(poll(&mut fds, t), Ok(n) if n > 0)
    }
}

/// Buffers (and ring memory) a back end was given and may still access: its rings were not
/// confirmed stopped and its process had not exited. Kept out of use until it exits.
struct Withheld {
    peer: Peer,
    bufs: Vec<Mbuf>,
    _rings: Arc<Segment>,
}

/// What was negotiated with one back end.
#[derive(Debug, Clone, Copy)]
struct Negotiated {
    features: u64,
    protocol: bool,
}

/// How a session with a back end ended.
enum End {
    /// The port stops.
    Stop,
    /// The back end went away (or failed): connect again.
    Gone,
}

struct Control {
    cfg: Config,
    port_id: u16,
    pool: Arc<Mempool>,
    pool_seg: Arc<Segment>,
    rings: Arc<Segment>,
    /// Per vring (2q = rx, 2q + 1 = tx): offset of its rings in `rings`.
    offsets: Vec<u64>,
    mem: GuestMemory,
    shared: Arc<Shared>,
    /// Per rx queue: empty buffers that were posted to a back end that went away.
    parked: Vec<Vec<Mbuf>>,
    listener: Option<UnixListener>,
    stop: Arc<EventFd>,
    /// Buffers of back ends that may still access them (see [`Withheld`]).
    withheld: Vec<Withheld>,
    warned_mrg: bool,
    warned_in_order: bool,
}

impl Control {
    fn run(&mut self) {
        let path = self.cfg.path.display().to_string();
        loop {
            self.release_withheld();
            let Some(stream) = self.next_back_end(&path) else {
                break;
            };
            match self.session(stream, &path) {
                Ok(End::Stop) => break,
                Ok(End::Gone) => {
                    tracing::warn!("virtio-user {path}: the back end went away; reconnecting");
                }
                Err(e) => {
                    let text = e.to_string();
                    let mut last = self
                        .shared
                        .last_error
                        .lock()
                        .unwrap_or_else(|p| p.into_inner());
                    if last.as_deref() != Some(text.as_str()) {
                        tracing::error!("virtio-user {path}: {text}");
                    }
                    *last = Some(text);
                    drop(last);
                    if self.listener.is_none() && sleep_or_stop(&self.stop, Duration::from_secs(1))
                    {
                        break;
                    }
                }
            }
        }
        self.release_withheld();
        let mut kept = 0usize;
        for w in self.withheld.drain(..) {
            for m in w.bufs {
                // Given up for good: never back in the pool (its memory stays mapped).
                let _ = m.into_raw();
                kept += 1;
            }
        }
        if kept > 0 {
            // A back end that may still read or write them: they never go back to the pool.
            tracing::warn!(
                "virtio-user {path}: {kept} buffers stay out of the pool: a back end whose rings \
                 were not confirmed stopped still runs"
            );
        }
    }

    /// Returns the buffers of departed back ends whose process has exited since to the pool.
    fn release_withheld(&mut self) {
        let path = self.cfg.path.display();
        self.withheld.retain(|w| {
            if !w.peer.exited(Duration::ZERO) {
                return true;
            }
            tracing::info!(
                "virtio-user {path}: the back end's process has exited: its {} withheld buffers are free again",
                w.bufs.len()
            );
            false
        });
    }

    /// Waits for the next back end: accepts (server mode) or connects with a 1 s retry, with one
    /// status line while there is none. None when the port stops.
    fn next_back_end(&mut self, path: &str) -> Option<UnixStream> {
        if let Some(l) = &self.listener {
            loop {
                if !wait_readable(l, &self.stop) {
                    return None;
                }
                match l.accept() {
                    Ok((s, _)) => return Some(s),
                    Err(e) => tracing::warn!("virtio-user {path}: accept: {e}"),
                }
            }
        }
        let mut told = false;
        loop {
            match UnixStream::connect(&self.cfg.path) {
                Ok(s) => {
                    if told {
                        tracing::warn!("virtio-user {path}: back end found; connecting");
                    }
                    return Some(s);
                }
                Err(e) => {
                    if !told {
                        tracing::warn!(
                            "virtio-user {path}: no back end listening ({e}); retrying every second"
                        );
                        told = true;
                    }
                    if sleep_or_stop(&self.stop, Duration::from_secs(1)) {
                        return None;
                    }
                    self.release_withheld();
                }
            }
        }
    }

    fn session(&mut self, stream: UnixStream, path: &str) -> std::result::Result<End, VhostError> {
        let peer = Peer::of(&stream);
        let mut fe = Frontend::new(stream)?;
        let neg = self.negotiate(&mut fe)?;
        if let Err(e) = self.start_rings(&mut fe, neg) {
            // Some rings may run already: stop them before anything is reused.
            self.stop_rings(Some(&mut fe), peer);
            return Err(e);
        }
        self.shared.features.store(neg.features, Ordering::Relaxed);
        self.shared.connections.fetch_add(1, Ordering::Relaxed);
        self.shared.link_up.store(true, Ordering::Release);
        *self
            .shared
            .last_error
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = None;
        let on_off = |bit: u64| if neg.features & bit != 0 { "on" } else { "off" };
        tracing::info!(
            "virtio-user {path}: back end set up: {} rings, mergeable rx buffers {}, in-order {}, {} queue pair(s)",
            if neg.features & vf::RING_PACKED != 0 {
                "packed"
            } else {
                "split"
            },
            on_off(vf::NET_MRG_RXBUF),
            on_off(vf::IN_ORDER),
            self.cfg.pairs
        );
        // Nothing more to say: wait for the back end to hang up or the port to stop.
        loop {
            if !wait_readable(fe.stream(), &self.stop) {
                self.shared.link_up.store(false, Ordering::Release);
                self.stop_rings(Some(&mut fe), peer);
                return Ok(End::Stop);
            }
            let mut probe = [0u8; 1];
            let fd = std::os::fd::AsRawFd::as_raw_fd(fe.stream());
            let peek = nix::sys::socket::recv(
                fd,
                &mut probe,
                nix::sys::socket::MsgFlags::MSG_PEEK | nix::sys::socket::MsgFlags::MSG_DONTWAIT,
            );
            match peek {
                Err(nix::errno::Errno::EAGAIN | nix::errno::Errno::EINTR) => continue,
                Ok(0) | Err(_) => break,
                Ok(_) => {
                    // The back end has nothing to send on this channel: a protocol error.
                    tracing::warn!(
                        "virtio-user {path}: unexpected message from the back end; closing"
                    );
                    break;
                }
            }
        }
        self.shared.link_up.store(false, Ordering::Release);
        self.stop_rings(None, peer);
        Ok(End::Gone)
    }

    fn negotiate(&mut self, fe: &mut Frontend) -> std::result::Result<Negotiated, VhostError> {
        let missing = |feature, asked: String| VhostError::MissingFeature { feature, asked };
        fe.set_owner()?;
        let offered = fe.get_features()?;
        if offered & vf::VERSION_1 == 0 {
            return Err(missing(
                "VIRTIO_F_VERSION_1",
                "virtio-user (it drives virtio 1.x devices only)".into(),
            ));
        }
        let mut want = vf::VERSION_1;
        if self.cfg.packed {
            if offered & vf::RING_PACKED == 0 {
                return Err(missing("VIRTIO_F_RING_PACKED", "packed=1".into()));
            }
            want |= vf::RING_PACKED;
        }
        match self.cfg.mrg {
            Want::On if offered & vf::NET_MRG_RXBUF == 0 => {
                return Err(missing("VIRTIO_NET_F_MRG_RXBUF", "mrg_rxbuf=1".into()));
            }
            Want::On => want |= vf::NET_MRG_RXBUF,
            Want::Auto if offered & vf::NET_MRG_RXBUF != 0 => want |= vf::NET_MRG_RXBUF,
            Want::Auto => {
                if !self.warned_mrg {
                    tracing::warn!(
                        "virtio-user {}: the back end does not offer mergeable rx buffers; running without",
                        self.cfg.path.display()
                    );
                    self.warned_mrg = true;
                }
            }
            Want::Off => {}
        }
        match self.cfg.in_order {
            Want::On if offered & vf::IN_ORDER == 0 => {
                return Err(missing("VIRTIO_F_IN_ORDER", "in_order=1".into()));
            }
            Want::On => want |= vf::IN_ORDER,
            Want::Auto if offered & vf::IN_ORDER != 0 => want |= vf::IN_ORDER,
            Want::Auto => {
                if !self.warned_in_order {
                    tracing::warn!(
                        "virtio-user {}: the back end does not offer VIRTIO_F_IN_ORDER; running without",
                        self.cfg.path.display()
                    );
                    self.warned_in_order = true;
                }
            }
            Want::Off => {}
        }
        want |= offered & vf::RING_EVENT_IDX;
        let pairs = self.cfg.pairs;
        if pairs > 1 {
            if offered & vf::NET_MQ == 0 {
                return Err(missing("VIRTIO_NET_F_MQ", format!("queues={pairs}")));
            }
            want |= vf::NET_MQ;
        }
        let protocol = offered & vf::VHOST_USER_F_PROTOCOL_FEATURES != 0;
        if protocol {
            want |= vf::VHOST_USER_F_PROTOCOL_FEATURES;
            let p = fe.get_protocol_features()?;
            fe.set_protocol_features(p & (proto::MQ | proto::REPLY_ACK))?;
            if pairs > 1 {
                if p & proto::MQ == 0 {
                    return Err(missing(
                        "VHOST_USER_PROTOCOL_F_MQ",
                        format!("queues={pairs}"),
                    ));
                }
                let n = fe.get_queue_num()?;
                if n < u64::from(pairs) {
                    return Err(VhostError::Unsupported {
                        req: "GET_QUEUE_NUM",
                        what: format!(
                            "the back end has {n} queue pairs, queues={pairs} asks for more"
                        ),
                    });
                }
            }
        } else if pairs > 1 {
            return Err(missing(
                "VHOST_USER_F_PROTOCOL_FEATURES",
                format!("queues={pairs} (rings are enabled per pair with it)"),
            ));
        }
        fe.set_features(want)?;
        let regions: Vec<MemRegion> = [&self.pool_seg, &self.rings]
            .iter()
            .map(|s| MemRegion {
                gpa: s.iova(),
                size: s.len() as u64,
                uva: s.iova(),
                mmap_offset: 0,
            })
            .collect();
        fe.set_mem_table(&regions, &[self.pool_seg.as_fd(), self.rings.as_fd()])?;
        Ok(Negotiated {
            features: want,
            protocol,
        })
    }

    /// Builds every vring (rx rings full of empty buffers), tells the back end where they are,
    /// opens the gates and enables the rings.
    fn start_rings(
        &mut self,
        fe: &mut Frontend,
        neg: Negotiated,
    ) -> std::result::Result<(), VhostError> {
        let f = neg.features;
        let h = hdr_len(f);
        let mrg = f & vf::NET_MRG_RXBUF != 0;
        let base = if f & vf::RING_PACKED != 0 { 0x8000 } else { 0 };
        let (lo, hi) = (
            self.pool_seg.base() as usize,
            self.pool_seg.base() as usize + self.pool_seg.len(),
        );
        let mut rx_runs = Vec::new();
        let mut tx_runs = Vec::new();
        for vring in 0..self.offsets.len() {
            let rx = vring % 2 == 0;
            let size = if rx {
                self.cfg.rx_size
            } else {
                self.cfg.tx_size
            };
            let cfg = QueueConfig::at(self.rings.iova() + self.offsets[vring], size, f);
            let mut q = DriverQueue::new(&cfg, &self.mem)?;
            // vdpakit polls: no used-buffer notifications.
            q.set_interrupts(false);
            let efd = || {
                EventFd::from_flags(EfdFlags::EFD_CLOEXEC | EfdFlags::EFD_NONBLOCK)
                    .map_err(|e| VhostError::Conn(std::io::Error::from(e).into()))
            };
            let (kick_fd, call_fd) = (efd()?, efd()?);
            let i = vring as u32;
            fe.set_vring_call(i, Some(call_fd.as_fd()))?;
            fe.set_vring_num(i, u32::from(size))?;
            fe.set_vring_base(i, base)?;
            fe.set_vring_addr(&VringAddr {
                index: i,
                flags: 0,
                desc: cfg.desc,
                used: cfg.used,
                avail: cfg.avail,
                log: 0,
            })?;
            let slots: Box<[Option<Mbuf>]> = (0..size).map(|_| None).collect();
            if rx {
                let mut run = RxRun {
                    q,
                    hdr_at: vec![0; slots.len()].into_boxed_slice(),
                    slots,
                    kick: kick_fd,
                    hdr_len: h,
                    mrg,
                    buf_len: self.cfg.rx_buf,
                    pending: None,
                    skip: 0,
                    broken: false,
                    implied_seen: 0,
                    fill: Burst::new(MAX_BURST),
                };
                // Fill the ring before the back end may look at it: parked buffers first.
                let parked = &mut self.parked[vring / 2];
                while run.q.free_count() > 0 {
                    let Some(m) = parked.pop().or_else(|| self.pool.alloc()) else {
                        break;
                    };
                    if let Err(m) = run.post(m) {
                        parked.push(m);
                        break;
                    }
                }
                run.q.publish_avail();
                fe.set_vring_kick(i, Some(run.kick.as_fd()))?;
                rx_runs.push(run);
            } else {
                let run = TxRun {
                    q,
                    slots,
                    kick: kick_fd,
                    hdr_len: h,
                    shared_lo: lo,
                    shared_hi: hi,
                    broken: false,
                    implied_seen: 0,
                };
                fe.set_vring_kick(i, Some(run.kick.as_fd()))?;
                tx_runs.push(run);
            }
            // Our copy of the call fd goes: we never wait on it.
            drop(call_fd);
        }
        for (h, run) in self.shared.rx.iter().zip(rx_runs) {
            let mut g = h.close();
            *g.state() = Some(run);
            g.open();
        }
        for (h, run) in self.shared.tx.iter().zip(tx_runs) {
            let mut g = h.close();
            *g.state() = Some(run);
            g.open();
        }
        if neg.protocol {
            for i in 0..self.offsets.len() {
                fe.set_vring_enable(i as u32, true)?;
            }
        }
        Ok(())
    }

    /// Takes every ring away from the datapath and, with a connection (`fe`), stops the back
    /// end's rings: GET_VRING_BASE for each, whose reply confirms the back end no longer uses
    /// it (vhost-user: "the back-end must stop the ring"). Only then are the ring's buffers used
    /// again: transmitted packets it did not consume are counted as lost and freed, received
    /// ones no queue reaped are counted late, empty receive buffers are parked for the next
    /// back end. Without confirmation (no reply, or the back end hung up) the buffers are used
    /// again only if its process has exited (`peer`; after a hang-up it gets a second to do
    /// so); otherwise they and the ring memory are withheld until it exits ([`Withheld`]).
    fn stop_rings(&mut self, fe: Option<&mut Frontend>, peer: Peer) {
        let mut rx: Vec<Option<RxRun>> = self
            .shared
            .rx
            .iter()
            .map(|h| h.close().state().take())
            .collect();
        let mut tx: Vec<Option<TxRun>> = self
            .shared
            .tx
            .iter()
            .map(|h| h.close().state().take())
            .collect();
        let path = self.cfg.path.display().to_string();
        let implied: u64 = self
            .shared
            .implied
            .iter()
            .map(|a| a.load(Ordering::Relaxed))
            .sum();
        if implied > 0 {
            tracing::info!(
                "virtio-user {path}: {implied} chains completed by in-order batches so far"
            );
        }
        let mut stopped = vec![false; self.offsets.len()];
        let hung_up = fe.is_none();
        if let Some(fe) = fe {
            for (i, s) in stopped.iter_mut().enumerate() {
                match fe.get_vring_base(i as u32) {
                    Ok(_) => *s = true,
                    Err(e) => {
                        // After a failed exchange the connection's state is unknown: no more.
                        tracing::warn!(
                            "virtio-user {path}: stopping vring {i} (GET_VRING_BASE): {e}"
                        );
                        break;
                    }
                }
            }
        }
        let confirmed = stopped.iter().all(|&s| s);
        let exited = !confirmed
            && peer.exited(if hung_up {
                Duration::from_secs(1)
            } else {
                Duration::from_millis(100)
            });
        if exited {
            tracing::info!(
                "virtio-user {path}: the back end's process has exited: the buffers it had are used again"
            );
        }
        let safe = |vring: usize| stopped[vring] || exited;
        let mut withheld = Vec::new();
        for (q, run) in tx.iter_mut().enumerate() {
            let Some(run) = run.take() else { continue };
            let TxRun {
                q: mut dq,
                mut slots,
                ..
            } = run;
            // Completed: the back end is done with these.
            while let Ok(Some((id, _))) = dq.reap() {
                if let Some(s) = slots.get_mut(id as usize) {
                    s.take();
                }
            }
            let left = slots.iter_mut().filter_map(Option::take);
            let lost = if safe(2 * q + 1) {
                left.count()
            } else {
                let n = withheld.len();
                withheld.extend(left);
                withheld.len() - n
            };
            self.shared.tx_lost[q].fetch_add(lost as u64, Ordering::Relaxed);
        }
        let mut cache = self.pool.cache(0);
        for (q, run) in rx.iter_mut().enumerate() {
            let Some(mut run) = run.take() else { continue };
            // Packets delivered that no rx_burst took: received, and dropped here. A merged
            // packet still missing buffers counts once too.
            let mut late = 0u64;
            while let Ok(Some((id, len))) = run.q.reap() {
                let Some(m) = run.slots.get_mut(id as usize).and_then(Option::take) else {
                    continue;
                };
                match run.take(m, len as usize, &mut cache) {
                    RxBuf::Packet(m) => {
                        late += 1;
                        cache.free(m);
                    }
                    RxBuf::Dropped => late += 1,
                    RxBuf::Nothing | RxBuf::Error => {}
                }
            }
            if let Some((m, _)) = run.pending.take() {
                late += 1;
                cache.free(m);
            }
            self.shared.rx_late[q].fetch_add(late, Ordering::Relaxed);
            let empty = run.slots.iter_mut().filter_map(Option::take);
            if safe(2 * q) {
                self.parked[q].extend(empty);
            } else {
                withheld.extend(empty);
            }
        }
        drop(cache);
        if !stopped.iter().all(|&s| s) && !exited {
            tracing::warn!(
                "virtio-user {path}: the back end {}; its process still runs, so {} buffers it \
                 was given are withheld until it exits",
                if hung_up {
                    "hung up without its rings being stopped"
                } else {
                    "did not confirm that its rings stopped"
                },
                withheld.len()
            );
            // The ring memory too: the next back end gets fresh rings.
            match ring_memory(&self.cfg, self.port_id, &self.pool_seg) {
                Ok((rings, offsets, mem)) => {
                    let old = std::mem::replace(&mut self.rings, rings);
                    self.offsets = offsets;
                    self.mem = mem;
                    self.withheld.push(Withheld {
                        peer,
                        bufs: withheld,
                        _rings: old,
                    });
                }
                Err(e) => {
                    tracing::error!("virtio-user {path}: new ring memory: {e}");
                    self.withheld.push(Withheld {
                        peer,
                        bufs: withheld,
                        _rings: Arc::clone(&self.rings),
                    });
                }
            }
        }
    }
}

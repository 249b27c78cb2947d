//! The port API every port kind implements, and the registry that builds ports from specs.
//!
//! Life of a port: [`create`] from a `KIND[:key=val,...]` spec → [`Port::configure`] (queues,
//! descriptors) → [`Port::start`] → [`Port::take_queues`] hands out one [`RxQueue`] and one
//! [`TxQueue`] per queue index; each is moved to the lcore that polls it (one owner, so bursts
//! need no locks) → the lcores return the queues → [`Port::stop`].
//!
//! Counters: every queue has a [`QueueStats`] block (cache-line padded atomics written only by
//! the queue's owner with plain relaxed stores, read by the stats thread), so the port can report
//! live per-queue and per-port figures while the lcores run.

mod null;
mod rep;
mod ring;
mod spec;
mod vhost_user;
mod virtio_user;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use crossbeam_utils::CachePadded;

pub use self::ring::RingRegistry;
pub use self::spec::{PortSpec, SpecArgs};
pub use self::virtio_user::VirtioUserPort;
use crate::error::{Error, Result};
use crate::mbuf::Burst;
use crate::mempool::Mempool;

/// Queue and descriptor counts for [`Port::configure`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PortConf {
    /// Receive queues.
    pub rx_queues: u16,
    /// Transmit queues.
    pub tx_queues: u16,
    /// Descriptors (ring entries) per receive queue.
    pub rx_desc: u16,
    /// Descriptors (ring entries) per transmit queue.
    pub tx_desc: u16,
}

impl Default for PortConf {
    fn default() -> Self {
        PortConf {
            rx_queues: 1,
            tx_queues: 1,
            rx_desc: 1024,
            tx_desc: 1024,
        }
    }
}

/// Link state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LinkStatus {
    /// Whether the link is up.
    pub up: bool,
    /// Speed in Mbit/s (0 when unknown or virtual).
    pub speed_mbps: u32,
}

/// Live counters of one queue direction. Written by the queue's owner only.
#[derive(Debug, Default)]
pub struct QueueStats {
    packets: CachePadded<AtomicU64>,
    bytes: AtomicU64,
    drops: AtomicU64,
    errors: AtomicU64,
}

/// A snapshot of counters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counters {
    /// Packets received or sent.
    pub packets: u64,
    /// Bytes received or sent (L2, no FCS).
    pub bytes: u64,
    /// Packets dropped (no buffer, ring full, refused by the peer...).
    pub drops: u64,
    /// Errors (malformed, device error).
    pub errors: u64,
}

impl std::ops::AddAssign for Counters {
    fn add_assign(&mut self, o: Counters) {
        self.packets += o.packets;
        self.bytes += o.bytes;
        self.drops += o.drops;
        self.errors += o.errors;
    }
}

impl QueueStats {
    /// A zeroed block, shared between the owner and readers.
    pub fn new() -> Arc<QueueStats> {
        Arc::new(QueueStats::default())
    }

    // Single writer: a relaxed load + store is enough (no read-modify-write, no lock prefix).
    #[inline(always)]
    fn bump(c: &AtomicU64, n: u64) {
        c.store(c.load(Ordering::Relaxed).wrapping_add(n), Ordering::Relaxed);
    }

    /// Counts `packets` packets of `bytes` bytes. Owner only.
    #[inline(always)]
    pub fn add(&self, packets: u64, bytes: u64) {
        Self::bump(&self.packets, packets);
        Self::bump(&self.bytes, bytes);
    }

    /// Counts dropped packets. Owner only.
    #[inline(always)]
    pub fn add_drops(&self, n: u64) {
        Self::bump(&self.drops, n);
    }

    /// Counts errors. Owner only.
    #[inline(always)]
    pub fn add_errors(&self, n: u64) {
        Self::bump(&self.errors, n);
    }

    /// Reads the counters (any thread).
    pub fn read(&self) -> Counters {
        Counters {
            packets: self.packets.load(Ordering::Relaxed),
            bytes: self.bytes.load(Ordering::Relaxed),
            drops: self.drops.load(Ordering::Relaxed),
            errors: self.errors.load(Ordering::Relaxed),
        }
    }
}

/// Per-port counters: totals and per queue.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PortStats {
    /// Sum over receive queues.
    pub rx: Counters,
    /// Sum over transmit queues.
    pub tx: Counters,
    /// Per receive queue.
    pub rx_queues: Vec<Counters>,
    /// Per transmit queue.
    pub tx_queues: Vec<Counters>,
}

/// The counters blocks of a port's queues, kept by the port for reporting.
#[derive(Debug, Default, Clone)]
pub struct StatsBlocks {
    /// One per receive queue.
    pub rx: Vec<Arc<QueueStats>>,
    /// One per transmit queue.
    pub tx: Vec<Arc<QueueStats>>,
}

impl StatsBlocks {
    /// Fresh blocks for `rx` receive and `tx` transmit queues.
    pub fn new(rx: u16, tx: u16) -> StatsBlocks {
        StatsBlocks {
            rx: (0..rx).map(|_| QueueStats::new()).collect(),
            tx: (0..tx).map(|_| QueueStats::new()).collect(),
        }
    }

    /// A snapshot.
    pub fn read(&self) -> PortStats {
        let mut s = PortStats::default();
        for q in &self.rx {
            let c = q.read();
            s.rx += c;
            s.rx_queues.push(c);
        }
        for q in &self.tx {
            let c = q.read();
            s.tx += c;
            s.tx_queues.push(c);
        }
        s
    }
}

/// The receive side of one queue. Owned by one lcore.
pub trait RxQueue: Send {
    /// Moves up to `pkts.room()` received packets into `pkts`; returns how many.
    fn rx_burst(&mut self, pkts: &mut Burst) -> usize;
    /// The queue's counters.
    fn stats(&self) -> &Arc<QueueStats>;
}

/// The transmit side of one queue. Owned by one lcore.
pub trait TxQueue: Send {
    /// Sends packets from the front of `pkts`; returns how many were taken. What is not sent
    /// stays in `pkts`, with the caller (who retries or frees it and counts a drop).
    fn tx_burst(&mut self, pkts: &mut Burst) -> usize;
    /// The queue's counters (callers count their drops here with `add_drops`).
    fn stats(&self) -> &Arc<QueueStats>;
}

/// One queue index's receive and transmit halves.
pub struct QueuePair {
    /// Queue index.
    pub queue: u16,
    /// Receive half (None when the port has fewer receive than transmit queues).
    pub rx: Option<Box<dyn RxQueue>>,
    /// Transmit half (None when the port has fewer transmit than receive queues).
    pub tx: Option<Box<dyn TxQueue>>,
}

impl std::fmt::Debug for QueuePair {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("QueuePair")
            .field("queue", &self.queue)
            .field("rx", &self.rx.is_some())
            .field("tx", &self.tx.is_some())
            .finish()
    }
}

/// What every port kind implements.
pub trait Port: Send {
    /// The port kind (`null`, `ring`, ...).
    fn kind(&self) -> &'static str;
    /// A name for messages (the spec as given).
    fn name(&self) -> &str;
    /// MAC address.
    fn mac(&self) -> [u8; 6];
    /// Sets queue and descriptor counts. Only while stopped.
    fn configure(&mut self, conf: &PortConf) -> Result<()>;
    /// Starts the port.
    fn start(&mut self) -> Result<()>;
    /// Stops the port. Queues handed out must have been dropped or returned.
    fn stop(&mut self) -> Result<()>;
    /// Link state.
    fn link(&self) -> LinkStatus;
    /// Hands out the queues (once per start).
    fn take_queues(&mut self) -> Result<Vec<QueuePair>>;
    /// Live counters.
    fn stats(&self) -> PortStats;
}

/// What ports are built with.
#[derive(Debug, Clone)]
pub struct PortEnv {
    /// Buffers for everything ports allocate.
    pub pool: Arc<Mempool>,
    /// Named rings shared by `ring` ports.
    pub rings: RingRegistry,
    /// Port id (index) this port gets.
    pub port_id: u16,
    /// Default packet size for generated packets.
    pub pkt_size: usize,
    /// Per-queue mempool cache size.
    pub cache_size: u32,
}

/// A port kind: its name, one line of description, its keys.
#[derive(Debug, Clone, Copy)]
pub struct PortKind {
    /// Kind name as used in specs.
    pub name: &'static str,
    /// What it is.
    pub about: &'static str,
    /// Accepted keys with a short description each.
    pub keys: &'static [(&'static str, &'static str)],
}

/// The port kinds built into `vdpakit-core`.
pub const KINDS: &[PortKind] = &[
    null::KIND,
    ring::KIND,
    vhost_user::KIND,
    virtio_user::KIND,
    rep::KIND,
];

/// Builds a port of a registered kind from its spec.
pub type CreateFn = fn(&PortSpec, &PortEnv) -> Result<Box<dyn Port>>;

/// A port kind that lives outside `vdpakit-core` (a PMD crate's `virtio:pci=BDF` port): PMD
/// crates depend on core, so core cannot name them; the application registers them once at
/// start-up with [`register`], and [`create`] and [`kinds`] then treat them like the built-in
/// ones.
#[derive(Debug, Clone, Copy)]
pub struct ExternalKind {
    /// Name, description and keys.
    pub kind: PortKind,
    /// The constructor.
    pub create: CreateFn,
}

static EXTERNAL: std::sync::RwLock<Vec<ExternalKind>> = std::sync::RwLock::new(Vec::new());

fn external() -> Vec<ExternalKind> {
    EXTERNAL.read().unwrap_or_else(|p| p.into_inner()).clone()
}

/// Registers port kinds from outside core (idempotent: a kind registered again replaces the
/// earlier entry). A name of a built-in kind is refused.
pub fn register(kinds: &[ExternalKind]) -> Result<()> {
    let mut t = EXTERNAL.write().unwrap_or_else(|p| p.into_inner());
    for k in kinds {
        if KINDS.iter().any(|b| b.name == k.kind.name) {
            return Err(Error::PortSpec {
                spec: k.kind.name.to_string(),
                why: "a built-in port kind of that name exists".into(),
            });
        }
        t.retain(|e| e.kind.name != k.kind.name);
        t.push(*k);
    }
    Ok(())
}

/// Every port kind: the built-in ones, then the registered ones.
pub fn kinds() -> Vec<PortKind> {
    KINDS
        .iter()
        .copied()
        .chain(external().into_iter().map(|e| e.kind))
        .collect()
}

/// Builds a port from a spec.
pub fn create(spec: &PortSpec, env: &PortEnv) -> Result<Box<dyn Port>> {
    match spec.kind() {
        "null" => Ok(Box::new(null::NullPort::new(spec, env)?)),
        "ring" => Ok(Box::new(ring::RingPort::new(spec, env)?)),
        "vhost-user" => Ok(Box::new(vhost_user::VhostUserPort::new(spec, env)?)),
        "virtio-user" => Ok(Box::new(virtio_user::VirtioUserPort::new(spec, env)?)),
        "rep" => Ok(Box::new(rep::RepPort::new(spec, env)?)),
        other => match external().into_iter().find(|e| e.kind.name == other) {
            Some(e) => (e.create)(spec, env),
            None => Err(Error::UnknownPortKind {
                kind: other.to_string(),
                known: kinds()
                    .iter()
                    .map(|k| k.name)
                    .collect::<Vec<_>>()
                    .join(", "),
            }),
        },
    }
}

/// A locally administered MAC for port `id`: 02:76:64:70:00:id (`vdp` in the middle).
pub fn default_mac(id: u16) -> [u8; 6] {
    let [hi, lo] = id.to_be_bytes();
    [0x02, 0x76, 0x64, 0x70, hi, lo]
}

/// Parses `aa:bb:cc:dd:ee:ff`.
pub fn parse_mac(s: &str) -> Option<[u8; 6]> {
    let mut out = [0u8; 6];
    let mut parts = s.split(':');
    for b in &mut out {
        let p = parts.next()?;
        if p.len() != 2 {
            return None;
        }
        *b = u8::from_str_radix(p, 16).ok()?;
    }
    parts.next().is_none().then_some(out)
}

/// Tracks the usual stopped/started state machine for port kinds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PortState {
    /// Created, not configured.
    New,
    /// Configured and stopped.
    Stopped,
    /// Started.
    Started,
}

impl PortState {
    /// Checks that a port in this state may take `conf`: not while started, and at least one
    /// receive and one transmit queue.
    pub fn check_configure(self, port: &str, conf: &PortConf) -> Result<()> {
        if self == PortState::Started {
            return Err(Error::PortState {
                port: port.to_string(),
                op: "configure",
                state: "started",
            });
        }
        if conf.rx_queues == 0 || conf.tx_queues == 0 {
            return Err(Error::PortConfig {
                port: port.to_string(),
                why: "needs at least one rx and one tx queue".into(),
            });
        }
        Ok(())
    }

    /// [`PortState::check_configure`] for a virtio port whose rx and tx queues come in pairs:
    /// equal counts, at most `max_pairs`, and not more than a `queues=` key (`pairs_key`) sets
    /// up (`role`: "offers" for a back end, "sets up" for a front end).
    pub fn check_configure_pairs(
        self,
        port: &str,
        conf: &PortConf,
        max_pairs: u16,
        pairs_key: Option<u16>,
        role: &str,
    ) -> Result<()> {
        self.check_configure(port, conf)?;
        if conf.rx_queues != conf.tx_queues || conf.rx_queues > max_pairs {
            return Err(Error::PortConfig {
                port: port.to_string(),
                why: format!(
                    "needs equal rx and tx queue counts in 1..={max_pairs}, got {} and {}",
                    conf.rx_queues, conf.tx_queues
                ),
            });
        }
        if let Some(k) = pairs_key
            && k < conf.rx_queues
        {
            return Err(Error::PortConfig {
                port: port.to_string(),
                why: format!(
                    "queues={k} {role} fewer pairs than the {} queues configured",
                    conf.rx_queues
                ),
            });
        }
        Ok(())
    }

    /// Checks that a port in this state may start (it must be configured and stopped).
    pub fn check_start(self, port: &str) -> Result<()> {
        if self != PortState::Stopped {
            return Err(Error::PortState {
                port: port.to_string(),
                op: "start",
                state: self.as_str(),
            });
        }
        Ok(())
    }

    /// A readable name, for errors.
    pub fn as_str(self) -> &'static str {
        match self {
            PortState::New => "not configured",
            PortState::Stopped => "stopped",
            PortState::Started => "started",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn macs_parse_and_default() {
        assert_eq!(parse_mac("02:00:00:00:00:0a"), Some([2, 0, 0, 0, 0, 10]));
        assert_eq!(parse_mac("02:00:00:00:00"), None);
        assert_eq!(parse_mac("02:00:00:00:00:00:01"), None);
        assert_eq!(parse_mac("2:00:00:00:00:00"), None);
        assert_eq!(default_mac(258), [2, 0x76, 0x64, 0x70, 1, 2]);
    }

    #[test]
    fn queue_stats_single_writer_counts() {
        let s = QueueStats::new();
        s.add(3, 300);
        s.add(2, 200);
        s.add_drops(4);
        s.add_errors(1);
        assert_eq!(
            s.read(),
            Counters {
                packets: 5,
                bytes: 500,
                drops: 4,
                errors: 1
            }
        );
    }
}

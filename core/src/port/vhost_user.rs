//! The `vhost-user` port: vdpakit as the vhost-user back end of a VM (or of any front end such as
//! DPDK's virtio-user), with the software datapath. Receive dequeues the guest's transmit rings
//! (odd vrings) into mbufs; transmit enqueues mbufs into the guest's receive rings (even vrings).

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use super::{
    LinkStatus, Port, PortConf, PortEnv, PortKind, PortSpec, PortState, PortStats, QueuePair,
    QueueStats, RxQueue, StatsBlocks, TxQueue,
};
use crate::error::{Error, Result};
use crate::mbuf::Burst;
use crate::mempool::{Mempool, MempoolCache};
use crate::vhost::device::{MAX_QUEUE_PAIRS, NetConfig, Shared};
use crate::vhost::server::{Server, ServerConfig};

pub(super) const KIND: PortKind = PortKind {
    name: "vhost-user",
    about: "vhost-user back end on a Unix socket (a VM or a virtio-user front end connects), software datapath",
    keys: &[
        ("path", "socket path (required)"),
        (
            "client",
            "1: connect to a listening front end (retry every second); 0 (default): listen",
        ),
        ("queues", "queue pairs offered, 1..=128 (default: --queues)"),
        (
            "packed",
            "1 (default): offer the packed ring layout; 0: split only",
        ),
        (
            "mrg_rxbuf",
            "1 (default): offer mergeable receive buffers; 0: not",
        ),
        (
            "in_order",
            "1 (default): offer IN_ORDER; 0: not; batch: offer it and, when negotiated, return each run of completely used buffers with one used entry (front ends must resolve in-order batches)",
        ),
        ("mtu", "MTU offered, 68..=65535 (default 1500)"),
        (
            "iommu",
            "1: offer ACCESS_PLATFORM (a guest behind a vIOMMU; addresses translated through the front end's IOTLB, no dirty logging then); 0 (default): not",
        ),
        ("mac", "port MAC address (default 02:76:64:70:00:<port id>)"),
    ],
};

/// See the module documentation.
pub struct VhostUserPort {
    name: String,
    mac: [u8; 6],
    port_id: u16,
    path: PathBuf,
    client: bool,
    net: NetConfig,
    pairs_key: Option<u16>,
    pool: Arc<Mempool>,
    cache_size: u32,
    conf: PortConf,
    state: PortState,
    stats: StatsBlocks,
    server: Option<Server>,
    taken: bool,
}

impl VhostUserPort {
    pub(super) fn new(spec: &PortSpec, env: &PortEnv) -> Result<VhostUserPort> {
        let a = spec.args(KIND.keys)?;
        let Some(path) = a.get("path") else {
            return Err(Error::PortValue {
                kind: "vhost-user".into(),
                key: "path".into(),
                value: String::new(),
                accepted: "a socket path (path=/tmp/vhost.sock)".into(),
            });
        };
        let bool_key =
            |k: &str, d: &'static str| -> Result<bool> { Ok(a.choice(k, d, &["0", "1"])? == "1") };
        let pairs_key = match a.get("queues") {
            None => None,
            Some(_) => Some(a.u64_in("queues", 1, 1..=MAX_QUEUE_PAIRS as u64)? as u16),
        };
        let in_order = a.choice("in_order", "1", &["0", "1", "batch"])?;
        let net = NetConfig {
            queue_pairs: pairs_key.unwrap_or(1),
            packed: bool_key("packed", "1")?,
            mrg_rxbuf: bool_key("mrg_rxbuf", "1")?,
            in_order: in_order != "0",
            in_order_batch: in_order == "batch",
            mtu: a.u64_in("mtu", 1500, 68..=65535)? as u16,
            host_notifier: false,
            iommu: bool_key("iommu", "0")?,
        };
        Ok(VhostUserPort {
            name: spec.text().to_string(),
            mac: a.mac("mac", super::default_mac(env.port_id))?,
            port_id: env.port_id,
            path: PathBuf::from(path),
            client: bool_key("client", "0")?,
            net,
            pairs_key,
            pool: Arc::clone(&env.pool),
            cache_size: env.cache_size,
            conf: PortConf::default(),
            state: PortState::New,
            stats: StatsBlocks::default(),
            server: None,
            taken: false,
        })
    }

    /// The shared device state (for tests and reporting), while started.
    pub fn shared(&self) -> Option<&Arc<Shared>> {
        self.server.as_ref().map(|s| s.shared())
    }
}

impl Port for VhostUserPort {
    fn kind(&self) -> &'static str {
        "vhost-user"
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
            "offers",
        )?;
        self.net.queue_pairs = self.pairs_key.unwrap_or(conf.rx_queues);
        self.conf = *conf;
        self.stats = StatsBlocks::new(conf.rx_queues, conf.tx_queues);
        self.state = PortState::Stopped;
        Ok(())
    }

    fn start(&mut self) -> Result<()> {
        self.state.check_start(&self.name)?;
        let server = Server::start(ServerConfig {
            path: self.path.clone(),
            client: self.client,
            net: self.net,
            vdpa: None,
        })
        .map_err(|e| Error::PortConfig {
            port: self.name.clone(),
            why: e.to_string(),
        })?;
        self.server = Some(server);
        self.state = PortState::Started;
        self.taken = false;
        Ok(())
    }

    fn stop(&mut self) -> Result<()> {
        // Dropping the server stops its control thread, resets the device and removes the socket.
        self.server = None;
        if self.state == PortState::Started {
            self.state = PortState::Stopped;
        }
        Ok(())
    }

    fn link(&self) -> LinkStatus {
        let up = self
            .shared()
            .is_some_and(|s| s.link_up.load(Ordering::Relaxed));
        LinkStatus { up, speed_mbps: 0 }
    }

    fn take_queues(&mut self) -> Result<Vec<QueuePair>> {
        let shared = match (&self.server, self.taken) {
            (Some(s), false) => Arc::clone(s.shared()),
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
                rx: Some(Box::new(VhostRx {
                    shared: Arc::clone(&shared),
                    vring: 2 * q as usize + 1,
                    port: self.port_id,
                    queue: q,
                    cache: self.pool.cache(self.cache_size),
                    stats: Arc::clone(&self.stats.rx[q as usize]),
                }) as Box<dyn RxQueue>),
                tx: Some(Box::new(VhostTx {
                    shared: Arc::clone(&shared),
                    vring: 2 * q as usize,
                    cache: self.pool.cache(self.cache_size),
                    stats: Arc::clone(&self.stats.tx[q as usize]),
                }) as Box<dyn TxQueue>),
            })
            .collect())
    }

    fn stats(&self) -> PortStats {
        self.stats.read()
    }
}

struct VhostRx {
    shared: Arc<Shared>,
    vring: usize,
    port: u16,
    queue: u16,
    cache: MempoolCache,
    stats: Arc<QueueStats>,
}

impl RxQueue for VhostRx {
    #[inline]
    fn rx_burst(&mut self, pkts: &mut Burst) -> usize {
        let start = pkts.len();
        let (shared, vring, stats, queue) = (&self.shared, self.vring, &self.stats, self.queue);
        self.cache.local(|cache| {
            // What the guest sent (nothing while the ring is stopped), counted below with the
            // RARP.
            shared.vqs[vring].enter(|run| run.dequeue(cache, pkts, stats));
            if queue == 0 {
                inject_rarp(shared, cache, pkts);
            }
        });
        let mut bytes = 0u64;
        for m in &mut pkts.as_mut_slice()[start..] {
            m.set_rx_port(self.port, self.queue);
            bytes += m.pkt_len() as u64;
        }
        let got = pkts.len() - start;
        if got > 0 {
            self.stats.add(got as u64, bytes);
        }
        got
    }

    fn stats(&self) -> &Arc<QueueStats> {
        &self.stats
    }
}

/// After SEND_RARP (live migration done), hand the application one RARP frame "from the guest"
/// so switches learn where its MAC now lives.
#[inline]
fn inject_rarp(shared: &Shared, cache: &mut MempoolCache, pkts: &mut Burst) {
    let v = shared.rarp.load(Ordering::Relaxed);
    if v & (1 << 63) == 0 || pkts.room() == 0 {
        return;
    }
    if shared
        .rarp
        .compare_exchange(v, 0, Ordering::AcqRel, Ordering::Relaxed)
        .is_err()
    {
        return;
    }
    // The payload carries the MAC in its first six bytes (memory order of the little-endian
    // u64), as QEMU writes it.
    let b = v.to_le_bytes();
    let mac = [b[0], b[1], b[2], b[3], b[4], b[5]];
    if let Some(mut m) = cache.alloc()
        && let Some(d) = m.append(60)
    {
        crate::packet::build_rarp(d, mac);
        let _ = pkts.push(m);
    }
}

struct VhostTx {
    shared: Arc<Shared>,
    vring: usize,
    cache: MempoolCache,
    stats: Arc<QueueStats>,
}

impl TxQueue for VhostTx {
    #[inline]
    fn tx_burst(&mut self, pkts: &mut Burst) -> usize {
        let before = pkts.len();
        let bytes_before = pkts.bytes();
        let (shared, vring, stats) = (&self.shared, self.vring, &self.stats);
        let sent = self.cache.local(|cache| {
            shared.vqs[vring]
                .enter(|run| run.enqueue(pkts, cache, stats))
                .unwrap_or(0)
        });
        debug_assert_eq!(before - pkts.len(), sent);
        if sent > 0 {
            self.stats.add(sent as u64, bytes_before - pkts.bytes());
        }
        sent
    }

    fn stats(&self) -> &Arc<QueueStats> {
        &self.stats
    }
}

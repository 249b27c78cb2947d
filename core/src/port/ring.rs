//! The `ring` port: transmit feeds a named ring that a port's receive reads (like DPDK's
//! net_ring). `ring:name=a` alone is a loopback; `ring:name=a,peer=b` plus `ring:name=b,peer=a`
//! is a wire between two ports. Each queue index has its own single-producer/single-consumer
//! ring; the registry hands each end out once, so two transmitters can never share a ring.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use super::{
    LinkStatus, Port, PortConf, PortEnv, PortKind, PortSpec, PortState, PortStats, QueuePair,
    QueueStats, RxQueue, StatsBlocks, TxQueue,
};
use crate::error::{Error, Result};
use crate::mbuf::{Burst, MAX_BURST, MbufRx, MbufTx, mbuf_channel};
use crate::mempool::Mempool;

pub(super) const KIND: PortKind = PortKind {
    name: "ring",
    about: "transmit feeds a named in-memory ring that a port receives from (loopback or a wire between ports)",
    keys: &[
        (
            "name",
            "name of the ring this port receives from (default ring<port id>)",
        ),
        (
            "peer",
            "name of the ring this port transmits into (default: its own, a loopback)",
        ),
        (
            "size",
            "ring entries per queue, a power of two in 64..=65536 (default: the descriptor count)",
        ),
        (
            "prefill",
            "packets put on the wire at start, 0..=65536 (default 256, so io forwarding has traffic)",
        ),
        ("mac", "port MAC address (default 02:76:64:70:00:<port id>)"),
        (
            "drop_every",
            "for tests: transmit drops (frees and counts) every Nth packet, 0..=1000000 (default 0: never)",
        ),
    ],
};

struct RingSet {
    owner: u16,
    queues: Vec<(Option<MbufTx>, Option<MbufRx>)>,
}

/// Named rings shared by `ring` ports of one process.
#[derive(Clone, Default)]
pub struct RingRegistry {
    inner: Arc<Mutex<HashMap<String, RingSet>>>,
}

impl std::fmt::Debug for RingRegistry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RingRegistry").finish_non_exhaustive()
    }
}

impl RingRegistry {
    /// An empty registry.
    pub fn new() -> RingRegistry {
        RingRegistry::default()
    }

    fn declare(&self, port: &str, owner: u16, name: &str, queues: u16, size: usize) -> Result<()> {
        let mut map = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(set) = map.get(name)
            && set.owner != owner
        {
            return Err(Error::PortConfig {
                port: port.to_string(),
                why: format!("ring name '{name}' is already used by port {}", set.owner),
            });
        }
        let mut qs = Vec::with_capacity(queues as usize);
        for _ in 0..queues {
            let (tx, rx) = mbuf_channel(size)?;
            qs.push((Some(tx), Some(rx)));
        }
        map.insert(name.to_string(), RingSet { owner, queues: qs });
        Ok(())
    }

    fn take_rx(&self, name: &str, q: usize) -> Option<MbufRx> {
        let mut map = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        map.get_mut(name)?.queues.get_mut(q)?.1.take()
    }

    fn take_tx(&self, port: &str, peer: &str, q: usize) -> Result<MbufTx> {
        let mut map = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        let Some(set) = map.get_mut(peer) else {
            return Err(Error::PortConfig {
                port: port.to_string(),
                why: format!("peer ring '{peer}' does not exist: add a port ring:name={peer}"),
            });
        };
        let have = set.queues.len();
        match set.queues.get_mut(q) {
            None => Err(Error::PortConfig {
                port: port.to_string(),
                why: format!("peer ring '{peer}' has {have} queues, this port transmits on queue {q}"),
            }),
            Some((tx, _)) => tx.take().ok_or_else(|| Error::PortConfig {
                port: port.to_string(),
                why: format!("ring '{peer}' queue {q} is already fed by another port (peer={peer} given twice)"),
            }),
        }
    }
}

/// See the module documentation.
pub struct RingPort {
    name: String,
    ring: String,
    peer: String,
    size: Option<usize>,
    prefill: usize,
    drop_every: u64,
    mac: [u8; 6],
    port_id: u16,
    pkt_size: usize,
    pool: Arc<Mempool>,
    rings: RingRegistry,
    conf: PortConf,
    state: PortState,
    stats: StatsBlocks,
    queues: Vec<QueuePair>,
}

impl RingPort {
    pub(super) fn new(spec: &PortSpec, env: &PortEnv) -> Result<RingPort> {
        let a = spec.args(KIND.keys)?;
        let ring = a
            .name("name")?
            .unwrap_or_else(|| format!("ring{}", env.port_id));
        let peer = a.name("peer")?.unwrap_or_else(|| ring.clone());
        let size = match a.get("size") {
            None => None,
            Some(v) => match v.parse::<usize>() {
                Ok(n) if n.is_power_of_two() && (64..=65536).contains(&n) => Some(n),
                _ => {
                    return Err(Error::PortValue {
                        kind: "ring".into(),
                        key: "size".into(),
                        value: v.into(),
                        accepted: "a power of two in 64..=65536".into(),
                    });
                }
            },
        };
        Ok(RingPort {
            name: spec.text().to_string(),
            ring,
            peer,
            size,
            prefill: a.u64_in("prefill", 256, 0..=65536)? as usize,
            drop_every: a.u64_in("drop_every", 0, 0..=1_000_000)?,
            mac: a.mac("mac", super::default_mac(env.port_id))?,
            port_id: env.port_id,
            pkt_size: env.pkt_size,
            pool: Arc::clone(&env.pool),
            rings: env.rings.clone(),
            conf: PortConf::default(),
            state: PortState::New,
            stats: StatsBlocks::default(),
            queues: Vec::new(),
        })
    }

    fn ring_size(&self) -> usize {
        self.size.unwrap_or_else(|| {
            (self.conf.rx_desc as usize)
                .next_power_of_two()
                .clamp(64, 65536)
        })
    }

    /// Puts `prefill` packets on this port's wire, spread over its transmit rings.
    fn prefill(&self, txs: &mut [MbufTx]) -> Result<()> {
        if txs.is_empty() || self.prefill == 0 {
            return Ok(());
        }
        let template = crate::packet::udp_template(self.mac, self.mac, self.pkt_size);
        let mut cache = self.pool.cache(0);
        let mut left = self.prefill;
        let mut q = 0;
        while left > 0 {
            let n = left.min(MAX_BURST).min(txs[q].capacity() - txs[q].len());
            let mut b = Burst::new(n);
            if n == 0 || !cache.alloc_bulk(&mut b, n) {
                return Err(Error::PortConfig {
                    port: self.name.clone(),
                    why: format!(
                        "cannot prefill {} packets (ring or mempool too small)",
                        self.prefill
                    ),
                });
            }
            for m in b.iter_mut() {
                m.set_data_len(self.pkt_size);
                m.data_mut()[..template.len()].copy_from_slice(&template);
            }
            txs[q].send_burst(&mut b);
            left -= n;
            q = (q + 1) % txs.len();
        }
        Ok(())
    }
}

impl Port for RingPort {
    fn kind(&self) -> &'static str {
        "ring"
    }

    fn name(&self) -> &str {
        &self.name
    }

    fn mac(&self) -> [u8; 6] {
        self.mac
    }

    fn configure(&mut self, conf: &PortConf) -> Result<()> {
        self.state.check_configure(&self.name, conf)?;
        self.conf = *conf;
        self.rings.declare(
            &self.name,
            self.port_id,
            &self.ring,
            conf.rx_queues,
            self.ring_size(),
        )?;
        self.stats = StatsBlocks::new(conf.rx_queues, conf.tx_queues);
        self.state = PortState::Stopped;
        Ok(())
    }

    fn start(&mut self) -> Result<()> {
        self.state.check_start(&self.name)?;
        let mut txs = Vec::new();
        for q in 0..self.conf.tx_queues as usize {
            txs.push(self.rings.take_tx(&self.name, &self.peer, q)?);
        }
        let mut rxs = Vec::new();
        for q in 0..self.conf.rx_queues as usize {
            let rx = self
                .rings
                .take_rx(&self.ring, q)
                .ok_or_else(|| Error::PortConfig {
                    port: self.name.clone(),
                    why: format!("ring '{}' queue {q} is not available", self.ring),
                })?;
            rxs.push(rx);
        }
        self.prefill(&mut txs)?;
        let n = self.conf.rx_queues.max(self.conf.tx_queues);
        let mut txs = txs.into_iter();
        let mut rxs = rxs.into_iter();
        self.queues = (0..n)
            .map(|q| QueuePair {
                queue: q,
                rx: rxs.next().map(|ring| {
                    Box::new(RingRx {
                        ring,
                        port: self.port_id,
                        queue: q,
                        stats: Arc::clone(&self.stats.rx[q as usize]),
                    }) as Box<dyn RxQueue>
                }),
                tx: txs.next().map(|ring| {
                    Box::new(RingTx {
                        ring,
                        drop_every: self.drop_every,
                        counted: 0,
                        stats: Arc::clone(&self.stats.tx[q as usize]),
                    }) as Box<dyn TxQueue>
                }),
            })
            .collect();
        self.state = PortState::Started;
        Ok(())
    }

    fn stop(&mut self) -> Result<()> {
        if self.state == PortState::Started {
            self.queues.clear();
            // Fresh rings for the next start; the old ones free their packets when their last
            // end goes.
            self.rings.declare(
                &self.name,
                self.port_id,
                &self.ring,
                self.conf.rx_queues,
                self.ring_size(),
            )?;
            self.state = PortState::Stopped;
        }
        Ok(())
    }

    fn link(&self) -> LinkStatus {
        LinkStatus {
            up: self.state == PortState::Started,
            speed_mbps: 0,
        }
    }

    fn take_queues(&mut self) -> Result<Vec<QueuePair>> {
        if self.state != PortState::Started || self.queues.is_empty() {
            let state = if self.state == PortState::Started {
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
        Ok(std::mem::take(&mut self.queues))
    }

    fn stats(&self) -> PortStats {
        self.stats.read()
    }
}

struct RingRx {
    ring: MbufRx,
    port: u16,
    queue: u16,
    stats: Arc<QueueStats>,
}

impl RxQueue for RingRx {
    #[inline]
    fn rx_burst(&mut self, pkts: &mut Burst) -> usize {
        let start = pkts.len();
        let n = self.ring.recv_burst(pkts);
        if n > 0 {
            let mut bytes = 0u64;
            for m in &mut pkts.as_mut_slice()[start..] {
                m.set_rx_port(self.port, self.queue);
                bytes += m.pkt_len() as u64;
            }
            self.stats.add(n as u64, bytes);
        }
        n
    }

    fn stats(&self) -> &Arc<QueueStats> {
        &self.stats
    }
}

struct RingTx {
    ring: MbufTx,
    /// Drop every Nth packet offered (0: never); `counted` packets were offered so far.
    drop_every: u64,
    counted: u64,
    stats: Arc<QueueStats>,
}

impl RingTx {
    /// The `drop_every` path (tests only): every Nth packet offered is freed and counted as a
    /// drop by the port; the rest go to the ring, and what the ring does not take goes back to
    /// `pkts` in order, as the contract wants.
    #[cold]
    fn tx_burst_dropping(&mut self, pkts: &mut Burst) -> usize {
        let mut keep = Burst::new(MAX_BURST);
        let (every, mut counted, mut dropped) = (self.drop_every, self.counted, 0u64);
        pkts.drain_front(pkts.len(), |m| {
            counted += 1;
            if counted % every == 0 {
                dropped += 1;
                drop(m);
            } else {
                // Cannot fail: `keep` holds MAX_BURST, a burst holds at most that.
                let _ = keep.push(m);
            }
        });
        self.counted = counted;
        if dropped > 0 {
            self.stats.add_drops(dropped);
        }
        let total = keep.bytes();
        let sent = self.ring.send_burst(&mut keep);
        if sent > 0 {
            self.stats.add(sent as u64, total - keep.bytes());
        }
        keep.drain_front(keep.len(), |m| {
            let _ = pkts.push(m);
        });
        sent
    }
}

impl TxQueue for RingTx {
    #[inline]
    fn tx_burst(&mut self, pkts: &mut Burst) -> usize {
        if self.drop_every > 0 {
            return self.tx_burst_dropping(pkts);
        }
        let total = pkts.len();
        let bytes_before = pkts.bytes();
        let sent = self.ring.send_burst(pkts);
        if sent > 0 {
            let bytes = if sent == total {
                bytes_before
            } else {
                bytes_before - pkts.bytes()
            };
            self.stats.add(sent as u64, bytes);
        }
        sent
    }

    fn stats(&self) -> &Arc<QueueStats> {
        &self.stats
    }
}

//! The `null` port: receive yields generated packets (or nothing), transmit frees.

use std::sync::Arc;

use super::{
    LinkStatus, Port, PortConf, PortEnv, PortKind, PortSpec, PortState, PortStats, QueuePair,
    QueueStats, RxQueue, StatsBlocks, TxQueue,
};
use crate::error::{Error, Result};
use crate::mbuf::Burst;
use crate::mempool::{Mempool, MempoolCache};

pub(super) const KIND: PortKind = PortKind {
    name: "null",
    about: "receive yields generated packets (or nothing), transmit frees them",
    keys: &[
        (
            "rx",
            "gen (default): generate packets; none: receive nothing",
        ),
        (
            "size",
            "generated packet size, 60..=9000 (default: --pkt-size)",
        ),
        (
            "copy",
            "1: write an Ethernet/IPv4/UDP header into generated packets; 0 (default): lengths only",
        ),
        ("mac", "port MAC address (default 02:76:64:70:00:<port id>)"),
    ],
};

/// See the module documentation.
pub struct NullPort {
    name: String,
    mac: [u8; 6],
    port_id: u16,
    generate: bool,
    copy: bool,
    size: usize,
    pool: Arc<Mempool>,
    cache_size: u32,
    conf: PortConf,
    state: PortState,
    stats: StatsBlocks,
    taken: bool,
}

impl NullPort {
    pub(super) fn new(spec: &PortSpec, env: &PortEnv) -> Result<NullPort> {
        let a = spec.args(KIND.keys)?;
        let generate = a.choice("rx", "gen", &["gen", "none"])? == "gen";
        let size = a.u64_in("size", env.pkt_size as u64, 60..=9000)? as usize;
        if size > env.pool.data_room() as usize {
            return Err(Error::PortValue {
                kind: "null".into(),
                key: "size".into(),
                value: size.to_string(),
                accepted: format!(
                    "at most the buffer data room, {} bytes",
                    env.pool.data_room()
                ),
            });
        }
        let copy = a.choice("copy", "0", &["0", "1"])? == "1";
        Ok(NullPort {
            name: spec.text().to_string(),
            mac: a.mac("mac", super::default_mac(env.port_id))?,
            port_id: env.port_id,
            generate,
            copy,
            size,
            pool: Arc::clone(&env.pool),
            cache_size: env.cache_size,
            conf: PortConf::default(),
            state: PortState::New,
            stats: StatsBlocks::default(),
            taken: false,
        })
    }
}

impl Port for NullPort {
    fn kind(&self) -> &'static str {
        "null"
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
        self.stats = StatsBlocks::new(conf.rx_queues, conf.tx_queues);
        self.state = PortState::Stopped;
        Ok(())
    }

    fn start(&mut self) -> Result<()> {
        self.state.check_start(&self.name)?;
        self.state = PortState::Started;
        self.taken = false;
        Ok(())
    }

    fn stop(&mut self) -> Result<()> {
        if self.state == PortState::Started {
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
        if self.state != PortState::Started || self.taken {
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
        self.taken = true;
        let n = self.conf.rx_queues.max(self.conf.tx_queues);
        let template = crate::packet::udp_template(self.mac, [0xff; 6], self.size);
        Ok((0..n)
            .map(|q| QueuePair {
                queue: q,
                rx: (q < self.conf.rx_queues).then(|| {
                    Box::new(NullRx {
                        generate: self.generate,
                        size: self.size,
                        port: self.port_id,
                        queue: q,
                        template: if self.copy {
                            Some(template.clone())
                        } else {
                            None
                        },
                        cache: self.pool.cache(self.cache_size),
                        stats: Arc::clone(&self.stats.rx[q as usize]),
                    }) as Box<dyn RxQueue>
                }),
                tx: (q < self.conf.tx_queues).then(|| {
                    Box::new(NullTx {
                        cache: self.pool.cache(self.cache_size),
                        stats: Arc::clone(&self.stats.tx[q as usize]),
                    }) as Box<dyn TxQueue>
                }),
            })
            .collect())
    }

    fn stats(&self) -> PortStats {
        self.stats.read()
    }
}

struct NullRx {
    generate: bool,
    size: usize,
    port: u16,
    queue: u16,
    template: Option<Vec<u8>>,
    cache: MempoolCache,
    stats: Arc<QueueStats>,
}

impl RxQueue for NullRx {
    #[inline]
    fn rx_burst(&mut self, pkts: &mut Burst) -> usize {
        if !self.generate {
            return 0;
        }
        let start = pkts.len();
        let n = pkts.room();
        if n == 0 {
            return 0;
        }
        if !self.cache.local(|c| c.alloc_bulk(pkts, n)) {
            self.stats.add_errors(1);
            return 0;
        }
        for m in &mut pkts.as_mut_slice()[start..] {
            m.set_data_len(self.size);
            m.set_rx_port(self.port, self.queue);
            if let Some(t) = &self.template {
                m.data_mut()[..t.len()].copy_from_slice(t);
            }
        }
        self.stats.add(n as u64, (n * self.size) as u64);
        n
    }

    fn stats(&self) -> &Arc<QueueStats> {
        &self.stats
    }
}

struct NullTx {
    cache: MempoolCache,
    stats: Arc<QueueStats>,
}

impl TxQueue for NullTx {
    #[inline]
    fn tx_burst(&mut self, pkts: &mut Burst) -> usize {
        let n = pkts.len();
        self.stats.add(n as u64, pkts.bytes());
        self.cache.local(|c| c.free_burst(pkts));
        n
    }

    fn stats(&self) -> &Arc<QueueStats> {
        &self.stats
    }
}

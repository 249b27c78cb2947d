//! The `rep` port: the representor of a model VF whose e-switch wire is `rep` (switchdev
//! style). `rx_burst` gives what the VF transmitted, `tx_burst` sends to the VF's receive.
//!
//! The device must live in this process (`vdpakit fwd --device sim:name=NAME,wire=rep`); the port
//! finds it by name in the model registry. Port queue `q` is the VF's queue pair `q`; per queue
//! three lock-free SPSC mbuf channels connect it with the device's engine thread (frames from the
//! VF, frames to the VF, and blank mbufs the port keeps topped up for the engine to fill, so the
//! engine never allocates). See [`crate::model::eswitch`].

use std::sync::Arc;

use super::{
    LinkStatus, Port, PortConf, PortEnv, PortKind, PortSpec, PortState, PortStats, QueuePair,
    QueueStats, RxQueue, StatsBlocks, TxQueue,
};
use crate::error::{Error, Result};
use crate::mbuf::{Burst, MAX_BURST, MbufRx, MbufTx};
use crate::mempool::{Mempool, MempoolCache};
use crate::model::eswitch::{RepAttachment, rep_channels};
use crate::model::registry;

pub(super) const KIND: PortKind = PortKind {
    name: "rep",
    about: "representor of a model VF with wire=rep (device created in this process with --device): rx = what the VF transmits, tx = what it receives",
    keys: &[
        ("dev", "name of the device (sim:name=NAME,...,wire=rep)"),
        ("vf", "VF index, 0..vfs (default 0)"),
        (
            "ring",
            "entries of each channel to and from the engine, a power of two in 64..=16384 (default 1024)",
        ),
        ("mac", "port MAC address (default 02:76:64:70:00:<port id>)"),
    ],
};

/// See the module documentation.
pub struct RepPort {
    name: String,
    dev: String,
    vf: u16,
    ring: usize,
    mac: [u8; 6],
    port_id: u16,
    pool: Arc<Mempool>,
    cache_size: u32,
    pairs: u16,
    conf: PortConf,
    state: PortState,
    stats: StatsBlocks,
    queues: Vec<QueuePair>,
    attach: Option<Arc<RepAttachment>>,
}

fn model_err(port: &str, e: crate::model::ModelError) -> Error {
    Error::PortConfig {
        port: port.to_string(),
        why: e.to_string(),
    }
}

impl RepPort {
    pub(super) fn new(spec: &PortSpec, env: &PortEnv) -> Result<RepPort> {
        let a = spec.args(KIND.keys)?;
        let Some(dev) = a.name("dev")? else {
            return Err(Error::PortValue {
                kind: "rep".into(),
                key: "dev".into(),
                value: "(none)".into(),
                accepted: "the name of a device created in this process with wire=rep".into(),
            });
        };
        let vf = a.u64_in("vf", 0, 0..=63)? as u16;
        let ring = a.u64_in("ring", 1024, 64..=16384)? as usize;
        if !ring.is_power_of_two() {
            return Err(Error::PortValue {
                kind: "rep".into(),
                key: "ring".into(),
                value: ring.to_string(),
                accepted: "a power of two in 64..=16384".into(),
            });
        }
        let name = spec.text().to_string();
        let pairs = registry::rep_pairs(&dev, vf).map_err(|e| model_err(&name, e))?;
        Ok(RepPort {
            name,
            dev,
            vf,
            ring,
            mac: a.mac("mac", super::default_mac(env.port_id))?,
            port_id: env.port_id,
            pool: Arc::clone(&env.pool),
            cache_size: env.cache_size,
            pairs,
            conf: PortConf::default(),
            state: PortState::New,
            stats: StatsBlocks::default(),
            queues: Vec::new(),
            attach: None,
        })
    }
}

impl Port for RepPort {
    fn kind(&self) -> &'static str {
        "rep"
    }

    fn name(&self) -> &str {
        &self.name
    }

    fn mac(&self) -> [u8; 6] {
        self.mac
    }

    fn configure(&mut self, conf: &PortConf) -> Result<()> {
        self.state
            .check_configure_pairs(&self.name, conf, self.pairs, None, "has")?;
        self.conf = *conf;
        self.stats = StatsBlocks::new(conf.rx_queues, conf.tx_queues);
        self.state = PortState::Stopped;
        Ok(())
    }

    fn start(&mut self) -> Result<()> {
        self.state.check_start(&self.name)?;
        let mut engine_ends = Vec::new();
        let mut port_ends = Vec::new();
        for _ in 0..self.conf.rx_queues {
            let (e, p) = rep_channels(self.ring).map_err(|e| model_err(&self.name, e))?;
            engine_ends.push(e);
            port_ends.push(p);
        }
        let mut caches = Vec::new();
        for p in &mut port_ends {
            // Blanks for the engine before the first frame.
            let mut cache = self.pool.cache(self.cache_size);
            top_up(&mut p.blanks, &mut cache, self.ring / 2);
            caches.push(cache);
        }
        let attach = Arc::new(
            registry::attach_rep(&self.dev, self.vf, engine_ends)
                .map_err(|e| model_err(&self.name, e))?,
        );
        self.queues = port_ends
            .into_iter()
            .zip(caches)
            .enumerate()
            .map(|(q, (p, cache))| {
                let q = q as u16;
                QueuePair {
                    queue: q,
                    rx: Some(Box::new(RepRx {
                        from_vf: p.from_vf,
                        blanks: p.blanks,
                        cache,
                        refill: Burst::new(MAX_BURST),
                        target: self.ring / 2,
                        port: self.port_id,
                        queue: q,
                        stats: Arc::clone(&self.stats.rx[usize::from(q)]),
                    }) as Box<dyn RxQueue>),
                    tx: Some(Box::new(RepTx {
                        to_vf: p.to_vf,
                        attach: Arc::clone(&attach),
                        stats: Arc::clone(&self.stats.tx[usize::from(q)]),
                    }) as Box<dyn TxQueue>),
                }
            })
            .collect();
        self.attach = Some(attach);
        self.state = PortState::Started;
        Ok(())
    }

    fn stop(&mut self) -> Result<()> {
        if self.state == PortState::Started {
            self.queues.clear();
            // Detaches once the queues handed out are gone too.
            self.attach = None;
            self.state = PortState::Stopped;
        }
        Ok(())
    }

    fn link(&self) -> LinkStatus {
        LinkStatus {
            up: self.state == PortState::Started
                && self.attach.as_ref().is_some_and(|a| a.vf_running()),
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

/// Puts blank mbufs into the engine's channel until it holds `target` (at most one burst per
/// call).
#[inline]
fn top_up(blanks: &mut MbufTx, cache: &mut MempoolCache, target: usize) {
    let have = blanks.len();
    if have >= target {
        return;
    }
    let n = (target - have).min(MAX_BURST);
    let mut b = Burst::new(n);
    if cache.alloc_bulk(&mut b, n) {
        blanks.send_burst(&mut b);
        cache.free_burst(&mut b);
    }
}

struct RepRx {
    from_vf: MbufRx,
    blanks: MbufTx,
    cache: MempoolCache,
    refill: Burst,
    target: usize,
    port: u16,
    queue: u16,
    stats: Arc<QueueStats>,
}

impl RxQueue for RepRx {
    #[inline]
    fn rx_burst(&mut self, pkts: &mut Burst) -> usize {
        let start = pkts.len();
        let n = self.from_vf.recv_burst(pkts);
        if n > 0 {
            let mut bytes = 0u64;
            for m in &mut pkts.as_mut_slice()[start..] {
                m.set_rx_port(self.port, self.queue);
                bytes += m.data_len() as u64;
            }
            self.stats.add(n as u64, bytes);
        }
        // Keep the engine supplied with blanks (one length read when it is).
        let have = self.blanks.len();
        if have < self.target {
            let k = (self.target - have).min(self.refill.limit());
            if self.cache.alloc_bulk(&mut self.refill, k) {
                self.blanks.send_burst(&mut self.refill);
                self.cache.free_burst(&mut self.refill);
            }
        }
        n
    }

    fn stats(&self) -> &Arc<QueueStats> {
        &self.stats
    }
}

struct RepTx {
    to_vf: MbufTx,
    attach: Arc<RepAttachment>,
    stats: Arc<QueueStats>,
}

impl TxQueue for RepTx {
    #[inline]
    fn tx_burst(&mut self, pkts: &mut Burst) -> usize {
        let total = pkts.len();
        let before = pkts.bytes();
        let sent = self.to_vf.send_burst(pkts);
        if sent > 0 {
            let bytes = if sent == total {
                before
            } else {
                before - pkts.bytes()
            };
            self.stats.add(sent as u64, bytes);
            self.attach.wake();
        }
        sent
    }

    fn stats(&self) -> &Arc<QueueStats> {
        &self.stats
    }
}

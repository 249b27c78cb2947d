//! A command-accurate model of an mlx5 vDPA device (ConnectX-6 Dx VFs by default), written from
//! the reference facts with its own definitions ([`defs`]), independent of the driver's.
//!
//! A device has one or more functions ([`Mlx5Model`], each its own PCI function in its own DMA
//! domain, with its own firmware) served by one virtqueue engine thread: the model kit's
//! (`vdpakit_core::model::engine`).
//!
//! What it models:
//! - PCI: vendor/device ids, BAR0, an MSI-X capability; a function-level reset.
//! - The init segment: firmware and command interface revisions, the command queue address and
//!   geometry, the initializing bit (clears after a configurable number of polls, and again after
//!   the queue address is written), the health buffer, and a health counter that advances with
//!   time (it can be frozen, and a health syndrome injected, to test the driver's checks).
//! - The command queue: slot descriptors read by DMA through the domain, input and output
//!   mailbox chains (1 KiB-aligned blocks, block numbers, tokens, signatures when checksum mode is
//!   on), the ownership bit, delivery status, and command status + syndrome in the output.
//! - Firmware ([`fw`]): ENABLE/DISABLE_HCA, ISSI, boot and init pages (written by DMA when given,
//!   returned by MANAGE_PAGES TAKE), HOST_ENDIANNESS, general and virtio emulation capabilities,
//!   INIT/TEARDOWN_HCA, and id-returning resources ([`store`]) that check references: UAR, PD,
//!   transport domain, TIS, UMEM, memory keys (physical, page list, indirect, with a null key;
//!   [`mkey`]), VIRTIO_NET_Q and its counters ([`vq`]), RQT, TIR, flow tables, groups and entries.
//! - The datapath, on the kit's engine ([`vq`], [`steer`]): a queue object made ready becomes an
//!   engine queue whose every ring and buffer access goes through its memory key's translation
//!   (re-read whenever the domain's mappings change); the doorbell page (the queue index written
//!   at `doorbell_bar_offset`) is the engine's shared doorbell page, which a host notifier maps;
//!   frames arriving from the wire are steered by the root flow table (destination MAC), a TIR
//!   and its RQT (Toeplitz hash) into a receive queue; suspend and resume stop and restart the
//!   engine queue at the positions it reached; hardware dirty logging writes the vhost bitmap
//!   named by the queue's DIRTY_BITMAP_PARAMS through the bitmap's key.
//! - Interrupts: one interrupt point ([`interrupt`]) that the engine calls for queue `i`: an
//!   MSI-X vector, nothing (NO_MSIX), or the QP event mode ([`eq`]): a send on the firmware QP →
//!   a receive WQE of the driver QP → a CQE → an EQE → the EQ's MSI-X vector.
//! - Wires: `loop` (back into its own steering), `cable` (function 2k with 2k + 1), `tap:NAME`
//!   (a host TAP uplink), `port` (frames out collected by [`Mlx5Model::take_tx`], frames in
//!   through [`Mlx5Model::inject`]), `none`.
//!
//! What it leaves out: asynchronous events and the command-completion EQ, asynchronous page
//! requests, event moderation, send queues, checksum and TSO offloads, mergeable receive
//! buffers, and firmware timing.

mod bits;
mod defs;
mod eq;
mod fw;
mod mkey;
mod steer;
mod store;
mod vq;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering, fence};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, Weak};
use std::time::{Duration, Instant};

use vdpakit_core::mbuf::Burst;
use vdpakit_core::mem::MemMode;
use vdpakit_core::mempool::{Mempool, MempoolConfig};
use vdpakit_core::model::PollMode;
use vdpakit_core::model::engine::{self, EngineShared, EngineThread, VfShared};
use vdpakit_core::model::eswitch::{self, RepPortEnds};
use vdpakit_core::pci::model::{DeviceModel, IrqSender, ModelBus};
use vdpakit_core::pci::{DmaDomain, NotifyArea, cap_id};
use vdpakit_core::virtio::GuestMemory;

use crate::error::{Error, Result};
use bits::{be32, be64};
use defs::{reg, wire};
pub use eq::{CqObj, EqObj, Event, QpObj, RingMem, qps};
use fw::Fw;
pub use fw::{Failure, FwStats, Wire, syndrome_of};
pub use mkey::NULL_MKEY;
pub use steer::toeplitz;
pub use store::Kind;
pub use vq::err as queue_error;

/// A deliberately wrong layout field, to prove a mismatch between driver and model fails
/// loudly.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Skew {
    /// The command doorbell listens 4 bytes after where it should.
    CmdDoorbell,
    /// VIRTIO_NET_Q queue_size is read 16 bits later than where it is.
    VqQueueSize,
    /// ALLOC_* return their id at bit 0x40 instead of 0x48.
    AllocId,
    /// Completion EQEs carry the cqn 4 bytes after where they should.
    EqeCqn,
}

/// What the model is and does.
#[derive(Debug, Clone)]
pub struct ModelOptions {
    /// Model name (`mlx5-0`); functions of a device of several are `NAME-fK`.
    pub name: String,
    /// PCI device id.
    pub device_id: u16,
    /// MAC address (NIC vport permanent address; function `k` adds `k` to the last byte).
    pub mac: [u8; 6],
    /// MTU.
    pub mtu: u16,
    /// max_num_virtio_queues.
    pub max_queues: u32,
    /// MSI-X vectors.
    pub msix_vectors: u16,
    /// event_mode capability bits (bit 0 none, 1 QP, 2 MSI-X).
    pub event_modes: u8,
    /// Packed rings supported.
    pub packed: bool,
    /// device_features_bits_mask.
    pub feature_mask: u16,
    /// SUSPEND → RDY allowed.
    pub freeze_to_rdy: bool,
    /// vnet_modify_ext: fields of a ready queue may be modified (the model allows the dirty
    /// bitmap fields, what hardware dirty logging needs); off, they change only in INIT or
    /// SUSPEND.
    pub modify_ext: bool,
    /// UMEM a/b parameters.
    pub umem: [(u32, u32); 3],
    /// Boot pages firmware asks for.
    pub boot_pages: u32,
    /// Init pages firmware asks for.
    pub init_pages: u32,
    /// Supported ISSIs (bit n = ISSI n).
    pub issi_mask: u32,
    /// log2 of the longest KLM list.
    pub log_max_klm: u8,
    /// log2 of the largest RQT.
    pub log_max_rqt_size: u8,
    /// vhca_id.
    pub vhca_id: u16,
    /// Polls of the initializing bit before it clears.
    pub init_delay_reads: u32,
    /// log2 of the command queue slots.
    pub log_cmdq_size: u8,
    /// log2 of the slot stride.
    pub log_cmdq_stride: u8,
    /// Check descriptor and mailbox signatures from power-on (checksum mode).
    pub verify_signatures: bool,
    /// Where transmitted frames go.
    pub wire: Wire,
    /// How the engine thread waits for work.
    pub poll: PollMode,
    /// A deliberately wrong field (tests).
    pub skew: Option<Skew>,
}

static NEXT: AtomicU64 = AtomicU64::new(0);

impl Default for ModelOptions {
    fn default() -> ModelOptions {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        ModelOptions {
            name: format!("mlx5-{n}"),
            device_id: 0x101e,
            mac: [0x02, 0x15, 0xb3, 0x00, (n >> 8) as u8, n as u8],
            mtu: 1500,
            max_queues: 16,
            msix_vectors: 17,
            event_modes: 0x7,
            packed: false,
            feature_mask: 0,
            freeze_to_rdy: true,
            modify_ext: true,
            umem: [(128, 4096), (64, 4096), (0, 4096)],
            boot_pages: 8,
            init_pages: 24,
            issi_mask: 0b11,
            log_max_klm: 12,
            log_max_rqt_size: 4,
            vhca_id: 1,
            init_delay_reads: 3,
            log_cmdq_size: 5,
            log_cmdq_stride: 6,
            verify_signatures: false,
            wire: Wire::Loop,
            poll: PollMode::Adaptive,
            skew: None,
        }
    }
}

#[derive(Debug)]
struct Regs {
    cmdq: u64,
    nic_interface: u8,
    init_left: u32,
    synd: u8,
    ext_synd: u16,
    counter_frozen: Option<u32>,
    hang: bool,
}

/// One function's state shared with the engine's interrupt point.
#[derive(Debug)]
struct Shared {
    fw: Mutex<Fw>,
    regs: Mutex<Regs>,
    bus: Mutex<Option<ModelBus>>,
    config: Mutex<[u8; 256]>,
    started: Instant,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// What the engine's interrupt point needs of one function, readable without a lock.
#[derive(Debug)]
pub(crate) struct IrqCtx {
    /// Per queue index: how it interrupts ([`Event::encode`]).
    events: Box<[AtomicU64]>,
    /// Per queue index: used-ring publishes that asked for an interrupt.
    notifies: Box<[AtomicU64]>,
    /// The firmware (QP mode needs its objects).
    shared: Weak<Shared>,
}

/// The one interrupt point of the model: queue `index`'s used-ring publish asked for an
/// interrupt (the engine calls this, with its own interrupt sender). MSI-X signals the queue's
/// vector, QP mode sends on the firmware QP ([`eq`]'s chain, under the firmware's lock), NO_MSIX
/// does nothing. Returns whether anything was raised.
fn interrupt(ctx: &IrqCtx, index: u16, irq: &mut Option<IrqSender>) -> bool {
    let i = usize::from(index);
    if let Some(n) = ctx.notifies.get(i) {
        // One writer (the engine thread).
        n.store(n.load(Ordering::Relaxed) + 1, Ordering::Relaxed);
    }
    let ev = ctx
        .events
        .get(i)
        .map_or(Event::None, |e| Event::decode(e.load(Ordering::Acquire)));
    match ev {
        Event::None => false,
        Event::Msix(v) => {
            if let Some(s) = irq.as_mut() {
                s.signal(v);
            }
            true
        }
        Event::Qp(qpn) => match ctx.shared.upgrade() {
            Some(sh) => {
                lock(&sh.fw).qp_notify(qpn, irq);
                true
            }
            None => false,
        },
    }
}

/// The port wire's far end (`wire=port`): what tests and `inject` / `take_tx` use.
#[derive(Debug)]
struct PortEnd {
    pool: Arc<Mempool>,
    ends: Vec<RepPortEnds>,
    burst: Burst,
}

/// Frames the port wire's channels hold each way, per queue pair.
const PORT_DEPTH: usize = 1024;

impl PortEnd {
    fn new(name: &str, pairs: u16) -> Result<(PortEnd, Vec<eswitch::RepQueueEnds>)> {
        let err = |what: String| Error::Model {
            name: name.to_string(),
            what,
        };
        let pool = Mempool::new(
            &format!("{name}-port"),
            MempoolConfig {
                count: (u32::from(pairs) * 2 * PORT_DEPTH as u32 + 512).min(1 << 20),
                data_room: 2048,
                cache_size: 0,
                mem: MemMode::NoHuge,
            },
        )
        .map_err(|e| err(format!("port wire buffers: {e}")))?;
        let mut q = Vec::new();
        let mut p = Vec::new();
        for _ in 0..pairs {
            let (qe, pe) =
                eswitch::rep_channels(PORT_DEPTH).map_err(|e| err(format!("port wire: {e}")))?;
            q.push(qe);
            p.push(pe);
        }
        let mut end = PortEnd {
            pool,
            ends: p,
            burst: Burst::new(64),
        };
        end.top_up();
        Ok((end, q))
    }

    /// Keeps every pair's blank channel full (the engine fills blanks with transmitted frames).
    fn top_up(&mut self) {
        for e in &mut self.ends {
            while e.blanks.len() < e.blanks.capacity() {
                while self.burst.room() > 0 {
                    match self.pool.alloc() {
                        Some(m) => {
                            let _ = self.burst.push(m);
                        }
                        None => break,
                    }
                }
                if self.burst.is_empty() || e.blanks.send_burst(&mut self.burst) == 0 {
                    break;
                }
            }
            // Blanks the channel did not take go back to the pool.
            while self.burst.pop().is_some() {}
        }
    }
}

/// A device: its functions' engine thread and wires.
#[derive(Debug)]
struct DevCore {
    name: String,
    engine: Arc<EngineShared>,
    ports: Vec<Mutex<Option<PortEnd>>>,
    // Dropped last: stops and joins the engine thread.
    _thread: EngineThread,
}

/// One function of an mlx5 model device. Hand it to `core::pci::model::open` as an
/// `Arc<dyn DeviceModel>` and keep a clone to inspect it.
#[derive(Debug)]
pub struct Mlx5Model {
    opts: ModelOptions,
    index: usize,
    shared: Arc<Shared>,
    vf: Arc<VfShared>,
    irq: Arc<IrqCtx>,
    dev: Arc<DevCore>,
}

/// A device of several functions (`vfs`), found again by name while it lives.
#[derive(Debug)]
pub struct Mlx5Device {
    name: String,
    functions: Vec<Arc<Mlx5Model>>,
}

impl Mlx5Device {
    /// The functions.
    pub fn functions(&self) -> &[Arc<Mlx5Model>] {
        &self.functions
    }

    /// Device name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// A new device of `vfs` functions built from `opts` (`opts.name` names the device; function
    /// `k`'s MAC ends in `mac[5] + k`, its vhca_id is `vhca_id + k`). With `Wire::Cable`,
    /// function 2k is cabled to 2k + 1 (an odd count leaves the last one unwired); a TAP wire
    /// gives function `k > 0` the interface `NAMEk`.
    pub fn new(opts: ModelOptions, vfs: u16) -> Result<Arc<Mlx5Device>> {
        let name = opts.name.clone();
        let err = |what: String| Error::Model {
            name: name.clone(),
            what,
        };
        if vfs == 0 {
            return Err(err("a device needs at least one function".into()));
        }
        let pairs = opts.max_queues.div_ceil(2).clamp(1, 0x7fff) as u16;
        let mut fopts = Vec::new();
        let mut vfss = Vec::new();
        for k in 0..vfs {
            let mut o = opts.clone();
            if vfs > 1 {
                o.name = format!("{name}-f{k}");
            }
            o.mac[5] = o.mac[5].wrapping_add(k as u8);
            o.vhca_id = o.vhca_id.wrapping_add(k);
            vfss.push(Arc::new(
                VfShared::with_shared_bell(k, pairs, o.mac).map_err(&err)?,
            ));
            fopts.push(o);
        }
        let engine = Arc::new(EngineShared::new(&name, vfss.clone(), opts.poll).map_err(&err)?);
        let mut wires = Vec::new();
        let mut ports = Vec::new();
        let mut rep_ends = Vec::new();
        for (k, fo) in fopts.iter().enumerate() {
            let w = match &opts.wire {
                Wire::Loop => eswitch::Wire::Loop(None),
                Wire::None => eswitch::Wire::None,
                Wire::Cable => {
                    let peer = k ^ 1;
                    if peer < usize::from(vfs) {
                        eswitch::Wire::Cable(peer)
                    } else {
                        eswitch::Wire::None
                    }
                }
                Wire::Tap(t) => {
                    let ifname = if k == 0 { t.clone() } else { format!("{t}{k}") };
                    eswitch::Wire::tap(&ifname).map_err(|e| err(e.to_string()))?
                }
                Wire::Port => eswitch::Wire::Rep,
            };
            wires.push(w);
            if opts.wire == Wire::Port {
                let (end, q) = PortEnd::new(&fo.name, pairs)?;
                ports.push(Mutex::new(Some(end)));
                rep_ends.push(Some(q));
            } else {
                ports.push(Mutex::new(None));
                rep_ends.push(None);
            }
        }
        let thread = engine::spawn(Arc::clone(&engine), wires).map_err(&err)?;
        let dev = Arc::new(DevCore {
            name: name.clone(),
            engine: Arc::clone(&engine),
            ports,
            _thread: thread,
        });
        let mut functions = Vec::new();
        for (k, (o, vf)) in fopts.into_iter().zip(vfss).enumerate() {
            let nq = usize::from(vf.queues());
            let shared = Arc::new(Shared {
                fw: Mutex::new(Fw::new(o.clone(), Arc::clone(&vf))),
                regs: Mutex::new(Regs {
                    cmdq: 0,
                    nic_interface: 0,
                    init_left: o.init_delay_reads,
                    synd: 0,
                    ext_synd: 0,
                    counter_frozen: None,
                    hang: false,
                }),
                bus: Mutex::new(None),
                config: Mutex::new(config_space(&o)),
                started: Instant::now(),
            });
            let irq = Arc::new(IrqCtx {
                events: (0..nq).map(|_| AtomicU64::new(0)).collect(),
                notifies: (0..nq).map(|_| AtomicU64::new(0)).collect(),
                shared: Arc::downgrade(&shared),
            });
            {
                let ctx = Arc::clone(&irq);
                let mut c = vf.ctl();
                c.running = true;
                c.notify = Some(Arc::new(move |q, s| interrupt(&ctx, q, s)));
                if let Some(q) = rep_ends[k].take() {
                    c.rep = Some(q);
                }
            }
            lock(&shared.fw).events = Some(Arc::clone(&irq));
            lock(&shared.fw).install_steering();
            engine.sync(&vf).map_err(&err)?;
            functions.push(Arc::new(Mlx5Model {
                opts: o,
                index: k,
                shared,
                vf,
                irq,
                dev: Arc::clone(&dev),
            }));
        }
        Ok(Arc::new(Mlx5Device { name, functions }))
    }

    /// The live device `name`, or a new one from `make()` (registered under `name`).
    pub fn get_or_create(
        name: &str,
        make: impl FnOnce() -> Result<Arc<Mlx5Device>>,
    ) -> Result<Arc<Mlx5Device>> {
        static T: OnceLock<Mutex<BTreeMap<String, Weak<Mlx5Device>>>> = OnceLock::new();
        let t = T.get_or_init(|| Mutex::new(BTreeMap::new()));
        let mut t = lock(t);
        if let Some(d) = t.get(name).and_then(Weak::upgrade) {
            return Ok(d);
        }
        t.retain(|_, w| w.strong_count() > 0);
        let d = make()?;
        t.insert(name.to_string(), Arc::downgrade(&d));
        Ok(d)
    }
}

const MSIX_CAP: usize = 0x40;
const PCIE_CAP: usize = 0x60;

fn config_space(o: &ModelOptions) -> [u8; 256] {
    let mut c = [0u8; 256];
    let put16 =
        |c: &mut [u8; 256], off: usize, v: u16| c[off..off + 2].copy_from_slice(&v.to_le_bytes());
    put16(&mut c, 0x00, 0x15b3);
    put16(&mut c, 0x02, o.device_id);
    put16(&mut c, 0x06, 1 << 4);
    c[0x08] = 0;
    c[0x0b] = 0x02; // network controller
    c[0x10] = 0x0c; // 64-bit prefetchable memory BAR
    put16(&mut c, 0x2c, 0x15b3);
    put16(&mut c, 0x2e, 0x0020);
    c[0x34] = MSIX_CAP as u8;
    c[MSIX_CAP] = cap_id::MSIX;
    c[MSIX_CAP + 1] = PCIE_CAP as u8;
    put16(
        &mut c,
        MSIX_CAP + 2,
        o.msix_vectors.saturating_sub(1) & 0x7ff,
    );
    // Table and PBA in BAR0 above the init segment pages.
    c[MSIX_CAP + 4..MSIX_CAP + 8].copy_from_slice(&0x2000u32.to_le_bytes());
    c[MSIX_CAP + 8..MSIX_CAP + 12].copy_from_slice(&0x3000u32.to_le_bytes());
    c[PCIE_CAP] = cap_id::EXP;
    c[PCIE_CAP + 1] = 0;
    put16(&mut c, PCIE_CAP + 2, 0x0002);
    c
}

impl Mlx5Model {
    /// A one-function device in its power-on state.
    pub fn new(opts: ModelOptions) -> Result<Arc<Mlx5Model>> {
        let name = opts.name.clone();
        let d = Mlx5Device::new(opts, 1)?;
        d.functions.first().cloned().ok_or(Error::Model {
            name,
            what: "no function".into(),
        })
    }

    /// The options it was made with.
    pub fn options(&self) -> &ModelOptions {
        &self.opts
    }

    /// The function's index in its device.
    pub fn function(&self) -> usize {
        self.index
    }

    /// The engine's view of this function (counters, positions, doorbells).
    pub fn engine_vf(&self) -> &Arc<VfShared> {
        &self.vf
    }

    /// Live firmware objects plus pages held by firmware (0 after a clean teardown).
    pub fn live_objects(&self) -> usize {
        lock(&self.shared.fw).live()
    }

    /// Live objects per kind.
    pub fn census(&self) -> BTreeMap<Kind, usize> {
        lock(&self.shared.fw).store.census()
    }

    /// Pages held by firmware.
    pub fn firmware_pages(&self) -> usize {
        lock(&self.shared.fw).pages.len()
    }

    /// Counters (command counts from the firmware, frame counts from the engine's queues).
    pub fn stats(&self) -> FwStats {
        let mut s = lock(&self.shared.fw).stats;
        let mut rx_dropped = 0;
        for q in 0..self.vf.queues() {
            let Some(c) = self.vf.counters(q) else {
                continue;
            };
            let c = c.snapshot();
            if q % 2 == 1 {
                s.tx_frames += c.packets;
                s.bad_frames += c.errors;
                s.tx_drops += c.dropped;
            } else {
                s.rx_frames += c.packets;
                rx_dropped += c.dropped;
            }
        }
        s.steer_drops = lock(&self.shared.fw).steer_drops.load(Ordering::Relaxed);
        s.rx_drops = rx_dropped.saturating_sub(s.steer_drops);
        s.notifies = self
            .irq
            .notifies
            .iter()
            .map(|n| n.load(Ordering::Relaxed))
            .sum();
        s
    }

    /// The last failed command.
    pub fn last_failure(&self) -> Option<Failure> {
        lock(&self.shared.fw).last_failure.clone()
    }

    /// Whether the function is initialized (between INIT_HCA and TEARDOWN_HCA).
    pub fn is_initialized(&self) -> bool {
        lock(&self.shared.fw).initialized
    }

    /// Doorbells the engine saw for virtio queue `index` (writes between two looks of the
    /// engine count once).
    pub fn kicks(&self, index: u16) -> u64 {
        self.vf.counters(index).map_or(0, |c| c.snapshot().kicks)
    }

    /// Notifications queue `index` asked for (used-ring publishes that requested an
    /// interrupt), in any event mode.
    pub fn notifies(&self, index: u16) -> u64 {
        self.irq
            .notifies
            .get(usize::from(index))
            .map_or(0, |n| n.load(Ordering::Relaxed))
    }

    /// Feeds a frame into receive steering as if it came from the wire (`wire=port` only; waits
    /// up to a second while the wire's channel is full). Returns whether it went in.
    pub fn inject(&self, frame: &[u8]) -> bool {
        let Some(port) = self.dev.ports.get(self.index) else {
            return false;
        };
        let end = Instant::now() + Duration::from_secs(1);
        loop {
            {
                let mut g = lock(port);
                let Some(p) = g.as_mut() else { return false };
                let Some(mut m) = p.pool.alloc() else {
                    return false;
                };
                match m.append(frame.len()) {
                    Some(d) => d.copy_from_slice(frame),
                    None => return false,
                }
                let _ = p.burst.push(m);
                let sent = p
                    .ends
                    .first_mut()
                    .map_or(0, |e| e.to_vf.send_burst(&mut p.burst));
                while p.burst.pop().is_some() {}
                p.top_up();
                self.dev.engine.wake();
                if sent == 1 {
                    return true;
                }
            }
            if Instant::now() > end {
                return false;
            }
            std::thread::sleep(Duration::from_micros(100));
        }
    }

    /// Frames transmitted out of the port so far (`wire=port`); takes them.
    pub fn take_tx(&self) -> Vec<Vec<u8>> {
        let mut out = Vec::new();
        let Some(port) = self.dev.ports.get(self.index) else {
            return out;
        };
        let mut g = lock(port);
        let Some(p) = g.as_mut() else { return out };
        for e in 0..p.ends.len() {
            loop {
                let n = p.ends[e].from_vf.recv_burst(&mut p.burst);
                if n == 0 {
                    break;
                }
                for m in p.burst.iter() {
                    out.push(m.data().to_vec());
                }
                while p.burst.pop().is_some() {}
            }
        }
        p.top_up();
        out
    }

    /// Sets the health syndrome (0: healthy).
    pub fn set_health_syndrome(&self, synd: u8, ext: u16) {
        let mut r = lock(&self.shared.regs);
        r.synd = synd;
        r.ext_synd = ext;
    }

    /// Stops (or restarts) the health counter.
    pub fn freeze_health_counter(&self, frozen: bool) {
        let now = self.counter_now();
        lock(&self.shared.regs).counter_frozen = frozen.then_some(now);
    }

    /// Stops completing commands (firmware hang) or resumes.
    pub fn hang_commands(&self, hang: bool) {
        lock(&self.shared.regs).hang = hang;
    }

    /// State, error type and positions of queue object `id`, if it exists.
    pub fn queue(&self, id: u32) -> Option<(u8, u8, u16, u16)> {
        lock(&self.shared.fw).queue_info(id.into())
    }

    fn counter_now(&self) -> u32 {
        (self.shared.started.elapsed().as_millis() as u32) & 0xff_ffff
    }

    /// Applies what the last commands changed in the engine's control state, outside the
    /// firmware lock (the engine's interrupt point may take it), then reads back what the
    /// engine wrote (positions of stopped queues).
    fn settle(&self) {
        let pending = std::mem::take(&mut lock(&self.shared.fw).sync_pending);
        if !pending {
            return;
        }
        if let Err(e) = self.dev.engine.sync(&self.vf) {
            tracing::warn!("{}: {e}", self.opts.name);
        }
        lock(&self.shared.fw).after_sync();
    }

    fn read_reg(&self, off: u64) -> u32 {
        let mut r = lock(&self.shared.regs);
        match off {
            reg::FW_REV => (7 << 16) | 22,
            reg::CMDIF_REV => (5 << 16) | 1000,
            reg::CMDQ_HI => (r.cmdq >> 32) as u32,
            reg::CMDQ_LO => {
                (r.cmdq as u32 & !0xfff)
                    | (u32::from(r.nic_interface) << 8)
                    | (u32::from(self.opts.log_cmdq_size) << 4)
                    | u32::from(self.opts.log_cmdq_stride)
            }
            reg::INIT_BUSY if r.init_left > 0 => {
                if r.init_left != u32::MAX {
                    r.init_left -= 1;
                }
                1 << 31
            }
            reg::INIT_BUSY => 0,
            reg::HEALTH_FW_VER => (7 << 24) | (22 << 16) | 1000,
            reg::HEALTH_HW_ID => 0x20d,
            reg::HEALTH_SYND_WORD => (u32::from(r.synd) << 16) | u32::from(r.ext_synd),
            reg::HEALTH_CNT => {
                let frozen = r.counter_frozen;
                drop(r);
                frozen.unwrap_or_else(|| self.counter_now())
            }
            _ => 0,
        }
    }

    fn write_reg(&self, off: u64, v: u32) {
        let dbell = match self.opts.skew {
            Some(Skew::CmdDoorbell) => reg::DOORBELL + 4,
            _ => reg::DOORBELL,
        };
        let mut r = lock(&self.shared.regs);
        match off {
            reg::CMDQ_HI => r.cmdq = (r.cmdq & 0xffff_ffff) | (u64::from(v) << 32),
            reg::CMDQ_LO => {
                r.cmdq = (r.cmdq & !0xffff_ffff) | u64::from(v & !0xfff);
                r.nic_interface = ((v >> 8) & 7) as u8;
                // Firmware takes a moment to pick the queue up.
                r.init_left = self.opts.init_delay_reads;
            }
            o if o == dbell => {
                if r.hang || r.nic_interface != 0 {
                    return;
                }
                let base = r.cmdq;
                drop(r);
                self.run_commands(base, v);
            }
            _ => {}
        }
    }

    /// Executes the commands in the slots of `mask`.
    fn run_commands(&self, base: u64, mask: u32) {
        let Some(bus) = lock(&self.shared.bus).clone() else {
            return;
        };
        let dom = bus.dma.view().1;
        let slots = 1u32 << self.opts.log_cmdq_size;
        for slot in 0..slots.min(32) {
            if mask & (1 << slot) == 0 {
                continue;
            }
            let at = base + (u64::from(slot) << self.opts.log_cmdq_stride);
            self.run_slot(&bus.dma, &dom, at);
        }
    }

    fn run_slot(&self, dma: &DmaDomain, dom: &GuestMemory, at: u64) {
        let mut d = [0u8; wire::D_LEN];
        if dom.read(at, &mut d).is_err() {
            dma.record_fault(at, wire::D_LEN as u64);
            return;
        }
        if d[wire::D_STATUS] & 1 == 0 {
            return;
        }
        fence(Ordering::Acquire);
        let mut fw = lock(&self.shared.fw);
        let status = match self.deliver(&mut fw, dma, dom, &d) {
            Ok((input, outs, outlen)) => {
                let out = fw.execute(&input, outlen);
                drop(fw);
                // The engine follows before the command completes.
                self.settle();
                let mut inline = [0u8; 16];
                inline.copy_from_slice(&out[..16]);
                let mut ok = dom.write(at + wire::D_OUT as u64, &inline).is_ok();
                for (i, &blk) in outs.iter().enumerate() {
                    let from = 16 + i * wire::MB_DATA;
                    let to = (from + wire::MB_DATA).min(out.len());
                    if from < to {
                        ok &= dom.write(blk, &out[from..to]).is_ok();
                    }
                }
                if ok { 0 } else { wire::DS_FW }
            }
            Err(ds) => {
                drop(fw);
                ds
            }
        };
        fence(Ordering::Release);
        if dom
            .write(at + wire::D_STATUS as u64, &[status << 1])
            .is_err()
        {
            dma.record_fault(at, wire::D_LEN as u64);
        }
    }

    /// Checks the descriptor and gathers the input; returns (input, output block addresses,
    /// output length) or a delivery status.
    #[allow(clippy::type_complexity)]
    fn deliver(
        &self,
        fw: &mut Fw,
        dma: &DmaDomain,
        dom: &GuestMemory,
        d: &[u8; wire::D_LEN],
    ) -> std::result::Result<(Vec<u8>, Vec<u64>, usize), u8> {
        let csum = fw.cmdif_checksum != 0;
        if d[wire::D_TYPE] != wire::XPORT_PCI {
            return Err(wire::DS_TYPE);
        }
        if csum && d[..wire::D_STATUS].iter().fold(0u8, |a, &b| a ^ b) != 0xff {
            return Err(wire::DS_SIG);
        }
        let token = d[wire::D_TOKEN];
        let inlen = be32(d, wire::D_INLEN) as usize;
        let outlen = be32(d, wire::D_OUTLEN) as usize;
        let n_in = inlen.saturating_sub(16).div_ceil(wire::MB_DATA);
        let n_out = outlen.saturating_sub(16).div_ceil(wire::MB_DATA);
        if n_in > wire::MB_MAX_CHAIN {
            return Err(wire::DS_IN_LEN);
        }
        if n_out > wire::MB_MAX_CHAIN {
            return Err(wire::DS_OUT_LEN);
        }
        let mut input = vec![0u8; inlen];
        let k = inlen.min(16);
        input[..k].copy_from_slice(&d[wire::D_IN..wire::D_IN + k]);
        let walk = |first: u64,
                    n: usize,
                    input_side: bool,
                    data: &mut Option<&mut Vec<u8>>|
         -> std::result::Result<Vec<u64>, u8> {
            let (align_ds, len_ds) = if input_side {
                (wire::DS_IN_ALIGN, wire::DS_IN_LEN)
            } else {
                (wire::DS_OUT_ALIGN, wire::DS_OUT_LEN)
            };
            let mut addrs = Vec::with_capacity(n);
            let mut at = first;
            for i in 0..n {
                if at == 0 {
                    return Err(len_ds);
                }
                if at & (wire::MB_ALIGN - 1) != 0 {
                    return Err(align_ds);
                }
                let mut b = vec![0u8; wire::MB_LEN];
                if dom.read(at, &mut b).is_err() {
                    dma.record_fault(at, wire::MB_LEN as u64);
                    return Err(wire::DS_FW);
                }
                if be32(&b, wire::MB_NUM) != i as u32 {
                    return Err(wire::DS_BLOCK);
                }
                if b[wire::MB_TOKEN] != token {
                    return Err(wire::DS_TOKEN);
                }
                if csum {
                    let x = |r: std::ops::Range<usize>| b[r].iter().fold(0u8, |a, &c| a ^ c);
                    if x(wire::MB_DATA..wire::MB_SIG) != 0xff
                        || (input_side && x(0..wire::MB_LEN) != 0xff)
                    {
                        return Err(wire::DS_SIG);
                    }
                }
                if let Some(v) = data.as_mut() {
                    let from = 16 + i * wire::MB_DATA;
                    let to = (from + wire::MB_DATA).min(v.len());
                    v[from..to].copy_from_slice(&b[..to - from]);
                }
                addrs.push(at);
                at = be64(&b, wire::MB_NEXT);
            }
            Ok(addrs)
        };
        walk(be64(d, wire::D_IN_PTR), n_in, true, &mut Some(&mut input))?;
        let outs = walk(be64(d, wire::D_OUT_PTR), n_out, false, &mut None)?;
        Ok((input, outs, outlen.max(16)))
    }
}

impl Drop for DevCore {
    fn drop(&mut self) {
        tracing::debug!("model {}: device gone, engine stops", self.name);
    }
}

impl DeviceModel for Mlx5Model {
    fn name(&self) -> &str {
        &self.opts.name
    }

    fn config_read(&self, offset: u16, buf: &mut [u8]) {
        let c = lock(&self.shared.config);
        for (i, b) in buf.iter_mut().enumerate() {
            *b = c.get(usize::from(offset) + i).copied().unwrap_or(0xff);
        }
    }

    fn config_write(&self, offset: u16, buf: &[u8]) {
        let mut c = lock(&self.shared.config);
        for (i, &b) in buf.iter().enumerate() {
            let at = usize::from(offset) + i;
            // Writable: command register, MSI-X message control high byte.
            if (0x04..0x06).contains(&at) || at == MSIX_CAP + 3 {
                c[at] = b;
            }
        }
    }

    fn bar_len(&self, bar: u8) -> u64 {
        if bar == 0 { reg::BAR0_LEN } else { 0 }
    }

    fn bar_read(&self, bar: u8, offset: u64, buf: &mut [u8]) {
        buf.fill(0);
        if bar != 0 || buf.len() != 4 || offset >= 0x2000 {
            return;
        }
        buf.copy_from_slice(&self.read_reg(offset).to_be_bytes());
    }

    fn bar_write(&self, bar: u8, offset: u64, buf: &[u8]) {
        if bar != 0 {
            return;
        }
        if offset == reg::VQ_DOORBELL_PAGE && (buf.len() == 2 || buf.len() == 4) {
            // The queue index, as the engine's shared doorbell page takes it.
            let q = u16::from_le_bytes([buf[0], buf[1]]);
            self.vf.ring_bell(q, u32::from(q));
            self.dev.engine.wake();
            return;
        }
        if offset >= u64::from(reg::FIRST_UAR) * 4096 {
            self.uar_write(offset, buf);
            return;
        }
        if buf.len() == 4 && offset < 0x2000 {
            let mut b = [0u8; 4];
            b.copy_from_slice(buf);
            self.write_reg(offset, u32::from_be_bytes(b));
        }
    }

    fn msix_vectors(&self) -> u16 {
        self.opts.msix_vectors
    }

    fn reset(&self) {
        lock(&self.shared.fw).reset();
        {
            let mut r = lock(&self.shared.regs);
            r.cmdq = 0;
            r.nic_interface = 0;
            r.init_left = self.opts.init_delay_reads;
            r.synd = 0;
            r.ext_synd = 0;
            r.hang = false;
        }
        *lock(&self.shared.config) = config_space(&self.opts);
        self.settle();
    }

    fn attach(&self, bus: ModelBus) {
        lock(&self.shared.fw).dma = Some(bus.dma.clone());
        *lock(&self.shared.bus) = Some(bus.clone());
        self.vf.set_bus(bus);
        if let Err(e) = self.dev.engine.sync(&self.vf) {
            tracing::warn!("{}: {e}", self.opts.name);
        }
    }

    fn notify_area(&self, bar: u8, offset: u64, len: u64) -> Option<NotifyArea> {
        if bar != 0 || offset != reg::VQ_DOORBELL_PAGE || len > engine::BELL_PAGE {
            return None;
        }
        let fd = self.vf.bell_segment().file().try_clone().ok()?;
        Some(NotifyArea {
            fd: Arc::new(std::os::fd::OwnedFd::from(fd)),
            offset: 0,
            size: engine::BELL_PAGE,
        })
    }
}

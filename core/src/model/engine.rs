//! The virtqueue engine: the device side of the shared split/packed ring code
//! ([`DeviceQueue`]) running on one polling thread per device, for all of its VFs.
//!
//! # What the engine does
//!
//! - **DMA only through the domain.** Each VF's rings and buffers are reached through its
//!   domain's IOVA view ([`DmaDomain::view`](crate::pci::DmaDomain::view)); when the domain's
//!   generation changes (a map or unmap) the view is re-read and every running queue is rebuilt
//!   at its current position. A ring area, descriptor buffer or indirect table outside every
//!   mapping is an IOMMU fault: recorded in the domain ([`record_fault`](crate::pci::DmaDomain::record_fault)), counted on the queue
//!   (`iommu_faults`), and the queue stops (broken; the device status shows NEEDS_RESET) until
//!   the driver disables or resets it. Other descriptor errors count as `errors` and break the
//!   queue the same way. Nothing a driver writes can crash the engine.
//! - **Transmit** (odd queues): chains are popped, the virtio-net header is skipped (12 bytes
//!   with VERSION_1 or MRG_RXBUF, else 10), the frame is copied into the engine's preallocated
//!   frame arena, the chain is completed with length 0, and the burst is handed to the VF's
//!   wire ([`eswitch`](super::eswitch)). One-buffer frames take a staged path: all chains of
//!   the burst are popped first with their buffer lines requested, then copied.
//! - **Receive** (even queues): each frame gets a zeroed header (`num_buffers` = 1) and is
//!   written into a receive chain; with MRG_RXBUF a frame larger than a chain spans several
//!   (`num_buffers` = chains used). A frame that finds no buffer is counted as `dropped` on the
//!   receive queue (the chains it took are given back).
//! - **Interrupts**: after each burst's one publish, when the ring's suppression state asks for
//!   one (flags, or EVENT_IDX's `used_event` / packed `off_wrap`), the queue's MSI-X vector is
//!   raised ([`IrqSender::signal`]), which signals the eventfd the driver wired to it.
//! - **Doorbells**: each queue has a 4 KiB doorbell page in a memfd (so a host notifier can map
//!   it). The engine checks every queue's page once per iteration: a write (any value other than
//!   the idle pattern `0xffff_ffff`) is a kick, counted. Register writes through the PCI layer
//!   also wake the engine at once when it sleeps. Kicks are only a wake-up: the engine polls
//!   the rings themselves, so a missed kick costs latency, never a packet.
//! - **Polling**: while there is work the engine spins; after 100 µs without any
//!   ([`PollMode::Adaptive`]) it asks for kicks (enables notifications), checks once more, and
//!   sleeps in `epoll_wait(2)` on its wake eventfd and the TAP fds, at most 1 ms while a VF runs (so a
//!   host-notifier page written by another process is seen within a millisecond).
//!   [`PollMode::Busy`] never sleeps.
//! - **Ring state**: positions (next avail, next used; packed: wrap counter in bit 15) are
//!   published per burst in [`QueueCounters`] and written back into the control state whenever
//!   a queue stops, the device suspends, or a queue is disabled. The engine completes every
//!   chain it pops within the burst, so a stopped queue has no chain in flight and
//!   `avail == used`.
//! - **Dirty logging**: with a log configured (bitmap IOVA and size in the VF's domain), every
//!   page of every buffer the device writes and of the used-ring entries it publishes is marked
//!   ([`DirtyLog`], reached through the domain like any DMA).
//! - **Suspend**: the engine finishes the burst in flight, publishes, writes the positions back
//!   and touches no ring until resumed (frames arriving for a suspended VF are dropped and
//!   counted).
//!
//! # Hooks for vendor models
//!
//! [`VfControl::queue_mem`] gives a queue its own memory view (a model that translates ring and
//! buffer addresses its own way, e.g. through memory keys) instead of the domain's, rebuilt from
//! the domain's view whenever the mappings change; [`VfControl::queue_log`] gives a queue its own
//! dirty log (a bitmap the model addresses through such a view, set per queue);
//! [`VfControl::steer`] chooses the receive pair of each frame arriving from the wire (a flow
//! table, RSS) instead of the wire's own pair; [`VfControl::notify`] replaces the MSI-X vector
//! with the model's own interrupt point (a queue that notifies through the model's event
//! objects); [`VfShared::with_shared_bell`] gives a VF one doorbell page for all its queues, the
//! value written naming the queue (a device whose doorbell is "write the queue index here").
//! See [`spawn`] for how a model runs the engine.
//!
//! # Control
//!
//! The device model (register writes on a driver thread) changes a VF's [`VfControl`] under its
//! mutex and calls [`EngineShared::sync`]: that bumps the VF's generation, wakes the engine, and
//! waits (bounded) until the engine has applied it. The engine notices changes with one atomic
//! load per iteration and applies them between bursts, so the per-packet path takes no lock,
//! makes no allocation, and (TAP wires aside) no system call.

use std::os::fd::AsFd;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use crossbeam_utils::CachePadded;
use nix::sys::epoll::{Epoll, EpollCreateFlags, EpollEvent, EpollFlags, EpollTimeout};
use nix::sys::eventfd::{EfdFlags, EventFd};

use super::eswitch::{RepQueueEnds, Wire};
use super::spec::PollMode;
use crate::mbuf::Burst;
use crate::mem::Segment;
use crate::pci::model::{IrqSender, ModelBus};
use crate::vdpa::VqStats;
use crate::virtio::features as vf;
use crate::virtio::net::hdr_len;
use crate::virtio::{
    AddrKind, Chain, DeviceQueue, DirtyLog, GuestMemory, QueueConfig, QueueError, Segs, Staged,
};

/// Frames handled per queue per iteration.
pub const BURST: usize = 32;
/// Largest frame the engine carries (bytes after the virtio-net header).
pub const MAX_FRAME: usize = 65536;
/// A receive frame may span at most this many chains (MRG_RXBUF).
const MAX_MRG_CHAINS: usize = 64;
/// MSI-X vector number meaning "none".
pub const NO_VECTOR: u16 = 0xffff;
/// What a doorbell slot holds when nobody rang it.
pub const BELL_IDLE: u32 = 0xffff_ffff;
/// Bytes per doorbell page.
pub const BELL_PAGE: u64 = 4096;
/// Idle time before the adaptive engine sleeps.
const SPIN: Duration = Duration::from_micros(100);
/// Longest sleep while a VF runs.
const TICK_RUNNING: Duration = Duration::from_millis(1);
/// Longest sleep while no VF runs.
const TICK_IDLE: Duration = Duration::from_millis(200);
/// Mbufs the engine keeps as blanks for a representor.
const STASH: usize = 256;

/// Per-queue counters and published ring state. Counters are written by the engine only
/// (single writer: relaxed load + store); anyone reads them.
#[derive(Debug, Default)]
pub struct QueueCounters {
    packets: CachePadded<AtomicU64>,
    bytes: AtomicU64,
    errors: AtomicU64,
    dropped: AtomicU64,
    iommu_faults: AtomicU64,
    kicks: AtomicU64,
    interrupts: AtomicU64,
    /// Next avail position (packed: wrap counter in bit 15), published per burst.
    avail: AtomicU32,
    /// Next used position.
    used: AtomicU32,
    /// Whether the queue stopped on an error.
    broken: AtomicBool,
}

#[inline(always)]
fn bump(c: &AtomicU64, n: u64) {
    if n != 0 {
        c.store(c.load(Ordering::Relaxed).wrapping_add(n), Ordering::Relaxed);
    }
}

impl QueueCounters {
    /// A snapshot in the vDPA contract's shape.
    pub fn snapshot(&self) -> VqStats {
        VqStats {
            packets: self.packets.load(Ordering::Relaxed),
            bytes: self.bytes.load(Ordering::Relaxed),
            errors: self.errors.load(Ordering::Relaxed),
            dropped: self.dropped.load(Ordering::Relaxed),
            iommu_faults: self.iommu_faults.load(Ordering::Relaxed),
            kicks: self.kicks.load(Ordering::Relaxed),
            interrupts: self.interrupts.load(Ordering::Relaxed),
        }
    }

    /// Whether the queue stopped on an error (IOMMU fault or bad descriptor).
    pub fn is_broken(&self) -> bool {
        self.broken.load(Ordering::Acquire)
    }

    /// The positions as last published by the engine (live; final once the queue stopped).
    pub fn positions(&self) -> (u16, u16) {
        (
            self.avail.load(Ordering::Acquire) as u16,
            self.used.load(Ordering::Acquire) as u16,
        )
    }
}

/// One queue as the driver programmed it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QueueSetup {
    /// Ring size (0: not set).
    pub size: u16,
    /// Descriptor area IOVA.
    pub desc: u64,
    /// Driver area IOVA.
    pub driver: u64,
    /// Device area IOVA.
    pub device: u64,
    /// Enabled by the driver.
    pub enabled: bool,
    /// MSI-X vector ([`NO_VECTOR`]: none).
    pub vector: u16,
    /// Next avail position to start from (None: the format's start).
    pub avail: Option<u16>,
    /// Next used position to start from.
    pub used: Option<u16>,
}

impl Default for QueueSetup {
    fn default() -> Self {
        QueueSetup {
            size: 0,
            desc: 0,
            driver: 0,
            device: 0,
            enabled: false,
            vector: NO_VECTOR,
            avail: None,
            used: None,
        }
    }
}

impl QueueSetup {
    fn same_ring(&self, o: &QueueSetup) -> bool {
        (self.size, self.desc, self.driver, self.device) == (o.size, o.desc, o.driver, o.device)
    }
}

/// A queue's own view of memory ([`VfControl::queue_mem`]), built from the VF's domain view:
/// when the engine builds the queue and again whenever the domain's mappings change, so a
/// translation the model keeps (memory keys) follows the IOMMU. Control path only.
pub trait QueueView: Send + Sync + std::fmt::Debug {
    /// The memory the queue's rings and buffers are addressed in, over `domain` (the VF's
    /// domain view: IOVA = address).
    fn view(&self, domain: &GuestMemory) -> GuestMemory;
}

/// A fixed view, whatever the domain maps.
impl QueueView for GuestMemory {
    fn view(&self, _domain: &GuestMemory) -> GuestMemory {
        self.clone()
    }
}

/// A queue's own dirty log ([`VfControl::queue_log`]): the bitmap at `[addr, addr + size)` of
/// `view`'s memory (vhost log format: bit `n` = 4 KiB page `n` of the addresses the queue
/// writes).
#[derive(Debug, Clone)]
pub struct QueueLog {
    /// Where the bitmap is addressed.
    pub view: Arc<dyn QueueView>,
    /// Bitmap address in that view.
    pub addr: u64,
    /// Bitmap bytes.
    pub size: u64,
}

impl QueueLog {
    fn same(&self, o: &QueueLog) -> bool {
        Arc::ptr_eq(&self.view, &o.view) && self.addr == o.addr && self.size == o.size
    }
}

/// A model's interrupt point ([`VfControl::notify`]): called on the engine thread with the queue
/// index whenever a used-ring publish asks for an interrupt, instead of raising the queue's
/// MSI-X vector. It gets the engine's interrupt sender (an MSI-X vector costs no lock) and
/// returns whether it raised anything (counted as `interrupts`). It must not block for long.
pub type QueueNotify = Arc<dyn Fn(u16, &mut Option<IrqSender>) -> bool + Send + Sync>;

/// One VF's control state: what the driver asked for.
#[derive(Default)]
pub struct VfControl {
    /// Negotiated virtio features.
    pub features: u64,
    /// DRIVER_OK set (and no reset since).
    pub running: bool,
    /// Suspended by the driver.
    pub suspended: bool,
    /// Incremented by every reset: the engine drops all queue state.
    pub epoch: u64,
    /// Every queue.
    pub queues: Vec<QueueSetup>,
    /// Dirty log: (bitmap IOVA, bytes).
    pub log: Option<(u64, u64)>,
    /// Representor channels to install (empty: detach), picked up by the engine.
    pub rep: Option<Vec<RepQueueEnds>>,
    /// Per-queue memory views replacing the domain's for that queue's rings and buffers (a
    /// model whose queues translate addresses their own way, e.g. through memory keys). `None`
    /// (or a shorter vector): the domain view. The engine rebuilds a queue when its view changes
    /// (another `Arc`) and re-reads every view when the domain's mappings change.
    pub queue_mem: Vec<Option<Arc<dyn QueueView>>>,
    /// Per-queue dirty logs replacing [`VfControl::log`] for that queue (a model that logs per
    /// queue, through its own translation). `None` (or a shorter vector): the VF's log.
    pub queue_log: Vec<Option<QueueLog>>,
    /// The model's interrupt point instead of the queues' MSI-X vectors (`None`: the vectors).
    pub notify: Option<QueueNotify>,
    /// Receive steering for frames arriving from the wire: the queue pair a frame goes to (a
    /// model's flow table or RSS). `None`: the wire's own pair (loop, cable, representor) or pair
    /// 0 (TAP). A pair the VF does not have drops the frame (counted on queue 0).
    pub steer: Option<RxSteer>,
}

/// A receive steering function: frame → queue pair. Called on the engine thread once per frame
/// arriving from the wire; it must not block or allocate.
pub type RxSteer = Arc<dyn Fn(&[u8]) -> u16 + Send + Sync>;

impl std::fmt::Debug for VfControl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VfControl")
            .field("features", &format_args!("{:#x}", self.features))
            .field("running", &self.running)
            .field("suspended", &self.suspended)
            .field("epoch", &self.epoch)
            .field("queues", &self.queues)
            .field("log", &self.log)
            .field("steer", &self.steer.is_some())
            .field("notify", &self.notify.is_some())
            .finish_non_exhaustive()
    }
}

/// What the model and the engine share about one VF.
#[derive(Debug)]
pub struct VfShared {
    /// VF index in its device.
    pub index: u16,
    /// Queue pairs.
    pub pairs: u16,
    /// The VF's MAC.
    pub mac: [u8; 6],
    ctl: Mutex<VfControl>,
    ctl_gen: AtomicU64,
    ack_gen: AtomicU64,
    bus: Mutex<Option<ModelBus>>,
    /// Bumped by every `set_bus` (a function opened again, in another domain).
    bus_gen: AtomicU64,
    counters: Box<[QueueCounters]>,
    /// Doorbell pages: queue `q` at `q * 4096` (or one page for all, see `shared_bell`), as
    /// guest memory at address 0.
    bells: GuestMemory,
    /// One doorbell page for every queue: the value written names the queue.
    shared_bell: bool,
    bell_seg: Arc<Segment>,
    /// Whether a representor port is attached.
    pub(crate) rep_taken: AtomicBool,
}

impl VfShared {
    /// A VF with `pairs` queue pairs (its doorbell pages in a fresh memfd, one per queue).
    pub fn new(index: u16, pairs: u16, mac: [u8; 6]) -> Result<VfShared, String> {
        VfShared::build(index, pairs, mac, false)
    }

    /// A VF with `pairs` queue pairs whose queues share one doorbell page: a write of the queue
    /// index (its low 16 bits) at offset 0 rings that queue (a host notifier maps the page).
    pub fn with_shared_bell(index: u16, pairs: u16, mac: [u8; 6]) -> Result<VfShared, String> {
        VfShared::build(index, pairs, mac, true)
    }

    fn build(index: u16, pairs: u16, mac: [u8; 6], shared_bell: bool) -> Result<VfShared, String> {
        let nq = usize::from(pairs) * 2;
        let pages = if shared_bell { 1 } else { nq };
        let seg = Segment::new(
            &format!("sim-doorbells-{index}"),
            pages * BELL_PAGE as usize,
            crate::mem::MemMode::NoHuge,
        )
        .map_err(|e| format!("doorbell pages: {e}"))?;
        let region = crate::virtio::GuestRegion::from_segment(&seg).rebased(0, 0);
        let bells = GuestMemory::new(vec![region]).map_err(|e| format!("doorbell pages: {e}"))?;
        for q in 0..pages as u64 {
            bells
                .write(q * BELL_PAGE, &BELL_IDLE.to_le_bytes())
                .map_err(|e| format!("doorbell pages: {e}"))?;
        }
        Ok(VfShared {
            index,
            pairs,
            mac,
            ctl: Mutex::new(VfControl {
                queues: vec![QueueSetup::default(); nq],
                ..Default::default()
            }),
            ctl_gen: AtomicU64::new(0),
            ack_gen: AtomicU64::new(0),
            bus: Mutex::new(None),
            bus_gen: AtomicU64::new(0),
            counters: (0..nq).map(|_| QueueCounters::default()).collect(),
            bells,
            shared_bell,
            bell_seg: seg,
            rep_taken: AtomicBool::new(false),
        })
    }

    /// The control state (control path only).
    pub fn ctl(&self) -> MutexGuard<'_, VfControl> {
        // Every update leaves the state consistent, so a poisoned lock is still usable.
        self.ctl.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Counters of queue `q`.
    pub fn counters(&self, q: u16) -> Option<&QueueCounters> {
        self.counters.get(usize::from(q))
    }

    /// Number of queues.
    pub fn queues(&self) -> u16 {
        self.pairs * 2
    }

    /// Connects the VF to its bus (the model's `attach`).
    pub fn set_bus(&self, bus: ModelBus) {
        *self.bus.lock().unwrap_or_else(|p| p.into_inner()) = Some(bus);
        self.bus_gen.fetch_add(1, Ordering::AcqRel);
    }

    /// The memfd backing the doorbell pages (queue `q`'s page at offset `q * 4096`, or the one
    /// shared page at 0).
    pub fn bell_segment(&self) -> &Arc<Segment> {
        &self.bell_seg
    }

    /// Reads doorbell page bytes (all-ones outside the pages).
    pub fn read_bells(&self, offset: u64, buf: &mut [u8]) {
        if self.bells.read(offset, buf).is_err() {
            buf.fill(0xff);
        }
    }

    /// Rings queue `q`'s doorbell as a register write would (the engine notices the page). With
    /// a shared page, `q` itself is written there.
    pub fn ring_bell(&self, q: u16, value: u32) {
        if q >= self.queues() {
            return;
        }
        let (at, v) = if self.shared_bell {
            (0, u32::from(q))
        } else {
            (u64::from(q) * BELL_PAGE, value)
        };
        let _ = self.bells.write(at, &v.to_le_bytes());
    }

    /// Whether the queues share one doorbell page.
    pub fn has_shared_bell(&self) -> bool {
        self.shared_bell
    }

    /// Doorbell pages to poll.
    #[inline(always)]
    fn bell_pages(&self) -> u16 {
        if self.shared_bell { 1 } else { self.queues() }
    }
}

/// What the model side and the engine thread share for one device.
#[derive(Debug)]
pub struct EngineShared {
    name: String,
    vfs: Vec<Arc<VfShared>>,
    stop: AtomicBool,
    ctl_any: AtomicU64,
    sleeping: AtomicBool,
    wake: EventFd,
    alive: AtomicBool,
    poll: PollMode,
}

impl EngineShared {
    /// The shared state of an engine serving `vfs` (VF `k` at index `k`).
    pub fn new(
        name: &str,
        vfs: Vec<Arc<VfShared>>,
        poll: PollMode,
    ) -> Result<EngineShared, String> {
        Ok(EngineShared {
            name: name.to_string(),
            vfs,
            stop: AtomicBool::new(false),
            ctl_any: AtomicU64::new(0),
            sleeping: AtomicBool::new(false),
            wake: EventFd::from_flags(EfdFlags::EFD_CLOEXEC | EfdFlags::EFD_NONBLOCK)
                .map_err(|e| format!("engine eventfd: {e}"))?,
            alive: AtomicBool::new(false),
            poll,
        })
    }

    /// The VFs.
    pub fn vfs(&self) -> &[Arc<VfShared>] {
        &self.vfs
    }

    /// Wakes the engine if it sleeps (one SeqCst load when it does not).
    #[inline]
    pub fn wake(&self) {
        std::sync::atomic::fence(Ordering::SeqCst);
        if self.sleeping.load(Ordering::SeqCst) {
            let _ = self.wake.write(1);
        }
    }

    /// Makes the engine apply `vf`'s control state and waits until it has (at most 5 s).
    pub fn sync(&self, vf: &VfShared) -> Result<(), String> {
        let g = vf.ctl_gen.fetch_add(1, Ordering::AcqRel) + 1;
        self.ctl_any.fetch_add(1, Ordering::SeqCst);
        self.wake();
        let end = Instant::now() + Duration::from_secs(5);
        let mut spins = 0u32;
        while vf.ack_gen.load(Ordering::Acquire) < g {
            if !self.alive.load(Ordering::Acquire) {
                return Err(format!("{}: the engine thread is not running", self.name));
            }
            if Instant::now() > end {
                return Err(format!(
                    "{}: the engine did not apply VF {}'s change within 5 s",
                    self.name, vf.index
                ));
            }
            spins += 1;
            if spins < 64 {
                std::hint::spin_loop();
            } else {
                std::thread::sleep(Duration::from_micros(20));
            }
        }
        Ok(())
    }

    /// Asks the thread to stop (it exits at its next iteration).
    fn request_stop(&self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = self.wake.write(1);
    }
}

/// A running engine thread: stopped and joined when dropped (the thread then drops its queues,
/// TAP fds and representor channels).
#[derive(Debug)]
pub struct EngineThread {
    shared: Arc<EngineShared>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl EngineThread {
    /// The state shared with the thread.
    pub fn shared(&self) -> &Arc<EngineShared> {
        &self.shared
    }
}

impl Drop for EngineThread {
    fn drop(&mut self) {
        self.shared.request_stop();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Starts the engine thread of a device whose VFs are `shared.vfs()`, VF `k`'s wire being
/// `wires[k]` (missing wires are [`Wire::None`]).
///
/// This is how a vendor model reuses the engine: its [`DeviceModel`](crate::pci::model::DeviceModel)
/// keeps one [`VfShared`] per function, connects it at `attach` ([`VfShared::set_bus`]), turns
/// its own register writes into [`VfControl`] changes followed by [`EngineShared::sync`], rings
/// doorbells with [`VfShared::ring_bell`] + [`EngineShared::wake`], offers
/// [`VfShared::bell_segment`]'s pages as notify areas, and reads [`VfShared::counters`].
pub fn spawn(shared: Arc<EngineShared>, wires: Vec<Wire>) -> Result<EngineThread, String> {
    let t = spawn_thread(Arc::clone(&shared), wires)?;
    Ok(EngineThread {
        shared,
        thread: Some(t),
    })
}

fn spawn_thread(
    shared: Arc<EngineShared>,
    mut wires: Vec<Wire>,
) -> Result<std::thread::JoinHandle<()>, String> {
    while wires.len() < shared.vfs.len() {
        wires.push(Wire::None);
    }
    shared.alive.store(true, Ordering::Release);
    let name = format!("sim-{}", shared.name);
    let sh = Arc::clone(&shared);
    std::thread::Builder::new()
        .name(name.chars().take(15).collect())
        .spawn(move || {
            struct Alive(Arc<EngineShared>);
            impl Drop for Alive {
                fn drop(&mut self) {
                    self.0.alive.store(false, Ordering::Release);
                }
            }
            let _alive = Alive(Arc::clone(&sh));
            Engine::new(sh, wires).run();
        })
        .map_err(|e| {
            shared.alive.store(false, Ordering::Release);
            format!("engine thread: {e}")
        })
}

/// One queue as the engine runs it.
#[derive(Debug)]
struct QRun {
    setup: QueueSetup,
    /// Where the model's view comes from (None: the domain's).
    view: Option<Arc<dyn QueueView>>,
    /// The model's view for this queue, built from `view` (None: the domain's).
    mem: Option<GuestMemory>,
    /// The model's log for this queue (None: the VF's).
    log_src: Option<QueueLog>,
    /// The log this queue's writes are marked in (its own or the VF's).
    log: Option<DirtyLog>,
    dq: Option<DeviceQueue>,
    broken: bool,
    notify: bool,
}

/// One VF as the engine runs it.
struct VfRun {
    sh: Arc<VfShared>,
    seen_gen: u64,
    bus: Option<ModelBus>,
    bus_gen: u64,
    irq: Option<IrqSender>,
    dma_gen: u64,
    mem: GuestMemory,
    running: bool,
    suspended: bool,
    epoch: u64,
    features: u64,
    hdr_len: usize,
    mrg: bool,
    log_cfg: Option<(u64, u64)>,
    log: Option<DirtyLog>,
    queues: Vec<QRun>,
    wire: Wire,
    rep: Vec<RepQueueEnds>,
    steer: Option<RxSteer>,
    notify: Option<QueueNotify>,
}

impl VfRun {
    #[inline(always)]
    fn active(&self) -> bool {
        self.running && !self.suspended
    }

    fn pairs(&self) -> usize {
        self.queues.len() / 2
    }
}

/// Position pair of a running queue.
fn positions(dq: &DeviceQueue) -> (u16, u16) {
    match dq {
        DeviceQueue::Split(s) => (s.last_avail(), s.used_idx()),
        DeviceQueue::Packed(p) => (p.last_avail(), p.last_used()),
    }
}

/// Where a queue error points, if it is a DMA access outside the mappings.
fn fault_of(e: &QueueError) -> Option<(u64, u64)> {
    match *e {
        QueueError::RingNotInMemory { addr, len, .. } => Some((addr, len)),
        QueueError::BadBuffer { addr, len, .. } => Some((addr, u64::from(len))),
        QueueError::IndirectTableNotInMemory { addr, len } => Some((addr, u64::from(len))),
        QueueError::MemAccess { gpa, len } => Some((gpa, len)),
        _ => None,
    }
}

/// Stops queue `q` of `vf` on error `e` (cold path).
#[cold]
fn fail(sh: &VfShared, bus: Option<&ModelBus>, q: &mut QRun, qi: usize, e: &QueueError) {
    let c = &sh.counters[qi];
    match fault_of(e) {
        Some((iova, len)) => {
            if let Some(b) = bus {
                b.dma.record_fault(iova, len);
            }
            bump(&c.iommu_faults, 1);
            tracing::warn!("VF {} queue {qi}: IOMMU fault: {e}", sh.index);
        }
        None => {
            bump(&c.errors, 1);
            tracing::warn!("VF {} queue {qi}: stopped on a ring error: {e}", sh.index);
        }
    }
    q.broken = true;
    c.broken.store(true, Ordering::Release);
}

#[inline(always)]
fn raise(
    irq: &mut Option<IrqSender>,
    notify: Option<&QueueNotify>,
    qi: usize,
    c: &QueueCounters,
    vector: u16,
) {
    if let Some(n) = notify {
        if n(qi as u16, irq) {
            bump(&c.interrupts, 1);
        }
        return;
    }
    if vector != NO_VECTOR {
        if let Some(s) = irq.as_mut() {
            s.signal(vector);
        }
        bump(&c.interrupts, 1);
    }
}

/// Whether the loop filter lets `frame` through to `mac`.
#[inline(always)]
fn for_mac(frame: &[u8], mac: &[u8; 6]) -> bool {
    frame.len() >= 6 && (frame[0] & 1 == 1 || frame[..6] == mac[..])
}

/// Reusable buffers of one receive burst.
struct RxScratch {
    chains: [(Chain, u32); MAX_MRG_CHAINS],
    /// Destinations of the one-chain fast path (lines requested for writing before the copies).
    staged: Staged,
    staged_chains: [Chain; BURST],
}

/// The frames of one burst, packed back to back (64-byte aligned) in one preallocated arena:
/// small frames share cache lines and pages instead of sitting 64 KiB apart.
struct Frames {
    buf: Box<[u8]>,
    off: [usize; BURST],
    len: [usize; BURST],
    n: usize,
    next: usize,
}

impl Frames {
    fn new() -> Frames {
        Frames {
            buf: vec![0u8; BURST * (MAX_FRAME + 64)].into_boxed_slice(),
            off: [0; BURST],
            len: [0; BURST],
            n: 0,
            next: 0,
        }
    }

    #[inline(always)]
    fn clear(&mut self) {
        self.n = 0;
        self.next = 0;
    }

    /// Reserves room for a frame of up to `len` (at most [`MAX_FRAME`]) bytes; returns its index
    /// (the arena always has room for [`BURST`] of them).
    #[inline(always)]
    fn reserve(&mut self, len: usize) -> usize {
        let i = self.n;
        self.off[i] = self.next;
        self.len[i] = len;
        self.next = (self.next + len + 63) & !63;
        self.n += 1;
        i
    }

    /// Sets frame `i`'s final length (at most what was reserved).
    #[inline(always)]
    fn set_len(&mut self, i: usize, len: usize) {
        self.len[i] = len.min(self.len[i]);
    }

    #[inline(always)]
    fn get(&self, i: usize) -> &[u8] {
        &self.buf[self.off[i]..self.off[i] + self.len[i]]
    }

    #[inline(always)]
    fn get_mut(&mut self, i: usize) -> &mut [u8] {
        &mut self.buf[self.off[i]..self.off[i] + self.len[i]]
    }

    /// Drops the frames `keep` refuses, keeping the order of the rest; returns how many went.
    fn retain(&mut self, mut keep: impl FnMut(&[u8]) -> bool) -> usize {
        let mut w = 0;
        for r in 0..self.n {
            if keep(self.get(r)) {
                self.off[w] = self.off[r];
                self.len[w] = self.len[r];
                w += 1;
            }
        }
        let gone = self.n - w;
        self.n = w;
        gone
    }
}

/// The engine thread's state.
struct Engine {
    sh: Arc<EngineShared>,
    vfs: Vec<VfRun>,
    seen_ctl: u64,
    segs: Segs,
    frames: Frames,
    /// Transmit fast path: each chain's readable bytes in one buffer, lines requested before
    /// the copies.
    tx_staged: Staged,
    tx_chains: [(Chain, usize); BURST],
    rx: Box<RxScratch>,
    /// Blank mbufs for representor frames.
    stash: Burst,
    /// Frames on their way to a representor port.
    out: Burst,
    /// Frames from a representor port.
    inb: Burst,
    /// What the sleeping engine waits on: its wake eventfd and the TAP fds (registered once).
    epoll: Option<Epoll>,
    events: [EpollEvent; 8],
}

impl Engine {
    fn new(sh: Arc<EngineShared>, wires: Vec<Wire>) -> Engine {
        let mut vfs = Vec::new();
        for (v, wire) in sh.vfs.iter().zip(wires) {
            let nq = usize::from(v.queues());
            vfs.push(VfRun {
                sh: Arc::clone(v),
                seen_gen: 0,
                bus: None,
                bus_gen: 0,
                irq: None,
                dma_gen: u64::MAX,
                mem: GuestMemory::empty(),
                running: false,
                suspended: false,
                epoch: 0,
                features: 0,
                hdr_len: 12,
                mrg: false,
                log_cfg: None,
                log: None,
                queues: (0..nq)
                    .map(|_| QRun {
                        setup: QueueSetup::default(),
                        view: None,
                        mem: None,
                        log_src: None,
                        log: None,
                        dq: None,
                        broken: false,
                        notify: false,
                    })
                    .collect(),
                wire,
                rep: Vec::new(),
                steer: None,
                notify: None,
            });
        }
        let epoll = Epoll::new(EpollCreateFlags::EPOLL_CLOEXEC)
            .ok()
            .filter(|ep| {
                let ev = EpollEvent::new(EpollFlags::EPOLLIN, 0);
                ep.add(sh.wake.as_fd(), ev).is_ok()
                    && vfs.iter().all(|v| match &v.wire {
                        Wire::Tap(t) => ep.add(t.as_fd(), ev).is_ok(),
                        _ => true,
                    })
            });
        if epoll.is_none() {
            tracing::warn!(
                "{}: no epoll: the idle engine wakes every tick only",
                sh.name
            );
        }
        Engine {
            epoll,
            events: [EpollEvent::empty(); 8],
            sh,
            vfs,
            seen_ctl: u64::MAX,
            segs: Segs::new(),
            frames: Frames::new(),
            tx_staged: Staged::new(BURST),
            tx_chains: [(Chain::default(), 0); BURST],
            rx: Box::new(RxScratch {
                chains: [(Chain::default(), 0); MAX_MRG_CHAINS],
                staged: Staged::new(BURST),
                staged_chains: [Chain::default(); BURST],
            }),
            stash: Burst::new(STASH),
            out: Burst::new(BURST),
            inb: Burst::new(BURST),
        }
    }

    fn run(mut self) {
        let mut last_work = Instant::now();
        loop {
            if self.sh.stop.load(Ordering::Acquire) {
                break;
            }
            let g = self.sh.ctl_any.load(Ordering::Acquire);
            if g != self.seen_ctl {
                self.seen_ctl = g;
                for vi in 0..self.vfs.len() {
                    if self.apply(vi) {
                        // A representor came or went: its blanks may belong to another pool.
                        while self.stash.pop().is_some() {}
                    }
                }
            }
            let work = self.poll_once();
            if work > 0 || self.sh.poll == PollMode::Busy {
                if work > 0 {
                    last_work = Instant::now();
                }
                continue;
            }
            if last_work.elapsed() < SPIN {
                std::hint::spin_loop();
                continue;
            }
            self.sleep();
            last_work = Instant::now();
        }
        // Stopping: write the positions back so a last read sees them.
        for vi in 0..self.vfs.len() {
            let vf = &mut self.vfs[vi];
            let mut ctl = vf.sh.ctl();
            for (qi, q) in vf.queues.iter_mut().enumerate() {
                if let Some(dq) = q.dq.take() {
                    let (a, u) = positions(&dq);
                    ctl.queues[qi].avail = Some(a);
                    ctl.queues[qi].used = Some(u);
                }
            }
        }
    }

    /// Sleeps until a doorbell, a control change, a TAP frame or the tick.
    fn sleep(&mut self) {
        let any_running = self.vfs.iter().any(|v| v.active());
        for vf in &mut self.vfs {
            if !vf.active() {
                continue;
            }
            for q in &mut vf.queues {
                if let (Some(dq), false) = (q.dq.as_mut(), q.broken)
                    && !q.notify
                {
                    dq.set_notification(true);
                    q.notify = true;
                }
            }
        }
        self.sh.sleeping.store(true, Ordering::SeqCst);
        let pending = self.sh.ctl_any.load(Ordering::SeqCst) != self.seen_ctl
            || self.sh.stop.load(Ordering::SeqCst)
            || self.work_pending();
        if !pending {
            let timeout = if any_running { TICK_RUNNING } else { TICK_IDLE };
            match &self.epoll {
                Some(ep) => {
                    let t = EpollTimeout::try_from(timeout).unwrap_or(EpollTimeout::MAX);
                    let _ = ep.wait(&mut self.events, t);
                }
                None => std::thread::sleep(timeout),
            }
            let _ = self.sh.wake.read();
        }
        self.sh.sleeping.store(false, Ordering::SeqCst);
        for vf in &mut self.vfs {
            for q in &mut vf.queues {
                if let Some(dq) = q.dq.as_mut()
                    && q.notify
                {
                    dq.set_notification(false);
                    q.notify = false;
                }
            }
        }
    }

    /// Whether anything waits (checked after enabling notifications, before sleeping).
    fn work_pending(&mut self) -> bool {
        for vf in &mut self.vfs {
            for (q, qr) in vf.queues.iter_mut().enumerate() {
                if let (Some(dq), false) = (qr.dq.as_mut(), qr.broken)
                    && vf.running
                    && !vf.suspended
                    && q % 2 == 1
                    && dq.avail_up_to(1) > 0
                {
                    return true;
                }
            }
            for q in 0..vf.sh.bell_pages() {
                let mut b = [0u8; 4];
                if vf.sh.bells.read(u64::from(q) * BELL_PAGE, &mut b).is_ok()
                    && u32::from_le_bytes(b) != BELL_IDLE
                {
                    return true;
                }
            }
            if vf.rep.iter().any(|r| !r.from_port.is_empty()) {
                return true;
            }
        }
        false
    }

    /// Applies VF `vi`'s control state if it changed; returns whether its representor
    /// channels changed.
    fn apply(&mut self, vi: usize) -> bool {
        let vf = &mut self.vfs[vi];
        let sh = Arc::clone(&vf.sh);
        let g = sh.ctl_gen.load(Ordering::Acquire);
        if g == vf.seen_gen {
            return false;
        }
        vf.seen_gen = g;
        let bg = sh.bus_gen.load(Ordering::Acquire);
        if vf.bus.is_none() || bg != vf.bus_gen {
            // First attach, or the function was opened again (another domain, other vectors).
            let bus = sh.bus.lock().unwrap_or_else(|p| p.into_inner()).clone();
            if let Some(b) = bus {
                vf.irq = Some(b.irq.sender());
                vf.bus = Some(b);
                vf.bus_gen = bg;
                vf.dma_gen = u64::MAX;
            }
        }
        let mut ctl = sh.ctl();
        if ctl.epoch != vf.epoch {
            vf.epoch = ctl.epoch;
            for q in &mut vf.queues {
                q.dq = None;
                q.broken = false;
                q.notify = false;
            }
            for c in sh.counters.iter() {
                c.broken.store(false, Ordering::Release);
            }
        }
        let rep_changed = match ctl.rep.take() {
            Some(ends) => {
                vf.rep = ends;
                true
            }
            None => false,
        };
        vf.steer = ctl.steer.clone();
        vf.notify = ctl.notify.clone();
        vf.features = ctl.features;
        vf.hdr_len = hdr_len(ctl.features);
        vf.mrg = ctl.features & vf::NET_MRG_RXBUF != 0;
        Self::refresh_view(vf);
        let log_changed = ctl.log != vf.log_cfg;
        if log_changed {
            vf.log_cfg = ctl.log;
            vf.log = None;
            if let Some((iova, size)) = ctl.log {
                match DirtyLog::from_memory(&vf.mem, iova, size) {
                    Some(l) => vf.log = Some(l),
                    None => {
                        if let Some(b) = &vf.bus {
                            b.dma.record_fault(iova, size);
                        }
                        tracing::warn!(
                            "VF {}: dirty log at IOVA {iova:#x} ({size} bytes) is not mapped: IOMMU fault, not logging",
                            sh.index
                        );
                    }
                }
            }
        }
        for qi in 0..vf.queues.len() {
            let s = ctl.queues[qi];
            let want = ctl.running && s.enabled && s.size > 0;
            let q = &mut vf.queues[qi];
            let c = &sh.counters[qi];
            let new_view = ctl.queue_mem.get(qi).cloned().flatten();
            let view_changed = match (&q.view, &new_view) {
                (Some(a), Some(b)) => !Arc::ptr_eq(a, b),
                (None, None) => false,
                _ => true,
            };
            if let Some(dq) = &q.dq
                && (!want || !q.setup.same_ring(&s) || view_changed)
            {
                let (a, u) = positions(dq);
                ctl.queues[qi].avail = Some(a);
                ctl.queues[qi].used = Some(u);
                c.avail.store(u32::from(a), Ordering::Release);
                c.used.store(u32::from(u), Ordering::Release);
                q.dq = None;
                q.notify = false;
            }
            if !want {
                q.broken = false;
                c.broken.store(false, Ordering::Release);
            }
            if view_changed {
                q.view = new_view;
                q.mem = q.view.as_ref().map(|v| v.view(&vf.mem));
            }
            let new_log = ctl.queue_log.get(qi).cloned().flatten();
            let qlog_changed = match (&q.log_src, &new_log) {
                (Some(a), Some(b)) => !a.same(b),
                (None, None) => false,
                _ => true,
            };
            if qlog_changed || log_changed {
                q.log_src = new_log;
                q.log = queue_log(
                    q.log_src.as_ref(),
                    &vf.mem,
                    vf.log.as_ref(),
                    vf.bus.as_ref(),
                    sh.index,
                    qi,
                );
            }
            let s = ctl.queues[qi];
            if want && q.dq.is_none() && !q.broken {
                let mem = q.mem.as_ref().unwrap_or(&vf.mem);
                match Self::build(vf.features, mem, &s, q.log.as_ref()) {
                    Ok(dq) => {
                        let (a, u) = positions(&dq);
                        c.avail.store(u32::from(a), Ordering::Release);
                        c.used.store(u32::from(u), Ordering::Release);
                        q.dq = Some(dq);
                        q.notify = false;
                    }
                    Err(e) => fail(&sh, vf.bus.as_ref(), q, qi, &e),
                }
            } else if want && let Some(dq) = &mut q.dq {
                if qlog_changed || log_changed {
                    dq.set_log(q.log.clone().map(|l| (l, s.device)));
                }
                // Positions the driver set while the queue was stopped (suspended).
                let (a, _) = positions(dq);
                let moved = match s.avail {
                    Some(na) if s.avail != q.setup.avail && na != a => dq.set_last_avail(na).err(),
                    _ => None,
                };
                if let Some(e) = moved {
                    fail(&sh, vf.bus.as_ref(), q, qi, &e);
                }
            }
            q.setup = s;
        }
        vf.running = ctl.running;
        vf.suspended = ctl.suspended;
        if vf.suspended {
            for (qi, q) in vf.queues.iter().enumerate() {
                if let Some(dq) = &q.dq {
                    let (a, u) = positions(dq);
                    ctl.queues[qi].avail = Some(a);
                    ctl.queues[qi].used = Some(u);
                    q_store(&sh.counters[qi], a, u);
                }
            }
            // Setup values now equal what was written back: a later change is the driver's.
            for (qi, q) in vf.queues.iter_mut().enumerate() {
                q.setup.avail = ctl.queues[qi].avail;
                q.setup.used = ctl.queues[qi].used;
            }
        }
        drop(ctl);
        sh.ack_gen.store(g, Ordering::Release);
        rep_changed
    }

    fn build(
        features: u64,
        mem: &GuestMemory,
        s: &QueueSetup,
        log: Option<&DirtyLog>,
    ) -> Result<DeviceQueue, QueueError> {
        let cfg = QueueConfig {
            size: s.size,
            desc: s.desc,
            avail: s.driver,
            used: s.device,
            addr_kind: AddrKind::Gpa,
            features,
        };
        let mut dq = DeviceQueue::new(&cfg, mem)?;
        let start = s.avail.unwrap_or(if dq.is_packed() { 0x8000 } else { 0 });
        dq.set_last_avail(start)?;
        if let Some(l) = log {
            dq.set_log(Some((l.clone(), s.device)));
        }
        dq.set_notification(false);
        Ok(dq)
    }

    /// Re-reads the domain view if the mappings changed; rebuilds running queues there.
    #[inline]
    fn refresh_view(vf: &mut VfRun) -> bool {
        let Some(bus) = &vf.bus else { return false };
        if bus.dma.generation() == vf.dma_gen {
            return false;
        }
        let (g, mem) = bus.dma.view();
        vf.dma_gen = g;
        vf.mem = mem;
        if let Some((iova, size)) = vf.log_cfg {
            vf.log = DirtyLog::from_memory(&vf.mem, iova, size);
            if vf.log.is_none() {
                bus.dma.record_fault(iova, size);
            }
        }
        for (qi, q) in vf.queues.iter_mut().enumerate() {
            // Views and logs follow the new mappings.
            q.mem = q.view.as_ref().map(|v| v.view(&vf.mem));
            q.log = queue_log(
                q.log_src.as_ref(),
                &vf.mem,
                vf.log.as_ref(),
                vf.bus.as_ref(),
                vf.sh.index,
                qi,
            );
            let Some(old) = q.dq.take() else { continue };
            let (a, _) = positions(&old);
            let s = QueueSetup {
                avail: Some(a),
                ..q.setup
            };
            drop(old);
            let mem = q.mem.as_ref().unwrap_or(&vf.mem);
            match Self::build(vf.features, mem, &s, q.log.as_ref()) {
                Ok(dq) => {
                    q.dq = Some(dq);
                    q.notify = false;
                }
                Err(e) => fail(&vf.sh, vf.bus.as_ref(), q, qi, &e),
            }
        }
        true
    }

    /// One pass over every VF. Returns the work done (chains, frames, kicks).
    fn poll_once(&mut self) -> usize {
        let mut work = 0;
        for vi in 0..self.vfs.len() {
            {
                let vf = &mut self.vfs[vi];
                if vf.active() {
                    if vf.bus.as_ref().map(|b| b.dma.generation()) != Some(vf.dma_gen) {
                        Self::refresh_view(vf);
                    }
                    work += Self::check_bells(vf);
                }
            }
            let active = self.vfs[vi].active();
            if active {
                for p in 0..self.vfs[vi].pairs() {
                    let n = self.tx(vi, p);
                    if n > 0 {
                        work += n;
                        self.deliver(vi, p, n);
                    }
                }
            }
            work += self.wire_rx(vi);
        }
        work
    }

    /// Counts and clears rung doorbells (a shared page: the queue its value names).
    #[inline]
    fn check_bells(vf: &mut VfRun) -> usize {
        let mut n = 0;
        let shared = vf.sh.shared_bell;
        for p in 0..vf.sh.bell_pages() {
            let at = u64::from(p) * BELL_PAGE;
            let mut b = [0u8; 4];
            if vf.sh.bells.read(at, &mut b).is_ok() {
                let v = u32::from_le_bytes(b);
                if v == BELL_IDLE {
                    continue;
                }
                let _ = vf.sh.bells.write(at, &BELL_IDLE.to_le_bytes());
                let q = if shared {
                    (v & 0xffff) as usize
                } else {
                    usize::from(p)
                };
                if let Some(c) = vf.sh.counters.get(q) {
                    bump(&c.kicks, 1);
                }
                n += 1;
            }
        }
        n
    }

    /// Takes up to [`BURST`] frames from VF `vi`'s transmit queue of pair `p` into the frame
    /// arena; returns how many. Chains whose frame lies in one buffer are popped first and
    /// copied after (their lines requested at pop time, so the cache misses on the other core's
    /// lines overlap); others are copied as they are popped.
    fn tx(&mut self, vi: usize, p: usize) -> usize {
        let Engine {
            vfs,
            frames,
            segs,
            tx_staged,
            tx_chains,
            ..
        } = self;
        let vf = &mut vfs[vi];
        let qi = 2 * p + 1;
        let sh = &vf.sh;
        let c = &sh.counters[qi];
        let q = &mut vf.queues[qi];
        if q.broken {
            return 0;
        }
        let mem = q.mem.as_ref().unwrap_or(&vf.mem);
        let Some(dq) = q.dq.as_mut() else { return 0 };
        let hl = vf.hdr_len;
        frames.clear();
        tx_staged.clear(mem);
        let (mut staged, mut errors, mut chains) = (0usize, 0u64, 0);
        let mut err = None;
        while frames.n < BURST && chains < 2 * BURST {
            match dq.pop(mem, segs) {
                Ok(Some(ch)) => {
                    chains += 1;
                    let total = ch.readable as usize;
                    let flen = total.wrapping_sub(hl);
                    if total <= hl || flen > MAX_FRAME {
                        // A runt (header only) or a frame larger than any wire carries.
                        dq.push_used(&ch, 0);
                        errors += 1;
                        continue;
                    }
                    let i = frames.reserve(flen);
                    if tx_staged.push_first_readable(segs, total) {
                        tx_chains[staged] = (ch, i);
                        staged += 1;
                    } else {
                        let got = segs.read(hl, frames.get_mut(i));
                        frames.set_len(i, got);
                        dq.push_used(&ch, 0);
                    }
                }
                Ok(None) => break,
                Err(e) => {
                    err = Some(e);
                    break;
                }
            }
        }
        for (k, &(ch, i)) in tx_chains.iter().enumerate().take(staged) {
            let got = tx_staged.read(k, hl, frames.get_mut(i));
            frames.set_len(i, got);
            dq.push_used(&ch, 0);
        }
        let taken = frames.n;
        let dropped = match vf.wire {
            Wire::Loop(Some(mac)) => frames.retain(|f| for_mac(f, &mac)),
            _ => 0,
        };
        let bytes: u64 = (0..frames.n).map(|i| frames.len[i] as u64).sum();
        let notify = dq.publish_used();
        let (a, u) = positions(dq);
        q_store(c, a, u);
        let vector = q.setup.vector;
        if let Some(e) = err {
            fail(sh, vf.bus.as_ref(), q, qi, &e);
        }
        if notify {
            raise(&mut vf.irq, vf.notify.as_ref(), qi, c, vector);
        }
        bump(&c.packets, taken as u64);
        bump(&c.bytes, bytes);
        bump(&c.errors, errors);
        bump(&c.dropped, dropped as u64);
        frames.n
    }

    /// Hands the `n` frames just taken from VF `vi`'s pair `p` to its wire.
    fn deliver(&mut self, vi: usize, p: usize, n: usize) {
        let target = match &self.vfs[vi].wire {
            Wire::Loop(_) => Some((vi, p)),
            Wire::Cable(peer) => {
                let peer = *peer;
                let pp = self.vfs[peer].pairs();
                Some((peer, p % pp))
            }
            _ => None,
        };
        if let Some((vj, pj)) = target {
            let Engine {
                vfs,
                frames,
                segs,
                rx,
                ..
            } = self;
            let frames = &*frames;
            rx_deliver(&mut vfs[vj], pj, segs, rx, n, |i| frames.get(i));
            return;
        }
        let Engine {
            vfs,
            frames,
            stash,
            out,
            ..
        } = self;
        let vf = &mut vfs[vi];
        let c = &vf.sh.counters[2 * p + 1];
        let mut dropped = 0u64;
        match &mut vf.wire {
            Wire::Tap(t) => {
                for i in 0..n {
                    if !t.send(frames.get(i)) {
                        dropped += 1;
                    }
                }
            }
            Wire::Rep => match vf.rep.get_mut(p) {
                Some(ends) => {
                    for i in 0..n {
                        let frame = frames.get(i);
                        if stash.is_empty() {
                            ends.blanks.recv_burst(stash);
                        }
                        let Some(mut m) = stash.pop() else {
                            dropped += 1;
                            continue;
                        };
                        m.set_data_len(0);
                        match m.append(frame.len()) {
                            Some(d) => {
                                d.copy_from_slice(frame);
                                if let Err(m) = out.push(m) {
                                    let _ = stash.push(m);
                                    dropped += 1;
                                }
                            }
                            None => {
                                let _ = stash.push(m);
                                dropped += 1;
                            }
                        }
                    }
                    ends.to_port.send_burst(out);
                    while let Some(m) = out.pop() {
                        dropped += 1;
                        let _ = stash.push(m);
                    }
                }
                None => dropped += n as u64,
            },
            _ => dropped += n as u64,
        }
        bump(&c.dropped, dropped);
    }

    /// Frames arriving from VF `vi`'s wire (TAP, representor). Returns how many.
    fn wire_rx(&mut self, vi: usize) -> usize {
        let Engine {
            vfs,
            frames,
            segs,
            rx,
            stash,
            inb,
            ..
        } = self;
        let vf = &mut vfs[vi];
        frames.clear();
        match &vf.wire {
            Wire::Tap(t) => {
                while frames.n < BURST {
                    let i = frames.reserve(MAX_FRAME);
                    match t.recv(frames.get_mut(i)) {
                        Some(len) => frames.set_len(i, len),
                        None => {
                            frames.n -= 1;
                            break;
                        }
                    }
                }
            }
            Wire::Rep => {
                let mut total = 0;
                for p in 0..vf.rep.len() {
                    let got = vf.rep[p].from_port.recv_burst(inb);
                    if got == 0 {
                        continue;
                    }
                    total += got;
                    let pkts = &*inb;
                    rx_deliver(vf, p, segs, rx, got, |i| pkts.as_slice()[i].data());
                    // Delivered (or dropped): the mbufs become blanks.
                    while let Some(m) = inb.pop() {
                        let _ = stash.push(m);
                    }
                }
                return total;
            }
            _ => return 0,
        }
        let n = frames.n;
        if n > 0 {
            let frames = &*frames;
            rx_deliver(vf, 0, segs, rx, n, |i| frames.get(i));
        }
        n
    }
}

/// The log queue `qi` marks: its own (`src`, through its view over `domain`), or the VF's. A
/// bitmap its view does not reach is an IOMMU fault (recorded; the queue does not log).
fn queue_log(
    src: Option<&QueueLog>,
    domain: &GuestMemory,
    vf_log: Option<&DirtyLog>,
    bus: Option<&ModelBus>,
    vfi: u16,
    qi: usize,
) -> Option<DirtyLog> {
    let Some(src) = src else {
        return vf_log.cloned();
    };
    let mem = src.view.view(domain);
    let log = DirtyLog::from_memory(&mem, src.addr, src.size);
    if log.is_none() {
        if let Some(b) = bus {
            b.dma.record_fault(src.addr, src.size);
        }
        tracing::warn!(
            "VF {vfi} queue {qi}: dirty log at {:#x} ({} bytes) does not translate: IOMMU fault, not logging",
            src.addr,
            src.size
        );
    }
    log
}

#[inline(always)]
fn q_store(c: &QueueCounters, a: u16, u: u16) {
    c.avail.store(u32::from(a), Ordering::Release);
    c.used.store(u32::from(u), Ordering::Release);
}

/// Writes `n` (at most [`BURST`]) frames arriving from the wire into `vf`: all into pair `pair`,
/// or, when the model installed a steering function, each into the pair it picks.
fn rx_deliver<'a>(
    vf: &mut VfRun,
    pair: usize,
    segs: &mut Segs,
    rx: &mut RxScratch,
    n: usize,
    frame: impl Fn(usize) -> &'a [u8],
) {
    let mut to = [0u16; BURST];
    {
        let Some(steer) = vf.steer.as_ref() else {
            return rx_write(vf, pair, segs, rx, n, frame);
        };
        for (i, t) in to.iter_mut().enumerate().take(n) {
            *t = steer(frame(i));
        }
    }
    let pairs = vf.pairs();
    let lost = to[..n].iter().filter(|&&p| usize::from(p) >= pairs).count();
    bump(&vf.sh.counters[0].dropped, lost as u64);
    let mut idx = [0usize; BURST];
    for p in 0..pairs {
        let mut k = 0;
        for (i, &t) in to.iter().enumerate().take(n) {
            if usize::from(t) == p {
                idx[k] = i;
                k += 1;
            }
        }
        if k > 0 {
            rx_write(vf, p, segs, rx, k, |j| frame(idx[j]));
        }
    }
}

/// Writes `n` frames (`frame(i)`) into VF `vf`'s receive queue of pair `p`. Frames that find
/// no buffer (or a stopped queue) are counted as dropped there.
fn rx_write<'a>(
    vf: &mut VfRun,
    p: usize,
    segs: &mut Segs,
    rx: &mut RxScratch,
    n: usize,
    frame: impl Fn(usize) -> &'a [u8],
) {
    let qi = 2 * p;
    let sh = &vf.sh;
    let c = &sh.counters[qi];
    let q = &mut vf.queues[qi];
    let active = vf.running && !vf.suspended;
    let mem = q.mem.as_ref().unwrap_or(&vf.mem);
    let dq = match q.dq.as_mut() {
        Some(dq) if active && !q.broken => dq,
        _ => {
            bump(&c.dropped, n as u64);
            return;
        }
    };
    let hl = vf.hdr_len;
    let mut hdr = [0u8; 12];
    if hl == 12 {
        hdr[10] = 1; // num_buffers
    }
    let (mut packets, mut bytes, mut dropped) = (0u64, 0u64, 0u64);
    let mut err = None;
    // Fast path: frames whose header and data fit the first writable buffer of one chain. The
    // chains are popped first with their destination lines requested for writing, then the
    // copies run; it stops at the first frame that needs the general path below.
    rx.staged.clear(mem);
    let mut first = 0;
    while first < n {
        match dq.pop(mem, segs) {
            Ok(Some(ch)) => {
                if rx.staged.push_first_writable(segs, hl + frame(first).len()) {
                    rx.staged_chains[first] = ch;
                    first += 1;
                } else {
                    dq.rewind(&ch);
                    break;
                }
            }
            // No buffer (the general path counts the drops) or an error (it finds it again).
            Ok(None) | Err(_) => break,
        }
    }
    for (i, ch) in rx.staged_chains.iter().enumerate().take(first) {
        let data = frame(i);
        let w = rx.staged.write2(i, &hdr[..hl], data);
        if let Some(l) = &q.log {
            l.mark(rx.staged.gpa(i), w as u64);
        }
        dq.push_used(ch, w as u32);
        packets += 1;
        bytes += data.len() as u64;
    }
    'frames: for i in first..n {
        let data = frame(i);
        let total = hl + data.len();
        let mut used = 0usize;
        let mut done = 0usize;
        let mut first_hdr = None;
        while done < total {
            let ch = match dq.pop(mem, segs) {
                Ok(Some(ch)) => ch,
                Ok(None) => {
                    // Out of buffers: give back what this frame took; the rest are dropped.
                    for k in (0..used).rev() {
                        dq.rewind(&rx.chains[k].0);
                    }
                    dropped += (n - i) as u64;
                    break 'frames;
                }
                Err(e) => {
                    for k in (0..used).rev() {
                        dq.rewind(&rx.chains[k].0);
                    }
                    dropped += (n - i) as u64;
                    err = Some(e);
                    break 'frames;
                }
            };
            let room = ch.writable as usize;
            if used == 0 && (room < hl || (!vf.mrg && room < total)) || used == MAX_MRG_CHAINS {
                // A buffer that cannot hold this frame: keep it for the next one.
                dq.rewind(&ch);
                for k in (0..used).rev() {
                    dq.rewind(&rx.chains[k].0);
                }
                dropped += 1;
                continue 'frames;
            }
            if used == 0 {
                first_hdr = segs
                    .writable()
                    .first()
                    .filter(|s| s.len() as usize >= hl)
                    .map(|s| s.gpa());
            }
            let take = (total - done).min(room);
            let mut w = 0;
            if done < hl {
                let hend = hl.min(done + take);
                w += segs.write(0, &hdr[done..hend]);
            }
            if w < take {
                let ds = done + w - hl;
                let de = done + take - hl;
                w += segs.write(w, &data[ds..de]);
            }
            if let Some(l) = &q.log {
                segs.log_written(l, w as u32);
            }
            rx.chains[used] = (ch, w as u32);
            used += 1;
            done += w;
        }
        if vf.mrg && used > 1 {
            let ok = first_hdr
                .is_some_and(|gpa| mem.write(gpa + 10, &(used as u16).to_le_bytes()).is_ok());
            if !ok {
                for k in (0..used).rev() {
                    dq.rewind(&rx.chains[k].0);
                }
                dropped += 1;
                continue;
            }
        }
        for k in 0..used {
            let (ch, len) = rx.chains[k];
            dq.push_used(&ch, len);
        }
        packets += 1;
        bytes += data.len() as u64;
    }
    let notify = dq.publish_used();
    let (a, u) = positions(dq);
    q_store(c, a, u);
    let vector = q.setup.vector;
    if let Some(e) = err {
        fail(sh, vf.bus.as_ref(), q, qi, &e);
    }
    if notify {
        raise(&mut vf.irq, vf.notify.as_ref(), qi, c, vector);
    }
    bump(&c.packets, packets);
    bump(&c.bytes, bytes);
    bump(&c.dropped, dropped);
}

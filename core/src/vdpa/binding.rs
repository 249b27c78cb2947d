//! The binding between a vhost-user socket and a vDPA device.
//!
//! The socket's [`Device`](crate::vhost::device::Device) keeps doing the protocol (features,
//! memory table, vring messages). With a binding attached it builds no software rings; after
//! every message (and after its reply went out, so the front end can answer back-end requests)
//! it hands the binding a [`SocketView`] of what the front end has set up, and the binding brings
//! the device to match:
//!
//! - **virtio ready** (rings 0 and 1 complete and enabled, DRIVER_OK when STATUS is negotiated):
//!   DMA-map every guest memory region at IOVA = GPA, [`VdpaDevice::configure`] with every set-up
//!   ring (addresses translated to GPAs, positions, the guest's call eventfds, which the PMD wires
//!   to MSI-X), start the kick relay thread, offer host notifiers.
//! - **a ring enabled or disabled** after that: [`VdpaDevice::set_vring_state`].
//! - **LOG_ALL toggled** (live migration): [`VdpaDevice::set_features`] with the log bitmap
//!   DMA-mapped at [`LOG_IOVA`].
//! - **anything else changed** (memory table, a ring's address or fds, a new queue pair): read
//!   the positions back, close, unmap, and configure again from those positions.
//! - **not ready any more** (GET_VRING_BASE, reset, disconnect): read positions back, close,
//!   unmap; GET_VRING_BASE answers with the position read back.

use std::os::fd::{AsFd, BorrowedFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;

use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use nix::sys::eventfd::{EfdFlags, EventFd};

use super::relay::{self, MEDIATED_IOVA, RelayRing, UsedRelay};
use super::{DevConf, LogConfig, LogSupport, VdpaDevice, VdpaError, VqConfig, VqState};
use crate::mem::{MemMode, Segment};
use crate::pci::{Doorbell, NotifyArea};
use crate::virtio::features as vf;
use crate::virtio::{DirtyLog, GuestMemory, GuestRegion};

/// IOVA at which the dirty-log bitmap is mapped for devices that log by DMA (far above any guest
/// physical address, as DPDK's ifc driver does).
pub const LOG_IOVA: u64 = 0x1000_0000_0000;

/// A device shared between the binding (control thread) and whoever reads its stats.
pub type SharedDevice = Arc<Mutex<Box<dyn VdpaDevice>>>;

/// Locks a shared device (a poisoned lock is still usable: every op leaves the device in a
/// state the next op can handle).
pub fn lock(dev: &SharedDevice) -> MutexGuard<'_, Box<dyn VdpaDevice>> {
    dev.lock().unwrap_or_else(|p| p.into_inner())
}

/// One vring as the front end has set it up.
#[derive(Debug)]
pub struct RingView<'a> {
    /// Ring size (0: not set).
    pub num: u16,
    /// Descriptor, driver and device areas as front-end virtual addresses, if set.
    pub addr: Option<(u64, u64, u64)>,
    /// Position from SET_VRING_BASE (or read back at the last stop).
    pub base: Option<u16>,
    /// Kick eventfd (None: not set or NOFD).
    pub kick: Option<BorrowedFd<'a>>,
    /// Identity of the socket's kick fd (its number), to notice a replaced fd.
    pub kick_id: Option<RawFd>,
    /// Whether SET_VRING_KICK arrived.
    pub kick_set: bool,
    /// Call eventfd.
    pub call: Option<Arc<OwnedFd>>,
    /// Enabled by SET_VRING_ENABLE (or by the kick without PROTOCOL_FEATURES).
    pub enabled: bool,
}

/// What the front end has set up, as the binding needs it.
#[derive(Debug)]
pub struct SocketView<'a> {
    /// Whether SET_FEATURES arrived.
    pub features_set: bool,
    /// Negotiated virtio features.
    pub features: u64,
    /// DRIVER_OK seen (or STATUS not negotiated).
    pub driver_ok: bool,
    /// Guest memory.
    pub mem: &'a GuestMemory,
    /// Every vring.
    pub rings: Vec<RingView<'a>>,
    /// The dirty log, when the front end sent one.
    pub log: Option<&'a DirtyLog>,
    /// NET_SET_MTU value.
    pub mtu: Option<u16>,
}

/// Per-queue counters of the binding itself (the device keeps its own).
#[derive(Debug)]
pub struct BindingStats {
    /// Kicks relayed from the kick eventfd to the doorbell, per vring.
    pub relayed_kicks: Vec<AtomicU64>,
    /// Times the device was configured.
    pub configures: AtomicU64,
    /// Host notifiers sent to the front end (last configure; not acknowledged: a front end may
    /// refuse one, e.g. QEMU without `page-per-vq=on`, and the ring then keeps relayed kicks).
    pub host_notifiers: AtomicU64,
}

/// A plan: what the device runs now.
#[derive(Debug, Clone)]
struct Plan {
    features: u64,
    /// Software relay of used rings (LOG_ALL on a device that cannot log).
    mediate: bool,
    mem: GuestMemory,
    queues: Vec<VqConfig>,
    kicks: Vec<Option<RawFd>>,
}

impl Plan {
    /// Same everything except the enabled flags and LOG_ALL.
    fn same_shape(&self, o: &Plan) -> bool {
        let strip = |f: u64| f & !vf::VHOST_F_LOG_ALL;
        strip(self.features) == strip(o.features)
            && self.mediate == o.mediate
            && self.mem.ptr_eq(&o.mem)
            && self.kicks == o.kicks
            && self.queues.len() == o.queues.len()
            && self.queues.iter().zip(&o.queues).all(|(a, b)| {
                a.index == b.index
                    && a.size == b.size
                    && a.desc == b.desc
                    && a.driver == b.driver
                    && a.device == b.device
                    && match (&a.call, &b.call) {
                        (Some(x), Some(y)) => Arc::ptr_eq(x, y),
                        (None, None) => true,
                        _ => false,
                    }
            })
    }
}

/// The running side of a configured device.
#[derive(Debug)]
struct Running {
    plan: Plan,
    mapped: Vec<(u64, u64)>,
    /// Bytes of the log mapped at [`LOG_IOVA`] (the device's own mappings, such as a driver's
    /// memory at IOVA = VA, may lie above it: only this range is the log).
    log_mapped: Option<u64>,
    relay: Option<Relay>,
    notifiers: Vec<u16>,
    used_relay: Option<UsedRelay>,
    mediated_mapped: Option<(u64, u64)>,
}

/// The binding of one socket to one device.
#[derive(Debug)]
pub struct Binding {
    dev: SharedDevice,
    name: String,
    running: Option<Running>,
    stats: Arc<BindingStats>,
    /// Positions read back at the last stop, per vring.
    saved: Vec<Option<VqState>>,
    /// Mediated used rings being set up (between `mediate` and `start_used_relay`).
    mediated_mem: Option<GuestMemory>,
}

/// Host-notifier hook: `(vring, area)` sends VRING_HOST_NOTIFIER_MSG (`None` withdraws);
/// returns whether the front end took it.
pub type NotifierFn<'a> = dyn FnMut(u16, Option<&NotifyArea>) -> bool + 'a;

impl Binding {
    /// A binding for `vrings` rings (2 per queue pair) to `dev`.
    pub fn new(dev: SharedDevice, vrings: usize) -> Binding {
        let name = lock(&dev).name().to_string();
        Binding {
            dev,
            name,
            running: None,
            stats: Arc::new(BindingStats {
                relayed_kicks: (0..vrings).map(|_| AtomicU64::new(0)).collect(),
                configures: AtomicU64::new(0),
                host_notifiers: AtomicU64::new(0),
            }),
            saved: vec![None; vrings],
            mediated_mem: None,
        }
    }

    /// The device.
    pub fn device(&self) -> &SharedDevice {
        &self.dev
    }

    /// The binding's counters.
    pub fn stats(&self) -> &Arc<BindingStats> {
        &self.stats
    }

    /// Whether the device runs.
    pub fn is_running(&self) -> bool {
        self.running.is_some()
    }

    /// Features the socket may offer: `base` (the socket's) AND the device's. VHOST_F_LOG_ALL
    /// is offered for every device: one that cannot log gets the software relay (split rings).
    pub fn features(&self, base: u64) -> u64 {
        let d = lock(&self.dev);
        base & (d.features() | vf::VHOST_USER_F_PROTOCOL_FEATURES | vf::VHOST_F_LOG_ALL)
    }

    /// Protocol features: `base` AND the device's.
    pub fn protocol_features(&self, base: u64) -> u64 {
        base & lock(&self.dev).protocol_features()
    }

    /// Queue pairs: the smaller of the socket's and the device's.
    pub fn queue_pairs(&self, base: u16) -> u16 {
        base.min(lock(&self.dev).max_queue_pairs()).max(1)
    }

    /// The config space the front end reads (GET_CONFIG).
    pub fn config_space(&self) -> Vec<u8> {
        lock(&self.dev).net_config().to_bytes().to_vec()
    }

    /// The position to report for vring `i` after a stop (GET_VRING_BASE).
    pub fn saved_base(&self, i: usize) -> Option<u16> {
        self.saved.get(i).copied().flatten().map(|s| s.avail_idx)
    }

    fn plan(&self, v: &SocketView<'_>) -> Result<Option<Plan>, VdpaError> {
        let complete = |r: &RingView<'_>| r.addr.is_some() && r.kick_set && r.num > 0;
        let ready = |r: &RingView<'_>| complete(r) && r.enabled;
        if !v.features_set
            || !v.driver_ok
            || v.mem.regions().is_empty()
            || v.rings.len() < 2
            || !ready(&v.rings[0])
            || !ready(&v.rings[1])
        {
            return Ok(None);
        }
        let packed = v.features & vf::RING_PACKED != 0;
        let mut queues = Vec::new();
        let mut kicks = Vec::new();
        for (i, r) in v.rings.iter().enumerate() {
            if !complete(r) {
                continue;
            }
            let Some((d, a, u)) = r.addr else { continue };
            let gpa = |uva: u64, what: &str| {
                v.mem.uva_to_gpa(uva).ok_or_else(|| VdpaError::Config {
                    dev: self.name.clone(),
                    what: format!(
                        "vring {i}'s {what} address {uva:#x} is not in guest memory (front-end virtual addresses)"
                    ),
                })
            };
            let base = r.base.unwrap_or(if packed { 0x8000 } else { 0 });
            queues.push(VqConfig {
                index: i as u16,
                size: r.num,
                desc: gpa(d, "descriptor")?,
                driver: gpa(a, "driver area")?,
                device: gpa(u, "device area")?,
                avail_idx: base,
                used_idx: base,
                call: r.call.clone(),
                enabled: r.enabled,
            });
            kicks.push(r.kick_id);
        }
        let mediate = v.features & vf::VHOST_F_LOG_ALL != 0
            && lock(&self.dev).log_support() == LogSupport::None;
        if mediate && packed {
            return Err(VdpaError::Config {
                dev: self.name.clone(),
                what: "live migration with packed rings needs a device that logs dirty pages \
                       (the software relay handles split rings only)"
                    .into(),
            });
        }
        Ok(Some(Plan {
            features: v.features,
            mediate,
            mem: v.mem.clone(),
            queues,
            kicks,
        }))
    }

    /// Brings the device in line with the socket. Errors leave the device stopped.
    pub fn sync(
        &mut self,
        v: &SocketView<'_>,
        notifier: &mut NotifierFn<'_>,
    ) -> Result<(), VdpaError> {
        let plan = match self.plan(v) {
            Ok(p) => p,
            Err(e) => {
                self.stop(notifier);
                return Err(e);
            }
        };
        let Some(mut plan) = plan else {
            self.stop(notifier);
            return Ok(());
        };
        if let Some(run) = &self.running
            && run.plan.same_shape(&plan)
        {
            let (old_f, new_f) = (run.plan.features, plan.features);
            let changes: Vec<(u16, bool)> = plan
                .queues
                .iter()
                .zip(&run.plan.queues)
                .filter(|(n, o)| n.enabled != o.enabled)
                .map(|(n, _)| (n.index, n.enabled))
                .collect();
            for (qid, on) in changes {
                lock(&self.dev).set_vring_state(qid, on)?;
            }
            if (old_f ^ new_f) & vf::VHOST_F_LOG_ALL != 0 {
                let log = if new_f & vf::VHOST_F_LOG_ALL != 0 {
                    self.map_log(v.log)?
                } else {
                    None
                };
                lock(&self.dev).set_features(new_f, log)?;
                if log.is_none() {
                    self.unmap_log();
                }
            }
            if let Some(run) = &mut self.running {
                run.plan = plan;
            }
            return Ok(());
        }
        // A different shape: restart from the positions the device reached.
        if self.running.is_some() {
            self.stop(notifier);
            for q in &mut plan.queues {
                if let Some(s) = self.saved.get(q.index as usize).copied().flatten() {
                    q.avail_idx = s.avail_idx;
                    q.used_idx = s.used_idx;
                }
            }
        }
        self.start(plan, v, notifier)
    }

    fn map_log(&mut self, log: Option<&DirtyLog>) -> Result<Option<LogConfig>, VdpaError> {
        let Some(region) = log.and_then(|l| l.region(LOG_IOVA)) else {
            return Ok(None);
        };
        let size = region.size();
        self.unmap_log();
        let domain = lock(&self.dev).domain().clone();
        domain.map(LOG_IOVA, &region)?;
        if let Some(run) = &mut self.running {
            run.log_mapped = Some(size);
        }
        Ok(Some(LogConfig {
            iova: LOG_IOVA,
            size,
        }))
    }

    fn unmap_log(&mut self) {
        let Some(size) = self.running.as_mut().and_then(|r| r.log_mapped.take()) else {
            return;
        };
        let domain = lock(&self.dev).domain().clone();
        let _ = domain.unmap(LOG_IOVA, size);
    }

    fn start(
        &mut self,
        plan: Plan,
        v: &SocketView<'_>,
        notifier: &mut NotifierFn<'_>,
    ) -> Result<(), VdpaError> {
        let domain = lock(&self.dev).domain().clone();
        let mut mapped = Vec::new();
        for r in plan.mem.regions() {
            if let Err(e) = domain.map(r.gpa(), r) {
                for &(iova, len) in &mapped {
                    let _ = domain.unmap(iova, len);
                }
                return Err(e.into());
            }
            mapped.push((r.gpa(), r.size()));
        }
        self.running = Some(Running {
            plan: plan.clone(),
            mapped,
            log_mapped: None,
            relay: None,
            notifiers: Vec::new(),
            used_relay: None,
            mediated_mapped: None,
        });
        let mut plan = plan;
        let mut relay_rings = Vec::new();
        if plan.mediate {
            match self.mediate(&mut plan, v) {
                Ok(r) => relay_rings = r,
                Err(e) => {
                    self.stop(notifier);
                    return Err(e);
                }
            }
        }
        let log = if plan.features & vf::VHOST_F_LOG_ALL != 0 && !plan.mediate {
            match self.map_log(v.log) {
                Ok(l) => l,
                Err(e) => {
                    self.stop(notifier);
                    return Err(e);
                }
            }
        } else {
            None
        };
        let conf = DevConf {
            features: plan.features,
            queues: plan.queues.clone(),
            log,
            mtu: v.mtu,
        };
        let res = lock(&self.dev).configure(&conf);
        if let Err(e) = res {
            self.stop(notifier);
            return Err(e);
        }
        self.stats.configures.fetch_add(1, Ordering::Relaxed);
        if plan.mediate {
            let started = self.start_used_relay(&plan, v, relay_rings);
            match started {
                Ok(r) => {
                    if let Some(run) = &mut self.running {
                        run.used_relay = Some(r);
                    }
                }
                Err(e) => {
                    self.stop(notifier);
                    return Err(e);
                }
            }
        }
        // Kicks: a relay thread for every ring with a kick fd, and host notifiers where the
        // device has a mappable doorbell (the relay stays as the fallback: a front end that
        // refuses or drops the notifier keeps kicking the eventfd).
        let mut bells = Vec::new();
        for q in &plan.queues {
            let Some(kick) = v.rings.get(q.index as usize).and_then(|r| r.kick) else {
                continue;
            };
            // Our own duplicate: the socket may replace its fd while the relay runs.
            let fd = match kick.try_clone_to_owned() {
                Ok(fd) => fd,
                Err(e) => {
                    self.stop(notifier);
                    return Err(VdpaError::Device {
                        dev: self.name.clone(),
                        what: format!("dup of vring {}'s kick fd: {e}", q.index),
                    });
                }
            };
            let bell = lock(&self.dev).doorbell(q.index);
            match bell {
                Ok((b, val)) => bells.push((q.index, fd, b, val)),
                Err(e) => tracing::warn!("{}: no doorbell for vring {}: {e}", self.name, q.index),
            }
        }
        let relay = match Relay::start(&self.name, bells, Arc::clone(&self.stats)) {
            Ok(r) => Some(r),
            Err(e) => {
                self.stop(notifier);
                return Err(e);
            }
        };
        let mut notifiers = Vec::new();
        for q in &plan.queues {
            let area = lock(&self.dev).notify_area(q.index);
            if let Some(a) = area
                && notifier(q.index, Some(&a))
            {
                notifiers.push(q.index);
            }
        }
        self.stats
            .host_notifiers
            .store(notifiers.len() as u64, Ordering::Relaxed);
        if let Some(run) = &mut self.running {
            run.relay = relay;
            run.notifiers = notifiers;
        }
        tracing::info!(
            "{}: vDPA device configured ({} rings, features {:#x})",
            self.name,
            plan.queues.len(),
            plan.features
        );
        Ok(())
    }

    /// Reads every ring's position back, closes the device and unmaps guest memory. Positions
    /// are kept for [`Binding::saved_base`] and the next configure.
    pub fn stop(&mut self, notifier: &mut NotifierFn<'_>) {
        let Some(mut run) = self.running.take() else {
            return;
        };
        for &q in &run.notifiers {
            notifier(q, None);
        }
        if let Some(r) = run.relay.take() {
            r.stop();
        }
        let mut d = lock(&self.dev);
        for q in &run.plan.queues {
            match d.vring_state(q.index) {
                Ok(s) => {
                    if let Some(slot) = self.saved.get_mut(q.index as usize) {
                        *slot = Some(s);
                    }
                }
                Err(e) => tracing::warn!("{}: vring {} state: {e}", self.name, q.index),
            }
        }
        if let Err(e) = d.close() {
            tracing::warn!("{}: close: {e}", self.name);
        }
        let domain = d.domain().clone();
        drop(d);
        if let Some(r) = run.used_relay.take() {
            // The device has stopped: relay what it published last.
            let next = r.finish();
            tracing::debug!("{}: software relay finished at {next:?}", self.name);
        }
        if let Some((iova, len)) = run.mediated_mapped.take() {
            let _ = domain.unmap(iova, len);
        }
        for &(iova, len) in &run.mapped {
            if let Err(e) = domain.unmap(iova, len) {
                tracing::warn!("{}: unmap {iova:#x}: {e}", self.name);
            }
        }
        if let Some(size) = run.log_mapped {
            let _ = domain.unmap(LOG_IOVA, size);
        }
        tracing::info!("{}: vDPA device closed", self.name);
    }

    /// Sets up mediated used rings for `plan` (software relay): one 4 KiB-aligned used ring per
    /// queue in a segment mapped at [`MEDIATED_IOVA`], each starting from the guest's used
    /// index; the queues' device areas and interrupts are redirected to the relay.
    fn mediate(
        &mut self,
        plan: &mut Plan,
        v: &SocketView<'_>,
    ) -> Result<Vec<RelayRing>, VdpaError> {
        let cfg_err = |what: String| VdpaError::Config {
            dev: self.name.clone(),
            what,
        };
        if v.log.is_none() {
            return Err(cfg_err(
                "VHOST_F_LOG_ALL without a log area (SET_LOG_BASE)".into(),
            ));
        }
        let mut offs = Vec::new();
        let mut len = 0u64;
        for q in &plan.queues {
            offs.push(len);
            len += relay::used_ring_len(q.size).next_multiple_of(4096);
        }
        let seg = Segment::new("vdpa-mediated", len.max(4096) as usize, MemMode::NoHuge)
            .map_err(|e| cfg_err(format!("mediated rings: {e}")))?;
        let region = GuestRegion::from_segment(&seg).rebased(MEDIATED_IOVA, MEDIATED_IOVA);
        let domain = lock(&self.dev).domain().clone();
        domain.map(MEDIATED_IOVA, &region)?;
        if let Some(run) = &mut self.running {
            run.mediated_mapped = Some((MEDIATED_IOVA, region.size()));
        }
        let mediated =
            GuestMemory::new(vec![region]).map_err(|e| cfg_err(format!("mediated rings: {e}")))?;
        let mut rings = Vec::new();
        for (q, off) in plan.queues.iter_mut().zip(offs) {
            let m_used = MEDIATED_IOVA + off;
            let next = relay::init_mediated(&plan.mem, q.device, &mediated, m_used, q.size)
                .map_err(|e| cfg_err(format!("vring {}: {e}", q.index)))?;
            let irq = EventFd::from_flags(EfdFlags::EFD_CLOEXEC | EfdFlags::EFD_NONBLOCK)
                .map_err(|e| cfg_err(format!("relay eventfd: {e}")))?;
            let irq: Arc<OwnedFd> = Arc::new(irq.into());
            rings.push(RelayRing {
                index: q.index,
                size: q.size,
                desc: q.desc,
                guest_used: q.device,
                mediated_used: m_used,
                call: q.call.replace(Arc::clone(&irq)),
                irq,
                next,
            });
            q.device = m_used;
        }
        self.mediated_mem = Some(mediated);
        Ok(rings)
    }

    fn start_used_relay(
        &mut self,
        plan: &Plan,
        v: &SocketView<'_>,
        rings: Vec<RelayRing>,
    ) -> Result<UsedRelay, VdpaError> {
        let (Some(log), Some(mediated)) = (v.log, self.mediated_mem.take()) else {
            return Err(VdpaError::Config {
                dev: self.name.clone(),
                what: "software relay without a log or mediated rings".into(),
            });
        };
        tracing::info!(
            "{}: live migration through the software relay ({} rings)",
            self.name,
            rings.len()
        );
        UsedRelay::start(&self.name, plan.mem.clone(), mediated, log.clone(), rings)
    }

    /// Forgets saved positions (a new front end starts from its own SET_VRING_BASE).
    pub fn forget(&mut self) {
        self.saved.iter_mut().for_each(|s| *s = None);
    }
}

/// The kick relay: one thread polling every ring's kick eventfd and writing the doorbell.
#[derive(Debug)]
struct Relay {
    stop: Arc<EventFd>,
    thread: Option<JoinHandle<()>>,
}

impl Relay {
    fn start(
        name: &str,
        bells: Vec<(u16, OwnedFd, Doorbell, u32)>,
        stats: Arc<BindingStats>,
    ) -> Result<Relay, VdpaError> {
        let io = |what: String| VdpaError::Device {
            dev: name.to_string(),
            what,
        };
        let stop = Arc::new(
            EventFd::from_flags(EfdFlags::EFD_CLOEXEC | EfdFlags::EFD_NONBLOCK)
                .map_err(|e| io(format!("relay eventfd: {e}")))?,
        );
        let stop2 = Arc::clone(&stop);
        let thread = std::thread::Builder::new()
            .name("vdpa-relay".into())
            .spawn(move || relay_loop(bells, &stop2, &stats))
            .map_err(|e| io(format!("relay thread: {e}")))?;
        Ok(Relay {
            stop,
            thread: Some(thread),
        })
    }

    fn stop(mut self) {
        let _ = self.stop.write(1);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        let _ = self.stop.write(1);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn relay_loop(bells: Vec<(u16, OwnedFd, Doorbell, u32)>, stop: &EventFd, stats: &BindingStats) {
    loop {
        let mut fds: Vec<PollFd<'_>> = bells
            .iter()
            .map(|(_, fd, _, _)| PollFd::new(fd.as_fd(), PollFlags::POLLIN))
            .collect();
        fds.push(PollFd::new(stop.as_fd(), PollFlags::POLLIN));
        match poll(&mut fds, PollTimeout::NONE) {
            Ok(_) => {}
            Err(nix::errno::Errno::EINTR) => continue,
            Err(_) => return,
        }
        let ready: Vec<bool> = fds
            .iter()
            .map(|p| p.revents().is_some_and(|r| !r.is_empty()))
            .collect();
        drop(fds);
        if ready[bells.len()] {
            return;
        }
        for (i, (q, fd, bell, val)) in bells.iter().enumerate() {
            if !ready[i] {
                continue;
            }
            let mut b = [0u8; 8];
            // Drain the eventfd (non-blocking reads: a second reader is not expected).
            let _ = nix::unistd::read(fd.as_fd(), &mut b);
            bell.ring(*val);
            if let Some(c) = stats.relayed_kicks.get(*q as usize) {
                c.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}

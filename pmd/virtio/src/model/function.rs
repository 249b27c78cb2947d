//! One model function: configuration space, the modern structures or the legacy block, the
//! control queue, fault injection.

use std::os::fd::OwnedFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use vdpakit_core::model::engine::{BELL_PAGE, EngineShared, QueueSetup, VfShared};
use vdpakit_core::pci::model::{DeviceModel, ModelBus};
use vdpakit_core::pci::{NotifyArea, cfg};
use vdpakit_core::virtio::features as vf;
use vdpakit_core::virtio::{AddrKind, DeviceQueue, QueueConfig, Segs};

use super::regs::{self, NO_VECTOR, cap, cfg_type, ctrl, st};
use super::{BarHook, Faults, ModelCore, ModernShape, Shape, fault_flag};

/// What a [`BarHook`] may touch of its function.
pub struct FnCtx<'a> {
    f: &'a VpFunction,
}

impl FnCtx<'_> {
    /// The engine side of the function (queue setups, counters, log).
    pub fn vf(&self) -> &Arc<VfShared> {
        &self.f.vf
    }

    /// Applies a changed control state in the engine (bounded wait).
    pub fn sync(&self) {
        self.f.sync();
    }

    /// The function's name.
    pub fn name(&self) -> &str {
        &self.f.name
    }

    /// Whether DRIVER_OK is set.
    pub fn running(&self) -> bool {
        self.f.vf.ctl().running
    }
}

#[derive(Debug, Default, Clone, Copy)]
struct CtrlQ {
    size: u16,
    desc: u64,
    driver: u64,
    device: u64,
    enabled: bool,
    vector: u16,
    next: u16,
}

#[derive(Debug, Default)]
struct State {
    status: u8,
    dfsel: u32,
    gfsel: u32,
    driver_features: u64,
    qsel: u16,
    msix_config: u16,
    isr: u8,
    ctrl: CtrlQ,
    active_pairs: u16,
}

/// A virtio-net function of a [`VpModel`](super::VpModel) (implements [`DeviceModel`]).
#[derive(Debug)]
pub struct VpFunction {
    name: String,
    index: u16,
    core: Arc<ModelCore>,
    vf: Arc<VfShared>,
    st: Mutex<State>,
    pci: Mutex<[u8; 256]>,
    config: Mutex<[u8; regs::net::LEN]>,
    generation: AtomicU64,
    hook: Option<Arc<dyn BarHook>>,
    bus: Mutex<Option<ModelBus>>,
    /// Faults to inject.
    pub faults: Faults,
    dropped_doorbells: AtomicU64,
    warned_drop: AtomicBool,
    ctrl_commands: AtomicU64,
}

const MSIX_CAP_LEN: usize = 12;

impl VpFunction {
    pub(super) fn new(core: Arc<ModelCore>, index: u16, hook: Option<Arc<dyn BarHook>>) -> Self {
        let s = &core.spec;
        let vf = Arc::clone(&core.engine.vfs()[usize::from(index)]);
        let mut config = [0u8; regs::net::LEN];
        config[regs::net::MAC..regs::net::MAC + 6].copy_from_slice(&s.mac_of(index));
        config[regs::net::STATUS..regs::net::STATUS + 2].copy_from_slice(&1u16.to_le_bytes());
        config[regs::net::MAX_PAIRS..regs::net::MAX_PAIRS + 2]
            .copy_from_slice(&s.pairs.to_le_bytes());
        config[regs::net::MTU..regs::net::MTU + 2].copy_from_slice(&s.mtu.to_le_bytes());
        let f = VpFunction {
            name: format!("{}-f{index}", s.name),
            index,
            vf,
            st: Mutex::new(State {
                msix_config: NO_VECTOR,
                active_pairs: 1,
                ctrl: CtrlQ {
                    vector: NO_VECTOR,
                    ..CtrlQ::default()
                },
                ..State::default()
            }),
            pci: Mutex::new([0; 256]),
            config: Mutex::new(config),
            generation: AtomicU64::new(0),
            hook,
            bus: Mutex::new(None),
            faults: Faults::default(),
            dropped_doorbells: AtomicU64::new(0),
            warned_drop: AtomicBool::new(false),
            ctrl_commands: AtomicU64::new(0),
            core,
        };
        *f.pci.lock().unwrap_or_else(|p| p.into_inner()) = f.build_config_space();
        f
    }

    fn build_config_space(&self) -> [u8; 256] {
        let s = &self.core.spec;
        let mut p = [0u8; 256];
        let put16 = |p: &mut [u8; 256], off: usize, v: u16| {
            p[off..off + 2].copy_from_slice(&v.to_le_bytes());
        };
        let put32 = |p: &mut [u8; 256], off: usize, v: u32| {
            p[off..off + 4].copy_from_slice(&v.to_le_bytes());
        };
        put16(&mut p, usize::from(cfg::VENDOR_ID), s.id.vendor);
        put16(&mut p, usize::from(cfg::DEVICE_ID), s.id.device);
        put16(&mut p, usize::from(cfg::STATUS), cfg::STATUS_CAP_LIST);
        p[usize::from(cfg::REVISION)] = s.id.revision;
        p[usize::from(cfg::CLASS) + 2] = 0x02;
        put16(&mut p, usize::from(cfg::SUBSYS_VENDOR), s.id.subsys_vendor);
        put16(&mut p, usize::from(cfg::SUBSYS_ID), s.id.subsys_device);
        let mut caps: Vec<(usize, Vec<u8>)> = Vec::new();
        if let Shape::Modern(m) = &s.shape {
            for (ty, place) in [
                (cfg_type::COMMON, m.common),
                (cfg_type::NOTIFY, m.notify),
                (cfg_type::ISR, m.isr),
                (cfg_type::DEVICE, m.device),
            ] {
                if m.omit_cap == Some(ty) {
                    continue;
                }
                let len = if ty == cfg_type::NOTIFY { 20 } else { 16 };
                let mut c = vec![0u8; len];
                c[0] = cap::VENDOR;
                c[2] = len as u8;
                c[3] = ty;
                c[4] = place.bar;
                c[8..12].copy_from_slice(&(place.offset as u32).to_le_bytes());
                c[12..16].copy_from_slice(&(place.len as u32).to_le_bytes());
                if ty == cfg_type::NOTIFY {
                    c[16..20].copy_from_slice(&m.notify_mult.to_le_bytes());
                }
                caps.push((len, c));
            }
        }
        let mut msix = vec![0u8; MSIX_CAP_LEN];
        msix[0] = cap::MSIX;
        let n = self.msix_vectors().max(1);
        msix[2..4].copy_from_slice(&(n - 1).to_le_bytes());
        // Table and PBA in BAR1 (described, not emulated: vectors are wired by the PCI layer).
        msix[4..8].copy_from_slice(&1u32.to_le_bytes());
        msix[8..12].copy_from_slice(&(0x800u32 | 1).to_le_bytes());
        caps.push((MSIX_CAP_LEN, msix));
        let mut at = 0x40usize;
        p[usize::from(cfg::CAP_PTR)] = at as u8;
        let count = caps.len();
        for (i, (len, mut c)) in caps.into_iter().enumerate() {
            let next = if i + 1 == count {
                0
            } else {
                (at + len).next_multiple_of(4)
            };
            c[1] = next as u8;
            p[at..at + len].copy_from_slice(&c);
            at = next;
        }
        put32(&mut p, 0x3c, 0);
        p
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.st.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn sync(&self) {
        if let Err(e) = self.core.engine.sync(&self.vf) {
            tracing::warn!("{}: {e}", self.name);
        }
    }

    fn ctx(&self) -> FnCtx<'_> {
        FnCtx { f: self }
    }

    /// The engine of the device (tests).
    pub fn engine(&self) -> &Arc<EngineShared> {
        &self.core.engine
    }

    /// The engine side of this function.
    pub fn shared(&self) -> &Arc<VfShared> {
        &self.vf
    }

    /// Doorbell writes dropped by the `drop_doorbell` fault.
    pub fn dropped_doorbells(&self) -> u64 {
        self.dropped_doorbells.load(Ordering::Relaxed)
    }

    /// Control-queue commands served.
    pub fn ctrl_commands(&self) -> u64 {
        self.ctrl_commands.load(Ordering::Relaxed)
    }

    /// Queue pairs the driver activated (VQ_PAIRS_SET; 1 until then).
    pub fn active_pairs(&self) -> u16 {
        self.state().active_pairs
    }

    /// The device status register.
    pub fn status(&self) -> u8 {
        self.state().status
    }

    /// Sets the link state in the configuration (bumps `config_generation`, sets ISR bit 1 and
    /// raises the configuration vector when one is set).
    pub fn set_link(&self, up: bool) {
        {
            let mut c = self.config.lock().unwrap_or_else(|p| p.into_inner());
            c[regs::net::STATUS..regs::net::STATUS + 2]
                .copy_from_slice(&u16::from(up).to_le_bytes());
        }
        self.generation.fetch_add(1, Ordering::AcqRel);
        let v = {
            let mut s = self.state();
            s.isr |= 2;
            s.msix_config
        };
        if v != NO_VECTOR
            && let Some(b) = self.bus.lock().unwrap_or_else(|p| p.into_inner()).as_ref()
        {
            b.irq.signal(v);
        }
    }

    fn data_queues(&self) -> u16 {
        2 * self.core.spec.pairs
    }

    fn ctrl_index(&self) -> Option<u16> {
        self.core.spec.ctrl_vq.then(|| self.data_queues())
    }

    fn nq(&self) -> u16 {
        self.core.spec.queues()
    }

    fn msix_on(&self) -> bool {
        let bus = self.bus.lock().unwrap_or_else(|p| p.into_inner());
        bus.as_ref()
            .is_some_and(|b| (0..self.msix_vectors()).any(|v| b.irq.is_wired(v)))
    }

    fn vector_ok(&self, v: u16) -> bool {
        v == NO_VECTOR || (v < self.msix_vectors() && !fault_flag(&self.faults.refuse_vectors))
    }

    fn broken(&self) -> bool {
        (0..self.data_queues()).any(|q| self.vf.counters(q).is_some_and(|c| c.is_broken()))
    }

    fn status_value(&self, s: &State) -> u8 {
        if self.broken() {
            s.status | st::NEEDS_RESET
        } else {
            s.status
        }
    }

    fn reset_all(&self) {
        if fault_flag(&self.faults.stuck_reset) {
            tracing::warn!(
                "{}: fault injected: reset ignored, status stays {:#x}",
                self.name,
                self.state().status
            );
            return;
        }
        {
            let mut s = self.state();
            let active = 1;
            *s = State {
                msix_config: NO_VECTOR,
                active_pairs: active,
                ctrl: CtrlQ {
                    vector: NO_VECTOR,
                    ..CtrlQ::default()
                },
                ..State::default()
            };
        }
        {
            let mut c = self.vf.ctl();
            c.epoch += 1;
            c.running = false;
            c.suspended = false;
            c.features = 0;
            c.log = None;
            for q in c.queues.iter_mut() {
                *q = QueueSetup::default();
            }
        }
        if let Some(h) = &self.hook {
            h.reset(&self.ctx());
        }
        self.sync();
    }

    fn write_status(&self, v: u8) {
        if v == 0 {
            self.reset_all();
            return;
        }
        let legacy = matches!(self.core.spec.shape, Shape::Legacy(_));
        let mut s = self.state();
        let old = s.status;
        let mut v = v & !st::NEEDS_RESET;
        if !legacy && v & st::FEATURES_OK != 0 && old & st::FEATURES_OK == 0 {
            let f = s.driver_features;
            if f & !self.core.spec.features != 0 || f & vf::VERSION_1 == 0 {
                v &= !st::FEATURES_OK;
            } else {
                self.vf.ctl().features = f;
            }
        }
        let start = v & st::DRIVER_OK != 0 && old & st::DRIVER_OK == 0;
        if start && !legacy && v & st::FEATURES_OK == 0 {
            v &= !st::DRIVER_OK;
        }
        s.status = v;
        let f = s.driver_features;
        drop(s);
        if start && v & st::DRIVER_OK != 0 {
            {
                let mut c = self.vf.ctl();
                if legacy {
                    c.features = f & 0xffff_ffff;
                }
                c.running = true;
                if self.faults.iommu_fault.swap(false, Ordering::Relaxed)
                    && let Some(q) = c.queues.first_mut()
                {
                    tracing::warn!(
                        "{}: fault injected: queue 0's descriptors moved outside every mapping",
                        self.name
                    );
                    q.desc = q.desc.wrapping_add(1 << 44);
                }
            }
            self.sync();
        }
    }

    /// Applies `f` to the selected queue's setup (data queues: the engine's; the control queue:
    /// ours). Returns whether the engine must sync.
    fn with_queue<R>(&self, q: u16, f: impl FnOnce(QRef<'_>) -> R) -> Option<R> {
        if q < self.data_queues() {
            let mut c = self.vf.ctl();
            let running = c.running;
            let setup = c.queues.get_mut(usize::from(q))?;
            Some(f(QRef::Data(setup, running)))
        } else if Some(q) == self.ctrl_index() {
            let mut s = self.state();
            Some(f(QRef::Ctrl(&mut s.ctrl)))
        } else {
            None
        }
    }

    fn queue_max(&self, q: u16) -> u16 {
        if q < self.data_queues() {
            self.core.spec.max_queue_size
        } else if Some(q) == self.ctrl_index() {
            self.core.spec.max_queue_size.min(64)
        } else {
            0
        }
    }

    fn doorbell(&self, q: u16, value: u32) {
        if q < self.data_queues() {
            if fault_flag(&self.faults.drop_doorbell) {
                self.dropped_doorbells.fetch_add(1, Ordering::Relaxed);
                if !self.warned_drop.swap(true, Ordering::Relaxed) {
                    tracing::warn!(
                        "{}: fault injected: doorbell of queue {q} dropped (counted in dropped_doorbells)",
                        self.name
                    );
                }
                return;
            }
            self.vf.ring_bell(q, value);
            self.core.engine.wake();
        } else if Some(q) == self.ctrl_index() {
            self.serve_ctrl();
        }
    }

    /// Serves every command on the control queue (driver thread, like a synchronous device).
    fn serve_ctrl(&self) {
        let Some(bus) = self.bus.lock().unwrap_or_else(|p| p.into_inner()).clone() else {
            return;
        };
        let features = self.vf.ctl().features;
        let running = self.vf.ctl().running;
        let mut s = self.state();
        let c = s.ctrl;
        if !running || !c.enabled || c.size == 0 {
            return;
        }
        let (_, mem) = bus.dma.view();
        let qc = QueueConfig {
            size: c.size,
            desc: c.desc,
            avail: c.driver,
            used: c.device,
            addr_kind: AddrKind::Gpa,
            features,
        };
        let mut dq = match DeviceQueue::new(&qc, &mem) {
            Ok(d) => d,
            Err(e) => {
                bus.dma.record_fault(c.desc, 16 * u64::from(c.size));
                tracing::warn!("{}: control queue: {e}", self.name);
                return;
            }
        };
        if dq.set_last_avail(c.next).is_err() {
            return;
        }
        let mut segs = Segs::new();
        let mut served = 0;
        loop {
            let chain = match dq.pop(&mem, &mut segs) {
                Ok(Some(ch)) => ch,
                Ok(None) => break,
                Err(e) => {
                    tracing::warn!("{}: control queue: {e}", self.name);
                    break;
                }
            };
            let mut hdr = [0u8; 4];
            let n = segs.read(0, &mut hdr);
            let ack = if n >= 4 && hdr[0] == ctrl::CLASS_MQ && hdr[1] == ctrl::MQ_VQ_PAIRS_SET {
                let pairs = u16::from_le_bytes([hdr[2], hdr[3]]);
                if (1..=self.core.spec.pairs).contains(&pairs) && features & vf::NET_MQ != 0 {
                    s.active_pairs = pairs;
                    ctrl::OK
                } else {
                    ctrl::ERR
                }
            } else {
                ctrl::ERR
            };
            segs.write(0, &[ack]);
            dq.push_used(&chain, 1);
            served += 1;
        }
        let notify = dq.publish_used();
        s.ctrl.next = dq.last_avail();
        self.ctrl_commands.fetch_add(served, Ordering::Relaxed);
        if notify && c.vector != NO_VECTOR {
            bus.irq.signal(c.vector);
        }
    }

    fn config_read(&self, offset: u64, buf: &mut [u8]) {
        let c = self.config.lock().unwrap_or_else(|p| p.into_inner());
        for (i, b) in buf.iter_mut().enumerate() {
            *b = c.get(offset as usize + i).copied().unwrap_or(0);
        }
    }

    // ---------------------------------------------------------------- modern

    fn common_read(&self, m: &ModernShape, off: u64, w: usize) -> u64 {
        let r = &m.common_regs;
        let s = self.state();
        let q = s.qsel;
        let features = self.core.spec.features;
        let half = |v: u64, sel: u32| match sel {
            0 => v & 0xffff_ffff,
            1 => v >> 32,
            _ => 0,
        };
        let v = if off == r.dfselect {
            u64::from(s.dfsel)
        } else if off == r.df {
            half(features, s.dfsel)
        } else if off == r.gfselect {
            u64::from(s.gfsel)
        } else if off == r.gf {
            half(s.driver_features, s.gfsel)
        } else if off == r.msix_config {
            u64::from(s.msix_config)
        } else if off == r.num_queues {
            u64::from(self.nq())
        } else if off == r.status {
            u64::from(self.status_value(&s))
        } else if off == r.generation {
            self.generation.load(Ordering::Acquire) & 0xff
        } else if off == r.q_select {
            u64::from(q)
        } else if off == r.q_notify_off {
            if q < self.nq() { u64::from(q) } else { 0 }
        } else {
            drop(s);
            let max = self.queue_max(q);
            return self
                .with_queue(q, |qr| {
                    let (size, vector, enabled, desc, driver, device) = qr.fields();
                    let pick = |base: u64, v: u64| {
                        if off == base {
                            Some(v & 0xffff_ffff)
                        } else if off == base + 4 {
                            Some(v >> 32)
                        } else {
                            None
                        }
                    };
                    if off == r.q_size {
                        u64::from(if size == 0 { max } else { size })
                    } else if off == r.q_msix {
                        u64::from(vector)
                    } else if off == r.q_enable {
                        u64::from(enabled)
                    } else {
                        pick(r.q_desc, desc)
                            .or_else(|| pick(r.q_driver, driver))
                            .or_else(|| pick(r.q_device, device))
                            .unwrap_or(0)
                    }
                })
                .unwrap_or(0)
                & mask(w);
        };
        v & mask(w)
    }

    fn common_write(&self, m: &ModernShape, off: u64, v: u64) {
        let r = &m.common_regs;
        if off == r.status {
            self.write_status(v as u8);
            return;
        }
        let mut s = self.state();
        if off == r.dfselect {
            s.dfsel = v as u32;
            return;
        }
        if off == r.gfselect {
            s.gfsel = v as u32;
            return;
        }
        if off == r.gf {
            if s.status & st::FEATURES_OK == 0 {
                let sh = match s.gfsel {
                    0 => 0,
                    1 => 32,
                    _ => return,
                };
                s.driver_features =
                    (s.driver_features & !(0xffff_ffffu64 << sh)) | ((v & 0xffff_ffff) << sh);
            }
            return;
        }
        if off == r.msix_config {
            let v = v as u16;
            s.msix_config = if self.vector_ok(v) { v } else { NO_VECTOR };
            return;
        }
        if off == r.q_select {
            s.qsel = v as u16;
            return;
        }
        let q = s.qsel;
        drop(s);
        let max = self.queue_max(q);
        let ok_vec = |x: u16| self.vector_ok(x);
        let sync = self.with_queue(q, |qr| qr.write(r, off, v, max, &ok_vec));
        if sync == Some(true) {
            self.sync();
        }
    }

    fn modern_read(&self, m: &ModernShape, bar: u8, off: u64, buf: &mut [u8]) {
        let inside = |p: &super::Place| bar == p.bar && off >= p.offset && off < p.offset + p.len;
        if inside(&m.common) {
            let v = self.common_read(m, off - m.common.offset, buf.len());
            buf.copy_from_slice(&v.to_le_bytes()[..buf.len()]);
        } else if inside(&m.device) {
            self.config_read(off - m.device.offset, buf);
        } else if inside(&m.isr) {
            let mut s = self.state();
            buf.fill(0);
            buf[0] = s.isr;
            s.isr = 0;
        } else if inside(&m.notify) {
            buf.fill(0);
        } else {
            buf.fill(0xff);
        }
    }

    fn modern_write(&self, m: &ModernShape, bar: u8, off: u64, buf: &[u8]) {
        let inside = |p: &super::Place| bar == p.bar && off >= p.offset && off < p.offset + p.len;
        let mut b = [0u8; 8];
        b[..buf.len()].copy_from_slice(buf);
        let v = u64::from_le_bytes(b);
        if inside(&m.common) {
            self.common_write(m, off - m.common.offset, v);
        } else if inside(&m.notify) {
            let rel = off - m.notify.offset;
            let mult = u64::from(m.notify_mult.max(1));
            if rel.is_multiple_of(mult) {
                self.doorbell((rel / mult) as u16, v as u32);
            }
        }
    }

    // ---------------------------------------------------------------- legacy

    fn legacy_read(&self, l: &regs::LegacyLayout, off: u64, buf: &mut [u8]) {
        let msix = self.msix_on();
        let cfg_base = if msix { l.config_msix } else { l.config };
        if off >= cfg_base && off < cfg_base + regs::net::LEN as u64 {
            self.config_read(off - cfg_base, buf);
            return;
        }
        let w = buf.len();
        let mut s = self.state();
        let q = s.qsel;
        let v: u64 = if off == l.host_features {
            self.core.spec.features & 0xffff_ffff
        } else if off == l.guest_features {
            s.driver_features & 0xffff_ffff
        } else if off == l.sel {
            u64::from(q)
        } else if off == l.status {
            u64::from(self.status_value(&s))
        } else if off == l.isr {
            let i = s.isr;
            s.isr = 0;
            u64::from(i)
        } else if msix && off == l.msix_config {
            u64::from(s.msix_config)
        } else if off == l.num || off == l.pfn || (msix && off == l.msix_queue) {
            drop(s);
            let max = self.queue_max(q);
            let v = self
                .with_queue(q, |qr| {
                    let (_, vector, enabled, desc, _, _) = qr.fields();
                    if off == l.num {
                        u64::from(max)
                    } else if off == l.pfn {
                        if enabled { desc >> 12 } else { 0 }
                    } else {
                        u64::from(vector)
                    }
                })
                .unwrap_or(if off == l.msix_queue {
                    u64::from(NO_VECTOR)
                } else {
                    0
                });
            buf.copy_from_slice(&(v & mask(w)).to_le_bytes()[..w]);
            return;
        } else {
            u64::MAX
        };
        buf.copy_from_slice(&(v & mask(w)).to_le_bytes()[..w]);
    }

    fn legacy_write(&self, l: &regs::LegacyLayout, off: u64, buf: &[u8]) {
        let mut b = [0u8; 8];
        b[..buf.len()].copy_from_slice(buf);
        let v = u64::from_le_bytes(b);
        let msix = self.msix_on();
        if off == l.status {
            self.write_status(v as u8);
            return;
        }
        if off == l.notify {
            self.doorbell(v as u16, v as u32);
            return;
        }
        let mut s = self.state();
        if off == l.guest_features {
            if s.status & st::DRIVER_OK == 0 {
                s.driver_features = v & 0xffff_ffff & self.core.spec.features;
            }
            return;
        }
        if off == l.sel {
            s.qsel = v as u16;
            return;
        }
        if msix && off == l.msix_config {
            let v = v as u16;
            s.msix_config = if self.vector_ok(v) { v } else { NO_VECTOR };
            return;
        }
        let q = s.qsel;
        drop(s);
        let max = self.queue_max(q);
        let align = l.align;
        let sync = if off == l.pfn {
            self.with_queue(q, |qr| qr.set_pfn(v & 0xffff_ffff, max, align))
        } else if msix && off == l.msix_queue {
            let v = v as u16;
            let v = if self.vector_ok(v) { v } else { NO_VECTOR };
            self.with_queue(q, |qr| qr.set_vector(v))
        } else {
            None
        };
        if sync == Some(true) {
            self.sync();
        }
    }

    fn hook_for(&self, bar: u8, off: u64) -> Option<&Arc<dyn BarHook>> {
        self.hook
            .as_ref()
            .filter(|h| h.bar() == bar && off < h.size())
    }
}

fn mask(w: usize) -> u64 {
    if w >= 8 {
        u64::MAX
    } else {
        (1u64 << (8 * w)) - 1
    }
}

/// The selected queue's setup.
enum QRef<'a> {
    /// A data queue (engine state) and whether the function runs.
    Data(&'a mut QueueSetup, bool),
    /// The control queue.
    Ctrl(&'a mut CtrlQ),
}

impl QRef<'_> {
    fn fields(&self) -> (u16, u16, bool, u64, u64, u64) {
        match self {
            QRef::Data(q, _) => (q.size, q.vector, q.enabled, q.desc, q.driver, q.device),
            QRef::Ctrl(c) => (c.size, c.vector, c.enabled, c.desc, c.driver, c.device),
        }
    }

    /// A modern queue-field write; returns whether the engine must apply it.
    fn write(
        self,
        r: &regs::CommonLayout,
        off: u64,
        v: u64,
        max: u16,
        ok_vec: &dyn Fn(u16) -> bool,
    ) -> bool {
        let (size, vector, enabled, desc, driver, device, running) = match self {
            QRef::Data(q, running) => (
                &mut q.size,
                &mut q.vector,
                &mut q.enabled,
                &mut q.desc,
                &mut q.driver,
                &mut q.device,
                running,
            ),
            QRef::Ctrl(c) => (
                &mut c.size,
                &mut c.vector,
                &mut c.enabled,
                &mut c.desc,
                &mut c.driver,
                &mut c.device,
                false,
            ),
        };
        let set_half = |field: &mut u64, base: u64| {
            if off == base {
                *field = (*field & !0xffff_ffff) | (v & 0xffff_ffff);
                true
            } else if off == base + 4 {
                *field = (*field & 0xffff_ffff) | ((v & 0xffff_ffff) << 32);
                true
            } else {
                false
            }
        };
        if off == r.q_msix {
            let x = v as u16;
            *vector = if ok_vec(x) { x } else { NO_VECTOR };
            return running && *enabled;
        }
        if off == r.q_enable {
            if v & 1 == 1 && !*enabled && *size != 0 {
                *enabled = true;
                return running;
            }
            return false;
        }
        if *enabled {
            // Fixed once enabled.
            return false;
        }
        if off == r.q_size {
            let x = v as u16;
            if x != 0 && x <= max {
                *size = x;
            }
            return false;
        }
        let _ = set_half(desc, r.q_desc)
            || set_half(driver, r.q_driver)
            || set_half(device, r.q_device);
        false
    }

    /// A legacy QUEUE_PFN write: the contiguous layout from the frame number; 0 disables.
    fn set_pfn(self, pfn: u64, max: u16, align: u64) -> bool {
        let n = u64::from(max);
        let (q_size, q_desc, q_driver, q_device, q_enabled, running) = match self {
            QRef::Data(q, running) => (
                &mut q.size,
                &mut q.desc,
                &mut q.driver,
                &mut q.device,
                &mut q.enabled,
                running,
            ),
            QRef::Ctrl(c) => (
                &mut c.size,
                &mut c.desc,
                &mut c.driver,
                &mut c.device,
                &mut c.enabled,
                false,
            ),
        };
        if pfn == 0 {
            let was = *q_enabled;
            *q_enabled = false;
            return running && was;
        }
        let desc = pfn << 12;
        *q_size = max;
        *q_desc = desc;
        *q_driver = desc + 16 * n;
        *q_device = (desc + 16 * n + 6 + 2 * n).next_multiple_of(align);
        *q_enabled = true;
        running
    }

    fn set_vector(self, v: u16) -> bool {
        match self {
            QRef::Data(q, running) => {
                q.vector = v;
                running && q.enabled
            }
            QRef::Ctrl(c) => {
                c.vector = v;
                false
            }
        }
    }
}

impl DeviceModel for VpFunction {
    fn name(&self) -> &str {
        &self.name
    }

    fn config_read(&self, offset: u16, buf: &mut [u8]) {
        let p = self.pci.lock().unwrap_or_else(|p| p.into_inner());
        let o = usize::from(offset);
        buf.copy_from_slice(&p[o..o + buf.len()]);
    }

    fn config_write(&self, offset: u16, buf: &[u8]) {
        let mut p = self.pci.lock().unwrap_or_else(|p| p.into_inner());
        for (i, b) in buf.iter().enumerate() {
            let o = usize::from(offset) + i;
            if o == usize::from(cfg::COMMAND) || o == usize::from(cfg::COMMAND) + 1 {
                p[o] = *b;
            }
        }
    }

    fn bar_len(&self, bar: u8) -> u64 {
        let base = match &self.core.spec.shape {
            Shape::Modern(m) => m.bars.get(usize::from(bar)).copied().unwrap_or(0),
            Shape::Legacy(l) => match bar {
                0 => l.bar0,
                1 => 0x1000,
                _ => 0,
            },
        };
        match &self.hook {
            Some(h) if h.bar() == bar => base.max(h.size().next_power_of_two()),
            _ => base,
        }
    }

    fn bar_read(&self, bar: u8, offset: u64, buf: &mut [u8]) {
        if let Some(h) = self.hook_for(bar, offset) {
            h.read(&self.ctx(), offset, buf);
            return;
        }
        match &self.core.spec.shape {
            Shape::Modern(m) => self.modern_read(m, bar, offset, buf),
            Shape::Legacy(l) if bar == 0 => self.legacy_read(&l.regs, offset, buf),
            Shape::Legacy(_) => buf.fill(0xff),
        }
    }

    fn bar_write(&self, bar: u8, offset: u64, buf: &[u8]) {
        if let Some(h) = self.hook_for(bar, offset) {
            h.write(&self.ctx(), offset, buf);
            return;
        }
        match &self.core.spec.shape {
            Shape::Modern(m) => self.modern_write(m, bar, offset, buf),
            Shape::Legacy(l) if bar == 0 => self.legacy_write(&l.regs, offset, buf),
            Shape::Legacy(_) => {}
        }
    }

    fn msix_vectors(&self) -> u16 {
        self.core
            .spec
            .msix_vectors
            .unwrap_or(2 * self.core.spec.pairs + 2)
    }

    fn reset(&self) {
        // A function-level reset always works (it is the PCI layer's, not the virtio status).
        let stuck = self.faults.stuck_reset.swap(false, Ordering::Relaxed);
        self.reset_all();
        if stuck {
            self.faults.stuck_reset.store(true, Ordering::Relaxed);
        }
    }

    fn attach(&self, bus: ModelBus) {
        self.vf.set_bus(bus.clone());
        *self.bus.lock().unwrap_or_else(|p| p.into_inner()) = Some(bus);
        self.sync();
    }

    fn notify_area(&self, bar: u8, offset: u64, len: u64) -> Option<NotifyArea> {
        let Shape::Modern(m) = &self.core.spec.shape else {
            return None;
        };
        if bar != m.notify.bar || m.notify_mult != 4096 || len > BELL_PAGE {
            return None;
        }
        let rel = offset.checked_sub(m.notify.offset)?;
        let q = rel / 4096;
        if !rel.is_multiple_of(4096) || q >= u64::from(self.data_queues()) {
            return None;
        }
        let fd = self.vf.bell_segment().file().try_clone().ok()?;
        Some(NotifyArea {
            fd: Arc::new(OwnedFd::from(fd)),
            offset: q * BELL_PAGE,
            size: BELL_PAGE,
        })
    }
}

impl VpFunction {
    /// Function index in its model.
    pub fn index(&self) -> u16 {
        self.index
    }

    /// Injects an IOMMU fault now: data queue `q` (running) is pointed outside every mapping,
    /// as a device whose DMA went astray; the engine records the fault and stops the queue.
    pub fn iommu_fault_now(&self, q: u16) {
        {
            let mut c = self.vf.ctl();
            let Some(s) = c.queues.get_mut(usize::from(q)) else {
                return;
            };
            tracing::warn!(
                "{}: fault injected: queue {q}'s descriptors moved outside every mapping",
                self.name
            );
            s.desc = s.desc.wrapping_add(1 << 44);
        }
        self.sync();
    }
}

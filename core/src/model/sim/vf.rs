//! One sim VF as a PCI function: config space, the register BAR, the doorbell BAR.

use std::os::fd::OwnedFd;
use std::sync::{Arc, Mutex, MutexGuard};

use super::SimCore;
use super::regs::*;
use crate::model::engine::{BELL_PAGE, NO_VECTOR, QueueSetup, VfShared};
use crate::pci::model::{DeviceModel, ModelBus};
use crate::pci::{NotifyArea, cap_id, cfg};
use crate::virtio::features as vf;

/// Made-up PCI identity (no real assignment): vendor "VD", device "SI".
pub(crate) const VENDOR_ID: u16 = 0x5644;
pub(crate) const DEVICE_ID: u16 = 0x5349;
const MSIX_CAP: u8 = 0x40;

/// Registers that live in the model (the rest is the engine's control state).
#[derive(Debug, Default)]
struct Regs {
    status: u32,
    sel: u32,
    driver_features: u64,
    log_base: u64,
    log_size: u64,
    bad: u32,
    last_bad: u32,
}

/// A sim VF (implements [`DeviceModel`]).
#[derive(Debug)]
pub struct SimVf {
    name: String,
    core: Arc<SimCore>,
    vf: Arc<VfShared>,
    regs: Mutex<Regs>,
    pci: Mutex<[u8; 256]>,
    device_features: u64,
    config: [u8; CONFIG_LEN as usize],
    max_queue_size: u16,
}

impl SimVf {
    pub(super) fn new(core: Arc<SimCore>, index: u16) -> SimVf {
        let c = &core.cfg;
        let vfs = Arc::clone(&core.engine.vfs()[usize::from(index)]);
        let mut features = vf::VERSION_1
            | vf::ANY_LAYOUT
            | vf::RING_PACKED
            | vf::RING_EVENT_IDX
            | vf::RING_INDIRECT_DESC
            | vf::NET_MRG_RXBUF
            | vf::NET_MAC
            | vf::NET_MTU
            | vf::NET_STATUS;
        if c.queue_pairs > 1 {
            features |= vf::NET_MQ;
        }
        if c.log {
            features |= vf::VHOST_F_LOG_ALL;
        }
        let mut config = [0u8; CONFIG_LEN as usize];
        config[..6].copy_from_slice(&c.vf_mac(index));
        config[6..8].copy_from_slice(&1u16.to_le_bytes());
        config[8..10].copy_from_slice(&c.queue_pairs.to_le_bytes());
        config[10..12].copy_from_slice(&c.mtu.to_le_bytes());
        let mut pci = [0u8; 256];
        let put16 = |b: &mut [u8; 256], off: u16, v: u16| {
            b[usize::from(off)..usize::from(off) + 2].copy_from_slice(&v.to_le_bytes())
        };
        put16(&mut pci, cfg::VENDOR_ID, VENDOR_ID);
        put16(&mut pci, cfg::DEVICE_ID, DEVICE_ID);
        put16(&mut pci, cfg::STATUS, cfg::STATUS_CAP_LIST);
        pci[usize::from(cfg::REVISION)] = 1;
        // Class: network controller, Ethernet.
        pci[usize::from(cfg::CLASS) + 2] = 0x02;
        put16(&mut pci, cfg::SUBSYS_VENDOR, VENDOR_ID);
        put16(&mut pci, cfg::SUBSYS_ID, 1);
        pci[usize::from(cfg::CAP_PTR)] = MSIX_CAP;
        // MSI-X capability: table size N-1; table and PBA described but not emulated (vectors
        // are wired through the PCI layer's set_msix).
        let m = usize::from(MSIX_CAP);
        pci[m] = cap_id::MSIX;
        pci[m + 1] = 0;
        let vectors = vfs.queues() + 1;
        pci[m + 2..m + 4].copy_from_slice(&(vectors - 1).to_le_bytes());
        pci[m + 4..m + 8].copy_from_slice(&0x800u32.to_le_bytes());
        pci[m + 8..m + 12].copy_from_slice(&0xc00u32.to_le_bytes());
        SimVf {
            name: c.vf_name(index),
            max_queue_size: c.max_queue_size,
            core,
            vf: vfs,
            regs: Mutex::new(Regs::default()),
            pci: Mutex::new(pci),
            device_features: features,
            config,
        }
    }

    fn regs(&self) -> MutexGuard<'_, Regs> {
        self.regs.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The engine-side state of this VF (counters, positions), for tests and the registry.
    pub fn shared(&self) -> &Arc<VfShared> {
        &self.vf
    }

    fn sync(&self) {
        if let Err(e) = self.core.engine.sync(&self.vf) {
            tracing::warn!("{}: {e}", self.name);
        }
    }

    fn bad(r: &mut Regs, off: u64) {
        r.bad = r.bad.wrapping_add(1);
        r.last_bad = off as u32;
    }

    fn nq(&self) -> u32 {
        u32::from(self.vf.queues())
    }

    fn do_reset(&self) {
        {
            let mut r = self.regs();
            r.status = 0;
            r.sel = 0;
            r.driver_features = 0;
            r.log_base = 0;
            r.log_size = 0;
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
        self.sync();
    }

    fn read_reg(&self, off: u64) -> u64 {
        let r = self.regs();
        let sel = r.sel;
        let ctl = self.vf.ctl();
        let q = ctl.queues.get(sel as usize).copied();
        let counters = self.vf.counters(sel as u16);
        let live = |s: &QueueSetup| ctl.running && s.enabled && s.size > 0;
        let start = if ctl.features & vf::RING_PACKED != 0 {
            0x8000
        } else {
            0
        };
        let qv = |f: fn(&QueueSetup) -> u64| q.as_ref().map_or(0, f);
        let cnt = |f: fn(&crate::vdpa::VqStats) -> u64| counters.map_or(0, |c| f(&c.snapshot()));
        match off {
            MAGIC => u64::from(MAGIC_VALUE),
            VERSION => u64::from(VERSION_VALUE),
            DEVICE_FEATURES => self.device_features,
            DRIVER_FEATURES => r.driver_features,
            STATUS => {
                let broken = (0..self.vf.queues())
                    .any(|i| self.vf.counters(i).is_some_and(|c| c.is_broken()));
                u64::from(if broken {
                    r.status | S_NEEDS_RESET
                } else {
                    r.status
                })
            }
            NUM_QUEUES => u64::from(self.nq()),
            QUEUE_SEL => u64::from(sel),
            QUEUE_SIZE_MAX => u64::from(self.max_queue_size),
            QUEUE_SIZE => qv(|s| u64::from(s.size)),
            QUEUE_ENABLE => qv(|s| u64::from(s.enabled)),
            QUEUE_DESC => qv(|s| s.desc),
            QUEUE_DRIVER => qv(|s| s.driver),
            QUEUE_DEVICE => qv(|s| s.device),
            QUEUE_AVAIL_STATE | QUEUE_USED_STATE => match (q, counters) {
                (Some(s), Some(c)) => {
                    let (a, u) = if live(&s) && !ctl.suspended {
                        c.positions()
                    } else {
                        (s.avail.unwrap_or(start), s.used.unwrap_or(start))
                    };
                    u64::from(if off == QUEUE_AVAIL_STATE { a } else { u })
                }
                _ => 0,
            },
            QUEUE_VECTOR => q.map_or(u64::from(NO_VECTOR), |s| u64::from(s.vector)),
            QUEUE_NOTIFY_OFF => u64::from(sel) * BELL_PAGE,
            QUEUE_STATUS => match (q, counters) {
                (Some(s), Some(c)) => {
                    u64::from(live(&s) && !c.is_broken()) | (u64::from(c.is_broken()) << 1)
                }
                _ => 0,
            },
            SUSPEND => u64::from(ctl.suspended),
            LOG_BASE => r.log_base,
            LOG_SIZE => r.log_size,
            BAD_ACCESSES => u64::from(r.bad),
            LAST_BAD_OFFSET => u64::from(r.last_bad),
            Q_PACKETS => cnt(|s| s.packets),
            Q_BYTES => cnt(|s| s.bytes),
            Q_ERRORS => cnt(|s| s.errors),
            Q_DROPPED => cnt(|s| s.dropped),
            Q_IOMMU_FAULTS => cnt(|s| s.iommu_faults),
            Q_KICKS => cnt(|s| s.kicks),
            Q_INTERRUPTS => cnt(|s| s.interrupts),
            _ => u64::MAX,
        }
    }

    fn write_reg(&self, off: u64, v: u64) {
        let mut r = self.regs();
        let sel = r.sel as usize;
        let nq = self.nq();
        match off {
            DRIVER_FEATURES => {
                if r.status & S_FEATURES_OK != 0 {
                    Self::bad(&mut r, off);
                } else {
                    r.driver_features = v;
                }
            }
            STATUS => {
                let v = v as u32;
                if v == 0 {
                    drop(r);
                    self.do_reset();
                    return;
                }
                let old = r.status;
                if old & !v != 0 {
                    // Bits can only be cleared by a reset.
                    Self::bad(&mut r, off);
                    return;
                }
                let mut v = v;
                if v & S_FEATURES_OK != 0 && old & S_FEATURES_OK == 0 {
                    let f = r.driver_features;
                    if f & !self.device_features != 0 || f & vf::VHOST_F_LOG_ALL != 0 {
                        // Not a subset (or the log capability bit, which is not a virtio
                        // feature): FEATURES_OK does not stick.
                        v &= !S_FEATURES_OK;
                    } else {
                        self.vf.ctl().features = f;
                    }
                }
                let start = v & S_DRIVER_OK != 0 && old & S_DRIVER_OK == 0;
                if start && v & S_FEATURES_OK == 0 {
                    Self::bad(&mut r, off);
                    v &= !S_DRIVER_OK;
                }
                r.status = v & !S_NEEDS_RESET;
                drop(r);
                if start && v & S_DRIVER_OK != 0 {
                    self.vf.ctl().running = true;
                    self.sync();
                }
            }
            QUEUE_SEL => {
                if v >= u64::from(nq) {
                    Self::bad(&mut r, off);
                } else {
                    r.sel = v as u32;
                }
            }
            QUEUE_SIZE | QUEUE_DESC | QUEUE_DRIVER | QUEUE_DEVICE | QUEUE_AVAIL_STATE
            | QUEUE_USED_STATE | QUEUE_ENABLE | QUEUE_VECTOR => {
                let mut ctl = self.vf.ctl();
                let running = ctl.running;
                let suspended = ctl.suspended;
                let Some(q) = ctl.queues.get_mut(sel) else {
                    Self::bad(&mut r, off);
                    return;
                };
                let live = running && q.enabled && q.size > 0;
                let mut sync = false;
                match off {
                    QUEUE_ENABLE => {
                        q.enabled = v & 1 != 0;
                        sync = running;
                    }
                    QUEUE_VECTOR => {
                        let ok = v == u64::from(NO_VECTOR) || v <= u64::from(nq);
                        q.vector = if ok { v as u16 } else { NO_VECTOR };
                        if !ok {
                            Self::bad(&mut r, off);
                        }
                        sync = live;
                    }
                    QUEUE_AVAIL_STATE | QUEUE_USED_STATE => {
                        if live && !suspended {
                            Self::bad(&mut r, off);
                        } else if off == QUEUE_AVAIL_STATE {
                            q.avail = Some(v as u16);
                            sync = live;
                        } else {
                            q.used = Some(v as u16);
                            sync = live;
                        }
                    }
                    _ if live => Self::bad(&mut r, off),
                    QUEUE_SIZE => {
                        if v == 0 || v > u64::from(self.max_queue_size) {
                            Self::bad(&mut r, off);
                        } else {
                            q.size = v as u16;
                        }
                    }
                    QUEUE_DESC => q.desc = v,
                    QUEUE_DRIVER => q.driver = v,
                    _ => q.device = v,
                }
                drop(ctl);
                drop(r);
                if sync {
                    self.sync();
                }
            }
            SUSPEND => {
                drop(r);
                self.vf.ctl().suspended = v & 1 != 0;
                self.sync();
            }
            LOG_BASE => r.log_base = v,
            LOG_SIZE => {
                r.log_size = v;
                let base = r.log_base;
                drop(r);
                self.vf.ctl().log = (v != 0).then_some((base, v));
                self.sync();
            }
            _ => Self::bad(&mut r, off),
        }
    }
}

impl DeviceModel for SimVf {
    fn name(&self) -> &str {
        &self.name
    }

    fn config_read(&self, offset: u16, buf: &mut [u8]) {
        let p = self.pci.lock().unwrap_or_else(|p| p.into_inner());
        let o = usize::from(offset);
        buf.copy_from_slice(&p[o..o + buf.len()]);
    }

    fn config_write(&self, offset: u16, buf: &[u8]) {
        // Only the command register is writable.
        let mut p = self.pci.lock().unwrap_or_else(|p| p.into_inner());
        for (i, b) in buf.iter().enumerate() {
            let o = usize::from(offset) + i;
            if o == usize::from(cfg::COMMAND) || o == usize::from(cfg::COMMAND) + 1 {
                p[o] = *b;
            }
        }
    }

    fn bar_len(&self, bar: u8) -> u64 {
        match bar {
            0 => BAR0_LEN,
            BELL_BAR => u64::from(self.nq()) * BELL_PAGE,
            _ => 0,
        }
    }

    fn bar_read(&self, bar: u8, offset: u64, buf: &mut [u8]) {
        if bar == BELL_BAR {
            self.vf.read_bells(offset, buf);
            return;
        }
        if (CONFIG..CONFIG + CONFIG_LEN).contains(&offset) {
            let o = (offset - CONFIG) as usize;
            for (i, b) in buf.iter_mut().enumerate() {
                *b = self.config.get(o + i).copied().unwrap_or(0);
            }
            return;
        }
        if width(offset) != Some(buf.len()) {
            Self::bad(&mut self.regs(), offset);
            buf.fill(0xff);
            return;
        }
        let v = self.read_reg(offset);
        buf.copy_from_slice(&v.to_le_bytes()[..buf.len()]);
    }

    fn bar_write(&self, bar: u8, offset: u64, buf: &[u8]) {
        if bar == BELL_BAR {
            let q = offset / BELL_PAGE;
            if offset.is_multiple_of(BELL_PAGE) && matches!(buf.len(), 2 | 4) {
                let mut b = [0u8; 4];
                b[..buf.len()].copy_from_slice(buf);
                self.vf.ring_bell(q as u16, u32::from_le_bytes(b));
                self.core.engine.wake();
            } else {
                Self::bad(&mut self.regs(), offset);
            }
            return;
        }
        if width(offset) != Some(buf.len()) {
            Self::bad(&mut self.regs(), offset);
            return;
        }
        let mut b = [0u8; 8];
        b[..buf.len()].copy_from_slice(buf);
        self.write_reg(offset, u64::from_le_bytes(b));
    }

    fn msix_vectors(&self) -> u16 {
        self.vf.queues() + 1
    }

    fn reset(&self) {
        self.do_reset();
    }

    fn attach(&self, bus: ModelBus) {
        self.vf.set_bus(bus);
        self.sync();
    }

    fn notify_area(&self, bar: u8, offset: u64, len: u64) -> Option<NotifyArea> {
        if bar != BELL_BAR
            || !offset.is_multiple_of(BELL_PAGE)
            || offset / BELL_PAGE >= u64::from(self.nq())
        {
            return None;
        }
        if len > BELL_PAGE {
            return None;
        }
        let fd = self.vf.bell_segment().file().try_clone().ok()?;
        Some(NotifyArea {
            fd: Arc::new(OwnedFd::from(fd)),
            offset,
            size: BELL_PAGE,
        })
    }
}

//! A device model of the IFC VF: a modern virtio-net function (the virtio PMD crate's model)
//! with the live-migration region at BAR4 offset 0, written from the reference facts
//! (`kernel-vdpa-hw.md` §3, `dpdk-vdpa.md` §2) with its own register definitions ([`regs`],
//! separate from the driver's [`crate::lm`]).
//!
//! - IDs 1af4:1041 subsystem 8086:001a (N3000); BAR0: common configuration at 0, ISR at 0x800,
//!   device configuration at 0xc00; BAR2: a doorbell page per queue (multiplier 4096, mappable);
//!   BAR4: the live-migration region. Every function has a control queue after its data queues
//!   (queue pairs = (num_queues - 1) / 2).
//! - Queue state slots at 0x20 + 4·q: avail index in bits 15:0, used in 31:16. Written while a
//!   queue is stopped (the engine starts there); read live (the engine's published positions).
//! - Dirty logging: LOG_BASE and LOG_END (32-bit halves) give the bitmap's IOVA range, CONTROL
//!   = ENABLE_VF (1) or ENABLE_PF (3) starts it, DISABLE (0) stops it: the engine then marks every
//!   page of every buffer it writes and of the used-ring entries it publishes.

use std::sync::{Arc, Mutex};

use vdpakit_core::virtio::features as vf;
use vdpakit_pmd_virtio::model::regs::CommonLayout;
use vdpakit_pmd_virtio::model::{
    BarHook, FnCtx, Identity, MODERN_FEATURES, ModelSpec, ModernShape, Place, Shape,
};

/// The model's copy of the live-migration region layout.
pub mod regs {
    /// Offsets in BAR4. A value so a test can move one.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub struct LmLayout {
        /// CONTROL (le64, low half significant).
        pub control: u64,
        /// STATUS (le64).
        pub status: u64,
        /// LOG start address, low half (high half at +4).
        pub log_base: u64,
        /// LOG end address, low half (high half at +4).
        pub log_end: u64,
        /// First queue state slot (4 bytes per queue).
        pub vq_state: u64,
        /// Bytes of the region.
        pub len: u64,
    }

    impl LmLayout {
        /// The layout of the facts.
        pub const FACTS: LmLayout = LmLayout {
            control: 0x00,
            status: 0x08,
            log_base: 0x10,
            log_end: 0x18,
            vq_state: 0x20,
            len: 0x1000,
        };
    }

    /// CONTROL: logging off.
    pub const CTL_DISABLE: u32 = 0;
    /// CONTROL: logging on (VF).
    pub const CTL_ENABLE_VF: u32 = 1;
    /// CONTROL: logging on (PF).
    pub const CTL_ENABLE_PF: u32 = 3;
}

use regs::LmLayout;

/// The IFC VF model's spec (IDs, layout, a control queue per function).
pub fn spec(name: &str, pairs: u16) -> ModelSpec {
    let mut s = ModelSpec::virtio(name, pairs);
    s.id = Identity {
        vendor: 0x1af4,
        device: 0x1041,
        subsys_vendor: 0x8086,
        subsys_device: 0x001a,
        revision: 1,
    };
    s.ctrl_vq = true;
    s.features = MODERN_FEATURES | vf::NET_CTRL_VQ | if pairs > 1 { vf::NET_MQ } else { 0 };
    let queues = 2 * pairs + 1;
    s.shape = Shape::Modern(ModernShape {
        common: Place {
            bar: 0,
            offset: 0,
            len: CommonLayout::SPEC.len,
        },
        isr: Place {
            bar: 0,
            offset: 0x800,
            len: 4,
        },
        device: Place {
            bar: 0,
            offset: 0xc00,
            len: 24,
        },
        notify: Place {
            bar: 2,
            offset: 0,
            len: u64::from(queues) * 4096,
        },
        notify_mult: 4096,
        bars: [
            0x1000,
            0,
            (u64::from(queues) * 4096).next_power_of_two(),
            0,
            LmLayout::FACTS.len,
            0,
        ],
        common_regs: CommonLayout::SPEC,
        omit_cap: None,
    });
    s
}

#[derive(Debug, Default)]
struct LmRegs {
    control: u32,
    base: u64,
    end: u64,
}

/// The live-migration region of one function.
#[derive(Debug)]
pub struct LmHook {
    layout: LmLayout,
    regs: Mutex<LmRegs>,
}

impl LmHook {
    /// A region with `layout`, as a function's hook.
    pub fn hook(layout: LmLayout) -> Arc<dyn BarHook> {
        Arc::new(LmHook {
            layout,
            regs: Mutex::new(LmRegs::default()),
        })
    }

    fn regs(&self) -> std::sync::MutexGuard<'_, LmRegs> {
        self.regs.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn slot(&self, off: u64) -> Option<u16> {
        let rel = off.checked_sub(self.layout.vq_state)?;
        rel.is_multiple_of(4).then_some((rel / 4) as u16)
    }

    fn apply_log(&self, f: &FnCtx<'_>) {
        let (on, base, end) = {
            let r = self.regs();
            (
                matches!(r.control, regs::CTL_ENABLE_VF | regs::CTL_ENABLE_PF),
                r.base,
                r.end,
            )
        };
        f.vf().ctl().log = (on && end > base).then_some((base, end - base));
        f.sync();
    }
}

fn half(v: u64, hi: bool) -> u64 {
    if hi { v >> 32 } else { v & 0xffff_ffff }
}

fn set_half(field: &mut u64, hi: bool, v: u64) {
    let v = v & 0xffff_ffff;
    *field = if hi {
        (*field & 0xffff_ffff) | (v << 32)
    } else {
        (*field & !0xffff_ffff) | v
    };
}

impl BarHook for LmHook {
    fn bar(&self) -> u8 {
        4
    }

    fn size(&self) -> u64 {
        self.layout.len
    }

    fn read(&self, f: &FnCtx<'_>, off: u64, buf: &mut [u8]) {
        let l = &self.layout;
        let r = self.regs();
        let v: u64 = if off == l.control {
            u64::from(r.control)
        } else if off == l.status {
            0
        } else if off == l.log_base || off == l.log_base + 4 {
            half(r.base, off != l.log_base)
        } else if off == l.log_end || off == l.log_end + 4 {
            half(r.end, off != l.log_end)
        } else if let Some(q) = self.slot(off) {
            drop(r);
            let vf = f.vf();
            let ctl = vf.ctl();
            match ctl.queues.get(usize::from(q)) {
                Some(s) => {
                    let live = ctl.running && s.enabled && s.size > 0 && !ctl.suspended;
                    let (a, u) = match (live, vf.counters(q)) {
                        (true, Some(c)) => c.positions(),
                        _ => (s.avail.unwrap_or(0), s.used.unwrap_or(0)),
                    };
                    u64::from(a) | (u64::from(u) << 16)
                }
                None => 0,
            }
        } else {
            0
        };
        let b = v.to_le_bytes();
        buf.copy_from_slice(&b[..buf.len()]);
    }

    fn write(&self, f: &FnCtx<'_>, off: u64, buf: &[u8]) {
        let l = &self.layout;
        let mut b = [0u8; 8];
        b[..buf.len()].copy_from_slice(buf);
        let v = u64::from_le_bytes(b);
        if off == l.control {
            self.regs().control = v as u32;
            self.apply_log(f);
        } else if off == l.log_base || off == l.log_base + 4 {
            set_half(&mut self.regs().base, off != l.log_base, v);
        } else if off == l.log_end || off == l.log_end + 4 {
            set_half(&mut self.regs().end, off != l.log_end, v);
        } else if let Some(q) = self.slot(off) {
            let vf = f.vf();
            let mut ctl = vf.ctl();
            let (running, suspended) = (ctl.running, ctl.suspended);
            if let Some(s) = ctl.queues.get_mut(usize::from(q)) {
                if running && s.enabled && !suspended {
                    tracing::warn!(
                        "{}: queue {q}'s state written while it runs: ignored",
                        f.name()
                    );
                    return;
                }
                s.avail = Some(v as u16);
                s.used = Some((v >> 16) as u16);
            }
        }
    }

    fn reset(&self, _f: &FnCtx<'_>) {
        *self.regs() = LmRegs::default();
    }
}

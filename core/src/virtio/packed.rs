//! Packed virtqueues (virtio 1.1+ §2.8), device and driver side.
//!
//! Layout (all little-endian):
//!
//! ```text
//! descriptor ring: size × { addr u64, len u32, id u16, flags u16 }   align 16
//! driver area:     event suppression { off_wrap u16, flags u16 }    align 4 (driver writes)
//! device area:     event suppression { off_wrap u16, flags u16 }    align 4 (device writes)
//! ```
//!
//! Both sides walk the one ring with a position and a wrap counter (starting at 1). The driver
//! makes a descriptor available by setting `AVAIL` = its wrap counter and `USED` = the inverse;
//! the device marks a chain used by writing one descriptor (id, written length) at its used
//! position with `AVAIL` = `USED` = its wrap counter, then skips the chain's length. A chain's
//! buffer id is in its last descriptor.
//!
//! Bursts: each side writes every descriptor of a burst except the first one's flags, then
//! stores those flags with Release: one publish per burst, exactly like the split index store.

use std::sync::atomic::{Ordering, fence};

use super::chain::{Acc, indirect_table};
use super::error::QueueError;
use super::features::{VIRTIO_F_IN_ORDER, VIRTIO_F_RING_EVENT_IDX, VIRTIO_F_RING_INDIRECT_DESC};
use super::log::DirtyLog;
use super::mem::{GuestMemory, RingArea, Segs};
use super::vring::{
    MAX_QUEUE_SIZE, RING_EVENT_FLAGS_DESC, RING_EVENT_FLAGS_DISABLE, RING_EVENT_FLAGS_ENABLE,
    VIRTQ_DESC_F_AVAIL, VIRTQ_DESC_F_INDIRECT, VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_USED,
    VIRTQ_DESC_F_WRITE,
};
use super::{AddrKind, Chain, QueueConfig, ring_sizes};

/// `avail_count` counts at most this many chains (one burst's worth).
const AVAIL_SCAN_MAX: u16 = crate::mbuf::MAX_BURST as u16;

const OFF_WRAP: usize = 0;
const EV_FLAGS: usize = 2;
const WRAP_BIT: u16 = 1 << 15;

#[inline(always)]
fn flags_off(slot: u16) -> usize {
    16 * usize::from(slot) + 14
}

/// A position on the ring: slot index and wrap counter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Pos {
    idx: u16,
    wrap: bool,
}

impl Pos {
    const START: Pos = Pos { idx: 0, wrap: true };

    /// Moves `n` slots forward on a ring of `size`, flipping the wrap counter per lap. No
    /// division on the hot path (`n <= size`, the only case a valid ring produces).
    #[inline(always)]
    fn advance(self, n: u16, size: u16) -> Pos {
        let (s, u) = (u32::from(size), u32::from(self.idx) + u32::from(n));
        if u < s {
            Pos {
                idx: u as u16,
                wrap: self.wrap,
            }
        } else if u < 2 * s {
            Pos {
                idx: (u - s) as u16,
                wrap: !self.wrap,
            }
        } else {
            Pos {
                idx: (u % s) as u16,
                wrap: self.wrap ^ ((u / s) & 1 == 1),
            }
        }
    }

    /// Moves `n` slots back.
    fn back(self, n: u16, size: u16) -> Pos {
        let (s, n) = (u32::from(size), u32::from(n) % (2 * u32::from(size)));
        // Go forward by 2*size - n, which is the same as back by n on a 2-lap cycle.
        let fwd = 2 * s - n;
        let u = u32::from(self.idx) + fwd;
        Pos {
            idx: (u % s) as u16,
            wrap: self.wrap ^ ((u / s) & 1 == 1),
        }
    }

    /// As the vhost `GET_VRING_BASE` value: bit 15 = wrap counter.
    fn encode(self) -> u16 {
        self.idx | if self.wrap { WRAP_BIT } else { 0 }
    }

    fn decode(v: u16) -> Pos {
        Pos {
            idx: v & !WRAP_BIT,
            wrap: v & WRAP_BIT != 0,
        }
    }

    /// Linear position on the two-lap cycle `[0, 2 * size)`.
    #[inline(always)]
    fn linear(self, size: u16) -> u32 {
        u32::from(self.idx) + if self.wrap { 0 } else { u32::from(size) }
    }
}

/// Whether the event position `off_wrap` lies in `[old, new)` on a ring of `size`.
#[inline(always)]
fn event_in(off_wrap: u16, old: Pos, new: Pos, size: u16) -> bool {
    let m = 2 * u32::from(size);
    let e = Pos::decode(off_wrap).linear(size) % m;
    let o = old.linear(size);
    let span = (new.linear(size) + m - o) % m;
    (e + m - o) % m < span
}

/// Whether a descriptor's flags say "available" for wrap counter `wrap`.
#[inline(always)]
fn is_avail(flags: u16, wrap: bool) -> bool {
    (flags & VIRTQ_DESC_F_AVAIL != 0) == wrap && (flags & VIRTQ_DESC_F_USED != 0) != wrap
}

/// Whether a descriptor's flags say "used" for wrap counter `wrap`.
#[inline(always)]
fn is_used(flags: u16, wrap: bool) -> bool {
    (flags & VIRTQ_DESC_F_AVAIL != 0) == wrap && (flags & VIRTQ_DESC_F_USED != 0) == wrap
}

fn check_size(size: u16) -> Result<(), QueueError> {
    if size == 0 || size > MAX_QUEUE_SIZE {
        return Err(QueueError::InvalidSize {
            format: "packed",
            size,
            accepted: "1..=32768",
        });
    }
    Ok(())
}

/// Translates the three packed ring areas.
/// `device`: for the device side (which decides which areas are written, for access checks).
fn areas(cfg: &QueueConfig, mem: &GuestMemory, device: bool) -> Result<[RingArea; 3], QueueError> {
    check_size(cfg.size)?;
    let (d, a, u) = ring_sizes(cfg.size, true, cfg.event_idx());
    let uva = cfg.addr_kind == AddrKind::Uva;
    Ok([
        mem.ring_area("descriptor ring", cfg.desc, d, uva, true, 16)?,
        mem.ring_area("driver area", cfg.avail, a, uva, !device, 4)?,
        mem.ring_area("device area", cfg.used, u, uva, true, 4)?,
    ])
}

// =============================================================================================
// Device side
// =============================================================================================

/// The device side of a packed virtqueue.
pub struct PackedDevice {
    desc: RingArea,
    driver: RingArea,
    device: RingArea,
    size: u16,
    event_idx: bool,
    indirect: bool,
    avail: Pos,
    used: Pos,
    /// The first used descriptor of the staged burst: (slot, flags to publish), and the used
    /// position before the burst.
    batch: Option<(u16, u16, Pos)>,
    /// Used descriptors staged since the last flush: (slot, id, len, flags). Written to the ring
    /// in one pass at publish time, not while the burst's packets are being copied (the driver
    /// polls those lines; writing them one by one bounces them between the cores).
    shadow: Box<[(u16, u16, u32, u16); SHADOW]>,
    shadow_len: usize,
    /// Bit i: staged descriptor i was used completely (every writable byte written).
    shadow_full: u64,
    /// IN_ORDER negotiated and batching asked for: see [`PackedDevice::set_used_batching`].
    batch_used: bool,
    /// Whether part of the current batch was already written (its head's flags excepted).
    batch_flushed: bool,
    broken: bool,
    features: u64,
    /// GPA of the descriptor ring, for dirty logging (None if it could not be derived).
    desc_gpa: Option<u64>,
    log: Option<(DirtyLog, u64)>,
}

/// Used descriptors staged locally before they are written to the ring.
const SHADOW: usize = 64;

impl std::fmt::Debug for PackedDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PackedDevice")
            .field("size", &self.size)
            .field("avail", &self.avail)
            .field("used", &self.used)
            .field("broken", &self.broken)
            .finish()
    }
}

impl PackedDevice {
    /// Sets up the device side: checks the size (1..=32768) and translates the descriptor ring
    /// (16 × size bytes, align 16), driver area and device area (4 bytes each, align 4), each of
    /// which must lie in one region. Both wrap counters start at 1, positions at 0.
    pub fn new(cfg: &QueueConfig, mem: &GuestMemory) -> Result<PackedDevice, QueueError> {
        let [desc, driver, device] = areas(cfg, mem, true)?;
        let desc_gpa = match cfg.addr_kind {
            AddrKind::Gpa => Some(cfg.desc),
            AddrKind::Uva => mem.uva_to_gpa(cfg.desc),
        };
        Ok(PackedDevice {
            desc,
            driver,
            device,
            size: cfg.size,
            event_idx: cfg.features & VIRTIO_F_RING_EVENT_IDX != 0,
            indirect: cfg.features & VIRTIO_F_RING_INDIRECT_DESC != 0,
            avail: Pos::START,
            used: Pos::START,
            batch: None,
            shadow: Box::new([(0, 0, 0, 0); SHADOW]),
            shadow_len: 0,
            shadow_full: 0,
            batch_used: false,
            batch_flushed: false,
            broken: false,
            features: cfg.features,
            desc_gpa,
            log: None,
        })
    }

    /// With IN_ORDER negotiated (otherwise this does nothing): `true` returns each run of
    /// completely used chains (all writable bytes written; read-only chains always are) with a
    /// single used descriptor at the run's first slot carrying the buffer id of the run's last
    /// chain (virtio 1.x §2.8.20, in-order use of descriptors). Off by default.
    pub fn set_used_batching(&mut self, on: bool) {
        self.batch_used = on && self.features & VIRTIO_F_IN_ORDER != 0;
    }

    /// Queue size.
    #[inline]
    pub fn size(&self) -> u16 {
        self.size
    }

    /// Negotiated features.
    #[inline]
    pub fn features(&self) -> u64 {
        self.features
    }

    /// Restores the position (vhost `SET_VRING_BASE`): bits 0..15 the next slot to pop, bit 15
    /// its wrap counter. The used position follows the same value. Fails if the slot is not
    /// below the queue size.
    pub fn set_last_avail(&mut self, value: u16) -> Result<(), QueueError> {
        let p = Pos::decode(value);
        if p.idx >= self.size {
            return Err(QueueError::InvalidRingPosition {
                value,
                size: self.size,
            });
        }
        self.avail = p;
        self.used = p;
        self.batch = None;
        self.shadow_len = 0;
        self.shadow_full = 0;
        self.batch_flushed = false;
        Ok(())
    }

    /// The next slot to pop with its wrap counter in bit 15 (vhost `GET_VRING_BASE`).
    #[inline]
    pub fn last_avail(&self) -> u16 {
        self.avail.encode()
    }

    /// The next used slot with its wrap counter in bit 15.
    #[inline]
    pub fn last_used(&self) -> u16 {
        self.used.encode()
    }
    /// How many complete chains are available from the current position (one Acquire load per
    /// descriptor scanned), counting at most 512 ([`MAX_BURST`](crate::MAX_BURST)). A lower
    /// bound: more may become available meanwhile. 0 when the queue is broken.
    pub fn avail_count(&mut self) -> u16 {
        self.avail_up_to(AVAIL_SCAN_MAX)
    }

    /// Like [`PackedDevice::avail_count`] but stops counting at `max` chains: a burst that
    /// wants 32 does not scan (and pull into this core's cache) the whole ring.
    #[inline]
    pub fn avail_up_to(&mut self, max: u16) -> u16 {
        if self.broken || max == 0 {
            return 0;
        }
        let mut p = self.avail;
        let mut chains = 0;
        for _ in 0..self.size {
            let f = self.desc.load_u16_acquire(flags_off(p.idx));
            if !is_avail(f, p.wrap) {
                break;
            }
            if f & VIRTQ_DESC_F_NEXT == 0 {
                chains += 1;
                if chains == max {
                    break;
                }
            }
            p = p.advance(1, self.size);
        }
        chains
    }

    /// Pops the next available chain, writing its buffers into `segs` (device-readable first)
    /// and returning its buffer id, descriptor count and totals; `Ok(None)` when the next
    /// descriptor is not available. Same checks and guarantees as
    /// [`SplitDevice::pop`](super::SplitDevice::pop) (a chain may not be longer than the ring;
    /// in an indirect table entries are sequential and `NEXT` is ignored).
    #[inline(always)]
    pub fn pop(&mut self, mem: &GuestMemory, segs: &mut Segs) -> Result<Option<Chain>, QueueError> {
        if self.broken {
            return Err(QueueError::Broken);
        }
        let head = self.avail;
        let head_flags = self.desc.load_u16_acquire(flags_off(head.idx));
        if !is_avail(head_flags, head.wrap) {
            return Ok(None);
        }
        segs.reset(mem);
        let mut acc = Acc::new(head.idx);
        let limit = u32::from(self.size);
        let mut p = head;
        let mut n: u32 = 0;
        let id = loop {
            if n == limit {
                return Err(QueueError::ChainTooLong {
                    head: head.idx,
                    limit,
                });
            }
            let slot = p.idx;
            let d = self.desc.load_desc(16 * usize::from(slot));
            // Use the flags the availability check saw for the head.
            let flags = if n == 0 { head_flags } else { d.w14 };
            n += 1;
            p = p.advance(1, self.size);
            if flags & VIRTQ_DESC_F_INDIRECT != 0 {
                if !self.indirect {
                    return Err(QueueError::IndirectNotNegotiated { index: slot });
                }
                if flags & VIRTQ_DESC_F_NEXT != 0 {
                    return Err(QueueError::IndirectWithNext { index: slot });
                }
                acc = walk_indirect(acc, mem, segs, d.addr, d.len)?;
                break d.w12;
            }
            acc.add(mem, segs, slot, d.addr, d.len, flags)?;
            if flags & VIRTQ_DESC_F_NEXT == 0 {
                break d.w12;
            }
        };
        self.avail = p;
        Ok(Some(Chain {
            id,
            // `n <= size <= 32768`.
            descs: n as u16,
            readable: acc.readable,
            writable: acc.writable,
        }))
    }

    /// Asks for the cache lines of the next `n` descriptor slots (from the next one `pop`
    /// reads), owned, since the used descriptors overwrite them: a burst's misses on lines the
    /// driver wrote overlap instead of costing a round trip each. A hint: nothing is read.
    #[inline]
    pub fn prefetch_ahead(&self, n: u16) {
        let n = n.min(self.size);
        let start = self.avail.idx;
        let first = n.min(self.size - start);
        self.desc
            .prefetch(16 * usize::from(start), 16 * usize::from(first), true);
        if first < n {
            self.desc.prefetch(0, 16 * usize::from(n - first), true);
        }
    }

    /// Gives back the most recently popped chain: the next `pop` returns it again. Only valid
    /// directly after that pop.
    pub fn rewind(&mut self, chain: &Chain) {
        self.avail = self.avail.back(chain.descs, self.size);
    }

    /// Stages the used descriptor for `chain` (`written` bytes written) at the used position and
    /// skips `chain.descs` slots. The first descriptor of a burst gets its flags only in
    /// [`PackedDevice::publish_used`], so the whole burst stays invisible until then.
    #[inline]
    pub fn push_used(&mut self, chain: &Chain, written: u32) {
        let slot = self.used.idx;
        let flags = if self.used.wrap {
            VIRTQ_DESC_F_AVAIL | VIRTQ_DESC_F_USED
        } else {
            0
        };
        if self.batch.is_none() {
            self.batch = Some((slot, flags, self.used));
        }
        if self.shadow_len == SHADOW {
            self.flush_shadow();
        }
        if self.batch_used && written >= chain.writable {
            self.shadow_full |= 1 << self.shadow_len;
        }
        self.shadow[self.shadow_len] = (slot, chain.id, written, flags);
        self.shadow_len += 1;
        self.used = self.used.advance(chain.descs, self.size);
    }

    /// Writes the staged used descriptors into the ring, all but the batch head's flags (which
    /// publish the batch).
    #[inline]
    fn flush_shadow(&mut self) {
        if self.batch_used {
            return self.flush_shadow_batched();
        }
        for (k, &(slot, id, len, flags)) in self.shadow[..self.shadow_len].iter().enumerate() {
            let off = 16 * usize::from(slot);
            self.desc.store_u32(off + 8, len);
            self.desc.store_u16(off + 12, id);
            if k > 0 || self.batch_flushed {
                self.desc.store_u16(off + 14, flags);
            }
            if let (Some((log, _)), Some(gpa)) = (&self.log, self.desc_gpa) {
                log.mark(gpa.wrapping_add(off as u64), 16);
            }
        }
        self.shadow_len = 0;
        self.batch_flushed = true;
    }

    /// [`PackedDevice::flush_shadow`] with used batching: a completely used chain followed by
    /// another is implied by it; the descriptor ending a run goes to the run's first slot, with
    /// that slot's flags.
    #[inline(never)]
    fn flush_shadow_batched(&mut self) {
        let n = self.shadow_len;
        let mut run: Option<(usize, u16, u16)> = None;
        for (k, &(slot, id, len, flags)) in self.shadow[..n].iter().enumerate() {
            let (k0, slot, flags) = run.unwrap_or((k, slot, flags));
            if k + 1 < n && self.shadow_full & (1 << k) != 0 {
                run = Some((k0, slot, flags));
                continue;
            }
            run = None;
            let off = 16 * usize::from(slot);
            self.desc.store_u32(off + 8, len);
            self.desc.store_u16(off + 12, id);
            if k0 > 0 || self.batch_flushed {
                self.desc.store_u16(off + 14, flags);
            }
            if let (Some((log, _)), Some(gpa)) = (&self.log, self.desc_gpa) {
                log.mark(gpa.wrapping_add(off as u64), 16);
            }
        }
        self.shadow_len = 0;
        self.shadow_full = 0;
        self.batch_flushed = true;
    }

    /// Publishes the staged used descriptors (the first one's flags are written last, with
    /// Release) and returns whether the driver must be notified, per its event suppression
    /// structure. `false` when nothing was staged.
    #[inline]
    pub fn publish_used(&mut self) -> bool {
        let Some((slot, flags, old)) = self.batch.take() else {
            return false;
        };
        self.flush_shadow();
        self.batch_flushed = false;
        self.desc.store_u16_release(flags_off(slot), flags);
        fence(Ordering::SeqCst);
        match self.driver.load_u16(EV_FLAGS) & 3 {
            RING_EVENT_FLAGS_DISABLE => false,
            RING_EVENT_FLAGS_DESC if self.event_idx => {
                event_in(self.driver.load_u16(OFF_WRAP), old, self.used, self.size)
            }
            _ => true,
        }
    }

    /// Tells the driver whether the device wants available-buffer notifications (device area):
    /// DISABLE, or ENABLE — with EVENT_IDX, DESC at the next slot to pop. After enabling, check
    /// [`PackedDevice::avail_count`] again.
    pub fn set_notification(&mut self, enable: bool) {
        if enable && self.event_idx {
            self.device.store_u16(OFF_WRAP, self.avail.encode());
            self.device.store_u16(EV_FLAGS, RING_EVENT_FLAGS_DESC);
        } else if enable {
            self.device.store_u16(EV_FLAGS, RING_EVENT_FLAGS_ENABLE);
        } else {
            self.device.store_u16(EV_FLAGS, RING_EVENT_FLAGS_DISABLE);
        }
        if let Some((log, gpa)) = &self.log {
            log.mark(*gpa, 4);
        }
        fence(Ordering::SeqCst);
    }

    /// Turns dirty logging on (`Some((log, device area GPA))`, vhost-user's `log_guest_addr`) or
    /// off. While on, every used descriptor written (in the descriptor ring, whose GPA comes from
    /// the queue configuration) and the device area are marked; marking the buffers written is
    /// the caller's job ([`Segs::log_written`]).
    pub fn set_log(&mut self, log: Option<(DirtyLog, u64)>) {
        self.log = log;
    }

    /// Whether the owner marked the queue broken.
    #[inline]
    pub fn is_broken(&self) -> bool {
        self.broken
    }

    /// Marks the queue broken: `pop` fails with [`QueueError::Broken`], `avail_count` is 0.
    pub fn set_broken(&mut self) {
        self.broken = true;
    }
}

/// Walks a packed indirect table (entries in order, `NEXT` ignored).
#[inline(never)]
fn walk_indirect(
    mut acc: Acc,
    mem: &GuestMemory,
    segs: &mut Segs,
    addr: u64,
    len: u32,
) -> Result<Acc, QueueError> {
    let (count, table) = indirect_table(mem, addr, len)?;
    for i in 0..count {
        // `count <= 32768`.
        let i = i as u16;
        let e = table.load_desc(16 * usize::from(i));
        let flags = e.w14;
        if flags & VIRTQ_DESC_F_INDIRECT != 0 {
            return Err(QueueError::NestedIndirect { index: i });
        }
        acc.add(mem, segs, i, e.addr, e.len, flags)?;
    }
    Ok(acc)
}

// =============================================================================================
// Driver side
// =============================================================================================

/// The driver side of a packed virtqueue: buffer ids from a free stack, ring slots tracked with
/// wrap counters.
///
/// With `VIRTIO_F_IN_ORDER` negotiated, one used descriptor may complete a batch: written at the
/// batch's first slot, it carries the buffer id of the batch's last chain, every chain made
/// available before that one is implied used, and the next used descriptor follows the whole
/// batch. The driver keeps the ids in the order it made them available to resolve this;
/// [`PackedDriver::reap`] still returns the chains one by one, in order, an implied chain with
/// its whole writable length.
pub struct PackedDriver {
    desc: RingArea,
    driver: RingArea,
    device: RingArea,
    size: u16,
    event_idx: bool,
    indirect: bool,
    interrupts: bool,
    avail: Pos,
    used: Pos,
    num_free: u16,
    free_ids: Box<[u16]>,
    n_free_ids: usize,
    /// Per id: descriptors in flight (0 = free).
    id_descs: Box<[u16]>,
    /// First descriptor of the staged burst: (slot, flags to publish, position before it).
    batch: Option<(u16, u16, Pos)>,
    /// IN_ORDER negotiated.
    in_order: bool,
    /// IN_ORDER: ids in flight in the order they were made available (a ring of `size`):
    /// the oldest at `order_head`, `order_len` in all, of which the first `order_pub` are
    /// published (the device can only name those).
    order: Box<[u16]>,
    order_head: u16,
    order_len: u16,
    order_pub: u16,
    /// IN_ORDER: per id, the chain's device-writable bytes (the length of an implied chain).
    writable: Box<[u32]>,
    /// IN_ORDER: chains of the current batch still to return, and the batch entry's length.
    batch_left: u16,
    batch_len: u32,
    /// IN_ORDER: chains completed by a later chain's used descriptor (none of their own).
    implied: u64,
}

impl std::fmt::Debug for PackedDriver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PackedDriver")
            .field("size", &self.size)
            .field("num_free", &self.num_free)
            .field("avail", &self.avail)
            .field("used", &self.used)
            .finish()
    }
}

impl PackedDriver {
    /// Sets up the driver side over rings at `cfg`'s addresses (same checks as
    /// [`PackedDevice::new`]) and zeroes the three areas. Interrupts start enabled.
    pub fn new(cfg: &QueueConfig, mem: &GuestMemory) -> Result<PackedDriver, QueueError> {
        let [desc, driver, device] = areas(cfg, mem, false)?;
        desc.zero();
        driver.zero();
        device.zero();
        let size = cfg.size;
        Ok(PackedDriver {
            desc,
            driver,
            device,
            size,
            event_idx: cfg.features & VIRTIO_F_RING_EVENT_IDX != 0,
            indirect: cfg.features & VIRTIO_F_RING_INDIRECT_DESC != 0,
            interrupts: true,
            avail: Pos::START,
            used: Pos::START,
            num_free: size,
            // Popped from the end: ids come out 0, 1, 2, ...
            free_ids: (0..size).rev().collect(),
            n_free_ids: usize::from(size),
            id_descs: vec![0; usize::from(size)].into_boxed_slice(),
            batch: None,
            in_order: cfg.features & VIRTIO_F_IN_ORDER != 0,
            order: vec![0; usize::from(size)].into_boxed_slice(),
            order_head: 0,
            order_len: 0,
            order_pub: 0,
            writable: vec![0; usize::from(size)].into_boxed_slice(),
            batch_left: 0,
            batch_len: 0,
            implied: 0,
        })
    }

    /// Chains completed so far by a later chain's used descriptor (IN_ORDER batches), not by
    /// their own.
    #[inline]
    pub fn implied(&self) -> u64 {
        self.implied
    }

    /// Position `k` of the in-order record, from its oldest entry.
    #[inline(always)]
    fn order_slot(&self, k: u16) -> usize {
        let i = u32::from(self.order_head) + u32::from(k);
        let s = u32::from(self.size);
        (if i >= s { i - s } else { i }) as usize
    }

    /// IN_ORDER: records a chain made available (there are at most `size` ids in flight) with
    /// its device-writable bytes.
    #[inline(always)]
    fn record(&mut self, id: u16, bufs: &[(u64, u32, bool)]) {
        if self.in_order {
            let at = self.order_slot(self.order_len);
            self.order[at] = id;
            self.order_len += 1;
            self.writable[usize::from(id)] = super::split::writable_len(bufs);
        }
    }

    /// Queue size.
    #[inline]
    pub fn size(&self) -> u16 {
        self.size
    }

    /// Free descriptor slots.
    #[inline]
    pub fn free_count(&self) -> u16 {
        self.num_free
    }

    #[inline(always)]
    fn alloc(&mut self, n: usize) -> Result<u16, QueueError> {
        if n == 0 {
            return Err(QueueError::EmptyChain);
        }
        if n > usize::from(self.num_free) || self.n_free_ids == 0 {
            return Err(QueueError::QueueFull {
                needed: n,
                free: usize::from(self.num_free),
            });
        }
        self.n_free_ids -= 1;
        let id = self.free_ids[self.n_free_ids];
        self.num_free -= n as u16;
        self.id_descs[usize::from(id)] = n as u16;
        Ok(id)
    }

    /// Writes one available descriptor at the current position and advances it.
    #[inline(always)]
    fn put(&mut self, addr: u64, len: u32, id: u16, mut flags: u16, first: bool) {
        let slot = self.avail.idx;
        let off = 16 * usize::from(slot);
        flags |= if self.avail.wrap {
            VIRTQ_DESC_F_AVAIL
        } else {
            VIRTQ_DESC_F_USED
        };
        if first && self.batch.is_none() {
            // Its flags are stored last, by `publish_avail`, and publish the whole batch.
            self.desc.store_desc(off, addr, len, id, None);
            self.batch = Some((slot, flags, self.avail));
        } else {
            // Invisible until the batch's first flags are: written in one go.
            self.desc.store_desc(off, addr, len, id, Some(flags));
        }
        self.avail = self.avail.advance(1, self.size);
    }

    /// Posts one chain of `(gpa, len, device_writable)` buffers (device-readable ones first)
    /// and returns its buffer id. Invisible to the device until
    /// [`PackedDriver::publish_avail`].
    #[inline]
    pub fn add(&mut self, bufs: &[(u64, u32, bool)]) -> Result<u16, QueueError> {
        let id = self.alloc(bufs.len())?;
        for (i, &(addr, len, w)) in bufs.iter().enumerate() {
            let mut flags = if w { VIRTQ_DESC_F_WRITE } else { 0 };
            if i + 1 != bufs.len() {
                flags |= VIRTQ_DESC_F_NEXT;
            }
            self.put(addr, len, id, flags, i == 0);
        }
        self.record(id, bufs);
        Ok(id)
    }

    /// Posts one chain through an indirect table the caller provides at `table_gpa`
    /// (16 × `bufs.len()` bytes of guest memory, written here). Needs INDIRECT_DESC.
    pub fn add_indirect(
        &mut self,
        mem: &GuestMemory,
        bufs: &[(u64, u32, bool)],
        table_gpa: u64,
    ) -> Result<u16, QueueError> {
        if !self.indirect || bufs.is_empty() || bufs.len() > MAX_QUEUE_SIZE as usize {
            return Err(QueueError::IndirectUnsupported { len: bufs.len() });
        }
        let mut table = Vec::with_capacity(16 * bufs.len());
        for &(addr, len, w) in bufs {
            let flags = if w { VIRTQ_DESC_F_WRITE } else { 0 };
            table.extend_from_slice(&addr.to_le_bytes());
            table.extend_from_slice(&len.to_le_bytes());
            table.extend_from_slice(&0u16.to_le_bytes());
            table.extend_from_slice(&flags.to_le_bytes());
        }
        mem.write(table_gpa, &table)?;
        let id = self.alloc(1)?;
        self.put(
            table_gpa,
            table.len() as u32,
            id,
            VIRTQ_DESC_F_INDIRECT,
            true,
        );
        self.record(id, bufs);
        Ok(id)
    }

    /// Makes every added chain visible by storing the burst's first descriptor flags with
    /// Release; returns whether the device wants a kick (device area flags: ENABLE → yes,
    /// DISABLE → no, DESC (EVENT_IDX) → if `off_wrap` lies in the published range).
    #[inline]
    pub fn publish_avail(&mut self) -> bool {
        let Some((slot, flags, old)) = self.batch.take() else {
            return false;
        };
        self.order_pub = self.order_len;
        self.desc.store_u16_release(flags_off(slot), flags);
        fence(Ordering::SeqCst);
        match self.device.load_u16(EV_FLAGS) & 3 {
            RING_EVENT_FLAGS_DISABLE => false,
            RING_EVENT_FLAGS_DESC if self.event_idx => {
                event_in(self.device.load_u16(OFF_WRAP), old, self.avail, self.size)
            }
            _ => true,
        }
    }

    /// Takes the next used descriptor: `(id, len)`; `Ok(None)` when there is none. Fails
    /// (without consuming anything) if the device names an id that is not in flight. With
    /// IN_ORDER, see the type's documentation.
    #[inline(always)]
    pub fn reap(&mut self) -> Result<Option<(u16, u32)>, QueueError> {
        if self.in_order {
            return self.reap_in_order();
        }
        let off = 16 * usize::from(self.used.idx);
        let flags = self.desc.load_u16_acquire(off + 14);
        if !is_used(flags, self.used.wrap) {
            return Ok(None);
        }
        let len = self.desc.load_u32(off + 8);
        let id = self.desc.load_u16(off + 12);
        if id >= self.size || self.id_descs[usize::from(id)] == 0 {
            return Err(QueueError::BadUsedId {
                id: u32::from(id),
                size: self.size,
            });
        }
        let n = self.id_descs[usize::from(id)];
        self.id_descs[usize::from(id)] = 0;
        self.free_ids[self.n_free_ids] = id;
        self.n_free_ids += 1;
        self.num_free += n;
        self.used = self.used.advance(n, self.size);
        if self.event_idx && self.interrupts {
            self.driver.store_u16(OFF_WRAP, self.used.encode());
        }
        Ok(Some((id, len)))
    }

    /// IN_ORDER reaping: a used descriptor at the used position names the last chain of a
    /// batch; the chains made available before it are returned first (with their writable
    /// length), then the named one (with the descriptor's length).
    #[inline(always)]
    fn reap_in_order(&mut self) -> Result<Option<(u16, u32)>, QueueError> {
        if self.batch_left == 0 {
            let off = 16 * usize::from(self.used.idx);
            let flags = self.desc.load_u16_acquire(off + 14);
            if !is_used(flags, self.used.wrap) {
                return Ok(None);
            }
            let len = self.desc.load_u32(off + 8);
            let id = self.desc.load_u16(off + 12);
            // Usually the oldest chain (one used descriptor per chain).
            let batch = if self.order_pub > 0 && self.order[usize::from(self.order_head)] == id {
                Some(1)
            } else {
                self.batch_of(id)
            };
            let Some(batch) = batch else {
                return Err(QueueError::BadUsedId {
                    id: u32::from(id),
                    size: self.size,
                });
            };
            self.batch_left = batch;
            self.batch_len = len;
        }
        let id = self.order[usize::from(self.order_head)];
        self.order_head = self.order_slot(1) as u16;
        self.order_len -= 1;
        self.order_pub -= 1;
        let n = self.id_descs[usize::from(id)];
        self.id_descs[usize::from(id)] = 0;
        self.free_ids[self.n_free_ids] = id;
        self.n_free_ids += 1;
        self.num_free += n;
        self.used = self.used.advance(n, self.size);
        self.batch_left -= 1;
        let len = if self.batch_left == 0 {
            self.batch_len
        } else {
            self.implied += 1;
            self.writable[usize::from(id)]
        };
        if self.event_idx && self.interrupts {
            self.driver.store_u16(OFF_WRAP, self.used.encode());
        }
        Ok(Some((id, len)))
    }

    /// IN_ORDER: the size of the batch a used descriptor naming `id` completes (its position
    /// among the published ids in flight, plus one), if it names one of them.
    #[inline(never)]
    fn batch_of(&self, id: u16) -> Option<u16> {
        (0..self.order_pub)
            .find(|&k| self.order[self.order_slot(k)] == id)
            .map(|k| k + 1)
    }

    /// Tells the device whether the driver wants used-buffer notifications (driver area):
    /// DISABLE, or ENABLE — with EVENT_IDX, DESC at the next used slot (and `reap` keeps it
    /// there).
    pub fn set_interrupts(&mut self, enable: bool) {
        self.interrupts = enable;
        if enable && self.event_idx {
            self.driver.store_u16(OFF_WRAP, self.used.encode());
            self.driver.store_u16(EV_FLAGS, RING_EVENT_FLAGS_DESC);
        } else if enable {
            self.driver.store_u16(EV_FLAGS, RING_EVENT_FLAGS_ENABLE);
        } else {
            self.driver.store_u16(EV_FLAGS, RING_EVENT_FLAGS_DISABLE);
        }
        fence(Ordering::SeqCst);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn positions_advance_and_go_back_across_laps() {
        for size in [1u16, 3, 4, 100, 32768] {
            let mut p = Pos::START;
            let mut linear: u64 = 0;
            for step in [0u16, 1, 2, size, size.saturating_sub(1), 7, size, 1] {
                let step = step.min(size);
                let q = p.advance(step, size);
                linear += u64::from(step);
                assert_eq!(u64::from(q.idx), linear % u64::from(size));
                assert_eq!(q.wrap, (linear / u64::from(size)).is_multiple_of(2));
                assert_eq!(q.back(step, size), p);
                assert_eq!(Pos::decode(q.encode()), q);
                p = q;
            }
            // Beyond one lap in one step (never produced by a valid ring) still works.
            let q = Pos::START.advance(u16::MAX, size);
            let l = u64::from(u16::MAX);
            assert_eq!(u64::from(q.idx), l % u64::from(size));
            assert_eq!(q.wrap, (l / u64::from(size)).is_multiple_of(2));
        }
    }

    #[test]
    fn event_window() {
        let size = 4;
        let at = |idx, wrap| Pos { idx, wrap };
        let ev = |p: Pos| p.encode();
        // [ (3,1), (1,0) ) covers (3,1) and (0,0).
        let (old, new) = (at(3, true), at(1, false));
        assert!(event_in(ev(at(3, true)), old, new, size));
        assert!(event_in(ev(at(0, false)), old, new, size));
        assert!(!event_in(ev(at(1, false)), old, new, size));
        assert!(!event_in(ev(at(2, true)), old, new, size));
        assert!(!event_in(ev(at(0, true)), old, new, size));
        // An empty window contains nothing; a full lap contains every slot of it.
        assert!(!event_in(ev(at(2, true)), at(2, true), at(2, true), size));
        for i in 0..4 {
            let e = Pos::START.advance(2 + i, size);
            assert!(event_in(ev(e), at(2, true), at(2, false), size));
        }
    }

    #[test]
    fn availability_flags() {
        let a = VIRTQ_DESC_F_AVAIL;
        let u = VIRTQ_DESC_F_USED;
        assert!(is_avail(a, true) && !is_avail(a | u, true) && !is_avail(0, true));
        assert!(is_avail(u, false) && !is_avail(0, false) && !is_avail(a | u, false));
        assert!(is_used(a | u, true) && is_used(0, false));
        assert!(!is_used(a, true) && !is_used(u, false));
    }
}

//! Split virtqueues (virtio 1.x §2.7), device and driver side.
//!
//! Layout (all little-endian):
//!
//! ```text
//! descriptor table: size × { addr u64, len u32, flags u16, next u16 }          align 16
//! avail ring:       flags u16, idx u16, ring[size] u16, used_event u16 (EVENT_IDX)  align 2
//! used ring:        flags u16, idx u16, ring[size] { id u32, len u32 },
//!                   avail_event u16 (EVENT_IDX)                                      align 4
//! ```
//!
//! The driver publishes chains by storing `avail.idx` (Release) after writing descriptors and
//! ring entries; the device publishes completions by storing `used.idx` (Release) after writing
//! used elements. Each side stages a whole burst and publishes it with one store.

use std::sync::atomic::{Ordering, fence};

use super::chain::{Acc, indirect_table};
use super::error::QueueError;
use super::features::{
    VIRTIO_F_IN_ORDER, VIRTIO_F_NOTIFY_ON_EMPTY, VIRTIO_F_RING_EVENT_IDX,
    VIRTIO_F_RING_INDIRECT_DESC,
};
use super::log::DirtyLog;
use super::mem::{GuestMemory, RingArea, Segs};
use super::vring::{
    MAX_QUEUE_SIZE, VIRTQ_AVAIL_F_NO_INTERRUPT, VIRTQ_DESC_F_INDIRECT, VIRTQ_DESC_F_NEXT,
    VIRTQ_DESC_F_WRITE, VIRTQ_USED_F_NO_NOTIFY,
};
use super::{AddrKind, Chain, QueueConfig, need_event, ring_sizes};

const IDX: usize = 2;
const RING: usize = 4;
/// Used elements staged locally before they are written to the ring.
const SHADOW: usize = 64;

#[inline(always)]
fn avail_slot(i: u16) -> usize {
    RING + 2 * usize::from(i)
}

#[inline(always)]
fn used_slot(i: u16) -> usize {
    RING + 8 * usize::from(i)
}

fn check_size(size: u16) -> Result<(), QueueError> {
    if size == 0 || size > MAX_QUEUE_SIZE || !size.is_power_of_two() {
        return Err(QueueError::InvalidSize {
            format: "split",
            size,
            accepted: "a power of two in 1..=32768",
        });
    }
    Ok(())
}

/// Translates the three split ring areas.
/// `device`: for the device side (which decides which areas are written, for access checks).
fn areas(cfg: &QueueConfig, mem: &GuestMemory, device: bool) -> Result<[RingArea; 3], QueueError> {
    check_size(cfg.size)?;
    let (d, a, u) = ring_sizes(cfg.size, false, cfg.event_idx());
    let uva = cfg.addr_kind == AddrKind::Uva;
    Ok([
        mem.ring_area("descriptor table", cfg.desc, d, uva, !device, 16)?,
        mem.ring_area("avail ring", cfg.avail, a, uva, !device, 2)?,
        mem.ring_area("used ring", cfg.used, u, uva, true, 4)?,
    ])
}

// =============================================================================================
// Device side
// =============================================================================================

/// The device side of a split virtqueue: pops chains the driver made available, returns them
/// through the used ring.
pub struct SplitDevice {
    desc: RingArea,
    avail: RingArea,
    used: RingArea,
    size: u16,
    mask: u16,
    event_idx: bool,
    indirect: bool,
    notify_on_empty: bool,
    /// Next avail ring position to pop.
    last_avail: u16,
    /// avail.idx as last read.
    avail_cached: u16,
    /// Next used ring position to write (staged, not yet published).
    used_staged: u16,
    /// used.idx as last published.
    used_published: u16,
    /// Used elements staged since the last flush (`id`, `len`), written to the ring in one pass
    /// at publish time: the driver polls the used ring's first line, so writing it element by
    /// element while copying packets would bounce that line between the cores once per packet.
    shadow: Box<[(u32, u32); SHADOW]>,
    shadow_len: usize,
    /// Bit i: staged element i was used completely (every writable byte written).
    shadow_full: u64,
    /// IN_ORDER negotiated and batching asked for: see [`SplitDevice::set_used_batching`].
    batch_used: bool,
    broken: bool,
    features: u64,
    log: Option<(DirtyLog, u64)>,
}

impl std::fmt::Debug for SplitDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SplitDevice")
            .field("size", &self.size)
            .field("last_avail", &self.last_avail)
            .field("used_staged", &self.used_staged)
            .field("used_published", &self.used_published)
            .field("broken", &self.broken)
            .finish()
    }
}

impl SplitDevice {
    /// Sets up the device side: checks the size (a power of two in 1..=32768) and translates the
    /// descriptor table (16 × size bytes, align 16), avail ring (4 + 2 × size [+ 2 with
    /// EVENT_IDX], align 2) and used ring (4 + 8 × size [+ 2], align 4), each of which must lie
    /// in one region. Ring memory is not touched; positions start at 0.
    pub fn new(cfg: &QueueConfig, mem: &GuestMemory) -> Result<SplitDevice, QueueError> {
        let [desc, avail, used] = areas(cfg, mem, true)?;
        Ok(SplitDevice {
            desc,
            avail,
            used,
            size: cfg.size,
            mask: cfg.size - 1,
            event_idx: cfg.features & VIRTIO_F_RING_EVENT_IDX != 0,
            indirect: cfg.features & VIRTIO_F_RING_INDIRECT_DESC != 0,
            notify_on_empty: cfg.features & VIRTIO_F_NOTIFY_ON_EMPTY != 0,
            last_avail: 0,
            avail_cached: 0,
            used_staged: 0,
            used_published: 0,
            shadow: Box::new([(0, 0); SHADOW]),
            shadow_len: 0,
            shadow_full: 0,
            batch_used: false,
            broken: false,
            features: cfg.features,
            log: None,
        })
    }

    /// With IN_ORDER negotiated (otherwise this does nothing): `true` returns each run of
    /// completely used chains (all writable bytes written; read-only chains always are) with a
    /// single used element, the one of the run's last chain, written at the run's first used
    /// slot (virtio 1.x §2.7.9); `used.idx` still moves by one per chain. Drivers that read
    /// every used element instead of resolving batches cannot use this. Off by default.
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

    /// Restores the position (vhost `SET_VRING_BASE`): the next avail entry to pop, and the used
    /// index (which follows the same value, as after a clean stop). Any value is valid.
    pub fn set_last_avail(&mut self, value: u16) -> Result<(), QueueError> {
        self.last_avail = value;
        self.avail_cached = value;
        self.used_staged = value;
        self.used_published = value;
        self.shadow_len = 0;
        self.shadow_full = 0;
        Ok(())
    }

    /// The next avail entry to pop (vhost `GET_VRING_BASE`).
    #[inline]
    pub fn last_avail(&self) -> u16 {
        self.last_avail
    }

    /// The used index as published so far.
    #[inline]
    pub fn used_idx(&self) -> u16 {
        self.used_published
    }

    /// How many chains the driver has made available beyond what was popped (one Acquire load of
    /// `avail.idx`). A value above the queue size means a broken driver; the next `pop` reports
    /// it. 0 when the queue is broken.
    #[inline]
    pub fn avail_count(&mut self) -> u16 {
        if self.broken {
            return 0;
        }
        self.avail_cached = self.avail.load_u16_acquire(IDX);
        self.avail_cached.wrapping_sub(self.last_avail)
    }

    /// [`SplitDevice::avail_count`], at most `max`.
    #[inline]
    pub fn avail_up_to(&mut self, max: u16) -> u16 {
        self.avail_count().min(max)
    }

    /// Pops the next available chain, writing its buffers into `segs` (device-readable first)
    /// and returning its head index and totals; `Ok(None)` when nothing is available.
    ///
    /// `avail.idx` is re-read (Acquire) only when the entries seen by the last read are used up.
    /// Every descriptor is read once. Errors leave the position unchanged (the same chain fails
    /// again): avail idx more than the queue size ahead, head or `next` out of range, a chain
    /// longer than its table (a loop), indirect misuse (not negotiated, with `NEXT`, nested,
    /// bad table length or address), buffers outside guest memory, a readable buffer after a
    /// writable one, more than [`SEGS_MAX`](super::SEGS_MAX) buffers. The device never reads
    /// outside the translated rings or guest memory, whatever the driver wrote.
    #[inline(always)]
    pub fn pop(&mut self, mem: &GuestMemory, segs: &mut Segs) -> Result<Option<Chain>, QueueError> {
        if self.broken {
            return Err(QueueError::Broken);
        }
        if self.avail_cached == self.last_avail {
            self.avail_cached = self.avail.load_u16_acquire(IDX);
            if self.avail_cached == self.last_avail {
                return Ok(None);
            }
        }
        let ahead = self.avail_cached.wrapping_sub(self.last_avail);
        if ahead > self.size {
            return Err(QueueError::AvailIdxJump {
                avail_idx: self.avail_cached,
                last_avail: self.last_avail,
                ahead,
                size: self.size,
            });
        }
        let slot = self.last_avail & self.mask;
        let head = self.avail.load_u16(avail_slot(slot));
        if head >= self.size {
            return Err(QueueError::HeadOutOfRange {
                slot,
                head,
                size: self.size,
            });
        }
        let chain = self.walk(head, mem, segs)?;
        self.last_avail = self.last_avail.wrapping_add(1);
        Ok(Some(chain))
    }

    #[inline(always)]
    fn walk(&self, head: u16, mem: &GuestMemory, segs: &mut Segs) -> Result<Chain, QueueError> {
        segs.reset(mem);
        let mut acc = Acc::new(head);
        let limit = u32::from(self.size);
        let mut idx = head;
        let mut n: u32 = 0;
        loop {
            if n == limit {
                return Err(QueueError::ChainTooLong { head, limit });
            }
            n += 1;
            let d = self.desc.load_desc(16 * usize::from(idx));
            let (flags, next) = (d.w12, d.w14);
            if flags & VIRTQ_DESC_F_INDIRECT != 0 {
                if !self.indirect {
                    return Err(QueueError::IndirectNotNegotiated { index: idx });
                }
                if flags & VIRTQ_DESC_F_NEXT != 0 {
                    return Err(QueueError::IndirectWithNext { index: idx });
                }
                acc = walk_indirect(acc, mem, segs, d.addr, d.len)?;
                break;
            }
            acc.add(mem, segs, idx, d.addr, d.len, flags)?;
            if flags & VIRTQ_DESC_F_NEXT == 0 {
                break;
            }
            if next >= self.size {
                return Err(QueueError::NextOutOfRange {
                    index: idx,
                    next,
                    limit,
                });
            }
            idx = next;
        }
        Ok(Chain {
            id: head,
            // `n <= size <= 32768`.
            descs: n as u16,
            readable: acc.readable,
            writable: acc.writable,
        })
    }

    /// Asks for the cache lines `pop` reads for the next `n` chains: the avail entries, and the
    /// head descriptors of those already published (their entries are read here, with the
    /// same checks as `pop`'s; a bad head is simply not fetched). Only the fetching depends on
    /// what is read: the entries' misses overlap, then the descriptors' do.
    #[inline]
    pub fn prefetch_ahead(&mut self, n: u16) {
        let ahead = if self.avail_cached != self.last_avail {
            self.avail_cached.wrapping_sub(self.last_avail)
        } else {
            self.avail_count()
        };
        let ready = ahead.min(n);
        if ready == 0 || ahead > self.size || self.broken {
            self.prefetch_entries(n);
            return;
        }
        for k in 0..ready {
            let slot = self.last_avail.wrapping_add(k) & self.mask;
            let head = self.avail.load_u16(avail_slot(slot));
            if head < self.size {
                self.desc.prefetch(16 * usize::from(head), 16, false);
            }
        }
    }

    /// Asks for the cache lines of the next `n` avail ring entries. A hint: nothing is read.
    #[inline]
    fn prefetch_entries(&self, n: u16) {
        let n = n.min(self.size);
        let slot = self.last_avail & self.mask;
        let first = n.min(self.size - slot);
        self.avail
            .prefetch(avail_slot(slot), 2 * usize::from(first), false);
        if first < n {
            self.avail
                .prefetch(avail_slot(0), 2 * usize::from(n - first), false);
        }
    }

    /// Gives back the most recently popped chain: the next `pop` returns it again. Only valid
    /// directly after that pop (no other pop in between).
    #[inline]
    pub fn rewind(&mut self, _chain: &Chain) {
        self.last_avail = self.last_avail.wrapping_sub(1);
    }

    /// Stages the used element for `chain` (`written` bytes written into its writable buffers).
    /// Invisible to the driver until [`SplitDevice::publish_used`].
    #[inline]
    pub fn push_used(&mut self, chain: &Chain, written: u32) {
        if self.shadow_len == SHADOW {
            self.flush_shadow();
        }
        if self.batch_used && written >= chain.writable {
            self.shadow_full |= 1 << self.shadow_len;
        }
        self.shadow[self.shadow_len] = (u32::from(chain.id), written);
        self.shadow_len += 1;
        self.used_staged = self.used_staged.wrapping_add(1);
    }

    /// Writes the staged used elements into the ring (not yet published).
    #[inline]
    fn flush_shadow(&mut self) {
        if self.batch_used {
            return self.flush_shadow_batched();
        }
        let n = self.shadow_len;
        let first = self.used_staged.wrapping_sub(n as u16);
        for (i, &(id, len)) in self.shadow[..n].iter().enumerate() {
            let off = used_slot(first.wrapping_add(i as u16) & self.mask);
            self.used.store_u32(off, id);
            self.used.store_u32(off + 4, len);
            if let Some((log, gpa)) = &self.log {
                log.mark(gpa.wrapping_add(off as u64), 8);
            }
        }
        self.shadow_len = 0;
    }

    /// [`SplitDevice::flush_shadow`] with used batching: a completely used element followed by
    /// another is implied by it and not written; the element ending a run goes to the run's
    /// first slot.
    #[inline(never)]
    fn flush_shadow_batched(&mut self) {
        let n = self.shadow_len;
        let first = self.used_staged.wrapping_sub(n as u16);
        let mut run_start = first;
        for (i, &(id, len)) in self.shadow[..n].iter().enumerate() {
            if i + 1 < n && self.shadow_full & (1 << i) != 0 {
                continue;
            }
            let off = used_slot(run_start & self.mask);
            self.used.store_u32(off, id);
            self.used.store_u32(off + 4, len);
            if let Some((log, gpa)) = &self.log {
                log.mark(gpa.wrapping_add(off as u64), 8);
            }
            run_start = first.wrapping_add(i as u16 + 1);
        }
        self.shadow_len = 0;
        self.shadow_full = 0;
    }

    /// Publishes every staged used element with one Release store of `used.idx` and returns
    /// whether the driver must be notified: with EVENT_IDX when `used_event` lies in the
    /// published range; otherwise unless the driver set `VIRTQ_AVAIL_F_NO_INTERRUPT` (or always
    /// when NOTIFY_ON_EMPTY was negotiated and the device has consumed everything). `false` when
    /// nothing was staged.
    #[inline]
    pub fn publish_used(&mut self) -> bool {
        let (old, new) = (self.used_published, self.used_staged);
        if old == new {
            return false;
        }
        self.flush_shadow();
        self.used.store_u16_release(IDX, new);
        self.used_published = new;
        if let Some((log, gpa)) = &self.log {
            log.mark(gpa.wrapping_add(IDX as u64), 2);
        }
        // The used idx store must be visible before we read the driver's suppression state,
        // or a driver that just re-enabled interrupts could miss this batch.
        fence(Ordering::SeqCst);
        if self.event_idx {
            let event = self.avail.load_u16(avail_slot(self.size));
            need_event(event, new, old)
        } else {
            if self.notify_on_empty && self.avail.load_u16_acquire(IDX) == self.last_avail {
                return true;
            }
            self.avail.load_u16(0) & VIRTQ_AVAIL_F_NO_INTERRUPT == 0
        }
    }

    /// Tells the driver whether the device wants available-buffer notifications. Without
    /// EVENT_IDX this sets or clears `VIRTQ_USED_F_NO_NOTIFY`; with it, enabling sets
    /// `avail_event` to the next entry to pop (a kick comes when the driver makes it available)
    /// and disabling sets it one behind (no kick until the index wraps). After enabling, check
    /// [`SplitDevice::avail_count`] again: entries made available just before were not kicked.
    pub fn set_notification(&mut self, enable: bool) {
        let (off, v) = if self.event_idx {
            let ev = if enable {
                self.last_avail
            } else {
                self.last_avail.wrapping_sub(1)
            };
            (used_slot(self.size), ev)
        } else {
            (0, if enable { 0 } else { VIRTQ_USED_F_NO_NOTIFY })
        };
        self.used.store_u16(off, v);
        if let Some((log, gpa)) = &self.log {
            log.mark(gpa.wrapping_add(off as u64), 2);
        }
        fence(Ordering::SeqCst);
    }

    /// Turns dirty logging on (`Some((log, used ring GPA))`) or off. While on, every used ring
    /// byte the device writes (elements, `used.idx`, flags / `avail_event`) is marked; marking
    /// the buffers written is the caller's job ([`Segs::log_written`]).
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

/// Total device-writable bytes of a chain's buffers.
#[inline(always)]
pub(super) fn writable_len(bufs: &[(u64, u32, bool)]) -> u32 {
    bufs.iter()
        .filter(|b| b.2)
        .fold(0u32, |a, b| a.saturating_add(b.1))
}

/// Walks a split indirect table (entries linked by `next`, starting at entry 0).
#[inline(never)]
fn walk_indirect(
    mut acc: Acc,
    mem: &GuestMemory,
    segs: &mut Segs,
    addr: u64,
    len: u32,
) -> Result<Acc, QueueError> {
    let (count, table) = indirect_table(mem, addr, len)?;
    let mut i: u16 = 0;
    let mut n: u32 = 0;
    loop {
        if n == count {
            return Err(QueueError::ChainTooLong {
                head: acc.head,
                limit: count,
            });
        }
        n += 1;
        let e = table.load_desc(16 * usize::from(i));
        let (flags, next) = (e.w12, e.w14);
        if flags & VIRTQ_DESC_F_INDIRECT != 0 {
            return Err(QueueError::NestedIndirect { index: i });
        }
        acc.add(mem, segs, i, e.addr, e.len, flags)?;
        if flags & VIRTQ_DESC_F_NEXT == 0 {
            return Ok(acc);
        }
        if u32::from(next) >= count {
            return Err(QueueError::NextOutOfRange {
                index: i,
                next,
                limit: count,
            });
        }
        i = next;
    }
}

// =============================================================================================
// Driver side
// =============================================================================================

/// The driver side of a split virtqueue: posts chains, reaps used entries. Keeps its own shadow
/// of the free descriptor list (never trusts ring memory for it).
///
/// With `VIRTIO_F_IN_ORDER` negotiated, descriptors are handed out sequentially (a chain at
/// table offset x links x + 1, x + 2, ..., as the spec requires of drivers; a chain that would
/// cross the end of the table starts at 0 and the skipped tail returns with it), and one used
/// entry may complete a batch: its id names the batch's last chain, every chain made available
/// before it is implied used, and `used.idx` moves by the batch size. [`SplitDriver::reap`]
/// still returns the chains one by one, in order; an implied chain reports its whole writable
/// length (the spec says such buffers were used completely).
pub struct SplitDriver {
    desc: RingArea,
    avail: RingArea,
    used: RingArea,
    size: u16,
    mask: u16,
    event_idx: bool,
    indirect: bool,
    interrupts: bool,
    free_head: u16,
    num_free: u16,
    /// Free list and chain links, per descriptor.
    next: Box<[u16]>,
    /// Per head in flight: its last descriptor.
    tail: Box<[u16]>,
    /// Per head: descriptors in flight (0 = not a head in flight); with IN_ORDER, including the
    /// table tail skipped to place the chain at 0.
    in_flight: Box<[u16]>,
    avail_idx: u16,
    avail_published: u16,
    last_used: u16,
    used_cached: u16,
    /// IN_ORDER negotiated.
    in_order: bool,
    /// IN_ORDER: the next descriptor to hand out.
    seq_next: u16,
    /// IN_ORDER: per avail ring slot, the head posted there (our record, not ring memory).
    heads: Box<[u16]>,
    /// IN_ORDER: per head, the chain's device-writable bytes (the length of an implied chain).
    writable: Box<[u32]>,
    /// IN_ORDER: chains of the current batch still to return, and the batch entry's length.
    batch_left: u16,
    batch_len: u32,
    /// IN_ORDER: chains completed by a later chain's used entry (no entry of their own).
    implied: u64,
}

impl std::fmt::Debug for SplitDriver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SplitDriver")
            .field("size", &self.size)
            .field("num_free", &self.num_free)
            .field("avail_idx", &self.avail_idx)
            .field("last_used", &self.last_used)
            .finish()
    }
}

impl SplitDriver {
    /// Sets up the driver side over rings at `cfg`'s addresses (same checks as
    /// [`SplitDevice::new`]) and zeroes the three ring areas. Interrupts start enabled.
    pub fn new(cfg: &QueueConfig, mem: &GuestMemory) -> Result<SplitDriver, QueueError> {
        let [desc, avail, used] = areas(cfg, mem, false)?;
        desc.zero();
        avail.zero();
        used.zero();
        let size = cfg.size;
        Ok(SplitDriver {
            desc,
            avail,
            used,
            size,
            mask: size - 1,
            event_idx: cfg.features & VIRTIO_F_RING_EVENT_IDX != 0,
            indirect: cfg.features & VIRTIO_F_RING_INDIRECT_DESC != 0,
            interrupts: true,
            free_head: 0,
            num_free: size,
            next: (1..=size).collect(),
            tail: vec![0; usize::from(size)].into_boxed_slice(),
            in_flight: vec![0; usize::from(size)].into_boxed_slice(),
            avail_idx: 0,
            avail_published: 0,
            last_used: 0,
            used_cached: 0,
            in_order: cfg.features & VIRTIO_F_IN_ORDER != 0,
            seq_next: 0,
            heads: vec![0; usize::from(size)].into_boxed_slice(),
            writable: vec![0; usize::from(size)].into_boxed_slice(),
            batch_left: 0,
            batch_len: 0,
            implied: 0,
        })
    }

    /// Chains completed so far by a later chain's used entry (IN_ORDER batches), not by their
    /// own.
    #[inline]
    pub fn implied(&self) -> u64 {
        self.implied
    }

    /// Queue size.
    #[inline]
    pub fn size(&self) -> u16 {
        self.size
    }

    /// Free descriptors.
    #[inline]
    pub fn free_count(&self) -> u16 {
        self.num_free
    }

    /// Takes `n` descriptors off the free list; returns (head, tail).
    #[inline(always)]
    fn alloc(&mut self, n: usize) -> Result<(u16, u16), QueueError> {
        if n == 0 {
            return Err(QueueError::EmptyChain);
        }
        if n > usize::from(self.num_free) {
            return Err(QueueError::QueueFull {
                needed: n,
                free: usize::from(self.num_free),
            });
        }
        if self.in_order {
            return self.alloc_seq(n);
        }
        let head = self.free_head;
        let mut tail = head;
        for _ in 1..n {
            tail = self.next[usize::from(tail)];
        }
        self.free_head = self.next[usize::from(tail)];
        self.num_free -= n as u16;
        self.tail[usize::from(head)] = tail;
        self.in_flight[usize::from(head)] = n as u16;
        Ok((head, tail))
    }

    /// IN_ORDER allocation: `n` descriptors from `seq_next` on, or from 0 when the chain would
    /// cross the end of the table (the skipped tail is charged to the chain). Completions come
    /// back in order, so the free descriptors are always the ones from `seq_next` on.
    #[inline(always)]
    fn alloc_seq(&mut self, n: usize) -> Result<(u16, u16), QueueError> {
        let size = usize::from(self.size);
        let start = usize::from(self.seq_next);
        let skip = if start + n > size { size - start } else { 0 };
        if n + skip > usize::from(self.num_free) {
            return Err(QueueError::QueueFull {
                needed: n + skip,
                free: usize::from(self.num_free),
            });
        }
        let head = if skip > 0 { 0 } else { start };
        // `n <= num_free <= size`, so head + n <= size.
        self.seq_next = ((head + n) & usize::from(self.mask)) as u16;
        self.num_free -= (n + skip) as u16;
        let (head, tail) = (head as u16, (head + n - 1) as u16);
        self.tail[usize::from(head)] = tail;
        self.in_flight[usize::from(head)] = (n + skip) as u16;
        Ok((head, tail))
    }

    /// The descriptor after `idx` in a chain being written.
    #[inline(always)]
    fn link(&self, idx: u16) -> u16 {
        if self.in_order {
            idx.wrapping_add(1)
        } else {
            self.next[usize::from(idx)]
        }
    }

    #[inline(always)]
    fn write_desc(&self, idx: u16, addr: u64, len: u32, flags: u16, next: u16) {
        // Split descriptors are read only once their head is in the available ring.
        self.desc
            .store_desc(16 * usize::from(idx), addr, len, flags, Some(next));
    }

    #[inline(always)]
    fn stage_avail(&mut self, head: u16, bufs: &[(u64, u32, bool)]) {
        let slot = self.avail_idx & self.mask;
        // Only the driver writes the ring: an entry that already holds `head` (the usual case
        // once the ring has gone round with in-order or one-descriptor chains) is left alone,
        // so the device's cached copy of the line stays valid.
        if self.avail.load_u16(avail_slot(slot)) != head {
            self.avail.store_u16(avail_slot(slot), head);
        }
        if self.in_order {
            self.heads[usize::from(slot)] = head;
            self.writable[usize::from(head)] = writable_len(bufs);
        }
        self.avail_idx = self.avail_idx.wrapping_add(1);
    }

    /// Posts one chain of `(gpa, len, device_writable)` buffers (device-readable ones must come
    /// first) with direct descriptors and returns its id (the head index). Invisible to the
    /// device until [`SplitDriver::publish_avail`].
    #[inline]
    pub fn add(&mut self, bufs: &[(u64, u32, bool)]) -> Result<u16, QueueError> {
        let (head, _) = self.alloc(bufs.len())?;
        let mut idx = head;
        for (i, &(addr, len, w)) in bufs.iter().enumerate() {
            let last = i + 1 == bufs.len();
            let mut flags = if w { VIRTQ_DESC_F_WRITE } else { 0 };
            if last {
                self.write_desc(idx, addr, len, flags, 0);
                break;
            }
            let next = self.link(idx);
            flags |= VIRTQ_DESC_F_NEXT;
            self.write_desc(idx, addr, len, flags, next);
            idx = next;
        }
        self.stage_avail(head, bufs);
        Ok(head)
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
        for (i, &(addr, len, w)) in bufs.iter().enumerate() {
            let last = i + 1 == bufs.len();
            let mut flags = if w { VIRTQ_DESC_F_WRITE } else { 0 };
            if !last {
                flags |= VIRTQ_DESC_F_NEXT;
            }
            let next = if last { 0 } else { i as u16 + 1 };
            table.extend_from_slice(&addr.to_le_bytes());
            table.extend_from_slice(&len.to_le_bytes());
            table.extend_from_slice(&flags.to_le_bytes());
            table.extend_from_slice(&next.to_le_bytes());
        }
        mem.write(table_gpa, &table)?;
        let (head, _) = self.alloc(1)?;
        self.write_desc(
            head,
            table_gpa,
            table.len() as u32,
            VIRTQ_DESC_F_INDIRECT,
            0,
        );
        self.stage_avail(head, bufs);
        Ok(head)
    }

    /// Makes every added chain visible with one Release store of `avail.idx`; returns whether the
    /// device wants a kick (EVENT_IDX: `avail_event` in the published range; otherwise unless
    /// `VIRTQ_USED_F_NO_NOTIFY` is set). `false` when nothing was added.
    #[inline]
    pub fn publish_avail(&mut self) -> bool {
        let (old, new) = (self.avail_published, self.avail_idx);
        if old == new {
            return false;
        }
        self.avail.store_u16_release(IDX, new);
        self.avail_published = new;
        fence(Ordering::SeqCst);
        if self.event_idx {
            need_event(self.used.load_u16(used_slot(self.size)), new, old)
        } else {
            self.used.load_u16(0) & VIRTQ_USED_F_NO_NOTIFY == 0
        }
    }

    /// Takes the next used entry: `(id, len)`; `Ok(None)` when there is none. Fails (without
    /// consuming anything) if the device moved `used.idx` more than the queue size ahead or
    /// named an id that is not in flight. With IN_ORDER, see the type's documentation: chains
    /// come back in the order they were made available, implied ones with their writable length.
    #[inline(always)]
    pub fn reap(&mut self) -> Result<Option<(u16, u32)>, QueueError> {
        if self.in_order {
            return self.reap_in_order();
        }
        if self.used_cached == self.last_used {
            let idx = self.used.load_u16_acquire(IDX);
            if idx == self.last_used {
                return Ok(None);
            }
            if idx.wrapping_sub(self.last_used) > self.size {
                return Err(QueueError::UsedIdxJump {
                    used_idx: idx,
                    last_used: self.last_used,
                    size: self.size,
                });
            }
            self.used_cached = idx;
        }
        let off = used_slot(self.last_used & self.mask);
        let id = self.used.load_u32(off);
        let len = self.used.load_u32(off + 4);
        if id >= u32::from(self.size) || self.in_flight[id as usize] == 0 {
            return Err(QueueError::BadUsedId {
                id,
                size: self.size,
            });
        }
        let head = id as u16;
        let n = self.in_flight[usize::from(head)];
        self.in_flight[usize::from(head)] = 0;
        let tail = self.tail[usize::from(head)];
        self.next[usize::from(tail)] = self.free_head;
        self.free_head = head;
        self.num_free += n;
        self.last_used = self.last_used.wrapping_add(1);
        if self.event_idx && self.interrupts {
            self.avail.store_u16(avail_slot(self.size), self.last_used);
        }
        Ok(Some((head, len)))
    }

    /// IN_ORDER reaping: the chain made available at `last_used` is the next to complete. A used
    /// entry there names the last chain of a batch; the chains before it are returned first
    /// (with their writable length), then the named one (with the entry's length).
    #[inline(always)]
    fn reap_in_order(&mut self) -> Result<Option<(u16, u32)>, QueueError> {
        if self.batch_left == 0 {
            if self.used_cached == self.last_used {
                let idx = self.used.load_u16_acquire(IDX);
                if idx == self.last_used {
                    return Ok(None);
                }
                if idx.wrapping_sub(self.last_used) > self.size {
                    return Err(QueueError::UsedIdxJump {
                        used_idx: idx,
                        last_used: self.last_used,
                        size: self.size,
                    });
                }
                self.used_cached = idx;
            }
            let off = used_slot(self.last_used & self.mask);
            let id = self.used.load_u32(off);
            let len = self.used.load_u32(off + 4);
            // Chains the device has seen, oldest first: which one ends the batch? Usually the
            // first (one used entry per chain).
            let published = self.avail_published.wrapping_sub(self.last_used);
            let front = u32::from(self.heads[usize::from(self.last_used & self.mask)]);
            let batch = if published > 0 && front == id {
                Some(1)
            } else {
                self.batch_of(id, published)
            };
            let Some(batch) = batch else {
                return Err(QueueError::BadUsedId {
                    id,
                    size: self.size,
                });
            };
            let moved = self.used_cached.wrapping_sub(self.last_used);
            if batch > moved {
                return Err(QueueError::InOrderBatchBeyondUsedIdx { id, batch, moved });
            }
            self.batch_left = batch;
            self.batch_len = len;
        }
        let head = self.heads[usize::from(self.last_used & self.mask)];
        let n = self.in_flight[usize::from(head)];
        self.in_flight[usize::from(head)] = 0;
        self.num_free += n;
        self.last_used = self.last_used.wrapping_add(1);
        self.batch_left -= 1;
        let len = if self.batch_left == 0 {
            self.batch_len
        } else {
            self.implied += 1;
            self.writable[usize::from(head)]
        };
        if self.event_idx && self.interrupts {
            self.avail.store_u16(avail_slot(self.size), self.last_used);
        }
        Ok(Some((head, len)))
    }

    /// IN_ORDER: the size of the batch a used entry naming `id` completes (its position among the
    /// `published` chains in flight, plus one), if it names one of them.
    #[inline(never)]
    fn batch_of(&self, id: u32, published: u16) -> Option<u16> {
        (0..published)
            .find(|&k| {
                let slot = self.last_used.wrapping_add(k) & self.mask;
                u32::from(self.heads[usize::from(slot)]) == id
            })
            .map(|k| k + 1)
    }

    /// Tells the device whether the driver wants used-buffer notifications. Without EVENT_IDX
    /// this sets or clears `VIRTQ_AVAIL_F_NO_INTERRUPT`; with it, enabling sets `used_event` to
    /// the next used entry (and `reap` keeps it there), disabling sets it one behind.
    pub fn set_interrupts(&mut self, enable: bool) {
        self.interrupts = enable;
        if self.event_idx {
            let ev = if enable {
                self.last_used
            } else {
                self.last_used.wrapping_sub(1)
            };
            self.avail.store_u16(avail_slot(self.size), ev);
        } else {
            let flags = if enable {
                0
            } else {
                VIRTQ_AVAIL_F_NO_INTERRUPT
            };
            self.avail.store_u16(0, flags);
        }
        fence(Ordering::SeqCst);
    }
}

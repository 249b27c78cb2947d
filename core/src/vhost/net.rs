//! The virtio-net software datapath of the vhost-user back end.
//!
//! A [`VqRun`] is one running vring: its device-side queue (split or packed, addresses translated
//! once at build time), the guest memory, the call eventfd and the dirty log. The port's queues
//! run [`VqRun::dequeue`] (guest transmit ring → mbufs) and [`VqRun::enqueue`] (mbufs → guest
//! receive ring) inside the vring's handoff, once per burst. Per burst: one read of the avail
//! index, one used-index publish, at most one guest notification (only when the guest asked for
//! it). Every descriptor address and length was checked by the queue code before use; a malformed
//! chain marks the queue broken and is counted as an error, it never panics.

use std::os::fd::{AsFd, OwnedFd};
use std::sync::Arc;

use super::iotlb::{MissCell, failed_access};
use super::msg::{VRING_F_LOG, VringAddr};
use crate::mbuf::{Burst, Mbuf, offload};
use crate::mempool::MempoolCache;
use crate::port::QueueStats;
use crate::virtio::features as vf;
use crate::virtio::net::{VIRTIO_NET_HDR_F_DATA_VALID, VIRTIO_NET_HDR_F_NEEDS_CSUM, hdr_len};
use crate::virtio::{
    AddrKind, Chain, DeviceQueue, DirtyLog, GuestMemory, QueueConfig, QueueError, Segs, Staged,
    VirtioNetHdr,
};

pub use crate::virtio::DirtyLog as LogArea;

/// Most receive chains one packet may use with mergeable buffers.
const MAX_MRG_CHAINS: usize = 64;
/// Packets the receive fast path pops before copying (see [`VqRun::enqueue`]).
const STAGE: usize = 64;

/// Longest guest frame the transmit path takes (after the virtio-net header): a 64 KiB
/// HOST_TSO frame with its Ethernet, VLAN and IP/TCP headers. Longer ones are counted as errors.
const MAX_TX_FRAME: usize = 64 * 1024 + 64;
/// The transmit (dequeue) path publishes used entries once this many are staged (at most half
/// the ring), or when a poll finds the ring empty, or when the ring stops. Returning transmit
/// buffers every burst kept the descriptor (packed) and used-ring (split) lines moving between
/// the cores while the driver was filling the neighbouring entries: with DPDK's virtio-user
/// transmitting 64 B packets over a packed ring, 10.6 Mpps per burst against 14.1 batched
/// (`benches/README.md`). The driver sees its buffers back later, never lost: a driver that
/// stops posting gets them at the next empty poll. Packed rings wait for half the ring instead
/// (14.0 → 15.8 Mpps, DPDK 17.5, medians of 4 rounds; split rings showed no gain from more).
const DEQUEUE_PUBLISH: u32 = 64;

/// Everything needed to (re)build a running vring.
#[derive(Debug, Clone)]
pub struct VringSetup {
    /// Vring index.
    pub index: usize,
    /// Ring size.
    pub size: u32,
    /// Addresses from SET_VRING_ADDR (front-end virtual addresses).
    pub addr: VringAddr,
    /// Position (SET_VRING_BASE; packed: bit 15 is the wrap counter).
    pub base: u16,
    /// Negotiated features.
    pub features: u64,
    /// Call eventfd (None: the front end polls).
    pub call: Option<Arc<OwnedFd>>,
    /// Dirty log, when VHOST_F_LOG_ALL is on.
    pub log: Option<Arc<DirtyLog>>,
    /// ACCESS_PLATFORM: where to report a translation the IOTLB lacks (the ring then waits
    /// for it instead of being marked broken).
    pub miss: Option<Arc<MissCell>>,
}

/// One running vring. See the module documentation.
pub struct VqRun {
    q: DeviceQueue,
    mem: GuestMemory,
    segs: Box<Segs>,
    call: Option<Arc<OwnedFd>>,
    log: Option<Arc<DirtyLog>>,
    hdr_len: usize,
    mrg: bool,
    guest_csum: bool,
    guest_tso: bool,
    chains: Box<[Option<(Chain, u32)>; MAX_MRG_CHAINS]>,
    staged: Staged,
    staged_chains: Box<[Chain; STAGE]>,
    /// Dequeue: used entries staged but not yet published.
    pending: u32,
    /// Dequeue: publish once this many used entries are staged (or the ring is found empty).
    defer: u32,
    /// See [`VringSetup::miss`].
    miss: Option<Arc<MissCell>>,
}

impl std::fmt::Debug for VqRun {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VqRun")
            .field("hdr_len", &self.hdr_len)
            .field("mrg", &self.mrg)
            .finish_non_exhaustive()
    }
}

impl VqRun {
    /// Builds a running vring: translates and checks the ring addresses against guest memory.
    pub fn build(s: &VringSetup, mem: &GuestMemory) -> Result<VqRun, QueueError> {
        let cfg = QueueConfig {
            size: s.size as u16,
            desc: s.addr.desc,
            avail: s.addr.avail,
            used: s.addr.used,
            addr_kind: AddrKind::Uva,
            features: s.features,
        };
        let mut q = DeviceQueue::new(&cfg, mem)?;
        q.set_last_avail(s.base)?;
        // The back end polls: ask the driver not to kick.
        q.set_notification(false);
        let log = s.log.clone();
        if let Some(l) = &log
            && s.addr.flags & VRING_F_LOG != 0
        {
            q.set_log(Some(((**l).clone(), s.addr.log)));
        }
        let f = s.features;
        Ok(VqRun {
            q,
            mem: mem.clone(),
            segs: Box::new(Segs::new()),
            call: s.call.clone(),
            log,
            hdr_len: hdr_len(f),
            mrg: f & vf::NET_MRG_RXBUF != 0,
            guest_csum: f & vf::NET_GUEST_CSUM != 0,
            guest_tso: f & (vf::NET_GUEST_TSO4 | vf::NET_GUEST_TSO6) != 0,
            chains: Box::new([None; MAX_MRG_CHAINS]),
            staged: Staged::new(STAGE),
            staged_chains: Box::new([Chain::default(); STAGE]),
            pending: 0,
            miss: s.miss.clone(),
            defer: if f & vf::RING_PACKED != 0 {
                s.size / 2
            } else {
                DEQUEUE_PUBLISH.min(s.size / 2)
            }
            .max(1),
        })
    }

    /// With IN_ORDER negotiated, returns runs of completely used chains with one used entry
    /// (see [`DeviceQueue::set_used_batching`]).
    pub fn set_used_batching(&mut self, on: bool) {
        self.q.set_used_batching(on);
    }

    /// The ring position, for GET_VRING_BASE.
    pub fn last_avail(&self) -> u16 {
        self.q.last_avail()
    }

    /// A chain could not be popped. Behind an IOTLB a buffer outside the view may only lack
    /// its translation: it is reported and the ring waits (the chain stays available and is
    /// popped again on the next view). Anything else marks the ring broken and counts an
    /// error.
    #[cold]
    fn pop_failed(&mut self, e: &QueueError, stats: &QueueStats) {
        if let Some(m) = &self.miss
            && let Some((addr, len, write)) = failed_access(e)
        {
            m.report(addr, len, write);
            return;
        }
        self.q.set_broken();
        stats.add_errors(1);
    }

    #[inline]
    fn publish(&mut self) {
        if self.q.publish_used()
            && let Some(c) = &self.call
        {
            // The guest asked for an interrupt: one eventfd write (the only syscall, and only
            // when the driver did not suppress notifications).
            let _ = nix::unistd::write(c.as_fd(), &1u64.to_ne_bytes());
        }
    }

    /// Guest transmit ring → mbufs appended to `pkts` (at most `pkts.room()`).
    #[inline]
    pub fn dequeue(
        &mut self,
        cache: &mut MempoolCache,
        pkts: &mut Burst,
        stats: &QueueStats,
    ) -> usize {
        if self.q.is_broken() {
            return 0;
        }
        let room = pkts.room().min(usize::from(u16::MAX));
        // Packed rings are not counted ahead: scanning the flags of a burst's descriptors
        // reads lines the driver is still writing; popping stops at the first unavailable one.
        let want = if self.q.is_packed() {
            room
        } else {
            self.q.avail_up_to(room as u16) as usize
        };
        let (mut got, mut used) = self.dequeue_staged(cache, pkts, want);
        while used < want {
            let Some(mut m) = cache.alloc() else { break };
            let chain = match self.q.pop(&self.mem, &mut self.segs) {
                Ok(Some(c)) => c,
                Ok(None) => {
                    cache.free(m);
                    break;
                }
                Err(e) => {
                    cache.free(m);
                    self.pop_failed(&e, stats);
                    break;
                }
            };
            let Some(plen) = self.tx_frame_len(&chain) else {
                // Runt or oversized frame: counted, buffer returned to the guest.
                used += 1;
                stats.add_errors(1);
                cache.free(m);
                self.q.push_used(&chain, 0);
                continue;
            };
            let mut hdr = [0u8; 12];
            self.segs.read(0, &mut hdr[..self.hdr_len]);
            if plen <= m.tailroom() {
                if let Some(dst) = m.append(plen) {
                    self.segs.read(self.hdr_len, dst);
                }
            } else {
                match self.chained_frame(m, plen, cache) {
                    Some(c) => m = c,
                    None => {
                        // Out of mbufs: the frame stays in the ring for the next burst.
                        self.q.rewind(&chain);
                        break;
                    }
                }
            }
            used += 1;
            apply_tx_hdr(&mut m, &hdr[..self.hdr_len]);
            self.q.push_used(&chain, 0);
            let _ = pkts.push(m);
            got += 1;
        }
        self.pending += used as u32;
        if self.pending > 0 && (self.pending >= self.defer || used == 0) {
            self.pending = 0;
            self.publish();
        }
        got
    }

    /// Publishes used entries the dequeue path has staged but not published yet (before the
    /// ring stops).
    pub fn flush_used(&mut self) {
        if self.pending > 0 {
            self.pending = 0;
            self.publish();
        }
    }

    /// Mbufs from the front of `pkts` → guest receive ring. What does not fit (no guest buffers
    /// left) stays in `pkts`; sent mbufs are freed to `cache`. Returns how many were delivered;
    /// packets the guest's buffers cannot hold are dropped and counted.
    #[inline]
    pub fn enqueue(
        &mut self,
        pkts: &mut Burst,
        cache: &mut MempoolCache,
        stats: &QueueStats,
    ) -> usize {
        if self.q.is_broken() {
            return 0;
        }
        let mut consumed = self.enqueue_staged(pkts); // packets taken off the front of `pkts`
        let mut dropped = 0u64;
        'pkts: for m in &pkts.as_slice()[consumed..] {
            let hdr = self.rx_hdr(m);
            let total = self.hdr_len + m.pkt_len();
            let mut n = 0usize; // chains used by this packet
            let mut done = 0usize; // bytes of header + data written
            let mut first_hdr_gpa = None;
            while done < total {
                let chain = match self.q.pop(&self.mem, &mut self.segs) {
                    Ok(Some(c)) => c,
                    Ok(None) => {
                        // Out of guest buffers: give back what this packet took, stop here.
                        self.rewind(n);
                        break 'pkts;
                    }
                    Err(e) => {
                        self.rewind(n);
                        self.pop_failed(&e, stats);
                        break 'pkts;
                    }
                };
                let room = chain.writable as usize;
                if n == 0 && (room < self.hdr_len || (!self.mrg && room < total)) {
                    // A buffer that cannot hold the packet (not mergeable) or even its header:
                    // the packet is dropped and the buffer handed back empty.
                    self.q.push_used(&chain, 0);
                    dropped += 1;
                    consumed += 1;
                    continue 'pkts;
                }
                if n == MAX_MRG_CHAINS {
                    self.q.rewind(&chain);
                    self.rewind(n);
                    dropped += 1;
                    consumed += 1;
                    continue 'pkts;
                }
                if n == 0 {
                    first_hdr_gpa = self
                        .segs
                        .writable()
                        .first()
                        .filter(|s| s.len() as usize >= self.hdr_len)
                        .map(|s| s.gpa());
                }
                let take = (total - done).min(room);
                let mut w = 0usize;
                if done < self.hdr_len {
                    let hend = self.hdr_len.min(done + take);
                    w += self.segs.write(0, &hdr[done..hend]);
                }
                if w < take {
                    let ds = done + w - self.hdr_len;
                    let de = done + take - self.hdr_len;
                    w += write_packet_range(&mut self.segs, w, m, ds, de);
                }
                if let Some(l) = &self.log {
                    self.segs.log_written(l, w as u32);
                }
                self.chains[n] = Some((chain, w as u32));
                n += 1;
                done += w;
            }
            if self.mrg && n > 1 {
                // num_buffers lives in the first chain's header, written before we knew n.
                match first_hdr_gpa {
                    Some(gpa) if self.mem.write(gpa + 10, &(n as u16).to_le_bytes()).is_ok() => {}
                    _ => {
                        self.rewind(n);
                        dropped += 1;
                        consumed += 1;
                        continue 'pkts;
                    }
                }
            }
            for slot in self.chains.iter_mut().take(n) {
                if let Some((c, len)) = slot.take() {
                    self.q.push_used(&c, len);
                }
            }
            consumed += 1;
        }
        if consumed > 0 {
            self.publish();
            stats.add_drops(dropped);
            pkts.drain_front(consumed, |m| cache.free(m));
        }
        consumed - dropped as usize
    }

    /// The transmit fast path: chains whose readable bytes (header and frame) lie in one buffer
    /// (the usual case). Pops up to [`STAGE`] chains with an mbuf for each first, requesting the
    /// buffers' lines, then copies them all (see [`VqRun::enqueue_staged`] for why). Stops at
    /// the first chain that needs the general path (several buffers, runt or oversized frame),
    /// leaving it in the ring; returns (packets appended to `pkts`, chains used), equal here.
    #[inline]
    fn dequeue_staged(
        &mut self,
        cache: &mut MempoolCache,
        pkts: &mut Burst,
        want: usize,
    ) -> (usize, usize) {
        let mut done = 0;
        while done < want {
            let batch = (want - done).min(STAGE);
            self.staged.clear(&self.mem);
            let start = pkts.len();
            let mut fallback = false;
            for _ in 0..batch {
                let Some(m) = cache.alloc() else {
                    fallback = true;
                    break;
                };
                let chain = match self.q.pop(&self.mem, &mut self.segs) {
                    Ok(Some(c)) => c,
                    _ => {
                        cache.free(m);
                        fallback = true;
                        break;
                    }
                };
                if self
                    .tx_frame_len(&chain)
                    .is_none_or(|plen| plen > m.tailroom())
                    || !self
                        .staged
                        .push_first_readable(&self.segs, chain.readable as usize)
                {
                    self.q.rewind(&chain);
                    cache.free(m);
                    fallback = true;
                    break;
                }
                self.staged_chains[self.staged.len() - 1] = chain;
                // Cannot fail: `want` is at most the room `pkts` had.
                if let Err(m) = pkts.push(m) {
                    cache.free(m);
                }
            }
            let n = self.staged.len();
            let hl = self.hdr_len;
            for (i, m) in pkts.as_mut_slice()[start..].iter_mut().enumerate() {
                let mut hdr = [0u8; 12];
                self.staged.read(i, 0, &mut hdr[..hl]);
                let plen = self.staged_chains[i].readable as usize - hl;
                if let Some(dst) = m.append(plen) {
                    self.staged.read(i, hl, dst);
                }
                apply_tx_hdr(m, &hdr[..hl]);
                self.q.push_used(&self.staged_chains[i], 0);
            }
            done += n;
            if fallback || n < batch {
                break;
            }
        }
        (done, done)
    }

    /// The receive fast path: packets whose header and data fit the first writable buffer of
    /// one chain (the usual case: one posted buffer per packet). Pops up to [`STAGE`] chains
    /// first, requesting each destination's lines for writing, then copies them all and stages
    /// their used elements. Reading every descriptor before the first copy lets the cache misses
    /// on the ring overlap, and issuing the stores back to back lets the other core's lines come
    /// over in parallel: interleaving the two costs a round trip between the cores per packet.
    /// Stops at the first packet that needs the general path (which [`VqRun::enqueue`] then
    /// continues with); returns how many packets from the front of `pkts` it delivered.
    #[inline]
    fn enqueue_staged(&mut self, pkts: &Burst) -> usize {
        let all = pkts.as_slice();
        let mut done = 0;
        while done < all.len() {
            let batch = &all[done..all.len().min(done + STAGE)];
            // The guest posted its receive buffers long ago: their descriptor lines are stable,
            // so fetching the batch's lines at once overlaps the misses.
            self.q.prefetch_ahead(batch.len() as u16);
            self.staged.clear(&self.mem);
            let mut fallback = false;
            for m in batch {
                if m.nb_segs() > 1 {
                    // A chain: the general path gathers its segments.
                    fallback = true;
                    break;
                }
                let need = self.hdr_len + m.data().len();
                let chain = match self.q.pop(&self.mem, &mut self.segs) {
                    Ok(Some(c)) => c,
                    _ => {
                        // Empty or malformed: the general path handles (and counts) it.
                        fallback = true;
                        break;
                    }
                };
                if !self.staged.push_first_writable(&self.segs, need) {
                    self.q.rewind(&chain);
                    fallback = true;
                    break;
                }
                self.staged_chains[self.staged.len() - 1] = chain;
            }
            let n = self.staged.len();
            for (i, m) in batch[..n].iter().enumerate() {
                let hdr = self.rx_hdr(m);
                let w = self.staged.write2(i, &hdr[..self.hdr_len], m.data());
                if let Some(l) = &self.log {
                    l.mark(self.staged.gpa(i), w as u64);
                }
                self.q.push_used(&self.staged_chains[i], w as u32);
            }
            done += n;
            if fallback || n < batch.len() {
                break;
            }
        }
        done
    }

    /// Gives the last `n` chains popped for a packet back to the ring, newest first.
    fn rewind(&mut self, n: usize) {
        for i in (0..n).rev() {
            if let Some((c, _)) = self.chains[i].take() {
                self.q.rewind(&c);
            }
        }
    }

    /// The frame length of a guest transmit chain (its readable bytes after the virtio-net
    /// header) if it is a frame `m` can hold: `None` for a runt (no frame after the header) or
    /// one larger than the mbuf's room.
    #[inline(always)]
    fn tx_frame_len(&self, chain: &Chain) -> Option<usize> {
        let plen = (chain.readable as usize).checked_sub(self.hdr_len)?;
        (plen > 0 && plen <= MAX_TX_FRAME).then_some(plen)
    }

    /// A guest frame longer than one mbuf (a HOST_TSO frame of up to 64 KiB, or a jumbo frame):
    /// copied into `m` and as many further mbufs as it needs, chained. Gives back `None` (every
    /// mbuf returned to the cache) when the pool runs dry; the caller leaves the chain in the ring.
    #[cold]
    #[inline(never)]
    fn chained_frame(&self, mut m: Mbuf, plen: usize, cache: &mut MempoolCache) -> Option<Mbuf> {
        let first = m.tailroom().min(plen);
        if let Some(dst) = m.append(first) {
            self.segs.read(self.hdr_len, dst);
        }
        let mut off = first;
        while off < plen {
            let Some(mut t) = cache.alloc() else {
                cache.free(m);
                return None;
            };
            let n = t.tailroom().min(plen - off);
            if n == 0 {
                cache.free(t);
                cache.free(m);
                return None;
            }
            if let Some(dst) = t.append(n) {
                self.segs.read(self.hdr_len + off, dst);
            }
            off += n;
            if let Err(t) = m.chain(t) {
                cache.free(t);
                cache.free(m);
                return None;
            }
        }
        Some(m)
    }

    /// Builds the virtio-net header for a packet going to the guest (its wire bytes; the first
    /// `hdr_len` are written).
    #[inline]
    fn rx_hdr(&self, m: &Mbuf) -> [u8; 12] {
        let v = m.vnet();
        let fl = m.ol_flags();
        let mut h = VirtioNetHdr {
            num_buffers: 1,
            ..VirtioNetHdr::default()
        };
        if self.guest_csum
            && (v.flags & VIRTIO_NET_HDR_F_NEEDS_CSUM != 0 || fl & offload::RX_L4_CKSUM_NONE != 0)
        {
            h.flags = VIRTIO_NET_HDR_F_NEEDS_CSUM;
            h.csum_start = v.csum_start;
            h.csum_offset = v.csum_offset;
        } else if fl & offload::RX_L4_CKSUM_GOOD != 0 {
            h.flags = VIRTIO_NET_HDR_F_DATA_VALID;
        }
        if self.guest_tso && v.gso_type != 0 {
            h.gso_type = v.gso_type;
            h.hdr_len = v.hdr_len;
            h.gso_size = v.gso_size;
        }
        h.to_bytes()
    }
}

/// Writes bytes `from..to` of packet `m` (across its segments) into `segs` at offset `at`;
/// returns how many were written.
#[inline]
fn write_packet_range(segs: &mut Segs, at: usize, m: &Mbuf, from: usize, to: usize) -> usize {
    if m.nb_segs() == 1 {
        return segs.write(at, &m.data()[from..to]);
    }
    let (mut pos, mut w) = (0usize, 0usize);
    for seg in m.segments() {
        let d = seg.data();
        let (lo, hi) = (pos, pos + d.len());
        pos = hi;
        if hi <= from {
            continue;
        }
        if lo >= to {
            break;
        }
        let (a, b) = (from.max(lo) - lo, to.min(hi) - lo);
        let n = segs.write(at + w, &d[a..b]);
        w += n;
        if n < b - a {
            break;
        }
    }
    w
}

/// Takes a guest transmit header (its `hdr_len` wire bytes) into the mbuf's offload metadata.
#[inline]
fn apply_tx_hdr(m: &mut Mbuf, wire: &[u8]) {
    let Some(v) = VirtioNetHdr::from_bytes(wire) else {
        return;
    };
    if v.flags == 0 && v.gso_type == 0 {
        return;
    }
    let mut fl = 0;
    if v.flags & VIRTIO_NET_HDR_F_NEEDS_CSUM != 0 {
        fl |= offload::RX_L4_CKSUM_NONE;
    }
    if v.flags & VIRTIO_NET_HDR_F_DATA_VALID != 0 {
        fl |= offload::RX_L4_CKSUM_GOOD;
    }
    if v.gso_type != 0 {
        fl |= offload::RX_LRO;
    }
    m.set_ol_flags(fl);
    // num_buffers means nothing on a transmitted packet.
    m.set_vnet(VirtioNetHdr {
        num_buffers: 0,
        ..v
    });
}

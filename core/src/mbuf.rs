//! Packet buffers.
//!
//! Every buffer of a [`Mempool`](crate::mempool::Mempool) is one element of a hugepage zone:
//!
//! ```text
//! | MbufHdr (128 B, 2 cache lines) | headroom (128 B) | data room (pool's data_room bytes) |
//! ^ element start                  ^ buf_addr / buf_iova            data starts at buf_addr + data_off
//! ```
//!
//! An [`Mbuf`] is the owning handle of one such buffer: a single pointer, moved (never copied)
//! between pools, bursts, rings and queues. Dropping an `Mbuf` returns it to its pool (slow path,
//! a single-element enqueue on the pool's shared ring), so a buffer can never be lost; hot paths
//! free in bulk through a [`MempoolCache`](crate::mempool::MempoolCache) instead.
//!
//! # Chains
//!
//! A packet larger than one buffer is a chain of segments ([`Mbuf::chain`]): the head's handle
//! owns every segment, [`Mbuf::nb_segs`] and [`Mbuf::pkt_len`] describe the whole packet, and
//! freeing the head frees them all. The per-segment accessors (`data`, `data_len`, `prepend`,
//! `adj`, ...) act on the head segment, `append` and `trim` on the last one; [`Mbuf::segments`]
//! walks them all. A single buffer is a chain of one: `nb_segs` is 1 and `pkt_len` is its
//! `data_len`, read from the header's first cache line like every per-packet field.
//!
//! This module and `mempool` are the only ones in the crate that touch buffer memory through raw
//! pointers; every `unsafe` block below says why it is sound.

use std::mem::MaybeUninit;
use std::ptr::NonNull;
use std::sync::{Arc, Mutex};

use vdpakit_ring::{Consumer, Producer};

use crate::error::Result;
use crate::mempool::PoolCore;
use crate::virtio::VirtioNetHdr;

/// Bytes reserved in front of the packet data (for encapsulation or a virtio-net header).
pub const HEADROOM: usize = 128;
/// Size of the metadata header in front of each buffer.
pub const HDR_SIZE: usize = 128;
/// The largest burst any API in vdpakit takes or returns.
pub const MAX_BURST: usize = 512;
/// Port id of an mbuf that has not been received on a port.
pub const NO_PORT: u16 = u16::MAX;

/// Offload flags carried in [`Mbuf::ol_flags`] (the bit layout is vdpakit's own).
pub mod offload {
    /// RX: the IPv4 header checksum was verified good.
    pub const RX_IP_CKSUM_GOOD: u64 = 1 << 0;
    /// RX: the L4 checksum was verified good (virtio `DATA_VALID`).
    pub const RX_L4_CKSUM_GOOD: u64 = 1 << 1;
    /// RX: the L4 checksum is not computed yet (virtio `NEEDS_CSUM` from the peer).
    pub const RX_L4_CKSUM_NONE: u64 = 1 << 2;
    /// RX: the packet is a coalesced large receive (virtio GSO from the peer).
    pub const RX_LRO: u64 = 1 << 3;
    /// TX: the packet is IPv4.
    pub const TX_IPV4: u64 = 1 << 16;
    /// TX: the packet is IPv6.
    pub const TX_IPV6: u64 = 1 << 17;
    /// TX: compute the TCP checksum.
    pub const TX_TCP_CKSUM: u64 = 1 << 18;
    /// TX: compute the UDP checksum.
    pub const TX_UDP_CKSUM: u64 = 1 << 19;
    /// TX: segment as TCP (TSO) with [`VirtioNetHdr::gso_size`](crate::virtio::VirtioNetHdr) segments.
    pub const TX_TCP_SEG: u64 = 1 << 20;
    /// TX: segment as UDP (USO).
    pub const TX_UDP_SEG: u64 = 1 << 21;
}

/// Buffer metadata, at the start of every pool element. Cache line 0 holds everything a
/// datapath touches per packet; line 1 holds the pool link and rarely used fields.
#[repr(C, align(64))]
#[derive(Debug)]
pub(crate) struct MbufHdr {
    // --- cache line 0: everything a datapath touches per packet ---
    pub(crate) buf_addr: *mut u8,
    pub(crate) buf_iova: u64,
    pub(crate) data_off: u16,
    pub(crate) port: u16,
    pub(crate) queue: u16,
    /// Head: segments of the packet (1 for a single buffer). Other segments: 1.
    pub(crate) nb_segs: u16,
    pub(crate) data_len: u32,
    pub(crate) buf_len: u32,
    pub(crate) ol_flags: u64,
    pub(crate) pool: *const PoolCore,
    pub(crate) vnet: VirtioNetHdr,
    pub(crate) hash: u32,
    // --- cache line 1: rarely used ---
    pub(crate) packet_type: u32,
    pub(crate) index: u32,
    pub(crate) seqn: u32,
    /// Head of a chain (`nb_segs > 1`): bytes of all segments. Not kept up to date otherwise.
    pub(crate) pkt_len: u32,
    pub(crate) timestamp: u64,
    pub(crate) userdata: u64,
    /// The next segment (null for the last one).
    pub(crate) next: *mut MbufHdr,
    /// Head of a chain: its last segment.
    pub(crate) last: *mut MbufHdr,
}

const _: () = assert!(std::mem::size_of::<MbufHdr>() == HDR_SIZE);
const _: () = assert!(std::mem::offset_of!(MbufHdr, hash) == 60);
const _: () = assert!(std::mem::offset_of!(MbufHdr, packet_type) == 64);

impl MbufHdr {
    /// Resets the per-packet fields to a freshly allocated state.
    #[inline(always)]
    pub(crate) fn reset(&mut self) {
        self.data_off = HEADROOM as u16;
        self.data_len = 0;
        self.nb_segs = 1;
        self.next = std::ptr::null_mut();
        self.port = NO_PORT;
        self.queue = 0;
        self.ol_flags = 0;
        self.packet_type = 0;
        self.hash = 0;
        self.vnet = VirtioNetHdr::default();
    }
}

/// An owned packet buffer. See the module documentation.
#[derive(Debug)]
pub struct Mbuf {
    hdr: NonNull<MbufHdr>,
}

// SAFETY: an `Mbuf` is the unique owner of its buffer; the buffer memory is shared memory that
// stays mapped while any buffer of the pool is outstanding (see `PoolCore`), and the pool's free
// path is a lock-free MPMC ring, so moving the handle to another thread is sound.
unsafe impl Send for Mbuf {}

/// The address of an mbuf in flight through a ring, without ownership semantics.
///
/// Produced by [`Mbuf::into_raw`]; turned back with [`Mbuf::from_raw`] by whoever received it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RawMbuf(usize);

impl RawMbuf {
    /// A placeholder value (never a valid buffer), for filling dequeue arrays.
    pub const NULL: RawMbuf = RawMbuf(0);

    /// The address as an integer (for rings that carry `usize`).
    pub fn addr(self) -> usize {
        self.0
    }

    /// Rebuilds from [`RawMbuf::addr`].
    pub fn from_addr(addr: usize) -> RawMbuf {
        RawMbuf(addr)
    }
}

impl Mbuf {
    /// Takes ownership of a pool element. Only the pool creates mbufs.
    ///
    /// # Safety
    /// `hdr` must point to an initialised `MbufHdr` of a live pool that nobody else owns.
    #[inline(always)]
    pub(crate) unsafe fn from_hdr(hdr: NonNull<MbufHdr>) -> Mbuf {
        Mbuf { hdr }
    }

    /// Gives up ownership without returning the buffer to its pool.
    #[inline(always)]
    pub fn into_raw(self) -> RawMbuf {
        let addr = self.hdr.as_ptr() as usize;
        std::mem::forget(self);
        RawMbuf(addr)
    }

    /// Takes ownership back from [`Mbuf::into_raw`].
    ///
    /// # Safety
    /// `raw` must come from `into_raw` and must be turned back exactly once.
    #[inline(always)]
    pub unsafe fn from_raw(raw: RawMbuf) -> Mbuf {
        // SAFETY: the caller guarantees `raw` came from `into_raw`, so it is a non-null header
        // address whose ownership is now transferred back.
        let hdr = unsafe { NonNull::new_unchecked(raw.0 as *mut MbufHdr) };
        Mbuf { hdr }
    }

    #[inline(always)]
    pub(crate) fn hdr_ptr(&self) -> NonNull<MbufHdr> {
        self.hdr
    }

    #[inline(always)]
    fn hdr(&self) -> &MbufHdr {
        // SAFETY: `self` owns the buffer, so its header is initialised, mapped and not aliased
        // mutably anywhere else (headers are never handed to devices).
        unsafe { self.hdr.as_ref() }
    }

    #[inline(always)]
    fn hdr_mut(&mut self) -> &mut MbufHdr {
        // SAFETY: as in `hdr`, and `&mut self` makes this the only access.
        unsafe { self.hdr.as_mut() }
    }

    /// Bytes in this (the head) segment: the packet length unless the packet is a chain.
    #[inline(always)]
    pub fn data_len(&self) -> usize {
        self.hdr().data_len as usize
    }

    /// Packet length: the bytes of every segment.
    #[inline(always)]
    pub fn pkt_len(&self) -> usize {
        let h = self.hdr();
        if h.nb_segs > 1 {
            h.pkt_len as usize
        } else {
            h.data_len as usize
        }
    }

    /// Segments of the packet (1 unless it is a chain).
    #[inline(always)]
    pub fn nb_segs(&self) -> u16 {
        self.hdr().nb_segs
    }

    /// Adds `delta` bytes to the recorded packet length of a chain (no-op for one segment).
    #[inline(always)]
    fn grow_pkt(&mut self, delta: isize) {
        let h = self.hdr_mut();
        if h.nb_segs > 1 {
            h.pkt_len = (h.pkt_len as isize + delta) as u32;
        }
    }

    /// Appends `tail` (a single buffer or a chain) after the last segment of this packet. Gives
    /// `tail` back if the packet would exceed [`MAX_SEGS`] segments or `u32::MAX` bytes.
    pub fn chain(&mut self, tail: Mbuf) -> std::result::Result<(), Mbuf> {
        let (segs, len) = (self.nb_segs(), self.pkt_len());
        let (tsegs, tlen) = (tail.nb_segs(), tail.pkt_len());
        if usize::from(segs) + usize::from(tsegs) > MAX_SEGS || len + tlen > u32::MAX as usize {
            return Err(tail);
        }
        let tail_last = if tsegs > 1 {
            tail.hdr().last
        } else {
            tail.hdr.as_ptr()
        };
        let last = if segs > 1 {
            self.hdr().last
        } else {
            self.hdr.as_ptr()
        };
        let tail_head = tail.into_raw().0 as *mut MbufHdr;
        // SAFETY: `last` is this packet's last segment (the head itself or one linked from it),
        // owned through this head, which `&mut self` borrows exclusively.
        let last = unsafe { &mut *last };
        last.next = tail_head;
        // SAFETY: the tail's ownership moves into the chain here (`into_raw` gave it up), so
        // nothing else references its header.
        let tail_hdr = unsafe { &mut *tail_head };
        tail_hdr.nb_segs = 1;
        let h = self.hdr_mut();
        h.nb_segs = segs + tsegs;
        h.pkt_len = (len + tlen) as u32;
        h.last = tail_last;
        Ok(())
    }

    /// Splits a chain into its segments, head first, each a single buffer handed to `f`
    /// (a single buffer is handed over as it is).
    pub fn for_each_segment(self, mut f: impl FnMut(Mbuf)) {
        let mut left = self.nb_segs();
        let mut seg = self.into_raw().0 as *mut MbufHdr;
        while left > 0 && !seg.is_null() {
            // SAFETY: `seg` is the head or a segment linked from it; ownership of the whole chain
            // was given up by `into_raw` above and is handed out segment by segment here, once
            // each; its link is read before the segment becomes a packet of its own.
            let hdr = unsafe { &mut *seg };
            let next = hdr.next;
            hdr.next = std::ptr::null_mut();
            hdr.nb_segs = 1;
            let seg_ptr = NonNull::from(hdr);
            // SAFETY: an initialised header owned here (see above), handed out once.
            f(unsafe { Mbuf::from_hdr(seg_ptr) });
            seg = next;
            left -= 1;
        }
    }

    /// The segments of the packet, head first.
    #[inline]
    pub fn segments(&self) -> Segments<'_> {
        Segments {
            next: self.hdr.as_ptr(),
            left: self.nb_segs(),
            _m: std::marker::PhantomData,
        }
    }

    /// Copies the packet's bytes from `offset` on into `dst` (across segments); returns how many
    /// were copied (fewer than `dst.len()` at the end of the packet).
    pub fn read_at(&self, offset: usize, dst: &mut [u8]) -> usize {
        let mut at = 0usize;
        let mut done = 0usize;
        for seg in self.segments() {
            let d = seg.data();
            let (lo, hi) = (at, at + d.len());
            at = hi;
            if hi <= offset + done || done == dst.len() {
                continue;
            }
            let from = offset + done - lo;
            let n = (d.len() - from).min(dst.len() - done);
            dst[done..done + n].copy_from_slice(&d[from..from + n]);
            done += n;
        }
        done
    }

    /// The whole packet in one vector (control paths and tests; allocates).
    pub fn to_vec(&self) -> Vec<u8> {
        let mut v = vec![0u8; self.pkt_len()];
        let n = self.read_at(0, &mut v);
        v.truncate(n);
        v
    }

    /// Offset of the packet data from the buffer start (initially [`HEADROOM`]).
    #[inline(always)]
    pub fn data_off(&self) -> usize {
        self.hdr().data_off as usize
    }

    /// Bytes available in front of the data.
    #[inline(always)]
    pub fn headroom(&self) -> usize {
        self.data_off()
    }

    /// Bytes available after the data.
    #[inline(always)]
    pub fn tailroom(&self) -> usize {
        let h = self.hdr();
        h.buf_len as usize - h.data_off as usize - h.data_len as usize
    }

    /// Total buffer size (headroom + data room).
    #[inline(always)]
    pub fn buf_len(&self) -> usize {
        self.hdr().buf_len as usize
    }

    /// Sets the length of the head segment (a chain's packet length follows); fails (returns
    /// false) when it exceeds the room after `data_off`.
    #[inline(always)]
    pub fn set_data_len(&mut self, len: usize) -> bool {
        let h = self.hdr_mut();
        if len > h.buf_len as usize - h.data_off as usize {
            return false;
        }
        let old = h.data_len as isize;
        h.data_len = len as u32;
        self.grow_pkt(len as isize - old);
        true
    }

    /// A chain's last segment (set by `chain` to a segment this head owns; never null then).
    #[inline(always)]
    fn last_hdr(&self) -> NonNull<MbufHdr> {
        NonNull::new(self.hdr().last).unwrap_or(self.hdr)
    }

    /// Grows the packet at its end (in the last segment) by `len` bytes and returns them.
    #[inline]
    pub fn append(&mut self, len: usize) -> Option<&mut [u8]> {
        if self.nb_segs() > 1 {
            return self.append_chained(len);
        }
        if len > self.tailroom() {
            return None;
        }
        let old = self.data_len();
        self.hdr_mut().data_len += len as u32;
        Some(&mut self.data_mut()[old..])
    }

    /// [`Mbuf::append`] on a chain: in its last segment.
    #[inline(never)]
    fn append_chained(&mut self, len: usize) -> Option<&mut [u8]> {
        let last = self.last_hdr();
        if last == self.hdr {
            return None;
        }
        // SAFETY: `last` is a segment of this chain, owned through `&mut self`, distinct from
        // the head; nothing else references it while the head is borrowed mutably.
        let l = unsafe { &mut *last.as_ptr() };
        if len > l.buf_len as usize - l.data_off as usize - l.data_len as usize {
            return None;
        }
        let at = l
            .buf_addr
            .wrapping_add(l.data_off as usize + l.data_len as usize);
        l.data_len += len as u32;
        self.grow_pkt(len as isize);
        // SAFETY: [data_off + old data_len, + len) lies inside the last segment's buffer (checked
        // against its room above), which this chain owns exclusively.
        Some(unsafe { std::slice::from_raw_parts_mut(at, len) })
    }

    /// Grows the packet at its front by `len` bytes (taken from the headroom) and returns them.
    pub fn prepend(&mut self, len: usize) -> Option<&mut [u8]> {
        if len > self.headroom() {
            return None;
        }
        let h = self.hdr_mut();
        h.data_off -= len as u16;
        h.data_len += len as u32;
        self.grow_pkt(len as isize);
        Some(&mut self.data_mut()[..len])
    }

    /// Removes `len` bytes from the front of the head segment.
    pub fn adj(&mut self, len: usize) -> bool {
        if len > self.data_len() {
            return false;
        }
        let h = self.hdr_mut();
        h.data_off += len as u16;
        h.data_len -= len as u32;
        self.grow_pkt(-(len as isize));
        true
    }

    /// Removes `len` bytes from the end of the packet (from its last segment only).
    pub fn trim(&mut self, len: usize) -> bool {
        let last = if self.nb_segs() > 1 {
            self.last_hdr()
        } else {
            self.hdr
        };
        if last == self.hdr {
            if len > self.data_len() {
                return false;
            }
            self.hdr_mut().data_len -= len as u32;
            return true;
        }
        // SAFETY: as in `append`: a segment of this chain, owned through `&mut self`.
        let l = unsafe { &mut *last.as_ptr() };
        if len > l.data_len as usize {
            return false;
        }
        l.data_len -= len as u32;
        self.grow_pkt(-(len as isize));
        true
    }

    /// Address of the first data byte in this process.
    #[inline(always)]
    pub fn data_ptr(&self) -> *mut u8 {
        let h = self.hdr();
        h.buf_addr.wrapping_add(h.data_off as usize)
    }

    /// IOVA of the first data byte (what a device DMAs to).
    #[inline(always)]
    pub fn data_iova(&self) -> u64 {
        let h = self.hdr();
        h.buf_iova + h.data_off as u64
    }

    /// IOVA of the buffer start (headroom included).
    #[inline(always)]
    pub fn buf_iova(&self) -> u64 {
        self.hdr().buf_iova
    }

    /// The packet bytes.
    #[inline(always)]
    pub fn data(&self) -> &[u8] {
        let h = self.hdr();
        // SAFETY: data_off + data_len <= buf_len is an invariant every setter keeps, the buffer
        // lies inside the pool's mapping, and `&self` owns it (no device is writing to it while
        // software owns the mbuf).
        unsafe { std::slice::from_raw_parts(self.data_ptr(), h.data_len as usize) }
    }

    /// The packet bytes, writable.
    #[inline(always)]
    pub fn data_mut(&mut self) -> &mut [u8] {
        let len = self.data_len();
        let ptr = self.data_ptr();
        // SAFETY: as in `data`, and `&mut self` makes this the only access to the buffer.
        unsafe { std::slice::from_raw_parts_mut(ptr, len) }
    }

    /// The whole room after `data_off` (up to the buffer end), writable: for building packets.
    #[inline(always)]
    pub fn room_mut(&mut self) -> &mut [u8] {
        let h = self.hdr();
        let len = h.buf_len as usize - h.data_off as usize;
        let ptr = self.data_ptr();
        // SAFETY: [data_off, buf_len) lies inside this buffer; `&mut self` owns it exclusively.
        unsafe { std::slice::from_raw_parts_mut(ptr, len) }
    }

    /// Port the packet was received on ([`NO_PORT`] if none).
    #[inline(always)]
    pub fn port(&self) -> u16 {
        self.hdr().port
    }

    /// Queue the packet was received on.
    #[inline(always)]
    pub fn queue(&self) -> u16 {
        self.hdr().queue
    }

    /// Records the receiving port and queue.
    #[inline(always)]
    pub fn set_rx_port(&mut self, port: u16, queue: u16) {
        let h = self.hdr_mut();
        h.port = port;
        h.queue = queue;
    }

    /// Offload flags ([`offload`]).
    #[inline(always)]
    pub fn ol_flags(&self) -> u64 {
        self.hdr().ol_flags
    }

    /// Replaces the offload flags.
    #[inline(always)]
    pub fn set_ol_flags(&mut self, flags: u64) {
        self.hdr_mut().ol_flags = flags;
    }

    /// The virtio-net header fields.
    #[inline(always)]
    pub fn vnet(&self) -> VirtioNetHdr {
        self.hdr().vnet
    }

    /// Replaces the virtio-net header fields.
    #[inline(always)]
    pub fn set_vnet(&mut self, v: VirtioNetHdr) {
        self.hdr_mut().vnet = v;
    }

    /// RSS hash (0 when none).
    pub fn hash(&self) -> u32 {
        self.hdr().hash
    }

    /// Sets the RSS hash.
    pub fn set_hash(&mut self, h: u32) {
        self.hdr_mut().hash = h;
    }

    /// Packet type (vdpakit's own classification, 0 = unknown).
    pub fn packet_type(&self) -> u32 {
        self.hdr().packet_type
    }

    /// Sets the packet type.
    pub fn set_packet_type(&mut self, t: u32) {
        self.hdr_mut().packet_type = t;
    }

    /// Application scratch: sequence number.
    pub fn seqn(&self) -> u32 {
        self.hdr().seqn
    }

    /// Sets the sequence number.
    pub fn set_seqn(&mut self, s: u32) {
        self.hdr_mut().seqn = s;
    }

    /// Application scratch: timestamp.
    pub fn timestamp(&self) -> u64 {
        self.hdr().timestamp
    }

    /// Sets the timestamp.
    pub fn set_timestamp(&mut self, t: u64) {
        self.hdr_mut().timestamp = t;
    }

    /// Index of the buffer inside its pool.
    pub fn pool_index(&self) -> u32 {
        self.hdr().index
    }

    #[inline(always)]
    pub(crate) fn pool_core(&self) -> *const PoolCore {
        self.hdr().pool
    }

    /// Prefetches the cache line at `off` bytes from the data start (negative: into the
    /// headroom). A hint: the address is never dereferenced, so any offset is harmless.
    #[inline(always)]
    pub fn prefetch_at(&self, off: isize) {
        #[cfg(target_arch = "x86_64")]
        {
            let p = self.data_ptr().wrapping_offset(off) as *const i8;
            // SAFETY: a prefetch never faults and has no architectural effect, whatever the
            // address; SSE is part of the x86-64 baseline.
            unsafe { std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T0 }>(p) };
        }
    }

    /// Prefetches the mbuf's own first line (lengths, offsets, pool): a hint, as above.
    #[inline(always)]
    pub fn prefetch_meta(&self) {
        crate::virtio::mem::prefetch_line(self.hdr_ptr().as_ptr().cast_const().cast::<u8>());
    }

    /// Prefetches the first data cache line (a hint; no effect on correctness).
    #[inline(always)]
    pub fn prefetch_data(&self) {
        #[cfg(target_arch = "x86_64")]
        {
            let p = self.data_ptr() as *const i8;
            // SAFETY: a prefetch never faults and has no architectural effect, whatever the
            // address; SSE is part of the x86-64 baseline.
            unsafe { std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T0 }>(p) };
        }
    }
}

impl Drop for Mbuf {
    fn drop(&mut self) {
        let mut left = self.nb_segs();
        let mut seg = self.hdr.as_ptr();
        while left > 0 && !seg.is_null() {
            // SAFETY: `seg` is the head or a segment linked from it, owned through this handle
            // and still initialised (it is given back only below).
            let hdr = unsafe { &*seg };
            let (pool, next, seg_ptr) = (hdr.pool, hdr.next, NonNull::from(hdr));
            // SAFETY: every header links to its pool core, which stays allocated while any of
            // its buffers is outstanding (this one is).
            let pool = unsafe { &*pool };
            // SAFETY: `seg_ptr` belongs to `pool`; it is given up here, exactly once; its `next`
            // was read before.
            unsafe { pool.put_one(seg_ptr) };
            seg = next;
            left -= 1;
        }
    }
}

/// Most segments in one packet.
pub const MAX_SEGS: usize = u16::MAX as usize;

/// One segment of a packet (see [`Mbuf::segments`]).
#[derive(Debug, Clone, Copy)]
pub struct MbufSeg<'a> {
    hdr: &'a MbufHdr,
}

impl<'a> MbufSeg<'a> {
    /// Bytes in this segment.
    #[inline(always)]
    pub fn data_len(&self) -> usize {
        self.hdr.data_len as usize
    }

    /// Address of the segment's first data byte in this process.
    #[inline(always)]
    pub fn data_ptr(&self) -> *mut u8 {
        self.hdr.buf_addr.wrapping_add(self.hdr.data_off as usize)
    }

    /// IOVA of the segment's first data byte.
    #[inline(always)]
    pub fn data_iova(&self) -> u64 {
        self.hdr.buf_iova + self.hdr.data_off as u64
    }

    /// Start of the segment's whole buffer in this process, and its length (headroom included).
    #[inline(always)]
    pub fn buf_span(&self) -> (usize, usize) {
        (self.hdr.buf_addr as usize, self.hdr.buf_len as usize)
    }

    /// The segment's bytes.
    #[inline(always)]
    pub fn data(&self) -> &'a [u8] {
        // SAFETY: data_off + data_len <= buf_len holds for every segment, the buffer is mapped
        // while the packet is owned, and the packet is borrowed for 'a.
        unsafe { std::slice::from_raw_parts(self.data_ptr(), self.hdr.data_len as usize) }
    }
}

/// The segments of a packet, head first ([`Mbuf::segments`]).
#[derive(Debug)]
pub struct Segments<'a> {
    next: *mut MbufHdr,
    left: u16,
    _m: std::marker::PhantomData<&'a Mbuf>,
}

impl<'a> Iterator for Segments<'a> {
    type Item = MbufSeg<'a>;

    #[inline]
    fn next(&mut self) -> Option<MbufSeg<'a>> {
        if self.left == 0 || self.next.is_null() {
            return None;
        }
        // SAFETY: `next` is the head or a segment linked from it; the packet is borrowed for
        // 'a, so the segment stays owned, initialised and unmodified meanwhile.
        let hdr = unsafe { &*self.next };
        self.next = hdr.next;
        self.left -= 1;
        Some(MbufSeg { hdr })
    }
}

/// A fixed-capacity batch of mbufs: what rx/tx bursts fill and drain. No allocation after
/// creation; dropping a burst returns what it still holds to the pools.
pub struct Burst {
    len: usize,
    limit: usize,
    pkts: [MaybeUninit<Mbuf>; MAX_BURST],
}

impl std::fmt::Debug for Burst {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Burst")
            .field("len", &self.len)
            .field("limit", &self.limit)
            .finish()
    }
}

impl Burst {
    /// An empty burst that holds at most `limit` packets (clamped to `1..=MAX_BURST`).
    pub fn new(limit: usize) -> Burst {
        Burst {
            len: 0,
            limit: limit.clamp(1, MAX_BURST),
            pkts: [const { MaybeUninit::uninit() }; MAX_BURST],
        }
    }

    /// Packets held.
    #[inline(always)]
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the burst is empty.
    #[inline(always)]
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The most packets this burst holds.
    #[inline(always)]
    pub fn limit(&self) -> usize {
        self.limit
    }

    /// How many more packets fit.
    #[inline(always)]
    pub fn room(&self) -> usize {
        self.limit - self.len
    }

    /// Adds a packet at the end; gives it back when full.
    #[inline(always)]
    pub fn push(&mut self, m: Mbuf) -> std::result::Result<(), Mbuf> {
        if self.len == self.limit {
            return Err(m);
        }
        self.pkts[self.len].write(m);
        self.len += 1;
        Ok(())
    }

    /// Removes the last packet.
    #[inline(always)]
    pub fn pop(&mut self) -> Option<Mbuf> {
        if self.len == 0 {
            return None;
        }
        self.len -= 1;
        // SAFETY: slots below the old `len` are initialised; after the decrement this slot is
        // outside the initialised range, so the value is moved out exactly once.
        Some(unsafe { self.pkts[self.len].assume_init_read() })
    }

    /// The packets, in order.
    #[inline(always)]
    pub fn as_slice(&self) -> &[Mbuf] {
        // SAFETY: the first `len` slots are initialised, and MaybeUninit<Mbuf> has Mbuf's layout.
        unsafe { std::slice::from_raw_parts(self.pkts.as_ptr().cast::<Mbuf>(), self.len) }
    }

    /// The packets, in order, writable.
    #[inline(always)]
    pub fn as_mut_slice(&mut self) -> &mut [Mbuf] {
        // SAFETY: as in `as_slice`, with exclusive access through `&mut self`.
        unsafe { std::slice::from_raw_parts_mut(self.pkts.as_mut_ptr().cast::<Mbuf>(), self.len) }
    }

    /// Iterates over the packets.
    pub fn iter(&self) -> std::slice::Iter<'_, Mbuf> {
        self.as_slice().iter()
    }

    /// Iterates over the packets, writable.
    pub fn iter_mut(&mut self) -> std::slice::IterMut<'_, Mbuf> {
        self.as_mut_slice().iter_mut()
    }

    /// Total bytes of the packets held (every segment).
    #[inline(always)]
    pub fn bytes(&self) -> u64 {
        self.iter().map(|m| m.pkt_len() as u64).sum()
    }

    /// Moves the first `n` packets out (in order) through `f`, then closes the gap. If `f`
    /// panics, the packets already moved out are not dropped again.
    #[inline]
    pub fn drain_front(&mut self, n: usize, mut f: impl FnMut(Mbuf)) {
        /// Closes the gap of the packets moved out so far, also when `f` unwinds.
        struct Gap<'a> {
            burst: &'a mut Burst,
            moved: usize,
        }
        impl Drop for Gap<'_> {
            fn drop(&mut self) {
                self.burst.shift_front(self.moved);
            }
        }
        let n = n.min(self.len);
        let mut gap = Gap {
            burst: self,
            moved: 0,
        };
        for i in 0..n {
            // SAFETY: slot i < len is initialised; it is moved out once (counted in `moved`
            // before `f` runs) and then overwritten or left outside the initialised range by the
            // shift when `gap` goes.
            let m = unsafe { gap.burst.pkts[i].assume_init_read() };
            gap.moved = i + 1;
            f(m);
        }
    }

    /// Forgets the first `n` packets, whose ownership moved elsewhere as raw values.
    #[inline(always)]
    fn shift_front(&mut self, n: usize) {
        let rest = self.len - n;
        if rest > 0 && n > 0 {
            let src = self.pkts[n..].as_ptr();
            let dst = self.pkts.as_mut_ptr();
            // SAFETY: both ranges lie in the array; `copy` handles the overlap; the moved-from
            // tail is then outside the initialised range (len shrinks by n).
            unsafe { std::ptr::copy(src, dst, rest) };
        }
        self.len = rest;
    }

    /// Appends raw buffers taken back from a ring.
    ///
    /// # Safety
    /// Each entry must be a `RawMbuf` from [`Mbuf::into_raw`] that is taken back exactly once,
    /// and `raw.len() <= self.room()`.
    #[inline(always)]
    pub(crate) unsafe fn extend_raw(&mut self, raw: &[RawMbuf]) {
        debug_assert!(raw.len() <= self.room());
        for r in raw {
            // SAFETY: the caller guarantees ownership transfer and room.
            self.pkts[self.len].write(unsafe { Mbuf::from_raw(*r) });
            self.len += 1;
        }
    }

    /// Writes the raw addresses of the first `out.len()` packets into `out` (no ownership change).
    #[inline(always)]
    pub(crate) fn peek_raw(&self, out: &mut [RawMbuf]) -> usize {
        let n = out.len().min(self.len);
        for (o, m) in out.iter_mut().zip(self.as_slice()) {
            *o = RawMbuf(m.hdr_ptr().as_ptr() as usize);
        }
        n
    }
}

impl Drop for Burst {
    fn drop(&mut self) {
        while self.pop().is_some() {}
    }
}

/// Creates a single-producer/single-consumer channel of mbufs (what the `ring` port is made of).
///
/// Whichever end is dropped last frees the packets still in the channel, so no buffer is lost
/// whatever order the two ends go in.
pub fn mbuf_channel(capacity: usize) -> Result<(MbufTx, MbufRx)> {
    let (p, c) = vdpakit_ring::spsc::channel::<RawMbuf>(capacity)?;
    let orphan = Arc::new(Orphan(Mutex::new(None)));
    Ok((
        MbufTx {
            p,
            scratch: Box::new([RawMbuf::NULL; MAX_BURST]),
            _orphan: Arc::clone(&orphan),
        },
        MbufRx {
            c: Some(c),
            scratch: Box::new([RawMbuf::NULL; MAX_BURST]),
            orphan,
        },
    ))
}

/// Holds the consumer of a channel whose receiving end is gone; drains it when the last end goes.
struct Orphan(Mutex<Option<Consumer<RawMbuf>>>);

impl Drop for Orphan {
    fn drop(&mut self) {
        let slot = self.0.get_mut().unwrap_or_else(|p| p.into_inner());
        if let Some(c) = slot.as_mut() {
            let mut raw = [RawMbuf::NULL; 64];
            loop {
                let n = c.dequeue_burst(&mut raw);
                if n == 0 {
                    break;
                }
                for r in &raw[..n] {
                    // SAFETY: entries were put in the channel by `send_burst` from owned mbufs
                    // and each is taken back once here; the sender is gone, so nothing else can.
                    drop(unsafe { Mbuf::from_raw(*r) });
                }
            }
        }
    }
}

/// Sending end of an [`mbuf_channel`].
pub struct MbufTx {
    p: Producer<RawMbuf>,
    scratch: Box<[RawMbuf; MAX_BURST]>,
    _orphan: Arc<Orphan>,
}

impl MbufTx {
    /// Moves as many packets as fit from the front of `burst` into the channel (one index
    /// publish); the rest stay in `burst`. Returns the number moved.
    #[inline]
    pub fn send_burst(&mut self, burst: &mut Burst) -> usize {
        let n = burst.peek_raw(&mut self.scratch[..burst.len()]);
        let sent = self.p.enqueue_burst(&self.scratch[..n]);
        // The first `sent` mbufs now belong to the channel.
        burst.shift_front(sent);
        sent
    }

    /// Packets in the channel.
    pub fn len(&self) -> usize {
        self.p.len()
    }

    /// Whether the channel is empty.
    pub fn is_empty(&self) -> bool {
        self.p.is_empty()
    }

    /// Channel capacity.
    pub fn capacity(&self) -> usize {
        self.p.capacity()
    }
}

/// Receiving end of an [`mbuf_channel`].
pub struct MbufRx {
    c: Option<Consumer<RawMbuf>>,
    scratch: Box<[RawMbuf; MAX_BURST]>,
    orphan: Arc<Orphan>,
}

impl MbufRx {
    /// Moves up to `burst.room()` packets from the channel into `burst`. Returns how many.
    #[inline]
    pub fn recv_burst(&mut self, burst: &mut Burst) -> usize {
        let Some(c) = self.c.as_mut() else { return 0 };
        let room = burst.room();
        let n = c.dequeue_burst(&mut self.scratch[..room]);
        // SAFETY: everything in the channel was put there by `send_burst` from owned mbufs
        // (`into_raw` semantics), and each dequeued entry is taken back exactly once; n <= room.
        unsafe { burst.extend_raw(&self.scratch[..n]) };
        n
    }

    /// Packets in the channel.
    pub fn len(&self) -> usize {
        self.c.as_ref().map_or(0, |c| c.len())
    }

    /// Whether the channel is empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl Drop for MbufRx {
    fn drop(&mut self) {
        // Hand the consumer to the shared slot: the last end to go drains it.
        let mut slot = self.orphan.0.lock().unwrap_or_else(|p| p.into_inner());
        *slot = self.c.take();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mem::MemMode;
    use crate::mempool::{Mempool, MempoolConfig};

    fn pool(n: u32) -> Arc<Mempool> {
        Mempool::new(
            "mbuf-t",
            MempoolConfig {
                count: n,
                cache_size: 0,
                mem: MemMode::NoHuge,
                ..Default::default()
            },
        )
        .unwrap()
    }

    fn fill(p: &Mempool, b: &mut Burst, n: usize) {
        for i in 0..n {
            let mut m = p.alloc().unwrap();
            m.append(60).unwrap()[0] = i as u8;
            b.push(m).unwrap();
        }
    }

    #[test]
    fn burst_push_pop_drain_keep_order() {
        let p = pool(16);
        let mut b = Burst::new(4);
        fill(&p, &mut b, 4);
        assert!(b.push(p.alloc().unwrap()).is_err(), "limit respected");
        assert_eq!(b.bytes(), 240);
        let mut seen = vec![];
        b.drain_front(2, |m| seen.push(m.data()[0]));
        assert_eq!(seen, [0, 1]);
        assert_eq!(
            b.as_slice().iter().map(|m| m.data()[0]).collect::<Vec<_>>(),
            [2, 3]
        );
        drop(b);
        assert_eq!(p.available(), 16, "dropping a burst frees what it holds");
    }

    /// A buffer holding `bytes`.
    fn buf(p: &Mempool, bytes: &[u8]) -> Mbuf {
        let mut m = p.alloc().unwrap();
        m.append(bytes.len()).unwrap().copy_from_slice(bytes);
        m
    }

    #[test]
    fn chains_describe_and_free_the_whole_packet() {
        let p = pool(16);
        let mut head = buf(&p, b"hello ");
        assert_eq!((head.nb_segs(), head.pkt_len()), (1, 6));
        head.chain(buf(&p, b"segmented")).unwrap();
        // A chain of two appended to a chain of two.
        let mut tail = buf(&p, b" wor");
        tail.chain(buf(&p, b"ld")).unwrap();
        head.chain(tail).unwrap();
        assert_eq!(head.nb_segs(), 4);
        assert_eq!(head.pkt_len(), 21);
        assert_eq!(head.data_len(), 6, "data_len is the head segment's");
        assert_eq!(head.to_vec(), b"hello segmented world");
        let lens: Vec<usize> = head.segments().map(|s| s.data_len()).collect();
        assert_eq!(lens, [6, 9, 4, 2]);
        let mut mid = [0u8; 8];
        assert_eq!(head.read_at(4, &mut mid), 8);
        assert_eq!(&mid, b"o segmen");
        let mut end = [0u8; 8];
        assert_eq!(head.read_at(17, &mut end), 4, "short read at the end");
        assert_eq!(&end[..4], b"orld");
        // Front edits act on the head, back edits on the last segment; pkt_len follows.
        head.prepend(2).unwrap().copy_from_slice(b">>");
        head.append(1).unwrap().copy_from_slice(b"!");
        assert_eq!(head.to_vec(), b">>hello segmented world!");
        assert!(head.adj(2) && head.trim(1));
        assert!(!head.trim(3), "the last segment holds only 2 bytes");
        assert!(head.set_data_len(5));
        assert_eq!(head.to_vec(), b"hellosegmented world");
        assert_eq!(head.pkt_len(), 20);
        // Through a raw handle and back, then freed: every segment returns.
        let raw = head.into_raw();
        // SAFETY: `raw` comes from `into_raw` and is taken back once.
        let head = unsafe { Mbuf::from_raw(raw) };
        assert_eq!(head.pkt_len(), 20);
        assert_eq!(p.available(), 12);
        drop(head);
        assert_eq!(p.available(), 16);
    }

    #[test]
    fn chains_free_into_a_cache_and_split_into_segments() {
        let p = pool(8);
        let mut c = p.cache(4);
        let mut head = buf(&p, b"a");
        for b in [b"b", b"c", b"d"] {
            head.chain(buf(&p, b)).unwrap();
        }
        c.free(head);
        assert_eq!(c.len() + p.available(), 8, "all four segments are free");
        let mut head = c.alloc().unwrap();
        head.append(1).unwrap()[0] = b'x';
        let mut second = c.alloc().unwrap();
        second.append(1).unwrap()[0] = b'y';
        head.chain(second).unwrap();
        let mut segs = vec![];
        head.for_each_segment(|m| {
            assert_eq!((m.nb_segs(), m.pkt_len()), (1, 1));
            segs.push(m.data()[0]);
            c.free(m);
        });
        assert_eq!(segs, b"xy");
        drop(c);
        assert_eq!(p.available(), 8);
    }

    #[test]
    fn fresh_buffers_are_single_segments() {
        let p = pool(4);
        let mut a = buf(&p, b"12");
        a.chain(buf(&p, b"34")).unwrap();
        drop(a);
        // Reused buffers come back unchained.
        let all: Vec<Mbuf> = (0..4).map(|_| p.alloc().unwrap()).collect();
        for m in &all {
            assert_eq!((m.nb_segs(), m.pkt_len(), m.segments().count()), (1, 0, 1));
        }
    }

    #[test]
    fn channel_moves_packets_in_order_and_keeps_what_does_not_fit() {
        let p = pool(32);
        let (mut tx, mut rx) = mbuf_channel(8).unwrap();
        let mut b = Burst::new(16);
        fill(&p, &mut b, 12);
        assert_eq!(tx.send_burst(&mut b), 8);
        assert_eq!(b.len(), 4, "unsent packets stay with the caller");
        assert_eq!(b.as_slice()[0].data()[0], 8);
        let mut out = Burst::new(5);
        assert_eq!(rx.recv_burst(&mut out), 5);
        assert_eq!(
            out.iter().map(|m| m.data()[0]).collect::<Vec<_>>(),
            [0, 1, 2, 3, 4]
        );
        drop((out, b));
        assert_eq!(p.available(), 32 - 3);
    }

    #[test]
    fn channel_frees_leftovers_whichever_end_goes_last() {
        let p = pool(32);
        for rx_first in [true, false] {
            let (mut tx, rx) = mbuf_channel(16).unwrap();
            let mut b = Burst::new(16);
            fill(&p, &mut b, 10);
            if rx_first {
                drop(rx);
                // Sending into a channel whose receiver is gone still never loses a buffer.
                assert_eq!(tx.send_burst(&mut b), 10);
                drop(tx);
            } else {
                assert_eq!(tx.send_burst(&mut b), 10);
                drop(tx);
                drop(rx);
            }
            assert_eq!(p.available(), 32, "rx_first={rx_first}");
        }
    }
}

//! Fixed-size packet-buffer pools with per-lcore caches.
//!
//! A [`Mempool`] carves `count` buffers out of one hugepage zone and keeps the free ones in a
//! shared lock-free MPMC ring. Each lcore (or each queue, which belongs to exactly one lcore)
//! holds a [`MempoolCache`]: allocations and frees hit the cache's private array, and the shared
//! ring is touched only in bursts, to refill an empty cache or drain a full one (the rte_mempool
//! scheme). Exhaustion is a counted failure ([`Mempool::alloc_failures`]), never a panic.
//!
//! **One cache per lcore and pool.** A queue's own cache and its lcore's cache are two caches of
//! the same pool: buffers freed into one would reach the other only through the shared ring,
//! first in first out, so every allocation would take a buffer whose header and data left the
//! CPU's caches long ago. A thread that calls [`enable_local_caches`] (an lcore) instead keeps one
//! cache per pool in thread-local storage, and [`MempoolCache::local`] hands that one to whoever
//! asks on the thread (the application's loop, each queue's burst): a buffer freed by one is the
//! next one allocated by the other, still warm. Other threads (tests, control threads) keep using
//! each holder's own cache. [`release_local_caches`] returns the thread's buffers to the pools.

use std::cell::RefCell;
use std::ptr::NonNull;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use crossbeam_utils::CachePadded;
use vdpakit_ring::MpmcRing;

use crate::error::{Error, Result};
use crate::mbuf::{Burst, HDR_SIZE, HEADROOM, MAX_BURST, Mbuf, MbufHdr, NO_PORT};
use crate::mem::{MemMode, Segment, Zone};
use crate::virtio::VirtioNetHdr;

/// Default data room per buffer (after the headroom).
pub const DEFAULT_DATA_ROOM: u32 = 2048;
/// Default per-lcore cache size.
pub const DEFAULT_CACHE: u32 = 256;
/// Largest per-lcore cache.
pub const MAX_CACHE: u32 = 512;

/// How a pool is built.
#[derive(Debug, Clone, Copy)]
pub struct MempoolConfig {
    /// Number of buffers (1..=16M).
    pub count: u32,
    /// Bytes of packet data per buffer after the headroom (64..=65280).
    pub data_room: u32,
    /// Buffers each [`MempoolCache`] keeps (0..=512).
    pub cache_size: u32,
    /// Where the memory comes from.
    pub mem: MemMode,
}

impl Default for MempoolConfig {
    fn default() -> Self {
        MempoolConfig {
            count: 16384,
            data_room: DEFAULT_DATA_ROOM,
            cache_size: DEFAULT_CACHE,
            mem: MemMode::Auto,
        }
    }
}

/// The shared state every buffer header points to. It outlives all buffers (see `Mempool::drop`).
pub(crate) struct PoolCore {
    ring: MpmcRing<usize>,
    alloc_fail: CachePadded<AtomicU64>,
    count: u32,
    elt_size: usize,
    data_room: u32,
    name: String,
    zone: Zone,
}

impl PoolCore {
    /// Returns one buffer to the shared ring (the `Drop` path of a single mbuf).
    ///
    /// # Safety
    /// `hdr` must be a buffer of this pool that the caller owns and gives up.
    pub(crate) unsafe fn put_one(&self, hdr: NonNull<MbufHdr>) {
        let ok = self.ring.enqueue_bulk(&[hdr.as_ptr() as usize]);
        // The ring holds all `count` buffers, so a free can never find it full.
        debug_assert!(ok, "mempool ring overflow");
    }
}

/// A pool of packet buffers. Always used through an `Arc`.
pub struct Mempool {
    core: NonNull<PoolCore>,
}

// SAFETY: `PoolCore` is only read through shared references (its ring is a lock-free MPMC ring
// and its counter atomic); the buffer memory is shared memory owned by the zone.
unsafe impl Send for Mempool {}
// SAFETY: as above: every operation through `&Mempool` is thread-safe.
unsafe impl Sync for Mempool {}

impl std::fmt::Debug for Mempool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Mempool")
            .field("name", &self.core().name)
            .field("count", &self.core().count)
            .field("available", &self.available())
            .finish()
    }
}

impl Mempool {
    /// Creates a pool in a new segment of its own.
    pub fn new(name: &str, cfg: MempoolConfig) -> Result<Arc<Mempool>> {
        if cfg.count == 0 || cfg.count > (1 << 24) {
            return Err(Error::InvalidPoolConfig {
                what: "count",
                value: cfg.count as usize,
                accepted: "1..=16777216",
            });
        }
        if !(64..=65280).contains(&cfg.data_room) {
            return Err(Error::InvalidPoolConfig {
                what: "data room",
                value: cfg.data_room as usize,
                accepted: "64..=65280 bytes",
            });
        }
        if cfg.cache_size > MAX_CACHE {
            return Err(Error::InvalidPoolConfig {
                what: "cache size",
                value: cfg.cache_size as usize,
                accepted: "0..=512",
            });
        }
        let elt_size = (HDR_SIZE + HEADROOM + cfg.data_room as usize).next_multiple_of(64);
        let bytes = elt_size * cfg.count as usize;
        let seg = Segment::new(name, bytes, cfg.mem)?;
        let zone = seg.reserve_zone("mbufs", bytes, 64)?;
        let ring = MpmcRing::new((cfg.count as usize).next_power_of_two())?;
        let core = Box::new(PoolCore {
            ring,
            alloc_fail: CachePadded::new(AtomicU64::new(0)),
            count: cfg.count,
            elt_size,
            data_room: cfg.data_room,
            name: name.to_string(),
            zone,
        });
        let core = NonNull::from(Box::leak(core));
        let pool = Mempool { core };
        pool.init_buffers();
        tracing::debug!(
            pool = name,
            count = cfg.count,
            elt_size,
            huge = seg.is_huge(),
            "mempool created"
        );
        Ok(Arc::new(pool))
    }

    fn init_buffers(&self) {
        let core = self.core();
        let base = core.zone.as_ptr();
        let iova = core.zone.iova();
        let mut batch = [0usize; 64];
        let mut n = 0;
        for i in 0..core.count as usize {
            let off = i * core.elt_size;
            let hdr = base.wrapping_add(off).cast::<MbufHdr>();
            let value = MbufHdr {
                buf_addr: base.wrapping_add(off + HDR_SIZE),
                buf_iova: iova + (off + HDR_SIZE) as u64,
                data_off: HEADROOM as u16,
                port: NO_PORT,
                queue: 0,
                nb_segs: 1,
                data_len: 0,
                buf_len: HEADROOM as u32 + core.data_room,
                ol_flags: 0,
                pool: self.core.as_ptr(),
                vnet: VirtioNetHdr::default(),
                hash: 0,
                packet_type: 0,
                index: i as u32,
                seqn: 0,
                pkt_len: 0,
                timestamp: 0,
                userdata: 0,
                next: std::ptr::null_mut(),
                last: std::ptr::null_mut(),
            };
            // SAFETY: element i lies inside the zone (count * elt_size bytes), is 64-byte aligned
            // (zone aligned to 64, elt_size a multiple of 64) and nobody else references it yet.
            unsafe { hdr.write(value) };
            batch[n] = hdr as usize;
            n += 1;
            if n == batch.len() || i + 1 == core.count as usize {
                let ok = core.ring.enqueue_bulk(&batch[..n]);
                debug_assert!(ok);
                n = 0;
            }
        }
    }

    #[inline(always)]
    fn core(&self) -> &PoolCore {
        // SAFETY: the core is leaked at creation and only reclaimed in `drop` of the last handle.
        unsafe { self.core.as_ref() }
    }

    /// Pool name.
    pub fn name(&self) -> &str {
        &self.core().name
    }

    /// Number of buffers in the pool.
    pub fn count(&self) -> u32 {
        self.core().count
    }

    /// Data room per buffer (after the headroom).
    pub fn data_room(&self) -> u32 {
        self.core().data_room
    }

    /// Buffers in the shared ring (not counting those held in caches or in use).
    pub fn available(&self) -> usize {
        self.core().ring.len()
    }

    /// Allocation requests that could not be served.
    pub fn alloc_failures(&self) -> u64 {
        self.core().alloc_fail.load(Ordering::Relaxed)
    }

    /// The zone holding the buffers (for DMA-mapping it, or sharing its segment's fd).
    pub fn zone(&self) -> &Zone {
        &self.core().zone
    }

    /// Allocates one buffer straight from the shared ring (control paths; datapaths use a cache).
    pub fn alloc(&self) -> Option<Mbuf> {
        let mut one = [0usize; 1];
        if !self.core().ring.dequeue_bulk(&mut one) {
            self.core().alloc_fail.fetch_add(1, Ordering::Relaxed);
            return None;
        }
        // SAFETY: every address in the ring is an initialised header of this pool that nobody
        // owns; dequeuing it hands ownership to us.
        Some(unsafe { take_fresh(one[0]) })
    }

    /// A per-lcore cache of `size` buffers (at most [`MAX_CACHE`]) over this pool.
    pub fn cache(self: &Arc<Self>, size: u32) -> MempoolCache {
        let size = size.min(MAX_CACHE) as usize;
        let flush = size + size / 2;
        MempoolCache {
            core: self.core,
            objs: vec![0usize; flush + MAX_BURST].into_boxed_slice(),
            len: 0,
            size,
            flush,
            _pool: Arc::clone(self),
        }
    }
}

impl Drop for Mempool {
    fn drop(&mut self) {
        let core = self.core();
        let back = core.ring.len();
        if back == core.count as usize {
            // SAFETY: every buffer is back in the ring, so no header points at the core any
            // more from a live mbuf, and this is the last handle (caches hold an Arc).
            drop(unsafe { Box::from_raw(self.core.as_ptr()) });
        } else {
            // Buffers still in flight keep pointing at the core and its memory: keep both.
            tracing::warn!(
                pool = core.name,
                outstanding = core.count as usize - back,
                "mempool dropped with buffers in use; its memory stays mapped"
            );
        }
    }
}

/// Resets and takes ownership of a free buffer.
///
/// # Safety
/// `addr` must be a header of a live pool, taken off its free ring or cache by the caller.
#[inline(always)]
unsafe fn take_fresh(addr: usize) -> Mbuf {
    let hdr = addr as *mut MbufHdr;
    // SAFETY: per the contract the header is initialised and exclusively ours.
    unsafe { (*hdr).reset() };
    // SAFETY: `addr` is non-null because it is a header address.
    let hdr = unsafe { NonNull::new_unchecked(hdr) };
    // SAFETY: the header is initialised and exclusively ours (see above).
    unsafe { Mbuf::from_hdr(hdr) }
}

/// A private stack of free buffers in front of a pool's shared ring. Owned by one lcore.
pub struct MempoolCache {
    core: NonNull<PoolCore>,
    objs: Box<[usize]>,
    len: usize,
    size: usize,
    flush: usize,
    _pool: Arc<Mempool>,
}

// SAFETY: the cache owns the buffers in `objs` and touches the pool only through its thread-safe
// ring; it may move to another thread (it is not Sync: one owner at a time).
unsafe impl Send for MempoolCache {}

impl std::fmt::Debug for MempoolCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MempoolCache")
            .field("len", &self.len)
            .field("size", &self.size)
            .finish()
    }
}

impl MempoolCache {
    #[inline(always)]
    fn core(&self) -> &PoolCore {
        // SAFETY: `_pool` keeps the core alive for as long as this cache exists.
        unsafe { self.core.as_ref() }
    }

    /// Dequeues up to `want` free buffers from the shared ring into `objs[at..]`.
    #[inline(always)]
    fn refill(&mut self, at: usize, want: usize) -> usize {
        let core = self.core;
        // SAFETY: `_pool` keeps the core alive for as long as this cache exists; the reference
        // is to the core, not to `self`, so `objs` can be borrowed mutably beside it.
        let ring = unsafe { &(*core.as_ptr()).ring };
        ring.dequeue_burst(&mut self.objs[at..at + want])
    }

    /// Buffers currently held by the cache.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the cache holds no buffers.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The pool behind this cache.
    pub fn pool(&self) -> &Arc<Mempool> {
        &self._pool
    }

    /// Allocates exactly `n` buffers into `burst` (all or none; `n <= burst.room()`).
    /// A failure is counted in [`Mempool::alloc_failures`] and returns false.
    #[inline]
    pub fn alloc_bulk(&mut self, burst: &mut Burst, n: usize) -> bool {
        if n > burst.room() {
            return false;
        }
        if self.len < n {
            let want = self.size + n - self.len;
            let got = self.refill(self.len, want);
            self.len += got;
            if self.len < n {
                self.core().alloc_fail.fetch_add(1, Ordering::Relaxed);
                return false;
            }
        }
        for _ in 0..n {
            self.len -= 1;
            // SAFETY: entries below `len` are free buffers of this pool owned by the cache;
            // each is handed out once (len shrinks).
            let m = unsafe { take_fresh(self.objs[self.len]) };
            // Cannot fail: n <= room was checked above.
            let _ = burst.push(m);
        }
        true
    }

    /// Allocates one buffer.
    #[inline]
    pub fn alloc(&mut self) -> Option<Mbuf> {
        if self.len == 0 {
            let want = self.size.max(1);
            let got = self.refill(0, want);
            self.len = got;
            if got == 0 {
                self.core().alloc_fail.fetch_add(1, Ordering::Relaxed);
                return None;
            }
        }
        self.len -= 1;
        // SAFETY: as in `alloc_bulk`.
        Some(unsafe { take_fresh(self.objs[self.len]) })
    }

    /// Frees one packet (to this cache when it belongs to this pool, else to its own pool);
    /// every segment of a chain.
    #[inline]
    pub fn free(&mut self, m: Mbuf) {
        if m.nb_segs() > 1 {
            m.for_each_segment(|seg| self.free(seg));
            return;
        }
        if m.pool_core() != self.core.as_ptr().cast_const() {
            drop(m);
            return;
        }
        self.objs[self.len] = m.into_raw().addr();
        self.len += 1;
        if self.len >= self.flush {
            self.flush_to(self.size);
        }
    }

    /// Frees every buffer of `burst`, leaving it empty.
    #[inline]
    pub fn free_burst(&mut self, burst: &mut Burst) {
        burst.drain_front(burst.len(), |m| self.free(m));
    }

    fn flush_to(&mut self, keep: usize) {
        if self.len > keep {
            let put = self.core().ring.enqueue_burst(&self.objs[keep..self.len]);
            // The ring has room for the whole pool, so everything fits.
            debug_assert_eq!(put, self.len - keep);
            self.len = keep;
        }
    }
}

thread_local! {
    /// This thread's caches, one per pool, while it is an lcore ([`enable_local_caches`]).
    static LOCAL: RefCell<Option<Vec<MempoolCache>>> = const { RefCell::new(None) };
}

/// Makes the calling thread an lcore: from now on [`MempoolCache::local`] on this thread uses
/// one cache per pool, shared by everything the thread runs. Call it before the poll loop (the
/// first use of each pool allocates its cache once).
pub fn enable_local_caches() {
    LOCAL.with(|l| {
        if let Ok(mut l) = l.try_borrow_mut()
            && l.is_none()
        {
            *l = Some(Vec::with_capacity(4));
        }
    });
}

/// Returns the calling thread's local caches to their pools and turns local caches off.
pub fn release_local_caches() {
    LOCAL.with(|l| {
        if let Ok(mut l) = l.try_borrow_mut() {
            // Dropping a cache flushes it to its pool's ring.
            l.take();
        }
    });
}

impl MempoolCache {
    /// Runs `f` with the calling lcore's cache of this pool (see the module documentation), or
    /// with `self` when the thread is not an lcore or its cache is already lent out further up
    /// the call stack. Either way `f` gets a cache of this cache's pool.
    #[inline]
    pub fn local<R>(&mut self, f: impl FnOnce(&mut MempoolCache) -> R) -> R {
        LOCAL.with(|l| {
            let Ok(mut guard) = l.try_borrow_mut() else {
                return f(self);
            };
            let Some(caches) = guard.as_mut() else {
                drop(guard);
                return f(self);
            };
            let i = match caches.iter().position(|c| c.core == self.core) {
                Some(i) => i,
                None => {
                    caches.push(self._pool.cache(self.size as u32));
                    caches.len() - 1
                }
            };
            f(&mut caches[i])
        })
    }
}

impl Drop for MempoolCache {
    fn drop(&mut self) {
        self.flush_to(0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lcore_local_cache_is_shared_by_every_holder_on_the_thread() {
        let p = pool(1024, 64);
        let total = p.available();
        let p2 = Arc::clone(&p);
        std::thread::spawn(move || {
            let (mut a, mut b) = (p2.cache(64), p2.cache(64));
            let mut burst = Burst::new(32);
            // Not an lcore: each holder uses its own cache.
            assert!(a.local(|c| c.alloc_bulk(&mut burst, 8)));
            assert_eq!(burst.len(), 8);
            assert!(!a.is_empty(), "a's own cache was refilled");
            b.local(|c| c.free_burst(&mut burst));
            assert_eq!(b.len(), 8, "freed into b's own cache");

            enable_local_caches();
            // An lcore: what one holder frees is the next thing the other allocates.
            assert!(a.local(|c| c.alloc_bulk(&mut burst, 4)));
            let iovas: Vec<u64> = burst.iter().map(|m| m.data_iova()).collect();
            let (a_len, b_len) = (a.len(), b.len());
            a.local(|c| c.free_burst(&mut burst));
            assert!(b.local(|c| c.alloc_bulk(&mut burst, 4)));
            let mut again: Vec<u64> = burst.iter().map(|m| m.data_iova()).collect();
            again.reverse();
            assert_eq!(again, iovas, "the same buffers, last freed first");
            assert_eq!((a.len(), b.len()), (a_len, b_len), "own caches untouched");
            // Lent out further up the stack: the holder's own cache serves the nested call.
            a.local(|_outer| {
                b.local(|c| c.free_burst(&mut burst));
            });
            assert_eq!(b.len(), b_len + 4);
            release_local_caches();
            drop((a, b));
        })
        .join()
        .unwrap();
        assert_eq!(p.available(), total, "every buffer back in the pool");
    }

    fn pool(count: u32, cache: u32) -> Arc<Mempool> {
        Mempool::new(
            "t",
            MempoolConfig {
                count,
                data_room: 2048,
                cache_size: cache,
                mem: MemMode::NoHuge,
            },
        )
        .unwrap()
    }

    #[test]
    fn buffers_have_headroom_iova_and_disjoint_room() {
        let p = pool(8, 0);
        let a = p.alloc().unwrap();
        let b = p.alloc().unwrap();
        assert_eq!(a.headroom(), HEADROOM);
        assert_eq!(a.data_len(), 0);
        assert_eq!(a.tailroom(), 2048);
        assert_eq!(a.data_iova(), a.data_ptr() as u64, "IOVA = VA");
        let (lo, hi) = if a.data_ptr() < b.data_ptr() {
            (&a, &b)
        } else {
            (&b, &a)
        };
        assert!(lo.data_ptr() as usize + 2048 <= hi.data_ptr() as usize);
        assert!(p.zone().segment().contains(a.data_ptr() as usize, 2048));
    }

    #[test]
    fn exhaustion_is_counted_not_a_panic_and_drop_returns_buffers() {
        let p = pool(4, 0);
        let all: Vec<_> = (0..4).map(|_| p.alloc().unwrap()).collect();
        assert!(p.alloc().is_none());
        assert_eq!(p.alloc_failures(), 1);
        drop(all);
        assert_eq!(p.available(), 4);
    }

    #[test]
    fn cache_bulk_alloc_is_all_or_none_and_counts_failures() {
        let p = pool(40, 8);
        let mut c = p.cache(8);
        let mut b = Burst::new(64);
        assert!(c.alloc_bulk(&mut b, 32));
        assert_eq!(b.len(), 32);
        assert!(!c.alloc_bulk(&mut b, 32), "only 8 left");
        assert_eq!(b.len(), 32, "a failed bulk alloc hands out nothing");
        assert_eq!(p.alloc_failures(), 1);
        c.free_burst(&mut b);
        assert!(b.is_empty());
        drop(c);
        assert_eq!(
            p.available(),
            40,
            "the cache flushes everything back on drop"
        );
    }

    #[test]
    fn cache_flushes_above_threshold() {
        let p = pool(1024, 32);
        let mut c = p.cache(32);
        let mut b = Burst::new(256);
        assert!(c.alloc_bulk(&mut b, 256));
        c.free_burst(&mut b);
        assert!(
            c.len() < 48,
            "cache keeps at most 1.5x its size, has {}",
            c.len()
        );
        assert_eq!(p.available() + c.len(), 1024);
    }

    #[test]
    fn alloc_resets_metadata() {
        let p = pool(1, 4);
        let mut c = p.cache(4);
        let mut m = c.alloc().unwrap();
        m.append(100).unwrap().fill(7);
        m.set_rx_port(3, 1);
        m.set_ol_flags(crate::mbuf::offload::RX_LRO);
        assert!(m.adj(10));
        c.free(m);
        let m = c.alloc().unwrap();
        assert_eq!(
            (m.data_len(), m.port(), m.ol_flags(), m.headroom()),
            (0, NO_PORT, 0, HEADROOM)
        );
    }

    #[test]
    fn foreign_buffers_go_back_to_their_own_pool() {
        let p1 = pool(4, 4);
        let p2 = pool(4, 4);
        let mut c1 = p1.cache(4);
        let m = p2.alloc().unwrap();
        c1.free(m);
        assert_eq!(p2.available(), 4);
        assert_eq!(c1.len(), 0);
    }

    #[test]
    fn data_accessors_respect_bounds() {
        let p = pool(1, 0);
        let mut m = p.alloc().unwrap();
        assert!(!m.set_data_len(2049));
        assert!(m.set_data_len(2048));
        assert!(m.append(1).is_none());
        assert!(m.prepend(HEADROOM + 1).is_none());
        m.prepend(14).unwrap().copy_from_slice(&[1; 14]);
        assert_eq!(m.data_len(), 2048 + 14);
        assert_eq!(&m.data()[..14], &[1; 14]);
        assert!(m.trim(2048));
        assert_eq!(m.data_len(), 14);
        assert!(!m.adj(15));
    }

    #[test]
    fn invalid_config_names_the_value() {
        let e = Mempool::new(
            "x",
            MempoolConfig {
                count: 0,
                ..Default::default()
            },
        )
        .unwrap_err();
        assert!(e.to_string().contains("count 0"), "{e}");
        let e = Mempool::new(
            "x",
            MempoolConfig {
                cache_size: 600,
                mem: MemMode::NoHuge,
                ..Default::default()
            },
        )
        .unwrap_err();
        assert!(
            e.to_string().contains("600") && e.to_string().contains("0..=512"),
            "{e}"
        );
    }

    #[test]
    fn buffers_cross_threads_and_all_return() {
        let p = pool(512, 32);
        let (tx, rx) = std::sync::mpsc::channel::<Vec<Mbuf>>();
        let p2 = Arc::clone(&p);
        let t = std::thread::spawn(move || {
            let mut c = p2.cache(32);
            for batch in rx {
                for m in batch {
                    c.free(m);
                }
            }
        });
        let mut c = p.cache(32);
        for _ in 0..200 {
            let mut b = Burst::new(32);
            // Buffers in flight to the other thread can exhaust the pool for a moment.
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
            while !c.alloc_bulk(&mut b, 32) {
                assert!(
                    std::time::Instant::now() < deadline,
                    "buffers never came back"
                );
                std::thread::yield_now();
            }
            let mut v = Vec::new();
            b.drain_front(32, |m| v.push(m));
            tx.send(v).unwrap();
        }
        drop(tx);
        t.join().unwrap();
        drop(c);
        assert_eq!(p.available(), 512);
    }
}

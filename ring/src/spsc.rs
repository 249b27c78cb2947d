//! Single-producer / single-consumer ring (`rte_ring` SP/SC mode).
//!
//! [`channel`] returns the two ends. Each end is `Send` but neither `Sync`
//! nor `Clone`, so the type system guarantees one producer and one consumer.
//!
//! Index protocol: each side has a head (its reservation point) and a tail
//! (its publication point). With a single thread per side no reservation can
//! compete, so the head is a plain private field of the handle and only the
//! tail is shared: `prod_tail` (items published so far) and `cons_tail`
//! (items released so far), each on its own cache line. A burst copies its
//! items and then publishes them with one Release store of its tail.
//!
//! Each handle also keeps the last value of the opposite tail that it read,
//! and reads the shared opposite tail (an access to the other side's cache
//! line) only when that cached value says there is not enough room / not
//! enough items. The opposite tail only grows, so the cached value is always
//! a lower bound and using it is conservative.
//!
//! The handles cannot be shared between threads:
//!
//! ```compile_fail
//! fn assert_sync<S: Sync>() {}
//! assert_sync::<vdpakit_ring::Producer<u32>>();
//! ```
//! ```compile_fail
//! fn assert_sync<S: Sync>() {}
//! assert_sync::<vdpakit_ring::Consumer<u32>>();
//! ```
//! nor cloned:
//! ```compile_fail
//! let (p, _c) = vdpakit_ring::spsc::channel::<u32>(4).unwrap();
//! let _p2 = p.clone();
//! ```
//! but they can be moved to other threads:
//! ```
//! let (mut p, mut c) = vdpakit_ring::spsc::channel::<u32>(4).unwrap();
//! std::thread::spawn(move || assert!(p.enqueue_bulk(&[1, 2, 3]))).join().unwrap();
//! let mut out = [0; 3];
//! assert!(c.dequeue_bulk(&mut out));
//! assert_eq!(out, [1, 2, 3]);
//! ```

use core::cell::Cell;
use core::fmt;
use core::marker::PhantomData;

use crossbeam_utils::CachePadded;

use crate::RingError;
use crate::slots::Slots;
use crate::sync::{Arc, AtomicUsize, Ordering};

/// State shared by the two ends.
struct Shared<T> {
    /// Producer tail: free-running index one past the last published item.
    /// Written only by the producer.
    prod_tail: CachePadded<AtomicUsize>,
    /// Consumer tail: free-running index one past the last released slot.
    /// Written only by the consumer.
    cons_tail: CachePadded<AtomicUsize>,
    slots: Slots<T>,
}

/// Creates an SPSC ring with `capacity` slots, all usable.
///
/// `capacity` must be a power of two in `1..=2^31`, otherwise
/// [`RingError::InvalidCapacity`] is returned.
pub fn channel<T: Copy + Send>(capacity: usize) -> Result<(Producer<T>, Consumer<T>), RingError> {
    with_start_index(capacity, 0)
}

/// [`channel`] with both indices starting at `start` instead of 0, so that
/// tests can exercise the wrap-around of the free-running indices.
pub(crate) fn with_start_index<T: Copy + Send>(
    capacity: usize,
    start: usize,
) -> Result<(Producer<T>, Consumer<T>), RingError> {
    let capacity = crate::check_capacity(capacity)?;
    let shared = Arc::new(Shared {
        prod_tail: CachePadded::new(AtomicUsize::new(start)),
        cons_tail: CachePadded::new(AtomicUsize::new(start)),
        slots: Slots::new(capacity)?,
    });
    let producer = Producer {
        shared: Arc::clone(&shared),
        head: start,
        cached_cons_tail: start,
        capacity,
        _not_sync: PhantomData,
    };
    let consumer = Consumer {
        shared,
        head: start,
        cached_prod_tail: start,
        capacity,
        _not_sync: PhantomData,
    };
    Ok((producer, consumer))
}

/// The sending end of an SPSC ring. `Send`, not `Sync`, not `Clone`.
pub struct Producer<T> {
    shared: Arc<Shared<T>>,
    /// Producer head: next index to write. Equal to the shared producer tail
    /// between calls; kept privately because only this handle moves it.
    head: usize,
    /// Last consumer tail read from `shared.cons_tail` (a lower bound of it).
    cached_cons_tail: usize,
    capacity: usize,
    /// Makes the handle `!Sync` (but still `Send`).
    _not_sync: PhantomData<Cell<()>>,
}

/// The receiving end of an SPSC ring. `Send`, not `Sync`, not `Clone`.
pub struct Consumer<T> {
    shared: Arc<Shared<T>>,
    /// Consumer head: next index to read. Equal to the shared consumer tail
    /// between calls.
    head: usize,
    /// Last producer tail read from `shared.prod_tail` (a lower bound of it).
    cached_prod_tail: usize,
    capacity: usize,
    /// Makes the handle `!Sync` (but still `Send`).
    _not_sync: PhantomData<Cell<()>>,
}

impl<T: Copy + Send> Producer<T> {
    /// Free slots according to the cached consumer tail; refreshes the cache
    /// from the shared consumer tail if that is fewer than `want`.
    #[inline(always)]
    fn free_for(&mut self, want: usize) -> usize {
        // The cached tail is a value the consumer tail once had and the
        // consumer tail never passes our head, so `head - cached` is in
        // `0..=capacity`.
        let free = self.capacity - self.head.wrapping_sub(self.cached_cons_tail);
        if free >= want {
            return free;
        }
        // Acquire pairs with the consumer's Release store of `cons_tail`: its
        // reads of the slots it released happen-before our overwriting them.
        // (Values kept in the cache were also loaded with Acquire, so the
        // fast path above is covered by the same edge.)
        self.cached_cons_tail = self.shared.cons_tail.load(Ordering::Acquire);
        self.capacity - self.head.wrapping_sub(self.cached_cons_tail)
    }

    /// Copies `items[..n]` in and publishes them.
    #[inline(always)]
    fn commit(&mut self, items: &[T]) {
        // SAFETY: the caller checked `items.len() <= free_for(..)`, so the
        // slots `head .. head + len` were released by the consumer (its
        // reads happen-before, see `free_for`) and the consumer will not read
        // them before we publish them below; we are the only producer.
        unsafe { self.shared.slots.write(self.head, items) };
        self.head = self.head.wrapping_add(items.len());
        // Release: the slot writes above happen-before any consumer Acquire
        // load that sees the new tail. One publication per burst.
        self.shared.prod_tail.store(self.head, Ordering::Release);
    }

    /// Enqueues as many items from the front of `items` as fit; returns how
    /// many were enqueued (0 if the ring is full or `items` is empty).
    #[inline]
    pub fn enqueue_burst(&mut self, items: &[T]) -> usize {
        let n = self.free_for(items.len()).min(items.len());
        if n == 0 {
            return 0;
        }
        self.commit(&items[..n]);
        n
    }

    /// Enqueues all of `items` and returns `true`, or enqueues nothing and
    /// returns `false` if there is not room for all of them.
    #[inline]
    pub fn enqueue_bulk(&mut self, items: &[T]) -> bool {
        if self.free_for(items.len()) < items.len() {
            return false;
        }
        if !items.is_empty() {
            self.commit(items);
        }
        true
    }

    /// Number of items in the ring (a snapshot: the consumer may be
    /// removing items concurrently, so the real count can only be lower).
    #[inline]
    pub fn len(&self) -> usize {
        // Relaxed: a count, not a permission to touch slots.
        self.head
            .wrapping_sub(self.shared.cons_tail.load(Ordering::Relaxed))
    }

    /// `true` if the ring holds no items (snapshot, see [`Producer::len`]).
    #[inline]
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Number of slots.
    #[inline]
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Free slots (a snapshot: the real number can only be higher).
    #[inline]
    pub fn free_space(&self) -> usize {
        self.capacity - self.len()
    }
}

impl<T: Copy + Send> Consumer<T> {
    /// Items available according to the cached producer tail; refreshes the
    /// cache from the shared producer tail if that is fewer than `want`.
    #[inline(always)]
    fn avail_for(&mut self, want: usize) -> usize {
        // The cached tail never passes the real producer tail and we never
        // pass a value of it we have seen, so this is in `0..=capacity`.
        let avail = self.cached_prod_tail.wrapping_sub(self.head);
        if avail >= want {
            return avail;
        }
        // Acquire pairs with the producer's Release store of `prod_tail`: the
        // item writes up to that tail happen-before our reads.
        self.cached_prod_tail = self.shared.prod_tail.load(Ordering::Acquire);
        self.cached_prod_tail.wrapping_sub(self.head)
    }

    /// Copies out `out.len()` available items and releases their slots.
    #[inline(always)]
    fn commit(&mut self, out: &mut [T]) {
        // SAFETY: the caller checked `out.len() <= avail_for(..)`, so the
        // slots `head .. head + len` were published by the producer (its
        // writes happen-before, see `avail_for`) and it will not write them
        // again before we release them below; we are the only consumer.
        unsafe { self.shared.slots.read(self.head, out) };
        self.head = self.head.wrapping_add(out.len());
        // Release: our slot reads above happen-before the producer's Acquire
        // load that sees the freed room, so it cannot overwrite them early.
        self.shared.cons_tail.store(self.head, Ordering::Release);
    }

    /// Dequeues up to `out.len()` items into the front of `out`; returns how
    /// many were dequeued (0 if the ring is empty or `out` is empty).
    #[inline]
    pub fn dequeue_burst(&mut self, out: &mut [T]) -> usize {
        let n = self.avail_for(out.len()).min(out.len());
        if n == 0 {
            return 0;
        }
        self.commit(&mut out[..n]);
        n
    }

    /// Dequeues exactly `out.len()` items and returns `true`, or dequeues
    /// nothing (leaving `out` untouched) and returns `false` if fewer are
    /// available.
    #[inline]
    pub fn dequeue_bulk(&mut self, out: &mut [T]) -> bool {
        if self.avail_for(out.len()) < out.len() {
            return false;
        }
        if !out.is_empty() {
            self.commit(out);
        }
        true
    }

    /// Number of items in the ring (a snapshot: the producer may be adding
    /// items concurrently, so the real count can only be higher).
    #[inline]
    pub fn len(&self) -> usize {
        // Relaxed: a count, not a permission to touch slots.
        self.shared
            .prod_tail
            .load(Ordering::Relaxed)
            .wrapping_sub(self.head)
    }

    /// `true` if the ring holds no items (snapshot, see [`Consumer::len`]).
    #[inline]
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Number of slots.
    #[inline]
    pub fn capacity(&self) -> usize {
        self.capacity
    }
}

impl<T> fmt::Debug for Producer<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Producer")
            .field("capacity", &self.capacity)
            .field("head", &self.head)
            .field("cached_cons_tail", &self.cached_cons_tail)
            .finish_non_exhaustive()
    }
}

impl<T> fmt::Debug for Consumer<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Consumer")
            .field("capacity", &self.capacity)
            .field("head", &self.head)
            .field("cached_prod_tail", &self.cached_prod_tail)
            .finish_non_exhaustive()
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;

    /// Runs a fill/drain pattern with odd burst sizes across the `usize`
    /// wrap-around of the free-running indices and checks FIFO order.
    #[test]
    fn indices_wrap_around_usize() {
        let start = usize::MAX - 20;
        let (mut p, mut c) = with_start_index::<u32>(8, start).unwrap();
        let mut next_in = 0u32;
        let mut next_out = 0u32;
        let mut out = [0u32; 8];
        for round in 0..40 {
            let want = 1 + round % 8;
            let items: Vec<u32> = (next_in..next_in + want as u32).collect();
            let free = p.free_space();
            let n = p.enqueue_burst(&items);
            assert_eq!(n, want.min(free));
            next_in += n as u32;
            assert!(p.len() <= 8);
            let take = 1 + (round * 3) % 8;
            let m = c.dequeue_burst(&mut out[..take]);
            for &v in &out[..m] {
                assert_eq!(v, next_out);
                next_out += 1;
            }
        }
        // The indices really wrapped.
        assert!(p.head < start);
        let m = c.dequeue_burst(&mut out);
        for &v in &out[..m] {
            assert_eq!(v, next_out);
            next_out += 1;
        }
        assert_eq!(next_in, next_out);
        assert!(c.is_empty());
    }

    #[test]
    fn full_at_capacity_across_wrap() {
        let (mut p, mut c) = with_start_index::<u8>(4, usize::MAX - 1).unwrap();
        assert!(p.enqueue_bulk(&[1, 2, 3, 4]));
        assert_eq!(p.len(), 4);
        assert_eq!(p.free_space(), 0);
        assert_eq!(p.enqueue_burst(&[5]), 0);
        let mut out = [0; 4];
        assert!(c.dequeue_bulk(&mut out));
        assert_eq!(out, [1, 2, 3, 4]);
        assert!(c.is_empty());
    }
}

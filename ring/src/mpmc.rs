//! Multi-producer / multi-consumer ring (`rte_ring` MP/MC mode).

use core::fmt;

use crossbeam_utils::CachePadded;

use crate::RingError;
use crate::slots::Slots;
use crate::sync::{AtomicUsize, Backoff, Ordering};

/// Index state of one side (producers or consumers), on its own cache line.
struct Side {
    /// Reservation point: threads of this side claim `head .. head + n` with
    /// one CAS.
    head: AtomicUsize,
    /// Publication point: everything below it is finished (written, for the
    /// producer side; read and released, for the consumer side). Reservations
    /// publish in reservation order.
    tail: AtomicUsize,
    /// A value the *opposite* side's tail once had (a lower bound of it),
    /// shared by the threads of this side so that the opposite cache line is
    /// only read when this value says there is not enough room / items.
    opposite_tail: AtomicUsize,
}

impl Side {
    fn new(start: usize) -> CachePadded<Self> {
        CachePadded::new(Self {
            head: AtomicUsize::new(start),
            tail: AtomicUsize::new(start),
            opposite_tail: AtomicUsize::new(start),
        })
    }
}

/// A bounded MPMC ring used through `&self` by any number of threads.
///
/// `Send + Sync` when `T: Send`; share it with `Arc<MpmcRing<T>>` or scoped
/// threads.
///
/// An operation reserves slots with one compare-and-swap on its side's head,
/// copies the items, waits (spinning) until the reservations made before it
/// on the same side are published, and then publishes its own with one
/// Release store of the side's tail. Like `rte_ring`, a thread preempted
/// between reservation and publication delays the threads that reserved after
/// it (they spin, then yield); no item is ever lost or reordered.
///
/// ```
/// use std::sync::Arc;
/// let ring = Arc::new(vdpakit_ring::MpmcRing::<u64>::new(64).unwrap());
/// let r = Arc::clone(&ring);
/// std::thread::spawn(move || assert!(r.enqueue_bulk(&[1, 2, 3]))).join().unwrap();
/// let mut out = [0; 8];
/// assert_eq!(ring.dequeue_burst(&mut out), 3);
/// assert_eq!(&out[..3], &[1, 2, 3]);
/// ```
pub struct MpmcRing<T> {
    prod: CachePadded<Side>,
    cons: CachePadded<Side>,
    slots: Slots<T>,
}

/// Which side an operation runs on.
#[derive(Clone, Copy)]
enum Role {
    Producer,
    Consumer,
}

impl<T: Copy + Send> MpmcRing<T> {
    /// Creates a ring with `capacity` slots, all usable.
    ///
    /// `capacity` must be a power of two in `1..=2^31`, otherwise
    /// [`RingError::InvalidCapacity`] is returned.
    pub fn new(capacity: usize) -> Result<Self, RingError> {
        Self::with_start_index(capacity, 0)
    }

    /// [`MpmcRing::new`] with all indices starting at `start` (tests use it
    /// to exercise the wrap-around of the free-running indices).
    pub(crate) fn with_start_index(capacity: usize, start: usize) -> Result<Self, RingError> {
        let capacity = crate::check_capacity(capacity)?;
        Ok(Self {
            prod: Side::new(start),
            cons: Side::new(start),
            slots: Slots::new(capacity)?,
        })
    }

    /// `(own side, opposite side)` for `role`.
    #[inline(always)]
    fn sides(&self, role: Role) -> (&Side, &Side) {
        match role {
            Role::Producer => (&self.prod, &self.cons),
            Role::Consumer => (&self.cons, &self.prod),
        }
    }

    /// Signed distance from `head` to the opposite tail value `opp`, in the
    /// sense that matters to `role`: for producers the slots in use
    /// (`head - opp`), for consumers the items available (`opp - head`).
    /// Indices differ by far less than `isize::MAX`, so the wrapping
    /// difference read as signed is the true signed distance.
    #[inline(always)]
    fn distance(role: Role, head: usize, opp: usize) -> isize {
        match role {
            Role::Producer => head.wrapping_sub(opp) as isize,
            Role::Consumer => opp.wrapping_sub(head) as isize,
        }
    }

    /// `true` if `opp` is behind `head` by more than a consistent snapshot
    /// allows (producer: more than `capacity` slots in use; consumer: fewer
    /// than 0 items), i.e. `opp` is older than the state `head` reflects.
    #[inline(always)]
    fn opposite_behind(role: Role, capacity: usize, head: usize, opp: usize) -> bool {
        let d = Self::distance(role, head, opp);
        match role {
            Role::Producer => d > capacity as isize,
            Role::Consumer => d < 0,
        }
    }

    /// Entries (free slots for producers, items for consumers) that `role`
    /// may take from its side's `head`, given `opp`, a value the opposite
    /// tail once had (fresh or cached). Always in `0..=capacity`.
    ///
    /// * Consistent values: `capacity - (head - opp)` free slots, or
    ///   `opp - head` items.
    /// * `opp` behind `head` ([`Self::opposite_behind`]): `opp` is stale. This
    ///   happens with the cached value, which may lag by laps. Report 0
    ///   entries, which makes the caller refresh it. (A freshly loaded `opp`
    ///   is never behind, see `reserve`.)
    /// * `head` behind `opp` (producer: `head < opp`; consumer:
    ///   `opp - head > capacity`): `head` is stale. Report `capacity`; the CAS
    ///   on `head` is then bound to fail and hand us the current head. It must
    ///   fail because the opposite tail only reaches `opp` after our side's
    ///   head got past it (producer) or to within a lap of it (consumer), and
    ///   that head move happens-before our Acquire of `opp` (directly or
    ///   through the Release/Acquire cache), so coherence forbids our later
    ///   CAS from reading the older head value.
    #[inline(always)]
    fn entries(role: Role, capacity: usize, head: usize, opp: usize) -> usize {
        let d = Self::distance(role, head, opp);
        match role {
            Role::Producer if d < 0 => capacity,
            Role::Producer => capacity.saturating_sub(d as usize),
            Role::Consumer if d < 0 => 0,
            Role::Consumer => (d as usize).min(capacity),
        }
    }

    /// Reserves up to `want` entries (exactly `want` if `bulk`) on `role`'s
    /// side. Returns the old head and the count, or `None` if nothing was
    /// reserved.
    #[inline(always)]
    fn reserve(&self, role: Role, want: usize, bulk: bool) -> Option<(usize, usize)> {
        if want == 0 {
            return None;
        }
        let (own, opposite) = self.sides(role);
        let capacity = self.slots.capacity();
        // Acquire pairs with the Release of the CAS that wrote this head
        // value: the writer read an opposite tail value consistent with it
        // before its CAS, so our fresh load of the opposite tail below reads
        // that value or a newer one, never one "behind" `head`. (A stale
        // `head` is fine: the CAS fails.) On x86 this is a plain load.
        let mut head = own.head.load(Ordering::Acquire);
        loop {
            // Acquire on the cache: it pairs with the Release store below
            // made by whichever thread of our side refreshed it after an
            // Acquire load of the opposite tail, so happens-before reaches
            // from the opposite side's slot accesses to us through the cache
            // as well. (A Relaxed cache would let a producer overwrite a slot
            // whose read by a consumer is not ordered before the write, or a
            // consumer read an item whose write is not ordered before the
            // read: a data race that the loom tests catch.) On x86 both are
            // plain moves.
            let cached = own.opposite_tail.load(Ordering::Acquire);
            let mut entries = Self::entries(role, capacity, head, cached);
            if entries < want {
                // Acquire pairs with the opposite side's Release publication
                // of its tail: producers' item writes / consumers' slot reads
                // below that tail happen-before our slot accesses.
                let opp = opposite.tail.load(Ordering::Acquire);
                if opp != cached {
                    // Release: passes the edge just acquired on to the
                    // threads of our side that will use the cached value.
                    // Another thread may have stored a newer value meanwhile;
                    // overwriting it with ours is harmless, ours is still a
                    // value the opposite tail once had.
                    own.opposite_tail.store(opp, Ordering::Release);
                }
                // The claim made at the head load above; model-checked by
                // the loom tests, and checked in debug builds.
                if cfg!(any(loom, debug_assertions)) {
                    assert!(
                        !Self::opposite_behind(role, capacity, head, opp),
                        "fresh opposite tail {opp} behind head {head}"
                    );
                }
                entries = Self::entries(role, capacity, head, opp);
            }
            let n = if entries >= want {
                want
            } else if bulk {
                return None;
            } else {
                entries
            };
            if n == 0 {
                return None;
            }
            // The CAS hands out disjoint index ranges; the ordering of the
            // slot accesses themselves is carried by the tails. If it
            // succeeds, `head` was current, so `entries` computed from it is a
            // valid bound (the opposite tail only grows). Release on success
            // and Acquire on failure only serve the head/opposite-tail
            // consistency described at the head load (a `lock cmpxchg` on x86
            // either way).
            match own.head.compare_exchange_weak(
                head,
                head.wrapping_add(n),
                Ordering::Release,
                Ordering::Acquire,
            ) {
                Ok(_) => return Some((head, n)),
                Err(current) => head = current,
            }
        }
    }

    /// Publishes the reservation `head .. head + n` of `role`'s side once all
    /// earlier reservations of that side are published.
    #[inline(always)]
    fn publish(&self, role: Role, head: usize, n: usize) {
        let (own, _) = self.sides(role);
        // Acquire: synchronises with the Release publication of the
        // reservation just before ours, so its slot accesses (and, by
        // induction, all earlier ones) happen-before our Release store below
        // and hence before the opposite side's Acquire load of our tail.
        let mut backoff = Backoff::default();
        while own.tail.load(Ordering::Acquire) != head {
            backoff.snooze();
        }
        // Release: one publication for the whole burst.
        own.tail.store(head.wrapping_add(n), Ordering::Release);
    }

    #[inline(always)]
    fn enqueue(&self, items: &[T], bulk: bool) -> usize {
        let Some((head, n)) = self.reserve(Role::Producer, items.len(), bulk) else {
            return 0;
        };
        // SAFETY: the CAS gave us `head .. head + n` exclusively among
        // producers; `n` was bounded by the free room computed from a
        // consumer tail value obtained with Acquire (directly or through the
        // Acquire/Release cache), so consumers finished reading these slots
        // before we write them, and no consumer reads them before we publish
        // them below. `n <= items.len()` and `n <= capacity`.
        unsafe { self.slots.write(head, &items[..n]) };
        self.publish(Role::Producer, head, n);
        n
    }

    #[inline(always)]
    fn dequeue(&self, out: &mut [T], bulk: bool) -> usize {
        let Some((head, n)) = self.reserve(Role::Consumer, out.len(), bulk) else {
            return 0;
        };
        // SAFETY: the CAS gave us `head .. head + n` exclusively among
        // consumers; `n` was bounded by a producer tail value obtained with
        // Acquire, so these slots hold items whose writes happen-before this
        // read, and no producer writes them again before we release them
        // below. `n <= out.len()` and `n <= capacity`.
        unsafe { self.slots.read(head, &mut out[..n]) };
        self.publish(Role::Consumer, head, n);
        n
    }

    /// Enqueues as many items from the front of `items` as fit; returns how
    /// many were enqueued.
    #[inline]
    pub fn enqueue_burst(&self, items: &[T]) -> usize {
        self.enqueue(items, false)
    }

    /// Enqueues all of `items` and returns `true`, or nothing and returns
    /// `false` if there is not room for all of them.
    #[inline]
    pub fn enqueue_bulk(&self, items: &[T]) -> bool {
        items.is_empty() || self.enqueue(items, true) == items.len()
    }

    /// Dequeues up to `out.len()` items into the front of `out`; returns how
    /// many were dequeued.
    #[inline]
    pub fn dequeue_burst(&self, out: &mut [T]) -> usize {
        self.dequeue(out, false)
    }

    /// Dequeues exactly `out.len()` items and returns `true`, or nothing
    /// (leaving `out` untouched) and returns `false` if fewer are available.
    #[inline]
    pub fn dequeue_bulk(&self, out: &mut [T]) -> bool {
        out.is_empty() || self.dequeue(out, true) == out.len()
    }

    /// Number of published items not yet released by consumers (a snapshot;
    /// clamped to the capacity).
    #[inline]
    pub fn len(&self) -> usize {
        // Consumer tail first, with Acquire, so that the producer tail read
        // after it is at least as recent as the one the consumers saw: the
        // difference cannot be negative. It can exceed the capacity if both
        // sides move between the two loads, hence the clamp.
        let cons = self.cons.tail.load(Ordering::Acquire);
        let prod = self.prod.tail.load(Ordering::Relaxed);
        prod.wrapping_sub(cons).min(self.slots.capacity())
    }

    /// `true` if [`MpmcRing::len`] is 0.
    #[inline]
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Number of slots.
    #[inline]
    pub fn capacity(&self) -> usize {
        self.slots.capacity()
    }
}

impl<T> fmt::Debug for MpmcRing<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MpmcRing")
            .field("capacity", &self.slots.capacity())
            .field("prod_head", &self.prod.head.load(Ordering::Relaxed))
            .field("prod_tail", &self.prod.tail.load(Ordering::Relaxed))
            .field("cons_head", &self.cons.head.load(Ordering::Relaxed))
            .field("cons_tail", &self.cons.tail.load(Ordering::Relaxed))
            .finish_non_exhaustive()
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;

    #[test]
    fn indices_wrap_around_usize() {
        let start = usize::MAX - 13;
        let ring = MpmcRing::<u16>::with_start_index(8, start).unwrap();
        let mut next_in = 0u16;
        let mut next_out = 0u16;
        let mut out = [0u16; 8];
        for round in 0..50usize {
            let want = 1 + round % 7;
            let items: Vec<u16> = (next_in..next_in + want as u16).collect();
            let free = ring.capacity() - ring.len();
            let n = ring.enqueue_burst(&items);
            assert_eq!(n, want.min(free));
            next_in += n as u16;
            let take = 1 + (round * 5) % 8;
            let m = ring.dequeue_burst(&mut out[..take]);
            for &v in &out[..m] {
                assert_eq!(v, next_out);
                next_out += 1;
            }
        }
        assert!(ring.prod.tail.load(Ordering::Relaxed) < start);
        while let m @ 1.. = ring.dequeue_burst(&mut out) {
            for &v in &out[..m] {
                assert_eq!(v, next_out);
                next_out += 1;
            }
        }
        assert_eq!(next_in, next_out);
    }

    /// A stale cached opposite tail (more than a lap behind) must be treated
    /// as "refresh", not as a huge amount of room.
    #[test]
    fn stale_cache_is_refreshed() {
        let ring = MpmcRing::<u32>::new(4).unwrap();
        let mut out = [0; 4];
        for lap in 0..3u32 {
            assert!(ring.enqueue_bulk(&[lap; 4]));
            assert!(ring.dequeue_bulk(&mut out));
            assert_eq!(out, [lap; 4]);
        }
        // Pretend the producers' cache is from before all of that.
        ring.prod.opposite_tail.store(0, Ordering::Relaxed);
        ring.cons.opposite_tail.store(0, Ordering::Relaxed);
        assert_eq!(ring.enqueue_burst(&[7; 8]), 4);
        assert_eq!(ring.enqueue_burst(&[8; 1]), 0);
        ring.cons.opposite_tail.store(0, Ordering::Relaxed);
        assert_eq!(ring.dequeue_burst(&mut [0; 8]), 4);
        assert_eq!(ring.dequeue_burst(&mut out), 0);
    }
}

//! Single-threaded behaviour of the public API: capacity validation, bulk
//! (all-or-none) and burst (as many as possible) semantics, and a
//! model-based comparison against `VecDeque` that exercises the wrap-around
//! split copies.
#![cfg(not(loom))]

use std::collections::VecDeque;

use vdpakit_ring::{MAX_CAPACITY, MpmcRing, RingError, spsc};

const BAD_CAPACITIES: [usize; 8] = [
    0,
    3,
    6,
    100,
    1000,
    (1 << 20) + 1,
    MAX_CAPACITY - 1,
    usize::MAX,
];

#[test]
fn rejects_invalid_capacities_naming_the_value() {
    for bad in BAD_CAPACITIES {
        let err = spsc::channel::<u64>(bad).unwrap_err();
        assert_eq!(err, RingError::InvalidCapacity { requested: bad });
        let msg = err.to_string();
        assert!(msg.contains(&bad.to_string()), "{msg}");
        assert!(msg.contains("power of two"), "{msg}");

        let err = MpmcRing::<u64>::new(bad).unwrap_err();
        assert_eq!(err, RingError::InvalidCapacity { requested: bad });
        assert!(err.to_string().contains(&bad.to_string()));
    }
    #[cfg(target_pointer_width = "64")]
    {
        let too_big = MAX_CAPACITY * 2;
        assert_eq!(
            MpmcRing::<()>::new(too_big).unwrap_err(),
            RingError::InvalidCapacity { requested: too_big }
        );
        assert!(spsc::channel::<()>(too_big).is_err());
    }
}

#[test]
fn accepts_powers_of_two_up_to_2_pow_31() {
    for cap in [1usize, 2, 4, 64, 1024, 1 << 16] {
        let (p, c) = spsc::channel::<u32>(cap).unwrap();
        assert_eq!((p.capacity(), c.capacity()), (cap, cap));
        assert_eq!(MpmcRing::<u32>::new(cap).unwrap().capacity(), cap);
    }
    // The largest capacity, with a zero-sized item so nothing is allocated.
    let ring = MpmcRing::<()>::new(MAX_CAPACITY).unwrap();
    assert_eq!(ring.capacity(), 1 << 31);
    assert_eq!(ring.enqueue_burst(&[(); 5]), 5);
    assert_eq!(ring.len(), 5);
    let (mut p, _c) = spsc::channel::<()>(MAX_CAPACITY).unwrap();
    assert!(p.enqueue_bulk(&[(); 3]));
    assert_eq!(p.free_space(), MAX_CAPACITY - 3);
}

#[test]
fn capacity_one_works() {
    let (mut p, mut c) = spsc::channel::<u8>(1).unwrap();
    let ring = MpmcRing::<u8>::new(1).unwrap();
    let mut out = [0u8; 1];
    for i in 0..5u8 {
        assert_eq!(p.enqueue_burst(&[i, i]), 1);
        assert!(!p.enqueue_bulk(&[i]));
        assert!(c.dequeue_bulk(&mut out));
        assert_eq!(out, [i]);
        assert_eq!(ring.enqueue_burst(&[i, i]), 1);
        assert!(!ring.enqueue_bulk(&[i]));
        assert!(ring.dequeue_bulk(&mut out));
        assert_eq!(out, [i]);
    }
}

#[test]
fn spsc_all_slots_usable_and_burst_is_prefix() {
    let (mut p, mut c) = spsc::channel::<u32>(8).unwrap();
    assert!(p.is_empty() && c.is_empty());
    assert_eq!(p.enqueue_burst(&[0, 1, 2, 3, 4]), 5);
    assert_eq!(p.enqueue_burst(&[5, 6, 7, 8, 9]), 3, "only 3 of 5 fit");
    assert_eq!((p.len(), c.len(), p.free_space()), (8, 8, 0));
    assert_eq!(p.enqueue_burst(&[42]), 0);
    let mut out = [u32::MAX; 10];
    assert_eq!(c.dequeue_burst(&mut out), 8);
    assert_eq!(out[..8], [0, 1, 2, 3, 4, 5, 6, 7]);
    assert_eq!(out[8..], [u32::MAX; 2], "untouched past the count");
    assert_eq!(c.dequeue_burst(&mut out), 0);
    assert!(c.is_empty() && p.is_empty());
}

#[test]
fn spsc_bulk_is_all_or_nothing() {
    let (mut p, mut c) = spsc::channel::<u32>(8).unwrap();
    assert!(p.enqueue_bulk(&[1, 2, 3, 4, 5]));
    assert!(
        !p.enqueue_bulk(&[6, 7, 8, 9]),
        "4 do not fit in 3 free slots"
    );
    assert_eq!(p.len(), 5, "failed bulk enqueued nothing");
    assert!(
        !p.enqueue_bulk(&[0; 9]),
        "more than the capacity never fits"
    );
    assert!(p.enqueue_bulk(&[6, 7, 8]));
    assert_eq!(p.free_space(), 0);

    let mut out = [0u32; 9];
    assert!(!c.dequeue_bulk(&mut out), "9 > 8 available");
    assert_eq!(
        out, [0; 9],
        "failed bulk dequeue leaves the buffer untouched"
    );
    assert_eq!(c.len(), 8);
    let mut three = [0u32; 3];
    assert!(c.dequeue_bulk(&mut three));
    assert_eq!(three, [1, 2, 3]);
    let mut five = [0u32; 5];
    assert!(c.dequeue_bulk(&mut five));
    assert_eq!(five, [4, 5, 6, 7, 8]);
    assert!(!c.dequeue_bulk(&mut three));
}

#[test]
fn empty_slices() {
    let (mut p, mut c) = spsc::channel::<u32>(2).unwrap();
    assert_eq!(p.enqueue_burst(&[]), 0);
    assert!(p.enqueue_bulk(&[]));
    assert_eq!(c.dequeue_burst(&mut []), 0);
    assert!(c.dequeue_bulk(&mut []));
    assert!(p.is_empty());
    let ring = MpmcRing::<u32>::new(2).unwrap();
    assert_eq!(ring.enqueue_burst(&[]), 0);
    assert!(ring.enqueue_bulk(&[]));
    assert!(ring.enqueue_bulk(&[1, 2]));
    assert!(ring.enqueue_bulk(&[]), "zero items always fit");
    assert!(ring.dequeue_bulk(&mut []));
    assert_eq!(ring.len(), 2);
}

#[test]
fn mpmc_all_slots_usable_and_bulk_is_all_or_nothing() {
    let ring = MpmcRing::<u32>::new(8).unwrap();
    assert!(ring.is_empty());
    assert_eq!(ring.enqueue_burst(&[0, 1, 2, 3, 4]), 5);
    assert!(!ring.enqueue_bulk(&[5, 6, 7, 8]));
    assert_eq!(ring.len(), 5);
    assert_eq!(ring.enqueue_burst(&[5, 6, 7, 8, 9]), 3);
    assert_eq!(ring.len(), 8);
    assert_eq!(ring.enqueue_burst(&[1]), 0);
    assert!(!ring.enqueue_bulk(&[1]));

    let mut out = [0u32; 9];
    assert!(!ring.dequeue_bulk(&mut out));
    assert_eq!(out, [0; 9]);
    assert_eq!(ring.len(), 8);
    assert!(ring.dequeue_bulk(&mut out[..2]));
    assert_eq!(out[..2], [0, 1]);
    assert_eq!(ring.dequeue_burst(&mut out), 6);
    assert_eq!(out[..6], [2, 3, 4, 5, 6, 7]);
    assert!(ring.is_empty());
}

/// xorshift64*: deterministic pseudo-random numbers without a dependency.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

/// The operations a ring flavour offers, so one model test covers both.
trait Ops {
    fn enq_burst(&mut self, items: &[u32]) -> usize;
    fn enq_bulk(&mut self, items: &[u32]) -> bool;
    fn deq_burst(&mut self, out: &mut [u32]) -> usize;
    fn deq_bulk(&mut self, out: &mut [u32]) -> bool;
    fn len(&self) -> usize;
}

impl Ops for (spsc::Producer<u32>, spsc::Consumer<u32>) {
    fn enq_burst(&mut self, items: &[u32]) -> usize {
        self.0.enqueue_burst(items)
    }
    fn enq_bulk(&mut self, items: &[u32]) -> bool {
        self.0.enqueue_bulk(items)
    }
    fn deq_burst(&mut self, out: &mut [u32]) -> usize {
        self.1.dequeue_burst(out)
    }
    fn deq_bulk(&mut self, out: &mut [u32]) -> bool {
        self.1.dequeue_bulk(out)
    }
    fn len(&self) -> usize {
        assert_eq!(self.0.len(), self.1.len());
        self.0.len()
    }
}

impl Ops for MpmcRing<u32> {
    fn enq_burst(&mut self, items: &[u32]) -> usize {
        self.enqueue_burst(items)
    }
    fn enq_bulk(&mut self, items: &[u32]) -> bool {
        self.enqueue_bulk(items)
    }
    fn deq_burst(&mut self, out: &mut [u32]) -> usize {
        self.dequeue_burst(out)
    }
    fn deq_bulk(&mut self, out: &mut [u32]) -> bool {
        self.dequeue_bulk(out)
    }
    fn len(&self) -> usize {
        MpmcRing::len(self)
    }
}

/// Random bursts/bulks of 0..=capacity+2 items against a `VecDeque` model.
fn compare_with_model(ring: &mut impl Ops, capacity: usize, seed: u64) {
    let mut rng = Rng(seed);
    let mut model = VecDeque::new();
    let mut next = 0u32;
    let mut out = vec![0u32; capacity + 2];
    for _ in 0..20_000 {
        let k = rng.below(capacity + 3);
        match rng.below(4) {
            0 => {
                let items: Vec<u32> = (next..next + k as u32).collect();
                let n = ring.enq_burst(&items);
                assert_eq!(n, k.min(capacity - model.len()));
                model.extend(&items[..n]);
                next += n as u32;
            }
            1 => {
                let items: Vec<u32> = (next..next + k as u32).collect();
                let ok = ring.enq_bulk(&items);
                assert_eq!(ok, k <= capacity - model.len());
                if ok {
                    model.extend(&items);
                    next += k as u32;
                }
            }
            2 => {
                let n = ring.deq_burst(&mut out[..k]);
                assert_eq!(n, k.min(model.len()));
                for &v in &out[..n] {
                    assert_eq!(Some(v), model.pop_front());
                }
            }
            _ => {
                out[..k].fill(u32::MAX);
                let ok = ring.deq_bulk(&mut out[..k]);
                assert_eq!(ok, k <= model.len());
                if ok {
                    for &v in &out[..k] {
                        assert_eq!(Some(v), model.pop_front());
                    }
                } else {
                    assert!(out[..k].iter().all(|&v| v == u32::MAX));
                }
            }
        }
        assert_eq!(ring.len(), model.len());
    }
}

#[test]
fn spsc_matches_fifo_model() {
    for (cap, seed) in [(1, 1), (2, 2), (8, 3), (16, 4), (64, 5)] {
        compare_with_model(&mut spsc::channel::<u32>(cap).unwrap(), cap, seed);
    }
}

#[test]
fn mpmc_matches_fifo_model() {
    for (cap, seed) in [(1, 6), (2, 7), (8, 8), (16, 9), (64, 10)] {
        compare_with_model(&mut MpmcRing::<u32>::new(cap).unwrap(), cap, seed);
    }
}

#[test]
fn thread_safety_markers() {
    fn send<T: Send>() {}
    fn sync<T: Sync>() {}
    send::<spsc::Producer<u64>>();
    send::<spsc::Consumer<u64>>();
    send::<MpmcRing<u64>>();
    sync::<MpmcRing<u64>>();
    send::<RingError>();
    sync::<RingError>();
}

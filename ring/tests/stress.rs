//! Multi-threaded stress tests with real threads (not loom).
//!
//! Sizes are chosen to run in a few seconds in a debug build on two cores;
//! ring users yield the CPU after a short spin so that oversubscribed runs
//! (more threads than cores) still make progress.
#![cfg(not(loom))]

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use vdpakit_ring::{MpmcRing, spsc};

/// xorshift64*: deterministic pseudo-random burst sizes without a dependency.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    /// Uniform in `1..=max`.
    fn burst(&mut self, max: usize) -> usize {
        1 + (self.next() % max as u64) as usize
    }
}

/// Idle-loop helper: spins first, then yields; panics 60 s after creation so
/// that a bug that loses items (or a panicked peer thread) fails the test
/// instead of hanging it.
struct Idle {
    spins: u32,
    deadline: Instant,
}

impl Idle {
    fn new() -> Self {
        Self {
            spins: 0,
            deadline: Instant::now() + Duration::from_secs(60),
        }
    }

    fn pause(&mut self) {
        self.spins += 1;
        if self.spins < 64 {
            std::hint::spin_loop();
        } else {
            assert!(
                Instant::now() < self.deadline,
                "stress test still waiting after 60 s: items lost or a peer thread panicked?"
            );
            thread::yield_now();
        }
    }

    fn reset(&mut self) {
        self.spins = 0;
    }
}

/// The producer sends `0..N` in random bursts (some as bulk); the consumer
/// dequeues with random burst sizes and checks that every value arrives
/// exactly once and in order.
#[test]
fn spsc_in_order_exactly_once() {
    const N: u64 = 5_000_000;
    const CAP: usize = 256;
    let (mut p, mut c) = spsc::channel::<u64>(CAP).unwrap();
    let producer = thread::spawn(move || {
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
        let mut buf = [0u64; 64];
        let mut next = 0u64;
        let mut idle = Idle::new();
        while next < N {
            let want = rng.burst(64).min((N - next) as usize);
            for (i, slot) in buf[..want].iter_mut().enumerate() {
                *slot = next + i as u64;
            }
            let sent = if rng.next() & 3 == 0 {
                if p.enqueue_bulk(&buf[..want]) {
                    want
                } else {
                    0
                }
            } else {
                p.enqueue_burst(&buf[..want])
            };
            assert!(sent <= want);
            assert!(p.len() <= CAP);
            next += sent as u64;
            if sent == 0 {
                idle.pause();
            } else {
                idle.reset();
            }
        }
    });
    let mut rng = Rng(0x2545_f491_4f6c_dd1d);
    let mut out = [u64::MAX; 64];
    let mut expected = 0u64;
    let mut idle = Idle::new();
    while expected < N {
        let want = rng.burst(64);
        let got = if rng.next() & 3 == 0 {
            if c.dequeue_bulk(&mut out[..want]) {
                want
            } else {
                0
            }
        } else {
            c.dequeue_burst(&mut out[..want])
        };
        for &v in &out[..got] {
            assert_eq!(v, expected, "lost, duplicated or reordered item");
            expected += 1;
        }
        if got == 0 {
            idle.pause();
        } else {
            idle.reset();
        }
    }
    producer.join().unwrap();
    assert_eq!(c.dequeue_burst(&mut out), 0, "nothing beyond N");
    assert!(c.is_empty());
}

/// `P` producers × `C` consumers. Each item carries its producer id (high
/// 32 bits) and sequence number (low 32 bits). Every item must arrive exactly
/// once overall, and each consumer must see each producer's items in
/// increasing sequence order (reservations are FIFO, so per-producer order is
/// preserved within one consumer's stream).
fn mpmc_stress(producers: usize, consumers: usize, per_producer: u32, capacity: usize) {
    let ring = Arc::new(MpmcRing::<u64>::new(capacity).unwrap());
    let total = producers * per_producer as usize;
    let received = Arc::new(AtomicUsize::new(0));

    let producer_threads: Vec<_> = (0..producers)
        .map(|pid| {
            let ring = Arc::clone(&ring);
            thread::spawn(move || {
                let mut rng = Rng(0x1234_5678 + pid as u64);
                let mut buf = [0u64; 32];
                let mut seq = 0u32;
                let mut idle = Idle::new();
                while seq < per_producer {
                    let want = rng.burst(32).min((per_producer - seq) as usize);
                    for (i, slot) in buf[..want].iter_mut().enumerate() {
                        *slot = ((pid as u64) << 32) | u64::from(seq + i as u32);
                    }
                    let sent = if rng.next() & 3 == 0 {
                        if ring.enqueue_bulk(&buf[..want]) {
                            want
                        } else {
                            0
                        }
                    } else {
                        ring.enqueue_burst(&buf[..want])
                    };
                    seq += sent as u32;
                    if sent == 0 {
                        idle.pause();
                    } else {
                        idle.reset();
                    }
                }
            })
        })
        .collect();

    let consumer_threads: Vec<_> = (0..consumers)
        .map(|cid| {
            let ring = Arc::clone(&ring);
            let received = Arc::clone(&received);
            thread::spawn(move || {
                let mut rng = Rng(0x8765_4321 + cid as u64);
                let mut out = [0u64; 32];
                let mut last: Vec<Option<u32>> = vec![None; producers];
                let mut mine = Vec::new();
                let mut idle = Idle::new();
                while received.load(Ordering::Relaxed) < total {
                    let want = rng.burst(32);
                    let got = if rng.next() & 3 == 0 {
                        if ring.dequeue_bulk(&mut out[..want]) {
                            want
                        } else {
                            0
                        }
                    } else {
                        ring.dequeue_burst(&mut out[..want])
                    };
                    for &v in &out[..got] {
                        let pid = (v >> 32) as usize;
                        let seq = v as u32;
                        assert!(pid < producers, "garbage item {v:#x}");
                        if let Some(prev) = last[pid] {
                            assert!(seq > prev, "producer {pid}: {seq} after {prev}");
                        }
                        last[pid] = Some(seq);
                        mine.push(v);
                    }
                    if got == 0 {
                        idle.pause();
                    } else {
                        idle.reset();
                        received.fetch_add(got, Ordering::Relaxed);
                    }
                }
                mine
            })
        })
        .collect();

    for p in producer_threads {
        p.join().unwrap();
    }
    let mut seen = vec![vec![false; per_producer as usize]; producers];
    let mut count = 0;
    for c in consumer_threads {
        for v in c.join().unwrap() {
            let (pid, seq) = ((v >> 32) as usize, v as u32 as usize);
            assert!(!seen[pid][seq], "item {pid}/{seq} received twice");
            seen[pid][seq] = true;
            count += 1;
        }
    }
    assert_eq!(count, total);
    assert!(seen.iter().flatten().all(|&s| s), "an item was lost");
    assert!(ring.is_empty());
    assert_eq!(ring.dequeue_burst(&mut [0u64; 4]), 0);
}

#[test]
fn mpmc_3_producers_2_consumers() {
    mpmc_stress(3, 2, 800_000, 128);
}

#[test]
fn mpmc_2_producers_3_consumers_small_ring() {
    // Capacity 16 with bursts up to 32: constant full/empty transitions and
    // partial bursts.
    mpmc_stress(2, 3, 500_000, 16);
}

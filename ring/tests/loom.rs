//! Loom model checks of the ring index protocols.
//!
//! Run with
//! `RUSTFLAGS="--cfg loom" cargo test -p vdpakit-ring --test loom --release`.
//! Under `cfg(loom)` the slot copies are per-slot `loom::cell::UnsafeCell`
//! accesses, so besides the functional assertions loom reports any slot
//! access that is not ordered by happens-before (a missing Acquire/Release).
//! Capacities and item counts are tiny so that the explorations stay small.
#![cfg(loom)]

use loom::sync::Arc;
use loom::thread;
use vdpakit_ring::{MpmcRing, spsc};

/// Explores all interleavings up to `preemptions` forced preemptions.
fn check(preemptions: usize, f: impl Fn() + Sync + Send + 'static) {
    let mut builder = loom::model::Builder::new();
    builder.preemption_bound = Some(preemptions);
    builder.check(f);
}

/// SPSC, capacity 2, 5 items in bursts of 2 and 1: the ring wraps twice, the
/// producer hits "full" and the consumer hits "empty".
#[test]
fn spsc_wrap_bursts() {
    check(3, || {
        let (mut p, mut c) = spsc::channel::<u32>(2).unwrap();
        let producer = thread::spawn(move || {
            let items = [1u32, 2, 3, 4, 5];
            let mut sent = 0;
            let mut burst = 2;
            while sent < items.len() {
                let end = (sent + burst).min(items.len());
                let n = p.enqueue_burst(&items[sent..end]);
                sent += n;
                burst = 3 - burst; // alternate 2, 1, 2, ...
                if n == 0 {
                    thread::yield_now();
                }
            }
        });
        let mut got = Vec::new();
        let mut out = [0u32; 2];
        while got.len() < 5 {
            let n = c.dequeue_burst(&mut out);
            got.extend_from_slice(&out[..n]);
            if n == 0 {
                thread::yield_now();
            }
        }
        producer.join().unwrap();
        assert_eq!(got, [1, 2, 3, 4, 5]);
        assert!(c.is_empty());
    });
}

/// SPSC bulk: all-or-none under concurrency, with wrap-around.
#[test]
fn spsc_bulk() {
    check(3, || {
        let (mut p, mut c) = spsc::channel::<u32>(2).unwrap();
        let producer = thread::spawn(move || {
            for pair in [[1u32, 2], [3, 4]] {
                while !p.enqueue_bulk(&pair) {
                    thread::yield_now();
                }
            }
        });
        let mut got = Vec::new();
        let mut out = [0u32; 2];
        while got.len() < 4 {
            if c.dequeue_bulk(&mut out) {
                got.extend_from_slice(&out);
            } else {
                // A failed bulk dequeue must not have consumed anything.
                assert_eq!(out, [0, 0]);
                thread::yield_now();
            }
            out = [0, 0];
        }
        producer.join().unwrap();
        assert_eq!(got, [1, 2, 3, 4]);
    });
}

/// Bounded attempts per thread in the MPMC models. Loom may starve a thread
/// for as long as the others spin (a yield is not a preemption), so threads
/// that wait for other threads must give up after a few tries; the main
/// thread drains whatever is left after joining everybody, which keeps every
/// exploration finite while still covering "ring full" and "ring empty".
const TRIES: usize = 3;

/// Sends `items` with up to `TRIES` bursts; returns how many were sent.
fn send_some(ring: &MpmcRing<u32>, items: &[u32]) -> usize {
    let mut sent = 0;
    for _ in 0..TRIES {
        sent += ring.enqueue_burst(&items[sent..]);
        if sent == items.len() {
            break;
        }
        thread::yield_now();
    }
    sent
}

/// Receives with up to `TRIES` bursts of at most 2 items.
fn receive_some(ring: &MpmcRing<u32>) -> Vec<u32> {
    let mut got = Vec::new();
    let mut out = [0u32; 2];
    for _ in 0..TRIES {
        let n = ring.dequeue_burst(&mut out);
        got.extend_from_slice(&out[..n]);
        thread::yield_now();
    }
    got
}

/// Dequeues everything that is left (single-threaded by then).
fn drain(ring: &MpmcRing<u32>) -> Vec<u32> {
    let mut got = Vec::new();
    let mut out = [0u32; 2];
    loop {
        let n = ring.dequeue_burst(&mut out);
        if n == 0 {
            return got;
        }
        got.extend_from_slice(&out[..n]);
    }
}

/// MPMC, two producers and one consumer, capacity 2: each producer sends two
/// items (bursts, so a burst can be cut short by a full ring). Everything
/// sent is received exactly once, each producer's items in order.
#[test]
fn mpmc_two_producers_one_consumer() {
    check(3, || {
        let ring = Arc::new(MpmcRing::<u32>::new(2).unwrap());
        let producers: Vec<_> = [[10u32, 11], [20, 21]]
            .into_iter()
            .map(|items| {
                let ring = Arc::clone(&ring);
                thread::spawn(move || (items, send_some(&ring, &items)))
            })
            .collect();
        let mut got = receive_some(&ring);
        let sent: Vec<_> = producers.into_iter().map(|p| p.join().unwrap()).collect();
        got.extend(drain(&ring));
        for (items, n) in &sent {
            let mine: Vec<u32> = got
                .iter()
                .copied()
                .filter(|v| v / 10 == items[0] / 10)
                .collect();
            assert_eq!(mine, items[..*n], "got {got:?}");
        }
        assert_eq!(got.len(), sent.iter().map(|(_, n)| n).sum::<usize>());
        // Both producers could always make progress eventually: the first
        // burst of one of them must have fit into the empty ring.
        assert!(sent.iter().any(|(_, n)| *n > 0));
        assert!(ring.is_empty());
    });
}

/// MPMC, one producer and two consumers, capacity 2: the producer sends two
/// bulk pairs (the second wraps around and needs a consumer to have made
/// room). Each consumer receives in order, and together with what is left in
/// the ring they receive every sent item exactly once.
#[test]
fn mpmc_one_producer_two_consumers() {
    check(3, || {
        let ring = Arc::new(MpmcRing::<u32>::new(2).unwrap());
        let consumers: Vec<_> = (0..2)
            .map(|_| {
                let ring = Arc::clone(&ring);
                thread::spawn(move || receive_some(&ring))
            })
            .collect();
        let mut sent = Vec::new();
        'pairs: for pair in [[1u32, 2], [3, 4]] {
            for _ in 0..TRIES {
                if ring.enqueue_bulk(&pair) {
                    sent.extend_from_slice(&pair);
                    continue 'pairs;
                }
                thread::yield_now();
            }
            break;
        }
        let mut all = Vec::new();
        for c in consumers {
            let got = c.join().unwrap();
            assert!(got.windows(2).all(|w| w[0] < w[1]), "out of order: {got:?}");
            all.extend(got);
        }
        all.extend(drain(&ring));
        all.sort_unstable();
        assert_eq!(all, sent);
        assert!(sent.len() >= 2, "the first pair always fits");
        assert!(ring.is_empty());
    });
}

/// MPMC producer tail hand-off: two single-item reservations publish in
/// order, and a consumer that synchronises only with the second publication
/// must still see the first producer's item (the in-order wait has to
/// Acquire the predecessor's publication).
#[test]
fn mpmc_producer_tail_handoff() {
    check(3, || {
        let ring = Arc::new(MpmcRing::<u32>::new(4).unwrap());
        let producers: Vec<_> = [1u32, 2]
            .into_iter()
            .map(|item| {
                let ring = Arc::clone(&ring);
                thread::spawn(move || assert_eq!(ring.enqueue_burst(&[item]), 1))
            })
            .collect();
        let mut got = receive_some(&ring);
        for p in producers {
            p.join().unwrap();
        }
        got.extend(drain(&ring));
        got.sort_unstable();
        assert_eq!(got, [1, 2]);
    });
}

/// MPMC consumer tail hand-off: two consumers take one item each from a full
/// ring while the producer refills it; the producer may only overwrite a slot
/// after the consumer that read it is done, even if it synchronises only with
/// the later consumer's publication.
#[test]
fn mpmc_consumer_tail_handoff() {
    check(3, || {
        let ring = Arc::new(MpmcRing::<u32>::new(2).unwrap());
        assert!(ring.enqueue_bulk(&[1, 2]));
        let consumers: Vec<_> = (0..2)
            .map(|_| {
                let ring = Arc::clone(&ring);
                thread::spawn(move || {
                    let mut out = [0u32; 1];
                    for _ in 0..TRIES {
                        if ring.dequeue_bulk(&mut out) {
                            return Some(out[0]);
                        }
                        thread::yield_now();
                    }
                    None
                })
            })
            .collect();
        let sent = send_some(&ring, &[3, 4]);
        let mut all: Vec<u32> = consumers
            .into_iter()
            .filter_map(|c| c.join().unwrap())
            .collect();
        all.extend(drain(&ring));
        all.sort_unstable();
        let expected: Vec<u32> = (1..=2 + sent as u32).collect();
        assert_eq!(all, expected);
    });
}

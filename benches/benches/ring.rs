//! Ring enqueue + dequeue cost per item.
//!
//! `ring_enq_deq`: single thread, one burst of `n` items enqueued and then
//! dequeued again per iteration, for `n` in {1, 8, 32}; throughput is set to
//! `n` elements so criterion reports the cost per item. Compared in the same
//! run: vdpakit's SPSC ring, vdpakit's MPMC ring, and
//! `crossbeam_queue::ArrayQueue` (`n` pushes then `n` pops). All rings hold
//! `usize` items and have 1024 slots.
//!
//! `ring_cross_thread`: two threads, a producer (the bench thread) and a
//! consumer, moving `XITEMS` items per iteration through the ring in bursts
//! of 32 (ArrayQueue: one push/pop per item); reports per-item throughput.
//! Both sides spin when the ring is full/empty and yield after a while, so
//! that the figure stays meaningful when the two threads share a core. On a
//! loaded 2-core machine this one is noisy.

use std::hint::black_box;
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use crossbeam_queue::ArrayQueue;
use vdpakit_ring::{MpmcRing, spsc};

const CAPACITY: usize = 1024;
const BURSTS: [usize; 3] = [1, 8, 32];

fn enq_deq(c: &mut Criterion) {
    let mut g = c.benchmark_group("ring_enq_deq");
    let items: Vec<usize> = (0..32).collect();
    for n in BURSTS {
        g.throughput(Throughput::Elements(n as u64));

        g.bench_with_input(BenchmarkId::new("vdpakit_spsc", n), &n, |b, &n| {
            let (mut p, mut c) = spsc::channel::<usize>(CAPACITY).unwrap();
            let mut out = [0usize; 32];
            b.iter(|| {
                let sent = p.enqueue_burst(black_box(&items[..n]));
                let got = c.dequeue_burst(black_box(&mut out[..n]));
                black_box((sent, got, &out));
            });
            assert!(c.is_empty());
        });

        g.bench_with_input(BenchmarkId::new("vdpakit_mpmc", n), &n, |b, &n| {
            let ring = MpmcRing::<usize>::new(CAPACITY).unwrap();
            let mut out = [0usize; 32];
            b.iter(|| {
                let sent = ring.enqueue_burst(black_box(&items[..n]));
                let got = ring.dequeue_burst(black_box(&mut out[..n]));
                black_box((sent, got, &out));
            });
            assert!(ring.is_empty());
        });

        g.bench_with_input(BenchmarkId::new("crossbeam_arrayqueue", n), &n, |b, &n| {
            let q = ArrayQueue::<usize>::new(CAPACITY);
            b.iter(|| {
                for &item in black_box(&items[..n]) {
                    let pushed = q.push(item);
                    black_box(pushed.is_ok());
                }
                for _ in 0..n {
                    black_box(q.pop());
                }
            });
            assert!(q.is_empty());
        });
    }
    g.finish();
}

/// Bursts of this many items cross between the threads.
const XBURST: usize = 32;
/// Items moved per benchmark iteration (large, so that the thread spawn per
/// sample is negligible).
const XITEMS: usize = 1 << 20;

/// Idle wait: spin, and yield after a while (the other thread may be
/// waiting for this core).
fn idle(spins: &mut u32) {
    *spins += 1;
    if *spins < 256 {
        std::hint::spin_loop();
    } else {
        thread::yield_now();
    }
}

/// Moves `iters * XITEMS` items from this thread to a consumer thread and
/// returns the time until the consumer has them all.
fn cross_thread<P, C>(iters: u64, mut produce: P, consume: C) -> Duration
where
    P: FnMut(&[usize]) -> usize,
    C: FnOnce(usize) + Send + 'static,
{
    let total = iters as usize * XITEMS;
    let items: Vec<usize> = (0..XBURST).collect();
    let start = Instant::now();
    let consumer = thread::spawn(move || consume(total));
    let mut sent = 0;
    let mut spins = 0;
    while sent < total {
        let want = XBURST.min(total - sent);
        let n = produce(&items[..want]);
        sent += n;
        if n == 0 {
            idle(&mut spins);
        } else {
            spins = 0;
        }
    }
    consumer.join().unwrap();
    start.elapsed()
}

/// Consumer loop for the burst rings.
fn consume_bursts(total: usize, mut dequeue: impl FnMut(&mut [usize]) -> usize) {
    let mut out = [0usize; XBURST];
    let mut got = 0;
    let mut spins = 0;
    while got < total {
        let n = dequeue(&mut out);
        black_box(&out);
        got += n;
        if n == 0 {
            idle(&mut spins);
        } else {
            spins = 0;
        }
    }
}

fn cross(c: &mut Criterion) {
    let mut g = c.benchmark_group("ring_cross_thread");
    g.throughput(Throughput::Elements(XITEMS as u64));
    g.sample_size(10);

    g.bench_function(BenchmarkId::new("vdpakit_spsc", XBURST), |b| {
        b.iter_custom(|iters| {
            let (mut p, mut c) = spsc::channel::<usize>(CAPACITY).unwrap();
            cross_thread(
                iters,
                move |items| p.enqueue_burst(items),
                move |total| consume_bursts(total, |out| c.dequeue_burst(out)),
            )
        });
    });

    g.bench_function(BenchmarkId::new("vdpakit_mpmc", XBURST), |b| {
        b.iter_custom(|iters| {
            let ring = Arc::new(MpmcRing::<usize>::new(CAPACITY).unwrap());
            let consumer_ring = Arc::clone(&ring);
            cross_thread(
                iters,
                move |items| ring.enqueue_burst(items),
                move |total| consume_bursts(total, |out| consumer_ring.dequeue_burst(out)),
            )
        });
    });

    g.bench_function(BenchmarkId::new("crossbeam_arrayqueue", XBURST), |b| {
        b.iter_custom(|iters| {
            let q = Arc::new(ArrayQueue::<usize>::new(CAPACITY));
            let consumer_q = Arc::clone(&q);
            cross_thread(
                iters,
                move |items| {
                    let mut n = 0;
                    for &item in items {
                        if q.push(item).is_err() {
                            break;
                        }
                        n += 1;
                    }
                    n
                },
                move |total| {
                    let mut got = 0;
                    let mut spins = 0;
                    while got < total {
                        match consumer_q.pop() {
                            Some(v) => {
                                black_box(v);
                                got += 1;
                                spins = 0;
                            }
                            None => idle(&mut spins),
                        }
                    }
                },
            )
        });
    });
    g.finish();
}

criterion_group!(benches, enq_deq, cross);
criterion_main!(benches);

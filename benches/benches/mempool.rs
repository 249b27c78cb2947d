//! Mempool alloc + free in bursts through a per-lcore cache, per buffer.
//!
//! Reference in the same run: a plain `Vec<usize>` free list (a single-threaded stack, the
//! cheapest possible allocator, as ixy.rs uses), so the figure reads as a ratio to a floor.

use std::hint::black_box;

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use vdpakit_core::mbuf::Burst;
use vdpakit_core::mem::MemMode;
use vdpakit_core::mempool::{Mempool, MempoolConfig};

fn mempool(c: &mut Criterion) {
    let pool = Mempool::new(
        "bench",
        MempoolConfig {
            count: 8192,
            data_room: 2048,
            cache_size: 256,
            mem: MemMode::Auto,
        },
    )
    .expect("mempool");
    let mut g = c.benchmark_group("mempool_alloc_free");
    for burst in [1usize, 8, 32] {
        g.throughput(Throughput::Elements(burst as u64));
        g.bench_with_input(BenchmarkId::new("vdpakit_cache", burst), &burst, |b, &n| {
            let mut cache = pool.cache(256);
            let mut pkts = Burst::new(n);
            b.iter(|| {
                let ok = cache.alloc_bulk(&mut pkts, n);
                black_box(ok);
                cache.free_burst(black_box(&mut pkts));
            });
        });
        g.bench_with_input(
            BenchmarkId::new("vec_stack_floor", burst),
            &burst,
            |b, &n| {
                let mut free: Vec<usize> = (0..8192).collect();
                let mut out = [0usize; 32];
                b.iter(|| {
                    for o in out.iter_mut().take(n) {
                        *o = free.pop().unwrap_or(0);
                    }
                    black_box(&mut out);
                    for o in out.iter().take(n) {
                        free.push(*o);
                    }
                });
            },
        );
    }
    g.finish();
}

criterion_group!(benches, mempool);
criterion_main!(benches);

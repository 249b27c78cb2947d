//! Virtio ring round trip per packet: the driver posts 32 chains of one 1500-byte buffer and
//! publishes them, the device pops the 32 and pushes them used and publishes, the driver reaps
//! the 32. Split vs packed (both with EVENT_IDX, queue size 256, one thread, no payload copies).
//!
//! Reference in the same run: the same 32 items (one `usize` each) through a vdpakit SPSC ring and
//! back (enqueue burst + dequeue burst on both directions), the floor of handing a burst over.

use std::hint::black_box;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use vdpakit_core::mem::{MemMode, Segment};
use vdpakit_core::virtio::features::{
    VIRTIO_F_RING_EVENT_IDX, VIRTIO_F_RING_PACKED, VIRTIO_F_VERSION_1,
};
use vdpakit_core::virtio::{DeviceQueue, DriverQueue, GuestMemory, GuestRegion, QueueConfig, Segs};
use vdpakit_ring::spsc;

const BURST: usize = 32;
const SIZE: u16 = 256;
const BUFS: u64 = 0x10_0000;

fn guest_memory() -> GuestMemory {
    let seg = Segment::new("virtio-bench", 0x40_0000, MemMode::Auto).expect("segment");
    // SAFETY: the segment's mapping of `len` bytes stays alive as long as the region holds the
    // `Arc<Segment>`; nothing else references it.
    let r = unsafe { GuestRegion::from_raw(seg.base(), seg.len() as u64, 0, 0, Some(seg.clone())) };
    GuestMemory::new(vec![r]).expect("guest memory")
}

fn virtio(c: &mut Criterion) {
    let mut g = c.benchmark_group("virtio_roundtrip");
    g.throughput(Throughput::Elements(BURST as u64));
    for (name, extra) in [("split", 0), ("packed", VIRTIO_F_RING_PACKED)] {
        let features = VIRTIO_F_VERSION_1 | VIRTIO_F_RING_EVENT_IDX | extra;
        let mem = guest_memory();
        let cfg = QueueConfig::at(0x1_0000, SIZE, features);
        let mut drv = DriverQueue::new(&cfg, &mem).expect("driver");
        let mut dev = DeviceQueue::new(&cfg, &mem).expect("device");
        dev.set_notification(false);
        drv.set_interrupts(false);
        let mut segs = Segs::new();
        g.bench_function(name, |b| {
            b.iter(|| {
                for i in 0..BURST as u64 {
                    drv.add(&[(BUFS + i * 2048, 1500, false)]).expect("room");
                }
                black_box(drv.publish_avail());
                let n = dev.avail_count();
                for _ in 0..n {
                    let c = dev.pop(&mem, &mut segs).expect("valid").expect("a chain");
                    black_box(segs.readable());
                    dev.push_used(&c, 0);
                }
                black_box(dev.publish_used());
                while let Some(u) = drv.reap().expect("valid") {
                    black_box(u);
                }
            });
        });
    }
    g.bench_function("spsc_ring_there_and_back_floor", |b| {
        let (mut p1, mut c1) = spsc::channel::<usize>(256).unwrap();
        let (mut p2, mut c2) = spsc::channel::<usize>(256).unwrap();
        let items: Vec<usize> = (0..BURST).collect();
        let mut out = [0usize; BURST];
        b.iter(|| {
            p1.enqueue_burst(black_box(&items));
            let n = c1.dequeue_burst(&mut out);
            p2.enqueue_burst(black_box(&out[..n]));
            black_box(c2.dequeue_burst(&mut out));
        });
    });
    g.finish();
}

criterion_group!(benches, virtio);
criterion_main!(benches);

//! The vhost-user software datapath in process, per packet: our driver side (`DriverQueue`, as a
//! guest or the virtio-user port would) against our device side (`VqRun`, what a `vhost-user`
//! port's queues run), one thread, no peer. Two directions, split and packed, 64-byte frames:
//!
//! - `enqueue`: the driver posts 32 receive buffers of 2 KiB, `VqRun::enqueue` copies 32 mbufs in
//!   (virtio-net header + frame), the driver reaps the 32 used entries;
//! - `dequeue`: the driver posts 32 transmit chains (header + frame, one buffer each),
//!   `VqRun::dequeue` copies them into 32 fresh mbufs (freed again), the driver reaps.
//!
//! Reference in the same run: the bare copies (32 × 76 bytes memcpy between two buffers), the
//! floor any datapath pays. `*_in_order` variants negotiate VIRTIO_F_IN_ORDER (sequential split
//! descriptors, in-order reaping); `*_in_order_batch` also let the device return runs of
//! completely used chains with one used entry (every transmit chain; receive buffers are never
//! filled completely here, so the enqueue side does not batch).

use std::hint::black_box;
use std::sync::Arc;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use vdpakit_core::mbuf::Burst;
use vdpakit_core::mem::{MemMode, Segment};
use vdpakit_core::mempool::{Mempool, MempoolConfig};
use vdpakit_core::port::QueueStats;
use vdpakit_core::vhost::msg::VringAddr;
use vdpakit_core::vhost::net::{VqRun, VringSetup};
use vdpakit_core::virtio::features as vf;
use vdpakit_core::virtio::{DriverQueue, GuestMemory, GuestRegion, QueueConfig};

const BURST: usize = 32;
const SIZE: u16 = 256;
const FRAME: usize = 64;
const HDR: usize = 12;
const MEM: u64 = 0x40_0000;
const RX_BUFS: u64 = 0x10_0000;
const TX_BUFS: u64 = 0x20_0000;

struct Rig {
    mem: GuestMemory,
    uva0: u64,
    _seg: Arc<Segment>,
}

fn rig() -> Rig {
    let seg = Segment::new("vhost-bench", MEM as usize, MemMode::Auto).expect("segment");
    let uva0 = seg.base() as u64;
    // SAFETY: the region covers exactly the segment's mapping, which the rig keeps alive (the
    // region also holds an `Arc` of it); nothing holds references into it.
    let r = unsafe { GuestRegion::from_raw(seg.base(), MEM, 0, uva0, Some(seg.clone())) };
    Rig {
        mem: GuestMemory::new(vec![r]).expect("guest memory"),
        uva0,
        _seg: seg,
    }
}

fn device(r: &Rig, q: &QueueConfig, index: usize, features: u64) -> VqRun {
    let s = VringSetup {
        index,
        size: u32::from(SIZE),
        addr: VringAddr {
            index: index as u32,
            flags: 0,
            desc: r.uva0 + q.desc,
            used: r.uva0 + q.used,
            avail: r.uva0 + q.avail,
            log: 0,
        },
        base: if features & vf::RING_PACKED != 0 {
            0x8000
        } else {
            0
        },
        features,
        call: None,
        log: None,
        miss: None,
    };
    VqRun::build(&s, &r.mem).expect("vring")
}

fn vhost(c: &mut Criterion) {
    let pool = Mempool::new(
        "vhost-bench",
        MempoolConfig {
            count: 2048,
            data_room: 2048,
            mem: MemMode::Auto,
            ..Default::default()
        },
    )
    .expect("pool");
    let mut cache = pool.cache(256);
    let stats = QueueStats::new();
    let mut g = c.benchmark_group("vhost_datapath");
    g.throughput(Throughput::Elements(BURST as u64));
    let io = vf::IN_ORDER;
    for (ring, extra, batch) in [
        ("split", 0, false),
        ("packed", vf::RING_PACKED, false),
        ("split_in_order", io, false),
        ("packed_in_order", vf::RING_PACKED | io, false),
        ("split_in_order_batch", io, true),
        ("packed_in_order_batch", vf::RING_PACKED | io, true),
    ] {
        let features = vf::VERSION_1 | vf::NET_MRG_RXBUF | extra;
        let r = rig();
        let rxq = QueueConfig::at(0x1_0000, SIZE, features);
        let txq = QueueConfig::at(0x3_0000, SIZE, features);
        let mut rx_drv = DriverQueue::new(&rxq, &r.mem).expect("rx driver");
        let mut tx_drv = DriverQueue::new(&txq, &r.mem).expect("tx driver");
        rx_drv.set_interrupts(false);
        tx_drv.set_interrupts(false);
        let mut rx_dev = device(&r, &rxq, 0, features);
        let mut tx_dev = device(&r, &txq, 1, features);
        rx_dev.set_used_batching(batch);
        tx_dev.set_used_batching(batch);
        let frame = [0x5au8; FRAME];
        for i in 0..BURST as u64 {
            r.mem
                .write(
                    TX_BUFS + i * 2048,
                    &[[0u8; HDR].as_slice(), &frame].concat(),
                )
                .expect("tx frame");
        }
        let mut burst = Burst::new(BURST);

        g.bench_function(format!("{ring}_enqueue"), |b| {
            b.iter(|| {
                for i in 0..BURST as u64 {
                    rx_drv
                        .add(&[(RX_BUFS + i * 2048, 2048, true)])
                        .expect("room");
                }
                rx_drv.publish_avail();
                assert!(cache.alloc_bulk(&mut burst, BURST));
                for m in burst.iter_mut() {
                    m.append(FRAME).expect("room").copy_from_slice(&frame);
                }
                let n = rx_dev.enqueue(&mut burst, &mut cache, &stats);
                assert_eq!(n, BURST);
                let mut reaped = 0;
                while let Some(u) = rx_drv.reap().expect("valid") {
                    black_box(u);
                    reaped += 1;
                }
                assert_eq!(reaped, BURST);
            });
        });

        g.bench_function(format!("{ring}_dequeue"), |b| {
            b.iter(|| {
                for i in 0..BURST as u64 {
                    tx_drv
                        .add(&[(TX_BUFS + i * 2048, (HDR + FRAME) as u32, false)])
                        .expect("room");
                }
                tx_drv.publish_avail();
                let n = tx_dev.dequeue(&mut cache, &mut burst, &stats);
                assert_eq!(n, BURST);
                black_box(burst.as_slice());
                cache.free_burst(&mut burst);
                while let Some(u) = tx_drv.reap().expect("valid") {
                    black_box(u);
                }
            });
        });
    }
    g.bench_function("copy_floor", |b| {
        let src = vec![0x5au8; BURST * 2048];
        let mut dst = vec![0u8; BURST * 2048];
        b.iter(|| {
            for i in 0..BURST {
                let o = i * 2048;
                dst[o..o + HDR + FRAME].copy_from_slice(black_box(&src[o..o + HDR + FRAME]));
            }
            black_box(&dst);
        });
    });
    g.finish();
}

criterion_group!(benches, vhost);
criterion_main!(benches);

//! mlx5 command latency against the device model: what it costs to bring one queue pair up.
//!
//! - `cmd/query_special_contexts`: one command with inline input and output (the floor: a
//!   command round trip through the slot, doorbell, model and completion poll).
//! - `cmd/query_hca_cap`: one command with an 8-block output mailbox chain.
//! - `queue_pair/objects`: every object of one queue pair (2 counters, 6 UMEMs, 2 VIRTIO_NET_Q)
//!   and both queues moved to RDY: 12 commands (destroyed outside the timing).
//! - `queue_pair/configure`: `VdpaDevice::configure` of one pair as the binding calls it (memory
//!   key, the queue objects, RQT, TIR, flow table, groups and rules, MSI-X, RDY and the check by
//!   query) (closed outside the timing).
//!
//! The model executes each command synchronously inside the doorbell write, so these figures
//! are the driver's and model's software cost, not firmware latency. Report them as multiples of
//! the floor measured in the same run.

use std::hint::black_box;
use std::time::{Duration, Instant};

use criterion::{Criterion, criterion_group, criterion_main};
use vdpakit_core::mem::{MemMode, Segment};
use vdpakit_core::pci::{DmaDomain, model};
use vdpakit_core::vdpa::{DevConf, VdpaDevice, VqConfig};
use vdpakit_core::virtio::features::VIRTIO_F_VERSION_1;
use vdpakit_core::virtio::{GuestRegion, QueueConfig};
use vdpakit_pmd_mlx5::hca::cmd_in;
use vdpakit_pmd_mlx5::model::{Mlx5Model, ModelOptions};
use vdpakit_pmd_mlx5::prm::{cap, op, vq};
use vdpakit_pmd_mlx5::res::KeyPiece;
use vdpakit_pmd_mlx5::virtq::{VirtqAttr, Vq};
use vdpakit_pmd_mlx5::{Devargs, Hca, HcaOptions, Mlx5Vdpa};

const GPA: u64 = 0x4000_0000;
const MEM: usize = 4 << 20;

fn guest(dom: &DmaDomain) -> std::sync::Arc<Segment> {
    let seg = Segment::new("mlx5-bench-guest", MEM, MemMode::NoHuge).expect("segment");
    dom.map(GPA, &GuestRegion::from_segment(&seg).rebased(GPA, GPA))
        .expect("map");
    seg
}

fn opts() -> HcaOptions {
    HcaOptions {
        dma_mem: 8 << 20,
        mem_mode: MemMode::NoHuge,
        ..HcaOptions::default()
    }
}

fn commands(c: &mut Criterion) {
    let m = Mlx5Model::new(ModelOptions::default());
    let dom = DmaDomain::model();
    let hca = Hca::open(model::open(m.clone(), &dom).expect("open"), &opts()).expect("up");
    let mut g = c.benchmark_group("mlx5_cmd");
    let q = cmd_in(op::QUERY_SPECIAL_CONTEXTS, 0, 16);
    g.bench_function("query_special_contexts", |b| {
        b.iter(|| black_box(hca.exec(&q, 32).expect("ok")))
    });
    g.bench_function("query_hca_cap", |b| {
        b.iter(|| black_box(hca.query_cap(cap::GENERAL, true).expect("ok")))
    });
    g.finish();
}

fn queue_pair(c: &mut Criterion) {
    let mut g = c.benchmark_group("mlx5_queue_pair");

    let m = Mlx5Model::new(ModelOptions::default());
    let dom = DmaDomain::model();
    let hca = Hca::open(model::open(m.clone(), &dom).expect("open"), &opts()).expect("up");
    let _mem = guest(&dom);
    let pd = hca.alloc_pd().expect("pd");
    let td = hca.alloc_td().expect("td");
    let tis = hca.create_tis(td).expect("tis");
    let key = hca
        .create_mtt_mkey(
            pd,
            KeyPiece {
                va: GPA,
                iova: GPA,
                len: MEM as u64,
            },
            1,
        )
        .expect("key");
    let attr = |index: u16| {
        let cfg = QueueConfig::at(GPA + u64::from(index) * 0x1_0000, 256, VIRTIO_F_VERSION_1);
        VirtqAttr {
            index,
            size: 256,
            version_1: true,
            desc: cfg.desc,
            avail: cfg.avail,
            used: cfg.used,
            mkey: key,
            pd,
            tisn: if index % 2 == 1 { tis } else { 0 },
            ..Default::default()
        }
    };
    let (rx, tx) = (attr(0), attr(1));
    g.bench_function("objects", |b| {
        b.iter_custom(|iters| {
            let mut t = Duration::ZERO;
            for _ in 0..iters {
                let start = Instant::now();
                let mut a = Vq::create(&hca, &rx).expect("rx");
                let mut b = Vq::create(&hca, &tx).expect("tx");
                a.set_state(&hca, vq::STATE_RDY).expect("rdy");
                b.set_state(&hca, vq::STATE_RDY).expect("rdy");
                t += start.elapsed();
                b.destroy(&hca).expect("destroy");
                a.destroy(&hca).expect("destroy");
            }
            t
        })
    });

    let mut args = Devargs::parse("model,queues=1,event_mode=poll").expect("devargs");
    args.mem = MemMode::NoHuge;
    args.dma_mem = 8 << 20;
    let mut dev = Mlx5Vdpa::with_model(args).expect("device");
    let _mem2 = guest(dev.domain());
    let conf = DevConf {
        features: VIRTIO_F_VERSION_1,
        queues: (0..2u16)
            .map(|index| {
                let cfg =
                    QueueConfig::at(GPA + u64::from(index) * 0x1_0000, 256, VIRTIO_F_VERSION_1);
                VqConfig {
                    index,
                    size: 256,
                    desc: cfg.desc,
                    driver: cfg.avail,
                    device: cfg.used,
                    avail_idx: 0,
                    used_idx: 0,
                    call: None,
                    enabled: true,
                }
            })
            .collect(),
        log: None,
        mtu: None,
    };
    let before = dev.hca().commands();
    dev.configure(&conf).expect("configure");
    let per_configure = dev.hca().commands() - before;
    dev.close().expect("close");
    eprintln!("mlx5: configure of one pair = {per_configure} commands");
    g.bench_function("configure", |b| {
        b.iter_custom(|iters| {
            let mut t = Duration::ZERO;
            for _ in 0..iters {
                let start = Instant::now();
                dev.configure(&conf).expect("configure");
                t += start.elapsed();
                dev.close().expect("close");
            }
            t
        })
    });
    g.finish();
}

criterion_group!(benches, commands, queue_pair);
criterion_main!(benches);

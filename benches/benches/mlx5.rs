//! mlx5 command latency against the device model: what it costs to bring one queue pair up.
//!
//! - `cmd/query_special_contexts`: one command with inline input and output (the floor: a
//!   command round trip through the slot, doorbell, model and completion poll).
//! - `cmd/query_hca_cap`: one command with an 8-block output mailbox chain.
//! - `queue_pair/objects`: every object of one queue pair (2 counters, 6 UMEMs, 2 VIRTIO_NET_Q)
//!   and both queues moved to RDY: 12 commands (destroyed outside the timing).
//! - `queue_pair/configure`: `VdpaDevice::configure` of one pair as the binding calls it (memory
//!   key, the queue objects, RQT, TIR, flow table, groups and rules, MSI-X, RDY and the check by
//!   query) (closed outside the timing); `configure_qp` the same in QP event mode with call
//!   eventfds (plus the EQ, per queue a CQ, two QPs and their connection, and the event thread).
//! - `notify/msix`, `notify/qp`: one transmitted frame from the doorbell to the call eventfd
//!   becoming readable: the model's engine wakes, completes the chain, and either signals the
//!   queue's MSI-X vector (wired to the eventfd) or sends on the firmware QP (CQE, EQE, the EQ's
//!   vector), whereupon the driver's event thread wakes, reads both rings, re-arms and signals.
//!   The ratio qp / msix is the chain's cost over a direct vector.
//!
//! The model executes each command synchronously inside the doorbell write, so these figures
//! are the driver's and model's software cost, not firmware latency. Report them as multiples of
//! the floor measured in the same run.

use std::hint::black_box;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::Arc;
use std::time::{Duration, Instant};

use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use nix::sys::eventfd::{EfdFlags, EventFd};

use criterion::{Criterion, criterion_group, criterion_main};
use vdpakit_core::mem::{MemMode, Segment};
use vdpakit_core::pci::{DmaDomain, model};
use vdpakit_core::vdpa::{DevConf, VdpaDevice, VqConfig};
use vdpakit_core::virtio::features::VIRTIO_F_VERSION_1;
use vdpakit_core::virtio::{DriverQueue, GuestMemory, GuestRegion, QueueConfig};
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
    let m = Mlx5Model::new(ModelOptions::default()).unwrap();
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

    let m = Mlx5Model::new(ModelOptions::default()).unwrap();
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

    let mut args = Devargs::parse("model,queues=1,event_mode=qp").expect("devargs");
    args.mem = MemMode::NoHuge;
    args.dma_mem = 8 << 20;
    let mut dev = Mlx5Vdpa::with_model(args).expect("device");
    let _mem3 = guest(dev.domain());
    let mut conf_qp = conf.clone();
    for q in &mut conf_qp.queues {
        q.call = Some(efd());
    }
    let before = dev.hca().commands();
    dev.configure(&conf_qp).expect("configure");
    let per_configure = dev.hca().commands() - before;
    dev.close().expect("close");
    eprintln!("mlx5: configure of one pair in QP mode = {per_configure} commands");
    g.bench_function("configure_qp", |b| {
        b.iter_custom(|iters| {
            let mut t = Duration::ZERO;
            for _ in 0..iters {
                let start = Instant::now();
                dev.configure(&conf_qp).expect("configure");
                t += start.elapsed();
                dev.close().expect("close");
            }
            t
        })
    });
    g.finish();
}

fn efd() -> Arc<OwnedFd> {
    Arc::new(OwnedFd::from(
        EventFd::from_flags(EfdFlags::EFD_NONBLOCK).expect("eventfd"),
    ))
}

/// One frame from the doorbell to the transmit queue's call eventfd, in `mode`.
fn notify(c: &mut Criterion) {
    let mut g = c.benchmark_group("mlx5_notify");
    for mode in ["msix", "qp"] {
        let mut args =
            Devargs::parse(&format!("model,queues=1,event_mode={mode}")).expect("devargs");
        args.mem = MemMode::NoHuge;
        args.dma_mem = 8 << 20;
        let mut dev = Mlx5Vdpa::with_model(args).expect("device");
        let seg = guest(dev.domain());
        let mem = GuestMemory::new(vec![GuestRegion::from_segment(&seg).rebased(GPA, GPA)])
            .expect("guest view");
        let cfgs: Vec<QueueConfig> = (0..2u16)
            .map(|i| QueueConfig::at(GPA + u64::from(i) * 0x1_0000, 256, VIRTIO_F_VERSION_1))
            .collect();
        let call = efd();
        let conf = DevConf {
            features: VIRTIO_F_VERSION_1,
            queues: cfgs
                .iter()
                .enumerate()
                .map(|(i, cfg)| VqConfig {
                    index: i as u16,
                    size: 256,
                    desc: cfg.desc,
                    driver: cfg.avail,
                    device: cfg.used,
                    avail_idx: 0,
                    used_idx: 0,
                    call: (i == 1).then(|| call.clone()),
                    enabled: true,
                })
                .collect(),
            log: None,
            mtu: None,
        };
        let mut tx = DriverQueue::new(&cfgs[1], &mem).expect("tx ring");
        dev.configure(&conf).expect("configure");
        let (bell, v) = dev.doorbell(1).expect("doorbell");
        // A frame to nobody: transmitted, steered nowhere (the receive ring has no buffers).
        let buf = GPA + 0x20_0000;
        let mut f = vec![0u8; 12 + 60];
        f[12..18].copy_from_slice(&[2, 9, 9, 9, 9, 9]);
        mem.write(buf, &f).expect("frame");
        g.bench_function(mode, |b| {
            b.iter(|| {
                tx.add(&[(buf, f.len() as u32, false)]).expect("add");
                tx.publish_avail();
                bell.ring(v);
                let mut fds = [PollFd::new(call.as_fd(), PollFlags::POLLIN)];
                let n = poll(&mut fds, PollTimeout::from(1000u16)).expect("poll");
                assert_eq!(n, 1, "{mode}: no interrupt within a second");
                let mut c = [0u8; 8];
                let _ = nix::unistd::read(call.as_fd(), &mut c);
                while tx.reap().expect("reap").is_none() {}
            })
        });
        dev.close().expect("close");
    }
    g.finish();
}

criterion_group!(benches, commands, queue_pair, notify);
criterion_main!(benches);

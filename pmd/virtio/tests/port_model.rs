//! The `virtio` port kind of `vdpakit fwd` against the virtio-net model: vdpakit drives the
//! function itself (rings in its memory, DMA-mapped; bursts; polled). Two functions cabled
//! together both ways, byte-exact; multiqueue through the control queue; stop and start again;
//! IOVA = PA with hugepages; an IOMMU fault on one port while another keeps forwarding.

use std::sync::Arc;
use std::time::{Duration, Instant};

use vdpakit_core::mbuf::Burst;
use vdpakit_core::mem::MemMode;
use vdpakit_core::mempool::{Mempool, MempoolConfig};
use vdpakit_core::port::{self, Port, PortConf, PortEnv, PortSpec, RingRegistry, RxQueue, TxQueue};
use vdpakit_pmd_virtio::model::VpModel;

fn pool(mem: MemMode) -> Arc<Mempool> {
    Mempool::new(
        "port-test",
        MempoolConfig {
            count: 8192,
            data_room: 2048,
            cache_size: 64,
            mem,
        },
    )
    .expect("pool")
}

fn open(spec: &str, pool: &Arc<Mempool>, id: u16, queues: u16) -> Box<dyn Port> {
    port::register(&[vdpakit_pmd_virtio::PORT_KIND]).unwrap();
    let env = PortEnv {
        pool: Arc::clone(pool),
        rings: RingRegistry::new(),
        port_id: id,
        pkt_size: 64,
        cache_size: 64,
    };
    let mut p = port::create(&PortSpec::parse(spec).unwrap(), &env).expect("create");
    p.configure(&PortConf {
        rx_queues: queues,
        tx_queues: queues,
        rx_desc: 256,
        tx_desc: 256,
    })
    .expect("configure");
    p.start().expect("start");
    p
}

struct Q {
    rx: Vec<Box<dyn RxQueue>>,
    tx: Vec<Box<dyn TxQueue>>,
}

fn queues(p: &mut Box<dyn Port>) -> Q {
    let mut q = Q {
        rx: Vec::new(),
        tx: Vec::new(),
    };
    for pair in p.take_queues().unwrap() {
        q.rx.push(pair.rx.unwrap());
        q.tx.push(pair.tx.unwrap());
    }
    q
}

fn frame(seq: u32) -> Vec<u8> {
    let len = 60 + (seq as usize * 131) % 1400;
    let mut f = vec![0u8; len];
    f[..6].fill(0xff);
    f[12..14].copy_from_slice(&[0x88, 0xb5]);
    f[14..18].copy_from_slice(&seq.to_be_bytes());
    for (i, b) in f.iter_mut().enumerate().skip(18) {
        *b = (i as u32).wrapping_mul(7).wrapping_add(seq) as u8;
    }
    f
}

/// Sends `n` frames from `tx` and expects exactly them, in order, at `rx`.
fn pass(pool: &Arc<Mempool>, tx: &mut dyn TxQueue, rx: &mut dyn RxQueue, n: u32, seed: u32) {
    let mut sent = 0u32;
    let mut got: Vec<Vec<u8>> = Vec::new();
    let mut out = Burst::new(32);
    let mut inb = Burst::new(32);
    let end = Instant::now() + Duration::from_secs(10);
    while (got.len() as u32) < n {
        assert!(Instant::now() < end, "{} of {n} frames arrived", got.len());
        // At most 128 frames in flight: the receive ring (256) always has buffers, so the
        // device never has to drop one, however the threads are scheduled.
        while sent < n && out.room() > 0 && out.len() < 16 && sent - (got.len() as u32) < 128 {
            let mut m = pool.alloc().expect("mbuf");
            let f = frame(seed + sent);
            m.append(f.len()).unwrap().copy_from_slice(&f);
            let _ = out.push(m);
            sent += 1;
        }
        let took = tx.tx_burst(&mut out);
        let _ = took;
        rx.rx_burst(&mut inb);
        while let Some(m) = inb.pop() {
            got.push(m.data().to_vec());
        }
        std::thread::yield_now();
    }
    // Burst::pop takes from the back: restore arrival order per burst is not kept that way, so
    // compare as sets of sequence numbers and contents.
    got.sort_by_key(|f| u32::from_be_bytes([f[14], f[15], f[16], f[17]]));
    for (i, f) in got.iter().enumerate() {
        assert_eq!(f, &frame(seed + i as u32), "frame {i}");
    }
}

#[test]
fn cabled_functions_forward_both_ways() {
    let pool = pool(MemMode::NoHuge);
    let mut a = open("virtio:model=port-cable,vfs=2,vf=0", &pool, 0, 1);
    let mut b = open("virtio:model=port-cable,vf=1", &pool, 1, 1);
    let (mut qa, mut qb) = (queues(&mut a), queues(&mut b));
    pass(&pool, qa.tx[0].as_mut(), qb.rx[0].as_mut(), 2000, 0);
    pass(&pool, qb.tx[0].as_mut(), qa.rx[0].as_mut(), 2000, 10_000);
    let (sa, sb) = (a.stats(), b.stats());
    assert_eq!(sa.tx.packets, 2000);
    assert_eq!(sb.rx.packets, 2000);
    assert_eq!(sb.tx.packets, 2000);
    assert_eq!(sa.rx.packets, 2000);
    assert_eq!(sa.rx.errors + sb.rx.errors + sa.tx.drops + sb.tx.drops, 0);
    assert!(a.link().up);
    drop((qa, qb));
    a.stop().unwrap();
    b.stop().unwrap();
    // Stop, then start again: the device is reset and brought up anew.
    a.start().unwrap();
    b.start().unwrap();
    let (mut qa, mut qb) = (queues(&mut a), queues(&mut b));
    pass(&pool, qa.tx[0].as_mut(), qb.rx[0].as_mut(), 500, 50_000);
}

#[test]
fn multiqueue_through_the_control_queue() {
    let pool = pool(MemMode::NoHuge);
    let mut p = open("virtio:model=port-mq,pairs=2", &pool, 0, 2);
    let m = VpModel::get_or_create("port-mq", || unreachable!()).unwrap();
    assert_eq!(m.function(0).unwrap().active_pairs(), 2);
    let mut q = queues(&mut p);
    let (tx1, rx1) = (&mut q.tx[1], &mut q.rx[1]);
    pass(&pool, tx1.as_mut(), rx1.as_mut(), 300, 0);
    assert_eq!(m.stats(0, 3).unwrap().packets, 300, "pair 1 carried it");
    let s = p.stats();
    assert_eq!(s.tx_queues[1].packets, 300);
}

#[test]
fn iova_pa_with_hugepages() {
    let Ok(pool) = Mempool::new(
        "port-pa",
        MempoolConfig {
            count: 4096,
            data_room: 2048,
            cache_size: 64,
            mem: MemMode::Huge2M,
        },
    ) else {
        eprintln!("SKIP iova_pa_with_hugepages: no 2 MiB hugepages");
        return;
    };
    if Arc::clone(pool.zone().segment()).physical_pages().is_err() {
        eprintln!("SKIP iova_pa_with_hugepages: physical addresses need root");
        return;
    }
    let mut p = open("virtio:model=port-pa,iova=pa", &pool, 0, 1);
    let mut q = queues(&mut p);
    let (tx, rx) = (&mut q.tx[0], &mut q.rx[0]);
    pass(&pool, tx.as_mut(), rx.as_mut(), 3000, 0);
}

#[test]
fn an_iommu_fault_stops_one_port_the_other_keeps_forwarding() {
    let pool = pool(MemMode::NoHuge);
    let mut bad = open("virtio:model=port-bad", &pool, 0, 1);
    let mut good = open("virtio:model=port-good", &pool, 1, 1);
    let (mut qb, mut qg) = (queues(&mut bad), queues(&mut good));
    pass(&pool, qb.tx[0].as_mut(), qb.rx[0].as_mut(), 100, 0);
    let m = VpModel::get_or_create("port-bad", || unreachable!()).unwrap();
    m.function(0).unwrap().iommu_fault_now(1);
    let end = Instant::now() + Duration::from_secs(2);
    while m.stats(0, 1).unwrap().iommu_faults == 0 && Instant::now() < end {
        std::thread::sleep(Duration::from_millis(1));
    }
    assert_eq!(m.stats(0, 1).unwrap().iommu_faults, 1);
    assert!(
        m.broken(0, 1),
        "the faulting queue stopped (status shows NEEDS_RESET)"
    );
    // The port's stats check reads the status (and warns once); its counters stay sane.
    let before = bad.stats().tx.packets;
    assert_eq!(before, 100);
    pass(&pool, qg.tx[0].as_mut(), qg.rx[0].as_mut(), 500, 0);
    assert_eq!(good.stats().rx.packets, 500);
}

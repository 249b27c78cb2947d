//! The `mlx5` port kind of `vdpakit fwd` against the model: vdpakit drives the function itself
//! (queue objects over rings in its memory, DMA-mapped, keys over them; polled). Two functions
//! of one model cabled together, both ways, byte-exact with exact counts on both sides and in
//! the model; stop and start again; two queue pairs spread by the flow hash; the promiscuous
//! rule and its absence; spec errors.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use vdpakit_core::mbuf::Burst;
use vdpakit_core::mem::MemMode;
use vdpakit_core::mempool::{Mempool, MempoolConfig};
use vdpakit_core::port::{self, Port, PortConf, PortEnv, PortSpec, RingRegistry, RxQueue, TxQueue};
use vdpakit_pmd_mlx5::model::Mlx5Device;

fn pool() -> Arc<Mempool> {
    Mempool::new(
        "mlx5-port-test",
        MempoolConfig {
            count: 8192,
            data_room: 2048,
            cache_size: 64,
            mem: MemMode::NoHuge,
        },
    )
    .expect("pool")
}

fn env(pool: &Arc<Mempool>, id: u16) -> PortEnv {
    PortEnv {
        pool: Arc::clone(pool),
        rings: RingRegistry::new(),
        port_id: id,
        pkt_size: 64,
        cache_size: 64,
    }
}

fn create(spec: &str, pool: &Arc<Mempool>, id: u16) -> vdpakit_core::Result<Box<dyn Port>> {
    port::register(&[vdpakit_pmd_mlx5::PORT_KIND]).unwrap();
    port::create(&PortSpec::parse(spec)?, &env(pool, id))
}

fn open(spec: &str, pool: &Arc<Mempool>, id: u16, queues: u16) -> Box<dyn Port> {
    let mut p = create(spec, pool, id).expect("create");
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

/// An IPv4/UDP frame to `dst`, flow `flow` (source port), sequence `seq`, varied length.
fn frame(dst: [u8; 6], flow: u16, seq: u32) -> Vec<u8> {
    let len = 64 + (seq as usize * 131) % 1400;
    let mut f = vec![0u8; len];
    f[..6].copy_from_slice(&dst);
    f[6..12].copy_from_slice(&[0x02, 0, 0, 0, 0, 0x77]);
    f[12..14].copy_from_slice(&0x0800u16.to_be_bytes());
    f[14] = 0x45;
    f[23] = 17;
    f[26..30].copy_from_slice(&[10, 0, 0, 1]);
    f[30..34].copy_from_slice(&[10, 0, 0, 2]);
    f[34..36].copy_from_slice(&(1000 + flow).to_be_bytes());
    f[36..38].copy_from_slice(&4789u16.to_be_bytes());
    f[42..46].copy_from_slice(&seq.to_be_bytes());
    for (i, b) in f.iter_mut().enumerate().skip(46) {
        *b = (i as u32).wrapping_mul(7).wrapping_add(seq) as u8;
    }
    f
}

fn seq(f: &[u8]) -> u32 {
    u32::from_be_bytes([f[42], f[43], f[44], f[45]])
}

/// Sends `frames` on `tx` (at most 128 in flight: the receive rings always have buffers) and
/// collects what arrives on `rx` until `expect` frames came; returns them per receive queue.
fn pass(
    pool: &Arc<Mempool>,
    tx: &mut dyn TxQueue,
    rx: &mut [Box<dyn RxQueue>],
    frames: &[Vec<u8>],
    expect: usize,
) -> Vec<Vec<Vec<u8>>> {
    let mut sent = 0usize;
    let mut got: Vec<Vec<Vec<u8>>> = vec![Vec::new(); rx.len()];
    let mut out = Burst::new(32);
    let mut inb = Burst::new(32);
    let end = Instant::now() + Duration::from_secs(10);
    let total = |g: &Vec<Vec<Vec<u8>>>| g.iter().map(Vec::len).sum::<usize>();
    while total(&got) < expect || sent < frames.len() {
        assert!(
            Instant::now() < end,
            "{} of {expect} frames arrived ({sent} sent)",
            total(&got)
        );
        while sent < frames.len() && out.room() > 0 && out.len() < 16 && sent - total(&got) < 128 {
            let mut m = pool.alloc().expect("mbuf");
            m.append(frames[sent].len())
                .unwrap()
                .copy_from_slice(&frames[sent]);
            let _ = out.push(m);
            sent += 1;
        }
        tx.tx_burst(&mut out);
        for (k, q) in rx.iter_mut().enumerate() {
            q.rx_burst(&mut inb);
            while let Some(m) = inb.pop() {
                got[k].push(m.data().to_vec());
            }
        }
        std::thread::yield_now();
    }
    // Nothing more.
    std::thread::sleep(Duration::from_millis(20));
    for q in rx.iter_mut() {
        assert_eq!(q.rx_burst(&mut inb), 0, "more frames than sent");
    }
    for g in &mut got {
        g.sort_by_key(|f| seq(f));
    }
    got
}

#[test]
fn cabled_functions_forward_both_ways() {
    let pool = pool();
    let mut a = open("mlx5:model=port-cable,wire=cable,vf=0", &pool, 0, 1);
    let mut b = open("mlx5:model=port-cable,vf=1", &pool, 1, 1);
    let (mut qa, mut qb) = (queues(&mut a), queues(&mut b));
    let to_b: Vec<Vec<u8>> = (0..2000).map(|i| frame(b.mac(), 1, i)).collect();
    let got = pass(&pool, qa.tx[0].as_mut(), &mut qb.rx, &to_b, 2000);
    assert_eq!(got[0], to_b, "a → b: every frame once, intact");
    let to_a: Vec<Vec<u8>> = (0..1500).map(|i| frame(a.mac(), 2, 10_000 + i)).collect();
    let got = pass(&pool, qb.tx[0].as_mut(), &mut qa.rx, &to_a, 1500);
    assert_eq!(got[0], to_a, "b → a");
    let (sa, sb) = (a.stats(), b.stats());
    assert_eq!((sa.tx.packets, sb.rx.packets), (2000, 2000));
    assert_eq!((sb.tx.packets, sa.rx.packets), (1500, 1500));
    assert_eq!(sa.rx.errors + sb.rx.errors + sa.tx.drops + sb.tx.drops, 0);
    assert!(a.link().up && b.link().up);
    // The model counted the same: what each function transmitted and received.
    let dev = Mlx5Device::get_or_create("port-cable", || panic!("the ports made it")).unwrap();
    let (ma, mb) = (dev.functions()[0].stats(), dev.functions()[1].stats());
    assert_eq!((ma.tx_frames, ma.rx_frames), (2000, 1500));
    assert_eq!((mb.tx_frames, mb.rx_frames), (1500, 2000));
    assert_eq!(
        ma.rx_drops + mb.rx_drops + ma.steer_drops + mb.steer_drops,
        0
    );
    assert_eq!(
        ma.notifies + mb.notifies,
        0,
        "polled: the rings ask for no interrupt"
    );
    // Stop and start again: the queue objects are destroyed and made anew.
    drop((qa, qb));
    a.stop().unwrap();
    b.stop().unwrap();
    assert!(!a.link().up);
    let live = dev.functions()[0].census();
    assert!(
        !live.contains_key(&vdpakit_pmd_mlx5::model::Kind::Vq),
        "no queue object after stop: {live:?}"
    );
    a.start().unwrap();
    b.start().unwrap();
    let (mut qa, mut qb) = (queues(&mut a), queues(&mut b));
    let more: Vec<Vec<u8>> = (0..500).map(|i| frame(b.mac(), 3, 50_000 + i)).collect();
    assert_eq!(
        pass(&pool, qa.tx[0].as_mut(), &mut qb.rx, &more, 500)[0],
        more
    );
    drop((qa, qb, a, b));
    let f = &dev.functions()[0];
    assert_eq!(f.live_objects(), 0, "port gone, function torn down");
}

/// Two queue pairs on the receiving port: flows spread over both receive queues by the hash,
/// every frame exactly once.
#[test]
fn two_pairs_spread_by_flow() {
    let pool = pool();
    let mut a = open("mlx5:model=port-mq,vfs=2,wire=cable,queues=2", &pool, 0, 2);
    let mut b = open("mlx5:model=port-mq,vf=1,queues=2", &pool, 1, 2);
    let (mut qa, mut qb) = (queues(&mut a), queues(&mut b));
    assert_eq!((qa.tx.len(), qb.rx.len()), (2, 2));
    let frames: Vec<Vec<u8>> = (0..1024)
        .map(|i| frame(b.mac(), (i % 64) as u16, i))
        .collect();
    let got = pass(&pool, qa.tx[1].as_mut(), &mut qb.rx, &frames, 1024);
    assert!(!got[0].is_empty() && !got[1].is_empty(), "both queues used");
    let all: BTreeSet<u32> = got.iter().flatten().map(|f| seq(f)).collect();
    assert_eq!(all.len(), 1024);
    // One flow, one queue.
    for q in &got {
        let flows: BTreeSet<u16> = q
            .iter()
            .map(|f| u16::from_be_bytes([f[34], f[35]]))
            .collect();
        for other in &got {
            if !std::ptr::eq(q, other) {
                assert!(
                    other
                        .iter()
                        .all(|f| !flows.contains(&u16::from_be_bytes([f[34], f[35]])))
                );
            }
        }
    }
    assert_eq!(b.stats().rx.packets, 1024);
}

/// promisc=0: only the function's MAC and multicast pass; promiscuous (the default) takes
/// every frame.
#[test]
fn promiscuous_by_default_filtered_on_request() {
    let pool = pool();
    let mut a = open("mlx5:model=port-promisc,wire=cable,vfs=2", &pool, 0, 1);
    let mut b = open("mlx5:model=port-promisc,vf=1,promisc=0", &pool, 1, 1);
    let (mut qa, mut qb) = (queues(&mut a), queues(&mut b));
    let other = [0x02, 9, 9, 9, 9, 9];
    let mix: Vec<Vec<u8>> = (0..300)
        .map(|i| match i % 3 {
            0 => frame(b.mac(), 1, i),
            1 => frame(other, 1, i),
            _ => frame([0xff; 6], 1, i),
        })
        .collect();
    let got = pass(&pool, qa.tx[0].as_mut(), &mut qb.rx, &mix, 200);
    let want: Vec<Vec<u8>> = mix.iter().filter(|f| f[..6] != other).cloned().collect();
    assert_eq!(got[0], want);
    let dev = Mlx5Device::get_or_create("port-promisc", || panic!("the ports made it")).unwrap();
    assert_eq!(dev.functions()[1].stats().steer_drops, 100);
    // Back the other way, into the promiscuous function: everything arrives.
    let got = pass(&pool, qb.tx[0].as_mut(), &mut qa.rx, &mix, 300);
    assert_eq!(got[0], mix);
    assert_eq!(dev.functions()[0].stats().steer_drops, 0);
}

#[test]
fn spec_errors_name_the_key() {
    let pool = pool();
    for (spec, says) in [
        ("mlx5:queues=1", "pci=0000:01:00.0), or model"),
        ("mlx5:model,pci=0000:01:00.0", "either pci=BDF or model"),
        ("mlx5:model,wire=coax", "wire=coax"),
        ("mlx5:model,queue_size=100", "a power of two"),
        ("mlx5:model,promisc=2", "promisc"),
        ("mlx5:model,colour=red", "colour"),
        ("mlx5:model=port-err,queues=9", "queues"),
    ] {
        let e = create(spec, &pool, 0).map(|_| ()).unwrap_err().to_string();
        assert!(e.contains(says), "{spec}: {e}");
    }
}

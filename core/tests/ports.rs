//! The port API through its public surface: null and ring ports, exact counts, wiring errors.

use std::sync::Arc;

use vdpakit_core::Error;
use vdpakit_core::mbuf::Burst;
use vdpakit_core::mem::MemMode;
use vdpakit_core::mempool::{Mempool, MempoolConfig};
use vdpakit_core::port::{self, Port, PortConf, PortEnv, PortSpec, QueuePair, RingRegistry};

fn pool(count: u32) -> Arc<Mempool> {
    Mempool::new(
        "ports-test",
        MempoolConfig {
            count,
            cache_size: 32,
            mem: MemMode::NoHuge,
            ..Default::default()
        },
    )
    .unwrap()
}

fn env(pool: &Arc<Mempool>, rings: &RingRegistry, id: u16) -> PortEnv {
    PortEnv {
        pool: Arc::clone(pool),
        rings: rings.clone(),
        port_id: id,
        pkt_size: 64,
        cache_size: 32,
    }
}

fn make(spec: &str, env: &PortEnv, queues: u16) -> vdpakit_core::Result<Box<dyn Port>> {
    let mut p = port::create(&PortSpec::parse(spec)?, env)?;
    p.configure(&PortConf {
        rx_queues: queues,
        tx_queues: queues,
        rx_desc: 256,
        tx_desc: 256,
    })?;
    Ok(p)
}

fn fill(pool: &Mempool, n: usize, len: usize) -> Burst {
    fill_from(pool, 0, n, len)
}

fn fill_from(pool: &Mempool, first: usize, n: usize, len: usize) -> Burst {
    let mut b = Burst::new(n);
    for i in first..first + n {
        let mut m = pool.alloc().unwrap();
        let d = m.append(len).unwrap();
        d[0] = i as u8;
        d[1] = (i >> 8) as u8;
        b.push(m).unwrap();
    }
    b
}

#[test]
fn ring_pair_is_a_wire_with_exact_counts_and_order() {
    let p = pool(2048);
    let rings = RingRegistry::new();
    let mut a = make("ring:name=a,peer=b,prefill=0", &env(&p, &rings, 0), 2).unwrap();
    let mut b = make("ring:name=b,peer=a,prefill=0", &env(&p, &rings, 1), 2).unwrap();
    a.start().unwrap();
    b.start().unwrap();
    let mut qa: Vec<QueuePair> = a.take_queues().unwrap();
    let mut qb = b.take_queues().unwrap();
    assert_eq!(qa.len(), 2);

    // a queue 1 → b queue 1, 100 packets of 100 bytes in bursts of 32.
    let txa = qa[1].tx.as_mut().unwrap();
    let rxb = qb[1].rx.as_mut().unwrap();
    let mut sent = 0;
    while sent < 100 {
        let mut burst = fill_from(&p, sent, 32.min(100 - sent), 100);
        let n = burst.len();
        assert_eq!(txa.tx_burst(&mut burst), n);
        sent += n;
    }
    let mut got = Vec::new();
    let mut burst = Burst::new(32);
    while rxb.rx_burst(&mut burst) > 0 {
        burst.drain_front(burst.len(), |m| {
            assert_eq!((m.port(), m.queue(), m.data_len()), (1, 1, 100));
            got.push(m.data()[0] as usize | (m.data()[1] as usize) << 8);
        });
    }
    assert_eq!(
        got,
        (0..100).collect::<Vec<_>>(),
        "every packet arrives once, in order"
    );
    // Queue 0 of b saw nothing: queues are separate rings.
    assert_eq!(qb[0].rx.as_mut().unwrap().rx_burst(&mut burst), 0);

    let sa = a.stats();
    let sb = b.stats();
    assert_eq!((sa.tx.packets, sa.tx.bytes), (100, 10_000));
    assert_eq!((sb.rx.packets, sb.rx.bytes), (100, 10_000));
    assert_eq!(sb.rx_queues[1].packets, 100);
    assert_eq!(sb.rx_queues[0].packets, 0);
    drop((qa, qb));
    a.stop().unwrap();
    b.stop().unwrap();
    assert_eq!(p.available(), 2048, "all buffers back after stop");
}

#[test]
fn full_ring_leaves_unsent_packets_with_the_caller() {
    let p = pool(1024);
    let rings = RingRegistry::new();
    let mut a = make("ring:name=a,size=64,prefill=0", &env(&p, &rings, 0), 1).unwrap();
    a.start().unwrap();
    let mut q = a.take_queues().unwrap();
    let tx = q[0].tx.as_mut().unwrap();
    let mut b1 = fill(&p, 60, 64);
    assert_eq!(tx.tx_burst(&mut b1), 60);
    let mut b2 = fill(&p, 10, 64);
    assert_eq!(
        tx.tx_burst(&mut b2),
        4,
        "only 4 slots left in a 64-entry ring"
    );
    assert_eq!(b2.len(), 6);
    assert_eq!(
        b2.as_slice()[0].data()[0],
        4,
        "the unsent ones are the last ones, in order"
    );
    assert_eq!(a.stats().tx.packets, 64);
}

#[test]
fn prefill_puts_packets_on_the_wire() {
    let p = pool(2048);
    let rings = RingRegistry::new();
    let mut a = make("ring:name=a,prefill=100", &env(&p, &rings, 0), 2).unwrap();
    a.start().unwrap();
    let mut q = a.take_queues().unwrap();
    let mut total = 0;
    let mut b = Burst::new(512);
    for pair in q.iter_mut() {
        let n = pair.rx.as_mut().unwrap().rx_burst(&mut b);
        total += n;
        for m in b.iter() {
            assert_eq!(m.data_len(), 64);
            assert_eq!(&m.data()[12..14], &[8, 0], "an IPv4 frame");
        }
        b.drain_front(b.len(), drop);
    }
    assert_eq!(total, 100);
}

#[test]
fn wiring_errors_are_clear() {
    let p = pool(1024);
    let rings = RingRegistry::new();
    let mut a = make("ring:name=a,peer=zz,prefill=0", &env(&p, &rings, 0), 1).unwrap();
    let e = a.start().unwrap_err().to_string();
    assert!(
        e.contains("peer ring 'zz' does not exist") && e.contains("ring:name=zz"),
        "{e}"
    );

    let e = make("ring:name=a", &env(&p, &rings, 1), 1)
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("ring name 'a' is already used by port 0"), "{e}");

    let rings = RingRegistry::new();
    let mut x = make("ring:name=x,peer=t,prefill=0", &env(&p, &rings, 0), 1).unwrap();
    let mut y = make("ring:name=y,peer=t,prefill=0", &env(&p, &rings, 1), 1).unwrap();
    let mut t = make("ring:name=t,prefill=0,peer=x", &env(&p, &rings, 2), 1).unwrap();
    x.start().unwrap();
    let e = y.start().unwrap_err().to_string();
    assert!(e.contains("already fed by another port"), "{e}");
    t.start().unwrap();

    let e = make("ring:size=100", &env(&p, &RingRegistry::new(), 0), 1)
        .err()
        .unwrap()
        .to_string();
    assert!(
        e.contains("size='100'") && e.contains("power of two"),
        "{e}"
    );
    let e = port::create(&PortSpec::parse("tap:x=1").unwrap(), &env(&p, &rings, 0))
        .err()
        .unwrap();
    assert!(matches!(e, Error::UnknownPortKind { .. }));
    assert!(e.to_string().contains("null, ring, vhost-user"), "{e}");
}

#[test]
fn null_port_generates_counts_and_frees() {
    let p = pool(1024);
    let rings = RingRegistry::new();
    let mut n = make("null:size=128,copy=1", &env(&p, &rings, 3), 1).unwrap();
    n.start().unwrap();
    let mut q = n.take_queues().unwrap();
    let mut b = Burst::new(32);
    assert_eq!(q[0].rx.as_mut().unwrap().rx_burst(&mut b), 32);
    for m in b.iter() {
        assert_eq!((m.data_len(), m.port()), (128, 3));
        assert_eq!(
            &m.data()[6..12],
            &[0x02, 0x76, 0x64, 0x70, 0, 3],
            "source MAC is the port's"
        );
    }
    assert_eq!(q[0].tx.as_mut().unwrap().tx_burst(&mut b), 32);
    assert!(b.is_empty());
    let s = n.stats();
    assert_eq!(
        (s.rx.packets, s.rx.bytes, s.tx.packets, s.tx.bytes),
        (32, 4096, 32, 4096)
    );

    let mut none = make("null:rx=none", &env(&p, &rings, 4), 1).unwrap();
    none.start().unwrap();
    let mut q = none.take_queues().unwrap();
    assert_eq!(q[0].rx.as_mut().unwrap().rx_burst(&mut b), 0);
}

#[test]
fn null_rx_counts_buffer_exhaustion_as_errors() {
    let p = pool(40);
    let rings = RingRegistry::new();
    let mut n = make("null", &env(&p, &rings, 0), 1).unwrap();
    n.start().unwrap();
    let mut q = n.take_queues().unwrap();
    let rx = q[0].rx.as_mut().unwrap();
    let mut b1 = Burst::new(32);
    assert_eq!(rx.rx_burst(&mut b1), 32);
    let mut b2 = Burst::new(32);
    assert_eq!(rx.rx_burst(&mut b2), 0, "only 8 buffers left");
    assert_eq!(n.stats().rx.errors, 1);
    assert!(p.alloc_failures() >= 1);
}

#[test]
fn port_state_machine_is_enforced() {
    let p = pool(1024);
    let rings = RingRegistry::new();
    let mut n = port::create(&PortSpec::parse("null").unwrap(), &env(&p, &rings, 0)).unwrap();
    assert!(n.start().is_err(), "start before configure");
    n.configure(&PortConf::default()).unwrap();
    n.start().unwrap();
    assert!(n.link().up);
    assert!(
        n.configure(&PortConf::default()).is_err(),
        "configure while started"
    );
    n.take_queues().unwrap();
    let e = n.take_queues().unwrap_err().to_string();
    assert!(e.contains("already taken"), "{e}");
    n.stop().unwrap();
    assert!(!n.link().up);
    n.start().unwrap();
    assert_eq!(
        n.take_queues().unwrap().len(),
        1,
        "queues again after a restart"
    );
}

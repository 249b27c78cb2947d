//! The datapath allocates nothing: rx/tx bursts of every port kind, cache alloc/free and burst
//! moves run under a counting global allocator, and the count must not move.

use std::sync::Arc;

use vdpakit_core::mbuf::Burst;
use vdpakit_core::mem::MemMode;
use vdpakit_core::mempool::{Mempool, MempoolConfig};
use vdpakit_core::port::{self, PortConf, PortEnv, PortSpec, RingRegistry};

#[path = "support/counting_alloc.rs"]
mod counting_alloc;
use counting_alloc::allocs;

#[test]
fn bursts_allocate_nothing() {
    let pool = Mempool::new(
        "noalloc",
        MempoolConfig {
            count: 4096,
            cache_size: 64,
            mem: MemMode::NoHuge,
            ..Default::default()
        },
    )
    .unwrap();
    let rings = RingRegistry::new();
    let env = |id| PortEnv {
        pool: Arc::clone(&pool),
        rings: rings.clone(),
        port_id: id,
        pkt_size: 64,
        cache_size: 64,
    };
    let conf = PortConf {
        rx_queues: 1,
        tx_queues: 1,
        rx_desc: 512,
        tx_desc: 512,
    };
    let mut ring = port::create(
        &PortSpec::parse("ring:name=a,prefill=256").unwrap(),
        &env(0),
    )
    .unwrap();
    let mut null = port::create(&PortSpec::parse("null:copy=1").unwrap(), &env(1)).unwrap();
    ring.configure(&conf).unwrap();
    null.configure(&conf).unwrap();
    ring.start().unwrap();
    null.start().unwrap();
    let mut rq = ring.take_queues().unwrap();
    let mut nq = null.take_queues().unwrap();
    let mut cache = pool.cache(64);
    let mut burst = Burst::new(32);

    // Warm up once (first touches), then count.
    let before = allocs();
    let mut moved = 0usize;
    for _ in 0..2000 {
        // ring loopback: rx 32 then tx them back
        moved += rq[0].rx.as_mut().unwrap().rx_burst(&mut burst);
        rq[0].tx.as_mut().unwrap().tx_burst(&mut burst);
        cache.free_burst(&mut burst);
        // null: generate, transmit (frees)
        moved += nq[0].rx.as_mut().unwrap().rx_burst(&mut burst);
        nq[0].tx.as_mut().unwrap().tx_burst(&mut burst);
        // txonly-style: cache alloc, free
        assert!(cache.alloc_bulk(&mut burst, 32));
        cache.free_burst(&mut burst);
    }
    let after = allocs();
    assert!(
        moved > 2000 * 32,
        "the loops really moved packets ({moved})"
    );
    assert_eq!(after - before, 0, "allocations on the datapath");
}

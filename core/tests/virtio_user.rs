//! The `virtio-user` port (vdpakit as vhost-user front end) against vdpakit's own `vhost-user`
//! back end in one process, over a real Unix socket: exact counts and payloads both ways, split
//! and packed rings, mergeable receive buffers on and off, IN_ORDER with batched used entries,
//! feature errors, and a back end that goes away and comes back while the front end keeps
//! running.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use vdpakit_core::mbuf::Burst;
use vdpakit_core::mem::MemMode;
use vdpakit_core::mempool::{Mempool, MempoolConfig};
use vdpakit_core::port::{
    self, Port, PortConf, PortEnv, PortSpec, QueuePair, RingRegistry, VirtioUserPort,
};
use vdpakit_core::virtio::features as vf;

fn pool() -> Arc<Mempool> {
    Mempool::new(
        "virtio-user-test",
        MempoolConfig {
            count: 4096,
            cache_size: 64,
            mem: MemMode::NoHuge,
            ..Default::default()
        },
    )
    .unwrap()
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

const CONF: PortConf = PortConf {
    rx_queues: 1,
    tx_queues: 1,
    rx_desc: 256,
    tx_desc: 256,
};

/// A fresh directory for a socket.
fn sock_path() -> PathBuf {
    static N: AtomicU32 = AtomicU32::new(0);
    let dir = std::env::temp_dir().join(format!(
        "vk-vu-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir.join("vhost.sock")
}

fn back_end(spec: &str, pool: &Arc<Mempool>) -> Box<dyn Port> {
    let mut p = port::create(&PortSpec::parse(spec).unwrap(), &env(pool, 0)).unwrap();
    p.configure(&CONF).unwrap();
    p.start().unwrap();
    p
}

fn front_end(spec: &str, pool: &Arc<Mempool>) -> VirtioUserPort {
    let mut p = VirtioUserPort::new(&PortSpec::parse(spec).unwrap(), &env(pool, 1)).unwrap();
    p.configure(&CONF).unwrap();
    p.start().unwrap();
    p
}

fn wait_until(what: &str, mut f: impl FnMut() -> bool) {
    let end = Instant::now() + Duration::from_secs(10);
    while !f() {
        assert!(Instant::now() < end, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Packet `i`: length 60..=1514 depending on `i`, bytes 0..4 = i, the rest a pattern of i.
fn packet(pool: &Mempool, i: u32) -> vdpakit_core::Mbuf {
    let len = 60 + (i as usize * 37) % 1455;
    let mut m = pool.alloc().expect("pool exhausted");
    let d = m.append(len).unwrap();
    d[..4].copy_from_slice(&i.to_le_bytes());
    for (k, b) in d[4..].iter_mut().enumerate() {
        *b = (k as u32).wrapping_mul(7).wrapping_add(i) as u8;
    }
    m
}

/// Packet `i` as a chain of segments of 1..=300 bytes (depending on `i`).
fn chained_packet(pool: &Mempool, i: u32) -> vdpakit_core::Mbuf {
    let whole = packet(pool, i).to_vec();
    let step = 1 + (i as usize * 13) % 300;
    let mut parts = whole.chunks(step);
    let mut head = pool.alloc().expect("pool exhausted");
    let first = parts.next().unwrap();
    head.append(first.len()).unwrap().copy_from_slice(first);
    for p in parts {
        let mut m = pool.alloc().expect("pool exhausted");
        m.append(p.len()).unwrap().copy_from_slice(p);
        head.chain(m).unwrap();
    }
    assert_eq!(head.pkt_len(), whole.len());
    head
}

fn check(m: &vdpakit_core::Mbuf, i: u32) {
    let whole = m.to_vec();
    let d = &whole[..];
    assert_eq!(
        d.len(),
        60 + (i as usize * 37) % 1455,
        "length of packet {i}"
    );
    let got = u32::from_le_bytes([d[0], d[1], d[2], d[3]]);
    assert_eq!(got, i, "packet order");
    for (k, b) in d[4..].iter().enumerate() {
        assert_eq!(
            *b,
            (k as u32).wrapping_mul(7).wrapping_add(i) as u8,
            "byte {k} of packet {i}"
        );
    }
}

/// Sends `n` packets numbered from `first` through `tx` and receives them on `rx`, checking every
/// one in order.
fn transfer(pool: &Mempool, tx: &mut QueuePair, rx: &mut QueuePair, first: u32, n: u32) {
    transfer_with(pool, tx, rx, first, n, packet, |_, _| {});
}

/// [`transfer`] with packets made by `make` and each received one also shown to `seen`.
fn transfer_with(
    pool: &Mempool,
    tx: &mut QueuePair,
    rx: &mut QueuePair,
    first: u32,
    n: u32,
    make: fn(&Mempool, u32) -> vdpakit_core::Mbuf,
    mut seen: impl FnMut(&vdpakit_core::Mbuf, u32),
) {
    let txq = tx.tx.as_mut().unwrap();
    let rxq = rx.rx.as_mut().unwrap();
    let mut pending = Burst::new(32);
    let mut got = Burst::new(32);
    let (mut next, mut expect) = (first, first);
    let end = Instant::now() + Duration::from_secs(20);
    while expect < first + n {
        assert!(
            Instant::now() < end,
            "stuck at packet {expect} (sent up to {next})"
        );
        while pending.room() > 0 && next < first + n {
            pending.push(make(pool, next)).unwrap();
            next += 1;
        }
        txq.tx_burst(&mut pending);
        rxq.rx_burst(&mut got);
        got.drain_front(got.len(), |m| {
            check(&m, expect);
            seen(&m, expect);
            expect += 1;
        });
    }
    // Nothing extra shows up.
    std::thread::sleep(Duration::from_millis(20));
    assert_eq!(rxq.rx_burst(&mut got), 0, "a packet arrived twice");
    // The transmit side gets its completed buffers back on its next burst.
    txq.tx_burst(&mut pending);
}

/// How the front end and the back end treat VIRTIO_F_IN_ORDER in a test.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum InOrder {
    /// The front end does not ask for it (`in_order=0`).
    Off,
    /// Negotiated; the back end writes one used entry per chain.
    PerChain,
    /// Negotiated; the back end batches used entries (`in_order=batch`).
    Batched,
}

fn both_ways(packed: bool, mrg: bool) {
    both_ways_in_order(packed, mrg, InOrder::Off);
}

fn both_ways_in_order(packed: bool, mrg: bool, in_order: InOrder) {
    let pool = pool();
    let sock = sock_path();
    let (p, m) = (packed as u8, mrg as u8);
    let (be_io, fe_io) = match in_order {
        InOrder::Off => ("1", "0"),
        InOrder::PerChain => ("1", "1"),
        InOrder::Batched => ("batch", "1"),
    };
    let be_spec = format!(
        "vhost-user:path={},packed=1,mrg_rxbuf=1,in_order={be_io}",
        sock.display()
    );
    let mut be = back_end(&be_spec, &pool);
    let fe_spec = format!(
        "virtio-user:path={},packed={p},mrg_rxbuf={m},in_order={fe_io}",
        sock.display()
    );
    let mut fe = front_end(&fe_spec, &pool);
    wait_until("both links", || fe.link().up && be.link().up);
    let f = fe.negotiated_features().unwrap();
    assert_eq!(
        f & vf::RING_PACKED != 0,
        packed,
        "packed negotiated: {f:#x}"
    );
    assert_eq!(f & vf::NET_MRG_RXBUF != 0, mrg, "mrg negotiated: {f:#x}");
    assert_eq!(
        f & vf::IN_ORDER != 0,
        in_order != InOrder::Off,
        "in-order negotiated: {f:#x}"
    );
    assert_ne!(f & vf::VERSION_1, 0);

    let mut fq = fe.take_queues().unwrap();
    let mut bq = be.take_queues().unwrap();
    const N: u32 = 3000;
    transfer(&pool, &mut fq[0], &mut bq[0], 0, N);
    transfer(&pool, &mut bq[0], &mut fq[0], 0, N);
    // The back end's transmit completions (read-only chains) came in batches only when asked.
    let implied = fe.in_order_implied();
    if in_order == InOrder::Batched {
        assert!(implied > 0, "no in-order batch was resolved");
    } else {
        assert_eq!(implied, 0);
    }

    let fs = fe.stats();
    let bs = be.stats();
    assert_eq!(fs.tx.packets, N as u64, "front end tx: {fs:?}");
    assert_eq!(fs.rx.packets, N as u64, "front end rx: {fs:?}");
    assert_eq!(bs.rx.packets, N as u64, "back end rx: {bs:?}");
    assert_eq!(bs.tx.packets, N as u64, "back end tx: {bs:?}");
    let bytes: u64 = (0..N).map(|i| 60 + (i as u64 * 37) % 1455).sum();
    assert_eq!(fs.tx.bytes, bytes);
    assert_eq!(fs.rx.bytes, bytes);
    assert_eq!(bs.rx.bytes, bytes);
    for c in [fs.tx, fs.rx, bs.tx, bs.rx] {
        assert_eq!((c.drops, c.errors), (0, 0), "{fs:?} {bs:?}");
    }
    drop(fq);
    drop(bq);
    fe.stop().unwrap();
    be.stop().unwrap();
    let _ = std::fs::remove_dir_all(sock.parent().unwrap());
}

#[test]
fn split_mergeable_both_ways() {
    both_ways(false, true);
}

#[test]
fn split_not_mergeable_both_ways() {
    both_ways(false, false);
}

#[test]
fn packed_mergeable_both_ways() {
    both_ways(true, true);
}

#[test]
fn packed_not_mergeable_both_ways() {
    both_ways(true, false);
}

#[test]
fn split_in_order_per_chain_both_ways() {
    both_ways_in_order(false, true, InOrder::PerChain);
}

#[test]
fn split_in_order_batched_both_ways() {
    both_ways_in_order(false, true, InOrder::Batched);
}

#[test]
fn split_in_order_batched_not_mergeable_both_ways() {
    both_ways_in_order(false, false, InOrder::Batched);
}

#[test]
fn packed_in_order_per_chain_both_ways() {
    both_ways_in_order(true, true, InOrder::PerChain);
}

#[test]
fn packed_in_order_batched_both_ways() {
    both_ways_in_order(true, true, InOrder::Batched);
}

#[test]
fn packed_in_order_batched_not_mergeable_both_ways() {
    both_ways_in_order(true, false, InOrder::Batched);
}

/// Receive buffers of `rx_buf=128` bytes with mergeable rx buffers: the back end spreads every
/// frame over several buffers and the front end delivers each as one mbuf chain (length and
/// bytes exact, as many segments as buffers). Chained packets also go out both ways: the front
/// end posts a chain as one descriptor per segment, the back end gathers one into the guest's
/// buffers. `batch`: the back end also returns completely filled buffers in in-order batches.
fn mergeable_chains(packed: bool, batch: bool) {
    let pool = pool();
    let sock = sock_path();
    let be_spec = format!(
        "vhost-user:path={},in_order={}",
        sock.display(),
        if batch { "batch" } else { "1" }
    );
    let mut be = back_end(&be_spec, &pool);
    let mut fe = front_end(
        &format!(
            "virtio-user:path={},packed={},mrg_rxbuf=1,rx_buf=128",
            sock.display(),
            packed as u8
        ),
        &pool,
    );
    wait_until("both links", || fe.link().up && be.link().up);
    assert_ne!(fe.negotiated_features().unwrap() & vf::NET_MRG_RXBUF, 0);
    let mut fq = fe.take_queues().unwrap();
    let mut bq = be.take_queues().unwrap();
    const N: u32 = 2000;
    let mut multi = 0;
    // Every 128-byte buffer holds 116 frame bytes after the 12-byte header, then 128 each.
    let segs_for = |len: usize| 1 + (len.saturating_sub(116)).div_ceil(128);
    transfer_with(&pool, &mut bq[0], &mut fq[0], 0, N, packet, |m, _| {
        assert_eq!(
            m.nb_segs() as usize,
            segs_for(m.pkt_len()),
            "{}",
            m.pkt_len()
        );
        multi += usize::from(m.nb_segs() > 1);
    });
    // The back end transmits chains (gathered into the front end's small buffers).
    transfer_with(
        &pool,
        &mut bq[0],
        &mut fq[0],
        N,
        N,
        chained_packet,
        |m, _| {
            assert_eq!(m.nb_segs() as usize, segs_for(m.pkt_len()));
        },
    );
    // The front end transmits chains.
    transfer_with(
        &pool,
        &mut fq[0],
        &mut bq[0],
        0,
        N,
        chained_packet,
        |m, _| {
            assert_eq!(m.nb_segs(), 1, "the back end receives into one mbuf");
        },
    );
    assert!(multi > N as usize / 2, "only {multi} packets were spread");
    let fs = fe.stats();
    let bs = be.stats();
    let bytes: u64 = (0..2 * N).map(|i| 60 + (i as u64 * 37) % 1455).sum();
    assert_eq!(
        (fs.rx.packets, fs.rx.bytes),
        (2 * N as u64, bytes),
        "{fs:?}"
    );
    assert_eq!(
        (bs.tx.packets, bs.tx.bytes),
        (2 * N as u64, bytes),
        "{bs:?}"
    );
    let out: u64 = (0..N).map(|i| 60 + (i as u64 * 37) % 1455).sum();
    assert_eq!((fs.tx.packets, fs.tx.bytes), (N as u64, out), "{fs:?}");
    assert_eq!((bs.rx.packets, bs.rx.bytes), (N as u64, out), "{bs:?}");
    for c in [fs.tx, fs.rx, bs.tx, bs.rx] {
        assert_eq!((c.drops, c.errors), (0, 0), "{fs:?} {bs:?}");
    }
    if batch {
        assert!(fe.in_order_implied() > 0);
    }
    drop(fq);
    drop(bq);
    fe.stop().unwrap();
    be.stop().unwrap();
    // Every buffer came back: nothing leaked in chains.
    drop((fe, be));
    assert_eq!(pool.available(), pool.count() as usize);
    let _ = std::fs::remove_dir_all(sock.parent().unwrap());
}

#[test]
fn split_mergeable_rx_arrives_as_chains() {
    mergeable_chains(false, false);
}

#[test]
fn packed_mergeable_rx_arrives_as_chains() {
    mergeable_chains(true, false);
}

#[test]
fn split_mergeable_rx_chains_with_in_order_batches() {
    mergeable_chains(false, true);
}

#[test]
fn packed_mergeable_rx_chains_with_in_order_batches() {
    mergeable_chains(true, true);
}

#[test]
fn in_order_falls_back_when_not_offered_unless_required() {
    let pool = pool();
    let sock = sock_path();
    let _be = back_end(
        &format!("vhost-user:path={},in_order=0", sock.display()),
        &pool,
    );
    let fe = front_end(&format!("virtio-user:path={}", sock.display()), &pool);
    wait_until("link", || fe.link().up);
    assert_eq!(fe.negotiated_features().unwrap() & vf::IN_ORDER, 0);
    drop(fe);
    let fe = front_end(
        &format!("virtio-user:path={},in_order=1", sock.display()),
        &pool,
    );
    wait_until("the set-up error", || fe.last_error().is_some());
    let e = fe.last_error().unwrap();
    assert!(
        e.contains("VIRTIO_F_IN_ORDER") && e.contains("in_order=1"),
        "{e}"
    );
    assert!(!fe.link().up);
}

#[test]
fn in_order_is_used_by_default_when_offered() {
    let pool = pool();
    let sock = sock_path();
    let _be = back_end(&format!("vhost-user:path={}", sock.display()), &pool);
    let fe = front_end(&format!("virtio-user:path={}", sock.display()), &pool);
    wait_until("link", || fe.link().up);
    assert_ne!(fe.negotiated_features().unwrap() & vf::IN_ORDER, 0);
}

#[test]
fn packed_asked_for_but_not_offered_is_an_error_naming_it() {
    let pool = pool();
    let sock = sock_path();
    let be_spec = format!("vhost-user:path={},packed=0", sock.display());
    let _be = back_end(&be_spec, &pool);
    let fe = front_end(
        &format!("virtio-user:path={},packed=1", sock.display()),
        &pool,
    );
    wait_until("the set-up error", || fe.last_error().is_some());
    let e = fe.last_error().unwrap();
    assert!(
        e.contains("VIRTIO_F_RING_PACKED") && e.contains("packed=1"),
        "{e}"
    );
    assert!(!fe.link().up);
}

#[test]
fn mergeable_falls_back_when_not_offered_unless_required() {
    let pool = pool();
    let sock = sock_path();
    let _be = back_end(
        &format!("vhost-user:path={},mrg_rxbuf=0", sock.display()),
        &pool,
    );
    let fe = front_end(&format!("virtio-user:path={}", sock.display()), &pool);
    wait_until("link", || fe.link().up);
    assert_eq!(fe.negotiated_features().unwrap() & vf::NET_MRG_RXBUF, 0);
    drop(fe);
    let fe = front_end(
        &format!("virtio-user:path={},mrg_rxbuf=1", sock.display()),
        &pool,
    );
    wait_until("the set-up error", || fe.last_error().is_some());
    assert!(fe.last_error().unwrap().contains("VIRTIO_NET_F_MRG_RXBUF"));
}

#[test]
fn bad_spec_values_name_the_value_and_what_is_accepted() {
    let pool = pool();
    for (spec, needle) in [
        ("virtio-user:server=1", "path"),
        ("virtio-user:path=/x,queue_size=100", "power of two"),
        ("virtio-user:path=/x,queue_size=16", "64..=32768"),
        ("virtio-user:path=/x,packed=2", "packed='2'"),
        ("virtio-user:path=/x,in_order=2", "in_order='2'"),
        ("virtio-user:path=/x,rx_buf=64", "128..=2060"),
        ("virtio-user:path=/x,rx_buf=4096", "rx_buf='4096'"),
        ("virtio-user:path=/x,queues=0", "1..=128"),
        ("virtio-user:path=/x,mac=zz", "mac='zz'"),
        ("virtio-user:path=/x,bogus=1", "bogus"),
    ] {
        let e = port::create(&PortSpec::parse(spec).unwrap(), &env(&pool, 0))
            .err()
            .unwrap_or_else(|| panic!("{spec} was accepted"))
            .to_string();
        assert!(e.contains(needle), "{spec}: {e}");
    }
}

/// The back end goes away and a new one comes up on the same socket while the front end keeps
/// running: packets offered while it is down are not taken (the caller's drops), traffic resumes
/// both ways, and every packet is accounted for.
#[test]
fn back_end_restart_reconnects_and_accounts_for_everything() {
    for packed in [false, true] {
        let pool = pool();
        let sock = sock_path();
        let be_spec = format!("vhost-user:path={}", sock.display());
        let mut be = back_end(&be_spec, &pool);
        let mut fe = front_end(
            &format!(
                "virtio-user:path={},packed={}",
                sock.display(),
                packed as u8
            ),
            &pool,
        );
        wait_until("both links", || fe.link().up && be.link().up);
        let mut fq = fe.take_queues().unwrap();
        let mut bq = be.take_queues().unwrap();
        transfer(&pool, &mut fq[0], &mut bq[0], 0, 500);
        transfer(&pool, &mut bq[0], &mut fq[0], 0, 500);

        // The back end goes away.
        drop(bq);
        be.stop().unwrap();
        drop(be);
        wait_until("the front end to see it", || !fe.link().up);
        let mut down = Burst::new(32);
        for i in 0..32 {
            down.push(packet(&pool, i)).unwrap();
        }
        let txq = fq[0].tx.as_mut().unwrap();
        assert_eq!(txq.tx_burst(&mut down), 0, "nothing is taken while down");
        assert_eq!(down.len(), 32);
        txq.stats().add_drops(down.len() as u64);
        drop(down);

        // A new back end on the same path; the front end reconnects by itself (1 s retry).
        let mut be = back_end(&be_spec, &pool);
        wait_until("the reconnect", || fe.link().up && be.link().up);
        assert_eq!(fe.connections(), 2);
        let mut bq = be.take_queues().unwrap();
        transfer(&pool, &mut fq[0], &mut bq[0], 1000, 700);
        transfer(&pool, &mut bq[0], &mut fq[0], 1000, 700);

        let fs = fe.stats();
        let bs = be.stats();
        // Sent by the front end == received by both back ends + counted drops.
        assert_eq!(fs.tx.packets, 500 + 700, "{fs:?}");
        assert_eq!(fs.tx.drops, 32, "{fs:?}");
        assert_eq!(bs.rx.packets, 700);
        assert_eq!(fs.rx.packets, 500 + 700, "{fs:?}");
        assert_eq!(fs.rx.drops, 0, "{fs:?}");
        assert_eq!(fs.rx.errors + fs.tx.errors, 0, "{fs:?}");
        drop(fq);
        drop(bq);
        fe.stop().unwrap();
        be.stop().unwrap();
        let _ = std::fs::remove_dir_all(sock.parent().unwrap());
    }
}

/// `server=1`: the front end listens and a back end in client mode connects to it.
#[test]
fn server_mode_front_end_takes_a_connecting_back_end() {
    let pool = pool();
    let sock = sock_path();
    let mut fe = front_end(
        &format!("virtio-user:path={},server=1,packed=1", sock.display()),
        &pool,
    );
    assert!(sock.exists(), "the front end listens at once");
    let mut be = back_end(
        &format!("vhost-user:path={},client=1", sock.display()),
        &pool,
    );
    wait_until("both links", || fe.link().up && be.link().up);
    let mut fq = fe.take_queues().unwrap();
    let mut bq = be.take_queues().unwrap();
    transfer(&pool, &mut fq[0], &mut bq[0], 0, 600);
    transfer(&pool, &mut bq[0], &mut fq[0], 0, 600);
    assert_eq!(fe.stats().tx.packets, 600);
    assert_eq!(be.stats().rx.packets, 600);
    assert_eq!(fe.stats().rx.packets, 600);
    drop(fq);
    drop(bq);
    be.stop().unwrap();
    fe.stop().unwrap();
    assert!(!sock.exists(), "the socket is removed when the port stops");
    let _ = std::fs::remove_dir_all(sock.parent().unwrap());
}

// ---------------------------------------------------------------------------------------------
// Teardown: buffers are used again only once the back end no longer can
// ---------------------------------------------------------------------------------------------

/// How a scripted back end ([`fake_back_end`]) ends.
#[derive(Clone, Copy, PartialEq, Eq)]
enum FakeEnd {
    /// Answers GET_VRING_BASE 300 ms after the first one arrives (having called `at_stop`).
    SlowStop,
    /// Never answers GET_VRING_BASE (a hung back end).
    NeverStop,
    /// Closes the connection when `hang_up` is raised (its process, this one, keeps running).
    HangUp,
}

/// A scripted back end on `sock` that offers VERSION_1 only (no protocol features: no acks, no
/// per-ring enables; the front end starts its rings after SET_VRING_KICK) and never consumes
/// anything: every buffer the front end posts stays posted.
fn fake_back_end(
    sock: &std::path::Path,
    end: FakeEnd,
    at_stop: impl FnOnce() + Send + 'static,
    hang_up: Arc<std::sync::atomic::AtomicBool>,
) -> std::thread::JoinHandle<()> {
    use vdpakit_core::vhost::msg::{FLAG_REPLY, FLAG_VERSION, Header, Req};
    use vdpakit_core::vhost::socket::Conn;
    let listener = std::os::unix::net::UnixListener::bind(sock).unwrap();
    std::thread::spawn(move || {
        let (stream, _) = listener.accept().unwrap();
        stream
            .set_read_timeout(Some(Duration::from_millis(20)))
            .unwrap();
        let mut conn = Conn::new(stream);
        let mut at_stop = Some(at_stop);
        let reply = |conn: &mut Conn, req: Req, payload: &[u8]| {
            let h = Header {
                request: req as u32,
                flags: FLAG_VERSION | FLAG_REPLY,
                size: payload.len() as u32,
            };
            conn.send(h, payload, &[]).unwrap();
        };
        loop {
            if end == FakeEnd::HangUp && hang_up.load(Ordering::Relaxed) {
                return;
            }
            let m = match conn.recv() {
                Ok(m) => m,
                Err(vdpakit_core::vhost::socket::ConnError::Io(e))
                    if e.kind() == std::io::ErrorKind::WouldBlock =>
                {
                    continue;
                }
                Err(_) => return,
            };
            match Req::from_u32(m.hdr.request) {
                Some(Req::GetFeatures) => {
                    reply(&mut conn, Req::GetFeatures, &vf::VERSION_1.to_le_bytes());
                }
                Some(Req::GetVringBase) => match end {
                    FakeEnd::SlowStop => {
                        if let Some(f) = at_stop.take() {
                            f();
                            std::thread::sleep(Duration::from_millis(300));
                        }
                        reply(&mut conn, Req::GetVringBase, &m.payload);
                    }
                    FakeEnd::NeverStop | FakeEnd::HangUp => {}
                },
                _ => {}
            }
        }
    })
}

/// Buffers a front end has out in [`front_end_with_posted_buffers`]: 100 packets posted for
/// transmission, 256 receive buffers.
const POSTED: usize = 100 + 256;

/// A front end on `sock` with 100 packets posted for transmission that the back end never
/// consumes, and its 256 receive buffers posted; its queues are dropped (their caches flushed),
/// so exactly [`POSTED`] buffers are out of the pool.
fn front_end_with_posted_buffers(pool: &Arc<Mempool>, sock: &std::path::Path) -> VirtioUserPort {
    let mut fe = front_end(&format!("virtio-user:path={}", sock.display()), pool);
    wait_until("link", || fe.link().up);
    let mut fq = fe.take_queues().unwrap();
    let mut b = Burst::new(100);
    for i in 0..100 {
        b.push(packet(pool, i)).unwrap();
    }
    assert_eq!(fq[0].tx.as_mut().unwrap().tx_burst(&mut b), 100);
    drop(fq);
    assert_eq!(pool.count() as usize - pool.available(), POSTED);
    fe
}

/// Stopping the port stops the back end's rings (GET_VRING_BASE) and frees or reuses nothing
/// before the back end has answered: while it holds its reply, every buffer it was given is
/// still out; afterwards all are back.
#[test]
fn stop_waits_for_the_back_end_to_stop_its_rings_before_freeing() {
    let pool = pool();
    let sock = sock_path();
    let seen = Arc::new(AtomicU32::new(u32::MAX));
    let (p, s) = (Arc::clone(&pool), Arc::clone(&seen));
    let fake = fake_back_end(
        &sock,
        FakeEnd::SlowStop,
        move || s.store(p.available() as u32, Ordering::SeqCst),
        Default::default(),
    );
    let mut fe = front_end_with_posted_buffers(&pool, &sock);
    fe.stop().unwrap();
    fake.join().unwrap();
    assert_eq!(
        seen.load(Ordering::SeqCst) as usize,
        pool.count() as usize - POSTED,
        "buffers were freed before the back end confirmed the stop"
    );
    drop(fe);
    assert_eq!(pool.available(), pool.count() as usize);
    let _ = std::fs::remove_dir_all(sock.parent().unwrap());
}

/// A back end that never confirms the stop (no GET_VRING_BASE reply within the 5 s reply
/// timeout) and whose process still runs: none of the buffers it was given is ever reused.
#[test]
fn unconfirmed_stop_never_reuses_the_back_ends_buffers() {
    let pool = pool();
    let sock = sock_path();
    let fake = fake_back_end(&sock, FakeEnd::NeverStop, || {}, Default::default());
    let mut fe = front_end_with_posted_buffers(&pool, &sock);
    fe.stop().unwrap();
    drop(fe);
    assert_eq!(pool.available(), pool.count() as usize - POSTED);
    fake.join().unwrap();
    let _ = std::fs::remove_dir_all(sock.parent().unwrap());
}

/// A back end hangs up while its process (this one) keeps running: its buffers and ring memory
/// are withheld; the next back end gets fresh ones, traffic flows both ways with exact counts,
/// and the withheld buffers never return.
#[test]
fn hang_up_by_a_running_back_end_withholds_its_buffers() {
    let pool = pool();
    let sock = sock_path();
    let hang_up = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let fake = fake_back_end(&sock, FakeEnd::HangUp, || {}, Arc::clone(&hang_up));
    // The front end's queues are taken once: the ones it keeps using after the hang-up.
    let mut fe = front_end(&format!("virtio-user:path={}", sock.display()), &pool);
    wait_until("link", || fe.link().up);
    let mut fq = fe.take_queues().unwrap();
    let mut b = Burst::new(100);
    for i in 0..100 {
        b.push(packet(&pool, i)).unwrap();
    }
    assert_eq!(fq[0].tx.as_mut().unwrap().tx_burst(&mut b), 100);
    hang_up.store(true, Ordering::Relaxed);
    fake.join().unwrap();
    std::fs::remove_file(&sock).unwrap();
    wait_until("the front end to see it", || !fe.link().up);
    let mut be = back_end(&format!("vhost-user:path={}", sock.display()), &pool);
    wait_until("the reconnect", || fe.link().up && be.link().up);
    let mut bq = be.take_queues().unwrap();
    transfer(&pool, &mut fq[0], &mut bq[0], 1000, 1000);
    transfer(&pool, &mut bq[0], &mut fq[0], 0, 1000);
    let fs = fe.stats();
    // The 100 posted to the departed back end are drops: it never consumed them.
    assert_eq!((fs.tx.packets, fs.tx.drops), (1000, 100), "{fs:?}");
    assert_eq!(be.stats().rx.packets, 1000);
    assert_eq!(fs.rx.packets, 1000);
    drop((fq, bq));
    fe.stop().unwrap();
    be.stop().unwrap();
    drop((fe, be));
    assert_eq!(pool.available(), pool.count() as usize - POSTED);
    let _ = std::fs::remove_dir_all(sock.parent().unwrap());
}

/// SEND_RARP (QEMU sends it once a migrated guest runs here): the MAC travels as the first six
/// bytes of the u64 payload, in memory order. The back end hands the application exactly one
/// broadcast RARP frame announcing that MAC on queue 0, even before any ring runs.
#[test]
fn send_rarp_hands_one_rarp_frame_with_the_guests_mac() {
    use std::io::Write;
    let pool = pool();
    let sock = sock_path();
    let mut be = back_end(&format!("vhost-user:path={}", sock.display()), &pool);
    let mut bq = be.take_queues().unwrap();
    let mut s = std::os::unix::net::UnixStream::connect(&sock).unwrap();
    let mac = [0x52, 0x54, 0x00, 0xab, 0xcd, 0xef];
    let mut m = Vec::new();
    m.extend_from_slice(&(vdpakit_core::vhost::msg::Req::SendRarp as u32).to_le_bytes());
    m.extend_from_slice(&1u32.to_le_bytes()); // version 1, no flags
    m.extend_from_slice(&8u32.to_le_bytes());
    m.extend_from_slice(&mac);
    m.extend_from_slice(&[0, 0]);
    s.write_all(&m).unwrap();
    let rx = bq[0].rx.as_mut().unwrap();
    let mut b = Burst::new(32);
    let mut frames = Vec::new();
    let end = Instant::now() + Duration::from_secs(5);
    while Instant::now() < end {
        rx.rx_burst(&mut b);
        for p in b.as_slice() {
            frames.push(p.data().to_vec());
        }
        pool.cache(8).free_burst(&mut b);
        if !frames.is_empty() {
            // Give a second frame the chance to show up (there must be none).
            std::thread::sleep(Duration::from_millis(50));
            rx.rx_burst(&mut b);
            for p in b.as_slice() {
                frames.push(p.data().to_vec());
            }
            pool.cache(8).free_burst(&mut b);
            break;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    assert_eq!(frames.len(), 1, "one RARP frame");
    let f = &frames[0];
    assert_eq!(f.len(), 60);
    assert_eq!(f[0..6], [0xff; 6], "broadcast");
    assert_eq!(f[6..12], mac, "source MAC");
    assert_eq!(f[12..14], [0x80, 0x35], "RARP ethertype");
    assert_eq!(f[20..22], [0, 3], "reverse request");
    assert_eq!(f[22..28], mac, "sender hardware address");
    assert_eq!(f[32..38], mac, "target hardware address");
    assert_eq!(rx.stats().read().packets, 1);
}

//! The vhost-user back end (`Server` + `Device`) driven over its socket: by rust-vmm's `vhost`
//! front end through a whole negotiation (features, protocol features, memory table, vrings,
//! enable, DRIVER_OK, GET_VRING_BASE after traffic, reconnect), by hand-written hostile messages
//! on a raw socket (each must close that connection and leave the server serving), and the dirty
//! log of the datapath checked against a reference bitmap.

use std::io::{ErrorKind, Read, Write};
use std::os::fd::{AsFd, AsRawFd};
use std::os::unix::fs::FileExt;
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use nix::sys::socket::{ControlMessage, MsgFlags, sendmsg};
use vdpakit_core::mbuf::Burst;
use vdpakit_core::mem::{MemMode, Segment};
use vdpakit_core::mempool::{Mempool, MempoolConfig};
use vdpakit_core::port::QueueStats;
use vdpakit_core::vhost::device::{NetConfig, Shared};
use vdpakit_core::vhost::msg::{self, Header, Req, VRING_F_LOG, VringAddr, proto};
use vdpakit_core::vhost::net::{VqRun, VringSetup};
use vdpakit_core::vhost::server::{Server, ServerConfig};
use vdpakit_core::virtio::features as vf;
use vdpakit_core::virtio::{
    AddrKind, DirtyLog, DriverQueue, GuestMemory, GuestRegion, LOG_PAGE_SIZE, QueueConfig,
};
use vhost::vhost_user::message::VhostUserHeaderFlag;
use vhost::vhost_user::{Frontend, VhostUserFrontend, VhostUserProtocolFeatures};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use vmm_sys_util::eventfd::EventFd;

// ---------------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------------

static NEXT: AtomicU32 = AtomicU32::new(0);

fn sock_path(tag: &str) -> PathBuf {
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    PathBuf::from(format!(
        "/tmp/vdpakit-proto-{}-{tag}-{n}.sock",
        std::process::id()
    ))
}

fn split_cfg() -> NetConfig {
    NetConfig {
        packed: false,
        ..NetConfig::default()
    }
}

fn start(tag: &str, net: NetConfig) -> Server {
    Server::start(ServerConfig {
        path: sock_path(tag),
        client: false,
        net,
        vdpa: None,
    })
    .unwrap()
}

fn raw_connect(srv: &Server) -> UnixStream {
    let s = UnixStream::connect(srv.path()).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s
}

fn hdr(req: u32, flags: u32, size: u32) -> [u8; msg::HDR_LEN] {
    Header {
        request: req,
        flags,
        size,
    }
    .encode()
}

/// Sends header + payload (+ fds by SCM_RIGHTS) in one sendmsg.
fn send_raw(s: &UnixStream, req: u32, payload: &[u8], fds: &[i32]) {
    send_raw_flags(s, req, msg::FLAG_VERSION, payload, fds);
}

fn send_raw_flags(s: &UnixStream, req: u32, flags: u32, payload: &[u8], fds: &[i32]) {
    let h = hdr(req, flags, payload.len() as u32);
    let mut all = h.to_vec();
    all.extend_from_slice(payload);
    let iov = [std::io::IoSlice::new(&all)];
    let cmsg = [ControlMessage::ScmRights(fds)];
    let c: &[ControlMessage] = if fds.is_empty() { &[] } else { &cmsg };
    let n = sendmsg::<()>(s.as_raw_fd(), &iov, c, MsgFlags::empty(), None).unwrap();
    assert_eq!(n, all.len());
}

/// The back end must close the connection: the next read returns EOF or ECONNRESET (any reply
/// bytes before that are skipped).
fn expect_closed(s: &mut UnixStream) {
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut buf = [0u8; 256];
    loop {
        assert!(
            Instant::now() < deadline,
            "the back end kept the connection"
        );
        match s.read(&mut buf) {
            Ok(0) => return,
            Ok(_) => continue,
            Err(e) if e.kind() == ErrorKind::ConnectionReset => return,
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(e) => panic!("expected EOF or ECONNRESET, got {e}"),
        }
    }
}

fn read_reply(s: &mut UnixStream, req: Req) -> Vec<u8> {
    let mut h = [0u8; msg::HDR_LEN];
    s.read_exact(&mut h).unwrap();
    let h = Header::parse(&h).unwrap();
    assert_eq!(h.request, req as u32);
    assert_ne!(h.flags & msg::FLAG_REPLY, 0);
    let mut p = vec![0u8; h.size as usize];
    s.read_exact(&mut p).unwrap();
    p
}

/// A fresh connection completes GET_FEATURES normally: the server survived what came before.
fn assert_serving(srv: &Server, net: NetConfig) {
    let mut s = raw_connect(srv);
    send_raw(&s, Req::GetFeatures as u32, &[], &[]);
    let p = read_reply(&mut s, Req::GetFeatures);
    assert_eq!(p.len(), 8);
    assert_eq!(u64::from_le_bytes(p.try_into().unwrap()), net.features());
}

fn memfd(len: u64) -> std::fs::File {
    let f = memfd::MemfdOptions::default()
        .create("vhost-proto")
        .unwrap()
        .into_file();
    f.set_len(len).unwrap();
    f
}

fn region_bytes(gpa: u64, size: u64, uva: u64, off: u64) -> Vec<u8> {
    [gpa, size, uva, off]
        .iter()
        .flat_map(|v| v.to_le_bytes())
        .collect()
}

fn mem_table(regions: &[(u64, u64, u64, u64)]) -> Vec<u8> {
    let mut p = (regions.len() as u32).to_le_bytes().to_vec();
    p.extend_from_slice(&0u32.to_le_bytes());
    for &(g, s, u, o) in regions {
        p.extend(region_bytes(g, s, u, o));
    }
    p
}

fn vring_state(index: u32, num: u32) -> Vec<u8> {
    let mut p = index.to_le_bytes().to_vec();
    p.extend_from_slice(&num.to_le_bytes());
    p
}

/// Runs one hostile exchange on a fresh connection, expects the close, then checks the server.
fn hostile(tag: &str, f: impl FnOnce(&mut UnixStream)) {
    let net = split_cfg();
    let srv = start(tag, net);
    let mut s = raw_connect(&srv);
    f(&mut s);
    expect_closed(&mut s);
    drop(s);
    assert_serving(&srv, net);
    // The connection was reset: nothing runs.
    assert!(!srv.shared().link_up.load(Ordering::Relaxed));
    assert!(srv.shared().vqs.iter().all(|h| !h.is_open()));
}

// ---------------------------------------------------------------------------------------------
// The front-end-side guest: one memfd-backed segment, GPA base 1 MiB, UVA = its address.
// ---------------------------------------------------------------------------------------------

const GPA0: u64 = 0x10_0000;
const MEM_LEN: u64 = 1 << 20;
const RING: u16 = 256;

struct Guest {
    seg: Arc<Segment>,
    mem: GuestMemory,
}

impl Guest {
    fn new() -> Guest {
        let seg = Segment::new("vhost-proto", MEM_LEN as usize, MemMode::NoHuge).unwrap();
        // SAFETY: the region covers exactly the segment's mapping, which `Guest` keeps alive;
        // the test never holds references into it.
        let region =
            unsafe { GuestRegion::from_raw(seg.base(), MEM_LEN, GPA0, seg.base() as u64, None) };
        let mem = GuestMemory::new(vec![region]).unwrap();
        Guest { seg, mem }
    }

    fn uva(&self, gpa: u64) -> u64 {
        gpa - GPA0 + self.seg.base() as u64
    }

    fn region(&self) -> VhostUserMemoryRegionInfo {
        VhostUserMemoryRegionInfo {
            guest_phys_addr: GPA0,
            memory_size: MEM_LEN,
            userspace_addr: self.seg.base() as u64,
            mmap_offset: 0,
            mmap_handle: self.seg.file().as_raw_fd(),
        }
    }

    /// Ring `i`'s config (GPAs): vring i at GPA0 + i * 64 KiB.
    fn ring(&self, i: usize, features: u64) -> QueueConfig {
        QueueConfig::at(GPA0 + i as u64 * 0x1_0000, RING, features)
    }

    fn vring_config(&self, q: &QueueConfig) -> VringConfigData {
        VringConfigData {
            queue_max_size: RING,
            queue_size: RING,
            flags: 0,
            desc_table_addr: self.uva(q.desc),
            used_ring_addr: self.uva(q.used),
            avail_ring_addr: self.uva(q.avail),
            log_addr: None,
        }
    }
}

/// Waits (briefly) for `f` to hold; the server applies raw messages asynchronously.
fn eventually(what: &str, f: impl Fn() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(2));
    }
}

fn gates(sh: &Shared) -> Vec<bool> {
    sh.vqs.iter().map(|h| h.is_open()).collect()
}

const PROTO_WANTED: u64 =
    proto::MQ | proto::REPLY_ACK | proto::LOG_SHMFD | proto::STATUS | proto::CONFIGURE_MEM_SLOTS;

struct Session {
    fe: Frontend,
    raw: UnixStream,
    _kicks: Vec<EventFd>,
    _calls: Vec<EventFd>,
}

/// Connects a `vhost` front end, negotiates, sets up both vrings of pair 0 at position `base`
/// and enables them; returns before DRIVER_OK.
fn negotiate(srv: &Server, g: &Guest, features: u64, base: [u16; 2]) -> Session {
    let sock = UnixStream::connect(srv.path()).unwrap();
    let raw = sock.try_clone().unwrap();
    let mut fe = Frontend::from_stream(sock, 2);
    let sh = srv.shared();

    fe.set_owner().unwrap();
    let offered = fe.get_features().unwrap();
    for (bit, name) in [
        (vf::VERSION_1, "VERSION_1"),
        (vf::NET_MRG_RXBUF, "MRG_RXBUF"),
        (vf::RING_EVENT_IDX, "EVENT_IDX"),
        (vf::VHOST_F_LOG_ALL, "LOG_ALL"),
        (vf::VHOST_USER_F_PROTOCOL_FEATURES, "PROTOCOL_FEATURES"),
    ] {
        assert_ne!(offered & bit, 0, "{name} offered");
    }
    assert_eq!(features & !offered, 0);
    fe.set_features(features).unwrap();

    let pf = fe.get_protocol_features().unwrap();
    for (bit, name) in [
        (VhostUserProtocolFeatures::MQ, "MQ"),
        (VhostUserProtocolFeatures::REPLY_ACK, "REPLY_ACK"),
        (VhostUserProtocolFeatures::LOG_SHMFD, "LOG_SHMFD"),
        (VhostUserProtocolFeatures::STATUS, "STATUS"),
        (
            VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS,
            "CONFIGURE_MEM_SLOTS",
        ),
    ] {
        assert!(pf.contains(bit), "{name} offered");
    }
    fe.set_protocol_features(VhostUserProtocolFeatures::from_bits_truncate(PROTO_WANTED))
        .unwrap();
    // From here on every request asks for a REPLY_ACK: each set below is confirmed (a NACK
    // would be an error).
    fe.set_hdr_flags(VhostUserHeaderFlag::NEED_REPLY);
    // GET_QUEUE_NUM answers queue pairs (as QEMU and DPDK read it for net devices); the `vhost`
    // front end would take it as a vring count, so it is asked on the raw socket.
    send_raw(&raw, Req::GetQueueNum as u32, &[], &[]);
    let mut r = raw.try_clone().unwrap();
    let n = read_reply(&mut r, Req::GetQueueNum);
    assert_eq!(u64::from_le_bytes(n.try_into().unwrap()), 1);
    assert_eq!(fe.get_max_mem_slots().unwrap(), msg::MAX_MEM_SLOTS);

    fe.set_mem_table(&[g.region()]).unwrap();
    let mut kicks = Vec::new();
    let mut calls = Vec::new();
    for (i, b) in base.iter().enumerate() {
        let q = g.ring(i, features);
        fe.set_vring_num(i, RING).unwrap();
        fe.set_vring_addr(i, &g.vring_config(&q)).unwrap();
        fe.set_vring_base(i, *b).unwrap();
        let call = EventFd::new(0).unwrap();
        let kick = EventFd::new(0).unwrap();
        fe.set_vring_call(i, &call).unwrap();
        fe.set_vring_kick(i, &kick).unwrap();
        calls.push(call);
        kicks.push(kick);
    }
    // With PROTOCOL_FEATURES rings start disabled.
    assert_eq!(gates(sh), [false, false]);
    fe.set_vring_enable(0, true).unwrap();
    fe.set_vring_enable(1, true).unwrap();
    // STATUS negotiated and no DRIVER_OK yet: nothing runs.
    assert_eq!(gates(sh), [false, false]);
    assert!(!sh.link_up.load(Ordering::Relaxed));
    Session {
        fe,
        raw,
        _kicks: kicks,
        _calls: calls,
    }
}

impl Session {
    /// SET_STATUS written by hand (the `vhost` front end has no call for it), without
    /// NEED_REPLY; a following GET_FEATURES orders it.
    fn set_status(&mut self, status: u8) {
        send_raw(
            &self.raw,
            Req::SetStatus as u32,
            &(status as u64).to_le_bytes(),
            &[],
        );
        self.fe.get_features().unwrap();
    }
}

fn pool(name: &str) -> Arc<Mempool> {
    Mempool::new(
        name,
        MempoolConfig {
            count: 512,
            data_room: 4096,
            mem: MemMode::NoHuge,
            ..Default::default()
        },
    )
    .unwrap()
}

// ---------------------------------------------------------------------------------------------
// Protocol
// ---------------------------------------------------------------------------------------------

const SPLIT_FEATURES: u64 =
    vf::VERSION_1 | vf::NET_MRG_RXBUF | vf::RING_EVENT_IDX | vf::VHOST_USER_F_PROTOCOL_FEATURES;

#[test]
fn get_queue_num_reports_pairs() {
    let net = NetConfig {
        queue_pairs: 4,
        ..split_cfg()
    };
    let srv = start("qnum", net);
    assert_eq!(srv.shared().vqs.len(), 8);
    let mut s = raw_connect(&srv);
    send_raw(&s, Req::GetFeatures as u32, &[], &[]);
    let f = u64::from_le_bytes(read_reply(&mut s, Req::GetFeatures).try_into().unwrap());
    assert_ne!(f & vf::NET_MQ, 0);
    send_raw(&s, Req::GetProtocolFeatures as u32, &[], &[]);
    let pf = u64::from_le_bytes(
        read_reply(&mut s, Req::GetProtocolFeatures)
            .try_into()
            .unwrap(),
    );
    assert_eq!(pf & PROTO_WANTED, PROTO_WANTED);
    send_raw(&s, Req::GetQueueNum as u32, &[], &[]);
    let n = u64::from_le_bytes(read_reply(&mut s, Req::GetQueueNum).try_into().unwrap());
    assert_eq!(n, 4);
}

#[test]
fn split_config_offers_no_packed() {
    let srv = start("split", split_cfg());
    let fe = Frontend::connect(srv.path(), 2).unwrap();
    assert_eq!(fe.get_features().unwrap() & vf::RING_PACKED, 0);
}

#[test]
fn packed_config_offers_packed() {
    let net = NetConfig::default();
    assert!(net.packed);
    let srv = start("packed", net);
    let fe = Frontend::connect(srv.path(), 2).unwrap();
    fe.set_owner().unwrap();
    let f = fe.get_features().unwrap();
    assert_ne!(f & vf::RING_PACKED, 0);
    assert_eq!(f, net.features());
}

#[test]
fn full_negotiation_traffic_vring_base_and_reconnect() {
    let net = split_cfg();
    let srv = start("nego", net);
    let sh = Arc::clone(srv.shared());
    let g = Guest::new();
    let p = pool("proto");
    let mut cache = p.cache(32);
    let stats = QueueStats::new();

    let mut s = negotiate(&srv, &g, SPLIT_FEATURES, [0, 0]);
    s.set_status(1 | 2 | 8); // ACKNOWLEDGE | DRIVER | FEATURES_OK: not yet
    assert_eq!(gates(&sh), [false, false]);
    s.set_status(1 | 2 | 8 | 4);
    assert_eq!(gates(&sh), [true, true]);
    assert!(sh.link_up.load(Ordering::Relaxed));

    // Guest side of both rings on the same memory the back end mapped from the memfd.
    let mut rx = DriverQueue::new(&g.ring(0, SPLIT_FEATURES), &g.mem).unwrap();
    let mut tx = DriverQueue::new(&g.ring(1, SPLIT_FEATURES), &g.mem).unwrap();
    let rx_bufs = GPA0 + 0x4_0000;
    for i in 0..16u64 {
        rx.add(&[(rx_bufs + i * 2048, 2048, true)]).unwrap();
    }
    rx.publish_avail();
    let tx_bufs = GPA0 + 0x8_0000;
    for i in 0..3u64 {
        let mut frame = vec![0u8; 12 + 60];
        frame[12..16].copy_from_slice(&(i as u32).to_le_bytes());
        g.mem.write(tx_bufs + i * 2048, &frame).unwrap();
        tx.add(&[(tx_bufs + i * 2048, frame.len() as u32, false)])
            .unwrap();
    }
    tx.publish_avail();

    // The poller side: 5 packets to the guest, 3 from it.
    let sent = sh.vqs[0]
        .enter(|run| {
            let mut b = Burst::new(32);
            for k in 0..5u32 {
                let mut m = cache.alloc().unwrap();
                m.append(64).unwrap()[..4].copy_from_slice(&k.to_le_bytes());
                b.push(m).unwrap();
            }
            run.enqueue(&mut b, &mut cache, &stats)
        })
        .expect("rx gate open");
    assert_eq!(sent, 5);
    let got = sh.vqs[1]
        .enter(|run| {
            let mut b = Burst::new(32);
            let n = run.dequeue(&mut cache, &mut b, &stats);
            drop(b);
            n
        })
        .expect("tx gate open");
    assert_eq!(got, 3);
    let mut n = 0;
    while let Some((_, len)) = rx.reap().unwrap() {
        assert_eq!(len, 12 + 64);
        n += 1;
    }
    assert_eq!(n, 5);

    // Disabling one ring closes its gate and takes the link down; enabling reopens both.
    s.fe.set_vring_enable(1, false).unwrap();
    assert_eq!(gates(&sh), [true, false]);
    assert!(!sh.link_up.load(Ordering::Relaxed));
    s.fe.set_vring_enable(1, true).unwrap();
    assert_eq!(gates(&sh), [true, true]);
    assert!(sh.link_up.load(Ordering::Relaxed));

    // GET_VRING_BASE stops the ring and returns how far the back end got.
    assert_eq!(s.fe.get_vring_base(0).unwrap(), 5);
    assert_eq!(gates(&sh), [false, true]);
    assert!(!sh.link_up.load(Ordering::Relaxed));
    assert_eq!(s.fe.get_vring_base(1).unwrap(), 3);
    assert_eq!(gates(&sh), [false, false]);

    // Reconnect: the front end goes away, the device resets; a new one negotiates again and
    // resumes at the positions it saved.
    let conns = sh.connections.load(Ordering::Relaxed);
    drop(s);
    let mut s = negotiate(&srv, &g, SPLIT_FEATURES, [5, 3]);
    assert_eq!(sh.connections.load(Ordering::Relaxed), conns + 1);
    s.set_status(15);
    assert_eq!(gates(&sh), [true, true]);
    assert!(sh.link_up.load(Ordering::Relaxed));
    let sent = sh.vqs[0]
        .enter(|run| {
            let mut b = Burst::new(32);
            for _ in 0..2 {
                let mut m = cache.alloc().unwrap();
                m.append(64).unwrap();
                b.push(m).unwrap();
            }
            run.enqueue(&mut b, &mut cache, &stats)
        })
        .unwrap();
    assert_eq!(sent, 2);
    // A driver reset (status 0) stops the rings but keeps the connection.
    s.set_status(0);
    assert_eq!(gates(&sh), [false, false]);
    assert!(!sh.link_up.load(Ordering::Relaxed));
    assert_eq!(s.fe.get_vring_base(0).unwrap(), 7);
    assert_eq!(s.fe.get_vring_base(1).unwrap(), 3);
    drop(s);
    eventually("reset after disconnect", || {
        !sh.link_up.load(Ordering::Relaxed) && gates(&sh) == [false, false]
    });
    assert_serving(&srv, net);
}

#[test]
fn without_status_rings_start_when_enabled() {
    let net = split_cfg();
    let srv = start("nostatus", net);
    let sh = Arc::clone(srv.shared());
    let g = Guest::new();
    let sock = UnixStream::connect(srv.path()).unwrap();
    let mut fe = Frontend::from_stream(sock, 2);
    fe.set_owner().unwrap();
    fe.get_features().unwrap();
    fe.set_features(SPLIT_FEATURES).unwrap();
    fe.get_protocol_features().unwrap();
    fe.set_protocol_features(VhostUserProtocolFeatures::MQ | VhostUserProtocolFeatures::REPLY_ACK)
        .unwrap();
    fe.set_hdr_flags(VhostUserHeaderFlag::NEED_REPLY);
    fe.set_mem_table(&[g.region()]).unwrap();
    let ev = EventFd::new(0).unwrap();
    for i in 0..2 {
        fe.set_vring_num(i, RING).unwrap();
        fe.set_vring_addr(i, &g.vring_config(&g.ring(i, SPLIT_FEATURES)))
            .unwrap();
        fe.set_vring_base(i, 0).unwrap();
        fe.set_vring_kick(i, &ev).unwrap();
    }
    assert_eq!(gates(&sh), [false, false]);
    fe.set_vring_enable(0, true).unwrap();
    assert_eq!(gates(&sh), [true, false]);
    assert!(
        !sh.link_up.load(Ordering::Relaxed),
        "half a pair is not a link"
    );
    fe.set_vring_enable(1, true).unwrap();
    assert_eq!(gates(&sh), [true, true]);
    assert!(sh.link_up.load(Ordering::Relaxed));
    fe.set_vring_enable(0, false).unwrap();
    assert_eq!(gates(&sh), [false, true]);
    assert!(!sh.link_up.load(Ordering::Relaxed));
}

#[test]
fn ring_outside_guest_memory_never_starts() {
    let net = split_cfg();
    let srv = start("outside", net);
    let sh = Arc::clone(srv.shared());
    let g = Guest::new();
    let mut s = negotiate(&srv, &g, SPLIT_FEATURES, [0, 0]);
    // Ring 0 moved to addresses the memory table does not cover.
    s.fe.set_vring_enable(0, false).unwrap();
    let bad = VringConfigData {
        queue_max_size: RING,
        queue_size: RING,
        flags: 0,
        desc_table_addr: 0x1000,
        used_ring_addr: 0x3000,
        avail_ring_addr: 0x2000,
        log_addr: None,
    };
    s.fe.set_vring_addr(0, &bad).unwrap();
    s.fe.set_vring_enable(0, true).unwrap();
    s.set_status(15);
    assert_eq!(gates(&sh), [false, true], "the bad ring stays stopped");
    assert!(!sh.link_up.load(Ordering::Relaxed));
    // Straddling the end of the region is as bad.
    let bad = VringConfigData {
        desc_table_addr: g.uva(GPA0 + MEM_LEN) - 0x800,
        avail_ring_addr: g.uva(GPA0 + 0x2_0000),
        used_ring_addr: g.uva(GPA0 + 0x3_0000),
        ..bad
    };
    s.fe.set_vring_addr(0, &bad).unwrap();
    assert_eq!(gates(&sh), [false, true]);
    // Set up properly again, it runs.
    s.fe.set_vring_addr(0, &g.vring_config(&g.ring(0, SPLIT_FEATURES)))
        .unwrap();
    assert_eq!(gates(&sh), [true, true]);
    assert!(sh.link_up.load(Ordering::Relaxed));
    drop(s);
    assert_serving(&srv, net);
}

// ---------------------------------------------------------------------------------------------
// Hostile input
// ---------------------------------------------------------------------------------------------

#[test]
fn hostile_truncated_message() {
    hostile("trunc", |s| {
        s.write_all(&hdr(Req::SetVringAddr as u32, msg::FLAG_VERSION, 40))
            .unwrap();
        s.write_all(&[0u8; 10]).unwrap();
        s.shutdown(std::net::Shutdown::Write).unwrap();
    });
}

#[test]
fn hostile_truncated_header() {
    hostile("trunchdr", |s| {
        s.write_all(&hdr(Req::GetFeatures as u32, msg::FLAG_VERSION, 0)[..7])
            .unwrap();
        s.shutdown(std::net::Shutdown::Write).unwrap();
    });
}

#[test]
fn hostile_oversized_message() {
    hostile("big", |s| {
        s.write_all(&hdr(Req::SetMemTable as u32, msg::FLAG_VERSION, 5000))
            .unwrap();
        s.write_all(&[0u8; 64]).unwrap();
    });
}

#[test]
fn hostile_bad_version_flags() {
    hostile("version", |s| {
        s.write_all(&hdr(Req::GetFeatures as u32, 0x2, 0)).unwrap();
    });
}

#[test]
fn hostile_unknown_requests() {
    for code in [99u32, 23, 35, 0, 41, u32::MAX] {
        hostile("unknown", |s| send_raw(s, code, &[0u8; 8], &[]));
    }
}

#[test]
fn hostile_too_many_fds() {
    let files: Vec<EventFd> = (0..10).map(|_| EventFd::new(0).unwrap()).collect();
    let raw: Vec<i32> = files.iter().map(|f| f.as_raw_fd()).collect();
    hostile("fds", |s| {
        send_raw(s, Req::SetVringCall as u32, &0u64.to_le_bytes(), &raw);
    });
}

#[test]
fn hostile_fds_on_a_request_without_fds() {
    let f = memfd(4096);
    hostile("fdsnone", |s| {
        send_raw(s, Req::GetFeatures as u32, &[], &[f.as_raw_fd()]);
    });
}

#[test]
fn hostile_mem_table_overlapping_regions() {
    let f = memfd(2 << 20);
    let fd = f.as_raw_fd();
    hostile("overlap", |s| {
        let p = mem_table(&[
            (0, 1 << 20, 0x7000_0000, 0),
            (0x8_0000, 1 << 20, 0x9000_0000, 0),
        ]);
        send_raw(s, Req::SetMemTable as u32, &p, &[fd, fd]);
    });
    // Overlapping in the front end's address space only.
    hostile("overlapuva", |s| {
        let p = mem_table(&[
            (0, 1 << 20, 0x7000_0000, 0),
            (0x100_0000, 1 << 20, 0x7008_0000, 0),
        ]);
        send_raw(s, Req::SetMemTable as u32, &p, &[fd, fd]);
    });
}

#[test]
fn hostile_mem_table_zero_sized_region() {
    let f = memfd(1 << 20);
    hostile("zero", |s| {
        let p = mem_table(&[(0, 0, 0x7000_0000, 0)]);
        send_raw(s, Req::SetMemTable as u32, &p, &[f.as_raw_fd()]);
    });
}

#[test]
fn hostile_mem_table_no_regions() {
    hostile("nreg0", |s| {
        send_raw(s, Req::SetMemTable as u32, &mem_table(&[]), &[]);
    });
}

#[test]
fn hostile_mem_table_nine_regions() {
    let f = memfd(16 << 20);
    let fd = f.as_raw_fd();
    let regions: Vec<_> = (0..9u64)
        .map(|i| (i << 20, 1 << 20, 0x7000_0000 + (i << 20), i << 20))
        .collect();
    hostile("nreg9", |s| {
        send_raw(s, Req::SetMemTable as u32, &mem_table(&regions), &[fd; 8]);
    });
}

#[test]
fn hostile_mem_table_fd_count_mismatch() {
    let f = memfd(1 << 20);
    hostile("nfds", |s| {
        let p = mem_table(&[
            (0, 1 << 20, 0x7000_0000, 0),
            (1 << 20, 4096, 0x8000_0000, 0),
        ]);
        send_raw(s, Req::SetMemTable as u32, &p, &[f.as_raw_fd()]);
    });
}

#[test]
fn hostile_vring_num_not_power_of_two() {
    hostile("num100", |s| {
        send_raw(s, Req::SetVringNum as u32, &vring_state(0, 100), &[]);
    });
}

#[test]
fn hostile_vring_num_too_large() {
    hostile("numbig", |s| {
        send_raw(s, Req::SetVringNum as u32, &vring_state(0, 65536), &[]);
    });
    hostile("num0", |s| {
        send_raw(s, Req::SetVringNum as u32, &vring_state(0, 0), &[]);
    });
}

#[test]
fn hostile_packed_vring_num_too_large() {
    // With PACKED negotiated any size up to 32768 goes, above does not.
    let net = NetConfig::default();
    let srv = start("packednum", net);
    let mut s = raw_connect(&srv);
    send_raw(
        &s,
        Req::SetFeatures as u32,
        &(vf::VERSION_1 | vf::RING_PACKED).to_le_bytes(),
        &[],
    );
    send_raw(&s, Req::SetVringNum as u32, &vring_state(0, 100), &[]);
    send_raw(&s, Req::GetFeatures as u32, &[], &[]);
    assert_eq!(read_reply(&mut s, Req::GetFeatures).len(), 8);
    send_raw(&s, Req::SetVringNum as u32, &vring_state(0, 32769), &[]);
    expect_closed(&mut s);
    assert_serving(&srv, net);
}

#[test]
fn hostile_vring_index_out_of_range() {
    for req in [
        Req::SetVringNum,
        Req::SetVringBase,
        Req::SetVringEnable,
        Req::GetVringBase,
    ] {
        hostile("idx", |s| {
            send_raw(s, req as u32, &vring_state(2, 1), &[]);
        });
    }
    let addr: Vec<u8> = [2u32, 0]
        .iter()
        .flat_map(|v| v.to_le_bytes())
        .chain([0u64; 4].iter().flat_map(|v| v.to_le_bytes()))
        .collect();
    hostile("idxaddr", |s| {
        send_raw(s, Req::SetVringAddr as u32, &addr, &[])
    });
    let ev = EventFd::new(0).unwrap();
    hostile("idxkick", |s| {
        send_raw(
            s,
            Req::SetVringKick as u32,
            &5u64.to_le_bytes(),
            &[ev.as_raw_fd()],
        );
    });
}

#[test]
fn hostile_bad_payload_sizes() {
    hostile("short", |s| {
        send_raw(s, Req::SetFeatures as u32, &[1, 2, 3], &[])
    });
    hostile("long", |s| {
        send_raw(s, Req::SetVringNum as u32, &[0u8; 12], &[]);
    });
}

#[test]
fn hostile_front_end_vanishes_mid_message() {
    let net = split_cfg();
    let srv = start("vanish", net);
    // Mid-header, mid-payload and mid-message with fds in flight.
    let s = raw_connect(&srv);
    (&s).write_all(&hdr(Req::SetVringAddr as u32, msg::FLAG_VERSION, 40)[..5])
        .unwrap();
    drop(s);
    let s = raw_connect(&srv);
    (&s).write_all(&hdr(Req::SetMemTable as u32, msg::FLAG_VERSION, 264))
        .unwrap();
    (&s).write_all(&[0u8; 100]).unwrap();
    drop(s);
    let f = memfd(4096);
    let s = raw_connect(&srv);
    let h = hdr(Req::SetMemTable as u32, msg::FLAG_VERSION, 40);
    let iov = [std::io::IoSlice::new(&h)];
    let fds = [f.as_raw_fd()];
    sendmsg::<()>(
        s.as_raw_fd(),
        &iov,
        &[ControlMessage::ScmRights(&fds)],
        MsgFlags::empty(),
        None,
    )
    .unwrap();
    drop(s);
    assert_serving(&srv, net);
    eventually("three connections and a fourth", || {
        srv.shared().connections.load(Ordering::Relaxed) == 4
    });
}

// ---------------------------------------------------------------------------------------------
// Dirty logging
// ---------------------------------------------------------------------------------------------

/// Guest memory from GPA 0 (UVA = the segment's address), so the log bitmap is small.
const LOG_MEM: u64 = 1 << 20;
const LOG_RING: u16 = 64;

fn page(gpa: u64) -> u64 {
    gpa / LOG_PAGE_SIZE
}

fn bitmap_of(log: &std::fs::File, len: usize) -> Vec<u8> {
    let mut b = vec![0u8; len];
    log.read_exact_at(&mut b, 0).unwrap();
    b
}

fn set_bit(b: &mut [u8], p: u64) {
    b[(p / 8) as usize] |= 1 << (p % 8);
}

#[test]
fn dirty_log_marks_exactly_the_written_pages() {
    dirty_log_case(false);
}

/// The same with packed rings: the device writes used descriptors into the descriptor ring, so
/// that ring's page is marked (and the buffers written), nothing else.
#[test]
fn dirty_log_marks_exactly_the_written_pages_packed() {
    dirty_log_case(true);
}

fn dirty_log_case(packed: bool) {
    let mut features = vf::VERSION_1 | vf::NET_MRG_RXBUF | vf::VHOST_F_LOG_ALL;
    if packed {
        features |= vf::RING_PACKED;
    }
    let seg = Segment::new("vhost-proto-log", LOG_MEM as usize, MemMode::NoHuge).unwrap();
    let uva0 = seg.base() as u64;
    // SAFETY: the region covers exactly the segment's mapping, alive for the whole test; no
    // references into it are held.
    let region = unsafe { GuestRegion::from_raw(seg.base(), LOG_MEM, 0, uva0, None) };
    let mem = GuestMemory::new(vec![region]).unwrap();

    // The log area is a memfd the device maps, as SET_LOG_BASE does.
    let log_len = (page(LOG_MEM) / 8) as usize;
    let log_file = memfd(log_len as u64);
    let log = Arc::new(DirtyLog::map(log_file.as_fd(), 0, log_len as u64).unwrap());

    // Each ring area on its own page, so a stray write to desc/avail would show.
    let ring_at = |d: u64| QueueConfig {
        size: LOG_RING,
        desc: d,
        avail: d + 0x1000,
        used: d + 0x2000,
        addr_kind: AddrKind::Gpa,
        features,
    };
    let rxq = ring_at(0x1_0000);
    let txq = ring_at(0x2_0000);
    let setup = |i: usize, q: &QueueConfig| VringSetup {
        index: i,
        size: LOG_RING as u32,
        addr: VringAddr {
            index: i as u32,
            flags: VRING_F_LOG,
            desc: uva0 + q.desc,
            used: uva0 + q.used,
            avail: uva0 + q.avail,
            log: q.used,
        },
        // Packed: bit 15 is the wrap counter, which starts at 1.
        base: if packed { 0x8000 } else { 0 },
        features,
        call: None,
        log: Some(Arc::clone(&log)),
        miss: None,
    };
    let mut rx_dev = VqRun::build(&setup(0, &rxq), &mem).unwrap();
    let mut tx_dev = VqRun::build(&setup(1, &txq), &mem).unwrap();
    let mut rx = DriverQueue::new(&rxq, &mem).unwrap();
    let mut tx = DriverQueue::new(&txq, &mem).unwrap();
    // Building may touch the used rings (notification suppression); start from a clean log.
    log_file.write_all_at(&vec![0u8; log_len], 0).unwrap();

    // Receive buffers of 4 KiB starting mid-page, 12 KiB apart: a long packet crosses into the
    // next page, a short one does not, and pages in between are never touched.
    let rx_base = 0x4_0800u64;
    let mut gpa_of = vec![0u64; LOG_RING as usize];
    for i in 0..16u64 {
        let gpa = rx_base + i * 0x3000;
        let id = rx.add(&[(gpa, 4096, true)]).unwrap();
        gpa_of[id as usize] = gpa;
    }
    rx.publish_avail();
    // Transmit buffers: read by the device, never written, so never marked.
    let tx_base = 0x9_0000u64;
    for i in 0..4u64 {
        let mut frame = vec![0u8; 12 + 100];
        frame[12] = i as u8;
        mem.write(tx_base + i * 0x1000, &frame).unwrap();
        tx.add(&[(tx_base + i * 0x1000, frame.len() as u32, false)])
            .unwrap();
    }
    tx.publish_avail();

    let p = pool("log");
    let mut cache = p.cache(32);
    let stats = QueueStats::new();
    let lens = [60usize, 3000, 200, 2500, 1400, 64];
    let mut b = Burst::new(32);
    for (k, &l) in lens.iter().enumerate() {
        let mut m = cache.alloc().unwrap();
        m.append(l).unwrap().fill(k as u8);
        b.push(m).unwrap();
    }
    assert_eq!(rx_dev.enqueue(&mut b, &mut cache, &stats), lens.len());
    let mut out = Burst::new(32);
    assert_eq!(tx_dev.dequeue(&mut cache, &mut out, &stats), 4);
    drop(out);
    // The transmit path returns buffers in batches: an empty poll publishes the rest.
    let mut out = Burst::new(32);
    assert_eq!(tx_dev.dequeue(&mut cache, &mut out, &stats), 0);
    drop(out);

    let mut want = vec![0u8; log_len];
    let mut n = 0;
    while let Some((id, len)) = rx.reap().unwrap() {
        let gpa = gpa_of[id as usize];
        assert_eq!(len as usize, 12 + lens[n]);
        for p in page(gpa)..=page(gpa + len as u64 - 1) {
            set_bit(&mut want, p);
        }
        n += 1;
    }
    assert_eq!(n, lens.len());
    while tx.reap().unwrap().is_some() {}
    if packed {
        // Packed: used descriptors are written in place, in the descriptor ring.
        set_bit(&mut want, page(rxq.desc));
        set_bit(&mut want, page(txq.desc));
    } else {
        set_bit(&mut want, page(rxq.used));
        set_bit(&mut want, page(txq.used));
    }

    let got = bitmap_of(&log_file, log_len);
    let pages = |b: &[u8]| -> Vec<u64> {
        (0..log_len as u64 * 8)
            .filter(|&p| b[(p / 8) as usize] & (1 << (p % 8)) != 0)
            .collect()
    };
    assert_eq!(
        pages(&got),
        pages(&want),
        "dirty pages (4 KiB page numbers)"
    );
    assert_eq!(log.ignored(), 0);
}

/// LOG_ALL + LOG_SHMFD through the server: SET_LOG_BASE maps the front end's memfd, rings set up
/// with VRING_F_LOG log into it, and exactly the written pages are marked.
#[test]
fn dirty_log_through_the_server() {
    let net = split_cfg();
    let srv = start("log", net);
    let sh = Arc::clone(srv.shared());
    let g = Guest::new();
    let features = SPLIT_FEATURES | vf::VHOST_F_LOG_ALL;
    let mut s = negotiate(&srv, &g, features, [0, 0]);

    // One bit per 4 KiB page of guest physical memory up to GPA0 + MEM_LEN.
    let log_len = (page(GPA0 + MEM_LEN) / 8) as usize;
    let log_file = memfd(log_len as u64);
    let mut p = (log_len as u64).to_le_bytes().to_vec();
    p.extend_from_slice(&0u64.to_le_bytes());
    // With NEED_REPLY too: SET_LOG_BASE already has a reply, which is the only one sent.
    send_raw_flags(
        &s.raw,
        Req::SetLogBase as u32,
        msg::FLAG_VERSION | msg::FLAG_NEED_REPLY,
        &p,
        &[log_file.as_raw_fd()],
    );
    let mut r = s.raw.try_clone().unwrap();
    assert_eq!(read_reply(&mut r, Req::SetLogBase).len(), 0);
    for i in 0..2 {
        let q = g.ring(i, features);
        let c = VringConfigData {
            flags: 1, // VHOST_VRING_F_LOG
            log_addr: Some(q.used),
            ..g.vring_config(&q)
        };
        s.fe.set_vring_addr(i, &c).unwrap();
    }
    // The next reply on the socket is this one: no stray ack was queued before it.
    send_raw(&s.raw, Req::GetQueueNum as u32, &[], &[]);
    assert_eq!(read_reply(&mut r, Req::GetQueueNum).len(), 8);
    s.set_status(15);
    assert_eq!(gates(&sh), [true, true]);

    let mut rx = DriverQueue::new(&g.ring(0, features), &g.mem).unwrap();
    let rx_bufs = GPA0 + 0x4_0000;
    let mut gpa_of = vec![0u64; RING as usize];
    for i in 0..8u64 {
        let gpa = rx_bufs + i * 0x2000;
        let id = rx.add(&[(gpa, 4096, true)]).unwrap();
        gpa_of[id as usize] = gpa;
    }
    rx.publish_avail();
    // Whatever starting the rings touched is not what is checked: clear, then send.
    log_file.write_all_at(&vec![0u8; log_len], 0).unwrap();
    let pl = pool("slog");
    let mut cache = pl.cache(32);
    let stats = QueueStats::new();
    let lens = [100usize, 3000, 60];
    let sent = sh.vqs[0]
        .enter(|run| {
            let mut b = Burst::new(32);
            for &l in &lens {
                let mut m = cache.alloc().unwrap();
                m.append(l).unwrap();
                b.push(m).unwrap();
            }
            run.enqueue(&mut b, &mut cache, &stats)
        })
        .unwrap();
    assert_eq!(sent, lens.len());
    let mut want = vec![0u8; log_len];
    while let Some((id, len)) = rx.reap().unwrap() {
        let gpa = gpa_of[id as usize];
        for p in page(gpa)..=page(gpa + len as u64 - 1) {
            set_bit(&mut want, p);
        }
    }
    let used = g.ring(0, features).used;
    // Used index and the three used elements (all on the same page for this layout).
    set_bit(&mut want, page(used));
    set_bit(&mut want, page(used + 4 + 8 * 3));
    let got = bitmap_of(&log_file, log_len);
    assert_eq!(got, want);
    // Logging off (migration cancelled): rings rebuilt without it, nothing more is marked.
    s.fe.set_features(SPLIT_FEATURES).unwrap();
    assert_eq!(gates(&sh), [true, true]);
    log_file.write_all_at(&vec![0u8; log_len], 0).unwrap();
    let sent = sh.vqs[0]
        .enter(|run| {
            let mut b = Burst::new(32);
            let mut m = cache.alloc().unwrap();
            m.append(100).unwrap();
            b.push(m).unwrap();
            run.enqueue(&mut b, &mut cache, &stats)
        })
        .unwrap();
    assert_eq!(sent, 1);
    assert!(bitmap_of(&log_file, log_len).iter().all(|&b| b == 0));
}

#[test]
fn hostile_message_on_a_running_device_resets_it() {
    let net = split_cfg();
    let srv = start("running", net);
    let sh = Arc::clone(srv.shared());
    let g = Guest::new();
    let mut s = negotiate(&srv, &g, SPLIT_FEATURES, [0, 0]);
    s.set_status(15);
    assert!(sh.link_up.load(Ordering::Relaxed));
    let fd = g.seg.file().as_raw_fd();
    let p = mem_table(&[
        (GPA0, MEM_LEN, g.uva(GPA0), 0),
        (GPA0 + 0x1000, 0x1000, g.uva(GPA0) + 0x1000, 0x1000),
    ]);
    send_raw(&s.raw, Req::SetMemTable as u32, &p, &[fd, fd]);
    let mut r = s.raw.try_clone().unwrap();
    r.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    expect_closed(&mut r);
    eventually("reset", || {
        !sh.link_up.load(Ordering::Relaxed) && gates(&sh) == [false, false]
    });
    drop(s);
    assert_serving(&srv, net);
}

#[test]
fn packed_negotiation_and_vring_base() {
    let net = NetConfig::default();
    let srv = start("packedrun", net);
    let sh = Arc::clone(srv.shared());
    let g = Guest::new();
    let features = SPLIT_FEATURES | vf::RING_PACKED;
    // A fresh packed ring: position 0 with wrap counter 1 (bit 15).
    let mut s = negotiate(&srv, &g, features, [0x8000, 0x8000]);
    s.set_status(15);
    assert_eq!(gates(&sh), [true, true]);
    assert!(sh.link_up.load(Ordering::Relaxed));
    let mut rx = DriverQueue::new(&g.ring(0, features), &g.mem).unwrap();
    for i in 0..8u64 {
        rx.add(&[(GPA0 + 0x4_0000 + i * 2048, 2048, true)]).unwrap();
    }
    rx.publish_avail();
    let pl = pool("packed");
    let mut cache = pl.cache(32);
    let stats = QueueStats::new();
    let sent = sh.vqs[0]
        .enter(|run| {
            let mut b = Burst::new(32);
            for _ in 0..5 {
                let mut m = cache.alloc().unwrap();
                m.append(64).unwrap();
                b.push(m).unwrap();
            }
            run.enqueue(&mut b, &mut cache, &stats)
        })
        .unwrap();
    assert_eq!(sent, 5);
    assert_eq!(s.fe.get_vring_base(0).unwrap(), 0x8000 | 5);
    assert_eq!(s.fe.get_vring_base(1).unwrap(), 0x8000);
    assert!(!sh.link_up.load(Ordering::Relaxed));
}

/// CONFIGURE_MEM_SLOTS: ADD_MEM_REG maps a second region while the rings run (a packet lands in
/// it), REM_MEM_REG unmaps it (a buffer there is then refused: the queue is marked broken and
/// the error counted, nothing is written), and a region overlapping a mapped one is refused.
#[test]
fn add_and_remove_memory_regions() {
    let srv = start("memreg", split_cfg());
    let sh = Arc::clone(srv.shared());
    let g = Guest::new();
    let mut s = negotiate(&srv, &g, SPLIT_FEATURES, [0, 0]);
    s.set_status(15);
    assert_eq!(gates(&sh), [true, true]);

    const LEN2: u64 = 0x10_0000;
    let gpa2 = GPA0 + MEM_LEN + 0x10_0000;
    let seg2 = Segment::new("vhost-proto-2", LEN2 as usize, MemMode::NoHuge).unwrap();
    let info2 = VhostUserMemoryRegionInfo {
        guest_phys_addr: gpa2,
        memory_size: LEN2,
        userspace_addr: seg2.base() as u64,
        mmap_offset: 0,
        mmap_handle: seg2.file().as_raw_fd(),
    };
    s.fe.add_mem_region(&info2).unwrap();
    eventually("rings running after ADD_MEM_REG", || {
        gates(&sh) == [true, true]
    });

    // The guest's view: both regions.
    // SAFETY: both regions cover exactly their segments' mappings, alive for the whole test.
    let r1 =
        unsafe { GuestRegion::from_raw(g.seg.base(), MEM_LEN, GPA0, g.seg.base() as u64, None) };
    // SAFETY: as above.
    let r2 = unsafe { GuestRegion::from_raw(seg2.base(), LEN2, gpa2, seg2.base() as u64, None) };
    let both = GuestMemory::new(vec![r1, r2]).unwrap();
    let mut rx = DriverQueue::new(&g.ring(0, SPLIT_FEATURES), &both).unwrap();
    let buf = gpa2 + 0x800;
    rx.add(&[(buf, 2048, true)]).unwrap();
    rx.publish_avail();

    let p = pool("memreg");
    let mut cache = p.cache(32);
    let stats = QueueStats::new();
    let payload: Vec<u8> = (0..64u8).map(|i| i ^ 0x5a).collect();
    let send = |cache: &mut vdpakit_core::mempool::MempoolCache| {
        sh.vqs[0]
            .enter(|run| {
                let mut b = Burst::new(4);
                let mut m = cache.alloc().unwrap();
                m.append(payload.len()).unwrap().copy_from_slice(&payload);
                b.push(m).unwrap();
                run.enqueue(&mut b, cache, &stats)
            })
            .expect("rx gate open")
    };
    assert_eq!(send(&mut cache), 1, "a packet into the added region");
    let (_, len) = rx.reap().unwrap().expect("used entry");
    assert_eq!(len as usize, 12 + payload.len());
    let mut got = vec![0u8; payload.len()];
    both.read(buf + 12, &mut got).unwrap();
    assert_eq!(got, payload);

    s.fe.remove_mem_region(&info2).unwrap();
    eventually("rings running after REM_MEM_REG", || {
        gates(&sh) == [true, true]
    });
    both.write(buf, &[0u8; 128]).unwrap();
    rx.add(&[(buf, 2048, true)]).unwrap();
    rx.publish_avail();
    let errors_before = stats.read().errors;
    assert_eq!(
        send(&mut cache),
        0,
        "the removed region is no longer guest memory"
    );
    assert_eq!(stats.read().errors, errors_before + 1);
    let mut after = vec![0u8; 128];
    both.read(buf, &mut after).unwrap();
    assert!(
        after.iter().all(|&b| b == 0),
        "nothing written to the removed region"
    );

    // Overlapping the first region: refused (NACK with REPLY_ACK).
    let seg3 = Segment::new("vhost-proto-3", LEN2 as usize, MemMode::NoHuge).unwrap();
    let overlap = VhostUserMemoryRegionInfo {
        guest_phys_addr: GPA0 + 0x1000,
        memory_size: LEN2,
        userspace_addr: seg3.base() as u64,
        mmap_offset: 0,
        mmap_handle: seg3.file().as_raw_fd(),
    };
    assert!(s.fe.add_mem_region(&overlap).is_err());
}

/// The transmit (dequeue) path publishes used entries in batches: not after every burst, but
/// once enough are staged (split: 64, packed: half the ring), at the next poll that finds the ring empty, or when the ring stops
/// (`flush_used`, which the back end calls before GET_VRING_BASE answers). No buffer is kept.
#[test]
fn dequeue_returns_buffers_in_batches_and_on_empty_poll_or_stop() {
    for packed in [false, true] {
        let mut features = vf::VERSION_1 | vf::NET_MRG_RXBUF;
        if packed {
            features |= vf::RING_PACKED;
        }
        let seg = Segment::new("vhost-defer", LOG_MEM as usize, MemMode::NoHuge).unwrap();
        let uva0 = seg.base() as u64;
        // SAFETY: the region covers exactly the segment's mapping, alive for the whole test; no
        // references into it are held.
        let region = unsafe { GuestRegion::from_raw(seg.base(), LOG_MEM, 0, uva0, None) };
        let mem = GuestMemory::new(vec![region]).unwrap();
        let q = QueueConfig {
            size: 256,
            desc: 0x1_0000,
            avail: 0x1_2000,
            used: 0x1_3000,
            addr_kind: AddrKind::Gpa,
            features,
        };
        let setup = VringSetup {
            index: 1,
            size: 256,
            addr: VringAddr {
                index: 1,
                flags: 0,
                desc: uva0 + q.desc,
                used: uva0 + q.used,
                avail: uva0 + q.avail,
                log: 0,
            },
            base: if packed { 0x8000 } else { 0 },
            features,
            call: None,
            log: None,
            miss: None,
        };
        let mut dev = VqRun::build(&setup, &mem).unwrap();
        let mut drv = DriverQueue::new(&q, &mem).unwrap();
        let p = pool("defer");
        let mut cache = p.cache(32);
        let stats = QueueStats::new();
        let post = |drv: &mut DriverQueue, n: u64| {
            for i in 0..n {
                let gpa = 0x4_0000 + i * 0x800;
                mem.write(gpa, &[0u8; 12 + 60]).unwrap();
                drv.add(&[(gpa, 72, false)]).unwrap();
            }
            drv.publish_avail();
        };
        let mut dequeue = |dev: &mut VqRun| {
            let mut out = Burst::new(32);
            dev.dequeue(&mut cache, &mut out, &stats)
        };
        let reap_all = |drv: &mut DriverQueue| {
            let mut n = 0;
            while drv.reap().unwrap().is_some() {
                n += 1;
            }
            n
        };
        // One burst of 8: staged, not yet returned; an empty poll returns them.
        post(&mut drv, 8);
        assert_eq!(dequeue(&mut dev), 8);
        assert_eq!(
            reap_all(&mut drv),
            0,
            "packed={packed}: returned before the batch"
        );
        assert_eq!(dequeue(&mut dev), 0);
        assert_eq!(reap_all(&mut drv), 8, "packed={packed}: empty poll");
        // Bursts of 32 back to back: returned once a batch is staged (split: 64; packed: half
        // the ring), without an empty poll.
        let batch = if packed { 128 } else { 64 };
        post(&mut drv, batch);
        for b in 1..batch / 32 {
            assert_eq!(dequeue(&mut dev), 32);
            assert_eq!(reap_all(&mut drv), 0, "packed={packed}: burst {b} of 32");
        }
        assert_eq!(dequeue(&mut dev), 32);
        assert_eq!(reap_all(&mut drv), batch, "packed={packed}: {batch} staged");
        // Staged when the ring stops: flush_used returns them.
        post(&mut drv, 5);
        assert_eq!(dequeue(&mut dev), 5);
        dev.flush_used();
        assert_eq!(reap_all(&mut drv), 5, "packed={packed}: stop");
        assert_eq!(stats.read().errors, 0);
    }
}

// ---------------------------------------------------------------------------------------------
// IOTLB (ACCESS_PLATFORM)
// ---------------------------------------------------------------------------------------------

/// IOVA = GPA + this: distinct from the GPAs and from the front end's addresses.
const IOVA_OFF: u64 = 0x7_0000_0000;
const MISS: u8 = 1;
const UPDATE: u8 = 2;
const INVALIDATE: u8 = 3;

/// Reads the next IOTLB MISS from the back-end channel: (iova, perm).
fn read_miss(b: &mut UnixStream) -> (u64, u8) {
    let mut h = [0u8; msg::HDR_LEN];
    b.read_exact(&mut h)
        .expect("an IOTLB miss on the back-end channel");
    let h = Header::parse(&h).unwrap();
    assert_eq!(h.request, msg::BackendReq::IotlbMsg as u32);
    let mut p = vec![0u8; h.size as usize];
    b.read_exact(&mut p).unwrap();
    let m = msg::parse_iotlb(&p).unwrap();
    assert_eq!(m.kind, MISS);
    (m.iova, m.perm)
}

/// Sends IOTLB_MSG on the front-end socket, ordered by a GET_FEATURES round trip.
fn iotlb(s: &mut Frontend, raw: &UnixStream, kind: u8, iova: u64, size: u64, uaddr: u64, perm: u8) {
    let m = msg::IotlbMsg {
        iova,
        size,
        uaddr,
        perm,
        kind,
    };
    send_raw(raw, Req::IotlbMsg as u32, &msg::encode_iotlb(&m), &[]);
    s.get_features().unwrap();
}

/// A front end behind a vIOMMU: rings and buffers by IOVA. Nothing runs before the rings are
/// translated, and the back end asks for them on the back-end channel; a buffer without a
/// translation stalls its ring (never broken, nothing consumed) and is asked for with the
/// access it needs; a read-only translation is never written through; an INVALIDATE takes
/// effect on a running ring.
#[test]
fn iotlb_misses_updates_and_invalidates() {
    let net = NetConfig {
        iommu: true,
        ..split_cfg()
    };
    assert_eq!(split_cfg().features() & vf::ACCESS_PLATFORM, 0);
    let srv = start("iotlb", net);
    let sh = Arc::clone(srv.shared());
    let g = Guest::new();
    let p = pool("iotlb");
    let mut cache = p.cache(32);
    let stats = QueueStats::new();
    let features = SPLIT_FEATURES | vf::ACCESS_PLATFORM;

    let sock = UnixStream::connect(srv.path()).unwrap();
    let raw = sock.try_clone().unwrap();
    let mut fe = Frontend::from_stream(sock, 2);
    fe.set_owner().unwrap();
    assert_ne!(fe.get_features().unwrap() & vf::ACCESS_PLATFORM, 0);
    fe.set_features(features).unwrap();
    fe.set_protocol_features(VhostUserProtocolFeatures::from_bits_truncate(
        PROTO_WANTED | proto::BACKEND_REQ,
    ))
    .unwrap();
    fe.set_hdr_flags(VhostUserHeaderFlag::NEED_REPLY);
    let (mut chan, theirs) = UnixStream::pair().unwrap();
    chan.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    fe.set_backend_request_fd(&theirs).unwrap();
    fe.set_mem_table(&[g.region()]).unwrap();
    let mut fds = Vec::new();
    for i in 0..2 {
        let q = g.ring(i, features);
        fe.set_vring_num(i, RING).unwrap();
        fe.set_vring_addr(
            i,
            &VringConfigData {
                queue_max_size: RING,
                queue_size: RING,
                flags: 0,
                desc_table_addr: q.desc + IOVA_OFF,
                used_ring_addr: q.used + IOVA_OFF,
                avail_ring_addr: q.avail + IOVA_OFF,
                log_addr: None,
            },
        )
        .unwrap();
        fe.set_vring_base(i, 0).unwrap();
        let (call, kick) = (EventFd::new(0).unwrap(), EventFd::new(0).unwrap());
        fe.set_vring_call(i, &call).unwrap();
        fe.set_vring_kick(i, &kick).unwrap();
        fe.set_vring_enable(i, true).unwrap();
        fds.push((call, kick));
    }
    send_raw(&raw, Req::SetStatus as u32, &15u64.to_le_bytes(), &[]);
    fe.get_features().unwrap();
    assert_eq!(gates(&sh), [false, false], "rings not translated yet");

    // Answer each miss with its page until both rings run.
    let uva_of = |iova: u64| g.uva(iova - IOVA_OFF);
    let mut answered = 0;
    while gates(&sh) != [true, true] {
        let (iova, _) = read_miss(&mut chan);
        let span = GPA0 + IOVA_OFF..GPA0 + IOVA_OFF + 2 * 0x1_0000;
        assert!(span.contains(&iova), "miss at {iova:#x} is not in a ring");
        let page = iova & !0xfff;
        iotlb(&mut fe, &raw, UPDATE, page, 0x1000, uva_of(page), 3);
        answered += 1;
        assert!(answered < 32, "the rings never started");
    }
    // Stale misses for pages answered since may still be queued: drop them.
    chan.set_nonblocking(true).unwrap();
    let mut junk = [0u8; 4096];
    while chan.read(&mut junk).is_ok_and(|n| n > 0) {}
    chan.set_nonblocking(false).unwrap();

    // The driver's view of the same memory: addresses are IOVAs.
    // SAFETY: the region covers exactly the guest's segment, which `g` keeps alive; the test
    // never holds references into it.
    let iova_mem = GuestMemory::new(vec![unsafe {
        GuestRegion::from_raw(
            g.seg.base(),
            MEM_LEN,
            GPA0 + IOVA_OFF,
            g.seg.base() as u64,
            None,
        )
    }])
    .unwrap();
    let ring = |i: u64| QueueConfig::at(GPA0 + IOVA_OFF + i * 0x1_0000, RING, features);
    let mut rx = DriverQueue::new(&ring(0), &iova_mem).unwrap();
    let mut tx = DriverQueue::new(&ring(1), &iova_mem).unwrap();
    // The back end's rings were set up on the same memory: the driver's zeroing is theirs.

    // Transmit: three frames in one page nothing translates yet.
    let tx_page = GPA0 + IOVA_OFF + 0x8_0000;
    for i in 0..3u64 {
        let mut frame = vec![0u8; 12 + 60];
        frame[12..16].copy_from_slice(&(i as u32 + 7).to_le_bytes());
        iova_mem.write(tx_page + i * 256, &frame).unwrap();
        tx.add(&[(tx_page + i * 256, frame.len() as u32, false)])
            .unwrap();
    }
    tx.publish_avail();
    let dequeue = |cache: &mut _| {
        sh.vqs[1]
            .enter(|run| {
                let mut b = Burst::new(32);
                let n = run.dequeue(cache, &mut b, &stats);
                let firsts: Vec<u32> = b
                    .as_slice()
                    .iter()
                    .map(|m| u32::from_le_bytes(m.data()[..4].try_into().unwrap()))
                    .collect();
                (n, firsts)
            })
            .expect("tx gate open")
    };
    assert_eq!(dequeue(&mut cache).0, 0, "no translation: nothing taken");
    assert_eq!(read_miss(&mut chan), (tx_page, 1), "read access asked for");
    assert_eq!(gates(&sh), [true, true], "a miss does not break the ring");
    iotlb(&mut fe, &raw, UPDATE, tx_page, 0x1000, uva_of(tx_page), 1);
    assert_eq!(dequeue(&mut cache), (3, vec![7, 8, 9]));

    // Receive: buffers in a page first translated read-only: never written through.
    let rx_page = GPA0 + IOVA_OFF + 0x4_0000;
    for i in 0..4u64 {
        rx.add(&[(rx_page + i * 1024, 1024, true)]).unwrap();
    }
    rx.publish_avail();
    let enqueue = |cache: &mut vdpakit_core::mempool::MempoolCache, k: u32| {
        sh.vqs[0]
            .enter(|run| {
                let mut b = Burst::new(32);
                for j in 0..2 {
                    let mut m = cache.alloc().unwrap();
                    m.append(64).unwrap()[..4].copy_from_slice(&(k + j).to_le_bytes());
                    b.push(m).unwrap();
                }
                let n = run.enqueue(&mut b, cache, &stats);
                cache.free_burst(&mut b);
                n
            })
            .expect("rx gate open")
    };
    assert_eq!(enqueue(&mut cache, 100), 0);
    assert_eq!(read_miss(&mut chan), (rx_page, 2), "write access asked for");
    iotlb(&mut fe, &raw, UPDATE, rx_page, 0x1000, uva_of(rx_page), 1);
    assert_eq!(enqueue(&mut cache, 100), 0, "read-only: not written");
    let mut b = [0u8; 16];
    iova_mem.read(rx_page, &mut b).unwrap();
    assert_eq!(
        b, [0u8; 16],
        "nothing written through a read-only translation"
    );
    // Asked again (once the resend delay has passed), still for writing.
    assert_eq!(read_miss(&mut chan), (rx_page, 2));
    iotlb(&mut fe, &raw, UPDATE, rx_page, 0x1000, uva_of(rx_page), 3);
    assert_eq!(enqueue(&mut cache, 100), 2);
    let mut n = 0;
    while let Some((id, len)) = rx.reap().unwrap() {
        assert_eq!(len, 12 + 64);
        let mut first = [0u8; 4];
        iova_mem
            .read(rx_page + u64::from(id) * 1024 + 12, &mut first)
            .unwrap();
        assert_eq!(u32::from_le_bytes(first), 100 + n);
        n += 1;
    }
    assert_eq!(n, 2);

    // INVALIDATE reaches the running ring: the next frame in that page waits for a new miss.
    iotlb(&mut fe, &raw, INVALIDATE, tx_page, 0x1000, 0, 0);
    tx.add(&[(tx_page + 0x800, 72, false)]).unwrap();
    tx.publish_avail();
    assert_eq!(dequeue(&mut cache).0, 0);
    assert_eq!(
        read_miss(&mut chan),
        (tx_page + 0x800, 1),
        "the frame's own address"
    );
    assert_eq!(stats.read().errors, 0, "misses are not errors");
    assert!(sh.iotlb_misses_sent.load(Ordering::Relaxed) >= 5);
    drop(fds);
}

/// IOTLB messages are refused (connection closed) without ACCESS_PLATFORM negotiated.
#[test]
fn hostile_iotlb_without_access_platform() {
    hostile("iotlb-noap", |s| {
        let m = msg::IotlbMsg {
            iova: 0x1000,
            size: 0x1000,
            uaddr: 0x1000,
            perm: 3,
            kind: UPDATE,
        };
        send_raw(s, Req::IotlbMsg as u32, &msg::encode_iotlb(&m), &[]);
    });
}

/// GET_CONFIG, NET_SET_MTU and SET_CONFIG (software datapath): the config space shows the link up, the queue
/// pairs and the MTU (the port's, then the front end's after NET_SET_MTU, acknowledged with
/// REPLY_ACK); any window of it can be read; a read past its end, an MTU out of 68..=65535 and
/// SET_CONFIG (read-only space) are refused, each closing that connection only.
#[test]
fn config_space_and_mtu() {
    let net = NetConfig {
        queue_pairs: 3,
        mtu: 1500,
        ..split_cfg()
    };
    let srv = start("config", net);
    let mut s = raw_connect(&srv);
    send_raw(&s, Req::GetProtocolFeatures as u32, &[], &[]);
    let offered = u64::from_le_bytes(
        read_reply(&mut s, Req::GetProtocolFeatures)
            .try_into()
            .unwrap(),
    );
    // CONFIG is offered with a vDPA device behind the socket; the net config space answers
    // GET_CONFIG either way.
    let want = proto::REPLY_ACK | proto::NET_MTU;
    assert_eq!(offered & want, want, "offered {offered:#x}");
    send_raw(
        &s,
        Req::SetProtocolFeatures as u32,
        &want.to_le_bytes(),
        &[],
    );
    let config_msg = |off: u32, size: u32| {
        let mut p = off.to_le_bytes().to_vec();
        p.extend_from_slice(&size.to_le_bytes());
        p.extend_from_slice(&0u32.to_le_bytes());
        p.extend_from_slice(&vec![0u8; size as usize]);
        p
    };
    let get = |s: &mut UnixStream, off: u32, size: u32| -> Vec<u8> {
        send_raw(s, Req::GetConfig as u32, &config_msg(off, size), &[]);
        let r = read_reply(s, Req::GetConfig);
        assert_eq!(r.len(), 12 + size as usize);
        assert_eq!(r[0..4], off.to_le_bytes());
        assert_eq!(r[4..8], size.to_le_bytes());
        r[12..].to_vec()
    };
    let c = get(&mut s, 0, 12);
    assert_eq!(c[6..8], 1u16.to_le_bytes(), "status: link up");
    assert_eq!(c[8..10], 3u16.to_le_bytes(), "max queue pairs");
    assert_eq!(c[10..12], 1500u16.to_le_bytes(), "the port's MTU");
    let ack = |s: &mut UnixStream, req: Req, payload: &[u8]| -> u64 {
        send_raw_flags(
            s,
            req as u32,
            msg::FLAG_VERSION | msg::FLAG_NEED_REPLY,
            payload,
            &[],
        );
        u64::from_le_bytes(read_reply(s, req).try_into().unwrap())
    };
    assert_eq!(ack(&mut s, Req::NetSetMtu, &9000u64.to_le_bytes()), 0);
    assert_eq!(
        get(&mut s, 10, 2),
        9000u16.to_le_bytes(),
        "the front end's MTU"
    );
    assert_eq!(
        get(&mut s, 8, 2),
        3u16.to_le_bytes(),
        "a window in the middle"
    );

    // Each refusal closes its connection; the server (one front end at a time) goes on serving.
    drop(s);
    for (req, payload) in [
        (Req::GetConfig, config_msg(8, 8)),
        (Req::NetSetMtu, 67u64.to_le_bytes().to_vec()),
        (Req::NetSetMtu, 65536u64.to_le_bytes().to_vec()),
        (Req::SetConfig, config_msg(10, 2)),
    ] {
        let mut s = raw_connect(&srv);
        send_raw(
            &s,
            Req::SetProtocolFeatures as u32,
            &want.to_le_bytes(),
            &[],
        );
        send_raw(&s, req as u32, &payload, &[]);
        expect_closed(&mut s);
    }
    assert_serving(&srv, net);
}

/// CONFIGURE_MEM_SLOTS: beyond SET_MEM_TABLE's 8, ADD_MEM_REG fills all 32 slots (GET_MAX_MEM_SLOTS),
/// a 33rd is refused with a NACK (the connection and the rings go on), and a packet lands in
/// every added region, the last one included, also after another region was removed.
#[test]
fn all_memory_slots_through_add_mem_reg() {
    let srv = start("memslots", split_cfg());
    let sh = Arc::clone(srv.shared());
    let g = Guest::new();
    let mut s = negotiate(&srv, &g, SPLIT_FEATURES, [0, 0]);
    s.set_status(15);
    assert_eq!(gates(&sh), [true, true]);

    const LEN: u64 = 0x1_0000;
    let slots = msg::MAX_MEM_SLOTS as usize;
    let gpa = |k: usize| GPA0 + MEM_LEN + 0x10_0000 + k as u64 * 0x2_0000;
    let mut segs = Vec::new();
    let mut infos = Vec::new();
    for k in 0..slots {
        let seg = Segment::new(&format!("vhost-slot-{k}"), LEN as usize, MemMode::NoHuge).unwrap();
        let info = VhostUserMemoryRegionInfo {
            guest_phys_addr: gpa(k),
            memory_size: LEN,
            userspace_addr: seg.base() as u64,
            mmap_offset: 0,
            mmap_handle: seg.file().as_raw_fd(),
        };
        if k + 1 < slots {
            s.fe.add_mem_region(&info)
                .unwrap_or_else(|e| panic!("region {} of {slots}: {e}", k + 2));
        }
        segs.push(seg);
        infos.push(info);
    }
    eventually("rings running after the additions", || {
        gates(&sh) == [true, true]
    });

    // The guest's view: its own region and the 31 added.
    let mut regions = Vec::new();
    // SAFETY: each region covers exactly its segment's mapping, alive for the whole test; the
    // test never holds references into them.
    regions.push(unsafe {
        GuestRegion::from_raw(g.seg.base(), MEM_LEN, GPA0, g.seg.base() as u64, None)
    });
    for (k, seg) in segs.iter().enumerate().take(slots - 1) {
        // SAFETY: as above.
        regions.push(unsafe {
            GuestRegion::from_raw(seg.base(), LEN, gpa(k), seg.base() as u64, None)
        });
    }
    let all = GuestMemory::new(regions).unwrap();
    let mut rx = DriverQueue::new(&g.ring(0, SPLIT_FEATURES), &all).unwrap();
    let p = pool("memslots");
    let mut cache = p.cache(32);
    let stats = QueueStats::new();
    let deliver =
        |rx: &mut DriverQueue, cache: &mut vdpakit_core::mempool::MempoolCache, k: usize| {
            let buf = gpa(k) + 0x100;
            rx.add(&[(buf, 2048, true)]).unwrap();
            rx.publish_avail();
            let payload: Vec<u8> = (0..64u8).map(|i| i ^ k as u8).collect();
            let n = sh.vqs[0]
                .enter(|run| {
                    let mut b = Burst::new(4);
                    let mut m = cache.alloc().unwrap();
                    m.append(payload.len()).unwrap().copy_from_slice(&payload);
                    b.push(m).unwrap();
                    let n = run.enqueue(&mut b, cache, &stats);
                    cache.free_burst(&mut b);
                    n
                })
                .expect("rx gate open");
            assert_eq!(n, 1, "a packet into added region {k}");
            let (_, len) = rx.reap().unwrap().expect("used entry");
            assert_eq!(len as usize, 12 + payload.len());
            let mut got = vec![0u8; payload.len()];
            all.read(buf + 12, &mut got).unwrap();
            assert_eq!(got, payload, "region {k}");
        };
    for k in 0..slots - 1 {
        deliver(&mut rx, &mut cache, k);
    }
    s.fe.remove_mem_region(&infos[10]).unwrap();
    eventually("rings running after REM_MEM_REG", || {
        gates(&sh) == [true, true]
    });
    deliver(&mut rx, &mut cache, slots - 2);
    assert_eq!(stats.read().errors, 0);
    // Full again, then one more (the guest's own region holds a slot: this is the 33rd):
    // refused with a NACK, and that connection is closed; the server goes on.
    s.fe.add_mem_region(&infos[10]).unwrap();
    assert!(
        s.fe.add_mem_region(&infos[slots - 1]).is_err(),
        "a region beyond {slots} slots was taken"
    );
    let mut raw = s.raw.try_clone().unwrap();
    raw.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    expect_closed(&mut raw);
    drop(s);
    assert_serving(&srv, split_cfg());
}

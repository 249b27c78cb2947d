//! The vhost-user net datapath (`VqRun`) against the project's own virtio driver side, in one
//! process: every packet is delivered exactly once and in order, through ring rebuilds (what a
//! front end's memory-table update or disable/enable causes mid-traffic), for split and packed
//! rings, mergeable or not.

use std::sync::Arc;

use vdpakit_core::mbuf::Burst;
use vdpakit_core::mem::{MemMode, Segment};
use vdpakit_core::mempool::{Mempool, MempoolConfig};
use vdpakit_core::port::QueueStats;
use vdpakit_core::vhost::msg::VringAddr;
use vdpakit_core::vhost::net::{VqRun, VringSetup};
use vdpakit_core::virtio::features as vf;
use vdpakit_core::virtio::{DriverQueue, GuestMemory, GuestRegion, QueueConfig, ring_layout};

const RING: u16 = 256;
const BUF: u32 = 2048;

struct Guest {
    _seg: Arc<Segment>,
    mem: GuestMemory,
    cfg: QueueConfig,
    bufs: u64,
}

/// One segment used as guest memory with GPA = UVA = its address; rings at the start, receive
/// buffers after.
fn guest(features: u64) -> Guest {
    let seg = Segment::new("vhost-net-test", 8 << 20, MemMode::NoHuge).unwrap();
    let base = seg.base() as u64;
    // SAFETY: the region covers exactly the segment, which `Guest` keeps alive.
    let region = unsafe { GuestRegion::from_raw(seg.base(), seg.len() as u64, base, base, None) };
    let mem = GuestMemory::new(vec![region]).unwrap();
    let cfg = QueueConfig::at(base, RING, features);
    let l = ring_layout(
        RING,
        features & vf::VIRTIO_F_RING_PACKED != 0,
        features & vf::VIRTIO_F_RING_EVENT_IDX != 0,
    );
    let bufs = (base + l.total).next_multiple_of(4096);
    Guest {
        _seg: seg,
        mem,
        cfg,
        bufs,
    }
}

fn setup(g: &Guest, base: u16, features: u64) -> VringSetup {
    VringSetup {
        index: 0,
        size: RING as u32,
        addr: VringAddr {
            index: 0,
            flags: 0,
            desc: g.cfg.desc,
            used: g.cfg.used,
            avail: g.cfg.avail,
            log: 0,
        },
        base,
        features,
        call: None,
        log: None,
        miss: None,
    }
}

fn run(features: u64, rebuild_every: usize, pkt_len: usize, buf_len: u32) {
    let g = guest(features);
    let mut drv = DriverQueue::new(&g.cfg, &g.mem).unwrap();
    let pool = Mempool::new(
        "vn",
        MempoolConfig {
            count: 1024,
            data_room: 4096,
            mem: MemMode::NoHuge,
            ..Default::default()
        },
    )
    .unwrap();
    let mut cache = pool.cache(64);
    let stats = QueueStats::new();
    // A fresh packed ring starts with wrap counter 1 (bit 15), as QEMU and virtio-user send it.
    let start = if features & vf::VIRTIO_F_RING_PACKED != 0 {
        0x8000
    } else {
        0
    };
    let mut dev = VqRun::build(&setup(&g, start, features), &g.mem).unwrap();
    let hdr = if features & (vf::VIRTIO_F_VERSION_1 | vf::VIRTIO_NET_F_MRG_RXBUF) != 0 {
        12
    } else {
        10
    };
    // Post every buffer: id → its GPA.
    let mut gpa_of = vec![0u64; RING as usize];
    for i in 0..RING as u64 {
        let gpa = g.bufs + i * BUF as u64;
        let id = drv.add(&[(gpa, buf_len, true)]).unwrap();
        gpa_of[id as usize] = gpa;
    }
    drv.publish_avail();
    let total = 5000u32;
    let (mut next_send, mut next_recv) = (0u32, 0u32);
    let mut bursts = 0usize;
    let mut pending_merge: Vec<u8> = Vec::new();
    let mut merge_left = 0u16;
    while next_recv < total {
        // Device: deliver a burst.
        let mut b = Burst::new(32);
        while b.room() > 0 && next_send < total {
            let mut m = cache.alloc().unwrap();
            let d = m.append(pkt_len).unwrap();
            d.fill(0xab);
            d[..4].copy_from_slice(&next_send.to_le_bytes());
            b.push(m).unwrap();
            next_send += 1;
        }
        let before = b.len();
        let sent = dev.enqueue(&mut b, &mut cache, &stats);
        next_send -= b.len() as u32; // unsent ones go again next time
        assert!(sent <= before);
        drop(b);
        bursts += 1;
        if rebuild_every > 0 && bursts.is_multiple_of(rebuild_every) {
            let base = dev.last_avail();
            dev = VqRun::build(&setup(&g, base, features), &g.mem).unwrap();
        }
        // Driver: reap everything, check, repost.
        while let Some((id, len)) = drv.reap().unwrap() {
            let gpa = gpa_of[id as usize];
            let mut buf = vec![0u8; len as usize];
            g.mem.read(gpa, &mut buf).unwrap();
            if merge_left == 0 {
                let nb = if hdr == 12 {
                    u16::from_le_bytes([buf[10], buf[11]])
                } else {
                    1
                };
                assert!(nb >= 1);
                merge_left = nb;
                pending_merge.clear();
                pending_merge.extend_from_slice(&buf[hdr..]);
            } else {
                pending_merge.extend_from_slice(&buf);
            }
            merge_left -= 1;
            if merge_left == 0 {
                assert_eq!(pending_merge.len(), pkt_len, "packet {next_recv} length");
                let seq = u32::from_le_bytes([
                    pending_merge[0],
                    pending_merge[1],
                    pending_merge[2],
                    pending_merge[3],
                ]);
                assert_eq!(seq, next_recv, "packets arrive once and in order");
                assert!(pending_merge[4..].iter().all(|&x| x == 0xab));
                next_recv += 1;
            }
            let nid = drv.add(&[(gpa, buf_len, true)]).unwrap();
            gpa_of[nid as usize] = gpa;
        }
        drv.publish_avail();
        assert!(
            bursts < 100_000,
            "no progress: sent {next_send} received {next_recv}"
        );
    }
    assert_eq!(stats.read().drops, 0);
    assert_eq!(stats.read().errors, 0);
}

const SPLIT: u64 = vf::VIRTIO_F_VERSION_1 | vf::VIRTIO_F_RING_EVENT_IDX;
const PACKED: u64 = vf::VIRTIO_F_VERSION_1 | vf::VIRTIO_F_RING_PACKED | vf::VIRTIO_F_RING_EVENT_IDX;

#[test]
fn split_delivers_everything_in_order() {
    run(SPLIT, 0, 64, BUF);
    run(SPLIT | vf::VIRTIO_NET_F_MRG_RXBUF, 0, 64, BUF);
}

#[test]
fn packed_delivers_everything_in_order() {
    run(PACKED, 0, 64, BUF);
    run(PACKED | vf::VIRTIO_NET_F_MRG_RXBUF, 0, 64, BUF);
}

#[test]
fn split_survives_rebuilds_mid_traffic() {
    run(SPLIT | vf::VIRTIO_NET_F_MRG_RXBUF, 3, 64, BUF);
}

#[test]
fn packed_survives_rebuilds_mid_traffic() {
    run(PACKED | vf::VIRTIO_NET_F_MRG_RXBUF, 3, 64, BUF);
    run(PACKED, 1, 64, BUF);
}

#[test]
fn mergeable_spreads_large_packets_over_small_buffers() {
    // 3000-byte packets into 1024-byte buffers: 3 buffers each, num_buffers = 3.
    run(SPLIT | vf::VIRTIO_NET_F_MRG_RXBUF, 0, 3000, 1024);
    run(PACKED | vf::VIRTIO_NET_F_MRG_RXBUF, 2, 3000, 1024);
}

/// Device and driver on two threads, as with a real front end: the driver reaps and reposts
/// while the device delivers; every packet must arrive once and in order.
fn run_concurrent(features: u64, ring: u16, total: u32, rebuild_every: usize) {
    use std::sync::atomic::{AtomicBool, Ordering};
    let g = Arc::new(guest(features));
    let start = if features & vf::VIRTIO_F_RING_PACKED != 0 {
        0x8000
    } else {
        0
    };
    let cfg = QueueConfig::at(g.cfg.desc, ring, features);
    let g2 = Arc::clone(&g);
    let done = Arc::new(AtomicBool::new(false));
    let done2 = Arc::clone(&done);
    // Driver thread.
    let driver = std::thread::spawn(move || {
        let mut drv = DriverQueue::new(&cfg, &g2.mem).unwrap();
        let mut gpa_of = vec![0u64; ring as usize];
        for i in 0..ring as u64 {
            let gpa = g2.bufs + i * BUF as u64;
            let id = drv.add(&[(gpa, BUF, true)]).unwrap();
            gpa_of[id as usize] = gpa;
        }
        drv.publish_avail();
        let mut next = 0u32;
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
        while next < total {
            let mut reaped = 0u32;
            while let Some((id, len)) = drv.reap().unwrap() {
                let gpa = gpa_of[id as usize];
                let mut buf = [0u8; 16];
                g2.mem.read(gpa, &mut buf).unwrap();
                assert_eq!(len, 12 + 64);
                let seq = u32::from_le_bytes([buf[12], buf[13], buf[14], buf[15]]);
                assert_eq!(seq, next, "packet lost or reordered");
                next += 1;
                let nid = drv.add(&[(gpa, BUF, true)]).unwrap();
                gpa_of[nid as usize] = gpa;
                reaped += 1;
                if reaped.is_multiple_of(7) {
                    drv.publish_avail();
                }
            }
            drv.publish_avail();
            assert!(std::time::Instant::now() < deadline, "stuck at {next}");
        }
        done2.store(true, Ordering::Release);
        next
    });
    // Device thread (this one).
    let pool = Mempool::new(
        "vnc",
        MempoolConfig {
            count: 1024,
            mem: MemMode::NoHuge,
            ..Default::default()
        },
    )
    .unwrap();
    let mut cache = pool.cache(64);
    let stats = QueueStats::new();
    let mut s = setup(&g, start, features);
    s.size = ring as u32;
    let mut dev = VqRun::build(&s, &g.mem).unwrap();
    let mut seq = 0u32;
    let mut bursts = 0usize;
    while seq < total && !done.load(Ordering::Acquire) {
        let mut b = Burst::new(32);
        let mut k = seq;
        while b.room() > 0 && k < total {
            let mut m = cache.alloc().unwrap();
            m.append(64).unwrap()[..4].copy_from_slice(&k.to_le_bytes());
            b.push(m).unwrap();
            k += 1;
        }
        let sent = dev.enqueue(&mut b, &mut cache, &stats);
        seq += sent as u32;
        bursts += 1;
        if rebuild_every > 0 && bursts.is_multiple_of(rebuild_every) {
            let base = dev.last_avail();
            s.base = base;
            dev = VqRun::build(&s, &g.mem).unwrap();
        }
    }
    assert_eq!(driver.join().unwrap(), total);
    assert_eq!(stats.read().drops, 0);
}

#[test]
fn packed_concurrent_driver_gets_everything() {
    run_concurrent(PACKED, 256, 60_000, 0);
    run_concurrent(PACKED | vf::VIRTIO_F_IN_ORDER, 256, 60_000, 50);
}

#[test]
fn split_concurrent_driver_gets_everything() {
    run_concurrent(SPLIT, 256, 60_000, 50);
}

/// Guest transmit frames longer than one mbuf (HOST_TSO frames up to 64 KiB, spread over
/// several descriptors as a guest's skb fragments are) come out as one chained mbuf with every
/// byte in order and the GSO fields of the virtio-net header; small frames around them stay
/// single buffers; a frame over the 64 KiB limit is counted as an error and handed back; a pool
/// too small for a big frame leaves it in the ring until mbufs come back.
#[test]
fn tso_frames_become_chained_mbufs() {
    for features in [SPLIT, PACKED] {
        let g = guest(features);
        let mut drv = DriverQueue::new(&g.cfg, &g.mem).unwrap();
        let pool = Mempool::new(
            "vn-tso",
            MempoolConfig {
                count: 256,
                cache_size: 0,
                data_room: 2048,
                mem: MemMode::NoHuge,
            },
        )
        .unwrap();
        let mut cache = pool.cache(0);
        let stats = QueueStats::new();
        let start = if features & vf::VIRTIO_F_RING_PACKED != 0 {
            0x8000
        } else {
            0
        };
        let mut dev = VqRun::build(&setup(&g, start, features), &g.mem).unwrap();
        // A frame: 12-byte header (GSO TCPv4, gso_size 1448, hdr_len 54) then `len` bytes, the
        // payload split over descriptors of at most 16 KiB.
        let byte = |seq: usize, i: usize| (seq * 31 + i * 7 + i / 251) as u8;
        let mut at = g.bufs;
        let mut post = |drv: &mut DriverQueue, seq: usize, len: usize| {
            let mut hdr = [0u8; 12];
            hdr[0] = 1; // NEEDS_CSUM
            hdr[1] = 1; // GSO_TCPV4
            hdr[2..4].copy_from_slice(&54u16.to_le_bytes());
            hdr[4..6].copy_from_slice(&1448u16.to_le_bytes());
            hdr[6..8].copy_from_slice(&34u16.to_le_bytes());
            hdr[8..10].copy_from_slice(&16u16.to_le_bytes());
            g.mem.write(at, &hdr).unwrap();
            let data: Vec<u8> = (0..len).map(|i| byte(seq, i)).collect();
            g.mem.write(at + 12, &data).unwrap();
            let mut descs = vec![(at, 12u32, false)];
            let mut off = 0;
            while off < len {
                let n = (len - off).min(16 * 1024);
                descs.push((at + 12 + off as u64, n as u32, false));
                off += n;
            }
            drv.add(&descs).unwrap();
            at += (12 + len as u64).next_multiple_of(4096);
        };
        let lens = [60usize, 65_536 + 54, 1514, 40_000, 70_000, 64];
        for (seq, &len) in lens.iter().enumerate() {
            post(&mut drv, seq, len);
        }
        drv.publish_avail();
        let mut b = Burst::new(32);
        let n = dev.dequeue(&mut cache, &mut b, &stats);
        assert_eq!(n, 5, "the 70000-byte frame is refused");
        assert_eq!(stats.read().errors, 1);
        let want: Vec<usize> = lens.iter().copied().filter(|&l| l != 70_000).collect();
        for (k, m) in b.as_slice().iter().enumerate() {
            let seq = lens.iter().position(|&l| l == want[k]).unwrap();
            assert_eq!(m.pkt_len(), want[k], "frame {seq}");
            let segs = want[k].div_ceil(m.buf_len() - m.headroom()) as u16;
            assert!(
                m.nb_segs() >= segs.max(1) && (want[k] > 1900 || m.nb_segs() == 1),
                "frame {seq}: {} segments for {} bytes",
                m.nb_segs(),
                want[k]
            );
            let got = m.to_vec();
            assert!(
                got.iter().enumerate().all(|(i, &x)| x == byte(seq, i)),
                "frame {seq}: bytes"
            );
            let v = m.vnet();
            assert_eq!((v.gso_type, v.gso_size, v.hdr_len), (1, 1448, 54));
        }
        cache.free_burst(&mut b);
        assert_eq!(pool.available(), 256, "every segment back in the pool");

        // Hold all but 10 mbufs: a 40000-byte frame (20 segments) waits in the ring.
        let mut held = Burst::new(256);
        while pool.available() > 10 {
            held.push(cache.alloc().unwrap()).unwrap();
        }
        post(&mut drv, 9, 40_000);
        drv.publish_avail();
        let mut b = Burst::new(32);
        assert_eq!(dev.dequeue(&mut cache, &mut b, &stats), 0);
        assert_eq!(pool.available(), 10, "nothing kept from the failed attempt");
        cache.free_burst(&mut held);
        assert_eq!(dev.dequeue(&mut cache, &mut b, &stats), 1);
        assert_eq!(b.as_slice()[0].pkt_len(), 40_000);
        assert!(
            b.as_slice()[0]
                .to_vec()
                .iter()
                .enumerate()
                .all(|(i, &x)| x == byte(9, i))
        );
        assert_eq!(stats.read().errors, 1);
        cache.free_burst(&mut b);
    }
}

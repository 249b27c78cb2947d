//! A test guest for the device-model tests: memory mapped in a DMA domain, vdpakit's own
//! driver-side rings ([`DriverQueue`]) acting as the guest's virtio-net driver, and the sim PMD
//! configured over it.
#![allow(dead_code)]

use std::collections::VecDeque;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::Arc;
use std::time::{Duration, Instant};

use nix::sys::eventfd::{EfdFlags, EventFd};
use vdpakit_core::mem::{MemMode, Segment};
use vdpakit_core::model::sim::SimDevice;
use vdpakit_core::model::sim_pmd::SimVdpa;
use vdpakit_core::pci::DmaDomain;
use vdpakit_core::vdpa::{DevConf, LogConfig, VdpaDevice, VqConfig};
use vdpakit_core::virtio::{
    AddrKind, DriverQueue, GuestMemory, GuestRegion, QueueConfig, features as vf,
};

/// Where test guests live in IOVA space.
pub const BASE: u64 = 0x1_0000_0000;
/// Guest memory size.
pub const GUEST_LEN: usize = 8 << 20;
/// Ring size used by the tests.
pub const QSIZE: u16 = 256;
/// Receive buffer size.
pub const RXBUF: u32 = 2048;
/// Offsets inside guest memory.
const RINGS: u64 = 0;
const RX_BUFS: u64 = 0x10_0000;
const TX_BUFS: u64 = 0x30_0000;
const SLOT: u64 = 2048;

/// Base features of the tests (split, no EVENT_IDX).
pub const BASE_FEATURES: u64 = vf::VERSION_1 | vf::NET_MRG_RXBUF | vf::RING_INDIRECT_DESC;

/// Test guest memory: one memfd segment mapped at `base` in a domain.
pub struct Guest {
    pub mem: GuestMemory,
    pub base: u64,
    pub seg: Arc<Segment>,
}

impl Guest {
    pub fn new(domain: &DmaDomain, base: u64, len: usize) -> Guest {
        let seg = Segment::new("model-test-guest", len, MemMode::NoHuge).expect("segment");
        let r = GuestRegion::from_segment(&seg).rebased(base, base);
        domain.map(base, &r).expect("map guest");
        Guest {
            mem: GuestMemory::new(vec![r]).expect("memory"),
            base,
            seg,
        }
    }

    /// The same memory mapped into another domain too.
    pub fn map_into(&self, domain: &DmaDomain) {
        let r = GuestRegion::from_segment(&self.seg).rebased(self.base, self.base);
        domain.map(self.base, &r).expect("map guest");
    }
}

pub fn eventfd() -> Arc<OwnedFd> {
    let e = EventFd::from_flags(EfdFlags::EFD_CLOEXEC | EfdFlags::EFD_NONBLOCK).expect("eventfd");
    Arc::new(OwnedFd::from(e))
}

/// Reads (and clears) an eventfd's count; 0 when it was not signalled.
pub fn take_count(fd: &OwnedFd) -> u64 {
    let mut b = [0u8; 8];
    match nix::unistd::read(fd.as_fd(), &mut b) {
        Ok(8) => u64::from_ne_bytes(b),
        _ => 0,
    }
}

/// One guest virtqueue.
pub struct Vq {
    pub index: u16,
    pub dq: DriverQueue,
    pub cfg: QueueConfig,
    pub call: Arc<OwnedFd>,
    /// id → buffer slot
    slots: Vec<Option<u64>>,
    free: VecDeque<u64>,
    buf_base: u64,
}

impl Vq {
    /// Queue `index` of a guest whose rings start at `block` (page-separated areas).
    pub fn new(g: &Guest, index: u16, block: u64, buf_base: u64, features: u64) -> Vq {
        let cfg = QueueConfig {
            size: QSIZE,
            desc: block,
            avail: block + 0x4000,
            used: block + 0x8000,
            addr_kind: AddrKind::Gpa,
            features,
        };
        let dq = DriverQueue::new(&cfg, &g.mem).expect("driver queue");
        Vq {
            index,
            dq,
            cfg,
            call: eventfd(),
            slots: vec![None; usize::from(QSIZE)],
            free: (0..u64::from(QSIZE)).map(|i| buf_base + i * SLOT).collect(),
            buf_base,
        }
    }

    /// Queue `index` with its rings at `block` of `g` (buffers after the rings).
    pub fn for_guest(g: &Guest, index: u16, block: u64, features: u64) -> Vq {
        let bufs = g.base
            + if index.is_multiple_of(2) {
                RX_BUFS
            } else {
                TX_BUFS
            };
        Vq::new(g, index, block, bufs, features)
    }

    pub fn vq_config(&self, start: u16) -> VqConfig {
        VqConfig {
            index: self.index,
            size: self.cfg.size,
            desc: self.cfg.desc,
            driver: self.cfg.avail,
            device: self.cfg.used,
            avail_idx: start,
            used_idx: start,
            call: Some(Arc::clone(&self.call)),
            enabled: true,
        }
    }

    /// Posts one buffer slot as a chain; returns false when the ring or the slots are full.
    pub fn post(&mut self, len: u32, writable: bool) -> Option<u64> {
        let gpa = self.free.pop_front()?;
        match self.dq.add(&[(gpa, len, writable)]) {
            Ok(id) => {
                self.slots[usize::from(id)] = Some(gpa);
                Some(gpa)
            }
            Err(_) => {
                self.free.push_front(gpa);
                None
            }
        }
    }

    /// Reaps one used entry: (buffer gpa, written length).
    pub fn reap(&mut self) -> Option<(u64, u32)> {
        let (id, len) = self.dq.reap().expect("reap")?;
        let gpa = self.slots[usize::from(id)].take().expect("id in flight");
        self.free.push_back(gpa);
        Some((gpa, len))
    }
}

/// A sim VF driven by the sim PMD, with a test guest as its front end.
pub struct Rig {
    pub dev: SimVdpa,
    pub domain: DmaDomain,
    pub g: Guest,
    pub rx: Vq,
    pub tx: Vq,
    pub features: u64,
    pub hdr: usize,
    pub mac: [u8; 6],
}

pub fn packed_start(features: u64) -> u16 {
    if features & vf::RING_PACKED != 0 {
        0x8000
    } else {
        0
    }
}

impl Rig {
    /// Opens VF `k` of `sim` in a fresh domain with a fresh guest (not configured yet).
    pub fn open(sim: &SimDevice, k: u16, features: u64) -> Rig {
        let domain = DmaDomain::model();
        let g = Guest::new(&domain, BASE, GUEST_LEN);
        let dev = SimVdpa::open(
            &format!("{}-vf{k}", sim.name()),
            sim.vf_model(k).expect("vf"),
            &domain,
        )
        .expect("open sim VF");
        let rx = Vq::new(&g, 0, BASE + RINGS, BASE + RX_BUFS, features);
        let tx = Vq::new(&g, 1, BASE + RINGS + 0x10000, BASE + TX_BUFS, features);
        let mac = dev.net_config().mac;
        Rig {
            dev,
            domain,
            g,
            rx,
            tx,
            features,
            hdr: 12,
            mac,
        }
    }

    pub fn conf(&self, log: Option<LogConfig>) -> DevConf {
        let s = packed_start(self.features);
        DevConf {
            features: self.features,
            queues: vec![self.rx.vq_config(s), self.tx.vq_config(s)],
            log,
            mtu: None,
        }
    }

    /// Opens and configures.
    pub fn start(sim: &SimDevice, k: u16, features: u64) -> Rig {
        let mut r = Rig::open(sim, k, features);
        let c = r.conf(None);
        r.dev.configure(&c).expect("configure");
        r
    }

    /// Posts `n` receive buffers of [`RXBUF`] bytes; returns how many fitted.
    pub fn post_rx(&mut self, n: usize) -> usize {
        let mut k = 0;
        while k < n && self.rx.post(RXBUF, true).is_some() {
            k += 1;
        }
        self.rx.dq.publish_avail();
        k
    }

    /// Sends frames (header + frame in one buffer each) and rings the doorbell; returns how
    /// many were posted.
    pub fn send(&mut self, frames: &[Vec<u8>]) -> usize {
        let mut k = 0;
        for f in frames {
            let len = (self.hdr + f.len()) as u32;
            assert!(u64::from(len) <= SLOT);
            let Some(gpa) = self.tx.post(len, false) else {
                break;
            };
            let mut b = vec![0u8; self.hdr];
            b.extend_from_slice(f);
            self.g.mem.write(gpa, &b).expect("write tx buffer");
            k += 1;
        }
        if self.tx.dq.publish_avail() {
            self.kick(1);
        }
        k
    }

    pub fn kick(&self, q: u16) {
        let (bell, v) = self.dev.doorbell(q).expect("doorbell");
        bell.ring(v);
    }

    /// Reaps transmit completions.
    pub fn reap_tx(&mut self) -> usize {
        let mut n = 0;
        while let Some((_, len)) = self.tx.reap() {
            assert_eq!(len, 0, "transmit completes with length 0");
            n += 1;
        }
        n
    }

    /// Receives up to `n` frames, waiting at most `within`; checks each header.
    pub fn recv(&mut self, n: usize, within: Duration) -> Vec<Vec<u8>> {
        let end = Instant::now() + within;
        let mut out = Vec::new();
        while out.len() < n && Instant::now() < end {
            match self.rx.reap() {
                Some((gpa, len)) => {
                    let mut b = vec![0u8; len as usize];
                    self.g.mem.read(gpa, &mut b).expect("read rx buffer");
                    assert!(b.len() >= self.hdr, "runt receive of {len} bytes");
                    assert_eq!(&b[..10], &[0u8; 10], "receive header flags/gso zeroed");
                    assert_eq!(
                        u16::from_le_bytes([b[10], b[11]]),
                        1,
                        "num_buffers of a one-chain frame"
                    );
                    out.push(b[self.hdr..].to_vec());
                }
                None => std::thread::sleep(Duration::from_micros(200)),
            }
        }
        out
    }
}

/// A test frame: destination `dst`, source 02:..:ff, ethertype 0x88b5, sequence, pattern;
/// `len` bytes in all (at least 20).
pub fn frame(dst: [u8; 6], seq: u32, len: usize) -> Vec<u8> {
    let mut f = Vec::with_capacity(len);
    f.extend_from_slice(&dst);
    f.extend_from_slice(&[0x02, 0, 0, 0, 0, 0xff]);
    f.extend_from_slice(&[0x88, 0xb5]);
    f.extend_from_slice(&seq.to_le_bytes());
    while f.len() < len {
        f.push((seq as usize + f.len()) as u8);
    }
    f
}

/// Frame sizes cycling through 60..=1514.
pub fn size_of(i: u32) -> usize {
    60 + (i as usize * 97) % (1514 - 60 + 1)
}

/// Waits until `f` holds (at most 5 s).
pub fn wait_for(what: &str, mut f: impl FnMut() -> bool) {
    let end = Instant::now() + Duration::from_secs(5);
    while !f() {
        assert!(Instant::now() < end, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_micros(200));
    }
}

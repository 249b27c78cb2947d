//! A test guest for the PMD-against-model tests: memory mapped at IOVA = GPA in the function's
//! DMA domain, vdpakit's own driver-side rings ([`DriverQueue`]) as the guest's virtio-net
//! driver, a vDPA device configured over them.
#![allow(dead_code)]

use std::collections::VecDeque;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::Arc;
use std::time::{Duration, Instant};

use nix::sys::eventfd::{EfdFlags, EventFd};
use vdpakit_core::mem::{MemMode, Segment};
use vdpakit_core::pci::DmaDomain;
use vdpakit_core::vdpa::{DevConf, LogConfig, VdpaDevice, VqConfig};
use vdpakit_core::virtio::{
    AddrKind, DriverQueue, GuestMemory, GuestRegion, QueueConfig, features as vf,
};

/// Where guests live in IOVA space.
pub const BASE: u64 = 0x1_0000_0000;
/// Guest memory size.
pub const GUEST_LEN: usize = 16 << 20;
/// Ring size.
pub const QSIZE: u16 = 256;
const SLOT: u64 = 2048;
/// Bytes of guest memory per queue (rings, then buffers).
const PER_QUEUE: u64 = 0x10_0000;

/// Split rings, VERSION_1, MRG_RXBUF (12-byte header).
pub const FEATURES: u64 = vf::VERSION_1 | vf::NET_MRG_RXBUF;

/// Guest memory: one segment mapped at `BASE` in a domain.
pub struct Guest {
    pub mem: GuestMemory,
    pub seg: Arc<Segment>,
}

impl Guest {
    pub fn new(domain: &DmaDomain) -> Guest {
        let seg = Segment::new("pmd-test-guest", GUEST_LEN, MemMode::NoHuge).expect("segment");
        let r = GuestRegion::from_segment(&seg).rebased(BASE, BASE);
        domain.map(BASE, &r).expect("map guest");
        Guest {
            mem: GuestMemory::new(vec![r]).expect("memory"),
            seg,
        }
    }
}

pub fn eventfd() -> Arc<OwnedFd> {
    let e = EventFd::from_flags(EfdFlags::EFD_CLOEXEC | EfdFlags::EFD_NONBLOCK).expect("eventfd");
    Arc::new(OwnedFd::from(e))
}

/// Reads (and clears) an eventfd's count.
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
    slots: Vec<Option<u64>>,
    free: VecDeque<u64>,
}

impl Vq {
    /// Queue `index`: rings at the start of its slice of guest memory (the legacy contiguous
    /// layout when `legacy`), buffers after them.
    pub fn new(g: &Guest, index: u16, size: u16, features: u64, legacy: bool) -> Vq {
        let block = BASE + u64::from(index) * PER_QUEUE;
        let n = u64::from(size);
        let (avail, used) = if legacy {
            (
                block + 16 * n,
                (block + 16 * n + 6 + 2 * n).next_multiple_of(4096),
            )
        } else {
            (block + 0x4000, block + 0x8000)
        };
        let cfg = QueueConfig {
            size,
            desc: block,
            avail,
            used,
            addr_kind: AddrKind::Gpa,
            features,
        };
        let dq = DriverQueue::new(&cfg, &g.mem).expect("driver queue");
        let bufs = block + 0x2_0000;
        Vq {
            index,
            dq,
            cfg,
            call: eventfd(),
            slots: vec![None; usize::from(size)],
            free: (0..n).map(|i| bufs + i * SLOT).collect(),
        }
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

    fn post(&mut self, len: u32, writable: bool) -> Option<u64> {
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

    pub fn reap(&mut self) -> Option<(u64, u32)> {
        let (id, len) = self.dq.reap().expect("reap")?;
        let gpa = self.slots[usize::from(id)].take().expect("id in flight");
        self.free.push_back(gpa);
        Some((gpa, len))
    }
}

/// A device with a test guest as its front end: queue pairs `0..pairs`.
pub struct Rig {
    pub dev: Box<dyn VdpaDevice>,
    pub g: Guest,
    pub rx: Vec<Vq>,
    pub tx: Vec<Vq>,
    pub features: u64,
    pub hdr: usize,
    pub mac: [u8; 6],
    pub legacy: bool,
}

impl Rig {
    pub fn new(
        dev: Box<dyn VdpaDevice>,
        pairs: u16,
        size: u16,
        features: u64,
        legacy: bool,
    ) -> Rig {
        let g = Guest::new(dev.domain());
        let rx = (0..pairs)
            .map(|p| Vq::new(&g, 2 * p, size, features, legacy))
            .collect();
        let tx = (0..pairs)
            .map(|p| Vq::new(&g, 2 * p + 1, size, features, legacy))
            .collect();
        let mac = dev.net_config().mac;
        Rig {
            dev,
            g,
            rx,
            tx,
            features,
            hdr: 12,
            mac,
            legacy,
        }
    }

    /// New, zeroed rings at the same places (a guest driver starting over after a reset).
    pub fn fresh_queues(&mut self) {
        let (size, f, l) = (self.rx[0].cfg.size, self.features, self.legacy);
        let pairs = self.rx.len() as u16;
        self.rx = (0..pairs)
            .map(|p| Vq::new(&self.g, 2 * p, size, f, l))
            .collect();
        self.tx = (0..pairs)
            .map(|p| Vq::new(&self.g, 2 * p + 1, size, f, l))
            .collect();
    }

    pub fn conf(&self, start: u16, log: Option<LogConfig>) -> DevConf {
        let mut queues = Vec::new();
        for (r, t) in self.rx.iter().zip(&self.tx) {
            queues.push(r.vq_config(start));
            queues.push(t.vq_config(start));
        }
        DevConf {
            features: self.features,
            queues,
            log,
            mtu: None,
        }
    }

    pub fn start(&mut self) {
        let c = self.conf(0, None);
        self.dev.configure(&c).expect("configure");
    }

    /// Posts `n` receive buffers on pair `p`; returns how many went in.
    pub fn post_rx(&mut self, p: usize, n: usize) -> usize {
        let mut done = 0;
        for _ in 0..n {
            if self.rx[p].post(SLOT as u32, true).is_none() {
                break;
            }
            done += 1;
        }
        if self.rx[p].dq.publish_avail() {
            self.kick(2 * p as u16);
        }
        done
    }

    pub fn kick(&self, q: u16) {
        let (bell, v) = self.dev.doorbell(q).expect("doorbell");
        bell.ring(v);
    }

    /// Sends frames on pair `p` (header zeroed, then the frame); returns how many were posted.
    pub fn send(&mut self, p: usize, frames: &[Vec<u8>]) -> usize {
        let mut n = 0;
        for f in frames {
            let Some(gpa) = self.tx[p].post((self.hdr + f.len()) as u32, false) else {
                break;
            };
            let mut b = vec![0u8; self.hdr];
            b.extend_from_slice(f);
            self.g.mem.write(gpa, &b).expect("write frame");
            n += 1;
        }
        if self.tx[p].dq.publish_avail() {
            self.kick(2 * p as u16 + 1);
        }
        n
    }

    /// Frees completed transmit buffers of pair `p`.
    pub fn reap_tx(&mut self, p: usize) -> usize {
        let mut n = 0;
        while self.tx[p].reap().is_some() {
            n += 1;
        }
        n
    }

    /// Waits for `n` frames on pair `p`'s receive queue (bounded).
    pub fn recv(&mut self, p: usize, n: usize, limit: Duration) -> Vec<Vec<u8>> {
        let end = Instant::now() + limit;
        let mut out = Vec::new();
        while out.len() < n && Instant::now() < end {
            match self.rx[p].reap() {
                Some((gpa, len)) => {
                    let mut b = vec![0u8; len as usize];
                    self.g.mem.read(gpa, &mut b).expect("read frame");
                    out.push(b[self.hdr..].to_vec());
                }
                None => std::thread::sleep(Duration::from_micros(100)),
            }
        }
        out
    }
}

/// A test frame to `dst`: broadcast-free, numbered, `len` bytes.
pub fn frame(dst: [u8; 6], seq: u32, len: usize) -> Vec<u8> {
    let mut f = vec![0u8; len.max(60)];
    f[..6].copy_from_slice(&dst);
    f[6..12].copy_from_slice(&[0x02, 0, 0, 0, 0, 0x99]);
    f[12..14].copy_from_slice(&[0x88, 0xb5]);
    f[14..18].copy_from_slice(&seq.to_be_bytes());
    for (i, b) in f.iter_mut().enumerate().skip(18) {
        *b = (i as u32 ^ seq) as u8;
    }
    f
}

pub fn size_of(i: u32) -> usize {
    60 + (i as usize * 97) % 1400
}

/// Sends `total` frames on `p` of `a` and expects them, byte-exact and in order, on `p` of `b`
/// (the same rig for a loop).
pub fn exchange(a: &mut Rig, b: Option<&mut Rig>, p: usize, total: u32, seed: u32) {
    let mut got = Vec::new();
    let mut sent = 0u32;
    let mut b = b;
    let dst = b.as_ref().map_or(a.mac, |r| r.mac);
    match b.as_deref_mut() {
        Some(r) => {
            r.post_rx(p, 200);
        }
        None => {
            a.post_rx(p, 200);
        }
    }
    while sent < total {
        let batch: Vec<Vec<u8>> = (sent..total.min(sent + 50))
            .map(|i| frame(dst, seed + i, size_of(seed + i)))
            .collect();
        sent += a.send(p, &batch) as u32;
        let r = match b.as_deref_mut() {
            Some(r) => r,
            None => &mut *a,
        };
        let more = r.recv(p, batch.len(), Duration::from_secs(5));
        assert_eq!(
            more.len(),
            batch.len(),
            "frames through the wire (pair {p})"
        );
        r.post_rx(p, more.len());
        got.extend(more);
        a.reap_tx(p);
    }
    for (i, f) in got.iter().enumerate() {
        let i = i as u32;
        assert_eq!(f, &frame(dst, seed + i, size_of(seed + i)), "frame {i}");
    }
}

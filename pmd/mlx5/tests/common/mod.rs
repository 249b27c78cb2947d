//! Shared test helpers: a model-backed device, guest memory mapped in its domain at a guest
//! physical address unrelated to where it lives in this process, and a guest driver side built
//! from vdpakit's own `DriverQueue`.

#![allow(dead_code)]

use std::collections::HashMap;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::Arc;
use std::time::{Duration, Instant};

use nix::sys::eventfd::{EfdFlags, EventFd};
use vdpakit_core::mem::{MemMode, Segment};
use vdpakit_core::pci::{DmaDomain, PciDevice, model};
use vdpakit_core::vdpa::{DevConf, VdpaDevice, VqConfig};
use vdpakit_core::virtio::features as vf;
use vdpakit_core::virtio::{DriverQueue, GuestMemory, GuestRegion, QueueConfig, ring_layout};
use vdpakit_pmd_mlx5::model::{Mlx5Model, ModelOptions};
use vdpakit_pmd_mlx5::{Devargs, Hca, HcaOptions, Mlx5Vdpa};

/// Where the test guest's memory sits in guest physical space (and IOVA space).
pub const GPA: u64 = 0x4000_0000;
/// Guest memory size.
pub const GUEST_MEM: usize = 8 << 20;
/// Frame buffers start here (rings below).
pub const BUF_BASE: u64 = GPA + (2 << 20);
/// Bytes per buffer.
pub const BUF: u64 = 2048;

pub fn hca_opts() -> HcaOptions {
    HcaOptions {
        dma_mem: 4 << 20,
        mem_mode: MemMode::NoHuge,
        ..Default::default()
    }
}

pub fn open_model(o: ModelOptions) -> (Arc<Mlx5Model>, PciDevice, DmaDomain) {
    let m = Mlx5Model::new(o).unwrap();
    let dom = DmaDomain::model();
    let pci = model::open(m.clone(), &dom).unwrap();
    (m, pci, dom)
}

pub fn hca(o: ModelOptions) -> (Arc<Mlx5Model>, Hca) {
    let (m, pci, _) = open_model(o);
    let h = Hca::open(pci, &hca_opts()).unwrap();
    (m, h)
}

/// A device over a model built from `args` (`mlx5:model,...`).
pub fn device(params: &str) -> (Mlx5Vdpa, Arc<Mlx5Model>) {
    let mut a = Devargs::parse(params).unwrap();
    a.mem = MemMode::NoHuge;
    a.dma_mem = 4 << 20;
    let d = Mlx5Vdpa::with_model(a).unwrap();
    let m = d.model().unwrap().clone();
    (d, m)
}

/// Guest memory: a segment mapped into `dom` at IOVA = `GPA`, and the guest's own view of it.
pub struct Guest {
    pub seg: Arc<Segment>,
    pub mem: GuestMemory,
}

impl Guest {
    pub fn new(dom: &DmaDomain) -> Guest {
        Guest::with_regions(dom, &[GPA])
    }

    /// Guest memory in several regions of `GUEST_MEM` bytes each, at `gpas` (the first holds
    /// the rings; buffers of `Ring::with_buffers` may go to the others).
    pub fn with_regions(dom: &DmaDomain, gpas: &[u64]) -> Guest {
        let mut regions = Vec::new();
        let mut first = None;
        for &gpa in gpas {
            let seg = Segment::new("guest", GUEST_MEM, MemMode::NoHuge).unwrap();
            let region = GuestRegion::from_segment(&seg).rebased(gpa, gpa);
            dom.map(gpa, &region).unwrap();
            regions.push(region);
            first.get_or_insert(seg);
        }
        let mem = GuestMemory::new(regions).unwrap();
        Guest {
            seg: first.unwrap(),
            mem,
        }
    }
}

/// One guest ring: driver side, its place in guest memory, its buffers.
pub struct Ring {
    pub index: u16,
    pub q: DriverQueue,
    pub cfg: QueueConfig,
    pub call: Option<Arc<OwnedFd>>,
    free: Vec<u64>,
    inflight: HashMap<u16, u64>,
}

pub fn ring_base(index: u16) -> u64 {
    GPA + u64::from(index) * 0x4_0000
}

impl Ring {
    pub fn new(g: &Guest, index: u16, size: u16, features: u64, call: bool) -> Ring {
        Ring::with_buffers(g, index, size, features, call, BUF_BASE)
    }

    /// A ring whose buffers are carved from `bufs` on.
    pub fn with_buffers(
        g: &Guest,
        index: u16,
        size: u16,
        features: u64,
        call: bool,
        bufs: u64,
    ) -> Ring {
        let l = ring_layout(size, features & vf::RING_PACKED != 0, false);
        assert!(l.total <= 0x4_0000);
        assert!(u64::from(index) < 8 && size <= 256);
        let cfg = QueueConfig::at(ring_base(index), size, features);
        let q = DriverQueue::new(&cfg, &g.mem).unwrap();
        let call = call.then(|| {
            Arc::new(OwnedFd::from(
                EventFd::from_flags(EfdFlags::EFD_NONBLOCK).unwrap(),
            ))
        });
        let free = (0..u64::from(size))
            .map(|i| bufs + (u64::from(index) * 256 + i) * BUF)
            .collect();
        Ring {
            index,
            q,
            cfg,
            call,
            free,
            inflight: HashMap::new(),
        }
    }

    pub fn vq_config(&self, avail_idx: u16, used_idx: u16) -> VqConfig {
        VqConfig {
            index: self.index,
            size: self.cfg.size,
            desc: self.cfg.desc,
            driver: self.cfg.avail,
            device: self.cfg.used,
            avail_idx,
            used_idx,
            call: self.call.clone(),
            enabled: true,
        }
    }

    /// Interrupts signalled on the call eventfd since the last look.
    pub fn interrupts(&self) -> u64 {
        let Some(fd) = &self.call else { return 0 };
        let mut b = [0u8; 8];
        match nix::unistd::read(fd.as_fd(), &mut b) {
            Ok(8) => u64::from_ne_bytes(b),
            _ => 0,
        }
    }

    fn kick(&mut self, dev: &dyn VdpaDevice) {
        if self.q.publish_avail() {
            let (bell, v) = dev.doorbell(self.index).unwrap();
            bell.ring(v);
        }
    }

    /// Posts `frames` (virtio-net header of `hdr` zero bytes + frame, one buffer each);
    /// returns how many fit.
    pub fn transmit(
        &mut self,
        g: &Guest,
        dev: &dyn VdpaDevice,
        frames: &[Vec<u8>],
        hdr: usize,
    ) -> usize {
        let n = self.post_tx(g, frames, hdr);
        self.kick(dev);
        n
    }

    /// Posts `frames` as [`Ring::transmit`] does and publishes them without a doorbell.
    pub fn transmit_quiet(&mut self, g: &Guest, frames: &[Vec<u8>], hdr: usize) -> usize {
        let n = self.post_tx(g, frames, hdr);
        self.q.publish_avail();
        n
    }

    fn post_tx(&mut self, g: &Guest, frames: &[Vec<u8>], hdr: usize) -> usize {
        let mut n = 0;
        for f in frames {
            let Some(addr) = self.free.pop() else { break };
            let mut b = vec![0u8; hdr];
            b.extend_from_slice(f);
            g.mem.write(addr, &b).unwrap();
            match self.q.add(&[(addr, b.len() as u32, false)]) {
                Ok(id) => {
                    self.inflight.insert(id, addr);
                    n += 1;
                }
                Err(_) => {
                    self.free.push(addr);
                    break;
                }
            }
        }
        n
    }

    /// Buffers posted and not yet reaped.
    pub fn posted(&self) -> usize {
        self.inflight.len()
    }

    /// Posts up to `n` receive buffers; returns how many.
    pub fn post_rx(&mut self, dev: &dyn VdpaDevice, n: usize) -> usize {
        let mut k = 0;
        while k < n {
            let Some(addr) = self.free.pop() else { break };
            match self.q.add(&[(addr, BUF as u32, true)]) {
                Ok(id) => {
                    self.inflight.insert(id, addr);
                    k += 1;
                }
                Err(_) => {
                    self.free.push(addr);
                    break;
                }
            }
        }
        self.kick(dev);
        k
    }

    /// Reaps completed transmit chains.
    pub fn reap_tx(&mut self) -> usize {
        let mut n = 0;
        while let Some((id, _)) = self.q.reap().unwrap() {
            let a = self.inflight.remove(&id).expect("used id in flight");
            self.free.push(a);
            n += 1;
        }
        n
    }

    /// Reaps received frames (the header of `hdr` bytes stripped and checked).
    pub fn reap_rx(&mut self, g: &Guest, hdr: usize) -> Vec<Vec<u8>> {
        self.reap_rx_at(g, hdr)
            .into_iter()
            .map(|(_, f)| f)
            .collect()
    }

    /// Reaps received frames with the buffer address each was written at.
    pub fn reap_rx_at(&mut self, g: &Guest, hdr: usize) -> Vec<(u64, Vec<u8>)> {
        let mut out = Vec::new();
        while let Some((id, len)) = self.q.reap().unwrap() {
            let a = self.inflight.remove(&id).expect("used id in flight");
            let mut b = vec![0u8; len as usize];
            g.mem.read(a, &mut b).unwrap();
            assert!(b.len() >= hdr);
            if hdr == 12 {
                assert_eq!(u16::from_le_bytes([b[10], b[11]]), 1, "num_buffers");
            }
            out.push((a, b[hdr..].to_vec()));
            self.free.push(a);
        }
        out
    }
}

pub fn features(packed: bool) -> u64 {
    vf::VERSION_1 | if packed { vf::RING_PACKED } else { 0 }
}

/// A configuration of fresh rings (packed rings start with both wrap counters set).
pub fn conf(features: u64, rings: &[&Ring]) -> DevConf {
    let start = if features & vf::RING_PACKED != 0 {
        0x8000
    } else {
        0
    };
    DevConf {
        features,
        queues: rings.iter().map(|r| r.vq_config(start, start)).collect(),
        log: None,
        mtu: None,
    }
}

/// An Ethernet/IPv4/UDP frame of `len` bytes to `dst` from flow `flow` with sequence `seq`.
pub fn frame(dst: [u8; 6], flow: u16, seq: u32, len: usize) -> Vec<u8> {
    let mut f = vec![0u8; len.max(60)];
    f[..6].copy_from_slice(&dst);
    f[6..12].copy_from_slice(&[0x02, 0, 0, 0, 0, 1]);
    f[12..14].copy_from_slice(&0x0800u16.to_be_bytes());
    f[14] = 0x45;
    f[23] = 17;
    f[26..30].copy_from_slice(&[198, 18, (flow >> 8) as u8, flow as u8]);
    f[30..34].copy_from_slice(&[198, 19, 0, 1]);
    f[34..36].copy_from_slice(&(1024 + flow).to_be_bytes());
    f[36..38].copy_from_slice(&9u16.to_be_bytes());
    f[42..46].copy_from_slice(&seq.to_be_bytes());
    f
}

pub fn seq_of(f: &[u8]) -> u32 {
    u32::from_be_bytes([f[42], f[43], f[44], f[45]])
}

/// Waits (bounded) until `f` returns Some.
pub fn wait<T>(what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let start = Instant::now();
    loop {
        if let Some(x) = f() {
            return x;
        }
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "timed out waiting for {what}"
        );
        std::thread::sleep(Duration::from_micros(200));
    }
}

//! Hardware dirty-page logging: with logging on (DIRTY_BITMAP_PARAMS + DUMP_ENABLE on every
//! queue, the bitmap behind a key of its own), exactly the 4 KiB pages of the receive buffers
//! the device wrote and of the used-ring entries it published are marked in the vhost-format
//! bitmap, nothing else; with logging off nothing is; at switchover (a ring's position read
//! back) the driver marks the whole used ring.

mod common;

use std::collections::BTreeSet;
use std::sync::Arc;

use common::*;
use vdpakit_core::mem::{MemMode, Segment};
use vdpakit_core::vdpa::{LogConfig, LogSupport, VdpaDevice};
use vdpakit_core::virtio::features as vf;
use vdpakit_core::virtio::{GuestMemory, GuestRegion};

const HDR: usize = 12;
/// Where the bitmap is DMA-mapped (as the binding does, far above guest memory).
const LOG_IOVA: u64 = 0x1000_0000_0000;
/// Bytes of bitmap: one bit per page of everything below GPA + GUEST_MEM, and some.
const LOG_BYTES: u64 = 0x9000;

struct Log {
    mem: GuestMemory,
    _seg: Arc<Segment>,
}

impl Log {
    fn new(dev: &dyn VdpaDevice) -> Log {
        let seg = Segment::new("dirty-log", LOG_BYTES as usize, MemMode::NoHuge).unwrap();
        let region = GuestRegion::from_segment(&seg).rebased(LOG_IOVA, LOG_IOVA);
        dev.domain().map(LOG_IOVA, &region).unwrap();
        Log {
            mem: GuestMemory::new(vec![region]).unwrap(),
            _seg: seg,
        }
    }

    fn conf(&self) -> LogConfig {
        LogConfig {
            iova: LOG_IOVA,
            size: LOG_BYTES,
        }
    }

    /// The pages marked.
    fn pages(&self) -> BTreeSet<u64> {
        let mut b = vec![0u8; LOG_BYTES as usize];
        self.mem.read(LOG_IOVA, &mut b).unwrap();
        let mut out = BTreeSet::new();
        for (i, &byte) in b.iter().enumerate() {
            for bit in 0..8 {
                if byte & (1 << bit) != 0 {
                    out.insert(i as u64 * 8 + bit);
                }
            }
        }
        out
    }

    fn clear(&self) {
        self.mem
            .write(LOG_IOVA, &vec![0u8; LOG_BYTES as usize])
            .unwrap();
    }
}

/// The pages of `[addr, addr + len)`.
fn pages(addr: u64, len: u64) -> impl Iterator<Item = u64> {
    (addr >> 12)..=((addr + len - 1) >> 12)
}

/// The used-ring pages a split device writes for entries `from..to` of a ring of `size` at
/// `used`: flags and index at the start, each 8-byte entry.
fn used_pages(used: u64, size: u16, from: u64, to: u64) -> BTreeSet<u64> {
    let mut s: BTreeSet<u64> = pages(used, 4).collect();
    for i in from..to {
        s.extend(pages(used + 4 + 8 * (i % u64::from(size)), 8));
    }
    s
}

/// Loops `frames` through the device; returns the receive buffer addresses written, with the
/// bytes written there (header + frame).
fn traffic(
    g: &Guest,
    dev: &dyn VdpaDevice,
    rx: &mut Ring,
    tx: &mut Ring,
    frames: &[Vec<u8>],
) -> Vec<(u64, u64)> {
    let mut got: Vec<(u64, u64)> = Vec::new();
    let mut sent = 0;
    let window = rx.posted();
    wait("frames through the loop", || {
        let end = frames.len().min(got.len() + window);
        if sent < end {
            sent += tx.transmit(g, dev, &frames[sent..end], HDR);
        }
        tx.reap_tx();
        let r = rx.reap_rx_at(g, HDR);
        let n = r.len();
        got.extend(r.into_iter().map(|(a, f)| (a, (HDR + f.len()) as u64)));
        rx.post_rx(dev, n);
        (got.len() >= frames.len()).then_some(())
    });
    // The last transmit completions.
    wait("transmit completions", || {
        tx.reap_tx();
        (tx.posted() == 0).then_some(())
    });
    got
}

#[test]
fn hardware_log_marks_exactly_written_pages_split() {
    check(false);
}

#[test]
fn hardware_log_marks_exactly_written_pages_packed() {
    check(true);
}

/// The pages a device writes for used entries `from..to` of `r`: split, the used ring (flags
/// and index, each entry); packed, each used descriptor in the descriptor ring (the device
/// area, where the device writes its event suppression, is the caller's allowance).
fn ring_pages(r: &Ring, packed: bool, from: u64, to: u64) -> BTreeSet<u64> {
    if packed {
        (from..to)
            .flat_map(|i| pages(r.cfg.desc + 16 * (i % u64::from(r.cfg.size)), 16))
            .collect()
    } else {
        used_pages(r.cfg.used, r.cfg.size, from, to)
    }
}

fn check(packed: bool) {
    let (mut dev, model) = device("model");
    assert_eq!(dev.log_support(), LogSupport::Hardware);
    assert!(dev.features() & vf::VHOST_F_LOG_ALL != 0);
    let g = Guest::new(dev.domain());
    let log = Log::new(&dev);
    let f = features(packed);
    let mut rx = Ring::new(&g, 0, 128, f, true);
    let mut tx = Ring::new(&g, 1, 128, f, true);
    dev.configure(&conf(f, &[&rx, &tx])).unwrap();
    rx.post_rx(&dev, 128);
    let m = dev.net_config().mac;

    // Logging off: traffic marks nothing.
    let frames: Vec<Vec<u8>> = (0..100)
        .map(|i| frame(m, 1, i, 60 + (i as usize * 37) % 1400))
        .collect();
    traffic(&g, &dev, &mut rx, &mut tx, &frames);
    assert!(log.pages().is_empty(), "logging off: nothing marked");

    // Logging on (what the binding does at LOG_ALL): two MODIFYs per queue, one key more.
    let keys = model.census()[&vdpakit_pmd_mlx5::model::Kind::Mkey];
    let cmds = model.stats().commands;
    dev.set_features(f | vf::VHOST_F_LOG_ALL, Some(log.conf()))
        .unwrap();
    assert_eq!(
        model.census()[&vdpakit_pmd_mlx5::model::Kind::Mkey],
        keys + 1
    );
    assert_eq!(
        model.stats().commands - cmds,
        1 + 2 * 2,
        "CREATE_MKEY, 2 MODIFYs per queue"
    );
    // The rings' used indices before: 100 entries each.
    let frames: Vec<Vec<u8>> = (100..400)
        .map(|i| frame(m, 1, i, 60 + (i as usize * 37) % 1400))
        .collect();
    let written = traffic(&g, &dev, &mut rx, &mut tx, &frames);
    assert_eq!(written.len(), 300);
    let mut want: BTreeSet<u64> = BTreeSet::new();
    for &(a, len) in &written {
        want.extend(pages(a, len));
    }
    want.extend(ring_pages(&rx, packed, 100, 400));
    want.extend(ring_pages(&tx, packed, 100, 400));
    let mut got = log.pages();
    if packed {
        // The device areas, written when the engine asks for kicks or not: marked if written.
        for r in [&rx, &tx] {
            let p = r.cfg.used >> 12;
            if !want.contains(&p) {
                got.remove(&p);
            }
        }
    }
    assert_eq!(
        got.difference(&want).collect::<Vec<_>>(),
        Vec::<&u64>::new(),
        "pages marked that the device did not write"
    );
    assert_eq!(
        want.difference(&got).collect::<Vec<_>>(),
        Vec::<&u64>::new(),
        "pages the device wrote, not marked"
    );
    assert!(got.len() > 50, "{} pages", got.len());
    // Transmit buffers are only read: none of their pages is marked.
    let tx_bufs: BTreeSet<u64> = pages(BUF_BASE + 256 * BUF, 128 * BUF).collect();
    assert!(got.is_disjoint(&tx_bufs));

    // Switchover: a ring's position read back marks its whole used ring, and only that (the
    // device stopped first, so nothing else writes meanwhile).
    dev.suspend().unwrap();
    log.clear();
    let s = dev.vring_state(0).unwrap();
    // 400 entries: split counts them, packed wraps every 128 (the wrap counter in bit 15).
    let pos = if packed {
        let (n, size) = (400u16, 128u16);
        // The wrap counter starts at 1 and flips at every wrap.
        let wrap = 1 ^ ((n / size) & 1);
        (n % size) | (wrap << 15)
    } else {
        400
    };
    assert_eq!(s.used_idx, pos);
    let ring: BTreeSet<u64> = if packed {
        pages(rx.cfg.desc, 16 * 128).collect()
    } else {
        pages(rx.cfg.used, 6 + 8 * 128).collect()
    };
    assert_eq!(log.pages(), ring);
    let s1 = dev.vring_state(1).unwrap();
    assert_eq!((s1.avail_idx, s1.used_idx), (pos, pos));
    dev.close().unwrap();

    // A restart with logging on (the log in the configuration), then off: nothing is marked.
    let mut c = conf(f, &[&rx, &tx]);
    c.queues = vec![
        rx.vq_config(s.avail_idx, s.used_idx),
        tx.vq_config(s1.avail_idx, s1.used_idx),
    ];
    c.features = f | vf::VHOST_F_LOG_ALL;
    c.log = Some(log.conf());
    dev.configure(&c).unwrap();
    assert_eq!(
        model.census()[&vdpakit_pmd_mlx5::model::Kind::Mkey],
        keys + 1
    );
    dev.set_features(f, None).unwrap();
    log.clear();
    assert_eq!(
        model.census()[&vdpakit_pmd_mlx5::model::Kind::Mkey],
        keys,
        "the log key went"
    );
    let frames: Vec<Vec<u8>> = (400..500).map(|i| frame(m, 1, i, 100)).collect();
    traffic(&g, &dev, &mut rx, &mut tx, &frames);
    assert!(log.pages().is_empty(), "logging off again: nothing marked");
    assert_eq!(dev.domain().faults().0, 0);
}

/// A model without vnet_modify_ext (`log=0`) reports no hardware logging and refuses a log:
/// the binding then relays used rings in software.
#[test]
fn without_modify_ext_no_hardware_log() {
    let (mut dev, _model) = device("model,log=0");
    assert_eq!(dev.log_support(), LogSupport::None);
    let g = Guest::new(dev.domain());
    let log = Log::new(&dev);
    let f = features(false);
    let rx = Ring::new(&g, 0, 64, f, true);
    let tx = Ring::new(&g, 1, 64, f, true);
    let mut c = conf(f | vf::VHOST_F_LOG_ALL, &[&rx, &tx]);
    c.log = Some(log.conf());
    let e = dev.configure(&c).unwrap_err().to_string();
    assert!(e.contains("dirty page logging in hardware"), "{e}");
    c.log = None;
    dev.configure(&c).unwrap();
    let e = dev
        .set_features(f | vf::VHOST_F_LOG_ALL, Some(log.conf()))
        .unwrap_err()
        .to_string();
    assert!(e.contains("dirty page logging in hardware"), "{e}");
}

//! Split and packed rings, driver against device: chain shapes, data, ids and lengths, burst
//! publish semantics, wrap-around, out-of-order completion, restore, rewind, and IN_ORDER
//! (sequential split descriptors, batched used entries resolved by the driver).

mod virtio_common;

use std::collections::VecDeque;

use vdpakit_core::virtio::features::{
    VIRTIO_F_IN_ORDER, VIRTIO_F_RING_EVENT_IDX, VIRTIO_F_RING_INDIRECT_DESC, VIRTIO_F_RING_PACKED,
    VIRTIO_F_VERSION_1,
};
use vdpakit_core::virtio::{
    AddrKind, Chain, DeviceQueue, DriverQueue, GuestMemory, QueueConfig, QueueError, Segs,
};
use virtio_common::{RING_GPA, Rng, UVA_OFFSET, memory, pair, read, ring_end};

const BLOCK: u64 = 1024;

#[derive(Debug, Clone)]
struct Posted {
    id: u16,
    seq: u64,
    bufs: Vec<(u64, u32, bool)>,
    indirect: bool,
}

fn rbyte(seq: u64, seg: usize, i: usize) -> u8 {
    (seq.wrapping_mul(31) as usize + seg * 7 + i) as u8
}

fn wbyte(seq: u64, i: usize) -> u8 {
    (seq.wrapping_mul(13) as usize + i + 0x55) as u8
}

struct Harness {
    mem: GuestMemory,
    drv: DriverQueue,
    dev: DeviceQueue,
    segs: Segs,
    rng: Rng,
    size: u16,
    buf_base: u64,
    indirect: bool,
    seq: u64,
    avail: VecDeque<Posted>,
    used: VecDeque<(Posted, u32)>,
    completed: u64,
    /// IN_ORDER negotiated (the device then batches its used entries).
    in_order: bool,
    /// Chains the device's used batching must have left without an entry of their own.
    expect_implied: u64,
}

impl Harness {
    fn new(size: u16, features: u64, seed: u64) -> Harness {
        let packed = features & VIRTIO_F_RING_PACKED != 0;
        let buf_base = ring_end(size, packed);
        let total = buf_base + u64::from(size) * BLOCK;
        let mem = memory(&[(0, total as usize)]);
        let (drv, mut dev) = pair(&mem, size, features);
        let in_order = features & VIRTIO_F_IN_ORDER != 0;
        dev.set_used_batching(in_order);
        Harness {
            mem,
            drv,
            dev,
            segs: Segs::new(),
            rng: Rng(seed),
            size,
            buf_base,
            indirect: features & VIRTIO_F_RING_INDIRECT_DESC != 0,
            seq: 0,
            avail: VecDeque::new(),
            used: VecDeque::new(),
            completed: 0,
            in_order,
            expect_implied: 0,
        }
    }

    /// Split + IN_ORDER: a chain's descriptors are consecutive in the table (x, x + 1, ...),
    /// as the spec requires of drivers.
    fn check_sequential(&self, head: u16, n: usize) {
        for i in 0..n.saturating_sub(1) {
            let idx = head as u64 + i as u64;
            let d = read(&self.mem, RING_GPA + 16 * idx, 16);
            let next = u16::from_le_bytes([d[14], d[15]]);
            assert_eq!(
                u64::from(next),
                idx + 1,
                "descriptor {idx} of the chain at {head} links {next}"
            );
        }
    }

    /// A random chain shape for the next sequence number: buffers inside its block.
    fn shape(&mut self) -> (Vec<(u64, u32, bool)>, bool) {
        let indirect = self.indirect && self.rng.below(4) == 0;
        let max = if indirect {
            8
        } else {
            u64::from(self.size.min(8))
        };
        let n = 1 + self.rng.below(max) as usize;
        let readable = self.rng.below(n as u64 + 1) as usize;
        let block = self.buf_base + (self.seq % u64::from(self.size)) * BLOCK;
        let bufs = (0..n)
            .map(|i| {
                let len = if self.rng.below(8) == 0 {
                    0
                } else {
                    1 + self.rng.below(64) as u32
                };
                (block + 64 * i as u64, len, i >= readable)
            })
            .collect();
        (bufs, indirect)
    }

    fn post_burst(&mut self) {
        let burst = 1 + self.rng.below(32);
        let mut added = Vec::new();
        for _ in 0..burst {
            let (bufs, indirect) = self.shape();
            let need = if indirect { 1 } else { bufs.len() as u16 };
            if self.drv.free_count() < need {
                break;
            }
            let seq = self.seq;
            for (i, &(gpa, len, w)) in bufs.iter().enumerate() {
                if !w {
                    let data: Vec<u8> = (0..len as usize).map(|k| rbyte(seq, i, k)).collect();
                    self.mem.write(gpa, &data).unwrap();
                }
            }
            let id = if indirect {
                let table = self.buf_base + (seq % u64::from(self.size)) * BLOCK + 512;
                self.drv.add_indirect(&self.mem, &bufs, table).unwrap()
            } else {
                // With IN_ORDER a split chain may have to start over at descriptor 0.
                match self.drv.add(&bufs) {
                    Ok(id) => id,
                    Err(QueueError::QueueFull { .. }) if self.in_order => break,
                    Err(e) => panic!("add: {e}"),
                }
            };
            if self.in_order && !indirect && !self.dev.is_packed() {
                self.check_sequential(id, bufs.len());
            }
            self.seq += 1;
            added.push(Posted {
                id,
                seq,
                bufs,
                indirect,
            });
        }
        if self.avail.is_empty() {
            // Added but not published: the device sees nothing.
            assert_eq!(self.dev.avail_count(), 0);
            assert!(self.dev.pop(&self.mem, &mut self.segs).unwrap().is_none());
        }
        self.drv.publish_avail();
        self.avail.extend(added);
    }

    fn check_chain(&mut self, p: &Posted, c: &Chain) {
        assert_eq!(c.id, p.id, "id of seq {}", p.seq);
        let descs = if p.indirect { 1 } else { p.bufs.len() as u16 };
        assert_eq!(c.descs, descs);
        let rsum: u32 = p.bufs.iter().filter(|b| !b.2).map(|b| b.1).sum();
        let wsum: u32 = p.bufs.iter().filter(|b| b.2).map(|b| b.1).sum();
        assert_eq!((c.readable, c.writable), (rsum, wsum));
        let want: Vec<_> = p.bufs.iter().filter(|b| b.1 != 0).copied().collect();
        let got: Vec<_> = self
            .segs
            .as_slice()
            .iter()
            .map(|s| (s.gpa(), s.len(), s.is_writable()))
            .collect();
        assert_eq!(got, want, "segments of seq {}", p.seq);
        for s in self.segs.as_slice() {
            assert_eq!(
                Some(s.host()),
                self.mem.gpa_to_host(s.gpa(), u64::from(s.len()))
            );
        }
        assert_eq!(
            self.segs.readable().len() + self.segs.writable().len(),
            want.len()
        );
        // The readable bytes, gathered.
        let mut data = vec![0u8; rsum as usize + 3];
        assert_eq!(self.segs.read(0, &mut data), rsum as usize);
        let expect: Vec<u8> = p
            .bufs
            .iter()
            .enumerate()
            .filter(|(_, b)| !b.2)
            .flat_map(|(i, b)| (0..b.1 as usize).map(move |k| rbyte(p.seq, i, k)))
            .collect();
        assert_eq!(&data[..rsum as usize], &expect[..]);
    }

    fn device_step(&mut self) {
        let count = self.dev.avail_count() as usize;
        let expect = if self.dev.is_packed() {
            self.avail.len().min(512)
        } else {
            self.avail.len()
        };
        assert_eq!(count, expect);
        let k = if self.rng.below(2) == 0 {
            self.avail.len()
        } else {
            self.rng.below(self.avail.len() as u64 + 1) as usize
        };
        for _ in 0..k {
            let p = self.avail.pop_front().unwrap();
            let c = self
                .dev
                .pop(&self.mem, &mut self.segs)
                .unwrap()
                .expect("a chain");
            self.check_chain(&p, &c);
            // In order, half the chains are filled completely: those the device may batch.
            let written = if self.in_order && self.rng.below(2) == 0 {
                c.writable
            } else {
                self.rng.below(u64::from(c.writable) + 1) as u32
            };
            let data: Vec<u8> = (0..written as usize).map(|i| wbyte(p.seq, i)).collect();
            assert_eq!(self.segs.write(0, &data), written as usize);
            self.dev.push_used(&c, written);
            self.used.push_back((p, written));
        }
        if self.in_order {
            // The device writes its used entries in groups of 64 (its shadow) and at publish;
            // in each group, a completely used chain followed by another gets no entry.
            let staged: Vec<bool> = self
                .used
                .iter()
                .skip(self.used.len() - k)
                .map(|(p, w)| *w == p.bufs.iter().filter(|b| b.2).map(|b| b.1).sum::<u32>())
                .collect();
            for group in staged.chunks(64) {
                let n = group.len();
                self.expect_implied += group[..n - 1].iter().filter(|&&f| f).count() as u64;
            }
        }
        if self.avail.is_empty() {
            assert!(self.dev.pop(&self.mem, &mut self.segs).unwrap().is_none());
        }
        if self.used.len() == k && k > 0 {
            // Staged but not published: the driver reaps nothing.
            assert_eq!(self.drv.reap().unwrap(), None);
        }
        self.dev.publish_used();
    }

    fn driver_step(&mut self) {
        let k = self.rng.below(self.used.len() as u64 + 1) as usize;
        for _ in 0..k {
            let (p, written) = self.used.pop_front().unwrap();
            let got = self.drv.reap().unwrap().expect("a used entry");
            assert_eq!(got, (p.id, written), "used entry of seq {}", p.seq);
            let mut data = Vec::new();
            for &(gpa, len, w) in &p.bufs {
                if w {
                    data.extend(read(&self.mem, gpa, len as usize));
                }
            }
            let expect: Vec<u8> = (0..written as usize).map(|i| wbyte(p.seq, i)).collect();
            assert_eq!(&data[..written as usize], &expect[..]);
            self.completed += 1;
        }
        if self.used.is_empty() {
            assert_eq!(self.drv.reap().unwrap(), None);
        }
    }

    fn run(&mut self, target: u64) {
        while self.completed < target {
            match self.rng.below(3) {
                0 => self.post_burst(),
                1 => self.device_step(),
                _ => self.driver_step(),
            }
        }
        // Drain.
        self.device_step_all();
        while !self.used.is_empty() {
            self.driver_step();
        }
        assert_eq!(self.drv.free_count(), self.size);
        assert_eq!(self.drv.implied(), self.expect_implied, "implied chains");
        if self.in_order && self.size > 1 {
            assert!(self.expect_implied > 0, "the device never batched");
        }
    }

    fn device_step_all(&mut self) {
        while !self.avail.is_empty() {
            self.device_step();
        }
    }
}

fn roundtrip(size: u16, features: u64) {
    let target = 70_000u64.max(4 * u64::from(size));
    let mut h = Harness::new(size, features, 0x1234_5678 ^ u64::from(size) ^ features);
    h.run(target);
}

const EV_IND: u64 = VIRTIO_F_VERSION_1 | VIRTIO_F_RING_EVENT_IDX | VIRTIO_F_RING_INDIRECT_DESC;

#[test]
fn split_roundtrip_size_1() {
    roundtrip(1, EV_IND);
}

#[test]
fn split_roundtrip_size_2() {
    roundtrip(2, EV_IND);
}

#[test]
fn split_roundtrip_size_4_plain() {
    roundtrip(4, VIRTIO_F_VERSION_1);
}

#[test]
fn split_roundtrip_size_256() {
    roundtrip(256, EV_IND);
}

#[test]
fn split_roundtrip_size_32768() {
    roundtrip(32768, EV_IND);
}

const IN_ORDER: u64 = EV_IND | VIRTIO_F_IN_ORDER;

#[test]
fn split_in_order_batched_roundtrip_size_1() {
    roundtrip(1, IN_ORDER);
}

#[test]
fn split_in_order_batched_roundtrip_size_8() {
    roundtrip(8, IN_ORDER);
}

#[test]
fn split_in_order_batched_roundtrip_size_256() {
    roundtrip(256, IN_ORDER);
}

#[test]
fn split_in_order_batched_roundtrip_size_4_plain() {
    roundtrip(4, VIRTIO_F_VERSION_1 | VIRTIO_F_IN_ORDER);
}

#[test]
fn packed_in_order_batched_roundtrip_size_1() {
    roundtrip(1, IN_ORDER | VIRTIO_F_RING_PACKED);
}

#[test]
fn packed_in_order_batched_roundtrip_size_3() {
    roundtrip(3, IN_ORDER | VIRTIO_F_RING_PACKED);
}

#[test]
fn packed_in_order_batched_roundtrip_size_100() {
    roundtrip(100, IN_ORDER | VIRTIO_F_RING_PACKED);
}

#[test]
fn packed_in_order_batched_roundtrip_size_256() {
    roundtrip(256, IN_ORDER | VIRTIO_F_RING_PACKED);
}

#[test]
fn packed_roundtrip_size_1() {
    roundtrip(1, EV_IND | VIRTIO_F_RING_PACKED);
}

#[test]
fn packed_roundtrip_size_2() {
    roundtrip(2, EV_IND | VIRTIO_F_RING_PACKED);
}

#[test]
fn packed_roundtrip_size_3() {
    roundtrip(3, EV_IND | VIRTIO_F_RING_PACKED);
}

#[test]
fn packed_roundtrip_size_4_plain() {
    roundtrip(4, VIRTIO_F_VERSION_1 | VIRTIO_F_RING_PACKED);
}

#[test]
fn packed_roundtrip_size_100() {
    roundtrip(100, EV_IND | VIRTIO_F_RING_PACKED);
}

#[test]
fn packed_roundtrip_size_256() {
    roundtrip(256, EV_IND | VIRTIO_F_RING_PACKED);
}

#[test]
fn packed_roundtrip_size_32768() {
    roundtrip(32768, EV_IND | VIRTIO_F_RING_PACKED);
}

/// The device completes chains in reverse order; the driver reaps them in completion order and
/// gets every descriptor back.
fn out_of_order(features: u64) {
    let size = 8;
    let mem = memory(&[(0, 0x20_0000)]);
    let (mut drv, mut dev) = pair(&mem, size, features);
    let mut segs = Segs::new();
    for round in 0..50u64 {
        let mut ids = Vec::new();
        // Chains of 1, 2 and 3 descriptors (6 of 8 slots).
        for n in 1..=3u64 {
            let bufs: Vec<_> = (0..n)
                .map(|i| (0x10_0000 + 0x100 * (n * 4 + i), 16, i > 0))
                .collect();
            ids.push(drv.add(&bufs).unwrap());
        }
        assert_eq!(drv.free_count(), 2);
        drv.publish_avail();
        let mut chains = Vec::new();
        while let Some(c) = dev.pop(&mem, &mut segs).unwrap() {
            chains.push(c);
        }
        assert_eq!(chains.iter().map(|c| c.id).collect::<Vec<_>>(), ids);
        for (k, c) in chains.iter().enumerate().rev() {
            dev.push_used(c, k as u32 + round as u32);
        }
        dev.publish_used();
        for (k, id) in ids.iter().enumerate().rev() {
            assert_eq!(drv.reap().unwrap(), Some((*id, k as u32 + round as u32)));
        }
        assert_eq!(drv.reap().unwrap(), None);
        assert_eq!(drv.free_count(), size);
    }
}

#[test]
fn split_out_of_order_completion() {
    out_of_order(VIRTIO_F_VERSION_1);
}

#[test]
fn packed_out_of_order_completion() {
    out_of_order(VIRTIO_F_VERSION_1 | VIRTIO_F_RING_PACKED);
}

/// Nothing is visible to the other side before the publish, for a whole burst.
fn burst_visibility(features: u64) {
    let mem = memory(&[(0, 0x20_0000)]);
    let (mut drv, mut dev) = pair(&mem, 64, features);
    let mut segs = Segs::new();
    for _ in 0..3 {
        for i in 0..32u64 {
            drv.add(&[(0x10_0000 + 64 * i, 64, true)]).unwrap();
            assert_eq!(dev.avail_count(), 0);
            assert_eq!(dev.pop(&mem, &mut segs).unwrap(), None);
        }
        drv.publish_avail();
        assert_eq!(dev.avail_count(), 32);
        let mut chains = Vec::new();
        for _ in 0..32 {
            let c = dev.pop(&mem, &mut segs).unwrap().unwrap();
            dev.push_used(&c, 7);
            chains.push(c);
            assert_eq!(drv.reap().unwrap(), None);
        }
        assert_eq!(dev.pop(&mem, &mut segs).unwrap(), None);
        assert_eq!(drv.reap().unwrap(), None);
        assert!(dev.publish_used() || features & VIRTIO_F_RING_EVENT_IDX != 0);
        for c in &chains {
            assert_eq!(drv.reap().unwrap(), Some((c.id, 7)));
        }
        assert_eq!(drv.reap().unwrap(), None);
        // Publishing nothing publishes nothing and asks for no notification.
        assert!(!dev.publish_used());
        assert!(!drv.publish_avail());
    }
}

#[test]
fn split_burst_visibility() {
    burst_visibility(VIRTIO_F_VERSION_1);
}

#[test]
fn packed_burst_visibility() {
    burst_visibility(VIRTIO_F_VERSION_1 | VIRTIO_F_RING_PACKED);
}

/// A buffer crossing from one region into the adjacent one becomes two segments; gather and
/// scatter cross the seam.
fn spanning_buffer(features: u64) {
    let mem = memory(&[(0, 0x10_0000), (0x10_0000, 0x10_0000)]);
    let (mut drv, mut dev) = pair(&mem, 16, features);
    let mut segs = Segs::new();
    let data: Vec<u8> = (0..200u32).map(|i| i as u8).collect();
    mem.write(0x10_0000 - 100, &data).unwrap();
    let id = drv
        .add(&[(0x10_0000 - 100, 200, false), (0xf_f000, 0x2000, true)])
        .unwrap();
    drv.publish_avail();
    let c = dev.pop(&mem, &mut segs).unwrap().unwrap();
    assert_eq!(c.id, id);
    assert_eq!((c.readable, c.writable), (200, 0x2000));
    let got: Vec<_> = segs
        .as_slice()
        .iter()
        .map(|s| (s.gpa(), s.len(), s.is_writable()))
        .collect();
    assert_eq!(
        got,
        vec![
            (0x10_0000 - 100, 100, false),
            (0x10_0000, 100, false),
            (0xf_f000, 0x1000, true),
            (0x10_0000, 0x1000, true),
        ]
    );
    let mut back = vec![0u8; 200];
    assert_eq!(segs.read(0, &mut back), 200);
    assert_eq!(back, data);
    let mut part = vec![0u8; 50];
    assert_eq!(segs.read(80, &mut part), 50);
    assert_eq!(part, data[80..130]);
    let out: Vec<u8> = (0..0x2000u32).map(|i| (i * 3) as u8).collect();
    assert_eq!(segs.write(0, &out), 0x2000);
    assert_eq!(segs.write(0x1ff0, &out), 0x10);
    dev.push_used(&c, 0x2000);
    dev.publish_used();
    assert_eq!(drv.reap().unwrap(), Some((id, 0x2000)));
    let mut expect = out.clone();
    expect[0x1ff0..].copy_from_slice(&out[..0x10]);
    assert_eq!(read(&mem, 0xf_f000, 0x2000), expect);
}

#[test]
fn split_spanning_buffer() {
    spanning_buffer(VIRTIO_F_VERSION_1);
}

#[test]
fn packed_spanning_buffer() {
    spanning_buffer(VIRTIO_F_VERSION_1 | VIRTIO_F_RING_PACKED);
}

/// Zero-length descriptors count in the chain but produce no segment.
fn zero_length(features: u64) {
    let mem = memory(&[(0, 0x20_0000)]);
    let (mut drv, mut dev) = pair(&mem, 8, features);
    let mut segs = Segs::new();
    let id = drv
        .add(&[
            (0, 0, false),
            (0x10_0000, 10, false),
            (0xdead_0000_0000, 0, true),
            (0x10_1000, 20, true),
            (0x10_2000, 0, true),
        ])
        .unwrap();
    drv.publish_avail();
    let c = dev.pop(&mem, &mut segs).unwrap().unwrap();
    assert_eq!(
        c,
        Chain {
            id,
            descs: 5,
            readable: 10,
            writable: 20
        }
    );
    assert_eq!(segs.len(), 2);
    assert_eq!(segs.readable()[0].gpa(), 0x10_0000);
    assert_eq!(segs.writable()[0].gpa(), 0x10_1000);
    // A chain of only zero-length buffers.
    drv.add(&[(0, 0, false)]).unwrap();
    drv.publish_avail();
    let c = dev.pop(&mem, &mut segs).unwrap().unwrap();
    assert_eq!((c.descs, c.readable, c.writable), (1, 0, 0));
    assert!(segs.is_empty());
}

#[test]
fn split_zero_length_descriptors() {
    zero_length(VIRTIO_F_VERSION_1);
}

#[test]
fn packed_zero_length_descriptors() {
    zero_length(VIRTIO_F_VERSION_1 | VIRTIO_F_RING_PACKED);
}

/// GET_VRING_BASE / SET_VRING_BASE: a new device restored from `last_avail` continues where the
/// old one stopped (packed: across a wrap, bit 15 = wrap counter).
fn restore(features: u64) {
    let size = 4;
    let mem = memory(&[(0, 0x20_0000)]);
    let (mut drv, mut dev) = pair(&mem, size, features);
    let mut segs = Segs::new();
    let cfg = QueueConfig::at(RING_GPA, size, features);
    let mut expect_base = Vec::new();
    for round in 0..7u16 {
        for _ in 0..3 {
            let id = drv.add(&[(0x10_0000, 8, true)]).unwrap();
            drv.publish_avail();
            let c = dev.pop(&mem, &mut segs).unwrap().unwrap();
            assert_eq!(c.id, id);
            dev.push_used(&c, u32::from(round));
            dev.publish_used();
            assert_eq!(drv.reap().unwrap(), Some((id, u32::from(round))));
        }
        let base = dev.last_avail();
        expect_base.push(base);
        dev = DeviceQueue::new(&cfg, &mem).unwrap();
        dev.set_last_avail(base).unwrap();
        assert_eq!(dev.last_avail(), base);
    }
    if features & VIRTIO_F_RING_PACKED != 0 {
        // 3 slots per round on a ring of 4: position 3k mod 4, wrap flips every 4.
        let want: Vec<u16> = (1..=7u16)
            .map(|k| {
                let n = 3 * k;
                let wrap = (n / 4) % 2 == 0;
                (n % 4) | if wrap { 0x8000 } else { 0 }
            })
            .collect();
        assert_eq!(expect_base, want);
        assert!(matches!(
            dev.set_last_avail(4),
            Err(QueueError::InvalidRingPosition { value: 4, size: 4 })
        ));
    } else {
        assert_eq!(expect_base, (1..=7).map(|k| 3 * k).collect::<Vec<u16>>());
    }
}

#[test]
fn split_restore_from_last_avail() {
    restore(VIRTIO_F_VERSION_1);
}

#[test]
fn packed_restore_from_last_avail() {
    restore(VIRTIO_F_VERSION_1 | VIRTIO_F_RING_PACKED);
}

/// `rewind` gives the last popped chain back (packed: across the wrap).
fn rewind(features: u64) {
    let mem = memory(&[(0, 0x20_0000)]);
    let (mut drv, mut dev) = pair(&mem, 4, features);
    let mut segs = Segs::new();
    for round in 0..10u64 {
        let bufs = [(0x10_0000, 8, false), (0x10_1000 + round, 8, true)];
        let id = drv.add(&bufs).unwrap();
        drv.publish_avail();
        let before = dev.last_avail();
        let c = dev.pop(&mem, &mut segs).unwrap().unwrap();
        dev.rewind(&c);
        assert_eq!(dev.last_avail(), before);
        let again = dev.pop(&mem, &mut segs).unwrap().unwrap();
        assert_eq!(again, c);
        assert_eq!(c.id, id);
        assert_eq!(segs.writable()[0].gpa(), 0x10_1000 + round);
        dev.push_used(&c, 1);
        dev.publish_used();
        assert_eq!(drv.reap().unwrap(), Some((id, 1)));
    }
}

#[test]
fn split_rewind() {
    rewind(VIRTIO_F_VERSION_1);
}

#[test]
fn packed_rewind() {
    rewind(VIRTIO_F_VERSION_1 | VIRTIO_F_RING_PACKED);
}

/// The device side with front-end virtual ring addresses (vhost-user) against a driver using
/// GPAs.
fn uva_rings(features: u64) {
    let size = 16;
    let mem = memory(&[(0, 0x10_0000), (0x10_0000, 0x10_0000)]);
    let gcfg = QueueConfig::at(RING_GPA, size, features);
    let mut drv = DriverQueue::new(&gcfg, &mem).unwrap();
    let ucfg = QueueConfig {
        desc: gcfg.desc + UVA_OFFSET,
        avail: gcfg.avail + UVA_OFFSET,
        used: gcfg.used + UVA_OFFSET,
        addr_kind: AddrKind::Uva,
        ..gcfg
    };
    let mut dev = DeviceQueue::new(&ucfg, &mem).unwrap();
    let mut segs = Segs::new();
    for i in 0..100u64 {
        let id = drv.add(&[(0x10_0000 + i * 16, 16, false)]).unwrap();
        drv.publish_avail();
        let c = dev.pop(&mem, &mut segs).unwrap().unwrap();
        assert_eq!(c.id, id);
        assert_eq!(segs.readable()[0].gpa(), 0x10_0000 + i * 16);
        dev.push_used(&c, 0);
        dev.publish_used();
        assert_eq!(drv.reap().unwrap(), Some((id, 0)));
    }
    // A GPA is not a UVA.
    let bad = QueueConfig {
        addr_kind: AddrKind::Uva,
        ..gcfg
    };
    assert!(matches!(
        DeviceQueue::new(&bad, &mem),
        Err(QueueError::RingNotInMemory { kind: "uva", .. })
    ));
}

#[test]
fn split_uva_ring_addresses() {
    uva_rings(VIRTIO_F_VERSION_1);
}

#[test]
fn packed_uva_ring_addresses() {
    uva_rings(VIRTIO_F_VERSION_1 | VIRTIO_F_RING_PACKED);
}

/// Driver-side limits: empty chains, full rings, indirect without the feature.
#[test]
fn driver_limits() {
    for features in [
        VIRTIO_F_VERSION_1,
        VIRTIO_F_VERSION_1 | VIRTIO_F_RING_PACKED,
    ] {
        let mem = memory(&[(0, 0x20_0000)]);
        let (mut drv, _dev) = pair(&mem, 4, features);
        assert!(matches!(drv.add(&[]), Err(QueueError::EmptyChain)));
        assert!(matches!(
            drv.add(&[(0x10_0000, 1, false); 5]),
            Err(QueueError::QueueFull { needed: 5, free: 4 })
        ));
        drv.add(&[(0x10_0000, 1, false); 3]).unwrap();
        assert!(matches!(
            drv.add(&[(0x10_0000, 1, false); 2]),
            Err(QueueError::QueueFull { needed: 2, free: 1 })
        ));
        assert!(matches!(
            drv.add_indirect(&mem, &[(0x10_0000, 1, false)], 0x18_0000),
            Err(QueueError::IndirectUnsupported { len: 1 })
        ));
        assert_eq!(drv.free_count(), 1);
    }
}

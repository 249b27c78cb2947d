//! The split ring cross-checked against an independent implementation: rust-vmm's
//! `virtio-queue` (its `Queue` device model and its `MockSplitQueue` driver-side builder) over
//! `vm-memory` guest memory, which is wrapped as our [`GuestMemory`] (the same bytes).
//!
//! - Device side: identical chains are built in two memories; virtio-queue's `Queue` pops and
//!   completes in one, our `SplitDevice` in the other. Popped chains, used ring bytes, notification
//!   decisions (EVENT_IDX) and notification suppression fields must match exactly.
//! - Driver side: our `SplitDriver` posts chains that virtio-queue's `Queue` pops and completes.

mod virtio_common;

use std::sync::Arc;

use vdpakit_core::virtio::features::{
    VIRTIO_F_RING_EVENT_IDX, VIRTIO_F_RING_INDIRECT_DESC, VIRTIO_F_VERSION_1,
};
use vdpakit_core::virtio::vring::{VIRTQ_DESC_F_INDIRECT, VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_WRITE};
use vdpakit_core::virtio::{
    AddrKind, GuestMemory, GuestRegion, QueueConfig, Segs, SplitDevice, SplitDriver,
};
use virtio_common::Rng;
use virtio_queue::desc::{RawDescriptor, split::Descriptor as SplitDescriptor};
use virtio_queue::mock::{DescriptorTable, MockSplitQueue};
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

type Vm = GuestMemoryMmap<()>;

const MEM: usize = 0x100_0000;
const RING: u64 = 0x1_0000;
const TABLES: u64 = 0x80_0000;
/// The used ring, apart from the mock's rings (see `device_oracle`).
const USED: u64 = 0x4_0000;
const BUFS: u64 = 0x40_0000;

fn vm(size: usize) -> Arc<Vm> {
    Arc::new(Vm::from_ranges(&[(GuestAddress(0), size)]).unwrap())
}

/// The same bytes as our guest memory (GPA 0, UVA 0).
fn ours(vm: &Arc<Vm>, size: usize) -> GuestMemory {
    let host = vm.get_host_address(GuestAddress(0)).unwrap();
    // SAFETY: vm-memory maps `size` bytes at GPA 0 contiguously at `host`; the region keeps the
    // `Arc` of that mapping alive, and both sides only access it with raw copies/atomics.
    let r = unsafe { GuestRegion::from_raw(host, size as u64, 0, 0, Some(vm.clone())) };
    GuestMemory::new(vec![r]).unwrap()
}

fn raw(addr: u64, len: u32, flags: u16, next: u16) -> RawDescriptor {
    RawDescriptor::from(SplitDescriptor::new(addr, len, flags, next))
}

fn shuffle<T>(v: &mut [T], rng: &mut Rng) {
    for i in (1..v.len()).rev() {
        v.swap(i, rng.below(i as u64 + 1) as usize);
    }
}

/// A random buffer: (addr, len), zero-length sometimes.
fn buffer(rng: &mut Rng) -> (u64, u32) {
    let len = if rng.below(10) == 0 {
        0
    } else {
        1 + rng.below(4096) as u32
    };
    (BUFS + rng.below(0x30_0000), len)
}

fn device_oracle(size: u16, event_idx: bool, rounds: usize, seed: u64) {
    let (a, b) = (vm(MEM), vm(MEM));
    let vqa = MockSplitQueue::create(&*a, GuestAddress(RING), size);
    let vqb = MockSplitQueue::create(&*b, GuestAddress(RING), size);
    let mut qa: Queue = vqa.create_queue().unwrap();
    // The mock places the used ring right after the avail ring, leaving no room for
    // `used_event`: writing it would overwrite the used ring. Both sides get a used ring of its
    // own instead, as a real driver lays them out.
    qa.set_used_ring_address(Some(USED as u32), Some((USED >> 32) as u32));
    assert_eq!(
        qa.used_ring(),
        USED,
        "virtio-queue took the used ring address"
    );
    qa.set_event_idx(event_idx);
    let mem_b = ours(&b, MEM);
    let mut features = VIRTIO_F_VERSION_1 | VIRTIO_F_RING_INDIRECT_DESC;
    if event_idx {
        features |= VIRTIO_F_RING_EVENT_IDX;
    }
    let cfg = QueueConfig {
        size,
        desc: vqb.desc_table_addr().0,
        avail: vqb.avail_addr().0,
        used: USED,
        addr_kind: AddrKind::Gpa,
        features,
    };
    let mut dev = SplitDevice::new(&cfg, &mem_b).unwrap();
    let mut segs = Segs::new();
    let mut rng = Rng(seed);
    let used_len = 4 + 8 * usize::from(size);
    let used_event = GuestAddress(cfg.avail + 4 + 2 * u64::from(size));
    let mut avail_idx: u16 = 0;
    let mut notifications = 0;
    let mut publishes = 0;

    for round in 0..rounds {
        // --- the driver (virtio-queue's mock helpers) builds the same chains in both memories
        let mut perm: Vec<u16> = (0..size).collect();
        shuffle(&mut perm, &mut rng);
        let mut pos = 0usize;
        let mut expected = Vec::new();
        let nchains = 1 + rng.below(u64::from(size)) as usize;
        for c in 0..nchains {
            if pos == usize::from(size) {
                break;
            }
            let n = 1 + rng.below(6) as usize;
            let readable = rng.below(n as u64 + 1) as usize;
            let bufs: Vec<(u64, u32, bool)> = (0..n)
                .map(|i| {
                    let (addr, len) = buffer(&mut rng);
                    (addr, len, i >= readable)
                })
                .collect();
            let head = perm[pos];
            if rng.below(4) == 0 {
                pos += 1;
                let table = TABLES + (c as u64) * 0x1000;
                for m in [&*a, &*b] {
                    let t = DescriptorTable::new(m, GuestAddress(table), n as u16);
                    for (i, &(addr, len, w)) in bufs.iter().enumerate() {
                        let last = i + 1 == n;
                        let flags = (if w { VIRTQ_DESC_F_WRITE } else { 0 })
                            | if last { 0 } else { VIRTQ_DESC_F_NEXT };
                        let next = if last { 0 } else { i as u16 + 1 };
                        t.store(i as u16, raw(addr, len, flags, next)).unwrap();
                    }
                }
                let d = raw(table, 16 * n as u32, VIRTQ_DESC_F_INDIRECT, 0);
                vqa.desc_table().store(head, d).unwrap();
                vqb.desc_table().store(head, d).unwrap();
            } else {
                let n = n.min(usize::from(size) - pos);
                let idxs = &perm[pos..pos + n];
                pos += n;
                for i in 0..n {
                    let (addr, len, w) = bufs[i];
                    let last = i + 1 == n;
                    let flags = (if w { VIRTQ_DESC_F_WRITE } else { 0 })
                        | if last { 0 } else { VIRTQ_DESC_F_NEXT };
                    let next = if last { 0 } else { idxs[i + 1] };
                    let d = raw(addr, len, flags, next);
                    vqa.desc_table().store(idxs[i], d).unwrap();
                    vqb.desc_table().store(idxs[i], d).unwrap();
                }
            }
            let slot = usize::from(avail_idx % size);
            vqa.avail().ring().ref_at(slot).unwrap().store(head);
            vqb.avail().ring().ref_at(slot).unwrap().store(head);
            avail_idx = avail_idx.wrapping_add(1);
            expected.push(head);
        }
        vqa.avail().idx().store(avail_idx);
        vqb.avail().idx().store(avail_idx);

        // --- both devices pop
        assert_eq!(usize::from(dev.avail_count()), expected.len());
        let mut popped = Vec::new();
        loop {
            let theirs = qa.pop_descriptor_chain(&*a);
            let mine = dev.pop(&mem_b, &mut segs).unwrap();
            match (theirs, mine) {
                (None, None) => break,
                (Some(t), Some(c)) => {
                    assert_eq!(t.head_index(), c.id, "round {round}");
                    let descs: Vec<_> = t.collect();
                    let want: Vec<_> = descs
                        .iter()
                        .filter(|d| d.len() > 0)
                        .map(|d| (d.addr().0, d.len(), d.is_write_only()))
                        .collect();
                    let got: Vec<_> = segs
                        .as_slice()
                        .iter()
                        .map(|s| (s.gpa(), s.len(), s.is_writable()))
                        .collect();
                    assert_eq!(got, want, "round {round}, head {}", c.id);
                    let r: u32 = descs
                        .iter()
                        .filter(|d| !d.is_write_only())
                        .map(|d| d.len())
                        .sum();
                    let w: u32 = descs
                        .iter()
                        .filter(|d| d.is_write_only())
                        .map(|d| d.len())
                        .sum();
                    assert_eq!((c.readable, c.writable), (r, w));
                    popped.push(c);
                }
                (t, m) => panic!(
                    "round {round}: virtio-queue popped {:?}, we popped {m:?}",
                    t.map(|t| t.head_index())
                ),
            }
        }
        assert_eq!(
            popped.iter().map(|c| c.id).collect::<Vec<_>>(),
            expected,
            "round {round}"
        );

        // --- both complete, in a random order, publishing at random points
        shuffle(&mut popped, &mut rng);
        for (i, c) in popped.iter().enumerate() {
            let len = rng.below(5000) as u32;
            qa.add_used(&*a, c.id, len).unwrap();
            dev.push_used(c, len);
            if rng.below(3) == 0 || i + 1 == popped.len() {
                if event_idx && rng.below(2) == 0 {
                    // The driver moves used_event somewhere around the used index.
                    let ev = qa.next_used().wrapping_sub(rng.below(8) as u16);
                    a.write_obj(ev, used_event).unwrap();
                    b.write_obj(ev, used_event).unwrap();
                }
                let theirs = qa.needs_notification(&*a).unwrap();
                let mine = dev.publish_used();
                publishes += 1;
                if event_idx {
                    assert_eq!(mine, theirs, "round {round}: notification decision");
                    notifications += usize::from(mine);
                } else {
                    // No NO_INTERRUPT flag set by the driver: always notify.
                    assert!(mine);
                }
            }
        }
        let (mut ua, mut ub) = (vec![0u8; used_len], vec![0u8; used_len]);
        a.read_slice(&mut ua, GuestAddress(cfg.used)).unwrap();
        b.read_slice(&mut ub, GuestAddress(cfg.used)).unwrap();
        assert_eq!(ua, ub, "round {round}: used ring bytes");
        assert_eq!(dev.used_idx(), qa.next_used());
        assert_eq!(dev.last_avail(), qa.next_avail());

        // --- notification suppression fields
        let enable = rng.below(2) == 0;
        if enable {
            qa.enable_notification(&*a).unwrap();
            dev.set_notification(true);
        } else if !event_idx {
            qa.disable_notification(&*a).unwrap();
            dev.set_notification(false);
        }
        if enable || !event_idx {
            let n = used_len + if event_idx { 2 } else { 0 };
            let (mut ua, mut ub) = (vec![0u8; n], vec![0u8; n]);
            a.read_slice(&mut ua, GuestAddress(cfg.used)).unwrap();
            b.read_slice(&mut ub, GuestAddress(cfg.used)).unwrap();
            assert_eq!(ua, ub, "round {round}: used flags / avail_event");
        }
    }
    if event_idx {
        // The random used_event values made both decisions happen.
        assert!(notifications > 0 && notifications < publishes);
    }
}

#[test]
fn split_device_matches_virtio_queue_event_idx() {
    device_oracle(64, true, 400, 0x9e37_79b9_7f4a_7c15);
}

#[test]
fn split_device_matches_virtio_queue_plain() {
    device_oracle(32, false, 300, 0x0123_4567_89ab_cdef);
}

#[test]
fn split_device_matches_virtio_queue_small_rings() {
    for (size, seed) in [(1u16, 1u64), (2, 2), (4, 3), (8, 4)] {
        device_oracle(size, true, 2000, seed);
    }
}

#[test]
fn split_device_matches_virtio_queue_large_ring() {
    device_oracle(1024, true, 40, 77);
}

/// Chains built by the mock's own chain builders (`add_chain`, `add_indirect_chain`).
#[test]
fn split_device_pops_mock_built_chains() {
    let size = 32;
    let total = 0x4000_0000;
    let a = vm(total);
    let mut vq = MockSplitQueue::create(&*a, GuestAddress(0), size);
    let mut q: Queue = vq.create_queue().unwrap();
    let mem = ours(&a, total);
    let cfg = QueueConfig {
        size,
        desc: vq.desc_table_addr().0,
        avail: vq.avail_addr().0,
        used: vq.used_addr().0,
        addr_kind: AddrKind::Gpa,
        features: VIRTIO_F_VERSION_1 | VIRTIO_F_RING_INDIRECT_DESC,
    };
    let mut dev = SplitDevice::new(&cfg, &mem).unwrap();
    let mut segs = Segs::new();
    vq.add_chain(3).unwrap();
    vq.add_indirect_chain(5).unwrap();
    vq.add_chain(1).unwrap();
    vq.add_indirect_chain(16).unwrap();
    vq.add_indirect_chain(17).unwrap();
    let mut count = 0;
    while let Some(t) = q.pop_descriptor_chain(&*a) {
        let c = dev.pop(&mem, &mut segs).unwrap().unwrap();
        assert_eq!(c.id, t.head_index());
        let want: Vec<_> = t
            .map(|d| (d.addr().0, d.len(), d.is_write_only()))
            .collect();
        let got: Vec<_> = segs
            .as_slice()
            .iter()
            .map(|s| (s.gpa(), s.len(), s.is_writable()))
            .collect();
        assert_eq!(got, want);
        count += 1;
    }
    assert_eq!(count, 5);
    assert_eq!(dev.pop(&mem, &mut segs).unwrap(), None);
}

/// Our driver posts, virtio-queue's device pops and completes, our driver reaps.
fn driver_oracle(size: u16, event_idx: bool, seed: u64) {
    let a = vm(MEM);
    let mem = ours(&a, MEM);
    let mut features = VIRTIO_F_VERSION_1 | VIRTIO_F_RING_INDIRECT_DESC;
    if event_idx {
        features |= VIRTIO_F_RING_EVENT_IDX;
    }
    let cfg = QueueConfig::at(RING, size, features);
    let mut drv = SplitDriver::new(&cfg, &mem).unwrap();
    let mut q = Queue::new(size).unwrap();
    q.set_size(size);
    q.set_ready(true);
    q.set_desc_table_address(Some(cfg.desc as u32), Some((cfg.desc >> 32) as u32));
    q.set_avail_ring_address(Some(cfg.avail as u32), Some((cfg.avail >> 32) as u32));
    q.set_used_ring_address(Some(cfg.used as u32), Some((cfg.used >> 32) as u32));
    q.set_event_idx(event_idx);
    assert!(q.is_valid(&*a));
    let mut rng = Rng(seed);
    let mut table_slot = 0u64;
    for round in 0..500 {
        // Post a burst.
        let mut posted = Vec::new();
        for _ in 0..1 + rng.below(8) {
            let n = 1 + rng.below(4) as usize;
            let readable = rng.below(n as u64 + 1) as usize;
            let bufs: Vec<(u64, u32, bool)> = (0..n)
                .map(|i| {
                    let (addr, len) = buffer(&mut rng);
                    (addr, len, i >= readable)
                })
                .collect();
            let id = if rng.below(3) == 0 {
                table_slot = (table_slot + 1) % u64::from(size);
                match drv.add_indirect(&mem, &bufs, TABLES + table_slot * 0x100) {
                    Ok(id) => id,
                    Err(_) => break,
                }
            } else {
                match drv.add(&bufs) {
                    Ok(id) => id,
                    Err(_) => break,
                }
            };
            posted.push((id, bufs));
        }
        let kick = drv.publish_avail();
        if !posted.is_empty() && !event_idx {
            assert!(kick, "round {round}: no NO_NOTIFY set, so always kick");
        }
        // Their device pops exactly what we posted.
        let mut heads = Vec::new();
        for (id, bufs) in &posted {
            let t = q.pop_descriptor_chain(&*a).expect("a chain");
            assert_eq!(t.head_index(), *id);
            let got: Vec<_> = t
                .map(|d| (d.addr().0, d.len(), d.is_write_only()))
                .collect();
            assert_eq!(&got, bufs, "round {round}");
            heads.push(*id);
        }
        assert!(q.pop_descriptor_chain(&*a).is_none());
        shuffle(&mut heads, &mut rng);
        let lens: Vec<u32> = heads.iter().map(|_| rng.below(1 << 20) as u32).collect();
        for (h, l) in heads.iter().zip(&lens) {
            q.add_used(&*a, *h, *l).unwrap();
        }
        for (h, l) in heads.iter().zip(&lens) {
            assert_eq!(drv.reap().unwrap(), Some((*h, *l)), "round {round}");
        }
        assert_eq!(drv.reap().unwrap(), None);
        assert_eq!(drv.free_count(), size);
    }
    if event_idx {
        // Interrupt suppression as seen by their device: everything reaped and interrupts on,
        // so the next completion notifies; a second one does not.
        drv.set_interrupts(true);
        let id = drv.add(&[(BUFS, 1, true)]).unwrap();
        let id2 = drv.add(&[(BUFS, 1, true)]).unwrap();
        drv.publish_avail();
        let c = q.pop_descriptor_chain(&*a).unwrap().head_index();
        let c2 = q.pop_descriptor_chain(&*a).unwrap().head_index();
        assert_eq!((c, c2), (id, id2));
        q.add_used(&*a, c, 1).unwrap();
        assert!(q.needs_notification(&*a).unwrap());
        q.add_used(&*a, c2, 1).unwrap();
        assert!(!q.needs_notification(&*a).unwrap());
        drv.reap().unwrap().unwrap();
        drv.reap().unwrap().unwrap();
        // Interrupts off: no notification.
        drv.set_interrupts(false);
        let id = drv.add(&[(BUFS, 1, true)]).unwrap();
        drv.publish_avail();
        let c = q.pop_descriptor_chain(&*a).unwrap().head_index();
        assert_eq!(c, id);
        q.add_used(&*a, c, 1).unwrap();
        assert!(!q.needs_notification(&*a).unwrap());
        drv.reap().unwrap().unwrap();
        // Kick suppression as set by their device: enable -> kick once, then none.
        assert!(!q.enable_notification(&*a).unwrap());
        drv.add(&[(BUFS, 1, true)]).unwrap();
        assert!(drv.publish_avail());
        drv.add(&[(BUFS, 1, true)]).unwrap();
        assert!(!drv.publish_avail());
    } else {
        q.disable_notification(&*a).unwrap();
        drv.add(&[(BUFS, 1, true)]).unwrap();
        assert!(!drv.publish_avail());
        q.enable_notification(&*a).unwrap();
        drv.add(&[(BUFS, 1, true)]).unwrap();
        assert!(drv.publish_avail());
    }
}

#[test]
fn split_driver_against_virtio_queue_event_idx() {
    driver_oracle(64, true, 5);
}

#[test]
fn split_driver_against_virtio_queue_plain() {
    driver_oracle(16, false, 6);
}

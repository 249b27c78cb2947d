//! Hostile or broken drivers (and devices): every malformed ring is rejected with its own error,
//! never read outside guest memory, never panics; set-up errors name the offending value.

mod virtio_common;

use vdpakit_core::virtio::features::{
    VIRTIO_F_IN_ORDER, VIRTIO_F_RING_EVENT_IDX, VIRTIO_F_RING_INDIRECT_DESC, VIRTIO_F_RING_PACKED,
    VIRTIO_F_VERSION_1,
};
use vdpakit_core::virtio::vring::{
    VIRTQ_DESC_F_AVAIL, VIRTQ_DESC_F_INDIRECT, VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_USED,
    VIRTQ_DESC_F_WRITE,
};
use vdpakit_core::virtio::{
    DeviceQueue, DriverQueue, GuestMemory, QueueConfig, QueueError, SEGS_MAX, Segs,
};
use virtio_common::{RING_GPA, Rng, memory};

const F: u64 = VIRTIO_F_VERSION_1 | VIRTIO_F_RING_INDIRECT_DESC;
const N: u64 = VIRTQ_DESC_F_NEXT as u64;
const W: u64 = VIRTQ_DESC_F_WRITE as u64;
const I: u64 = VIRTQ_DESC_F_INDIRECT as u64;
/// First region [0, 1 MiB), a gap, second region [2 MiB, 3 MiB).
const END1: u64 = 0x10_0000;
const GAP: u64 = 0x18_0000;
const START2: u64 = 0x20_0000;
const END2: u64 = 0x30_0000;
const BUF: u64 = 0x8_0000;
const TABLE: u64 = 0xc_0000;

fn mem2() -> GuestMemory {
    memory(&[(0, END1 as usize), (START2, (END2 - START2) as usize)])
}

fn desc_bytes(addr: u64, len: u32, w12: u16, w14: u16) -> [u8; 16] {
    let mut b = [0u8; 16];
    b[..8].copy_from_slice(&addr.to_le_bytes());
    b[8..12].copy_from_slice(&len.to_le_bytes());
    b[12..14].copy_from_slice(&w12.to_le_bytes());
    b[14..].copy_from_slice(&w14.to_le_bytes());
    b
}

/// A split ring the test writes by hand.
struct Split {
    mem: GuestMemory,
    cfg: QueueConfig,
    dev: DeviceQueue,
    segs: Segs,
    avail: u16,
}

impl Split {
    fn new(size: u16, features: u64) -> Split {
        let mem = mem2();
        let cfg = QueueConfig::at(RING_GPA, size, features);
        let dev = DeviceQueue::new(&cfg, &mem).unwrap();
        Split {
            mem,
            cfg,
            dev,
            segs: Segs::new(),
            avail: 0,
        }
    }

    /// Descriptor `idx`: (addr, len, flags, next).
    fn desc(&self, idx: u16, addr: u64, len: u32, flags: u64, next: u16) {
        let b = desc_bytes(addr, len, flags as u16, next);
        self.mem
            .write(self.cfg.desc + 16 * u64::from(idx), &b)
            .unwrap();
    }

    /// An indirect table entry (split format) at `table`.
    fn entry(&self, table: u64, i: u16, addr: u64, len: u32, flags: u64, next: u16) {
        let b = desc_bytes(addr, len, flags as u16, next);
        self.mem.write(table + 16 * u64::from(i), &b).unwrap();
    }

    fn set_avail_idx(&self, idx: u16) {
        self.mem
            .write(self.cfg.avail + 2, &idx.to_le_bytes())
            .unwrap();
    }

    /// Makes `head` available.
    fn offer(&mut self, head: u16) {
        let slot = u64::from(self.avail % self.cfg.size);
        self.mem
            .write(self.cfg.avail + 4 + 2 * slot, &head.to_le_bytes())
            .unwrap();
        self.avail = self.avail.wrapping_add(1);
        self.set_avail_idx(self.avail);
    }

    fn pop(&mut self) -> Result<Option<vdpakit_core::virtio::Chain>, QueueError> {
        self.dev.pop(&self.mem, &mut self.segs)
    }

    fn pop_err(&mut self) -> QueueError {
        let e = self.pop().expect_err("a malformed chain must be rejected");
        // Errors do not move the device: the same chain fails again.
        let again = self.pop().expect_err("still rejected");
        assert_eq!(format!("{e}"), format!("{again}"));
        e
    }
}

#[test]
fn split_descriptor_loop() {
    let mut q = Split::new(8, F);
    q.desc(0, BUF, 16, N, 1);
    q.desc(1, BUF, 16, N, 0);
    q.offer(0);
    assert!(matches!(
        q.pop_err(),
        QueueError::ChainTooLong { head: 0, limit: 8 }
    ));
}

#[test]
fn split_descriptor_self_loop() {
    let mut q = Split::new(8, F);
    q.desc(3, BUF, 16, N | W, 3);
    q.offer(3);
    assert!(matches!(
        q.pop_err(),
        QueueError::ChainTooLong { head: 3, limit: 8 }
    ));
}

#[test]
fn split_chain_longer_than_ring() {
    // Every descriptor chains to the next and the last back to the first: a chain of more than
    // `size` descriptors.
    let mut q = Split::new(4, F);
    for i in 0..4 {
        q.desc(i, BUF, 1, N, (i + 1) % 4);
    }
    q.offer(2);
    assert!(matches!(
        q.pop_err(),
        QueueError::ChainTooLong { head: 2, limit: 4 }
    ));
}

#[test]
fn split_indirect_table_loop() {
    let mut q = Split::new(8, F);
    q.entry(TABLE, 0, BUF, 1, N, 1);
    q.entry(TABLE, 1, BUF, 1, N, 2);
    q.entry(TABLE, 2, BUF, 1, N, 1);
    q.entry(TABLE, 3, BUF, 1, 0, 0);
    q.desc(0, TABLE, 64, I, 0);
    q.offer(0);
    assert!(matches!(
        q.pop_err(),
        QueueError::ChainTooLong { head: 0, limit: 4 }
    ));
}

#[test]
fn split_nested_indirect() {
    let mut q = Split::new(8, F);
    q.entry(TABLE, 0, BUF, 1, N, 1);
    q.entry(TABLE, 1, TABLE + 0x100, 16, I, 0);
    q.entry(TABLE + 0x100, 0, BUF, 1, 0, 0);
    q.desc(5, TABLE, 32, I, 0);
    q.offer(5);
    assert!(matches!(
        q.pop_err(),
        QueueError::NestedIndirect { index: 1 }
    ));
}

#[test]
fn split_indirect_with_next() {
    let mut q = Split::new(8, F);
    q.entry(TABLE, 0, BUF, 1, 0, 0);
    q.desc(0, BUF, 1, N, 1);
    q.desc(1, TABLE, 16, I | N, 2);
    q.desc(2, BUF, 1, 0, 0);
    q.offer(0);
    assert!(matches!(
        q.pop_err(),
        QueueError::IndirectWithNext { index: 1 }
    ));
}

#[test]
fn split_indirect_table_lengths() {
    for len in [0u32, 8, 15, 24, 1000, 16 * 32768 + 16, !15] {
        let mut q = Split::new(8, F);
        q.desc(0, TABLE, len, I, 0);
        q.offer(0);
        match q.pop_err() {
            QueueError::IndirectTableLen { addr, len: l } => {
                assert_eq!((addr, l), (TABLE, len));
            }
            e => panic!("length {len}: {e}"),
        }
    }
    // 32768 entries is the largest table accepted (here it is not in memory).
    let mut q = Split::new(8, F);
    q.desc(0, END1 - 0x1000, 16 * 32768, I, 0);
    q.offer(0);
    assert!(matches!(
        q.pop_err(),
        QueueError::IndirectTableNotInMemory { .. }
    ));
}

#[test]
fn split_indirect_not_negotiated() {
    let mut q = Split::new(8, VIRTIO_F_VERSION_1);
    q.entry(TABLE, 0, BUF, 1, 0, 0);
    q.desc(0, TABLE, 16, I, 0);
    q.offer(0);
    assert!(matches!(
        q.pop_err(),
        QueueError::IndirectNotNegotiated { index: 0 }
    ));
}

#[test]
fn split_indirect_table_outside_memory() {
    for (addr, len) in [
        (GAP, 16),
        (END1 - 16, 32),
        (END2 - 32, 48),
        (u64::MAX - 15, 32),
    ] {
        let mut q = Split::new(8, F);
        q.desc(0, addr, len, I, 0);
        q.offer(0);
        match q.pop_err() {
            QueueError::IndirectTableNotInMemory { addr: a, len: l } => {
                assert_eq!((a, l), (addr, len));
            }
            e => panic!("table at {addr:#x}: {e}"),
        }
    }
}

#[test]
fn split_indirect_next_out_of_range() {
    let mut q = Split::new(8, F);
    q.entry(TABLE, 0, BUF, 1, N, 2);
    q.entry(TABLE, 1, BUF, 1, 0, 0);
    q.desc(0, TABLE, 32, I, 0);
    q.offer(0);
    assert!(matches!(
        q.pop_err(),
        QueueError::NextOutOfRange {
            index: 0,
            next: 2,
            limit: 2
        }
    ));
}

#[test]
fn split_buffer_address_overflow() {
    for (addr, len) in [
        (u64::MAX - 10, 100u32),
        (u64::MAX, 1),
        (u64::MAX - 0xfff, u32::MAX),
    ] {
        let mut q = Split::new(8, F);
        q.desc(0, addr, len, 0, 0);
        q.offer(0);
        match q.pop_err() {
            QueueError::BadBuffer {
                addr: a, len: l, ..
            } => assert_eq!((a, l), (addr, len)),
            e => panic!("{e}"),
        }
    }
}

#[test]
fn split_buffer_outside_regions() {
    for (addr, len) in [
        (GAP, 1u32),
        (END1 - 10, 100),
        (END2 - 10, 11),
        (END2, 1),
        (START2 - 1, 2),
        (0x1_0000_0000, 64),
    ] {
        let mut q = Split::new(8, F);
        q.desc(0, BUF, 8, N, 1);
        q.desc(1, addr, len, W, 0);
        q.offer(0);
        match q.pop_err() {
            QueueError::BadBuffer {
                addr: a, len: l, ..
            } => assert_eq!((a, l), (addr, len)),
            e => panic!("buffer at {addr:#x}: {e}"),
        }
    }
    // Exactly up to a region's end is fine.
    let mut q = Split::new(8, F);
    q.desc(0, END1 - 10, 10, 0, 0);
    q.offer(0);
    assert_eq!(q.pop().unwrap().unwrap().readable, 10);
}

#[test]
fn split_head_out_of_range() {
    for head in [8u16, 9, 0x7fff, 0xffff] {
        let mut q = Split::new(8, F);
        q.offer(head);
        match q.pop_err() {
            QueueError::HeadOutOfRange {
                slot,
                head: h,
                size,
            } => {
                assert_eq!((slot, h, size), (0, head, 8));
            }
            e => panic!("{e}"),
        }
    }
}

#[test]
fn split_next_out_of_range() {
    let mut q = Split::new(8, F);
    q.desc(0, BUF, 8, N, 8);
    q.offer(0);
    assert!(matches!(
        q.pop_err(),
        QueueError::NextOutOfRange {
            index: 0,
            next: 8,
            limit: 8
        }
    ));
}

#[test]
fn split_avail_idx_jump() {
    for idx in [9u16, 100, 0x8000, 0xffff] {
        let mut q = Split::new(8, F);
        q.set_avail_idx(idx);
        assert_eq!(q.dev.avail_count(), idx);
        match q.pop_err() {
            QueueError::AvailIdxJump {
                avail_idx,
                last_avail,
                ahead,
                size,
            } => assert_eq!((avail_idx, last_avail, ahead, size), (idx, 0, idx, 8)),
            e => panic!("{e}"),
        }
    }
    // Exactly a full ring ahead is fine.
    let mut q = Split::new(8, F);
    for i in 0..8 {
        q.desc(i, BUF, 1, 0, 0);
        q.offer(i);
    }
    for _ in 0..8 {
        q.pop().unwrap().unwrap();
    }
    assert_eq!(q.pop().unwrap(), None);
}

#[test]
fn split_readable_after_writable() {
    let mut q = Split::new(8, F);
    q.desc(0, BUF, 8, N, 1);
    q.desc(1, BUF, 8, W | N, 2);
    q.desc(2, BUF, 8, 0, 0);
    q.offer(0);
    assert!(matches!(
        q.pop_err(),
        QueueError::ReadableAfterWritable { index: 2 }
    ));
    // Also inside an indirect table, and with a zero-length writable descriptor.
    let mut q = Split::new(8, F);
    q.entry(TABLE, 0, BUF, 0, W | N, 1);
    q.entry(TABLE, 1, BUF, 4, 0, 0);
    q.desc(0, TABLE, 32, I, 0);
    q.offer(0);
    assert!(matches!(
        q.pop_err(),
        QueueError::ReadableAfterWritable { index: 1 }
    ));
}

#[test]
fn split_more_segments_than_segs() {
    let n = SEGS_MAX as u16 + 1;
    let mut q = Split::new(8, F);
    for i in 0..n {
        let last = i + 1 == n;
        q.entry(
            TABLE,
            i,
            BUF + u64::from(i),
            1,
            if last { 0 } else { N },
            i + 1,
        );
    }
    q.desc(0, TABLE, 16 * u32::from(n), I, 0);
    q.offer(0);
    assert!(matches!(
        q.pop_err(),
        QueueError::TooManySegs {
            head: 0,
            max: SEGS_MAX
        }
    ));
    // Exactly SEGS_MAX is fine.
    let mut q = Split::new(8, F);
    for i in 0..n - 1 {
        let last = i + 2 == n;
        q.entry(TABLE, i, BUF, 1, if last { 0 } else { N }, i + 1);
    }
    q.desc(0, TABLE, 16 * u32::from(n - 1), I, 0);
    q.offer(0);
    assert_eq!(q.pop().unwrap().unwrap().readable, SEGS_MAX as u32);
    assert_eq!(q.segs.len(), SEGS_MAX);
}

#[test]
fn split_chain_bytes_overflow() {
    // A 2 GiB + region so that a 2 GiB buffer is guest memory (never touched).
    let mem = memory(&[(0, 0x8010_0000)]);
    let cfg = QueueConfig::at(RING_GPA, 8, F);
    let mut q = Split {
        dev: DeviceQueue::new(&cfg, &mem).unwrap(),
        mem,
        cfg,
        segs: Segs::new(),
        avail: 0,
    };
    q.desc(0, 0x10_0000, 0x8000_0000, W | N, 1);
    q.desc(1, 0x10_0000, 0x8000_0000, W, 0);
    q.offer(0);
    assert!(matches!(
        q.pop_err(),
        QueueError::ChainBytesOverflow { head: 0 }
    ));
}

#[test]
fn split_errors_keep_position_and_broken_queues_stop() {
    let mut q = Split::new(8, F);
    q.desc(0, GAP, 8, 0, 0);
    q.offer(0);
    assert!(matches!(q.pop_err(), QueueError::BadBuffer { .. }));
    assert_eq!(q.dev.last_avail(), 0);
    // The driver fixes the descriptor: the device pops it now.
    q.desc(0, BUF, 8, 0, 0);
    assert_eq!(q.pop().unwrap().unwrap().readable, 8);
    assert_eq!(q.dev.last_avail(), 1);
    q.offer(0);
    q.dev.set_broken();
    assert!(q.dev.is_broken());
    assert_eq!(q.dev.avail_count(), 0);
    assert!(matches!(q.pop(), Err(QueueError::Broken)));
}

/// A packed ring the test writes by hand.
struct Packed {
    mem: GuestMemory,
    cfg: QueueConfig,
    dev: DeviceQueue,
    segs: Segs,
}

const AV: u64 = VIRTQ_DESC_F_AVAIL as u64;

impl Packed {
    fn new(size: u16, features: u64) -> Packed {
        let mem = mem2();
        let cfg = QueueConfig::at(RING_GPA, size, features | VIRTIO_F_RING_PACKED);
        let dev = DeviceQueue::new(&cfg, &mem).unwrap();
        Packed {
            mem,
            cfg,
            dev,
            segs: Segs::new(),
        }
    }

    /// Ring slot `slot`, made available for wrap counter 1.
    fn desc(&self, slot: u16, addr: u64, len: u32, id: u16, flags: u64) {
        let b = desc_bytes(addr, len, id, (flags | AV) as u16);
        self.mem
            .write(self.cfg.desc + 16 * u64::from(slot), &b)
            .unwrap();
    }

    /// A packed indirect table entry.
    fn entry(&self, table: u64, i: u16, addr: u64, len: u32, flags: u64) {
        let b = desc_bytes(addr, len, 0, flags as u16);
        self.mem.write(table + 16 * u64::from(i), &b).unwrap();
    }

    fn pop(&mut self) -> Result<Option<vdpakit_core::virtio::Chain>, QueueError> {
        self.dev.pop(&self.mem, &mut self.segs)
    }

    fn pop_err(&mut self) -> QueueError {
        let e = self.pop().expect_err("a malformed chain must be rejected");
        let again = self.pop().expect_err("still rejected");
        assert_eq!(format!("{e}"), format!("{again}"));
        e
    }
}

#[test]
fn packed_chain_longer_than_ring() {
    let mut q = Packed::new(5, F);
    for s in 0..5 {
        q.desc(s, BUF, 1, 0, N);
    }
    assert!(matches!(
        q.pop_err(),
        QueueError::ChainTooLong { head: 0, limit: 5 }
    ));
}

#[test]
fn packed_nested_indirect() {
    let mut q = Packed::new(8, F);
    q.entry(TABLE, 0, BUF, 1, 0);
    q.entry(TABLE, 1, TABLE + 0x100, 16, I);
    q.desc(0, TABLE, 32, 7, I);
    assert!(matches!(
        q.pop_err(),
        QueueError::NestedIndirect { index: 1 }
    ));
}

#[test]
fn packed_indirect_with_next() {
    let mut q = Packed::new(8, F);
    q.entry(TABLE, 0, BUF, 1, 0);
    q.desc(0, TABLE, 16, 7, I | N);
    q.desc(1, BUF, 1, 7, 0);
    assert!(matches!(
        q.pop_err(),
        QueueError::IndirectWithNext { index: 0 }
    ));
}

#[test]
fn packed_indirect_table_lengths() {
    for len in [0u32, 8, 17, 16 * 32768 + 16] {
        let mut q = Packed::new(8, F);
        q.desc(0, TABLE, len, 1, I);
        assert!(matches!(
            q.pop_err(),
            QueueError::IndirectTableLen { len: l, .. } if l == len
        ));
    }
}

#[test]
fn packed_indirect_not_negotiated_and_outside_memory() {
    let mut q = Packed::new(8, VIRTIO_F_VERSION_1);
    q.desc(0, TABLE, 16, 1, I);
    assert!(matches!(
        q.pop_err(),
        QueueError::IndirectNotNegotiated { index: 0 }
    ));
    let mut q = Packed::new(8, F);
    q.desc(0, GAP, 16, 1, I);
    assert!(matches!(
        q.pop_err(),
        QueueError::IndirectTableNotInMemory { addr: GAP, len: 16 }
    ));
}

#[test]
fn packed_readable_after_writable_and_bad_buffers() {
    let mut q = Packed::new(8, F);
    q.desc(0, BUF, 1, 1, W | N);
    q.desc(1, BUF, 1, 1, 0);
    assert!(matches!(
        q.pop_err(),
        QueueError::ReadableAfterWritable { index: 1 }
    ));
    for (addr, len) in [(GAP, 1u32), (END1 - 1, 2), (u64::MAX, 2)] {
        let mut q = Packed::new(8, F);
        q.desc(0, addr, len, 1, 0);
        assert!(matches!(
            q.pop_err(),
            QueueError::BadBuffer { addr: a, len: l, .. } if (a, l) == (addr, len)
        ));
    }
    let mut q = Packed::new(8, F);
    for i in 0..=SEGS_MAX as u16 {
        q.entry(TABLE, i, BUF, 1, 0);
    }
    q.desc(0, TABLE, 16 * (SEGS_MAX as u32 + 1), 1, I);
    assert!(matches!(q.pop_err(), QueueError::TooManySegs { .. }));
}

#[test]
fn packed_not_available_descriptors_are_not_popped() {
    let mut q = Packed::new(4, F);
    // USED set as well: a used descriptor of this lap, not an available one.
    let b = desc_bytes(BUF, 1, 0, VIRTQ_DESC_F_AVAIL | VIRTQ_DESC_F_USED);
    q.mem.write(q.cfg.desc, &b).unwrap();
    assert_eq!(q.pop().unwrap(), None);
    assert_eq!(q.dev.avail_count(), 0);
    // AVAIL clear, USED set: available for wrap counter 0 only.
    let b = desc_bytes(BUF, 1, 0, VIRTQ_DESC_F_USED);
    q.mem.write(q.cfg.desc, &b).unwrap();
    assert_eq!(q.pop().unwrap(), None);
}

/// Set-up errors.
#[test]
fn setup_errors() {
    let mem = mem2();
    let split = |size, desc, avail, used| QueueConfig {
        size,
        desc,
        avail,
        used,
        features: VIRTIO_F_VERSION_1 | VIRTIO_F_RING_EVENT_IDX,
        ..QueueConfig::default()
    };
    for size in [0u16, 3, 100, 65535] {
        assert!(matches!(
            DeviceQueue::new(&split(size, 0x1000, 0x2000, 0x3000), &mem),
            Err(QueueError::InvalidSize { format: "split", size: s, .. }) if s == size
        ));
    }
    for size in [0u16, 32769, 65535] {
        let mut c = split(size, 0x1000, 0x2000, 0x3000);
        c.features |= VIRTIO_F_RING_PACKED;
        assert!(matches!(
            DeviceQueue::new(&c, &mem),
            Err(QueueError::InvalidSize {
                format: "packed",
                ..
            })
        ));
    }
    // Areas not in memory, or running off a region's end (avail with event idx is 4+2*256+2).
    let cases = [
        (split(256, GAP, 0x2000, 0x3000), "descriptor table"),
        (split(256, END1 - 0x800, 0x2000, 0x3000), "descriptor table"),
        (split(256, 0x1000, END1 - 4 - 512, 0x3000), "avail ring"),
        (split(256, 0x1000, 0x2000, u64::MAX - 3), "used ring"),
    ];
    for (cfg, which) in cases {
        match DeviceQueue::new(&cfg, &mem) {
            Err(QueueError::RingNotInMemory { area, .. }) => assert_eq!(area, which),
            other => panic!("{which}: {other:?}"),
        }
        match DriverQueue::new(&cfg, &mem) {
            Err(QueueError::RingNotInMemory { area, .. }) => assert_eq!(area, which),
            other => panic!("{which}: {other:?}"),
        }
    }
    // Misaligned areas.
    let cases = [
        (split(16, 0x1008, 0x2000, 0x3000), "descriptor table", 16),
        (split(16, 0x1000, 0x2001, 0x3000), "avail ring", 2),
        (split(16, 0x1000, 0x2000, 0x3002), "used ring", 4),
    ];
    for (cfg, which, al) in cases {
        match DeviceQueue::new(&cfg, &mem) {
            Err(QueueError::RingMisaligned { area, align, .. }) => {
                assert_eq!((area, align), (which, al))
            }
            other => panic!("{which}: {other:?}"),
        }
    }
    let mut c = split(16, 0x1000, 0x2002, 0x3000);
    c.features |= VIRTIO_F_RING_PACKED;
    assert!(matches!(
        DeviceQueue::new(&c, &mem),
        Err(QueueError::RingMisaligned {
            area: "driver area",
            align: 4,
            ..
        })
    ));
    // The error text names the address.
    let e = DeviceQueue::new(&split(256, GAP, 0x2000, 0x3000), &mem).unwrap_err();
    assert!(e.to_string().contains("0x180000"), "{e}");
}

/// Driver side against a broken device: used entries with bad ids, used idx jumps.
#[test]
fn driver_rejects_bad_used_entries() {
    let mem = mem2();
    let cfg = QueueConfig::at(RING_GPA, 8, F);
    let used = cfg.used;
    for (id, idx) in [(8u32, 1u16), (u32::MAX, 1), (3, 1)] {
        let mut drv = DriverQueue::new(&cfg, &mem).unwrap();
        let head = drv.add(&[(BUF, 1, true)]).unwrap();
        assert_eq!(head, 0);
        drv.publish_avail();
        mem.write(used + 4, &id.to_le_bytes()).unwrap();
        mem.write(used + 2, &idx.to_le_bytes()).unwrap();
        assert!(matches!(
            drv.reap(),
            Err(QueueError::BadUsedId { id: i, size: 8 }) if i == id
        ));
        assert_eq!(drv.free_count(), 7);
    }
    let mut drv = DriverQueue::new(&cfg, &mem).unwrap();
    mem.write(used + 2, &9u16.to_le_bytes()).unwrap();
    assert!(matches!(
        drv.reap(),
        Err(QueueError::UsedIdxJump {
            used_idx: 9,
            last_used: 0,
            size: 8
        })
    ));
    // Packed: a used descriptor naming an id not in flight.
    let pcfg = QueueConfig::at(RING_GPA, 8, F | VIRTIO_F_RING_PACKED);
    let mut drv = DriverQueue::new(&pcfg, &mem).unwrap();
    drv.add(&[(BUF, 1, true)]).unwrap();
    drv.publish_avail();
    let b = desc_bytes(0, 0, 5, VIRTQ_DESC_F_AVAIL | VIRTQ_DESC_F_USED);
    mem.write(pcfg.desc, &b).unwrap();
    assert!(matches!(
        drv.reap(),
        Err(QueueError::BadUsedId { id: 5, size: 8 })
    ));
}

/// IN_ORDER driver side against a broken device: a used entry naming a chain that is not in
/// flight (or one added but not yet published), and a split batch larger than the used index
/// moved, are errors that consume nothing; a valid batch afterwards is still resolved.
#[test]
fn in_order_driver_rejects_bad_batches() {
    let mem = mem2();
    let f = F | VIRTIO_F_IN_ORDER;
    let cfg = QueueConfig::at(RING_GPA, 8, f);
    let used = cfg.used;
    // Three chains published, a fourth added but not published; a fresh ring each time.
    let fresh = || {
        let mut drv = DriverQueue::new(&cfg, &mem).unwrap();
        let heads: Vec<u16> = (0..3)
            .map(|i| drv.add(&[(BUF + 0x100 * i, 64, true)]).unwrap())
            .collect();
        assert_eq!(
            heads,
            [0, 1, 2],
            "in-order descriptors are handed out sequentially"
        );
        drv.publish_avail();
        let unpublished = drv.add(&[(BUF + 0x400, 64, true)]).unwrap();
        (drv, unpublished)
    };
    let entry = |id: u32, len: u32, idx: u16| {
        mem.write(used + 4, &id.to_le_bytes()).unwrap();
        mem.write(used + 8, &len.to_le_bytes()).unwrap();
        mem.write(used + 2, &idx.to_le_bytes()).unwrap();
    };
    let (_, unpublished) = fresh();
    for id in [5u32, u32::from(unpublished)] {
        let (mut drv, _) = fresh();
        entry(id, 10, 3);
        assert!(
            matches!(drv.reap(), Err(QueueError::BadUsedId { id: i, size: 8 }) if i == id),
            "id {id}"
        );
        assert_eq!(drv.free_count(), 4);
    }
    // Names the third chain (a batch of 3) but moves used.idx by 2.
    let (mut drv, _) = fresh();
    entry(2, 10, 2);
    let e = drv.reap().unwrap_err();
    assert!(
        matches!(
            e,
            QueueError::InOrderBatchBeyondUsedIdx {
                id: 2,
                batch: 3,
                moved: 2
            }
        ),
        "{e}"
    );
    assert!(e.to_string().contains("id 2"), "{e}");
    assert_eq!(drv.free_count(), 4);
    // The device gets it right: three chains, the first two implied (whole length).
    let (mut drv, _) = fresh();
    entry(2, 10, 3);
    assert_eq!(drv.reap().unwrap(), Some((0, 64)));
    assert_eq!(drv.reap().unwrap(), Some((1, 64)));
    assert_eq!(drv.reap().unwrap(), Some((2, 10)));
    assert_eq!(drv.reap().unwrap(), None);
    assert_eq!((drv.free_count(), drv.implied()), (7, 2));

    // Packed: the id of a chain added but not published, then one never made available.
    let pcfg = QueueConfig::at(RING_GPA, 8, f | VIRTIO_F_RING_PACKED);
    let mut drv = DriverQueue::new(&pcfg, &mem).unwrap();
    let a = drv.add(&[(BUF, 64, true)]).unwrap();
    let b = drv
        .add(&[(BUF + 0x100, 32, true), (BUF + 0x200, 32, true)])
        .unwrap();
    drv.publish_avail();
    let c = drv.add(&[(BUF + 0x300, 64, true)]).unwrap();
    for id in [c, 7] {
        let d = desc_bytes(0, 5, id, VIRTQ_DESC_F_AVAIL | VIRTQ_DESC_F_USED);
        mem.write(pcfg.desc, &d).unwrap();
        assert!(
            matches!(drv.reap(), Err(QueueError::BadUsedId { id: i, size: 8 }) if i == u32::from(id)),
            "id {id}"
        );
        assert_eq!(drv.free_count(), 4);
    }
    // One used descriptor at slot 0 naming `b`: `a` is implied, the next used slot is 3.
    let d = desc_bytes(0, 5, b, VIRTQ_DESC_F_AVAIL | VIRTQ_DESC_F_USED);
    mem.write(pcfg.desc, &d).unwrap();
    assert_eq!(drv.reap().unwrap(), Some((a, 64)));
    assert_eq!(drv.reap().unwrap(), Some((b, 5)));
    assert_eq!(drv.reap().unwrap(), None);
    assert_eq!((drv.free_count(), drv.implied()), (7, 1));
}

/// Random garbage everywhere the driver writes: the device returns chains or errors, never
/// panics, and every segment it returns is guest memory.
fn fuzz(packed: bool) {
    let mem = mem2();
    let size = 16u16;
    let mut features = F;
    if packed {
        features |= VIRTIO_F_RING_PACKED;
    }
    let cfg = QueueConfig::at(RING_GPA, size, features);
    let mut dev = DeviceQueue::new(&cfg, &mem).unwrap();
    let mut segs = Segs::new();
    let mut rng = Rng(0xfeed_face_cafe_beef ^ u64::from(packed));
    let interesting = [0, BUF, END1 - 8, GAP, START2, END2 - 1, TABLE, u64::MAX - 7];
    let (mut ok, mut err) = (0, 0);
    for _ in 0..20_000 {
        // Scribble over descriptors, the avail ring and an indirect table.
        for _ in 0..4 {
            let addr = match rng.below(4) {
                0 => rng.next(),
                1 => interesting[rng.below(interesting.len() as u64) as usize]
                    .wrapping_add(rng.below(64)),
                _ => BUF + rng.below(0x1000),
            };
            let len = match rng.below(4) {
                0 => rng.next() as u32,
                1 => 16 * rng.below(40) as u32,
                _ => rng.below(256) as u32,
            };
            let w12 = if !packed && rng.below(4) != 0 {
                rng.next() as u16 & 0x7
            } else {
                rng.next() as u16 & if rng.below(2) == 0 { 0x1f } else { 0xffff }
            };
            let w14 = if packed && rng.below(4) != 0 {
                // Mostly available for one of the wrap counters.
                (rng.next() as u16 & if rng.below(4) == 0 { 7 } else { 3 })
                    | [VIRTQ_DESC_F_AVAIL, VIRTQ_DESC_F_USED][rng.below(2) as usize]
            } else {
                rng.next() as u16 & if rng.below(2) == 0 { 0x801f } else { 0xffff }
            };
            let b = desc_bytes(addr, len, w12, w14);
            let target = match rng.below(3) {
                0 => cfg.desc + 16 * rng.below(u64::from(size)),
                1 => TABLE + 16 * rng.below(40),
                _ => cfg.avail + 2 * rng.below(u64::from(size) + 3),
            };
            if target >= cfg.avail && target < cfg.desc + 0x1000 && !packed {
                // An avail ring entry: mostly a head in range.
                let head = rng.below(u64::from(size) + 2) as u16;
                mem.write(target, &head.to_le_bytes()).unwrap();
            } else {
                let _ = mem.write(target, &b);
            }
        }
        if !packed && rng.below(10) != 0 {
            // Mostly a plausible avail idx, so that chains get walked.
            let idx = dev.last_avail().wrapping_add(rng.below(3) as u16);
            mem.write(cfg.avail + 2, &idx.to_le_bytes()).unwrap();
        }
        if rng.below(64) == 0 {
            dev = DeviceQueue::new(&cfg, &mem).unwrap();
            dev.set_last_avail(rng.next() as u16 % if packed { size } else { u16::MAX })
                .ok();
        }
        let _ = dev.avail_count();
        match dev.pop(&mem, &mut segs) {
            Ok(Some(c)) => {
                ok += 1;
                let (mut r, mut w) = (0u64, 0u64);
                for s in segs.as_slice() {
                    assert!(s.len() > 0);
                    assert_eq!(mem.gpa_to_host(s.gpa(), u64::from(s.len())), Some(s.host()));
                    if s.is_writable() {
                        w += u64::from(s.len());
                    } else {
                        assert_eq!(w, 0, "readable segment after a writable one");
                        r += u64::from(s.len());
                    }
                }
                assert_eq!((r, w), (u64::from(c.readable), u64::from(c.writable)));
                assert!(c.descs >= 1 && c.descs <= size);
                dev.push_used(&c, rng.next() as u32);
                dev.publish_used();
            }
            Ok(None) => {}
            Err(e) => {
                err += 1;
                if std::env::var("FUZZ_DEBUG").is_ok() {
                    eprintln!("{e}");
                }
            }
        }
    }
    assert!(ok > 100 && err > 100, "ok {ok}, err {err}");
}

#[test]
fn split_fuzz_never_panics() {
    fuzz(false);
}

#[test]
fn packed_fuzz_never_panics() {
    fuzz(true);
}

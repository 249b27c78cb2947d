//! Dirty logging: `DirtyLog::mark` against a reference bitmap, and the exact pages the devices
//! mark for the ring bytes they write.

mod virtio_common;

use std::collections::BTreeSet;

use vdpakit_core::virtio::features::{
    VIRTIO_F_RING_EVENT_IDX, VIRTIO_F_RING_PACKED, VIRTIO_F_VERSION_1,
};
use vdpakit_core::virtio::{
    AddrKind, DeviceQueue, DirtyLog, DriverQueue, GuestMemory, LOG_PAGE_SIZE, QueueConfig, Segs,
    ring_layout,
};
use virtio_common::{Rng, UVA_OFFSET, log, log_bytes, memory};

/// Pages of `[gpa, gpa + len)` below `pages` (and how many are beyond).
fn pages_of(gpa: u64, len: u64, pages: u64, set: &mut BTreeSet<u64>) -> u64 {
    if len == 0 {
        return 0;
    }
    let first = gpa / LOG_PAGE_SIZE;
    let last = gpa.saturating_add(len - 1) / LOG_PAGE_SIZE;
    for p in first..=last.min(pages.saturating_sub(1)) {
        set.insert(p);
    }
    if last >= pages {
        last - first.max(pages) + 1
    } else {
        0
    }
}

fn set_pages(bytes: &[u8]) -> BTreeSet<u64> {
    let mut s = BTreeSet::new();
    for (i, b) in bytes.iter().enumerate() {
        for bit in 0..8 {
            if b & (1 << bit) != 0 {
                s.insert(i as u64 * 8 + bit);
            }
        }
    }
    s
}

#[test]
fn mark_matches_reference_bitmap() {
    let len = 64; // 512 pages = 2 MiB of guest memory
    let (l, host) = log(len);
    let pages = 8 * len as u64;
    let mut rng = Rng(42);
    let mut want = BTreeSet::new();
    let mut ignored = 0;
    for i in 0..3000 {
        let gpa = match rng.below(4) {
            0 => rng.next(),
            1 => u64::MAX - rng.below(0x3000),
            _ => rng.below(0x22_0000),
        };
        let n = match rng.below(4) {
            0 => 0,
            1 => rng.below(0x4_0000),
            2 => rng.next(),
            _ => 1 + rng.below(64),
        };
        if rng.below(200) == 0 {
            // Start over with a clean log now and then, so small ranges are checked exactly.
            // SAFETY: the log mapping is alive (held by `l`), nothing marks concurrently.
            unsafe { std::ptr::write_bytes(host, 0, len) };
            want.clear();
        }
        l.mark(gpa, n);
        ignored += pages_of(gpa, n, pages, &mut want);
        assert_eq!(
            set_pages(&log_bytes(host, len)),
            want,
            "mark #{i} ({gpa:#x}, {n:#x})"
        );
        assert_eq!(l.ignored(), ignored);
    }
    // Exact single cases.
    // SAFETY: as above.
    unsafe { std::ptr::write_bytes(host, 0, len) };
    l.mark(0x1fff, 2);
    assert_eq!(set_pages(&log_bytes(host, len)), BTreeSet::from([1, 2]));
    l.mark(0x8000, 0x8000 * 8);
    assert_eq!(set_pages(&log_bytes(host, len)).len(), 2 + 64);
    let b = log_bytes(host, len);
    assert_eq!(&b[1..9], &[0xff; 8]);
    let before = l.ignored();
    l.mark(pages * LOG_PAGE_SIZE - 1, 2);
    assert_eq!(l.ignored(), before + 1);
    assert_eq!(log_bytes(host, len)[len - 1] & 0x80, 0x80);
}

/// A split device over a 1024-entry ring whose used ring straddles pages marks exactly the pages
/// of the used elements and the index it wrote.
#[test]
fn split_marks_used_ring_writes() {
    let size = 1024u16;
    let mem = memory(&[(0, 0x40_0000)]);
    let cfg = QueueConfig {
        size,
        desc: 0x1_0000,
        avail: 0x2_0000,
        used: 0x3_0ff0,
        addr_kind: AddrKind::Gpa,
        features: VIRTIO_F_VERSION_1 | VIRTIO_F_RING_EVENT_IDX,
    };
    let mut drv = DriverQueue::new(&cfg, &mem).unwrap();
    let mut dev = DeviceQueue::new(&cfg, &mem).unwrap();
    let (l, host) = log(128);
    let mut segs = Segs::new();
    dev.set_log(Some((l.clone(), cfg.used)));
    let mut want = BTreeSet::new();
    let mut used_idx: u64 = 0;
    for round in 0..3 {
        // SAFETY: the log mapping is alive; nothing marks concurrently.
        unsafe { std::ptr::write_bytes(host, 0, 128) };
        want.clear();
        let n = [300, 800, 1000][round];
        for _ in 0..n {
            drv.add(&[(0x20_0000, 64, true)]).unwrap();
        }
        drv.publish_avail();
        for k in 0..n {
            let c = dev.pop(&mem, &mut segs).unwrap().unwrap();
            dev.push_used(&c, 10);
            let slot = used_idx % u64::from(size);
            pages_of(cfg.used + 4 + 8 * slot, 8, 1024, &mut want);
            used_idx += 1;
            if k % 97 == 0 || k + 1 == n {
                dev.publish_used();
                pages_of(cfg.used + 2, 2, 1024, &mut want);
            }
        }
        for _ in 0..n {
            drv.reap().unwrap().unwrap();
        }
        assert_eq!(set_pages(&log_bytes(host, 128)), want, "round {round}");
    }
    // The buffers themselves are the caller's to mark: nothing near 0x20_0000 was.
    assert!(!set_pages(&log_bytes(host, 128)).contains(&0x200));
    // avail_event (EVENT_IDX) lives after the last used element, on page 0x32.
    // SAFETY: as above.
    unsafe { std::ptr::write_bytes(host, 0, 128) };
    dev.set_notification(true);
    let mut want = BTreeSet::new();
    pages_of(cfg.used + 4 + 8 * u64::from(size), 2, 1024, &mut want);
    assert_eq!(set_pages(&log_bytes(host, 128)), want);
    assert_eq!(want, BTreeSet::from([0x32]));
    // Logging off: nothing is marked any more.
    // SAFETY: as above.
    unsafe { std::ptr::write_bytes(host, 0, 128) };
    dev.set_log(None);
    drv.add(&[(0x20_0000, 64, true)]).unwrap();
    drv.publish_avail();
    let c = dev.pop(&mem, &mut segs).unwrap().unwrap();
    dev.push_used(&c, 1);
    dev.publish_used();
    dev.set_notification(false);
    assert!(set_pages(&log_bytes(host, 128)).is_empty());
    assert_eq!(l.ignored(), 0);
}

/// A packed device marks exactly the used descriptors it wrote (in the descriptor ring) and the
/// device area; with front-end virtual ring addresses the pages are still guest-physical ones.
fn packed_marks(kind: AddrKind) {
    let size = 512u16;
    let mem = memory(&[(0, 0x40_0000)]);
    let gcfg = QueueConfig {
        size,
        desc: 0x1_0f00,
        avail: 0x2_0000,
        used: 0x2_1ffc,
        addr_kind: AddrKind::Gpa,
        features: VIRTIO_F_VERSION_1 | VIRTIO_F_RING_EVENT_IDX | VIRTIO_F_RING_PACKED,
    };
    let off = if kind == AddrKind::Uva { UVA_OFFSET } else { 0 };
    let dcfg = QueueConfig {
        desc: gcfg.desc + off,
        avail: gcfg.avail + off,
        used: gcfg.used + off,
        addr_kind: kind,
        ..gcfg
    };
    let mut drv = DriverQueue::new(&gcfg, &mem).unwrap();
    let mut dev = DeviceQueue::new(&dcfg, &mem).unwrap();
    let (l, host) = log(128);
    let mut segs = Segs::new();
    dev.set_log(Some((l, gcfg.used)));
    let mut rng = Rng(7);
    let mut pos: u64 = 0;
    for round in 0..6 {
        // SAFETY: the log mapping is alive; nothing marks concurrently.
        unsafe { std::ptr::write_bytes(host, 0, 128) };
        let mut want = BTreeSet::new();
        let mut chains = Vec::new();
        while drv.free_count() >= 4 {
            let n = 1 + rng.below(4) as usize;
            drv.add(&vec![(0x20_0000, 64, true); n]).unwrap();
        }
        drv.publish_avail();
        while let Some(c) = dev.pop(&mem, &mut segs).unwrap() {
            chains.push(c);
        }
        for c in &chains {
            dev.push_used(c, 3);
            pages_of(
                gcfg.desc + 16 * (pos % u64::from(size)),
                16,
                1024,
                &mut want,
            );
            pos += u64::from(c.descs);
        }
        dev.publish_used();
        for _ in &chains {
            drv.reap().unwrap().unwrap();
        }
        assert_eq!(set_pages(&log_bytes(host, 128)), want, "round {round}");
    }
    // SAFETY: as above.
    unsafe { std::ptr::write_bytes(host, 0, 128) };
    dev.set_notification(true);
    // The device area [0x21ffc, 0x22000) is on page 0x21.
    assert_eq!(set_pages(&log_bytes(host, 128)), BTreeSet::from([0x21]));
}

#[test]
fn packed_marks_used_descriptors() {
    packed_marks(AddrKind::Gpa);
}

#[test]
fn packed_marks_used_descriptors_uva_rings() {
    packed_marks(AddrKind::Uva);
}

/// `Segs::log_written` marks the pages of the first `written` bytes of the writable buffers.
#[test]
fn segs_log_written_marks_written_bytes_only() {
    let mem: GuestMemory = memory(&[(0, 0x40_0000)]);
    let cfg = QueueConfig::at(0x1_0000, 8, VIRTIO_F_VERSION_1);
    let l = ring_layout(8, false, false);
    assert!(l.total < 0x1000);
    let mut drv = DriverQueue::new(&cfg, &mem).unwrap();
    let mut dev = DeviceQueue::new(&cfg, &mem).unwrap();
    let mut segs = Segs::new();
    let (log_, host) = log(128);
    let bufs = [
        (0x10_0000, 100, false),
        (0x20_0ff0, 0x20, true),   // pages 0x200, 0x201
        (0x30_0000, 0x3000, true), // pages 0x300..=0x302
        (0x38_0000, 0x1000, true), // page 0x380
    ];
    drv.add(&bufs).unwrap();
    drv.publish_avail();
    dev.pop(&mem, &mut segs).unwrap().unwrap();
    segs.log_written(&log_, 0x20 + 0x1001);
    assert_eq!(
        set_pages(&log_bytes(host, 128)),
        BTreeSet::from([0x200, 0x201, 0x300, 0x301])
    );
    let all: DirtyLog = log_.clone();
    segs.log_written(&all, u32::MAX);
    assert_eq!(
        set_pages(&log_bytes(host, 128)),
        BTreeSet::from([0x200, 0x201, 0x300, 0x301, 0x302, 0x380])
    );
}

//! Notification suppression, both directions, both formats: exact kick / interrupt decisions.

mod virtio_common;

use vdpakit_core::virtio::features::{
    VIRTIO_F_NOTIFY_ON_EMPTY, VIRTIO_F_RING_EVENT_IDX, VIRTIO_F_RING_PACKED, VIRTIO_F_VERSION_1,
};
use vdpakit_core::virtio::vring::RING_EVENT_FLAGS_DESC;
use vdpakit_core::virtio::{
    Chain, DeviceQueue, DriverQueue, GuestMemory, QueueConfig, Segs, ring_layout,
};
use virtio_common::{RING_GPA, memory, pair};

const EV: u64 = VIRTIO_F_VERSION_1 | VIRTIO_F_RING_EVENT_IDX;
const PACKED: u64 = VIRTIO_F_RING_PACKED;
const BUF: u64 = 0x10_0000;

struct Q {
    mem: GuestMemory,
    drv: DriverQueue,
    dev: DeviceQueue,
    segs: Segs,
}

impl Q {
    fn new(size: u16, features: u64) -> Q {
        let mem = memory(&[(0, 0x20_0000)]);
        let (drv, dev) = pair(&mem, size, features);
        Q {
            mem,
            drv,
            dev,
            segs: Segs::new(),
        }
    }

    /// Adds one chain of `n` descriptors (not published).
    fn add(&mut self, n: usize) -> u16 {
        let bufs: Vec<_> = (0..n).map(|i| (BUF + 64 * i as u64, 64, true)).collect();
        self.drv.add(&bufs).unwrap()
    }

    fn pop(&mut self) -> Chain {
        self.dev.pop(&self.mem, &mut self.segs).unwrap().unwrap()
    }

    fn pop_n(&mut self, n: usize) -> Vec<Chain> {
        (0..n).map(|_| self.pop()).collect()
    }

    fn reap_n(&mut self, n: usize) {
        for _ in 0..n {
            self.drv.reap().unwrap().unwrap();
        }
    }

    /// Completes chains (one publish) and returns the interrupt decision.
    fn complete(&mut self, chains: &[Chain]) -> bool {
        for c in chains {
            self.dev.push_used(c, 1);
        }
        self.dev.publish_used()
    }
}

#[test]
fn split_event_idx_interrupts() {
    let mut q = Q::new(8, EV);
    for _ in 0..6 {
        q.add(1);
    }
    q.drv.publish_avail();
    let c = q.pop_n(6);
    let mut got = Vec::new();
    got.push(q.complete(&c[0..1])); // used_event 0 in [0, 1)
    got.push(q.complete(&c[1..2])); // [1, 2)
    q.reap_n(2); // interrupts on: used_event follows to 2
    got.push(q.complete(&c[2..3])); // [2, 3)
    q.drv.set_interrupts(false); // used_event = 1
    got.push(q.complete(&c[3..4])); // [3, 4)
    q.reap_n(2); // used_event stays 1
    q.drv.set_interrupts(true); // used_event = 4
    got.push(q.complete(&c[4..6])); // [4, 6)
    assert_eq!(got, [true, false, true, false, true]);
}

#[test]
fn split_event_idx_kicks() {
    let mut q = Q::new(8, EV);
    let mut got = Vec::new();
    q.add(1);
    got.push(q.drv.publish_avail()); // avail_event 0 in [0, 1)
    q.add(1);
    got.push(q.drv.publish_avail()); // [1, 2)
    let c = q.pop_n(2);
    q.dev.set_notification(true); // avail_event = 2
    q.add(1);
    q.add(1);
    got.push(q.drv.publish_avail()); // [2, 4)
    q.add(1);
    got.push(q.drv.publish_avail()); // [4, 5)
    let c2 = q.pop_n(3);
    q.dev.set_notification(false); // avail_event = 4
    q.complete(&c);
    q.complete(&c2);
    q.reap_n(5);
    q.add(1);
    got.push(q.drv.publish_avail()); // [5, 6)
    q.add(1);
    got.push(q.drv.publish_avail()); // [6, 7)
    q.pop_n(2);
    q.dev.set_notification(true); // avail_event = 7
    q.add(1);
    got.push(q.drv.publish_avail()); // [7, 8)
    assert_eq!(got, [true, false, true, false, false, false, true]);
}

#[test]
fn split_flags_without_event_idx() {
    let mut q = Q::new(8, VIRTIO_F_VERSION_1);
    q.add(1);
    assert!(q.drv.publish_avail());
    q.dev.set_notification(false);
    q.add(1);
    assert!(!q.drv.publish_avail());
    q.add(1);
    assert!(!q.drv.publish_avail());
    q.dev.set_notification(true);
    q.add(1);
    assert!(q.drv.publish_avail());
    let c = q.pop_n(4);
    assert!(q.complete(&c[0..1]));
    q.drv.set_interrupts(false);
    assert!(!q.complete(&c[1..2]));
    assert!(!q.complete(&c[2..3]));
    q.drv.set_interrupts(true);
    assert!(q.complete(&c[3..4]));
    // Nothing staged: nothing to publish, no notification.
    assert!(!q.dev.publish_used());
    assert!(!q.drv.publish_avail());
}

#[test]
fn split_notify_on_empty() {
    let mut q = Q::new(8, VIRTIO_F_VERSION_1 | VIRTIO_F_NOTIFY_ON_EMPTY);
    q.drv.set_interrupts(false);
    q.add(1);
    q.add(1);
    q.drv.publish_avail();
    let c = q.pop();
    // One chain still available: suppressed.
    assert!(!q.complete(&[c]));
    let c = q.pop();
    // The queue is empty now: notify despite NO_INTERRUPT.
    assert!(q.complete(&[c]));
}

#[test]
fn packed_event_idx_kicks() {
    let mut q = Q::new(4, EV | PACKED);
    let mut got = Vec::new();
    q.add(1);
    got.push(q.drv.publish_avail()); // device area ENABLE (zeroed)
    q.dev.set_notification(false);
    q.add(1);
    got.push(q.drv.publish_avail()); // DISABLE
    let mut c = q.pop_n(2);
    q.dev.set_notification(true); // DESC at (2, wrap 1)
    q.add(1);
    got.push(q.drv.publish_avail()); // slot 2 published
    c.extend(q.pop_n(1));
    q.complete(&c);
    q.reap_n(3);
    q.add(1);
    q.add(1);
    got.push(q.drv.publish_avail()); // slots 3 and 0 (wrap 0): not (2, wrap 1)
    q.pop_n(2);
    q.dev.set_notification(true); // DESC at (1, wrap 0)
    q.add(1);
    got.push(q.drv.publish_avail()); // slot 1, wrap 0
    assert_eq!(got, [true, false, true, false, true]);
}

#[test]
fn packed_event_idx_interrupts() {
    let mut q = Q::new(4, EV | PACKED);
    let mut got = Vec::new();
    let a = q.add(1); // slot 0
    let b = q.add(2); // slots 1-2
    let c = q.add(1); // slot 3
    q.drv.publish_avail();
    let ch = q.pop_n(3);
    assert_eq!(
        ch.iter().map(|c| (c.id, c.descs)).collect::<Vec<_>>(),
        [(a, 1), (b, 2), (c, 1)]
    );
    q.drv.set_interrupts(true); // DESC at (0, wrap 1)
    got.push(q.complete(&ch[0..1])); // used [0, 1)
    got.push(q.complete(&ch[1..2])); // used [1, 3)
    q.reap_n(1); // event follows to (1, wrap 1), already passed
    got.push(q.complete(&ch[2..3])); // used [3, 4)
    q.reap_n(2); // event (0, wrap 0)
    q.drv.set_interrupts(false);
    q.add(1); // slot 0, wrap 0
    q.drv.publish_avail();
    let d = q.pop_n(1);
    got.push(q.complete(&d)); // DISABLE
    q.reap_n(1);
    q.drv.set_interrupts(true); // DESC at (1, wrap 0)
    q.add(2); // slots 1-2
    q.add(1); // slot 3
    q.drv.publish_avail();
    let ef = q.pop_n(2);
    got.push(q.complete(&ef[0..1])); // used [1, 3) of wrap 0
    got.push(q.complete(&ef[1..2])); // used [3, 4)
    q.reap_n(2); // event (0, wrap 1)
    // A 3-descriptor chain; the driver asks for the event at its middle slot: the device's
    // used position jumps over it, which still counts.
    q.add(3);
    q.drv.publish_avail();
    let g = q.pop_n(1);
    let layout = ring_layout(4, true, true);
    let mut area = [0u8; 4];
    area[..2].copy_from_slice(&(1u16 | 0x8000).to_le_bytes());
    area[2..].copy_from_slice(&RING_EVENT_FLAGS_DESC.to_le_bytes());
    q.mem.write(RING_GPA + layout.avail, &area).unwrap();
    got.push(q.complete(&g)); // used [0, 3) of wrap 1 contains 1
    assert_eq!(got, [true, false, false, false, true, false, true]);
}

#[test]
fn packed_flags_without_event_idx() {
    let mut q = Q::new(8, VIRTIO_F_VERSION_1 | PACKED);
    q.add(1);
    assert!(q.drv.publish_avail());
    q.dev.set_notification(false);
    q.add(1);
    assert!(!q.drv.publish_avail());
    q.dev.set_notification(true);
    q.add(1);
    assert!(q.drv.publish_avail());
    let c = q.pop_n(3);
    assert!(q.complete(&c[0..1]));
    q.drv.set_interrupts(false);
    assert!(!q.complete(&c[1..2]));
    q.drv.set_interrupts(true);
    assert!(q.complete(&c[2..3]));
    assert!(!q.dev.publish_used());
    assert!(!q.drv.publish_avail());
}

/// Across many laps and the 16-bit index wrap: with the other side re-arming each time every
/// publish notifies; once both sides disable, nothing does.
fn rearm_across_wraps(features: u64) {
    let mut q = Q::new(4, features);
    q.dev.set_notification(true);
    q.drv.set_interrupts(true);
    for i in 0..70_000u32 {
        let rearm = i < 66_000;
        if i == 66_000 {
            q.dev.set_notification(false);
            q.drv.set_interrupts(false);
        }
        q.add(1 + (i % 3) as usize);
        let kick = q.drv.publish_avail();
        let c = q.pop();
        if rearm {
            q.dev.set_notification(true);
        }
        let irq = q.complete(&[c]);
        q.reap_n(1);
        assert_eq!(kick, rearm, "kick at {i}");
        assert_eq!(irq, rearm, "interrupt at {i}");
    }
}

#[test]
fn split_event_idx_rearm_across_wraps() {
    rearm_across_wraps(EV);
}

#[test]
fn packed_event_idx_rearm_across_wraps() {
    rearm_across_wraps(EV | PACKED);
}

/// `DeviceQueue`/`DriverQueue` at a configuration built by hand match `QueueConfig::at`.
#[test]
fn config_at_matches_layout() {
    for (size, packed) in [(256u16, false), (100, true), (1, false), (32768, true)] {
        let features = EV | if packed { PACKED } else { 0 };
        let l = ring_layout(size, packed, true);
        let c = QueueConfig::at(0x1000, size, features);
        assert_eq!(
            (c.desc, c.avail, c.used),
            (0x1000, 0x1000 + l.avail, 0x1000 + l.used)
        );
        assert_eq!(l.avail % if packed { 4 } else { 2 }, 0);
        assert_eq!(l.used % 4, 0);
        let (d, a, u) = vdpakit_core::virtio::ring_sizes(size, packed, true);
        assert_eq!(l.total, l.used + u);
        assert!(l.avail >= d && l.used >= l.avail + a);
    }
    assert_eq!(ring_layout(256, false, false).total, 4096 + 516 + 2052);
    assert_eq!(ring_layout(256, false, true).total, 4096 + 518 + 2 + 2054);
}

//! The virtio hot paths allocate nothing: add/publish/pop/push/publish/reap, gather/scatter,
//! notification updates and dirty logging run under a counting global allocator.

mod virtio_common;

use vdpakit_core::virtio::features::{
    VIRTIO_F_RING_EVENT_IDX, VIRTIO_F_RING_INDIRECT_DESC, VIRTIO_F_RING_PACKED, VIRTIO_F_VERSION_1,
};
use vdpakit_core::virtio::{QueueConfig, Segs};
use virtio_common::{RING_GPA, log, memory, pair};

#[path = "support/counting_alloc.rs"]
mod counting_alloc;
use counting_alloc::allocs;

fn hot_paths(packed: bool) {
    let mut features = VIRTIO_F_VERSION_1 | VIRTIO_F_RING_EVENT_IDX | VIRTIO_F_RING_INDIRECT_DESC;
    if packed {
        features |= VIRTIO_F_RING_PACKED;
    }
    let mem = memory(&[(0, 0x40_0000)]);
    let (mut drv, mut dev) = pair(&mem, 64, features);
    let cfg = QueueConfig::at(RING_GPA, 64, features);
    let (l, _host) = log(128);
    dev.set_log(Some((l.clone(), cfg.used)));
    let mut segs = Segs::new();
    let mut buf = vec![0u8; 4096];
    let bufs = [
        (0x10_0000u64, 100u32, false),
        (0x10_1000, 1000, false),
        (0x20_0000, 2000, true),
        (0x20_1000, 2000, true),
    ];
    // Warm up (the first pop adopts the memory table).
    drv.add(&bufs).unwrap();
    drv.publish_avail();
    let c = dev.pop(&mem, &mut segs).unwrap().unwrap();
    dev.push_used(&c, 0);
    dev.publish_used();
    drv.reap().unwrap().unwrap();

    for round in 0..200u64 {
        // Indirect chains are posted outside the counted part (the driver helper builds the
        // table in a Vec); the device side of them is counted.
        for k in 0..4u64 {
            drv.add_indirect(&mem, &bufs, 0x30_0000 + (round % 8 * 4 + k) * 0x100)
                .unwrap();
        }
        let before = allocs();
        for _ in 0..8 {
            drv.add(&bufs).unwrap();
        }
        drv.publish_avail();
        dev.set_notification(true);
        let n = dev.avail_count();
        for _ in 0..n {
            let c = dev.pop(&mem, &mut segs).unwrap().unwrap();
            let r = segs.read(0, &mut buf);
            assert_eq!(r, 1100);
            let w = segs.write(0, &buf[..3000]);
            segs.log_written(&l, w as u32);
            dev.push_used(&c, w as u32);
        }
        dev.publish_used();
        dev.set_notification(false);
        drv.set_interrupts(round % 2 == 0);
        let mut reaped = 0;
        while drv.reap().unwrap().is_some() {
            reaped += 1;
        }
        assert_eq!(reaped, 12);
        assert_eq!(allocs(), before, "round {round} allocated");
    }
}

#[test]
fn split_hot_paths_allocate_nothing() {
    hot_paths(false);
}

#[test]
fn packed_hot_paths_allocate_nothing() {
    hot_paths(true);
}

//! Driver and device on two threads over the same rings: payload written before a publish is
//! seen after the other side's acquire, for both formats, across many laps.

mod virtio_common;

use std::thread;

use vdpakit_core::virtio::features::{
    VIRTIO_F_RING_EVENT_IDX, VIRTIO_F_RING_PACKED, VIRTIO_F_VERSION_1,
};
use vdpakit_core::virtio::{Segs, ring_layout};
use virtio_common::{RING_GPA, memory, pair};

const CHAINS: u64 = 60_000;

fn two_threads(size: u16, packed: bool) {
    let features = VIRTIO_F_VERSION_1
        | VIRTIO_F_RING_EVENT_IDX
        | if packed { VIRTIO_F_RING_PACKED } else { 0 };
    let bufs = (RING_GPA + ring_layout(size, packed, true).total).next_multiple_of(0x1000);
    let mem = memory(&[(0, (bufs + u64::from(size) * 64 * 2) as usize)]);
    let (mut drv, mut dev) = pair(&mem, size, features);
    let dmem = mem.clone();
    let device = thread::spawn(move || {
        let mut segs = Segs::new();
        let mut done = 0u64;
        let mut idle = 0u32;
        while done < CHAINS {
            let n = dev.avail_count();
            if n == 0 {
                idle += 1;
                if idle.is_multiple_of(64) {
                    thread::yield_now();
                }
                continue;
            }
            for _ in 0..n {
                let c = dev
                    .pop(&dmem, &mut segs)
                    .unwrap()
                    .expect("counted as available");
                let mut req = [0u8; 8];
                assert_eq!(segs.read(0, &mut req), 8);
                let seq = u64::from_le_bytes(req);
                assert_eq!(seq, done, "requests arrive in order");
                let resp = (seq ^ 0xa5a5_a5a5_a5a5_a5a5).to_le_bytes();
                assert_eq!(segs.write(0, &resp), 8);
                dev.push_used(&c, 8);
                done += 1;
            }
            dev.publish_used();
        }
    });
    let mut posted = 0u64;
    let mut reaped = 0u64;
    let mut slot_of = vec![0u64; usize::from(size)];
    let mut idle = 0u32;
    while reaped < CHAINS {
        let mut progress = false;
        while posted < CHAINS && drv.free_count() >= 2 {
            let slot = posted % u64::from(size);
            let (req, resp) = (bufs + slot * 128, bufs + slot * 128 + 64);
            mem.write(req, &posted.to_le_bytes()).unwrap();
            mem.write(resp, &[0u8; 8]).unwrap();
            let id = drv.add(&[(req, 8, false), (resp, 8, true)]).unwrap();
            slot_of[usize::from(id)] = posted;
            posted += 1;
            progress = true;
        }
        drv.publish_avail();
        while let Some((id, len)) = drv.reap().unwrap() {
            let seq = slot_of[usize::from(id)];
            assert_eq!(seq, reaped, "completions in order");
            assert_eq!(len, 8);
            let mut resp = [0u8; 8];
            mem.read(bufs + (seq % u64::from(size)) * 128 + 64, &mut resp)
                .unwrap();
            assert_eq!(u64::from_le_bytes(resp), seq ^ 0xa5a5_a5a5_a5a5_a5a5);
            reaped += 1;
            progress = true;
        }
        if !progress {
            idle += 1;
            if idle.is_multiple_of(64) {
                thread::yield_now();
            }
        }
    }
    device.join().unwrap();
}

#[test]
fn split_two_threads() {
    two_threads(64, false);
}

#[test]
fn packed_two_threads() {
    two_threads(64, true);
}

#[test]
fn packed_two_threads_odd_size() {
    two_threads(37, true);
}

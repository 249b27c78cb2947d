//! The sim device and its PMD: bring-up, datapath both ways over loop and cable wires (split
//! and packed), with vdpakit's own driver-side rings as the guest. Exact counts.

mod model_common;

use std::time::Duration;

use model_common::*;
use vdpakit_core::model::sim::SimDevice;
use vdpakit_core::vdpa::VdpaDevice;
use vdpakit_core::virtio::features as vf;

fn loop_exchange(name: &str, features: u64) {
    let sim = SimDevice::from_spec(&format!("name={name},wire=loop")).unwrap();
    let mut r = Rig::start(&sim, 0, features);
    assert_eq!(r.post_rx(200), 200);
    let total = 1000u32;
    let mut sent = 0u32;
    let mut got = Vec::new();
    while sent < total || got.len() < total as usize {
        let batch: Vec<Vec<u8>> = (sent..total.min(sent + 50))
            .map(|i| frame(r.mac, i, size_of(i)))
            .collect();
        sent += r.send(&batch) as u32;
        let more = r.recv(batch.len(), Duration::from_secs(5));
        assert_eq!(more.len(), batch.len(), "frames back from the loop");
        got.extend(more);
        r.reap_tx();
        r.post_rx(more_len(&got));
    }
    for (i, f) in got.iter().enumerate() {
        assert_eq!(f, &frame(r.mac, i as u32, size_of(i as u32)), "frame {i}");
    }
    let rx = r.dev.stats(0).unwrap();
    let tx = r.dev.stats(1).unwrap();
    let bytes: u64 = (0..total).map(|i| size_of(i) as u64).sum();
    assert_eq!(
        (tx.packets, tx.bytes, tx.dropped, tx.errors),
        (1000, bytes, 0, 0)
    );
    assert_eq!(
        (rx.packets, rx.bytes, rx.dropped, rx.errors),
        (1000, bytes, 0, 0)
    );
    assert_eq!(rx.iommu_faults + tx.iommu_faults, 0);
    assert!(tx.kicks >= 1, "kicks counted: {tx:?}");
    assert_eq!(r.domain.faults().0, 0);
}

fn more_len(got: &[Vec<u8>]) -> usize {
    // Keep the receive ring topped up: give back as many as were just consumed (at most 50).
    got.len().min(50)
}

#[test]
fn loop_returns_exactly_what_was_sent_split() {
    loop_exchange("loop-split", BASE_FEATURES);
}

#[test]
fn loop_returns_exactly_what_was_sent_packed() {
    loop_exchange("loop-packed", BASE_FEATURES | vf::RING_PACKED);
}

#[test]
fn loop_with_event_idx_split_and_packed() {
    loop_exchange("loop-ev-split", BASE_FEATURES | vf::RING_EVENT_IDX);
    loop_exchange(
        "loop-ev-packed",
        BASE_FEATURES | vf::RING_EVENT_IDX | vf::RING_PACKED,
    );
}

/// Two VFs joined by a cable, one guest on split rings and the other on packed: every frame
/// crosses exactly once each way; a receiver without buffers counts each lost frame as dropped.
#[test]
fn cable_between_two_vfs_both_ways_with_exact_drops() {
    let sim = SimDevice::from_spec("name=cable2,vfs=2,wire=cable").unwrap();
    let mut a = Rig::start(&sim, 0, BASE_FEATURES);
    let mut b = Rig::start(
        &sim,
        1,
        BASE_FEATURES | vf::RING_PACKED | vf::RING_EVENT_IDX,
    );
    a.post_rx(100);
    b.post_rx(100);
    let to_b: Vec<Vec<u8>> = (0..80).map(|i| frame(b.mac, i, size_of(i))).collect();
    let to_a: Vec<Vec<u8>> = (0..60)
        .map(|i| frame(a.mac, 1000 + i, size_of(i + 7)))
        .collect();
    assert_eq!(a.send(&to_b), 80);
    assert_eq!(b.send(&to_a), 60);
    assert_eq!(b.recv(80, Duration::from_secs(5)), to_b);
    assert_eq!(a.recv(60, Duration::from_secs(5)), to_a);
    wait_for("transmit completions", || {
        a.reap_tx() + b.reap_tx() == 0 && {
            let (sa, sb) = (a.dev.stats(1).unwrap(), b.dev.stats(1).unwrap());
            sa.packets == 80 && sb.packets == 60
        }
    });
    // Nothing crossed twice.
    assert!(a.recv(1, Duration::from_millis(50)).is_empty());
    assert!(b.recv(1, Duration::from_millis(50)).is_empty());

    // B has 20 buffers left: 50 more frames → 20 received, 30 dropped on B's queue 0.
    let more: Vec<Vec<u8>> = (0..50).map(|i| frame(b.mac, 5000 + i, 100)).collect();
    assert_eq!(a.send(&more), 50);
    assert_eq!(b.recv(20, Duration::from_secs(5)), more[..20].to_vec());
    wait_for("drops counted", || b.dev.stats(0).unwrap().dropped == 30);
    let (brx, atx) = (b.dev.stats(0).unwrap(), a.dev.stats(1).unwrap());
    assert_eq!((atx.packets, atx.dropped), (130, 0));
    assert_eq!((brx.packets, brx.dropped), (100, 30));
    assert_eq!(a.dev.stats(0).unwrap().packets, 60);
    // Posting buffers again: traffic resumes, nothing was left behind in the device.
    b.post_rx(10);
    assert!(b.recv(1, Duration::from_millis(50)).is_empty());
    let last = vec![frame(b.mac, 9999, 64)];
    a.send(&last);
    assert_eq!(b.recv(1, Duration::from_secs(5)), last);
}

/// Each queue's MSI-X vector signals the eventfd wired to that queue, and the count the guest
/// reads equals the interrupts the device reports; a queue without a call fd raises nothing.
#[test]
fn msix_reaches_the_right_eventfd() {
    let sim = SimDevice::from_spec("name=msix,wire=loop").unwrap();
    let mut r = Rig::open(&sim, 0, BASE_FEATURES);
    let mut c = r.conf(None);
    c.queues[1].call = None; // transmit: polled, no interrupts
    r.dev.configure(&c).unwrap();
    r.post_rx(64);
    let frames: Vec<Vec<u8>> = (0..40).map(|i| frame(r.mac, i, 200)).collect();
    let mut got = 0;
    for chunk in frames.chunks(8) {
        r.send(chunk);
        got += r.recv(chunk.len(), Duration::from_secs(5)).len();
    }
    assert_eq!(got, 40);
    wait_for("tx completions", || r.dev.stats(1).unwrap().packets == 40);
    let rx_irqs = take_count(&r.rx.call);
    let rx = r.dev.stats(0).unwrap();
    let tx = r.dev.stats(1).unwrap();
    assert!(rx_irqs >= 1, "receive interrupts reached the eventfd");
    assert_eq!(
        rx_irqs, rx.interrupts,
        "eventfd count = interrupts raised on vector 0"
    );
    assert_eq!(tx.interrupts, 0, "no vector for the transmit queue");
    assert_eq!(
        take_count(&r.tx.call),
        0,
        "transmit eventfd never signalled"
    );
}

/// The driver asks for no interrupts (EVENT_IDX `used_event` one behind, packed DISABLE, or the
/// split NO_INTERRUPT flag): the device raises none while moving traffic; asking again brings
/// them back.
#[test]
fn interrupt_suppression_is_honoured() {
    for (i, features) in [
        BASE_FEATURES,
        BASE_FEATURES | vf::RING_EVENT_IDX,
        BASE_FEATURES | vf::RING_PACKED,
        BASE_FEATURES | vf::RING_PACKED | vf::RING_EVENT_IDX,
    ]
    .into_iter()
    .enumerate()
    {
        let sim = SimDevice::from_spec(&format!("name=supp{i},wire=loop")).unwrap();
        let mut r = Rig::start(&sim, 0, features);
        r.rx.dq.set_interrupts(false);
        r.tx.dq.set_interrupts(false);
        r.post_rx(128);
        for k in 0..10 {
            let fs: Vec<Vec<u8>> = (0..10).map(|j| frame(r.mac, k * 10 + j, 128)).collect();
            r.send(&fs);
            assert_eq!(r.recv(10, Duration::from_secs(5)).len(), 10);
            r.reap_tx();
        }
        wait_for("tx done", || r.dev.stats(1).unwrap().packets == 100);
        assert_eq!(
            r.dev.stats(0).unwrap().interrupts,
            0,
            "features {features:#x}"
        );
        assert_eq!(
            r.dev.stats(1).unwrap().interrupts,
            0,
            "features {features:#x}"
        );
        assert_eq!(take_count(&r.rx.call) + take_count(&r.tx.call), 0);
        // Interrupts wanted again on receive.
        r.rx.dq.set_interrupts(true);
        r.send(&[frame(r.mac, 7777, 100)]);
        assert_eq!(r.recv(1, Duration::from_secs(5)).len(), 1);
        wait_for("an interrupt", || take_count(&r.rx.call) > 0);
        assert_eq!(r.dev.stats(1).unwrap().interrupts, 0);
    }
}

/// A ring outside every mapping: configure fails naming the IOMMU fault, the domain records it
/// at the ring's IOVA, and the device works once the ring is where the driver mapped memory.
#[test]
fn ring_outside_the_mappings_is_an_iommu_fault() {
    let sim = SimDevice::from_spec("name=fault-ring,wire=loop").unwrap();
    let mut r = Rig::open(&sim, 0, BASE_FEATURES);
    let mut c = r.conf(None);
    let stray = 0x7000_0000u64;
    c.queues[1].desc = stray;
    let e = r.dev.configure(&c).unwrap_err().to_string();
    assert!(e.contains("iommu_faults 1"), "{e}");
    assert_eq!(r.domain.faults(), (1, Some(stray)));
    assert_eq!(r.dev.stats(1).unwrap().iommu_faults, 1);
    // The same device, configured right, works.
    let c = r.conf(None);
    r.dev.configure(&c).unwrap();
    r.post_rx(4);
    r.send(&[frame(r.mac, 1, 64)]);
    assert_eq!(r.recv(1, Duration::from_secs(5)).len(), 1);
    assert_eq!(r.domain.faults().0, 1);
}

/// A descriptor whose buffer lies outside the mappings: the transmit queue stops on the IOMMU
/// fault (counted once, recorded at the buffer's IOVA, NEEDS_RESET), the receive queue keeps
/// working, and a restart from the read-back positions carries on.
#[test]
fn descriptor_outside_the_mappings_breaks_only_its_queue() {
    for (i, features) in [BASE_FEATURES, BASE_FEATURES | vf::RING_PACKED]
        .into_iter()
        .enumerate()
    {
        let sim = SimDevice::from_spec(&format!("name=fault-desc{i},wire=loop")).unwrap();
        let mut r = Rig::start(&sim, 0, features);
        r.post_rx(16);
        r.send(&[frame(r.mac, 1, 64)]);
        assert_eq!(r.recv(1, Duration::from_secs(5)).len(), 1);
        let stray = BASE + GUEST_LEN as u64 + 0x1000;
        r.tx.dq.add(&[(stray, 100, false)]).unwrap();
        r.tx.dq.publish_avail();
        r.kick(1);
        wait_for("the fault", || r.dev.stats(1).unwrap().iommu_faults == 1);
        assert_eq!(r.domain.faults(), (1, Some(stray)));
        // Still one fault after more kicks: the queue is stopped, not retrying.
        r.kick(1);
        std::thread::sleep(Duration::from_millis(20));
        let tx = r.dev.stats(1).unwrap();
        assert_eq!((tx.iommu_faults, tx.packets, tx.errors), (1, 1, 0));
        let e = r.dev.set_vring_state(1, true).unwrap_err().to_string();
        assert!(
            e.contains("did not start") && e.contains("iommu_faults 1"),
            "{e}"
        );
        // The guest's receive queue is unaffected.
        assert_eq!(r.dev.stats(0).unwrap().iommu_faults, 0);
        // Positions read back: the faulting chain was not consumed.
        let s = r.dev.vring_state(1).unwrap();
        let start = packed_start(features);
        assert_eq!((s.avail_idx, s.used_idx), (start + 1, start + 1));
    }
}

/// The driver unmaps guest memory under a running device: the engine's next DMA view has no
/// rings, so both queues fault (recorded, counted) and nothing crashes; the device is reset
/// and works again once memory is back.
#[test]
fn unmapping_under_a_running_device_faults_and_recovers() {
    let sim = SimDevice::from_spec("name=unmap,wire=loop").unwrap();
    let mut r = Rig::start(&sim, 0, BASE_FEATURES);
    r.post_rx(8);
    r.send(&[frame(r.mac, 1, 64)]);
    assert_eq!(r.recv(1, Duration::from_secs(5)).len(), 1);
    r.domain.unmap(BASE, GUEST_LEN as u64).unwrap();
    wait_for("faults on both queues", || {
        r.dev.stats(0).unwrap().iommu_faults == 1 && r.dev.stats(1).unwrap().iommu_faults == 1
    });
    assert_eq!(r.domain.faults().0, 2);
    r.dev.close().unwrap();
    r.g.map_into(&r.domain);
    let c = r.conf(None);
    let mut c = c;
    for q in &mut c.queues {
        q.avail_idx = 1;
        q.used_idx = 1;
    }
    r.dev.configure(&c).unwrap();
    r.send(&[frame(r.mac, 2, 64)]);
    assert_eq!(r.recv(1, Duration::from_secs(5)), vec![frame(r.mac, 2, 64)]);
}

/// Suspend a device mid-traffic, read its ring state, configure a second sim instance over the
/// same guest rings with it, and carry on: every frame arrives exactly once, in order, across
/// a wrap of the rings (packed: the wrap counters travel in bit 15).
#[test]
fn ring_state_moves_to_another_instance_mid_traffic() {
    for (i, features) in [
        BASE_FEATURES,
        BASE_FEATURES | vf::RING_PACKED,
        BASE_FEATURES | vf::RING_PACKED | vf::RING_EVENT_IDX,
    ]
    .into_iter()
    .enumerate()
    {
        let a = SimDevice::from_spec(&format!("name=mig-a{i},wire=loop")).unwrap();
        let b = SimDevice::from_spec(&format!("name=mig-b{i},wire=loop")).unwrap();
        let mut r = Rig::start(&a, 0, features);
        r.post_rx(usize::from(QSIZE));
        let mut got: Vec<Vec<u8>> = Vec::new();
        let mut sent = 0u32;
        let send = |r: &mut Rig, n: u32, sent: &mut u32| {
            let fs: Vec<Vec<u8>> = (*sent..*sent + n)
                .map(|s| frame(r.mac, s, size_of(s)))
                .collect();
            assert_eq!(r.send(&fs), n as usize);
            *sent += n;
        };
        for _ in 0..4 {
            send(&mut r, 50, &mut sent);
            let more = r.recv(50, Duration::from_secs(5));
            let n = more.len();
            got.extend(more);
            r.reap_tx();
            r.post_rx(n);
        }
        // 200 more, and suspend as soon as the engine is on them.
        send(&mut r, 200, &mut sent);
        wait_for("the engine on the new chains", || {
            r.dev.stats(1).unwrap().packets > 200
        });
        r.dev.suspend().unwrap();
        let done_a = r.dev.stats(1).unwrap().packets;
        eprintln!("suspended after {done_a} of 400 transmit chains ({features:#x})");
        // 20 more while suspended: nothing moves.
        send(&mut r, 20, &mut sent);
        std::thread::sleep(Duration::from_millis(20));
        assert_eq!(
            r.dev.stats(1).unwrap().packets,
            done_a,
            "suspended device moved"
        );
        let rx_state = r.dev.vring_state(0).unwrap();
        let tx_state = r.dev.vring_state(1).unwrap();
        assert_eq!(rx_state.avail_idx, rx_state.used_idx);
        assert_eq!(tx_state.avail_idx, tx_state.used_idx);
        let tx_done = (tx_state.avail_idx & 0x7fff) as u64
            + if features & vf::RING_PACKED != 0 {
                // Packed: one lap of 256 slots is behind when the wrap counter flipped.
                if tx_state.avail_idx & 0x8000 == 0 {
                    256
                } else {
                    0
                }
            } else {
                0
            };
        assert_eq!(
            tx_done, done_a,
            "position = chains completed ({tx_state:?})"
        );
        r.dev.close().unwrap();
        // Instance B over the same memory, same rings, from A's positions.
        let domain_b = vdpakit_core::pci::DmaDomain::model();
        r.g.map_into(&domain_b);
        let mut dev_b =
            vdpakit_core::model::sim_pmd::SimVdpa::open("mig-b", b.vf_model(0).unwrap(), &domain_b)
                .unwrap();
        let mut c = r.conf(None);
        c.queues[0].avail_idx = rx_state.avail_idx;
        c.queues[0].used_idx = rx_state.used_idx;
        c.queues[1].avail_idx = tx_state.avail_idx;
        c.queues[1].used_idx = tx_state.used_idx;
        dev_b.configure(&c).unwrap();
        r.dev = dev_b;
        r.kick(1);
        while got.len() < sent as usize {
            let more = r.recv((sent as usize - got.len()).min(50), Duration::from_secs(5));
            assert!(!more.is_empty(), "stalled at {} of {sent}", got.len());
            let n = more.len();
            got.extend(more);
            r.reap_tx();
            r.post_rx(n);
        }
        assert!(
            r.recv(1, Duration::from_millis(30)).is_empty(),
            "a duplicate"
        );
        for (s, f) in got.iter().enumerate() {
            assert_eq!(
                f,
                &frame(r.mac, s as u32, size_of(s as u32)),
                "frame {s} ({features:#x})"
            );
        }
        let tx_b = r.dev.stats(1).unwrap().packets;
        assert_eq!(
            done_a + tx_b,
            u64::from(sent),
            "each chain completed by one instance"
        );
        assert_eq!(
            a.stats(0, 0).unwrap().packets + b.stats(0, 0).unwrap().packets,
            u64::from(sent)
        );
    }
}

/// Suspend and resume the same device: kicks while suspended are not lost.
#[test]
fn suspend_resume_keeps_kicks() {
    let sim = SimDevice::from_spec("name=susp,wire=loop").unwrap();
    let mut r = Rig::start(&sim, 0, BASE_FEATURES | vf::RING_PACKED);
    r.post_rx(32);
    r.dev.suspend().unwrap();
    let fs: Vec<Vec<u8>> = (0..10).map(|s| frame(r.mac, s, 300)).collect();
    r.send(&fs);
    std::thread::sleep(Duration::from_millis(20));
    assert_eq!(r.dev.stats(1).unwrap().packets, 0);
    r.dev.resume().unwrap();
    assert_eq!(r.recv(10, Duration::from_secs(5)), fs);
}

/// With MRG_RXBUF a frame larger than one receive chain spans several (num_buffers = chains);
/// without it, the frame is dropped (counted) and the buffers stay for frames that fit.
#[test]
fn mergeable_receive_spans_chains() {
    let sim = SimDevice::from_spec("name=mrg,wire=loop").unwrap();
    let mut r = Rig::start(&sim, 0, BASE_FEATURES);
    for _ in 0..64 {
        r.rx.post(256, true).unwrap();
    }
    r.rx.dq.publish_avail();
    let fs: Vec<Vec<u8>> = (0..10).map(|s| frame(r.mac, s, 1000)).collect();
    r.send(&fs);
    for f in &fs {
        let mut parts = Vec::new();
        wait_for("a receive", || {
            if let Some(x) = r.rx.reap() {
                parts.push(x);
                true
            } else {
                false
            }
        });
        let (gpa, len) = parts[0];
        let mut b = vec![0u8; len as usize];
        r.g.mem.read(gpa, &mut b).unwrap();
        let n = u16::from_le_bytes([b[10], b[11]]);
        assert_eq!(n, 4, "1012 bytes in 256-byte chains");
        let mut data = b[12..].to_vec();
        for _ in 1..n {
            let (gpa, len) = r.rx.reap().expect("the frame's next chain");
            let mut b = vec![0u8; len as usize];
            r.g.mem.read(gpa, &mut b).unwrap();
            data.extend(b);
        }
        assert_eq!(&data, f);
    }
    assert_eq!(r.dev.stats(0).unwrap().packets, 10);

    let sim = SimDevice::from_spec("name=no-mrg,wire=loop").unwrap();
    let mut r = Rig::start(&sim, 0, vf::VERSION_1);
    for _ in 0..8 {
        r.rx.post(256, true).unwrap();
    }
    r.rx.dq.publish_avail();
    r.send(&[frame(r.mac, 1, 1000), frame(r.mac, 2, 200)]);
    assert_eq!(
        r.recv(1, Duration::from_secs(5)),
        vec![frame(r.mac, 2, 200)]
    );
    let rx = r.dev.stats(0).unwrap();
    assert_eq!((rx.packets, rx.dropped), (1, 1));
}

/// Bits set in a dirty bitmap, as page numbers.
fn dirty_pages(log: &vdpakit_core::virtio::GuestMemory, iova: u64, size: u64) -> Vec<u64> {
    let mut b = vec![0u8; size as usize];
    log.read(iova, &mut b).unwrap();
    let mut out = Vec::new();
    for (i, byte) in b.iter().enumerate() {
        for bit in 0..8 {
            if byte & (1 << bit) != 0 {
                out.push(i as u64 * 8 + bit);
            }
        }
    }
    out
}

fn pages(gpa: u64, len: u64) -> impl Iterator<Item = u64> {
    (gpa >> 12)..=((gpa + len.max(1) - 1) >> 12)
}

/// Dirty logging in "hardware": with a bitmap mapped in the domain, exactly the pages the device
/// wrote are marked (the used rings / packed descriptor rings and device areas, the receive
/// buffers' written bytes), never a transmit buffer or a driver-written area; turning logging
/// off stops the marks.
#[test]
fn dirty_logging_marks_exactly_the_pages_written() {
    use std::collections::BTreeSet;
    use vdpakit_core::mem::{MemMode, Segment};
    use vdpakit_core::vdpa::LogConfig;
    use vdpakit_core::vdpa::binding::LOG_IOVA;
    use vdpakit_core::virtio::{GuestMemory, GuestRegion};

    for (i, features) in [
        BASE_FEATURES,
        BASE_FEATURES | vf::RING_EVENT_IDX,
        BASE_FEATURES | vf::RING_PACKED,
    ]
    .into_iter()
    .enumerate()
    {
        let packed = features & vf::RING_PACKED != 0;
        let sim = SimDevice::from_spec(&format!("name=dirty{i},wire=loop")).unwrap();
        let mut r = Rig::open(&sim, 0, features);
        assert_eq!(
            r.dev.log_support(),
            vdpakit_core::vdpa::LogSupport::Hardware
        );
        let size = ((BASE + GUEST_LEN as u64) >> 12).div_ceil(8);
        let seg = Segment::new("dirty-log", size as usize, MemMode::NoHuge).unwrap();
        let region = GuestRegion::from_segment(&seg).rebased(LOG_IOVA, LOG_IOVA);
        r.domain.map(LOG_IOVA, &region).unwrap();
        let log = GuestMemory::new(vec![region]).unwrap();
        let c = r.conf(Some(LogConfig {
            iova: LOG_IOVA,
            size,
        }));
        r.dev.configure(&c).unwrap();
        r.post_rx(64);
        let fs: Vec<Vec<u8>> = (0..40).map(|s| frame(r.mac, s, size_of(s * 3))).collect();
        r.send(&fs);
        let mut written = Vec::new();
        wait_for("40 receives", || {
            while let Some(x) = r.rx.reap() {
                written.push(x);
            }
            written.len() == 40
        });
        wait_for("40 transmits", || r.dev.stats(1).unwrap().packets == 40);
        r.reap_tx();
        let mut want = BTreeSet::new();
        for q in [&r.rx, &r.tx] {
            if packed {
                want.extend(pages(q.cfg.desc, 16 * u64::from(QSIZE)));
                want.extend(pages(q.cfg.used, 4));
            } else {
                want.extend(pages(q.cfg.used, 4 + 8 * u64::from(QSIZE)));
            }
        }
        for &(gpa, len) in &written {
            want.extend(pages(gpa, u64::from(len)));
        }
        let got: BTreeSet<u64> = dirty_pages(&log, LOG_IOVA, size).into_iter().collect();
        assert_eq!(got, want, "features {features:#x}");
        // Every written receive buffer is there, no transmit buffer page is.
        assert!(
            !got.iter()
                .any(|p| pages(BASE + 0x30_0000, 0x10_0000).any(|t| t == *p))
        );

        // Logging off: clear the bitmap, move traffic, nothing is marked.
        r.dev.set_features(features, None).unwrap();
        log.write(LOG_IOVA, &vec![0u8; size as usize]).unwrap();
        r.post_rx(40);
        r.send(&fs[..5]);
        assert_eq!(r.recv(5, Duration::from_secs(5)).len(), 5);
        assert!(dirty_pages(&log, LOG_IOVA, size).is_empty());
        // And on again through set_features.
        r.dev
            .set_features(
                features | vf::VHOST_F_LOG_ALL,
                Some(LogConfig {
                    iova: LOG_IOVA,
                    size,
                }),
            )
            .unwrap();
        r.send(&fs[..5]);
        assert_eq!(r.recv(5, Duration::from_secs(5)).len(), 5);
        assert!(!dirty_pages(&log, LOG_IOVA, size).is_empty());
    }
}

/// The driver with a deliberately wrong copy of the register map fails loudly, naming the
/// register and offset: an offset moved into a hole (the device refuses it, the read-back
/// shows it), an offset aliased onto another register (the read-back after all writes shows
/// it), a moved identification register (probe refuses the device), a moved enable (the queue
/// does not start).
#[test]
fn a_wrong_register_map_fails_loudly() {
    use vdpakit_core::model::sim_pmd::SimVdpa;
    use vdpakit_core::model::sim_pmd::regs::{RegMap, SIM_REGS};
    use vdpakit_core::pci::DmaDomain;

    let sim = SimDevice::from_spec("name=wrongmap,wire=loop").unwrap();
    let open = |map| {
        let domain = DmaDomain::model();
        let g = Guest::new(&domain, BASE, GUEST_LEN);
        let dev = SimVdpa::open_with_map("wrong", sim.vf_model(0).unwrap(), &domain, map);
        (dev, domain, g)
    };
    type Case = (&'static str, fn(&mut RegMap), &'static [&'static str]);
    let cases: [Case; 4] = [
        (
            "desc in a hole",
            |m| m.queue_desc = 0x0f8,
            &["QUEUE_DESC", "0xf8"],
        ),
        (
            "driver aliased onto device",
            |m| m.queue_driver = SIM_REGS.queue_device,
            &["QUEUE_DRIVER", "0x40"],
        ),
        ("enable in a hole", |m| m.queue_enable = 0x0fc, &["0xfc"]),
        ("magic moved", |m| m.magic = 0x004, &["magic"]),
    ];
    for (what, moved, needles) in cases {
        let mut map = SIM_REGS;
        moved(&mut map);
        let (dev, _domain, g) = open(map);
        let err = match dev {
            Err(e) => e.to_string(),
            Ok(mut dev) => {
                let rx = Vq::for_guest(&g, 0, BASE, BASE_FEATURES);
                let tx = Vq::for_guest(&g, 1, BASE + 0x10000, BASE_FEATURES);
                let c = vdpakit_core::vdpa::DevConf {
                    features: BASE_FEATURES,
                    queues: vec![rx.vq_config(0), tx.vq_config(0)],
                    log: None,
                    mtu: None,
                };
                dev.configure(&c).expect_err(what).to_string()
            }
        };
        for n in needles {
            assert!(err.contains(n), "{what}: '{err}' lacks '{n}'");
        }
    }
    // The right map on the same VF still works.
    let (dev, _domain, g) = open(SIM_REGS);
    let mut dev = dev.unwrap();
    let rx = Vq::for_guest(&g, 0, BASE, BASE_FEATURES);
    let tx = Vq::for_guest(&g, 1, BASE + 0x10000, BASE_FEATURES);
    dev.configure(&vdpakit_core::vdpa::DevConf {
        features: BASE_FEATURES,
        queues: vec![rx.vq_config(0), tx.vq_config(0)],
        log: None,
        mtu: None,
    })
    .unwrap();
}

/// A representor port (the `rep` port kind) exchanges frames with a VF whose wire is `rep`:
/// what the guest transmits the port receives, what the port transmits the guest receives;
/// frames for a VF without receive buffers are counted as dropped there.
#[test]
fn representor_port_exchanges_frames_with_its_vf() {
    use std::sync::Arc;
    use vdpakit_core::mbuf::Burst;
    use vdpakit_core::mem::MemMode;
    use vdpakit_core::mempool::{Mempool, MempoolConfig};
    use vdpakit_core::port::{self, PortConf, PortEnv, PortSpec, RingRegistry};

    let sim = SimDevice::from_spec("name=repd,vfs=2,wire=rep").unwrap();
    let pool = Mempool::new(
        "rep-test",
        MempoolConfig {
            count: 8192,
            cache_size: 64,
            mem: MemMode::NoHuge,
            ..Default::default()
        },
    )
    .unwrap();
    let env = PortEnv {
        pool: Arc::clone(&pool),
        rings: RingRegistry::new(),
        port_id: 0,
        pkt_size: 64,
        cache_size: 64,
    };
    // Bad specs name the problem.
    for (spec, needle) in [
        ("rep:dev=nosuch", "no device 'nosuch'"),
        ("rep:dev=repd,vf=2", "VF 2 does not exist"),
        ("rep:vf=0", "dev"),
        ("rep:dev=repd,ring=100", "power of two"),
    ] {
        let e = port::create(&PortSpec::parse(spec).unwrap(), &env)
            .err()
            .expect(spec)
            .to_string();
        assert!(e.contains(needle), "{spec}: {e}");
    }
    let mut p = port::create(&PortSpec::parse("rep:dev=repd,vf=1").unwrap(), &env).unwrap();
    p.configure(&PortConf::default()).unwrap();
    p.start().unwrap();
    // One port per VF.
    let mut p2 = port::create(&PortSpec::parse("rep:dev=repd,vf=1").unwrap(), &env).unwrap();
    p2.configure(&PortConf::default()).unwrap();
    assert!(p2.start().unwrap_err().to_string().contains("already used"));
    let mut qs = p.take_queues().unwrap();
    let mut rx = qs[0].rx.take().unwrap();
    let mut tx = qs[0].tx.take().unwrap();
    assert!(!p.link().up, "VF not running yet");

    // Port → VF before the VF runs: dropped, counted on the VF's receive queue.
    let mut cache = pool.cache(64);
    let mut b = Burst::new(32);
    let mk = |b: &mut Burst, cache: &mut vdpakit_core::MempoolCache, seqs: std::ops::Range<u32>| {
        for s in seqs {
            let mut m = cache.alloc().unwrap();
            let f = frame([0x02, 0, 0, 0, 0, 0x42], s, size_of(s));
            m.append(f.len()).unwrap().copy_from_slice(&f);
            b.push(m).unwrap();
        }
    };
    mk(&mut b, &mut cache, 0..10);
    assert_eq!(tx.tx_burst(&mut b), 10);
    wait_for("drops", || sim.stats(1, 0).unwrap().dropped == 10);

    let mut r = Rig::start(&sim, 1, BASE_FEATURES | vf::RING_PACKED);
    assert!(p.link().up);
    r.post_rx(128);
    // VF → port.
    let fs: Vec<Vec<u8>> = (0..100).map(|s| frame(r.mac, s, size_of(s))).collect();
    r.send(&fs[..50]);
    r.send(&fs[50..]);
    let mut got = Vec::new();
    let mut rb = Burst::new(32);
    wait_for("100 frames at the port", || {
        rx.rx_burst(&mut rb);
        while let Some(m) = rb.pop() {
            got.push(m.data().to_vec());
        }
        got.len() >= 100
    });
    // rx_burst order within a burst is reversed by pop(); compare as sets of sequences.
    got.sort_by_key(|f| u32::from_le_bytes([f[14], f[15], f[16], f[17]]));
    assert_eq!(got, fs);
    // Port → VF.
    let mut sent = 0;
    for k in 0..4 {
        mk(&mut b, &mut cache, 100 + k * 10..110 + k * 10);
        sent += tx.tx_burst(&mut b);
    }
    assert_eq!(sent, 40);
    let back = r.recv(40, Duration::from_secs(5));
    let want: Vec<Vec<u8>> = (100..140)
        .map(|s| frame([0x02, 0, 0, 0, 0, 0x42], s, size_of(s)))
        .collect();
    assert_eq!(back, want);
    let vtx = sim.stats(1, 1).unwrap();
    let vrx = sim.stats(1, 0).unwrap();
    assert_eq!((vtx.packets, vtx.dropped), (100, 0));
    assert_eq!((vrx.packets, vrx.dropped), (40, 10));
    let ps = p.stats();
    assert_eq!((ps.rx.packets, ps.tx.packets), (100, 50));
    drop((rx, tx, qs));
    p.stop().unwrap();
    // Detached: the VF's transmit is dropped (counted) now.
    r.send(&fs[..5]);
    wait_for("drops after detach", || {
        sim.stats(1, 1).unwrap().dropped == 5
    });
    // The VF's representor is free again.
    p2.start().unwrap();
}

/// The doorbell page a host notifier maps (QEMU maps `notify_area`'s fd at its offset into the
/// guest): a write of the queue index into that mapping is a kick the engine notices on its own,
/// with no register write in the path.
#[test]
fn host_notifier_page_write_is_a_kick() {
    use std::os::fd::AsFd;
    use vdpakit_core::virtio::{GuestMemory, GuestRegion};

    let sim = SimDevice::from_spec("name=notifier,wire=loop").unwrap();
    let mut r = Rig::start(&sim, 0, BASE_FEATURES | vf::RING_EVENT_IDX);
    r.post_rx(16);
    let area = r.dev.notify_area(1).expect("a mappable doorbell page");
    assert_eq!(area.size, 4096);
    // Map it as another process would (MAP_SHARED of the fd at the offset).
    let page = GuestRegion::map_fd(area.fd.as_fd(), area.offset, area.size, 0x1000, 0x1000)
        .expect("map the notify page");
    let page = GuestMemory::new(vec![page]).unwrap();
    let kicks0 = r.dev.stats(1).unwrap().kicks;
    // Post without ringing through the PCI layer; let the engine fall asleep first.
    std::thread::sleep(Duration::from_millis(5));
    let f = frame(r.mac, 1, 100);
    let mut b = vec![0u8; 12];
    b.extend_from_slice(&f);
    let gpa = r.tx.post(b.len() as u32, false).unwrap();
    r.g.mem.write(gpa, &b).unwrap();
    r.tx.dq.publish_avail();
    page.write(0x1000, &1u16.to_le_bytes()).unwrap();
    assert_eq!(r.recv(1, Duration::from_secs(5)), vec![f]);
    wait_for("the kick counted", || {
        r.dev.stats(1).unwrap().kicks == kicks0 + 1
    });
    // The engine re-arms the page.
    let mut w = [0u8; 4];
    page.read(0x1000, &mut w).unwrap();
    assert_eq!(u32::from_le_bytes(w), 0xffff_ffff);
    // Queues without a page: none for a queue the device does not have.
    assert!(r.dev.notify_area(2).is_none());
}

/// Two queue pairs: each pair's transmit comes back on the same pair's receive.
#[test]
fn multiqueue_pairs_map_to_pairs() {
    let sim = SimDevice::from_spec("name=mq,wire=loop,queues=2").unwrap();
    let features = BASE_FEATURES | vf::NET_MQ;
    let mut r = Rig::open(&sim, 0, features);
    assert_eq!(r.dev.max_queue_pairs(), 2);
    assert_eq!(r.dev.net_config().max_queue_pairs, 2);
    // Pair 1: its own rings and buffer areas.
    let mut rx1 = Vq::new(&r.g, 2, BASE + 0x20000, BASE + 0x60_0000, features);
    let mut tx1 = Vq::new(&r.g, 3, BASE + 0x30000, BASE + 0x70_0000, features);
    let mut c = r.conf(None);
    c.queues.push(rx1.vq_config(0));
    c.queues.push(tx1.vq_config(0));
    r.dev.configure(&c).unwrap();
    r.post_rx(8);
    for _ in 0..8 {
        rx1.post(RXBUF, true).unwrap();
    }
    rx1.dq.publish_avail();
    let f1 = frame(r.mac, 11, 300);
    let mut b = vec![0u8; 12];
    b.extend_from_slice(&f1);
    let gpa = tx1.post(b.len() as u32, false).unwrap();
    r.g.mem.write(gpa, &b).unwrap();
    tx1.dq.publish_avail();
    let (bell, v) = r.dev.doorbell(3).unwrap();
    bell.ring(v);
    wait_for("pair 1 receive", || r.dev.stats(2).unwrap().packets == 1);
    let (rgpa, len) = rx1.reap().expect("pair 1 got it");
    let mut got = vec![0u8; len as usize];
    r.g.mem.read(rgpa, &mut got).unwrap();
    assert_eq!(&got[12..], &f1[..]);
    r.send(&[frame(r.mac, 1, 100)]);
    assert_eq!(
        r.recv(1, Duration::from_secs(5)),
        vec![frame(r.mac, 1, 100)]
    );
    assert_eq!(r.dev.stats(0).unwrap().packets, 1);
    assert_eq!(r.dev.stats(2).unwrap().packets, 1);
    assert_eq!(r.dev.stats(3).unwrap().packets, 1);
}

/// `filter=1` (vdpa_sim's loop filter): frames for another unicast MAC are dropped (counted on
/// transmit); the VF's own MAC, broadcast and multicast come back.
#[test]
fn loop_filter_drops_frames_for_other_macs() {
    let sim = SimDevice::from_spec("name=filt,wire=loop,filter=1").unwrap();
    let mut r = Rig::start(&sim, 0, BASE_FEATURES);
    r.post_rx(16);
    let mine = frame(r.mac, 1, 80);
    let bcast = frame([0xff; 6], 2, 80);
    let mcast = frame([0x01, 0, 0x5e, 0, 0, 1], 3, 80);
    let other = frame([0x02, 9, 9, 9, 9, 9], 4, 80);
    r.send(&[mine.clone(), other, bcast.clone(), mcast.clone()]);
    assert_eq!(r.recv(3, Duration::from_secs(5)), vec![mine, bcast, mcast]);
    wait_for("tx counted", || r.dev.stats(1).unwrap().packets == 4);
    assert_eq!(r.dev.stats(1).unwrap().dropped, 1);
}

/// Disabling a ring (SET_VRING_ENABLE 0, or the PMD's `vring_state`, which stops the ring as
/// GET_VRING_BASE does) freezes its position; chains posted meanwhile wait; enabling it again
/// carries on from there. Close + configure from the read-back positions does the same.
#[test]
fn ring_disable_enable_and_restart_keep_the_position() {
    let sim = SimDevice::from_spec("name=endis,wire=loop").unwrap();
    let mut r = Rig::start(&sim, 0, BASE_FEATURES | vf::RING_PACKED);
    r.post_rx(64);
    r.send(&[frame(r.mac, 0, 80)]);
    assert_eq!(r.recv(1, Duration::from_secs(5)).len(), 1);
    r.dev.set_vring_state(1, false).unwrap();
    let fs: Vec<Vec<u8>> = (1..6).map(|s| frame(r.mac, s, 80)).collect();
    r.send(&fs);
    std::thread::sleep(Duration::from_millis(20));
    assert_eq!(r.dev.stats(1).unwrap().packets, 1, "a disabled ring moved");
    let st = r.dev.vring_state(1).unwrap();
    assert_eq!((st.avail_idx, st.used_idx), (0x8001, 0x8001));
    r.dev.set_vring_state(1, true).unwrap();
    r.kick(1);
    assert_eq!(r.recv(5, Duration::from_secs(5)), fs);
    // Restart: positions read back (vring_state stops the rings), close, configure from them.
    let rx = r.dev.vring_state(0).unwrap();
    let tx = r.dev.vring_state(1).unwrap();
    assert_eq!((rx.avail_idx, tx.avail_idx), (0x8006, 0x8006));
    r.dev.close().unwrap();
    let mut c = r.conf(None);
    c.queues[0].avail_idx = rx.avail_idx;
    c.queues[0].used_idx = rx.used_idx;
    c.queues[1].avail_idx = tx.avail_idx;
    c.queues[1].used_idx = tx.used_idx;
    r.dev.configure(&c).unwrap();
    let more: Vec<Vec<u8>> = (6..9).map(|s| frame(r.mac, s, 80)).collect();
    r.send(&more);
    assert_eq!(r.recv(3, Duration::from_secs(5)), more);
    // A mismatched position pair is refused with the values named.
    r.dev.close().unwrap();
    c.queues[1].used_idx = 0x8000;
    let e = r.dev.configure(&c).unwrap_err().to_string();
    assert!(e.contains("0x8006") && e.contains("0x8000"), "{e}");
}

/// Devices are found by name while they live; a name in use is refused, and free again once
/// the device is gone; unknown kinds and bad values are errors naming them.
#[test]
fn registry_and_spec_errors() {
    use vdpakit_core::model::{self, registry};
    let devs = model::create("sim:name=reg1,vfs=2").unwrap();
    assert_eq!(devs.len(), 2);
    assert_eq!(devs[1].name(), "reg1-vf1");
    assert!(registry::names().contains(&"reg1".to_string()));
    let e = model::create("sim:name=reg1").err().unwrap().to_string();
    assert!(e.contains("'reg1' exists already"), "{e}");
    drop(devs);
    assert!(!registry::names().contains(&"reg1".to_string()));
    assert_eq!(model::create("sim:name=reg1").unwrap().len(), 1);
    let e = model::create("nosuch:a=1").err().unwrap().to_string();
    assert!(e.contains("'nosuch'") && e.contains("sim"), "{e}");
    let e = model::create("sim:queues=17").err().unwrap().to_string();
    assert!(e.contains("queues='17'") && e.contains("1..=16"), "{e}");
    let e = registry::rep_pairs("reg-none", 0).unwrap_err().to_string();
    assert!(e.contains("no device 'reg-none'"), "{e}");
}

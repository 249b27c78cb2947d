//! The datapath through the model, both ways, with vdpakit's own virtio driver side as the
//! guest over memory mapped in the device's DMA domain: exact counts, steering by MAC and by
//! flow hash over queue pairs, interrupts, suspend/resume with positions preserved, restart from
//! read-back positions, and an unmapped ring turning into an IOMMU fault and a failed queue.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use common::*;
use vdpakit_core::vdpa::{DevConf, VdpaDevice};
use vdpakit_pmd_mlx5::Mlx5Vdpa;
use vdpakit_pmd_mlx5::model::{queue_error, toeplitz};
use vdpakit_pmd_mlx5::steer::RSS_KEY;

const HDR: usize = 12;

fn mac(dev: &dyn VdpaDevice) -> [u8; 6] {
    dev.net_config().mac
}

/// Moves `n` frames from the guest's transmit ring through the looped wire into its receive
/// ring, keeping both rings fed and never more frames in flight than receive buffers posted (a
/// frame finding no buffer is dropped, as on a wire); returns the frames received in order.
fn pump(
    g: &Guest,
    dev: &dyn VdpaDevice,
    rx: &mut Ring,
    tx: &mut Ring,
    frames: &[Vec<u8>],
) -> Vec<Vec<u8>> {
    let mut got = Vec::new();
    let mut sent = 0;
    let window = rx.posted();
    wait("all frames through the loop", || {
        let end = frames.len().min(got.len() + window);
        if sent < end {
            sent += tx.transmit(g, dev, &frames[sent..end], HDR);
        }
        tx.reap_tx();
        let r = rx.reap_rx(g, HDR);
        if !r.is_empty() {
            let n = r.len();
            got.extend(r);
            rx.post_rx(dev, n);
        }
        (got.len() >= frames.len()).then_some(())
    });
    got
}

fn loop_once(params: &str, packed: bool) {
    let (mut dev, model) = device(params);
    let g = Guest::new(dev.domain());
    let f = features(packed);
    let mut rx = Ring::new(&g, 0, 256, f, true);
    let mut tx = Ring::new(&g, 1, 256, f, true);
    dev.configure(&conf(f, &[&rx, &tx])).unwrap();
    assert_eq!(rx.post_rx(&dev, 256), 256);
    let m = mac(&dev);
    let frames: Vec<Vec<u8>> = (0..1000)
        .map(|i| frame(m, 1, i, 60 + (i as usize % 1400)))
        .collect();
    let got = pump(&g, &dev, &mut rx, &mut tx, &frames);
    assert_eq!(got, frames, "every frame once, in order, intact");
    // Let late completions land before counting.
    std::thread::sleep(Duration::from_millis(30));
    tx.reap_tx();
    assert!(rx.reap_rx(&g, HDR).is_empty());
    let s = model.stats();
    assert_eq!(
        (s.tx_frames, s.rx_frames, s.steer_drops, s.bad_frames),
        (1000, 1000, 0, 0)
    );
    assert_eq!(dev.stats(1).unwrap().packets, 1000);
    assert_eq!(dev.stats(0).unwrap().packets, 1000);
    assert_eq!(dev.stats(0).unwrap().errors, 0);
    assert!(
        rx.interrupts() > 0 && tx.interrupts() > 0,
        "MSI-X wired to the call eventfds"
    );
    assert!(model.kicks(1) > 0 && model.kicks(0) > 0);

    // Another station's unicast is not ours; broadcast is.
    let other = frame([0x02, 9, 9, 9, 9, 9], 1, 7, 60);
    let bcast = frame([0xff; 6], 1, 8, 60);
    let sent = tx.transmit(&g, &dev, &[other, bcast.clone()], HDR);
    assert_eq!(sent, 2);
    let got = wait("broadcast", || {
        let r = rx.reap_rx(&g, HDR);
        (!r.is_empty()).then_some(r)
    });
    assert_eq!(got, vec![bcast]);
    assert_eq!(model.stats().steer_drops, 1);

    dev.close().unwrap();
    // Only the device's base resources remain (UAR, PD, TD, TIS).
    assert_eq!(
        model.live_objects() - model.firmware_pages(),
        4,
        "{:?}",
        model.census()
    );
    let dom = dev.domain().clone();
    drop(dev);
    assert_eq!(model.live_objects(), 0);
    assert_eq!(model.stats().leaked_objects, 0);
    assert_eq!(model.stats().leaked_pages, 0);
    assert_eq!(dom.faults().0, 0, "no IOMMU fault");
}

#[test]
fn loopback_split_msix() {
    loop_once("model", false);
}

#[test]
fn loopback_packed_msix() {
    loop_once("model", true);
}

#[test]
fn loopback_split_qp() {
    loop_once("model,event_mode=qp", false);
}

#[test]
fn loopback_packed_qp() {
    loop_once("model,event_mode=qp", true);
}

#[test]
fn poll_mode_raises_no_interrupts() {
    let (mut dev, model) = device("model,event_mode=poll");
    let g = Guest::new(dev.domain());
    let f = features(false);
    let mut rx = Ring::new(&g, 0, 64, f, true);
    let mut tx = Ring::new(&g, 1, 64, f, true);
    dev.configure(&conf(f, &[&rx, &tx])).unwrap();
    rx.post_rx(&dev, 64);
    let m = mac(&dev);
    let frames: Vec<Vec<u8>> = (0..200).map(|i| frame(m, 3, i, 128)).collect();
    assert_eq!(pump(&g, &dev, &mut rx, &mut tx, &frames), frames);
    assert_eq!(rx.interrupts() + tx.interrupts(), 0);
    drop(dev);
    assert_eq!(model.live_objects(), 0);
}

/// Guest → wire and wire → guest through a port (no loop): exact counts both ways.
#[test]
fn both_ways_through_a_port() {
    let (mut dev, model) = device("model,wire=port");
    let g = Guest::new(dev.domain());
    let f = features(false);
    let mut rx = Ring::new(&g, 0, 128, f, true);
    let mut tx = Ring::new(&g, 1, 128, f, true);
    dev.configure(&conf(f, &[&rx, &tx])).unwrap();
    let m = mac(&dev);

    // Guest → wire.
    let out: Vec<Vec<u8>> = (0..500)
        .map(|i| frame([0x02, 7, 7, 7, 7, 7], 2, i, 100))
        .collect();
    let mut sent = 0;
    let mut wire = Vec::new();
    wait("transmit to the wire", || {
        if sent < out.len() {
            sent += tx.transmit(&g, &dev, &out[sent..], HDR);
        }
        tx.reap_tx();
        wire.extend(model.take_tx());
        (wire.len() >= out.len()).then_some(())
    });
    assert_eq!(wire, out);

    // Wire → guest, never more frames in flight than the ring has buffers.
    let inbound: Vec<Vec<u8>> = (0..700)
        .map(|i| frame(m, 4, i, 64 + (i as usize % 900)))
        .collect();
    rx.post_rx(&dev, 128);
    let mut got = Vec::new();
    let mut sent = 0;
    wait("receive from the wire", || {
        while sent < inbound.len() && sent - got.len() < 128 {
            assert!(model.inject(&inbound[sent]));
            sent += 1;
        }
        let r = rx.reap_rx(&g, HDR);
        let n = r.len();
        got.extend(r);
        rx.post_rx(&dev, n);
        (got.len() >= inbound.len()).then_some(())
    });
    assert_eq!(got, inbound);
    // 128 buffers posted, 138 frames: the last 10 find none and are dropped, counted.
    for i in 0..138 {
        assert!(model.inject(&frame(m, 4, 1000 + i, 80)));
    }
    let s = wait("the frames counted", || {
        let s = model.stats();
        (s.rx_frames + s.rx_drops >= 838).then_some(s)
    });
    std::thread::sleep(Duration::from_millis(20));
    assert_eq!(model.stats(), s, "nothing more");
    assert_eq!(
        (
            s.tx_frames,
            s.rx_frames,
            s.rx_drops,
            s.steer_drops,
            s.tx_drops
        ),
        (500, 828, 10, 0, 0)
    );
    assert_eq!(rx.reap_rx(&g, HDR).len(), 128);
}

/// Four queue pairs: the RQT spreads flows over the receive queues by a symmetric Toeplitz
/// hash; each frame lands exactly once, on the queue the hash names, both directions alike.
#[test]
fn multiqueue_steering_by_flow() {
    let (mut dev, model) = device("model,queues=4,wire=port");
    assert_eq!(dev.max_queue_pairs(), 4);
    let g = Guest::new(dev.domain());
    let f = features(false);
    let mut rings: Vec<Ring> = (0..8).map(|i| Ring::new(&g, i, 256, f, true)).collect();
    let refs: Vec<&Ring> = rings.iter().collect();
    dev.configure(&conf(f, &refs)).unwrap();
    for r in rings.iter_mut().step_by(2) {
        r.post_rx(&dev, 256);
    }
    let m = mac(&dev);
    let mut expect: BTreeMap<u16, Vec<u32>> = BTreeMap::new();
    let mut n = 0u32;
    for flow in 0..64u16 {
        for k in 0..3 {
            let mut fr = frame(m, flow, n, 80);
            if k == 1 {
                // The reverse direction of the same flow: swap addresses and ports.
                let (s, d) = (fr[26..30].to_vec(), fr[30..34].to_vec());
                fr[26..30].copy_from_slice(&d);
                fr[30..34].copy_from_slice(&s);
                let (sp, dp) = (fr[34..36].to_vec(), fr[36..38].to_vec());
                fr[34..36].copy_from_slice(&dp);
                fr[36..38].copy_from_slice(&sp);
            }
            // The hash the TIR computes: addresses then ports, smaller endpoint first.
            let (a, b) = (
                (fr[26..30].to_vec(), fr[34..36].to_vec()),
                (fr[30..34].to_vec(), fr[36..38].to_vec()),
            );
            let (lo, hi) = if a <= b { (a, b) } else { (b, a) };
            let data = [lo.0, hi.0, lo.1, hi.1].concat();
            let q = (toeplitz(&RSS_KEY, &data) & 3) as u16 * 2;
            expect.entry(q).or_default().push(n);
            assert!(model.inject(&fr));
            n += 1;
        }
    }
    let mut got: BTreeMap<u16, Vec<u32>> = BTreeMap::new();
    wait("all flows delivered", || {
        for r in rings.iter_mut().step_by(2) {
            for fr in r.reap_rx(&g, HDR) {
                got.entry(r.index).or_default().push(seq_of(&fr));
            }
        }
        (got.values().map(Vec::len).sum::<usize>() >= n as usize).then_some(())
    });
    assert_eq!(got, expect);
    assert!(
        got.len() >= 3,
        "flows spread over the queues: {:?}",
        got.keys().collect::<Vec<_>>()
    );
    let all: BTreeSet<u32> = got.values().flatten().copied().collect();
    assert_eq!(all.len(), n as usize);
}

/// Suspend mid-traffic: the device stops where it is (positions read back), frames sent
/// meanwhile wait, resume delivers everything exactly once; then a close and a configure from
/// the read-back positions (what the binding does on a restart) continue exactly there.
#[test]
fn suspend_resume_and_restart_keep_positions() {
    let (mut dev, model) = device("model");
    let g = Guest::new(dev.domain());
    let f = features(false);
    let mut rx = Ring::new(&g, 0, 256, f, true);
    let mut tx = Ring::new(&g, 1, 256, f, true);
    dev.configure(&conf(f, &[&rx, &tx])).unwrap();
    rx.post_rx(&dev, 256);
    let m = mac(&dev);
    let frames: Vec<Vec<u8>> = (0..300).map(|i| frame(m, 5, i, 90)).collect();
    let mut got = pump(&g, &dev, &mut rx, &mut tx, &frames[..100]);

    // Mid-traffic: send 60, suspend at once.
    assert_eq!(tx.transmit(&g, &dev, &frames[100..160], HDR), 60);
    dev.suspend().unwrap();
    let s1 = (dev.vring_state(0).unwrap(), dev.vring_state(1).unwrap());
    // Nothing moves while suspended, even with kicks.
    assert_eq!(tx.transmit(&g, &dev, &frames[160..200], HDR), 40);
    std::thread::sleep(Duration::from_millis(60));
    let s2 = (dev.vring_state(0).unwrap(), dev.vring_state(1).unwrap());
    assert_eq!(s1, s2, "positions frozen while suspended");
    assert_eq!(
        s1.1.avail_idx, s1.1.used_idx,
        "split: every popped chain completed"
    );
    dev.resume().unwrap();
    got.extend(pump(&g, &dev, &mut rx, &mut tx, &[]));
    wait("the suspended frames", || {
        tx.reap_tx();
        let r = rx.reap_rx(&g, HDR);
        let n = r.len();
        got.extend(r);
        rx.post_rx(&dev, n);
        (got.len() >= 200).then_some(())
    });
    assert_eq!(got, frames[..200].to_vec());

    // Restart: read back, close, configure from the positions.
    std::thread::sleep(Duration::from_millis(20));
    tx.reap_tx();
    let (r0, r1) = (dev.vring_state(0).unwrap(), dev.vring_state(1).unwrap());
    assert_eq!(r1.avail_idx, 200);
    dev.close().unwrap();
    let c = DevConf {
        features: f,
        queues: vec![
            rx.vq_config(r0.avail_idx, r0.used_idx),
            tx.vq_config(r1.avail_idx, r1.used_idx),
        ],
        log: None,
        mtu: None,
    };
    dev.configure(&c).unwrap();
    let more = pump(&g, &dev, &mut rx, &mut tx, &frames[200..]);
    assert_eq!(more, frames[200..].to_vec());
    std::thread::sleep(Duration::from_millis(20));
    assert!(rx.reap_rx(&g, HDR).is_empty(), "no duplicates");
    assert_eq!(model.stats().rx_frames, 300);
}

/// A queue whose rings are unmapped from the DMA domain while it runs: the engine's next access
/// goes through the key to an IOVA the domain lacks, which is an IOMMU fault; the queue goes to
/// ERR and the driver reports it.
#[test]
fn unmapped_ring_is_an_iommu_fault() {
    let (mut dev, model) = device("model");
    let dom = dev.domain().clone();
    let g = Guest::new(&dom);
    let f = features(false);
    let mut rx = Ring::new(&g, 0, 64, f, true);
    let mut tx = Ring::new(&g, 1, 64, f, true);
    dev.configure(&conf(f, &[&rx, &tx])).unwrap();
    rx.post_rx(&dev, 64);
    let m = mac(&dev);
    pump(&g, &dev, &mut rx, &mut tx, &[frame(m, 1, 1, 60)]);
    assert_eq!(dom.faults().0, 0);
    dom.unmap(GPA, GUEST_MEM as u64).unwrap();
    let id = dev.queue_objects()[1].unwrap();
    tx.transmit(&g, &dev, &[frame(m, 1, 2, 60)], HDR);
    let (state, et, _, _) = wait("the queue to fail", || model.queue(id).filter(|q| q.0 == 3));
    assert_eq!((state, et), (3, queue_error::RING));
    assert!(dom.faults().0 > 0, "an IOMMU fault was recorded");
    let e = dev.vring_state(1).unwrap_err().to_string();
    assert!(e.contains("queue 1 is in ERR"), "{e}");
}

/// Rings the binding did not map are refused at configure with the address named.
#[test]
fn configure_refuses_unmapped_rings() {
    let (mut dev, model) = device("model");
    let g = Guest::new(dev.domain());
    let f = features(false);
    let rx = Ring::new(&g, 0, 64, f, false);
    let mut c = conf(f, &[&rx]);
    c.queues[0].desc = 0x7000_0000;
    let e = dev.configure(&c).unwrap_err().to_string();
    assert!(
        e.contains("descriptor table at IOVA 0x70000000 is not DMA-mapped"),
        "{e}"
    );
    // Nothing was left behind.
    assert_eq!(
        model.live_objects() - model.firmware_pages(),
        4,
        "{:?}",
        model.census()
    );
}

/// Guest memory in two regions with a hole between them (as below and above a 4 GiB PCI hole)
/// gets an indirect key (null key in the hole); a mapping far away (like the relay's mediated
/// rings) gets a physical-address key. Rings in one region, buffers in the other: traffic flows
/// either way.
#[test]
fn keys_over_several_regions() {
    for (far, what) in [
        (0x1_0000_0000u64, "indirect"),
        (0x2000_0000_0000, "physical"),
    ] {
        let (mut dev, model) = device("model");
        let g = Guest::with_regions(dev.domain(), &[GPA, far]);
        let f = features(false);
        let mut rx = Ring::with_buffers(&g, 0, 128, f, true, far);
        let mut tx = Ring::with_buffers(&g, 1, 128, f, true, far);
        dev.configure(&conf(f, &[&rx, &tx])).unwrap();
        let keys = model.census()[&vdpakit_pmd_mlx5::model::Kind::Mkey];
        assert_eq!(keys, if what == "indirect" { 3 } else { 1 }, "{what}");
        rx.post_rx(&dev, 128);
        let m = mac(&dev);
        let frames: Vec<Vec<u8>> = (0..300).map(|i| frame(m, 6, i, 200)).collect();
        assert_eq!(pump(&g, &dev, &mut rx, &mut tx, &frames), frames, "{what}");
        assert_eq!(dev.domain().faults().0, 0);
    }
}

/// Queue pairs enabled later (as after the guest's MQ_VQ_PAIRS_SET): disabled rings stay in
/// INIT and out of the RQT; enabling moves them to RDY and into the RQT, disabling suspends them
/// and takes them out again.
#[test]
fn enabling_pairs_follows_in_the_rqt() {
    let (mut dev, model) = device("model,queues=2,wire=port");
    let g = Guest::new(dev.domain());
    let f = features(false);
    let mut rings: Vec<Ring> = (0..4).map(|i| Ring::new(&g, i, 256, f, true)).collect();
    let refs: Vec<&Ring> = rings.iter().collect();
    let mut c = conf(f, &refs);
    c.queues[2].enabled = false;
    c.queues[3].enabled = false;
    dev.configure(&c).unwrap();
    for r in rings.iter_mut().step_by(2) {
        r.post_rx(&dev, 256);
    }
    let m = mac(&dev);
    let round = |dev: &Mlx5Vdpa, rings: &mut [Ring], seq0: u32| -> [usize; 2] {
        for flow in 0..64u16 {
            assert!(model.inject(&frame(m, flow, seq0 + u32::from(flow), 80)));
        }
        let mut got = [0usize; 2];
        wait("a round of flows", || {
            for (k, r) in rings.iter_mut().step_by(2).enumerate() {
                let n = r.reap_rx(&g, HDR).len();
                got[k] += n;
                r.post_rx(dev, n);
            }
            (got.iter().sum::<usize>() >= 64).then_some(())
        });
        got
    };
    assert_eq!(round(&dev, &mut rings, 0), [64, 0]);
    dev.set_vring_state(2, true).unwrap();
    dev.set_vring_state(3, true).unwrap();
    let spread = round(&dev, &mut rings, 100);
    assert!(spread[0] > 0 && spread[1] > 0, "{spread:?}");
    dev.set_vring_state(2, false).unwrap();
    assert_eq!(round(&dev, &mut rings, 200), [64, 0]);
    assert_eq!(model.stats().steer_drops, 0);
}

/// The doorbell page as a host notifier: every queue's notify area is the one page at the
/// doorbell offset, and writing a queue's index into it (as a guest does through QEMU's mapping
/// of it) rings that queue, without a register write.
#[test]
fn doorbell_page_is_every_queues_host_notifier() {
    use std::os::fd::AsFd;
    let (mut dev, model) = device("model");
    let g = Guest::new(dev.domain());
    let f = features(false);
    let mut rx = Ring::new(&g, 0, 64, f, true);
    let mut tx = Ring::new(&g, 1, 64, f, true);
    dev.configure(&conf(f, &[&rx, &tx])).unwrap();
    rx.post_rx(&dev, 64);
    let a0 = dev.notify_area(0).expect("queue 0 has a notify area");
    let a1 = dev.notify_area(1).expect("queue 1 has a notify area");
    assert!(dev.notify_area(2 * dev.max_queue_pairs()).is_none());
    assert_eq!((a0.offset, a0.size, a1.offset), (0, 4096, 0));
    let ino =
        |a: &vdpakit_core::pci::NotifyArea| nix::sys::stat::fstat(a.fd.as_fd()).unwrap().st_ino;
    assert_eq!(ino(&a0), ino(&a1), "one page for every queue");
    let m = mac(&dev);
    for (i, q) in [(0u32, 1u16), (1, 0), (2, 1)] {
        let before = model.kicks(q);
        if q == 1 {
            // A frame posted without a register doorbell: the page write is the kick.
            let fr = frame(m, 3, i, 70);
            assert_eq!(tx.transmit_quiet(&g, std::slice::from_ref(&fr), HDR), 1);
            nix::sys::uio::pwrite(a1.fd.as_fd(), &q.to_le_bytes(), a1.offset as i64).unwrap();
            let got = wait("the frame", || {
                let r = rx.reap_rx(&g, HDR);
                (!r.is_empty()).then_some(r)
            });
            assert_eq!(got, vec![fr]);
            rx.post_rx(&dev, 1);
        } else {
            nix::sys::uio::pwrite(a0.fd.as_fd(), &q.to_le_bytes(), a0.offset as i64).unwrap();
        }
        wait("the kick counted on its queue", || {
            (model.kicks(q) == before + 1).then_some(())
        });
    }
}

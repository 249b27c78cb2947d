//! The generic virtio PMD (`VpVdpa`, like vp_vdpa) against the modern virtio-net model:
//! bring-up, configuration space, datapath both ways (loop and cable), multiqueue through the
//! control queue, shared MSI-X vectors, reset mid-traffic, a model with one register moved, and
//! the injected faults.

mod common;

use std::sync::atomic::Ordering;
use std::time::Duration;

use common::*;
use vdpakit_core::vdpa::VdpaDevice;
use vdpakit_core::virtio::features as vf;
use vdpakit_core::virtio_pci::ModernTransport;
use vdpakit_pmd_virtio::model::regs::CommonLayout;
use vdpakit_pmd_virtio::model::{ModelSpec, ModelWire, Shape, VpModel};
use vdpakit_pmd_virtio::transport::{Transport, read_net_config};
use vdpakit_pmd_virtio::vdpa::{Flavor, VpOptions, VpVdpa};

fn model(name: &str, pairs: u16, f: impl FnOnce(&mut ModelSpec)) -> VpModel {
    let mut s = ModelSpec::virtio(name, pairs);
    f(&mut s);
    VpModel::new(s, None).expect("model")
}

fn probe(m: &VpModel, k: u16, opts: VpOptions) -> Result<VpVdpa, String> {
    VpVdpa::probe_modern(m.open(k).expect("open"), Flavor::VIRTIO, opts).map_err(|e| e.to_string())
}

#[test]
fn bring_up_reports_identity_features_and_config() {
    let m = model("vp-bringup", 2, |s| s.mtu = 9000);
    let d = probe(&m, 0, VpOptions::default()).unwrap();
    assert_eq!(d.max_queue_pairs(), 2);
    assert_eq!(d.max_queue_size(), 1024);
    let f = d.features();
    assert_ne!(f & vf::VERSION_1, 0);
    assert_eq!(
        f & vf::ACCESS_PLATFORM,
        0,
        "ACCESS_PLATFORM is the PMD's, not the guest's"
    );
    assert_ne!(f & vf::NET_MQ, 0);
    let c = d.net_config();
    assert_eq!(c.mac, m.spec().mac_of(0));
    assert_eq!((c.mtu, c.status, c.max_queue_pairs), (9000, 1, 2));
    assert!(
        d.notify_area(1).is_some(),
        "page-per-queue doorbells are mappable"
    );
    assert_eq!(d.nr_vring(), 5, "two pairs and a control queue");
}

#[test]
fn config_space_follows_link_changes_with_a_new_generation() {
    let m = model("vp-config", 1, |_| {});
    let t = ModernTransport::probe(m.open(0).unwrap()).unwrap();
    let g0 = t.generation().unwrap();
    let tr = Transport::Modern(t.clone());
    let c = read_net_config(&tr, vf::NET_STATUS | vf::NET_MAC | vf::NET_MTU).unwrap();
    assert!(c.link_up);
    assert_eq!(c.mtu, Some(1500));
    m.function(0).unwrap().set_link(false);
    assert_ne!(t.generation().unwrap(), g0, "config_generation moves");
    let c = read_net_config(&tr, vf::NET_STATUS).unwrap();
    assert!(!c.link_up);
    assert_eq!(
        t.isr().unwrap() & 2,
        2,
        "ISR bit 1 marks a configuration change"
    );
    assert_eq!(t.isr().unwrap(), 0, "ISR clears on read");
}

#[test]
fn loop_datapath_both_ways_exact() {
    let m = model("vp-loop", 1, |_| {});
    let d = probe(&m, 0, VpOptions::default()).unwrap();
    let mut r = Rig::new(Box::new(d), 1, QSIZE, FEATURES | vf::RING_EVENT_IDX, false);
    r.start();
    exchange(&mut r, None, 0, 1000, 0);
    let rx = m.stats(0, 0).unwrap();
    let tx = m.stats(0, 1).unwrap();
    let bytes: u64 = (0..1000).map(|i| size_of(i) as u64).sum();
    assert_eq!((tx.packets, tx.bytes, tx.errors), (1000, bytes, 0));
    assert_eq!((rx.packets, rx.bytes, rx.dropped), (1000, bytes, 0));
    assert!(tx.kicks > 0);
    assert!(rx.interrupts > 0, "MSI-X raised: {rx:?}");
    assert!(
        take_count(&r.rx[0].call) > 0,
        "the call eventfd of queue 0 was signalled"
    );
    assert_eq!(r.dev.domain().faults().0, 0);
}

#[test]
fn cable_between_two_functions_both_ways() {
    let m = model("vp-cable", 1, |s| {
        s.functions = 2;
        s.wire = ModelWire::Cable;
    });
    let mut a = Rig::new(
        Box::new(probe(&m, 0, VpOptions::default()).unwrap()),
        1,
        QSIZE,
        FEATURES,
        false,
    );
    let mut b = Rig::new(
        Box::new(probe(&m, 1, VpOptions::default()).unwrap()),
        1,
        QSIZE,
        FEATURES,
        false,
    );
    a.start();
    b.start();
    exchange(&mut a, Some(&mut b), 0, 500, 0);
    exchange(&mut b, Some(&mut a), 0, 500, 7000);
    assert_eq!(m.stats(0, 1).unwrap().packets, 500);
    assert_eq!(m.stats(1, 0).unwrap().packets, 500);
    assert_eq!(m.stats(1, 1).unwrap().packets, 500);
    assert_eq!(m.stats(0, 0).unwrap().packets, 500);
}

#[test]
fn multiqueue_sets_the_pairs_through_the_control_queue() {
    let m = model("vp-mq", 2, |_| {});
    let d = probe(&m, 0, VpOptions::default()).unwrap();
    let feats = FEATURES | vf::NET_MQ | vf::NET_CTRL_VQ;
    let mut r = Rig::new(Box::new(d), 2, QSIZE, feats, false);
    r.start();
    let f = m.function(0).unwrap();
    assert_eq!(f.ctrl_commands(), 1, "one VQ_PAIRS_SET");
    assert_eq!(f.active_pairs(), 2);
    exchange(&mut r, None, 0, 200, 0);
    exchange(&mut r, None, 1, 200, 300);
    assert_eq!(m.stats(0, 3).unwrap().packets, 200, "pair 1 transmit");
    assert_eq!(m.stats(0, 2).unwrap().packets, 200, "pair 1 receive");
}

#[test]
fn shared_vector_fans_out_to_every_call_fd() {
    let m = model("vp-shared", 2, |_| {});
    let d = probe(&m, 0, VpOptions { irq_limit: Some(2) }).unwrap();
    let feats = FEATURES | vf::NET_MQ | vf::NET_CTRL_VQ;
    let mut r = Rig::new(Box::new(d), 2, QSIZE, feats, false);
    r.start();
    exchange(&mut r, None, 1, 50, 0);
    std::thread::sleep(Duration::from_millis(50));
    for q in [&r.rx[0], &r.rx[1], &r.tx[0], &r.tx[1]] {
        assert!(
            take_count(&q.call) > 0,
            "call fd of queue {} signalled",
            q.index
        );
    }
    let st = r.dev.stats(0).unwrap();
    assert!(st.interrupts > 0, "fan-out counted: {st:?}");
}

#[test]
fn one_vector_carries_everything() {
    let m = model("vp-irq", 1, |s| s.msix_vectors = Some(1));
    let d = probe(&m, 0, VpOptions::default()).unwrap();
    let mut r = Rig::new(Box::new(d), 1, QSIZE, FEATURES, false);
    r.start();
    exchange(&mut r, None, 0, 50, 0);
    assert!(take_count(&r.rx[0].call) + take_count(&r.tx[0].call) > 0);
    r.dev.close().unwrap();
}

#[test]
fn reset_mid_traffic_then_start_again() {
    let m = model("vp-reset", 1, |_| {});
    let d = probe(&m, 0, VpOptions::default()).unwrap();
    let mut r = Rig::new(Box::new(d), 1, QSIZE, FEATURES, false);
    r.start();
    r.post_rx(0, 100);
    let batch: Vec<Vec<u8>> = (0..40).map(|i| frame(r.mac, i, 200)).collect();
    r.send(0, &batch);
    // Close while frames may still be in flight, then a fresh set of rings from position 0.
    r.dev.close().unwrap();
    r.fresh_queues();
    r.start();
    exchange(&mut r, None, 0, 300, 1000);
    // A restart at a position the function cannot be told is refused by name.
    let e = r.dev.configure(&r.conf(5, None)).unwrap_err().to_string();
    assert!(e.contains("avail 0x5") && e.contains("no register"), "{e}");
    assert!(
        r.dev.vring_state(0).is_err(),
        "no state readback on a plain virtio function"
    );
}

#[test]
fn a_moved_queue_register_fails_configure_by_name() {
    let m = model("vp-moved", 1, |s| {
        if let Shape::Modern(sh) = &mut s.shape {
            sh.common_regs = CommonLayout {
                q_desc: 0x38,
                ..CommonLayout::SPEC
            };
        }
    });
    let d = probe(&m, 0, VpOptions::default()).unwrap();
    let mut r = Rig::new(Box::new(d), 1, QSIZE, FEATURES, false);
    let e = r.dev.configure(&r.conf(0, None)).unwrap_err().to_string();
    assert!(e.contains("queue_desc") && e.contains("reads back"), "{e}");
}

#[test]
fn a_moved_vector_register_fails_probe_by_name() {
    let m = model("vp-moved-vec", 1, |s| {
        if let Shape::Modern(sh) = &mut s.shape {
            sh.common_regs = CommonLayout {
                q_msix: 0x3a,
                ..CommonLayout::SPEC
            };
        }
    });
    let e = probe(&m, 0, VpOptions::default()).unwrap_err();
    assert!(
        e.contains("queue_msix_vector") && e.contains("reads back"),
        "{e}"
    );
}

#[test]
fn bad_devices_fail_probe_naming_device_register_and_value() {
    // A reset that never completes.
    let m = model("vp-stuck", 1, |_| {});
    let f = m.function(0).unwrap();
    let dev = m.open(0).unwrap();
    let t = ModernTransport::probe(dev.clone()).unwrap();
    t.set_status(1).unwrap();
    f.faults.stuck_reset.store(true, Ordering::Relaxed);
    let e = VpVdpa::probe_modern(dev, Flavor::VIRTIO, VpOptions::default())
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("model:vp-stuck-f0")
            && e.contains("device_status")
            && e.contains("still reads 0x1"),
        "{e}"
    );
    // MSI-X vectors refused: 0xffff read back.
    let m = model("vp-novec", 1, |_| {});
    m.function(0)
        .unwrap()
        .faults
        .refuse_vectors
        .store(true, Ordering::Relaxed);
    let e = probe(&m, 0, VpOptions::default()).unwrap_err();
    assert!(e.contains("vp-novec") && e.contains("0xffff"), "{e}");
    // A mandatory capability missing.
    let m = model("vp-noisr", 1, |s| {
        if let Shape::Modern(sh) = &mut s.shape {
            sh.omit_cap = Some(3);
        }
    });
    let e = probe(&m, 0, VpOptions::default()).unwrap_err();
    assert!(
        e.contains("vp-noisr") && e.contains("no virtio ISR capability"),
        "{e}"
    );
    // No VERSION_1, no ACCESS_PLATFORM.
    for (name, bit, word) in [
        ("vp-nov1", vf::VERSION_1, "VERSION_1"),
        ("vp-noap", vf::ACCESS_PLATFORM, "ACCESS_PLATFORM"),
    ] {
        let m = model(name, 1, |s| s.features &= !bit);
        let e = probe(&m, 0, VpOptions::default()).unwrap_err();
        assert!(
            e.contains(name)
                && e.contains("device_feature")
                && e.contains(word)
                && e.contains("reads 0x"),
            "{e}"
        );
    }
    // A capability pointing outside its BAR.
    let m = model("vp-outside", 1, |s| {
        if let Shape::Modern(sh) = &mut s.shape {
            sh.device.len = 0x10_0000;
        }
    });
    let e = probe(&m, 0, VpOptions::default()).unwrap_err();
    assert!(
        e.contains("vp-outside") && e.contains("outside the BAR"),
        "{e}"
    );
}

#[test]
fn dropped_doorbells_are_counted_and_traffic_still_flows() {
    let m = model("vp-dropbell", 1, |_| {});
    let d = probe(&m, 0, VpOptions::default()).unwrap();
    let mut r = Rig::new(Box::new(d), 1, QSIZE, FEATURES, false);
    r.start();
    m.function(0)
        .unwrap()
        .faults
        .drop_doorbell
        .store(true, Ordering::Relaxed);
    exchange(&mut r, None, 0, 100, 0);
    let f = m.function(0).unwrap();
    assert!(f.dropped_doorbells() > 0);
    assert_eq!(
        m.stats(0, 1).unwrap().kicks,
        0,
        "no kick reached the engine"
    );
    assert_eq!(
        m.stats(0, 1).unwrap().packets,
        100,
        "the engine polls the rings"
    );
}

#[test]
fn an_iommu_fault_stops_the_queue_and_shows_in_stats() {
    let m = model("vp-iommu", 1, |_| {});
    m.function(0)
        .unwrap()
        .faults
        .iommu_fault
        .store(true, Ordering::Relaxed);
    let d = probe(&m, 0, VpOptions::default()).unwrap();
    let mut r = Rig::new(Box::new(d), 1, QSIZE, FEATURES, false);
    let e = r.dev.configure(&r.conf(0, None)).unwrap_err().to_string();
    assert!(e.contains("NEEDS_RESET"), "{e}");
    assert!(m.stats(0, 0).unwrap().iommu_faults >= 1);
    assert!(r.dev.domain().faults().0 >= 1);
    // The fault was one-shot: a new configure works.
    r.start();
    exchange(&mut r, None, 0, 50, 0);
}

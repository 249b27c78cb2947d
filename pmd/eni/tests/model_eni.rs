//! The ENI PMD against the legacy virtio-net model: bring-up, the legacy layout rules (fixed
//! queue size, contiguous rings, 32-bit features, MRG_RXBUF, the device configuration moving to
//! 0x18 with MSI-X), datapath both ways, reset mid-traffic, a moved register, bad devices.

#[path = "../../virtio/tests/common/mod.rs"]
mod common;

use std::os::fd::OwnedFd;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use common::*;
use vdpakit_core::vdpa::VdpaDevice;
use vdpakit_core::virtio::features as vf;
use vdpakit_core::virtio_pci::LegacyTransport;
use vdpakit_pmd_eni::{probe_device, probe_legacy};
use vdpakit_pmd_virtio::model::regs::LegacyLayout;
use vdpakit_pmd_virtio::model::{LegacyShape, ModelSpec, Shape, VpModel};
use vdpakit_pmd_virtio::vdpa::{VpOptions, VpVdpa};

fn model(name: &str, f: impl FnOnce(&mut ModelSpec)) -> VpModel {
    let mut s = ModelSpec::eni(name, 1);
    f(&mut s);
    VpModel::new(s, None).expect("model")
}

fn probe(m: &VpModel) -> Result<VpVdpa, String> {
    probe_device(m.open(0).unwrap(), VpOptions::default()).map_err(|e| e.to_string())
}

#[test]
fn bring_up_offers_version_1_with_mrg_rxbuf() {
    let m = model("eni-up", |s| s.max_queue_size = 128);
    let d = probe(&m).unwrap();
    let f = d.features();
    assert_ne!(
        f & vf::VERSION_1,
        0,
        "a legacy header with MRG_RXBUF is the VERSION_1 header"
    );
    assert_ne!(f & vf::NET_MRG_RXBUF, 0);
    assert_eq!(d.max_queue_size(), 128, "fixed by QUEUE_NUM");
    assert_eq!(d.net_config().mac, m.spec().mac_of(0));
    assert!(
        d.notify_area(0).is_none(),
        "a legacy doorbell cannot be mapped"
    );
}

#[test]
fn loop_datapath_both_ways_exact() {
    let m = model("eni-loop", |_| {});
    let mut r = Rig::new(Box::new(probe(&m).unwrap()), 1, 256, FEATURES, true);
    r.start();
    exchange(&mut r, None, 0, 1000, 0);
    let bytes: u64 = (0..1000).map(|i| size_of(i) as u64).sum();
    assert_eq!(m.stats(0, 1).unwrap().bytes, bytes);
    assert_eq!(m.stats(0, 0).unwrap().packets, 1000);
    assert!(
        take_count(&r.rx[0].call) > 0,
        "MSI-X vector 0 reached queue 0's call fd"
    );
    // Reset mid-traffic, fresh rings, again.
    r.post_rx(0, 50);
    let batch: Vec<Vec<u8>> = (0..30).map(|i| frame(r.mac, i, 300)).collect();
    r.send(0, &batch);
    r.dev.close().unwrap();
    r.fresh_queues();
    r.start();
    exchange(&mut r, None, 0, 200, 5000);
}

#[test]
fn legacy_rules_are_enforced_by_name() {
    let m = model("eni-rules", |_| {});
    // No MRG_RXBUF from the front end.
    let mut r = Rig::new(Box::new(probe(&m).unwrap()), 1, 256, vf::VERSION_1, true);
    let e = r.dev.configure(&r.conf(0, None)).unwrap_err().to_string();
    assert!(e.contains("did not negotiate 0x8000"), "{e}");
    // Rings not in the contiguous layout.
    let mut r = Rig::new(Box::new(probe(&m).unwrap()), 1, 256, FEATURES, false);
    let e = r.dev.configure(&r.conf(0, None)).unwrap_err().to_string();
    assert!(e.contains("contiguous legacy layout"), "{e}");
    // A size other than the fixed one.
    let mut r = Rig::new(Box::new(probe(&m).unwrap()), 1, 128, FEATURES, true);
    let e = r.dev.configure(&r.conf(0, None)).unwrap_err().to_string();
    assert!(e.contains("QUEUE_NUM") && e.contains("256"), "{e}");
}

#[test]
fn device_config_moves_to_0x18_with_msix() {
    let m = model("eni-cfg", |_| {});
    let dev = m.open(0).unwrap();
    let mut t = LegacyTransport::new(dev.clone()).unwrap();
    let mut mac = [0u8; 6];
    t.read_device_config(0, &mut mac).unwrap();
    assert_eq!(mac, m.spec().mac_of(0), "0x14 without MSI-X");
    let fd: Arc<OwnedFd> = eventfd();
    dev.set_msix(&[Some(fd)]).unwrap();
    t.set_vectors(Some(0), &[(0, 0)]).unwrap();
    assert_eq!(t.config_offset(), 0x18);
    let mut mac2 = [0u8; 6];
    t.read_device_config(0, &mut mac2).unwrap();
    assert_eq!(mac2, mac, "0x18 with MSI-X");
}

#[test]
fn a_moved_pfn_register_fails_configure_by_name() {
    let m = model("eni-moved", |s| {
        s.shape = Shape::Legacy(LegacyShape {
            regs: LegacyLayout {
                pfn: 0x3c,
                ..LegacyLayout::SPEC
            },
            ..LegacyShape::default()
        });
    });
    let mut r = Rig::new(Box::new(probe(&m).unwrap()), 1, 256, FEATURES, true);
    let e = r.dev.configure(&r.conf(0, None)).unwrap_err().to_string();
    assert!(e.contains("QUEUE_PFN") && e.contains("reads back"), "{e}");
}

#[test]
fn bad_devices_fail_probe_by_name() {
    let m = model("eni-stuck", |_| {});
    let dev = m.open(0).unwrap();
    let t = LegacyTransport::new(dev.clone()).unwrap();
    t.set_status(3).unwrap();
    m.function(0)
        .unwrap()
        .faults
        .stuck_reset
        .store(true, Ordering::Relaxed);
    let e = probe_device(dev, VpOptions::default())
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("eni-stuck") && e.contains("STATUS (legacy BAR0 +0x12) still reads 0x3"),
        "{e}"
    );
    // Not a legacy function (revision 1, modern device ID).
    let v = VpModel::new(ModelSpec::virtio("eni-modern", 1), None).unwrap();
    let e = probe_legacy(v.open(0).unwrap()).unwrap_err().to_string();
    assert!(e.contains("1af4:1041") || e.contains("revision"), "{e}");
    // No MSI-X.
    let m = model("eni-nomsix", |s| s.msix_vectors = Some(0));
    let e = probe(&m).unwrap_err();
    assert!(e.contains("no MSI-X"), "{e}");
}

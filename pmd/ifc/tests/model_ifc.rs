//! The IFC PMD against the IFC VF model: bring-up (IDs, live-migration region, per-queue MSI-X),
//! datapath both ways, ring state saved and restored across a close (no frame lost or
//! repeated), hardware dirty logging of every buffer the device wrote, the software-relay
//! option, `force=1` on a plain virtio function, and a model with the state slots moved.

#[path = "../../virtio/tests/common/mod.rs"]
mod common;

use std::time::Duration;

use common::*;
use vdpakit_core::mem::{MemMode, Segment};
use vdpakit_core::vdpa::{LogConfig, LogSupport, VdpaDevice, VqState};
use vdpakit_core::virtio::{GuestMemory, GuestRegion, features as vf};
use vdpakit_pmd_ifc::model::{LmHook, regs::LmLayout, spec};
use vdpakit_pmd_ifc::{IfcOptions, IfcVdpa};
use vdpakit_pmd_virtio::irq::IrqMode;
use vdpakit_pmd_virtio::model::{ModelSpec, VpModel};
use vdpakit_pmd_virtio::vdpa::VpOptions;

fn ifc_model(name: &str, pairs: u16, layout: LmLayout) -> VpModel {
    VpModel::new(spec(name, pairs), Some(&move |_| LmHook::hook(layout))).expect("model")
}

fn probe(m: &VpModel, opts: IfcOptions) -> Result<IfcVdpa, String> {
    IfcVdpa::probe(m.open(0).unwrap(), opts).map_err(|e| e.to_string())
}

const LOG_IOVA: u64 = 0x1000_0000_0000;

#[test]
fn bring_up_with_lm_region_and_per_queue_vectors() {
    let m = ifc_model("ifc-up", 2, LmLayout::FACTS);
    let d = probe(&m, IfcOptions::default()).unwrap();
    assert!(d.has_lm_region());
    assert_eq!(d.log_support(), LogSupport::Hardware);
    assert_eq!(d.max_queue_pairs(), 2, "(num_queues - 1) / 2");
    let mut r = Rig::new(Box::new(d), 2, QSIZE, FEATURES | vf::NET_MQ, false);
    r.start();
    exchange(&mut r, None, 0, 300, 0);
    exchange(&mut r, None, 1, 300, 1000);
    let sw = probe(
        &ifc_model("ifc-sw", 1, LmLayout::FACTS),
        IfcOptions {
            sw_live_migration: true,
            ..Default::default()
        },
    )
    .unwrap();
    assert_eq!(sw.log_support(), LogSupport::None, "sw-live-migration=1");
}

#[test]
fn msix_layouts() {
    let m = ifc_model("ifc-irq", 1, LmLayout::FACTS);
    let d = probe(&m, IfcOptions::default()).unwrap();
    let mut r = Rig::new(Box::new(d), 1, QSIZE, FEATURES, false);
    r.start();
    exchange(&mut r, None, 0, 20, 0);
    let m2 = ifc_model("ifc-irq-shared", 1, LmLayout::FACTS);
    let d2 = probe(
        &m2,
        IfcOptions {
            vp: VpOptions { irq_limit: Some(2) },
            ..Default::default()
        },
    )
    .unwrap();
    let mut r2 = Rig::new(Box::new(d2), 1, QSIZE, FEATURES, false);
    r2.start();
    exchange(&mut r2, None, 0, 20, 0);
    std::thread::sleep(Duration::from_millis(20));
    assert!(take_count(&r2.rx[0].call) > 0 && take_count(&r2.tx[0].call) > 0);
    let st = r2.dev.stats(0).unwrap();
    assert!(
        st.interrupts > 0,
        "the shared vector was fanned out: {st:?}"
    );
    drop(r);
    let d3 = probe(
        &ifc_model("ifc-irq-3", 1, LmLayout::FACTS),
        IfcOptions::default(),
    )
    .unwrap();
    assert_eq!(d3.inner().irq_mode(), None);
    let _ = IrqMode::PerQueue;
}

fn state_all(d: &mut dyn VdpaDevice, n: u16) -> Vec<VqState> {
    (0..n).map(|q| d.vring_state(q).unwrap()).collect()
}

#[test]
fn ring_state_survives_a_close_and_restart() {
    let m = ifc_model("ifc-state", 1, LmLayout::FACTS);
    let d = probe(&m, IfcOptions::default()).unwrap();
    let mut r = Rig::new(Box::new(d), 1, QSIZE, FEATURES, false);
    r.start();
    exchange(&mut r, None, 0, 300, 0);
    let st = state_all(r.dev.as_mut(), 2);
    assert_eq!(
        st[1],
        VqState {
            avail_idx: 300,
            used_idx: 300
        },
        "tx"
    );
    assert_eq!(st[0].used_idx, 300, "rx used");
    r.dev.close().unwrap();
    // Same rings, restarted where the device stopped: the guest notices nothing.
    let mut c = r.conf(0, None);
    for q in &mut c.queues {
        q.avail_idx = st[usize::from(q.index)].avail_idx;
        q.used_idx = st[usize::from(q.index)].used_idx;
    }
    r.dev.configure(&c).unwrap();
    exchange(&mut r, None, 0, 300, 300);
    assert_eq!(m.stats(0, 1).unwrap().packets, 600);
    assert_eq!(r.dev.vring_state(1).unwrap().used_idx, 600);
}

#[test]
fn every_buffer_the_device_wrote_is_logged() {
    let m = ifc_model("ifc-log", 1, LmLayout::FACTS);
    let d = probe(&m, IfcOptions::default()).unwrap();
    let mut r = Rig::new(Box::new(d), 1, QSIZE, FEATURES | vf::VHOST_F_LOG_ALL, false);
    // The bitmap: one bit per 4 KiB page of guest memory, mapped at LOG_IOVA.
    let pages = (BASE + GUEST_LEN as u64) / 4096;
    let size = pages.div_ceil(8);
    let seg = Segment::new("ifc-log", size as usize, MemMode::NoHuge).unwrap();
    let region = GuestRegion::from_segment(&seg).rebased(LOG_IOVA, LOG_IOVA);
    r.dev.domain().map(LOG_IOVA, &region).unwrap();
    let bitmap = GuestMemory::new(vec![region]).unwrap();
    let log = LogConfig {
        iova: LOG_IOVA,
        size,
    };
    let c = r.conf(0, Some(log));
    r.dev.configure(&c).unwrap();
    r.post_rx(0, 100);
    let frames: Vec<Vec<u8>> = (0..64).map(|i| frame(r.mac, i, 1000)).collect();
    r.send(0, &frames);
    let mut written = Vec::new();
    let end = std::time::Instant::now() + Duration::from_secs(5);
    while written.len() < 64 && std::time::Instant::now() < end {
        match r.rx[0].reap() {
            Some((gpa, len)) => written.push((gpa, len)),
            None => std::thread::sleep(Duration::from_micros(100)),
        }
    }
    assert_eq!(written.len(), 64);
    let bit = |gpa: u64| {
        let page = gpa / 4096;
        let mut b = [0u8];
        bitmap.read(LOG_IOVA + page / 8, &mut b).unwrap();
        b[0] & (1 << (page % 8)) != 0
    };
    for &(gpa, len) in &written {
        assert!(
            bit(gpa) && bit(gpa + u64::from(len) - 1),
            "buffer {gpa:#x} logged"
        );
    }
    assert!(bit(r.rx[0].cfg.used), "the used ring page is logged");
    // Logging off (the device may still mark the pages of what it writes while the request
    // is being applied: clear the bitmap after): a new buffer's page is not marked.
    r.dev.set_features(FEATURES, None).unwrap();
    std::thread::sleep(Duration::from_millis(50));
    let mut zero = vec![0u8; size as usize];
    bitmap.write(LOG_IOVA, &zero).unwrap();
    r.send(0, &frames[..4]);
    let back = r.recv(0, 4, Duration::from_secs(5));
    assert_eq!(back.len(), 4);
    bitmap.read(LOG_IOVA, &mut zero).unwrap();
    let set: Vec<u64> = zero
        .iter()
        .enumerate()
        .filter(|(_, b)| **b != 0)
        .map(|(i, b)| (i as u64 * 8 + u64::from(b.trailing_zeros())) * 4096)
        .collect();
    assert!(
        set.is_empty(),
        "nothing logged with logging off: pages {set:x?}"
    );
    // And on again through set_features.
    r.dev
        .set_features(FEATURES | vf::VHOST_F_LOG_ALL, Some(log))
        .unwrap();
    r.post_rx(0, 4);
    r.send(0, &frames[..4]);
    let back = r.recv(0, 4, Duration::from_secs(5));
    assert_eq!(back.len(), 4);
    bitmap.read(LOG_IOVA, &mut zero).unwrap();
    assert!(zero.iter().any(|&b| b != 0), "logging resumed");
}

#[test]
fn moved_state_slots_fail_the_restore_loudly() {
    let moved = LmLayout {
        vq_state: 0x40,
        ..LmLayout::FACTS
    };
    let m = ifc_model("ifc-moved", 1, moved);
    let d = probe(&m, IfcOptions::default()).unwrap();
    let mut r = Rig::new(Box::new(d), 1, QSIZE, FEATURES, false);
    let e = r.dev.configure(&r.conf(7, None)).unwrap_err().to_string();
    assert!(e.contains("LM state slot") && e.contains("reads"), "{e}");
}

#[test]
fn ids_and_force() {
    // A plain virtio function: refused without force, driven without the region with it.
    let v = VpModel::new(ModelSpec::virtio("ifc-plain", 1), None).unwrap();
    let e = IfcVdpa::probe(v.open(0).unwrap(), IfcOptions::default())
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("1af4:1041 subsystem 1af4:1100") && e.contains("force=1"),
        "{e}"
    );
    let d = IfcVdpa::probe(
        v.open(0).unwrap(),
        IfcOptions {
            force: true,
            ..Default::default()
        },
    )
    .unwrap();
    assert!(
        !d.has_lm_region(),
        "QEMU-like layout: common configuration at BAR4 0"
    );
    assert_eq!(d.log_support(), LogSupport::None);
    let mut r = Rig::new(Box::new(d), 1, QSIZE, FEATURES, false);
    r.start();
    exchange(&mut r, None, 0, 100, 0);
    // Real IDs but the structures where the region is: refused, naming the overlap.
    let mut s = ModelSpec::virtio("ifc-overlap", 1);
    s.id = spec("x", 1).id;
    s.ctrl_vq = true;
    s.features |= vf::NET_CTRL_VQ;
    let o = VpModel::new(s, None).unwrap();
    let e = IfcVdpa::probe(o.open(0).unwrap(), IfcOptions::default())
        .unwrap_err()
        .to_string();
    assert!(e.contains("overlaps the IFC live-migration region"), "{e}");
}

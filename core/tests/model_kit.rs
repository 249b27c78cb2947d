//! The engine as a vendor model reuses it: a minimal `DeviceModel` of our own (no registers at
//! all) that drives `VfControl` directly, as a model's register handlers would; with the two
//! hooks a richer model needs: a per-queue memory view (its own address translation, e.g.
//! memory keys) and receive steering (its flow table / RSS).

mod model_common;

use std::sync::Arc;
use std::time::Duration;

use model_common::*;
use vdpakit_core::model::PollMode;
use vdpakit_core::model::engine::{self, EngineShared, QueueSetup, QueueView, VfShared};
use vdpakit_core::model::eswitch::Wire;
use vdpakit_core::pci::model::{DeviceModel, ModelBus};
use vdpakit_core::pci::{DmaDomain, PciDevice};
use vdpakit_core::virtio::{GuestMemory, GuestRegion, features as vf};

#[derive(Debug)]
struct Mini {
    vf: Arc<VfShared>,
    engine: Arc<EngineShared>,
}

impl DeviceModel for Mini {
    fn name(&self) -> &str {
        "mini"
    }
    fn config_read(&self, _offset: u16, buf: &mut [u8]) {
        buf.fill(0);
    }
    fn config_write(&self, _offset: u16, _buf: &[u8]) {}
    fn bar_len(&self, bar: u8) -> u64 {
        if bar == 0 { 0x1000 } else { 0 }
    }
    fn bar_read(&self, _bar: u8, _offset: u64, buf: &mut [u8]) {
        buf.fill(0);
    }
    fn bar_write(&self, _bar: u8, _offset: u64, _buf: &[u8]) {}
    fn msix_vectors(&self) -> u16 {
        self.vf.queues() + 1
    }
    fn reset(&self) {}
    fn attach(&self, bus: ModelBus) {
        self.vf.set_bus(bus);
        self.engine.sync(&self.vf).unwrap();
    }
}

/// Key space: pair 0's rings and buffers are addressed there, not by IOVA.
const KEY: u64 = 0x5000_0000_0000;

fn setup(q: &Vq, vector: u16) -> QueueSetup {
    QueueSetup {
        size: q.cfg.size,
        desc: q.cfg.desc,
        driver: q.cfg.avail,
        device: q.cfg.used,
        enabled: true,
        vector,
        avail: Some(0),
        used: Some(0),
    }
}

#[test]
fn a_vendor_model_with_its_own_translation_and_steering() {
    let mac = [0x02, 0, 0, 0, 0, 0x10];
    let vfs = Arc::new(VfShared::new(0, 2, mac).unwrap());
    let engine =
        Arc::new(EngineShared::new("mini", vec![Arc::clone(&vfs)], PollMode::Adaptive).unwrap());
    let _thread = engine::spawn(Arc::clone(&engine), vec![Wire::Loop(None)]).unwrap();
    let domain = DmaDomain::model();
    let g = Guest::new(&domain, BASE, GUEST_LEN);
    let model = Arc::new(Mini {
        vf: Arc::clone(&vfs),
        engine: Arc::clone(&engine),
    });
    let pci: PciDevice = vdpakit_core::pci::model::open(model, &domain).unwrap();
    // The key-space view of the same memory (what the model's translation would give).
    let keyed = Guest {
        mem: GuestMemory::new(vec![GuestRegion::from_segment(&g.seg).rebased(KEY, KEY)]).unwrap(),
        base: KEY,
        seg: Arc::clone(&g.seg),
    };
    let features = BASE_FEATURES | vf::NET_MQ;
    // Pair 0 in key space, pair 1 by IOVA.
    let mut rx0 = Vq::new(&keyed, 0, KEY, KEY + 0x10_0000, features);
    let mut tx0 = Vq::new(&keyed, 1, KEY + 0x10000, KEY + 0x30_0000, features);
    let mut rx1 = Vq::new(&g, 2, BASE + 0x20000, BASE + 0x60_0000, features);
    pci.set_msix(&[
        Some(Arc::clone(&rx0.call)),
        None,
        Some(Arc::clone(&rx1.call)),
        None,
    ])
    .unwrap();
    let tx1 = Vq::new(&g, 3, BASE + 0x30000, BASE + 0x70_0000, features);
    {
        let mut c = vfs.ctl();
        c.features = features;
        c.queues[0] = setup(&rx0, 0);
        c.queues[1] = setup(&tx0, engine::NO_VECTOR);
        c.queues[2] = setup(&rx1, 2);
        c.queues[3] = setup(&tx1, engine::NO_VECTOR);
        let view: Arc<dyn QueueView> = Arc::new(keyed.mem.clone());
        c.queue_mem = vec![Some(Arc::clone(&view)), Some(view), None, None];
        // Steering: an odd last destination byte → pair 1, 0xff → a pair that does not exist.
        c.steer = Some(Arc::new(|f: &[u8]| match f[5] {
            0xff => 7,
            b => u16::from(b & 1),
        }));
        c.running = true;
    }
    engine.sync(&vfs).unwrap();
    for _ in 0..16 {
        rx0.post(RXBUF, true).unwrap();
        rx1.post(RXBUF, true).unwrap();
    }
    rx0.dq.publish_avail();
    rx1.dq.publish_avail();
    // Ten frames on pair 0's transmit queue (key space): even, odd, and two unsteerable.
    let dsts: Vec<[u8; 6]> = (0..10u8)
        .map(|i| [0x02, 0, 0, 0, 0, if i >= 8 { 0xff } else { i }])
        .collect();
    for (i, d) in dsts.iter().enumerate() {
        let f = frame(*d, i as u32, 100);
        let mut b = vec![0u8; 12];
        b.extend_from_slice(&f);
        let gpa = tx0.post(b.len() as u32, false).unwrap();
        keyed.mem.write(gpa, &b).unwrap();
    }
    tx0.dq.publish_avail();
    vfs.ring_bell(1, 1);
    engine.wake();
    let recv = |q: &mut Vq, mem: &GuestMemory, n: usize| {
        let mut out = Vec::new();
        wait_for("steered frames", || {
            while let Some((gpa, len)) = q.reap() {
                let mut b = vec![0u8; len as usize];
                mem.read(gpa, &mut b).unwrap();
                out.push(b[12..].to_vec());
            }
            out.len() >= n
        });
        out
    };
    let even = recv(&mut rx0, &keyed.mem, 4);
    let odd = recv(&mut rx1, &g.mem, 4);
    let seqs = |v: &[Vec<u8>]| -> Vec<u32> {
        v.iter()
            .map(|f| u32::from_le_bytes([f[14], f[15], f[16], f[17]]))
            .collect()
    };
    assert_eq!(seqs(&even), vec![0, 2, 4, 6]);
    assert_eq!(seqs(&odd), vec![1, 3, 5, 7]);
    std::thread::sleep(Duration::from_millis(10));
    let c0 = vfs.counters(0).unwrap().snapshot();
    let c2 = vfs.counters(2).unwrap().snapshot();
    let t0 = vfs.counters(1).unwrap().snapshot();
    assert_eq!((t0.packets, t0.iommu_faults), (10, 0));
    assert_eq!(
        (c0.packets, c0.dropped),
        (4, 2),
        "two frames steered nowhere"
    );
    assert_eq!(c2.packets, 4);
    assert!(c0.interrupts >= 1 && c2.interrupts >= 1);
    assert_eq!(
        domain.faults().0,
        0,
        "key-space addresses never reached the IOMMU"
    );
    // Without its own view, pair 0's key-space rings are outside the domain: an IOMMU fault.
    vfs.ctl().queue_mem.clear();
    engine.sync(&vfs).unwrap();
    assert_eq!(
        domain.faults().0,
        2,
        "both key-space rings fault through the domain"
    );
    assert!(vfs.counters(0).unwrap().is_broken() && vfs.counters(1).unwrap().is_broken());
}

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

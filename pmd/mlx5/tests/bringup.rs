//! Function bring-up and teardown against the model.

use std::sync::Arc;

use vdpakit_core::mem::MemMode;
use vdpakit_core::pci::{DmaDomain, PciDevice, model};
use vdpakit_pmd_mlx5::model::{Mlx5Model, ModelOptions};
use vdpakit_pmd_mlx5::{Hca, HcaOptions};

fn opts() -> HcaOptions {
    HcaOptions {
        dma_mem: 4 << 20,
        mem_mode: MemMode::NoHuge,
        ..Default::default()
    }
}

fn open(o: ModelOptions) -> (Arc<Mlx5Model>, PciDevice) {
    let m = Mlx5Model::new(o);
    let dom = DmaDomain::model();
    let pci = model::open(m.clone(), &dom).unwrap();
    (m, pci)
}

#[test]
fn bring_up_and_down() {
    let (m, pci) = open(ModelOptions::default());
    let mut hca = Hca::open(pci, &opts()).unwrap();
    assert!(m.is_initialized());
    assert_eq!(hca.caps().virtio.max_queues, 16);
    assert_eq!(m.firmware_pages(), 32);
    hca.close().unwrap();
    assert!(!m.is_initialized());
    assert_eq!(m.live_objects(), 0);
}

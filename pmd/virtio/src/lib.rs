//! vdpakit PMD for virtio-net PCI functions, and the virtio-PCI pieces the `ifc` and `eni` PMDs
//! share with it.
//!
//! - [`transport`]: one driver interface over the modern and legacy register layouts.
//! - [`iova`]: DMA windows for vdpakit's own memory (IOVA = VA, or IOVA = PA for devices that do
//!   not translate) and per-buffer translation.
//! - [`irq`]: MSI-X vector layout for vDPA queues (per queue, shared with a fan-out thread,
//!   single).
//! - [`port`]: the `vdpakit fwd` port over a virtio-PCI function (vdpakit is the driver).
//! - [`vdpa`]: the generic vDPA device (`virtio:pci=BDF`), like Linux's `vp_vdpa`: any modern
//!   virtio-net function whose DMA goes through the IOMMU.

pub mod error;
pub mod iova;
pub mod irq;
pub mod model;
pub mod port;
pub mod spec;
pub mod transport;
pub mod vdpa;

pub use error::{PmdError, Result};

use vdpakit_core::port::{ExternalKind, Port, PortEnv, PortKind, PortSpec};
use vdpakit_core::vdpa::VdpaDevice;
use vdpakit_core::virtio_pci::ModernTransport;

use crate::port::{COMMON_KEYS, PciPort, PortSetup};
use crate::spec::Params;
use crate::transport::Transport;
use crate::vdpa::{Flavor, VpOptions, VpVdpa};

/// Keys of `vdpakit vdpa --device virtio:...`.
pub const DEVICE_KEYS: &[(&str, &str)] = &spec::concat_keys::<{ 2 + model::spec::MODEL_KEYS.len() }>(
    &[
        (
            "pci",
            "PCI address of a modern virtio-net function bound to vfio-pci (or model=NAME)",
        ),
        (
            "irq_vectors",
            "use at most N MSI-X vectors (fewer than queues + 1: queues share vector 0)",
        ),
    ],
    model::spec::MODEL_KEYS,
);

/// One line about the device kind.
pub const DEVICE_ABOUT: &str = "any modern virtio-net PCI function through VFIO, like Linux's vp_vdpa (virtio:pci=BDF), or its model (virtio:model[,name=N]) (keys: pci, irq_vectors; model: vfs, wire=loop|cable|none, pairs, qsize, poll, fault)";

/// Creates the devices of a `virtio:pci=BDF[,irq_vectors=N]` or `virtio:model=NAME[,...]` spec.
pub fn create_devices(params: &str) -> Result<Vec<Box<dyn VdpaDevice>>> {
    let p = Params::parse("virtio", params, DEVICE_KEYS)?;
    let opts = VpOptions {
        irq_limit: p.u16_in("irq_vectors", 1..=2048)?,
    };
    let mut out: Vec<Box<dyn VdpaDevice>> = Vec::new();
    for dev in spec::open_device_functions(&p, model::ModelSpec::virtio, None)? {
        out.push(Box::new(VpVdpa::probe_modern(dev, Flavor::VIRTIO, opts)?));
    }
    Ok(out)
}

const PORT_KEYS: [(&str, &str); COMMON_KEYS.len() + 1 + model::spec::MODEL_KEYS.len()] =
    spec::concat_keys(
        &spec::concat_keys::<{ COMMON_KEYS.len() + 1 }>(
            COMMON_KEYS,
            &[("vf", "function of the model (default 0)")],
        ),
        model::spec::MODEL_KEYS,
    );

/// The `virtio` port kind of `vdpakit fwd`.
pub const PORT_KIND: ExternalKind = ExternalKind {
    kind: PortKind {
        name: "virtio",
        about: "a modern virtio-net PCI function through VFIO (or its model), driven by vdpakit (rings in vdpakit memory, polled)",
        keys: &PORT_KEYS,
    },
    create: create_port,
};

fn create_port(spec: &PortSpec, env: &PortEnv) -> vdpakit_core::Result<Box<dyn Port>> {
    let a = spec.args(&PORT_KEYS)?;
    let name = spec.text();
    let (dev, keep) = spec::open_port_function(&a, "virtio", name, model::ModelSpec::virtio, None)?;
    let tr = ModernTransport::probe(dev).map_err(|e| PmdError::from(e).into_port(name))?;
    let setup = PortSetup {
        kind: "virtio",
        transport: Transport::Modern(tr),
        required: 0,
        keep,
    };
    Ok(Box::new(PciPort::new(&a, env, name, setup)?))
}

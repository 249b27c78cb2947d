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
pub const DEVICE_KEYS: &[(&str, &str)] = &[
    ("pci", "PCI address of a modern virtio-net function bound to vfio-pci (required)"),
    (
        "irq_vectors",
        "use at most N MSI-X vectors (fewer than queues + 1: queues share vector 0)",
    ),
];

/// One line about the device kind.
pub const DEVICE_ABOUT: &str =
    "any modern virtio-net PCI function through VFIO (like Linux's vp_vdpa): pci=BDF";

/// Creates the device of a `virtio:pci=BDF[,irq_vectors=N]` spec.
pub fn create_devices(params: &str) -> Result<Vec<Box<dyn VdpaDevice>>> {
    let p = Params::parse("virtio", params, DEVICE_KEYS)?;
    let Some(bdf) = p.get("pci") else {
        return Err(PmdError::Config {
            dev: p.spec().to_string(),
            what: "pci=BDF is required (the function, bound to vfio-pci)".into(),
        });
    };
    let opts = VpOptions {
        irq_limit: p.u16_in("irq_vectors", 1..=2048)?,
    };
    let dev = spec::open_pci(bdf)?;
    Ok(vec![Box::new(VpVdpa::probe_modern(dev, Flavor::VIRTIO, opts)?)])
}

/// The `virtio` port kind of `vdpakit fwd`.
pub const PORT_KIND: ExternalKind = ExternalKind {
    kind: PortKind {
        name: "virtio",
        about: "a modern virtio-net PCI function through VFIO, driven by vdpakit (rings in vdpakit memory, polled)",
        keys: COMMON_KEYS,
    },
    create: create_port,
};

fn create_port(spec: &PortSpec, env: &PortEnv) -> vdpakit_core::Result<Box<dyn Port>> {
    let a = spec.args(COMMON_KEYS)?;
    let name = spec.text();
    let Some(bdf) = a.get("pci") else {
        return Err(vdpakit_core::Error::PortValue {
            kind: "virtio".into(),
            key: "pci".into(),
            value: String::new(),
            accepted: "a PCI address bound to vfio-pci (pci=0000:01:00.0)".into(),
        });
    };
    let dev = spec::open_pci(bdf).map_err(|e| e.into_port(name))?;
    let tr = ModernTransport::probe(dev).map_err(|e| PmdError::from(e).into_port(name))?;
    let setup = PortSetup {
        kind: "virtio",
        transport: Transport::Modern(tr),
        required: 0,
    };
    Ok(Box::new(PciPort::new(&a, env, name, setup)?))
}

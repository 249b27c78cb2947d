//! vdpakit PMD for Alibaba's ENI: a virtio-net function that speaks only the legacy (0.9.5)
//! virtio-PCI interface (reference facts: `kernel-vdpa-hw.md` §0 and §6).
//!
//! What the legacy interface changes, all handled by `vdpakit_pmd_virtio`'s transport:
//! - the register block is BAR0 (an I/O BAR on QEMU's legacy device: accesses and the doorbell
//!   are `pread`/`pwrite` on the VFIO device, there is nothing to map);
//! - features are 32 bits, and there is no FEATURES_OK step;
//! - each queue's size is fixed by the device (QUEUE_NUM); the ring is given as one page frame
//!   number, so descriptors, avail and used rings must be in the contiguous legacy layout (used
//!   ring at the next 4 KiB boundary);
//! - the device configuration sits at 0x14, or at 0x18 once MSI-X is enabled;
//! - MSI-X as ENI lays it out: exactly `queues + 1` vectors, queue *i* on vector *i*, the
//!   configuration on vector `queues`.
//!
//! As a vDPA device: MRG_RXBUF must be negotiated (a legacy header with MRG_RXBUF has the same
//! 12 bytes as a VERSION_1 header, so VERSION_1 is offered to the front end), ACCESS_PLATFORM
//! does not exist (the platform IOMMU translates, IOVA = GPA), ring positions cannot be read or
//! set (initial positions only).
//!
//! As a `fwd` port: a legacy function has no ACCESS_PLATFORM, so the port chooses IOVA =
//! physical address by itself (QEMU's legacy device does not translate its DMA through the
//! virtual IOMMU).

use vdpakit_core::pci::PciDevice;
use vdpakit_core::port::{ExternalKind, Port, PortEnv, PortKind, PortSpec};
use vdpakit_core::vdpa::VdpaDevice;
use vdpakit_core::virtio::features as vf;
use vdpakit_core::virtio_pci::LegacyTransport;
use vdpakit_pmd_virtio::model::ModelSpec;
use vdpakit_pmd_virtio::model::spec::MODEL_KEYS;
use vdpakit_pmd_virtio::port::{COMMON_KEYS, PciPort, PortSetup};
use vdpakit_pmd_virtio::spec::{Params, concat_keys, open_device_functions, open_port_function};
use vdpakit_pmd_virtio::transport::Transport;
use vdpakit_pmd_virtio::vdpa::{Flavor, VpOptions, VpVdpa};
use vdpakit_pmd_virtio::{PmdError, Result};

/// ENI's identity: 1af4:1000 subsystem 1af4:0001 (also QEMU's transitional virtio-net).
pub const ID: (u16, u16, u16, u16) = (0x1af4, 0x1000, 0x1af4, 0x0001);

/// The virtio flavor of ENI.
pub const FLAVOR: Flavor = Flavor {
    pmd: "eni",
    add_features: vf::VERSION_1,
    guest_required: vf::NET_MRG_RXBUF,
    need_access_platform: false,
    need_device_cfg: false,
    pairs_from_queues: false,
};

/// Checks that `dev` is a legacy virtio-net function (vendor 1af4, device 0x1000..=0x103f,
/// revision 0, virtio device ID 1 = net in the subsystem ID) and wraps its BAR0 block.
pub fn probe_legacy(dev: PciDevice) -> Result<LegacyTransport> {
    let (vendor, device) = dev.ids()?;
    let rev = dev.config_read8(vdpakit_core::pci::cfg::REVISION)?;
    let sd = dev.config_read16(vdpakit_core::pci::cfg::SUBSYS_ID)?;
    let bad = |what: String| PmdError::Probe {
        dev: dev.name().to_string(),
        what,
    };
    if vendor != 0x1af4 || !(0x1000..=0x103f).contains(&device) {
        return Err(bad(format!(
            "IDs {vendor:04x}:{device:04x} are not a legacy virtio function (1af4:1000..103f)"
        )));
    }
    if rev != 0 {
        return Err(bad(format!(
            "revision (config 0x08) reads {rev:#x}: a legacy virtio function has revision 0"
        )));
    }
    if sd != 1 {
        return Err(bad(format!(
            "subsystem ID (config 0x2e) reads {sd:#x}: virtio device type 1 (net) expected"
        )));
    }
    Ok(LegacyTransport::new(dev)?)
}

/// Keys of `vdpakit vdpa --device eni:...`.
pub const DEVICE_KEYS: &[(&str, &str)] = &[
    (
        "pci",
        "PCI address of the function, bound to vfio-pci (required)",
    ),
    (
        "irq_vectors",
        "use at most N MSI-X vectors (fewer than queues + 1: queues share vector 0)",
    ),
];

/// One line about the device kind.
pub const DEVICE_ABOUT: &str = "Alibaba ENI / legacy virtio-net through VFIO (eni:pci=BDF) or its model (eni:model[,name=N]) (keys: pci, irq_vectors; model: vfs, wire=loop|cable|none, pairs, qsize, poll, fault)";

/// Creates the device of an `eni:pci=BDF` spec.
pub fn create_devices(params: &str) -> Result<Vec<Box<dyn VdpaDevice>>> {
    let p = Params::parse("eni", params, DEVICE_KEYS)?;
    let opts = VpOptions {
        irq_limit: p.u16_in("irq_vectors", 1..=2048)?,
    };
    let mut out: Vec<Box<dyn VdpaDevice>> = Vec::new();
    for dev in open_device_functions(&p, ModelSpec::eni, None)? {
        out.push(Box::new(probe_device(dev, opts)?));
    }
    Ok(out)
}

/// Probes `dev` as an ENI vDPA device.
pub fn probe_device(dev: PciDevice, opts: VpOptions) -> Result<VpVdpa> {
    let t = probe_legacy(dev)?;
    VpVdpa::probe(Transport::Legacy(t), FLAVOR, opts)
}

const PORT_KEYS: [(&str, &str); COMMON_KEYS.len() + 1 + MODEL_KEYS.len()] = concat_keys(
    &concat_keys::<{ COMMON_KEYS.len() + 1 }>(
        COMMON_KEYS,
        &[("vf", "function of the model (default 0)")],
    ),
    MODEL_KEYS,
);

/// The `eni` port kind of `vdpakit fwd`.
pub const PORT_KIND: ExternalKind = ExternalKind {
    kind: PortKind {
        name: "eni",
        about: "an Alibaba ENI / legacy virtio-net function through VFIO (or its model), driven by vdpakit (IOVA = PA when it does not translate)",
        keys: &PORT_KEYS,
    },
    create: create_port,
};

fn create_port(spec: &PortSpec, env: &PortEnv) -> vdpakit_core::Result<Box<dyn Port>> {
    let a = spec.args(&PORT_KEYS)?;
    let name = spec.text();
    let (dev, keep) = open_port_function(&a, "eni", name, ModelSpec::eni, None)?;
    let t = probe_legacy(dev).map_err(|e| e.into_port(name))?;
    let setup = PortSetup {
        kind: "eni",
        transport: Transport::Legacy(t),
        required: vf::NET_MRG_RXBUF,
        keep,
    };
    Ok(Box::new(PciPort::new(&a, env, name, setup)?))
}

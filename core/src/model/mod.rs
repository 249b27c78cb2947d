//! The device-model kit: what every SmartNIC model reuses, and the `sim` reference device.
//!
//! - [`engine`]: the virtqueue engine, the device side of the shared split/packed ring code on a
//!   polling thread per device: DMA only through the VF's domain (faults recorded, never a
//!   crash), doorbell pages a host notifier can map, MSI-X with EVENT_IDX / flags suppression,
//!   ring state read and set (suspend, GET_VRING_BASE, migration), dirty-page logging, per-queue
//!   counters.
//! - [`eswitch`]: where each VF's wire goes: `loop`, a `cable` to another VF, a host `tap`
//!   uplink, or a representor (`rep`) that `vdpakit fwd` uses as a port.
//! - [`sim`]: the sim device (register map in [`sim::regs`]), and [`sim_pmd`], its driver, which
//!   programs it only through [`PciDevice`](crate::pci::PciDevice) accessors with its own copy of
//!   the register offsets.
//! - [`registry`]: live devices by name (the representor port finds its VF there).
//!
//! The only `unsafe` is the `TUNSETIFF` ioctl in `tap`.

pub mod engine;
pub mod eswitch;
pub mod registry;
pub mod sim;
pub mod sim_pmd;
mod spec;
pub mod tap;

pub use spec::{PollMode, SIM_KEYS, SimConfig, WireSpec};

use crate::vdpa::VdpaDevice;

/// Errors of the model kit; each names the value and what is accepted.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    /// A spec that cannot be parsed.
    #[error("invalid device spec '{spec}': {why}")]
    Spec {
        /// The spec.
        spec: String,
        /// What is wrong.
        why: String,
    },
    /// A key the kind does not accept.
    #[error("device kind '{kind}' has no key '{key}': accepted keys are {accepted}")]
    UnknownKey {
        /// Device kind.
        kind: &'static str,
        /// The key.
        key: String,
        /// Accepted keys.
        accepted: String,
    },
    /// A bad value.
    #[error("device {kind}: invalid {key}='{value}': accepted is {accepted}")]
    BadValue {
        /// Device kind.
        kind: &'static str,
        /// Key.
        key: String,
        /// Value.
        value: String,
        /// Accepted values.
        accepted: String,
    },
    /// An unknown device kind.
    #[error("unknown device kind '{kind}': known kinds are {known}")]
    UnknownKind {
        /// The kind.
        kind: String,
        /// Known kinds.
        known: String,
    },
    /// A device name in use.
    #[error("a device named '{0}' exists already: give each device its own name=")]
    Exists(String),
    /// No such device.
    #[error("no device '{name}': live devices are {available}")]
    NoDevice {
        /// Asked for.
        name: String,
        /// What exists.
        available: String,
    },
    /// A TAP uplink could not be opened.
    #[error("{0}")]
    Tap(String),
    /// Representor errors.
    #[error("{0}")]
    Rep(String),
    /// Resources (memory, threads, eventfds).
    #[error("{0}")]
    Io(String),
}

/// The vDPA devices a spec creates.
pub type Devices = Vec<Box<dyn VdpaDevice>>;

/// A device kind the kit can create from a spec.
#[derive(Debug, Clone, Copy)]
pub struct DeviceKind {
    /// Spec prefix.
    pub name: &'static str,
    /// One line about it.
    pub about: &'static str,
    /// Keys with a short description each.
    pub keys: &'static [(&'static str, &'static str)],
    /// Creates the vDPA devices of a spec (the part after `NAME:`).
    pub create: fn(&str) -> Result<Devices, ModelError>,
}

/// The device kinds of the kit.
pub const KINDS: &[DeviceKind] = &[DeviceKind {
    name: "sim",
    about: "software vDPA device (like Linux vdpa_sim): N VFs with loop, cable, TAP or representor wires",
    keys: SIM_KEYS,
    create: sim::create,
}];

/// Creates the devices of a full spec (`KIND:key=val,...`).
pub fn create(spec: &str) -> Result<Vec<Box<dyn VdpaDevice>>, ModelError> {
    let (kind, params) = spec.split_once(':').unwrap_or((spec, ""));
    match KINDS.iter().find(|k| k.name == kind) {
        Some(k) => (k.create)(params),
        None => Err(ModelError::UnknownKind {
            kind: kind.to_string(),
            known: KINDS.iter().map(|k| k.name).collect::<Vec<_>>().join(", "),
        }),
    }
}

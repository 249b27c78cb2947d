//! `model=NAME` in device and port specs: which model a spec drives, created on first use with
//! the keys below and found by name afterwards (so two ports of one `fwd` can drive two
//! functions of one cabled model).

use std::sync::atomic::Ordering;

use vdpakit_core::model::PollMode;

use super::{HookFactory, ModelSpec, ModelWire, VpModel};
use crate::error::{PmdError, Result};

/// Keys of a model spec (device kinds and port kinds add them to their own).
pub const MODEL_KEYS: &[(&str, &str)] = &[
    (
        "model",
        "NAME: the device model NAME instead of a PCI function (created on first use)",
    ),
    (
        "name",
        "name of the model with a bare `model` key (default: KIND-model)",
    ),
    (
        "vfs",
        "functions of a new model (default 1; with wire=cable 2)",
    ),
    (
        "wire",
        "loop, cable (function 2k with 2k+1) or none (default: loop, cable with vfs>1)",
    ),
    (
        "pairs",
        "queue pairs per function of a new model (default 1)",
    ),
    (
        "qsize",
        "largest ring of a new model (legacy: the fixed size; default 256)",
    ),
    (
        "poll",
        "adaptive or busy: the model engine's polling (default adaptive)",
    ),
    (
        "fault",
        "stuck-reset, drop-doorbell, iommu or refuse-vectors: a fault the new model injects",
    ),
];

/// The model part of a spec.
#[derive(Debug, Clone)]
pub struct ModelArgs {
    /// Model name.
    pub name: String,
    /// Functions.
    pub vfs: u16,
    /// Wire.
    pub wire: ModelWire,
    /// Pairs per function.
    pub pairs: u16,
    /// Largest ring.
    pub qsize: Option<u16>,
    /// Engine polling.
    pub poll: PollMode,
    /// Fault to inject.
    pub fault: Option<String>,
}

/// Reads the model keys through `get` (`ctx` names the spec in errors); `None` without `model=`.
pub fn parse(get: &dyn Fn(&str) -> Option<String>, ctx: &str) -> Result<Option<ModelArgs>> {
    let Some(name) = get("model") else {
        return Ok(None);
    };
    // Bare `model` (device specs): `name=`, or one after the spec's kind.
    let name = if name.is_empty() {
        get("name").unwrap_or_else(|| {
            let kind = ctx.split(':').next().unwrap_or("virtio");
            format!("{kind}-model")
        })
    } else {
        name
    };
    let bad = |key: &str, v: &str, accepted: &str| PmdError::Config {
        dev: ctx.to_string(),
        what: format!("{key}='{v}': accepted is {accepted}"),
    };
    let num = |key: &str, lo: u16, hi: u16| -> Result<Option<u16>> {
        match get(key) {
            None => Ok(None),
            Some(v) => match v.parse::<u16>() {
                Ok(n) if (lo..=hi).contains(&n) => Ok(Some(n)),
                _ => Err(bad(key, &v, &format!("an integer in {lo}..={hi}"))),
            },
        }
    };
    let vfs = num("vfs", 1, 64)?;
    let wire = match get("wire").as_deref() {
        None => {
            if vfs.unwrap_or(1) > 1 {
                ModelWire::Cable
            } else {
                ModelWire::Loop
            }
        }
        Some("loop") => ModelWire::Loop,
        Some("cable") => ModelWire::Cable,
        Some("none") => ModelWire::None,
        Some(v) => return Err(bad("wire", v, "loop, cable or none")),
    };
    let vfs = vfs.unwrap_or(if wire == ModelWire::Cable { 2 } else { 1 });
    let poll = match get("poll").as_deref() {
        None | Some("adaptive") => PollMode::Adaptive,
        Some("busy") => PollMode::Busy,
        Some(v) => return Err(bad("poll", v, "adaptive or busy")),
    };
    let fault = match get("fault") {
        None => None,
        Some(v)
            if ["stuck-reset", "drop-doorbell", "iommu", "refuse-vectors"]
                .contains(&v.as_str()) =>
        {
            Some(v)
        }
        Some(v) => {
            return Err(bad(
                "fault",
                &v,
                "stuck-reset, drop-doorbell, iommu or refuse-vectors",
            ));
        }
    };
    Ok(Some(ModelArgs {
        name,
        vfs,
        wire,
        pairs: num("pairs", 1, 64)?.unwrap_or(1),
        qsize: num("qsize", 1, 32768)?,
        poll,
        fault,
    }))
}

/// The live model `a.name`, or a new one from `base(name, pairs)` with the spec's keys applied.
pub fn build(
    a: &ModelArgs,
    base: fn(&str, u16) -> ModelSpec,
    hook: Option<HookFactory<'_>>,
) -> Result<VpModel> {
    VpModel::get_or_create(&a.name, || {
        let mut s = base(&a.name, a.pairs);
        s.functions = a.vfs;
        s.wire = a.wire;
        s.poll = a.poll;
        if let Some(q) = a.qsize {
            s.max_queue_size = q;
        }
        let m = VpModel::new(s, hook)?;
        for k in 0..a.vfs {
            let Some(f) = m.function(k) else { continue };
            let flag = match a.fault.as_deref() {
                Some("stuck-reset") => &f.faults.stuck_reset,
                Some("drop-doorbell") => &f.faults.drop_doorbell,
                Some("iommu") => &f.faults.iommu_fault,
                Some("refuse-vectors") => &f.faults.refuse_vectors,
                _ => continue,
            };
            flag.store(true, Ordering::Relaxed);
        }
        Ok(m)
    })
}

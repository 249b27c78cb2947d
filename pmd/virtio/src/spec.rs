//! `key=value` parameters of `vdpakit vdpa --device KIND:...` specs, and opening the function a
//! spec names.

use vdpakit_core::pci::{Bdf, DmaDomain, PciDevice};

use crate::error::{PmdError, Result};

/// Parsed `key=value,...` parameters, checked against the keys a kind accepts.
#[derive(Debug, Clone)]
pub struct Params {
    spec: String,
    items: Vec<(String, String)>,
}

impl Params {
    /// Parses `params` of a `kind:` spec. Unknown keys, repeated keys and items that are not
    /// `key=value` are errors that list what is accepted.
    pub fn parse(kind: &str, params: &str, accepted: &[(&str, &str)]) -> Result<Params> {
        let spec = format!("{kind}:{params}");
        let bad = |what: String| PmdError::Config {
            dev: spec.clone(),
            what,
        };
        let keys = || {
            accepted
                .iter()
                .map(|(k, _)| *k)
                .collect::<Vec<_>>()
                .join(", ")
        };
        let mut items: Vec<(String, String)> = Vec::new();
        for item in params.split(',').filter(|s| !s.is_empty()) {
            // A bare `model` (as in `mlx5:model`): the device model, named by `name=` or after
            // the kind.
            if item.trim() == "model" && accepted.iter().any(|(a, _)| *a == "model") {
                items.push(("model".into(), String::new()));
                continue;
            }
            let Some((k, v)) = item.split_once('=') else {
                return Err(bad(format!("'{item}' is not key=value (keys: {})", keys())));
            };
            let (k, v) = (k.trim(), v.trim());
            if !accepted.iter().any(|(a, _)| *a == k) {
                return Err(bad(format!("unknown key '{k}' (accepted: {})", keys())));
            }
            if v.is_empty() || items.iter().any(|(e, _)| e == k) {
                return Err(bad(format!("'{item}': empty or repeated key")));
            }
            items.push((k.to_string(), v.to_string()));
        }
        Ok(Params { spec, items })
    }

    /// The spec as written, for messages.
    pub fn spec(&self) -> &str {
        &self.spec
    }

    /// The value of `key`.
    pub fn get(&self, key: &str) -> Option<&str> {
        self.items
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    /// `key=0|1`, `default` when absent.
    pub fn flag(&self, key: &str, default: bool) -> Result<bool> {
        match self.get(key) {
            None => Ok(default),
            Some("0") => Ok(false),
            Some("1") => Ok(true),
            Some(v) => Err(PmdError::Config {
                dev: self.spec.clone(),
                what: format!("{key}='{v}': accepted is 0 or 1"),
            }),
        }
    }

    /// An integer in `range`, `None` when absent.
    pub fn u16_in(&self, key: &str, range: std::ops::RangeInclusive<u16>) -> Result<Option<u16>> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => match v.parse::<u16>() {
                Ok(n) if range.contains(&n) => Ok(Some(n)),
                _ => Err(PmdError::Config {
                    dev: self.spec.clone(),
                    what: format!(
                        "{key}='{v}': accepted is an integer in {}..={}",
                        range.start(),
                        range.end()
                    ),
                }),
            },
        }
    }
}

/// Opens the function at PCI address `bdf` (bound to vfio-pci) in a new VFIO DMA domain of its
/// own (one IOMMU address space per device, as DPDK's ifc driver gives each VM a container).
pub fn open_pci(bdf: &str) -> Result<PciDevice> {
    let addr: Bdf = bdf.parse()?;
    let domain = DmaDomain::vfio()?;
    Ok(PciDevice::open_vfio(addr, &domain)?)
}

/// `a` followed by `b` (const, for key lists built from shared parts).
pub const fn concat_keys<const N: usize>(
    a: &[(&'static str, &'static str)],
    b: &[(&'static str, &'static str)],
) -> [(&'static str, &'static str); N] {
    let mut out = [("", ""); N];
    let mut i = 0;
    while i < a.len() {
        out[i] = a[i];
        i += 1;
    }
    let mut j = 0;
    while j < b.len() {
        out[i + j] = b[j];
        j += 1;
    }
    out
}

/// The function a port spec names: `pci=BDF` (VFIO) or `model=NAME[,vf=K,...]` (a device
/// model built from `base`, kept alive by the returned handle).
pub fn open_port_function(
    a: &vdpakit_core::port::SpecArgs<'_>,
    kind: &str,
    name: &str,
    base: fn(&str, u16) -> crate::model::ModelSpec,
    hook: Option<crate::model::HookFactory<'_>>,
) -> vdpakit_core::Result<(PciDevice, Option<KeepAlive>)> {
    let perr = |e: PmdError| e.into_port(name);
    let margs = crate::model::spec::parse(&|k| a.get(k).map(str::to_string), name).map_err(perr)?;
    if let Some(m) = margs {
        let model = crate::model::spec::build(&m, base, hook).map_err(perr)?;
        let vf = a.u64_in("vf", 0, 0..=63)? as u16;
        let dev = model.open(vf).map_err(perr)?;
        return Ok((dev, Some(std::sync::Arc::new(model))));
    }
    let Some(bdf) = a.get("pci") else {
        return Err(vdpakit_core::Error::PortValue {
            kind: kind.into(),
            key: "pci".into(),
            value: String::new(),
            accepted: "a PCI address bound to vfio-pci (pci=0000:01:00.0), or model=NAME".into(),
        });
    };
    Ok((open_pci(bdf).map_err(perr)?, None))
}

/// What keeps a port's device model alive.
pub type KeepAlive = std::sync::Arc<dyn std::any::Any + Send + Sync>;

/// The functions a device spec names: `pci=BDF`, or every function of `model=NAME`.
pub fn open_device_functions(
    p: &Params,
    base: fn(&str, u16) -> crate::model::ModelSpec,
    hook: Option<crate::model::HookFactory<'_>>,
) -> Result<Vec<PciDevice>> {
    let margs = crate::model::spec::parse(&|k| p.get(k).map(str::to_string), p.spec())?;
    if let Some(m) = margs {
        let model = crate::model::spec::build(&m, base, hook)?;
        return (0..model.spec().functions).map(|k| model.open(k)).collect();
    }
    let Some(bdf) = p.get("pci") else {
        return Err(PmdError::Config {
            dev: p.spec().to_string(),
            what: "pci=BDF (a function bound to vfio-pci) or model=NAME is required".into(),
        });
    };
    Ok(vec![open_pci(bdf)?])
}

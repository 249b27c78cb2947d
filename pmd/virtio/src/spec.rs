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

//! Port specs: `KIND[:key=val,...]`.

use std::str::FromStr;

use crate::error::{Error, Result};

/// A parsed port spec: a kind and its `key=value` arguments, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PortSpec {
    text: String,
    kind: String,
    args: Vec<(String, String)>,
}

impl FromStr for PortSpec {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        PortSpec::parse(s)
    }
}

impl PortSpec {
    /// Parses `KIND[:key=val,...]`. Keys must be unique and values non-empty, except a bare
    /// `model` (value empty), which kinds with a device model accept.
    pub fn parse(text: &str) -> Result<PortSpec> {
        let bad = |why: String| Error::PortSpec {
            spec: text.to_string(),
            why,
        };
        let (kind, rest) = match text.split_once(':') {
            Some((k, r)) => (k, Some(r)),
            None => (text, None),
        };
        let kind = kind.trim();
        if kind.is_empty() {
            return Err(bad(
                "the port kind is missing (expected KIND[:key=val,...])".into(),
            ));
        }
        if !kind
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        {
            return Err(bad(format!("'{kind}' is not a port kind name")));
        }
        let mut args: Vec<(String, String)> = Vec::new();
        if let Some(rest) = rest {
            if rest.is_empty() {
                return Err(bad("nothing after ':' (expected key=val,...)".into()));
            }
            for item in rest.split(',') {
                // A bare `model` (as in `mlx5:model`): the kind's device model, named by its
                // other keys.
                if item.trim() == "model" && !args.iter().any(|(k, _)| k == "model") {
                    args.push(("model".into(), String::new()));
                    continue;
                }
                let Some((k, v)) = item.split_once('=') else {
                    return Err(bad(format!("'{item}' is not key=value")));
                };
                let (k, v) = (k.trim(), v.trim());
                if k.is_empty() || v.is_empty() {
                    return Err(bad(format!("'{item}' is not key=value")));
                }
                if args.iter().any(|(ek, _)| ek == k) {
                    return Err(bad(format!("key '{k}' is given twice")));
                }
                args.push((k.to_string(), v.to_string()));
            }
        }
        Ok(PortSpec {
            text: text.to_string(),
            kind: kind.to_string(),
            args,
        })
    }

    /// The spec as given.
    pub fn text(&self) -> &str {
        &self.text
    }

    /// The port kind.
    pub fn kind(&self) -> &str {
        &self.kind
    }

    /// The arguments, checked against the keys a kind accepts.
    pub fn args(&self, accepted: &[(&str, &str)]) -> Result<SpecArgs<'_>> {
        for (k, _) in &self.args {
            if !accepted.iter().any(|(a, _)| a == k) {
                return Err(Error::UnknownPortKey {
                    kind: self.kind.clone(),
                    key: k.clone(),
                    accepted: if accepted.is_empty() {
                        "none".into()
                    } else {
                        accepted
                            .iter()
                            .map(|(a, _)| *a)
                            .collect::<Vec<_>>()
                            .join(", ")
                    },
                });
            }
        }
        Ok(SpecArgs { spec: self })
    }
}

/// Typed access to a spec's arguments.
#[derive(Debug, Clone, Copy)]
pub struct SpecArgs<'a> {
    spec: &'a PortSpec,
}

impl SpecArgs<'_> {
    /// The raw value of `key`.
    pub fn get(&self, key: &str) -> Option<&str> {
        self.spec
            .args
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    fn invalid(&self, key: &str, value: &str, accepted: String) -> Error {
        Error::PortValue {
            kind: self.spec.kind.clone(),
            key: key.into(),
            value: value.into(),
            accepted,
        }
    }

    /// An integer in `range`, or `default` when absent.
    pub fn u64_in(
        &self,
        key: &str,
        default: u64,
        range: std::ops::RangeInclusive<u64>,
    ) -> Result<u64> {
        match self.get(key) {
            None => Ok(default),
            Some(v) => match v.parse::<u64>() {
                Ok(n) if range.contains(&n) => Ok(n),
                _ => Err(self.invalid(
                    key,
                    v,
                    format!("an integer in {}..={}", range.start(), range.end()),
                )),
            },
        }
    }

    /// One of `choices`, or `default` when absent.
    pub fn choice<'c>(&self, key: &str, default: &'c str, choices: &[&'c str]) -> Result<&'c str> {
        match self.get(key) {
            None => Ok(default),
            Some(v) => choices
                .iter()
                .copied()
                .find(|c| *c == v)
                .ok_or_else(|| self.invalid(key, v, format!("one of {}", choices.join(", ")))),
        }
    }

    /// A name: 1..=64 characters of `[A-Za-z0-9_.-]`.
    pub fn name(&self, key: &str) -> Result<Option<String>> {
        match self.get(key) {
            None => Ok(None),
            Some(v)
                if v.len() <= 64
                    && v.chars()
                        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-')) =>
            {
                Ok(Some(v.to_string()))
            }
            Some(v) => Err(self.invalid(key, v, "1 to 64 characters of A-Z a-z 0-9 _ . -".into())),
        }
    }

    /// A MAC address, or `default` when absent.
    pub fn mac(&self, key: &str, default: [u8; 6]) -> Result<[u8; 6]> {
        match self.get(key) {
            None => Ok(default),
            Some(v) => super::parse_mac(v)
                .ok_or_else(|| self.invalid(key, v, "a MAC like 02:00:00:00:00:01".into())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn specs_parse() {
        let s = PortSpec::parse("ring:name=a,size=64").unwrap();
        assert_eq!(s.kind(), "ring");
        let a = s.args(&[("name", ""), ("size", "")]).unwrap();
        assert_eq!(a.get("name"), Some("a"));
        assert_eq!(a.u64_in("size", 0, 1..=1024).unwrap(), 64);
        assert_eq!(PortSpec::parse("null").unwrap().kind(), "null");
        // A bare `model`: an empty value, refused by kinds without the key.
        let s = PortSpec::parse("mlx5:model,vf=1").unwrap();
        let a = s.args(&[("model", ""), ("vf", "")]).unwrap();
        assert_eq!((a.get("model"), a.get("vf")), (Some(""), Some("1")));
        let s = PortSpec::parse("ring:model").unwrap();
        assert!(s.args(&[("name", "")]).is_err());
        assert!(PortSpec::parse("x:model,model").is_err(), "model twice");
    }

    #[test]
    fn bad_specs_name_the_problem() {
        for (bad, needle) in [
            ("", "kind is missing"),
            (":a=b", "kind is missing"),
            ("ring:", "nothing after"),
            ("ring:name", "'name' is not key=value"),
            ("ring:name=", "'name=' is not key=value"),
            ("ring:a=1,a=2", "'a' is given twice"),
            ("ri ng", "not a port kind"),
        ] {
            let e = PortSpec::parse(bad).unwrap_err().to_string();
            assert!(e.contains(needle), "{bad:?}: {e}");
            assert!(e.contains(&format!("'{bad}'")), "{e}");
        }
    }

    #[test]
    fn unknown_keys_and_bad_values_list_what_is_accepted() {
        let s = PortSpec::parse("ring:nmae=a").unwrap();
        let e = s
            .args(&[("name", ""), ("size", "")])
            .unwrap_err()
            .to_string();
        assert!(e.contains("'nmae'") && e.contains("name, size"), "{e}");
        let s = PortSpec::parse("ring:size=x,mode=q,mac=zz").unwrap();
        let a = s.args(&[("size", ""), ("mode", ""), ("mac", "")]).unwrap();
        let e = a.u64_in("size", 1, 1..=8).unwrap_err().to_string();
        assert!(e.contains("size='x'") && e.contains("1..=8"), "{e}");
        let e = a.choice("mode", "a", &["a", "b"]).unwrap_err().to_string();
        assert!(e.contains("mode='q'") && e.contains("one of a, b"), "{e}");
        assert!(a.mac("mac", [0; 6]).is_err());
    }
}

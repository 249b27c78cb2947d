//! `sim:` device specs: `name=NAME,vfs=N,wire=...,queues=N,mac=..,mtu=..,log=0|1,filter=0|1,
//! poll=adaptive|busy`.

use super::ModelError;
use crate::port::parse_mac;

/// Where each VF's wire goes (the e-switch configuration of one device).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WireSpec {
    /// Every VF's transmit comes back to its own receive (like Linux vdpa_sim_net).
    Loop,
    /// Virtual cables between VFs: `(a, b)` pairs; a VF in no pair has no wire (its transmit is
    /// counted as dropped).
    Cable(Vec<(u16, u16)>),
    /// A host TAP interface per VF: exactly this name with one VF, `NAME0`, `NAME1`, ... with
    /// several.
    Tap(String),
    /// A representor per VF that a `rep:dev=NAME,vf=N` port attaches to.
    Rep,
    /// No wire: transmit is dropped (counted), nothing is received.
    None,
}

/// How the engine thread waits for work.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PollMode {
    /// Busy-polls while there is traffic, then sleeps until a doorbell, a TAP frame or a 1 ms
    /// tick (host-notifier pages are checked at every wake-up).
    Adaptive,
    /// Never sleeps (one core spent; the lowest latency, for benchmarks).
    Busy,
}

/// A parsed `sim` spec.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SimConfig {
    /// Device name (VF `k` is the vDPA device `NAME-vfK`).
    pub name: String,
    /// Number of VFs (each its own PCI function and vDPA device).
    pub vfs: u16,
    /// The e-switch.
    pub wire: WireSpec,
    /// Queue pairs per VF.
    pub queue_pairs: u16,
    /// MAC of VF 0; VF `k` gets the last byte plus `k`.
    pub mac: [u8; 6],
    /// MTU reported in the config space (frames up to MTU + 18 bytes are carried).
    pub mtu: u16,
    /// Whether the device offers dirty-page logging (VHOST_F_LOG_ALL, logged by the engine).
    pub log: bool,
    /// `loop` only: drop frames whose destination MAC is neither the VF's, broadcast nor
    /// multicast (Linux vdpa_sim's filter).
    pub filter: bool,
    /// Engine wait strategy.
    pub poll: PollMode,
    /// Largest ring size a queue accepts.
    pub max_queue_size: u16,
}

/// The keys a `sim` spec accepts, with a short description each (for help texts).
pub const SIM_KEYS: &[(&str, &str)] = &[
    (
        "name",
        "device name, 1..=32 of [A-Za-z0-9_.-] (default sim<N>); VF k is NAME-vfK",
    ),
    ("vfs", "number of VFs, 1..=64 (default 1)"),
    (
        "wire",
        "loop | cable (VF 2k <-> 2k+1) | cable:A-B/C-D | tap:IFNAME | rep | none (default loop)",
    ),
    ("queues", "queue pairs per VF, 1..=16 (default 1)"),
    (
        "mac",
        "MAC of VF 0, VF k adds k to the last byte (default 02:76:64:73:<dev>:00)",
    ),
    ("mtu", "MTU in the config space, 68..=9000 (default 1500)"),
    (
        "log",
        "0|1: offer dirty-page logging in the device (default 1)",
    ),
    (
        "filter",
        "0|1: loop drops frames not for the VF's MAC (default 0)",
    ),
    (
        "poll",
        "adaptive | busy: engine thread sleeps when idle or spins (default adaptive)",
    ),
    ("queue_size", "largest ring size, 2..=32768 (default 32768)"),
];

/// Longest interface name Linux accepts (IFNAMSIZ - 1).
const IFNAME_MAX: usize = 15;

fn bad(key: &str, value: &str, accepted: impl Into<String>) -> ModelError {
    ModelError::BadValue {
        kind: "sim",
        key: key.to_string(),
        value: value.to_string(),
        accepted: accepted.into(),
    }
}

fn int_in(key: &str, v: &str, lo: u64, hi: u64) -> Result<u64, ModelError> {
    match v.parse::<u64>() {
        Ok(n) if (lo..=hi).contains(&n) => Ok(n),
        _ => Err(bad(key, v, format!("an integer in {lo}..={hi}"))),
    }
}

fn flag(key: &str, v: &str) -> Result<bool, ModelError> {
    match v {
        "0" => Ok(false),
        "1" => Ok(true),
        _ => Err(bad(key, v, "0 or 1")),
    }
}

fn is_name(s: &str, max: usize) -> bool {
    !s.is_empty()
        && s.len() <= max
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'))
}

fn parse_wire(v: &str, vfs: u16) -> Result<WireSpec, ModelError> {
    const ACCEPTED: &str = "loop, cable, cable:A-B/C-D (VF pairs), tap:IFNAME, rep or none";
    match v {
        "loop" => return Ok(WireSpec::Loop),
        "rep" => return Ok(WireSpec::Rep),
        "none" => return Ok(WireSpec::None),
        "cable" => {
            if !vfs.is_multiple_of(2) {
                return Err(bad(
                    "wire",
                    v,
                    format!(
                        "cable with an even number of VFs (vfs={vfs}), or cable:A-B/... naming the pairs"
                    ),
                ));
            }
            return Ok(WireSpec::Cable(
                (0..vfs / 2).map(|k| (2 * k, 2 * k + 1)).collect(),
            ));
        }
        _ => {}
    }
    if let Some(pairs) = v.strip_prefix("cable:") {
        let mut out = Vec::new();
        let mut used = vec![false; usize::from(vfs)];
        for p in pairs.split('/') {
            let parsed = p
                .split_once('-')
                .and_then(|(a, b)| Some((a.parse::<u16>().ok()?, b.parse::<u16>().ok()?)));
            let Some((a, b)) = parsed else {
                return Err(bad(
                    "wire",
                    v,
                    format!("pairs like 0-1/2-3 ('{p}' is not A-B)"),
                ));
            };
            for x in [a, b] {
                if x >= vfs {
                    return Err(bad(
                        "wire",
                        v,
                        format!("VF numbers below vfs={vfs} ({x} is not)"),
                    ));
                }
            }
            if a == b || used[usize::from(a)] || used[usize::from(b)] {
                return Err(bad(
                    "wire",
                    v,
                    "pairs of two different VFs, each VF in one pair at most",
                ));
            }
            used[usize::from(a)] = true;
            used[usize::from(b)] = true;
            out.push((a, b));
        }
        return Ok(WireSpec::Cable(out));
    }
    if let Some(name) = v.strip_prefix("tap:") {
        let longest = if vfs > 1 {
            // Room for the VF number.
            IFNAME_MAX - (vfs - 1).to_string().len()
        } else {
            IFNAME_MAX
        };
        if !is_name(name, longest) {
            return Err(bad(
                "wire",
                v,
                format!("tap:IFNAME with 1..={longest} characters of [A-Za-z0-9_.-]"),
            ));
        }
        return Ok(WireSpec::Tap(name.to_string()));
    }
    Err(bad("wire", v, ACCEPTED))
}

impl SimConfig {
    /// Parses the part of a spec after `sim:` (may be empty). `default_name` is used when the
    /// spec has no `name=`; `dev_index` numbers the default MAC.
    pub fn parse(params: &str, default_name: &str, dev_index: u8) -> Result<SimConfig, ModelError> {
        let mut kv: Vec<(&str, &str)> = Vec::new();
        if !params.trim().is_empty() {
            for item in params.split(',') {
                let Some((k, v)) = item.split_once('=') else {
                    return Err(ModelError::Spec {
                        spec: format!("sim:{params}"),
                        why: format!("'{item}' is not key=value"),
                    });
                };
                let (k, v) = (k.trim(), v.trim());
                if k.is_empty() || v.is_empty() {
                    return Err(ModelError::Spec {
                        spec: format!("sim:{params}"),
                        why: format!("'{item}' is not key=value"),
                    });
                }
                if !SIM_KEYS.iter().any(|(a, _)| *a == k) {
                    return Err(ModelError::UnknownKey {
                        kind: "sim",
                        key: k.to_string(),
                        accepted: SIM_KEYS
                            .iter()
                            .map(|(a, _)| *a)
                            .collect::<Vec<_>>()
                            .join(", "),
                    });
                }
                if kv.iter().any(|(ek, _)| *ek == k) {
                    return Err(ModelError::Spec {
                        spec: format!("sim:{params}"),
                        why: format!("key '{k}' is given twice"),
                    });
                }
                kv.push((k, v));
            }
        }
        let get = |k: &str| kv.iter().find(|(ek, _)| *ek == k).map(|(_, v)| *v);
        let name = match get("name") {
            Some(n) if is_name(n, 32) => n.to_string(),
            Some(n) => return Err(bad("name", n, "1..=32 characters of [A-Za-z0-9_.-]")),
            None => default_name.to_string(),
        };
        let vfs = match get("vfs") {
            Some(v) => int_in("vfs", v, 1, 64)? as u16,
            None => 1,
        };
        let wire = match get("wire") {
            Some(v) => parse_wire(v, vfs)?,
            None => WireSpec::Loop,
        };
        let queue_pairs = match get("queues") {
            Some(v) => int_in("queues", v, 1, 16)? as u16,
            None => 1,
        };
        let mac = match get("mac") {
            Some(v) => match parse_mac(v) {
                Some(m) if m[0] & 1 == 0 => m,
                _ => return Err(bad("mac", v, "a unicast MAC like 02:00:00:00:00:01")),
            },
            None => [0x02, 0x76, 0x64, 0x73, dev_index, 0],
        };
        let mtu = match get("mtu") {
            Some(v) => int_in("mtu", v, 68, 9000)? as u16,
            None => 1500,
        };
        let log = get("log")
            .map(|v| flag("log", v))
            .transpose()?
            .unwrap_or(true);
        let filter = get("filter")
            .map(|v| flag("filter", v))
            .transpose()?
            .unwrap_or(false);
        let poll = match get("poll") {
            None | Some("adaptive") => PollMode::Adaptive,
            Some("busy") => PollMode::Busy,
            Some(v) => return Err(bad("poll", v, "adaptive or busy")),
        };
        let max_queue_size = match get("queue_size") {
            Some(v) => int_in("queue_size", v, 2, 32768)? as u16,
            None => 32768,
        };
        if filter && wire != WireSpec::Loop {
            return Err(bad("filter", "1", "filter=1 only with wire=loop"));
        }
        Ok(SimConfig {
            name,
            vfs,
            wire,
            queue_pairs,
            mac,
            mtu,
            log,
            filter,
            poll,
            max_queue_size,
        })
    }

    /// The MAC of VF `vf`.
    pub fn vf_mac(&self, vf: u16) -> [u8; 6] {
        let mut m = self.mac;
        m[5] = m[5].wrapping_add(vf as u8);
        m
    }

    /// The vDPA device name of VF `vf`.
    pub fn vf_name(&self, vf: u16) -> String {
        format!("{}-vf{vf}", self.name)
    }

    /// The TAP interface name of VF `vf` (with `wire=tap:NAME`).
    pub fn tap_name(&self, vf: u16) -> Option<String> {
        match &self.wire {
            WireSpec::Tap(n) if self.vfs == 1 => Some(n.clone()),
            WireSpec::Tap(n) => Some(format!("{n}{vf}")),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_and_values() {
        let c = SimConfig::parse("", "sim0", 0).unwrap();
        assert_eq!(c.name, "sim0");
        assert_eq!((c.vfs, c.queue_pairs, c.mtu), (1, 1, 1500));
        assert_eq!(c.wire, WireSpec::Loop);
        assert!(c.log && !c.filter);
        let c = SimConfig::parse(
            "name=c,vfs=4,wire=cable,queues=2,mac=52:54:00:12:34:56,mtu=9000,log=0,poll=busy",
            "x",
            0,
        )
        .unwrap();
        assert_eq!(c.wire, WireSpec::Cable(vec![(0, 1), (2, 3)]));
        assert_eq!(c.vf_mac(3), [0x52, 0x54, 0, 0x12, 0x34, 0x59]);
        assert_eq!(c.vf_name(3), "c-vf3");
        assert!(!c.log);
        let c = SimConfig::parse("vfs=4,wire=cable:0-3/1-2", "x", 0).unwrap();
        assert_eq!(c.wire, WireSpec::Cable(vec![(0, 3), (1, 2)]));
        let c = SimConfig::parse("vfs=2,wire=tap:vk", "x", 0).unwrap();
        assert_eq!(c.tap_name(1).as_deref(), Some("vk1"));
        let c = SimConfig::parse("wire=tap:vk", "x", 0).unwrap();
        assert_eq!(c.tap_name(0).as_deref(), Some("vk"));
    }

    #[test]
    fn bad_specs_name_value_and_accepted() {
        for (spec, needles) in [
            ("vfs=0", &["vfs", "'0'", "1..=64"][..]),
            ("wire=wat", &["wire", "'wat'", "loop, cable"]),
            ("vfs=3,wire=cable", &["even number of VFs"]),
            ("vfs=2,wire=cable:0-2", &["below vfs=2"]),
            ("vfs=4,wire=cable:0-1/1-2", &["each VF in one pair"]),
            ("wire=tap:a-name-much-too-long", &["1..=15"]),
            ("mac=01:00:00:00:00:01", &["unicast"]),
            ("mtu=10", &["68..=9000"]),
            ("log=2", &["0 or 1"]),
            ("colour=red", &["'colour'", "name, vfs, wire"]),
            ("vfs", &["'vfs' is not key=value"]),
            ("vfs=1,vfs=2", &["given twice"]),
            ("filter=1,wire=rep", &["only with wire=loop"]),
            ("name=a/b", &["name", "'a/b'"]),
        ] {
            let e = SimConfig::parse(spec, "x", 0).unwrap_err().to_string();
            for n in needles {
                assert!(e.contains(n), "{spec}: {e} lacks {n}");
            }
        }
    }
}

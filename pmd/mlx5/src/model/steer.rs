//! Receive steering in the model: the NIC receive root table's entries in index order, each
//! matching the outer destination MAC under its group's mask and forwarding to a TIR, whose RQT
//! entry is chosen by a Toeplitz hash of the IPv4 addresses and ports (symmetric when the TIR
//! asks: the two endpoints are hashed in a fixed order, so both directions land on one queue).
//! The engine applies it as a snapshot ([`SteerTable`]) installed as its steering function
//! whenever a steering command succeeds.

use vdpakit_core::model::engine::RxSteer;

use super::fw::Fw;
use super::store::{Body, Kind};

/// The Toeplitz hash of `data` under `key` (at least `data.len() + 4` bytes of key are used).
pub fn toeplitz(key: &[u8], data: &[u8]) -> u32 {
    let bit = |i: usize| -> u32 {
        key.get(i / 8)
            .map_or(0, |b| u32::from(b >> (7 - i % 8)) & 1)
    };
    let mut window: u32 = (0..32).fold(0, |w, i| (w << 1) | bit(i));
    let mut h = 0u32;
    for (n, &byte) in data.iter().enumerate() {
        for b in 0..8 {
            if byte & (0x80 >> b) != 0 {
                h ^= window;
            }
            window = (window << 1) | bit(32 + n * 8 + b);
        }
    }
    h
}

/// The hash input of an IPv4 TCP/UDP frame (addresses, then ports) into `out`; its length, if
/// the frame is one (12 bytes with ports, 8 without: a fragment or another protocol).
fn ipv4_tuple(f: &[u8], symmetric: bool, out: &mut [u8; 12]) -> Option<usize> {
    let mut l3 = 14;
    let mut et = u16::from_be_bytes([*f.get(12)?, *f.get(13)?]);
    if et == 0x8100 {
        et = u16::from_be_bytes([*f.get(16)?, *f.get(17)?]);
        l3 = 18;
    }
    if et != 0x0800 {
        return None;
    }
    let ihl = usize::from(f.get(l3)? & 0xf) * 4;
    let proto = *f.get(l3 + 9)?;
    let frag = u16::from_be_bytes([*f.get(l3 + 6)?, *f.get(l3 + 7)?]) & 0x3fff;
    let mut src = [0u8; 6];
    let mut dst = [0u8; 6];
    src[..4].copy_from_slice(f.get(l3 + 12..l3 + 16)?);
    dst[..4].copy_from_slice(f.get(l3 + 16..l3 + 20)?);
    let ports = (proto == 6 || proto == 17) && frag == 0;
    if ports {
        let l4 = l3 + ihl;
        src[4..].copy_from_slice(f.get(l4..l4 + 2)?);
        dst[4..].copy_from_slice(f.get(l4 + 2..l4 + 4)?);
    }
    // Addresses compare first, then ports: the order of (address, port) pairs.
    if symmetric && src > dst {
        std::mem::swap(&mut src, &mut dst);
    }
    out[..4].copy_from_slice(&src[..4]);
    out[4..8].copy_from_slice(&dst[..4]);
    if !ports {
        return Some(8);
    }
    out[8..10].copy_from_slice(&src[4..]);
    out[10..12].copy_from_slice(&dst[4..]);
    Some(12)
}

/// One TIR as steering applies it: its RQT as queue pairs.
#[derive(Debug, Clone)]
struct TirRule {
    pairs: Vec<u16>,
    key: [u8; 40],
    hash: bool,
    symmetric: bool,
}

/// The receive steering of one function as the engine applies it: a snapshot of the root
/// table's entries (index order), taken whenever a steering command succeeds. No lock and no
/// allocation per frame.
#[derive(Debug, Clone, Default)]
pub struct SteerTable {
    rules: Vec<([u8; 6], [u8; 6], usize)>,
    tirs: Vec<TirRule>,
}

impl SteerTable {
    /// The queue pair `frame` goes to, if a rule takes it.
    pub fn pick(&self, frame: &[u8]) -> Option<u16> {
        let dmac = frame.get(..6)?;
        let &(_, _, t) = self
            .rules
            .iter()
            .find(|(mask, val, _)| (0..6).all(|i| dmac[i] & mask[i] == val[i] & mask[i]))?;
        let t = self.tirs.get(t)?;
        let n = t.pairs.len();
        let pick = if n <= 1 || !t.hash {
            0
        } else {
            let mut data = [0u8; 12];
            match ipv4_tuple(frame, t.symmetric, &mut data) {
                Some(len) => {
                    let h = toeplitz(&t.key, &data[..len]) as usize;
                    if n.is_power_of_two() {
                        h & (n - 1)
                    } else {
                        h % n
                    }
                }
                None => 0,
            }
        };
        t.pairs.get(pick).copied()
    }
}

impl Fw {
    /// The steering snapshot of the current flow table, TIRs and RQTs.
    pub fn steer_table(&self) -> SteerTable {
        let mut t = SteerTable::default();
        let Some(root) = self.root.map(u64::from) else {
            return t;
        };
        let mut tir_ids: Vec<u32> = Vec::new();
        for (key, o) in self.store.iter_kind(Kind::Fte) {
            if key >> 32 != root {
                continue;
            }
            let Body::Fte(e) = &o.body else { continue };
            let Ok(g) = self.store.get(Kind::Group, e.group.into()) else {
                continue;
            };
            let Body::Group(g) = &g.body else { continue };
            let ti = match tir_ids.iter().position(|&x| x == e.tir) {
                Some(i) => i,
                None => {
                    let Ok(o) = self.store.get(Kind::Tir, e.tir.into()) else {
                        continue;
                    };
                    let Body::Tir(tir) = &o.body else { continue };
                    let Ok(r) = self.store.get(Kind::Rqt, tir.rqt.into()) else {
                        continue;
                    };
                    let Body::Rqt(r) = &r.body else { continue };
                    let pairs = r
                        .list
                        .iter()
                        .filter_map(|&q| self.vq_index(q.into()).ok())
                        .map(|i| i / 2)
                        .collect();
                    t.tirs.push(TirRule {
                        pairs,
                        key: tir.key,
                        hash: tir.hash_fn == 2 && tir.fields & 0xf != 0,
                        symmetric: tir.symmetric,
                    });
                    tir_ids.push(e.tir);
                    t.tirs.len() - 1
                }
            };
            t.rules.push((g.mask, e.dmac, ti));
        }
        t
    }

    /// Gives the engine the current steering (a frame no rule takes is counted and dropped).
    pub fn install_steering(&mut self) {
        let table = self.steer_table();
        let drops = std::sync::Arc::clone(&self.steer_drops);
        let f: RxSteer = std::sync::Arc::new(move |frame: &[u8]| match table.pick(frame) {
            Some(p) => p,
            None => {
                drops.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                u16::MAX
            }
        });
        self.vf.ctl().steer = Some(f);
        self.sync_pending = true;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The classic verification vector of the Toeplitz hash (IPv4 with ports).
    #[test]
    fn toeplitz_reference_vector() {
        let key: [u8; 40] = [
            0x6d, 0x5a, 0x56, 0xda, 0x25, 0x5b, 0x0e, 0xc2, 0x41, 0x67, 0x25, 0x3d, 0x43, 0xa3,
            0x8f, 0xb0, 0xd0, 0xca, 0x2b, 0xcb, 0xae, 0x7b, 0x30, 0xb4, 0x77, 0xcb, 0x2d, 0xa3,
            0x80, 0x30, 0xf2, 0x0c, 0x6a, 0x42, 0xb7, 0x3b, 0xbe, 0xac, 0x01, 0xfa,
        ];
        // 66.9.149.187:2794 -> 161.142.100.80:1766
        let data = [66, 9, 149, 187, 161, 142, 100, 80, 0x0a, 0xea, 0x06, 0xe6];
        assert_eq!(toeplitz(&key, &data), 0x51cc_c178);
    }
}

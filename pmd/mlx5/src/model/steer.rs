//! Receive steering in the model: the NIC receive root table's entries in index order, each
//! matching the outer destination MAC under its group's mask and forwarding to a TIR, whose RQT
//! entry is chosen by a Toeplitz hash of the IPv4 addresses and ports (symmetric when the TIR
//! asks: the two endpoints are hashed in a fixed order, so both directions land on one queue).

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

/// The hash input of an IPv4 TCP/UDP frame (addresses, then ports), if it is one.
fn ipv4_tuple(f: &[u8], symmetric: bool) -> Option<Vec<u8>> {
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
    let mut src = f.get(l3 + 12..l3 + 16)?.to_vec();
    let mut dst = f.get(l3 + 16..l3 + 20)?.to_vec();
    let (mut sp, mut dp) = (Vec::new(), Vec::new());
    if (proto == 6 || proto == 17) && frag == 0 {
        let l4 = l3 + ihl;
        sp = f.get(l4..l4 + 2)?.to_vec();
        dp = f.get(l4 + 2..l4 + 4)?.to_vec();
    }
    if symmetric && (src.clone(), sp.clone()) > (dst.clone(), dp.clone()) {
        std::mem::swap(&mut src, &mut dst);
        std::mem::swap(&mut sp, &mut dp);
    }
    let mut v = src;
    v.extend(dst);
    v.extend(sp);
    v.extend(dp);
    Some(v)
}

impl Fw {
    /// The receive queue object a frame goes to, if a rule takes it.
    pub fn steer(&self, frame: &[u8]) -> Option<u64> {
        let root = u64::from(self.root?);
        let dmac: [u8; 6] = frame.get(..6)?.try_into().ok()?;
        let mut tir = None;
        for (key, o) in self.store.iter_kind(Kind::Fte) {
            if key >> 32 != root {
                continue;
            }
            let Body::Fte(e) = &o.body else { continue };
            let Ok(g) = self.store.get(Kind::Group, e.group.into()) else {
                continue;
            };
            let Body::Group(g) = &g.body else { continue };
            let hit = (0..6).all(|i| dmac[i] & g.mask[i] == e.dmac[i] & g.mask[i]);
            if hit {
                tir = Some(e.tir);
                break;
            }
        }
        let Body::Tir(t) = &self.store.get(Kind::Tir, tir?.into()).ok()?.body else {
            return None;
        };
        let Body::Rqt(r) = &self.store.get(Kind::Rqt, t.rqt.into()).ok()?.body else {
            return None;
        };
        let n = r.list.len();
        let pick = if n <= 1 || t.hash_fn != 2 || t.fields & 0xf == 0 {
            0
        } else {
            match ipv4_tuple(frame, t.symmetric) {
                Some(data) => {
                    let h = toeplitz(&t.key, &data) as usize;
                    if n.is_power_of_two() {
                        h & (n - 1)
                    } else {
                        h % n
                    }
                }
                None => 0,
            }
        };
        r.list.get(pick).map(|&q| u64::from(q))
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

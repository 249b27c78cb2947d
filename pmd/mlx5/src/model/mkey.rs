//! Memory keys: physical (identity), page list (MTT) and indirect (KLM) translation, and the
//! view a queue's engine works through.
//!
//! A key is turned into pieces (key address range → IOVA range), and the pieces into a
//! [`GuestMemory`] whose addresses are the key's addresses and whose bytes are the DMA domain's
//! memory at the translated IOVAs. Every ring and buffer access of a queue goes through that
//! view, so an address outside the key, a hole of an indirect key (null key), a page without
//! the read bit or an IOVA the domain does not map is simply not there: the access fails.

use vdpakit_core::model::engine::QueueView;
use vdpakit_core::virtio::GuestMemory;

use super::defs::st;
use super::fw::Fail;
use super::store::{Body, Kind, Store};

/// The key value of the null key (index 1): accesses through it fail.
pub const NULL_MKEY: u32 = 0x100;

/// Access modes.
pub const MODE_PA: u8 = 0;
/// Page list.
pub const MODE_MTT: u8 = 1;
/// Indirect list.
pub const MODE_KLM: u8 = 2;

/// A memory key.
#[derive(Debug, Clone)]
pub struct MkeyObj {
    /// The full key (index << 8 | variant).
    pub key: u32,
    /// Access mode.
    pub mode: u8,
    /// Protection domain.
    pub pd: u32,
    /// First address.
    pub start: u64,
    /// Length.
    pub len: u64,
    /// Covers the whole address space.
    pub whole: bool,
    /// MTT page size.
    pub page: u64,
    /// MTT entries (IOVA | rd | wr).
    pub mtt: Vec<u64>,
    /// KLM entries (byte count, key, address).
    pub klm: Vec<(u32, u32, u64)>,
    /// Local read / local write allowed.
    pub local_rw: (bool, bool),
}

/// Key addresses `[va, va + len)` are IOVAs `[iova, iova + len)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Piece {
    /// Key address.
    pub va: u64,
    /// IOVA.
    pub iova: u64,
    /// Bytes.
    pub len: u64,
}

/// Looks a key up by value (index and variant must both match).
pub fn lookup(store: &Store, key: u32) -> Result<&MkeyObj, Fail> {
    let o = store.get(Kind::Mkey, u64::from(key >> 8))?;
    match &o.body {
        Body::Mkey(m) if m.key == key => Ok(m),
        Body::Mkey(m) => Err(Fail::new(
            st::BAD_PARAM,
            "memory key variant mismatch",
            format!(
                "key {key:#x} names index {:#x}, whose key is {:#x}",
                key >> 8,
                m.key
            ),
        )),
        _ => Err(Fail::new(st::INTERNAL, "key table corrupt", String::new())),
    }
}

/// Translates `[va, va + len)` of `key` into pieces (appended to `out`); `domain` lists the
/// mapped IOVA ranges (for physical keys). Parts that do not translate are left out.
pub fn translate(
    store: &Store,
    key: u32,
    va: u64,
    len: u64,
    depth: u8,
    out: &mut Vec<Piece>,
) -> Result<(), Fail> {
    if key == NULL_MKEY || len == 0 {
        return Ok(());
    }
    if depth > 3 {
        return Err(Fail::new(
            st::BAD_PARAM,
            "indirect keys nested too deep",
            format!("key {key:#x}"),
        ));
    }
    let m = lookup(store, key)?;
    let (lo, hi) = if m.whole {
        (va, va.saturating_add(len))
    } else {
        (
            va.max(m.start),
            va.saturating_add(len).min(m.start.saturating_add(m.len)),
        )
    };
    if lo >= hi {
        return Ok(());
    }
    match m.mode {
        MODE_PA => out.push(Piece {
            va: lo,
            iova: lo,
            len: hi - lo,
        }),
        MODE_MTT => {
            let first = m.start & !(m.page - 1);
            let mut a = lo;
            while a < hi {
                let i = ((a - first) / m.page) as usize;
                let page_start = first + i as u64 * m.page;
                let page_end = page_start.saturating_add(m.page);
                let end = hi.min(page_end);
                if let Some(&e) = m.mtt.get(i)
                    && e & 1 != 0
                {
                    let base = e & !(m.page - 1) & !3;
                    out.push(Piece {
                        va: a,
                        iova: base + (a - page_start),
                        len: end - a,
                    });
                }
                a = end;
            }
        }
        MODE_KLM => {
            let mut at = m.start;
            for &(count, k, addr) in &m.klm {
                if count == 0 {
                    break;
                }
                let e_end = at + u64::from(count);
                let (s, t) = (lo.max(at), hi.min(e_end));
                if s < t {
                    let mut sub = Vec::new();
                    translate(store, k, addr + (s - at), t - s, depth + 1, &mut sub)?;
                    for p in sub {
                        out.push(Piece {
                            va: p.va - addr - (s - at) + s,
                            ..p
                        });
                    }
                }
                at = e_end;
                if at >= hi {
                    break;
                }
            }
        }
        _ => {}
    }
    Ok(())
}

/// Merges pieces that continue each other in both spaces.
pub fn coalesce(mut v: Vec<Piece>) -> Vec<Piece> {
    v.sort_by_key(|p| p.va);
    let mut out: Vec<Piece> = Vec::with_capacity(v.len());
    for p in v {
        if let Some(l) = out.last_mut()
            && l.va + l.len == p.va
            && l.iova + l.len == p.iova
        {
            l.len += p.len;
            continue;
        }
        out.push(p);
    }
    out
}

/// The memory a key reaches: key addresses backed by the domain's memory at the translated
/// IOVAs. Pieces (or parts) the domain does not map are left out (an access there fails).
pub fn view(pieces: &[Piece], domain: &GuestMemory) -> Result<GuestMemory, String> {
    let mut regions = Vec::new();
    for p in pieces {
        let end = p.iova + p.len;
        for r in domain.regions() {
            let (rs, re) = (r.gpa(), r.gpa() + r.size());
            let (s, e) = (p.iova.max(rs), end.min(re));
            if s >= e {
                continue;
            }
            let va = p.va + (s - p.iova);
            if let Some(sub) = r.slice(s - rs, e - s) {
                regions.push(sub.rebased(va, va));
            }
        }
    }
    GuestMemory::new(regions).map_err(|e| e.to_string())
}

/// A key's translation as the engine sees it ([`QueueView`]): key addresses over whatever the
/// domain maps at the time the engine (re)builds the queue, so an IOVA the binding unmapped is
/// gone from the key's view too (an access there is an IOMMU fault).
#[derive(Debug, Clone)]
pub enum KeyView {
    /// A physical key over the whole space: the domain itself.
    Whole,
    /// Key addresses → IOVAs.
    Pieces(Vec<Piece>),
}

impl KeyView {
    /// The view of `key` (its translation taken now; the domain's mappings are applied at each
    /// build).
    pub fn of(store: &Store, key: u32) -> Result<KeyView, Fail> {
        let m = lookup(store, key)?;
        if m.whole {
            return Ok(KeyView::Whole);
        }
        let mut v = Vec::new();
        translate(store, key, m.start, m.len, 0, &mut v)?;
        Ok(KeyView::Pieces(coalesce(v)))
    }
}

impl QueueView for KeyView {
    fn view(&self, domain: &GuestMemory) -> GuestMemory {
        match self {
            KeyView::Whole => domain.clone(),
            KeyView::Pieces(p) => view(p, domain).unwrap_or_else(|e| {
                tracing::warn!("model: a key's view cannot be built: {e}");
                GuestMemory::empty()
            }),
        }
    }
}

//! How vdpakit's own memory (the mbuf pool and the rings of a `fwd` port) is made visible to a
//! device: DMA windows in the device's [`DmaDomain`] and the per-buffer address translation.
//!
//! - **VA** (the default): IOVA = VA, one mapping per segment, so an mbuf's address goes into a
//!   descriptor as it is. When the IOMMU refuses addresses that high (QEMU's intel-iommu has a
//!   39-bit address width by default, user addresses use 47 bits) the segment is mapped at a
//!   compact IOVA from 4 GiB up instead, and translation adds a constant.
//! - **PA**: IOVA = physical address, each hugepage mapped at its own physical address
//!   (identity). For devices whose DMA bypasses the IOMMU: QEMU's legacy virtio device does not
//!   translate through the virtual IOMMU (ACCESS_PLATFORM needs VERSION_1), so it reads the
//!   addresses it is given as physical ones, like DPDK's `--iova-mode=pa`. Needs hugepages
//!   (physically contiguous, never moved) and root (`/proc/self/pagemap`). A buffer that crosses a
//!   page boundary becomes two descriptors.

use std::sync::Arc;

use vdpakit_core::mem::Segment;
use vdpakit_core::pci::DmaDomain;
use vdpakit_core::virtio::GuestRegion;

use crate::error::{PmdError, Result};

/// How addresses of vdpakit's memory are given to a device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IovaMode {
    /// IOVA = VA (or VA + a constant when the IOMMU's aperture is too small).
    Va,
    /// IOVA = physical address.
    Pa,
}

impl IovaMode {
    /// `va` or `pa`.
    pub fn as_str(self) -> &'static str {
        match self {
            IovaMode::Va => "va",
            IovaMode::Pa => "pa",
        }
    }
}

/// Up to this many device-contiguous pieces per buffer.
pub const MAX_PIECES: usize = 4;

/// Translation of one segment's addresses to IOVAs. Cheap to clone; lookups are a range check
/// and an add (VA) or a table load (PA): no locks, no syscalls.
#[derive(Debug, Clone)]
pub enum Xlate {
    /// `iova = va + delta` for `va` in `[lo, hi)`.
    Offset {
        /// First address.
        lo: usize,
        /// End.
        hi: usize,
        /// Added to the address (wrapping).
        delta: u64,
    },
    /// `iova = pages[(va - lo) >> shift] + (va & (page - 1))`.
    Pages {
        /// First address.
        lo: usize,
        /// End.
        hi: usize,
        /// log2 of the page size.
        shift: u32,
        /// IOVA of each page.
        pages: Arc<[u64]>,
    },
}

impl Xlate {
    /// Whether `[va, va + len)` lies in the segment.
    #[inline(always)]
    pub fn contains(&self, va: usize, len: usize) -> bool {
        let (lo, hi) = match self {
            Xlate::Offset { lo, hi, .. } | Xlate::Pages { lo, hi, .. } => (*lo, *hi),
        };
        va >= lo && va.checked_add(len).is_some_and(|e| e <= hi)
    }

    /// The IOVA of `va` (which must be inside).
    #[inline(always)]
    pub fn iova(&self, va: usize) -> Option<u64> {
        match self {
            Xlate::Offset { lo, hi, delta } => {
                (va >= *lo && va < *hi).then(|| (va as u64).wrapping_add(*delta))
            }
            Xlate::Pages {
                lo,
                hi,
                shift,
                pages,
            } => {
                if va < *lo || va >= *hi {
                    return None;
                }
                let off = va - lo;
                let mask = (1usize << shift) - 1;
                pages.get(off >> shift).map(|p| p + (off & mask) as u64)
            }
        }
    }

    /// Splits the buffer `[va, va + len)` into device-contiguous `(iova, len, writable)` pieces
    /// in `out`; returns how many (0: not inside the segment, or more than [`MAX_PIECES`]).
    #[inline(always)]
    pub fn pieces(
        &self,
        va: usize,
        len: u32,
        writable: bool,
        out: &mut [(u64, u32, bool); MAX_PIECES],
    ) -> usize {
        if !self.contains(va, len as usize) || len == 0 {
            return 0;
        }
        match self {
            Xlate::Offset { delta, .. } => {
                out[0] = ((va as u64).wrapping_add(*delta), len, writable);
                1
            }
            Xlate::Pages {
                lo, shift, pages, ..
            } => {
                let page = 1usize << shift;
                let (mut off, mut left, mut n) = (va - lo, len as usize, 0);
                while left > 0 {
                    if n == MAX_PIECES {
                        return 0;
                    }
                    let in_page = off & (page - 1);
                    let take = left.min(page - in_page);
                    let Some(base) = pages.get(off >> shift) else {
                        return 0;
                    };
                    let iova = base + in_page as u64;
                    // Physically adjacent pages continue the previous piece.
                    if n > 0 && out[n - 1].0 + u64::from(out[n - 1].1) == iova {
                        out[n - 1].1 += take as u32;
                    } else {
                        out[n] = (iova, take as u32, writable);
                        n += 1;
                    }
                    off += take;
                    left -= take;
                }
                n
            }
        }
    }
}

/// Where compact IOVAs start when IOVA = VA is refused.
const COMPACT_BASE: u64 = 1 << 32;

/// One segment mapped into the domain.
#[derive(Debug)]
struct Window {
    maps: Vec<(u64, u64)>,
    regions: Vec<GuestRegion>,
    xlate: Xlate,
}

/// vdpakit memory mapped for one device: the segments, their mappings and translations. Every
/// mapping is removed by [`DmaSpace::unmap_all`] (and on drop).
#[derive(Debug)]
pub struct DmaSpace {
    dev: String,
    domain: DmaDomain,
    mode: IovaMode,
    next_compact: u64,
    compact: bool,
    limit: u64,
    windows: Vec<Window>,
}

impl DmaSpace {
    /// An empty space in `domain`.
    pub fn new(dev: &str, domain: &DmaDomain, mode: IovaMode) -> DmaSpace {
        DmaSpace {
            dev: dev.to_string(),
            domain: domain.clone(),
            mode,
            next_compact: COMPACT_BASE,
            compact: false,
            limit: u64::MAX,
            windows: Vec::new(),
        }
    }

    /// IOVAs must stay below `limit` (a legacy function takes 32-bit page frame numbers: 2^44);
    /// VA mode then maps higher segments at compact IOVAs.
    pub fn with_limit(mut self, limit: u64) -> DmaSpace {
        self.limit = limit;
        self
    }

    /// The mode.
    pub fn mode(&self) -> IovaMode {
        self.mode
    }

    /// Whether VA mode had to fall back to compact IOVAs.
    pub fn is_compact(&self) -> bool {
        self.compact
    }

    /// Maps `seg` and returns its translation and its regions at their IOVAs (`gpa` = IOVA,
    /// `uva` = VA), for building ring memory over it.
    pub fn map(&mut self, seg: &Arc<Segment>) -> Result<(Xlate, Vec<GuestRegion>)> {
        let whole = GuestRegion::from_segment(seg);
        let lo = seg.base() as usize;
        let hi = lo + seg.len();
        let w = match self.mode {
            IovaMode::Va => self.map_va(seg, &whole, lo, hi)?,
            IovaMode::Pa => self.map_pa(seg, &whole, lo, hi)?,
        };
        let out = (w.xlate.clone(), w.regions.clone());
        self.windows.push(w);
        Ok(out)
    }

    fn map_va(
        &mut self,
        seg: &Segment,
        whole: &GuestRegion,
        lo: usize,
        hi: usize,
    ) -> Result<Window> {
        let len = seg.len() as u64;
        if !self.compact && (lo as u64).saturating_add(len) > self.limit {
            tracing::info!(
                "{}: '{}' at {lo:#x} is above the device's IOVA limit {:#x}; mapping vdpakit memory at compact IOVAs from {COMPACT_BASE:#x}",
                self.dev,
                seg.name(),
                self.limit
            );
            self.compact = true;
        }
        if !self.compact {
            match self.domain.map(lo as u64, whole) {
                Ok(()) => {
                    return Ok(Window {
                        maps: vec![(lo as u64, len)],
                        regions: vec![whole.clone()],
                        xlate: Xlate::Offset { lo, hi, delta: 0 },
                    });
                }
                Err(e) => {
                    tracing::info!(
                        "{}: IOVA = VA refused for '{}' at {lo:#x} ({e}); mapping vdpakit memory at compact IOVAs from {COMPACT_BASE:#x}",
                        self.dev,
                        seg.name()
                    );
                    self.compact = true;
                }
            }
        }
        let align = seg.page_size().bytes() as u64;
        let iova = self.next_compact.next_multiple_of(align.max(4096));
        let r = whole.rebased(iova, lo as u64);
        self.domain.map(iova, &r).map_err(|e| PmdError::Device {
            dev: self.dev.clone(),
            what: format!(
                "DMA map of '{}' ({len:#x} bytes) at IOVA {iova:#x}: {e}",
                seg.name()
            ),
        })?;
        self.next_compact = iova + len;
        Ok(Window {
            maps: vec![(iova, len)],
            regions: vec![r],
            xlate: Xlate::Offset {
                lo,
                hi,
                delta: iova.wrapping_sub(lo as u64),
            },
        })
    }

    fn map_pa(
        &mut self,
        seg: &Segment,
        whole: &GuestRegion,
        lo: usize,
        hi: usize,
    ) -> Result<Window> {
        if !seg.is_huge() {
            return Err(PmdError::Config {
                dev: self.dev.clone(),
                what: format!(
                    "IOVA = PA (this device DMAs to physical addresses) needs hugepage memory, and '{}' is on 4 KiB pages: reserve hugepages (echo 512 > /proc/sys/vm/nr_hugepages)",
                    seg.name()
                ),
            });
        }
        let pages = seg.physical_pages().map_err(|e| PmdError::Memory {
            dev: self.dev.clone(),
            what: format!("physical addresses of '{}'", seg.name()),
            source: Box::new(e),
        })?;
        let page = seg.page_size().bytes() as u64;
        let mut w = Window {
            maps: Vec::new(),
            regions: Vec::new(),
            xlate: Xlate::Pages {
                lo,
                hi,
                shift: page.trailing_zeros(),
                pages: pages.clone().into(),
            },
        };
        // Runs of physically adjacent pages become one mapping.
        let mut i = 0;
        while i < pages.len() {
            let mut j = i + 1;
            while j < pages.len() && pages[j] == pages[j - 1] + page {
                j += 1;
            }
            let (pa, len) = (pages[i], (j - i) as u64 * page);
            let Some(r) = whole.slice(i as u64 * page, len) else {
                break;
            };
            let r = r.rebased(pa, lo as u64 + i as u64 * page);
            if let Err(e) = self.domain.map(pa, &r) {
                for &(iova, l) in &w.maps {
                    let _ = self.domain.unmap(iova, l);
                }
                return Err(PmdError::Device {
                    dev: self.dev.clone(),
                    what: format!(
                        "DMA map of '{}' page run at IOVA = PA {pa:#x} ({len:#x} bytes): {e}",
                        seg.name()
                    ),
                });
            }
            w.maps.push((pa, len));
            w.regions.push(r);
            i = j;
        }
        Ok(w)
    }

    /// Removes every mapping made here.
    pub fn unmap_all(&mut self) {
        for w in self.windows.drain(..) {
            for (iova, len) in w.maps {
                if let Err(e) = self.domain.unmap(iova, len) {
                    tracing::warn!("{}: DMA unmap {iova:#x}: {e}", self.dev);
                }
            }
        }
    }
}

impl Drop for DmaSpace {
    fn drop(&mut self) {
        self.unmap_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn offset_translation_is_one_piece() {
        let x = Xlate::Offset {
            lo: 0x1000,
            hi: 0x9000,
            delta: 0x10,
        };
        let mut out = [(0, 0, false); MAX_PIECES];
        assert_eq!(x.pieces(0x2000, 0x3000, true, &mut out), 1);
        assert_eq!(out[0], (0x2010, 0x3000, true));
        assert_eq!(x.pieces(0x8fff, 2, true, &mut out), 0);
        assert_eq!(x.iova(0x0fff), None);
    }

    #[test]
    fn page_translation_splits_at_non_adjacent_pages() {
        let x = Xlate::Pages {
            lo: 0x10_0000,
            hi: 0x10_0000 + 3 * 0x1000,
            shift: 12,
            pages: vec![0x5000, 0x9000, 0xa000].into(),
        };
        let mut out = [(0, 0, false); MAX_PIECES];
        // Crosses from page 0 into page 1: two pieces.
        assert_eq!(x.pieces(0x10_0f00, 0x200, false, &mut out), 2);
        assert_eq!(out[0], (0x5f00, 0x100, false));
        assert_eq!(out[1], (0x9000, 0x100, false));
        // Pages 1 and 2 are adjacent: one piece.
        assert_eq!(x.pieces(0x10_1f00, 0x200, false, &mut out), 1);
        assert_eq!(out[0], (0x9f00, 0x200, false));
        assert_eq!(x.iova(0x10_2004), Some(0xa004));
        assert_eq!(x.pieces(0x10_2f00, 0x200, false, &mut out), 0);
    }

    #[test]
    fn va_space_maps_and_unmaps_in_a_model_domain() {
        let d = DmaDomain::model();
        let seg = Segment::new("t", 8192, vdpakit_core::mem::MemMode::NoHuge).unwrap();
        let mut s = DmaSpace::new("t", &d, IovaMode::Va);
        let (x, regions) = s.map(&seg).unwrap();
        assert_eq!(x.iova(seg.base() as usize), Some(seg.base() as u64));
        assert_eq!(regions.len(), 1);
        assert_eq!(d.mappings().len(), 1);
        drop(s);
        assert!(d.mappings().is_empty());
        let mut s = DmaSpace::new("t", &d, IovaMode::Pa);
        let e = s.map(&seg).unwrap_err().to_string();
        assert!(e.contains("needs hugepage memory"), "{e}");
    }
}

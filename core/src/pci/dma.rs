//! DMA domains: one IOMMU address space (IOVA → host memory) that one or more devices DMA
//! through. A VM's vDPA devices share one domain with IOVA = guest physical address, as DPDK's
//! ifc driver gives each VM its own VFIO container.
//!
//! Two kinds, matching the two PCI back ends:
//! - **VFIO**: a type1 container; `map` is `VFIO_IOMMU_MAP_DMA`, the hardware IOMMU translates.
//! - **Model**: the table lives here; device models reach memory only through [`DmaDomain::view`]
//!   (a [`GuestMemory`] keyed by IOVA), so an access outside every mapping fails exactly as an
//!   IOMMU fault would; the model reports it with [`DmaDomain::record_fault`].
//!
//! Every mapping holds what keeps its memory alive (the [`GuestRegion`]'s keep-alive), so an
//! unmap can never leave a device, model or real, pointing into freed memory while the domain
//! holds the entry; a model that still holds an older view keeps that memory mapped until it
//! picks up the new view (it checks [`DmaDomain::generation`] once per poll).

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use super::PciError;
use super::vfio::Container;
use crate::virtio::{GuestMemory, GuestRegion};

/// One mapping.
#[derive(Debug, Clone)]
pub struct DmaMapping {
    /// First IOVA.
    pub iova: u64,
    /// Length in bytes.
    pub len: u64,
    /// Host address of the first byte.
    pub host: usize,
}

#[derive(Debug)]
enum Kind {
    Model,
    Vfio(Arc<Container>),
}

#[derive(Debug)]
struct Table {
    maps: BTreeMap<u64, GuestRegion>,
    view: GuestMemory,
}

#[derive(Debug)]
struct Inner {
    kind: Kind,
    table: Mutex<Table>,
    generation: AtomicU64,
    faults: AtomicU64,
    last_fault: AtomicU64,
}

/// An IOMMU address space. Cheap to clone (one `Arc`); clones are the same domain.
#[derive(Debug, Clone)]
pub struct DmaDomain {
    inner: Arc<Inner>,
}

impl DmaDomain {
    fn with_kind(kind: Kind) -> DmaDomain {
        DmaDomain {
            inner: Arc::new(Inner {
                kind,
                table: Mutex::new(Table {
                    maps: BTreeMap::new(),
                    view: GuestMemory::empty(),
                }),
                generation: AtomicU64::new(0),
                faults: AtomicU64::new(0),
                last_fault: AtomicU64::new(u64::MAX),
            }),
        }
    }

    /// A domain for device models.
    pub fn model() -> DmaDomain {
        DmaDomain::with_kind(Kind::Model)
    }

    /// A domain backed by a new VFIO type1 container (`/dev/vfio/vfio`).
    pub fn vfio() -> Result<DmaDomain, PciError> {
        Ok(DmaDomain::with_kind(Kind::Vfio(Arc::new(
            Container::open()?
        ))))
    }

    /// `"vfio"` or `"model"`.
    pub fn kind(&self) -> &'static str {
        match self.inner.kind {
            Kind::Model => "model",
            Kind::Vfio(_) => "vfio",
        }
    }

    /// The VFIO container, for a VFIO domain.
    pub fn container(&self) -> Option<&Arc<Container>> {
        match &self.inner.kind {
            Kind::Vfio(c) => Some(c),
            Kind::Model => None,
        }
    }

    /// Whether two handles are the same domain.
    pub fn same(&self, other: &DmaDomain) -> bool {
        Arc::ptr_eq(&self.inner, &other.inner)
    }

    fn table(&self) -> MutexGuard<'_, Table> {
        // A panic while holding the lock cannot leave the table half-updated (every update
        // builds the new state first), so a poisoned lock is still consistent.
        self.inner.table.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Maps all of `region` at `[iova, iova + region.size())`. Fails on a zero-sized or
    /// overflowing range and on an overlap with an existing mapping (unmap first). The domain
    /// keeps the region's memory alive until the mapping is removed.
    pub fn map(&self, iova: u64, region: &GuestRegion) -> Result<(), PciError> {
        let len = region.size();
        let end = iova.checked_add(len).filter(|_| len > 0).ok_or_else(|| {
            PciError::Dma(format!(
                "mapping of {len} bytes at IOVA {iova:#x}: empty or overflows"
            ))
        })?;
        let mut t = self.table();
        if let Some((&s, r)) = t.maps.range(..end).next_back()
            && s + r.size() > iova
        {
            return Err(PciError::Dma(format!(
                "IOVA {iova:#x}..{end:#x} overlaps the mapping at {s:#x}..{:#x}",
                s + r.size()
            )));
        }
        if let Kind::Vfio(c) = &self.inner.kind {
            c.map_dma(iova, region)?;
        }
        t.maps.insert(iova, region.rebased(iova, iova));
        self.rebuild(&mut t)
    }

    /// Removes every mapping that lies inside `[iova, iova + len)`; a mapping only partly
    /// inside is an error (nothing is removed). Returns how many mappings were removed.
    pub fn unmap(&self, iova: u64, len: u64) -> Result<usize, PciError> {
        let end = iova.checked_add(len).ok_or_else(|| {
            PciError::Dma(format!("unmap of {len} bytes at IOVA {iova:#x} overflows"))
        })?;
        let mut t = self.table();
        let mut gone = Vec::new();
        for (&s, r) in t.maps.range(..end) {
            let e = s + r.size();
            if e <= iova {
                continue;
            }
            if s < iova || e > end {
                return Err(PciError::Dma(format!(
                    "unmap {iova:#x}..{end:#x} cuts the mapping {s:#x}..{e:#x} (unmap whole mappings)"
                )));
            }
            gone.push((s, r.size()));
        }
        for &(s, l) in &gone {
            if let Kind::Vfio(c) = &self.inner.kind {
                c.unmap_dma(s, l)?;
            }
            t.maps.remove(&s);
        }
        if !gone.is_empty() {
            self.rebuild(&mut t)?;
        }
        Ok(gone.len())
    }

    /// Removes every mapping.
    pub fn unmap_all(&self) -> Result<usize, PciError> {
        self.unmap(0, u64::MAX)
    }

    fn rebuild(&self, t: &mut Table) -> Result<(), PciError> {
        let view = GuestMemory::new(t.maps.values().cloned().collect())
            .map_err(|e| PciError::Dma(format!("domain view: {e}")))?;
        t.view = view;
        self.inner.generation.fetch_add(1, Ordering::Release);
        Ok(())
    }

    /// The mappings, by IOVA.
    pub fn mappings(&self) -> Vec<DmaMapping> {
        self.table()
            .maps
            .iter()
            .map(|(&iova, r)| DmaMapping {
                iova,
                len: r.size(),
                host: r.host() as usize,
            })
            .collect()
    }

    /// Changes whenever the mappings change; a model re-reads [`DmaDomain::view`] when it does.
    #[inline]
    pub fn generation(&self) -> u64 {
        self.inner.generation.load(Ordering::Acquire)
    }

    /// The current translation table as guest memory keyed by IOVA (`gpa = uva = iova`), and
    /// the generation it belongs to. This is how device models reach memory.
    pub fn view(&self) -> (u64, GuestMemory) {
        let t = self.table();
        (self.generation(), t.view.clone())
    }

    /// A model reports a DMA access outside every mapping (what an IOMMU fault would be).
    pub fn record_fault(&self, iova: u64, len: u64) {
        self.inner.faults.fetch_add(1, Ordering::Relaxed);
        self.inner.last_fault.store(iova, Ordering::Relaxed);
        tracing::debug!(iova = format_args!("{iova:#x}"), len, "IOMMU fault");
    }

    /// IOMMU faults so far, and the IOVA of the last one.
    pub fn faults(&self) -> (u64, Option<u64>) {
        let n = self.inner.faults.load(Ordering::Relaxed);
        let last = self.inner.last_fault.load(Ordering::Relaxed);
        (n, (n > 0).then_some(last))
    }
}

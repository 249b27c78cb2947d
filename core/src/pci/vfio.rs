//! The VFIO back end: a type1 container (the DMA domain), groups, and a `vfio-pci` device.
//!
//! Not implemented yet in this commit: every entry point returns an error that says so.

use std::os::fd::OwnedFd;
use std::sync::Arc;

use super::{Bdf, DmaDomain, Mmio, NotifyArea, PciError, PciOps};

/// A VFIO container (`/dev/vfio/vfio`) with the type1 IOMMU set.
#[derive(Debug)]
pub struct Container {
    _priv: (),
}

fn unimplemented(what: &str) -> PciError {
    PciError::Vfio {
        dev: what.to_string(),
        why: "the VFIO back end is not built yet".into(),
    }
}

impl Container {
    /// Opens a container.
    pub fn open() -> Result<Container, PciError> {
        Err(unimplemented("/dev/vfio/vfio"))
    }

    /// `VFIO_IOMMU_MAP_DMA`.
    pub fn map_dma(&self, _iova: u64, _vaddr: u64, _len: u64) -> Result<(), PciError> {
        Err(unimplemented("map"))
    }

    /// `VFIO_IOMMU_UNMAP_DMA`.
    pub fn unmap_dma(&self, _iova: u64, _len: u64) -> Result<(), PciError> {
        Err(unimplemented("unmap"))
    }
}

/// A `vfio-pci` function.
#[derive(Debug)]
pub struct VfioPci {
    name: String,
    domain: DmaDomain,
}

impl VfioPci {
    /// Opens `bdf` in `domain`.
    pub fn open(bdf: Bdf, _domain: &DmaDomain) -> Result<VfioPci, PciError> {
        Err(unimplemented(&bdf.to_string()))
    }
}

impl PciOps for VfioPci {
    fn name(&self) -> &str {
        &self.name
    }
    fn kind(&self) -> &'static str {
        "vfio"
    }
    fn config_size(&self) -> u16 {
        256
    }
    fn config_read(&self, _offset: u16, _buf: &mut [u8]) -> Result<(), PciError> {
        Err(unimplemented(&self.name))
    }
    fn config_write(&self, _offset: u16, _buf: &[u8]) -> Result<(), PciError> {
        Err(unimplemented(&self.name))
    }
    fn bar_len(&self, _bar: u8) -> u64 {
        0
    }
    fn bar_mapping(&self, _bar: u8) -> Option<Arc<Mmio>> {
        None
    }
    fn bar_read(&self, _bar: u8, _offset: u64, _buf: &mut [u8]) -> Result<(), PciError> {
        Err(unimplemented(&self.name))
    }
    fn bar_write(&self, _bar: u8, _offset: u64, _buf: &[u8]) -> Result<(), PciError> {
        Err(unimplemented(&self.name))
    }
    fn msix_vectors(&self) -> u16 {
        0
    }
    fn set_msix(&self, _fds: &[Option<Arc<OwnedFd>>]) -> Result<(), PciError> {
        Err(unimplemented(&self.name))
    }
    fn reset(&self) -> Result<(), PciError> {
        Err(unimplemented(&self.name))
    }
    fn notify_area(&self, _bar: u8, _offset: u64, _len: u64) -> Option<NotifyArea> {
        None
    }
    fn domain(&self) -> &DmaDomain {
        &self.domain
    }
}

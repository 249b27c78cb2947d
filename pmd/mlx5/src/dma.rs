//! Driver memory the device reaches by DMA: one vdpakit [`Segment`] mapped into the device's
//! [`DmaDomain`] at IOVA = its address, carved into 4 KiB pages.
//!
//! The command queue page, the mailbox blocks, the pages given to firmware and the UMEMs all come
//! from here. The driver touches this memory only through [`GuestMemory`] copies (no raw
//! pointers, no `unsafe`): the device may write it at any time, exactly like guest memory.

use std::sync::{Arc, Mutex};

use vdpakit_core::mem::{MemMode, Segment};
use vdpakit_core::pci::DmaDomain;
use vdpakit_core::virtio::{GuestMemory, GuestRegion};

use crate::error::{Error, Result};

/// Page size of the arena (the device's page size).
pub const PAGE: u64 = 4096;

#[derive(Debug)]
struct Inner {
    name: String,
    domain: DmaDomain,
    mem: GuestMemory,
    base: u64,
    len: u64,
    used: Mutex<Vec<bool>>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        if let Err(e) = self.domain.unmap(self.base, self.len) {
            tracing::warn!("{}: unmapping driver memory: {e}", self.name);
        }
    }
}

/// A DMA-mapped memory arena. Cheap to clone.
#[derive(Debug, Clone)]
pub struct DmaArena {
    inner: Arc<Inner>,
}

/// A run of pages of an arena; freed when dropped.
#[derive(Debug)]
pub struct DmaBuf {
    arena: DmaArena,
    first: usize,
    pages: usize,
}

impl DmaArena {
    /// Creates `len` bytes (rounded up to the page size) of shared memory and maps it into
    /// `domain` at IOVA = its address.
    pub fn new(name: &str, domain: &DmaDomain, len: usize, mode: MemMode) -> Result<DmaArena> {
        let seg =
            Segment::new(&format!("{name}-dma"), len.max(PAGE as usize), mode).map_err(|e| {
                Error::Memory {
                    dev: name.to_string(),
                    what: format!("driver DMA memory: {e}"),
                }
            })?;
        let region = GuestRegion::from_segment(&seg);
        let base = seg.iova();
        let len = seg.len() as u64;
        domain.map(base, &region).map_err(|e| Error::Memory {
            dev: name.to_string(),
            what: format!("mapping driver DMA memory at IOVA {base:#x}: {e}"),
        })?;
        let mem = GuestMemory::new(vec![region]).map_err(|e| Error::Memory {
            dev: name.to_string(),
            what: format!("driver DMA memory view: {e}"),
        })?;
        Ok(DmaArena {
            inner: Arc::new(Inner {
                name: name.to_string(),
                domain: domain.clone(),
                mem,
                base,
                len,
                used: Mutex::new(vec![false; (len / PAGE) as usize]),
            }),
        })
    }

    /// First IOVA of the arena.
    pub fn base(&self) -> u64 {
        self.inner.base
    }

    /// Size in bytes.
    pub fn len(&self) -> u64 {
        self.inner.len
    }

    /// Whether the arena is empty (never: at least one page).
    pub fn is_empty(&self) -> bool {
        self.inner.len == 0
    }

    /// Pages in use.
    pub fn used_pages(&self) -> usize {
        self.lock().iter().filter(|&&u| u).count()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<bool>> {
        self.inner.used.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Allocates `len` bytes (whole pages, page aligned, zeroed).
    pub fn alloc(&self, len: u64) -> Result<DmaBuf> {
        let pages = len.div_ceil(PAGE).max(1) as usize;
        let first = {
            let mut used = self.lock();
            let mut run = 0;
            let mut found = None;
            for (i, &u) in used.iter().enumerate() {
                run = if u { 0 } else { run + 1 };
                if run == pages {
                    found = Some(i + 1 - pages);
                    break;
                }
            }
            let Some(first) = found else {
                let free = used.iter().filter(|&&u| !u).count();
                return Err(Error::Memory {
                    dev: self.inner.name.clone(),
                    what: format!(
                        "driver DMA memory exhausted: {pages} contiguous pages wanted, {free} of {} free \
                         (raise dma_mem)",
                        used.len()
                    ),
                });
            };
            used[first..first + pages].fill(true);
            first
        };
        let buf = DmaBuf {
            arena: self.clone(),
            first,
            pages,
        };
        buf.zero()?;
        Ok(buf)
    }

    /// Copies device-visible memory at `iova` into `dst`.
    pub fn read(&self, iova: u64, dst: &mut [u8]) -> Result<()> {
        self.inner.mem.read(iova, dst).map_err(|e| Error::Memory {
            dev: self.inner.name.clone(),
            what: format!("reading driver DMA memory: {e}"),
        })
    }

    /// Copies `src` into device-visible memory at `iova`.
    pub fn write(&self, iova: u64, src: &[u8]) -> Result<()> {
        self.inner.mem.write(iova, src).map_err(|e| Error::Memory {
            dev: self.inner.name.clone(),
            what: format!("writing driver DMA memory: {e}"),
        })
    }
}

impl DmaBuf {
    /// IOVA of the first byte.
    pub fn iova(&self) -> u64 {
        self.arena.inner.base + self.first as u64 * PAGE
    }

    /// Size in bytes (whole pages).
    pub fn len(&self) -> u64 {
        self.pages as u64 * PAGE
    }

    /// Whether the buffer is empty (never).
    pub fn is_empty(&self) -> bool {
        self.pages == 0
    }

    /// IOVAs of its pages.
    pub fn pages(&self) -> impl Iterator<Item = u64> + '_ {
        (0..self.pages as u64).map(move |i| self.iova() + i * PAGE)
    }

    /// Reads at byte `off`.
    pub fn read(&self, off: u64, dst: &mut [u8]) -> Result<()> {
        self.arena.read(self.iova() + off, dst)
    }

    /// Writes at byte `off`.
    pub fn write(&self, off: u64, src: &[u8]) -> Result<()> {
        self.arena.write(self.iova() + off, src)
    }

    /// Zeroes the buffer.
    pub fn zero(&self) -> Result<()> {
        let zero = [0u8; PAGE as usize];
        for p in self.pages() {
            self.arena.write(p, &zero)?;
        }
        Ok(())
    }
}

impl Drop for DmaBuf {
    fn drop(&mut self) {
        self.arena.lock()[self.first..self.first + self.pages].fill(false);
    }
}

//! Raw BAR mappings: the only place device registers are touched through pointers.
//!
//! An [`Mmio`] is a mapped range plus whatever keeps it mapped. Accesses are volatile, of the
//! exact width asked for (1, 2, 4 or 8 bytes), naturally aligned and inside the range; the checks
//! happen in [`PciDevice`](super::PciDevice) (or once, for a [`Doorbell`](super::Doorbell)) and
//! are repeated here as cheap assertions that turn a bug into an error-free no-op rather than a
//! stray write.

use std::any::Any;
use std::sync::Arc;

/// A mapped register range.
pub struct Mmio {
    base: *mut u8,
    len: usize,
    _keep: Arc<dyn Any + Send + Sync>,
}

// SAFETY: `Mmio` is an address range plus a keep-alive handle that is itself Send + Sync; the
// range is device memory (or shared memory standing in for it) that is only accessed through
// volatile reads and writes, never through references, so sharing it between threads is sound.
unsafe impl Send for Mmio {}
// SAFETY: as above.
unsafe impl Sync for Mmio {}

impl std::fmt::Debug for Mmio {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Mmio")
            .field("base", &self.base)
            .field("len", &self.len)
            .finish()
    }
}

impl Mmio {
    /// Wraps a mapping.
    ///
    /// # Safety
    /// `base .. base + len` must be mapped readable and writable for as long as `keep` lives, and
    /// must not be accessed through Rust references by anyone.
    pub unsafe fn new(base: *mut u8, len: usize, keep: Arc<dyn Any + Send + Sync>) -> Mmio {
        Mmio {
            base,
            len,
            _keep: keep,
        }
    }

    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the range is empty.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    #[inline(always)]
    fn ok(&self, offset: usize, width: usize) -> bool {
        matches!(width, 1 | 2 | 4 | 8)
            && offset.is_multiple_of(width)
            && offset.checked_add(width).is_some_and(|e| e <= self.len)
    }

    /// Reads `buf.len()` bytes (1, 2, 4 or 8) at `offset` with one access of that width. An
    /// access that fails the checks reads all-ones, as a master abort would.
    #[inline]
    pub fn read(&self, offset: usize, buf: &mut [u8]) {
        if !self.ok(offset, buf.len()) {
            buf.fill(0xff);
            return;
        }
        let p = self.base.wrapping_add(offset);
        match buf.len() {
            // The checks above: `offset + width <= len` and the offset is aligned to the width,
            // so `p` is an aligned pointer inside the mapping, which `keep` holds mapped.
            // SAFETY: see the checks above.
            1 => buf[0] = unsafe { p.read_volatile() },
            // SAFETY: as above.
            2 => buf.copy_from_slice(&unsafe { (p as *const u16).read_volatile() }.to_ne_bytes()),
            // SAFETY: as above.
            4 => buf.copy_from_slice(&unsafe { (p as *const u32).read_volatile() }.to_ne_bytes()),
            // SAFETY: as above.
            _ => buf.copy_from_slice(&unsafe { (p as *const u64).read_volatile() }.to_ne_bytes()),
        }
    }

    /// Writes `buf` (1, 2, 4 or 8 bytes) at `offset` with one access of that width. An access
    /// that fails the checks is dropped.
    #[inline]
    pub fn write(&self, offset: usize, buf: &[u8]) {
        if !self.ok(offset, buf.len()) {
            return;
        }
        let p = self.base.wrapping_add(offset);
        let mut b = [0u8; 8];
        b[..buf.len()].copy_from_slice(buf);
        match buf.len() {
            // SAFETY: as in `read`: aligned and inside the live mapping.
            1 => unsafe { p.write_volatile(b[0]) },
            // SAFETY: as above.
            2 => unsafe { (p as *mut u16).write_volatile(u16::from_ne_bytes([b[0], b[1]])) },
            // SAFETY: as above.
            4 => unsafe {
                (p as *mut u32).write_volatile(u32::from_ne_bytes([b[0], b[1], b[2], b[3]]))
            },
            // SAFETY: as above.
            _ => unsafe { (p as *mut u64).write_volatile(u64::from_ne_bytes(b)) },
        }
    }
}

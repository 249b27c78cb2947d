//! Dirty page logging for live migration (vhost `VHOST_F_LOG_ALL`).
//!
//! The front end shares a log area: one bit per 4 KiB page of guest physical memory, page `p`
//! at bit `p % 8` of byte `p / 8`. While logging is on, every device write to guest memory must
//! set the bits of the pages it touched, after the write itself (so the front end never copies a
//! page and clears its bit before our data landed). Bits are set with atomic `fetch_or` (the
//! front end clears them concurrently); pages beyond the log's end are ignored and counted.

use std::os::fd::BorrowedFd;
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, AtomicU64, Ordering};

use super::error::QueueError;

/// Bytes of guest memory per log bit.
pub const LOG_PAGE_SIZE: u64 = 4096;
const LOG_PAGE_SHIFT: u32 = 12;

struct LogInner {
    base: *mut u8,
    len: usize,
    ignored: AtomicU64,
    _keep: Option<Arc<dyn std::any::Any + Send + Sync>>,
}

/// A shared dirty log. Cheap to clone (one `Arc`); every queue of a device holds a clone.
#[derive(Clone)]
pub struct DirtyLog {
    inner: Arc<LogInner>,
}

// SAFETY: the log area is shared memory that is only ever accessed with atomic `fetch_or` on
// single bytes (never through references); the keep-alive is `Send + Sync` and the counter is
// atomic, so the log may be used from any thread, concurrently.
unsafe impl Send for LogInner {}
// SAFETY: as above.
unsafe impl Sync for LogInner {}

impl std::fmt::Debug for DirtyLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DirtyLog")
            .field("base", &self.inner.base)
            .field("len", &self.inner.len)
            .field("ignored", &self.ignored())
            .finish()
    }
}

impl DirtyLog {
    /// Maps the log area the front end sent (vhost-user `SET_LOG_BASE`: `size` bytes of `fd` at
    /// `mmap_offset`), `MAP_SHARED` read-write.
    pub fn map(fd: BorrowedFd<'_>, mmap_offset: u64, size: u64) -> Result<DirtyLog, QueueError> {
        let (keep, base) =
            super::mem::map_shared(fd, mmap_offset, size).map_err(|source| QueueError::Map {
                gpa: 0,
                size,
                offset: mmap_offset,
                source,
            })?;
        Ok(DirtyLog {
            inner: Arc::new(LogInner {
                base,
                // `map_shared` checked that the mapping fits usize.
                len: size as usize,
                ignored: AtomicU64::new(0),
                _keep: Some(keep),
            }),
        })
    }

    /// A log over memory the caller owns.
    ///
    /// # Safety
    /// `base .. base + len` must be mapped and writable for as long as the log or any clone of it
    /// lives (or `keep` must keep it so), and must only be accessed atomically (or by another
    /// process) meanwhile.
    pub unsafe fn from_raw(
        base: *mut u8,
        len: usize,
        keep: Option<Arc<dyn std::any::Any + Send + Sync>>,
    ) -> DirtyLog {
        DirtyLog {
            inner: Arc::new(LogInner {
                base,
                len,
                ignored: AtomicU64::new(0),
                _keep: keep,
            }),
        }
    }

    /// A log over `[gpa, gpa + len)` of `mem` (a device that logs by DMA: the bitmap is mapped in
    /// its domain, `mem` being the domain's view). `None` if the range is empty or not inside one
    /// region. The log keeps `mem`'s regions mapped.
    pub fn from_memory(mem: &super::GuestMemory, gpa: u64, len: u64) -> Option<DirtyLog> {
        if len == 0 {
            return None;
        }
        let len_usize = usize::try_from(len).ok()?;
        let base = mem.gpa_to_host(gpa, len)?;
        let keep: Arc<dyn std::any::Any + Send + Sync> = Arc::new(mem.clone());
        Some(DirtyLog {
            inner: Arc::new(LogInner {
                // `gpa_to_host` checked that `[base, base + len)` lies in one mapped region,
                // which `keep` (a clone of the table holding it) keeps mapped for as long as the
                // log lives; log bytes are only ever touched with atomic `fetch_or`.
                base,
                len: len_usize,
                ignored: AtomicU64::new(0),
                _keep: Some(keep),
            }),
        })
    }

    /// The log area as a memory region at `iova` (for a device that logs by DMA: the region is
    /// mapped into its domain). The region keeps the log mapped.
    pub fn region(&self, iova: u64) -> Option<super::GuestRegion> {
        if self.inner.len == 0 {
            return None;
        }
        let keep: Arc<dyn std::any::Any + Send + Sync> = self.inner.clone();
        // SAFETY: `base .. base + len` is the log's mapping, kept alive by `keep` (the log's own
        // inner state, which owns the mapping) for as long as the region or anything built from
        // it lives. A device writing through the region only sets bits, as the log does.
        Some(unsafe {
            super::GuestRegion::from_raw(
                self.inner.base,
                self.inner.len as u64,
                iova,
                iova,
                Some(keep),
            )
        })
    }

    /// Size of the log area in bytes.
    pub fn len(&self) -> usize {
        self.inner.len
    }

    /// Whether the log area is empty (every mark is ignored).
    pub fn is_empty(&self) -> bool {
        self.inner.len == 0
    }

    /// How many page marks fell beyond the log's end (and were ignored) so far.
    pub fn ignored(&self) -> u64 {
        self.inner.ignored.load(Ordering::Relaxed)
    }

    /// Marks every page touched by `[gpa, gpa + len)` dirty (`len` 0 marks nothing; a range
    /// running past the end of the address space is cut at `u64::MAX`).
    pub fn mark(&self, gpa: u64, len: u64) {
        if len == 0 {
            return;
        }
        let first = gpa >> LOG_PAGE_SHIFT;
        let last = gpa.saturating_add(len - 1) >> LOG_PAGE_SHIFT;
        let pages = (self.inner.len as u64).saturating_mul(8);
        if first >= pages {
            self.ignore(last - first + 1);
            return;
        }
        let last_in = last.min(pages - 1);
        if last > last_in {
            self.ignore(last - last_in);
        }
        let mut p = first;
        while p <= last_in {
            let byte = p / 8;
            let hi = last_in.min(byte * 8 + 7);
            let nbits = hi - p + 1;
            let mask = (((1u16 << nbits) - 1) << (p % 8)) as u8;
            self.or_byte(byte as usize, mask);
            p = hi + 1;
        }
    }

    #[cold]
    fn ignore(&self, pages: u64) {
        self.inner.ignored.fetch_add(pages, Ordering::Relaxed);
    }

    #[inline(always)]
    fn or_byte(&self, byte: usize, mask: u8) {
        if byte >= self.inner.len {
            return;
        }
        // In bounds (checked just above).
        let p = self.inner.base.wrapping_add(byte);
        // SAFETY: `p` is inside the mapped log area (constructor contract / our own mapping);
        // a u8 is always aligned, and the area is only accessed atomically. Release orders the
        // device's earlier writes to guest memory before the bit.
        let a = unsafe { AtomicU8::from_ptr(p) };
        a.fetch_or(mask, Ordering::Release);
    }
}

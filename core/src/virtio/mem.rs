//! Guest memory: the regions a front end shares with us, their translation, and the only code of
//! the virtio module that dereferences guest pointers.
//!
//! Guest memory is shared with a driver that may be hostile and may change any byte at any time.
//! Nothing here ever creates a Rust reference (`&`/`&mut`) to it: ring fields are read and written
//! with single volatile or atomic accesses (every 16-bit field atomically: indices and flags with
//! Acquire/Release where they publish, Relaxed otherwise) (each value is fetched once, so a driver changing it
//! behind our back cannot make us see two different values), and packet payload is copied with
//! `ptr::copy_nonoverlapping` between guest memory and buffers we own.
//!
//! - [`GuestRegion`], [`GuestMemory`]: the memory table, with checked GPA and front-end-virtual
//!   (UVA) translation. Cloning a `GuestMemory` is one `Arc` increment; a region stays mapped
//!   while any clone (or any queue or [`Segs`] built from it) lives.
//! - [`Segs`]: the buffers of one popped chain, with safe gather/scatter copies.
//! - `RingArea`/`TableView` (crate-private): bounds- and alignment-checked accessors over one
//!   translated ring area or indirect table. Out-of-range offsets are a bug of ours, never a
//!   consequence of guest input (callers check indices first): they are debug-asserted, read as
//!   zero and drop writes in release builds, so they can never touch memory outside the area.

use std::any::Any;
use std::os::fd::{AsRawFd, BorrowedFd};
use std::os::unix::fs::MetadataExt;
use std::ptr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU16, Ordering};

use super::error::QueueError;
use super::log::DirtyLog;

/// The most regions a [`GuestMemory`] accepts (vhost-user's largest memory slot count).
pub const MAX_REGIONS: usize = 509;

/// The most regions a translated view ([`GuestMemory::new_view`]) accepts.
pub const MAX_VIEW_REGIONS: usize = 8192;

/// The most buffers one popped chain may have (DPDK's `BUF_VECTOR_MAX`).
pub const SEGS_MAX: usize = 256;

type KeepAlive = Arc<dyn Any + Send + Sync>;

/// Maps bytes `[offset, offset + size)` of `fd` `MAP_SHARED` read-write and returns the mapping
/// and the address of byte `offset`. The mapping starts at `offset` rounded down to the file's
/// block size (the huge page size for hugetlb files) and ends rounded up to it, so offsets that
/// are not page aligned work too.
pub(crate) fn map_shared(
    fd: BorrowedFd<'_>,
    offset: u64,
    size: u64,
) -> std::io::Result<(KeepAlive, *mut u8)> {
    let invalid =
        |what: &str| std::io::Error::new(std::io::ErrorKind::InvalidInput, what.to_string());
    let block = fd
        .try_clone_to_owned()
        .map(std::fs::File::from)
        .and_then(|f| f.metadata())
        .map(|m| m.blksize())?;
    let block = if block.is_power_of_two() && block >= 4096 {
        block
    } else {
        4096
    };
    let start = offset & !(block - 1);
    let lead = offset - start;
    let total = lead
        .checked_add(size)
        .and_then(|t| t.checked_next_multiple_of(block))
        .ok_or_else(|| invalid("offset + size overflows"))?;
    let total = usize::try_from(total).map_err(|_| invalid("mapping larger than usize"))?;
    let map = memmap2::MmapOptions::new()
        .offset(start)
        .len(total)
        .map_raw(fd.as_raw_fd())?;
    // `lead + size <= total`, so byte `offset` of the file is inside the mapping.
    let host = map.as_mut_ptr().wrapping_add(lead as usize);
    Ok((Arc::new(map), host))
}

/// One contiguous piece of guest memory mapped into this process.
#[derive(Clone)]
pub struct GuestRegion {
    gpa: u64,
    size: u64,
    /// Bytes the device may read / write: `size`, or 0 when the region denies that access (an
    /// IOTLB entry mapped read-only or write-only). The lookup finds a region by `size`; the
    /// bound check of an access uses the limit of its direction, so a denied access fails like
    /// one outside memory at no extra cost per access.
    rlim: u64,
    wlim: u64,
    uva: u64,
    host: *mut u8,
    _keep: Option<KeepAlive>,
}

// SAFETY: a region is an address range plus an optional keep-alive handle that is itself
// `Send + Sync`. The memory behind `host` is shared memory that this crate only touches through
// raw volatile/atomic accesses and raw copies (never through references), the same way the other
// side of the share does, so handing the range to another thread is sound.
unsafe impl Send for GuestRegion {}
// SAFETY: as above; `&GuestRegion` only exposes the addresses.
unsafe impl Sync for GuestRegion {}

impl std::fmt::Debug for GuestRegion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GuestRegion")
            .field("gpa", &format_args!("{:#x}", self.gpa))
            .field("size", &format_args!("{:#x}", self.size))
            .field("uva", &format_args!("{:#x}", self.uva))
            .field("read", &(self.rlim != 0))
            .field("write", &(self.wlim != 0))
            .field("host", &self.host)
            .finish()
    }
}

impl GuestRegion {
    /// Maps `size` bytes of `fd` starting at file offset `mmap_offset`, `MAP_SHARED` read-write,
    /// as the region `[gpa, gpa + size)` whose front-end virtual address is `uva` (vhost-user
    /// `SET_MEM_TABLE` / `ADD_MEM_REG`).
    ///
    /// The mapping is widened to the file's block size (the huge page size for hugetlbfs and
    /// memfd hugepages) on both ends, so an `mmap_offset` that is not page aligned works too. It
    /// lives as long as the region or any [`GuestMemory`] holding it.
    pub fn map_fd(
        fd: BorrowedFd<'_>,
        mmap_offset: u64,
        size: u64,
        gpa: u64,
        uva: u64,
    ) -> Result<GuestRegion, QueueError> {
        let map_err = |source| QueueError::Map {
            gpa,
            size,
            offset: mmap_offset,
            source,
        };
        if size == 0 {
            return Err(QueueError::RegionEmpty { index: 0, gpa });
        }
        let (map, host) = map_shared(fd, mmap_offset, size).map_err(map_err)?;
        Ok(GuestRegion {
            gpa,
            size,
            rlim: size,
            wlim: size,
            uva,
            host,
            _keep: Some(map),
        })
    }

    /// A region over memory the caller already owns (a vdpakit `Segment`/`Zone`, test memory,
    /// a virtio-user front end's own rings and buffers).
    ///
    /// # Safety
    /// `host .. host + size` must be mapped, readable and writable, and must stay so for as long
    /// as this region, any [`GuestMemory`] built from it (and its clones), or anything built from
    /// those lives; `keep` may hold whatever keeps it alive. Nothing may hold Rust references into
    /// the range while it is used as guest memory.
    pub unsafe fn from_raw(
        host: *mut u8,
        size: u64,
        gpa: u64,
        uva: u64,
        keep: Option<Arc<dyn Any + Send + Sync>>,
    ) -> GuestRegion {
        GuestRegion {
            gpa,
            size,
            rlim: size,
            wlim: size,
            uva,
            host,
            _keep: keep,
        }
    }

    /// A region over a whole vdpakit [`Segment`](crate::mem::Segment) with identity addresses
    /// (GPA = UVA = the segment's address in this process, IOVA = VA): what a virtio-user front
    /// end uses for its own rings and buffers. The region keeps the segment mapped.
    pub fn from_segment(seg: &Arc<crate::mem::Segment>) -> GuestRegion {
        let keep: KeepAlive = Arc::clone(seg) as KeepAlive;
        let base = seg.base();
        // SAFETY: `base .. base + len` is the segment's own read-write shared mapping, which
        // stays mapped while the `Arc<Segment>` held in `keep` lives, i.e. as long as this region
        // and everything built from it; the segment hands out no Rust references into it.
        unsafe {
            GuestRegion::from_raw(base, seg.len() as u64, base as u64, base as u64, Some(keep))
        }
    }

    /// The same memory (sharing its keep-alive) seen at other addresses: a DMA domain maps a
    /// region at an IOVA and builds its view with `gpa = uva = iova`.
    pub fn rebased(&self, gpa: u64, uva: u64) -> GuestRegion {
        GuestRegion {
            gpa,
            uva,
            ..self.clone()
        }
    }

    /// The first `len` bytes of this region (`None` if `len` is 0 or larger than the region).
    pub fn prefix(&self, len: u64) -> Option<GuestRegion> {
        (len > 0 && len <= self.size).then(|| {
            GuestRegion {
                size: len,
                ..self.clone()
            }
            .with_access(self.rlim != 0, self.wlim != 0)
        })
    }

    /// The same region with the device's access restricted: a region that denies reads (or
    /// writes) makes every device read (or write) of its bytes fail as if they were not guest
    /// memory. The vhost-user IOTLB view uses it for read-only and write-only mappings.
    pub fn with_access(&self, read: bool, write: bool) -> GuestRegion {
        GuestRegion {
            rlim: if read { self.size } else { 0 },
            wlim: if write { self.size } else { 0 },
            ..self.clone()
        }
    }

    /// Whether the device may read the region.
    pub fn readable(&self) -> bool {
        self.rlim != 0
    }

    /// Whether the device may write the region.
    pub fn writable(&self) -> bool {
        self.wlim != 0
    }

    /// Bytes `[offset, offset + len)` of this region as a region of their own (sharing the
    /// keep-alive), at guest physical address `gpa + offset`; `None` if `len` is 0 or the range
    /// is not inside the region. A device model uses it to build the view of a memory key that
    /// covers only part of a DMA mapping (then [`GuestRegion::rebased`] to the key's addresses).
    pub fn slice(&self, offset: u64, len: u64) -> Option<GuestRegion> {
        let end = offset.checked_add(len)?;
        (len > 0 && end <= self.size).then(|| GuestRegion {
            gpa: self.gpa + offset,
            uva: self.uva.wrapping_add(offset),
            size: len,
            rlim: if self.rlim != 0 { len } else { 0 },
            wlim: if self.wlim != 0 { len } else { 0 },
            // `offset < size`, so the address stays inside the mapping `_keep` holds.
            host: self.host.wrapping_add(offset as usize),
            _keep: self._keep.clone(),
        })
    }

    /// Guest physical address of the first byte.
    pub fn gpa(&self) -> u64 {
        self.gpa
    }

    /// Size in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// The front end's virtual address of the first byte (vhost-user ring addresses use these).
    pub fn uva(&self) -> u64 {
        self.uva
    }

    /// Where the first byte is mapped in this process.
    pub fn host(&self) -> *mut u8 {
        self.host
    }

    /// Host address of `[gpa, gpa + len)` if all of it is inside this region and the region
    /// allows the access (`write`: the device writes, else it reads).
    #[inline(always)]
    fn host_of_gpa(&self, gpa: u64, len: u64, write: bool) -> Option<*mut u8> {
        let off = gpa.checked_sub(self.gpa)?;
        let lim = if write { self.wlim } else { self.rlim };
        if off < lim && len <= lim - off {
            // `off < size` and the region is mapped, so the result stays inside the mapping.
            Some(self.host.wrapping_add(off as usize))
        } else {
            None
        }
    }
}

/// A guest memory table: non-overlapping regions sorted by guest physical address.
///
/// Cheap to clone (one `Arc`). Translation is lock-free and allocation-free.
#[derive(Clone)]
pub struct GuestMemory {
    regions: Arc<[GuestRegion]>,
}

impl std::fmt::Debug for GuestMemory {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list().entries(self.regions.iter()).finish()
    }
}

impl Default for GuestMemory {
    fn default() -> Self {
        GuestMemory::empty()
    }
}

impl GuestMemory {
    /// Builds a memory table. Rejects zero-sized regions, regions whose GPA or UVA end overflows,
    /// regions overlapping in GPA or in UVA space, and more than [`MAX_REGIONS`] regions; the
    /// error names the offending region by its position in `regions`.
    pub fn new(regions: Vec<GuestRegion>) -> Result<GuestMemory, QueueError> {
        GuestMemory::build(regions, MAX_REGIONS)
    }

    /// [`GuestMemory::new`] for a translated view (the vhost-user IOTLB: one region per
    /// mapping), which may hold up to [`MAX_VIEW_REGIONS`] regions. Lookups stay a binary search.
    pub fn new_view(regions: Vec<GuestRegion>) -> Result<GuestMemory, QueueError> {
        GuestMemory::build(regions, MAX_VIEW_REGIONS)
    }

    fn build(regions: Vec<GuestRegion>, max: usize) -> Result<GuestMemory, QueueError> {
        if regions.len() > max {
            return Err(QueueError::TooManyRegions {
                count: regions.len(),
                max,
            });
        }
        for (index, r) in regions.iter().enumerate() {
            if r.size == 0 {
                return Err(QueueError::RegionEmpty { index, gpa: r.gpa });
            }
            for (space, start) in [("gpa", r.gpa), ("uva", r.uva)] {
                if start.checked_add(r.size).is_none() {
                    return Err(QueueError::RegionOverflow {
                        index,
                        space,
                        start,
                        size: r.size,
                    });
                }
            }
        }
        for space in ["gpa", "uva"] {
            let start = |r: &GuestRegion| if space == "gpa" { r.gpa } else { r.uva };
            let mut order: Vec<usize> = (0..regions.len()).collect();
            order.sort_by_key(|&i| start(&regions[i]));
            for w in order.windows(2) {
                let (a, b) = (&regions[w[0]], &regions[w[1]]);
                if start(a) + a.size > start(b) {
                    // Name the later one in the caller's list as the offender.
                    let (index, other) = (w[0].max(w[1]), w[0].min(w[1]));
                    let (ri, ro) = (&regions[index], &regions[other]);
                    return Err(QueueError::RegionOverlap {
                        index,
                        other,
                        space,
                        start: start(ri),
                        end: start(ri) + ri.size,
                        other_start: start(ro),
                        other_end: start(ro) + ro.size,
                    });
                }
            }
        }
        let mut regions = regions;
        regions.sort_by_key(|r| r.gpa);
        Ok(GuestMemory {
            regions: regions.into(),
        })
    }

    /// A table with no regions (every translation fails).
    pub fn empty() -> GuestMemory {
        GuestMemory {
            regions: Arc::from(Vec::new()),
        }
    }

    /// The regions, sorted by guest physical address.
    pub fn regions(&self) -> &[GuestRegion] {
        &self.regions
    }

    /// Whether two handles share the same table (not just equal contents).
    #[inline(always)]
    pub fn ptr_eq(&self, other: &GuestMemory) -> bool {
        Arc::ptr_eq(&self.regions, &other.regions)
    }

    #[inline(always)]
    fn region_of_gpa(&self, gpa: u64) -> Option<&GuestRegion> {
        let rs = &*self.regions;
        let r = if rs.len() <= 8 {
            rs.iter().find(|r| gpa >= r.gpa && gpa - r.gpa < r.size)?
        } else {
            let i = rs.partition_point(|r| r.gpa <= gpa);
            let r = &rs[i.checked_sub(1)?];
            if gpa - r.gpa < r.size {
                r
            } else {
                return None;
            }
        };
        Some(r)
    }

    fn region_of_uva(&self, uva: u64) -> Option<&GuestRegion> {
        self.regions
            .iter()
            .find(|r| uva >= r.uva && uva - r.uva < r.size)
    }

    /// Host address of `[gpa, gpa + len)` if the whole range lies in one region that the device
    /// may read (`len` 0 is accepted for a `gpa` inside a region).
    #[inline(always)]
    pub fn gpa_to_host(&self, gpa: u64, len: u64) -> Option<*mut u8> {
        self.region_of_gpa(gpa)?.host_of_gpa(gpa, len, false)
    }

    /// [`GuestMemory::gpa_to_host`] for an access of the given direction (`write`: the device
    /// writes the range).
    #[inline(always)]
    pub fn gpa_to_host_for(&self, gpa: u64, len: u64, write: bool) -> Option<*mut u8> {
        self.region_of_gpa(gpa)?.host_of_gpa(gpa, len, write)
    }

    /// Host address of the front-end virtual range `[uva, uva + len)` if it lies in one region
    /// that the device may read.
    pub fn uva_to_host(&self, uva: u64, len: u64) -> Option<*mut u8> {
        self.uva_to_host_for(uva, len, false)
    }

    /// [`GuestMemory::uva_to_host`] for an access of the given direction.
    pub fn uva_to_host_for(&self, uva: u64, len: u64, write: bool) -> Option<*mut u8> {
        let r = self.region_of_uva(uva)?;
        r.host_of_gpa(r.gpa + (uva - r.uva), len, write)
    }

    /// The guest physical address of a front-end virtual address.
    pub fn uva_to_gpa(&self, uva: u64) -> Option<u64> {
        let r = self.region_of_uva(uva)?;
        Some(r.gpa + (uva - r.uva))
    }

    /// Calls `f(host, gpa, len)` for each piece of `[gpa, gpa + len)` that lies in one region,
    /// in order. Fails without calling `f` at all if any byte is not guest memory.
    fn for_each_piece(
        &self,
        gpa: u64,
        len: u64,
        write: bool,
        mut f: impl FnMut(*mut u8, u64, u64) -> bool,
    ) -> bool {
        let Some(end) = gpa.checked_add(len) else {
            return false;
        };
        // First pass checks, second pass acts: a failure must not leave partial effects.
        for pass in 0..2 {
            let mut cur = gpa;
            while cur < end {
                let Some(r) = self.region_of_gpa(cur) else {
                    return false;
                };
                if (if write { r.wlim } else { r.rlim }) == 0 {
                    // The region denies this access (an IOTLB permission).
                    return false;
                }
                let n = (end - cur).min(r.size - (cur - r.gpa));
                if pass == 1 {
                    let host = r.host.wrapping_add((cur - r.gpa) as usize);
                    if !f(host, cur, n) {
                        return false;
                    }
                }
                cur += n;
            }
        }
        true
    }

    /// Copies guest memory at `gpa` into `dst`. The range may span adjacent regions.
    pub fn read(&self, gpa: u64, dst: &mut [u8]) -> Result<(), QueueError> {
        let mut done = 0usize;
        let ok = self.for_each_piece(gpa, dst.len() as u64, false, |host, _, n| {
            let n = n as usize;
            // SAFETY: `host .. host + n` is inside one mapped region (checked by
            // `for_each_piece`), `done + n <= dst.len()`, and `dst` is our own buffer, which
            // cannot overlap guest memory (no references to guest memory exist).
            unsafe { ptr::copy_nonoverlapping(host, dst[done..done + n].as_mut_ptr(), n) };
            done += n;
            true
        });
        if ok {
            Ok(())
        } else {
            Err(QueueError::MemAccess {
                gpa,
                len: dst.len() as u64,
            })
        }
    }

    /// Copies `src` into guest memory at `gpa`. The range may span adjacent regions.
    pub fn write(&self, gpa: u64, src: &[u8]) -> Result<(), QueueError> {
        let mut done = 0usize;
        let ok = self.for_each_piece(gpa, src.len() as u64, true, |host, _, n| {
            let n = n as usize;
            // SAFETY: as in `read`, with the roles swapped: `host .. host + n` is mapped guest
            // memory and `src[done .. done + n]` is in bounds.
            unsafe { ptr::copy_nonoverlapping(src[done..done + n].as_ptr(), host, n) };
            done += n;
            true
        });
        if ok {
            Ok(())
        } else {
            Err(QueueError::MemAccess {
                gpa,
                len: src.len() as u64,
            })
        }
    }

    /// Translates one ring area (at set-up): the whole `[addr, addr + len)` must lie in one
    /// region that allows the device's accesses (`write`: the device writes the area; it may
    /// always read it) and its host address must be aligned to `align`.
    pub(crate) fn ring_area(
        &self,
        area: &'static str,
        addr: u64,
        len: u64,
        uva: bool,
        write: bool,
        align: usize,
    ) -> Result<RingArea, QueueError> {
        let host = |w| {
            if uva {
                self.uva_to_host_for(addr, len, w)
            } else {
                self.gpa_to_host_for(addr, len, w)
            }
        };
        let host = host(false).filter(|_| !write || host(true).is_some());
        let host = host.ok_or(QueueError::RingNotInMemory {
            area,
            kind: if uva { "uva" } else { "gpa" },
            addr,
            len,
        })?;
        if !(host as usize).is_multiple_of(align) || !addr.is_multiple_of(align as u64) {
            return Err(QueueError::RingMisaligned {
                area,
                addr,
                host: host as usize,
                align,
            });
        }
        Ok(RingArea {
            raw: Raw {
                ptr: host,
                len: len as usize,
            },
            _mem: self.clone(),
        })
    }

    /// A view of an indirect table `[gpa, gpa + len)` if it lies in one region.
    #[inline(always)]
    pub(crate) fn table(&self, gpa: u64, len: u32) -> Option<TableView<'_>> {
        let ptr = self.gpa_to_host(gpa, u64::from(len))?;
        Some(TableView {
            raw: Raw {
                ptr,
                len: len as usize,
            },
            _mem: std::marker::PhantomData,
        })
    }

    /// Appends the pieces of buffer `[gpa, gpa + len)` to `segs`. Fast path: one region.
    /// Returns `Err(true)` if the buffer is not guest memory, `Err(false)` if `segs` is full.
    #[inline(always)]
    pub(crate) fn push_buffer(
        &self,
        segs: &mut Segs,
        gpa: u64,
        len: u32,
        writable: bool,
    ) -> Result<(), bool> {
        if let Some(host) = self.gpa_to_host_for(gpa, u64::from(len), writable) {
            return if segs.push(host, gpa, len, writable) {
                Ok(())
            } else {
                Err(false)
            };
        }
        // Slow path: a buffer spanning adjacent regions becomes one segment per region.
        let mut full = false;
        let ok = self.for_each_piece(gpa, u64::from(len), writable, |host, g, n| {
            // `n <= len`, so it fits u32.
            if segs.push(host, g, n as u32, writable) {
                true
            } else {
                full = true;
                false
            }
        });
        match (ok, full) {
            (true, _) => Ok(()),
            (false, true) => Err(false),
            (false, false) => Err(true),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Raw accessors
// ---------------------------------------------------------------------------------------------

/// A pointer and length into guest memory. Private to this module: only `RingArea` (which holds
/// a `GuestMemory` clone) and `TableView` (which borrows one) create it, so the range is always
/// mapped while a `Raw` is reachable.
#[derive(Clone, Copy)]
struct Raw {
    ptr: *mut u8,
    len: usize,
}

/// One descriptor as read from guest memory (the same 16 bytes for both ring formats).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct RawDesc {
    /// Buffer address (a GPA).
    pub(crate) addr: u64,
    /// Buffer length.
    pub(crate) len: u32,
    /// Bytes 12..14: split `flags`, packed buffer `id`.
    pub(crate) w12: u16,
    /// Bytes 14..16: split `next`, packed `flags`.
    pub(crate) w14: u16,
}

impl Raw {
    /// Host pointer of `[off, off + n)` if it is inside the range and aligned to `align`.
    #[inline(always)]
    fn at(&self, off: usize, n: usize, align: usize) -> Option<*mut u8> {
        if off <= self.len && self.len - off >= n {
            // In bounds (checked just above).
            let p = self.ptr.wrapping_add(off);
            if (p as usize).is_multiple_of(align) {
                return Some(p);
            }
        }
        debug_assert!(
            false,
            "guest access at {off} of {n} bytes outside an area of {}",
            self.len
        );
        None
    }

    #[inline(always)]
    fn load_u16(&self, off: usize) -> u16 {
        match self.at(off, 2, 2) {
            Some(p) => {
                // SAFETY: `p` is in bounds of a mapped area and aligned for u16; every u16 ring
                // field is accessed atomically by us (Relaxed here: ordering comes from the
                // Acquire/Release index and flag accesses and from explicit fences).
                let a = unsafe { AtomicU16::from_ptr(p.cast::<u16>()) };
                u16::from_le(a.load(Ordering::Relaxed))
            }
            None => 0,
        }
    }

    #[inline(always)]
    fn load_u16_acquire(&self, off: usize) -> u16 {
        match self.at(off, 2, 2) {
            Some(p) => {
                // SAFETY: `p` is in bounds of a mapped area and aligned for u16; the location is
                // only ever accessed atomically or with single volatile accesses by us, and the
                // other side of the share uses its own atomic/barrier protocol.
                let a = unsafe { AtomicU16::from_ptr(p.cast::<u16>()) };
                u16::from_le(a.load(Ordering::Acquire))
            }
            None => 0,
        }
    }

    #[inline(always)]
    fn store_u16(&self, off: usize, v: u16) {
        if let Some(p) = self.at(off, 2, 2) {
            // SAFETY: as in `load_u16`; the area is writable.
            let a = unsafe { AtomicU16::from_ptr(p.cast::<u16>()) };
            a.store(v.to_le(), Ordering::Relaxed);
        }
    }

    #[inline(always)]
    fn store_u16_release(&self, off: usize, v: u16) {
        if let Some(p) = self.at(off, 2, 2) {
            // SAFETY: as in `load_u16_acquire`; the area is writable.
            let a = unsafe { AtomicU16::from_ptr(p.cast::<u16>()) };
            a.store(v.to_le(), Ordering::Release);
        }
    }

    #[inline(always)]
    fn load_u32(&self, off: usize) -> u32 {
        match self.at(off, 4, 4) {
            // SAFETY: in bounds of a mapped area and aligned for u32.
            Some(p) => u32::from_le(unsafe { ptr::read_volatile(p.cast::<u32>()) }),
            None => 0,
        }
    }

    #[inline(always)]
    fn store_u32(&self, off: usize, v: u32) {
        if let Some(p) = self.at(off, 4, 4) {
            // SAFETY: in bounds of a mapped, writable area and aligned for u32.
            unsafe { ptr::write_volatile(p.cast::<u32>(), v.to_le()) };
        }
    }

    /// Writes a descriptor's address, length and bytes 12..14 at `off` (16-aligned in a ring),
    /// and bytes 14..16 too when `w14` is given, after one bounds check.
    #[inline(always)]
    fn store_desc(&self, off: usize, addr: u64, len: u32, w12: u16, w14: Option<u16>) {
        let Some(p) = self.at(off, 16, 8) else {
            return;
        };
        // SAFETY: `p .. p + 16` is in bounds of a mapped, writable area and 8-aligned.
        unsafe { ptr::write_volatile(p.cast::<u64>(), addr.to_le()) };
        let q = p.wrapping_add(8);
        match w14 {
            Some(f) => {
                let b = u64::from(len) | u64::from(w12) << 32 | u64::from(f) << 48;
                // SAFETY: `q` is the second aligned u64 of the 16 checked bytes.
                unsafe { ptr::write_volatile(q.cast::<u64>(), b.to_le()) };
            }
            None => {
                // SAFETY: `q .. q + 4` lies in the 16 checked bytes and is 8-aligned.
                unsafe { ptr::write_volatile(q.cast::<u32>(), len.to_le()) };
                // SAFETY: `q + 4 .. q + 6` lies in the 16 checked bytes and is 4-aligned (the
                // flags at 14..16 are not touched).
                unsafe { ptr::write_volatile(q.wrapping_add(4).cast::<u16>(), w12.to_le()) };
            }
        }
    }

    /// Reads the 16-byte descriptor at `off` with one volatile access (any alignment).
    #[inline(always)]
    fn load_desc(&self, off: usize) -> RawDesc {
        let Some(p) = self.at(off, 16, 1) else {
            return RawDesc::default();
        };
        if (p as usize).is_multiple_of(8) {
            // SAFETY: `p .. p + 16` is in bounds of a mapped area and 8-aligned.
            let a = u64::from_le(unsafe { ptr::read_volatile(p.cast::<u64>()) });
            // SAFETY: as above; `p + 8` is the second aligned u64 of the 16 bytes.
            let b = u64::from_le(unsafe { ptr::read_volatile(p.wrapping_add(8).cast::<u64>()) });
            return RawDesc {
                addr: a,
                len: b as u32,
                w12: (b >> 32) as u16,
                w14: (b >> 48) as u16,
            };
        }
        // SAFETY: `p .. p + 16` is in bounds of a mapped area; `[u8; 16]` has alignment 1.
        let b = unsafe { ptr::read_volatile(p.cast::<[u8; 16]>()) };
        let [
            a0,
            a1,
            a2,
            a3,
            a4,
            a5,
            a6,
            a7,
            l0,
            l1,
            l2,
            l3,
            w0,
            w1,
            f0,
            f1,
        ] = b;
        RawDesc {
            addr: u64::from_le_bytes([a0, a1, a2, a3, a4, a5, a6, a7]),
            len: u32::from_le_bytes([l0, l1, l2, l3]),
            w12: u16::from_le_bytes([w0, w1]),
            w14: u16::from_le_bytes([f0, f1]),
        }
    }

    fn zero(&self) {
        // SAFETY: the whole range is mapped and writable (see `Raw`).
        unsafe { ptr::write_bytes(self.ptr, 0, self.len) };
    }
}

/// Asks the CPU to bring the cache line at `p` closer (a hint: it never faults, whatever `p`
/// is, and is a no-op on targets without a prefetch instruction).
#[inline(always)]
pub(crate) fn prefetch_line(p: *const u8) {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::x86_64::{_MM_HINT_T0, _mm_prefetch};
        // SAFETY: PREFETCHT0 is a hint that performs no architectural access: it cannot fault or
        // read anything visible to the program, for any address (SSE is part of the x86-64
        // baseline, so the instruction always exists).
        unsafe { _mm_prefetch::<_MM_HINT_T0>(p.cast::<i8>()) };
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = p;
}

/// Asks the CPU to fetch the cache line at `p` for writing (PREFETCHW: the line arrives owned,
/// so a later store does not wait for the other core to give it up). A hint: it never faults.
#[inline(always)]
pub(crate) fn prefetch_line_w(p: *const u8) {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: PREFETCHW (0F 0D /1) is a hint with no architectural effect: it cannot fault and
    // touches no register or flag; processors without it execute it as a no-op prefetch.
    unsafe {
        std::arch::asm!("prefetchw [{0}]", in(reg) p, options(nostack, preserves_flags, readonly));
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = p;
}

/// One translated ring area (descriptor table, avail/used ring, event suppression structure),
/// owning a clone of the memory it lives in so it can never dangle.
pub(crate) struct RingArea {
    raw: Raw,
    _mem: GuestMemory,
}

impl RingArea {
    /// Host address of the area (for tests and debugging).
    #[allow(dead_code)]
    pub(crate) fn host(&self) -> *mut u8 {
        self.raw.ptr
    }

    /// Relaxed atomic little-endian u16 load.
    #[inline(always)]
    pub(crate) fn load_u16(&self, off: usize) -> u16 {
        self.raw.load_u16(off)
    }

    /// Acquire little-endian u16 load (ring indices and packed descriptor flags).
    #[inline(always)]
    pub(crate) fn load_u16_acquire(&self, off: usize) -> u16 {
        self.raw.load_u16_acquire(off)
    }

    /// Relaxed atomic little-endian u16 store.
    #[inline(always)]
    pub(crate) fn store_u16(&self, off: usize, v: u16) {
        self.raw.store_u16(off, v)
    }

    /// Release little-endian u16 store (publishing an index or a packed descriptor).
    #[inline(always)]
    pub(crate) fn store_u16_release(&self, off: usize, v: u16) {
        self.raw.store_u16_release(off, v)
    }

    /// Volatile little-endian u32 load.
    #[inline(always)]
    pub(crate) fn load_u32(&self, off: usize) -> u32 {
        self.raw.load_u32(off)
    }

    /// Volatile little-endian u32 store.
    #[inline(always)]
    pub(crate) fn store_u32(&self, off: usize, v: u32) {
        self.raw.store_u32(off, v)
    }

    /// Writes one descriptor (all 16 bytes, or the first 14 when `w14` is `None`).
    #[inline(always)]
    pub(crate) fn store_desc(&self, off: usize, addr: u64, len: u32, w12: u16, w14: Option<u16>) {
        self.raw.store_desc(off, addr, len, w12, w14)
    }

    /// One 16-byte descriptor, read once.
    #[inline(always)]
    pub(crate) fn load_desc(&self, off: usize) -> RawDesc {
        self.raw.load_desc(off)
    }

    /// Asks for the lines of `[off, off + n)` (clamped to the area) to be brought into the
    /// cache, owned when `write` (the caller will store there); a hint only, nothing is read.
    #[inline(always)]
    pub(crate) fn prefetch(&self, off: usize, n: usize, write: bool) {
        let hint = if write {
            prefetch_line_w
        } else {
            prefetch_line
        };
        let end = off.saturating_add(n).min(self.raw.len);
        let mut o = off;
        while o < end {
            hint(self.raw.ptr.wrapping_add(o));
            o += 64;
        }
        if end > off {
            hint(self.raw.ptr.wrapping_add(end - 1));
        }
    }

    /// Zeroes the whole area (driver-side ring initialisation).
    pub(crate) fn zero(&self) {
        self.raw.zero()
    }
}

// SAFETY: a `RingArea` keeps its memory mapped (it owns a `GuestMemory` clone) and only accesses
// it with single volatile/atomic operations, never through references; the owner (one queue)
// may move to another thread with it.
unsafe impl Send for RingArea {}

/// A borrowed view of an indirect descriptor table.
pub(crate) struct TableView<'a> {
    raw: Raw,
    _mem: std::marker::PhantomData<&'a GuestMemory>,
}

impl TableView<'_> {
    /// One 16-byte descriptor, read once.
    #[inline(always)]
    pub(crate) fn load_desc(&self, off: usize) -> RawDesc {
        self.raw.load_desc(off)
    }
}

// ---------------------------------------------------------------------------------------------
// Segments of a popped chain
// ---------------------------------------------------------------------------------------------

/// One guest buffer (or the part of one in a single region) of a popped chain.
#[derive(Clone, Copy, Debug)]
pub struct Seg {
    host: *mut u8,
    gpa: u64,
    len: u32,
    writable: bool,
}

impl Seg {
    const EMPTY: Seg = Seg {
        host: ptr::null_mut(),
        gpa: 0,
        len: 0,
        writable: false,
    };

    /// Where the buffer is mapped here. Dereferencing it is the caller's business (and
    /// `unsafe`); [`Segs::read`] and [`Segs::write`] are the safe way.
    #[inline(always)]
    pub fn host(&self) -> *mut u8 {
        self.host
    }

    /// Guest physical address of the buffer.
    #[inline(always)]
    pub fn gpa(&self) -> u64 {
        self.gpa
    }

    /// Length in bytes (never 0: zero-length descriptors are skipped).
    #[inline(always)]
    #[allow(clippy::len_without_is_empty)]
    pub fn len(&self) -> u32 {
        self.len
    }

    /// Whether the device may write the buffer (`VIRTQ_DESC_F_WRITE`).
    #[inline(always)]
    pub fn is_writable(&self) -> bool {
        self.writable
    }
}

/// The buffers of one popped chain: device-readable ones first, then device-writable ones.
/// Reused from pop to pop (allocated once, [`SEGS_MAX`] entries). It keeps a clone of the memory
/// table its buffers came from, so they stay mapped while the `Segs` holds them.
pub struct Segs {
    segs: Box<[Seg]>,
    n: usize,
    n_readable: usize,
    mem: GuestMemory,
}

// SAFETY: the raw pointers point into the regions of `mem`, which `Segs` keeps alive and which are
// `Send + Sync`; moving the whole set to another thread moves that ownership with it. (`Segs` is
// not `Sync`: `write(&self)` stores into guest memory.)
unsafe impl Send for Segs {}

impl Default for Segs {
    fn default() -> Self {
        Segs::new()
    }
}

impl std::fmt::Debug for Segs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Segs")
            .field("readable", &self.readable())
            .field("writable", &self.writable())
            .finish()
    }
}

impl Segs {
    /// An empty set with room for [`SEGS_MAX`] buffers (allocates once).
    pub fn new() -> Segs {
        Segs {
            segs: vec![Seg::EMPTY; SEGS_MAX].into_boxed_slice(),
            n: 0,
            n_readable: 0,
            mem: GuestMemory::empty(),
        }
    }

    /// Number of buffers.
    #[inline(always)]
    pub fn len(&self) -> usize {
        self.n
    }

    /// Whether the chain had no non-empty buffer.
    #[inline(always)]
    pub fn is_empty(&self) -> bool {
        self.n == 0
    }

    /// All buffers, readable ones first.
    #[inline(always)]
    pub fn as_slice(&self) -> &[Seg] {
        &self.segs[..self.n]
    }

    /// The device-readable buffers (driver → device data).
    #[inline(always)]
    pub fn readable(&self) -> &[Seg] {
        &self.segs[..self.n_readable]
    }

    /// The device-writable buffers (device → driver data).
    #[inline(always)]
    pub fn writable(&self) -> &[Seg] {
        &self.segs[self.n_readable..self.n]
    }

    /// Empties the set before a pop; adopts `mem` as the table its buffers come from (an `Arc`
    /// clone only when the table changed).
    #[inline(always)]
    pub(crate) fn reset(&mut self, mem: &GuestMemory) {
        self.n = 0;
        self.n_readable = 0;
        if !self.mem.ptr_eq(mem) {
            self.mem = mem.clone();
        }
    }

    /// Appends one buffer; false when full. `host .. host + len` must be inside `self.mem`
    /// (guaranteed by `GuestMemory::push_buffer`, the only caller).
    #[inline(always)]
    fn push(&mut self, host: *mut u8, gpa: u64, len: u32, writable: bool) -> bool {
        if self.n == self.segs.len() {
            return false;
        }
        self.segs[self.n] = Seg {
            host,
            gpa,
            len,
            writable,
        };
        self.n += 1;
        if !writable {
            self.n_readable = self.n;
        }
        true
    }

    /// Gathers the device-readable bytes starting `offset` bytes into the chain into `dst`;
    /// returns how many bytes were copied (less than `dst.len()` at the chain's end).
    pub fn read(&self, offset: usize, dst: &mut [u8]) -> usize {
        let mut skip = offset;
        let mut done = 0;
        for s in self.readable() {
            if done == dst.len() {
                break;
            }
            let len = s.len as usize;
            if skip >= len {
                skip -= len;
                continue;
            }
            let n = (len - skip).min(dst.len() - done);
            // `skip < len`: inside the buffer.
            let from = s.host.wrapping_add(skip);
            // SAFETY: `s.host + skip .. + n` is inside the buffer `[host, host + len)`, which lies
            // in a mapped region of `self.mem` (kept alive by `self`); `dst[done .. done + n]` is
            // in bounds and is our own memory, disjoint from guest memory.
            unsafe { ptr::copy_nonoverlapping(from, dst[done..done + n].as_mut_ptr(), n) };
            done += n;
            skip = 0;
        }
        done
    }

    /// Scatters `src` into the device-writable buffers starting `offset` bytes into them;
    /// returns how many bytes were copied (less than `src.len()` when they are full).
    pub fn write(&self, offset: usize, src: &[u8]) -> usize {
        let mut skip = offset;
        let mut done = 0;
        for s in self.writable() {
            if done == src.len() {
                break;
            }
            let len = s.len as usize;
            if skip >= len {
                skip -= len;
                continue;
            }
            let n = (len - skip).min(src.len() - done);
            // `skip < len`: inside the buffer.
            let to = s.host.wrapping_add(skip);
            // SAFETY: as in `read`: the destination is inside a writable guest buffer of a
            // mapped region kept alive by `self`; the source is our own slice, in bounds.
            unsafe { ptr::copy_nonoverlapping(src[done..done + n].as_ptr(), to, n) };
            done += n;
            skip = 0;
        }
        done
    }

    /// Marks in `log` the pages of the first `written` bytes of the writable buffers (what a
    /// device wrote), for live migration.
    pub fn log_written(&self, log: &DirtyLog, written: u32) {
        let mut left = u64::from(written);
        for s in self.writable() {
            if left == 0 {
                break;
            }
            let n = left.min(u64::from(s.len));
            log.mark(s.gpa, n);
            left -= n;
        }
    }
}

/// Buffers captured from popped chains, so a burst can pop every chain first (its descriptor
/// reads overlapping) and copy afterwards (the buffers' lines requested in advance: for writing
/// when the device fills them, for reading when it drains them). Each entry is the first
/// device-writable or device-readable buffer of one chain. Keeps a clone of the memory table the buffers belong to, so they stay
/// mapped while held. Allocated once.
pub struct Staged {
    items: Box<[Seg]>,
    n: usize,
    mem: GuestMemory,
}

// SAFETY: as for `Segs`: the raw pointers point into regions of `mem`, which the value keeps
// alive and which are `Send + Sync`.
unsafe impl Send for Staged {}

impl std::fmt::Debug for Staged {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Staged").field("len", &self.n).finish()
    }
}

impl Staged {
    /// Room for `cap` destinations.
    pub fn new(cap: usize) -> Staged {
        Staged {
            items: vec![Seg::EMPTY; cap].into_boxed_slice(),
            n: 0,
            mem: GuestMemory::empty(),
        }
    }

    /// Number of staged destinations.
    #[inline(always)]
    pub fn len(&self) -> usize {
        self.n
    }

    /// Whether nothing is staged.
    #[inline(always)]
    pub fn is_empty(&self) -> bool {
        self.n == 0
    }

    /// Capacity.
    #[inline(always)]
    pub fn capacity(&self) -> usize {
        self.items.len()
    }

    /// Empties the set; adopts `mem` as the table destinations come from.
    #[inline(always)]
    pub fn clear(&mut self, mem: &GuestMemory) {
        self.n = 0;
        if !self.mem.ptr_eq(mem) {
            self.mem = mem.clone();
        }
    }

    /// Stages the first writable buffer of the chain in `segs` if it alone holds at least `need`
    /// bytes, and asks for its first `need` bytes' lines for writing. False (nothing staged) when
    /// full, when the chain has no such buffer, or when `segs` came from another memory table.
    #[inline(always)]
    pub fn push_first_writable(&mut self, segs: &Segs, need: usize) -> bool {
        if self.n == self.items.len() || !segs.mem.ptr_eq(&self.mem) {
            return false;
        }
        let Some(&s) = segs.writable().first() else {
            return false;
        };
        if (s.len as usize) < need {
            return false;
        }
        self.stage(s, need, true);
        true
    }

    /// Appends `s` (room checked by the caller) and requests the lines of its first `n` bytes
    /// (`0 < n <= s.len`), for writing or for reading.
    #[inline(always)]
    fn stage(&mut self, s: Seg, n: usize, write: bool) {
        let hint = if write {
            prefetch_line_w
        } else {
            prefetch_line
        };
        let mut off = 0;
        while off < n {
            // `off < n <= len`: inside the buffer.
            hint(s.host.wrapping_add(off));
            off += 64;
        }
        hint(s.host.wrapping_add(n - 1));
        self.items[self.n] = s;
        self.n += 1;
    }

    /// Stages the first device-readable buffer of the chain in `segs` if the chain's readable
    /// bytes all lie in it (`total` readable bytes in all) and asks for its lines. False
    /// (nothing staged) when full, when the chain's readable part spans buffers, or when `segs`
    /// came from another memory table.
    #[inline(always)]
    pub fn push_first_readable(&mut self, segs: &Segs, total: usize) -> bool {
        if self.n == self.items.len() || !segs.mem.ptr_eq(&self.mem) {
            return false;
        }
        let Some(&s) = segs.readable().first() else {
            return false;
        };
        if s.len as usize != total {
            return false;
        }
        self.stage(s, total, false);
        true
    }

    /// Copies bytes `offset ..` of staged buffer `i` into `dst`, as many as both hold; returns
    /// how many (0 for an `i` not staged or an offset past the end).
    #[inline(always)]
    pub fn read(&self, i: usize, offset: usize, dst: &mut [u8]) -> usize {
        let Some(s) = self.items[..self.n].get(i) else {
            return 0;
        };
        let len = s.len as usize;
        if offset >= len {
            return 0;
        }
        let n = dst.len().min(len - offset);
        // SAFETY: `s.host + offset .. + n` lies inside the buffer `[host, host + len)` of a
        // region of `self.mem`, which `self` keeps mapped; `dst[..n]` is our own memory, in
        // bounds and disjoint from guest memory.
        unsafe { ptr::copy_nonoverlapping(s.host.wrapping_add(offset), dst.as_mut_ptr(), n) };
        n
    }

    /// Writes `a` then `b` back to back at the start of destination `i`, as much as fits;
    /// returns the bytes written (0 for an `i` not staged).
    #[inline(always)]
    pub fn write2(&self, i: usize, a: &[u8], b: &[u8]) -> usize {
        let Some(s) = self.items[..self.n].get(i) else {
            return 0;
        };
        let len = s.len as usize;
        let na = a.len().min(len);
        let nb = b.len().min(len - na);
        // SAFETY: `s.host .. s.host + len` is a writable guest buffer inside a region of
        // `self.mem`, which `self` keeps mapped; `na <= len`; the source is our own slice, in
        // bounds and disjoint from guest memory.
        unsafe { ptr::copy_nonoverlapping(a.as_ptr(), s.host, na) };
        // SAFETY: as above; `na + nb <= len`, so `host + na .. + nb` is inside the buffer.
        unsafe { ptr::copy_nonoverlapping(b.as_ptr(), s.host.wrapping_add(na), nb) };
        na + nb
    }

    /// Guest physical address of destination `i` (for the dirty log).
    #[inline(always)]
    pub fn gpa(&self, i: usize) -> u64 {
        self.items[..self.n].get(i).map_or(0, |s| s.gpa)
    }
}

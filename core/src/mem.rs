//! Shared hugepage memory: segments backed by a `memfd`, and named zones inside them.
//!
//! A [`Segment`] is one `memfd_create(MFD_HUGETLB)` file mapped `MAP_SHARED` (through
//! `memmap2::MmapRaw`, so no Rust reference ever aliases memory a device may write). The segment
//! keeps its fd so it can be handed to QEMU, a VDUSE kernel or another process by `SCM_RIGHTS`, and
//! it uses IOVA = VA, the address a VFIO DMA mapping of it uses.
//!
//! When no hugepages are reserved, [`MemMode::Auto`] falls back to 4 KiB pages (a plain memfd) with
//! one warning per process, like DPDK's `--no-huge`. An explicit `2M` or `1G` request fails with a
//! clear error instead.
//!
//! Zones are named, aligned sub-allocations of a segment (a bump allocator: zones live as long as
//! their segment, as DPDK memzones do).

use std::fs::File;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, RawFd};
use std::str::FromStr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use memfd::{HugetlbSize, MemfdOptions};
use memmap2::{MmapOptions, MmapRaw};

use crate::error::{Error, Result};

/// Size of the pages backing a segment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PageSize {
    /// 4 KiB ordinary pages (no hugepages).
    Small4K,
    /// 2 MiB hugepages.
    Huge2M,
    /// 1 GiB hugepages.
    Huge1G,
}

impl PageSize {
    /// Page size in bytes.
    pub const fn bytes(self) -> usize {
        match self {
            PageSize::Small4K => 4 << 10,
            PageSize::Huge2M => 2 << 20,
            PageSize::Huge1G => 1 << 30,
        }
    }

    /// Short label: `4K`, `2M`, `1G`.
    pub const fn label(self) -> &'static str {
        match self {
            PageSize::Small4K => "4K",
            PageSize::Huge2M => "2M",
            PageSize::Huge1G => "1G",
        }
    }

    fn hugetlb(self) -> Option<HugetlbSize> {
        match self {
            PageSize::Small4K => None,
            PageSize::Huge2M => Some(HugetlbSize::Huge2MB),
            PageSize::Huge1G => Some(HugetlbSize::Huge1GB),
        }
    }
}

/// How segments get their pages.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum MemMode {
    /// 2 MiB hugepages when available, otherwise 4 KiB pages with one warning.
    #[default]
    Auto,
    /// 2 MiB hugepages or an error.
    Huge2M,
    /// 1 GiB hugepages or an error.
    Huge1G,
    /// 4 KiB pages only (like DPDK's `--no-huge`).
    NoHuge,
}

impl FromStr for MemMode {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        match s.to_ascii_lowercase().as_str() {
            "auto" => Ok(MemMode::Auto),
            "2m" | "2mb" => Ok(MemMode::Huge2M),
            "1g" | "1gb" => Ok(MemMode::Huge1G),
            "no-huge" | "nohuge" | "4k" => Ok(MemMode::NoHuge),
            _ => Err(Error::InvalidMemMode(s.to_string())),
        }
    }
}

/// Free hugepages of a size, as the kernel reports them (0 when unknown).
pub fn free_hugepages(page: PageSize) -> u64 {
    let kb = page.bytes() / 1024;
    std::fs::read_to_string(format!(
        "/sys/kernel/mm/hugepages/hugepages-{kb}kB/free_hugepages"
    ))
    .ok()
    .and_then(|s| s.trim().parse().ok())
    .unwrap_or(0)
}

static FALLBACK_WARNED: AtomicBool = AtomicBool::new(false);

/// One shared memory mapping with its fd. IOVA = VA.
#[derive(Debug)]
pub struct Segment {
    name: String,
    file: File,
    map: MmapRaw,
    len: usize,
    page: PageSize,
    zones: Mutex<ZoneTable>,
}

#[derive(Debug, Default)]
struct ZoneTable {
    next: usize,
    names: Vec<String>,
}

impl Segment {
    /// Creates and maps a segment of at least `len` bytes (rounded up to the page size).
    pub fn new(name: &str, len: usize, mode: MemMode) -> Result<Arc<Segment>> {
        if len == 0 || len > (1usize << 46) {
            return Err(Error::InvalidSegmentSize(len, name.to_string()));
        }
        match mode {
            MemMode::NoHuge => Self::with_pages(name, len, PageSize::Small4K),
            MemMode::Huge2M => Self::with_pages(name, len, PageSize::Huge2M),
            MemMode::Huge1G => Self::with_pages(name, len, PageSize::Huge1G),
            MemMode::Auto => match Self::with_pages(name, len, PageSize::Huge2M) {
                Ok(seg) => Ok(seg),
                Err(Error::HugepageReservation { .. }) => {
                    if !FALLBACK_WARNED.swap(true, Ordering::Relaxed) {
                        tracing::warn!(
                            "no 2 MiB hugepages available for '{name}': falling back to 4 KiB pages \
                             (slower; reserve hugepages with 'echo 512 > /proc/sys/vm/nr_hugepages')"
                        );
                    }
                    Self::with_pages(name, len, PageSize::Small4K)
                }
                Err(e) => Err(e),
            },
        }
    }

    fn with_pages(name: &str, len: usize, page: PageSize) -> Result<Arc<Segment>> {
        let len = len.div_ceil(page.bytes()) * page.bytes();
        let reservation_error = || Error::HugepageReservation {
            name: name.to_string(),
            page: page.label(),
            page_kb: (page.bytes() / 1024) as u64,
            bytes: len,
            needed: len / page.bytes(),
            free: free_hugepages(page),
        };
        let memfd = MemfdOptions::default()
            .close_on_exec(true)
            .hugetlb(page.hugetlb())
            .create(format!("vdpakit:{name}"))
            .map_err(|e| {
                let source = match e {
                    memfd::Error::Create(io)
                    | memfd::Error::AddSeals(io)
                    | memfd::Error::GetSeals(io) => io,
                };
                (source.raw_os_error(), source)
            });
        let file = match memfd {
            Ok(m) => m.into_file(),
            // A kernel without hugetlb support for memfd, or no pool of this size at all.
            Err((Some(libc::EINVAL | libc::ENOENT | libc::ENOMEM), _))
                if page != PageSize::Small4K =>
            {
                return Err(reservation_error());
            }
            Err((_, source)) => {
                return Err(Error::Memory {
                    name: name.to_string(),
                    op: "memfd_create",
                    source,
                });
            }
        };
        if let Err(source) = file.set_len(len as u64) {
            if page != PageSize::Small4K {
                return Err(reservation_error());
            }
            return Err(Error::Memory {
                name: name.to_string(),
                op: "ftruncate",
                source,
            });
        }
        // hugetlbfs reserves the pages at mmap time, so a shortage shows up here as ENOMEM.
        let map = match MmapOptions::new().len(len).populate().map_raw(&file) {
            Ok(m) => m,
            Err(e) if page != PageSize::Small4K && is_no_memory(&e) => {
                return Err(reservation_error());
            }
            Err(source) => {
                return Err(Error::Memory {
                    name: name.to_string(),
                    op: "mmap",
                    source,
                });
            }
        };
        tracing::debug!(segment = name, len, page = page.label(), "segment mapped");
        Ok(Arc::new(Segment {
            name: name.to_string(),
            file,
            map,
            len,
            page,
            zones: Mutex::new(ZoneTable::default()),
        }))
    }

    /// Segment name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Mapped length in bytes (a multiple of the page size).
    pub fn len(&self) -> usize {
        self.len
    }

    /// Always false: segments are never empty.
    pub fn is_empty(&self) -> bool {
        false
    }

    /// Size of the pages backing the segment.
    pub fn page_size(&self) -> PageSize {
        self.page
    }

    /// Whether the segment is backed by hugepages.
    pub fn is_huge(&self) -> bool {
        self.page != PageSize::Small4K
    }

    /// Start of the mapping in this process.
    pub fn base(&self) -> *mut u8 {
        self.map.as_mut_ptr()
    }

    /// IOVA of the segment's first byte (IOVA = VA).
    pub fn iova(&self) -> u64 {
        self.base() as u64
    }

    /// The memfd, for passing to another process (it maps at offset 0 for [`Segment::len`] bytes).
    pub fn file(&self) -> &File {
        &self.file
    }

    /// Whether `[addr, addr + len)` lies inside the mapping.
    pub fn contains(&self, addr: usize, len: usize) -> bool {
        let base = self.base() as usize;
        addr >= base
            && addr
                .checked_add(len)
                .is_some_and(|end| end <= base + self.len)
    }

    /// The physical address of each page of the segment, in order (from `/proc/self/pagemap`),
    /// for devices that DMA to physical addresses (IOVA = PA, like DPDK's `--iova-mode=pa`). Only
    /// meaningful for hugepages, which are physically contiguous and never move; needs
    /// `CAP_SYS_ADMIN` (without it the kernel reports frame number 0, which is an error here).
    pub fn physical_pages(&self) -> Result<Vec<u64>> {
        use std::os::unix::fs::FileExt;
        let io_err = |op: &'static str, source: io::Error| Error::Memory {
            name: self.name.clone(),
            op,
            source,
        };
        let f =
            File::open("/proc/self/pagemap").map_err(|e| io_err("open /proc/self/pagemap", e))?;
        let page = self.page.bytes();
        let base = self.base() as usize;
        let mut out = Vec::with_capacity(self.len / page);
        for i in 0..self.len / page {
            let va = base + i * page;
            let mut e = [0u8; 8];
            f.read_exact_at(&mut e, (va / 4096 * 8) as u64)
                .map_err(|e| io_err("read /proc/self/pagemap", e))?;
            let entry = u64::from_le_bytes(e);
            let pfn = entry & ((1u64 << 55) - 1);
            if entry & (1 << 63) == 0 || pfn == 0 {
                return Err(io_err(
                    "physical address lookup",
                    io::Error::other(format!(
                        "page at {va:#x} has no frame number in /proc/self/pagemap (entry {entry:#x}): \
                         physical addresses need root (CAP_SYS_ADMIN) and a present page"
                    )),
                ));
            }
            out.push(pfn * 4096);
        }
        Ok(out)
    }

    /// Reserves a named zone of `len` bytes aligned to `align` (a power of two).
    pub fn reserve_zone(self: &Arc<Self>, name: &str, len: usize, align: usize) -> Result<Zone> {
        if !align.is_power_of_two() {
            return Err(Error::InvalidAlign(align));
        }
        let mut table = self.zones.lock().unwrap_or_else(|p| p.into_inner());
        if table.names.iter().any(|n| n == name) {
            return Err(Error::ZoneExists(name.to_string(), self.name.clone()));
        }
        let base = self.base() as usize;
        let start = (base + table.next).next_multiple_of(align) - base;
        let end = start.checked_add(len).filter(|&e| e <= self.len && len > 0);
        let Some(end) = end else {
            return Err(Error::ZoneNoSpace {
                zone: name.to_string(),
                segment: self.name.clone(),
                len,
                align,
                free: self.len - table.next,
            });
        };
        table.next = end;
        table.names.push(name.to_string());
        Ok(Zone {
            seg: Arc::clone(self),
            name: name.to_string(),
            offset: start,
            len,
        })
    }
}

impl AsFd for Segment {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.file.as_fd()
    }
}

impl AsRawFd for Segment {
    fn as_raw_fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }
}

fn is_no_memory(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::ENOMEM) | Some(libc::EINVAL))
}

/// A named, aligned part of a segment. Keeps its segment mapped.
#[derive(Debug, Clone)]
pub struct Zone {
    seg: Arc<Segment>,
    name: String,
    offset: usize,
    len: usize,
}

impl Zone {
    /// Zone name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Always false: zones are never empty.
    pub fn is_empty(&self) -> bool {
        false
    }

    /// Offset of the zone in its segment (and in the segment's fd).
    pub fn offset(&self) -> usize {
        self.offset
    }

    /// First byte of the zone in this process.
    pub fn as_ptr(&self) -> *mut u8 {
        self.seg.base().wrapping_add(self.offset)
    }

    /// IOVA of the first byte.
    pub fn iova(&self) -> u64 {
        self.seg.iova() + self.offset as u64
    }

    /// The segment the zone lives in.
    pub fn segment(&self) -> &Arc<Segment> {
        &self.seg
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn no_huge_segment_is_zeroed_shared_and_has_fd() {
        let seg = Segment::new("t-nohuge", 10_000, MemMode::NoHuge).unwrap();
        assert_eq!(seg.len(), 12 << 10, "rounded up to 4 KiB pages");
        assert_eq!(seg.page_size(), PageSize::Small4K);
        assert!(seg.as_raw_fd() >= 0);
        assert_eq!(seg.iova(), seg.base() as u64);
        // Writing through the mapping is visible through the fd: the mapping is MAP_SHARED.
        let z = seg.reserve_zone("z", 64, 64).unwrap();
        let mut buf = [0u8; 4];
        std::os::unix::fs::FileExt::read_at(seg.file(), &mut buf, z.offset() as u64).unwrap();
        assert_eq!(buf, [0; 4]);
        std::os::unix::fs::FileExt::write_at(seg.file(), &[1, 2, 3, 4], z.offset() as u64).unwrap();
        let mut back = [0u8; 4];
        std::os::unix::fs::FileExt::read_at(seg.file(), &mut back, z.offset() as u64).unwrap();
        assert_eq!(back, [1, 2, 3, 4]);
    }

    #[test]
    fn zones_are_aligned_disjoint_and_named_once() {
        let seg = Segment::new("t-zones", 1 << 16, MemMode::NoHuge).unwrap();
        let a = seg.reserve_zone("a", 100, 64).unwrap();
        let b = seg.reserve_zone("b", 100, 4096).unwrap();
        assert_eq!(b.as_ptr() as usize % 4096, 0);
        assert!(b.offset() >= a.offset() + a.len());
        assert!(matches!(
            seg.reserve_zone("a", 1, 1),
            Err(Error::ZoneExists(..))
        ));
        assert!(matches!(
            seg.reserve_zone("c", 1, 3),
            Err(Error::InvalidAlign(3))
        ));
        let err = seg.reserve_zone("big", 1 << 20, 64).unwrap_err();
        assert!(matches!(err, Error::ZoneNoSpace { .. }), "{err}");
        assert!(err.to_string().contains("'big'"));
        assert!(seg.contains(a.as_ptr() as usize, 100));
        assert!(!seg.contains(seg.base() as usize + seg.len() - 1, 2));
    }

    #[test]
    fn auto_mode_never_fails_for_lack_of_hugepages() {
        // Either hugepages are reserved (then the segment is huge) or it falls back to 4 KiB.
        let seg = Segment::new("t-auto", 3 << 20, MemMode::Auto).unwrap();
        assert!(seg.len() >= 3 << 20);
        assert_eq!(seg.len() % seg.page_size().bytes(), 0);
    }

    #[test]
    fn strict_1g_request_without_pages_is_a_clear_error() {
        if free_hugepages(PageSize::Huge1G) > 0 {
            eprintln!("1 GiB hugepages are reserved here; the shortage path is not exercised");
            return;
        }
        let err = Segment::new("t-1g", 1, MemMode::Huge1G).unwrap_err();
        let msg = err.to_string();
        assert!(matches!(err, Error::HugepageReservation { .. }), "{msg}");
        assert!(
            msg.contains("1G") && msg.contains("hugepages-1048576kB"),
            "{msg}"
        );
    }

    #[test]
    fn mem_mode_parsing_names_the_value() {
        assert_eq!("2M".parse::<MemMode>().unwrap(), MemMode::Huge2M);
        assert_eq!("no-huge".parse::<MemMode>().unwrap(), MemMode::NoHuge);
        let e = "3M".parse::<MemMode>().unwrap_err().to_string();
        assert!(e.contains("'3M'") && e.contains("accepted"), "{e}");
    }

    #[test]
    fn zero_length_segment_is_rejected() {
        assert!(matches!(
            Segment::new("z", 0, MemMode::NoHuge),
            Err(Error::InvalidSegmentSize(0, _))
        ));
    }
}

//! The VFIO back end's system calls: the only `unsafe` of the VFIO back end.
//!
//! `vfio-ioctls` opens the container, groups and devices, reads region and interrupt info and
//! does the type1 DMA map/unmap; what it lacks is here: `VFIO_DEVICE_SET_IRQS` with unused
//! vectors (fd -1) and loopback triggers, `VFIO_DEVICE_RESET` with its error, a second handle on
//! the device fd, and BAR mmaps wrapped as [`Mmio`].
//!
//! Facts used (Linux `include/uapi/linux/vfio.h`): ioctls are `_IO(';', 100 + n)`;
//! `VFIO_DEVICE_SET_IRQS` is n = 10 with `struct vfio_irq_set { u32 argsz, flags, index, start,
//! count; u8 data[]; }` (data: one s32 fd per vector for DATA_EVENTFD, -1 = unused; nothing for
//! DATA_NONE); `VFIO_DEVICE_RESET` is n = 11, no argument.

use std::any::Any;
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, RawFd};
use std::sync::Arc;

use vfio_bindings::bindings::vfio::{
    VFIO_BASE, VFIO_IRQ_SET_ACTION_TRIGGER, VFIO_IRQ_SET_DATA_EVENTFD, VFIO_IRQ_SET_DATA_NONE,
    VFIO_TYPE,
};
use vfio_ioctls::{VfioContainer, VfioError};

use crate::pci::Mmio;
use crate::virtio::GuestRegion;

const fn vfio_io(n: u32) -> libc::c_ulong {
    // _IO(type, nr): no direction, no size.
    (((VFIO_TYPE as u32) << 8) | (VFIO_BASE + n)) as libc::c_ulong
}

const VFIO_DEVICE_SET_IRQS: libc::c_ulong = vfio_io(10);
const VFIO_DEVICE_RESET: libc::c_ulong = vfio_io(11);

/// A second handle on a device fd that `vfio-ioctls` owns, so the back end can pread/pwrite,
/// mmap and ioctl it without going through the crate (which swallows errors there).
pub(super) fn dup_fd(fd: RawFd) -> io::Result<File> {
    // SAFETY: `fd` is the device fd of a `VfioDevice` the caller holds for the duration of this
    // call, so it is open; it is only borrowed to duplicate it.
    let borrowed = unsafe { BorrowedFd::borrow_raw(fd) };
    Ok(File::from(borrowed.try_clone_to_owned()?))
}

fn ioctl_words(file: &File, request: libc::c_ulong, words: &mut [u32]) -> io::Result<()> {
    // SAFETY: `words` is a live, writable buffer that starts with the `argsz` the kernel reads
    // and holds `argsz` bytes (the callers build it so); the kernel reads at most that many.
    let r = unsafe { libc::ioctl(file.as_raw_fd(), request, words.as_mut_ptr()) };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

fn irq_set(flags: u32, index: u32, start: u32, count: u32, data: &[u32]) -> Vec<u32> {
    let argsz = ((5 + data.len()) * 4) as u32;
    let mut w = vec![argsz, flags, index, start, count];
    w.extend_from_slice(data);
    w
}

/// Wires vectors `0..fds.len()` of interrupt `index` to eventfds (`None`: vector unused).
pub(super) fn set_irq_eventfds(file: &File, index: u32, fds: &[Option<RawFd>]) -> io::Result<()> {
    let data: Vec<u32> = fds.iter().map(|f| f.unwrap_or(-1) as u32).collect();
    let mut w = irq_set(
        VFIO_IRQ_SET_DATA_EVENTFD | VFIO_IRQ_SET_ACTION_TRIGGER,
        index,
        0,
        fds.len() as u32,
        &data,
    );
    ioctl_words(file, VFIO_DEVICE_SET_IRQS, &mut w)
}

/// Disables every vector of interrupt `index`.
pub(super) fn disable_irq(file: &File, index: u32) -> io::Result<()> {
    let mut w = irq_set(
        VFIO_IRQ_SET_DATA_NONE | VFIO_IRQ_SET_ACTION_TRIGGER,
        index,
        0,
        0,
        &[],
    );
    ioctl_words(file, VFIO_DEVICE_SET_IRQS, &mut w)
}

/// Fires vector `vector` of interrupt `index` from software (the kernel signals its eventfd).
pub(super) fn trigger_irq(file: &File, index: u32, vector: u32) -> io::Result<()> {
    let mut w = irq_set(
        VFIO_IRQ_SET_DATA_NONE | VFIO_IRQ_SET_ACTION_TRIGGER,
        index,
        vector,
        1,
        &[],
    );
    ioctl_words(file, VFIO_DEVICE_SET_IRQS, &mut w)
}

/// `VFIO_DEVICE_RESET`.
pub(super) fn reset(file: &File) -> io::Result<()> {
    // SAFETY: VFIO_DEVICE_RESET takes no argument and touches no memory of this process.
    let r = unsafe { libc::ioctl(file.as_raw_fd(), VFIO_DEVICE_RESET) };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// Maps `region` for DMA at `iova` in `container`.
///
/// The region's memory is only ever reached through raw pointers (that is what a
/// [`GuestRegion`] is: guest or shared memory that another party writes concurrently), which is
/// what `vfio_dma_map` requires for as long as the mapping exists; the caller keeps the region
/// alive until it unmaps it (the DMA domain holds it in its table).
pub(super) fn dma_map(
    container: &VfioContainer,
    iova: u64,
    region: &GuestRegion,
) -> Result<(), VfioError> {
    let len = usize::try_from(region.size()).unwrap_or(usize::MAX);
    // SAFETY: see above: no Rust reference into the region exists or will be created while
    // it is mapped, and the domain keeps the memory mapped until `dma_unmap`.
    unsafe { container.vfio_dma_map(iova, len, region.host()) }
}

struct BarMap {
    map: memmap2::MmapRaw,
    _keep: Arc<dyn Any + Send + Sync>,
}

/// Maps `len` bytes of the device fd at `offset` (a BAR's region offset plus an mmappable
/// area's start) as an [`Mmio`]. `keep` stays alive with the mapping (the open device).
pub(super) fn map_bar(
    file: &File,
    offset: u64,
    len: usize,
    keep: Arc<dyn Any + Send + Sync>,
) -> io::Result<Arc<Mmio>> {
    let map = memmap2::MmapOptions::new()
        .offset(offset)
        .len(len)
        .map_raw(file)?;
    let base = map.as_mut_ptr();
    let len = map.len();
    let holder = Arc::new(BarMap { map, _keep: keep });
    // SAFETY: `base .. base + len` is the shared read-write mapping `holder` owns; it stays
    // mapped as long as the `Mmio` holds `holder`, and it is device memory that nothing in
    // this process references through Rust references.
    Ok(Arc::new(unsafe { Mmio::new(base, len, holder) }))
}

impl std::fmt::Debug for BarMap {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BarMap")
            .field("base", &self.map.as_ptr())
            .field("len", &self.map.len())
            .finish()
    }
}

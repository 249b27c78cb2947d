//! The VFIO back end: a type1 container (the DMA domain), its groups, and `vfio-pci` functions.
//!
//! Built on `vfio-ioctls` (no default features: no KVM) for the container, groups, device fds,
//! region and interrupt info and the type1 DMA map/unmap; [`sys`] adds what that crate lacks
//! (interrupt vectors left unused, loopback triggers, reset errors, BAR mmaps) and holds this
//! back end's only `unsafe`.
//!
//! - **Container.** One per [`DmaDomain`]; several devices (and their groups) may join it and
//!   share its IOVA space. The kernel sets the IOMMU type (type1v2) when the first group joins,
//!   so a mapping made before any device is open is recorded and replayed then; the container
//!   keeps every mapping so it can replay them whenever its first device opens again.
//! - **Device.** Configuration space is the config region (pread/pwrite). Each BAR's mmappable
//!   areas (the whole BAR, or the sparse-mmap areas the kernel lists) are mapped from the device
//!   fd at the region offset and reached through [`Mmio`]; the rest (I/O BARs, holes such as an
//!   MSI-X table) goes through pread/pwrite. MSI-X vectors are wired to eventfds with
//!   `VFIO_DEVICE_SET_IRQS`; reset is `VFIO_DEVICE_RESET`.
//! - **Errors** say how to fix the set-up: no VFIO or IOMMU, function not bound to vfio-pci,
//!   group not viable (with the functions that hold it), group busy, RLIMIT_MEMLOCK too low.

mod sys;

use std::collections::BTreeMap;
use std::fs::File;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

use vfio_bindings::bindings::vfio::{
    VFIO_PCI_CONFIG_REGION_INDEX, VFIO_PCI_MSIX_IRQ_INDEX, VFIO_REGION_INFO_FLAG_MMAP,
};
use vfio_ioctls::{VfioContainer, VfioDevice, VfioError, VfioOps, VfioRegionInfoCap};

use super::sysfs::{self, Sysfs};
use super::{BARS, Bdf, DmaDomain, Mmio, NotifyArea, PciError, PciOps};
use crate::virtio::GuestRegion;

/// Page size for DMA and doorbell pages (x86-64 and the IOMMU's smallest page).
pub const PAGE: u64 = 4096;

/// Where VFIO's character devices live.
const DEV_VFIO: &str = "/dev/vfio";

fn vfio_err(dev: impl Into<String>, why: impl Into<String>) -> PciError {
    PciError::Vfio {
        dev: dev.into(),
        why: why.into(),
    }
}

fn errno_of(e: &VfioError) -> Option<i32> {
    match e {
        VfioError::OpenContainer(io) | VfioError::OpenGroup(io, _) => io.raw_os_error(),
        VfioError::IommuDmaMap(s)
        | VfioError::IommuDmaUnmap(s)
        | VfioError::ContainerSetIOMMU(s)
        | VfioError::GroupGetDeviceFD(s)
        | VfioError::VfioDeviceGetInfo(s)
        | VfioError::VfioDeviceGetRegionInfo(s) => Some(s.errno()),
        _ => None,
    }
}

#[derive(Debug, Default)]
struct ContainerState {
    /// Open devices (each holds its group in the container).
    devices: usize,
    /// Every mapping: iova → (region, len). Kept so they can be replayed.
    maps: BTreeMap<u64, GuestRegion>,
}

/// A VFIO container (`/dev/vfio/vfio`) with the type1v2 IOMMU: one IOVA space that every
/// device opened in it shares.
pub struct Container {
    vfio: Arc<VfioContainer>,
    state: Mutex<ContainerState>,
}

impl std::fmt::Debug for Container {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let s = self.state();
        f.debug_struct("Container")
            .field("fd", &self.vfio.as_raw_fd())
            .field("devices", &s.devices)
            .field("mappings", &s.maps.len())
            .finish()
    }
}

impl Container {
    /// Opens a container. Fails, saying what to do, when VFIO or a type1 IOMMU is missing.
    pub fn open() -> Result<Container, PciError> {
        let dev = Path::new(DEV_VFIO).join("vfio");
        if !dev.exists() {
            return Err(no_vfio(&dev));
        }
        let vfio = VfioContainer::new(None).map_err(|e| match &e {
            VfioError::OpenContainer(io) if io.kind() == std::io::ErrorKind::PermissionDenied => {
                vfio_err(
                    dev.display().to_string(),
                    format!("{io}: opening VFIO needs root (or read-write access to it)"),
                )
            }
            VfioError::VfioExtension | VfioError::VfioType1V2 => vfio_err(
                dev.display().to_string(),
                "the kernel offers no type1v2 IOMMU: load it (`modprobe vfio_iommu_type1`) and \
                 boot with the IOMMU on (intel_iommu=on, or amd_iommu=on)",
            ),
            _ => vfio_err(dev.display().to_string(), e.to_string()),
        })?;
        Ok(Container {
            vfio: Arc::new(vfio),
            state: Mutex::new(ContainerState::default()),
        })
    }

    fn state(&self) -> MutexGuard<'_, ContainerState> {
        // Every update is complete before the lock is released; a poisoned lock is consistent.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Devices open in this container.
    pub fn devices(&self) -> usize {
        self.state().devices
    }

    /// `VFIO_IOMMU_MAP_DMA` of all of `region` at `iova` (recorded only, and replayed later,
    /// while no device is open). `iova`, the host address and the length must be page-aligned.
    pub(crate) fn map_dma(&self, iova: u64, region: &GuestRegion) -> Result<(), PciError> {
        let len = region.size();
        let host = region.host() as u64;
        if !iova.is_multiple_of(PAGE) || !host.is_multiple_of(PAGE) || !len.is_multiple_of(PAGE) {
            return Err(PciError::Dma(format!(
                "VFIO maps whole pages: IOVA {iova:#x}, host address {host:#x} and length \
                 {len:#x} must all be multiples of {PAGE:#x}"
            )));
        }
        let mut s = self.state();
        if s.devices > 0 {
            self.map_now(iova, region, &s)?;
        }
        s.maps.insert(iova, region.clone());
        Ok(())
    }

    fn map_now(&self, iova: u64, region: &GuestRegion, s: &ContainerState) -> Result<(), PciError> {
        let len = region.size();
        sys::dma_map(&self.vfio, iova, region).map_err(|e| {
            let what = format!("VFIO DMA map of {len:#x} bytes at IOVA {iova:#x}");
            match errno_of(&e) {
                Some(libc::ENOMEM) => {
                    let mapped: u64 = s.maps.values().map(GuestRegion::size).sum();
                    memlock_error(&what, len, mapped)
                }
                Some(libc::EEXIST) => PciError::Dma(format!(
                    "{what}: the IOMMU already has a mapping in that range"
                )),
                Some(libc::ENOSPC) => PciError::Dma(format!(
                    "{what}: the container's mapping limit is reached \
                     (vfio_iommu_type1 dma_entry_limit)"
                )),
                _ => PciError::Dma(format!("{what}: {e}")),
            }
        })
    }

    /// `VFIO_IOMMU_UNMAP_DMA` of the mapping at `iova` (exactly `len` bytes).
    pub fn unmap_dma(&self, iova: u64, len: u64) -> Result<(), PciError> {
        let mut s = self.state();
        let size = usize::try_from(len).unwrap_or(usize::MAX);
        match self.vfio.vfio_dma_unmap(iova, size) {
            Ok(()) => {}
            // With no device open the IOMMU may be gone with its mappings: nothing to undo.
            Err(_) if s.devices == 0 => {}
            Err(e) => {
                return Err(PciError::Dma(format!(
                    "VFIO DMA unmap of {len:#x} bytes at IOVA {iova:#x}: {e}"
                )));
            }
        }
        s.maps.remove(&iova);
        Ok(())
    }

    /// Opens a device of this container (its group joins the container if it is not in yet).
    /// The first device to open replays the recorded mappings.
    fn open_device(self: &Arc<Self>, bdf: Bdf, path: &Path) -> Result<DeviceGuard, VfioError> {
        let mut s = self.state();
        let ops: Arc<dyn VfioOps> = self.vfio.clone();
        let dev = VfioDevice::new(path, ops, false)?;
        let guard = DeviceGuard {
            dev: Some(dev),
            container: Arc::clone(self),
        };
        if s.devices == 0 {
            for (&iova, r) in &s.maps {
                match sys::dma_map(&self.vfio, iova, r) {
                    Ok(()) => {}
                    // Still mapped from a device that could not leave the container (its fd
                    // is held elsewhere): the mapping is there.
                    Err(e) if errno_of(&e) == Some(libc::EEXIST) => {}
                    Err(e) => {
                        tracing::warn!(%bdf, iova = format_args!("{iova:#x}"), "replaying a DMA mapping: {e}");
                        drop(s);
                        return Err(e);
                    }
                }
            }
        }
        s.devices += 1;
        Ok(guard)
    }
}

fn no_vfio(dev: &Path) -> PciError {
    vfio_err(
        dev.display().to_string(),
        "missing: VFIO is not loaded or the IOMMU is off; run `modprobe vfio-pci` and boot with \
         intel_iommu=on (AMD: amd_iommu=on; add iommu=pt for host performance)",
    )
}

/// The error for an `ENOMEM` from a DMA map: the kernel could not pin the pages, which for a
/// non-root user is RLIMIT_MEMLOCK.
fn memlock_error(what: &str, len: u64, mapped: u64) -> PciError {
    let need = len + mapped;
    let limit = match nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_MEMLOCK) {
        Ok((cur, _)) if cur == nix::sys::resource::RLIM_INFINITY => "unlimited".to_string(),
        Ok((cur, _)) => format!("{cur} bytes ({} KiB)", cur / 1024),
        Err(e) => format!("unknown ({e})"),
    };
    PciError::Dma(format!(
        "{what}: the kernel could not pin the memory (ENOMEM). RLIMIT_MEMLOCK is {limit}; this \
         domain needs {need} bytes ({} KiB) locked ({len} for this mapping, {mapped} already \
         mapped). Raise it with `ulimit -l {}` (or `ulimit -l unlimited`; LimitMEMLOCK= for a \
         systemd service), or run as root with CAP_IPC_LOCK",
        need.div_ceil(1024),
        need.div_ceil(1024)
    ))
}

/// Keeps a device open: closed (and its group released from the container) when the last
/// handle, mapping or doorbell of the device is gone.
struct DeviceGuard {
    dev: Option<VfioDevice>,
    container: Arc<Container>,
}

impl Drop for DeviceGuard {
    fn drop(&mut self) {
        let mut s = self.container.state();
        // Closing the device under the container lock: the group leaves the container (and,
        // for the last one, the IOMMU drops every mapping) before a new map can look at
        // `devices`.
        drop(self.dev.take());
        s.devices = s.devices.saturating_sub(1);
    }
}

/// An open device: our own handle on the device fd (closed first), then the guard.
struct DevState {
    file: File,
    _guard: DeviceGuard,
}

#[derive(Debug, Clone)]
struct Area {
    start: u64,
    mmio: Arc<Mmio>,
}

#[derive(Debug, Clone, Default)]
struct Bar {
    len: u64,
    /// Offset of the region in the device fd.
    offset: u64,
    /// Mapped areas, by start.
    areas: Vec<Area>,
}

impl Bar {
    fn area(&self, offset: u64, width: u64) -> Option<(&Area, usize)> {
        self.areas.iter().find_map(|a| {
            let rel = offset.checked_sub(a.start)?;
            (rel.checked_add(width)? <= a.mmio.len() as u64).then_some((a, rel as usize))
        })
    }
}

/// A `vfio-pci` function.
pub struct VfioPci {
    name: String,
    domain: DmaDomain,
    dev: Arc<DevState>,
    notify_fd: Arc<OwnedFd>,
    config_offset: u64,
    config_size: u16,
    bars: [Bar; BARS as usize],
    msix: u16,
    /// Vectors currently enabled (0: MSI-X off).
    msix_on: Mutex<u32>,
}

impl std::fmt::Debug for VfioPci {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VfioPci")
            .field("name", &self.name)
            .field("fd", &self.dev.file.as_raw_fd())
            .field("config_size", &self.config_size)
            .field("bars", &self.bars.iter().map(|b| b.len).collect::<Vec<_>>())
            .field("msix", &self.msix)
            .finish()
    }
}

/// What the VFIO back end found about a device's BAR, for diagnostics.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BarInfo {
    /// BAR index.
    pub bar: u8,
    /// Size in bytes.
    pub len: u64,
    /// Mapped areas (start, length) within the BAR; the rest is reached by pread/pwrite.
    pub mapped: Vec<(u64, u64)>,
}

impl VfioPci {
    /// Opens `bdf` in `domain` (a VFIO domain), checking first (from sysfs) that it is bound to
    /// vfio-pci and that its IOMMU group can be used.
    pub fn open(bdf: Bdf, domain: &DmaDomain) -> Result<VfioPci, PciError> {
        VfioPci::open_with(&Sysfs::system(), Path::new(DEV_VFIO), bdf, domain)
    }

    /// [`VfioPci::open`] with another sysfs tree and `/dev/vfio` (tests).
    pub fn open_with(
        sysfs: &Sysfs,
        dev_vfio: &Path,
        bdf: Bdf,
        domain: &DmaDomain,
    ) -> Result<VfioPci, PciError> {
        let name = bdf.to_string();
        let Some(container) = domain.container() else {
            return Err(PciError::DomainKind {
                dev: name,
                dev_kind: "vfio",
                domain_kind: domain.kind(),
            });
        };
        let group = sysfs.check_vfio(bdf)?;
        let group_dev = dev_vfio.join(group.to_string());
        if !group_dev.exists() {
            return Err(vfio_err(
                &name,
                format!(
                    "{} is missing although the function is bound to vfio-pci (is udev/devtmpfs \
                     running? is the IOMMU on: intel_iommu=on?)",
                    group_dev.display()
                ),
            ));
        }
        let path: PathBuf = sysfs.device_dir(bdf);
        let guard = container
            .open_device(bdf, &path)
            .map_err(|e| open_error(sysfs, bdf, group, &group_dev, e))?;
        let Some(vdev) = guard.dev.as_ref() else {
            return Err(vfio_err(&name, "device closed while opening"));
        };
        let file = sys::dup_fd(vdev.as_raw_fd()).map_err(|source| PciError::Io {
            dev: name.clone(),
            op: "dup device fd",
            source,
        })?;
        let notify_fd = Arc::new(OwnedFd::from(file.try_clone().map_err(|source| {
            PciError::Io {
                dev: name.clone(),
                op: "dup device fd",
                source,
            }
        })?));
        let cfg = VFIO_PCI_CONFIG_REGION_INDEX;
        let config_offset = vdev.get_region_offset(cfg);
        let config_size = vdev.get_region_size(cfg).min(4096) as u16;
        if config_size < 64 {
            return Err(vfio_err(
                &name,
                format!("config region of {config_size} bytes (a PCI header has 64)"),
            ));
        }
        let msix = vdev
            .get_irq_info(VFIO_PCI_MSIX_IRQ_INDEX)
            .map_or(0, |i| i.count.min(u16::MAX as u32) as u16);
        let regions: Vec<(u64, u64, u32, Vec<VfioRegionInfoCap>)> = (0..BARS as u32)
            .map(|i| {
                (
                    vdev.get_region_size(i),
                    vdev.get_region_offset(i),
                    vdev.get_region_flags(i),
                    vdev.get_region_caps(i),
                )
            })
            .collect();
        let dev = Arc::new(DevState {
            file,
            _guard: guard,
        });
        let mut bars: [Bar; BARS as usize] = Default::default();
        for (i, (len, offset, flags, caps)) in regions.into_iter().enumerate() {
            bars[i] = Bar {
                len,
                offset,
                areas: Vec::new(),
            };
            if len == 0 || flags & VFIO_REGION_INFO_FLAG_MMAP == 0 {
                continue;
            }
            let sparse = caps.iter().find_map(|c| match c {
                VfioRegionInfoCap::SparseMmap(s) => Some(
                    s.areas
                        .iter()
                        .map(|a| (a.offset, a.size))
                        .collect::<Vec<_>>(),
                ),
                _ => None,
            });
            let areas = sparse.unwrap_or_else(|| vec![(0, len)]);
            for (start, size) in areas {
                if size == 0 || start.checked_add(size).is_none_or(|e| e > len) {
                    continue;
                }
                let keep: Arc<dyn std::any::Any + Send + Sync> = dev.clone();
                match sys::map_bar(&dev.file, offset + start, size as usize, keep) {
                    Ok(mmio) => bars[i].areas.push(Area { start, mmio }),
                    Err(e) => tracing::warn!(
                        dev = %name, bar = i, start, size,
                        "mmap of a BAR area failed, using pread/pwrite: {e}"
                    ),
                }
            }
        }
        Ok(VfioPci {
            name,
            domain: domain.clone(),
            dev,
            notify_fd,
            config_offset,
            config_size,
            bars,
            msix,
            msix_on: Mutex::new(0),
        })
    }

    /// The BARs and which parts of each are mapped.
    pub fn bar_info(&self) -> Vec<BarInfo> {
        (0..BARS)
            .filter(|&b| self.bars[b as usize].len > 0)
            .map(|b| BarInfo {
                bar: b,
                len: self.bars[b as usize].len,
                mapped: self.bars[b as usize]
                    .areas
                    .iter()
                    .map(|a| (a.start, a.mmio.len() as u64))
                    .collect(),
            })
            .collect()
    }

    fn io(&self, op: &'static str, source: std::io::Error) -> PciError {
        PciError::Io {
            dev: self.name.clone(),
            op,
            source,
        }
    }
}

/// Turns a `vfio-ioctls` open error into one that says what to do.
fn open_error(sysfs: &Sysfs, bdf: Bdf, group: u32, group_dev: &Path, e: VfioError) -> PciError {
    let dev = bdf.to_string();
    match &e {
        VfioError::OpenGroup(io, _) => match io.raw_os_error() {
            Some(libc::EBUSY) => vfio_err(
                dev,
                format!(
                    "{} is busy: IOMMU group {group} is open elsewhere (QEMU, DPDK, another \
                     vdpakit, or another DMA domain of this process: devices of one group \
                     share one domain)",
                    group_dev.display()
                ),
            ),
            Some(libc::EACCES) | Some(libc::EPERM) => vfio_err(
                dev,
                format!(
                    "{}: {io}: run as root or give this user the group device",
                    group_dev.display()
                ),
            ),
            _ => vfio_err(dev, format!("{}: {io}", group_dev.display())),
        },
        VfioError::GroupViable => {
            let others: Vec<sysfs::GroupMember> = sysfs
                .group_members(group)
                .unwrap_or_default()
                .into_iter()
                .filter(|m| m.bdf != bdf && !m.is_viable())
                .collect();
            if others.is_empty() {
                vfio_err(
                    dev,
                    format!(
                        "IOMMU group {group} is not viable (the kernel says a function in it is \
                         held by a host driver; see {})",
                        sysfs
                            .root()
                            .join(format!("kernel/iommu_groups/{group}/devices"))
                            .display()
                    ),
                )
            } else {
                sysfs::group_not_viable(bdf, group, &others)
            }
        }
        VfioError::GroupSetContainer => vfio_err(
            dev,
            format!(
                "IOMMU group {group} could not join this DMA domain's container (is it already \
                 in another container of this process?)"
            ),
        ),
        VfioError::ContainerSetIOMMU(s) => vfio_err(
            dev,
            format!(
                "setting the type1v2 IOMMU failed ({s}): load vfio_iommu_type1 and boot with \
                 intel_iommu=on"
            ),
        ),
        _ => vfio_err(dev, format!("open through /dev/vfio/{group}: {e}")),
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
        self.config_size
    }
    fn config_read(&self, offset: u16, buf: &mut [u8]) -> Result<(), PciError> {
        self.dev
            .file
            .read_exact_at(buf, self.config_offset + offset as u64)
            .map_err(|e| self.io("config read", e))
    }
    fn config_write(&self, offset: u16, buf: &[u8]) -> Result<(), PciError> {
        self.dev
            .file
            .write_all_at(buf, self.config_offset + offset as u64)
            .map_err(|e| self.io("config write", e))
    }
    fn bar_len(&self, bar: u8) -> u64 {
        self.bars.get(bar as usize).map_or(0, |b| b.len)
    }
    fn bar_mapping(&self, bar: u8) -> Option<Arc<Mmio>> {
        let b = self.bars.get(bar as usize)?;
        match b.areas.as_slice() {
            [a] if a.start == 0 && a.mmio.len() as u64 >= b.len => Some(Arc::clone(&a.mmio)),
            _ => None,
        }
    }
    fn bar_window(&self, bar: u8, offset: u64, width: usize) -> Option<(Arc<Mmio>, usize)> {
        let (a, rel) = self.bars.get(bar as usize)?.area(offset, width as u64)?;
        Some((Arc::clone(&a.mmio), rel))
    }
    fn bar_read(&self, bar: u8, offset: u64, buf: &mut [u8]) -> Result<(), PciError> {
        let Some(b) = self.bars.get(bar as usize) else {
            return Err(self.io("BAR read", std::io::ErrorKind::InvalidInput.into()));
        };
        if let Some((a, rel)) = b.area(offset, buf.len() as u64) {
            a.mmio.read(rel, buf);
            return Ok(());
        }
        self.dev
            .file
            .read_exact_at(buf, b.offset + offset)
            .map_err(|e| self.io("BAR read", e))
    }
    fn bar_write(&self, bar: u8, offset: u64, buf: &[u8]) -> Result<(), PciError> {
        let Some(b) = self.bars.get(bar as usize) else {
            return Err(self.io("BAR write", std::io::ErrorKind::InvalidInput.into()));
        };
        if let Some((a, rel)) = b.area(offset, buf.len() as u64) {
            a.mmio.write(rel, buf);
            return Ok(());
        }
        self.dev
            .file
            .write_all_at(buf, b.offset + offset)
            .map_err(|e| self.io("BAR write", e))
    }
    fn msix_vectors(&self) -> u16 {
        self.msix
    }
    fn set_msix(&self, fds: &[Option<Arc<OwnedFd>>]) -> Result<(), PciError> {
        let mut on = self.msix_on.lock().unwrap_or_else(|p| p.into_inner());
        let file = &self.dev.file;
        // The kernel sizes the vector block when MSI-X is enabled: another count needs a
        // disable first.
        if *on != 0 && (fds.is_empty() || *on != fds.len() as u32) {
            sys::disable_irq(file, VFIO_PCI_MSIX_IRQ_INDEX)
                .map_err(|e| self.io("disable MSI-X", e))?;
            *on = 0;
        }
        if fds.is_empty() {
            return Ok(());
        }
        let raw: Vec<Option<i32>> = fds
            .iter()
            .map(|f| f.as_ref().map(|f| f.as_raw_fd()))
            .collect();
        sys::set_irq_eventfds(file, VFIO_PCI_MSIX_IRQ_INDEX, &raw)
            .map_err(|e| self.io("VFIO_DEVICE_SET_IRQS (MSI-X)", e))?;
        *on = fds.len() as u32;
        Ok(())
    }
    fn msix_trigger(&self, vector: u16) -> Result<(), PciError> {
        let on = *self.msix_on.lock().unwrap_or_else(|p| p.into_inner());
        if vector as u32 >= on {
            return Err(vfio_err(
                &self.name,
                format!("MSI-X vector {vector} is not wired ({on} vectors are)"),
            ));
        }
        sys::trigger_irq(&self.dev.file, VFIO_PCI_MSIX_IRQ_INDEX, vector as u32)
            .map_err(|e| self.io("VFIO_DEVICE_SET_IRQS (trigger)", e))
    }
    fn reset(&self) -> Result<(), PciError> {
        sys::reset(&self.dev.file).map_err(|e| match e.raw_os_error() {
            Some(libc::EINVAL) | Some(libc::ENOTTY) => vfio_err(
                &self.name,
                format!(
                    "VFIO_DEVICE_RESET: {e}: the function has no reset method the kernel can \
                     use (FLR, PM or bus reset); reset it through its own registers"
                ),
            ),
            _ => self.io("VFIO_DEVICE_RESET", e),
        })
    }
    fn notify_area(&self, bar: u8, offset: u64, len: u64) -> Option<NotifyArea> {
        let b = self.bars.get(bar as usize)?;
        let page = offset & !(PAGE - 1);
        if (offset - page).saturating_add(len.max(1)) > PAGE {
            return None;
        }
        // The whole page must be in one mapped area.
        let (a, _) = b.area(page, PAGE)?;
        debug_assert!(a.start <= page);
        Some(NotifyArea {
            fd: Arc::clone(&self.notify_fd),
            offset: b.offset + page,
            size: PAGE,
        })
    }
    fn domain(&self) -> &DmaDomain {
        &self.domain
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn memlock_text_says_how_much_and_how() {
        let e = memlock_error(
            "VFIO DMA map of 0x200000 bytes at IOVA 0x0",
            2 << 20,
            1 << 20,
        )
        .to_string();
        assert!(e.contains("RLIMIT_MEMLOCK is"), "{e}");
        assert!(e.contains("3145728 bytes (3072 KiB)"), "{e}");
        assert!(e.contains("ulimit -l 3072"), "{e}");
    }

    #[test]
    fn no_vfio_text() {
        let e = no_vfio(Path::new("/dev/vfio/vfio")).to_string();
        assert!(e.contains("/dev/vfio/vfio: missing"), "{e}");
        assert!(
            e.contains("modprobe vfio-pci") && e.contains("intel_iommu=on"),
            "{e}"
        );
    }

    #[test]
    fn open_in_a_model_domain_is_refused() {
        let d = DmaDomain::model();
        let e = VfioPci::open("0000:00:03.0".parse().unwrap(), &d)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("cannot open a vfio device in a model DMA domain"),
            "{e}"
        );
    }
}

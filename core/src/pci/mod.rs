//! PCI device access with two back ends behind one interface: a real function bound to
//! `vfio-pci` ([`vfio`]) and an in-process device model ([`model`]).
//!
//! A PMD opens a [`PciDevice`] and never learns which back end it has: configuration space,
//! capabilities, BARs through checked accessors (offset and width checked against the BAR size),
//! MSI-X vectors wired to eventfds, function reset, and DMA through the [`DmaDomain`] the device
//! was opened in. Hot paths (a doorbell per burst) use a [`Doorbell`] validated once.
//!
//! Layout of this module:
//! - [`addr`]: `DDDD:BB:DD.F` addresses.
//! - [`dma`]: DMA domains (one IOMMU address space; one per VM, several devices may share it).
//! - [`mmio`]: raw BAR mappings, the only `unsafe` for device registers.
//! - [`model`]: the model back end and the [`DeviceModel`](model::DeviceModel) trait every vendor
//!   model implements.
//! - [`vfio`]: the VFIO back end (container, group, device, type1 IOMMU).
//! - [`sysfs`]: scan of PCI functions, binding to `vfio-pci`.
//! - [`ids`]: which PMD drives which function.

pub mod addr;
pub mod dma;
pub mod ids;
pub mod mmio;
pub mod model;
pub mod sysfs;
pub mod vfio;

use std::fmt;
use std::os::fd::OwnedFd;
use std::sync::Arc;

pub use addr::Bdf;
pub use dma::DmaDomain;
pub use mmio::Mmio;

/// Standard capability IDs used by the PMDs.
pub mod cap_id {
    /// Power management.
    pub const PM: u8 = 0x01;
    /// MSI.
    pub const MSI: u8 = 0x05;
    /// Vendor-specific (virtio uses these).
    pub const VENDOR: u8 = 0x09;
    /// PCI Express.
    pub const EXP: u8 = 0x10;
    /// MSI-X.
    pub const MSIX: u8 = 0x11;
}

/// Configuration space offsets.
pub mod cfg {
    /// Vendor ID (u16).
    pub const VENDOR_ID: u16 = 0x00;
    /// Device ID (u16).
    pub const DEVICE_ID: u16 = 0x02;
    /// Command (u16).
    pub const COMMAND: u16 = 0x04;
    /// Status (u16); bit 4 = capability list present.
    pub const STATUS: u16 = 0x06;
    /// Revision ID (u8).
    pub const REVISION: u16 = 0x08;
    /// Class code (3 bytes at 0x09: prog-if, subclass, class).
    pub const CLASS: u16 = 0x09;
    /// Header type (u8).
    pub const HEADER_TYPE: u16 = 0x0e;
    /// BAR0 (u32); BARn at 0x10 + 4n.
    pub const BAR0: u16 = 0x10;
    /// Subsystem vendor ID (u16).
    pub const SUBSYS_VENDOR: u16 = 0x2c;
    /// Subsystem ID (u16).
    pub const SUBSYS_ID: u16 = 0x2e;
    /// Capabilities pointer (u8).
    pub const CAP_PTR: u16 = 0x34;
    /// Status bit: capability list present.
    pub const STATUS_CAP_LIST: u16 = 1 << 4;
    /// Command bit: memory space enable.
    pub const CMD_MEMORY: u16 = 1 << 1;
    /// Command bit: bus master enable.
    pub const CMD_BUS_MASTER: u16 = 1 << 2;
    /// Size of the conventional configuration space.
    pub const SIZE: u16 = 256;
}

/// Number of BARs of a type-0 header.
pub const BARS: u8 = 6;

/// Everything the PCI layer reports.
#[derive(Debug, thiserror::Error)]
pub enum PciError {
    /// Not a `DDDD:BB:DD.F` (or `BB:DD.F`) address.
    #[error(
        "invalid PCI address '{0}': accepted is DDDD:BB:DD.F or BB:DD.F (hex), e.g. 0000:03:00.1"
    )]
    BadAddress(String),
    /// A BAR index above 5 or a BAR the device does not have.
    #[error("{dev}: BAR {bar} does not exist (the device has BARs {present})")]
    NoBar {
        /// Device.
        dev: String,
        /// BAR asked for.
        bar: u8,
        /// The BARs that exist, as text.
        present: String,
    },
    /// An access outside a BAR or with a width that is not 1, 2, 4 or 8.
    #[error(
        "{dev}: {width}-byte access at offset {offset:#x} of BAR {bar} is outside the BAR ({len:#x} bytes) or not naturally aligned"
    )]
    BarRange {
        /// Device.
        dev: String,
        /// BAR.
        bar: u8,
        /// Offset of the access.
        offset: u64,
        /// Width in bytes.
        width: usize,
        /// BAR size.
        len: u64,
    },
    /// A configuration space access outside the space.
    #[error(
        "{dev}: config space access of {width} bytes at {offset:#x} is outside the {size}-byte space"
    )]
    ConfigRange {
        /// Device.
        dev: String,
        /// Offset.
        offset: u16,
        /// Width.
        width: usize,
        /// Space size.
        size: u16,
    },
    /// A malformed capability list (loop or pointer out of range).
    #[error("{dev}: malformed capability list: {why}")]
    BadCapList {
        /// Device.
        dev: String,
        /// What was wrong.
        why: String,
    },
    /// More MSI-X vectors than the device has.
    #[error("{dev}: {asked} MSI-X vectors asked for, the device has {have}")]
    MsixVectors {
        /// Device.
        dev: String,
        /// Asked for.
        asked: usize,
        /// Available.
        have: u16,
    },
    /// DMA map/unmap errors.
    #[error("DMA domain: {0}")]
    Dma(String),
    /// A device and a domain of different kinds (a model in a VFIO container or the reverse).
    #[error("{dev}: cannot open a {dev_kind} device in a {domain_kind} DMA domain")]
    DomainKind {
        /// Device.
        dev: String,
        /// Back end of the device.
        dev_kind: &'static str,
        /// Kind of the domain.
        domain_kind: &'static str,
    },
    /// VFIO set-up errors with the remedy in the text.
    #[error("{dev}: {why}")]
    Vfio {
        /// Device.
        dev: String,
        /// What failed and how to fix it.
        why: String,
    },
    /// sysfs errors.
    #[error("{path}: {why}")]
    Sysfs {
        /// The sysfs path.
        path: String,
        /// What failed.
        why: String,
    },
    /// An unknown device model name.
    #[error("unknown device model '{name}': available are {available}")]
    UnknownModel {
        /// What was asked for.
        name: String,
        /// The models this build has.
        available: String,
    },
    /// A back end I/O error.
    #[error("{dev}: {op}: {source}")]
    Io {
        /// Device.
        dev: String,
        /// Operation.
        op: &'static str,
        /// OS error.
        #[source]
        source: std::io::Error,
    },
}

/// Where a doorbell can be mapped by another process (vhost-user host notifier): the file, the
/// offset to pass to `mmap` and the size of the area.
#[derive(Debug, Clone)]
pub struct NotifyArea {
    /// The file to map (a VFIO device fd, or a model's memfd page).
    pub fd: Arc<OwnedFd>,
    /// Offset in `fd` of the page holding the doorbell.
    pub offset: u64,
    /// Bytes to map (a page).
    pub size: u64,
}

/// One PCI back end: what [`PciDevice`] needs from VFIO or from a model. Offsets and widths are
/// already checked by [`PciDevice`]; back ends may trust them.
pub trait PciOps: Send + Sync + fmt::Debug {
    /// Name for messages (the BDF, or `model:NAME`).
    fn name(&self) -> &str;
    /// `"vfio"` or `"model"`.
    fn kind(&self) -> &'static str;
    /// Size of the configuration space the back end exposes (256 or 4096).
    fn config_size(&self) -> u16;
    /// Reads configuration space.
    fn config_read(&self, offset: u16, buf: &mut [u8]) -> Result<(), PciError>;
    /// Writes configuration space.
    fn config_write(&self, offset: u16, buf: &[u8]) -> Result<(), PciError>;
    /// Size of BAR `bar` (0: absent).
    fn bar_len(&self, bar: u8) -> u64;
    /// A raw mapping of the BAR, when the back end has one (VFIO: mmappable region).
    fn bar_mapping(&self, bar: u8) -> Option<Arc<Mmio>>;
    /// A raw mapping covering `[offset, offset + width)` of BAR `bar` and the offset of that
    /// range inside it, for a BAR that is only partly mapped (VFIO sparse-mmap areas).
    /// [`PciDevice::doorbell`] uses it when [`PciOps::bar_mapping`] has nothing.
    fn bar_window(&self, _bar: u8, _offset: u64, _width: usize) -> Option<(Arc<Mmio>, usize)> {
        None
    }
    /// Reads `buf.len()` (1, 2, 4 or 8) bytes at `offset` of BAR `bar` (the slow path).
    fn bar_read(&self, bar: u8, offset: u64, buf: &mut [u8]) -> Result<(), PciError>;
    /// Writes `buf.len()` (1, 2, 4 or 8) bytes at `offset` of BAR `bar` (the slow path).
    fn bar_write(&self, bar: u8, offset: u64, buf: &[u8]) -> Result<(), PciError>;
    /// MSI-X vectors the function has.
    fn msix_vectors(&self) -> u16;
    /// Wires MSI-X vector `i` to `fds[i]` (`None`: that vector unused); an empty slice disables
    /// MSI-X.
    fn set_msix(&self, fds: &[Option<Arc<OwnedFd>>]) -> Result<(), PciError>;
    /// Raises MSI-X vector `vector` from software, as if the device had (a loopback test of the
    /// wiring: VFIO's `ACTION_TRIGGER`, a model's interrupt line).
    fn msix_trigger(&self, vector: u16) -> Result<(), PciError> {
        Err(PciError::Vfio {
            dev: self.name().to_string(),
            why: format!(
                "the {} back end cannot raise MSI-X vector {vector} from software",
                self.kind()
            ),
        })
    }
    /// Function-level reset.
    fn reset(&self) -> Result<(), PciError>;
    /// A mappable area covering `[offset, offset + len)` of BAR `bar`, when the back end can give
    /// one to another process.
    fn notify_area(&self, bar: u8, offset: u64, len: u64) -> Option<NotifyArea>;
    /// The DMA domain the device was opened in.
    fn domain(&self) -> &DmaDomain;
}

/// A capability found by [`PciDevice::capabilities`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Capability {
    /// Capability ID ([`cap_id`]).
    pub id: u8,
    /// Offset in configuration space.
    pub offset: u16,
    /// Length byte at offset + 2 (vendor-specific capabilities carry one; 0 for others).
    pub len: u8,
}

/// An open PCI function: the interface every PMD programs against.
#[derive(Debug, Clone)]
pub struct PciDevice {
    ops: Arc<dyn PciOps>,
    bars: [u64; BARS as usize],
    maps: [Option<Arc<Mmio>>; BARS as usize],
}

impl PciDevice {
    /// Wraps a back end. Usually reached through [`PciDevice::open_vfio`] or
    /// [`model::open`].
    pub fn from_ops(ops: Arc<dyn PciOps>) -> PciDevice {
        let bars = std::array::from_fn(|i| ops.bar_len(i as u8));
        let maps = std::array::from_fn(|i| ops.bar_mapping(i as u8));
        PciDevice { ops, bars, maps }
    }

    /// Opens `bdf` (bound to `vfio-pci`) in `domain`, which must be a VFIO domain.
    pub fn open_vfio(bdf: Bdf, domain: &DmaDomain) -> Result<PciDevice, PciError> {
        let ops = vfio::VfioPci::open(bdf, domain)?;
        Ok(PciDevice::from_ops(Arc::new(ops)))
    }

    /// Name for messages.
    pub fn name(&self) -> &str {
        self.ops.name()
    }

    /// `"vfio"` or `"model"`.
    pub fn kind(&self) -> &'static str {
        self.ops.kind()
    }

    /// The DMA domain.
    pub fn domain(&self) -> &DmaDomain {
        self.ops.domain()
    }

    /// The back end (for PMD code that needs something not wrapped here).
    pub fn ops(&self) -> &Arc<dyn PciOps> {
        &self.ops
    }

    /// Size of BAR `bar` (0: absent or out of range).
    pub fn bar_len(&self, bar: u8) -> u64 {
        self.bars.get(bar as usize).copied().unwrap_or(0)
    }

    fn check_bar(&self, bar: u8, offset: u64, width: usize) -> Result<(), PciError> {
        let len = self.bar_len(bar);
        if len == 0 {
            let present: Vec<String> = (0..BARS)
                .filter(|&b| self.bar_len(b) != 0)
                .map(|b| b.to_string())
                .collect();
            return Err(PciError::NoBar {
                dev: self.name().to_string(),
                bar,
                present: if present.is_empty() {
                    "none".into()
                } else {
                    present.join(", ")
                },
            });
        }
        let ok = matches!(width, 1 | 2 | 4 | 8)
            && offset.is_multiple_of(width as u64)
            && offset
                .checked_add(width as u64)
                .is_some_and(|end| end <= len);
        if ok {
            Ok(())
        } else {
            Err(PciError::BarRange {
                dev: self.name().to_string(),
                bar,
                offset,
                width,
                len,
            })
        }
    }

    fn bar_read_n<const N: usize>(&self, bar: u8, offset: u64) -> Result<[u8; N], PciError> {
        self.check_bar(bar, offset, N)?;
        let mut b = [0u8; N];
        match &self.maps[bar as usize] {
            Some(m) => m.read(offset as usize, &mut b),
            None => self.ops.bar_read(bar, offset, &mut b)?,
        }
        Ok(b)
    }

    fn bar_write_n(&self, bar: u8, offset: u64, b: &[u8]) -> Result<(), PciError> {
        self.check_bar(bar, offset, b.len())?;
        match &self.maps[bar as usize] {
            Some(m) => {
                m.write(offset as usize, b);
                Ok(())
            }
            None => self.ops.bar_write(bar, offset, b),
        }
    }

    /// Reads a byte of BAR `bar`.
    pub fn read8(&self, bar: u8, offset: u64) -> Result<u8, PciError> {
        Ok(self.bar_read_n::<1>(bar, offset)?[0])
    }
    /// Reads a little-endian u16 of BAR `bar`.
    pub fn read16(&self, bar: u8, offset: u64) -> Result<u16, PciError> {
        Ok(u16::from_le_bytes(self.bar_read_n(bar, offset)?))
    }
    /// Reads a little-endian u32 of BAR `bar`.
    pub fn read32(&self, bar: u8, offset: u64) -> Result<u32, PciError> {
        Ok(u32::from_le_bytes(self.bar_read_n(bar, offset)?))
    }
    /// Reads a little-endian u64 of BAR `bar`.
    pub fn read64(&self, bar: u8, offset: u64) -> Result<u64, PciError> {
        Ok(u64::from_le_bytes(self.bar_read_n(bar, offset)?))
    }
    /// Writes a byte of BAR `bar`.
    pub fn write8(&self, bar: u8, offset: u64, v: u8) -> Result<(), PciError> {
        self.bar_write_n(bar, offset, &[v])
    }
    /// Writes a little-endian u16 of BAR `bar`.
    pub fn write16(&self, bar: u8, offset: u64, v: u16) -> Result<(), PciError> {
        self.bar_write_n(bar, offset, &v.to_le_bytes())
    }
    /// Writes a little-endian u32 of BAR `bar`.
    pub fn write32(&self, bar: u8, offset: u64, v: u32) -> Result<(), PciError> {
        self.bar_write_n(bar, offset, &v.to_le_bytes())
    }
    /// Writes a little-endian u64 of BAR `bar` (one 8-byte access).
    pub fn write64(&self, bar: u8, offset: u64, v: u64) -> Result<(), PciError> {
        self.bar_write_n(bar, offset, &v.to_le_bytes())
    }

    fn check_cfg(&self, offset: u16, width: usize) -> Result<(), PciError> {
        let size = self.ops.config_size();
        if (offset as usize)
            .checked_add(width)
            .is_some_and(|e| e <= size as usize)
        {
            Ok(())
        } else {
            Err(PciError::ConfigRange {
                dev: self.name().to_string(),
                offset,
                width,
                size,
            })
        }
    }

    /// Reads `buf.len()` bytes of configuration space at `offset`.
    pub fn config_read(&self, offset: u16, buf: &mut [u8]) -> Result<(), PciError> {
        self.check_cfg(offset, buf.len())?;
        self.ops.config_read(offset, buf)
    }

    /// Writes configuration space.
    pub fn config_write(&self, offset: u16, buf: &[u8]) -> Result<(), PciError> {
        self.check_cfg(offset, buf.len())?;
        self.ops.config_write(offset, buf)
    }

    /// Reads a config byte.
    pub fn config_read8(&self, offset: u16) -> Result<u8, PciError> {
        let mut b = [0u8; 1];
        self.config_read(offset, &mut b)?;
        Ok(b[0])
    }
    /// Reads a config u16.
    pub fn config_read16(&self, offset: u16) -> Result<u16, PciError> {
        let mut b = [0u8; 2];
        self.config_read(offset, &mut b)?;
        Ok(u16::from_le_bytes(b))
    }
    /// Reads a config u32.
    pub fn config_read32(&self, offset: u16) -> Result<u32, PciError> {
        let mut b = [0u8; 4];
        self.config_read(offset, &mut b)?;
        Ok(u32::from_le_bytes(b))
    }
    /// Writes a config u16.
    pub fn config_write16(&self, offset: u16, v: u16) -> Result<(), PciError> {
        self.config_write(offset, &v.to_le_bytes())
    }

    /// Vendor and device ID.
    pub fn ids(&self) -> Result<(u16, u16), PciError> {
        Ok((
            self.config_read16(cfg::VENDOR_ID)?,
            self.config_read16(cfg::DEVICE_ID)?,
        ))
    }

    /// Walks the standard capability list (bounded: at most 48 entries, each pointer inside the
    /// conventional space and at least 0x40, no loops).
    pub fn capabilities(&self) -> Result<Vec<Capability>, PciError> {
        let mut out = Vec::new();
        if self.config_read16(cfg::STATUS)? & cfg::STATUS_CAP_LIST == 0 {
            return Ok(out);
        }
        let bad = |why: String| PciError::BadCapList {
            dev: self.name().to_string(),
            why,
        };
        let mut ptr = self.config_read8(cfg::CAP_PTR)? & !3;
        let mut seen = [false; 256];
        while ptr != 0 {
            if ptr < 0x40 {
                return Err(bad(format!("pointer {ptr:#x} into the header")));
            }
            if seen[ptr as usize] {
                return Err(bad(format!("loop at {ptr:#x}")));
            }
            seen[ptr as usize] = true;
            if out.len() >= 48 {
                return Err(bad("more than 48 capabilities".into()));
            }
            let id = self.config_read8(ptr as u16)?;
            let next = self.config_read8(ptr as u16 + 1)? & !3;
            let len = if ptr as u16 + 2 < cfg::SIZE {
                self.config_read8(ptr as u16 + 2)?
            } else {
                0
            };
            out.push(Capability {
                id,
                offset: ptr as u16,
                len: if id == cap_id::VENDOR { len } else { 0 },
            });
            ptr = next;
        }
        Ok(out)
    }

    /// MSI-X vectors the function has.
    pub fn msix_vectors(&self) -> u16 {
        self.ops.msix_vectors()
    }

    /// Wires MSI-X vector `i` to eventfd `fds[i]`; empty disables MSI-X.
    pub fn set_msix(&self, fds: &[Option<Arc<OwnedFd>>]) -> Result<(), PciError> {
        let have = self.msix_vectors();
        if fds.len() > have as usize {
            return Err(PciError::MsixVectors {
                dev: self.name().to_string(),
                asked: fds.len(),
                have,
            });
        }
        self.ops.set_msix(fds)
    }

    /// Raises MSI-X vector `vector` from software (tests and diagnostics: checks that the
    /// vector reaches the eventfd wired to it).
    pub fn msix_trigger(&self, vector: u16) -> Result<(), PciError> {
        let have = self.msix_vectors();
        if vector >= have {
            return Err(PciError::MsixVectors {
                dev: self.name().to_string(),
                asked: vector as usize + 1,
                have,
            });
        }
        self.ops.msix_trigger(vector)
    }

    /// Function-level reset.
    pub fn reset(&self) -> Result<(), PciError> {
        self.ops.reset()
    }

    /// Enables memory decoding and bus mastering (DMA).
    pub fn enable_bus_master(&self) -> Result<(), PciError> {
        let c = self.config_read16(cfg::COMMAND)?;
        self.config_write16(cfg::COMMAND, c | cfg::CMD_MEMORY | cfg::CMD_BUS_MASTER)
    }

    /// A doorbell of `width` (2 or 4) bytes at `offset` of BAR `bar`, checked once here so the
    /// hot path does no checks.
    pub fn doorbell(&self, bar: u8, offset: u64, width: usize) -> Result<Doorbell, PciError> {
        if width != 2 && width != 4 {
            return Err(PciError::BarRange {
                dev: self.name().to_string(),
                bar,
                offset,
                width,
                len: self.bar_len(bar),
            });
        }
        self.check_bar(bar, offset, width)?;
        let (target, offset) = match &self.maps[bar as usize] {
            Some(m) => (DoorbellTarget::Mmio(Arc::clone(m)), offset),
            None => match self.ops.bar_window(bar, offset, width) {
                Some((m, rel)) => (DoorbellTarget::Mmio(m), rel as u64),
                None => (DoorbellTarget::Ops(Arc::clone(&self.ops)), offset),
            },
        };
        Ok(Doorbell {
            target,
            bar,
            offset,
            width,
        })
    }

    /// A mappable area for the doorbell at `offset` of BAR `bar` (host notifier), if the back
    /// end can hand one to another process.
    pub fn notify_area(&self, bar: u8, offset: u64, len: u64) -> Option<NotifyArea> {
        self.check_bar(bar, offset, 2).ok()?;
        self.ops.notify_area(bar, offset, len)
    }
}

#[derive(Debug, Clone)]
enum DoorbellTarget {
    Mmio(Arc<Mmio>),
    Ops(Arc<dyn PciOps>),
}

/// A validated doorbell register: [`Doorbell::ring`] is one register write.
#[derive(Debug, Clone)]
pub struct Doorbell {
    target: DoorbellTarget,
    bar: u8,
    offset: u64,
    width: usize,
}

impl Doorbell {
    /// Writes `value` (truncated to the doorbell's width).
    #[inline]
    pub fn ring(&self, value: u32) {
        let bytes = value.to_le_bytes();
        let b = &bytes[..self.width];
        match &self.target {
            DoorbellTarget::Mmio(m) => m.write(self.offset as usize, b),
            DoorbellTarget::Ops(o) => {
                // Checked at creation; a model back end cannot fail a checked write.
                let _ = o.bar_write(self.bar, self.offset, b);
            }
        }
    }
}

//! The virtio-PCI transport, driver side, shared by every PMD whose hardware speaks the
//! virtio-PCI register layout (Intel IFC, a generic virtio-net function as Linux's `vp_vdpa`,
//! Alibaba ENI's legacy interface, Marvell Octeon's emulated structures).
//!
//! Modern (virtio 1.x): the vendor capabilities (COMMON, NOTIFY with its multiplier, ISR, DEVICE)
//! are found by walking the PCI capability list, each checked to lie inside its BAR; registers are
//! reached only through [`PciDevice`]'s checked accessors. Legacy (0.9.5): the BAR0 register block
//! with the device config moving from 0x14 to 0x18 when MSI-X is on.
//!
//! The register offsets here are the driver's own copy of the virtio spec's layout; device models
//! keep theirs separately (see `docs/WRITING_A_PMD.md`).

use std::time::{Duration, Instant};

use crate::pci::{Capability, Doorbell, NotifyArea, PciDevice, PciError, cap_id};

/// Vendor capability `cfg_type` values.
pub mod cfg_type {
    /// Common configuration.
    pub const COMMON: u8 = 1;
    /// Notifications.
    pub const NOTIFY: u8 = 2;
    /// ISR status.
    pub const ISR: u8 = 3;
    /// Device-specific configuration.
    pub const DEVICE: u8 = 4;
    /// PCI configuration access.
    pub const PCI: u8 = 5;
}

/// Common configuration offsets (driver's copy).
mod common {
    pub const DFSELECT: u64 = 0x00;
    pub const DF: u64 = 0x04;
    pub const GFSELECT: u64 = 0x08;
    pub const GF: u64 = 0x0c;
    pub const MSIX_CONFIG: u64 = 0x10;
    pub const NUM_QUEUES: u64 = 0x12;
    pub const STATUS: u64 = 0x14;
    pub const GENERATION: u64 = 0x15;
    pub const Q_SELECT: u64 = 0x16;
    pub const Q_SIZE: u64 = 0x18;
    pub const Q_MSIX: u64 = 0x1a;
    pub const Q_ENABLE: u64 = 0x1c;
    pub const Q_NOFF: u64 = 0x1e;
    pub const Q_DESC: u64 = 0x20;
    pub const Q_DRIVER: u64 = 0x28;
    pub const Q_DEVICE: u64 = 0x30;
    /// Smallest common config a device may have.
    pub const LEN: u64 = 0x38;
}

/// Device status bits.
pub mod status {
    /// The guest OS noticed the device.
    pub const ACKNOWLEDGE: u8 = 0x01;
    /// The driver knows how to drive it.
    pub const DRIVER: u8 = 0x02;
    /// The driver is ready.
    pub const DRIVER_OK: u8 = 0x04;
    /// Feature negotiation is complete.
    pub const FEATURES_OK: u8 = 0x08;
    /// The device needs a reset.
    pub const NEEDS_RESET: u8 = 0x40;
    /// The driver gave up.
    pub const FAILED: u8 = 0x80;
}

/// "No vector" for MSI-X vector registers.
pub const NO_VECTOR: u16 = 0xffff;

/// Errors of the virtio-PCI transport.
#[derive(Debug, thiserror::Error)]
pub enum VirtioPciError {
    /// A mandatory capability is missing or malformed.
    #[error("{dev}: {what}")]
    Capability {
        /// Device.
        dev: String,
        /// What is wrong.
        what: String,
    },
    /// The device did not do something within the time allowed.
    #[error("{dev}: {what} did not happen within {ms} ms")]
    Timeout {
        /// Device.
        dev: String,
        /// What was awaited.
        what: &'static str,
        /// The limit.
        ms: u64,
    },
    /// The device refused the features (FEATURES_OK did not stick), or lacks a required one.
    #[error("{dev}: {what}")]
    Features {
        /// Device.
        dev: String,
        /// Details with the bit values.
        what: String,
    },
    /// A queue index, size or vector the device rejects.
    #[error("{dev}: {what}")]
    Queue {
        /// Device.
        dev: String,
        /// Details.
        what: String,
    },
    /// A register kept a value it should have left (a reset that never completes).
    #[error("{dev}: {register} still reads {value:#x} after {ms} ms ({what})")]
    Stuck {
        /// Device.
        dev: String,
        /// The register, with its location.
        register: &'static str,
        /// The last value read.
        value: u64,
        /// How long the driver waited.
        ms: u64,
        /// What was awaited.
        what: &'static str,
    },
    /// Register access failed.
    #[error(transparent)]
    Pci(#[from] PciError),
}

type Result<T> = std::result::Result<T, VirtioPciError>;

/// Where a structure lives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Region {
    /// BAR.
    pub bar: u8,
    /// Offset in the BAR.
    pub offset: u64,
    /// Length.
    pub len: u64,
}

/// A modern virtio-PCI function.
#[derive(Debug, Clone)]
pub struct ModernTransport {
    dev: PciDevice,
    common: Region,
    notify: Region,
    notify_mult: u32,
    isr: Region,
    device: Option<Region>,
}

/// How long a reset may take before it is an error.
pub const RESET_TIMEOUT: Duration = Duration::from_millis(1000);

impl ModernTransport {
    /// Finds the virtio structures of `dev`. COMMON, NOTIFY and ISR are mandatory, DEVICE is
    /// optional (`device_config` then returns an error); each must lie inside its BAR.
    pub fn probe(dev: PciDevice) -> Result<ModernTransport> {
        let name = dev.name().to_string();
        let caps: Vec<Capability> = dev
            .capabilities()?
            .into_iter()
            .filter(|c| c.id == cap_id::VENDOR)
            .collect();
        let mut found: [Option<(Region, u16)>; 6] = [None; 6];
        for c in &caps {
            if c.len < 16 {
                continue;
            }
            let ty = dev.config_read8(c.offset + 3)?;
            let bar = dev.config_read8(c.offset + 4)?;
            let offset = u64::from(dev.config_read32(c.offset + 8)?);
            let len = u64::from(dev.config_read32(c.offset + 12)?);
            if !(1..=4).contains(&ty) || found[ty as usize].is_some() {
                continue;
            }
            let blen = dev.bar_len(bar);
            if bar >= 6 || blen == 0 || offset.checked_add(len).is_none_or(|e| e > blen) {
                return Err(VirtioPciError::Capability {
                    dev: name,
                    what: format!(
                        "virtio capability type {ty} at config {:#x} points at BAR {bar} offset {offset:#x} length {len:#x}, outside the BAR ({blen:#x} bytes)",
                        c.offset
                    ),
                });
            }
            found[ty as usize] = Some((Region { bar, offset, len }, c.offset));
        }
        let need = |ty: u8, what: &str| {
            found[ty as usize].ok_or_else(|| VirtioPciError::Capability {
                dev: name.clone(),
                what: format!("no virtio {what} capability (is this a modern virtio function?)"),
            })
        };
        let (common, _) = need(cfg_type::COMMON, "common configuration")?;
        let (notify, notify_cap) = need(cfg_type::NOTIFY, "notification")?;
        let (isr, _) = need(cfg_type::ISR, "ISR")?;
        if common.len < common::LEN {
            return Err(VirtioPciError::Capability {
                dev: name,
                what: format!(
                    "common configuration of {:#x} bytes (at least {:#x} needed)",
                    common.len,
                    common::LEN
                ),
            });
        }
        let notify_mult = dev.config_read32(notify_cap + 16)?;
        Ok(ModernTransport {
            device: found[cfg_type::DEVICE as usize].map(|(r, _)| r),
            dev,
            common,
            notify,
            notify_mult,
            isr,
        })
    }

    /// The PCI function.
    pub fn pci(&self) -> &PciDevice {
        &self.dev
    }

    /// The notify multiplier (bytes between queues' doorbells per `queue_notify_off` unit).
    pub fn notify_multiplier(&self) -> u32 {
        self.notify_mult
    }

    /// Structure locations: common, notify, isr, device.
    pub fn regions(&self) -> (Region, Region, Region, Option<Region>) {
        (self.common, self.notify, self.isr, self.device)
    }

    fn c8(&self, off: u64) -> Result<u8> {
        Ok(self.dev.read8(self.common.bar, self.common.offset + off)?)
    }
    fn c16(&self, off: u64) -> Result<u16> {
        Ok(self.dev.read16(self.common.bar, self.common.offset + off)?)
    }
    fn c32(&self, off: u64) -> Result<u32> {
        Ok(self.dev.read32(self.common.bar, self.common.offset + off)?)
    }
    fn w8(&self, off: u64, v: u8) -> Result<()> {
        Ok(self
            .dev
            .write8(self.common.bar, self.common.offset + off, v)?)
    }
    fn w16(&self, off: u64, v: u16) -> Result<()> {
        Ok(self
            .dev
            .write16(self.common.bar, self.common.offset + off, v)?)
    }
    fn w32(&self, off: u64, v: u32) -> Result<()> {
        Ok(self
            .dev
            .write32(self.common.bar, self.common.offset + off, v)?)
    }
    /// 64-bit field as two 32-bit writes, low first.
    fn w64(&self, off: u64, v: u64) -> Result<()> {
        self.w32(off, v as u32)?;
        self.w32(off + 4, (v >> 32) as u32)
    }

    /// Device status.
    pub fn status(&self) -> Result<u8> {
        self.c8(common::STATUS)
    }

    /// Writes the device status.
    pub fn set_status(&self, s: u8) -> Result<()> {
        self.w8(common::STATUS, s)
    }

    /// ORs bits into the device status.
    pub fn add_status(&self, s: u8) -> Result<()> {
        let cur = self.status()?;
        self.set_status(cur | s)
    }

    /// Resets the device: writes 0 and waits (bounded by [`RESET_TIMEOUT`]) until status reads 0.
    pub fn reset(&self) -> Result<()> {
        self.reset_within(RESET_TIMEOUT)
    }

    /// [`ModernTransport::reset`] with another limit.
    pub fn reset_within(&self, limit: Duration) -> Result<()> {
        self.set_status(0)?;
        let end = Instant::now() + limit;
        loop {
            let s = self.status()?;
            if s == 0 {
                return Ok(());
            }
            if Instant::now() > end {
                return Err(VirtioPciError::Stuck {
                    dev: self.dev.name().to_string(),
                    register: "device_status (common configuration +0x14)",
                    value: u64::from(s),
                    ms: limit.as_millis() as u64,
                    what: "a reset writes 0 and waits for the device to read back 0",
                });
            }
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    /// The device's feature bits 0..63 (selects 0 and 1).
    pub fn device_features(&self) -> Result<u64> {
        self.w32(common::DFSELECT, 0)?;
        let lo = self.c32(common::DF)?;
        self.w32(common::DFSELECT, 1)?;
        let hi = self.c32(common::DF)?;
        Ok(u64::from(lo) | (u64::from(hi) << 32))
    }

    /// Writes the driver's feature bits (selects 0..3; 2 and 3 are written as 0).
    pub fn set_driver_features(&self, f: u64) -> Result<()> {
        for (sel, v) in [(0u32, f as u32), (1, (f >> 32) as u32), (2, 0), (3, 0)] {
            self.w32(common::GFSELECT, sel)?;
            self.w32(common::GF, v)?;
        }
        Ok(())
    }

    /// Starts the handshake: reset, ACKNOWLEDGE | DRIVER, features = device's AND `wanted`,
    /// FEATURES_OK, checks it stuck. `required` bits missing from the device are an error naming
    /// them. Returns the negotiated features.
    pub fn negotiate(&self, wanted: u64, required: u64) -> Result<u64> {
        self.reset()?;
        self.set_status(status::ACKNOWLEDGE)?;
        self.add_status(status::DRIVER)?;
        let dev_f = self.device_features()?;
        if dev_f & required != required {
            self.add_status(status::FAILED)?;
            return Err(VirtioPciError::Features {
                dev: self.dev.name().to_string(),
                what: format!(
                    "device_feature (common configuration +0x04, selects 0 and 1) reads {dev_f:#x}: required bits {:#x} are missing",
                    required & !dev_f
                ),
            });
        }
        let f = dev_f & wanted;
        self.set_driver_features(f)?;
        self.add_status(status::FEATURES_OK)?;
        if self.status()? & status::FEATURES_OK == 0 {
            self.add_status(status::FAILED)?;
            return Err(VirtioPciError::Features {
                dev: self.dev.name().to_string(),
                what: format!(
                    "device_status (common configuration +0x14) lacks FEATURES_OK after the driver wrote features {f:#x}: the device refused them"
                ),
            });
        }
        Ok(f)
    }

    /// Number of queues the device has.
    pub fn num_queues(&self) -> Result<u16> {
        self.c16(common::NUM_QUEUES)
    }

    fn select(&self, q: u16) -> Result<()> {
        let n = self.num_queues()?;
        if q >= n {
            return Err(VirtioPciError::Queue {
                dev: self.dev.name().to_string(),
                what: format!("queue {q} does not exist (the device has {n})"),
            });
        }
        self.w16(common::Q_SELECT, q)
    }

    /// Largest size of queue `q` (0: unavailable).
    pub fn queue_max_size(&self, q: u16) -> Result<u16> {
        self.select(q)?;
        self.c16(common::Q_SIZE)
    }

    /// Programs queue `q`: size, ring areas, MSI-X vector (checked by read-back), not enabled yet.
    pub fn setup_queue(
        &self,
        q: u16,
        size: u16,
        desc: u64,
        driver: u64,
        device: u64,
        vector: u16,
    ) -> Result<()> {
        let max = self.queue_max_size(q)?;
        if size == 0 || size > max {
            return Err(VirtioPciError::Queue {
                dev: self.dev.name().to_string(),
                what: format!("queue {q}: size {size} (the device accepts 1..={max})"),
            });
        }
        self.w16(common::Q_SIZE, size)?;
        self.w64(common::Q_DESC, desc)?;
        self.w64(common::Q_DRIVER, driver)?;
        self.w64(common::Q_DEVICE, device)?;
        // Read every field back: a device that dropped a write (or a register that is not where
        // this driver thinks) fails here, naming it, instead of DMAing to a wrong address.
        let size_back = self.c16(common::Q_SIZE)?;
        if size_back != size {
            return Err(self.readback(
                q,
                "queue_size (common configuration +0x18)",
                size_back.into(),
                size.into(),
            ));
        }
        for (reg, off, v) in [
            (
                "queue_desc (common configuration +0x20)",
                common::Q_DESC,
                desc,
            ),
            (
                "queue_driver (common configuration +0x28)",
                common::Q_DRIVER,
                driver,
            ),
            (
                "queue_device (common configuration +0x30)",
                common::Q_DEVICE,
                device,
            ),
        ] {
            let back = u64::from(self.c32(off)?) | (u64::from(self.c32(off + 4)?) << 32);
            if back != v {
                return Err(self.readback(q, reg, back, v));
            }
        }
        self.set_queue_vector(q, vector)
    }

    fn readback(&self, q: u16, reg: &str, back: u64, wrote: u64) -> VirtioPciError {
        VirtioPciError::Queue {
            dev: self.dev.name().to_string(),
            what: format!("queue {q}: {reg} reads back {back:#x} after writing {wrote:#x}"),
        }
    }

    /// Queue `q`'s MSI-X vector register.
    pub fn queue_vector(&self, q: u16) -> Result<u16> {
        self.select(q)?;
        self.c16(common::Q_MSIX)
    }

    /// Sets queue `q`'s MSI-X vector, checked by read-back (0xffff back means the device
    /// refused it).
    pub fn set_queue_vector(&self, q: u16, vector: u16) -> Result<()> {
        self.select(q)?;
        self.w16(common::Q_MSIX, vector)?;
        let back = self.c16(common::Q_MSIX)?;
        if vector != NO_VECTOR && back != vector {
            return Err(VirtioPciError::Queue {
                dev: self.dev.name().to_string(),
                what: format!(
                    "queue {q}: queue_msix_vector (common configuration +0x1a) reads back {back:#06x} after writing vector {vector}"
                ),
            });
        }
        Ok(())
    }

    /// Enables or disables queue `q` (disabling needs RING_RESET on real devices; written as is).
    pub fn enable_queue(&self, q: u16, on: bool) -> Result<()> {
        self.select(q)?;
        self.w16(common::Q_ENABLE, on as u16)
    }

    /// Whether queue `q` is enabled.
    pub fn queue_enabled(&self, q: u16) -> Result<bool> {
        self.select(q)?;
        Ok(self.c16(common::Q_ENABLE)? != 0)
    }

    /// Sets the configuration-change MSI-X vector (checked by read-back).
    pub fn set_config_vector(&self, vector: u16) -> Result<()> {
        self.w16(common::MSIX_CONFIG, vector)?;
        let back = self.c16(common::MSIX_CONFIG)?;
        if vector != NO_VECTOR && back != vector {
            return Err(VirtioPciError::Queue {
                dev: self.dev.name().to_string(),
                what: format!(
                    "msix_config (common configuration +0x10) reads back {back:#06x} after writing vector {vector}"
                ),
            });
        }
        Ok(())
    }

    /// Offset of queue `q`'s doorbell in the notify BAR.
    pub fn notify_offset(&self, q: u16) -> Result<u64> {
        self.select(q)?;
        let off = u64::from(self.c16(common::Q_NOFF)?) * u64::from(self.notify_mult);
        if off + 2 > self.notify.len {
            return Err(VirtioPciError::Capability {
                dev: self.dev.name().to_string(),
                what: format!(
                    "queue {q}'s doorbell at {off:#x} is outside the notify area ({:#x} bytes)",
                    self.notify.len
                ),
            });
        }
        Ok(self.notify.offset + off)
    }

    /// Queue `q`'s doorbell (a 16-bit write of the queue index).
    pub fn doorbell(&self, q: u16) -> Result<Doorbell> {
        let off = self.notify_offset(q)?;
        Ok(self.dev.doorbell(self.notify.bar, off, 2)?)
    }

    /// Queue `q`'s doorbell as a page another process can map, when each queue has a page of
    /// its own (multiplier of 4096, page-aligned doorbell) and the back end can share it.
    pub fn notify_area(&self, q: u16) -> Option<NotifyArea> {
        if self.notify_mult == 0 || !self.notify_mult.is_multiple_of(4096) {
            return None;
        }
        let off = self.notify_offset(q).ok()?;
        if !off.is_multiple_of(4096) {
            return None;
        }
        self.dev.notify_area(self.notify.bar, off, 4096)
    }

    /// Reads (and so clears) the ISR status.
    pub fn isr(&self) -> Result<u8> {
        Ok(self.dev.read8(self.isr.bar, self.isr.offset)?)
    }

    /// The config generation counter.
    pub fn generation(&self) -> Result<u8> {
        self.c8(common::GENERATION)
    }

    /// Reads `buf.len()` bytes of device config at `offset`, byte by byte, retrying until the
    /// generation is the same before and after (at most 16 tries).
    pub fn read_device_config(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        let Some(d) = self.device else {
            return Err(VirtioPciError::Capability {
                dev: self.dev.name().to_string(),
                what: "no device configuration capability".into(),
            });
        };
        if offset
            .checked_add(buf.len() as u64)
            .is_none_or(|e| e > d.len)
        {
            return Err(VirtioPciError::Capability {
                dev: self.dev.name().to_string(),
                what: format!(
                    "device config read of {} bytes at {offset:#x} beyond its {:#x} bytes",
                    buf.len(),
                    d.len
                ),
            });
        }
        for _ in 0..16 {
            let g = self.generation()?;
            for (i, b) in buf.iter_mut().enumerate() {
                *b = self.dev.read8(d.bar, d.offset + offset + i as u64)?;
            }
            if self.generation()? == g {
                return Ok(());
            }
        }
        Err(VirtioPciError::Timeout {
            dev: self.dev.name().to_string(),
            what: "a stable config generation",
            ms: 0,
        })
    }
}

/// Legacy (0.9.5) register offsets in BAR0 (driver's copy).
mod legacy {
    pub const HOST_FEATURES: u64 = 0x00;
    pub const GUEST_FEATURES: u64 = 0x04;
    pub const QUEUE_PFN: u64 = 0x08;
    pub const QUEUE_NUM: u64 = 0x0c;
    pub const QUEUE_SEL: u64 = 0x0e;
    pub const QUEUE_NOTIFY: u64 = 0x10;
    pub const STATUS: u64 = 0x12;
    pub const ISR: u64 = 0x13;
    pub const MSI_CONFIG: u64 = 0x14;
    pub const MSI_QUEUE: u64 = 0x16;
    pub const CONFIG_NO_MSIX: u64 = 0x14;
    pub const CONFIG_MSIX: u64 = 0x18;
}

/// Legacy ring alignment.
pub const LEGACY_ALIGN: u64 = 4096;

/// A legacy (virtio 0.9.5) function: 32-bit features, fixed queue sizes, PFN ring addresses.
#[derive(Debug, Clone)]
pub struct LegacyTransport {
    dev: PciDevice,
    msix: bool,
}

impl LegacyTransport {
    /// Wraps `dev` (BAR0 must hold the legacy block).
    pub fn new(dev: PciDevice) -> Result<LegacyTransport> {
        if dev.bar_len(0) < 0x18 {
            return Err(VirtioPciError::Capability {
                dev: dev.name().to_string(),
                what: format!(
                    "BAR0 of {:#x} bytes is too small for the legacy register block (0x18)",
                    dev.bar_len(0)
                ),
            });
        }
        Ok(LegacyTransport { dev, msix: false })
    }

    /// The PCI function.
    pub fn pci(&self) -> &PciDevice {
        &self.dev
    }

    /// Status.
    pub fn status(&self) -> Result<u8> {
        Ok(self.dev.read8(0, legacy::STATUS)?)
    }

    /// Writes the status (0 resets; legacy devices reset synchronously).
    pub fn set_status(&self, s: u8) -> Result<()> {
        Ok(self.dev.write8(0, legacy::STATUS, s)?)
    }

    /// Resets the device: writes 0 and checks (bounded by [`RESET_TIMEOUT`]) that status reads
    /// 0. Legacy devices reset synchronously, so the first read normally succeeds.
    pub fn reset(&self) -> Result<()> {
        self.set_status(0)?;
        let end = Instant::now() + RESET_TIMEOUT;
        loop {
            let s = self.status()?;
            if s == 0 {
                return Ok(());
            }
            if Instant::now() > end {
                return Err(VirtioPciError::Stuck {
                    dev: self.dev.name().to_string(),
                    register: "STATUS (legacy BAR0 +0x12)",
                    value: u64::from(s),
                    ms: RESET_TIMEOUT.as_millis() as u64,
                    what: "a reset writes 0 and waits for the device to read back 0",
                });
            }
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    /// Host features (32 bits).
    pub fn device_features(&self) -> Result<u32> {
        Ok(self.dev.read32(0, legacy::HOST_FEATURES)?)
    }

    /// Guest features (32 bits).
    pub fn set_driver_features(&self, f: u32) -> Result<()> {
        Ok(self.dev.write32(0, legacy::GUEST_FEATURES, f)?)
    }

    /// Fixed size of queue `q` (0: absent).
    pub fn queue_size(&self, q: u16) -> Result<u16> {
        self.dev.write16(0, legacy::QUEUE_SEL, q)?;
        Ok(self.dev.read16(0, legacy::QUEUE_NUM)?)
    }

    /// Sets queue `q`'s ring (contiguous legacy layout at `addr`, 4 KiB aligned); 0 disables.
    pub fn set_queue_addr(&self, q: u16, addr: u64) -> Result<()> {
        if !addr.is_multiple_of(LEGACY_ALIGN) || addr >> 12 > u64::from(u32::MAX) {
            return Err(VirtioPciError::Queue {
                dev: self.dev.name().to_string(),
                what: format!(
                    "queue {q}: legacy ring address {addr:#x} (4 KiB aligned, below 2^44)"
                ),
            });
        }
        self.dev.write16(0, legacy::QUEUE_SEL, q)?;
        let pfn = (addr >> 12) as u32;
        self.dev.write32(0, legacy::QUEUE_PFN, pfn)?;
        let back = self.dev.read32(0, legacy::QUEUE_PFN)?;
        if back != pfn {
            return Err(VirtioPciError::Queue {
                dev: self.dev.name().to_string(),
                what: format!(
                    "queue {q}: QUEUE_PFN (legacy BAR0 +0x08) reads back {back:#x} after writing {pfn:#x}"
                ),
            });
        }
        Ok(())
    }

    /// Queue `q`'s ring address (0: disabled).
    pub fn queue_addr(&self, q: u16) -> Result<u64> {
        self.dev.write16(0, legacy::QUEUE_SEL, q)?;
        Ok(u64::from(self.dev.read32(0, legacy::QUEUE_PFN)?) << 12)
    }

    /// The doorbell (16-bit write of the queue index at 0x10).
    pub fn doorbell(&self) -> Result<Doorbell> {
        Ok(self.dev.doorbell(0, legacy::QUEUE_NOTIFY, 2)?)
    }

    /// Reads and clears the ISR.
    pub fn isr(&self) -> Result<u8> {
        Ok(self.dev.read8(0, legacy::ISR)?)
    }

    /// Sets MSI-X vectors (config, then queue `q` via QUEUE_SEL), each checked by read-back;
    /// from then on the device config sits at 0x18. MSI-X must already be enabled in the
    /// function ([`PciDevice::set_msix`]): without it 0x14 is device configuration. Pass `None`
    /// after disabling MSI-X to go back to the INTx layout.
    pub fn set_vectors(&mut self, config: Option<u16>, queues: &[(u16, u16)]) -> Result<()> {
        match config {
            Some(v) => {
                self.msix = true;
                self.dev.write16(0, legacy::MSI_CONFIG, v)?;
                let back = self.dev.read16(0, legacy::MSI_CONFIG)?;
                if v != NO_VECTOR && back != v {
                    return Err(VirtioPciError::Queue {
                        dev: self.dev.name().to_string(),
                        what: format!(
                            "MSI_CONFIG_VECTOR (legacy BAR0 +0x14) reads back {back:#06x} after writing vector {v}"
                        ),
                    });
                }
                for &(q, qv) in queues {
                    self.dev.write16(0, legacy::QUEUE_SEL, q)?;
                    self.dev.write16(0, legacy::MSI_QUEUE, qv)?;
                    let back = self.dev.read16(0, legacy::MSI_QUEUE)?;
                    if qv != NO_VECTOR && back != qv {
                        return Err(VirtioPciError::Queue {
                            dev: self.dev.name().to_string(),
                            what: format!(
                                "queue {q}: MSI_QUEUE_VECTOR (legacy BAR0 +0x16) reads back {back:#06x} after writing vector {qv}"
                            ),
                        });
                    }
                }
            }
            None => self.msix = false,
        }
        Ok(())
    }

    /// Offset of the device config in BAR0 (0x14, or 0x18 with MSI-X on).
    pub fn config_offset(&self) -> u64 {
        if self.msix {
            legacy::CONFIG_MSIX
        } else {
            legacy::CONFIG_NO_MSIX
        }
    }

    /// Reads device config bytes.
    pub fn read_device_config(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        let base = self.config_offset();
        for (i, b) in buf.iter_mut().enumerate() {
            *b = self.dev.read8(0, base + offset + i as u64)?;
        }
        Ok(())
    }
}

/// Legacy contiguous ring layout for `size` entries: (desc, avail, used) offsets from the ring
/// base and the total length.
pub fn legacy_layout(size: u16) -> (u64, u64, u64, u64) {
    let n = u64::from(size);
    let avail = 16 * n;
    let avail_end = avail + 6 + 2 * n;
    let used = avail_end.next_multiple_of(LEGACY_ALIGN);
    let total = used + 6 + 8 * n;
    (0, avail, used, total)
}

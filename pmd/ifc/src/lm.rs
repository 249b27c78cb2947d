//! The IFC VF's live-migration region at BAR4 offset 0 (the driver's own copy of the layout,
//! from `kernel-vdpa-hw.md` §3 and `dpdk-vdpa.md` §2; the device model keeps its own).

use vdpakit_core::pci::PciDevice;
use vdpakit_core::vdpa::VqState;
use vdpakit_core::virtio_pci::ModernTransport;
use vdpakit_pmd_virtio::{PmdError, Result};

/// The BAR holding the region.
pub const BAR: u8 = 4;
/// Control (le64; written as its low 32 bits): DISABLE 0, ENABLE_VF 1, ENABLE_PF 3.
pub const CONTROL: u64 = 0x00;
/// Status (le64).
pub const STATUS: u64 = 0x08;
/// First IOVA of the dirty-log bitmap (low half at +0, high half at +4).
pub const LOG_BASE: u64 = 0x10;
/// End IOVA of the bitmap (low half at +0, high half at +4).
pub const LOG_END: u64 = 0x18;
/// Queue `q`'s state slot at `VQ_STATE + 4 * q`: avail index 15:0, used index 31:16.
pub const VQ_STATE: u64 = 0x20;

/// CONTROL values.
pub mod ctl {
    /// Logging off.
    pub const DISABLE: u32 = 0;
    /// Logging on for the VF.
    pub const ENABLE_VF: u32 = 1;
    /// Logging on for the PF.
    pub const ENABLE_PF: u32 = 3;
}

/// A located live-migration region.
#[derive(Debug, Clone, Copy)]
pub struct LmRegion {
    queues: u16,
}

impl LmRegion {
    /// Checks that BAR4 holds the region for `queues` state slots and that no virtio structure
    /// of the function overlaps it.
    pub fn find(t: &ModernTransport, queues: u16) -> Result<LmRegion> {
        let dev = t.pci();
        let end = VQ_STATE + 4 * u64::from(queues);
        let len = dev.bar_len(BAR);
        if len < end {
            return Err(PmdError::Probe {
                dev: dev.name().to_string(),
                what: format!(
                    "BAR4 is {len:#x} bytes: the live-migration region needs {end:#x} (control, status, log base/end, {queues} queue state slots)"
                ),
            });
        }
        let (c, n, i, d) = t.regions();
        for (what, r) in [
            ("common configuration", Some(c)),
            ("notification", Some(n)),
            ("ISR", Some(i)),
            ("device configuration", d),
        ] {
            if let Some(r) = r
                && r.bar == BAR
                && r.offset < end
            {
                return Err(PmdError::Probe {
                    dev: dev.name().to_string(),
                    what: format!(
                        "the virtio {what} at BAR4 +{:#x} overlaps the IFC live-migration region (BAR4 +0x0..{end:#x})",
                        r.offset
                    ),
                });
            }
        }
        Ok(LmRegion { queues })
    }

    fn slot(&self, dev: &PciDevice, q: u16) -> Result<u64> {
        if q >= self.queues {
            return Err(PmdError::Config {
                dev: dev.name().to_string(),
                what: format!("queue {q}: no state slot (the region has {})", self.queues),
            });
        }
        Ok(VQ_STATE + 4 * u64::from(q))
    }

    /// Writes queue `q`'s position (before it is enabled).
    pub fn set_state(&self, dev: &PciDevice, q: u16, avail: u16, used: u16) -> Result<()> {
        let off = self.slot(dev, q)?;
        let v = u32::from(avail) | (u32::from(used) << 16);
        dev.write32(BAR, off, v)?;
        let back = dev.read32(BAR, off)?;
        if back != v {
            return Err(PmdError::Device {
                dev: dev.name().to_string(),
                what: format!(
                    "queue {q}: LM state slot (BAR4 +{off:#x}) reads {back:#010x} after writing {v:#010x}"
                ),
            });
        }
        Ok(())
    }

    /// Reads queue `q`'s position.
    pub fn state(&self, dev: &PciDevice, q: u16) -> Result<VqState> {
        let v = dev.read32(BAR, self.slot(dev, q)?)?;
        Ok(VqState {
            avail_idx: v as u16,
            used_idx: (v >> 16) as u16,
        })
    }

    /// Starts dirty logging into the bitmap at `iova` (`size` bytes).
    pub fn start_log(&self, dev: &PciDevice, iova: u64, size: u64) -> Result<()> {
        let end = iova + size;
        dev.write32(BAR, LOG_BASE, iova as u32)?;
        dev.write32(BAR, LOG_BASE + 4, (iova >> 32) as u32)?;
        dev.write32(BAR, LOG_END, end as u32)?;
        dev.write32(BAR, LOG_END + 4, (end >> 32) as u32)?;
        dev.write32(BAR, CONTROL, ctl::ENABLE_VF)?;
        tracing::info!(
            "{}: hardware dirty logging on (bitmap IOVA {iova:#x}..{end:#x})",
            dev.name()
        );
        Ok(())
    }

    /// Stops dirty logging.
    pub fn stop_log(&self, dev: &PciDevice) -> Result<()> {
        dev.write32(BAR, CONTROL, ctl::DISABLE)?;
        tracing::info!("{}: hardware dirty logging off", dev.name());
        Ok(())
    }
}

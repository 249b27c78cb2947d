//! The virtio-PCI vendor capabilities (virtio 1.x "modern" layout; reference facts
//! `kernel-vdpa-hw.md` §0): where the common configuration, notify area, ISR and device
//! configuration live (BAR, offset, length), found by walking the capability list.

use super::{PciDevice, PciError, cap_id};

/// `cfg_type` of a virtio vendor capability.
pub mod cfg_type {
    /// Common configuration.
    pub const COMMON: u8 = 1;
    /// Notifications (doorbells).
    pub const NOTIFY: u8 = 2;
    /// ISR status.
    pub const ISR: u8 = 3;
    /// Device-specific configuration.
    pub const DEVICE: u8 = 4;
    /// PCI configuration access window.
    pub const PCI_CFG: u8 = 5;
    /// Shared memory region.
    pub const SHM: u8 = 8;
    /// Vendor-specific data.
    pub const VENDOR: u8 = 9;
}

/// Offsets in the common configuration structure.
pub mod common {
    /// device_feature_select (u32).
    pub const DEVICE_FEATURE_SELECT: u64 = 0x00;
    /// device_feature (u32), the 32 bits chosen by the select.
    pub const DEVICE_FEATURE: u64 = 0x04;
    /// driver_feature_select (u32).
    pub const DRIVER_FEATURE_SELECT: u64 = 0x08;
    /// driver_feature (u32).
    pub const DRIVER_FEATURE: u64 = 0x0c;
    /// msix_config (u16).
    pub const MSIX_CONFIG: u64 = 0x10;
    /// num_queues (u16).
    pub const NUM_QUEUES: u64 = 0x12;
    /// device_status (u8).
    pub const DEVICE_STATUS: u64 = 0x14;
    /// config_generation (u8).
    pub const CONFIG_GENERATION: u64 = 0x15;
    /// queue_select (u16).
    pub const QUEUE_SELECT: u64 = 0x16;
    /// queue_size (u16).
    pub const QUEUE_SIZE: u64 = 0x18;
    /// queue_msix_vector (u16).
    pub const QUEUE_MSIX_VECTOR: u64 = 0x1a;
    /// queue_enable (u16).
    pub const QUEUE_ENABLE: u64 = 0x1c;
    /// queue_notify_off (u16).
    pub const QUEUE_NOTIFY_OFF: u64 = 0x1e;
    /// Size of the structure without the extensions.
    pub const LEN: u32 = 0x38;
}

/// Device status bits.
pub mod status {
    /// ACKNOWLEDGE.
    pub const ACK: u8 = 0x01;
    /// DRIVER.
    pub const DRIVER: u8 = 0x02;
    /// DRIVER_OK.
    pub const DRIVER_OK: u8 = 0x04;
    /// FEATURES_OK.
    pub const FEATURES_OK: u8 = 0x08;
    /// NEEDS_RESET.
    pub const NEEDS_RESET: u8 = 0x40;
    /// FAILED.
    pub const FAILED: u8 = 0x80;
}

/// Feature bit VIRTIO_F_VERSION_1.
pub const F_VERSION_1: u32 = 32;

/// One virtio vendor capability.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VirtioCap {
    /// Offset of the capability in configuration space.
    pub cap_offset: u16,
    /// `cfg_type`.
    pub cfg_type: u8,
    /// BAR holding the structure.
    pub bar: u8,
    /// Offset in the BAR.
    pub offset: u32,
    /// Length in bytes.
    pub length: u32,
    /// `notify_off_multiplier` (notify capabilities only; 0 otherwise).
    pub notify_multiplier: u32,
}

impl VirtioCap {
    /// Name of the `cfg_type` (`common`, `notify`, ...).
    pub fn type_name(&self) -> &'static str {
        match self.cfg_type {
            cfg_type::COMMON => "common",
            cfg_type::NOTIFY => "notify",
            cfg_type::ISR => "isr",
            cfg_type::DEVICE => "device",
            cfg_type::PCI_CFG => "pci_cfg",
            cfg_type::SHM => "shm",
            cfg_type::VENDOR => "vendor",
            _ => "unknown",
        }
    }
}

/// The virtio structures of a function.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct VirtioCaps {
    /// Every virtio vendor capability, in list order.
    pub all: Vec<VirtioCap>,
}

impl VirtioCaps {
    /// The first capability of `cfg_type` whose structure lies inside its BAR (later ones are
    /// alternatives the driver may ignore).
    pub fn get(&self, cfg_type: u8) -> Option<&VirtioCap> {
        self.all.iter().find(|c| c.cfg_type == cfg_type)
    }
}

/// Reads the virtio vendor capabilities of `dev`. A capability whose BAR does not exist or
/// whose structure does not fit in the BAR is an error naming it.
pub fn read(dev: &PciDevice) -> Result<VirtioCaps, PciError> {
    let mut all = Vec::new();
    for c in dev.capabilities()? {
        if c.id != cap_id::VENDOR || c.len < 16 {
            continue;
        }
        let o = c.offset;
        let cfg_type = dev.config_read8(o + 3)?;
        let bar = dev.config_read8(o + 4)?;
        let offset = dev.config_read32(o + 8)?;
        let length = dev.config_read32(o + 12)?;
        let notify_multiplier = if cfg_type == cfg_type::NOTIFY && c.len >= 20 {
            dev.config_read32(o + 16)?
        } else {
            0
        };
        let cap = VirtioCap {
            cap_offset: o,
            cfg_type,
            bar,
            offset,
            length,
            notify_multiplier,
        };
        // PCI_CFG's fields describe a window chosen at run time; others must fit their BAR.
        if cfg_type != cfg_type::PCI_CFG && cfg_type <= cfg_type::DEVICE {
            let end = offset as u64 + length as u64;
            if bar >= super::BARS || end > dev.bar_len(bar) {
                return Err(PciError::BadCapList {
                    dev: dev.name().to_string(),
                    why: format!(
                        "virtio {} capability at {o:#x} points at BAR {bar} {offset:#x}..{end:#x}, \
                         outside the BAR ({:#x} bytes)",
                        cap.type_name(),
                        dev.bar_len(bar)
                    ),
                });
            }
        }
        all.push(cap);
    }
    Ok(VirtioCaps { all })
}

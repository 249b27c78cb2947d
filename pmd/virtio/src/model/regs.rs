//! The device models' own copy of the virtio-PCI register layout, written from the virtio
//! specification's facts (`kernel-vdpa-hw.md` §0) independently of the drivers' copy in
//! `vdpakit_core::virtio_pci`: a wrong offset on either side must fail a test, not cancel out.
//!
//! The layouts are values (not constants) so a test can build a model with one register moved
//! and check that the driver notices.

/// PCI capability IDs.
pub mod cap {
    /// Vendor-specific (virtio structures).
    pub const VENDOR: u8 = 0x09;
    /// MSI-X.
    pub const MSIX: u8 = 0x11;
}

/// Virtio structure types (`cfg_type` at byte 3 of a vendor capability).
pub mod cfg_type {
    /// Common configuration.
    pub const COMMON: u8 = 1;
    /// Notifications.
    pub const NOTIFY: u8 = 2;
    /// ISR status.
    pub const ISR: u8 = 3;
    /// Device configuration.
    pub const DEVICE: u8 = 4;
}

/// Device status bits.
pub mod st {
    /// ACKNOWLEDGE.
    pub const ACK: u8 = 0x01;
    /// DRIVER.
    pub const DRIVER: u8 = 0x02;
    /// DRIVER_OK.
    pub const DRIVER_OK: u8 = 0x04;
    /// FEATURES_OK.
    pub const FEATURES_OK: u8 = 0x08;
    /// DEVICE_NEEDS_RESET.
    pub const NEEDS_RESET: u8 = 0x40;
    /// FAILED.
    pub const FAILED: u8 = 0x80;
}

/// "No vector".
pub const NO_VECTOR: u16 = 0xffff;

/// Field offsets of the modern common configuration structure.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CommonLayout {
    /// device_feature_select (u32).
    pub dfselect: u64,
    /// device_feature (u32).
    pub df: u64,
    /// driver_feature_select (u32).
    pub gfselect: u64,
    /// driver_feature (u32).
    pub gf: u64,
    /// msix_config (u16).
    pub msix_config: u64,
    /// num_queues (u16).
    pub num_queues: u64,
    /// device_status (u8).
    pub status: u64,
    /// config_generation (u8).
    pub generation: u64,
    /// queue_select (u16).
    pub q_select: u64,
    /// queue_size (u16).
    pub q_size: u64,
    /// queue_msix_vector (u16).
    pub q_msix: u64,
    /// queue_enable (u16).
    pub q_enable: u64,
    /// queue_notify_off (u16).
    pub q_notify_off: u64,
    /// queue_desc (u64 as two u32).
    pub q_desc: u64,
    /// queue_driver (u64 as two u32).
    pub q_driver: u64,
    /// queue_device (u64 as two u32).
    pub q_device: u64,
    /// Size of the structure.
    pub len: u64,
}

impl CommonLayout {
    /// The specification's layout.
    pub const SPEC: CommonLayout = CommonLayout {
        dfselect: 0x00,
        df: 0x04,
        gfselect: 0x08,
        gf: 0x0c,
        msix_config: 0x10,
        num_queues: 0x12,
        status: 0x14,
        generation: 0x15,
        q_select: 0x16,
        q_size: 0x18,
        q_msix: 0x1a,
        q_enable: 0x1c,
        q_notify_off: 0x1e,
        q_desc: 0x20,
        q_driver: 0x28,
        q_device: 0x30,
        len: 0x40,
    };
}

/// Register offsets of the legacy (0.9.5) BAR0 block.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LegacyLayout {
    /// HOST_FEATURES (u32, read).
    pub host_features: u64,
    /// GUEST_FEATURES (u32).
    pub guest_features: u64,
    /// QUEUE_PFN (u32).
    pub pfn: u64,
    /// QUEUE_NUM (u16, read).
    pub num: u64,
    /// QUEUE_SEL (u16).
    pub sel: u64,
    /// QUEUE_NOTIFY (u16).
    pub notify: u64,
    /// STATUS (u8).
    pub status: u64,
    /// ISR (u8, read clears).
    pub isr: u64,
    /// MSI_CONFIG_VECTOR (u16; exists with MSI-X on).
    pub msix_config: u64,
    /// MSI_QUEUE_VECTOR (u16; exists with MSI-X on).
    pub msix_queue: u64,
    /// Device configuration without MSI-X.
    pub config: u64,
    /// Device configuration with MSI-X on.
    pub config_msix: u64,
    /// Ring alignment of the contiguous layout.
    pub align: u64,
}

impl LegacyLayout {
    /// The specification's layout.
    pub const SPEC: LegacyLayout = LegacyLayout {
        host_features: 0x00,
        guest_features: 0x04,
        pfn: 0x08,
        num: 0x0c,
        sel: 0x0e,
        notify: 0x10,
        status: 0x12,
        isr: 0x13,
        msix_config: 0x14,
        msix_queue: 0x16,
        config: 0x14,
        config_msix: 0x18,
        align: 4096,
    };
}

/// virtio-net configuration fields.
pub mod net {
    /// MAC (6 bytes).
    pub const MAC: usize = 0;
    /// Status (u16; bit 0 link up).
    pub const STATUS: usize = 6;
    /// max_virtqueue_pairs (u16).
    pub const MAX_PAIRS: usize = 8;
    /// MTU (u16).
    pub const MTU: usize = 10;
    /// Bytes modelled.
    pub const LEN: usize = 24;
}

/// The control queue's virtio-net commands the models understand.
pub mod ctrl {
    /// Class: multiqueue.
    pub const CLASS_MQ: u8 = 4;
    /// MQ command: set the number of queue pairs.
    pub const MQ_VQ_PAIRS_SET: u8 = 0;
    /// Ack: done.
    pub const OK: u8 = 0;
    /// Ack: refused.
    pub const ERR: u8 = 1;
}

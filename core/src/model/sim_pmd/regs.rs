//! The sim's register offsets as the **driver** knows them (its own copy; see the device's
//! documentation of the map in `model::sim::regs`). Held in a value so a test can hand the
//! driver a deliberately wrong map.

/// Register offsets in BAR 0 and the doorbell BAR.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RegMap {
    /// u32 identification value.
    pub magic: u64,
    /// u32 interface version.
    pub version: u64,
    /// u64 device features.
    pub device_features: u64,
    /// u64 driver features.
    pub driver_features: u64,
    /// u32 virtio status.
    pub status: u64,
    /// u32 queue count.
    pub num_queues: u64,
    /// u32 queue select.
    pub queue_sel: u64,
    /// u32 largest ring.
    pub queue_size_max: u64,
    /// u32 ring size.
    pub queue_size: u64,
    /// u32 enable.
    pub queue_enable: u64,
    /// u64 descriptor area.
    pub queue_desc: u64,
    /// u64 driver area.
    pub queue_driver: u64,
    /// u64 device area.
    pub queue_device: u64,
    /// u32 next avail position.
    pub queue_avail_state: u64,
    /// u32 next used position.
    pub queue_used_state: u64,
    /// u32 MSI-X vector.
    pub queue_vector: u64,
    /// u32 doorbell offset in the doorbell BAR.
    pub queue_notify_off: u64,
    /// u32 queue status.
    pub queue_status: u64,
    /// u32 suspend.
    pub suspend: u64,
    /// u64 dirty log IOVA.
    pub log_base: u64,
    /// u64 dirty log bytes.
    pub log_size: u64,
    /// u32 refused accesses.
    pub bad_accesses: u64,
    /// u32 offset of the last refused access.
    pub last_bad_offset: u64,
    /// u64 counters of the selected queue, in order: packets, bytes, errors, dropped,
    /// iommu_faults, kicks, interrupts.
    pub q_counters: u64,
    /// Device config space (12 bytes).
    pub config: u64,
    /// The doorbell BAR.
    pub bell_bar: u8,
}

/// The map the sim implements.
pub const SIM_REGS: RegMap = RegMap {
    magic: 0x000,
    version: 0x004,
    device_features: 0x008,
    driver_features: 0x010,
    status: 0x018,
    num_queues: 0x01c,
    queue_sel: 0x020,
    queue_size_max: 0x024,
    queue_size: 0x028,
    queue_enable: 0x02c,
    queue_desc: 0x030,
    queue_driver: 0x038,
    queue_device: 0x040,
    queue_avail_state: 0x048,
    queue_used_state: 0x04c,
    queue_vector: 0x050,
    queue_notify_off: 0x054,
    queue_status: 0x058,
    suspend: 0x05c,
    log_base: 0x060,
    log_size: 0x068,
    bad_accesses: 0x070,
    last_bad_offset: 0x074,
    q_counters: 0x080,
    config: 0x100,
    bell_bar: 2,
};

/// The magic value the device answers.
pub const MAGIC: u32 = 0x4d53_4b56;
/// The interface version this driver speaks.
pub const VERSION: u32 = 1;

/// virtio status bits.
pub mod status {
    /// Guest OS saw the device.
    pub const ACKNOWLEDGE: u32 = 0x01;
    /// Driver present.
    pub const DRIVER: u32 = 0x02;
    /// Driver ready.
    pub const DRIVER_OK: u32 = 0x04;
    /// Features accepted.
    pub const FEATURES_OK: u32 = 0x08;
    /// Device error.
    pub const NEEDS_RESET: u32 = 0x40;
}

/// No MSI-X vector.
pub const NO_VECTOR: u32 = 0xffff;

//! The sim's register map, as the **device** defines it. The driver
//! ([`sim_pmd`](crate::model::sim_pmd)) has its own copy, deliberately not shared: a wrong
//! offset on either side must fail a test, not cancel out.
//!
//! ```text
//! BAR 0 (4 KiB): control registers, little endian, each accessed with its own width only.
//!
//! off    width  access  name               meaning
//! 0x000  4      RO      MAGIC              0x4d534b56 ("VKSM")
//! 0x004  4      RO      VERSION            1
//! 0x008  8      RO      DEVICE_FEATURES    virtio feature bits (bit 26: the device can log
//!                                          dirty pages, VHOST_F_LOG_ALL)
//! 0x010  8      RW      DRIVER_FEATURES    accepted features (only before FEATURES_OK)
//! 0x018  4      RW      STATUS             virtio status bits; writing 0 resets the VF;
//!                                          FEATURES_OK sticks only for a subset of
//!                                          DEVICE_FEATURES; reads NEEDS_RESET (0x40) while a
//!                                          queue is stopped on an error
//! 0x01c  4      RO      NUM_QUEUES         2 x queue pairs
//! 0x020  4      RW      QUEUE_SEL          queue the QUEUE_* registers address
//! 0x024  4      RO      QUEUE_SIZE_MAX
//! 0x028  4      RW      QUEUE_SIZE         ring size (split: a power of two)
//! 0x02c  4      RW      QUEUE_ENABLE       1 starts the queue (after DRIVER_OK), 0 stops it
//!                                          and makes its positions final
//! 0x030  8      RW      QUEUE_DESC         descriptor area IOVA
//! 0x038  8      RW      QUEUE_DRIVER       driver area IOVA
//! 0x040  8      RW      QUEUE_DEVICE       device area IOVA
//! 0x048  4      RW      QUEUE_AVAIL_STATE  next avail index (packed: wrap counter in bit 15);
//!                                          writable while the queue is stopped or suspended
//! 0x04c  4      RW      QUEUE_USED_STATE   next used index (packed: wrap counter in bit 15)
//! 0x050  4      RW      QUEUE_VECTOR       MSI-X vector of the queue, 0xffff: none
//! 0x054  4      RO      QUEUE_NOTIFY_OFF   offset of the queue's doorbell in BAR 2
//! 0x058  4      RO      QUEUE_STATUS       bit 0: running, bit 1: stopped on an error
//! 0x05c  4      RW      SUSPEND            1 suspends the VF, 0 resumes; reads the state
//! 0x060  8      RW      LOG_BASE           IOVA of the dirty-page bitmap
//! 0x068  8      RW      LOG_SIZE           its bytes; writing it starts (non-zero) or stops
//!                                          (0) logging
//! 0x070  4      RO      BAD_ACCESSES       accesses the device refused so far (unknown
//!                                          offset, wrong width, read-only register, wrong
//!                                          state)
//! 0x074  4      RO      LAST_BAD_OFFSET    offset of the last refused access
//! 0x080  8      RO      Q_PACKETS          counters of the selected queue: packets,
//! 0x088  8      RO      Q_BYTES            bytes,
//! 0x090  8      RO      Q_ERRORS           descriptor errors,
//! 0x098  8      RO      Q_DROPPED          frames dropped,
//! 0x0a0  8      RO      Q_IOMMU_FAULTS     DMA outside the mappings,
//! 0x0a8  8      RO      Q_KICKS            doorbells seen,
//! 0x0b0  8      RO      Q_INTERRUPTS       MSI-X raised
//! 0x100  12     RO      CONFIG             virtio-net config: mac[6], status u16 (1: link
//!                                          up), max_virtqueue_pairs u16, mtu u16 (any width,
//!                                          byte granular)
//!
//! BAR 2: doorbells, one 4 KiB page per queue (queue q at q * 4096). A 2- or 4-byte write of
//! the queue index at the start of the page rings it. The pages are a memfd a host notifier
//! can map (`notify_area`); the engine polls them.
//! ```

pub(super) const MAGIC: u64 = 0x000;
pub(super) const VERSION: u64 = 0x004;
pub(super) const DEVICE_FEATURES: u64 = 0x008;
pub(super) const DRIVER_FEATURES: u64 = 0x010;
pub(super) const STATUS: u64 = 0x018;
pub(super) const NUM_QUEUES: u64 = 0x01c;
pub(super) const QUEUE_SEL: u64 = 0x020;
pub(super) const QUEUE_SIZE_MAX: u64 = 0x024;
pub(super) const QUEUE_SIZE: u64 = 0x028;
pub(super) const QUEUE_ENABLE: u64 = 0x02c;
pub(super) const QUEUE_DESC: u64 = 0x030;
pub(super) const QUEUE_DRIVER: u64 = 0x038;
pub(super) const QUEUE_DEVICE: u64 = 0x040;
pub(super) const QUEUE_AVAIL_STATE: u64 = 0x048;
pub(super) const QUEUE_USED_STATE: u64 = 0x04c;
pub(super) const QUEUE_VECTOR: u64 = 0x050;
pub(super) const QUEUE_NOTIFY_OFF: u64 = 0x054;
pub(super) const QUEUE_STATUS: u64 = 0x058;
pub(super) const SUSPEND: u64 = 0x05c;
pub(super) const LOG_BASE: u64 = 0x060;
pub(super) const LOG_SIZE: u64 = 0x068;
pub(super) const BAD_ACCESSES: u64 = 0x070;
pub(super) const LAST_BAD_OFFSET: u64 = 0x074;
pub(super) const Q_PACKETS: u64 = 0x080;
pub(super) const Q_BYTES: u64 = 0x088;
pub(super) const Q_ERRORS: u64 = 0x090;
pub(super) const Q_DROPPED: u64 = 0x098;
pub(super) const Q_IOMMU_FAULTS: u64 = 0x0a0;
pub(super) const Q_KICKS: u64 = 0x0a8;
pub(super) const Q_INTERRUPTS: u64 = 0x0b0;
pub(super) const CONFIG: u64 = 0x100;
pub(super) const CONFIG_LEN: u64 = 12;

pub(super) const MAGIC_VALUE: u32 = 0x4d53_4b56;
pub(super) const VERSION_VALUE: u32 = 1;

/// BAR sizes.
pub(super) const BAR0_LEN: u64 = 0x1000;
/// The doorbell BAR.
pub(super) const BELL_BAR: u8 = 2;

/// virtio status bits.
pub(super) const S_FEATURES_OK: u32 = 0x08;
pub(super) const S_DRIVER_OK: u32 = 0x04;
pub(super) const S_NEEDS_RESET: u32 = 0x40;

/// The width of the register at `off`, if there is one.
pub(super) fn width(off: u64) -> Option<usize> {
    Some(match off {
        MAGIC | VERSION | STATUS | NUM_QUEUES | QUEUE_SEL | QUEUE_SIZE_MAX | QUEUE_SIZE
        | QUEUE_ENABLE | QUEUE_AVAIL_STATE | QUEUE_USED_STATE | QUEUE_VECTOR | QUEUE_NOTIFY_OFF
        | QUEUE_STATUS | SUSPEND | BAD_ACCESSES | LAST_BAD_OFFSET => 4,
        DEVICE_FEATURES | DRIVER_FEATURES | QUEUE_DESC | QUEUE_DRIVER | QUEUE_DEVICE | LOG_BASE
        | LOG_SIZE | Q_PACKETS | Q_BYTES | Q_ERRORS | Q_DROPPED | Q_IOMMU_FAULTS | Q_KICKS
        | Q_INTERRUPTS => 8,
        _ => return None,
    })
}

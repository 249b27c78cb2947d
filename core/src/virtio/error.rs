//! The virtio module's error type.

use std::io;

/// Everything that can go wrong while setting up guest memory or a virtqueue, or while walking a
/// ring the other side wrote. Ring errors name the offending index, address or length, so a log
/// line is enough to tell a hostile or broken driver from a bug of ours.
#[derive(Debug, thiserror::Error)]
pub enum QueueError {
    // --- guest memory ---
    /// A memory region of zero bytes.
    #[error("guest memory region {index} (gpa {gpa:#x}): size 0 is not accepted")]
    RegionEmpty {
        /// Position of the region in the list given to [`GuestMemory::new`](super::GuestMemory::new).
        index: usize,
        /// Its guest physical address.
        gpa: u64,
    },

    /// A memory region whose guest-physical or front-end-virtual end overflows 64 bits.
    #[error("guest memory region {index}: {space} {start:#x} + size {size:#x} overflows u64")]
    RegionOverflow {
        /// Position of the region in the list.
        index: usize,
        /// `"gpa"` or `"uva"`.
        space: &'static str,
        /// Start address in that space.
        start: u64,
        /// Region size.
        size: u64,
    },

    /// Two memory regions overlap in guest-physical or front-end-virtual address space.
    #[error(
        "guest memory region {index} ({space} {start:#x}..{end:#x}) overlaps region {other} \
         ({space} {other_start:#x}..{other_end:#x})"
    )]
    RegionOverlap {
        /// Position of the offending region in the list.
        index: usize,
        /// Position of the region it overlaps.
        other: usize,
        /// `"gpa"` or `"uva"`.
        space: &'static str,
        /// Start of the offending region.
        start: u64,
        /// End (exclusive) of the offending region.
        end: u64,
        /// Start of the other region.
        other_start: u64,
        /// End (exclusive) of the other region.
        other_end: u64,
    },

    /// More memory regions than a vhost-user front end may send.
    #[error("{count} guest memory regions: accepted is at most {max}")]
    TooManyRegions {
        /// Regions given.
        count: usize,
        /// The limit ([`MAX_REGIONS`](super::MAX_REGIONS)).
        max: usize,
    },

    /// Mapping a region's file descriptor failed.
    #[error(
        "mapping guest memory (gpa {gpa:#x}, {size:#x} bytes at fd offset {offset:#x}) failed: {source}"
    )]
    Map {
        /// Guest physical address of the region.
        gpa: u64,
        /// Size of the region.
        size: u64,
        /// Offset in the file.
        offset: u64,
        /// The OS error.
        #[source]
        source: io::Error,
    },

    /// A [`GuestMemory::read`](super::GuestMemory::read)/`write` range that is not guest memory.
    #[error("guest memory access at gpa {gpa:#x} of {len} bytes is outside guest memory")]
    MemAccess {
        /// Guest physical address.
        gpa: u64,
        /// Length of the access.
        len: u64,
    },

    // --- queue set-up ---
    /// A queue size the ring format does not allow.
    #[error("invalid {format} queue size {size}: accepted is {accepted}")]
    InvalidSize {
        /// `"split"` or `"packed"`.
        format: &'static str,
        /// The size given.
        size: u16,
        /// What is accepted.
        accepted: &'static str,
    },

    /// A ring area that does not lie inside one guest memory region.
    #[error("{area} at {kind} {addr:#x} ({len} bytes) is not inside one guest memory region")]
    RingNotInMemory {
        /// `"descriptor table"`, `"avail ring"`, `"used ring"`, `"driver area"`, `"device area"`.
        area: &'static str,
        /// `"gpa"` or `"uva"`.
        kind: &'static str,
        /// The address given.
        addr: u64,
        /// Bytes the area needs.
        len: u64,
    },

    /// A ring area that is not aligned as the ring format requires.
    #[error("{area} at {addr:#x} (host {host:#x}) is not aligned to {align} bytes")]
    RingMisaligned {
        /// Which area.
        area: &'static str,
        /// The address given.
        addr: u64,
        /// Where it is mapped here.
        host: usize,
        /// Required alignment.
        align: usize,
    },

    /// A ring position for `set_last_avail` that does not fit the queue.
    #[error("invalid ring position {value:#x} for a queue of size {size}")]
    InvalidRingPosition {
        /// The value given (packed: bit 15 = wrap counter).
        value: u16,
        /// Queue size.
        size: u16,
    },

    // --- what the driver wrote (device side) ---
    /// The queue was marked broken by its owner.
    #[error("the queue is marked broken")]
    Broken,

    /// The avail index moved more than the queue size ahead of the device.
    #[error(
        "avail idx {avail_idx} is {ahead} entries ahead of the device's {last_avail}: queue size is {size}"
    )]
    AvailIdxJump {
        /// avail.idx as read.
        avail_idx: u16,
        /// The device's next avail position.
        last_avail: u16,
        /// `avail_idx - last_avail` (wrapping).
        ahead: u16,
        /// Queue size.
        size: u16,
    },

    /// An avail ring entry naming a descriptor outside the table.
    #[error("avail ring entry {slot} names head descriptor {head}: queue size is {size}")]
    HeadOutOfRange {
        /// Avail ring slot.
        slot: u16,
        /// The head index read.
        head: u16,
        /// Queue size.
        size: u16,
    },

    /// A descriptor whose `next` is outside its table.
    #[error("descriptor {index} chains to {next}: its table has {limit} entries")]
    NextOutOfRange {
        /// The descriptor holding `next`.
        index: u16,
        /// The `next` value.
        next: u16,
        /// Entries in the table (queue size or indirect table length).
        limit: u32,
    },

    /// A chain with more descriptors than its table (or ring) holds: a loop, or a driver bug.
    #[error("descriptor chain starting at {head} is longer than {limit} descriptors (loop?)")]
    ChainTooLong {
        /// Head index (split) or ring slot (packed) of the chain.
        head: u16,
        /// Entries in the table walked.
        limit: u32,
    },

    /// A chain with more non-empty buffers than [`Segs`](super::Segs) holds.
    #[error("descriptor chain starting at {head} has more than {max} buffers")]
    TooManySegs {
        /// Head index or ring slot.
        head: u16,
        /// [`SEGS_MAX`](super::SEGS_MAX).
        max: usize,
    },

    /// A chain whose readable or writable bytes exceed `u32::MAX`.
    #[error("descriptor chain starting at {head} has more than 4 GiB of buffers")]
    ChainBytesOverflow {
        /// Head index or ring slot.
        head: u16,
    },

    /// An indirect descriptor although `VIRTIO_F_RING_INDIRECT_DESC` was not negotiated.
    #[error("descriptor {index} is indirect but VIRTIO_F_RING_INDIRECT_DESC was not negotiated")]
    IndirectNotNegotiated {
        /// The descriptor.
        index: u16,
    },

    /// An indirect descriptor that also has `NEXT` set.
    #[error("descriptor {index} has both INDIRECT and NEXT set")]
    IndirectWithNext {
        /// The descriptor.
        index: u16,
    },

    /// An indirect descriptor inside an indirect table.
    #[error("entry {index} of an indirect table is itself indirect")]
    NestedIndirect {
        /// The entry in the indirect table.
        index: u16,
    },

    /// An indirect table length that is zero, not a multiple of 16, or above 32768 entries.
    #[error(
        "indirect table at {addr:#x} has length {len}: accepted is a non-zero multiple of 16 up to 32768 entries"
    )]
    IndirectTableLen {
        /// Table address.
        addr: u64,
        /// Its length in bytes.
        len: u32,
    },

    /// An indirect table that is not inside one guest memory region.
    #[error("indirect table at gpa {addr:#x} ({len} bytes) is not inside one guest memory region")]
    IndirectTableNotInMemory {
        /// Table address.
        addr: u64,
        /// Its length in bytes.
        len: u32,
    },

    /// A buffer whose end overflows or that is not (entirely) guest memory the device may
    /// access in the buffer's direction.
    #[error("{} buffer at gpa {addr:#x} of {len} bytes is not in guest memory the device may {}", if *write { "device-writable" } else { "device-readable" }, if *write { "write" } else { "read" })]
    BadBuffer {
        /// Buffer address.
        addr: u64,
        /// Buffer length.
        len: u32,
        /// Whether the descriptor is device-writable.
        write: bool,
    },

    /// A device-readable descriptor after a device-writable one (the spec forbids it).
    #[error("descriptor {index} is device-readable but follows a device-writable one")]
    ReadableAfterWritable {
        /// The descriptor (ring index, or indirect table entry).
        index: u16,
    },

    // --- what the device wrote (driver side) ---
    /// `add` with no buffers.
    #[error("a chain needs at least one buffer")]
    EmptyChain,

    /// `add` with more buffers than free descriptors.
    #[error("chain of {needed} descriptors does not fit: {free} free")]
    QueueFull {
        /// Descriptors needed.
        needed: usize,
        /// Descriptors free.
        free: usize,
    },

    /// An indirect chain although `VIRTIO_F_RING_INDIRECT_DESC` was not negotiated, or one that
    /// is longer than an indirect table may be.
    #[error(
        "indirect chain of {len} buffers: needs VIRTIO_F_RING_INDIRECT_DESC and 1..=32768 buffers"
    )]
    IndirectUnsupported {
        /// Buffers given.
        len: usize,
    },

    /// The used index moved more than the queue size ahead of the driver.
    #[error(
        "used idx {used_idx} is more than the queue size {size} ahead of the driver's {last_used}"
    )]
    UsedIdxJump {
        /// used.idx as read.
        used_idx: u16,
        /// The driver's next used position.
        last_used: u16,
        /// Queue size.
        size: u16,
    },

    /// A used entry naming an id that is not in flight.
    #[error("used entry names id {id}, which is not in flight (queue size {size})")]
    BadUsedId {
        /// The id read.
        id: u32,
        /// Queue size.
        size: u16,
    },

    /// With `VIRTIO_F_IN_ORDER`, a used entry that completes a batch of `batch` chains (its id is
    /// the batch's last chain) while the split ring's used index moved only `moved` entries.
    #[error(
        "in-order used entry names id {id}, the last of {batch} chains, but used idx moved only \
         {moved} entries"
    )]
    InOrderBatchBeyondUsedIdx {
        /// The id read.
        id: u32,
        /// Chains the entry completes (the named one and every earlier one in flight).
        batch: u16,
        /// How far `used.idx` is ahead of the driver.
        moved: u16,
    },
}

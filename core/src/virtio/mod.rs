//! Virtio rings (split and packed, device and driver side) over guest memory.
//!
//! Written from the virtio 1.1/1.2 specification. Shared by the vhost-user back end (device
//! side), the virtio-user front end (driver side) and device models.
//!
//! - [`mem`]: [`GuestMemory`] (regions, GPA/UVA translation) and [`Segs`] (the buffers of a popped
//!   chain, with safe gather/scatter). The only code that dereferences guest pointers.
//! - [`split`]: [`SplitDevice`] and [`SplitDriver`]; [`packed`]: [`PackedDevice`] and
//!   [`PackedDriver`]; [`DeviceQueue`] and [`DriverQueue`] dispatch to either (per burst).
//! - [`log`]: [`DirtyLog`], the vhost dirty page bitmap for live migration.
//! - [`features`], [`vring`], [`net`]: feature bits, ring flags, the virtio-net header.
//!
//! # Using a device queue
//!
//! ```text
//! let mut q = DeviceQueue::new(&cfg, &mem)?;   // translates the three ring areas once
//! q.set_notification(false);                   // a poller wants no kicks
//! let n = q.avail_count().min(BURST);
//! for _ in 0..n {
//!     let Some(chain) = q.pop(&mem, &mut segs)? else { break };
//!     // segs.read(..) / segs.write(..)
//!     q.push_used(&chain, written);
//! }
//! if q.publish_used() { /* signal the call eventfd */ }
//! ```
//!
//! # Hot paths
//!
//! `avail_count`, `pop`, `push_used` and `publish_used` take no locks, make no syscalls and
//! allocate nothing; ring areas are translated at set-up, only buffer addresses are translated per
//! descriptor. One index (split) or one head-flags (packed) Release store publishes a whole burst,
//! on both sides.
//!
//! # Buffers spanning regions
//!
//! A descriptor buffer that crosses from one region into an adjacent one is split into one
//! [`Seg`] per region (the spec allows any guest-contiguous buffer). Ring areas and indirect
//! tables must lie within one region.
//!
//! # `VIRTIO_F_IN_ORDER`
//!
//! Device side: by default one used entry per chain (always valid). With
//! [`DeviceQueue::set_used_batching`], a run of chains that were used completely (every writable
//! byte written; read-only chains always are) is returned with one used entry, the one of the
//! run's last chain, as the spec allows: split rings write it at the run's first used slot and
//! advance `used.idx` by the run's length; packed rings write one used descriptor at the run's
//! first slot and skip the run's descriptors.
//!
//! Driver side: the driver queues resolve such batches (see [`SplitDriver`] and
//! [`PackedDriver`]): `reap` returns every chain in order, the implied ones with their whole
//! writable length; split drivers also hand descriptors out sequentially, as the spec requires
//! when IN_ORDER is negotiated.

mod chain;
pub mod error;
pub mod log;
pub mod mem;
pub mod packed;
pub mod split;

pub use error::QueueError;
pub use log::{DirtyLog, LOG_PAGE_SIZE};
pub use mem::{
    GuestMemory, GuestRegion, MAX_REGIONS, MAX_VIEW_REGIONS, SEGS_MAX, Seg, Segs, Staged,
};
pub use packed::{PackedDevice, PackedDriver};
pub use split::{SplitDevice, SplitDriver};

/// Feature bits (as `u64` masks): device-independent, virtio-net and vhost ones.
pub mod features {
    // --- device-independent ---
    /// Notify when the queue becomes empty, even with notifications suppressed (legacy).
    pub const VIRTIO_F_NOTIFY_ON_EMPTY: u64 = 1 << 24;
    /// No assumptions about the framing of headers and data (legacy).
    pub const VIRTIO_F_ANY_LAYOUT: u64 = 1 << 27;
    /// Indirect descriptor tables.
    pub const VIRTIO_F_RING_INDIRECT_DESC: u64 = 1 << 28;
    /// `used_event`/`avail_event` notification suppression.
    pub const VIRTIO_F_RING_EVENT_IDX: u64 = 1 << 29;
    /// Virtio 1.0 or later (little-endian, modern layout).
    pub const VIRTIO_F_VERSION_1: u64 = 1 << 32;
    /// The device accesses memory through an IOMMU / platform translation.
    pub const VIRTIO_F_ACCESS_PLATFORM: u64 = 1 << 33;
    /// Packed virtqueue layout.
    pub const VIRTIO_F_RING_PACKED: u64 = 1 << 34;
    /// Buffers are used in the order they were made available.
    pub const VIRTIO_F_IN_ORDER: u64 = 1 << 35;
    /// Memory accesses need platform ordering (hardware devices).
    pub const VIRTIO_F_ORDER_PLATFORM: u64 = 1 << 36;
    /// The device supports SR-IOV.
    pub const VIRTIO_F_SR_IOV: u64 = 1 << 37;
    /// The driver passes extra data in notifications.
    pub const VIRTIO_F_NOTIFICATION_DATA: u64 = 1 << 38;

    // --- virtio-net ---
    /// Device handles packets with partial checksum.
    pub const VIRTIO_NET_F_CSUM: u64 = 1 << 0;
    /// Driver handles packets with partial checksum.
    pub const VIRTIO_NET_F_GUEST_CSUM: u64 = 1 << 1;
    /// Control channel offloads reconfiguration.
    pub const VIRTIO_NET_F_CTRL_GUEST_OFFLOADS: u64 = 1 << 2;
    /// Device reports its maximum MTU.
    pub const VIRTIO_NET_F_MTU: u64 = 1 << 3;
    /// Device has a given MAC address.
    pub const VIRTIO_NET_F_MAC: u64 = 1 << 5;
    /// Driver can receive TSOv4.
    pub const VIRTIO_NET_F_GUEST_TSO4: u64 = 1 << 7;
    /// Driver can receive TSOv6.
    pub const VIRTIO_NET_F_GUEST_TSO6: u64 = 1 << 8;
    /// Driver can receive TSO with ECN.
    pub const VIRTIO_NET_F_GUEST_ECN: u64 = 1 << 9;
    /// Driver can receive UFO.
    pub const VIRTIO_NET_F_GUEST_UFO: u64 = 1 << 10;
    /// Device can receive TSOv4.
    pub const VIRTIO_NET_F_HOST_TSO4: u64 = 1 << 11;
    /// Device can receive TSOv6.
    pub const VIRTIO_NET_F_HOST_TSO6: u64 = 1 << 12;
    /// Device can receive TSO with ECN.
    pub const VIRTIO_NET_F_HOST_ECN: u64 = 1 << 13;
    /// Device can receive UFO.
    pub const VIRTIO_NET_F_HOST_UFO: u64 = 1 << 14;
    /// Driver can merge receive buffers (`num_buffers`).
    pub const VIRTIO_NET_F_MRG_RXBUF: u64 = 1 << 15;
    /// Configuration status field is available.
    pub const VIRTIO_NET_F_STATUS: u64 = 1 << 16;
    /// Control channel is available.
    pub const VIRTIO_NET_F_CTRL_VQ: u64 = 1 << 17;
    /// Control channel RX mode support.
    pub const VIRTIO_NET_F_CTRL_RX: u64 = 1 << 18;
    /// Control channel VLAN filtering.
    pub const VIRTIO_NET_F_CTRL_VLAN: u64 = 1 << 19;
    /// Driver can send gratuitous packets.
    pub const VIRTIO_NET_F_GUEST_ANNOUNCE: u64 = 1 << 21;
    /// Multiqueue with automatic receive steering.
    pub const VIRTIO_NET_F_MQ: u64 = 1 << 22;
    /// Set MAC address through the control channel.
    pub const VIRTIO_NET_F_CTRL_MAC_ADDR: u64 = 1 << 23;

    // --- vhost ---
    /// vhost: dirty page logging is supported (live migration).
    pub const VHOST_F_LOG_ALL: u64 = 1 << 26;
    /// vhost-user: protocol feature negotiation is supported.
    pub const VHOST_USER_F_PROTOCOL_FEATURES: u64 = 1 << 30;

    // --- short aliases (same values) ---
    /// = [`VIRTIO_F_NOTIFY_ON_EMPTY`].
    pub const NOTIFY_ON_EMPTY: u64 = VIRTIO_F_NOTIFY_ON_EMPTY;
    /// = [`VIRTIO_F_ANY_LAYOUT`].
    pub const ANY_LAYOUT: u64 = VIRTIO_F_ANY_LAYOUT;
    /// = [`VIRTIO_F_RING_INDIRECT_DESC`].
    pub const RING_INDIRECT_DESC: u64 = VIRTIO_F_RING_INDIRECT_DESC;
    /// = [`VIRTIO_F_RING_EVENT_IDX`].
    pub const RING_EVENT_IDX: u64 = VIRTIO_F_RING_EVENT_IDX;
    /// = [`VIRTIO_F_VERSION_1`].
    pub const VERSION_1: u64 = VIRTIO_F_VERSION_1;
    /// = [`VIRTIO_F_ACCESS_PLATFORM`].
    pub const ACCESS_PLATFORM: u64 = VIRTIO_F_ACCESS_PLATFORM;
    /// = [`VIRTIO_F_RING_PACKED`].
    pub const RING_PACKED: u64 = VIRTIO_F_RING_PACKED;
    /// = [`VIRTIO_F_IN_ORDER`].
    pub const IN_ORDER: u64 = VIRTIO_F_IN_ORDER;
    /// = [`VIRTIO_F_ORDER_PLATFORM`].
    pub const ORDER_PLATFORM: u64 = VIRTIO_F_ORDER_PLATFORM;
    /// = [`VIRTIO_F_SR_IOV`].
    pub const SR_IOV: u64 = VIRTIO_F_SR_IOV;
    /// = [`VIRTIO_F_NOTIFICATION_DATA`].
    pub const NOTIFICATION_DATA: u64 = VIRTIO_F_NOTIFICATION_DATA;
    /// = [`VIRTIO_NET_F_CSUM`].
    pub const NET_CSUM: u64 = VIRTIO_NET_F_CSUM;
    /// = [`VIRTIO_NET_F_GUEST_CSUM`].
    pub const NET_GUEST_CSUM: u64 = VIRTIO_NET_F_GUEST_CSUM;
    /// = [`VIRTIO_NET_F_CTRL_GUEST_OFFLOADS`].
    pub const NET_CTRL_GUEST_OFFLOADS: u64 = VIRTIO_NET_F_CTRL_GUEST_OFFLOADS;
    /// = [`VIRTIO_NET_F_MTU`].
    pub const NET_MTU: u64 = VIRTIO_NET_F_MTU;
    /// = [`VIRTIO_NET_F_MAC`].
    pub const NET_MAC: u64 = VIRTIO_NET_F_MAC;
    /// = [`VIRTIO_NET_F_GUEST_TSO4`].
    pub const NET_GUEST_TSO4: u64 = VIRTIO_NET_F_GUEST_TSO4;
    /// = [`VIRTIO_NET_F_GUEST_TSO6`].
    pub const NET_GUEST_TSO6: u64 = VIRTIO_NET_F_GUEST_TSO6;
    /// = [`VIRTIO_NET_F_GUEST_ECN`].
    pub const NET_GUEST_ECN: u64 = VIRTIO_NET_F_GUEST_ECN;
    /// = [`VIRTIO_NET_F_GUEST_UFO`].
    pub const NET_GUEST_UFO: u64 = VIRTIO_NET_F_GUEST_UFO;
    /// = [`VIRTIO_NET_F_HOST_TSO4`].
    pub const NET_HOST_TSO4: u64 = VIRTIO_NET_F_HOST_TSO4;
    /// = [`VIRTIO_NET_F_HOST_TSO6`].
    pub const NET_HOST_TSO6: u64 = VIRTIO_NET_F_HOST_TSO6;
    /// = [`VIRTIO_NET_F_HOST_ECN`].
    pub const NET_HOST_ECN: u64 = VIRTIO_NET_F_HOST_ECN;
    /// = [`VIRTIO_NET_F_HOST_UFO`].
    pub const NET_HOST_UFO: u64 = VIRTIO_NET_F_HOST_UFO;
    /// = [`VIRTIO_NET_F_MRG_RXBUF`].
    pub const NET_MRG_RXBUF: u64 = VIRTIO_NET_F_MRG_RXBUF;
    /// = [`VIRTIO_NET_F_STATUS`].
    pub const NET_STATUS: u64 = VIRTIO_NET_F_STATUS;
    /// = [`VIRTIO_NET_F_CTRL_VQ`].
    pub const NET_CTRL_VQ: u64 = VIRTIO_NET_F_CTRL_VQ;
    /// = [`VIRTIO_NET_F_CTRL_RX`].
    pub const NET_CTRL_RX: u64 = VIRTIO_NET_F_CTRL_RX;
    /// = [`VIRTIO_NET_F_CTRL_VLAN`].
    pub const NET_CTRL_VLAN: u64 = VIRTIO_NET_F_CTRL_VLAN;
    /// = [`VIRTIO_NET_F_GUEST_ANNOUNCE`].
    pub const NET_GUEST_ANNOUNCE: u64 = VIRTIO_NET_F_GUEST_ANNOUNCE;
    /// = [`VIRTIO_NET_F_MQ`].
    pub const NET_MQ: u64 = VIRTIO_NET_F_MQ;
    /// = [`VIRTIO_NET_F_CTRL_MAC_ADDR`].
    pub const NET_CTRL_MAC_ADDR: u64 = VIRTIO_NET_F_CTRL_MAC_ADDR;
}

/// Ring flag values from the specification.
pub mod vring {
    /// Descriptor: the buffer continues in the `next` descriptor.
    pub const VIRTQ_DESC_F_NEXT: u16 = 1;
    /// Descriptor: the buffer is device-writable.
    pub const VIRTQ_DESC_F_WRITE: u16 = 2;
    /// Descriptor: the buffer is an indirect descriptor table.
    pub const VIRTQ_DESC_F_INDIRECT: u16 = 4;
    /// Packed descriptor: available flag.
    pub const VIRTQ_DESC_F_AVAIL: u16 = 1 << 7;
    /// Packed descriptor: used flag.
    pub const VIRTQ_DESC_F_USED: u16 = 1 << 15;
    /// Split avail ring flags: the driver wants no used-buffer notifications.
    pub const VIRTQ_AVAIL_F_NO_INTERRUPT: u16 = 1;
    /// Split used ring flags: the device wants no available-buffer notifications.
    pub const VIRTQ_USED_F_NO_NOTIFY: u16 = 1;
    /// Packed event suppression: notifications enabled.
    pub const RING_EVENT_FLAGS_ENABLE: u16 = 0;
    /// Packed event suppression: notifications disabled.
    pub const RING_EVENT_FLAGS_DISABLE: u16 = 1;
    /// Packed event suppression: notify at the descriptor named by `off_wrap` (EVENT_IDX).
    pub const RING_EVENT_FLAGS_DESC: u16 = 2;
    /// Largest queue size of either format.
    pub const MAX_QUEUE_SIZE: u16 = 32768;
}

/// The virtio-net header.
pub mod net {
    use super::features::{VIRTIO_F_VERSION_1, VIRTIO_NET_F_MRG_RXBUF};

    /// `flags`: `csum_start`/`csum_offset` are valid; the checksum must be completed.
    pub const VIRTIO_NET_HDR_F_NEEDS_CSUM: u8 = 1;
    /// `flags`: the checksum was validated.
    pub const VIRTIO_NET_HDR_F_DATA_VALID: u8 = 2;
    /// `flags`: RSC information is in `csum_start`/`csum_offset`.
    pub const VIRTIO_NET_HDR_F_RSC_INFO: u8 = 4;
    /// `gso_type`: not a GSO packet.
    pub const VIRTIO_NET_HDR_GSO_NONE: u8 = 0;
    /// `gso_type`: TCPv4 segmentation.
    pub const VIRTIO_NET_HDR_GSO_TCPV4: u8 = 1;
    /// `gso_type`: UDP fragmentation (UFO).
    pub const VIRTIO_NET_HDR_GSO_UDP: u8 = 3;
    /// `gso_type`: TCPv6 segmentation.
    pub const VIRTIO_NET_HDR_GSO_TCPV6: u8 = 4;
    /// `gso_type`: UDP segmentation (USO).
    pub const VIRTIO_NET_HDR_GSO_UDP_L4: u8 = 5;
    /// `gso_type` bit: ECN (CWR) is set.
    pub const VIRTIO_NET_HDR_GSO_ECN: u8 = 0x80;

    /// The virtio-net header in front of every packet (12 bytes; the last field exists only
    /// with `VIRTIO_NET_F_MRG_RXBUF` or `VIRTIO_F_VERSION_1`, see [`hdr_len`]). Little-endian on
    /// the wire: use [`VirtioNetHdr::to_bytes`]/[`VirtioNetHdr::from_bytes`].
    #[repr(C)]
    #[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
    pub struct VirtioNetHdr {
        /// `VIRTIO_NET_HDR_F_*`.
        pub flags: u8,
        /// `VIRTIO_NET_HDR_GSO_*`.
        pub gso_type: u8,
        /// Length of the headers to replicate per segment.
        pub hdr_len: u16,
        /// Segment payload size.
        pub gso_size: u16,
        /// Where checksumming starts.
        pub csum_start: u16,
        /// Where the checksum goes, from `csum_start`.
        pub csum_offset: u16,
        /// Number of merged receive buffers.
        pub num_buffers: u16,
    }

    const _: () = assert!(std::mem::size_of::<VirtioNetHdr>() == 12);

    /// Header length for the negotiated features: 12 with `MRG_RXBUF` or `VERSION_1`, else 10.
    #[inline(always)]
    pub fn hdr_len(features: u64) -> usize {
        if features & (VIRTIO_NET_F_MRG_RXBUF | VIRTIO_F_VERSION_1) != 0 {
            12
        } else {
            10
        }
    }

    /// Clears a header in a buffer the other side will read, writing only when it is not clear
    /// already. A recycled transmit buffer's header usually is (nothing sets its fields), and
    /// a store would take the line back from the other core, which has just read it.
    #[inline(always)]
    pub fn clear_hdr(hdr: &mut [u8]) {
        if hdr.iter().any(|&b| b != 0) {
            hdr.fill(0);
        }
    }

    impl VirtioNetHdr {
        /// The 12 wire bytes (take the first [`hdr_len`] of them).
        pub fn to_bytes(&self) -> [u8; 12] {
            let mut b = [0u8; 12];
            b[0] = self.flags;
            b[1] = self.gso_type;
            b[2..4].copy_from_slice(&self.hdr_len.to_le_bytes());
            b[4..6].copy_from_slice(&self.gso_size.to_le_bytes());
            b[6..8].copy_from_slice(&self.csum_start.to_le_bytes());
            b[8..10].copy_from_slice(&self.csum_offset.to_le_bytes());
            b[10..12].copy_from_slice(&self.num_buffers.to_le_bytes());
            b
        }

        /// Parses 10 or 12 wire bytes (`num_buffers` is 0 with 10); `None` if shorter than 10.
        pub fn from_bytes(b: &[u8]) -> Option<VirtioNetHdr> {
            if b.len() < 10 {
                return None;
            }
            let u = |i: usize| u16::from_le_bytes([b[i], b[i + 1]]);
            Some(VirtioNetHdr {
                flags: b[0],
                gso_type: b[1],
                hdr_len: u(2),
                gso_size: u(4),
                csum_start: u(6),
                csum_offset: u(8),
                num_buffers: if b.len() >= 12 { u(10) } else { 0 },
            })
        }
    }
}

pub use net::VirtioNetHdr;

use features::{VIRTIO_F_RING_EVENT_IDX, VIRTIO_F_RING_PACKED};

/// How the ring addresses of a [`QueueConfig`] are expressed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum AddrKind {
    /// Guest physical addresses (virtio-pci, vhost-vdpa, device models).
    #[default]
    Gpa,
    /// The front end's own virtual addresses (vhost-user `SET_VRING_ADDR`).
    Uva,
}

/// Where a virtqueue lives and what was negotiated for it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct QueueConfig {
    /// Queue size: a power of two in 1..=32768 for split rings, any of 1..=32768 for packed.
    pub size: u16,
    /// Descriptor table (both formats).
    pub desc: u64,
    /// Split: avail ring; packed: driver event suppression area.
    pub avail: u64,
    /// Split: used ring; packed: device event suppression area.
    pub used: u64,
    /// Whether the three addresses are GPAs or front-end virtual addresses.
    pub addr_kind: AddrKind,
    /// Negotiated features (`VIRTIO_F_RING_PACKED` picks the format, `RING_EVENT_IDX`,
    /// `RING_INDIRECT_DESC` and `NOTIFY_ON_EMPTY` change behaviour).
    pub features: u64,
}

impl QueueConfig {
    /// Whether the packed format was negotiated.
    pub fn is_packed(&self) -> bool {
        self.features & VIRTIO_F_RING_PACKED != 0
    }

    /// Whether `VIRTIO_F_RING_EVENT_IDX` was negotiated.
    pub fn event_idx(&self) -> bool {
        self.features & VIRTIO_F_RING_EVENT_IDX != 0
    }

    /// A configuration whose rings are carved from one block at `base` with [`ring_layout`].
    pub fn at(base: u64, size: u16, features: u64) -> QueueConfig {
        let l = ring_layout(
            size,
            features & VIRTIO_F_RING_PACKED != 0,
            features & VIRTIO_F_RING_EVENT_IDX != 0,
        );
        QueueConfig {
            size,
            desc: base + l.desc,
            avail: base + l.avail,
            used: base + l.used,
            addr_kind: AddrKind::Gpa,
            features,
        }
    }
}

/// Offsets of the three ring areas in one block, with the alignments the spec requires
/// (split: descriptors 16, avail 2, used 4; packed: descriptors 16, event areas 4).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RingLayout {
    /// Descriptor table offset (0).
    pub desc: u64,
    /// Avail ring / driver area offset.
    pub avail: u64,
    /// Used ring / device area offset.
    pub used: u64,
    /// Bytes of the whole block.
    pub total: u64,
}

/// Byte sizes of (descriptor table, avail ring / driver area, used ring / device area).
pub fn ring_sizes(size: u16, packed: bool, event_idx: bool) -> (u64, u64, u64) {
    let n = u64::from(size);
    if packed {
        (16 * n, 4, 4)
    } else {
        let ev = if event_idx { 2 } else { 0 };
        (16 * n, 4 + 2 * n + ev, 4 + 8 * n + ev)
    }
}

/// How to carve a queue's rings out of one block (the block itself must be 16-byte aligned).
pub fn ring_layout(size: u16, packed: bool, event_idx: bool) -> RingLayout {
    let (d, a, u) = ring_sizes(size, packed, event_idx);
    let avail = d.next_multiple_of(if packed { 4 } else { 2 });
    let used = (avail + a).next_multiple_of(4);
    RingLayout {
        desc: 0,
        avail,
        used,
        total: used + u,
    }
}

/// One chain popped by a device.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Chain {
    /// Split: the head descriptor index; packed: the buffer id. What `push_used` reports back.
    pub id: u16,
    /// Ring descriptors the chain occupied (an indirect table counts as one); packed rings
    /// advance their used position by this much.
    pub descs: u16,
    /// Total device-readable bytes.
    pub readable: u32,
    /// Total device-writable bytes.
    pub writable: u32,
}

/// `true` if `event` is in `[old, new)` (mod 2^16): the spec's `vring_need_event`.
#[inline(always)]
pub(crate) fn need_event(event: u16, new: u16, old: u16) -> bool {
    new.wrapping_sub(event).wrapping_sub(1) < new.wrapping_sub(old)
}

/// A device-side virtqueue of either format.
#[derive(Debug)]
pub enum DeviceQueue {
    /// Split ring.
    Split(SplitDevice),
    /// Packed ring.
    Packed(PackedDevice),
}

macro_rules! dispatch {
    ($self:ident, $q:ident => $e:expr) => {
        match $self {
            Self::Split($q) => $e,
            Self::Packed($q) => $e,
        }
    };
}

impl DeviceQueue {
    /// Sets up a queue of the format `cfg.features` selects; see [`SplitDevice::new`] and
    /// [`PackedDevice::new`].
    pub fn new(cfg: &QueueConfig, mem: &GuestMemory) -> Result<DeviceQueue, QueueError> {
        Ok(if cfg.is_packed() {
            DeviceQueue::Packed(PackedDevice::new(cfg, mem)?)
        } else {
            DeviceQueue::Split(SplitDevice::new(cfg, mem)?)
        })
    }

    /// Queue size.
    #[inline]
    pub fn size(&self) -> u16 {
        dispatch!(self, q => q.size())
    }

    /// Whether this is a packed ring.
    #[inline]
    pub fn is_packed(&self) -> bool {
        matches!(self, DeviceQueue::Packed(_))
    }

    /// Negotiated features.
    #[inline]
    pub fn features(&self) -> u64 {
        dispatch!(self, q => q.features())
    }

    /// Restores the ring position (vhost `SET_VRING_BASE`; packed: bit 15 = wrap counter). The
    /// used position follows the same value.
    #[inline]
    pub fn set_last_avail(&mut self, value: u16) -> Result<(), QueueError> {
        dispatch!(self, q => q.set_last_avail(value))
    }

    /// The ring position (vhost `GET_VRING_BASE`; packed: bit 15 = wrap counter).
    #[inline]
    pub fn last_avail(&self) -> u16 {
        dispatch!(self, q => q.last_avail())
    }

    /// Chains available now (split: exact; packed: complete chains, up to a cap).
    #[inline]
    pub fn avail_count(&mut self) -> u16 {
        dispatch!(self, q => q.avail_count())
    }

    /// Available chains, counting at most `max` (packed: scans no further).
    #[inline]
    pub fn avail_up_to(&mut self, max: u16) -> u16 {
        dispatch!(self, q => q.avail_up_to(max))
    }

    /// Pops the next available chain into `segs`; see [`SplitDevice::pop`].
    #[inline]
    pub fn pop(&mut self, mem: &GuestMemory, segs: &mut Segs) -> Result<Option<Chain>, QueueError> {
        dispatch!(self, q => q.pop(mem, segs))
    }

    /// Asks for the cache lines the next `n` pops start from (packed: descriptor slots; split:
    /// avail ring entries, and the head descriptors of published ones). A hint: nothing is
    /// consumed.
    #[inline]
    pub fn prefetch_ahead(&mut self, n: u16) {
        dispatch!(self, q => q.prefetch_ahead(n))
    }

    /// Gives back the most recently popped chain (it will be popped again).
    #[inline]
    pub fn rewind(&mut self, chain: &Chain) {
        dispatch!(self, q => q.rewind(chain))
    }

    /// Stages a used entry for `chain` with `written` bytes written.
    #[inline]
    pub fn push_used(&mut self, chain: &Chain, written: u32) {
        dispatch!(self, q => q.push_used(chain, written))
    }

    /// Publishes the staged used entries; returns whether the driver must be notified.
    #[inline]
    pub fn publish_used(&mut self) -> bool {
        dispatch!(self, q => q.publish_used())
    }

    /// Tells the driver whether the device wants available-buffer notifications (kicks).
    #[inline]
    pub fn set_notification(&mut self, enable: bool) {
        dispatch!(self, q => q.set_notification(enable))
    }

    /// Turns dirty logging of ring writes on (`Some((log, used ring / device area GPA))`) or off.
    pub fn set_log(&mut self, log: Option<(DirtyLog, u64)>) {
        dispatch!(self, q => q.set_log(log))
    }

    /// With IN_ORDER negotiated, returns runs of completely used chains with one used entry;
    /// see [`SplitDevice::set_used_batching`] and [`PackedDevice::set_used_batching`].
    pub fn set_used_batching(&mut self, on: bool) {
        dispatch!(self, q => q.set_used_batching(on))
    }

    /// Whether the owner marked the queue broken.
    #[inline]
    pub fn is_broken(&self) -> bool {
        dispatch!(self, q => q.is_broken())
    }

    /// Marks the queue broken: `pop` fails with [`QueueError::Broken`] from now on.
    pub fn set_broken(&mut self) {
        dispatch!(self, q => q.set_broken())
    }
}

/// A driver-side virtqueue of either format.
#[derive(Debug)]
pub enum DriverQueue {
    /// Split ring.
    Split(SplitDriver),
    /// Packed ring.
    Packed(PackedDriver),
}

impl DriverQueue {
    /// Sets up (and zeroes) the rings of the format `cfg.features` selects.
    pub fn new(cfg: &QueueConfig, mem: &GuestMemory) -> Result<DriverQueue, QueueError> {
        Ok(if cfg.is_packed() {
            DriverQueue::Packed(PackedDriver::new(cfg, mem)?)
        } else {
            DriverQueue::Split(SplitDriver::new(cfg, mem)?)
        })
    }

    /// Queue size.
    #[inline]
    pub fn size(&self) -> u16 {
        dispatch!(self, q => q.size())
    }

    /// Free descriptors.
    #[inline]
    pub fn free_count(&self) -> u16 {
        dispatch!(self, q => q.free_count())
    }

    /// Posts one chain of `(gpa, len, device_writable)` buffers; returns its id.
    #[inline]
    pub fn add(&mut self, bufs: &[(u64, u32, bool)]) -> Result<u16, QueueError> {
        dispatch!(self, q => q.add(bufs))
    }

    /// Posts one chain through an indirect table written at `table_gpa` (16 bytes per buffer).
    pub fn add_indirect(
        &mut self,
        mem: &GuestMemory,
        bufs: &[(u64, u32, bool)],
        table_gpa: u64,
    ) -> Result<u16, QueueError> {
        dispatch!(self, q => q.add_indirect(mem, bufs, table_gpa))
    }

    /// Makes the added chains visible; returns whether the device wants a kick.
    #[inline]
    pub fn publish_avail(&mut self) -> bool {
        dispatch!(self, q => q.publish_avail())
    }

    /// Takes the next used entry: `(id, written length)`.
    #[inline]
    pub fn reap(&mut self) -> Result<Option<(u16, u32)>, QueueError> {
        dispatch!(self, q => q.reap())
    }

    /// Tells the device whether the driver wants used-buffer notifications (interrupts).
    #[inline]
    pub fn set_interrupts(&mut self, enable: bool) {
        dispatch!(self, q => q.set_interrupts(enable))
    }

    /// Chains completed by a later chain's used entry (IN_ORDER batches), not by their own.
    #[inline]
    pub fn implied(&self) -> u64 {
        dispatch!(self, q => q.implied())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn need_event_is_a_window_test() {
        assert!(need_event(0, 1, 0));
        assert!(!need_event(1, 1, 0));
        assert!(need_event(5, 8, 4));
        assert!(!need_event(8, 8, 4));
        assert!(!need_event(3, 8, 4));
        // Across the 16-bit wrap.
        assert!(need_event(0xfffe, 2, 0xfff0));
        assert!(need_event(1, 2, 0xfff0));
        assert!(!need_event(2, 2, 0xfff0));
        assert!(!need_event(0xffef, 2, 0xfff0));
        // Nothing published.
        assert!(!need_event(7, 7, 7));
    }
}

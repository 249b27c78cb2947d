//! The vDPA device contract: what a PMD implements so a VM's virtqueues can be handed to its
//! virtqueue engine, and the binding that drives it from a vhost-user socket.
//!
//! This is vdpakit's split between DPDK's `vdpa_driver.h` (the driver SDK, here the
//! [`VdpaDevice`] trait) and `rte_vdpa.h` (the public API: devices by name,
//! stats, and the binding to a socket in [`binding`]).
//!
//! Ownership: a PMD owns its device (registers, DMA domain, interrupt wiring). The binding owns
//! the vhost-user side (memory table, vring addresses, kick and call fds). On "virtio ready" it
//! DMA-maps guest memory into the device's domain at IOVA = GPA and calls
//! [`VdpaDevice::configure`] with every ring's addresses and positions and the guest's call
//! eventfds, which the PMD wires to the device's MSI-X vectors: interrupts reach the guest without
//! vdpakit in the path. Kicks reach the device either by a host notifier (QEMU maps the doorbell
//! page from [`VdpaDevice::notify_area`]) or by the binding's relay thread writing the
//! [`Doorbell`] from [`VdpaDevice::doorbell`].

pub mod binding;
pub mod relay;

use std::os::fd::OwnedFd;
use std::sync::Arc;

use crate::pci::{DmaDomain, Doorbell, NotifyArea, PciError};

/// Device class.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceType {
    /// virtio-net.
    Net,
}

/// The virtio-net config space a device reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NetDevConfig {
    /// MAC address.
    pub mac: [u8; 6],
    /// Link status (bit 0: up).
    pub status: u16,
    /// Queue pairs the device has.
    pub max_queue_pairs: u16,
    /// MTU.
    pub mtu: u16,
}

impl NetDevConfig {
    /// The virtio-net config space bytes (mac, status, max_virtqueue_pairs, mtu).
    pub fn to_bytes(&self) -> [u8; 12] {
        let mut b = [0u8; 12];
        b[..6].copy_from_slice(&self.mac);
        b[6..8].copy_from_slice(&self.status.to_le_bytes());
        b[8..10].copy_from_slice(&self.max_queue_pairs.to_le_bytes());
        b[10..12].copy_from_slice(&self.mtu.to_le_bytes());
        b
    }
}

/// One virtqueue as the binding hands it to the device. Addresses are IOVAs in the device's
/// domain (= guest physical addresses: the binding maps guest memory at IOVA = GPA).
#[derive(Debug, Clone)]
pub struct VqConfig {
    /// Queue index (even: guest receive, odd: guest transmit).
    pub index: u16,
    /// Ring size.
    pub size: u16,
    /// Descriptor area.
    pub desc: u64,
    /// Driver area (split: avail ring; packed: driver event suppression).
    pub driver: u64,
    /// Device area (split: used ring; packed: device event suppression).
    pub device: u64,
    /// Next available index the device reads (packed: bit 15 = avail wrap counter).
    pub avail_idx: u16,
    /// Next used index the device writes (packed: bit 15 = used wrap counter).
    pub used_idx: u16,
    /// The eventfd that interrupts the guest (None: polled, no interrupts).
    pub call: Option<Arc<OwnedFd>>,
    /// Whether the ring is enabled.
    pub enabled: bool,
}

/// Where the device logs dirty pages: QEMU's bitmap, DMA-mapped in the device's domain at
/// `iova` (1 bit per 4 KiB page of guest physical memory, `size` bytes).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LogConfig {
    /// IOVA of the bitmap.
    pub iova: u64,
    /// Bitmap size in bytes.
    pub size: u64,
}

/// Everything [`VdpaDevice::configure`] needs.
#[derive(Debug, Clone)]
pub struct DevConf {
    /// Negotiated virtio features.
    pub features: u64,
    /// The rings, in queue order.
    pub queues: Vec<VqConfig>,
    /// Dirty-page logging, when live migration is on and the device logs in hardware.
    pub log: Option<LogConfig>,
    /// MTU the front end set (NET_SET_MTU), if any.
    pub mtu: Option<u16>,
}

/// A ring's position read back from the device (GET_VRING_BASE, migration).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VqState {
    /// Next available index the device would read (packed: bit 15 = wrap counter).
    pub avail_idx: u16,
    /// Next used index the device would write (packed: bit 15 = wrap counter).
    pub used_idx: u16,
}

/// How a device can log dirty pages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogSupport {
    /// Into the front end's bitmap by DMA ([`DevConf::log`]).
    Hardware,
    /// Not at all: the binding relays used rings in software while logging is on.
    None,
}

/// Per-queue counters a device reports (missing counters are 0).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct VqStats {
    /// Packets (chains) completed.
    pub packets: u64,
    /// Bytes moved.
    pub bytes: u64,
    /// Descriptor or DMA errors.
    pub errors: u64,
    /// Frames dropped by the device (receive: no buffer posted; transmit: wire refused).
    pub dropped: u64,
    /// IOMMU faults (DMA outside the mapped IOVA ranges).
    pub iommu_faults: u64,
    /// Doorbells received.
    pub kicks: u64,
    /// Interrupts raised.
    pub interrupts: u64,
}

/// Errors of the vDPA layer.
#[derive(Debug, thiserror::Error)]
pub enum VdpaError {
    /// The device does not do what was asked.
    #[error("{dev}: {what} is not supported by this device")]
    Unsupported {
        /// Device.
        dev: String,
        /// The operation.
        what: String,
    },
    /// A queue index out of range.
    #[error("{dev}: queue {qid} does not exist (the device has {count})")]
    BadQueue {
        /// Device.
        dev: String,
        /// Asked for.
        qid: u16,
        /// Queues the device has.
        count: u16,
    },
    /// A configuration the device refused, naming the value.
    #[error("{dev}: {what}")]
    Config {
        /// Device.
        dev: String,
        /// What was wrong.
        what: String,
    },
    /// The device reported an error (status, timeout, firmware syndrome...).
    #[error("{dev}: device error: {what}")]
    Device {
        /// Device.
        dev: String,
        /// What the device said.
        what: String,
    },
    /// The PCI layer failed.
    #[error(transparent)]
    Pci(#[from] PciError),
    /// No device of that name.
    #[error("no vDPA device '{name}': available are {available}")]
    NoDevice {
        /// Asked for.
        name: String,
        /// What exists.
        available: String,
    },
}

/// What a PMD implements (DPDK's `rte_vdpa_dev_ops`, Linux's `vdpa_config_ops`).
///
/// Called from one control thread at a time (the binding holds the device in a lock); the data
/// path runs in the device. Mandatory: everything without a default.
pub trait VdpaDevice: Send + std::fmt::Debug {
    /// Device name (the PCI address, or `sim0-vf1` for a model).
    fn name(&self) -> &str;
    /// Device class.
    fn device_type(&self) -> DeviceType {
        DeviceType::Net
    }
    /// Queue pairs the device offers.
    fn max_queue_pairs(&self) -> u16;
    /// Largest ring size the device accepts.
    fn max_queue_size(&self) -> u16;
    /// virtio feature bits the device offers (VHOST_F_LOG_ALL included when it can take part in
    /// live migration, in hardware or through the software relay).
    fn features(&self) -> u64;
    /// vhost-user protocol features the device can support (ANDed with the socket's).
    fn protocol_features(&self) -> u64;
    /// The config space.
    fn net_config(&self) -> NetDevConfig;
    /// The DMA domain the binding maps guest memory into.
    fn domain(&self) -> &DmaDomain;
    /// How the device logs dirty pages.
    fn log_support(&self) -> LogSupport {
        LogSupport::None
    }
    /// Programs every ring and starts the device (DPDK's `dev_conf`).
    fn configure(&mut self, conf: &DevConf) -> Result<(), VdpaError>;
    /// A ring was enabled or disabled after configure.
    fn set_vring_state(&mut self, qid: u16, enable: bool) -> Result<(), VdpaError>;
    /// Features changed while running: only VHOST_F_LOG_ALL may toggle; `log` is where to log.
    fn set_features(&mut self, features: u64, log: Option<LogConfig>) -> Result<(), VdpaError>;
    /// Reads ring `qid`'s position (the device must be stopped or suspended for it to be final).
    fn vring_state(&mut self, qid: u16) -> Result<VqState, VdpaError>;
    /// Stops the device and forgets the configuration (DPDK's `dev_close`).
    fn close(&mut self) -> Result<(), VdpaError>;
    /// The doorbell for queue `qid` (the kick relay writes it).
    fn doorbell(&self, qid: u16) -> Result<(Doorbell, u32), VdpaError>;
    /// A page QEMU can map as queue `qid`'s notification area (host notifier), if any.
    fn notify_area(&self, _qid: u16) -> Option<NotifyArea> {
        None
    }
    /// Counters of queue `qid`.
    fn stats(&self, qid: u16) -> Result<VqStats, VdpaError>;
    /// Stops processing without losing state (`resume` continues).
    fn suspend(&mut self) -> Result<(), VdpaError> {
        Err(VdpaError::Unsupported {
            dev: self.name().to_string(),
            what: "suspend".into(),
        })
    }
    /// Continues after [`VdpaDevice::suspend`].
    fn resume(&mut self) -> Result<(), VdpaError> {
        Err(VdpaError::Unsupported {
            dev: self.name().to_string(),
            what: "resume".into(),
        })
    }
}

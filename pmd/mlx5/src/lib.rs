//! vdpakit PMD for NVIDIA mlx5 vDPA functions (ConnectX-6 Dx/Lx, ConnectX-7, BlueField-2/3), and
//! a command-accurate model of one.
//!
//! mlx5 functions have no virtio registers: virtio queues are firmware objects (VIRTIO_NET_Q)
//! created through the command queue, reaching guest memory through memory keys, fed by a
//! doorbell page, with received frames steered by a flow table. The driver is built from the
//! facts in `../shared/reference/kernel-vdpa-mlx5-pds.md` (part A) and owns no `unsafe`: BAR
//! registers go through `core::pci`'s checked accessors, its DMA memory through `GuestMemory`
//! copies.
//!
//! - [`prm`]: the driver's layout definitions (init segment, command slot and mailboxes, opcodes,
//!   statuses, every command field it uses).
//! - [`cmd`]: the command queue (slots, mailbox chains, ownership bit, polled completion).
//! - [`hca`]: function bring-up, capabilities, health, teardown.
//! - [`dma`]: driver memory mapped in the DMA domain.
//! - [`res`], [`virtq`], [`steer`]: resources, virtio queue objects, receive steering.
//! - [`event`]: the QP event mode (EQ, per-queue CQ and QPs, the event thread).
//! - [`vdpa`]: the `VdpaDevice` implementation and the `mlx5:...` device specs.
//! - [`port`]: the `vdpakit fwd` port kind `mlx5` (vdpakit as the NIC's driver, polled).
//! - [`model`]: the device model, with its own definitions.

#![warn(missing_docs)]

pub mod cmd;
pub mod dma;
pub mod error;
pub mod event;
pub mod hca;
pub mod model;
pub mod port;
pub mod prm;
pub mod res;
pub mod steer;
pub mod vdpa;
pub mod virtq;

pub use error::{Error, Result};
pub use hca::{Caps, Hca, HcaOptions};
pub use port::PORT_KIND;
pub use vdpa::{Devargs, EventMode, Mlx5Vdpa, create};

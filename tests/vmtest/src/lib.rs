//! Guest test harness: boots a real QEMU with a real Linux guest from an
//! integration test and hands back what the guest reported.
//!
//! The pieces:
//! - [`artifacts()`] prepares (once per machine, cached under
//!   `<workspace>/target/vmtest/`) a Debian 6.12 kernel with its modules and a
//!   busybox for the guest.
//! - [`Guest::builder()`] describes one guest: memory, devices (vhost-user,
//!   virtio-net-pci, intel-iommu, socket/stream/dgram netdevs), kernel modules,
//!   host binaries to copy in, and the shell script the guest runs as its test.
//! - [`GuestBuilder::run`] boots it under KVM when KVM really works and under
//!   TCG otherwise, captures the serial console and parses the guest's
//!   `VMTEST key=value` marker lines into [`GuestRun::markers`].
//! - [`Testpmd`] runs DPDK's `dpdk-testpmd` as a host-side vhost-user peer.
//! - [`Error::skip_reason`] tells a missing prerequisite (a test to report as
//!   skipped) from a real failure.
//!
//! See `docs/TESTING.md` for how to write and run a guest test.

mod accel;
mod artifacts;
mod cpio;
mod error;
mod guest;
mod host;
mod kmod;

pub use accel::{Accel, accel};
pub use artifacts::{Artifacts, artifacts, cache_dir};
pub use error::Error;
pub use guest::{CONSOLE_TAIL_LINES, Guest, GuestBuilder, GuestRun, Netdev, VFIO_NIC_OPTS};
pub use host::{
    HostProcess, TempDir, Testpmd, find_program, require_program, sh_redirect, wait_for,
};

/// Result type of this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

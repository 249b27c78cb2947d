//! vdpakit PMD for Marvell Octeon DPU (octeon_ep vDPA).
//!
//! This crate is intentionally empty: the driver is built by a later issue on top of
//! `vdpakit-core`'s PCI/VFIO layer and the vDPA device contract. See `README.md`
//! beside this file for the hardware it targets and the reference facts it is built from.

//! Which PCI functions a vdpakit PMD drives, by vendor, device and subsystem IDs.
//!
//! From the reference facts (`shared/reference/kernel-vdpa-hw.md` §3–§7 and
//! `kernel-vdpa-mlx5-pds.md` A and B1). The first entry that matches wins, so specific entries
//! (IFC's subsystem IDs) come before general ones (any virtio-net).

use super::sysfs::PciFunction;

/// One row of the table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PmdMatch {
    /// Vendor ID.
    pub vendor: u16,
    /// Device ID (None: any).
    pub device: Option<u16>,
    /// Subsystem vendor and device (None: any).
    pub subsys: Option<(u16, u16)>,
    /// The PMD that drives it (`pmd/<name>`; `virtio` is a plain virtio-PCI function, which
    /// vdpakit drives through the PCI layer only for now).
    pub pmd: &'static str,
    /// What the function is.
    pub what: &'static str,
}

const fn m(
    vendor: u16,
    device: Option<u16>,
    subsys: Option<(u16, u16)>,
    pmd: &'static str,
    what: &'static str,
) -> PmdMatch {
    PmdMatch {
        vendor,
        device,
        subsys,
        pmd,
        what,
    }
}

/// The table, most specific first.
pub const PMD_TABLE: &[PmdMatch] = &[
    // Intel IFC VF (kernel-vdpa-hw §3).
    m(
        0x1af4,
        Some(0x1041),
        Some((0x8086, 0x001a)),
        "ifc",
        "Intel IFC VF virtio-net (N3000)",
    ),
    m(
        0x1af4,
        Some(0x1000),
        Some((0x8086, 0x0001)),
        "ifc",
        "Intel IFC VF virtio-net (C5000X-PL/F2000X-PL)",
    ),
    // NVIDIA/Mellanox (mlx5-pds A): the vDPA-capable devices by name, then any other.
    m(0x15b3, Some(0x101b), None, "mlx5", "ConnectX-6"),
    m(0x15b3, Some(0x101c), None, "mlx5", "ConnectX-6 VF"),
    m(0x15b3, Some(0x101d), None, "mlx5", "ConnectX-6 Dx"),
    m(0x15b3, Some(0x101e), None, "mlx5", "ConnectX family VF"),
    m(0x15b3, Some(0x101f), None, "mlx5", "ConnectX-6 Lx"),
    m(0x15b3, Some(0x1021), None, "mlx5", "ConnectX-7"),
    m(0x15b3, Some(0xa2d6), None, "mlx5", "BlueField-2"),
    m(0x15b3, Some(0xa2dc), None, "mlx5", "BlueField-3"),
    m(
        0x15b3,
        None,
        None,
        "mlx5",
        "NVIDIA/Mellanox function (vDPA needs a ConnectX-6 or later VF/SF)",
    ),
    // AMD/Pensando (mlx5-pds B1).
    m(0x1dd8, Some(0x100b), None, "pds", "Pensando vDPA VF"),
    m(
        0x1dd8,
        Some(0x100c),
        None,
        "pds",
        "Pensando PF (pds_core: admin queue for its VFs)",
    ),
    m(
        0x1dd8,
        None,
        None,
        "pds",
        "Pensando function (vDPA runs on the 0x100b VFs)",
    ),
    // Marvell Octeon (kernel-vdpa-hw §4).
    m(0x177d, Some(0xb900), None, "octeon", "Octeon CN106K PF"),
    m(0x177d, Some(0xb903), None, "octeon", "Octeon CN106K VF"),
    m(0x177d, Some(0xba00), None, "octeon", "Octeon CN105K PF"),
    m(0x177d, Some(0xba03), None, "octeon", "Octeon CN105K VF"),
    m(0x177d, Some(0xbd00), None, "octeon", "Octeon CN103K PF"),
    m(0x177d, Some(0xbd03), None, "octeon", "Octeon CN103K VF"),
    // SolidRun SolidNET (kernel-vdpa-hw §5).
    m(
        0xd063,
        Some(0x1000),
        Some((0xd063, 0x1000)),
        "snet",
        "SolidRun SolidNET DPU",
    ),
    // Plain virtio-net (kernel-vdpa-hw §0, §6, §7). Alibaba ENI has the transitional identity
    // 1af4:1000 with subsystem 1af4:0001, like QEMU's transitional virtio-net: the eni PMD drives
    // its legacy interface (a transitional function with modern capabilities also works with
    // the virtio PMD).
    m(0x1af4, Some(0x1041), None, "virtio", "virtio-net (modern)"),
    m(
        0x1af4,
        Some(0x1000),
        Some((0x1af4, 0x0001)),
        "eni",
        "Alibaba ENI / legacy virtio-net (legacy interface)",
    ),
    m(
        0x1af4,
        Some(0x1000),
        None,
        "virtio",
        "virtio-net (transitional)",
    ),
];

/// The table row for a function, if a PMD drives it.
pub fn pmd_for(
    vendor: u16,
    device: u16,
    subsys_vendor: u16,
    subsys_device: u16,
) -> Option<&'static PmdMatch> {
    PMD_TABLE.iter().find(|r| {
        r.vendor == vendor
            && r.device.is_none_or(|d| d == device)
            && r.subsys.is_none_or(|s| s == (subsys_vendor, subsys_device))
    })
}

/// [`pmd_for`] of a scanned function.
pub fn pmd_for_function(f: &PciFunction) -> Option<&'static PmdMatch> {
    pmd_for(f.vendor, f.device, f.subsys_vendor, f.subsys_device)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn specific_rows_win() {
        assert_eq!(pmd_for(0x1af4, 0x1041, 0x8086, 0x001a).unwrap().pmd, "ifc");
        assert_eq!(pmd_for(0x1af4, 0x1000, 0x8086, 0x0001).unwrap().pmd, "ifc");
        let v = pmd_for(0x1af4, 0x1041, 0x1af4, 0x1100).unwrap();
        assert_eq!((v.pmd, v.what), ("virtio", "virtio-net (modern)"));
        assert_eq!(pmd_for(0x1af4, 0x1000, 0x1af4, 0x0001).unwrap().pmd, "eni");
        assert_eq!(
            pmd_for(0x1af4, 0x1000, 0x1af4, 0x1100).unwrap().pmd,
            "virtio"
        );
        assert_eq!(pmd_for(0x15b3, 0x101d, 0, 0).unwrap().what, "ConnectX-6 Dx");
        assert_eq!(pmd_for(0x15b3, 0x1017, 0, 0).unwrap().pmd, "mlx5");
        assert_eq!(pmd_for(0x1dd8, 0x100b, 0, 0).unwrap().pmd, "pds");
        assert_eq!(pmd_for(0x177d, 0xb903, 0, 0).unwrap().pmd, "octeon");
        assert_eq!(pmd_for(0xd063, 0x1000, 0xd063, 0x1000).unwrap().pmd, "snet");
    }

    #[test]
    fn others_are_not_driven() {
        // virtio-blk, an Octeon device that is not a DPU function, an e1000, snet with the
        // wrong subsystem.
        assert!(pmd_for(0x1af4, 0x1042, 0x1af4, 0x1100).is_none());
        assert!(pmd_for(0x177d, 0xa002, 0, 0).is_none());
        assert!(pmd_for(0x8086, 0x100e, 0x8086, 0x001a).is_none());
        assert!(pmd_for(0xd063, 0x1000, 0x1af4, 0x1100).is_none());
    }
}

//! sysfs scan of PCI functions (vendor, device, subsystem, class, driver, IOMMU group, NUMA node)
//! and binding to `vfio-pci` (like `dpdk-devbind`).
//!
//! Everything reads and writes below a root directory ([`Sysfs::at`]), `/sys` on a real system
//! ([`Sysfs::system`]), so the parsing and the bind sequence are tested against a fake tree.
//!
//! What is read, per function `ROOT/bus/pci/devices/DDDD:BB:DD.F/`:
//! `vendor`, `device`, `subsystem_vendor`, `subsystem_device`, `class`, `revision` (hex text),
//! `numa_node` (decimal, -1: none), the `driver` and `iommu_group` links (their last path
//! component), `driver_override`. Group members: `ROOT/kernel/iommu_groups/N/devices/`.
//!
//! Binding writes `vfio-pci` to `driver_override`, the address to the current driver's `unbind`
//! and then to `ROOT/bus/pci/drivers_probe`; unbinding clears `driver_override`, unbinds from
//! `vfio-pci` and probes again so the kernel's default driver takes the function back.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use super::{Bdf, PciError};

/// The driver vdpakit binds functions to.
pub const VFIO_DRIVER: &str = "vfio-pci";

/// A sysfs tree: `/sys` or a test's fake one.
#[derive(Debug, Clone)]
pub struct Sysfs {
    root: PathBuf,
    modprobe: bool,
}

/// One PCI function as sysfs describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PciFunction {
    /// Address.
    pub bdf: Bdf,
    /// Vendor ID.
    pub vendor: u16,
    /// Device ID.
    pub device: u16,
    /// Subsystem vendor ID.
    pub subsys_vendor: u16,
    /// Subsystem device ID.
    pub subsys_device: u16,
    /// Class code (class << 16 | subclass << 8 | prog-if).
    pub class: u32,
    /// Revision ID.
    pub revision: u8,
    /// The bound driver, if any.
    pub driver: Option<String>,
    /// `driver_override`, if set.
    pub driver_override: Option<String>,
    /// IOMMU group, if the function has one (none: the IOMMU is off).
    pub iommu_group: Option<u32>,
    /// NUMA node, if the platform reports one.
    pub numa_node: Option<u32>,
}

impl PciFunction {
    /// `vvvv:dddd` as lspci prints it.
    pub fn ids(&self) -> String {
        format!("{:04x}:{:04x}", self.vendor, self.device)
    }

    /// `vvvv:dddd` of the subsystem.
    pub fn subsys_ids(&self) -> String {
        format!("{:04x}:{:04x}", self.subsys_vendor, self.subsys_device)
    }

    /// The driver name, or `none`.
    pub fn driver_name(&self) -> &str {
        self.driver.as_deref().unwrap_or("none")
    }
}

/// Another function in the same IOMMU group.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupMember {
    /// Address.
    pub bdf: Bdf,
    /// Bound driver, if any.
    pub driver: Option<String>,
}

impl GroupMember {
    /// Whether this member lets VFIO use the group: bound to a VFIO/stub driver, to none, or a
    /// bridge driver (`pcieport`), which the kernel accepts too.
    pub fn is_viable(&self) -> bool {
        match self.driver.as_deref() {
            None => true,
            Some(d) => matches!(d, VFIO_DRIVER | "pci-stub" | "pcieport"),
        }
    }
}

/// What [`Sysfs::bind_vfio`] or [`Sysfs::unbind_vfio`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BindOutcome {
    /// The function.
    pub bdf: Bdf,
    /// Driver before.
    pub before: Option<String>,
    /// Driver after.
    pub after: Option<String>,
    /// Whether anything was written (false: it already was as asked).
    pub changed: bool,
}

fn io_err(path: &Path, e: &io::Error) -> PciError {
    let why = if e.kind() == io::ErrorKind::PermissionDenied {
        format!("{e} (writing to sysfs needs root)")
    } else {
        e.to_string()
    };
    PciError::Sysfs {
        path: path.display().to_string(),
        why,
    }
}

/// The text for the bind command, used in error messages.
pub fn bind_hint(bdf: Bdf) -> String {
    format!(
        "run `vdpakit devices bind {bdf}` (or by hand: modprobe vfio-pci; \
         echo vfio-pci > /sys/bus/pci/devices/{bdf}/driver_override; \
         echo {bdf} > /sys/bus/pci/devices/{bdf}/driver/unbind; \
         echo {bdf} > /sys/bus/pci/drivers_probe)"
    )
}

impl Sysfs {
    /// The real `/sys`; binding may run `modprobe vfio-pci` when the driver is missing.
    pub fn system() -> Sysfs {
        Sysfs {
            root: PathBuf::from("/sys"),
            modprobe: true,
        }
    }

    /// A tree rooted at `root` (tests); never runs `modprobe`.
    pub fn at(root: impl Into<PathBuf>) -> Sysfs {
        Sysfs {
            root: root.into(),
            modprobe: false,
        }
    }

    /// The root directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    fn devices_dir(&self) -> PathBuf {
        self.root.join("bus/pci/devices")
    }

    /// `ROOT/bus/pci/devices/BDF`.
    pub fn device_dir(&self, bdf: Bdf) -> PathBuf {
        self.devices_dir().join(bdf.to_string())
    }

    fn drivers_dir(&self) -> PathBuf {
        self.root.join("bus/pci/drivers")
    }

    /// Every PCI function, by address. Directory entries that are not addresses are skipped.
    pub fn scan(&self) -> Result<Vec<PciFunction>, PciError> {
        let dir = self.devices_dir();
        let rd = fs::read_dir(&dir).map_err(|e| io_err(&dir, &e))?;
        let mut out = Vec::new();
        for ent in rd {
            let ent = ent.map_err(|e| io_err(&dir, &e))?;
            let name = ent.file_name();
            let Some(bdf) = name.to_str().and_then(|s| s.parse::<Bdf>().ok()) else {
                tracing::debug!(entry = ?name, "not a PCI address, skipped");
                continue;
            };
            out.push(self.function(bdf)?);
        }
        out.sort_by_key(|f| f.bdf);
        Ok(out)
    }

    /// One function.
    pub fn function(&self, bdf: Bdf) -> Result<PciFunction, PciError> {
        let dir = self.device_dir(bdf);
        if !dir.exists() {
            return Err(PciError::Sysfs {
                path: dir.display().to_string(),
                why: format!(
                    "no PCI function {bdf} on this system (`vdpakit devices list --all` lists them)"
                ),
            });
        }
        let hex = |attr: &str, max: u32| -> Result<u32, PciError> {
            let p = dir.join(attr);
            let text = fs::read_to_string(&p).map_err(|e| io_err(&p, &e))?;
            parse_hex(text.trim(), max).ok_or_else(|| PciError::Sysfs {
                path: p.display().to_string(),
                why: format!(
                    "'{}' is not a hexadecimal value of at most {max:#x} (expected e.g. 0x1af4)",
                    text.trim()
                ),
            })
        };
        let numa_path = dir.join("numa_node");
        let numa_node = match fs::read_to_string(&numa_path) {
            Ok(t) => match t.trim().parse::<i64>() {
                Ok(n) if n >= 0 => u32::try_from(n).ok(),
                Ok(_) => None,
                Err(_) => {
                    return Err(PciError::Sysfs {
                        path: numa_path.display().to_string(),
                        why: format!("'{}' is not a decimal NUMA node or -1", t.trim()),
                    });
                }
            },
            Err(e) if e.kind() == io::ErrorKind::NotFound => None,
            Err(e) => return Err(io_err(&numa_path, &e)),
        };
        let group_link = dir.join("iommu_group");
        let iommu_group = match link_name(&group_link)? {
            None => None,
            Some(g) => Some(g.parse::<u32>().map_err(|_| PciError::Sysfs {
                path: group_link.display().to_string(),
                why: format!("links to '{g}', which is not a group number"),
            })?),
        };
        let override_path = dir.join("driver_override");
        let driver_override = match fs::read_to_string(&override_path) {
            Ok(t) => {
                let t = t.trim();
                (!t.is_empty() && t != "(null)").then(|| t.to_string())
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => None,
            Err(e) => return Err(io_err(&override_path, &e)),
        };
        let revision = match dir.join("revision").exists() {
            true => hex("revision", 0xff)? as u8,
            false => 0,
        };
        Ok(PciFunction {
            bdf,
            vendor: hex("vendor", 0xffff)? as u16,
            device: hex("device", 0xffff)? as u16,
            subsys_vendor: hex("subsystem_vendor", 0xffff)? as u16,
            subsys_device: hex("subsystem_device", 0xffff)? as u16,
            class: hex("class", 0xff_ffff)?,
            revision,
            driver: link_name(&dir.join("driver"))?,
            driver_override,
            iommu_group,
            numa_node,
        })
    }

    /// The functions of IOMMU group `group` and their drivers.
    pub fn group_members(&self, group: u32) -> Result<Vec<GroupMember>, PciError> {
        let dir = self
            .root
            .join(format!("kernel/iommu_groups/{group}/devices"));
        let rd = fs::read_dir(&dir).map_err(|e| io_err(&dir, &e))?;
        let mut out = Vec::new();
        for ent in rd {
            let ent = ent.map_err(|e| io_err(&dir, &e))?;
            let Some(bdf) = ent.file_name().to_str().and_then(|s| s.parse::<Bdf>().ok()) else {
                continue;
            };
            let driver = link_name(&self.device_dir(bdf).join("driver"))?;
            out.push(GroupMember { bdf, driver });
        }
        out.sort_by_key(|m| m.bdf);
        Ok(out)
    }

    /// Checks that `bdf` can be opened through VFIO: it exists, is bound to `vfio-pci`, has an
    /// IOMMU group and every other function of that group lets VFIO use it. Returns the group.
    /// Each error says how to fix it.
    pub fn check_vfio(&self, bdf: Bdf) -> Result<u32, PciError> {
        let f = self.function(bdf)?;
        let vfio = |why: String| PciError::Vfio {
            dev: bdf.to_string(),
            why,
        };
        let Some(group) = f.iommu_group else {
            return Err(vfio(format!(
                "has no IOMMU group: the IOMMU is off or absent; boot with intel_iommu=on \
                 (AMD: amd_iommu=on), check dmesg for DMAR/IOMMU lines, then {}",
                bind_hint(bdf)
            )));
        };
        if f.driver.as_deref() != Some(VFIO_DRIVER) {
            return Err(vfio(format!(
                "is bound to {}, not vfio-pci: {}",
                match &f.driver {
                    Some(d) => format!("driver '{d}'"),
                    None => "no driver".into(),
                },
                bind_hint(bdf)
            )));
        }
        let others: Vec<GroupMember> = self
            .group_members(group)?
            .into_iter()
            .filter(|m| m.bdf != bdf && !m.is_viable())
            .collect();
        if !others.is_empty() {
            return Err(group_not_viable(bdf, group, &others));
        }
        Ok(group)
    }

    fn write_attr(&self, path: &Path, value: &str) -> Result<(), PciError> {
        fs::write(path, value).map_err(|e| io_err(path, &e))
    }

    fn ensure_vfio_driver(&self) -> Result<(), PciError> {
        let drv = self.drivers_dir().join(VFIO_DRIVER);
        if drv.exists() {
            return Ok(());
        }
        if self.modprobe {
            match std::process::Command::new("modprobe")
                .arg(VFIO_DRIVER)
                .output()
            {
                Ok(o) if o.status.success() && drv.exists() => return Ok(()),
                Ok(o) => {
                    return Err(PciError::Sysfs {
                        path: drv.display().to_string(),
                        why: format!(
                            "driver vfio-pci missing and `modprobe vfio-pci` failed ({}): {}",
                            o.status,
                            String::from_utf8_lossy(&o.stderr).trim()
                        ),
                    });
                }
                Err(e) => {
                    return Err(PciError::Sysfs {
                        path: drv.display().to_string(),
                        why: format!(
                            "driver vfio-pci missing and modprobe could not run ({e}): \
                             install kmod and load vfio-pci"
                        ),
                    });
                }
            }
        }
        Err(PciError::Sysfs {
            path: drv.display().to_string(),
            why: "driver vfio-pci is not loaded: run `modprobe vfio-pci`".into(),
        })
    }

    /// Binds `bdf` to `vfio-pci`: loads the driver if needed, sets `driver_override`, unbinds
    /// the current driver and asks the kernel to probe again. Already bound: nothing is written.
    pub fn bind_vfio(&self, bdf: Bdf) -> Result<BindOutcome, PciError> {
        let f = self.function(bdf)?;
        if f.driver.as_deref() == Some(VFIO_DRIVER) {
            return Ok(BindOutcome {
                bdf,
                before: f.driver.clone(),
                after: f.driver,
                changed: false,
            });
        }
        self.ensure_vfio_driver()?;
        let dir = self.device_dir(bdf);
        self.write_attr(&dir.join("driver_override"), VFIO_DRIVER)?;
        if f.driver.is_some() {
            self.write_attr(&dir.join("driver/unbind"), &bdf.to_string())?;
        }
        self.write_attr(&self.root.join("bus/pci/drivers_probe"), &bdf.to_string())?;
        let after = link_name(&dir.join("driver"))?;
        if after.as_deref() != Some(VFIO_DRIVER) {
            return Err(PciError::Sysfs {
                path: dir.display().to_string(),
                why: format!(
                    "after driver_override=vfio-pci and drivers_probe, {bdf} is bound to {} \
                     instead of vfio-pci (see dmesg; the IOMMU may be off: boot with intel_iommu=on)",
                    after.as_deref().unwrap_or("no driver")
                ),
            });
        }
        Ok(BindOutcome {
            bdf,
            before: f.driver,
            after,
            changed: true,
        })
    }

    /// Gives `bdf` back to the kernel's default driver: clears `driver_override`, unbinds from
    /// `vfio-pci` and probes again. A function not bound to `vfio-pci` is left alone.
    pub fn unbind_vfio(&self, bdf: Bdf) -> Result<BindOutcome, PciError> {
        let f = self.function(bdf)?;
        let dir = self.device_dir(bdf);
        if f.driver.as_deref() != Some(VFIO_DRIVER) {
            if f.driver_override.as_deref() == Some(VFIO_DRIVER) {
                self.write_attr(&dir.join("driver_override"), "\n")?;
            }
            return Ok(BindOutcome {
                bdf,
                before: f.driver.clone(),
                after: f.driver,
                changed: false,
            });
        }
        // An empty write clears the override (the kernel wants at least a newline).
        self.write_attr(&dir.join("driver_override"), "\n")?;
        self.write_attr(&dir.join("driver/unbind"), &bdf.to_string())?;
        self.write_attr(&self.root.join("bus/pci/drivers_probe"), &bdf.to_string())?;
        let after = link_name(&dir.join("driver"))?;
        Ok(BindOutcome {
            bdf,
            before: f.driver,
            after,
            changed: true,
        })
    }
}

/// The "group not viable" error, listing the members that hold it.
pub fn group_not_viable(bdf: Bdf, group: u32, others: &[GroupMember]) -> PciError {
    let list: Vec<String> = others
        .iter()
        .map(|m| {
            format!(
                "{} (driver {})",
                m.bdf,
                m.driver.as_deref().unwrap_or("none")
            )
        })
        .collect();
    PciError::Vfio {
        dev: bdf.to_string(),
        why: format!(
            "IOMMU group {group} is not viable: every function in it must be bound to vfio-pci \
             or to no driver, but {} {}; bind them too (`vdpakit devices bind BDF` for each) \
             or move the card to a slot with its own group",
            list.join(", "),
            if others.len() == 1 {
                "is not"
            } else {
                "are not"
            }
        ),
    }
}

/// The last component of a symlink's target (`driver` → `virtio-pci`), or None if the link
/// does not exist.
fn link_name(link: &Path) -> Result<Option<String>, PciError> {
    match fs::read_link(link) {
        Ok(target) => Ok(target
            .file_name()
            .and_then(|n| n.to_str())
            .map(str::to_string)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(io_err(link, &e)),
    }
}

/// Parses `0x1af4` (or `1af4`) up to `max`.
fn parse_hex(s: &str, max: u32) -> Option<u32> {
    let h = s
        .strip_prefix("0x")
        .or_else(|| s.strip_prefix("0X"))
        .unwrap_or(s);
    if h.is_empty() || h.len() > 8 {
        return None;
    }
    u32::from_str_radix(h, 16).ok().filter(|&v| v <= max)
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::symlink;

    use super::*;

    /// A fake sysfs tree under a temporary directory.
    struct Fake {
        root: PathBuf,
    }

    impl Fake {
        fn new(tag: &str) -> Fake {
            let root = std::env::temp_dir().join(format!(
                "vdpakit-sysfs-{tag}-{}-{:?}",
                std::process::id(),
                std::thread::current().id()
            ));
            let _ = fs::remove_dir_all(&root);
            fs::create_dir_all(root.join("bus/pci/devices")).unwrap();
            fs::create_dir_all(root.join("bus/pci/drivers")).unwrap();
            fs::write(root.join("bus/pci/drivers_probe"), "").unwrap();
            Fake { root }
        }

        fn sysfs(&self) -> Sysfs {
            Sysfs::at(&self.root)
        }

        fn driver(&self, name: &str) {
            fs::create_dir_all(self.root.join("bus/pci/drivers").join(name)).unwrap();
        }

        #[allow(clippy::too_many_arguments)]
        fn func(
            &self,
            bdf: &str,
            ids: (u16, u16),
            sub: (u16, u16),
            class: u32,
            driver: Option<&str>,
            group: Option<u32>,
            numa: &str,
        ) {
            let d = self.root.join("bus/pci/devices").join(bdf);
            fs::create_dir_all(&d).unwrap();
            fs::write(d.join("vendor"), format!("{:#06x}\n", ids.0)).unwrap();
            fs::write(d.join("device"), format!("{:#06x}\n", ids.1)).unwrap();
            fs::write(d.join("subsystem_vendor"), format!("{:#06x}\n", sub.0)).unwrap();
            fs::write(d.join("subsystem_device"), format!("{:#06x}\n", sub.1)).unwrap();
            fs::write(d.join("class"), format!("{class:#08x}\n")).unwrap();
            fs::write(d.join("revision"), "0x01\n").unwrap();
            fs::write(d.join("numa_node"), format!("{numa}\n")).unwrap();
            fs::write(d.join("driver_override"), "(null)\n").unwrap();
            if let Some(drv) = driver {
                self.driver(drv);
                let target = self.root.join("bus/pci/drivers").join(drv);
                fs::write(target.join("unbind"), "").unwrap();
                symlink(&target, d.join("driver")).unwrap();
            }
            if let Some(g) = group {
                let gdir = self.root.join(format!("kernel/iommu_groups/{g}/devices"));
                fs::create_dir_all(&gdir).unwrap();
                symlink(&d, gdir.join(bdf)).unwrap();
                symlink(
                    self.root.join(format!("kernel/iommu_groups/{g}")),
                    d.join("iommu_group"),
                )
                .unwrap();
            }
        }
    }

    impl Drop for Fake {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.root);
        }
    }

    fn bdf(s: &str) -> Bdf {
        s.parse().unwrap()
    }

    #[test]
    fn scan_parses_every_attribute() {
        let f = Fake::new("scan");
        f.func(
            "0000:00:03.0",
            (0x1af4, 0x1041),
            (0x1af4, 0x1100),
            0x020000,
            Some("virtio-pci"),
            Some(5),
            "-1",
        );
        f.func(
            "0000:3b:00.2",
            (0x15b3, 0x101e),
            (0x15b3, 0x0001),
            0x020000,
            None,
            None,
            "1",
        );
        fs::create_dir_all(f.root.join("bus/pci/devices/not-a-bdf")).unwrap();
        let all = f.sysfs().scan().unwrap();
        assert_eq!(all.len(), 2);
        let v = &all[0];
        assert_eq!(v.bdf, bdf("0000:00:03.0"));
        assert_eq!((v.vendor, v.device), (0x1af4, 0x1041));
        assert_eq!(v.subsys_ids(), "1af4:1100");
        assert_eq!(v.class, 0x020000);
        assert_eq!(v.revision, 1);
        assert_eq!(v.driver.as_deref(), Some("virtio-pci"));
        assert_eq!(v.driver_override, None);
        assert_eq!(v.iommu_group, Some(5));
        assert_eq!(v.numa_node, None);
        let m = &all[1];
        assert_eq!(m.ids(), "15b3:101e");
        assert_eq!(m.driver_name(), "none");
        assert_eq!(m.iommu_group, None);
        assert_eq!(m.numa_node, Some(1));
    }

    #[test]
    fn malformed_attribute_names_path_and_value() {
        let f = Fake::new("bad");
        f.func(
            "0000:00:04.0",
            (0x1af4, 0x1000),
            (0, 0),
            0x020000,
            None,
            None,
            "0",
        );
        let dev = f.root.join("bus/pci/devices/0000:00:04.0");
        fs::write(dev.join("vendor"), "0xzz\n").unwrap();
        let e = f.sysfs().scan().unwrap_err().to_string();
        assert!(e.contains("0000:00:04.0/vendor"), "{e}");
        assert!(e.contains("'0xzz'"), "{e}");
        fs::write(dev.join("vendor"), "0x12345\n").unwrap();
        let e = f.sysfs().function(bdf("00:04.0")).unwrap_err().to_string();
        assert!(e.contains("'0x12345'") && e.contains("0xffff"), "{e}");
        fs::write(dev.join("vendor"), "0x1af4\n").unwrap();
        fs::write(dev.join("numa_node"), "two\n").unwrap();
        let e = f.sysfs().function(bdf("00:04.0")).unwrap_err().to_string();
        assert!(e.contains("numa_node") && e.contains("'two'"), "{e}");
    }

    #[test]
    fn missing_function_and_missing_root() {
        let f = Fake::new("missing");
        let e = f
            .sysfs()
            .function(bdf("0000:00:09.0"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("no PCI function 0000:00:09.0"), "{e}");
        let e = Sysfs::at(f.root.join("nope"))
            .scan()
            .unwrap_err()
            .to_string();
        assert!(e.contains("nope/bus/pci/devices"), "{e}");
    }

    #[test]
    fn check_vfio_explains_each_problem() {
        let f = Fake::new("check");
        // Not bound to vfio-pci.
        f.func(
            "0000:00:03.0",
            (0x1af4, 0x1041),
            (0x1af4, 0x1100),
            0x020000,
            Some("virtio-pci"),
            Some(3),
            "0",
        );
        let e = f
            .sysfs()
            .check_vfio(bdf("00:03.0"))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("is bound to driver 'virtio-pci', not vfio-pci"),
            "{e}"
        );
        assert!(e.contains("vdpakit devices bind 0000:00:03.0"), "{e}");
        assert!(
            e.contains("echo vfio-pci > /sys/bus/pci/devices/0000:00:03.0/driver_override"),
            "{e}"
        );
        // No IOMMU group.
        f.func(
            "0000:00:05.0",
            (0x1af4, 0x1041),
            (0, 0),
            0x020000,
            Some("vfio-pci"),
            None,
            "0",
        );
        let e = f
            .sysfs()
            .check_vfio(bdf("00:05.0"))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("no IOMMU group") && e.contains("intel_iommu=on"),
            "{e}"
        );
        // Group shared with a function held by a host driver.
        f.func(
            "0000:02:00.0",
            (0x1af4, 0x1041),
            (0, 0),
            0x020000,
            Some("vfio-pci"),
            Some(7),
            "0",
        );
        f.func(
            "0000:02:00.1",
            (0x8086, 0x1572),
            (0, 0),
            0x020000,
            Some("i40e"),
            Some(7),
            "0",
        );
        f.func(
            "0000:02:00.2",
            (0x8086, 0x1572),
            (0, 0),
            0x020000,
            None,
            Some(7),
            "0",
        );
        let e = f
            .sysfs()
            .check_vfio(bdf("02:00.0"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("IOMMU group 7 is not viable"), "{e}");
        assert!(e.contains("0000:02:00.1 (driver i40e) is not"), "{e}");
        assert!(!e.contains("02:00.2"), "{e}");
        // Fixed: the other function unbound.
        fs::remove_file(f.root.join("bus/pci/devices/0000:02:00.1/driver")).unwrap();
        assert_eq!(f.sysfs().check_vfio(bdf("02:00.0")).unwrap(), 7);
    }

    #[test]
    fn bind_writes_override_unbind_and_probe() {
        let f = Fake::new("bind");
        f.driver(VFIO_DRIVER);
        f.func(
            "0000:00:03.0",
            (0x1af4, 0x1041),
            (0x1af4, 0x1100),
            0x020000,
            Some("virtio-pci"),
            Some(3),
            "0",
        );
        // The fake kernel does not rebind, so the check after drivers_probe fails, naming
        // the driver it found; the writes are what the kernel would have acted on.
        let e = f.sysfs().bind_vfio(bdf("00:03.0")).unwrap_err().to_string();
        assert!(
            e.contains("is bound to virtio-pci instead of vfio-pci"),
            "{e}"
        );
        let dev = f.root.join("bus/pci/devices/0000:00:03.0");
        assert_eq!(
            fs::read_to_string(dev.join("driver_override")).unwrap(),
            "vfio-pci"
        );
        assert_eq!(
            fs::read_to_string(f.root.join("bus/pci/drivers/virtio-pci/unbind")).unwrap(),
            "0000:00:03.0"
        );
        assert_eq!(
            fs::read_to_string(f.root.join("bus/pci/drivers_probe")).unwrap(),
            "0000:00:03.0"
        );
        // What the kernel does next: the function is now vfio-pci's.
        fs::remove_file(dev.join("driver")).unwrap();
        symlink(f.root.join("bus/pci/drivers/vfio-pci"), dev.join("driver")).unwrap();
        let out = f.sysfs().bind_vfio(bdf("00:03.0")).unwrap();
        assert!(!out.changed);
        assert_eq!(out.after.as_deref(), Some("vfio-pci"));
        // Unbind: override cleared, unbind written to vfio-pci, probe again.
        fs::write(f.root.join("bus/pci/drivers/vfio-pci/unbind"), "").unwrap();
        let out = f.sysfs().unbind_vfio(bdf("00:03.0")).unwrap();
        assert!(out.changed);
        assert_eq!(out.before.as_deref(), Some("vfio-pci"));
        assert_eq!(
            fs::read_to_string(dev.join("driver_override")).unwrap(),
            "\n"
        );
        assert_eq!(
            fs::read_to_string(f.root.join("bus/pci/drivers/vfio-pci/unbind")).unwrap(),
            "0000:00:03.0"
        );
    }

    #[test]
    fn bind_without_vfio_driver_says_modprobe() {
        let f = Fake::new("nodrv");
        f.func(
            "0000:00:03.0",
            (0x1af4, 0x1041),
            (0, 0),
            0x020000,
            None,
            Some(3),
            "0",
        );
        let e = f.sysfs().bind_vfio(bdf("00:03.0")).unwrap_err().to_string();
        assert!(e.contains("modprobe vfio-pci"), "{e}");
        // Nothing was written.
        let dev = f.root.join("bus/pci/devices/0000:00:03.0");
        assert_eq!(
            fs::read_to_string(dev.join("driver_override")).unwrap(),
            "(null)\n"
        );
    }

    #[test]
    fn unbind_of_an_unbound_function_is_a_no_op() {
        let f = Fake::new("unbind");
        f.func(
            "0000:00:03.0",
            (0x1af4, 0x1041),
            (0, 0),
            0x020000,
            Some("virtio-pci"),
            Some(3),
            "0",
        );
        let out = f.sysfs().unbind_vfio(bdf("00:03.0")).unwrap();
        assert!(!out.changed);
        assert_eq!(out.after.as_deref(), Some("virtio-pci"));
    }

    #[test]
    fn hex_parsing() {
        assert_eq!(parse_hex("0x1af4", 0xffff), Some(0x1af4));
        assert_eq!(parse_hex("1AF4", 0xffff), Some(0x1af4));
        assert_eq!(parse_hex("0x", 0xffff), None);
        assert_eq!(parse_hex("0x10000", 0xffff), None);
        assert_eq!(parse_hex("-1", 0xffff), None);
    }
}

//! `vdpakit devices`: the PCI functions a PMD can drive, binding them to vfio-pci and back
//! (like dpdk-devbind), the device models of this build, and `probe`, which opens a function
//! through VFIO and reports what the PCI layer sees.

use std::os::fd::{AsFd, OwnedFd};
use std::path::PathBuf;
use std::sync::Arc;

use clap::{Args, Subcommand};
use nix::sys::eventfd::{EfdFlags, EventFd};
use vdpakit_core::mem::{MemMode, Segment};
use vdpakit_core::pci::sysfs::{PciFunction, Sysfs};
use vdpakit_core::pci::{Bdf, DmaDomain, PciDevice, ids};
use vdpakit_core::virtio::GuestRegion;
use vdpakit_core::virtio_pci::{ModernTransport, Region, status};

use crate::error::{Error, Result};

/// `vdpakit devices` arguments.
#[derive(Debug, Args)]
pub struct DevicesArgs {
    #[command(subcommand)]
    cmd: Option<DevicesCmd>,
    /// sysfs root (tests point this at a fake tree).
    #[arg(long, global = true, hide = true, default_value = "/sys")]
    sysfs: PathBuf,
}

#[derive(Debug, Subcommand)]
enum DevicesCmd {
    /// List the PCI functions a PMD can drive, with driver and IOMMU group (the default).
    List {
        /// List every PCI function, not only those a PMD drives.
        #[arg(long)]
        all: bool,
        /// One JSON array on stdout.
        #[arg(long)]
        json: bool,
    },
    /// Bind a function to vfio-pci (driver_override, unbind, drivers_probe; loads vfio-pci).
    Bind {
        /// PCI address, DDDD:BB:DD.F or BB:DD.F.
        bdf: String,
    },
    /// Give a function back to its kernel driver (clears driver_override, probes again).
    Unbind {
        /// PCI address, DDDD:BB:DD.F or BB:DD.F.
        bdf: String,
    },
    /// List the device models (software SmartNICs) this build has.
    Models,
    /// Open a vfio-pci function and report what the PCI layer sees: BARs, capabilities, the
    /// virtio structures, features, a status reset, MSI-X loopback, a DMA map and unmap.
    Probe {
        /// PCI address, DDDD:BB:DD.F or BB:DD.F (bound to vfio-pci).
        bdf: String,
        /// IOVA (hex) at which to map the probe's DMA buffer.
        #[arg(long, default_value = "0x100000000")]
        iova: String,
        /// Also open this function (bound to vfio-pci) in the same DMA domain (repeatable):
        /// one container holding several IOMMU groups.
        #[arg(long = "with", value_name = "BDF")]
        with: Vec<String>,
    },
}

fn parse_bdf(s: &str) -> Result<Bdf> {
    s.parse::<Bdf>().map_err(|_| Error::Usage {
        flag: "PCI address",
        value: format!("'{s}'"),
        accepted: "DDDD:BB:DD.F or BB:DD.F in hex, e.g. 0000:03:00.1".into(),
    })
}

/// Runs `vdpakit devices`.
pub fn run(args: DevicesArgs) -> Result<()> {
    let sysfs = if args.sysfs == std::path::Path::new("/sys") {
        Sysfs::system()
    } else {
        Sysfs::at(&args.sysfs)
    };
    match args.cmd.unwrap_or(DevicesCmd::List {
        all: false,
        json: false,
    }) {
        DevicesCmd::List { all, json } => list(&sysfs, all, json),
        DevicesCmd::Bind { bdf } => {
            let bdf = parse_bdf(&bdf)?;
            let out = sysfs.bind_vfio(bdf)?;
            if out.changed {
                println!(
                    "{bdf}: {} -> vfio-pci",
                    out.before.as_deref().unwrap_or("no driver")
                );
            } else {
                println!("{bdf}: already bound to vfio-pci");
            }
            Ok(())
        }
        DevicesCmd::Unbind { bdf } => {
            let bdf = parse_bdf(&bdf)?;
            let out = sysfs.unbind_vfio(bdf)?;
            if out.changed {
                println!(
                    "{bdf}: vfio-pci -> {}",
                    out.after.as_deref().unwrap_or("no driver")
                );
            } else {
                println!(
                    "{bdf}: not bound to vfio-pci (driver {}), left as it is",
                    out.before.as_deref().unwrap_or("none")
                );
            }
            Ok(())
        }
        DevicesCmd::Models => {
            // The registry of device kinds (`vdpakit vdpa --device KIND:...`): the `sim` model
            // and each PMD's model register there.
            let kinds = crate::vdpa::kinds();
            if kinds.is_empty() {
                println!(
                    "no device models in this build yet (the `sim` model and the PMDs' models \
                     register in vdpa::kinds() when they land)"
                );
            }
            for k in kinds {
                println!("{:<10} {}", k.name, k.about);
            }
            Ok(())
        }
        DevicesCmd::Probe { bdf, iova, with } => {
            let bdf = parse_bdf(&bdf)?;
            let with = with
                .iter()
                .map(|b| parse_bdf(b))
                .collect::<Result<Vec<_>>>()?;
            let iova = parse_hex_u64(&iova).ok_or_else(|| Error::Usage {
                flag: "--iova",
                value: iova.clone(),
                accepted: "a hexadecimal address that is a multiple of 0x1000, e.g. 0x100000000"
                    .into(),
            })?;
            probe(&sysfs, bdf, iova, &with)
        }
    }
}

fn parse_hex_u64(s: &str) -> Option<u64> {
    let h = s.strip_prefix("0x").unwrap_or(s);
    u64::from_str_radix(h, 16)
        .ok()
        .filter(|v| v.is_multiple_of(0x1000))
}

fn opt<T: std::fmt::Display>(v: Option<T>) -> String {
    v.map_or_else(|| "-".to_string(), |v| v.to_string())
}

fn list(sysfs: &Sysfs, all: bool, json: bool) -> Result<()> {
    let funcs: Vec<(PciFunction, Option<&'static ids::PmdMatch>)> = sysfs
        .scan()?
        .into_iter()
        .map(|f| {
            let m = ids::pmd_for_function(&f);
            (f, m)
        })
        .filter(|(_, m)| all || m.is_some())
        .collect();
    if json {
        let v: Vec<serde_json::Value> = funcs
            .iter()
            .map(|(f, m)| {
                serde_json::json!({
                    "bdf": f.bdf.to_string(),
                    "vendor": format!("{:04x}", f.vendor),
                    "device": format!("{:04x}", f.device),
                    "subsystem": f.subsys_ids(),
                    "class": format!("{:06x}", f.class),
                    "driver": f.driver,
                    "iommu_group": f.iommu_group,
                    "numa_node": f.numa_node,
                    "pmd": m.map(|m| m.pmd),
                    "what": m.map(|m| m.what),
                })
            })
            .collect();
        println!("{}", serde_json::Value::Array(v));
        return Ok(());
    }
    if funcs.is_empty() {
        println!(
            "no PCI function that a vdpakit PMD drives (`vdpakit devices list --all` lists every function)"
        );
        return Ok(());
    }
    println!(
        "{:<13} {:<10} {:<10} {:<7} {:<12} {:>5} {:>4}  {:<7} WHAT",
        "BDF", "IDS", "SUBSYS", "CLASS", "DRIVER", "GROUP", "NUMA", "PMD"
    );
    for (f, m) in &funcs {
        println!(
            "{:<13} {:<10} {:<10} {:06x}  {:<12} {:>5} {:>4}  {:<7} {}",
            f.bdf.to_string(),
            f.ids(),
            f.subsys_ids(),
            f.class,
            f.driver_name(),
            opt(f.iommu_group),
            opt(f.numa_node),
            m.map_or("-", |m| m.pmd),
            m.map_or("", |m| m.what),
        );
    }
    Ok(())
}

fn runtime(what: String) -> Error {
    Error::Runtime(what)
}

fn eventfd() -> Result<OwnedFd> {
    let e = EventFd::from_flags(EfdFlags::EFD_NONBLOCK | EfdFlags::EFD_CLOEXEC)
        .map_err(|e| runtime(format!("eventfd: {e}")))?;
    Ok(OwnedFd::from(e))
}

/// Whether an eventfd was signalled (reads and so clears it).
fn signalled(fd: &OwnedFd) -> bool {
    let mut b = [0u8; 8];
    nix::unistd::read(fd.as_fd(), &mut b).is_ok_and(|n| n == 8 && u64::from_ne_bytes(b) > 0)
}

/// Waits up to 1 s for `fd` to be signalled.
fn wait_signalled(fd: &OwnedFd) -> bool {
    let end = std::time::Instant::now() + std::time::Duration::from_secs(1);
    while std::time::Instant::now() < end {
        if signalled(fd) {
            return true;
        }
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    false
}

/// `vdpakit devices probe`: one `key: value` line per finding; an error stops with exit 1 (2
/// for set-up errors such as a function not bound to vfio-pci).
fn probe(sysfs: &Sysfs, bdf: Bdf, iova: u64, with: &[Bdf]) -> Result<()> {
    let f = sysfs.function(bdf)?;
    println!(
        "function: {bdf} {} subsystem {} class {:06x} driver {} group {} numa {}",
        f.ids(),
        f.subsys_ids(),
        f.class,
        f.driver_name(),
        opt(f.iommu_group),
        opt(f.numa_node)
    );
    if let Some(m) = ids::pmd_for_function(&f) {
        println!("pmd: {} ({})", m.pmd, m.what);
    }
    // The function's own set-up first (bound? IOMMU group? viable?): the most specific remedy.
    sysfs.check_vfio(bdf)?;
    for &b in with {
        sysfs.check_vfio(b)?;
    }
    let domain = DmaDomain::vfio()?;
    // A mapping made before any device is open: recorded, replayed when the first one opens
    // (the unmap at the end fails if the IOMMU never had it).
    let early_seg = Segment::new("probe-early", 64 << 10, MemMode::NoHuge)?;
    let early = GuestRegion::from_segment(&early_seg);
    let early_iova = iova + (4 << 20);
    domain.map(early_iova, &early)?;
    let dev = PciDevice::open_vfio(bdf, &domain)?;
    let mut others = Vec::new();
    for &b in with {
        others.push(PciDevice::open_vfio(b, &domain)?);
    }
    println!(
        "domain_devices: {}",
        domain.container().map_or(0, |c| c.devices())
    );
    println!(
        "open: {} config_size {}",
        dev.kind(),
        dev.ops().config_size()
    );
    let (v, d) = dev.ids()?;
    println!("ids: {v:04x}:{d:04x}");
    let mut bars = Vec::new();
    for b in 0..vdpakit_core::pci::BARS {
        let len = dev.bar_len(b);
        if len > 0 {
            bars.push(format!(
                "{b}:{len:#x}{}",
                if dev.ops().bar_mapping(b).is_some() {
                    "(mmap)"
                } else {
                    "(partial/pread)"
                }
            ));
        }
    }
    println!("bars: {}", bars.join(" "));
    let caps = dev.capabilities()?;
    println!(
        "caps: {}",
        caps.iter()
            .map(|c| format!("{:#04x}@{:#x}", c.id, c.offset))
            .collect::<Vec<_>>()
            .join(" ")
    );
    dev.enable_bus_master()?;
    // The virtio structures, through the shared virtio-PCI transport (common, notify and ISR
    // are mandatory; each must lie inside its BAR).
    let vt = ModernTransport::probe(dev.clone()).map_err(|e| runtime(e.to_string()))?;
    let vio = |e: vdpakit_core::virtio_pci::VirtioPciError| runtime(e.to_string());
    let (cc, notify, isr, device) = vt.regions();
    let show = |name: &str, r: Region, extra: String| {
        println!(
            "virtio_{name}: bar {} offset {:#x} length {:#x}{extra}",
            r.bar, r.offset, r.len
        );
    };
    show("common", cc, String::new());
    show(
        "notify",
        notify,
        format!(" multiplier {}", vt.notify_multiplier()),
    );
    show("isr", isr, String::new());
    match device {
        Some(d) => show("device", d, String::new()),
        None => println!("virtio_device: none"),
    }
    // Reset through the status register (write 0, wait for 0), then ACKNOWLEDGE.
    vt.reset().map_err(vio)?;
    println!("status_after_reset: {:#x}", vt.status().map_err(vio)?);
    vt.set_status(status::ACKNOWLEDGE).map_err(vio)?;
    println!("status_ack: {:#x}", vt.status().map_err(vio)?);
    println!("num_queues: {}", vt.num_queues().map_err(vio)?);
    let features = vt.device_features().map_err(vio)?;
    println!("device_features: {features:#018x}");
    let version_1 = features & (1 << 32) != 0;
    println!("version_1: {}", if version_1 { "yes" } else { "no" });
    vt.reset().map_err(vio)?;
    println!("status_final: {:#x}", vt.status().map_err(vio)?);
    match dev.notify_area(notify.bar, notify.offset, 2) {
        Some(a) => println!("notify_area: fd offset {:#x} size {:#x}", a.offset, a.size),
        None => println!("notify_area: none (doorbell page not mappable)"),
    }
    drop(dev.doorbell(notify.bar, notify.offset, 2)?);

    // MSI-X: wire every vector (at most 8) to its own eventfd; fire vector 2 (or the last)
    // from software and see that exactly its eventfd is signalled.
    let nvec = dev.msix_vectors();
    println!("msix_vectors: {nvec}");
    if nvec > 0 {
        let n = nvec.min(8) as usize;
        let fds: Vec<Arc<OwnedFd>> = (0..n)
            .map(|_| eventfd().map(Arc::new))
            .collect::<Result<_>>()?;
        let wired: Vec<Option<Arc<OwnedFd>>> = fds.iter().cloned().map(Some).collect();
        dev.set_msix(&wired)?;
        println!("msix_wired: {n}");
        let target = 2.min(n - 1);
        dev.msix_trigger(target as u16)?;
        let hit = wait_signalled(&fds[target]);
        let others: Vec<usize> = (0..n)
            .filter(|&i| i != target && signalled(&fds[i]))
            .collect();
        println!(
            "msix_loopback: vector {target} -> {} (others signalled: {})",
            if hit { "its eventfd" } else { "nothing" },
            if others.is_empty() {
                "none".to_string()
            } else {
                format!("{others:?}")
            }
        );
        dev.set_msix(&[])?;
        if !hit || !others.is_empty() {
            return Err(runtime(format!(
                "{bdf}: MSI-X vector {target} did not reach exactly its eventfd"
            )));
        }
    }

    // DMA: map a 2 MiB buffer (a hugepage when one is free) at `iova`, then unmap it.
    let seg = Segment::new("probe-dma", 2 << 20, MemMode::Auto)?;
    let region = GuestRegion::from_segment(&seg);
    domain.map(iova, &region)?;
    let m = domain.mappings();
    println!(
        "dma_map: iova {iova:#x} len {:#x} {} ({} mapping)",
        region.size(),
        if seg.is_huge() {
            "hugepage"
        } else {
            "4K pages"
        },
        m.len()
    );
    let removed = domain.unmap(iova, region.size())?;
    println!("dma_unmap: {removed} removed");
    let replayed = domain.unmap(early_iova, early.size())?;
    println!("dma_replayed_unmap: {replayed} removed");
    for o in &others {
        // The other functions of the domain answer too.
        println!(
            "with: {} ids {:04x}:{:04x}",
            o.name(),
            o.ids()?.0,
            o.ids()?.1
        );
    }

    match dev.reset() {
        Ok(()) => println!("reset: ok"),
        Err(e) => println!("reset: unsupported ({e})"),
    }
    println!("result: ok");
    Ok(())
}

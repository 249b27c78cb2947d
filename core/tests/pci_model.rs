//! The PCI layer over the model back end, with a tiny test-only device: a DMA engine that copies
//! `len` bytes from one IOVA to another and raises an MSI-X vector when done.
//!
//! Checks: DMA inside the mapped IOVA works and outside it faults (counted and reported by the
//! domain, nothing written); MSI-X vector N reaches the eventfd wired to N and no other; BAR
//! accessors reject out-of-range, unaligned and bad-width accesses with errors naming the values;
//! the capability walk lists the capabilities and detects a loop.

use std::os::fd::{AsFd, OwnedFd};
use std::sync::{Arc, Mutex};

use nix::sys::eventfd::{EfdFlags, EventFd};
use vdpakit_core::mem::{MemMode, Segment};
use vdpakit_core::pci::model::{self, DeviceModel, ModelBus};
use vdpakit_core::pci::{DmaDomain, PciDevice, PciError, cap_id, cfg};
use vdpakit_core::virtio::GuestRegion;

/// Registers of BAR 0.
mod reg {
    pub const SRC: u64 = 0x00; // u64
    pub const DST: u64 = 0x08; // u64
    pub const LEN: u64 = 0x10; // u32
    pub const VECTOR: u64 = 0x14; // u32
    pub const GO: u64 = 0x18; // u32: write 1 to copy
    pub const STATUS: u64 = 0x1c; // u32: 0 done, 1 IOMMU fault
}

const BAR0_LEN: u64 = 0x1000;
const VECTORS: u16 = 4;

#[derive(Debug, Default)]
struct Regs {
    src: u64,
    dst: u64,
    len: u32,
    vector: u32,
    status: u32,
}

#[derive(Debug)]
struct TinyDma {
    config: Mutex<[u8; 256]>,
    regs: Mutex<Regs>,
    bus: Mutex<Option<ModelBus>>,
}

impl TinyDma {
    /// `next_of_vendor`: where the vendor capability (the last) points; 0 ends the list.
    fn new(next_of_vendor: u8) -> Arc<TinyDma> {
        let mut c = [0u8; 256];
        c[0..2].copy_from_slice(&0x1234u16.to_le_bytes());
        c[2..4].copy_from_slice(&0x5678u16.to_le_bytes());
        c[cfg::STATUS as usize..][..2].copy_from_slice(&cfg::STATUS_CAP_LIST.to_le_bytes());
        c[cfg::CAP_PTR as usize] = 0x40;
        // MSI-X at 0x40 → vendor at 0x50 (length 16) → next_of_vendor.
        c[0x40] = cap_id::MSIX;
        c[0x41] = 0x50;
        c[0x42..0x44].copy_from_slice(&(VECTORS - 1).to_le_bytes());
        c[0x50] = cap_id::VENDOR;
        c[0x51] = next_of_vendor;
        c[0x52] = 16;
        Arc::new(TinyDma {
            config: Mutex::new(c),
            regs: Mutex::new(Regs::default()),
            bus: Mutex::new(None),
        })
    }

    fn run_dma(&self, r: &mut Regs) {
        let Some(bus) = self.bus.lock().unwrap().clone() else {
            return;
        };
        let (_, mem) = bus.dma.view();
        let mut buf = vec![0u8; r.len as usize];
        if mem.read(r.src, &mut buf).is_err() {
            bus.dma.record_fault(r.src, r.len as u64);
            r.status = 1;
            return;
        }
        if mem.write(r.dst, &buf).is_err() {
            bus.dma.record_fault(r.dst, r.len as u64);
            r.status = 1;
            return;
        }
        r.status = 0;
        bus.irq.signal(r.vector as u16);
    }
}

impl DeviceModel for TinyDma {
    fn name(&self) -> &str {
        "tinydma"
    }
    fn config_read(&self, offset: u16, buf: &mut [u8]) {
        let c = self.config.lock().unwrap();
        buf.copy_from_slice(&c[offset as usize..offset as usize + buf.len()]);
    }
    fn config_write(&self, offset: u16, buf: &[u8]) {
        // Only the command register is writable.
        if offset == cfg::COMMAND && buf.len() == 2 {
            self.config.lock().unwrap()[offset as usize..][..2].copy_from_slice(buf);
        }
    }
    fn bar_len(&self, bar: u8) -> u64 {
        if bar == 0 { BAR0_LEN } else { 0 }
    }
    fn bar_read(&self, _bar: u8, offset: u64, buf: &mut [u8]) {
        let r = self.regs.lock().unwrap();
        let v: u64 = match offset {
            reg::SRC => r.src,
            reg::DST => r.dst,
            reg::LEN => r.len as u64,
            reg::VECTOR => r.vector as u64,
            reg::STATUS => r.status as u64,
            _ => 0,
        };
        buf.copy_from_slice(&v.to_le_bytes()[..buf.len()]);
    }
    fn bar_write(&self, _bar: u8, offset: u64, buf: &[u8]) {
        let mut b = [0u8; 8];
        b[..buf.len()].copy_from_slice(buf);
        let v = u64::from_le_bytes(b);
        let mut r = self.regs.lock().unwrap();
        match offset {
            reg::SRC => r.src = v,
            reg::DST => r.dst = v,
            reg::LEN => r.len = v as u32,
            reg::VECTOR => r.vector = v as u32,
            reg::GO if v == 1 => self.run_dma(&mut r),
            _ => {}
        }
    }
    fn msix_vectors(&self) -> u16 {
        VECTORS
    }
    fn reset(&self) {
        *self.regs.lock().unwrap() = Regs::default();
    }
    fn attach(&self, bus: ModelBus) {
        *self.bus.lock().unwrap() = Some(bus);
    }
}

const IOVA: u64 = 0x10_0000;

fn setup(next_of_vendor: u8) -> (PciDevice, DmaDomain, GuestRegion) {
    let domain = DmaDomain::model();
    let dev = model::open(TinyDma::new(next_of_vendor), &domain).unwrap();
    let seg = Segment::new("pci-model-test", 64 << 10, MemMode::NoHuge).unwrap();
    let region = GuestRegion::from_segment(&seg);
    domain.map(IOVA, &region).unwrap();
    (dev, domain, region)
}

fn eventfds(n: usize) -> Vec<Arc<OwnedFd>> {
    (0..n)
        .map(|_| {
            Arc::new(OwnedFd::from(
                EventFd::from_flags(EfdFlags::EFD_NONBLOCK | EfdFlags::EFD_CLOEXEC).unwrap(),
            ))
        })
        .collect()
}

/// Reads (and clears) an eventfd: how many times it was signalled.
fn count(fd: &OwnedFd) -> u64 {
    let mut b = [0u8; 8];
    match nix::unistd::read(fd.as_fd(), &mut b) {
        Ok(8) => u64::from_ne_bytes(b),
        _ => 0,
    }
}

fn start_dma(dev: &PciDevice, src: u64, dst: u64, len: u32, vector: u32) -> u32 {
    dev.write64(0, reg::SRC, src).unwrap();
    dev.write64(0, reg::DST, dst).unwrap();
    dev.write32(0, reg::LEN, len).unwrap();
    dev.write32(0, reg::VECTOR, vector).unwrap();
    dev.write32(0, reg::GO, 1).unwrap();
    dev.read32(0, reg::STATUS).unwrap()
}

#[test]
fn dma_inside_the_mapping_copies_and_raises_the_vector() {
    let (dev, domain, _region) = setup(0);
    let fds = eventfds(4);
    dev.set_msix(&fds.iter().cloned().map(Some).collect::<Vec<_>>())
        .unwrap();
    let (_, mem) = domain.view();
    let pattern: Vec<u8> = (0..64u8).collect();
    mem.write(IOVA, &pattern).unwrap();
    assert_eq!(start_dma(&dev, IOVA, IOVA + 0x1000, 64, 2), 0);
    let mut got = vec![0u8; 64];
    mem.read(IOVA + 0x1000, &mut got).unwrap();
    assert_eq!(got, pattern);
    assert_eq!(domain.faults(), (0, None));
    // Vector 2 signals eventfd 2, and only it.
    assert_eq!(count(&fds[2]), 1);
    assert_eq!(count(&fds[1]), 0);
    assert_eq!(count(&fds[0]) + count(&fds[3]), 0);
}

#[test]
fn dma_outside_the_mapping_faults_and_is_reported() {
    let (dev, domain, region) = setup(0);
    let fds = eventfds(4);
    dev.set_msix(&fds.iter().cloned().map(Some).collect::<Vec<_>>())
        .unwrap();
    let end = IOVA + region.size();
    // Source just past the mapping: fault, nothing copied, no interrupt.
    assert_eq!(start_dma(&dev, end, IOVA, 16, 1), 1);
    assert_eq!(domain.faults(), (1, Some(end)));
    // A read that starts inside and runs over the end faults too.
    assert_eq!(start_dma(&dev, end - 8, IOVA, 16, 1), 1);
    assert_eq!(domain.faults(), (2, Some(end - 8)));
    // Destination below the mapping.
    assert_eq!(start_dma(&dev, IOVA, IOVA - 0x1000, 16, 1), 1);
    assert_eq!(domain.faults(), (3, Some(IOVA - 0x1000)));
    assert_eq!(count(&fds[1]), 0);
    // After unmap, the IOVA that worked faults.
    assert_eq!(domain.unmap(IOVA, region.size()).unwrap(), 1);
    assert_eq!(start_dma(&dev, IOVA, IOVA + 0x100, 16, 1), 1);
    assert_eq!(domain.faults(), (4, Some(IOVA)));
}

#[test]
fn msix_wiring_and_software_trigger() {
    let (dev, _domain, _region) = setup(0);
    assert_eq!(dev.msix_vectors(), VECTORS);
    let fds = eventfds(3);
    // Vector 1 unused.
    dev.set_msix(&[Some(fds[0].clone()), None, Some(fds[2].clone())])
        .unwrap();
    dev.msix_trigger(2).unwrap();
    assert_eq!(count(&fds[2]), 1);
    assert_eq!((count(&fds[0]), count(&fds[1])), (0, 0));
    let e = dev.msix_trigger(1).unwrap_err().to_string();
    assert!(e.contains("vector 1 is not wired"), "{e}");
    let e = dev.msix_trigger(VECTORS).unwrap_err().to_string();
    assert!(
        e.contains("5 MSI-X vectors asked for, the device has 4"),
        "{e}"
    );
    let five: Vec<_> = eventfds(5).into_iter().map(Some).collect();
    let e = dev.set_msix(&five).unwrap_err().to_string();
    assert!(
        e.contains("5 MSI-X vectors asked for, the device has 4"),
        "{e}"
    );
    // Disabled: the vector raises nothing.
    dev.set_msix(&[]).unwrap();
    assert!(dev.msix_trigger(2).is_err());
}

#[test]
fn bar_accessors_reject_bad_offsets_and_widths() {
    let (dev, _domain, _region) = setup(0);
    let range = |r: Result<u64, PciError>, needles: &[&str]| {
        let e = r.unwrap_err();
        assert!(matches!(e, PciError::BarRange { .. }), "{e:?}");
        let t = e.to_string();
        for n in needles {
            assert!(t.contains(n), "{n:?} not in {t}");
        }
    };
    // Past the end, straddling the end, unaligned.
    range(
        dev.read32(0, BAR0_LEN).map(u64::from),
        &["4-byte access at offset 0x1000 of BAR 0", "(0x1000 bytes)"],
    );
    range(
        dev.read64(0, BAR0_LEN - 4),
        &["8-byte access at offset 0xffc"],
    );
    range(
        dev.read16(0, 3).map(u64::from),
        &["2-byte access at offset 0x3"],
    );
    range(
        dev.write32(0, 0x12, 1).map(|_| 0),
        &["4-byte access at offset 0x12"],
    );
    // An offset that overflows is an error, not a panic.
    range(
        dev.read8(0, u64::MAX).map(u64::from),
        &["offset 0xffffffffffffffff"],
    );
    // Doorbells: only 2 or 4 bytes.
    for w in [0usize, 1, 3, 8] {
        let e = dev.doorbell(0, 0x20, w).unwrap_err().to_string();
        assert!(
            e.contains(&format!("{w}-byte access at offset 0x20")),
            "{e}"
        );
    }
    assert!(dev.doorbell(0, 0x20, 4).is_ok());
    // Absent and impossible BARs.
    let e = dev.read32(2, 0).unwrap_err().to_string();
    assert!(
        e.contains("BAR 2 does not exist (the device has BARs 0)"),
        "{e}"
    );
    let e = dev.read32(9, 0).unwrap_err().to_string();
    assert!(e.contains("BAR 9 does not exist"), "{e}");
    // Configuration space.
    let e = dev.config_read32(254).unwrap_err().to_string();
    assert!(
        e.contains("config space access of 4 bytes at 0xfe is outside the 256-byte space"),
        "{e}"
    );
    // In range, the register round-trips.
    dev.write64(0, reg::SRC, 0x1122_3344_5566_7788).unwrap();
    assert_eq!(dev.read64(0, reg::SRC).unwrap(), 0x1122_3344_5566_7788);
}

#[test]
fn capability_walk_lists_and_detects_a_loop() {
    let (dev, _domain, _region) = setup(0);
    let caps = dev.capabilities().unwrap();
    assert_eq!(
        caps.iter()
            .map(|c| (c.id, c.offset, c.len))
            .collect::<Vec<_>>(),
        vec![(cap_id::MSIX, 0x40, 0), (cap_id::VENDOR, 0x50, 16)]
    );
    assert_eq!(dev.ids().unwrap(), (0x1234, 0x5678));

    let (looped, _d, _r) = setup(0x40);
    let e = looped.capabilities().unwrap_err();
    assert!(matches!(e, PciError::BadCapList { .. }), "{e:?}");
    assert!(e.to_string().contains("loop at 0x40"), "{e}");

    let (into_header, _d, _r) = setup(0x20);
    let e = into_header.capabilities().unwrap_err().to_string();
    assert!(e.contains("pointer 0x20 into the header"), "{e}");
}

#[test]
fn two_model_devices_share_one_domain() {
    // Two devices in one model domain see the same mappings (one domain per VM).
    let (dev, domain, _region) = setup(0);
    let other = model::open(TinyDma::new(0), &domain).unwrap();
    assert!(other.domain().same(dev.domain()));
    let (_, mem) = domain.view();
    mem.write(IOVA, &[7u8; 8]).unwrap();
    assert_eq!(start_dma(&other, IOVA, IOVA + 8, 8, 0), 0);
    let mut b = [0u8; 8];
    mem.read(IOVA + 8, &mut b).unwrap();
    assert_eq!(b, [7u8; 8]);
}

//! Guest memory tables: validation, translation, copies, fd mappings; the net header.

mod virtio_common;

use std::io::{Read, Seek, SeekFrom, Write};
use std::os::fd::AsFd;

use vdpakit_core::mem::{MemMode, Segment};
use vdpakit_core::virtio::features::{VIRTIO_F_VERSION_1, VIRTIO_NET_F_MRG_RXBUF};
use vdpakit_core::virtio::net::{VIRTIO_NET_HDR_F_NEEDS_CSUM, VIRTIO_NET_HDR_GSO_TCPV4, hdr_len};
use vdpakit_core::virtio::{
    DeviceQueue, DirtyLog, GuestMemory, GuestRegion, MAX_REGIONS, QueueError, Segs, VirtioNetHdr,
};
use virtio_common::{Rng, UVA_OFFSET, anon, memory, region};

fn raw_region(gpa: u64, size: u64, uva: u64) -> GuestRegion {
    let (keep, host) = anon(4096);
    // SAFETY: validation tests never access these regions (their sizes may exceed the 4 KiB
    // mapping; `GuestMemory::new` fails before any access).
    unsafe { GuestRegion::from_raw(host, size, gpa, uva, Some(keep)) }
}

#[test]
fn new_rejects_bad_tables() {
    let e = GuestMemory::new(vec![
        raw_region(0, 4096, 0),
        raw_region(0x10_0000, 0, 0x10_0000),
    ]);
    assert!(matches!(
        e,
        Err(QueueError::RegionEmpty {
            index: 1,
            gpa: 0x10_0000
        })
    ));
    let e = GuestMemory::new(vec![raw_region(u64::MAX - 0xfff, 0x2000, 0)]);
    assert!(matches!(
        e,
        Err(QueueError::RegionOverflow {
            index: 0,
            space: "gpa",
            ..
        })
    ));
    let e = GuestMemory::new(vec![
        raw_region(0, 4096, 0),
        raw_region(0x1000, 0x2000, u64::MAX - 0x1000),
    ]);
    assert!(matches!(
        e,
        Err(QueueError::RegionOverflow {
            index: 1,
            space: "uva",
            ..
        })
    ));
    // GPA overlap, given out of order: the later region in the list is named.
    let e = GuestMemory::new(vec![
        raw_region(0x10_0000, 0x1000, 0x10_0000),
        raw_region(0, 0x1000, 0),
        raw_region(0xf_f800, 0x1000, 0x50_0000),
    ]);
    match e {
        Err(QueueError::RegionOverlap {
            index,
            other,
            space,
            start,
            end,
            other_start,
            other_end,
        }) => {
            assert_eq!((index, other, space), (2, 0, "gpa"));
            assert_eq!((start, end), (0xf_f800, 0x10_0800));
            assert_eq!((other_start, other_end), (0x10_0000, 0x10_1000));
        }
        other => panic!("{other:?}"),
    }
    let e = GuestMemory::new(vec![
        raw_region(0, 0x1000, 0x7000),
        raw_region(0x1000, 0x1000, 0x7fff),
    ]);
    assert!(matches!(
        e,
        Err(QueueError::RegionOverlap {
            index: 1,
            other: 0,
            space: "uva",
            ..
        })
    ));
    let msg = GuestMemory::new(vec![
        raw_region(0, 0x1000, 0),
        raw_region(0x800, 0x1000, 0x8000),
    ])
    .unwrap_err()
    .to_string();
    assert!(msg.contains("region 1") && msg.contains("0x800"), "{msg}");
    // Adjacent regions are fine.
    GuestMemory::new(vec![
        raw_region(0, 0x1000, 0x1000),
        raw_region(0x1000, 0x1000, 0),
    ])
    .unwrap();
    // Region count.
    let many = |n: u64| {
        (0..n)
            .map(|i| raw_region(i << 20, 4096, i << 20))
            .collect::<Vec<_>>()
    };
    assert!(GuestMemory::new(many(MAX_REGIONS as u64)).is_ok());
    assert!(matches!(
        GuestMemory::new(many(MAX_REGIONS as u64 + 1)),
        Err(QueueError::TooManyRegions {
            count: 510,
            max: 509
        })
    ));
}

#[test]
fn translation_boundaries() {
    // Given out of order; sorted inside.
    let mem = memory(&[(0x20_0000, 0x1000), (0x1000, 0x1000), (0x2000, 0x1000)]);
    assert_eq!(
        mem.regions().iter().map(|r| r.gpa()).collect::<Vec<_>>(),
        [0x1000, 0x2000, 0x20_0000]
    );
    let r0 = mem.regions()[0].host();
    assert_eq!(mem.gpa_to_host(0x1000, 0x1000), Some(r0));
    assert_eq!(mem.gpa_to_host(0x1fff, 1), Some(r0.wrapping_add(0xfff)));
    assert_eq!(mem.gpa_to_host(0x1fff, 0), Some(r0.wrapping_add(0xfff)));
    assert_eq!(mem.gpa_to_host(0x1fff, 2), None, "spans two regions");
    assert_eq!(mem.gpa_to_host(0x1000, 0x1001), None);
    assert_eq!(mem.gpa_to_host(0xfff, 1), None);
    assert_eq!(
        mem.gpa_to_host(0x3000, 0),
        None,
        "end of a region is not inside"
    );
    assert_eq!(mem.gpa_to_host(0x20_0fff, u64::MAX), None);
    assert_eq!(mem.gpa_to_host(u64::MAX, 1), None);
    assert_eq!(
        mem.gpa_to_host(0x20_0000, 0x1000),
        Some(mem.regions()[2].host())
    );
    // UVA (region uva = gpa + UVA_OFFSET).
    assert_eq!(
        mem.uva_to_host(0x1800 + UVA_OFFSET, 0x800),
        Some(r0.wrapping_add(0x800))
    );
    assert_eq!(mem.uva_to_host(0x1800 + UVA_OFFSET, 0x801), None);
    assert_eq!(mem.uva_to_host(0x1800, 1), None);
    assert_eq!(mem.uva_to_gpa(0x20_0123 + UVA_OFFSET), Some(0x20_0123));
    assert_eq!(mem.uva_to_gpa(0x20_1000 + UVA_OFFSET), None);
    assert_eq!(GuestMemory::empty().gpa_to_host(0, 0), None);
    assert!(mem.ptr_eq(&mem.clone()));
    assert!(!mem.ptr_eq(&GuestMemory::empty()));
}

/// Many regions (the binary-search path) against a linear reference.
#[test]
fn translation_many_regions() {
    let ranges: Vec<(u64, usize)> = (0..40u64)
        .map(|i| {
            (
                0x1000 + i * 0x8000 + (i % 3) * 0x1000,
                0x1000 + (i as usize % 4) * 0x1000,
            )
        })
        .collect();
    let mem = memory(&ranges);
    let mut rng = Rng(3);
    for _ in 0..20_000 {
        let gpa = rng.below(0x40_0000);
        let len = rng.below(0x3000);
        let want = mem.regions().iter().find_map(|r| {
            (gpa >= r.gpa() && gpa - r.gpa() < r.size() && len <= r.size() - (gpa - r.gpa()))
                .then(|| r.host().wrapping_add((gpa - r.gpa()) as usize))
        });
        assert_eq!(mem.gpa_to_host(gpa, len), want, "{gpa:#x}+{len:#x}");
    }
}

#[test]
fn read_write_copies() {
    let mem = memory(&[(0, 0x1000), (0x1000, 0x1000), (0x3000, 0x1000)]);
    let data: Vec<u8> = (0..0x1800u32).map(|i| (i * 7) as u8).collect();
    // Across the seam of two adjacent regions.
    mem.write(0x400, &data).unwrap();
    let mut back = vec![0u8; data.len()];
    mem.read(0x400, &mut back).unwrap();
    assert_eq!(back, data);
    // Into the gap: an error, and nothing written.
    let before = {
        let mut b = vec![0u8; 0x10];
        mem.read(0x1ff0, &mut b).unwrap();
        b
    };
    assert!(matches!(
        mem.write(0x1ff0, &[0xaa; 0x20]),
        Err(QueueError::MemAccess {
            gpa: 0x1ff0,
            len: 0x20
        })
    ));
    let mut after = vec![0u8; 0x10];
    mem.read(0x1ff0, &mut after).unwrap();
    assert_eq!(after, before);
    assert!(mem.read(0x2000, &mut [0u8; 1]).is_err());
    assert!(mem.read(u64::MAX, &mut [0u8; 2]).is_err());
    mem.read(0x3fff, &mut [0u8; 1]).unwrap();
    mem.write(0x4000, &[]).unwrap_or(());
}

/// `slice` exposes part of a region (same memory) at the part's own address, and refuses
/// empty or out-of-range parts; rebased, it is how a device model builds a memory key's view.
#[test]
fn region_slice() {
    let mem = memory(&[(0x1_0000, 0x4000)]);
    let r = mem.regions()[0].clone();
    let s = r.slice(0x1000, 0x800).unwrap();
    assert_eq!((s.gpa(), s.size()), (0x1_1000, 0x800));
    assert!(r.slice(0, 0).is_none());
    assert!(r.slice(0x3000, 0x1001).is_none());
    assert!(r.slice(u64::MAX, 2).is_none());
    assert!(r.slice(0, 0x4000).is_some());
    // Written through the rebased slice, read through the original region.
    let view = GuestMemory::new(vec![s.rebased(0x9000_0000, 0x9000_0000)]).unwrap();
    view.write(0x9000_0010, b"mkey").unwrap();
    let mut b = [0u8; 4];
    mem.read(0x1_1010, &mut b).unwrap();
    assert_eq!(&b, b"mkey");
    assert!(view.write(0x9000_07ff, b"xy").is_err());
}

/// `map_fd` maps a shared file at an offset that need not be page aligned: writes through guest
/// memory land in the file, and the mapping outlives the fd.
#[test]
fn map_fd_shares_the_file() {
    let fd = memfd::MemfdOptions::default()
        .create("virtio-mem-test")
        .unwrap();
    let mut file = fd.into_file();
    file.set_len(0x4000).unwrap();
    for (offset, gpa) in [(0x1000u64, 0x10_0000u64), (100, 0x20_0000)] {
        let r = GuestRegion::map_fd(file.as_fd(), offset, 0x2000, gpa, 0x7000_0000).unwrap();
        assert_eq!((r.gpa(), r.size(), r.uva()), (gpa, 0x2000, 0x7000_0000));
        let mem = GuestMemory::new(vec![r]).unwrap();
        let msg = format!("hello at {offset}");
        mem.write(gpa + 0x10, msg.as_bytes()).unwrap();
        let mut got = vec![0u8; msg.len()];
        file.seek(SeekFrom::Start(offset + 0x10)).unwrap();
        file.read_exact(&mut got).unwrap();
        assert_eq!(got, msg.as_bytes());
        file.seek(SeekFrom::Start(offset + 0x1ffe)).unwrap();
        file.write_all(b"xy").unwrap();
        let mut b = [0u8; 2];
        mem.read(gpa + 0x1ffe, &mut b).unwrap();
        assert_eq!(&b, b"xy");
    }
    let r = GuestRegion::map_fd(file.as_fd(), 0, 0x1000, 0, 0).unwrap();
    drop(file);
    let mem = GuestMemory::new(vec![r]).unwrap();
    mem.write(0, b"still mapped").unwrap();
    assert!(matches!(
        GuestRegion::map_fd(std::io::stdin().as_fd(), u64::MAX - 10, 0x1000, 0, 0),
        Err(QueueError::Map { .. })
    ));
}

/// A vdpakit segment (4 KiB pages, and hugepages when the machine has some) mapped a second time
/// as guest memory, whole and from an unaligned offset: both views see the same bytes, so a
/// vhost-user front end and back end can share rings.
#[test]
fn map_fd_of_a_segment() {
    for mode in [MemMode::NoHuge, MemMode::Auto] {
        let seg = Segment::new("virtio-mem", 0x40_0000, mode).unwrap();
        for offset in [0u64, 0x1234, 0x20_0100] {
            let size = seg.len() as u64 - offset;
            let uva = seg.base() as u64 + offset;
            let r = GuestRegion::map_fd(seg.as_fd(), offset, size, 0x1000_0000, uva).unwrap();
            let mem = GuestMemory::new(vec![r]).unwrap();
            mem.write(0x1000_0000 + 0x1234, b"shared").unwrap();
            let at = offset as usize + 0x1234;
            let mut b = vec![0u8; 6];
            // SAFETY: reading 6 bytes of the segment's own mapping (in bounds: `at + 6` is below
            // its length), which `seg` keeps alive; nothing writes concurrently.
            unsafe {
                std::ptr::copy_nonoverlapping(seg.base().wrapping_add(at), b.as_mut_ptr(), 6)
            };
            assert_eq!(b, b"shared", "{mode:?} at offset {offset:#x}");
            assert_eq!(mem.uva_to_gpa(uva + 0x10), Some(0x1000_0010));
            mem.write(0x1000_0000 + 0x1234, &[0; 6]).unwrap();
        }
    }
}

#[test]
fn dirty_log_map_fd() {
    let fd = memfd::MemfdOptions::default()
        .create("virtio-log-test")
        .unwrap();
    let mut file = fd.into_file();
    file.set_len(0x2000).unwrap();
    let l = DirtyLog::map(file.as_fd(), 0x1000, 0x1000).unwrap();
    assert_eq!(l.len(), 0x1000);
    l.mark(0x3000, 0x2000); // pages 3 and 4: byte 0, bits 3-4
    l.mark(0x1000 * 8 * 0x1000, 1); // one page past the end
    assert_eq!(l.ignored(), 1);
    let mut b = [0u8; 1];
    file.seek(SeekFrom::Start(0x1000)).unwrap();
    file.read_exact(&mut b).unwrap();
    assert_eq!(b[0], 0b1_1000);
}

#[test]
fn handles_are_send() {
    fn send<T: Send>() {}
    fn sync<T: Sync>() {}
    send::<GuestMemory>();
    sync::<GuestMemory>();
    send::<Segs>();
    send::<DeviceQueue>();
    send::<DirtyLog>();
    sync::<DirtyLog>();
    let _ = region(0, 4096);
}

#[test]
fn net_header() {
    assert_eq!(std::mem::size_of::<VirtioNetHdr>(), 12);
    assert_eq!(hdr_len(0), 10);
    assert_eq!(hdr_len(VIRTIO_NET_F_MRG_RXBUF), 12);
    assert_eq!(hdr_len(VIRTIO_F_VERSION_1), 12);
    let h = VirtioNetHdr {
        flags: VIRTIO_NET_HDR_F_NEEDS_CSUM,
        gso_type: VIRTIO_NET_HDR_GSO_TCPV4,
        hdr_len: 54,
        gso_size: 1448,
        csum_start: 34,
        csum_offset: 16,
        num_buffers: 3,
    };
    let b = h.to_bytes();
    assert_eq!(b, [1, 1, 54, 0, 0xa8, 0x05, 34, 0, 16, 0, 3, 0]);
    assert_eq!(VirtioNetHdr::from_bytes(&b), Some(h));
    assert_eq!(
        VirtioNetHdr::from_bytes(&b[..10]),
        Some(VirtioNetHdr {
            num_buffers: 0,
            ..h
        })
    );
    assert_eq!(VirtioNetHdr::from_bytes(&b[..9]), None);
}

/// A region restricted with `with_access`: the denied direction fails like memory that is not
/// there (copies, buffer translation in `pop`, ring areas), the allowed one works, and nothing
/// is written through a read-only region.
#[test]
fn access_restricted_regions() {
    use vdpakit_core::virtio::QueueConfig;
    use vdpakit_core::virtio::features::VIRTIO_F_RING_PACKED;
    let full = memory(&[(0, 0x2_0000), (0x10_0000, 0x1000), (0x10_1000, 0x1000)]);
    let rs = full.regions();
    let ro = rs[1].with_access(true, false);
    let wo = rs[2].with_access(false, true);
    assert!(ro.readable() && !ro.writable() && !wo.readable() && wo.writable());
    // Slices and prefixes keep the restriction.
    assert!(!ro.slice(0, 0x10).unwrap().writable());
    assert!(!wo.prefix(0x10).unwrap().readable());
    let mem = GuestMemory::new(vec![rs[0].clone(), ro, wo]).unwrap();
    full.write(0x10_0000, b"ro-bytes").unwrap();
    let mut b = [0u8; 8];
    mem.read(0x10_0000, &mut b).unwrap();
    assert_eq!(&b, b"ro-bytes");
    assert!(matches!(
        mem.write(0x10_0000, b"XX"),
        Err(QueueError::MemAccess { gpa: 0x10_0000, .. })
    ));
    assert!(mem.read(0x10_1000, &mut b).is_err());
    mem.write(0x10_1000, b"wo").unwrap();
    // A copy spanning a readable and an unreadable region fails whole.
    assert!(mem.read(0x10_0ffc, &mut b).is_err());
    full.read(0x10_0000, &mut b).unwrap();
    assert_eq!(
        &b, b"ro-bytes",
        "nothing written through the read-only region"
    );
    assert_eq!(mem.gpa_to_host_for(0x10_0000, 1, true), None);
    assert!(mem.gpa_to_host_for(0x10_0000, 1, false).is_some());

    // pop: a device-writable buffer in the read-only region and a device-readable one in the
    // write-only region are bad buffers (named with their direction); the other way round works.
    for packed in [false, true] {
        let f = VIRTIO_F_VERSION_1 | if packed { VIRTIO_F_RING_PACKED } else { 0 };
        let (mut drv, mut dev) = virtio_common::pair(&mem, 8, f);
        let mut segs = Segs::new();
        for (addr, write, ok) in [
            (0x10_0000u64, true, false),
            (0x10_1000, false, false),
            (0x10_0000, false, true),
            (0x10_1000, true, true),
        ] {
            drv.add(&[(addr, 64, write)]).unwrap();
            drv.publish_avail();
            let r = dev.pop(&mem, &mut segs);
            if ok {
                let c = r.unwrap().unwrap();
                dev.push_used(&c, 0);
                dev.publish_used();
                while drv.reap().unwrap().is_some() {}
            } else {
                match r {
                    Err(QueueError::BadBuffer {
                        addr: a,
                        len: 64,
                        write: w,
                    }) => {
                        assert_eq!((a, w), (addr, write), "packed {packed}")
                    }
                    other => panic!("packed {packed}: {addr:#x} write {write}: {other:?}"),
                }
                // Errors leave the position: the same chain fails again.
                assert!(dev.pop(&mem, &mut segs).is_err());
                break;
            }
        }
        // Rings: the device writes the used ring (split) / descriptor ring (packed), so a
        // read-only region cannot hold them.
        let cfg = QueueConfig::at(0x10_0000, 4, f);
        match DeviceQueue::new(&cfg, &mem) {
            Err(QueueError::RingNotInMemory { .. }) => {}
            other => panic!("packed {packed}: rings in a read-only region: {other:?}"),
        }
    }
}

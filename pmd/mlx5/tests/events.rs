//! The QP event mode: EQ, CQ and QP commands against the model (ids, references, state
//! transitions, firmware-style failures the driver names by opcode), the notification chain
//! driven by hand (CQE and EQE contents and owner bits, one EQE per arm, arming with entries
//! pending, a driver QP out of receive WQEs, a collapsed CQ), and the device in `event_mode=qp`:
//! traffic both ways with exact counts, one call-eventfd signal per notification the rings asked
//! for, suppression respected, suspend/resume, queues without a call eventfd.

mod common;

use std::os::fd::{AsFd, OwnedFd};
use std::sync::Arc;
use std::time::Duration;

use common::*;
use nix::sys::eventfd::{EfdFlags, EventFd};
use vdpakit_core::vdpa::VdpaDevice;
use vdpakit_core::virtio::{DriverQueue, QueueConfig};
use vdpakit_pmd_mlx5::Mlx5Vdpa;
use vdpakit_pmd_mlx5::dma::DmaBuf;
use vdpakit_pmd_mlx5::error::Error;
use vdpakit_pmd_mlx5::event::{CqAttr, EqAttr, QpAttr};
use vdpakit_pmd_mlx5::hca::{Hca, cmd_in};
use vdpakit_pmd_mlx5::model::{Kind, Mlx5Model, ModelOptions, qps, syndrome_of};
use vdpakit_pmd_mlx5::prm::{hdr, op, qp, vq};
use vdpakit_pmd_mlx5::res::KeyPiece;
use vdpakit_pmd_mlx5::virtq::{VirtqAttr, Vq};

const HDR: usize = 12;

fn expect(e: Error, status: u8, names: &str) -> String {
    let s = e.to_string();
    assert_eq!(e.status(), Some(status), "{s}");
    assert!(s.contains(names), "'{s}' should name {names}");
    s
}

/// A function with a UAR, a PD, a key over guest memory, a transport domain and a TIS.
struct Rig {
    m: Arc<Mlx5Model>,
    h: Hca,
    g: Guest,
    uar: u32,
    pd: u32,
    key: u32,
    tis: u32,
}

fn rig() -> Rig {
    let (m, h) = hca(ModelOptions::default());
    let g = Guest::new(h.pci().domain());
    let uar = h.alloc_uar().unwrap();
    let pd = h.alloc_pd().unwrap();
    let key = h
        .create_mtt_mkey(
            pd,
            KeyPiece {
                va: GPA,
                iova: GPA,
                len: GUEST_MEM as u64,
            },
            3,
        )
        .unwrap();
    let td = h.alloc_td().unwrap();
    let tis = h.create_tis(td).unwrap();
    Rig {
        m,
        h,
        g,
        uar,
        pd,
        key,
        tis,
    }
}

/// Driver memory for a ring of `bytes`.
fn mem(h: &Hca, bytes: u64) -> DmaBuf {
    h.arena().alloc(bytes).unwrap()
}

#[test]
fn eq_cq_qp_commands_and_failures() {
    let r = rig();
    let (m, h) = (&r.m, &r.h);
    let eq_ring = mem(h, 64 * 64);
    let eqa = EqAttr {
        log_size: 6,
        uar: r.uar,
        vector: 3,
        pages: eq_ring.pages().collect(),
    };
    // EQ: bad vector, unknown UAR, too large, unaligned page, pages missing.
    expect(
        h.create_eq(&EqAttr {
            vector: 17,
            ..eqa.clone()
        })
        .unwrap_err(),
        3,
        "CREATE_EQ [opcode 0x0301] failed: bad parameter",
    );
    assert_eq!(
        m.last_failure().unwrap().reason,
        "EQ interrupt beyond the function's MSI-X vectors"
    );
    expect(
        h.create_eq(&EqAttr {
            uar: 0x4242,
            ..eqa.clone()
        })
        .unwrap_err(),
        5,
        "CREATE_EQ",
    );
    expect(
        h.create_eq(&EqAttr {
            log_size: 20,
            ..eqa.clone()
        })
        .unwrap_err(),
        8,
        "CREATE_EQ",
    );
    expect(
        h.create_eq(&EqAttr {
            pages: vec![eq_ring.iova() + 0x40],
            ..eqa.clone()
        })
        .unwrap_err(),
        3,
        "CREATE_EQ",
    );
    expect(
        h.create_eq(&EqAttr {
            log_size: 7,
            ..eqa.clone()
        })
        .unwrap_err(),
        0x50,
        "CREATE_EQ",
    );
    let eqn = h.create_eq(&eqa).unwrap();
    assert_eq!(m.eq(eqn.into()).unwrap().intr, 3);
    assert!(!m.eq(eqn.into()).unwrap().armed, "an EQ starts unarmed");
    expect(h.destroy_eq(eqn ^ 0x80).unwrap_err(), 5, "DESTROY_EQ");
    expect(h.dealloc_uar(r.uar).unwrap_err(), 9, "DEALLOC_UAR");

    // CQ: 128-byte CQEs, unknown EQ, doorbell record unaligned or unmapped.
    let cq_ring = mem(h, 64 * 64);
    let rec = mem(h, 4096);
    let cqa = CqAttr {
        log_size: 6,
        uar: r.uar,
        eqn,
        dbr: rec.iova(),
        pages: cq_ring.pages().collect(),
        ..CqAttr::default()
    };
    let mut raw = cmd_in(op::CREATE_CQ, 0, 0x118);
    raw.set(vdpakit_pmd_mlx5::prm::cq::CQE_SZ, 1);
    expect(
        h.exec(&raw, 16).unwrap_err(),
        3,
        "CREATE_CQ [opcode 0x0400]",
    );
    assert_eq!(
        m.last_failure().unwrap().reason,
        "CQE size not supported (64 bytes only)"
    );
    expect(
        h.create_cq(&CqAttr {
            eqn: eqn.wrapping_add(1),
            ..cqa.clone()
        })
        .unwrap_err(),
        5,
        "CREATE_CQ",
    );
    expect(
        h.create_cq(&CqAttr {
            dbr: rec.iova() + 4,
            ..cqa.clone()
        })
        .unwrap_err(),
        3,
        "CREATE_CQ",
    );
    let faults = h.pci().domain().faults().0;
    expect(
        h.create_cq(&CqAttr {
            dbr: 0x7000_0000,
            ..cqa.clone()
        })
        .unwrap_err(),
        3,
        "CREATE_CQ",
    );
    assert_eq!(
        m.last_failure().unwrap().reason,
        "doorbell record not reachable by DMA"
    );
    assert!(
        h.pci().domain().faults().0 > faults,
        "an IOMMU fault is recorded"
    );
    let cqn = h.create_cq(&cqa).unwrap();
    assert_eq!(m.cq(cqn).unwrap().eqn, eqn);
    expect(
        h.destroy_eq(eqn).unwrap_err(),
        9,
        "DESTROY_EQ [opcode 0x0302]",
    );

    // QPs: unknown PD or CQ, unsupported queue type, send queue, service type.
    let rq = mem(h, 16 * 64);
    let drva = QpAttr {
        pd: r.pd,
        uar: r.uar,
        cqn,
        log_rq_size: 6,
        dbr: rec.iova() + 64,
        pages: rq.pages().collect(),
        ..QpAttr::default()
    };
    expect(
        h.create_qp(&QpAttr {
            pd: 0x4242,
            ..drva.clone()
        })
        .unwrap_err(),
        5,
        "CREATE_QP [opcode 0x0500] failed: bad resource",
    );
    expect(
        h.create_qp(&QpAttr {
            cqn: 0x4242,
            ..drva.clone()
        })
        .unwrap_err(),
        5,
        "CREATE_QP",
    );
    let bad_qp = |f: &dyn Fn(&mut vdpakit_pmd_mlx5::prm::Buf), why: &str| {
        let mut b = cmd_in(op::CREATE_QP, 0, 0x118);
        b.set(qp::PD, r.pd.into());
        b.set(qp::NO_SQ, 1);
        b.set(qp::RQ_TYPE, qp::RQ_ZERO_LENGTH);
        f(&mut b);
        expect(h.exec(&b, 16).unwrap_err(), 3, "CREATE_QP");
        assert_eq!(m.last_failure().unwrap().reason, why);
        assert_eq!(m.last_failure().unwrap().syndrome, syndrome_of(why));
    };
    bad_qp(
        &|b| b.set(qp::RQ_TYPE, 1),
        "receive queue type not supported (regular or zero-length)",
    );
    bad_qp(
        &|b| b.set(qp::NO_SQ, 0),
        "send queues are not supported (no_sq must be 1)",
    );
    bad_qp(
        &|b| b.set(qp::ST, 1),
        "QP service type not supported (RC only)",
    );
    let fw = h
        .create_qp(&QpAttr {
            pd: r.pd,
            zero_length: true,
            ..QpAttr::default()
        })
        .unwrap();
    let drv = h.create_qp(&drva).unwrap();
    expect(
        h.destroy_cq(cqn).unwrap_err(),
        9,
        "DESTROY_CQ [opcode 0x0401]",
    );
    assert_eq!(m.qp(fw).unwrap().state, qps::RST);

    // Transitions: only in order, towards an existing QP, on port 1.
    expect(
        h.modify_qp(op::INIT2RTR_QP, fw, drv).unwrap_err(),
        0x10,
        "INIT2RTR_QP [opcode 0x0503] failed: bad QP state",
    );
    expect(
        h.modify_qp(op::RTR2RTS_QP, fw, drv).unwrap_err(),
        0x10,
        "RTR2RTS_QP [opcode 0x0504]",
    );
    let mut b = cmd_in(op::RST2INIT_QP, 0, qp::MODIFY_LEN);
    b.set(hdr::ID, fw.into());
    b.set(qp::VHCA_PORT_NUM, 2);
    expect(
        h.exec(&b, 16).unwrap_err(),
        3,
        "RST2INIT_QP [opcode 0x0502]",
    );
    expect(
        h.exec(&cmd_in(op::RST2INIT_QP, 0, 0x40), 16).unwrap_err(),
        0x50,
        "RST2INIT_QP",
    );
    h.modify_qp(op::RST2INIT_QP, fw, drv).unwrap();
    expect(
        h.modify_qp(op::RST2INIT_QP, fw, drv).unwrap_err(),
        0x10,
        "RST2INIT_QP",
    );
    expect(
        h.modify_qp(op::INIT2RTR_QP, fw, 0x4242).unwrap_err(),
        3,
        "INIT2RTR_QP",
    );
    assert_eq!(
        m.last_failure().unwrap().reason,
        "remote QP missing, itself, or not a QP of this function"
    );
    h.modify_qp(op::INIT2RTR_QP, fw, drv).unwrap();
    h.modify_qp(op::RTR2RTS_QP, fw, drv).unwrap();
    let q = m.qp(fw).unwrap();
    assert_eq!((q.state, q.remote, q.zero_rq), (qps::RTS, drv, true));
    assert_eq!(
        q.path,
        (1, 7, 7, 14),
        "MTU 256, retries 7/7, ack timeout 14"
    );
    // 2RST from anywhere, then the connection again.
    h.modify_qp(op::QP_2RST, fw, 0).unwrap();
    assert_eq!(m.qp(fw).unwrap().state, qps::RST);
    h.connect_qps(fw, drv).unwrap();
    assert_eq!(m.qp(drv).unwrap().state, qps::RTS);
    assert_eq!(m.qp(drv).unwrap().cqn, cqn);

    // A queue object in QP mode names a firmware QP that exists.
    let attr = VirtqAttr {
        index: 1,
        size: 64,
        desc: ring_base(1),
        avail: ring_base(1) + 0x400,
        used: ring_base(1) + 0x800,
        mkey: r.key,
        pd: r.pd,
        tisn: r.tis,
        event_mode: vq::EVENT_QP,
        event_target: 0x4242,
        ..Default::default()
    };
    expect(
        Vq::create(h, &attr).unwrap_err(),
        5,
        "CREATE_GENERAL_OBJECT(VIRTIO_NET_Q)",
    );
    expect(
        Vq::create(
            h,
            &VirtqAttr {
                event_target: drv,
                ..attr.clone()
            },
        )
        .unwrap_err(),
        3,
        "CREATE_GENERAL_OBJECT(VIRTIO_NET_Q)",
    );
    assert_eq!(
        m.last_failure().unwrap().reason,
        "event QP is not a firmware QP (zero-length receive queue)"
    );
    let v = Vq::create(
        h,
        &VirtqAttr {
            event_target: fw,
            ..attr.clone()
        },
    )
    .unwrap();
    let back = h.query_virtq(v.id).unwrap();
    assert_eq!((back.event_mode, back.event_target), (vq::EVENT_QP, fw));
    expect(
        h.destroy_qp(fw).unwrap_err(),
        9,
        "DESTROY_QP [opcode 0x0501]",
    );
    let census = m.census();
    assert_eq!(
        (census[&Kind::Eq], census[&Kind::Cq], census[&Kind::Qp]),
        (1, 1, 2)
    );
    // Reverse order: everything goes.
    v.destroy(h).unwrap();
    h.destroy_qp(drv).unwrap();
    h.destroy_qp(fw).unwrap();
    expect(h.destroy_qp(fw).unwrap_err(), 5, "DESTROY_QP");
    h.destroy_cq(cqn).unwrap();
    h.destroy_eq(eqn).unwrap();
    let census = m.census();
    assert!(
        !census.contains_key(&Kind::Eq)
            && !census.contains_key(&Kind::Cq)
            && !census.contains_key(&Kind::Qp),
        "{census:?}"
    );
}

fn efd() -> Arc<OwnedFd> {
    Arc::new(OwnedFd::from(
        EventFd::from_flags(EfdFlags::EFD_NONBLOCK).unwrap(),
    ))
}

fn count(fd: &OwnedFd) -> u64 {
    let mut b = [0u8; 8];
    match nix::unistd::read(fd.as_fd(), &mut b) {
        Ok(8) => u64::from_ne_bytes(b),
        _ => 0,
    }
}

fn be32_at(b: &DmaBuf, off: u64) -> u32 {
    let mut x = [0u8; 4];
    b.read(off, &mut x).unwrap();
    u32::from_be_bytes(x)
}

fn byte_at(b: &DmaBuf, off: u64) -> u8 {
    let mut x = [0u8; 1];
    b.read(off, &mut x).unwrap();
    x[0]
}

fn uar_write(h: &Hca, uar: u32, off: u64, bytes: &[u8]) {
    let at = u64::from(uar) * 4096 + off;
    match bytes.len() {
        4 => h
            .pci()
            .write32(0, at, u32::from_le_bytes(bytes.try_into().unwrap()))
            .unwrap(),
        _ => h
            .pci()
            .write64(0, at, u64::from_le_bytes(bytes.try_into().unwrap()))
            .unwrap(),
    }
}

fn arm_cq(h: &Hca, uar: u32, rec: &DmaBuf, cqn: u32, sn: u32, ci: u32) {
    let dw = (sn << 28) | ci;
    rec.write(4, &dw.to_be_bytes()).unwrap();
    let mut b = [0u8; 8];
    b[..4].copy_from_slice(&dw.to_be_bytes());
    b[4..].copy_from_slice(&cqn.to_be_bytes());
    uar_write(h, uar, 0x20, &b);
}

fn eq_doorbell(h: &Hca, uar: u32, eqn: u8, ci: u32, arm: bool) {
    let v = (u32::from(eqn) << 24) | ci;
    uar_write(h, uar, if arm { 0x40 } else { 0x48 }, &v.to_be_bytes());
}

/// A transmit queue in QP mode whose chain the test drives by hand, reading the CQ and EQ
/// rings with its own offsets: CQE contents and owner bits, one EQE per arm, arming with
/// completions pending, the EQ vector only when armed, a driver QP out of receive WQEs
/// (the notification waits, then comes once WQEs are posted and the CQ armed), and a collapsed
/// CQ (every CQE in entry 0, the WQE counter telling them apart).
/// A firmware QP and a driver QP (8 receive WQEs in `rq`, doorbell record at `rec` + 64,
/// completions on `cqn`, doorbells through `uar` if given) connected to each other with
/// `wqes` receive WQEs posted, and transmit queue 1 (64 entries, split) as a VIRTIO_NET_Q in
/// QP mode naming the firmware QP, in RDY. Returns (firmware QP, driver QP, vdpakit's driver
/// side of the ring, the queue object).
fn qp_queue(
    r: &Rig,
    cqn: u32,
    uar: Option<u32>,
    rec: &DmaBuf,
    rq: &DmaBuf,
    wqes: u32,
) -> (u32, u32, DriverQueue, Vq) {
    let h = &r.h;
    let fw = h
        .create_qp(&QpAttr {
            pd: r.pd,
            zero_length: true,
            ..QpAttr::default()
        })
        .unwrap();
    let drv = h
        .create_qp(&QpAttr {
            pd: r.pd,
            uar: uar.unwrap_or_default(),
            cqn,
            log_rq_size: 3,
            dbr: rec.iova() + 64,
            pages: rq.pages().collect(),
            ..QpAttr::default()
        })
        .unwrap();
    h.connect_qps(fw, drv).unwrap();
    rec.write(64, &wqes.to_be_bytes()).unwrap();
    let cfg = QueueConfig::at(ring_base(1), 64, features(false));
    let q = DriverQueue::new(&cfg, &r.g.mem).unwrap();
    let v = Vq::create(
        h,
        &VirtqAttr {
            index: 1,
            size: 64,
            version_1: true,
            desc: cfg.desc,
            avail: cfg.avail,
            used: cfg.used,
            mkey: r.key,
            pd: r.pd,
            tisn: r.tis,
            event_mode: vq::EVENT_QP,
            event_target: fw,
            ..Default::default()
        },
    )
    .unwrap();
    h.set_virtq_state(v.id, vq::STATE_RDY).unwrap();
    (fw, drv, q, v)
}

#[test]
fn notification_chain_by_hand() {
    for collapsed in [false, true] {
        let r = rig();
        let h = &r.h;
        let m = &r.m;
        let irq = efd();
        let mut fds = vec![None; 3];
        fds[2] = Some(irq.clone());
        h.pci().set_msix(&fds).unwrap();
        let eq_ring = mem(h, 64 * 64);
        for i in 0..64 {
            eq_ring.write(i * 64 + 63, &[1]).unwrap();
        }
        let eqn = h
            .create_eq(&EqAttr {
                log_size: 6,
                uar: r.uar,
                vector: 2,
                pages: eq_ring.pages().collect(),
            })
            .unwrap();
        // A CQ of 8 entries.
        let cq_ring = mem(h, 64 * 8);
        for i in 0..8 {
            cq_ring.write(i * 64 + 63, &[0xf0]).unwrap();
        }
        let rec = mem(h, 4096);
        let cqn = h
            .create_cq(&CqAttr {
                log_size: 3,
                uar: r.uar,
                eqn,
                dbr: rec.iova(),
                pages: cq_ring.pages().collect(),
                collapsed,
                ..CqAttr::default()
            })
            .unwrap();
        let rq = mem(h, 16 * 8);
        // Four receive WQEs posted.
        let (fw, drv, mut q, v) = qp_queue(&r, cqn, Some(r.uar), &rec, &rq, 4);
        h.set_virtq_state(v.id, vq::STATE_RDY).unwrap();
        let bell = h.caps().virtio.doorbell_offset;
        let mut sent = 0u32;
        // One frame, kicked, completed: one notification each.
        let mut one = |q: &mut DriverQueue| {
            let fr = frame([2, 0, 0, 0, 0, 9], 1, sent, 60);
            let mut b = vec![0u8; HDR];
            b.extend_from_slice(&fr);
            let addr = BUF_BASE + u64::from(sent % 64) * BUF;
            r.g.mem.write(addr, &b).unwrap();
            q.add(&[(addr, b.len() as u32, false)]).unwrap();
            q.publish_avail();
            h.pci().write16(0, bell, 1).unwrap();
            wait("the chain to complete", || q.reap().unwrap());
            sent += 1;
            wait("the notification", || {
                (m.notifies(1) == u64::from(sent)).then_some(())
            });
        };
        let cqe = |i: u64| {
            let at = if collapsed { 0 } else { i * 64 };
            (
                byte_at(&cq_ring, at + 63),
                be32_at(&cq_ring, at + 60) >> 16,
                be32_at(&cq_ring, at + 44),
            )
        };
        let eqe = |i: u64| {
            (
                byte_at(&eq_ring, i * 64 + 1),
                be32_at(&eq_ring, i * 64 + 0x38),
                byte_at(&eq_ring, i * 64 + 63),
            )
        };

        // Nothing armed: a CQE, no EQE, no interrupt.
        one(&mut q);
        assert_eq!(cqe(0), (0x20, 0, 0), "RESP_SEND, owner 0, WQE 0, no bytes");
        assert_eq!(m.cq(cqn).unwrap().pi, 1);
        assert_eq!(m.eq(eqn.into()).unwrap().pi, 0);
        // Arming the CQ at ci 0 with one CQE past it: the EQE comes at once, but the EQ is not
        // armed, so no interrupt.
        arm_cq(h, r.uar, &rec, cqn, 1, 0);
        assert_eq!(eqe(0), (0, cqn, 0), "COMP, the cqn, owner 0");
        assert_eq!(count(&irq), 0);
        // Arming the EQ at 0 with one EQE past it: the vector fires now.
        eq_doorbell(h, r.uar, eqn, 0, true);
        assert_eq!(count(&irq), 1);
        // The CQ was disarmed by its EQE: the next CQE gives none.
        one(&mut q);
        assert_eq!(cqe(1).1, 1, "WQE counter 1");
        assert_eq!(m.eq(eqn.into()).unwrap().pi, 1);
        // Consumer caught up (EQ 1, CQ 2), both armed: the next notification is one EQE and
        // one interrupt.
        rec.write(0, &2u32.to_be_bytes()).unwrap();
        eq_doorbell(h, r.uar, eqn, 1, true);
        arm_cq(h, r.uar, &rec, cqn, 2, 2);
        assert!(m.cq(cqn).unwrap().armed && m.eq(eqn.into()).unwrap().armed);
        assert_eq!(m.cq(cqn).unwrap().arm_sn, 2);
        one(&mut q);
        assert_eq!((cqe(2).1, eqe(1).1), (2, cqn));
        assert_eq!(count(&irq), 1);
        // An update-only doorbell moves the consumer index without arming: the next EQE is
        // written, no interrupt.
        rec.write(0, &3u32.to_be_bytes()).unwrap();
        arm_cq(h, r.uar, &rec, cqn, 3, 3);
        eq_doorbell(h, r.uar, eqn, 2, false);
        one(&mut q);
        assert_eq!((cqe(3).1, eqe(2).1), (3, cqn));
        let e = m.eq(eqn.into()).unwrap();
        assert_eq!((e.pi, e.ci, e.armed), (3, 2, false));
        assert_eq!(count(&irq), 0);
        // Four WQEs, all used: the fifth notification waits.
        let waits = m.stats().rnr_waits;
        let before = m.cq(cqn).unwrap().pi;
        one(&mut q);
        assert_eq!(m.cq(cqn).unwrap().pi, before, "no WQE, no CQE");
        assert!(m.stats().rnr_waits > waits);
        assert_eq!(m.qp(drv).unwrap().pending, 1);
        // Four more WQEs and the CQ armed: the waiting notification completes.
        rec.write(0, &4u32.to_be_bytes()).unwrap();
        rec.write(64, &8u32.to_be_bytes()).unwrap();
        arm_cq(h, r.uar, &rec, cqn, 3, 4);
        assert_eq!(m.cq(cqn).unwrap().pi, 5);
        assert_eq!(m.qp(drv).unwrap().pending, 0);
        assert_eq!(cqe(4).1, 4);
        // Into the second pass of the CQ: the owner bit flips (a collapsed CQ rewrites entry 0,
        // its owner following the passes of its nominal size too).
        for i in 5..8 {
            one(&mut q);
            assert_eq!(cqe(i).1, i as u32);
            assert_eq!(cqe(i).0, 0x20);
        }
        rec.write(0, &8u32.to_be_bytes()).unwrap();
        rec.write(64, &16u32.to_be_bytes()).unwrap();
        arm_cq(h, r.uar, &rec, cqn, 0, 8);
        one(&mut q);
        assert_eq!(cqe(0).0, 0x21, "second pass: owner 1");
        assert_eq!(cqe(0).1, 8, "entry 0 rewritten by WQE 8");
        let s = m.stats();
        assert_eq!(s.events_lost + s.cq_overruns + s.eq_overruns, 0, "{s:?}");
        assert_eq!(s.bad_doorbells, 0);
        // A doorbell through another UAR is not this CQ's.
        let other = h.alloc_uar().unwrap();
        arm_cq(h, other, &rec, cqn, 1, 9);
        assert_eq!(m.stats().bad_doorbells, 1);
        v.destroy(h).unwrap();
        h.destroy_qp(drv).unwrap();
        h.destroy_qp(fw).unwrap();
        h.destroy_cq(cqn).unwrap();
        h.destroy_eq(eqn).unwrap();
    }
}

/// A CQ the driver never empties: past its size, CQEs are dropped (an overrun), counted.
#[test]
fn cq_overrun_is_counted() {
    let r = rig();
    let h = &r.h;
    let m = &r.m;
    let eq_ring = mem(h, 4096);
    let eqn = h
        .create_eq(&EqAttr {
            log_size: 6,
            uar: r.uar,
            vector: 1,
            pages: eq_ring.pages().collect(),
        })
        .unwrap();
    let cq_ring = mem(h, 4096);
    let rec = mem(h, 4096);
    let cqn = h
        .create_cq(&CqAttr {
            log_size: 1,
            uar: r.uar,
            eqn,
            dbr: rec.iova(),
            pages: cq_ring.pages().collect(),
            ..CqAttr::default()
        })
        .unwrap();
    let rq = mem(h, 4096);
    let (_, _, mut q, v) = qp_queue(&r, cqn, None, &rec, &rq, 8);
    h.set_virtq_state(v.id, vq::STATE_RDY).unwrap();
    let bell = h.caps().virtio.doorbell_offset;
    for i in 0..3u32 {
        let fr = frame([2, 0, 0, 0, 0, 9], 1, i, 60);
        let mut b = vec![0u8; HDR];
        b.extend_from_slice(&fr);
        let addr = BUF_BASE + u64::from(i) * BUF;
        r.g.mem.write(addr, &b).unwrap();
        q.add(&[(addr, b.len() as u32, false)]).unwrap();
        q.publish_avail();
        h.pci().write16(0, bell, 1).unwrap();
        wait("completion", || q.reap().unwrap());
        wait("notification", || {
            (m.notifies(1) == u64::from(i) + 1).then_some(())
        });
    }
    let s = m.stats();
    assert_eq!((s.cqes, s.cq_overruns, s.events_lost), (2, 1, 1));
    v.destroy(h).unwrap();
}

// ---------------------------------------------------------------------------------------------
// The device in event_mode=qp.

/// Call-eventfd signals per ring, accumulated until each equals the notifications the model
/// says the ring asked for (bounded); returns them.
fn settle(model: &Mlx5Model, rings: &[&Ring], got: &mut [u64]) {
    wait("one signal per notification", || {
        for (k, r) in rings.iter().enumerate() {
            got[k] += r.interrupts();
        }
        rings
            .iter()
            .enumerate()
            .all(|(k, r)| got[k] == model.notifies(r.index))
            .then_some(())
    });
    // And nothing more arrives.
    std::thread::sleep(Duration::from_millis(30));
    for (k, r) in rings.iter().enumerate() {
        got[k] += r.interrupts();
        assert_eq!(got[k], model.notifies(r.index), "queue {}", r.index);
    }
}

fn check_objects(dev: &Mlx5Vdpa, model: &Mlx5Model, n: usize) {
    let (eqn, chains) = dev.event_objects().expect("QP mode objects");
    assert_eq!(chains.len(), n);
    let eq = model.eq(eqn.into()).unwrap();
    assert_eq!(eq.intr, 0, "the EQ on vector 0");
    let ids = dev.queue_objects();
    for (index, cqn, fw, drv) in chains {
        let f = model.qp(fw).unwrap();
        let d = model.qp(drv).unwrap();
        assert!(f.zero_rq && !d.zero_rq);
        assert_eq!((f.state, f.remote), (qps::RTS, drv), "queue {index}");
        assert_eq!((d.state, d.remote, d.cqn), (qps::RTS, fw, cqn));
        assert_eq!(model.cq(cqn).unwrap().eqn, eqn);
        let a = dev
            .hca()
            .query_virtq(ids[usize::from(index)].unwrap())
            .unwrap();
        assert_eq!((a.event_mode, a.event_target), (vq::EVENT_QP, fw));
    }
}

/// Two queue pairs, guest → wire and wire → guest with exact counts, every notification the
/// rings asked for arriving as exactly one call-eventfd signal on its own queue; afterwards the
/// driver has re-armed every CQ and the EQ and the model lost nothing.
#[test]
fn qp_mode_both_ways_exact_counts_and_signals() {
    for packed in [false, true] {
        let (mut dev, model) = device("model,event_mode=qp,queues=2,wire=port");
        let g = Guest::new(dev.domain());
        let f = features(packed);
        let mut rings: Vec<Ring> = (0..4).map(|i| Ring::new(&g, i, 256, f, true)).collect();
        let refs: Vec<&Ring> = rings.iter().collect();
        dev.configure(&conf(f, &refs)).unwrap();
        check_objects(&dev, &model, 4);
        let m = dev.net_config().mac;

        // Guest → wire, on both transmit queues.
        let out: Vec<Vec<u8>> = (0..600)
            .map(|i| frame([0x02, 7, 7, 7, 7, 7], 2, i, 100))
            .collect();
        let mut sent = [0usize; 2];
        let mut wire = Vec::new();
        wait("transmit to the wire", || {
            for (k, r) in [1usize, 3].into_iter().enumerate() {
                let half = &out[k * 300..(k + 1) * 300];
                if sent[k] < half.len() {
                    sent[k] += rings[r].transmit(&g, &dev, &half[sent[k]..], HDR);
                }
                rings[r].reap_tx();
            }
            wire.extend(model.take_tx());
            (wire.len() >= out.len()).then_some(())
        });
        assert_eq!(wire.len(), 600);
        let mut wire_sorted = wire.clone();
        wire_sorted.sort_by_key(|f| seq_of(f));
        assert_eq!(wire_sorted, out);

        // Wire → guest, flows spread over both receive queues.
        for r in rings.iter_mut().step_by(2) {
            r.post_rx(&dev, 256);
        }
        let inbound: Vec<Vec<u8>> = (0..800)
            .map(|i| frame(m, (i % 64) as u16, i, 64 + (i as usize % 700)))
            .collect();
        let mut got = Vec::new();
        let mut sent = 0;
        wait("receive from the wire", || {
            // Never more in flight than one ring's buffers: no frame finds its ring empty.
            while sent < inbound.len() && sent - got.len() < 256 {
                assert!(model.inject(&inbound[sent]));
                sent += 1;
            }
            for r in rings.iter_mut().step_by(2) {
                let x = r.reap_rx(&g, HDR);
                let n = x.len();
                got.extend(x);
                r.post_rx(&dev, n);
            }
            (got.len() >= inbound.len()).then_some(())
        });
        got.sort_by_key(|f| seq_of(f));
        assert_eq!(got, inbound);
        let s = model.stats();
        assert_eq!((s.tx_frames, s.rx_frames, s.steer_drops), (600, 800, 0));

        let refs: Vec<&Ring> = rings.iter().collect();
        let mut signals = [0u64; 4];
        settle(&model, &refs, &mut signals);
        for (i, n) in signals.iter().enumerate() {
            assert!(*n > 0, "packed={packed}: queue {i} was signalled");
        }
        let total: u64 = signals.iter().sum();
        let es = dev.event_stats().unwrap();
        assert_eq!(
            (es.cqes, es.signals, es.errors),
            (total, total, 0),
            "{es:?}"
        );
        let s = model.stats();
        assert_eq!(s.cqes, total);
        assert_eq!(es.eqes, s.eqes);
        assert!(s.eqes > 0 && s.eqes <= s.cqes);
        assert_eq!(
            (s.events_lost, s.cq_overruns, s.eq_overruns, s.bad_doorbells),
            (0, 0, 0, 0),
            "{s:?}"
        );
        // Quiet now: every CQ and the EQ armed again, consumer indices caught up.
        let (eqn, chains) = dev.event_objects().unwrap();
        let eq = model.eq(eqn.into()).unwrap();
        assert!(eq.armed && eq.ci == eq.pi, "{eq:?}");
        for (_, cqn, _, _) in chains {
            assert!(model.cq(cqn).unwrap().armed, "CQ {cqn:#x} re-armed");
        }
        dev.close().unwrap();
        assert!(dev.event_objects().is_none());
        assert_eq!(
            model.live_objects() - model.firmware_pages(),
            4,
            "{:?}",
            model.census()
        );
        let dom = dev.domain().clone();
        drop(dev);
        assert_eq!(model.live_objects(), 0);
        assert_eq!(model.stats().leaked_objects, 0);
        assert_eq!(dom.faults().0, 0);
    }
}

/// Rings that ask for no interrupts get none (the model sees no request, the eventfd stays
/// quiet) while the other ring's are delivered; asking again brings them back.
#[test]
fn qp_mode_respects_suppression() {
    for packed in [false, true] {
        let (mut dev, model) = device("model,event_mode=qp");
        let g = Guest::new(dev.domain());
        let f = features(packed);
        let mut rx = Ring::new(&g, 0, 256, f, true);
        let mut tx = Ring::new(&g, 1, 256, f, true);
        dev.configure(&conf(f, &[&rx, &tx])).unwrap();
        rx.q.set_interrupts(false);
        rx.post_rx(&dev, 256);
        let m = dev.net_config().mac;
        let frames: Vec<Vec<u8>> = (0..300).map(|i| frame(m, 1, i, 80)).collect();
        let mut sent = 0;
        let mut got = 0;
        wait("traffic with receive interrupts off", || {
            let end = frames.len().min(got + rx.posted());
            if sent < end {
                sent += tx.transmit(&g, &dev, &frames[sent..end], HDR);
            }
            tx.reap_tx();
            let n = rx.reap_rx(&g, HDR).len();
            got += n;
            rx.post_rx(&dev, n);
            (got >= frames.len()).then_some(())
        });
        let mut s = [0u64; 2];
        settle(&model, &[&rx, &tx], &mut s);
        assert_eq!(s[0], 0, "packed={packed}: suppressed");
        assert_eq!(model.notifies(0), 0);
        assert!(s[1] > 0);
        rx.q.set_interrupts(true);
        let more: Vec<Vec<u8>> = (300..400).map(|i| frame(m, 1, i, 80)).collect();
        let mut sent = 0;
        let mut got = 0;
        wait("traffic with receive interrupts on", || {
            let end = more.len().min(got + rx.posted());
            if sent < end {
                sent += tx.transmit(&g, &dev, &more[sent..end], HDR);
            }
            tx.reap_tx();
            let n = rx.reap_rx(&g, HDR).len();
            got += n;
            rx.post_rx(&dev, n);
            (got >= more.len()).then_some(())
        });
        settle(&model, &[&rx, &tx], &mut s);
        assert!(s[0] > 0, "packed={packed}: interrupts back");
    }
}

/// Sends `frames[range]` through the looped device (keeping the receive ring fed) until `got`
/// holds `range.end` frames.
fn pump(
    g: &Guest,
    dev: &dyn VdpaDevice,
    rx: &mut Ring,
    tx: &mut Ring,
    frames: &[Vec<u8>],
    range: std::ops::Range<usize>,
    got: &mut Vec<Vec<u8>>,
) {
    let mut sent = range.start;
    // Never more in flight than receive buffers posted.
    let window = rx.posted();
    wait("frames through the loop", || {
        let end = range.end.min(got.len() + window);
        if sent < end {
            sent += tx.transmit(g, dev, &frames[sent..end], HDR);
        }
        tx.reap_tx();
        let r = rx.reap_rx(g, HDR);
        let n = r.len();
        got.extend(r);
        rx.post_rx(dev, n);
        (got.len() >= range.end).then_some(())
    });
}

/// Suspend mid-traffic in QP mode: positions freeze, no notification and no signal while
/// suspended, resume delivers every frame once with every notification signalled.
#[test]
fn qp_mode_suspend_resume() {
    let (mut dev, model) = device("model,event_mode=qp");
    let g = Guest::new(dev.domain());
    let f = features(false);
    let mut rx = Ring::new(&g, 0, 256, f, true);
    let mut tx = Ring::new(&g, 1, 256, f, true);
    dev.configure(&conf(f, &[&rx, &tx])).unwrap();
    rx.post_rx(&dev, 256);
    let m = dev.net_config().mac;
    let frames: Vec<Vec<u8>> = (0..300).map(|i| frame(m, 5, i, 90)).collect();
    let mut got: Vec<Vec<u8>> = Vec::new();
    pump(&g, &dev, &mut rx, &mut tx, &frames, 0..100, &mut got);
    let mut s = [0u64; 2];
    settle(&model, &[&rx, &tx], &mut s);

    assert_eq!(tx.transmit(&g, &dev, &frames[100..160], HDR), 60);
    dev.suspend().unwrap();
    settle(&model, &[&rx, &tx], &mut s);
    let frozen = (model.notifies(0), model.notifies(1));
    let st1 = (dev.vring_state(0).unwrap(), dev.vring_state(1).unwrap());
    assert_eq!(tx.transmit(&g, &dev, &frames[160..200], HDR), 40);
    std::thread::sleep(Duration::from_millis(60));
    assert_eq!(
        (dev.vring_state(0).unwrap(), dev.vring_state(1).unwrap()),
        st1
    );
    assert_eq!((model.notifies(0), model.notifies(1)), frozen);
    assert_eq!(
        rx.interrupts() + tx.interrupts(),
        0,
        "no signal while suspended"
    );

    dev.resume().unwrap();
    pump(&g, &dev, &mut rx, &mut tx, &frames, 200..200, &mut got);
    pump(&g, &dev, &mut rx, &mut tx, &frames, 200..300, &mut got);
    assert_eq!(got, frames);
    settle(&model, &[&rx, &tx], &mut s);
    assert!(model.notifies(0) > frozen.0 && model.notifies(1) > frozen.1);
    let es = dev.event_stats().unwrap();
    assert_eq!(es.signals, s[0] + s[1]);
    assert_eq!(model.stats().events_lost, 0);
}

/// A queue without a call eventfd needs no interrupt: in QP mode it is NO_MSIX and gets no
/// chain, as in DPDK; a device with no call eventfd at all makes no EQ.
#[test]
fn qp_mode_queue_without_call_is_polled() {
    let (mut dev, model) = device("model,event_mode=qp");
    let g = Guest::new(dev.domain());
    let f = features(false);
    let mut rx = Ring::new(&g, 0, 64, f, true);
    let mut tx = Ring::new(&g, 1, 64, f, false);
    dev.configure(&conf(f, &[&rx, &tx])).unwrap();
    let (_, chains) = dev.event_objects().unwrap();
    assert_eq!(chains.iter().map(|c| c.0).collect::<Vec<_>>(), vec![0]);
    let a = dev
        .hca()
        .query_virtq(dev.queue_objects()[1].unwrap())
        .unwrap();
    assert_eq!(a.event_mode, vq::EVENT_NO_MSIX);
    rx.post_rx(&dev, 64);
    let m = dev.net_config().mac;
    let frames: Vec<Vec<u8>> = (0..100).map(|i| frame(m, 1, i, 70)).collect();
    let mut sent = 0;
    let mut got = 0;
    wait("traffic", || {
        let end = frames.len().min(got + rx.posted());
        if sent < end {
            sent += tx.transmit(&g, &dev, &frames[sent..end], HDR);
        }
        tx.reap_tx();
        let n = rx.reap_rx(&g, HDR).len();
        got += n;
        rx.post_rx(&dev, n);
        (got >= frames.len()).then_some(())
    });
    let mut s = [0u64; 1];
    settle(&model, &[&rx], &mut s);
    assert!(s[0] > 0);
    dev.close().unwrap();

    let rx = Ring::new(&g, 0, 64, f, false);
    let tx = Ring::new(&g, 1, 64, f, false);
    dev.configure(&conf(f, &[&rx, &tx])).unwrap();
    assert!(dev.event_objects().is_none());
    assert!(!model.census().contains_key(&Kind::Eq));
}

/// A device whose event_mode capability lacks QP refuses `event_mode=qp`, naming what it has.
#[test]
fn qp_mode_needs_the_capability() {
    let (_m, pci, _) = open_model(ModelOptions {
        event_modes: 0b101,
        ..ModelOptions::default()
    });
    let mut a = vdpakit_pmd_mlx5::Devargs::parse("model,event_mode=qp").unwrap();
    a.mem = vdpakit_core::mem::MemMode::NoHuge;
    a.dma_mem = 4 << 20;
    let e = Mlx5Vdpa::open(pci, a).unwrap_err().to_string();
    assert!(
        e.contains("event mode Qp: the device offers modes 0x5"),
        "{e}"
    );
}

/// A firmware failure half way through the chains' bring-up (the EQs are used up) surfaces
/// with the command named and leaves nothing behind.
#[test]
fn qp_mode_failure_names_the_command_and_undoes() {
    let (mut dev, model) = device("model,event_mode=qp");
    // Take every EQ the function has.
    let h = dev.hca();
    let ring = h.arena().alloc(4096).unwrap();
    let uar = h.alloc_uar().unwrap();
    let mut eqs = Vec::new();
    loop {
        match h.create_eq(&EqAttr {
            log_size: 6,
            uar,
            vector: 1,
            pages: vec![ring.iova()],
        }) {
            Ok(e) => eqs.push(e),
            Err(e) => {
                expect(e, 8, "CREATE_EQ");
                break;
            }
        }
    }
    assert_eq!(eqs.len(), 16);
    let base = model.live_objects();
    let g = Guest::new(dev.domain());
    let f = features(false);
    let rx = Ring::new(&g, 0, 64, f, true);
    let tx = Ring::new(&g, 1, 64, f, true);
    let e = dev
        .configure(&conf(f, &[&rx, &tx]))
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("CREATE_EQ [opcode 0x0301] failed: limits exceeded"),
        "{e}"
    );
    assert_eq!(model.live_objects(), base, "{:?}", model.census());
    let h = dev.hca();
    for q in eqs {
        h.destroy_eq(q).unwrap();
    }
    h.dealloc_uar(uar).unwrap();
    // And it works once EQs are free again.
    dev.configure(&conf(f, &[&rx, &tx])).unwrap();
    check_objects(&dev, &model, 2);
}

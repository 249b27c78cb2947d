//! Command encodings against the model: objects round-trip (create → query gives back what was
//! set; modify changes only what it selects), and malformed commands get firmware's answers:
//! delivery status for broken descriptors and mailboxes, command status + syndrome for wrong
//! sizes, unknown opcodes and ids, objects still in use, and state transitions the VIRTIO_NET_Q
//! state machine forbids. The driver's errors name the command.

mod common;

use std::time::Duration;

use common::*;
use vdpakit_core::mem::MemMode;
use vdpakit_core::pci::{PciDevice, cfg};
use vdpakit_pmd_mlx5::dma::{DmaArena, DmaBuf};
use vdpakit_pmd_mlx5::error::Error;
use vdpakit_pmd_mlx5::hca::{Hca, cmd_in};
use vdpakit_pmd_mlx5::model::{Kind, Mlx5Model, ModelOptions, NULL_MKEY, syndrome_of};
use vdpakit_pmd_mlx5::prm::{Buf, be_reg, cap, hdr, iseg, op, slot, vq};
use vdpakit_pmd_mlx5::res::KeyPiece;
use vdpakit_pmd_mlx5::virtq::{VirtqAttr, Vq};

// ---------------------------------------------------------------------------------------------
// Raw descriptors: a minimal command issuer that writes slot 0 by hand, to break it on purpose.

struct Raw {
    pci: PciDevice,
    arena: DmaArena,
    q: DmaBuf,
}

impl Raw {
    fn new(o: ModelOptions) -> (std::sync::Arc<Mlx5Model>, Raw) {
        let (m, pci, dom) = open_model(o);
        let c = pci.config_read16(cfg::COMMAND).unwrap();
        pci.config_write16(cfg::COMMAND, c | cfg::CMD_BUS_MASTER | cfg::CMD_MEMORY)
            .unwrap();
        let arena = DmaArena::new("raw", &dom, 1 << 20, MemMode::NoHuge).unwrap();
        let q = arena.alloc(4096).unwrap();
        pci.write32(0, iseg::CMDQ_ADDR_H, be_reg((q.iova() >> 32) as u32))
            .unwrap();
        pci.write32(0, iseg::CMDQ_ADDR_L_SZ, be_reg(q.iova() as u32))
            .unwrap();
        let raw = Raw { pci, arena, q };
        // Let the initializing bit clear.
        for _ in 0..10 {
            raw.pci.read32(0, iseg::INITIALIZING).unwrap();
        }
        (m, raw)
    }

    /// A descriptor for `inp` (inline part only) asking for `outlen` bytes, token 7.
    fn desc(inp: &[u8], inlen: u32, outlen: u32) -> [u8; 64] {
        let mut d = [0u8; 64];
        d[slot::TYPE] = slot::TYPE_PCI;
        d[slot::INLEN..slot::INLEN + 4].copy_from_slice(&inlen.to_be_bytes());
        let k = inp.len().min(16);
        d[slot::IN..slot::IN + k].copy_from_slice(&inp[..k]);
        d[slot::OUTLEN..slot::OUTLEN + 4].copy_from_slice(&outlen.to_be_bytes());
        d[slot::TOKEN] = 7;
        d[slot::STATUS_OWN] = 1;
        d
    }

    fn block(data: &[u8], num: u32, token: u8, next: u64) -> [u8; slot::MB_SIZE] {
        let mut b = [0u8; slot::MB_SIZE];
        b[..data.len().min(512)].copy_from_slice(&data[..data.len().min(512)]);
        b[slot::MB_NEXT..slot::MB_NEXT + 8].copy_from_slice(&next.to_be_bytes());
        b[slot::MB_BLOCK_NUM..slot::MB_BLOCK_NUM + 4].copy_from_slice(&num.to_be_bytes());
        b[slot::MB_TOKEN] = token;
        b
    }

    /// Runs descriptor `d`; returns (status_own, the 16 inline output bytes).
    fn run(&self, d: [u8; 64]) -> (u8, [u8; 16]) {
        self.q.write(0, &d).unwrap();
        self.pci.write32(0, iseg::CMD_DBELL, be_reg(1)).unwrap();
        let mut s = [0u8; 1];
        self.q.read(slot::STATUS_OWN as u64, &mut s).unwrap();
        let mut o = [0u8; 16];
        self.q.read(slot::OUT as u64, &mut o).unwrap();
        (s[0], o)
    }
}

fn enable_hca() -> Buf {
    cmd_in(op::ENABLE_HCA, 0, 16)
}

#[test]
fn delivery_status_for_broken_descriptors() {
    let (_m, raw) = Raw::new(ModelOptions::default());
    let inp = enable_hca();
    // Well formed: delivered, executed.
    let (s, o) = raw.run(Raw::desc(inp.as_bytes(), 16, 16));
    assert_eq!((s, o[0]), (0, 0));
    // Not owned by the device: untouched.
    let mut d = Raw::desc(inp.as_bytes(), 16, 16);
    d[slot::STATUS_OWN] = 0;
    d[slot::OUT] = 0xee;
    assert_eq!(raw.run(d).1[0], 0xee);
    // Wrong transport type.
    let mut d = Raw::desc(inp.as_bytes(), 16, 16);
    d[slot::TYPE] = 3;
    assert_eq!(raw.run(d).0, 0x10 << 1);
    // More input than inline without a mailbox.
    assert_eq!(raw.run(Raw::desc(inp.as_bytes(), 40, 16)).0, 7 << 1);
    // More output than inline without a mailbox.
    assert_eq!(raw.run(Raw::desc(inp.as_bytes(), 16, 40)).0, 8 << 1);

    let blk = raw.arena.alloc(4096).unwrap();
    let with_in = |ptr: u64| {
        let mut d = Raw::desc(inp.as_bytes(), 40, 16);
        d[slot::IN_PTR..slot::IN_PTR + 8].copy_from_slice(&ptr.to_be_bytes());
        d
    };
    // Misaligned input mailbox.
    assert_eq!(raw.run(with_in(blk.iova() + 0x200)).0, 5 << 1);
    // Token mismatch.
    blk.write(0, &Raw::block(&[0; 24], 0, 8, 0)).unwrap();
    assert_eq!(raw.run(with_in(blk.iova())).0, 2 << 1);
    // Block number out of order.
    blk.write(0, &Raw::block(&[0; 24], 1, 7, 0)).unwrap();
    assert_eq!(raw.run(with_in(blk.iova())).0, 3 << 1);
    // A good block.
    blk.write(0, &Raw::block(&[0; 24], 0, 7, 0)).unwrap();
    assert_eq!(raw.run(with_in(blk.iova())).0, 0);
    // Misaligned output mailbox.
    let mut d = Raw::desc(inp.as_bytes(), 16, 40);
    d[slot::OUT_PTR..slot::OUT_PTR + 8].copy_from_slice(&(blk.iova() + 8).to_be_bytes());
    assert_eq!(raw.run(d).0, 4 << 1);
}

/// A mailbox the domain does not map: an IOMMU fault, and firmware reports a delivery error.
#[test]
fn unmapped_mailbox_is_a_fault() {
    let (_m, raw) = Raw::new(ModelOptions::default());
    let dom = raw.pci.domain().clone();
    let mut d = Raw::desc(enable_hca().as_bytes(), 40, 16);
    d[slot::IN_PTR..slot::IN_PTR + 8].copy_from_slice(&0x1_0000_0000u64.to_be_bytes());
    assert_eq!(raw.run(d).0, 6 << 1);
    assert_eq!(dom.faults(), (1, Some(0x1_0000_0000)));
}

/// Before ENABLE_HCA nothing but ENABLE_HCA runs (bad system state); a second ENABLE_HCA too.
#[test]
fn function_state_gates_commands() {
    let (_m, raw) = Raw::new(ModelOptions::default());
    let pd = cmd_in(op::ALLOC_PD, 0, 16);
    let (s, o) = raw.run(Raw::desc(pd.as_bytes(), 16, 16));
    assert_eq!((s, o[0]), (0, 4));
    assert_eq!(
        u32::from_be_bytes([o[4], o[5], o[6], o[7]]),
        syndrome_of("function not enabled (ENABLE_HCA first)")
    );
    assert_eq!(raw.run(Raw::desc(enable_hca().as_bytes(), 16, 16)).1[0], 0);
    assert_eq!(raw.run(Raw::desc(enable_hca().as_bytes(), 16, 16)).1[0], 4);
    // Enabled but not initialized: resources are refused.
    assert_eq!(raw.run(Raw::desc(pd.as_bytes(), 16, 16)).1[0], 4);
}

// ---------------------------------------------------------------------------------------------
// Through the driver.

fn expect(e: Error, status: u8, names: &str) -> String {
    let s = e.to_string();
    assert_eq!(e.status(), Some(status), "{s}");
    assert!(s.contains(names), "'{s}' should name {names}");
    s
}

#[test]
fn wrong_sizes_opcodes_and_uids() {
    let (m, h) = hca(ModelOptions::default());
    expect(
        h.exec(&cmd_in(0x7ff, 0, 16), 16).unwrap_err(),
        2,
        "UNKNOWN_OPCODE [opcode 0x07ff]",
    );
    let short = cmd_in(op::CREATE_GENERAL_OBJECT, 0xd, 0x40);
    expect(
        h.exec(&short, 16).unwrap_err(),
        0x50,
        "CREATE_GENERAL_OBJECT(VIRTIO_NET_Q) [opcode 0x0a00] failed: bad input length",
    );
    let q = cmd_in(op::QUERY_HCA_CAP, (cap::GENERAL << 1) | 1, 16);
    expect(
        h.exec(&q, 64).unwrap_err(),
        0x51,
        "QUERY_HCA_CAP(op_mod 0x1)",
    );
    let mut u = cmd_in(op::ALLOC_PD, 0, 16);
    u.set(hdr::UID, 3);
    expect(h.exec(&u, 16).unwrap_err(), 3, "ALLOC_PD");
    let f = m.last_failure().unwrap();
    assert_eq!(f.reason, "user context ids are not supported (umem_uid_0)");
    assert_eq!(f.syndrome, syndrome_of(f.reason));
    expect(
        h.exec(&cmd_in(op::INIT_HCA, 0, 16), 16).unwrap_err(),
        4,
        "INIT_HCA",
    );
    expect(
        h.exec(&cmd_in(op::QUERY_HCA_CAP, 0x55 << 1, 16), 0x1010)
            .unwrap_err(),
        3,
        "QUERY_HCA_CAP",
    );
}

#[test]
fn unknown_ids_and_objects_in_use() {
    let (m, h) = hca(ModelOptions::default());
    expect(h.dealloc_pd(0x999).unwrap_err(), 5, "DEALLOC_PD");
    expect(h.create_tis(0x999).unwrap_err(), 5, "CREATE_TIS");
    expect(
        h.query_virtq(0x999).unwrap_err(),
        5,
        "QUERY_GENERAL_OBJECT(VIRTIO_NET_Q)",
    );
    expect(
        h.destroy_counters(0x999).unwrap_err(),
        5,
        "DESTROY_GENERAL_OBJECT(VIRTIO_Q_COUNTERS)",
    );
    expect(h.destroy_mkey(0x77 << 8).unwrap_err(), 5, "DESTROY_MKEY");

    let pd = h.alloc_pd().unwrap();
    let td = h.alloc_td().unwrap();
    let tis = h.create_tis(td).unwrap();
    expect(h.dealloc_td(td).unwrap_err(), 9, "DEALLOC_TRANSPORT_DOMAIN");
    let g = Guest::new(h.pci().domain());
    let key = h
        .create_mtt_mkey(
            pd,
            KeyPiece {
                va: GPA,
                iova: GPA,
                len: GUEST_MEM as u64,
            },
            1,
        )
        .unwrap();
    expect(h.dealloc_pd(pd).unwrap_err(), 9, "DEALLOC_PD");
    let attr = VirtqAttr {
        index: 0,
        size: 64,
        desc: ring_base(0),
        avail: ring_base(0) + 0x400,
        used: ring_base(0) + 0x800,
        mkey: key,
        pd,
        ..Default::default()
    };
    let q = Vq::create(&h, &attr).unwrap();
    expect(h.destroy_mkey(key).unwrap_err(), 9, "DESTROY_MKEY");
    expect(
        h.destroy_counters(q.counters).unwrap_err(),
        9,
        "VIRTIO_Q_COUNTERS",
    );
    let u0 = q.umems[0].id;
    expect(
        h.exec_destroy(op::DESTROY_UMEM, u0).unwrap_err(),
        9,
        "DESTROY_UMEM",
    );
    let rqt = h.create_rqt(&[q.id], 1).unwrap();
    expect(
        h.destroy_virtq(q.id).unwrap_err(),
        9,
        "DESTROY_GENERAL_OBJECT(VIRTIO_NET_Q)",
    );
    let tir = h.create_tir(td, rqt).unwrap();
    expect(h.destroy_rqt(rqt).unwrap_err(), 9, "DESTROY_RQT");
    let ft = h.create_flow_table(0, 2).unwrap();
    let fg = h.create_dmac_group(ft, 0, 0, [0xff; 6]).unwrap();
    h.set_dmac_entry(ft, fg, 0, [2, 0, 0, 0, 0, 1], tir)
        .unwrap();
    expect(h.destroy_tir(tir).unwrap_err(), 9, "DESTROY_TIR");
    expect(
        h.destroy_flow_group(ft, fg).unwrap_err(),
        9,
        "DESTROY_FLOW_GROUP",
    );
    expect(
        h.set_dmac_entry(ft, fg, 0, [2, 0, 0, 0, 0, 2], tir)
            .unwrap_err(),
        3,
        "SET_FLOW_TABLE_ENTRY",
    );
    expect(
        h.set_dmac_entry(ft, fg, 1, [2, 0, 0, 0, 0, 2], tir)
            .unwrap_err(),
        3,
        "SET_FLOW_TABLE_ENTRY",
    );
    // A transmit queue cannot be in an RQT.
    let tx = Vq::create(
        &h,
        &VirtqAttr {
            index: 1,
            tisn: tis,
            ..attr.clone()
        },
    )
    .unwrap();
    expect(h.create_rqt(&[tx.id], 1).unwrap_err(), 3, "CREATE_RQT");
    // Undo in order: everything goes.
    h.delete_entry(ft, 0).unwrap();
    h.destroy_flow_group(ft, fg).unwrap();
    h.destroy_flow_table(ft).unwrap();
    h.destroy_tir(tir).unwrap();
    h.destroy_rqt(rqt).unwrap();
    tx.destroy(&h).unwrap();
    q.destroy(&h).unwrap();
    h.destroy_mkey(key).unwrap();
    h.destroy_tis(tis).unwrap();
    h.dealloc_td(td).unwrap();
    h.dealloc_pd(pd).unwrap();
    assert_eq!(m.census().len(), 0, "{:?}", m.census());
    drop(g);
}

fn rig(o: ModelOptions) -> (std::sync::Arc<Mlx5Model>, Hca, Guest, VirtqAttr) {
    let (m, h) = hca(o);
    let g = Guest::new(h.pci().domain());
    let pd = h.alloc_pd().unwrap();
    let key = h
        .create_mtt_mkey(
            pd,
            KeyPiece {
                va: GPA,
                iova: GPA,
                len: GUEST_MEM as u64,
            },
            9,
        )
        .unwrap();
    let attr = VirtqAttr {
        index: 2,
        size: 128,
        version_1: true,
        desc: ring_base(2),
        avail: ring_base(2) + 0x800,
        used: ring_base(2) + 0x1000,
        mkey: key,
        pd,
        ..Default::default()
    };
    (m, h, g, attr)
}

/// Every field the driver sets comes back from QUERY as it was set.
#[test]
fn virtq_round_trip() {
    let (_m, h, _g, base) = rig(ModelOptions {
        feature_mask: 0x1ffc,
        ..ModelOptions::default()
    });
    let dkey = h
        .create_mtt_mkey(
            base.pd,
            KeyPiece {
                va: 0x10_0000_0000,
                iova: GPA,
                len: 4096,
            },
            3,
        )
        .unwrap();
    let attr = VirtqAttr {
        features: (1 << 2) | (1 << 9) | (1 << 12),
        event_mode: vq::EVENT_MSIX,
        event_target: 5,
        avail_idx: 0x1234,
        used_idx: 0x1230,
        moderation: (2, 100, 64),
        dirty_bitmap: (dkey, 0x10_0000_0100, 512),
        ..base
    };
    let q = Vq::create(&h, &attr).unwrap();
    let back = h.query_virtq(q.id).unwrap();
    let want = VirtqAttr {
        counter_set: q.counters,
        umems: std::array::from_fn(|i| (q.umems[i].id, q.umems[i].size as u32, 0)),
        ..attr.clone()
    };
    assert_eq!(back, want);
    assert_eq!(q.umems[0].size, 128 * 128 + 4096);

    // MODIFY changes only what it selects.
    let mut m = attr.clone();
    m.desc += 0x10;
    m.avail += 0x10;
    m.used += 0x10;
    m.avail_idx = 7;
    h.modify_virtq(q.id, vq::sel::VIRTIO_Q_ADDRS, &m).unwrap();
    let back = h.query_virtq(q.id).unwrap();
    assert_eq!(
        (back.desc, back.avail, back.used),
        (m.desc, m.avail, m.used)
    );
    assert_eq!(back.avail_idx, 0x1234);
    h.modify_virtq(
        q.id,
        vq::sel::HW_AVAILABLE_INDEX | vq::sel::QUEUE_PERIOD,
        &VirtqAttr {
            avail_idx: 9,
            moderation: (1, 5, 6),
            ..m.clone()
        },
    )
    .unwrap();
    let back = h.query_virtq(q.id).unwrap();
    assert_eq!((back.avail_idx, back.moderation), (9, (1, 5, 6)));
    q.destroy(&h).unwrap();
    let c = h.create_counters().unwrap();
    assert_eq!(h.query_counters(c).unwrap(), Default::default());
    h.destroy_counters(c).unwrap();
}

/// The state machine: INIT → RDY → SUSPEND → RDY (resumable); no INIT → SUSPEND, no going
/// back to INIT, no field changes while RDY, SUSPEND → RDY refused when not resumable.
#[test]
fn virtq_state_rules() {
    let (_m, h, _g, attr) = rig(ModelOptions::default());
    let q = Vq::create(&h, &attr).unwrap();
    assert_eq!(h.query_virtq(q.id).unwrap().state, vq::STATE_INIT);
    let s = expect(
        h.set_virtq_state(q.id, vq::STATE_SUSPEND).unwrap_err(),
        9,
        "MODIFY_GENERAL_OBJECT(VIRTIO_NET_Q)",
    );
    assert!(s.contains("bad resource state"), "{s}");
    h.set_virtq_state(q.id, vq::STATE_RDY).unwrap();
    h.set_virtq_state(q.id, vq::STATE_RDY).unwrap();
    expect(
        h.set_virtq_state(q.id, vq::STATE_INIT).unwrap_err(),
        9,
        "MODIFY_GENERAL_OBJECT",
    );
    expect(
        h.modify_virtq(q.id, vq::sel::VIRTIO_Q_ADDRS, &attr)
            .unwrap_err(),
        9,
        "MODIFY_GENERAL_OBJECT",
    );
    expect(
        h.set_virtq_state(q.id, vq::STATE_ERR).unwrap_err(),
        9,
        "MODIFY_GENERAL_OBJECT",
    );
    h.set_virtq_state(q.id, vq::STATE_SUSPEND).unwrap();
    h.modify_virtq(q.id, vq::sel::VIRTIO_Q_ADDRS, &attr)
        .unwrap();
    h.set_virtq_state(q.id, vq::STATE_RDY).unwrap();
    // Unknown select bits are a bad parameter.
    expect(
        h.modify_virtq(q.id, 1 << 20, &attr).unwrap_err(),
        3,
        "MODIFY_GENERAL_OBJECT",
    );
    q.destroy(&h).unwrap();

    let (_m, h, _g, attr) = rig(ModelOptions {
        freeze_to_rdy: false,
        ..ModelOptions::default()
    });
    assert!(!h.caps().virtio.freeze_to_rdy);
    let q = Vq::create(&h, &attr).unwrap();
    h.set_virtq_state(q.id, vq::STATE_RDY).unwrap();
    h.set_virtq_state(q.id, vq::STATE_SUSPEND).unwrap();
    expect(
        h.set_virtq_state(q.id, vq::STATE_RDY).unwrap_err(),
        9,
        "MODIFY_GENERAL_OBJECT",
    );
    q.destroy(&h).unwrap();
}

/// Bad queue parameters are refused at create with bad parameter (or bad resource for ids).
#[test]
fn virtq_create_checks() {
    let (_m, h, _g, attr) = rig(ModelOptions::default());
    let bad = |a: VirtqAttr, status: u8| {
        let e = Vq::create(&h, &a).unwrap_err();
        expect(e, status, "VIRTIO");
    };
    bad(
        VirtqAttr {
            size: 100,
            ..attr.clone()
        },
        3,
    );
    bad(
        VirtqAttr {
            index: 16,
            ..attr.clone()
        },
        3,
    );
    bad(
        VirtqAttr {
            index: 3,
            ..attr.clone()
        },
        3,
    ); // transmit without a TIS
    bad(
        VirtqAttr {
            event_mode: vq::EVENT_MSIX,
            event_target: 99,
            ..attr.clone()
        },
        3,
    );
    bad(
        VirtqAttr {
            event_mode: vq::EVENT_QP,
            ..attr.clone()
        },
        5,
    ); // QP mode naming no QP (tests/events.rs has the rest)
    bad(
        VirtqAttr {
            packed: true,
            ..attr.clone()
        },
        3,
    ); // the model has split rings only
    bad(
        VirtqAttr {
            features: 1 << 2,
            ..attr.clone()
        },
        3,
    );
    bad(
        VirtqAttr {
            mkey: attr.mkey ^ 1,
            ..attr.clone()
        },
        3,
    ); // variant mismatch
    bad(
        VirtqAttr {
            mkey: NULL_MKEY + 0x7700,
            ..attr.clone()
        },
        5,
    );
    bad(
        VirtqAttr {
            pd: 0x4242,
            ..attr.clone()
        },
        5,
    );
    // UMEMs below a × size + b.
    let c = h.create_counters().unwrap();
    let u: Vec<_> = (0..3).map(|_| h.create_umem(4096).unwrap()).collect();
    let mut a = attr.clone();
    a.counter_set = c;
    for (i, x) in u.iter().enumerate() {
        a.umems[i] = (x.id, 4096, 0);
    }
    let e = h.create_virtq(&a).unwrap_err();
    expect(e, 3, "CREATE_GENERAL_OBJECT(VIRTIO_NET_Q)");
    assert_eq!(
        _m.last_failure().unwrap().reason,
        "UMEM size below a × queue size + b"
    );
    for x in u {
        h.destroy_umem(x).unwrap();
    }
    h.destroy_counters(c).unwrap();
}

/// An indirect key over two page-list keys with a hole: a ring inside the hole does not
/// translate, so the queue fails when made ready (and the driver sees ERR by query).
#[test]
fn indirect_key_hole_fails_the_queue() {
    let (m, h, _g, attr) = rig(ModelOptions::default());
    let a = h
        .create_mtt_mkey(
            attr.pd,
            KeyPiece {
                va: GPA,
                iova: GPA,
                len: 0x10_0000,
            },
            1,
        )
        .unwrap();
    let b = h
        .create_mtt_mkey(
            attr.pd,
            KeyPiece {
                va: GPA + 0x20_0000,
                iova: GPA + 0x20_0000,
                len: 0x10_0000,
            },
            1,
        )
        .unwrap();
    let null = h.null_mkey().unwrap();
    let klm = h
        .create_klm_mkey(
            attr.pd,
            GPA,
            0x30_0000,
            &[
                (0x10_0000, a, GPA),
                (0x10_0000, null, 0),
                (0x10_0000, b, GPA + 0x20_0000),
            ],
            4,
        )
        .unwrap();
    // Rings at ring_base(2) = GPA + 0x8_0000: inside the first key; works.
    let q = Vq::create(
        &h,
        &VirtqAttr {
            mkey: klm,
            ..attr.clone()
        },
    )
    .unwrap();
    h.set_virtq_state(q.id, vq::STATE_RDY).unwrap();
    assert_eq!(h.query_virtq(q.id).unwrap().state, vq::STATE_RDY);
    q.destroy(&h).unwrap();
    // Rings in the hole.
    let hole = VirtqAttr {
        mkey: klm,
        desc: GPA + 0x10_0000,
        avail: GPA + 0x10_1000,
        used: GPA + 0x10_2000,
        ..attr.clone()
    };
    let q = Vq::create(&h, &hole).unwrap();
    h.set_virtq_state(q.id, vq::STATE_RDY).unwrap();
    let back = h.query_virtq(q.id).unwrap();
    assert_eq!((back.state, back.error_type), (vq::STATE_ERR, 1));
    expect(
        h.set_virtq_state(q.id, vq::STATE_SUSPEND).unwrap_err(),
        9,
        "MODIFY_GENERAL_OBJECT",
    );
    q.destroy(&h).unwrap();
    // A KLM entry naming a key that does not exist.
    let e = h
        .create_klm_mkey(attr.pd, GPA, 0x1000, &[(0x1000, 0x0042_4200, 0)], 4)
        .unwrap_err();
    expect(e, 5, "CREATE_MKEY");
    h.destroy_mkey(klm).unwrap();
    h.destroy_mkey(a).unwrap();
    h.destroy_mkey(b).unwrap();
    assert_eq!(m.census().get(&Kind::Mkey), Some(&1));
}

#[test]
fn pages_and_teardown_accounting() {
    let (m, mut h) = hca(ModelOptions::default());
    let pd = h.alloc_pd().unwrap();
    let _ = pd;
    // A leak at teardown is counted by the model (firmware would clean up silently).
    h.close().unwrap();
    assert_eq!(m.stats().leaked_objects, 1);
    assert_eq!(m.live_objects(), 0);
    std::thread::sleep(Duration::from_millis(1));
}

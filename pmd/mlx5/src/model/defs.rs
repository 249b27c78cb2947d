//! The model's own definitions of the mlx5 interface, from the reference facts, as absolute bit
//! positions counted from the start of each command (objects and contexts already added in). Not
//! shared with the driver: a disagreement between the two is a bug a test must show.

#![allow(missing_docs)]
// A definitions table: some entries document the layout without the model acting on them.
#![allow(dead_code)]

use super::bits::Fld;

/// Init segment registers (byte offsets in BAR0; big-endian dwords).
pub mod reg {
    pub const FW_REV: u64 = 0x0;
    pub const CMDIF_REV: u64 = 0x4;
    pub const CMDQ_HI: u64 = 0x10;
    pub const CMDQ_LO: u64 = 0x14;
    pub const DOORBELL: u64 = 0x18;
    pub const INIT_BUSY: u64 = 0x1fc;
    pub const HEALTH_BASE: u64 = 0x200;
    pub const HEALTH_FW_VER: u64 = 0x230;
    pub const HEALTH_HW_ID: u64 = 0x234;
    pub const HEALTH_RFR: u64 = 0x238;
    pub const HEALTH_SYND_WORD: u64 = 0x23c;
    pub const HEALTH_CNT: u64 = 0x1010;
    /// Where the model puts the virtio doorbell page.
    pub const VQ_DOORBELL_PAGE: u64 = 0x8000;
    /// First UAR page index the model hands out (page n at n × 4 KiB).
    pub const FIRST_UAR: u32 = 0x100;
    /// BAR0 size.
    pub const BAR0_LEN: u64 = 32 << 20;
}

/// Command slot descriptor and mailbox layout (byte offsets).
pub mod wire {
    pub const D_TYPE: usize = 0;
    pub const D_INLEN: usize = 4;
    pub const D_IN_PTR: usize = 8;
    pub const D_IN: usize = 16;
    pub const D_OUT: usize = 32;
    pub const D_OUT_PTR: usize = 48;
    pub const D_OUTLEN: usize = 56;
    pub const D_TOKEN: usize = 60;
    pub const D_SIG: usize = 61;
    pub const D_STATUS: usize = 63;
    pub const D_LEN: usize = 64;
    pub const XPORT_PCI: u8 = 7;

    pub const MB_DATA: usize = 512;
    pub const MB_NEXT: usize = 560;
    pub const MB_NUM: usize = 568;
    pub const MB_TOKEN: usize = 573;
    pub const MB_CSIG: usize = 574;
    pub const MB_SIG: usize = 575;
    pub const MB_LEN: usize = 576;
    /// Alignment the model demands of mailbox blocks (the model's choice; drivers use 4 KiB).
    pub const MB_ALIGN: u64 = 1024;
    /// Longest chain the model follows (4 MiB of data).
    pub const MB_MAX_CHAIN: usize = 8192;

    // Delivery status values.
    pub const DS_SIG: u8 = 1;
    pub const DS_TOKEN: u8 = 2;
    pub const DS_BLOCK: u8 = 3;
    pub const DS_OUT_ALIGN: u8 = 4;
    pub const DS_IN_ALIGN: u8 = 5;
    pub const DS_FW: u8 = 6;
    pub const DS_IN_LEN: u8 = 7;
    pub const DS_OUT_LEN: u8 = 8;
    pub const DS_TYPE: u8 = 0x10;
}

/// Command status values.
pub mod st {
    pub const INTERNAL: u8 = 1;
    pub const BAD_OP: u8 = 2;
    pub const BAD_PARAM: u8 = 3;
    pub const BAD_SYS_STATE: u8 = 4;
    pub const BAD_RESOURCE: u8 = 5;
    pub const LIMITS: u8 = 8;
    pub const BAD_RES_STATE: u8 = 9;
    pub const NO_RESOURCES: u8 = 0xf;
    pub const BAD_INPUT_LEN: u8 = 0x50;
    pub const BAD_OUTPUT_LEN: u8 = 0x51;
}

/// Opcodes.
pub mod opc {
    pub const QUERY_HCA_CAP: u16 = 0x100;
    pub const INIT_HCA: u16 = 0x102;
    pub const TEARDOWN_HCA: u16 = 0x103;
    pub const ENABLE_HCA: u16 = 0x104;
    pub const DISABLE_HCA: u16 = 0x105;
    pub const QUERY_PAGES: u16 = 0x107;
    pub const MANAGE_PAGES: u16 = 0x108;
    pub const SET_HCA_CAP: u16 = 0x109;
    pub const QUERY_ISSI: u16 = 0x10a;
    pub const SET_ISSI: u16 = 0x10b;
    pub const CREATE_MKEY: u16 = 0x200;
    pub const DESTROY_MKEY: u16 = 0x202;
    pub const QUERY_SPECIAL_CONTEXTS: u16 = 0x203;
    pub const QUERY_NIC_VPORT_CONTEXT: u16 = 0x754;
    pub const ALLOC_PD: u16 = 0x800;
    pub const DEALLOC_PD: u16 = 0x801;
    pub const ALLOC_UAR: u16 = 0x802;
    pub const DEALLOC_UAR: u16 = 0x803;
    pub const ACCESS_REG: u16 = 0x805;
    pub const ALLOC_TD: u16 = 0x816;
    pub const DEALLOC_TD: u16 = 0x817;
    pub const CREATE_TIR: u16 = 0x900;
    pub const DESTROY_TIR: u16 = 0x902;
    pub const CREATE_TIS: u16 = 0x912;
    pub const DESTROY_TIS: u16 = 0x914;
    pub const CREATE_RQT: u16 = 0x916;
    pub const MODIFY_RQT: u16 = 0x917;
    pub const DESTROY_RQT: u16 = 0x918;
    pub const SET_FT_ROOT: u16 = 0x92f;
    pub const CREATE_FT: u16 = 0x930;
    pub const DESTROY_FT: u16 = 0x931;
    pub const CREATE_FG: u16 = 0x933;
    pub const DESTROY_FG: u16 = 0x934;
    pub const SET_FTE: u16 = 0x936;
    pub const DELETE_FTE: u16 = 0x938;
    pub const CREATE_OBJ: u16 = 0xa00;
    pub const MODIFY_OBJ: u16 = 0xa01;
    pub const QUERY_OBJ: u16 = 0xa02;
    pub const DESTROY_OBJ: u16 = 0xa03;
    pub const CREATE_UMEM: u16 = 0xa08;
    pub const DESTROY_UMEM: u16 = 0xa0a;
}

// --- common headers ---
pub const OPCODE: Fld = Fld(0x00, 16);
pub const UID: Fld = Fld(0x10, 16);
pub const OP_MOD: Fld = Fld(0x30, 16);
pub const STATUS: Fld = Fld(0x00, 8);
pub const SYNDROME: Fld = Fld(0x20, 32);
/// 24-bit id returned by ALLOC/CREATE and named by DEALLOC/DESTROY.
pub const ID24: Fld = Fld(0x48, 24);
pub const OBJ_TYPE: Fld = Fld(0x30, 16);
pub const OBJ_ID: Fld = Fld(0x40, 32);
pub const OBJ_PARAM: Fld = Fld(0x60, 32);
pub const OT_VIRTIO_NET_Q: u16 = 0x0d;
pub const OT_VIRTIO_Q_COUNTERS: u16 = 0x1c;

// --- boot ---
pub const FUNC_ID: Fld = Fld(0x50, 16);
pub const ISSI_SUPPORTED_DW0: Fld = Fld(0x360, 32);
pub const ISSI_OUT_BYTES: usize = 0x70;
pub const ISSI_CURRENT: Fld = Fld(0x50, 16);
pub const PAGES_FUNC: Fld = Fld(0x50, 16);
pub const PAGES_NUM: Fld = Fld(0x60, 32);
pub const MANAGE_IN_NUM: Fld = Fld(0x60, 32);
pub const MANAGE_OUT_NUM: Fld = Fld(0x40, 32);
pub const MANAGE_PAS_BYTE: usize = 0x10;
pub const REG_ID: Fld = Fld(0x50, 16);
pub const REG_DATA_BYTE: usize = 0x10;
pub const REG_HOST_ENDIANNESS: u16 = 0x7004;
pub const TEARDOWN_PROFILE: Fld = Fld(0x50, 16);
pub const NULL_MKEY_OUT: Fld = Fld(0x80, 32);

// --- capabilities (output byte 0x10 = bit 0x80) ---
pub const CAP_BYTES: usize = 0x10 + 0x1000;
pub mod gcap {
    use super::Fld;
    pub const VHCA_ID: Fld = Fld(0x80 + 0x30, 16);
    pub const LOG_MAX_CQ_SZ: Fld = Fld(0x80 + 0xc8, 8);
    pub const LOG_MAX_EQ_SZ: Fld = Fld(0x80 + 0xe0, 8);
    pub const LOG_MAX_MKEY: Fld = Fld(0x80 + 0xea, 6);
    pub const LOG_MAX_EQ: Fld = Fld(0x80 + 0xfc, 4);
    pub const FAST_TEARDOWN: Fld = Fld(0x80 + 0x111, 1);
    pub const LOG_MAX_KLM: Fld = Fld(0x80 + 0x11a, 6);
    pub const NIC_FLOW_TABLE: Fld = Fld(0x80 + 0x1a6, 1);
    pub const PORT_TYPE: Fld = Fld(0x80 + 0x1b6, 2);
    pub const CMDIF_CSUM: Fld = Fld(0x80 + 0x210, 2);
    pub const UAR_4K: Fld = Fld(0x80 + 0x240, 1);
    pub const UMEM_UID_0: Fld = Fld(0x80 + 0x252, 1);
    pub const LOG_PG_SZ: Fld = Fld(0x80 + 0x258, 8);
    pub const LOG_MAX_TD: Fld = Fld(0x80 + 0x323, 5);
    pub const LOG_MAX_PD: Fld = Fld(0x80 + 0x32b, 5);
    pub const LOG_MAX_TIR: Fld = Fld(0x80 + 0x373, 5);
    pub const LOG_MAX_TIS: Fld = Fld(0x80 + 0x37b, 5);
    pub const LOG_MAX_RQT: Fld = Fld(0x80 + 0x38b, 5);
    pub const LOG_MAX_RQT_SZ: Fld = Fld(0x80 + 0x393, 5);
    pub const OBJ_TYPES: Fld = Fld(0x80 + 0x400, 64);
    pub const MAX_NUM_EQS: Fld = Fld(0x80 + 0x470, 16);
    pub const LOG_UAR_PG_SZ: Fld = Fld(0x80 + 0x490, 16);
}
pub mod vcap {
    use super::Fld;
    pub const ETH_FRAME: Fld = Fld(0x81, 1);
    pub const VERSION_1: Fld = Fld(0x82, 1);
    pub const FEATURE_MASK: Fld = Fld(0x83, 13);
    pub const EVENT_MODES: Fld = Fld(0x90, 8);
    pub const Q_TYPES: Fld = Fld(0x98, 8);
    pub const MAX_TUNNEL_DESC: Fld = Fld(0xa0, 16);
    pub const LOG_DB_STRIDE: Fld = Fld(0xb3, 5);
    pub const MODIFY_EXT: Fld = Fld(0xb8, 1);
    pub const ADDR_MODIFY: Fld = Fld(0xb9, 1);
    pub const INDEX_MODIFY: Fld = Fld(0xba, 1);
    pub const LOG_DB_SIZE: Fld = Fld(0xbb, 5);
    pub const DB_OFFSET: Fld = Fld(0xc0, 64);
    pub const MAX_DEVICES: Fld = Fld(0x100, 8);
    pub const MAX_QUEUES: Fld = Fld(0x108, 24);
    pub const DESC_GROUP_MKEY: Fld = Fld(0x153, 1);
    pub const FREEZE_TO_RDY: Fld = Fld(0x154, 1);
    pub const UMEM_A: [Fld; 3] = [Fld(0x180, 32), Fld(0x1c0, 32), Fld(0x200, 32)];
    pub const UMEM_B: [Fld; 3] = [Fld(0x1a0, 32), Fld(0x1e0, 32), Fld(0x220, 32)];
}
pub const CAP_GENERAL: u16 = 0;
pub const CAP_VDPA: u16 = 0x13;

// --- UMEM ---
pub const UMEM_LOG_PG: Fld = Fld(0x80 + 0x9b, 5);
pub const UMEM_PG_OFFSET: Fld = Fld(0x80 + 0xa0, 32);
pub const UMEM_NUM_MTT: Fld = Fld(0x80 + 0xc0, 64);
pub const UMEM_MTT_BYTE: usize = 0x30;

// --- MKEY (context at byte 0x10 = bit 0x80) ---
pub const MK_PG_ACCESS: Fld = Fld(0x60, 1);
pub const MK_UMEM_VALID: Fld = Fld(0x61, 1);
pub const MKC_FREE: Fld = Fld(0x81, 1);
pub const MKC_AM_HI: Fld = Fld(0x83, 3);
pub const MKC_LW: Fld = Fld(0x94, 1);
pub const MKC_LR: Fld = Fld(0x95, 1);
pub const MKC_AM_LO: Fld = Fld(0x96, 2);
pub const MKC_VARIANT: Fld = Fld(0xb8, 8);
pub const MKC_LEN64: Fld = Fld(0xe0, 1);
pub const MKC_PD: Fld = Fld(0xe8, 24);
pub const MKC_START: Fld = Fld(0x100, 64);
pub const MKC_LEN: Fld = Fld(0x140, 64);
pub const MKC_OCTWORDS: Fld = Fld(0x220, 32);
pub const MKC_LOG_PG: Fld = Fld(0x25b, 5);
pub const MK_OCTWORDS_ACTUAL: Fld = Fld(0x300, 32);
pub const MK_ENTRIES_BYTE: usize = 0x110;

// --- VIRTIO_NET_Q (object at byte 0x10; virtio_q context at byte 0x50) ---
pub const VQ_CMD_BYTES: usize = 0xd0;
pub const VQ_OBJ_BYTE: usize = 0x10;
pub mod vqf {
    use super::Fld;
    pub const SELECT: Fld = Fld(0x80, 64);
    pub const FEAT_HI: Fld = Fld(0x100, 10);
    pub const DIRTY_DUMP: Fld = Fld(0x10a, 1);
    pub const STATE: Fld = Fld(0x11c, 4);
    pub const FEAT_LO: Fld = Fld(0x125, 3);
    pub const TISN: Fld = Fld(0x128, 24);
    pub const DIRTY_MKEY: Fld = Fld(0x140, 32);
    pub const DIRTY_SIZE: Fld = Fld(0x160, 32);
    pub const DIRTY_ADDR: Fld = Fld(0x180, 64);
    pub const HW_AVAIL: Fld = Fld(0x1c0, 16);
    pub const HW_USED: Fld = Fld(0x1d0, 16);
    pub const Q_TYPE: Fld = Fld(0x280, 8);
    pub const EVENT_MODE: Fld = Fld(0x28d, 3);
    pub const INDEX: Fld = Fld(0x290, 16);
    pub const VERSION_1: Fld = Fld(0x2a1, 1);
    pub const EVENT_TARGET: Fld = Fld(0x2a8, 24);
    pub const SIZE: Fld = Fld(0x2d0, 16);
    pub const DESC: Fld = Fld(0x300, 64);
    pub const USED: Fld = Fld(0x340, 64);
    pub const AVAIL: Fld = Fld(0x380, 64);
    pub const MKEY: Fld = Fld(0x3c0, 32);
    pub const ERROR_TYPE: Fld = Fld(0x3f8, 8);
    pub const UMEM_ID: [Fld; 3] = [Fld(0x400, 32), Fld(0x480, 32), Fld(0x500, 32)];
    pub const UMEM_SIZE: [Fld; 3] = [Fld(0x420, 32), Fld(0x4a0, 32), Fld(0x520, 32)];
    pub const UMEM_OFF: [Fld; 3] = [Fld(0x440, 64), Fld(0x4c0, 64), Fld(0x540, 64)];
    pub const COUNTERS: Fld = Fld(0x580, 32);
    pub const PD: Fld = Fld(0x5a8, 24);
    pub const PERIOD_MODE: Fld = Fld(0x5c2, 2);
    pub const PERIOD_US: Fld = Fld(0x5c4, 12);
    pub const MAX_COUNT: Fld = Fld(0x5d0, 16);
    pub const DESC_GROUP_MKEY: Fld = Fld(0x5e0, 32);
}
/// Fields each modify_field_select bit covers (bit, fields).
pub const VQ_SELECT_FIELDS: &[(u32, &[Fld])] = &[
    (3, &[vqf::DIRTY_MKEY, vqf::DIRTY_SIZE, vqf::DIRTY_ADDR]),
    (4, &[vqf::DIRTY_DUMP]),
    (5, &[vqf::PERIOD_MODE, vqf::PERIOD_US, vqf::MAX_COUNT]),
    (6, &[vqf::DESC, vqf::USED, vqf::AVAIL]),
    (7, &[vqf::HW_AVAIL]),
    (8, &[vqf::HW_USED]),
    (9, &[vqf::Q_TYPE]),
    (10, &[vqf::VERSION_1]),
    (11, &[vqf::MKEY]),
    (12, &[vqf::FEAT_HI, vqf::FEAT_LO]),
    (13, &[vqf::EVENT_MODE, vqf::EVENT_TARGET]),
    (14, &[vqf::DESC_GROUP_MKEY]),
];
pub const SEL_STATE: u64 = 1;
pub const SEL_DIRTY_PARAMS: u64 = 1 << 3;
pub const SEL_DIRTY_DUMP: u64 = 1 << 4;
/// The mlx feature index of MRG_RXBUF (queue_feature_bit_mask).
pub const MLX_MRG_RXBUF: u64 = 2;
pub const VQ_INIT: u8 = 0;
pub const VQ_RDY: u8 = 1;
pub const VQ_SUSPEND: u8 = 2;
pub const VQ_ERR: u8 = 3;

// --- VIRTIO_Q_COUNTERS (object at byte 0x10) ---
pub const CNT_OBJ_BYTES: usize = 0x40;
pub const CNT_RECEIVED: Fld = Fld(0x100, 64);
pub const CNT_COMPLETED: Fld = Fld(0x140, 64);
pub const CNT_ERR_CQE: Fld = Fld(0x180, 32);
pub const CNT_BAD_DESC: Fld = Fld(0x1a0, 32);
pub const CNT_EXCEED: Fld = Fld(0x1c0, 32);
pub const CNT_INVALID: Fld = Fld(0x1e0, 32);

// --- TIS / RQT / TIR (contexts at byte 0x20 = bit 0x100) ---
pub const TIS_TD: Fld = Fld(0x228, 24);
pub const RQT_TYPE: Fld = Fld(0x1a5, 3);
pub const RQT_MAX: Fld = Fld(0x1b0, 16);
pub const RQT_ACTUAL: Fld = Fld(0x1d0, 16);
pub const RQT_LIST_BYTE: usize = 0x110;
pub const RQT_MOD_RQTN: Fld = Fld(0x48, 24);
pub const RQT_MOD_MASK: Fld = Fld(0x80, 64);
pub const TIR_DISP: Fld = Fld(0x120, 4);
pub const TIR_SYMMETRIC: Fld = Fld(0x200, 1);
pub const TIR_RQT: Fld = Fld(0x208, 24);
pub const TIR_HASH_FN: Fld = Fld(0x220, 4);
pub const TIR_TD: Fld = Fld(0x228, 24);
pub const TIR_KEY_BYTE: usize = 0x48;
pub const TIR_FIELDS: Fld = Fld(0x380, 32);

// --- flow steering ---
pub const FT_TYPE: Fld = Fld(0x80, 8);
pub const FT_ID: Fld = Fld(0xa8, 24);
pub const FT_LEVEL: Fld = Fld(0xc8, 8);
pub const FT_LOG_SIZE: Fld = Fld(0xd8, 8);
pub const FG_START: Fld = Fld(0xe0, 32);
pub const FG_END: Fld = Fld(0x120, 32);
pub const FG_ENABLE: Fld = Fld(0x1f8, 8);
pub const FG_CRITERIA_BYTE: usize = 0x40;
pub const FG_DESTROY_ID: Fld = Fld(0xc0, 32);
pub const FTE_INDEX: Fld = Fld(0x100, 32);
pub const FTE_GROUP: Fld = Fld(0x220, 32);
pub const FTE_ACTION: Fld = Fld(0x270, 16);
pub const FTE_NDEST: Fld = Fld(0x288, 24);
pub const FTE_MATCH_BYTE: usize = 0x80;
pub const FTE_DEST_BYTE: usize = 0x340;
pub const MATCH_DMAC_HI_BYTE: usize = 8;
pub const MATCH_DMAC_LO_BYTE: usize = 12;
pub const FWD_DEST: u64 = 4;
pub const DEST_TYPE_TIR: u8 = 2;

// --- NIC vport context (query output: context at byte 0x10) ---
pub const VPORT_OUT_BYTES: usize = 0x110;
pub const VPORT_PERM_ADDR: Fld = Fld(0x80 + 0x7a0, 64);
pub const VPORT_MTU: Fld = Fld(0x80 + 0x130, 16);

// --- event queues, completion queues, QPs (QP event mode) ---
/// Opcodes of the event chain.
pub mod eopc {
    pub const CREATE_EQ: u16 = 0x301;
    pub const DESTROY_EQ: u16 = 0x302;
    pub const CREATE_CQ: u16 = 0x400;
    pub const DESTROY_CQ: u16 = 0x401;
    pub const CREATE_QP: u16 = 0x500;
    pub const DESTROY_QP: u16 = 0x501;
    pub const RST2INIT: u16 = 0x502;
    pub const INIT2RTR: u16 = 0x503;
    pub const RTR2RTS: u16 = 0x504;
    pub const TO_RST: u16 = 0x50a;
}
/// Command status: the QP is in the wrong state for the transition.
pub const ST_BAD_QP_STATE: u8 = 0x10;

/// General capabilities of the event chain (output byte 0x10 = bit 0x80).
pub mod ecap {
    use super::Fld;
    pub const LOG_MAX_QP_SZ: Fld = Fld(0x80 + 0x88, 8);
    pub const LOG_MAX_QP: Fld = Fld(0x80 + 0x9b, 5);
    pub const LOG_MAX_CQ: Fld = Fld(0x80 + 0xdb, 5);
}

/// CREATE_EQ / DESTROY_EQ (eq_context at byte 0x10 = bit 0x80).
pub mod eqf {
    use super::Fld;
    pub const LOG_SIZE: Fld = Fld(0x80 + 0x63, 5);
    pub const UAR: Fld = Fld(0x80 + 0x68, 24);
    pub const INTR: Fld = Fld(0x80 + 0xb8, 8);
    pub const LOG_PG: Fld = Fld(0x80 + 0xc3, 5);
    /// event_bitmask: four big-endian qwords from this byte.
    pub const BITMASK_BYTE: usize = 0x58;
    pub const PAS_BYTE: usize = 0x110;
    /// CREATE_EQ output: eq_number. The model reads DESTROY_EQ's at the same place (its choice:
    /// the facts give the output position only).
    pub const NUMBER: Fld = Fld(0x58, 8);
}

/// CREATE_CQ / DESTROY_CQ (cq_context at byte 0x10 = bit 0x80; cqn at ID24 both ways).
pub mod cqf {
    use super::Fld;
    pub const CQE_SZ: Fld = Fld(0x80 + 0x08, 3);
    pub const CC: Fld = Fld(0x80 + 0x0b, 1);
    pub const OI: Fld = Fld(0x80 + 0x0e, 1);
    pub const LOG_SIZE: Fld = Fld(0x80 + 0x63, 5);
    pub const UAR: Fld = Fld(0x80 + 0x68, 24);
    pub const PERIOD: Fld = Fld(0x80 + 0x84, 12);
    pub const MAX_COUNT: Fld = Fld(0x80 + 0x90, 16);
    pub const EQN: Fld = Fld(0x80 + 0xb8, 8);
    pub const LOG_PG: Fld = Fld(0x80 + 0xc3, 5);
    pub const DBR: Fld = Fld(0x80 + 0x1c0, 64);
    pub const PAS_BYTE: usize = 0x110;
}

/// CREATE_QP, the transitions, DESTROY_QP (qpc at byte 0x18 = bit 0xc0; qpn at ID24 both ways).
pub mod qpf {
    use super::Fld;
    const Q: usize = 0xc0;
    pub const OPT_MASK: Fld = Fld(0x80, 32);
    pub const STATE: Fld = Fld(Q, 4);
    pub const ST: Fld = Fld(Q + 0x08, 8);
    pub const PM_STATE: Fld = Fld(Q + 0x13, 2);
    pub const PD: Fld = Fld(Q + 0x28, 24);
    pub const MTU: Fld = Fld(Q + 0x40, 3);
    pub const LOG_MSG_MAX: Fld = Fld(Q + 0x43, 5);
    pub const LOG_RQ_SIZE: Fld = Fld(Q + 0x49, 4);
    pub const LOG_RQ_STRIDE: Fld = Fld(Q + 0x4d, 3);
    pub const NO_SQ: Fld = Fld(Q + 0x50, 1);
    pub const UAR: Fld = Fld(Q + 0x68, 24);
    pub const LOG_PG: Fld = Fld(Q + 0xa3, 5);
    pub const REMOTE_QPN: Fld = Fld(Q + 0xa8, 24);
    /// Primary address path (ads) at qpc bit 0xc0: fl, ack_timeout, vhca_port_num.
    pub const PATH_FL: Fld = Fld(Q + 0xc0, 1);
    pub const PATH_ACK_TIMEOUT: Fld = Fld(Q + 0xc0 + 0x40, 5);
    pub const PATH_PORT: Fld = Fld(Q + 0xc0 + 0x128, 8);
    pub const RETRY: Fld = Fld(Q + 0x38d, 3);
    pub const RNR_RETRY: Fld = Fld(Q + 0x390, 3);
    pub const RWE: Fld = Fld(Q + 0x491, 1);
    pub const CQN_RCV: Fld = Fld(Q + 0x4e8, 24);
    pub const DBR: Fld = Fld(Q + 0x500, 64);
    pub const RQ_TYPE: Fld = Fld(Q + 0x565, 3);
    pub const PAS_BYTE: usize = 0x110;
    /// Input length of the transition commands (header, qpn, mask, qpc).
    pub const MODIFY_BYTES: usize = 0x110;
    pub const RQ_REGULAR: u64 = 0;
    pub const RQ_ZERO_LEN: u64 = 3;
}

/// UAR page doorbells (byte offsets in a UAR page).
pub mod uar {
    /// CQ arm: 64-bit, {BE32 sn << 28 | cmd << 24 | ci, BE32 cqn}.
    pub const CQ_ARM: u64 = 0x20;
    /// EQ consumer index and arm: BE32 eqn << 24 | ci.
    pub const EQ_ARM: u64 = 0x40;
    /// EQ consumer index, no arm.
    pub const EQ_UPDATE: u64 = 0x48;
    pub const PAGE: u64 = 4096;
}

/// Completion and event entries (byte offsets in a 64-byte entry).
pub mod entry {
    pub const LEN: usize = 64;
    pub const CQE_BYTE_CNT: usize = 44;
    pub const CQE_WQE_COUNTER: usize = 60;
    pub const CQE_OP_OWN: usize = 63;
    /// CQE opcode of a received send (responder).
    pub const CQE_RESP_SEND: u8 = 2;
    pub const EQE_TYPE: usize = 1;
    pub const EQE_SUB_TYPE: usize = 3;
    pub const EQE_CQN: usize = 0x38;
    pub const EQE_OWNER: usize = 63;
    pub const EQE_COMP: u8 = 0;
}

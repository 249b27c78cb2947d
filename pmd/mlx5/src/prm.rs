//! The driver's view of the mlx5 programming interface: init segment registers, the command
//! slot and mailbox formats, opcodes, status codes, and the bit layout of every command field the
//! driver uses.
//!
//! Command structures are arrays of big-endian dwords; a field is a bit offset counted from the
//! most significant bit of dword 0 and a width ([`Field`]). Fields never straddle a dword except
//! 64-bit ones, which are one big-endian qword at a dword boundary.
//!
//! These definitions are the driver's own. The device model (`crate::model`) has its own,
//! written separately from the same facts, so a wrong offset here fails a test instead of
//! cancelling out.

/// One field of a command structure: bit offset from the start of the command (MSB first) and
/// width in bits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Field {
    /// Bit offset.
    pub bit: u32,
    /// Width in bits (1..=32, or 64 at a dword boundary).
    pub width: u32,
}

impl Field {
    /// A field at bit offset `bit` of width `width`.
    pub const fn new(bit: u32, width: u32) -> Field {
        Field { bit, width }
    }

    /// The same field in a structure that starts at byte `byte` of the command.
    pub const fn at(self, byte: u32) -> Field {
        Field {
            bit: self.bit + byte * 8,
            width: self.width,
        }
    }
}

/// A command input or output buffer with big-endian field accessors.
///
/// Accesses outside the buffer are a bug of the driver's layout tables (never of device input:
/// outputs are allocated at the size the command asks for); they read as 0 and drop writes, and
/// trip a debug assertion.
#[derive(Clone, PartialEq, Eq)]
pub struct Buf(Vec<u8>);

impl std::fmt::Debug for Buf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Buf({} bytes)", self.0.len())
    }
}

impl Buf {
    /// A zeroed buffer of `len` bytes.
    pub fn new(len: usize) -> Buf {
        Buf(vec![0; len])
    }

    /// Wraps bytes.
    pub fn from_vec(v: Vec<u8>) -> Buf {
        Buf(v)
    }

    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Whether the buffer is empty.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The bytes.
    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }

    /// Consumes the buffer.
    pub fn into_vec(self) -> Vec<u8> {
        self.0
    }

    fn span(&self, f: Field) -> Option<(usize, usize)> {
        let ok_width = (1..=32).contains(&f.width) && (f.bit % 32) + f.width <= 32
            || (f.width == 64 && f.bit.is_multiple_of(32));
        let start = (f.bit / 32 * 4) as usize;
        let len = if f.width == 64 { 8 } else { 4 };
        let ok = ok_width && start + len <= self.0.len();
        debug_assert!(ok, "field {f:?} outside a {}-byte buffer", self.0.len());
        ok.then_some((start, len))
    }

    /// Sets field `f` to `v` (bits of `v` above the width are dropped).
    pub fn set(&mut self, f: Field, v: u64) {
        let Some((start, len)) = self.span(f) else {
            return;
        };
        if len == 8 {
            self.0[start..start + 8].copy_from_slice(&v.to_be_bytes());
            return;
        }
        let mut d = [0u8; 4];
        d.copy_from_slice(&self.0[start..start + 4]);
        let mut dw = u32::from_be_bytes(d);
        let shift = 32 - (f.bit % 32) - f.width;
        let mask = if f.width == 32 {
            u32::MAX
        } else {
            ((1u32 << f.width) - 1) << shift
        };
        dw = (dw & !mask) | (((v as u32) << shift) & mask);
        self.0[start..start + 4].copy_from_slice(&dw.to_be_bytes());
    }

    /// Reads field `f`.
    pub fn get(&self, f: Field) -> u64 {
        let Some((start, len)) = self.span(f) else {
            return 0;
        };
        if len == 8 {
            let mut q = [0u8; 8];
            q.copy_from_slice(&self.0[start..start + 8]);
            return u64::from_be_bytes(q);
        }
        let mut d = [0u8; 4];
        d.copy_from_slice(&self.0[start..start + 4]);
        let dw = u32::from_be_bytes(d);
        let shift = 32 - (f.bit % 32) - f.width;
        let v = dw >> shift;
        u64::from(if f.width == 32 {
            v
        } else {
            v & ((1u32 << f.width) - 1)
        })
    }

    /// Copies `src` to byte offset `off` (dropped if it does not fit).
    pub fn put(&mut self, off: usize, src: &[u8]) {
        let ok = off
            .checked_add(src.len())
            .is_some_and(|e| e <= self.0.len());
        debug_assert!(
            ok,
            "{} bytes at {off} outside a {}-byte buffer",
            src.len(),
            self.0.len()
        );
        if ok {
            self.0[off..off + src.len()].copy_from_slice(src);
        }
    }

    /// Writes a big-endian u64 at byte offset `off`.
    pub fn put_be64(&mut self, off: usize, v: u64) {
        self.put(off, &v.to_be_bytes());
    }

    /// Writes a big-endian u32 at byte offset `off`.
    pub fn put_be32(&mut self, off: usize, v: u32) {
        self.put(off, &v.to_be_bytes());
    }

    /// Reads a big-endian u64 at byte offset `off` (0 outside the buffer).
    pub fn be64(&self, off: usize) -> u64 {
        self.0
            .get(off..off + 8)
            .map_or(0, |b| u64::from_be_bytes(b.try_into().unwrap_or([0; 8])))
    }

    /// Bytes `[off, off + len)`, or an empty slice outside the buffer.
    pub fn bytes(&self, off: usize, len: usize) -> &[u8] {
        self.0.get(off..off + len).unwrap_or(&[])
    }
}

/// Writes `v` to a big-endian 32-bit device register through the little-endian checked
/// accessors: the value whose little-endian bytes are `v`'s big-endian bytes.
pub fn be_reg(v: u32) -> u32 {
    u32::from_le_bytes(v.to_be_bytes())
}

/// Reads a big-endian 32-bit register value obtained through the little-endian accessors.
pub fn from_be_reg(v: u32) -> u32 {
    u32::from_be_bytes(v.to_le_bytes())
}

/// PCI identity.
pub mod pci_id {
    /// Mellanox / NVIDIA.
    pub const VENDOR: u16 = 0x15b3;
    /// Device ids with vDPA support: (id, name).
    pub const DEVICES: &[(u16, &str)] = &[
        (0x101b, "ConnectX-6"),
        (0x101c, "ConnectX-6 VF"),
        (0x101d, "ConnectX-6 Dx"),
        (0x101e, "ConnectX-6 Dx VF"),
        (0x101f, "ConnectX-6 Lx"),
        (0x1021, "ConnectX-7"),
        (0xa2d6, "BlueField-2"),
        (0xa2dc, "BlueField-3"),
    ];
}

/// Initialization segment at BAR0 offset 0 (big-endian 32-bit registers).
pub mod iseg {
    /// BAR holding the init segment.
    pub const BAR: u8 = 0;
    /// Firmware revision: low 16 bits major, high 16 minor.
    pub const FW_REV: u64 = 0x000;
    /// High 16 bits: command interface revision; low 16: firmware subminor.
    pub const CMDIF_REV_FW_SUB: u64 = 0x004;
    /// High 32 bits of the command queue address.
    pub const CMDQ_ADDR_H: u64 = 0x010;
    /// Write: low 32 bits of the queue address. Read: log size bits 7:4, log stride bits 3:0,
    /// nic_interface bits 10:8.
    pub const CMDQ_ADDR_L_SZ: u64 = 0x014;
    /// Command doorbell: write 1 << slot.
    pub const CMD_DBELL: u64 = 0x018;
    /// Bit 31 set while firmware initializes.
    pub const INITIALIZING: u64 = 0x1fc;
    /// Health buffer: firmware version.
    pub const HEALTH_FW_VER: u64 = 0x230;
    /// Health buffer: hardware id.
    pub const HEALTH_HW_ID: u64 = 0x234;
    /// Health buffer dword with irisc_index (byte 0), synd (byte 1), ext_synd (bytes 2..4).
    pub const HEALTH_SYND: u64 = 0x23c;
    /// Health counter: the low 24 bits advance while firmware is alive.
    pub const HEALTH_COUNTER: u64 = 0x1010;
    /// Command interface revision this driver speaks.
    pub const CMDIF_REV: u32 = 5;
    /// nic_interface: full (normal operation).
    pub const NIC_IF_FULL: u32 = 0;
    /// nic_interface: disabled.
    pub const NIC_IF_DISABLED: u32 = 1;
    /// nic_interface: software reset.
    pub const NIC_IF_SW_RESET: u32 = 7;
}

/// Command slot descriptor (64 bytes, big-endian) and mailbox block layout, byte offsets.
pub mod slot {
    /// Descriptor size.
    pub const SIZE: usize = 64;
    /// Transport type byte.
    pub const TYPE: usize = 0x00;
    /// Input length (BE32).
    pub const INLEN: usize = 0x04;
    /// First input mailbox (BE64).
    pub const IN_PTR: usize = 0x08;
    /// 16 bytes of input inline.
    pub const IN: usize = 0x10;
    /// 16 bytes of output inline.
    pub const OUT: usize = 0x20;
    /// First output mailbox (BE64).
    pub const OUT_PTR: usize = 0x30;
    /// Output length (BE32).
    pub const OUTLEN: usize = 0x38;
    /// Token.
    pub const TOKEN: usize = 0x3c;
    /// Signature.
    pub const SIG: usize = 0x3d;
    /// Status and ownership: bit 0 = hardware owns; bits 7:1 = delivery status.
    pub const STATUS_OWN: usize = 0x3f;
    /// The PCI command transport.
    pub const TYPE_PCI: u8 = 7;
    /// Bytes of input/output carried inline.
    pub const INLINE: usize = 16;

    /// Mailbox block: data.
    pub const MB_DATA: usize = 0x000;
    /// Data bytes per block.
    pub const MB_DATA_LEN: usize = 512;
    /// Next block address (BE64, 0 = last).
    pub const MB_NEXT: usize = 0x230;
    /// Block number (BE32).
    pub const MB_BLOCK_NUM: usize = 0x238;
    /// Token.
    pub const MB_TOKEN: usize = 0x23d;
    /// Control signature (over 0x200..0x23e).
    pub const MB_CTRL_SIG: usize = 0x23e;
    /// Signature (over 0..0x23f).
    pub const MB_SIG: usize = 0x23f;
    /// Size of a block.
    pub const MB_SIZE: usize = 576;
}

/// Delivery status names (descriptor status_own bits 7:1).
pub fn delivery_status_name(s: u8) -> &'static str {
    match s {
        0 => "ok",
        1 => "bad signature",
        2 => "bad token",
        3 => "bad mailbox block number",
        4 => "output mailbox pointer not aligned",
        5 => "input mailbox pointer not aligned",
        6 => "firmware error",
        7 => "bad input length",
        8 => "bad output length",
        9 => "reserved fields not cleared",
        0x10 => "bad command descriptor type",
        _ => "unknown delivery status",
    }
}

/// Command status names (output byte 0).
pub fn status_name(s: u8) -> &'static str {
    match s {
        0x00 => "ok",
        0x01 => "internal error",
        0x02 => "bad opcode",
        0x03 => "bad parameter",
        0x04 => "bad system state",
        0x05 => "bad resource",
        0x06 => "resource busy",
        0x08 => "limits exceeded",
        0x09 => "bad resource state",
        0x0a => "bad index",
        0x0f => "no resources",
        0x10 => "bad QP state",
        0x50 => "bad input length",
        0x51 => "bad output length",
        _ => "unknown status",
    }
}

/// Opcodes.
pub mod op {
    #![allow(missing_docs)]
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
    pub const CREATE_EQ: u16 = 0x301;
    pub const DESTROY_EQ: u16 = 0x302;
    pub const CREATE_CQ: u16 = 0x400;
    pub const DESTROY_CQ: u16 = 0x401;
    pub const CREATE_QP: u16 = 0x500;
    pub const DESTROY_QP: u16 = 0x501;
    pub const RST2INIT_QP: u16 = 0x502;
    pub const INIT2RTR_QP: u16 = 0x503;
    pub const RTR2RTS_QP: u16 = 0x504;
    pub const QP_2RST: u16 = 0x50a;
    pub const QUERY_VPORT_STATE: u16 = 0x750;
    pub const QUERY_NIC_VPORT_CONTEXT: u16 = 0x754;
    pub const MODIFY_NIC_VPORT_CONTEXT: u16 = 0x755;
    pub const ALLOC_PD: u16 = 0x800;
    pub const DEALLOC_PD: u16 = 0x801;
    pub const ALLOC_UAR: u16 = 0x802;
    pub const DEALLOC_UAR: u16 = 0x803;
    pub const ACCESS_REG: u16 = 0x805;
    pub const ALLOC_TRANSPORT_DOMAIN: u16 = 0x816;
    pub const DEALLOC_TRANSPORT_DOMAIN: u16 = 0x817;
    pub const CREATE_TIR: u16 = 0x900;
    pub const DESTROY_TIR: u16 = 0x902;
    pub const CREATE_TIS: u16 = 0x912;
    pub const DESTROY_TIS: u16 = 0x914;
    pub const CREATE_RQT: u16 = 0x916;
    pub const MODIFY_RQT: u16 = 0x917;
    pub const DESTROY_RQT: u16 = 0x918;
    pub const SET_FLOW_TABLE_ROOT: u16 = 0x92f;
    pub const CREATE_FLOW_TABLE: u16 = 0x930;
    pub const DESTROY_FLOW_TABLE: u16 = 0x931;
    pub const CREATE_FLOW_GROUP: u16 = 0x933;
    pub const DESTROY_FLOW_GROUP: u16 = 0x934;
    pub const SET_FLOW_TABLE_ENTRY: u16 = 0x936;
    pub const DELETE_FLOW_TABLE_ENTRY: u16 = 0x938;
    pub const CREATE_GENERAL_OBJECT: u16 = 0xa00;
    pub const MODIFY_GENERAL_OBJECT: u16 = 0xa01;
    pub const QUERY_GENERAL_OBJECT: u16 = 0xa02;
    pub const DESTROY_GENERAL_OBJECT: u16 = 0xa03;
    pub const CREATE_UMEM: u16 = 0xa08;
    pub const DESTROY_UMEM: u16 = 0xa0a;

    /// The opcode's name for messages.
    pub fn name(opcode: u16) -> &'static str {
        match opcode {
            QUERY_HCA_CAP => "QUERY_HCA_CAP",
            INIT_HCA => "INIT_HCA",
            TEARDOWN_HCA => "TEARDOWN_HCA",
            ENABLE_HCA => "ENABLE_HCA",
            DISABLE_HCA => "DISABLE_HCA",
            QUERY_PAGES => "QUERY_PAGES",
            MANAGE_PAGES => "MANAGE_PAGES",
            SET_HCA_CAP => "SET_HCA_CAP",
            QUERY_ISSI => "QUERY_ISSI",
            SET_ISSI => "SET_ISSI",
            CREATE_MKEY => "CREATE_MKEY",
            DESTROY_MKEY => "DESTROY_MKEY",
            QUERY_SPECIAL_CONTEXTS => "QUERY_SPECIAL_CONTEXTS",
            CREATE_EQ => "CREATE_EQ",
            DESTROY_EQ => "DESTROY_EQ",
            CREATE_CQ => "CREATE_CQ",
            DESTROY_CQ => "DESTROY_CQ",
            CREATE_QP => "CREATE_QP",
            DESTROY_QP => "DESTROY_QP",
            RST2INIT_QP => "RST2INIT_QP",
            INIT2RTR_QP => "INIT2RTR_QP",
            RTR2RTS_QP => "RTR2RTS_QP",
            QP_2RST => "2RST_QP",
            QUERY_VPORT_STATE => "QUERY_VPORT_STATE",
            QUERY_NIC_VPORT_CONTEXT => "QUERY_NIC_VPORT_CONTEXT",
            MODIFY_NIC_VPORT_CONTEXT => "MODIFY_NIC_VPORT_CONTEXT",
            ALLOC_PD => "ALLOC_PD",
            DEALLOC_PD => "DEALLOC_PD",
            ALLOC_UAR => "ALLOC_UAR",
            DEALLOC_UAR => "DEALLOC_UAR",
            ACCESS_REG => "ACCESS_REG",
            ALLOC_TRANSPORT_DOMAIN => "ALLOC_TRANSPORT_DOMAIN",
            DEALLOC_TRANSPORT_DOMAIN => "DEALLOC_TRANSPORT_DOMAIN",
            CREATE_TIR => "CREATE_TIR",
            DESTROY_TIR => "DESTROY_TIR",
            CREATE_TIS => "CREATE_TIS",
            DESTROY_TIS => "DESTROY_TIS",
            CREATE_RQT => "CREATE_RQT",
            MODIFY_RQT => "MODIFY_RQT",
            DESTROY_RQT => "DESTROY_RQT",
            SET_FLOW_TABLE_ROOT => "SET_FLOW_TABLE_ROOT",
            CREATE_FLOW_TABLE => "CREATE_FLOW_TABLE",
            DESTROY_FLOW_TABLE => "DESTROY_FLOW_TABLE",
            CREATE_FLOW_GROUP => "CREATE_FLOW_GROUP",
            DESTROY_FLOW_GROUP => "DESTROY_FLOW_GROUP",
            SET_FLOW_TABLE_ENTRY => "SET_FLOW_TABLE_ENTRY",
            DELETE_FLOW_TABLE_ENTRY => "DELETE_FLOW_TABLE_ENTRY",
            CREATE_GENERAL_OBJECT => "CREATE_GENERAL_OBJECT",
            MODIFY_GENERAL_OBJECT => "MODIFY_GENERAL_OBJECT",
            QUERY_GENERAL_OBJECT => "QUERY_GENERAL_OBJECT",
            DESTROY_GENERAL_OBJECT => "DESTROY_GENERAL_OBJECT",
            CREATE_UMEM => "CREATE_UMEM",
            DESTROY_UMEM => "DESTROY_UMEM",
            _ => "UNKNOWN_OPCODE",
        }
    }
}

/// General object types.
pub mod obj {
    /// VIRTIO_NET_Q.
    pub const VIRTIO_NET_Q: u16 = 0x000d;
    /// VIRTIO_Q_COUNTERS.
    pub const VIRTIO_Q_COUNTERS: u16 = 0x001c;

    /// The object type's name for messages.
    pub fn name(t: u16) -> &'static str {
        match t {
            VIRTIO_NET_Q => "VIRTIO_NET_Q",
            VIRTIO_Q_COUNTERS => "VIRTIO_Q_COUNTERS",
            _ => "unknown object type",
        }
    }
}

/// Common command headers.
pub mod hdr {
    use super::Field;
    /// Input: opcode.
    pub const OPCODE: Field = Field::new(0x00, 16);
    /// Input: user context id (0 with umem_uid_0).
    pub const UID: Field = Field::new(0x10, 16);
    /// Input: op_mod.
    pub const OP_MOD: Field = Field::new(0x30, 16);
    /// Output: status.
    pub const STATUS: Field = Field::new(0x00, 8);
    /// Output: syndrome.
    pub const SYNDROME: Field = Field::new(0x20, 32);
    /// Output of the ALLOC/CREATE commands: the new id (24 bits at 0x48); input of the
    /// matching DEALLOC/DESTROY commands.
    pub const ID: Field = Field::new(0x48, 24);
    /// Size of the input and output headers.
    pub const LEN: usize = 16;

    /// General object header: object type.
    pub const OBJ_TYPE: Field = Field::new(0x30, 16);
    /// General object header: object id (input of MODIFY/QUERY/DESTROY; output of CREATE).
    pub const OBJ_ID: Field = Field::new(0x40, 32);
    /// General object header: op_param.
    pub const OP_PARAM: Field = Field::new(0x60, 32);
}

/// Boot command fields.
pub mod boot {
    use super::Field;
    /// ENABLE/DISABLE_HCA: function_id.
    pub const FUNCTION_ID: Field = Field::new(0x50, 16);
    /// QUERY_ISSI output: supported ISSI bitmask dword 0 (bit n = ISSI n).
    pub const SUPPORTED_ISSI_DW0: Field = Field::new(0x360, 32);
    /// QUERY_ISSI output length.
    pub const QUERY_ISSI_OUT_LEN: usize = 0x70;
    /// SET_ISSI: current_issi.
    pub const CURRENT_ISSI: Field = Field::new(0x50, 16);
    /// QUERY_PAGES op_mod: boot pages.
    pub const PAGES_BOOT: u16 = 1;
    /// QUERY_PAGES op_mod: init pages.
    pub const PAGES_INIT: u16 = 2;
    /// QUERY_PAGES output: function_id.
    pub const QP_FUNCTION_ID: Field = Field::new(0x50, 16);
    /// QUERY_PAGES output: num_pages (signed).
    pub const QP_NUM_PAGES: Field = Field::new(0x60, 32);
    /// MANAGE_PAGES op_mod: give pages to firmware.
    pub const MP_GIVE: u16 = 1;
    /// MANAGE_PAGES op_mod: take pages back.
    pub const MP_TAKE: u16 = 2;
    /// MANAGE_PAGES input: function_id.
    pub const MP_FUNCTION_ID: Field = Field::new(0x50, 16);
    /// MANAGE_PAGES input: number of entries.
    pub const MP_INPUT_NUM: Field = Field::new(0x60, 32);
    /// MANAGE_PAGES output: number of entries.
    pub const MP_OUTPUT_NUM: Field = Field::new(0x40, 32);
    /// MANAGE_PAGES: byte offset of the page address array (input for GIVE, output for TAKE).
    pub const MP_PAS: usize = 0x10;
    /// ACCESS_REG: register_id.
    pub const REG_ID: Field = Field::new(0x50, 16);
    /// ACCESS_REG: argument.
    pub const REG_ARG: Field = Field::new(0x60, 32);
    /// ACCESS_REG: byte offset of the register data.
    pub const REG_DATA: usize = 0x10;
    /// The HOST_ENDIANNESS register.
    pub const REG_HOST_ENDIANNESS: u16 = 0x7004;
    /// TEARDOWN_HCA: profile (0 graceful).
    pub const TEARDOWN_PROFILE: Field = Field::new(0x50, 16);
    /// QUERY_SPECIAL_CONTEXTS output: null_mkey.
    pub const NULL_MKEY: Field = Field::new(0x80, 32);
}

/// QUERY_HCA_CAP / SET_HCA_CAP and the capability layouts.
pub mod cap {
    use super::Field;
    /// Byte offset of the capability in the output (query) or input (set).
    pub const OFF: u32 = 0x10;
    /// Size of the capability area.
    pub const LEN: usize = 4096;
    /// cap_type: general device capabilities.
    pub const GENERAL: u16 = 0;
    /// cap_type: virtio (vDPA) emulation capabilities.
    pub const VDPA_EMULATION: u16 = 0x13;
    /// op_mod mode bit: current values (0 = maximum).
    pub const CUR: u16 = 1;

    /// General capabilities (cmd_hca_cap), as fields of the QUERY output.
    pub mod general {
        #![allow(missing_docs)]
        use super::{Field, OFF};
        pub const VHCA_ID: Field = Field::new(0x30, 16).at(OFF);
        pub const LOG_MAX_MKEY: Field = Field::new(0xea, 6).at(OFF);
        pub const FAST_TEARDOWN: Field = Field::new(0x111, 1).at(OFF);
        pub const LOG_MAX_KLM_LIST_SIZE: Field = Field::new(0x11a, 6).at(OFF);
        pub const NIC_FLOW_TABLE: Field = Field::new(0x1a6, 1).at(OFF);
        pub const PORT_TYPE: Field = Field::new(0x1b6, 2).at(OFF);
        pub const CMDIF_CHECKSUM: Field = Field::new(0x210, 2).at(OFF);
        pub const UAR_4K: Field = Field::new(0x240, 1).at(OFF);
        pub const UMEM_UID_0: Field = Field::new(0x252, 1).at(OFF);
        pub const LOG_PG_SZ: Field = Field::new(0x258, 8).at(OFF);
        pub const LOG_MAX_TD: Field = Field::new(0x323, 5).at(OFF);
        pub const LOG_MAX_PD: Field = Field::new(0x32b, 5).at(OFF);
        pub const LOG_MAX_TIR: Field = Field::new(0x373, 5).at(OFF);
        pub const LOG_MAX_TIS: Field = Field::new(0x37b, 5).at(OFF);
        pub const LOG_MAX_RQT: Field = Field::new(0x38b, 5).at(OFF);
        pub const LOG_MAX_RQT_SIZE: Field = Field::new(0x393, 5).at(OFF);
        pub const GENERAL_OBJ_TYPES: Field = Field::new(0x400, 64).at(OFF);
        pub const LOG_UAR_PAGE_SZ: Field = Field::new(0x490, 16).at(OFF);
    }

    /// virtio_emulation_cap, as fields of the QUERY output.
    pub mod virtio {
        #![allow(missing_docs)]
        use super::{Field, OFF};
        pub const ETH_FRAME_OFFLOAD_TYPE: Field = Field::new(0x01, 1).at(OFF);
        pub const VIRTIO_VERSION_1_0: Field = Field::new(0x02, 1).at(OFF);
        pub const DEVICE_FEATURES_BITS_MASK: Field = Field::new(0x03, 13).at(OFF);
        pub const EVENT_MODE: Field = Field::new(0x10, 8).at(OFF);
        pub const VIRTIO_QUEUE_TYPE: Field = Field::new(0x18, 8).at(OFF);
        pub const MAX_TUNNEL_DESC: Field = Field::new(0x20, 16).at(OFF);
        pub const LOG_DOORBELL_STRIDE: Field = Field::new(0x33, 5).at(OFF);
        pub const VNET_MODIFY_EXT: Field = Field::new(0x38, 1).at(OFF);
        pub const VIRTIO_NET_Q_ADDR_MODIFY: Field = Field::new(0x39, 1).at(OFF);
        pub const VIRTIO_Q_INDEX_MODIFY: Field = Field::new(0x3a, 1).at(OFF);
        pub const LOG_DOORBELL_BAR_SIZE: Field = Field::new(0x3b, 5).at(OFF);
        pub const DOORBELL_BAR_OFFSET: Field = Field::new(0x40, 64).at(OFF);
        pub const MAX_EMULATED_DEVICES: Field = Field::new(0x80, 8).at(OFF);
        pub const MAX_NUM_VIRTIO_QUEUES: Field = Field::new(0x88, 24).at(OFF);
        pub const DESC_GROUP_MKEY_SUPPORTED: Field = Field::new(0xd3, 1).at(OFF);
        pub const FREEZE_TO_RDY_SUPPORTED: Field = Field::new(0xd4, 1).at(OFF);
        /// umem i (0..3) parameter a: `Field::new(0x100 + 0x40 * i, 32)`.
        pub const fn umem_a(i: u32) -> Field {
            Field::new(0x100 + 0x40 * i, 32).at(OFF)
        }
        /// umem i (0..3) parameter b.
        pub const fn umem_b(i: u32) -> Field {
            Field::new(0x120 + 0x40 * i, 32).at(OFF)
        }
    }

    /// event_mode capability bits (1 << mode).
    pub const EVENT_NO_MSIX: u8 = 1 << 0;
    /// QP event mode.
    pub const EVENT_QP: u8 = 1 << 1;
    /// MSI-X event mode.
    pub const EVENT_MSIX: u8 = 1 << 2;
    /// virtio_queue_type bits.
    pub const QUEUE_SPLIT: u8 = 1 << 0;
    /// Packed queues.
    pub const QUEUE_PACKED: u8 = 1 << 1;
}

/// UMEM commands.
pub mod umem {
    use super::Field;
    /// The umem structure starts at this byte.
    const U: u32 = 0x10;
    /// log2 page size above 4 KiB.
    pub const LOG_PAGE_SIZE: Field = Field::new(0x9b, 5).at(U);
    /// Offset of the memory in the first page.
    pub const PAGE_OFFSET: Field = Field::new(0xa0, 32).at(U);
    /// Number of MTT entries.
    pub const NUM_OF_MTT: Field = Field::new(0xc0, 64).at(U);
    /// Byte offset of the MTT array.
    pub const MTT: usize = 0x30;
    /// MTT entry bit: readable.
    pub const MTT_RD: u64 = 1 << 0;
    /// MTT entry bit: writable.
    pub const MTT_WR: u64 = 1 << 1;
}

/// CREATE_MKEY and the memory key context.
pub mod mkey {
    use super::Field;
    /// pg_access.
    pub const PG_ACCESS: Field = Field::new(0x60, 1);
    /// mkey_umem_valid.
    pub const UMEM_VALID: Field = Field::new(0x61, 1);
    /// translations_octword_actual_size.
    pub const OCTWORD_ACTUAL_SIZE: Field = Field::new(0x300, 32);
    /// Byte offset of the translation entries.
    pub const ENTRIES: usize = 0x110;
    /// The mkey context starts at this byte.
    const C: u32 = 0x10;
    /// free.
    pub const FREE: Field = Field::new(0x01, 1).at(C);
    /// access_mode bits 4:2.
    pub const ACCESS_MODE_4_2: Field = Field::new(0x03, 3).at(C);
    /// umr_en.
    pub const UMR_EN: Field = Field::new(0x10, 1).at(C);
    /// atomic.
    pub const A: Field = Field::new(0x11, 1).at(C);
    /// remote write.
    pub const RW: Field = Field::new(0x12, 1).at(C);
    /// remote read.
    pub const RR: Field = Field::new(0x13, 1).at(C);
    /// local write.
    pub const LW: Field = Field::new(0x14, 1).at(C);
    /// local read.
    pub const LR: Field = Field::new(0x15, 1).at(C);
    /// access_mode bits 1:0.
    pub const ACCESS_MODE_1_0: Field = Field::new(0x16, 2).at(C);
    /// qpn (0xffffff: none).
    pub const QPN: Field = Field::new(0x20, 24).at(C);
    /// Low byte of the key, chosen by software.
    pub const MKEY_7_0: Field = Field::new(0x38, 8).at(C);
    /// The key covers the whole address space.
    pub const LENGTH64: Field = Field::new(0x60, 1).at(C);
    /// Protection domain.
    pub const PD: Field = Field::new(0x68, 24).at(C);
    /// First address of the key.
    pub const START_ADDR: Field = Field::new(0x80, 64).at(C);
    /// Length in bytes.
    pub const LEN: Field = Field::new(0xc0, 64).at(C);
    /// Translation entries in octwords.
    pub const OCTWORD_SIZE: Field = Field::new(0x1a0, 32).at(C);
    /// log2 of the MTT page size.
    pub const LOG_PAGE_SIZE: Field = Field::new(0x1db, 5).at(C);
    /// DESTROY_MKEY: the key index.
    pub const DESTROY_INDEX: Field = Field::new(0x48, 24);
    /// Access mode: physical addresses.
    pub const MODE_PA: u8 = 0;
    /// Access mode: page list.
    pub const MODE_MTT: u8 = 1;
    /// Access mode: indirect list of (byte count, key, address).
    pub const MODE_KLM: u8 = 2;
    /// KLM entry size.
    pub const KLM_SIZE: usize = 16;
}

/// VIRTIO_NET_Q object (CREATE/MODIFY/QUERY input or output; offsets include the 16-byte
/// general object header).
pub mod vq {
    use super::Field;
    /// Object start (after the general header).
    pub const OBJ: u32 = 0x10;
    /// The virtio_q context inside the object.
    const Q: u32 = OBJ + 0x40;
    /// Object size.
    pub const OBJ_LEN: usize = 192;
    /// Command length (header + object).
    pub const CMD_LEN: usize = 16 + OBJ_LEN;
    /// MODIFY: fields to change.
    pub const MODIFY_FIELD_SELECT: Field = Field::new(0x00, 64).at(OBJ);
    /// vhca_id.
    pub const VHCA_ID: Field = Field::new(0x60, 16).at(OBJ);
    /// mlx feature bits 12..3.
    pub const FEATURES_12_3: Field = Field::new(0x80, 10).at(OBJ);
    /// Dirty bitmap dumping on.
    pub const DIRTY_BITMAP_DUMP_ENABLE: Field = Field::new(0x8a, 1).at(OBJ);
    /// Object state.
    pub const STATE: Field = Field::new(0x9c, 4).at(OBJ);
    /// mlx feature bits 2..0.
    pub const FEATURES_2_0: Field = Field::new(0xa5, 3).at(OBJ);
    /// TIS number (transmit queues).
    pub const TISN_OR_QPN: Field = Field::new(0xa8, 24).at(OBJ);
    /// Dirty bitmap key.
    pub const DIRTY_BITMAP_MKEY: Field = Field::new(0xc0, 32).at(OBJ);
    /// Dirty bitmap size in bytes.
    pub const DIRTY_BITMAP_SIZE: Field = Field::new(0xe0, 32).at(OBJ);
    /// Dirty bitmap address in its key.
    pub const DIRTY_BITMAP_ADDR: Field = Field::new(0x100, 64).at(OBJ);
    /// Device's next available index.
    pub const HW_AVAILABLE_INDEX: Field = Field::new(0x140, 16).at(OBJ);
    /// Device's used index.
    pub const HW_USED_INDEX: Field = Field::new(0x150, 16).at(OBJ);

    /// Ring format (0 split, 1 packed).
    pub const Q_TYPE: Field = Field::new(0x00, 8).at(Q);
    /// Event mode (0 none, 1 QP, 2 MSI-X).
    pub const EVENT_MODE: Field = Field::new(0x0d, 3).at(Q);
    /// virtio queue index.
    pub const QUEUE_INDEX: Field = Field::new(0x10, 16).at(Q);
    /// full_emulation.
    pub const FULL_EMULATION: Field = Field::new(0x20, 1).at(Q);
    /// VIRTIO_F_VERSION_1 negotiated.
    pub const VIRTIO_VERSION_1_0: Field = Field::new(0x21, 1).at(Q);
    /// offload_type.
    pub const OFFLOAD_TYPE: Field = Field::new(0x24, 4).at(Q);
    /// MSI-X vector (MSI-X mode) or firmware QP number (QP mode).
    pub const EVENT_QPN_OR_MSIX: Field = Field::new(0x28, 24).at(Q);
    /// doorbell_stride_index.
    pub const DOORBELL_STRIDE_INDEX: Field = Field::new(0x40, 16).at(Q);
    /// Queue size.
    pub const QUEUE_SIZE: Field = Field::new(0x50, 16).at(Q);
    /// device_emulation_id.
    pub const DEVICE_EMULATION_ID: Field = Field::new(0x60, 32).at(Q);
    /// Descriptor area (in the key's address space).
    pub const DESC_ADDR: Field = Field::new(0x80, 64).at(Q);
    /// Used ring / device area.
    pub const USED_ADDR: Field = Field::new(0xc0, 64).at(Q);
    /// Available ring / driver area.
    pub const AVAILABLE_ADDR: Field = Field::new(0x100, 64).at(Q);
    /// Memory key of ring and buffer addresses.
    pub const VIRTIO_Q_MKEY: Field = Field::new(0x140, 32).at(Q);
    /// max_tunnel_desc.
    pub const MAX_TUNNEL_DESC: Field = Field::new(0x160, 16).at(Q);
    /// Error type (ERR state).
    pub const ERROR_TYPE: Field = Field::new(0x178, 8).at(Q);
    /// umem i (0..3) id.
    pub const fn umem_id(i: u32) -> Field {
        Field::new(0x180 + 0x80 * i, 32).at(Q)
    }
    /// umem i size.
    pub const fn umem_size(i: u32) -> Field {
        Field::new(0x1a0 + 0x80 * i, 32).at(Q)
    }
    /// umem i offset.
    pub const fn umem_offset(i: u32) -> Field {
        Field::new(0x1c0 + 0x80 * i, 64).at(Q)
    }
    /// Counters object id.
    pub const COUNTER_SET_ID: Field = Field::new(0x300, 32).at(Q);
    /// Protection domain.
    pub const PD: Field = Field::new(0x328, 24).at(Q);
    /// Event moderation mode.
    pub const QUEUE_PERIOD_MODE: Field = Field::new(0x342, 2).at(Q);
    /// Event moderation period.
    pub const QUEUE_PERIOD_US: Field = Field::new(0x344, 12).at(Q);
    /// Event moderation count.
    pub const QUEUE_MAX_COUNT: Field = Field::new(0x350, 16).at(Q);
    /// Descriptor group key.
    pub const DESC_GROUP_MKEY: Field = Field::new(0x360, 32).at(Q);

    /// modify_field_select bits.
    pub mod sel {
        #![allow(missing_docs)]
        pub const STATE: u64 = 1 << 0;
        pub const DIRTY_BITMAP_PARAMS: u64 = 1 << 3;
        pub const DIRTY_BITMAP_DUMP_ENABLE: u64 = 1 << 4;
        pub const QUEUE_PERIOD: u64 = 1 << 5;
        pub const VIRTIO_Q_ADDRS: u64 = 1 << 6;
        pub const HW_AVAILABLE_INDEX: u64 = 1 << 7;
        pub const HW_USED_INDEX: u64 = 1 << 8;
        pub const Q_TYPE: u64 = 1 << 9;
        pub const VIRTIO_VERSION_1_0: u64 = 1 << 10;
        pub const VIRTIO_Q_MKEY: u64 = 1 << 11;
        pub const QUEUE_FEATURE_BIT_MASK: u64 = 1 << 12;
        pub const EVENT_MODE: u64 = 1 << 13;
        pub const DESC_GROUP_MKEY: u64 = 1 << 14;
    }

    /// States.
    pub const STATE_INIT: u8 = 0;
    /// Processing.
    pub const STATE_RDY: u8 = 1;
    /// Stopped, positions kept.
    pub const STATE_SUSPEND: u8 = 2;
    /// Failed.
    pub const STATE_ERR: u8 = 3;
    /// Event modes.
    pub const EVENT_NO_MSIX: u8 = 0;
    /// Through a QP/CQ/EQ chain.
    pub const EVENT_QP: u8 = 1;
    /// MSI-X vector.
    pub const EVENT_MSIX: u8 = 2;

    /// mlx feature bit numbers (queue_feature_bit_mask / device_features_bits_mask).
    pub mod feat {
        #![allow(missing_docs)]
        pub const MRG_RXBUF: u32 = 2;
        pub const HOST_ECN: u32 = 4;
        pub const GUEST_ECN: u32 = 6;
        pub const GUEST_TSO6: u32 = 7;
        pub const GUEST_TSO4: u32 = 8;
        pub const GUEST_CSUM: u32 = 9;
        pub const CSUM: u32 = 10;
        pub const HOST_TSO6: u32 = 11;
        pub const HOST_TSO4: u32 = 12;
    }
}

/// VIRTIO_Q_COUNTERS object (QUERY output; offsets include the 16-byte header).
pub mod counters {
    use super::Field;
    const O: u32 = 0x10;
    /// Object size sent on CREATE and read on QUERY.
    pub const OBJ_LEN: usize = 64;
    /// Descriptors (chains) received from the driver.
    pub const RECEIVED_DESC: Field = Field::new(0x80, 64).at(O);
    /// Descriptors completed.
    pub const COMPLETED_DESC: Field = Field::new(0xc0, 64).at(O);
    /// Completion errors.
    pub const ERROR_CQES: Field = Field::new(0x100, 32).at(O);
    /// Bad descriptors.
    pub const BAD_DESC_ERRORS: Field = Field::new(0x120, 32).at(O);
    /// Chains over the length limit.
    pub const EXCEED_MAX_CHAIN: Field = Field::new(0x140, 32).at(O);
    /// Buffers the device could not use.
    pub const INVALID_BUFFER: Field = Field::new(0x160, 32).at(O);
}

/// Transport objects and steering.
pub mod steer {
    use super::Field;
    /// TIS / RQT / TIR contexts start at this byte.
    const X: u32 = 0x20;
    /// CREATE_TIS: transport domain.
    pub const TIS_TD: Field = Field::new(0x128, 24).at(X);
    /// CREATE_TIS input length.
    pub const TIS_LEN: usize = 0xc0;
    /// CREATE_RQT: list type (1 = VIRTIO_NET_Q).
    pub const RQT_LIST_Q_TYPE: Field = Field::new(0xa5, 3).at(X);
    /// CREATE_RQT: maximum size.
    pub const RQT_MAX_SIZE: Field = Field::new(0xb0, 16).at(X);
    /// CREATE_RQT: entries in use.
    pub const RQT_ACTUAL_SIZE: Field = Field::new(0xd0, 16).at(X);
    /// CREATE_RQT: byte offset of the entry array (BE32 each).
    pub const RQT_ENTRIES: usize = 0x110;
    /// MODIFY_RQT: table number.
    pub const RQT_MODIFY_RQTN: Field = Field::new(0x48, 24);
    /// MODIFY_RQT: what to change (bit 0: the entry list).
    pub const RQT_MODIFY_BITMASK: Field = Field::new(0x80, 64);
    /// RQT list type: virtio net queues.
    pub const RQT_LIST_VIRTIO_NET_Q: u64 = 1;
    /// CREATE_TIR: dispatch type (1 indirect).
    pub const TIR_DISP_TYPE: Field = Field::new(0x20, 4).at(X);
    /// CREATE_TIR: symmetric hash.
    pub const TIR_HASH_SYMMETRIC: Field = Field::new(0x100, 1).at(X);
    /// CREATE_TIR: the RQT.
    pub const TIR_INDIRECT_TABLE: Field = Field::new(0x108, 24).at(X);
    /// CREATE_TIR: hash function (2 Toeplitz).
    pub const TIR_HASH_FN: Field = Field::new(0x120, 4).at(X);
    /// CREATE_TIR: transport domain.
    pub const TIR_TD: Field = Field::new(0x128, 24).at(X);
    /// CREATE_TIR: byte offset of the 40-byte Toeplitz key.
    pub const TIR_KEY: usize = 0x20 + 0x140 / 8;
    /// CREATE_TIR: outer hash field selector.
    pub const TIR_HASH_FIELDS_OUTER: Field = Field::new(0x280, 32).at(X);
    /// CREATE_TIR input length.
    pub const TIR_LEN: usize = 0x20 + 0xf0;
    /// Hash field bits: source IP, destination IP, L4 source port, L4 destination port.
    pub const HASH_IP_PORTS: u64 = 0xf;

    /// Flow table commands: table type (0 NIC receive).
    pub const FT_TABLE_TYPE: Field = Field::new(0x80, 8);
    /// Flow table commands: table id.
    pub const FT_TABLE_ID: Field = Field::new(0xa8, 24);
    /// CREATE_FLOW_TABLE: level (context at byte 0x18).
    pub const FT_LEVEL: Field = Field::new(0x08, 8).at(0x18);
    /// CREATE_FLOW_TABLE: log2 of the entry count.
    pub const FT_LOG_SIZE: Field = Field::new(0x18, 8).at(0x18);
    /// CREATE_FLOW_TABLE input length.
    pub const FT_LEN: usize = 0x40;
    /// CREATE_FLOW_GROUP: first index.
    pub const FG_START: Field = Field::new(0xe0, 32);
    /// CREATE_FLOW_GROUP: last index.
    pub const FG_END: Field = Field::new(0x120, 32);
    /// CREATE_FLOW_GROUP: criteria enable (bit 0 outer headers).
    pub const FG_CRITERIA_ENABLE: Field = Field::new(0x1f8, 8);
    /// CREATE_FLOW_GROUP: byte offset of the match criteria.
    pub const FG_CRITERIA: usize = 0x40;
    /// DESTROY_FLOW_GROUP: group id.
    pub const FG_GROUP_ID: Field = Field::new(0xc0, 32);
    /// Size of a match parameter block.
    pub const MATCH_LEN: usize = 0x200;
    /// CREATE_FLOW_GROUP input length.
    pub const FG_LEN: usize = FG_CRITERIA + MATCH_LEN;
    /// Outer destination MAC, high 32 bits (byte offset in a match block).
    pub const MATCH_DMAC_47_16: usize = 0x08;
    /// Outer destination MAC, low 16 bits (high half of the dword at this byte).
    pub const MATCH_DMAC_15_0: usize = 0x0c;
    /// SET/DELETE_FLOW_TABLE_ENTRY: flow index.
    pub const FTE_INDEX: Field = Field::new(0x100, 32);
    /// The flow context starts at this byte.
    const C: u32 = 0x40;
    /// Flow context: group id.
    pub const FTE_GROUP_ID: Field = Field::new(0x20, 32).at(C);
    /// Flow context: action.
    pub const FTE_ACTION: Field = Field::new(0x70, 16).at(C);
    /// Flow context: destinations.
    pub const FTE_DEST_COUNT: Field = Field::new(0x88, 24).at(C);
    /// Flow context: byte offset of the match value.
    pub const FTE_MATCH: usize = 0x40 + 0x40;
    /// Flow context: first destination type.
    pub const FTE_DEST_TYPE: Field = Field::new(0x00, 8).at(C + 0x300);
    /// Flow context: first destination id.
    pub const FTE_DEST_ID: Field = Field::new(0x08, 24).at(C + 0x300);
    /// SET_FLOW_TABLE_ENTRY input length (one destination).
    pub const FTE_LEN: usize = 0x40 + 0x300 + 8;
    /// Action: forward to the destinations.
    pub const ACTION_FWD_DEST: u64 = 0x4;
    /// Destination type: TIR.
    pub const DEST_TIR: u64 = 2;
    /// Table type: NIC receive.
    pub const TABLE_NIC_RX: u64 = 0;
}

/// CREATE_EQ / DESTROY_EQ: the event queue context at byte 0x10.
pub mod eq {
    use super::Field;
    const C: u32 = 0x10;
    /// log2 of the entries.
    pub const LOG_EQ_SIZE: Field = Field::new(0x63, 5).at(C);
    /// UAR page of its doorbell.
    pub const UAR_PAGE: Field = Field::new(0x68, 24).at(C);
    /// MSI-X vector.
    pub const INTR: Field = Field::new(0xb8, 8).at(C);
    /// log2 of the ring's page size above 4 KiB.
    pub const LOG_PAGE_SIZE: Field = Field::new(0xc3, 5).at(C);
    /// event_bitmask: four big-endian qwords from this byte.
    pub const EVENT_BITMASK: usize = 0x58;
    /// Page list (BE64 each) from this byte.
    pub const PAS: usize = 0x110;
    /// CREATE_EQ output eq_number; DESTROY_EQ names it at the same place.
    pub const EQ_NUMBER: Field = Field::new(0x58, 8);
    /// DESTROY_EQ input length.
    pub const DESTROY_LEN: usize = 0x10;
}

/// CREATE_CQ / DESTROY_CQ: the completion queue context at byte 0x10; cqn at [`hdr::ID`].
pub mod cq {
    use super::Field;
    const C: u32 = 0x10;
    /// CQE size (0: 64 bytes).
    pub const CQE_SZ: Field = Field::new(0x08, 3).at(C);
    /// Collapsed: every CQE in entry 0.
    pub const CC: Field = Field::new(0x0b, 1).at(C);
    /// Overrun ignore.
    pub const OI: Field = Field::new(0x0e, 1).at(C);
    /// log2 of the entries.
    pub const LOG_CQ_SIZE: Field = Field::new(0x63, 5).at(C);
    /// UAR page of its arm doorbell.
    pub const UAR_PAGE: Field = Field::new(0x68, 24).at(C);
    /// Moderation period (µs).
    pub const CQ_PERIOD: Field = Field::new(0x84, 12).at(C);
    /// Moderation count.
    pub const CQ_MAX_COUNT: Field = Field::new(0x90, 16).at(C);
    /// Its event queue.
    pub const C_EQN: Field = Field::new(0xb8, 8).at(C);
    /// log2 of the ring's page size above 4 KiB.
    pub const LOG_PAGE_SIZE: Field = Field::new(0xc3, 5).at(C);
    /// Doorbell record address.
    pub const DBR_ADDR: Field = Field::new(0x1c0, 64).at(C);
    /// Page list from this byte.
    pub const PAS: usize = 0x110;
    /// CQE: byte count (BE32).
    pub const CQE_BYTE_CNT: usize = 44;
    /// CQE: WQE counter (BE16).
    pub const CQE_WQE_COUNTER: usize = 60;
    /// CQE: opcode (bits 7:4) and owner (bit 0).
    pub const CQE_OP_OWN: usize = 63;
    /// CQE size.
    pub const CQE_LEN: usize = 64;
    /// Opcode of an entry hardware has not written.
    pub const CQE_INVALID: u8 = 0xf;
    /// Requester error opcode.
    pub const CQE_REQ_ERR: u8 = 0xd;
    /// Responder error opcode.
    pub const CQE_RESP_ERR: u8 = 0xe;
    /// Arm command: next completion.
    pub const ARM_NEXT: u32 = 0;
}

/// CREATE_QP, its transitions and DESTROY_QP: the QP context at byte 0x18; qpn at
/// [`hdr::ID`].
pub mod qp {
    use super::Field;
    const C: u32 = 0x18;
    /// Transitions: optional parameter mask.
    pub const OPT_PARAM_MASK: Field = Field::new(0x80, 32);
    /// Service type (0 RC).
    pub const ST: Field = Field::new(0x08, 8).at(C);
    /// Path migration state (3 migrated).
    pub const PM_STATE: Field = Field::new(0x13, 2).at(C);
    /// Protection domain.
    pub const PD: Field = Field::new(0x28, 24).at(C);
    /// Path MTU (1: 256 bytes).
    pub const MTU: Field = Field::new(0x40, 3).at(C);
    /// log2 of the largest message.
    pub const LOG_MSG_MAX: Field = Field::new(0x43, 5).at(C);
    /// log2 of the receive WQEs.
    pub const LOG_RQ_SIZE: Field = Field::new(0x49, 4).at(C);
    /// log2 of the receive WQE size, minus 4.
    pub const LOG_RQ_STRIDE: Field = Field::new(0x4d, 3).at(C);
    /// No send queue.
    pub const NO_SQ: Field = Field::new(0x50, 1).at(C);
    /// UAR page.
    pub const UAR_PAGE: Field = Field::new(0x68, 24).at(C);
    /// log2 of the ring's page size above 4 KiB.
    pub const LOG_PAGE_SIZE: Field = Field::new(0xa3, 5).at(C);
    /// The connected QP.
    pub const REMOTE_QPN: Field = Field::new(0xa8, 24).at(C);
    /// The primary address path starts at this qpc bit.
    const PATH: u32 = 0xc0;
    /// Path: force loopback.
    pub const FL: Field = Field::new(PATH, 1).at(C);
    /// Path: ack timeout.
    pub const ACK_TIMEOUT: Field = Field::new(PATH + 0x40, 5).at(C);
    /// Path: port.
    pub const VHCA_PORT_NUM: Field = Field::new(PATH + 0x128, 8).at(C);
    /// Retries.
    pub const RETRY_COUNT: Field = Field::new(0x38d, 3).at(C);
    /// Receiver-not-ready retries (7: for ever).
    pub const RNR_RETRY: Field = Field::new(0x390, 3).at(C);
    /// Remote write enable.
    pub const RWE: Field = Field::new(0x491, 1).at(C);
    /// Receive CQ.
    pub const CQN_RCV: Field = Field::new(0x4e8, 24).at(C);
    /// Doorbell record address.
    pub const DBR_ADDR: Field = Field::new(0x500, 64).at(C);
    /// Receive queue type (0 regular, 3 zero-length).
    pub const RQ_TYPE: Field = Field::new(0x565, 3).at(C);
    /// CREATE_QP page list from this byte.
    pub const PAS: usize = 0x110;
    /// Transition input length.
    pub const MODIFY_LEN: usize = 0x110;
    /// Receive queue types.
    pub const RQ_REGULAR: u64 = 0;
    /// Zero-length receive queue (the firmware QP of a virtio queue).
    pub const RQ_ZERO_LENGTH: u64 = 3;
    /// Bytes of one receive WQE (one data segment).
    pub const RQ_WQE_LEN: usize = 16;
}

/// UAR page doorbells, byte offsets in the page.
pub mod uar {
    /// Page size (log_uar_page_sz = 0).
    pub const PAGE: u64 = 4096;
    /// CQ arm (64-bit, big-endian {sn << 28 | cmd << 24 | ci, cqn}).
    pub const CQ_DOORBELL: u64 = 0x20;
    /// EQ consumer index, arming the EQ (BE32 eqn << 24 | ci).
    pub const EQ_ARM: u64 = 0x40;
    /// EQ consumer index only.
    pub const EQ_UPDATE: u64 = 0x48;
    /// EQE: type byte.
    pub const EQE_TYPE: usize = 1;
    /// EQE: the completion's cqn (BE32, low 24 bits).
    pub const EQE_CQN: usize = 0x38;
    /// EQE: owner byte.
    pub const EQE_OWNER: usize = 63;
    /// EQE size.
    pub const EQE_LEN: usize = 64;
    /// EQE type of a completion event.
    pub const EQE_COMP: u8 = 0;
    /// Most EQEs consumed between consumer index updates.
    pub const EQ_UPDATE_EVERY: u32 = 0x80;
}

/// NIC vport context (MAC, MTU).
pub mod vport {
    use super::Field;
    /// QUERY output: the context starts at this byte.
    pub const QUERY_CTX: u32 = 0x10;
    /// Context length.
    pub const CTX_LEN: usize = 0x100;
    /// Permanent address (MAC in the low 48 bits), context-relative.
    pub const PERMANENT_ADDRESS: Field = Field::new(0x7a0, 64);
    /// MTU (frame size: MTU + 22), context-relative.
    pub const MTU: Field = Field::new(0x130, 16);
    /// Bytes the MTU field adds to the MTU.
    pub const MTU_OVERHEAD: u16 = 22;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fields_round_trip_and_are_big_endian() {
        let mut b = Buf::new(32);
        b.set(Field::new(0x00, 16), 0xa00);
        assert_eq!(&b.as_bytes()[..2], &[0x0a, 0x00]);
        b.set(Field::new(0x48, 24), 0x12_3456);
        assert_eq!(&b.as_bytes()[8..12], &[0x00, 0x12, 0x34, 0x56]);
        b.set(Field::new(0x9c, 4), 0xf);
        assert_eq!(b.as_bytes()[19], 0x0f);
        b.set(Field::new(0x9c, 4), 2);
        assert_eq!(b.get(Field::new(0x9c, 4)), 2);
        b.set(Field::new(0xc0, 64), 0x0102_0304_0506_0708);
        assert_eq!(&b.as_bytes()[24..32], &[1, 2, 3, 4, 5, 6, 7, 8]);
        assert_eq!(b.get(Field::new(0xc0, 64)), 0x0102_0304_0506_0708);
        // Neighbours are untouched.
        assert_eq!(b.get(Field::new(0x48, 24)), 0x12_3456);
        b.set(Field::new(0x40, 32), u64::MAX);
        assert_eq!(b.get(Field::new(0x40, 32)), 0xffff_ffff);
        assert_eq!(b.get(Field::new(0x48, 24)), 0xff_ffff);
        // Width overflow is masked.
        b.set(Field::new(0x01, 1), 3);
        assert_eq!(b.get(Field::new(0x01, 1)), 1);
        assert_eq!(b.get(Field::new(0x00, 1)), 0);
    }

    #[test]
    fn register_helpers() {
        assert_eq!(be_reg(1).to_le_bytes(), [0, 0, 0, 1]);
        assert_eq!(from_be_reg(be_reg(0x1234_5678)), 0x1234_5678);
    }
}

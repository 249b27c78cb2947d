//! vhost-user wire format: the 12-byte header, request codes and payloads.
//!
//! Pure parsing and encoding, no I/O: every payload is checked for its exact size (or its bounds,
//! for variable ones) before a field is read, so a truncated, oversized or malformed message is a
//! [`MsgError`] naming the request and what was expected, never a panic.

use std::fmt;

/// Size of the message header.
pub const HDR_LEN: usize = 12;
/// Largest payload accepted (SET_MEM_TABLE is 264 bytes, GET/SET_CONFIG at most 12 + 256).
pub const MAX_PAYLOAD: usize = 4096;
/// Most fds one message may carry.
pub const MAX_FDS: usize = 8;
/// Regions SET_MEM_TABLE can carry.
pub const MAX_TABLE_REGIONS: usize = 8;
/// Memory slots offered with CONFIGURE_MEM_SLOTS.
pub const MAX_MEM_SLOTS: u64 = 32;

/// Header flag: protocol version 1.
pub const FLAG_VERSION: u32 = 0x1;
/// Header flag: this is a reply.
pub const FLAG_REPLY: u32 = 0x4;
/// Header flag: the sender wants a reply (REPLY_ACK).
pub const FLAG_NEED_REPLY: u32 = 0x8;
/// Vring index mask in kick/call/err payloads.
pub const VRING_IDX_MASK: u64 = 0xff;
/// No fd accompanies a kick/call/err message (polling).
pub const VRING_NOFD: u64 = 0x100;

/// Protocol feature bits.
pub mod proto {
    /// Multiqueue.
    pub const MQ: u64 = 1 << 0;
    /// Dirty log in shared memory.
    pub const LOG_SHMFD: u64 = 1 << 1;
    /// SEND_RARP.
    pub const RARP: u64 = 1 << 2;
    /// REPLY_ACK.
    pub const REPLY_ACK: u64 = 1 << 3;
    /// NET_SET_MTU.
    pub const NET_MTU: u64 = 1 << 4;
    /// Back-end request channel.
    pub const BACKEND_REQ: u64 = 1 << 5;
    /// Cross-endian (unused).
    pub const CROSS_ENDIAN: u64 = 1 << 6;
    /// GET/SET_CONFIG.
    pub const CONFIG: u64 = 1 << 9;
    /// The back end may send fds on its channel.
    pub const BACKEND_SEND_FD: u64 = 1 << 10;
    /// VRING_HOST_NOTIFIER_MSG.
    pub const HOST_NOTIFIER: u64 = 1 << 11;
    /// Inflight tracking shared memory.
    pub const INFLIGHT_SHMFD: u64 = 1 << 12;
    /// CONFIGURE_MEM_SLOTS (ADD/REM_MEM_REG).
    pub const CONFIGURE_MEM_SLOTS: u64 = 1 << 15;
    /// SET/GET_STATUS.
    pub const STATUS: u64 = 1 << 16;
}

/// Front-end request codes vdpakit knows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u32)]
#[allow(missing_docs)]
pub enum Req {
    GetFeatures = 1,
    SetFeatures = 2,
    SetOwner = 3,
    ResetOwner = 4,
    SetMemTable = 5,
    SetLogBase = 6,
    SetLogFd = 7,
    SetVringNum = 8,
    SetVringAddr = 9,
    SetVringBase = 10,
    GetVringBase = 11,
    SetVringKick = 12,
    SetVringCall = 13,
    SetVringErr = 14,
    GetProtocolFeatures = 15,
    SetProtocolFeatures = 16,
    GetQueueNum = 17,
    SetVringEnable = 18,
    SendRarp = 19,
    NetSetMtu = 20,
    SetBackendReqFd = 21,
    IotlbMsg = 22,
    GetConfig = 24,
    SetConfig = 25,
    GetInflightFd = 31,
    SetInflightFd = 32,
    GetMaxMemSlots = 36,
    AddMemReg = 37,
    RemMemReg = 38,
    SetStatus = 39,
    GetStatus = 40,
}

impl Req {
    /// Decodes a request code.
    pub fn from_u32(v: u32) -> Option<Req> {
        use Req::*;
        Some(match v {
            1 => GetFeatures,
            2 => SetFeatures,
            3 => SetOwner,
            4 => ResetOwner,
            5 => SetMemTable,
            6 => SetLogBase,
            7 => SetLogFd,
            8 => SetVringNum,
            9 => SetVringAddr,
            10 => SetVringBase,
            11 => GetVringBase,
            12 => SetVringKick,
            13 => SetVringCall,
            14 => SetVringErr,
            15 => GetProtocolFeatures,
            16 => SetProtocolFeatures,
            17 => GetQueueNum,
            18 => SetVringEnable,
            19 => SendRarp,
            20 => NetSetMtu,
            21 => SetBackendReqFd,
            22 => IotlbMsg,
            24 => GetConfig,
            25 => SetConfig,
            31 => GetInflightFd,
            32 => SetInflightFd,
            36 => GetMaxMemSlots,
            37 => AddMemReg,
            38 => RemMemReg,
            39 => SetStatus,
            40 => GetStatus,
            _ => return None,
        })
    }

    /// How many fds the request carries: (min, max).
    pub fn fds(self) -> (usize, usize) {
        use Req::*;
        match self {
            SetMemTable => (0, MAX_TABLE_REGIONS),
            SetLogBase | SetLogFd | SetBackendReqFd | SetInflightFd | AddMemReg => (1, 1),
            SetVringKick | SetVringCall | SetVringErr => (0, 1),
            _ => (0, 0),
        }
    }

    /// Whether the back end always replies (independently of REPLY_ACK).
    pub fn has_reply(self) -> bool {
        use Req::*;
        matches!(
            self,
            GetFeatures
                | GetProtocolFeatures
                | GetVringBase
                | GetQueueNum
                | GetConfig
                | GetInflightFd
                | GetMaxMemSlots
                | GetStatus
        )
    }
}

/// Back-end → front-end request codes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u32)]
pub enum BackendReq {
    /// IOTLB miss.
    IotlbMsg = 1,
    /// Device configuration changed.
    ConfigChange = 2,
    /// Map (or unmap) a host notifier page for a vring.
    VringHostNotifier = 3,
}

/// Errors in message framing or payloads.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MsgError {
    /// A request code vdpakit does not handle.
    #[error("unknown request code {0}: accepted are 1-22, 24, 25, 31, 32, 36-40")]
    UnknownRequest(u32),
    /// Header flags without version 1.
    #[error("bad header flags {0:#x}: version 1 expected")]
    BadVersion(u32),
    /// Payload size announced in the header is too large.
    #[error("{req}: payload of {size} bytes is over the limit of {MAX_PAYLOAD}")]
    Oversized {
        /// Request name.
        req: &'static str,
        /// Announced size.
        size: usize,
    },
    /// Payload of the wrong size.
    #[error("{req}: payload is {got} bytes, expected {expected}")]
    BadSize {
        /// Request name.
        req: &'static str,
        /// Size received.
        got: usize,
        /// Size expected (a description).
        expected: String,
    },
    /// Wrong number of fds.
    #[error("{req}: carries {got} fds, accepted {min}..={max}")]
    BadFds {
        /// Request name.
        req: &'static str,
        /// Fds received.
        got: usize,
        /// Minimum accepted.
        min: usize,
        /// Maximum accepted.
        max: usize,
    },
    /// A field with a bad value.
    #[error("{req}: {field} = {value} is invalid: {accepted}")]
    BadField {
        /// Request name.
        req: &'static str,
        /// Field name.
        field: &'static str,
        /// Value as received.
        value: u64,
        /// What is accepted.
        accepted: &'static str,
    },
}

/// A decoded header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    /// Raw request code.
    pub request: u32,
    /// Flags.
    pub flags: u32,
    /// Payload size.
    pub size: u32,
}

impl Header {
    /// Decodes and checks a header (version, size limit).
    pub fn parse(b: &[u8; HDR_LEN]) -> Result<Header, MsgError> {
        let h = Header {
            request: le32(b, 0),
            flags: le32(b, 4),
            size: le32(b, 8),
        };
        if h.flags & 0x3 != FLAG_VERSION {
            return Err(MsgError::BadVersion(h.flags));
        }
        if h.size as usize > MAX_PAYLOAD {
            let req = Req::from_u32(h.request).map_or("request", name);
            return Err(MsgError::Oversized {
                req,
                size: h.size as usize,
            });
        }
        Ok(h)
    }

    /// Encodes.
    pub fn encode(&self) -> [u8; HDR_LEN] {
        let mut b = [0u8; HDR_LEN];
        b[0..4].copy_from_slice(&self.request.to_le_bytes());
        b[4..8].copy_from_slice(&self.flags.to_le_bytes());
        b[8..12].copy_from_slice(&self.size.to_le_bytes());
        b
    }

    /// Whether the sender asked for a REPLY_ACK.
    pub fn need_reply(&self) -> bool {
        self.flags & FLAG_NEED_REPLY != 0
    }
}

/// Name of a request, for messages.
pub fn name(r: Req) -> &'static str {
    use Req::*;
    match r {
        GetFeatures => "GET_FEATURES",
        SetFeatures => "SET_FEATURES",
        SetOwner => "SET_OWNER",
        ResetOwner => "RESET_OWNER",
        SetMemTable => "SET_MEM_TABLE",
        SetLogBase => "SET_LOG_BASE",
        SetLogFd => "SET_LOG_FD",
        SetVringNum => "SET_VRING_NUM",
        SetVringAddr => "SET_VRING_ADDR",
        SetVringBase => "SET_VRING_BASE",
        GetVringBase => "GET_VRING_BASE",
        SetVringKick => "SET_VRING_KICK",
        SetVringCall => "SET_VRING_CALL",
        SetVringErr => "SET_VRING_ERR",
        GetProtocolFeatures => "GET_PROTOCOL_FEATURES",
        SetProtocolFeatures => "SET_PROTOCOL_FEATURES",
        GetQueueNum => "GET_QUEUE_NUM",
        SetVringEnable => "SET_VRING_ENABLE",
        SendRarp => "SEND_RARP",
        NetSetMtu => "NET_SET_MTU",
        SetBackendReqFd => "SET_BACKEND_REQ_FD",
        IotlbMsg => "IOTLB_MSG",
        GetConfig => "GET_CONFIG",
        SetConfig => "SET_CONFIG",
        GetInflightFd => "GET_INFLIGHT_FD",
        SetInflightFd => "SET_INFLIGHT_FD",
        GetMaxMemSlots => "GET_MAX_MEM_SLOTS",
        AddMemReg => "ADD_MEM_REG",
        RemMemReg => "REM_MEM_REG",
        SetStatus => "SET_STATUS",
        GetStatus => "GET_STATUS",
    }
}

impl fmt::Display for Req {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(name(*self))
    }
}

fn le32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

fn le64(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(a)
}

fn exact(req: Req, p: &[u8], n: usize) -> Result<(), MsgError> {
    if p.len() != n {
        return Err(MsgError::BadSize {
            req: name(req),
            got: p.len(),
            expected: format!("{n}"),
        });
    }
    Ok(())
}

/// Checks the fd count for a request.
pub fn check_fds(req: Req, n: usize) -> Result<(), MsgError> {
    let (min, max) = req.fds();
    if n < min || n > max {
        return Err(MsgError::BadFds {
            req: name(req),
            got: n,
            min,
            max,
        });
    }
    Ok(())
}

/// A u64 payload.
pub fn parse_u64(req: Req, p: &[u8]) -> Result<u64, MsgError> {
    exact(req, p, 8)?;
    Ok(le64(p, 0))
}

/// Vring state: index + num (SET_VRING_NUM, SET/GET_VRING_BASE, SET_VRING_ENABLE).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VringState {
    /// Vring index.
    pub index: u32,
    /// Value.
    pub num: u32,
}

/// Parses a vring state payload.
pub fn parse_vring_state(req: Req, p: &[u8]) -> Result<VringState, MsgError> {
    exact(req, p, 8)?;
    Ok(VringState {
        index: le32(p, 0),
        num: le32(p, 4),
    })
}

/// Encodes a vring state.
pub fn encode_vring_state(s: VringState) -> Vec<u8> {
    let mut v = Vec::with_capacity(8);
    v.extend_from_slice(&s.index.to_le_bytes());
    v.extend_from_slice(&s.num.to_le_bytes());
    v
}

/// SET_VRING_ADDR payload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VringAddr {
    /// Vring index.
    pub index: u32,
    /// Flags (bit 0: log used ring).
    pub flags: u32,
    /// Descriptor table (front-end VA).
    pub desc: u64,
    /// Used ring / device area (front-end VA).
    pub used: u64,
    /// Avail ring / driver area (front-end VA).
    pub avail: u64,
    /// Used ring GPA, for dirty logging.
    pub log: u64,
}

/// Flag of [`VringAddr::flags`]: log writes to the used ring.
pub const VRING_F_LOG: u32 = 1;

/// Parses SET_VRING_ADDR.
pub fn parse_vring_addr(p: &[u8]) -> Result<VringAddr, MsgError> {
    exact(Req::SetVringAddr, p, 40)?;
    Ok(VringAddr {
        index: le32(p, 0),
        flags: le32(p, 4),
        desc: le64(p, 8),
        used: le64(p, 16),
        avail: le64(p, 24),
        log: le64(p, 32),
    })
}

/// Encodes a SET_VRING_ADDR payload (the front end's side).
pub fn encode_vring_addr(a: &VringAddr) -> Vec<u8> {
    let mut v = Vec::with_capacity(40);
    v.extend_from_slice(&a.index.to_le_bytes());
    v.extend_from_slice(&a.flags.to_le_bytes());
    for x in [a.desc, a.used, a.avail, a.log] {
        v.extend_from_slice(&x.to_le_bytes());
    }
    v
}

/// One memory region as described on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemRegion {
    /// Guest physical address.
    pub gpa: u64,
    /// Size in bytes.
    pub size: u64,
    /// Front-end virtual address.
    pub uva: u64,
    /// Offset into the fd to map.
    pub mmap_offset: u64,
}

fn region_at(p: &[u8], at: usize) -> MemRegion {
    MemRegion {
        gpa: le64(p, at),
        size: le64(p, at + 8),
        uva: le64(p, at + 16),
        mmap_offset: le64(p, at + 24),
    }
}

fn check_region(req: Req, r: &MemRegion) -> Result<(), MsgError> {
    let bad = |field, value, accepted| MsgError::BadField {
        req: name(req),
        field,
        value,
        accepted,
    };
    if r.size == 0 {
        return Err(bad("memory_size", 0, "a non-zero size"));
    }
    if r.gpa.checked_add(r.size).is_none() {
        return Err(bad(
            "guest_phys_addr",
            r.gpa,
            "gpa + size must not overflow",
        ));
    }
    if r.uva.checked_add(r.size).is_none() {
        return Err(bad("userspace_addr", r.uva, "uva + size must not overflow"));
    }
    if r.mmap_offset.checked_add(r.size).is_none() {
        return Err(bad(
            "mmap_offset",
            r.mmap_offset,
            "offset + size must not overflow",
        ));
    }
    Ok(())
}

/// Parses SET_MEM_TABLE: 1..=8 regions, each with its own fd; sizes non-zero, no overflow.
pub fn parse_mem_table(p: &[u8], nfds: usize) -> Result<Vec<MemRegion>, MsgError> {
    let req = Req::SetMemTable;
    if p.len() < 8 {
        return Err(MsgError::BadSize {
            req: name(req),
            got: p.len(),
            expected: "at least 8".into(),
        });
    }
    let n = le32(p, 0) as usize;
    if n == 0 || n > MAX_TABLE_REGIONS {
        return Err(MsgError::BadField {
            req: name(req),
            field: "nregions",
            value: n as u64,
            accepted: "1..=8",
        });
    }
    let need = 8 + n * 32;
    // QEMU always sends the full 8-region array; accept exactly the regions used or the full table.
    if p.len() != need && p.len() != 8 + MAX_TABLE_REGIONS * 32 {
        return Err(MsgError::BadSize {
            req: name(req),
            got: p.len(),
            expected: format!("{need} or 264"),
        });
    }
    if nfds != n {
        return Err(MsgError::BadFds {
            req: name(req),
            got: nfds,
            min: n,
            max: n,
        });
    }
    let regions: Vec<MemRegion> = (0..n).map(|i| region_at(p, 8 + i * 32)).collect();
    for r in &regions {
        check_region(req, r)?;
    }
    Ok(regions)
}

/// Encodes a SET_MEM_TABLE payload with exactly `regions.len()` (1..=8) regions (the front
/// end's side; the fds go alongside, one per region, in the same order).
pub fn encode_mem_table(regions: &[MemRegion]) -> Vec<u8> {
    let mut v = Vec::with_capacity(8 + 32 * regions.len());
    v.extend_from_slice(&(regions.len() as u32).to_le_bytes());
    v.extend_from_slice(&0u32.to_le_bytes());
    for r in regions {
        for x in [r.gpa, r.size, r.uva, r.mmap_offset] {
            v.extend_from_slice(&x.to_le_bytes());
        }
    }
    v
}

/// Parses ADD_MEM_REG / REM_MEM_REG (u64 padding + one region).
pub fn parse_single_region(req: Req, p: &[u8]) -> Result<MemRegion, MsgError> {
    exact(req, p, 40)?;
    let r = region_at(p, 8);
    check_region(req, &r)?;
    Ok(r)
}

/// SET_LOG_BASE payload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LogArea {
    /// Bytes to map.
    pub size: u64,
    /// Offset in the fd.
    pub offset: u64,
}

/// Parses SET_LOG_BASE.
pub fn parse_log(p: &[u8]) -> Result<LogArea, MsgError> {
    exact(Req::SetLogBase, p, 16)?;
    let l = LogArea {
        size: le64(p, 0),
        offset: le64(p, 8),
    };
    if l.size == 0 || l.size > (1 << 40) || l.offset.checked_add(l.size).is_none() {
        return Err(MsgError::BadField {
            req: "SET_LOG_BASE",
            field: "mmap_size",
            value: l.size,
            accepted: "1..=2^40 bytes, offset + size without overflow",
        });
    }
    Ok(l)
}

/// IOTLB message (vhost_iotlb_msg).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IotlbMsg {
    /// I/O virtual address.
    pub iova: u64,
    /// Size.
    pub size: u64,
    /// Front-end VA.
    pub uaddr: u64,
    /// Permissions (1 RO, 2 WO, 3 RW).
    pub perm: u8,
    /// Type (1 miss, 2 update, 3 invalidate, 4 access fail).
    pub kind: u8,
}

/// Parses IOTLB_MSG.
pub fn parse_iotlb(p: &[u8]) -> Result<IotlbMsg, MsgError> {
    exact(Req::IotlbMsg, p, 32)?;
    Ok(IotlbMsg {
        iova: le64(p, 0),
        size: le64(p, 8),
        uaddr: le64(p, 16),
        perm: p[24],
        kind: p[25],
    })
}

/// Encodes an IOTLB_MSG payload (the back end sends MISS with it on the back-end channel).
pub fn encode_iotlb(m: &IotlbMsg) -> Vec<u8> {
    let mut v = Vec::with_capacity(32);
    v.extend_from_slice(&m.iova.to_le_bytes());
    v.extend_from_slice(&m.size.to_le_bytes());
    v.extend_from_slice(&m.uaddr.to_le_bytes());
    v.push(m.perm);
    v.push(m.kind);
    v.resize(32, 0);
    v
}

/// GET/SET_CONFIG payload header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigMsg {
    /// Offset into the device config space.
    pub offset: u32,
    /// Bytes.
    pub size: u32,
    /// Flags.
    pub flags: u32,
    /// Data.
    pub data: Vec<u8>,
}

/// Parses GET/SET_CONFIG (12-byte header + size bytes, size ≤ 256).
pub fn parse_config(req: Req, p: &[u8]) -> Result<ConfigMsg, MsgError> {
    if p.len() < 12 {
        return Err(MsgError::BadSize {
            req: name(req),
            got: p.len(),
            expected: "at least 12".into(),
        });
    }
    let size = le32(p, 4);
    if size > 256 || p.len() != 12 + size as usize {
        return Err(MsgError::BadSize {
            req: name(req),
            got: p.len(),
            expected: "12 + size, size <= 256".into(),
        });
    }
    Ok(ConfigMsg {
        offset: le32(p, 0),
        size,
        flags: le32(p, 8),
        data: p[12..].to_vec(),
    })
}

/// Encodes a config reply.
pub fn encode_config(c: &ConfigMsg) -> Vec<u8> {
    let mut v = Vec::with_capacity(12 + c.data.len());
    v.extend_from_slice(&c.offset.to_le_bytes());
    v.extend_from_slice(&(c.data.len() as u32).to_le_bytes());
    v.extend_from_slice(&c.flags.to_le_bytes());
    v.extend_from_slice(&c.data);
    v
}

/// GET/SET_INFLIGHT_FD payload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Inflight {
    /// Bytes of the area.
    pub mmap_size: u64,
    /// Offset in the fd.
    pub mmap_offset: u64,
    /// Queues covered.
    pub num_queues: u16,
    /// Queue size.
    pub queue_size: u16,
}

/// Parses an inflight payload (24 bytes with padding).
pub fn parse_inflight(req: Req, p: &[u8]) -> Result<Inflight, MsgError> {
    if p.len() != 20 && p.len() != 24 {
        return Err(MsgError::BadSize {
            req: name(req),
            got: p.len(),
            expected: "20 or 24".into(),
        });
    }
    Ok(Inflight {
        mmap_size: le64(p, 0),
        mmap_offset: le64(p, 8),
        num_queues: u16::from_le_bytes([p[16], p[17]]),
        queue_size: u16::from_le_bytes([p[18], p[19]]),
    })
}

/// Encodes an inflight payload (24 bytes).
pub fn encode_inflight(i: &Inflight) -> Vec<u8> {
    let mut v = Vec::with_capacity(24);
    v.extend_from_slice(&i.mmap_size.to_le_bytes());
    v.extend_from_slice(&i.mmap_offset.to_le_bytes());
    v.extend_from_slice(&i.num_queues.to_le_bytes());
    v.extend_from_slice(&i.queue_size.to_le_bytes());
    v.extend_from_slice(&[0; 4]);
    v
}

/// Encodes a VRING_HOST_NOTIFIER_MSG payload (u64 index|flags, size, offset).
pub fn encode_vring_area(index: u8, nofd: bool, size: u64, offset: u64) -> Vec<u8> {
    let mut v = Vec::with_capacity(24);
    let u = index as u64 | if nofd { VRING_NOFD } else { 0 };
    v.extend_from_slice(&u.to_le_bytes());
    v.extend_from_slice(&size.to_le_bytes());
    v.extend_from_slice(&offset.to_le_bytes());
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hdr(req: u32, flags: u32, size: u32) -> [u8; HDR_LEN] {
        Header {
            request: req,
            flags,
            size,
        }
        .encode()
    }

    #[test]
    fn header_round_trip_and_checks() {
        let h = Header::parse(&hdr(5, FLAG_VERSION | FLAG_NEED_REPLY, 264)).unwrap();
        assert_eq!((h.request, h.size), (5, 264));
        assert!(h.need_reply());
        assert_eq!(Header::parse(&hdr(5, 0, 8)), Err(MsgError::BadVersion(0)));
        let e = Header::parse(&hdr(5, 1, 5000)).unwrap_err();
        assert!(
            e.to_string().contains("SET_MEM_TABLE") && e.to_string().contains("5000"),
            "{e}"
        );
    }

    #[test]
    fn request_codes_round_trip() {
        for code in 0..64u32 {
            if let Some(r) = Req::from_u32(code) {
                assert_eq!(r as u32, code);
            }
        }
        assert!(
            Req::from_u32(23).is_none()
                && Req::from_u32(35).is_none()
                && Req::from_u32(99).is_none()
        );
    }

    #[test]
    fn mem_table_checks() {
        let mut p = vec![0u8; 8 + 32];
        p[0] = 1;
        p[8..16].copy_from_slice(&0u64.to_le_bytes());
        p[16..24].copy_from_slice(&4096u64.to_le_bytes());
        p[24..32].copy_from_slice(&0x7f00_0000_0000u64.to_le_bytes());
        let r = parse_mem_table(&p, 1).unwrap();
        assert_eq!(r[0].size, 4096);
        assert!(matches!(
            parse_mem_table(&p, 2),
            Err(MsgError::BadFds { .. })
        ));
        let mut z = p.clone();
        z[16..24].copy_from_slice(&0u64.to_le_bytes());
        assert!(
            parse_mem_table(&z, 1)
                .unwrap_err()
                .to_string()
                .contains("memory_size")
        );
        let mut o = p.clone();
        o[8..16].copy_from_slice(&u64::MAX.to_le_bytes());
        assert!(
            parse_mem_table(&o, 1)
                .unwrap_err()
                .to_string()
                .contains("overflow")
        );
        let mut nine = p.clone();
        nine[0] = 9;
        assert!(
            parse_mem_table(&nine, 9)
                .unwrap_err()
                .to_string()
                .contains("1..=8")
        );
        assert!(parse_mem_table(&p[..20], 1).is_err());
        let mut full = vec![0u8; 264];
        full[..40].copy_from_slice(&p);
        assert_eq!(
            parse_mem_table(&full, 1).unwrap().len(),
            1,
            "QEMU's full-size table"
        );
    }

    #[test]
    fn front_end_encoders_round_trip_through_the_parsers() {
        let a = VringAddr {
            index: 3,
            flags: 0,
            desc: 0x1000,
            used: 0x3000,
            avail: 0x2000,
            log: 0,
        };
        assert_eq!(parse_vring_addr(&encode_vring_addr(&a)).unwrap(), a);
        let r = [
            MemRegion {
                gpa: 0x7f00_0000_0000,
                size: 2 << 20,
                uva: 0x7f00_0000_0000,
                mmap_offset: 0,
            },
            MemRegion {
                gpa: 0x7f10_0000_0000,
                size: 4096,
                uva: 0x7f10_0000_0000,
                mmap_offset: 0,
            },
        ];
        assert_eq!(parse_mem_table(&encode_mem_table(&r), 2).unwrap(), r);
    }

    #[test]
    fn fixed_payloads_reject_wrong_sizes() {
        assert!(parse_u64(Req::SetFeatures, &[0; 7]).is_err());
        assert!(parse_vring_state(Req::SetVringNum, &[0; 12]).is_err());
        assert!(parse_vring_addr(&[0; 39]).is_err());
        assert!(parse_iotlb(&[0; 31]).is_err());
        assert!(parse_config(Req::SetConfig, &[0; 11]).is_err());
        let mut c = vec![0u8; 12 + 4];
        c[4] = 4;
        assert_eq!(parse_config(Req::SetConfig, &c).unwrap().data.len(), 4);
        c[4] = 5;
        assert!(parse_config(Req::SetConfig, &c).is_err());
        assert!(matches!(
            check_fds(Req::SetVringKick, 2),
            Err(MsgError::BadFds { .. })
        ));
        assert!(check_fds(Req::SetLogBase, 0).is_err());
        assert!(check_fds(Req::GetFeatures, 1).is_err());
    }
}

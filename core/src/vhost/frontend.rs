//! The vhost-user front end's protocol client: the requests a driver (vdpakit's `virtio-user`
//! port) sends to a back end, built on the same wire format ([`msg`](super::msg)) and connection
//! ([`Conn`]) as the back end.
//!
//! Every call is synchronous: requests that have a reply (`GET_*`) wait for it and check its
//! request code, flags and size; other requests ask for a REPLY_ACK once that protocol feature is
//! negotiated, so a refusal surfaces as [`VhostError::Nack`] at the request that caused it.
//! Control thread only; never used on a datapath.

use std::os::fd::BorrowedFd;
use std::os::unix::net::UnixStream;
use std::time::Duration;

use super::VhostError;
use super::msg::{
    self, FLAG_NEED_REPLY, FLAG_REPLY, FLAG_VERSION, Header, MemRegion, Req, VringAddr, VringState,
    proto,
};
use super::socket::Conn;

/// How long a reply may take before the back end is considered hung.
pub const REPLY_TIMEOUT: Duration = Duration::from_secs(5);

/// One front-end connection to a back end.
#[derive(Debug)]
pub struct Frontend {
    conn: Conn,
    reply_ack: bool,
}

impl Frontend {
    /// Wraps a connected stream (replies time out after [`REPLY_TIMEOUT`]).
    pub fn new(stream: UnixStream) -> Result<Frontend, VhostError> {
        stream
            .set_read_timeout(Some(REPLY_TIMEOUT))
            .map_err(|e| VhostError::Conn(e.into()))?;
        Ok(Frontend {
            conn: Conn::new(stream),
            reply_ack: false,
        })
    }

    /// The connection's stream (to poll it for a hang-up).
    pub fn stream(&self) -> &UnixStream {
        self.conn.stream()
    }

    /// Sends a request without reply; with REPLY_ACK negotiated, asks for and checks the ack.
    fn request(
        &mut self,
        req: Req,
        payload: &[u8],
        fds: &[BorrowedFd<'_>],
    ) -> Result<(), VhostError> {
        // SET_PROTOCOL_FEATURES is never acked: the back end decides on the old feature set.
        let ack = self.reply_ack && req != Req::SetProtocolFeatures;
        let flags = FLAG_VERSION | if ack { FLAG_NEED_REPLY } else { 0 };
        self.send(req, flags, payload, fds)?;
        if ack {
            let status = self.reply_u64(req)?;
            if status != 0 {
                return Err(VhostError::Nack {
                    req: msg::name(req),
                    status,
                });
            }
        }
        Ok(())
    }

    fn send(
        &mut self,
        req: Req,
        flags: u32,
        payload: &[u8],
        fds: &[BorrowedFd<'_>],
    ) -> Result<(), VhostError> {
        let h = Header {
            request: req as u32,
            flags,
            size: payload.len() as u32,
        };
        self.conn.send(h, payload, fds)?;
        Ok(())
    }

    /// Reads the reply to `req` and returns its payload.
    fn reply(&mut self, req: Req) -> Result<Vec<u8>, VhostError> {
        let m = self.conn.recv()?;
        let bad = |why: String| VhostError::BadReply {
            req: msg::name(req),
            why,
        };
        if m.hdr.request != req as u32 {
            return Err(bad(format!(
                "reply names request {} instead of {}",
                m.hdr.request, req as u32
            )));
        }
        if m.hdr.flags & FLAG_REPLY == 0 {
            return Err(bad(format!("flags {:#x} lack the reply bit", m.hdr.flags)));
        }
        if !m.fds.is_empty() {
            return Err(bad(format!("{} unexpected fds", m.fds.len())));
        }
        Ok(m.payload)
    }

    fn reply_u64(&mut self, req: Req) -> Result<u64, VhostError> {
        let p = self.reply(req)?;
        Ok(msg::parse_u64(req, &p)?)
    }

    /// A request with a u64 reply.
    fn get_u64(&mut self, req: Req) -> Result<u64, VhostError> {
        self.send(req, FLAG_VERSION, &[], &[])?;
        self.reply_u64(req)
    }

    /// SET_OWNER.
    pub fn set_owner(&mut self) -> Result<(), VhostError> {
        self.request(Req::SetOwner, &[], &[])
    }

    /// RESET_OWNER (a courtesy before closing; back ends also reset on disconnect).
    pub fn reset_owner(&mut self) -> Result<(), VhostError> {
        self.request(Req::ResetOwner, &[], &[])
    }

    /// GET_FEATURES.
    pub fn get_features(&mut self) -> Result<u64, VhostError> {
        self.get_u64(Req::GetFeatures)
    }

    /// SET_FEATURES.
    pub fn set_features(&mut self, f: u64) -> Result<(), VhostError> {
        self.request(Req::SetFeatures, &f.to_le_bytes(), &[])
    }

    /// GET_PROTOCOL_FEATURES.
    pub fn get_protocol_features(&mut self) -> Result<u64, VhostError> {
        self.get_u64(Req::GetProtocolFeatures)
    }

    /// SET_PROTOCOL_FEATURES; from now on requests ask for acks if REPLY_ACK is in `f`.
    pub fn set_protocol_features(&mut self, f: u64) -> Result<(), VhostError> {
        self.request(Req::SetProtocolFeatures, &f.to_le_bytes(), &[])?;
        self.reply_ack = f & proto::REPLY_ACK != 0;
        Ok(())
    }

    /// GET_QUEUE_NUM (needs the MQ protocol feature): queue pairs the back end supports.
    pub fn get_queue_num(&mut self) -> Result<u64, VhostError> {
        self.get_u64(Req::GetQueueNum)
    }

    /// SET_MEM_TABLE with one fd per region.
    pub fn set_mem_table(
        &mut self,
        regions: &[MemRegion],
        fds: &[BorrowedFd<'_>],
    ) -> Result<(), VhostError> {
        if regions.is_empty()
            || regions.len() > msg::MAX_TABLE_REGIONS
            || fds.len() != regions.len()
        {
            return Err(VhostError::Unsupported {
                req: "SET_MEM_TABLE",
                what: format!(
                    "{} regions with {} fds (1..=8, one each)",
                    regions.len(),
                    fds.len()
                ),
            });
        }
        self.request(Req::SetMemTable, &msg::encode_mem_table(regions), fds)
    }

    fn vring_state(&mut self, req: Req, index: u32, num: u32) -> Result<(), VhostError> {
        self.request(
            req,
            &msg::encode_vring_state(VringState { index, num }),
            &[],
        )
    }

    /// SET_VRING_NUM.
    pub fn set_vring_num(&mut self, index: u32, num: u32) -> Result<(), VhostError> {
        self.vring_state(Req::SetVringNum, index, num)
    }

    /// SET_VRING_BASE (packed: bit 15 is the wrap counter).
    pub fn set_vring_base(&mut self, index: u32, base: u32) -> Result<(), VhostError> {
        self.vring_state(Req::SetVringBase, index, base)
    }

    /// SET_VRING_ENABLE.
    pub fn set_vring_enable(&mut self, index: u32, on: bool) -> Result<(), VhostError> {
        self.vring_state(Req::SetVringEnable, index, on as u32)
    }

    /// SET_VRING_ADDR (front-end virtual addresses).
    pub fn set_vring_addr(&mut self, a: &VringAddr) -> Result<(), VhostError> {
        self.request(Req::SetVringAddr, &msg::encode_vring_addr(a), &[])
    }

    fn vring_fd(
        &mut self,
        req: Req,
        index: u32,
        fd: Option<BorrowedFd<'_>>,
    ) -> Result<(), VhostError> {
        let mut u = u64::from(index) & msg::VRING_IDX_MASK;
        if fd.is_none() {
            u |= msg::VRING_NOFD;
        }
        let fds: Vec<BorrowedFd<'_>> = fd.into_iter().collect();
        self.request(req, &u.to_le_bytes(), &fds)
    }

    /// SET_VRING_KICK (None: the back end polls).
    pub fn set_vring_kick(
        &mut self,
        index: u32,
        fd: Option<BorrowedFd<'_>>,
    ) -> Result<(), VhostError> {
        self.vring_fd(Req::SetVringKick, index, fd)
    }

    /// SET_VRING_CALL (None: the front end polls).
    pub fn set_vring_call(
        &mut self,
        index: u32,
        fd: Option<BorrowedFd<'_>>,
    ) -> Result<(), VhostError> {
        self.vring_fd(Req::SetVringCall, index, fd)
    }

    /// GET_VRING_BASE: stops the vring in the back end and returns its position.
    pub fn get_vring_base(&mut self, index: u32) -> Result<u32, VhostError> {
        let req = Req::GetVringBase;
        self.send(
            req,
            FLAG_VERSION,
            &msg::encode_vring_state(VringState { index, num: 0 }),
            &[],
        )?;
        let p = self.reply(req)?;
        let s = msg::parse_vring_state(req, &p)?;
        if s.index != index {
            return Err(VhostError::BadReply {
                req: msg::name(req),
                why: format!("reply is for vring {} instead of {index}", s.index),
            });
        }
        Ok(s.num)
    }
}

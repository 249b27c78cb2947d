//! The QP event mode in the model: event queues, completion queues and queue pairs, their
//! commands (CREATE/DESTROY_EQ, CREATE/DESTROY_CQ, CREATE/DESTROY_QP, RST2INIT, INIT2RTR,
//! RTR2RTS, 2RST) with firmware-style failures, the UAR doorbells (CQ arm at UAR+0x20, EQ
//! consumer index at +0x40 with arm and +0x48 without), and the notification chain.
//!
//! A queue in QP mode names a firmware QP (zero-length receive queue) connected to a driver QP.
//! Each notification the queue raises (the model's single interrupt point,
//! `model::interrupt`, which the kit's engine calls for the queue, lands here in
//! [`Fw::qp_notify`]) is a zero-length send on that connection: it consumes one receive WQE of the driver
//! QP (the RQ doorbell record holds the driver's posted count), writes a CQE into the driver
//! QP's receive CQ (in DMA memory through the domain; owner bit = pass parity, wqe_counter =
//! the WQE consumed), and, when that CQ is armed, one EQE (type COMP, the cqn) into the CQ's
//! EQ, which raises its MSI-X vector if the EQ is armed. A CQ gives one EQE per arm; arming it
//! (or the EQ) while entries past the given consumer index exist fires at once. With no WQE
//! posted the notification waits (receiver not ready; `rnr_retry` 7 retries for ever) until
//! the driver arms the CQ again, the point where it replenishes. A collapsed CQ (`cc`) takes
//! every CQE in entry 0.
//!
//! Choices the facts leave open (stated in docs/PMDS.md): DESTROY_EQ names the EQ at bit 0x58
//! (where CREATE_EQ returns it); the CQ arm doorbell is one 8-byte write; QPs connect only to
//! QPs of the same function (INIT2RTR checks the remote QP exists); the model has no send
//! queues (`no_sq` must be 1), 64-byte CQEs only, no event moderation (period and count are
//! kept, not applied), and a CQ or EQ overrun drops the entry (counted) instead of failing
//! the queue.

use std::sync::atomic::{Ordering, fence};

use vdpakit_core::pci::model::IrqSender;
use vdpakit_core::virtio::GuestMemory;

use super::Mlx5Model;
use super::bits::{be32, rd, wr};
use super::defs::{ID24, entry, eopc, eqf, qpf, st, uar};
use super::defs::{ST_BAD_QP_STATE, cqf};
use super::fw::{Fail, Fw};
use super::store::{Body, Kind};

/// Largest EQ and CQ the model makes (log2 entries), as its capabilities say.
pub const LOG_MAX_EQ_SZ: u8 = 16;
/// Largest CQ (log2 entries).
pub const LOG_MAX_CQ_SZ: u8 = 16;
/// Largest receive queue (log2 WQEs).
pub const LOG_MAX_QP_SZ: u8 = 15;
/// log2 of the EQs a function may have.
pub const LOG_MAX_EQ: u8 = 4;

/// QP states (the values firmware reports).
pub mod qps {
    /// Reset.
    pub const RST: u8 = 0;
    /// Initialized.
    pub const INIT: u8 = 1;
    /// Ready to receive.
    pub const RTR: u8 = 2;
    /// Ready to send.
    pub const RTS: u8 = 3;
}

/// How a queue tells the driver about used buffers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Event {
    /// NO_MSIX: nothing.
    None,
    /// MSIX: this vector.
    Msix(u16),
    /// QP: a send on this firmware QP.
    Qp(u32),
}

impl Event {
    /// From a queue object's event_mode and event_qpn_or_msix.
    pub fn of(mode: u64, target: u64) -> Event {
        match mode {
            1 => Event::Qp(target as u32),
            2 => Event::Msix(target as u16),
            _ => Event::None,
        }
    }

    /// As one word (the interrupt point reads it without a lock): mode << 32 | target.
    pub fn encode(self) -> u64 {
        match self {
            Event::None => 0,
            Event::Qp(q) => 1 << 32 | u64::from(q),
            Event::Msix(v) => 2 << 32 | u64::from(v),
        }
    }

    /// Back from [`Event::encode`].
    pub fn decode(w: u64) -> Event {
        Event::of(w >> 32, w & 0xffff_ffff)
    }
}

/// A ring in DMA memory given as a page list.
#[derive(Debug, Clone)]
pub struct RingMem {
    /// Page IOVAs.
    pub pages: Vec<u64>,
    /// Page size.
    pub page: u64,
}

impl RingMem {
    /// The IOVA of byte `off` of the ring.
    pub fn at(&self, off: u64) -> Option<u64> {
        self.pages
            .get((off / self.page) as usize)
            .map(|p| p + off % self.page)
    }
}

/// An event queue.
#[derive(Debug, Clone)]
pub struct EqObj {
    /// log2 of the entries.
    pub log_size: u8,
    /// UAR page its doorbells come through.
    pub uar: u32,
    /// MSI-X vector.
    pub intr: u16,
    /// Ring.
    pub mem: RingMem,
    /// event_bitmask as given.
    pub bitmask: [u64; 4],
    /// Entries written.
    pub pi: u32,
    /// Consumer index the driver last wrote.
    pub ci: u32,
    /// The next entry raises the vector.
    pub armed: bool,
}

/// A completion queue.
#[derive(Debug, Clone)]
pub struct CqObj {
    /// log2 of the entries.
    pub log_size: u8,
    /// Collapsed: every CQE in entry 0.
    pub collapsed: bool,
    /// UAR page.
    pub uar: u32,
    /// Its EQ.
    pub eqn: u8,
    /// Doorbell record (dword 0: consumer index, dword 1: arm).
    pub dbr: u64,
    /// Ring.
    pub mem: RingMem,
    /// Moderation period and count (kept, not applied).
    pub moderation: (u16, u16),
    /// Entries written.
    pub pi: u32,
    /// The next CQE gives an EQE.
    pub armed: bool,
    /// Sequence number of the last arm.
    pub arm_sn: u8,
}

/// A queue pair (receive side only: the model has no send queues).
#[derive(Debug, Clone)]
pub struct QpObj {
    /// State ([`qps`]).
    pub state: u8,
    /// Zero-length receive queue (a firmware QP).
    pub zero_rq: bool,
    /// Receive CQ (regular receive queues).
    pub cqn: u32,
    /// log2 of the receive WQEs.
    pub log_rq_size: u8,
    /// Bytes per WQE.
    pub stride: u64,
    /// Doorbell record (dword 0: the driver's posted WQE counter).
    pub dbr: u64,
    /// Receive queue memory.
    pub mem: RingMem,
    /// Connected QP (0: none).
    pub remote: u32,
    /// WQEs consumed.
    pub consumed: u32,
    /// Notifications waiting for a WQE.
    pub pending: u64,
    /// Path MTU code, retry counts, ack timeout as given.
    pub path: (u8, u8, u8, u8),
}

fn bad(reason: &'static str, detail: String) -> Fail {
    Fail::new(st::BAD_PARAM, reason, detail)
}

fn corrupt() -> Fail {
    Fail::new(st::INTERNAL, "object table corrupt", String::new())
}

/// Whether `opcode` is one of the event chain's.
pub fn is_event_op(opcode: u16) -> bool {
    matches!(
        opcode,
        eopc::CREATE_EQ
            | eopc::DESTROY_EQ
            | eopc::CREATE_CQ
            | eopc::DESTROY_CQ
            | eopc::CREATE_QP
            | eopc::DESTROY_QP
            | eopc::RST2INIT
            | eopc::INIT2RTR
            | eopc::RTR2RTS
            | eopc::TO_RST
    )
}

impl Fw {
    fn need(inp: &[u8], n: usize) -> Result<(), Fail> {
        if inp.len() < n {
            return Err(Fail::new(
                st::BAD_INPUT_LEN,
                "input too short for the command",
                format!("{} bytes given, {n} needed", inp.len()),
            ));
        }
        Ok(())
    }

    /// Executes an event chain command.
    pub(super) fn event_command(
        &mut self,
        opcode: u16,
        inp: &[u8],
        out: &mut [u8],
    ) -> Result<(), Fail> {
        match opcode {
            eopc::CREATE_EQ => self.create_eq(inp, out),
            eopc::DESTROY_EQ => self.store.remove(Kind::Eq, rd(inp, eqf::NUMBER)).map(drop),
            eopc::CREATE_CQ => self.create_cq(inp, out),
            eopc::DESTROY_CQ => self.store.remove(Kind::Cq, rd(inp, ID24)).map(drop),
            eopc::CREATE_QP => self.create_qp(inp, out),
            eopc::DESTROY_QP => self.destroy_qp(rd(inp, ID24)),
            _ => self.modify_qp(opcode, inp),
        }
    }

    /// The page list of a ring of `bytes` at `pas_byte`, pages of 4 KiB << `log_pg`.
    fn ring_pages(
        &self,
        inp: &[u8],
        pas_byte: usize,
        log_pg: u64,
        bytes: u64,
        what: &str,
    ) -> Result<RingMem, Fail> {
        if log_pg > 18 {
            return Err(bad(
                "page size out of range",
                format!("{what}: log_page_size {log_pg}"),
            ));
        }
        let page = 4096u64 << log_pg;
        let n = bytes.div_ceil(page) as usize;
        Self::need(inp, pas_byte + 8 * n)?;
        let mut pages = Vec::with_capacity(n);
        for i in 0..n {
            let a = super::bits::be64(inp, pas_byte + 8 * i);
            if a == 0 || a & (page - 1) != 0 {
                return Err(bad(
                    "ring page address zero or not page aligned",
                    format!("{what}: entry {i}: {a:#x}"),
                ));
            }
            pages.push(a);
        }
        Ok(RingMem { pages, page })
    }

    /// Checks a doorbell record address: 8-byte aligned and reachable.
    fn check_dbr(&self, dbr: u64, what: &str) -> Result<(), Fail> {
        if dbr == 0 || !dbr.is_multiple_of(8) {
            return Err(bad(
                "doorbell record address zero or not 8-byte aligned",
                format!("{what}: {dbr:#x}"),
            ));
        }
        let mut b = [0u8; 8];
        if self.domain_view().read(dbr, &mut b).is_err() {
            self.fault(dbr, 8);
            return Err(bad(
                "doorbell record not reachable by DMA",
                format!("{what}: {dbr:#x}"),
            ));
        }
        Ok(())
    }

    fn fault(&self, iova: u64, len: u64) {
        if let Some(d) = &self.dma {
            d.record_fault(iova, len);
        }
    }

    fn create_eq(&mut self, inp: &[u8], out: &mut [u8]) -> Result<(), Fail> {
        Self::need(inp, eqf::PAS_BYTE)?;
        let log = rd(inp, eqf::LOG_SIZE);
        if log > u64::from(LOG_MAX_EQ_SZ) {
            return Err(Fail::new(
                st::LIMITS,
                "EQ larger than log_max_eq_sz",
                format!("log_eq_size {log}"),
            ));
        }
        if self.store.ids(Kind::Eq).len() >= 1 << LOG_MAX_EQ {
            return Err(Fail::new(
                st::LIMITS,
                "no EQs left",
                format!("{} in use", 1 << LOG_MAX_EQ),
            ));
        }
        let uar = rd(inp, eqf::UAR);
        self.store.get(Kind::Uar, uar)?;
        let intr = rd(inp, eqf::INTR);
        if intr >= u64::from(self.opts.msix_vectors) {
            return Err(bad(
                "EQ interrupt beyond the function's MSI-X vectors",
                format!("intr {intr}, {} vectors", self.opts.msix_vectors),
            ));
        }
        let mem = self.ring_pages(inp, eqf::PAS_BYTE, rd(inp, eqf::LOG_PG), 64 << log, "EQ")?;
        let bitmask = std::array::from_fn(|i| super::bits::be64(inp, eqf::BITMASK_BYTE + 8 * i));
        let id = self.store.fresh(Kind::Eq);
        self.store.insert(
            Kind::Eq,
            id.into(),
            vec![(Kind::Uar, uar)],
            Body::Eq(EqObj {
                log_size: log as u8,
                uar: uar as u32,
                intr: intr as u16,
                mem,
                bitmask,
                pi: 0,
                ci: 0,
                armed: false,
            }),
        )?;
        wr(out, eqf::NUMBER, id.into());
        Ok(())
    }

    fn create_cq(&mut self, inp: &[u8], out: &mut [u8]) -> Result<(), Fail> {
        Self::need(inp, cqf::PAS_BYTE)?;
        if rd(inp, cqf::CQE_SZ) != 0 {
            return Err(bad(
                "CQE size not supported (64 bytes only)",
                format!("cqe_sz {}", rd(inp, cqf::CQE_SZ)),
            ));
        }
        let log = rd(inp, cqf::LOG_SIZE);
        if log > u64::from(LOG_MAX_CQ_SZ) {
            return Err(Fail::new(
                st::LIMITS,
                "CQ larger than log_max_cq_sz",
                format!("log_cq_size {log}"),
            ));
        }
        let uar = rd(inp, cqf::UAR);
        self.store.get(Kind::Uar, uar)?;
        let eqn = rd(inp, cqf::EQN);
        self.store.get(Kind::Eq, eqn)?;
        let dbr = rd(inp, cqf::DBR);
        self.check_dbr(dbr, "CQ")?;
        let mem = self.ring_pages(inp, cqf::PAS_BYTE, rd(inp, cqf::LOG_PG), 64 << log, "CQ")?;
        let id = self.store.fresh(Kind::Cq);
        self.store.insert(
            Kind::Cq,
            id.into(),
            vec![(Kind::Uar, uar), (Kind::Eq, eqn)],
            Body::Cq(CqObj {
                log_size: log as u8,
                collapsed: rd(inp, cqf::CC) != 0,
                uar: uar as u32,
                eqn: eqn as u8,
                dbr,
                mem,
                moderation: (rd(inp, cqf::PERIOD) as u16, rd(inp, cqf::MAX_COUNT) as u16),
                pi: 0,
                armed: false,
                arm_sn: 0,
            }),
        )?;
        wr(out, ID24, id.into());
        Ok(())
    }

    fn create_qp(&mut self, inp: &[u8], out: &mut [u8]) -> Result<(), Fail> {
        Self::need(inp, qpf::PAS_BYTE)?;
        if rd(inp, qpf::ST) != 0 {
            return Err(bad(
                "QP service type not supported (RC only)",
                format!("st {}", rd(inp, qpf::ST)),
            ));
        }
        if rd(inp, qpf::NO_SQ) != 1 {
            return Err(bad(
                "send queues are not supported (no_sq must be 1)",
                String::new(),
            ));
        }
        let pd = rd(inp, qpf::PD);
        self.store.get(Kind::Pd, pd)?;
        let mut deps = vec![(Kind::Pd, pd)];
        let uar = rd(inp, qpf::UAR);
        if uar != 0 {
            self.store.get(Kind::Uar, uar)?;
            deps.push((Kind::Uar, uar));
        }
        let mut qp = QpObj {
            state: qps::RST,
            zero_rq: false,
            cqn: 0,
            log_rq_size: 0,
            stride: 0,
            dbr: 0,
            mem: RingMem {
                pages: Vec::new(),
                page: 4096,
            },
            remote: 0,
            consumed: 0,
            pending: 0,
            path: (0, 0, 0, 0),
        };
        match rd(inp, qpf::RQ_TYPE) {
            qpf::RQ_ZERO_LEN => qp.zero_rq = true,
            qpf::RQ_REGULAR => {
                let cqn = rd(inp, qpf::CQN_RCV);
                self.store.get(Kind::Cq, cqn)?;
                deps.push((Kind::Cq, cqn));
                let log = rd(inp, qpf::LOG_RQ_SIZE);
                if log > u64::from(LOG_MAX_QP_SZ) {
                    return Err(Fail::new(
                        st::LIMITS,
                        "receive queue larger than log_max_qp_sz",
                        format!("log_rq_size {log}"),
                    ));
                }
                let stride = 16u64 << rd(inp, qpf::LOG_RQ_STRIDE);
                let dbr = rd(inp, qpf::DBR);
                self.check_dbr(dbr, "QP")?;
                qp.mem = self.ring_pages(
                    inp,
                    qpf::PAS_BYTE,
                    rd(inp, qpf::LOG_PG),
                    stride << log,
                    "QP receive queue",
                )?;
                qp.cqn = cqn as u32;
                qp.log_rq_size = log as u8;
                qp.stride = stride;
                qp.dbr = dbr;
            }
            t => {
                return Err(bad(
                    "receive queue type not supported (regular or zero-length)",
                    format!("rq_type {t}"),
                ));
            }
        }
        let id = self.store.fresh(Kind::Qp);
        self.store.insert(Kind::Qp, id.into(), deps, Body::Qp(qp))?;
        wr(out, ID24, id.into());
        Ok(())
    }

    fn destroy_qp(&mut self, qpn: u64) -> Result<(), Fail> {
        let lost = self.qp(qpn as u32).map_or(0, |q| q.pending);
        self.store.remove(Kind::Qp, qpn)?;
        self.stats.events_lost += lost;
        Ok(())
    }

    fn qp(&self, qpn: u32) -> Option<&QpObj> {
        match &self.store.get(Kind::Qp, qpn.into()).ok()?.body {
            Body::Qp(q) => Some(q),
            _ => None,
        }
    }

    fn qp_mut(&mut self, qpn: u32) -> Option<&mut QpObj> {
        match &mut self.store.get_mut(Kind::Qp, qpn.into()).ok()?.body {
            Body::Qp(q) => Some(q),
            _ => None,
        }
    }

    fn cq_mut(&mut self, cqn: u32) -> Option<&mut CqObj> {
        match &mut self.store.get_mut(Kind::Cq, cqn.into()).ok()?.body {
            Body::Cq(c) => Some(c),
            _ => None,
        }
    }

    fn eq_mut(&mut self, eqn: u32) -> Option<&mut EqObj> {
        match &mut self.store.get_mut(Kind::Eq, eqn.into()).ok()?.body {
            Body::Eq(e) => Some(e),
            _ => None,
        }
    }

    fn modify_qp(&mut self, opcode: u16, inp: &[u8]) -> Result<(), Fail> {
        Self::need(inp, qpf::MODIFY_BYTES)?;
        let qpn = rd(inp, ID24);
        let Body::Qp(q) = &self.store.get(Kind::Qp, qpn)?.body else {
            return Err(corrupt());
        };
        let state = q.state;
        let need_state = |want: u8, name: &'static str| {
            if state == want {
                Ok(())
            } else {
                Err(Fail::new(
                    ST_BAD_QP_STATE,
                    name,
                    format!("QP {qpn:#x} is in state {state}"),
                ))
            }
        };
        let remote = rd(inp, qpf::REMOTE_QPN) as u32;
        match opcode {
            eopc::RST2INIT => {
                need_state(qps::RST, "RST2INIT on a QP not in RST")?;
                let port = rd(inp, qpf::PATH_PORT);
                if port != 1 {
                    return Err(bad(
                        "path port must be 1 (the function's only port)",
                        format!("vhca_port_num {port}"),
                    ));
                }
                let q = self.qp_mut(qpn as u32).ok_or_else(corrupt)?;
                if remote != 0 {
                    q.remote = remote;
                }
                q.state = qps::INIT;
            }
            eopc::INIT2RTR => {
                need_state(qps::INIT, "INIT2RTR on a QP not in INIT")?;
                let mtu = rd(inp, qpf::MTU);
                if !(1..=5).contains(&mtu) {
                    return Err(bad(
                        "path MTU code out of range (1..=5: 256..4096 bytes)",
                        format!("mtu {mtu}"),
                    ));
                }
                let lmm = rd(inp, qpf::LOG_MSG_MAX);
                if lmm > 30 {
                    return Err(bad("log_msg_max beyond 30", format!("log_msg_max {lmm}")));
                }
                if remote == 0 || u64::from(remote) == qpn || self.qp(remote).is_none() {
                    return Err(bad(
                        "remote QP missing, itself, or not a QP of this function",
                        format!("QP {qpn:#x}: remote_qpn {remote:#x}"),
                    ));
                }
                let q = self.qp_mut(qpn as u32).ok_or_else(corrupt)?;
                q.remote = remote;
                q.path.0 = mtu as u8;
                q.state = qps::RTR;
            }
            eopc::RTR2RTS => {
                need_state(qps::RTR, "RTR2RTS on a QP not in RTR")?;
                let q = self.qp_mut(qpn as u32).ok_or_else(corrupt)?;
                q.path.1 = rd(inp, qpf::RETRY) as u8;
                q.path.2 = rd(inp, qpf::RNR_RETRY) as u8;
                q.path.3 = rd(inp, qpf::PATH_ACK_TIMEOUT) as u8;
                q.state = qps::RTS;
            }
            _ => {
                let q = self.qp_mut(qpn as u32).ok_or_else(corrupt)?;
                let lost = q.pending;
                q.state = qps::RST;
                q.remote = 0;
                q.consumed = 0;
                q.pending = 0;
                self.stats.events_lost += lost;
            }
        }
        Ok(())
    }

    /// The QP a queue in QP mode names: it must exist and be a firmware QP.
    pub(super) fn event_qp_dep(&self, qpn: u64) -> Result<(Kind, u64), Fail> {
        match &self.store.get(Kind::Qp, qpn)?.body {
            Body::Qp(q) if q.zero_rq => Ok((Kind::Qp, qpn)),
            Body::Qp(_) => Err(bad(
                "event QP is not a firmware QP (zero-length receive queue)",
                format!("qpn {qpn:#x}"),
            )),
            _ => Err(corrupt()),
        }
    }

    /// A queue in QP mode asked for an interrupt: a send on its firmware QP `fw`.
    pub fn qp_notify(&mut self, fw: u32, irq: &mut Option<IrqSender>) {
        self.qp_send(fw, irq);
    }

    /// The driver QP `fw` is connected to, if both ends are connected and ready.
    fn peer(&self, fw: u32) -> Option<u32> {
        let f = self.qp(fw)?;
        if !f.zero_rq || f.state != qps::RTS {
            return None;
        }
        let d = self.qp(f.remote)?;
        let ready = d.state == qps::RTR || d.state == qps::RTS;
        (ready && !d.zero_rq && d.remote == fw).then_some(f.remote)
    }

    fn qp_send(&mut self, fw: u32, irq: &mut Option<IrqSender>) {
        let Some(drv) = self.peer(fw) else {
            self.stats.events_lost += 1;
            tracing::debug!("model: event on QP {fw:#x}, which is not connected and ready");
            return;
        };
        if let Some(q) = self.qp_mut(drv) {
            q.pending += 1;
        }
        self.drain_rq(drv, irq);
    }

    /// Delivers the notifications waiting on driver QP `drv` while it has receive WQEs.
    fn drain_rq(&mut self, drv: u32, irq: &mut Option<IrqSender>) {
        let dom = self.domain_view();
        loop {
            let Some(q) = self.qp(drv) else { return };
            if q.pending == 0 {
                return;
            }
            let (dbr, cqn, consumed) = (q.dbr, q.cqn, q.consumed);
            let mut b = [0u8; 4];
            if dom.read(dbr, &mut b).is_err() {
                self.fault(dbr, 4);
                self.stats.events_lost += q.pending;
                if let Some(q) = self.qp_mut(drv) {
                    q.pending = 0;
                }
                return;
            }
            let posted = be32(&b, 0) & 0xffff;
            if posted.wrapping_sub(consumed) & 0xffff == 0 {
                // Receiver not ready: the notification waits for a WQE.
                self.stats.rnr_waits += 1;
                return;
            }
            fence(Ordering::Acquire);
            if let Some(q) = self.qp_mut(drv) {
                q.consumed = q.consumed.wrapping_add(1);
                q.pending -= 1;
            }
            self.write_cqe(&dom, cqn, (consumed & 0xffff) as u16, irq);
        }
    }

    /// Writes `entry` (64 bytes) at `iova`, the last byte (ownership) after the rest.
    fn write_entry(&self, dom: &GuestMemory, iova: u64, e: &[u8; entry::LEN]) -> bool {
        let last = entry::LEN - 1;
        if dom.write(iova, &e[..last]).is_err() {
            self.fault(iova, entry::LEN as u64);
            return false;
        }
        fence(Ordering::Release);
        if dom.write(iova + last as u64, &e[last..]).is_err() {
            self.fault(iova + last as u64, 1);
            return false;
        }
        true
    }

    fn write_cqe(
        &mut self,
        dom: &GuestMemory,
        cqn: u32,
        counter: u16,
        irq: &mut Option<IrqSender>,
    ) {
        let Some(cq) = self.cq_mut(cqn) else {
            self.stats.events_lost += 1;
            return;
        };
        let n = 1u32 << cq.log_size;
        let (pi, dbr, collapsed) = (cq.pi, cq.dbr, cq.collapsed);
        let at = if collapsed { 0 } else { pi & (n - 1) };
        let Some(iova) = cq.mem.at(u64::from(at) * entry::LEN as u64) else {
            self.stats.events_lost += 1;
            return;
        };
        if !collapsed {
            let mut b = [0u8; 4];
            if dom.read(dbr, &mut b).is_err() {
                self.fault(dbr, 4);
                self.stats.events_lost += 1;
                return;
            }
            let ci = be32(&b, 0) & 0xff_ffff;
            if pi.wrapping_sub(ci) & 0xff_ffff >= n {
                self.stats.cq_overruns += 1;
                self.stats.events_lost += 1;
                return;
            }
        }
        let mut e = [0u8; entry::LEN];
        e[entry::CQE_WQE_COUNTER..entry::CQE_WQE_COUNTER + 2]
            .copy_from_slice(&counter.to_be_bytes());
        let owner = ((pi >> cq.log_size) & 1) as u8;
        e[entry::CQE_OP_OWN] = (entry::CQE_RESP_SEND << 4) | owner;
        if !self.write_entry(dom, iova, &e) {
            self.stats.events_lost += 1;
            return;
        }
        self.stats.cqes += 1;
        let Some(cq) = self.cq_mut(cqn) else { return };
        cq.pi = cq.pi.wrapping_add(1);
        if cq.armed {
            cq.armed = false;
            let eqn = u32::from(cq.eqn);
            self.eq_event(dom, eqn, cqn, irq);
        }
    }

    /// One completion event for `cqn` on EQ `eqn`.
    fn eq_event(&mut self, dom: &GuestMemory, eqn: u32, cqn: u32, irq: &mut Option<IrqSender>) {
        let cqn_at = match self.opts.skew {
            Some(super::Skew::EqeCqn) => entry::EQE_CQN + 4,
            _ => entry::EQE_CQN,
        };
        let Some(eq) = self.eq_mut(eqn) else {
            self.stats.events_lost += 1;
            return;
        };
        let n = 1u32 << eq.log_size;
        if eq.pi.wrapping_sub(eq.ci) & 0xff_ffff >= n {
            self.stats.eq_overruns += 1;
            self.stats.events_lost += 1;
            return;
        }
        let Some(iova) = eq.mem.at(u64::from(eq.pi & (n - 1)) * entry::LEN as u64) else {
            self.stats.events_lost += 1;
            return;
        };
        let mut e = [0u8; entry::LEN];
        e[entry::EQE_TYPE] = entry::EQE_COMP;
        e[entry::EQE_SUB_TYPE] = 0;
        e[cqn_at..cqn_at + 4].copy_from_slice(&(cqn & 0xff_ffff).to_be_bytes());
        e[entry::EQE_OWNER] = ((eq.pi >> eq.log_size) & 1) as u8;
        if !self.write_entry(dom, iova, &e) {
            self.stats.events_lost += 1;
            return;
        }
        self.stats.eqes += 1;
        let Some(eq) = self.eq_mut(eqn) else { return };
        eq.pi = eq.pi.wrapping_add(1);
        if eq.armed {
            eq.armed = false;
            let v = eq.intr;
            self.signal(v, irq);
        }
    }

    fn signal(&mut self, v: u16, irq: &mut Option<IrqSender>) {
        self.stats.eq_interrupts += 1;
        if let Some(s) = irq.as_mut() {
            s.signal(v);
        }
    }

    /// CQ arm doorbell through UAR page `page`.
    fn cq_arm(&mut self, page: u32, dw: u32, cqn: u32, irq: &mut Option<IrqSender>) {
        let cqn = cqn & 0xff_ffff;
        match self.cq_mut(cqn) {
            Some(cq) if cq.uar == page => {
                cq.arm_sn = (dw >> 28) as u8 & 3;
            }
            _ => {
                self.stats.bad_doorbells += 1;
                return;
            }
        }
        // The driver replenishes before it arms: deliver what waited for a WQE.
        let waiting: Vec<u32> = self
            .store
            .iter_kind(Kind::Qp)
            .filter_map(|(id, o)| match &o.body {
                Body::Qp(q) if q.cqn == cqn && q.pending > 0 => Some(id as u32),
                _ => None,
            })
            .collect();
        for q in waiting {
            self.drain_rq(q, irq);
        }
        let dom = self.domain_view();
        let ci = dw & 0xff_ffff;
        let Some(cq) = self.cq_mut(cqn) else { return };
        if cq.pi & 0xff_ffff != ci {
            // Completions past the consumer index already: the event comes at once.
            cq.armed = false;
            let eqn = u32::from(cq.eqn);
            self.eq_event(&dom, eqn, cqn, irq);
        } else {
            cq.armed = true;
        }
    }

    /// EQ consumer index doorbell (with arm, or update only).
    fn eq_doorbell(&mut self, page: u32, v: u32, arm: bool, irq: &mut Option<IrqSender>) {
        let (eqn, ci) = (v >> 24, v & 0xff_ffff);
        let Some(eq) = self.eq_mut(eqn) else {
            self.stats.bad_doorbells += 1;
            return;
        };
        if eq.uar != page {
            self.stats.bad_doorbells += 1;
            return;
        }
        eq.ci = ci;
        if !arm {
            return;
        }
        if eq.pi & 0xff_ffff != ci {
            eq.armed = false;
            let v = eq.intr;
            self.signal(v, irq);
        } else {
            eq.armed = true;
        }
    }
}

impl Mlx5Model {
    /// A write into a UAR page (BAR0 offset `off`, at or above the first UAR page).
    pub(super) fn uar_write(&self, off: u64, buf: &[u8]) {
        let page = (off / uar::PAGE) as u32;
        let at = off % uar::PAGE;
        let mut irq = super::lock(&self.shared.bus)
            .as_ref()
            .map(|b| b.irq.sender());
        let mut fw = super::lock(&self.shared.fw);
        if !fw.store.has(Kind::Uar, page.into()) {
            fw.stats.bad_doorbells += 1;
            return;
        }
        match (at, buf.len()) {
            (uar::CQ_ARM, 8) => fw.cq_arm(page, be32(buf, 0), be32(buf, 4), &mut irq),
            (uar::EQ_ARM, 4) => fw.eq_doorbell(page, be32(buf, 0), true, &mut irq),
            (uar::EQ_UPDATE, 4) => fw.eq_doorbell(page, be32(buf, 0), false, &mut irq),
            _ => fw.stats.bad_doorbells += 1,
        }
    }

    /// EQ `eqn` as the model holds it.
    pub fn eq(&self, eqn: u32) -> Option<EqObj> {
        super::lock(&self.shared.fw).eq_mut(eqn).map(|e| e.clone())
    }

    /// CQ `cqn` as the model holds it.
    pub fn cq(&self, cqn: u32) -> Option<CqObj> {
        super::lock(&self.shared.fw).cq_mut(cqn).map(|c| c.clone())
    }

    /// QP `qpn` as the model holds it.
    pub fn qp(&self, qpn: u32) -> Option<QpObj> {
        super::lock(&self.shared.fw).qp(qpn).cloned()
    }
}

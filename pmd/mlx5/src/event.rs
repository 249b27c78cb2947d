//! The QP event mode: how queues interrupt through completion and event queues.
//!
//! Per device one event queue ([`EventQueue`]) on one MSI-X vector; per virtio queue that has
//! a call eventfd one [`Chain`]: a completion queue on that EQ, a firmware QP (zero-length
//! receive queue, named by the VIRTIO_NET_Q as its event target) and a driver QP (a receive
//! queue of 16-byte WQEs completing into the CQ), connected RC (RST2INIT, INIT2RTR, RTR2RTS on
//! both). Each notification of the queue is a zero-length send from the firmware QP: it takes
//! one receive WQE and writes a CQE; an armed CQ then writes one EQE (type COMP, the cqn) and
//! an armed EQ raises its vector.
//!
//! [`Events`] owns the EQ, the chains and the event thread. The thread sleeps in `poll` on the
//! EQ vector's eventfd (and a stop eventfd); woken, it reads EQEs by owner bit, and for each
//! completion reads that CQ's new CQEs, writes the CQ consumer index and the same number of
//! fresh WQEs into the receive doorbell record (the WQEs themselves never change: zero-length
//! messages scatter nothing), adds the count to the queue's call eventfd (one write, so the
//! guest sees exactly one signal per notification), re-arms the CQ (doorbell record dword 1 and
//! UAR+0x20), and after the EQEs writes the EQ consumer index with arm (UAR+0x40; +0x48 every
//! 0x80 entries on long runs). Its state is its own: no locks, no allocation per event.
//!
//! Order of bring-up (reference A11/A13): EQ (entries owner-initialized, armed), then per queue
//! CQ (entries invalid-initialized), firmware QP, driver QP, the connection, the receive WQEs
//! posted, the CQ armed; the queue objects are created afterwards naming the firmware QPs, the
//! vector is wired, the thread starts. Teardown is the reverse: the thread stops, queue objects
//! go (by their owner), then per queue the driver QP, the firmware QP, the CQ, and last the EQ.

use std::os::fd::{AsFd, OwnedFd};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering, fence};
use std::thread::JoinHandle;

use nix::errno::Errno;
use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use nix::sys::eventfd::{EfdFlags, EventFd};
use vdpakit_core::pci::PciDevice;

use crate::dma::{DmaArena, DmaBuf, PAGE};
use crate::error::{Error, Result};
use crate::hca::{Hca, cmd_in};
use crate::prm::{be_reg, cq, eq, hdr, op, qp, uar};

/// Receive WQEs and CQEs per queue (log2).
pub const LOG_CHAIN: u8 = 6;
/// Byte offset of the CQ doorbell record in a chain's record page.
const CQ_DBR: u64 = 0;
/// Byte offset of the receive queue doorbell record.
const RQ_DBR: u64 = 64;

/// Creation parameters of an EQ.
#[derive(Debug, Clone, Default)]
pub struct EqAttr {
    /// log2 of the entries.
    pub log_size: u8,
    /// UAR page of the doorbell.
    pub uar: u32,
    /// MSI-X vector.
    pub vector: u16,
    /// Ring pages (4 KiB each).
    pub pages: Vec<u64>,
}

/// Creation parameters of a CQ.
#[derive(Debug, Clone, Default)]
pub struct CqAttr {
    /// log2 of the entries.
    pub log_size: u8,
    /// UAR page of the arm doorbell.
    pub uar: u32,
    /// Its EQ.
    pub eqn: u8,
    /// Doorbell record (8 bytes).
    pub dbr: u64,
    /// Ring pages (4 KiB each).
    pub pages: Vec<u64>,
    /// Collapsed: every CQE in entry 0.
    pub collapsed: bool,
    /// Moderation: period (µs), count.
    pub moderation: (u16, u16),
}

/// Creation parameters of a QP.
#[derive(Debug, Clone, Default)]
pub struct QpAttr {
    /// Protection domain.
    pub pd: u32,
    /// UAR page (0: none).
    pub uar: u32,
    /// A firmware QP (zero-length receive queue; the remaining fields unused).
    pub zero_length: bool,
    /// Receive CQ.
    pub cqn: u32,
    /// log2 of the receive WQEs.
    pub log_rq_size: u8,
    /// Doorbell record.
    pub dbr: u64,
    /// Receive queue pages (4 KiB each).
    pub pages: Vec<u64>,
}

fn pages_in(b: &mut crate::prm::Buf, at: usize, pages: &[u64]) {
    for (i, &p) in pages.iter().enumerate() {
        b.put_be64(at + 8 * i, p);
    }
}

impl Hca {
    /// CREATE_EQ: returns the EQ number.
    pub fn create_eq(&self, a: &EqAttr) -> Result<u8> {
        let mut b = cmd_in(op::CREATE_EQ, 0, eq::PAS + 8 * a.pages.len());
        b.set(eq::LOG_EQ_SIZE, u64::from(a.log_size));
        b.set(eq::UAR_PAGE, u64::from(a.uar));
        b.set(eq::INTR, u64::from(a.vector));
        b.set(eq::LOG_PAGE_SIZE, 0);
        pages_in(&mut b, eq::PAS, &a.pages);
        let out = self.exec(&b, 16)?;
        Ok(out.get(eq::EQ_NUMBER) as u8)
    }

    /// DESTROY_EQ.
    pub fn destroy_eq(&self, eqn: u8) -> Result<()> {
        let mut b = cmd_in(op::DESTROY_EQ, 0, eq::DESTROY_LEN);
        b.set(eq::EQ_NUMBER, u64::from(eqn));
        self.exec(&b, 16).map(drop)
    }

    /// CREATE_CQ: returns the cqn.
    pub fn create_cq(&self, a: &CqAttr) -> Result<u32> {
        let mut b = cmd_in(op::CREATE_CQ, 0, cq::PAS + 8 * a.pages.len());
        b.set(cq::CQE_SZ, 0);
        b.set(cq::CC, u64::from(a.collapsed));
        b.set(cq::LOG_CQ_SIZE, u64::from(a.log_size));
        b.set(cq::UAR_PAGE, u64::from(a.uar));
        b.set(cq::CQ_PERIOD, u64::from(a.moderation.0));
        b.set(cq::CQ_MAX_COUNT, u64::from(a.moderation.1));
        b.set(cq::C_EQN, u64::from(a.eqn));
        b.set(cq::LOG_PAGE_SIZE, 0);
        b.set(cq::DBR_ADDR, a.dbr);
        pages_in(&mut b, cq::PAS, &a.pages);
        self.exec_id(&b)
    }

    /// DESTROY_CQ.
    pub fn destroy_cq(&self, cqn: u32) -> Result<()> {
        self.exec_destroy(op::DESTROY_CQ, cqn)
    }

    /// CREATE_QP (RC, no send queue): returns the qpn.
    pub fn create_qp(&self, a: &QpAttr) -> Result<u32> {
        let mut b = cmd_in(op::CREATE_QP, 0, qp::PAS + 8 * a.pages.len());
        b.set(qp::ST, 0);
        b.set(qp::PM_STATE, 3);
        b.set(qp::PD, u64::from(a.pd));
        b.set(qp::NO_SQ, 1);
        b.set(qp::UAR_PAGE, u64::from(a.uar));
        if a.zero_length {
            b.set(qp::RQ_TYPE, qp::RQ_ZERO_LENGTH);
        } else {
            b.set(qp::MTU, 1);
            b.set(qp::RQ_TYPE, qp::RQ_REGULAR);
            b.set(qp::LOG_RQ_SIZE, u64::from(a.log_rq_size));
            // 16-byte WQEs: log2(16) - 4.
            b.set(qp::LOG_RQ_STRIDE, 0);
            b.set(qp::LOG_PAGE_SIZE, 0);
            b.set(qp::CQN_RCV, u64::from(a.cqn));
            b.set(qp::DBR_ADDR, a.dbr);
            pages_in(&mut b, qp::PAS, &a.pages);
        }
        self.exec_id(&b)
    }

    /// DESTROY_QP.
    pub fn destroy_qp(&self, qpn: u32) -> Result<()> {
        self.exec_destroy(op::DESTROY_QP, qpn)
    }

    /// One QP transition (`op::RST2INIT_QP`, `INIT2RTR_QP`, `RTR2RTS_QP`, `QP_2RST`) of `qpn`
    /// towards `remote`, with the parameters the reference gives for each: RST2INIT the remote
    /// QP, remote write, port 1; INIT2RTR MTU 256, messages up to 2^30, the remote QP, force
    /// loopback; RTR2RTS ack timeout 14, retries 7, receiver-not-ready retries 7 (for ever).
    pub fn modify_qp(&self, opcode: u16, qpn: u32, remote: u32) -> Result<()> {
        let mut b = cmd_in(opcode, 0, qp::MODIFY_LEN);
        b.set(hdr::ID, u64::from(qpn));
        b.set(qp::OPT_PARAM_MASK, 0);
        match opcode {
            op::RST2INIT_QP => {
                b.set(qp::REMOTE_QPN, u64::from(remote));
                b.set(qp::RWE, 1);
                b.set(qp::VHCA_PORT_NUM, 1);
            }
            op::INIT2RTR_QP => {
                b.set(qp::MTU, 1);
                b.set(qp::LOG_MSG_MAX, 30);
                b.set(qp::REMOTE_QPN, u64::from(remote));
                b.set(qp::FL, 1);
            }
            op::RTR2RTS_QP => {
                b.set(qp::ACK_TIMEOUT, 14);
                b.set(qp::RETRY_COUNT, 7);
                b.set(qp::RNR_RETRY, 7);
            }
            _ => {}
        }
        self.exec(&b, 16).map(drop)
    }

    /// Connects QPs `a` and `b` (both in RST) and moves both to RTS.
    pub fn connect_qps(&self, a: u32, b: u32) -> Result<()> {
        for opc in [op::RST2INIT_QP, op::INIT2RTR_QP, op::RTR2RTS_QP] {
            self.modify_qp(opc, a, b)?;
            self.modify_qp(opc, b, a)?;
        }
        Ok(())
    }
}

/// Writes `v` as a big-endian dword at `iova`.
fn put_be32(arena: &DmaArena, iova: u64, v: u32) -> Result<()> {
    arena.write(iova, &v.to_be_bytes())
}

/// A UAR doorbell write of the 64-bit big-endian pair {hi, lo}.
fn uar_write64(pci: &PciDevice, off: u64, hi: u32, lo: u32) -> Result<()> {
    let mut b = [0u8; 8];
    b[..4].copy_from_slice(&hi.to_be_bytes());
    b[4..].copy_from_slice(&lo.to_be_bytes());
    pci.write64(0, off, u64::from_le_bytes(b))?;
    Ok(())
}

/// The device's event queue.
#[derive(Debug)]
pub struct EventQueue {
    /// EQ number.
    pub eqn: u8,
    /// MSI-X vector.
    pub vector: u16,
    /// log2 of the entries.
    pub log_size: u8,
    /// UAR page of its doorbell.
    pub uar: u32,
    ring: DmaBuf,
}

impl EventQueue {
    /// Creates an EQ of 2^`log_size` entries on `vector` and arms it.
    pub fn create(hca: &Hca, uar_page: u32, vector: u16, log_size: u8) -> Result<EventQueue> {
        let bytes = (uar::EQE_LEN as u64) << log_size;
        let ring = hca.arena().alloc(bytes)?;
        // Owner 1 in every entry: the device's first pass writes 0.
        let mut img = vec![0u8; bytes as usize];
        for e in img.chunks_mut(uar::EQE_LEN) {
            e[uar::EQE_OWNER] = 1;
        }
        ring.write(0, &img)?;
        let eqn = hca.create_eq(&EqAttr {
            log_size,
            uar: uar_page,
            vector,
            pages: ring.pages().collect(),
        })?;
        let q = EventQueue {
            eqn,
            vector,
            log_size,
            uar: uar_page,
            ring,
        };
        if let Err(e) = q.doorbell(hca.pci(), 0, true) {
            let _ = hca.destroy_eq(eqn);
            return Err(e);
        }
        Ok(q)
    }

    /// Writes consumer index `ci` (arming the EQ if `arm`).
    pub fn doorbell(&self, pci: &PciDevice, ci: u32, arm: bool) -> Result<()> {
        let at = if arm { uar::EQ_ARM } else { uar::EQ_UPDATE };
        let v = (u32::from(self.eqn) << 24) | (ci & 0xff_ffff);
        pci.write32(0, u64::from(self.uar) * uar::PAGE + at, be_reg(v))?;
        Ok(())
    }

    /// IOVA of the ring.
    pub fn ring(&self) -> u64 {
        self.ring.iova()
    }

    /// DESTROY_EQ (its memory is kept from reuse if the device refuses).
    pub fn destroy(self, hca: &Hca) -> Result<()> {
        match hca.destroy_eq(self.eqn) {
            Ok(()) => Ok(()),
            Err(e) => {
                std::mem::forget(self.ring);
                Err(e)
            }
        }
    }
}

/// One virtio queue's notification chain.
#[derive(Debug)]
pub struct Chain {
    /// virtio queue index.
    pub index: u16,
    /// Completion queue.
    pub cqn: u32,
    /// Firmware QP (the queue object's event target).
    pub fw_qpn: u32,
    /// Driver QP.
    pub drv_qpn: u32,
    /// log2 of CQEs and receive WQEs.
    pub log_size: u8,
    cq_ring: DmaBuf,
    rq_ring: DmaBuf,
    records: DmaBuf,
}

impl Chain {
    /// Creates the CQ (on `eqn`), both QPs, connects them, posts every receive WQE and arms
    /// the CQ. On failure what was made is destroyed.
    pub fn create(
        hca: &Hca,
        eqn: u8,
        pd: u32,
        uar_page: u32,
        null_mkey: u32,
        index: u16,
        log_size: u8,
    ) -> Result<Chain> {
        let arena = hca.arena();
        let n = 1u64 << log_size;
        let cq_ring = arena.alloc((cq::CQE_LEN as u64) << log_size)?;
        let rq_ring = arena.alloc((qp::RQ_WQE_LEN as u64) << log_size)?;
        let records = arena.alloc(PAGE)?;
        // Every CQE invalid (opcode 0xf, owner 0); every WQE one data segment of no bytes
        // with the null key (zero-length messages scatter nothing).
        let mut cqes = vec![0u8; cq::CQE_LEN << log_size];
        for e in cqes.chunks_mut(cq::CQE_LEN) {
            e[cq::CQE_OP_OWN] = cq::CQE_INVALID << 4;
        }
        cq_ring.write(0, &cqes)?;
        let mut wqes = vec![0u8; qp::RQ_WQE_LEN << log_size];
        for w in wqes.chunks_mut(qp::RQ_WQE_LEN) {
            w[4..8].copy_from_slice(&null_mkey.to_be_bytes());
        }
        rq_ring.write(0, &wqes)?;
        let cqn = hca.create_cq(&CqAttr {
            log_size,
            uar: uar_page,
            eqn,
            dbr: records.iova() + CQ_DBR,
            pages: cq_ring.pages().collect(),
            ..CqAttr::default()
        })?;
        let mut made: Vec<u32> = Vec::new();
        let undo = |made: &[u32]| {
            for &q in made.iter().rev() {
                if let Err(e) = hca.destroy_qp(q) {
                    tracing::warn!("{e}");
                }
            }
            if let Err(e) = hca.destroy_cq(cqn) {
                tracing::warn!("{e}");
            }
        };
        let r = (|| {
            let fw = hca.create_qp(&QpAttr {
                pd,
                zero_length: true,
                ..QpAttr::default()
            })?;
            made.push(fw);
            let drv = hca.create_qp(&QpAttr {
                pd,
                uar: uar_page,
                cqn,
                log_rq_size: log_size,
                dbr: records.iova() + RQ_DBR,
                pages: rq_ring.pages().collect(),
                ..QpAttr::default()
            })?;
            made.push(drv);
            hca.connect_qps(fw, drv)?;
            put_be32(arena, records.iova() + RQ_DBR, n as u32)?;
            fence(Ordering::SeqCst);
            arm_cq(hca.pci(), arena, records.iova(), uar_page, cqn, 0, 0)?;
            Ok((fw, drv))
        })();
        match r {
            Ok((fw_qpn, drv_qpn)) => Ok(Chain {
                index,
                cqn,
                fw_qpn,
                drv_qpn,
                log_size,
                cq_ring,
                rq_ring,
                records,
            }),
            Err(e) => {
                undo(&made);
                Err(e)
            }
        }
    }

    /// DESTROY_QP (driver, then firmware), DESTROY_CQ; all attempted, the first error
    /// returned. Memory the device may still write is never reused after a refusal.
    pub fn destroy(self, hca: &Hca) -> Result<()> {
        let mut first = None;
        for q in [self.drv_qpn, self.fw_qpn] {
            if let Err(e) = hca.destroy_qp(q) {
                tracing::warn!("{e}");
                first.get_or_insert(e);
            }
        }
        if let Err(e) = hca.destroy_cq(self.cqn) {
            tracing::warn!("{e}");
            first.get_or_insert(e);
        }
        match first {
            None => Ok(()),
            Some(e) => {
                std::mem::forget(self.cq_ring);
                std::mem::forget(self.rq_ring);
                std::mem::forget(self.records);
                Err(e)
            }
        }
    }
}

/// Arms CQ `cqn` at consumer index `ci` with sequence number `sn`: doorbell record dword 1,
/// then the UAR doorbell.
fn arm_cq(
    pci: &PciDevice,
    arena: &DmaArena,
    records: u64,
    uar_page: u32,
    cqn: u32,
    sn: u32,
    ci: u32,
) -> Result<()> {
    let dw = ((sn & 3) << 28) | (cq::ARM_NEXT << 24) | (ci & 0xff_ffff);
    put_be32(arena, records + CQ_DBR + 4, dw)?;
    fence(Ordering::SeqCst);
    uar_write64(
        pci,
        u64::from(uar_page) * uar::PAGE + uar::CQ_DOORBELL,
        dw,
        cqn,
    )
}

/// What the event thread has done.
#[derive(Debug, Default)]
struct Counters {
    wakeups: AtomicU64,
    eqes: AtomicU64,
    cqes: AtomicU64,
    signals: AtomicU64,
    errors: AtomicU64,
}

/// Counts of the event thread.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct EventStats {
    /// Times the EQ vector woke the thread.
    pub wakeups: u64,
    /// EQEs read.
    pub eqes: u64,
    /// CQEs read (notifications).
    pub cqes: u64,
    /// Signals added to call eventfds.
    pub signals: u64,
    /// Error CQEs, EQEs naming an unknown CQ, driver memory errors.
    pub errors: u64,
}

/// The EQ, the chains and the event thread of one configured device.
#[derive(Debug)]
pub struct Events {
    /// The event queue.
    pub eq: EventQueue,
    /// One chain per queue with a call eventfd.
    pub chains: Vec<Chain>,
    calls: Vec<Arc<OwnedFd>>,
    irq: Arc<OwnedFd>,
    counters: Arc<Counters>,
    thread: Option<Thread>,
    started: bool,
}

/// The running event thread; dropping it stops and joins it.
#[derive(Debug)]
struct Thread {
    name: String,
    stop: Arc<EventFd>,
    handle: Option<JoinHandle<()>>,
}

impl Drop for Thread {
    fn drop(&mut self) {
        let _ = self.stop.write(1);
        if let Some(h) = self.handle.take()
            && h.join().is_err()
        {
            tracing::error!("{}: the event thread panicked", self.name);
        }
    }
}

/// A chain's ids: (virtio queue index, cqn, firmware QP, driver QP).
pub type ChainIds = (u16, u32, u32, u32);

/// The device resources the chains use.
#[derive(Debug, Clone, Copy)]
pub struct EventBase {
    /// Protection domain.
    pub pd: u32,
    /// UAR page.
    pub uar: u32,
    /// The null key.
    pub null_mkey: u32,
}

fn efd(name: &str) -> Result<EventFd> {
    EventFd::from_flags(EfdFlags::EFD_NONBLOCK | EfdFlags::EFD_CLOEXEC).map_err(|e| Error::Memory {
        dev: name.to_string(),
        what: format!("eventfd for the event thread: {e}"),
    })
}

impl Events {
    /// Creates the EQ on `vector` and a chain for each `(queue index, call eventfd)`. On
    /// failure what was made is destroyed.
    pub fn create(
        hca: &Hca,
        base: EventBase,
        vector: u16,
        queues: &[(u16, Arc<OwnedFd>)],
    ) -> Result<Events> {
        // One EQE per armed CQ at most: twice the chains is room to spare.
        let log_eq = (2 * queues.len())
            .next_power_of_two()
            .trailing_zeros()
            .max(6) as u8;
        let irq = Arc::new(OwnedFd::from(efd(hca.name())?));
        let eq = EventQueue::create(hca, base.uar, vector, log_eq)?;
        let mut chains = Vec::with_capacity(queues.len());
        for &(index, _) in queues {
            match Chain::create(
                hca,
                eq.eqn,
                base.pd,
                base.uar,
                base.null_mkey,
                index,
                LOG_CHAIN,
            ) {
                Ok(c) => chains.push(c),
                Err(e) => {
                    for c in chains.into_iter().rev() {
                        if let Err(u) = c.destroy(hca) {
                            tracing::warn!("{u}");
                        }
                    }
                    if let Err(u) = eq.destroy(hca) {
                        tracing::warn!("{u}");
                    }
                    return Err(e);
                }
            }
        }
        Ok(Events {
            eq,
            chains,
            calls: queues.iter().map(|(_, c)| Arc::clone(c)).collect(),
            irq,
            counters: Arc::new(Counters::default()),
            thread: None,
            started: false,
        })
    }

    /// The firmware QP queue `index` names as its event target.
    pub fn fw_qpn(&self, index: u16) -> Option<u32> {
        self.chains
            .iter()
            .find(|c| c.index == index)
            .map(|c| c.fw_qpn)
    }

    /// The eventfd to wire to the EQ's MSI-X vector.
    pub fn irq_fd(&self) -> Arc<OwnedFd> {
        Arc::clone(&self.irq)
    }

    /// Starts the event thread (after the vector is wired). Once only: the thread owns the
    /// consumer indices, which a second thread would not know.
    pub fn start(&mut self, hca: &Hca) -> Result<()> {
        if self.started {
            return Err(Error::Config {
                dev: hca.name().to_string(),
                what: "the event thread of these event queues was started before".into(),
            });
        }
        self.started = true;
        let stop = Arc::new(efd(hca.name())?);
        let mut w = Worker {
            name: hca.name().to_string(),
            pci: hca.pci().clone(),
            arena: hca.arena().clone(),
            eq_ring: self.eq.ring(),
            eq_log: self.eq.log_size,
            eq_ci: 0,
            eq_doorbell: u64::from(self.eq.uar) * uar::PAGE,
            eqn: u32::from(self.eq.eqn),
            slots: self
                .chains
                .iter()
                .zip(&self.calls)
                .map(|(c, call)| Slot {
                    cqn: c.cqn,
                    ring: c.cq_ring.iova(),
                    log: c.log_size,
                    ci: 0,
                    posted: 1 << c.log_size,
                    records: c.records.iova(),
                    sn: 0,
                    call: Arc::clone(call),
                })
                .collect(),
            irq: Arc::clone(&self.irq),
            stop: Arc::clone(&stop),
            counters: Arc::clone(&self.counters),
        };
        let h = std::thread::Builder::new()
            .name(format!("{}-events", hca.name()))
            .spawn(move || w.run())
            .map_err(|e| Error::Memory {
                dev: hca.name().to_string(),
                what: format!("cannot start the event thread: {e}"),
            })?;
        self.thread = Some(Thread {
            name: hca.name().to_string(),
            stop,
            handle: Some(h),
        });
        Ok(())
    }

    /// Stops the event thread (a no-op if it is not running).
    pub fn stop(&mut self) {
        self.thread = None;
    }

    /// What the thread has counted.
    pub fn stats(&self) -> EventStats {
        let c = &self.counters;
        EventStats {
            wakeups: c.wakeups.load(Ordering::Relaxed),
            eqes: c.eqes.load(Ordering::Relaxed),
            cqes: c.cqes.load(Ordering::Relaxed),
            signals: c.signals.load(Ordering::Relaxed),
            errors: c.errors.load(Ordering::Relaxed),
        }
    }

    /// Stops the thread, destroys the chains (last first) and the EQ; all attempted, the
    /// first error returned.
    pub fn destroy(self, hca: &Hca) -> Result<()> {
        let Events {
            eq, chains, thread, ..
        } = self;
        drop(thread);
        let mut first = None;
        for c in chains.into_iter().rev() {
            if let Err(e) = c.destroy(hca) {
                first.get_or_insert(e);
            }
        }
        if let Err(e) = eq.destroy(hca) {
            tracing::warn!("{e}");
            first.get_or_insert(e);
        }
        first.map_or(Ok(()), Err)
    }
}

/// One chain as the thread sees it.
#[derive(Debug)]
struct Slot {
    cqn: u32,
    ring: u64,
    log: u8,
    ci: u32,
    posted: u32,
    records: u64,
    sn: u32,
    call: Arc<OwnedFd>,
}

/// The event thread's state (its own: nothing shared but counters).
#[derive(Debug)]
struct Worker {
    name: String,
    pci: PciDevice,
    arena: DmaArena,
    eq_ring: u64,
    eq_log: u8,
    eq_ci: u32,
    eq_doorbell: u64,
    eqn: u32,
    slots: Vec<Slot>,
    irq: Arc<OwnedFd>,
    stop: Arc<EventFd>,
    counters: Arc<Counters>,
}

impl Worker {
    fn run(&mut self) {
        // Anything that arrived before the vector was wired.
        self.drain();
        loop {
            let (woke, stop) = {
                let mut fds = [
                    PollFd::new(self.irq.as_fd(), PollFlags::POLLIN),
                    PollFd::new(self.stop.as_fd(), PollFlags::POLLIN),
                ];
                match poll(&mut fds, PollTimeout::NONE) {
                    Ok(_) => (),
                    Err(Errno::EINTR) => continue,
                    Err(e) => {
                        tracing::error!("{}: event thread: poll: {e}", self.name);
                        return;
                    }
                }
                let ready = |f: &PollFd| f.revents().is_some_and(|r| !r.is_empty());
                (ready(&fds[0]), ready(&fds[1]))
            };
            if stop {
                return;
            }
            if woke {
                let mut b = [0u8; 8];
                let _ = nix::unistd::read(self.irq.as_fd(), &mut b);
                self.counters.wakeups.fetch_add(1, Ordering::Relaxed);
            }
            self.drain();
        }
    }

    fn error(&self) {
        self.counters.errors.fetch_add(1, Ordering::Relaxed);
    }

    /// Reads every EQE the device wrote, serves each completion, re-arms the EQ.
    fn drain(&mut self) {
        let mask = (1u32 << self.eq_log) - 1;
        let mut n = 0u32;
        loop {
            let at = self.eq_ring + u64::from(self.eq_ci & mask) * uar::EQE_LEN as u64;
            let mut own = [0u8; 1];
            if self
                .arena
                .read(at + uar::EQE_OWNER as u64, &mut own)
                .is_err()
            {
                self.error();
                break;
            }
            if u32::from(own[0] & 1) != (self.eq_ci >> self.eq_log) & 1 {
                break;
            }
            fence(Ordering::Acquire);
            let mut e = [0u8; uar::EQE_LEN];
            if self.arena.read(at, &mut e).is_err() {
                self.error();
                break;
            }
            self.counters.eqes.fetch_add(1, Ordering::Relaxed);
            if e[uar::EQE_TYPE] == uar::EQE_COMP {
                let mut c = [0u8; 4];
                c.copy_from_slice(&e[uar::EQE_CQN..uar::EQE_CQN + 4]);
                let cqn = u32::from_be_bytes(c) & 0xff_ffff;
                match self.slots.iter().position(|s| s.cqn == cqn) {
                    Some(i) => self.serve(i),
                    None => self.error(),
                }
            }
            self.eq_ci = self.eq_ci.wrapping_add(1);
            n += 1;
            if n.is_multiple_of(uar::EQ_UPDATE_EVERY) {
                self.eq_write(false);
            }
        }
        self.eq_write(true);
    }

    fn eq_write(&self, arm: bool) {
        let at = if arm { uar::EQ_ARM } else { uar::EQ_UPDATE };
        let v = (self.eqn << 24) | (self.eq_ci & 0xff_ffff);
        if self
            .pci
            .write32(0, self.eq_doorbell + at, be_reg(v))
            .is_err()
        {
            self.error();
        }
    }

    /// Takes CQ `i`'s new CQEs: consumer index, as many fresh WQEs, one call eventfd write of
    /// the count, and the CQ armed again.
    fn serve(&mut self, i: usize) {
        let s = &mut self.slots[i];
        let mask = (1u32 << s.log) - 1;
        let mut k = 0u32;
        let mut errors = 0u64;
        loop {
            let at = s.ring + u64::from(s.ci & mask) * cq::CQE_LEN as u64;
            let mut b = [0u8; 1];
            if self.arena.read(at + cq::CQE_OP_OWN as u64, &mut b).is_err() {
                errors += 1;
                break;
            }
            let (opcode, owner) = (b[0] >> 4, u32::from(b[0] & 1));
            if opcode == cq::CQE_INVALID || owner != (s.ci >> s.log) & 1 {
                break;
            }
            fence(Ordering::Acquire);
            if opcode == cq::CQE_REQ_ERR || opcode == cq::CQE_RESP_ERR {
                errors += 1;
            }
            s.ci = s.ci.wrapping_add(1);
            k += 1;
        }
        if k > 0 {
            s.posted = s.posted.wrapping_add(k);
            let ok = put_be32(&self.arena, s.records + CQ_DBR, s.ci & 0xff_ffff).is_ok()
                && put_be32(&self.arena, s.records + RQ_DBR, s.posted & 0xffff).is_ok();
            if !ok {
                errors += 1;
            }
            if nix::unistd::write(s.call.as_fd(), &u64::from(k).to_ne_bytes()).is_err() {
                errors += 1;
            }
            self.counters
                .cqes
                .fetch_add(u64::from(k), Ordering::Relaxed);
            self.counters
                .signals
                .fetch_add(u64::from(k), Ordering::Relaxed);
        }
        s.sn = s.sn.wrapping_add(1);
        let (records, cqn, sn, ci) = (s.records, s.cqn, s.sn, s.ci);
        let uar_page = (self.eq_doorbell / uar::PAGE) as u32;
        if arm_cq(&self.pci, &self.arena, records, uar_page, cqn, sn, ci).is_err() {
            errors += 1;
        }
        if errors > 0 {
            self.counters.errors.fetch_add(errors, Ordering::Relaxed);
        }
    }
}

//! VIRTIO_NET_Q objects in the model: validation on create and modify, the INIT → RDY →
//! SUSPEND state machine (SUSPEND → RDY only when resumable, ERR terminal), query, and the queue
//! engine: a `core::virtio` [`DeviceQueue`] over the queue key's view of the DMA domain (so
//! every ring and buffer access goes through the key), transmit into the wire, receive from the
//! steering backlog, counters, and MSI-X interrupts.
//!
//! This engine is the model's own until the model kit's virtqueue engine lands; it keeps the
//! device side behind [`Runtime`] so it can move there without touching the command side.

use vdpakit_core::pci::model::IrqSender;
use vdpakit_core::virtio::features::{VIRTIO_F_RING_PACKED, VIRTIO_F_VERSION_1};
use vdpakit_core::virtio::{AddrKind, DeviceQueue, GuestMemory, QueueConfig, QueueError, Segs};

use super::bits::{rd, wr};
use super::defs::*;
use super::eq::Event;
use super::fw::{Fail, Fw, PORT_TX_MAX, Wire};
use super::mkey::{self, Piece};
use super::store::{Backlog, Body, Kind};

/// Error types the model reports in ERR state (its own numbering).
pub mod err {
    /// A ring area does not translate through the queue's key (or the domain).
    pub const RING: u8 = 1;
    /// The driver wrote a malformed ring (bad index, loop, bad descriptor).
    pub const DESC: u8 = 2;
    /// A buffer does not translate.
    pub const BUFFER: u8 = 3;
}

/// Frames a receive queue holds while it waits for buffers.
pub const BACKLOG_MAX: usize = 4096;
/// Chains one pass processes per queue.
pub const BUDGET: usize = 256;

/// A running queue's device side.
#[derive(Debug)]
pub struct Runtime {
    q: DeviceQueue,
    mem: GuestMemory,
    pieces: Vec<Piece>,
    generation: u64,
    segs: Segs,
    hdr_len: usize,
    event: Event,
}

/// A VIRTIO_NET_Q.
#[derive(Debug)]
pub struct VqObj {
    /// The object as a command image (header bytes zero), so the model's absolute field
    /// positions apply.
    pub raw: Vec<u8>,
    /// State.
    pub state: u8,
    /// Error type in ERR.
    pub error_type: u8,
    /// Device side while RDY.
    pub rt: Option<Runtime>,
    /// Received frames waiting for buffers (receive queues).
    pub backlog: Backlog,
}

impl VqObj {
    /// virtio index.
    pub fn index(&self) -> u16 {
        rd(&self.raw, vqf::INDEX) as u16
    }

    /// Current positions (avail, used).
    pub fn positions(&self) -> (u16, u16) {
        match &self.rt {
            Some(rt) => (rt.q.last_avail(), used_of(&rt.q)),
            None => (
                rd(&self.raw, vqf::HW_AVAIL) as u16,
                rd(&self.raw, vqf::HW_USED) as u16,
            ),
        }
    }
}

fn used_of(q: &DeviceQueue) -> u16 {
    match q {
        DeviceQueue::Split(s) => s.used_idx(),
        DeviceQueue::Packed(p) => p.last_used(),
    }
}

#[derive(Debug, Default, Clone, Copy)]
struct Delta {
    received: u64,
    completed: u64,
    bad_desc: u32,
    exceed: u32,
    invalid: u32,
}

impl Fw {
    /// Where this model reads queue_size (moved by [`super::Skew::VqQueueSize`]).
    fn size_field(&self) -> super::bits::Fld {
        match self.opts.skew {
            Some(super::Skew::VqQueueSize) => vqf::SIZE.plus(2),
            _ => vqf::SIZE,
        }
    }

    fn vq(&self, id: u64) -> Result<&VqObj, Fail> {
        match &self.store.get(Kind::Vq, id)?.body {
            Body::Vq(v) => Ok(v),
            _ => Err(Fail::new(
                st::INTERNAL,
                "object table corrupt",
                String::new(),
            )),
        }
    }

    fn vq_mut(&mut self, id: u64) -> Result<&mut VqObj, Fail> {
        match &mut self.store.get_mut(Kind::Vq, id)?.body {
            Body::Vq(v) => Ok(v),
            _ => Err(Fail::new(
                st::INTERNAL,
                "object table corrupt",
                String::new(),
            )),
        }
    }

    /// Checks a queue image; returns the objects it refers to.
    fn vq_validate(&self, raw: &[u8]) -> Result<Vec<(Kind, u64)>, Fail> {
        let o = &self.opts;
        let index = rd(raw, vqf::INDEX);
        if index >= u64::from(o.max_queues) {
            return Err(bad(
                "queue index beyond max_num_virtio_queues",
                format!("index {index}"),
            ));
        }
        let size = rd(raw, self.size_field());
        let packed = match rd(raw, vqf::Q_TYPE) {
            0 => false,
            1 if o.packed => true,
            t => return Err(bad("queue type not supported", format!("type {t}"))),
        };
        if size == 0 || size > 32768 || (!packed && !size.is_power_of_two()) {
            return Err(bad("queue size invalid", format!("size {size}")));
        }
        let mode = rd(raw, vqf::EVENT_MODE) as u8;
        if mode > 2 || o.event_modes & (1 << mode) == 0 {
            return Err(bad("event mode not supported", format!("mode {mode}")));
        }
        let target = rd(raw, vqf::EVENT_TARGET);
        if mode == 2 && target >= u64::from(o.msix_vectors) {
            return Err(bad(
                "MSI-X vector beyond the function's",
                format!("vector {target}"),
            ));
        }
        let feats = (rd(raw, vqf::FEAT_HI) << 3) | rd(raw, vqf::FEAT_LO);
        if feats & !u64::from(o.feature_mask) != 0 {
            return Err(bad(
                "queue features beyond the device's",
                format!("{feats:#x}"),
            ));
        }
        if rd(raw, vqf::DESC_GROUP_MKEY) != 0 {
            return Err(bad(
                "descriptor group keys are not supported",
                String::new(),
            ));
        }
        let pd = rd(raw, vqf::PD);
        self.store.get(Kind::Pd, pd)?;
        let mut deps = vec![(Kind::Pd, pd)];
        if mode == 1 {
            deps.push(self.event_qp_dep(target)?);
        }
        let key = rd(raw, vqf::MKEY) as u32;
        if key != 0 {
            let m = mkey::lookup(&self.store, key)?;
            if u64::from(m.pd) != pd {
                return Err(bad(
                    "queue key in another protection domain",
                    format!("key {key:#x} in PD {:#x}, queue in PD {pd:#x}", m.pd),
                ));
            }
            if m.local_rw != (true, true) {
                return Err(bad(
                    "queue key without local read and write access",
                    format!("key {key:#x}"),
                ));
            }
            deps.push((Kind::Mkey, u64::from(key >> 8)));
        }
        let dkey = rd(raw, vqf::DIRTY_MKEY) as u32;
        if dkey != 0 {
            mkey::lookup(&self.store, dkey)?;
            deps.push((Kind::Mkey, u64::from(dkey >> 8)));
        }
        for i in 0..3 {
            let id = rd(raw, vqf::UMEM_ID[i]);
            let usize_ = rd(raw, vqf::UMEM_SIZE[i]);
            let off = rd(raw, vqf::UMEM_OFF[i]);
            let need = u64::from(o.umem[i].0) * size + u64::from(o.umem[i].1);
            let Body::Umem(u) = &self.store.get(Kind::Umem, id)?.body else {
                return Err(Fail::new(
                    st::INTERNAL,
                    "object table corrupt",
                    String::new(),
                ));
            };
            if usize_ < need {
                return Err(bad(
                    "UMEM size below a × queue size + b",
                    format!("umem {} size {usize_}, {need} needed", i + 1),
                ));
            }
            if off.checked_add(usize_).is_none_or(|e| e > u.size) {
                return Err(bad(
                    "UMEM range beyond the registered memory",
                    format!("umem {} offset {off} size {usize_} of {}", i + 1, u.size),
                ));
            }
            deps.push((Kind::Umem, id));
        }
        let cnt = rd(raw, vqf::COUNTERS);
        if cnt != 0 {
            self.store.get(Kind::Counters, cnt)?;
            deps.push((Kind::Counters, cnt));
        }
        if index % 2 == 1 {
            let tis = rd(raw, vqf::TISN);
            if tis == 0 {
                return Err(bad(
                    "transmit queue without a TIS",
                    format!("index {index}"),
                ));
            }
            self.store.get(Kind::Tis, tis)?;
            deps.push((Kind::Tis, tis));
        }
        Ok(deps)
    }

    /// Writes the device's state header into each UMEM (the first touch of its memory).
    fn vq_touch_umems(&self, raw: &[u8]) -> Result<(), Fail> {
        let view = self.domain_view();
        for i in 0..3 {
            let id = rd(raw, vqf::UMEM_ID[i]);
            let Body::Umem(u) = &self.store.get(Kind::Umem, id)?.body else {
                continue;
            };
            let at = u.offset + rd(raw, vqf::UMEM_OFF[i]);
            let page = (at / u.page) as usize;
            let Some(&base) = u.pages.get(page) else {
                continue;
            };
            let iova = base + at % u.page;
            if view.write(iova, b"vq-state").is_err() {
                if let Some(d) = &self.dma {
                    d.record_fault(iova, 8);
                }
                return Err(bad(
                    "UMEM not reachable by DMA",
                    format!("umem {} at {iova:#x}", i + 1),
                ));
            }
        }
        Ok(())
    }

    pub(super) fn vq_create(&mut self, inp: &[u8], out: &mut [u8]) -> Result<(), Fail> {
        if inp.len() < VQ_CMD_BYTES {
            return Err(Fail::new(
                st::BAD_INPUT_LEN,
                "input too short for the command",
                format!("{} bytes given, {VQ_CMD_BYTES} needed", inp.len()),
            ));
        }
        let mut raw = vec![0u8; VQ_CMD_BYTES];
        raw[VQ_OBJ_BYTE..].copy_from_slice(&inp[VQ_OBJ_BYTE..VQ_CMD_BYTES]);
        wr(&mut raw, vqf::SELECT, 0);
        let state = rd(&raw, vqf::STATE) as u8;
        if state != VQ_INIT {
            return Err(bad("queues are created in INIT", format!("state {state}")));
        }
        let deps = self.vq_validate(&raw)?;
        self.vq_touch_umems(&raw)?;
        let id = self.store.fresh(Kind::Vq);
        self.store.insert(
            Kind::Vq,
            id.into(),
            deps,
            Body::Vq(Box::new(VqObj {
                raw,
                state: VQ_INIT,
                error_type: 0,
                rt: None,
                backlog: Backlog::new(),
            })),
        )?;
        wr(out, OBJ_ID, id.into());
        Ok(())
    }

    pub(super) fn vq_modify(&mut self, id: u64, inp: &[u8]) -> Result<(), Fail> {
        if inp.len() < VQ_CMD_BYTES {
            return Err(Fail::new(
                st::BAD_INPUT_LEN,
                "input too short for the command",
                format!("{} bytes given, {VQ_CMD_BYTES} needed", inp.len()),
            ));
        }
        let select = rd(inp, vqf::SELECT);
        let known = VQ_SELECT_FIELDS
            .iter()
            .fold(SEL_STATE, |m, (bit, _)| m | 1 << bit);
        if select & !known != 0 {
            return Err(bad(
                "modify_field_select bits not supported",
                format!("{select:#x}"),
            ));
        }
        let (cur, mut raw) = {
            let v = self.vq(id)?;
            (v.state, v.raw.clone())
        };
        if cur == VQ_ERR {
            return Err(Fail::new(
                st::BAD_RES_STATE,
                "queue in ERR (destroy it)",
                format!("object {id:#x}"),
            ));
        }
        if select & !SEL_STATE != 0 && cur != VQ_INIT && cur != VQ_SUSPEND {
            return Err(Fail::new(
                st::BAD_RES_STATE,
                "fields change only in INIT or SUSPEND",
                format!("object {id:#x} is RDY, select {select:#x}"),
            ));
        }
        for (bit, fields) in VQ_SELECT_FIELDS {
            if select & (1 << bit) != 0 {
                for &f in *fields {
                    wr(&mut raw, f, rd(inp, f));
                }
            }
        }
        let new = if select & SEL_STATE != 0 {
            rd(inp, vqf::STATE) as u8
        } else {
            cur
        };
        let ok = match (cur, new) {
            (a, b) if a == b => true,
            (VQ_INIT, VQ_RDY) | (VQ_RDY, VQ_SUSPEND) => true,
            (VQ_SUSPEND, VQ_RDY) => self.opts.freeze_to_rdy,
            _ => false,
        };
        if !ok {
            return Err(Fail::new(
                st::BAD_RES_STATE,
                "state transition not allowed",
                format!("object {id:#x}: {cur} -> {new}"),
            ));
        }
        let deps = self.vq_validate(&raw)?;
        if new == VQ_RDY && cur != VQ_RDY && (rd(&raw, vqf::MKEY) == 0 || rd(&raw, vqf::DESC) == 0)
        {
            return Err(bad(
                "queue made ready without a key or ring addresses",
                format!("object {id:#x}"),
            ));
        }
        self.store.set_deps(Kind::Vq, id, deps)?;
        {
            let v = self.vq_mut(id)?;
            // Suspending: keep the positions in the object.
            if cur == VQ_RDY
                && new == VQ_SUSPEND
                && let Some(rt) = v.rt.take()
            {
                wr(&mut raw, vqf::HW_AVAIL, rt.q.last_avail().into());
                wr(&mut raw, vqf::HW_USED, used_of(&rt.q).into());
            }
            v.raw = raw;
            v.state = new;
        }
        if new == VQ_RDY && cur != VQ_RDY {
            self.vq_start(id)?;
        }
        Ok(())
    }

    /// Builds the device side from the object (positions from hw_available_index). A ring
    /// that does not translate puts the queue in ERR.
    fn vq_start(&mut self, id: u64) -> Result<(), Fail> {
        let dom = self.domain_view();
        let generation = self.dma.as_ref().map_or(0, |d| d.generation());
        let raw = self.vq(id)?.raw.clone();
        let key = rd(&raw, vqf::MKEY) as u32;
        let pieces = mkey::key_pieces(&self.store, key, &dom)?;
        let mem = mkey::view(&pieces, &dom);
        let packed = rd(&raw, vqf::Q_TYPE) == 1;
        let v1 = rd(&raw, vqf::VERSION_1) != 0;
        let feats = (rd(&raw, vqf::FEAT_HI) << 3) | rd(&raw, vqf::FEAT_LO);
        let cfg = QueueConfig {
            size: rd(&raw, self.size_field()) as u16,
            desc: rd(&raw, vqf::DESC),
            avail: rd(&raw, vqf::AVAIL),
            used: rd(&raw, vqf::USED),
            addr_kind: AddrKind::Gpa,
            features: if v1 { VIRTIO_F_VERSION_1 } else { 0 }
                | if packed { VIRTIO_F_RING_PACKED } else { 0 },
        };
        let q = mem.map_err(|e| e.to_string()).and_then(|m| {
            DeviceQueue::new(&cfg, &m)
                .map(|q| (q, m))
                .map_err(|e| e.to_string())
        });
        let (mut q, mem) = match q {
            Ok(x) => x,
            Err(why) => {
                for a in [cfg.desc, cfg.avail, cfg.used] {
                    self.fault_at(&pieces, &dom, a);
                }
                tracing::debug!("model: queue object {id:#x} ring does not translate: {why}");
                let v = self.vq_mut(id)?;
                v.state = VQ_ERR;
                v.error_type = err::RING;
                return Ok(());
            }
        };
        let avail = rd(&raw, vqf::HW_AVAIL) as u16;
        if let Err(e) = q.set_last_avail(avail) {
            let v = self.vq_mut(id)?;
            v.state = VQ_ERR;
            v.error_type = err::DESC;
            tracing::debug!("model: queue object {id:#x}: position {avail:#x}: {e}");
            return Ok(());
        }
        q.set_notification(true);
        let mode = rd(&raw, vqf::EVENT_MODE);
        let rt = Runtime {
            q,
            mem,
            pieces,
            generation,
            segs: Segs::new(),
            hdr_len: if v1 || feats & 4 != 0 { 12 } else { 10 },
            event: Event::of(mode, rd(&raw, vqf::EVENT_TARGET)),
        };
        self.vq_mut(id)?.rt = Some(rt);
        Ok(())
    }

    /// Records an IOMMU fault if key address `va` translates to an IOVA the domain lacks.
    fn fault_at(&self, pieces: &[Piece], dom: &GuestMemory, va: u64) {
        if let Some(iova) = mkey::iova_of(pieces, va)
            && dom.gpa_to_host(iova, 1).is_none()
            && let Some(d) = &self.dma
        {
            d.record_fault(iova, 1);
        }
    }

    pub(super) fn vq_query(&mut self, id: u64, out: &mut [u8]) -> Result<(), Fail> {
        if out.len() < VQ_CMD_BYTES {
            return Err(Fail::new(
                st::BAD_OUTPUT_LEN,
                "output too short for the command",
                format!("{} bytes of room, {VQ_CMD_BYTES} needed", out.len()),
            ));
        }
        let v = self.vq(id)?;
        out[VQ_OBJ_BYTE..VQ_CMD_BYTES].copy_from_slice(&v.raw[VQ_OBJ_BYTE..]);
        let (a, u) = v.positions();
        wr(out, vqf::SELECT, 0);
        wr(out, vqf::STATE, v.state.into());
        wr(out, vqf::ERROR_TYPE, v.error_type.into());
        wr(out, vqf::HW_AVAIL, a.into());
        wr(out, vqf::HW_USED, u.into());
        Ok(())
    }

    pub(super) fn vq_destroy(&mut self, id: u64) -> Result<(), Fail> {
        self.store.remove(Kind::Vq, id).map(|_| ())
    }

    fn fail_queue(&mut self, id: u64, e: &QueueError, d: &mut Delta) {
        let (et, addr) = match e {
            QueueError::BadBuffer { addr, .. } | QueueError::MemAccess { gpa: addr, .. } => {
                (err::BUFFER, Some(*addr))
            }
            QueueError::IndirectTableNotInMemory { addr, .. } => (err::BUFFER, Some(*addr)),
            QueueError::ChainTooLong { .. } | QueueError::TooManySegs { .. } => {
                d.exceed += 1;
                (err::DESC, None)
            }
            _ => (err::DESC, None),
        };
        if et == err::BUFFER {
            d.invalid += 1;
        } else {
            d.bad_desc += 1;
        }
        let dom = self.domain_view();
        if let (Some(a), Ok(v)) = (addr, self.vq(id))
            && let Some(rt) = &v.rt
        {
            let pieces = rt.pieces.clone();
            self.fault_at(&pieces, &dom, a);
        }
        tracing::debug!("model: queue object {id:#x} failed: {e}");
        if let Ok(v) = self.vq_mut(id) {
            v.state = VQ_ERR;
            v.error_type = et;
            v.rt = None;
        }
    }

    fn add_counts(&mut self, id: u64, d: Delta) {
        let Ok(v) = self.vq(id) else { return };
        let c = rd(&v.raw, vqf::COUNTERS);
        if c == 0 {
            return;
        }
        if let Ok(o) = self.store.get_mut(Kind::Counters, c)
            && let Body::Counters(x) = &mut o.body
        {
            x.received += d.received;
            x.completed += d.completed;
            x.bad_desc += d.bad_desc;
            x.exceed += d.exceed;
            x.invalid += d.invalid;
        }
    }

    /// One pass of the engine over every ready queue: transmit chains go to the wire,
    /// received frames into receive rings. Returns whether work is left (a budget ran out).
    pub fn run(&mut self, irq: &mut Option<IrqSender>) -> bool {
        let generation = self.dma.as_ref().map_or(0, |d| d.generation());
        let ids = self.store.ids(Kind::Vq);
        let mut more = false;
        // A changed domain: rebuild the device sides from their positions.
        for &id in &ids {
            let stale = matches!(self.vq(id), Ok(v) if v.rt.as_ref().is_some_and(|r| r.generation != generation));
            if stale && let Ok(v) = self.vq_mut(id) {
                if let Some(rt) = v.rt.take() {
                    wr(&mut v.raw, vqf::HW_AVAIL, rt.q.last_avail().into());
                    wr(&mut v.raw, vqf::HW_USED, used_of(&rt.q).into());
                }
                let _ = self.vq_start(id);
            }
        }
        let mut frames = Vec::new();
        for &id in &ids {
            let tx = matches!(self.vq(id), Ok(v) if v.rt.is_some() && v.index() % 2 == 1);
            if tx {
                more |= self.tx_pass(id, &mut frames, irq);
            }
        }
        for f in frames {
            match self.opts.wire {
                Wire::Loop => self.receive(f),
                Wire::Port => {
                    if self.port_tx.len() < PORT_TX_MAX {
                        self.port_tx.push_back(f);
                    } else {
                        self.stats.backlog_drops += 1;
                    }
                }
            }
        }
        for &id in &ids {
            let rx = matches!(self.vq(id), Ok(v) if v.rt.is_some() && v.index() % 2 == 0 && !v.backlog.is_empty());
            if rx {
                more |= self.rx_pass(id, irq);
            }
        }
        more
    }

    fn tx_pass(&mut self, id: u64, frames: &mut Vec<Vec<u8>>, irq: &mut Option<IrqSender>) -> bool {
        let mut d = Delta::default();
        let mut failed = None;
        let mut n = 0;
        let mut bad_frames = 0;
        let mut notify = None;
        {
            let Ok(v) = self.vq_mut(id) else { return false };
            let index = v.index();
            let Some(rt) = v.rt.as_mut() else {
                return false;
            };
            while n < BUDGET {
                match rt.q.pop(&rt.mem, &mut rt.segs) {
                    Ok(Some(chain)) => {
                        d.received += 1;
                        let total = chain.readable as usize;
                        if total < rt.hdr_len + 14 || total > rt.hdr_len + 65_535 {
                            bad_frames += 1;
                            d.invalid += 1;
                        } else {
                            let mut f = vec![0u8; total - rt.hdr_len];
                            rt.segs.read(rt.hdr_len, &mut f);
                            frames.push(f);
                        }
                        rt.q.push_used(&chain, 0);
                        d.completed += 1;
                    }
                    Ok(None) => break,
                    Err(e) => {
                        failed = Some(e);
                        break;
                    }
                }
                n += 1;
            }
            if rt.q.publish_used() {
                notify = Some((index, rt.event));
            }
        }
        if let Some((index, ev)) = notify {
            self.raise(index, ev, irq);
        }
        self.stats.tx_frames += d.completed - bad_frames;
        self.stats.bad_frames += bad_frames;
        if let Some(e) = failed {
            self.fail_queue(id, &e, &mut d);
        }
        self.add_counts(id, d);
        n == BUDGET
    }

    fn rx_pass(&mut self, id: u64, irq: &mut Option<IrqSender>) -> bool {
        let mut d = Delta::default();
        let mut failed = None;
        let mut n = 0;
        let mut delivered = 0;
        let mut dropped = 0;
        let mut notify = None;
        {
            let Ok(v) = self.vq_mut(id) else { return false };
            let index = v.index();
            let VqObj { rt, backlog, .. } = v;
            let Some(rt) = rt.as_mut() else { return false };
            while n < BUDGET {
                let Some(frame) = backlog.front() else { break };
                match rt.q.pop(&rt.mem, &mut rt.segs) {
                    Ok(Some(chain)) => {
                        let need = rt.hdr_len + frame.len();
                        if (chain.writable as usize) < need {
                            // Does not fit this chain: the frame is dropped, the chain stays.
                            rt.q.rewind(&chain);
                            backlog.pop_front();
                            dropped += 1;
                            d.invalid += 1;
                            continue;
                        }
                        d.received += 1;
                        let mut hdr = [0u8; 12];
                        if rt.hdr_len == 12 {
                            hdr[10] = 1;
                        }
                        rt.segs.write(0, &hdr[..rt.hdr_len]);
                        rt.segs.write(rt.hdr_len, frame);
                        rt.q.push_used(&chain, need as u32);
                        d.completed += 1;
                        delivered += 1;
                        backlog.pop_front();
                    }
                    Ok(None) => break,
                    Err(e) => {
                        failed = Some(e);
                        break;
                    }
                }
                n += 1;
            }
            if rt.q.publish_used() {
                notify = Some((index, rt.event));
            }
        }
        if let Some((index, ev)) = notify {
            self.raise(index, ev, irq);
        }
        self.stats.rx_frames += delivered;
        self.stats.bad_frames += dropped;
        if let Some(e) = failed {
            self.fail_queue(id, &e, &mut d);
        }
        self.add_counts(id, d);
        n == BUDGET
    }

    /// A frame arrives from the wire: steering picks the receive queue, whose backlog holds it
    /// until the ring has a buffer.
    pub fn receive(&mut self, frame: Vec<u8>) {
        let Some(id) = self.steer(&frame) else {
            self.stats.steer_drops += 1;
            return;
        };
        match self.vq_mut(id) {
            Ok(v) if v.state == VQ_RDY || v.state == VQ_SUSPEND => {
                if v.backlog.len() < BACKLOG_MAX {
                    v.backlog.push_back(frame);
                } else {
                    self.stats.backlog_drops += 1;
                }
            }
            _ => self.stats.steer_drops += 1,
        }
    }
}

fn bad(reason: &'static str, detail: String) -> Fail {
    Fail::new(st::BAD_PARAM, reason, detail)
}

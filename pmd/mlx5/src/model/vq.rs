//! VIRTIO_NET_Q objects in the model: validation on create and modify, the INIT → RDY →
//! SUSPEND state machine (SUSPEND → RDY only when resumable, ERR terminal), query, counters, and
//! the object's queue on the kit's engine.
//!
//! A queue made ready becomes the engine queue of its virtio index: rings and positions from
//! the object, every ring and buffer access through its memory key's view
//! ([`mkey::KeyView`], re-read by the engine whenever the domain's mappings change), its event
//! mode in the interrupt point's table, and, with DIRTY_BITMAP_DUMP_ENABLE, a dirty log at
//! dirty_bitmap_addr of dirty_bitmap_mkey's view (vhost format: bit n = 4 KiB page n of the
//! addresses the queue writes, i.e. guest physical addresses under the driver's keys). Leaving
//! RDY stops the engine queue, and the positions it reached go back into the object. An engine
//! queue that stopped on a fault or a ring error puts the object in ERR.

use std::sync::Arc;

use vdpakit_core::model::engine::{NO_VECTOR, QueueLog, QueueSetup};
use vdpakit_core::vdpa::VqStats;
use vdpakit_core::virtio::features as vf;

use super::bits::{rd, wr};
use super::defs::*;
use super::eq::Event;
use super::fw::{Fail, Fw};
use super::mkey::{self, KeyView};
use super::store::{Body, Kind};

/// Error types the model reports in ERR state (its own numbering).
pub mod err {
    /// A ring area does not translate through the queue's key (or the domain).
    pub const RING: u8 = 1;
    /// The driver wrote a malformed ring (bad index, loop, bad descriptor).
    pub const DESC: u8 = 2;
    /// A buffer does not translate.
    pub const BUFFER: u8 = 3;
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
    /// The engine queue's counters when last added to the counters object.
    seen: VqStats,
    /// IOMMU faults of the engine queue when it started (ERR classification).
    faults_at_start: u64,
    /// Left RDY: read the engine's final positions back after the next sync.
    readback: bool,
}

impl VqObj {
    /// virtio index.
    pub fn index(&self) -> u16 {
        rd(&self.raw, vqf::INDEX) as u16
    }
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
        let index = rd(&raw, vqf::INDEX) as u16;
        if let Some(other) = self
            .store
            .iter_kind(Kind::Vq)
            .find(|(_, o)| matches!(&o.body, Body::Vq(v) if v.index() == index))
            .map(|(id, _)| id)
        {
            return Err(bad(
                "queue index in use by another queue object",
                format!("index {index}: object {other:#x}"),
            ));
        }
        self.vq_touch_umems(&raw)?;
        let seen = self.engine_counters(index);
        let id = self.store.fresh(Kind::Vq);
        self.store.insert(
            Kind::Vq,
            id.into(),
            deps,
            Body::Vq(Box::new(VqObj {
                raw,
                state: VQ_INIT,
                error_type: 0,
                seen,
                faults_at_start: 0,
                readback: false,
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
        self.vq_observe(id);
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
        // With vnet_modify_ext, a ready queue's dirty bitmap fields may change (what hardware
        // dirty logging on running queues needs); other fields only in INIT or SUSPEND.
        let running_ok = if self.opts.modify_ext {
            SEL_STATE | SEL_DIRTY_PARAMS | SEL_DIRTY_DUMP
        } else {
            SEL_STATE
        };
        if cur == VQ_RDY && select & !running_ok != 0 {
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
        // The engine side first (it may refuse a key), then the object.
        let index = rd(&raw, vqf::INDEX) as u16;
        if new == VQ_RDY && cur != VQ_RDY {
            self.engine_start(&raw)?;
        } else if new == VQ_RDY && select & (SEL_DIRTY_PARAMS | SEL_DIRTY_DUMP) != 0 {
            let log = self.queue_log(&raw)?;
            let mut c = self.vf.ctl();
            grow(&mut c.queue_log, index);
            c.queue_log[usize::from(index)] = log;
            self.sync_pending = true;
        }
        self.store.set_deps(Kind::Vq, id, deps)?;
        let faults = self.engine_counters(index).iommu_faults;
        let stopping = cur == VQ_RDY && new != VQ_RDY;
        if stopping {
            self.engine_stop(index, false);
        }
        let v = self.vq_mut(id)?;
        v.raw = raw;
        v.state = new;
        if new == VQ_RDY && cur != VQ_RDY {
            v.faults_at_start = faults;
        }
        // Suspending: the positions the engine stopped at go into the object after the sync.
        v.readback |= stopping;
        Ok(())
    }

    /// Counters of the engine queue `index` (zero beyond the function's queues).
    fn engine_counters(&self, index: u16) -> VqStats {
        self.vf
            .counters(index)
            .map(|c| c.snapshot())
            .unwrap_or_default()
    }

    /// The dirty log a queue image asks for (DIRTY_BITMAP_DUMP_ENABLE and the bitmap's key,
    /// address and size), if any.
    fn queue_log(&self, raw: &[u8]) -> Result<Option<QueueLog>, Fail> {
        if rd(raw, vqf::DIRTY_DUMP) == 0 {
            return Ok(None);
        }
        let key = rd(raw, vqf::DIRTY_MKEY) as u32;
        let size = rd(raw, vqf::DIRTY_SIZE);
        if key == 0 || size == 0 {
            return Err(bad(
                "dirty bitmap dumping without a bitmap (key and size)",
                format!("key {key:#x}, {size} bytes"),
            ));
        }
        Ok(Some(QueueLog {
            view: Arc::new(KeyView::of(&self.store, key)?),
            addr: rd(raw, vqf::DIRTY_ADDR),
            size,
        }))
    }

    /// Makes a queue image the engine queue of its index: rings, positions, the key's view, the
    /// event mode, the dirty log.
    fn engine_start(&mut self, raw: &[u8]) -> Result<(), Fail> {
        let index = rd(raw, vqf::INDEX) as u16;
        if index >= self.vf.queues() {
            return Err(bad(
                "queue index beyond the function's engine queues",
                format!("index {index}"),
            ));
        }
        let view = KeyView::of(&self.store, rd(raw, vqf::MKEY) as u32)?;
        let log = self.queue_log(raw)?;
        let feats = (rd(raw, vqf::FEAT_HI) << 3) | rd(raw, vqf::FEAT_LO);
        let mut features = 0;
        if rd(raw, vqf::VERSION_1) != 0 {
            features |= vf::VERSION_1;
        }
        if rd(raw, vqf::Q_TYPE) == 1 {
            features |= vf::RING_PACKED;
        }
        if feats & (1 << MLX_MRG_RXBUF) != 0 {
            features |= vf::NET_MRG_RXBUF;
        }
        let i = usize::from(index);
        {
            let mut c = self.vf.ctl();
            // The engine applies one feature set per function: the driver gives every queue the
            // same, the last queue made ready sets it.
            c.features = features;
            c.queues[i] = QueueSetup {
                size: rd(raw, self.size_field()) as u16,
                desc: rd(raw, vqf::DESC),
                driver: rd(raw, vqf::AVAIL),
                device: rd(raw, vqf::USED),
                enabled: true,
                vector: NO_VECTOR,
                avail: Some(rd(raw, vqf::HW_AVAIL) as u16),
                used: Some(rd(raw, vqf::HW_USED) as u16),
            };
            grow(&mut c.queue_mem, index);
            grow(&mut c.queue_log, index);
            c.queue_mem[i] = Some(Arc::new(view));
            c.queue_log[i] = log;
        }
        if let Some(ev) = self.events.as_ref().and_then(|e| e.events.get(i)) {
            let e = Event::of(rd(raw, vqf::EVENT_MODE), rd(raw, vqf::EVENT_TARGET));
            ev.store(e.encode(), std::sync::atomic::Ordering::Release);
        }
        self.sync_pending = true;
        Ok(())
    }

    /// Stops engine queue `index` (its positions are written back by the engine); `forget`
    /// also drops its view, log and event mode (the object is gone).
    fn engine_stop(&mut self, index: u16, forget: bool) {
        let i = usize::from(index);
        {
            let mut c = self.vf.ctl();
            if let Some(q) = c.queues.get_mut(i) {
                q.enabled = false;
            }
            if forget {
                if let Some(m) = c.queue_mem.get_mut(i) {
                    *m = None;
                }
                if let Some(l) = c.queue_log.get_mut(i) {
                    *l = None;
                }
            }
        }
        if forget && let Some(ev) = self.events.as_ref().and_then(|e| e.events.get(i)) {
            ev.store(0, std::sync::atomic::Ordering::Release);
        }
        self.sync_pending = true;
    }

    /// After the engine applied the changes: queues that left RDY take the positions it wrote
    /// back.
    pub fn after_sync(&mut self) {
        let ids = self.store.ids(Kind::Vq);
        for id in ids {
            let Ok(v) = self.vq(id) else { continue };
            if !v.readback {
                continue;
            }
            let i = usize::from(v.index());
            let pos = self.vf.ctl().queues.get(i).map(|q| (q.avail, q.used));
            if let Ok(v) = self.vq_mut(id) {
                if let Some((Some(a), Some(u))) = pos {
                    wr(&mut v.raw, vqf::HW_AVAIL, a.into());
                    wr(&mut v.raw, vqf::HW_USED, u.into());
                }
                v.readback = false;
            }
        }
    }

    /// A ready queue whose engine queue stopped on a fault or ring error goes to ERR: RING when
    /// its rings do not translate through its key now, BUFFER after an IOMMU fault on a buffer,
    /// DESC otherwise.
    pub fn vq_observe(&mut self, id: u64) {
        let Ok(v) = self.vq(id) else { return };
        if v.state != VQ_RDY {
            return;
        }
        let index = v.index();
        let broken = self.vf.counters(index).is_some_and(|c| c.is_broken());
        if !broken {
            return;
        }
        let raw = v.raw.clone();
        let faults0 = v.faults_at_start;
        let et = if !self.rings_translate(&raw) {
            err::RING
        } else if self.engine_counters(index).iommu_faults > faults0 {
            err::BUFFER
        } else {
            err::DESC
        };
        tracing::debug!("model: queue object {id:#x} (index {index}) stopped: ERR, type {et}");
        if let Ok(v) = self.vq_mut(id) {
            v.state = VQ_ERR;
            v.error_type = et;
        }
    }

    /// Whether a queue image's three ring areas translate through its key and the domain now.
    fn rings_translate(&self, raw: &[u8]) -> bool {
        let Ok(view) = KeyView::of(&self.store, rd(raw, vqf::MKEY) as u32) else {
            return false;
        };
        let mem = vdpakit_core::model::engine::QueueView::view(&view, &self.domain_view());
        let packed = rd(raw, vqf::Q_TYPE) == 1;
        let (dl, al, ul) =
            vdpakit_core::virtio::ring_sizes(rd(raw, self.size_field()) as u16, packed, false);
        [
            (rd(raw, vqf::DESC), dl),
            (rd(raw, vqf::AVAIL), al),
            (rd(raw, vqf::USED), ul),
        ]
        .iter()
        .all(|&(a, l)| mem.gpa_to_host(a, l).is_some())
    }

    /// State, error type and positions of queue object `id` (positions live from the engine
    /// while ready).
    pub fn queue_info(&mut self, id: u64) -> Option<(u8, u8, u16, u16)> {
        self.vq_observe(id);
        let v = self.vq(id).ok()?;
        let (a, u) = self.positions(v);
        Some((v.state, v.error_type, a, u))
    }

    fn positions(&self, v: &VqObj) -> (u16, u16) {
        if v.state == VQ_RDY
            && let Some(c) = self.vf.counters(v.index())
        {
            return c.positions();
        }
        (
            rd(&v.raw, vqf::HW_AVAIL) as u16,
            rd(&v.raw, vqf::HW_USED) as u16,
        )
    }

    /// Adds what the engine counted for queue object `id` since the last look to its counters
    /// object: chains taken and completed, descriptor errors, faulting buffers.
    pub fn fold_counts(&mut self, id: u64) {
        let Ok(v) = self.vq(id) else { return };
        let (index, cnt, seen) = (v.index(), rd(&v.raw, vqf::COUNTERS), v.seen);
        let now = self.engine_counters(index);
        if let Ok(v) = self.vq_mut(id) {
            v.seen = now;
        }
        if cnt == 0 {
            return;
        }
        let d = |a: u64, b: u64| a.wrapping_sub(b);
        let (packets, errors, faults) = (
            d(now.packets, seen.packets),
            d(now.errors, seen.errors),
            d(now.iommu_faults, seen.iommu_faults),
        );
        if let Ok(o) = self.store.get_mut(Kind::Counters, cnt)
            && let Body::Counters(x) = &mut o.body
        {
            x.received += packets + errors;
            x.completed += packets;
            x.bad_desc = x.bad_desc.wrapping_add(errors as u32);
            x.invalid = x.invalid.wrapping_add(faults as u32);
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
        self.vq_observe(id);
        let v = self.vq(id)?;
        out[VQ_OBJ_BYTE..VQ_CMD_BYTES].copy_from_slice(&v.raw[VQ_OBJ_BYTE..]);
        let (a, u) = self.positions(v);
        wr(out, vqf::SELECT, 0);
        wr(out, vqf::STATE, v.state.into());
        wr(out, vqf::ERROR_TYPE, v.error_type.into());
        wr(out, vqf::HW_AVAIL, a.into());
        wr(out, vqf::HW_USED, u.into());
        Ok(())
    }

    pub(super) fn vq_destroy(&mut self, id: u64) -> Result<(), Fail> {
        self.fold_counts(id);
        let o = self.store.remove(Kind::Vq, id)?;
        if let Body::Vq(v) = o.body {
            self.engine_stop(v.index(), true);
        }
        Ok(())
    }
}

/// Makes `v` long enough to index `index`.
fn grow<T: Clone>(v: &mut Vec<Option<T>>, index: u16) {
    if v.len() <= usize::from(index) {
        v.resize(usize::from(index) + 1, None);
    }
}

fn bad(reason: &'static str, detail: String) -> Fail {
    Fail::new(st::BAD_PARAM, reason, detail)
}

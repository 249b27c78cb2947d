//! VIRTIO_NET_Q objects (create, modify, query, destroy) and their counters, and [`Vq`]: one
//! queue with everything it owns (three UMEMs, a counters object).
//!
//! State rules (firmware enforces them; the driver follows them): a queue is created in INIT,
//! goes INIT → RDY when the guest's ring is ready, RDY → SUSPEND to stop it with its positions
//! kept, SUSPEND → RDY only when the function is resumable (`freeze_to_rdy_supported`); ERR is
//! terminal. Fields other than STATE change only in INIT or SUSPEND.

use crate::error::Result;
use crate::hca::{Hca, cmd_in};
use crate::prm::{Buf, counters, hdr, obj, op, vq};
use crate::res::Umem;

/// The fields of a VIRTIO_NET_Q object the driver sets or reads.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct VirtqAttr {
    /// virtio queue index (even: receive, odd: transmit).
    pub index: u16,
    /// Ring size.
    pub size: u16,
    /// Packed ring.
    pub packed: bool,
    /// VIRTIO_F_VERSION_1 negotiated.
    pub version_1: bool,
    /// Negotiated features as mlx feature bits.
    pub features: u16,
    /// Event mode ([`vq::EVENT_NO_MSIX`], [`vq::EVENT_QP`], [`vq::EVENT_MSIX`]).
    pub event_mode: u8,
    /// MSI-X vector (MSI-X mode) or firmware QP (QP mode).
    pub event_target: u32,
    /// Descriptor area.
    pub desc: u64,
    /// Driver area.
    pub avail: u64,
    /// Device area.
    pub used: u64,
    /// Key translating ring and buffer addresses.
    pub mkey: u32,
    /// Next available index the device reads.
    pub avail_idx: u16,
    /// Used index.
    pub used_idx: u16,
    /// TIS (transmit queues).
    pub tisn: u32,
    /// Protection domain.
    pub pd: u32,
    /// Counters object.
    pub counter_set: u32,
    /// UMEMs: (id, size, offset).
    pub umems: [(u32, u32, u64); 3],
    /// State.
    pub state: u8,
    /// Error type (ERR state, query only).
    pub error_type: u8,
    /// Event moderation: mode, period in µs, completion count.
    pub moderation: (u8, u16, u16),
    /// Dirty bitmap: key, address, size in bytes.
    pub dirty_bitmap: (u32, u64, u32),
    /// Dirty bitmap dumping enabled.
    pub dirty_dump: bool,
}

impl VirtqAttr {
    /// Writes every field into a command buffer (header + object).
    pub fn encode(&self, b: &mut Buf) {
        b.set(vq::Q_TYPE, u64::from(self.packed));
        b.set(vq::EVENT_MODE, u64::from(self.event_mode));
        b.set(vq::QUEUE_INDEX, u64::from(self.index));
        b.set(vq::VIRTIO_VERSION_1_0, u64::from(self.version_1));
        b.set(vq::FEATURES_12_3, u64::from(self.features >> 3));
        b.set(vq::FEATURES_2_0, u64::from(self.features & 7));
        b.set(vq::EVENT_QPN_OR_MSIX, u64::from(self.event_target));
        b.set(vq::QUEUE_SIZE, u64::from(self.size));
        b.set(vq::DESC_ADDR, self.desc);
        b.set(vq::AVAILABLE_ADDR, self.avail);
        b.set(vq::USED_ADDR, self.used);
        b.set(vq::VIRTIO_Q_MKEY, u64::from(self.mkey));
        b.set(vq::HW_AVAILABLE_INDEX, u64::from(self.avail_idx));
        b.set(vq::HW_USED_INDEX, u64::from(self.used_idx));
        b.set(vq::TISN_OR_QPN, u64::from(self.tisn));
        b.set(vq::PD, u64::from(self.pd));
        b.set(vq::COUNTER_SET_ID, u64::from(self.counter_set));
        for (i, &(id, size, off)) in self.umems.iter().enumerate() {
            let i = i as u32;
            b.set(vq::umem_id(i), u64::from(id));
            b.set(vq::umem_size(i), u64::from(size));
            b.set(vq::umem_offset(i), off);
        }
        b.set(vq::STATE, u64::from(self.state));
        b.set(vq::QUEUE_PERIOD_MODE, u64::from(self.moderation.0));
        b.set(vq::QUEUE_PERIOD_US, u64::from(self.moderation.1));
        b.set(vq::QUEUE_MAX_COUNT, u64::from(self.moderation.2));
        b.set(vq::DIRTY_BITMAP_MKEY, u64::from(self.dirty_bitmap.0));
        b.set(vq::DIRTY_BITMAP_ADDR, self.dirty_bitmap.1);
        b.set(vq::DIRTY_BITMAP_SIZE, u64::from(self.dirty_bitmap.2));
        b.set(vq::DIRTY_BITMAP_DUMP_ENABLE, u64::from(self.dirty_dump));
    }

    /// Reads every field from a QUERY output.
    pub fn decode(b: &Buf) -> VirtqAttr {
        let g = |f| b.get(f);
        VirtqAttr {
            index: g(vq::QUEUE_INDEX) as u16,
            size: g(vq::QUEUE_SIZE) as u16,
            packed: g(vq::Q_TYPE) == 1,
            version_1: g(vq::VIRTIO_VERSION_1_0) != 0,
            features: ((g(vq::FEATURES_12_3) << 3) | g(vq::FEATURES_2_0)) as u16,
            event_mode: g(vq::EVENT_MODE) as u8,
            event_target: g(vq::EVENT_QPN_OR_MSIX) as u32,
            desc: g(vq::DESC_ADDR),
            avail: g(vq::AVAILABLE_ADDR),
            used: g(vq::USED_ADDR),
            mkey: g(vq::VIRTIO_Q_MKEY) as u32,
            avail_idx: g(vq::HW_AVAILABLE_INDEX) as u16,
            used_idx: g(vq::HW_USED_INDEX) as u16,
            tisn: g(vq::TISN_OR_QPN) as u32,
            pd: g(vq::PD) as u32,
            counter_set: g(vq::COUNTER_SET_ID) as u32,
            umems: std::array::from_fn(|i| {
                let i = i as u32;
                (
                    g(vq::umem_id(i)) as u32,
                    g(vq::umem_size(i)) as u32,
                    g(vq::umem_offset(i)),
                )
            }),
            state: g(vq::STATE) as u8,
            error_type: g(vq::ERROR_TYPE) as u8,
            moderation: (
                g(vq::QUEUE_PERIOD_MODE) as u8,
                g(vq::QUEUE_PERIOD_US) as u16,
                g(vq::QUEUE_MAX_COUNT) as u16,
            ),
            dirty_bitmap: (
                g(vq::DIRTY_BITMAP_MKEY) as u32,
                g(vq::DIRTY_BITMAP_ADDR),
                g(vq::DIRTY_BITMAP_SIZE) as u32,
            ),
            dirty_dump: g(vq::DIRTY_BITMAP_DUMP_ENABLE) != 0,
        }
    }
}

/// Name of a queue state.
pub fn state_name(s: u8) -> &'static str {
    match s {
        vq::STATE_INIT => "INIT",
        vq::STATE_RDY => "RDY",
        vq::STATE_SUSPEND => "SUSPEND",
        vq::STATE_ERR => "ERR",
        _ => "unknown",
    }
}

/// VIRTIO_Q_COUNTERS values.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct QCounters {
    /// Chains taken from the driver.
    pub received_desc: u64,
    /// Chains completed.
    pub completed_desc: u64,
    /// Completion errors.
    pub error_cqes: u32,
    /// Malformed descriptors.
    pub bad_desc_errors: u32,
    /// Chains over the length limit.
    pub exceed_max_chain: u32,
    /// Buffers the device could not use.
    pub invalid_buffer: u32,
}

fn obj_in(opcode: u16, obj_type: u16, id: u32, len: usize) -> Buf {
    let mut b = cmd_in(opcode, 0, len);
    b.set(hdr::OBJ_TYPE, u64::from(obj_type));
    b.set(hdr::OBJ_ID, u64::from(id));
    b
}

impl Hca {
    /// CREATE_GENERAL_OBJECT(VIRTIO_NET_Q) in `attr.state` (INIT).
    pub fn create_virtq(&self, attr: &VirtqAttr) -> Result<u32> {
        let mut b = obj_in(op::CREATE_GENERAL_OBJECT, obj::VIRTIO_NET_Q, 0, vq::CMD_LEN);
        attr.encode(&mut b);
        let out = self.exec(&b, 16)?;
        Ok(out.get(hdr::OBJ_ID) as u32)
    }

    /// MODIFY_GENERAL_OBJECT(VIRTIO_NET_Q): the fields `select` ([`vq::sel`]) names take their
    /// values from `attr`.
    pub fn modify_virtq(&self, id: u32, select: u64, attr: &VirtqAttr) -> Result<()> {
        let mut b = obj_in(
            op::MODIFY_GENERAL_OBJECT,
            obj::VIRTIO_NET_Q,
            id,
            vq::CMD_LEN,
        );
        attr.encode(&mut b);
        b.set(vq::MODIFY_FIELD_SELECT, select);
        self.exec(&b, 16).map(|_| ())
    }

    /// MODIFY to `state` only.
    pub fn set_virtq_state(&self, id: u32, state: u8) -> Result<()> {
        let attr = VirtqAttr {
            state,
            ..Default::default()
        };
        self.modify_virtq(id, vq::sel::STATE, &attr)
    }

    /// QUERY_GENERAL_OBJECT(VIRTIO_NET_Q).
    pub fn query_virtq(&self, id: u32) -> Result<VirtqAttr> {
        let b = obj_in(op::QUERY_GENERAL_OBJECT, obj::VIRTIO_NET_Q, id, 16);
        let out = self.exec(&b, vq::CMD_LEN)?;
        Ok(VirtqAttr::decode(&out))
    }

    /// DESTROY_GENERAL_OBJECT(VIRTIO_NET_Q).
    pub fn destroy_virtq(&self, id: u32) -> Result<()> {
        let b = obj_in(op::DESTROY_GENERAL_OBJECT, obj::VIRTIO_NET_Q, id, 16);
        self.exec(&b, 16).map(|_| ())
    }

    /// CREATE_GENERAL_OBJECT(VIRTIO_Q_COUNTERS).
    pub fn create_counters(&self) -> Result<u32> {
        let b = obj_in(
            op::CREATE_GENERAL_OBJECT,
            obj::VIRTIO_Q_COUNTERS,
            0,
            hdr::LEN + counters::OBJ_LEN,
        );
        let out = self.exec(&b, 16)?;
        Ok(out.get(hdr::OBJ_ID) as u32)
    }

    /// QUERY_GENERAL_OBJECT(VIRTIO_Q_COUNTERS).
    pub fn query_counters(&self, id: u32) -> Result<QCounters> {
        let b = obj_in(op::QUERY_GENERAL_OBJECT, obj::VIRTIO_Q_COUNTERS, id, 16);
        let o = self.exec(&b, hdr::LEN + counters::OBJ_LEN)?;
        Ok(QCounters {
            received_desc: o.get(counters::RECEIVED_DESC),
            completed_desc: o.get(counters::COMPLETED_DESC),
            error_cqes: o.get(counters::ERROR_CQES) as u32,
            bad_desc_errors: o.get(counters::BAD_DESC_ERRORS) as u32,
            exceed_max_chain: o.get(counters::EXCEED_MAX_CHAIN) as u32,
            invalid_buffer: o.get(counters::INVALID_BUFFER) as u32,
        })
    }

    /// DESTROY_GENERAL_OBJECT(VIRTIO_Q_COUNTERS).
    pub fn destroy_counters(&self, id: u32) -> Result<()> {
        let b = obj_in(op::DESTROY_GENERAL_OBJECT, obj::VIRTIO_Q_COUNTERS, id, 16);
        self.exec(&b, 16).map(|_| ())
    }
}

/// One virtio queue and what it owns.
#[derive(Debug)]
pub struct Vq {
    /// VIRTIO_NET_Q object id.
    pub id: u32,
    /// virtio queue index.
    pub index: u16,
    /// Counters object id.
    pub counters: u32,
    /// The three UMEMs.
    pub umems: Vec<Umem>,
    /// Last state the driver set.
    pub state: u8,
}

impl Vq {
    /// Creates the counters, the three UMEMs (a × size + b bytes each) and the queue object in
    /// INIT with `attr`'s fields (its counter and UMEM fields are filled here). On failure
    /// whatever was created is destroyed.
    pub fn create(hca: &Hca, attr: &VirtqAttr) -> Result<Vq> {
        let counters = hca.create_counters()?;
        let mut umems: Vec<Umem> = Vec::with_capacity(3);
        let undo = |umems: Vec<Umem>| {
            for u in umems.into_iter().rev() {
                if let Err(e) = hca.destroy_umem(u) {
                    tracing::warn!("{e}");
                }
            }
            if let Err(e) = hca.destroy_counters(counters) {
                tracing::warn!("{e}");
            }
        };
        for i in 0..3 {
            let size = hca.caps().virtio.umem_size(i, attr.size);
            match hca.create_umem(size.max(1)) {
                Ok(u) => umems.push(u),
                Err(e) => {
                    undo(umems);
                    return Err(e);
                }
            }
        }
        let mut a = attr.clone();
        a.counter_set = counters;
        a.state = vq::STATE_INIT;
        for (i, u) in umems.iter().enumerate() {
            a.umems[i] = (u.id, u.size as u32, 0);
        }
        match hca.create_virtq(&a) {
            Ok(id) => Ok(Vq {
                id,
                index: attr.index,
                counters,
                umems,
                state: vq::STATE_INIT,
            }),
            Err(e) => {
                undo(umems);
                Err(e)
            }
        }
    }

    /// Moves the queue to `state`.
    pub fn set_state(&mut self, hca: &Hca, state: u8) -> Result<()> {
        hca.set_virtq_state(self.id, state)?;
        self.state = state;
        Ok(())
    }

    /// Destroys the object, its UMEMs and its counters (all attempted; the first error is
    /// returned).
    pub fn destroy(self, hca: &Hca) -> Result<()> {
        let mut first = hca.destroy_virtq(self.id).err();
        for u in self.umems.into_iter().rev() {
            if let Err(e) = hca.destroy_umem(u) {
                tracing::warn!("{e}");
                first.get_or_insert(e);
            }
        }
        if let Err(e) = hca.destroy_counters(self.counters) {
            tracing::warn!("{e}");
            first.get_or_insert(e);
        }
        first.map_or(Ok(()), Err)
    }
}

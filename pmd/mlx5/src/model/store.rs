//! The firmware's object table: every id-returning resource with what it refers to and how many
//! objects refer to it. Destroying an object something still uses fails like firmware does
//! (bad resource state); naming an id that does not exist fails with bad resource.

use std::collections::BTreeMap;

use super::defs::st;
use super::eq::{CqObj, EqObj, QpObj};
use super::fw::Fail;
use super::mkey::MkeyObj;
use super::vq::VqObj;

/// Object kinds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Kind {
    /// User access region.
    Uar,
    /// Protection domain.
    Pd,
    /// Transport domain.
    Td,
    /// Transport interface send.
    Tis,
    /// Registered driver memory.
    Umem,
    /// Memory key (id = key index).
    Mkey,
    /// Receive queue table.
    Rqt,
    /// Transport interface receive.
    Tir,
    /// Flow table.
    Table,
    /// Flow group.
    Group,
    /// Flow table entry (id = table << 32 | index).
    Fte,
    /// VIRTIO_NET_Q.
    Vq,
    /// VIRTIO_Q_COUNTERS.
    Counters,
    /// Event queue (id = eq_number, 8 bits).
    Eq,
    /// Completion queue.
    Cq,
    /// Queue pair.
    Qp,
}

impl Kind {
    /// Name for messages.
    pub fn name(self) -> &'static str {
        match self {
            Kind::Uar => "UAR",
            Kind::Pd => "PD",
            Kind::Td => "transport domain",
            Kind::Tis => "TIS",
            Kind::Umem => "UMEM",
            Kind::Mkey => "memory key",
            Kind::Rqt => "RQT",
            Kind::Tir => "TIR",
            Kind::Table => "flow table",
            Kind::Group => "flow group",
            Kind::Fte => "flow table entry",
            Kind::Vq => "VIRTIO_NET_Q",
            Kind::Counters => "VIRTIO_Q_COUNTERS",
            Kind::Eq => "EQ",
            Kind::Cq => "CQ",
            Kind::Qp => "QP",
        }
    }
}

/// A UMEM.
#[derive(Debug, Clone)]
pub struct UmemObj {
    /// Page addresses (IOVAs).
    pub pages: Vec<u64>,
    /// Page size.
    pub page: u64,
    /// Offset of the memory in the first page.
    pub offset: u64,
    /// Usable bytes.
    pub size: u64,
}

/// An RQT.
#[derive(Debug, Clone)]
pub struct RqtObj {
    /// Receive queue object ids.
    pub list: Vec<u32>,
    /// Capacity.
    pub max: u16,
}

/// A TIR.
#[derive(Debug, Clone)]
pub struct TirObj {
    /// The RQT it spreads over.
    pub rqt: u32,
    /// Toeplitz key.
    pub key: [u8; 40],
    /// Hash function (2 Toeplitz, 0 none).
    pub hash_fn: u8,
    /// Symmetric hashing.
    pub symmetric: bool,
    /// Outer hash field selector.
    pub fields: u32,
}

/// A flow group.
#[derive(Debug, Clone)]
pub struct GroupObj {
    /// Table.
    pub table: u32,
    /// First index.
    pub start: u32,
    /// Last index.
    pub end: u32,
    /// Destination MAC mask.
    pub mask: [u8; 6],
}

/// A flow table entry.
#[derive(Debug, Clone)]
pub struct FteObj {
    /// Group.
    pub group: u32,
    /// Destination MAC value.
    pub dmac: [u8; 6],
    /// Destination TIR.
    pub tir: u32,
}

/// VIRTIO_Q_COUNTERS values.
#[derive(Debug, Clone, Copy, Default)]
pub struct Cnt {
    /// Chains taken.
    pub received: u64,
    /// Chains completed.
    pub completed: u64,
    /// Completion errors.
    pub error_cqes: u32,
    /// Bad descriptors.
    pub bad_desc: u32,
    /// Chains over the limit.
    pub exceed: u32,
    /// Unusable buffers.
    pub invalid: u32,
}

/// What an object holds.
#[derive(Debug)]
pub enum Body {
    /// Nothing beyond its id.
    Plain,
    /// UMEM.
    Umem(UmemObj),
    /// Memory key.
    Mkey(MkeyObj),
    /// RQT.
    Rqt(RqtObj),
    /// TIR.
    Tir(TirObj),
    /// Flow table: log2 size.
    Table(u8),
    /// Flow group.
    Group(GroupObj),
    /// Flow entry.
    Fte(FteObj),
    /// Virtio queue.
    Vq(Box<VqObj>),
    /// Counters.
    Counters(Cnt),
    /// Event queue.
    Eq(EqObj),
    /// Completion queue.
    Cq(CqObj),
    /// Queue pair.
    Qp(QpObj),
}

/// One object.
#[derive(Debug)]
pub struct Obj {
    /// Objects referring to this one.
    pub refs: u32,
    /// Objects this one refers to.
    pub deps: Vec<(Kind, u64)>,
    /// Contents.
    pub body: Body,
}

/// The table.
#[derive(Debug, Default)]
pub struct Store {
    map: BTreeMap<(Kind, u64), Obj>,
    next: u32,
    next_uar: u32,
    next_mkey: u32,
    next_eq: u32,
}

impl Store {
    /// A fresh id for `kind` (24 bits, never 0, unique across kinds except keys, UARs and EQs;
    /// EQ numbers are 8 bits). The caller checks the kind's limit first (the EQ range must
    /// not be full).
    pub fn fresh(&mut self, kind: Kind) -> u32 {
        let (ctr, base, end) = match kind {
            Kind::Uar => (&mut self.next_uar, super::defs::reg::FIRST_UAR, 0xff_ffff),
            // Key index 1 is the null key.
            Kind::Mkey => (&mut self.next_mkey, 2, 0xff_ffff),
            // EQ numbers from 5: a driver assuming 0 is caught.
            Kind::Eq => (&mut self.next_eq, 5, 0xff),
            _ => (&mut self.next, 0x10, 0xff_ffff),
        };
        loop {
            let id = base + (*ctr % (end - base));
            *ctr = ctr.wrapping_add(1);
            if !self.map.contains_key(&(kind, u64::from(id))) {
                return id;
            }
        }
    }

    /// Number of live objects.
    pub fn live(&self) -> usize {
        self.map.len()
    }

    /// Live objects per kind.
    pub fn census(&self) -> BTreeMap<Kind, usize> {
        let mut m = BTreeMap::new();
        for (k, _) in self.map.keys() {
            *m.entry(*k).or_insert(0) += 1;
        }
        m
    }

    /// Forgets everything (teardown).
    pub fn clear(&mut self) {
        self.map.clear();
    }

    /// The object, or bad resource naming it.
    pub fn get(&self, kind: Kind, id: u64) -> Result<&Obj, Fail> {
        self.map.get(&(kind, id)).ok_or_else(|| unknown(kind, id))
    }

    /// Mutable access.
    pub fn get_mut(&mut self, kind: Kind, id: u64) -> Result<&mut Obj, Fail> {
        self.map
            .get_mut(&(kind, id))
            .ok_or_else(|| unknown(kind, id))
    }

    /// Whether it exists.
    pub fn has(&self, kind: Kind, id: u64) -> bool {
        self.map.contains_key(&(kind, id))
    }

    /// Adds an object referring to `deps` (each must exist).
    pub fn insert(
        &mut self,
        kind: Kind,
        id: u64,
        deps: Vec<(Kind, u64)>,
        body: Body,
    ) -> Result<(), Fail> {
        for &(k, d) in &deps {
            self.get(k, d)?;
        }
        for &(k, d) in &deps {
            if let Some(o) = self.map.get_mut(&(k, d)) {
                o.refs += 1;
            }
        }
        self.map.insert(
            (kind, id),
            Obj {
                refs: 0,
                deps,
                body,
            },
        );
        Ok(())
    }

    /// Removes an object nobody refers to, releasing what it referred to.
    pub fn remove(&mut self, kind: Kind, id: u64) -> Result<Obj, Fail> {
        let o = self.get(kind, id)?;
        if o.refs > 0 {
            return Err(Fail::new(
                st::BAD_RES_STATE,
                "object still in use",
                format!(
                    "{} {id:#x} is used by {} other object(s)",
                    kind.name(),
                    o.refs
                ),
            ));
        }
        let o = self
            .map
            .remove(&(kind, id))
            .ok_or_else(|| unknown(kind, id))?;
        for &(k, d) in &o.deps {
            if let Some(x) = self.map.get_mut(&(k, d)) {
                x.refs = x.refs.saturating_sub(1);
            }
        }
        Ok(o)
    }

    /// Replaces object `(kind, id)`'s dependency list (new ones must exist).
    pub fn set_deps(&mut self, kind: Kind, id: u64, deps: Vec<(Kind, u64)>) -> Result<(), Fail> {
        for &(k, d) in &deps {
            self.get(k, d)?;
        }
        let old = std::mem::take(&mut self.get_mut(kind, id)?.deps);
        for &(k, d) in &old {
            if let Some(x) = self.map.get_mut(&(k, d)) {
                x.refs = x.refs.saturating_sub(1);
            }
        }
        for &(k, d) in &deps {
            if let Some(x) = self.map.get_mut(&(k, d)) {
                x.refs += 1;
            }
        }
        self.get_mut(kind, id)?.deps = deps;
        Ok(())
    }

    /// Ids of every object of `kind`.
    pub fn ids(&self, kind: Kind) -> Vec<u64> {
        self.map
            .range((kind, 0)..=(kind, u64::MAX))
            .map(|(&(_, id), _)| id)
            .collect()
    }

    /// Every object of `kind`.
    pub fn iter_kind(&self, kind: Kind) -> impl Iterator<Item = (u64, &Obj)> {
        self.map
            .range((kind, 0)..=(kind, u64::MAX))
            .map(|(&(_, id), o)| (id, o))
    }
}

fn unknown(kind: Kind, id: u64) -> Fail {
    Fail::new(
        st::BAD_RESOURCE,
        "no such object",
        format!("no {} with id {id:#x}", kind.name()),
    )
}

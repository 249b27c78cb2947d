//! The vhost-user net back end's control state machine: one [`Device`] per socket.
//!
//! It handles one front-end message at a time on the control thread and never touches a ring
//! while a poller may: every change to a running ring goes through the ring's [`Handoff`] (close
//! the gate, change or rebuild the runtime, reopen). Pollers (port queues) only ever see a
//! complete runtime ([`VqRun`]) or nothing.

use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use super::VhostError;
use super::handoff::Handoff;
use super::iotlb::{self, Iotlb, MissCell};
use super::msg::{self, Header, Inflight, MemRegion, Req, VringAddr, proto};
use super::net::{LogArea, VqRun, VringSetup};
use super::socket::{Conn, Message};
use crate::vdpa::binding::{Binding, RingView, SocketView};
use crate::virtio::features as vf;
use crate::virtio::{GuestMemory, GuestRegion};

/// Largest ring size accepted.
pub const MAX_RING: u32 = 32768;
/// Device status bit: the driver is ready.
pub const STATUS_DRIVER_OK: u8 = 4;
/// Most queue pairs a device offers.
pub const MAX_QUEUE_PAIRS: u16 = 128;

/// What a net back end offers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NetConfig {
    /// Queue pairs offered (1..=128).
    pub queue_pairs: u16,
    /// Offer the packed ring layout.
    pub packed: bool,
    /// Offer mergeable receive buffers.
    pub mrg_rxbuf: bool,
    /// Offer IN_ORDER.
    pub in_order: bool,
    /// With IN_ORDER negotiated, return runs of completely used chains with one used entry
    /// ([`DeviceQueue::set_used_batching`](crate::virtio::DeviceQueue::set_used_batching)).
    pub in_order_batch: bool,
    /// MTU offered with VIRTIO_NET_F_MTU (68..=65535).
    pub mtu: u16,
    /// Offer HOST_NOTIFIER (vDPA passthrough: the front end maps a doorbell page the back end
    /// hands over with [`Device::set_host_notifier`]).
    pub host_notifier: bool,
    /// Offer VIRTIO_F_ACCESS_PLATFORM (a guest behind a virtual IOMMU): ring and buffer
    /// addresses are then IOVAs, translated through the IOTLB the front end fills
    /// (IOTLB_MSG), with misses asked for on the back-end channel. Opt-in, like DPDK's
    /// `iommu-support`.
    pub iommu: bool,
}

impl Default for NetConfig {
    fn default() -> Self {
        NetConfig {
            queue_pairs: 1,
            packed: true,
            mrg_rxbuf: true,
            in_order: true,
            in_order_batch: false,
            mtu: 1500,
            host_notifier: false,
            iommu: false,
        }
    }
}

impl NetConfig {
    /// The virtio feature bits offered.
    pub fn features(&self) -> u64 {
        let mut f = vf::VERSION_1
            | vf::NOTIFY_ON_EMPTY
            | vf::ANY_LAYOUT
            | vf::RING_INDIRECT_DESC
            | vf::RING_EVENT_IDX
            | vf::NET_CSUM
            | vf::NET_GUEST_CSUM
            | vf::NET_HOST_TSO4
            | vf::NET_HOST_TSO6
            | vf::NET_GUEST_TSO4
            | vf::NET_GUEST_TSO6
            | vf::NET_MTU
            | vf::NET_STATUS
            | vf::NET_CTRL_VQ
            | vf::NET_CTRL_RX
            | vf::NET_GUEST_ANNOUNCE
            | vf::VHOST_F_LOG_ALL
            | vf::VHOST_USER_F_PROTOCOL_FEATURES;
        if self.queue_pairs > 1 {
            f |= vf::NET_MQ;
        }
        if self.packed {
            f |= vf::RING_PACKED;
        }
        if self.mrg_rxbuf {
            f |= vf::NET_MRG_RXBUF;
        }
        if self.in_order {
            f |= vf::IN_ORDER;
        }
        if self.iommu {
            f |= vf::ACCESS_PLATFORM;
        }
        f
    }

    /// The protocol feature bits offered.
    pub fn protocol_features(&self) -> u64 {
        let notifier = if self.host_notifier {
            proto::HOST_NOTIFIER
        } else {
            0
        };
        notifier
            | proto::MQ
            | proto::LOG_SHMFD
            | proto::RARP
            | proto::REPLY_ACK
            | proto::NET_MTU
            | proto::BACKEND_REQ
            | proto::BACKEND_SEND_FD
            | proto::CONFIGURE_MEM_SLOTS
            | proto::STATUS
    }
}

/// State shared between the control thread and the port's queues.
#[derive(Debug)]
pub struct Shared {
    /// One handoff per vring: even = guest receive (our transmit), odd = guest transmit.
    pub vqs: Vec<Handoff<VqRun>>,
    /// Whether a front end is connected and at least one ring pair runs.
    pub link_up: AtomicBool,
    /// Pending RARP: bit 63 set + the MAC in the low 48 bits (SEND_RARP).
    pub rarp: AtomicU64,
    /// Connections accepted so far.
    pub connections: AtomicU64,
    /// Per vring: a translation its poller lacked (ACCESS_PLATFORM), for the control thread.
    pub iotlb_miss: Vec<Arc<MissCell>>,
    /// IOTLB misses sent to the front end so far.
    pub iotlb_misses_sent: AtomicU64,
}

impl Shared {
    /// Shared state for `pairs` queue pairs.
    pub fn new(pairs: u16) -> Arc<Shared> {
        Arc::new(Shared {
            vqs: (0..pairs as usize * 2).map(|_| Handoff::new()).collect(),
            link_up: AtomicBool::new(false),
            rarp: AtomicU64::new(0),
            connections: AtomicU64::new(0),
            iotlb_miss: (0..pairs as usize * 2)
                .map(|_| Arc::new(MissCell::default()))
                .collect(),
            iotlb_misses_sent: AtomicU64::new(0),
        })
    }
}

#[derive(Debug, Default)]
struct Vring {
    num: u16,
    addr: Option<VringAddr>,
    /// Position; None until SET_VRING_BASE (then a fresh ring: 0, packed 0x8000 = wrap counter 1).
    base: Option<u16>,
    kick: Option<OwnedFd>,
    kick_set: bool,
    call: Option<Arc<OwnedFd>>,
    err: Option<OwnedFd>,
    enabled: bool,
}

/// One socket's back-end state.
#[derive(Debug)]
pub struct Device {
    cfg: NetConfig,
    shared: Arc<Shared>,
    acked: u64,
    features_set: bool,
    proto_acked: u64,
    owner: bool,
    mem: GuestMemory,
    regions: Vec<MemRegion>,
    vrings: Vec<Vring>,
    log: Option<Arc<LogArea>>,
    status: u8,
    mtu: u16,
    mtu_set: bool,
    backend: Option<Conn>,
    /// vDPA passthrough: the device runs the rings, this socket only runs the control path.
    vdpa: Option<Binding>,
    /// ACCESS_PLATFORM: the front end's translations and the IOVA view of `mem` they make.
    iotlb: Iotlb,
    view: GuestMemory,
    /// MISSes sent lately ((IOVA, write) → when): the same one goes out once per
    /// [`MISS_RESEND`], not once per tick or per ring rebuild.
    miss_sent: std::collections::HashMap<(u64, bool), std::time::Instant>,
    /// Misses held back by the resend delay, asked again once it passes unless translated
    /// meanwhile: `(vring, iova, write)`.
    miss_deferred: Vec<(usize, u64, bool)>,
}

/// How long before the same IOTLB miss is sent again (the front end may have dropped it).
const MISS_RESEND: std::time::Duration = std::time::Duration::from_millis(200);

/// What the control thread does after a message.
#[derive(Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Keep serving.
    Continue,
    /// Close the connection (the front end asked for a reset that needs it, or a fatal error).
    Close,
}

impl Device {
    /// A fresh device over shared state with `cfg.queue_pairs` pairs.
    pub fn new(cfg: NetConfig, shared: Arc<Shared>) -> Device {
        let n = shared.vqs.len();
        Device {
            cfg,
            shared,
            acked: 0,
            features_set: false,
            proto_acked: 0,
            owner: false,
            mem: GuestMemory::empty(),
            regions: Vec::new(),
            vrings: (0..n).map(|_| Vring::default()).collect(),
            log: None,
            status: 0,
            mtu: cfg.mtu,
            mtu_set: false,
            backend: None,
            vdpa: None,
            iotlb: Iotlb::new(),
            view: GuestMemory::empty(),
            miss_sent: std::collections::HashMap::new(),
            miss_deferred: Vec::new(),
        }
    }

    /// A device whose rings a vDPA device runs (see [`crate::vdpa::binding`]).
    pub fn with_vdpa(cfg: NetConfig, shared: Arc<Shared>, binding: Binding) -> Device {
        let mut d = Device::new(cfg, shared);
        d.vdpa = Some(binding);
        d
    }

    /// The vDPA binding, if the socket has one.
    pub fn vdpa(&self) -> Option<&Binding> {
        self.vdpa.as_ref()
    }

    fn offered_features(&self) -> u64 {
        let f = self.cfg.features();
        self.vdpa.as_ref().map_or(f, |b| b.features(f))
    }

    fn offered_protocol(&self) -> u64 {
        let f = self.cfg.protocol_features();
        self.vdpa.as_ref().map_or(f, |b| b.protocol_features(f))
    }

    fn queue_pairs(&self) -> u16 {
        let n = self.cfg.queue_pairs;
        self.vdpa.as_ref().map_or(n, |b| b.queue_pairs(n))
    }

    /// Negotiated virtio features.
    pub fn features(&self) -> u64 {
        self.acked
    }

    /// Negotiated protocol features.
    pub fn protocol_features(&self) -> u64 {
        self.proto_acked
    }

    /// Stops every ring and forgets the connection's state (disconnect or RESET_OWNER).
    pub fn reset(&mut self) {
        if self.acked & vf::ACCESS_PLATFORM != 0 {
            tracing::info!(
                "IOTLB misses sent: {} ({} translations held)",
                self.shared.iotlb_misses_sent.load(Ordering::Relaxed),
                self.iotlb.len()
            );
        }
        for i in 0..self.vrings.len() {
            self.stop_ring(i);
        }
        let mut vdpa = self.vdpa.take();
        if let Some(b) = &mut vdpa {
            // The channel to the front end is gone with it: no host notifier to withdraw.
            b.stop(&mut |_, _| false);
            b.forget();
        }
        let cfg = self.cfg;
        let shared = Arc::clone(&self.shared);
        *self = Device::new(cfg, shared);
        self.vdpa = vdpa;
        self.shared.link_up.store(false, Ordering::Relaxed);
    }

    /// Handles one message and sends its reply on `conn`. Errors are protocol errors: the caller
    /// logs them and closes the connection.
    pub fn handle(&mut self, conn: &mut Conn, m: Message) -> Result<Outcome, VhostError> {
        let Some(req) = Req::from_u32(m.hdr.request) else {
            return Err(msg::MsgError::UnknownRequest(m.hdr.request).into());
        };
        msg::check_fds(req, m.fds.len())?;
        tracing::debug!(
            request = msg::name(req),
            size = m.payload.len(),
            fds = m.fds.len(),
            "vhost-user message"
        );
        // SET_LOG_BASE always answers (below); that reply is the ack, a second would desync.
        let need_ack = m.hdr.need_reply()
            && self.proto_acked & proto::REPLY_ACK != 0
            && !req.has_reply()
            && req != Req::SetLogBase;
        let res = self.dispatch(conn, req, &m.hdr, &m.payload, m.fds);
        match res {
            Ok(out) => {
                // Before the ack: a front end that got it sees the link state it caused.
                self.update_link();
                if need_ack {
                    self.reply(conn, req, &0u64.to_le_bytes())?;
                }
                // After the reply: the binding may send back-end requests (host notifiers) and
                // wait for their answers, which a front end blocked on our reply would not give.
                self.sync_vdpa();
                Ok(out)
            }
            Err(e) => {
                if need_ack {
                    let _ = self.reply(conn, req, &1u64.to_le_bytes());
                }
                Err(e)
            }
        }
    }

    fn reply(&self, conn: &mut Conn, req: Req, payload: &[u8]) -> Result<(), VhostError> {
        let h = Header {
            request: req as u32,
            flags: msg::FLAG_VERSION | msg::FLAG_REPLY,
            size: payload.len() as u32,
        };
        conn.send(h, payload, &[])?;
        Ok(())
    }

    fn vring_index(&self, req: Req, idx: u64) -> Result<usize, VhostError> {
        let i = idx as usize;
        if i >= self.vrings.len() {
            return Err(VhostError::BadVring {
                req: msg::name(req),
                index: idx,
                count: self.vrings.len(),
            });
        }
        Ok(i)
    }

    fn dispatch(
        &mut self,
        conn: &mut Conn,
        req: Req,
        _hdr: &Header,
        p: &[u8],
        mut fds: Vec<OwnedFd>,
    ) -> Result<Outcome, VhostError> {
        use Req::*;
        match req {
            GetFeatures => self.reply(conn, req, &self.offered_features().to_le_bytes())?,
            SetFeatures => {
                let f = msg::parse_u64(req, p)?;
                let offered = self.offered_features();
                if f & !offered != 0 {
                    return Err(VhostError::Unsupported {
                        req: "SET_FEATURES",
                        what: format!("feature bits {:#x} were not offered", f & !offered),
                    });
                }
                if f & vf::ACCESS_PLATFORM != 0 && f & vf::VHOST_F_LOG_ALL != 0 {
                    return Err(VhostError::Unsupported {
                        req: "SET_FEATURES",
                        what: format!(
                            "features {f:#x}: dirty logging (VHOST_F_LOG_ALL) behind a vIOMMU \
                             (ACCESS_PLATFORM) needs IOVA-to-GPA log translation, which this \
                             back end does not do"
                        ),
                    });
                }
                let was_logging = self.acked & vf::VHOST_F_LOG_ALL != 0;
                let was_iommu = self.acked & vf::ACCESS_PLATFORM != 0;
                self.acked = f;
                if (f & vf::ACCESS_PLATFORM != 0) != was_iommu {
                    if !was_iommu {
                        tracing::info!(
                            "ACCESS_PLATFORM negotiated: addresses are IOVAs, translated through the front end's IOTLB"
                        );
                    }
                    self.rebuild_view();
                    self.refresh_all();
                }
                self.features_set = true;
                if (f & vf::VHOST_F_LOG_ALL != 0) != was_logging {
                    // Logging toggled (live migration start/end): rebuild running rings with it.
                    self.refresh_all();
                }
            }
            SetOwner => self.owner = true,
            ResetOwner => {
                self.reset();
            }
            GetProtocolFeatures => self.reply(conn, req, &self.offered_protocol().to_le_bytes())?,
            SetProtocolFeatures => {
                let f = msg::parse_u64(req, p)?;
                self.proto_acked = f & self.offered_protocol();
            }
            GetQueueNum => self.reply(conn, req, &(self.queue_pairs() as u64).to_le_bytes())?,
            GetMaxMemSlots => self.reply(conn, req, &msg::MAX_MEM_SLOTS.to_le_bytes())?,
            SetMemTable => {
                let regions = msg::parse_mem_table(p, fds.len())?;
                if regions == self.regions {
                    return Ok(Outcome::Continue);
                }
                let mapped = regions
                    .iter()
                    .zip(fds.iter())
                    .map(|(r, fd)| {
                        GuestRegion::map_fd(fd.as_fd(), r.mmap_offset, r.size, r.gpa, r.uva)
                    })
                    .collect::<Result<Vec<_>, _>>()?;
                let mem = GuestMemory::new(mapped)?;
                for r in &regions {
                    tracing::debug!(gpa = r.gpa, size = r.size, uva = r.uva, "memory region");
                }
                self.set_memory(mem, regions);
            }
            AddMemReg => {
                let r = msg::parse_single_region(req, p)?;
                if self.regions.len() as u64 >= msg::MAX_MEM_SLOTS {
                    return Err(VhostError::Unsupported {
                        req: "ADD_MEM_REG",
                        what: format!("more than {} regions", msg::MAX_MEM_SLOTS),
                    });
                }
                let fd = fds.remove(0);
                let new = GuestRegion::map_fd(fd.as_fd(), r.mmap_offset, r.size, r.gpa, r.uva)?;
                let mut all: Vec<GuestRegion> = self.mem.regions().to_vec();
                all.push(new);
                let mem = GuestMemory::new(all)?;
                let mut regions = self.regions.clone();
                regions.push(r);
                self.set_memory(mem, regions);
            }
            RemMemReg => {
                let r = msg::parse_single_region(req, p)?;
                let Some(pos) = self
                    .regions
                    .iter()
                    .position(|x| x.gpa == r.gpa && x.size == r.size && x.uva == r.uva)
                else {
                    return Err(VhostError::Unsupported {
                        req: "REM_MEM_REG",
                        what: format!("no region at gpa {:#x} of {} bytes", r.gpa, r.size),
                    });
                };
                let mut all: Vec<GuestRegion> = self.mem.regions().to_vec();
                let gi = all.iter().position(|g| g.gpa() == r.gpa).unwrap_or(pos);
                all.remove(gi);
                let mut regions = self.regions.clone();
                regions.remove(pos);
                let mem = GuestMemory::new(all)?;
                self.set_memory(mem, regions);
            }
            SetLogBase => {
                let l = msg::parse_log(p)?;
                let area = LogArea::map(fds.remove(0).as_fd(), l.offset, l.size)?;
                self.log = Some(Arc::new(area));
                self.refresh_all();
                // The front end waits for an (empty) reply when LOG_SHMFD is negotiated.
                self.reply(conn, req, &[])?;
            }
            SetLogFd => {
                // Eventfd to signal log syncs; vdpakit logs synchronously and does not need it.
                drop(fds);
            }
            SetVringNum => {
                let s = msg::parse_vring_state(req, p)?;
                let i = self.vring_index(req, s.index as u64)?;
                let packed = self.acked & vf::RING_PACKED != 0;
                if s.num == 0 || s.num > MAX_RING || (!packed && !s.num.is_power_of_two()) {
                    return Err(VhostError::BadRingSize {
                        index: i,
                        size: s.num,
                        packed,
                    });
                }
                self.vrings[i].num = s.num as u16;
                self.refresh(i);
            }
            SetVringAddr => {
                let a = msg::parse_vring_addr(p)?;
                let i = self.vring_index(req, a.index as u64)?;
                self.vrings[i].addr = Some(a);
                self.refresh(i);
            }
            SetVringBase => {
                let s = msg::parse_vring_state(req, p)?;
                let i = self.vring_index(req, s.index as u64)?;
                if s.num > u16::MAX as u32 {
                    return Err(VhostError::Unsupported {
                        req: "SET_VRING_BASE",
                        what: format!("base {} above 65535", s.num),
                    });
                }
                self.vrings[i].base = Some(s.num as u16);
                self.refresh(i);
            }
            GetVringBase => {
                let s = msg::parse_vring_state(req, p)?;
                let i = self.vring_index(req, s.index as u64)?;
                let vdpa_base = self.stop_vdpa().and_then(|b| b.saved_base(i));
                let base = vdpa_base
                    .or(self.stop_ring(i))
                    .or(self.vrings[i].base)
                    .unwrap_or(0);
                let v = &mut self.vrings[i];
                v.base = Some(base);
                v.kick = None;
                v.kick_set = false;
                v.call = None;
                v.enabled = false;
                // The ring is stopped: the link state says so before the front end hears back.
                self.update_link();
                self.reply(
                    conn,
                    req,
                    &msg::encode_vring_state(msg::VringState {
                        index: s.index,
                        num: base as u32,
                    }),
                )?;
            }
            SetVringKick | SetVringCall | SetVringErr => {
                let u = msg::parse_u64(req, p)?;
                let i = self.vring_index(req, u & msg::VRING_IDX_MASK)?;
                let nofd = u & msg::VRING_NOFD != 0;
                if nofd != fds.is_empty() {
                    return Err(VhostError::Unsupported {
                        req: msg::name(req),
                        what: format!("NOFD flag {} with {} fds", nofd, fds.len()),
                    });
                }
                let fd = fds.pop();
                let v = &mut self.vrings[i];
                match req {
                    SetVringKick => {
                        v.kick = fd;
                        v.kick_set = true;
                        // Without PROTOCOL_FEATURES rings start enabled when kicked.
                        if self.acked & vf::VHOST_USER_F_PROTOCOL_FEATURES == 0 {
                            v.enabled = true;
                        }
                    }
                    SetVringCall => v.call = fd.map(Arc::new),
                    _ => v.err = fd,
                }
                self.refresh(i);
            }
            SetVringEnable => {
                let s = msg::parse_vring_state(req, p)?;
                let i = self.vring_index(req, s.index as u64)?;
                if s.num > 1 {
                    return Err(VhostError::Unsupported {
                        req: "SET_VRING_ENABLE",
                        what: format!("state {} (0 or 1)", s.num),
                    });
                }
                self.vrings[i].enabled = s.num == 1;
                self.refresh(i);
            }
            SendRarp => {
                let v = msg::parse_u64(req, p)?;
                let mac = v & 0xffff_ffff_ffff;
                self.shared.rarp.store(mac | (1 << 63), Ordering::Release);
            }
            NetSetMtu => {
                let v = msg::parse_u64(req, p)?;
                if !(68..=65535).contains(&v) {
                    return Err(VhostError::Unsupported {
                        req: "NET_SET_MTU",
                        what: format!("MTU {v} (68..=65535)"),
                    });
                }
                self.mtu = v as u16;
                self.mtu_set = true;
            }
            SetBackendReqFd => {
                let fd = fds.remove(0);
                self.backend = Some(Conn::new(std::os::unix::net::UnixStream::from(fd)));
            }
            IotlbMsg => {
                let m = msg::parse_iotlb(p)?;
                if self.acked & vf::ACCESS_PLATFORM == 0 {
                    return Err(VhostError::Unsupported {
                        req: "IOTLB_MSG",
                        what: format!(
                            "IOTLB type {} without ACCESS_PLATFORM negotiated (offered only with iommu=1)",
                            m.kind
                        ),
                    });
                }
                let op = iotlb::check(&m).map_err(|what| VhostError::Unsupported {
                    req: "IOTLB_MSG",
                    what,
                })?;
                tracing::debug!(?op, "iotlb");
                self.iotlb.apply(op);
                self.rebuild_view();
                // Running rings move to the new view (an INVALIDATE must not leave a poller
                // with a stale translation); stopped ones start if their rings are now mapped.
                self.refresh_all();
            }
            GetConfig => {
                let c = msg::parse_config(req, p)?;
                let space = self.config_space();
                let end = (c.offset as usize)
                    .checked_add(c.size as usize)
                    .filter(|&e| e <= space.len());
                let Some(end) = end else {
                    return Err(VhostError::Unsupported {
                        req: "GET_CONFIG",
                        what: format!(
                            "offset {} size {} beyond the {}-byte config",
                            c.offset,
                            c.size,
                            space.len()
                        ),
                    });
                };
                let out = msg::ConfigMsg {
                    data: space[c.offset as usize..end].to_vec(),
                    ..c
                };
                self.reply(conn, req, &msg::encode_config(&out))?;
            }
            SetConfig => {
                let _ = msg::parse_config(req, p)?;
                return Err(VhostError::Unsupported {
                    req: "SET_CONFIG",
                    what: "the net config space is read-only".into(),
                });
            }
            GetInflightFd | SetInflightFd => {
                let i: Inflight = msg::parse_inflight(req, p)?;
                return Err(VhostError::Unsupported {
                    req: msg::name(req),
                    what: format!(
                        "inflight tracking ({} queues) is for block devices",
                        i.num_queues
                    ),
                });
            }
            SetStatus => {
                let v = msg::parse_u64(req, p)?;
                if v > 0xff {
                    return Err(VhostError::Unsupported {
                        req: "SET_STATUS",
                        what: format!("status {v:#x} (8 bits)"),
                    });
                }
                self.status = v as u8;
                if v == 0 {
                    // A device reset from the driver: stop everything but keep the connection,
                    // and the positions (GET_VRING_BASE still reports how far each ring got).
                    for i in 0..self.vrings.len() {
                        self.stop_ring(i);
                    }
                } else {
                    // DRIVER_OK starts the rings (the driver may not be ready before it).
                    self.refresh_all();
                }
            }
            GetStatus => self.reply(conn, req, &(self.status as u64).to_le_bytes())?,
        }
        Ok(Outcome::Continue)
    }

    /// The virtio-net config space (mac, status, max pairs, mtu).
    fn config_space(&self) -> Vec<u8> {
        if let Some(b) = &self.vdpa {
            return b.config_space();
        }
        let mut c = vec![0u8; 12];
        c[6..8].copy_from_slice(&1u16.to_le_bytes());
        c[8..10].copy_from_slice(&self.cfg.queue_pairs.to_le_bytes());
        c[10..12].copy_from_slice(&self.mtu.to_le_bytes());
        c
    }

    fn set_memory(&mut self, mem: GuestMemory, regions: Vec<MemRegion>) {
        // Stop every ring (keeping its position), swap the memory, restart what was running.
        for i in 0..self.vrings.len() {
            self.stop_ring(i);
        }
        self.mem = mem;
        self.regions = regions;
        self.rebuild_view();
        self.refresh_all();
    }

    fn refresh_all(&mut self) {
        for i in 0..self.vrings.len() {
            self.refresh(i);
        }
    }

    /// Stops ring `i` if it runs, keeping its position as the ring's base for a restart, and
    /// returns that position (GET_VRING_BASE semantics).
    fn stop_ring(&mut self, i: usize) -> Option<u16> {
        let base = {
            let mut g = self.shared.vqs[i].close();
            g.state().take().map(|mut r| {
                r.flush_used();
                r.last_avail()
            })
        };
        if let Some(b) = base {
            self.vrings[i].base = Some(b);
        }
        base
    }

    /// (Re)builds ring `i` when everything it needs is there, and opens its gate.
    fn refresh(&mut self, i: usize) {
        if self.vdpa.is_some() {
            // The device runs the rings; `sync_vdpa` brings it in line after each message.
            return;
        }
        self.stop_ring(i);
        if let Some(cell) = self.shared.iotlb_miss.get(i) {
            // What the stopped run reported lacking may have been mapped and unmapped again
            // since (the guest unmaps a buffer once it is used): the new run reports afresh.
            let _ = cell.take();
            self.miss_deferred.retain(|d| d.0 != i);
        }
        let v = &self.vrings[i];
        // With STATUS negotiated, the device may use buffers only after DRIVER_OK (virtio 1.x
        // §3.1.1): a driver still initialising loses what is written before.
        let driver_ok =
            self.proto_acked & proto::STATUS == 0 || self.status & STATUS_DRIVER_OK != 0;
        let ready = v.addr.is_some()
            && v.kick_set
            && v.enabled
            && self.features_set
            && v.num > 0
            && driver_ok
            && !self.mem.regions().is_empty();
        if !ready {
            return;
        }
        let Some(addr) = v.addr else { return };
        let iommu = self.acked & vf::ACCESS_PLATFORM != 0;
        let setup = VringSetup {
            index: i,
            size: v.num as u32,
            addr,
            base: v.base.unwrap_or(if self.acked & vf::RING_PACKED != 0 {
                0x8000
            } else {
                0
            }),
            features: self.acked,
            call: v.call.clone(),
            log: if self.acked & vf::VHOST_F_LOG_ALL != 0 {
                self.log.clone()
            } else {
                None
            },
            miss: iommu.then(|| Arc::clone(&self.shared.iotlb_miss[i])),
        };
        let mem = if iommu { &self.view } else { &self.mem };
        match VqRun::build(&setup, mem) {
            Ok(mut run) => {
                run.set_used_batching(self.cfg.in_order_batch);
                let mut g = self.shared.vqs[i].close();
                *g.state() = Some(run);
                g.open();
                tracing::debug!(vring = i, "vring running");
            }
            Err(e) if iommu => {
                // Ring addresses are IOVAs the IOTLB may not hold yet: ask for them; the ring
                // starts when the UPDATE comes.
                tracing::debug!("vring {i}: {e}; asking the front end for its translations");
                self.ring_misses(i, &setup);
            }
            Err(e) => {
                tracing::warn!("vring {i}: {e}; the queue stays stopped until it is set up again");
            }
        }
    }

    /// The IOVA view of guest memory the IOTLB makes (empty without ACCESS_PLATFORM).
    fn rebuild_view(&mut self) {
        if self.acked & vf::ACCESS_PLATFORM == 0 {
            self.view = GuestMemory::empty();
            return;
        }
        self.view = match self.iotlb.view(&self.mem) {
            Ok(v) => v,
            Err(e) => {
                // Too fragmented: drop the cache; translations come back through misses.
                tracing::warn!("IOTLB view: {e}; dropping the IOTLB");
                self.iotlb.clear();
                GuestMemory::empty()
            }
        };
    }

    /// Sends a MISS for the first untranslated byte of each of vring `i`'s areas.
    fn ring_misses(&mut self, i: usize, s: &VringSetup) {
        let n = u64::from(s.size);
        let areas = if s.features & vf::RING_PACKED != 0 {
            [
                (s.addr.desc, 16 * n, false),
                (s.addr.avail, 4, false),
                (s.addr.used, 4, true),
            ]
        } else {
            [
                (s.addr.desc, 16 * n, false),
                (s.addr.avail, 6 + 2 * n, false),
                (s.addr.used, 6 + 8 * n, true),
            ]
        };
        for (addr, len, write) in areas {
            if let Some(iova) = self.iotlb.first_unmapped(addr, len) {
                self.send_miss(i, iova, write);
            }
        }
    }

    /// Whether the control thread should tick ([`Device::service_misses`]) while it waits for
    /// messages.
    pub fn iotlb_active(&self) -> bool {
        self.acked & vf::ACCESS_PLATFORM != 0
    }

    /// Sends the front end a MISS for each translation a poller reported lacking.
    pub fn service_misses(&mut self) {
        if !self.iotlb_active() {
            return;
        }
        let perm = |write: bool| {
            if write {
                iotlb::PERM_WO
            } else {
                iotlb::PERM_RO
            }
        };
        let deferred = std::mem::take(&mut self.miss_deferred);
        for (i, iova, write) in deferred {
            if !self.iotlb.allows(iova, 1, perm(write)) {
                self.send_miss(i, iova, write);
            }
        }
        for i in 0..self.vrings.len() {
            let Some((addr, len, write)) = self.shared.iotlb_miss[i].take() else {
                continue;
            };
            if self.iotlb.allows(addr, u64::from(len), perm(write)) {
                // Translated since (the ring runs on the new view already).
                continue;
            }
            // The first byte not mapped, or (mapped without the access needed) the first byte.
            let iova = self
                .iotlb
                .first_unmapped(addr, u64::from(len))
                .unwrap_or(addr);
            self.send_miss(i, iova, write);
        }
    }

    /// Sends IOTLB_MSG MISS for `iova` on the back-end channel. The same one goes at most once
    /// per [`MISS_RESEND`]: a repeat within it is deferred and sent when the delay has passed,
    /// unless a translation came meanwhile. Returns whether it was sent now.
    fn send_miss(&mut self, vring: usize, iova: u64, write: bool) -> bool {
        let now = std::time::Instant::now();
        if self
            .miss_sent
            .get(&(iova, write))
            .is_some_and(|&at| now.duration_since(at) < MISS_RESEND)
        {
            let d = (vring, iova, write);
            if !self.miss_deferred.contains(&d) && self.miss_deferred.len() < 256 {
                self.miss_deferred.push(d);
            }
            return false;
        }
        if self.miss_sent.len() >= 256 {
            self.miss_sent
                .retain(|_, at| now.duration_since(*at) < MISS_RESEND);
        }
        if self.proto_acked & proto::BACKEND_REQ == 0 {
            tracing::warn!(
                "vring {vring}: iova {iova:#x} is not translated and BACKEND_REQ was not negotiated: no way to ask the front end"
            );
            return false;
        }
        let Some(b) = self.backend.as_mut() else {
            return false;
        };
        let payload = msg::encode_iotlb(&msg::IotlbMsg {
            iova,
            size: 0,
            uaddr: 0,
            perm: if write {
                iotlb::PERM_WO
            } else {
                iotlb::PERM_RO
            },
            kind: iotlb::MISS,
        });
        let h = Header {
            request: msg::BackendReq::IotlbMsg as u32,
            flags: msg::FLAG_VERSION,
            size: payload.len() as u32,
        };
        if let Err(e) = b.send(h, &payload, &[]) {
            tracing::warn!("vring {vring}: sending an IOTLB miss for {iova:#x}: {e}");
            return false;
        }
        tracing::debug!(vring, iova, write, "iotlb miss sent");
        self.miss_sent.insert((iova, write), now);
        self.shared
            .iotlb_misses_sent
            .fetch_add(1, Ordering::Relaxed);
        true
    }

    /// Stops a running vDPA device (GET_VRING_BASE), returning the binding to read positions.
    fn stop_vdpa(&mut self) -> Option<&Binding> {
        let mut b = self.vdpa.take()?;
        b.stop(&mut |q, area| self.host_notifier_hook(q, area));
        self.vdpa = Some(b);
        self.vdpa.as_ref()
    }

    fn host_notifier_hook(&mut self, q: u16, area: Option<&crate::pci::NotifyArea>) -> bool {
        let Ok(vring) = u8::try_from(q) else {
            return false;
        };
        let r = match area {
            Some(a) => {
                self.send_host_notifier(vring, Some((a.fd.as_fd(), a.size, a.offset)), false)
            }
            None => self.send_host_notifier(vring, None, false),
        };
        match r {
            Ok(sent) => sent,
            Err(e) => {
                tracing::warn!("vring {q}: host notifier: {e}; kicks are relayed");
                false
            }
        }
    }

    /// Brings an attached vDPA device in line with what the front end has set up.
    fn sync_vdpa(&mut self) {
        let Some(mut b) = self.vdpa.take() else {
            return;
        };
        let driver_ok =
            self.proto_acked & proto::STATUS == 0 || self.status & STATUS_DRIVER_OK != 0;
        let mem = self.mem.clone();
        let log = self.log.clone();
        let calls: Vec<_> = self.vrings.iter().map(|v| v.call.clone()).collect();
        let kicks: Vec<Option<OwnedFd>> = self
            .vrings
            .iter()
            .map(|v| v.kick.as_ref().and_then(|k| k.try_clone().ok()))
            .collect();
        let rings: Vec<RingView<'_>> = self
            .vrings
            .iter()
            .zip(calls)
            .zip(&kicks)
            .map(|((v, call), kick)| RingView {
                num: v.num,
                addr: v.addr.map(|a| (a.desc, a.avail, a.used)),
                base: v.base,
                kick: kick.as_ref().map(|k| k.as_fd()),
                kick_id: v.kick.as_ref().map(|k| k.as_raw_fd()),
                kick_set: v.kick_set,
                call,
                enabled: v.enabled,
            })
            .collect();
        let view = SocketView {
            features_set: self.features_set,
            features: self.acked,
            driver_ok,
            mem: &mem,
            rings,
            log: log.as_deref(),
            mtu: self.mtu_set.then_some(self.mtu),
        };
        let r = b.sync(&view, &mut |q, area| self.host_notifier_hook(q, area));
        drop(view);
        if let Err(e) = r {
            tracing::warn!(
                "vDPA: {e}; the device stays stopped until the front end sets it up again"
            );
        }
        self.vdpa = Some(b);
        self.update_link();
    }

    fn update_link(&self) {
        if let Some(b) = &self.vdpa {
            self.shared.link_up.store(b.is_running(), Ordering::Relaxed);
            return;
        }
        let up = self
            .shared
            .vqs
            .chunks(2)
            .any(|p| p.iter().all(|h| h.is_open()));
        self.shared.link_up.store(up, Ordering::Relaxed);
    }

    /// Sends VRING_HOST_NOTIFIER_MSG for `vring` on the back-end channel. `Some((fd, size,
    /// offset))` asks the front end to map `size` bytes of `fd` at `offset` as that vring's
    /// notification area (vDPA passthrough: the guest's kicks reach the device's doorbell
    /// directly); `None` withdraws it (the front end goes back to the kick eventfd). Needs
    /// HOST_NOTIFIER, BACKEND_REQ and BACKEND_SEND_FD negotiated and a back-end channel; with
    /// REPLY_ACK negotiated the front end's answer is awaited and a refusal is an error. Returns
    /// whether the message was sent (false: not negotiated or no channel).
    pub fn set_host_notifier(
        &mut self,
        vring: u8,
        area: Option<(BorrowedFd<'_>, u64, u64)>,
    ) -> Result<bool, VhostError> {
        self.send_host_notifier(vring, area, true)
    }

    /// [`Device::set_host_notifier`] with the choice of waiting for the ack. The vDPA binding
    /// does not wait: it runs while the front end may be blocked on a reply of its own (QEMU
    /// reads its replies without serving the back-end channel), so waiting could stall both.
    pub fn send_host_notifier(
        &mut self,
        vring: u8,
        area: Option<(BorrowedFd<'_>, u64, u64)>,
        wait_ack: bool,
    ) -> Result<bool, VhostError> {
        let need = proto::HOST_NOTIFIER | proto::BACKEND_REQ | proto::BACKEND_SEND_FD;
        if self.proto_acked & need != need {
            return Ok(false);
        }
        if usize::from(vring) >= self.shared.vqs.len() {
            return Err(VhostError::BadVring {
                req: "VRING_HOST_NOTIFIER",
                index: u64::from(vring),
                count: self.shared.vqs.len(),
            });
        }
        let ack = wait_ack && self.proto_acked & proto::REPLY_ACK != 0;
        let Some(b) = self.backend.as_mut() else {
            return Ok(false);
        };
        let (payload, fds) = match area {
            Some((fd, size, offset)) => {
                (msg::encode_vring_area(vring, false, size, offset), vec![fd])
            }
            None => (msg::encode_vring_area(vring, true, 0, 0), Vec::new()),
        };
        let h = Header {
            request: msg::BackendReq::VringHostNotifier as u32,
            flags: msg::FLAG_VERSION | if ack { msg::FLAG_NEED_REPLY } else { 0 },
            size: payload.len() as u32,
        };
        b.send(h, &payload, &fds)?;
        if ack {
            // Bounded: a front end that cannot answer while it waits for us must not hang the
            // control thread (the ring then keeps its relayed kicks).
            let _ = b
                .stream()
                .set_read_timeout(Some(std::time::Duration::from_secs(5)));
            let r = b.recv();
            let _ = b.stream().set_read_timeout(None);
            let r = r?;
            let status = msg::parse_u64(Req::GetFeatures, &r.payload).unwrap_or(u64::MAX);
            if r.hdr.request != h.request || r.hdr.flags & msg::FLAG_REPLY == 0 || status != 0 {
                return Err(VhostError::Unsupported {
                    req: "VRING_HOST_NOTIFIER",
                    what: format!(
                        "the front end refused vring {vring}'s notification area (reply request {}, status {status:#x})",
                        r.hdr.request
                    ),
                });
            }
        }
        Ok(true)
    }

    /// Sends CONFIG_CHANGE_MSG on the back-end channel, if there is one.
    pub fn notify_config_change(&mut self) -> Result<bool, VhostError> {
        let Some(b) = self.backend.as_mut() else {
            return Ok(false);
        };
        let h = Header {
            request: msg::BackendReq::ConfigChange as u32,
            flags: msg::FLAG_VERSION,
            size: 0,
        };
        b.send(h, &[], &[])?;
        Ok(true)
    }
}

#[cfg(test)]
mod tests {
    use std::os::fd::AsFd;
    use std::os::unix::net::UnixStream;

    use super::*;

    fn device_with_channel(proto_acked: u64) -> (Device, Conn) {
        let mut d = Device::new(NetConfig::default(), Shared::new(1));
        let (ours, theirs) = UnixStream::pair().unwrap();
        d.backend = Some(Conn::new(ours));
        d.proto_acked = proto_acked;
        (d, Conn::new(theirs))
    }

    const NOTIFIER: u64 = proto::HOST_NOTIFIER | proto::BACKEND_REQ | proto::BACKEND_SEND_FD;

    #[test]
    fn host_notifier_is_offered_only_when_configured() {
        assert_eq!(
            NetConfig::default().protocol_features() & proto::HOST_NOTIFIER,
            0
        );
        let cfg = NetConfig {
            host_notifier: true,
            ..NetConfig::default()
        };
        assert_ne!(cfg.protocol_features() & proto::HOST_NOTIFIER, 0);
    }

    #[test]
    fn host_notifier_message_carries_area_and_fd() {
        let (mut d, mut fe) = device_with_channel(NOTIFIER);
        let area = std::fs::File::open("/dev/null").unwrap();
        assert!(
            d.set_host_notifier(1, Some((area.as_fd(), 4096, 0x3000)))
                .unwrap()
        );
        let m = fe.recv().unwrap();
        assert_eq!(m.hdr.request, msg::BackendReq::VringHostNotifier as u32);
        assert_eq!(m.hdr.flags & msg::FLAG_NEED_REPLY, 0);
        assert_eq!(m.payload, msg::encode_vring_area(1, false, 4096, 0x3000));
        assert_eq!(m.fds.len(), 1);

        // Withdrawing: the NOFD flag and no fd.
        assert!(d.set_host_notifier(0, None).unwrap());
        let m = fe.recv().unwrap();
        let u = u64::from_le_bytes(m.payload[..8].try_into().unwrap());
        assert_eq!(u, msg::VRING_NOFD);
        assert!(m.fds.is_empty());

        // A vring the device does not have.
        assert!(matches!(
            d.set_host_notifier(2, None),
            Err(VhostError::BadVring {
                index: 2,
                count: 2,
                ..
            })
        ));
    }

    #[test]
    fn host_notifier_needs_its_protocol_features() {
        let (mut d, _fe) = device_with_channel(proto::BACKEND_REQ | proto::BACKEND_SEND_FD);
        assert!(!d.set_host_notifier(0, None).unwrap());
        let mut d = Device::new(NetConfig::default(), Shared::new(1));
        d.proto_acked = NOTIFIER;
        assert!(
            !d.set_host_notifier(0, None).unwrap(),
            "no back-end channel"
        );
    }

    #[test]
    fn host_notifier_waits_for_the_ack() {
        for (status, ok) in [(0u64, true), (1, false)] {
            let (mut d, mut fe) = device_with_channel(NOTIFIER | proto::REPLY_ACK);
            let t = std::thread::spawn(move || {
                let m = fe.recv().unwrap();
                assert_ne!(m.hdr.flags & msg::FLAG_NEED_REPLY, 0);
                let h = Header {
                    request: m.hdr.request,
                    flags: msg::FLAG_VERSION | msg::FLAG_REPLY,
                    size: 8,
                };
                fe.send(h, &status.to_le_bytes(), &[]).unwrap();
            });
            let r = d.set_host_notifier(0, None);
            t.join().unwrap();
            assert_eq!(r.is_ok(), ok, "status {status}: {r:?}");
        }
    }
}

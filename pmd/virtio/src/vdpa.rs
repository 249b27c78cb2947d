//! The vDPA device over a virtio-PCI function: the guest's rings are programmed into the
//! function as they are (IOVA = guest physical address, mapped by the binding), the function's
//! MSI-X vectors are wired to the guest's call eventfds, and its doorbells are the guest's kicks.
//!
//! [`VpVdpa`] is the generic device (`virtio:pci=BDF`, like Linux's `vp_vdpa`): a plain modern
//! virtio-net function has no register that reads or sets a ring position, so it starts rings
//! only from their initial position and reports no state (live migration then goes through the
//! binding's software relay, which needs no state from the device... but a restart mid-stream
//! cannot continue where the device stopped, exactly as with `vp_vdpa`). The IFC and ENI PMDs
//! wrap it: IFC adds ring state and dirty logging through its live-migration region
//! ([`VqStateHook`]), ENI is the same flow over the legacy layout.

use std::os::fd::OwnedFd;
use std::sync::Arc;

use vdpakit_core::mem::{MemMode, Segment};
use vdpakit_core::pci::{DmaDomain, Doorbell, NotifyArea, PciDevice};
use vdpakit_core::vdpa::{
    DevConf, LogConfig, LogSupport, NetDevConfig, VdpaDevice, VdpaError, VqConfig, VqState, VqStats,
};
use vdpakit_core::vhost::msg::proto;
use vdpakit_core::virtio::features as vf;
use vdpakit_core::virtio::{DriverQueue, GuestMemory, GuestRegion, QueueConfig, ring_layout};
use vdpakit_core::virtio_pci::{ModernTransport, NO_VECTOR, status};

use crate::error::{PmdError, Result};
use crate::irq::{self, IrqMode, IrqPlan};
use crate::transport::{RingAddrs, Transport, read_net_config};

/// Feature bits a vDPA device passes between the guest and the function. Everything else the
/// function may offer (RING_RESET, NOTIFICATION_DATA, SR_IOV, admin queues...) needs the
/// front end to know about the hardware and is hidden.
pub const PASSED_FEATURES: u64 = vf::VERSION_1
    | vf::RING_PACKED
    | vf::IN_ORDER
    | vf::ORDER_PLATFORM
    | vf::RING_EVENT_IDX
    | vf::RING_INDIRECT_DESC
    | vf::ANY_LAYOUT
    | vf::NOTIFY_ON_EMPTY
    | vf::NET_CSUM
    | vf::NET_GUEST_CSUM
    | vf::NET_CTRL_GUEST_OFFLOADS
    | vf::NET_MTU
    | vf::NET_MAC
    | vf::NET_GUEST_TSO4
    | vf::NET_GUEST_TSO6
    | vf::NET_GUEST_ECN
    | vf::NET_GUEST_UFO
    | vf::NET_HOST_TSO4
    | vf::NET_HOST_TSO6
    | vf::NET_HOST_ECN
    | vf::NET_HOST_UFO
    | vf::NET_MRG_RXBUF
    | vf::NET_STATUS
    | vf::NET_CTRL_VQ
    | vf::NET_CTRL_RX
    | vf::NET_CTRL_VLAN
    | vf::NET_GUEST_ANNOUNCE
    | vf::NET_MQ
    | vf::NET_CTRL_MAC_ADDR;

/// Bits the binding manages (never written to a function).
const VHOST_BITS: u64 = vf::VHOST_F_LOG_ALL | vf::VHOST_USER_F_PROTOCOL_FEATURES;

/// IOVA of the PMD's own control ring (below the binding's LOG_IOVA, which it unmaps with
/// everything above it, above any guest memory, inside a 39-bit IOMMU aperture).
pub const CTRL_IOVA: u64 = (1 << 39) - (2 << 20);

/// What distinguishes the PMDs that use [`VpVdpa`].
#[derive(Debug, Clone, Copy)]
pub struct Flavor {
    /// PMD name for messages (`virtio`, `ifc`, `eni`).
    pub pmd: &'static str,
    /// Bits reported to the front end besides the function's own (ENI: VERSION_1, whose
    /// header layout equals legacy + MRG_RXBUF).
    pub add_features: u64,
    /// Bits the front end must negotiate (ENI: MRG_RXBUF).
    pub guest_required: u64,
    /// Whether the function must offer ACCESS_PLATFORM (its DMA goes through the IOMMU, so
    /// IOVA = GPA works). Legacy functions cannot offer it.
    pub need_access_platform: bool,
    /// Whether the DEVICE capability (device configuration) is mandatory.
    pub need_device_cfg: bool,
    /// Queue pairs from `num_queues`: IFC counts `(num_queues - 1) / 2` (one control queue).
    pub pairs_from_queues: bool,
}

impl Flavor {
    /// The generic modern virtio-net flavor.
    pub const VIRTIO: Flavor = Flavor {
        pmd: "virtio",
        add_features: 0,
        guest_required: 0,
        need_access_platform: true,
        need_device_cfg: false,
        pairs_from_queues: false,
    };
}

/// Options from the device spec.
#[derive(Debug, Clone, Copy, Default)]
pub struct VpOptions {
    /// Use at most this many MSI-X vectors (forces the shared layouts; tests).
    pub irq_limit: Option<u16>,
}

/// Ring-state operations a function may have beyond the virtio-PCI registers (IFC's
/// live-migration region).
pub trait VqStateHook {
    /// Writes queue `q`'s position before it is enabled.
    fn set_state(&mut self, tr: &Transport, q: &VqConfig) -> Result<()>;
}

struct NoState<'a>(&'a str, &'a str);

impl VqStateHook for NoState<'_> {
    fn set_state(&mut self, _tr: &Transport, q: &VqConfig) -> Result<()> {
        let initial = |v: u16| v & 0x7fff == 0;
        if initial(q.avail_idx) && initial(q.used_idx) {
            return Ok(());
        }
        Err(PmdError::Config {
            dev: self.0.to_string(),
            what: format!(
                "queue {}: cannot start at avail {:#x} / used {:#x}: a {} function has no register for a ring position (only the initial one)",
                q.index, q.avail_idx, q.used_idx, self.1
            ),
        })
    }
}

#[derive(Debug)]
struct Running {
    features: u64,
    guest_features: u64,
    irq: IrqPlan,
    _ctrl: Option<CtrlRing>,
}

/// The generic virtio-PCI vDPA device.
#[derive(Debug)]
pub struct VpVdpa {
    name: String,
    flavor: Flavor,
    opts: VpOptions,
    tr: Transport,
    dev_features: u64,
    nr_vring: u16,
    max_pairs: u16,
    max_qsize: u16,
    config: NetDevConfig,
    running: Option<Running>,
    warned_disable: bool,
}

impl VpVdpa {
    /// Probes `dev` as a modern function of `flavor` and builds the device (left reset).
    pub fn probe_modern(dev: PciDevice, flavor: Flavor, opts: VpOptions) -> Result<VpVdpa> {
        let tr = ModernTransport::probe(dev)?;
        if flavor.need_device_cfg && tr.regions().3.is_none() {
            return Err(PmdError::Probe {
                dev: tr.pci().name().to_string(),
                what: "no virtio device configuration capability (cfg_type 4), which this PMD requires".into(),
            });
        }
        Self::probe(Transport::Modern(tr), flavor, opts)
    }

    /// Probes a function through `tr`: a bounded reset, the features (VERSION_1 on modern
    /// functions; ACCESS_PLATFORM where the flavor needs it), the queue count and size, an
    /// MSI-X vector written and read back (modern), the virtio-net configuration.
    pub fn probe(tr: Transport, flavor: Flavor, opts: VpOptions) -> Result<VpVdpa> {
        let name = tr.name().to_string();
        let probe_err = |what: String| PmdError::Probe {
            dev: name.clone(),
            what,
        };
        tr.reset()?;
        let f = tr.device_features()?;
        let (reg, missing) = match &tr {
            Transport::Modern(_) => {
                let mut need = vf::VERSION_1;
                if flavor.need_access_platform {
                    need |= vf::ACCESS_PLATFORM;
                }
                (
                    "device_feature (common configuration +0x04, selects 0 and 1)",
                    need & !f,
                )
            }
            Transport::Legacy(_) => ("HOST_FEATURES (legacy BAR0 +0x00)", 0),
        };
        if missing != 0 {
            let mut names = Vec::new();
            if missing & vf::VERSION_1 != 0 {
                names.push("VERSION_1 (bit 32)");
            }
            if missing & vf::ACCESS_PLATFORM != 0 {
                names.push("ACCESS_PLATFORM (bit 33: DMA through the IOMMU, so IOVA = guest physical address works)");
            }
            return Err(probe_err(format!(
                "{reg} reads {f:#x}: {} missing",
                names.join(" and ")
            )));
        }
        let nr_vring = tr.num_queues()?;
        if nr_vring < 2 {
            return Err(probe_err(format!(
                "num_queues reads {nr_vring}: a virtio-net function needs at least 2 queues"
            )));
        }
        let max_qsize = tr.queue_max_size(0)?;
        if max_qsize == 0 {
            return Err(probe_err(
                "queue 0: queue_size reads 0 (not available)".into(),
            ));
        }
        let vectors = tr.pci().msix_vectors();
        if vectors == 0 {
            return Err(probe_err(
                "no MSI-X capability: queue interrupts could not reach the guest".into(),
            ));
        }
        if let Transport::Modern(m) = &tr {
            // A vector written must read back (0xffff back: the device refused it), and so
            // must "no vector".
            let v = u16::from(vectors > 1);
            let r = m.set_queue_vector(0, v);
            m.set_queue_vector(0, NO_VECTOR)?;
            r?;
            let back = m.queue_vector(0)?;
            if back != NO_VECTOR {
                return Err(probe_err(format!(
                    "queue 0: queue_msix_vector (common configuration +0x1a) reads back {back:#06x} after writing 0xffff (no vector)"
                )));
            }
        }
        let cfg = read_net_config(&tr, f)?;
        let max_pairs = if flavor.pairs_from_queues {
            ((nr_vring - 1) / 2).max(1)
        } else {
            cfg.max_pairs.min(nr_vring / 2).max(1)
        };
        tracing::info!(
            "{name}: {} vDPA device: {nr_vring} queues ({max_pairs} pairs) of up to {max_qsize}, {vectors} MSI-X vectors, features {f:#x}",
            flavor.pmd
        );
        Ok(VpVdpa {
            config: NetDevConfig {
                mac: cfg.mac.unwrap_or([0; 6]),
                status: u16::from(cfg.link_up),
                max_queue_pairs: max_pairs,
                mtu: cfg.mtu.unwrap_or(1500),
            },
            name,
            flavor,
            opts,
            tr,
            dev_features: f,
            nr_vring,
            max_pairs,
            max_qsize,
            running: None,
            warned_disable: false,
        })
    }

    /// The function.
    pub fn transport(&self) -> &Transport {
        &self.tr
    }

    /// The function's own feature bits.
    pub fn device_features(&self) -> u64 {
        self.dev_features
    }

    /// Queues the function has.
    pub fn nr_vring(&self) -> u16 {
        self.nr_vring
    }

    /// Features negotiated with the function while it runs.
    pub fn running_features(&self) -> Option<u64> {
        self.running.as_ref().map(|r| r.features)
    }

    /// The interrupt layout in use while running.
    pub fn irq_mode(&self) -> Option<IrqMode> {
        self.running.as_ref().map(|r| r.irq.mode)
    }

    /// Interrupts the shared-vector fan-out relayed (0 with per-queue vectors).
    pub fn fanout_relayed(&self) -> u64 {
        self.running
            .as_ref()
            .and_then(|r| r.irq.fanout.as_ref())
            .map_or(0, |f| f.relayed())
    }

    fn check_qid(&self, qid: u16) -> std::result::Result<(), VdpaError> {
        if qid >= self.nr_vring {
            return Err(VdpaError::BadQueue {
                dev: self.name.clone(),
                qid,
                count: self.nr_vring,
            });
        }
        Ok(())
    }

    fn cfg_err(&self, what: String) -> PmdError {
        PmdError::Config {
            dev: self.name.clone(),
            what,
        }
    }

    /// [`VdpaDevice::configure`] with a ring-state hook (called for every ring after it is
    /// programmed and before it is enabled).
    pub fn configure_with(
        &mut self,
        conf: &DevConf,
        hook: Option<&mut dyn VqStateHook>,
    ) -> Result<()> {
        self.close_quietly();
        let r = self.try_configure(conf, hook);
        if r.is_err() {
            self.close_quietly();
        }
        r
    }

    fn try_configure(&mut self, conf: &DevConf, hook: Option<&mut dyn VqStateHook>) -> Result<()> {
        let pmd = self.flavor.pmd;
        let name = self.name.clone();
        let mut nostate = NoState(&name, pmd);
        let hook: &mut dyn VqStateHook = match hook {
            Some(h) => h,
            None => &mut nostate,
        };
        if conf.features & self.flavor.guest_required != self.flavor.guest_required {
            return Err(self.cfg_err(format!(
                "the front end did not negotiate {:#x}, which a {pmd} function needs (negotiated {:#x})",
                self.flavor.guest_required & !conf.features,
                conf.features
            )));
        }
        for q in &conf.queues {
            if q.index >= self.nr_vring {
                return Err(self.cfg_err(format!(
                    "queue {} does not exist (the function has {})",
                    q.index, self.nr_vring
                )));
            }
            if q.size == 0 || q.size > self.max_qsize {
                return Err(self.cfg_err(format!(
                    "queue {}: ring size {} (the function takes 1..={})",
                    q.index, q.size, self.max_qsize
                )));
            }
        }
        // Features for the function: what the guest negotiated, plus ACCESS_PLATFORM (DMA
        // goes through the IOMMU, where the binding mapped guest memory).
        let mut want = (conf.features & !VHOST_BITS & self.dev_features)
            | (self.dev_features & (vf::ACCESS_PLATFORM | vf::ORDER_PLATFORM));
        let pairs = conf
            .queues
            .iter()
            .filter(|q| q.index % 2 == 0 && q.index < 2 * self.max_pairs)
            .count() as u16;
        let need_ctrl = pairs > 1
            && want & vf::NET_MQ != 0
            && self.dev_features & vf::NET_CTRL_VQ != 0
            && !self.flavor.pairs_from_queues;
        if need_ctrl {
            want |= vf::NET_CTRL_VQ;
        }
        let required = want & (vf::VERSION_1 | vf::RING_PACKED);
        let f = self.tr.negotiate(want, required)?;
        // Interrupts first, then the rings (their vectors are read back).
        let queues: Vec<(u16, Option<Arc<OwnedFd>>)> = conf
            .queues
            .iter()
            .map(|q| (q.index, q.call.clone()))
            .collect();
        let plan = irq::plan(
            &self.name,
            self.tr.pci().msix_vectors(),
            self.opts.irq_limit,
            self.nr_vring,
            &queues,
        )?;
        self.tr.pci().set_msix(&plan.fds)?;
        for q in &conf.queues {
            let r = RingAddrs {
                size: q.size,
                desc: q.desc,
                driver: q.driver,
                device: q.device,
            };
            self.tr.setup_queue(q.index, &r, NO_VECTOR)?;
        }
        if plan.mode != IrqMode::Off {
            self.tr.set_vectors(plan.config, &plan.queues)?;
        }
        for q in &conf.queues {
            hook.set_state(&self.tr, q)?;
            if q.enabled {
                self.tr.enable_queue(q.index, true)?;
            }
        }
        let mut ctrl = if need_ctrl {
            Some(CtrlRing::setup(&self.tr, 2 * self.max_pairs, f)?)
        } else {
            None
        };
        self.tr.driver_ok()?;
        let s = self.tr.status()?;
        if s & status::NEEDS_RESET != 0 || s & status::DRIVER_OK == 0 {
            return Err(PmdError::Device {
                dev: self.name.clone(),
                what: format!(
                    "device_status reads {s:#04x} after DRIVER_OK (NEEDS_RESET set or DRIVER_OK lost)"
                ),
            });
        }
        if let Some(c) = ctrl.as_mut() {
            c.send_pairs(&self.tr, pairs)?;
        }
        tracing::info!(
            "{}: configured {} rings, features {f:#x}, MSI-X {}",
            self.name,
            conf.queues.len(),
            plan.mode.as_str()
        );
        self.running = Some(Running {
            features: f,
            guest_features: conf.features,
            irq: plan,
            _ctrl: ctrl,
        });
        Ok(())
    }

    /// Stops the function: reset (bounded), MSI-X unwired.
    pub fn close_quietly(&mut self) {
        if let Err(e) = self.tr.reset() {
            tracing::warn!("{}: {e}", self.name);
        }
        let _ = self.tr.pci().set_msix(&[]);
        self.tr.vectors_off();
        self.running = None;
    }

    /// The function's doorbell for queue `qid`.
    pub fn bell(&self, qid: u16) -> Result<(Doorbell, u32)> {
        self.tr.doorbell(qid)
    }
}

impl VdpaDevice for VpVdpa {
    fn name(&self) -> &str {
        &self.name
    }

    fn max_queue_pairs(&self) -> u16 {
        self.max_pairs
    }

    fn max_queue_size(&self) -> u16 {
        self.max_qsize
    }

    fn features(&self) -> u64 {
        (self.dev_features | self.flavor.add_features) & PASSED_FEATURES
    }

    fn protocol_features(&self) -> u64 {
        let notifier = if self.tr.notify_area(0).is_some() {
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
            | proto::CONFIG
            | proto::BACKEND_SEND_FD
            | proto::CONFIGURE_MEM_SLOTS
            | proto::STATUS
    }

    fn net_config(&self) -> NetDevConfig {
        self.config
    }

    fn domain(&self) -> &DmaDomain {
        self.tr.pci().domain()
    }

    fn log_support(&self) -> LogSupport {
        LogSupport::None
    }

    fn configure(&mut self, conf: &DevConf) -> std::result::Result<(), VdpaError> {
        let name = self.name.clone();
        self.configure_with(conf, None)
            .map_err(|e| e.into_vdpa(&name))
    }

    fn set_vring_state(&mut self, qid: u16, enable: bool) -> std::result::Result<(), VdpaError> {
        self.check_qid(qid)?;
        if self.running.is_none() {
            return Ok(());
        }
        if !enable && !self.tr.is_legacy() {
            if !self.warned_disable {
                tracing::warn!(
                    "{}: queue {qid} disabled by the front end: a modern virtio function cannot stop one queue, it keeps running (the guest posts nothing to it)",
                    self.name
                );
                self.warned_disable = true;
            }
            return Ok(());
        }
        let name = self.name.clone();
        self.tr
            .enable_queue(qid, enable)
            .map_err(|e| e.into_vdpa(&name))
    }

    fn set_features(
        &mut self,
        features: u64,
        log: Option<LogConfig>,
    ) -> std::result::Result<(), VdpaError> {
        if let Some(cur) = self.running.as_ref().map(|r| r.guest_features)
            && (cur ^ features) & !VHOST_BITS != 0
        {
            return Err(VdpaError::Unsupported {
                dev: self.name.clone(),
                what: format!(
                    "changing features other than VHOST_F_LOG_ALL while running ({cur:#x} -> {features:#x})"
                ),
            });
        }
        if log.is_some() {
            return Err(VdpaError::Unsupported {
                dev: self.name.clone(),
                what: "dirty-page logging by the device".into(),
            });
        }
        Ok(())
    }

    fn vring_state(&mut self, qid: u16) -> std::result::Result<VqState, VdpaError> {
        self.check_qid(qid)?;
        Err(VdpaError::Unsupported {
            dev: self.name.clone(),
            what: format!(
                "reading queue {qid}'s position (a {} function has no such register)",
                self.flavor.pmd
            ),
        })
    }

    fn close(&mut self) -> std::result::Result<(), VdpaError> {
        self.close_quietly();
        Ok(())
    }

    fn doorbell(&self, qid: u16) -> std::result::Result<(Doorbell, u32), VdpaError> {
        self.check_qid(qid)?;
        self.bell(qid).map_err(|e| e.into_vdpa(&self.name))
    }

    fn notify_area(&self, qid: u16) -> Option<NotifyArea> {
        self.tr.notify_area(qid)
    }

    fn stats(&self, qid: u16) -> std::result::Result<VqStats, VdpaError> {
        self.check_qid(qid)?;
        Ok(VqStats {
            iommu_faults: self.domain().faults().0,
            interrupts: self.fanout_relayed(),
            ..VqStats::default()
        })
    }
}

impl Drop for VpVdpa {
    fn drop(&mut self) {
        if self.running.is_some() {
            self.close_quietly();
        }
    }
}

/// The PMD's own control queue on a function whose queue pairs are set through it (a generic
/// virtio-net function starts with one pair): a small ring in vdpakit memory at [`CTRL_IOVA`].
struct CtrlRing {
    domain: DmaDomain,
    len: u64,
    mem: GuestMemory,
    q: DriverQueue,
    bell: Doorbell,
    val: u32,
    buf: u64,
}

impl std::fmt::Debug for CtrlRing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CtrlRing").field("len", &self.len).finish()
    }
}

impl CtrlRing {
    /// Sets up control queue `q` (before DRIVER_OK).
    fn setup(tr: &Transport, q: u16, features: u64) -> Result<CtrlRing> {
        let dev = tr.name().to_string();
        let dev_err = |what: String| PmdError::Device {
            dev: dev.clone(),
            what,
        };
        let size = tr.queue_max_size(q)?;
        if size == 0 {
            return Err(dev_err(format!("control queue {q}: queue_size reads 0")));
        }
        let size = if tr.fixed_queue_size() {
            size
        } else {
            1 << (15 - size.min(64).leading_zeros().min(15))
        };
        let packed = features & vf::RING_PACKED != 0;
        let ev = features & vf::RING_EVENT_IDX != 0;
        let (d, a, u, total) = if tr.is_legacy() {
            vdpakit_core::virtio_pci::legacy_layout(size)
        } else {
            let l = ring_layout(size, packed, ev);
            (l.desc, l.avail, l.used, l.total)
        };
        let buf_off = total.next_multiple_of(4096);
        let len = buf_off + 4096;
        let seg = Segment::new("vdpa-ctrl", len as usize, MemMode::NoHuge).map_err(|e| {
            PmdError::Memory {
                dev: dev.clone(),
                what: "control ring".into(),
                source: Box::new(e),
            }
        })?;
        let region = GuestRegion::from_segment(&seg).rebased(CTRL_IOVA, seg.base() as u64);
        let domain = tr.pci().domain().clone();
        let _ = domain.unmap(CTRL_IOVA, region.size());
        domain.map(CTRL_IOVA, &region)?;
        let len = region.size();
        let mem = GuestMemory::new(vec![region])
            .map_err(|e| dev_err(format!("control ring memory: {e}")))?;
        let qc = QueueConfig {
            size,
            desc: CTRL_IOVA + d,
            avail: CTRL_IOVA + a,
            used: CTRL_IOVA + u,
            addr_kind: Default::default(),
            features,
        };
        let mut dq =
            DriverQueue::new(&qc, &mem).map_err(|e| dev_err(format!("control queue: {e}")))?;
        dq.set_interrupts(false);
        let r = RingAddrs {
            size,
            desc: qc.desc,
            driver: qc.avail,
            device: qc.used,
        };
        tr.setup_queue(q, &r, NO_VECTOR)?;
        tr.enable_queue(q, true)?;
        let (bell, val) = tr.doorbell(q)?;
        Ok(CtrlRing {
            domain,
            len,
            mem,
            q: dq,
            bell,
            val,
            buf: CTRL_IOVA + buf_off,
        })
    }

    /// Sets the pair count (after DRIVER_OK).
    fn send_pairs(&mut self, tr: &Transport, pairs: u16) -> Result<()> {
        crate::port::ctrl_mq(
            tr.name(),
            &mut self.q,
            &self.bell,
            self.val,
            &self.mem,
            self.buf,
            pairs,
        )
    }
}

impl Drop for CtrlRing {
    fn drop(&mut self) {
        let _ = self.domain.unmap(CTRL_IOVA, self.len);
    }
}

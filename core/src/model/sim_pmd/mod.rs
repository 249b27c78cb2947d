//! The sim's PMD: a [`VdpaDevice`] that drives a sim VF only through [`PciDevice`] accessors,
//! with its own copy of the register offsets ([`regs`]).
//!
//! Bring-up (`configure`): reset (STATUS = 0, read back 0), ACKNOWLEDGE | DRIVER, the feature
//! subset written and read back, FEATURES_OK (read back: the device refuses features it does not
//! offer), every queue's registers written, then **all** read back (a register aliased by a
//! wrong offset shows up here), MSI-X vector `q` wired to queue `q`'s call eventfd
//! ([`PciDevice::set_msix`]), the dirty log, the enabled queues, DRIVER_OK, and finally the
//! device's verdict: NEEDS_RESET, a queue that did not start (its IOMMU fault or error
//! counters are quoted), or any register access the device refused on the way is an error.
//!
//! Doorbells: queue `q`'s doorbell is at `QUEUE_NOTIFY_OFF` in BAR 2 (a 16-bit write of `q`);
//! [`VdpaDevice::notify_area`] offers its page (a memfd the engine polls) as a host notifier.

pub mod regs;

use std::os::fd::OwnedFd;
use std::sync::Arc;

use self::regs::{MAGIC, NO_VECTOR, RegMap, SIM_REGS, VERSION, status};
use crate::pci::model::DeviceModel;
use crate::pci::{DmaDomain, Doorbell, NotifyArea, PciDevice};
use crate::vdpa::{
    DevConf, LogConfig, LogSupport, NetDevConfig, VdpaDevice, VdpaError, VqState, VqStats,
};
use crate::vhost::msg::proto;
use crate::virtio::features as vf;

/// Bytes of one doorbell page.
const BELL_PAGE: u64 = 4096;

/// A sim VF driven through its PCI function.
#[derive(Debug)]
pub struct SimVdpa {
    name: String,
    pci: PciDevice,
    map: RegMap,
    queues: u16,
    max_size: u16,
    features: u64,
    config: NetDevConfig,
    notify_off: Vec<u64>,
    /// Driver features of the running configuration.
    running_features: Option<u64>,
    /// The device's refused-access count at the last check.
    bad_seen: u32,
}

impl SimVdpa {
    /// Opens `model` in `domain` and probes it with the sim's register map.
    pub fn open(
        name: &str,
        model: Arc<dyn DeviceModel>,
        domain: &DmaDomain,
    ) -> Result<SimVdpa, VdpaError> {
        SimVdpa::open_with_map(name, model, domain, SIM_REGS)
    }

    /// Like [`SimVdpa::open`] with another register map (tests hand it a wrong one).
    pub fn open_with_map(
        name: &str,
        model: Arc<dyn DeviceModel>,
        domain: &DmaDomain,
        map: RegMap,
    ) -> Result<SimVdpa, VdpaError> {
        let pci = crate::pci::model::open(model, domain)?;
        SimVdpa::probe(name, pci, map)
    }

    /// Probes an open function: identity, reset, features, queues, config space.
    pub fn probe(name: &str, pci: PciDevice, map: RegMap) -> Result<SimVdpa, VdpaError> {
        let dev_err = |what: String| VdpaError::Device {
            dev: name.to_string(),
            what,
        };
        let magic = pci.read32(0, map.magic)?;
        if magic != MAGIC {
            return Err(dev_err(format!(
                "BAR 0 offset {:#x} reads {magic:#x}, not the sim's magic {MAGIC:#x} (not a sim \
                 VF, or a wrong register map)",
                map.magic
            )));
        }
        let version = pci.read32(0, map.version)?;
        if version != VERSION {
            return Err(dev_err(format!(
                "interface version {version} at BAR 0 offset {:#x}: this driver speaks {VERSION}",
                map.version
            )));
        }
        pci.enable_bus_master()?;
        let mut d = SimVdpa {
            name: name.to_string(),
            pci,
            map,
            queues: 0,
            max_size: 0,
            features: 0,
            config: NetDevConfig {
                mac: [0; 6],
                status: 0,
                max_queue_pairs: 0,
                mtu: 0,
            },
            notify_off: Vec::new(),
            running_features: None,
            bad_seen: 0,
        };
        d.bad_seen = d.r32(map.bad_accesses)?;
        d.reset()?;
        d.features = d.pci.read64(0, map.device_features)?;
        let nq = d.r32(map.num_queues)?;
        if nq == 0 || nq % 2 != 0 || nq > 128 {
            return Err(dev_err(format!(
                "NUM_QUEUES at BAR 0 offset {:#x} reads {nq}: expected an even count in 2..=128",
                map.num_queues
            )));
        }
        d.queues = nq as u16;
        let max = d.r32(map.queue_size_max)?;
        if max == 0 || max > 32768 {
            return Err(dev_err(format!(
                "QUEUE_SIZE_MAX at BAR 0 offset {:#x} reads {max}: expected 1..=32768",
                map.queue_size_max
            )));
        }
        d.max_size = max as u16;
        let mut cfg = [0u8; 12];
        for (i, b) in cfg.iter_mut().enumerate() {
            *b = d.pci.read8(0, map.config + i as u64)?;
        }
        let u = |i: usize| u16::from_le_bytes([cfg[i], cfg[i + 1]]);
        d.config = NetDevConfig {
            mac: cfg[..6].try_into().unwrap_or([0; 6]),
            status: u(6),
            max_queue_pairs: u(8),
            mtu: u(10),
        };
        if u32::from(d.config.max_queue_pairs) * 2 != nq {
            return Err(dev_err(format!(
                "config space says {} queue pairs, NUM_QUEUES says {nq} queues",
                d.config.max_queue_pairs
            )));
        }
        for q in 0..d.queues {
            d.select(q)?;
            let off = u64::from(d.r32(map.queue_notify_off)?);
            if off % BELL_PAGE != 0 || off + BELL_PAGE > d.pci.bar_len(map.bell_bar) {
                return Err(dev_err(format!(
                    "queue {q}'s doorbell offset {off:#x} is not a page of BAR {} ({:#x} bytes)",
                    map.bell_bar,
                    d.pci.bar_len(map.bell_bar)
                )));
            }
            d.notify_off.push(off);
        }
        d.check_refused("probe")?;
        Ok(d)
    }

    fn dev_err(&self, what: String) -> VdpaError {
        VdpaError::Device {
            dev: self.name.clone(),
            what,
        }
    }

    fn cfg_err(&self, what: String) -> VdpaError {
        VdpaError::Config {
            dev: self.name.clone(),
            what,
        }
    }

    fn r32(&self, off: u64) -> Result<u32, VdpaError> {
        Ok(self.pci.read32(0, off)?)
    }

    fn w32(&self, off: u64, v: u32) -> Result<(), VdpaError> {
        Ok(self.pci.write32(0, off, v)?)
    }

    fn r64(&self, off: u64) -> Result<u64, VdpaError> {
        Ok(self.pci.read64(0, off)?)
    }

    fn w64(&self, off: u64, v: u64) -> Result<(), VdpaError> {
        Ok(self.pci.write64(0, off, v)?)
    }

    fn select(&self, q: u16) -> Result<(), VdpaError> {
        self.w32(self.map.queue_sel, u32::from(q))?;
        let got = self.r32(self.map.queue_sel)?;
        if got != u32::from(q) {
            return Err(self.dev_err(format!(
                "QUEUE_SEL at BAR 0 offset {:#x} reads {got} after selecting queue {q}",
                self.map.queue_sel
            )));
        }
        Ok(())
    }

    fn check_qid(&self, qid: u16) -> Result<(), VdpaError> {
        if qid >= self.queues {
            return Err(VdpaError::BadQueue {
                dev: self.name.clone(),
                qid,
                count: self.queues,
            });
        }
        Ok(())
    }

    /// Errors if the device refused register accesses since the last check (a wrong offset, a
    /// read-only register, the wrong state).
    fn check_refused(&mut self, during: &str) -> Result<(), VdpaError> {
        let n = self.r32(self.map.bad_accesses)?;
        if n != self.bad_seen {
            let last = self.r32(self.map.last_bad_offset)?;
            let new = n.wrapping_sub(self.bad_seen);
            self.bad_seen = n;
            return Err(self.dev_err(format!(
                "the device refused {new} register access(es) during {during}, the last at BAR 0 offset {last:#x}"
            )));
        }
        Ok(())
    }

    /// STATUS = 0 and wait (bounded) until it reads 0.
    fn reset(&mut self) -> Result<(), VdpaError> {
        self.w32(self.map.status, 0)?;
        for _ in 0..1000 {
            if self.r32(self.map.status)? == 0 {
                self.running_features = None;
                return Ok(());
            }
            std::thread::sleep(std::time::Duration::from_micros(100));
        }
        let s = self.r32(self.map.status)?;
        Err(self.dev_err(format!(
            "reset: STATUS at BAR 0 offset {:#x} still reads {s:#x} after 100 ms",
            self.map.status
        )))
    }

    fn set_status(&self, bits: u32) -> Result<u32, VdpaError> {
        let s = self.r32(self.map.status)? & !status::NEEDS_RESET;
        self.w32(self.map.status, s | bits)?;
        self.r32(self.map.status)
    }

    fn queue_report(&self, q: u16) -> String {
        match self.stats(q) {
            Ok(s) => format!(
                "queue {q}: iommu_faults {}, errors {}",
                s.iommu_faults, s.errors
            ),
            Err(e) => format!("queue {q}: {e}"),
        }
    }

    fn try_configure(&mut self, conf: &DevConf) -> Result<(), VdpaError> {
        let m = self.map;
        self.reset()?;
        self.set_status(status::ACKNOWLEDGE | status::DRIVER)?;
        let want = conf.features & !(vf::VHOST_F_LOG_ALL | vf::VHOST_USER_F_PROTOCOL_FEATURES);
        let offered = self.features & !vf::VHOST_F_LOG_ALL;
        if want & !offered != 0 {
            return Err(self.cfg_err(format!(
                "features {:#x} are not offered by the device (it offers {offered:#x})",
                want & !offered
            )));
        }
        self.w64(m.driver_features, want)?;
        let got = self.r64(m.driver_features)?;
        if got != want {
            return Err(self.dev_err(format!(
                "DRIVER_FEATURES at BAR 0 offset {:#x} reads {got:#x} after writing {want:#x}",
                m.driver_features
            )));
        }
        let s = self.set_status(status::FEATURES_OK)?;
        if s & status::FEATURES_OK == 0 {
            return Err(self.dev_err(format!(
                "the device did not accept features {want:#x} (FEATURES_OK did not stick, STATUS {s:#x})"
            )));
        }
        if conf.log.is_some() && self.log_support() != LogSupport::Hardware {
            return Err(self.cfg_err("dirty logging asked for, the device cannot log".into()));
        }
        let packed = want & vf::RING_PACKED != 0;
        let mut fds: Vec<Option<Arc<OwnedFd>>> = vec![None; usize::from(self.pci.msix_vectors())];
        let mut expect = Vec::new();
        for q in &conf.queues {
            self.check_qid(q.index)?;
            if q.size == 0 || q.size > self.max_size || (!packed && !q.size.is_power_of_two()) {
                return Err(self.cfg_err(format!(
                    "queue {}: ring size {} (accepted: {} up to {})",
                    q.index,
                    q.size,
                    if packed { "1" } else { "a power of two" },
                    self.max_size
                )));
            }
            if q.avail_idx != q.used_idx {
                return Err(self.cfg_err(format!(
                    "queue {}: avail position {:#x} and used position {:#x} differ (the sim \
                     completes every chain it takes; it cannot resume with chains in flight)",
                    q.index, q.avail_idx, q.used_idx
                )));
            }
            let vector = match &q.call {
                Some(fd) => {
                    if let Some(slot) = fds.get_mut(usize::from(q.index)) {
                        *slot = Some(Arc::clone(fd));
                    }
                    u32::from(q.index)
                }
                None => NO_VECTOR,
            };
            self.select(q.index)?;
            let regs32 = [
                (m.queue_size, u32::from(q.size), "QUEUE_SIZE"),
                (
                    m.queue_avail_state,
                    u32::from(q.avail_idx),
                    "QUEUE_AVAIL_STATE",
                ),
                (
                    m.queue_used_state,
                    u32::from(q.used_idx),
                    "QUEUE_USED_STATE",
                ),
                (m.queue_vector, vector, "QUEUE_VECTOR"),
            ];
            let regs64 = [
                (m.queue_desc, q.desc, "QUEUE_DESC"),
                (m.queue_driver, q.driver, "QUEUE_DRIVER"),
                (m.queue_device, q.device, "QUEUE_DEVICE"),
            ];
            for &(off, v, _) in &regs32 {
                self.w32(off, v)?;
            }
            for &(off, v, _) in &regs64 {
                self.w64(off, v)?;
            }
            expect.push((q.index, regs32, regs64));
        }
        // Read everything back only after every write: a register two offsets alias shows the
        // last value written, not the one expected.
        for (qi, regs32, regs64) in &expect {
            self.select(*qi)?;
            for &(off, v, name) in regs32 {
                let got = self.r32(off)?;
                if got != v {
                    return Err(self.dev_err(format!(
                        "queue {qi}: {name} at BAR 0 offset {off:#x} reads {got:#x} after writing {v:#x}"
                    )));
                }
            }
            for &(off, v, name) in regs64 {
                let got = self.r64(off)?;
                if got != v {
                    return Err(self.dev_err(format!(
                        "queue {qi}: {name} at BAR 0 offset {off:#x} reads {got:#x} after writing {v:#x}"
                    )));
                }
            }
        }
        self.pci.set_msix(&fds)?;
        if let Some(l) = conf.log {
            self.w64(m.log_base, l.iova)?;
            self.w64(m.log_size, l.size)?;
        }
        for q in conf.queues.iter().filter(|q| q.enabled) {
            self.select(q.index)?;
            self.w32(m.queue_enable, 1)?;
            let got = self.r32(m.queue_enable)?;
            if got != 1 {
                return Err(self.dev_err(format!(
                    "queue {}: QUEUE_ENABLE at BAR 0 offset {:#x} reads {got:#x} after writing 1",
                    q.index, m.queue_enable
                )));
            }
        }
        self.check_refused("queue set-up")?;
        let s = self.set_status(status::DRIVER_OK)?;
        if s & status::NEEDS_RESET != 0 || s & status::DRIVER_OK == 0 {
            let report: Vec<String> = conf
                .queues
                .iter()
                .map(|q| self.queue_report(q.index))
                .collect();
            return Err(self.dev_err(format!(
                "the device did not start (STATUS {s:#x}): {}",
                report.join("; ")
            )));
        }
        for q in conf.queues.iter().filter(|q| q.enabled) {
            self.select(q.index)?;
            let st = self.r32(m.queue_status)?;
            if st & 1 == 0 {
                return Err(self.dev_err(format!(
                    "queue {} did not start (QUEUE_STATUS {st:#x}): {}",
                    q.index,
                    self.queue_report(q.index)
                )));
            }
        }
        if let Some(mtu) = conf.mtu
            && mtu > self.config.mtu
        {
            tracing::warn!(
                "{}: front end set MTU {mtu}, the device carries {}",
                self.name,
                self.config.mtu
            );
        }
        self.check_refused("configure")?;
        self.running_features = Some(conf.features);
        Ok(())
    }
}

impl VdpaDevice for SimVdpa {
    fn name(&self) -> &str {
        &self.name
    }

    fn max_queue_pairs(&self) -> u16 {
        self.queues / 2
    }

    fn max_queue_size(&self) -> u16 {
        self.max_size
    }

    fn features(&self) -> u64 {
        self.features
    }

    fn protocol_features(&self) -> u64 {
        proto::MQ
            | proto::LOG_SHMFD
            | proto::RARP
            | proto::REPLY_ACK
            | proto::NET_MTU
            | proto::BACKEND_REQ
            | proto::CONFIG
            | proto::BACKEND_SEND_FD
            | proto::HOST_NOTIFIER
            | proto::CONFIGURE_MEM_SLOTS
            | proto::STATUS
    }

    fn net_config(&self) -> NetDevConfig {
        self.config
    }

    fn domain(&self) -> &DmaDomain {
        self.pci.domain()
    }

    fn log_support(&self) -> LogSupport {
        if self.features & vf::VHOST_F_LOG_ALL != 0 {
            LogSupport::Hardware
        } else {
            LogSupport::None
        }
    }

    fn configure(&mut self, conf: &DevConf) -> Result<(), VdpaError> {
        let r = self.try_configure(conf);
        if r.is_err() {
            // Leave the device stopped, its interrupts unwired.
            let _ = self.reset();
            let _ = self.pci.set_msix(&[]);
        }
        r
    }

    fn set_vring_state(&mut self, qid: u16, enable: bool) -> Result<(), VdpaError> {
        self.check_qid(qid)?;
        self.select(qid)?;
        self.w32(self.map.queue_enable, u32::from(enable))?;
        let got = self.r32(self.map.queue_enable)?;
        if got != u32::from(enable) {
            return Err(self.dev_err(format!(
                "queue {qid}: QUEUE_ENABLE reads {got} after writing {}",
                u32::from(enable)
            )));
        }
        if enable && self.running_features.is_some() {
            let st = self.r32(self.map.queue_status)?;
            if st & 1 == 0 {
                return Err(self.dev_err(format!(
                    "queue {qid} did not start (QUEUE_STATUS {st:#x}): {}",
                    self.queue_report(qid)
                )));
            }
        }
        self.check_refused("set_vring_state")
    }

    fn set_features(&mut self, features: u64, log: Option<LogConfig>) -> Result<(), VdpaError> {
        if let Some(cur) = self.running_features
            && (cur ^ features) & !vf::VHOST_F_LOG_ALL != 0
        {
            return Err(VdpaError::Unsupported {
                dev: self.name.clone(),
                what: format!(
                    "changing features other than VHOST_F_LOG_ALL while running ({cur:#x} -> {features:#x})"
                ),
            });
        }
        match log {
            Some(l) if features & vf::VHOST_F_LOG_ALL != 0 => {
                if self.log_support() != LogSupport::Hardware {
                    return Err(
                        self.cfg_err("dirty logging asked for, the device cannot log".into())
                    );
                }
                self.w64(self.map.log_base, l.iova)?;
                self.w64(self.map.log_size, l.size)?;
            }
            _ => self.w64(self.map.log_size, 0)?,
        }
        if self.running_features.is_some() {
            self.running_features = Some(features);
        }
        self.check_refused("set_features")
    }

    /// Reads queue `qid`'s position. A queue that is running (and the device not suspended) is
    /// stopped first, as vhost's GET_VRING_BASE stops a ring, so the position is final.
    fn vring_state(&mut self, qid: u16) -> Result<VqState, VdpaError> {
        self.check_qid(qid)?;
        self.select(qid)?;
        let suspended = self.r32(self.map.suspend)? & 1 != 0;
        if !suspended && self.r32(self.map.queue_enable)? & 1 != 0 {
            self.w32(self.map.queue_enable, 0)?;
        }
        let avail = self.r32(self.map.queue_avail_state)?;
        let used = self.r32(self.map.queue_used_state)?;
        self.check_refused("vring_state")?;
        Ok(VqState {
            avail_idx: avail as u16,
            used_idx: used as u16,
        })
    }

    fn close(&mut self) -> Result<(), VdpaError> {
        let r = self.reset();
        self.pci.set_msix(&[])?;
        r
    }

    fn doorbell(&self, qid: u16) -> Result<(Doorbell, u32), VdpaError> {
        self.check_qid(qid)?;
        let off = self.notify_off[usize::from(qid)];
        Ok((
            self.pci.doorbell(self.map.bell_bar, off, 2)?,
            u32::from(qid),
        ))
    }

    fn notify_area(&self, qid: u16) -> Option<NotifyArea> {
        let off = *self.notify_off.get(usize::from(qid))?;
        self.pci.notify_area(self.map.bell_bar, off, BELL_PAGE)
    }

    fn stats(&self, qid: u16) -> Result<VqStats, VdpaError> {
        self.check_qid(qid)?;
        self.select(qid)?;
        let mut v = [0u64; 7];
        for (i, x) in v.iter_mut().enumerate() {
            *x = self.r64(self.map.q_counters + 8 * i as u64)?;
        }
        Ok(VqStats {
            packets: v[0],
            bytes: v[1],
            errors: v[2],
            dropped: v[3],
            iommu_faults: v[4],
            kicks: v[5],
            interrupts: v[6],
        })
    }

    fn suspend(&mut self) -> Result<(), VdpaError> {
        self.w32(self.map.suspend, 1)?;
        if self.r32(self.map.suspend)? & 1 != 1 {
            return Err(self.dev_err("SUSPEND did not stick".into()));
        }
        self.check_refused("suspend")
    }

    fn resume(&mut self) -> Result<(), VdpaError> {
        self.w32(self.map.suspend, 0)?;
        if self.r32(self.map.suspend)? & 1 != 0 {
            return Err(self.dev_err("SUSPEND still set after resume".into()));
        }
        self.check_refused("resume")
    }
}

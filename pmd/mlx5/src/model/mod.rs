//! A command-accurate model of an mlx5 vDPA function (a ConnectX-6 Dx VF by default), written
//! from the reference facts with its own definitions ([`defs`]), independent of the driver's.
//!
//! What it models:
//! - PCI: vendor/device ids, BAR0, an MSI-X capability; a function-level reset.
//! - The init segment: firmware and command interface revisions, the command queue address and
//!   geometry, the initializing bit (clears after a configurable number of polls, and again after
//!   the queue address is written), the health buffer, and a health counter that advances with
//!   time (it can be frozen, and a health syndrome injected, to test the driver's checks).
//! - The command queue: slot descriptors read by DMA through the domain, input and output
//!   mailbox chains (1 KiB-aligned blocks, block numbers, tokens, signatures when checksum mode is
//!   on), the ownership bit, delivery status, and command status + syndrome in the output.
//! - Firmware ([`fw`]): ENABLE/DISABLE_HCA, ISSI, boot and init pages (written by DMA when given,
//!   returned by MANAGE_PAGES TAKE), HOST_ENDIANNESS, general and virtio emulation capabilities,
//!   INIT/TEARDOWN_HCA, and id-returning resources ([`store`]) that check references: UAR, PD,
//!   transport domain, TIS, UMEM, memory keys (physical, page list, indirect, with a null key;
//!   [`mkey`]), VIRTIO_NET_Q and its counters ([`vq`]), RQT, TIR, flow tables, groups and entries.
//! - The datapath ([`vq`], [`steer`]): a doorbell write (the queue index at the doorbell page)
//!   wakes the engine thread, which runs every ready queue's device side through its key; a
//!   transmitted frame goes to the wire (looped back into receive steering, or out of a port the
//!   test reads), a received frame is steered by destination MAC through a TIR and RQT into a
//!   receive queue. MSI-X interrupts per queue; no interrupts in NO_MSIX mode.
//! - The QP event mode ([`eq`]): EQs, CQs and QPs with their commands and state transitions,
//!   CQEs and EQEs written into rings in DMA memory, UAR doorbells (CQ arm, EQ consumer index),
//!   a queue's notification travelling firmware QP → driver QP receive WQE → CQE → EQE → the
//!   EQ's MSI-X vector.
//!
//! What it leaves out: asynchronous events and the command-completion EQ, asynchronous page
//! requests, event moderation, send queues, checksum and TSO offloads, mergeable receive
//! buffers, dirty bitmap writes, and firmware timing.

mod bits;
mod defs;
mod eq;
mod fw;
mod mkey;
mod steer;
mod store;
mod vq;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering, fence};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, OnceLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use vdpakit_core::pci::model::{DeviceModel, ModelBus};
use vdpakit_core::pci::{DmaDomain, cap_id};
use vdpakit_core::virtio::GuestMemory;

use bits::{be32, be64};
use defs::{reg, wire};
pub use eq::{CqObj, EqObj, Event, QpObj, RingMem, qps};
use fw::Fw;
pub use fw::{Failure, FwStats, Wire, syndrome_of};
pub use mkey::NULL_MKEY;
pub use steer::toeplitz;
pub use store::Kind;
pub use vq::err as queue_error;

/// A deliberately wrong layout field, to prove a mismatch between driver and model fails
/// loudly.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Skew {
    /// The command doorbell listens 4 bytes after where it should.
    CmdDoorbell,
    /// VIRTIO_NET_Q queue_size is read 16 bits later than where it is.
    VqQueueSize,
    /// ALLOC_* return their id at bit 0x40 instead of 0x48.
    AllocId,
    /// Completion EQEs carry the cqn 4 bytes after where they should.
    EqeCqn,
}

/// What the model is and does.
#[derive(Debug, Clone)]
pub struct ModelOptions {
    /// Model name (`mlx5-0`).
    pub name: String,
    /// PCI device id.
    pub device_id: u16,
    /// MAC address (NIC vport permanent address).
    pub mac: [u8; 6],
    /// MTU.
    pub mtu: u16,
    /// max_num_virtio_queues.
    pub max_queues: u32,
    /// MSI-X vectors.
    pub msix_vectors: u16,
    /// event_mode capability bits (bit 0 none, 1 QP, 2 MSI-X).
    pub event_modes: u8,
    /// Packed rings supported.
    pub packed: bool,
    /// device_features_bits_mask.
    pub feature_mask: u16,
    /// SUSPEND → RDY allowed.
    pub freeze_to_rdy: bool,
    /// UMEM a/b parameters.
    pub umem: [(u32, u32); 3],
    /// Boot pages firmware asks for.
    pub boot_pages: u32,
    /// Init pages firmware asks for.
    pub init_pages: u32,
    /// Supported ISSIs (bit n = ISSI n).
    pub issi_mask: u32,
    /// log2 of the longest KLM list.
    pub log_max_klm: u8,
    /// log2 of the largest RQT.
    pub log_max_rqt_size: u8,
    /// vhca_id.
    pub vhca_id: u16,
    /// Polls of the initializing bit before it clears.
    pub init_delay_reads: u32,
    /// log2 of the command queue slots.
    pub log_cmdq_size: u8,
    /// log2 of the slot stride.
    pub log_cmdq_stride: u8,
    /// Check descriptor and mailbox signatures from power-on (checksum mode).
    pub verify_signatures: bool,
    /// Where transmitted frames go.
    pub wire: Wire,
    /// A deliberately wrong field (tests).
    pub skew: Option<Skew>,
}

static NEXT: AtomicU64 = AtomicU64::new(0);

impl Default for ModelOptions {
    fn default() -> ModelOptions {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        ModelOptions {
            name: format!("mlx5-{n}"),
            device_id: 0x101e,
            mac: [0x02, 0x15, 0xb3, 0x00, (n >> 8) as u8, n as u8],
            mtu: 1500,
            max_queues: 16,
            msix_vectors: 17,
            event_modes: 0x7,
            packed: false,
            feature_mask: 0,
            freeze_to_rdy: true,
            umem: [(128, 4096), (64, 4096), (0, 4096)],
            boot_pages: 8,
            init_pages: 24,
            issi_mask: 0b11,
            log_max_klm: 12,
            log_max_rqt_size: 4,
            vhca_id: 1,
            init_delay_reads: 3,
            log_cmdq_size: 5,
            log_cmdq_stride: 6,
            verify_signatures: false,
            wire: Wire::Loop,
            skew: None,
        }
    }
}

#[derive(Debug)]
struct Regs {
    cmdq: u64,
    nic_interface: u8,
    init_left: u32,
    synd: u8,
    ext_synd: u16,
    counter_frozen: Option<u32>,
    hang: bool,
}

#[derive(Debug, Default)]
struct Kick {
    work: bool,
    stop: bool,
}

#[derive(Debug)]
struct Shared {
    fw: Mutex<Fw>,
    regs: Mutex<Regs>,
    kick: Mutex<Kick>,
    cv: Condvar,
    bus: OnceLock<ModelBus>,
    config: Mutex<[u8; 256]>,
    kicks: Vec<AtomicU64>,
    started: Instant,
    engine_alive: AtomicBool,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// The model. Hand it to `core::pci::model::open` as an `Arc<dyn DeviceModel>` and keep a
/// clone to inspect it.
#[derive(Debug)]
pub struct Mlx5Model {
    opts: ModelOptions,
    shared: Arc<Shared>,
    engine: Mutex<Option<JoinHandle<()>>>,
}

const MSIX_CAP: usize = 0x40;
const PCIE_CAP: usize = 0x60;

fn config_space(o: &ModelOptions) -> [u8; 256] {
    let mut c = [0u8; 256];
    let put16 =
        |c: &mut [u8; 256], off: usize, v: u16| c[off..off + 2].copy_from_slice(&v.to_le_bytes());
    put16(&mut c, 0x00, 0x15b3);
    put16(&mut c, 0x02, o.device_id);
    put16(&mut c, 0x06, 1 << 4);
    c[0x08] = 0;
    c[0x0b] = 0x02; // network controller
    c[0x10] = 0x0c; // 64-bit prefetchable memory BAR
    put16(&mut c, 0x2c, 0x15b3);
    put16(&mut c, 0x2e, 0x0020);
    c[0x34] = MSIX_CAP as u8;
    c[MSIX_CAP] = cap_id::MSIX;
    c[MSIX_CAP + 1] = PCIE_CAP as u8;
    put16(
        &mut c,
        MSIX_CAP + 2,
        o.msix_vectors.saturating_sub(1) & 0x7ff,
    );
    // Table and PBA in BAR0 above the init segment pages.
    c[MSIX_CAP + 4..MSIX_CAP + 8].copy_from_slice(&0x2000u32.to_le_bytes());
    c[MSIX_CAP + 8..MSIX_CAP + 12].copy_from_slice(&0x3000u32.to_le_bytes());
    c[PCIE_CAP] = cap_id::EXP;
    c[PCIE_CAP + 1] = 0;
    put16(&mut c, PCIE_CAP + 2, 0x0002);
    c
}

impl Mlx5Model {
    /// A model in its power-on state.
    pub fn new(opts: ModelOptions) -> Arc<Mlx5Model> {
        let kicks = (0..opts.max_queues).map(|_| AtomicU64::new(0)).collect();
        let shared = Arc::new(Shared {
            fw: Mutex::new(Fw::new(opts.clone())),
            regs: Mutex::new(Regs {
                cmdq: 0,
                nic_interface: 0,
                init_left: opts.init_delay_reads,
                synd: 0,
                ext_synd: 0,
                counter_frozen: None,
                hang: false,
            }),
            kick: Mutex::new(Kick::default()),
            cv: Condvar::new(),
            bus: OnceLock::new(),
            config: Mutex::new(config_space(&opts)),
            kicks,
            started: Instant::now(),
            engine_alive: AtomicBool::new(false),
        });
        Arc::new(Mlx5Model {
            opts,
            shared,
            engine: Mutex::new(None),
        })
    }

    /// The options it was made with.
    pub fn options(&self) -> &ModelOptions {
        &self.opts
    }

    /// Live firmware objects plus pages held by firmware (0 after a clean teardown).
    pub fn live_objects(&self) -> usize {
        lock(&self.shared.fw).live()
    }

    /// Live objects per kind.
    pub fn census(&self) -> BTreeMap<Kind, usize> {
        lock(&self.shared.fw).store.census()
    }

    /// Pages held by firmware.
    pub fn firmware_pages(&self) -> usize {
        lock(&self.shared.fw).pages.len()
    }

    /// Counters.
    pub fn stats(&self) -> FwStats {
        lock(&self.shared.fw).stats
    }

    /// The last failed command.
    pub fn last_failure(&self) -> Option<Failure> {
        lock(&self.shared.fw).last_failure.clone()
    }

    /// Whether the function is initialized (between INIT_HCA and TEARDOWN_HCA).
    pub fn is_initialized(&self) -> bool {
        lock(&self.shared.fw).initialized
    }

    /// Doorbells rung for virtio queue `index`.
    pub fn kicks(&self, index: u16) -> u64 {
        self.shared
            .kicks
            .get(usize::from(index))
            .map_or(0, |k| k.load(Ordering::Relaxed))
    }

    /// Feeds a frame into receive steering (as if it came from the wire).
    pub fn inject(&self, frame: Vec<u8>) {
        lock(&self.shared.fw).receive(frame);
        self.wake();
    }

    /// Frames transmitted out of the port so far (with [`Wire::Port`]); takes them.
    pub fn take_tx(&self) -> Vec<Vec<u8>> {
        lock(&self.shared.fw).port_tx.drain(..).collect()
    }

    /// Sets the health syndrome (0: healthy).
    pub fn set_health_syndrome(&self, synd: u8, ext: u16) {
        let mut r = lock(&self.shared.regs);
        r.synd = synd;
        r.ext_synd = ext;
    }

    /// Stops (or restarts) the health counter.
    pub fn freeze_health_counter(&self, frozen: bool) {
        let now = self.counter_now();
        lock(&self.shared.regs).counter_frozen = frozen.then_some(now);
    }

    /// Stops completing commands (firmware hang) or resumes.
    pub fn hang_commands(&self, hang: bool) {
        lock(&self.shared.regs).hang = hang;
    }

    /// State, error type and positions of queue object `id`, if it exists.
    pub fn queue(&self, id: u32) -> Option<(u8, u8, u16, u16)> {
        let fw = lock(&self.shared.fw);
        match &fw.store.get(Kind::Vq, id.into()).ok()?.body {
            store::Body::Vq(v) => {
                let (a, u) = v.positions();
                Some((v.state, v.error_type, a, u))
            }
            _ => None,
        }
    }

    fn counter_now(&self) -> u32 {
        (self.shared.started.elapsed().as_millis() as u32) & 0xff_ffff
    }

    fn wake(&self) {
        lock(&self.shared.kick).work = true;
        self.shared.cv.notify_one();
    }

    fn read_reg(&self, off: u64) -> u32 {
        let mut r = lock(&self.shared.regs);
        match off {
            reg::FW_REV => (7 << 16) | 22,
            reg::CMDIF_REV => (5 << 16) | 1000,
            reg::CMDQ_HI => (r.cmdq >> 32) as u32,
            reg::CMDQ_LO => {
                (r.cmdq as u32 & !0xfff)
                    | (u32::from(r.nic_interface) << 8)
                    | (u32::from(self.opts.log_cmdq_size) << 4)
                    | u32::from(self.opts.log_cmdq_stride)
            }
            reg::INIT_BUSY if r.init_left > 0 => {
                if r.init_left != u32::MAX {
                    r.init_left -= 1;
                }
                1 << 31
            }
            reg::INIT_BUSY => 0,
            reg::HEALTH_FW_VER => (7 << 24) | (22 << 16) | 1000,
            reg::HEALTH_HW_ID => 0x20d,
            reg::HEALTH_SYND_WORD => (u32::from(r.synd) << 16) | u32::from(r.ext_synd),
            reg::HEALTH_CNT => {
                let frozen = r.counter_frozen;
                drop(r);
                frozen.unwrap_or_else(|| self.counter_now())
            }
            _ => 0,
        }
    }

    fn write_reg(&self, off: u64, v: u32) {
        let dbell = match self.opts.skew {
            Some(Skew::CmdDoorbell) => reg::DOORBELL + 4,
            _ => reg::DOORBELL,
        };
        let mut r = lock(&self.shared.regs);
        match off {
            reg::CMDQ_HI => r.cmdq = (r.cmdq & 0xffff_ffff) | (u64::from(v) << 32),
            reg::CMDQ_LO => {
                r.cmdq = (r.cmdq & !0xffff_ffff) | u64::from(v & !0xfff);
                r.nic_interface = ((v >> 8) & 7) as u8;
                // Firmware takes a moment to pick the queue up.
                r.init_left = self.opts.init_delay_reads;
            }
            o if o == dbell => {
                if r.hang || r.nic_interface != 0 {
                    return;
                }
                let base = r.cmdq;
                drop(r);
                self.run_commands(base, v);
            }
            _ => {}
        }
    }

    /// Executes the commands in the slots of `mask`.
    fn run_commands(&self, base: u64, mask: u32) {
        let Some(bus) = self.shared.bus.get() else {
            return;
        };
        let dom = bus.dma.view().1;
        let slots = 1u32 << self.opts.log_cmdq_size;
        for slot in 0..slots.min(32) {
            if mask & (1 << slot) == 0 {
                continue;
            }
            let at = base + (u64::from(slot) << self.opts.log_cmdq_stride);
            self.run_slot(&bus.dma, &dom, at);
        }
    }

    fn run_slot(&self, dma: &DmaDomain, dom: &GuestMemory, at: u64) {
        let mut d = [0u8; wire::D_LEN];
        if dom.read(at, &mut d).is_err() {
            dma.record_fault(at, wire::D_LEN as u64);
            return;
        }
        if d[wire::D_STATUS] & 1 == 0 {
            return;
        }
        fence(Ordering::Acquire);
        let mut fw = lock(&self.shared.fw);
        let status = match self.deliver(&mut fw, dma, dom, &d) {
            Ok((input, outs, outlen)) => {
                let out = fw.execute(&input, outlen);
                drop(fw);
                let mut inline = [0u8; 16];
                inline.copy_from_slice(&out[..16]);
                let mut ok = dom.write(at + wire::D_OUT as u64, &inline).is_ok();
                for (i, &blk) in outs.iter().enumerate() {
                    let from = 16 + i * wire::MB_DATA;
                    let to = (from + wire::MB_DATA).min(out.len());
                    if from < to {
                        ok &= dom.write(blk, &out[from..to]).is_ok();
                    }
                }
                if ok { 0 } else { wire::DS_FW }
            }
            Err(ds) => {
                drop(fw);
                ds
            }
        };
        fence(Ordering::Release);
        if dom
            .write(at + wire::D_STATUS as u64, &[status << 1])
            .is_err()
        {
            dma.record_fault(at, wire::D_LEN as u64);
        }
    }

    /// Checks the descriptor and gathers the input; returns (input, output block addresses,
    /// output length) or a delivery status.
    #[allow(clippy::type_complexity)]
    fn deliver(
        &self,
        fw: &mut Fw,
        dma: &DmaDomain,
        dom: &GuestMemory,
        d: &[u8; wire::D_LEN],
    ) -> Result<(Vec<u8>, Vec<u64>, usize), u8> {
        let csum = fw.cmdif_checksum != 0;
        if d[wire::D_TYPE] != wire::XPORT_PCI {
            return Err(wire::DS_TYPE);
        }
        if csum && d[..wire::D_STATUS].iter().fold(0u8, |a, &b| a ^ b) != 0xff {
            return Err(wire::DS_SIG);
        }
        let token = d[wire::D_TOKEN];
        let inlen = be32(d, wire::D_INLEN) as usize;
        let outlen = be32(d, wire::D_OUTLEN) as usize;
        let n_in = inlen.saturating_sub(16).div_ceil(wire::MB_DATA);
        let n_out = outlen.saturating_sub(16).div_ceil(wire::MB_DATA);
        if n_in > wire::MB_MAX_CHAIN {
            return Err(wire::DS_IN_LEN);
        }
        if n_out > wire::MB_MAX_CHAIN {
            return Err(wire::DS_OUT_LEN);
        }
        let mut input = vec![0u8; inlen];
        let k = inlen.min(16);
        input[..k].copy_from_slice(&d[wire::D_IN..wire::D_IN + k]);
        let walk = |first: u64,
                    n: usize,
                    input_side: bool,
                    data: &mut Option<&mut Vec<u8>>|
         -> Result<Vec<u64>, u8> {
            let (align_ds, len_ds) = if input_side {
                (wire::DS_IN_ALIGN, wire::DS_IN_LEN)
            } else {
                (wire::DS_OUT_ALIGN, wire::DS_OUT_LEN)
            };
            let mut addrs = Vec::with_capacity(n);
            let mut at = first;
            for i in 0..n {
                if at == 0 {
                    return Err(len_ds);
                }
                if at & (wire::MB_ALIGN - 1) != 0 {
                    return Err(align_ds);
                }
                let mut b = vec![0u8; wire::MB_LEN];
                if dom.read(at, &mut b).is_err() {
                    dma.record_fault(at, wire::MB_LEN as u64);
                    return Err(wire::DS_FW);
                }
                if be32(&b, wire::MB_NUM) != i as u32 {
                    return Err(wire::DS_BLOCK);
                }
                if b[wire::MB_TOKEN] != token {
                    return Err(wire::DS_TOKEN);
                }
                if csum {
                    let x = |r: std::ops::Range<usize>| b[r].iter().fold(0u8, |a, &c| a ^ c);
                    if x(wire::MB_DATA..wire::MB_SIG) != 0xff
                        || (input_side && x(0..wire::MB_LEN) != 0xff)
                    {
                        return Err(wire::DS_SIG);
                    }
                }
                if let Some(v) = data.as_mut() {
                    let from = 16 + i * wire::MB_DATA;
                    let to = (from + wire::MB_DATA).min(v.len());
                    v[from..to].copy_from_slice(&b[..to - from]);
                }
                addrs.push(at);
                at = be64(&b, wire::MB_NEXT);
            }
            Ok(addrs)
        };
        walk(be64(d, wire::D_IN_PTR), n_in, true, &mut Some(&mut input))?;
        let outs = walk(be64(d, wire::D_OUT_PTR), n_out, false, &mut None)?;
        Ok((input, outs, outlen.max(16)))
    }

    fn start_engine(&self) {
        if self.shared.engine_alive.swap(true, Ordering::AcqRel) {
            return;
        }
        let shared = Arc::clone(&self.shared);
        let name = format!("{}-engine", self.opts.name);
        let h = std::thread::Builder::new()
            .name(name)
            .spawn(move || engine(shared));
        match h {
            Ok(h) => *lock(&self.engine) = Some(h),
            Err(e) => {
                tracing::error!("{}: cannot start the queue engine: {e}", self.opts.name);
                self.shared.engine_alive.store(false, Ordering::Release);
            }
        }
    }
}

/// The engine thread: a pass over every ready queue whenever a doorbell or frame arrives (and
/// every 20 ms regardless), until the model goes away.
fn engine(shared: Arc<Shared>) {
    let mut irq = shared.bus.get().map(|b| b.irq.sender());
    loop {
        {
            let mut k = lock(&shared.kick);
            if !k.work && !k.stop {
                k = shared
                    .cv
                    .wait_timeout(k, Duration::from_millis(20))
                    .map(|(g, _)| g)
                    .unwrap_or_else(|p| p.into_inner().0);
            }
            if k.stop {
                return;
            }
            k.work = false;
        }
        let more = lock(&shared.fw).run(&mut irq);
        if more {
            lock(&shared.kick).work = true;
        }
    }
}

impl Drop for Mlx5Model {
    fn drop(&mut self) {
        lock(&self.shared.kick).stop = true;
        self.shared.cv.notify_all();
        if let Some(h) = lock(&self.engine).take() {
            let _ = h.join();
        }
    }
}

impl DeviceModel for Mlx5Model {
    fn name(&self) -> &str {
        &self.opts.name
    }

    fn config_read(&self, offset: u16, buf: &mut [u8]) {
        let c = lock(&self.shared.config);
        for (i, b) in buf.iter_mut().enumerate() {
            *b = c.get(usize::from(offset) + i).copied().unwrap_or(0xff);
        }
    }

    fn config_write(&self, offset: u16, buf: &[u8]) {
        let mut c = lock(&self.shared.config);
        for (i, &b) in buf.iter().enumerate() {
            let at = usize::from(offset) + i;
            // Writable: command register, MSI-X message control high byte.
            if (0x04..0x06).contains(&at) || at == MSIX_CAP + 3 {
                c[at] = b;
            }
        }
    }

    fn bar_len(&self, bar: u8) -> u64 {
        if bar == 0 { reg::BAR0_LEN } else { 0 }
    }

    fn bar_read(&self, bar: u8, offset: u64, buf: &mut [u8]) {
        buf.fill(0);
        if bar != 0 || buf.len() != 4 || offset >= 0x2000 {
            return;
        }
        buf.copy_from_slice(&self.read_reg(offset).to_be_bytes());
    }

    fn bar_write(&self, bar: u8, offset: u64, buf: &[u8]) {
        if bar != 0 {
            return;
        }
        if offset == reg::VQ_DOORBELL_PAGE && (buf.len() == 2 || buf.len() == 4) {
            let mut b = [0u8; 4];
            b[..buf.len()].copy_from_slice(buf);
            let q = u32::from_le_bytes(b) & 0xffff;
            if let Some(k) = self.shared.kicks.get(q as usize) {
                k.fetch_add(1, Ordering::Relaxed);
            }
            self.wake();
            return;
        }
        if offset >= u64::from(reg::FIRST_UAR) * 4096 {
            self.uar_write(offset, buf);
            return;
        }
        if buf.len() == 4 && offset < 0x2000 {
            let mut b = [0u8; 4];
            b.copy_from_slice(buf);
            self.write_reg(offset, u32::from_be_bytes(b));
        }
    }

    fn msix_vectors(&self) -> u16 {
        self.opts.msix_vectors
    }

    fn reset(&self) {
        lock(&self.shared.fw).reset();
        let mut r = lock(&self.shared.regs);
        r.cmdq = 0;
        r.nic_interface = 0;
        r.init_left = self.opts.init_delay_reads;
        r.synd = 0;
        r.ext_synd = 0;
        r.hang = false;
        *lock(&self.shared.config) = config_space(&self.opts);
    }

    fn attach(&self, bus: ModelBus) {
        lock(&self.shared.fw).dma = Some(bus.dma.clone());
        let _ = self.shared.bus.set(bus);
        self.start_engine();
    }
}

//! The model's firmware: function state (enabled, ISSI, pages, initialized), capabilities, and
//! the execution of every command it knows, with firmware-style failures (status + syndrome).

use std::sync::Arc;
use std::sync::atomic::AtomicU64;

use vdpakit_core::model::engine::{QueueSetup, VfShared};
use vdpakit_core::pci::DmaDomain;
use vdpakit_core::virtio::GuestMemory;

use super::ModelOptions;
use super::bits::{Fld, be32, be64, put64, rd, wr};
use super::defs::*;
use super::mkey::{self, MkeyObj, NULL_MKEY};
use super::store::{Body, Cnt, FteObj, GroupObj, Kind, RqtObj, Store, TirObj, UmemObj};

/// A failed command: status, a fixed reason (its hash is the syndrome) and details.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fail {
    /// Command status.
    pub status: u8,
    /// The reason (fixed text; the syndrome is derived from it).
    pub reason: &'static str,
    /// Values involved.
    pub detail: String,
}

impl Fail {
    /// A failure.
    pub fn new(status: u8, reason: &'static str, detail: String) -> Fail {
        Fail {
            status,
            reason,
            detail,
        }
    }

    /// The syndrome: a 32-bit FNV-1a hash of the reason, as opaque as firmware's.
    pub fn syndrome(&self) -> u32 {
        syndrome_of(self.reason)
    }
}

/// The syndrome the model returns for a failure reason.
pub fn syndrome_of(reason: &str) -> u32 {
    reason.bytes().fold(0x811c_9dc5u32, |h, b| {
        (h ^ u32::from(b)).wrapping_mul(0x0100_0193)
    })
}

fn bad(reason: &'static str, detail: String) -> Fail {
    Fail::new(st::BAD_PARAM, reason, detail)
}

/// The last failed command, for tests and logs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failure {
    /// Opcode.
    pub opcode: u16,
    /// Status.
    pub status: u8,
    /// Syndrome.
    pub syndrome: u32,
    /// Reason.
    pub reason: &'static str,
    /// Details.
    pub detail: String,
}

/// Counts the model keeps for tests.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FwStats {
    /// Commands executed (any status).
    pub commands: u64,
    /// Commands failed (status ≠ 0).
    pub failed: u64,
    /// Objects still alive when TEARDOWN_HCA arrived (the driver leaked them).
    pub leaked_objects: u64,
    /// Pages still given when DISABLE_HCA arrived.
    pub leaked_pages: u64,
    /// Frames the device transmitted (all queues; the engine's transmit counts).
    pub tx_frames: u64,
    /// Frames delivered into receive rings.
    pub rx_frames: u64,
    /// Received frames no steering rule took.
    pub steer_drops: u64,
    /// Received frames steered to a receive queue that had no buffer for them (or was not
    /// ready): dropped and counted, as the engine does.
    pub rx_drops: u64,
    /// Transmitted frames the wire refused (counted on the transmit queues).
    pub tx_drops: u64,
    /// Transmit chains too short to hold a frame, and ring errors.
    pub bad_frames: u64,
    /// Used-ring publishes that asked for an interrupt (every event mode).
    pub notifies: u64,
    /// CQEs written (QP event mode).
    pub cqes: u64,
    /// EQEs written.
    pub eqes: u64,
    /// MSI-X interrupts raised by EQs.
    pub eq_interrupts: u64,
    /// QP-mode notifications not delivered (QPs not connected or ready, a CQ or EQ overrun,
    /// ring memory not reachable, a QP reset or destroyed with notifications waiting).
    pub events_lost: u64,
    /// Times a notification found no receive WQE and waited.
    pub rnr_waits: u64,
    /// CQEs dropped because the CQ was full.
    pub cq_overruns: u64,
    /// EQEs dropped because the EQ was full.
    pub eq_overruns: u64,
    /// UAR writes naming no object of that UAR page, or of a width or offset with no meaning.
    pub bad_doorbells: u64,
}

/// Where transmitted frames go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Wire {
    /// Back into this function's receive steering (a loopback cable).
    Loop,
    /// Out of the model: [`super::Mlx5Model::take_tx`] collects them, [`super::Mlx5Model::inject`]
    /// feeds receive steering.
    Port,
    /// Function 2k's transmit into function 2k + 1's receive steering and back.
    Cable,
    /// A host TAP interface of this name (function `k > 0` of a device: `NAMEk`).
    Tap(String),
    /// Nowhere: transmitted frames are dropped (counted).
    None,
}

/// Function-level state and the object table.
#[derive(Debug)]
pub struct Fw {
    pub opts: ModelOptions,
    pub dma: Option<DmaDomain>,
    pub enabled: bool,
    pub issi: u16,
    pub initialized: bool,
    pub pages: Vec<u64>,
    pub host_endianness: Option<u8>,
    pub cmdif_checksum: u8,
    pub store: Store,
    pub root: Option<u32>,
    pub stats: FwStats,
    pub last_failure: Option<Failure>,
    /// The engine's view of this function (control state, counters).
    pub vf: Arc<VfShared>,
    /// The engine's control state changed: sync before the command completes.
    pub sync_pending: bool,
    /// The interrupt point's table (event mode per queue).
    pub events: Option<Arc<super::IrqCtx>>,
    /// Frames no steering rule took (counted by the steering function on the engine thread).
    pub steer_drops: Arc<AtomicU64>,
}

impl Fw {
    pub fn new(opts: ModelOptions, vf: Arc<VfShared>) -> Fw {
        let cmdif_checksum = u8::from(opts.verify_signatures);
        Fw {
            opts,
            dma: None,
            enabled: false,
            issi: 0,
            initialized: false,
            pages: Vec::new(),
            host_endianness: None,
            cmdif_checksum,
            store: Store::default(),
            root: None,
            stats: FwStats::default(),
            last_failure: None,
            vf,
            sync_pending: false,
            events: None,
            steer_drops: Arc::new(AtomicU64::new(0)),
        }
    }

    /// Back to the power-on state (function-level reset): every queue stops.
    pub fn reset(&mut self) {
        let dma = self.dma.take();
        let stats = self.stats;
        let events = self.events.take();
        let drops = Arc::clone(&self.steer_drops);
        *self = Fw::new(self.opts.clone(), Arc::clone(&self.vf));
        self.dma = dma;
        self.stats = stats;
        self.events = events;
        self.steer_drops = drops;
        self.stop_all_queues();
        self.install_steering();
    }

    /// Stops every engine queue of the function (the queue objects are gone).
    pub fn stop_all_queues(&mut self) {
        {
            let mut c = self.vf.ctl();
            for q in c.queues.iter_mut() {
                *q = QueueSetup::default();
            }
            c.queue_mem.clear();
            c.queue_log.clear();
        }
        if let Some(ev) = &self.events {
            for e in ev.events.iter() {
                e.store(0, std::sync::atomic::Ordering::Release);
            }
        }
        self.sync_pending = true;
    }

    /// The domain's current memory.
    pub fn domain_view(&self) -> GuestMemory {
        self.dma
            .as_ref()
            .map_or_else(GuestMemory::empty, |d| d.view().1)
    }

    fn pages_wanted(&self) -> u32 {
        self.opts.boot_pages + self.opts.init_pages
    }

    /// Executes one command; the output is `outlen` bytes (status 0) or a failure.
    pub fn execute(&mut self, inp: &[u8], outlen: usize) -> Vec<u8> {
        self.stats.commands += 1;
        let opcode = rd(inp, OPCODE) as u16;
        let mut out = vec![0u8; outlen.max(16)];
        let r = if inp.len() < 16 {
            Err(Fail::new(
                st::BAD_INPUT_LEN,
                "input shorter than the header",
                format!("{} bytes", inp.len()),
            ))
        } else {
            self.dispatch(opcode, inp, &mut out)
        };
        if r.is_ok() {
            use opc::*;
            if opcode == TEARDOWN_HCA {
                self.stop_all_queues();
            }
            // The receive steering the engine applies follows the flow table, TIRs and RQTs.
            if [
                SET_FTE,
                DELETE_FTE,
                SET_FT_ROOT,
                DESTROY_FT,
                CREATE_FG,
                DESTROY_FG,
                CREATE_TIR,
                DESTROY_TIR,
                CREATE_RQT,
                MODIFY_RQT,
                DESTROY_RQT,
                TEARDOWN_HCA,
            ]
            .contains(&opcode)
            {
                self.install_steering();
            }
        }
        if let Err(f) = r {
            self.stats.failed += 1;
            tracing::debug!(
                "model: opcode {opcode:#x} failed: status {:#x}, syndrome {:#010x}: {} ({})",
                f.status,
                f.syndrome(),
                f.reason,
                f.detail
            );
            out.fill(0);
            wr(&mut out, STATUS, u64::from(f.status));
            wr(&mut out, SYNDROME, u64::from(f.syndrome()));
            self.last_failure = Some(Failure {
                opcode,
                status: f.status,
                syndrome: f.syndrome(),
                reason: f.reason,
                detail: f.detail,
            });
        }
        out
    }

    fn need_in(inp: &[u8], n: usize) -> Result<(), Fail> {
        if inp.len() < n {
            return Err(Fail::new(
                st::BAD_INPUT_LEN,
                "input too short for the command",
                format!("{} bytes given, {n} needed", inp.len()),
            ));
        }
        Ok(())
    }

    fn need_out(out: &[u8], n: usize) -> Result<(), Fail> {
        if out.len() < n {
            return Err(Fail::new(
                st::BAD_OUTPUT_LEN,
                "output too short for the command",
                format!("{} bytes of room, {n} needed", out.len()),
            ));
        }
        Ok(())
    }

    fn dispatch(&mut self, opcode: u16, inp: &[u8], out: &mut [u8]) -> Result<(), Fail> {
        if rd(inp, UID) != 0 {
            return Err(bad(
                "user context ids are not supported (umem_uid_0)",
                format!("uid {:#x}", rd(inp, UID)),
            ));
        }
        let boot_ops = [
            opc::QUERY_ISSI,
            opc::SET_ISSI,
            opc::QUERY_PAGES,
            opc::MANAGE_PAGES,
            opc::ACCESS_REG,
            opc::QUERY_HCA_CAP,
            opc::SET_HCA_CAP,
            opc::INIT_HCA,
            opc::DISABLE_HCA,
        ];
        let sys =
            |why: &'static str| Fail::new(st::BAD_SYS_STATE, why, format!("opcode {opcode:#x}"));
        if opcode == opc::ENABLE_HCA {
            if self.enabled {
                return Err(sys("function already enabled"));
            }
        } else if !self.enabled {
            return Err(sys("function not enabled (ENABLE_HCA first)"));
        } else if !self.initialized && !boot_ops.contains(&opcode) {
            if opcode == opc::TEARDOWN_HCA {
                return Err(sys("function not initialized"));
            }
            // Unknown opcodes are still bad opcodes.
            if self.known(opcode) {
                return Err(sys("function not initialized (INIT_HCA first)"));
            }
        } else if self.initialized
            && matches!(
                opcode,
                opc::SET_ISSI | opc::INIT_HCA | opc::SET_HCA_CAP | opc::DISABLE_HCA
            )
        {
            return Err(sys("not allowed after INIT_HCA"));
        }
        match opcode {
            opc::ENABLE_HCA => {
                if rd(inp, FUNC_ID) != 0 {
                    return Err(bad(
                        "only the function itself can be enabled",
                        String::new(),
                    ));
                }
                self.enabled = true;
                Ok(())
            }
            opc::DISABLE_HCA => {
                if !self.pages.is_empty() {
                    tracing::warn!(
                        "model: DISABLE_HCA with {} firmware pages not taken back",
                        self.pages.len()
                    );
                    self.stats.leaked_pages += self.pages.len() as u64;
                    self.pages.clear();
                }
                self.enabled = false;
                self.issi = 0;
                self.host_endianness = None;
                Ok(())
            }
            opc::QUERY_ISSI => {
                Self::need_out(out, ISSI_OUT_BYTES)?;
                wr(out, ISSI_SUPPORTED_DW0, u64::from(self.opts.issi_mask));
                Ok(())
            }
            opc::SET_ISSI => {
                let v = rd(inp, ISSI_CURRENT) as u16;
                if v >= 32 || self.opts.issi_mask & (1 << v) == 0 {
                    return Err(bad("ISSI not supported", format!("ISSI {v}")));
                }
                self.issi = v;
                Ok(())
            }
            opc::QUERY_PAGES => self.query_pages(inp, out),
            opc::MANAGE_PAGES => self.manage_pages(inp, out),
            opc::ACCESS_REG => self.access_reg(inp, out),
            opc::QUERY_HCA_CAP => self.query_cap(inp, out),
            opc::SET_HCA_CAP => self.set_cap(inp),
            opc::INIT_HCA => {
                if (self.pages.len() as u32) < self.pages_wanted() {
                    return Err(Fail::new(
                        st::NO_RESOURCES,
                        "firmware pages missing",
                        format!("{} given, {} needed", self.pages.len(), self.pages_wanted()),
                    ));
                }
                self.initialized = true;
                Ok(())
            }
            opc::TEARDOWN_HCA => {
                let p = rd(inp, TEARDOWN_PROFILE);
                if p != 0 && p != 2 {
                    return Err(bad("unknown teardown profile", format!("profile {p}")));
                }
                let live = self.store.live();
                if live > 0 {
                    tracing::warn!(
                        "model: TEARDOWN_HCA with {live} objects alive: {:?}",
                        self.store.census()
                    );
                    self.stats.leaked_objects += live as u64;
                }
                self.store.clear();
                self.root = None;
                self.initialized = false;
                Ok(())
            }
            opc::QUERY_SPECIAL_CONTEXTS => {
                Self::need_out(out, 0x14)?;
                wr(out, NULL_MKEY_OUT, u64::from(NULL_MKEY));
                Ok(())
            }
            opc::QUERY_NIC_VPORT_CONTEXT => {
                Self::need_out(out, VPORT_OUT_BYTES)?;
                let mut mac = [0u8; 8];
                mac[2..].copy_from_slice(&self.opts.mac);
                wr(out, VPORT_PERM_ADDR, u64::from_be_bytes(mac));
                wr(out, VPORT_MTU, u64::from(self.opts.mtu) + 22);
                Ok(())
            }
            opc::ALLOC_PD => self.alloc_plain(Kind::Pd, out),
            opc::DEALLOC_PD => self.free(Kind::Pd, rd(inp, ID24)),
            opc::ALLOC_TD => self.alloc_plain(Kind::Td, out),
            opc::DEALLOC_TD => self.free(Kind::Td, rd(inp, ID24)),
            opc::ALLOC_UAR => {
                let limit = (reg::BAR0_LEN / 4096) as usize - reg::FIRST_UAR as usize;
                if self.store.ids(Kind::Uar).len() >= limit {
                    return Err(Fail::new(st::LIMITS, "no UAR pages left", String::new()));
                }
                self.alloc_plain(Kind::Uar, out)
            }
            opc::DEALLOC_UAR => self.free(Kind::Uar, rd(inp, ID24)),
            opc::CREATE_TIS => {
                Self::need_in(inp, 0x48)?;
                let td = rd(inp, TIS_TD);
                let id = self.store.fresh(Kind::Tis);
                self.store
                    .insert(Kind::Tis, id.into(), vec![(Kind::Td, td)], Body::Plain)?;
                wr(out, ID24, id.into());
                Ok(())
            }
            opc::DESTROY_TIS => self.free(Kind::Tis, rd(inp, ID24)),
            opc::CREATE_UMEM => self.create_umem(inp, out),
            opc::DESTROY_UMEM => self.free(Kind::Umem, rd(inp, ID24)),
            opc::CREATE_MKEY => self.create_mkey(inp, out),
            opc::DESTROY_MKEY => self.free(Kind::Mkey, rd(inp, ID24)),
            opc::CREATE_OBJ | opc::MODIFY_OBJ | opc::QUERY_OBJ | opc::DESTROY_OBJ => {
                self.general_object(opcode, inp, out)
            }
            opc::CREATE_RQT => self.create_rqt(inp, out),
            opc::MODIFY_RQT => self.modify_rqt(inp),
            opc::DESTROY_RQT => self.free(Kind::Rqt, rd(inp, ID24)),
            opc::CREATE_TIR => self.create_tir(inp, out),
            opc::DESTROY_TIR => self.free(Kind::Tir, rd(inp, ID24)),
            opc::CREATE_FT => self.create_ft(inp, out),
            opc::DESTROY_FT => self.destroy_ft(inp),
            opc::SET_FT_ROOT => self.set_root(inp),
            opc::CREATE_FG => self.create_fg(inp, out),
            opc::DESTROY_FG => self.destroy_fg(inp),
            opc::SET_FTE => self.set_fte(inp),
            opc::DELETE_FTE => self.delete_fte(inp),
            o if super::eq::is_event_op(o) => self.event_command(o, inp, out),
            _ => Err(Fail::new(
                st::BAD_OP,
                "unknown opcode",
                format!("opcode {opcode:#x}"),
            )),
        }
    }

    fn known(&self, opcode: u16) -> bool {
        use opc::*;
        [
            QUERY_HCA_CAP,
            INIT_HCA,
            TEARDOWN_HCA,
            ENABLE_HCA,
            DISABLE_HCA,
            QUERY_PAGES,
            MANAGE_PAGES,
            SET_HCA_CAP,
            QUERY_ISSI,
            SET_ISSI,
            CREATE_MKEY,
            DESTROY_MKEY,
            QUERY_SPECIAL_CONTEXTS,
            QUERY_NIC_VPORT_CONTEXT,
            ALLOC_PD,
            DEALLOC_PD,
            ALLOC_UAR,
            DEALLOC_UAR,
            ACCESS_REG,
            ALLOC_TD,
            DEALLOC_TD,
            CREATE_TIR,
            DESTROY_TIR,
            CREATE_TIS,
            DESTROY_TIS,
            CREATE_RQT,
            MODIFY_RQT,
            DESTROY_RQT,
            SET_FT_ROOT,
            CREATE_FT,
            DESTROY_FT,
            CREATE_FG,
            DESTROY_FG,
            SET_FTE,
            DELETE_FTE,
            CREATE_OBJ,
            MODIFY_OBJ,
            QUERY_OBJ,
            DESTROY_OBJ,
            CREATE_UMEM,
            DESTROY_UMEM,
        ]
        .contains(&opcode)
            || super::eq::is_event_op(opcode)
    }

    fn alloc_plain(&mut self, kind: Kind, out: &mut [u8]) -> Result<(), Fail> {
        let id = self.store.fresh(kind);
        self.store
            .insert(kind, id.into(), Vec::new(), Body::Plain)?;
        let at = match self.opts.skew {
            Some(super::Skew::AllocId) => Fld(0x40, 24),
            _ => ID24,
        };
        wr(out, at, id.into());
        Ok(())
    }

    fn free(&mut self, kind: Kind, id: u64) -> Result<(), Fail> {
        self.store.remove(kind, id).map(|_| ())
    }

    fn query_pages(&mut self, inp: &[u8], out: &mut [u8]) -> Result<(), Fail> {
        let held = self.pages.len() as u32;
        let n = match rd(inp, OP_MOD) {
            1 => self.opts.boot_pages.saturating_sub(held),
            2 => self
                .pages_wanted()
                .saturating_sub(held.max(self.opts.boot_pages)),
            3 => 0,
            m => return Err(bad("unknown QUERY_PAGES op_mod", format!("op_mod {m}"))),
        };
        wr(out, PAGES_FUNC, 0);
        wr(out, PAGES_NUM, u64::from(n));
        Ok(())
    }

    fn manage_pages(&mut self, inp: &[u8], out: &mut [u8]) -> Result<(), Fail> {
        let n = rd(inp, MANAGE_IN_NUM) as usize;
        match rd(inp, OP_MOD) {
            1 => {
                Self::need_in(inp, MANAGE_PAS_BYTE + 8 * n)?;
                let view = self.domain_view();
                let mut new = Vec::with_capacity(n);
                for i in 0..n {
                    let a = be64(inp, MANAGE_PAS_BYTE + 8 * i);
                    if a & 0xfff != 0 {
                        return Err(bad("page address not 4 KiB aligned", format!("{a:#x}")));
                    }
                    if self.pages.contains(&a) || new.contains(&a) {
                        return Err(bad("page given twice", format!("{a:#x}")));
                    }
                    // Firmware writes its pages: the first touch must reach memory.
                    if view.write(a, b"mlx5-model-page\0").is_err() {
                        if let Some(d) = &self.dma {
                            d.record_fault(a, 4096);
                        }
                        return Err(bad("page not reachable by DMA", format!("{a:#x}")));
                    }
                    new.push(a);
                }
                self.pages.extend(new);
                Ok(())
            }
            2 => {
                Self::need_out(out, MANAGE_PAS_BYTE + 8 * n)?;
                let keep = if self.initialized {
                    self.pages_wanted() as usize
                } else {
                    0
                };
                let give = n.min(self.pages.len().saturating_sub(keep));
                for i in 0..give {
                    let a = self.pages.pop().unwrap_or(0);
                    put64(out, MANAGE_PAS_BYTE + 8 * i, a);
                }
                wr(out, MANAGE_OUT_NUM, give as u64);
                Ok(())
            }
            m => Err(bad("unknown MANAGE_PAGES op_mod", format!("op_mod {m}"))),
        }
    }

    fn access_reg(&mut self, inp: &[u8], out: &mut [u8]) -> Result<(), Fail> {
        Self::need_in(inp, REG_DATA_BYTE + 16)?;
        let id = rd(inp, REG_ID) as u16;
        if id != REG_HOST_ENDIANNESS {
            return Err(bad("register not supported", format!("register {id:#x}")));
        }
        match rd(inp, OP_MOD) {
            0 => {
                let v = inp[REG_DATA_BYTE];
                if v != 0 && v != 0x80 {
                    return Err(bad("bad host endianness value", format!("{v:#x}")));
                }
                self.host_endianness = Some(v);
                Ok(())
            }
            1 => {
                Self::need_out(out, REG_DATA_BYTE + 16)?;
                out[REG_DATA_BYTE] = self.host_endianness.unwrap_or(0);
                Ok(())
            }
            m => Err(bad("unknown ACCESS_REG op_mod", format!("op_mod {m}"))),
        }
    }

    fn query_cap(&mut self, inp: &[u8], out: &mut [u8]) -> Result<(), Fail> {
        Self::need_out(out, CAP_BYTES)?;
        let m = rd(inp, OP_MOD) as u16;
        let (kind, cur) = (m >> 1, m & 1 == 1);
        let o = &self.opts;
        match kind {
            CAP_GENERAL => {
                wr(out, gcap::VHCA_ID, u64::from(o.vhca_id));
                wr(out, gcap::LOG_MAX_CQ_SZ, super::eq::LOG_MAX_CQ_SZ.into());
                wr(out, gcap::LOG_MAX_EQ_SZ, super::eq::LOG_MAX_EQ_SZ.into());
                wr(out, ecap::LOG_MAX_QP_SZ, super::eq::LOG_MAX_QP_SZ.into());
                wr(out, ecap::LOG_MAX_QP, 16);
                wr(out, ecap::LOG_MAX_CQ, 16);
                wr(out, gcap::LOG_MAX_MKEY, 20);
                wr(out, gcap::LOG_MAX_EQ, super::eq::LOG_MAX_EQ.into());
                wr(out, gcap::FAST_TEARDOWN, 1);
                wr(out, gcap::LOG_MAX_KLM, u64::from(o.log_max_klm));
                wr(out, gcap::NIC_FLOW_TABLE, 1);
                wr(out, gcap::PORT_TYPE, 1);
                wr(
                    out,
                    gcap::CMDIF_CSUM,
                    if cur { self.cmdif_checksum.into() } else { 3 },
                );
                wr(out, gcap::UAR_4K, 1);
                wr(out, gcap::UMEM_UID_0, 1);
                wr(out, gcap::LOG_PG_SZ, 12);
                wr(out, gcap::LOG_MAX_TD, 10);
                wr(out, gcap::LOG_MAX_PD, 16);
                wr(out, gcap::LOG_MAX_TIR, 10);
                wr(out, gcap::LOG_MAX_TIS, 10);
                wr(out, gcap::LOG_MAX_RQT, 10);
                wr(out, gcap::LOG_MAX_RQT_SZ, u64::from(o.log_max_rqt_size));
                let types = (1u64 << OT_VIRTIO_NET_Q) | (1u64 << OT_VIRTIO_Q_COUNTERS);
                wr(out, gcap::OBJ_TYPES, types);
                wr(out, gcap::MAX_NUM_EQS, 1 << super::eq::LOG_MAX_EQ);
                wr(out, gcap::LOG_UAR_PG_SZ, 0);
                Ok(())
            }
            CAP_VDPA => {
                wr(out, vcap::ETH_FRAME, 1);
                wr(out, vcap::VERSION_1, 1);
                wr(out, vcap::FEATURE_MASK, u64::from(o.feature_mask));
                wr(out, vcap::EVENT_MODES, u64::from(o.event_modes));
                wr(out, vcap::Q_TYPES, if o.packed { 3 } else { 1 });
                wr(out, vcap::MAX_TUNNEL_DESC, 16);
                wr(out, vcap::LOG_DB_STRIDE, 2);
                wr(out, vcap::MODIFY_EXT, u64::from(o.modify_ext));
                wr(out, vcap::ADDR_MODIFY, 1);
                wr(out, vcap::INDEX_MODIFY, 1);
                wr(out, vcap::LOG_DB_SIZE, 12);
                wr(out, vcap::DB_OFFSET, reg::VQ_DOORBELL_PAGE);
                wr(out, vcap::MAX_DEVICES, 1);
                wr(out, vcap::MAX_QUEUES, u64::from(o.max_queues));
                wr(out, vcap::DESC_GROUP_MKEY, 0);
                wr(out, vcap::FREEZE_TO_RDY, u64::from(o.freeze_to_rdy));
                for i in 0..3 {
                    wr(out, vcap::UMEM_A[i], u64::from(o.umem[i].0));
                    wr(out, vcap::UMEM_B[i], u64::from(o.umem[i].1));
                }
                Ok(())
            }
            _ => Err(bad(
                "capability type not supported",
                format!("cap type {kind:#x}"),
            )),
        }
    }

    fn set_cap(&mut self, inp: &[u8]) -> Result<(), Fail> {
        Self::need_in(inp, CAP_BYTES)?;
        let m = rd(inp, OP_MOD) as u16;
        if m >> 1 != CAP_GENERAL {
            return Err(bad(
                "capability type not settable",
                format!("op_mod {m:#x}"),
            ));
        }
        if rd(inp, gcap::LOG_UAR_PG_SZ) != 0 {
            return Err(bad(
                "UAR page size not supported",
                format!("log_uar_page_sz {}", rd(inp, gcap::LOG_UAR_PG_SZ)),
            ));
        }
        let cs = rd(inp, gcap::CMDIF_CSUM) as u8;
        if cs > 1 {
            return Err(bad(
                "checksum mode not supported",
                format!("cmdif_checksum {cs}"),
            ));
        }
        self.cmdif_checksum = cs;
        Ok(())
    }

    fn create_umem(&mut self, inp: &[u8], out: &mut [u8]) -> Result<(), Fail> {
        Self::need_in(inp, UMEM_MTT_BYTE)?;
        let log = rd(inp, UMEM_LOG_PG);
        let page = 4096u64 << log;
        let offset = rd(inp, UMEM_PG_OFFSET);
        let n = rd(inp, UMEM_NUM_MTT);
        if n == 0 || n > (1 << 20) {
            return Err(bad("bad number of UMEM pages", format!("num_of_mtt {n}")));
        }
        if offset >= page {
            return Err(bad(
                "UMEM page offset beyond the page",
                format!("offset {offset:#x}"),
            ));
        }
        let n = n as usize;
        Self::need_in(inp, UMEM_MTT_BYTE + 8 * n)?;
        let mut pages = Vec::with_capacity(n);
        for i in 0..n {
            let e = be64(inp, UMEM_MTT_BYTE + 8 * i);
            if e & 3 != 3 {
                return Err(bad(
                    "UMEM page without read and write access",
                    format!("entry {i}: {e:#x}"),
                ));
            }
            let a = e & !3;
            if a & (page - 1) != 0 {
                return Err(bad(
                    "UMEM page not aligned to the page size",
                    format!("entry {i}: {a:#x}"),
                ));
            }
            pages.push(a);
        }
        let id = self.store.fresh(Kind::Umem);
        let size = n as u64 * page - offset;
        self.store.insert(
            Kind::Umem,
            id.into(),
            Vec::new(),
            Body::Umem(UmemObj {
                pages,
                page,
                offset,
                size,
            }),
        )?;
        wr(out, ID24, id.into());
        Ok(())
    }

    fn create_mkey(&mut self, inp: &[u8], out: &mut [u8]) -> Result<(), Fail> {
        Self::need_in(inp, MK_ENTRIES_BYTE)?;
        if rd(inp, MK_PG_ACCESS) != 0 || rd(inp, MK_UMEM_VALID) != 0 {
            return Err(bad("UMEM-backed keys are not supported", String::new()));
        }
        if rd(inp, MKC_FREE) != 0 {
            return Err(bad("key created free", String::new()));
        }
        let mode = ((rd(inp, MKC_AM_HI) << 2) | rd(inp, MKC_AM_LO)) as u8;
        let pd = rd(inp, MKC_PD);
        self.store.get(Kind::Pd, pd)?;
        let start = rd(inp, MKC_START);
        let len = rd(inp, MKC_LEN);
        let whole = rd(inp, MKC_LEN64) != 0;
        let variant = rd(inp, MKC_VARIANT) as u32;
        let ow = rd(inp, MK_OCTWORDS_ACTUAL) as usize;
        if (rd(inp, MKC_OCTWORDS) as usize) < ow {
            return Err(bad(
                "translation size below the entries given",
                format!("{} octwords, {ow} given", rd(inp, MKC_OCTWORDS)),
            ));
        }
        if ow > (1 << 20) {
            return Err(bad("translation list too long", format!("{ow} octwords")));
        }
        Self::need_in(inp, MK_ENTRIES_BYTE + 16 * ow)?;
        if !whole && (len == 0 || start.checked_add(len).is_none()) {
            return Err(bad(
                "key length 0 or overflowing",
                format!("start {start:#x} len {len:#x}"),
            ));
        }
        let mut m = MkeyObj {
            key: 0,
            mode,
            pd: pd as u32,
            start,
            len,
            whole,
            page: 4096,
            mtt: Vec::new(),
            klm: Vec::new(),
            local_rw: (rd(inp, MKC_LR) != 0, rd(inp, MKC_LW) != 0),
        };
        let mut deps = vec![(Kind::Pd, pd)];
        match mode {
            mkey::MODE_PA => {}
            mkey::MODE_MTT => {
                if whole {
                    return Err(bad("whole-space page-list key", String::new()));
                }
                let log = rd(inp, MKC_LOG_PG);
                if !(12..=39).contains(&log) {
                    return Err(bad(
                        "MTT page size out of range",
                        format!("log_page_size {log}"),
                    ));
                }
                m.page = 1u64 << log;
                let first = start & !(m.page - 1);
                let need = (start - first + len).div_ceil(m.page);
                if need > 2 * ow as u64 {
                    return Err(bad(
                        "page list shorter than the key",
                        format!("{need} pages needed, {} given", 2 * ow),
                    ));
                }
                for i in 0..need as usize {
                    let e = be64(inp, MK_ENTRIES_BYTE + 8 * i);
                    if (e & !3) & (m.page - 1) != 0 {
                        return Err(bad(
                            "MTT entry not page aligned",
                            format!("entry {i}: {e:#x}"),
                        ));
                    }
                    m.mtt.push(e);
                }
            }
            mkey::MODE_KLM => {
                if ow > 1usize << self.opts.log_max_klm {
                    return Err(Fail::new(
                        st::LIMITS,
                        "KLM list too long",
                        format!("{ow} entries"),
                    ));
                }
                let mut covered = 0u64;
                for i in 0..ow {
                    let o = MK_ENTRIES_BYTE + 16 * i;
                    let (count, key, addr) = (be32(inp, o), be32(inp, o + 4), be64(inp, o + 8));
                    if count == 0 {
                        break;
                    }
                    if key != NULL_MKEY {
                        let inner = mkey::lookup(&self.store, key)?;
                        if inner.pd != pd as u32 {
                            return Err(bad(
                                "indirect entry in another protection domain",
                                format!("entry {i}: key {key:#x}"),
                            ));
                        }
                        deps.push((Kind::Mkey, u64::from(key >> 8)));
                    }
                    m.klm.push((count, key, addr));
                    covered += u64::from(count);
                }
                if !whole && covered < len {
                    return Err(bad(
                        "indirect list shorter than the key",
                        format!("{covered:#x} of {len:#x} bytes covered"),
                    ));
                }
            }
            _ => return Err(bad("access mode not supported", format!("mode {mode}"))),
        }
        let index = self.store.fresh(Kind::Mkey);
        m.key = index << 8 | variant;
        self.store
            .insert(Kind::Mkey, index.into(), deps, Body::Mkey(m))?;
        wr(out, ID24, index.into());
        Ok(())
    }

    fn general_object(&mut self, opcode: u16, inp: &[u8], out: &mut [u8]) -> Result<(), Fail> {
        let t = rd(inp, OBJ_TYPE) as u16;
        let id = rd(inp, OBJ_ID);
        match (opcode, t) {
            (opc::CREATE_OBJ, _) if rd(inp, OBJ_PARAM) != 0 => Err(bad(
                "object aliases and ranges are not supported",
                format!("op_param {:#x}", rd(inp, OBJ_PARAM)),
            )),
            (opc::CREATE_OBJ, OT_VIRTIO_NET_Q) => self.vq_create(inp, out),
            (opc::MODIFY_OBJ, OT_VIRTIO_NET_Q) => self.vq_modify(id, inp),
            (opc::QUERY_OBJ, OT_VIRTIO_NET_Q) => self.vq_query(id, out),
            (opc::DESTROY_OBJ, OT_VIRTIO_NET_Q) => self.vq_destroy(id),
            (opc::CREATE_OBJ, OT_VIRTIO_Q_COUNTERS) => {
                let id = self.store.fresh(Kind::Counters);
                self.store.insert(
                    Kind::Counters,
                    id.into(),
                    Vec::new(),
                    Body::Counters(Cnt::default()),
                )?;
                wr(out, OBJ_ID, id.into());
                Ok(())
            }
            (opc::QUERY_OBJ, OT_VIRTIO_Q_COUNTERS) => {
                Self::need_out(out, 16 + CNT_OBJ_BYTES)?;
                // What the engine counted since the last look, for the queues counting here.
                let users: Vec<u64> = self
                    .store
                    .iter_kind(Kind::Vq)
                    .filter(
                        |(_, o)| matches!(&o.body, Body::Vq(v) if rd(&v.raw, vqf::COUNTERS) == id),
                    )
                    .map(|(q, _)| q)
                    .collect();
                for q in users {
                    self.fold_counts(q);
                }
                let o = self.store.get(Kind::Counters, id)?;
                let Body::Counters(c) = &o.body else {
                    return Err(Fail::new(
                        st::INTERNAL,
                        "object table corrupt",
                        String::new(),
                    ));
                };
                wr(out, CNT_RECEIVED, c.received);
                wr(out, CNT_COMPLETED, c.completed);
                wr(out, CNT_ERR_CQE, c.error_cqes.into());
                wr(out, CNT_BAD_DESC, c.bad_desc.into());
                wr(out, CNT_EXCEED, c.exceed.into());
                wr(out, CNT_INVALID, c.invalid.into());
                Ok(())
            }
            (opc::DESTROY_OBJ, OT_VIRTIO_Q_COUNTERS) => self.free(Kind::Counters, id),
            (opc::MODIFY_OBJ, OT_VIRTIO_Q_COUNTERS) => {
                Err(bad("counters objects cannot be modified", String::new()))
            }
            _ => Err(bad(
                "general object type not supported",
                format!("type {t:#x}"),
            )),
        }
    }

    fn rqt_list(&self, inp: &[u8]) -> Result<(Vec<u32>, u16), Fail> {
        if rd(inp, RQT_TYPE) != 1 {
            return Err(bad(
                "RQT list type not supported (virtio queues only)",
                format!("type {}", rd(inp, RQT_TYPE)),
            ));
        }
        let max = rd(inp, RQT_MAX) as u16;
        let n = rd(inp, RQT_ACTUAL) as usize;
        if max == 0 || max as u32 > 1 << self.opts.log_max_rqt_size {
            return Err(Fail::new(
                st::LIMITS,
                "RQT size out of range",
                format!("max {max}"),
            ));
        }
        if n == 0 || n > max as usize {
            return Err(bad("RQT actual size out of range", format!("{n} of {max}")));
        }
        Self::need_in(inp, RQT_LIST_BYTE + 4 * n)?;
        let mut list = Vec::with_capacity(n);
        for i in 0..n {
            let id = be32(inp, RQT_LIST_BYTE + 4 * i) & 0xff_ffff;
            let index = self.vq_index(id.into())?;
            if index % 2 != 0 {
                return Err(bad(
                    "RQT entry is a transmit queue",
                    format!("entry {i}: object {id:#x} is queue {index}"),
                ));
            }
            list.push(id);
        }
        Ok((list, max))
    }

    fn create_rqt(&mut self, inp: &[u8], out: &mut [u8]) -> Result<(), Fail> {
        Self::need_in(inp, RQT_LIST_BYTE)?;
        let (list, max) = self.rqt_list(inp)?;
        let deps = list.iter().map(|&q| (Kind::Vq, u64::from(q))).collect();
        let id = self.store.fresh(Kind::Rqt);
        self.store
            .insert(Kind::Rqt, id.into(), deps, Body::Rqt(RqtObj { list, max }))?;
        wr(out, ID24, id.into());
        Ok(())
    }

    fn modify_rqt(&mut self, inp: &[u8]) -> Result<(), Fail> {
        Self::need_in(inp, RQT_LIST_BYTE)?;
        let id = rd(inp, RQT_MOD_RQTN);
        self.store.get(Kind::Rqt, id)?;
        if rd(inp, RQT_MOD_MASK) & 1 == 0 {
            return Ok(());
        }
        let (list, max) = self.rqt_list(inp)?;
        let deps = list.iter().map(|&q| (Kind::Vq, u64::from(q))).collect();
        self.store.set_deps(Kind::Rqt, id, deps)?;
        if let Body::Rqt(r) = &mut self.store.get_mut(Kind::Rqt, id)?.body {
            r.list = list;
            r.max = max;
        }
        Ok(())
    }

    fn create_tir(&mut self, inp: &[u8], out: &mut [u8]) -> Result<(), Fail> {
        Self::need_in(inp, 0x74)?;
        if rd(inp, TIR_DISP) != 1 {
            return Err(bad(
                "TIR dispatch type not supported (indirect only)",
                format!("type {}", rd(inp, TIR_DISP)),
            ));
        }
        let hash_fn = rd(inp, TIR_HASH_FN) as u8;
        if hash_fn != 0 && hash_fn != 2 {
            return Err(bad("hash function not supported", format!("{hash_fn}")));
        }
        let rqt = rd(inp, TIR_RQT);
        let td = rd(inp, TIR_TD);
        let mut key = [0u8; 40];
        key.copy_from_slice(&inp[TIR_KEY_BYTE..TIR_KEY_BYTE + 40]);
        let tir = TirObj {
            rqt: rqt as u32,
            key,
            hash_fn,
            symmetric: rd(inp, TIR_SYMMETRIC) != 0,
            fields: rd(inp, TIR_FIELDS) as u32,
        };
        let id = self.store.fresh(Kind::Tir);
        self.store.insert(
            Kind::Tir,
            id.into(),
            vec![(Kind::Rqt, rqt), (Kind::Td, td)],
            Body::Tir(tir),
        )?;
        wr(out, ID24, id.into());
        Ok(())
    }

    fn table(&self, inp: &[u8]) -> Result<u64, Fail> {
        if rd(inp, FT_TYPE) != 0 {
            return Err(bad(
                "flow table type not supported (NIC receive only)",
                format!("type {}", rd(inp, FT_TYPE)),
            ));
        }
        let t = rd(inp, FT_ID);
        self.store.get(Kind::Table, t)?;
        Ok(t)
    }

    fn create_ft(&mut self, inp: &[u8], out: &mut [u8]) -> Result<(), Fail> {
        Self::need_in(inp, 0x20)?;
        if rd(inp, FT_TYPE) != 0 {
            return Err(bad(
                "flow table type not supported (NIC receive only)",
                format!("type {}", rd(inp, FT_TYPE)),
            ));
        }
        let log = rd(inp, FT_LOG_SIZE);
        if log > 16 {
            return Err(Fail::new(
                st::LIMITS,
                "flow table too large",
                format!("log_size {log}"),
            ));
        }
        let id = self.store.fresh(Kind::Table);
        self.store
            .insert(Kind::Table, id.into(), Vec::new(), Body::Table(log as u8))?;
        wr(out, ID24, id.into());
        Ok(())
    }

    fn destroy_ft(&mut self, inp: &[u8]) -> Result<(), Fail> {
        Self::need_in(inp, 0x20)?;
        let t = self.table(inp)?;
        self.store.remove(Kind::Table, t)?;
        if self.root == Some(t as u32) {
            self.root = None;
        }
        Ok(())
    }

    fn set_root(&mut self, inp: &[u8]) -> Result<(), Fail> {
        Self::need_in(inp, 0x20)?;
        if rd(inp, FT_ID) == 0 && rd(inp, FT_TYPE) == 0 {
            self.root = None;
            return Ok(());
        }
        let t = self.table(inp)?;
        self.root = Some(t as u32);
        Ok(())
    }

    fn create_fg(&mut self, inp: &[u8], out: &mut [u8]) -> Result<(), Fail> {
        Self::need_in(inp, FG_CRITERIA_BYTE + 0x200)?;
        let t = self.table(inp)?;
        let Body::Table(log) = self.store.get(Kind::Table, t)?.body else {
            return Err(Fail::new(
                st::INTERNAL,
                "object table corrupt",
                String::new(),
            ));
        };
        let (s, e) = (rd(inp, FG_START) as u32, rd(inp, FG_END) as u32);
        if s > e || u64::from(e) >= 1u64 << log {
            return Err(bad(
                "flow group range outside the table",
                format!("{s}..={e} of 2^{log}"),
            ));
        }
        for (_, o) in self.store.iter_kind(Kind::Group) {
            if let Body::Group(g) = &o.body
                && u64::from(g.table) == t
                && g.start <= e
                && s <= g.end
            {
                return Err(bad(
                    "flow groups overlap",
                    format!("{s}..={e} and {}..={}", g.start, g.end),
                ));
            }
        }
        let en = rd(inp, FG_ENABLE);
        if en & !1 != 0 {
            return Err(bad(
                "match criteria beyond outer headers",
                format!("enable {en:#x}"),
            ));
        }
        let c = &inp[FG_CRITERIA_BYTE..FG_CRITERIA_BYTE + 0x200];
        let mask = dmac_at(c);
        let others = c
            .iter()
            .enumerate()
            .any(|(i, &b)| b != 0 && !(MATCH_DMAC_HI_BYTE..MATCH_DMAC_LO_BYTE + 2).contains(&i));
        if others || (en == 0 && mask != [0; 6]) {
            return Err(bad(
                "match criteria other than the outer destination MAC",
                String::new(),
            ));
        }
        let id = self.store.fresh(Kind::Group);
        self.store.insert(
            Kind::Group,
            id.into(),
            vec![(Kind::Table, t)],
            Body::Group(GroupObj {
                table: t as u32,
                start: s,
                end: e,
                mask,
            }),
        )?;
        wr(out, ID24, id.into());
        Ok(())
    }

    fn group_of(&self, t: u64, g: u64) -> Result<GroupObj, Fail> {
        match &self.store.get(Kind::Group, g)?.body {
            Body::Group(x) if u64::from(x.table) == t => Ok(x.clone()),
            _ => Err(bad(
                "flow group of another table",
                format!("group {g:#x}, table {t:#x}"),
            )),
        }
    }

    fn destroy_fg(&mut self, inp: &[u8]) -> Result<(), Fail> {
        Self::need_in(inp, 0x20)?;
        let t = self.table(inp)?;
        let g = rd(inp, FG_DESTROY_ID);
        self.group_of(t, g)?;
        self.free(Kind::Group, g)
    }

    fn set_fte(&mut self, inp: &[u8]) -> Result<(), Fail> {
        Self::need_in(inp, FTE_DEST_BYTE + 8)?;
        let t = self.table(inp)?;
        let idx = rd(inp, FTE_INDEX);
        let g = rd(inp, FTE_GROUP);
        let grp = self.group_of(t, g)?;
        if idx < u64::from(grp.start) || idx > u64::from(grp.end) {
            return Err(bad(
                "flow index outside its group",
                format!("index {idx}, group {}..={}", grp.start, grp.end),
            ));
        }
        let key = (t << 32) | idx;
        if self.store.has(Kind::Fte, key) {
            return Err(bad("flow index in use", format!("index {idx}")));
        }
        if rd(inp, FTE_ACTION) != FWD_DEST {
            return Err(bad(
                "flow action not supported (forward only)",
                format!("action {:#x}", rd(inp, FTE_ACTION)),
            ));
        }
        if rd(inp, FTE_NDEST) != 1 {
            return Err(bad(
                "exactly one destination is supported",
                format!("{}", rd(inp, FTE_NDEST)),
            ));
        }
        let dtype = inp[FTE_DEST_BYTE];
        let tir = u64::from(be32(inp, FTE_DEST_BYTE) & 0xff_ffff);
        if dtype != DEST_TYPE_TIR {
            return Err(bad(
                "destination type not supported (TIR only)",
                format!("type {dtype}"),
            ));
        }
        let dmac = dmac_at(&inp[FTE_MATCH_BYTE..]);
        self.store.insert(
            Kind::Fte,
            key,
            vec![(Kind::Group, g), (Kind::Tir, tir)],
            Body::Fte(FteObj {
                group: g as u32,
                dmac,
                tir: tir as u32,
            }),
        )
    }

    fn delete_fte(&mut self, inp: &[u8]) -> Result<(), Fail> {
        Self::need_in(inp, 0x24)?;
        let t = self.table(inp)?;
        let idx = rd(inp, FTE_INDEX);
        self.free(Kind::Fte, (t << 32) | idx)
    }

    /// The virtio index of queue object `id`.
    pub fn vq_index(&self, id: u64) -> Result<u16, Fail> {
        match &self.store.get(Kind::Vq, id)?.body {
            Body::Vq(v) => Ok(v.index()),
            _ => Err(Fail::new(
                st::INTERNAL,
                "object table corrupt",
                String::new(),
            )),
        }
    }

    /// The number of live objects plus pages held.
    pub fn live(&self) -> usize {
        self.store.live() + self.pages.len()
    }
}

/// The destination MAC of a match block (criteria or value).
pub fn dmac_at(m: &[u8]) -> [u8; 6] {
    let mut d = [0u8; 6];
    for (i, x) in d.iter_mut().enumerate().take(4) {
        *x = m.get(MATCH_DMAC_HI_BYTE + i).copied().unwrap_or(0);
    }
    d[4] = m.get(MATCH_DMAC_LO_BYTE).copied().unwrap_or(0);
    d[5] = m.get(MATCH_DMAC_LO_BYTE + 1).copied().unwrap_or(0);
    d
}

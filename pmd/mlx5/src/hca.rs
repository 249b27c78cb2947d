//! Function bring-up and teardown, capabilities and health.
//!
//! Bring-up ([`Hca::open`]): check the PCI identity, enable bus mastering, wait for the
//! initializing bit to clear (bounded), check the command interface revision (5), set up the
//! command queue, wait again, ENABLE_HCA, QUERY_ISSI/SET_ISSI, boot pages (QUERY_PAGES +
//! MANAGE_PAGES with pages of driver memory mapped in the DMA domain), HOST_ENDIANNESS,
//! QUERY_HCA_CAP (general) and SET_HCA_CAP (checksums off, 4 KiB UAR pages), init pages,
//! INIT_HCA, and the virtio emulation capabilities. Teardown ([`Hca::close`], or drop) runs the
//! same steps in reverse: TEARDOWN_HCA, MANAGE_PAGES TAKE (every page given comes back to the
//! driver), DISABLE_HCA. A failure half way undoes what was done.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use vdpakit_core::mem::MemMode;
use vdpakit_core::pci::{PciDevice, cfg};

use crate::cmd::{CmdOptions, Cmdq};
use crate::dma::{DmaArena, DmaBuf, PAGE};
use crate::error::{CmdName, Error, Result};
use crate::prm::{Buf, be_reg, boot, cap, from_be_reg, hdr, iseg, obj, op, pci_id};

/// Bring-up options.
#[derive(Debug, Clone)]
pub struct HcaOptions {
    /// Command issue options (timeout, checksums).
    pub cmd: CmdOptions,
    /// Longest wait for the initializing bit to clear.
    pub init_timeout: Duration,
    /// Bytes of driver DMA memory (command queue, mailboxes, firmware pages, UMEMs).
    pub dma_mem: usize,
    /// Page size of that memory.
    pub mem_mode: MemMode,
    /// Reset the function before bring-up.
    pub reset: bool,
}

impl Default for HcaOptions {
    fn default() -> HcaOptions {
        HcaOptions {
            cmd: CmdOptions::default(),
            init_timeout: Duration::from_secs(120),
            dma_mem: 16 << 20,
            mem_mode: MemMode::Auto,
            reset: false,
        }
    }
}

/// General capabilities the driver uses.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct GeneralCaps {
    /// This function's vhca id.
    pub vhca_id: u16,
    /// UMEMs and objects may be created with uid 0 (no user context needed).
    pub umem_uid_0: bool,
    /// Supported general object types (bit n = type n).
    pub general_obj_types: u64,
    /// log2 of the largest RQT.
    pub log_max_rqt_size: u8,
    /// log2 of the largest KLM list of an indirect key.
    pub log_max_klm_list_size: u8,
    /// The command interface checksum setting.
    pub cmdif_checksum: u8,
    /// Port type (1 = Ethernet).
    pub port_type: u8,
    /// NIC flow tables are supported.
    pub nic_flow_table: bool,
    /// log2 of the maximum number of memory keys.
    pub log_max_mkey: u8,
}

/// Virtio emulation capabilities.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct VirtioCaps {
    /// Event modes (bit 0 none, 1 QP, 2 MSI-X).
    pub event_modes: u8,
    /// Ring formats (bit 0 split, 1 packed).
    pub queue_types: u8,
    /// mlx feature bits the device supports.
    pub features_mask: u16,
    /// VIRTIO_F_VERSION_1 supported.
    pub version_1: bool,
    /// Ethernet frame offload (required).
    pub eth_frame_offload: bool,
    /// Byte offset of the doorbell page in BAR0.
    pub doorbell_offset: u64,
    /// log2 of the doorbell stride.
    pub log_doorbell_stride: u8,
    /// log2 of the doorbell area size.
    pub log_doorbell_bar_size: u8,
    /// Virtio queues the function can have.
    pub max_queues: u32,
    /// UMEM size parameters: size_i = a_i × queue size + b_i.
    pub umem: [(u32, u32); 3],
    /// SUSPEND → RDY is allowed (resumable queues).
    pub freeze_to_rdy: bool,
    /// A separate key for descriptor tables is supported.
    pub desc_group_mkey: bool,
    /// Queues may be created unfilled and modified later.
    pub modify_ext: bool,
}

impl VirtioCaps {
    /// Size of UMEM `i` for a ring of `queue_size`.
    pub fn umem_size(&self, i: usize, queue_size: u16) -> u64 {
        let (a, b) = self.umem[i];
        u64::from(a) * u64::from(queue_size) + u64::from(b)
    }
}

/// Both capability sets.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Caps {
    /// General.
    pub general: GeneralCaps,
    /// Virtio emulation.
    pub virtio: VirtioCaps,
}

/// What the health buffer and counter say.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Health {
    /// Firmware version (all ones: the function is gone from the bus).
    pub fw_ver: u32,
    /// Health syndrome (0: healthy).
    pub synd: u8,
    /// Extended syndrome.
    pub ext_synd: u16,
    /// nic_interface (0 full, 1 disabled, 2 no DRAM, 7 software reset).
    pub nic_interface: u8,
    /// Health counter (low 24 bits).
    pub counter: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Stage {
    Down,
    Enabled,
    Initialized,
}

#[derive(Debug, Default)]
struct HealthTrack {
    last: Option<u32>,
    stuck: u32,
}

/// One booted mlx5 function: its command queue, firmware pages and capabilities.
#[derive(Debug)]
pub struct Hca {
    name: String,
    pci: PciDevice,
    arena: DmaArena,
    cmdq: Cmdq,
    fw_pages: Mutex<Vec<DmaBuf>>,
    caps: Caps,
    stage: Stage,
    health: Mutex<HealthTrack>,
    opts: HcaOptions,
}

/// A command input with the common header filled.
pub fn cmd_in(opcode: u16, op_mod: u16, len: usize) -> Buf {
    let mut b = Buf::new(len.max(hdr::LEN));
    b.set(hdr::OPCODE, u64::from(opcode));
    b.set(hdr::OP_MOD, u64::from(op_mod));
    b
}

impl Hca {
    /// Brings the function up. On failure, whatever was done is undone.
    pub fn open(pci: PciDevice, opts: &HcaOptions) -> Result<Hca> {
        let name = pci.name().to_string();
        let (vendor, device) = pci.ids()?;
        if vendor != pci_id::VENDOR {
            return Err(Error::NotSupported {
                dev: name,
                what: format!(
                    "vendor {vendor:#06x} is not Mellanox/NVIDIA ({:#06x})",
                    pci_id::VENDOR
                ),
            });
        }
        match pci_id::DEVICES.iter().find(|d| d.0 == device) {
            Some((_, what)) => tracing::info!("{name}: {what} ({device:#06x})"),
            None => tracing::warn!(
                "{name}: device id {device:#06x} is not a known vDPA-capable mlx5 function; trying"
            ),
        }
        if opts.reset {
            pci.reset()?;
        }
        let command = pci.config_read16(cfg::COMMAND)?;
        pci.config_write16(
            cfg::COMMAND,
            command | cfg::CMD_MEMORY | cfg::CMD_BUS_MASTER,
        )?;
        Self::wait_init(
            &pci,
            &name,
            opts.init_timeout,
            "before command queue set-up",
        )?;
        let rev = from_be_reg(pci.read32(iseg::BAR, iseg::CMDIF_REV_FW_SUB)?) >> 16;
        if rev != iseg::CMDIF_REV {
            return Err(Error::NotSupported {
                dev: name,
                what: format!(
                    "command interface revision {rev}: this driver speaks revision {}",
                    iseg::CMDIF_REV
                ),
            });
        }
        let fw = from_be_reg(pci.read32(iseg::BAR, iseg::FW_REV)?);
        let sz = from_be_reg(pci.read32(iseg::BAR, iseg::CMDQ_ADDR_L_SZ)?);
        let (log_sz, log_stride) = (((sz >> 4) & 0xf) as u8, (sz & 0xf) as u8);
        let arena = DmaArena::new(&name, pci.domain(), opts.dma_mem, opts.mem_mode)?;
        let page = arena.alloc(PAGE)?;
        let cmdq = Cmdq::new(
            &name,
            pci.clone(),
            arena.clone(),
            page,
            log_sz,
            log_stride,
            opts.cmd,
        )?;
        let addr = cmdq.iova();
        pci.write32(iseg::BAR, iseg::CMDQ_ADDR_H, be_reg((addr >> 32) as u32))?;
        pci.write32(
            iseg::BAR,
            iseg::CMDQ_ADDR_L_SZ,
            be_reg(addr as u32 & !0xfff),
        )?;
        Self::wait_init(&pci, &name, opts.init_timeout, "after command queue set-up")?;
        tracing::debug!(
            "{name}: firmware {}.{}, command queue of {} slots at {addr:#x}",
            fw & 0xffff,
            fw >> 16,
            1u32 << log_sz
        );
        let mut hca = Hca {
            name,
            pci,
            arena,
            cmdq,
            fw_pages: Mutex::new(Vec::new()),
            caps: Caps::default(),
            stage: Stage::Down,
            health: Mutex::new(HealthTrack::default()),
            opts: opts.clone(),
        };
        if let Err(e) = hca.boot() {
            if let Err(u) = hca.shutdown() {
                tracing::warn!("{}: undoing a failed bring-up: {u}", hca.name);
            }
            // A function a previous user left enabled (a crashed process): reset it once.
            if !opts.reset && e.opcode() == Some(op::ENABLE_HCA) && e.status() == Some(4) {
                tracing::warn!(
                    "{}: the function is still enabled by a previous user; resetting it",
                    hca.name
                );
                let pci = hca.pci.clone();
                drop(hca);
                return Hca::open(
                    pci,
                    &HcaOptions {
                        reset: true,
                        ..opts.clone()
                    },
                );
            }
            return Err(e);
        }
        Ok(hca)
    }

    fn boot(&mut self) -> Result<()> {
        let mut b = cmd_in(op::ENABLE_HCA, 0, 16);
        b.set(boot::FUNCTION_ID, 0);
        self.exec(&b, 16)?;
        self.stage = Stage::Enabled;

        let out = self.exec(&cmd_in(op::QUERY_ISSI, 0, 16), boot::QUERY_ISSI_OUT_LEN)?;
        let issi = out.get(boot::SUPPORTED_ISSI_DW0);
        if issi & 2 != 0 {
            let mut b = cmd_in(op::SET_ISSI, 0, 16);
            b.set(boot::CURRENT_ISSI, 1);
            self.exec(&b, 16)?;
        } else if issi & 1 == 0 {
            return Err(Error::NotSupported {
                dev: self.name.clone(),
                what: format!("supported ISSI mask {issi:#x} has neither ISSI 0 nor 1"),
            });
        }
        self.give_pages(boot::PAGES_BOOT)?;

        let mut b = cmd_in(op::ACCESS_REG, 0, boot::REG_DATA + 16);
        b.set(boot::REG_ID, u64::from(boot::REG_HOST_ENDIANNESS));
        // Byte 0 of the register: 0 for a little-endian host, 0x80 for big-endian.
        b.put(
            boot::REG_DATA,
            &[if cfg!(target_endian = "big") { 0x80 } else { 0 }],
        );
        self.exec(&b, boot::REG_DATA + 16)?;

        let cur = self.query_cap(cap::GENERAL, true)?;
        let mut set = cmd_in(
            op::SET_HCA_CAP,
            cap::GENERAL << 1,
            cap::OFF as usize + cap::LEN,
        );
        set.put(cap::OFF as usize, cur.bytes(cap::OFF as usize, cap::LEN));
        set.set(
            cap::general::CMDIF_CHECKSUM,
            if self.opts.cmd.checksum { 1 } else { 0 },
        );
        set.set(cap::general::LOG_UAR_PAGE_SZ, 0);
        self.exec(&set, 16)?;
        let g = self.query_cap(cap::GENERAL, true)?;
        let general = GeneralCaps {
            vhca_id: g.get(cap::general::VHCA_ID) as u16,
            umem_uid_0: g.get(cap::general::UMEM_UID_0) != 0,
            general_obj_types: g.get(cap::general::GENERAL_OBJ_TYPES),
            log_max_rqt_size: g.get(cap::general::LOG_MAX_RQT_SIZE) as u8,
            log_max_klm_list_size: g.get(cap::general::LOG_MAX_KLM_LIST_SIZE) as u8,
            cmdif_checksum: g.get(cap::general::CMDIF_CHECKSUM) as u8,
            port_type: g.get(cap::general::PORT_TYPE) as u8,
            nic_flow_table: g.get(cap::general::NIC_FLOW_TABLE) != 0,
            log_max_mkey: g.get(cap::general::LOG_MAX_MKEY) as u8,
        };
        if !general.umem_uid_0 {
            return Err(Error::NotSupported {
                dev: self.name.clone(),
                what: "the function lacks umem_uid_0 (objects without a user context), which this \
                       driver needs"
                    .into(),
            });
        }
        if general.general_obj_types & (1 << obj::VIRTIO_NET_Q) == 0 {
            return Err(Error::NotSupported {
                dev: self.name.clone(),
                what: format!(
                    "no VIRTIO_NET_Q objects (general_obj_types {:#x}): not a vDPA-capable function \
                     (enable vnet on the PF or use a VF/SF with it)",
                    general.general_obj_types
                ),
            });
        }
        self.give_pages(boot::PAGES_INIT)?;
        self.exec(&cmd_in(op::INIT_HCA, 0, 16), 16)?;
        self.stage = Stage::Initialized;

        let v = self.query_cap(cap::VDPA_EMULATION, true)?;
        use cap::virtio as vc;
        let virtio = VirtioCaps {
            event_modes: v.get(vc::EVENT_MODE) as u8,
            queue_types: v.get(vc::VIRTIO_QUEUE_TYPE) as u8,
            features_mask: v.get(vc::DEVICE_FEATURES_BITS_MASK) as u16,
            version_1: v.get(vc::VIRTIO_VERSION_1_0) != 0,
            eth_frame_offload: v.get(vc::ETH_FRAME_OFFLOAD_TYPE) != 0,
            doorbell_offset: v.get(vc::DOORBELL_BAR_OFFSET),
            log_doorbell_stride: v.get(vc::LOG_DOORBELL_STRIDE) as u8,
            log_doorbell_bar_size: v.get(vc::LOG_DOORBELL_BAR_SIZE) as u8,
            max_queues: v.get(vc::MAX_NUM_VIRTIO_QUEUES) as u32,
            umem: std::array::from_fn(|i| {
                (
                    v.get(vc::umem_a(i as u32)) as u32,
                    v.get(vc::umem_b(i as u32)) as u32,
                )
            }),
            freeze_to_rdy: v.get(vc::FREEZE_TO_RDY_SUPPORTED) != 0,
            desc_group_mkey: v.get(vc::DESC_GROUP_MKEY_SUPPORTED) != 0,
            modify_ext: v.get(vc::VNET_MODIFY_EXT) != 0
                && v.get(vc::VIRTIO_NET_Q_ADDR_MODIFY) != 0
                && v.get(vc::VIRTIO_Q_INDEX_MODIFY) != 0,
        };
        if !virtio.eth_frame_offload || virtio.queue_types & cap::QUEUE_SPLIT == 0 {
            return Err(Error::NotSupported {
                dev: self.name.clone(),
                what: format!(
                    "virtio emulation without Ethernet frame offload or split rings (eth_frame_offload \
                     {}, queue types {:#x})",
                    virtio.eth_frame_offload, virtio.queue_types
                ),
            });
        }
        if virtio.max_queues < 2 {
            return Err(Error::NotSupported {
                dev: self.name.clone(),
                what: format!(
                    "{} virtio queues: at least one pair is needed",
                    virtio.max_queues
                ),
            });
        }
        self.caps = Caps { general, virtio };
        tracing::info!(
            "{}: up: {} virtio queues, event modes {:#x}, ring formats {:#x}, doorbell at BAR0+{:#x}, {} firmware pages",
            self.name,
            self.caps.virtio.max_queues,
            self.caps.virtio.event_modes,
            self.caps.virtio.queue_types,
            self.caps.virtio.doorbell_offset,
            self.fw_pages().len()
        );
        Ok(())
    }

    fn fw_pages(&self) -> std::sync::MutexGuard<'_, Vec<DmaBuf>> {
        self.fw_pages.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn wait_init(pci: &PciDevice, name: &str, limit: Duration, when: &str) -> Result<()> {
        let start = Instant::now();
        let mut polls = 0u32;
        loop {
            let v = from_be_reg(pci.read32(iseg::BAR, iseg::INITIALIZING)?);
            if v & (1 << 31) == 0 {
                return Ok(());
            }
            if start.elapsed() >= limit {
                return Err(Error::Timeout {
                    dev: name.to_string(),
                    what: format!("firmware initialization {when} (initializing bit still set)"),
                    ms: limit.as_millis() as u64,
                });
            }
            polls += 1;
            // A few quick polls, then 2 ms steps.
            std::thread::sleep(if polls < 8 {
                Duration::from_micros(50)
            } else {
                Duration::from_millis(2)
            });
        }
    }

    /// Gives firmware the pages QUERY_PAGES asks for (`kind`: boot or init).
    fn give_pages(&self, kind: u16) -> Result<()> {
        let mut q = cmd_in(op::QUERY_PAGES, kind, 16);
        q.set(boot::FUNCTION_ID, 0);
        let out = self.exec(&q, 16)?;
        let n = out.get(boot::QP_NUM_PAGES) as u32 as i32;
        let cmd = CmdName {
            opcode: op::QUERY_PAGES,
            op_mod: kind,
        };
        if n < 0 {
            return Err(Error::BadReply {
                dev: self.name.clone(),
                cmd,
                what: format!("firmware returns {} pages at bring-up", -n),
            });
        }
        let mut left = n as usize;
        while left > 0 {
            let batch = left.min(512);
            let mut pages = Vec::with_capacity(batch);
            for _ in 0..batch {
                pages.push(self.arena.alloc(PAGE)?);
            }
            let mut b = cmd_in(op::MANAGE_PAGES, boot::MP_GIVE, boot::MP_PAS + 8 * batch);
            b.set(boot::MP_FUNCTION_ID, 0);
            b.set(boot::MP_INPUT_NUM, batch as u64);
            for (i, p) in pages.iter().enumerate() {
                b.put_be64(boot::MP_PAS + 8 * i, p.iova());
            }
            self.exec(&b, 16)?;
            self.fw_pages().extend(pages);
            left -= batch;
        }
        tracing::debug!(
            "{}: gave firmware {n} {} pages",
            self.name,
            if kind == boot::PAGES_BOOT {
                "boot"
            } else {
                "init"
            }
        );
        Ok(())
    }

    /// Takes every page back from firmware (after TEARDOWN_HCA). Pages firmware does not return
    /// stay allocated (never reused while the device may still write them).
    fn take_pages(&self) -> Result<()> {
        let cmd = CmdName {
            opcode: op::MANAGE_PAGES,
            op_mod: boot::MP_TAKE,
        };
        loop {
            let held = self.fw_pages().len();
            if held == 0 {
                return Ok(());
            }
            let batch = held.min(512);
            let mut b = cmd_in(op::MANAGE_PAGES, boot::MP_TAKE, 16);
            b.set(boot::MP_FUNCTION_ID, 0);
            b.set(boot::MP_INPUT_NUM, batch as u64);
            let out = self.exec(&b, boot::MP_PAS + 8 * batch)?;
            let got = out.get(boot::MP_OUTPUT_NUM) as usize;
            if got == 0 || got > batch {
                let mut pages = self.fw_pages();
                let kept = std::mem::take(&mut *pages);
                // Still firmware's: never hand them out again.
                kept.into_iter().for_each(std::mem::forget);
                return Err(Error::BadReply {
                    dev: self.name.clone(),
                    cmd,
                    what: format!("{got} pages returned for {batch} asked ({held} held)"),
                });
            }
            let mut pages = self.fw_pages();
            for i in 0..got {
                let addr = out.be64(boot::MP_PAS + 8 * i);
                match pages.iter().position(|p| p.iova() == addr) {
                    Some(k) => drop(pages.swap_remove(k)),
                    None => {
                        return Err(Error::BadReply {
                            dev: self.name.clone(),
                            cmd,
                            what: format!("returned page {addr:#x} was never given"),
                        });
                    }
                }
            }
        }
    }

    /// Reads one capability area (`cur`: current values, else maximum).
    pub fn query_cap(&self, cap_type: u16, cur: bool) -> Result<Buf> {
        let b = cmd_in(
            op::QUERY_HCA_CAP,
            (cap_type << 1) | if cur { cap::CUR } else { 0 },
            16,
        );
        self.exec(&b, cap::OFF as usize + cap::LEN)
    }

    /// Executes a command (see [`Cmdq::exec`]).
    pub fn exec(&self, input: &Buf, outlen: usize) -> Result<Buf> {
        tracing::trace!(
            "{}: {}",
            self.name,
            CmdName {
                opcode: input.get(hdr::OPCODE) as u16,
                op_mod: input.get(hdr::OP_MOD) as u16
            }
        );
        match self.cmdq.exec(input, outlen) {
            // A command that never completes: say so if the health buffer explains it.
            Err(e @ Error::Timeout { .. }) => match self.check_health() {
                Err(h @ Error::Health { .. }) => {
                    tracing::error!("{e}");
                    Err(h)
                }
                _ => Err(e),
            },
            r => r,
        }
    }

    /// Runs a command whose output is just a 24-bit id at 0x48 (ALLOC/CREATE).
    pub fn exec_id(&self, input: &Buf) -> Result<u32> {
        let out = self.exec(input, 16)?;
        Ok(out.get(hdr::ID) as u32)
    }

    /// Runs a destroy/dealloc command naming `id` at 0x48.
    pub fn exec_destroy(&self, opcode: u16, id: u32) -> Result<()> {
        let mut b = cmd_in(opcode, 0, 16);
        b.set(hdr::ID, u64::from(id));
        self.exec(&b, 16).map(|_| ())
    }

    /// Device name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The PCI function.
    pub fn pci(&self) -> &PciDevice {
        &self.pci
    }

    /// Driver DMA memory.
    pub fn arena(&self) -> &DmaArena {
        &self.arena
    }

    /// Capabilities.
    pub fn caps(&self) -> &Caps {
        &self.caps
    }

    /// Pages currently given to firmware.
    pub fn firmware_pages(&self) -> usize {
        self.fw_pages().len()
    }

    /// Commands completed so far.
    pub fn commands(&self) -> u64 {
        self.cmdq.executed()
    }

    /// Reads the health buffer and counter.
    pub fn health(&self) -> Result<Health> {
        let r = |off| -> Result<u32> { Ok(from_be_reg(self.pci.read32(iseg::BAR, off)?)) };
        let s = r(iseg::HEALTH_SYND)?;
        Ok(Health {
            fw_ver: r(iseg::HEALTH_FW_VER)?,
            synd: (s >> 16) as u8,
            ext_synd: s as u16,
            nic_interface: ((r(iseg::CMDQ_ADDR_L_SZ)? >> 8) & 7) as u8,
            counter: r(iseg::HEALTH_COUNTER)? & 0xff_ffff,
        })
    }

    /// Checks health: an error when the syndrome is set, the function is gone (all-ones
    /// version), the NIC interface is disabled or in software reset, or the health counter did
    /// not advance over the last three checks (call it about once a second).
    pub fn check_health(&self) -> Result<Health> {
        let h = self.health()?;
        let bad = |what: String| {
            Err(Error::Health {
                dev: self.name.clone(),
                what,
            })
        };
        if h.fw_ver == u32::MAX {
            return bad("the function reads all ones (gone from the PCI bus)".into());
        }
        if h.synd != 0 {
            return bad(format!(
                "health syndrome {:#04x}, extended syndrome {:#06x}",
                h.synd, h.ext_synd
            ));
        }
        if h.nic_interface == iseg::NIC_IF_DISABLED as u8
            || h.nic_interface == iseg::NIC_IF_SW_RESET as u8
        {
            return bad(format!("NIC interface mode {}", h.nic_interface));
        }
        let mut t = self.health.lock().unwrap_or_else(|p| p.into_inner());
        if t.last == Some(h.counter) {
            t.stuck += 1;
        } else {
            t.stuck = 0;
        }
        t.last = Some(h.counter);
        if t.stuck >= 3 {
            return bad(format!("health counter stuck at {:#x}", h.counter));
        }
        Ok(h)
    }

    /// Tears the function down (TEARDOWN_HCA, pages back, DISABLE_HCA). Idempotent.
    pub fn close(&mut self) -> Result<()> {
        self.shutdown()
    }

    fn shutdown(&mut self) -> Result<()> {
        let mut first: Option<Error> = None;
        let mut keep = |r: Result<()>| {
            if let Err(e) = r {
                tracing::warn!("{e}");
                first.get_or_insert(e);
            }
        };
        if self.stage >= Stage::Initialized {
            let mut b = cmd_in(op::TEARDOWN_HCA, 0, 16);
            b.set(boot::TEARDOWN_PROFILE, 0);
            keep(self.exec(&b, 16).map(|_| ()));
            self.stage = Stage::Enabled;
        }
        if self.firmware_pages() > 0 {
            keep(self.take_pages());
        }
        if self.stage >= Stage::Enabled {
            let mut b = cmd_in(op::DISABLE_HCA, 0, 16);
            b.set(boot::FUNCTION_ID, 0);
            keep(self.exec(&b, 16).map(|_| ()));
            self.stage = Stage::Down;
        }
        match first {
            None => {
                tracing::debug!("{}: down", self.name);
                Ok(())
            }
            Some(e) => Err(e),
        }
    }

    /// Whether the function is initialized (between INIT_HCA and TEARDOWN_HCA).
    pub fn is_up(&self) -> bool {
        self.stage == Stage::Initialized
    }
}

impl Drop for Hca {
    fn drop(&mut self) {
        if self.stage != Stage::Down
            && let Err(e) = self.shutdown()
        {
            tracing::warn!("{}: teardown on drop: {e}", self.name);
        }
    }
}

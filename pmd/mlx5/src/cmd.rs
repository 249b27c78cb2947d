//! The command queue: one 4 KiB page of slot descriptors in driver memory, mailbox chains for
//! the bytes beyond the 16 carried inline, the ownership bit, the doorbell, and polled
//! completion with delivery and command status decoded into errors that name the command.
//!
//! One command is outstanding at a time (the queue's lock serialises callers). Regular commands
//! use slot 0, page commands (QUERY_PAGES, MANAGE_PAGES) the last slot, as drivers reserve it.
//! After a completion timeout the slot still belongs to the device, so the queue refuses every
//! later command instead of reusing it.

use std::sync::Mutex;
use std::sync::atomic::{Ordering, fence};
use std::time::{Duration, Instant};

use vdpakit_core::pci::PciDevice;

use crate::dma::{DmaArena, DmaBuf};
use crate::error::{CmdName, Error, Result};
use crate::prm::{Buf, be_reg, hdr, iseg, op, slot};

/// How commands are issued.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CmdOptions {
    /// Longest wait for one command's completion.
    pub timeout: Duration,
    /// Fill the descriptor and mailbox signatures (checksum mode).
    pub checksum: bool,
}

impl Default for CmdOptions {
    fn default() -> CmdOptions {
        CmdOptions {
            timeout: Duration::from_secs(60),
            checksum: false,
        }
    }
}

#[derive(Debug)]
struct State {
    token: u8,
    in_blocks: Vec<DmaBuf>,
    out_blocks: Vec<DmaBuf>,
    wedged: Option<String>,
    executed: u64,
}

/// The command queue of one function.
#[derive(Debug)]
pub struct Cmdq {
    dev: String,
    pci: PciDevice,
    arena: DmaArena,
    page: DmaBuf,
    log_sz: u8,
    log_stride: u8,
    opts: CmdOptions,
    state: Mutex<State>,
}

/// ~XOR of `bytes`.
fn sig(bytes: &[u8]) -> u8 {
    !bytes.iter().fold(0u8, |a, &b| a ^ b)
}

impl Cmdq {
    /// A queue in `page` (4 KiB, aligned) with the geometry the init segment reported.
    pub fn new(
        dev: &str,
        pci: PciDevice,
        arena: DmaArena,
        page: DmaBuf,
        log_sz: u8,
        log_stride: u8,
        opts: CmdOptions,
    ) -> Result<Cmdq> {
        if log_sz > 5 || log_stride < 6 || u32::from(log_sz) + u32::from(log_stride) > 12 {
            return Err(Error::NotSupported {
                dev: dev.to_string(),
                what: format!(
                    "command queue geometry 2^{log_sz} slots of 2^{log_stride} bytes: accepted is up \
                     to 32 slots of at least 64 bytes in one 4 KiB page"
                ),
            });
        }
        Ok(Cmdq {
            dev: dev.to_string(),
            pci,
            arena,
            page,
            log_sz,
            log_stride,
            opts,
            state: Mutex::new(State {
                token: 0,
                in_blocks: Vec::new(),
                out_blocks: Vec::new(),
                wedged: None,
                executed: 0,
            }),
        })
    }

    /// IOVA of the queue page.
    pub fn iova(&self) -> u64 {
        self.page.iova()
    }

    /// Slots in the queue.
    pub fn slots(&self) -> u32 {
        1 << self.log_sz
    }

    /// Commands completed so far.
    pub fn executed(&self) -> u64 {
        self.lock().executed
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Makes sure `v` holds at least `n` mailbox pages.
    fn blocks(&self, v: &mut Vec<DmaBuf>, n: usize) -> Result<()> {
        while v.len() < n {
            v.push(self.arena.alloc(crate::dma::PAGE)?);
        }
        Ok(())
    }

    /// Executes one command: `input` (its header names the opcode), `outlen` bytes of output.
    /// Returns the output when both delivery and command status are 0.
    pub fn exec(&self, input: &Buf, outlen: usize) -> Result<Buf> {
        let cmd = CmdName {
            opcode: input.get(hdr::OPCODE) as u16,
            op_mod: input.get(hdr::OP_MOD) as u16,
        };
        let outlen = outlen.max(hdr::LEN);
        let slot_no = match cmd.opcode {
            op::QUERY_PAGES | op::MANAGE_PAGES => self.slots() - 1,
            _ => 0,
        };
        let mut st = self.lock();
        if let Some(why) = &st.wedged {
            return Err(Error::Timeout {
                dev: self.dev.clone(),
                what: format!("{cmd}: the command queue is unusable since {why}, which"),
                ms: 0,
            });
        }
        st.token = st.token.wrapping_add(1).max(1);
        let token = st.token;
        let inb = input.as_bytes();
        let n_in = inb
            .len()
            .saturating_sub(slot::INLINE)
            .div_ceil(slot::MB_DATA_LEN);
        let n_out = outlen
            .saturating_sub(slot::INLINE)
            .div_ceil(slot::MB_DATA_LEN);
        let State {
            in_blocks,
            out_blocks,
            ..
        } = &mut *st;
        self.blocks(in_blocks, n_in)?;
        self.blocks(out_blocks, n_out)?;

        // Input chain: data beyond the inline bytes, 512 per block.
        for i in 0..n_in {
            let mut b = [0u8; slot::MB_SIZE];
            let from = slot::INLINE + i * slot::MB_DATA_LEN;
            let to = (from + slot::MB_DATA_LEN).min(inb.len());
            b[..to - from].copy_from_slice(&inb[from..to]);
            let next = if i + 1 < n_in {
                in_blocks[i + 1].iova()
            } else {
                0
            };
            self.block_header(&mut b, next, i as u32, token, true);
            in_blocks[i].write(0, &b)?;
        }
        // Output chain: headers only; the device fills the data.
        for i in 0..n_out {
            let mut b = [0u8; slot::MB_SIZE];
            let next = if i + 1 < n_out {
                out_blocks[i + 1].iova()
            } else {
                0
            };
            self.block_header(&mut b, next, i as u32, token, false);
            out_blocks[i].write(0, &b)?;
        }

        let mut d = [0u8; slot::SIZE];
        d[slot::TYPE] = slot::TYPE_PCI;
        d[slot::INLEN..slot::INLEN + 4].copy_from_slice(&(inb.len() as u32).to_be_bytes());
        let in_ptr = if n_in > 0 { in_blocks[0].iova() } else { 0 };
        d[slot::IN_PTR..slot::IN_PTR + 8].copy_from_slice(&in_ptr.to_be_bytes());
        let k = inb.len().min(slot::INLINE);
        d[slot::IN..slot::IN + k].copy_from_slice(&inb[..k]);
        let out_ptr = if n_out > 0 { out_blocks[0].iova() } else { 0 };
        d[slot::OUT_PTR..slot::OUT_PTR + 8].copy_from_slice(&out_ptr.to_be_bytes());
        d[slot::OUTLEN..slot::OUTLEN + 4].copy_from_slice(&(outlen as u32).to_be_bytes());
        d[slot::TOKEN] = token;
        if self.opts.checksum {
            d[slot::SIG] = sig(&d[..slot::STATUS_OWN]);
        }
        d[slot::STATUS_OWN] = 1;
        let desc = self.page.iova() + (u64::from(slot_no) << self.log_stride);
        self.arena.write(desc, &d)?;
        // Descriptor and mailboxes are in memory before the device is told.
        fence(Ordering::SeqCst);
        self.pci
            .write32(iseg::BAR, iseg::CMD_DBELL, be_reg(1 << slot_no))?;

        let status = match self.wait(desc, cmd) {
            Ok(s) => s,
            Err(e) => {
                st.wedged = Some(format!("{cmd} timed out in slot {slot_no}"));
                return Err(e);
            }
        };
        fence(Ordering::Acquire);
        let delivery = status >> 1;
        if delivery != 0 {
            return Err(Error::Delivery {
                dev: self.dev.clone(),
                cmd,
                status: delivery,
            });
        }
        let mut out = vec![0u8; outlen];
        self.arena
            .read(desc + slot::OUT as u64, &mut out[..slot::INLINE])?;
        for i in 0..n_out {
            let from = slot::INLINE + i * slot::MB_DATA_LEN;
            let to = (from + slot::MB_DATA_LEN).min(outlen);
            st.out_blocks[i].read(0, &mut out[from..to])?;
        }
        st.executed += 1;
        drop(st);
        let out = Buf::from_vec(out);
        let status = out.get(hdr::STATUS) as u8;
        if status != 0 {
            return Err(Error::Command {
                dev: self.dev.clone(),
                cmd,
                status,
                syndrome: out.get(hdr::SYNDROME) as u32,
            });
        }
        Ok(out)
    }

    fn block_header(
        &self,
        b: &mut [u8; slot::MB_SIZE],
        next: u64,
        num: u32,
        token: u8,
        full: bool,
    ) {
        b[slot::MB_NEXT..slot::MB_NEXT + 8].copy_from_slice(&next.to_be_bytes());
        b[slot::MB_BLOCK_NUM..slot::MB_BLOCK_NUM + 4].copy_from_slice(&num.to_be_bytes());
        b[slot::MB_TOKEN] = token;
        if self.opts.checksum {
            b[slot::MB_CTRL_SIG] = sig(&b[slot::MB_DATA_LEN..slot::MB_CTRL_SIG]);
            if full {
                b[slot::MB_SIG] = sig(&b[..slot::MB_SIG]);
            }
        }
    }

    /// Polls the ownership bit of the descriptor at `desc` (bounded) and returns status_own.
    fn wait(&self, desc: u64, cmd: CmdName) -> Result<u8> {
        let start = Instant::now();
        let mut spins = 0u32;
        loop {
            let mut b = [0u8; 1];
            self.arena.read(desc + slot::STATUS_OWN as u64, &mut b)?;
            if b[0] & 1 == 0 {
                return Ok(b[0]);
            }
            if start.elapsed() >= self.opts.timeout {
                return Err(Error::Timeout {
                    dev: self.dev.clone(),
                    what: format!("completion of {cmd} (ownership bit still set)"),
                    ms: self.opts.timeout.as_millis() as u64,
                });
            }
            spins += 1;
            if spins < 256 {
                std::hint::spin_loop();
            } else {
                std::thread::sleep(Duration::from_micros(20));
            }
        }
    }
}

//! Base resources: UAR, PD, transport domain, TIS, the null key, UMEMs and memory keys.
//!
//! Every create returns the firmware's id; every destroy names it. Objects are plain ids here:
//! the owners ([`crate::virtq`], [`crate::vdpa`]) keep them and destroy them in reverse order.

use crate::dma::{DmaBuf, PAGE};
use crate::error::{CmdName, Error, Result};
use crate::hca::{Hca, cmd_in};
use crate::prm::{boot, mkey, op, steer, umem};

/// One contiguous piece of a memory key: key addresses `[va, va + len)` are IOVAs
/// `[iova, iova + len)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KeyPiece {
    /// First address in the key's space.
    pub va: u64,
    /// Its IOVA.
    pub iova: u64,
    /// Length in bytes.
    pub len: u64,
}

/// A UMEM: driver memory registered with the device.
#[derive(Debug)]
pub struct Umem {
    /// Firmware id.
    pub id: u32,
    /// Bytes registered.
    pub size: u64,
    /// The memory (kept until the UMEM is destroyed).
    pub buf: DmaBuf,
}

/// The largest MTT page the driver uses (1 GiB).
const MAX_LOG_PAGE: u32 = 30;
/// Entries of one KLM list entry's byte count (u32): pieces are cut at 1 GiB.
const KLM_CHUNK: u64 = 1 << 30;

impl Hca {
    /// ALLOC_PD.
    pub fn alloc_pd(&self) -> Result<u32> {
        self.exec_id(&cmd_in(op::ALLOC_PD, 0, 16))
    }
    /// DEALLOC_PD.
    pub fn dealloc_pd(&self, pd: u32) -> Result<()> {
        self.exec_destroy(op::DEALLOC_PD, pd)
    }
    /// ALLOC_UAR.
    pub fn alloc_uar(&self) -> Result<u32> {
        self.exec_id(&cmd_in(op::ALLOC_UAR, 0, 16))
    }
    /// DEALLOC_UAR.
    pub fn dealloc_uar(&self, uar: u32) -> Result<()> {
        self.exec_destroy(op::DEALLOC_UAR, uar)
    }
    /// ALLOC_TRANSPORT_DOMAIN.
    pub fn alloc_td(&self) -> Result<u32> {
        self.exec_id(&cmd_in(op::ALLOC_TRANSPORT_DOMAIN, 0, 16))
    }
    /// DEALLOC_TRANSPORT_DOMAIN.
    pub fn dealloc_td(&self, td: u32) -> Result<()> {
        self.exec_destroy(op::DEALLOC_TRANSPORT_DOMAIN, td)
    }

    /// CREATE_TIS in transport domain `td`.
    pub fn create_tis(&self, td: u32) -> Result<u32> {
        let mut b = cmd_in(op::CREATE_TIS, 0, steer::TIS_LEN);
        b.set(steer::TIS_TD, u64::from(td));
        self.exec_id(&b)
    }
    /// DESTROY_TIS.
    pub fn destroy_tis(&self, tis: u32) -> Result<()> {
        self.exec_destroy(op::DESTROY_TIS, tis)
    }

    /// QUERY_SPECIAL_CONTEXTS: the null key (accesses through it fail).
    pub fn null_mkey(&self) -> Result<u32> {
        let out = self.exec(&cmd_in(op::QUERY_SPECIAL_CONTEXTS, 0, 16), 32)?;
        Ok(out.get(boot::NULL_MKEY) as u32)
    }

    /// CREATE_UMEM over `size` bytes of fresh, zeroed driver memory.
    pub fn create_umem(&self, size: u64) -> Result<Umem> {
        let buf = self.arena().alloc(size)?;
        let n = buf.len() / PAGE;
        let mut b = cmd_in(op::CREATE_UMEM, 0, umem::MTT + 8 * n as usize);
        b.set(umem::LOG_PAGE_SIZE, 0);
        b.set(umem::PAGE_OFFSET, 0);
        b.set(umem::NUM_OF_MTT, n);
        for (i, p) in buf.pages().enumerate() {
            b.put_be64(umem::MTT + 8 * i, p | umem::MTT_RD | umem::MTT_WR);
        }
        let id = self.exec_id(&b)?;
        Ok(Umem { id, size, buf })
    }
    /// DESTROY_UMEM (the memory is freed when the [`Umem`] is dropped, after this).
    pub fn destroy_umem(&self, u: Umem) -> Result<()> {
        match self.exec_destroy(op::DESTROY_UMEM, u.id) {
            Ok(()) => Ok(()),
            Err(e) => {
                // The device may still use it: never hand this memory out again.
                std::mem::forget(u.buf);
                Err(e)
            }
        }
    }

    fn mkey_in(
        &self,
        pd: u32,
        variant: u8,
        mode: u8,
        start: u64,
        len: u64,
        entries: usize,
    ) -> crate::prm::Buf {
        let mut b = cmd_in(op::CREATE_MKEY, 0, mkey::ENTRIES + entries);
        b.set(mkey::ACCESS_MODE_1_0, u64::from(mode & 3));
        b.set(mkey::ACCESS_MODE_4_2, u64::from(mode >> 2));
        b.set(mkey::LR, 1);
        b.set(mkey::LW, 1);
        b.set(mkey::QPN, 0xff_ffff);
        b.set(mkey::MKEY_7_0, u64::from(variant));
        b.set(mkey::PD, u64::from(pd));
        b.set(mkey::START_ADDR, start);
        b.set(mkey::LEN, len);
        b
    }

    fn mkey_out(&self, b: &crate::prm::Buf, variant: u8) -> Result<u32> {
        let index = self.exec_id(b)?;
        if index == 0 {
            return Err(Error::BadReply {
                dev: self.name().to_string(),
                cmd: CmdName {
                    opcode: op::CREATE_MKEY,
                    op_mod: 0,
                },
                what: "key index 0 returned".into(),
            });
        }
        Ok(index << 8 | u32::from(variant))
    }

    /// CREATE_MKEY over one piece with a page list (MTT): the largest page size (up to 1 GiB)
    /// at which key address and IOVA are equally aligned, so a linear piece needs few entries.
    pub fn create_mtt_mkey(&self, pd: u32, piece: KeyPiece, variant: u8) -> Result<u32> {
        if piece.len == 0 {
            return Err(Error::Config {
                dev: self.name().to_string(),
                what: format!("memory key over 0 bytes at {:#x}", piece.va),
            });
        }
        let diff = piece.va ^ piece.iova;
        let log = (12..=MAX_LOG_PAGE)
            .rev()
            .find(|&l| diff & ((1u64 << l) - 1) == 0)
            .ok_or_else(|| Error::Config {
                dev: self.name().to_string(),
                what: format!(
                    "memory key piece va {:#x} / IOVA {:#x}: the two are not 4 KiB aligned alike",
                    piece.va, piece.iova
                ),
            })?;
        let pg = 1u64 << log;
        let first = piece.va & !(pg - 1);
        let n = (piece.va - first + piece.len).div_ceil(pg) as usize;
        // Entries go in whole octwords (two per octword).
        let octwords = n.div_ceil(2) as u64;
        let mut b = self.mkey_in(
            pd,
            variant,
            mkey::MODE_MTT,
            piece.va,
            piece.len,
            16 * octwords as usize,
        );
        b.set(mkey::OCTWORD_SIZE, octwords);
        b.set(mkey::OCTWORD_ACTUAL_SIZE, octwords);
        b.set(mkey::LOG_PAGE_SIZE, u64::from(log));
        let iova0 = piece.iova & !(pg - 1);
        for i in 0..n {
            b.put_be64(
                mkey::ENTRIES + 8 * i,
                (iova0 + i as u64 * pg) | umem::MTT_RD | umem::MTT_WR,
            );
        }
        self.mkey_out(&b, variant)
    }

    /// CREATE_MKEY in physical-address mode over the whole address space (key address = IOVA;
    /// the IOMMU alone decides what is reachable).
    pub fn create_pa_mkey(&self, pd: u32, variant: u8) -> Result<u32> {
        let mut b = self.mkey_in(pd, variant, mkey::MODE_PA, 0, 0, 0);
        b.set(mkey::LENGTH64, 1);
        self.mkey_out(&b, variant)
    }

    /// CREATE_MKEY indirect (KLM) over `[start, start + len)`: `entries` are (byte count, key,
    /// address in that key), in order; holes use the null key.
    pub fn create_klm_mkey(
        &self,
        pd: u32,
        start: u64,
        len: u64,
        entries: &[(u32, u32, u64)],
        variant: u8,
    ) -> Result<u32> {
        let padded = entries.len().next_multiple_of(4);
        let mut b = self.mkey_in(
            pd,
            variant,
            mkey::MODE_KLM,
            start,
            len,
            mkey::KLM_SIZE * padded,
        );
        b.set(mkey::OCTWORD_SIZE, padded as u64);
        b.set(mkey::OCTWORD_ACTUAL_SIZE, padded as u64);
        for (i, &(count, key, addr)) in entries.iter().enumerate() {
            let o = mkey::ENTRIES + mkey::KLM_SIZE * i;
            b.put_be32(o, count);
            b.put_be32(o + 4, key);
            b.put_be64(o + 8, addr);
        }
        self.mkey_out(&b, variant)
    }

    /// DESTROY_MKEY.
    pub fn destroy_mkey(&self, key: u32) -> Result<()> {
        let mut b = cmd_in(op::DESTROY_MKEY, 0, 16);
        b.set(mkey::DESTROY_INDEX, u64::from(key >> 8));
        self.exec(&b, 16).map(|_| ())
    }

    /// QUERY_NIC_VPORT_CONTEXT: the permanent MAC address and the MTU.
    pub fn query_vport(&self) -> Result<([u8; 6], u16)> {
        use crate::prm::vport;
        let out = self.exec(
            &cmd_in(op::QUERY_NIC_VPORT_CONTEXT, 0, 16),
            vport::QUERY_CTX as usize + vport::CTX_LEN,
        )?;
        let addr = out.get(vport::PERMANENT_ADDRESS.at(vport::QUERY_CTX));
        let b = addr.to_be_bytes();
        let mut mac = [0u8; 6];
        mac.copy_from_slice(&b[2..8]);
        let mtu =
            (out.get(vport::MTU.at(vport::QUERY_CTX)) as u16).saturating_sub(vport::MTU_OVERHEAD);
        Ok((mac, mtu))
    }
}

/// Memory keys over a set of pieces: one MTT key per piece, and a KLM key over them all when
/// there is more than one (holes between pieces go to the null key); pieces too far apart for
/// an indirect list get one physical-address key instead.
#[derive(Debug, Default)]
pub struct KeySet {
    /// The per-piece keys.
    pub mtt: Vec<u32>,
    /// The indirect key, if any.
    pub klm: Option<u32>,
    /// The physical-address key, when the pieces are too far apart for an indirect one.
    pub pa: Option<u32>,
    /// The key queues use.
    pub key: u32,
}

impl KeySet {
    /// Builds the keys for `pieces` (sorted by `va`, not overlapping). On failure, the keys
    /// made so far are destroyed.
    pub fn create(
        hca: &Hca,
        pd: u32,
        null_mkey: u32,
        pieces: &[KeyPiece],
        variant: u8,
    ) -> Result<KeySet> {
        let mut set = KeySet::default();
        let r = (|| {
            for p in pieces {
                set.mtt.push(hca.create_mtt_mkey(pd, *p, variant)?);
            }
            match pieces {
                [] => Err(Error::Config {
                    dev: hca.name().to_string(),
                    what: "no memory to build a key over (nothing is DMA-mapped)".into(),
                }),
                [_] => {
                    set.key = set.mtt[0];
                    Ok(())
                }
                _ => {
                    let start = pieces[0].va;
                    let mut entries = Vec::new();
                    let mut at = start;
                    let max = (1usize << hca.caps().general.log_max_klm_list_size).min(4096);
                    for (p, &key) in pieces.iter().zip(&set.mtt) {
                        let mut hole = p.va - at;
                        while hole > 0 && entries.len() <= max {
                            let n = hole.min(KLM_CHUNK);
                            entries.push((n as u32, null_mkey, 0));
                            hole -= n;
                        }
                        let mut off = 0;
                        while off < p.len && entries.len() <= max {
                            let n = (p.len - off).min(KLM_CHUNK);
                            entries.push((n as u32, key, p.va + off));
                            off += n;
                        }
                        at = p.va + p.len;
                    }
                    if entries.len() > max {
                        // Spread too far apart for an indirect list (a mediated ring or log
                        // far above guest memory): a physical key, the IOMMU restricting it.
                        tracing::debug!(
                            "{}: {} pieces spanning {:#x}..{at:#x}: physical-address key",
                            hca.name(),
                            pieces.len(),
                            start
                        );
                        for k in set.mtt.drain(..).rev() {
                            hca.destroy_mkey(k)?;
                        }
                        set.key = hca.create_pa_mkey(pd, variant)?;
                        set.pa = Some(set.key);
                        return Ok(());
                    }
                    let k = hca.create_klm_mkey(pd, start, at - start, &entries, variant)?;
                    set.klm = Some(k);
                    set.key = k;
                    Ok(())
                }
            }
        })();
        match r {
            Ok(()) => Ok(set),
            Err(e) => {
                set.destroy(hca);
                Err(e)
            }
        }
    }

    /// Destroys the keys (indirect first). Failures are logged.
    pub fn destroy(&mut self, hca: &Hca) {
        if let Some(k) = self.pa.take()
            && let Err(e) = hca.destroy_mkey(k)
        {
            tracing::warn!("{e}");
        }
        if let Some(k) = self.klm.take()
            && let Err(e) = hca.destroy_mkey(k)
        {
            tracing::warn!("{e}");
        }
        for k in self.mtt.drain(..).rev() {
            if let Err(e) = hca.destroy_mkey(k) {
                tracing::warn!("{e}");
            }
        }
        self.key = 0;
    }
}

//! The device IOTLB of a vhost-user back end whose front end negotiated
//! `VIRTIO_F_ACCESS_PLATFORM` (a guest behind a virtual IOMMU).
//!
//! With ACCESS_PLATFORM every address the driver gives the device (ring addresses of
//! SET_VRING_ADDR, descriptor and indirect table addresses) is an I/O virtual address. The front
//! end tells the back end which IOVA ranges map where with IOTLB_MSG UPDATE (IOVA range → front
//! end virtual address + permissions) and INVALIDATE (drop a range); the back end asks for a
//! range it lacks with an IOTLB MISS on the back-end channel.
//!
//! [`Iotlb`] keeps the entries (non-overlapping, keyed by IOVA). [`Iotlb::view`] turns them into
//! a [`GuestMemory`] whose "guest physical" (and "virtual") addresses are IOVAs: each entry
//! becomes one region per memory-table region it lands in, over the same host mapping, with the
//! entry's permissions ([`GuestRegion::with_access`]). The datapath runs on that view unchanged:
//! an IOVA that no entry maps is outside memory, a write into a read-only entry fails the same
//! way, and neither is ever performed.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};

use super::msg::IotlbMsg;
use crate::virtio::{GuestMemory, MAX_VIEW_REGIONS, QueueError};

/// IOTLB message type: the back end lacks a translation (back end → front end).
pub const MISS: u8 = 1;
/// IOTLB message type: a new translation (front end → back end).
pub const UPDATE: u8 = 2;
/// IOTLB message type: drop the translations of a range (front end → back end).
pub const INVALIDATE: u8 = 3;
/// IOTLB message type: an access failed (back end → front end; vdpakit does not send it).
pub const ACCESS_FAIL: u8 = 4;

/// Permission: the device may read.
pub const PERM_RO: u8 = 1;
/// Permission: the device may write.
pub const PERM_WO: u8 = 2;
/// Permission: both.
pub const PERM_RW: u8 = 3;

/// The most entries kept. The IOTLB is a cache: beyond this the lowest entries are dropped and
/// come back through a miss if the device needs them again.
pub const MAX_ENTRIES: usize = 2048;

/// One translation: `[iova, iova + size)` → front-end virtual `[uaddr, uaddr + size)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Entry {
    /// First IOVA.
    pub iova: u64,
    /// Bytes (non-zero).
    pub size: u64,
    /// Front-end virtual address of `iova`.
    pub uaddr: u64,
    /// [`PERM_RO`], [`PERM_WO`] or [`PERM_RW`].
    pub perm: u8,
}

impl Entry {
    fn end(&self) -> u64 {
        // Checked when the entry was made.
        self.iova + self.size
    }
}

/// A checked IOTLB_MSG from the front end.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    /// Insert (replacing whatever overlaps).
    Update(Entry),
    /// Remove `[iova, iova + size)`.
    Invalidate {
        /// First IOVA.
        iova: u64,
        /// Bytes.
        size: u64,
    },
}

/// Checks an IOTLB_MSG from the front end: the type (UPDATE or INVALIDATE), a non-zero size,
/// ranges whose end does not overflow, and (UPDATE) a permission of 1..=3. The error names the
/// value and what is accepted.
pub fn check(m: &IotlbMsg) -> Result<Op, String> {
    let kind = match m.kind {
        UPDATE | INVALIDATE => m.kind,
        MISS | ACCESS_FAIL => {
            return Err(format!(
                "type {} ({}) is sent by the back end, not to it: accepted are 2 (UPDATE) and 3 (INVALIDATE)",
                m.kind,
                if m.kind == MISS {
                    "MISS"
                } else {
                    "ACCESS_FAIL"
                }
            ));
        }
        k => {
            return Err(format!(
                "unknown type {k}: accepted are 2 (UPDATE) and 3 (INVALIDATE)"
            ));
        }
    };
    let name = if kind == UPDATE {
        "UPDATE"
    } else {
        "INVALIDATE"
    };
    if m.size == 0 {
        return Err(format!(
            "{name} of iova {:#x} has size 0: at least 1 byte",
            m.iova
        ));
    }
    if m.iova.checked_add(m.size).is_none() {
        return Err(format!(
            "{name}: iova {:#x} + size {:#x} overflows 64 bits",
            m.iova, m.size
        ));
    }
    if kind == INVALIDATE {
        return Ok(Op::Invalidate {
            iova: m.iova,
            size: m.size,
        });
    }
    if m.uaddr.checked_add(m.size).is_none() {
        return Err(format!(
            "UPDATE: uaddr {:#x} + size {:#x} overflows 64 bits",
            m.uaddr, m.size
        ));
    }
    if !(PERM_RO..=PERM_RW).contains(&m.perm) {
        return Err(format!(
            "UPDATE of iova {:#x}: permission {} (accepted: 1 RO, 2 WO, 3 RW)",
            m.iova, m.perm
        ));
    }
    Ok(Op::Update(Entry {
        iova: m.iova,
        size: m.size,
        uaddr: m.uaddr,
        perm: m.perm,
    }))
}

/// A translation the datapath lacked, handed to the control thread without a lock or a
/// system call: the poller stores the buffer (at most one outstanding per vring, the latest
/// wins) and stops the burst there, leaving the chain in the ring; the control thread takes it
/// on its next tick and sends the front end a MISS. The chain is popped again once an UPDATE
/// has rebuilt the ring's view.
#[derive(Debug)]
pub struct MissCell {
    addr: AtomicU64,
    len_write: AtomicU64,
}

/// `MissCell::addr` when nothing is outstanding (no buffer ends there: its end would overflow).
const NO_MISS: u64 = u64::MAX;

impl Default for MissCell {
    fn default() -> Self {
        MissCell {
            addr: AtomicU64::new(NO_MISS),
            len_write: AtomicU64::new(0),
        }
    }
}

impl MissCell {
    /// Reports `[addr, addr + len)`, to be written when `write`, as not translatable (poller).
    #[cold]
    pub fn report(&self, addr: u64, len: u32, write: bool) {
        self.len_write
            .store(u64::from(len) << 1 | u64::from(write), Ordering::Relaxed);
        self.addr.store(addr, Ordering::Release);
    }

    /// Takes the outstanding report (control thread): `(addr, len, write)`.
    pub fn take(&self) -> Option<(u64, u32, bool)> {
        let a = self.addr.swap(NO_MISS, Ordering::Acquire);
        if a == NO_MISS {
            return None;
        }
        let lw = self.len_write.load(Ordering::Relaxed);
        Some((a, (lw >> 1) as u32, lw & 1 != 0))
    }
}

/// The guest access a queue error was about, when the error is a failed translation (which,
/// with an IOTLB, may just be a translation not asked for yet): `(address, length, write)`.
pub fn failed_access(e: &QueueError) -> Option<(u64, u32, bool)> {
    match *e {
        QueueError::BadBuffer { addr, len, write } => Some((addr, len, write)),
        QueueError::IndirectTableNotInMemory { addr, len } => Some((addr, len, false)),
        QueueError::MemAccess { gpa, len } => {
            Some((gpa, len.min(u64::from(u32::MAX)) as u32, false))
        }
        _ => None,
    }
}

/// The translations. See the module documentation.
#[derive(Debug, Default, Clone)]
pub struct Iotlb {
    map: BTreeMap<u64, Entry>,
}

impl Iotlb {
    /// An empty IOTLB.
    pub fn new() -> Iotlb {
        Iotlb::default()
    }

    /// Entries held.
    pub fn len(&self) -> usize {
        self.map.len()
    }

    /// Whether it holds no entry.
    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    /// The entries, by IOVA.
    pub fn entries(&self) -> impl Iterator<Item = &Entry> {
        self.map.values()
    }

    /// Drops everything.
    pub fn clear(&mut self) {
        self.map.clear();
    }

    /// Applies a checked message.
    pub fn apply(&mut self, op: Op) {
        match op {
            Op::Update(e) => self.update(e),
            Op::Invalidate { iova, size } => self.invalidate(iova, size),
        }
    }

    /// Inserts `e`, first cutting whatever it overlaps out of the older entries.
    pub fn update(&mut self, e: Entry) {
        self.invalidate(e.iova, e.size);
        self.map.insert(e.iova, e);
        while self.map.len() > MAX_ENTRIES {
            let Some(k) = self.map.keys().copied().find(|&k| k != e.iova) else {
                break;
            };
            self.map.remove(&k);
        }
    }

    /// Removes `[iova, iova + size)` (entries partly inside keep their outside parts).
    pub fn invalidate(&mut self, iova: u64, size: u64) {
        let Some(end) = iova.checked_add(size) else {
            return;
        };
        if size == 0 {
            return;
        }
        let hit: Vec<Entry> = self
            .map
            .range(..end)
            .rev()
            .map(|(_, e)| *e)
            .take_while(|e| e.end() > iova)
            .collect();
        for e in hit {
            self.map.remove(&e.iova);
            if e.iova < iova {
                let size = iova - e.iova;
                self.map.insert(e.iova, Entry { size, ..e });
            }
            if e.end() > end {
                let off = end - e.iova;
                self.map.insert(
                    end,
                    Entry {
                        iova: end,
                        size: e.end() - end,
                        uaddr: e.uaddr + off,
                        perm: e.perm,
                    },
                );
            }
        }
    }

    /// The entry holding `iova`.
    pub fn lookup(&self, iova: u64) -> Option<&Entry> {
        self.map
            .range(..=iova)
            .next_back()
            .map(|(_, e)| e)
            .filter(|e| iova - e.iova < e.size)
    }

    /// The first byte of `[iova, iova + len)` no entry maps (`len` 0 counts as 1), or `None` if
    /// all of it is mapped.
    pub fn first_unmapped(&self, iova: u64, len: u64) -> Option<u64> {
        let last = iova.saturating_add(len.max(1) - 1);
        let mut cur = iova;
        loop {
            let Some(e) = self.lookup(cur) else {
                return Some(cur);
            };
            let e_last = e.iova + (e.size - 1);
            if e_last >= last {
                return None;
            }
            cur = e_last + 1;
        }
    }

    /// Whether every byte of `[iova, iova + len)` is mapped with the permissions of `perm`.
    pub fn allows(&self, iova: u64, len: u64, perm: u8) -> bool {
        let last = iova.saturating_add(len.max(1) - 1);
        let mut cur = iova;
        loop {
            let Some(e) = self.lookup(cur) else {
                return false;
            };
            if e.perm & perm != perm {
                return false;
            }
            let e_last = e.iova + (e.size - 1);
            if e_last >= last {
                return true;
            }
            cur = e_last + 1;
        }
    }

    /// The translated view over `mem` (the memory table): one region per piece of an entry that
    /// lies in a memory-table region, at `gpa = uva = iova`, with the entry's permissions. Parts
    /// of an entry outside the memory table are left out (the device cannot reach them).
    pub fn view(&self, mem: &GuestMemory) -> Result<GuestMemory, QueueError> {
        // (memory-table region, offset in it, length, iova, perm): pieces that continue each
        // other in the region and in IOVA space with the same permissions become one region
        // (a vIOMMU maps page by page; a ring or a buffer over several pages must still be
        // one range).
        let mut pieces: Vec<(usize, u64, u64, u64, u8)> = Vec::new();
        for e in self.map.values() {
            let (ua, ub) = (
                u128::from(e.uaddr),
                u128::from(e.uaddr) + u128::from(e.size),
            );
            for (ri, r) in mem.regions().iter().enumerate() {
                let (ra, rb) = (
                    u128::from(r.uva()),
                    u128::from(r.uva()) + u128::from(r.size()),
                );
                let (a, b) = (ua.max(ra), ub.min(rb));
                if a >= b {
                    continue;
                }
                // All of these fit u64: a and b lie within [ra, rb] and [ua, ub].
                let off = (a - ra) as u64;
                let len = (b - a) as u64;
                let iova = e.iova + (a - ua) as u64;
                if let Some(last) = pieces.last_mut()
                    && last.0 == ri
                    && last.1 + last.2 == off
                    && last.3 + last.2 == iova
                    && last.4 == e.perm
                {
                    last.2 += len;
                    continue;
                }
                if pieces.len() == MAX_VIEW_REGIONS {
                    return Err(QueueError::TooManyRegions {
                        count: pieces.len() + 1,
                        max: MAX_VIEW_REGIONS,
                    });
                }
                pieces.push((ri, off, len, iova, e.perm));
            }
        }
        let regions = mem.regions();
        let out = pieces
            .into_iter()
            .filter_map(|(ri, off, len, iova, perm)| {
                let piece = regions.get(ri)?.slice(off, len)?;
                Some(
                    piece
                        .rebased(iova, iova)
                        .with_access(perm & PERM_RO != 0, perm & PERM_WO != 0),
                )
            })
            .collect();
        GuestMemory::new_view(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::virtio::GuestRegion;

    fn msg(kind: u8, iova: u64, size: u64, uaddr: u64, perm: u8) -> IotlbMsg {
        IotlbMsg {
            iova,
            size,
            uaddr,
            perm,
            kind,
        }
    }

    fn e(iova: u64, size: u64, uaddr: u64, perm: u8) -> Entry {
        Entry {
            iova,
            size,
            uaddr,
            perm,
        }
    }

    #[test]
    fn check_names_bad_values() {
        let err = |m: IotlbMsg| check(&m).unwrap_err();
        assert!(err(msg(9, 0, 1, 0, 3)).contains("unknown type 9"));
        assert!(err(msg(MISS, 0, 1, 0, 3)).contains("type 1 (MISS)"));
        assert!(err(msg(ACCESS_FAIL, 0, 1, 0, 3)).contains("type 4 (ACCESS_FAIL)"));
        assert!(err(msg(UPDATE, 0x5000, 0, 0, 3)).contains("iova 0x5000 has size 0"));
        assert!(
            err(msg(INVALIDATE, 0x5000, 0, 0, 3)).contains("INVALIDATE of iova 0x5000 has size 0")
        );
        let o = err(msg(UPDATE, u64::MAX - 0xf, 0x20, 0, 3));
        assert!(
            o.contains("iova 0xfffffffffffffff0 + size 0x20 overflows"),
            "{o}"
        );
        assert!(err(msg(UPDATE, 0, 0x20, u64::MAX, 3)).contains("uaddr 0xffffffffffffffff"));
        assert!(err(msg(UPDATE, 0x1000, 0x20, 0, 0)).contains("permission 0"));
        assert!(err(msg(UPDATE, 0x1000, 0x20, 0, 4)).contains("permission 4"));
        assert_eq!(
            check(&msg(UPDATE, 0x1000, 0x20, 0x7000, 1)).unwrap(),
            Op::Update(e(0x1000, 0x20, 0x7000, 1))
        );
        assert_eq!(
            check(&msg(INVALIDATE, 0x1000, 0x20, 0, 0)).unwrap(),
            Op::Invalidate {
                iova: 0x1000,
                size: 0x20
            }
        );
    }

    #[test]
    fn update_invalidate_and_lookups() {
        let mut t = Iotlb::new();
        t.update(e(0x1000, 0x3000, 0xa000, PERM_RW));
        t.update(e(0x8000, 0x1000, 0x2_0000, PERM_RO));
        assert_eq!(t.lookup(0x3fff).unwrap().iova, 0x1000);
        assert!(t.lookup(0x4000).is_none());
        assert_eq!(t.first_unmapped(0x1000, 0x3000), None);
        assert_eq!(t.first_unmapped(0x1000, 0x3001), Some(0x4000));
        assert_eq!(t.first_unmapped(0x500, 0x10), Some(0x500));
        assert!(t.allows(0x8000, 0x1000, PERM_RO));
        assert!(!t.allows(0x8000, 1, PERM_WO));
        // Invalidate the middle page of the first entry: two pieces stay, uaddr follows.
        t.invalidate(0x2000, 0x1000);
        let v: Vec<Entry> = t.entries().copied().collect();
        assert_eq!(
            v,
            [
                e(0x1000, 0x1000, 0xa000, 3),
                e(0x3000, 0x1000, 0xc000, 3),
                e(0x8000, 0x1000, 0x2_0000, 1)
            ]
        );
        assert_eq!(t.first_unmapped(0x1000, 0x3000), Some(0x2000));
        // An update over a range replaces what it overlaps.
        t.update(e(0x1800, 0x2000, 0x5_0000, PERM_WO));
        let v: Vec<Entry> = t.entries().copied().collect();
        assert_eq!(
            v,
            [
                e(0x1000, 0x800, 0xa000, 3),
                e(0x1800, 0x2000, 0x5_0000, 2),
                e(0x3800, 0x800, 0xc800, 3),
                e(0x8000, 0x1000, 0x2_0000, 1)
            ]
        );
        t.invalidate(0, u64::MAX);
        assert!(t.is_empty());
        // At the very top of the space.
        t.update(e(u64::MAX - 0xfff, 0xfff, 0, PERM_RO));
        assert_eq!(t.first_unmapped(u64::MAX - 0xfff, 0xfff), None);
    }

    #[test]
    fn the_cache_is_bounded() {
        let mut t = Iotlb::new();
        for i in 0..(MAX_ENTRIES as u64 + 10) {
            t.update(e(i * 0x1000, 0x1000, i * 0x1000, PERM_RW));
        }
        assert_eq!(t.len(), MAX_ENTRIES);
        // The newest is kept.
        assert!(t.lookup((MAX_ENTRIES as u64 + 9) * 0x1000).is_some());
    }

    /// The view maps IOVAs onto the memory table's host memory through the entries' uaddrs,
    /// splits an entry across two memory regions, leaves out what no region backs, and applies
    /// the permissions.
    #[test]
    fn view_translates_through_the_memory_table() {
        let mut m = memmap2::MmapMut::map_anon(0x4000).unwrap();
        let host = m.as_mut_ptr();
        let upper = host.wrapping_add(0x2000);
        // SAFETY: the lower half of `m`, which outlives the region (the test holds it); the
        // test never holds references into the mapping while the region is used.
        let lo = unsafe { GuestRegion::from_raw(host, 0x2000, 0x10_0000, 0x7000_0000, None) };
        // SAFETY: the upper half of `m`, as above.
        let hi = unsafe { GuestRegion::from_raw(upper, 0x2000, 0x20_0000, 0x7000_2000, None) };
        let regions = vec![lo, hi];
        let mem = GuestMemory::new(regions).unwrap();
        let mut t = Iotlb::new();
        // Spans both regions and runs 0x1000 past the table.
        t.update(e(0xabc_0000, 0x5000, 0x7000_0000, PERM_RW));
        t.update(e(0x10_0000, 0x1000, 0x7000_3000, PERM_RO));
        let v = t.view(&mem).unwrap();
        assert_eq!(v.regions().len(), 3);
        v.write(0xabc_1ffe, b"seam").unwrap();
        let mut b = [0u8; 4];
        mem.read(0x10_1ffe, &mut b[..2]).unwrap();
        mem.read(0x20_0000, &mut b[2..]).unwrap();
        assert_eq!(&b, b"seam");
        assert!(v.read(0xabc_4000, &mut b).is_err(), "not backed");
        // IOVA 0x10_0000 is not GPA 0x10_0000: it is the last page of the second region.
        v.read(0x10_0000, &mut b).unwrap();
        let mut want = [0u8; 4];
        mem.read(0x20_1000, &mut want).unwrap();
        assert_eq!(b, want);
        assert!(v.write(0x10_0000, b"no").is_err(), "read-only");
    }

    /// A vIOMMU answers misses page by page: pages that continue each other (in IOVA, in the
    /// same memory region, with the same permissions) make one view region, so a ring or a
    /// buffer across them is one range; a gap, a jump in the backing or other permissions
    /// keep them apart.
    #[test]
    fn view_joins_pages_that_continue_each_other() {
        let mut m = memmap2::MmapMut::map_anon(0x8000).unwrap();
        // SAFETY: one region over `m`, which outlives it (the test holds it).
        let regions = unsafe {
            vec![GuestRegion::from_raw(
                m.as_mut_ptr(),
                0x8000,
                0x10_0000,
                0x7000_0000,
                None,
            )]
        };
        let mem = GuestMemory::new(regions).unwrap();
        let mut t = Iotlb::new();
        for i in 0..4 {
            t.update(e(
                0x5000_0000 + i * 0x1000,
                0x1000,
                0x7000_0000 + i * 0x1000,
                PERM_RW,
            ));
        }
        let v = t.view(&mem).unwrap();
        assert_eq!(v.regions().len(), 1);
        v.write(0x5000_0ffc, b"pages").unwrap();
        // Read-only next page: its own region; a jump in the backing: another.
        t.update(e(0x5000_4000, 0x1000, 0x7000_4000, PERM_RO));
        t.update(e(0x5000_5000, 0x1000, 0x7000_7000, PERM_RW));
        let v = t.view(&mem).unwrap();
        assert_eq!(v.regions().len(), 3);
        assert!(
            v.write(0x5000_3ffe, b"ro!").is_err(),
            "crosses into a read-only page"
        );
    }
}

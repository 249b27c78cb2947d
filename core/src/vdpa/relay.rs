//! The software used-ring relay for live migration with a device that cannot log dirty pages
//! (DPDK's "software live migration" of ifc, `rte_vdpa_relay_vring_used`; split rings only).
//!
//! While the front end logs (VHOST_F_LOG_ALL), the device is configured with a *mediated* used
//! ring in vdpakit's own memory (DMA-mapped at [`MEDIATED_IOVA`]) instead of the guest's, and its
//! interrupts go to the relay's eventfds. The relay thread copies each new used entry to the
//! guest's used ring, walks that chain's descriptors (direct and indirect) and marks every page
//! the device wrote (writable buffers, up to the used length) and the used ring itself in the
//! front end's dirty log, publishes the guest's used index, and interrupts the guest. It also
//! mirrors the used ring's flags and `avail_event` (the device's notification suppression),
//! which the guest reads from its own ring.
//!
//! Everything goes through [`GuestMemory`]'s checked accessors: a descriptor pointing outside
//! guest memory is counted as an error and skipped, never dereferenced.

use std::os::fd::{AsFd, OwnedFd};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering, fence};
use std::thread::JoinHandle;

use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use nix::sys::eventfd::{EfdFlags, EventFd};

use super::VdpaError;
use crate::virtio::{DirtyLog, GuestMemory};

/// IOVA of the mediated used rings (far above guest memory and below the log, like DPDK's ifc).
pub const MEDIATED_IOVA: u64 = 0x2000_0000_0000;

const DESC_F_NEXT: u16 = 1;
const DESC_F_WRITE: u16 = 2;
const DESC_F_INDIRECT: u16 = 4;

/// Bytes of a split used ring of `size` entries (flags, idx, ring, avail_event).
pub fn used_ring_len(size: u16) -> u64 {
    4 + 8 * u64::from(size) + 2
}

/// One relayed ring.
#[derive(Debug)]
pub struct RelayRing {
    /// vring index.
    pub index: u16,
    /// Ring size.
    pub size: u16,
    /// Guest descriptor table (GPA).
    pub desc: u64,
    /// Guest used ring (GPA).
    pub guest_used: u64,
    /// Mediated used ring (address in `mediated`).
    pub mediated_used: u64,
    /// The guest's call eventfd.
    pub call: Option<Arc<OwnedFd>>,
    /// The eventfd the device interrupts.
    pub irq: Arc<OwnedFd>,
    /// Next used index to relay.
    pub next: u16,
}

/// Relay counters.
#[derive(Debug, Default)]
pub struct RelayStats {
    /// Used entries copied.
    pub entries: AtomicU64,
    /// Chains whose descriptors could not be walked (outside guest memory, loops).
    pub errors: AtomicU64,
}

/// A running relay thread.
#[derive(Debug)]
pub struct UsedRelay {
    stop: Arc<EventFd>,
    thread: Option<JoinHandle<Vec<u16>>>,
    stats: Arc<RelayStats>,
}

struct Ctx {
    guest: GuestMemory,
    mediated: GuestMemory,
    log: DirtyLog,
    stats: Arc<RelayStats>,
}

impl UsedRelay {
    /// Starts relaying `rings`. Each ring's mediated used ring must already hold the guest's
    /// used index (see [`init_mediated`]).
    pub fn start(
        name: &str,
        guest: GuestMemory,
        mediated: GuestMemory,
        log: DirtyLog,
        rings: Vec<RelayRing>,
    ) -> Result<UsedRelay, VdpaError> {
        let err = |what: String| VdpaError::Device {
            dev: name.to_string(),
            what,
        };
        let stop = Arc::new(
            EventFd::from_flags(EfdFlags::EFD_CLOEXEC | EfdFlags::EFD_NONBLOCK)
                .map_err(|e| err(format!("relay eventfd: {e}")))?,
        );
        let stats = Arc::new(RelayStats::default());
        let ctx = Ctx {
            guest,
            mediated,
            log,
            stats: Arc::clone(&stats),
        };
        let stop2 = Arc::clone(&stop);
        let thread = std::thread::Builder::new()
            .name("vdpa-lm-relay".into())
            .spawn(move || run(ctx, rings, &stop2))
            .map_err(|e| err(format!("relay thread: {e}")))?;
        Ok(UsedRelay {
            stop,
            thread: Some(thread),
            stats,
        })
    }

    /// Counters.
    pub fn stats(&self) -> &Arc<RelayStats> {
        &self.stats
    }

    /// Relays what is left (call after the device stopped) and ends the thread; returns each
    /// ring's next used index.
    pub fn finish(mut self) -> Vec<u16> {
        let _ = self.stop.write(1);
        self.thread
            .take()
            .and_then(|t| t.join().ok())
            .unwrap_or_default()
    }
}

impl Drop for UsedRelay {
    fn drop(&mut self) {
        let _ = self.stop.write(1);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Prepares a mediated used ring for `size` entries: the guest's used index, flags and
/// avail_event copied in, so the device continues where the guest's ring is.
pub fn init_mediated(
    guest: &GuestMemory,
    guest_used: u64,
    mediated: &GuestMemory,
    mediated_used: u64,
    size: u16,
) -> Result<u16, String> {
    let mut head = [0u8; 4];
    guest
        .read(guest_used, &mut head)
        .map_err(|e| format!("guest used ring: {e}"))?;
    let mut ev = [0u8; 2];
    let ev_at = guest_used + 4 + 8 * u64::from(size);
    guest
        .read(ev_at, &mut ev)
        .map_err(|e| format!("guest used ring: {e}"))?;
    mediated
        .write(mediated_used, &head)
        .and_then(|()| mediated.write(mediated_used + 4 + 8 * u64::from(size), &ev))
        .map_err(|e| format!("mediated used ring: {e}"))?;
    Ok(u16::from_le_bytes([head[2], head[3]]))
}

fn run(ctx: Ctx, mut rings: Vec<RelayRing>, stop: &EventFd) -> Vec<u16> {
    loop {
        let stopping = {
            let mut fds: Vec<PollFd<'_>> = rings
                .iter()
                .map(|r| PollFd::new(r.irq.as_fd(), PollFlags::POLLIN))
                .collect();
            fds.push(PollFd::new(stop.as_fd(), PollFlags::POLLIN));
            // A 1 ms timeout: a device told by the guest not to interrupt still gets relayed.
            let _ = poll(&mut fds, PollTimeout::from(1u8));
            fds.last()
                .and_then(|p| p.revents())
                .is_some_and(|r| !r.is_empty())
        };
        for r in &mut rings {
            let mut b = [0u8; 8];
            let _ = nix::unistd::read(r.irq.as_fd(), &mut b);
            relay_ring(&ctx, r);
        }
        if stopping {
            return rings.iter().map(|r| r.next).collect();
        }
    }
}

fn rd16(m: &GuestMemory, at: u64) -> Option<u16> {
    let mut b = [0u8; 2];
    m.read(at, &mut b).ok()?;
    Some(u16::from_le_bytes(b))
}

/// Copies new used entries of one ring; returns how many.
fn relay_ring(ctx: &Ctx, r: &mut RelayRing) -> u16 {
    let size = u64::from(r.size);
    // Mirror notification suppression (flags, avail_event) every pass.
    let mut flags = [0u8; 2];
    let mut ev = [0u8; 2];
    let ev_off = 4 + 8 * size;
    if ctx.mediated.read(r.mediated_used, &mut flags).is_ok()
        && ctx.mediated.read(r.mediated_used + ev_off, &mut ev).is_ok()
    {
        let _ = ctx.guest.write(r.guest_used, &flags);
        let _ = ctx.guest.write(r.guest_used + ev_off, &ev);
        ctx.log.mark(r.guest_used, 2);
        ctx.log.mark(r.guest_used + ev_off, 2);
    }
    let Some(idx) = rd16(&ctx.mediated, r.mediated_used + 2) else {
        return 0;
    };
    // The entries the index covers are visible once the index is (the device published them
    // before it).
    fence(Ordering::Acquire);
    let n = idx.wrapping_sub(r.next);
    if n == 0 || n > r.size {
        return 0;
    }
    for k in 0..n {
        let slot = u64::from(r.next.wrapping_add(k)) % size;
        let mut e = [0u8; 8];
        let src = r.mediated_used + 4 + 8 * slot;
        let dst = r.guest_used + 4 + 8 * slot;
        if ctx.mediated.read(src, &mut e).is_err() || ctx.guest.write(dst, &e).is_err() {
            ctx.stats.errors.fetch_add(1, Ordering::Relaxed);
            continue;
        }
        ctx.log.mark(dst, 8);
        let id = u32::from_le_bytes([e[0], e[1], e[2], e[3]]);
        let len = u32::from_le_bytes([e[4], e[5], e[6], e[7]]);
        if !log_chain(ctx, r, id, len) {
            ctx.stats.errors.fetch_add(1, Ordering::Relaxed);
        }
    }
    ctx.stats.entries.fetch_add(u64::from(n), Ordering::Relaxed);
    r.next = idx;
    // Entries before the index the guest reads.
    fence(Ordering::Release);
    if ctx
        .guest
        .write(r.guest_used + 2, &idx.to_le_bytes())
        .is_ok()
    {
        ctx.log.mark(r.guest_used + 2, 2);
    }
    if let Some(c) = &r.call {
        let _ = nix::unistd::write(c.as_fd(), &1u64.to_ne_bytes());
    }
    n
}

/// Marks the pages of chain `head`'s writable buffers, up to `len` bytes. False when the chain
/// could not be walked.
fn log_chain(ctx: &Ctx, r: &RelayRing, head: u32, len: u32) -> bool {
    let mut left = u64::from(len);
    if head >= u32::from(r.size) {
        return false;
    }
    // (table address, entries, index)
    let (mut table, mut count, mut i) = (r.desc, u32::from(r.size), head);
    let mut steps = 0u32;
    let mut in_indirect = false;
    loop {
        steps += 1;
        if steps > u32::from(r.size) + 4096 || i >= count {
            return false;
        }
        let mut d = [0u8; 16];
        if ctx.guest.read(table + 16 * u64::from(i), &mut d).is_err() {
            return false;
        }
        let addr = u64::from_le_bytes(d[0..8].try_into().unwrap_or([0; 8]));
        let dlen = u32::from_le_bytes(d[8..12].try_into().unwrap_or([0; 4]));
        let flags = u16::from_le_bytes([d[12], d[13]]);
        let next = u16::from_le_bytes([d[14], d[15]]);
        if flags & DESC_F_INDIRECT != 0 {
            if in_indirect || dlen < 16 || dlen % 16 != 0 {
                return false;
            }
            table = addr;
            count = dlen / 16;
            i = 0;
            in_indirect = true;
            continue;
        }
        if flags & DESC_F_WRITE != 0 && left > 0 {
            let n = left.min(u64::from(dlen));
            ctx.log.mark(addr, n);
            left -= n;
        }
        if flags & DESC_F_NEXT == 0 {
            return true;
        }
        i = u32::from(next);
    }
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, Instant};

    use super::*;
    use crate::mem::{MemMode, Segment};
    use crate::virtio::GuestRegion;

    /// Guest memory of 64 KiB at GPA 0x10000, a mediated ring page, and a log of 32 pages.
    struct Rig {
        guest: GuestMemory,
        mediated: GuestMemory,
        log: DirtyLog,
        _log_seg: Arc<Segment>,
        log_seg_base: *mut u8,
    }

    fn rig() -> Rig {
        let g = Segment::new("relay-guest", 0x10000, MemMode::NoHuge).unwrap();
        let guest = GuestMemory::new(vec![
            GuestRegion::from_segment(&g).rebased(0x10000, 0x10000),
        ])
        .unwrap();
        let m = Segment::new("relay-med", 4096, MemMode::NoHuge).unwrap();
        let mediated = GuestMemory::new(vec![
            GuestRegion::from_segment(&m).rebased(MEDIATED_IOVA, MEDIATED_IOVA),
        ])
        .unwrap();
        let l = Segment::new("relay-log", 4096, MemMode::NoHuge).unwrap();
        let base = l.base();
        // SAFETY: the segment is mapped read-write and kept alive by `keep` for the log's life.
        let log = unsafe { DirtyLog::from_raw(base, 4, Some(l.clone())) };
        Rig {
            guest,
            mediated,
            log,
            _log_seg: l,
            log_seg_base: base,
        }
    }

    fn dirty_pages(r: &Rig) -> Vec<u64> {
        let mut v = Vec::new();
        let mut b = [0u8; 4];
        for (i, x) in b.iter_mut().enumerate() {
            // SAFETY: the first 4 bytes of the log segment, mapped while the rig lives.
            *x = unsafe { r.log_seg_base.wrapping_add(i).read_volatile() };
        }
        for p in 0..32u64 {
            if b[(p / 8) as usize] & (1 << (p % 8)) != 0 {
                v.push(p);
            }
        }
        v
    }

    fn desc(m: &GuestMemory, table: u64, i: u16, addr: u64, len: u32, flags: u16, next: u16) {
        let mut d = [0u8; 16];
        d[0..8].copy_from_slice(&addr.to_le_bytes());
        d[8..12].copy_from_slice(&len.to_le_bytes());
        d[12..14].copy_from_slice(&flags.to_le_bytes());
        d[14..16].copy_from_slice(&next.to_le_bytes());
        m.write(table + 16 * u64::from(i), &d).unwrap();
    }

    #[test]
    fn relays_entries_and_logs_written_pages_only() {
        let r = rig();
        let (desc_t, used) = (0x10000u64, 0x11000u64);
        let size = 8u16;
        // Chain 0: readable header at page 0x12, writable 0x1000 bytes at page 0x14 + next.
        desc(&r.guest, desc_t, 0, 0x12000, 64, DESC_F_NEXT, 1);
        desc(&r.guest, desc_t, 1, 0x14000, 0x1800, DESC_F_WRITE, 0);
        // Chain 2: indirect table at 0x13000 with two writable buffers (pages 0x16, 0x18).
        desc(&r.guest, desc_t, 2, 0x13000, 32, DESC_F_INDIRECT, 0);
        desc(
            &r.guest,
            0x13000,
            0,
            0x16000,
            100,
            DESC_F_WRITE | DESC_F_NEXT,
            1,
        );
        desc(&r.guest, 0x13000, 1, 0x18000, 100, DESC_F_WRITE, 0);
        // The guest's used ring starts at idx 5.
        r.guest.write(used + 2, &5u16.to_le_bytes()).unwrap();
        let next = init_mediated(&r.guest, used, &r.mediated, MEDIATED_IOVA, size).unwrap();
        assert_eq!(next, 5);
        let irq = EventFd::from_flags(EfdFlags::EFD_NONBLOCK).unwrap();
        let irq: Arc<OwnedFd> = Arc::new(irq.into());
        let call = EventFd::from_flags(EfdFlags::EFD_NONBLOCK).unwrap();
        let relay = UsedRelay::start(
            "t",
            r.guest.clone(),
            r.mediated.clone(),
            r.log.clone(),
            vec![RelayRing {
                index: 0,
                size,
                desc: desc_t,
                guest_used: used,
                mediated_used: MEDIATED_IOVA,
                call: None,
                irq: Arc::clone(&irq),
                next,
            }],
        )
        .unwrap();
        drop(call);
        // The "device": two used entries in the mediated ring (slots 5 and 6), then idx 7.
        // Chain 0 wrote 0x1000 bytes (only page 0x14); chain 2 wrote 150 bytes (pages 0x16, 0x18).
        let entry = |slot: u64, id: u32, len: u32| {
            let mut e = [0u8; 8];
            e[..4].copy_from_slice(&id.to_le_bytes());
            e[4..].copy_from_slice(&len.to_le_bytes());
            r.mediated.write(MEDIATED_IOVA + 4 + 8 * slot, &e).unwrap();
        };
        entry(5, 0, 0x1000);
        entry(6, 2, 150);
        r.mediated
            .write(MEDIATED_IOVA + 2, &7u16.to_le_bytes())
            .unwrap();
        let end = Instant::now() + Duration::from_secs(5);
        while rd16(&r.guest, used + 2) != Some(7) {
            assert!(Instant::now() < end, "the relay never published");
            std::thread::sleep(Duration::from_millis(1));
        }
        let next = relay.finish();
        assert_eq!(next, vec![7]);
        let mut e = [0u8; 8];
        r.guest.read(used + 4 + 8 * 6, &mut e).unwrap();
        assert_eq!(u32::from_le_bytes(e[..4].try_into().unwrap()), 2);
        // Pages: used ring (0x11), buffers 0x14, 0x16, 0x18; not 0x12 (read-only header),
        // not 0x15 (beyond the written length), not the descriptor tables.
        assert_eq!(dirty_pages(&r), vec![0x11, 0x14, 0x16, 0x18]);
    }

    #[test]
    fn a_chain_outside_guest_memory_is_an_error_not_a_crash() {
        let r = rig();
        let (desc_t, used) = (0x10000u64, 0x11000u64);
        desc(&r.guest, desc_t, 0, 0xdead_0000, 64, DESC_F_WRITE, 0);
        desc(
            &r.guest,
            desc_t,
            1,
            0x12000,
            64,
            DESC_F_WRITE | DESC_F_NEXT,
            1,
        ); // loop
        let irq: Arc<OwnedFd> =
            Arc::new(EventFd::from_flags(EfdFlags::EFD_NONBLOCK).unwrap().into());
        let relay = UsedRelay::start(
            "t",
            r.guest.clone(),
            r.mediated.clone(),
            r.log.clone(),
            vec![RelayRing {
                index: 0,
                size: 4,
                desc: desc_t,
                guest_used: used,
                mediated_used: MEDIATED_IOVA,
                call: None,
                irq,
                next: 0,
            }],
        )
        .unwrap();
        let mut e = [0u8; 16];
        e[4..8].copy_from_slice(&64u32.to_le_bytes());
        e[8..12].copy_from_slice(&1u32.to_le_bytes());
        e[12..16].copy_from_slice(&64u32.to_le_bytes());
        r.mediated.write(MEDIATED_IOVA + 4, &e).unwrap();
        r.mediated
            .write(MEDIATED_IOVA + 2, &2u16.to_le_bytes())
            .unwrap();
        let stats = Arc::clone(relay.stats());
        let end = Instant::now() + Duration::from_secs(5);
        while stats.entries.load(Ordering::Relaxed) < 2 {
            assert!(Instant::now() < end);
            std::thread::sleep(Duration::from_millis(1));
        }
        assert_eq!(relay.finish(), vec![2]);
        // Chain 0's buffer is outside the log's 32 pages: ignored by the log, not an error;
        // chain 1 loops: an error.
        assert_eq!(stats.errors.load(Ordering::Relaxed), 1);
        assert_eq!(rd16(&r.guest, used + 2), Some(2));
    }
}

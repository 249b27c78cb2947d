//! The lock-free handshake between the control thread and the one poller of a queue.
//!
//! A [`Handoff<T>`] holds a queue's runtime state `T` (ring pointers, guest memory, call fd...).
//! The poller enters with [`Handoff::enter`] once per burst: it announces itself in `busy`, then
//! re-checks `open`; the control thread closes the gate with [`Handoff::close`], which clears `open`
//! and waits until `busy` is clear. Each side must see the other's store before its own load (a
//! Dekker handshake), so either the poller sees the gate closed and backs out, or the control
//! thread sees the poller busy and waits for the burst to finish: they never touch `T` at the same
//! time.
//!
//! The barrier is asymmetric: a full fence on the poller's side would cost every burst a drain of
//! the store buffer (which then waits for the previous burst's copies to and from guest memory),
//! so the poller only orders its accesses for the compiler and the control thread, when it
//! closes a gate, makes every thread of the process execute a full barrier with the
//! `membarrier(2)` system call (private expedited). Where the kernel does not offer it, both sides
//! fall back to SeqCst fences. No lock and no syscall on the datapath either way.
//!
//! While the gate is closed the control thread owns `T` exclusively ([`Closed`] gives `&mut`) and
//! may replace it (SET_MEM_TABLE, SET_VRING_ADDR...), read it (GET_VRING_BASE) or remove it.

use std::cell::UnsafeCell;
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering, compiler_fence, fence};

use crossbeam_utils::CachePadded;

/// See the module documentation.
#[derive(Debug)]
pub struct Handoff<T> {
    open: CachePadded<AtomicBool>,
    busy: CachePadded<AtomicBool>,
    state: UnsafeCell<Option<T>>,
}

// SAFETY: access to `state` is serialised by the open/busy handshake (see the module docs): the
// poller only while it is `busy` with the gate open, the control thread only while the gate is
// closed and the poller not busy. `T: Send` because it is used from both threads in turn.
unsafe impl<T: Send> Sync for Handoff<T> {}
// SAFETY: as above; moving the whole handoff moves `T`.
unsafe impl<T: Send> Send for Handoff<T> {}

/// Barrier mode: 0 not decided yet, 1 asymmetric (membarrier registered), 2 symmetric fences.
static MODE: AtomicU8 = AtomicU8::new(0);

const MEMBARRIER_CMD_QUERY: libc::c_int = 0;
const MEMBARRIER_CMD_PRIVATE_EXPEDITED: libc::c_int = 1 << 3;
const MEMBARRIER_CMD_REGISTER_PRIVATE_EXPEDITED: libc::c_int = 1 << 4;

fn membarrier(cmd: libc::c_int) -> libc::c_long {
    // SAFETY: membarrier(2) takes two integer arguments and a CPU id and touches no memory of
    // ours; an unsupported command fails with an error code.
    unsafe {
        libc::syscall(
            libc::SYS_membarrier,
            cmd,
            0 as libc::c_uint,
            0 as libc::c_int,
        )
    }
}

/// Decides the barrier mode once per process (registers for private expedited membarrier).
fn mode() -> u8 {
    let m = MODE.load(Ordering::Acquire);
    if m != 0 {
        return m;
    }
    let q = membarrier(MEMBARRIER_CMD_QUERY);
    let ok = q >= 0
        && q as libc::c_int & MEMBARRIER_CMD_PRIVATE_EXPEDITED != 0
        && membarrier(MEMBARRIER_CMD_REGISTER_PRIVATE_EXPEDITED) == 0;
    let m = if ok { 1 } else { 2 };
    // Every handoff decides before its first use; concurrent deciders reach the same answer.
    MODE.store(m, Ordering::Release);
    m
}

impl<T> Default for Handoff<T> {
    fn default() -> Self {
        // Decided here, before any poller can enter this handoff.
        let _ = mode();
        Handoff {
            open: CachePadded::new(AtomicBool::new(false)),
            busy: CachePadded::new(AtomicBool::new(false)),
            state: UnsafeCell::new(None),
        }
    }
}

impl<T> Handoff<T> {
    /// A closed, empty handoff.
    pub fn new() -> Self {
        Self::default()
    }

    /// Datapath: runs `f` on the state if the gate is open. Only one thread may call this (the
    /// queue's poller).
    #[inline(always)]
    pub fn enter<R>(&self, f: impl FnOnce(&mut T) -> R) -> Option<R> {
        if !self.open.load(Ordering::Relaxed) {
            return None;
        }
        self.busy.store(true, Ordering::Relaxed);
        if MODE.load(Ordering::Relaxed) == 1 {
            // The control thread's membarrier supplies the hardware barrier (module docs).
            compiler_fence(Ordering::SeqCst);
        } else {
            fence(Ordering::SeqCst);
        }
        if !self.open.load(Ordering::Relaxed) {
            self.busy.store(false, Ordering::Release);
            return None;
        }
        // SAFETY: the gate is open and we announced ourselves busy before re-checking it, so the
        // control thread (which closes the gate and then waits for `busy` to clear) is not
        // touching the state; only the single poller calls `enter`.
        let state = unsafe { &mut *self.state.get() };
        let r = state.as_mut().map(f);
        self.busy.store(false, Ordering::Release);
        r
    }

    /// Whether the gate is open (a hint for the datapath and for reporting).
    pub fn is_open(&self) -> bool {
        self.open.load(Ordering::Relaxed)
    }

    /// Control: closes the gate and waits for a burst in flight to finish. The returned guard
    /// gives exclusive access to the state; dropping it leaves the gate closed.
    pub fn close(&self) -> Closed<'_, T> {
        self.open.store(false, Ordering::SeqCst);
        if mode() == 1 && membarrier(MEMBARRIER_CMD_PRIVATE_EXPEDITED) != 0 {
            // Cannot happen once registered; if it did, the poller may not have seen the gate
            // close yet, so do not trust `busy` below without a barrier of ours: fall back for good.
            MODE.store(2, Ordering::SeqCst);
            tracing::error!("membarrier failed after registration; gates use full fences now");
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        let mut spins = 0u32;
        while self.busy.load(Ordering::SeqCst) {
            spins = spins.wrapping_add(1);
            if spins.is_multiple_of(1024) {
                std::thread::yield_now();
            } else {
                std::hint::spin_loop();
            }
        }
        Closed { h: self }
    }
}

/// Exclusive control-side access to a closed handoff.
#[derive(Debug)]
pub struct Closed<'a, T> {
    h: &'a Handoff<T>,
}

impl<T> Closed<'_, T> {
    /// The state.
    pub fn state(&mut self) -> &mut Option<T> {
        // SAFETY: the gate is closed and the poller was seen not busy after the close (SeqCst),
        // so it cannot be inside `enter`; later `enter` calls see the gate closed and back out.
        // `&mut self` makes this the only reference handed out by the guard.
        unsafe { &mut *self.h.state.get() }
    }

    /// Opens the gate again (with whatever state is installed; an empty state stays inert).
    pub fn open(self) {
        self.h.open.store(true, Ordering::Release);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn closed_gate_runs_nothing_and_open_gate_runs() {
        let h = Handoff::<u32>::new();
        assert_eq!(h.enter(|v| *v), None);
        let mut g = h.close();
        *g.state() = Some(5);
        g.open();
        assert_eq!(
            h.enter(|v| {
                *v += 1;
                *v
            }),
            Some(6)
        );
        {
            let mut g = h.close();
            assert_eq!(*g.state(), Some(6));
        }
        assert_eq!(
            h.enter(|v| *v),
            None,
            "dropping the guard leaves the gate closed"
        );
    }

    /// The poller increments a counter in two non-atomic steps inside `enter`; the control thread
    /// repeatedly closes the gate and checks that it never sees a half-done update and that the
    /// value only ever changes while the gate is open.
    #[test]
    fn control_and_poller_never_overlap() {
        let h = Arc::new(Handoff::<(u64, u64)>::new());
        {
            let mut g = h.close();
            *g.state() = Some((0, 0));
            g.open();
        }
        let stop = Arc::new(AtomicBool::new(false));
        let entered = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let (h2, stop2, entered2) = (Arc::clone(&h), Arc::clone(&stop), Arc::clone(&entered));
        let poller = std::thread::spawn(move || {
            while !stop2.load(Ordering::Relaxed) {
                if h2
                    .enter(|s| {
                        s.0 += 1;
                        std::hint::spin_loop();
                        s.1 += 1;
                    })
                    .is_some()
                {
                    entered2.fetch_add(1, Ordering::Relaxed);
                }
            }
        });
        let mut last = 0;
        // At least 2000 rounds, and on until the poller got in 100 times (a loaded machine may
        // not schedule it for a while), within a minute.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
        let mut rounds = 0u64;
        while rounds < 2000 || entered.load(Ordering::Relaxed) < 100 {
            assert!(
                std::time::Instant::now() < deadline,
                "the poller entered only {} times in a minute",
                entered.load(Ordering::Relaxed)
            );
            rounds += 1;
            let mut g = h.close();
            let (a, b) = g.state().unwrap();
            assert_eq!(a, b, "a burst was cut in half");
            assert!(a >= last);
            last = a;
            // While closed, nothing moves.
            std::hint::spin_loop();
            assert_eq!(g.state().unwrap(), (a, b));
            g.open();
            std::thread::yield_now();
        }
        stop.store(true, Ordering::Relaxed);
        poller.join().unwrap();
        assert!(entered.load(Ordering::Relaxed) >= 100);
    }
}

//! The lock-free handshake between the control thread and the one poller of a queue.
//!
//! A [`Handoff<T>`] holds a queue's runtime state `T` (ring pointers, guest memory, call fd...).
//! The poller enters with [`Handoff::enter`] once per burst: it announces itself in `busy`, then
//! re-checks `open`; the control thread closes the gate with [`Handoff::close`], which clears `open`
//! and waits until `busy` is clear. The two sides use SeqCst on the store-then-load pairs (a Dekker
//! handshake), so either the poller sees the gate closed and backs out, or the control thread sees
//! the poller busy and waits for the burst to finish: they never touch `T` at the same time. No
//! lock, no syscall, one SeqCst store and one load per burst on the datapath.
//!
//! While the gate is closed the control thread owns `T` exclusively ([`Closed`] gives `&mut`) and
//! may replace it (SET_MEM_TABLE, SET_VRING_ADDR...), read it (GET_VRING_BASE) or remove it.

use std::cell::UnsafeCell;
use std::sync::atomic::{AtomicBool, Ordering};

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

impl<T> Default for Handoff<T> {
    fn default() -> Self {
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
        self.busy.store(true, Ordering::SeqCst);
        if !self.open.load(Ordering::SeqCst) {
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
        let (h2, stop2) = (Arc::clone(&h), Arc::clone(&stop));
        let poller = std::thread::spawn(move || {
            let mut entered = 0u64;
            while !stop2.load(Ordering::Relaxed) {
                if h2
                    .enter(|s| {
                        s.0 += 1;
                        std::hint::spin_loop();
                        s.1 += 1;
                    })
                    .is_some()
                {
                    entered += 1;
                }
            }
            entered
        });
        let mut last = 0;
        for _ in 0..2000 {
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
        let entered = poller.join().unwrap();
        assert!(entered > 0);
    }
}

//! Synchronisation shim: loom's model-checked primitives under `cfg(loom)`,
//! the real `std` ones otherwise. Everything in the crate that is shared
//! between threads goes through this module so that the loom tests
//! (`tests/loom.rs`) check exactly the code that ships.

#[cfg(loom)]
pub(crate) use loom::{
    cell::UnsafeCell,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
};

#[cfg(not(loom))]
pub(crate) use std::{
    cell::UnsafeCell,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
};

/// Busy-wait helper for the MPMC tail hand-off.
///
/// Spins with [`core::hint::spin_loop`]; after a long spin (the thread we
/// wait for has probably been preempted, which happens when there are more
/// ring users than cores) it starts yielding the CPU so the waited-for thread
/// can run. Under loom every call yields, which is what loom needs to explore
/// spin loops without diverging.
#[derive(Debug, Default)]
pub(crate) struct Backoff {
    #[cfg(not(loom))]
    spins: u32,
}

impl Backoff {
    /// Spins before falling back to `yield_now`.
    #[cfg(not(loom))]
    const SPIN_LIMIT: u32 = 1 << 10;

    #[inline]
    pub(crate) fn snooze(&mut self) {
        #[cfg(loom)]
        loom::thread::yield_now();
        #[cfg(not(loom))]
        {
            if self.spins < Self::SPIN_LIMIT {
                self.spins += 1;
                core::hint::spin_loop();
            } else {
                std::thread::yield_now();
            }
        }
    }
}

//! The slot array shared by both ring flavours.
//!
//! `Slots` knows nothing about indices or synchronisation: it maps a
//! free-running index to a slot (`index & mask`) and copies runs of items in
//! and out. Callers (the SPSC and MPMC index protocols) guarantee exclusive
//! access to the slots they touch, which is what the `unsafe` contracts below
//! spell out.

use core::mem::MaybeUninit;

use crate::RingError;
use crate::sync::UnsafeCell;

/// Fixed-size, power-of-two array of possibly-uninitialised slots.
pub(crate) struct Slots<T> {
    cells: Box<[UnsafeCell<MaybeUninit<T>>]>,
    mask: usize,
}

// SAFETY: `Slots` owns its `T`s; moving it to another thread moves them, which
// is fine when `T: Send`.
unsafe impl<T: Send> Send for Slots<T> {}
// SAFETY: shared access only happens through the `unsafe` `write`/`read`
// methods, whose callers (the ring index protocols) guarantee that no slot is
// accessed by two threads without a happens-before edge between them. Items
// are moved between threads, hence `T: Send`; no `&T` is ever shared, so
// `T: Sync` is not needed.
unsafe impl<T: Send> Sync for Slots<T> {}

impl<T> Slots<T> {
    /// Number of slots.
    #[inline(always)]
    pub(crate) fn capacity(&self) -> usize {
        self.mask + 1
    }
}

impl<T: Copy> Slots<T> {
    /// Allocates `capacity` slots. `capacity` must already be validated.
    pub(crate) fn new(capacity: usize) -> Result<Self, RingError> {
        debug_assert!(capacity.is_power_of_two());
        let alloc_failed = || RingError::AllocationFailed {
            capacity,
            slot_size: size_of::<T>(),
        };
        let mut cells: Vec<UnsafeCell<MaybeUninit<T>>> = Vec::new();
        cells
            .try_reserve_exact(capacity)
            .map_err(|_| alloc_failed())?;
        #[cfg(not(loom))]
        // SAFETY: the capacity was reserved just above, and an
        // `UnsafeCell<MaybeUninit<T>>` is valid for any (even uninitialised)
        // bytes, so the first `capacity` elements are initialised values.
        unsafe {
            cells.set_len(capacity);
        }
        #[cfg(loom)]
        cells.resize_with(capacity, || UnsafeCell::new(MaybeUninit::uninit()));
        Ok(Self {
            cells: cells.into_boxed_slice(),
            mask: capacity - 1,
        })
    }

    /// Copies `items` into the slots for free-running indices
    /// `start .. start + items.len()`.
    ///
    /// At most two `copy_nonoverlapping` calls: one up to the end of the
    /// array, one from its beginning when the run wraps.
    ///
    /// # Safety
    /// `items.len() <= capacity`, and the caller must own these slots
    /// exclusively: every earlier read of them happens-before this call, and
    /// no other thread accesses them until the caller publishes them with a
    /// Release store.
    #[cfg(not(loom))]
    #[inline(always)]
    pub(crate) unsafe fn write(&self, start: usize, items: &[T]) {
        let n = items.len();
        debug_assert!(n <= self.capacity());
        let idx = start & self.mask;
        let room = self.capacity() - idx;
        let src = items.as_ptr();
        // `UnsafeCell<MaybeUninit<T>>` has the layout of `T`, so the slot
        // array is a `[T]` in memory, and the pointer from `raw_get` carries
        // write permission (interior mutability) for the whole array.
        let base = UnsafeCell::raw_get(self.cells.as_ptr()).cast::<T>();
        // SAFETY: `idx <= mask < capacity`, so `base + idx` is inside the array.
        let dst = unsafe { base.add(idx) };
        if n <= room {
            // SAFETY: `n <= room` slots from `idx` are in bounds and owned by
            // the caller (contract); `items` is a separate allocation.
            unsafe { core::ptr::copy_nonoverlapping(src, dst, n) };
        } else {
            // SAFETY: as above, for the `room` slots up to the end of the array.
            unsafe { core::ptr::copy_nonoverlapping(src, dst, room) };
            // SAFETY: `room < n <= items.len()`, so `src + room` is in bounds
            // of `items`.
            let rest = unsafe { src.add(room) };
            // SAFETY: the wrapped part is `n - room < capacity` slots from
            // index 0, in bounds and owned by the caller (contract).
            unsafe { core::ptr::copy_nonoverlapping(rest, base, n - room) };
        }
    }

    /// Copies the items at free-running indices `start .. start + out.len()`
    /// into `out` (at most two `copy_nonoverlapping` calls).
    ///
    /// # Safety
    /// `out.len() <= capacity`; these slots must hold items written by
    /// [`Slots::write`] whose writes happen-before this call, and no other
    /// thread may write them until the caller releases them with a Release
    /// store.
    #[cfg(not(loom))]
    #[inline(always)]
    pub(crate) unsafe fn read(&self, start: usize, out: &mut [T]) {
        let n = out.len();
        debug_assert!(n <= self.capacity());
        let idx = start & self.mask;
        let room = self.capacity() - idx;
        let dst = out.as_mut_ptr();
        let base = UnsafeCell::raw_get(self.cells.as_ptr())
            .cast::<T>()
            .cast_const();
        // SAFETY: `idx <= mask < capacity`, so `base + idx` is inside the array.
        let src = unsafe { base.add(idx) };
        if n <= room {
            // SAFETY: the `n` slots from `idx` are in bounds and initialised
            // (contract); `out` is a separate, exclusively borrowed buffer.
            unsafe { core::ptr::copy_nonoverlapping(src, dst, n) };
        } else {
            // SAFETY: as above, for the `room` slots up to the end of the array.
            unsafe { core::ptr::copy_nonoverlapping(src, dst, room) };
            // SAFETY: `room < n == out.len()`, so `dst + room` is in bounds.
            let rest = unsafe { dst.add(room) };
            // SAFETY: the wrapped `n - room` slots from index 0 are in bounds
            // and initialised (contract).
            unsafe { core::ptr::copy_nonoverlapping(base, rest, n - room) };
        }
    }

    /// Loom version of [`Slots::write`]: per-slot accesses, so that loom's
    /// `UnsafeCell` tracking checks every slot against concurrent access.
    ///
    /// # Safety
    /// Same contract as the non-loom `write`.
    #[cfg(loom)]
    pub(crate) unsafe fn write(&self, start: usize, items: &[T]) {
        assert!(items.len() <= self.capacity());
        for (i, item) in items.iter().enumerate() {
            let cell = &self.cells[start.wrapping_add(i) & self.mask];
            // SAFETY: the caller owns this slot exclusively (contract); loom
            // verifies that claim.
            cell.with_mut(|p| unsafe { p.write(MaybeUninit::new(*item)) });
        }
    }

    /// Loom version of [`Slots::read`].
    ///
    /// # Safety
    /// Same contract as the non-loom `read`.
    #[cfg(loom)]
    pub(crate) unsafe fn read(&self, start: usize, out: &mut [T]) {
        assert!(out.len() <= self.capacity());
        for (i, slot) in out.iter_mut().enumerate() {
            let cell = &self.cells[start.wrapping_add(i) & self.mask];
            // SAFETY: the slot is initialised and not concurrently written
            // (contract); loom verifies the latter.
            *slot = cell.with(|p| unsafe { p.cast::<T>().read() });
        }
    }
}

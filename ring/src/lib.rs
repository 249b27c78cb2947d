//! Bounded, lock-free burst rings with DPDK `rte_ring` semantics.
//!
//! Two flavours share one slot layout:
//!
//! * [`spsc::channel`] — single producer / single consumer. The two ends are
//!   separate handles ([`Producer`], [`Consumer`]) that can be moved to other
//!   threads but not shared; every operation is wait-free.
//! * [`MpmcRing`] — any number of producers and consumers using one ring
//!   through `&self` (typically inside an `Arc`). Operations are lock-free
//!   reservations followed by an in-order publication, like `rte_ring`'s
//!   MP/MC mode.
//!
//! Common properties:
//!
//! * The capacity is a power of two in `1..=2^31` ([`MAX_CAPACITY`]) and all
//!   `capacity` slots are usable: the indices run freely (wrapping `usize`)
//!   and are masked only when a slot is accessed.
//! * All memory is allocated at creation; enqueue/dequeue never allocate.
//! * `*_burst` moves as many items as possible and returns the count;
//!   `*_bulk` moves all requested items or none.
//! * A burst is copied with at most two `ptr::copy_nonoverlapping` calls (one
//!   more when it wraps around the end of the slot array) and published with
//!   a single Release store of the side's tail index.
//! * Producer and consumer index state live on separate cache lines, and each
//!   side keeps a cached copy of the opposite side's tail, so the shared
//!   opposite line is only read when the cached value says the ring is too
//!   full (producer) or too empty (consumer).
//!
//! Items must be `Copy`: slots are overwritten and read with plain memory
//! copies, and nothing is ever dropped in place.
//!
//! Memory orderings are explained next to each atomic access. The protocols
//! are model-checked with loom (`RUSTFLAGS="--cfg loom" cargo test -p
//! vdpakit-ring --test loom --release`).
//!
//! Indices are `usize` and assumed not to wrap all the way around during the
//! lifetime of one stale cached value, which holds trivially on 64-bit
//! targets.

#![warn(missing_docs)]

mod mpmc;
mod slots;
pub mod spsc;
mod sync;

pub use mpmc::MpmcRing;
pub use spsc::{Consumer, Producer};

/// Largest accepted ring capacity: `2^31` slots.
pub const MAX_CAPACITY: usize = 1 << 31;

/// Errors returned when creating a ring.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum RingError {
    /// The requested capacity is zero, not a power of two, or larger than
    /// [`MAX_CAPACITY`].
    #[error(
        "invalid ring capacity {requested}: the capacity must be a power of two in 1..=2^31 (1, 2, 4, ..., 2147483648)"
    )]
    InvalidCapacity {
        /// The capacity that was asked for.
        requested: usize,
    },
    /// The slot array could not be allocated.
    #[error("cannot allocate a ring of {capacity} slots of {slot_size} bytes each")]
    AllocationFailed {
        /// The (valid) capacity that was asked for.
        capacity: usize,
        /// `size_of::<T>()` of the item type.
        slot_size: usize,
    },
}

/// Checks that `capacity` is a power of two in `1..=MAX_CAPACITY`.
pub(crate) fn check_capacity(capacity: usize) -> Result<usize, RingError> {
    if capacity.is_power_of_two() && capacity <= MAX_CAPACITY {
        Ok(capacity)
    } else {
        Err(RingError::InvalidCapacity {
            requested: capacity,
        })
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;

    #[test]
    fn capacity_check() {
        for ok in [1, 2, 4, 1024, 1 << 20, MAX_CAPACITY] {
            assert_eq!(check_capacity(ok), Ok(ok));
        }
        for bad in [
            0,
            3,
            6,
            1000,
            1023,
            MAX_CAPACITY - 1,
            MAX_CAPACITY + 1,
            usize::MAX,
        ] {
            assert_eq!(
                check_capacity(bad),
                Err(RingError::InvalidCapacity { requested: bad })
            );
        }
        #[cfg(target_pointer_width = "64")]
        assert!(check_capacity(MAX_CAPACITY << 1).is_err());
    }

    #[test]
    fn error_message_names_value_and_rule() {
        let msg = check_capacity(1000).unwrap_err().to_string();
        assert!(msg.contains("1000"), "{msg}");
        assert!(msg.contains("power of two"), "{msg}");
        assert!(msg.contains("2^31"), "{msg}");
    }
}

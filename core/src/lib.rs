//! vdpakit core: the layer every port, driver and app stands on.
//!
//! - [`mem`]: shared hugepage segments (memfd, MAP_SHARED, IOVA = VA) and named zones.
//! - [`mbuf`], [`mempool`]: packet buffers with metadata and headroom; pools with per-lcore
//!   caches over a lock-free shared ring; bursts.
//! - [`lcore`]: pinned run-to-completion worker threads and the stop flag.
//! - [`port`]: the API every port kind implements, and the `null` and `ring` kinds.
//! - [`packet`]: small header helpers.
//! - [`tsc`]: the cycle clock poll loops read (TSC on x86_64), calibrated once.
//!
//! `unsafe` lives only in `mbuf` and `mempool` (buffer memory through raw pointers) and `tsc` (the
//! `rdtsc` intrinsic); every block carries a `// SAFETY:` comment.

#![warn(missing_docs)]

pub mod error;
pub mod lcore;
pub mod mbuf;
pub mod mem;
pub mod mempool;
pub mod model;
pub mod packet;
pub mod pci;
pub mod port;
pub mod tsc;
pub mod vdpa;
pub mod vhost;
pub mod virtio;
pub mod virtio_pci;

pub use error::{Error, Result};
pub use mbuf::{Burst, MAX_BURST, Mbuf};
pub use mempool::{Mempool, MempoolCache, MempoolConfig};

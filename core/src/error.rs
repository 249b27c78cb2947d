//! The crate's one error type.

use std::io;

/// Result alias for `vdpakit-core`.
pub type Result<T> = std::result::Result<T, Error>;

/// Everything that can go wrong in `vdpakit-core`. Every variant names the offending value and,
/// where the user chose it, what is accepted instead.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A memory mode string that is not one of the accepted ones.
    #[error("invalid memory mode '{0}': accepted are auto, 2M, 1G, no-huge")]
    InvalidMemMode(String),

    /// Hugepages of the requested size could not be reserved.
    #[error(
        "cannot reserve {bytes} bytes of {page} hugepages for '{name}' ({needed} pages needed, {free} free): \
         reserve more with 'echo N > /sys/kernel/mm/hugepages/hugepages-{page_kb}kB/nr_hugepages' or use --mem no-huge"
    )]
    HugepageReservation {
        /// Segment name.
        name: String,
        /// Page size as text ("2M", "1G").
        page: &'static str,
        /// Page size in KiB, as in the sysfs path.
        page_kb: u64,
        /// Bytes requested (rounded to the page size).
        bytes: usize,
        /// Pages needed.
        needed: usize,
        /// Free pages of that size at the time of the failure.
        free: u64,
    },

    /// A segment of zero bytes or one whose size overflows.
    #[error("invalid segment size {0} bytes for '{1}': accepted is 1..=2^46")]
    InvalidSegmentSize(usize, String),

    /// memfd_create, ftruncate or mmap failed for a reason other than missing hugepages.
    #[error("memory segment '{name}': {op} failed: {source}")]
    Memory {
        /// Segment name.
        name: String,
        /// The failing operation.
        op: &'static str,
        /// The OS error.
        #[source]
        source: io::Error,
    },

    /// A zone that does not fit in its segment.
    #[error(
        "zone '{zone}' of {len} bytes (align {align}) does not fit in segment '{segment}' ({free} bytes free)"
    )]
    ZoneNoSpace {
        /// Zone name.
        zone: String,
        /// Segment name.
        segment: String,
        /// Requested length.
        len: usize,
        /// Requested alignment.
        align: usize,
        /// Free bytes left in the segment.
        free: usize,
    },

    /// A zone name used twice in one segment.
    #[error("zone '{0}' already exists in segment '{1}'")]
    ZoneExists(String, String),

    /// A zone alignment that is not a power of two.
    #[error("invalid zone alignment {0}: accepted is a power of two")]
    InvalidAlign(usize),

    /// A mempool configuration value out of range.
    #[error("invalid mempool {what} {value}: accepted is {accepted}")]
    InvalidPoolConfig {
        /// Which parameter.
        what: &'static str,
        /// The value given.
        value: usize,
        /// The accepted range.
        accepted: &'static str,
    },

    /// A ring could not be created.
    #[error(transparent)]
    Ring(#[from] vdpakit_ring::RingError),

    /// A malformed CPU list.
    #[error(
        "invalid core list '{list}': {why}; accepted is a comma-separated list of CPUs and ranges like 0,2-3"
    )]
    CoreList {
        /// The list as given.
        list: String,
        /// What is wrong with it.
        why: String,
    },

    /// A CPU that does not exist or that this process may not run on.
    #[error("CPU {cpu} is not available to this process: available CPUs are {available}")]
    CpuUnavailable {
        /// The CPU asked for.
        cpu: usize,
        /// The available CPUs, as a list.
        available: String,
    },

    /// Pinning a worker thread failed.
    #[error("cannot pin lcore {lcore} to CPU {cpu}")]
    Pin {
        /// Lcore index.
        lcore: usize,
        /// CPU.
        cpu: usize,
    },

    /// A thread could not be spawned.
    #[error("cannot spawn lcore thread: {0}")]
    Spawn(#[source] io::Error),

    /// A worker thread panicked.
    #[error("lcore {0} panicked")]
    LcorePanicked(usize),

    /// Signal handler installation failed.
    #[error("cannot install signal handler: {0}")]
    Signal(#[source] io::Error),

    /// A port spec that cannot be parsed.
    #[error("invalid port spec '{spec}': {why}")]
    PortSpec {
        /// The spec as given.
        spec: String,
        /// What is wrong with it.
        why: String,
    },

    /// A port kind nobody implements.
    #[error("unknown port kind '{kind}': known kinds are {known}")]
    UnknownPortKind {
        /// The kind as given.
        kind: String,
        /// The known kinds.
        known: String,
    },

    /// A key a port kind does not accept.
    #[error("port kind '{kind}' has no key '{key}': accepted keys are {accepted}")]
    UnknownPortKey {
        /// Port kind.
        kind: String,
        /// The key as given.
        key: String,
        /// The accepted keys.
        accepted: String,
    },

    /// A port key with a bad value.
    #[error("port {kind}: invalid {key}='{value}': accepted is {accepted}")]
    PortValue {
        /// Port kind.
        kind: String,
        /// Key.
        key: String,
        /// Value as given.
        value: String,
        /// What is accepted.
        accepted: String,
    },

    /// A port configuration the port cannot do.
    #[error("port {port}: {why}")]
    PortConfig {
        /// Port name.
        port: String,
        /// What is wrong.
        why: String,
    },

    /// A port operation in the wrong state.
    #[error("port {port}: cannot {op} while {state}")]
    PortState {
        /// Port name.
        port: String,
        /// Operation.
        op: &'static str,
        /// Current state.
        state: &'static str,
    },
}

//! Helpers shared by the `virtio_*` integration tests: test guest memory, a PRNG, ring set-up.
#![allow(dead_code)]

use std::sync::Arc;

use vdpakit_core::virtio::{
    DeviceQueue, DirtyLog, DriverQueue, GuestMemory, GuestRegion, QueueConfig, ring_layout,
};

/// Offset between a region's GPA and its (made-up) front-end virtual address.
pub const UVA_OFFSET: u64 = 0x7f00_0000_0000;

/// One anonymous mapping: (keep-alive, host address).
pub fn anon(len: usize) -> (Arc<memmap2::MmapMut>, *mut u8) {
    let mut m = memmap2::MmapOptions::new()
        .len(len)
        .no_reserve_swap()
        .map_anon()
        .expect("anonymous mapping");
    let p = m.as_mut_ptr();
    (Arc::new(m), p)
}

/// A region of `size` bytes at `gpa` backed by its own anonymous mapping.
pub fn region(gpa: u64, size: usize) -> GuestRegion {
    let (keep, host) = anon(size);
    // SAFETY: `host .. host + size` is a fresh private mapping kept alive by `keep`, which the
    // region holds; nothing else references it.
    unsafe { GuestRegion::from_raw(host, size as u64, gpa, gpa + UVA_OFFSET, Some(keep)) }
}

/// Guest memory made of the given `(gpa, size)` regions, each separately mapped.
pub fn memory(regions: &[(u64, usize)]) -> GuestMemory {
    GuestMemory::new(regions.iter().map(|&(g, s)| region(g, s)).collect()).expect("memory")
}

/// A dirty log of `len` bytes over its own mapping.
pub fn log(len: usize) -> (DirtyLog, *mut u8) {
    let (keep, host) = anon(len.max(1));
    // SAFETY: fresh mapping kept alive by the log; only accessed atomically by the log and by
    // `log_bits` (reads after the writes, same thread).
    let l = unsafe { DirtyLog::from_raw(host, len, Some(keep)) };
    (l, host)
}

/// The log's bytes (the test reads them after the device is done).
pub fn log_bytes(host: *mut u8, len: usize) -> Vec<u8> {
    let mut v = vec![0u8; len];
    // SAFETY: `host .. host + len` is the log mapping, alive while the log is (the caller holds
    // it); no concurrent writer.
    unsafe { std::ptr::copy_nonoverlapping(host, v.as_mut_ptr(), len) };
    v
}

/// Deterministic xorshift PRNG.
pub struct Rng(pub u64);

impl Rng {
    pub fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }

    /// Uniform in `0..n`.
    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// Where tests put rings: 0x10000 in a region starting at 0.
pub const RING_GPA: u64 = 0x1_0000;

/// Driver and device over the same rings at `RING_GPA`.
pub fn pair(mem: &GuestMemory, size: u16, features: u64) -> (DriverQueue, DeviceQueue) {
    let cfg = QueueConfig::at(RING_GPA, size, features);
    let drv = DriverQueue::new(&cfg, mem).expect("driver");
    let dev = DeviceQueue::new(&cfg, mem).expect("device");
    (drv, dev)
}

/// Bytes needed for the rings of `size` at `RING_GPA`, rounded up to 64 KiB.
pub fn ring_end(size: u16, packed: bool) -> u64 {
    (RING_GPA + ring_layout(size, packed, true).total).next_multiple_of(0x1_0000)
}

/// Reads `len` bytes of guest memory.
pub fn read(mem: &GuestMemory, gpa: u64, len: usize) -> Vec<u8> {
    let mut v = vec![0u8; len];
    mem.read(gpa, &mut v).expect("read");
    v
}

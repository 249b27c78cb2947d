//! The sim engine's per-packet path allocates nothing: loop traffic through a busy-polling
//! engine under a process-wide counting allocator (custom harness: no other thread runs, and
//! the guest side here uses only preallocated buffers, so every allocation counted would be the
//! engine's).

mod model_common;

use std::alloc::{GlobalAlloc, Layout, System};
use std::process::ExitCode;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use model_common::*;
use vdpakit_core::model::sim::SimDevice;
use vdpakit_core::vdpa::VdpaDevice;
use vdpakit_core::virtio::features as vf;

static ALLOCS: AtomicU64 = AtomicU64::new(0);

struct Counting;

// SAFETY: forwards every call to the system allocator unchanged; only counts them.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        ALLOCS.fetch_add(1, Ordering::Relaxed);
        // SAFETY: same contract as the caller's.
        unsafe { System.alloc(l) }
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        // SAFETY: same contract as the caller's.
        unsafe { System.dealloc(p, l) }
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, n: usize) -> *mut u8 {
        ALLOCS.fetch_add(1, Ordering::Relaxed);
        // SAFETY: same contract as the caller's.
        unsafe { System.realloc(p, l, n) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

/// Moves `n` frames through the loop with preallocated buffers only; returns frames received.
fn traffic(
    r: &mut Rig,
    bell: &vdpakit_core::pci::Doorbell,
    v: u32,
    frame: &[u8],
    n: usize,
) -> usize {
    let mut buf = [0u8; 2048];
    let (mut sent, mut got) = (0, 0);
    let end = Instant::now() + Duration::from_secs(10);
    while got < n && Instant::now() < end {
        while sent < n && sent - got < 64 {
            let Some(gpa) = r.tx.post((12 + frame.len()) as u32, false) else {
                break;
            };
            r.g.mem.write(gpa, &[0u8; 12]).unwrap();
            r.g.mem.write(gpa + 12, frame).unwrap();
            sent += 1;
        }
        if r.tx.dq.publish_avail() {
            bell.ring(v);
        }
        while let Some((gpa, len)) = r.rx.reap() {
            r.g.mem.read(gpa, &mut buf[..len as usize]).unwrap();
            assert_eq!(&buf[12..len as usize], frame);
            got += 1;
            r.rx.post(RXBUF, true);
        }
        r.rx.dq.publish_avail();
        while r.tx.reap().is_some() {}
    }
    got
}

fn check(name: &str, features: u64, poll: &str) -> Result<(), String> {
    let sim = SimDevice::from_spec(&format!("name={name},wire=loop,poll={poll}")).unwrap();
    let mut r = Rig::start(&sim, 0, features);
    r.post_rx(128);
    let (bell, v) = r.dev.doorbell(1).unwrap();
    let f = frame(r.mac, 1, 700);
    // Warm up (first touches of the engine's buffers and views), then count.
    assert_eq!(traffic(&mut r, &bell, v, &f, 2000), 2000);
    let before = ALLOCS.load(Ordering::SeqCst);
    let got = traffic(&mut r, &bell, v, &f, 20_000);
    let after = ALLOCS.load(Ordering::SeqCst);
    if got != 20_000 {
        return Err(format!("{name}: {got} of 20000 frames came back"));
    }
    if after != before {
        return Err(format!(
            "{name}: {} allocations while moving 20000 frames",
            after - before
        ));
    }
    let s = r.dev.stats(0).unwrap();
    println!("{name}: 22000 frames, 0 allocations (rx {s:?})");
    Ok(())
}

fn main() -> ExitCode {
    let mut fails = 0;
    let packed = BASE_FEATURES | vf::RING_PACKED | vf::RING_EVENT_IDX;
    // Busy: the per-packet path alone. Adaptive: with the engine's sleeps and wake-ups (the
    // guest side here pauses between bursts, so the engine goes to sleep many times).
    for (name, f, poll) in [
        ("noalloc-split", BASE_FEATURES, "busy"),
        ("noalloc-packed", packed, "busy"),
        ("noalloc-split-adaptive", BASE_FEATURES, "adaptive"),
        ("noalloc-packed-adaptive", packed, "adaptive"),
    ] {
        match check(name, f, poll) {
            Ok(()) => {}
            Err(e) => {
                eprintln!("FAIL {e}");
                fails += 1;
            }
        }
    }
    if fails == 0 {
        println!("test result: ok. 4 passed");
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

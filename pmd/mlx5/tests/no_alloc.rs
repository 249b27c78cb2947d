//! The model's per-packet path on the kit's engine allocates nothing: looped traffic through
//! an mlx5 model (receive steering by its flow table snapshot, rings through its key's view,
//! interrupts through its interrupt point) under a process-wide counting allocator. Custom
//! harness: no other test runs meanwhile, and the guest side here posts and reaps preallocated
//! buffers only, so every allocation counted is the model's or the engine's.

mod common;

use std::alloc::{GlobalAlloc, Layout, System};
use std::process::ExitCode;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use common::*;
use vdpakit_core::vdpa::VdpaDevice;

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

const SIZE: u16 = 256;

/// The guest side: preallocated buffers and id tables, built once.
struct Loop {
    bell: vdpakit_core::pci::Doorbell,
    v: u32,
    len: u32,
    rx_ids: Vec<u64>,
    tx_ids: Vec<u64>,
    tx_free: Vec<u64>,
    buf: Vec<u8>,
}

impl Loop {
    fn new(g: &Guest, dev: &dyn VdpaDevice, rx: &mut Ring, f: &[u8]) -> Loop {
        let (bell, v) = dev.doorbell(1).unwrap();
        let mut b = vec![0u8; 12];
        b.extend_from_slice(f);
        let tx_bufs: Vec<u64> = (0..u64::from(SIZE))
            .map(|i| BUF_BASE + (u64::from(SIZE) + i) * BUF)
            .collect();
        for &a in &tx_bufs {
            g.mem.write(a, &b).unwrap();
        }
        let mut rx_ids = vec![0u64; usize::from(SIZE)];
        for i in 0..u64::from(SIZE) {
            let a = BUF_BASE + i * BUF;
            let id = rx.q.add(&[(a, 2048, true)]).unwrap();
            rx_ids[usize::from(id)] = a;
        }
        rx.q.publish_avail();
        Loop {
            bell,
            v,
            len: b.len() as u32,
            rx_ids,
            tx_ids: vec![0u64; usize::from(SIZE)],
            tx_free: tx_bufs,
            buf: vec![0u8; 2048],
        }
    }

    /// Moves `n` frames through the loop; returns (frames received, allocations meanwhile).
    fn run(&mut self, g: &Guest, rx: &mut Ring, tx: &mut Ring, f: &[u8], n: usize) -> (usize, u64) {
        let (mut sent, mut got) = (0, 0);
        let end = Instant::now() + Duration::from_secs(20);
        let before = ALLOCS.load(Ordering::Relaxed);
        while got < n && Instant::now() < end {
            while sent < n && sent - got < usize::from(SIZE) / 2 {
                let Some(a) = self.tx_free.pop() else { break };
                let Ok(id) = tx.q.add(&[(a, self.len, false)]) else {
                    self.tx_free.push(a);
                    break;
                };
                self.tx_ids[usize::from(id)] = a;
                sent += 1;
            }
            if tx.q.publish_avail() {
                self.bell.ring(self.v);
            }
            while let Ok(Some((id, l))) = rx.q.reap() {
                let a = self.rx_ids[usize::from(id)];
                let l = (l as usize).min(self.buf.len());
                g.mem.read(a, &mut self.buf[..l]).unwrap();
                if self.buf.get(12..l) == Some(f) {
                    got += 1;
                }
                let id = rx.q.add(&[(a, 2048, true)]).unwrap();
                self.rx_ids[usize::from(id)] = a;
            }
            rx.q.publish_avail();
            while let Ok(Some((id, _))) = tx.q.reap() {
                self.tx_free.push(self.tx_ids[usize::from(id)]);
            }
        }
        (got, ALLOCS.load(Ordering::Relaxed) - before)
    }
}

fn check(params: &str, packed: bool) -> Result<(), String> {
    let (mut dev, model) = device(params);
    let g = Guest::new(dev.domain());
    let f = features(packed);
    let mut rx = Ring::new(&g, 0, SIZE, f, true);
    let mut tx = Ring::new(&g, 1, SIZE, f, true);
    dev.configure(&conf(f, &[&rx, &tx]))
        .map_err(|e| e.to_string())?;
    let fr = frame(dev.net_config().mac, 1, 7, 100);
    let mut l = Loop::new(&g, &dev, &mut rx, &fr);
    // Warm-up (first touches, lazily sized state), then the counted run.
    let (w, _) = l.run(&g, &mut rx, &mut tx, &fr, 2000);
    if w != 2000 {
        return Err(format!("warm-up: {w} of 2000 frames"));
    }
    if ALLOCS.load(Ordering::Relaxed) == 0 {
        return Err("the counting allocator saw no allocation at all (set-up allocates)".into());
    }
    let (got, allocs) = l.run(&g, &mut rx, &mut tx, &fr, 20_000);
    let s = model.stats();
    eprintln!("{params} packed={packed}: {got} frames, {allocs} allocations; model {s:?}");
    if got != 20_000 {
        return Err(format!("{got} of 20000 frames"));
    }
    if allocs != 0 {
        return Err(format!(
            "{allocs} allocations while {got} frames went through"
        ));
    }
    if s.notifies == 0 && !params.contains("poll") {
        return Err("no interrupt asked for: the interrupt point was not exercised".into());
    }
    Ok(())
}

fn main() -> ExitCode {
    let mut failed = false;
    for (params, packed) in [
        ("model,poll=busy", false),
        ("model,poll=busy", true),
        ("model", false),
        ("model,event_mode=poll", true),
    ] {
        match check(params, packed) {
            Ok(()) => println!("test no_alloc {params} packed={packed} ... ok"),
            Err(e) => {
                println!("test no_alloc {params} packed={packed} ... FAILED: {e}");
                failed = true;
            }
        }
    }
    if failed {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}

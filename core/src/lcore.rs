//! Logical cores: one pinned worker thread per listed CPU running a run-to-completion poll loop,
//! while the calling (main) thread does control and statistics.
//!
//! A worker's loop checks [`LcoreCtx::should_stop`] (one relaxed load of a flag that SIGINT,
//! SIGTERM or [`StopFlag::stop`] sets); it takes no locks, makes no syscalls and allocates
//! nothing: everything it needs is moved into its closure before it starts.

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Barrier, mpsc};
use std::thread::JoinHandle;

use crate::error::{Error, Result};

/// Parses a CPU list like `0`, `0,2`, `0-3` or `0-1,4`. Rejects empty parts, reversed ranges and
/// repeated CPUs.
pub fn parse_core_list(list: &str) -> Result<Vec<usize>> {
    let bad = |why: String| Error::CoreList {
        list: list.to_string(),
        why,
    };
    let mut out = Vec::new();
    let mut seen = BTreeSet::new();
    if list.trim().is_empty() {
        return Err(bad("it is empty".into()));
    }
    for part in list.split(',') {
        let part = part.trim();
        let num = |s: &str| {
            s.trim()
                .parse::<usize>()
                .map_err(|_| bad(format!("'{s}' is not a CPU number")))
        };
        let (lo, hi) = match part.split_once('-') {
            Some((a, b)) => (num(a)?, num(b)?),
            None => {
                let c = num(part)?;
                (c, c)
            }
        };
        if lo > hi {
            return Err(bad(format!("range '{part}' runs backwards")));
        }
        if hi - lo > 4096 {
            return Err(bad(format!("range '{part}' is too large")));
        }
        for c in lo..=hi {
            if !seen.insert(c) {
                return Err(bad(format!("CPU {c} is listed twice")));
            }
            out.push(c);
        }
    }
    Ok(out)
}

/// The CPUs this process may run on (its affinity mask), ascending.
pub fn available_cpus() -> Vec<usize> {
    let mut v: Vec<usize> = core_affinity::get_core_ids()
        .unwrap_or_default()
        .into_iter()
        .map(|c| c.id)
        .collect();
    v.sort_unstable();
    v
}

/// Formats CPUs compactly (`0-3,6`).
pub fn format_cpus(cpus: &[usize]) -> String {
    let mut out = Vec::new();
    let mut i = 0;
    while i < cpus.len() {
        let mut j = i;
        while j + 1 < cpus.len() && cpus[j + 1] == cpus[j] + 1 {
            j += 1;
        }
        out.push(if i == j {
            cpus[i].to_string()
        } else {
            format!("{}-{}", cpus[i], cpus[j])
        });
        i = j + 1;
    }
    if out.is_empty() {
        "none".into()
    } else {
        out.join(",")
    }
}

/// Checks that every CPU exists and is in this process's affinity mask.
pub fn check_cpus(cpus: &[usize]) -> Result<()> {
    let avail = available_cpus();
    for &c in cpus {
        if !avail.contains(&c) {
            return Err(Error::CpuUnavailable {
                cpu: c,
                available: format_cpus(&avail),
            });
        }
    }
    Ok(())
}

/// A shared stop request.
#[derive(Debug, Clone, Default)]
pub struct StopFlag(Arc<AtomicBool>);

impl StopFlag {
    /// A flag not yet raised.
    pub fn new() -> StopFlag {
        StopFlag::default()
    }

    /// Raises the flag on SIGINT and SIGTERM (a second signal of either kind ends the process
    /// at once, for a stuck shutdown).
    pub fn install_signal_handlers(&self) -> Result<()> {
        use signal_hook::consts::{SIGINT, SIGTERM};
        for sig in [SIGINT, SIGTERM] {
            // Order matters: the conditional shutdown must be registered first, so the first
            // signal only sets the flag and the second one exits.
            signal_hook::flag::register_conditional_shutdown(sig, 130, Arc::clone(&self.0))
                .map_err(Error::Signal)?;
            signal_hook::flag::register(sig, Arc::clone(&self.0)).map_err(Error::Signal)?;
        }
        Ok(())
    }

    /// Requests a stop.
    pub fn stop(&self) {
        self.0.store(true, Ordering::Relaxed);
    }

    /// Whether a stop was requested.
    #[inline(always)]
    pub fn is_stopped(&self) -> bool {
        self.0.load(Ordering::Relaxed)
    }
}

/// What a worker knows about itself.
#[derive(Debug, Clone)]
pub struct LcoreCtx {
    /// Index among the launched workers (0-based).
    pub lcore: usize,
    /// CPU the worker is pinned to.
    pub cpu: usize,
    stop: StopFlag,
}

impl LcoreCtx {
    /// Whether the poll loop should return. One relaxed load.
    #[inline(always)]
    pub fn should_stop(&self) -> bool {
        self.stop.is_stopped()
    }
}

/// Running workers.
#[derive(Debug)]
pub struct Lcores<R> {
    handles: Vec<(usize, JoinHandle<R>)>,
    stop: StopFlag,
}

/// Launches one pinned worker per CPU. `make(lcore, cpu)` builds each worker's closure on the
/// calling thread (so all set-up, allocation included, happens before the loops start); the
/// workers start together once every one of them is pinned. If any pin fails, all workers are
/// told to stop before running and the error is returned.
pub fn launch<R, F, M>(cpus: &[usize], stop: &StopFlag, mut make: M) -> Result<Lcores<R>>
where
    R: Send + 'static,
    F: FnOnce(&LcoreCtx) -> R + Send + 'static,
    M: FnMut(usize, usize) -> F,
{
    check_cpus(cpus)?;
    let barrier = Arc::new(Barrier::new(cpus.len() + 1));
    let abort = Arc::new(AtomicBool::new(false));
    let (ready_tx, ready_rx) = mpsc::channel::<(usize, bool)>();
    let mut handles = Vec::with_capacity(cpus.len());
    for (lcore, &cpu) in cpus.iter().enumerate() {
        let body = make(lcore, cpu);
        let ctx = LcoreCtx {
            lcore,
            cpu,
            stop: stop.clone(),
        };
        let worker_barrier = Arc::clone(&barrier);
        let worker_abort = Arc::clone(&abort);
        let ready = ready_tx.clone();
        let spawned = std::thread::Builder::new()
            .name(format!("lcore-{lcore}"))
            .spawn(move || {
                let pinned = core_affinity::set_for_current(core_affinity::CoreId { id: cpu });
                let _ = ready.send((lcore, pinned));
                worker_barrier.wait();
                if worker_abort.load(Ordering::Acquire) {
                    // Pinning failed somewhere: do not run the loop at all.
                    ctx.stop.stop();
                }
                body(&ctx)
            });
        match spawned {
            Ok(h) => handles.push((lcore, h)),
            Err(e) => {
                abort.store(true, Ordering::Release);
                stop.stop();
                // Release the workers already spawned; they see `abort` and run no loop work.
                release_partial(&barrier, handles.len(), cpus.len());
                for (_, h) in handles {
                    let _ = h.join();
                }
                return Err(Error::Spawn(e));
            }
        }
    }
    drop(ready_tx);
    let mut failed = None;
    for _ in 0..cpus.len() {
        match ready_rx.recv() {
            Ok((lcore, true)) => {
                let _ = lcore;
            }
            Ok((lcore, false)) => {
                failed = Some(Error::Pin {
                    lcore,
                    cpu: cpus[lcore],
                })
            }
            Err(_) => break,
        }
    }
    if failed.is_some() {
        abort.store(true, Ordering::Release);
    }
    barrier.wait();
    let lcores = Lcores {
        handles,
        stop: stop.clone(),
    };
    match failed {
        Some(e) => {
            stop.stop();
            let _ = lcores.join();
            Err(e)
        }
        None => Ok(lcores),
    }
}

/// A barrier sized for all workers cannot be released by fewer: stand in for the missing ones
/// from helper threads so those already waiting return.
fn release_partial(barrier: &Arc<Barrier>, spawned: usize, total: usize) {
    for _ in spawned..total {
        let b = Arc::clone(barrier);
        std::thread::spawn(move || {
            b.wait();
        });
    }
    barrier.wait();
}

impl<R> Lcores<R> {
    /// Number of workers.
    pub fn len(&self) -> usize {
        self.handles.len()
    }

    /// Whether there are no workers.
    pub fn is_empty(&self) -> bool {
        self.handles.is_empty()
    }

    /// Whether every worker has returned.
    pub fn all_finished(&self) -> bool {
        self.handles.iter().all(|(_, h)| h.is_finished())
    }

    /// Asks the workers to stop.
    pub fn stop(&self) {
        self.stop.stop();
    }

    /// Waits for every worker; returns their results in lcore order, or the first panic.
    pub fn join(self) -> Result<Vec<R>> {
        let mut out = Vec::with_capacity(self.handles.len());
        let mut err = None;
        for (lcore, h) in self.handles {
            match h.join() {
                Ok(r) => out.push(r),
                Err(_) => {
                    self.stop.stop();
                    err.get_or_insert(Error::LcorePanicked(lcore));
                }
            }
        }
        match err {
            Some(e) => Err(e),
            None => Ok(out),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn core_lists_parse_and_reject_bad_input() {
        assert_eq!(parse_core_list("0").unwrap(), vec![0]);
        assert_eq!(parse_core_list("0-3").unwrap(), vec![0, 1, 2, 3]);
        assert_eq!(parse_core_list("1,3-4").unwrap(), vec![1, 3, 4]);
        for (bad, needle) in [
            ("", "empty"),
            ("0,,1", "not a CPU"),
            ("a", "'a'"),
            ("3-1", "backwards"),
            ("0,0", "listed twice"),
            ("0-2,1", "CPU 1 is listed twice"),
            ("-1", "not a CPU"),
        ] {
            let e = parse_core_list(bad).unwrap_err().to_string();
            assert!(e.contains(needle), "{bad:?}: {e}");
            assert!(e.contains(&format!("'{bad}'")), "{e}");
        }
    }

    #[test]
    fn nonexistent_cpu_is_rejected_with_the_available_list() {
        let e = check_cpus(&[100_000]).unwrap_err().to_string();
        assert!(
            e.contains("CPU 100000") && e.contains("available CPUs are"),
            "{e}"
        );
    }

    #[test]
    fn format_cpus_compacts_ranges() {
        assert_eq!(format_cpus(&[0, 1, 2, 5, 7, 8]), "0-2,5,7-8");
        assert_eq!(format_cpus(&[]), "none");
    }

    #[test]
    fn workers_are_pinned_run_and_stop() {
        let cpus = available_cpus();
        let stop = StopFlag::new();
        let lc = launch(&cpus, &stop, |lcore, cpu| {
            move |ctx: &LcoreCtx| {
                assert_eq!((ctx.lcore, ctx.cpu), (lcore, cpu));
                let mut spins = 0u64;
                while !ctx.should_stop() {
                    spins += 1;
                    std::hint::spin_loop();
                }
                // The thread is pinned to exactly its CPU.
                let mask = core_affinity::get_core_ids().unwrap();
                (cpu, mask.len(), mask[0].id, spins)
            }
        })
        .unwrap();
        std::thread::sleep(std::time::Duration::from_millis(50));
        assert!(!lc.all_finished());
        lc.stop();
        let res = lc.join().unwrap();
        assert_eq!(res.len(), cpus.len());
        for (cpu, n, id, spins) in res {
            assert_eq!((n, id), (1, cpu));
            assert!(spins > 0);
        }
    }

    #[test]
    fn a_panicking_worker_is_reported() {
        let stop = StopFlag::new();
        let lc = launch(&available_cpus()[..1], &stop, |_, _| {
            |_: &LcoreCtx| panic!("boom")
        })
        .unwrap();
        assert!(matches!(lc.join(), Err(Error::LcorePanicked(0))));
    }
}

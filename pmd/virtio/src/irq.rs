//! MSI-X layout for a vDPA device's queues, the way the IFC driver lays it out (reference facts
//! `kernel-vdpa-hw.md` §3), used by all three PMDs:
//!
//! - **per queue** when the function has at least `nr_vring + 1` vectors: queue *i* on vector
//!   *i*, the configuration-change interrupt on vector `nr_vring`. Each queue's vector is wired
//!   straight to the guest's call eventfd: no vdpakit thread in the interrupt path.
//! - **shared** with fewer (at least 2): every queue on vector 0, configuration on vector 1.
//! - **single** with one vector: everything on vector 0.
//!
//! In the shared layouts one vector serves several queues whose call eventfds differ, so vector
//! 0 is wired to an eventfd of ours and a small fan-out thread signals every queue's call
//! eventfd when it fires (a spurious interrupt is harmless to a virtio driver: it finds no new
//! used entries). With a single queue on the shared vector its call eventfd is wired directly.

use std::os::fd::{AsFd, OwnedFd};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::thread::JoinHandle;

use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use nix::sys::eventfd::{EfdFlags, EventFd};

use crate::error::{PmdError, Result};

/// Which layout a plan uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IrqMode {
    /// One vector per queue.
    PerQueue,
    /// Queues share vector 0, configuration on vector 1.
    Shared,
    /// Everything on vector 0.
    Single,
    /// No queue wants interrupts (polled front end): MSI-X stays off.
    Off,
}

impl IrqMode {
    /// A name for logs and stats.
    pub fn as_str(self) -> &'static str {
        match self {
            IrqMode::PerQueue => "per-queue",
            IrqMode::Shared => "shared",
            IrqMode::Single => "single",
            IrqMode::Off => "off",
        }
    }
}

/// The vectors chosen for a configuration.
#[derive(Debug)]
pub struct IrqPlan {
    /// Layout.
    pub mode: IrqMode,
    /// `(queue, vector)` for every queue given.
    pub queues: Vec<(u16, u16)>,
    /// Configuration-change vector.
    pub config: u16,
    /// What to wire to each vector (`PciDevice::set_msix`); empty: MSI-X off.
    pub fds: Vec<Option<Arc<OwnedFd>>>,
    /// The fan-out of a shared vector, when several queues share it.
    pub fanout: Option<FanOut>,
}

/// Chooses vectors for `queues` (`(queue index, call eventfd)`) on a function with `vectors`
/// MSI-X vectors and `nr_vring` queues, using at most `limit` vectors when given (tests force
/// the shared layouts with it).
pub fn plan(
    dev: &str,
    vectors: u16,
    limit: Option<u16>,
    nr_vring: u16,
    queues: &[(u16, Option<Arc<OwnedFd>>)],
) -> Result<IrqPlan> {
    let have = limit.map_or(vectors, |l| l.min(vectors));
    let calls: Vec<Arc<OwnedFd>> = queues.iter().filter_map(|(_, c)| c.clone()).collect();
    if calls.is_empty() {
        return Ok(IrqPlan {
            mode: IrqMode::Off,
            queues: queues.iter().map(|&(q, _)| (q, NO_VECTOR)).collect(),
            config: NO_VECTOR,
            fds: Vec::new(),
            fanout: None,
        });
    }
    if have == 0 {
        return Err(PmdError::Config {
            dev: dev.to_string(),
            what: format!(
                "the function has no MSI-X vectors (MSI-X table size {vectors}), so queue interrupts cannot reach the guest"
            ),
        });
    }
    if have > nr_vring {
        let mut fds = vec![None; usize::from(nr_vring) + 1];
        for (q, c) in queues {
            if let Some(slot) = fds.get_mut(usize::from(*q)) {
                *slot = c.clone();
            }
        }
        return Ok(IrqPlan {
            mode: IrqMode::PerQueue,
            queues: queues.iter().map(|&(q, _)| (q, q)).collect(),
            config: nr_vring,
            fds,
            fanout: None,
        });
    }
    let (mode, config) = if have >= 2 {
        (IrqMode::Shared, 1)
    } else {
        (IrqMode::Single, 0)
    };
    let (first, fanout) = if calls.len() == 1 {
        (Arc::clone(&calls[0]), None)
    } else {
        let f = FanOut::start(dev, calls)?;
        (Arc::clone(&f.source), Some(f))
    };
    let mut fds = vec![Some(first)];
    if mode == IrqMode::Shared {
        fds.push(None);
    }
    Ok(IrqPlan {
        mode,
        queues: queues.iter().map(|&(q, _)| (q, 0)).collect(),
        config,
        fds,
        fanout,
    })
}

use vdpakit_core::virtio_pci::NO_VECTOR;

/// A thread that turns one shared vector into a signal on every queue's call eventfd.
#[derive(Debug)]
pub struct FanOut {
    source: Arc<OwnedFd>,
    stop: Arc<EventFd>,
    relayed: Arc<AtomicU64>,
    thread: Option<JoinHandle<()>>,
}

impl FanOut {
    fn start(dev: &str, targets: Vec<Arc<OwnedFd>>) -> Result<FanOut> {
        let err = |what: String| PmdError::Device {
            dev: dev.to_string(),
            what,
        };
        let mk = || {
            EventFd::from_flags(EfdFlags::EFD_CLOEXEC | EfdFlags::EFD_NONBLOCK)
                .map_err(|e| err(format!("interrupt fan-out eventfd: {e}")))
        };
        let source: Arc<OwnedFd> = Arc::new(mk()?.into());
        let stop = Arc::new(mk()?);
        let relayed = Arc::new(AtomicU64::new(0));
        let (s2, st2, r2) = (Arc::clone(&source), Arc::clone(&stop), Arc::clone(&relayed));
        let thread = std::thread::Builder::new()
            .name("vdpa-irq-fanout".into())
            .spawn(move || fanout_loop(&s2, &st2, &targets, &r2))
            .map_err(|e| err(format!("interrupt fan-out thread: {e}")))?;
        Ok(FanOut {
            source,
            stop,
            relayed,
            thread: Some(thread),
        })
    }

    /// Interrupts relayed so far (one per firing of the shared vector).
    pub fn relayed(&self) -> u64 {
        self.relayed.load(Ordering::Relaxed)
    }
}

impl Drop for FanOut {
    fn drop(&mut self) {
        let _ = self.stop.write(1);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn fanout_loop(source: &OwnedFd, stop: &EventFd, targets: &[Arc<OwnedFd>], relayed: &AtomicU64) {
    loop {
        let mut fds = [
            PollFd::new(source.as_fd(), PollFlags::POLLIN),
            PollFd::new(stop.as_fd(), PollFlags::POLLIN),
        ];
        match poll(&mut fds, PollTimeout::NONE) {
            Ok(_) => {}
            Err(nix::errno::Errno::EINTR) => continue,
            Err(_) => return,
        }
        let fired = fds[0].revents().is_some_and(|r| !r.is_empty());
        let stopped = fds[1].revents().is_some_and(|r| !r.is_empty());
        if stopped {
            return;
        }
        if fired {
            let mut b = [0u8; 8];
            let _ = nix::unistd::read(source.as_fd(), &mut b);
            for t in targets {
                let _ = nix::unistd::write(t.as_fd(), &1u64.to_ne_bytes());
            }
            relayed.fetch_add(1, Ordering::Relaxed);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn efd() -> Arc<OwnedFd> {
        Arc::new(
            EventFd::from_flags(EfdFlags::EFD_CLOEXEC | EfdFlags::EFD_NONBLOCK)
                .unwrap()
                .into(),
        )
    }

    #[test]
    fn layouts_follow_the_vector_count() {
        let q: Vec<(u16, Option<Arc<OwnedFd>>)> = (0..4).map(|i| (i, Some(efd()))).collect();
        let p = plan("d", 5, None, 4, &q).unwrap();
        assert_eq!(p.mode, IrqMode::PerQueue);
        assert_eq!(p.queues, vec![(0, 0), (1, 1), (2, 2), (3, 3)]);
        assert_eq!(p.config, 4);
        assert_eq!(p.fds.len(), 5);
        assert!(p.fds[4].is_none() && p.fds[..4].iter().all(Option::is_some));
        let p = plan("d", 5, Some(3), 4, &q).unwrap();
        assert_eq!(p.mode, IrqMode::Shared);
        assert_eq!(p.config, 1);
        assert!(p.queues.iter().all(|&(_, v)| v == 0));
        assert!(p.fanout.is_some());
        let p = plan("d", 1, None, 4, &q[..1]).unwrap();
        assert_eq!(p.mode, IrqMode::Single);
        assert!(p.fanout.is_none());
        assert_eq!(p.config, 0);
        let none: Vec<(u16, Option<Arc<OwnedFd>>)> = (0..2).map(|i| (i, None)).collect();
        assert_eq!(plan("d", 0, None, 2, &none).unwrap().mode, IrqMode::Off);
        let e = plan("d", 0, None, 2, &q[..2]).unwrap_err().to_string();
        assert!(e.contains("no MSI-X vectors"), "{e}");
    }

    #[test]
    fn fanout_signals_every_call_fd() {
        let q: Vec<(u16, Option<Arc<OwnedFd>>)> = (0..3).map(|i| (i, Some(efd()))).collect();
        let p = plan("d", 2, None, 3, &q).unwrap();
        let src = p.fds[0].clone().unwrap();
        nix::unistd::write(src.as_fd(), &1u64.to_ne_bytes()).unwrap();
        for (_, c) in &q {
            let c = c.as_ref().unwrap();
            let mut f = [PollFd::new(c.as_fd(), PollFlags::POLLIN)];
            assert_eq!(poll(&mut f, PollTimeout::from(2000u16)).unwrap(), 1);
        }
        let f = p.fanout.as_ref().unwrap();
        let t0 = std::time::Instant::now();
        while f.relayed() == 0 && t0.elapsed().as_secs() < 2 {
            std::thread::yield_now();
        }
        assert_eq!(f.relayed(), 1);
    }
}

//! The control thread of one vhost-user socket: listens (server mode) or connects with a 1 s
//! retry (client mode), serves one front end at a time, and resets the device when it goes away
//! so the next one (a restarted QEMU or testpmd) starts clean. Dataplane lcores never wait on it.
//! The thread sleeps in one epoll instance ([`Waiter`]) watching its stop eventfd and the socket
//! it serves (the listener while waiting for a front end, then the connection).

use std::os::fd::AsFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::thread::JoinHandle;
use std::time::Duration;

use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use nix::sys::epoll::{Epoll, EpollCreateFlags, EpollEvent, EpollFlags, EpollTimeout};
use nix::sys::eventfd::{EfdFlags, EventFd};

use super::VhostError;
use super::device::{Device, NetConfig, Outcome, Shared};
use super::socket::{Conn, ConnError};
use crate::vdpa::binding::{Binding, SharedDevice};

/// How the socket is set up.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// Socket path.
    pub path: PathBuf,
    /// Connect to the front end (which listens) instead of listening.
    pub client: bool,
    /// What the device offers.
    pub net: NetConfig,
    /// vDPA passthrough: this device runs the rings (features, queue count and config space are
    /// the intersection of `net` and the device's).
    pub vdpa: Option<SharedDevice>,
}

/// A running control thread. Dropping it stops the thread and removes the socket (server mode).
#[derive(Debug)]
pub struct Server {
    stop: Arc<EventFd>,
    thread: Option<JoinHandle<()>>,
    shared: Arc<Shared>,
    path: PathBuf,
    client: bool,
    binding_stats: Option<Arc<crate::vdpa::binding::BindingStats>>,
}

impl Server {
    /// Binds (server mode) and starts the control thread.
    pub fn start(cfg: ServerConfig) -> Result<Server, VhostError> {
        let binding = cfg
            .vdpa
            .as_ref()
            .map(|d| Binding::new(Arc::clone(d), cfg.net.queue_pairs as usize * 2));
        let pairs = binding
            .as_ref()
            .map_or(cfg.net.queue_pairs, |b| b.queue_pairs(cfg.net.queue_pairs));
        let binding_stats = binding.as_ref().map(|b| Arc::clone(b.stats()));
        let shared = Shared::new(pairs);
        let listener = if cfg.client {
            None
        } else {
            if cfg.path.exists() {
                // A stale socket from an earlier run: only remove it if nobody answers on it.
                if UnixStream::connect(&cfg.path).is_ok() {
                    return Err(VhostError::Socket {
                        path: cfg.path.clone(),
                        why: "another process is listening on it".into(),
                    });
                }
                let _ = std::fs::remove_file(&cfg.path);
            }
            let l = UnixListener::bind(&cfg.path).map_err(|e| VhostError::Socket {
                path: cfg.path.clone(),
                why: format!("bind: {e}"),
            })?;
            Some(l)
        };
        let stop = Arc::new(
            EventFd::from_flags(EfdFlags::EFD_CLOEXEC | EfdFlags::EFD_NONBLOCK).map_err(|e| {
                VhostError::Socket {
                    path: cfg.path.clone(),
                    why: format!("eventfd: {e}"),
                }
            })?,
        );
        let (stop2, shared2, cfg2) = (Arc::clone(&stop), Arc::clone(&shared), cfg.clone());
        let thread = std::thread::Builder::new()
            .name("vhost-ctl".into())
            .spawn(move || control_loop(cfg2, listener, &stop2, shared2, binding))
            .map_err(|e| VhostError::Socket {
                path: cfg.path.clone(),
                why: format!("spawn: {e}"),
            })?;
        Ok(Server {
            stop,
            thread: Some(thread),
            shared,
            path: cfg.path,
            client: cfg.client,
            binding_stats,
        })
    }

    /// The state the port's queues use.
    pub fn shared(&self) -> &Arc<Shared> {
        &self.shared
    }

    /// Socket path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The vDPA binding's counters (relayed kicks, configures), when the socket has one.
    pub fn binding_stats(&self) -> Option<&Arc<crate::vdpa::binding::BindingStats>> {
        self.binding_stats.as_ref()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.stop.write(1);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        if !self.client {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// Waits until `fd` is readable (or hung up) or `stop` fires; returns false on stop.
pub(crate) fn wait_readable(fd: &impl AsFd, stop: &EventFd) -> bool {
    loop {
        let mut fds = [
            PollFd::new(fd.as_fd(), PollFlags::POLLIN),
            PollFd::new(stop.as_fd(), PollFlags::POLLIN),
        ];
        match poll(&mut fds, PollTimeout::NONE) {
            Ok(0) => continue,
            Ok(_) => {
                if fds[1].revents().is_some_and(|r| !r.is_empty()) {
                    return false;
                }
                return true;
            }
            Err(nix::errno::Errno::EINTR) => continue,
            Err(_) => return true,
        }
    }
}

fn control_loop(
    cfg: ServerConfig,
    listener: Option<UnixListener>,
    stop: &EventFd,
    shared: Arc<Shared>,
    binding: Option<Binding>,
) {
    let mut dev = match binding {
        Some(b) => Device::with_vdpa(cfg.net, Arc::clone(&shared), b),
        None => Device::new(cfg.net, Arc::clone(&shared)),
    };
    let waiter = match Waiter::new(stop) {
        Ok(w) => w,
        Err(e) => {
            tracing::error!(
                "{}: epoll: {e}; the socket is not served",
                cfg.path.display()
            );
            return;
        }
    };
    loop {
        if sleep_or_stop(stop, Duration::ZERO) {
            break;
        }
        let stream = match &listener {
            Some(l) => {
                if !waiter.wait_on(l) {
                    break;
                }
                match l.accept() {
                    Ok((s, _)) => s,
                    Err(e) => {
                        tracing::warn!("{}: accept: {e}", cfg.path.display());
                        continue;
                    }
                }
            }
            None => match UnixStream::connect(&cfg.path) {
                Ok(s) => s,
                Err(_) => {
                    // Client mode: retry every second until the front end listens.
                    if sleep_or_stop(stop, Duration::from_secs(1)) {
                        break;
                    }
                    continue;
                }
            },
        };
        shared.connections.fetch_add(1, Ordering::Relaxed);
        tracing::info!("{}: front end connected", cfg.path.display());
        let mut conn = Conn::new(stream);
        serve(&mut dev, &mut conn, &waiter, &cfg.path);
        // Rings stop (every poller out of them) before the connection closes: a front end that
        // sees the hang-up may reuse its buffers at once.
        dev.reset();
        drop(conn);
        tracing::info!("{}: front end gone; device reset", cfg.path.display());
    }
    dev.reset();
}

enum Wait {
    Ready,
    Timeout,
    Stop,
}

/// The control thread's sleep: one epoll instance with the stop eventfd always in it and the
/// socket being served added while it is served (level-triggered, so a message left unread
/// wakes the next wait at once).
struct Waiter<'a> {
    ep: Epoll,
    stop: &'a EventFd,
}

const STOP_TOKEN: u64 = 0;
const SOCK_TOKEN: u64 = 1;

impl<'a> Waiter<'a> {
    fn new(stop: &'a EventFd) -> nix::Result<Waiter<'a>> {
        let ep = Epoll::new(EpollCreateFlags::EPOLL_CLOEXEC)?;
        ep.add(stop, EpollEvent::new(EpollFlags::EPOLLIN, STOP_TOKEN))?;
        Ok(Waiter { ep, stop })
    }

    /// Adds the socket to serve.
    fn watch(&self, fd: &impl AsFd) -> nix::Result<()> {
        self.ep.add(
            fd,
            EpollEvent::new(
                EpollFlags::EPOLLIN | EpollFlags::EPOLLRDHUP | EpollFlags::EPOLLHUP,
                SOCK_TOKEN,
            ),
        )
    }

    /// Takes it out again.
    fn unwatch(&self, fd: &impl AsFd) {
        let _ = self.ep.delete(fd);
    }

    /// Waits until the watched socket is readable (or hung up), the stop eventfd fires, or `t`
    /// passes (`None`: no limit). Stop wins over a ready socket.
    fn wait(&self, t: Option<Duration>) -> Wait {
        let timeout = t.map_or(EpollTimeout::NONE, |d| {
            EpollTimeout::try_from(d).unwrap_or(EpollTimeout::MAX)
        });
        let mut ev = [EpollEvent::empty(); 2];
        loop {
            match self.ep.wait(&mut ev, timeout) {
                Ok(0) => {
                    if t.is_some() {
                        return Wait::Timeout;
                    }
                }
                Ok(n) => {
                    if ev[..n].iter().any(|e| e.data() == STOP_TOKEN) {
                        return Wait::Stop;
                    }
                    return Wait::Ready;
                }
                Err(nix::errno::Errno::EINTR) => {
                    if t.is_some() {
                        return Wait::Timeout;
                    }
                }
                // Cannot wait: let the caller try the socket (a read error ends the connection).
                Err(_) => return Wait::Ready,
            }
        }
    }

    /// Waits for `fd` alone (the listener): whether it became readable before a stop.
    fn wait_on(&self, fd: &impl AsFd) -> bool {
        if let Err(e) = self.watch(fd) {
            tracing::warn!("epoll: watching the listener: {e}");
            return wait_readable(fd, self.stop);
        }
        let r = self.wait(None);
        self.unwatch(fd);
        !matches!(r, Wait::Stop)
    }
}

/// Sleeps `d` unless `stop` fires first; returns whether it fired.
pub(crate) fn sleep_or_stop(stop: &EventFd, d: Duration) -> bool {
    let mut fds = [PollFd::new(stop.as_fd(), PollFlags::POLLIN)];
    let t = PollTimeout::try_from(d).unwrap_or(PollTimeout::MAX);
    matches!(poll(&mut fds, t), Ok(n) if n > 0)
}

/// How often the control thread looks for IOTLB misses its pollers reported (only while
/// ACCESS_PLATFORM is negotiated; otherwise it sleeps until a message comes).
const MISS_TICK: Duration = Duration::from_millis(1);

fn serve(dev: &mut Device, conn: &mut Conn, waiter: &Waiter<'_>, path: &Path) {
    if let Err(e) = waiter.watch(conn.stream()) {
        tracing::warn!("{}: epoll: {e}; closing the connection", path.display());
        return;
    }
    serve_watched(dev, conn, waiter, path);
    waiter.unwatch(conn.stream());
}

fn serve_watched(dev: &mut Device, conn: &mut Conn, waiter: &Waiter<'_>, path: &Path) {
    loop {
        // With ACCESS_PLATFORM the thread also ticks, to send the misses pollers reported.
        let tick = dev.iotlb_active().then_some(MISS_TICK);
        match waiter.wait(tick) {
            Wait::Stop => return,
            Wait::Timeout => {
                dev.service_misses();
                continue;
            }
            Wait::Ready => {}
        }
        let m = match conn.recv() {
            Ok(m) => m,
            Err(ConnError::Closed) => return,
            Err(e) => {
                tracing::warn!("{}: {e}; closing the connection", path.display());
                return;
            }
        };
        match dev.handle(conn, m) {
            Ok(Outcome::Continue) => {}
            Ok(Outcome::Close) => return,
            Err(e) => {
                tracing::warn!("{}: {e}; closing the connection", path.display());
                return;
            }
        }
    }
}

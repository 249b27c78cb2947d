//! Host-side helpers: program lookup, temporary directories and supervised
//! helper processes (testpmd and other vhost-user peers) that never outlive
//! the test.

use std::env;
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use crate::error::{Error, IoContext};

static SEQ: AtomicU32 = AtomicU32::new(0);

/// A process-unique sequence number (for names of sockets, prefixes, dirs).
pub(crate) fn next_seq() -> u32 {
    SEQ.fetch_add(1, Ordering::Relaxed)
}

/// Finds an executable in `PATH` (and the sbin directories, which are not in
/// every user's `PATH`).
pub fn find_program(name: &str) -> Option<PathBuf> {
    if name.contains('/') {
        let p = PathBuf::from(name);
        return p.is_file().then_some(p);
    }
    let path = env::var_os("PATH").unwrap_or_default();
    env::split_paths(&path)
        .chain(
            [
                "/usr/local/sbin",
                "/usr/local/bin",
                "/usr/sbin",
                "/usr/bin",
                "/sbin",
                "/bin",
            ]
            .map(PathBuf::from),
        )
        .map(|dir| dir.join(name))
        .find(|p| {
            p.metadata()
                .map(|m| {
                    m.is_file()
                        && std::os::unix::fs::PermissionsExt::mode(&m.permissions()) & 0o111 != 0
                })
                .unwrap_or(false)
        })
}

/// Like [`find_program`], but a missing program is an [`Error::Missing`]
/// naming the Debian package to install.
pub fn require_program(name: &str, package: &str) -> Result<PathBuf, Error> {
    find_program(name).ok_or_else(|| {
        Error::missing(
            format!("`{name}` not found"),
            format!("install package {package}"),
        )
    })
}

/// A directory under the system temp dir (short paths: unix socket paths are
/// limited to 107 bytes), removed with its contents on drop unless
/// `VMTEST_KEEP=1`.
#[derive(Debug)]
pub struct TempDir {
    path: PathBuf,
}

impl TempDir {
    /// Creates `/tmp/vmtest-<prefix>-<pid>-<n>`.
    pub fn new(prefix: &str) -> Result<Self, Error> {
        let path = env::temp_dir().join(format!(
            "vmtest-{prefix}-{}-{}",
            std::process::id(),
            next_seq()
        ));
        fs::create_dir_all(&path).ctx(|| format!("creating {}", path.display()))?;
        Ok(TempDir { path })
    }

    /// The directory.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// `self.path().join(name)`.
    pub fn join(&self, name: &str) -> PathBuf {
        self.path.join(name)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        if !crate::artifacts::keep_files() {
            let _ = fs::remove_dir_all(&self.path);
        }
    }
}

/// A host process supervised for a test: its stdout and stderr go to a log
/// file, its stdin is a pipe held open until [`HostProcess::stop`], and it is
/// killed and reaped when dropped — it never outlives the test.
#[derive(Debug)]
pub struct HostProcess {
    name: String,
    child: Option<Child>,
    stdin: Option<ChildStdin>,
    log: PathBuf,
}

impl HostProcess {
    /// Spawns `cmd` with its output appended to `log`.
    pub fn spawn(name: &str, mut cmd: Command, log: &Path) -> Result<Self, Error> {
        let out = fs::File::create(log).ctx(|| format!("creating {}", log.display()))?;
        let err = out
            .try_clone()
            .ctx(|| format!("duplicating {}", log.display()))?;
        // Same process group as the test: a Ctrl-C reaches the helper too.
        cmd.stdin(Stdio::piped()).stdout(out).stderr(err);
        let mut child = cmd.spawn().ctx(|| format!("starting {name} ({cmd:?})"))?;
        let stdin = child.stdin.take();
        Ok(HostProcess {
            name: name.to_string(),
            child: Some(child),
            stdin,
            log: log.to_path_buf(),
        })
    }

    /// The process id (0 once reaped).
    pub fn id(&self) -> u32 {
        self.child.as_ref().map_or(0, Child::id)
    }

    /// Whether the process is still running (reaps it if it exited).
    pub fn is_running(&mut self) -> bool {
        match self.child.as_mut().map(Child::try_wait) {
            Some(Ok(None)) => true,
            Some(_) | None => false,
        }
    }

    /// Exit status, if it has exited.
    pub fn try_status(&mut self) -> Option<ExitStatus> {
        self.child.as_mut()?.try_wait().ok().flatten()
    }

    /// Writes to the process's stdin (e.g. commands for an interactive tool).
    pub fn write_stdin(&mut self, data: &[u8]) -> Result<(), Error> {
        let Some(stdin) = self.stdin.as_mut() else {
            return Err(Error::HostProcess {
                what: format!("{}: stdin already closed", self.name),
                log_tail: self.log_tail(20),
            });
        };
        stdin
            .write_all(data)
            .and_then(|()| stdin.flush())
            .ctx(|| format!("writing to {}", self.name))
    }

    /// The whole log so far.
    pub fn log(&self) -> String {
        fs::read(&self.log)
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default()
    }

    /// Path of the log file.
    pub fn log_path(&self) -> &Path {
        &self.log
    }

    /// The last `n` lines of the log.
    pub fn log_tail(&self, n: usize) -> String {
        crate::guest::tail_lines(&self.log(), n)
    }

    /// Sends `sig` (a `kill(1)` option such as `-INT` or `-KILL`) to the process.
    pub fn signal(&self, sig: &str) {
        let _ = Command::new("kill")
            .args([sig, &self.id().to_string()])
            .stderr(Stdio::null())
            .status();
    }

    /// Waits up to `within` for the process to exit by itself; the error carries the log's tail.
    pub fn wait_exit(&mut self, within: Duration) -> Result<(), String> {
        let end = Instant::now() + within;
        while self.is_running() {
            if Instant::now() > end {
                return Err(format!(
                    "{} did not exit in {within:?}:\n{}",
                    self.name,
                    self.log_tail(30)
                ));
            }
            thread::sleep(Duration::from_millis(50));
        }
        Ok(())
    }

    /// Stops the process: closes its stdin, then sends SIGTERM, then SIGKILL,
    /// allowing `grace` in total. Always reaps it.
    pub fn stop(&mut self, grace: Duration) -> Option<ExitStatus> {
        drop(self.stdin.take());
        let mut child = self.child.take()?;
        if let Some(st) = wait_until(&mut child, Instant::now() + grace / 2) {
            return Some(st);
        }
        // SIGTERM through kill(1): std only offers SIGKILL, and this avoids unsafe.
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(child.id().to_string())
            .stderr(Stdio::null())
            .status();
        if let Some(st) = wait_until(&mut child, Instant::now() + grace / 2) {
            return Some(st);
        }
        let _ = child.kill();
        child.wait().ok()
    }
}

fn wait_until(child: &mut Child, deadline: Instant) -> Option<ExitStatus> {
    loop {
        if let Ok(Some(st)) = child.try_wait() {
            return Some(st);
        }
        if Instant::now() >= deadline {
            return None;
        }
        thread::sleep(Duration::from_millis(20));
    }
}

impl Drop for HostProcess {
    fn drop(&mut self) {
        drop(self.stdin.take());
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// DPDK's `dpdk-testpmd` (Debian package `dpdk-dev`) as a vhost-user server:
/// a backend nobody in this project wrote, to pin the harness down against.
///
/// It runs without hugepages (`--no-huge`), with no PCI scan, its own
/// `--file-prefix` (whose EAL runtime directory is removed afterwards), both lcores floating over the CPUs this process may use,
/// and in its non-interactive mode kept alive by the stdin pipe
/// [`HostProcess`] holds. Dropping it kills it.
#[derive(Debug)]
pub struct Testpmd {
    proc: HostProcess,
    socket: PathBuf,
    runtime_dir: PathBuf,
}

impl Testpmd {
    /// The `dpdk-testpmd` binary, or [`Error::Missing`] naming `dpdk-dev`.
    pub fn program() -> Result<PathBuf, Error> {
        require_program("dpdk-testpmd", "dpdk-dev")
    }

    /// Starts testpmd serving one vhost-user port at `socket` in
    /// `icmpecho` mode (answers ARP and ICMP echo requests), logging to
    /// `log_dir/testpmd.log`.
    pub fn vhost_user_icmpecho(socket: &Path, log_dir: &Path) -> Result<Self, Error> {
        Self::vhost_user(socket, log_dir, &["--forward-mode=icmpecho"])
    }

    /// Starts testpmd serving one vhost-user port at `socket` with extra
    /// testpmd application arguments (after `--`), auto-started (`-a`).
    /// Waits (up to 30 s) until the socket exists.
    pub fn vhost_user(socket: &Path, log_dir: &Path, app_args: &[&str]) -> Result<Self, Error> {
        let bin = Self::program()?;
        let cpus = allowed_cpus();
        let prefix = format!("vmtest-{}-{}", std::process::id(), next_seq());
        let _ = fs::remove_file(socket);
        let mut cmd = Command::new(bin);
        cmd.arg("--no-pci")
            .arg("--no-huge")
            .args(["-m", "256"])
            .arg(format!("--file-prefix={prefix}"))
            .arg(format!("--lcores=0@({cpus}),1@({cpus})"))
            .arg(format!(
                "--vdev=net_vhost0,iface={},queues=1",
                socket.display()
            ))
            .arg("--")
            .arg("--total-num-mbufs=16384")
            .arg("--nb-cores=1")
            .arg("-a")
            .args(app_args);
        let runtime_dir = eal_runtime_dir(&prefix);
        let mut proc = HostProcess::spawn("dpdk-testpmd", cmd, &log_dir.join("testpmd.log"))?;
        let cleanup = |proc: &mut HostProcess| {
            proc.stop(Duration::from_millis(500));
            let _ = fs::remove_dir_all(&runtime_dir);
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        while !socket.exists() {
            if !proc.is_running() {
                cleanup(&mut proc);
                return Err(Error::HostProcess {
                    what: "dpdk-testpmd exited before creating its vhost-user socket".into(),
                    log_tail: proc.log_tail(30),
                });
            }
            if Instant::now() >= deadline {
                cleanup(&mut proc);
                return Err(Error::HostProcess {
                    what: format!(
                        "dpdk-testpmd did not create {} within 30 s",
                        socket.display()
                    ),
                    log_tail: proc.log_tail(30),
                });
            }
            thread::sleep(Duration::from_millis(50));
        }
        Ok(Testpmd {
            proc,
            socket: socket.to_path_buf(),
            runtime_dir,
        })
    }

    /// The vhost-user socket path.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// The supervised process.
    pub fn process(&mut self) -> &mut HostProcess {
        &mut self.proc
    }

    /// Stops testpmd gracefully (closing stdin makes it stop forwarding and
    /// print its port statistics) and returns its whole log.
    pub fn stop(mut self) -> String {
        self.proc.stop(Duration::from_secs(10));
        self.proc.log()
    }
}

impl Drop for Testpmd {
    fn drop(&mut self) {
        self.proc.stop(Duration::from_millis(500));
        let _ = fs::remove_dir_all(&self.runtime_dir);
    }
}

/// Where DPDK's EAL puts the runtime files of `--file-prefix=prefix`
/// (it creates the directory even with `--no-shconf`).
fn eal_runtime_dir(prefix: &str) -> PathBuf {
    let base = if fs::metadata("/proc/self")
        .map(|m| std::os::unix::fs::MetadataExt::uid(&m) == 0)
        .unwrap_or(false)
    {
        PathBuf::from("/var/run")
    } else {
        env::var_os("XDG_RUNTIME_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(env::temp_dir)
    };
    base.join("dpdk").join(prefix)
}

/// `Cpus_allowed_list` of this process (e.g. `0-1`), for DPDK's `--lcores`.
fn allowed_cpus() -> String {
    fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("Cpus_allowed_list:"))
                .map(|v| v.trim().to_string())
        })
        .filter(|v| !v.is_empty())
        .unwrap_or_else(|| "0".to_string())
}

/// Polls `f` every 20 ms until it holds; an error naming `what` after `within`.
pub fn wait_for(what: &str, within: Duration, mut f: impl FnMut() -> bool) -> Result<(), String> {
    let end = Instant::now() + within;
    while !f() {
        if Instant::now() > end {
            return Err(format!("{what}: not within {within:?}"));
        }
        thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}

/// `cmd` run through `sh -c 'exec ...'` with its stdout redirected into `file`, so a
/// [`HostProcess`] keeps stderr in its log while stdout (e.g. a JSON summary) goes to `file`.
/// Every argument is single-quoted (quotes inside escaped); the environment is carried over.
pub fn sh_redirect(cmd: Command, file: &Path) -> Command {
    let quote = |s: &str| format!("'{}'", s.replace('\'', "'\\''"));
    let mut line: Vec<String> = std::iter::once(cmd.get_program())
        .chain(cmd.get_args())
        .map(|a| quote(&a.to_string_lossy()))
        .collect();
    line.push(format!("> {}", quote(&file.to_string_lossy())));
    let mut sh = Command::new("sh");
    sh.args(["-c", &format!("exec {}", line.join(" "))]);
    for (k, v) in cmd.get_envs() {
        if let Some(v) = v {
            sh.env(k, v);
        }
    }
    sh
}

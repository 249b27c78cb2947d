//! Describing, booting and judging one guest.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::fs;
use std::io::{Read, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use crate::accel::{Accel, accel};
use crate::artifacts::{Artifacts, artifacts, keep_files, needed_libs, write_atomic};
use crate::cpio::{CpioWriter, gzip};
use crate::error::{Error, IoContext};
use crate::host::next_seq;

/// How many console lines a failure report shows.
pub const CONSOLE_TAIL_LINES: usize = 40;

/// Device options a `virtio-net-pci` needs to be usable by VFIO inside a
/// guest with [`GuestBuilder::intel_iommu`]: modern-only, behind the IOMMU.
pub const VFIO_NIC_OPTS: &str = "disable-legacy=on,iommu_platform=on";

const MARKER: &str = "VMTEST ";
const EXIT_MARKER: &str = "VMTEST-EXIT ";
const FAIL_MARKER: &str = "VMTEST-FAIL ";
const MODULE_FAIL_MARKER: &str = "VMTEST-MODULE-FAILED ";
const BOOT_MARKER: &str = "VMTEST-BOOT ";
const PANIC_TEXT: &str = "Kernel panic - not syncing";

/// The guest's `/init`: mounts, loads the requested modules in dependency
/// order, runs the test script with the helpers of `LIB_SH`, reports the
/// script's exit status and powers off.
const INIT_SH: &str = r#"#!/bin/busybox sh
/bin/busybox mkdir -p /proc /sys /dev /tmp /run /sbin /usr/bin /usr/sbin /var /root
/bin/busybox --install -s
export PATH=/sbin:/usr/sbin:/bin:/usr/bin HOME=/root
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev 2>/dev/null
mkdir -p /dev/pts /dev/shm /dev/hugepages
mount -t devpts devpts /dev/pts
mount -t tmpfs tmpfs /dev/shm
mount -t tmpfs tmpfs /tmp
mount -t tmpfs tmpfs /run
echo "VMTEST-BOOT $(uname -r)"
if [ -s /vmtest/modules ]; then
    while read -r m; do
        [ -n "$m" ] || continue
        if ! insmod "/lib/modules/vmtest/$m.ko"; then
            echo "VMTEST-MODULE-FAILED $m"
            poweroff -f
        fi
    done < /vmtest/modules
fi
ip link set lo up 2>/dev/null
cd /vmtest
sh -c '. /vmtest/lib.sh; . /vmtest/test.sh' </dev/console >/dev/console 2>&1
echo "VMTEST-EXIT $?"
sync
poweroff -f
"#;

/// Shell helpers sourced before every test script.
const LIB_SH: &str = r#"# vmtest guest helpers
# vmtest_report KEY VALUE...: a marker line the host parses into GuestRun::markers
vmtest_report() { _vk=$1; shift; echo "VMTEST $_vk=$*"; }
# vmtest_fail MESSAGE...: report a failure reason and exit 1
vmtest_fail() { echo "VMTEST-FAIL $*"; exit 1; }
# vmtest_wait_for SECONDS CMD...: retry CMD every 0.2 s until it succeeds
vmtest_wait_for() {
    _vn=$(( $1 * 5 )); shift
    until "$@" >/dev/null 2>&1; do
        _vn=$(( _vn - 1 )); [ "$_vn" -gt 0 ] || return 1; sleep 0.2
    done
}
# vmtest_netdevs DRIVER: network interfaces whose device is bound to DRIVER
vmtest_netdevs() {
    for _vd in /sys/class/net/*; do
        [ "$(basename "$(readlink "$_vd/device/driver" 2>/dev/null)")" = "$1" ] && basename "$_vd"
    done
    return 0
}
"#;

/// Entry point of the builder API.
#[derive(Debug, Clone, Copy)]
pub struct Guest;

impl Guest {
    /// A builder with defaults: 256 MiB, 1 vCPU, no devices, 60 s timeout.
    pub fn builder() -> GuestBuilder {
        GuestBuilder::default()
    }
}

/// A QEMU network backend (`-netdev`) towards a host-side peer.
#[derive(Debug, Clone)]
pub enum Netdev {
    /// `-netdev socket,connect=ADDR` (QEMU connects to a TCP listener).
    SocketConnect(SocketAddr),
    /// `-netdev socket,listen=ADDR` (QEMU listens).
    SocketListen(SocketAddr),
    /// `-netdev socket,udp=REMOTE,localaddr=LOCAL` (UDP unicast tunnel).
    SocketUdp {
        /// QEMU's own address.
        local: SocketAddr,
        /// The peer's address.
        remote: SocketAddr,
    },
    /// `-netdev stream,server=off,addr.type=inet,...` (QEMU ≥ 7.2).
    StreamConnect(SocketAddr),
    /// `-netdev stream,server=on,addr.type=inet,...`.
    StreamListen(SocketAddr),
    /// `-netdev stream,addr.type=unix,addr.path=PATH`.
    StreamUnix {
        /// Socket path.
        path: PathBuf,
        /// Whether QEMU listens (`true`) or connects.
        server: bool,
    },
    /// `-netdev dgram,local...,remote...` (QEMU ≥ 7.2).
    Dgram {
        /// QEMU's own address.
        local: SocketAddr,
        /// The peer's address.
        remote: SocketAddr,
    },
    /// Any other netdev spec, without `id=` (added by the harness).
    Raw(String),
}

impl Netdev {
    fn to_arg(&self, id: &str) -> String {
        let inet = |prefix: &str, a: &SocketAddr| {
            format!(
                "{prefix}.type=inet,{prefix}.host={},{prefix}.port={}",
                a.ip(),
                a.port()
            )
        };
        match self {
            Netdev::SocketConnect(a) => format!("socket,id={id},connect={a}"),
            Netdev::SocketListen(a) => format!("socket,id={id},listen={a}"),
            Netdev::SocketUdp { local, remote } => {
                format!("socket,id={id},udp={remote},localaddr={local}")
            }
            Netdev::StreamConnect(a) => format!("stream,id={id},server=off,{}", inet("addr", a)),
            Netdev::StreamListen(a) => format!("stream,id={id},server=on,{}", inet("addr", a)),
            Netdev::StreamUnix { path, server } => format!(
                "stream,id={id},server={},addr.type=unix,addr.path={}",
                if *server { "on" } else { "off" },
                qemu_escape(&path.to_string_lossy())
            ),
            Netdev::Dgram { local, remote } => format!(
                "dgram,id={id},{},{}",
                inet("local", local),
                inet("remote", remote)
            ),
            Netdev::Raw(spec) => format!("{spec},id={id}"),
        }
    }
}

#[derive(Debug, Clone)]
enum Device {
    VhostUserNet {
        socket: PathBuf,
        queues: u16,
        opts: String,
    },
    VirtioNet {
        netdev: Option<Netdev>,
        opts: String,
    },
}

#[derive(Debug, Clone)]
enum FileSource {
    /// A host executable; its shared libraries come along.
    Binary(PathBuf),
    Bytes(Vec<u8>),
}

#[derive(Debug, Clone)]
struct GuestFile {
    guest_path: String,
    mode: u32,
    source: FileSource,
}

/// Describes one guest. Build with [`Guest::builder`], finish with
/// [`GuestBuilder::run`].
#[derive(Debug, Clone)]
pub struct GuestBuilder {
    name: String,
    memory_mb: u32,
    cpus: u32,
    shared_memory: bool,
    iommu: bool,
    iommu_opts: String,
    cmdline: Vec<String>,
    modules: Vec<String>,
    files: Vec<GuestFile>,
    script: String,
    timeout: Duration,
    devices: Vec<Device>,
    qemu_args: Vec<String>,
    accel: Option<Accel>,
    cpu: Option<String>,
    abort_on_stderr: Option<String>,
    keep_on_failure: bool,
}

impl Default for GuestBuilder {
    fn default() -> Self {
        GuestBuilder {
            name: "guest".into(),
            memory_mb: 256,
            cpus: 1,
            shared_memory: false,
            iommu: false,
            iommu_opts: String::new(),
            cmdline: Vec::new(),
            modules: Vec::new(),
            files: Vec::new(),
            script: String::new(),
            timeout: Duration::from_secs(60),
            devices: Vec::new(),
            qemu_args: Vec::new(),
            accel: None,
            cpu: None,
            abort_on_stderr: None,
            keep_on_failure: true,
        }
    }
}

impl GuestBuilder {
    /// A name for messages and the run directory (use the test's name).
    pub fn name(mut self, name: &str) -> Self {
        self.name = name.to_string();
        self
    }

    /// Guest RAM in MiB (default 256).
    pub fn memory_mb(mut self, mb: u32) -> Self {
        self.memory_mb = mb;
        self
    }

    /// Number of vCPUs (default 1).
    pub fn cpus(mut self, n: u32) -> Self {
        self.cpus = n;
        self
    }

    /// Back guest RAM with a shared memfd (`memory-backend-memfd,share=on`),
    /// which vhost-user backends need to map it. Implied by
    /// [`GuestBuilder::vhost_user_net`].
    pub fn shared_memory(mut self, on: bool) -> Self {
        self.shared_memory = on;
        self
    }

    /// A `virtio-net-pci` backed by a vhost-user backend listening on
    /// `socket` (one queue pair). `opts` are extra device options
    /// (`"mac=52:54:00:00:00:01"`, or `""`). Under TCG `vectors=0` is added
    /// unless `opts` sets `vectors` (QEMU 7.2 crashes when a TCG guest enables
    /// MSI-X on a vhost-user device).
    pub fn vhost_user_net(self, socket: impl AsRef<Path>, opts: &str) -> Self {
        self.vhost_user_net_queues(socket, 1, opts)
    }

    /// Like [`GuestBuilder::vhost_user_net`] with `queues` queue pairs
    /// (adds `mq=on` for more than one).
    pub fn vhost_user_net_queues(
        mut self,
        socket: impl AsRef<Path>,
        queues: u16,
        opts: &str,
    ) -> Self {
        self.shared_memory = true;
        self.devices.push(Device::VhostUserNet {
            socket: socket.as_ref().to_path_buf(),
            queues: queues.max(1),
            opts: opts.to_string(),
        });
        self
    }

    /// A `virtio-net-pci` with no backend (a device for driver tests such
    /// as VFIO binding). `opts` are extra device options, e.g.
    /// [`VFIO_NIC_OPTS`].
    pub fn virtio_net_pci(mut self, opts: &str) -> Self {
        self.devices.push(Device::VirtioNet {
            netdev: None,
            opts: opts.to_string(),
        });
        self
    }

    /// A `virtio-net-pci` on the given QEMU netdev.
    pub fn netdev(mut self, netdev: Netdev, device_opts: &str) -> Self {
        self.devices.push(Device::VirtioNet {
            netdev: Some(netdev),
            opts: device_opts.to_string(),
        });
        self
    }

    /// `-netdev socket,connect=ADDR` with a `virtio-net-pci` on it: QEMU
    /// connects to a TCP listener of the test.
    pub fn netdev_socket(self, peer: SocketAddr, device_opts: &str) -> Self {
        self.netdev(Netdev::SocketConnect(peer), device_opts)
    }

    /// `-netdev stream` connecting to a TCP listener of the test.
    pub fn netdev_stream(self, peer: SocketAddr, device_opts: &str) -> Self {
        self.netdev(Netdev::StreamConnect(peer), device_opts)
    }

    /// `-netdev dgram` exchanging UDP datagrams between `local` (QEMU) and
    /// `remote` (the test).
    pub fn netdev_dgram(self, local: SocketAddr, remote: SocketAddr, device_opts: &str) -> Self {
        self.netdev(Netdev::Dgram { local, remote }, device_opts)
    }

    /// An emulated Intel IOMMU with interrupt remapping and caching mode (what
    /// VFIO inside the guest needs): `q35,kernel-irqchip=split`,
    /// `-device intel-iommu,intremap=on,caching-mode=on`, and `intel_iommu=on`
    /// on the kernel command line. Give devices [`VFIO_NIC_OPTS`].
    pub fn intel_iommu(mut self) -> Self {
        self.iommu = true;
        self
    }

    /// [`GuestBuilder::intel_iommu`] with extra `intel-iommu` options, e.g. `aw-bits=48` (a
    /// 48-bit IOVA space, so a process's virtual addresses can be IOVAs).
    pub fn intel_iommu_opts(mut self, opts: &str) -> Self {
        self.iommu = true;
        self.iommu_opts = opts.to_string();
        self
    }

    /// Appends kernel command-line arguments.
    pub fn cmdline(mut self, args: &str) -> Self {
        self.cmdline.push(args.to_string());
        self
    }

    /// Kernel modules to load at boot (with their dependencies, in order).
    /// Names may use `-` or `_`; built-in ones are skipped.
    pub fn modules(mut self, names: &[&str]) -> Self {
        self.modules.extend(names.iter().map(|n| n.to_string()));
        self
    }

    /// Copies a host executable into the guest at `guest_path`, with the
    /// shared libraries it needs. Build it for the baseline x86-64 target:
    /// TCG's CPU has no AVX.
    pub fn binary(mut self, host_path: impl AsRef<Path>, guest_path: &str) -> Self {
        self.files.push(GuestFile {
            guest_path: guest_path.to_string(),
            mode: 0o755,
            source: FileSource::Binary(host_path.as_ref().to_path_buf()),
        });
        self
    }

    /// Puts a file with the given contents and permission bits in the guest.
    pub fn file(mut self, guest_path: &str, contents: impl Into<Vec<u8>>, mode: u32) -> Self {
        self.files.push(GuestFile {
            guest_path: guest_path.to_string(),
            mode,
            source: FileSource::Bytes(contents.into()),
        });
        self
    }

    /// The test's shell script (busybox `sh`, sourced after the helpers
    /// `vmtest_report`, `vmtest_fail`, `vmtest_wait_for`, `vmtest_netdevs`).
    /// Its exit status is the guest's verdict; the harness powers off after.
    pub fn init_script(mut self, script: &str) -> Self {
        self.script = script.to_string();
        self
    }

    /// Wall-clock limit for the whole boot + script (default 60 s). QEMU is
    /// killed when it runs out, and the run fails.
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// Forces the accelerator instead of the probed [`accel()`].
    pub fn accel(mut self, accel: Accel) -> Self {
        self.accel = Some(accel);
        self
    }

    /// `-cpu MODEL` (default: QEMU's default under TCG, `host` under KVM).
    pub fn cpu(mut self, model: &str) -> Self {
        self.cpu = Some(model.to_string());
        self
    }

    /// Extra raw QEMU arguments, appended last.
    pub fn qemu_args(mut self, args: &[&str]) -> Self {
        self.qemu_args.extend(args.iter().map(|a| a.to_string()));
        self
    }

    /// Kill QEMU at once when its stderr contains `pattern` (the run then
    /// fails). Used by the KVM probe for "KVM internal error".
    pub fn abort_on_stderr(mut self, pattern: &str) -> Self {
        self.abort_on_stderr = Some(pattern.to_string());
        self
    }

    /// Whether a failed run keeps its run directory (initramfs, QEMU command
    /// line, console log) for inspection; default `true`. Tests that expect a
    /// failure turn it off.
    pub fn keep_on_failure(mut self, keep: bool) -> Self {
        self.keep_on_failure = keep;
        self
    }

    /// Boots the guest and waits for it. `Ok` only if it ran its script to the
    /// end with exit status 0, without panic or timeout; otherwise
    /// [`Error::GuestFailed`] with QEMU's stderr and the last
    /// [`CONSOLE_TAIL_LINES`] console lines.
    pub fn run(self) -> Result<GuestRun, Error> {
        let run = self.run_unchecked()?;
        run.check()
    }

    /// Boots the guest and returns what happened, failed or not. `Err` only
    /// when the guest could not be started at all.
    pub fn run_unchecked(self) -> Result<GuestRun, Error> {
        let art = artifacts()?;
        let accel = match self.accel {
            Some(a) => a,
            None => accel()?,
        };
        prune_old_runs(&art.cache_dir.join("runs"));
        let run_dir = art.cache_dir.join("runs").join(format!(
            "{}-{}-{}",
            sanitize_name(&self.name),
            std::process::id(),
            next_seq()
        ));
        fs::create_dir_all(&run_dir).ctx(|| format!("creating {}", run_dir.display()))?;

        let initrd = run_dir.join("initramfs.cpio.gz");
        let image = self.initramfs(art)?;
        write_atomic(&initrd, &image)?;

        let args = self.qemu_command(art, accel, &initrd);
        fs::write(run_dir.join("qemu.cmdline"), shell_words(&args))
            .ctx(|| "writing qemu.cmdline".into())?;

        let mut run = supervise(&self, accel, args, run_dir)?;
        fs::write(run.run_dir.join("console.log"), &run.console)
            .ctx(|| "writing console.log".into())?;
        run.kept = (self.keep_on_failure && run.failure().is_some()) || keep_files();
        if !run.kept {
            let _ = fs::remove_dir_all(&run.run_dir);
        }
        Ok(run)
    }

    fn initramfs(&self, art: &Artifacts) -> Result<Vec<u8>, Error> {
        let mut image = base_initramfs(art)?;
        let mut w = CpioWriter::new(1_000_000);

        let modules = art.kmods.resolve(&self.modules)?;
        let mut list = String::new();
        for m in &modules {
            let data = fs::read(&m.path).ctx(|| format!("reading {}", m.path.display()))?;
            w.file(&format!("lib/modules/vmtest/{}.ko", m.name), 0o644, &data);
            list.push_str(&m.name);
            list.push('\n');
        }
        w.file("vmtest/modules", 0o644, list.as_bytes());

        let mut libs = Vec::new();
        for f in &self.files {
            let data = match &f.source {
                FileSource::Bytes(b) => b.clone(),
                FileSource::Binary(p) => {
                    libs.extend(needed_libs(p)?);
                    fs::read(p).ctx(|| format!("reading {}", p.display()))?
                }
            };
            w.file(&f.guest_path, f.mode, &data);
        }
        libs.sort();
        libs.dedup();
        for lib in libs {
            let data = fs::read(&lib).ctx(|| format!("reading {}", lib.display()))?;
            w.file(&lib.to_string_lossy(), 0o755, &data);
        }
        w.file("vmtest/test.sh", 0o755, self.script.as_bytes());
        image.extend_from_slice(&gzip(&w.finish()));
        Ok(image)
    }

    fn qemu_command(&self, art: &Artifacts, accel: Accel, initrd: &Path) -> Vec<String> {
        let mut a: Vec<String> = Vec::new();
        let mut push = |items: &[&str]| a.extend(items.iter().map(|s| s.to_string()));
        push(&[
            "-nographic",
            "-nodefaults",
            "-no-user-config",
            "-no-reboot",
            "-serial",
            "stdio",
            "-monitor",
            "none",
        ]);
        let mut machine = String::from("q35");
        if self.shared_memory {
            machine.push_str(",memory-backend=mem");
        }
        if self.iommu {
            machine.push_str(",kernel-irqchip=split");
        }
        push(&["-machine", &machine]);
        match accel {
            Accel::Kvm => push(&[
                "-accel",
                "kvm",
                "-cpu",
                self.cpu.as_deref().unwrap_or("host"),
            ]),
            Accel::Tcg => {
                push(&["-accel", "tcg"]);
                if let Some(cpu) = &self.cpu {
                    push(&["-cpu", cpu]);
                }
            }
        }
        let mem = format!("{}M", self.memory_mb);
        push(&["-m", &mem, "-smp", &self.cpus.to_string()]);
        if self.shared_memory {
            push(&[
                "-object",
                &format!("memory-backend-memfd,id=mem,size={mem},share=on"),
            ]);
        }
        let mut cmdline = vec![
            "console=ttyS0,115200".to_string(),
            "panic=-1".into(),
            "oops=panic".into(),
            "rdinit=/init".into(),
            "edd=off".into(),
        ];
        if self.iommu {
            cmdline.push("intel_iommu=on".into());
        }
        cmdline.extend(self.cmdline.iter().cloned());
        push(&[
            "-kernel",
            &art.kernel_image.to_string_lossy(),
            "-initrd",
            &initrd.to_string_lossy(),
            "-append",
            &cmdline.join(" "),
        ]);
        if self.iommu {
            let mut d = "intel-iommu,intremap=on,caching-mode=on".to_string();
            append_opts(&mut d, &self.iommu_opts);
            push(&["-device", &d]);
        }
        for (i, dev) in self.devices.iter().enumerate() {
            match dev {
                Device::VhostUserNet {
                    socket,
                    queues,
                    opts,
                } => {
                    push(&[
                        "-chardev",
                        &format!(
                            "socket,id=vhu{i},path={}",
                            qemu_escape(&socket.to_string_lossy())
                        ),
                        "-netdev",
                        &format!("vhost-user,id=net{i},chardev=vhu{i},queues={queues}"),
                    ]);
                    let mut d = format!("virtio-net-pci,netdev=net{i},id=nic{i}");
                    if *queues > 1 {
                        d.push_str(",mq=on");
                    }
                    if accel == Accel::Tcg && !has_opt(opts, "vectors") {
                        d.push_str(",vectors=0");
                    }
                    no_rom(&mut d, opts);
                    append_opts(&mut d, opts);
                    push(&["-device", &d]);
                }
                Device::VirtioNet { netdev, opts } => {
                    let mut d = format!("virtio-net-pci,id=nic{i}");
                    if let Some(nd) = netdev {
                        push(&["-netdev", &nd.to_arg(&format!("net{i}"))]);
                        let _ = write!(d, ",netdev=net{i}");
                    }
                    no_rom(&mut d, opts);
                    append_opts(&mut d, opts);
                    push(&["-device", &d]);
                }
            }
        }
        a.extend(self.qemu_args.iter().cloned());
        let mut full = vec![art.qemu.to_string_lossy().into_owned()];
        full.extend(a);
        full
    }
}

fn has_opt(opts: &str, key: &str) -> bool {
    opts.split(',')
        .any(|o| o.split('=').next().is_some_and(|k| k.trim() == key))
}

/// The guest boots with `-kernel`: skip loading the NIC's iPXE option ROM
/// (saves boot time under TCG) unless the test asks for one.
fn no_rom(dev: &mut String, opts: &str) {
    if !has_opt(opts, "romfile") {
        dev.push_str(",romfile=");
    }
}

fn append_opts(dev: &mut String, opts: &str) {
    let opts = opts.trim().trim_matches(',');
    if !opts.is_empty() {
        dev.push(',');
        dev.push_str(opts);
    }
}

/// Removes run directories of processes that are gone and older than a day
/// (failed runs are kept for inspection, but not forever).
fn prune_old_runs(runs: &Path) {
    let day = Duration::from_secs(24 * 3600);
    for e in fs::read_dir(runs).into_iter().flatten().flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let pid = name.rsplit('-').nth(1).and_then(|p| p.parse::<u32>().ok());
        let old = e
            .metadata()
            .and_then(|m| m.modified())
            .ok()
            .and_then(|t| t.elapsed().ok())
            .is_some_and(|age| age > day);
        if old && pid.is_some_and(|p| !Path::new(&format!("/proc/{p}")).exists()) {
            let _ = fs::remove_dir_all(e.path());
        }
    }
}

/// QEMU option values escape `,` as `,,`.
fn qemu_escape(s: &str) -> String {
    s.replace(',', ",,")
}

fn sanitize_name(s: &str) -> String {
    s.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '_'
            }
        })
        .collect()
}

fn shell_words(args: &[String]) -> String {
    let mut s = String::new();
    for a in args {
        if !s.is_empty() {
            s.push(' ');
        }
        if a.chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_=.,/:+@".contains(c))
        {
            s.push_str(a);
        } else {
            let _ = write!(s, "'{}'", a.replace('\'', r"'\''"));
        }
    }
    s.push('\n');
    s
}

static BASE: Mutex<Option<Arc<Vec<u8>>>> = Mutex::new(None);

/// busybox (+ its libraries if dynamic), /init and the shell helpers; built
/// once per process.
fn base_initramfs(art: &Artifacts) -> Result<Vec<u8>, Error> {
    let mut guard = BASE.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(b) = guard.as_ref() {
        return Ok(b.as_ref().clone());
    }
    let mut w = CpioWriter::new(1);
    for d in [
        "dev", "proc", "sys", "tmp", "run", "root", "sbin", "usr/bin", "usr/sbin",
    ] {
        w.dir(d);
    }
    w.chardev("dev/console", 0o600, 5, 1);
    w.chardev("dev/null", 0o666, 1, 3);
    let busybox = fs::read(&art.busybox).ctx(|| format!("reading {}", art.busybox.display()))?;
    w.file("bin/busybox", 0o755, &busybox);
    w.symlink("bin/sh", "busybox");
    for lib in needed_libs(&art.busybox)? {
        let data = fs::read(&lib).ctx(|| format!("reading {}", lib.display()))?;
        w.file(&lib.to_string_lossy(), 0o755, &data);
    }
    w.file("init", 0o755, INIT_SH.as_bytes());
    w.file("vmtest/lib.sh", 0o644, LIB_SH.as_bytes());
    let image = Arc::new(gzip(&w.finish()));
    *guard = Some(Arc::clone(&image));
    Ok(image.as_ref().clone())
}

/// What a guest run produced.
#[derive(Debug, Clone)]
pub struct GuestRun {
    /// The builder's name.
    pub name: String,
    /// QEMU's exit status (after a kill at the timeout: the kill's status).
    pub status: Option<ExitStatus>,
    /// The timeout ran out and QEMU was killed.
    pub timed_out: bool,
    /// QEMU was killed because its stderr matched `abort_on_stderr`.
    pub aborted: bool,
    /// The serial console (`\r\n` folded to `\n`).
    pub console: String,
    /// QEMU's own stderr (warnings, device errors).
    pub qemu_stderr: String,
    /// `VMTEST key=value` lines, last value per key.
    pub markers: BTreeMap<String, String>,
    /// All marker lines in order, repeated keys included.
    pub marker_list: Vec<(String, String)>,
    /// The test script's exit status, if the guest reached its end.
    pub script_exit: Option<i32>,
    /// The kernel release the guest reported at boot.
    pub guest_kernel: Option<String>,
    /// The console shows a kernel panic.
    pub kernel_panic: bool,
    /// Modules that failed to load.
    pub module_failures: Vec<String>,
    /// Reasons given with `vmtest_fail`.
    pub fail_messages: Vec<String>,
    /// Wall time from QEMU start to exit.
    pub duration: Duration,
    /// Accelerator used.
    pub accel: Accel,
    /// The full QEMU command line.
    pub command: Vec<String>,
    /// Directory with the initramfs, `qemu.cmdline` and `console.log`.
    pub run_dir: PathBuf,
    /// Whether `run_dir` was kept (on failure or with `VMTEST_KEEP=1`).
    pub kept: bool,
}

impl GuestRun {
    /// A marker's (last) value.
    pub fn marker(&self, key: &str) -> Option<&str> {
        self.markers.get(key).map(String::as_str)
    }

    /// All values reported for `key`, in order.
    pub fn marker_all(&self, key: &str) -> Vec<&str> {
        self.marker_list
            .iter()
            .filter(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
            .collect()
    }

    /// A marker's value, or [`Error::MissingMarker`] with the console tail.
    pub fn expect_marker(&self, key: &str) -> Result<&str, Error> {
        self.marker(key).ok_or_else(|| Error::MissingMarker {
            name: self.name.clone(),
            key: key.to_string(),
            report: self.report(),
        })
    }

    /// The last `n` console lines.
    pub fn console_tail(&self, n: usize) -> String {
        tail_lines(&self.console, n)
    }

    /// Why the run counts as failed, or `None` if it passed.
    pub fn failure(&self) -> Option<String> {
        let mut why = if self.timed_out {
            format!(
                "timed out after {:.0} s (QEMU killed)",
                self.duration.as_secs_f64()
            )
        } else if self.aborted {
            "QEMU killed: its stderr reported a fatal error".to_string()
        } else if self.kernel_panic {
            "kernel panic".to_string()
        } else if !self.module_failures.is_empty() {
            format!("insmod failed for {}", self.module_failures.join(", "))
        } else if let Some(code) = self.script_exit {
            if code == 0 {
                match self.status {
                    Some(s) if !s.success() => format!("QEMU exited with {s}"),
                    _ => return None,
                }
            } else {
                format!("test script exited with status {code}")
            }
        } else {
            match self.status {
                Some(s) => {
                    format!("guest stopped before its script finished (QEMU exited with {s})")
                }
                None => "guest stopped before its script finished".to_string(),
            }
        };
        if !self.fail_messages.is_empty() {
            let _ = write!(why, ": {}", self.fail_messages.join("; "));
        }
        Some(why)
    }

    /// `Ok(self)` if the run passed, else [`Error::GuestFailed`].
    pub fn check(self) -> Result<Self, Error> {
        match self.failure() {
            None => Ok(self),
            Some(reason) => Err(Error::GuestFailed {
                name: self.name.clone(),
                reason,
                report: self.report(),
            }),
        }
    }

    /// QEMU's stderr, the last console lines and where the files are.
    pub fn report(&self) -> String {
        let mut r = String::new();
        let stderr = self.qemu_stderr.trim();
        if !stderr.is_empty() {
            let _ = writeln!(r, "--- QEMU stderr ---\n{}", tail_lines(stderr, 20));
        }
        let _ = writeln!(
            r,
            "--- last {CONSOLE_TAIL_LINES} console lines ({}, {:.1} s) ---\n{}",
            self.accel,
            self.duration.as_secs_f64(),
            self.console_tail(CONSOLE_TAIL_LINES)
        );
        if self.kept {
            let _ = write!(r, "--- run files kept in {} ---", self.run_dir.display());
        }
        r
    }
}

/// The last `n` lines of `text`.
pub(crate) fn tail_lines(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// Kills and reaps the child unless it was taken out.
struct ChildGuard(Option<Child>);

impl Drop for ChildGuard {
    fn drop(&mut self) {
        if let Some(mut c) = self.0.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn live_console() -> bool {
    std::env::var("VMTEST_CONSOLE").is_ok_and(|v| !v.is_empty() && v != "0")
}

fn reader(
    mut src: impl Read + Send + 'static,
    sink: Arc<Mutex<Vec<u8>>>,
    echo: Option<String>,
    abort: Option<(String, Arc<AtomicBool>)>,
) -> thread::JoinHandle<()> {
    thread::spawn(move || {
        let mut buf = [0u8; 8192];
        let mut line = Vec::new();
        loop {
            let n = match src.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            let mut all = sink.lock().unwrap_or_else(|e| e.into_inner());
            all.extend_from_slice(&buf[..n]);
            if let Some((pattern, flag)) = &abort
                && String::from_utf8_lossy(&all).contains(pattern.as_str())
            {
                flag.store(true, Ordering::SeqCst);
            }
            drop(all);
            if let Some(prefix) = &echo {
                for &b in &buf[..n] {
                    if b == b'\n' {
                        let text = String::from_utf8_lossy(&line);
                        let _ = writeln!(
                            std::io::stderr(),
                            "[{prefix}] {}",
                            text.trim_end_matches('\r')
                        );
                        line.clear();
                    } else {
                        line.push(b);
                    }
                }
            }
        }
    })
}

fn supervise(
    b: &GuestBuilder,
    accel: Accel,
    args: Vec<String>,
    run_dir: PathBuf,
) -> Result<GuestRun, Error> {
    let mut cmd = Command::new(&args[0]);
    cmd.args(&args[1..])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let start = Instant::now();
    let mut child = cmd.spawn().ctx(|| format!("starting {}", args[0]))?;
    let stdout = child.stdout.take().expect("piped stdout");
    let stderr = child.stderr.take().expect("piped stderr");
    let mut guard = ChildGuard(Some(child));

    let console = Arc::new(Mutex::new(Vec::new()));
    let qerr = Arc::new(Mutex::new(Vec::new()));
    let abort_flag = Arc::new(AtomicBool::new(false));
    let echo = live_console().then(|| b.name.clone());
    let t_out = reader(stdout, Arc::clone(&console), echo.clone(), None);
    let t_err = reader(
        stderr,
        Arc::clone(&qerr),
        echo.map(|n| format!("{n} qemu")),
        b.abort_on_stderr
            .clone()
            .map(|p| (p, Arc::clone(&abort_flag))),
    );

    let deadline = start + b.timeout;
    let mut timed_out = false;
    let mut aborted = false;
    let status = {
        let child = guard.0.as_mut().expect("child present");
        loop {
            match child.try_wait() {
                Ok(Some(st)) => break Some(st),
                Ok(None) => {}
                Err(_) => break None,
            }
            if abort_flag.load(Ordering::SeqCst) {
                aborted = true;
            } else if Instant::now() >= deadline {
                timed_out = true;
            }
            if aborted || timed_out {
                let _ = child.kill();
                break child.wait().ok();
            }
            thread::sleep(Duration::from_millis(20));
        }
    };
    let duration = start.elapsed();
    guard.0 = None;
    let _ = t_out.join();
    let _ = t_err.join();

    let console = strip_escapes(&String::from_utf8_lossy(
        &console.lock().unwrap_or_else(|e| e.into_inner()),
    ));
    let qemu_stderr =
        String::from_utf8_lossy(&qerr.lock().unwrap_or_else(|e| e.into_inner())).into_owned();
    let mut run = GuestRun {
        name: b.name.clone(),
        status,
        timed_out,
        aborted,
        console,
        qemu_stderr,
        markers: BTreeMap::new(),
        marker_list: Vec::new(),
        script_exit: None,
        guest_kernel: None,
        kernel_panic: false,
        module_failures: Vec::new(),
        fail_messages: Vec::new(),
        duration,
        accel,
        command: args,
        run_dir,
        kept: false,
    };
    parse_console(&mut run);
    Ok(run)
}

/// Drops `\r` and the terminal escape sequences the firmware prints
/// (`ESC c`, `ESC [ ... letter`).
fn strip_escapes(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '\r' => {}
            '\u{1b}' => {
                if chars.peek() == Some(&'[') {
                    chars.next();
                    while let Some(&p) = chars.peek() {
                        chars.next();
                        if p.is_ascii_alphabetic() {
                            break;
                        }
                    }
                } else {
                    chars.next();
                }
            }
            c => out.push(c),
        }
    }
    out
}

fn parse_console(run: &mut GuestRun) {
    run.kernel_panic = run.console.contains(PANIC_TEXT);
    for raw in run.console.lines() {
        let line = raw.trim();
        if let Some(rest) = line.strip_prefix(MARKER) {
            if let Some((k, v)) = rest.split_once('=')
                && !k.is_empty()
                && !k.contains(char::is_whitespace)
            {
                run.markers.insert(k.to_string(), v.trim().to_string());
                run.marker_list.push((k.to_string(), v.trim().to_string()));
            }
        } else if let Some(rest) = line.strip_prefix(EXIT_MARKER) {
            run.script_exit = rest.trim().parse().ok();
        } else if let Some(rest) = line.strip_prefix(FAIL_MARKER) {
            run.fail_messages.push(rest.trim().to_string());
        } else if let Some(rest) = line.strip_prefix(MODULE_FAIL_MARKER) {
            run.module_failures.push(rest.trim().to_string());
        } else if let Some(rest) = line.strip_prefix(BOOT_MARKER) {
            run.guest_kernel = Some(rest.trim().to_string());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn blank_run(console: &str) -> GuestRun {
        let mut r = GuestRun {
            name: "t".into(),
            status: None,
            timed_out: false,
            aborted: false,
            console: console.into(),
            qemu_stderr: String::new(),
            markers: BTreeMap::new(),
            marker_list: Vec::new(),
            script_exit: None,
            guest_kernel: None,
            kernel_panic: false,
            module_failures: Vec::new(),
            fail_messages: Vec::new(),
            duration: Duration::ZERO,
            accel: Accel::Tcg,
            command: Vec::new(),
            run_dir: PathBuf::new(),
            kept: false,
        };
        parse_console(&mut r);
        r
    }

    #[test]
    fn markers_are_parsed_and_prose_is_not() {
        let r = blank_run(
            "[    1.0] boot\nVMTEST-BOOT 6.12.1\nVMTEST iface=eth0\n+ echo 'VMTEST x=1'\n\
             VMTEST kernel=6.12.1 #1 SMP\nVMTEST n=1\nVMTEST n=2\nVMTEST bad\nVMTEST-EXIT 0\n",
        );
        assert_eq!(r.marker("iface"), Some("eth0"));
        assert_eq!(r.marker("kernel"), Some("6.12.1 #1 SMP"));
        assert_eq!(r.marker("x"), None);
        assert_eq!(r.marker("n"), Some("2"));
        assert_eq!(r.marker_all("n"), ["1", "2"]);
        assert_eq!(r.guest_kernel.as_deref(), Some("6.12.1"));
        assert_eq!(r.script_exit, Some(0));
        assert_eq!(r.failure(), None);
        assert!(r.expect_marker("missing").is_err());
    }

    #[test]
    fn failures_are_classified() {
        let r = blank_run("VMTEST-FAIL no interface\nVMTEST-EXIT 1\n");
        assert_eq!(
            r.failure().as_deref(),
            Some("test script exited with status 1: no interface")
        );
        let r = blank_run("[ 2.0] Kernel panic - not syncing: Attempted to kill init!\n");
        assert_eq!(r.failure().as_deref(), Some("kernel panic"));
        let r = blank_run("booting\n");
        assert!(r.failure().unwrap().contains("before its script finished"));
        let mut r = blank_run("");
        r.timed_out = true;
        assert!(r.failure().unwrap().starts_with("timed out"));
    }

    #[test]
    fn escapes_are_stripped() {
        assert_eq!(
            strip_escapes("\u{1b}c\u{1b}[?7l\u{1b}[2JSeaBIOS\r\nok\u{1b}[0m\n"),
            "SeaBIOS\nok\n"
        );
    }

    #[test]
    fn tail_keeps_last_lines() {
        let text: String = (1..=50).map(|i| format!("l{i}\n")).collect();
        let t = tail_lines(&text, 40);
        assert_eq!(t.lines().count(), 40);
        assert!(t.starts_with("l11"));
        assert!(t.ends_with("l50"));
    }

    #[test]
    fn device_options() {
        assert!(has_opt("mac=1,vectors=4", "vectors"));
        assert!(!has_opt("mac=1", "vectors"));
        let mut d = String::from("virtio-net-pci");
        append_opts(&mut d, ",disable-legacy=on,");
        assert_eq!(d, "virtio-net-pci,disable-legacy=on");
        assert_eq!(qemu_escape("/a,b"), "/a,,b");
        let nd = Netdev::Dgram {
            local: "127.0.0.1:5000".parse().unwrap(),
            remote: "127.0.0.1:5001".parse().unwrap(),
        };
        assert_eq!(
            nd.to_arg("n0"),
            "dgram,id=n0,local.type=inet,local.host=127.0.0.1,local.port=5000,\
             remote.type=inet,remote.host=127.0.0.1,remote.port=5001"
        );
    }
}

//! Guest tests that prove the harness: real QEMU, real Linux guests.
//!
//! Custom harness (libtest-mimic) so that missing prerequisites are reported
//! as *ignored* with one `SKIP name: reason` line, never as passed.

use std::net::UdpSocket;
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use libtest_mimic::{Arguments, Failed, Trial};
use vmtest::{Error, Guest, TempDir, Testpmd, VFIO_NIC_OPTS};

type TestResult = Result<(), Error>;

/// Test 1: boot, load virtio_net (+ failover, net_failover), report the
/// interface and the kernel version.
fn guest_boot_virtio_net() -> TestResult {
    let art = vmtest::artifacts()?;
    let run = Guest::builder()
        .name("guest_boot_virtio_net")
        .virtio_net_pci("mac=52:54:00:12:34:01")
        .modules(&["virtio_net"])
        .timeout(Duration::from_secs(50))
        .init_script(
            r#"
set -- $(vmtest_netdevs virtio_net)
[ -n "$1" ] || vmtest_fail "no interface bound to virtio_net"
vmtest_report iface "$1"
vmtest_report mac "$(cat /sys/class/net/$1/address)"
vmtest_report kernel "$(uname -r)"
vmtest_report modules "$(cut -d' ' -f1 /proc/modules | sort | tr '\n' ' ')"
"#,
        )
        .run()?;
    let iface = run.expect_marker("iface")?;
    let check = |ok: bool, what: String| -> TestResult {
        if ok {
            Ok(())
        } else {
            Err(Error::GuestFailed {
                name: run.name.clone(),
                reason: what,
                report: run.report(),
            })
        }
    };
    check(
        iface.starts_with("eth"),
        format!("interface {iface:?} is not ethN"),
    )?;
    let mac = run.expect_marker("mac")?;
    check(mac == "52:54:00:12:34:01", format!("mac {mac}"))?;
    let kernel = run.expect_marker("kernel")?;
    check(
        kernel == art.kernel_release && kernel.starts_with("6.12."),
        format!("guest kernel {kernel}, expected {}", art.kernel_release),
    )?;
    let modules: Vec<&str> = run.expect_marker("modules")?.split_whitespace().collect();
    for m in ["virtio_net", "net_failover", "failover"] {
        check(
            modules.contains(&m),
            format!("module {m} not loaded: {modules:?}"),
        )?;
    }
    Ok(())
}

/// Test 2: dpdk-testpmd as vhost-user backend in icmpecho mode; the guest
/// pings an address on its subnet and must get 5/5 replies. The traffic never
/// leaves the vhost-user socket (192.0.2.0/24 is a documentation range).
fn guest_ping_testpmd() -> TestResult {
    let dir = TempDir::new("ping")?;
    let sock = dir.join("vhost-user.sock");
    let testpmd = Testpmd::vhost_user_icmpecho(&sock, dir.path())?;
    let run = Guest::builder()
        .name("guest_ping_testpmd")
        .memory_mb(256)
        .vhost_user_net(&sock, "mac=52:54:00:12:34:02")
        .modules(&["virtio_net"])
        .timeout(Duration::from_secs(55))
        .init_script(
            r#"
set -- $(vmtest_netdevs virtio_net)
dev=$1
[ -n "$dev" ] || vmtest_fail "no interface bound to virtio_net"
ip addr add 192.0.2.2/24 dev "$dev"
ip link set "$dev" up
vmtest_wait_for 10 grep -qx up "/sys/class/net/$dev/operstate" || vmtest_fail "link of $dev not up"
vmtest_report link up
out=$(ping -c 5 -W 3 192.0.2.1 2>&1)
echo "$out"
vmtest_report ping_tx "$(echo "$out" | sed -n 's/^\([0-9]*\) packets transmitted.*/\1/p')"
vmtest_report ping_rx "$(echo "$out" | sed -n 's/.* \([0-9]*\) packets received.*/\1/p')"
"#,
        )
        .run_unchecked();
    let log = testpmd.stop();
    let run = run?;
    let failed = |reason: String| Error::GuestFailed {
        name: run.name.clone(),
        reason,
        report: format!(
            "{}\n--- testpmd log tail ---\n{}",
            run.report(),
            tail(&log, 30)
        ),
    };
    if let Some(reason) = run.failure() {
        return Err(failed(reason));
    }
    let tx = run.expect_marker("ping_tx")?;
    let rx = run.expect_marker("ping_rx")?;
    if tx != "5" || rx != "5" {
        return Err(failed(format!("ping: {rx}/{tx} replies, expected 5/5")));
    }
    // testpmd's own count: it saw the echo requests (and the ARP request).
    let rx_pkts = log
        .lines()
        .filter_map(|l| l.trim().strip_prefix("RX-packets:"))
        .filter_map(|r| r.split_whitespace().next()?.parse::<u64>().ok())
        .max()
        .unwrap_or(0);
    if rx_pkts < 5 {
        return Err(failed(format!(
            "testpmd reports {rx_pkts} received packets, expected >= 5"
        )));
    }
    Ok(())
}

/// Test 3a: a guest with an emulated IOMMU binds a virtio-net-pci function to
/// vfio-pci and reports `/dev/vfio/<group>`.
fn guest_vfio_bind() -> TestResult {
    let run = Guest::builder()
        .name("guest_vfio_bind")
        .intel_iommu()
        .virtio_net_pci(VFIO_NIC_OPTS)
        .modules(&[
            "irqbypass",
            "vfio",
            "vfio_iommu_type1",
            "vfio-pci-core",
            "vfio-pci",
        ])
        .timeout(Duration::from_secs(50))
        .init_script(
            r#"
bdf=
for d in /sys/bus/pci/devices/*; do
    if [ "$(cat $d/vendor)" = 0x1af4 ] && [ "$(cat $d/device)" = 0x1041 ]; then bdf=${d##*/}; fi
done
[ -n "$bdf" ] || vmtest_fail "no modern virtio-net PCI function"
vmtest_report bdf "$bdf"
dev=/sys/bus/pci/devices/$bdf
[ -e "$dev/iommu_group" ] || vmtest_fail "$bdf has no IOMMU group"
group=$(basename "$(readlink "$dev/iommu_group")")
vmtest_report iommu_group "$group"
vmtest_report driver_before "$(basename "$(readlink "$dev/driver")")"
[ -e "$dev/driver" ] && echo "$bdf" > "$dev/driver/unbind"
echo vfio-pci > "$dev/driver_override"
echo "$bdf" > /sys/bus/pci/drivers_probe
vmtest_report driver "$(basename "$(readlink "$dev/driver")")"
[ -c "/dev/vfio/$group" ] || vmtest_fail "/dev/vfio/$group missing: $(ls /dev/vfio)"
vmtest_report vfio_dev "/dev/vfio/$group"
"#,
        )
        .run()?;
    let group = run.expect_marker("iommu_group")?;
    let driver = run.expect_marker("driver")?;
    let vfio_dev = run.expect_marker("vfio_dev")?;
    if driver != "vfio-pci" || vfio_dev != format!("/dev/vfio/{group}") {
        return Err(Error::GuestFailed {
            name: run.name.clone(),
            reason: format!("driver {driver}, device {vfio_dev}, group {group}"),
            report: run.report(),
        });
    }
    Ok(())
}

/// Test 3b: loading vduse creates `/dev/vduse/control`.
fn guest_vduse_control() -> TestResult {
    let run = Guest::builder()
        .name("guest_vduse_control")
        .modules(&["vduse"])
        .timeout(Duration::from_secs(50))
        .init_script(
            r#"
vmtest_wait_for 5 test -c /dev/vduse/control || vmtest_fail "no /dev/vduse/control: $(ls /dev)"
vmtest_report vduse_control /dev/vduse/control
vmtest_report modules "$(cut -d' ' -f1 /proc/modules | sort | tr '\n' ' ')"
"#,
        )
        .run()?;
    let ctl = run.expect_marker("vduse_control")?;
    let modules = run.expect_marker("modules")?;
    if ctl != "/dev/vduse/control" || !modules.split_whitespace().any(|m| m == "vdpa") {
        return Err(Error::GuestFailed {
            name: run.name.clone(),
            reason: format!("control {ctl}, modules {modules}"),
            report: run.report(),
        });
    }
    Ok(())
}

/// `-netdev dgram` towards a host-side peer: the guest's frames arrive as UDP
/// datagrams on a loopback socket of the test.
fn guest_netdev_dgram_peer() -> TestResult {
    let peer = UdpSocket::bind("127.0.0.1:0").map_err(|e| Error::Config(format!("bind: {e}")))?;
    peer.set_read_timeout(Some(Duration::from_millis(200)))
        .map_err(|e| Error::Config(format!("socket: {e}")))?;
    let remote = peer
        .local_addr()
        .map_err(|e| Error::Config(format!("socket: {e}")))?;
    let local = {
        let s = UdpSocket::bind("127.0.0.1:0").map_err(|e| Error::Config(format!("bind: {e}")))?;
        s.local_addr()
            .map_err(|e| Error::Config(format!("socket: {e}")))?
    };
    let stop = Arc::new(AtomicBool::new(false));
    let receiver = {
        let stop = Arc::clone(&stop);
        thread::spawn(move || {
            let mut frames = Vec::new();
            let mut buf = [0u8; 2048];
            while !stop.load(Ordering::SeqCst) {
                if let Ok(n) = peer.recv(&mut buf) {
                    frames.push(buf[..n].to_vec());
                }
            }
            frames
        })
    };
    let run = Guest::builder()
        .name("guest_netdev_dgram_peer")
        .netdev_dgram(local, remote, "mac=52:54:00:12:34:03")
        .modules(&["virtio_net"])
        .timeout(Duration::from_secs(50))
        .init_script(
            r#"
set -- $(vmtest_netdevs virtio_net)
[ -n "$1" ] || vmtest_fail "no interface bound to virtio_net"
ip addr add 192.0.2.2/24 dev "$1"
ip link set "$1" up
vmtest_wait_for 10 grep -qx up "/sys/class/net/$1/operstate" || vmtest_fail "link of $1 not up"
arping -c 3 -w 2 -I "$1" 192.0.2.1 >/dev/null 2>&1
vmtest_report sent arp
"#,
        )
        .run();
    stop.store(true, Ordering::SeqCst);
    let frames = receiver.join().unwrap_or_default();
    let run = run?;
    let guest_mac = [0x52, 0x54, 0x00, 0x12, 0x34, 0x03];
    let arp_from_guest = frames
        .iter()
        .filter(|f| f.len() >= 14 && f[6..12] == guest_mac && f[12..14] == [0x08, 0x06])
        .count();
    if arp_from_guest == 0 {
        return Err(Error::GuestFailed {
            name: run.name.clone(),
            reason: format!(
                "the host peer got {} datagrams, none an ARP frame from the guest",
                frames.len()
            ),
            report: run.report(),
        });
    }
    Ok(())
}

/// The harness turns a guest kernel panic into a failure with the console tail.
fn harness_reports_panic() -> TestResult {
    let result = Guest::builder()
        .name("harness_reports_panic")
        .keep_on_failure(false)
        .timeout(Duration::from_secs(50))
        .init_script("echo c > /proc/sysrq-trigger\nsleep 30\n")
        .run();
    expect_failure(result, "kernel panic", "sysrq")
}

/// The harness kills a guest at its timeout and fails with the console tail.
fn harness_reports_timeout() -> TestResult {
    let start = Instant::now();
    let result = Guest::builder()
        .name("harness_reports_timeout")
        .keep_on_failure(false)
        .timeout(Duration::from_secs(12))
        .init_script("vmtest_report sleeping yes\nsleep 600\n")
        .run();
    let elapsed = start.elapsed();
    // Any kernel log line ("[    1.234567] ...") shows the tail is there,
    // even if a loaded machine did not reach /init within the timeout.
    expect_failure(result, "timed out", "[ ")?;
    if elapsed > Duration::from_secs(25) {
        return Err(Error::Config(format!(
            "timeout of 12 s took {elapsed:?} to report"
        )));
    }
    Ok(())
}

fn expect_failure(
    result: Result<vmtest::GuestRun, Error>,
    reason: &str,
    in_tail: &str,
) -> TestResult {
    match result {
        Err(Error::GuestFailed {
            reason: got,
            report,
            ..
        }) if got.starts_with(reason)
            && report.contains("last 40 console lines")
            && report.contains(in_tail) =>
        {
            Ok(())
        }
        Err(e) => Err(Error::Config(format!(
            "expected a `{reason}` failure with `{in_tail}` in the console tail, got: {e}"
        ))),
        Ok(run) => Err(Error::Config(format!(
            "expected a `{reason}` failure, the guest passed:\n{}",
            run.report()
        ))),
    }
}

fn tail(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// Whether the trials can run: ready, skipped (missing prerequisite), or
/// broken (the harness itself failed: the trials fail with that error).
#[derive(Clone)]
enum Gate {
    Ready,
    Skip(String),
    Broken(String),
}

impl Gate {
    fn of(result: Result<(), Error>) -> Gate {
        match result {
            Ok(()) => Gate::Ready,
            Err(e) => match e.skip_reason() {
                Some(reason) => Gate::Skip(reason),
                None => Gate::Broken(e.to_string()),
            },
        }
    }

    fn and(self, other: impl FnOnce() -> Gate) -> Gate {
        match self {
            Gate::Ready => other(),
            g => g,
        }
    }
}

fn trial(name: &'static str, gate: Gate, test: fn() -> TestResult) -> Trial {
    match gate {
        Gate::Ready => Trial::test(name, move || {
            let start = Instant::now();
            let r = test();
            eprintln!(
                "TIME {name}: {:.1} s ({})",
                start.elapsed().as_secs_f64(),
                if r.is_ok() { "ok" } else { "failed" }
            );
            r.map_err(|e| Failed::from(e.to_string()))
        }),
        Gate::Skip(reason) if require_all() => Trial::test(name, move || {
            Err(Failed::from(format!(
                "prerequisite missing and VMTEST_REQUIRE=1: {reason}"
            )))
        }),
        Gate::Skip(reason) => {
            eprintln!("SKIP {name}: {reason}");
            Trial::test(name, move || {
                Err(Failed::from(format!("prerequisite missing: {reason}")))
            })
            .with_ignored_flag(true)
        }
        Gate::Broken(msg) => Trial::test(name, move || Err(Failed::from(msg))),
    }
}

/// `VMTEST_REQUIRE=1` (for CI once the packages are installed): a missing
/// prerequisite fails the test instead of skipping it.
fn require_all() -> bool {
    std::env::var("VMTEST_REQUIRE").is_ok_and(|v| !v.is_empty() && v != "0")
}

fn main() -> ExitCode {
    let args = Arguments::from_args();
    let base = if args.list {
        Gate::Ready
    } else {
        Gate::of(vmtest::artifacts().map(|a| {
            eprintln!(
                "vmtest: {}; guest kernel {} ({} {}); cache {}",
                a.qemu_version,
                a.kernel_release,
                a.kernel_package,
                a.kernel_package_version,
                a.cache_dir.display()
            );
        }))
        .and(|| Gate::of(vmtest::accel().map(|a| eprintln!("vmtest: accelerator {a}"))))
    };
    let testpmd = base.clone().and(|| {
        if args.list {
            Gate::Ready
        } else {
            Gate::of(Testpmd::program().map(drop))
        }
    });
    let trials = vec![
        trial("guest_boot_virtio_net", base.clone(), guest_boot_virtio_net),
        trial("guest_ping_testpmd", testpmd, guest_ping_testpmd),
        trial("guest_vfio_bind", base.clone(), guest_vfio_bind),
        trial("guest_vduse_control", base.clone(), guest_vduse_control),
        trial(
            "guest_netdev_dgram_peer",
            base.clone(),
            guest_netdev_dgram_peer,
        ),
        trial("harness_reports_panic", base.clone(), harness_reports_panic),
        trial("harness_reports_timeout", base, harness_reports_timeout),
    ];
    libtest_mimic::run(&args, trials).exit_code()
}

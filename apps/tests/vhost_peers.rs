//! vdpakit's vhost-user back end against real peers: DPDK's `dpdk-testpmd` with `net_virtio_user`
//! (a front end nobody here wrote) and a QEMU + Linux guest; and vdpakit's `virtio-user` front end
//! against DPDK's `net_vhost` back end and against another vdpakit. Counts must match exactly.
//!
//! Custom harness (libtest-mimic): when a peer cannot run here, the case is reported as ignored
//! with one `SKIP name: reason` line, never as passed.

use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};
use std::time::{Duration, Instant};

use libtest_mimic::{Arguments, Failed, Trial};
use serde_json::Value;
use vmtest::{Guest, HostProcess, TempDir, sh_redirect, wait_for};

fn vdpakit() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_vdpakit"))
}

fn wait_for_socket(path: &Path) -> Result<(), Failed> {
    Ok(wait_for(
        &format!("{} to appear", path.display()),
        Duration::from_secs(10),
        || path.exists(),
    )?)
}

/// Last "RX-packets:"/"TX-packets:" of testpmd's final port statistics.
fn testpmd_counts(log: &str) -> Result<(u64, u64), Failed> {
    // The "Accumulated forward statistics" block printed by `stop`.
    let grab = |key: &str| -> Option<u64> {
        log.lines().rev().find_map(|l| {
            let i = l.find(key)?;
            l[i + key.len()..].split_whitespace().next()?.parse().ok()
        })
    };
    match (grab("RX-packets:"), grab("TX-packets:")) {
        (Some(r), Some(t)) => Ok((r, t)),
        _ => Err(format!("no final statistics in testpmd's log:\n{}", tail(log, 30)).into()),
    }
}

fn tail(s: &str, n: usize) -> String {
    let v: Vec<&str> = s.lines().collect();
    v[v.len().saturating_sub(n)..].join("\n")
}

struct Case {
    name: &'static str,
    /// vdpakit's mode; testpmd runs the opposite (txonly ↔ rxonly).
    vk_mode: &'static str,
    devargs: &'static str,
    queues: u16,
    /// Extra keys of vdpakit's `vhost-user` port (after the path), e.g. `,in_order=batch`.
    vk_keys: &'static str,
}

fn testpmd_cmd(sock: &Path, prefix: &str, devargs: &str, mode: &str, queues: u16) -> Command {
    testpmd_with(
        prefix,
        &format!(
            "net_virtio_user0,path={},queues={queues},{devargs}",
            sock.display()
        ),
        mode,
        queues,
    )
}

/// testpmd as a vhost-user *back end* (`net_vhost`, listening on `sock`), for vdpakit's
/// `virtio-user` port to drive.
fn testpmd_vhost_cmd(sock: &Path, prefix: &str, mode: &str, queues: u16) -> Command {
    testpmd_with(
        prefix,
        &format!("net_vhost0,iface={},queues={queues}", sock.display()),
        mode,
        queues,
    )
}

fn testpmd_with(prefix: &str, vdev: &str, mode: &str, queues: u16) -> Command {
    let mut c = Command::new("dpdk-testpmd");
    c.args([
        "--lcores",
        "0@0,1@0",
        "--no-pci",
        "-m",
        "256",
        "--single-file-segments",
    ])
    .arg(format!("--file-prefix={prefix}"))
    .arg(format!("--vdev={vdev}"))
    // Interactive: the test types start / stop / quit, so forwarding can stop while the port
    // stays up and the peer drains what is in flight (stopping the port ends the rings).
    .args(["--", "-i", "--nb-cores=1", "--no-mlockall", "--no-flush-rx"])
    .arg(format!("--forward-mode={mode}"))
    .arg(format!("--rxq={queues}"))
    .arg(format!("--txq={queues}"));
    c
}

fn run_case(c: &Case) -> Result<(), Failed> {
    let prefix = format!("vk{}", std::process::id());
    let r = run_case_inner(c, &prefix);
    cleanup_dpdk(&prefix);
    r
}

fn run_case_inner(c: &Case, prefix: &str) -> Result<(), Failed> {
    let dir = TempDir::new("vk-peer").map_err(|e| e.to_string())?;
    let sock = dir.join("vhost.sock");
    let json = dir.join("vdpakit.json");
    let q = c.queues.to_string();
    let sock_s = sock.display().to_string();
    let port = format!("vhost-user:path={sock_s}{}", c.vk_keys);
    let vk_tx = c.vk_mode == "txonly";
    let mut vk_cmd = Command::new(vdpakit());
    vk_cmd.args([
        "fwd",
        "--port",
        &port,
        "--mode",
        c.vk_mode,
        "--cores",
        "1",
        "--queues",
        &q,
        "--json",
        "--stats-period",
        "0",
    ]);
    if vk_tx {
        // Wait until testpmd has started its queues (DPDK's driver discards what arrives while it
        // does), transmit for 3 s, then keep the connection up so testpmd drains what is in flight.
        vk_cmd.args(["--start-delay", "2", "--duration", "3", "--linger", "3"]);
    }
    vk_cmd.env(
        "VDPAKIT_LOG",
        std::env::var("VK_PEER_LOG").unwrap_or_else(|_| "warn".into()),
    );
    let mut vk = HostProcess::spawn(
        "vdpakit",
        sh_redirect(vk_cmd, &json),
        &dir.join("vdpakit.log"),
    )
    .map_err(|e| e.to_string())?;
    wait_for_socket(&sock)?;
    let tp_mode = if vk_tx { "rxonly" } else { "txonly" };
    let mut tp = HostProcess::spawn(
        "testpmd",
        testpmd_cmd(&sock, prefix, c.devargs, tp_mode, c.queues),
        &dir.join("testpmd.log"),
    )
    .map_err(|e| e.to_string())?;
    let cmd = |tp: &mut HostProcess, line: &str| {
        tp.write_stdin(format!("{line}\n").as_bytes())
            .map_err(|e| Failed::from(e.to_string()))
    };
    cmd(&mut tp, "start")?;
    if vk_tx {
        // vdpakit waits 2 s, sends for 3 s; testpmd drains, then stops forwarding (its counts).
        std::thread::sleep(Duration::from_millis(6500));
        cmd(&mut tp, "stop")?;
        std::thread::sleep(Duration::from_millis(500));
        cmd(&mut tp, "quit")?;
        tp.wait_exit(Duration::from_secs(20))?;
        vk.wait_exit(Duration::from_secs(20))?;
    } else {
        std::thread::sleep(Duration::from_secs(3));
        cmd(&mut tp, "stop")?;
        // testpmd no longer transmits but its port is up: vdpakit drains the ring.
        std::thread::sleep(Duration::from_millis(1000));
        vk.signal("-INT");
        vk.wait_exit(Duration::from_secs(20))?;
        cmd(&mut tp, "quit")?;
        tp.wait_exit(Duration::from_secs(20))?;
    }
    drop(tp);
    cleanup_dpdk(prefix);
    let tp_log = std::fs::read_to_string(dir.join("testpmd.log")).unwrap_or_default();
    let (tp_rx, tp_tx) = testpmd_counts(&tp_log)?;
    let out = std::fs::read_to_string(&json)
        .map_err(|e| format!("{}: {e}\n{}", json.display(), vk.log_tail(20)))?;
    let v: Value = serde_json::from_str(out.trim())
        .map_err(|e| format!("vdpakit JSON: {e}: {out}\n{}", vk.log_tail(20)))?;
    let p = &v["ports"][0];
    let n = |k: &str| p[k].as_u64().unwrap_or(u64::MAX);
    let (vk_rx, vk_txd, errs) = (
        n("rx_packets"),
        n("tx_packets"),
        n("rx_errors") + n("tx_errors"),
    );
    eprintln!(
        "{}: vdpakit rx {vk_rx} tx {vk_txd} | testpmd rx {tp_rx} tx {tp_tx}",
        c.name
    );
    if errs != 0 {
        return Err(format!("{}: vdpakit counted {errs} errors: {v}", c.name).into());
    }
    let (sent, got, what) = if vk_tx {
        (vk_txd, tp_rx, "vdpakit tx vs testpmd rx")
    } else {
        (tp_tx, vk_rx, "testpmd tx vs vdpakit rx")
    };
    if sent == 0 {
        return Err(format!(
            "{}: no traffic\n{}\n{}",
            c.name,
            tail(&tp_log, 20),
            vk.log_tail(20)
        )
        .into());
    }
    if sent != got {
        let streams: Vec<&str> = tp_log
            .lines()
            .filter(|l| {
                l.contains("Queue=") || l.contains("RX-packets") || l.contains("TX-packets")
            })
            .collect();
        return Err(format!(
            "{}: {what}: {sent} sent, {got} received\nvdpakit queues: {}\ntestpmd:\n{}\nvdpakit log:\n{}",
            c.name,
            p["queues"],
            streams.join("\n"),
            vk.log_tail(40)
        )
        .into());
    }
    every_queue_busy(c.name, c.queues, p, vk_tx)
}

/// Removes what a testpmd with `prefix` leaves behind when it is killed: its runtime directory and
/// its hugepage files (which would otherwise keep hugepages reserved for later tests).
fn cleanup_dpdk(prefix: &str) {
    let _ = std::fs::remove_dir_all(format!("/var/run/dpdk/{prefix}"));
    if let Ok(dir) = std::fs::read_dir("/dev/hugepages") {
        for e in dir.flatten() {
            if e.file_name()
                .to_string_lossy()
                .starts_with(&format!("{prefix}map_"))
            {
                let _ = std::fs::remove_file(e.path());
            }
        }
    }
}

/// Client mode: vdpakit connects to a listening front end (testpmd `server=1`), which is killed
/// and restarted; vdpakit reconnects by itself (1 s retry) and traffic resumes.
fn client_mode_reconnects() -> Result<(), Failed> {
    let dir = TempDir::new("vk-reco").map_err(|e| e.to_string())?;
    let sock = dir.join("vhost.sock");
    let json = dir.join("vdpakit.json");
    let prefix = format!("vkr{}", std::process::id());
    // testpmd listens (server=1) and transmits; vdpakit connects to it.
    let tp_cmd = || testpmd_cmd(&sock, &prefix, "server=1", "txonly", 1);
    let result = (|| -> Result<(), Failed> {
        let mut tp = HostProcess::spawn("testpmd", tp_cmd(), &dir.join("testpmd1.log"))
            .map_err(|e| e.to_string())?;
        wait_for_socket(&sock)?;
        tp.write_stdin(b"start\n").map_err(|e| e.to_string())?;
        let port = format!("vhost-user:path={},client=1", sock.display());
        let mut cmd = Command::new(vdpakit());
        cmd.args([
            "fwd",
            "--port",
            &port,
            "--mode",
            "rxonly",
            "--cores",
            "1",
            "--json",
            "--stats-period",
            "0",
        ]);
        cmd.env("VDPAKIT_LOG", "info");
        let mut vk =
            HostProcess::spawn("vdpakit", sh_redirect(cmd, &json), &dir.join("vdpakit.log"))
                .map_err(|e| e.to_string())?;
        std::thread::sleep(Duration::from_secs(3));
        // The front end goes away without a goodbye, then comes back on the same socket.
        drop(tp);
        cleanup_dpdk(&prefix);
        let _ = std::fs::remove_file(&sock);
        std::thread::sleep(Duration::from_secs(1));
        let mut tp2 = HostProcess::spawn("testpmd", tp_cmd(), &dir.join("testpmd2.log"))
            .map_err(|e| e.to_string())?;
        wait_for_socket(&sock)?;
        tp2.write_stdin(b"start\n").map_err(|e| e.to_string())?;
        std::thread::sleep(Duration::from_secs(4));
        tp2.write_stdin(b"stop\n").map_err(|e| e.to_string())?;
        std::thread::sleep(Duration::from_millis(1000));
        vk.signal("-INT");
        vk.wait_exit(Duration::from_secs(20))?;
        tp2.write_stdin(b"quit\n").map_err(|e| e.to_string())?;
        tp2.wait_exit(Duration::from_secs(20))?;
        let (_, tx2) = testpmd_counts(&tp2.log())?;
        let v: Value = serde_json::from_str(
            std::fs::read_to_string(&json)
                .map_err(|e| e.to_string())?
                .trim(),
        )
        .map_err(|e| format!("{e}\n{}", vk.log_tail(20)))?;
        let rx = v["ports"][0]["rx_packets"].as_u64().unwrap_or(0);
        let log = vk.log();
        let connects = log.matches("front end connected").count();
        eprintln!(
            "client_mode_reconnects: second testpmd sent {tx2}, vdpakit received {rx} in all, {connects} connections"
        );
        if tx2 == 0 {
            return Err(
                format!("the restarted front end sent nothing\n{}", tp2.log_tail(20)).into(),
            );
        }
        if connects < 2 {
            return Err(format!(
                "vdpakit connected {connects} time(s), expected a reconnect\n{}",
                vk.log_tail(20)
            )
            .into());
        }
        // Everything the second front end sent arrived (plus what the first one sent before it died).
        if rx < tx2 {
            return Err(format!(
                "vdpakit received {rx} in all, less than the {tx2} sent after the reconnect"
            )
            .into());
        }
        Ok(())
    })();
    cleanup_dpdk(&prefix);
    result
}

/// vdpakit's `virtio-user` port, in this process, against `dpdk-testpmd --vdev net_vhost0` in
/// `io` mode (what it receives it sends back). The port posts receive buffers of `rx_buf=256`
/// bytes with mergeable rx buffers, so DPDK spreads every frame over up to 7 of them: each
/// echoed frame must come back as one mbuf chain, byte for byte and in order, and testpmd must
/// count exactly what was sent.
fn testpmd_echo_into_small_buffers(packed: bool) -> Result<(), Failed> {
    use vdpakit_core::mem::MemMode;
    use vdpakit_core::port::{Port, PortConf, PortEnv, PortSpec, RingRegistry, VirtioUserPort};
    use vdpakit_core::{Burst, Mempool, MempoolConfig};

    let dir = TempDir::new("vk-echo").map_err(|e| e.to_string())?;
    let sock = dir.join("vhost.sock");
    let prefix = format!("vke{}", std::process::id());
    let result = (|| -> Result<(), Failed> {
        let mut tp = HostProcess::spawn(
            "testpmd",
            testpmd_vhost_cmd(&sock, &prefix, "io", 1),
            &dir.join("testpmd.log"),
        )
        .map_err(|e| e.to_string())?;
        wait_for_socket(&sock)?;
        let pool = Mempool::new(
            "echo",
            MempoolConfig {
                count: 8192,
                cache_size: 64,
                mem: MemMode::Auto,
                ..Default::default()
            },
        )
        .map_err(|e| e.to_string())?;
        let env = PortEnv {
            pool: std::sync::Arc::clone(&pool),
            rings: RingRegistry::new(),
            port_id: 0,
            pkt_size: 64,
            cache_size: 64,
        };
        let spec = format!(
            "virtio-user:path={},packed={},mrg_rxbuf=1,rx_buf=256,queue_size=1024",
            sock.display(),
            packed as u8
        );
        let spec = PortSpec::parse(&spec).map_err(|e| e.to_string())?;
        let mut port = VirtioUserPort::new(&spec, &env).map_err(|e| e.to_string())?;
        port.configure(&PortConf {
            rx_queues: 1,
            tx_queues: 1,
            rx_desc: 1024,
            tx_desc: 1024,
        })
        .map_err(|e| e.to_string())?;
        port.start().map_err(|e| e.to_string())?;
        let end = Instant::now() + Duration::from_secs(10);
        while !port.link().up {
            if Instant::now() > end {
                return Err(
                    format!("no link: {:?}\n{}", port.last_error(), tp.log_tail(20)).into(),
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        tp.write_stdin(b"start\n").map_err(|e| e.to_string())?;
        std::thread::sleep(Duration::from_secs(1));
        let mut qs = port.take_queues().map_err(|e| e.to_string())?;
        let q = &mut qs[0];
        const N: u32 = 20_000;
        // Frame i: 60..=1514 bytes, a counter and a pattern of i (Ethernet addresses included:
        // io mode sends it back untouched).
        let frame = |i: u32| -> Vec<u8> {
            let len = 60 + (i as usize * 37) % 1455;
            let mut v: Vec<u8> = (0..len).map(|k| (k as u32 * 7 + i) as u8).collect();
            v[0] = 0x02; // a locally administered unicast destination
            v[12..16].copy_from_slice(&i.to_le_bytes());
            v
        };
        let (mut next, mut expect, mut chains, mut max_segs) = (0u32, 0u32, 0u64, 0u16);
        let mut out = Burst::new(16);
        let mut got = Burst::new(32);
        let give_up = Instant::now() + Duration::from_secs(60);
        while expect < N {
            if Instant::now() > give_up {
                return Err(format!(
                    "stuck at frame {expect} of {N} (sent {next}): {:?}\n{}",
                    port.stats(),
                    tp.log_tail(20)
                )
                .into());
            }
            // At most 16 frames in flight: the 1024 receive buffers are never all taken.
            while next < N && next - expect < 16 && out.room() > 0 {
                let f = frame(next);
                let Some(mut m) = pool.alloc() else { break };
                if let Some(d) = m.append(f.len()) {
                    d.copy_from_slice(&f);
                }
                let _ = out.push(m);
                next += 1;
            }
            let tx = q.tx.as_mut().ok_or("no tx queue")?;
            tx.tx_burst(&mut out);
            // What did not go out now goes with the next burst (nothing is dropped here).
            let rx = q.rx.as_mut().ok_or("no rx queue")?;
            rx.rx_burst(&mut got);
            let mut bad = None;
            got.drain_front(got.len(), |m| {
                if bad.is_none() && m.to_vec() != frame(expect) {
                    bad = Some(format!(
                        "frame {expect}: {} bytes in {} segments differ from the {} sent",
                        m.pkt_len(),
                        m.nb_segs(),
                        frame(expect).len()
                    ));
                }
                chains += u64::from(m.nb_segs() > 1);
                max_segs = max_segs.max(m.nb_segs());
                expect += 1;
            });
            if let Some(b) = bad {
                return Err(b.into());
            }
        }
        let stats = port.stats();
        drop(qs);
        tp.write_stdin(b"stop\n").map_err(|e| e.to_string())?;
        std::thread::sleep(Duration::from_millis(500));
        port.stop().map_err(|e| e.to_string())?;
        tp.write_stdin(b"quit\n").map_err(|e| e.to_string())?;
        tp.wait_exit(Duration::from_secs(20))?;
        let (tp_rx, tp_tx) = testpmd_counts(&tp.log())?;
        eprintln!(
            "testpmd echo (packed {packed}): {N} frames, {chains} arrived as chains (up to {max_segs} segments); testpmd rx {tp_rx} tx {tp_tx}; vdpakit {stats:?}"
        );
        let bytes: u64 = (0..N).map(|i| 60 + (i as u64 * 37) % 1455).sum();
        if (tp_rx, tp_tx) != (N as u64, N as u64)
            || (stats.rx.packets, stats.rx.bytes) != (N as u64, bytes)
            || (stats.tx.packets, stats.tx.bytes) != (N as u64, bytes)
            || stats.rx.drops + stats.rx.errors + stats.tx.drops + stats.tx.errors != 0
        {
            return Err(format!("counts: testpmd rx {tp_rx} tx {tp_tx}; vdpakit {stats:?}").into());
        }
        if max_segs < 6 {
            return Err(format!("frames were not spread over buffers (at most {max_segs})").into());
        }
        Ok(())
    })();
    cleanup_dpdk(&prefix);
    result
}

/// A Linux guest pings through `vdpakit fwd --mode icmpecho` on a vhost-user port: 5/5 replies.
fn guest_ping_icmpecho() -> Result<(), Failed> {
    guest_ping("guest_ping_icmpecho", false)
}

/// The same behind QEMU's emulated Intel IOMMU with a device IOTLB: the port offers
/// ACCESS_PLATFORM (`iommu=1`), the guest's DMA addresses are IOVAs, and every ring and
/// buffer translation comes from QEMU's IOTLB_MSG updates, answering the back end's misses.
fn guest_ping_viommu() -> Result<(), Failed> {
    guest_ping("guest_ping_viommu", true)
}

fn guest_ping(name: &str, viommu: bool) -> Result<(), Failed> {
    let dir = TempDir::new("vk-ping").map_err(|e| e.to_string())?;
    let sock = dir.join("vhost.sock");
    let json = dir.join("vdpakit.json");
    let log = dir.join("vdpakit.log");
    let port = format!(
        "vhost-user:path={}{}",
        sock.display(),
        if viommu { ",iommu=1" } else { "" }
    );
    let mut cmd = Command::new(vdpakit());
    cmd.args([
        "fwd",
        "--port",
        &port,
        "--mode",
        "icmpecho",
        "--cores",
        "1",
        "--json",
        "--stats-period",
        "0",
    ]);
    if viommu {
        cmd.env("VDPAKIT_LOG", "info");
    }
    let mut vk =
        HostProcess::spawn("vdpakit", sh_redirect(cmd, &json), &log).map_err(|e| e.to_string())?;
    wait_for_socket(&sock)?;
    let mut b = Guest::builder().name(name).shared_memory(true);
    b = if viommu {
        b.intel_iommu_opts("device-iotlb=on").vhost_user_net(
            &sock,
            "mac=52:54:00:12:34:56,disable-legacy=on,iommu_platform=on,ats=on",
        )
    } else {
        b.vhost_user_net(&sock, "mac=52:54:00:12:34:56")
    };
    let run = b
        .modules(&["virtio_net"])
        .timeout(Duration::from_secs(55))
        .init_script(
            r#"
set -- $(vmtest_netdevs virtio_net)
[ -n "$1" ] || vmtest_fail "no virtio_net interface"
ip link set "$1" up
ip addr add 192.0.2.2/24 dev "$1"
out=$(ping -c 5 -W 2 192.0.2.1 2>&1)
echo "$out"
vmtest_report received "$(echo "$out" | sed -n 's/.* \([0-9]*\) packets received.*/\1/p')"
"#,
        )
        .run()
        .map_err(|e| e.to_string())?;
    vk.signal("-INT");
    vk.wait_exit(Duration::from_secs(20))?;
    let received = run.expect_marker("received").map_err(|e| e.to_string())?;
    if received != "5" {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        let tail: Vec<&str> = text.lines().rev().take(30).collect();
        return Err(format!(
            "ping: {received}/5 replies\n{}\n--- QEMU stderr ---\n{}\n--- vdpakit log (last 30 lines) ---\n{}",
            run.console_tail(40),
            run.qemu_stderr,
            tail.into_iter().rev().collect::<Vec<_>>().join("\n")
        )
        .into());
    }
    let v: Value = serde_json::from_str(
        std::fs::read_to_string(&json)
            .map_err(|e| e.to_string())?
            .trim(),
    )
    .map_err(|e| e.to_string())?;
    let p = &v["ports"][0];
    // At least the ARP request and the five echo requests came in; five replies (plus the ARP
    // reply) went out.
    if p["tx_packets"].as_u64().unwrap_or(0) < 6 || p["rx_packets"].as_u64().unwrap_or(0) < 6 {
        return Err(format!("vdpakit counts: {p}").into());
    }
    if viommu {
        // The translations really came through the IOTLB: ACCESS_PLATFORM was negotiated and
        // misses were answered.
        let text = std::fs::read_to_string(&log).map_err(|e| e.to_string())?;
        let misses = text
            .lines()
            .filter_map(|l| l.split("IOTLB misses sent: ").nth(1))
            .filter_map(|t| t.split_whitespace().next()?.parse::<u64>().ok())
            .max();
        eprintln!("{name}: IOTLB misses sent {misses:?}");
        if !text.contains("ACCESS_PLATFORM negotiated") || misses.unwrap_or(0) == 0 {
            return Err(format!("no IOTLB traffic in the vdpakit log:\n{text}").into());
        }
        // Every miss named an address the guest had mapped at the time: a stale one (a buffer
        // used and unmapped since) makes QEMU's IOMMU report a translation failure.
        if run.qemu_stderr.contains("translation failure") {
            return Err(format!("a miss for an unmapped IOVA:\n{}", run.qemu_stderr).into());
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// vdpakit as the vhost-user front end (`virtio-user` port)
// ---------------------------------------------------------------------------------------------

/// A `vdpakit fwd` on one port; its JSON goes to `json`, its stderr to `<name>.log` in `dir`.
fn vk_fwd(
    dir: &Path,
    name: &str,
    port: &str,
    mode: &str,
    core: &str,
    extra: &[&str],
    json: &Path,
) -> Result<HostProcess, Failed> {
    let mut cmd = Command::new(vdpakit());
    cmd.args([
        "fwd",
        "--port",
        port,
        "--mode",
        mode,
        "--cores",
        core,
        "--json",
        "--stats-period",
        "0",
    ])
    .args(extra);
    cmd.env(
        "VDPAKIT_LOG",
        std::env::var("VK_PEER_LOG").unwrap_or_else(|_| "info".into()),
    );
    HostProcess::spawn(
        name,
        sh_redirect(cmd, json),
        &dir.join(format!("{name}.log")),
    )
    .map_err(|e| Failed::from(e.to_string()))
}

/// Port 0 of a vdpakit JSON report.
fn vk_port(json: &Path, vk: &HostProcess) -> Result<Value, Failed> {
    let out = std::fs::read_to_string(json)
        .map_err(|e| format!("{}: {e}\n{}", json.display(), vk.log_tail(20)))?;
    let v: Value = serde_json::from_str(out.trim())
        .map_err(|e| format!("vdpakit JSON: {e}: {out}\n{}", vk.log_tail(20)))?;
    let p = v["ports"][0].clone();
    let errs = p["rx_errors"].as_u64().unwrap_or(1) + p["tx_errors"].as_u64().unwrap_or(1);
    if errs != 0 {
        return Err(format!("vdpakit counted {errs} errors: {p}\n{}", vk.log_tail(20)).into());
    }
    Ok(p)
}

fn count(p: &Value, key: &str) -> u64 {
    p[key].as_u64().unwrap_or(u64::MAX)
}

struct VuCase {
    name: &'static str,
    /// vdpakit's mode; testpmd runs the opposite.
    vk_mode: &'static str,
    /// virtio-user keys after the path.
    keys: &'static str,
    queues: u16,
    /// The back end must have returned chains in in-order batches (vdpakit's log says how
    /// many chains they completed).
    batches: bool,
}

const VU_CASES: &[VuCase] = &[
    VuCase {
        name: "vu_split_inorder_testpmd_to_vdpakit",
        vk_mode: "rxonly",
        keys: "packed=0,in_order=1",
        queues: 1,
        batches: false,
    },
    VuCase {
        name: "vu_split_inorder_vdpakit_to_testpmd",
        vk_mode: "txonly",
        keys: "packed=0,in_order=1",
        queues: 1,
        batches: false,
    },
    VuCase {
        name: "vu_packed_inorder_testpmd_to_vdpakit",
        vk_mode: "rxonly",
        keys: "packed=1,in_order=1",
        queues: 1,
        batches: false,
    },
    // DPDK's net_vhost returns the chains it reads (what vdpakit transmits) in in-order batches
    // on packed rings: one used descriptor per run.
    VuCase {
        name: "vu_packed_inorder_vdpakit_to_testpmd",
        vk_mode: "txonly",
        keys: "packed=1,in_order=1",
        queues: 1,
        batches: true,
    },
    VuCase {
        name: "vu_split_testpmd_to_vdpakit",
        vk_mode: "rxonly",
        keys: "packed=0",
        queues: 1,
        batches: false,
    },
    VuCase {
        name: "vu_split_nomrg_vdpakit_to_testpmd",
        vk_mode: "txonly",
        keys: "packed=0,mrg_rxbuf=0",
        queues: 1,
        batches: false,
    },
    VuCase {
        name: "vu_packed_testpmd_to_vdpakit",
        vk_mode: "rxonly",
        keys: "packed=1,mrg_rxbuf=1",
        queues: 1,
        batches: false,
    },
    VuCase {
        name: "vu_packed_vdpakit_to_testpmd",
        vk_mode: "txonly",
        keys: "packed=1",
        queues: 1,
        batches: false,
    },
    VuCase {
        name: "vu_split_2q_testpmd_to_vdpakit",
        vk_mode: "rxonly",
        keys: "packed=0",
        queues: 2,
        batches: false,
    },
    VuCase {
        name: "vu_packed_2q_vdpakit_to_testpmd",
        vk_mode: "txonly",
        keys: "packed=1",
        queues: 2,
        batches: false,
    },
];

/// `vdpakit fwd --port virtio-user:...` against `dpdk-testpmd --vdev net_vhost0,...` (DPDK's
/// back end, listening): exact counts on both sides.
fn run_vu_case(c: &VuCase) -> Result<(), Failed> {
    let prefix = format!("vku{}", std::process::id());
    let r = run_vu_case_inner(c, &prefix);
    cleanup_dpdk(&prefix);
    r
}

fn run_vu_case_inner(c: &VuCase, prefix: &str) -> Result<(), Failed> {
    let dir = TempDir::new("vk-vu").map_err(|e| e.to_string())?;
    let sock = dir.join("vhost.sock");
    let json = dir.join("vdpakit.json");
    let vk_tx = c.vk_mode == "txonly";
    let tp_mode = if vk_tx { "rxonly" } else { "txonly" };
    let mut tp = HostProcess::spawn(
        "testpmd",
        testpmd_vhost_cmd(&sock, prefix, tp_mode, c.queues),
        &dir.join("testpmd.log"),
    )
    .map_err(|e| e.to_string())?;
    wait_for_socket(&sock)?;
    let port = format!("virtio-user:path={},{}", sock.display(), c.keys);
    let q = c.queues.to_string();
    let mut extra = vec!["--queues", &q];
    if vk_tx {
        extra.extend(["--start-delay", "2", "--duration", "3", "--linger", "3"]);
    }
    let mut vk = vk_fwd(dir.path(), "vdpakit", &port, c.vk_mode, "1", &extra, &json)?;
    let cmd = |tp: &mut HostProcess, line: &str| {
        tp.write_stdin(format!("{line}\n").as_bytes())
            .map_err(|e| Failed::from(e.to_string()))
    };
    if vk_tx {
        cmd(&mut tp, "start")?;
        std::thread::sleep(Duration::from_millis(6500));
        cmd(&mut tp, "stop")?;
        std::thread::sleep(Duration::from_millis(500));
        vk.wait_exit(Duration::from_secs(20))?;
        cmd(&mut tp, "quit")?;
        tp.wait_exit(Duration::from_secs(20))?;
    } else {
        // Let vdpakit connect and set the rings up before testpmd transmits.
        std::thread::sleep(Duration::from_millis(1500));
        cmd(&mut tp, "start")?;
        std::thread::sleep(Duration::from_secs(3));
        cmd(&mut tp, "stop")?;
        // testpmd no longer transmits but its port is up: vdpakit drains its ring.
        std::thread::sleep(Duration::from_millis(1000));
        vk.signal("-INT");
        vk.wait_exit(Duration::from_secs(20))?;
        cmd(&mut tp, "quit")?;
        tp.wait_exit(Duration::from_secs(20))?;
    }
    let tp_log = tp.log();
    drop(tp);
    let (tp_rx, tp_tx) = testpmd_counts(&tp_log)?;
    let p = vk_port(&json, &vk)?;
    let (vk_rx, vk_txd) = (count(&p, "rx_packets"), count(&p, "tx_packets"));
    eprintln!(
        "{}: vdpakit rx {vk_rx} tx {vk_txd} | testpmd rx {tp_rx} tx {tp_tx}",
        c.name
    );
    let (sent, got, what) = if vk_tx {
        (vk_txd, tp_rx, "vdpakit tx vs testpmd rx")
    } else {
        (tp_tx, vk_rx, "testpmd tx vs vdpakit rx")
    };
    if sent == 0 || sent != got {
        return Err(format!(
            "{}: {what}: {sent} sent, {got} received\nvdpakit: {p}\ntestpmd:\n{}\nvdpakit log:\n{}",
            c.name,
            tail(&tp_log, 25),
            vk.log_tail(30)
        )
        .into());
    }
    check_in_order(c.name, c.keys.contains("in_order=1"), c.batches, &vk.log())?;
    every_queue_busy(c.name, c.queues, &p, vk_tx)
}

/// Two vdpakit processes: one `vhost-user` back end, one `virtio-user` front end, on separate
/// CPUs. The transmitting one runs for 3 s and lingers; the receiver must count exactly what the
/// transmitter counted as sent.
fn vdpakit_pair(front_tx: bool, packed: bool) -> Result<(), Failed> {
    vdpakit_pair_with(front_tx, packed, false)
}

/// [`vdpakit_pair`]; with `batch`, the back end returns completely used chains in in-order
/// batches (`in_order=batch`) and the front end requires IN_ORDER.
fn vdpakit_pair_with(front_tx: bool, packed: bool, batch: bool) -> Result<(), Failed> {
    let dir = TempDir::new("vk-pair").map_err(|e| e.to_string())?;
    let sock = dir.join("vhost.sock");
    let (be_json, fe_json) = (dir.join("be.json"), dir.join("fe.json"));
    let timed = ["--start-delay", "2", "--duration", "3", "--linger", "2"];
    let (be_mode, fe_mode) = if front_tx {
        ("rxonly", "txonly")
    } else {
        ("txonly", "rxonly")
    };
    let be_port = format!(
        "vhost-user:path={}{}",
        sock.display(),
        if batch { ",in_order=batch" } else { "" }
    );
    let be_extra: &[&str] = if front_tx { &[] } else { &timed };
    let mut be = vk_fwd(
        dir.path(),
        "back",
        &be_port,
        be_mode,
        "0",
        be_extra,
        &be_json,
    )?;
    wait_for_socket(&sock)?;
    let fe_port = format!(
        "virtio-user:path={},packed={}{}",
        sock.display(),
        packed as u8,
        if batch { ",in_order=1" } else { "" }
    );
    let fe_extra: &[&str] = if front_tx { &timed } else { &[] };
    let mut fe = vk_fwd(
        dir.path(),
        "front",
        &fe_port,
        fe_mode,
        "1",
        fe_extra,
        &fe_json,
    )?;
    let (tx, rx) = if front_tx {
        (&mut fe, &mut be)
    } else {
        (&mut be, &mut fe)
    };
    tx.wait_exit(Duration::from_secs(30))?;
    std::thread::sleep(Duration::from_millis(300));
    rx.signal("-INT");
    rx.wait_exit(Duration::from_secs(20))?;
    let (bp, fp) = (vk_port(&be_json, &be)?, vk_port(&fe_json, &fe)?);
    let (sent, got) = if front_tx {
        (count(&fp, "tx_packets"), count(&bp, "rx_packets"))
    } else {
        (count(&bp, "tx_packets"), count(&fp, "rx_packets"))
    };
    eprintln!(
        "vdpakit pair (front tx {front_tx}, packed {packed}, batch {batch}): sent {sent}, received {got}"
    );
    if sent == 0 || sent != got {
        return Err(format!(
            "sent {sent}, received {got}\nback end: {bp}\nfront end: {fp}\nfront log:\n{}\nback log:\n{}",
            fe.log_tail(20),
            be.log_tail(20)
        )
        .into());
    }
    // The front end's transmitted chains are read-only, so the back end batches all of them.
    check_in_order("vdpakit pair", batch, batch && front_tx, &fe.log())
}

/// Two vdpakit processes, the back end transmitting 1500-byte stamped frames (`--latency`) into
/// a front end whose receive buffers hold 512 bytes (`rx_buf=512`, mergeable rx buffers): every
/// frame arrives spread over 3 buffers, as one mbuf chain. Exact packet and byte counts, every
/// packet's stamp read from its chain, sizes seen 1500..=1500, and the latency accounting
/// across the two processes exact ([`check_cross_latency`]).
fn vdpakit_pair_chains(packed: bool) -> Result<(), Failed> {
    let dir = TempDir::new("vk-chains").map_err(|e| e.to_string())?;
    let sock = dir.join("vhost.sock");
    let (be_json, fe_json) = (dir.join("be.json"), dir.join("fe.json"));
    let be_port = format!("vhost-user:path={}", sock.display());
    let mut be = vk_fwd(
        dir.path(),
        "back",
        &be_port,
        "txonly",
        "0",
        &[
            "--pkt-size",
            "1500",
            "--latency",
            "--start-delay",
            "2",
            "--duration",
            "3",
            "--linger",
            "2",
        ],
        &be_json,
    )?;
    wait_for_socket(&sock)?;
    let fe_port = format!(
        "virtio-user:path={},packed={},mrg_rxbuf=1,rx_buf=512",
        sock.display(),
        packed as u8
    );
    let mut fe = vk_fwd(
        dir.path(),
        "front",
        &fe_port,
        "rxonly",
        "1",
        &["--latency"],
        &fe_json,
    )?;
    be.wait_exit(Duration::from_secs(30))?;
    std::thread::sleep(Duration::from_millis(300));
    fe.signal("-INT");
    fe.wait_exit(Duration::from_secs(20))?;
    let (bp, fp) = (vk_port(&be_json, &be)?, vk_port(&fe_json, &fe)?);
    let (sent, got) = (count(&bp, "tx_packets"), count(&fp, "rx_packets"));
    let (sent_b, got_b) = (count(&bp, "tx_bytes"), count(&fp, "rx_bytes"));
    let l = &fp["latency"];
    let n = |k: &str| l[k].as_u64().unwrap_or(u64::MAX);
    eprintln!(
        "vdpakit pair chains (packed {packed}): sent {sent} ({sent_b} B), received {got} ({got_b} B), stamped {}, lost {}, sizes {}..{}",
        n("packets"),
        n("lost"),
        n("min_size"),
        n("max_size")
    );
    // Every received packet is a stamped frame or one of the back end's end markers.
    let markers = bp["latency_tx"]["end_markers"].as_u64().unwrap_or(0)
        - bp["latency_tx"]["end_markers_dropped"]
            .as_u64()
            .unwrap_or(0);
    if sent == 0
        || (sent, sent_b) != (got, got_b)
        || got_b != 1500 * got
        || n("packets") + markers != got
        || (n("min_size"), n("max_size")) != (1500, 1500)
        || count(&fp, "rx_dropped") != 0
    {
        return Err(format!(
            "back end: {bp}\nfront end: {fp}\nfront log:\n{}",
            fe.log_tail(20)
        )
        .into());
    }
    check_cross_latency(&bp, &fp)?;
    Ok(())
}

/// `--latency` across two processes, from the sender's port report `tx` and the receiver's
/// `rx`: the receiver got the sender's end marker (one stream), counted as `lost` exactly the
/// packets the sender dropped (the end markers it dropped aside: they are no data), including
/// those stamped after the last one that arrived, and stamped + lost is what the sender
/// stamped. Returns the tail (`lost_tail`).
fn check_cross_latency(tx: &Value, rx: &Value) -> Result<u64, Failed> {
    let n = |v: &Value, k: &str| v[k].as_u64().unwrap_or(u64::MAX);
    let (lt, lr) = (&tx["latency_tx"], &rx["latency"]);
    let dropped = n(tx, "tx_dropped") - n(lt, "end_markers_dropped");
    eprintln!(
        "latency across processes: sender stamped {}, dropped {dropped}, end markers {} ({} dropped) | receiver stamped {}, lost {} (tail {}), ended streams {}",
        n(lt, "stamped"),
        n(lt, "end_markers"),
        n(lt, "end_markers_dropped"),
        n(lr, "packets"),
        n(lr, "lost"),
        n(lr, "lost_tail"),
        n(lr, "ended_streams"),
    );
    if n(lr, "ended_streams") != 1
        || n(lr, "lost") != dropped
        || n(lr, "packets") + n(lr, "lost") != n(lt, "stamped")
        || n(lr, "reordered") != 0
    {
        return Err(format!("latency accounting:\nsender: {tx}\nreceiver: {rx}").into());
    }
    Ok(n(lr, "lost_tail"))
}

/// `--latency` across two processes with a tail that only the end marker reveals: the receiver
/// (a `vhost-user` back end) starts polling only after the sender (a `virtio-user` front end)
/// has stopped generating, so everything after the first ring-full of packets was dropped by
/// the sender; the end markers get through once the receiver drains the ring. `lost` must
/// include that tail exactly.
fn vdpakit_pair_latency_tail(packed: bool) -> Result<(), Failed> {
    let dir = TempDir::new("vk-tail").map_err(|e| e.to_string())?;
    let sock = dir.join("vhost.sock");
    let (be_json, fe_json) = (dir.join("be.json"), dir.join("fe.json"));
    let be_port = format!("vhost-user:path={}", sock.display());
    // Receiver: polls from 4 s after its port is up. Sender: generates from 1 s to 3.5 s after
    // its port is up (tens of ms later), then keeps offering end markers for up to 0.9 s: the
    // receiver starts in that window with about 0.4 s to spare either side.
    let mut be = vk_fwd(
        dir.path(),
        "back",
        &be_port,
        "rxonly",
        "0",
        &["--latency", "--start-delay", "4"],
        &be_json,
    )?;
    wait_for_socket(&sock)?;
    let fe_port = format!(
        "virtio-user:path={},packed={}",
        sock.display(),
        packed as u8
    );
    let mut fe = vk_fwd(
        dir.path(),
        "front",
        &fe_port,
        "txonly",
        "1",
        &[
            "--latency",
            "--rate",
            "0.5",
            "--start-delay",
            "1",
            "--duration",
            "2.5",
            "--linger",
            "2",
        ],
        &fe_json,
    )?;
    fe.wait_exit(Duration::from_secs(30))?;
    std::thread::sleep(Duration::from_millis(300));
    be.signal("-INT");
    be.wait_exit(Duration::from_secs(20))?;
    let (bp, fp) = (vk_port(&be_json, &be)?, vk_port(&fe_json, &fe)?);
    if count(&fp, "tx_packets") != count(&bp, "rx_packets") {
        return Err(format!("front end: {fp}\nback end: {bp}").into());
    }
    let tail = check_cross_latency(&fp, &bp)?;
    if tail == 0 || tail != bp["latency"]["lost"].as_u64().unwrap_or(0) {
        return Err(format!(
            "expected every loss in the tail (the receiver started late): {tail}\nfront end: {fp}\nback end: {bp}"
        )
        .into());
    }
    Ok(())
}

/// `--latency` across two processes with a port that drops on purpose: a `virtio-user` front
/// end transmitting with `drop_every=7` to a `vhost-user` back end: the back end's `lost` is
/// exactly what the front end dropped (on purpose or with the ring full). `ctrl_c`: the front
/// end runs without `--duration` and is stopped by SIGINT (as a user's Ctrl-C), which must end
/// generation the same way: end markers out, so the back end also counts the tail.
fn vdpakit_pair_latency_drops(packed: bool, ctrl_c: bool) -> Result<(), Failed> {
    let dir = TempDir::new("vk-lat").map_err(|e| e.to_string())?;
    let sock = dir.join("vhost.sock");
    let (be_json, fe_json) = (dir.join("be.json"), dir.join("fe.json"));
    let be_port = format!("vhost-user:path={}", sock.display());
    let mut be = vk_fwd(
        dir.path(),
        "back",
        &be_port,
        "rxonly",
        "0",
        &["--latency"],
        &be_json,
    )?;
    wait_for_socket(&sock)?;
    let fe_port = format!(
        "virtio-user:path={},packed={},drop_every=7",
        sock.display(),
        packed as u8
    );
    let mut fe = vk_fwd(
        dir.path(),
        "front",
        &fe_port,
        "txonly",
        "1",
        &[
            "--latency",
            "--start-delay",
            "1",
            "--duration",
            if ctrl_c { "600" } else { "3" },
            "--linger",
            "2",
        ],
        &fe_json,
    )?;
    if ctrl_c {
        std::thread::sleep(Duration::from_secs(4));
        fe.signal("-INT");
    }
    fe.wait_exit(Duration::from_secs(30))?;
    std::thread::sleep(Duration::from_millis(300));
    be.signal("-INT");
    be.wait_exit(Duration::from_secs(20))?;
    let (bp, fp) = (vk_port(&be_json, &be)?, vk_port(&fe_json, &fe)?);
    if count(&fp, "tx_packets") != count(&bp, "rx_packets")
        || count(&fp, "tx_dropped") < count(&fp, "tx_packets") / 7
    {
        return Err(format!("front end: {fp}\nback end: {bp}").into());
    }
    check_cross_latency(&fp, &bp)?;
    Ok(())
}

/// The front end's answers to back ends it cannot use, each a log line said once however often
/// it retries: no socket (one "no back end" status line, every packet offered meanwhile counted
/// as dropped); a back end without MRG_RXBUF and IN_ORDER (one fallback warning each, traffic
/// flows); a split-only back end when `packed=1` was demanded (one error naming the feature and
/// the key, nothing sent).
fn front_end_bad_back_ends() -> Result<(), Failed> {
    let dir = TempDir::new("vk-vubad").map_err(|e| e.to_string())?;
    let once = |log: &str, what: &str, needle: &str| -> Result<(), Failed> {
        let n = log.matches(needle).count();
        if n != 1 {
            return Err(
                format!("{what}: \"{needle}\" logged {n} times, expected once:\n{log}").into(),
            );
        }
        Ok(())
    };
    let no_panic = |log: &str| -> Result<(), Failed> {
        if log.contains("panicked") {
            return Err(format!("a panic:\n{log}").into());
        }
        Ok(())
    };

    // No back end at all, for 4 s (four retries).
    let absent = dir.join("absent.sock");
    let json = dir.join("absent.json");
    let mut fe = vk_fwd(
        dir.path(),
        "absent",
        &format!("virtio-user:path={}", absent.display()),
        "txonly",
        "0",
        &["--duration", "4"],
        &json,
    )?;
    fe.wait_exit(Duration::from_secs(30))?;
    let log = fe.log();
    no_panic(&log)?;
    once(&log, "no socket", "no back end listening")?;
    let p = vk_port(&json, &fe)?;
    let (sent, dropped) = (count(&p, "tx_packets"), count(&p, "tx_dropped"));
    eprintln!("no back end: sent {sent}, dropped {dropped}");
    if sent != 0 || dropped == 0 || dropped == u64::MAX {
        return Err(format!("no back end: sent {sent}, dropped {dropped}\n{log}").into());
    }

    // A back end offering neither MRG_RXBUF nor IN_ORDER (the front end asks for neither).
    let sock = dir.join("plain.sock");
    let bjson = dir.join("plain-be.json");
    let mut be = vk_fwd(
        dir.path(),
        "plain-be",
        &format!("vhost-user:path={},mrg_rxbuf=0,in_order=0", sock.display()),
        "rxonly",
        "1",
        &[],
        &bjson,
    )?;
    wait_for_socket(&sock)?;
    let json = dir.join("plain-fe.json");
    let mut fe = vk_fwd(
        dir.path(),
        "plain-fe",
        &format!("virtio-user:path={}", sock.display()),
        "txonly",
        "0",
        &["--duration", "2"],
        &json,
    )?;
    fe.wait_exit(Duration::from_secs(30))?;
    be.signal("-INT");
    be.wait_exit(Duration::from_secs(20))?;
    let log = fe.log();
    no_panic(&log)?;
    once(
        &log,
        "no MRG_RXBUF",
        "does not offer mergeable rx buffers; running without",
    )?;
    once(
        &log,
        "no IN_ORDER",
        "does not offer VIRTIO_F_IN_ORDER; running without",
    )?;
    let received = count(&vk_port(&bjson, &be)?, "rx_packets");
    if received == 0 || received == u64::MAX {
        return Err(format!("fallback: the back end received {received}\n{log}").into());
    }

    // packed=1 demanded, the back end is split only: refused, named, said once over retries.
    let sock = dir.join("split.sock");
    let bjson = dir.join("split-be.json");
    let mut be = vk_fwd(
        dir.path(),
        "split-be",
        &format!("vhost-user:path={},packed=0", sock.display()),
        "rxonly",
        "1",
        &[],
        &bjson,
    )?;
    wait_for_socket(&sock)?;
    let json = dir.join("split-fe.json");
    let mut fe = vk_fwd(
        dir.path(),
        "split-fe",
        &format!("virtio-user:path={},packed=1", sock.display()),
        "txonly",
        "0",
        &["--duration", "4"],
        &json,
    )?;
    fe.wait_exit(Duration::from_secs(30))?;
    be.signal("-INT");
    be.wait_exit(Duration::from_secs(20))?;
    let log = fe.log();
    no_panic(&log)?;
    let needle = "VIRTIO_F_RING_PACKED";
    once(&log, "packed=1 on a split back end", needle)?;
    let line = log.lines().find(|l| l.contains(needle)).unwrap_or_default();
    if !line.contains("packed=1") {
        return Err(format!("the error does not name the key that asked: {line}").into());
    }
    let sent = count(&vk_port(&json, &fe)?, "tx_packets");
    let received = count(&vk_port(&bjson, &be)?, "rx_packets");
    if sent != 0 || received != 0 {
        return Err(format!("refused back end: sent {sent}, received {received}\n{log}").into());
    }
    Ok(())
}

/// The back end behind a running `virtio-user` front end (transmitting) is stopped and a new
/// one started on the same socket: the front end reconnects by itself, traffic resumes, and what
/// the front end counts as sent equals what the two back ends received (packets offered while
/// no back end was there, or left unconsumed by the departed one, are counted as drops).
/// `testpmd`: the back ends are DPDK's; otherwise vdpakit's. `kill`: the first one is killed
/// (SIGKILL) instead, so only the second one's count is known. Either way the front end must
/// see the departed back end's process exit and use the buffers it had again (none withheld).
fn front_end_survives_back_end_restart(testpmd: bool, kill: bool) -> Result<(), Failed> {
    let dir = TempDir::new("vk-vureco").map_err(|e| e.to_string())?;
    let sock = dir.join("vhost.sock");
    let prefix = format!("vkv{}", std::process::id());
    let fe_json = dir.join("fe.json");
    let result = (|| -> Result<(), Failed> {
        // A back end (rxonly) that can be stopped cleanly and reports what it received.
        struct Back {
            p: HostProcess,
            json: PathBuf,
        }
        let start_back = |n: u32| -> Result<Back, Failed> {
            let json = dir.join(&format!("be{n}.json"));
            let p = if testpmd {
                let mut p = HostProcess::spawn(
                    "testpmd",
                    testpmd_vhost_cmd(&sock, &format!("{prefix}x{n}"), "rxonly", 1),
                    &dir.join(&format!("testpmd{n}.log")),
                )
                .map_err(|e| e.to_string())?;
                p.write_stdin(b"start\n").map_err(|e| e.to_string())?;
                p
            } else {
                let port = format!("vhost-user:path={}", sock.display());
                vk_fwd(
                    dir.path(),
                    &format!("back{n}"),
                    &port,
                    "rxonly",
                    "0",
                    &[],
                    &json,
                )?
            };
            wait_for_socket(&sock)?;
            Ok(Back { p, json })
        };
        let stop_back = |b: &mut Back| -> Result<u64, Failed> {
            if testpmd {
                b.p.write_stdin(b"stop\n").map_err(|e| e.to_string())?;
                std::thread::sleep(Duration::from_millis(300));
                b.p.write_stdin(b"quit\n").map_err(|e| e.to_string())?;
                b.p.wait_exit(Duration::from_secs(20))?;
                Ok(testpmd_counts(&b.p.log())?.0)
            } else {
                b.p.signal("-INT");
                b.p.wait_exit(Duration::from_secs(20))?;
                Ok(count(&vk_port(&b.json, &b.p)?, "rx_packets"))
            }
        };
        let mut b1 = start_back(1)?;
        let fe_port = format!("virtio-user:path={}", sock.display());
        let mut fe = vk_fwd(
            dir.path(),
            "front",
            &fe_port,
            "txonly",
            "1",
            &["--start-delay", "1", "--duration", "10", "--linger", "2"],
            &fe_json,
        )?;
        std::thread::sleep(Duration::from_secs(4));
        let rx1 = if kill {
            b1.p.signal("-KILL");
            b1.p.wait_exit(Duration::from_secs(20))?;
            None
        } else {
            Some(stop_back(&mut b1)?)
        };
        if testpmd {
            cleanup_dpdk(&format!("{prefix}x1"));
        }
        let _ = std::fs::remove_file(&sock);
        std::thread::sleep(Duration::from_secs(1));
        let mut b2 = start_back(2)?;
        fe.wait_exit(Duration::from_secs(30))?;
        let rx2 = stop_back(&mut b2)?;
        let fp = vk_port(&fe_json, &fe)?;
        let (sent, dropped) = (count(&fp, "tx_packets"), count(&fp, "tx_dropped"));
        let log = fe.log();
        let setups = log.matches("back end set up").count();
        eprintln!(
            "front end sent {sent} (dropped {dropped}) over {setups} back ends | received {rx1:?} + {rx2}"
        );
        let released = log.contains("process has exited");
        if !released || log.contains("withheld") || log.contains("stay out of the pool") {
            return Err(format!(
                "the departed back end's buffers were not used again after its process exited:\n{}",
                fe.log_tail(20)
            )
            .into());
        }
        let Some(rx1) = rx1 else {
            // Killed: what it received is unknown; the second one must have carried traffic.
            if setups != 2 || rx2 == 0 || sent <= rx2 {
                return Err(format!(
                    "{setups} set-ups, sent {sent}, second back end received {rx2}\n{}",
                    fe.log_tail(20)
                )
                .into());
            }
            return Ok(());
        };
        if setups != 2 || rx1 == 0 || rx2 == 0 {
            return Err(format!(
                "expected traffic through two back ends, got {setups} set-ups, {rx1} and {rx2} packets\n{}",
                fe.log_tail(20)
            )
            .into());
        }
        if sent != rx1 + rx2 {
            return Err(format!(
                "front end counted {sent} sent, the back ends received {rx1} + {rx2} = {}\n{fp}\n{}",
                rx1 + rx2,
                fe.log_tail(20)
            )
            .into());
        }
        if dropped == 0 {
            return Err(
                format!("nothing counted as dropped while the back end was away: {fp}").into(),
            );
        }
        Ok(())
    })();
    for n in 1..=2 {
        cleanup_dpdk(&format!("{prefix}x{n}"));
    }
    result
}

const CASES: &[Case] = &[
    Case {
        name: "split_mrg_testpmd_to_vdpakit",
        vk_mode: "rxonly",
        devargs: "packed_vq=0,mrg_rxbuf=1,in_order=0",
        queues: 1,
        vk_keys: "",
    },
    Case {
        name: "split_nomrg_vdpakit_to_testpmd",
        vk_mode: "txonly",
        devargs: "packed_vq=0,mrg_rxbuf=0,in_order=0",
        queues: 1,
        vk_keys: "",
    },
    Case {
        name: "split_inorder_vdpakit_to_testpmd",
        vk_mode: "txonly",
        devargs: "packed_vq=0,mrg_rxbuf=1,in_order=1",
        queues: 1,
        vk_keys: "",
    },
    // vdpakit's back end returns DPDK's transmitted chains in in-order batches (one used entry
    // per run), which DPDK's driver must resolve.
    Case {
        name: "split_inorder_batch_testpmd_to_vdpakit",
        vk_mode: "rxonly",
        devargs: "packed_vq=0,mrg_rxbuf=1,in_order=1",
        queues: 1,
        vk_keys: ",in_order=batch",
    },
    Case {
        name: "packed_inorder_batch_testpmd_to_vdpakit",
        vk_mode: "rxonly",
        devargs: "packed_vq=1,mrg_rxbuf=1,in_order=1",
        queues: 1,
        vk_keys: ",in_order=batch",
    },
    Case {
        name: "packed_mrg_testpmd_to_vdpakit",
        vk_mode: "rxonly",
        devargs: "packed_vq=1,mrg_rxbuf=1,in_order=0",
        queues: 1,
        vk_keys: "",
    },
    Case {
        name: "packed_nomrg_vdpakit_to_testpmd",
        vk_mode: "txonly",
        devargs: "packed_vq=1,mrg_rxbuf=0,in_order=1",
        queues: 1,
        vk_keys: "",
    },
    Case {
        name: "split_2q_testpmd_to_vdpakit",
        vk_mode: "rxonly",
        devargs: "packed_vq=0,mrg_rxbuf=1,in_order=0",
        queues: 2,
        vk_keys: "",
    },
    Case {
        name: "split_2q_vdpakit_to_testpmd",
        vk_mode: "txonly",
        devargs: "packed_vq=0,mrg_rxbuf=1,in_order=0",
        queues: 2,
        vk_keys: "",
    },
    Case {
        name: "packed_2q_testpmd_to_vdpakit",
        vk_mode: "rxonly",
        devargs: "packed_vq=1,mrg_rxbuf=1,in_order=0",
        queues: 2,
        vk_keys: "",
    },
    Case {
        name: "packed_2q_vdpakit_to_testpmd",
        vk_mode: "txonly",
        devargs: "packed_vq=1,mrg_rxbuf=1,in_order=0",
        queues: 2,
        vk_keys: "",
    },
];

fn testpmd_skip() -> Option<String> {
    if vmtest::find_program("dpdk-testpmd").is_none() {
        return Some("`dpdk-testpmd` not found; install package dpdk-dev".into());
    }
    let mounted = std::fs::read_to_string("/proc/mounts")
        .is_ok_and(|m| m.lines().any(|l| l.contains(" hugetlbfs ")));
    if !mounted {
        return Some("no hugetlbfs mounted (DPDK's virtio-user needs one): mount -t hugetlbfs nodev /dev/hugepages".into());
    }
    let free: u64 =
        std::fs::read_to_string("/sys/kernel/mm/hugepages/hugepages-2048kB/free_hugepages")
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(0);
    if free < 160 {
        return Some(format!(
            "only {free} free 2 MiB hugepages (testpmd needs 128 + vdpakit's pool): echo 512 > /proc/sys/vm/nr_hugepages"
        ));
    }
    None
}

fn main() -> ExitCode {
    let mut args = Arguments::from_args();
    // Each case uses both CPUs: run them one at a time.
    args.test_threads = Some(1);
    let skip = testpmd_skip();
    let mut trials: Vec<Trial> = CASES
        .iter()
        .map(|c| {
            let t = Trial::test(c.name, move || run_case(c));
            match &skip {
                Some(why) => {
                    println!("SKIP {}: {why}", c.name);
                    t.with_ignored_flag(true)
                }
                None => t,
            }
        })
        .collect();
    let t = Trial::test("client_mode_reconnects", client_mode_reconnects);
    trials.push(match &skip {
        Some(why) => {
            println!("SKIP client_mode_reconnects: {why}");
            t.with_ignored_flag(true)
        }
        None => t,
    });
    for c in VU_CASES {
        let t = Trial::test(c.name, move || run_vu_case(c));
        trials.push(match &skip {
            Some(why) => {
                println!("SKIP {}: {why}", c.name);
                t.with_ignored_flag(true)
            }
            None => t,
        });
    }
    for (name, packed) in [
        ("vu_testpmd_echo_mergeable_chains_split", false),
        ("vu_testpmd_echo_mergeable_chains_packed", true),
    ] {
        let t = Trial::test(name, move || testpmd_echo_into_small_buffers(packed));
        trials.push(match &skip {
            Some(why) => {
                println!("SKIP {name}: {why}");
                t.with_ignored_flag(true)
            }
            None => t,
        });
    }
    for (name, kill) in [
        ("vu_testpmd_back_end_restart", false),
        ("vu_testpmd_back_end_killed", true),
    ] {
        let t = Trial::test(name, move || {
            front_end_survives_back_end_restart(true, kill)
        });
        trials.push(match &skip {
            Some(why) => {
                println!("SKIP {name}: {why}");
                t.with_ignored_flag(true)
            }
            None => t,
        });
    }
    // vdpakit against itself needs neither testpmd nor hugepages (4 KiB pages are used then).
    trials.push(Trial::test("vu_vdpakit_pair_front_to_back_split", || {
        vdpakit_pair(true, false)
    }));
    trials.push(Trial::test("vu_vdpakit_pair_back_to_front_packed", || {
        vdpakit_pair(false, true)
    }));
    for (name, front_tx, packed) in [
        (
            "vu_vdpakit_pair_inorder_batch_front_to_back_split",
            true,
            false,
        ),
        (
            "vu_vdpakit_pair_inorder_batch_front_to_back_packed",
            true,
            true,
        ),
        (
            "vu_vdpakit_pair_inorder_batch_back_to_front_split",
            false,
            false,
        ),
        (
            "vu_vdpakit_pair_inorder_batch_back_to_front_packed",
            false,
            true,
        ),
    ] {
        trials.push(Trial::test(name, move || {
            vdpakit_pair_with(front_tx, packed, true)
        }));
    }
    for (name, packed) in [
        ("vu_vdpakit_pair_mergeable_chains_split", false),
        ("vu_vdpakit_pair_mergeable_chains_packed", true),
    ] {
        trials.push(Trial::test(name, move || vdpakit_pair_chains(packed)));
    }
    for (name, packed, ctrl_c) in [
        ("vu_vdpakit_pair_latency_drops_split", false, false),
        ("vu_vdpakit_pair_latency_drops_packed", true, false),
        ("vu_vdpakit_pair_latency_drops_ctrl_c", false, true),
    ] {
        trials.push(Trial::test(name, move || {
            vdpakit_pair_latency_drops(packed, ctrl_c)
        }));
    }
    for (name, packed) in [
        ("vu_vdpakit_pair_latency_tail_split", false),
        ("vu_vdpakit_pair_latency_tail_packed", true),
    ] {
        trials.push(Trial::test(name, move || vdpakit_pair_latency_tail(packed)));
    }
    trials.push(Trial::test("vu_vdpakit_back_end_restart", || {
        front_end_survives_back_end_restart(false, false)
    }));
    trials.push(Trial::test("vu_vdpakit_back_end_killed", || {
        front_end_survives_back_end_restart(false, true)
    }));
    trials.push(Trial::test(
        "vu_front_end_bad_back_ends",
        front_end_bad_back_ends,
    ));
    // Guest artefacts (kernel, busybox, QEMU): a missing prerequisite skips, a broken harness fails.
    let guest = if args.list {
        Ok(())
    } else {
        vmtest::artifacts()
            .map(drop)
            .and_then(|()| vmtest::accel().map(drop))
    };
    type Case = fn() -> Result<(), Failed>;
    let guest_cases: [(&str, Case); 2] = [
        ("guest_ping_icmpecho", guest_ping_icmpecho),
        ("guest_ping_viommu", guest_ping_viommu),
    ];
    for (name, f) in guest_cases {
        let t = match &guest {
            Ok(()) => Trial::test(name, f),
            Err(e) => match e.skip_reason() {
                Some(why) => {
                    println!("SKIP {name}: {why}");
                    Trial::test(name, || Ok(())).with_ignored_flag(true)
                }
                None => {
                    let msg = e.to_string();
                    Trial::test(name, move || Err(msg.clone().into()))
                }
            },
        };
        trials.push(t);
    }
    libtest_mimic::run(&args, trials).exit_code()
}

/// A `virtio-user` front end's log: IN_ORDER negotiated when `in_order` (it was asked for), and
/// when `batches`, chains completed by in-order batches (the count the port logs when its rings
/// stop).
fn check_in_order(name: &str, in_order: bool, batches: bool, log: &str) -> Result<(), Failed> {
    if in_order && !log.contains("in-order on") {
        return Err(format!("{name}: IN_ORDER was not negotiated:\n{}", tail(log, 20)).into());
    }
    if batches {
        let implied: u64 = log
            .lines()
            .filter_map(|l| {
                let i = l.find(" chains completed by in-order batches")?;
                l[..i].rsplit(' ').next()?.parse().ok()
            })
            .max()
            .unwrap_or(0);
        eprintln!("{name}: {implied} chains completed by in-order batches");
        if implied == 0 {
            return Err(
                format!("{name}: no in-order batch was resolved:\n{}", tail(log, 20)).into(),
            );
        }
    }
    Ok(())
}

/// With several queues, every one of vdpakit's queues (in its `--json` port report `p`) must
/// have carried traffic in the direction vdpakit moved it.
fn every_queue_busy(
    name: &str,
    queues: u16,
    p: &serde_json::Value,
    vk_tx: bool,
) -> Result<(), Failed> {
    if queues > 1 {
        let qs = p["queues"].as_array().cloned().unwrap_or_default();
        let key = if vk_tx { "tx_packets" } else { "rx_packets" };
        if qs.len() != queues as usize || qs.iter().any(|x| x[key].as_u64().unwrap_or(0) == 0) {
            return Err(format!("{name}: expected traffic on all {queues} queues: {qs:?}").into());
        }
    }
    Ok(())
}

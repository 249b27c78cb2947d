//! `vdpakit vdpa` end to end: vhost-user sockets bound to `sim` devices (the framework's
//! reference device model), driven by vdpakit's own `virtio-user` front end and by QEMU + a
//! Linux guest whose traffic leaves through a TAP uplink in a network namespace the test creates.
//!
//! Custom harness (libtest-mimic): a case whose platform cannot run it is reported as ignored
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

/// `vdpakit vdpa` with `devices`, sockets `DIR/vdpa0..`, JSON summary to `DIR/vdpa.json`.
fn start_vdpa(dir: &Path, devices: &[&str]) -> Result<HostProcess, Failed> {
    let mut cmd = Command::new(vdpakit());
    cmd.arg("vdpa");
    for d in devices {
        cmd.args(["--device", d]);
    }
    cmd.arg("--iface")
        .arg(dir.join("vdpa"))
        .arg("--json")
        .env("VDPAKIT_LOG", "info");
    HostProcess::spawn(
        "vdpa",
        sh_redirect(cmd, &dir.join("vdpa.json")),
        &dir.join("vdpa.log"),
    )
    .map_err(|e| Failed::from(e.to_string()))
}

fn stop_vdpa(vdpa: &mut HostProcess, dir: &Path) -> Result<Value, Failed> {
    vdpa.signal("-INT");
    vdpa.wait_exit(Duration::from_secs(20))?;
    let out = std::fs::read_to_string(dir.join("vdpa.json")).map_err(|e| e.to_string())?;
    // The JSON summary is the last line (socket lines and QEMU command lines come first).
    let last = out
        .lines()
        .rev()
        .find(|l| !l.trim().is_empty())
        .unwrap_or("");
    serde_json::from_str(last)
        .map_err(|e| format!("vdpa JSON: {e}: {out}\n{}", vdpa.log_tail(30)).into())
}

fn queue(v: &Value, dev: usize, q: usize) -> &Value {
    &v["devices"][dev]["queues"][q]
}

fn n(v: &Value, key: &str) -> u64 {
    v[key].as_u64().unwrap_or(u64::MAX)
}

/// `vdpakit fwd` on one port; JSON to `json`.
fn vk_fwd(
    dir: &Path,
    name: &str,
    port: &str,
    mode: &str,
    core: &str,
    extra: &[&str],
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
    .args(extra)
    .env("VDPAKIT_LOG", "info");
    HostProcess::spawn(
        name,
        sh_redirect(cmd, &dir.join(format!("{name}.json"))),
        &dir.join(format!("{name}.log")),
    )
    .map_err(|e| Failed::from(e.to_string()))
}

fn fwd_port(dir: &Path, name: &str, p: &HostProcess) -> Result<Value, Failed> {
    let out = std::fs::read_to_string(dir.join(format!("{name}.json")))
        .map_err(|e| format!("{name}: {e}\n{}", p.log_tail(20)))?;
    let v: Value = serde_json::from_str(out.trim())
        .map_err(|e| format!("{name} JSON: {e}: {out}\n{}", p.log_tail(20)))?;
    Ok(v["ports"][0].clone())
}

/// Two `sim` VFs joined by a cable, each bound to a socket; a vdpakit `virtio-user` front end
/// transmits on one, another receives on the other. Every packet sent is received or counted as
/// dropped by the receiving VF (no receive buffer), exactly.
fn cable(packed: bool) -> Result<(), Failed> {
    let dir = TempDir::new("vk-vdpa-cable").map_err(|e| e.to_string())?;
    let mut vdpa = start_vdpa(dir.path(), &["sim:name=c,vfs=2,wire=cable"])?;
    let (s0, s1) = (dir.join("vdpa0"), dir.join("vdpa1"));
    wait_for("sockets", Duration::from_secs(10), || {
        s0.exists() && s1.exists()
    })?;
    let keys = format!("packed={}", packed as u8);
    let mut rx = vk_fwd(
        dir.path(),
        "rx",
        &format!("virtio-user:path={},{keys}", s1.display()),
        "rxonly",
        "1",
        &[],
    )?;
    let mut tx = vk_fwd(
        dir.path(),
        "tx",
        &format!("virtio-user:path={},{keys}", s0.display()),
        "txonly",
        "0",
        &["--start-delay", "2", "--duration", "3", "--linger", "2"],
    )?;
    tx.wait_exit(Duration::from_secs(40))?;
    std::thread::sleep(Duration::from_millis(300));
    rx.signal("-INT");
    rx.wait_exit(Duration::from_secs(20))?;
    let (tp, rp) = (
        fwd_port(dir.path(), "tx", &tx)?,
        fwd_port(dir.path(), "rx", &rx)?,
    );
    let v = stop_vdpa(&mut vdpa, dir.path())?;
    let sent = n(&tp, "tx_packets");
    let got = n(&rp, "rx_packets");
    // VF1's receive queue (0) is where frames without a posted buffer are dropped.
    let dropped = n(queue(&v, 1, 0), "dropped");
    let vf0_tx = n(queue(&v, 0, 1), "packets");
    eprintln!(
        "cable packed={packed}: sent {sent}, VF0 transmitted {vf0_tx}, received {got}, dropped by VF1 {dropped}"
    );
    if sent == 0 || got == 0 || vf0_tx != sent || sent != got + dropped {
        return Err(format!(
            "sent {sent}, VF0 tx {vf0_tx}, received {got}, dropped {dropped}\nvdpa: {v}\ntx: {tp}\nrx: {rp}\nvdpa log:\n{}",
            vdpa.log_tail(30)
        )
        .into());
    }
    for q in [0usize, 1] {
        for d in 0..2 {
            let faults = n(queue(&v, d, q), "iommu_faults");
            if faults != 0 {
                return Err(format!("device {d} queue {q}: {faults} IOMMU faults: {v}").into());
            }
        }
    }
    Ok(())
}

/// Two functions of a virtio-PCI PMD's model (`virtio:model=..`, `ifc:model=..`) joined by a
/// cable, each bound to a socket; a `virtio-user` front end transmits at a rate the receiver
/// keeps up with even on a busy 2-core machine (5 kpps: a 1024-entry ring is 200 ms of slack),
/// another receives. A virtio-PCI function has no counters the driver can read,
/// so the check is end to end: every frame sent arrives, exactly.
fn pmd_cable(spec: &str, packed: bool) -> Result<(), Failed> {
    let dir = TempDir::new("vk-vdpa-pmd").map_err(|e| e.to_string())?;
    let mut vdpa = start_vdpa(dir.path(), &[spec])?;
    let (s0, s1) = (dir.join("vdpa0"), dir.join("vdpa1"));
    wait_for("sockets", Duration::from_secs(10), || {
        s0.exists() && s1.exists()
    })?;
    let keys = format!("packed={}", packed as u8);
    let mut rx = vk_fwd(
        dir.path(),
        "rx",
        &format!("virtio-user:path={},{keys}", s1.display()),
        "rxonly",
        "1",
        &[],
    )?;
    let mut tx = vk_fwd(
        dir.path(),
        "tx",
        &format!("virtio-user:path={},{keys}", s0.display()),
        "txonly",
        "0",
        &[
            "--start-delay",
            "2",
            "--duration",
            "3",
            "--linger",
            "2",
            "--rate",
            "0.005",
        ],
    )?;
    tx.wait_exit(Duration::from_secs(40))?;
    std::thread::sleep(Duration::from_millis(300));
    rx.signal("-INT");
    rx.wait_exit(Duration::from_secs(20))?;
    let (tp, rp) = (
        fwd_port(dir.path(), "tx", &tx)?,
        fwd_port(dir.path(), "rx", &rx)?,
    );
    let v = stop_vdpa(&mut vdpa, dir.path())?;
    let (sent, got) = (n(&tp, "tx_packets"), n(&rp, "rx_packets"));
    let configures = v["devices"][0]["configures"].as_u64().unwrap_or(0);
    eprintln!("{spec} packed={packed}: sent {sent}, received {got}, configures {configures}");
    // About 15,000 packets on a quiet machine (the rate is set); at least 1,000 so that the
    // exact count means something (one run at load 2.5 moved 2,431, all of them delivered).
    if sent < 1_000 || got != sent || configures == 0 {
        return Err(format!(
            "sent {sent}, received {got}, configures {configures}\nvdpa: {v}\ntx: {tp}\nrx: {rp}\nvdpa log:\n{}",
            vdpa.log_tail(30)
        )
        .into());
    }
    Ok(())
}

/// An `mlx5:model` function looped back on itself (its MAC is the generator's destination),
/// bound to a socket; a vdpakit `virtio-user` front end transmits through it. The device's
/// transmit queue completes exactly what the front end sent; the looped frames fill the front
/// end's posted receive buffers (it does not read them in txonly mode). `extra` adds devargs
/// (`event_mode=qp`: the queues notify through the QP/CQ/EQ chain and the event thread, which
/// signals the front end's call eventfds).
fn mlx5_loop(packed: bool, extra: &str) -> Result<(), Failed> {
    let dir = TempDir::new("vk-vdpa-mlx5").map_err(|e| e.to_string())?;
    let mut vdpa = start_vdpa(
        dir.path(),
        &[&format!(
            "mlx5:model,name=m0,queues=1,mac=02:00:00:00:00:00,dma_mem=16,packed={}{extra}",
            packed as u8
        )],
    )?;
    let s0 = dir.join("vdpa0");
    wait_for("socket", Duration::from_secs(10), || s0.exists())?;
    let mut tx = vk_fwd(
        dir.path(),
        "tx",
        &format!("virtio-user:path={},packed={}", s0.display(), packed as u8),
        "txonly",
        "0",
        &[
            "--start-delay",
            "1",
            "--duration",
            "2",
            "--linger",
            "1",
            "--rate",
            "0.1",
        ],
    )?;
    tx.wait_exit(Duration::from_secs(40))?;
    let tp = fwd_port(dir.path(), "tx", &tx)?;
    let v = stop_vdpa(&mut vdpa, dir.path())?;
    let sent = n(&tp, "tx_packets");
    let (dev_tx, dev_rx) = (n(queue(&v, 0, 1), "packets"), n(queue(&v, 0, 0), "packets"));
    let errors = n(queue(&v, 0, 0), "errors") + n(queue(&v, 0, 1), "errors");
    eprintln!(
        "mlx5 loop packed={packed}{extra}: sent {sent}, device transmitted {dev_tx}, delivered {dev_rx}"
    );
    if sent == 0 || dev_tx != sent || dev_rx == 0 || dev_rx > dev_tx || errors != 0 {
        return Err(format!(
            "sent {sent}, device tx {dev_tx}, rx {dev_rx}, errors {errors}\nvdpa: {v}\ntx: {tp}\nvdpa log:\n{}",
            vdpa.log_tail(30)
        )
        .into());
    }
    if extra.contains("event_mode=qp") {
        // The device logs its event thread's counts at each teardown. vdpakit's virtio-user
        // polls and asks for no interrupts: the chains were built and torn down around the
        // traffic, and nothing was signalled (suppression respected) nor went wrong.
        let counts = qp_event_counts(&vdpa.log());
        eprintln!("mlx5 loop QP events (signals, errors) per configuration: {counts:?}");
        let chains = log_has(&vdpa, "event mode Qp: EQ ");
        if chains == 0 || counts.len() != chains || counts.iter().any(|c| *c != (0, 0)) {
            return Err(format!(
                "QP event counts {counts:?}\nvdpa log:\n{}",
                vdpa.log_tail(40)
            )
            .into());
        }
    }
    Ok(())
}

/// Runs `f` inside a fresh network namespace named `ns` (created and deleted here).
struct Netns(String);

impl Netns {
    fn new(name: &str) -> Result<Netns, Failed> {
        let _ = Command::new("ip")
            .args(["netns", "del", name])
            .stderr(std::process::Stdio::null())
            .status();
        let ok = Command::new("ip")
            .args(["netns", "add", name])
            .status()
            .map_err(|e| e.to_string())?
            .success();
        if !ok {
            return Err(format!("ip netns add {name} failed").into());
        }
        Ok(Netns(name.to_string()))
    }

    fn ip(&self, args: &[&str]) -> Result<(), Failed> {
        let out = Command::new("ip")
            .args(["-n", &self.0])
            .args(args)
            .output()
            .map_err(|e| e.to_string())?;
        if !out.status.success() {
            return Err(format!(
                "ip -n {} {}: {}",
                self.0,
                args.join(" "),
                String::from_utf8_lossy(&out.stderr)
            )
            .into());
        }
        Ok(())
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

const PING_SCRIPT: &str = r#"
set -- $(vmtest_netdevs virtio_net)
[ -n "$1" ] || vmtest_fail "no virtio_net interface"
ip link set "$1" up
ip addr add 192.0.2.2/24 dev "$1"
out=$(ping -c 5 -W 2 192.0.2.1 2>&1)
echo "$out"
vmtest_report received "$(echo "$out" | sed -n 's/.* \([0-9]*\) packets received.*/\1/p')"
"#;

/// A device spec whose uplink is the TAP interface named (the guest's MAC is
/// 52:54:00:12:34:56).
type TapDevice = fn(name: &str, tap: &str) -> String;

/// A `sim` VF on the TAP uplink.
fn sim_tap(name: &str, tap: &str) -> String {
    format!("sim:name={name},vfs=1,wire=tap:{tap},mac=52:54:00:12:34:56")
}

/// The `sim` VF that cannot log dirty pages (the binding's software relay migrates it).
fn sim_tap_nolog(name: &str, tap: &str) -> String {
    format!("sim:name={name},vfs=1,wire=tap:{tap},log=0")
}

/// An `mlx5:model` function on the TAP uplink, MSI-X interrupts, hardware dirty logging; its
/// flow table takes the guest's MAC (its own) and multicast.
fn mlx5_tap(name: &str, tap: &str) -> String {
    format!(
        "mlx5:model,name={name},queues=1,mac=52:54:00:12:34:56,dma_mem=16,event_mode=msix,wire=tap:{tap}"
    )
}

/// The same function in the event-queue mode: each receive and transmit notification reaches the
/// guest through the EQ/CQ/QP chain and the driver's event thread.
fn mlx5_tap_qp(name: &str, tap: &str) -> String {
    format!(
        "mlx5:model,name={name},queues=1,mac=52:54:00:12:34:56,dma_mem=16,event_mode=qp,wire=tap:{tap}"
    )
}

/// A device with a TAP uplink moved into a namespace the test created (192.0.2.1 there).
struct TapSetup {
    dir: TempDir,
    vdpa: HostProcess,
    _ns: Netns,
}

fn tap_setup(tag: &str, dev: TapDevice) -> Result<TapSetup, Failed> {
    let id = std::process::id() % 100_000;
    let tap = format!("vkt{tag}{id}");
    let ns = Netns::new(&format!("vkns{tag}{id}"))?;
    let dir = TempDir::new("vk-vdpa-tap").map_err(|e| e.to_string())?;
    let vdpa = start_vdpa(dir.path(), &[&dev("t", &tap)])?;
    let sock = dir.join("vdpa0");
    wait_for("socket", Duration::from_secs(10), || sock.exists())?;
    let moved = Command::new("ip")
        .args(["link", "set", &tap, "netns", &ns.0])
        .status()
        .map_err(|e| e.to_string())?
        .success();
    if !moved {
        return Err(format!("could not move {tap} into {}:\n{}", ns.0, vdpa.log_tail(20)).into());
    }
    ns.ip(&["addr", "add", "192.0.2.1/24", "dev", &tap])?;
    ns.ip(&["link", "set", &tap, "up"])?;
    Ok(TapSetup { dir, vdpa, _ns: ns })
}

/// A Linux guest on a vhost-user socket bound to a device (`dev`: a `sim` VF, an `mlx5` model
/// function in MSI-X or event-queue mode; `tag` keeps TAP and namespace names apart) pings the
/// TAP uplink's address: 5/5 replies, which the guest sees only through receive interrupts. `notifier`: QEMU maps the device's doorbell
/// pages (`page-per-vq=on`; the mlx5 function's one doorbell page for every queue, the guest
/// writing the queue index there), so kicks bypass vdpakit; otherwise the binding relays them.
fn guest_ping(name: &str, tag: &str, notifier: bool, dev: TapDevice) -> Result<(), Failed> {
    let mut t = tap_setup(tag, dev)?;
    let sock = t.dir.join("vdpa0");
    let opts = if notifier {
        "mac=52:54:00:12:34:56,page-per-vq=on"
    } else {
        "mac=52:54:00:12:34:56"
    };
    let run = Guest::builder()
        .name(name)
        .shared_memory(true)
        .vhost_user_net(&sock, opts)
        .modules(&["virtio_net"])
        .timeout(Duration::from_secs(60))
        .init_script(PING_SCRIPT)
        .run()
        .map_err(|e| format!("{e}\nvdpa log:\n{}", t.vdpa.log_tail(30)))?;
    let v = stop_vdpa(&mut t.vdpa, t.dir.path())?;
    let received = run.expect_marker("received").map_err(|e| e.to_string())?;
    if received != "5" {
        return Err(format!(
            "ping: {received}/5 replies\n{}\nvdpa: {v}\nvdpa log:\n{}",
            run.console_tail(30),
            t.vdpa.log_tail(30)
        )
        .into());
    }
    let d = &v["devices"][0];
    // The guest's transmit queue (1): every kick the device saw either came through the relay
    // thread or through the mapped doorbell page.
    let relayed = n(queue(&v, 0, 1), "relayed_kicks");
    let kicks = n(queue(&v, 0, 1), "kicks");
    let notifiers = n(d, "host_notifiers");
    eprintln!("{name}: host notifiers sent {notifiers}, tx kicks {kicks}, relayed {relayed}: {d}");
    if notifier && !(notifiers > 0 && kicks >= relayed + 5) {
        return Err(format!("kicks did not bypass the relay: {d}").into());
    }
    if !notifier && (relayed == 0 || relayed < kicks) {
        return Err(format!("expected every kick relayed: {d}").into());
    }
    if n(queue(&v, 0, 1), "packets") < 6 {
        return Err(format!("the VF transmitted too little: {d}").into());
    }
    Ok(())
}

/// Broadcast ARP requests from the guest, looped back by the device's wire: the guest receives
/// them only if its receive interrupts arrive (virtio-net polls its receive ring from the
/// interrupt's NAPI run).
const ARP_LOOP_SCRIPT: &str = r#"
set -- $(vmtest_netdevs virtio_net)
[ -n "$1" ] || vmtest_fail "no virtio_net interface"
ip link set "$1" up
ip addr add 192.0.2.2/24 dev "$1"
arping -c 5 -w 6 -I "$1" 192.0.2.9 >/dev/null 2>&1
sleep 1
vmtest_report rx "$(cat /sys/class/net/$1/statistics/rx_packets)"
vmtest_report tx "$(cat /sys/class/net/$1/statistics/tx_packets)"
"#;

/// The (signals, errors) of each `QP events:` line an mlx5 device logged at teardown.
fn qp_event_counts(log: &str) -> Vec<(u64, u64)> {
    log.lines()
        .filter_map(|l| l.split_once("QP events: ").map(|(_, r)| r))
        .map(|r| {
            let num = |key: &str| {
                r.split(", ")
                    .find_map(|p| p.strip_suffix(key))
                    .and_then(|x| x.trim().parse::<u64>().ok())
                    .unwrap_or(u64::MAX)
            };
            (num(" signals"), num(" errors"))
        })
        .collect()
}

/// A Linux guest on `mlx5:model,event_mode=MODE` looped back: its broadcast ARP requests
/// return to it, which it sees only through receive interrupts: MSI-X vectors wired to QEMU's
/// call eventfds, or (qp) the QP/CQ/EQ chain and the driver's event thread signalling them.
fn guest_mlx5(mode: &str) -> Result<(), Failed> {
    let dir = TempDir::new("vk-vdpa-mlx5g").map_err(|e| e.to_string())?;
    let mut vdpa = start_vdpa(
        dir.path(),
        &[&format!(
            "mlx5:model,name=mg,queues=1,mac=52:54:00:12:34:57,dma_mem=16,event_mode={mode}"
        )],
    )?;
    let sock = dir.join("vdpa0");
    wait_for("socket", Duration::from_secs(10), || sock.exists())?;
    let run = Guest::builder()
        .name(&format!("guest_vdpa_mlx5_{mode}"))
        .shared_memory(true)
        .vhost_user_net(&sock, "mac=52:54:00:12:34:57")
        .modules(&["virtio_net"])
        .timeout(Duration::from_secs(60))
        .init_script(ARP_LOOP_SCRIPT)
        .run()
        .map_err(|e| format!("{e}\nvdpa log:\n{}", vdpa.log_tail(30)))?;
    let v = stop_vdpa(&mut vdpa, dir.path())?;
    let num = |k: &str| -> Result<u64, Failed> {
        let s = run.expect_marker(k).map_err(|e| e.to_string())?;
        s.trim()
            .parse::<u64>()
            .map_err(|e| format!("{k}={s}: {e}").into())
    };
    let (rx, tx) = (num("rx")?, num("tx")?);
    let counts = qp_event_counts(&vdpa.log());
    eprintln!(
        "guest_vdpa_mlx5_{mode}: guest rx {rx}, tx {tx}; QP events (signals, errors) {counts:?}"
    );
    let signalled: u64 = counts.iter().map(|c| c.0).filter(|&s| s != u64::MAX).sum();
    let chain_ok = if mode == "qp" {
        signalled > 0 && counts.iter().all(|c| c.1 == 0)
    } else {
        counts.is_empty()
    };
    if rx < 5 || tx < 5 || !chain_ok {
        return Err(format!(
            "guest rx {rx}, tx {tx}, QP events {counts:?}\n{}\nvdpa: {v}\nvdpa log:\n{}",
            run.console_tail(30),
            vdpa.log_tail(30)
        )
        .into());
    }
    Ok(())
}

fn log_has(p: &HostProcess, needle: &str) -> usize {
    p.log().matches(needle).count()
}

/// QEMU is killed (SIGKILL) while its guest pings through a `sim` VF: vdpakit closes the device
/// and unmaps guest memory, the socket takes the next QEMU, whose guest then pings 5/5.
fn guest_frontend_loss() -> Result<(), Failed> {
    let mut t = tap_setup("k", sim_tap)?;
    let sock = t.dir.join("vdpa0");
    let tag = format!("vkloss{}", std::process::id());
    let first = {
        let sock = sock.clone();
        let tag = tag.clone();
        std::thread::spawn(move || {
            Guest::builder()
                .name("guest_vdpa_frontend_loss_1")
                .shared_memory(true)
                .vhost_user_net(&sock, "mac=52:54:00:12:34:56")
                .modules(&["virtio_net"])
                .qemu_args(&["-name", &tag])
                .timeout(Duration::from_secs(60))
                .init_script(
                    r#"
set -- $(vmtest_netdevs virtio_net)
ip link set "$1" up
ip addr add 192.0.2.2/24 dev "$1"
ping -c 1000 -i 0.2 192.0.2.1
"#,
                )
                .run_unchecked()
        })
    };
    wait_for(
        "first guest's device configured",
        Duration::from_secs(60),
        || log_has(&t.vdpa, "vDPA device configured") >= 1,
    )?;
    std::thread::sleep(Duration::from_secs(3));
    let _ = Command::new("pkill").args(["-9", "-f", &tag]).status();
    let _ = first.join();
    wait_for(
        "device closed after QEMU died",
        Duration::from_secs(10),
        || log_has(&t.vdpa, "vDPA device closed") >= 1,
    )
    .map_err(|e| format!("{e:?}\n{}", t.vdpa.log_tail(20)))?;
    let run = Guest::builder()
        .name("guest_vdpa_frontend_loss_2")
        .shared_memory(true)
        .vhost_user_net(&sock, "mac=52:54:00:12:34:56")
        .modules(&["virtio_net"])
        .timeout(Duration::from_secs(60))
        .init_script(PING_SCRIPT)
        .run()
        .map_err(|e| format!("{e}\nvdpa log:\n{}", t.vdpa.log_tail(30)))?;
    let v = stop_vdpa(&mut t.vdpa, t.dir.path())?;
    let received = run.expect_marker("received").map_err(|e| e.to_string())?;
    let configures = n(&v["devices"][0], "configures");
    eprintln!("frontend loss: second guest {received}/5, configures {configures}");
    if received != "5" || configures < 2 {
        return Err(format!(
            "second guest: {received}/5 replies, {configures} configures\n{}\nvdpa log:\n{}",
            run.console_tail(20),
            t.vdpa.log_tail(30)
        )
        .into());
    }
    Ok(())
}

fn qmp(path: &Path, cmds: &[&str]) -> Result<String, Failed> {
    use std::io::{BufRead, BufReader, Write};
    let s = std::os::unix::net::UnixStream::connect(path).map_err(|e| e.to_string())?;
    s.set_read_timeout(Some(Duration::from_secs(10)))
        .map_err(|e| e.to_string())?;
    let mut w = s.try_clone().map_err(|e| e.to_string())?;
    let mut r = BufReader::new(s);
    let mut line = String::new();
    r.read_line(&mut line)
        .map_err(|e| format!("QMP greeting: {e}"))?;
    let mut out = String::new();
    for c in std::iter::once("{\"execute\":\"qmp_capabilities\"}").chain(cmds.iter().copied()) {
        w.write_all(c.as_bytes()).map_err(|e| e.to_string())?;
        w.write_all(b"\n").map_err(|e| e.to_string())?;
        loop {
            line.clear();
            if r.read_line(&mut line)
                .map_err(|e| format!("QMP reply to {c}: {e} (so far: {out})"))?
                == 0
            {
                return Ok(out);
            }
            if line.contains("\"return\"") || line.contains("\"error\"") {
                out.push_str(&line);
                break;
            }
        }
    }
    Ok(out)
}

/// A guest migrates between two QEMUs, each on its own socket of one `vdpakit vdpa` (two
/// devices whose TAP uplinks share a bridge in the test's namespace). `hardware`: the devices
/// log dirty pages themselves (mlx5: DIRTY_BITMAP_PARAMS + DUMP_ENABLE on every queue, the used
/// rings marked at switchover), and the test checks the log says so and no software relay ran;
/// otherwise the devices cannot (`sim` with `log=0`) and the binding relays used rings in
/// software while QEMU logs. Ping keeps answering during (at least 76 of 80) and after (5/5).
fn guest_migration(kind: &str, dev: TapDevice, hardware: bool) -> Result<(), Failed> {
    let id = std::process::id() % 100_000;
    let k = &kind[..1];
    let (ta, tb) = (format!("vkm{k}a{id}"), format!("vkm{k}b{id}"));
    let ns = Netns::new(&format!("vknsm{k}{id}"))?;
    let dir = TempDir::new("vk-vdpa-mig").map_err(|e| e.to_string())?;
    let mut vdpa = start_vdpa(dir.path(), &[&dev("src", &ta), &dev("dst", &tb)])?;
    let (s0, s1) = (dir.join("vdpa0"), dir.join("vdpa1"));
    wait_for("sockets", Duration::from_secs(10), || {
        s0.exists() && s1.exists()
    })?;
    for tap in [&ta, &tb] {
        let ok = Command::new("ip")
            .args(["link", "set", tap, "netns", &ns.0])
            .status()
            .map_err(|e| e.to_string())?
            .success();
        if !ok {
            return Err(format!("could not move {tap} into {}", ns.0).into());
        }
    }
    ns.ip(&["link", "add", "br0", "type", "bridge"])?;
    for tap in [&ta, &tb] {
        ns.ip(&["link", "set", tap, "master", "br0"])?;
        ns.ip(&["link", "set", tap, "up"])?;
    }
    ns.ip(&["addr", "add", "192.0.2.1/24", "dev", "br0"])?;
    ns.ip(&["link", "set", "br0", "up"])?;
    let qmp_path = dir.join("qmp.sock");
    let mig = dir.join("mig.sock");
    let script = r#"
set -- $(vmtest_netdevs virtio_net)
ip link set "$1" up
ip addr add 192.0.2.2/24 dev "$1"
out=$(ping -c 80 -i 0.25 -W 1 192.0.2.1 2>&1)
vmtest_report long "$(echo "$out" | sed -n 's/.* \([0-9]*\) packets received.*/\1/p')"
out=$(ping -c 5 -W 2 192.0.2.1 2>&1)
echo "$out"
vmtest_report received "$(echo "$out" | sed -n 's/.* \([0-9]*\) packets received.*/\1/p')"
"#;
    let test_name = if kind == "sim" {
        "guest_vdpa_migration".to_string()
    } else {
        format!("guest_vdpa_{kind}_migration")
    };
    let builder = |sock: &Path| {
        Guest::builder()
            .name(&test_name)
            .shared_memory(true)
            .vhost_user_net(sock, "mac=52:54:00:12:34:56")
            .modules(&["virtio_net"])
            .timeout(Duration::from_secs(120))
            .init_script(script)
    };
    let src = {
        let b = builder(&s0).qemu_args(&[
            "-qmp",
            &format!("unix:{},server=on,wait=off", qmp_path.display()),
        ]);
        std::thread::spawn(move || b.run_unchecked())
    };
    let dst = {
        let b = builder(&s1).qemu_args(&["-incoming", &format!("unix:{}", mig.display())]);
        std::thread::spawn(move || b.run())
    };
    wait_for("source device configured", Duration::from_secs(60), || {
        log_has(&vdpa, "vDPA device configured") >= 1
    })?;
    // Let the guest ping a few seconds on the source, then migrate.
    std::thread::sleep(Duration::from_secs(6));
    wait_for("migration socket", Duration::from_secs(10), || mig.exists())?;
    let r = qmp(
        &qmp_path,
        &[&format!(
            "{{\"execute\":\"migrate\",\"arguments\":{{\"uri\":\"unix:{}\"}}}}",
            mig.display()
        )],
    )
    .map_err(|e| format!("{e:?}\nvdpa log:\n{}", vdpa.log_tail(40)))?;
    if r.contains("\"error\"") {
        return Err(format!("migrate: {r}").into());
    }
    let end = Instant::now() + Duration::from_secs(60);
    loop {
        let st = qmp(&qmp_path, &["{\"execute\":\"query-migrate\"}"])?;
        if st.contains("\"completed\"") {
            break;
        }
        if st.contains("\"failed\"") || Instant::now() > end {
            return Err(format!("migration: {st}\nvdpa log:\n{}", vdpa.log_tail(30)).into());
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    let _ = qmp(&qmp_path, &["{\"execute\":\"quit\"}"]);
    let _ = src.join();
    let run = dst
        .join()
        .map_err(|_| "destination thread panicked")?
        .map_err(|e| format!("destination: {e}\nvdpa log:\n{}", vdpa.log_tail(30)))?;
    let v = stop_vdpa(&mut vdpa, dir.path())?;
    let relayed = log_has(&vdpa, "software relay");
    let logged = log_has(&vdpa, "hardware dirty logging on");
    let received = run.expect_marker("received").map_err(|e| e.to_string())?;
    let long = run.marker("long").unwrap_or("?").to_string();
    eprintln!(
        "{test_name}: {long}/80 during, {received}/5 after; relay used {relayed} times, hardware logging turned on {logged} times; {v}"
    );
    let during_ok = long.parse::<u32>().is_ok_and(|n| n >= 76);
    let mode_ok = if hardware {
        logged > 0 && relayed == 0
    } else {
        relayed > 0 && logged == 0
    };
    if received != "5" || !during_ok || !mode_ok {
        return Err(format!(
            "after migration {received}/5 replies (during: {long}/80), relay used {relayed} times, hardware logging {logged} times (hardware expected: {hardware})\n{}\nvdpa log:\n{}",
            run.console_tail(20),
            vdpa.log_tail(40)
        )
        .into());
    }
    Ok(())
}

fn root_skip() -> Option<String> {
    let uid = Command::new("id")
        .arg("-u")
        .output()
        .ok()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string());
    if uid.as_deref() != Some("0") {
        return Some("needs root (TAP device and network namespace)".into());
    }
    if !Path::new("/dev/net/tun").exists() {
        return Some("/dev/net/tun is missing".into());
    }
    if Command::new("ip").arg("-V").output().is_err() {
        return Some("iproute2 (ip) is not installed".into());
    }
    None
}

type Case = fn() -> Result<(), Failed>;

fn main() -> ExitCode {
    let mut args = Arguments::from_args();
    args.test_threads = Some(1);
    let mut trials = vec![
        Trial::test("vdpa_cable_split", || cable(false)),
        Trial::test("vdpa_cable_packed", || cable(true)),
        Trial::test("vdpa_mlx5_model_loop_split", || mlx5_loop(false, "")),
        Trial::test("vdpa_mlx5_model_loop_packed", || mlx5_loop(true, "")),
        Trial::test("vdpa_mlx5_model_loop_qp", || {
            mlx5_loop(false, ",event_mode=qp")
        }),
        Trial::test("vdpa_virtio_model_cable_split", || {
            pmd_cable("virtio:model=vpc,vfs=2,wire=cable", false)
        }),
        Trial::test("vdpa_virtio_model_cable_packed", || {
            pmd_cable("virtio:model=vpc,vfs=2,wire=cable", true)
        }),
        Trial::test("vdpa_ifc_model_cable_split", || {
            pmd_cable("ifc:model=ifcc,vfs=2,wire=cable", false)
        }),
    ];
    let guest = if args.list {
        Ok(())
    } else {
        vmtest::artifacts()
            .map(drop)
            .and_then(|()| vmtest::accel().map(drop))
    };
    let skip = match (&guest, root_skip()) {
        (_, Some(why)) => Some(Ok(why)),
        (Err(e), None) => Some(e.skip_reason().ok_or_else(|| e.to_string())),
        (Ok(()), None) => None,
    };
    let guest_cases: [(&str, Case); 10] = [
        ("guest_vdpa_ping_relay", || {
            guest_ping("guest_vdpa_ping_relay", "sr", false, sim_tap)
        }),
        ("guest_vdpa_ping_notifier", || {
            guest_ping("guest_vdpa_ping_notifier", "sn", true, sim_tap)
        }),
        ("guest_vdpa_mlx5_ping_relay", || {
            guest_ping("guest_vdpa_mlx5_ping_relay", "mr", false, mlx5_tap)
        }),
        ("guest_vdpa_mlx5_ping_notifier", || {
            guest_ping("guest_vdpa_mlx5_ping_notifier", "mn", true, mlx5_tap)
        }),
        ("guest_vdpa_mlx5_ping_qp", || {
            guest_ping("guest_vdpa_mlx5_ping_qp", "mq", false, mlx5_tap_qp)
        }),
        ("guest_vdpa_frontend_loss", guest_frontend_loss),
        ("guest_vdpa_migration", || {
            guest_migration("sim", sim_tap_nolog, false)
        }),
        ("guest_vdpa_mlx5_migration", || {
            guest_migration("mlx5", mlx5_tap, true)
        }),
        ("guest_vdpa_mlx5_msix", || guest_mlx5("msix")),
        ("guest_vdpa_mlx5_qp", || guest_mlx5("qp")),
    ];
    for (name, f) in guest_cases {
        trials.push(match &skip {
            None => Trial::test(name, f),
            Some(Ok(why)) => {
                println!("SKIP {name}: {why}");
                Trial::test(name, || Ok(())).with_ignored_flag(true)
            }
            Some(Err(msg)) => {
                let msg = msg.clone();
                Trial::test(name, move || Err(msg.clone().into()))
            }
        });
    }
    libtest_mimic::run(&args, trials).exit_code()
}

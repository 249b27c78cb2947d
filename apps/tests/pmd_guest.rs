//! The virtio-PCI PMDs through real VFIO, against QEMU's virtio-net-pci (a device model no one
//! here wrote): a Linux 6.12 guest with intel-iommu binds the functions to vfio-pci and runs
//! `vdpakit fwd` with the `virtio`, `ifc` (`force=1`) and `eni` port kinds on them. Each
//! function's netdev is `-netdev dgram` to a UDP socket of this test on the host's loopback, so
//! every frame the guest's NIC sends arrives here as one datagram and every datagram sent here
//! arrives as one frame.
//!
//! - `guest_pmd_fwd`: modern functions (`disable-legacy=on,iommu_platform=on,page-per-vq=on`)
//!   A (`virtio:`) and B (`ifc:...,force=1`) forwarded to each other in `--mode io`, and a legacy
//!   function C (`disable-modern=on`, `eni:`, IOVA = physical address) forwarded to itself. The
//!   test sends numbered frames into A, B and C and checks that exactly those frames come back
//!   out of B, A and C, byte for byte, and that vdpakit's counters agree. Then `txonly` on A:
//!   every frame vdpakit counts as sent reaches the host.
//!
//! Custom harness (libtest-mimic): when guests cannot run here the case is reported as ignored
//! with one `SKIP name: reason` line, never as passed (`VMTEST_REQUIRE=1` turns that into a
//! failure).

use std::collections::HashMap;
use std::net::{SocketAddr, UdpSocket};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use libtest_mimic::{Arguments, Failed, Trial};
use vmtest::Guest;

fn vdpakit() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_vdpakit"))
}

const MODERN: &str = "disable-legacy=on,iommu_platform=on,page-per-vq=on";
const LEGACY: &str = "disable-legacy=off,disable-modern=on";

/// One guest NIC's host side: the UDP socket its dgram netdev talks to.
struct Peer {
    sock: UdpSocket,
    /// Where the netdev listens (its `local` address): datagrams sent there enter the guest.
    nic: SocketAddr,
    mac: [u8; 6],
}

impl Peer {
    fn new(mac_last: u8) -> Result<Peer, String> {
        let sock = UdpSocket::bind("127.0.0.1:0").map_err(|e| format!("bind: {e}"))?;
        sock.set_read_timeout(Some(Duration::from_millis(20)))
            .map_err(|e| e.to_string())?;
        let nic = UdpSocket::bind("127.0.0.1:0")
            .and_then(|s| s.local_addr())
            .map_err(|e| format!("bind: {e}"))?;
        Ok(Peer {
            sock,
            nic,
            mac: [0x52, 0x54, 0x00, 0x12, 0x34, mac_last],
        })
    }

    fn netdev(&self, id: &str) -> Result<String, String> {
        let me = self.sock.local_addr().map_err(|e| e.to_string())?;
        Ok(format!(
            "dgram,id={id},local.type=inet,local.host=127.0.0.1,local.port={},remote.type=inet,remote.host=127.0.0.1,remote.port={}",
            self.nic.port(),
            me.port()
        ))
    }

    fn mac_str(&self) -> String {
        self.mac
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect::<Vec<_>>()
            .join(":")
    }
}

/// A test frame: broadcast destination, a fixed source, ethertype 0x88b5 (local experimental),
/// then `tag`, the sequence number and a length-dependent pattern.
fn frame(tag: u8, seq: u32) -> Vec<u8> {
    let len = 60 + (seq as usize * 37) % 1000;
    let mut f = vec![0u8; len];
    f[..6].fill(0xff);
    f[6..12].copy_from_slice(&[0x02, 0, 0, 0, 0x7e, tag]);
    f[12..14].copy_from_slice(&[0x88, 0xb5]);
    f[14] = tag;
    f[15..19].copy_from_slice(&seq.to_be_bytes());
    for (i, b) in f.iter_mut().enumerate().skip(19) {
        *b = (i as u32).wrapping_mul(31).wrapping_add(seq) as u8;
    }
    f
}

/// The host side of the io run: probes each input until an echo shows vdpakit forwards, then
/// sends `n` numbered frames into every input and collects what comes out of every output.
struct Traffic {
    /// (input peer index, output peer index, tag).
    routes: Vec<(usize, usize, u8)>,
    n: u32,
}

#[derive(Debug, Default)]
struct RouteResult {
    probes_sent: u32,
    measured_back: u32,
    /// Everything that came out of the output peer, counted (probe and measured frames).
    total_back: u32,
    mismatched: Vec<String>,
}

/// Frames from `mac` (IPv4, as vdpakit's generator builds them) that reached a peer: count and
/// bytes.
#[derive(Debug, Default, Clone, Copy)]
struct Generated {
    frames: u64,
    bytes: u64,
}

fn run_traffic(
    peers: Arc<Vec<Peer>>,
    t: Traffic,
    stop: Arc<AtomicBool>,
) -> (Vec<RouteResult>, Generated) {
    let mut res: Vec<RouteResult> = t.routes.iter().map(|_| RouteResult::default()).collect();
    let mut seen: Vec<HashMap<u32, bool>> = t.routes.iter().map(|_| HashMap::new()).collect();
    let mut sent: Vec<HashMap<u32, Vec<u8>>> = t.routes.iter().map(|_| HashMap::new()).collect();
    let mut ready = vec![false; t.routes.len()];
    let mut next_measured = vec![0u32; t.routes.len()];
    let mut probe_seq = 1_000_000u32;
    let mut last_probe = Instant::now() - Duration::from_secs(1);
    let mut done_at: Option<Instant> = None;
    let mut buf = vec![0u8; 4096];
    while !stop.load(Ordering::SeqCst) {
        // Receive on every output.
        for (ri, &(_, out, tag)) in t.routes.iter().enumerate() {
            while let Ok(n) = peers[out].sock.recv(&mut buf) {
                let f = &buf[..n];
                if n < 19 || f[12..14] != [0x88, 0xb5] || f[14] != tag {
                    continue;
                }
                let seq = u32::from_be_bytes([f[15], f[16], f[17], f[18]]);
                res[ri].total_back += 1;
                ready[ri] = true;
                if seq >= 1_000_000 {
                    continue;
                }
                match sent[ri].get(&seq) {
                    Some(exp) if exp.as_slice() == f => {
                        if seen[ri].insert(seq, true).is_none() {
                            res[ri].measured_back += 1;
                        } else {
                            res[ri]
                                .mismatched
                                .push(format!("seq {seq} came back twice"));
                        }
                    }
                    Some(exp) => res[ri].mismatched.push(format!(
                        "seq {seq}: {} bytes back, {} sent, first difference at {:?}",
                        n,
                        exp.len(),
                        exp.iter().zip(f).position(|(a, b)| a != b)
                    )),
                    None => res[ri].mismatched.push(format!("seq {seq} was never sent")),
                }
            }
        }
        // Probe the routes that have not echoed yet.
        if last_probe.elapsed() > Duration::from_millis(100) {
            last_probe = Instant::now();
            for (ri, &(inp, _, tag)) in t.routes.iter().enumerate() {
                if !ready[ri] {
                    let _ = peers[inp]
                        .sock
                        .send_to(&frame(tag, probe_seq), peers[inp].nic);
                    res[ri].probes_sent += 1;
                }
            }
            probe_seq += 1;
        }
        // Measured frames, paced, once a route echoes.
        for (ri, &(inp, _, tag)) in t.routes.iter().enumerate() {
            if ready[ri] && next_measured[ri] < t.n {
                let seq = next_measured[ri];
                let f = frame(tag, seq);
                sent[ri].insert(seq, f.clone());
                let _ = peers[inp].sock.send_to(&f, peers[inp].nic);
                next_measured[ri] += 1;
            }
        }
        if done_at.is_none() && next_measured.iter().all(|&m| m == t.n) {
            done_at = Some(Instant::now());
        }
        if done_at.is_some_and(|d| d.elapsed() > Duration::from_secs(3)) {
            break;
        }
        thread::sleep(Duration::from_millis(2));
    }
    // Then count what vdpakit's generator sends out of port A (the txonly run).
    let mut gen_a = Generated::default();
    while !stop.load(Ordering::SeqCst) {
        while let Ok(n) = peers[0].sock.recv(&mut buf) {
            let f = &buf[..n];
            if n >= 14 && f[6..12] == peers[0].mac && f[12..14] == [0x08, 0x00] {
                gen_a.frames += 1;
                gen_a.bytes += n as u64;
            }
        }
    }
    (res, gen_a)
}

const FWD_SCRIPT: &str = r#"
find() { # vendor device -> BDFs
    for d in /sys/bus/pci/devices/*; do
        [ "$(cat $d/vendor)" = "$1" ] && [ "$(cat $d/device)" = "$2" ] && echo "${d##*/}"
    done
}
set -- $(find 0x1af4 0x1041)
[ $# = 2 ] || vmtest_fail "expected two modern virtio-net functions, found: $*"
a=$1; b=$2
c=$(find 0x1af4 0x1000)
[ -n "$c" ] || vmtest_fail "no legacy virtio-net function"
# QEMU numbers the devices in -device order; map each to its MAC to know which is which.
for f in $a $b $c; do vmtest_report "mac_$f" "$(cat /sys/bus/pci/devices/$f/virtio*/net/*/address 2>/dev/null)"; done
macof() { cat /sys/bus/pci/devices/$1/virtio*/net/*/address; }
for f in $a $b $c; do
  case "$(macof $f)" in
    *:a1) A=$f ;; *:b2) B=$f ;; *:c3) C=$f ;;
  esac
done
[ -n "$A" ] && [ -n "$B" ] && [ -n "$C" ] || vmtest_fail "could not tell the functions apart by MAC"
vmtest_report bdf_a "$A"; vmtest_report bdf_b "$B"; vmtest_report bdf_c "$C"
echo 64 > /proc/sys/vm/nr_hugepages
for f in $A $B $C; do
  /vdpakit devices bind $f > /tmp/bind.txt 2>&1 || vmtest_fail "bind $f: $(cat /tmp/bind.txt)"
done
/vdpakit ports > /tmp/ports.txt
vmtest_report kinds "$(awk '/^[a-z]/ {print $1}' /tmp/ports.txt | tr '\n' ' ')"
VDPAKIT_LOG=info /vdpakit fwd --port virtio:pci=$A --port ifc:pci=$B,force=1 --port eni:pci=$C \
    --mode io --cores 0 --rxd 256 --txd 256 --mem 2M --duration DURATION --json \
    > /tmp/io.json 2> /tmp/io.err
rc=$?
cat /tmp/io.err
vmtest_report io_rc "$rc"
vmtest_report io_json "$(tr -d '\n' < /tmp/io.json)"
vmtest_report io_err "$(grep -i 'error' /tmp/io.err | head -3 | tr '\n' ' ')"
vmtest_report io_iova "$(grep -o 'iova [a-z]*' /tmp/io.err | tr '\n' ' ')"
VDPAKIT_LOG=info /vdpakit fwd --port virtio:pci=$A --mode txonly --rate 0.0005 --pkt-size 64 \
    --cores 0 --rxd 256 --txd 256 --mem 2M --duration 2 --linger 1 --json > /tmp/tx.json 2> /tmp/tx.err
rc=$?
cat /tmp/tx.err
vmtest_report tx_rc "$rc"
vmtest_report tx_json "$(tr -d '\n' < /tmp/tx.json)"
# The vDPA devices probe on the real functions: the IFC IDs are checked (a plain virtio-net
# function needs force=1), QEMU's common configuration sits where IFC's live-migration region
# would be (a forced function is driven without it), the legacy function is an ENI.
/vdpakit vdpa --device ifc:pci=$A --iface /tmp/vx --duration 1 > /tmp/ifc.out 2>&1
vmtest_report ifc_ids_rc "$?"
vmtest_report ifc_ids_err "$(grep '^error' /tmp/ifc.out)"
VDPAKIT_LOG=info /vdpakit vdpa --device virtio:pci=$A --device ifc:pci=$B,force=1 --device eni:pci=$C \
    --iface /tmp/vp --duration 1 > /tmp/probe.out 2> /tmp/probe.err
vmtest_report probe_rc "$?"
cat /tmp/probe.err
vmtest_report probe_virtio "$(grep -c 'virtio vDPA device' /tmp/probe.err)"
vmtest_report probe_ifc "$(grep -c 'ifc vDPA device' /tmp/probe.err)"
vmtest_report probe_eni "$(grep -c 'eni vDPA device' /tmp/probe.err)"
vmtest_report probe_lm "$(grep -c 'overlaps the IFC live-migration region' /tmp/probe.err)"
"#;

fn json_u64(v: &serde_json::Value, path: &[&str]) -> Option<u64> {
    let mut cur = v;
    for p in path {
        cur = match p.parse::<usize>() {
            Ok(i) => cur.get(i)?,
            Err(_) => cur.get(*p)?,
        };
    }
    cur.as_u64()
}

fn guest_pmd_fwd() -> Result<(), Failed> {
    let peers = Arc::new(vec![Peer::new(0xa1)?, Peer::new(0xb2)?, Peer::new(0xc3)?]);
    let mut qemu: Vec<String> = Vec::new();
    for (i, (p, opts)) in peers.iter().zip([MODERN, MODERN, LEGACY]).enumerate() {
        qemu.push("-device".into());
        qemu.push(format!("pcie-root-port,id=rp{i},chassis={i},slot={i}"));
        qemu.push("-netdev".into());
        qemu.push(p.netdev(&format!("pn{i}"))?);
        qemu.push("-device".into());
        qemu.push(format!(
            "virtio-net-pci,netdev=pn{i},bus=rp{i},romfile=,mac={},{opts}",
            p.mac_str()
        ));
    }
    let duration = 40;
    let stop = Arc::new(AtomicBool::new(false));
    let traffic = {
        let (peers, stop) = (Arc::clone(&peers), Arc::clone(&stop));
        thread::spawn(move || {
            run_traffic(
                peers,
                Traffic {
                    // A -> B, B -> A, C -> C (testpmd pairs 0<->1, an odd last port to itself).
                    routes: vec![(0, 1, 0xaa), (1, 0, 0xbb), (2, 2, 0xcc)],
                    n: 100,
                },
                stop,
            )
        })
    };
    let args: Vec<&str> = qemu.iter().map(String::as_str).collect();
    let script = FWD_SCRIPT.replace("DURATION", &duration.to_string());
    let run = Guest::builder()
        .name("guest_pmd_fwd")
        .memory_mb(768)
        .intel_iommu()
        .qemu_args(&args)
        .modules(&[
            "irqbypass",
            "vfio",
            "vfio_iommu_type1",
            "vfio-pci-core",
            "vfio-pci",
            "virtio_net",
        ])
        .binary(vdpakit(), "/vdpakit")
        .timeout(Duration::from_secs(240))
        .init_script(&script)
        .run_unchecked();
    // The tx run's frames: count what reached A's peer from A's MAC.
    stop.store(true, Ordering::SeqCst);
    let (results, gen_a) = traffic.join().unwrap_or_default();
    let run = run.map_err(|e| e.to_string())?;
    let fail = |why: String| -> Failed { format!("{why}\n{}", run.report()).into() };
    if let Some(f) = run.failure() {
        return Err(fail(format!("guest failed: {f}")));
    }
    let m = |k: &str| run.marker(k).unwrap_or("").to_string();
    if m("io_rc") != "0" {
        return Err(fail(format!(
            "vdpakit fwd io exited {}: {}",
            m("io_rc"),
            m("io_err")
        )));
    }
    let io: serde_json::Value =
        serde_json::from_str(&m("io_json")).map_err(|e| fail(format!("io json: {e}")))?;
    eprintln!("io routes: {results:?}");
    for ((ri, r), name) in results.iter().enumerate().zip(["A->B", "B->A", "C->C"]) {
        if r.measured_back != 100 || !r.mismatched.is_empty() {
            return Err(fail(format!(
                "route {name}: {} of 100 numbered frames came back byte-exact; problems: {:?}",
                r.measured_back,
                &r.mismatched[..r.mismatched.len().min(5)]
            )));
        }
        let _ = ri;
    }
    // vdpakit's own counts: every frame a port received went out of its peer port.
    let rx = |p: usize| json_u64(&io, &["ports", &p.to_string(), "rx_packets"]).unwrap_or(0);
    let tx = |p: usize| json_u64(&io, &["ports", &p.to_string(), "tx_packets"]).unwrap_or(0);
    let checks = [
        (
            rx(0),
            tx(1),
            results[0].total_back,
            "A rx / B tx / host got from B",
        ),
        (
            rx(1),
            tx(0),
            results[1].total_back,
            "B rx / A tx / host got from A",
        ),
        (
            rx(2),
            tx(2),
            results[2].total_back,
            "C rx / C tx / host got from C",
        ),
    ];
    for (r, t, host, what) in checks {
        if r != t || u64::from(host) != t {
            return Err(fail(format!(
                "{what}: {r} / {t} / {host} (must be equal); json {io}"
            )));
        }
    }
    if !m("io_iova").contains("iova pa") {
        return Err(fail(format!(
            "the legacy function should use IOVA = PA: {:?}",
            m("io_iova")
        )));
    }
    if m("ifc_ids_rc") != "2" || !m("ifc_ids_err").contains("force=1") {
        return Err(fail(format!(
            "ifc on a plain virtio-net function: rc {} {:?}",
            m("ifc_ids_rc"),
            m("ifc_ids_err")
        )));
    }
    if m("probe_rc") != "0"
        || [
            m("probe_virtio"),
            m("probe_ifc"),
            m("probe_eni"),
            m("probe_lm"),
        ] != ["1", "1", "1", "1"]
    {
        return Err(fail(format!(
            "vDPA probes: rc {}, virtio {} ifc {} eni {} lm-overlap {}",
            m("probe_rc"),
            m("probe_virtio"),
            m("probe_ifc"),
            m("probe_eni"),
            m("probe_lm")
        )));
    }
    if m("tx_rc") != "0" {
        return Err(fail(format!("vdpakit fwd txonly exited {}", m("tx_rc"))));
    }
    let txj: serde_json::Value =
        serde_json::from_str(&m("tx_json")).map_err(|e| fail(format!("tx json: {e}")))?;
    let sent = json_u64(&txj, &["ports", "0", "tx_packets"]).unwrap_or(0);
    let sent_bytes = json_u64(&txj, &["ports", "0", "tx_bytes"]).unwrap_or(0);
    let dropped = json_u64(&txj, &["ports", "0", "tx_dropped"]).unwrap_or(u64::MAX);
    eprintln!(
        "txonly: vdpakit sent {sent} ({sent_bytes} bytes, {dropped} dropped), host got {gen_a:?}"
    );
    if sent < 200 || dropped != 0 || gen_a.frames != sent || gen_a.bytes != sent_bytes {
        return Err(fail(format!(
            "txonly on A: vdpakit sent {sent} frames / {sent_bytes} bytes ({dropped} dropped), the host got {} / {}",
            gen_a.frames, gen_a.bytes
        )));
    }
    Ok(())
}

const VDPA_SCRIPT: &str = r#"
set --
for d in /sys/bus/pci/devices/*; do
    [ "$(cat $d/vendor)" = 0x1af4 ] && [ "$(cat $d/device)" = 0x1041 ] && set -- "$@" "${d##*/}"
done
[ $# = 2 ] || vmtest_fail "expected two modern virtio-net functions, found: $*"
for f in "$@"; do
  case "$(cat /sys/bus/pci/devices/$f/virtio*/net/*/address)" in
    *:a1) A=$f ;; *:b2) B=$f ;;
  esac
done
[ -n "$A" ] && [ -n "$B" ] || vmtest_fail "could not tell the functions apart by MAC"
echo 64 > /proc/sys/vm/nr_hugepages
for f in $A $B; do
  /vdpakit devices bind $f > /tmp/bind.txt 2>&1 || vmtest_fail "bind $f: $(cat /tmp/bind.txt)"
done
VDPAKIT_LOG=info /vdpakit vdpa --device virtio:pci=$A --device ifc:pci=$B,force=1 --iface /tmp/vd \
    --duration DURATION --json > /tmp/vdpa.json 2> /tmp/vdpa.log &
vdpa=$!
vmtest_wait_for 20 test -S /tmp/vd1 || vmtest_fail "no vDPA sockets: $(cat /tmp/vdpa.log)"
VDPAKIT_LOG=info /vdpakit fwd --port virtio-user:path=/tmp/vd0 --port virtio-user:path=/tmp/vd1 \
    --mode io --cores 0 --rxd 256 --txd 256 --mem 2M --duration FWDDUR --linger 1 --json \
    > /tmp/fwd.json 2> /tmp/fwd.err
vmtest_report fwd_rc "$?"
cat /tmp/fwd.err
wait $vdpa
vmtest_report vdpa_rc "$?"
cat /tmp/vdpa.log
vmtest_report fwd_json "$(tr -d '\n' < /tmp/fwd.json)"
vmtest_report vdpa_json "$(tail -1 /tmp/vdpa.json)"
vmtest_report vdpa_msix "$(grep -o 'MSI-X [a-z-]*' /tmp/vdpa.log | sort -u | tr '\n' ' ')"
"#;

/// The vDPA devices on QEMU's functions through real VFIO: `vdpakit vdpa` binds `virtio:pci=A`
/// and `ifc:pci=B,force=1` to vhost-user sockets, a `vdpakit fwd` with two `virtio-user` front
/// ends forwards between them (`--mode io`). Frames the host sends into A's netdev are written
/// by QEMU's device, through the guest's IOMMU, into the front end's buffers (IOVA = the front
/// end's addresses, hence `aw-bits=48`), forwarded, and transmitted by B, byte-exact; and the
/// reverse.
fn guest_pmd_vdpa() -> Result<(), Failed> {
    let peers = Arc::new(vec![Peer::new(0xa1)?, Peer::new(0xb2)?]);
    let mut qemu: Vec<String> = Vec::new();
    for (i, p) in peers.iter().enumerate() {
        qemu.push("-device".into());
        qemu.push(format!("pcie-root-port,id=rp{i},chassis={i},slot={i}"));
        qemu.push("-netdev".into());
        qemu.push(p.netdev(&format!("pn{i}"))?);
        qemu.push("-device".into());
        qemu.push(format!(
            "virtio-net-pci,netdev=pn{i},bus=rp{i},romfile=,mac={},{MODERN}",
            p.mac_str()
        ));
    }
    let stop = Arc::new(AtomicBool::new(false));
    let traffic = {
        let (peers, stop) = (Arc::clone(&peers), Arc::clone(&stop));
        thread::spawn(move || {
            run_traffic(
                peers,
                Traffic {
                    routes: vec![(0, 1, 0xaa), (1, 0, 0xbb)],
                    n: 100,
                },
                stop,
            )
        })
    };
    let args: Vec<&str> = qemu.iter().map(String::as_str).collect();
    let script = VDPA_SCRIPT
        .replace("FWDDUR", "40")
        .replace("DURATION", "44");
    let run = Guest::builder()
        .name("guest_pmd_vdpa")
        .memory_mb(768)
        .cpus(2)
        .intel_iommu_opts("aw-bits=48")
        .qemu_args(&args)
        .modules(&[
            "irqbypass",
            "vfio",
            "vfio_iommu_type1",
            "vfio-pci-core",
            "vfio-pci",
            "virtio_net",
        ])
        .binary(vdpakit(), "/vdpakit")
        .timeout(Duration::from_secs(240))
        .init_script(&script)
        .run_unchecked();
    stop.store(true, Ordering::SeqCst);
    let (results, _) = traffic.join().unwrap_or_default();
    let run = run.map_err(|e| e.to_string())?;
    let fail = |why: String| -> Failed { format!("{why}\n{}", run.report()).into() };
    if let Some(f) = run.failure() {
        return Err(fail(format!("guest failed: {f}")));
    }
    let m = |k: &str| run.marker(k).unwrap_or("").to_string();
    eprintln!("vdpa routes: {results:?}");
    if m("fwd_rc") != "0" || m("vdpa_rc") != "0" {
        return Err(fail(format!(
            "fwd exited {}, vdpa exited {}",
            m("fwd_rc"),
            m("vdpa_rc")
        )));
    }
    for (r, name) in results.iter().zip(["A->B", "B->A"]) {
        if r.measured_back != 100 || !r.mismatched.is_empty() {
            return Err(fail(format!(
                "route {name} through vDPA: {} of 100 numbered frames came back byte-exact; problems: {:?}",
                r.measured_back,
                &r.mismatched[..r.mismatched.len().min(5)]
            )));
        }
    }
    let fj: serde_json::Value =
        serde_json::from_str(&m("fwd_json")).map_err(|e| fail(format!("fwd json: {e}")))?;
    let rx = |p: usize| json_u64(&fj, &["ports", &p.to_string(), "rx_packets"]).unwrap_or(0);
    let tx = |p: usize| json_u64(&fj, &["ports", &p.to_string(), "tx_packets"]).unwrap_or(0);
    for (r, t, host, what) in [
        (
            rx(0),
            tx(1),
            results[0].total_back,
            "A rx / B tx / host got from B",
        ),
        (
            rx(1),
            tx(0),
            results[1].total_back,
            "B rx / A tx / host got from A",
        ),
    ] {
        if r != t || u64::from(host) != t {
            return Err(fail(format!("{what}: {r} / {t} / {host} (must be equal)")));
        }
    }
    if !m("vdpa_msix").contains("MSI-X per-queue") {
        return Err(fail(format!("MSI-X layout: {:?}", m("vdpa_msix"))));
    }
    Ok(())
}

type Case = fn() -> Result<(), Failed>;

fn require_all() -> bool {
    std::env::var("VMTEST_REQUIRE").is_ok_and(|v| !v.is_empty() && v != "0")
}

fn main() -> ExitCode {
    let mut args = Arguments::from_args();
    // One guest at a time: each runs busy-polling vdpakit under TCG.
    args.test_threads = Some(1);
    let gate = if args.list {
        Ok(())
    } else {
        vmtest::artifacts()
            .map(drop)
            .and_then(|()| vmtest::accel().map(drop))
    };
    let tests: Vec<(&'static str, Case)> = vec![
        ("guest_pmd_fwd", guest_pmd_fwd),
        ("guest_pmd_vdpa", guest_pmd_vdpa),
    ];
    let mut trials = Vec::new();
    for (name, f) in tests {
        let t = match &gate {
            Ok(()) => Trial::test(name, move || {
                let start = Instant::now();
                let r = f();
                eprintln!("TIME {name}: {:.1} s", start.elapsed().as_secs_f64());
                r
            }),
            Err(e) => match e.skip_reason() {
                Some(why) if require_all() => {
                    let why = why.to_string();
                    Trial::test(name, move || {
                        Err(format!("prerequisite missing and VMTEST_REQUIRE=1: {why}").into())
                    })
                }
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

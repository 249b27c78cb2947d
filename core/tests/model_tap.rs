//! A sim VF whose wire is a TAP uplink: the test creates a network namespace, moves the TAP
//! interface into it and gives it 192.0.2.1/24 there (nothing is configured in the machine's
//! own namespace); the guest (vdpakit's driver-side rings over the sim PMD) resolves the address
//! with ARP and pings it: the namespace's kernel answers through the VF.
//!
//! Custom harness: without root, `/dev/net/tun` or `ip`, the test is reported as ignored with
//! one `SKIP` line naming the reason, never as passed.

mod model_common;

use std::process::{Command, ExitCode};
use std::time::{Duration, Instant};

use libtest_mimic::{Arguments, Failed, Trial};
use model_common::*;
use vdpakit_core::model::sim::SimDevice;
use vdpakit_core::vdpa::VdpaDevice;
use vdpakit_core::virtio::features as vf;

const GUEST_IP: [u8; 4] = [192, 0, 2, 2];
const NS_IP: [u8; 4] = [192, 0, 2, 1];

struct Netns(String);

impl Netns {
    fn new(name: &str) -> Result<Netns, Failed> {
        let _ = Command::new("ip").args(["netns", "del", name]).status();
        run("ip", &["netns", "add", name])?;
        Ok(Netns(name.to_string()))
    }

    fn ip(&self, args: &[&str]) -> Result<String, Failed> {
        let mut a = vec!["-n", &self.0];
        a.extend_from_slice(args);
        run("ip", &a)
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

fn run(cmd: &str, args: &[&str]) -> Result<String, Failed> {
    let out = Command::new(cmd)
        .args(args)
        .output()
        .map_err(|e| format!("{cmd}: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "{cmd} {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        )
        .into());
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn csum(data: &[u8]) -> u16 {
    let mut s = 0u32;
    for c in data.chunks(2) {
        s += u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)]));
    }
    while s > 0xffff {
        s = (s & 0xffff) + (s >> 16);
    }
    !(s as u16)
}

fn arp_request(mac: [u8; 6]) -> Vec<u8> {
    let mut f = vec![0xff; 6];
    f.extend_from_slice(&mac);
    f.extend_from_slice(&[0x08, 0x06, 0, 1, 0x08, 0, 6, 4, 0, 1]);
    f.extend_from_slice(&mac);
    f.extend_from_slice(&GUEST_IP);
    f.extend_from_slice(&[0; 6]);
    f.extend_from_slice(&NS_IP);
    f.resize(60, 0);
    f
}

fn echo_request(mac: [u8; 6], dst: [u8; 6], seq: u16) -> Vec<u8> {
    let mut icmp = vec![8, 0, 0, 0, 0x12, 0x34];
    icmp.extend_from_slice(&seq.to_be_bytes());
    icmp.extend_from_slice(b"vdpakit sim tap ping payload");
    let c = csum(&icmp);
    icmp[2..4].copy_from_slice(&c.to_be_bytes());
    let total = (20 + icmp.len()) as u16;
    let mut ip = vec![0x45, 0];
    ip.extend_from_slice(&total.to_be_bytes());
    ip.extend_from_slice(&[0, 1, 0x40, 0, 64, 1, 0, 0]);
    ip.extend_from_slice(&GUEST_IP);
    ip.extend_from_slice(&NS_IP);
    let c = csum(&ip);
    ip[10..12].copy_from_slice(&c.to_be_bytes());
    let mut f = dst.to_vec();
    f.extend_from_slice(&mac);
    f.extend_from_slice(&[0x08, 0x00]);
    f.extend(ip);
    f.extend(icmp);
    f
}

/// Receives until `pick` accepts a frame (others — IPv6 neighbour discovery and the like — are
/// skipped); the receive ring is topped up as frames are consumed.
fn wait_frame<T>(r: &mut Rig, mut pick: impl FnMut(&[u8]) -> Option<T>) -> Result<T, Failed> {
    let end = Instant::now() + Duration::from_secs(10);
    while Instant::now() < end {
        for f in r.recv(1, Duration::from_millis(100)) {
            r.post_rx(1);
            if let Some(t) = pick(&f) {
                return Ok(t);
            }
        }
    }
    Err("no answer from the namespace within 10 s".into())
}

fn tap_ping() -> Result<(), Failed> {
    let id = std::process::id() % 100_000;
    let tap = format!("vkst{id}");
    let ns = Netns::new(&format!("vksns{id}"))?;
    let sim = SimDevice::from_spec(&format!(
        "name=tapt{id},wire=tap:{tap},mac=52:54:00:12:34:56"
    ))
    .map_err(|e| e.to_string())?;
    let mut r = Rig::start(&sim, 0, BASE_FEATURES | vf::RING_PACKED);
    r.post_rx(128);
    run("ip", &["link", "set", &tap, "netns", &ns.0])?;
    ns.ip(&["addr", "add", "192.0.2.1/24", "dev", &tap])?;
    ns.ip(&["link", "set", &tap, "up"])?;
    let mac = r.mac;
    assert_eq!(mac, [0x52, 0x54, 0, 0x12, 0x34, 0x56]);
    r.send(&[arp_request(mac)]);
    let ns_mac = wait_frame(&mut r, |f| {
        let reply = f.len() >= 42
            && f[12..14] == [0x08, 0x06]
            && f[20..22] == [0, 2]
            && f[28..32] == NS_IP
            && f[32..38] == mac;
        reply.then(|| <[u8; 6]>::try_from(&f[22..28]).unwrap_or([0; 6]))
    })?;
    for seq in 1..=3u16 {
        r.send(&[echo_request(mac, ns_mac, seq)]);
        wait_frame(&mut r, |f| {
            (f.len() >= 42
                && f[12..14] == [0x08, 0x00]
                && f[23] == 1
                && f[26..30] == NS_IP
                && f[34] == 0
                && f[40..42] == seq.to_be_bytes())
            .then_some(())
        })?;
        r.reap_tx();
    }
    let tx = r.dev.stats(1).map_err(|e| e.to_string())?;
    let rx = r.dev.stats(0).map_err(|e| e.to_string())?;
    eprintln!("tap ping: VF tx {tx:?}, rx {rx:?}");
    if tx.packets != 4 || tx.dropped != 0 || rx.packets < 4 || rx.iommu_faults != 0 {
        return Err(format!("VF counters: tx {tx:?}, rx {rx:?}").into());
    }
    // The namespace's side of the TAP saw our four frames.
    let stats = ns.ip(&["-s", "-j", "link", "show", &tap])?;
    let v: serde_like::Value = serde_like::parse(&stats);
    if v.rx_packets < 4 {
        return Err(format!("TAP counters in the namespace: {stats}").into());
    }
    Ok(())
}

/// Just enough JSON digging for `ip -s -j link show`: the first `"rx":{... "packets":N`.
mod serde_like {
    pub struct Value {
        pub rx_packets: u64,
    }
    pub fn parse(s: &str) -> Value {
        // `ip` reports the interface's own view: its rx is what the VF transmitted.
        let rx = s.find("\"rx\":").map(|i| &s[i..]).unwrap_or("");
        let n = rx
            .find("\"packets\":")
            .map(|i| &rx[i + 10..])
            .map(|t| {
                t.chars()
                    .take_while(|c| c.is_ascii_digit())
                    .collect::<String>()
            })
            .and_then(|d| d.parse().ok())
            .unwrap_or(0);
        Value { rx_packets: n }
    }
}

fn skip_reason() -> Option<String> {
    let uid = Command::new("id")
        .arg("-u")
        .output()
        .ok()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string());
    if uid.as_deref() != Some("0") {
        return Some("needs root (a TAP interface and a network namespace)".into());
    }
    if !std::path::Path::new("/dev/net/tun").exists() {
        return Some("/dev/net/tun is missing".into());
    }
    if Command::new("ip").arg("-V").output().is_err() {
        return Some("iproute2 (ip) is not installed".into());
    }
    None
}

fn main() -> ExitCode {
    let args = Arguments::from_args();
    let name = "sim_tap_uplink_in_a_namespace_answers_arp_and_ping";
    let trial = match skip_reason() {
        None => Trial::test(name, tap_ping),
        Some(why) => {
            println!("SKIP {name}: {why}");
            Trial::test(name, || Ok(())).with_ignored_flag(true)
        }
    };
    libtest_mimic::run(&args, vec![trial]).exit_code()
}

//! `vdpakit fwd`: a testpmd-like forwarder.
//!
//! Ports and queues become streams the way testpmd builds them: with an even number of ports,
//! port 2k forwards to 2k+1 and back; an odd last port (or a single port) forwards to itself.
//! Each stream is (rx port, queue) → (tx port, same queue); streams are dealt round-robin to the
//! listed cores. Every core runs a run-to-completion loop over its streams with everything it
//! needs moved in beforehand: no locks, syscalls or allocation inside the loop. The main thread
//! prints live rates and, at the end, a summary (or one JSON object with `--json`).

use std::io::Write;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use vdpakit_core::lcore::{self, LcoreCtx, StopFlag};
use vdpakit_core::mbuf::{Burst, MAX_BURST};
use vdpakit_core::mem::MemMode;
use vdpakit_core::mempool::{Mempool, MempoolCache, MempoolConfig};
use vdpakit_core::packet;
use vdpakit_core::port::{
    self, Port, PortConf, PortEnv, PortSpec, PortStats, RingRegistry, RxQueue, TxQueue,
};

use crate::error::{Error, Result};

/// Forwarding modes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Forward packets unchanged.
    Io,
    /// Rewrite source MAC (tx port) and destination MAC (02:00:00:00:00:<tx port>).
    Mac,
    /// Swap source and destination MAC.
    MacSwap,
    /// Only transmit generated packets.
    TxOnly,
    /// Only receive and free.
    RxOnly,
    /// Answer ARP and ICMP echo requests back out of the receiving port; drop the rest.
    IcmpEcho,
}

const MODES: &str = "io, mac, macswap, txonly, rxonly, icmpecho";

impl Mode {
    fn as_str(self) -> &'static str {
        match self {
            Mode::Io => "io",
            Mode::Mac => "mac",
            Mode::MacSwap => "macswap",
            Mode::TxOnly => "txonly",
            Mode::RxOnly => "rxonly",
            Mode::IcmpEcho => "icmpecho",
        }
    }
}

fn parse_mode(s: &str) -> std::result::Result<Mode, String> {
    Ok(match s {
        "io" => Mode::Io,
        "mac" => Mode::Mac,
        "macswap" => Mode::MacSwap,
        "txonly" => Mode::TxOnly,
        "rxonly" => Mode::RxOnly,
        "icmpecho" => Mode::IcmpEcho,
        _ => return Err(format!("accepted are {MODES}")),
    })
}

fn int_in<T: std::str::FromStr + PartialOrd + std::fmt::Display + Copy>(
    s: &str,
    lo: T,
    hi: T,
) -> std::result::Result<T, String> {
    match s.parse::<T>() {
        Ok(v) if v >= lo && v <= hi => Ok(v),
        _ => Err(format!("accepted is an integer in {lo}..={hi}")),
    }
}

fn seconds(s: &str) -> std::result::Result<f64, String> {
    match s.parse::<f64>() {
        Ok(v) if v.is_finite() && (0.0..=1e7).contains(&v) => Ok(v),
        _ => Err("accepted is a number of seconds in 0..=10000000".into()),
    }
}

/// Arguments of `vdpakit fwd`.
#[derive(Debug, clap::Args)]
pub struct FwdArgs {
    /// A port, KIND[:key=val,...] (repeat for more ports; `vdpakit ports` lists kinds and keys).
    #[arg(long = "port", value_name = "SPEC", required = true)]
    ports: Vec<String>,
    /// Forwarding mode: io, mac, macswap, txonly, rxonly, icmpecho.
    #[arg(long, default_value = "io", value_parser = parse_mode)]
    mode: Mode,
    /// CPUs for the forwarding lcores, like 0,1 or 0-3 (default: the last available CPU).
    #[arg(long, value_name = "LIST")]
    cores: Option<String>,
    /// Packets per burst (1..=512, at most the descriptor counts).
    #[arg(long, default_value = "32", value_parser = |s: &str| int_in::<usize>(s, 1, MAX_BURST))]
    burst: usize,
    /// Size of generated packets in bytes, without FCS (60..=9000).
    #[arg(long, default_value = "64", value_parser = |s: &str| int_in::<usize>(s, 60, 9000))]
    pkt_size: usize,
    /// Stop after this many seconds (default: run until Ctrl-C).
    #[arg(long, value_parser = seconds, allow_hyphen_values = true)]
    duration: Option<f64>,
    /// Seconds to wait after the ports are up before forwarding starts (the duration counts from
    /// the start of forwarding): lets a peer finish its own start-up (DPDK's virtio driver
    /// discards what arrives while it starts its queues).
    #[arg(long, default_value = "0", value_parser = seconds, allow_hyphen_values = true)]
    start_delay: f64,
    /// Seconds to keep the ports up after forwarding stops, so peers can drain what is in flight
    /// (a front end stops reading when its back end disconnects).
    #[arg(long, default_value = "0", value_parser = seconds, allow_hyphen_values = true)]
    linger: f64,
    /// Seconds between live statistics lines (0: none).
    #[arg(long, default_value = "1", value_parser = seconds, allow_hyphen_values = true)]
    stats_period: f64,
    /// Print one JSON object with the results on stdout (live lines go to stderr).
    #[arg(long)]
    json: bool,
    /// Receive and transmit queues per port (1..=128).
    #[arg(long, default_value = "1", value_parser = |s: &str| int_in::<u16>(s, 1, 128))]
    queues: u16,
    /// Descriptors per receive queue (64..=32768).
    #[arg(long, default_value = "1024", value_parser = |s: &str| int_in::<u16>(s, 64, 32768))]
    rxd: u16,
    /// Descriptors per transmit queue (64..=32768).
    #[arg(long, default_value = "1024", value_parser = |s: &str| int_in::<u16>(s, 64, 32768))]
    txd: u16,
    /// Packet buffers in the pool (default: sized from ports, queues and descriptors).
    #[arg(long, value_parser = |s: &str| int_in::<u32>(s, 1024, 16_777_216))]
    mbufs: Option<u32>,
    /// Per-lcore mempool cache size (0..=512).
    #[arg(long, default_value = "256", value_parser = |s: &str| int_in::<u32>(s, 0, 512))]
    cache: u32,
    /// Memory: auto (2 MiB hugepages, else 4 KiB with a warning), 2M, 1G, no-huge.
    #[arg(long, default_value = "auto")]
    mem: String,
}

/// One forwarding stream, owned by one lcore.
struct Stream {
    rx: Option<Box<dyn RxQueue>>,
    tx: Option<Box<dyn TxQueue>>,
    src_mac: [u8; 6],
    dst_mac: [u8; 6],
}

/// What each lcore gets.
struct LcoreWork {
    streams: Vec<Stream>,
    cache: MempoolCache,
    mode: Mode,
    burst: usize,
    pkt_size: usize,
    template: Vec<u8>,
    replies: Burst,
}

fn usage(flag: &'static str, value: impl ToString, accepted: impl Into<String>) -> Error {
    Error::Usage {
        flag,
        value: value.to_string(),
        accepted: accepted.into(),
    }
}

/// Runs `vdpakit fwd`.
pub fn run(args: FwdArgs) -> Result<()> {
    // ---- validate everything before touching memory ----
    let max_burst = (args.rxd.min(args.txd) as usize).min(MAX_BURST);
    if args.burst > max_burst {
        return Err(usage(
            "--burst",
            args.burst,
            format!("1..={max_burst} (at most 512 and the rxd/txd counts)"),
        ));
    }
    let mem: MemMode = args
        .mem
        .parse()
        .map_err(|_| usage("--mem", &args.mem, "auto, 2M, 1G, no-huge"))?;
    let cpus = match &args.cores {
        Some(list) => lcore::parse_core_list(list)?,
        None => vec![*lcore::available_cpus().last().unwrap_or(&0)],
    };
    lcore::check_cpus(&cpus)?;
    let specs = args
        .ports
        .iter()
        .map(|s| PortSpec::parse(s))
        .collect::<vdpakit_core::Result<Vec<_>>>()?;
    for s in &specs {
        let Some(kind) = port::KINDS.iter().find(|k| k.name == s.kind()) else {
            return Err(vdpakit_core::Error::UnknownPortKind {
                kind: s.kind().to_string(),
                known: port::KINDS
                    .iter()
                    .map(|k| k.name)
                    .collect::<Vec<_>>()
                    .join(", "),
            }
            .into());
        };
        // Key names are checked here, before any memory is set up; values when the port is built.
        s.args(kind.keys)?;
    }
    if specs.len() > 64 {
        return Err(usage(
            "--port",
            format!("given {} times", specs.len()),
            "at most 64 ports",
        ));
    }

    // ---- memory and ports ----
    let nports = specs.len();
    let q = args.queues as usize;
    let cache_hold = (args.cache as usize * 3).div_ceil(2);
    let per_queue = args.rxd as usize * 2 + args.txd as usize + 3 * cache_hold + 2 * MAX_BURST;
    let auto_mbufs = nports * (q * per_queue + 1024) + cpus.len() * (cache_hold + MAX_BURST);
    let count = args
        .mbufs
        .unwrap_or(auto_mbufs.clamp(4096, 16_777_216) as u32);
    let data_room = (args.pkt_size.next_multiple_of(64)).max(2048) as u32;
    let pool = Mempool::new(
        "fwd",
        MempoolConfig {
            count,
            data_room,
            cache_size: args.cache,
            mem,
        },
    )?;
    let rings = RingRegistry::new();
    let conf = PortConf {
        rx_queues: args.queues,
        tx_queues: args.queues,
        rx_desc: args.rxd,
        tx_desc: args.txd,
    };
    let mut ports: Vec<Box<dyn Port>> = Vec::with_capacity(nports);
    for (id, spec) in specs.iter().enumerate() {
        let env = PortEnv {
            pool: Arc::clone(&pool),
            rings: rings.clone(),
            port_id: id as u16,
            pkt_size: args.pkt_size,
            cache_size: args.cache,
        };
        let mut p = port::create(spec, &env)?;
        p.configure(&conf)?;
        ports.push(p);
    }
    for p in ports.iter_mut() {
        p.start()?;
    }

    // ---- streams, testpmd style ----
    let mut rxq: Vec<Vec<Option<Box<dyn RxQueue>>>> = Vec::new();
    let mut txq: Vec<Vec<Option<Box<dyn TxQueue>>>> = Vec::new();
    for p in ports.iter_mut() {
        let pairs = p.take_queues()?;
        rxq.push(pairs.iter().map(|_| None).collect());
        txq.push(pairs.iter().map(|_| None).collect());
        let i = rxq.len() - 1;
        for pair in pairs {
            rxq[i][pair.queue as usize] = pair.rx;
            txq[i][pair.queue as usize] = pair.tx;
        }
    }
    let peer = |p: usize| if p ^ 1 < nports { p ^ 1 } else { p };
    let mut streams = Vec::new();
    for (p, port_rxq) in rxq.iter_mut().enumerate() {
        for (qi, slot) in port_rxq.iter_mut().enumerate().take(q) {
            let tp = if matches!(args.mode, Mode::TxOnly | Mode::IcmpEcho) {
                p
            } else {
                peer(p)
            };
            let rx = if args.mode == Mode::TxOnly {
                None
            } else {
                slot.take()
            };
            let tx = if args.mode == Mode::RxOnly {
                None
            } else {
                txq[tp][qi].take()
            };
            let mut dst = [0x02, 0, 0, 0, 0, 0];
            dst[5] = tp as u8;
            streams.push(Stream {
                rx,
                tx,
                src_mac: ports[tp].mac(),
                dst_mac: dst,
            });
        }
    }
    let nlcores = cpus.len().min(streams.len());
    if nlcores < cpus.len() {
        tracing::warn!(
            "{} streams for {} cores: cores {} stay idle",
            streams.len(),
            cpus.len(),
            lcore::format_cpus(&cpus[nlcores..])
        );
    }
    let mut per_lcore: Vec<Vec<Stream>> = (0..nlcores).map(|_| Vec::new()).collect();
    for (i, s) in streams.into_iter().enumerate() {
        per_lcore[i % nlcores].push(s);
    }
    let template = packet::udp_template(ports[0].mac(), [0x02, 0, 0, 0, 0, 0], args.pkt_size);
    let mut work: Vec<Option<LcoreWork>> = per_lcore
        .into_iter()
        .map(|streams| {
            Some(LcoreWork {
                streams,
                cache: pool.cache(args.cache),
                mode: args.mode,
                burst: args.burst,
                pkt_size: args.pkt_size,
                template: template.clone(),
                replies: Burst::new(args.burst),
            })
        })
        .collect();

    // ---- run ----
    let stop = StopFlag::new();
    stop.install_signal_handlers()?;
    if args.start_delay > 0.0 {
        // Ports are up (control threads serve their peers); forwarding waits. Ctrl-C still works.
        let until = Instant::now() + Duration::from_secs_f64(args.start_delay);
        while Instant::now() < until && !stop.is_stopped() {
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    let lcores = lcore::launch(&cpus[..nlcores], &stop, |i, _cpu| {
        let w = work[i].take();
        move |ctx: &LcoreCtx| {
            if let Some(w) = w {
                lcore_loop(ctx, w);
            }
        }
    })?;
    let started = Instant::now();
    let deadline = args.duration.map(|d| started + Duration::from_secs_f64(d));
    let period = (args.stats_period > 0.0).then(|| Duration::from_secs_f64(args.stats_period));
    let mut next_stats = period.map(|p| started + p);
    let mut last: (Instant, Vec<PortStats>) = (started, ports.iter().map(|p| p.stats()).collect());
    let live_to_stderr = args.json;
    while !stop.is_stopped() && !lcores.all_finished() {
        let now = Instant::now();
        if deadline.is_some_and(|d| now >= d) {
            break;
        }
        if let (Some(t), Some(p)) = (next_stats, period)
            && now >= t
        {
            {
                let snap: Vec<PortStats> = ports.iter().map(|p| p.stats()).collect();
                let secs = now.duration_since(last.0).as_secs_f64();
                let line = live_line(
                    now.duration_since(started),
                    args.duration,
                    &snap,
                    &last.1,
                    secs,
                );
                if live_to_stderr {
                    eprintln!("{line}");
                } else {
                    println!("{line}");
                }
                last = (now, snap);
                next_stats = Some(t + p);
            }
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    stop.stop();
    let joined = lcores.join();
    let elapsed = started.elapsed().as_secs_f64();
    let finals: Vec<PortStats> = ports.iter().map(|p| p.stats()).collect();
    if args.linger > 0.0 {
        // Forwarding has stopped; the ports (and their connections) stay up for the peers.
        std::thread::sleep(Duration::from_secs_f64(args.linger));
    }
    for p in ports.iter_mut() {
        p.stop()?;
    }
    joined.map_err(|e| Error::Runtime(e.to_string()))?;

    // ---- report ----
    let report = summary(&args, &cpus[..nlcores], &ports, &finals, elapsed, &pool);
    if args.json {
        let mut out = std::io::stdout().lock();
        let _ = writeln!(out, "{report}");
    } else {
        print_summary(&report);
    }
    Ok(())
}

/// The per-lcore poll loop. Everything it uses was moved in; nothing here locks, allocates or
/// makes a syscall.
fn lcore_loop(ctx: &LcoreCtx, mut w: LcoreWork) {
    let mut burst = Burst::new(w.burst);
    while !ctx.should_stop() {
        for s in w.streams.iter_mut() {
            match w.mode {
                Mode::TxOnly => {
                    let Some(tx) = s.tx.as_mut() else { continue };
                    if !w.cache.alloc_bulk(&mut burst, w.burst) {
                        continue;
                    }
                    for m in burst.iter_mut() {
                        m.set_data_len(w.pkt_size);
                        m.data_mut()[..w.template.len()].copy_from_slice(&w.template);
                    }
                    send_or_drop(tx.as_mut(), &mut burst, &mut w.cache);
                }
                Mode::RxOnly => {
                    let Some(rx) = s.rx.as_mut() else { continue };
                    if rx.rx_burst(&mut burst) > 0 {
                        w.cache.free_burst(&mut burst);
                    }
                }
                Mode::IcmpEcho => {
                    let (Some(rx), Some(tx)) = (s.rx.as_mut(), s.tx.as_mut()) else {
                        continue;
                    };
                    if rx.rx_burst(&mut burst) == 0 {
                        continue;
                    }
                    let (cache, replies, mac) = (&mut w.cache, &mut w.replies, s.src_mac);
                    let mut ignored = 0u64;
                    burst.drain_front(burst.len(), |mut m| {
                        if packet::icmpecho(m.data_mut(), mac) {
                            // Cannot fail: `replies` has the same limit as `burst`.
                            let _ = replies.push(m);
                        } else {
                            ignored += 1;
                            cache.free(m);
                        }
                    });
                    if ignored > 0 {
                        rx.stats().add_drops(ignored);
                    }
                    send_or_drop(tx.as_mut(), replies, cache);
                }
                Mode::Io | Mode::Mac | Mode::MacSwap => {
                    let Some(rx) = s.rx.as_mut() else { continue };
                    if rx.rx_burst(&mut burst) == 0 {
                        continue;
                    }
                    match w.mode {
                        Mode::Mac => {
                            for m in burst.iter_mut() {
                                packet::set_macs(m.data_mut(), s.dst_mac, s.src_mac);
                            }
                        }
                        Mode::MacSwap => {
                            for m in burst.iter_mut() {
                                packet::swap_macs(m.data_mut());
                            }
                        }
                        _ => {}
                    }
                    match s.tx.as_mut() {
                        Some(tx) => send_or_drop(tx.as_mut(), &mut burst, &mut w.cache),
                        None => {
                            rx.stats().add_drops(burst.len() as u64);
                            w.cache.free_burst(&mut burst);
                        }
                    }
                }
            }
        }
    }
}

/// Sends `pkts` on `tx`; whatever the queue does not take is freed and counted as dropped on
/// that queue, so every packet is either forwarded or counted.
#[inline(always)]
fn send_or_drop(tx: &mut dyn TxQueue, pkts: &mut Burst, cache: &mut MempoolCache) {
    tx.tx_burst(pkts);
    if !pkts.is_empty() {
        tx.stats().add_drops(pkts.len() as u64);
        cache.free_burst(pkts);
    }
}

fn mpps(pkts: u64, secs: f64) -> f64 {
    if secs > 0.0 {
        pkts as f64 / secs / 1e6
    } else {
        0.0
    }
}

fn gbps(bytes: u64, secs: f64) -> f64 {
    if secs > 0.0 {
        bytes as f64 * 8.0 / secs / 1e9
    } else {
        0.0
    }
}

fn live_line(
    at: Duration,
    total: Option<f64>,
    now: &[PortStats],
    before: &[PortStats],
    secs: f64,
) -> String {
    let mut s = match total {
        Some(t) => format!("[{:>6.1}s/{t:.0}s]", at.as_secs_f64()),
        None => format!("[{:>6.1}s]", at.as_secs_f64()),
    };
    for (i, (n, b)) in now.iter().zip(before).enumerate() {
        s.push_str(&format!(
            "  port {i}: rx {:.3} Mpps {:.2} Gbit/s, tx {:.3} Mpps {:.2} Gbit/s, drop {}",
            mpps(n.rx.packets - b.rx.packets, secs),
            gbps(n.rx.bytes - b.rx.bytes, secs),
            mpps(n.tx.packets - b.tx.packets, secs),
            gbps(n.tx.bytes - b.tx.bytes, secs),
            (n.tx.drops + n.rx.drops) - (b.tx.drops + b.rx.drops),
        ));
    }
    s
}

fn mac_str(m: [u8; 6]) -> String {
    m.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

fn summary(
    args: &FwdArgs,
    cpus: &[usize],
    ports: &[Box<dyn Port>],
    stats: &[PortStats],
    secs: f64,
    pool: &Mempool,
) -> Value {
    let mut tot = (0u64, 0u64, 0u64, 0u64);
    let ports_json: Vec<Value> = ports
        .iter()
        .zip(stats)
        .enumerate()
        .map(|(i, (p, s))| {
            tot.0 += s.rx.packets;
            tot.1 += s.tx.packets;
            tot.2 += s.rx.drops + s.tx.drops;
            tot.3 += s.rx.errors + s.tx.errors;
            json!({
                "port": i,
                "spec": p.name(),
                "kind": p.kind(),
                "mac": mac_str(p.mac()),
                "rx_packets": s.rx.packets,
                "rx_bytes": s.rx.bytes,
                "rx_dropped": s.rx.drops,
                "rx_errors": s.rx.errors,
                "tx_packets": s.tx.packets,
                "tx_bytes": s.tx.bytes,
                "tx_dropped": s.tx.drops,
                "tx_errors": s.tx.errors,
                "rx_mpps": mpps(s.rx.packets, secs),
                "tx_mpps": mpps(s.tx.packets, secs),
                "rx_gbps": gbps(s.rx.bytes, secs),
                "tx_gbps": gbps(s.tx.bytes, secs),
                "queues": s.rx_queues.iter().zip(&s.tx_queues).enumerate().map(|(q, (r, t))| json!({
                    "queue": q, "rx_packets": r.packets, "tx_packets": t.packets, "tx_dropped": t.drops,
                })).collect::<Vec<_>>(),
            })
        })
        .collect();
    let seg = pool.zone().segment();
    json!({
        "mode": args.mode.as_str(),
        "cores": cpus,
        "burst": args.burst,
        "pkt_size": args.pkt_size,
        "queues": args.queues,
        "duration_s": secs,
        "memory": {
            "page_size": seg.page_size().label(),
            "hugepages": seg.is_huge(),
            "mbufs": pool.count(),
            "alloc_failures": pool.alloc_failures(),
        },
        "ports": ports_json,
        "total": {
            "rx_packets": tot.0,
            "tx_packets": tot.1,
            "dropped": tot.2,
            "errors": tot.3,
            "rx_mpps": mpps(tot.0, secs),
            "tx_mpps": mpps(tot.1, secs),
        },
    })
}

fn print_summary(r: &Value) {
    println!(
        "---- vdpakit fwd: mode {} on cores {} for {:.2} s ({} mbufs, {} pages) ----",
        r["mode"].as_str().unwrap_or("?"),
        r["cores"],
        r["duration_s"].as_f64().unwrap_or(0.0),
        r["memory"]["mbufs"],
        r["memory"]["page_size"].as_str().unwrap_or("?"),
    );
    for p in r["ports"].as_array().into_iter().flatten() {
        println!(
            "port {} {} ({}): rx {} pkts {:.3} Mpps {:.2} Gbit/s | tx {} pkts {:.3} Mpps {:.2} Gbit/s | dropped rx {} tx {} | errors {}",
            p["port"],
            p["spec"].as_str().unwrap_or("?"),
            p["mac"].as_str().unwrap_or("?"),
            p["rx_packets"],
            p["rx_mpps"].as_f64().unwrap_or(0.0),
            p["rx_gbps"].as_f64().unwrap_or(0.0),
            p["tx_packets"],
            p["tx_mpps"].as_f64().unwrap_or(0.0),
            p["tx_gbps"].as_f64().unwrap_or(0.0),
            p["rx_dropped"],
            p["tx_dropped"],
            p["rx_errors"].as_u64().unwrap_or(0) + p["tx_errors"].as_u64().unwrap_or(0),
        );
    }
    let t = &r["total"];
    println!(
        "total: rx {} pkts {:.3} Mpps | tx {} pkts {:.3} Mpps | dropped {} | mbuf alloc failures {}",
        t["rx_packets"],
        t["rx_mpps"].as_f64().unwrap_or(0.0),
        t["tx_packets"],
        t["tx_mpps"].as_f64().unwrap_or(0.0),
        t["dropped"],
        r["memory"]["alloc_failures"],
    );
}

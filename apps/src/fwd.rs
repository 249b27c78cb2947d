//! `vdpakit fwd`: a testpmd-like forwarder.
//!
//! Ports and queues become streams the way testpmd builds them: with an even number of ports,
//! port 2k forwards to 2k+1 and back; an odd last port (or a single port) forwards to itself.
//! Each stream is (rx port, queue) → (tx port, same queue); streams are dealt round-robin to the
//! listed cores. Every core runs a run-to-completion loop over its streams with everything it
//! needs moved in beforehand: no locks, syscalls or allocation inside the loop. The main thread
//! prints live rates and, at the end, a summary (or one JSON object with `--json`).

use std::io::{IsTerminal, Write};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use vdpakit_core::lcore::{self, LcoreCtx, StopFlag};
use vdpakit_core::mbuf::{Burst, MAX_BURST};
use vdpakit_core::mem::MemMode;
use vdpakit_core::mempool::{self, Mempool, MempoolCache, MempoolConfig};
use vdpakit_core::packet;
use vdpakit_core::port::{
    self, Port, PortConf, PortEnv, PortSpec, PortStats, RingRegistry, RxQueue, TxQueue,
};
use vdpakit_core::tsc::{self, Tsc};
use vdpakit_core::vdpa::binding::{SharedDevice, lock};

use crate::error::{Error, Result};
use crate::tgen::{
    self, HistExchange, LatAgg, LatRx, SizeGen, SizeSpec, TokenBucket, TxGen, UdpGen,
};

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

/// `--mode`: one mode for every port, or a comma-separated list with one per port (the last one
/// repeats for ports beyond the list), e.g. `txonly,rxonly` for a generator and a receiver.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Modes(Vec<Mode>);

impl Modes {
    /// The mode of port `p`.
    fn for_port(&self, p: usize) -> Mode {
        self.0[p.min(self.0.len() - 1)]
    }

    fn label(&self) -> String {
        self.0
            .iter()
            .map(|m| m.as_str())
            .collect::<Vec<_>>()
            .join(",")
    }
}

fn parse_modes(s: &str) -> std::result::Result<Modes, String> {
    s.split(',')
        .map(|m| parse_mode(m.trim()))
        .collect::<std::result::Result<Vec<_>, _>>()
        .map(Modes)
}

fn parse_mode(s: &str) -> std::result::Result<Mode, String> {
    Ok(match s {
        "io" => Mode::Io,
        "mac" => Mode::Mac,
        "macswap" => Mode::MacSwap,
        "txonly" => Mode::TxOnly,
        "rxonly" => Mode::RxOnly,
        "icmpecho" => Mode::IcmpEcho,
        _ => {
            return Err(format!(
                "accepted are {MODES}, or a comma-separated list of them, one per port"
            ));
        }
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

fn parse_rate(s: &str) -> std::result::Result<f64, String> {
    match s.parse::<f64>() {
        Ok(v) if v.is_finite() && v > 0.0 && v <= 10_000.0 => Ok(v),
        _ => Err("accepted is a packet rate in Mpps, a number > 0 and <= 10000".into()),
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
    /// Forwarding mode: io, mac, macswap, txonly, rxonly, icmpecho; or a comma-separated list,
    /// one per port (the last repeats), e.g. txonly,rxonly.
    #[arg(long, default_value = "io", value_parser = parse_modes)]
    mode: Modes,
    /// CPUs for the forwarding lcores, like 0,1 or 0-3 (default: the last available CPU).
    #[arg(long, value_name = "LIST")]
    cores: Option<String>,
    /// Packets per burst (1..=512, at most the descriptor counts).
    #[arg(long, default_value = "32", value_parser = |s: &str| int_in::<usize>(s, 1, MAX_BURST))]
    burst: usize,
    /// Size of generated packets in bytes, without FCS: N (60..=9000), a range MIN-MAX (uniform
    /// per packet) or imix (64/594/1518 bytes, 7:4:1).
    #[arg(long, default_value = "64", value_parser = SizeSpec::parse)]
    pkt_size: SizeSpec,
    /// txonly: cycle over N flows (source IPv4 address and UDP source port), 1..=65536.
    #[arg(long, default_value = "1", value_parser = |s: &str| int_in::<u32>(s, 1, tgen::MAX_FLOWS))]
    flows: u32,
    /// txonly: total rate in Mpps, split evenly over the transmitting queues (default: as fast as
    /// possible).
    #[arg(long, value_name = "MPPS", value_parser = parse_rate, allow_hyphen_values = true)]
    rate: Option<f64>,
    /// Latency and loss: txonly stamps packets (magic, stream, sequence, clock); receiving modes
    /// read the stamps and report latency percentiles, lost and reordered packets per port.
    #[arg(long)]
    latency: bool,
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
    /// A vDPA device to create in this process, e.g. `sim:name=r,wire=rep` (whose VFs `rep`
    /// ports attach to); repeatable (`vdpakit vdpa --list-kinds` lists the kinds).
    #[arg(long = "device", value_name = "SPEC")]
    devices: Vec<String>,
    /// Serve the --device VFs on vhost-user sockets PREFIX0, PREFIX1, ... through the vDPA
    /// binding (as `vdpakit vdpa --iface`), so a front end (QEMU, virtio-user) drives them.
    #[arg(long, value_name = "PREFIX")]
    device_iface: Option<String>,
}

/// One forwarding stream, owned by one lcore.
struct Stream {
    mode: Mode,
    rx: Option<Box<dyn RxQueue>>,
    tx: Option<Box<dyn TxQueue>>,
    src_mac: [u8; 6],
    dst_mac: [u8; 6],
    /// txonly: the generator.
    tgen: Option<TxGen>,
    /// Receiving modes with --latency: the stamp reader.
    lat: Option<LatRx>,
    /// icmpecho: replies the port has not taken yet, oldest first.
    held: Option<Held>,
}

/// icmpecho replies a port could not take at once (a vhost-user port behind a vIOMMU waits
/// for a translation of the guest's receive buffer): retried on every pass for up to
/// [`HOLD_SECS`], then freed and counted as dropped on that queue.
struct Held {
    pkts: Burst,
    /// When the oldest held reply is given up (clock ticks), valid while `pkts` is not empty.
    deadline: u64,
    hold_ticks: u64,
}

/// How long icmpecho holds a reply its port did not take.
const HOLD_SECS: f64 = 0.1;

/// What each lcore gets.
struct LcoreWork {
    streams: Vec<Stream>,
    cache: MempoolCache,
    burst: usize,
    /// Raised by the main thread to stop generating (receivers go on draining).
    gen_stop: Arc<AtomicBool>,
    /// Lcores with generators count themselves here once they have stopped generating.
    gen_acks: Arc<AtomicUsize>,
    /// Where latency histograms go, and how often (clock ticks).
    exchange: Option<Arc<HistExchange>>,
    publish_ticks: u64,
    /// How long (clock ticks) a stopped generator keeps trying to send its end markers.
    end_ticks: u64,
}

/// What a stamping generator did, for the report.
#[derive(Debug, Clone, Copy)]
struct TxSeq {
    /// Stamp stream id (tx port << 16 | tx queue).
    id: u32,
    /// Packets stamped (the next sequence number).
    next: u32,
    /// End markers the port took, and of those the ones it dropped.
    end_sent: u32,
    end_dropped: u32,
}

/// What an lcore hands back when it stops.
struct LcoreResult {
    /// Each stamping generator.
    tx_seqs: Vec<TxSeq>,
    /// The stamp readers.
    lats: Vec<LatRx>,
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
    let all_kinds = port::kinds();
    for s in &specs {
        let Some(kind) = all_kinds.iter().find(|k| k.name == s.kind()) else {
            return Err(vdpakit_core::Error::UnknownPortKind {
                kind: s.kind().to_string(),
                known: all_kinds
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
    if args.mode.0.len() > specs.len() {
        return Err(usage(
            "--mode",
            args.mode.label(),
            format!("at most one mode per port ({} ports given)", specs.len()),
        ));
    }
    let any_txonly = (0..specs.len()).any(|p| args.mode.for_port(p) == Mode::TxOnly);
    if args.latency && any_txonly && args.pkt_size.min() < tgen::STAMP_MIN_FRAME {
        return Err(usage(
            "--pkt-size",
            args.pkt_size.label(),
            format!(
                "sizes of at least {} bytes with --latency (the {}-byte stamp follows the \
                 Ethernet/IPv4/UDP headers)",
                tgen::STAMP_MIN_FRAME,
                tgen::STAMP_LEN
            ),
        ));
    }
    if !any_txonly && (args.rate.is_some() || args.flows > 1) {
        tracing::warn!("--rate and --flows only apply to txonly ports");
    }

    // ---- in-process vDPA devices and their sockets (before ports: `rep` ports find them) ----
    if args.device_iface.is_some() && args.devices.is_empty() {
        return Err(usage(
            "--device-iface",
            args.device_iface.clone().unwrap_or_default(),
            "a socket prefix together with at least one --device",
        ));
    }
    let mut hosted: Vec<SharedDevice> = Vec::new();
    for spec in &args.devices {
        for d in crate::vdpa::create(spec)? {
            hosted.push(Arc::new(std::sync::Mutex::new(d)));
        }
    }
    let mut _servers = Vec::new();
    if let Some(prefix) = &args.device_iface {
        for (k, d) in hosted.iter().enumerate() {
            let sock = format!("{prefix}{k}");
            _servers.push(crate::vdpa::serve(d, &sock, false)?);
            eprintln!("{}: vhost-user socket {sock}", lock(d).name());
        }
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
    let data_room = (args.pkt_size.max().next_multiple_of(64)).max(2048) as u32;
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
            pkt_size: args.pkt_size.min(),
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
    let tsc = Tsc::calibrate(Duration::from_millis(50));
    let tx_streams = (0..nports)
        .filter(|&p| args.mode.for_port(p) == Mode::TxOnly)
        .count()
        * q;
    let mut streams = Vec::new();
    for (p, port_rxq) in rxq.iter_mut().enumerate() {
        let mode = args.mode.for_port(p);
        for (qi, slot) in port_rxq.iter_mut().enumerate().take(q) {
            let tp = if matches!(mode, Mode::TxOnly | Mode::IcmpEcho) {
                p
            } else {
                peer(p)
            };
            let rx = if mode == Mode::TxOnly {
                None
            } else {
                slot.take()
            };
            let tx = if mode == Mode::RxOnly {
                None
            } else {
                txq[tp][qi].take()
            };
            let mut dst = [0x02, 0, 0, 0, 0, 0];
            dst[5] = tp as u8;
            let src_mac = ports[tp].mac();
            let tgen = (mode == Mode::TxOnly).then(|| TxGen {
                sizes: SizeGen::new(args.pkt_size, (p * q + qi) as u64),
                udp: UdpGen::new(src_mac, [0x02, 0, 0, 0, 0, 0], args.flows),
                bucket: args.rate.map(|mpps| {
                    let pps = mpps * 1e6 / tx_streams as f64;
                    // Up to 10 ms of credit survives a preemption (the lcore then catches up
                    // in full bursts); never less than one burst.
                    let depth = ((pps * 0.01) as usize).max(args.burst);
                    TokenBucket::new(pps, tsc.hz(), depth, vdpakit_core::tsc::now())
                }),
                stamp: args.latency.then_some(((p as u32) << 16) | qi as u32),
                seq: 0,
                end_left: 0,
                end_sent: 0,
                end_dropped: 0,
            });
            let lat = (args.latency
                && rx.is_some()
                && matches!(mode, Mode::RxOnly | Mode::Io | Mode::Mac | Mode::MacSwap))
            .then(|| LatRx::new(p as u16, nports, q, tsc.ns_per_tick()));
            streams.push(Stream {
                mode,
                rx,
                tx,
                src_mac,
                dst_mac: dst,
                tgen,
                lat,
                held: (mode == Mode::IcmpEcho).then(|| Held {
                    pkts: Burst::new(args.burst),
                    deadline: 0,
                    hold_ticks: tsc.ticks(HOLD_SECS),
                }),
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
    let gen_stop = Arc::new(AtomicBool::new(false));
    let gen_acks = Arc::new(AtomicUsize::new(0));
    let gen_lcores = per_lcore
        .iter()
        .filter(|ss| ss.iter().any(|s| s.tgen.is_some()))
        .count();
    let rx_streams = per_lcore
        .iter()
        .flatten()
        .filter(|s| s.rx.is_some())
        .count();
    // Latency histograms travel to this thread at most every half second (or the stats period).
    let publish_ticks = tsc.ticks(if args.stats_period > 0.0 {
        args.stats_period.min(0.5)
    } else {
        0.5
    });
    // Up to 0.9 s (the main thread waits a second for the acknowledgements): a receiver whose
    // ring is full takes a while to make room.
    let end_ticks = tsc.ticks(0.9);
    let mut exchanges: Vec<Arc<HistExchange>> = Vec::new();
    let mut live_lat: Vec<(u16, Arc<tgen::LiveLat>)> = Vec::new();
    let mut work: Vec<Option<LcoreWork>> = per_lcore
        .into_iter()
        .map(|streams| {
            let recorders = streams.iter().filter(|s| s.lat.is_some()).count();
            let exchange = (recorders > 0).then(|| {
                let ex = HistExchange::new(recorders);
                exchanges.push(Arc::clone(&ex));
                ex
            });
            for l in streams.iter().filter_map(|s| s.lat.as_ref()) {
                live_lat.push((l.port, Arc::clone(&l.live)));
            }
            Some(LcoreWork {
                streams,
                cache: pool.cache(args.cache),
                burst: args.burst,
                gen_stop: Arc::clone(&gen_stop),
                gen_acks: Arc::clone(&gen_acks),
                exchange,
                publish_ticks,
                end_ticks,
            })
        })
        .collect();
    let mut agg: Vec<LatAgg> = if args.latency {
        (0..nports).map(|_| LatAgg::default()).collect()
    } else {
        Vec::new()
    };

    // ---- run ----
    // Ctrl-C / SIGTERM raise `interrupted`, which only the main thread watches: it then stops
    // like the end of `--duration` (generators send their end markers, receivers drain), and
    // only after that raises `stop` for the lcores. A second signal ends the process at once.
    let interrupted = StopFlag::new();
    interrupted.install_signal_handlers()?;
    let stop = StopFlag::new();
    if args.start_delay > 0.0 {
        // Ports are up (control threads serve their peers); forwarding waits. Ctrl-C still works.
        let until = Instant::now() + Duration::from_secs_f64(args.start_delay);
        while Instant::now() < until && !interrupted.is_stopped() {
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    let lcores = lcore::launch(&cpus[..nlcores], &stop, |i, _cpu| {
        let w = work[i].take();
        move |ctx: &LcoreCtx| w.map(|w| lcore_loop(ctx, w))
    })?;
    let started = Instant::now();
    let deadline = args.duration.map(|d| started + Duration::from_secs_f64(d));
    let period = (args.stats_period > 0.0).then(|| Duration::from_secs_f64(args.stats_period));
    let mut next_stats = period.map(|p| started + p);
    let mut last: (Instant, Vec<PortStats>) = (started, ports.iter().map(|p| p.stats()).collect());
    let mut live = LiveOut::new(args.json);
    while !interrupted.is_stopped() && !lcores.all_finished() {
        let now = Instant::now();
        if deadline.is_some_and(|d| now >= d) {
            break;
        }
        if let (Some(t), Some(p)) = (next_stats, period)
            && now >= t
        {
            merge_exchanges(&exchanges, &mut agg);
            let snap: Vec<PortStats> = ports.iter().map(|p| p.stats()).collect();
            let secs = now.duration_since(last.0).as_secs_f64();
            let mut line = live_line(
                now.duration_since(started),
                args.duration,
                &snap,
                &last.1,
                secs,
            );
            for (port, a) in agg.iter().enumerate() {
                let (lost, reordered) = live_lat
                    .iter()
                    .filter(|(p, _)| *p as usize == port)
                    .map(|(_, l)| {
                        (
                            l.lost.load(Ordering::Relaxed),
                            l.reordered.load(Ordering::Relaxed),
                        )
                    })
                    .fold((0u64, 0u64), |acc, x| (acc.0 + x.0, acc.1 + x.1));
                if !a.hist.is_empty() {
                    line.push_str(&format!(
                        "  port {port} latency p99 {:.1} us, lost {lost}, reordered {reordered}",
                        a.hist.value_at_quantile(0.99) as f64 / 1e3
                    ));
                }
            }
            live.line(&line);
            last = (now, snap);
            next_stats = Some(t + p);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    live.finish();
    let elapsed = started.elapsed().as_secs_f64();
    // Generators stop first; receivers drain what is in flight, so that every packet sent is
    // either received or was dropped (and counted) on the way.
    // Generators stop (and send their end markers) even when nothing here receives: a receiver
    // in another process counts what they stamped after its last packet from the markers.
    let drained = gen_lcores > 0
        && !lcores.all_finished()
        && drain(
            &stop,
            &lcores,
            &ports,
            &gen_stop,
            &gen_acks,
            gen_lcores,
            rx_streams > 0,
        );
    stop.stop();
    let joined = lcores.join();
    let finals: Vec<PortStats> = ports.iter().map(|p| p.stats()).collect();
    if args.linger > 0.0 {
        // Forwarding has stopped; the ports (and their connections) stay up for the peers.
        std::thread::sleep(Duration::from_secs_f64(args.linger));
    }
    for p in ports.iter_mut() {
        p.stop()?;
    }
    let mut results: Vec<LcoreResult> = joined
        .map_err(|e| Error::Runtime(e.to_string()))?
        .into_iter()
        .flatten()
        .collect();
    if args.latency {
        merge_exchanges(&exchanges, &mut agg);
        let tx_seqs: std::collections::HashMap<u32, u32> = results
            .iter()
            .flat_map(|r| r.tx_seqs.iter().map(|t| (t.id, t.next)))
            .collect();
        for r in results.iter_mut() {
            for l in r.lats.iter_mut() {
                // Whatever a stream stamped after the last of its packets that arrived was lost
                // too: how many it stamped comes from its end marker (any process), or, for a
                // generator of this process, from the generator itself once the receivers
                // drained everything in flight.
                let mut tail = 0;
                for (i, t) in l.seqs.iter_mut().enumerate() {
                    let id = (((i / q) as u32) << 16) | (i % q) as u32;
                    let local = tx_seqs.get(&id).copied().filter(|_| drained && t.seen);
                    if let Some(total) = t.end.or(local) {
                        tail += t.finish(total);
                    }
                }
                let a = &mut agg[l.port as usize];
                a.lost_tail += tail;
                a.absorb(l);
            }
        }
    }

    // ---- report ----
    // Per transmitting port: packets stamped, end markers taken and dropped by the port.
    let mut tx_lat = vec![(0u64, 0u64, 0u64); nports];
    for t in results.iter().flat_map(|r| r.tx_seqs.iter()) {
        if let Some(e) = tx_lat.get_mut((t.id >> 16) as usize) {
            e.0 += u64::from(t.next);
            e.1 += u64::from(t.end_sent);
            e.2 += u64::from(t.end_dropped);
        }
    }
    let mut report = summary(
        &args,
        &cpus[..nlcores],
        &ports,
        &finals,
        elapsed,
        &pool,
        (&agg, &tx_lat),
    );
    if !hosted.is_empty() {
        report["devices"] = devices_json(&hosted);
    }
    if args.json {
        let mut out = std::io::stdout().lock();
        let _ = writeln!(out, "{report}");
    } else {
        print_summary(&report);
    }
    Ok(())
}

/// Per-queue counters of the in-process vDPA devices (`--device`).
fn devices_json(devs: &[SharedDevice]) -> Value {
    let list: Vec<Value> = devs
        .iter()
        .map(|d| {
            let g = lock(d);
            let queues: Vec<Value> = (0..g.max_queue_pairs() * 2)
                .map(|q| {
                    let s = g.stats(q).unwrap_or_default();
                    json!({
                        "queue": q, "packets": s.packets, "bytes": s.bytes, "errors": s.errors,
                        "dropped": s.dropped, "iommu_faults": s.iommu_faults, "kicks": s.kicks,
                        "interrupts": s.interrupts,
                    })
                })
                .collect();
            json!({ "name": g.name(), "queues": queues })
        })
        .collect();
    Value::Array(list)
}

/// The per-lcore poll loop. Everything it uses was moved in; nothing here locks, allocates or
/// makes a syscall (the clock is `rdtsc`; histograms change hands through lock-free queues).
fn lcore_loop(ctx: &LcoreCtx, mut w: LcoreWork) -> LcoreResult {
    // One mempool cache per pool for this lcore and every queue it polls (a buffer the port
    // frees is the next one the loop allocates, and back), created here, not in the loop.
    mempool::enable_local_caches();
    w.cache.local(|_| ());
    let mut burst = Burst::new(w.burst);
    let generates = w.streams.iter().any(|s| s.tgen.is_some());
    let mut generating = generates;
    // After generation stops: the deadline for end markers, until the lcore acknowledges.
    let mut ending: Option<u64> = None;
    let mut next_publish = tsc::now().wrapping_add(w.publish_ticks);
    while !ctx.should_stop() {
        if generating && w.gen_stop.load(Ordering::Relaxed) {
            generating = false;
            for g in w.streams.iter_mut().filter_map(|s| s.tgen.as_mut()) {
                if g.stamp.is_some() {
                    g.end_left = tgen::END_COPIES;
                }
            }
            ending = Some(tsc::now().wrapping_add(w.end_ticks));
        }
        if let Some(deadline) = ending {
            let left = w
                .streams
                .iter()
                .filter_map(|s| s.tgen.as_ref())
                .any(|g| g.end_left > 0);
            if !left || tsc::now() >= deadline {
                ending = None;
                w.gen_acks.fetch_add(1, Ordering::Release);
            }
        }
        if let Some(ex) = w.exchange.as_deref() {
            let now = tsc::now();
            if now >= next_publish {
                for l in w.streams.iter_mut().filter_map(|s| s.lat.as_mut()) {
                    l.publish(ex);
                }
                next_publish = now.wrapping_add(w.publish_ticks);
            }
        }
        for s in w.streams.iter_mut() {
            match s.mode {
                Mode::TxOnly => {
                    let (Some(tx), Some(g)) = (s.tx.as_mut(), s.tgen.as_mut()) else {
                        continue;
                    };
                    if !generating {
                        // One end marker per pass until all are out. One the port does not
                        // take is not a drop (it is no traffic): it is built again next pass.
                        if ending.is_some()
                            && g.end_left > 0
                            && w.cache.local(|c| c.alloc_bulk(&mut burst, 1))
                        {
                            let now = tsc::now();
                            for m in burst.iter_mut() {
                                g.build_end(m, now);
                            }
                            let drops = tx.stats().read().drops;
                            if tx.tx_burst(&mut burst) > 0 {
                                g.end_left -= 1;
                                g.end_sent += 1;
                            } else if tx.stats().read().drops > drops {
                                // Taken and dropped by the port (counted there): like a loss on
                                // the wire, the next copy may make it.
                                g.end_left -= 1;
                                g.end_sent += 1;
                                g.end_dropped += 1;
                            }
                            w.cache.local(|c| c.free_burst(&mut burst));
                        }
                        continue;
                    }
                    let now = if g.bucket.is_some() || g.stamp.is_some() {
                        tsc::now()
                    } else {
                        0
                    };
                    let n = match g.bucket.as_mut() {
                        Some(b) => b.available(now).min(w.burst),
                        None => w.burst,
                    };
                    if n == 0 || !w.cache.local(|c| c.alloc_bulk(&mut burst, n)) {
                        continue;
                    }
                    if let Some(b) = g.bucket.as_mut() {
                        b.consume(n);
                    }
                    for m in burst.iter_mut() {
                        g.build(m, now);
                    }
                    send_or_drop(tx.as_mut(), &mut burst, &mut w.cache);
                }
                Mode::RxOnly => {
                    let Some(rx) = s.rx.as_mut() else { continue };
                    if rx.rx_burst(&mut burst) > 0 {
                        if let Some(l) = s.lat.as_mut() {
                            l.on_burst(burst.as_slice(), tsc::now());
                        }
                        w.cache.local(|c| c.free_burst(&mut burst));
                    }
                }
                Mode::IcmpEcho => {
                    let (Some(rx), Some(tx), Some(held)) =
                        (s.rx.as_mut(), s.tx.as_mut(), s.held.as_mut())
                    else {
                        continue;
                    };
                    if !held.pkts.is_empty() {
                        held.retry(tx.as_mut(), &mut w.cache);
                    }
                    if rx.rx_burst(&mut burst) == 0 {
                        continue;
                    }
                    let (cache, mac) = (&mut w.cache, s.src_mac);
                    let (mut ignored, mut over) = (0u64, 0u64);
                    let was_empty = held.pkts.is_empty();
                    cache.local(|cache| {
                        burst.drain_front(burst.len(), |mut m| {
                            if !packet::icmpecho(m.data_mut(), mac) {
                                ignored += 1;
                                cache.free(m);
                            } else if let Err(m) = held.pkts.push(m) {
                                // Held replies fill the queue: this one is dropped.
                                over += 1;
                                cache.free(m);
                            }
                        });
                    });
                    if ignored > 0 {
                        rx.stats().add_drops(ignored);
                    }
                    if over > 0 {
                        tx.stats().add_drops(over);
                    }
                    if was_empty && !held.pkts.is_empty() {
                        tx.tx_burst(&mut held.pkts);
                        if !held.pkts.is_empty() {
                            held.deadline = tsc::now().wrapping_add(held.hold_ticks);
                        }
                    }
                }
                Mode::Io | Mode::Mac | Mode::MacSwap => {
                    let Some(rx) = s.rx.as_mut() else { continue };
                    if rx.rx_burst(&mut burst) == 0 {
                        continue;
                    }
                    if let Some(l) = s.lat.as_mut() {
                        l.on_burst(burst.as_slice(), tsc::now());
                    }
                    match s.mode {
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
                            w.cache.local(|c| c.free_burst(&mut burst));
                        }
                    }
                }
            }
        }
    }
    if generating || ending.is_some() {
        // Stopped without a drain (signal): still acknowledge.
        w.gen_acks.fetch_add(1, Ordering::Release);
    }
    // Replies still held when the lcore stops are dropped, and counted.
    for s in w.streams.iter_mut() {
        if let (Some(h), Some(tx)) = (s.held.as_mut(), s.tx.as_mut())
            && !h.pkts.is_empty()
        {
            tx.stats().add_drops(h.pkts.len() as u64);
            w.cache.local(|c| c.free_burst(&mut h.pkts));
        }
    }
    mempool::release_local_caches();
    // Off the hot path from here: hand back what the main thread reports.
    LcoreResult {
        tx_seqs: w
            .streams
            .iter()
            .filter_map(|s| s.tgen.as_ref())
            .filter_map(|g| {
                g.stamp.map(|id| TxSeq {
                    id,
                    next: g.seq,
                    end_sent: g.end_sent,
                    end_dropped: g.end_dropped,
                })
            })
            .collect(),
        lats: w.streams.iter_mut().filter_map(|s| s.lat.take()).collect(),
    }
}

/// Stops the generators, waits until each lcore with one has acknowledged (its end markers
/// sent), then, if anything here receives, until the receive counters stop moving (everything
/// in flight arrived). Returns whether both happened (within a second each).
fn drain(
    stop: &StopFlag,
    lcores: &lcore::Lcores<Option<LcoreResult>>,
    ports: &[Box<dyn Port>],
    gen_stop: &AtomicBool,
    gen_acks: &AtomicUsize,
    gen_lcores: usize,
    receivers: bool,
) -> bool {
    gen_stop.store(true, Ordering::Relaxed);
    let give_up = Instant::now() + Duration::from_secs(1);
    while gen_acks.load(Ordering::Acquire) < gen_lcores {
        if Instant::now() >= give_up || stop.is_stopped() || lcores.all_finished() {
            return false;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    if !receivers {
        return true;
    }
    let rx_total = || ports.iter().map(|p| p.stats().rx.packets).sum::<u64>();
    let give_up = Instant::now() + Duration::from_secs(1);
    let (mut last, mut still) = (rx_total(), 0);
    while still < 3 {
        if Instant::now() >= give_up || stop.is_stopped() {
            return false;
        }
        std::thread::sleep(Duration::from_millis(10));
        let now = rx_total();
        still = if now == last { still + 1 } else { 0 };
        last = now;
    }
    true
}

/// Merges the interval histograms lcores handed over into the per-port totals and gives the
/// emptied ones back.
fn merge_exchanges(exchanges: &[Arc<HistExchange>], agg: &mut [LatAgg]) {
    for ex in exchanges {
        while let Some((port, mut h)) = ex.full.pop() {
            if let Some(a) = agg.get_mut(port as usize) {
                let _ = a.hist.add(&*h);
            }
            h.reset();
            let _ = ex.spare.push(h);
        }
    }
}

/// Live statistics: on a terminal one status line rewritten in place, otherwise plain lines.
struct LiveOut {
    to_stderr: bool,
    tty: bool,
    dirty: bool,
}

impl LiveOut {
    fn new(to_stderr: bool) -> LiveOut {
        let tty = if to_stderr {
            std::io::stderr().is_terminal()
        } else {
            std::io::stdout().is_terminal()
        };
        LiveOut {
            to_stderr,
            tty,
            dirty: false,
        }
    }

    fn line(&mut self, line: &str) {
        let text = if self.tty {
            // Back to the start of the line, the status, then clear what a longer one left.
            self.dirty = true;
            format!("\r{line}\x1b[K")
        } else {
            format!("{line}\n")
        };
        if self.to_stderr {
            let mut e = std::io::stderr().lock();
            let _ = e.write_all(text.as_bytes());
            let _ = e.flush();
        } else {
            let mut o = std::io::stdout().lock();
            let _ = o.write_all(text.as_bytes());
            let _ = o.flush();
        }
    }

    /// Ends the status line so what follows starts on a line of its own.
    fn finish(&mut self) {
        if self.dirty {
            self.dirty = false;
            if self.to_stderr {
                eprintln!();
            } else {
                println!();
            }
        }
    }
}

impl Held {
    /// Offers the held replies again; once the oldest has waited its time, drops what is left.
    #[cold]
    fn retry(&mut self, tx: &mut dyn TxQueue, cache: &mut MempoolCache) {
        let before = self.pkts.len();
        tx.tx_burst(&mut self.pkts);
        if self.pkts.is_empty() {
            return;
        }
        let now = tsc::now();
        if self.pkts.len() < before {
            // Progress: the new oldest gets its own time.
            self.deadline = now.wrapping_add(self.hold_ticks);
        } else if now >= self.deadline {
            tx.stats().add_drops(self.pkts.len() as u64);
            cache.local(|c| c.free_burst(&mut self.pkts));
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
        cache.local(|c| c.free_burst(pkts));
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
    let at = at.as_secs_f64();
    let mut s = match total {
        Some(t) => format!("[{at:>6.1}s/{t:.0}s, {:.1}s left]", (t - at).max(0.0)),
        None => format!("[{at:>6.1}s]"),
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
    (agg, tx_lat): (&[LatAgg], &[(u64, u64, u64)]),
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
            let mut v = json!({
                "port": i,
                "mode": args.mode.for_port(i).as_str(),
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
            });
            let receives = matches!(
                args.mode.for_port(i),
                Mode::RxOnly | Mode::Io | Mode::Mac | Mode::MacSwap
            );
            if let Some(a) = agg.get(i).filter(|_| receives) {
                v["latency"] = latency_json(a);
            }
            if args.latency && args.mode.for_port(i) == Mode::TxOnly {
                let (stamped, sent, dropped) = tx_lat.get(i).copied().unwrap_or_default();
                v["latency_tx"] = json!({
                    "stamped": stamped,
                    "end_markers": sent,
                    "end_markers_dropped": dropped,
                });
            }
            v
        })
        .collect();
    let seg = pool.zone().segment();
    json!({
        "mode": args.mode.label(),
        "cores": cpus,
        "burst": args.burst,
        "pkt_size": match args.pkt_size {
            SizeSpec::Fixed(n) => json!(n),
            other => json!(other.label()),
        },
        "pkt_size_min": args.pkt_size.min(),
        "pkt_size_max": args.pkt_size.max(),
        "flows": args.flows,
        "rate_mpps": args.rate,
        "latency": args.latency,
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

/// One port's latency and loss figures (nanoseconds).
fn latency_json(a: &LatAgg) -> Value {
    let h = &a.hist;
    let q = |x: f64| {
        if h.is_empty() {
            0
        } else {
            h.value_at_quantile(x)
        }
    };
    json!({
        "packets": a.stamped,
        "min_ns": if h.is_empty() { 0 } else { h.min() },
        "mean_ns": if h.is_empty() { 0.0 } else { h.mean() },
        "p50_ns": q(0.5),
        "p99_ns": q(0.99),
        "p999_ns": q(0.999),
        "max_ns": if h.is_empty() { 0 } else { h.max() },
        "lost": a.lost,
        "lost_tail": a.lost_tail,
        "ended_streams": a.ended,
        "reordered": a.reordered,
        "foreign": a.foreign,
        "flows": a.flow_count(),
        "min_size": if a.stamped == 0 { 0 } else { a.min_size },
        "max_size": a.max_size,
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
        let l = &p["latency"];
        if l.is_object() && l["packets"].as_u64().unwrap_or(0) > 0 {
            let us = |k: &str| l[k].as_u64().unwrap_or(0) as f64 / 1e3;
            println!(
                "port {} latency: {} stamped pkts, p50 {:.2} us p99 {:.2} us p99.9 {:.2} us max {:.2} us | lost {} reordered {} | {} flows, {}..={} bytes",
                p["port"],
                l["packets"],
                us("p50_ns"),
                us("p99_ns"),
                us("p999_ns"),
                us("max_ns"),
                l["lost"],
                l["reordered"],
                l["flows"],
                l["min_size"],
                l["max_size"],
            );
        }
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

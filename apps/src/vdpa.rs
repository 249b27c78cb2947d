//! `vdpakit vdpa`: binds vDPA devices to vhost-user sockets (like DPDK's examples/vdpa).
//!
//! Each `--device SPEC` creates one or more devices (a `sim` with `vfs=N` gives N); with
//! `--iface PREFIX` every device gets a socket `PREFIX0`, `PREFIX1`, ... in order, and the QEMU
//! command line for each is printed. `-i` reads commands from stdin: `list`, `create SOCK DEV`,
//! `stats DEV QID`, `quit`. The process runs until Ctrl-C, `quit`, end of input in interactive
//! mode, or `--duration`.

use std::collections::BTreeMap;
use std::io::BufRead;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use clap::Args;
use vdpakit_core::lcore::StopFlag;
use vdpakit_core::vdpa::binding::{SharedDevice, lock};
use vdpakit_core::vdpa::{VdpaDevice, VqStats};
use vdpakit_core::vhost::device::NetConfig;
use vdpakit_core::vhost::server::{Server, ServerConfig};

use crate::error::{Error, Result};

/// `vdpakit vdpa` arguments.
#[derive(Debug, Args)]
pub struct VdpaArgs {
    /// A device to create: `sim:name=NAME,vfs=N,wire=loop|cable|tap:IF|rep,queues=N,mac=..,mtu=..`
    /// (repeatable; `vdpakit vdpa --list-kinds` shows every kind).
    #[arg(long = "device", value_name = "SPEC")]
    devices: Vec<String>,
    /// Socket path prefix: device k (in creation order) gets PREFIX<k>.
    #[arg(long, value_name = "PREFIX")]
    iface: Option<String>,
    /// Connect to the sockets (QEMU listens, `server=on`) instead of listening.
    #[arg(long)]
    client: bool,
    /// Interactive: read `list`, `create SOCK DEV`, `stats DEV QID`, `quit` from stdin.
    #[arg(short = 'i', long)]
    interactive: bool,
    /// Stop after this many seconds.
    #[arg(long, value_name = "SECONDS")]
    duration: Option<f64>,
    /// Print every device's counters every N seconds.
    #[arg(long, value_name = "SECONDS")]
    stats_period: Option<f64>,
    /// List the device kinds and exit.
    #[arg(long)]
    list_kinds: bool,
    /// At exit, print every device's counters as one JSON object on stdout.
    #[arg(long)]
    json: bool,
}

/// What a `--device` spec creates.
pub type Devices = Vec<Box<dyn VdpaDevice>>;

/// A device kind `--device` accepts.
pub struct DeviceKind {
    /// Prefix of the spec (`sim`).
    pub name: &'static str,
    /// One line about it.
    pub about: &'static str,
    /// Creates the devices of a spec (the part after `NAME:`).
    pub create: fn(&str) -> Result<Devices>,
}

/// The device kinds this build knows.
pub fn kinds() -> Vec<DeviceKind> {
    vec![
        DeviceKind {
            name: "ifc",
            about: vdpakit_pmd_ifc::DEVICE_ABOUT,
            create: |p| Ok(vdpakit_pmd_ifc::create_devices(p)?),
        },
        DeviceKind {
            name: "virtio",
            about: vdpakit_pmd_virtio::DEVICE_ABOUT,
            create: |p| Ok(vdpakit_pmd_virtio::create_devices(p)?),
        },
        DeviceKind {
            name: "eni",
            about: vdpakit_pmd_eni::DEVICE_ABOUT,
            create: |p| Ok(vdpakit_pmd_eni::create_devices(p)?),
        },
        DeviceKind {
            name: "sim",
            about: "software vDPA device (like Linux vdpa_sim): N VFs whose wires are loop, cable, \
                    tap:IFNAME or rep (keys: name, vfs, wire, queues, mac, mtu, log, filter, poll, queue_size)",
            create: create_sim,
        },
        DeviceKind {
            name: "mlx5",
            about: "NVIDIA ConnectX-6/7, BlueField vDPA function: mlx5:pci=BDF (bound to vfio-pci) or \
                    its model mlx5:model (keys: queues, queue_size, event_mode=msix|poll, mac, mtu, \
                    hw_latency_mode, hw_max_latency_us, hw_max_pending_comp; model: wire=loop|port)",
            create: create_mlx5,
        },
    ]
}

fn create_sim(params: &str) -> Result<Devices> {
    Ok(vdpakit_core::model::sim::create(params)?)
}

fn create_mlx5(params: &str) -> Result<Devices> {
    vdpakit_pmd_mlx5::create(params).map_err(|e| Error::Runtime(e.to_string()))
}

pub(crate) fn create(spec: &str) -> Result<Devices> {
    let (kind, params) = spec.split_once(':').unwrap_or((spec, ""));
    let all = kinds();
    let Some(k) = all.iter().find(|k| k.name == kind) else {
        let names: Vec<&str> = all.iter().map(|k| k.name).collect();
        return Err(Error::Usage {
            flag: "--device",
            value: spec.to_string(),
            accepted: format!("a spec starting with one of: {}", names.join(", ")),
        });
    };
    (k.create)(params)
}

/// Serves `d` on a vhost-user socket at `sock` through the vDPA binding (features, queue pairs
/// and MTU from the device; packed and mergeable buffers allowed; host notifiers offered).
pub(crate) fn serve(d: &SharedDevice, sock: &str, client: bool) -> Result<Server> {
    let (pairs, mtu) = {
        let g = lock(d);
        let c = g.net_config();
        (g.max_queue_pairs().max(1), c.mtu.max(68))
    };
    let net = NetConfig {
        queue_pairs: pairs,
        packed: true,
        mrg_rxbuf: true,
        in_order: false,
        in_order_batch: false,
        mtu,
        host_notifier: true,
        iommu: false,
    };
    Server::start(ServerConfig {
        path: PathBuf::from(sock),
        client,
        net,
        vdpa: Some(Arc::clone(d)),
    })
    .map_err(|e| Error::Runtime(format!("{sock}: {e}")))
}

struct Bound {
    server: Server,
}

struct App {
    devices: BTreeMap<String, SharedDevice>,
    order: Vec<String>,
    bound: BTreeMap<String, Bound>,
    client: bool,
}

impl App {
    fn create_socket(&mut self, sock: &str, dev: &str) -> Result<()> {
        let Some(d) = self.devices.get(dev) else {
            return Err(Error::Usage {
                flag: "device",
                value: dev.to_string(),
                accepted: format!("one of: {}", self.order.join(", ")),
            });
        };
        if self.bound.contains_key(dev) {
            return Err(Error::Runtime(format!(
                "{dev} is already bound to a socket"
            )));
        }
        let server = serve(d, sock, self.client)?;
        let pairs = lock(d).max_queue_pairs().max(1);
        println!("{dev}: vhost-user socket {sock}");
        println!(
            "  qemu-system-x86_64 ... -object memory-backend-memfd,id=mem,size=1G,share=on \
             -machine q35,memory-backend=mem -chardev socket,id=c{n},path={sock}{srv} \
             -netdev vhost-user,id=n{n},chardev=c{n}{q} -device virtio-net-pci,netdev=n{n},page-per-vq=on{mq}",
            n = self.bound.len(),
            srv = if self.client { ",server=on" } else { "" },
            q = if pairs > 1 {
                format!(",queues={pairs}")
            } else {
                String::new()
            },
            mq = if pairs > 1 {
                format!(",mq=on,vectors={}", 2 * pairs + 2)
            } else {
                String::new()
            },
        );
        self.bound.insert(dev.to_string(), Bound { server });
        Ok(())
    }

    fn list(&self) {
        println!(
            "{:<16} {:<6} {:>6} {:<18} socket",
            "device", "type", "pairs", "features"
        );
        for name in &self.order {
            let d = &self.devices[name];
            let g = lock(d);
            let sock = self
                .bound
                .get(name)
                .map_or("-".to_string(), |b| b.server.path().display().to_string());
            println!(
                "{:<16} {:<6} {:>6} {:<#18x} {}",
                name,
                "net",
                g.max_queue_pairs(),
                g.features(),
                sock
            );
        }
    }

    fn stats(&self, dev: &str, qid: Option<u16>) -> Result<()> {
        let Some(d) = self.devices.get(dev) else {
            return Err(Error::Usage {
                flag: "device",
                value: dev.to_string(),
                accepted: format!("one of: {}", self.order.join(", ")),
            });
        };
        let g = lock(d);
        let n = g.max_queue_pairs() * 2;
        let qids: Vec<u16> = match qid {
            Some(q) if q < n => vec![q],
            Some(q) => {
                return Err(Error::Usage {
                    flag: "queue",
                    value: q.to_string(),
                    accepted: format!("0..{n}"),
                });
            }
            None => (0..n).collect(),
        };
        let relay = self.bound.get(dev).and_then(|b| b.server.binding_stats());
        for q in qids {
            let s: VqStats = g.stats(q).map_err(|e| Error::Runtime(e.to_string()))?;
            let relayed = relay
                .and_then(|r| r.relayed_kicks.get(q as usize))
                .map_or(0, |c| c.load(Ordering::Relaxed));
            println!(
                "{dev} q{q}: packets {} bytes {} errors {} dropped {} iommu_faults {} kicks {} interrupts {} relayed_kicks {}",
                s.packets,
                s.bytes,
                s.errors,
                s.dropped,
                s.iommu_faults,
                s.kicks,
                s.interrupts,
                relayed
            );
        }
        Ok(())
    }

    fn summary(&self) -> serde_json::Value {
        let mut devs = Vec::new();
        for name in &self.order {
            let g = lock(&self.devices[name]);
            let relay = self.bound.get(name).and_then(|b| b.server.binding_stats());
            let queues: Vec<serde_json::Value> = (0..g.max_queue_pairs() * 2)
                .map(|q| {
                    let s = g.stats(q).unwrap_or_default();
                    let relayed = relay
                        .and_then(|r| r.relayed_kicks.get(q as usize))
                        .map_or(0, |c| c.load(Ordering::Relaxed));
                    serde_json::json!({
                        "queue": q, "packets": s.packets, "bytes": s.bytes, "errors": s.errors,
                        "dropped": s.dropped, "iommu_faults": s.iommu_faults, "kicks": s.kicks,
                        "interrupts": s.interrupts, "relayed_kicks": relayed,
                    })
                })
                .collect();
            devs.push(serde_json::json!({
                "name": name,
                "socket": self.bound.get(name).map(|b| b.server.path().display().to_string()),
                "configures": relay.map_or(0, |r| r.configures.load(Ordering::Relaxed)),
                "host_notifiers": relay.map_or(0, |r| r.host_notifiers.load(Ordering::Relaxed)),
                "queues": queues,
            }));
        }
        serde_json::json!({ "devices": devs })
    }

    fn command(&mut self, line: &str) -> Result<bool> {
        let w: Vec<&str> = line.split_whitespace().collect();
        match w.as_slice() {
            [] => {}
            ["list"] => self.list(),
            ["create", sock, dev] => self.create_socket(sock, dev)?,
            ["stats", dev] => self.stats(dev, None)?,
            ["stats", dev, q] => {
                let q: u16 = q.parse().map_err(|_| Error::Usage {
                    flag: "queue",
                    value: q.to_string(),
                    accepted: "a queue number".into(),
                })?;
                self.stats(dev, Some(q))?
            }
            ["quit"] | ["exit"] => return Ok(false),
            ["help"] => println!("commands: list | create SOCK DEV | stats DEV [QID] | quit"),
            _ => {
                return Err(Error::Usage {
                    flag: "command",
                    value: line.trim().to_string(),
                    accepted: "list, create SOCK DEV, stats DEV [QID], quit".into(),
                });
            }
        }
        Ok(true)
    }
}

/// Runs `vdpakit vdpa`.
pub fn run(args: VdpaArgs) -> Result<()> {
    if args.list_kinds {
        for k in kinds() {
            println!("{:<8} {}", k.name, k.about);
        }
        return Ok(());
    }
    if args.devices.is_empty() {
        return Err(Error::Usage {
            flag: "--device",
            value: "(none)".into(),
            accepted: "at least one --device SPEC (see --list-kinds)".into(),
        });
    }
    if args.iface.is_none() && !args.interactive {
        return Err(Error::Usage {
            flag: "--iface",
            value: "(none)".into(),
            accepted: "a socket path prefix, or -i to create sockets interactively".into(),
        });
    }
    for (flag, v) in [
        ("--duration", args.duration),
        ("--stats-period", args.stats_period),
    ] {
        if let Some(v) = v
            && !(v.is_finite() && v > 0.0)
        {
            return Err(Error::Usage {
                flag,
                value: v.to_string(),
                accepted: "a positive number of seconds".into(),
            });
        }
    }
    let mut app = App {
        devices: BTreeMap::new(),
        order: Vec::new(),
        bound: BTreeMap::new(),
        client: args.client,
    };
    for spec in &args.devices {
        for d in create(spec)? {
            let name = d.name().to_string();
            if app.devices.contains_key(&name) {
                return Err(Error::Usage {
                    flag: "--device",
                    value: spec.clone(),
                    accepted: format!("devices with distinct names ({name} exists already)"),
                });
            }
            app.order.push(name.clone());
            app.devices.insert(name, Arc::new(std::sync::Mutex::new(d)));
        }
    }
    if let Some(prefix) = &args.iface {
        let order = app.order.clone();
        for (k, name) in order.iter().enumerate() {
            app.create_socket(&format!("{prefix}{k}"), name)?;
        }
    }
    let stop = StopFlag::new();
    stop.install_signal_handlers()?;
    let start = Instant::now();
    let deadline = args.duration.map(|d| start + Duration::from_secs_f64(d));
    // Interactive commands arrive on a reader thread so the stop flag and the deadline are
    // still honoured while stdin is quiet.
    let (tx, rx) = std::sync::mpsc::channel::<Option<String>>();
    if args.interactive {
        std::thread::Builder::new()
            .name("vdpa-cli".into())
            .spawn(move || {
                let stdin = std::io::stdin();
                for line in stdin.lock().lines() {
                    let Ok(l) = line else { break };
                    if tx.send(Some(l)).is_err() {
                        return;
                    }
                }
                let _ = tx.send(None);
            })
            .map_err(|e| Error::Runtime(format!("stdin thread: {e}")))?;
    }
    let mut next_stats = args
        .stats_period
        .map(|p| Instant::now() + Duration::from_secs_f64(p));
    loop {
        if stop.is_stopped() || deadline.is_some_and(|d| Instant::now() >= d) {
            break;
        }
        if let Some(t) = next_stats
            && Instant::now() >= t
        {
            for name in app.order.clone() {
                if let Err(e) = app.stats(&name, None) {
                    eprintln!("error: {e}");
                }
            }
            next_stats = args
                .stats_period
                .map(|p| Instant::now() + Duration::from_secs_f64(p));
        }
        match rx.recv_timeout(Duration::from_millis(100)) {
            Ok(Some(line)) => match app.command(&line) {
                Ok(true) => {}
                Ok(false) => break,
                Err(e) => eprintln!("error: {e}"),
            },
            Ok(None) => break,
            Err(_) => {}
        }
    }
    // Sockets first (each closes its device), then the devices.
    let summary = app.summary();
    app.bound.clear();
    if args.json {
        println!("{summary}");
    }
    Ok(())
}

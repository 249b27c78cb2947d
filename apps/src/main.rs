//! `vdpakit`: the command-line front of vdpakit.

mod devices;
mod error;
mod fwd;
mod tgen;
mod vdpa;

use std::io::IsTerminal;

use clap::{Parser, Subcommand};
use tracing_subscriber::EnvFilter;

/// vdpakit: a polled userspace dataplane for vDPA SmartNICs.
#[derive(Debug, Parser)]
#[command(name = "vdpakit", version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Forward packets between ports on pinned cores (like dpdk-testpmd).
    Fwd(Box<fwd::FwdArgs>),
    /// List the port kinds and their keys.
    Ports,
    /// Bind vDPA devices to vhost-user sockets (like DPDK's examples/vdpa).
    Vdpa(vdpa::VdpaArgs),
    /// PCI functions a PMD can drive: list, bind/unbind to vfio-pci, device models, probe.
    Devices(devices::DevicesArgs),
}

fn main() {
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            use clap::error::ErrorKind;
            if matches!(e.kind(), ErrorKind::DisplayHelp | ErrorKind::DisplayVersion) {
                let _ = e.print();
                std::process::exit(0);
            }
            // One line: clap's first line names the value and what is wrong.
            let text = e.render().to_string();
            let msg: Vec<&str> = text
                .lines()
                .take_while(|l| !l.starts_with("Usage:") && !l.starts_with("For more information"))
                .map(str::trim)
                .filter(|l| !l.is_empty())
                .collect();
            let msg = msg.join(" ");
            let msg = msg.strip_prefix("error: ").unwrap_or(&msg);
            eprintln!("error: {msg} (see 'vdpakit --help')");
            std::process::exit(2);
        }
    };
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_env("VDPAKIT_LOG").unwrap_or_else(|_| EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .with_target(false)
        .without_time()
        .init();
    // PMD port kinds (virtio:pci=BDF, ...) live in PMD crates, which core cannot name: they
    // join the port registry here, before any spec is parsed.
    if let Err(e) = vdpakit_core::port::register(&[
        vdpakit_pmd_virtio::PORT_KIND,
        vdpakit_pmd_ifc::PORT_KIND,
        vdpakit_pmd_eni::PORT_KIND,
        vdpakit_pmd_mlx5::PORT_KIND,
    ]) {
        eprintln!("error: {e}");
        std::process::exit(1);
    }
    let res = match cli.cmd {
        Cmd::Fwd(args) => fwd::run(*args),
        Cmd::Vdpa(args) => vdpa::run(args),
        Cmd::Devices(args) => devices::run(args),
        Cmd::Ports => {
            for k in vdpakit_core::port::kinds() {
                println!("{:<8} {}", k.name, k.about);
                for (key, about) in k.keys {
                    println!("    {key:<9} {about}");
                }
            }
            Ok(())
        }
    };
    if let Err(e) = res {
        eprintln!("error: {e}");
        std::process::exit(e.exit_code());
    }
}

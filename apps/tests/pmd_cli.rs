//! The PMDs with `fwd` ports (`virtio`, `ifc`, `eni`, `mlx5`) from the command line, over their device
//! models: port kinds and device kinds listed, `vdpakit fwd` between two cabled model functions
//! with exact counts, and bad input as one `error:` line with exit status 2.

use std::process::{Command, Output};

use serde_json::Value;

fn vdpakit(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_vdpakit"))
        .args(args)
        .env("VDPAKIT_LOG", "error")
        .output()
        .unwrap()
}

fn one_error(args: &[&str]) -> String {
    let out = vdpakit(args);
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    assert_eq!(out.status.code(), Some(2), "{args:?}: {err}");
    let lines: Vec<&str> = err.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "one line: {err}");
    assert!(lines[0].starts_with("error: "), "{err}");
    lines[0].to_string()
}

#[test]
fn kinds_are_listed() {
    let out = vdpakit(&["ports"]);
    let s = String::from_utf8_lossy(&out.stdout);
    for k in ["virtio", "ifc", "eni", "mlx5"] {
        assert!(s.lines().any(|l| l.starts_with(k)), "port kind {k}: {s}");
    }
    assert!(
        s.contains("sw-live-migration") || s.contains("force"),
        "{s}"
    );
    let out = vdpakit(&["vdpa", "--list-kinds"]);
    let s = String::from_utf8_lossy(&out.stdout);
    for k in ["virtio", "ifc", "eni"] {
        assert!(s.contains(k), "device kind {k}: {s}");
    }
}

fn fwd_pair(a: &str, b: &str) -> Value {
    let out = vdpakit(&[
        "fwd",
        "--port",
        a,
        "--port",
        b,
        "--mode",
        "txonly,rxonly",
        "--cores",
        "0",
        "--rate",
        // Slow enough that a 256-entry ring (the legacy model's fixed size) never fills on a
        // busy 2-core machine: exact counts.
        "0.005",
        "--duration",
        "2",
        "--linger",
        "1",
        "--rxd",
        "512",
        "--txd",
        "512",
        "--json",
    ]);
    assert!(
        out.status.success(),
        "{a} {b}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("json")
}

#[test]
fn fwd_between_cabled_model_functions_is_exact() {
    for (a, b) in [
        (
            "virtio:model=cli-v,vfs=2,wire=cable",
            "virtio:model=cli-v,vf=1",
        ),
        ("ifc:model=cli-i,vfs=2,wire=cable", "ifc:model=cli-i,vf=1"),
        (
            "eni:model=cli-e,vfs=2,wire=cable,iova=va",
            "eni:model=cli-e,vf=1,iova=va",
        ),
        // Queue objects over vdpakit's rings, steered by the model's flow table (promiscuous:
        // the generator's destination is not the function's MAC).
        ("mlx5:model=cli-m,wire=cable", "mlx5:model=cli-m,vf=1"),
        (
            "mlx5:model,name=cli-mb,wire=cable,packed=1",
            "mlx5:model,name=cli-mb,vf=1,packed=1",
        ),
    ] {
        let v = fwd_pair(a, b);
        let tx = v["ports"][0]["tx_packets"].as_u64().unwrap();
        let rx = v["ports"][1]["rx_packets"].as_u64().unwrap();
        assert!(tx > 1000, "{a}: {v}");
        assert_eq!(tx, rx, "{a}: every frame sent arrived: {v}");
        assert_eq!(v["ports"][0]["tx_dropped"], 0, "{v}");
    }
}

#[test]
fn bare_model_specs_create_the_whole_stack() {
    let out = vdpakit(&[
        "vdpa",
        "--device",
        "ifc:model,name=cli-bare,vfs=2,wire=cable",
        "--iface",
        "/tmp/vk-cli-bare",
        "--duration",
        "0.5",
    ]);
    let s = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        s.contains("model:cli-bare-f0: vhost-user socket /tmp/vk-cli-bare0")
            && s.contains("model:cli-bare-f1: vhost-user socket /tmp/vk-cli-bare1"),
        "{s}"
    );
}

#[test]
fn bad_specs_are_one_line_with_exit_2() {
    let e = one_error(&["fwd", "--port", "virtio:pci=zz:zz", "--duration", "1"]);
    assert!(e.contains("zz:zz") && e.contains("DDDD:BB:DD.F"), "{e}");
    let e = one_error(&[
        "fwd",
        "--port",
        "virtio:model=x,fault=bogus",
        "--duration",
        "1",
    ]);
    assert!(
        e.contains("fault='bogus'") && e.contains("stuck-reset"),
        "{e}"
    );
    let e = one_error(&["fwd", "--port", "ifc:model=x,colour=red", "--duration", "1"]);
    assert!(e.contains("colour"), "{e}");
    let e = one_error(&[
        "vdpa",
        "--device",
        "virtio:model=cli-refuse,fault=refuse-vectors",
        "--iface",
        "/tmp/vk-cli-refuse",
        "--duration",
        "1",
    ]);
    assert!(
        e.contains("model:cli-refuse-f0")
            && e.contains("queue_msix_vector")
            && e.contains("0xffff"),
        "{e}"
    );
    let e = one_error(&[
        "vdpa",
        "--device",
        "virtio:irq_vectors=2",
        "--iface",
        "/tmp/vk-cli-nopci",
        "--duration",
        "1",
    ]);
    assert!(e.contains("pci=BDF") && e.contains("model=NAME"), "{e}");
}

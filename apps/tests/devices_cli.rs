//! `vdpakit devices` against a fake sysfs tree (the hidden `--sysfs` root): listing and PMD
//! marking, JSON, the models hook, and bad input.

use std::fs;
use std::os::unix::fs::symlink;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn vdpakit(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_vdpakit"))
        .args(args)
        .env("VDPAKIT_LOG", "error")
        .output()
        .unwrap()
}

struct Tree(PathBuf);

impl Drop for Tree {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

fn func(root: &Path, bdf: &str, ids: &str, sub: &str, driver: Option<&str>, group: Option<u32>) {
    let d = root.join("bus/pci/devices").join(bdf);
    fs::create_dir_all(&d).unwrap();
    let (v, dv) = ids.split_once(':').unwrap();
    let (sv, sd) = sub.split_once(':').unwrap();
    for (f, val) in [
        ("vendor", format!("0x{v}")),
        ("device", format!("0x{dv}")),
        ("subsystem_vendor", format!("0x{sv}")),
        ("subsystem_device", format!("0x{sd}")),
        ("class", "0x020000".into()),
        ("numa_node", "-1".into()),
    ] {
        fs::write(d.join(f), format!("{val}\n")).unwrap();
    }
    if let Some(drv) = driver {
        let t = root.join("bus/pci/drivers").join(drv);
        fs::create_dir_all(&t).unwrap();
        symlink(&t, d.join("driver")).unwrap();
    }
    if let Some(g) = group {
        let gd = root.join(format!("kernel/iommu_groups/{g}"));
        fs::create_dir_all(gd.join("devices")).unwrap();
        symlink(&d, gd.join("devices").join(bdf)).unwrap();
        symlink(&gd, d.join("iommu_group")).unwrap();
    }
}

fn tree(tag: &str) -> Tree {
    let root = std::env::temp_dir().join(format!("vdpakit-devcli-{tag}-{}", std::process::id()));
    let _ = fs::remove_dir_all(&root);
    fs::create_dir_all(root.join("bus/pci/devices")).unwrap();
    func(
        &root,
        "0000:00:02.0",
        "8086:100e",
        "8086:001e",
        Some("e1000"),
        Some(1),
    );
    func(
        &root,
        "0000:00:03.0",
        "1af4:1041",
        "1af4:1100",
        Some("virtio-pci"),
        Some(2),
    );
    func(
        &root,
        "0000:3b:00.2",
        "15b3:101e",
        "15b3:0040",
        Some("mlx5_core"),
        Some(40),
    );
    func(
        &root,
        "0000:5e:00.1",
        "1af4:1041",
        "8086:001a",
        None,
        Some(41),
    );
    Tree(root)
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

#[test]
fn list_marks_the_pmd_and_hides_other_functions() {
    let t = tree("list");
    let root = t.0.to_str().unwrap();
    let o = vdpakit(&["devices", "--sysfs", root]);
    assert!(o.status.success(), "{o:?}");
    let s = stdout(&o);
    let line = |bdf: &str| {
        s.lines()
            .find(|l| l.starts_with(bdf))
            .unwrap_or("")
            .to_string()
    };
    assert!(
        line("0000:00:03.0").contains("virtio-pci") && line("0000:00:03.0").contains("virtio"),
        "{s}"
    );
    let mlx = line("0000:3b:00.2");
    let cols: Vec<&str> = mlx.split_whitespace().collect();
    assert!(
        cols.contains(&"mlx5_core") && cols.contains(&"mlx5") && cols.contains(&"40"),
        "{s}"
    );
    assert!(
        line("0000:5e:00.1").contains("ifc") && line("0000:5e:00.1").contains("none"),
        "{s}"
    );
    assert!(
        !s.contains("0000:00:02.0"),
        "the e1000 is not listed without --all: {s}"
    );
    let all = stdout(&vdpakit(&["devices", "list", "--all", "--sysfs", root]));
    assert!(
        all.contains("0000:00:02.0") && all.contains("e1000"),
        "{all}"
    );
}

#[test]
fn list_json() {
    let t = tree("json");
    let o = vdpakit(&[
        "devices",
        "list",
        "--json",
        "--sysfs",
        t.0.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{o:?}");
    let v: serde_json::Value = serde_json::from_str(stdout(&o).trim()).unwrap();
    let a = v.as_array().unwrap();
    assert_eq!(a.len(), 3);
    let ifc = a.iter().find(|e| e["bdf"] == "0000:5e:00.1").unwrap();
    assert_eq!(ifc["pmd"], "ifc");
    assert_eq!(ifc["iommu_group"], 41);
    assert_eq!(ifc["driver"], serde_json::Value::Null);
    assert_eq!(ifc["subsystem"], "8086:001a");
}

#[test]
fn bad_input_is_one_line_exit_2() {
    let t = tree("bad");
    let root = t.0.to_str().unwrap();
    for (args, needle) in [
        (
            vec!["devices", "bind", "00:3"],
            "invalid PCI address '00:3'",
        ),
        (
            vec!["devices", "probe", "zz:00.0"],
            "invalid PCI address 'zz:00.0'",
        ),
        (
            vec!["devices", "unbind", "0000:00:09.0"],
            "no PCI function 0000:00:09.0",
        ),
        (
            vec!["devices", "probe", "0000:00:03.0"],
            "not vfio-pci: run `vdpakit devices bind 0000:00:03.0`",
        ),
        (
            vec!["devices", "probe", "0000:00:03.0", "--iova", "0x123"],
            "invalid --iova 0x123",
        ),
    ] {
        let mut a = args.clone();
        a.extend(["--sysfs", root]);
        let o = vdpakit(&a);
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(2), "{a:?}: {err}");
        assert_eq!(err.lines().count(), 1, "{a:?}: {err}");
        assert!(
            err.starts_with("error: ") && err.contains(needle),
            "{a:?}: {err}"
        );
    }
}

#[test]
fn models_hook_prints_what_the_build_has() {
    let o = vdpakit(&["devices", "models"]);
    assert!(o.status.success(), "{o:?}");
    assert!(!stdout(&o).trim().is_empty());
}

//! The VFIO back end of `core::pci` on a real (emulated) IOMMU: a Linux 6.12 guest with QEMU's
//! intel-iommu and two modern virtio-net-pci functions (each behind its own PCIe root port, so in
//! its own IOMMU group) runs `vdpakit devices` inside: list, bind to vfio-pci, `probe` of one with
//! the other in the same DMA domain (open through `PciDevice::open_vfio`, capability walk, virtio structures,
//! common config through the BAR accessors, status reset, MSI-X loopback per vector, DMA map and
//! unmap of a hugepage, VFIO_DEVICE_RESET), then unbind.
//!
//! Custom harness (libtest-mimic): when guests cannot run here the case is reported as ignored
//! with one `SKIP name: reason` line, never as passed (`VMTEST_REQUIRE=1` turns that into a
//! failure).

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use libtest_mimic::{Arguments, Failed, Trial};
use vmtest::{Guest, VFIO_NIC_OPTS};

fn vdpakit() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_vdpakit"))
}

const SCRIPT: &str = r#"
set --
for d in /sys/bus/pci/devices/*; do
    if [ "$(cat $d/vendor)" = 0x1af4 ] && [ "$(cat $d/device)" = 0x1041 ]; then set -- "$@" "${d##*/}"; fi
done
[ $# = 2 ] || vmtest_fail "expected two modern virtio-net PCI functions, found: $*"
bdf=$1
bdf2=$2
vmtest_report bdf "$bdf"
vmtest_report bdf2 "$bdf2"
vmtest_report group2 "$(basename "$(readlink /sys/bus/pci/devices/$bdf2/iommu_group)")"
dev=/sys/bus/pci/devices/$bdf
group=$(basename "$(readlink "$dev/iommu_group")")
vmtest_report iommu_group "$group"
echo 8 > /proc/sys/vm/nr_hugepages
vmtest_report hugepages "$(cat /proc/sys/vm/nr_hugepages)"

/vdpakit devices list > /tmp/list.txt 2>&1 || vmtest_fail "devices list: $(cat /tmp/list.txt)"
cat /tmp/list.txt
vmtest_report list_line "$(grep "^$bdf" /tmp/list.txt)"

# Not bound yet: probe must refuse and say how to bind.
/vdpakit devices probe "$bdf" > /tmp/unbound.txt 2>&1
vmtest_report unbound_rc "$?"
vmtest_report unbound_error "$(grep '^error:' /tmp/unbound.txt)"

/vdpakit devices bind "$bdf" > /tmp/bind.txt 2>&1 || vmtest_fail "devices bind: $(cat /tmp/bind.txt)"
vmtest_report bind_out "$(cat /tmp/bind.txt)"
vmtest_report driver_bound "$(basename "$(readlink "$dev/driver")")"
/vdpakit devices bind "$bdf2" > /tmp/bind2.txt 2>&1 || vmtest_fail "devices bind $bdf2: $(cat /tmp/bind2.txt)"

VDPAKIT_LOG=debug /vdpakit devices probe "$bdf" --with "$bdf2" > /tmp/probe.txt 2>/tmp/probe.err
rc=$?
cat /tmp/probe.txt /tmp/probe.err
vmtest_report probe_rc "$rc"
sed -n 's/^\([a-z_0-9]*\): \(.*\)$/VMTEST probe_\1=\2/p' /tmp/probe.txt
vmtest_report probe_error "$(grep '^error:' /tmp/probe.err)"

/vdpakit devices unbind "$bdf" > /tmp/unbind.txt 2>&1 || vmtest_fail "devices unbind: $(cat /tmp/unbind.txt)"
vmtest_report unbind_out "$(cat /tmp/unbind.txt)"
vmtest_report driver_after "$(basename "$(readlink "$dev/driver")")"
"#;

fn guest_vfio_probe() -> Result<(), Failed> {
    let run = Guest::builder()
        .name("guest_vfio_probe")
        .memory_mb(512)
        .intel_iommu()
        // Behind a PCIe root port the function is PCI Express and has FLR, so
        // VFIO_DEVICE_RESET works (on the root bus it has no reset method).
        .qemu_args(&[
            "-device",
            "pcie-root-port,id=rp1,chassis=1,slot=1",
            "-device",
            &format!("virtio-net-pci,bus=rp1,romfile=,{VFIO_NIC_OPTS}"),
            // A second function in its own IOMMU group, opened in the same DMA domain.
            "-device",
            "pcie-root-port,id=rp2,chassis=2,slot=2",
            "-device",
            &format!("virtio-net-pci,bus=rp2,romfile=,{VFIO_NIC_OPTS}"),
        ])
        .modules(&[
            "irqbypass",
            "vfio",
            "vfio_iommu_type1",
            "vfio-pci-core",
            "vfio-pci",
        ])
        .binary(vdpakit(), "/vdpakit")
        .timeout(Duration::from_secs(120))
        .init_script(SCRIPT)
        .run()
        .map_err(|e| e.to_string())?;
    let m = |k: &str| run.marker(k).unwrap_or("").to_string();
    let fail = |why: String| -> Failed { format!("{why}\n{}", run.report()).into() };
    let bdf = m("bdf");
    let group = m("iommu_group");
    let check = |ok: bool, why: String| if ok { Ok(()) } else { Err(fail(why)) };

    check(
        m("list_line").contains("1af4:1041") && m("list_line").contains("virtio-pci"),
        format!("devices list line: {:?}", m("list_line")),
    )?;
    check(
        m("list_line").contains("virtio") && m("list_line").contains(&format!(" {group} ")),
        format!(
            "list line lacks the PMD or the group {group}: {:?}",
            m("list_line")
        ),
    )?;
    let unbound = m("unbound_error");
    check(
        m("unbound_rc") == "2"
            && unbound.contains("not vfio-pci")
            && unbound.contains(&format!("vdpakit devices bind {bdf}")),
        format!(
            "probe of an unbound function: rc {} {unbound:?}",
            m("unbound_rc")
        ),
    )?;
    check(
        m("driver_bound") == "vfio-pci" && m("bind_out").contains("virtio-pci -> vfio-pci"),
        format!("bind: {:?}, driver {}", m("bind_out"), m("driver_bound")),
    )?;
    check(
        m("probe_rc") == "0" && m("probe_result") == "ok",
        format!("probe failed: rc {} {}", m("probe_rc"), m("probe_error")),
    )?;
    check(
        m("probe_open").starts_with("vfio"),
        format!("open: {}", m("probe_open")),
    )?;
    for t in ["common", "notify", "isr", "device"] {
        let v = m(&format!("probe_virtio_{t}"));
        check(
            v.starts_with("bar "),
            format!("virtio {t} capability not found: {v:?}"),
        )?;
    }
    check(
        m("probe_num_queues").parse::<u16>().is_ok_and(|n| n >= 2),
        format!("num_queues {:?}", m("probe_num_queues")),
    )?;
    let features =
        u64::from_str_radix(m("probe_device_features").trim_start_matches("0x"), 16).unwrap_or(0);
    check(
        m("probe_version_1") == "yes" && features & (1 << 32) != 0,
        format!(
            "VERSION_1 (bit 32) missing: features {:?}",
            m("probe_device_features")
        ),
    )?;
    check(
        m("probe_status_after_reset") == "0x0"
            && m("probe_status_ack") == "0x1"
            && m("probe_status_final") == "0x0",
        format!(
            "status register: after reset {}, ack {}, final {}",
            m("probe_status_after_reset"),
            m("probe_status_ack"),
            m("probe_status_final")
        ),
    )?;
    check(
        m("probe_msix_vectors").parse::<u16>().is_ok_and(|n| n >= 3)
            && m("probe_msix_loopback") == "vector 2 -> its eventfd (others signalled: none)",
        format!(
            "MSI-X: {} vectors, loopback {:?}",
            m("probe_msix_vectors"),
            m("probe_msix_loopback")
        ),
    )?;
    check(
        m("probe_dma_map").starts_with("iova 0x100000000 len 0x200000 hugepage")
            && m("probe_dma_unmap") == "1 removed",
        format!(
            "DMA: map {:?}, unmap {:?}",
            m("probe_dma_map"),
            m("probe_dma_unmap")
        ),
    )?;
    check(
        m("probe_notify_area").starts_with("fd offset"),
        format!("notify area: {:?}", m("probe_notify_area")),
    )?;
    check(
        m("driver_after") == "virtio-pci" && m("unbind_out").contains("vfio-pci -> virtio-pci"),
        format!(
            "unbind: {:?}, driver after {}",
            m("unbind_out"),
            m("driver_after")
        ),
    )?;
    check(
        m("group2") != group
            && m("probe_domain_devices") == "2"
            && m("probe_dma_replayed_unmap") == "1 removed"
            && m("probe_with").starts_with(&format!("{} ids 1af4:1041", m("bdf2"))),
        format!(
            "one domain, two groups ({group}, {}): devices {:?}, replayed unmap {:?}, with {:?}",
            m("group2"),
            m("probe_domain_devices"),
            m("probe_dma_replayed_unmap"),
            m("probe_with")
        ),
    )?;
    check(
        m("probe_reset") == "ok",
        format!(
            "VFIO_DEVICE_RESET (FLR behind the root port): {:?}",
            m("probe_reset")
        ),
    )?;
    check(
        m("probe_bars").contains("4:0x4000(mmap)"),
        format!(
            "BAR 4 (the virtio structures) not mmapped: {:?}",
            m("probe_bars")
        ),
    )?;
    Ok(())
}

fn require_all() -> bool {
    std::env::var("VMTEST_REQUIRE").is_ok_and(|v| !v.is_empty() && v != "0")
}

fn main() -> ExitCode {
    let args = Arguments::from_args();
    let name = "guest_vfio_probe";
    let gate = if args.list {
        Ok(())
    } else {
        vmtest::artifacts()
            .map(drop)
            .and_then(|()| vmtest::accel().map(drop))
    };
    let trial = match gate {
        Ok(()) => Trial::test(name, || {
            let start = Instant::now();
            let r = guest_vfio_probe();
            eprintln!(
                "TIME guest_vfio_probe: {:.1} s",
                start.elapsed().as_secs_f64()
            );
            r
        }),
        Err(e) => match e.skip_reason() {
            Some(why) if require_all() => Trial::test(name, move || {
                Err(format!("prerequisite missing and VMTEST_REQUIRE=1: {why}").into())
            }),
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
    libtest_mimic::run(&args, vec![trial]).exit_code()
}

//! KVM or TCG.
//!
//! `/dev/kvm` opening is not enough: on some hosts (nested virtualization)
//! it opens, but guests die at once with "KVM internal error ... emulation
//! failure" and QEMU then sits paused. So KVM is chosen only after a tiny
//! probe guest really booted under it; the result is kept for the process.
//! `VMTEST_ACCEL=kvm|tcg` skips the probe.

use std::fmt;
use std::fs::{self, OpenOptions};
use std::sync::Mutex;
use std::time::Duration;

use crate::error::Error;
use crate::guest::Guest;

/// The QEMU accelerator a guest runs under.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Accel {
    /// Hardware virtualization (`-accel kvm -cpu host`).
    Kvm,
    /// QEMU's binary translator (`-accel tcg`), slow but always there.
    Tcg,
}

impl fmt::Display for Accel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Accel::Kvm => "kvm",
            Accel::Tcg => "tcg",
        })
    }
}

static CHOSEN: Mutex<Option<Accel>> = Mutex::new(None);

/// The accelerator guests of this process use (probed on first call).
pub fn accel() -> Result<Accel, Error> {
    let mut guard = CHOSEN.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(a) = *guard {
        return Ok(a);
    }
    let a = choose()?;
    *guard = Some(a);
    Ok(a)
}

fn choose() -> Result<Accel, Error> {
    match std::env::var("VMTEST_ACCEL").as_deref() {
        Ok("kvm") => return Ok(Accel::Kvm),
        Ok("tcg") => return Ok(Accel::Tcg),
        Ok("") | Err(_) => {}
        Ok(other) => {
            return Err(Error::Config(format!(
                "VMTEST_ACCEL={other}: expected `kvm` or `tcg`"
            )));
        }
    }
    if let Err(e) = OpenOptions::new().read(true).write(true).open("/dev/kvm") {
        eprintln!("vmtest: /dev/kvm not usable ({e}); guests run under TCG");
        return Ok(Accel::Tcg);
    }
    // The probe's verdict holds until the host reboots.
    let boot_id = fs::read_to_string("/proc/sys/kernel/random/boot_id")
        .map(|s| s.trim().to_string())
        .unwrap_or_default();
    let memo = crate::artifacts::cache_dir().join("kvm-probe");
    if !boot_id.is_empty()
        && let Ok(text) = fs::read_to_string(&memo)
        && let Some((id, verdict)) = text.trim().split_once(' ')
        && id == boot_id
    {
        let a = if verdict == "kvm" {
            Accel::Kvm
        } else {
            Accel::Tcg
        };
        eprintln!(
            "vmtest: guests run under {a} (KVM probe result of this boot, {}; delete it to probe again)",
            memo.display()
        );
        return Ok(a);
    }
    let a = probe()?;
    if !boot_id.is_empty() {
        let _ = crate::artifacts::write_atomic(&memo, format!("{boot_id} {a}\n").as_bytes());
    }
    Ok(a)
}

fn probe() -> Result<Accel, Error> {
    let start = std::time::Instant::now();
    let probe = Guest::builder()
        .name("kvm-probe")
        .keep_on_failure(false)
        .accel(Accel::Kvm)
        .memory_mb(128)
        .timeout(Duration::from_secs(30))
        .abort_on_stderr("KVM internal error")
        .init_script("vmtest_report probe ok\n")
        .run();
    match probe {
        Ok(run) if run.marker("probe") == Some("ok") => {
            eprintln!(
                "vmtest: KVM works (probe guest booted in {:.1} s); guests run under KVM",
                run.duration.as_secs_f64()
            );
            Ok(Accel::Kvm)
        }
        Ok(_) => {
            eprintln!(
                "vmtest: /dev/kvm opens but the probe guest reported nothing; guests run under TCG"
            );
            Ok(Accel::Tcg)
        }
        Err(e @ Error::Missing { .. }) => Err(e),
        Err(e) => {
            let first = e.to_string();
            let first = first.lines().next().unwrap_or_default();
            eprintln!(
                "vmtest: /dev/kvm opens but a probe guest fails under KVM ({first}, {:.1} s); guests run under TCG",
                start.elapsed().as_secs_f64()
            );
            Ok(Accel::Tcg)
        }
    }
}

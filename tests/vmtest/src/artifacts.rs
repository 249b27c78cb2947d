//! Guest artefacts: the QEMU binary, a Debian 6.12 kernel with its modules,
//! and busybox. Prepared once per machine and cached under
//! `<workspace>/target/vmtest/` (or `$VMTEST_CACHE_DIR`).
//!
//! Concurrency: within a process a mutex serializes preparation; across
//! processes every cache entry is built in a private temporary directory and
//! published with one atomic `rename`, so readers only ever see complete
//! entries and a lost race just discards the duplicate.

use std::env;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;

use crate::error::{Error, IoContext};
use crate::host::{find_program, next_seq, require_program};
use crate::kmod::ModuleIndex;

/// The metapackage that points at the current 6.12 kernel of Debian 12
/// (bookworm-security / point releases).
const KERNEL_META: &str = "linux-image-6.12-amd64";
const KERNEL_PREFIX: &str = "linux-image-6.12.";
const COMPLETE_STAMP: &str = ".vmtest-complete";

/// Everything a guest boot needs from the host.
#[derive(Debug)]
pub struct Artifacts {
    /// The cache root (`<workspace>/target/vmtest`).
    pub cache_dir: PathBuf,
    /// `qemu-system-x86_64`.
    pub qemu: PathBuf,
    /// First line of `qemu-system-x86_64 --version`.
    pub qemu_version: String,
    /// Debian package the kernel came from.
    pub kernel_package: String,
    /// Its Debian version.
    pub kernel_package_version: String,
    /// `uname -r` of the guest kernel, e.g. `6.12.117+deb12-amd64`.
    pub kernel_release: String,
    /// The bzImage.
    pub kernel_image: PathBuf,
    /// `.../lib/modules/<release>` of the extracted package.
    pub modules_dir: PathBuf,
    /// A busybox binary (static from `busybox-static`, or the host's).
    pub busybox: PathBuf,
    pub(crate) kmods: ModuleIndex,
}

static ARTIFACTS: Mutex<Option<&'static Artifacts>> = Mutex::new(None);

/// Prepares (or loads from the cache) the guest artefacts. Cheap after the
/// first successful call in a process. A missing prerequisite is
/// [`Error::Missing`]: report the test as skipped with
/// [`Error::skip_reason`].
pub fn artifacts() -> Result<&'static Artifacts, Error> {
    let mut guard = ARTIFACTS.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(a) = *guard {
        return Ok(a);
    }
    let a: &'static Artifacts = Box::leak(Box::new(prepare()?));
    *guard = Some(a);
    Ok(a)
}

/// The cache root: `$VMTEST_CACHE_DIR`, else `<workspace>/target/vmtest`.
pub fn cache_dir() -> PathBuf {
    if let Some(dir) = env::var_os("VMTEST_CACHE_DIR").filter(|d| !d.is_empty()) {
        return PathBuf::from(dir);
    }
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
    let root = manifest
        .ancestors()
        .find(|d| d.join("Cargo.lock").is_file())
        .unwrap_or(manifest);
    root.join("target").join("vmtest")
}

/// `VMTEST_KEEP=1`: keep run directories (initramfs, console log) and temp
/// dirs even when the guest passed.
pub(crate) fn keep_files() -> bool {
    env::var("VMTEST_KEEP").is_ok_and(|v| !v.is_empty() && v != "0")
}

/// Writes `data` to `path` through a temporary file and a rename.
pub(crate) fn write_atomic(path: &Path, data: &[u8]) -> Result<(), Error> {
    let tmp = path.with_extension(format!("tmp-{}-{}", std::process::id(), next_seq()));
    fs::write(&tmp, data).ctx(|| format!("writing {}", tmp.display()))?;
    fs::rename(&tmp, path).ctx(|| format!("renaming {} to {}", tmp.display(), path.display()))
}

fn prepare() -> Result<Artifacts, Error> {
    let cache_dir = cache_dir();
    fs::create_dir_all(&cache_dir).ctx(|| format!("creating {}", cache_dir.display()))?;
    let qemu = match env::var_os("VMTEST_QEMU").filter(|q| !q.is_empty()) {
        Some(q) => find_program(&q.to_string_lossy()).ok_or_else(|| {
            Error::missing(
                format!("VMTEST_QEMU={} is not an executable", q.to_string_lossy()),
                "install package qemu-system-x86, or point VMTEST_QEMU at a qemu-system-x86_64",
            )
        })?,
        None => require_program("qemu-system-x86_64", "qemu-system-x86")?,
    };
    let qemu_version = command_stdout(Command::new(&qemu).arg("--version"))
        .map(|s| s.lines().next().unwrap_or_default().trim().to_string())
        .unwrap_or_default();
    let kernel = kernel(&cache_dir)?;
    let busybox = busybox(&cache_dir)?;
    let modules_dir = kernel.root.join("lib/modules").join(&kernel.release);
    let kmods = ModuleIndex::load(&modules_dir, &kernel.release, kernel.root.join("vmtest-ko"))?;
    Ok(Artifacts {
        kernel_image: kernel
            .root
            .join("boot")
            .join(format!("vmlinuz-{}", kernel.release)),
        cache_dir,
        qemu,
        qemu_version,
        kernel_package: kernel.package,
        kernel_package_version: kernel.version,
        kernel_release: kernel.release,
        modules_dir,
        busybox,
        kmods,
    })
}

struct Kernel {
    package: String,
    version: String,
    release: String,
    root: PathBuf,
}

/// A Debian binary package picked for download.
struct DebChoice {
    package: String,
    version: String,
}

fn kernel(cache: &Path) -> Result<Kernel, Error> {
    let kdir = cache.join("kernel");
    if let Some(deb) = env::var_os("VMTEST_KERNEL_DEB").filter(|d| !d.is_empty()) {
        let deb = PathBuf::from(deb);
        let field = |f: &str| {
            command_stdout(Command::new("dpkg-deb").arg("-f").arg(&deb).arg(f))
                .map(|s| s.trim().to_string())
        };
        let choice = DebChoice {
            package: field("Package")?,
            version: field("Version")?,
        };
        return kernel_from(&kdir, &choice, Some(&deb));
    }
    match resolve_kernel_package() {
        Ok(choice) => match kernel_from(&kdir, &choice, None) {
            // The mirror is unreachable: an older prepared kernel still does.
            Err(e @ Error::Missing { .. }) => match newest_cached_kernel(&kdir) {
                Some(k) => {
                    eprintln!(
                        "vmtest: {e}\nvmtest: using the cached {} {}",
                        k.package, k.version
                    );
                    Ok(k)
                }
                None => Err(e),
            },
            other => other,
        },
        Err(e) => {
            // apt knows no kernel (no lists, no apt): fall back to a
            // previously prepared one.
            if let Some(k) = newest_cached_kernel(&kdir) {
                return Ok(k);
            }
            Err(e)
        }
    }
}

fn kernel_from(kdir: &Path, choice: &DebChoice, deb: Option<&Path>) -> Result<Kernel, Error> {
    let key = sanitize(&format!("{}_{}", choice.package, choice.version));
    let root = kdir.join(&key);
    if let Some(k) = load_kernel_dir(&root) {
        return Ok(k);
    }
    let root = extract_package(kdir, &key, choice, deb, |tmp| {
        let release = single_dir_entry(&tmp.join("lib/modules"))?;
        let image = tmp.join("boot").join(format!("vmlinuz-{release}"));
        if !image.is_file() {
            return Err(Error::Format(format!(
                "package {} has no {}",
                choice.package,
                image.display()
            )));
        }
        Ok(format!(
            "{}\n{}\n{}\n",
            choice.package, choice.version, release
        ))
    })?;
    load_kernel_dir(&root)
        .ok_or_else(|| Error::Format(format!("kernel cache {} is incomplete", root.display())))
}

fn load_kernel_dir(root: &Path) -> Option<Kernel> {
    let stamp = fs::read_to_string(root.join(COMPLETE_STAMP)).ok()?;
    let mut lines = stamp.lines();
    let (package, version, release) = (lines.next()?, lines.next()?, lines.next()?);
    Some(Kernel {
        package: package.to_string(),
        version: version.to_string(),
        release: release.to_string(),
        root: root.to_path_buf(),
    })
}

fn newest_cached_kernel(kdir: &Path) -> Option<Kernel> {
    let mut dirs: Vec<PathBuf> = fs::read_dir(kdir)
        .ok()?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.join(COMPLETE_STAMP).is_file())
        .collect();
    dirs.sort();
    dirs.iter().rev().find_map(|d| load_kernel_dir(d))
}

/// Finds the newest `linux-image-6.12.*-amd64-unsigned` apt can download.
fn resolve_kernel_package() -> Result<DebChoice, Error> {
    if let Ok(pkg) = env::var("VMTEST_KERNEL_PKG")
        && !pkg.is_empty()
    {
        let version = apt_field(&pkg, "Version").ok_or_else(|| {
            Error::missing(
                format!("VMTEST_KERNEL_PKG={pkg}: apt knows no such package"),
                "name a package apt can download (run `apt-get update` first)",
            )
        })?;
        return Ok(DebChoice {
            package: pkg,
            version,
        });
    }
    if find_program("apt-cache").is_none() {
        return Err(Error::missing(
            "no prepared guest kernel and no apt-cache to find one",
            "run on Debian 12 with apt, or set VMTEST_KERNEL_DEB=/path/to/linux-image-6.12*-amd64-unsigned.deb",
        ));
    }
    // The metapackage depends on the current signed image; the unsigned one
    // has the same name plus `-unsigned` and the same contents.
    if let Some(dep) = apt_field(KERNEL_META, "Depends")
        && let Some(image) = dep
            .split([',', '|'])
            .next()
            .and_then(|d| d.split_whitespace().next())
    {
        let unsigned = if image.ends_with("-unsigned") {
            image.to_string()
        } else {
            format!("{image}-unsigned")
        };
        if let Some(version) = apt_field(&unsigned, "Version") {
            return Ok(DebChoice {
                package: unsigned,
                version,
            });
        }
    }
    // No metapackage: pick the highest 6.12.N unsigned image with a candidate.
    let names = command_stdout(Command::new("apt-cache").args(["pkgnames", KERNEL_PREFIX]))
        .unwrap_or_default();
    let mut best: Option<(u32, DebChoice)> = None;
    for name in names.lines().map(str::trim) {
        let Some(patch) = name
            .strip_prefix(KERNEL_PREFIX)
            .and_then(|r| r.strip_suffix("-amd64-unsigned"))
            .and_then(|r| r.split_once('+'))
            .filter(|(_, flavour)| flavour.starts_with("deb"))
            .and_then(|(n, _)| n.parse::<u32>().ok())
        else {
            continue;
        };
        if best.as_ref().is_some_and(|(b, _)| *b >= patch) {
            continue;
        }
        if let Some(version) = apt_field(name, "Version") {
            best = Some((
                patch,
                DebChoice {
                    package: name.to_string(),
                    version,
                },
            ));
        }
    }
    best.map(|(_, c)| c).ok_or_else(|| {
        Error::missing(
            "apt knows no linux-image-6.12*-amd64-unsigned package (guest kernel)",
            "enable bookworm-security in the apt sources and run `apt-get update`, or set VMTEST_KERNEL_DEB=/path/to/the.deb",
        )
    })
}

/// Busybox for the guest: the host's `busybox` if present (static from
/// `busybox-static`, or dynamic — its libraries are then copied too),
/// otherwise `busybox-static` downloaded into the cache.
fn busybox(cache: &Path) -> Result<PathBuf, Error> {
    if let Some(p) = find_program("busybox") {
        return Ok(p);
    }
    let dir = cache.join("busybox");
    if let Ok(entries) = fs::read_dir(&dir) {
        for e in entries.flatten() {
            let bin = e.path().join("bin/busybox");
            if e.path().join(COMPLETE_STAMP).is_file() && bin.is_file() {
                return Ok(bin);
            }
        }
    }
    let version = apt_field("busybox-static", "Version")
        .ok_or_else(|| Error::missing("busybox not found", "install package busybox-static"))?;
    let choice = DebChoice {
        package: "busybox-static".into(),
        version,
    };
    let key = sanitize(&format!("busybox-static_{}", choice.version));
    let root = extract_package(&dir, &key, &choice, None, |tmp| {
        if tmp.join("bin/busybox").is_file() {
            Ok(String::new())
        } else {
            Err(Error::Format("busybox-static has no bin/busybox".into()))
        }
    })?;
    Ok(root.join("bin/busybox"))
}

/// Downloads (unless `deb` is given) and extracts a package into
/// `parent/key`, atomically. `check` validates the extracted tree and returns
/// the stamp contents.
fn extract_package(
    parent: &Path,
    key: &str,
    choice: &DebChoice,
    deb: Option<&Path>,
    check: impl FnOnce(&Path) -> Result<String, Error>,
) -> Result<PathBuf, Error> {
    let final_dir = parent.join(key);
    remove_stale_tmp_dirs(parent);
    let tmp = parent.join(format!(".tmp-{key}-{}-{}", std::process::id(), next_seq()));
    fs::create_dir_all(&tmp).ctx(|| format!("creating {}", tmp.display()))?;
    let result = (|| {
        let deb_path = match deb {
            Some(d) => d.to_path_buf(),
            None => download(choice, &tmp)?,
        };
        let root = tmp.join("root");
        eprintln!(
            "vmtest: extracting {} {} into {}",
            choice.package,
            choice.version,
            final_dir.display()
        );
        run_checked(Command::new("dpkg-deb").arg("-x").arg(&deb_path).arg(&root))?;
        let stamp = check(&root)?;
        fs::write(root.join(COMPLETE_STAMP), stamp).ctx(|| "writing stamp".into())?;
        match fs::rename(&root, &final_dir) {
            Ok(()) => Ok(()),
            // Another process won the race: keep its copy.
            Err(_) if final_dir.join(COMPLETE_STAMP).is_file() => Ok(()),
            Err(e) => Err(Error::io(format!("publishing {}", final_dir.display()), e)),
        }
    })();
    let _ = fs::remove_dir_all(&tmp);
    result?;
    // A newer package replaced an older one: drop the older copies.
    for e in fs::read_dir(parent).into_iter().flatten().flatten() {
        let p = e.path();
        if p != final_dir && p.join(COMPLETE_STAMP).is_file() {
            let _ = fs::remove_dir_all(&p);
        }
    }
    Ok(final_dir)
}

/// Removes `.tmp-<key>-<pid>-<n>` directories left by processes that died
/// while extracting.
fn remove_stale_tmp_dirs(parent: &Path) {
    for e in fs::read_dir(parent).into_iter().flatten().flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let Some(rest) = name.strip_prefix(".tmp-") else {
            continue;
        };
        let pid = rest.rsplit('-').nth(1).and_then(|p| p.parse::<u32>().ok());
        if let Some(pid) = pid
            && pid != std::process::id()
            && !Path::new(&format!("/proc/{pid}")).exists()
        {
            let _ = fs::remove_dir_all(e.path());
        }
    }
}

fn download(choice: &DebChoice, dir: &Path) -> Result<PathBuf, Error> {
    let apt_get = require_program("apt-get", "apt")?;
    eprintln!(
        "vmtest: downloading {} {} (apt-get download, once per machine)",
        choice.package, choice.version
    );
    let spec = format!("{}={}", choice.package, choice.version);
    let out = Command::new(apt_get)
        .args(["download", "-q", &spec])
        .current_dir(dir)
        .output()
        .ctx(|| "running apt-get download".into())?;
    if !out.status.success() {
        let err = String::from_utf8_lossy(&out.stderr);
        return Err(Error::missing(
            format!("cannot download {spec} ({})", apt_error(&err)),
            "check access to the Debian package mirror (`apt-get update`), or set VMTEST_KERNEL_DEB to a downloaded .deb",
        ));
    }
    fs::read_dir(dir)
        .ctx(|| format!("reading {}", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| p.extension().is_some_and(|e| e == "deb"))
        .ok_or_else(|| Error::Format(format!("apt-get download {spec} produced no .deb")))
}

/// The first `E:` line of apt's stderr (its `W:` lines are noise here).
fn apt_error(stderr: &str) -> String {
    let line = stderr
        .lines()
        .find(|l| l.starts_with("E:"))
        .or_else(|| stderr.lines().last())
        .unwrap_or("apt-get download failed")
        .trim();
    line.chars().take(300).collect()
}

/// `apt-cache show --no-all-versions PKG` field value (candidate version).
fn apt_field(pkg: &str, field: &str) -> Option<String> {
    let out = Command::new("apt-cache")
        .args(["show", "--no-all-versions", pkg])
        .output()
        .ok()?;
    if !out.status.success() {
        return None;
    }
    let text = String::from_utf8_lossy(&out.stdout);
    let prefix = format!("{field}: ");
    text.lines()
        .find_map(|l| l.strip_prefix(&prefix))
        .map(|v| v.trim().to_string())
}

fn single_dir_entry(dir: &Path) -> Result<String, Error> {
    let names: Vec<String> = fs::read_dir(dir)
        .ctx(|| format!("reading {}", dir.display()))?
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    match names.as_slice() {
        [one] => Ok(one.clone()),
        _ => Err(Error::Format(format!(
            "expected exactly one entry in {}, found {names:?}",
            dir.display()
        ))),
    }
}

fn sanitize(s: &str) -> String {
    s.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "._+-".contains(c) {
                c
            } else {
                '_'
            }
        })
        .collect()
}

fn command_stdout(cmd: &mut Command) -> Result<String, Error> {
    let out = run_checked(cmd)?;
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

pub(crate) fn run_checked(cmd: &mut Command) -> Result<std::process::Output, Error> {
    let shown = format!("{cmd:?}");
    let out = cmd.output().ctx(|| format!("running {shown}"))?;
    if !out.status.success() {
        return Err(Error::Command {
            command: shown,
            detail: format!(
                "{}: {}",
                out.status,
                crate::guest::tail_lines(String::from_utf8_lossy(&out.stderr).trim(), 5)
            ),
        });
    }
    Ok(out)
}

/// Shared libraries (and the dynamic loader) `binary` needs, as host paths;
/// empty for static binaries.
pub(crate) fn needed_libs(binary: &Path) -> Result<Vec<PathBuf>, Error> {
    let ldd = require_program("ldd", "libc-bin")?;
    let out = Command::new(ldd)
        .arg(binary)
        .output()
        .ctx(|| format!("running ldd {}", binary.display()))?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    if text.contains("not a dynamic executable") || text.contains("statically linked") {
        return Ok(Vec::new());
    }
    if !out.status.success() {
        return Err(Error::Command {
            command: format!("ldd {}", binary.display()),
            detail: text.trim().to_string(),
        });
    }
    let mut libs = Vec::new();
    for line in text.lines().map(str::trim) {
        if line.contains("=> not found") {
            return Err(Error::Config(format!(
                "{} needs a library that is not installed: {line}",
                binary.display()
            )));
        }
        let path = match line.split_once("=>") {
            Some((_, rest)) => rest.split_whitespace().next(),
            None => line
                .split_whitespace()
                .next()
                .filter(|p| p.starts_with('/')),
        };
        if let Some(p) = path.filter(|p| p.starts_with('/')) {
            libs.push(PathBuf::from(p));
        }
    }
    Ok(libs)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sanitize_keeps_debian_versions_readable() {
        assert_eq!(
            sanitize("linux-image-6.12.117+deb12-amd64-unsigned_6.12.117-1~deb12u1"),
            "linux-image-6.12.117+deb12-amd64-unsigned_6.12.117-1_deb12u1"
        );
    }

    #[test]
    fn ldd_of_a_dynamic_binary_lists_libc() {
        let Some(sh) = find_program("sh") else {
            return;
        };
        let libs = needed_libs(&sh).unwrap();
        assert!(
            libs.iter().any(|l| l.to_string_lossy().contains("libc.so")),
            "{libs:?}"
        );
    }
}

//! Kernel module lookup for an extracted Debian kernel package.
//!
//! The package ships no `modules.dep` (depmod runs at install time), so the
//! dependency order is computed here from each module's own `.modinfo` ELF
//! section (`depends=` and `softdep=`).

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::error::{Error, IoContext};
use crate::host::find_program;

/// All modules of one kernel, by normalized name (`-` written as `_`).
#[derive(Debug)]
pub(crate) struct ModuleIndex {
    release: String,
    paths: BTreeMap<String, PathBuf>,
    builtin: BTreeSet<String>,
    /// Where decompressed `.ko` files are cached.
    cache: PathBuf,
}

/// A module ready to be put into an initramfs.
#[derive(Debug, Clone)]
pub(crate) struct ResolvedModule {
    pub(crate) name: String,
    /// Uncompressed `.ko`.
    pub(crate) path: PathBuf,
}

/// Module names use `-` and `_` interchangeably; the kernel normalizes to `_`.
pub(crate) fn normalize(name: &str) -> String {
    name.trim().replace('-', "_")
}

/// `foo-bar.ko.xz` -> `foo_bar`.
fn module_name_of(file_name: &str) -> Option<String> {
    let stem = [".ko.xz", ".ko.zst", ".ko.gz", ".ko"]
        .iter()
        .find_map(|ext| file_name.strip_suffix(ext))?;
    Some(normalize(stem))
}

impl ModuleIndex {
    /// Indexes `modules_dir` (`.../lib/modules/<release>`).
    pub(crate) fn load(modules_dir: &Path, release: &str, cache: PathBuf) -> Result<Self, Error> {
        let mut paths = BTreeMap::new();
        let mut stack = vec![modules_dir.join("kernel")];
        while let Some(dir) = stack.pop() {
            for entry in fs::read_dir(&dir).ctx(|| format!("reading {}", dir.display()))? {
                let entry = entry.ctx(|| format!("reading {}", dir.display()))?;
                let path = entry.path();
                let ft = entry
                    .file_type()
                    .ctx(|| format!("stat {}", path.display()))?;
                if ft.is_dir() {
                    stack.push(path);
                } else if let Some(name) = module_name_of(&entry.file_name().to_string_lossy()) {
                    paths.insert(name, path);
                }
            }
        }
        let builtin_file = modules_dir.join("modules.builtin");
        let builtin = fs::read_to_string(&builtin_file)
            .ctx(|| format!("reading {}", builtin_file.display()))?
            .lines()
            .filter_map(|l| module_name_of(l.rsplit('/').next().unwrap_or(l)))
            .collect();
        Ok(ModuleIndex {
            release: release.to_string(),
            paths,
            builtin,
            cache,
        })
    }

    /// Whether `name` is compiled into the kernel.
    pub(crate) fn is_builtin(&self, name: &str) -> bool {
        self.builtin.contains(&normalize(name))
    }

    /// Resolves `names` and all their dependencies into load order
    /// (dependencies first). Built-in modules are left out.
    pub(crate) fn resolve(&self, names: &[String]) -> Result<Vec<ResolvedModule>, Error> {
        let mut out = Vec::new();
        let mut done = BTreeSet::new();
        for name in names {
            let mut stack = Vec::new();
            self.visit(&normalize(name), true, &mut stack, &mut done, &mut out)?;
        }
        Ok(out)
    }

    fn visit(
        &self,
        name: &str,
        required: bool,
        stack: &mut Vec<String>,
        done: &mut BTreeSet<String>,
        out: &mut Vec<ResolvedModule>,
    ) -> Result<(), Error> {
        if done.contains(name) || stack.iter().any(|s| s == name) || self.is_builtin(name) {
            return Ok(());
        }
        let Some(src) = self.paths.get(name) else {
            if required {
                return Err(Error::UnknownModule {
                    name: name.to_string(),
                    kernel: self.release.clone(),
                });
            }
            // Optional soft dependency that this kernel does not have.
            return Ok(());
        };
        let path = self.decompressed(name, src)?;
        let data = fs::read(&path).ctx(|| format!("reading {}", path.display()))?;
        let info = modinfo(&data).map_err(|e| Error::Format(format!("{}: {e}", src.display())))?;

        stack.push(name.to_string());
        let mut post = Vec::new();
        for (key, value) in &info {
            match key.as_str() {
                "depends" => {
                    for dep in value.split(',').filter(|d| !d.is_empty()) {
                        self.visit(&normalize(dep), true, stack, done, out)?;
                    }
                }
                "softdep" => {
                    let (pre, p) = parse_softdep(value);
                    for dep in pre {
                        self.visit(&dep, false, stack, done, out)?;
                    }
                    post.extend(p);
                }
                _ => {}
            }
        }
        stack.pop();
        done.insert(name.to_string());
        out.push(ResolvedModule {
            name: name.to_string(),
            path,
        });
        for dep in post {
            self.visit(&dep, false, stack, done, out)?;
        }
        Ok(())
    }

    /// Returns the path of an uncompressed copy of the module, creating it in
    /// the cache when needed (atomic rename, safe for concurrent callers).
    fn decompressed(&self, name: &str, src: &Path) -> Result<PathBuf, Error> {
        let src_name = src.to_string_lossy();
        if src_name.ends_with(".ko") {
            return Ok(src.to_path_buf());
        }
        let dst = self.cache.join(format!("{name}.ko"));
        if dst.is_file() {
            return Ok(dst);
        }
        fs::create_dir_all(&self.cache).ctx(|| format!("creating {}", self.cache.display()))?;
        let data = if src_name.ends_with(".xz") {
            run_decompressor("xz", "xz-utils", src)?
        } else if src_name.ends_with(".zst") {
            run_decompressor("zstd", "zstd", src)?
        } else {
            let file = fs::File::open(src).ctx(|| format!("opening {}", src.display()))?;
            let mut data = Vec::new();
            std::io::Read::read_to_end(&mut flate2::read::GzDecoder::new(file), &mut data)
                .ctx(|| format!("decompressing {}", src.display()))?;
            data
        };
        crate::artifacts::write_atomic(&dst, &data)?;
        Ok(dst)
    }
}

fn run_decompressor(program: &str, package: &str, src: &Path) -> Result<Vec<u8>, Error> {
    let bin = find_program(program).ok_or_else(|| {
        Error::missing(
            format!("`{program}` not found (needed to decompress kernel modules)"),
            format!("install package {package}"),
        )
    })?;
    let out = Command::new(&bin)
        .arg("-dc")
        .arg(src)
        .output()
        .ctx(|| format!("running {program}"))?;
    if !out.status.success() {
        return Err(Error::Command {
            command: format!("{program} -dc {}", src.display()),
            detail: format!(
                "{}: {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            ),
        });
    }
    Ok(out.stdout)
}

/// `pre: a b post: c` -> (["a","b"], ["c"]).
fn parse_softdep(value: &str) -> (Vec<String>, Vec<String>) {
    let (mut pre, mut post) = (Vec::new(), Vec::new());
    let mut cur: Option<&mut Vec<String>> = None;
    for tok in value.split_whitespace() {
        match tok {
            "pre:" => cur = Some(&mut pre),
            "post:" => cur = Some(&mut post),
            t => {
                if let Some(v) = cur.as_deref_mut() {
                    v.push(normalize(t));
                }
            }
        }
    }
    (pre, post)
}

fn le_u16(d: &[u8], at: usize) -> Result<u16, String> {
    d.get(at..at + 2)
        .map(|b| u16::from_le_bytes([b[0], b[1]]))
        .ok_or_else(|| "truncated ELF".to_string())
}

fn le_u32(d: &[u8], at: usize) -> Result<u32, String> {
    d.get(at..at + 4)
        .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .ok_or_else(|| "truncated ELF".to_string())
}

fn le_u64(d: &[u8], at: usize) -> Result<u64, String> {
    let b = d
        .get(at..at + 8)
        .ok_or_else(|| "truncated ELF".to_string())?;
    let mut a = [0u8; 8];
    a.copy_from_slice(b);
    Ok(u64::from_le_bytes(a))
}

fn usize_of(v: u64) -> Result<usize, String> {
    usize::try_from(v).map_err(|_| "ELF offset out of range".to_string())
}

/// Reads the `key=value` strings of a 64-bit little-endian ELF object's
/// `.modinfo` section.
pub(crate) fn modinfo(elf: &[u8]) -> Result<Vec<(String, String)>, String> {
    if elf.get(..4) != Some(b"\x7fELF".as_slice())
        || elf.get(4) != Some(&2)
        || elf.get(5) != Some(&1)
    {
        return Err("not a 64-bit little-endian ELF file".into());
    }
    let shoff = usize_of(le_u64(elf, 0x28)?)?;
    let shentsize = usize::from(le_u16(elf, 0x3a)?);
    let shnum = usize::from(le_u16(elf, 0x3c)?);
    let shstrndx = usize::from(le_u16(elf, 0x3e)?);
    let section = |i: usize| -> Result<(u32, usize, usize), String> {
        let base = shoff + i * shentsize;
        Ok((
            le_u32(elf, base)?,
            usize_of(le_u64(elf, base + 0x18)?)?,
            usize_of(le_u64(elf, base + 0x20)?)?,
        ))
    };
    let slice = |off: usize, size: usize| -> Result<&[u8], String> {
        off.checked_add(size)
            .and_then(|end| elf.get(off..end))
            .ok_or_else(|| "section out of bounds".to_string())
    };
    let (_, stroff, strsize) = section(shstrndx)?;
    let strtab = slice(stroff, strsize)?;
    for i in 0..shnum {
        let (name_off, off, size) = section(i)?;
        let name = strtab
            .get(name_off as usize..)
            .and_then(|s| s.split(|&b| b == 0).next())
            .unwrap_or_default();
        if name == b".modinfo" {
            let data = slice(off, size)?;
            return Ok(data
                .split(|&b| b == 0)
                .filter_map(|kv| {
                    let kv = String::from_utf8_lossy(kv);
                    let (k, v) = kv.split_once('=')?;
                    Some((k.to_string(), v.to_string()))
                })
                .collect());
        }
    }
    Err("no .modinfo section".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_normalized() {
        assert_eq!(
            module_name_of("vfio-pci-core.ko.xz").as_deref(),
            Some("vfio_pci_core")
        );
        assert_eq!(
            module_name_of("virtio_net.ko").as_deref(),
            Some("virtio_net")
        );
        assert_eq!(module_name_of("README"), None);
    }

    #[test]
    fn softdep_parsing() {
        let (pre, post) = parse_softdep("pre: crc32c post: vfio_iommu_type1 vfio-iommu-spapr-tce");
        assert_eq!(pre, ["crc32c"]);
        assert_eq!(post, ["vfio_iommu_type1", "vfio_iommu_spapr_tce"]);
    }

    /// Builds a tiny ELF64 with a .shstrtab and a .modinfo section.
    fn fake_ko(modinfo_text: &[u8]) -> Vec<u8> {
        let shstr = b"\0.shstrtab\0.modinfo\0";
        let mut elf = vec![0u8; 64];
        elf[..4].copy_from_slice(b"\x7fELF");
        elf[4] = 2;
        elf[5] = 1;
        let shstr_off = elf.len();
        elf.extend_from_slice(shstr);
        let modinfo_off = elf.len();
        elf.extend_from_slice(modinfo_text);
        while !elf.len().is_multiple_of(8) {
            elf.push(0);
        }
        let shoff = elf.len();
        // null section, .shstrtab, .modinfo
        for (name, off, size) in [
            (0u32, 0usize, 0usize),
            (1, shstr_off, shstr.len()),
            (11, modinfo_off, modinfo_text.len()),
        ] {
            let mut sh = vec![0u8; 64];
            sh[0..4].copy_from_slice(&name.to_le_bytes());
            sh[0x18..0x20].copy_from_slice(&(off as u64).to_le_bytes());
            sh[0x20..0x28].copy_from_slice(&(size as u64).to_le_bytes());
            elf.extend_from_slice(&sh);
        }
        elf[0x28..0x30].copy_from_slice(&(shoff as u64).to_le_bytes());
        elf[0x3a..0x3c].copy_from_slice(&64u16.to_le_bytes());
        elf[0x3c..0x3e].copy_from_slice(&3u16.to_le_bytes());
        elf[0x3e..0x40].copy_from_slice(&1u16.to_le_bytes());
        elf
    }

    #[test]
    fn modinfo_reads_depends() {
        let elf = fake_ko(b"license=GPL\0depends=vfio-pci-core,vfio\0name=vfio_pci\0");
        let info = modinfo(&elf).unwrap();
        assert!(info.contains(&("depends".into(), "vfio-pci-core,vfio".into())));
        assert!(info.contains(&("name".into(), "vfio_pci".into())));
        assert!(modinfo(b"not elf").is_err());
    }
}

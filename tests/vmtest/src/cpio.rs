//! A minimal writer for the "newc" cpio format the Linux initramfs loader
//! reads, plus gzip compression. Linux accepts several compressed archives
//! concatenated, which is how a cached base archive and a per-run archive are
//! combined.

use std::collections::BTreeSet;
use std::io::Write;

use flate2::Compression;
use flate2::write::GzEncoder;

const S_IFDIR: u32 = 0o040000;
const S_IFREG: u32 = 0o100000;
const S_IFLNK: u32 = 0o120000;
const S_IFCHR: u32 = 0o020000;

/// Builds one cpio archive in memory.
pub(crate) struct CpioWriter {
    buf: Vec<u8>,
    next_ino: u32,
    dirs: BTreeSet<String>,
}

impl CpioWriter {
    /// `first_ino` keeps inode numbers of concatenated archives distinct.
    pub(crate) fn new(first_ino: u32) -> Self {
        CpioWriter {
            buf: Vec::new(),
            next_ino: first_ino,
            dirs: BTreeSet::new(),
        }
    }

    /// Adds a directory (and its parents), mode 0755.
    pub(crate) fn dir(&mut self, path: &str) {
        let path = normalize(path);
        if path.is_empty() || self.dirs.contains(&path) {
            return;
        }
        if let Some((parent, _)) = path.rsplit_once('/') {
            self.dir(parent);
        }
        self.entry(&path, S_IFDIR | 0o755, 2, &[], (0, 0));
        self.dirs.insert(path);
    }

    /// Adds a regular file with the given permission bits (e.g. 0o755).
    pub(crate) fn file(&mut self, path: &str, perm: u32, data: &[u8]) {
        let path = normalize(path);
        self.parent_dirs(&path);
        self.entry(&path, S_IFREG | (perm & 0o7777), 1, data, (0, 0));
    }

    /// Adds a symbolic link `path -> target`.
    pub(crate) fn symlink(&mut self, path: &str, target: &str) {
        let path = normalize(path);
        self.parent_dirs(&path);
        self.entry(&path, S_IFLNK | 0o777, 1, target.as_bytes(), (0, 0));
    }

    /// Adds a character device node.
    pub(crate) fn chardev(&mut self, path: &str, perm: u32, major: u32, minor: u32) {
        let path = normalize(path);
        self.parent_dirs(&path);
        self.entry(&path, S_IFCHR | (perm & 0o7777), 1, &[], (major, minor));
    }

    /// Writes the trailer and returns the uncompressed archive.
    pub(crate) fn finish(mut self) -> Vec<u8> {
        self.entry("TRAILER!!!", 0, 1, &[], (0, 0));
        self.buf
    }

    fn parent_dirs(&mut self, path: &str) {
        if let Some((parent, _)) = path.rsplit_once('/') {
            self.dir(parent);
        }
    }

    fn entry(&mut self, name: &str, mode: u32, nlink: u32, data: &[u8], rdev: (u32, u32)) {
        let ino = self.next_ino;
        self.next_ino += 1;
        let fields = [
            ino,
            mode,
            0, // uid
            0, // gid
            nlink,
            0, // mtime
            u32::try_from(data.len()).expect("initramfs member larger than 4 GiB"),
            0, // devmajor
            0, // devminor
            rdev.0,
            rdev.1,
            u32::try_from(name.len() + 1).expect("path too long"),
            0, // check
        ];
        self.buf.extend_from_slice(b"070701");
        for f in fields {
            self.buf.extend_from_slice(format!("{f:08x}").as_bytes());
        }
        self.buf.extend_from_slice(name.as_bytes());
        self.buf.push(0);
        self.pad4();
        self.buf.extend_from_slice(data);
        self.pad4();
    }

    fn pad4(&mut self) {
        while !self.buf.len().is_multiple_of(4) {
            self.buf.push(0);
        }
    }
}

fn normalize(path: &str) -> String {
    path.trim_matches('/').to_string()
}

/// gzip-compresses `data` (fast level: the archive is rebuilt per run).
pub(crate) fn gzip(data: &[u8]) -> Vec<u8> {
    let mut enc = GzEncoder::new(Vec::with_capacity(data.len() / 2), Compression::fast());
    enc.write_all(data).expect("writing to a Vec cannot fail");
    enc.finish().expect("writing to a Vec cannot fail")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(buf: &[u8]) -> Vec<(String, u32, Vec<u8>)> {
        let mut out = Vec::new();
        let mut pos = 0;
        loop {
            assert_eq!(&buf[pos..pos + 6], b"070701");
            let field = |i: usize| {
                let s = std::str::from_utf8(&buf[pos + 6 + i * 8..pos + 14 + i * 8]).unwrap();
                u32::from_str_radix(s, 16).unwrap()
            };
            let mode = field(1);
            let size = field(6) as usize;
            let namesize = field(11) as usize;
            let name_start = pos + 110;
            let name =
                String::from_utf8(buf[name_start..name_start + namesize - 1].to_vec()).unwrap();
            let data_start = (name_start + namesize).next_multiple_of(4);
            let data = buf[data_start..data_start + size].to_vec();
            pos = (data_start + size).next_multiple_of(4);
            if name == "TRAILER!!!" {
                assert_eq!(pos, buf.len());
                return out;
            }
            out.push((name, mode, data));
        }
    }

    #[test]
    fn newc_roundtrip_with_parents_and_padding() {
        let mut w = CpioWriter::new(1);
        w.file("/bin/busybox", 0o755, b"abc");
        w.symlink("/bin/sh", "busybox");
        w.file("/etc/x", 0o644, b"");
        let entries = parse(&w.finish());
        let names: Vec<_> = entries.iter().map(|e| e.0.as_str()).collect();
        assert_eq!(names, ["bin", "bin/busybox", "bin/sh", "etc", "etc/x"]);
        assert_eq!(entries[0].1, S_IFDIR | 0o755);
        assert_eq!(entries[1].1, S_IFREG | 0o755);
        assert_eq!(entries[1].2, b"abc");
        assert_eq!(entries[2].1, S_IFLNK | 0o777);
        assert_eq!(entries[2].2, b"busybox");
    }

    #[test]
    fn gzip_output_has_magic() {
        let z = gzip(b"hello");
        assert_eq!(&z[..2], &[0x1f, 0x8b]);
    }
}

//! A host TAP interface as an e-switch uplink: `/dev/net/tun` with `TUNSETIFF` (`IFF_TAP |
//! IFF_NO_PI`: plain Ethernet frames, no packet-information prefix, no virtio-net header),
//! non-blocking. The interface exists while the fd is open (unless someone made it persistent);
//! the fd keeps working when the interface is moved into another network namespace.
//!
//! The one `ioctl` is the only `unsafe` of the model kit.

use std::fs::OpenOptions;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::fs::OpenOptionsExt;

use nix::errno::Errno;

/// `struct ifreq` as `TUNSETIFF` reads it: the name, then the flags (the rest of the 40-byte
/// union is unused here).
#[repr(C)]
struct IfReq {
    name: [u8; libc::IFNAMSIZ],
    flags: libc::c_short,
    _pad: [u8; 22],
}

const _: () = assert!(std::mem::size_of::<IfReq>() == 40);

/// An open TAP interface.
#[derive(Debug)]
pub struct Tap {
    fd: OwnedFd,
    name: String,
}

impl Tap {
    /// Creates (or attaches to) the TAP interface `name`. Errors name the interface and say
    /// what to fix (root / CAP_NET_ADMIN, a missing `/dev/net/tun`).
    pub fn open(name: &str) -> Result<Tap, String> {
        if name.is_empty() || name.len() >= libc::IFNAMSIZ || name.contains('\0') {
            return Err(format!(
                "TAP name '{name}': accepted is 1..={} bytes",
                libc::IFNAMSIZ - 1
            ));
        }
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
            .open("/dev/net/tun")
            .map_err(|e| format!("TAP {name}: cannot open /dev/net/tun: {e}"))?;
        let mut req = IfReq {
            name: [0; libc::IFNAMSIZ],
            flags: (libc::IFF_TAP | libc::IFF_NO_PI) as libc::c_short,
            _pad: [0; 22],
        };
        req.name[..name.len()].copy_from_slice(name.as_bytes());
        // SAFETY: TUNSETIFF reads and writes one `struct ifreq` (40 bytes on Linux, checked at
        // compile time above) through the pointer, which points to our own properly sized and
        // initialised `IfReq` for the duration of the call; the fd is an open tun device.
        let rc = unsafe { libc::ioctl(file.as_raw_fd(), libc::TUNSETIFF, &mut req as *mut IfReq) };
        if rc < 0 {
            let e = Errno::last();
            let hint = if e == Errno::EPERM {
                " (needs root or CAP_NET_ADMIN)"
            } else {
                ""
            };
            return Err(format!("TAP {name}: TUNSETIFF failed: {e}{hint}"));
        }
        let len = req
            .name
            .iter()
            .position(|&b| b == 0)
            .unwrap_or(req.name.len());
        Ok(Tap {
            fd: OwnedFd::from(file),
            name: String::from_utf8_lossy(&req.name[..len]).into_owned(),
        })
    }

    /// The interface name the kernel gave.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Sends one frame. `false` when the kernel refused it (queue full, interface down).
    #[inline]
    pub fn send(&self, frame: &[u8]) -> bool {
        matches!(nix::unistd::write(&self.fd, frame), Ok(n) if n == frame.len())
    }

    /// Receives one frame into `buf`; `None` when nothing is waiting.
    #[inline]
    pub fn recv(&self, buf: &mut [u8]) -> Option<usize> {
        match nix::unistd::read(&self.fd, buf) {
            Ok(n) if n > 0 => Some(n),
            _ => None,
        }
    }
}

impl AsFd for Tap {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

//! Framed vhost-user messages over a Unix stream socket, with fds by `SCM_RIGHTS`.

use std::io::{self, IoSlice, IoSliceMut, Read, Write};
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;

use nix::cmsg_space;
use nix::sys::socket::{ControlMessage, ControlMessageOwned, MsgFlags, recvmsg, sendmsg};

use super::msg::{HDR_LEN, Header, MAX_FDS, MsgError};

/// A received message: header, payload and the fds that came with it.
#[derive(Debug)]
pub struct Message {
    /// The header.
    pub hdr: Header,
    /// The payload (exactly `hdr.size` bytes).
    pub payload: Vec<u8>,
    /// Fds passed with the message.
    pub fds: Vec<OwnedFd>,
}

/// Errors on a connection.
#[derive(Debug, thiserror::Error)]
pub enum ConnError {
    /// The peer closed the connection (at a message boundary).
    #[error("the peer closed the connection")]
    Closed,
    /// The peer closed the connection in the middle of a message.
    #[error("the peer vanished mid-message ({got} of {want} bytes)")]
    Truncated {
        /// Bytes received.
        got: usize,
        /// Bytes expected.
        want: usize,
    },
    /// More fds than any message may carry.
    #[error("a message carried more than {MAX_FDS} fds")]
    TooManyFds,
    /// A framing error.
    #[error(transparent)]
    Msg(#[from] MsgError),
    /// A socket error.
    #[error("socket: {0}")]
    Io(#[from] io::Error),
}

/// One vhost-user connection.
#[derive(Debug)]
pub struct Conn {
    stream: UnixStream,
}

impl Conn {
    /// Wraps a connected stream.
    pub fn new(stream: UnixStream) -> Conn {
        Conn { stream }
    }

    /// The stream.
    pub fn stream(&self) -> &UnixStream {
        &self.stream
    }

    /// Receives one message. Blocks until a whole message is there.
    pub fn recv(&mut self) -> Result<Message, ConnError> {
        let mut hdr = [0u8; HDR_LEN];
        let mut fds: Vec<OwnedFd> = Vec::new();
        let got = self.recv_with_fds(&mut hdr, &mut fds)?;
        if got == 0 {
            return Err(ConnError::Closed);
        }
        if got < HDR_LEN {
            self.read_rest(&mut hdr[got..], got, HDR_LEN)?;
        }
        let hdr = Header::parse(&hdr)?;
        let mut payload = vec![0u8; hdr.size as usize];
        self.read_rest(&mut payload, 0, hdr.size as usize)?;
        Ok(Message { hdr, payload, fds })
    }

    fn read_rest(&mut self, buf: &mut [u8], already: usize, want: usize) -> Result<(), ConnError> {
        let mut off = 0;
        while off < buf.len() {
            match self.stream.read(&mut buf[off..]) {
                Ok(0) => {
                    return Err(ConnError::Truncated {
                        got: already + off,
                        want,
                    });
                }
                Ok(n) => off += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e.into()),
            }
        }
        Ok(())
    }

    fn recv_with_fds(
        &mut self,
        buf: &mut [u8],
        fds: &mut Vec<OwnedFd>,
    ) -> Result<usize, ConnError> {
        // Room for the kernel's SCM_MAX_FD (253), so a message with too many fds is never
        // truncated (which would leave the delivered ones unreachable): all are taken and closed.
        let mut space = cmsg_space!([RawFd; 253]);
        let fd = self.stream.as_raw_fd();
        loop {
            let mut iov = [IoSliceMut::new(buf)];
            let res = recvmsg::<()>(fd, &mut iov, Some(&mut space), MsgFlags::MSG_CMSG_CLOEXEC);
            let msg = match res {
                Ok(m) => m,
                Err(nix::errno::Errno::EINTR) => continue,
                Err(e) => return Err(io::Error::from(e).into()),
            };
            let mut raw = Vec::new();
            for c in msg.cmsgs().map_err(io::Error::from)? {
                if let ControlMessageOwned::ScmRights(v) = c {
                    raw.extend(v);
                }
            }
            for r in raw {
                // SAFETY: the kernel just installed `r` in this process for us (SCM_RIGHTS); no
                // one else owns it, so wrapping it transfers ownership exactly once.
                fds.push(unsafe { OwnedFd::from_raw_fd(r) });
            }
            if msg.flags.contains(MsgFlags::MSG_CTRUNC) || fds.len() > MAX_FDS {
                fds.clear();
                return Err(ConnError::TooManyFds);
            }
            return Ok(msg.bytes);
        }
    }

    /// Sends a message with optional fds.
    pub fn send(
        &mut self,
        hdr: Header,
        payload: &[u8],
        fds: &[BorrowedFd<'_>],
    ) -> Result<(), ConnError> {
        let h = hdr.encode();
        let iov = [IoSlice::new(&h), IoSlice::new(payload)];
        let raw: Vec<RawFd> = fds.iter().map(|f| f.as_raw_fd()).collect();
        let cmsg = [ControlMessage::ScmRights(&raw)];
        let cmsgs: &[ControlMessage<'_>] = if raw.is_empty() { &[] } else { &cmsg };
        let total = HDR_LEN + payload.len();
        let sent = loop {
            match sendmsg::<()>(
                self.stream.as_raw_fd(),
                &iov,
                cmsgs,
                MsgFlags::MSG_NOSIGNAL,
                None,
            ) {
                Ok(n) => break n,
                Err(nix::errno::Errno::EINTR) => continue,
                Err(e) => return Err(io::Error::from(e).into()),
            }
        };
        if sent < total {
            // The rest without fds (they went with the first byte).
            let mut all = Vec::with_capacity(total);
            all.extend_from_slice(&h);
            all.extend_from_slice(payload);
            self.stream.write_all(&all[sent..])?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vhost::msg::{FLAG_VERSION, MAX_PAYLOAD};
    use std::os::fd::AsFd;

    #[test]
    fn messages_and_fds_round_trip() {
        let (a, b) = UnixStream::pair().unwrap();
        let (mut a, mut b) = (Conn::new(a), Conn::new(b));
        let f = std::fs::File::open("/dev/null").unwrap();
        a.send(
            Header {
                request: 12,
                flags: FLAG_VERSION,
                size: 8,
            },
            &7u64.to_le_bytes(),
            &[f.as_fd()],
        )
        .unwrap();
        let m = b.recv().unwrap();
        assert_eq!((m.hdr.request, m.payload.len(), m.fds.len()), (12, 8, 1));
        drop(a);
        assert!(matches!(b.recv(), Err(ConnError::Closed)));
    }

    #[test]
    fn a_front_end_vanishing_mid_message_is_reported() {
        let (mut a, b) = UnixStream::pair().unwrap();
        let mut h = Header {
            request: 5,
            flags: FLAG_VERSION,
            size: 40,
        }
        .encode()
        .to_vec();
        h.extend_from_slice(&[0u8; 10]);
        a.write_all(&h).unwrap();
        drop(a);
        let mut b = Conn::new(b);
        assert!(matches!(
            b.recv(),
            Err(ConnError::Truncated { got: 10, want: 40 })
        ));
    }

    #[test]
    fn oversized_and_bad_version_headers_are_errors() {
        let (mut a, b) = UnixStream::pair().unwrap();
        a.write_all(
            &Header {
                request: 1,
                flags: 1,
                size: (MAX_PAYLOAD + 1) as u32,
            }
            .encode(),
        )
        .unwrap();
        let mut b = Conn::new(b);
        assert!(matches!(
            b.recv(),
            Err(ConnError::Msg(MsgError::Oversized { .. }))
        ));
        a.write_all(
            &Header {
                request: 1,
                flags: 2,
                size: 0,
            }
            .encode(),
        )
        .unwrap();
        assert!(matches!(
            b.recv(),
            Err(ConnError::Msg(MsgError::BadVersion(2)))
        ));
    }

    #[test]
    fn more_than_eight_fds_is_an_error() {
        let (a, b) = UnixStream::pair().unwrap();
        let files: Vec<_> = (0..10)
            .map(|_| std::fs::File::open("/dev/null").unwrap())
            .collect();
        let raw: Vec<RawFd> = files.iter().map(|f| f.as_raw_fd()).collect();
        let h = Header {
            request: 5,
            flags: 1,
            size: 0,
        }
        .encode();
        sendmsg::<()>(
            a.as_raw_fd(),
            &[IoSlice::new(&h)],
            &[ControlMessage::ScmRights(&raw)],
            MsgFlags::empty(),
            None,
        )
        .unwrap();
        let mut b = Conn::new(b);
        let r = b.recv();
        assert!(matches!(r, Err(ConnError::TooManyFds)), "{r:?}");
    }
}

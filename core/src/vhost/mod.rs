//! vhost-user: the wire protocol ([`msg`]), the connection ([`socket`]), the back end's control
//! state machine ([`device`]) and control thread ([`server`]), the control/datapath handoff
//! ([`handoff`]), the net software datapath ([`net`]) and the front end's protocol client
//! ([`frontend`], used by the `virtio-user` port).

pub mod device;
pub mod frontend;
pub mod handoff;
pub mod iotlb;
pub mod msg;
pub mod net;
pub mod server;
pub mod socket;

use std::path::PathBuf;

/// Errors of the vhost-user back end and front end. Each names the request and the offending
/// value.
#[derive(Debug, thiserror::Error)]
pub enum VhostError {
    /// Framing or payload error.
    #[error(transparent)]
    Msg(#[from] msg::MsgError),
    /// Connection error.
    #[error(transparent)]
    Conn(#[from] socket::ConnError),
    /// A ring, memory or log problem.
    #[error(transparent)]
    Queue(#[from] crate::virtio::QueueError),
    /// A vring index beyond the device's rings.
    #[error("{req}: vring index {index} is out of range: the device has {count} vrings")]
    BadVring {
        /// Request name.
        req: &'static str,
        /// Index given.
        index: u64,
        /// Vrings the device has.
        count: usize,
    },
    /// A ring size that is not accepted.
    #[error("SET_VRING_NUM: vring {index} size {size} is invalid: accepted is {}", if *packed { "1..=32768" } else { "a power of two in 1..=32768" })]
    BadRingSize {
        /// Vring.
        index: usize,
        /// Size given.
        size: u32,
        /// Whether the packed layout was negotiated.
        packed: bool,
    },
    /// A request or value the back end does not support.
    #[error("{req}: unsupported: {what}")]
    Unsupported {
        /// Request name.
        req: &'static str,
        /// What exactly.
        what: String,
    },
    /// Mapping the dirty log failed.
    #[error("SET_LOG_BASE: cannot map the log of {size} bytes at offset {offset}: {source}")]
    LogMap {
        /// Size.
        size: u64,
        /// Offset.
        offset: u64,
        /// OS error.
        #[source]
        source: std::io::Error,
    },
    /// The back end answered a REPLY_ACK request with a failure status (front end side).
    #[error("{req}: the back end refused it (REPLY_ACK status {status})")]
    Nack {
        /// Request name.
        req: &'static str,
        /// Status it sent (non-zero).
        status: u64,
    },
    /// The back end's reply does not fit the request (front end side).
    #[error("{req}: bad reply from the back end: {why}")]
    BadReply {
        /// Request name.
        req: &'static str,
        /// What is wrong.
        why: String,
    },
    /// The back end lacks a feature the user asked for explicitly (front end side).
    #[error("the back end does not offer {feature}, which {asked} asks for")]
    MissingFeature {
        /// Feature name.
        feature: &'static str,
        /// The spec key that asked for it (`packed=1`...).
        asked: String,
    },
    /// The socket could not be set up.
    #[error("vhost-user socket {}: {why}", path.display())]
    Socket {
        /// Path.
        path: PathBuf,
        /// What failed.
        why: String,
    },
}

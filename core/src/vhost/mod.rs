//! vhost-user: the wire protocol, the connection, and (being built) the back end with its
//! software datapath.

pub mod handoff;
pub mod msg;
pub mod socket;

//! The crate's one error type.

use vdpakit_core::pci::PciError;
use vdpakit_core::vdpa::VdpaError;

use crate::prm::{delivery_status_name, obj, op, status_name};

/// Result alias of this crate.
pub type Result<T> = std::result::Result<T, Error>;

/// The command a failure belongs to: opcode, op_mod and, for general objects, the object type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CmdName {
    /// Opcode.
    pub opcode: u16,
    /// op_mod (the general object type for general object commands).
    pub op_mod: u16,
}

impl std::fmt::Display for CmdName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let name = op::name(self.opcode);
        match self.opcode {
            op::CREATE_GENERAL_OBJECT
            | op::MODIFY_GENERAL_OBJECT
            | op::QUERY_GENERAL_OBJECT
            | op::DESTROY_GENERAL_OBJECT => {
                write!(f, "{name}({})", obj::name(self.op_mod))?;
            }
            _ if self.op_mod != 0 => write!(f, "{name}(op_mod {:#x})", self.op_mod)?,
            _ => f.write_str(name)?,
        }
        write!(f, " [opcode {:#06x}]", self.opcode)
    }
}

/// Everything the mlx5 driver and its model report. Every variant names the device.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The PCI layer failed (register access, MSI-X, DMA mapping).
    #[error(transparent)]
    Pci(#[from] PciError),

    /// Not an mlx5 function, or one this driver does not drive.
    #[error("{dev}: {what}")]
    NotSupported {
        /// Device.
        dev: String,
        /// What is missing.
        what: String,
    },

    /// Driver memory (segments, DMA mapping, allocation).
    #[error("{dev}: {what}")]
    Memory {
        /// Device.
        dev: String,
        /// What failed.
        what: String,
    },

    /// A bounded wait ran out.
    #[error("{dev}: {what} did not happen within {ms} ms")]
    Timeout {
        /// Device.
        dev: String,
        /// What was waited for.
        what: String,
        /// The limit.
        ms: u64,
    },

    /// The command interface refused the command descriptor (delivery status ≠ 0).
    #[error("{dev}: {cmd} was not delivered: {} (delivery status {status:#x})", delivery_status_name(*.status))]
    Delivery {
        /// Device.
        dev: String,
        /// The command.
        cmd: CmdName,
        /// Delivery status.
        status: u8,
    },

    /// Firmware executed the command and failed it.
    #[error(
        "{dev}: {cmd} failed: {} (status {status:#x}, syndrome {syndrome:#010x})",
        status_name(*.status)
    )]
    Command {
        /// Device.
        dev: String,
        /// The command.
        cmd: CmdName,
        /// Command status.
        status: u8,
        /// Firmware syndrome.
        syndrome: u32,
    },

    /// A reply that makes no sense (a count beyond what was asked, an id of 0...).
    #[error("{dev}: {cmd}: {what}")]
    BadReply {
        /// Device.
        dev: String,
        /// The command.
        cmd: CmdName,
        /// What was wrong.
        what: String,
    },

    /// The device is not healthy (health syndrome, dead PCI link, stopped health counter).
    #[error("{dev}: firmware unhealthy: {what}")]
    Health {
        /// Device.
        dev: String,
        /// What the health buffer says.
        what: String,
    },

    /// A parameter the device or driver cannot take (devargs, ring sizes, queue counts).
    #[error("{dev}: {what}")]
    Config {
        /// Device.
        dev: String,
        /// What was wrong, naming the value and what is accepted.
        what: String,
    },

    /// The device model could not be built (memory, threads, a TAP uplink).
    #[error("mlx5 model {name}: {what}")]
    Model {
        /// Model name.
        name: String,
        /// What failed.
        what: String,
    },

    /// A device spec (`mlx5:...`) that does not parse.
    #[error("invalid mlx5 device spec '{spec}': {what}")]
    Spec {
        /// The spec.
        spec: String,
        /// What is wrong and what is accepted.
        what: String,
    },
}

impl Error {
    /// The command status, if this is a firmware command failure.
    pub fn status(&self) -> Option<u8> {
        match self {
            Error::Command { status, .. } => Some(*status),
            _ => None,
        }
    }

    /// The delivery status, if the command was not delivered.
    pub fn delivery(&self) -> Option<u8> {
        match self {
            Error::Delivery { status, .. } => Some(*status),
            _ => None,
        }
    }

    /// The opcode the error belongs to, if any.
    pub fn opcode(&self) -> Option<u16> {
        match self {
            Error::Command { cmd, .. }
            | Error::Delivery { cmd, .. }
            | Error::BadReply { cmd, .. } => Some(cmd.opcode),
            _ => None,
        }
    }
}

impl From<Error> for VdpaError {
    fn from(e: Error) -> VdpaError {
        match e {
            Error::Pci(p) => VdpaError::Pci(p),
            Error::Config { dev, what } => VdpaError::Config { dev, what },
            Error::NotSupported { dev, what } => VdpaError::Unsupported { dev, what },
            Error::Spec { spec, what } => VdpaError::Config {
                dev: "mlx5".into(),
                what: format!("invalid device spec '{spec}': {what}"),
            },
            other => {
                let dev = match &other {
                    Error::Memory { dev, .. }
                    | Error::Timeout { dev, .. }
                    | Error::Delivery { dev, .. }
                    | Error::Command { dev, .. }
                    | Error::BadReply { dev, .. }
                    | Error::Health { dev, .. } => dev.clone(),
                    _ => "mlx5".into(),
                };
                let full = other.to_string();
                let what = full
                    .strip_prefix(&format!("{dev}: "))
                    .unwrap_or(&full)
                    .to_string();
                VdpaError::Device { dev, what }
            }
        }
    }
}

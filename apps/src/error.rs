//! The app's one error type.

/// Errors of the `vdpakit` command.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// An invalid command-line value (exit status 2).
    #[error("invalid {flag} {value}: accepted is {accepted}")]
    Usage {
        /// The flag.
        flag: &'static str,
        /// The value given.
        value: String,
        /// What is accepted.
        accepted: String,
    },
    /// An error from the core layer during set-up (exit status 2: bad input or environment).
    #[error(transparent)]
    Setup(#[from] vdpakit_core::Error),
    /// A PCI set-up error: bad address, device not bound, no IOMMU, ... (exit status 2).
    #[error(transparent)]
    Pci(#[from] vdpakit_core::pci::PciError),
    /// Bad input found below the command line, e.g. a device spec (exit status 2).
    #[error("{0}")]
    Input(String),
    /// A failure while running (exit status 1).
    #[error("{0}")]
    Runtime(String),
}

impl Error {
    /// The process exit status for this error.
    pub fn exit_code(&self) -> i32 {
        match self {
            Error::Usage { .. } | Error::Setup(_) | Error::Pci(_) | Error::Input(_) => 2,
            Error::Runtime(_) => 1,
        }
    }
}

impl From<vdpakit_pmd_virtio::PmdError> for Error {
    fn from(e: vdpakit_pmd_virtio::PmdError) -> Error {
        match e {
            vdpakit_pmd_virtio::PmdError::Pci(p) => Error::Pci(p),
            other => Error::Input(other.to_string()),
        }
    }
}

impl From<vdpakit_core::model::ModelError> for Error {
    fn from(e: vdpakit_core::model::ModelError) -> Error {
        use vdpakit_core::model::ModelError as M;
        match e {
            M::Tap(_) | M::Rep(_) | M::Io(_) => Error::Runtime(e.to_string()),
            _ => Error::Input(e.to_string()),
        }
    }
}

/// Result alias for the app.
pub type Result<T> = std::result::Result<T, Error>;

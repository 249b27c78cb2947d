//! The crate's one error type.

use vdpakit_core::pci::PciError;
use vdpakit_core::vdpa::VdpaError;
use vdpakit_core::virtio_pci::VirtioPciError;

/// Everything the virtio-PCI PMDs report. Every message names the device.
#[derive(Debug, thiserror::Error)]
pub enum PmdError {
    /// The function is not one this PMD drives, or lacks something it needs.
    #[error("{dev}: {what}")]
    Probe {
        /// Device.
        dev: String,
        /// What is wrong, with the register and value.
        what: String,
    },
    /// A value the user or the front end chose that the device cannot take.
    #[error("{dev}: {what}")]
    Config {
        /// Device.
        dev: String,
        /// What is wrong.
        what: String,
    },
    /// The device did not do something in time or reported an error.
    #[error("{dev}: {what}")]
    Device {
        /// Device.
        dev: String,
        /// What happened.
        what: String,
    },
    /// Memory for rings or DMA windows.
    #[error("{dev}: {what}: {source}")]
    Memory {
        /// Device.
        dev: String,
        /// What was being set up.
        what: String,
        /// The cause.
        #[source]
        source: Box<vdpakit_core::Error>,
    },
    /// The virtio-PCI transport.
    #[error(transparent)]
    Transport(#[from] VirtioPciError),
    /// The PCI layer.
    #[error(transparent)]
    Pci(#[from] PciError),
}

impl PmdError {
    /// As a [`VdpaError`] of device `dev` (the message loses a repeated `dev: ` prefix).
    pub fn into_vdpa(self, dev: &str) -> VdpaError {
        match self {
            PmdError::Pci(p) => VdpaError::Pci(p),
            PmdError::Config { dev, what } => VdpaError::Config { dev, what },
            PmdError::Probe { dev, what } | PmdError::Device { dev, what } => {
                VdpaError::Device { dev, what }
            }
            other => {
                let text = other.to_string();
                let what = text
                    .strip_prefix(dev)
                    .and_then(|t| t.strip_prefix(": "))
                    .unwrap_or(&text)
                    .to_string();
                VdpaError::Device {
                    dev: dev.to_string(),
                    what,
                }
            }
        }
    }

    /// As a port error of port `port`.
    pub fn into_port(self, port: &str) -> vdpakit_core::Error {
        vdpakit_core::Error::PortConfig {
            port: port.to_string(),
            why: self.to_string(),
        }
    }
}

/// Result alias.
pub type Result<T> = std::result::Result<T, PmdError>;

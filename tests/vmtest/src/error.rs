//! The crate's single error type.

use std::io;

/// Everything that can go wrong while preparing or running a guest.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A prerequisite (program, package, kernel artefact) is not available on
    /// this machine. Tests report this as *skipped*, never as passed.
    #[error("{what}; {install}")]
    Missing {
        /// What is missing.
        what: String,
        /// What to do about it ("install package X").
        install: String,
    },

    /// An I/O operation failed.
    #[error("{context}: {source}")]
    Io {
        /// What was being done.
        context: String,
        /// The underlying error.
        #[source]
        source: io::Error,
    },

    /// An external command ran but failed.
    #[error("`{command}` failed: {detail}")]
    Command {
        /// The command line, for the message.
        command: String,
        /// Exit status and the tail of its output.
        detail: String,
    },

    /// The kernel has no module of that name (neither loadable nor built in).
    #[error("kernel {kernel} has no module named `{name}`")]
    UnknownModule {
        /// Requested module name.
        name: String,
        /// Kernel release searched.
        kernel: String,
    },

    /// A malformed file (kernel module, package index, ...).
    #[error("{0}")]
    Format(String),

    /// The builder was given an inconsistent configuration.
    #[error("invalid guest configuration: {0}")]
    Config(String),

    /// The guest ran but failed: timeout, kernel panic, QEMU error, or the
    /// test script exited non-zero. The message carries the last console lines.
    #[error("guest `{name}` failed: {reason}\n{report}")]
    GuestFailed {
        /// Guest name.
        name: String,
        /// Short reason.
        reason: String,
        /// QEMU's stderr and the last console lines.
        report: String,
    },

    /// The guest did not print an expected `VMTEST key=value` marker.
    #[error("guest `{name}` printed no `VMTEST {key}=...` marker\n{report}")]
    MissingMarker {
        /// Guest name.
        name: String,
        /// The missing key.
        key: String,
        /// The last console lines.
        report: String,
    },

    /// A host-side helper process (testpmd, a backend) failed.
    #[error("{what}\n--- last lines of its output ---\n{log_tail}")]
    HostProcess {
        /// What went wrong.
        what: String,
        /// The tail of the process's output.
        log_tail: String,
    },
}

impl Error {
    /// If this error means "a prerequisite is missing", the one-line reason to
    /// print when the test is skipped; `None` for real failures.
    pub fn skip_reason(&self) -> Option<String> {
        match self {
            Error::Missing { .. } => Some(self.to_string()),
            _ => None,
        }
    }

    pub(crate) fn io(context: impl Into<String>, source: io::Error) -> Self {
        Error::Io {
            context: context.into(),
            source,
        }
    }

    pub(crate) fn missing(what: impl Into<String>, install: impl Into<String>) -> Self {
        Error::Missing {
            what: what.into(),
            install: install.into(),
        }
    }
}

/// Adds a context string to `io::Result`s.
pub(crate) trait IoContext<T> {
    fn ctx(self, context: impl FnOnce() -> String) -> Result<T, Error>;
}

impl<T> IoContext<T> for io::Result<T> {
    fn ctx(self, context: impl FnOnce() -> String) -> Result<T, Error> {
        self.map_err(|e| Error::io(context(), e))
    }
}

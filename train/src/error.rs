//! Errors of the training core. Each variant carries what a user needs to act:
//! the file, the tensor or the field, and what was expected.

use std::path::PathBuf;

/// Anything that can go wrong while loading, training or generating.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A tensor operation failed (shape mismatch, device error, ...).
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
    /// Reading or writing a file failed.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// A file exists but its content is not what was expected.
    #[error("{}: {message}", path.display())]
    Format {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        message: String,
    },
    /// A checkpoint tensor is missing or has the wrong shape.
    #[error("tensor `{name}` in {}: {message}", path.display())]
    Tensor {
        /// The tensor's checkpoint name.
        name: String,
        /// The file it was expected in.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// The model cannot be found where it was asked for.
    #[error("model `{spec}`: {message}")]
    Model {
        /// The model specification as given.
        spec: String,
        /// What went wrong and how to provide the model.
        message: String,
    },
    /// Tokenizer or chat-template trouble.
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    /// A setting is out of range or inconsistent.
    #[error("{0}")]
    Invalid(String),
    /// The caller asked the work to stop.
    #[error("cancelled")]
    Cancelled,
}

impl Error {
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            source,
        }
    }

    pub(crate) fn format(path: impl Into<PathBuf>, message: impl Into<String>) -> Self {
        Error::Format {
            path: path.into(),
            message: message.into(),
        }
    }
}

/// Result with the training core's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

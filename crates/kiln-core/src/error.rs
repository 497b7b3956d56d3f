//! The one error type of kiln-core. Every variant names the file, tensor or argument at fault
//! and, where it helps, what to do about it.

use std::path::PathBuf;

/// kiln-core's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A file or folder could not be read or written (fs-err already names the path).
    #[error(transparent)]
    Io(#[from] std::io::Error),

    /// A required file or folder is absent.
    #[error("{what} not found: {}{}", path.display(), hint_suffix(hint))]
    NotFound { what: String, path: PathBuf, hint: String },

    /// A JSON/TOML config could not be parsed or is inconsistent.
    #[error("invalid config {}: {msg}", path.display())]
    Config { path: PathBuf, msg: String },

    /// A weight file lacks a tensor the architecture needs.
    #[error("tensor `{name}` missing from {}", path.display())]
    MissingTensor { path: PathBuf, name: String },

    /// A tensor has a different shape than the config implies.
    #[error("tensor `{name}` has shape {found:?}, expected {expected:?}")]
    ShapeMismatch { name: String, expected: Vec<usize>, found: Vec<usize> },

    /// A weight file is truncated, corrupt or of an unsupported layout.
    #[error("cannot read weights {}: {msg}", path.display())]
    Weights { path: PathBuf, msg: String },

    /// A LoRA file is unreadable, of an unsupported kind, or does not fit the model; `msg` names
    /// the layers at fault.
    #[error("LoRA {lora}: {msg}")]
    Lora { lora: String, msg: String },

    /// An image file could not be decoded or encoded.
    #[error("image {}: {msg}", path.display())]
    Image { path: PathBuf, msg: String },

    /// A user-supplied argument is invalid (name the argument in `arg`).
    #[error("invalid {arg}: {msg}")]
    InvalidArgument { arg: String, msg: String },

    /// A model hub lookup failed.
    #[error("model `{repo}`: {msg}")]
    Hub { repo: String, msg: String },

    /// The project's asset library (SQLite) could not be read or written.
    #[error("asset library {}: {msg}", path.display())]
    Library { path: PathBuf, msg: String },

    /// A job would exceed the project's budget.
    #[error("budget exhausted: {0}")]
    Budget(String),

    /// Something the engine does not support (yet).
    #[error("unsupported: {0}")]
    Unsupported(String),

    /// The job was cancelled (by its client, or a server shutting down) before it finished;
    /// nothing was written or recorded.
    #[error("cancelled before it finished; nothing was written")]
    Cancelled,

    /// A named record (job, asset, key) does not exist.
    #[error("{what} {id} does not exist")]
    UnknownId { what: String, id: String },

    /// An API key's daily quota is spent.
    #[error("quota exhausted: {msg}")]
    Quota { msg: String, retry_after_seconds: u64 },

    /// An error from candle that carries no better context.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

fn hint_suffix(hint: &str) -> String {
    if hint.is_empty() {
        String::new()
    } else {
        format!(" ({hint})")
    }
}

impl Error {
    /// Shorthand for [`Error::InvalidArgument`].
    pub fn arg(arg: impl Into<String>, msg: impl Into<String>) -> Self {
        Error::InvalidArgument { arg: arg.into(), msg: msg.into() }
    }

    /// Shorthand for [`Error::Config`].
    pub fn config(path: impl Into<PathBuf>, msg: impl Into<String>) -> Self {
        Error::Config { path: path.into(), msg: msg.into() }
    }

    /// Shorthand for [`Error::NotFound`].
    pub fn not_found(what: impl Into<String>, path: impl Into<PathBuf>, hint: impl Into<String>) -> Self {
        Error::NotFound { what: what.into(), path: path.into(), hint: hint.into() }
    }
}

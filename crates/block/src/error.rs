//! The one error type of the block layer. Every variant names the file it is about.
use std::io;
use std::path::PathBuf;

/// Errors from opening, reading, writing or checking a disk image.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The operating system refused an operation on the file.
    #[error("{}: {op}: {source}", path.display())]
    Io {
        path: PathBuf,
        op: &'static str,
        #[source]
        source: io::Error,
    },
    /// The image's metadata is inconsistent or points outside the file.
    #[error("{}: corrupt image: {reason}", path.display())]
    Corrupt { path: PathBuf, reason: String },
    /// The image uses a feature this block layer does not implement.
    #[error("{}: unsupported: {reason}", path.display())]
    Unsupported { path: PathBuf, reason: String },
    /// A request or option is invalid for this image (out of range, bad size, read-only).
    #[error("{}: {reason}", path.display())]
    Invalid { path: PathBuf, reason: String },
    /// Another process (or another open in this one) uses the image in a way that conflicts
    /// with this open, as its locks say.
    #[error("{}: image is in use: {reason}", path.display())]
    InUse { path: PathBuf, reason: String },
    /// Following backing files leads back to an image already in the chain, or too deep.
    #[error("{}: backing chain problem: {reason}", path.display())]
    BackingChain { path: PathBuf, reason: String },
}

/// Result alias of the block layer.
pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    pub(crate) fn io(path: impl Into<PathBuf>, op: &'static str) -> impl FnOnce(io::Error) -> Error {
        let path = path.into();
        move |source| Error::Io { path, op, source }
    }
    pub(crate) fn corrupt(path: impl Into<PathBuf>, reason: impl Into<String>) -> Error {
        Error::Corrupt { path: path.into(), reason: reason.into() }
    }
    pub(crate) fn unsupported(path: impl Into<PathBuf>, reason: impl Into<String>) -> Error {
        Error::Unsupported { path: path.into(), reason: reason.into() }
    }
    pub(crate) fn invalid(path: impl Into<PathBuf>, reason: impl Into<String>) -> Error {
        Error::Invalid { path: path.into(), reason: reason.into() }
    }
}

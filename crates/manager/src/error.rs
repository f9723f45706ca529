//! The error every service returns: a kind saying what went wrong (the API layer turns it into an
//! HTTP status; services know nothing of HTTP) and one line naming the object and the fix.

/// What kind of failure, as a caller must react to it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// A bad definition or argument; the message starts with the offending key.
    Invalid,
    /// The named object does not exist.
    NotFound,
    /// The object is in the wrong state for the request (running, in use, already there).
    Conflict,
    /// The VMM of a running domain failed or did not answer.
    Vmm,
    /// A wait (for the guest, for a job) ran out.
    Timeout,
    /// Something on the host failed (the store, a file operation).
    Internal,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Error {
    pub kind: ErrorKind,
    pub message: String,
}

impl Error {
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Error {
        Error { kind, message: message.into() }
    }
    pub fn invalid(message: impl Into<String>) -> Error {
        Error::new(ErrorKind::Invalid, message)
    }
    pub fn not_found(message: impl Into<String>) -> Error {
        Error::new(ErrorKind::NotFound, message)
    }
    pub fn conflict(message: impl Into<String>) -> Error {
        Error::new(ErrorKind::Conflict, message)
    }
    pub fn vmm(message: impl Into<String>) -> Error {
        Error::new(ErrorKind::Vmm, message)
    }
    pub fn timeout(message: impl Into<String>) -> Error {
        Error::new(ErrorKind::Timeout, message)
    }
    pub fn internal(message: impl Into<String>) -> Error {
        Error::new(ErrorKind::Internal, message)
    }

    /// The same error with `key: ` in front, when the failure is about one field of a request.
    pub fn for_key(self, key: &str) -> Error {
        Error { message: format!("{key}: {}", self.message), ..self }
    }
}

impl std::fmt::Display for Error {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for Error {}

impl From<rusqlite::Error> for Error {
    fn from(e: rusqlite::Error) -> Error {
        Error::internal(format!("state store: {e}"))
    }
}

pub type Result<T> = std::result::Result<T, Error>;

//! The one error type of the driver and its mapping to gRPC status codes.
//!
//! Every failure carries the gRPC code the CSI spec asks for, so the mapping
//! lives here and nowhere else. Messages are written for the operator: they
//! say what is wrong and, where there is one, what to do about it.

use std::io;

use tonic::{Code, Status};

/// A failed driver operation, tagged with the gRPC code it answers with.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The request is malformed or asks for something Loam never supports.
    #[error("{0}")]
    InvalidArgument(String),
    /// The volume, snapshot, node or path the request names does not exist.
    #[error("{0}")]
    NotFound(String),
    /// The name is taken by an object that differs from the request.
    #[error("{0}")]
    AlreadyExists(String),
    /// The request is valid but conflicts with the volume's current state.
    #[error("{0}")]
    FailedPrecondition(String),
    /// The node has no room (space, attach slots) for what was asked.
    #[error("{0}")]
    ResourceExhausted(String),
    /// Another operation on the same object is in flight; retry later.
    #[error("{0}")]
    Aborted(String),
    /// The requested capacity cannot be served.
    #[error("{0}")]
    OutOfRange(String),
    /// A filesystem or kernel call failed.
    #[error("{context}: {source}")]
    Io {
        /// What the driver was doing, naming the path involved.
        context: String,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// Stored metadata could not be read back; the operator must repair it.
    #[error("{0}")]
    Damaged(String),
    /// A node agent cannot be reached; the call may be retried.
    #[error("{0}")]
    Unavailable(String),
    /// A node agent did not answer in time; the operation may still finish.
    #[error("{0}")]
    DeadlineExceeded(String),
    /// The caller of an agent endpoint did not present the agent token.
    #[error("{0}")]
    Unauthenticated(String),
    /// A node agent's own answer, passed on unchanged.
    #[error("{}", .status.message())]
    Forwarded {
        /// The agent's status, code and message as it sent them.
        status: Status,
    },
}

/// Most bytes of caller text an error message quotes.
pub const MAX_QUOTED: usize = 128;

/// Quotes text a caller sent (an id, a token, a parameter) for an error
/// message, cut to [`MAX_QUOTED`] bytes: a reply that echoed a 100 KB field
/// would itself exceed the client's message limit.
pub fn quote(text: &str) -> String {
    if text.len() <= MAX_QUOTED {
        return format!("{text:?}");
    }
    let end = (0..=MAX_QUOTED).rev().find(|&i| text.is_char_boundary(i)).unwrap_or(0);
    format!("{:?}... ({} bytes)", &text[..end], text.len())
}

/// Shorthand for results of driver operations.
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// The gRPC code this error answers with.
    pub fn code(&self) -> Code {
        match self {
            Error::InvalidArgument(_) => Code::InvalidArgument,
            Error::NotFound(_) => Code::NotFound,
            Error::AlreadyExists(_) => Code::AlreadyExists,
            Error::FailedPrecondition(_) => Code::FailedPrecondition,
            Error::ResourceExhausted(_) => Code::ResourceExhausted,
            Error::Aborted(_) => Code::Aborted,
            Error::OutOfRange(_) => Code::OutOfRange,
            Error::Unavailable(_) => Code::Unavailable,
            Error::DeadlineExceeded(_) => Code::DeadlineExceeded,
            Error::Unauthenticated(_) => Code::Unauthenticated,
            Error::Forwarded { status } => status.code(),
            // A full filesystem is the node running out of room, not a bug.
            Error::Io { source, .. } if is_no_space(source) => Code::ResourceExhausted,
            Error::Io { .. } | Error::Damaged(_) => Code::Internal,
        }
    }

    /// Wraps an I/O error with what was being done when it happened.
    pub fn io(context: impl Into<String>, source: io::Error) -> Error {
        Error::Io { context: context.into(), source }
    }

    /// Wraps an error met at a path the caller named: a symlink there
    /// (`InvalidInput`) is an invalid argument and something of the wrong
    /// kind (a file where a directory belongs) a failed precondition, both
    /// the caller's to fix; the rest is the machine failing.
    pub fn at_caller_path(context: impl Into<String>, source: io::Error) -> Error {
        match source.kind() {
            io::ErrorKind::InvalidInput => Error::InvalidArgument(format!("{}: {source}", context.into())),
            io::ErrorKind::NotADirectory | io::ErrorKind::IsADirectory => {
                Error::FailedPrecondition(format!("{}: {source}", context.into()))
            }
            _ => Error::io(context, source),
        }
    }
}

fn is_no_space(err: &io::Error) -> bool {
    // By kind too: errors rewrapped with a message (fallocate's) lose the errno.
    matches!(err.raw_os_error(), Some(libc::ENOSPC) | Some(libc::EDQUOT))
        || matches!(err.kind(), io::ErrorKind::StorageFull | io::ErrorKind::QuotaExceeded)
}

impl From<Error> for Status {
    fn from(err: Error) -> Status {
        Status::new(err.code(), err.to_string())
    }
}

/// Adds context to `io::Result`s, turning them into driver errors.
pub trait IoContext<T> {
    /// Names what was being done, lazily, when the call failed.
    fn context(self, what: impl FnOnce() -> String) -> Result<T>;
}

impl<T> IoContext<T> for io::Result<T> {
    fn context(self, what: impl FnOnce() -> String) -> Result<T> {
        self.map_err(|source| Error::io(what(), source))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn full_filesystem_is_resource_exhausted() {
        let err = Error::io("writing", io::Error::from_raw_os_error(libc::ENOSPC));
        assert_eq!(Status::from(err).code(), Code::ResourceExhausted);
        // fallocate's error is rewrapped with a message, keeping only the kind.
        let rewrapped = io::Error::new(io::ErrorKind::StorageFull, "fallocate 64 bytes: ENOSPC");
        assert_eq!(Status::from(Error::io("allocating", rewrapped)).code(), Code::ResourceExhausted);
    }

    #[test]
    fn quotes_are_bounded_and_keep_short_text_whole() {
        assert_eq!(quote("a\"b"), "\"a\\\"b\"");
        let long = "é".repeat(100_000);
        let quoted = quote(&long);
        assert!(quoted.len() < 2 * MAX_QUOTED, "{}", quoted.len());
        assert!(quoted.ends_with("(200000 bytes)"), "{quoted}");
    }

    #[test]
    fn caller_path_mistakes_are_not_internal() {
        let link = io::Error::new(io::ErrorKind::InvalidInput, "/t is a symlink");
        assert_eq!(Status::from(Error::at_caller_path("staging", link)).code(), Code::InvalidArgument);
        let file = io::Error::new(io::ErrorKind::NotADirectory, "/t is not a directory");
        assert_eq!(Status::from(Error::at_caller_path("target", file)).code(), Code::FailedPrecondition);
        let eio = io::Error::from_raw_os_error(libc::EIO);
        assert_eq!(Status::from(Error::at_caller_path("target", eio)).code(), Code::Internal);
    }

    #[test]
    fn other_io_errors_are_internal_and_keep_their_context() {
        let err = Error::io("reading /x", io::Error::from_raw_os_error(libc::EIO));
        let status = Status::from(err);
        assert_eq!(status.code(), Code::Internal);
        assert!(status.message().starts_with("reading /x: "));
    }
}

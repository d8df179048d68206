//! [`OpError`]: a failed operation with its protocol error class, as the peer sees it.

use protocol::ErrorCode;

use crate::spawn;

/// An error with its protocol class.
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct OpError {
    /// Class.
    pub code: ErrorCode,
    /// What failed and what to do.
    pub message: String,
}

impl OpError {
    /// An error of class `code`.
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
        }
    }

    /// The agent could not start a thread for `what` (a pids or memory limit was reached).
    pub fn no_thread(what: &str, e: &std::io::Error) -> Self {
        Self::new(
            ErrorCode::ResourceExhausted,
            format!(
                "the agent cannot start a thread for {what} ({e}): its pids or memory limit is \
                 reached; close idle connections or retry later"
            ),
        )
    }
}

impl From<spawn::SpawnError> for OpError {
    fn from(e: spawn::SpawnError) -> Self {
        let code = match e {
            spawn::SpawnError::Invalid(_) => ErrorCode::BadRequest,
            spawn::SpawnError::Join(_) => ErrorCode::Io,
            _ => ErrorCode::Spawn,
        };
        Self::new(code, e.to_string())
    }
}

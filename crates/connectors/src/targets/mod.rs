//! Targets.

pub mod databricks;
pub mod file;
pub mod kanidm;
pub mod lakefs;
pub mod scim;

use crate::http::{ErrorKind, HttpError};
use idsync_engine::{TargetError, TargetErrorKind};

/// What to tell a person when a target refuses a request: appended to the service's message.
#[derive(Clone, Copy, Debug, Default)]
pub struct Hints {
    /// On 401: which credentials to check.
    pub unauthorized: &'static str,
    /// On 403: which role writes need.
    pub forbidden: &'static str,
    /// On 501: what the target lacks.
    pub not_implemented: &'static str,
}

/// One conversion from HTTP errors to target errors for every HTTP target, with its hints.
pub fn target_error(e: HttpError, hints: &Hints) -> TargetError {
    let (kind, hint) = match e.kind {
        ErrorKind::Unauthorized => (TargetErrorKind::Unauthorized, hints.unauthorized),
        ErrorKind::Forbidden => (TargetErrorKind::Forbidden, hints.forbidden),
        ErrorKind::NotImplemented => (TargetErrorKind::NotImplemented, hints.not_implemented),
        ErrorKind::NotFound => (TargetErrorKind::NotFound, ""),
        ErrorKind::Conflict => (TargetErrorKind::AlreadyExists, ""),
        ErrorKind::Throttled => (TargetErrorKind::Throttled, ""),
        ErrorKind::Unavailable => (TargetErrorKind::Unavailable, ""),
        ErrorKind::Protocol => (TargetErrorKind::Protocol, ""),
        ErrorKind::Invalid | ErrorKind::Gone if e.status == Some(412) => (
            TargetErrorKind::Invalid,
            " The resource changed in the target since it was observed (ETag): the next run sees the change and plans again.",
        ),
        ErrorKind::Invalid | ErrorKind::Gone => (TargetErrorKind::Invalid, ""),
    };
    TargetError::new(kind, format!("{}{hint}", e.message))
}

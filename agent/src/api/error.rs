//! The API's error answer: a status code and a JSON body `{"error": "...", "key": "..."}`.
//!
//! Every failure a handler can meet converts into [`ApiError`]; the status codes follow
//! DESIGN.md: 400 invalid input, 403 caller not allowed, 404 unknown resource, 405 wrong
//! method, 409 conflict, 413 body too large, 422 nothing to commit / candidate refused,
//! 500 only for bugs, 503/507 when the state directory cannot be written.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde_json::json;

use crate::store::StoreError;

#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub message: String,
    pub key: Option<String>,
}

impl ApiError {
    pub fn new(status: StatusCode, message: impl Into<String>) -> Self {
        ApiError {
            status,
            message: message.into(),
            key: None,
        }
    }

    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, message)
    }

    pub fn with_key(mut self, key: impl Into<String>) -> Self {
        self.key = Some(key.into());
        self
    }

    /// An invalid-settings error, answered with `status`, naming the key when it has one.
    pub fn invalid(status: StatusCode, e: &settings_model::Error) -> Self {
        ApiError {
            status,
            message: e.to_string(),
            key: e.key().map(str::to_owned),
        }
    }

    /// A store error met while committing: an invalid candidate is 422, not 400, because
    /// the request itself was well-formed.
    pub fn from_commit(e: StoreError) -> Self {
        match e {
            StoreError::Invalid(e) => ApiError::invalid(StatusCode::UNPROCESSABLE_ENTITY, &e),
            other => other.into(),
        }
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        match &e {
            StoreError::Invalid(inner) => ApiError::invalid(StatusCode::BAD_REQUEST, inner),
            StoreError::NothingPending(_) => {
                ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, e.to_string())
            }
            StoreError::Refused(check) => ApiError {
                status: StatusCode::UNPROCESSABLE_ENTITY,
                message: e.to_string(),
                key: check.key.clone(),
            },
            StoreError::UnknownGeneration(_) => ApiError::new(StatusCode::NOT_FOUND, e.to_string()),
            StoreError::Full { .. } | StoreError::SettingsTooLarge { .. } => {
                ApiError::new(StatusCode::CONFLICT, e.to_string())
            }
            StoreError::Io { source, .. }
                if source.raw_os_error() == Some(libc::ENOSPC)
                    || source.kind() == std::io::ErrorKind::StorageFull =>
            {
                ApiError::new(StatusCode::INSUFFICIENT_STORAGE, e.to_string())
            }
            StoreError::Io { .. } | StoreError::Closed => {
                ApiError::new(StatusCode::SERVICE_UNAVAILABLE, e.to_string())
            }
            StoreError::Corrupt { .. } | StoreError::Damaged { .. } => {
                ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string())
            }
        }
    }
}

impl From<crate::apply::ApplyTaskFailed> for ApiError {
    fn from(e: crate::apply::ApplyTaskFailed) -> Self {
        ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string())
    }
}

impl From<settings_model::Error> for ApiError {
    fn from(e: settings_model::Error) -> Self {
        ApiError::invalid(StatusCode::BAD_REQUEST, &e)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = match &self.key {
            Some(key) => json!({ "error": self.message, "key": key }),
            None => json!({ "error": self.message }),
        };
        if self.status.is_server_error() {
            tracing::error!(status = self.status.as_u16(), error = %self.message, "request failed");
        }
        let mut response = (self.status, axum::Json(body)).into_response();
        // For the access layer's log line of a refusal (which knows the method, path
        // and caller): the key, never the value.
        response.extensions_mut().insert(Refused { key: self.key });
        response
    }
}

pub type ApiResult<T> = Result<T, ApiError>;

/// What an error answer refused, for the log line of [`super::peer::require_access`].
#[derive(Debug, Clone)]
pub struct Refused {
    pub key: Option<String>,
}

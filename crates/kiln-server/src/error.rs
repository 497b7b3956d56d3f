//! Typed API errors: each becomes a status code and a JSON body whose message says what is
//! wrong and what to do. Library errors keep their own words (they name the field at fault).

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use kiln_core::Error as CoreError;

/// An error answered to a client.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("{0}")]
    BadRequest(String),
    #[error("{0}")]
    Unauthorized(String),
    #[error("{0}")]
    Forbidden(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Conflict(String),
    #[error("{msg}")]
    TooMany { msg: String, retry_after: u64 },
    #[error("{0}")]
    PayloadTooLarge(String),
    #[error("{0}")]
    Unavailable(String),
    #[error("{0}")]
    Internal(String),
}

impl ApiError {
    pub fn bad(msg: impl Into<String>) -> Self {
        ApiError::BadRequest(msg.into())
    }

    fn status(&self) -> StatusCode {
        match self {
            ApiError::BadRequest(_) => StatusCode::BAD_REQUEST,
            ApiError::Unauthorized(_) => StatusCode::UNAUTHORIZED,
            ApiError::Forbidden(_) => StatusCode::FORBIDDEN,
            ApiError::NotFound(_) => StatusCode::NOT_FOUND,
            ApiError::Conflict(_) => StatusCode::CONFLICT,
            ApiError::TooMany { .. } => StatusCode::TOO_MANY_REQUESTS,
            ApiError::PayloadTooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }
}

impl From<CoreError> for ApiError {
    fn from(e: CoreError) -> Self {
        let msg = e.to_string();
        match e {
            CoreError::InvalidArgument { .. }
            | CoreError::Image { .. }
            | CoreError::ShapeMismatch { .. }
            | CoreError::Lora { .. } => ApiError::BadRequest(msg),
            CoreError::UnknownId { .. } => ApiError::NotFound(msg),
            CoreError::Budget(_) => ApiError::TooMany { msg, retry_after: 3600 },
            CoreError::Quota { retry_after_seconds, .. } => {
                ApiError::TooMany { msg, retry_after: retry_after_seconds }
            }
            CoreError::Cancelled => ApiError::Conflict(msg),
            CoreError::Config { .. } | CoreError::NotFound { .. } | CoreError::Hub { .. } => {
                ApiError::Unavailable(msg)
            }
            _ => ApiError::Internal(msg),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = self.status();
        // OpenAI's error shape; A1111 and native clients read `error.message` or `detail`.
        let body = serde_json::json!({
            "error": { "message": self.to_string(), "type": status.canonical_reason().unwrap_or("error"), "code": status.as_u16() },
            "detail": self.to_string(),
        });
        let mut resp = (status, axum::Json(body)).into_response();
        if let ApiError::TooMany { retry_after, .. } = &self {
            if let Ok(v) = HeaderValue::from_str(&retry_after.to_string()) {
                resp.headers_mut().insert(header::RETRY_AFTER, v);
            }
        }
        if let ApiError::Unauthorized(_) = &self {
            resp.headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer, Basic realm=\"kiln\""));
        }
        resp
    }
}

pub type ApiResult<T> = Result<T, ApiError>;

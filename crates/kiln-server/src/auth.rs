//! API keys on every request once the project has any (`/healthz` and the web page excepted): `Authorization:
//! Bearer KEY` (native and OpenAI routes) or HTTP Basic with the key as the password (A1111
//! clients). The key's name becomes the request's [`Owner`].

use crate::error::ApiError;
use crate::state::{AppState, Owner};
use axum::extract::{Request, State};
use axum::http::header::AUTHORIZATION;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use base64::Engine as _;
use kiln_core::jobs::keys::Keys;
use std::sync::Arc;

/// The owner's daily quota (None = unlimited), carried with the request.
#[derive(Debug, Clone, Copy)]
pub struct Quota(pub Option<f64>);

fn presented_key(req: &Request) -> Option<String> {
    let value = req.headers().get(AUTHORIZATION)?.to_str().ok()?.trim();
    if let Some(token) = value.strip_prefix("Bearer ").or_else(|| value.strip_prefix("bearer ")) {
        return Some(token.trim().to_string());
    }
    let basic = value.strip_prefix("Basic ").or_else(|| value.strip_prefix("basic "))?;
    let decoded = base64::engine::general_purpose::STANDARD.decode(basic.trim()).ok()?;
    let text = String::from_utf8(decoded).ok()?;
    let (user, password) = text.split_once(':').unwrap_or((&text, ""));
    Some(if password.is_empty() { user.to_string() } else { password.to_string() })
}

pub async fn require_key(State(state): State<Arc<AppState>>, mut req: Request, next: Next) -> Response {
    // The page and its files are the same for everyone and hold no data: it asks for a key
    // itself when the API answers 401.
    if req.uri().path() == "/healthz" || crate::web::is_public(req.uri().path()) {
        return next.run(req).await;
    }
    let keys = match Keys::open(&state.engine.project) {
        Ok(k) => k,
        Err(e) => return ApiError::from(e).into_response(),
    };
    let (owner, quota) = match keys.any_active() {
        Ok(false) => (Owner("local".into()), Quota(None)),
        Ok(true) => {
            let Some(key) = presented_key(&req) else {
                return ApiError::Unauthorized(
                    "this server needs an API key: send `Authorization: Bearer KEY` (or HTTP Basic with the key \
                     as password); `kiln keys add NAME` makes one"
                        .into(),
                )
                .into_response();
            };
            match keys.verify(&key) {
                Ok(Some(info)) => (Owner(info.name), Quota(info.quota)),
                Ok(None) => {
                    return ApiError::Unauthorized("the API key is unknown or revoked".into()).into_response()
                }
                Err(e) => return ApiError::from(e).into_response(),
            }
        }
        Err(e) => return ApiError::from(e).into_response(),
    };
    req.extensions_mut().insert(owner);
    req.extensions_mut().insert(quota);
    next.run(req).await
}

//! Who may use the API: a bearer token kept in the state directory (mode 0600), or — for the
//! web page — a session cookie got with that token, plus a CSRF token on every change.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use axum::extract::{Request, State};
use axum::http::{header, HeaderMap, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{Html, IntoResponse, Redirect, Response};
use rand::RngCore;
use subtle::ConstantTimeEq;
use vnf_core::{Error, Result};

use super::{ApiError, AppState};

pub const TOKEN_FILE: &str = "api.token";
pub const SESSION_COOKIE: &str = "dockwall_session";
pub const CSRF_HEADER: &str = "x-csrf-token";
/// Sessions kept at once; the oldest goes first, so a login loop cannot grow memory.
const MAX_SESSIONS: usize = 64;

pub fn token_path(state_dir: &Path) -> PathBuf {
    state_dir.join(TOKEN_FILE)
}

fn random_hex() -> String {
    let mut bytes = [0u8; 32];
    rand::rng().fill_bytes(&mut bytes);
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The API token, created (mode 0600) when there is none yet, or replaced when `rotate`.
pub fn ensure_token(state_dir: &Path, rotate: bool) -> Result<String> {
    let path = token_path(state_dir);
    if !rotate {
        match std::fs::read_to_string(&path) {
            Ok(text) if !text.trim().is_empty() => return Ok(text.trim().to_string()),
            Ok(_) => {}
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => {}
            Err(source) => {
                return Err(Error::Io {
                    context: format!("read {}", path.display()),
                    source,
                })
            }
        }
    }
    std::fs::create_dir_all(state_dir).map_err(|source| Error::Io {
        context: format!(
            "create the state directory {} (pass --state-dir or DOCKWALL_STATE_DIR)",
            state_dir.display()
        ),
        source,
    })?;
    let token = random_hex();
    vnf_core::fs::write_atomically(&path, format!("{token}\n").as_bytes(), 0o600).map_err(
        |source| Error::Io {
            context: format!("write {}", path.display()),
            source,
        },
    )?;
    Ok(token)
}

/// A logged-in browser session.
struct Session {
    id: String,
    csrf: String,
    /// The API token it logged in with: rotating the token ends the session.
    token: String,
}

/// Logged-in browser sessions, oldest first.
#[derive(Default)]
pub struct Sessions(Mutex<Vec<Session>>);

impl Sessions {
    /// A new session for a login with `token`; returns its id.
    pub fn open(&self, token: &str) -> String {
        let session = Session {
            id: random_hex(),
            csrf: random_hex(),
            token: token.to_string(),
        };
        let id = session.id.clone();
        let mut sessions = self.0.lock().unwrap_or_else(|p| p.into_inner());
        if sessions.len() >= MAX_SESSIONS {
            sessions.remove(0);
        }
        sessions.push(session);
        id
    }

    /// The CSRF token of a session, when it exists and logged in with the current token.
    fn csrf_of(&self, session: &str, token: &str) -> Option<String> {
        let sessions = self.0.lock().unwrap_or_else(|p| p.into_inner());
        sessions
            .iter()
            .find(|s| equal(&s.id, session) && equal(&s.token, token))
            .map(|s| s.csrf.clone())
    }
}

/// Constant-time comparison, so response timing does not reveal how much of a guess matched.
pub fn equal(a: &str, b: &str) -> bool {
    a.len() == b.len() && bool::from(a.as_bytes().ct_eq(b.as_bytes()))
}

pub fn cookies(headers: &HeaderMap) -> HashMap<String, String> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .map(|(name, value)| (name.to_string(), value.to_string()))
        .collect()
}

/// How a request proved itself.
pub enum Caller {
    /// An API client with the bearer token.
    Bearer,
    /// A browser session, with its CSRF token.
    Session { csrf: String },
}

pub fn caller(state: &AppState, headers: &HeaderMap) -> Result<Option<Caller>> {
    let token = ensure_token(&state.state_dir, false)?;
    let bearer = headers
        .get(header::AUTHORIZATION)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.strip_prefix("Bearer "));
    if let Some(given) = bearer {
        return Ok(equal(given.trim(), &token).then_some(Caller::Bearer));
    }
    Ok(cookies(headers)
        .get(SESSION_COOKIE)
        .and_then(|session| state.sessions.csrf_of(session, &token))
        .map(|csrf| Caller::Session { csrf }))
}

/// Lets through requests with the bearer token, and browser sessions whose changes carry
/// their CSRF token; everything else gets 401 (403 for a session change without CSRF).
pub async fn require(State(state): State<AppState>, request: Request, next: Next) -> Response {
    match caller(&state, request.headers()) {
        Err(error) => ApiError::from(error).into_response(),
        Ok(None) if request.uri().path() == "/" => login_instead(request.uri().query()),
        Ok(None) => ApiError::unauthorized().into_response(),
        Ok(Some(Caller::Bearer)) => next.run(request).await,
        Ok(Some(Caller::Session { csrf })) => {
            let safe = matches!(*request.method(), Method::GET | Method::HEAD);
            let given = request
                .headers()
                .get(CSRF_HEADER)
                .and_then(|value| value.to_str().ok())
                .unwrap_or_default();
            if safe || equal(given, &csrf) {
                next.run(request).await
            } else {
                ApiError::new(
                    StatusCode::FORBIDDEN,
                    "CsrfTokenMissing",
                    format!("a change from the web page needs the {CSRF_HEADER} header of its session; reload the page"),
                )
                .into_response()
            }
        }
    }
}

/// A browser at `/` without a session: `/?token=…` logs in, anything else gets the login form.
fn login_instead(query: Option<&str>) -> Response {
    match query {
        Some(query) if query.starts_with("token=") => {
            Redirect::to(&format!("/login?{query}")).into_response()
        }
        _ => (
            StatusCode::UNAUTHORIZED,
            Html(super::handlers::LOGIN_PAGE.replace("{{error}}", "")),
        )
            .into_response(),
    }
}

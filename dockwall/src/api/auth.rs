//! Who may use the API: a bearer token kept in the state directory (mode 0600), or — for the
//! web page — a session cookie got with that token, plus a CSRF token on every change.

use std::collections::HashMap;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime};

use axum::extract::{Request, State};
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{Html, IntoResponse, Response};
use rand::RngCore;
use subtle::ConstantTimeEq;
use tracing::warn;
use vnf_core::firewall::store::Store;
use vnf_core::{Error, Result};

use super::{ApiError, AppState};

pub const TOKEN_FILE: &str = "api.token";
pub const SESSION_COOKIE: &str = "dockwall_session";
pub const CSRF_HEADER: &str = "x-csrf-token";
/// Sessions kept at once; the oldest goes first, so a login loop cannot grow memory.
const MAX_SESSIONS: usize = 64;
/// A browser session ends this long after its login (the cookie's Max-Age says the same).
pub const SESSION_LIFETIME: Duration = Duration::from_secs(12 * 60 * 60);

pub fn token_path(state_dir: &Path) -> PathBuf {
    state_dir.join(TOKEN_FILE)
}

fn random_hex() -> String {
    let mut bytes = [0u8; 32];
    rand::rng().fill_bytes(&mut bytes);
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The API token, created (mode 0600) when there is none yet, or replaced when `rotate`;
/// under the state directory's lock, so two first runs cannot create two different tokens.
pub fn ensure_token(state_dir: &Path, rotate: bool) -> Result<String> {
    let path = token_path(state_dir);
    let _locked = Store::new(state_dir).lock()?;
    if !rotate {
        if let Some(token) = read_token(&path)? {
            return Ok(token);
        }
    }
    let token = random_hex();
    vnf_core::fs::write_atomically(&path, format!("{token}\n").as_bytes(), 0o600).map_err(
        |source| Error::Io {
            context: format!("write {}", path.display()),
            source,
        },
    )?;
    Ok(token)
}

/// The token in `path`; None when the file is missing or empty.
fn read_token(path: &Path) -> Result<Option<String>> {
    match std::fs::read_to_string(path) {
        Ok(text) if !text.trim().is_empty() => Ok(Some(text.trim().to_string())),
        Ok(_) => Ok(None),
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(Error::Io {
            context: format!("read {}", path.display()),
            source,
        }),
    }
}

/// The server's copy of the token: re-read only when the file changes (`api token --rotate`
/// replaces it, so its inode and mtime change), never created on a request. While the file
/// is missing or unreadable the last token read stays valid.
pub struct TokenCache {
    path: PathBuf,
    current: Mutex<(Option<(u64, SystemTime)>, String)>,
}

impl TokenCache {
    /// Creates the token when there is none yet.
    pub fn load(state_dir: &Path) -> Result<Self> {
        let token = ensure_token(state_dir, false)?;
        let path = token_path(state_dir);
        Ok(TokenCache {
            current: Mutex::new((file_version(&path), token)),
            path,
        })
    }

    pub fn get(&self) -> String {
        let mut current = self.current.lock().unwrap_or_else(|p| p.into_inner());
        let version = file_version(&self.path);
        if version.is_some() && version != current.0 {
            match read_token(&self.path) {
                Ok(Some(token)) => *current = (version, token),
                Ok(None) => {}
                Err(error) => warn!(%error, "keeping the API token read before"),
            }
        }
        current.1.clone()
    }
}

/// What identifies one version of the token file: its inode and mtime.
fn file_version(path: &Path) -> Option<(u64, SystemTime)> {
    let metadata = std::fs::metadata(path).ok()?;
    Some((metadata.ino(), metadata.modified().ok()?))
}

/// A logged-in browser session.
struct Session {
    id: String,
    csrf: String,
    /// The API token it logged in with: rotating the token ends the session.
    token: String,
    opened: Instant,
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
            opened: Instant::now(),
        };
        let id = session.id.clone();
        let mut sessions = self.0.lock().unwrap_or_else(|p| p.into_inner());
        sessions.retain(|s| s.opened.elapsed() < SESSION_LIFETIME);
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
            .find(|s| {
                equal(&s.id, session)
                    && equal(&s.token, token)
                    && s.opened.elapsed() < SESSION_LIFETIME
            })
            .map(|s| s.csrf.clone())
    }

    /// Ends the session `session` (logout).
    pub fn close(&self, session: &str) {
        let mut sessions = self.0.lock().unwrap_or_else(|p| p.into_inner());
        sessions.retain(|s| !equal(&s.id, session));
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

pub fn caller(state: &AppState, headers: &HeaderMap) -> Option<Caller> {
    let token = state.token.get();
    let bearer = headers
        .get(header::AUTHORIZATION)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.strip_prefix("Bearer "));
    if let Some(given) = bearer {
        return equal(given.trim(), &token).then_some(Caller::Bearer);
    }
    cookies(headers)
        .get(SESSION_COOKIE)
        .and_then(|session| state.sessions.csrf_of(session, &token))
        .map(|csrf| Caller::Session { csrf })
}

/// Lets through requests with the bearer token, and browser sessions whose changes carry
/// their CSRF token; everything else gets 401 (403 for a session change without CSRF).
pub async fn require(State(state): State<AppState>, request: Request, next: Next) -> Response {
    match caller(&state, request.headers()) {
        None if request.uri().path() == "/" => login_instead(),
        None => ApiError::unauthorized().into_response(),
        Some(Caller::Bearer) => next.run(request).await,
        Some(Caller::Session { csrf }) => {
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

/// A browser at `/` without a session gets the login form (which also logs in with
/// `/#token=TOKEN`).
fn login_instead() -> Response {
    (
        StatusCode::UNAUTHORIZED,
        Html(super::handlers::LOGIN_PAGE.replace("{{error}}", "")),
    )
        .into_response()
}

/// Whether a login POST comes from this server's own page: browsers say so in
/// `Sec-Fetch-Site`, or else in `Origin`; a client that sends neither is no browser, so
/// no other site can have made it post.
pub fn same_origin(headers: &HeaderMap, https: bool) -> bool {
    let text = |name| {
        headers
            .get(name)
            .and_then(|value: &HeaderValue| value.to_str().ok())
    };
    if let Some(site) = text(header::HeaderName::from_static("sec-fetch-site")) {
        return site == "same-origin";
    }
    match (text(header::ORIGIN), text(header::HOST)) {
        (None, _) => true,
        (Some(origin), Some(host)) => {
            let scheme = if https { "https" } else { "http" };
            origin == format!("{scheme}://{host}")
        }
        (Some(_), None) => false,
    }
}

//! The REST API and the web page, served by `dockwall run --api-listen ADDR:PORT`.
//!
//! Firewall rules are FWaaS v2 resources under `/v2.0/fwaas/`; there is one implicit
//! firewall policy per Dockwall direction, whose id is the direction (`left-to-right`, also
//! `egress`; `right-to-left`, also `ingress`; `both`; `local`). NAT rules, the default policy
//! and the status are Dockwall's own, under `/v2.0/dockwall/`. Every change is one
//! `vnf_core::firewall::edit`, the same locked load → change → apply → save as the CLI, run on
//! a blocking thread so the server keeps answering while nft works.

mod auth;
mod handlers;
mod resources;
mod server;
mod tls;

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;

use axum::extract::DefaultBodyLimit;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use axum::{Json, Router};
use clap::{Args, Subcommand};
use serde_json::json;
use tracing::info;
use vnf_core::firewall::store::Store;
use vnf_core::firewall::Session;
use vnf_core::runtime::RuntimeConfig;
use vnf_core::{Error, Result};

pub use auth::ensure_token;

/// A request body larger than this gets 413: a rule is a few hundred bytes.
const MAX_BODY_BYTES: usize = 64 * 1024;

#[derive(Args, Debug, Clone)]
pub struct ApiArgs {
    /// Serve the REST API and the web page on this address (the management side's, e.g.
    /// 192.0.2.5:8443) [default: off]. Clients authenticate with the token `dockwall api
    /// token` prints. HTTPS when the state directory holds api.crt and api.key (PEM)
    #[arg(
        long,
        env = "DOCKWALL_API_LISTEN",
        value_name = "ADDR:PORT",
        help_heading = vnf_core::cli::OUTPUT
    )]
    pub api_listen: Option<SocketAddr>,
}

#[derive(Subcommand, Debug)]
pub enum ApiCommand {
    /// Print the API's bearer token (created in the state directory, mode 0600, when there
    /// is none yet)
    Token {
        /// Replace the token with a new one; clients and browser sessions must log in again
        #[arg(long)]
        rotate: bool,
    },
}

pub fn command(state_dir: &Path, command: ApiCommand) -> Result<()> {
    match command {
        ApiCommand::Token { rotate } => println!("{}", ensure_token(state_dir, rotate)?),
    }
    Ok(())
}

/// What every handler shares.
#[derive(Clone)]
pub struct AppState(Arc<Shared>);

pub struct Shared {
    pub store: Store,
    pub config: RuntimeConfig,
    pub token: auth::TokenCache,
    pub sessions: auth::Sessions,
    /// The rule set and compile of the API's last edit: the next one skips loading the state
    /// file and compiling the old set while no CLI edit came between.
    pub edits: std::sync::Mutex<Session>,
    /// Served over TLS (`api.crt` and `api.key` in the state directory): cookies are Secure.
    pub https: bool,
}

impl std::ops::Deref for AppState {
    type Target = Shared;
    fn deref(&self) -> &Shared {
        &self.0
    }
}

/// Binds `address` and serves the API from a task of its own until the process exits.
/// Binding happens now, so a taken port fails `run` at start.
pub async fn spawn(address: SocketAddr, state_dir: &Path, config: RuntimeConfig) -> Result<()> {
    let token = auth::TokenCache::load(state_dir)?;
    let listener = tokio::net::TcpListener::bind(address)
        .await
        .map_err(|source| Error::Io {
            context: format!("listen on --api-listen {address} (is the port taken?)"),
            source,
        })?;
    let acceptor = tls::acceptor(state_dir)?;
    let state = AppState(Arc::new(Shared {
        store: Store::new(state_dir),
        config,
        token,
        sessions: auth::Sessions::default(),
        edits: std::sync::Mutex::default(),
        https: acceptor.is_some(),
    }));
    info!(%address, https = acceptor.is_some(), "API and web page listening");
    let app = router(state);
    tokio::spawn(server::serve(listener, acceptor, app));
    Ok(())
}

fn router(state: AppState) -> Router {
    use handlers::*;
    let api = Router::new()
        .route(
            "/v2.0/fwaas/firewall_rules",
            get(list_rules).post(create_rule),
        )
        .route(
            "/v2.0/fwaas/firewall_rules/{id}",
            get(show_rule).put(update_rule).delete(delete_rule),
        )
        .route("/v2.0/fwaas/firewall_policies", get(list_policies))
        .route("/v2.0/fwaas/firewall_policies/{id}", get(show_policy))
        .route(
            "/v2.0/fwaas/firewall_policies/{id}/insert_rule",
            put(insert_rule),
        )
        .route(
            "/v2.0/fwaas/firewall_policies/{id}/remove_rule",
            put(remove_rule),
        )
        .route("/v2.0/dockwall/nat_rules", get(list_nat).post(create_nat))
        .route(
            "/v2.0/dockwall/nat_rules/{id}",
            get(show_nat).delete(delete_nat),
        )
        .route(
            "/v2.0/dockwall/default_policy",
            get(show_default).put(set_default),
        )
        .route("/v2.0/dockwall/status", get(status))
        .route("/", get(page))
        .route("/logout", post(logout))
        .fallback(not_found)
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            auth::require,
        ));
    Router::new()
        .route("/login", get(login_form).post(login))
        .merge(api)
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .layer(axum::middleware::from_fn(neutron_errors))
        .layer(axum::middleware::from_fn(protective_headers))
        .with_state(state)
}

/// Headers on every response: no caching of the page or the rules, no Referer that could
/// carry a URL, no framing (clickjacking) and no content sniffing.
async fn protective_headers(
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    use axum::http::{header, HeaderValue};
    let mut response = next.run(request).await;
    let headers = response.headers_mut();
    for (name, value) in [
        (header::REFERRER_POLICY, "no-referrer"),
        (header::CACHE_CONTROL, "no-store"),
        (header::X_FRAME_OPTIONS, "DENY"),
        (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
    ] {
        headers.insert(name, HeaderValue::from_static(value));
    }
    response
}

/// Axum's own refusals (405, a path or extractor rejection) are plain text: this rewrites
/// them in Neutron's error shape, as every other error already is.
async fn neutron_errors(request: axum::extract::Request, next: axum::middleware::Next) -> Response {
    let response = next.run(request).await;
    let status = response.status();
    let content_type = response
        .headers()
        .get(axum::http::header::CONTENT_TYPE)
        .and_then(|value| value.to_str().ok())
        .unwrap_or_default();
    if !(status.is_client_error() || status.is_server_error())
        || content_type.starts_with("application/json")
        || content_type.starts_with("text/html")
    {
        return response;
    }
    let (status, kind) = match status {
        StatusCode::BAD_REQUEST | StatusCode::UNPROCESSABLE_ENTITY => {
            (StatusCode::BAD_REQUEST, "BadRequest")
        }
        StatusCode::NOT_FOUND => (status, "NotFound"),
        StatusCode::METHOD_NOT_ALLOWED => (status, "HTTPMethodNotAllowed"),
        StatusCode::PAYLOAD_TOO_LARGE => (status, "RequestEntityTooLarge"),
        StatusCode::UNSUPPORTED_MEDIA_TYPE => (status, "UnsupportedMediaType"),
        _ => (status, "HTTPError"),
    };
    let allow = response.headers().get(axum::http::header::ALLOW).cloned();
    let text = axum::body::to_bytes(response.into_body(), MAX_BODY_BYTES)
        .await
        .map(|bytes| String::from_utf8_lossy(&bytes).trim().to_string())
        .unwrap_or_default();
    let message = match status {
        StatusCode::METHOD_NOT_ALLOWED => {
            "this resource does not take this method; see the API section of the README".into()
        }
        _ if text.is_empty() => status.canonical_reason().unwrap_or_default().to_string(),
        _ => text,
    };
    let mut response = ApiError::new(status, kind, message).into_response();
    if let Some(allow) = allow {
        response
            .headers_mut()
            .insert(axum::http::header::ALLOW, allow);
    }
    response
}

/// An error as Neutron words it: `{"NeutronError": {"type", "message", "detail"}}`.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    kind: &'static str,
    message: String,
}

impl ApiError {
    pub fn new(status: StatusCode, kind: &'static str, message: impl Into<String>) -> Self {
        ApiError {
            status,
            kind,
            message: message.into(),
        }
    }

    pub fn unauthorized() -> Self {
        ApiError::new(
            StatusCode::UNAUTHORIZED,
            "NotAuthenticated",
            "send Authorization: Bearer TOKEN (the token `dockwall api token` prints in the SI)",
        )
    }

    pub fn not_found(what: &str, id: &str) -> Self {
        ApiError::new(
            StatusCode::NOT_FOUND,
            "NotFound",
            format!("no {what} has the id {id:?}"),
        )
    }
}

impl From<Error> for ApiError {
    fn from(error: Error) -> Self {
        match error {
            Error::InvalidArgument { .. } => {
                ApiError::new(StatusCode::BAD_REQUEST, "BadRequest", error.to_string())
            }
            other => ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "InternalError",
                other.to_string(),
            ),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = json!({
            "NeutronError": { "type": self.kind, "message": self.message, "detail": "" }
        });
        let mut response = (self.status, Json(body)).into_response();
        if self.status == StatusCode::UNAUTHORIZED {
            response.headers_mut().insert(
                axum::http::header::WWW_AUTHENTICATE,
                axum::http::HeaderValue::from_static("Bearer"),
            );
        }
        response
    }
}

async fn not_found() -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        "NotFound",
        "no such resource; see the API section of the README",
    )
}

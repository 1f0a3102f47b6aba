//! Dockwall with its REST API on (`run --api-listen`), and a small HTTP/1.1 client whose
//! connections are made from inside a namespace.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use crate::chain::Chain;
use crate::dockwall::{Dockwall, StateDir};
use crate::netns::Netns;

/// Where the SI's API listens, inside the SI's namespace.
pub const API_ADDRESS: &str = "127.0.0.1:8080";

/// Starts `dockwall run --api-listen API_ADDRESS` in the chain's SI and waits until it
/// forwards (the API is bound before that).
pub fn start_with_api(chain: &Chain) -> Dockwall<'_> {
    start_with_api_in(chain, StateDir::new())
}

/// The same with a state directory the caller prepared (a certificate for HTTPS, say).
pub fn start_with_api_in(chain: &Chain, state: StateDir) -> Dockwall<'_> {
    let mut dockwall = Dockwall::launch_in(&chain.si, state, &["--api-listen", API_ADDRESS]);
    dockwall.wait_ready();
    dockwall
}

/// The bearer token, as an operator gets it.
pub fn token(dockwall: &Dockwall) -> String {
    dockwall.ok(&["api", "token"]).trim().to_string()
}

#[derive(Debug)]
pub struct Reply {
    pub status: u16,
    /// The head's header lines, lower-cased names.
    pub headers: Vec<(String, String)>,
    pub body: String,
}

impl Reply {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.body)
            .unwrap_or_else(|e| panic!("reply is not JSON ({e}): {self:?}"))
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }
}

/// The bytes of one HTTP/1.1 request that asks the server to close the connection after.
fn request_bytes(
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: Option<&[u8]>,
) -> Vec<u8> {
    let mut head = format!("{method} {path} HTTP/1.1\r\nHost: dockwall\r\nConnection: close\r\n");
    for (name, value) in headers {
        head += &format!("{name}: {value}\r\n");
    }
    if let Some(body) = body {
        // JSON unless the caller names another type (a login form, say).
        if !headers
            .iter()
            .any(|(name, _)| name.eq_ignore_ascii_case("content-type"))
        {
            head += "Content-Type: application/json\r\n";
        }
        head += &format!("Content-Length: {}\r\n", body.len());
    }
    head += "\r\n";
    let mut bytes = head.into_bytes();
    bytes.extend_from_slice(body.unwrap_or_default());
    bytes
}

fn connect() -> TcpStream {
    let stream = TcpStream::connect(API_ADDRESS)
        .unwrap_or_else(|e| panic!("connect to the API at {API_ADDRESS}: {e}"));
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .expect("read timeout");
    stream
}

/// Sends `request` and reads until the server closes. A server may answer (413) and close
/// before reading all of a large body, and may close without TLS's close_notify: both
/// errors leave what was read.
fn exchange(stream: &mut impl ReadWrite, request: &[u8]) -> Vec<u8> {
    let _ = stream.write_all(request);
    let mut raw = Vec::new();
    let _ = stream.read_to_end(&mut raw);
    raw
}

trait ReadWrite: Read + Write {}
impl<T: Read + Write> ReadWrite for T {}

/// One request on its own connection from inside `ns`; `headers` are extra header lines.
pub fn request(
    ns: &Netns,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: Option<&[u8]>,
) -> Reply {
    parse(&request_raw(ns, method, path, headers, body), method, path)
}

/// The same, returning the bytes the server sent, whatever they are.
pub fn request_raw(
    ns: &Netns,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: Option<&[u8]>,
) -> Vec<u8> {
    let bytes = request_bytes(method, path, headers, body);
    ns.run(|| exchange(&mut connect(), &bytes))
}

/// The same over HTTPS, trusting only `certificate_pem` (issued for 127.0.0.1).
pub fn request_tls(
    ns: &Netns,
    certificate_pem: &str,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: Option<&[u8]>,
) -> Reply {
    use rustls::pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(
            rustls::pki_types::CertificateDer::from_pem_slice(certificate_pem.as_bytes())
                .expect("PEM"),
        )
        .expect("trust the certificate");
    let config = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .expect("TLS versions")
    .with_root_certificates(roots)
    .with_no_client_auth();
    let name = rustls::pki_types::ServerName::try_from("127.0.0.1").expect("server name");
    let bytes = request_bytes(method, path, headers, body);
    let raw = ns.run(|| {
        let connection =
            rustls::ClientConnection::new(std::sync::Arc::new(config), name).expect("TLS client");
        exchange(&mut rustls::StreamOwned::new(connection, connect()), &bytes)
    });
    parse(&raw, method, path)
}

fn parse(raw: &[u8], method: &str, path: &str) -> Reply {
    let text = String::from_utf8_lossy(raw).into_owned();
    let (head, body) = text
        .split_once("\r\n\r\n")
        .unwrap_or_else(|| panic!("no HTTP reply to {method} {path}: {text:?}"));
    let mut lines = head.lines();
    let status = lines
        .next()
        .and_then(|line| line.split(' ').nth(1))
        .and_then(|code| code.parse().ok())
        .unwrap_or_else(|| panic!("bad status line in {head:?}"));
    let headers = lines
        .filter_map(|line| line.split_once(':'))
        .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    Reply {
        status,
        headers,
        body: body.to_string(),
    }
}

/// The `Authorization` header's value for `token`.
pub fn bearer(token: &str) -> String {
    format!("Bearer {token}")
}

/// A request with the bearer token (None: without one) and an optional JSON body.
pub fn call(
    ns: &Netns,
    token: Option<&str>,
    method: &str,
    path: &str,
    body: Option<&str>,
) -> Reply {
    let bearer = token.map(bearer);
    let headers: Vec<(&str, &str)> = bearer
        .as_deref()
        .map(|b| vec![("Authorization", b)])
        .unwrap_or_default();
    request(ns, method, path, &headers, body.map(str::as_bytes))
}

//! `--metrics-listen`: `/metrics` (OpenMetrics text, read by Prometheus) and `/healthz` (what
//! `status` exits with) on a small HTTP/1.1 responder. One request per connection, bounded in
//! size, time and concurrency, so a scanner on the management network cannot stall the VNF.
//!
//! vnf-core counts what the runtime and the DHCP clients do in [`core`]; each binary adds its
//! own families through an [`Exporter`], read fresh at every scrape.

use std::collections::HashSet;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::LazyLock;
use std::time::{Duration, Instant};

use clap::Args;
use futures::stream::{FuturesUnordered, StreamExt};
use prometheus_client::encoding::text::{encode_eof, encode_registry};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tracing::{debug, info};

use crate::dhcp::client::State;
use crate::error::{Error, Result};
use crate::side::Side;

/// A request line and headers larger than this get 431: a scrape sends a few hundred bytes.
const MAX_REQUEST_BYTES: usize = 8 * 1024;
/// Connections served at once; further ones wait in the kernel's backlog.
const MAX_CONNECTIONS: usize = 16;
/// A client must send its request head within this time (else 408)...
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// ...and the whole exchange, scrape included, ends within this time.
const CONNECTION_TIMEOUT: Duration = Duration::from_secs(30);

const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";
/// What Prometheus servers and tools (promtool) read when they do not ask for OpenMetrics.
const PROMETHEUS_TEXT: &str = "text/plain; version=0.0.4; charset=utf-8";

#[derive(Args, Debug, Clone)]
pub struct MetricsArgs {
    /// Serve /metrics (Prometheus) and /healthz (200 when `status` would exit 0, else 503) on
    /// this address [default: off]
    #[arg(long, env = "VNF_METRICS_LISTEN", value_name = "ADDR:PORT", help_heading = crate::cli::OUTPUT)]
    pub metrics_listen: Option<SocketAddr>,
}

/// What a VNF adds to vnf-core's metrics and health.
pub trait Exporter {
    /// Registers the VNF's own metric families, read fresh for this scrape.
    fn register(&self, registry: &mut Registry) -> impl Future<Output = Result<()>>;
    /// Ok when `status` would exit 0, else why not, in one line.
    fn health(&self) -> impl Future<Output = std::result::Result<(), String>>;
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct SideLabels {
    side: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct LeaseStateLabels {
    side: &'static str,
    state: &'static str,
}

/// What the runtime and the DHCP clients count, process-wide.
pub struct CoreMetrics {
    side_ready: Family<SideLabels, Gauge>,
    routing_converged: Gauge,
    reconciles: Counter,
    reconcile_seconds: Histogram,
    side_changes: Counter,
    dhcp_lease_state: Family<LeaseStateLabels, Gauge>,
    dhcp_renewals: Family<SideLabels, Counter>,
    dhcp_expiries: Family<SideLabels, Counter>,
    dhcp_naks: Family<SideLabels, Counter>,
}

const LEASE_STATES: [State; 8] = [
    State::Init,
    State::Selecting,
    State::Requesting,
    State::InitReboot,
    State::Bound,
    State::Renewing,
    State::Rebinding,
    State::Stopped,
];

fn lease_state_label(state: State) -> &'static str {
    match state {
        State::Init => "init",
        State::Selecting => "selecting",
        State::Requesting => "requesting",
        State::InitReboot => "init_reboot",
        State::Bound => "bound",
        State::Renewing => "renewing",
        State::Rebinding => "rebinding",
        State::Stopped => "stopped",
    }
}

static CORE: LazyLock<CoreMetrics> = LazyLock::new(|| CoreMetrics {
    side_ready: Family::default(),
    routing_converged: Gauge::default(),
    reconciles: Counter::default(),
    reconcile_seconds: duration_histogram(),
    side_changes: Counter::default(),
    dhcp_lease_state: Family::default(),
    dhcp_renewals: Family::default(),
    dhcp_expiries: Family::default(),
    dhcp_naks: Family::default(),
});

/// A histogram for durations from 1 ms to about 8 s.
pub fn duration_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.001, 2.0, 14))
}

/// The process's runtime and DHCP metrics.
pub fn core() -> &'static CoreMetrics {
    &CORE
}

fn side_labels(side: Side) -> SideLabels {
    SideLabels {
        side: side.as_str(),
    }
}

impl CoreMetrics {
    /// One pass of the reconcile loop: how long it took and where it left the VNF.
    pub fn reconciled(&self, took: Duration, ready: [(Side, bool); 2], converged: bool) {
        self.reconciles.inc();
        self.reconcile_seconds.observe(took.as_secs_f64());
        for (side, ready) in ready {
            self.side_ready
                .get_or_create(&side_labels(side))
                .set(i64::from(ready));
        }
        self.routing_converged.set(i64::from(converged));
    }

    pub fn side_changed(&self) {
        self.side_changes.inc();
    }

    /// The DHCP client of `side` is now in `state` (one series per state, 1 for the current).
    pub fn dhcp_state(&self, side: Side, state: State) {
        for each in LEASE_STATES {
            let labels = LeaseStateLabels {
                side: side.as_str(),
                state: lease_state_label(each),
            };
            self.dhcp_lease_state
                .get_or_create(&labels)
                .set(i64::from(each == state));
        }
    }

    pub fn dhcp_renewed(&self, side: Side) {
        self.dhcp_renewals.get_or_create(&side_labels(side)).inc();
    }

    pub fn dhcp_expired(&self, side: Side) {
        self.dhcp_expiries.get_or_create(&side_labels(side)).inc();
    }

    pub fn dhcp_nak(&self, side: Side) {
        self.dhcp_naks.get_or_create(&side_labels(side)).inc();
    }

    fn register(&self, registry: &mut Registry) {
        let vnf = registry.sub_registry_with_prefix("vnf");
        vnf.register(
            "side_ready",
            "Whether the side is up and addressed (1) or awaited (0)",
            self.side_ready.clone(),
        );
        vnf.register(
            "routing_converged",
            "Whether the last reconcile left both sides ready and routing as desired",
            self.routing_converged.clone(),
        );
        vnf.register(
            "reconciles",
            "Passes of the reconcile loop",
            self.reconciles.clone(),
        );
        vnf.register(
            "reconcile_duration_seconds",
            "Time one pass of the reconcile loop took",
            self.reconcile_seconds.clone(),
        );
        vnf.register(
            "side_changes",
            "Times a side became ready or went away",
            self.side_changes.clone(),
        );
        vnf.register(
            "dhcp_lease_state",
            "The DHCP client's state per side (1 for the current one)",
            self.dhcp_lease_state.clone(),
        );
        vnf.register(
            "dhcp_renewals",
            "DHCP leases renewed or rebound",
            self.dhcp_renewals.clone(),
        );
        vnf.register(
            "dhcp_expiries",
            "DHCP leases that expired",
            self.dhcp_expiries.clone(),
        );
        vnf.register("dhcp_naks", "DHCPNAKs received", self.dhcp_naks.clone());
    }
}

/// The `/metrics` socket, bound before the VNF starts so that a taken port fails at once;
/// without `--metrics-listen`, nothing.
pub struct MetricsListener(Option<TcpListener>);

impl MetricsListener {
    pub async fn bind(listen: Option<SocketAddr>) -> Result<MetricsListener> {
        let Some(address) = listen else {
            return Ok(MetricsListener(None));
        };
        let listener = TcpListener::bind(address).await.map_err(|source| Error::Io {
            context: format!(
                "--metrics-listen {address}: listen (use a free port and an address of this SI, or 0.0.0.0)"
            ),
            source,
        })?;
        info!(%address, "serving /metrics and /healthz");
        Ok(MetricsListener(Some(listener)))
    }

    /// Runs `task`, serving metrics and health until it completes.
    pub async fn serve_while<T>(
        self,
        exporter: &impl Exporter,
        task: impl Future<Output = T>,
    ) -> T {
        let Some(listener) = self.0 else {
            return task.await;
        };
        tokio::pin!(task);
        let mut connections = FuturesUnordered::new();
        loop {
            tokio::select! {
                outcome = &mut task => return outcome,
                accepted = listener.accept(), if connections.len() < MAX_CONNECTIONS => match accepted {
                    Ok((stream, peer)) => connections.push(async move {
                        if tokio::time::timeout(CONNECTION_TIMEOUT, answer(stream, exporter)).await.is_err() {
                            debug!(%peer, "metrics connection timed out");
                        }
                    }),
                    Err(error) => debug!(%error, "metrics accept failed"),
                },
                Some(()) = connections.next(), if !connections.is_empty() => {}
            }
        }
    }
}

struct Response {
    status: &'static str,
    content_type: &'static str,
    body: String,
    allow: bool,
}

impl Response {
    fn text(status: &'static str, body: impl Into<String>) -> Response {
        let mut body = body.into();
        body.push('\n');
        Response {
            status,
            content_type: "text/plain; charset=utf-8",
            body,
            allow: false,
        }
    }
}

async fn answer(mut stream: TcpStream, exporter: &impl Exporter) {
    let response = match tokio::time::timeout(REQUEST_TIMEOUT, read_head(&mut stream)).await {
        Ok(Ok(head)) => route(&head, exporter).await,
        Ok(Err(response)) => response,
        Err(_) => Response::text(
            "408 Request Timeout",
            format!(
                "the request head did not end within {} s",
                REQUEST_TIMEOUT.as_secs()
            ),
        ),
    };
    let mut text = format!(
        "HTTP/1.1 {}\r\nContent-Type: {}\r\nContent-Length: {}\r\nConnection: close\r\n",
        response.status,
        response.content_type,
        response.body.len()
    );
    if response.allow {
        text.push_str("Allow: GET\r\n");
    }
    text.push_str("\r\n");
    text.push_str(&response.body);
    let _ = stream.write_all(text.as_bytes()).await;
    let _ = stream.shutdown().await;
}

/// The request line and headers, up to the blank line.
async fn read_head(stream: &mut TcpStream) -> std::result::Result<String, Response> {
    let mut head = Vec::with_capacity(512);
    let mut chunk = [0u8; 1024];
    loop {
        if let Some(end) = head.windows(4).position(|w| w == b"\r\n\r\n") {
            head.truncate(end);
            return String::from_utf8(head)
                .map_err(|_| Response::text("400 Bad Request", "request is not UTF-8"));
        }
        if head.len() > MAX_REQUEST_BYTES {
            return Err(Response::text(
                "431 Request Header Fields Too Large",
                format!("request head over {MAX_REQUEST_BYTES} bytes"),
            ));
        }
        match stream.read(&mut chunk).await {
            Ok(0) | Err(_) => {
                return Err(Response::text(
                    "400 Bad Request",
                    "request ended before its headers did",
                ))
            }
            Ok(n) => head.extend_from_slice(&chunk[..n]),
        }
    }
}

async fn route(head: &str, exporter: &impl Exporter) -> Response {
    let request_line = head.lines().next().unwrap_or_default();
    let mut words = request_line.split(' ');
    let (Some(method), Some(target), Some(version), None) =
        (words.next(), words.next(), words.next(), words.next())
    else {
        return Response::text(
            "400 Bad Request",
            "expected a request line: GET /metrics HTTP/1.1",
        );
    };
    if !version.starts_with("HTTP/1.") {
        return Response::text("400 Bad Request", "only HTTP/1.x is served");
    }
    let path = target.split('?').next().unwrap_or_default();
    if path != "/metrics" && path != "/healthz" {
        return Response::text("404 Not Found", "served paths: /metrics, /healthz");
    }
    if method != "GET" {
        let mut response = Response::text("405 Method Not Allowed", "only GET is served");
        response.allow = true;
        return response;
    }
    if path == "/healthz" {
        return match exporter.health().await {
            Ok(()) => Response::text("200 OK", "ok"),
            Err(reason) => Response::text("503 Service Unavailable", reason),
        };
    }
    let openmetrics = head.lines().skip(1).any(|header| {
        header.split_once(':').is_some_and(|(name, value)| {
            name.eq_ignore_ascii_case("accept") && value.contains("application/openmetrics-text")
        })
    });
    match scrape(exporter).await {
        Ok(body) if openmetrics => Response {
            status: "200 OK",
            content_type: OPENMETRICS,
            body,
            allow: false,
        },
        Ok(body) => Response {
            status: "200 OK",
            content_type: PROMETHEUS_TEXT,
            body: prometheus_text(&body),
            allow: false,
        },
        Err(error) => Response::text("500 Internal Server Error", error.to_string()),
    }
}

async fn scrape(exporter: &impl Exporter) -> Result<String> {
    let started = Instant::now();
    let mut registry = Registry::default();
    core().register(&mut registry);
    exporter.register(&mut registry).await?;
    let mut body = String::new();
    encode_registry(&mut body, &registry)
        .and_then(|()| encode_eof(&mut body))
        .map_err(|_| Error::Vnf("encode the metrics as text".into()))?;
    debug!(
        elapsed_us = started.elapsed().as_micros() as u64,
        "metrics scraped"
    );
    Ok(body)
}

/// The Prometheus text format (0.0.4) of an OpenMetrics exposition: a counter family takes
/// the name of its `_total` sample, and `# EOF` goes.
fn prometheus_text(openmetrics: &str) -> String {
    let counters: HashSet<&str> = openmetrics
        .lines()
        .filter_map(|line| line.strip_prefix("# TYPE ")?.strip_suffix(" counter"))
        .collect();
    let mut text = String::with_capacity(openmetrics.len());
    for line in openmetrics.lines() {
        if line == "# EOF" || line.starts_with("# UNIT ") {
            continue;
        }
        let renamed = ["# HELP ", "# TYPE "].into_iter().find_map(|prefix| {
            let (name, rest) = line.strip_prefix(prefix)?.split_once(' ')?;
            counters
                .contains(name)
                .then(|| format!("{prefix}{name}_total {rest}"))
        });
        text.push_str(renamed.as_deref().unwrap_or(line));
        text.push('\n');
    }
    text
}

/// `status`'s verdict on sides and routing, as `/healthz` reports it.
pub async fn routing_health(
    config: &crate::runtime::RuntimeConfig,
) -> std::result::Result<(), String> {
    let status = crate::status::collect(config)
        .await
        .map_err(|error| error.to_string())?;
    if status.converged {
        Ok(())
    } else {
        Err(status.problems.join("; "))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prometheus_text_names_counter_families_after_their_samples_and_drops_eof() {
        let openmetrics =
            "# HELP x_bytes Bytes.\n# TYPE x_bytes counter\nx_bytes_total{a=\"b\"} 3\n\
                           # HELP up Up.\n# TYPE up gauge\nup 1\n# EOF\n";
        assert_eq!(
            prometheus_text(openmetrics),
            "# HELP x_bytes_total Bytes.\n# TYPE x_bytes_total counter\nx_bytes_total{a=\"b\"} 3\n\
             # HELP up Up.\n# TYPE up gauge\nup 1\n"
        );
    }
}

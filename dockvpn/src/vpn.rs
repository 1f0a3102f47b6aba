//! The tokio driver around the OpenVPN engine: a UDP socket and a TCP listener on the same
//! port (either or both), one tun device, the engine's timer, and the feeds from the runtime
//! (pushed routes, the left interface for masquerade). It writes `status.json` for
//! `dockvpn status`.

use std::collections::BTreeSet;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use ipnet::Ipv4Net;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use tracing::{info, warn};
use vnf_core::clock::WallClock;
use vnf_core::runtime::sleep_until;
use vnf_core::{Error, Result};

use crate::openvpn::link::Link;
pub use crate::openvpn::link::Proto;
use crate::openvpn::server::{Counters, EngineConfig, Event, Output, Server};
use crate::openvpn::wrap::ControlWrap;
use crate::pki::{Pki, TlsCryptMode};
use crate::tcp::{TcpCounters, TcpEvent, TcpServer};
use crate::udp::Listener;

/// How often status.json is rewritten while nothing happens.
const STATUS_EVERY: Duration = Duration::from_secs(2);
/// How often the client registry is re-read (a `client add`/`remove` from `docker exec`).
const CLIENTS_EVERY: Duration = Duration::from_secs(2);
/// At most one "dropped input" log line per this interval.
const DROP_LOG_EVERY: Duration = Duration::from_secs(10);

pub struct VpnConfig {
    pub listen: SocketAddr,
    pub proto: Proto,
    pub tun_name: String,
    pub engine: EngineConfig,
    pub state_dir: PathBuf,
}

/// What `run` writes and `status` reads.
#[derive(Debug, Serialize, Deserialize)]
pub struct VpnStatus {
    pub pid: u32,
    pub listen: SocketAddr,
    pub tun: String,
    pub pool: Ipv4Net,
    pub server_address: Ipv4Addr,
    pub routes_pushed: Vec<Ipv4Net>,
    pub redirect_gateway: bool,
    pub clients: Vec<ConnectedClient>,
    /// Sessions in their first handshake: only clients that answered from their address.
    #[serde(default)]
    pub handshaking: usize,
    pub dropped: Counters,
    pub updated_unix: u64,
    /// How the control channel is wrapped (so `client config` issues matching profiles).
    pub tls_crypt: TlsCryptMode,
    /// The transports served (a server from before TCP served UDP only).
    #[serde(default = "udp_only")]
    pub proto: Proto,
    /// Present while TCP is served.
    #[serde(default)]
    pub tcp: Option<TcpCounters>,
    /// Present while WireGuard is served.
    #[serde(default)]
    pub wireguard: Option<WireguardServing>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct WireguardServing {
    pub listen: SocketAddr,
    /// The server's public key, base64 as `wg` prints it.
    pub public_key: String,
}

fn udp_only() -> Proto {
    Proto::Udp
}

#[derive(Debug, Serialize, Deserialize)]
pub struct ConnectedClient {
    pub name: String,
    pub address: Ipv4Addr,
    /// `openvpn` or `wireguard`.
    #[serde(default = "openvpn")]
    pub transport: String,
    /// The client's endpoint: where its packets come from and replies go.
    pub peer: SocketAddr,
    /// `udp` or `tcp`.
    #[serde(default = "udp")]
    pub proto: String,
    pub cipher: String,
    pub connected_since_unix: u64,
    pub bytes_in: u64,
    pub bytes_out: u64,
    /// Data keys renegotiated since the client connected.
    #[serde(default)]
    pub renegotiations: u64,
    /// The data key in use: its id and age.
    #[serde(default)]
    pub key_id: u8,
    #[serde(default)]
    pub key_age_secs: u64,
    /// WireGuard: when the last handshake completed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub latest_handshake_unix: Option<u64>,
}

/// What a status file from before WireGuard says: every client used OpenVPN.
fn openvpn() -> String {
    "openvpn".to_owned()
}

/// What a status file from before TCP says: every client came over UDP.
fn udp() -> String {
    "udp".to_owned()
}

pub fn status_path(state_dir: &std::path::Path) -> PathBuf {
    state_dir.join("status.json")
}

/// Serves until `stop` turns true. Errors only at start-up (socket, tun, PKI).
pub async fn serve(
    config: VpnConfig,
    mut routes: watch::Receiver<BTreeSet<Ipv4Net>>,
    mut stop: watch::Receiver<bool>,
) -> Result<()> {
    let listen_error = |protocol: &str| {
        let context = format!(
            "listen on {protocol} {} (another server on the port? pass --listen, or --proto to serve one protocol)",
            config.listen
        );
        move |source| Error::Io { context, source }
    };
    let mut socket = match config.proto.serves_udp() {
        true => Some(Listener::bind(config.listen).map_err(listen_error("UDP"))?),
        false => None,
    };
    // Room for every client and every handshake slot; more connections are refused at once.
    let max_connections = config.engine.max_clients + config.engine.max_handshaking;
    let mut tcp = match config.proto.serves_tcp() {
        true => Some(
            TcpServer::bind(config.listen, max_connections)
                .await
                .map_err(listen_error("TCP"))?,
        ),
        false => None,
    };
    let server_address = config.engine.server_address();
    let tun = tokio_tun::Tun::builder()
        .name(&config.tun_name)
        .address(server_address)
        .netmask(config.engine.pool.netmask())
        .mtu(1500)
        .up()
        .build()
        .map_err(|error| {
            Error::Vnf(format!(
                "create the tun device {}: {error} (the container needs --cap-add NET_ADMIN and --device /dev/net/tun)",
                config.tun_name
            ))
        })?
        .pop()
        .expect("one queue");
    let mut engine = Server::new(config.engine.clone());
    engine.set_routes(routes.borrow_and_update().clone());
    let registry = Pki::new(&config.state_dir);
    engine.set_registry_reader(Box::new(move || match registry.clients() {
        Ok(clients) => Some(clients.into_iter().map(|c| (c.name, c.address)).collect()),
        Err(error) => {
            warn!(%error, "client registry unreadable; keeping the last one");
            None
        }
    }));
    engine.refresh_clients();
    info!(
        listen = %config.listen,
        proto = %config.proto,
        tun = %config.tun_name,
        pool = %config.engine.pool,
        ciphers = ?config.engine.ciphers.iter().map(|c| c.name()).collect::<Vec<_>>(),
        routes = ?engine.routes(),
        "VPN server listening"
    );

    let mut datagram = vec![0u8; 65536];
    let mut packet = vec![0u8; 65536];
    let mut status_tick = tokio::time::interval(STATUS_EVERY);
    let mut clients_tick = tokio::time::interval(CLIENTS_EVERY);
    let mut dropped_logged = Counters::default();
    let mut last_drop_log: Option<Instant> = None;
    let mut status_dirty = true;
    loop {
        let deadline = engine.next_timeout().map(tokio::time::Instant::from_std);
        tokio::select! {
            received = receive_udp(socket.as_mut(), &mut datagram) => match received {
                Ok((len, from)) => {
                    engine.handle_datagram(Instant::now(), Link::Udp(from), &datagram[..len])
                }
                Err(error) => warn!(%error, "UDP receive failed"),
            },
            event = next_tcp_event(tcp.as_mut()) => match event {
                TcpEvent::Packet { link, packet } => {
                    engine.handle_datagram(Instant::now(), link, &packet)
                }
                TcpEvent::Closed { link, reason } => {
                    engine.close_link(Instant::now(), link, &reason)
                }
            },
            read = tun.recv(&mut packet) => match read {
                Ok(len) => engine.handle_tun_packet(Instant::now(), &packet[..len]),
                Err(error) => warn!(%error, "tun read failed"),
            },
            () = sleep_until(deadline) => engine.handle_timeout(Instant::now()),
            changed = routes.changed() => {
                if changed.is_ok() {
                    let next = routes.borrow_and_update().clone();
                    info!(routes = ?next, "routes for clients that connect from now on");
                    engine.set_routes(next);
                    status_dirty = true;
                }
            }
            _ = clients_tick.tick() => {
                engine.reload_clients(Instant::now());
                if let Some(tcp) = tcp.as_mut() {
                    tcp.close_sessionless(Instant::now(), |link| engine.has_session(link));
                }
            }
            _ = status_tick.tick() => status_dirty = true,
            _ = stop.changed() => {
                engine.shutdown(Instant::now());
                drain(&mut engine, socket.as_mut(), tcp.as_mut(), &tun).await;
                let _ = std::fs::remove_file(status_path(&config.state_dir));
                info!("VPN server stopped");
                return Ok(());
            }
        }
        status_dirty |= drain(&mut engine, socket.as_mut(), tcp.as_mut(), &tun).await;
        if engine.counters.total() != dropped_logged.total()
            && last_drop_log.is_none_or(|at| at.elapsed() >= DROP_LOG_EVERY)
        {
            warn!(
                total = engine.counters.total(),
                counters = %engine.counters,
                last = engine.last_drop.as_deref().unwrap_or_default(),
                "dropped VPN input"
            );
            dropped_logged = engine.counters;
            last_drop_log = Some(Instant::now());
        }
        if status_dirty {
            write_status(&config, &engine, tcp.as_ref());
            status_dirty = false;
        }
    }
}

async fn receive_udp(
    socket: Option<&mut Listener>,
    datagram: &mut [u8],
) -> std::io::Result<(usize, SocketAddr)> {
    match socket {
        Some(socket) => socket.recv(datagram).await,
        None => std::future::pending().await,
    }
}

async fn next_tcp_event(tcp: Option<&mut TcpServer>) -> TcpEvent {
    match tcp {
        Some(tcp) => tcp.next_event().await,
        None => std::future::pending().await,
    }
}

/// Sends what the engine queued; true when a client connected or left.
async fn drain(
    engine: &mut Server,
    socket: Option<&mut Listener>,
    mut tcp: Option<&mut TcpServer>,
    tun: &tokio_tun::Tun,
) -> bool {
    let mut changed = false;
    while let Some(output) = engine.poll_output() {
        match output {
            Output::Transmit {
                to: Link::Udp(to),
                datagram,
            } => {
                let Some(socket) = socket.as_deref() else {
                    continue;
                };
                if let Err(error) = socket.send(&datagram, to).await {
                    warn!(%to, %error, "UDP send failed");
                }
            }
            Output::Transmit { to, datagram } => {
                let Some(tcp) = tcp.as_deref_mut() else {
                    continue;
                };
                if let Err(reason) = tcp.send(&to, &datagram) {
                    engine.close_link(Instant::now(), to, &reason);
                }
            }
            Output::Tun(packet) => {
                if let Err(error) = tun.send(&packet).await {
                    warn!(%error, "tun write failed");
                }
            }
            Output::Event(event) => {
                changed = true;
                match event {
                    Event::Connected {
                        name,
                        address,
                        link,
                        cipher,
                    } => info!(client = %name, %address, %link, %cipher, "client connected"),
                    Event::Disconnected {
                        name,
                        address,
                        link,
                        reason,
                    } => {
                        // A session's end is its TCP connection's end.
                        if let Some(tcp) = tcp.as_deref_mut() {
                            tcp.close(&link);
                        }
                        info!(
                            client = name.as_deref().unwrap_or("(unauthenticated)"),
                            // Omitted, not "None", for a client that never got one.
                            address = address.map(tracing::field::display),
                            %link,
                            %reason,
                            "client disconnected"
                        )
                    }
                }
            }
        }
    }
    // A client that reconnects from the same address keeps its entry: it has a session again.
    if let Some(socket) = socket {
        socket.prune(|peer| engine.has_session(&Link::Udp(*peer)));
    }
    changed
}

fn write_status(config: &VpnConfig, engine: &Server, tcp: Option<&TcpServer>) {
    let now = Instant::now();
    let clock = WallClock::now();
    let status = VpnStatus {
        pid: std::process::id(),
        listen: config.listen,
        tun: config.tun_name.clone(),
        pool: config.engine.pool,
        server_address: config.engine.server_address(),
        routes_pushed: engine.routes().iter().copied().collect(),
        redirect_gateway: config.engine.redirect_gateway,
        clients: engine
            .connected()
            .into_iter()
            .map(|c| ConnectedClient {
                name: c.name,
                address: c.address,
                transport: openvpn(),
                peer: c.link.peer(),
                proto: c.link.protocol().to_owned(),
                cipher: c.cipher.name().to_owned(),
                connected_since_unix: clock.unix(c.connected_at),
                bytes_in: c.bytes_in,
                renegotiations: c.renegotiations,
                key_id: c.key_id,
                key_age_secs: now.saturating_duration_since(c.key_established).as_secs(),
                bytes_out: c.bytes_out,
                latest_handshake_unix: None,
            })
            .collect(),
        handshaking: engine.handshaking(),
        dropped: engine.counters,
        updated_unix: clock.unix(now),
        tls_crypt: match config.engine.tls_crypt {
            ControlWrap::Plain => TlsCryptMode::Off,
            ControlWrap::TlsCrypt(_) => TlsCryptMode::V1,
            ControlWrap::TlsAuth(_) => TlsCryptMode::TlsAuth,
            ControlWrap::TlsCryptV2 { .. } => TlsCryptMode::V2,
        },
        proto: config.proto,
        tcp: tcp.map(TcpServer::counters),
        wireguard: None,
    };
    if let Err(error) = vnf_core::fs::write_json(&status_path(&config.state_dir), &status, false) {
        warn!(%error, "could not write status.json");
    }
}

//! The tokio driver around the two engines: OpenVPN on a UDP socket and a TCP listener on
//! the same port (either or both), WireGuard on its own UDP socket, one tun device for both,
//! the address book that sends each tun packet to its client's engine, the engines' timers,
//! and the feeds from the runtime (pushed routes, the client registry). It writes
//! `status.json` for `dockvpn status`.

use std::collections::BTreeSet;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine;
use ipnet::Ipv4Net;
use serde::{Deserialize, Serialize};
use tokio::io::unix::AsyncFd;
use tokio::sync::watch;
use tracing::{info, warn};
use vnf_core::clock::WallClock;
use vnf_core::runtime::sleep_until;
use vnf_core::{Error, Result};

use crate::reception::{Endpoints, Inbound, Reception};
use crate::tcp::{TcpCounters, TcpEvent, TcpServer};
use crate::udp::Listener;
use dockvpn::access::AccessTable;
use dockvpn::address_book::{ipv4_destination, AddressBook, Tunnel};
use dockvpn::datapath::offload::{segment, Packets, TunWriteBatch, VirtioNetHdr, GSO_NONE};
use dockvpn::datapath::tun::{Offload, Tun};
use dockvpn::dropped::Counters;
use dockvpn::openvpn::link::Link;
pub use dockvpn::openvpn::link::Proto;
use dockvpn::openvpn::server::{self, EngineConfig, Server};
use dockvpn::openvpn::wrap::ControlWrap;
use dockvpn::password::Auth;
use dockvpn::pki::{Pki, TlsCryptMode};
use dockvpn::refusal::Refusals;
use dockvpn::wireguard::{self, WireguardServer};

/// The tun's MTU: OpenVPN's default tun-mtu, which clients' profiles expect.
const TUN_MTU: u32 = 1500;
/// Inputs handed to the engines between two flushes of their outputs: well inside the
/// engines' pools (BufferPool::MAX_FREE), so that no output needs a new buffer.
const INPUTS_PER_FLUSH: usize = 64;
/// Tun writes queued at most before they are written (each up to a 64 KiB super-packet).
const TUN_WRITES_QUEUED: usize = 32;
/// How often status.json is rewritten while nothing happens.
const STATUS_EVERY: Duration = Duration::from_secs(2);
/// How often the client registry is re-read (a `client add`/`remove` from `docker exec`).
const CLIENTS_EVERY: Duration = Duration::from_secs(2);
/// Connected clients told to reconnect for new routes come back spread over this long.
const RESTART_SPREAD: Duration = Duration::from_secs(5);
/// At most one "dropped input" log line per this interval.
const DROP_LOG_EVERY: Duration = Duration::from_secs(10);

pub struct VpnConfig {
    pub listen: SocketAddr,
    pub proto: Proto,
    pub tun_name: String,
    pub engine: EngineConfig,
    pub state_dir: PathBuf,
    pub wireguard: Option<WireguardConfig>,
    /// The kernel's filter of what clients reach, kept in step with the registry.
    pub access: AccessTable,
    pub on_route_change: OnRouteChange,
    /// 1: one thread receives, opens, seals and sends; 2 or more: receiving runs on a
    /// thread of its own.
    pub threads: usize,
    pub offload: Offload,
}

/// What connected OpenVPN clients do when the pushed routes change.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum OnRouteChange {
    /// Told to reconnect (RESTART), spread over RESTART_SPREAD, and so pull the new routes.
    Restart,
    /// Keep the routes they have until they reconnect on their own.
    NextConnect,
}

pub struct WireguardConfig {
    pub listen: SocketAddr,
    /// The server's static private key.
    pub secret: [u8; 32],
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
    /// Clients refused, by reason (a server from before counted none).
    #[serde(default)]
    pub refused: Refusals,
    /// Handshakes completed since the server started (a server from before counted none).
    #[serde(default)]
    pub handshakes: Handshakes,
    /// How OpenVPN clients authenticate (so `client config` adds `auth-user-pass`).
    #[serde(default)]
    pub auth: Auth,
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
    /// Registry reloads asked for with SIGHUP so far (`client add`/`remove` wait for the
    /// count to rise).
    #[serde(default)]
    pub reloads: u64,
    /// How packets move (a server from before batching did not say).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data_path: Option<DataPathStatus>,
}

/// The data path's threads and the kernel offloads it got.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DataPathStatus {
    pub threads: usize,
    /// e.g. `gro,gso`, or `none`.
    pub udp_offloads: String,
    /// e.g. `csum,tso4,uso4`, or `none`.
    pub tun_offloads: String,
}

/// Completed handshakes per transport: OpenVPN connects and data-key renegotiations,
/// WireGuard connects and rekeys. They only grow while the server runs.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize)]
pub struct Handshakes {
    pub openvpn: u64,
    pub wireguard: u64,
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

/// Serves until `stop` turns true. Errors at start-up (sockets, tun, PKI), or when the data
/// path's receive thread has stopped.
pub async fn serve(
    config: VpnConfig,
    mut routes: watch::Receiver<BTreeSet<Ipv4Net>>,
    mut stop: watch::Receiver<bool>,
) -> Result<()> {
    let initial_routes = routes.borrow_and_update().clone();
    let mut driver = Driver::start(&config, initial_routes).await?;
    let mut status_tick = tokio::time::interval(STATUS_EVERY);
    let mut clients_tick = tokio::time::interval(CLIENTS_EVERY);
    let mut dropped_logged = Counters::default();
    let mut last_drop_log: Option<Instant> = None;
    let mut status_dirty = true;
    // `client remove` signals a reload so the client is cut off before the command returns.
    let mut reload = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
        .map_err(|source| Error::Io {
            context: "handle SIGHUP".to_owned(),
            source,
        })?;
    loop {
        let deadline = driver.next_timeout().map(tokio::time::Instant::from_std);
        tokio::select! {
            inbound = driver.reception.next(Endpoints {
                openvpn: driver.udp.as_ref().map(Listener::socket),
                wireguard: driver.wireguard_socket.as_ref().map(Listener::socket),
                tun: &driver.tun,
            }) => {
                let Some(inbound) = inbound else {
                    return Err(Error::Vnf(
                        "the data path's receive thread stopped (its reason is logged above); the server stops so that it can be restarted".to_owned(),
                    ));
                };
                status_dirty |= driver.take_in(Instant::now(), &inbound).await;
                driver.reception.give_back(inbound);
            }
            event = next_tcp_event(driver.tcp.as_mut()) => match event {
                TcpEvent::Packet { link, packet } => {
                    driver.openvpn.handle_datagram(Instant::now(), link, &packet)
                }
                TcpEvent::Closed { link, reason } => {
                    driver.openvpn.close_link(Instant::now(), link, &reason)
                }
            },
            () = sleep_until(deadline) => driver.handle_timeout(Instant::now()),
            changed = routes.changed() => {
                if changed.is_ok() {
                    let next = routes.borrow_and_update().clone();
                    driver.openvpn.set_routes(next);
                    let routes = driver.openvpn.routes();
                    match config.on_route_change {
                        OnRouteChange::Restart => {
                            info!(?routes, spread_secs = RESTART_SPREAD.as_secs(), "routes changed: connected OpenVPN clients reconnect for them");
                            driver.openvpn.restart_connected(Instant::now(), RESTART_SPREAD);
                        }
                        OnRouteChange::NextConnect => {
                            info!(?routes, "routes for clients that connect from now on");
                        }
                    }
                    status_dirty = true;
                }
            }
            _ = clients_tick.tick() => driver.reload_clients(Instant::now()),
            _ = reload.recv() => {
                driver.reload_clients(Instant::now());
                driver.reloads += 1;
                status_dirty = true;
            }
            _ = status_tick.tick() => status_dirty = true,
            _ = stop.changed() => {
                driver.openvpn.shutdown(Instant::now());
                driver.flush().await;
                let _ = std::fs::remove_file(status_path(&config.state_dir));
                info!("VPN server stopped");
                return Ok(());
            }
        }
        status_dirty |= driver.flush().await;
        let dropped = driver.dropped();
        if dropped.total() != dropped_logged.total()
            && last_drop_log.is_none_or(|at| at.elapsed() >= DROP_LOG_EVERY)
        {
            warn!(
                total = dropped.total(),
                counters = %dropped,
                last = driver.last_drop().unwrap_or_default(),
                "dropped VPN input"
            );
            dropped_logged = dropped;
            last_drop_log = Some(Instant::now());
        }
        if status_dirty {
            write_status(&config, &driver);
            status_dirty = false;
        }
    }
}

/// The engines, what they talk through, and the address book between them and the tun.
struct Driver {
    openvpn: Server,
    wireguard: Option<WireguardServer>,
    udp: Option<Listener>,
    tcp: Option<TcpServer>,
    wireguard_socket: Option<Listener>,
    tun: AsyncFd<Arc<Tun>>,
    /// Packets for the tun, a TCP stream's segments joined into super-packets when the tun
    /// takes them (TSO): one write and one pass through the kernel's stack per burst.
    tun_writes: Option<TunWriteBatch>,
    /// Room to split a super-packet the tun refused.
    tun_segments: Packets,
    /// Where the sockets' datagrams and the tun's packets come from, in batches.
    reception: Reception,
    data_path: DataPathStatus,
    addresses: AddressBook,
    registry: Pki,
    access: AccessTable,
    /// Drops the driver makes itself (tun packets for no client).
    counters: Counters,
    last_drop: Option<String>,
    reloads: u64,
}

impl Driver {
    async fn start(config: &VpnConfig, routes: BTreeSet<Ipv4Net>) -> Result<Driver> {
        let listen_error = |protocol: &str, listen: SocketAddr, fix: &str| {
            let context =
                format!("listen on {protocol} {listen} (another server on the port? {fix})");
            move |source| Error::Io { context, source }
        };
        let openvpn_fix = "pass --listen, or --proto to serve one protocol";
        let offload = config.offload == Offload::Auto;
        // With two threads or more, a receive thread reads the sockets and the tun.
        let inline = config.threads <= 1;
        let udp = match config.proto.serves_udp() {
            true => Some(
                Listener::bind(config.listen, offload, inline).map_err(listen_error(
                    "UDP",
                    config.listen,
                    openvpn_fix,
                ))?,
            ),
            false => None,
        };
        // Room for every client and every handshake slot; more connections are refused at once.
        let max_connections = config.engine.max_clients + config.engine.max_handshaking;
        let tcp = match config.proto.serves_tcp() {
            true => Some(
                TcpServer::bind(config.listen, max_connections)
                    .await
                    .map_err(listen_error("TCP", config.listen, openvpn_fix))?,
            ),
            false => None,
        };
        let wireguard_socket = match &config.wireguard {
            Some(wireguard) => Some(Listener::bind(wireguard.listen, offload, inline).map_err(
                listen_error(
                    "WireGuard UDP",
                    wireguard.listen,
                    "pass --wireguard-listen ADDR:PORT, or off",
                ),
            )?),
            None => None,
        };
        let tun = open_tun(config, inline).map_err(|error| {
            Error::Vnf(format!(
                "create the tun device {}: {error} (the container needs --cap-add NET_ADMIN and --device /dev/net/tun)",
                config.tun_name
            ))
        })?;
        let reception = match inline {
            true => Reception::inline(),
            false => Reception::threaded(
                udp.as_ref().map(Listener::shared),
                wireguard_socket.as_ref().map(Listener::shared),
                tun.get_ref().clone(),
            ),
        }
        .map_err(|source| Error::Io {
            context: "set up the data path's receiving".to_owned(),
            source,
        })?;
        let data_path = DataPathStatus {
            threads: reception.threads(),
            udp_offloads: udp.iter().chain(&wireguard_socket).next().map_or_else(
                || "none".to_owned(),
                |l| l.socket().get_ref().offloads().to_string(),
            ),
            tun_offloads: tun.get_ref().offloads().to_string(),
        };
        let mut openvpn = Server::new(config.engine.clone());
        openvpn.set_routes(routes);
        let registry = Pki::new(&config.state_dir);
        let reader = Pki::new(&config.state_dir);
        openvpn.set_registry_reader(Box::new(move || match reader.openvpn_registry() {
            Ok(clients) => Some(clients),
            Err(error) => {
                warn!(%error, "client registry unreadable; keeping the last one");
                None
            }
        }));
        let reader = Pki::new(&config.state_dir);
        openvpn.set_allowance_reader(Box::new(move || match reader.clients() {
            Ok(clients) => Some(
                clients
                    .into_iter()
                    .filter_map(|c| Some((c.name, c.allow?)))
                    .collect(),
            ),
            Err(error) => {
                warn!(%error, "client allow lists unreadable; keeping the last ones");
                None
            }
        }));
        openvpn.refresh_clients();
        let wireguard = config
            .wireguard
            .as_ref()
            .map(|wireguard| WireguardServer::new(wireguard.secret, Instant::now()));
        let mut driver = Driver {
            openvpn,
            wireguard,
            udp,
            tcp,
            wireguard_socket,
            tun_writes: tun.get_ref().offloads().tso4.then(TunWriteBatch::new),
            tun_segments: Packets::new(),
            tun,
            reception,
            data_path,
            addresses: AddressBook::default(),
            registry,
            access: config.access.clone(),
            counters: Counters::default(),
            last_drop: None,
            reloads: 0,
        };
        driver.reload_wireguard_peers();
        driver.reload_allowances();
        info!(
            listen = %config.listen,
            proto = %config.proto,
            wireguard = config.wireguard.as_ref().map(|w| tracing::field::display(w.listen)),
            tun = %config.tun_name,
            pool = %config.engine.pool,
            threads = driver.data_path.threads,
            udp_offloads = %driver.data_path.udp_offloads,
            tun_offloads = %driver.data_path.tun_offloads,
            ciphers = ?config.engine.ciphers.iter().map(|c| c.name()).collect::<Vec<_>>(),
            routes = ?driver.openvpn.routes(),
            "VPN server listening"
        );
        Ok(driver)
    }

    fn next_timeout(&self) -> Option<Instant> {
        let wireguard = self.wireguard.as_ref().and_then(|w| w.next_timeout());
        match (self.openvpn.next_timeout(), wireguard) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    fn handle_timeout(&mut self, now: Instant) {
        self.openvpn.handle_timeout(now);
        if let Some(wireguard) = self.wireguard.as_mut() {
            wireguard.handle_timeout(now);
        }
    }

    /// The registry again: a removed client is cut off by both engines.
    fn reload_clients(&mut self, now: Instant) {
        self.openvpn.reload_clients(now);
        self.reload_wireguard_peers();
        self.reload_allowances();
        if let Some(tcp) = self.tcp.as_mut() {
            let openvpn = &self.openvpn;
            tcp.close_sessionless(now, |link| openvpn.has_session(link));
        }
    }

    /// The clients' allow lists to the kernel's forward filter: on every registry reload and
    /// every connection, so a client added a moment ago is limited from its first packet.
    fn reload_allowances(&mut self) {
        match self.registry.allowances() {
            Ok(allowances) => self.access.set_allowances(allowances),
            Err(error) => warn!(%error, "client allow lists unreadable; keeping the last ones"),
        }
    }

    fn reload_wireguard_peers(&mut self) {
        let Some(wireguard) = self.wireguard.as_mut() else {
            return;
        };
        match self.registry.wireguard_peers() {
            Ok(peers) => wireguard.set_peers(peers),
            Err(error) => warn!(%error, "WireGuard clients unreadable; keeping the last ones"),
        }
    }

    /// One batch of input to the engines it is for; true when a client connected or left.
    /// Outputs are sent every INPUTS_PER_FLUSH inputs: a GRO batch holds up to a thousand
    /// datagrams, and their outputs all at once would outgrow the engines' buffer pools.
    async fn take_in(&mut self, now: Instant, inbound: &Inbound) -> bool {
        let mut changed = false;
        let mut taken = 0;
        match inbound {
            Inbound::OpenVpn(batch) => {
                for received in batch.iter() {
                    if let Some(udp) = self.udp.as_mut() {
                        udp.received(received.from, received.local);
                    }
                    self.openvpn
                        .handle_datagram(now, Link::Udp(received.from), received.datagram);
                    changed |= self.count_input(&mut taken).await;
                }
            }
            Inbound::WireGuard(batch) => {
                for received in batch.iter() {
                    let (Some(socket), Some(wireguard)) =
                        (self.wireguard_socket.as_mut(), self.wireguard.as_mut())
                    else {
                        break;
                    };
                    socket.received(received.from, received.local);
                    wireguard.handle_datagram(now, received.from, received.datagram);
                    changed |= self.count_input(&mut taken).await;
                }
            }
            Inbound::Tun(packets) => {
                for packet in packets.iter() {
                    self.route_from_tun(now, packet);
                    changed |= self.count_input(&mut taken).await;
                }
            }
        }
        changed
    }

    /// Counts one input; every INPUTS_PER_FLUSH, sends what the engines queued (true when
    /// a client connected or left).
    async fn count_input(&mut self, taken: &mut usize) -> bool {
        *taken += 1;
        *taken % INPUTS_PER_FLUSH == 0 && self.flush().await
    }

    /// A packet from the kernel for a client: to the engine the address book names.
    fn route_from_tun(&mut self, now: Instant, packet: &[u8]) {
        let Some(destination) = ipv4_destination(packet) else {
            return;
        };
        match self.addresses.tunnel(destination) {
            Some(Tunnel::OpenVpn(peer_id)) => self.openvpn.send_to(now, peer_id, packet),
            Some(Tunnel::WireGuard(peer)) => {
                if let Some(wireguard) = self.wireguard.as_mut() {
                    wireguard.send_to(peer, packet);
                }
            }
            None => {
                self.counters.no_client_for_destination += 1;
                self.last_drop = Some(format!("no client has {destination}"));
            }
        }
    }

    /// The named drop counters of both engines and the driver, added up.
    fn dropped(&self) -> Counters {
        let mut dropped = self.counters;
        dropped.malformed += self.reception.malformed_from_tun();
        dropped += self.openvpn.counters;
        if let Some(wireguard) = &self.wireguard {
            dropped += wireguard.counters;
        }
        dropped
    }

    /// Why the latest input was dropped, whichever part dropped it.
    fn last_drop(&mut self) -> Option<&str> {
        let engines = [
            self.openvpn.last_drop.take(),
            self.wireguard.as_mut().and_then(|w| w.last_drop.take()),
        ];
        if let Some(latest) = engines.into_iter().flatten().last() {
            self.last_drop = Some(latest);
        }
        self.last_drop.as_deref()
    }

    /// Sends what the engines queued; true when a client connected or left. Every buffer
    /// goes back to its engine once sent, so the data path allocates nothing per packet.
    async fn flush(&mut self) -> bool {
        let mut changed = false;
        while let Some(output) = self.openvpn.poll_output() {
            match output {
                server::Output::Transmit {
                    to: Link::Udp(to),
                    datagram,
                } => {
                    if let Some(udp) = self.udp.as_mut() {
                        udp.queue(&datagram, to).await;
                    }
                    self.openvpn.recycle(datagram);
                }
                server::Output::Transmit { to, datagram } => {
                    if let Some(tcp) = self.tcp.as_mut() {
                        if let Err(reason) = tcp.send(&to, &datagram) {
                            self.openvpn.close_link(Instant::now(), to, &reason);
                        }
                    }
                    self.openvpn.recycle(datagram);
                }
                server::Output::Tun(packet) => {
                    self.queue_for_tun(&packet);
                    self.openvpn.recycle(packet);
                }
                server::Output::Event(event) => {
                    changed = true;
                    self.openvpn_event(event);
                }
            }
        }
        while let Some(output) = self.wireguard.as_mut().and_then(|w| w.poll_output()) {
            match output {
                wireguard::Output::Transmit { to, datagram } => {
                    if let Some(socket) = self.wireguard_socket.as_mut() {
                        socket.queue(&datagram, to).await;
                    }
                    self.recycle_wireguard(datagram);
                }
                wireguard::Output::Tun(packet) => {
                    self.queue_for_tun(&packet);
                    self.recycle_wireguard(packet);
                }
                wireguard::Output::Event(event) => {
                    changed = true;
                    self.wireguard_event(event);
                }
            }
        }
        self.write_queued_to_tun();
        for socket in [self.udp.as_mut(), self.wireguard_socket.as_mut()]
            .into_iter()
            .flatten()
        {
            socket.send_queued().await;
        }
        // A client that reconnects from the same address keeps its entry: it has a session again.
        if let Some(socket) = self.udp.as_mut() {
            let openvpn = &self.openvpn;
            socket.prune(|peer| openvpn.has_session(&Link::Udp(*peer)));
        }
        if let (Some(socket), Some(wireguard)) = (self.wireguard_socket.as_mut(), &self.wireguard) {
            socket.prune(|peer| wireguard.is_endpoint(peer));
        }
        changed
    }

    /// A packet for the kernel: written now, or queued to join a super-packet.
    fn queue_for_tun(&mut self, packet: &[u8]) {
        let Some(writes) = self.tun_writes.as_mut() else {
            return write_tun(&self.tun, packet);
        };
        writes.push(packet);
        if writes.len() >= TUN_WRITES_QUEUED {
            self.write_queued_to_tun();
        }
    }

    fn write_queued_to_tun(&mut self) {
        let Some(writes) = self.tun_writes.as_mut() else {
            return;
        };
        let tun = self.tun.get_ref();
        let mut refused = false;
        for (header, packet) in writes.iter() {
            match tun.write_with_header(header, packet) {
                Ok(()) => {}
                // A kernel that refuses the super-packet gets its segments one by one.
                Err(error) if header.gso_type != GSO_NONE => {
                    refused |= error.raw_os_error() == Some(libc::EINVAL);
                    write_segments(tun, header, packet, &mut self.tun_segments);
                }
                Err(error) => warn!(%error, "tun write failed"),
            }
        }
        writes.clear();
        if refused {
            warn!("the tun refused a TCP super-packet: packets for the kernel are written one by one from now on");
            self.tun_writes = None;
        }
    }

    fn recycle_wireguard(&mut self, buffer: Vec<u8>) {
        if let Some(wireguard) = self.wireguard.as_mut() {
            wireguard.recycle(buffer);
        }
    }

    fn openvpn_event(&mut self, event: server::Event) {
        match event {
            server::Event::Connected {
                name,
                address,
                link,
                peer_id,
                cipher,
            } => {
                self.reload_allowances();
                self.take_address(&name, address, Tunnel::OpenVpn(peer_id));
                info!(client = %name, %address, %link, %cipher, "client connected");
            }
            server::Event::Disconnected {
                name,
                address,
                link,
                peer_id,
                reason,
            } => {
                if let Some(address) = address {
                    self.release_address(address, Tunnel::OpenVpn(peer_id));
                }
                // A session's end is its TCP connection's end.
                if let Some(tcp) = self.tcp.as_mut() {
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

    fn wireguard_event(&mut self, event: wireguard::Event) {
        match event {
            wireguard::Event::Connected {
                name,
                address,
                peer,
                endpoint,
            } => {
                self.reload_allowances();
                info!(client = %name, %address, %endpoint, transport = "wireguard", "client connected");
                self.take_address(&name, address, Tunnel::WireGuard(peer));
            }
            wireguard::Event::Disconnected {
                name,
                address,
                peer,
                reason,
            } => {
                self.release_address(address, Tunnel::WireGuard(peer));
                info!(client = %name, %address, transport = "wireguard", %reason, "client disconnected");
            }
        }
    }

    /// `tunnel` has left: its address goes back to the client's connection over the other
    /// transport, if it has one.
    fn release_address(&mut self, address: Ipv4Addr, tunnel: Tunnel) {
        self.addresses.disconnected(address, tunnel);
        if self.addresses.tunnel(address).is_some() {
            return;
        }
        let remaining = match tunnel {
            Tunnel::OpenVpn(_) => self
                .wireguard
                .as_ref()
                .and_then(|w| w.peer_for_address(address))
                .map(Tunnel::WireGuard),
            Tunnel::WireGuard(_) => self.openvpn.peer_for_address(address).map(Tunnel::OpenVpn),
        };
        if let Some(remaining) = remaining {
            self.addresses.connected(address, remaining);
        }
    }

    /// Routes `address` to `tunnel`; the same client connected over the other transport
    /// before keeps its session but no longer receives (one address, one way back).
    fn take_address(&mut self, name: &str, address: Ipv4Addr, tunnel: Tunnel) {
        if let Some(previous) = self.addresses.connected(address, tunnel) {
            info!(
                client = %name,
                %address,
                from = previous.transport(),
                to = tunnel.transport(),
                "client's traffic now goes over its newest connection"
            );
        }
    }
}

/// Opens and configures the tun; with offloads, TCP from the left reaches the driver as
/// large segments it splits only when sealing.
/// `inline`: the engines' task reads the tun (else the receive thread does).
fn open_tun(config: &VpnConfig, inline: bool) -> std::io::Result<AsyncFd<Arc<Tun>>> {
    let tun = Tun::open(&config.tun_name, config.offload)?;
    tun.configure(
        config.engine.server_address(),
        config.engine.pool.netmask(),
        TUN_MTU,
    )?;
    tun.set_nonblocking(true)?;
    let interest = match inline {
        true => tokio::io::Interest::READABLE,
        // The receive thread reads; writes to a tun do not wait.
        false => tokio::io::Interest::WRITABLE,
    };
    // SAFETY: the Arc inside the AsyncFd keeps the tun, and so its descriptor, open for as
    // long as the registration lives.
    Ok(unsafe { AsyncFd::register_with_interest(Arc::new(tun), interest)? })
}

/// Splits a super-packet the tun refused and writes the pieces.
fn write_segments(tun: &Tun, header: &VirtioNetHdr, packet: &[u8], segments: &mut Packets) {
    segments.clear();
    if let Err(error) = segment(header, packet, segments) {
        return warn!(%error, "a refused tun super-packet could not be split; dropped");
    }
    for segment in segments.iter() {
        if let Err(error) = tun.write(segment) {
            warn!(%error, "tun write failed");
        }
    }
}

/// A tun write does not block: the kernel takes the packet or drops it.
fn write_tun(tun: &AsyncFd<Arc<Tun>>, packet: &[u8]) {
    if let Err(error) = tun.get_ref().write(packet) {
        warn!(%error, "tun write failed");
    }
}

async fn next_tcp_event(tcp: Option<&mut TcpServer>) -> TcpEvent {
    match tcp {
        Some(tcp) => tcp.next_event().await,
        None => std::future::pending().await,
    }
}

fn write_status(config: &VpnConfig, driver: &Driver) {
    let now = Instant::now();
    let clock = WallClock::now();
    let openvpn_clients = driver
        .openvpn
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
            bytes_out: c.bytes_out,
            renegotiations: c.renegotiations,
            key_id: c.key_id,
            key_age_secs: now.saturating_duration_since(c.key_established).as_secs(),
            latest_handshake_unix: None,
        });
    let wireguard_clients = driver
        .wireguard
        .iter()
        .flat_map(WireguardServer::connected)
        .map(|c| ConnectedClient {
            name: c.name,
            address: c.address,
            transport: "wireguard".to_owned(),
            peer: c.endpoint,
            proto: "udp".to_owned(),
            cipher: "ChaCha20-Poly1305".to_owned(),
            connected_since_unix: clock.unix(c.connected_at),
            bytes_in: c.bytes_in,
            bytes_out: c.bytes_out,
            renegotiations: c.rekeys,
            key_id: 0,
            key_age_secs: now.saturating_duration_since(c.latest_handshake).as_secs(),
            latest_handshake_unix: Some(clock.unix(c.latest_handshake)),
        });
    let mut clients: Vec<ConnectedClient> = openvpn_clients.chain(wireguard_clients).collect();
    clients.sort_by_key(|c| c.address);
    let status = VpnStatus {
        pid: std::process::id(),
        listen: config.listen,
        tun: config.tun_name.clone(),
        pool: config.engine.pool,
        server_address: config.engine.server_address(),
        routes_pushed: driver.openvpn.routes().iter().copied().collect(),
        redirect_gateway: config.engine.redirect_gateway,
        clients,
        handshaking: driver.openvpn.handshaking(),
        dropped: driver.dropped(),
        refused: driver.openvpn.refusals,
        handshakes: Handshakes {
            openvpn: driver.openvpn.handshakes,
            wireguard: driver.wireguard.as_ref().map_or(0, |w| w.handshakes),
        },
        auth: config.engine.auth,
        updated_unix: clock.unix(now),
        tls_crypt: match config.engine.tls_crypt {
            ControlWrap::Plain => TlsCryptMode::Off,
            ControlWrap::TlsCrypt(_) => TlsCryptMode::V1,
            ControlWrap::TlsAuth(_) => TlsCryptMode::TlsAuth,
            ControlWrap::TlsCryptV2 { .. } => TlsCryptMode::V2,
        },
        proto: config.proto,
        tcp: driver.tcp.as_ref().map(TcpServer::counters),
        reloads: driver.reloads,
        data_path: Some(driver.data_path.clone()),
        wireguard: driver
            .wireguard
            .as_ref()
            .zip(config.wireguard.as_ref())
            .map(|(engine, wireguard)| WireguardServing {
                listen: wireguard.listen,
                public_key: BASE64.encode(engine.public_key()),
            }),
    };
    if let Err(error) = vnf_core::fs::write_json(&status_path(&config.state_dir), &status, false) {
        warn!(%error, "could not write status.json");
    }
}

//! The multi-client OpenVPN server engine, sans-IO: fed datagrams, tun packets and time; it
//! queues datagrams to send, packets for tun and events. Clients are found by address for
//! control packets and by peer id for DATA_V2.

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::net::Ipv4Addr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ipnet::Ipv4Net;
use rand::RngCore;
use serde::Serialize;

use super::data::{classify, Cipher, DataError, Payload, OCC_EXIT, PING_MAGIC};
use super::keymethod::{
    PeerInfo, IV_PROTO_CC_EXIT_NOTIFY, IV_PROTO_DATA_V2, IV_PROTO_TLS_KEY_EXPORT,
};
use super::link::Link;
use super::packet::{decode, ControlPacket, Opcode, Packet};
use super::session::Session;
use super::tls_crypt::TlsCrypt;
use vnf_core::clock::WallClock;

/// A PUSH_REPLY longer than this is split with push-continuation (OpenVPN's bundle size).
const MAX_PUSH_MESSAGE: usize = 1024;

#[derive(Debug, Clone)]
pub struct EngineConfig {
    pub tls: Arc<rustls::ServerConfig>,
    /// Clients get addresses from here; the server holds the first host address.
    pub pool: Ipv4Net,
    /// In order of preference.
    pub ciphers: Vec<Cipher>,
    pub ping: Duration,
    pub ping_restart: Duration,
    /// A client that is not connected this long after its first packet is dropped.
    pub handshake_window: Duration,
    pub redirect_gateway: bool,
    pub max_clients: usize,
    /// Sessions still in the handshake; more HARD_RESETs are dropped.
    pub max_handshaking: usize,
    /// The server renegotiates a client's data keys after this long (None: only when the
    /// client asks, or when a key nears its packet-id limit).
    pub reneg_after: Option<Duration>,
    /// How long a replaced key keeps working after a renegotiation starts.
    pub transition_window: Duration,
    /// Wrap every control packet with this key (tls-crypt); None: plain control channel.
    pub tls_crypt: Option<Arc<TlsCrypt>>,
}

impl EngineConfig {
    pub fn server_address(&self) -> Ipv4Addr {
        self.pool.hosts().next().unwrap_or(self.pool.addr())
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    Connected {
        name: String,
        address: Ipv4Addr,
        link: Link,
        cipher: Cipher,
    },
    Disconnected {
        name: Option<String>,
        address: Option<Ipv4Addr>,
        link: Link,
        reason: String,
    },
}

#[derive(Debug)]
pub enum Output {
    Transmit { to: Link, datagram: Vec<u8> },
    Tun(Vec<u8>),
    Event(Event),
}

/// Dropped input, by cause (reported in status and logged rate-limited by the driver).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct Counters {
    pub malformed: u64,
    pub unknown_session: u64,
    pub refused_handshakes: u64,
    pub unauthenticated_data: u64,
    pub replayed_data: u64,
    pub spoofed_source: u64,
    pub no_client_for_destination: u64,
    /// IPv6 packets from clients (their router solicitations): benign, so outside `total`.
    #[serde(default)]
    pub ipv6_from_client: u64,
    /// Control packets that failed tls-crypt: scanners and peers without the key.
    #[serde(default)]
    pub unauthenticated_control: u64,
    #[serde(default)]
    pub replayed_control: u64,
}

/// The non-zero counters as `name=n`, for logs and `status`.
impl std::fmt::Display for Counters {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let Ok(serde_json::Value::Object(fields)) = serde_json::to_value(self) else {
            return Ok(());
        };
        let nonzero: Vec<String> = fields
            .iter()
            .filter(|(_, count)| count.as_u64().is_some_and(|n| n > 0))
            .map(|(name, count)| format!("{name}={count}"))
            .collect();
        f.write_str(&nonzero.join(" "))
    }
}

impl Counters {
    /// Dropped input that may be hostile or broken (IPv6 from clients is neither).
    pub fn total(&self) -> u64 {
        self.malformed
            + self.unknown_session
            + self.refused_handshakes
            + self.unauthenticated_data
            + self.replayed_data
            + self.spoofed_source
            + self.no_client_for_destination
            + self.unauthenticated_control
            + self.replayed_control
    }
}

#[derive(Debug, Clone)]
pub struct ClientStatus {
    pub name: String,
    pub address: Ipv4Addr,
    pub link: Link,
    pub cipher: Cipher,
    pub connected_at: Instant,
    pub bytes_in: u64,
    pub bytes_out: u64,
    pub renegotiations: u64,
    /// The key the server sends with, and since when it is in use.
    pub key_id: u8,
    pub key_established: Instant,
}

/// Reads the client registry afresh (a client added a moment ago is not in the cache yet).
pub type RegistryReader = Box<dyn FnMut() -> Option<HashMap<String, Ipv4Addr>> + Send>;

pub struct Server {
    config: EngineConfig,
    read_registry: Option<RegistryReader>,
    routes: BTreeSet<Ipv4Net>,
    /// Certificate common name → the client's fixed address.
    clients: HashMap<String, Ipv4Addr>,
    sessions: HashMap<Link, Session>,
    by_peer_id: HashMap<u32, Link>,
    by_address: HashMap<Ipv4Addr, Link>,
    next_peer_id: u32,
    outputs: VecDeque<Output>,
    pub counters: Counters,
    pub last_drop: Option<String>,
    /// For tls-crypt's time field.
    clock: WallClock,
}

impl Server {
    pub fn new(config: EngineConfig) -> Server {
        Server {
            config,
            read_registry: None,
            routes: BTreeSet::new(),
            clients: HashMap::new(),
            sessions: HashMap::new(),
            by_peer_id: HashMap::new(),
            by_address: HashMap::new(),
            next_peer_id: 0,
            outputs: VecDeque::new(),
            counters: Counters::default(),
            last_drop: None,
            clock: WallClock::now(),
        }
    }

    pub fn set_registry_reader(&mut self, reader: RegistryReader) {
        self.read_registry = Some(reader);
    }

    /// The networks pushed to clients that connect from now on.
    pub fn set_routes(&mut self, routes: BTreeSet<Ipv4Net>) {
        self.routes = routes;
    }

    pub fn routes(&self) -> &BTreeSet<Ipv4Net> {
        &self.routes
    }

    /// Reads the registry again through the reader and applies it; keeps the last one when
    /// there is no reader or it cannot read.
    pub fn refresh_clients(&mut self) {
        if let Some(clients) = self.read_registry.as_mut().and_then(|read| read()) {
            self.set_clients(clients);
        }
    }

    /// The driver's periodic registry reload: a removed client gets its AUTH_FAILED at once,
    /// before its session is reaped.
    pub fn reload_clients(&mut self, now: Instant) {
        self.refresh_clients();
        self.flush(now, None);
    }

    /// The registered clients; a connected client no longer registered is disconnected.
    pub fn set_clients(&mut self, clients: HashMap<String, Ipv4Addr>) {
        self.clients = clients;
        for session in self.sessions.values_mut().filter(|s| s.is_active()) {
            let name = session.name.as_deref().unwrap_or_default();
            if self.clients.get(name) != session.address.as_ref() {
                session.send_text("AUTH_FAILED,client removed");
                session.close("the client was removed or its address changed");
            }
        }
    }

    /// Whether a session (connected or in its handshake) exists on this link.
    pub fn has_session(&self, link: &Link) -> bool {
        self.sessions.contains_key(link)
    }

    /// The transport under a session is gone (a TCP connection closed): so is the session.
    pub fn close_link(&mut self, now: Instant, link: Link, reason: &str) {
        if let Some(session) = self.sessions.get_mut(&link) {
            session.close(reason);
            self.flush(now, Some(link));
        }
    }

    #[cfg(test)]
    pub fn session_count(&self) -> usize {
        self.sessions.len()
    }

    pub fn poll_output(&mut self) -> Option<Output> {
        self.outputs.pop_front()
    }

    pub fn connected(&self) -> Vec<ClientStatus> {
        let mut clients: Vec<ClientStatus> = self
            .sessions
            .values()
            .filter(|s| s.is_active())
            .filter_map(|s| {
                let (key_id, key_established) = s.sending_key();
                Some(ClientStatus {
                    name: s.name.clone()?,
                    address: s.address?,
                    link: s.link,
                    cipher: s.cipher?,
                    connected_at: s.connected_at?,
                    bytes_in: s.bytes_in,
                    bytes_out: s.bytes_out,
                    renegotiations: s.renegotiations,
                    key_id,
                    key_established: key_established?,
                })
            })
            .collect();
        clients.sort_by_key(|c| c.address);
        clients
    }

    fn drop_input(&mut self, counter: fn(&mut Counters) -> &mut u64, why: String) {
        *counter(&mut self.counters) += 1;
        self.last_drop = Some(why);
    }

    pub fn handle_datagram(&mut self, now: Instant, from: Link, datagram: &[u8]) {
        let mut wrap_id = None;
        let unwrapped;
        let datagram = match &self.config.tls_crypt {
            Some(tls_crypt) if is_control(datagram) => match tls_crypt.unwrap(datagram) {
                Ok((packet, id)) => {
                    wrap_id = Some(id);
                    unwrapped = packet;
                    &unwrapped[..]
                }
                Err(error) => {
                    let why = format!("from {from}: {error}");
                    return self.drop_input(|c| &mut c.unauthenticated_control, why);
                }
            },
            _ => datagram,
        };
        let packet = match decode(datagram) {
            Ok(packet) => packet,
            Err(error) => {
                return self.drop_input(|c| &mut c.malformed, format!("from {from}: {error}"))
            }
        };
        match packet {
            Packet::Control(control) => self.handle_control(now, from, &control, wrap_id),
            Packet::Data {
                opcode: Opcode::DataV2,
                key_id,
                peer_id: Some(peer_id),
                datagram,
            } => self.handle_data(now, from, peer_id, key_id, datagram),
            Packet::Data { .. } => self.drop_input(
                |c| &mut c.malformed,
                format!("from {from}: DATA_V1 (clients get a peer id and send DATA_V2)"),
            ),
        }
        self.flush(now, Some(from));
    }

    fn handle_control(
        &mut self,
        now: Instant,
        from: Link,
        packet: &ControlPacket<'_>,
        wrap_id: Option<u32>,
    ) {
        let known = self.sessions.get(&from).map(|s| s.remote_id);
        if packet.opcode == Opcode::HardResetClientV2 && known != Some(packet.session_id) {
            let busy = self
                .sessions
                .get(&from)
                .is_some_and(|s| s.is_active() && now < s.last_received + self.config.ping);
            if busy {
                // Only a restarted client with the same source port, or a forgery, does this;
                // the live session wins until it has been silent for a ping interval.
                let why = format!("from {from}: HARD_RESET while its session is active");
                return self.drop_input(|c| &mut c.refused_handshakes, why);
            }
            if let Some(old) = self.sessions.get_mut(&from) {
                old.close("the client started a new session");
                self.reap();
            }
            if !self.admit_new_session(now, from, packet) {
                return;
            }
        } else if known != Some(packet.session_id) {
            let why = format!("from {from}: {:?} for no known session", packet.opcode);
            return self.drop_input(|c| &mut c.unknown_session, why);
        }
        let session = self.sessions.get_mut(&from).expect("admitted above");
        if let Some(id) = wrap_id {
            if session.wrap.received.check(id).is_err() {
                let why = format!("from {from}: tls-crypt packet id {id} replayed");
                return self.drop_input(|c| &mut c.replayed_control, why);
            }
            session.wrap.received.commit(id);
        }
        if !session.knows_key(packet.key_id) {
            if packet.opcode != Opcode::SoftResetV1 || !session.accepts_soft_reset(packet.key_id) {
                let why = format!(
                    "from {from}: {:?} for key {}, which is not the next key",
                    packet.opcode, packet.key_id
                );
                return self.drop_input(|c| &mut c.unknown_session, why);
            }
            session.renegotiate(now, self.config.transition_window);
            if session.closing.is_some() {
                return;
            }
        }
        let requests = session.on_control(packet, now);
        if requests.push {
            self.push_reply(now, from);
        }
    }

    fn admit_new_session(&mut self, now: Instant, from: Link, packet: &ControlPacket<'_>) -> bool {
        let handshaking = self
            .sessions
            .values()
            .filter(|s| s.connected_at.is_none())
            .count();
        if handshaking >= self.config.max_handshaking
            || self.sessions.len() >= self.config.max_clients
        {
            let why = format!(
                "from {from}: new session refused ({handshaking} handshakes in progress, {} sessions)",
                self.sessions.len()
            );
            self.drop_input(|c| &mut c.refused_handshakes, why);
            return false;
        }
        let mut local_id = [0u8; 8];
        rand::rng().fill_bytes(&mut local_id);
        let peer_id = self.allocate_peer_id();
        match Session::new(
            self.config.tls.clone(),
            from,
            local_id,
            packet.session_id,
            peer_id,
            now,
        ) {
            Ok(session) => {
                self.sessions.insert(from, session);
                self.by_peer_id.insert(peer_id, from);
                true
            }
            Err(error) => {
                self.drop_input(
                    |c| &mut c.refused_handshakes,
                    format!("TLS session: {error}"),
                );
                false
            }
        }
    }

    fn allocate_peer_id(&mut self) -> u32 {
        // 24 bits on the wire; 0xFFFFFF means "no peer id".
        loop {
            let id = self.next_peer_id;
            self.next_peer_id = (self.next_peer_id + 1) % 0x00ff_ffff;
            if !self.by_peer_id.contains_key(&id) {
                return id;
            }
        }
    }

    /// The client finished key-method 2 and asked for its configuration: pick the cipher,
    /// derive the keys, send PUSH_REPLY and start the data channel.
    fn push_reply(&mut self, now: Instant, from: Link) {
        let unknown = self
            .sessions
            .get(&from)
            .and_then(|s| s.name.as_ref())
            .is_some_and(|name| !self.clients.contains_key(name));
        if unknown {
            self.refresh_clients();
        }
        let Some(session) = self.sessions.get_mut(&from) else {
            return;
        };
        let (Some(name), Some(client)) = (session.name.clone(), session.client.as_ref()) else {
            return;
        };
        let peer_info = &client.peer_info;
        let admission = admit(&self.clients, &self.config, &name, peer_info);
        let (address, cipher) = match admission {
            Ok(admitted) => admitted,
            Err(reason) => {
                session.send_text(&format!("AUTH_FAILED,{reason}"));
                session.close(format!("refused {name}: {reason}"));
                return;
            }
        };
        let cc_exit = peer_info.proto() & IV_PROTO_CC_EXIT_NOTIFY != 0;
        if let Err(reason) = session.start_data_channel(cipher, now) {
            return session.close(reason);
        }
        session.address = Some(address);
        for message in push_messages(
            &self.config,
            &self.routes,
            address,
            session.peer_id,
            cipher,
            cc_exit,
        ) {
            session.send_text(&message);
        }
        if let Some(previous) = self.by_address.insert(address, from) {
            if previous != from {
                if let Some(old) = self.sessions.get_mut(&previous) {
                    old.close(format!("{name} connected again from {from}"));
                }
            }
        }
        self.outputs.push_back(Output::Event(Event::Connected {
            name,
            address,
            link: from,
            cipher,
        }));
    }

    fn handle_data(&mut self, now: Instant, from: Link, peer_id: u32, key_id: u8, datagram: &[u8]) {
        let Some(&peer) = self.by_peer_id.get(&peer_id) else {
            let why = format!("from {from}: data for unknown peer id {peer_id}");
            return self.drop_input(|c| &mut c.unknown_session, why);
        };
        let Some(session) = self.sessions.get_mut(&peer).filter(|s| s.is_active()) else {
            let why = format!("from {from}: data before the session is up");
            return self.drop_input(|c| &mut c.unknown_session, why);
        };
        let plaintext = match session.open(key_id, datagram) {
            Ok(plaintext) => plaintext,
            Err(DataError::Replayed(id)) => {
                let why = format!("from {from}: replayed data packet id {id}");
                return self.drop_input(|c| &mut c.replayed_data, why);
            }
            Err(error) => {
                let why = format!("from {from}: data packet {error}");
                return self.drop_input(|c| &mut c.unauthenticated_data, why);
            }
        };
        session.last_received = now;
        session.bytes_in += datagram.len() as u64;
        // Authenticated traffic from a new address: the client moved (NAT rebinding), unless
        // another session holds that address; then it stays where it was. Only UDP floats:
        // a TCP session lives and dies with its connection.
        let at = if from != peer && self.float(peer, from) {
            from
        } else {
            peer
        };
        let session = self
            .sessions
            .get_mut(&at)
            .expect("the session of this peer id");
        match classify(&plaintext) {
            Payload::Ping => {}
            Payload::Occ(OCC_EXIT) => session.close("the client exited"),
            Payload::Occ(_) => {}
            Payload::Ip(packet) if packet.first().is_some_and(|b| b >> 4 == 6) => {
                // The client's tun solicits routers over IPv6 now and then: not an attack,
                // and the tunnel carries IPv4 only.
                self.counters.ipv6_from_client += 1;
            }
            Payload::Ip(packet) => {
                let source = ipv4_source(packet);
                if source.is_some() && source == session.address {
                    // `open` returned the packet as its own buffer: hand that over.
                    self.outputs.push_back(Output::Tun(plaintext));
                } else {
                    let source = source.map_or_else(
                        || "a packet that is not IPv4".to_owned(),
                        |source| format!("a packet with source {source}"),
                    );
                    let why = match session.address {
                        Some(address) => {
                            format!("from {from}: {source} from the client at {address}")
                        }
                        None => format!("from {from}: {source} from a client without an address"),
                    };
                    self.drop_input(|c| &mut c.spoofed_source, why);
                }
            }
        }
    }

    /// Moves a UDP session to a new address; false when another session holds that address
    /// or either link is TCP.
    fn float(&mut self, old: Link, new: Link) -> bool {
        if old.is_reliable() || new.is_reliable() || self.sessions.contains_key(&new) {
            return false;
        }
        let Some(mut session) = self.sessions.remove(&old) else {
            return false;
        };
        session.link = new;
        self.by_peer_id.insert(session.peer_id, new);
        if let Some(address) = session.address {
            self.by_address.insert(address, new);
        }
        self.sessions.insert(new, session);
        true
    }

    /// A packet read from tun, for the client whose address is its destination.
    pub fn handle_tun_packet(&mut self, now: Instant, packet: &[u8]) {
        // IPv6 on tun (router solicitations from the kernel) has nowhere to go yet.
        let Some(destination) = ipv4_destination(packet) else {
            return;
        };
        let Some(&peer) = self.by_address.get(&destination) else {
            let why = format!("no client has {destination}");
            return self.drop_input(|c| &mut c.no_client_for_destination, why);
        };
        self.send_data(now, peer, packet);
    }

    fn send_data(&mut self, now: Instant, peer: Link, payload: &[u8]) {
        let Some(session) = self.sessions.get_mut(&peer).filter(|s| s.is_active()) else {
            return;
        };
        match session.seal(payload) {
            Ok(datagram) => {
                session.last_sent = now;
                session.bytes_out += datagram.len() as u64;
                self.outputs
                    .push_back(Output::Transmit { to: peer, datagram });
            }
            Err(error) => session.close(format!("data channel: {error}")),
        }
    }

    /// Resends, keepalives, renegotiation, timeouts.
    pub fn handle_timeout(&mut self, now: Instant) {
        let mut pings = Vec::new();
        for session in self.sessions.values_mut() {
            session.expire_lame_duck(now);
            if session.connected_at.is_none()
                && now >= session.created + self.config.handshake_window
            {
                session.close(format!(
                    "no connection within {} s",
                    self.config.handshake_window.as_secs()
                ));
            } else if session
                .renegotiating_since()
                .is_some_and(|since| now >= since + self.config.handshake_window)
            {
                session.close(format!(
                    "key renegotiation not done within {} s",
                    self.config.handshake_window.as_secs()
                ));
            } else if session.is_active() {
                let due = renegotiation_due(&self.config, session);
                if due.is_some_and(|at| now >= at) {
                    session.renegotiate(now, self.config.transition_window);
                }
                if now >= session.last_received + self.config.ping_restart {
                    session.close(format!(
                        "nothing received for {} s (ping-restart)",
                        self.config.ping_restart.as_secs()
                    ));
                } else if now >= session.last_sent + self.config.ping {
                    pings.push(session.link);
                }
            }
        }
        for peer in pings {
            self.send_data(now, peer, &PING_MAGIC);
        }
        self.flush(now, None);
    }

    pub fn next_timeout(&self) -> Option<Instant> {
        self.sessions
            .values()
            .flat_map(|s| {
                let timer = if s.connected_at.is_none() {
                    s.created + self.config.handshake_window
                } else {
                    (s.last_received + self.config.ping_restart).min(s.last_sent + self.config.ping)
                };
                [
                    Some(timer),
                    s.next_control_timeout(),
                    renegotiation_due(&self.config, s),
                    s.renegotiating_since()
                        .map(|since| since + self.config.handshake_window),
                    s.lame_duck_expires(),
                ]
            })
            .flatten()
            .min()
    }

    /// Tells every connected client to reconnect later (the server is going away).
    pub fn shutdown(&mut self, now: Instant) {
        for session in self.sessions.values_mut() {
            if session.is_active() {
                session.send_text("RESTART");
            }
            session.close("the server is shutting down");
        }
        self.flush(now, None);
    }

    /// Queues due control packets (for one peer or all), then removes closed sessions.
    fn flush(&mut self, now: Instant, only: Option<Link>) {
        // A 32-bit field, as OpenVPN's: it wraps in 2106.
        let wall_clock = self.clock.unix(now) as u32;
        let tls_crypt = self.config.tls_crypt.clone();
        let mut queue = |session: &mut Session| {
            for datagram in session.control_datagrams(now) {
                let datagram = match &tls_crypt {
                    Some(tls_crypt) => tls_crypt.wrap(&datagram, &mut session.wrap, wall_clock),
                    None => datagram,
                };
                self.outputs.push_back(Output::Transmit {
                    to: session.link,
                    datagram,
                });
            }
        };
        match only {
            Some(peer) => self
                .sessions
                .get_mut(&peer)
                .into_iter()
                .for_each(&mut queue),
            None => self.sessions.values_mut().for_each(&mut queue),
        }
        self.reap();
    }

    fn reap(&mut self) {
        let closed: Vec<Link> = self
            .sessions
            .values()
            .filter(|s| s.closing.is_some())
            .map(|s| s.link)
            .collect();
        for peer in closed {
            let session = self.sessions.remove(&peer).expect("listed");
            self.by_peer_id.remove(&session.peer_id);
            if let Some(address) = session.address {
                if self.by_address.get(&address) == Some(&peer) {
                    self.by_address.remove(&address);
                }
            }
            self.outputs.push_back(Output::Event(Event::Disconnected {
                name: session.name,
                address: session.address,
                link: peer,
                reason: session.closing.unwrap_or_default(),
            }));
        }
    }
}

/// When the server starts renegotiating this session's key: `reneg_after` past its
/// establishment, or at once when the key nears its packet-id limit.
fn renegotiation_due(config: &EngineConfig, session: &Session) -> Option<Instant> {
    let established = session.key_established()?;
    if session.key_worn_out() {
        return Some(established);
    }
    config.reneg_after.map(|after| established + after)
}

/// The client's address and data cipher, or why it may not connect.
fn admit(
    clients: &HashMap<String, Ipv4Addr>,
    config: &EngineConfig,
    name: &str,
    peer_info: &PeerInfo,
) -> Result<(Ipv4Addr, Cipher), String> {
    let address = *clients
        .get(name)
        .ok_or_else(|| format!("no client named {name:?} (dockvpn client add {name})"))?;
    if !config.pool.contains(&address) || address == config.server_address() {
        return Err(format!(
            "the address {address} of {name} is outside the pool {}",
            config.pool
        ));
    }
    let proto = peer_info.proto();
    if proto & IV_PROTO_TLS_KEY_EXPORT == 0 || proto & IV_PROTO_DATA_V2 == 0 {
        return Err("the client must support tls-ekm and DATA_V2 (OpenVPN 2.6 or later)".into());
    }
    let offered = peer_info.ciphers();
    let cipher = config
        .ciphers
        .iter()
        .copied()
        .find(|c| offered.iter().any(|o| o.eq_ignore_ascii_case(c.name())))
        .ok_or_else(|| {
            let ours: Vec<&str> = config.ciphers.iter().map(|c| c.name()).collect();
            format!(
                "no common data cipher (client offers {}, server allows {})",
                offered.join(":"),
                ours.join(":")
            )
        })?;
    Ok((address, cipher))
}

/// The PUSH_REPLY message(s): one unless the options exceed the bundle size, then several
/// with `push-continuation 2` on all but the last (`push-continuation 1`).
pub fn push_messages(
    config: &EngineConfig,
    routes: &BTreeSet<Ipv4Net>,
    address: Ipv4Addr,
    peer_id: u32,
    cipher: Cipher,
    cc_exit: bool,
) -> Vec<String> {
    let mut options = vec![
        format!("route-gateway {}", config.server_address()),
        "topology subnet".to_owned(),
        format!("ping {}", config.ping.as_secs()),
        format!("ping-restart {}", config.ping_restart.as_secs()),
        format!("ifconfig {address} {}", config.pool.netmask()),
        format!("peer-id {peer_id}"),
        format!("cipher {}", cipher.name()),
        if cc_exit {
            "protocol-flags cc-exit tls-ekm".to_owned()
        } else {
            "key-derivation tls-ekm".to_owned()
        },
    ];
    if config.redirect_gateway {
        options.push("redirect-gateway def1".to_owned());
    }
    options.extend(
        routes
            .iter()
            .filter(|r| r.prefix_len() > 0)
            .map(|r| format!("route {} {}", r.network(), r.netmask())),
    );
    let mut messages = Vec::new();
    let mut current = String::from("PUSH_REPLY");
    // Room for ",push-continuation 2".
    let budget = MAX_PUSH_MESSAGE - 24;
    for option in options {
        if current.len() + 1 + option.len() > budget {
            messages.push(std::mem::replace(&mut current, String::from("PUSH_REPLY")));
        }
        current.push(',');
        current.push_str(&option);
    }
    messages.push(current);
    let last = messages.len() - 1;
    if last > 0 {
        for (i, message) in messages.iter_mut().enumerate() {
            message.push_str(if i == last {
                ",push-continuation 1"
            } else {
                ",push-continuation 2"
            });
        }
    }
    messages
}

/// A control packet, by its clear opcode byte (an unknown opcode is malformed, not control).
fn is_control(datagram: &[u8]) -> bool {
    datagram.first().is_some_and(|&first| {
        Opcode::from_wire(first >> 3)
            .is_some_and(|opcode| !matches!(opcode, Opcode::DataV1 | Opcode::DataV2))
    })
}

fn ipv4_source(packet: &[u8]) -> Option<Ipv4Addr> {
    (packet.len() >= 20 && packet[0] >> 4 == 4)
        .then(|| Ipv4Addr::new(packet[12], packet[13], packet[14], packet[15]))
}

fn ipv4_destination(packet: &[u8]) -> Option<Ipv4Addr> {
    (packet.len() >= 20 && packet[0] >> 4 == 4)
        .then(|| Ipv4Addr::new(packet[16], packet[17], packet[18], packet[19]))
}

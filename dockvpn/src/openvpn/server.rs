//! The multi-client OpenVPN server engine, sans-IO: fed datagrams, tun packets and time; it
//! queues datagrams to send, packets for tun and events. Clients are found by address for
//! control packets and by peer id for DATA_V2.

use std::collections::{BTreeSet, HashMap, HashSet, VecDeque};
use std::net::Ipv4Addr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ipnet::Ipv4Net;

use super::compression::{Framing, Unframed};
use super::cookie::{echoed_session, reset_reply, SessionCookies};
use super::data::{
    classify, Cipher, DataError, Payload, OCC_EXIT, OCC_MAGIC, OCC_REPLY, OCC_REQUEST, PING_MAGIC,
};
use super::keymethod::{
    ClientKeyMessage, IV_PROTO_CC_EXIT_NOTIFY, IV_PROTO_DATA_V2, IV_PROTO_TLS_KEY_EXPORT,
};
use super::link::Link;
use super::packet::{decode, ControlPacket, Opcode, Packet, SessionId};
use super::session::{DataKeys, Fingerprint, KeyDerivation, Session, OPTIONS_STRING};
use super::tls_crypt::{ControlKey, WrapState};
use super::wrap::{ControlWrap, Opened, Unwrapped};
use crate::access::client_networks;
use crate::engine::BufferPool;
use vnf_core::clock::WallClock;

/// How long after a wrong password a client's next password is refused unchecked.
const PASSWORD_RETRY: Duration = Duration::from_secs(2);

pub use crate::dropped::Counters;
use crate::password::{self, Auth};
use crate::refusal::{Refusal, Refusals};

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
    /// How control packets are wrapped: plain, tls-crypt, tls-auth or tls-crypt-v2.
    pub tls_crypt: ControlWrap,
    /// How every client's data keys are derived; None: tls-ekm when the client offers it,
    /// else the PRF.
    pub key_derivation: Option<KeyDerivation>,
    /// Certificate only, or certificate and password.
    pub auth: Auth,
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
        /// Stays the session's while it floats or its NAT mapping changes: the driver's
        /// address book holds this, not the link.
        peer_id: u32,
        cipher: Cipher,
    },
    Disconnected {
        name: Option<String>,
        address: Option<Ipv4Addr>,
        link: Link,
        peer_id: u32,
        reason: String,
    },
}

pub type Output = crate::engine::Output<Link, Event>;

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

/// A registered client as the engine admits it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RegisteredClient {
    /// Its fixed VPN address.
    pub address: Ipv4Addr,
    /// Its current certificate: the only one that connects as this client.
    pub certificate: Fingerprint,
}

/// The client registry as the engine reads it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ClientRegistry {
    /// Certificate common name → client.
    pub clients: HashMap<String, RegisteredClient>,
    /// Revoked certificates, so that a refusal names the reason.
    pub revoked: HashSet<Fingerprint>,
    /// Client name → the Argon2id hash of its password (`client passwd`).
    pub passwords: HashMap<String, String>,
}

impl ClientRegistry {
    /// Whether a session with this name, address and certificate may stay connected.
    fn keeps(
        &self,
        name: Option<&str>,
        address: Option<Ipv4Addr>,
        certificate: Option<Fingerprint>,
    ) -> bool {
        name.and_then(|name| self.clients.get(name))
            .is_some_and(|client| {
                Some(client.address) == address && Some(client.certificate) == certificate
            })
    }

    /// The address of the client that `certificate` identifies, or why it may not connect.
    fn identify(
        &self,
        name: &str,
        certificate: Option<Fingerprint>,
    ) -> Result<Ipv4Addr, (Refusal, String)> {
        if certificate.is_some_and(|certificate| self.revoked.contains(&certificate)) {
            return Err((
                Refusal::Revoked,
                format!("the certificate of {name:?} is revoked"),
            ));
        }
        let client = self.clients.get(name).ok_or_else(|| {
            (
                Refusal::BadCertificate,
                format!("no client named {name:?} (dockvpn client add {name})"),
            )
        })?;
        if certificate != Some(client.certificate) {
            return Err((
                Refusal::BadCertificate,
                format!("not the current certificate of {name:?}: connect with the profile issued last (dockvpn client config {name})"),
            ));
        }
        Ok(client.address)
    }
}

/// Reads the client registry afresh (a client added a moment ago is not in the cache yet).
pub type RegistryReader = Box<dyn FnMut() -> Option<ClientRegistry> + Send>;

/// Reads the clients' allow lists afresh, alongside the registry.
pub type AllowanceReader = Box<dyn FnMut() -> Option<HashMap<String, Vec<Ipv4Net>>> + Send>;

pub struct Server {
    config: EngineConfig,
    read_registry: Option<RegistryReader>,
    read_allowances: Option<AllowanceReader>,
    /// Connected clients still to be told to reconnect for new routes: when, where, who.
    restarts: VecDeque<(Instant, Link, u32)>,
    routes: BTreeSet<Ipv4Net>,
    clients: ClientRegistry,
    /// Certificate common name → the only networks the client may reach (`--allow`).
    allowances: HashMap<String, Vec<Ipv4Net>>,
    sessions: HashMap<Link, Session>,
    /// Connected UDP sessions whose address another client took (a NAT gave it that port),
    /// by peer id: each comes back with its next authenticated data packet from its new
    /// address, or ends at ping-restart.
    parked: HashMap<u32, Session>,
    /// tls-crypt-v2 resets that created a session lately, by digest (replays create none).
    v2_resets_seen: HashMap<[u8; 32], Instant>,
    by_peer_id: HashMap<u32, Link>,
    by_address: HashMap<Ipv4Addr, Link>,
    next_peer_id: u32,
    outputs: VecDeque<Output>,
    /// What `Transmit` and `Tun` outputs are made in; the driver hands them back.
    buffers: BufferPool,
    pub counters: Counters,
    /// Refused clients, by reason.
    pub refusals: Refusals,
    /// Handshakes completed since the server started: connects and data-key renegotiations.
    pub handshakes: u64,
    pub last_drop: Option<String>,
    /// For tls-crypt's time field.
    clock: WallClock,
    /// Server session ids for clients that have not echoed one yet (no state per client).
    cookies: SessionCookies,
    /// When each registered client last gave a wrong password (one guess per PASSWORD_RETRY).
    password_failures: HashMap<String, Instant>,
    /// Clients already told that their profile should drop its compression option.
    warned_compression: BTreeSet<String>,
}

impl Server {
    pub fn new(config: EngineConfig) -> Server {
        Server {
            config,
            read_registry: None,
            read_allowances: None,
            restarts: VecDeque::new(),
            routes: BTreeSet::new(),
            clients: ClientRegistry::default(),
            allowances: HashMap::new(),
            sessions: HashMap::new(),
            parked: HashMap::new(),
            v2_resets_seen: HashMap::new(),
            by_peer_id: HashMap::new(),
            by_address: HashMap::new(),
            next_peer_id: 0,
            outputs: VecDeque::new(),
            buffers: BufferPool::new(),
            counters: Counters::default(),
            refusals: Refusals::default(),
            handshakes: 0,
            last_drop: None,
            clock: WallClock::now(),
            cookies: SessionCookies::new(Instant::now()),
            password_failures: HashMap::new(),
            warned_compression: BTreeSet::new(),
        }
    }

    pub fn set_registry_reader(&mut self, reader: RegistryReader) {
        self.read_registry = Some(reader);
    }

    /// The networks pushed to clients that connect from now on.
    pub fn set_routes(&mut self, routes: BTreeSet<Ipv4Net>) {
        self.routes = routes;
    }

    /// The clients' allow lists; a connected client whose list changed is told to reconnect,
    /// so it pulls the routes the new list gives it.
    fn set_allowances(&mut self, allowances: HashMap<String, Vec<Ipv4Net>>) {
        let changed = |name: &str| allowances.get(name) != self.allowances.get(name);
        for session in self.sessions.values_mut().filter(|s| s.is_active()) {
            if session.name.as_deref().is_some_and(changed) {
                session.send_text("RESTART,the networks this client may reach changed");
            }
        }
        self.allowances = allowances;
    }

    /// Where the clients' allow lists come from.
    pub fn set_allowance_reader(&mut self, reader: AllowanceReader) {
        self.read_allowances = Some(reader);
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
        if let Some(allowances) = self.read_allowances.as_mut().and_then(|read| read()) {
            self.set_allowances(allowances);
        }
    }

    /// The driver's periodic registry reload: a removed client gets its AUTH_FAILED at once,
    /// before its session is reaped.
    pub fn reload_clients(&mut self, now: Instant) {
        self.refresh_clients();
        self.flush(now, None);
    }

    /// The registered clients; a connected client no longer registered, or no longer with
    /// its certificate (revoked, renewed), is disconnected.
    pub fn set_clients(&mut self, clients: ClientRegistry) {
        self.clients = clients;
        let kept = |s: &Session, clients: &ClientRegistry| {
            clients.keeps(s.name.as_deref(), s.address, s.certificate)
        };
        for session in self.sessions.values_mut().filter(|s| s.is_active()) {
            if !kept(session, &self.clients) {
                let revoked = session
                    .certificate
                    .is_some_and(|certificate| self.clients.revoked.contains(&certificate));
                session.send_text(if revoked {
                    "AUTH_FAILED,certificate revoked"
                } else {
                    "AUTH_FAILED,client removed"
                });
                session.close(
                    "the client was removed, its certificate revoked or its address changed",
                );
            }
        }
        let clients = std::mem::take(&mut self.clients);
        self.end_parked(
            |s| !kept(s, &clients),
            "the client was removed, its certificate revoked or its address changed",
        );
        self.clients = clients;
    }

    /// The peer id of the connected session with this VPN address, if any (the driver's
    /// fallback when the same client's other connection leaves).
    pub fn peer_for_address(&self, address: Ipv4Addr) -> Option<u32> {
        let link = self.by_address.get(&address)?;
        Some(self.sessions.get(link).filter(|s| s.is_active())?.peer_id)
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

    /// Sessions still in their first handshake (created by a client that echoed the server's
    /// session id, and not connected yet).
    pub fn handshaking(&self) -> usize {
        self.sessions
            .values()
            .filter(|s| s.connected_at.is_none())
            .count()
    }

    pub fn poll_output(&mut self) -> Option<Output> {
        self.outputs.pop_front()
    }

    /// Hands back the buffer of a `Transmit` or `Tun` output once it is sent or written:
    /// the engine seals and opens the next packets in it instead of a new allocation.
    pub fn recycle(&mut self, buffer: Vec<u8>) {
        self.buffers.recycle(buffer);
    }

    pub fn connected(&self) -> Vec<ClientStatus> {
        let mut clients: Vec<ClientStatus> = self
            .sessions
            .values()
            .chain(self.parked.values())
            .filter(|s| s.is_active())
            .filter_map(|s| {
                let (key_id, key_established) = s.sending_key();
                Some(ClientStatus {
                    name: s.name.clone()?,
                    address: s.address?,
                    link: s.link,
                    cipher: s.keys?.cipher,
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
        let session_key = self.sessions.get(&from).and_then(|s| s.wrap.key.as_ref());
        let (datagram, unwrapped) = match self.config.tls_crypt.open(datagram, session_key) {
            Ok(Opened::Plain(datagram)) => (datagram, None),
            Ok(Opened::Unwrapped(unwrapped)) => (&[][..], Some(unwrapped)),
            Err(error) => {
                let why = format!("from {from}: {error}");
                return self.drop_input(|c| &mut c.unauthenticated_control, why);
            }
        };
        let datagram = unwrapped.as_ref().map_or(datagram, |u| &u.packet[..]);
        let packet = match decode(datagram) {
            Ok(packet) => packet,
            Err(error) => {
                return self.drop_input(|c| &mut c.malformed, format!("from {from}: {error}"))
            }
        };
        match packet {
            Packet::Control(control) => {
                self.handle_control(now, from, &control, unwrapped.as_ref())
            }
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
        unwrapped: Option<&Unwrapped>,
    ) {
        let known = self.sessions.get(&from).map(|s| s.remote_id);
        // tls-crypt-v2: the client's own key, unwrapped from its reset, already proves that a
        // key holder sent it; the client's later packets carry no copy of that key, so its
        // session exists from the reset on.
        let v2_reset = unwrapped.and_then(|u| u.v2_reset_digest);
        if known != Some(packet.session_id) {
            let local_id = if let Some(digest) = v2_reset {
                if !self.first_sight_of_v2_reset(now, digest) {
                    let why = format!("from {from}: a tls-crypt-v2 reset seen before (replayed)");
                    return self.drop_input(|c| &mut c.replayed_control, why);
                }
                self.cookies.issue(now, from.peer(), packet.session_id)
            } else if packet.opcode == Opcode::HardResetClientV2 {
                return self.answer_reset(now, from, packet, unwrapped.map(|u| &u.key));
            } else {
                let echoed = echoed_session(packet).filter(|&echoed| {
                    self.cookies
                        .verify(now, from.peer(), packet.session_id, echoed)
                });
                let Some(local_id) = echoed else {
                    let why = format!("from {from}: {:?} for no known session", packet.opcode);
                    return self.drop_input(|c| &mut c.unknown_session, why);
                };
                local_id
            };
            // The new client receives at this address now (it echoed the server's id, or
            // holds a tls-crypt-v2 key): a NAT gave it the port of the session there. That
            // client has moved, so its session waits for it elsewhere.
            if self.sessions.get(&from).is_some_and(Session::is_active) {
                self.park(from);
            } else if let Some(old) = self.sessions.get_mut(&from) {
                old.close("the client started a new session");
                self.reap();
            }
            // After a stateless reply the session's packet ids continue past it; a v2
            // session's start afresh.
            let wrap = match v2_reset {
                Some(_) => WrapState::default(),
                None => WrapState::after_stateless_reset(),
            };
            if !self.admit_new_session(now, from, packet.session_id, local_id, wrap) {
                return;
            }
        }
        let session = self.sessions.get_mut(&from).expect("admitted above");
        if let Some(Unwrapped { packet_id, key, .. }) = unwrapped {
            let id = *packet_id;
            match &session.wrap.key {
                None => session.wrap.key = Some(key.clone()),
                Some(own) if !own.same_key(key) => {
                    let why = format!("from {from}: control packet under another client's key");
                    return self.drop_input(|c| &mut c.unauthenticated_control, why);
                }
                Some(_) => {}
            }
            if session.wrap.received.check(id).is_err() {
                let why = format!("from {from}: tls-crypt packet id {id} replayed");
                return self.drop_input(|c| &mut c.replayed_control, why);
            }
            session.wrap.received.commit(id);
        }
        if v2_reset.is_some() {
            // Answered from the session, so a reset resent after a lost reply is answered again.
            if session.connected_at.is_none() {
                let reply = reset_reply(packet, session.local_id);
                let datagram = session.wrap.seal(reply, self.clock.unix(now) as u32);
                self.outputs
                    .push_back(Output::Transmit { to: from, datagram });
            }
            return;
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
        let renegotiated = session.renegotiations;
        let requests = session.on_control(packet, now);
        self.handshakes += session.renegotiations - renegotiated;
        if requests.over_budget {
            let why = format!("from {from}: control message past the reassembly budget");
            self.drop_input(|c| &mut c.reassembly_over_budget, why);
        }
        if requests.push {
            self.push_reply(now, from);
        }
    }

    /// Whether this tls-crypt-v2 reset (by digest) is new: a client's own resend re-wraps it,
    /// so the same bytes again are a replay. Remembered for a handshake window, so only
    /// resets that opened under the server key (real clients') take memory.
    fn first_sight_of_v2_reset(&mut self, now: Instant, digest: [u8; 32]) -> bool {
        let window = self.config.handshake_window;
        self.v2_resets_seen.retain(|_, seen| now < *seen + window);
        self.v2_resets_seen.insert(digest, now).is_none()
    }

    /// Answers a client's HARD_RESET without keeping anything: the reply carries a server
    /// session id derived from the client's address and session id (`cookie.rs`).
    fn answer_reset(
        &mut self,
        now: Instant,
        from: Link,
        reset: &ControlPacket<'_>,
        key: Option<&ControlKey>,
    ) {
        if reset.message_id != Some(0) || reset.key_id != 0 {
            let why = format!("from {from}: a HARD_RESET that is not message 0 on key 0");
            return self.drop_input(|c| &mut c.malformed, why);
        }
        let server_session = self.cookies.issue(now, from.peer(), reset.session_id);
        let reply = reset_reply(reset, server_session);
        // The first packet id of a fresh state; the session continues after it.
        let datagram = WrapState::with_key(key.cloned()).seal(reply, self.clock.unix(now) as u32);
        self.outputs
            .push_back(Output::Transmit { to: from, datagram });
    }

    /// Creates the session of a client that echoed `local_id`, the id the server gave it.
    fn admit_new_session(
        &mut self,
        now: Instant,
        from: Link,
        remote_id: SessionId,
        local_id: SessionId,
        wrap: WrapState,
    ) -> bool {
        let handshaking = self.handshaking();
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
        let peer_id = self.allocate_peer_id();
        match Session::new(
            self.config.tls.clone(),
            from,
            local_id,
            remote_id,
            peer_id,
            wrap,
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
            if !self.by_peer_id.contains_key(&id) && !self.parked.contains_key(&id) {
                return id;
            }
        }
    }

    /// The client finished key-method 2 and asked for its configuration: pick the cipher,
    /// derive the keys, send PUSH_REPLY and start the data channel.
    fn push_reply(&mut self, now: Instant, from: Link) {
        // A client added (or renewed) a moment ago is not in the last registry read yet.
        let unknown = self.sessions.get(&from).is_some_and(|s| {
            s.name
                .as_ref()
                .is_some_and(|name| self.clients.identify(name, s.certificate).is_err())
        });
        if unknown {
            self.refresh_clients();
        }
        let Some(session) = self.sessions.get_mut(&from) else {
            return;
        };
        let (Some(name), Some(client)) = (session.name.clone(), session.client.as_ref()) else {
            return;
        };
        let password_failures = &mut self.password_failures;
        let identified = self
            .clients
            .identify(&name, session.certificate)
            .and_then(|address| match self.config.auth {
                Auth::Cert => Ok(address),
                Auth::CertAndPassword => {
                    // Each check costs an Argon2id run on the event loop: a holder of a valid
                    // certificate gets one guess per PASSWORD_RETRY, not as many as it sends.
                    if password_failures
                        .get(&name)
                        .is_some_and(|at| now.saturating_duration_since(*at) < PASSWORD_RETRY)
                    {
                        return Err((
                            Refusal::WrongPassword,
                            format!(
                                "a wrong password less than {} s ago: try again later",
                                PASSWORD_RETRY.as_secs()
                            ),
                        ));
                    }
                    let checked = check_password(&self.clients, &name, client);
                    match &checked {
                        Ok(()) => password_failures.remove(&name),
                        Err(_) => password_failures.insert(name.clone(), now),
                    };
                    checked.map(|()| address)
                }
            });
        let address = match identified {
            Ok(address) => address,
            Err((refusal, reason)) => {
                session.refusal = Some(refusal);
                session.send_text(&format!("AUTH_FAILED,{reason}"));
                session.close(format!("refused {name}: {reason}"));
                return;
            }
        };
        let admission = match admit(address, &self.config, &name, client) {
            Ok(admitted) => admitted,
            Err(reason) => {
                session.send_text(&format!("AUTH_FAILED,{reason}"));
                session.close(format!("refused {name}: {reason}"));
                return;
            }
        };
        let first_warning = !self.warned_compression.contains(&name);
        if let (Some((_, option)), true) = (admission.compression, first_warning) {
            self.warned_compression.insert(name.clone());
            tracing::warn!(
                client = %name,
                pushed = option,
                "the client's profile configures compression (comp-lzo or compress); Dockvpn never compresses: remove the option from the profile"
            );
        }
        let (address, cipher) = (admission.address, admission.keys.cipher);
        if let Err(reason) = session.start_data_channel(admission.keys, now) {
            return session.close(reason);
        }
        session.address = Some(address);
        session.framing = admission
            .compression
            .map_or(Framing::None, |(framing, _)| framing);
        let peer_id = session.peer_id;
        let routes = client_networks(
            self.allowances.get(&name).map(Vec::as_slice),
            &self.routes,
            self.config.redirect_gateway,
        );
        let over_udp = !from.is_reliable();
        for message in push_messages(&self.config, &routes, peer_id, &admission, over_udp) {
            session.send_text(&message);
        }
        if let Some(previous) = self.by_address.insert(address, from) {
            if previous != from {
                if let Some(old) = self.sessions.get_mut(&previous) {
                    old.close(format!("{name} connected again from {from}"));
                }
            }
        }
        let reconnected = format!("{name} connected again from {from}");
        self.end_parked(|s| s.address == Some(address), &reconnected);
        self.handshakes += 1;
        self.outputs.push_back(Output::Event(Event::Connected {
            name,
            address,
            link: from,
            peer_id,
            cipher,
        }));
    }

    fn handle_data(&mut self, now: Instant, from: Link, peer_id: u32, key_id: u8, datagram: &[u8]) {
        let mut payload = self.buffers.take();
        if self.open_data(now, from, peer_id, key_id, datagram, &mut payload) {
            self.outputs.push_back(Output::Tun(payload));
        } else {
            self.buffers.recycle(payload);
        }
    }

    /// Opens a data packet into `payload` and acts on what it carries; true when that is an
    /// IP packet for tun, left in `payload`.
    fn open_data(
        &mut self,
        now: Instant,
        from: Link,
        peer_id: u32,
        key_id: u8,
        datagram: &[u8],
        payload: &mut Vec<u8>,
    ) -> bool {
        let peer = self.by_peer_id.get(&peer_id).copied();
        let session = match peer {
            Some(peer) => self.sessions.get_mut(&peer),
            None => self.parked.get_mut(&peer_id),
        };
        let Some(session) = session.filter(|s| s.is_active()) else {
            let why = format!("from {from}: data before the session is up");
            self.drop_input(|c| &mut c.unknown_session, why);
            return false;
        };
        let renegotiated = session.renegotiations;
        let opened = session.open(key_id, datagram, payload);
        self.handshakes += session.renegotiations - renegotiated;
        match opened {
            Ok(Unframed::Plain) => {}
            Ok(Unframed::Compressed(byte)) => {
                let why = format!("from {from}: compressed data (framing byte {byte:#04x}); the client must drop comp-lzo/compress from its profile");
                self.drop_input(|c| &mut c.compressed_data, why);
                return false;
            }
            Err(DataError::Replayed(id)) => {
                let why = format!("from {from}: replayed data packet id {id}");
                self.drop_input(|c| &mut c.replayed_data, why);
                return false;
            }
            Err(error) => {
                let why = format!("from {from}: data packet {error}");
                self.drop_input(|c| &mut c.unauthenticated_data, why);
                return false;
            }
        }
        session.last_received = now;
        session.bytes_in += datagram.len() as u64;
        // Authenticated traffic from a new address: the client moved (NAT rebinding), unless
        // another session holds that address; then it stays where it was. Only UDP floats:
        // a TCP session lives and dies with its connection.
        let at = match peer {
            Some(peer) if from != peer && self.float(peer, from) => from,
            Some(peer) => peer,
            None if self.unpark(peer_id, from) => from,
            None => {
                let why = format!("from {from}: a moved client's data from an address in use");
                self.drop_input(|c| &mut c.unknown_session, why);
                return false;
            }
        };
        let session = self
            .sessions
            .get_mut(&at)
            .expect("the session of this peer id");
        match classify(payload) {
            Payload::Ping => {}
            Payload::Occ(OCC_EXIT) => session.close("the client exited"),
            Payload::Occ(OCC_REQUEST) => {
                let reply = [
                    &OCC_MAGIC[..],
                    &[OCC_REPLY],
                    OPTIONS_STRING.as_bytes(),
                    &[0],
                ]
                .concat();
                self.send_data(now, at, &reply);
            }
            Payload::Occ(_) => {}
            Payload::Ip(packet) if packet.first().is_some_and(|b| b >> 4 == 6) => {
                // The client's tun solicits routers over IPv6 now and then: not an attack,
                // and the tunnel carries IPv4 only.
                self.counters.ipv6_from_client += 1;
            }
            Payload::Ip(packet) => {
                let source = ipv4_source(packet);
                if source.is_some() && source == session.address {
                    return true;
                }
                let source = source.map_or_else(
                    || "a packet that is not IPv4".to_owned(),
                    |source| format!("a packet with source {source}"),
                );
                let why = match session.address {
                    Some(address) => format!("from {from}: {source} from the client at {address}"),
                    None => format!("from {from}: {source} from a client without an address"),
                };
                self.drop_input(|c| &mut c.spoofed_source, why);
            }
        }
        false
    }

    /// Moves a UDP session to a new address; false when another session holds that address
    /// or either link is TCP.
    fn float(&mut self, old: Link, new: Link) -> bool {
        if old.is_reliable() || new.is_reliable() || self.sessions.contains_key(&new) {
            return false;
        }
        let Some(session) = self.take(old) else {
            return false;
        };
        self.place(session, new);
        true
    }

    /// Files `session` under `at`: its peer id and its address lead there.
    fn place(&mut self, mut session: Session, at: Link) {
        session.link = at;
        self.by_peer_id.insert(session.peer_id, at);
        if let Some(address) = session.address {
            self.by_address.insert(address, at);
        }
        self.sessions.insert(at, session);
    }

    /// Takes the session at `link` out of the tables.
    fn take(&mut self, link: Link) -> Option<Session> {
        let session = self.sessions.remove(&link)?;
        self.by_peer_id.remove(&session.peer_id);
        if let Some(address) = session.address {
            if self.by_address.get(&address) == Some(&link) {
                self.by_address.remove(&address);
            }
        }
        Some(session)
    }

    /// Sets aside the connected session at `link`, which another client now holds.
    fn park(&mut self, link: Link) {
        if let Some(session) = self.take(link) {
            self.parked.insert(session.peer_id, session);
        }
    }

    /// Puts a parked session back at the address its data now comes from; false when that
    /// address is taken (or is a TCP connection, where the session never lived).
    fn unpark(&mut self, peer_id: u32, at: Link) -> bool {
        if at.is_reliable() || self.sessions.contains_key(&at) {
            return false;
        }
        let Some(session) = self.parked.remove(&peer_id) else {
            return false;
        };
        self.place(session, at);
        true
    }

    /// Ends the parked sessions `which` picks.
    fn end_parked(&mut self, which: impl Fn(&Session) -> bool, reason: &str) {
        let ended: Vec<u32> = self
            .parked
            .iter()
            .filter(|(_, session)| which(session))
            .map(|(&peer_id, _)| peer_id)
            .collect();
        for peer_id in ended {
            let session = self.parked.remove(&peer_id).expect("listed");
            self.report_ended(session, reason.to_owned());
        }
    }

    /// A packet read from tun, for the client whose address is its destination (the
    /// driver's address book does this for both transports; the engine's tests use this).
    #[cfg(test)]
    pub fn handle_tun_packet(&mut self, now: Instant, packet: &[u8]) {
        let Some(destination) = crate::address_book::ipv4_destination(packet) else {
            return;
        };
        let Some(&peer) = self.by_address.get(&destination) else {
            let why = format!("no client has {destination}");
            return self.drop_input(|c| &mut c.no_client_for_destination, why);
        };
        self.send_data(now, peer, packet);
    }

    /// A packet from tun for the session with `peer_id` (the driver's address book chose it).
    pub fn send_to(&mut self, now: Instant, peer_id: u32, packet: &[u8]) {
        if let Some(&link) = self.by_peer_id.get(&peer_id) {
            self.send_data(now, link, packet);
        }
    }

    fn send_data(&mut self, now: Instant, peer: Link, payload: &[u8]) {
        let Some(session) = self.sessions.get_mut(&peer).filter(|s| s.is_active()) else {
            return;
        };
        let mut datagram = self.buffers.take();
        match session.seal(payload, &mut datagram) {
            Ok(()) => {
                session.last_sent = now;
                session.bytes_out += datagram.len() as u64;
                self.outputs
                    .push_back(Output::Transmit { to: peer, datagram });
            }
            Err(error) => {
                self.buffers.recycle(datagram);
                session.close(format!("data channel: {error}"));
            }
        }
    }

    /// Resends, keepalives, renegotiation, timeouts.
    pub fn handle_timeout(&mut self, now: Instant) {
        self.send_due_restarts(now);
        let mut pings = Vec::new();
        for session in self.sessions.values_mut() {
            let renegotiated = session.renegotiations;
            session.expire_lame_duck(now);
            self.handshakes += session.renegotiations - renegotiated;
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
        let ping_restart = self.config.ping_restart;
        self.end_parked(
            |s| now >= s.last_received + ping_restart,
            &format!(
                "another client took its address and it did not come back within {} s (ping-restart)",
                ping_restart.as_secs()
            ),
        );
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
            .chain(
                self.parked
                    .values()
                    .map(|s| s.last_received + self.config.ping_restart),
            )
            .chain(self.restarts.front().map(|&(at, ..)| at))
            .min()
    }

    /// Tells every connected client to reconnect, so it pulls the routes pushed now: one
    /// after another over `spread`, in peer-id order, so a thousand clients do not come back
    /// in the same second. A later call reschedules whoever has not been told yet.
    pub fn restart_connected(&mut self, now: Instant, spread: Duration) {
        let mut connected: Vec<(u32, Link)> = self
            .sessions
            .values()
            .filter(|s| s.is_active())
            .map(|s| (s.peer_id, s.link))
            .collect();
        connected.sort_by_key(|&(peer_id, _)| peer_id);
        let count = u32::try_from(connected.len()).unwrap_or(u32::MAX).max(1);
        self.restarts = (0u32..)
            .zip(connected)
            .map(|(index, (peer_id, link))| (now + spread * index / count, link, peer_id))
            .collect();
    }

    fn send_due_restarts(&mut self, now: Instant) {
        while let Some(&(at, link, peer_id)) = self.restarts.front() {
            if at > now {
                break;
            }
            self.restarts.pop_front();
            let session = self.sessions.get_mut(&link);
            if let Some(session) = session.filter(|s| s.peer_id == peer_id && s.is_active()) {
                session.send_text("RESTART,the networks behind the VPN changed");
                tracing::info!(
                    client = session.name.as_deref().unwrap_or_default(),
                    %link,
                    "told to reconnect for the new routes"
                );
            }
        }
    }

    /// Tells every connected client to reconnect later (the server is going away).
    pub fn shutdown(&mut self, now: Instant) {
        self.end_parked(|_| true, "the server is shutting down");
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
        let mut queue = |session: &mut Session| {
            for datagram in session.control_datagrams(now) {
                let datagram = session.wrap.seal(datagram, wall_clock);
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
        for link in closed {
            let mut session = self.take(link).expect("listed");
            let reason = session.closing.take().unwrap_or_default();
            self.report_ended(session, reason);
        }
    }

    fn report_ended(&mut self, session: Session, reason: String) {
        if let Some(refusal) = session.refusal {
            self.refusals.count(refusal);
        }
        self.outputs.push_back(Output::Event(Event::Disconnected {
            name: session.name,
            address: session.address,
            link: session.link,
            peer_id: session.peer_id,
            reason,
        }));
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

/// What a client gets when it may connect.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Admission {
    pub address: Ipv4Addr,
    pub keys: DataKeys,
    /// The client announced explicit-exit over the control channel.
    pub cc_exit: bool,
    /// The framing its compression option makes it use and the stub pushed to keep it so.
    pub compression: Option<(Framing, &'static str)>,
}

/// `--auth cert+password`: the username must be the client's name and the password its own.
/// One Argon2id check runs whatever is wrong, so the time taken tells nothing.
fn check_password(
    clients: &ClientRegistry,
    name: &str,
    client: &ClientKeyMessage,
) -> Result<(), (Refusal, String)> {
    let (username, given) = client
        .credentials
        .as_ref()
        .map_or(("", ""), |c| (c.username.as_str(), c.password.0.as_str()));
    let matches = password::verify(clients.passwords.get(name).map(String::as_str), given);
    if matches && username == name {
        Ok(())
    } else {
        Err((
            Refusal::WrongPassword,
            "wrong or missing username or password (the username is the client's name)".into(),
        ))
    }
}

/// What the client gets, or why it may not connect.
fn admit(
    address: Ipv4Addr,
    config: &EngineConfig,
    name: &str,
    client: &ClientKeyMessage,
) -> Result<Admission, String> {
    if !config.pool.contains(&address) || address == config.server_address() {
        return Err(format!(
            "the address {address} of {name} is outside the pool {}",
            config.pool
        ));
    }
    let peer_info = &client.peer_info;
    let proto = peer_info.proto();
    if proto & IV_PROTO_DATA_V2 == 0 {
        let version = peer_info.get("IV_VER").unwrap_or("unknown");
        return Err(format!(
            "the client (IV_VER {version}) does not support DATA_V2 packets: use OpenVPN 2.4 or later"
        ));
    }
    let offers_tls_ekm = proto & IV_PROTO_TLS_KEY_EXPORT != 0;
    let derivation = match config.key_derivation {
        Some(KeyDerivation::TlsEkm) if !offers_tls_ekm => {
            return Err("the server requires tls-ekm key derivation (--key-derivation tls-ekm): use OpenVPN 2.6 or later, or run the server with --key-derivation auto".into())
        }
        Some(derivation) => derivation,
        None if offers_tls_ekm => KeyDerivation::TlsEkm,
        None => KeyDerivation::Prf,
    };
    let mut offered = peer_info.ciphers();
    if offered.is_empty() && peer_info.get("IV_NCP") == Some("2") {
        // OpenVPN 2.4 announces cipher negotiation without a list: it takes either AES-GCM.
        offered = vec![Cipher::Aes256Gcm.name(), Cipher::Aes128Gcm.name()];
    }
    let cipher = config
        .ciphers
        .iter()
        .copied()
        .find(|c| offered.iter().any(|o| o.eq_ignore_ascii_case(c.name())))
        .ok_or_else(|| {
            let ours: Vec<&str> = config.ciphers.iter().map(|c| c.name()).collect();
            let offered = if offered.is_empty() {
                "none (no IV_CIPHERS, no IV_NCP=2)".to_owned()
            } else {
                offered.join(":")
            };
            format!(
                "no common data cipher (client offers {offered}, server allows {}): add one of the server's to the client's data-ciphers, or to the server's --data-ciphers",
                ours.join(":")
            )
        })?;
    Ok(Admission {
        address,
        keys: DataKeys { cipher, derivation },
        cc_exit: proto & IV_PROTO_CC_EXIT_NOTIFY != 0,
        compression: Framing::for_client(&client.options, peer_info),
    })
}

/// The PUSH_REPLY message(s): one unless the options exceed the bundle size, then several
/// with `push-continuation 2` on all but the last (`push-continuation 1`).
/// The socket buffer size pushed to clients (the kernel caps it at `net.core.rmem_max` /
/// `wmem_max` for a client without CAP_NET_ADMIN, which still doubles the default).
const CLIENT_SOCKET_BUFFER: u32 = 4 * 1024 * 1024;

pub fn push_messages(
    config: &EngineConfig,
    routes: &BTreeSet<Ipv4Net>,
    peer_id: u32,
    admission: &Admission,
    over_udp: bool,
) -> Vec<String> {
    let address = admission.address;
    let tls_ekm = admission.keys.derivation == KeyDerivation::TlsEkm;
    let mut options = vec![
        format!("route-gateway {}", config.server_address()),
        "topology subnet".to_owned(),
        format!("ping {}", config.ping.as_secs()),
        format!("ping-restart {}", config.ping_restart.as_secs()),
        format!("ifconfig {address} {}", config.pool.netmask()),
        format!("peer-id {peer_id}"),
        format!("cipher {}", admission.keys.cipher.name()),
    ];
    // The server sends a UDP client's packets in bursts (GSO): at the kernel's default socket
    // buffers (208 KiB) a stock client drops part of each one. Not over TCP, where a set
    // buffer would turn off the kernel's own sizing.
    if over_udp {
        options.push(format!("rcvbuf {CLIENT_SOCKET_BUFFER}"));
        options.push(format!("sndbuf {CLIENT_SOCKET_BUFFER}"));
    }
    // Without tls-ekm pushed, the client derives its keys with the PRF.
    match (admission.cc_exit, tls_ekm) {
        (true, true) => options.push("protocol-flags cc-exit tls-ekm".to_owned()),
        (true, false) => options.push("protocol-flags cc-exit".to_owned()),
        (false, true) => options.push("key-derivation tls-ekm".to_owned()),
        (false, false) => {}
    }
    if let Some((_, stub)) = admission.compression {
        options.push(stub.to_owned());
    }
    // The client's networks hold the default route when the server redirects the gateway and
    // no allow list narrows it: a client limited to some networks keeps its own internet.
    if routes.contains(&Ipv4Net::default()) {
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

fn ipv4_source(packet: &[u8]) -> Option<Ipv4Addr> {
    (packet.len() >= 20 && packet[0] >> 4 == 4)
        .then(|| Ipv4Addr::new(packet[12], packet[13], packet[14], packet[15]))
}

//! The WireGuard server engine: sans-IO, over boringtun's noise core. One `Tunn` per
//! registered client; the driver owns the socket and the tun, hands datagrams and tun packets
//! in, and sends what `poll_output` gives back.
//!
//! boringtun's `Tunn` is a point-to-point tunnel, so the server part is ours: a handshake
//! initiation is checked against the shared rate limiter (mac1, then a cookie reply when
//! under load) before its static key is decrypted to find the client; later packets find it
//! by the receiver index the server gave out. Timers are boringtun's, run by `handle_timeout`.

use std::collections::{HashMap, VecDeque};
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use boringtun::noise::errors::WireGuardError;
use boringtun::noise::handshake::parse_handshake_anon;
use boringtun::noise::rate_limiter::RateLimiter;
use boringtun::noise::{Packet, Tunn, TunnResult};
use boringtun::x25519::{PublicKey, StaticSecret};

use crate::dropped::Counters;
use crate::engine::BufferPool;

#[cfg(test)]
mod tests;

/// Handshake checks per second before cookies are asked for: each initiation is checked
/// twice (by the engine, then by its client's tunnel), so 100 initiations a second, the
/// figure boringtun's device uses.
const HANDSHAKES_PER_SECOND: u64 = 200;
/// How often the clients' timers run (boringtun's device ticks at this rate too).
pub const TICK: Duration = Duration::from_millis(250);
/// A session older than this cannot carry data (WireGuard's REJECT_AFTER_TIME): a client
/// without a newer handshake has left.
const SESSION_LIFETIME: Duration = Duration::from_secs(180);
/// WireGuard's message type of a cookie reply.
const COOKIE_REPLY: u8 = 3;
const IPV4_HEADER: usize = 20;
/// Room for any datagram or packet plus WireGuard's 32 bytes.
const BUFFER: usize = 65536 + 32;
/// What a data packet adds to the IP packet it carries: type, index, counter and tag.
const DATA_OVERHEAD: usize = 32;
/// boringtun panics when its output buffer is shorter than what it may write, and whatever
/// it is given it may answer with a handshake message: an initiation, the longest, is this.
const TUNN_OUTPUT_MIN: usize = 148;

/// A registered client, as the registry gives it.
#[derive(Clone, PartialEq, Eq)]
pub struct PeerConfig {
    pub name: String,
    pub address: Ipv4Addr,
    pub public_key: [u8; 32],
    pub preshared_key: [u8; 32],
}

/// Without the preshared key: a debug print must not leak it.
impl std::fmt::Debug for PeerConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PeerConfig")
            .field("name", &self.name)
            .field("address", &self.address)
            .field("public_key", &self.public_key)
            .finish_non_exhaustive()
    }
}

/// A client's handle in this engine: stable while it stays registered, however often it
/// handshakes or roams.
pub type PeerId = u32;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// A handshake completed (the first, or a rekey): the address is this client's.
    Connected {
        name: String,
        address: Ipv4Addr,
        peer: PeerId,
        endpoint: SocketAddr,
    },
    Disconnected {
        name: String,
        address: Ipv4Addr,
        peer: PeerId,
        reason: String,
    },
}

pub type Output = crate::engine::Output<SocketAddr, Event>;

#[derive(Debug, Clone)]
pub struct ClientStatus {
    pub name: String,
    pub address: Ipv4Addr,
    pub endpoint: SocketAddr,
    pub connected_at: Instant,
    pub latest_handshake: Instant,
    /// Handshakes since the client connected (WireGuard rekeys every two minutes of traffic).
    pub rekeys: u64,
    /// Tunnel payload bytes, as boringtun counts them.
    pub bytes_in: u64,
    pub bytes_out: u64,
}

struct Peer {
    config: PeerConfig,
    tunn: Tunn,
    /// Where its last authenticated packet came from: where replies go.
    endpoint: Option<SocketAddr>,
    /// When the server last answered an initiation the client has not confirmed yet.
    handshake_answered: Option<Instant>,
    /// Since the first confirmed handshake.
    connected_at: Option<Instant>,
    latest_handshake: Option<Instant>,
    rekeys: u64,
}

/// What a verified datagram is, for what its outcome means.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Initiation,
    Response,
    Cookie,
    Data,
}

impl Kind {
    fn of(packet: &Packet) -> Kind {
        match packet {
            Packet::HandshakeInit(_) => Kind::Initiation,
            Packet::HandshakeResponse(_) => Kind::Response,
            Packet::PacketCookieReply(_) => Kind::Cookie,
            Packet::PacketData(_) => Kind::Data,
        }
    }
}

pub struct WireguardServer {
    secret: StaticSecret,
    public: PublicKey,
    limiter: Arc<RateLimiter>,
    peers: HashMap<PeerId, Peer>,
    by_key: HashMap<[u8; 32], PeerId>,
    next_tick: Instant,
    outputs: VecDeque<Output>,
    /// What `Transmit` and `Tun` outputs are made in; the driver hands them back.
    buffers: BufferPool,
    /// boringtun writes here what is not sealed or opened in place in an output buffer
    /// (cookie replies, held packets, timer messages).
    scratch: Vec<u8>,
    pub counters: Counters,
    /// Handshakes completed since the server started: connects and rekeys.
    pub handshakes: u64,
    pub last_drop: Option<String>,
}

impl WireguardServer {
    pub fn new(secret: [u8; 32], now: Instant) -> WireguardServer {
        let secret = StaticSecret::from(secret);
        let public = PublicKey::from(&secret);
        WireguardServer {
            limiter: Arc::new(RateLimiter::new(&public, HANDSHAKES_PER_SECOND)),
            secret,
            public,
            peers: HashMap::new(),
            by_key: HashMap::new(),
            next_tick: now + TICK,
            outputs: VecDeque::new(),
            buffers: BufferPool::new(),
            scratch: vec![0; BUFFER],
            counters: Counters::default(),
            handshakes: 0,
            last_drop: None,
        }
    }

    pub fn public_key(&self) -> [u8; 32] {
        self.public.to_bytes()
    }

    /// The registered clients. A client that is gone, or whose key, preshared key or address
    /// changed, loses its sessions at once: its next packet gets no reply.
    pub fn set_peers(&mut self, peers: Vec<PeerConfig>) {
        let wanted: HashMap<[u8; 32], PeerConfig> =
            peers.into_iter().map(|p| (p.public_key, p)).collect();
        let stale: Vec<PeerId> = self
            .peers
            .iter()
            .filter(|(_, peer)| wanted.get(&peer.config.public_key) != Some(&peer.config))
            .map(|(&id, _)| id)
            .collect();
        for id in stale {
            let peer = self.peers.remove(&id).expect("listed");
            self.by_key.remove(&peer.config.public_key);
            self.report_gone(
                id,
                peer,
                "the client was removed or its keys or address changed",
            );
        }
        for (key, config) in wanted {
            if !self.by_key.contains_key(&key) {
                let id = self.free_id();
                let peer = self.peer(config, id);
                self.by_key.insert(key, id);
                self.peers.insert(id, peer);
            }
        }
    }

    /// A random unused 24-bit index (boringtun keeps the low 8 bits of its session indices
    /// for itself): nothing about a client's index tells how many there are.
    fn free_id(&self) -> PeerId {
        loop {
            let id = rand::random::<u32>() >> 8;
            if !self.peers.contains_key(&id) {
                return id;
            }
        }
    }

    /// A client that has not handshaken yet.
    fn peer(&self, config: PeerConfig, id: PeerId) -> Peer {
        Peer {
            tunn: self.tunnel(&config, id),
            config,
            endpoint: None,
            handshake_answered: None,
            connected_at: None,
            latest_handshake: None,
            rekeys: 0,
        }
    }

    fn tunnel(&self, config: &PeerConfig, id: PeerId) -> Tunn {
        // The shared limiter: one cookie secret for the server, which a client proves once
        // for both checks of its initiation (the engine's, then the tunnel's).
        Tunn::new(
            self.secret.clone(),
            PublicKey::from(config.public_key),
            Some(config.preshared_key),
            None,
            id,
            Some(self.limiter.clone()),
        )
    }

    pub fn poll_output(&mut self) -> Option<Output> {
        self.outputs.pop_front()
    }

    /// Hands back the buffer of a `Transmit` or `Tun` output once it is sent or written:
    /// the engine seals and opens the next packets in it instead of a new allocation.
    pub fn recycle(&mut self, buffer: Vec<u8>) {
        self.buffers.recycle(buffer);
    }

    fn drop_input(&mut self, counter: fn(&mut Counters) -> &mut u64, why: String) {
        *counter(&mut self.counters) += 1;
        self.last_drop = Some(why);
    }

    fn drop_error(&mut self, from: SocketAddr, error: WireGuardError) {
        use WireGuardError as E;
        let counter: fn(&mut Counters) -> &mut u64 = match error {
            E::InvalidMac | E::WrongKey => |c| &mut c.unauthenticated_control,
            E::InvalidAeadTag => |c| &mut c.unauthenticated_data,
            E::DuplicateCounter | E::InvalidCounter => |c| &mut c.replayed_data,
            E::WrongTai64nTimestamp | E::InvalidTai64nTimestamp => |c| &mut c.replayed_control,
            E::NoCurrentSession | E::WrongIndex | E::UnexpectedPacket | E::ConnectionExpired => {
                |c| &mut c.unknown_session
            }
            E::UnderLoad => |c| &mut c.handshakes_under_load,
            _ => |c| &mut c.malformed,
        };
        self.drop_input(counter, format!("WireGuard from {from}: {error:?}"));
    }

    pub fn handle_datagram(&mut self, now: Instant, from: SocketAddr, datagram: &[u8]) {
        let mut scratch = std::mem::take(&mut self.scratch);
        self.receive(now, from, datagram, &mut scratch);
        self.scratch = scratch;
    }

    fn receive(&mut self, now: Instant, from: SocketAddr, datagram: &[u8], scratch: &mut [u8]) {
        // mac1 for every handshake, and under load a cookie instead of the costly part.
        let packet = match self
            .limiter
            .verify_packet(Some(from.ip()), datagram, scratch)
        {
            Ok(packet) => packet,
            Err(TunnResult::WriteToNetwork(cookie_reply)) => {
                let reply = self.buffers.copy_of(cookie_reply);
                self.outputs.push_back(Output::Transmit {
                    to: from,
                    datagram: reply,
                });
                let why = format!("WireGuard handshake from {from} under load: cookie sent");
                return self.drop_input(|c| &mut c.handshakes_under_load, why);
            }
            Err(TunnResult::Err(error)) => return self.drop_error(from, error),
            Err(_) => return self.drop_error(from, WireGuardError::InvalidPacket),
        };
        let id = match &packet {
            Packet::HandshakeInit(initiation) => {
                let Ok(half) = parse_handshake_anon(&self.secret, &self.public, initiation) else {
                    let why = format!("WireGuard handshake from {from} not sealed to this server");
                    return self.drop_input(|c| &mut c.unauthenticated_control, why);
                };
                match self.by_key.get(&half.peer_static_public) {
                    Some(&id) => id,
                    None => {
                        let why = format!("WireGuard handshake from {from}: unknown client key");
                        return self.drop_input(|c| &mut c.refused_handshakes, why);
                    }
                }
            }
            Packet::HandshakeResponse(response) => response.receiver_idx >> 8,
            Packet::PacketCookieReply(reply) => reply.receiver_idx >> 8,
            Packet::PacketData(data) => data.receiver_idx >> 8,
        };
        let kind = Kind::of(&packet);
        let Some(peer) = self.peers.get_mut(&id) else {
            let why = format!("WireGuard packet from {from} for no session");
            return self.drop_input(|c| &mut c.unknown_session, why);
        };
        // Opened (or answered) in place in the buffer the output goes out in; checked again
        // inside, against the same limiter (so with the same cookie secret).
        let mut output = self.buffers.take_len(datagram.len().max(TUNN_OUTPUT_MIN));
        let start = output.as_ptr();
        match peer
            .tunn
            .decapsulate(Some(from.ip()), datagram, &mut output)
        {
            TunnResult::WriteToNetwork(reply) => {
                let reply_type = reply.first().copied();
                let range = written(reply, start);
                keep_written(&mut output, range);
                self.outputs.push_back(Output::Transmit {
                    to: from,
                    datagram: output,
                });
                // A cookie reply means the limiter wants proof of address, not that the
                // handshake went through.
                if reply_type == Some(COOKIE_REPLY) {
                    return;
                }
                match kind {
                    // Answered, but anyone can replay an initiation: the client counts as
                    // connected, and is followed, once it confirms with its first data.
                    Kind::Initiation => peer.handshake_answered = Some(now),
                    // The server initiated and the client answered: that is the confirmation.
                    Kind::Response => {
                        peer.handshake_answered = Some(now);
                        self.confirmed(now, id, from, scratch);
                    }
                    Kind::Data | Kind::Cookie => {}
                }
            }
            TunnResult::WriteToTunnelV4(packet, source) => {
                // boringtun cuts the packet to its header's total length, which may claim
                // less than the header itself.
                if packet.len() < IPV4_HEADER {
                    self.buffers.recycle(output);
                    let why = format!(
                        "WireGuard client {}: a truncated IPv4 packet",
                        peer.config.name
                    );
                    return self.drop_input(|c| &mut c.malformed, why);
                }
                if source != peer.config.address {
                    self.buffers.recycle(output);
                    let why = format!(
                        "WireGuard client {} sent from {source}, not its address {}",
                        peer.config.name, peer.config.address
                    );
                    return self.drop_input(|c| &mut c.spoofed_source, why);
                }
                let range = written(packet, start);
                keep_written(&mut output, range);
                self.outputs.push_back(Output::Tun(output));
                self.confirmed(now, id, from, scratch);
            }
            TunnResult::WriteToTunnelV6(..) => {
                self.buffers.recycle(output);
                self.counters.ipv6_from_client += 1;
                self.confirmed(now, id, from, scratch);
            }
            // A keepalive that authenticated (or a cookie reply the tunnel took).
            TunnResult::Done => {
                self.buffers.recycle(output);
                if kind == Kind::Data {
                    self.confirmed(now, id, from, scratch);
                }
            }
            TunnResult::Err(error) => {
                self.buffers.recycle(output);
                self.drop_error(from, error);
            }
        }
    }

    /// An authenticated data packet (or the answer to the server's own initiation) from
    /// `from`: the client is there now (it may have roamed), a handshake it confirms
    /// counts, and packets held for it go out.
    fn confirmed(&mut self, now: Instant, id: PeerId, from: SocketAddr, scratch: &mut [u8]) {
        let peer = self.peers.get_mut(&id).expect("the caller found it");
        peer.endpoint = Some(from);
        if let Some(answered) = peer.handshake_answered.take() {
            peer.latest_handshake = Some(answered);
            self.handshakes += 1;
            if peer.connected_at.is_some() {
                peer.rekeys += 1;
            } else {
                peer.connected_at = Some(now);
                self.outputs.push_back(Output::Event(Event::Connected {
                    name: peer.config.name.clone(),
                    address: peer.config.address,
                    peer: id,
                    endpoint: from,
                }));
            }
        }
        self.flush_queued(id, scratch);
    }

    /// Packets the tunnel held while it had no session go out once it has one.
    fn flush_queued(&mut self, id: PeerId, scratch: &mut [u8]) {
        let Some(peer) = self.peers.get_mut(&id) else {
            return;
        };
        let Some(endpoint) = peer.endpoint else {
            return;
        };
        while let TunnResult::WriteToNetwork(datagram) = peer.tunn.decapsulate(None, &[], scratch) {
            self.outputs.push_back(Output::Transmit {
                to: endpoint,
                datagram: self.buffers.copy_of(datagram),
            });
        }
    }

    /// A packet from tun for the client `id` (the driver's address book chose it).
    pub fn send_to(&mut self, id: PeerId, packet: &[u8]) {
        let Some((endpoint, peer)) = self.peers.get_mut(&id).and_then(|p| Some((p.endpoint?, p)))
        else {
            let why = format!("WireGuard client {id} is not connected");
            return self.drop_input(|c| &mut c.no_client_for_destination, why);
        };
        if packet.len() + DATA_OVERHEAD > BUFFER {
            return self.drop_input(|c| &mut c.malformed, "an oversized tun packet".to_owned());
        }
        // Sealed in place in the buffer the datagram goes out in.
        let room = (packet.len() + DATA_OVERHEAD).max(TUNN_OUTPUT_MIN);
        let mut datagram = self.buffers.take_len(room);
        let start = datagram.as_ptr();
        match peer.tunn.encapsulate(packet, &mut datagram) {
            TunnResult::WriteToNetwork(sealed) => {
                let range = written(sealed, start);
                keep_written(&mut datagram, range);
                self.outputs.push_back(Output::Transmit {
                    to: endpoint,
                    datagram,
                });
            }
            TunnResult::Err(error) => {
                self.buffers.recycle(datagram);
                let why = format!("WireGuard to {}: {error:?}", peer.config.name);
                self.drop_input(|c| &mut c.no_client_for_destination, why)
            }
            // Held until a handshake gives the tunnel a session.
            _ => self.buffers.recycle(datagram),
        }
    }

    /// The connected client with this VPN address, if any (the driver's fallback when the
    /// same client's other connection leaves).
    pub fn peer_for_address(&self, address: Ipv4Addr) -> Option<PeerId> {
        self.peers
            .iter()
            .find(|(_, p)| p.config.address == address && p.connected_at.is_some())
            .map(|(&id, _)| id)
    }

    /// Whether a client's packets come from `endpoint` (the socket keeps per-sender state
    /// only for those once it remembers many).
    pub fn is_endpoint(&self, endpoint: &SocketAddr) -> bool {
        self.peers
            .values()
            .any(|p| p.endpoint.as_ref() == Some(endpoint))
    }

    pub fn next_timeout(&self) -> Option<Instant> {
        (!self.peers.is_empty()).then_some(self.next_tick)
    }

    /// Runs every client's timers (keepalives, handshake retries, session expiry) and notices
    /// clients whose last session has expired.
    pub fn handle_timeout(&mut self, now: Instant) {
        if now < self.next_tick {
            return;
        }
        self.next_tick = now + TICK;
        self.limiter.reset_count();
        let mut scratch = std::mem::take(&mut self.scratch);
        let mut expired: Vec<(PeerId, &str)> = Vec::new();
        for (&id, peer) in &mut self.peers {
            match peer.tunn.update_timers(&mut scratch) {
                TunnResult::WriteToNetwork(datagram) => {
                    if let Some(endpoint) = peer.endpoint {
                        self.outputs.push_back(Output::Transmit {
                            to: endpoint,
                            datagram: self.buffers.copy_of(datagram),
                        });
                    }
                }
                TunnResult::Err(WireGuardError::ConnectionExpired) => {
                    expired.push((id, "its session expired (no new handshake in time)"))
                }
                _ => {}
            }
            if peer.connected_at.is_some()
                && peer
                    .latest_handshake
                    .is_none_or(|at| now.saturating_duration_since(at) >= SESSION_LIFETIME)
            {
                expired.push((id, "no handshake for 180 s"));
            }
        }
        self.scratch = scratch;
        expired.dedup_by_key(|(id, _)| *id);
        for (id, reason) in expired {
            self.reset(id, reason);
        }
    }

    /// Starts the client over with a fresh tunnel (its old one expired for good).
    fn reset(&mut self, id: PeerId, reason: &str) {
        let Some(peer) = self.peers.remove(&id) else {
            return;
        };
        let fresh = self.peer(peer.config.clone(), id);
        self.peers.insert(id, fresh);
        self.report_gone(id, peer, reason);
    }

    fn report_gone(&mut self, id: PeerId, peer: Peer, reason: &str) {
        if peer.connected_at.is_some() {
            self.outputs.push_back(Output::Event(Event::Disconnected {
                name: peer.config.name,
                address: peer.config.address,
                peer: id,
                reason: reason.to_owned(),
            }));
        }
    }

    pub fn connected(&self) -> Vec<ClientStatus> {
        let mut clients: Vec<ClientStatus> = self
            .peers
            .values()
            .filter_map(|peer| {
                let (_, bytes_out, bytes_in, _, _) = peer.tunn.stats();
                Some(ClientStatus {
                    name: peer.config.name.clone(),
                    address: peer.config.address,
                    endpoint: peer.endpoint?,
                    connected_at: peer.connected_at?,
                    latest_handshake: peer.latest_handshake?,
                    rekeys: peer.rekeys,
                    bytes_in: bytes_in as u64,
                    bytes_out: bytes_out as u64,
                })
            })
            .collect();
        clients.sort_by_key(|c| c.address);
        clients
    }

    /// Clients with a confirmed handshake, for tests and the fuzzer.
    pub fn connected_count(&self) -> usize {
        self.peers
            .values()
            .filter(|p| p.connected_at.is_some())
            .count()
    }
}

/// Where in the buffer starting at `start` boringtun wrote `result` (a slice of it).
fn written(result: &[u8], start: *const u8) -> std::ops::Range<usize> {
    let offset = (result.as_ptr() as usize).saturating_sub(start as usize);
    offset..offset + result.len()
}

/// Cuts `buffer` to what boringtun wrote. Version 0.7 writes at the start, so this is a
/// truncation; a version that did not would still give the right bytes.
fn keep_written(buffer: &mut Vec<u8>, written: std::ops::Range<usize>) {
    if written.start > 0 {
        buffer.copy_within(written.clone(), 0);
    }
    buffer.truncate(written.len());
}

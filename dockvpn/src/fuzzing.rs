//! The entry points of the fuzz targets in `dockvpn/fuzz`: each target only calls its
//! function here, and an ordinary test (`tests/fuzz_corpus.rs`) replays every committed
//! corpus file through the same function, so a crash found once stays fixed in CI.

use std::collections::{HashMap, HashSet};
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use crate::openvpn::data::Cipher;
use crate::openvpn::keymethod::{parse_client_message, PeerInfo};
use crate::openvpn::link::Link;
use crate::openvpn::packet::{decode, Packet, SessionId};
use crate::openvpn::reliable::{Received, Reliable, RECEIVE_WINDOW};
use crate::openvpn::server::{ClientRegistry, EngineConfig, Output, RegisteredClient, Server};
use crate::openvpn::session::Session;
use crate::openvpn::tcp_framing::{frame, Deframer};
use crate::openvpn::tls_crypt::{ControlKey, StaticKey, TlsCrypt, WrapState};
use crate::openvpn::tls_crypt_v2::ServerKey;
use crate::openvpn::wrap::ControlWrap;
use crate::password::Auth;
use crate::pki::Pki;
use crate::wireguard::{Event, Output as WireguardOutput, PeerConfig, PeerId, WireguardServer};
use boringtun::noise::{Tunn, TunnResult};
use boringtun::x25519::{PublicKey, StaticSecret};

/// The server's session id in the reliability target; the fuzzer finds it in the seeds.
const LOCAL_SESSION: SessionId = [0x5e; 8];
/// The addresses datagrams come from in the engine target (one source selector each).
const PEERS: [&str; 3] = ["192.0.2.1:1194", "192.0.2.2:40000", "198.51.100.7:1194"];
/// The client the fuzzed server knows.
const CLIENT_NAME: &str = "fuzz-client";

/// Arbitrary bytes into the packet decoder; a control packet it decodes re-encodes to the
/// very same bytes, and a data packet keeps the whole datagram.
pub fn openvpn_packet_decode(data: &[u8]) {
    match decode(data) {
        Ok(Packet::Control(packet)) => {
            let encoded = packet.encode();
            assert_eq!(encoded, data, "re-encoding {packet:?}");
            assert_eq!(decode(&encoded), Ok(Packet::Control(packet)));
        }
        Ok(Packet::Data { datagram, .. }) => assert_eq!(datagram, data),
        Err(_) => {}
    }
}

/// A sequence of control packets (`records`) into a bare reliability layer and into a
/// session's receive path (reassembly, TLS, key-method 2). Time moves on by the record's tag.
/// The reliability layer never holds more undelivered messages than its receive window.
pub fn openvpn_reliable(data: &[u8]) {
    let mut now = Instant::now();
    let mut reliable = Reliable::default();
    // Something in flight, so that the ACKs in the input have something to acknowledge.
    reliable.send_tls(&[0x16; 3000]);
    let mut undelivered = 0usize;
    let peer = Link::Udp(socket_address(PEERS[0]));
    let Ok(mut session) = Session::new(
        server_tls(),
        peer,
        LOCAL_SESSION,
        [0; 8],
        0,
        WrapState::after_stateless_reset(),
        now,
    ) else {
        return;
    };
    for (tag, bytes) in records(data) {
        now += Duration::from_millis(u64::from(tag) * 64);
        let Ok(Packet::Control(packet)) = decode(bytes) else {
            continue;
        };
        for &id in &packet.acks {
            reliable.acknowledged(id);
        }
        if let Some(id) = packet.message_id {
            if reliable.receive(id, packet.opcode, packet.payload) == Received::Accepted {
                undelivered += 1;
            }
        }
        while reliable.deliver().is_some() {
            undelivered -= 1;
        }
        assert!(
            undelivered <= RECEIVE_WINDOW as usize,
            "{undelivered} messages buffered, window {RECEIVE_WINDOW}"
        );
        let _ = reliable.datagrams(now, packet.key_id, LOCAL_SESSION, packet.session_id);

        if session.knows_key(packet.key_id) {
            session.on_control(&packet, now);
        }
        let _ = session.control_datagrams(now);
    }
}

/// Arbitrary bytes into the key-method 2 parser and the peer-info reader.
pub fn openvpn_key_method(data: &[u8]) {
    if let Ok((message, used)) = parse_client_message(data) {
        assert!(used <= data.len(), "took {used} of {} bytes", data.len());
        let _ = message.peer_info.proto();
        let _ = message.peer_info.ciphers();
    }
    let peer_info = PeerInfo::parse(&String::from_utf8_lossy(data));
    let _ = peer_info.proto();
    let _ = peer_info.ciphers();
}

/// Arbitrary bytes into tls-crypt unwrap, then the same bytes wrapped validly as the client
/// would: they unwrap to themselves, and reach a tls-crypt server's control path.
pub fn openvpn_tls_crypt_unwrap(data: &[u8]) {
    let (server_keys, client_keys) = tls_crypt_pair();
    let _ = server_keys.unwrap(data);

    let mut state = WrapState::default();
    let wrapped = client_keys.wrap(data, &mut state, 0);
    match server_keys.unwrap(&wrapped) {
        Ok((packet, packet_id)) => {
            assert_eq!(packet, data, "a wrapped packet unwraps to itself");
            assert_eq!(packet_id, 1);
        }
        // Wrapping keeps at most the header of a packet shorter than its header.
        Err(error) => assert!(data.len() < 9, "{} bytes: {error}", data.len()),
    }

    let mut server = fuzz_server(ControlWrap::TlsCrypt(ControlKey::Crypt(
        server_keys.clone(),
    )));
    let now = Instant::now();
    server.handle_datagram(now, Link::Udp(socket_address(PEERS[0])), &wrapped);
    while server.poll_output().is_some() {}

    // tls-crypt-v2: the bytes as a client's first packet, alone and with a wrapped client
    // key the server key opens appended (the packet itself then meets the client's key).
    let (v2, wrapped_key) = tls_crypt_v2();
    let _ = v2.open(data, None);
    let _ = v2.open(&[data, wrapped_key].concat(), None);
}

/// A tls-crypt-v2 server wrap and one client key it issued, wrapped (WKc).
fn tls_crypt_v2() -> &'static (ControlWrap, Vec<u8>) {
    static V2: OnceLock<(ControlWrap, Vec<u8>)> = OnceLock::new();
    V2.get_or_init(|| {
        let server_key = ServerKey::generate();
        let wrapped = server_key.issue_client_key(0).wrapped().to_vec();
        let wrap = ControlWrap::TlsCryptV2 {
            server_key: Arc::new(server_key),
            shared: None,
        };
        (wrap, wrapped)
    })
}

/// The whole engine: `records` as datagrams from one of three addresses (the tag's low two
/// bits; 3 = no datagram, only a timeout), time moving on by the rest of the tag. A control
/// packet with ACKs gets the session id the server last sent to its address, as a client
/// echoes it: the fuzzer cannot guess the random id, and the server may wait for the echo.
pub fn openvpn_server_datagram(data: &[u8]) {
    let mut server = fuzz_server(ControlWrap::Plain);
    let mut server_sessions: HashMap<Link, SessionId> = HashMap::new();
    let mut now = Instant::now();
    for (tag, bytes) in records(data) {
        now += Duration::from_millis(u64::from(tag >> 2) * 500);
        match PEERS
            .get(usize::from(tag & 3))
            .map(|peer| Link::Udp(socket_address(peer)))
        {
            Some(peer) => {
                let mut datagram = bytes.to_vec();
                if let Some(session) = server_sessions.get(&peer) {
                    echo_session(&mut datagram, session);
                }
                server.handle_datagram(now, peer, &datagram);
            }
            None => server.handle_timeout(now),
        }
        while let Some(output) = server.poll_output() {
            if let Output::Transmit { to, datagram } = output {
                if let Ok(Packet::Control(packet)) = decode(&datagram) {
                    server_sessions.insert(to, packet.session_id);
                }
            }
        }
    }
    server.handle_timeout(now + Duration::from_secs(3600));
    while server.poll_output().is_some() {}
}

/// Writes `session` over the acknowledged session id of a control packet that carries ACKs.
fn echo_session(datagram: &mut [u8], session: &SessionId) {
    let start = match decode(datagram) {
        Ok(Packet::Control(packet)) if !packet.acks.is_empty() => 1 + 8 + 1 + 4 * packet.acks.len(),
        _ => return,
    };
    datagram[start..start + 8].copy_from_slice(session);
}

/// A TCP stream into the deframer, in pieces as long as the input's first byte says: each
/// packet it yields frames again to exactly the bytes it came from, in order.
pub fn openvpn_tcp_deframe(data: &[u8]) {
    let Some((&piece, stream)) = data.split_first() else {
        return;
    };
    let mut deframer = Deframer::default();
    let mut reframed = Vec::new();
    for chunk in stream.chunks(usize::from(piece).max(1)) {
        // An error closes the connection: nothing after it is read.
        let Ok(packets) = deframer.feed(chunk) else {
            break;
        };
        for packet in packets {
            reframed.extend(frame(&packet).expect("a deframed packet fits a frame"));
        }
    }
    assert!(
        stream.starts_with(&reframed),
        "the packets are the stream's own frames"
    );
}

/// The WireGuard server's static key and its two registered clients' (static key, preshared
/// key, address) in the WireGuard target; the seed corpus holds initiations made with them.
const WIREGUARD_SERVER_SECRET: [u8; 32] = [0x11; 32];
const WIREGUARD_CLIENTS: [([u8; 32], [u8; 32], Ipv4Addr); 2] = [
    ([0x21; 32], [0x31; 32], Ipv4Addr::new(10, 8, 0, 2)),
    ([0x22; 32], [0x32; 32], Ipv4Addr::new(10, 8, 0, 3)),
];
/// How often a flood record repeats its datagram: past the 100 handshakes a second after
/// which the server answers with cookies.
const WIREGUARD_FLOOD: usize = 128;
/// Datagrams exchanged between the server and the honest client per record, at most.
const WIREGUARD_EXCHANGES: usize = 32;

/// The whole WireGuard server engine with two registered clients: `records` as datagrams
/// from one of three addresses (the tag's low two bits; 3 = no datagram, only a timeout),
/// time moving on by `(tag >> 4)² × 100 ms`. Bits 2–3 of the tag say what the bytes are:
/// 0, a raw datagram; 1, an IP packet the first client (an honest boringtun `Tunn` in the
/// harness, answering everything the server sends) seals and sends, handshaking first when it
/// has no session; 2, a raw datagram sent `WIREGUARD_FLOOD` times (the cookie path);
/// 3, a packet from the tun the server seals for the first client (once it connected).
///
/// Beyond "no panic": only what the honest client sealed reaches the tun, from its own
/// address; the server sends only to addresses datagrams came from; the honest client opens
/// only what the server was given for it; an hour after the last packet no client holds a
/// session.
pub fn wireguard_datagram(data: &[u8]) {
    let mut now = Instant::now();
    let mut server = WireguardServer::new(WIREGUARD_SERVER_SECRET, now);
    let peers = wireguard_peers();
    server.set_peers(peers.clone());
    let (secret, preshared_key, _) = WIREGUARD_CLIENTS[0];
    let mut honest = Tunn::new(
        StaticSecret::from(secret),
        PublicKey::from(server.public_key()),
        Some(preshared_key),
        None,
        1,
        None,
    );
    let sources: Vec<SocketAddr> = PEERS.iter().map(|peer| socket_address(peer)).collect();
    let mut exchange = WireguardExchange {
        honest_id: None,
        sealed: Vec::new(),
        given: Vec::new(),
        buffer: vec![0; 65536 + 32],
        addresses: peers.iter().map(|peer| peer.address).collect(),
    };
    for (tag, bytes) in records(data) {
        now += Duration::from_millis(u64::from(tag >> 4).pow(2) * 100);
        let Some(&from) = sources.get(usize::from(tag & 3)) else {
            server.handle_timeout(now);
            exchange.settle(&mut server, &mut honest, &sources, now);
            continue;
        };
        match (tag >> 2) & 3 {
            0 => server.handle_datagram(now, from, bytes),
            1 => {
                exchange.sealed.push(bytes.to_vec());
                let mut out = vec![0; bytes.len() + 256];
                let datagram = match honest.encapsulate(bytes, &mut out) {
                    TunnResult::WriteToNetwork(datagram) => Some(datagram.to_vec()),
                    // The packet waits for a session; a handshake may be under way already.
                    _ => match honest.format_handshake_initiation(&mut out, true) {
                        TunnResult::WriteToNetwork(initiation) => Some(initiation.to_vec()),
                        _ => None,
                    },
                };
                if let Some(datagram) = datagram {
                    server.handle_datagram(now, from, &datagram);
                }
            }
            2 => {
                for _ in 0..WIREGUARD_FLOOD {
                    server.handle_datagram(now, from, bytes);
                }
            }
            _ => {
                if let Some(id) = exchange.honest_id {
                    exchange.given.push(bytes.to_vec());
                    server.send_to(id, bytes);
                }
            }
        }
        exchange.settle(&mut server, &mut honest, &sources, now);
    }
    now += Duration::from_secs(3600);
    server.handle_timeout(now);
    while server.poll_output().is_some() {}
    assert_eq!(
        server.connected_count(),
        0,
        "a client holds a session after an hour without a handshake"
    );
}

/// What the WireGuard target has seen of the server and its honest client.
struct WireguardExchange {
    /// The server's handle of the honest client, once it connected.
    honest_id: Option<PeerId>,
    /// IP packets the honest client sealed, and packets the server was given for it.
    sealed: Vec<Vec<u8>>,
    given: Vec<Vec<u8>>,
    buffer: Vec<u8>,
    /// The registered clients' addresses.
    addresses: HashSet<Ipv4Addr>,
}

impl WireguardExchange {
    /// Drains the server's outputs, checking each; what it sends goes to the honest client,
    /// whose answers go back from where the server sent to, for a bounded number of rounds.
    fn settle(
        &mut self,
        server: &mut WireguardServer,
        honest: &mut Tunn,
        sources: &[SocketAddr],
        now: Instant,
    ) {
        for _ in 0..WIREGUARD_EXCHANGES {
            let mut answers = Vec::new();
            while let Some(output) = server.poll_output() {
                match output {
                    WireguardOutput::Transmit { to, datagram } => {
                        assert!(sources.contains(&to), "the server sent to {to}");
                        answers.extend(self.honest_receives(honest, to, &datagram));
                    }
                    WireguardOutput::Tun(packet) => {
                        assert!(
                            self.sealed.iter().any(|sealed| sealed.starts_with(&packet)),
                            "{packet:?} reached the tun, and the honest client did not seal it"
                        );
                        assert_eq!(
                            packet.get(12..16),
                            Some(&WIREGUARD_CLIENTS[0].2.octets()[..]),
                            "a packet without the client's address as its source reached the tun"
                        );
                    }
                    WireguardOutput::Event(Event::Connected { address, peer, .. }) => {
                        assert!(self.addresses.contains(&address), "{address} connected");
                        if address == WIREGUARD_CLIENTS[0].2 {
                            self.honest_id = Some(peer);
                        }
                    }
                    WireguardOutput::Event(Event::Disconnected { .. }) => {}
                }
            }
            if answers.is_empty() {
                return;
            }
            for (from, datagram) in answers {
                server.handle_datagram(now, from, &datagram);
            }
        }
    }

    /// The honest client handles a datagram the server sent to `to`: what it sends back (from
    /// `to`), after checking any packet it opens was given to the server for it.
    fn honest_receives(
        &mut self,
        honest: &mut Tunn,
        to: SocketAddr,
        datagram: &[u8],
    ) -> Vec<(SocketAddr, Vec<u8>)> {
        let mut answers = Vec::new();
        let mut result = honest.decapsulate(Some(to.ip()), datagram, &mut self.buffer);
        loop {
            match result {
                TunnResult::WriteToNetwork(answer) => answers.push((to, answer.to_vec())),
                TunnResult::WriteToTunnelV4(packet, _) => assert!(
                    self.given.iter().any(|given| given.starts_with(packet)),
                    "the honest client opened {packet:?}, which the server was not given"
                ),
                _ => return answers,
            }
            // Packets it queued while handshaking follow.
            result = honest.decapsulate(None, &[], &mut self.buffer);
        }
    }
}

/// The WireGuard target's registered clients.
fn wireguard_peers() -> Vec<PeerConfig> {
    WIREGUARD_CLIENTS
        .iter()
        .enumerate()
        .map(|(k, &(secret, preshared_key, address))| PeerConfig {
            name: format!("fuzz-wireguard-{k}"),
            address,
            public_key: PublicKey::from(&StaticSecret::from(secret)).to_bytes(),
            preshared_key,
        })
        .collect()
}

/// Splits an input into records `[tag][length: u16 BE][bytes]` (the last one may be short):
/// one input is a sequence of packets, each with a byte that steers time and the source.
fn records(mut data: &[u8]) -> impl Iterator<Item = (u8, &[u8])> {
    std::iter::from_fn(move || {
        let (&tag, rest) = data.split_first()?;
        let (length, rest) = match rest {
            [high, low, rest @ ..] => (usize::from(u16::from_be_bytes([*high, *low])), rest),
            _ => (0, &[][..]),
        };
        let (record, tail) = rest.split_at(length.min(rest.len()));
        data = tail;
        Some((tag, record))
    })
}

fn socket_address(text: &str) -> SocketAddr {
    text.parse().expect("a constant socket address")
}

/// A server configured like `dockvpn run` (small limits) that knows one client.
fn fuzz_server(tls_crypt: ControlWrap) -> Server {
    let mut server = Server::new(EngineConfig {
        tls: server_tls(),
        pool: "10.8.0.0/24".parse().expect("a constant pool"),
        ciphers: Cipher::ALL.to_vec(),
        ping: Duration::from_secs(10),
        ping_restart: Duration::from_secs(60),
        handshake_window: Duration::from_secs(60),
        redirect_gateway: false,
        max_clients: 4,
        max_handshaking: 2,
        reneg_after: Some(Duration::from_secs(30)),
        transition_window: Duration::from_secs(60),
        tls_crypt,
        key_derivation: None,
        auth: Auth::Cert,
    });
    // Fuzz input never completes a handshake with a client certificate.
    server.set_clients(ClientRegistry {
        clients: HashMap::from([(
            CLIENT_NAME.to_owned(),
            RegisteredClient {
                address: Ipv4Addr::new(10, 8, 0, 2),
                certificate: [0; 32],
            },
        )]),
        revoked: Default::default(),
        passwords: HashMap::new(),
    });
    server
}

/// The server's TLS configuration from a PKI made once per process (in a temporary
/// directory, removed once read).
fn server_tls() -> Arc<rustls::ServerConfig> {
    static TLS: OnceLock<Arc<rustls::ServerConfig>> = OnceLock::new();
    TLS.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("dockvpn-fuzz-pki-{}", std::process::id()));
        let pki = Pki::new(&dir);
        pki.init(true).expect("create the fuzzing PKI");
        let tls = pki.server_tls_config().expect("load the fuzzing PKI");
        let _ = std::fs::remove_dir_all(&dir);
        tls
    })
    .clone()
}

/// The server's and the client's tls-crypt keys for one fixed static key: the client's are
/// the server's with the two directions swapped.
fn tls_crypt_pair() -> (Arc<TlsCrypt>, Arc<TlsCrypt>) {
    static PAIR: OnceLock<(Arc<TlsCrypt>, Arc<TlsCrypt>)> = OnceLock::new();
    PAIR.get_or_init(|| {
        let key: Vec<u8> = (0..=255u8).collect();
        let swapped = [&key[128..], &key[..128]].concat();
        let keys = |bytes: &[u8]| {
            let hex: String = bytes.iter().map(|byte| format!("{byte:02x}\n")).collect();
            let pem = format!(
                "-----BEGIN OpenVPN Static key V1-----\n{hex}-----END OpenVPN Static key V1-----\n"
            );
            Arc::new(TlsCrypt::server(
                &StaticKey::from_pem(&pem).expect("a constant static key"),
            ))
        };
        (keys(&key), keys(&swapped))
    })
    .clone()
}

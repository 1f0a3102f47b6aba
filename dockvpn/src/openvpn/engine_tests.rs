//! The whole engine without sockets: a minimal OpenVPN client (rustls + the same framing)
//! talks to `Server` over an in-memory wire that can lose, duplicate and reorder datagrams,
//! on a virtual clock.

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};

use super::data::{
    Cipher, DataChannel, KEY_MATERIAL_LEN, OCC_MAGIC, OCC_REPLY, OCC_REQUEST, PING_MAGIC,
};
use super::keymethod::{self, ClientKeySource};
use super::link::Link;
use super::packet::{decode, ControlPacket, Opcode, Packet, SessionId, MAX_CONTROL_PACKET};
use super::reliable::Reliable;
use super::server::{push_messages, Admission, EngineConfig, Event, Output, Server};
use super::session::{DataKeys, KeyDerivation, OPTIONS_STRING};
use super::tls_crypt::{ControlKey, StaticKey, TlsCrypt, WrapState};
use super::tls_crypt_v2::ServerKey;
use super::wrap::ControlWrap;

const HARD_RESET_CLIENT_V3: u8 = 10;
use crate::password::Auth;
use crate::pki::{Pki, SERVER_NAME};
use ipnet::Ipv4Net;

struct TestPki {
    dir: std::path::PathBuf,
    pki: Pki,
}

impl TestPki {
    fn new(tag: &str) -> TestPki {
        let dir = std::env::temp_dir().join(format!("dockvpn-engine-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let pki = Pki::new(&dir);
        pki.init(false).unwrap();
        TestPki { dir, pki }
    }

    /// Registers `name` in the pool and starts a server that knows it; the client's address.
    fn server_with_client(&self, name: &str) -> (Server, Ipv4Addr) {
        self.server_with_client_and_config(name, engine_config(&self.pki))
    }

    fn server_with_client_and_config(
        &self,
        name: &str,
        config: EngineConfig,
    ) -> (Server, Ipv4Addr) {
        let record = self
            .pki
            .add_client(name, "10.8.0.0/24".parse().unwrap(), None)
            .unwrap();
        let mut server = Server::new(config);
        server.set_clients(self.pki.openvpn_registry().unwrap());
        (server, record.address)
    }
}

impl Drop for TestPki {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn engine_config(pki: &Pki) -> EngineConfig {
    EngineConfig {
        tls: pki.server_tls_config().unwrap(),
        pool: "10.8.0.0/24".parse().unwrap(),
        ciphers: Cipher::ALL.to_vec(),
        ping: Duration::from_secs(10),
        ping_restart: Duration::from_secs(60),
        handshake_window: Duration::from_secs(300),
        redirect_gateway: false,
        max_clients: 16,
        max_handshaking: 4,
        reneg_after: None,
        transition_window: Duration::from_secs(60),
        tls_crypt: ControlWrap::Plain,
        key_derivation: None,
        auth: Auth::Cert,
    }
}

fn read(path: std::path::PathBuf) -> String {
    std::fs::read_to_string(path).unwrap()
}

/// Just enough of an OpenVPN 2.6 client, renegotiation included.
struct TestClient {
    session_id: SessionId,
    server_session: Option<SessionId>,
    tls_config: Arc<rustls::ClientConfig>,
    key_id: u8,
    reliable: Reliable,
    tls: rustls::ClientConnection,
    tls_started: bool,
    /// The server sent TLS on key 0: it has created the session.
    server_session_exists: bool,
    key_sent: bool,
    plaintext: Vec<u8>,
    push_reply: Option<String>,
    /// The pushed cipher and peer id, for the keys of later key ids.
    pushed: Option<(Cipher, u32)>,
    data: Option<DataChannel>,
    /// The key id `data` belongs to.
    data_key_id: Option<u8>,
    /// The key before the last renegotiation.
    previous_data: Option<DataChannel>,
    /// With tls-crypt: the client's keys and its wrap state.
    tls_crypt: Option<(TlsCrypt, WrapState)>,
    /// With tls-crypt-v2: its wrapped key (WKc), sent with the HARD_RESET (as V3).
    wrapped_key: Option<Vec<u8>>,
    /// Where the server sees its datagrams come from.
    peer: Link,
    /// tls-crypt packets dropped as replays (a stock client drops them too).
    replayed: u32,
    /// What the client says about itself in key-method 2.
    options: &'static str,
    peer_info: String,
    /// The server's key-method 2 randoms on the current key.
    server_random: Option<[u8; keymethod::SERVER_RANDOM_LEN]>,
    /// The push reply left out tls-ekm: keys come from the PRF.
    prf: bool,
    /// The server's TLS refused the handshake (the alert it sent).
    tls_error: Option<rustls::Error>,
    /// `auth-user-pass`: the username and password sent in key-method 2.
    credentials: Option<(&'static str, &'static str)>,
}

impl TestClient {
    fn new(pki: &Pki, name: &str, ciphers: &'static str) -> TestClient {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut roots = rustls::RootCertStore::empty();
        roots
            .add(CertificateDer::from_pem_slice(read(pki.path("ca.crt")).as_bytes()).unwrap())
            .unwrap();
        let cert =
            CertificateDer::from_pem_slice(read(pki.client_path(name, "crt")).as_bytes()).unwrap();
        let key =
            PrivateKeyDer::from_pem_slice(read(pki.client_path(name, "key")).as_bytes()).unwrap();
        let config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_client_auth_cert(vec![cert], key)
            .unwrap();
        let tls_config = Arc::new(config);
        let mut reliable = Reliable::default();
        reliable.send(Opcode::HardResetClientV2, Vec::new());
        TestClient {
            session_id: rand_id(),
            server_session: None,
            tls: new_tls(&tls_config),
            tls_config,
            key_id: 0,
            reliable,
            tls_started: false,
            server_session_exists: false,
            key_sent: false,
            plaintext: Vec::new(),
            push_reply: None,
            pushed: None,
            data: None,
            data_key_id: None,
            previous_data: None,
            tls_crypt: None,
            wrapped_key: None,
            peer: client_link(),
            replayed: 0,
            options: "V4,dev-type tun,tls-client",
            peer_info: format!("IV_VER=2.6.14\nIV_PROTO=142\nIV_CIPHERS={ciphers}\n"),
            server_random: None,
            prf: false,
            tls_error: None,
            credentials: None,
        }
    }

    /// A soft reset: the next key id, with a fresh reliability layer and TLS session.
    fn renegotiate(&mut self) {
        self.key_id = super::session::next_key_id(self.key_id);
        self.reliable = Reliable::default();
        self.reliable.send(Opcode::SoftResetV1, Vec::new());
        self.tls = new_tls(&self.tls_config);
        self.tls_started = false;
        self.key_sent = false;
        self.plaintext.clear();
        self.server_random = None;
    }

    fn datagrams(&mut self, now: Instant) -> Vec<Vec<u8>> {
        if self.key_id == 0 && self.tls_started && !self.server_session_exists {
            // As a stock 2.6 client does: repeat the ACK of the server's reset (message 0)
            // until the server answers on the session it creates when it sees one.
            self.reliable.receive(0, Opcode::HardResetServerV2, &[]);
        }
        let server = self.server_session.unwrap_or_default();
        let datagrams = self
            .reliable
            .datagrams(now, self.key_id, self.session_id, server);
        match self.tls_crypt.as_mut() {
            Some((tls_crypt, state)) => datagrams
                .into_iter()
                .map(|mut datagram| match &self.wrapped_key {
                    Some(wrapped_key) if datagram[0] >> 3 == Opcode::HardResetClientV2.wire() => {
                        datagram[0] = HARD_RESET_CLIENT_V3 << 3 | (datagram[0] & 7);
                        let mut v3 = tls_crypt.wrap(&datagram, state, 1_700_000_000);
                        v3.extend_from_slice(wrapped_key);
                        v3
                    }
                    _ => tls_crypt.wrap(&datagram, state, 1_700_000_000),
                })
                .collect(),
            None => datagrams,
        }
    }

    fn receive(&mut self, datagram: &[u8]) {
        let unwrapped;
        let datagram = match &mut self.tls_crypt {
            Some((tls_crypt, state)) if datagram[0] >> 3 != Opcode::DataV2.wire() => {
                let (packet, id) = tls_crypt.unwrap(datagram).unwrap();
                if state.received.check(id).is_err() {
                    self.replayed += 1;
                    return;
                }
                state.received.commit(id);
                unwrapped = packet;
                &unwrapped[..]
            }
            _ => datagram,
        };
        let Packet::Control(packet) = decode(datagram).unwrap() else {
            return;
        };
        self.server_session = Some(packet.session_id);
        if packet.key_id != self.key_id {
            let next = super::session::next_key_id(self.key_id);
            if packet.opcode != Opcode::SoftResetV1 || packet.key_id != next {
                return;
            }
            // The server starts a renegotiation.
            self.renegotiate();
        }
        self.reliable.on_packet(&packet, self.session_id);
        while let Some((opcode, payload)) = self.reliable.deliver() {
            match opcode {
                Opcode::HardResetServerV2 | Opcode::SoftResetV1 => self.tls_started = true,
                Opcode::ControlV1 => {
                    self.server_session_exists = true;
                    let mut slice = &payload[..];
                    while !slice.is_empty() {
                        self.tls.read_tls(&mut slice).unwrap();
                    }
                    if let Err(error) = self.tls.process_new_packets() {
                        self.tls_error = Some(error);
                        return;
                    }
                }
                other => panic!("unexpected {other:?}"),
            }
        }
        if self.tls_started && !self.tls.is_handshaking() && !self.key_sent {
            self.tls
                .writer()
                .write_all(&keymethod::client_message_with_credentials(
                    self.options,
                    self.credentials,
                    &self.peer_info,
                ))
                .unwrap();
            if self.key_id == 0 {
                self.tls.writer().write_all(b"PUSH_REQUEST\0").unwrap();
            }
            self.key_sent = true;
        }
        let mut chunk = [0u8; 4096];
        while let Ok(n) = self.tls.reader().read(&mut chunk) {
            if n == 0 {
                break;
            }
            self.plaintext.extend_from_slice(&chunk[..n]);
        }
        // The server's key-method 2 message: zero, key method, random1 and random2.
        let randoms = 5..5 + keymethod::SERVER_RANDOM_LEN;
        if self.server_random.is_none() && self.plaintext.len() >= randoms.end {
            self.server_random = Some(self.plaintext[randoms].try_into().unwrap());
        }
        if let (Some((cipher, peer_id)), true) = (self.pushed, self.key_id > 0) {
            // The server's key-method reply on a renegotiated key: derive its keys.
            if self.key_sent
                && self.server_random.is_some()
                && self.data_key_id != Some(self.key_id)
            {
                let data =
                    DataChannel::new(cipher, &self.key_material(), false, self.key_id, peer_id);
                self.previous_data = self.data.replace(data);
                self.data_key_id = Some(self.key_id);
                self.plaintext.clear();
            }
        } else if let Some(start) = find(&self.plaintext, b"PUSH_REPLY") {
            let end = start
                + self.plaintext[start..]
                    .iter()
                    .position(|&b| b == 0)
                    .unwrap();
            let reply = String::from_utf8(self.plaintext[start..end].to_vec()).unwrap();
            let option = |name: &str| {
                reply
                    .split(',')
                    .find_map(|o| o.strip_prefix(name))
                    .map(str::to_owned)
            };
            let cipher = Cipher::from_name(&option("cipher ").unwrap()).unwrap();
            let peer_id: u32 = option("peer-id ").unwrap().parse().unwrap();
            self.prf = !reply.contains("tls-ekm");
            self.data = Some(DataChannel::new(
                cipher,
                &self.key_material(),
                false,
                0,
                peer_id,
            ));
            self.pushed = Some((cipher, peer_id));
            self.data_key_id = Some(0);
            self.push_reply = Some(reply);
            self.plaintext.clear();
        }
        if self.tls.wants_write() {
            let mut ciphertext = Vec::new();
            while self.tls.wants_write() {
                self.tls.write_tls(&mut ciphertext).unwrap();
            }
            self.reliable.send_tls(&ciphertext);
        }
    }
}

impl TestClient {
    fn key_material(&self) -> [u8; KEY_MATERIAL_LEN] {
        if self.prf {
            // `keymethod::client_message` sends this key source.
            let source = ClientKeySource::from_bytes(&[7; keymethod::CLIENT_KEY_SOURCE_LEN]);
            let server_random = self.server_random.expect("the server's key-method message");
            let server_session = self.server_session.expect("the server's session id");
            return super::prf::key_material(
                &source,
                &server_random,
                self.session_id,
                server_session,
            );
        }
        let mut material = [0u8; KEY_MATERIAL_LEN];
        self.tls
            .export_keying_material(&mut material, super::data::EXPORTER_LABEL, None)
            .unwrap();
        material
    }
}

fn new_tls(config: &Arc<rustls::ClientConfig>) -> rustls::ClientConnection {
    rustls::ClientConnection::new(config.clone(), ServerName::try_from(SERVER_NAME).unwrap())
        .unwrap()
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

fn rand_id() -> SessionId {
    let mut id = [0u8; 8];
    rand::RngCore::fill_bytes(&mut rand::rng(), &mut id);
    id
}

/// How the wire treats one batch of datagrams.
type Wire = fn(usize, Vec<Vec<u8>>) -> Vec<Vec<u8>>;

fn perfect(_: usize, batch: Vec<Vec<u8>>) -> Vec<Vec<u8>> {
    batch
}

/// Drops every third datagram, duplicates every fourth, and delivers each batch reversed.
fn hostile(round: usize, batch: Vec<Vec<u8>>) -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    for (i, datagram) in batch.into_iter().enumerate() {
        let n = round * 7 + i;
        if n % 3 == 0 {
            continue;
        }
        if n % 4 == 0 {
            out.push(datagram.clone());
        }
        out.push(datagram);
    }
    out.reverse();
    out
}

const CLIENT_ADDRESS: &str = "192.0.2.10:40000";

fn client_link() -> Link {
    Link::Udp(CLIENT_ADDRESS.parse().unwrap())
}

/// Runs client and server until the client has its push reply; returns the virtual time taken.
fn connect(server: &mut Server, client: &mut TestClient, wire: Wire, start: Instant) -> Duration {
    run_until(server, client, wire, start, |client| client.data.is_some()) - start
}

/// Moves datagrams both ways over `wire`, a round every 250 virtual ms from `start`, until
/// `done` holds for the client; returns the virtual time then.
fn run_until(
    server: &mut Server,
    client: &mut TestClient,
    wire: Wire,
    start: Instant,
    done: impl Fn(&TestClient) -> bool,
) -> Instant {
    let peer = client.peer;
    let mut now = start;
    for round in 0..400 {
        for datagram in wire(round, client.datagrams(now)) {
            server.handle_datagram(now, peer, &datagram);
        }
        server.handle_timeout(now);
        let mut to_client = Vec::new();
        while let Some(output) = server.poll_output() {
            if let Output::Transmit { datagram, .. } = output {
                assert!(
                    datagram.len() <= MAX_CONTROL_PACKET,
                    "{} bytes",
                    datagram.len()
                );
                to_client.push(datagram);
            }
        }
        for datagram in wire(round + 1, to_client) {
            client.receive(&datagram);
        }
        if done(client) {
            return now;
        }
        now += Duration::from_millis(250);
    }
    panic!("not done after 100 virtual seconds");
}

fn ipv4_packet(source: Ipv4Addr, destination: Ipv4Addr) -> Vec<u8> {
    let mut packet = vec![0x45, 0, 0, 28, 0, 0, 0, 0, 64, 17, 0, 0];
    packet.extend_from_slice(&source.octets());
    packet.extend_from_slice(&destination.octets());
    packet.extend_from_slice(&[0; 8]);
    packet
}

#[test]
fn a_client_connects_and_exchanges_data_both_ways() {
    let test = TestPki::new("connect");
    let (mut server, address) = test.server_with_client("alice");
    server.set_routes(["192.168.10.0/24".parse().unwrap()].into());
    let mut client = TestClient::new(&test.pki, "alice", "AES-128-GCM:AES-256-GCM");
    let now = Instant::now();
    connect(&mut server, &mut client, perfect, now);

    let reply = client.push_reply.clone().unwrap();
    for option in [
        "topology subnet",
        "ifconfig 10.8.0.2 255.255.255.0",
        "route-gateway 10.8.0.1",
        "route 192.168.10.0 255.255.255.0",
        "cipher AES-256-GCM",
        "protocol-flags cc-exit tls-ekm",
        "peer-id 0",
        "rcvbuf 4194304",
        "sndbuf 4194304",
    ] {
        assert!(
            reply.split(',').any(|o| o == option),
            "{option} missing from {reply}"
        );
    }
    assert!(!reply.contains("redirect-gateway"));
    let connected = server.connected();
    assert_eq!(connected.len(), 1);
    assert_eq!(
        (connected[0].name.as_str(), connected[0].cipher),
        ("alice", Cipher::Aes256Gcm)
    );

    // Client → tun: keys derived on both sides from the TLS exporter agree.
    let peer = client_link();
    let left_host = Ipv4Addr::new(192, 168, 10, 2);
    let upstream = ipv4_packet(address, left_host);
    let sealed = client.data.as_mut().unwrap().seal(&upstream).unwrap();
    server.handle_datagram(now, peer, &sealed);
    let tun: Vec<Vec<u8>> = std::iter::from_fn(|| server.poll_output())
        .filter_map(|o| match o {
            Output::Tun(packet) => Some(packet),
            _ => None,
        })
        .collect();
    assert_eq!(tun, vec![upstream]);
    // The same datagram again is a replay: nothing more reaches tun.
    server.handle_datagram(now, peer, &sealed);
    assert!(!std::iter::from_fn(|| server.poll_output()).any(|o| matches!(o, Output::Tun(_))));
    assert_eq!(server.counters.replayed_data, 1);
    // A spoofed source address never reaches tun either.
    let spoofed = client
        .data
        .as_mut()
        .unwrap()
        .seal(&ipv4_packet(Ipv4Addr::new(10, 8, 0, 9), left_host))
        .unwrap();
    server.handle_datagram(now, peer, &spoofed);
    assert!(!std::iter::from_fn(|| server.poll_output()).any(|o| matches!(o, Output::Tun(_))));
    assert_eq!(server.counters.spoofed_source, 1);

    // Keepalives are consumed by the server, recognised as such (not dropped as a packet
    // with a bad source).
    let ping = client.data.as_mut().unwrap().seal(&PING_MAGIC).unwrap();
    server.handle_datagram(now, peer, &ping);
    assert!(!std::iter::from_fn(|| server.poll_output()).any(|o| matches!(o, Output::Tun(_))));
    assert_eq!(server.counters.total(), 2, "only the replay and the spoof");

    // tun → client.
    let downstream = ipv4_packet(left_host, address);
    server.handle_tun_packet(now, &downstream);
    let Some(Output::Transmit { to, datagram }) = server.poll_output() else {
        panic!("nothing sent to the client");
    };
    assert_eq!(to, peer);
    assert_eq!(
        client.data.as_mut().unwrap().open(&datagram).unwrap(),
        downstream
    );
}

#[test]
fn the_handshake_survives_loss_duplication_and_reordering() {
    let test = TestPki::new("lossy");
    let (mut server, _) = test.server_with_client("bob");
    let mut client = TestClient::new(&test.pki, "bob", "AES-128-GCM");
    let took = connect(&mut server, &mut client, hostile, Instant::now());
    assert!(client
        .push_reply
        .as_ref()
        .unwrap()
        .contains("cipher AES-128-GCM"));
    assert_eq!(server.connected().len(), 1);
    assert!(
        took >= Duration::from_secs(1),
        "loss must have cost resends: {took:?}"
    );
}

#[test]
fn an_unregistered_client_gets_auth_failed_and_no_data_channel() {
    let test = TestPki::new("unregistered");
    test.pki
        .add_client("carol", "10.8.0.0/24".parse().unwrap(), None)
        .unwrap();
    let mut server = Server::new(engine_config(&test.pki));
    let mut client = TestClient::new(&test.pki, "carol", "AES-256-GCM");
    let reason = refusal(&mut server, &mut client);
    assert!(reason.contains("no client named \"carol\""), "{reason}");
    assert_eq!(server.session_count(), 0);
}

fn reset_from(session_id: SessionId) -> Vec<u8> {
    ControlPacket {
        opcode: Opcode::HardResetClientV2,
        key_id: 0,
        session_id,
        acks: vec![],
        acked_session: None,
        message_id: Some(0),
        payload: &[],
    }
    .encode()
}

/// The client's ACK of the server's reset, echoing the server session id `echoed`.
fn echo_from(session_id: SessionId, echoed: SessionId) -> Vec<u8> {
    ControlPacket {
        opcode: Opcode::AckV1,
        key_id: 0,
        session_id,
        acks: vec![0],
        acked_session: Some(echoed),
        message_id: None,
        payload: &[],
    }
    .encode()
}

/// The datagrams the server sends now, emptying its queue.
fn transmitted(server: &mut Server) -> Vec<Vec<u8>> {
    std::iter::from_fn(|| server.poll_output())
        .filter_map(|o| match o {
            Output::Transmit { datagram, .. } => Some(datagram),
            _ => None,
        })
        .collect()
}

/// The server session id in the server's reset reply.
fn server_session_in(reply: &[u8]) -> SessionId {
    let Packet::Control(packet) = decode(reply).unwrap() else {
        panic!("not a control packet");
    };
    assert_eq!(packet.opcode, Opcode::HardResetServerV2);
    packet.session_id
}

#[test]
fn a_flood_of_hard_resets_is_answered_without_creating_any_state() {
    let test = TestPki::new("flood");
    let mut server = Server::new(engine_config(&test.pki));
    let now = Instant::now();
    for port in 0..1000u16 {
        let reset = reset_from([port as u8; 8]);
        let from = Link::Udp(SocketAddr::from(([192, 0, 2, 1], 1024 + port)));
        server.handle_datagram(now, from, &reset);
        let replies = transmitted(&mut server);
        assert_eq!(replies.len(), 1, "one reply, no resends");
        assert!(
            replies[0].len() <= reset.len() + 12,
            "a {}-byte reply to a {}-byte reset",
            replies[0].len(),
            reset.len()
        );
    }
    assert_eq!(server.session_count(), 0);
    assert_eq!(server.next_timeout(), None, "nothing to resend");
    assert_eq!(server.counters.total(), 0);
}

#[test]
fn only_clients_that_echo_their_server_session_id_get_sessions_up_to_the_handshake_limit() {
    let test = TestPki::new("echo");
    let mut server = Server::new(engine_config(&test.pki));
    let now = Instant::now();
    let from = |port: u16| Link::Udp(SocketAddr::from(([192, 0, 2, 1], port)));
    let client = [1; 8];
    server.handle_datagram(now, from(1000), &reset_from(client));
    let issued = server_session_in(&transmitted(&mut server)[0]);

    // A guessed id, or the right id from another address: nothing.
    server.handle_datagram(now, from(1000), &echo_from(client, [0; 8]));
    server.handle_datagram(now, from(1001), &echo_from(client, issued));
    assert_eq!(server.session_count(), 0);
    // The echo within the secret's lifetime creates the session.
    let later = now + super::cookie::SECRET_LIFETIME;
    server.handle_datagram(later, from(1000), &echo_from(client, issued));
    assert_eq!(server.handshaking(), 1);
    // An echo after the secret expired: nothing.
    let late_client = [2; 8];
    server.handle_datagram(later, from(1002), &reset_from(late_client));
    let issued = server_session_in(&transmitted(&mut server)[0]);
    let later = later + 2 * super::cookie::SECRET_LIFETIME;
    server.handle_datagram(later, from(1002), &echo_from(late_client, issued));
    assert_eq!(server.handshaking(), 1);
    assert_eq!(server.counters.unknown_session, 3);

    // Clients that do answer from their addresses are still held to the handshake limit.
    for port in 2000..2010u16 {
        let client = [port as u8; 8];
        server.handle_datagram(later, from(port), &reset_from(client));
        let issued = server_session_in(&transmitted(&mut server)[0]);
        server.handle_datagram(later, from(port), &echo_from(client, issued));
    }
    assert_eq!(server.handshaking(), 4);
    assert_eq!(server.counters.refused_handshakes, 7);
    // Half-open sessions expire with the handshake window, making room again.
    server.handle_timeout(later + Duration::from_secs(301));
    assert_eq!(server.session_count(), 0);
}

#[test]
fn a_forged_reset_and_client_hello_get_back_less_than_they_sent_and_no_tls_work() {
    let test = TestPki::new("reflection");
    let (mut server, _) = test.server_with_client("mallory");
    let mut forger = TestClient::new(&test.pki, "mallory", "AES-256-GCM");
    let victim = Link::Udp("198.51.100.7:1194".parse().unwrap());
    let now = Instant::now();
    let reset = forger.datagrams(now).remove(0);
    let mut client_hello = Vec::new();
    forger.tls.write_tls(&mut client_hello).unwrap();
    // The forger never sees the reply, so it can only guess the server's session id.
    let hello = |acks: Vec<u32>, acked_session| {
        ControlPacket {
            opcode: Opcode::ControlV1,
            key_id: 0,
            session_id: forger.session_id,
            acks,
            acked_session,
            message_id: Some(1),
            payload: &client_hello,
        }
        .encode()
    };
    let sent = [reset, hello(vec![], None), hello(vec![0], Some(rand_id()))];
    let mut bytes_back = 0;
    for round in 0..40 {
        let at = now + Duration::from_secs(round);
        for datagram in &sent {
            server.handle_datagram(at, victim, datagram);
        }
        server.handle_timeout(at);
        bytes_back += transmitted(&mut server).iter().map(Vec::len).sum::<usize>();
    }
    let bytes_sent = 40 * sent.iter().map(Vec::len).sum::<usize>();
    assert!(
        bytes_back <= bytes_sent / 10,
        "{bytes_back} bytes back for {bytes_sent} sent"
    );
    assert_eq!(server.session_count(), 0, "no TLS session, so no signature");
    assert_eq!(server.counters.unknown_session, 80);
}

/// A CONTROL_V1 on key 0 from `session` without ACKs.
fn control_message(session: SessionId, message_id: u32, payload: &[u8]) -> Vec<u8> {
    ControlPacket {
        opcode: Opcode::ControlV1,
        key_id: 0,
        session_id: session,
        acks: vec![],
        acked_session: None,
        message_id: Some(message_id),
        payload,
    }
    .encode()
}

/// A session in its handshake, created by a client at `from` that echoed its id; the ids.
fn half_open_session(server: &mut Server, from: Link, now: Instant) -> (SessionId, SessionId) {
    let client = rand_id();
    server.handle_datagram(now, from, &reset_from(client));
    let issued = server_session_in(&transmitted(server)[0]);
    server.handle_datagram(now, from, &echo_from(client, issued));
    assert_eq!(server.handshaking(), 1);
    (client, issued)
}

#[test]
fn a_half_open_session_holds_at_most_its_reassembly_budget() {
    let test = TestPki::new("reassembly");
    let mut server = Server::new(engine_config(&test.pki));
    let from = client_link();
    let now = Instant::now();
    let (client, _) = half_open_session(&mut server, from, now);
    let chunk = vec![0x16u8; 4000];
    // Message 1 never comes: 2 to 5 wait for it within the budget, 6 to 12 are dropped.
    for id in 2..=12 {
        server.handle_datagram(now, from, &control_message(client, id, &chunk));
    }
    let budget = super::reliable::REORDER_BUDGET / chunk.len();
    assert_eq!(budget, 4);
    assert_eq!(server.counters.reassembly_over_budget, 11 - budget as u64);
    assert_eq!(server.handshaking(), 1, "the session stays");
}

#[test]
fn a_tls_handshake_larger_than_the_bound_ends_the_half_open_session() {
    let test = TestPki::new("handshake-input");
    let mut server = Server::new(engine_config(&test.pki));
    let from = client_link();
    let now = Instant::now();
    let (client, _) = half_open_session(&mut server, from, now);
    let oversized = vec![0x16u8; super::session::MAX_HANDSHAKE_INPUT + 1];
    server.handle_datagram(now, from, &control_message(client, 1, &oversized));
    let reasons: Vec<String> = std::iter::from_fn(|| server.poll_output())
        .filter_map(|o| match o {
            Output::Event(Event::Disconnected { reason, .. }) => Some(reason),
            _ => None,
        })
        .collect();
    assert_eq!(
        reasons,
        [format!(
            "the client's TLS handshake exceeds {} bytes",
            super::session::MAX_HANDSHAKE_INPUT
        )]
    );
    assert_eq!(server.session_count(), 0);
}

#[test]
fn random_and_mutated_datagrams_never_panic_and_never_reach_tun() {
    let test = TestPki::new("fuzz");
    let (mut server, address) = test.server_with_client("dave");
    let mut client = TestClient::new(&test.pki, "dave", "AES-256-GCM");
    let now = Instant::now();
    connect(&mut server, &mut client, perfect, now);
    let genuine = client
        .data
        .as_mut()
        .unwrap()
        .seal(&ipv4_packet(address, Ipv4Addr::new(192, 168, 10, 2)))
        .unwrap();
    let peer = client_link();
    let mut seed = 0x2545_f491_u64;
    let mut next = move || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    for i in 0..20_000 {
        let datagram: Vec<u8> = if i % 2 == 0 {
            let len = (next() % 200) as usize;
            (0..len).map(|_| next() as u8).collect()
        } else {
            let mut mutated = genuine.clone();
            let at = (next() as usize) % mutated.len();
            mutated[at] ^= (next() as u8) | 1;
            mutated.truncate(mutated.len() - (next() as usize % 4));
            mutated
        };
        let from = if i % 3 == 0 {
            peer
        } else {
            Link::Udp(SocketAddr::from(([192, 0, 2, 99], 5000 + (i % 7) as u16)))
        };
        server.handle_datagram(now, from, &datagram);
        while let Some(output) = server.poll_output() {
            assert!(
                !matches!(output, Output::Tun(_)),
                "datagram {i} reached tun"
            );
        }
    }
    assert!(server.counters.total() > 0);
    assert_eq!(
        server.connected().len(),
        1,
        "the genuine client is still connected"
    );
}

#[test]
fn keepalives_go_out_and_a_silent_client_is_reaped_after_ping_restart() {
    let test = TestPki::new("reap");
    let (mut server, _) = test.server_with_client("erin");
    let mut client = TestClient::new(&test.pki, "erin", "AES-256-GCM");
    let start = Instant::now();
    let connected_at = start + connect(&mut server, &mut client, perfect, start);
    // The client's last ACKs, so nothing is left to resend.
    let peer = client_link();
    for datagram in client.datagrams(connected_at) {
        server.handle_datagram(connected_at, peer, &datagram);
    }
    while server.poll_output().is_some() {}
    assert_eq!(
        server.next_timeout(),
        Some(connected_at + Duration::from_secs(10))
    );
    server.handle_timeout(connected_at + Duration::from_secs(10));
    let Some(Output::Transmit { datagram, .. }) = server.poll_output() else {
        panic!("no keepalive");
    };
    assert_eq!(
        client.data.as_mut().unwrap().open(&datagram).unwrap(),
        PING_MAGIC
    );
    server.handle_timeout(connected_at + Duration::from_secs(61));
    let reason = std::iter::from_fn(|| server.poll_output()).find_map(|o| match o {
        Output::Event(Event::Disconnected { reason, .. }) => Some(reason),
        _ => None,
    });
    assert!(reason.unwrap().contains("ping-restart"));
    assert!(server.connected().is_empty());
}

#[test]
fn push_reply_variants() {
    let test = TestPki::new("push");
    let mut config = engine_config(&test.pki);
    let mut admission = Admission {
        address: Ipv4Addr::new(10, 8, 0, 7),
        keys: DataKeys {
            cipher: Cipher::Aes128Gcm,
            derivation: KeyDerivation::TlsEkm,
        },
        cc_exit: false,
        compression: None,
    };
    let old_client = push_messages(&config, &Default::default(), 3, &admission, true);
    assert_eq!(old_client.len(), 1);
    assert!(
        old_client[0].contains(",key-derivation tls-ekm"),
        "{old_client:?}"
    );
    assert!(!old_client[0].contains("protocol-flags"));
    // On the PRF path nothing names tls-ekm, so the client derives with the PRF.
    admission.keys.derivation = KeyDerivation::Prf;
    let prf = push_messages(&config, &Default::default(), 3, &admission, true);
    assert!(!prf[0].contains("tls-ekm"), "{prf:?}");
    admission.cc_exit = true;
    let prf = push_messages(&config, &Default::default(), 3, &admission, true);
    assert!(prf[0].ends_with(",protocol-flags cc-exit"), "{prf:?}");
    admission.keys.derivation = KeyDerivation::TlsEkm;

    // A client limited to some networks is not told to send everything into the tunnel.
    config.redirect_gateway = true;
    let limited = crate::access::client_networks(
        Some(&["172.16.0.0/24".parse().unwrap()]),
        &std::collections::BTreeSet::from(["172.16.0.0/16".parse().unwrap()]),
        config.redirect_gateway,
    );
    let limited = push_messages(&config, &limited, 3, &admission, true).join(",");
    assert!(
        limited.contains(",route 172.16.0.0 255.255.255.0"),
        "{limited}"
    );
    assert!(!limited.contains("redirect-gateway"), "{limited}");

    // With redirect-gateway the client's networks hold the default route.
    let routes = (0..=255u8)
        .map(|i| Ipv4Net::new(Ipv4Addr::new(172, 16, i, 0), 24).unwrap())
        .chain([Ipv4Net::default()])
        .collect();
    let messages = push_messages(&config, &routes, 3, &admission, true);
    assert!(messages.len() > 1);
    for (i, message) in messages.iter().enumerate() {
        assert!(
            message.starts_with("PUSH_REPLY,") && message.len() <= 1024,
            "{message}"
        );
        let last = i == messages.len() - 1;
        assert!(message.ends_with(if last {
            ",push-continuation 1"
        } else {
            ",push-continuation 2"
        }));
    }
    let all = messages.join(",");
    assert_eq!(all.matches(",route 172.16.").count(), 256);
    assert!(all.contains(",redirect-gateway def1,"));
}

/// Everything the server hands to tun now.
fn tun_packets(server: &mut Server) -> Vec<Vec<u8>> {
    std::iter::from_fn(|| server.poll_output())
        .filter_map(|o| match o {
            Output::Tun(packet) => Some(packet),
            _ => None,
        })
        .collect()
}

/// The client's pending ACKs reach the server (so it knows the client holds the new key).
fn flush_client(server: &mut Server, client: &mut TestClient, now: Instant) {
    let peer = client.peer;
    for datagram in client.datagrams(now) {
        server.handle_datagram(now, peer, &datagram);
    }
}

/// Data both ways on the client's current key: client → tun, and tun → client sealed with
/// the key id the client now uses.
fn assert_data_flows_on_current_key(
    server: &mut Server,
    client: &mut TestClient,
    address: Ipv4Addr,
    now: Instant,
) {
    let peer = client.peer;
    let left_host = Ipv4Addr::new(192, 168, 10, 2);
    let upstream = ipv4_packet(address, left_host);
    let sealed = client.data.as_mut().unwrap().seal(&upstream).unwrap();
    assert_eq!(sealed[0] & 0x07, client.key_id);
    server.handle_datagram(now, peer, &sealed);
    assert_eq!(tun_packets(server), vec![upstream]);
    let downstream = ipv4_packet(left_host, address);
    server.handle_tun_packet(now, &downstream);
    let Some(Output::Transmit { datagram, .. }) = server.poll_output() else {
        panic!("nothing sent to the client");
    };
    assert_eq!(
        datagram[0] & 0x07,
        client.key_id,
        "the server seals with the new key"
    );
    assert_eq!(
        client.data.as_mut().unwrap().open(&datagram).unwrap(),
        downstream
    );
}

#[test]
fn a_client_renegotiation_moves_both_directions_to_the_new_key_and_retires_the_old_one() {
    let test = TestPki::new("reneg-client");
    let mut config = engine_config(&test.pki);
    config.transition_window = Duration::from_secs(20);
    let (mut server, address) = test.server_with_client_and_config("frank", config);
    let mut client = TestClient::new(&test.pki, "frank", "AES-256-GCM");
    let start = Instant::now();
    let connected = start + connect(&mut server, &mut client, hostile, start);

    // Key ids 1 to 7, then 1 again: the counter wraps without ever reusing 0.
    let mut now = connected;
    for expected in [1, 2, 3, 4, 5, 6, 7, 1] {
        client.renegotiate();
        now = run_until(&mut server, &mut client, hostile, now, |c| {
            c.data_key_id == Some(c.key_id)
        });
        flush_client(&mut server, &mut client, now);
        assert_eq!(client.key_id, expected);
        assert_data_flows_on_current_key(&mut server, &mut client, address, now);
        now += Duration::from_secs(1);
    }

    // A packet sealed with the previous key before the switch still arrives …
    let peer = client_link();
    let late = ipv4_packet(address, Ipv4Addr::new(192, 168, 10, 3));
    let in_flight = client.previous_data.as_mut().unwrap().seal(&late).unwrap();
    server.handle_datagram(now, peer, &in_flight);
    assert_eq!(tun_packets(&mut server), vec![late.clone()]);
    // … but not once the transition window is over.
    let dropped_before = server.counters.unauthenticated_data;
    server.handle_timeout(now + Duration::from_secs(20));
    while server.poll_output().is_some() {}
    let too_late = client.previous_data.as_mut().unwrap().seal(&late).unwrap();
    server.handle_datagram(now + Duration::from_secs(20), peer, &too_late);
    assert!(tun_packets(&mut server).is_empty());
    assert_eq!(server.counters.unauthenticated_data, dropped_before + 1);

    let connected_clients = server.connected();
    assert_eq!(connected_clients.len(), 1, "one session all along");
    assert_eq!(connected_clients[0].address, address);
    assert_eq!(connected_clients[0].renegotiations, 8);
    assert_eq!(server.handshakes, 9, "the connect and eight renegotiations");
}

#[test]
fn the_server_renegotiates_when_reneg_after_has_passed() {
    let test = TestPki::new("reneg-server");
    let mut config = engine_config(&test.pki);
    config.reneg_after = Some(Duration::from_secs(30));
    let (mut server, address) = test.server_with_client_and_config("gina", config);
    let mut client = TestClient::new(&test.pki, "gina", "AES-128-GCM");
    let start = Instant::now();
    let connected = start + connect(&mut server, &mut client, perfect, start);
    flush_client(&mut server, &mut client, connected);
    while server.poll_output().is_some() {}
    let due = server.next_timeout().unwrap();
    assert!(
        due <= connected + Duration::from_secs(30),
        "the renegotiation timer is set"
    );

    // Keepalives keep the session up meanwhile; then the server sends SOFT_RESET for key 1.
    let now = run_until(
        &mut server,
        &mut client,
        perfect,
        connected + Duration::from_secs(30),
        |c| c.data_key_id == Some(1),
    );
    flush_client(&mut server, &mut client, now);
    assert_data_flows_on_current_key(&mut server, &mut client, address, now);
    assert_eq!(server.connected()[0].renegotiations, 1);
}

#[test]
fn a_soft_reset_out_of_sequence_is_dropped_and_the_session_stays() {
    let test = TestPki::new("reneg-skip");
    let (mut server, address) = test.server_with_client("hank");
    let mut client = TestClient::new(&test.pki, "hank", "AES-256-GCM");
    let start = Instant::now();
    let now = start + connect(&mut server, &mut client, perfect, start);
    flush_client(&mut server, &mut client, now);
    let skip = ControlPacket {
        opcode: Opcode::SoftResetV1,
        key_id: 3,
        session_id: client.session_id,
        acks: vec![],
        acked_session: None,
        message_id: Some(0),
        payload: &[],
    }
    .encode();
    let peer = client_link();
    let dropped_before = server.counters.unknown_session;
    server.handle_datagram(now, peer, &skip);
    assert_eq!(server.counters.unknown_session, dropped_before + 1);
    assert_data_flows_on_current_key(&mut server, &mut client, address, now);
}

#[test]
fn a_renegotiation_with_another_clients_certificate_ends_the_session() {
    let test = TestPki::new("reneg-identity");
    let (mut server, _) = test.server_with_client("ivan");
    test.pki
        .add_client("mallory", "10.8.0.0/24".parse().unwrap(), None)
        .unwrap();
    let mut client = TestClient::new(&test.pki, "ivan", "AES-256-GCM");
    let start = Instant::now();
    let mut now = start + connect(&mut server, &mut client, perfect, start);
    client.tls_config = TestClient::new(&test.pki, "mallory", "AES-256-GCM").tls_config;
    client.renegotiate();
    let peer = client_link();
    let mut reason = None;
    for _ in 0..40 {
        for datagram in client.datagrams(now) {
            server.handle_datagram(now, peer, &datagram);
        }
        server.handle_timeout(now);
        while let Some(output) = server.poll_output() {
            match output {
                Output::Transmit { datagram, .. } => client.receive(&datagram),
                Output::Event(Event::Disconnected { reason: why, .. }) => reason = Some(why),
                _ => {}
            }
        }
        now += Duration::from_millis(250);
    }
    let reason = reason.expect("the session ends");
    assert!(reason.contains("certificate of \"mallory\""), "{reason}");
    assert!(server.connected().is_empty());
}

#[test]
fn a_client_offering_only_chacha20_poly1305_gets_it_and_data_flows() {
    let test = TestPki::new("chacha");
    let (mut server, address) = test.server_with_client("judy");
    let mut client = TestClient::new(&test.pki, "judy", "CHACHA20-POLY1305");
    let start = Instant::now();
    let now = start + connect(&mut server, &mut client, perfect, start);
    assert!(client
        .push_reply
        .as_ref()
        .unwrap()
        .contains("cipher CHACHA20-POLY1305"));
    assert_eq!(server.connected()[0].cipher, Cipher::Chacha20Poly1305);
    assert_data_flows_on_current_key(&mut server, &mut client, address, now);
}

/// Sends what each client sends first; the server answers none of them.
fn assert_unanswered(
    server: &mut Server,
    clients: impl IntoIterator<Item = TestClient>,
    at: Instant,
) {
    for mut client in clients {
        for datagram in client.datagrams(at) {
            server.handle_datagram(at, client.peer, &datagram);
        }
        assert!(
            server.poll_output().is_none(),
            "a peer without a valid key got an answer"
        );
    }
}

#[test]
fn with_tls_crypt_the_handshake_works_and_peers_without_the_key_get_nothing() {
    let test = TestPki::new("tls-crypt");
    let key = StaticKey::generate();
    let mut config = engine_config(&test.pki);
    config.tls_crypt = ControlWrap::TlsCrypt(ControlKey::Crypt(Arc::new(TlsCrypt::server(&key))));
    let (mut server, address) = test.server_with_client_and_config("kate", config);
    let peer = client_link();
    let start = Instant::now();

    // A client without the key (or with another one): dropped before TLS, no answer at all.
    let strangers = [None, Some(StaticKey::generate())].map(|stranger_key| {
        let mut stranger = TestClient::new(&test.pki, "kate", "AES-256-GCM");
        stranger.tls_crypt = stranger_key.map(|k| (TlsCrypt::client(&k), WrapState::default()));
        stranger
    });
    assert_unanswered(&mut server, strangers, start);
    assert_eq!(server.counters.unauthenticated_control, 2);
    assert_eq!(server.session_count(), 0);

    let mut client = TestClient::new(&test.pki, "kate", "AES-256-GCM");
    client.tls_crypt = Some((TlsCrypt::client(&key), WrapState::default()));
    let now = start + connect(&mut server, &mut client, hostile, start);
    // The client's ACK of the push reply, captured on its way to the server.
    let captured = client.datagrams(now);
    for datagram in &captured {
        server.handle_datagram(now, peer, datagram);
    }
    assert_data_flows_on_current_key(&mut server, &mut client, address, now);

    // A captured control packet sent again is a replay.
    let replayed_before = server.counters.replayed_control;
    server.handle_datagram(now, peer, &captured[0]);
    assert_eq!(server.counters.replayed_control, replayed_before + 1);
    assert_eq!(server.connected().len(), 1);
}

#[test]
fn with_tls_crypt_the_session_continues_the_packet_ids_of_the_stateless_reset() {
    let test = TestPki::new("tls-crypt-ids");
    let key = StaticKey::generate();
    let mut config = engine_config(&test.pki);
    config.tls_crypt = ControlWrap::TlsCrypt(ControlKey::Crypt(Arc::new(TlsCrypt::server(&key))));
    let (mut server, _) = test.server_with_client_and_config("liam", config);
    let mut client = TestClient::new(&test.pki, "liam", "AES-256-GCM");
    client.tls_crypt = Some((TlsCrypt::client(&key), WrapState::default()));
    connect(&mut server, &mut client, perfect, Instant::now());
    assert_eq!(
        client.replayed, 0,
        "a server packet reused the reset's packet id"
    );
}

#[test]
fn with_tls_crypt_v2_a_client_connects_with_its_own_key_and_forged_resets_leave_no_trace() {
    let test = TestPki::new("tls-crypt-v2");
    let server_key = ServerKey::generate();
    let shared = StaticKey::generate();
    let mut config = engine_config(&test.pki);
    config.tls_crypt = ControlWrap::TlsCryptV2 {
        server_key: Arc::new(ServerKey::from_pem(&server_key.to_pem()).unwrap()),
        shared: Some(ControlKey::Crypt(Arc::new(TlsCrypt::server(&shared)))),
    };
    let (mut server, address) = test.server_with_client_and_config("vera", config);
    let peer = client_link();
    let start = Instant::now();
    let v2_client = |issuer: &ServerKey| {
        let issued = issuer.issue_client_key(1_700_000_000);
        let mut client = TestClient::new(&test.pki, "vera", "AES-256-GCM");
        client.tls_crypt = Some((TlsCrypt::client(issued.key()), WrapState::default()));
        client.wrapped_key = Some(issued.wrapped().to_vec());
        client
    };

    // Another server's client key, a forged WKc, a V3 without WKc: no answer, no session.
    let mut stranger = v2_client(&ServerKey::generate());
    let mut forged = v2_client(&server_key);
    if let Some(wrapped) = forged.wrapped_key.as_mut() {
        wrapped[40] ^= 1;
    }
    let mut bare = v2_client(&server_key);
    bare.wrapped_key = Some(Vec::new());
    assert_unanswered(&mut server, [stranger, forged, bare], start);
    assert_eq!(server.counters.unauthenticated_control, 3);
    assert_eq!(server.session_count(), 0);

    let mut client = v2_client(&server_key);
    let now = start + connect(&mut server, &mut client, hostile, start);
    flush_client(&mut server, &mut client, now);
    assert_data_flows_on_current_key(&mut server, &mut client, address, now);
    // Past its HARD_RESET, packets under another client's key do not reach the session.
    stranger = v2_client(&server_key);
    stranger.session_id = client.session_id;
    stranger.wrapped_key = None;
    let before = server.counters.unauthenticated_control;
    for datagram in stranger.datagrams(now) {
        server.handle_datagram(now, peer, &datagram);
    }
    assert_eq!(server.counters.unauthenticated_control, before + 1);
    assert_eq!(server.connected().len(), 1);

    // A profile with the v1 key issued before v2 was on still connects.
    let mut old_profile = TestClient::new(&test.pki, "vera", "AES-256-GCM");
    old_profile.tls_crypt = Some((TlsCrypt::client(&shared), WrapState::default()));
    old_profile.peer = Link::Udp("192.0.2.30:40000".parse().unwrap());
    let now = run_until(&mut server, &mut old_profile, hostile, now, |c| {
        c.data.is_some()
    });

    // A captured first packet of a real client, replayed from other addresses: it opens
    // (the key is real), but only its first sighting starts a session.
    let mut recorded = v2_client(&server_key);
    let first = recorded.datagrams(now).remove(0);
    let sessions = server.session_count();
    let replayed = server.counters.replayed_control;
    for port in 0..6u16 {
        let from = Link::Udp(SocketAddr::from(([198, 51, 100, 9], 2000 + port)));
        server.handle_datagram(now, from, &first);
    }
    assert_eq!(server.session_count(), sessions + 1);
    assert_eq!(server.counters.replayed_control, replayed + 5);
}

/// Alice (at the usual client address) and Bob (at another) connected to one server, their
/// last ACKs delivered; their addresses and the virtual time then.
fn alice_and_bob_connected(
    test: &TestPki,
) -> (Server, TestClient, TestClient, [Ipv4Addr; 2], Instant) {
    let (mut server, alice_address) = test.server_with_client("alice");
    let bob_address = test
        .pki
        .add_client("bob", "10.8.0.0/24".parse().unwrap(), None)
        .unwrap()
        .address;
    server.set_clients(test.pki.openvpn_registry().unwrap());
    let start = Instant::now();
    let mut alice = TestClient::new(&test.pki, "alice", "AES-256-GCM");
    let now = start + connect(&mut server, &mut alice, perfect, start);
    let mut bob = TestClient::new(&test.pki, "bob", "AES-256-GCM");
    bob.peer = Link::Udp("192.0.2.20:40000".parse().unwrap());
    let now = run_until(&mut server, &mut bob, perfect, now, |c| c.data.is_some());
    flush_client(&mut server, &mut alice, now);
    flush_client(&mut server, &mut bob, now);
    (server, alice, bob, [alice_address, bob_address], now)
}

#[test]
fn data_authenticated_by_one_client_but_sent_from_anothers_address_stays_with_its_own_session() {
    let test = TestPki::new("float");
    let (mut server, mut alice, bob, [alice_address, bob_address], now) =
        alice_and_bob_connected(&test);
    while server.poll_output().is_some() {}

    // Alice's packet arrives from Bob's address: it is Alice's (her keys), not Bob's.
    let left_host = Ipv4Addr::new(192, 168, 10, 2);
    let upstream = ipv4_packet(alice_address, left_host);
    let sealed = alice.data.as_mut().unwrap().seal(&upstream).unwrap();
    server.handle_datagram(now, bob.peer, &sealed);
    assert_eq!(tun_packets(&mut server), vec![upstream]);
    // Bob's address may not be claimed with Alice's session: his source is refused.
    let as_bob = alice
        .data
        .as_mut()
        .unwrap()
        .seal(&ipv4_packet(bob_address, left_host))
        .unwrap();
    server.handle_datagram(now, bob.peer, &as_bob);
    assert!(tun_packets(&mut server).is_empty());
    // An exit sealed with Alice's keys from Bob's address ends Alice, not Bob.
    let mut exit = super::data::OCC_MAGIC.to_vec();
    exit.push(super::data::OCC_EXIT);
    let exit = alice.data.as_mut().unwrap().seal(&exit).unwrap();
    server.handle_datagram(now, bob.peer, &exit);
    let connected: Vec<String> = server.connected().into_iter().map(|c| c.name).collect();
    assert_eq!(connected, ["bob"]);
}

#[test]
fn a_client_whose_nat_port_goes_to_another_client_keeps_its_session_and_comes_back_from_its_new_port(
) {
    let test = TestPki::new("parked");
    let (mut server, alice_address) = test.server_with_client("alice");
    let bob_address = test
        .pki
        .add_client("bob", "10.8.0.0/24".parse().unwrap(), None)
        .unwrap()
        .address;
    server.set_clients(test.pki.openvpn_registry().unwrap());
    let nat_port = |port: u16| Link::Udp(SocketAddr::from(([192, 0, 2, 20], port)));
    let start = Instant::now();
    let mut bob = TestClient::new(&test.pki, "bob", "AES-256-GCM");
    bob.peer = nat_port(40000);
    let now = start + connect(&mut server, &mut bob, perfect, start);
    flush_client(&mut server, &mut bob, now);
    while server.poll_output().is_some() {}

    // The NAT gives Bob's port to Alice while Bob is quiet: Alice connects there at once.
    let mut alice = TestClient::new(&test.pki, "alice", "AES-256-GCM");
    alice.peer = nat_port(40000);
    let now = run_until(&mut server, &mut alice, perfect, now, |c| c.data.is_some());
    flush_client(&mut server, &mut alice, now);
    let disconnected = |server: &mut Server| {
        std::iter::from_fn(|| server.poll_output())
            .filter_map(|o| match o {
                Output::Event(Event::Disconnected { name, reason, .. }) => Some((name, reason)),
                _ => None,
            })
            .collect::<Vec<_>>()
    };
    assert_eq!(disconnected(&mut server), [], "nobody was disconnected");
    let mut names: Vec<String> = server.connected().into_iter().map(|c| c.name).collect();
    names.sort();
    assert_eq!(names, ["alice", "bob"]);
    assert_data_flows_on_current_key(&mut server, &mut alice, alice_address, now);

    // Bob's next packet, from his new port, brings his session back there.
    bob.peer = nat_port(40001);
    assert_data_flows_on_current_key(&mut server, &mut bob, bob_address, now);
    assert!(server.has_session(&nat_port(40001)));
    assert_data_flows_on_current_key(&mut server, &mut alice, alice_address, now);

    // Alice reconnects from Bob's new port; Bob never comes back: he ends at ping-restart.
    let mut alice_again = TestClient::new(&test.pki, "alice", "AES-256-GCM");
    alice_again.peer = nat_port(40001);
    let now = run_until(&mut server, &mut alice_again, perfect, now, |c| {
        c.data.is_some()
    });
    flush_client(&mut server, &mut alice_again, now);
    let links: Vec<(String, Link)> = server
        .connected()
        .into_iter()
        .map(|c| (c.name, c.link))
        .collect();
    assert!(
        links.contains(&("alice".to_owned(), nat_port(40001)))
            && links.contains(&("bob".to_owned(), nat_port(40001)))
            && links.len() == 2,
        "alice's old session ended, bob waits: {links:?}"
    );
    server.handle_timeout(now + Duration::from_secs(61));
    let ended = disconnected(&mut server);
    assert!(
        ended
            .iter()
            .any(|(name, reason)| name.as_deref() == Some("bob")
                && reason.contains("did not come back")),
        "{ended:?}"
    );
}

/// Runs a client that the server refuses to the end; the reason the server gives.
fn refusal(server: &mut Server, client: &mut TestClient) -> String {
    refusal_at(server, client, Instant::now())
}

fn refusal_at(server: &mut Server, client: &mut TestClient, now: Instant) -> String {
    let reason = session_end(server, client, now);
    assert!(find(&client.plaintext, b"AUTH_FAILED").is_some());
    reason
}

/// Runs a client that gets no data channel until its session ends; the reason.
fn session_end(server: &mut Server, client: &mut TestClient, now: Instant) -> String {
    let mut disconnected = None;
    for _ in 0..20 {
        for datagram in client.datagrams(now) {
            server.handle_datagram(now, client.peer, &datagram);
        }
        while let Some(output) = server.poll_output() {
            match output {
                Output::Transmit { datagram, .. } => client.receive(&datagram),
                Output::Event(Event::Disconnected { reason, .. }) => disconnected = Some(reason),
                _ => {}
            }
        }
    }
    assert!(client.data.is_none());
    disconnected.expect("the session ended")
}

#[test]
fn a_removed_and_re_added_name_refuses_the_old_certificate_and_admits_the_new_one() {
    let test = TestPki::new("re-added");
    let pool: Ipv4Net = "10.8.0.0/24".parse().unwrap();
    test.pki.add_client("alice", pool, None).unwrap();
    // The lost laptop's profile, saved before the client is removed.
    let mut lost = TestClient::new(&test.pki, "alice", "AES-256-GCM");
    test.pki.remove_client("alice").unwrap();
    test.pki.add_client("alice", pool, None).unwrap();
    let mut server = Server::new(engine_config(&test.pki));
    server.set_clients(test.pki.openvpn_registry().unwrap());

    let reason = refusal(&mut server, &mut lost);
    assert!(
        reason.contains("the certificate of \"alice\" is revoked"),
        "{reason}"
    );
    assert!(find(
        &lost.plaintext,
        b"AUTH_FAILED,the certificate of \"alice\" is revoked"
    )
    .is_some());
    assert_eq!(server.refusals.revoked, 1);
    assert_eq!(server.connected().len(), 0);

    let mut new = TestClient::new(&test.pki, "alice", "AES-256-GCM");
    connect(&mut server, &mut new, perfect, Instant::now());
    assert_eq!(server.connected()[0].name, "alice");
}

#[test]
fn a_certificate_that_is_not_the_registered_one_is_refused_as_a_bad_certificate() {
    let test = TestPki::new("not-current");
    let (mut server, _) = test.server_with_client("alice");
    let mut registry = test.pki.openvpn_registry().unwrap();
    registry.clients.get_mut("alice").unwrap().certificate = [7; 32];
    server.set_clients(registry);
    let mut alice = TestClient::new(&test.pki, "alice", "AES-256-GCM");
    let reason = refusal(&mut server, &mut alice);
    assert!(
        reason.contains("not the current certificate of \"alice\""),
        "{reason}"
    );
    assert_eq!(server.refusals.bad_certificate, 1);
    assert_eq!(server.refusals.revoked, 0);
}

#[test]
fn a_connected_client_whose_certificate_is_revoked_is_cut_off_and_cannot_connect_again() {
    let test = TestPki::new("revoke");
    let (mut server, address) = test.server_with_client("alice");
    let reader = Pki::new(&test.dir);
    server.set_registry_reader(Box::new(move || reader.openvpn_registry().ok()));
    let start = Instant::now();
    let mut alice = TestClient::new(&test.pki, "alice", "AES-256-GCM");
    let now = start + connect(&mut server, &mut alice, perfect, start);
    flush_client(&mut server, &mut alice, now);
    while server.poll_output().is_some() {}

    test.pki.revoke_client("alice").unwrap();
    server.reload_clients(now);
    let told: Vec<Vec<u8>> = std::iter::from_fn(|| server.poll_output())
        .filter_map(|o| match o {
            Output::Transmit { datagram, .. } => Some(datagram),
            _ => None,
        })
        .collect();
    for datagram in &told {
        alice.receive(datagram);
    }
    assert!(find(&alice.plaintext, b"AUTH_FAILED,certificate revoked").is_some());
    assert!(server.connected().is_empty());
    let upstream = ipv4_packet(address, Ipv4Addr::new(192, 168, 10, 2));
    let sealed = alice.data.as_mut().unwrap().seal(&upstream).unwrap();
    server.handle_datagram(now, alice.peer, &sealed);
    assert!(
        tun_packets(&mut server).is_empty(),
        "no traffic after revocation"
    );

    let mut again = TestClient::new(&test.pki, "alice", "AES-256-GCM");
    let reason = refusal(&mut server, &mut again);
    assert!(reason.contains("revoked"), "{reason}");
    assert_eq!(server.refusals.revoked, 1);
}

#[test]
fn with_cert_and_password_only_the_right_username_and_password_connect() {
    let test = TestPki::new("password");
    let mut config = engine_config(&test.pki);
    config.auth = Auth::CertAndPassword;
    let (mut server, _) = test.server_with_client_and_config("alice", config);
    test.pki
        .add_client("bob", "10.8.0.0/24".parse().unwrap(), None)
        .unwrap();
    test.pki.set_password("alice", "correct horse").unwrap();
    server.set_clients(test.pki.openvpn_registry().unwrap());

    let refused = [
        Some(("alice", "correct horsE")),
        None,
        Some(("bob", "correct horse")),
    ];
    // Attempts 3 s apart: after a wrong password the next guess waits PASSWORD_RETRY.
    let start = Instant::now();
    let at = |attempt: u64| start + Duration::from_secs(3 * attempt);
    for (count, credentials) in (1..).zip(refused) {
        let mut client = TestClient::new(&test.pki, "alice", "AES-256-GCM");
        client.credentials = credentials;
        let reason = refusal_at(&mut server, &mut client, at(count));
        assert!(
            reason.contains("wrong or missing username or password"),
            "{credentials:?}: {reason}"
        );
        assert_eq!(server.refusals.wrong_password, count);
    }
    // Right after a wrong guess even the right password waits (no Argon2 run for it).
    let mut hasty = TestClient::new(&test.pki, "alice", "AES-256-GCM");
    hasty.credentials = Some(("alice", "correct horse"));
    let reason = refusal_at(&mut server, &mut hasty, at(3) + Duration::from_millis(500));
    assert!(reason.contains("try again later"), "{reason}");

    // A client without a password set is refused the same way.
    let mut bob = TestClient::new(&test.pki, "bob", "AES-256-GCM");
    bob.credentials = Some(("bob", ""));
    let reason = refusal_at(&mut server, &mut bob, at(4));
    assert!(reason.contains("wrong or missing"), "{reason}");

    let mut alice = TestClient::new(&test.pki, "alice", "AES-256-GCM");
    alice.credentials = Some(("alice", "correct horse"));
    connect(&mut server, &mut alice, perfect, at(5));
    assert_eq!(server.connected()[0].name, "alice");
    assert_eq!(server.refusals.wrong_password, 5);
}

#[test]
fn a_certificate_that_expired_a_minute_ago_is_refused_with_the_reason() {
    let test = TestPki::new("expired");
    let (mut server, _) = test.server_with_client("alice");
    let issuer = rcgen::Issuer::from_ca_cert_pem(
        &read(test.pki.path("ca.crt")),
        rcgen::KeyPair::from_pem(&read(test.pki.path("ca.key"))).unwrap(),
    )
    .unwrap();
    let key = rcgen::KeyPair::from_pem(&read(test.pki.client_path("alice", "key"))).unwrap();
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "alice");
    let now = time::OffsetDateTime::now_utc();
    params.not_before = now - time::Duration::days(1);
    params.not_after = now - time::Duration::minutes(1);
    params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ClientAuth];
    let expired = params.signed_by(&key, &issuer).unwrap();
    std::fs::write(test.pki.client_path("alice", "crt"), expired.pem()).unwrap();

    let mut alice = TestClient::new(&test.pki, "alice", "AES-256-GCM");
    let reason = session_end(&mut server, &mut alice, Instant::now());
    assert!(reason.contains("expired"), "{reason}");
    assert_eq!(
        alice.tls_error,
        Some(rustls::Error::AlertReceived(
            rustls::AlertDescription::CertificateExpired
        ))
    );
    assert_eq!(server.refusals.bad_certificate, 1);
    assert!(server.connected().is_empty());
}

#[test]
fn with_key_derivation_prf_a_2_6_client_gets_prf_keys_and_renegotiates_on_them() {
    let test = TestPki::new("prf");
    let mut config = engine_config(&test.pki);
    config.key_derivation = Some(KeyDerivation::Prf);
    let (mut server, address) = test.server_with_client_and_config("grace", config);
    let mut client = TestClient::new(&test.pki, "grace", "AES-256-GCM");
    let start = Instant::now();
    let mut now = start + connect(&mut server, &mut client, hostile, start);
    let reply = client.push_reply.clone().unwrap();
    assert!(!reply.contains("tls-ekm"), "{reply}");
    assert!(client.prf);
    // Data only flows when both sides derived the same PRF keys.
    flush_client(&mut server, &mut client, now);
    assert_data_flows_on_current_key(&mut server, &mut client, address, now);
    // Each renegotiation brings new randoms, hence new keys.
    for expected in [1, 2] {
        let previous_random = client.server_random;
        client.renegotiate();
        now = run_until(&mut server, &mut client, hostile, now, |c| {
            c.data_key_id == Some(c.key_id)
        });
        assert_ne!(client.server_random, previous_random);
        flush_client(&mut server, &mut client, now);
        assert_eq!(client.key_id, expected);
        assert_data_flows_on_current_key(&mut server, &mut client, address, now);
        now += Duration::from_secs(1);
    }
    assert_eq!(server.connected()[0].renegotiations, 2);
}

#[test]
fn a_2_4_client_without_tls_ekm_or_a_cipher_list_gets_aes_256_gcm_on_prf_keys() {
    let test = TestPki::new("v24");
    let (mut server, address) = test.server_with_client("heidi");
    let mut client = TestClient::new(&test.pki, "heidi", "");
    // OpenVPN 2.4's peer info: DATA_V2 and REQUEST_PUSH, NCP without IV_CIPHERS.
    client.peer_info = "IV_VER=2.4.12\nIV_PROTO=6\nIV_NCP=2\nIV_COMP_STUBv2=1\n".into();
    let now = Instant::now();
    connect(&mut server, &mut client, perfect, now);
    let reply = client.push_reply.clone().unwrap();
    assert!(reply.contains(",cipher AES-256-GCM"), "{reply}");
    assert!(!reply.contains("tls-ekm"), "{reply}");
    flush_client(&mut server, &mut client, now);
    assert_data_flows_on_current_key(&mut server, &mut client, address, now);
}

#[test]
fn clients_the_server_cannot_serve_get_auth_failed_naming_the_fix() {
    let test = TestPki::new("refusals");
    test.pki
        .add_client("ivan", "10.8.0.0/24".parse().unwrap(), None)
        .unwrap();
    let clients = test.pki.openvpn_registry().unwrap();
    let cases: [(Option<KeyDerivation>, &str, &str); 3] = [
        // OpenVPN 2.3: no DATA_V2.
        (
            None,
            "IV_VER=2.3.18\nIV_NCP=2\n",
            "use OpenVPN 2.4 or later",
        ),
        // No cipher negotiation at all.
        (None, "IV_VER=2.4.0\nIV_PROTO=2\n", "data-ciphers"),
        // tls-ekm required, the client has none.
        (
            Some(KeyDerivation::TlsEkm),
            "IV_VER=2.5.9\nIV_PROTO=6\nIV_CIPHERS=AES-256-GCM\n",
            "--key-derivation",
        ),
    ];
    for (key_derivation, peer_info, fix) in cases {
        let mut config = engine_config(&test.pki);
        config.key_derivation = key_derivation;
        let mut server = Server::new(config);
        server.set_clients(clients.clone());
        let mut client = TestClient::new(&test.pki, "ivan", "");
        client.peer_info = peer_info.into();
        let reason = refusal(&mut server, &mut client);
        assert!(reason.contains(fix), "{peer_info:?}: {reason}");
    }
}

/// A connected client whose profile has a compression option, with these peer-info lines.
fn compressing_client(
    test: &TestPki,
    name: &str,
    peer_info: &str,
) -> (Server, TestClient, Ipv4Addr) {
    let (mut server, address) = test.server_with_client(name);
    let mut client = TestClient::new(&test.pki, name, "AES-256-GCM");
    client.options = "V4,dev-type tun,link-mtu 1550,tun-mtu 1500,proto UDPv4,comp-lzo,tls-client";
    client.peer_info = format!("IV_VER=2.6.14\nIV_PROTO=990\nIV_CIPHERS=AES-256-GCM\n{peer_info}");
    let now = Instant::now();
    connect(&mut server, &mut client, perfect, now);
    flush_client(&mut server, &mut client, now);
    (server, client, address)
}

#[test]
fn a_compression_profile_with_stub_v2_gets_it_pushed_and_compressed_packets_are_dropped() {
    let test = TestPki::new("stub-v2");
    let (mut server, mut client, address) = compressing_client(
        &test,
        "judy",
        "IV_LZO_STUB=1\nIV_COMP_STUB=1\nIV_COMP_STUBv2=1\n",
    );
    let reply = client.push_reply.clone().unwrap();
    assert!(reply.ends_with(",compress stub-v2"), "{reply}");
    let now = Instant::now();
    // stub-v2 leaves IP packets as they are, both ways.
    assert_data_flows_on_current_key(&mut server, &mut client, address, now);
    // A packet the client compressed anyway (0x50, algorithm 1: LZ4) is dropped, counted.
    let compressed = client
        .data
        .as_mut()
        .unwrap()
        .seal(&[0x50, 1, 9, 9, 9])
        .unwrap();
    server.handle_datagram(now, client.peer, &compressed);
    assert!(tun_packets(&mut server).is_empty());
    assert_eq!(server.counters.compressed_data, 1);
    assert_eq!(server.connected().len(), 1, "the client stays");
}

#[test]
fn a_comp_lzo_profile_without_stub_v2_keeps_its_framing_byte_both_ways() {
    let test = TestPki::new("comp-lzo");
    let (mut server, mut client, address) = compressing_client(&test, "ken", "IV_LZO_STUB=1\n");
    let reply = client.push_reply.clone().unwrap();
    assert!(reply.ends_with(",comp-lzo no"), "{reply}");
    let now = Instant::now();
    let left_host = Ipv4Addr::new(192, 168, 10, 2);
    let upstream = ipv4_packet(address, left_host);
    let framed = [&[0xfa], &upstream[..]].concat();
    let sealed = client.data.as_mut().unwrap().seal(&framed).unwrap();
    server.handle_datagram(now, client.peer, &sealed);
    assert_eq!(tun_packets(&mut server), vec![upstream]);
    let downstream = ipv4_packet(left_host, address);
    server.handle_tun_packet(now, &downstream);
    let Some(Output::Transmit { datagram, .. }) = server.poll_output() else {
        panic!("nothing sent to the client");
    };
    let opened = client.data.as_mut().unwrap().open(&datagram).unwrap();
    assert_eq!(opened, [&[0xfa], &downstream[..]].concat());
    // LZO-compressed (0x66) is dropped, counted.
    let compressed = client.data.as_mut().unwrap().seal(&[0x66, 1, 2]).unwrap();
    server.handle_datagram(now, client.peer, &compressed);
    assert!(tun_packets(&mut server).is_empty());
    assert_eq!(server.counters.compressed_data, 1);
}

#[test]
fn an_occ_request_is_answered_with_the_options_string() {
    let test = TestPki::new("occ");
    let (mut server, _) = test.server_with_client("leo");
    let mut client = TestClient::new(&test.pki, "leo", "AES-256-GCM");
    let now = Instant::now();
    connect(&mut server, &mut client, perfect, now);
    flush_client(&mut server, &mut client, now);
    while server.poll_output().is_some() {}
    let request = [&OCC_MAGIC[..], &[OCC_REQUEST]].concat();
    let sealed = client.data.as_mut().unwrap().seal(&request).unwrap();
    server.handle_datagram(now, client.peer, &sealed);
    let Some(Output::Transmit { datagram, .. }) = server.poll_output() else {
        panic!("no OCC reply");
    };
    let reply = client.data.as_mut().unwrap().open(&datagram).unwrap();
    let expected = [
        &OCC_MAGIC[..],
        &[OCC_REPLY],
        OPTIONS_STRING.as_bytes(),
        &[0],
    ]
    .concat();
    assert_eq!(reply, expected);
    assert!(tun_packets(&mut server).is_empty());
}

fn tcp_link(conn: u64) -> Link {
    Link::Tcp {
        conn,
        peer: CLIENT_ADDRESS.parse().unwrap(),
    }
}

/// Datagrams the server resends on `link` once its TLS flight to a client that then goes
/// quiet is due again.
fn resends_to_a_quiet_client(test: &TestPki, name: &str, link: Link) -> usize {
    let (mut server, _) = test.server_with_client(name);
    let mut client = TestClient::new(&test.pki, name, "AES-256-GCM");
    client.peer = link;
    let now = Instant::now();
    // The reset and its stateless reply; then the echo and ClientHello, which create the
    // session and draw the server's TLS flight.
    for _ in 0..2 {
        for datagram in client.datagrams(now) {
            server.handle_datagram(now, link, &datagram);
        }
        for datagram in transmitted(&mut server) {
            client.receive(&datagram);
        }
    }
    assert_eq!(server.handshaking(), 1);
    server.handle_timeout(now + Duration::from_secs(5));
    transmitted(&mut server).len()
}

#[test]
fn over_tcp_control_packets_go_out_once_and_are_never_resent() {
    let test = TestPki::new("tcp-resend");
    assert!(
        resends_to_a_quiet_client(&test, "erin", client_link()) >= 1,
        "UDP resends the unacknowledged flight"
    );
    assert_eq!(resends_to_a_quiet_client(&test, "fred", tcp_link(7)), 0);
}

#[test]
fn a_tcp_session_connects_never_floats_and_ends_with_its_connection() {
    let test = TestPki::new("tcp-link");
    let (mut server, address) = test.server_with_client("erin");
    let mut client = TestClient::new(&test.pki, "erin", "AES-256-GCM");
    client.peer = tcp_link(1);
    let start = Instant::now();
    let now = start + connect(&mut server, &mut client, perfect, start);
    flush_client(&mut server, &mut client, now);
    while server.poll_output().is_some() {}
    let status = server.connected();
    assert_eq!(status[0].link, tcp_link(1));
    // Socket buffers are pushed to UDP clients only: over TCP they would stop the kernel's
    // own buffer sizing.
    let reply = client.push_reply.clone().unwrap();
    assert!(
        !reply.contains("rcvbuf") && !reply.contains("sndbuf"),
        "{reply}"
    );
    // The same client's data on another connection (or over UDP) is opened by its peer id
    // but does not move the session there.
    let left_host = Ipv4Addr::new(192, 168, 10, 2);
    for elsewhere in [tcp_link(2), client_link()] {
        let upstream = ipv4_packet(address, left_host);
        let sealed = client.data.as_mut().unwrap().seal(&upstream).unwrap();
        server.handle_datagram(now, elsewhere, &sealed);
        assert_eq!(tun_packets(&mut server), vec![upstream]);
        assert!(server.has_session(&tcp_link(1)) && !server.has_session(&elsewhere));
    }
    server.close_link(now, tcp_link(1), "the client closed the TCP connection");
    let disconnected = std::iter::from_fn(|| server.poll_output()).find_map(|o| match o {
        Output::Event(Event::Disconnected { link, reason, .. }) => Some((link, reason)),
        _ => None,
    });
    assert_eq!(
        disconnected,
        Some((
            tcp_link(1),
            "the client closed the TCP connection".to_owned()
        ))
    );
    assert!(server.connected().is_empty());
}

/// Hands each transmitted datagram to the client at its destination.
fn deliver(server: &mut Server, clients: &mut [&mut TestClient]) {
    while let Some(output) = server.poll_output() {
        if let Output::Transmit { to, datagram } = output {
            for client in clients.iter_mut().filter(|c| c.peer == to) {
                client.receive(&datagram);
            }
        }
    }
}

#[test]
fn after_a_route_change_connected_clients_are_told_to_restart_one_after_another() {
    let test = TestPki::new("restart");
    let (mut server, mut alice, mut bob, _, now) = alice_and_bob_connected(&test);
    deliver(&mut server, &mut [&mut alice, &mut bob]);
    let restart = b"RESTART,the networks behind the VPN changed";

    server.restart_connected(now, Duration::from_secs(4));
    assert_eq!(server.next_timeout(), Some(now), "the first goes at once");
    server.handle_timeout(now);
    deliver(&mut server, &mut [&mut alice, &mut bob]);
    assert!(
        find(&alice.plaintext, restart).is_some(),
        "alice first (peer id order)"
    );
    assert!(find(&bob.plaintext, restart).is_none(), "bob not yet");
    let second = now + Duration::from_secs(2);
    assert!(server.next_timeout().is_some_and(|at| at <= second));
    server.handle_timeout(second);
    deliver(&mut server, &mut [&mut alice, &mut bob]);
    assert!(
        find(&bob.plaintext, restart).is_some(),
        "bob half the spread later"
    );
}

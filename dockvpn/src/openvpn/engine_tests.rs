//! The whole engine without sockets: a minimal OpenVPN client (rustls + the same framing)
//! talks to `Server` over an in-memory wire that can lose, duplicate and reorder datagrams,
//! on a virtual clock.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};

use super::data::{Cipher, DataChannel, KEY_MATERIAL_LEN, PING_MAGIC};
use super::keymethod;
use super::link::Link;
use super::packet::{decode, ControlPacket, Opcode, Packet, SessionId, MAX_CONTROL_PACKET};
use super::reliable::Reliable;
use super::server::{push_messages, EngineConfig, Event, Output, Server};
use super::tls_crypt::{StaticKey, TlsCrypt, WrapState};
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
        server.set_clients(HashMap::from([(name.to_owned(), record.address)]));
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
        tls_crypt: None,
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
    ciphers: &'static str,
    /// With tls-crypt: the client's keys and its wrap state.
    tls_crypt: Option<(TlsCrypt, WrapState)>,
    /// Where the server sees its datagrams come from.
    peer: Link,
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
            key_sent: false,
            plaintext: Vec::new(),
            push_reply: None,
            pushed: None,
            data: None,
            data_key_id: None,
            previous_data: None,
            ciphers,
            tls_crypt: None,
            peer: client_link(),
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
    }

    fn datagrams(&mut self, now: Instant) -> Vec<Vec<u8>> {
        let server = self.server_session.unwrap_or_default();
        let datagrams = self
            .reliable
            .datagrams(now, self.key_id, self.session_id, server);
        match self.tls_crypt.as_mut() {
            Some((tls_crypt, state)) => datagrams
                .iter()
                .map(|datagram| tls_crypt.wrap(datagram, state, 1_700_000_000))
                .collect(),
            None => datagrams,
        }
    }

    fn receive(&mut self, datagram: &[u8]) {
        let unwrapped;
        let datagram = match &self.tls_crypt {
            Some((tls_crypt, _)) if datagram[0] >> 3 != Opcode::DataV2.wire() => {
                unwrapped = tls_crypt.unwrap(datagram).unwrap().0;
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
                    let mut slice = &payload[..];
                    while !slice.is_empty() {
                        self.tls.read_tls(&mut slice).unwrap();
                    }
                    self.tls.process_new_packets().unwrap();
                }
                other => panic!("unexpected {other:?}"),
            }
        }
        if self.tls_started && !self.tls.is_handshaking() && !self.key_sent {
            let peer_info = format!("IV_VER=2.6.14\nIV_PROTO=142\nIV_CIPHERS={}\n", self.ciphers);
            self.tls
                .writer()
                .write_all(&keymethod::client_message(
                    "V4,dev-type tun,tls-client",
                    &peer_info,
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
        if let (Some((cipher, peer_id)), true) = (self.pushed, self.key_id > 0) {
            // The server's key-method reply on a renegotiated key: derive its keys.
            if self.key_sent && !self.plaintext.is_empty() && self.data_key_id != Some(self.key_id)
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
    let peer = client_link();
    let now = Instant::now();
    let mut disconnected = None;
    for _ in 0..20 {
        for datagram in client.datagrams(now) {
            server.handle_datagram(now, peer, &datagram);
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
    assert!(find(&client.plaintext, b"AUTH_FAILED").is_some());
    assert!(disconnected.unwrap().contains("no client named \"carol\""));
    assert_eq!(server.session_count(), 0);
}

#[test]
fn a_flood_of_hard_resets_cannot_grow_state_beyond_the_handshake_limit() {
    let test = TestPki::new("flood");
    let mut server = Server::new(engine_config(&test.pki));
    let now = Instant::now();
    for port in 0..1000u16 {
        let reset = ControlPacket {
            opcode: Opcode::HardResetClientV2,
            key_id: 0,
            session_id: [port as u8; 8],
            acks: vec![],
            acked_session: None,
            message_id: Some(0),
            payload: &[],
        }
        .encode();
        let from = Link::Udp(SocketAddr::from(([192, 0, 2, 1], 1024 + port)));
        server.handle_datagram(now, from, &reset);
    }
    assert_eq!(server.session_count(), 4);
    assert_eq!(server.counters.refused_handshakes, 996);
    // Half-open sessions expire with the handshake window, making room again.
    server.handle_timeout(now + Duration::from_secs(301));
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
    let address = Ipv4Addr::new(10, 8, 0, 7);
    let old_client = push_messages(
        &config,
        &Default::default(),
        address,
        3,
        Cipher::Aes128Gcm,
        false,
    );
    assert_eq!(old_client.len(), 1);
    assert!(
        old_client[0].contains(",key-derivation tls-ekm"),
        "{old_client:?}"
    );
    assert!(!old_client[0].contains("protocol-flags"));

    config.redirect_gateway = true;
    let routes = (0..=255u8)
        .map(|i| Ipv4Net::new(Ipv4Addr::new(172, 16, i, 0), 24).unwrap())
        .collect();
    let messages = push_messages(&config, &routes, address, 3, Cipher::Aes256Gcm, true);
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
    let peer = client_link();
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

#[test]
fn with_tls_crypt_the_handshake_works_and_peers_without_the_key_get_nothing() {
    let test = TestPki::new("tls-crypt");
    let key = StaticKey::generate();
    let mut config = engine_config(&test.pki);
    config.tls_crypt = Some(Arc::new(TlsCrypt::server(&key)));
    let (mut server, address) = test.server_with_client_and_config("kate", config);
    let peer = client_link();
    let start = Instant::now();

    // A client without the key (or with another one): dropped before TLS, no answer at all.
    for stranger_key in [None, Some(StaticKey::generate())] {
        let mut stranger = TestClient::new(&test.pki, "kate", "AES-256-GCM");
        stranger.tls_crypt = stranger_key.map(|k| (TlsCrypt::client(&k), WrapState::default()));
        for datagram in stranger.datagrams(start) {
            server.handle_datagram(start, peer, &datagram);
        }
        assert!(
            server.poll_output().is_none(),
            "a peer without the key got an answer"
        );
    }
    assert_eq!(server.counters.unauthenticated_control, 2);
    assert_eq!(server.session_count(), 0);

    let mut client = TestClient::new(&test.pki, "kate", "AES-256-GCM");
    client.tls_crypt = Some((TlsCrypt::client(&key), WrapState::default()));
    let first = client.datagrams(start);
    server.handle_datagram(start, peer, &first[0]);
    let now = start + connect(&mut server, &mut client, hostile, start);
    flush_client(&mut server, &mut client, now);
    assert_data_flows_on_current_key(&mut server, &mut client, address, now);

    // A captured control packet sent again is a replay.
    let replayed_before = server.counters.replayed_control;
    server.handle_datagram(now, peer, &first[0]);
    assert_eq!(server.counters.replayed_control, replayed_before + 1);
    assert_eq!(server.connected().len(), 1);
}

#[test]
fn data_authenticated_by_one_client_but_sent_from_anothers_address_stays_with_its_own_session() {
    let test = TestPki::new("float");
    let (mut server, alice_address) = test.server_with_client("alice");
    let bob_address = test
        .pki
        .add_client("bob", "10.8.0.0/24".parse().unwrap(), None)
        .unwrap()
        .address;
    server.set_clients(HashMap::from([
        ("alice".to_owned(), alice_address),
        ("bob".to_owned(), bob_address),
    ]));
    let start = Instant::now();
    let mut alice = TestClient::new(&test.pki, "alice", "AES-256-GCM");
    let now = start + connect(&mut server, &mut alice, perfect, start);
    let mut bob = TestClient::new(&test.pki, "bob", "AES-256-GCM");
    bob.peer = Link::Udp("192.0.2.20:40000".parse().unwrap());
    let now = run_until(&mut server, &mut bob, perfect, now, |c| c.data.is_some());
    flush_client(&mut server, &mut alice, now);
    flush_client(&mut server, &mut bob, now);
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

fn tcp_link(conn: u64) -> Link {
    Link::Tcp {
        conn,
        peer: CLIENT_ADDRESS.parse().unwrap(),
    }
}

/// Datagrams the server sends after a HARD_RESET on `link`: at once, then 5 virtual seconds
/// later (when UDP has resent its reply).
fn replies_to_a_hard_reset(pki: &Pki, link: Link) -> (usize, usize) {
    let mut server = Server::new(engine_config(pki));
    let reset = ControlPacket {
        opcode: Opcode::HardResetClientV2,
        key_id: 0,
        session_id: rand_id(),
        acks: vec![],
        acked_session: None,
        message_id: Some(0),
        payload: &[],
    }
    .encode();
    let now = Instant::now();
    server.handle_datagram(now, link, &reset);
    let count = |server: &mut Server| {
        std::iter::from_fn(|| server.poll_output())
            .filter(|o| matches!(o, Output::Transmit { to, .. } if *to == link))
            .count()
    };
    let first = count(&mut server);
    server.handle_timeout(now + Duration::from_secs(5));
    (first, count(&mut server))
}

#[test]
fn over_tcp_control_packets_go_out_once_and_are_never_resent() {
    let test = TestPki::new("tcp-resend");
    let (udp_first, udp_resent) = replies_to_a_hard_reset(&test.pki, client_link());
    assert_eq!(udp_first, 1);
    assert!(udp_resent >= 1, "UDP resends the unacknowledged reply");
    assert_eq!(replies_to_a_hard_reset(&test.pki, tcp_link(7)), (1, 0));
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

//! Issue 18, point 4: in steady state the engines' data paths allocate nothing. Each engine
//! is connected to a client through its library API, warmed up, and then counted over a
//! thousand packets each way: a client's datagram in (`handle_datagram`, one `Tun` out) and
//! a tun packet out (`send_to`, one `Transmit` out), every output buffer handed back with
//! `recycle` as the driver does. Only the engine's calls are counted, on this thread (the
//! counter is per thread, so the two tests may run at once); the client may allocate.
//!
//! A separate test binary, so that its counting allocator leaves the library's own tests
//! alone.
//!
//! Counted, not timed: before the engines took their buffers from `engine::BufferPool`, each
//! packet cost one allocation each way (a fresh Vec from `DataChannel::seal`/`open`, or
//! boringtun's output copied with `to_vec`) and a second one out with `comp-lzo` framing
//! (the framed copy of the payload); a regression shows here as a count per packet.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use boringtun::noise::{Tunn, TunnResult};
use boringtun::x25519::{PublicKey, StaticSecret};
use dockvpn::openvpn::data::{Cipher, DataChannel, EXPORTER_LABEL, KEY_MATERIAL_LEN};
use dockvpn::openvpn::keymethod::CLIENT_KEY_SOURCE_LEN;
use dockvpn::openvpn::link::Link;
use dockvpn::openvpn::packet::{decode, Opcode, Packet, SessionId};
use dockvpn::openvpn::reliable::Reliable;
use dockvpn::openvpn::server::{self, EngineConfig, Server};
use dockvpn::openvpn::wrap::ControlWrap;
use dockvpn::password::Auth;
use dockvpn::pki::{Pki, SERVER_NAME};
use dockvpn::wireguard::{self, PeerConfig, WireguardServer};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};

const WARM_UP: usize = 100;
const COUNTED: usize = 1000;
const LEFT_HOST: Ipv4Addr = Ipv4Addr::new(192, 168, 10, 5);
/// A full-size packet through a 1500-byte tunnel MTU.
const PAYLOAD: usize = 1400;

thread_local! {
    /// Allocations on this thread while `COUNTING` is set (const-initialised: reading it
    /// from inside the allocator allocates nothing itself).
    static ALLOCATIONS: Cell<u64> = const { Cell::new(0) };
    static COUNTING: Cell<bool> = const { Cell::new(false) };
}

struct CountingAllocator;

impl CountingAllocator {
    fn count() {
        // `try_with`: the thread's locals may be gone while it exits.
        if COUNTING.try_with(Cell::get).unwrap_or(false) {
            let _ = ALLOCATIONS.try_with(|count| count.set(count.get() + 1));
        }
    }
}

unsafe impl GlobalAlloc for CountingAllocator {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        Self::count();
        unsafe { System.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        Self::count();
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        Self::count();
        unsafe { System.realloc(ptr, layout, new_size) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static ALLOCATOR: CountingAllocator = CountingAllocator;

/// Runs `engine_call` and adds the allocations it made to `total`.
fn counted<T>(total: &mut u64, engine_call: impl FnOnce() -> T) -> T {
    let before = ALLOCATIONS.with(Cell::get);
    COUNTING.with(|counting| counting.set(true));
    let result = engine_call();
    COUNTING.with(|counting| counting.set(false));
    *total += ALLOCATIONS.with(Cell::get) - before;
    result
}

/// A minimal IPv4 packet (protocol 253, for experiments) with `tag` in its payload.
fn ipv4(source: Ipv4Addr, destination: Ipv4Addr, tag: usize) -> Vec<u8> {
    let length = 20 + PAYLOAD;
    let mut packet = vec![0u8; length];
    packet[0] = 0x45;
    packet[2..4].copy_from_slice(&(length as u16).to_be_bytes());
    packet[8] = 64;
    packet[9] = 253;
    packet[12..16].copy_from_slice(&source.octets());
    packet[16..20].copy_from_slice(&destination.octets());
    packet[20..28].copy_from_slice(&(tag as u64).to_be_bytes());
    packet
}

#[test]
fn the_openvpn_data_path_allocates_nothing_in_steady_state() {
    openvpn_data_path_allocations(Compression::None);
}

/// `comp-lzo` framing: a byte before every payload, added and taken off in place.
#[test]
fn the_openvpn_data_path_allocates_nothing_with_comp_lzo_framing() {
    openvpn_data_path_allocations(Compression::LzoStub);
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Compression {
    None,
    /// A profile with `comp-lzo` from a client without the stub-v2 framing.
    LzoStub,
}

impl Compression {
    /// What the client puts before, and finds before, every payload.
    fn framing(self) -> &'static [u8] {
        match self {
            Compression::None => &[],
            Compression::LzoStub => &[0xfa],
        }
    }
}

fn openvpn_data_path_allocations(compression: Compression) {
    let pki = TestPki::new(compression);
    let record = pki
        .pki
        .add_client("alice", "10.8.0.0/24".parse().unwrap(), None)
        .unwrap();
    let mut server = Server::new(engine_config(&pki.pki));
    server.set_clients(pki.pki.openvpn_registry().unwrap());
    let link = Link::Udp("192.0.2.10:40000".parse().unwrap());
    let now = Instant::now();
    let mut client = OpenvpnClient::new(&pki.pki, "alice", compression);
    let peer_id = client.connect(&mut server, link, now);
    let address = record.address;

    let mut allocations = 0;
    for round in 0..WARM_UP + COUNTED {
        if round == WARM_UP {
            allocations = 0;
        }
        // Client to server: one datagram in, its packet out to tun.
        let upstream = ipv4(address, LEFT_HOST, round);
        let framed = [compression.framing(), &upstream].concat();
        let sealed = client.data().seal(&framed).unwrap();
        let output = counted(&mut allocations, || {
            server.handle_datagram(now, link, &sealed);
            server.poll_output()
        });
        let Some(server::Output::Tun(packet)) = output else {
            panic!("round {round}: {output:?} instead of the packet for tun");
        };
        assert_eq!(packet, upstream);
        assert!(server.poll_output().is_none());
        counted(&mut allocations, || server.recycle(packet));

        // Server to client: a tun packet in, one datagram out.
        let downstream = ipv4(LEFT_HOST, address, round);
        let output = counted(&mut allocations, || {
            server.send_to(now, peer_id, &downstream);
            server.poll_output()
        });
        let Some(server::Output::Transmit { to, datagram }) = output else {
            panic!("round {round}: {output:?} instead of a datagram");
        };
        assert_eq!(to, link);
        let opened = client.data().open(&datagram).unwrap();
        assert_eq!(opened, [compression.framing(), &downstream].concat());
        counted(&mut allocations, || server.recycle(datagram));
    }
    assert_eq!(
        allocations, 0,
        "the OpenVPN engine ({compression:?} compression) allocated over {COUNTED} packets each way"
    );
}

#[test]
fn the_wireguard_data_path_allocates_nothing_in_steady_state() {
    let now = Instant::now();
    let mut server = WireguardServer::new(rand::random(), now);
    let client_secret: [u8; 32] = rand::random();
    let preshared_key: [u8; 32] = rand::random();
    let address = Ipv4Addr::new(10, 8, 0, 2);
    server.set_peers(vec![PeerConfig {
        name: "alice".to_owned(),
        address,
        public_key: PublicKey::from(&StaticSecret::from(client_secret)).to_bytes(),
        preshared_key,
    }]);
    let mut client = Tunn::new(
        StaticSecret::from(client_secret),
        PublicKey::from(server.public_key()),
        Some(preshared_key),
        None,
        1,
        None,
    );
    let from = SocketAddr::from(([198, 51, 100, 7], 51820));
    let mut buffer = vec![0u8; 65536];
    let peer = wireguard_connect(&mut server, &mut client, from, now, &mut buffer);

    let mut allocations = 0;
    for round in 0..WARM_UP + COUNTED {
        if round == WARM_UP {
            allocations = 0;
        }
        let upstream = ipv4(address, LEFT_HOST, round);
        let TunnResult::WriteToNetwork(sealed) = client.encapsulate(&upstream, &mut buffer) else {
            panic!("round {round}: the client has no session");
        };
        let sealed = sealed.to_vec();
        let output = counted(&mut allocations, || {
            server.handle_datagram(now, from, &sealed);
            server.poll_output()
        });
        let Some(wireguard::Output::Tun(packet)) = output else {
            panic!("round {round}: {output:?} instead of the packet for tun");
        };
        assert_eq!(packet, upstream);
        assert!(server.poll_output().is_none());
        counted(&mut allocations, || server.recycle(packet));

        let downstream = ipv4(LEFT_HOST, address, round);
        let output = counted(&mut allocations, || {
            server.send_to(peer, &downstream);
            server.poll_output()
        });
        let Some(wireguard::Output::Transmit { to, datagram }) = output else {
            panic!("round {round}: {output:?} instead of a datagram");
        };
        assert_eq!(to, from);
        match client.decapsulate(Some(from.ip()), &datagram, &mut buffer) {
            TunnResult::WriteToTunnelV4(packet, _) => assert_eq!(packet, &downstream[..]),
            other => panic!("round {round}: the client got {other:?}"),
        }
        counted(&mut allocations, || server.recycle(datagram));
    }
    assert_eq!(
        allocations, 0,
        "the WireGuard engine allocated over {COUNTED} packets each way"
    );
}

/// Handshakes `client` with `server` (the client initiates, and confirms with a keepalive);
/// the server's handle of the client.
fn wireguard_connect(
    server: &mut WireguardServer,
    client: &mut Tunn,
    from: SocketAddr,
    now: Instant,
    buffer: &mut [u8],
) -> wireguard::PeerId {
    let TunnResult::WriteToNetwork(initiation) = client.format_handshake_initiation(buffer, false)
    else {
        panic!("no handshake initiation");
    };
    let mut to_server = vec![initiation.to_vec()];
    for _ in 0..8 {
        let mut to_client = Vec::new();
        for datagram in to_server.drain(..) {
            server.handle_datagram(now, from, &datagram);
        }
        while let Some(output) = server.poll_output() {
            match output {
                wireguard::Output::Transmit { datagram, .. } => to_client.push(datagram),
                wireguard::Output::Event(wireguard::Event::Connected { peer, .. }) => return peer,
                other => panic!("while connecting: {other:?}"),
            }
        }
        for datagram in to_client {
            let mut result = client.decapsulate(Some(from.ip()), &datagram, buffer);
            while let TunnResult::WriteToNetwork(answer) = result {
                to_server.push(answer.to_vec());
                result = client.decapsulate(None, &[], buffer);
            }
        }
    }
    panic!("the WireGuard client did not connect");
}

/// A PKI in a temporary directory, removed when dropped.
struct TestPki {
    dir: std::path::PathBuf,
    pki: Pki,
}

impl TestPki {
    /// One directory per test (they run at once).
    fn new(tag: impl std::fmt::Debug) -> TestPki {
        let dir = std::env::temp_dir().join(format!(
            "dockvpn-allocations-{tag:?}-{}",
            std::process::id()
        ));
        let _ = std::fs::remove_dir_all(&dir);
        let pki = Pki::new(&dir);
        pki.init(false).unwrap();
        TestPki { dir, pki }
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
        ciphers: vec![Cipher::Aes256Gcm],
        ping: Duration::from_secs(10),
        ping_restart: Duration::from_secs(60),
        handshake_window: Duration::from_secs(60),
        redirect_gateway: false,
        max_clients: 4,
        max_handshaking: 4,
        reneg_after: None,
        transition_window: Duration::from_secs(60),
        tls_crypt: ControlWrap::Plain,
        key_derivation: None,
        auth: Auth::Cert,
    }
}

/// Just enough of an OpenVPN 2.6 client to connect (TLS over the reliability layer,
/// key-method 2 with tls-ekm, the push reply), on a lossless wire.
struct OpenvpnClient {
    session_id: SessionId,
    server_session: Option<SessionId>,
    reliable: Reliable,
    tls: rustls::ClientConnection,
    tls_started: bool,
    key_sent: bool,
    plaintext: Vec<u8>,
    data: Option<DataChannel>,
    compression: Compression,
}

impl OpenvpnClient {
    fn new(pki: &Pki, name: &str, compression: Compression) -> OpenvpnClient {
        let pem = |path| std::fs::read_to_string(path).unwrap();
        let mut roots = rustls::RootCertStore::empty();
        roots
            .add(CertificateDer::from_pem_slice(pem(pki.path("ca.crt")).as_bytes()).unwrap())
            .unwrap();
        let cert =
            CertificateDer::from_pem_slice(pem(pki.client_path(name, "crt")).as_bytes()).unwrap();
        let key =
            PrivateKeyDer::from_pem_slice(pem(pki.client_path(name, "key")).as_bytes()).unwrap();
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_client_auth_cert(vec![cert], key)
            .unwrap();
        let tls = rustls::ClientConnection::new(
            Arc::new(config),
            ServerName::try_from(SERVER_NAME).unwrap(),
        )
        .unwrap();
        let mut reliable = Reliable::default();
        reliable.send(Opcode::HardResetClientV2, Vec::new());
        OpenvpnClient {
            session_id: rand::random(),
            server_session: None,
            reliable,
            tls,
            tls_started: false,
            key_sent: false,
            plaintext: Vec::new(),
            data: None,
            compression,
        }
    }

    fn data(&mut self) -> &mut DataChannel {
        self.data.as_mut().expect("connected")
    }

    /// Exchanges control packets until the server says the client is connected and the
    /// wire is quiet (every control message acknowledged); the client's peer id.
    fn connect(&mut self, server: &mut Server, link: Link, now: Instant) -> u32 {
        let mut peer_id = None;
        for _ in 0..64 {
            let server_session = self.server_session.unwrap_or_default();
            let to_server = self
                .reliable
                .datagrams(now, 0, self.session_id, server_session);
            let mut quiet = to_server.is_empty();
            for datagram in to_server {
                server.handle_datagram(now, link, &datagram);
            }
            while let Some(output) = server.poll_output() {
                quiet = false;
                match output {
                    server::Output::Transmit { datagram, .. } => self.receive(&datagram),
                    server::Output::Event(server::Event::Connected { peer_id: id, .. }) => {
                        peer_id = Some(id)
                    }
                    other => panic!("while connecting: {other:?}"),
                }
            }
            if let (Some(peer_id), true, true) = (peer_id, self.data.is_some(), quiet) {
                return peer_id;
            }
        }
        panic!("the OpenVPN client did not connect");
    }

    fn receive(&mut self, datagram: &[u8]) {
        let Ok(Packet::Control(packet)) = decode(datagram) else {
            panic!("a control packet while connecting");
        };
        self.server_session = Some(packet.session_id);
        self.reliable.on_packet(&packet, self.session_id);
        while let Some((opcode, payload)) = self.reliable.deliver() {
            match opcode {
                Opcode::HardResetServerV2 => self.tls_started = true,
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
            let message = key_method_message(self.compression);
            self.tls.writer().write_all(&message).unwrap();
            self.tls.writer().write_all(b"PUSH_REQUEST\0").unwrap();
            self.key_sent = true;
        }
        let mut chunk = [0u8; 4096];
        while let Ok(n @ 1..) = self.tls.reader().read(&mut chunk) {
            self.plaintext.extend_from_slice(&chunk[..n]);
        }
        if let Some(peer_id) = self.pushed_peer_id() {
            let mut material = [0u8; KEY_MATERIAL_LEN];
            self.tls
                .export_keying_material(&mut material, EXPORTER_LABEL, None)
                .unwrap();
            let data = DataChannel::new(Cipher::Aes256Gcm, &material, false, 0, peer_id);
            self.data = Some(data);
            self.plaintext.clear();
        }
        let mut ciphertext = Vec::new();
        while self.tls.wants_write() {
            self.tls.write_tls(&mut ciphertext).unwrap();
        }
        if !ciphertext.is_empty() {
            self.reliable.send_tls(&ciphertext);
        }
    }

    /// The peer id in a whole PUSH_REPLY received (the cipher is the server's only one).
    fn pushed_peer_id(&self) -> Option<u32> {
        let start = self
            .plaintext
            .windows(b"PUSH_REPLY".len())
            .position(|window| window == b"PUSH_REPLY")?;
        let length = self.plaintext[start..].iter().position(|&b| b == 0)?;
        let reply = std::str::from_utf8(&self.plaintext[start..start + length]).unwrap();
        reply
            .split(',')
            .find_map(|option| option.strip_prefix("peer-id "))
            .map(|id| id.parse().unwrap())
    }
}

/// The client's key-method 2 message: key source, options string, no credentials, and the
/// peer info of a 2.6 client (DATA_V2, push request, tls-ekm, cc-exit).
fn key_method_message(compression: Compression) -> Vec<u8> {
    fn string(out: &mut Vec<u8>, text: &str) {
        out.extend_from_slice(&(text.len() as u16 + 1).to_be_bytes());
        out.extend_from_slice(text.as_bytes());
        out.push(0);
    }
    let mut message = vec![0, 0, 0, 0, 2];
    message.extend_from_slice(&[7; CLIENT_KEY_SOURCE_LEN]);
    string(
        &mut message,
        match compression {
            Compression::None => "V4,dev-type tun,tls-client",
            Compression::LzoStub => "V4,dev-type tun,comp-lzo,tls-client",
        },
    );
    message.extend_from_slice(&[0; 4]);
    string(
        &mut message,
        "IV_VER=2.6.14\nIV_PROTO=142\nIV_CIPHERS=AES-256-GCM\n",
    );
    message
}

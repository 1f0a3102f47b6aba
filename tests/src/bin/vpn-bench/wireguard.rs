//! The WireGuard rows: Dockvpn's WireGuard transport against a `wireguard-go` server in the
//! same SI namespace (its own interface and port), both reached by the same `wireguard-go`
//! client in the right host's namespace, configured from the profile `dockvpn client config
//! --format wireguard` prints. Handshake time, iperf3 throughput with the server's CPU seconds
//! per GB, RSS idle and with 20 peers whose handshakes completed; and the machine's ceiling,
//! ChaCha20-Poly1305 seal throughput on one core (ring), to read the tunnel's cost against.

use std::net::{SocketAddr, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine as _;
use boringtun::noise::{Tunn, TunnResult};
use boringtun::x25519::{PublicKey, StaticSecret};
use docknfv_tests::chain::{LEFT_HOST, SI_LEFT, SI_RIGHT};
use docknfv_tests::measure::{aead_seal_gbps, median, min_max, round_order, rss_kib};
use docknfv_tests::openvpn::{dockvpn_cli, text, wait_for_status};
use docknfv_tests::prereq::require_command;
use docknfv_tests::traffic::ping;
use docknfv_tests::{Chain, Netns, Vnf};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

use super::{tunnel_transfer, TRANSFER_ROUNDS, TRANSFER_SECONDS};

/// Dockvpn's default WireGuard port, and the `wireguard-go` server's beside it.
const DOCKVPN_PORT: u16 = 51820;
const WIREGUARD_GO_PORT: u16 = 51821;
/// The `wireguard-go` server's tunnel network: its own address, then its clients'.
const WIREGUARD_GO_NET: &str = "10.20.0.0/24";
const WIREGUARD_GO_SERVER: &str = "10.20.0.1";
/// Client starts (process start → completed handshake) per server.
const HANDSHAKE_ROUNDS: usize = 5;
/// Registered peers with completed handshakes in the RSS row.
pub(super) const PEERS: usize = 20;
/// How long a server has to answer a peer's handshake (Dockvpn reads new clients every 2 s).
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// The plaintext size of one sealed packet in the ring row, and how long one sample seals.
pub(super) const SEAL_PACKET: usize = 1400;
pub(super) const SEAL_SAMPLE: Duration = Duration::from_secs(1);

/// The fields of a wg-quick profile a client needs; everything `wg setconf` takes, plus the
/// wg-quick keys (Address, AllowedIPs as routes) this harness applies with `ip`.
#[derive(Clone)]
pub(super) struct Profile {
    private_key: String,
    address: String,
    server_public_key: String,
    preshared_key: String,
    endpoint: SocketAddr,
    allowed_ips: Vec<String>,
    persistent_keepalive: Option<String>,
}

impl Profile {
    fn parse(text: &str) -> Profile {
        let field = |key: &str| {
            text.lines()
                .filter_map(|line| line.split_once('='))
                .find(|(k, _)| k.trim() == key)
                .map(|(_, v)| v.trim().to_owned())
        };
        let required = |key: &str| {
            field(key).unwrap_or_else(|| panic!("the wg-quick profile has no {key}:\n{text}"))
        };
        Profile {
            private_key: required("PrivateKey"),
            address: required("Address"),
            server_public_key: required("PublicKey"),
            preshared_key: required("PresharedKey"),
            endpoint: required("Endpoint")
                .parse()
                .unwrap_or_else(|e| panic!("the profile's Endpoint: {e}\n{text}")),
            allowed_ips: required("AllowedIPs")
                .split(',')
                .map(|ip| ip.trim().to_owned())
                .collect(),
            persistent_keepalive: field("PersistentKeepalive"),
        }
    }

    /// The same client of a server with another key, port and tunnel address.
    fn for_server(&self, public_key: &str, port: u16, address: &str) -> Profile {
        Profile {
            server_public_key: public_key.to_owned(),
            endpoint: SocketAddr::new(self.endpoint.ip(), port),
            address: address.to_owned(),
            ..self.clone()
        }
    }

    /// The profile without wg-quick's own keys: what `wg setconf` reads.
    fn setconf(&self) -> String {
        let keepalive = self
            .persistent_keepalive
            .as_ref()
            .map(|k| format!("PersistentKeepalive = {k}\n"))
            .unwrap_or_default();
        format!(
            "[Interface]\nPrivateKey = {}\n\n[Peer]\nPublicKey = {}\nPresharedKey = {}\n\
             Endpoint = {}\nAllowedIPs = {}\n{keepalive}",
            self.private_key,
            self.server_public_key,
            self.preshared_key,
            self.endpoint,
            self.allowed_ips.join(", ")
        )
    }

    /// The client's public key, as `wg` prints it.
    fn public_key(&self) -> String {
        BASE64.encode(PublicKey::from(&StaticSecret::from(key_bytes(&self.private_key))).as_bytes())
    }
}

fn key_bytes(base64: &str) -> [u8; 32] {
    BASE64
        .decode(base64)
        .ok()
        .and_then(|bytes| bytes.try_into().ok())
        .unwrap_or_else(|| panic!("{base64:?} is not a base64 WireGuard key"))
}

/// One `wireguard-go` interface in a namespace, the process in the foreground (stopped on
/// drop, which removes the interface and its routes).
pub(super) struct WireguardGo {
    pub process: Vnf,
    interface: String,
}

/// wireguard-go's control socket for `interface`. Its path is global, not per namespace.
fn control_socket(interface: &str) -> PathBuf {
    PathBuf::from(format!("/var/run/wireguard/{interface}.sock"))
}

impl WireguardGo {
    fn start(ns: &Netns) -> WireguardGo {
        require_command("wireguard-go", "wireguard-go");
        require_command("wg", "wireguard-tools");
        static NEXT: AtomicU32 = AtomicU32::new(0);
        // The name carries the pid so parallel runs don't share a control socket; one a
        // killed process left behind under a reused pid would pass for ready.
        let interface = format!(
            "wgb{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        let socket = control_socket(&interface);
        let _ = std::fs::remove_file(&socket);
        let mut command = ns.command("wireguard-go");
        command
            .args(["-f", &interface])
            .env("WG_I_PREFER_BUGGY_USERSPACE_TO_POLISHED_KMOD", "1");
        let wireguard = WireguardGo {
            process: Vnf::spawn(command),
            interface,
        };
        let deadline = Instant::now() + Duration::from_secs(5);
        while !socket.exists() {
            assert!(
                Instant::now() < deadline,
                "wireguard-go made no {} within 5 s:\n{}",
                socket.display(),
                wireguard.process.log()
            );
            std::thread::sleep(Duration::from_millis(1));
        }
        wireguard
    }

    /// `wg setconf IF` with `config`.
    fn set_config(&self, config: &str) {
        let path = std::env::temp_dir().join(format!("{}.conf", self.interface));
        std::fs::write(&path, config).expect("write the wg config");
        let output = self.wg(&["setconf", &self.interface, path.to_str().expect("utf-8")]);
        let _ = std::fs::remove_file(&path);
        assert!(output.status.success(), "wg setconf: {}", text(&output));
    }

    fn up(&self, ns: &Netns, address: &str) {
        ns.ip(&["address", "add", address, "dev", &self.interface]);
        ns.ip(&["link", "set", &self.interface, "up"]);
    }

    /// How many peers have completed a handshake.
    fn peers_handshaken(&self) -> usize {
        let output = self.wg(&["show", &self.interface, "latest-handshakes"]);
        assert!(output.status.success(), "wg show: {}", text(&output));
        String::from_utf8_lossy(&output.stdout)
            .lines()
            .filter(|line| line.split_whitespace().nth(1).is_some_and(|t| t != "0"))
            .count()
    }

    /// `wg` talks to wireguard-go over its control socket, from any namespace.
    fn wg(&self, args: &[&str]) -> std::process::Output {
        Command::new("wg")
            .args(args)
            .output()
            .expect("run wg (apt-get install wireguard-tools)")
    }
}

impl Drop for WireguardGo {
    /// SIGTERM, so wireguard-go removes its control socket (the Vnf's drop then reaps or
    /// kills it).
    fn drop(&mut self) {
        let socket = control_socket(&self.interface);
        let _ = kill(Pid::from_raw(self.process.pid() as i32), Signal::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(2);
        while socket.exists() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(1));
        }
        let _ = std::fs::remove_file(&socket);
    }
}

/// A `wireguard-go` client in `ns` configured from `profile`, with a route through the
/// tunnel per AllowedIPs entry; returns once its handshake completed.
pub(super) fn start_client(ns: &Netns, profile: &Profile, server: &Vnf) -> WireguardGo {
    let client = WireguardGo::start(ns);
    client.set_config(&profile.setconf());
    client.up(ns, &profile.address);
    for network in &profile.allowed_ips {
        ns.ip(&["route", "replace", network, "dev", &client.interface]);
    }
    let deadline = Instant::now() + HANDSHAKE_TIMEOUT;
    while client.peers_handshaken() == 0 {
        assert!(
            Instant::now() < deadline,
            "no handshake with {} within {HANDSHAKE_TIMEOUT:?}\nclient:\n{}\nserver:\n{}",
            profile.endpoint,
            client.process.log(),
            server.log()
        );
        std::thread::sleep(Duration::from_millis(1));
    }
    client
}

/// Handshakes for `peers`, each from its own UDP socket in `ns`, driven by boringtun's
/// `Tunn` as a client: an initiation, the server's response, and the first (keepalive)
/// data packet, after which the server holds a session for the peer. Returns each answered
/// initiation's round trip in ms (sent → response).
pub(super) fn handshake_peers(ns: &Netns, peers: &[Profile]) -> Vec<f64> {
    ns.run(|| {
        let mut round_trips = Vec::new();
        for (index, peer) in peers.iter().enumerate() {
            let socket = UdpSocket::bind("0.0.0.0:0").expect("bind a peer socket");
            socket
                .set_read_timeout(Some(Duration::from_millis(200)))
                .expect("socket timeout");
            let mut tunn = Tunn::new(
                StaticSecret::from(key_bytes(&peer.private_key)),
                PublicKey::from(key_bytes(&peer.server_public_key)),
                Some(key_bytes(&peer.preshared_key)),
                None,
                index as u32,
                None,
            );
            let deadline = Instant::now() + HANDSHAKE_TIMEOUT;
            let (mut packet, mut reply) = ([0u8; 256], [0u8; 256]);
            loop {
                assert!(
                    Instant::now() < deadline,
                    "peer {index}: no handshake with {} within {HANDSHAKE_TIMEOUT:?}",
                    peer.endpoint
                );
                let TunnResult::WriteToNetwork(initiation) =
                    tunn.format_handshake_initiation(&mut packet, true)
                else {
                    panic!("boringtun made no handshake initiation");
                };
                let sent = Instant::now();
                socket
                    .send_to(initiation, peer.endpoint)
                    .expect("send an initiation");
                let Ok((length, _)) = socket.recv_from(&mut reply) else {
                    continue;
                };
                let round_trip = sent.elapsed();
                if let TunnResult::WriteToNetwork(keepalive) =
                    tunn.decapsulate(Some(peer.endpoint.ip()), &reply[..length], &mut packet)
                {
                    socket.send_to(keepalive, peer.endpoint).expect("send");
                    round_trips.push(round_trip.as_secs_f64() * 1000.0);
                    break;
                }
            }
        }
        round_trips
    })
}

/// The wg-quick profile of a new client NAME of the Dockvpn serving the state directory
/// `state`, its Endpoint the SI's right address.
fn issue_profile(chain: &Chain, state: &Path, name: &str) -> Profile {
    dockvpn_cli(&chain.si, state, &["client", "add", name]);
    let remote = format!("{SI_RIGHT}:{DOCKVPN_PORT}");
    let args = [
        "client",
        "config",
        name,
        "--format",
        "wireguard",
        "--remote",
        &remote,
    ];
    Profile::parse(&dockvpn_cli(&chain.si, state, &args))
}

/// `wg genkey` and its `wg pubkey`.
fn key_pair() -> (String, String) {
    let generated = Command::new("wg")
        .arg("genkey")
        .output()
        .expect("wg genkey");
    let private = String::from_utf8_lossy(&generated.stdout).trim().to_owned();
    let mut pubkey = Command::new("wg")
        .arg("pubkey")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("wg pubkey");
    use std::io::Write;
    pubkey
        .stdin
        .take()
        .expect("stdin")
        .write_all(private.as_bytes())
        .expect("write to wg pubkey");
    let output = pubkey.wait_with_output().expect("wg pubkey");
    (
        private,
        String::from_utf8_lossy(&output.stdout).trim().to_owned(),
    )
}

/// A `wireguard-go` server in the SI on WIREGUARD_GO_PORT that knows `clients` (each at
/// the address its profile gives), with the left gateway routing its network back.
fn start_wireguard_go_server(chain: &Chain, private_key: &str, clients: &[Profile]) -> WireguardGo {
    let server = WireguardGo::start(&chain.si);
    let mut config =
        format!("[Interface]\nPrivateKey = {private_key}\nListenPort = {WIREGUARD_GO_PORT}\n");
    for client in clients {
        config += &format!(
            "\n[Peer]\nPublicKey = {}\nPresharedKey = {}\nAllowedIPs = {}\n",
            client.public_key(),
            client.preshared_key,
            client.address
        );
    }
    server.set_config(&config);
    server.up(&chain.si, &format!("{WIREGUARD_GO_SERVER}/24"));
    chain.si.set_sysctl("net.ipv4.ip_forward", 1);
    chain
        .left_gateway
        .ip(&["route", "replace", WIREGUARD_GO_NET, "via", SI_LEFT]);
    server
}

/// How many of Dockvpn's WireGuard clients have completed a handshake, from `status --json`.
pub(super) fn dockvpn_peers_handshaken(status: &serde_json::Value) -> usize {
    status["vpn"]["clients"].as_array().map_or(0, |clients| {
        clients
            .iter()
            .filter(|c| c["transport"] == "wireguard" && c["latest_handshake_unix"].is_u64())
            .count()
    })
}

/// ChaCha20-Poly1305 seal throughput of one core, GB/s (ring, SEAL_PACKET-byte packets).
pub(super) fn chacha20_poly1305_seal_gbps() -> f64 {
    aead_seal_gbps(&ring::aead::CHACHA20_POLY1305, SEAL_PACKET, SEAL_SAMPLE)
}

/// `median (min-max)` of `values`, two decimals.
fn spread(values: &[f64]) -> String {
    let (min, max) = min_max(values);
    format!("{:.2} ({min:.2}-{max:.2})", median(&mut values.to_vec()))
}

/// The WireGuard contenders: one client and PEERS more of the Dockvpn serving `state`, and
/// a `wireguard-go` server in the SI that knows the same clients (their keys and preshared
/// keys) under its own key and tunnel network, with the profiles that reach it.
pub(super) struct Contenders {
    pub client: Profile,
    pub peers: Vec<Profile>,
    pub go_client: Profile,
    pub go_peers: Vec<Profile>,
    pub go_server: WireguardGo,
}

impl Contenders {
    pub fn start(chain: &Chain, state: &Path) -> Contenders {
        let client = issue_profile(chain, state, "wgbench");
        let peers: Vec<Profile> = (1..=PEERS)
            .map(|k| issue_profile(chain, state, &format!("wgpeer{k}")))
            .collect();
        let (server_private, server_public) = key_pair();
        let go_address = |k: usize| format!("10.20.0.{}/32", k + 2);
        let mut go_client = client.for_server(&server_public, WIREGUARD_GO_PORT, &go_address(0));
        // As in Dockvpn's profile: the server's own tunnel address is reached through the tunnel.
        go_client
            .allowed_ips
            .push(format!("{WIREGUARD_GO_SERVER}/32"));
        let go_peers: Vec<Profile> = peers
            .iter()
            .enumerate()
            .map(|(k, p)| p.for_server(&server_public, WIREGUARD_GO_PORT, &go_address(k + 1)))
            .collect();
        let all_go_clients: Vec<Profile> = std::iter::once(go_client.clone())
            .chain(go_peers.iter().cloned())
            .collect();
        let go_server = start_wireguard_go_server(chain, &server_private, &all_go_clients);
        Contenders {
            client,
            peers,
            go_client,
            go_peers,
            go_server,
        }
    }
}

pub fn rows(chain: &Chain, dockvpn: &Vnf) {
    let Contenders {
        client,
        peers,
        go_client,
        go_peers,
        go_server,
    } = Contenders::start(chain, dockvpn.state_dir());

    let idle_rss = [rss_kib(dockvpn.pid()), rss_kib(go_server.process.pid())];
    let dockvpn_round_trips = handshake_peers(&chain.right_host, &peers);
    let _ = wait_for_status(&chain.si, dockvpn, "20 WireGuard handshakes", |status| {
        dockvpn_peers_handshaken(status) >= PEERS
    });
    let go_round_trips = handshake_peers(&chain.right_host, &go_peers);
    assert_eq!(go_server.peers_handshaken(), PEERS, "wireguard-go's peers");
    let peers_rss = [rss_kib(dockvpn.pid()), rss_kib(go_server.process.pid())];

    let contenders = [(&client, dockvpn), (&go_client, &go_server.process)];
    let mut handshake_ms = [Vec::new(), Vec::new()];
    for round in 0..HANDSHAKE_ROUNDS {
        for k in round_order(round, contenders.len()) {
            let (profile, server) = contenders[k];
            let started = Instant::now();
            let wireguard_client = start_client(&chain.right_host, profile, server);
            handshake_ms[k].push(started.elapsed().as_secs_f64() * 1000.0);
            assert!(
                ping(&chain.right_host, LEFT_HOST),
                "round {round}: no traffic through the WireGuard tunnel to {}",
                profile.endpoint
            );
            drop(wireguard_client);
        }
    }
    let mut transfers: [Vec<(f64, f64)>; 2] = Default::default();
    for round in 0..TRANSFER_ROUNDS {
        for k in round_order(round, contenders.len()) {
            let (profile, server) = contenders[k];
            let wireguard_client = start_client(&chain.right_host, profile, server);
            transfers[k].push(tunnel_transfer(chain, server.pid()));
            drop(wireguard_client);
        }
    }
    let seal_gbps: Vec<f64> = (0..3).map(|_| chacha20_poly1305_seal_gbps()).collect();
    let seal_median = median(&mut seal_gbps.clone());

    let row = |label: &str, dockvpn: String, wireguard_go: String| {
        println!("{label:<46}{dockvpn:>22}  {wireguard_go:>22}");
    };
    println!(
        "WireGuard: the same wireguard-go client against Dockvpn and a wireguard-go server in the SI; median (min-max)"
    );
    row("", "Dockvpn".into(), "wireguard-go server".into());
    row(
        &format!("client start to handshake ms, {HANDSHAKE_ROUNDS} starts"),
        spread(&handshake_ms[0]),
        spread(&handshake_ms[1]),
    );
    row(
        &format!("handshake round trip ms, {PEERS} boringtun peers"),
        spread(&dockvpn_round_trips),
        spread(&go_round_trips),
    );
    let column = |k: usize, pick: fn(&(f64, f64)) -> f64| {
        spread(&transfers[k].iter().map(pick).collect::<Vec<_>>())
    };
    let transfers_label = format!("{TRANSFER_ROUNDS} x {TRANSFER_SECONDS} s iperf3 TCP");
    row(
        &format!("{transfers_label}: Gbit/s"),
        column(0, |t| t.0),
        column(1, |t| t.0),
    );
    row(
        &format!("{transfers_label}: server CPU s/GB"),
        column(0, |t| t.1),
        column(1, |t| t.1),
    );
    let mib = |kib: u64| format!("{:.1}", kib as f64 / 1024.0);
    row("server RSS MiB, idle", mib(idle_rss[0]), mib(idle_rss[1]));
    row(
        &format!("server RSS MiB, {PEERS} peers handshaken"),
        mib(peers_rss[0]),
        mib(peers_rss[1]),
    );
    println!(
        "ChaCha20-Poly1305 seal, one core (ring, {SEAL_PACKET} B in place): {} GB/s = {:.2} s/GB",
        spread(&seal_gbps),
        1.0 / seal_median
    );
    let middle = |k: usize, pick: fn(&(f64, f64)) -> f64| {
        median(&mut transfers[k].iter().map(pick).collect::<Vec<_>>())
    };
    let (gbps, cpu) = (
        [middle(0, |t| t.0), middle(1, |t| t.0)],
        [middle(0, |t| t.1), middle(1, |t| t.1)],
    );
    println!(
        "Dockvpn / wireguard-go: throughput {:.2}, server CPU per GB {:.2}",
        gbps[0] / gbps[1],
        cpu[0] / cpu[1]
    );
    println!(
        "sealing alone as a share of the server's CPU per GB: Dockvpn {:.0} %, wireguard-go {:.0} %",
        100.0 / seal_median / cpu[0],
        100.0 / seal_median / cpu[1]
    );
}

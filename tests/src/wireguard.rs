//! WireGuard peers from Debian: `wireguard-go` (userspace; this kernel has no WireGuard
//! module) run as a child process in a namespace, configured with `wg setconf` and `ip` from a
//! wg-quick profile, as `wg-quick up` would do it.

use std::net::UdpSocket;
use std::path::PathBuf;
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use boringtun::noise::{Tunn, TunnResult};
use boringtun::x25519::{PublicKey, StaticSecret};

use crate::chain::SI_RIGHT;
use crate::netns::run_checked;
use crate::openvpn::{issue_profile, issue_profile_with, OpenvpnClient};
use crate::prereq::require_command;
use crate::{Chain, Netns, Vnf};

/// Dockvpn's default WireGuard port.
pub const WIREGUARD_PORT: u16 = 51820;

/// How long a first handshake may take: one initiation, or a second one after a cookie
/// reply (REKEY_TIMEOUT is 5 s), on a shared machine.
pub const HANDSHAKE_WITHIN: Duration = Duration::from_secs(15);

/// WireGuard message type 3: the reply a server under load sends instead of a handshake
/// response, asking for the initiation again with a MAC over the cookie.
const COOKIE_REPLY: u8 = 3;

/// `[Interface]` keys `wg setconf` understands; wg-quick's own keys (Address, DNS, MTU, …)
/// are applied with `ip` or left out.
const WG_INTERFACE_KEYS: &[&str] = &["PrivateKey", "ListenPort", "FwMark"];

pub fn require_wireguard_tools() {
    // A plain install pulls in a kernel image through the recommends.
    for command in ["wireguard-go", "wg"] {
        require_command(
            command,
            "--no-install-recommends wireguard-go wireguard-tools",
        );
    }
}

/// One section of a wg-quick profile: its `Key = Value` lines, in order.
#[derive(Debug, Clone, Default)]
pub struct Section {
    pub entries: Vec<(String, String)>,
}

impl Section {
    /// Every value of `key` (AllowedIPs and Address may come on several lines), each
    /// comma-separated item apart.
    pub fn values(&self, key: &str) -> Vec<String> {
        self.entries
            .iter()
            .filter(|(k, _)| k.eq_ignore_ascii_case(key))
            .flat_map(|(_, v)| v.split(',').map(|item| item.trim().to_owned()))
            .filter(|item| !item.is_empty())
            .collect()
    }

    pub fn value(&self, key: &str) -> Option<String> {
        self.values(key).into_iter().next()
    }
}

/// A wg-quick profile: one `[Interface]`, its `[Peer]`s.
#[derive(Debug, Clone, Default)]
pub struct Profile {
    pub interface: Section,
    pub peers: Vec<Section>,
}

impl Profile {
    /// Parses the profile text; panics naming the line it cannot read.
    pub fn parse(text: &str) -> Profile {
        let mut profile = Profile::default();
        let mut current: Option<&mut Section> = None;
        for line in text.lines() {
            let line = line.split('#').next().unwrap_or_default().trim();
            if line.is_empty() {
                continue;
            }
            if line.eq_ignore_ascii_case("[Interface]") {
                current = Some(&mut profile.interface);
            } else if line.eq_ignore_ascii_case("[Peer]") {
                profile.peers.push(Section::default());
                current = profile.peers.last_mut();
            } else {
                let (key, value) = line
                    .split_once('=')
                    .unwrap_or_else(|| panic!("not `Key = Value`: {line:?} in\n{text}"));
                current
                    .as_mut()
                    .unwrap_or_else(|| panic!("{line:?} before any section in\n{text}"))
                    .entries
                    .push((key.trim().to_owned(), value.trim().to_owned()));
            }
        }
        profile
    }

    /// The only peer (a client profile has one: the server).
    pub fn peer(&self) -> &Section {
        assert_eq!(self.peers.len(), 1, "one [Peer] expected: {self:?}");
        &self.peers[0]
    }

    /// The profile for `wg setconf`: wg's own keys only, the Endpoint replaced when given.
    fn wg_config(&self, endpoint: Option<&str>) -> String {
        let mut config = String::from("[Interface]\n");
        for (key, value) in &self.interface.entries {
            if WG_INTERFACE_KEYS
                .iter()
                .any(|k| k.eq_ignore_ascii_case(key))
            {
                config += &format!("{key} = {value}\n");
            }
        }
        for peer in &self.peers {
            config += "\n[Peer]\n";
            for (key, value) in &peer.entries {
                match endpoint {
                    Some(_) if key.eq_ignore_ascii_case("Endpoint") => {}
                    _ => config += &format!("{key} = {value}\n"),
                }
            }
            if let Some(endpoint) = endpoint {
                config += &format!("Endpoint = {endpoint}\n");
            }
        }
        config
    }
}

/// The SI's right address and Dockvpn's WireGuard port: the Endpoint a client on the right
/// uses.
pub fn endpoint() -> String {
    format!("{SI_RIGHT}:{WIREGUARD_PORT}")
}

/// `dockvpn client add NAME`, then its wg-quick profile.
pub fn wireguard_profile(si: &Netns, dockvpn: &Vnf, name: &str) -> String {
    issue_profile_with(si, dockvpn, name, &["--format", "wireguard"])
}

/// A wireguard-go client in `ns` with a fresh profile for `name`, once its first handshake
/// completed.
pub fn connected_client(ns: &Netns, si: &Netns, dockvpn: &Vnf, name: &str) -> WireguardClient {
    let profile = wireguard_profile(si, dockvpn, name);
    let client = WireguardClient::start(ns, &profile, Some(&endpoint()));
    client.assert_handshake(&dockvpn.log());
    client
}

/// One client of each transport, both connected: a stock OpenVPN client ("olga") in the
/// right host, and a wireguard-go client ("wanda") in the right gateway, a second remote
/// site (`vpn_chain` removed its direct route to the left too).
pub fn clients_of_both_transports(
    chain: &Chain,
    dockvpn: &Vnf,
) -> (OpenvpnClient, WireguardClient) {
    let openvpn = OpenvpnClient::start(
        &chain.right_host,
        &issue_profile(&chain.si, dockvpn, "olga", None),
        &[],
    );
    openvpn.assert_connected(dockvpn);
    let wireguard = connected_client(&chain.right_gateway, &chain.si, dockvpn, "wanda");
    (openvpn, wireguard)
}

/// A key pair from the stock tool: (private, public), base64.
pub fn genkey() -> (String, String) {
    require_wireguard_tools();
    let private = run_checked(Command::new("wg").arg("genkey"))
        .trim()
        .to_owned();
    let public = pubkey(&private);
    (private, public)
}

/// `wg pubkey` of a base64 private key.
pub fn pubkey(private: &str) -> String {
    use std::io::Write;
    let mut child = Command::new("wg")
        .arg("pubkey")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("run wg pubkey");
    child
        .stdin
        .take()
        .expect("piped stdin")
        .write_all(format!("{private}\n").as_bytes())
        .expect("write to wg pubkey");
    let output = child.wait_with_output().expect("wg pubkey");
    assert!(output.status.success(), "wg pubkey failed");
    String::from_utf8_lossy(&output.stdout).trim().to_owned()
}

/// A wireguard-go interface in a namespace, configured from a wg-quick profile: the
/// process is killed (and the interface gone) on drop.
pub struct WireguardClient {
    /// Interface names are global here: wireguard-go's control socket is
    /// /var/run/wireguard/NAME.sock, outside any namespace.
    pub interface: String,
    process: Vnf,
    ns_name: String,
}

impl WireguardClient {
    /// `wireguard-go -f IF` in `ns`, then `wg setconf` with the profile (its Endpoint
    /// replaced by `endpoint` when given), the profile's addresses, the link up, and one
    /// route per AllowedIPs entry through the interface.
    pub fn start(ns: &Netns, profile: &str, endpoint: Option<&str>) -> WireguardClient {
        require_wireguard_tools();
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let interface = format!(
            "wg{}n{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        // One a killed process left under a reused pid would pass for ready.
        let _ = std::fs::remove_file(control_socket(&interface));
        let mut command = ns.command("wireguard-go");
        command
            .args(["-f", &interface])
            .env("WG_I_PREFER_BUGGY_USERSPACE_TO_POLISHED_KMOD", "1");
        let client = WireguardClient {
            process: Vnf::spawn(command),
            interface,
            ns_name: ns.name().to_owned(),
        };
        client.wait_for_control_socket();
        let profile = Profile::parse(profile);
        let config_file = std::env::temp_dir().join(format!("docknfv-{}.conf", client.interface));
        std::fs::write(&config_file, profile.wg_config(endpoint)).expect("write the wg config");
        let set = client.wg(&["setconf", &client.interface, config_file.to_str().unwrap()]);
        let _ = std::fs::remove_file(&config_file);
        assert!(
            set.status.success(),
            "wg setconf: {}",
            crate::openvpn::text(&set)
        );
        for address in profile.interface.values("Address") {
            ns.ip(&["address", "add", &address, "dev", &client.interface]);
        }
        ns.ip(&["link", "set", &client.interface, "up"]);
        for peer in &profile.peers {
            for allowed in peer.values("AllowedIPs") {
                ns.ip(&["route", "replace", &allowed, "dev", &client.interface]);
            }
        }
        client
    }

    /// wireguard-go creates the tun, then the control socket `wg` talks to.
    fn wait_for_control_socket(&self) {
        let socket = control_socket(&self.interface);
        let deadline = Instant::now() + Duration::from_secs(10);
        while !socket.exists() {
            assert!(
                Instant::now() < deadline,
                "wireguard-go made no {} within 10 s; its log:\n{}",
                socket.display(),
                self.process.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// `wg ARGS` in the client's namespace, whatever its exit status.
    fn wg(&self, args: &[&str]) -> std::process::Output {
        Command::new("ip")
            .args(["netns", "exec", &self.ns_name, "wg"])
            .args(args)
            .output()
            .expect("run wg")
    }

    /// `wg show IF WHAT`: one line per peer, "PUBLIC_KEY\tVALUE…".
    fn show(&self, what: &str) -> Vec<Vec<String>> {
        let output = self.wg(&["show", &self.interface, what]);
        assert!(
            output.status.success(),
            "wg show {} {what}: {}\nwireguard-go:\n{}",
            self.interface,
            crate::openvpn::text(&output),
            self.process.log()
        );
        String::from_utf8_lossy(&output.stdout)
            .lines()
            .map(|line| line.split_whitespace().map(str::to_owned).collect())
            .collect()
    }

    /// The first peer's latest handshake, unix seconds; 0 for none yet.
    pub fn latest_handshake(&self) -> u64 {
        self.show("latest-handshakes")
            .first()
            .and_then(|fields| fields.get(1)?.parse().ok())
            .unwrap_or(0)
    }

    /// Waits until a handshake newer than `after` (unix seconds) completed; its time.
    pub fn wait_for_handshake_after(&self, after: u64, timeout: Duration) -> Result<u64, String> {
        let deadline = Instant::now() + timeout;
        loop {
            let latest = self.latest_handshake();
            if latest > after {
                return Ok(latest);
            }
            if Instant::now() >= deadline {
                return Err(format!(
                    "no WireGuard handshake on {} within {timeout:?} (latest {latest})",
                    self.interface
                ));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Waits for the first handshake; panics with `server_log` when none completes.
    pub fn assert_handshake(&self, server_log: &str) -> u64 {
        self.wait_for_handshake_after(0, HANDSHAKE_WITHIN)
            .unwrap_or_else(|e| panic!("{e}\nserver:\n{server_log}"))
    }

    /// Bytes (received, sent) with the first peer, as wireguard-go counts them.
    pub fn transfer(&self) -> (u64, u64) {
        let peers = self.show("transfer");
        let field = |index: usize| {
            peers
                .first()
                .and_then(|fields| fields.get(index)?.parse().ok())
                .unwrap_or(0)
        };
        (field(1), field(2))
    }

    pub fn listen_port(&self) -> u16 {
        self.show("listen-port")
            .first()
            .and_then(|fields| fields.first()?.parse().ok())
            .expect("wg show listen-port")
    }

    /// Rebinds the client's UDP socket: its next packets come from `port`, as after a NAT
    /// rebinding or a move to another network.
    pub fn set_listen_port(&self, port: u16) {
        let set = self.wg(&["set", &self.interface, "listen-port", &port.to_string()]);
        assert!(
            set.status.success(),
            "wg set listen-port: {}",
            crate::openvpn::text(&set)
        );
    }

    /// The client's routes through its interface that the profile added (not the kernel's
    /// connected route for its own address), as sorted destinations.
    pub fn routes(&self, ns: &Netns) -> Vec<String> {
        let json = ns.ip(&["-j", "-4", "route", "show", "dev", &self.interface]);
        let routes: Vec<serde_json::Value> = serde_json::from_str(&json).expect("ip -j output");
        let mut routes: Vec<String> = routes
            .iter()
            .filter(|route| route["protocol"] != "kernel")
            .filter_map(|route| route["dst"].as_str().map(str::to_owned))
            .collect();
        routes.sort();
        routes
    }

    pub fn log(&self) -> String {
        self.process.log()
    }
}

impl Drop for WireguardClient {
    /// The process is killed next (`Vnf`'s drop), which leaves its control socket behind.
    fn drop(&mut self) {
        let _ = std::fs::remove_file(control_socket(&self.interface));
    }
}

/// wireguard-go's control socket for `interface`: its path is global, not per namespace.
fn control_socket(interface: &str) -> PathBuf {
    PathBuf::from(format!("/var/run/wireguard/{interface}.sock"))
}

/// What a flood of forged handshake initiations got back.
#[derive(Debug, Default, Clone, Copy)]
pub struct FloodReport {
    pub sent: u64,
    /// Cookie replies: the server was under load and asked for proof of the source address.
    pub cookie_replies: u64,
    /// Any other answer (a handshake response would mean the forged key was accepted).
    pub other_replies: u64,
}

/// Sends `count` handshake initiations from a fresh random key to `server` (whose public key
/// is `server_public`, base64), from a UDP socket in `ns`, about `per_second` of them a
/// second, and counts what comes back. The initiations are real (boringtun's, with a valid
/// mac1), so the server must do the costly part of checking each unless it asks for cookies.
pub fn flood_forged_initiations(
    ns: &Netns,
    server: std::net::SocketAddr,
    server_public: &str,
    count: u64,
    per_second: u64,
) -> FloodReport {
    use base64::Engine;
    const TICK: Duration = Duration::from_millis(10);
    let public: [u8; 32] = base64::engine::general_purpose::STANDARD
        .decode(server_public)
        .ok()
        .and_then(|bytes| bytes.try_into().ok())
        .unwrap_or_else(|| panic!("not a WireGuard public key: {server_public:?}"));
    let mut forged = [0u8; 32];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut random| std::io::Read::read_exact(&mut random, &mut forged))
        .expect("read /dev/urandom");
    let mut tunnel = Tunn::new(
        StaticSecret::from(forged),
        PublicKey::from(public),
        None,
        None,
        0,
        None,
    );
    let socket = ns.run(|| UdpSocket::bind("0.0.0.0:0").expect("bind the flood socket"));
    socket.connect(server).expect("connect the flood socket");
    socket.set_nonblocking(true).expect("nonblocking");
    let per_tick = (per_second / 100).max(1);
    let mut report = FloodReport::default();
    let mut packet = [0u8; 256];
    let mut reply = [0u8; 256];
    let mut drain = |report: &mut FloodReport| {
        while let Ok(length) = socket.recv(&mut reply) {
            match reply[..length].first() {
                Some(&COOKIE_REPLY) => report.cookie_replies += 1,
                _ => report.other_replies += 1,
            }
        }
    };
    while report.sent < count {
        let tick = Instant::now() + TICK;
        for _ in 0..per_tick.min(count - report.sent) {
            if let TunnResult::WriteToNetwork(initiation) =
                tunnel.format_handshake_initiation(&mut packet, true)
            {
                // A full socket buffer drops the datagram, as a congested link would.
                let _ = socket.send(initiation);
            }
            report.sent += 1;
        }
        drain(&mut report);
        // Paces the flood so that it lasts while a real client handshakes beside it.
        std::thread::sleep(tick.saturating_duration_since(Instant::now()));
    }
    drain(&mut report);
    report
}

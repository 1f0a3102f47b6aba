//! The stock OpenVPN 2.6 client from Debian, run as a process in a namespace with a profile
//! Dockvpn generated.

use std::path::PathBuf;
use std::process::Output;
use std::time::Duration;

use crate::chain::LEFT_HOST_NET;
use crate::dnsmasq::Dnsmasq;
use crate::prereq::require_command;
use crate::{Chain, Netns, Vnf};

pub const CONNECTED: &str = "Initialization Sequence Completed";

pub struct OpenvpnClient {
    pub process: Vnf,
    profile: PathBuf,
}

impl OpenvpnClient {
    /// `openvpn --config PROFILE EXTRA…` in `ns`, logging to the captured stderr.
    pub fn start(ns: &Netns, profile: &str, extra: &[&str]) -> OpenvpnClient {
        require_command("openvpn", "openvpn");
        static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let path = std::env::temp_dir().join(format!(
            "docknfv-{}-{}.ovpn",
            std::process::id(),
            NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
        ));
        std::fs::write(&path, profile).expect("write the profile");
        let mut command = ns.command("openvpn");
        command
            .arg("--config")
            .arg(&path)
            .args(["--log-append", "/dev/stderr", "--connect-retry-max", "3"])
            .args(extra);
        OpenvpnClient {
            process: Vnf::spawn(command),
            profile: path,
        }
    }

    /// Waits for "Initialization Sequence Completed"; the client's log on failure.
    pub fn wait_connected(&self) -> Result<(), String> {
        self.process
            .wait_for_log(CONNECTED, Duration::from_secs(30))
            .map(drop)
    }

    /// Waits for "Initialization Sequence Completed"; panics with the client's and the
    /// server's log when it does not come.
    pub fn assert_connected(&self, server: &Vnf) {
        self.wait_connected()
            .unwrap_or_else(|e| panic!("{e}\nserver:\n{}", server.log()));
    }

    pub fn log(&self) -> String {
        self.process.log()
    }
}

impl Drop for OpenvpnClient {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.profile);
    }
}

/// The chain with Dockvpn running (pushing LEFT_HOST_NET) and the right side's direct path
/// to the left removed, so only the tunnel leads there.
pub fn vpn_chain(extra: &[&str]) -> (Chain, Vnf) {
    let chain = Chain::new();
    chain.right_gateway.ip(&["route", "del", LEFT_HOST_NET]);
    let dockvpn = start_serving(&chain, &[], extra);
    (chain, dockvpn)
}

/// A network dnsmasq announces by option 121 in `learned_routes_chain`, behind nothing real:
/// it only has to show up among the pushed routes.
pub const LEARNED_NETWORK: &str = "172.16.5.0/24";

/// The chain with the SI's left address and routes from a real dnsmasq on the left gateway
/// (option 121: LEFT_HOST_NET and LEARNED_NETWORK via the left gateway, and a default route,
/// which Dockvpn does not push), the right side's direct path to the left removed, and
/// `dockvpn run --dhcp left` serving the learned routes.
pub fn learned_routes_chain() -> (Chain, Dnsmasq, Vnf) {
    learned_routes_chain_with(&format!(
        "{LEFT_HOST_NET},10.0.1.1,{LEARNED_NETWORK},10.0.1.1,0.0.0.0/0,10.0.1.1"
    ))
}

/// dnsmasq's options for the left side: option 121 with `routes` ("NET,GATEWAY,…") and the
/// left gateway as router.
pub fn left_dhcp_options(routes: &str) -> Vec<String> {
    vec![
        format!("option:classless-static-route,{routes}"),
        "option:router,10.0.1.1".to_owned(),
    ]
}

/// `learned_routes_chain` with other option-121 routes (they must include LEFT_HOST_NET);
/// the lease is two minutes, dnsmasq's least, so a `reload` reaches Dockvpn at the renewal.
pub fn learned_routes_chain_with(routes: &str) -> (Chain, Dnsmasq, Vnf) {
    let chain = Chain::new();
    chain.si.ip(&["addr", "flush", "dev", "eth0"]);
    chain.right_gateway.ip(&["route", "del", LEFT_HOST_NET]);
    let options = left_dhcp_options(routes);
    let dnsmasq = Dnsmasq::start(
        &chain.left_gateway,
        "wan",
        "10.0.1.50,10.0.1.99,255.255.255.0,2m",
        &options.iter().map(String::as_str).collect::<Vec<_>>(),
    );
    let dockvpn = Vnf::start(
        &chain.si,
        "dockvpn",
        &["run", "--dhcp", "left", "--side-timeout", "30"],
    );
    dockvpn.wait_ready();
    // With --dhcp the server serves only once the lease (and so its routes) is there.
    let listening = dockvpn
        .wait_for_log("VPN server listening", Duration::from_secs(10))
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(listening.contains(LEFT_HOST_NET), "{listening}");
    (chain, dnsmasq, dockvpn)
}

/// `dockvpn GLOBAL… run --left-route LEFT_HOST_NET EXTRA…` in the SI, once listening.
fn start_serving(chain: &Chain, global: &[&str], extra: &[&str]) -> Vnf {
    let mut args = global.to_vec();
    args.extend(["run", "--left-route", LEFT_HOST_NET]);
    args.extend(extra);
    let dockvpn = Vnf::start(&chain.si, "dockvpn", &args);
    dockvpn.wait_ready();
    dockvpn
        .wait_for_log("VPN server listening", Duration::from_secs(10))
        .unwrap_or_else(|e| panic!("{e}"));
    dockvpn
}

/// `dockvpn status --json` against this VNF's state directory.
pub fn status_json(si: &Netns, dockvpn: &Vnf) -> serde_json::Value {
    let output = dockvpn.cli(si, "dockvpn", &["status", "--json"]);
    serde_json::from_slice(&output.stdout).unwrap_or_else(|e| panic!("{e}: {}", text(&output)))
}

/// `status --json` once `ready` holds for it: the server rewrites it every 2 s, so a client
/// that just connected or moved shows up within a few seconds (waits up to 10 s).
pub fn wait_for_status(
    si: &Netns,
    dockvpn: &Vnf,
    what: &str,
    ready: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let status = status_json(si, dockvpn);
        if ready(&status) {
            return status;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "status never showed {what} within 10 s: {status}\nserver:\n{}",
            dockvpn.log()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// `dockvpn client add NAME` then `client config NAME [--remote …]`: the profile text.
pub fn issue_profile(si: &Netns, dockvpn: &Vnf, name: &str, remote: Option<&str>) -> String {
    let remote: Vec<&str> = remote.map_or(vec![], |remote| vec!["--remote", remote]);
    issue_profile_with(si, dockvpn, name, &remote)
}

/// `dockvpn client add NAME` then `client config NAME CONFIG_ARGS…`: the profile text.
pub fn issue_profile_with(si: &Netns, dockvpn: &Vnf, name: &str, config_args: &[&str]) -> String {
    let added = dockvpn.cli(si, "dockvpn", &["client", "add", name]);
    assert!(added.status.success(), "client add: {}", text(&added));
    let mut args = vec!["client", "config", name];
    args.extend(config_args);
    let config = dockvpn.cli(si, "dockvpn", &args);
    assert!(config.status.success(), "client config: {}", text(&config));
    String::from_utf8(config.stdout).expect("utf-8 profile")
}

/// `dockvpn --state-dir STATE ARGS…` in `ns`.
pub fn dockvpn_output(ns: &Netns, state: &std::path::Path, args: &[&str]) -> Output {
    ns.command(crate::vnf::binary("dockvpn").to_str().expect("utf-8 path"))
        .arg("--state-dir")
        .arg(state)
        .args(args)
        .output()
        .expect("run dockvpn")
}

/// `dockvpn --state-dir STATE ARGS…` in `ns`; its stdout (panics on failure).
pub fn dockvpn_cli(ns: &Netns, state: &std::path::Path, args: &[&str]) -> String {
    let output = dockvpn_output(ns, state, args);
    assert!(output.status.success(), "{args:?}: {}", text(&output));
    String::from_utf8(output.stdout).expect("utf-8")
}

/// `dockvpn run` on the state directory `state`, serving LEFT_HOST_NET, once listening.
pub fn start_on_state(chain: &Chain, state: &std::path::Path, extra: &[&str]) -> Vnf {
    let state = state.to_str().expect("utf-8 path");
    start_serving(chain, &["--state-dir", state], extra)
}

/// A key from the stock tool: `openvpn ARGS --genkey KIND FILE`, the file's text.
pub fn openvpn_genkey(args: &[&str], kind: &str) -> String {
    require_command("openvpn", "openvpn");
    static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let key_file = std::env::temp_dir().join(format!(
        "docknfv-key-{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    ));
    let generated = std::process::Command::new("openvpn")
        .args(args)
        .args(["--genkey", kind])
        .arg(&key_file)
        .output()
        .expect("openvpn --genkey");
    assert!(generated.status.success(), "{}", text(&generated));
    let key = std::fs::read_to_string(&key_file).expect("read the key");
    let _ = std::fs::remove_file(&key_file);
    key
}

pub fn text(output: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

/// A UDP relay in front of the server that behaves like a hostile network: after every data
/// packet it forwards from the client, it also sends the server a replay of that packet, a
/// truncated copy, a tampered copy, and a datagram of garbage. Runs until dropped.
pub struct HostileRelay {
    pub port: u16,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl HostileRelay {
    pub fn start(ns: &Netns, server: std::net::SocketAddr) -> HostileRelay {
        use std::net::UdpSocket;
        use std::sync::atomic::{AtomicBool, Ordering};
        use std::sync::{Arc, Mutex};
        // Sockets belong to the namespace they were opened in, whatever thread uses them.
        let (client_side, server_side) = ns.run(|| {
            (
                UdpSocket::bind("127.0.0.1:0").expect("bind relay"),
                UdpSocket::bind("0.0.0.0:0").expect("bind relay"),
            )
        });
        let port = client_side.local_addr().expect("addr").port();
        for socket in [&client_side, &server_side] {
            socket
                .set_read_timeout(Some(Duration::from_millis(100)))
                .expect("timeout");
        }
        let stop = Arc::new(AtomicBool::new(false));
        let client: Arc<Mutex<Option<std::net::SocketAddr>>> = Arc::default();
        let upstream = {
            let (from_client, to_server) = (
                client_side.try_clone().unwrap(),
                server_side.try_clone().unwrap(),
            );
            let (stop, client) = (stop.clone(), client.clone());
            std::thread::spawn(move || {
                let mut buffer = [0u8; 65536];
                let mut garbage_seed = 0x1234_5678u32;
                while !stop.load(Ordering::Relaxed) {
                    let Ok((len, from)) = from_client.recv_from(&mut buffer) else {
                        continue;
                    };
                    *client.lock().unwrap() = Some(from);
                    let packet = &buffer[..len];
                    let _ = to_server.send_to(packet, server);
                    if packet[0] >> 3 != 9 {
                        continue;
                    }
                    let _ = to_server.send_to(packet, server);
                    let _ = to_server.send_to(&packet[..len.min(12)], server);
                    let mut tampered = packet.to_vec();
                    *tampered.last_mut().unwrap() ^= 0x01;
                    let _ = to_server.send_to(&tampered, server);
                    let garbage: Vec<u8> = (0..64)
                        .map(|_| {
                            garbage_seed = garbage_seed
                                .wrapping_mul(1_103_515_245)
                                .wrapping_add(12_345);
                            (garbage_seed >> 16) as u8
                        })
                        .collect();
                    let _ = to_server.send_to(&garbage, server);
                }
            })
        };
        let downstream = {
            let stop = stop.clone();
            std::thread::spawn(move || {
                let mut buffer = [0u8; 65536];
                while !stop.load(Ordering::Relaxed) {
                    let Ok((len, _)) = server_side.recv_from(&mut buffer) else {
                        continue;
                    };
                    if let Some(client) = *client.lock().unwrap() {
                        let _ = client_side.send_to(&buffer[..len], client);
                    }
                }
            })
        };
        HostileRelay {
            port,
            stop,
            threads: vec![upstream, downstream],
        }
    }
}

impl Drop for HostileRelay {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        for thread in self.threads.drain(..) {
            let _ = thread.join();
        }
    }
}

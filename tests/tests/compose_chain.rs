//! compose/ brought up for real with `compose/chain.sh up` (Debian's docker-compose 1.29, or
//! Compose v2 when the plugin is there): the hosts reach each other through the Dockwall SI,
//! a rule edited with `docker exec` takes effect, Dockvpn learns its option-121 route from
//! the dnsmasq service, and a stock openvpn client and a wg-quick (wireguard-go) client on the
//! right network reach the network behind the left host through it. The chain's Prometheus
//! scrapes both SIs on the management network and sees the packets a deny rule dropped.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use docknfv_tests::compose::ComposeChain;
use docknfv_tests::docker::{DockerClient, HOST_IMAGE};
use docknfv_tests::netns::run_checked;
use docknfv_tests::openvpn::CONNECTED;

/// Without dashes: docker-compose 1.29 strips them from project names, Compose v2 keeps them.
const PROJECT: &str = "docknfvcomposetest";
const VPN_CLIENT: &str = "docknfvcomposetest-vpn-client";
const WIREGUARD_CLIENT: &str = "docknfvcomposetest-wireguard-client";
/// Dockvpn's right address (compose file) and default WireGuard port.
const DOCKVPN_WIREGUARD: &str = "10.11.2.3:51820";
/// dnsmasq.conf announces it via the left host, which answers on 192.168.77.1.
const BEHIND_LEFT_HOST: &str = "192.168.77.1";
const HEALTHY_WITHIN: Duration = Duration::from_secs(60);
/// Prometheus scrapes every 5 s (compose/prometheus.yml): a few scrapes to see a change.
const SCRAPED_WITHIN: Duration = Duration::from_secs(30);
/// The query compose/README.md gives for Dockwall's per-rule drops.
const DENY_RULE_DROPS: &str = r#"dockwall_rule_packets_total{action="deny"}"#;

/// `docker ARGS`, panicking with its stderr unless it succeeds; its stdout.
fn docker_cli(args: &[&str]) -> String {
    run_checked(Command::new("docker").args(args))
}

/// The compose chain of this test's project with the VPN clients' profiles; the clients
/// and profiles are removed on drop, then the chain is taken down.
struct ComposeTest {
    chain: ComposeChain,
    /// Where the VPN client's profile is written for its bind mount.
    profile: PathBuf,
    /// Where the WireGuard client's wg-quick profile is written for its bind mount.
    wireguard_profile: PathBuf,
}

impl ComposeTest {
    fn up() -> ComposeTest {
        let profile =
            std::env::temp_dir().join(format!("docknfv-compose-{}.ovpn", std::process::id()));
        let wireguard_profile =
            std::env::temp_dir().join(format!("docknfv-compose-{}-wg0.conf", std::process::id()));
        // Clients a killed run left on the chain's network would keep it from going down.
        remove_clients(&profile, &wireguard_profile);
        ComposeTest {
            chain: ComposeChain::up(PROJECT),
            profile,
            wireguard_profile,
        }
    }
}

/// Best effort: it also runs before the clients exist.
fn remove_clients(profile: &Path, wireguard_profile: &Path) {
    let _ = Command::new("docker")
        .args(["rm", "--force", VPN_CLIENT, WIREGUARD_CLIENT])
        .output();
    let _ = std::fs::remove_file(profile);
    let _ = std::fs::remove_file(wireguard_profile);
}

impl std::ops::Deref for ComposeTest {
    type Target = ComposeChain;

    fn deref(&self) -> &ComposeChain {
        &self.chain
    }
}

impl Drop for ComposeTest {
    fn drop(&mut self) {
        remove_clients(&self.profile, &self.wireguard_profile);
    }
}

#[test]
fn compose_chain_routes_through_dockwall_and_dockvpn_serves_its_learned_route() {
    let chain = ComposeTest::up();
    let docker = &chain.docker;
    let dockwall = chain.container("dockwall");
    let dockvpn = chain.container("dockvpn");
    docker.wait_healthy(&dockwall, HEALTHY_WITHIN);
    docker.wait_healthy(&dockvpn, HEALTHY_WITHIN);
    let prometheus = chain.container("prometheus");
    docker.wait_healthy(&prometheus, HEALTHY_WITHIN);
    wait_for_query(
        docker,
        &prometheus,
        "up",
        "both SIs scraped and up",
        |result| {
            ["dockwall", "dockvpn"].iter().all(|job| {
                result
                    .iter()
                    .any(|series| series["metric"]["job"] == *job && sample_value(series) == 1.0)
            })
        },
    );
    let left_host = chain.container("left-host");
    let right_host = chain.container("right-host");

    assert!(
        docker.ping(&left_host, "10.11.2.10"),
        "left host → right host"
    );
    docker.exec_ok(
        &dockwall,
        &["dockwall", "rule", "add", "deny", "--proto", "icmp"],
    );
    assert!(
        !docker.ping(&right_host, "10.11.1.10"),
        "ICMP crossed a deny rule"
    );
    wait_for_query(
        docker,
        &prometheus,
        DENY_RULE_DROPS,
        "the pings rule 1 dropped",
        |result| {
            result
                .iter()
                .any(|series| series["metric"]["rule_id"] == "1" && sample_value(series) >= 1.0)
        },
    );
    docker.exec_ok(&dockwall, &["dockwall", "rule", "delete", "1"]);
    assert!(
        docker.ping(&right_host, "10.11.1.10"),
        "ICMP after the delete"
    );

    // dnsmasq.conf announces 192.168.77.0/24 via the left host.
    let learned = docker.wait_for_output(
        &dockvpn,
        &["dockvpn", "status", "--json"],
        "192.168.77.0/24",
        Duration::from_secs(20),
    );
    if let Err(error) = learned {
        panic!(
            "the option-121 route is not learned: {error}\n{}",
            docker.logs(&dockvpn)
        );
    }

    docker.exec_ok(&dockvpn, &["dockvpn", "client", "add", "alice"]);
    // Over UDP, then over TCP (`proto tcp-client`, for networks that pass only TCP): the
    // server serves both on one port.
    for proto in ["udp", "tcp"] {
        let profile = docker.exec_ok(
            &dockvpn,
            &["dockvpn", "client", "config", "alice", "--proto", proto],
        );
        std::fs::write(&chain.profile, profile).expect("write the profile");
        run_vpn_client(
            VPN_CLIENT,
            &chain.profile,
            "/alice.ovpn",
            &["openvpn", "--config", "/alice.ovpn"],
        );
        if let Err(error) = docker.wait_for_log(VPN_CLIENT, CONNECTED, Duration::from_secs(30)) {
            panic!("{proto}: {error}\nserver:\n{}", docker.logs(&dockvpn));
        }
        assert!(
            docker.ping(VPN_CLIENT, BEHIND_LEFT_HOST),
            "{proto}: the network behind the left host through the tunnel; client routes:\n{}",
            docker.exec(VPN_CLIENT, &["ip", "route"]).1
        );
        // `status` is rewritten every 2 s.
        let shown = format!("\"proto\": \"{proto}\"");
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        loop {
            let status = docker.exec(&dockvpn, &["dockvpn", "status", "--json"]).1;
            if status.contains(&shown) {
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "{proto}: status never showed alice's protocol:\n{status}"
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    // WireGuard from the same SI: the stock wg-quick brings the profile up (falling back to
    // wireguard-go, as there is no kernel module), in a container on the right network.
    docker.exec_ok(&dockvpn, &["dockvpn", "client", "add", "walter"]);
    let profile = docker.exec_ok(
        &dockvpn,
        &[
            "dockvpn",
            "client",
            "config",
            "walter",
            "--format",
            "wireguard",
            "--remote",
            DOCKVPN_WIREGUARD,
        ],
    );
    write_private(&chain.wireguard_profile, &profile);
    run_vpn_client(
        WIREGUARD_CLIENT,
        &chain.wireguard_profile,
        "/etc/wireguard/wg0.conf",
        // Up whatever wg-quick says, so that a failure shows its output below.
        &["sh", "-c", "wg-quick up wg0; exec sleep infinity"],
    );
    // The first ping starts the handshake. The server may not know the new client yet (it
    // re-reads the registry every 2 s): then wireguard-go retries after 5 s.
    let reached = (0..20).any(|_| docker.ping(WIREGUARD_CLIENT, BEHIND_LEFT_HOST));
    assert!(
        reached,
        "WireGuard: the network behind the left host through the tunnel; client:\n{}\n{}\nserver:\n{}",
        docker.logs(WIREGUARD_CLIENT),
        docker.exec(WIREGUARD_CLIENT, &["wg", "show"]).1,
        docker.logs(&dockvpn)
    );
    if let Err(error) = docker.wait_for_output(
        &dockvpn,
        &["dockvpn", "status", "--json"],
        "\"transport\": \"wireguard\"",
        Duration::from_secs(5),
    ) {
        panic!("status never showed the WireGuard client: {error}");
    }
}

/// Prometheus's instant query API, asked from inside its container (busybox `wget`): the
/// result's series (none while Prometheus does not answer yet).
fn prometheus_query(
    docker: &DockerClient,
    prometheus: &str,
    query: &str,
) -> Vec<serde_json::Value> {
    let encoded: String = query
        .bytes()
        .map(|byte| match byte.is_ascii_alphanumeric() || byte == b'_' {
            true => char::from(byte).to_string(),
            false => format!("%{byte:02X}"),
        })
        .collect();
    let url = format!("http://127.0.0.1:9090/api/v1/query?query={encoded}");
    let (code, answer) = docker
        .exec_stdout(prometheus, &["wget", "-q", "-O", "-", &url])
        .unwrap_or_else(|e| panic!("{e}"));
    if code != 0 {
        return Vec::new();
    }
    serde_json::from_str::<serde_json::Value>(&answer)
        .ok()
        .and_then(|answer| answer["data"]["result"].as_array().cloned())
        .unwrap_or_default()
}

/// Asks `query` until `ready` holds for its result, for up to `SCRAPED_WITHIN`.
fn wait_for_query(
    docker: &DockerClient,
    prometheus: &str,
    query: &str,
    what: &str,
    ready: impl Fn(&[serde_json::Value]) -> bool,
) {
    let deadline = std::time::Instant::now() + SCRAPED_WITHIN;
    loop {
        let result = prometheus_query(docker, prometheus, query);
        if ready(&result) {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "Prometheus never showed {what} within {SCRAPED_WITHIN:?}; {query} gave {result:?}\nlog:\n{}",
            docker.logs(prometheus)
        );
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// The value of one series of an instant query ("NaN" when unparsable).
fn sample_value(series: &serde_json::Value) -> f64 {
    series["value"][1]
        .as_str()
        .and_then(|value| value.parse().ok())
        .unwrap_or(f64::NAN)
}

/// `docker run` of a VPN client on the right network (replacing one of that name): the host
/// image with the tun device and `profile` mounted read-only at `mounted_at`, running
/// `command`.
fn run_vpn_client(name: &str, profile: &Path, mounted_at: &str, command: &[&str]) {
    let _ = Command::new("docker")
        .args(["rm", "--force", name])
        .output();
    let network = format!("{PROJECT}_right");
    let volume = format!("{}:{mounted_at}:ro", profile.display());
    let mut args = vec![
        "run",
        "--detach",
        "--init",
        "--name",
        name,
        "--network",
        &network,
        "--cap-add",
        "NET_ADMIN",
        "--device",
        "/dev/net/tun",
        "--volume",
        &volume,
        HOST_IMAGE,
    ];
    args.extend(command);
    docker_cli(&args);
}

/// Writes a profile holding a private key readable by its owner only (wg-quick warns
/// otherwise).
fn write_private(path: &Path, content: &str) {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let _ = std::fs::remove_file(path);
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .and_then(|mut file| file.write_all(content.as_bytes()))
        .unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
}

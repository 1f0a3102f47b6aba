//! compose/ brought up for real with `compose/chain.sh up` (Debian's docker-compose 1.29, or
//! Compose v2 when the plugin is there): the hosts reach each other through the Dockwall SI,
//! a rule edited with `docker exec` takes effect, Dockvpn learns its option-121 route from
//! the dnsmasq service, and a stock openvpn client on the right network reaches the network
//! behind the left host through it.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use docknfv_tests::docker::require_docker;
use docknfv_tests::prereq::require_command;

/// Without dashes: docker-compose 1.29 strips them from project names, Compose v2 keeps them.
const PROJECT: &str = "docknfvcomposetest";
const VPN_CLIENT: &str = "docknfvcomposetest-vpn-client";

fn run(command: &mut Command) -> Output {
    command
        .output()
        .unwrap_or_else(|e| panic!("{command:?}: {e}"))
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

fn docker(args: &[&str]) -> Output {
    run(Command::new("docker").args(args))
}

/// The compose chain of this test's project; `down` on drop, also when the test fails.
struct ComposeChain {
    script: PathBuf,
    /// Where the VPN client's profile is written for its bind mount.
    profile: PathBuf,
}

impl ComposeChain {
    fn up() -> ComposeChain {
        require_docker();
        if docker(&["compose", "version"]).status.success() {
            eprintln!("using Compose v2 (docker compose)");
        } else {
            require_command("docker-compose", "docker-compose");
            eprintln!("using docker-compose");
        }
        let chain = ComposeChain {
            script: Path::new(env!("CARGO_MANIFEST_DIR")).join("../compose/chain.sh"),
            profile: std::env::temp_dir()
                .join(format!("docknfv-compose-{}.ovpn", std::process::id())),
        };
        // A run killed before its teardown left the same project behind.
        chain.down();
        let up = chain.chain_sh("up");
        assert!(
            up.status.success(),
            "chain.sh up: {}{}",
            text(&up.stdout),
            text(&up.stderr)
        );
        chain
    }

    fn chain_sh(&self, action: &str) -> Output {
        run(Command::new(&self.script)
            .arg(action)
            .env("COMPOSE_PROJECT_NAME", PROJECT))
    }

    fn down(&self) {
        docker(&["rm", "--force", VPN_CLIENT]);
        self.chain_sh("down");
        let _ = std::fs::remove_file(&self.profile);
    }

    /// The container of `service`, found by the labels both Compose versions set.
    fn container(&self, service: &str) -> String {
        let ps = docker(&[
            "ps",
            "--quiet",
            "--filter",
            &format!("label=com.docker.compose.project={PROJECT}"),
            "--filter",
            &format!("label=com.docker.compose.service={service}"),
        ]);
        let id = text(&ps.stdout).trim().to_owned();
        assert!(!id.is_empty(), "no running {service} container");
        id
    }

    fn wait_healthy(&self, container: &str) {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let health = docker(&["inspect", "--format", "{{.State.Health.Status}}", container]);
            if text(&health.stdout).trim() == "healthy" {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{container} not healthy within 60 s:\n{}",
                logs(container)
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

impl Drop for ComposeChain {
    fn drop(&mut self) {
        self.down();
    }
}

fn logs(container: &str) -> String {
    let logs = docker(&["logs", container]);
    format!("{}{}", text(&logs.stdout), text(&logs.stderr))
}

/// `docker exec`; the exit status and stdout + stderr.
fn exec(container: &str, command: &[&str]) -> (bool, String) {
    let output = run(Command::new("docker")
        .arg("exec")
        .arg(container)
        .args(command));
    (
        output.status.success(),
        text(&output.stdout) + &text(&output.stderr),
    )
}

fn pings(container: &str, address: &str) -> bool {
    exec(container, &["ping", "-c", "1", "-W", "2", address]).0
}

#[test]
fn compose_chain_routes_through_dockwall_and_dockvpn_serves_its_learned_route() {
    let chain = ComposeChain::up();
    let dockwall = chain.container("dockwall");
    let dockvpn = chain.container("dockvpn");
    chain.wait_healthy(&dockwall);
    chain.wait_healthy(&dockvpn);
    let left_host = chain.container("left-host");
    let right_host = chain.container("right-host");

    assert!(pings(&left_host, "10.11.2.10"), "left host → right host");
    let (added, output) = exec(
        &dockwall,
        &["dockwall", "rule", "add", "deny", "--proto", "icmp"],
    );
    assert!(added, "rule add: {output}");
    assert!(
        !pings(&right_host, "10.11.1.10"),
        "ICMP crossed a deny rule"
    );
    let (deleted, output) = exec(&dockwall, &["dockwall", "rule", "delete", "1"]);
    assert!(deleted, "rule delete: {output}");
    assert!(pings(&right_host, "10.11.1.10"), "ICMP after the delete");

    // dnsmasq.conf announces 192.168.77.0/24 via the left host.
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut status = String::new();
    while Instant::now() < deadline {
        status = exec(&dockvpn, &["dockvpn", "status", "--json"]).1;
        if status.contains("192.168.77.0/24") {
            break;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(
        status.contains("192.168.77.0/24"),
        "the option-121 route is learned: {status}\n{}",
        logs(&dockvpn)
    );

    let (added, output) = exec(&dockvpn, &["dockvpn", "client", "add", "alice"]);
    assert!(added, "client add: {output}");
    let (printed, profile) = exec(&dockvpn, &["dockvpn", "client", "config", "alice"]);
    assert!(printed, "client config: {profile}");
    let profile_path = &chain.profile;
    std::fs::write(profile_path, profile).expect("write the profile");
    let started = docker(&[
        "run",
        "--detach",
        "--name",
        VPN_CLIENT,
        "--network",
        &format!("{PROJECT}_right"),
        "--cap-add",
        "NET_ADMIN",
        "--device",
        "/dev/net/tun",
        "--volume",
        &format!("{}:/alice.ovpn:ro", profile_path.display()),
        "docknfv/host:latest",
        "openvpn",
        "--config",
        "/alice.ovpn",
    ]);
    assert!(started.status.success(), "{}", text(&started.stderr));
    let deadline = Instant::now() + Duration::from_secs(30);
    while !logs(VPN_CLIENT).contains("Initialization Sequence Completed") {
        assert!(
            Instant::now() < deadline,
            "the openvpn client did not connect:\n{}\nserver:\n{}",
            logs(VPN_CLIENT),
            logs(&dockvpn)
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(
        pings(VPN_CLIENT, "192.168.77.1"),
        "the network behind the left host through the tunnel; client routes:\n{}",
        exec(VPN_CLIENT, &["ip", "route"]).1
    );
}

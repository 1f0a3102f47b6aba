//! README.md's container walk-throughs, run as a user would: each `sh` block marked
//! `<!-- readme-test: NAME -->` is read from README.md itself (so the two cannot drift) and
//! run with `sh -eux` in a scratch directory (clean-up blocks without `-e`). The blocks use the README's fixed names, so the
//! tests here run one at a time, and each first and last runs the README's own clean-up
//! block (also when it panics).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;

use docknfv_tests::docker::DockerClient;
use docknfv_tests::netns::run_checked;
use docknfv_tests::prereq::require_command;

/// The README's names are fixed: one walk-through at a time.
static SERIAL: Mutex<()> = Mutex::new(());

/// The `sh` block after `<!-- readme-test: NAME -->` in README.md.
fn readme_block(name: &str) -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../README.md");
    let readme =
        std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
    let marker = format!("<!-- readme-test: {name} -->");
    let mut lines = readme.lines().skip_while(|l| l.trim() != marker).skip(1);
    assert_eq!(
        lines.next().map(str::trim),
        Some("```sh"),
        "README.md has no ```sh block right after {marker}"
    );
    let block: Vec<&str> = lines.take_while(|l| l.trim() != "```").collect();
    assert!(!block.is_empty(), "the block after {marker} is empty");
    block.join("\n") + "\n"
}

/// How a block's failing command is taken.
#[derive(Clone, Copy)]
enum OnFailure {
    /// Stop there, as a walk-through must (`sh -e`).
    Stop,
    /// Go on with the next line, as a clean-up of what may not exist must.
    Continue,
}

/// Runs a README block with `sh -ux` in `dir`; the block's verdict is its last command's.
fn run_block(name: &str, dir: &Path, on_failure: OnFailure) -> Result<String, String> {
    let script = readme_block(name);
    let flags = match on_failure {
        OnFailure::Stop => "-eux",
        OnFailure::Continue => "-ux",
    };
    let output = Command::new("sh")
        .args([flags, "-c", &script])
        .current_dir(dir)
        .output()
        .map_err(|e| format!("cannot run sh: {e}"))?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    if output.status.success() {
        Ok(text)
    } else {
        Err(format!(
            "README block {name:?} failed ({}):\n{text}",
            output.status
        ))
    }
}

/// A walk-through's scratch directory and clean-up: the README's clean-up block runs before
/// (a killed run's leftovers) and on drop, every line of it: some names may not exist.
struct Walkthrough {
    docker: DockerClient,
    dir: PathBuf,
    cleanup: &'static str,
    _serial: std::sync::MutexGuard<'static, ()>,
}

impl Walkthrough {
    fn start(block: &str, cleanup: &'static str) -> Walkthrough {
        let serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
        require_command("iptables", "iptables");
        // The README's blocks run the docker CLI, not only the API the client talks to.
        require_command("docker", "docker.io");
        let docker = DockerClient::connect();
        let dir = std::env::temp_dir().join(format!("docknfv-readme-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("scratch directory");
        let walkthrough = Walkthrough {
            docker,
            dir,
            cleanup,
            _serial: serial,
        };
        walkthrough.clean();
        if let Err(error) = run_block(block, &walkthrough.dir, OnFailure::Stop) {
            panic!("{error}");
        }
        walkthrough
    }

    fn clean(&self) {
        let _ = run_block(self.cleanup, &self.dir, OnFailure::Continue);
    }

    /// `docker exec` that must succeed: its output.
    fn exec(&self, container: &str, cmd: &[&str]) -> String {
        self.docker.exec_ok(container, cmd)
    }

    fn status(&self, container: &str, binary: &str) -> serde_json::Value {
        let text = self.exec(container, &[binary, "status", "--json"]);
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("{e}: {text}"))
    }
}

impl Drop for Walkthrough {
    fn drop(&mut self) {
        self.clean();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

#[test]
fn quick_start_one_armed_vpn_gives_a_client_elsewhere_a_container_on_its_network() {
    let walk = Walkthrough::start("quick-start", "quick-start-cleanup");
    let status = walk.status("vpn", "dockvpn");
    assert_eq!(status["routing"]["layout"], "one-armed", "{status}");
    let bridge_subnet = run_checked(Command::new("docker").args([
        "network",
        "inspect",
        "-f",
        "{{(index .IPAM.Config 0).Subnet}}",
        "bridge",
    ]));
    assert_eq!(
        status["vpn"]["routes_pushed"],
        serde_json::json!([bridge_subnet.trim()]),
        "the leg's subnet (Docker's default bridge): {status}"
    );
    let web = run_checked(Command::new("docker").args([
        "inspect",
        "-f",
        "{{.NetworkSettings.IPAddress}}",
        "web",
    ]));
    let web = web.trim();
    let route = walk.exec("alice", &["ip", "route", "get", web]);
    assert!(
        route.contains("dev tun0"),
        "alice reaches {web} through the tunnel: {route}"
    );
    let logs = walk.docker.logs("vpn");
    assert_eq!(
        logs.lines()
            .filter(|l| l.contains("running one-armed"))
            .count(),
        1,
        "{logs}"
    );
}

#[test]
fn containers_chain_crosses_dockwall_and_a_vpn_client_reaches_the_left_host() {
    let walk = Walkthrough::start("containers", "containers-cleanup");
    // The README pinged across; a deny rule on Dockwall stops that, so the path crosses it.
    walk.exec(
        "fw",
        &["dockwall", "rule", "add", "deny", "--proto", "icmp"],
    );
    assert!(
        !walk.docker.ping("left-host", "10.0.2.10"),
        "ICMP crossed Dockwall's deny rule"
    );
    walk.exec("fw", &["dockwall", "rule", "delete", "2"]);
    assert!(walk.docker.ping("left-host", "10.0.2.10"));

    let status = walk.status("vpn-si", "dockvpn");
    assert_eq!(status["routing"]["layout"], "dual-homed", "{status}");
    assert_eq!(
        status["vpn"]["routes_pushed"],
        serde_json::json!(["10.0.1.0/24", "192.168.77.0/24"]),
        "{status}"
    );
    for target in ["10.0.1.10", "192.168.77.1"] {
        let route = walk.exec("bob", &["ip", "route", "get", target]);
        assert!(route.contains("dev tun0"), "{target}: {route}");
    }
}

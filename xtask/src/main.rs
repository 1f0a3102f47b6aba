//! `cargo xtask demo | test | bench | deps`: the README's commands. Each installs the Debian
//! packages it needs first (idempotent: apt runs only when something is missing).

mod graph;
mod images;
mod suites;

use std::process::{exit, Command};

/// Debian packages the namespace chain and its tests use.
const DEBIAN_PACKAGES: &[&str] = &[
    "iproute2",
    "iputils-ping",
    "iperf3",
    "procps",
    "util-linux",
    "iptables",
    "dnsmasq-base",
    "isc-dhcp-client",
    "busybox",
    "nftables",
    "conntrack",
    "openvpn",
    "wireguard-go",
    "wireguard-tools",
    "zbar-tools",
    "docker.io",
    "debootstrap",
    "docker-compose",
    "prometheus",
    "tcpdump",
    // The web page's test: headless Chromium driven over WebDriver.
    "chromium",
    "chromium-driver",
    "time",
    "graphviz",
    // vpn-bench's data-path profile: perf record/trace, strace where perf cannot record.
    "linux-perf",
    "strace",
];

const USAGE: &str = "usage: cargo xtask <command>

commands:
  demo    build, bring up a service chain with Dockwall as the SI — on Docker when a
          daemon answers (or dockerd can be started), else in network namespaces; show
          traffic crossing it and a rule edit, tear down
  test    fmt check, clippy -D warnings, and every test (unit, namespace end-to-end, and
          Docker end-to-end: starts dockerd when none runs and builds the images first);
          every suite runs even after a failure, one line each (passed, failed, not run),
          the last line counts them: `tests: N passed, N failed`
  images  build the container images (docknfv/dockwall, dockvpn, dnsmasq, host, prometheus);
          without registry access the base is bootstrapped with debootstrap
  bench   the benchmarks recorded in BENCHMARKS.md (release build, about 15 minutes)
  graph   [--out DIR] [--project NAME] [--json]: a picture of the running chain — the
          networks, service instances (their left/right/mgmt legs, health, mirrors) and
          hosts Docker runs — as DIR/chain.dot, chain.svg and chain.png (Graphviz)
  deps    only install the Debian packages

All commands need root (network namespaces) and a Debian 12 machine with Rust >= 1.85.";

fn main() {
    let command = std::env::args().nth(1).unwrap_or_default();
    let result = match command.as_str() {
        "deps" => install_debian_packages(),
        "demo" => install_debian_packages().and_then(|()| demo()),
        "test" => install_debian_packages().and_then(|()| test()),
        "images" => install_debian_packages().and_then(|()| images::build()),
        "bench" => install_debian_packages().and_then(|()| {
            images::build()?;
            for bench in [
                "chain-bench",
                "firewall-bench",
                "api-bench",
                "rule-edit-bench",
                "scrape-bench",
                "dhcp-bench",
                "route-change-bench",
                "modes-bench",
                "vpn-bench",
                "docker-bench",
            ] {
                cargo(&[
                    "run",
                    "--quiet",
                    "--release",
                    "--package",
                    "docknfv-tests",
                    "--bin",
                    bench,
                ])?;
            }
            Ok(())
        }),
        "graph" => {
            let args: Vec<String> = std::env::args().skip(2).collect();
            install_debian_packages().and_then(|()| graph::run(&args))
        }
        "-h" | "--help" | "help" => {
            println!("{USAGE}");
            Ok(())
        }
        other => Err(format!("unknown command {other:?}\n\n{USAGE}")),
    };
    if let Err(error) = result {
        eprintln!("xtask: {error}");
        exit(1);
    }
}

/// On Docker when a daemon answers (or can be started), else in network namespaces.
fn demo() -> Result<(), String> {
    let on_docker = images::ensure_daemon().is_ok();
    let demo = if on_docker {
        println!("demo: a Docker daemon answers; running the chain as containers");
        images::build()?;
        "docker-demo"
    } else {
        println!("demo: no Docker daemon; running the chain in network namespaces");
        "chain-demo"
    };
    cargo(&[
        "run",
        "--quiet",
        "--package",
        "docknfv-tests",
        "--bin",
        demo,
    ])
}

fn test() -> Result<(), String> {
    cargo(&["fmt", "--all", "--", "--check"])?;
    cargo(&[
        "clippy",
        "--workspace",
        "--all-targets",
        "--quiet",
        "--",
        "-D",
        "warnings",
    ])?;
    images::build()?;
    if !suites::run()? {
        // The suite lines and the count, printed last, say what failed.
        exit(1);
    }
    Ok(())
}

/// The cargo that runs xtask (`CARGO`), else the one on PATH.
fn cargo_program() -> String {
    std::env::var("CARGO").unwrap_or_else(|_| "cargo".into())
}

fn cargo(args: &[&str]) -> Result<(), String> {
    run(Command::new(cargo_program()).args(args))
}

fn run(command: &mut Command) -> Result<(), String> {
    eprintln!("+ {command:?}");
    let status = command
        .status()
        .map_err(|e| format!("cannot run {command:?}: {e}"))?;
    if status.success() {
        Ok(())
    } else {
        Err(format!("{command:?} failed: {status}"))
    }
}

fn is_installed(package: &str) -> bool {
    Command::new("dpkg-query")
        .args(["-W", "-f=${Status}", package])
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains("install ok installed"))
}

fn install_debian_packages() -> Result<(), String> {
    let missing: Vec<&str> = DEBIAN_PACKAGES
        .iter()
        .copied()
        .filter(|p| !is_installed(p))
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    let is_root = Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| o.stdout.starts_with(b"0\n"));
    if !is_root {
        return Err(format!(
            "missing Debian packages {missing:?}; run as root to install them (apt-get install {})",
            missing.join(" ")
        ));
    }
    run(Command::new("apt-get")
        .args(["update", "-q"])
        .env("DEBIAN_FRONTEND", "noninteractive"))?;
    run(Command::new("apt-get")
        .args(["install", "-y", "-q", "--no-install-recommends"])
        .args(&missing)
        .env("DEBIAN_FRONTEND", "noninteractive"))
}

//! DHCP benchmark for BENCHMARKS.md (run with `cargo xtask bench`): time from the first
//! DISCOVER to the lease's address and option-121 routes in the kernel, against dnsmasq in a
//! namespace, for vnf-core's client, ISC `dhclient -1` (with Debian's rfc3442 exit hook) and
//! busybox `udhcpc -q` (with a script doing the same), interleaved in one run (the order
//! rotating every round). Every row checks that the route landed.

use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};

use docknfv_tests::chain::client_and_router;
use docknfv_tests::dnsmasq::Dnsmasq;
use docknfv_tests::dockwall::StateDir;
use docknfv_tests::measure::{median, round_order};
use docknfv_tests::prereq::require_command;
use docknfv_tests::{Netns, Vnf};
use tokio::sync::{watch, Notify};
use vnf_core::dhcp::driver::{DhcpInterface, DhcpTask};
use vnf_core::route_guard::RouteGuard;
use vnf_core::side::Side;

const ROUNDS: usize = 9;
const ROUTE: &str = "192.168.10.0/24 via 10.0.1.1";

/// What udhcpc runs: the address, then each option-121 route.
const UDHCPC_SCRIPT: &str = r#"#!/bin/sh
[ "$1" = bound ] || exit 0
ip addr add "$ip/$mask" dev "$interface"
set -- $staticroutes
while [ $# -ge 2 ]; do ip route add "$1" via "$2" dev "$interface"; shift 2; done
"#;

fn client_and_server() -> (Netns, Netns, Dnsmasq) {
    let (client, server) = client_and_router();
    let dnsmasq = Dnsmasq::start(
        &server,
        "lan",
        "10.0.1.50,10.0.1.99,255.255.255.0,1h",
        &[
            "option:classless-static-route,192.168.10.0/24,10.0.1.1",
            "option:router,10.0.1.1",
        ],
    );
    (client, server, dnsmasq)
}

fn reset(client: &Netns) {
    client.ip(&["addr", "flush", "dev", "eth0"]);
    client.ip(&["route", "flush", "table", "main", "proto", "dhcp"]);
    client.ip(&["route", "flush", "table", "main", "proto", "boot"]);
}

fn routes_in(client: &Netns) -> bool {
    client.ip(&["route", "show"]).contains(ROUTE)
}

fn vnf_core_client(client: &Netns, state: &StateDir) -> f64 {
    let link = client.link("eth0");
    let (index, mac) = (link.index, link.mac.expect("eth0 has a MAC"));
    let elapsed = client.block_on(async {
        let changed = Arc::new(Notify::new());
        let started = Instant::now();
        let task = DhcpTask::spawn(
            DhcpInterface {
                side: Side::Left,
                index,
                name: "eth0".into(),
                mac,
                mtu: 1500,
                table: 254,
                state_dir: state.path().to_path_buf(),
                hook: None,
                min_prefix: 8,
                guard: watch::channel(RouteGuard::default()).1,
            },
            changed,
        );
        let mut feed = task.feed();
        tokio::time::timeout(Duration::from_secs(30), feed.wait_for(Option::is_some))
            .await
            .expect("lease within 30 s")
            .expect("feed");
        let elapsed = started.elapsed();
        assert!(
            routes_in(client),
            "vnf-core's client did not install the route"
        );
        task.stop(true).await;
        elapsed
    });
    let _ = std::fs::remove_dir_all(state.path());
    elapsed.as_secs_f64() * 1000.0
}

/// `dockvpn run --dhcp left` as a whole process: spawn → its "DHCP lease applied" log line.
fn dockvpn_process(client: &Netns, state: &StateDir) -> f64 {
    let state_dir = state.path().to_str().unwrap().to_string();
    let dockvpn = Vnf::start(
        client,
        "dockvpn",
        &[
            "--state-dir",
            &state_dir,
            "run",
            "--dhcp",
            "left",
            "--side-timeout",
            "0",
        ],
    );
    dockvpn
        .wait_for_log("DHCP lease applied", Duration::from_secs(30))
        .unwrap_or_else(|e| panic!("{e}"));
    let elapsed = dockvpn.started.elapsed().as_secs_f64() * 1000.0;
    assert!(routes_in(client), "dockvpn did not install the route");
    drop(dockvpn);
    let _ = std::fs::remove_dir_all(state.path());
    elapsed
}

fn dhclient(client: &Netns, state: &StateDir) -> f64 {
    std::fs::create_dir_all(state.path()).unwrap();
    let (pid, leases) = (
        state.path().join("dhclient.pid"),
        state.path().join("dhclient.leases"),
    );
    let started = Instant::now();
    let status = client
        .command("dhclient")
        .args([
            "-1",
            "-pf",
            pid.to_str().unwrap(),
            "-lf",
            leases.to_str().unwrap(),
            "eth0",
        ])
        .stderr(Stdio::null())
        .status()
        .expect("dhclient");
    let elapsed = started.elapsed().as_secs_f64() * 1000.0;
    assert!(
        status.success() && routes_in(client),
        "dhclient did not install the route"
    );
    let _ = client
        .command("dhclient")
        .args(["-x", "-pf", pid.to_str().unwrap()])
        .stderr(Stdio::null())
        .status();
    elapsed
}

fn udhcpc(client: &Netns, state: &StateDir) -> f64 {
    std::fs::create_dir_all(state.path()).unwrap();
    let script = state.path().join("udhcpc.script");
    std::fs::write(&script, UDHCPC_SCRIPT).unwrap();
    std::process::Command::new("chmod")
        .arg("+x")
        .arg(&script)
        .status()
        .unwrap();
    let started = Instant::now();
    let status = client
        .command("busybox")
        .args([
            "udhcpc",
            "-i",
            "eth0",
            "-f",
            "-q",
            "-n",
            "-t",
            "5",
            "-O",
            "staticroutes",
            "-s",
            script.to_str().unwrap(),
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .expect("udhcpc");
    let elapsed = started.elapsed().as_secs_f64() * 1000.0;
    assert!(
        status.success() && routes_in(client),
        "udhcpc did not install the route"
    );
    elapsed
}

fn main() {
    require_command("dnsmasq", "dnsmasq-base");
    require_command("dhclient", "isc-dhcp-client");
    require_command("busybox", "busybox");
    let (client, _server, _dnsmasq) = client_and_server();
    let state = StateDir::new();
    // SAFETY: single-threaded here; the harness reads it when it builds the binaries.
    unsafe { std::env::set_var("DOCKNFV_PROFILE", "release") };
    let clients: [fn(&Netns, &StateDir) -> f64; 4] =
        [vnf_core_client, dockvpn_process, dhclient, udhcpc];
    let mut samples: [Vec<f64>; 4] = Default::default();
    for round in 0..ROUNDS {
        for contender in round_order(round, clients.len()) {
            reset(&client);
            samples[contender].push(clients[contender](&client, &state));
        }
    }
    let [mut ours, mut process, mut isc, mut busybox] = samples;
    let (ours, process, isc, busybox) = (
        median(&mut ours),
        median(&mut process),
        median(&mut isc),
        median(&mut busybox),
    );
    println!("| DHCP client | first DISCOVER → address and option-121 routes in the kernel, median of {ROUNDS} | ratio to dhclient |");
    println!("|---|---|---|");
    println!(
        "| vnf-core (in-process task) | {ours:.1} ms | **{:.3}** |",
        ours / isc
    );
    println!("| `dockvpn run --dhcp left`, whole process (spawn → \"DHCP lease applied\") | {process:.1} ms | **{:.3}** |", process / isc);
    println!("| ISC dhclient -1 (+ rfc3442 hook), whole process | {isc:.1} ms | 1 |");
    println!(
        "| busybox udhcpc -q | {busybox:.1} ms | {:.3} |",
        busybox / isc
    );
}

//! Dockwall's service modes in namespace chains: in-network-nat (masquerade out of the
//! right side, right-to-left only through DNAT) and transparent (a bump in the wire).

use std::time::Duration;

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

use docknfv_tests::chain::{LEFT_HOST, LEFT_HOST_NET, RIGHT_HOST, SI_RIGHT};
use docknfv_tests::dockwall::{Dockwall, StateDir};
use docknfv_tests::dockwall_api;
use docknfv_tests::netns::run_checked;
use docknfv_tests::traffic::{ping, ping_eventually, tcp, tcp_probe, Probe};
use docknfv_tests::wire::{Wire, SI_LEFT_LEG, SI_MGMT, SI_RIGHT_LEG, WIRE_LEFT, WIRE_RIGHT};
use docknfv_tests::{Chain, Netns, Vnf};

/// `dockwall run --mode MODE RUN_ARGS` in `si` on a fresh state directory, waited on until
/// it forwards.
fn start<'s>(si: &'s Netns, mode: &str, run_args: &[&str]) -> Dockwall<'s> {
    let mut args = vec!["--mode", mode];
    args.extend_from_slice(run_args);
    let mut dockwall = Dockwall::launch_in(si, StateDir::new(), &args);
    dockwall.wait_ready();
    dockwall
}

#[test]
fn in_network_nat_masquerades_out_of_the_right_side_and_lets_in_only_dnat() {
    let chain = Chain::new();
    // In this mode the right network needs no route back to the left hosts.
    chain.right_gateway.ip(&["route", "del", LEFT_HOST_NET]);
    let unreachable = chain.right_gateway.exec("ip", &["route", "get", LEFT_HOST]);
    assert!(
        !unreachable.status.success(),
        "the right gateway must have no route to the left network: {}",
        String::from_utf8_lossy(&unreachable.stdout)
    );
    let mut dockwall = start(&chain.si, "in-network-nat", &[]);

    let (probe, peer) = tcp_probe(
        &chain.left_host,
        &chain.right_host,
        RIGHT_HOST,
        RIGHT_HOST,
        7101,
        7101,
    );
    assert_eq!(
        probe,
        Probe::Passed,
        "left reaches right without a route back"
    );
    assert_eq!(
        peer.map(|p| p.ip().to_string()),
        Some(SI_RIGHT.to_string()),
        "the right host sees the SI's right address as the source"
    );
    assert!(
        ping(&chain.left_host, RIGHT_HOST),
        "ICMP is masqueraded too"
    );

    // A right network that does route the left prefixes via the SI still gets no new
    // connection through: the mode lets right-to-left in only through DNAT.
    chain
        .right_gateway
        .ip(&["route", "add", LEFT_HOST_NET, "via", SI_RIGHT]);
    let (probe, _) = tcp_probe(
        &chain.right_host,
        &chain.left_host,
        LEFT_HOST,
        LEFT_HOST,
        7102,
        7102,
    );
    assert_eq!(
        probe,
        Probe::TimedOut,
        "right-to-left without DNAT is dropped"
    );
    chain.right_gateway.ip(&["route", "del", LEFT_HOST_NET]);
    // The same probe before and after each change: the left host listens behind the DNAT.
    let through_dnat = || {
        tcp_probe(
            &chain.right_host,
            &chain.left_host,
            LEFT_HOST,
            SI_RIGHT,
            7103,
            8080,
        )
    };
    let (probe, peer) = through_dnat();
    assert!(
        probe != Probe::Passed && peer.is_none(),
        "no DNAT rule yet: nothing reaches the left host"
    );

    dockwall.ok(&[
        "nat",
        "add",
        "dnat",
        "--port",
        "8080",
        "--to",
        &format!("{LEFT_HOST}:7103"),
    ]);
    let (probe, peer) = through_dnat();
    assert_eq!(probe, Probe::Passed, "the DNAT rule lets the connection in");
    assert_eq!(
        peer.map(|p| p.ip().to_string()),
        Some(RIGHT_HOST.to_string()),
        "DNAT keeps the right host's address"
    );

    // Right-to-left rules and policy apply to the DNAT'd connections.
    let deny = [
        "rule",
        "add",
        "deny",
        "--direction",
        "right-to-left",
        "--proto",
        "tcp",
        "--dport",
        "7103",
    ];
    dockwall.ok(&deny);
    assert_eq!(
        through_dnat().0,
        Probe::TimedOut,
        "a right-to-left deny rule blocks the DNAT'd connection"
    );
    dockwall.ok(&["rule", "delete", "1"]);
    assert_eq!(
        through_dnat().0,
        Probe::Passed,
        "rule deleted: passes again"
    );
    dockwall.ok(&["default", "deny", "--direction", "right-to-left"]);
    assert_eq!(
        through_dnat().0,
        Probe::Passed,
        "a port-forward is explicit: the right-to-left default (FWaaS's implicit deny) does not \
         cancel it, as in in-network mode; only a rule does"
    );

    // Without --mode, status checks the mode `run` recorded with the rules.
    for args in [&["status"][..], &["status", "--mode", "in-network-nat"]] {
        let status = dockwall.cli(args);
        let report = String::from_utf8_lossy(&status.stdout);
        assert!(status.status.success(), "{args:?} healthy:\n{report}");
        assert!(report.contains("mode in-network-nat"), "{report}");
    }
    assert!(
        !dockwall
            .cli(&["status", "--mode", "in-network"])
            .status
            .success(),
        "status for another mode than run's is not healthy"
    );
    dockwall.stop();
}

#[test]
fn transparent_bridges_one_subnet_and_filters_with_conntrack() {
    let wire = Wire::new();
    let mut dockwall = start(
        &wire.si,
        "transparent",
        &["--api-listen", dockwall_api::API_ADDRESS],
    );

    for leg in ["eth0", "eth1"] {
        assert_eq!(
            wire.leg_addresses(leg),
            Vec::<String>::new(),
            "{leg} carries no IP"
        );
    }
    let bridged = wire.si.ip(&["-o", "link", "show", "master", "dockwall0"]);
    assert!(
        bridged.contains("eth0") && bridged.contains("eth1") && !bridged.contains("eth2"),
        "both data legs and only they are bridged: {bridged}"
    );
    assert!(
        ping_eventually(&wire.left_host, WIRE_RIGHT, 3),
        "left pings right"
    );
    assert!(ping(&wire.right_host, WIRE_LEFT), "right pings left");
    assert!(ping(&wire.mgmt, SI_MGMT), "management stays routed");
    let status = dockwall.cli(&["status"]);
    let report = String::from_utf8_lossy(&status.stdout);
    assert!(
        status.status.success(),
        "status without --mode follows run's mode:\n{report}"
    );
    assert!(report.contains("left: eth0, bridged, no IPv4"), "{report}");
    // The API's status (what the web page shows) judges the bridge too, not routing.
    let token = dockwall_api::token(&dockwall);
    let api =
        dockwall_api::call(&wire.si, Some(&token), "GET", "/v2.0/dockwall/status", None).json();
    assert_eq!(
        api["healthy"], true,
        "the API's status in transparent mode: {api}"
    );

    // The rule grammar unchanged: a deny rule blocks one TCP port across the bridge.
    dockwall.ok(&["rule", "add", "deny", "--proto", "tcp", "--dport", "7201"]);
    assert_eq!(
        tcp(&wire.left_host, &wire.right_host, WIRE_RIGHT, 7201),
        Probe::TimedOut,
        "the denied port is blocked"
    );
    assert_eq!(
        tcp(&wire.left_host, &wire.right_host, WIRE_RIGHT, 7202),
        Probe::Passed,
        "other ports pass"
    );

    // Conntrack: only left-to-right tcp/80 is allowed, yet its answers come back.
    dockwall.ok(&["default", "deny"]);
    dockwall.ok(&[
        "rule",
        "add",
        "allow",
        "--direction",
        "left-to-right",
        "--proto",
        "tcp",
        "--dport",
        "80",
    ]);
    assert_eq!(
        tcp(&wire.left_host, &wire.right_host, WIRE_RIGHT, 80),
        Probe::Passed,
        "the allowed connection and its return traffic pass"
    );
    assert_eq!(
        tcp(&wire.right_host, &wire.left_host, WIRE_LEFT, 80),
        Probe::TimedOut,
        "right-to-left is not allowed"
    );
    assert_eq!(
        tcp(&wire.left_host, &wire.right_host, WIRE_RIGHT, 81),
        Probe::TimedOut,
        "default deny drops other ports"
    );
    // IPv6 neighbour discovery crosses the bridge under the default deny (the echo itself
    // is denied): the left host learns the right host's MAC.
    wire.left_host
        .ip(&["addr", "add", "fd50::1/64", "dev", "eth0", "nodad"]);
    wire.right_host
        .ip(&["addr", "add", "fd50::2/64", "dev", "eth0", "nodad"]);
    let resolved = (0..3).any(|_| {
        wire.left_host
            .exec("ping", &["-6", "-c", "1", "-W", "1", "fd50::2"]);
        let neighbour = wire.left_host.ip(&["-6", "neigh", "show", "fd50::2"]);
        ["REACHABLE", "STALE", "DELAY", "PROBE"]
            .iter()
            .any(|state| neighbour.contains(state))
    });
    assert!(resolved, "IPv6 neighbour discovery crosses the bridge");
    let list = dockwall.ok(&["rule", "list", "--json"]);
    let listed: serde_json::Value = serde_json::from_str(&list).expect("rule list JSON");
    assert!(
        listed["rules"][1]["packets"].as_u64().unwrap_or(0) > 0,
        "the allow rule counts bridged packets: {list}"
    );

    let refused = dockwall.cli(&["nat", "add", "masquerade", "--out", "right"]);
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(
        !refused.status.success() && stderr.contains("transparent mode"),
        "NAT is refused naming why: {stderr}"
    );

    // `apply` keeps run's mode and says so.
    let file = dockwall.state.path().join("plain.json");
    std::fs::write(
        &file,
        r#"{"version":1,"default_policy":"accept","rules":[],"nat":[],"next_id":1}"#,
    )
    .expect("write the rule file");
    let applied = dockwall.cli(&["apply", file.to_str().expect("utf-8")]);
    let stderr = String::from_utf8_lossy(&applied.stderr);
    assert!(
        applied.status.success() && stderr.contains("is ignored"),
        "apply warns that the file's mode is ignored: {stderr}"
    );
    assert!(
        dockwall.cli(&["status"]).status.success(),
        "still transparent after apply"
    );

    dockwall.stop();
    assert_eq!(wire.leg_addresses("eth0"), [SI_LEFT_LEG], "restored");
    assert_eq!(wire.leg_addresses("eth1"), [SI_RIGHT_LEG], "restored");
    let links = wire.si.ip(&["-o", "link", "show"]);
    assert!(!links.contains("dockwall0"), "bridge removed: {links}");
    let tables = run_checked(wire.si.command("nft").args(["list", "tables"]));
    assert_eq!(tables.trim(), "", "both tables removed");
}

#[test]
fn a_flushed_bridge_table_fails_status_and_run_repairs_it() {
    let wire = Wire::new();
    let mut dockwall = start(&wire.si, "transparent", &["--verify-every", "1"]);
    dockwall.ok(&["rule", "add", "deny", "--proto", "tcp", "--dport", "7301"]);
    let denied = || tcp(&wire.left_host, &wire.right_host, WIRE_RIGHT, 7301);
    assert_eq!(
        denied(),
        Probe::TimedOut,
        "the deny holds across the bridge"
    );

    // Frozen, `run` cannot repair: status alone must see the flush, and traffic bypasses
    // the rules (no leg mark, so no per-direction chain).
    let pid = Pid::from_raw(dockwall.running().pid() as i32);
    kill(pid, Signal::SIGSTOP).expect("stop run");
    let flush = wire
        .si
        .exec("nft", &["flush", "table", "bridge", "dockwall"]);
    assert!(flush.status.success(), "{flush:?}");
    let status = dockwall.cli(&["status"]);
    let report = String::from_utf8_lossy(&status.stdout);
    assert!(
        !status.status.success(),
        "status fails after the flush:\n{report}"
    );
    assert!(
        report.contains("table bridge dockwall: chain mark_leg holds 0 rules"),
        "{report}"
    );
    assert_eq!(denied(), Probe::Passed, "the flush opened the way");

    // Running again: its next check re-creates the table (bounded wait).
    kill(pid, Signal::SIGCONT).expect("continue run");
    dockwall.wait_healthy(
        Duration::from_secs(15),
        "run did not repair the bridge table",
    );
    assert_eq!(denied(), Probe::TimedOut, "the deny holds again");
    let log = dockwall.running().log();
    assert!(
        log.contains("table bridge dockwall: chain mark_leg holds 0 rules"),
        "{log}"
    );
    dockwall.stop();
}

#[test]
fn transparent_run_refuses_stored_nat_rules() {
    let wire = Wire::new();
    let dockwall = Dockwall::idle(&wire.si, StateDir::new());
    dockwall.ok(&["nat", "add", "masquerade", "--out", "right"]);
    let mut run = dockwall.spawn(&["--mode", "transparent"]);
    let status = run.wait_exit(Duration::from_secs(10));
    assert!(!status.success(), "run must refuse");
    let log = run.log();
    assert!(
        log.contains("transparent mode") && log.contains("NAT rule 1"),
        "the refusal names the NAT rule and why: {log}"
    );
    assert_eq!(wire.leg_addresses("eth0"), [SI_LEFT_LEG], "nothing changed");
}

#[test]
fn a_killed_transparent_run_is_undone_by_the_next_start_in_any_mode() {
    let wire = Wire::new();
    let dockwall = Dockwall::idle(&wire.si, StateDir::new());
    let start_transparent = || {
        let run = dockwall.spawn(&["--mode", "transparent", "--side-timeout", "30"]);
        run.wait_ready();
        run
    };
    let kill_hard = |vnf: &mut Vnf| {
        kill(Pid::from_raw(vnf.pid() as i32), Signal::SIGKILL).expect("kill -9");
        assert!(!vnf.wait_exit(Duration::from_secs(10)).success());
        assert_eq!(
            wire.leg_addresses("eth0"),
            Vec::<String>::new(),
            "no cleanup"
        );
        let links = wire.si.ip(&["-o", "link", "show"]);
        assert!(
            links.contains("dockwall0"),
            "kill -9 leaves the bridge: {links}"
        );
    };
    let mut first = start_transparent();
    kill_hard(&mut first);

    // A transparent restart bridges afresh and, stopped cleanly, gives back the addresses
    // the legs had before the first run.
    let mut second = start_transparent();
    assert!(
        ping_eventually(&wire.left_host, WIRE_RIGHT, 3),
        "the restarted bridge forwards"
    );
    kill_hard(&mut second);
    // An address someone already put back is no failure for the restore.
    wire.si.ip(&["addr", "add", SI_LEFT_LEG, "dev", "eth0"]);

    // An in-network start cleans up the same way before it looks for its sides.
    let mut routed = dockwall.spawn(&["--side-timeout", "30"]);
    if let Err(error) = routed.wait_for_log("legs restored", Duration::from_secs(10)) {
        panic!("{error}");
    }
    assert_eq!(wire.leg_addresses("eth0"), [SI_LEFT_LEG], "restored");
    assert_eq!(wire.leg_addresses("eth1"), [SI_RIGHT_LEG], "restored");
    let links = wire.si.ip(&["-o", "link", "show"]);
    assert!(
        !links.contains("dockwall0"),
        "stale bridge removed: {links}"
    );
    let tables = run_checked(wire.si.command("nft").args(["list", "tables"]));
    assert!(
        !tables.contains("bridge"),
        "stale bridge table removed: {tables}"
    );
    assert!(
        !dockwall.state.path().join("transparent-legs.json").exists(),
        "the record of the legs goes once they are restored"
    );
    routed.terminate();
}

#[test]
fn a_refused_transparent_run_keeps_the_recorded_mode() {
    let wire = Wire::new();
    let dockwall = Dockwall::idle(&wire.si, StateDir::new());
    let mut run = dockwall.spawn(&["--mode", "transparent", "--left", "cidr:10.50.0.0/24"]);
    assert!(!run.wait_exit(Duration::from_secs(10)).success());
    assert!(run.log().contains("pin the side by name"), "{}", run.log());
    let status = dockwall.cli(&["status", "--json"]);
    let report: serde_json::Value = serde_json::from_slice(&status.stdout).expect("status JSON");
    assert_eq!(
        report["mode"], "in-network",
        "the refused mode is not recorded"
    );
}

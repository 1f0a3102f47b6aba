//! Dockwall's firewall in the namespace chain: real nft, real traffic, the real CLI.

use std::time::Duration;

use docknfv_tests::chain::{LEFT_HOST, RIGHT_HOST, SI_RIGHT};
use docknfv_tests::dockwall::Dockwall;
use docknfv_tests::netns::run_checked;
use docknfv_tests::traffic::{
    ping, ping_eventually, ping_output, tcp, tcp_probe, udp_probe, Probe,
};
use docknfv_tests::Chain;
use vnf_core::firewall::compile::{compile, Sides};
use vnf_core::firewall::nft::{replace, ApplyKind};
use vnf_core::firewall::store::Store;
use vnf_core::firewall::{Applied, RuleSet, Session};

fn tcp_left_to_right(chain: &Chain, port: u16) -> Probe {
    tcp(&chain.left_host, &chain.right_host, RIGHT_HOST, port)
}

fn tcp_right_to_left(chain: &Chain, port: u16) -> Probe {
    tcp(&chain.right_host, &chain.left_host, LEFT_HOST, port)
}

#[test]
fn deny_and_reject_per_direction_for_tcp_udp_and_icmp() {
    let chain = Chain::new();
    let dockwall = Dockwall::start(&chain);
    assert_eq!(
        tcp_left_to_right(&chain, 7001),
        Probe::Passed,
        "no rules: everything passes"
    );

    dockwall.ok(&[
        "rule",
        "add",
        "deny",
        "--direction",
        "left-to-right",
        "--proto",
        "tcp",
        "--dport",
        "7001",
    ]);
    assert_eq!(
        tcp_left_to_right(&chain, 7001),
        Probe::TimedOut,
        "deny drops silently"
    );
    assert_eq!(
        tcp_left_to_right(&chain, 7002),
        Probe::Passed,
        "other ports pass"
    );
    assert_eq!(
        tcp_right_to_left(&chain, 7001),
        Probe::Passed,
        "the other direction passes"
    );

    dockwall.ok(&[
        "rule",
        "add",
        "reject",
        "--direction",
        "left-to-right",
        "--proto",
        "tcp",
        "--dport",
        "7003",
    ]);
    assert_eq!(
        tcp_left_to_right(&chain, 7003),
        Probe::Refused,
        "reject answers TCP with a reset"
    );

    dockwall.ok(&[
        "rule",
        "add",
        "reject",
        "--direction",
        "right-to-left",
        "--proto",
        "udp",
        "--dport",
        "7004",
    ]);
    assert_eq!(
        udp_probe(&chain.right_host, &chain.left_host, LEFT_HOST, 7004),
        Probe::Refused,
        "reject answers UDP with ICMP unreachable"
    );
    assert_eq!(
        udp_probe(&chain.left_host, &chain.right_host, RIGHT_HOST, 7004),
        Probe::Passed
    );
    dockwall.ok(&[
        "rule",
        "add",
        "deny",
        "--direction",
        "both",
        "--proto",
        "udp",
        "--dport",
        "7005",
    ]);
    assert_eq!(
        udp_probe(&chain.left_host, &chain.right_host, RIGHT_HOST, 7005),
        Probe::TimedOut
    );

    dockwall.ok(&[
        "rule",
        "add",
        "reject",
        "--direction",
        "left-to-right",
        "--proto",
        "icmp",
        "--to",
        RIGHT_HOST,
    ]);
    let answer = ping_output(&chain.left_host, RIGHT_HOST);
    assert!(
        answer.contains("Unreachable"),
        "reject answers ICMP with unreachable:\n{answer}"
    );
    assert!(
        ping(&chain.right_host, LEFT_HOST),
        "ICMP right→left is still allowed"
    );

    let listing = dockwall.ok(&["rule", "list", "--json"]);
    let rules: serde_json::Value = serde_json::from_str(&listing).expect("rule list JSON");
    assert_eq!(rules["rules"].as_array().map(Vec::len), Some(5));
    assert!(
        rules["rules"][0]["packets"].as_u64().unwrap_or(0) >= 1,
        "the deny rule counted the dropped SYNs: {listing}"
    );
}

#[test]
fn rules_for_a_side_that_is_not_up_yet_apply_when_it_comes_up() {
    let chain = Chain::without_right();
    let mut dockwall = Dockwall::launch(&chain);
    dockwall
        .process
        .as_ref()
        .unwrap()
        .wait_for_log("firewall applied", Duration::from_secs(10))
        .unwrap_or_else(|e| panic!("{e}"));
    dockwall.ok(&[
        "rule",
        "add",
        "deny",
        "-d",
        "left-to-right",
        "--proto",
        "icmp",
    ]);
    chain.attach_right();
    dockwall.wait_ready();
    assert!(
        !ping(&chain.left_host, RIGHT_HOST),
        "the deny applies once the right side is up"
    );
    assert_eq!(tcp_left_to_right(&chain, 7501), Probe::Passed);
}

#[test]
fn established_replies_pass_while_new_right_to_left_is_denied() {
    let chain = Chain::new();
    let dockwall = Dockwall::start(&chain);
    dockwall.ok(&["rule", "add", "deny", "--direction", "right-to-left"]);
    assert_eq!(
        tcp_left_to_right(&chain, 7101),
        Probe::Passed,
        "replies to a left-initiated flow come back"
    );
    assert!(ping(&chain.left_host, RIGHT_HOST));
    assert_eq!(
        tcp_right_to_left(&chain, 7102),
        Probe::TimedOut,
        "new right→left connections are dropped"
    );
    assert!(!ping(&chain.right_host, LEFT_HOST));
}

#[test]
fn order_matters_and_an_inserted_allow_wins() {
    let chain = Chain::new();
    let dockwall = Dockwall::start(&chain);
    dockwall.ok(&[
        "rule",
        "add",
        "deny",
        "-d",
        "left-to-right",
        "--proto",
        "icmp",
    ]);
    assert!(!ping(&chain.left_host, RIGHT_HOST));
    dockwall.ok(&[
        "rule",
        "insert",
        "1",
        "allow",
        "-d",
        "left-to-right",
        "--proto",
        "icmp",
        "--to",
        RIGHT_HOST,
    ]);
    assert!(
        ping(&chain.left_host, RIGHT_HOST),
        "the allow inserted before the deny decides"
    );
    dockwall.ok(&["rule", "disable", "1"]);
    assert!(
        !ping(&chain.left_host, RIGHT_HOST),
        "disabled, the allow no longer counts"
    );
    dockwall.ok(&["rule", "enable", "1"]);
    assert!(ping(&chain.left_host, RIGHT_HOST));
    // FWaaS insert_after: a deny after the allow changes nothing.
    let listing: serde_json::Value =
        serde_json::from_str(&dockwall.ok(&["rule", "list", "--json"])).unwrap();
    let allow_id = listing["rules"][0]["id"].as_u64().unwrap().to_string();
    dockwall.ok(&[
        "rule",
        "add",
        "deny",
        "-d",
        "left-to-right",
        "--to",
        RIGHT_HOST,
        "--after",
        &allow_id,
    ]);
    assert!(ping(&chain.left_host, RIGHT_HOST));
    dockwall.ok(&["rule", "delete", "--id", &allow_id]);
    assert!(!ping(&chain.left_host, RIGHT_HOST));
}

#[test]
fn default_deny_then_allow_opens_only_what_is_allowed() {
    let chain = Chain::new();
    let dockwall = Dockwall::start(&chain);
    dockwall.ok(&["default", "deny"]);
    assert!(!ping(&chain.left_host, RIGHT_HOST));
    dockwall.ok(&[
        "rule",
        "add",
        "allow",
        "-d",
        "left-to-right",
        "--proto",
        "tcp",
        "--dport",
        "7201",
    ]);
    assert_eq!(tcp_left_to_right(&chain, 7201), Probe::Passed);
    assert_eq!(tcp_left_to_right(&chain, 7202), Probe::TimedOut);
    dockwall.ok(&["default", "allow"]);
    assert_eq!(tcp_left_to_right(&chain, 7202), Probe::Passed);
}

#[test]
fn masquerade_out_of_the_right_side_hides_the_left_host() {
    let chain = Chain::new();
    let dockwall = Dockwall::start(&chain);
    let (probe, peer) = tcp_probe(
        &chain.left_host,
        &chain.right_host,
        RIGHT_HOST,
        RIGHT_HOST,
        7301,
        7301,
    );
    assert_eq!(
        (probe, peer.map(|p| p.ip().to_string())),
        (Probe::Passed, Some(LEFT_HOST.to_string()))
    );
    dockwall.ok(&["nat", "add", "masquerade", "--out", "right"]);
    let (probe, peer) = tcp_probe(
        &chain.left_host,
        &chain.right_host,
        RIGHT_HOST,
        RIGHT_HOST,
        7302,
        7302,
    );
    assert_eq!(probe, Probe::Passed);
    assert_eq!(
        peer.map(|p| p.ip().to_string()),
        Some(SI_RIGHT.to_string()),
        "the right host sees the SI's address"
    );
    let nat: serde_json::Value =
        serde_json::from_str(&dockwall.ok(&["nat", "list", "--json"])).unwrap();
    assert!(nat[0]["packets"].as_u64().unwrap_or(0) >= 1, "{nat}");
}

#[test]
fn dnat_port_forward_is_reachable_from_the_right_even_with_default_deny() {
    let chain = Chain::new();
    let dockwall = Dockwall::start(&chain);
    dockwall.ok(&["default", "deny"]);
    dockwall.ok(&[
        "nat",
        "add",
        "dnat",
        "--proto",
        "tcp",
        "--port",
        "8080",
        "--to",
        &format!("{LEFT_HOST}:7401"),
    ]);
    let (probe, _) = tcp_probe(
        &chain.right_host,
        &chain.left_host,
        LEFT_HOST,
        SI_RIGHT,
        7401,
        8080,
    );
    assert_eq!(
        probe,
        Probe::Passed,
        "SI right address :8080 reaches the left host :7401"
    );
    assert_eq!(
        tcp_right_to_left(&chain, 7401),
        Probe::TimedOut,
        "only the forwarded port is open"
    );
    // An explicit deny comes before the port-forward's allowance, as in Neutron.
    dockwall.ok(&[
        "rule",
        "add",
        "deny",
        "-d",
        "right-to-left",
        "--from",
        &format!("{RIGHT_HOST}/32"),
    ]);
    let (probe, _) = tcp_probe(
        &chain.right_host,
        &chain.left_host,
        LEFT_HOST,
        SI_RIGHT,
        7401,
        8080,
    );
    assert_eq!(
        probe,
        Probe::TimedOut,
        "a deny from the right host also stops its port-forwarded traffic"
    );
}

#[test]
fn rules_survive_a_restart_of_dockwall_run() {
    let chain = Chain::new();
    let mut dockwall = Dockwall::start(&chain);
    dockwall.ok(&[
        "rule",
        "add",
        "deny",
        "-d",
        "left-to-right",
        "--proto",
        "icmp",
    ]);
    dockwall.ok(&["nat", "add", "masquerade", "--out", "right"]);
    let before = dockwall.ok(&["rule", "list", "--json"]);
    dockwall.stop();
    assert_eq!(dockwall.table(), "", "SIGTERM removes the table");
    dockwall.run();
    assert!(
        !ping(&chain.left_host, RIGHT_HOST),
        "the deny is back after the restart"
    );
    let after = dockwall.ok(&["rule", "list", "--json"]);
    let ids = |text: &str| {
        serde_json::from_str::<serde_json::Value>(text).unwrap()["rules"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| r["id"].clone())
            .collect::<Vec<_>>()
    };
    assert_eq!(ids(&before), ids(&after));
    assert!(dockwall
        .ok(&["status"])
        .contains("firewall (nft table inet dockwall): converged"));
}

#[test]
fn twenty_concurrent_rule_adds_all_land() {
    let chain = Chain::new();
    let dockwall = Dockwall::start(&chain);
    let children: Vec<_> = (0..20)
        .map(|i| {
            let port = (9000 + i).to_string();
            dockwall
                .command(&["rule", "add", "deny", "--proto", "tcp", "--dport", &port])
                .stdout(std::process::Stdio::null())
                .spawn()
                .expect("spawn dockwall rule add")
        })
        .collect();
    for mut child in children {
        assert!(child.wait().expect("wait").success());
    }
    let listing: serde_json::Value =
        serde_json::from_str(&dockwall.ok(&["rule", "list", "--json"])).unwrap();
    let mut ports: Vec<String> = listing["rules"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["destination_port"].as_str().unwrap().to_string())
        .collect();
    ports.sort();
    let expected: Vec<String> = (9000..9020).map(|p| p.to_string()).collect();
    assert_eq!(ports, expected);
    let status = dockwall.cli(&["status"]);
    assert!(
        status.status.success(),
        "{}",
        String::from_utf8_lossy(&status.stdout)
    );
    assert_eq!(tcp_left_to_right(&chain, 9013), Probe::TimedOut);
}

#[test]
fn a_failing_apply_leaves_kernel_and_file_untouched() {
    let chain = Chain::new();
    let dockwall = Dockwall::start(&chain);
    dockwall.ok(&["rule", "add", "deny", "--proto", "tcp", "--dport", "22"]);
    let table = dockwall.table();
    let file = std::fs::read(dockwall.state.rules_file()).unwrap();

    // An nft that appends a command the kernel refuses: the whole transaction must abort.
    let bin = dockwall.state.path().join("failing-nft");
    std::fs::create_dir_all(&bin).unwrap();
    let real = which("nft");
    std::fs::write(
        bin.join("nft"),
        format!("#!/bin/sh\nif [ \"$2\" = \"-f\" ]; then sed 's/]}}$/,{{\"delete\":{{\"table\":{{\"family\":\"inet\",\"name\":\"no_such_table\"}}}}}}]}}/' | {real} \"$@\"; else exec {real} \"$@\"; fi\n"),
    )
    .unwrap();
    std::process::Command::new("chmod")
        .args(["+x"])
        .arg(bin.join("nft"))
        .status()
        .unwrap();
    let path = format!(
        "{}:{}",
        bin.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    for args in [
        vec!["rule", "add", "deny", "--proto", "udp", "--dport", "53"],
        vec!["rule", "add", "deny", "--proto", "tcp", "--dport", "23"],
        vec!["default", "deny"],
    ] {
        let output = dockwall.command(&args).env("PATH", &path).output().unwrap();
        assert!(
            !output.status.success(),
            "{args:?} succeeded through a failing nft"
        );
        assert!(
            String::from_utf8_lossy(&output.stderr).contains("nft -j -f - failed"),
            "{}",
            String::from_utf8_lossy(&output.stderr)
        );
        assert_eq!(dockwall.table(), table, "{args:?} changed the kernel");
        assert_eq!(
            std::fs::read(dockwall.state.rules_file()).unwrap(),
            file,
            "{args:?} changed the file"
        );
    }
}

fn which(command: &str) -> String {
    let output = std::process::Command::new("sh")
        .args(["-c", &format!("command -v {command}")])
        .output()
        .unwrap();
    String::from_utf8_lossy(&output.stdout).trim().to_string()
}

#[test]
fn bad_input_is_refused_and_changes_nothing() {
    let chain = Chain::new();
    let dockwall = Dockwall::start(&chain);
    dockwall.ok(&["rule", "add", "deny", "--proto", "tcp", "--dport", "22"]);
    let table = dockwall.table();
    let file = std::fs::read(dockwall.state.rules_file()).unwrap();
    let bad_set = dockwall.state.path().join("bad.json");
    std::fs::write(&bad_set, r#"{"version":1,"rules":[{"id":1,"action":"deny","direction":"both","colour":"red"}],"next_id":2}"#).unwrap();
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (
            vec!["rule", "add", "deny", "--from", "10.0.0.300/8"],
            "--from",
        ),
        (
            vec!["rule", "add", "deny", "--proto", "tcp", "--dport", "70000"],
            "70000 is outside 1-65535",
        ),
        (
            vec![
                "rule",
                "add",
                "deny",
                "--proto",
                "tcp",
                "--dport",
                "2000:1000",
            ],
            "first port is above the last",
        ),
        (vec!["rule", "delete", "99"], "position"),
        (
            vec!["rule", "delete", "--id", "4242"],
            "no rule has this id",
        ),
        (vec!["rule", "insert", "9", "deny"], "use 1-2"),
        (
            vec![
                "rule",
                "add",
                "deny",
                "--from",
                "10.0.0.0/8",
                "--to",
                "fd00::1",
            ],
            "both be IPv4 or both IPv6",
        ),
        (
            vec!["rule", "add", "deny", "--proto", "tpc"],
            "unknown protocol name",
        ),
        (
            vec!["rule", "add", "deny", "--dport", "22"],
            "a port needs --proto tcp, udp or sctp",
        ),
        (
            vec!["rule", "add", "limit", "--proto", "tcp"],
            "needs a rate",
        ),
        (
            vec!["apply", bad_set.to_str().unwrap()],
            "unknown field `colour`",
        ),
        (
            vec!["nat", "add", "masquerade", "--out", "mgmt"],
            "use left or right",
        ),
    ];
    for (args, needle) in cases {
        let output = dockwall.cli(&args);
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(!output.status.success(), "{args:?} succeeded");
        assert!(
            stderr.contains(needle),
            "{args:?}: expected {needle:?} in {stderr}"
        );
        assert!(!stderr.contains("panicked"), "{stderr}");
        assert_eq!(dockwall.table(), table, "{args:?} changed the kernel");
        assert_eq!(
            std::fs::read(dockwall.state.rules_file()).unwrap(),
            file,
            "{args:?} changed the file"
        );
    }

    // A hand-edited, corrupt state file: edits and a start are refused, nothing runs open.
    std::fs::write(dockwall.state.rules_file(), "{\"version\": 1, \"rules\": [").unwrap();
    let output = dockwall.cli(&["rule", "add", "allow"]);
    assert!(
        String::from_utf8_lossy(&output.stderr).contains("state file"),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert_eq!(dockwall.table(), table);
}

#[test]
fn corrupt_state_file_at_start_refuses_to_run() {
    let chain = Chain::new();
    let state = docknfv_tests::dockwall::StateDir::new();
    std::fs::create_dir_all(state.path()).unwrap();
    std::fs::write(state.rules_file(), "not json").unwrap();
    let before = chain.si.routing_snapshot();
    let state_dir = state.path().to_str().unwrap();
    // `--on-exit keep`: routing installed before the rule set was read would outlive the
    // refused start and forward unfiltered.
    let run = ["--state-dir", state_dir, "run", "--on-exit", "keep"];
    let mut process = docknfv_tests::Vnf::start(&chain.si, "dockwall", &run);
    assert!(!process.wait_exit(Duration::from_secs(10)).success());
    let log = process.log();
    assert!(
        log.contains("invalid state file") && log.contains("Fix or remove the file"),
        "{log}"
    );
    assert!(
        !ping(&chain.left_host, RIGHT_HOST),
        "the SI must not forward with an unreadable rule set"
    );
    assert_eq!(
        chain.si.routing_snapshot(),
        before,
        "the refused start installed routing"
    );

    // The same SI with a readable rule set does forward: the ping above could have passed.
    std::fs::remove_file(state.rules_file()).unwrap();
    let process = docknfv_tests::Vnf::start(&chain.si, "dockwall", &run);
    process.wait_ready();
    assert!(
        ping_eventually(&chain.left_host, RIGHT_HOST, 3),
        "{}",
        process.log()
    );
}

/// `status` exits 1 and its output names `difference`.
fn assert_status_names(dockwall: &Dockwall, difference: &str) {
    let status = dockwall.cli(&["status"]);
    let stdout = String::from_utf8_lossy(&status.stdout);
    assert_eq!(status.status.code(), Some(1), "{stdout}");
    assert!(
        stdout.contains(difference),
        "{difference:?} not in:\n{stdout}"
    );
}

#[test]
fn a_table_flushed_or_edited_by_hand_fails_status_and_run_repairs_it() {
    let chain = Chain::new();
    let mut dockwall = Dockwall::start(&chain);
    dockwall.ok(&[
        "rule",
        "add",
        "deny",
        "-d",
        "left-to-right",
        "--proto",
        "icmp",
    ]);
    for source in ["10.9.0.1", "10.9.0.2"] {
        dockwall.ok(&[
            "rule", "add", "deny", "--proto", "tcp", "--from", source, "--dport", "22",
        ]);
    }
    dockwall.stop();
    // A check interval longer than the test: only `status` looks at first.
    dockwall.run_with(&["--verify-every", "3600", "--on-exit", "keep"]);
    assert!(!ping(&chain.left_host, RIGHT_HOST), "the deny holds");
    assert!(dockwall.cli(&["status"]).status.success());

    // One set element deleted by hand.
    let table = dockwall.table_json();
    let objects = table["nftables"].as_array().expect("nftables array");
    let set = objects
        .iter()
        .filter_map(|o| o.get("set"))
        .find(|s| s["elem"].as_array().is_some_and(|e| e.len() == 2))
        .expect("a set holding the two tcp sources");
    let element = &set["elem"][0];
    let value = element["elem"].get("val").unwrap_or(element);
    let name = set["name"].as_str().expect("set name");
    let delete = serde_json::json!({"nftables": [{"delete": {"element": {
        "family": "inet", "table": "dockwall", "name": name, "elem": [value]}}}]});
    run_checked(dockwall.si.command("nft").args(["-j", &delete.to_string()]));
    assert_status_names(
        &dockwall,
        &format!("set {name} holds 1 elements, the stored rules compile to 2"),
    );

    // One rule deleted by hand.
    let rule = objects
        .iter()
        .filter_map(|o| o.get("rule"))
        .find(|r| r["comment"] == "rule 1")
        .expect("the icmp deny, commented rule 1");
    let (rule_chain, handle) = (
        rule["chain"].as_str().expect("chain").to_string(),
        rule["handle"].to_string(),
    );
    run_checked(dockwall.si.command("nft").args([
        "delete",
        "rule",
        "inet",
        "dockwall",
        &rule_chain,
        "handle",
        &handle,
    ]));
    assert_status_names(&dockwall, &format!("chain {rule_chain} holds "));

    // The whole table flushed: the marker chain survives, the rules do not.
    run_checked(
        dockwall
            .si
            .command("nft")
            .args(["flush", "table", "inet", "dockwall"]),
    );
    assert_status_names(&dockwall, "holds 0 rules");
    assert!(
        ping(&chain.left_host, RIGHT_HOST),
        "the flush opened the way"
    );

    // A restart finds the marker but not the rules, and replaces the table: at start-up,
    // not by a periodic check (none within the test).
    dockwall.stop();
    dockwall.run_with(&["--verify-every", "3600"]);
    assert!(
        dockwall.cli(&["status"]).status.success(),
        "restart repaired"
    );
    assert!(!ping(&chain.left_host, RIGHT_HOST), "the deny is back");

    // Flushed under a running `run`: its next check repairs it (bounded wait).
    dockwall.stop();
    dockwall.run_with(&["--verify-every", "1"]);
    run_checked(
        dockwall
            .si
            .command("nft")
            .args(["flush", "table", "inet", "dockwall"]),
    );
    dockwall.wait_healthy(
        Duration::from_secs(15),
        "run did not repair the flushed table",
    );
    assert!(!ping(&chain.left_host, RIGHT_HOST), "the deny is back");
    let log = dockwall.running().log();
    assert!(
        log.contains("differed from the stored rules; table replaced"),
        "{log}"
    );
}

/// One edit through `session` inside the SI; where it went.
fn session_edit(
    dockwall: &Dockwall,
    session: &mut Session,
    change: impl FnOnce(&mut RuleSet) + Send,
) -> Applied {
    let assignment = dockwall.assignment();
    let store = Store::new(dockwall.state.path());
    dockwall.si.run(|| {
        session
            .edit(&store, &assignment, false, |set| {
                change(set);
                Ok(())
            })
            .expect("session edit")
            .applied
    })
}

/// Adds a deny rule for TCP to port 22 from `source` through `session` inside the SI.
fn session_add(dockwall: &Dockwall, session: &mut Session, source: &str) -> Applied {
    session_edit(dockwall, session, |set| {
        let rule = serde_json::from_value(serde_json::json!({
            "id": set.allocate_id(), "action": "deny", "direction": "both",
            "protocol": "tcp", "source": source, "destination_port": "22"}))
        .expect("a rule");
        set.rules.push(rule);
    })
}

#[test]
fn a_session_sees_cli_edits_made_between_its_own() {
    let chain = Chain::new();
    let dockwall = Dockwall::start(&chain);
    let mut session = Session::default();
    session_add(&dockwall, &mut session, "10.7.0.1/32");
    dockwall.ok(&["rule", "add", "deny", "--proto", "udp", "--dport", "53"]);
    session_add(&dockwall, &mut session, "10.7.0.2/32");
    session_add(&dockwall, &mut session, "10.7.0.3/32");
    let listing: serde_json::Value =
        serde_json::from_str(&dockwall.ok(&["rule", "list", "--json"])).unwrap();
    let described: Vec<String> = listing["rules"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| format!("{} {}", r["protocol"], r["source"]))
        .collect();
    assert_eq!(
        described,
        [
            r#""tcp" "10.7.0.1/32""#,
            r#""udp" null"#,
            r#""tcp" "10.7.0.2/32""#,
            r#""tcp" "10.7.0.3/32""#
        ]
    );
    let status = dockwall.cli(&["status"]);
    assert!(
        status.status.success(),
        "{}",
        String::from_utf8_lossy(&status.stdout)
    );
}

/// The table as nft lists it, comparable across how it was built: no handles, counters
/// zeroed, set elements sorted (a hash set lists in bucket order).
fn comparable_table(dockwall: &Dockwall) -> serde_json::Value {
    fn normalize(value: &mut serde_json::Value) {
        match value {
            serde_json::Value::Object(object) => {
                object.remove("handle");
                object.remove("metainfo");
                if let Some(counter) = object.get_mut("counter") {
                    *counter = serde_json::json!({"packets": 0, "bytes": 0});
                }
                object.values_mut().for_each(normalize);
                if let Some(serde_json::Value::Array(elements)) = object.get_mut("elem") {
                    elements.sort_by_key(|e| e.to_string());
                }
            }
            serde_json::Value::Array(items) => items.iter_mut().for_each(normalize),
            _ => {}
        }
    }
    let mut table = dockwall.table_json();
    normalize(&mut table);
    table
}

/// The counter of the set element commented `comment`: (packets, bytes).
fn element_counter(dockwall: &Dockwall, comment: &str) -> (u64, u64) {
    let table = dockwall.table_json();
    let element = table["nftables"]
        .as_array()
        .expect("nftables array")
        .iter()
        .filter_map(|o| o["set"]["elem"].as_array())
        .flatten()
        .find(|e| e["elem"]["comment"] == comment)
        .unwrap_or_else(|| panic!("no element commented {comment:?}"));
    let counter = &element["elem"]["counter"];
    (
        counter["packets"].as_u64().expect("packets"),
        counter["bytes"].as_u64().expect("bytes"),
    )
}

#[test]
fn element_edits_go_over_nfnetlink_and_match_what_nft_builds() {
    let chain = Chain::new();
    let dockwall = Dockwall::start(&chain);
    let mut session = Session::default();
    // Two rules of one shape make a new set (through nft); more of that shape are elements.
    session_add(&dockwall, &mut session, "10.7.0.1/32");
    session_add(&dockwall, &mut session, "10.7.0.2/32");
    let added = session_add(&dockwall, &mut session, &format!("{LEFT_HOST}/32"));
    assert!(
        matches!(added, Applied::Kernel(ApplyKind::Netlink)),
        "an element add goes over nfnetlink: {added:?}"
    );
    assert_eq!(tcp_left_to_right(&chain, 22), Probe::TimedOut, "denied");
    assert_eq!(tcp_left_to_right(&chain, 23), Probe::Passed, "not denied");
    let counted = element_counter(&dockwall, "rule 3");
    assert!(counted.0 > 0, "the new element counts: {counted:?}");

    let added = session_add(&dockwall, &mut session, "10.7.0.4/32");
    let removed = session_edit(&dockwall, &mut session, |set| {
        set.rules
            .retain(|r| r.source != Some("10.7.0.2/32".parse().expect("a net")));
    });
    for applied in [added, removed] {
        assert!(
            matches!(applied, Applied::Kernel(ApplyKind::Netlink)),
            "{applied:?}"
        );
    }
    assert_eq!(
        element_counter(&dockwall, "rule 3"),
        counted,
        "counter kept"
    );
    assert_eq!(
        tcp_left_to_right(&chain, 22),
        Probe::TimedOut,
        "still denied"
    );
    let status = dockwall.cli(&["status"]);
    assert!(
        status.status.success(),
        "{}",
        String::from_utf8_lossy(&status.stdout)
    );

    // What nft builds from the same rules, from scratch.
    let incremental = comparable_table(&dockwall);
    let assignment = dockwall.assignment();
    let store = Store::new(dockwall.state.path());
    dockwall.si.run(|| {
        let rules = store.lock().and_then(|l| l.load()).expect("stored rules");
        replace(&compile(&rules, Sides::from_assignment(&assignment))).expect("replace");
    });
    assert_eq!(incremental, comparable_table(&dockwall));
}

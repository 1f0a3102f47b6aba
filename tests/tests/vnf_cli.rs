//! The VNF binaries as an operator meets them: global mode through `dockvpn run`, and bad
//! input refused with a clear message and nothing changed.

use std::time::Duration;

use docknfv_tests::chain::{LEFT_GATEWAY, LEFT_HOST, LEFT_HOST_NET, RIGHT_GATEWAY, RIGHT_HOST};
use docknfv_tests::openvpn::text as output_text;
use docknfv_tests::traffic::ping;
use docknfv_tests::{Chain, Vnf};

#[test]
fn dockvpn_routes_default_right_and_configured_left_networks_left() {
    let chain = Chain::new();
    let mut dockvpn = Vnf::start(
        &chain.si,
        "dockvpn",
        &["run", "--left-route", LEFT_HOST_NET],
    );
    dockvpn.wait_ready();
    let main = chain.si.ip(&["route", "show", "table", "main"]);
    assert!(
        main.contains(&format!("default via {RIGHT_GATEWAY} dev eth1 proto 245")),
        "{main}"
    );
    assert!(
        main.contains(&format!(
            "{LEFT_HOST_NET} via {LEFT_GATEWAY} dev eth0 proto 245"
        )),
        "{main}"
    );
    assert!(ping(&chain.si, LEFT_HOST));
    assert!(ping(&chain.si, RIGHT_HOST));

    assert!(dockvpn.terminate().success(), "{}", dockvpn.log());
    let main = chain.si.ip(&["route", "show", "table", "main"]);
    assert!(
        !main.contains("proto 245"),
        "routes left after SIGTERM:\n{main}"
    );
}

#[test]
fn on_exit_keep_leaves_forwarding_in_place() {
    let chain = Chain::new();
    let mut dockwall = Vnf::start(&chain.si, "dockwall", &["run", "--on-exit", "keep"]);
    dockwall.wait_ready();
    assert!(dockwall.terminate().success(), "{}", dockwall.log());
    assert!(
        ping(&chain.left_host, RIGHT_HOST),
        "forwarding stopped although --on-exit keep"
    );
}

/// Runs `dockwall ARGS` in the SI, expects a failure whose output contains every `needle`,
/// and checks that the SI's routing did not change.
fn refused(chain: &Chain, args: &[&str], needles: &[&str]) {
    let before = chain.si.routing_snapshot();
    let mut dockwall = Vnf::start(&chain.si, "dockwall", args);
    let status = dockwall.wait_exit(Duration::from_secs(10));
    let log = dockwall.log();
    assert!(!status.success(), "{args:?} succeeded:\n{log}");
    for needle in needles {
        assert!(
            log.contains(needle),
            "{args:?}: expected {needle:?} in:\n{log}"
        );
    }
    assert!(!log.contains("panicked"), "{log}");
    assert_eq!(
        chain.si.routing_snapshot(),
        before,
        "{args:?} changed routing"
    );
}

#[test]
fn bad_input_is_refused_with_a_clear_message_and_nothing_changes() {
    let chain = Chain::new();
    refused(
        &chain,
        &["run", "--right", "eth9", "--side-timeout", "1"],
        &[
            "gave up after",
            "right: no interface matches name:eth9",
            "Interfaces present: eth0 (left), eth1",
        ],
    );
    refused(
        &chain,
        &[
            "run",
            "--left",
            "mac:02:00:de:ad:be:ef",
            "--side-timeout",
            "1",
        ],
        &[
            "left: no interface matches mac:02:00:de:ad:be:ef",
            "--side-timeout",
        ],
    );
    refused(
        &chain,
        &["run", "--left", "10.0.0.0/8", "--right", "10.0.2.0/24"],
        &[
            "left and right side selectors overlap",
            "left=cidr:10.0.0.0/8, right=cidr:10.0.2.0/24",
        ],
    );
    refused(
        &chain,
        &["run", "--left-table", "0"],
        &["--left-table", "table id", "0 is not a table"],
    );
    refused(
        &chain,
        &["run", "--left-table", "1002"],
        &["right table id", "each side needs its own table"],
    );
    refused(
        &chain,
        &["run", "--left-gateway", "10.9.9.1"],
        &["left gateway 10.9.9.1 is outside the left subnet 10.0.1.0/24"],
    );
    refused(
        &chain,
        &["run", "--left", "no/slash"],
        &["invalid side selector"],
    );
    refused(
        &chain,
        &["run", "--no-such-flag"],
        &["unexpected argument '--no-such-flag'"],
    );
}

#[test]
fn status_reports_the_routing_and_fails_the_health_check_when_not_converged() {
    let chain = Chain::new();
    let state = docknfv_tests::dockwall::StateDir::new();
    let state_dir = state.path().to_str().unwrap();
    let dockwall_bin = docknfv_tests::vnf::binary("dockwall");
    let status = |json: bool| {
        let mut args = vec!["--state-dir", state_dir, "status"];
        if json {
            args.push("--json");
        }
        chain.si.exec(dockwall_bin.to_str().unwrap(), &args)
    };

    let before = status(false);
    assert!(!before.status.success(), "healthy before run");
    let text = String::from_utf8_lossy(&before.stdout);
    assert!(text.contains("NOT converged"), "{text}");

    let mut dockwall = Vnf::start(&chain.si, "dockwall", &["--state-dir", state_dir, "run"]);
    dockwall.wait_ready();
    let during = status(true);
    assert!(
        during.status.success(),
        "{}",
        String::from_utf8_lossy(&during.stderr)
    );
    let report: serde_json::Value = serde_json::from_slice(&during.stdout).expect("status JSON");
    assert_eq!(report["healthy"], true, "{report}");
    assert_eq!(report["firewall"]["converged"], true, "{report}");
    let report = &report["routing"];
    assert_eq!(report["converged"], true, "{report}");
    assert_eq!(report["sides"][0]["ready"]["name"], "eth0");
    assert_eq!(report["sides"][1]["ready"]["address"], "10.0.2.2/24");
    assert_eq!(
        report["routing"]["rules"].as_array().map(Vec::len),
        Some(4),
        "{report}"
    );
    assert_eq!(
        report["routing"]["routes"].as_array().map(Vec::len),
        Some(4),
        "{report}"
    );
    let text = String::from_utf8_lossy(&status(false).stdout).into_owned();
    assert!(
        text.contains("route table 1001 0.0.0.0/0 via 10.0.1.1 dev eth0"),
        "{text}"
    );

    assert!(dockwall.terminate().success());
    assert!(
        !status(false).status.success(),
        "healthy after the routing was removed"
    );
}

/// `BINARY ARGS` with no kernel involved (help and parse errors): its output, whatever the
/// exit status.
fn run_binary(binary_name: &str, args: &[&str]) -> std::process::Output {
    std::process::Command::new(docknfv_tests::vnf::binary(binary_name))
        .args(args)
        .env_remove("RUST_LOG")
        .output()
        .unwrap_or_else(|e| panic!("cannot run {binary_name}: {e}"))
}

#[test]
fn each_help_shows_only_the_options_its_subcommand_takes() {
    const RUN_ONLY: [&str; 4] = ["--dhcp", "--on-exit", "--side-timeout", "--left-table"];
    for (binary_name, args) in [
        ("dockwall", &["rule", "add", "--help"][..]),
        ("dockvpn", &["pki", "init", "--help"][..]),
        ("dockvpn", &["client", "add", "--help"][..]),
    ] {
        let output = run_binary(binary_name, args);
        let help = output_text(&output);
        assert!(output.status.success(), "{binary_name} {args:?}: {help}");
        for option in RUN_ONLY {
            assert!(
                !help.contains(option),
                "{binary_name} {args:?} offers {option}:\n{help}"
            );
        }
    }
    // The same options are where they apply, grouped under headings.
    let help = output_text(&run_binary("dockwall", &["run", "--help"]));
    for expected in RUN_ONLY
        .iter()
        .chain(&["Sides:", "Routing:", "DHCP:", "Output:"])
    {
        assert!(
            help.contains(expected),
            "dockwall run --help lacks {expected}:\n{help}"
        );
    }
    let help = output_text(&run_binary("dockvpn", &["run", "--help"]));
    for expected in ["--dhcp", "--left-route", "--pool", "VPN:", "Firewall:"] {
        assert!(
            help.contains(expected),
            "dockvpn run --help lacks {expected}:\n{help}"
        );
    }

    for (binary_name, args) in [
        (
            "dockwall",
            &["rule", "add", "deny", "--on-exit", "keep"][..],
        ),
        ("dockvpn", &["client", "add", "x", "--on-exit", "keep"][..]),
    ] {
        let output = run_binary(binary_name, args);
        let text = output_text(&output);
        assert_eq!(
            output.status.code(),
            Some(2),
            "{binary_name} {args:?}: {text}"
        );
        assert!(
            text.contains("unexpected argument '--on-exit'"),
            "{binary_name} {args:?}: {text}"
        );
    }
}

#[test]
fn a_ufw_style_rule_gets_the_equivalent_flags_as_a_hint() {
    let output = run_binary(
        "dockwall",
        &[
            "rule",
            "add",
            "allow",
            "from",
            "10.0.0.0/8",
            "to",
            "any",
            "port",
            "22",
        ],
    );
    let text = output_text(&output);
    assert_eq!(output.status.code(), Some(2), "{text}");
    assert!(
        text.contains(
            "did you mean: dockwall rule add allow --from 10.0.0.0/8 --dport 22 --proto tcp"
        ),
        "{text}"
    );
}

/// The container's environment reaches `status` (HEALTHCHECK) and `docker exec` alike: an
/// environment variable for an option a subcommand does not take is ignored, not an error.
#[test]
fn run_only_environment_is_ignored_by_status_and_rule_edits_and_mgmt_is_optional() {
    let chain = Chain::new();
    let state = docknfv_tests::dockwall::StateDir::new();
    let state_dir = state.path().to_str().unwrap();
    let dockwall_bin = docknfv_tests::vnf::binary("dockwall");
    let with_run_env = |args: &[&str]| {
        chain
            .si
            .command(dockwall_bin.to_str().unwrap())
            .arg("--state-dir")
            .arg(state_dir)
            .args(args)
            .env("VNF_ON_EXIT", "keep")
            .env("VNF_SIDE_TIMEOUT", "5")
            .env("VNF_DHCP_HOOK", "/bin/true")
            .env("VNF_LEFT_TABLE", "1001")
            .env_remove("RUST_LOG")
            .output()
            .expect("run dockwall")
    };
    let mut dockwall = Vnf::start(&chain.si, "dockwall", &["--state-dir", state_dir, "run"]);
    dockwall.wait_ready();

    let status = with_run_env(&["status"]);
    let text = output_text(&status);
    assert!(status.status.success(), "{text}");
    assert!(text.contains("mgmt: none (optional)"), "{text}");
    assert!(!text.contains("no Ethernet interface #3"), "{text}");
    let added = with_run_env(&["rule", "add", "allow", "--proto", "icmp"]);
    assert!(added.status.success(), "{}", output_text(&added));
    assert!(dockwall.terminate().success());
}

#[test]
fn rule_errors_name_what_was_typed_and_the_position_and_id_the_rule_would_get() {
    docknfv_tests::prereq::require_command("nft", "nftables");
    let ns = docknfv_tests::Netns::new("wording");
    let cli =
        docknfv_tests::dockwall::Dockwall::idle(&ns, docknfv_tests::dockwall::StateDir::new());
    let dockwall = |args: &[&str]| cli.cli(args);
    let refused = |args: &[&str], needle: &str| {
        let output = dockwall(args);
        let text = output_text(&output);
        assert_eq!(output.status.code(), Some(1), "{args:?}: {text}");
        assert!(
            text.contains(needle),
            "{args:?}: expected {needle:?} in {text}"
        );
        text
    };

    let text = refused(
        &["rule", "add", "deny", "--dport", "22"],
        "invalid --dport \"22\": a port needs --proto tcp, udp or sctp",
    );
    assert!(
        !text.contains("\"any\""),
        "the user never typed any: {text}"
    );

    // With id 1 used and deleted, the next rule is #1 with id 2; the error says both.
    assert!(dockwall(&["rule", "add", "deny", "--proto", "icmp"])
        .status
        .success());
    assert!(dockwall(&["rule", "delete", "1"]).status.success());
    refused(
        &["rule", "add", "deny", "--proto", "icmp", "--dport", "22"],
        "invalid protocol \"icmp\": the new rule (position 1, id 2): port 22 needs protocol tcp",
    );
    refused(
        &["nat", "add", "masquerade", "--out", "mgmt"],
        "invalid out \"mgmt\": the new NAT rule (position 1, id 2): use left or right",
    );
}

#[test]
fn a_rule_edit_where_no_dockwall_runs_is_stored_says_so_and_applies_at_the_next_run() {
    let chain = Chain::new();
    let state = docknfv_tests::dockwall::StateDir::new();
    let state_dir = state.path().to_str().unwrap();
    let dockwall_bin = docknfv_tests::vnf::binary("dockwall");
    let output = chain.si.exec(
        dockwall_bin.to_str().unwrap(),
        &[
            "--state-dir",
            state_dir,
            "rule",
            "add",
            "deny",
            "-d",
            "left-to-right",
            "--proto",
            "icmp",
        ],
    );
    let text = output_text(&output);
    assert!(output.status.success(), "{text}");
    for needle in [
        "rule 1 added at position 1 (stored, not applied)",
        "this network namespace has no Dockwall table (nft inet dockwall)",
        "Is this the SI's namespace?",
        "docker exec <si> dockwall",
        "Is `dockwall run` running?",
        "rules.json",
    ] {
        assert!(text.contains(needle), "expected {needle:?} in {text}");
    }
    let tables = chain.si.exec("nft", &["list", "tables"]);
    assert!(tables.status.success(), "nft: {}", output_text(&tables));
    assert!(
        !String::from_utf8_lossy(&tables.stdout).contains("dockwall"),
        "the edit created a table without `run`"
    );
    let stored = std::fs::read_to_string(state.rules_file()).expect("rules stored");
    assert!(stored.contains("\"icmp\""), "{stored}");

    let mut dockwall = Vnf::start(&chain.si, "dockwall", &["--state-dir", state_dir, "run"]);
    dockwall.wait_ready();
    assert!(
        !ping(&chain.left_host, RIGHT_HOST),
        "the stored deny applies once `run` starts"
    );
    let deleted = chain.si.exec(
        dockwall_bin.to_str().unwrap(),
        &["--state-dir", state_dir, "rule", "delete", "1"],
    );
    assert!(deleted.status.success(), "{}", output_text(&deleted));
    assert!(
        ping(&chain.left_host, RIGHT_HOST),
        "the deny was what stopped it"
    );
    assert!(dockwall.terminate().success());
}

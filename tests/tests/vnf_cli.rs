//! The VNF binaries as an operator meets them: global mode through `dockvpn run`, and bad
//! input refused with a clear message and nothing changed.

use std::time::Duration;

use docknfv_tests::chain::{LEFT_GATEWAY, LEFT_HOST, LEFT_HOST_NET, RIGHT_GATEWAY, RIGHT_HOST};
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
    assert!(dockwall.terminate().success());
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

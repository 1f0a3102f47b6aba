//! DHCP progress in `status`, and health that waits for the lease: a `--dhcp left` Dockvpn
//! whose left leg already has a static address (as Docker gives it), first with no DHCP
//! server on the left network, then with a real dnsmasq that starts answering.

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use docknfv_tests::dnsmasq::Dnsmasq;
use docknfv_tests::prereq::require_command;
use docknfv_tests::vnf::binary;
use docknfv_tests::{Chain, Vnf};
use serde_json::Value;

const RUN: [&str; 5] = ["run", "--dhcp", "left", "--side-timeout", "30"];
const NO_OFFER: &str = "no DHCPOFFER on left after";

/// `dockvpn status --json` beside `vnf`, configured as `run` is (env, as a HEALTHCHECK
/// shares the container's): whether it exits 0, and the report.
fn status_json(chain: &Chain, vnf: &Vnf) -> (bool, Value) {
    vnf_status_json(chain, vnf, "dockvpn")
}

fn vnf_status_json(chain: &Chain, vnf: &Vnf, binary_name: &str) -> (bool, Value) {
    let output = vnf_status(chain, vnf, binary_name, &["status", "--json"]);
    let report = serde_json::from_slice(&output.stdout).unwrap_or_else(|error| {
        panic!(
            "status --json is not JSON ({error}): {}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        )
    });
    (output.status.success(), report)
}

/// `dockvpn status` as text.
fn status_text(chain: &Chain, vnf: &Vnf) -> String {
    let output = vnf_status(chain, vnf, "dockvpn", &["status"]);
    String::from_utf8_lossy(&output.stdout).into_owned()
}

fn vnf_status(chain: &Chain, vnf: &Vnf, binary_name: &str, args: &[&str]) -> std::process::Output {
    chain
        .si
        .command(binary(binary_name).to_str().expect("utf-8 path"))
        .args(args)
        .env("DOCKVPN_STATE_DIR", vnf.state_dir())
        .env("DOCKWALL_STATE_DIR", vnf.state_dir())
        .env("VNF_DHCP", "left")
        .output()
        .expect("run dockvpn status")
}

/// The left side's DHCP client as `status --json` shows it.
fn left_dhcp_client(report: &Value) -> &Value {
    report["routing"]["sides"]
        .as_array()
        .and_then(|sides| sides.iter().find(|s| s["side"] == "left"))
        .map(|left| &left["dhcp_client"])
        .unwrap_or_else(|| panic!("no left side in {report:#}"))
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock after 1970")
        .as_secs()
}

/// Whether anything in the SI listens on UDP 1194 (the OpenVPN port).
fn vpn_port_open(chain: &Chain) -> bool {
    require_command("ss", "iproute2");
    let output = chain.si.exec("ss", &["-Hlun", "sport = :1194"]);
    assert!(output.status.success(), "{output:?}");
    !output.stdout.is_empty()
}

#[test]
fn without_a_dhcp_server_the_side_is_selecting_unhealthy_and_reported_once() {
    let chain = Chain::new();
    let dockvpn = Vnf::start(&chain.si, "dockvpn", &RUN);
    dockvpn.wait_ready();
    // What is asserted is the log of the first 15 s itself: wait them out.
    std::thread::sleep(
        (dockvpn.started + Duration::from_secs(15)).saturating_duration_since(Instant::now()),
    );
    let log = dockvpn.log();
    let reports: Vec<&str> = log.lines().filter(|l| l.contains(NO_OFFER)).collect();
    assert_eq!(reports.len(), 1, "one no-offer line in 15 s:\n{log}");
    assert!(
        reports[0].contains(
            "no DHCPOFFER on left after 10 s (still trying; is a DHCP server on this network?)"
        ),
        "{}",
        reports[0]
    );

    let (healthy, report) = status_json(&chain, &dockvpn);
    assert!(!healthy, "healthy without a lease:\n{report:#}");
    assert_eq!(report["healthy"], false, "{report:#}");
    let client = left_dhcp_client(&report);
    assert_eq!(client["state"], "selecting", "{report:#}");
    assert_eq!(client["offers_seen"], 0, "{report:#}");
    assert!(client.get("lease").is_none(), "{report:#}");
    let selecting_for = unix_now().saturating_sub(client["since_unix"].as_u64().expect("since"));
    assert!(
        (13..=17).contains(&selecting_for),
        "selecting since the start, {selecting_for} s ago:\n{report:#}"
    );
    assert!(
        report["routing"]["problems"]
            .as_array()
            .is_some_and(|problems| problems.iter().any(|p| p
                .as_str()
                .is_some_and(|p| p.starts_with("left side has no DHCP lease yet: selecting")))),
        "{report:#}"
    );
    let text = status_text(&chain, &dockvpn);
    assert!(
        text.contains("dhcp  left selecting since")
            && text.contains("0 offers seen")
            && text.contains("VPN server: not serving until the DHCP lease is bound"),
        "{text}"
    );
    assert!(
        !vpn_port_open(&chain),
        "the VPN port is open without a lease"
    );
}

/// `binary_name run --dhcp left` in a chain without a DHCP server, once its client has
/// published that it is selecting (within a second of the start); checks that `status`
/// is then not healthy, and returns its report.
fn selecting_vnf(binary_name: &str) -> (Chain, Vnf, Value) {
    let chain = Chain::new();
    let vnf = Vnf::start(&chain.si, binary_name, &RUN);
    vnf.wait_ready();
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let (healthy, report) = vnf_status_json(&chain, &vnf, binary_name);
        if left_dhcp_client(&report)["state"] == "selecting" {
            assert!(!healthy, "healthy while selecting:\n{report:#}");
            assert_eq!(report["healthy"], false, "{report:#}");
            return (chain, vnf, report);
        }
        assert!(
            Instant::now() < deadline,
            "the client never published selecting:\n{report:#}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn dockwall_is_not_healthy_before_its_lease() {
    let (_chain, _dockwall, report) = selecting_vnf("dockwall");
    assert_eq!(
        report["firewall"]["converged"], true,
        "only the lease is missing:\n{report:#}"
    );
}

#[test]
fn health_and_the_vpn_port_wait_for_the_lease() {
    let (chain, dockvpn, before) = selecting_vnf("dockvpn");
    assert!(
        !vpn_port_open(&chain),
        "the VPN port is open before the lease:\n{before:#}"
    );

    let _dnsmasq = Dnsmasq::start(
        &chain.left_gateway,
        "wan",
        "10.0.1.50,10.0.1.99,255.255.255.0,2m",
        &["option:classless-static-route,192.168.10.0/24,10.0.1.1"],
    );
    // Every answer until health is green: a port open or a healthy status only with a lease.
    let deadline = Instant::now() + Duration::from_secs(40);
    let report = loop {
        let port_open = vpn_port_open(&chain);
        let (healthy, report) = status_json(&chain, &dockvpn);
        let bound = left_dhcp_client(&report)["state"] == "bound";
        assert!(
            bound || !(port_open || healthy),
            "port open {port_open}, healthy {healthy} before the lease:\n{report:#}"
        );
        if healthy {
            break report;
        }
        assert!(
            Instant::now() < deadline,
            "never healthy:\n{report:#}\n{}",
            dockvpn.log()
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    assert!(vpn_port_open(&chain));
    let lease = &left_dhcp_client(&report)["lease"];
    assert!(
        lease["address"]
            .as_str()
            .is_some_and(|a| a.starts_with("10.0.1.")),
        "{report:#}"
    );
    let left = lease["bound_until_unix"]
        .as_u64()
        .expect("bound until")
        .saturating_sub(unix_now());
    assert!((100..=120).contains(&left), "a 2 min lease, {left} s left");
    let log = dockvpn.log();
    let position = |needle: &str| {
        log.find(needle)
            .unwrap_or_else(|| panic!("no {needle:?} in the log:\n{log}"))
    };
    assert!(
        position("DHCP lease applied") < position("VPN server listening"),
        "the server served before the lease:\n{log}"
    );
    let text = status_text(&chain, &dockvpn);
    assert!(
        text.contains("dhcp  left bound 10.0.1.") && text.contains("s left), renewing at"),
        "{text}"
    );
}

//! `dockwall import --fwaas` with what the Neutron FWaaS v2 API returns, in the namespace
//! chain: Neutron's semantics (a direction with a policy ends in an implicit deny, one
//! without is open, `ip_version` binds a rule without addresses), errors that name the JSON
//! path, and export → import giving the same rules.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use docknfv_tests::chain::{LEFT_HOST, RIGHT_HOST};
use docknfv_tests::dockwall::{Dockwall, StateDir};
use docknfv_tests::netns::output_with_stdin;
use docknfv_tests::traffic::{ping, ping_eventually, tcp, udp_probe, Probe};
use docknfv_tests::{Chain, Netns};

/// The three response bodies written from the API reference: `GET firewall_groups/{id}`,
/// `GET firewall_policies`, `GET firewall_rules`, every documented field present.
fn fixtures() -> Vec<PathBuf> {
    let directory = Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/fwaas");
    [
        "firewall-group.json",
        "firewall-policies.json",
        "firewall-rules.json",
    ]
    .iter()
    .map(|name| directory.join(name))
    .collect()
}

fn import_args(files: &[PathBuf]) -> Vec<&str> {
    let mut args = vec!["import", "--fwaas"];
    args.extend(files.iter().map(|f| f.to_str().expect("utf-8 path")));
    args
}

#[test]
fn api_response_bodies_import_and_traffic_follows_the_policies() {
    let chain = Chain::new();
    let dockwall = Dockwall::start(&chain);
    let (left, right) = (&chain.left_host, &chain.right_host);
    dockwall.ok(&import_args(&fixtures()));

    // Ingress (right → left): allow tcp/80 to the left hosts, reject 8000:8080, a disabled
    // ssh allow, then FWaaS's implicit deny.
    assert_eq!(tcp(right, left, LEFT_HOST, 80), Probe::Passed);
    assert_eq!(tcp(right, left, LEFT_HOST, 8000), Probe::Refused, "reject");
    assert_eq!(
        tcp(right, left, LEFT_HOST, 22),
        Probe::TimedOut,
        "a disabled rule allows nothing"
    );
    assert!(!ping(right, LEFT_HOST), "implicit deny");
    // Egress (left → right): deny udp/5301 to the right host, allow all other IPv4.
    assert_eq!(udp_probe(left, right, RIGHT_HOST, 5301), Probe::TimedOut);
    assert_eq!(udp_probe(left, right, RIGHT_HOST, 5302), Probe::Passed);
    assert_eq!(tcp(left, right, RIGHT_HOST, 7000), Probe::Passed);
    assert!(ping(left, RIGHT_HOST));

    let listed: serde_json::Value =
        serde_json::from_str(&dockwall.ok(&["rule", "list", "--json"])).unwrap();
    assert_eq!(listed["right_to_left_policy"], "drop");
    assert_eq!(listed["left_to_right_policy"], "drop");
    let http = &listed["rules"][0];
    assert_eq!(http["name"], "allow-http");
    assert!(http["packets"].as_u64().unwrap() > 0, "{http}");
}

#[test]
fn an_ingress_policy_allowing_only_http_drops_other_right_to_left_and_leaves_left_to_right() {
    let chain = Chain::new();
    let dockwall = Dockwall::start(&chain);
    let (left, right) = (&chain.left_host, &chain.right_host);
    assert_eq!(
        tcp(right, left, LEFT_HOST, 7080),
        Probe::Passed,
        "open before the import"
    );
    let state = dockwall.state.path();
    let group = state.join("group.json");
    std::fs::write(
        &group,
        r#"{"firewall_group": {"id": "g", "ingress_firewall_policy_id": "in",
            "egress_firewall_policy_id": null}}"#,
    )
    .unwrap();
    let policy = state.join("policy.json");
    std::fs::write(
        &policy,
        r#"{"firewall_policy": {"id": "in", "firewall_rules": ["http"]}}"#,
    )
    .unwrap();
    let mut command = dockwall.command(&[
        "import",
        "--fwaas",
        group.to_str().unwrap(),
        policy.to_str().unwrap(),
        "-",
    ]);
    let output = output_with_stdin(
        &mut command,
        r#"{"firewall_rule": {"id": "http", "protocol": "tcp", "destination_port": "80",
            "action": "allow", "ip_version": 4}}"#,
    );
    assert_success(&output);
    assert!(
        String::from_utf8_lossy(&output.stdout)
            .contains("left-to-right accept, right-to-left drop"),
        "{output:?}"
    );

    assert_eq!(tcp(right, left, LEFT_HOST, 80), Probe::Passed);
    assert_eq!(tcp(right, left, LEFT_HOST, 7080), Probe::TimedOut);
    assert_eq!(udp_probe(right, left, LEFT_HOST, 7081), Probe::TimedOut);
    assert!(!ping(right, LEFT_HOST));
    assert_eq!(tcp(left, right, RIGHT_HOST, 7080), Probe::Passed);
    assert_eq!(udp_probe(left, right, RIGHT_HOST, 7081), Probe::Passed);
    assert!(ping(left, RIGHT_HOST));
    let status = dockwall.ok(&["status"]);
    assert!(
        status.contains("default left-to-right accept, right-to-left drop"),
        "{status}"
    );
    assert!(
        status.contains("no rule decided right-to-left: drop ("),
        "the implicit deny, with its counter: {status}"
    );
    let report: serde_json::Value =
        serde_json::from_str(&dockwall.ok(&["status", "--json"])).unwrap();
    let defaults = &report["firewall"]["defaults"];
    assert_eq!(defaults[1]["direction"], "right-to-left");
    assert_eq!(defaults[1]["policy"], "drop");
    assert!(
        defaults[1]["packets"].as_u64().unwrap() >= 3,
        "tcp, udp and ping were dropped by the implicit deny: {defaults}"
    );
    assert_eq!(defaults[0]["policy"], "accept");

    // One direction's default, by hand.
    dockwall.ok(&["default", "accept", "--direction", "right-to-left"]);
    assert_eq!(tcp(right, left, LEFT_HOST, 7080), Probe::Passed);
    dockwall.ok(&["default", "drop", "--direction", "left-to-right"]);
    assert_eq!(tcp(left, right, RIGHT_HOST, 7080), Probe::TimedOut);
    dockwall.ok(&["default", "allow"]);
    assert_eq!(
        tcp(left, right, RIGHT_HOST, 7080),
        Probe::Passed,
        "without --direction: both directions, overrides gone"
    );
}

const LEFT_HOST_V6: &str = "fd10::2";
const RIGHT_HOST_V6: &str = "fd20::2";

/// IPv6 on every leg of the chain, routed statically (Dockwall's cross routing is IPv4):
/// fd10::/64 left hosts, fd01::/64 and fd02::/64 the SI's legs, fd20::/64 right hosts.
fn add_ipv6(chain: &Chain) {
    let address = |netns: &Netns, address: &str, device: &str| {
        netns.ip(&["addr", "add", address, "dev", device, "nodad"]);
    };
    address(&chain.left_host, "fd10::2/64", "eth0");
    address(&chain.left_gateway, "fd10::1/64", "lan");
    address(&chain.left_gateway, "fd01::1/64", "wan");
    address(&chain.si, "fd01::2/64", "eth0");
    address(&chain.si, "fd02::2/64", "eth1");
    address(&chain.right_gateway, "fd02::1/64", "wan");
    address(&chain.right_gateway, "fd20::1/64", "lan");
    address(&chain.right_host, "fd20::2/64", "eth0");
    let route = |netns: &Netns, to: &str, via: &str| {
        netns.ip(&["-6", "route", "add", to, "via", via]);
    };
    route(&chain.left_host, "default", "fd10::1");
    route(&chain.left_gateway, "fd20::/64", "fd01::2");
    route(&chain.si, "fd10::/64", "fd01::1");
    route(&chain.si, "fd20::/64", "fd02::1");
    route(&chain.right_gateway, "fd10::/64", "fd02::2");
    route(&chain.right_host, "default", "fd20::1");
    for router in [&chain.left_gateway, &chain.si, &chain.right_gateway] {
        router.set_sysctl("net.ipv6.conf.all.forwarding", 1);
    }
}

#[test]
fn an_ip_version_4_rule_without_addresses_does_not_match_ipv6() {
    let chain = Chain::new();
    add_ipv6(&chain);
    let dockwall = Dockwall::start(&chain);
    let (left, right) = (&chain.left_host, &chain.right_host);
    assert!(
        ping_eventually(left, RIGHT_HOST_V6, 3),
        "IPv6 forwards before the import"
    );
    assert!(ping_eventually(right, LEFT_HOST_V6, 3));

    let document = dockwall.state.path().join("versions.json");
    std::fs::write(
        &document,
        r#"{"firewall_group": {"id": "g", "ingress_firewall_policy_id": "in",
                               "egress_firewall_policy_id": "out"},
            "firewall_policies": [
              {"id": "in", "firewall_rules": ["allow-v4"]},
              {"id": "out", "firewall_rules": ["deny-v4", "allow-v6"]}],
            "firewall_rules": [
              {"id": "allow-v4", "protocol": null, "action": "allow", "ip_version": 4},
              {"id": "deny-v4", "protocol": null, "action": "deny", "ip_version": 4},
              {"id": "allow-v6", "protocol": null, "action": "allow", "ip_version": 6}]}"#,
    )
    .unwrap();
    dockwall.ok(&["import", "--fwaas", document.to_str().unwrap()]);

    assert!(ping(right, LEFT_HOST), "the IPv4 allow lets IPv4 in");
    assert!(
        !ping(right, LEFT_HOST_V6),
        "the IPv4 allow does not let IPv6 in: the implicit deny does"
    );
    assert!(!ping(left, RIGHT_HOST), "the IPv4 deny drops IPv4");
    assert!(
        ping(left, RIGHT_HOST_V6),
        "the IPv4 deny leaves IPv6 to the IPv6 allow"
    );
}

fn assert_success(output: &Output) {
    assert!(
        output.status.success(),
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}

fn stdout_of(command: &mut Command) -> String {
    let output = command.output().expect("run dockwall");
    assert_success(&output);
    String::from_utf8_lossy(&output.stdout).into_owned()
}

#[test]
fn remote_groups_unknown_fields_and_bad_ports_are_refused_naming_their_json_path() {
    let ns = Netns::new("fwaas");
    let dockwall = Dockwall::idle(&ns, StateDir::new());
    let rule = |extra: &str| {
        format!(
            r#"{{"firewall_policy": {{"id": "p", "firewall_rules": ["r1", "r2"]}}}}
               {{"firewall_rules": [
                 {{"id": "r1", "protocol": "tcp", "destination_port": "22", "action": "deny"}},
                 {{"id": "r2", "protocol": "tcp", "action": "allow"{extra}}}]}}"#
        )
    };
    let cases = [
        (
            rule(r#", "source_firewall_group_id": "0c5a3f4e-group""#),
            r#"-, document 2, firewall_rules[1].source_firewall_group_id: firewall_rule "r2": "0c5a3f4e-group": remote firewall groups are not supported"#,
        ),
        (
            rule(r#", "destination_firewall_group_id": "0c5a3f4e-group""#),
            "firewall_rules[1].destination_firewall_group_id: firewall_rule \"r2\"",
        ),
        (
            rule(r#", "colour": "red""#),
            r#"-, document 2, firewall_rules[1].colour: firewall_rule "r2": unknown field `colour`"#,
        ),
        (
            rule(r#", "destination_port": "70000""#),
            r#"-, document 2, firewall_rules[1].destination_port: firewall_rule "r2": invalid port "70000""#,
        ),
    ];
    for (document, needle) in cases {
        let output = output_with_stdin(
            &mut dockwall.command(&["import", "--fwaas", "-"]),
            &document,
        );
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(!output.status.success(), "{document} was accepted");
        assert!(stderr.contains(needle), "{stderr}\nwants {needle}");
        assert!(
            !dockwall.state.rules_file().exists(),
            "a refused import stores nothing"
        );
    }
    // The same rule with the remote groups null, as Neutron returns them, is accepted.
    let output = output_with_stdin(
        &mut dockwall.command(&["import", "--fwaas", "-"]),
        &rule(r#", "source_firewall_group_id": null, "destination_firewall_group_id": null"#),
    );
    assert_success(&output);
}

#[test]
fn export_then_import_gives_the_same_rules() {
    let ns = Netns::new("fwaas");
    let dockwall = Dockwall::idle(&ns, StateDir::new());
    stdout_of(&mut dockwall.command(&import_args(&fixtures())));
    let list = |dockwall: &Dockwall| {
        let mut listed: serde_json::Value = serde_json::from_str(&stdout_of(
            &mut dockwall.command(&["rule", "list", "--json"]),
        ))
        .unwrap();
        for rule in listed["rules"].as_array_mut().unwrap() {
            for volatile in ["position", "id", "packets", "bytes"] {
                rule.as_object_mut().unwrap().remove(volatile);
            }
        }
        listed
    };
    let before = list(&dockwall);
    assert_eq!(before["rules"].as_array().unwrap().len(), 5);
    let exported = stdout_of(&mut dockwall.command(&["export", "--fwaas"]));

    let again = Dockwall::idle(&ns, StateDir::new());
    let output = output_with_stdin(&mut again.command(&["import", "--fwaas", "-"]), &exported);
    assert_success(&output);
    assert_eq!(list(&again), before);
    assert_eq!(
        stdout_of(&mut again.command(&["export", "--fwaas"])),
        exported
    );
}

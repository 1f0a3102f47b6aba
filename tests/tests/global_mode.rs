//! Dockvpn in global mode with a left network whose DHCP server (a real dnsmasq) sends wide
//! option-121 routes, and a stock openvpn client on the right whose own address lies inside
//! one of them. The SI's replies must leave by the right side anyway (the `from <right
//! address>` rule and IP_PKTINFO), and learned routes that would capture the right side, the
//! management side or the VPN pool are refused and shown in `status`.

use std::time::Duration;

use docknfv_tests::chain::{LEFT_HOST, LEFT_HOST_NET, LEFT_NET, SI_LEFT, SI_RIGHT};
use docknfv_tests::dnsmasq::Dnsmasq;
use docknfv_tests::openvpn::{status_json, text, OpenvpnClient};
use docknfv_tests::traffic::{ping, ping_eventually};
use docknfv_tests::{Chain, Vnf};

/// The client's address: behind the right gateway, inside the routes the left learns.
const CLIENT: &str = "10.61.12.2";
const CLIENT_GATEWAY: &str = "10.61.12.1";
const RANGE: &str = "10.0.1.50,10.0.1.99,255.255.255.0,2m";
/// The right gateway's address on the right host network, behind the SI's right default.
const RIGHT_GATEWAY_FAR: &str = "192.168.20.1";

/// The chain with the SI's left address to come from `option_121` (dnsmasq syntax, all via
/// the left gateway), the right host reaching the SI from CLIENT, and no direct path from
/// the right to the left: only the tunnel leads there.
fn chain_learning(option_121: &str) -> (Chain, Dnsmasq) {
    let chain = Chain::new();
    chain.si.ip(&["addr", "flush", "dev", "eth0"]);
    chain.right_gateway.ip(&["route", "del", LEFT_HOST_NET]);
    chain
        .right_gateway
        .ip(&["addr", "add", &format!("{CLIENT_GATEWAY}/24"), "dev", "lan"]);
    chain
        .right_host
        .ip(&["addr", "add", &format!("{CLIENT}/24"), "dev", "eth0"]);
    chain.right_host.ip(&[
        "route",
        "replace",
        "default",
        "via",
        CLIENT_GATEWAY,
        "src",
        CLIENT,
    ]);
    let dnsmasq = Dnsmasq::start(
        &chain.left_gateway,
        "wan",
        RANGE,
        &[&format!("option:classless-static-route,{option_121}")],
    );
    (chain, dnsmasq)
}

fn start_dockvpn(chain: &Chain, args: &[&str]) -> Vnf {
    let mut all = vec!["run", "--dhcp", "left", "--side-timeout", "30"];
    all.extend(args);
    let dockvpn = Vnf::start(&chain.si, "dockvpn", &all);
    dockvpn.wait_ready();
    // With --dhcp the server serves once the lease (and so its routes) is there.
    dockvpn
        .wait_for_log("VPN server listening", Duration::from_secs(15))
        .unwrap_or_else(|e| panic!("{e}"));
    dockvpn
}

/// Connects a stock openvpn client from CLIENT (its VPN address from `pool`) and pings the
/// left host through the tunnel.
fn connect_and_reach_the_left_host(
    chain: &Chain,
    dockvpn: &Vnf,
    name: &str,
    pool: &str,
) -> OpenvpnClient {
    assert!(
        !ping(&chain.right_host, LEFT_HOST),
        "no path without the tunnel"
    );
    let added = dockvpn.cli(
        &chain.si,
        "dockvpn",
        &["client", "add", name, "--pool", pool],
    );
    assert!(added.status.success(), "client add: {}", text(&added));
    let config = dockvpn.cli(&chain.si, "dockvpn", &["client", "config", name]);
    assert!(config.status.success(), "client config: {}", text(&config));
    let profile = String::from_utf8(config.stdout).expect("utf-8 profile");
    assert!(
        profile.contains(&format!("remote {SI_RIGHT} 1194")),
        "{profile}"
    );
    let client = OpenvpnClient::start(&chain.right_host, &profile, &[]);
    client.wait_connected().unwrap_or_else(|e| {
        panic!(
            "{e}\nserver:\n{}\nSI rules:\n{}",
            dockvpn.log(),
            chain.si.ip(&["rule"])
        )
    });
    assert!(
        ping_eventually(&chain.right_host, LEFT_HOST, 3),
        "ping through the tunnel\n{}",
        dockvpn.log()
    );
    client
}

/// "destination reason-kind" of the refused left routes, and the installed destinations.
fn learned_left(status: &serde_json::Value) -> (Vec<String>, Vec<String>) {
    let left = status["routing"]["learned_routes"]
        .as_array()
        .and_then(|sides| sides.iter().find(|s| s["side"] == "left"))
        .unwrap_or_else(|| panic!("no learned left routes in status: {status}"));
    let destination =
        |route: &serde_json::Value| route["destination"].as_str().unwrap_or_default().to_owned();
    let refused = left["refused"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|r| {
            format!(
                "{} {}",
                destination(&r["route"]),
                r["reason"]["kind"].as_str().unwrap_or_default()
            )
        })
        .collect();
    let installed = left["installed"]
        .as_array()
        .into_iter()
        .flatten()
        .map(destination)
        .collect();
    (refused, installed)
}

#[test]
fn the_measured_case_a_client_inside_a_learned_route_connects_and_status_lists_the_refused() {
    let (chain, _dnsmasq) = chain_learning(
        "10.61.11.0/24,10.0.1.1,0.0.0.0/1,10.0.1.1,128.0.0.0/1,10.0.1.1,10.61.12.0/24,10.0.1.1,192.168.10.0/24,10.0.1.1",
    );
    // The pool is the first learned route, so learning it would take the tunnel's subnet.
    let mut dockvpn = start_dockvpn(&chain, &["--pool", "10.61.11.0/24"]);
    let main = chain
        .si
        .ip(&["route", "show", "table", "main", "proto", "dhcp"]);
    assert!(
        main.contains("10.61.12.0/24 via 10.0.1.1 dev eth0"),
        "the route covering the client is installed:\n{main}"
    );
    assert!(
        !main.contains("0.0.0.0/1")
            && !main.contains("128.0.0.0/1")
            && !main.contains("10.61.11.0/24"),
        "refused routes reached the kernel:\n{main}"
    );
    let log = dockvpn.log();
    for refused in [
        "route=0.0.0.0/1",
        "route=128.0.0.0/1",
        "route=10.61.11.0/24",
    ] {
        assert_eq!(
            log.lines()
                .filter(|l| l.contains("learned route refused") && l.contains(refused))
                .count(),
            1,
            "one warning naming {refused}:\n{log}"
        );
    }

    let client = connect_and_reach_the_left_host(&chain, &dockvpn, "alice", "10.61.11.0/24");
    let address = chain.right_host.ip(&["-4", "addr", "show", "dev", "tun0"]);
    assert!(address.contains("inet 10.61.11.2/24"), "{address}");

    let status = status_json(&chain.si, &dockvpn);
    let (mut refused, installed) = learned_left(&status);
    refused.sort();
    assert_eq!(
        refused,
        [
            "0.0.0.0/1 def1-half",
            "10.61.11.0/24 vpn-pool",
            "128.0.0.0/1 def1-half"
        ]
    );
    assert_eq!(installed, ["10.61.12.0/24", "192.168.10.0/24"]);
    assert_eq!(
        status["vpn"]["routes_pushed"],
        serde_json::json!([LEFT_NET, "10.61.12.0/24", LEFT_HOST_NET]),
        "the left subnet and the installed routes; refused routes are not pushed"
    );
    let rendered = dockvpn.cli(&chain.si, "dockvpn", &["status"]);
    let rendered = text(&rendered);
    assert!(
        rendered.contains("learned left 10.61.11.0/24 via 10.0.1.1 REFUSED: it would capture the VPN pool 10.61.11.0/24")
            && rendered.contains("learned left 0.0.0.0/1 via 10.0.1.1 REFUSED: a def1 half")
            && rendered.contains("learned left 10.61.12.0/24 via 10.0.1.1 installed"),
        "{rendered}"
    );
    assert!(dockvpn.terminate().success(), "{}", dockvpn.log());
    drop(client);
}

#[test]
fn a_client_inside_a_wide_learned_route_connects_and_the_pool_still_reaches_the_right() {
    let (chain, _dnsmasq) = chain_learning("10.61.0.0/16,10.0.1.1,192.168.10.0/24,10.0.1.1");
    let dockvpn = start_dockvpn(&chain, &[]);
    let main = chain
        .si
        .ip(&["route", "show", "table", "main", "proto", "dhcp"]);
    assert!(
        main.contains("10.61.0.0/16 via 10.0.1.1 dev eth0"),
        "{main}"
    );
    let _client = connect_and_reach_the_left_host(&chain, &dockvpn, "bob", "10.8.0.0/24");
    let rules = chain.si.ip(&["rule"]);
    assert!(
        rules.contains(&format!("from {SI_RIGHT} lookup 1002 proto 245")),
        "{rules}"
    );

    // Traffic from the pool to the right side still follows main's default via the right
    // (to the right gateway's far address: the right host answers the pool by the tunnel).
    chain
        .right_gateway
        .ip(&["route", "add", "10.8.0.0/24", "via", SI_RIGHT]);
    let from_the_pool = || {
        chain
            .si
            .exec(
                "ping",
                &["-c", "1", "-W", "1", "-I", "10.8.0.1", RIGHT_GATEWAY_FAR],
            )
            .status
            .success()
    };
    assert!((0..3).any(|_| from_the_pool()), "pool → right side");
}

#[test]
fn the_source_rules_go_at_exit_and_a_second_run_finds_nothing_to_change() {
    let chain = Chain::new();
    let args =
        |on_exit: &'static str| vec!["run", "--left-route", LEFT_HOST_NET, "--on-exit", on_exit];
    let ours = |chain: &Chain| {
        let rules = chain.si.ip(&["rule"]);
        let rules: Vec<&str> = rules.lines().filter(|l| l.contains("proto 245")).collect();
        (
            rules.join("\n"),
            chain
                .si
                .ip(&["route", "show", "table", "all", "proto", "245"]),
        )
    };

    let mut first = Vnf::start(&chain.si, "dockvpn", &args("remove"));
    first.wait_ready();
    let (rules, routes) = ours(&chain);
    assert!(
        rules.contains(&format!("from {SI_RIGHT} lookup 1002"))
            && rules.contains(&format!("from {SI_LEFT} lookup 1001")),
        "{rules}"
    );
    assert!(
        routes.contains("default via 10.0.2.1 dev eth1 table 1002"),
        "{routes}"
    );
    assert!(first.terminate().success(), "{}", first.log());
    assert_eq!(ours(&chain), (String::new(), String::new()), "left behind");

    let mut kept = Vnf::start(&chain.si, "dockvpn", &args("keep"));
    kept.wait_ready();
    assert!(kept.terminate().success(), "{}", kept.log());
    let left_in_place = ours(&chain);
    assert!(left_in_place.0.contains(&format!("from {SI_RIGHT}")));

    let mut second = Vnf::start(&chain.si, "dockvpn", &args("remove"));
    second.wait_ready();
    assert!(
        !second.log().contains("routing converged"),
        "the second run changed routing:\n{}",
        second.log()
    );
    assert_eq!(ours(&chain), left_in_place);
    assert!(second.terminate().success(), "{}", second.log());
    assert_eq!(ours(&chain), (String::new(), String::new()), "left behind");
}

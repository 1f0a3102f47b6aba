//! What a VPN client reaches through the tunnel, enforced in the kernel by Dockvpn's own nft
//! table: by default the pushed networks only (not the right side, not the SI's own other
//! addresses), and with `--allow` only the client's networks. Stock OpenVPN 2.6 clients;
//! a client that adds a route by hand still gets no further. And when the pushed routes
//! change, connected clients are told to reconnect and come back with the new ones.

use std::time::Duration;

use docknfv_tests::chain::{LEFT_GATEWAY, LEFT_HOST, LEFT_HOST_NET, RIGHT_GATEWAY};
use docknfv_tests::openvpn::{
    issue_profile, learned_routes_chain_with, left_dhcp_options, text, vpn_chain, OpenvpnClient,
};
use docknfv_tests::traffic::{ping, ping_eventually};
use docknfv_tests::{Netns, Vnf};

/// Echo requests a positive check may use (debug build, shared machine).
const PING_ATTEMPTS: u32 = 5;
/// An address of the SI outside every pushed network, standing in for its management address.
const SI_MANAGEMENT: &str = "172.31.0.1";

/// No answer to two echo requests, one second each.
fn unreachable(from: &Netns, to: &str) -> bool {
    !ping_eventually(from, to, 2)
}

fn route_through_tunnel(client: &Netns, network: &str) {
    client.ip(&["route", "add", network, "via", "10.8.0.1", "dev", "tun0"]);
}

/// The client's routes through tun0, destinations only, sorted; none while there is no tun0
/// (a reconnecting client closes it and opens it again).
fn tunnel_destinations(ns: &Netns) -> Vec<String> {
    let output = ns.exec("ip", &["-j", "-4", "route", "show", "dev", "tun0"]);
    if !output.status.success() {
        return Vec::new();
    }
    let routes: Vec<serde_json::Value> =
        serde_json::from_slice(&output.stdout).expect("ip -j output");
    let mut destinations: Vec<String> = routes
        .iter()
        .filter_map(|r| r["dst"].as_str().map(str::to_owned))
        .collect();
    destinations.sort();
    destinations
}

/// Waits up to `secs` seconds, checking every half second, until the client's tun0 routes
/// `route` (the client gets it by reconnecting on its own); panics with both logs otherwise.
fn wait_for_tunnel_route(
    ns: &Netns,
    route: &str,
    secs: u64,
    client: &OpenvpnClient,
    dockvpn: &Vnf,
) {
    let deadline = std::time::Instant::now() + Duration::from_secs(secs);
    while !tunnel_destinations(ns).iter().any(|d| d == route) {
        assert!(
            std::time::Instant::now() < deadline,
            "the connected client never got the route {route}\nclient:\n{}\nserver:\n{}",
            client.log(),
            dockvpn.log()
        );
        std::thread::sleep(Duration::from_millis(500));
    }
}

fn connect(ns: &Netns, dockvpn: &Vnf, profile: &str) -> OpenvpnClient {
    let client = OpenvpnClient::start(ns, profile, &[]);
    client.assert_connected(dockvpn);
    client
}

#[test]
fn without_allow_a_client_reaches_the_left_networks_but_not_the_right_side_nor_the_si_itself() {
    let (chain, mut dockvpn) = vpn_chain(&[]);
    chain
        .si
        .ip(&["addr", "add", &format!("{SI_MANAGEMENT}/32"), "dev", "lo"]);
    // The right gateway would answer the pool: only the SI's filter stands in the way.
    chain
        .right_gateway
        .ip(&["route", "add", "10.8.0.0/24", "via", "10.0.2.2"]);
    let client = connect(
        &chain.right_host,
        &dockvpn,
        &issue_profile(&chain.si, &dockvpn, "alice", None),
    );
    assert!(
        ping_eventually(&chain.right_host, LEFT_HOST, PING_ATTEMPTS),
        "the left host through the tunnel\n{}",
        dockvpn.log()
    );
    assert!(
        ping_eventually(&chain.right_host, "10.8.0.1", PING_ATTEMPTS),
        "the server's tunnel address answers ping"
    );
    route_through_tunnel(&chain.right_host, &format!("{SI_MANAGEMENT}/32"));
    route_through_tunnel(&chain.right_host, &format!("{RIGHT_GATEWAY}/32"));
    assert!(
        unreachable(&chain.right_host, SI_MANAGEMENT),
        "the SI's management address must not answer through the tunnel"
    );
    assert!(
        unreachable(&chain.right_host, RIGHT_GATEWAY),
        "the right side must not be reachable through the tunnel"
    );
    assert!(
        ping(&chain.right_host, LEFT_HOST),
        "the tunnel still works after the refused packets"
    );
    assert!(dockvpn.terminate().success(), "{}", dockvpn.log());
    let table = chain.si.exec("nft", &["list", "table", "ip", "dockvpn"]);
    assert!(
        !table.status.success(),
        "the table goes with the server: {}",
        text(&table)
    );
    drop(client);
}

#[test]
fn allow_limits_one_client_to_its_networks_and_a_second_client_is_not_limited() {
    let (chain, dockvpn) = vpn_chain(&[]);
    let add = dockvpn.cli(
        &chain.si,
        "dockvpn",
        &["client", "add", "contractor", "--allow", LEFT_HOST_NET],
    );
    assert!(add.status.success(), "{}", text(&add));
    let config = dockvpn.cli(&chain.si, "dockvpn", &["client", "config", "contractor"]);
    assert!(config.status.success(), "{}", text(&config));
    let limited = connect(
        &chain.right_host,
        &dockvpn,
        &String::from_utf8(config.stdout).expect("utf-8 profile"),
    );
    assert_eq!(
        tunnel_destinations(&chain.right_host),
        vec!["10.8.0.0/24".to_owned(), LEFT_HOST_NET.to_owned()],
        "pushed only the route inside its allow list (not the left subnet)"
    );
    assert!(
        ping_eventually(&chain.right_host, LEFT_HOST, PING_ATTEMPTS),
        "its allowed network\n{}",
        dockvpn.log()
    );
    route_through_tunnel(&chain.right_host, &format!("{LEFT_GATEWAY}/32"));
    assert!(
        unreachable(&chain.right_host, LEFT_GATEWAY),
        "a pushed network outside its allow list, with a route added by hand"
    );

    // The second client runs on the right gateway, which reaches the SI directly.
    let employee = connect(
        &chain.right_gateway,
        &dockvpn,
        &issue_profile(&chain.si, &dockvpn, "employee", None),
    );
    assert!(
        tunnel_destinations(&chain.right_gateway).contains(&"10.0.1.0/24".to_owned()),
        "the second client gets every pushed route"
    );
    assert!(
        ping_eventually(&chain.right_gateway, LEFT_GATEWAY, PING_ATTEMPTS),
        "the second client is not limited\n{}",
        dockvpn.log()
    );
    assert!(
        unreachable(&chain.right_host, LEFT_GATEWAY),
        "the first still is"
    );

    // A wider list: the connected client is told to reconnect, and comes back with the route
    // and the right to use it.
    let widen = dockvpn.cli(
        &chain.si,
        "dockvpn",
        &[
            "client",
            "allow",
            "contractor",
            "192.168.10.0/24,10.0.1.0/24",
        ],
    );
    assert!(widen.status.success(), "{}", text(&widen));
    wait_for_tunnel_route(&chain.right_host, "10.0.1.0/24", 30, &limited, &dockvpn);
    assert!(
        ping_eventually(&chain.right_host, LEFT_GATEWAY, PING_ATTEMPTS),
        "the widened allow list applies in the kernel\n{}",
        dockvpn.log()
    );
    drop((limited, employee));
}

#[test]
fn an_allow_list_outside_every_pushed_network_warns_and_a_bad_cidr_changes_nothing() {
    let (chain, dockvpn) = vpn_chain(&[]);
    let add = dockvpn.cli(
        &chain.si,
        "dockvpn",
        &["client", "add", "carol", "--allow", "172.16.0.0/12"],
    );
    let output = text(&add);
    assert!(add.status.success(), "{output}");
    assert!(
        output.contains("172.16.0.0/12 lies outside every pushed network"),
        "{output}"
    );
    let registry = || {
        std::fs::read_to_string(dockvpn.state_dir().join("pki/clients.json")).expect("the registry")
    };
    let before = registry();
    let bad = dockvpn.cli(
        &chain.si,
        "dockvpn",
        &["client", "allow", "carol", "10.0.0.0/33"],
    );
    assert!(!bad.status.success(), "{}", text(&bad));
    assert!(text(&bad).contains("10.0.0.0/33"), "{}", text(&bad));
    assert_eq!(registry(), before, "a refused allow list changes nothing");
}

#[test]
fn a_dhcp_route_change_makes_a_connected_client_reconnect_with_the_new_routes() {
    let (chain, dnsmasq, dockvpn) = learned_routes_chain_with("192.168.10.0/24,10.0.1.1");
    let client = connect(
        &chain.right_host,
        &dockvpn,
        &issue_profile(&chain.si, &dockvpn, "dana", None),
    );
    let before = tunnel_destinations(&chain.right_host);
    assert!(before.contains(&LEFT_HOST_NET.to_owned()), "{before:?}");
    assert!(!before.contains(&"172.16.5.0/24".to_owned()), "{before:?}");

    let changed = left_dhcp_options("192.168.10.0/24,10.0.1.1,172.16.5.0/24,10.0.1.1");
    dnsmasq.reload(&changed.iter().map(String::as_str).collect::<Vec<_>>());
    // The lease is two minutes (dnsmasq's least): the renewal that brings the new option
    // comes after about 60 s; the client then has its reconnect spread over 5 s.
    wait_for_tunnel_route(&chain.right_host, "172.16.5.0/24", 100, &client, &dockvpn);
    assert!(
        client
            .log()
            .contains("Connection reset command was pushed by server"),
        "the server told it to reconnect:\n{}",
        client.log()
    );
    assert!(
        ping_eventually(&chain.right_host, LEFT_HOST, PING_ATTEMPTS),
        "the tunnel works after the reconnect\n{}",
        dockvpn.log()
    );
}

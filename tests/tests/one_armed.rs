//! One-armed Dockvpn in namespaces, the shape of `docker run -p 1194:1194/udp` on one
//! network: the SI's only leg (eth0) sits on a LAN bridge with a host; the LAN's router
//! publishes UDP 1194 on its outside address to the SI, as Docker's port publishing does;
//! a stock openvpn client outside connects there and reaches the host through the tunnel.
//!
//! ```text
//! client ──wan── router (br0 10.0.1.1, DNAT :1194 → SI) ── SI eth0 10.0.1.2
//! 192.168.20.2   192.168.20.1                           └─ host   10.0.1.3
//! ```
//!
//! The host has no route beyond its subnet, so it can only answer the client through the
//! SI's masquerade; a second leg plugged in later switches the SI to dual-homed. Dockwall,
//! which does not opt in, waits for its second leg instead.

use std::time::Duration;

use docknfv_tests::chain::{link, veth_pair};
use docknfv_tests::openvpn::{issue_profile, text, OpenvpnClient};
use docknfv_tests::prereq::{require_chain_tools, require_command};
use docknfv_tests::traffic::{ping, tcp_probe, Probe};
use docknfv_tests::{Chain, Netns, Vnf};

const ROUTER_LAN: &str = "10.0.1.1";
const SI_LEG: &str = "10.0.1.2";
const HOST: &str = "10.0.1.3";
const LAN: &str = "10.0.1.0/24";
const PUBLISHED: &str = "192.168.20.1:1194";
const CLIENT: &str = "192.168.20.2";

struct OneArmedLan {
    router: Netns,
    si: Netns,
    host: Netns,
    client: Netns,
}

impl OneArmedLan {
    fn new() -> OneArmedLan {
        require_chain_tools();
        require_command("nft", "nftables");
        let lan = OneArmedLan {
            router: Netns::new("oar"),
            si: Netns::new("oasi"),
            host: Netns::new("oah"),
            client: Netns::new("oac"),
        };
        let router = &lan.router;
        router.ip(&["link", "add", "br0", "type", "bridge"]);
        router.ip(&["addr", "add", &format!("{ROUTER_LAN}/24"), "dev", "br0"]);
        router.ip(&["link", "set", "br0", "up"]);
        for (ns, address, port) in [(&lan.si, SI_LEG, "p-si"), (&lan.host, HOST, "p-host")] {
            veth_pair(ns, "eth0", router, port);
            ns.ip(&["addr", "add", &format!("{address}/24"), "dev", "eth0"]);
            ns.ip(&["link", "set", "eth0", "up"]);
            router.ip(&["link", "set", port, "master", "br0", "up"]);
        }
        link(
            &lan.client,
            "eth0",
            &format!("{CLIENT}/24"),
            router,
            "wan",
            "192.168.20.1/24",
        );
        lan.client
            .ip(&["route", "add", "default", "via", "192.168.20.1"]);
        router.set_sysctl("net.ipv4.ip_forward", 1);
        for rule in [
            "add table ip publish",
            "add chain ip publish prerouting { type nat hook prerouting priority dstnat; }",
            "add rule ip publish prerouting iifname wan udp dport 1194 dnat to 10.0.1.2",
        ] {
            let output = router.exec("nft", &[rule]);
            assert!(output.status.success(), "nft {rule}: {}", text(&output));
        }
        lan
    }
}

fn status_json(si: &Netns, dockvpn: &Vnf) -> (bool, serde_json::Value) {
    let output = dockvpn.cli(si, "dockvpn", &["status", "--json"]);
    let json =
        serde_json::from_slice(&output.stdout).unwrap_or_else(|e| panic!("{e}: {}", text(&output)));
    (output.status.success(), json)
}

/// The SI's status once `check` holds (bounded), or a panic with the last one.
fn status_when(
    si: &Netns,
    dockvpn: &Vnf,
    check: impl Fn(bool, &serde_json::Value) -> bool,
) -> serde_json::Value {
    let mut last = serde_json::Value::Null;
    for _ in 0..100 {
        let (healthy, status) = status_json(si, dockvpn);
        if check(healthy, &status) {
            return status;
        }
        last = status;
        std::thread::sleep(Duration::from_millis(100));
    }
    panic!("status never matched: {last}\nlog:\n{}", dockvpn.log());
}

fn count(log: &str, needle: &str) -> usize {
    log.lines().filter(|l| l.contains(needle)).count()
}

#[test]
fn one_leg_serves_both_sides_and_a_second_leg_switches_to_dual_homed() {
    let lan = OneArmedLan::new();
    let si = &lan.si;
    si.set_sysctl("net.ipv4.ip_forward", 1);
    si.set_sysctl("net.ipv4.conf.all.rp_filter", 2);
    // As in a container started without --sysctl net.ipv4.fwmark_reflect=1: a warning, once.
    si.set_sysctl("net.ipv4.fwmark_reflect", 0);
    let dockvpn = Vnf::start_with_read_only_proc_sys(si, "dockvpn", &["run"]);
    dockvpn.wait_ready();
    dockvpn
        .wait_for_log("VPN server listening", Duration::from_secs(10))
        .unwrap_or_else(|e| panic!("{e}"));
    let status = status_when(si, &dockvpn, |healthy, s| {
        healthy && s["vpn"]["routes_pushed"] == serde_json::json!([LAN])
    });
    assert_eq!(status["routing"]["layout"], "one-armed", "{status}");
    let default = si.ip(&["-4", "route", "show", "default", "proto", "245"]);
    assert!(
        default.contains(&format!("via {ROUTER_LAN} dev eth0")),
        "{default}"
    );
    let masquerade = si.exec("nft", &["list", "table", "ip", "dockvpn"]);
    assert!(
        text(&masquerade).contains("oifname \"eth0\" ip saddr 10.8.0.0/24 masquerade"),
        "{}",
        text(&masquerade)
    );

    assert!(
        !ping(&lan.client, HOST),
        "the host cannot answer the client without the tunnel"
    );
    let profile = issue_profile(si, &dockvpn, "alice", Some(PUBLISHED));
    let client = OpenvpnClient::start(&lan.client, &profile, &[]);
    client.assert_connected(&dockvpn);
    let routes = lan.client.ip(&["-4", "route", "show", "dev", "tun0"]);
    assert!(
        routes.contains(&format!("{LAN} via 10.8.0.1")),
        "the leg's subnet is pushed: {routes}"
    );
    let (probe, peer) = tcp_probe(&lan.client, &lan.host, HOST, HOST, 5201, 5201);
    assert_eq!(probe, Probe::Passed, "{}", dockvpn.log());
    assert_eq!(
        peer.map(|p| p.ip().to_string()).as_deref(),
        Some(SI_LEG),
        "the host sees the SI's masquerade, so the connection went through the tunnel"
    );

    // A second leg: dual-homed, without a restart.
    let right = Netns::new("oarr");
    link(si, "eth1", "10.0.2.2/24", &right, "wan", "10.0.2.1/24");
    dockvpn
        .wait_for_log("running dual-homed", Duration::from_secs(10))
        .unwrap_or_else(|e| panic!("{e}"));
    let status = status_when(si, &dockvpn, |healthy, s| {
        healthy && s["routing"]["layout"] == "dual-homed"
    });
    assert_eq!(status["vpn"]["routes_pushed"], serde_json::json!([LAN]));
    let default = si.ip(&["-4", "route", "show", "default", "proto", "245"]);
    assert!(default.contains("via 10.0.2.1 dev eth1"), "{default}");
    let masquerade = si.exec("nft", &["list", "table", "ip", "dockvpn"]);
    assert!(
        text(&masquerade).contains("oifname \"eth0\""),
        "client traffic still leaves through the left leg: {}",
        text(&masquerade)
    );

    let log = dockvpn.log();
    assert_eq!(count(&log, "running one-armed"), 1, "{log}");
    assert_eq!(count(&log, "net.ipv4.fwmark_reflect is 0"), 1, "{log}");
    drop(client);
}

#[test]
fn dockwall_with_one_leg_waits_for_the_second_and_says_it_needs_two() {
    let chain = Chain::without_right();
    let dockwall = Vnf::start(&chain.si, "dockwall", &["run", "--side-timeout", "20"]);
    let waiting = dockwall
        .wait_for_log("waiting for sides", Duration::from_secs(10))
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(waiting.contains("needs two legs"), "{waiting}");
    let log = dockwall.log();
    assert!(!log.contains("forwarding ready"), "{log}");
    assert!(!log.contains("one-armed"), "{log}");
}

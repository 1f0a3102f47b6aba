//! Dockvpn's WireGuard transport against the stock peer from Debian: wireguard-go with the
//! profile `dockvpn client config NAME --format wireguard` printed, in the right host's
//! namespace, its Endpoint set to the SI's right address. The right side's direct route to
//! the left is removed, so the left host is reachable only through the tunnel.

use std::time::Duration;

use docknfv_tests::chain::{LEFT_HOST, LEFT_HOST_NET, LEFT_NET, RIGHT_HOST};
use docknfv_tests::measure::{iperf_interval_bytes, iperf_tcp_gbps, iperf_tcp_report};
use docknfv_tests::openvpn::{
    learned_routes_chain, status_json, text, vpn_chain, wait_for_status, LEARNED_NETWORK,
};
use docknfv_tests::traffic::{ping, ping_eventually};
use docknfv_tests::wireguard::{
    clients_of_both_transports, connected_client, endpoint, flood_forged_initiations, genkey,
    wireguard_profile, Profile, WireguardClient, HANDSHAKE_WITHIN, WIREGUARD_PORT,
};
use docknfv_tests::{Netns, Vnf};

/// Echo requests a positive check through the tunnel may use: the server is a debug build
/// and the machine is shared, so one lost second must not fail the test.
const TUNNEL_PING_ATTEMPTS: u32 = 5;

/// The server's address inside the tunnel, which every profile routes as a /32.
const SERVER_TUNNEL_ADDRESS: &str = "10.8.0.1";

/// The status entry of the connected client `name`, once `ready` holds for it.
fn client_status(
    si: &Netns,
    dockvpn: &Vnf,
    name: &str,
    ready: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    let find = |status: &serde_json::Value| {
        status["vpn"]["clients"]
            .as_array()
            .and_then(|clients| clients.iter().find(|c| c["name"] == name).cloned())
    };
    let status = wait_for_status(si, dockvpn, &format!("client {name}"), |status| {
        find(status).is_some_and(|client| ready(&client))
    });
    find(&status).expect("the client was there")
}

/// Packets the kernel received on `device` in `ns` (what its VPN client wrote into it).
fn received_packets(ns: &Netns, device: &str) -> u64 {
    let json = ns.ip(&["-j", "-s", "link", "show", "dev", device]);
    let links: Vec<serde_json::Value> = serde_json::from_str(&json).expect("ip -j output");
    links[0]["stats64"]["rx"]["packets"]
        .as_u64()
        .unwrap_or_else(|| panic!("no rx packets for {device}: {json}"))
}

/// `ping -c COUNT -i 0.2` from `ns`: (transmitted, received).
fn ping_run(ns: &Netns, to: &str, count: u32) -> (u32, u32) {
    let output = ns.exec(
        "ping",
        &["-c", &count.to_string(), "-i", "0.2", "-W", "1", "-q", to],
    );
    let stdout = String::from_utf8_lossy(&output.stdout);
    let summary = stdout
        .lines()
        .find(|line| line.contains("packets transmitted"))
        .unwrap_or_else(|| panic!("no ping summary: {}", text(&output)));
    // "650 packets transmitted, 649 received, 0.153846% packet loss, time 130000ms"
    let count = |what: &str| -> u32 {
        summary
            .split(',')
            .find(|part| part.trim().ends_with(what))
            .and_then(|part| part.split_whitespace().next()?.parse().ok())
            .unwrap_or_else(|| panic!("no {what} count in {summary:?}"))
    };
    (count("transmitted"), count("received"))
}

#[test]
fn a_profile_from_client_config_handshakes_gets_exactly_the_learned_routes_and_carries_traffic() {
    let (chain, _dnsmasq, dockvpn) = learned_routes_chain();
    assert!(
        !ping(&chain.right_host, LEFT_HOST),
        "no path without the tunnel"
    );

    let profile_text = wireguard_profile(&chain.si, &dockvpn, "walter");
    let profile = Profile::parse(&profile_text);
    assert_eq!(
        profile.interface.values("Address"),
        ["10.8.0.2/32"],
        "{profile_text}"
    );
    assert!(
        profile.interface.value("PrivateKey").is_some(),
        "{profile_text}"
    );
    let server = profile.peer();
    assert!(server.value("PresharedKey").is_some(), "{profile_text}");
    assert_eq!(server.value("PersistentKeepalive").as_deref(), Some("25"));
    let client = WireguardClient::start(&chain.right_host, &profile_text, Some(&endpoint()));
    let handshake = client.assert_handshake(&dockvpn.log());

    assert_eq!(
        client.routes(&chain.right_host),
        [
            LEFT_NET,
            SERVER_TUNNEL_ADDRESS,
            LEARNED_NETWORK,
            LEFT_HOST_NET
        ],
        "the leased subnet, the learned networks and the server's tunnel address, and no \
         default route; profile:\n{profile_text}"
    );
    assert!(
        ping_eventually(&chain.right_host, LEFT_HOST, TUNNEL_PING_ATTEMPTS),
        "ping through the tunnel\n{}",
        dockvpn.log()
    );
    let gbps = iperf_tcp_gbps(&chain.right_host, &chain.left_host, LEFT_HOST, "2");
    assert!(gbps > 0.0, "iperf3 through the tunnel moved nothing");

    let port = client.listen_port();
    // The iperf3 run moved megabytes one way and its acknowledgements the other.
    let shown = client_status(&chain.si, &dockvpn, "walter", |c| {
        let (bytes_in, bytes_out) = (c["bytes_in"].as_u64(), c["bytes_out"].as_u64());
        bytes_in.max(bytes_out) > Some(1_000_000) && bytes_in.min(bytes_out) > Some(0)
    });
    assert_eq!(shown["transport"], "wireguard", "{shown}");
    assert_eq!(shown["address"], "10.8.0.2", "{shown}");
    assert_eq!(shown["peer"], format!("{RIGHT_HOST}:{port}"), "{shown}");
    let latest = shown["latest_handshake_unix"].as_u64().unwrap_or_default();
    assert!(
        latest.abs_diff(handshake) <= 2,
        "the server's latest handshake {latest}, the client's {handshake}: {shown}"
    );
    let status = status_json(&chain.si, &dockvpn);
    assert_eq!(
        status["vpn"]["wireguard"]["public_key"],
        server.value("PublicKey").unwrap_or_default(),
        "{status}"
    );
    assert_eq!(
        status["vpn"]["wireguard"]["listen"],
        format!("0.0.0.0:{WIREGUARD_PORT}")
    );
}

#[test]
fn an_openvpn_and_a_wireguard_client_at_once_each_reach_the_left_host_and_see_only_their_own_traffic(
) {
    let (chain, dockvpn) = vpn_chain(&[]);
    let (_openvpn, wireguard) = clients_of_both_transports(&chain, &dockvpn);
    for ns in [&chain.right_host, &chain.right_gateway] {
        assert!(
            ping_eventually(ns, LEFT_HOST, TUNNEL_PING_ATTEMPTS),
            "from {}\n{}",
            ns.name(),
            dockvpn.log()
        );
    }

    // Each client pings in turn; the other's tunnel interface must receive nothing meanwhile.
    let turns = [
        (&chain.right_gateway, &chain.right_host, "tun0"),
        (
            &chain.right_host,
            &chain.right_gateway,
            wireguard.interface.as_str(),
        ),
    ];
    for (pinging, other, other_device) in turns {
        let before = received_packets(other, other_device);
        let (sent, received) = ping_run(pinging, LEFT_HOST, 10);
        assert!(
            received + 1 >= sent,
            "{received} of {sent} answered from {}",
            pinging.name()
        );
        assert_eq!(
            received_packets(other, other_device),
            before,
            "{other_device} in {} received the other client's traffic",
            other.name()
        );
    }

    let status = wait_for_status(&chain.si, &dockvpn, "both clients", |status| {
        status["vpn"]["clients"].as_array().map(Vec::len) == Some(2)
    });
    let transport_of = |name: &str| {
        status["vpn"]["clients"]
            .as_array()
            .and_then(|clients| clients.iter().find(|c| c["name"] == name))
            .map(|c| c["transport"].clone())
    };
    assert_eq!(transport_of("olga"), Some("openvpn".into()), "{status}");
    assert_eq!(transport_of("wanda"), Some("wireguard".into()), "{status}");
}

#[test]
fn a_client_whose_source_port_changes_mid_transfer_is_followed() {
    let (chain, dockvpn) = vpn_chain(&[]);
    let client = connected_client(&chain.right_host, &chain.si, &dockvpn, "rita");
    let old_port = client.listen_port();
    let new_port = if old_port == 41_000 { 41_001 } else { 41_000 };
    let report = std::thread::scope(|scope| {
        let transfer = scope.spawn(|| {
            iperf_tcp_report(&chain.right_host, &chain.left_host, LEFT_HOST, &["-t", "6"])
        });
        // Moves once the transfer is under way: a megabyte went out from the old port.
        let (_, sent_before) = client.transfer();
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while client.transfer().1 < sent_before + 1_000_000 {
            assert!(
                std::time::Instant::now() < deadline && !transfer.is_finished(),
                "the transfer never started\n{}",
                dockvpn.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        client.set_listen_port(new_port);
        transfer.join().expect("iperf3 thread")
    });
    // The acknowledgements come back through the server: sent to the old port, they would
    // be lost and the sender would stall for the rest of the run.
    let intervals = iperf_interval_bytes(&report);
    assert!(
        intervals.iter().all(|&bytes| bytes > 0),
        "a second without traffic after the move: {intervals:?}\n{}",
        dockvpn.log()
    );
    let shown = client_status(&chain.si, &dockvpn, "rita", |c| {
        c["peer"] == format!("{RIGHT_HOST}:{new_port}")
    });
    assert_eq!(shown["transport"], "wireguard");
}

#[test]
fn a_removed_client_and_a_client_with_a_wrong_key_get_no_reply() {
    let (chain, dockvpn) = vpn_chain(&[]);
    let removed_profile = wireguard_profile(&chain.si, &dockvpn, "dave");
    let removed = WireguardClient::start(&chain.right_host, &removed_profile, Some(&endpoint()));
    removed.assert_handshake(&dockvpn.log());
    assert!(
        ping_eventually(&chain.right_host, LEFT_HOST, TUNNEL_PING_ATTEMPTS),
        "{}",
        dockvpn.log()
    );
    let output = dockvpn.cli(&chain.si, "dockvpn", &["client", "remove", "dave"]);
    assert!(output.status.success(), "client remove: {}", text(&output));

    // `client remove` returns once the running server has re-read the registry: the session
    // that was up is dead, the very next packets go unanswered.
    let (received_before, _) = removed.transfer();
    let (sent, received) = ping_run(&chain.right_host, LEFT_HOST, 3);
    assert_eq!(
        received, 0,
        "{received} of {sent} pings answered after remove"
    );
    assert_eq!(
        removed.transfer().0,
        received_before,
        "the server still sent the removed client something\n{}",
        dockvpn.log()
    );
    wait_for_status(&chain.si, &dockvpn, "dave gone", |status| {
        status["vpn"]["clients"]
            .as_array()
            .is_some_and(|clients| clients.iter().all(|c| c["name"] != "dave"))
    });
    drop(removed);

    // A fresh start of the removed profile, and a registered client's profile with a key
    // pair the server never saw: neither may complete a handshake.
    let (unregistered_private, _) = genkey();
    let wrong_key_profile = wireguard_profile(&chain.si, &dockvpn, "erin")
        .lines()
        .map(|line| {
            if line.starts_with("PrivateKey") {
                format!("PrivateKey = {unregistered_private}\n")
            } else {
                format!("{line}\n")
            }
        })
        .collect::<String>();
    let refused = |status: &serde_json::Value| {
        status["vpn"]["dropped"]["refused_handshakes"]
            .as_u64()
            .unwrap_or_default()
    };
    let refused_before = refused(&status_json(&chain.si, &dockvpn));
    let strangers = [
        (
            WireguardClient::start(&chain.right_host, &removed_profile, Some(&endpoint())),
            &chain.right_host,
            "the removed client",
        ),
        (
            WireguardClient::start(&chain.right_gateway, &wrong_key_profile, Some(&endpoint())),
            &chain.right_gateway,
            "the client with a wrong key",
        ),
    ];
    for (_, ns, _) in &strangers {
        // Traffic makes wireguard-go initiate; nothing may come back.
        assert!(!ping(ns, LEFT_HOST));
    }
    for (client, _, who) in &strangers {
        if let Ok(at) = client.wait_for_handshake_after(0, Duration::from_secs(6)) {
            panic!("{who} completed a handshake at {at}\n{}", dockvpn.log());
        }
        assert_eq!(
            client.transfer().0,
            0,
            "{who} received something\n{}",
            dockvpn.log()
        );
    }
    // Their initiations did arrive: the server looked their keys up and refused them.
    wait_for_status(&chain.si, &dockvpn, "more refused handshakes", |status| {
        refused(status) > refused_before
    });
}

#[test]
fn a_transfer_across_a_rekey_does_not_stall() {
    // REKEY_AFTER_TIME: the initiator (the client) starts a new handshake on the first
    // packet it sends after 120 s of a session.
    const PINGS: u32 = 650;
    let (chain, dockvpn) = vpn_chain(&[]);
    let client = connected_client(&chain.right_host, &chain.si, &dockvpn, "kurt");
    let first = client.latest_handshake();
    let (sent, received) = ping_run(&chain.right_host, LEFT_HOST, PINGS);
    assert_eq!(sent, PINGS);
    assert!(
        received + 1 >= sent,
        "{} of {sent} pings lost across the rekey\n{}",
        sent - received,
        dockvpn.log()
    );
    let latest = client.latest_handshake();
    assert!(
        latest >= first + 120,
        "no rekey during the run: handshakes at {first} and {latest}"
    );
}

#[test]
fn a_flood_of_forged_handshake_initiations_does_not_stop_a_real_clients_handshake() {
    // 700 a second, far above the rate at which the server asks for cookies (100 a second),
    // for about 14 s: the real client's handshake (a cookie reply, then its retry with the
    // cookie after REKEY_TIMEOUT, 5 s) must complete while the flood lasts.
    const INITIATIONS: u64 = 10_000;
    const PER_SECOND: u64 = 700;
    let (chain, dockvpn) = vpn_chain(&[]);
    let profile_text = wireguard_profile(&chain.si, &dockvpn, "fred");
    let server_public = Profile::parse(&profile_text)
        .peer()
        .value("PublicKey")
        .expect("the server's PublicKey");
    let server = endpoint().parse().expect("socket address");
    let (report, client) = std::thread::scope(|scope| {
        let flood = scope.spawn(|| {
            flood_forged_initiations(
                &chain.right_gateway,
                server,
                &server_public,
                INITIATIONS,
                PER_SECOND,
            )
        });
        wait_for_status(&chain.si, &dockvpn, "the server under load", |status| {
            status["vpn"]["dropped"]["handshakes_under_load"].as_u64() > Some(0)
        });
        let client = WireguardClient::start(&chain.right_host, &profile_text, Some(&endpoint()));
        let handshake = client.wait_for_handshake_after(0, HANDSHAKE_WITHIN);
        assert!(
            !flood.is_finished(),
            "the flood ended before the client's handshake ({handshake:?}): too short to prove anything"
        );
        handshake.unwrap_or_else(|e| panic!("{e} during the flood\n{}", dockvpn.log()));
        (flood.join().expect("flood thread"), client)
    });
    assert_eq!(
        report.other_replies, 0,
        "the forged key got handshake responses: {report:?}"
    );
    assert!(
        report.cookie_replies > 0,
        "the server never asked the flood for a cookie: {report:?}"
    );
    assert!(
        ping_eventually(&chain.right_host, LEFT_HOST, TUNNEL_PING_ATTEMPTS),
        "{}",
        dockvpn.log()
    );
    drop(client);
}

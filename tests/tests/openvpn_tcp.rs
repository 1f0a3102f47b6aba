//! Dockvpn's TCP transport with the stock OpenVPN 2.6 client: a UDP and a TCP client at once
//! on the same port (and a TCP client gone with its connection), idle connections that cannot keep a real client out and are closed
//! after the deadline, `--proto udp` refusing TCP, and `<connection>` blocks in profiles.

use std::io::{ErrorKind, Read};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use docknfv_tests::chain::{LEFT_HOST, SI_RIGHT};
use docknfv_tests::openvpn::{issue_profile_with, status_json, vpn_chain, OpenvpnClient};
use docknfv_tests::traffic::ping_eventually;
use docknfv_tests::{Netns, Vnf};

/// Echo requests a positive check through the tunnel may use (a debug build on a shared
/// machine).
const TUNNEL_PING_ATTEMPTS: u32 = 5;

fn server() -> SocketAddr {
    SocketAddr::new(SI_RIGHT.parse().unwrap(), 1194)
}

/// Waits up to `timeout` for `status --json` to satisfy `done`; the last status either way.
fn status_when(
    si: &Netns,
    dockvpn: &Vnf,
    timeout: Duration,
    done: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    let deadline = Instant::now() + timeout;
    loop {
        let status = status_json(si, dockvpn);
        if done(&status) || Instant::now() >= deadline {
            return status;
        }
        std::thread::sleep(Duration::from_millis(250));
    }
}

#[test]
fn a_udp_and_a_tcp_client_pass_traffic_at_once_on_the_same_port() {
    let (chain, dockvpn) = vpn_chain(&[]);
    let alice = OpenvpnClient::start(
        &chain.right_host,
        &issue_profile_with(&chain.si, &dockvpn, "alice", &["--proto", "udp"]),
        &[],
    );
    // The right gateway is a second remote site; its direct route to the left is gone too.
    let tcp_profile = issue_profile_with(&chain.si, &dockvpn, "bob", &["--proto", "tcp"]);
    assert!(
        tcp_profile.contains("\nproto tcp-client\nremote 10.0.2.2 1194\n"),
        "{tcp_profile}"
    );
    let mut bob = OpenvpnClient::start(&chain.right_gateway, &tcp_profile, &[]);
    alice.assert_connected(&dockvpn);
    bob.assert_connected(&dockvpn);
    assert!(
        bob.log()
            .contains("TCP connection established with [AF_INET]10.0.2.2:1194"),
        "{}",
        bob.log()
    );
    for (site, name) in [(&chain.right_host, "alice"), (&chain.right_gateway, "bob")] {
        assert!(
            ping_eventually(site, LEFT_HOST, TUNNEL_PING_ATTEMPTS),
            "{name} reaches no left host\nserver:\n{}",
            dockvpn.log()
        );
    }
    let status = status_when(&chain.si, &dockvpn, Duration::from_secs(5), |status| {
        status["vpn"]["clients"].as_array().map(Vec::len) == Some(2)
    });
    assert_eq!(status["vpn"]["proto"], "both", "{status}");
    let proto_of = |name: &str| {
        status["vpn"]["clients"]
            .as_array()
            .and_then(|clients| clients.iter().find(|c| c["name"] == name))
            .map(|c| c["proto"].clone())
    };
    assert_eq!(proto_of("alice"), Some("udp".into()), "{status}");
    assert_eq!(proto_of("bob"), Some("tcp".into()), "{status}");

    // Over TCP the client sends no exit notification: the closed connection ends its session
    // at once, not after --ping-restart (60 s).
    assert!(bob.process.terminate().success(), "{}", bob.log());
    let status = status_when(&chain.si, &dockvpn, Duration::from_secs(5), |status| {
        status["vpn"]["clients"].as_array().map(Vec::len) == Some(1)
    });
    let names: Vec<&serde_json::Value> = status["vpn"]["clients"]
        .as_array()
        .map(|clients| clients.iter().map(|c| &c["name"]).collect())
        .unwrap_or_default();
    assert_eq!(names, ["alice"], "{status}\nserver:\n{}", dockvpn.log());
    assert_eq!(status["vpn"]["tcp"]["open"], 0, "{status}");
}

#[test]
fn idle_tcp_connections_do_not_keep_a_real_client_out_and_are_closed_after_the_deadline() {
    const IDLE: usize = 200;
    let (chain, dockvpn) = vpn_chain(&[]);
    let idle: Vec<TcpStream> = chain.right_gateway.run(|| {
        (0..IDLE)
            .map(|i| {
                TcpStream::connect_timeout(&server(), Duration::from_secs(5))
                    .unwrap_or_else(|e| panic!("idle connection {i}: {e}"))
            })
            .collect()
    });
    let profile = issue_profile_with(&chain.si, &dockvpn, "alice", &["--proto", "tcp"]);
    let alice = OpenvpnClient::start(&chain.right_host, &profile, &[]);
    alice.assert_connected(&dockvpn);
    assert!(ping_eventually(
        &chain.right_host,
        LEFT_HOST,
        TUNNEL_PING_ATTEMPTS
    ));
    // The server closes every connection that started no session within 10 s: each idle
    // socket reads end-of-stream (bounded: a read waits at most the remaining time).
    let deadline = Instant::now() + Duration::from_secs(30);
    for (i, mut stream) in idle.into_iter().enumerate() {
        let read = loop {
            let left = deadline.saturating_duration_since(Instant::now());
            stream
                .set_read_timeout(Some(left.max(Duration::from_millis(1))))
                .unwrap();
            match stream.read(&mut [0u8; 1]) {
                // A signal for a child process of another test; the deadline still bounds it.
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                read => break read,
            }
        };
        match read {
            Ok(0) => {}
            Err(e) if e.kind() == ErrorKind::ConnectionReset => {}
            other => panic!(
                "idle connection {i} still open after the deadline: {other:?}\nstatus: {}\nserver:\n{}",
                status_json(&chain.si, &dockvpn)["vpn"]["tcp"],
                dockvpn.log()
            ),
        }
    }
    let status = status_when(&chain.si, &dockvpn, Duration::from_secs(5), |status| {
        status["vpn"]["tcp"]["closed_without_session"].as_u64() >= Some(IDLE as u64)
    });
    assert_eq!(
        status["vpn"]["tcp"]["closed_without_session"], IDLE,
        "{status}"
    );
    assert_eq!(status["vpn"]["tcp"]["open"], 1, "only alice: {status}");
    assert_eq!(status["vpn"]["clients"][0]["name"], "alice", "{status}");
}

#[test]
fn connections_beyond_the_limit_are_closed_at_once_and_counted() {
    // --max-clients 4: four clients and four handshakes, so eight connections.
    let (chain, dockvpn) = vpn_chain(&["--max-clients", "4"]);
    let streams: Vec<TcpStream> = chain.right_gateway.run(|| {
        (0..20)
            .map(|_| TcpStream::connect_timeout(&server(), Duration::from_secs(5)).unwrap())
            .collect()
    });
    let status = status_when(&chain.si, &dockvpn, Duration::from_secs(5), |status| {
        status["vpn"]["tcp"]["refused_over_limit"] == 12
    });
    assert_eq!(status["vpn"]["tcp"]["refused_over_limit"], 12, "{status}");
    assert_eq!(status["vpn"]["tcp"]["open"], 8, "{status}");
    drop(streams);
}

#[test]
fn proto_udp_refuses_tcp_and_a_profile_for_both_connects_with_its_udp_block_first() {
    let (chain, dockvpn) = vpn_chain(&["--proto", "udp"]);
    let refused = chain
        .right_host
        .run(|| TcpStream::connect_timeout(&server(), Duration::from_secs(5)));
    assert_eq!(
        refused.as_ref().map_err(std::io::Error::kind).err(),
        Some(ErrorKind::ConnectionRefused),
        "{refused:?}"
    );
    let profile = issue_profile_with(&chain.si, &dockvpn, "alice", &["--proto", "both"]);
    let blocks: Vec<&str> = profile
        .split("<connection>\n")
        .skip(1)
        .map(|block| block.split("</connection>").next().unwrap_or_default())
        .collect();
    assert_eq!(
        blocks,
        [
            "remote 10.0.2.2 1194\nproto udp\n",
            "remote 10.0.2.2 1194\nproto tcp-client\n"
        ],
        "{profile}"
    );
    let alice = OpenvpnClient::start(&chain.right_host, &profile, &[]);
    alice.assert_connected(&dockvpn);
    assert!(
        alice
            .log()
            .contains("UDPv4 link remote: [AF_INET]10.0.2.2:1194"),
        "the client took the UDP block first:\n{}",
        alice.log()
    );
    assert!(ping_eventually(
        &chain.right_host,
        LEFT_HOST,
        TUNNEL_PING_ATTEMPTS
    ));
    // Without --proto, a profile follows what the running server serves.
    let config = dockvpn.cli(&chain.si, "dockvpn", &["client", "config", "alice"]);
    let default_profile = String::from_utf8_lossy(&config.stdout);
    assert!(
        default_profile.contains("\nproto udp\nremote 10.0.2.2 1194\n")
            && !default_profile.contains("<connection>"),
        "{default_profile}"
    );
}

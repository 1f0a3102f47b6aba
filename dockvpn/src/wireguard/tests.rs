//! The engine against boringtun's own tunnel as the client: the same noise code a
//! WireGuard peer runs, driven in memory (the end-to-end tests use wireguard-go).

use std::net::{Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use boringtun::noise::{Tunn, TunnResult};
use boringtun::x25519::{PublicKey, StaticSecret};

use super::*;

const ALICE: Ipv4Addr = Ipv4Addr::new(10, 8, 0, 2);
const LEFT_HOST: Ipv4Addr = Ipv4Addr::new(192, 168, 10, 5);

struct Client {
    tunn: Tunn,
    config: PeerConfig,
    from: SocketAddr,
}

fn key() -> [u8; 32] {
    rand::random()
}

fn client(server: &WireguardServer, name: &str, address: Ipv4Addr, port: u16) -> Client {
    let secret = key();
    let preshared_key = key();
    let config = PeerConfig {
        name: name.to_owned(),
        address,
        public_key: PublicKey::from(&StaticSecret::from(secret)).to_bytes(),
        preshared_key,
    };
    Client {
        tunn: Tunn::new(
            StaticSecret::from(secret),
            PublicKey::from(server.public_key()),
            Some(preshared_key),
            None,
            rand::random::<u32>() >> 8,
            None,
        ),
        config,
        from: SocketAddr::from(([198, 51, 100, 7], port)),
    }
}

/// A minimal IPv4 packet (protocol 253, for experiments) of `payload` bytes.
fn ipv4(source: Ipv4Addr, destination: Ipv4Addr, payload: usize) -> Vec<u8> {
    let length = 20 + payload;
    let mut packet = vec![0u8; length];
    packet[0] = 0x45;
    packet[2..4].copy_from_slice(&(length as u16).to_be_bytes());
    packet[8] = 64;
    packet[9] = 253;
    packet[12..16].copy_from_slice(&source.octets());
    packet[16..20].copy_from_slice(&destination.octets());
    packet
}

fn outputs(server: &mut WireguardServer) -> Vec<Output> {
    std::iter::from_fn(|| server.poll_output()).collect()
}

fn transmitted(outputs: &[Output]) -> Vec<(SocketAddr, Vec<u8>)> {
    outputs
        .iter()
        .filter_map(|o| match o {
            Output::Transmit { to, datagram } => Some((*to, datagram.clone())),
            _ => None,
        })
        .collect()
}

fn tun_packets(outputs: &[Output]) -> Vec<Vec<u8>> {
    outputs
        .iter()
        .filter_map(|o| match o {
            Output::Tun(packet) => Some(packet.clone()),
            _ => None,
        })
        .collect()
}

fn events(outputs: &[Output]) -> Vec<Event> {
    outputs
        .iter()
        .filter_map(|o| match o {
            Output::Event(event) => Some(event.clone()),
            _ => None,
        })
        .collect()
}

fn only<T: std::fmt::Debug>(mut items: Vec<T>, what: &str) -> T {
    assert_eq!(items.len(), 1, "expected one {what}: {items:?}");
    items.remove(0)
}

fn initiation(client: &mut Client) -> Vec<u8> {
    let mut buffer = vec![0u8; 2048];
    match client.tunn.format_handshake_initiation(&mut buffer, true) {
        TunnResult::WriteToNetwork(datagram) => datagram.to_vec(),
        other => panic!("no initiation: {other:?}"),
    }
}

/// What the client makes of a datagram from the server: what it sends back, and the packet
/// it writes to its tun.
fn client_receives(client: &mut Client, datagram: &[u8]) -> (Vec<Vec<u8>>, Option<Vec<u8>>) {
    let mut buffer = vec![0u8; 65536];
    let mut replies = Vec::new();
    let mut packet = None;
    match client.tunn.decapsulate(None, datagram, &mut buffer) {
        TunnResult::WriteToNetwork(reply) => {
            replies.push(reply.to_vec());
            while let TunnResult::WriteToNetwork(more) =
                client.tunn.decapsulate(None, &[], &mut buffer)
            {
                replies.push(more.to_vec());
            }
        }
        TunnResult::WriteToTunnelV4(inner, _) => packet = Some(inner.to_vec()),
        TunnResult::Done => {}
        other => panic!("client rejected the server's datagram: {other:?}"),
    }
    (replies, packet)
}

fn seal(client: &mut Client, packet: &[u8]) -> Vec<u8> {
    let mut buffer = vec![0u8; 65536];
    match client.tunn.encapsulate(packet, &mut buffer) {
        TunnResult::WriteToNetwork(datagram) => datagram.to_vec(),
        other => panic!("client cannot seal: {other:?}"),
    }
}

/// Handshake, and the client's confirming keepalive; returns the server's peer id.
fn connect(server: &mut WireguardServer, client: &mut Client, now: Instant) -> PeerId {
    let hello = initiation(client);
    server.handle_datagram(now, client.from, &hello);
    let out = outputs(server);
    let (to, response) = only(transmitted(&out), "handshake response");
    assert_eq!(to, client.from);
    assert!(
        events(&out).is_empty(),
        "connected before the client confirmed: {out:?}"
    );
    let (replies, _) = client_receives(client, &response);
    for reply in replies {
        server.handle_datagram(now, client.from, &reply);
    }
    let out = outputs(server);
    assert!(transmitted(&out).is_empty(), "a keepalive needs no answer");
    match &events(&out)[..] {
        [Event::Connected {
            name,
            address,
            peer,
            endpoint,
        }] => {
            assert_eq!(
                (name, *address, *endpoint),
                (&client.config.name, client.config.address, client.from)
            );
            *peer
        }
        other => panic!("expected one Connected event, got {other:?}"),
    }
}

#[test]
fn a_registered_client_handshakes_and_traffic_flows_both_ways() {
    let mut server = WireguardServer::new(key(), Instant::now());
    let mut alice = client(&server, "alice", ALICE, 40000);
    server.set_peers(vec![alice.config.clone()]);
    let now = Instant::now();
    let id = connect(&mut server, &mut alice, now);

    let outbound = ipv4(ALICE, LEFT_HOST, 100);
    server.handle_datagram(now, alice.from, &seal(&mut alice, &outbound));
    assert_eq!(tun_packets(&outputs(&mut server)), vec![outbound]);

    let inbound = ipv4(LEFT_HOST, ALICE, 1380);
    server.send_to(id, &inbound);
    let sent = transmitted(&outputs(&mut server));
    assert_eq!(sent.len(), 1);
    assert_eq!(sent[0].0, alice.from);
    assert_eq!(client_receives(&mut alice, &sent[0].1).1, Some(inbound));

    let status = server.connected();
    assert_eq!(status.len(), 1);
    assert_eq!(
        (status[0].name.as_str(), status[0].endpoint),
        ("alice", alice.from)
    );
    assert_eq!((status[0].bytes_in, status[0].bytes_out), (120, 1400));
    assert_eq!(server.counters.total(), 0, "{}", server.counters);
}

#[test]
fn a_rekey_counts_as_a_handshake_and_the_total_outlives_the_client() {
    let mut server = WireguardServer::new(key(), Instant::now());
    let mut alice = client(&server, "alice", ALICE, 40000);
    server.set_peers(vec![alice.config.clone()]);
    let now = Instant::now();
    connect(&mut server, &mut alice, now);
    assert_eq!(server.handshakes, 1);

    let later = now + Duration::from_secs(1);
    server.handle_datagram(later, alice.from, &initiation(&mut alice));
    let (_, response) = only(transmitted(&outputs(&mut server)), "rekey response");
    let (replies, _) = client_receives(&mut alice, &response);
    for reply in replies {
        server.handle_datagram(later, alice.from, &reply);
    }
    assert!(
        events(&outputs(&mut server)).is_empty(),
        "a rekey is no new connect"
    );
    assert_eq!(server.connected()[0].rekeys, 1);
    assert_eq!(server.handshakes, 2);

    // A counter: the client leaving takes nothing off the total.
    server.set_peers(Vec::new());
    assert!(server.connected().is_empty());
    assert_eq!(server.handshakes, 2);
}

#[test]
fn an_unregistered_key_gets_no_reply() {
    let mut server = WireguardServer::new(key(), Instant::now());
    let registered = client(&server, "alice", ALICE, 40000);
    let mut stranger = client(&server, "mallory", ALICE, 40001);
    server.set_peers(vec![registered.config.clone()]);
    server.handle_datagram(Instant::now(), stranger.from, &initiation(&mut stranger));
    assert!(outputs(&mut server).is_empty());
    assert_eq!(server.counters.refused_handshakes, 1);
}

#[test]
fn a_removed_client_is_disconnected_and_its_next_packets_get_no_reply() {
    let mut server = WireguardServer::new(key(), Instant::now());
    let mut alice = client(&server, "alice", ALICE, 40000);
    server.set_peers(vec![alice.config.clone()]);
    let now = Instant::now();
    let id = connect(&mut server, &mut alice, now);

    server.set_peers(Vec::new());
    match &events(&outputs(&mut server))[..] {
        [Event::Disconnected { peer, address, .. }] => assert_eq!((*peer, *address), (id, ALICE)),
        other => panic!("expected one Disconnected event, got {other:?}"),
    }
    server.handle_datagram(
        now,
        alice.from,
        &seal(&mut alice, &ipv4(ALICE, LEFT_HOST, 10)),
    );
    server.handle_datagram(now, alice.from, &initiation(&mut alice));
    assert!(outputs(&mut server).is_empty());
    assert_eq!(server.connected_count(), 0);
}

#[test]
fn a_packet_from_another_address_than_the_clients_is_dropped() {
    let mut server = WireguardServer::new(key(), Instant::now());
    let mut alice = client(&server, "alice", ALICE, 40000);
    server.set_peers(vec![alice.config.clone()]);
    connect(&mut server, &mut alice, Instant::now());
    let spoofed = ipv4(Ipv4Addr::new(10, 8, 0, 3), LEFT_HOST, 10);
    server.handle_datagram(Instant::now(), alice.from, &seal(&mut alice, &spoofed));
    assert!(tun_packets(&outputs(&mut server)).is_empty());
    assert_eq!(server.counters.spoofed_source, 1);
}

#[test]
fn a_client_that_roams_is_answered_at_its_new_endpoint() {
    let mut server = WireguardServer::new(key(), Instant::now());
    let mut alice = client(&server, "alice", ALICE, 40000);
    server.set_peers(vec![alice.config.clone()]);
    let id = connect(&mut server, &mut alice, Instant::now());
    alice.from = SocketAddr::from(([203, 0, 113, 9], 51000));
    let packet = ipv4(ALICE, LEFT_HOST, 10);
    server.handle_datagram(Instant::now(), alice.from, &seal(&mut alice, &packet));
    assert_eq!(tun_packets(&outputs(&mut server)), vec![packet]);
    server.send_to(id, &ipv4(LEFT_HOST, ALICE, 10));
    assert_eq!(transmitted(&outputs(&mut server))[0].0, alice.from);
    assert_eq!(server.connected()[0].endpoint, alice.from);
}

#[test]
fn an_unauthenticated_packet_does_not_move_the_client() {
    let mut server = WireguardServer::new(key(), Instant::now());
    let mut alice = client(&server, "alice", ALICE, 40000);
    server.set_peers(vec![alice.config.clone()]);
    let id = connect(&mut server, &mut alice, Instant::now());
    let mut forged = seal(&mut alice, &ipv4(ALICE, LEFT_HOST, 10));
    let last = forged.len() - 1;
    forged[last] ^= 1;
    server.handle_datagram(
        Instant::now(),
        SocketAddr::from(([203, 0, 113, 66], 1)),
        &forged,
    );
    assert_eq!(server.counters.unauthenticated_data, 1);
    server.send_to(id, &ipv4(LEFT_HOST, ALICE, 10));
    assert_eq!(transmitted(&outputs(&mut server))[0].0, alice.from);
}

#[test]
fn under_a_handshake_flood_a_real_client_still_connects_with_a_cookie() {
    let mut server = WireguardServer::new(key(), Instant::now());
    let mut alice = client(&server, "alice", ALICE, 40000);
    let mut forger = client(&server, "forged", Ipv4Addr::new(10, 8, 0, 99), 666);
    server.set_peers(vec![alice.config.clone()]);
    let now = Instant::now();
    for _ in 0..1000 {
        server.handle_datagram(now, forger.from, &initiation(&mut forger));
    }
    let cookies = transmitted(&outputs(&mut server));
    assert!(
        cookies.len() >= 800,
        "past the limit every initiation is answered with a cookie, not a handshake: {}",
        cookies.len()
    );
    assert!(server.counters.handshakes_under_load >= 800);

    // Still under load: alice's first initiation gets a cookie, her retry carries it.
    server.handle_datagram(now, alice.from, &initiation(&mut alice));
    let out = outputs(&mut server);
    let (_, cookie) = only(transmitted(&out), "cookie reply");
    assert!(events(&out).is_empty());
    let (replies, _) = client_receives(&mut alice, &cookie);
    assert!(replies.is_empty());
    connect(&mut server, &mut alice, now);
}

#[test]
fn garbage_is_counted_and_never_answered() {
    let mut server = WireguardServer::new(key(), Instant::now());
    let alice = client(&server, "alice", ALICE, 40000);
    server.set_peers(vec![alice.config.clone()]);
    let from = SocketAddr::from(([198, 51, 100, 1], 9));
    for datagram in [
        &[][..],
        &[1, 0, 0][..],
        &[4, 0, 0, 0, 1, 2, 3, 4][..],
        &[1; 148][..],
        &[2; 92][..],
        &[3; 64][..],
        &[4; 200][..],
    ] {
        server.handle_datagram(Instant::now(), from, datagram);
    }
    assert!(outputs(&mut server).is_empty());
    assert_eq!(server.counters.total(), 7, "{}", server.counters);
}

#[test]
fn a_sealed_packet_whose_header_claims_less_than_a_header_is_dropped() {
    let mut server = WireguardServer::new(key(), Instant::now());
    let mut alice = client(&server, "alice", ALICE, 40000);
    server.set_peers(vec![alice.config.clone()]);
    connect(&mut server, &mut alice, Instant::now());
    let mut packet = ipv4(ALICE, LEFT_HOST, 10);
    packet[2..4].copy_from_slice(&8u16.to_be_bytes());
    server.handle_datagram(Instant::now(), alice.from, &seal(&mut alice, &packet));
    assert!(tun_packets(&outputs(&mut server)).is_empty());
    assert_eq!(server.counters.malformed, 1);
}

#[test]
fn a_replayed_initiation_is_answered_but_neither_connects_nor_moves_the_client() {
    let mut server = WireguardServer::new(key(), Instant::now());
    let mut alice = client(&server, "alice", ALICE, 40000);
    server.set_peers(vec![alice.config.clone()]);
    let recorded = initiation(&mut alice);
    // The server forgets alice (she was re-registered), then her recorded initiation comes
    // back from elsewhere.
    server.set_peers(Vec::new());
    server.set_peers(vec![alice.config.clone()]);
    let elsewhere = SocketAddr::from(([203, 0, 113, 66], 1));
    server.handle_datagram(Instant::now(), elsewhere, &recorded);
    let out = outputs(&mut server);
    assert!(events(&out).is_empty(), "{out:?}");
    assert_eq!(server.connected_count(), 0);
    assert!(server.connected().is_empty());
}

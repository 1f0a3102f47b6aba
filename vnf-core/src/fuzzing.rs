//! The entry points of the fuzz targets in `vnf-core/fuzz`: each target only calls its
//! function here, and an ordinary test (`tests/fuzz_corpus.rs`) replays every committed
//! corpus file through the same function, so a crash found once stays fixed in CI.

use std::net::Ipv4Addr;
use std::time::Instant;

use ipnet::Ipv4Net;

use crate::dhcp::client::{Client, ClientConfig, Lease};
use crate::dhcp::options::{parse_classless, select_routes, Packet, RouteSource};
use crate::dhcp::socket::udp_payload;

/// Arbitrary bytes into everything that reads DHCP from the network: the IP/UDP unwrapping,
/// the option reader with RFC 3396 concatenation and overload, the RFC 3442 route parser,
/// and the client state machine in the states that accept replies. None may panic.
pub fn dhcp_decode(data: &[u8]) {
    let _ = udp_payload(data, true);
    let _ = udp_payload(data, false);
    let _ = parse_classless(data);
    if let Ok(packet) = Packet::parse(data) {
        let _ = select_routes(&packet);
    }

    let config = ClientConfig {
        mac: [2, 0, 0, 0, 0, 1],
        mtu: 1500,
        hostname: None,
        min_prefix: 8,
    };
    let now = Instant::now();
    let mut selecting = Client::new(config.clone(), 1, now);
    selecting.handle_timeout(now);
    // Make the packet's xid and chaddr match so it reaches the message handling.
    let mut reply = data.to_vec();
    if let (Some(transmit), true) = (selecting.poll_transmit(), reply.len() >= 34) {
        reply[4..8].copy_from_slice(&transmit.payload[4..8]);
        reply[28..34].copy_from_slice(&config.mac);
    }
    let server = Ipv4Addr::new(10, 0, 1, 1);
    let _ = selecting.handle_packet(now, server, &reply);
    while selecting.poll_event().is_some() {}

    let stored = Lease {
        address: Ipv4Net::new_assert(Ipv4Addr::new(10, 0, 1, 2), 24),
        server: Ipv4Addr::new(10, 0, 1, 1),
        routers: vec![],
        dns: vec![],
        routes: vec![],
        route_source: RouteSource::None,
        lease_secs: 3600,
        renew_secs: 1800,
        rebind_secs: 3150,
    };
    let mut rebooting = Client::with_stored_lease(config, 2, now, stored);
    if let (Some(transmit), true) = (rebooting.poll_transmit(), reply.len() >= 34) {
        reply[4..8].copy_from_slice(&transmit.payload[4..8]);
    }
    let _ = rebooting.handle_packet(now, server, &reply);
    while rebooting.poll_event().is_some() {}
}

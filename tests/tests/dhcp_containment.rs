//! A rogue or broken DHCP server on the left is contained: a /1 lease is refused, T1=0 does
//! not make the client renew in a loop, and an ACK naming another server is ignored. The
//! first against a real dnsmasq, the others against a scripted server (what dnsmasq will not
//! send) in the left gateway's namespace; the client is Dockvpn's, in its real `run`.

use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use dhcproto::v4::{DhcpOption, Message, MessageType};
use docknfv_tests::dhcp_server::ScriptedServer;
use docknfv_tests::dnsmasq::Dnsmasq;
use docknfv_tests::{Chain, Vnf};

const SERVER: Ipv4Addr = Ipv4Addr::new(10, 0, 1, 1);
const LEASED: Ipv4Addr = Ipv4Addr::new(10, 0, 1, 77);
const ROGUE: Ipv4Addr = Ipv4Addr::new(10, 0, 1, 66);
const SUBNET_BROADCAST: Ipv4Addr = Ipv4Addr::new(10, 0, 1, 255);

/// The chain with the SI's left address removed: DHCP has to supply it.
fn chain_with_dhcp_left() -> Chain {
    let chain = Chain::new();
    chain.si.ip(&["addr", "flush", "dev", "eth0"]);
    chain
}

fn dockvpn_with_dhcp_left(chain: &Chain) -> Vnf {
    Vnf::start(
        &chain.si,
        "dockvpn",
        &["run", "--dhcp", "left", "--side-timeout", "0"],
    )
}

/// The options of a sane /24 lease for an hour, plus `extra`.
fn lease_options(extra: &[DhcpOption]) -> Vec<DhcpOption> {
    let mut options = vec![
        DhcpOption::SubnetMask(Ipv4Addr::new(255, 255, 255, 0)),
        DhcpOption::AddressLeaseTime(3600),
        DhcpOption::Router(vec![SERVER]),
    ];
    options.extend_from_slice(extra);
    options
}

/// Answers the client's DISCOVER with an offer of LEASED from SERVER; its REQUEST.
fn offer_and_await_the_request(
    server: &ScriptedServer,
    dockvpn: &Vnf,
    options: &[DhcpOption],
) -> Message {
    let (discover, _) = server
        .receive(MessageType::Discover, Duration::from_secs(10))
        .unwrap_or_else(|| panic!("no DISCOVER\n{}", dockvpn.log()));
    server.reply(&discover, MessageType::Offer, LEASED, SERVER, options);
    server
        .receive(MessageType::Request, Duration::from_secs(10))
        .unwrap_or_else(|| panic!("no REQUEST\n{}", dockvpn.log()))
        .0
}

fn left_addresses(chain: &Chain) -> String {
    chain.si.ip(&["-4", "-o", "addr", "show", "dev", "eth0"])
}

#[test]
fn a_lease_with_a_slash_1_netmask_is_refused_and_logged() {
    let chain = chain_with_dhcp_left();
    let _dnsmasq = Dnsmasq::start(
        &chain.left_gateway,
        "wan",
        "10.0.1.50,10.0.1.99,255.255.255.0,2m",
        &["option:netmask,128.0.0.0"],
    );
    let dockvpn = dockvpn_with_dhcp_left(&chain);
    let line = dockvpn
        .wait_for_log("DHCP lease refused", Duration::from_secs(15))
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(
        line.contains("/1 from server 10.0.1.1 refused")
            && line.contains("shorter than /8 (--dhcp-min-prefix)"),
        "{line}"
    );
    assert!(
        !left_addresses(&chain).contains("inet "),
        "the /1 lease was installed: {}",
        left_addresses(&chain)
    );
    assert!(
        !chain.si.ip(&["route", "show"]).contains("0.0.0.0/1"),
        "{}",
        chain.si.ip(&["route", "show"])
    );
}

#[test]
fn a_server_sending_t1_zero_gets_one_renewal_a_minute() {
    let chain = chain_with_dhcp_left();
    let server = ScriptedServer::start(&chain.left_gateway, SUBNET_BROADCAST);
    let dockvpn = dockvpn_with_dhcp_left(&chain);
    let options = lease_options(&[DhcpOption::Renewal(0)]);
    let request = offer_and_await_the_request(&server, &dockvpn, &options);
    server.reply(&request, MessageType::Ack, LEASED, SERVER, &options);
    let acked = Instant::now();
    dockvpn.wait_ready();

    let (renewal, at) = server
        .receive(MessageType::Request, Duration::from_secs(90))
        .unwrap_or_else(|| panic!("no renewal within 90 s\n{}", dockvpn.log()));
    assert_eq!(
        renewal.ciaddr(),
        LEASED,
        "a renewal from the leased address"
    );
    let after = at - acked;
    assert!(
        after >= Duration::from_secs(59),
        "T1=0 made the client renew after {after:?}"
    );
}

#[test]
fn an_ack_naming_another_server_is_ignored() {
    let chain = chain_with_dhcp_left();
    let server = ScriptedServer::start(&chain.left_gateway, SUBNET_BROADCAST);
    let dockvpn = dockvpn_with_dhcp_left(&chain);
    let options = lease_options(&[]);
    let request = offer_and_await_the_request(&server, &dockvpn, &options);
    // Same IP source and transaction, another server identifier and address.
    server.reply(&request, MessageType::Ack, ROGUE, ROGUE, &options);

    // Still requesting: the client asks again instead of binding the forged lease.
    let (again, _) = server
        .receive(MessageType::Request, Duration::from_secs(10))
        .unwrap_or_else(|| {
            panic!(
                "the client stopped asking: it took the forged ACK?\n{}\n{}",
                left_addresses(&chain),
                dockvpn.log()
            )
        });
    assert_eq!(again.xid(), request.xid(), "the same transaction");
    assert!(
        !left_addresses(&chain).contains(&ROGUE.to_string()),
        "{}",
        left_addresses(&chain)
    );
    server.reply(&again, MessageType::Ack, LEASED, SERVER, &options);
    dockvpn.wait_ready();
    let addresses = left_addresses(&chain);
    assert!(
        addresses.contains(&format!("inet {LEASED}/24")) && !addresses.contains(&ROGUE.to_string()),
        "{addresses}"
    );
}

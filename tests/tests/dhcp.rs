//! The DHCP client against a real dnsmasq in the left gateway's namespace: the SI's left leg
//! starts without an address and learns address, gateway and the left networks.

use std::net::{Ipv4Addr, UdpSocket};
use std::time::{Duration, Instant};

use docknfv_tests::chain::{LEFT_HOST, LEFT_HOST_NET, RIGHT_GATEWAY, RIGHT_HOST};
use docknfv_tests::dnsmasq::Dnsmasq;
use docknfv_tests::traffic::{ping, ping_eventually};
use docknfv_tests::{Chain, Vnf};
use vnf_core::dhcp::options::Packet;

const RANGE: &str = "10.0.1.50,10.0.1.99,255.255.255.0,2m";

/// The chain with the SI's left address removed: DHCP has to supply it.
fn chain_with_dhcp_left() -> Chain {
    let chain = Chain::new();
    chain.si.ip(&["addr", "flush", "dev", "eth0"]);
    chain
}

/// The address the SI's left leg holds.
fn leased_address(chain: &Chain) -> Ipv4Addr {
    let address = chain.si.ip(&["-4", "-o", "addr", "show", "dev", "eth0"]);
    address
        .split_whitespace()
        .nth(3)
        .and_then(|a| a.split('/').next()?.parse().ok())
        .unwrap_or_else(|| panic!("no leased address: {address}"))
}

/// Whether a DHCPREQUEST with `ciaddr` reaches `socket` within `timeout`.
fn next_request_for(socket: &UdpSocket, ciaddr: Ipv4Addr, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    let mut buffer = [0u8; 1500];
    while let Some(left) = deadline.checked_duration_since(Instant::now()) {
        socket
            .set_read_timeout(Some(left.max(Duration::from_millis(1))))
            .expect("read timeout");
        let Ok(length) = socket.recv(&mut buffer) else {
            return false;
        };
        let payload = &buffer[..length];
        let is_request = Packet::parse(payload)
            .is_ok_and(|p| p.header.op == BOOT_REQUEST && p.byte(MESSAGE_TYPE) == Some(REQUEST));
        if is_request && payload[12..16] == ciaddr.octets() {
            return true;
        }
    }
    false
}

const BOOT_REQUEST: u8 = 1;
const MESSAGE_TYPE: u8 = 53;
const REQUEST: u8 = 3;

/// Waits until `check` passes, for at most `seconds`.
fn eventually(seconds: u64, mut check: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + Duration::from_secs(seconds);
    while Instant::now() < deadline {
        if check() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    false
}

#[test]
fn neutron_style_routes_reach_dockvpn_main_table_but_not_the_left_default() {
    let chain = chain_with_dhcp_left();
    // Neutron: 121 with host routes (and 0.0.0.0/0 appended), 249 the same, and the router.
    let _dnsmasq = Dnsmasq::start(
        &chain.left_gateway,
        "wan",
        RANGE,
        &[
            "option:classless-static-route,169.254.169.254/32,10.0.1.1,192.168.10.0/24,10.0.1.1,0.0.0.0/0,10.0.1.1",
            "249,169.254.169.254/32,10.0.1.1,192.168.10.0/24,10.0.1.1,0.0.0.0/0,10.0.1.1",
            "option:router,10.0.1.1",
        ],
    );
    let mut dockvpn = Vnf::start(
        &chain.si,
        "dockvpn",
        &["run", "--dhcp", "left", "--side-timeout", "30"],
    );
    dockvpn.wait_ready();
    let main = chain.si.ip(&["route", "show", "table", "main"]);
    assert!(
        main.contains(&format!("{LEFT_HOST_NET} via 10.0.1.1 dev eth0 proto dhcp")),
        "{main}"
    );
    assert!(
        main.contains("169.254.169.254 via 10.0.1.1 dev eth0 proto dhcp"),
        "{main}"
    );
    assert!(
        main.contains(&format!("default via {RIGHT_GATEWAY} dev eth1 proto 245")),
        "{main}"
    );
    assert!(
        !main.contains("default via 10.0.1.1"),
        "the left default must not be installed:\n{main}"
    );
    let address = chain.si.ip(&["-4", "addr", "show", "dev", "eth0"]);
    assert!(
        address.contains("inet 10.0.1.") && address.contains("valid_lft"),
        "{address}"
    );
    assert!(
        ping(&chain.si, LEFT_HOST),
        "the learned route reaches the left host"
    );
    assert!(ping(&chain.si, RIGHT_HOST));

    assert!(dockvpn.terminate().success(), "{}", dockvpn.log());
    let main = chain.si.ip(&["route", "show", "table", "main"]);
    assert!(
        !main.contains("proto dhcp"),
        "released lease left routes:\n{main}"
    );
    assert!(
        !chain
            .si
            .ip(&["-4", "addr", "show", "dev", "eth0"])
            .contains("10.0.1."),
        "released address stayed"
    );
}

#[test]
fn contrail_style_default_inside_121_gives_dockwall_its_left_gateway() {
    let chain = chain_with_dhcp_left();
    // A gateway other than the subnet's first host, which Dockwall would assume without
    // the lease.
    chain
        .left_gateway
        .ip(&["addr", "add", "10.0.1.254/24", "dev", "wan"]);
    // The vRouter: 121 with the default route inside, no option 3.
    let _dnsmasq = Dnsmasq::start(
        &chain.left_gateway,
        "wan",
        RANGE,
        &[
            "option:classless-static-route,0.0.0.0/0,10.0.1.254,172.16.0.0/12,10.0.1.254",
            "option:router",
        ],
    );
    let mut dockwall = Vnf::start(
        &chain.si,
        "dockwall",
        &["run", "--dhcp", "left", "--side-timeout", "30"],
    );
    dockwall.wait_ready();
    let table = chain.si.ip(&["route", "show", "table", "1001"]);
    assert!(
        table.contains("default via 10.0.1.254 dev eth0 proto 245"),
        "the lease's gateway is the side's:\n{table}"
    );
    assert!(
        table.contains("172.16.0.0/12 via 10.0.1.254 dev eth0 proto dhcp"),
        "{table}"
    );
    // The left gateway routes the right hosts via the SI's first-leased address; point it at
    // whatever address the SI got.
    let si_left = leased_address(&chain).to_string();
    chain.left_gateway.ip(&[
        "route",
        "replace",
        docknfv_tests::chain::RIGHT_HOST_NET,
        "via",
        &si_left,
    ]);
    assert!(
        ping_eventually(&chain.left_host, RIGHT_HOST, 3),
        "left → right through the DHCP-configured SI"
    );
    assert!(ping(&chain.right_host, LEFT_HOST));
    assert!(dockwall.terminate().success());
}

#[test]
fn renewal_with_changed_routes_updates_the_kernel() {
    let chain = chain_with_dhcp_left();
    let options = |routes: &str| {
        vec![
            format!("option:classless-static-route,{routes}"),
            "option:T1,4".to_string(),
            "option:T2,8".to_string(),
        ]
    };
    let first = options("192.168.10.0/24,10.0.1.1");
    let dnsmasq = Dnsmasq::start(
        &chain.left_gateway,
        "wan",
        RANGE,
        &first.iter().map(String::as_str).collect::<Vec<_>>(),
    );
    let dockvpn = Vnf::start(
        &chain.si,
        "dockvpn",
        &["run", "--dhcp", "left", "--side-timeout", "30"],
    );
    dockvpn.wait_ready();
    let main = || {
        chain
            .si
            .ip(&["route", "show", "table", "main", "proto", "dhcp"])
    };
    assert!(
        main().contains("192.168.10.0/24 via 10.0.1.1"),
        "{}",
        main()
    );

    let changed = options("10.30.0.0/16,10.0.1.1");
    dnsmasq.reload(&changed.iter().map(String::as_str).collect::<Vec<_>>());
    // T1=4 is clamped to a minute (a two-minute lease): the renewal comes after 60 s.
    assert!(
        eventually(75, || {
            let routes = main();
            routes.contains("10.30.0.0/16 via 10.0.1.1") && !routes.contains("192.168.10.0/24")
        }),
        "the renewal did not change the routes:\n{}\n{}",
        main(),
        dockvpn.log()
    );
}

#[test]
fn an_off_subnet_gateway_and_28_host_routes_are_installed() {
    let chain = chain_with_dhcp_left();
    chain
        .left_gateway
        .ip(&["addr", "add", "10.9.9.1/32", "dev", "wan"]);
    let mut routes: Vec<String> = (1..=27)
        .map(|i| format!("10.7.0.{i}/32,10.0.1.1"))
        .collect();
    routes.push("192.168.10.0/24,10.9.9.1".into());
    let option = format!("option:classless-static-route,{}", routes.join(","));
    let _dnsmasq = Dnsmasq::start(&chain.left_gateway, "wan", RANGE, &[option.as_str()]);
    let dockvpn = Vnf::start(
        &chain.si,
        "dockvpn",
        &["run", "--dhcp", "left", "--side-timeout", "30"],
    );
    dockvpn.wait_ready();
    let learned = chain
        .si
        .ip(&["route", "show", "table", "main", "proto", "dhcp"]);
    assert_eq!(
        learned.lines().filter(|l| l.starts_with("10.7.0.")).count(),
        27,
        "{learned}"
    );
    assert!(
        learned.contains("10.9.9.1 dev eth0 scope link"),
        "the off-subnet gateway gets a link route:\n{learned}"
    );
    assert!(
        learned.contains("192.168.10.0/24 via 10.9.9.1 dev eth0"),
        "{learned}"
    );
    assert!(
        ping(&chain.si, LEFT_HOST),
        "traffic goes through the off-subnet gateway"
    );
}

#[test]
fn a_stored_lease_the_server_refuses_is_naked_and_replaced() {
    let chain = chain_with_dhcp_left();
    let _dnsmasq = Dnsmasq::start(
        &chain.left_gateway,
        "wan",
        RANGE,
        &["option:router,10.0.1.1"],
    );
    let state = docknfv_tests::dockwall::StateDir::new();
    std::fs::create_dir_all(state.path()).unwrap();
    let stale = serde_json::json!({
        "lease": {"address": "10.0.1.200/24", "server": "10.0.1.1", "routers": ["10.0.1.1"], "dns": [], "routes": [],
                  "route_source": "none", "lease_secs": 86400, "renew_secs": 43200, "rebind_secs": 75600},
        "acquired_unix": std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs(),
    });
    std::fs::write(state.path().join("dhcp-eth0.json"), stale.to_string()).unwrap();
    let dockvpn = Vnf::start(
        &chain.si,
        "dockvpn",
        &[
            "--state-dir",
            state.path().to_str().unwrap(),
            "run",
            "--dhcp",
            "left",
            "--side-timeout",
            "30",
        ],
    );
    dockvpn.wait_ready();
    assert!(dockvpn.log().contains("INIT-REBOOT"), "{}", dockvpn.log());
    assert!(dockvpn.log().contains("reason=nak"), "{}", dockvpn.log());
    let address = chain.si.ip(&["-4", "-o", "addr", "show", "dev", "eth0"]);
    assert!(
        !address.contains("10.0.1.200") && address.contains("inet 10.0.1."),
        "{address}"
    );
    let stored = std::fs::read_to_string(state.path().join("dhcp-eth0.json")).unwrap();
    assert!(
        !stored.contains("10.0.1.200"),
        "the new lease replaced the stored one: {stored}"
    );
}

#[test]
fn a_restart_keeps_the_lease_through_init_reboot() {
    let chain = chain_with_dhcp_left();
    let _dnsmasq = Dnsmasq::start(
        &chain.left_gateway,
        "wan",
        RANGE,
        &["option:classless-static-route,192.168.10.0/24,10.0.1.1"],
    );
    let state = docknfv_tests::dockwall::StateDir::new();
    let state_dir = state.path().to_str().unwrap().to_string();
    let args = [
        "--state-dir",
        state_dir.as_str(),
        "run",
        "--dhcp",
        "left",
        "--on-exit",
        "keep",
        "--side-timeout",
        "30",
    ];
    let mut first = Vnf::start(&chain.si, "dockvpn", &args);
    first.wait_ready();
    let address = chain.si.ip(&["-4", "-o", "addr", "show", "dev", "eth0"]);
    assert!(first.terminate().success());

    let second = Vnf::start(&chain.si, "dockvpn", &args);
    second.wait_ready();
    assert!(second.log().contains("INIT-REBOOT"), "{}", second.log());
    // The kept address makes the side ready at once; the server's answer comes after.
    second
        .wait_for_log("DHCP lease applied", Duration::from_secs(15))
        .unwrap_or_else(|e| panic!("{e}"));
    // dnsmasq would hand the same address to a fresh DISCOVER too: the lease was kept only
    // if the server never refused it.
    assert!(!second.log().contains("reason=nak"), "{}", second.log());
    let again = chain.si.ip(&["-4", "-o", "addr", "show", "dev", "eth0"]);
    let inet = |text: &str| text.split_whitespace().nth(3).map(str::to_string);
    assert_eq!(
        inet(&again),
        inet(&address),
        "the same address after the restart"
    );
    assert!(chain
        .si
        .ip(&["route", "show", "proto", "dhcp"])
        .contains("192.168.10.0/24 via 10.0.1.1"));
}

#[test]
fn a_silent_server_leads_to_rebinding_and_expiry_removes_the_lease() {
    let chain = chain_with_dhcp_left();
    // dnsmasq's shortest lease is two minutes; T1=4 and T2=8 are clamped to a minute, so the
    // client renews after 60 s and rebinds after 105 s.
    let mut dnsmasq = Dnsmasq::start(
        &chain.left_gateway,
        "wan",
        "10.0.1.50,10.0.1.99,255.255.255.0,2m",
        &[
            "option:classless-static-route,192.168.10.0/24,10.0.1.1",
            "option:T1,4",
            "option:T2,8",
        ],
    );
    let dockvpn = Vnf::start(
        &chain.si,
        "dockvpn",
        &["run", "--dhcp", "left", "--side-timeout", "30"],
    );
    dockvpn.wait_ready();
    let bound_at = Instant::now();
    dnsmasq.stop();
    let learned = || chain.si.ip(&["route", "show", "proto", "dhcp"]);
    assert!(learned().contains("192.168.10.0/24"));
    let leased = leased_address(&chain);

    // Where the silent server was, listen to what the client sends: RENEWING unicasts its
    // REQUEST to the server, REBINDING broadcasts it; both carry the lease in ciaddr.
    let (to_server, to_everyone) = chain.left_gateway.run(|| {
        (
            UdpSocket::bind("10.0.1.1:67").expect("bind 10.0.1.1:67"),
            UdpSocket::bind("255.255.255.255:67").expect("bind 255.255.255.255:67"),
        )
    });
    assert!(
        next_request_for(&to_server, leased, Duration::from_secs(75)),
        "no unicast renewal of {leased}:\n{}",
        dockvpn.log()
    );
    assert!(
        next_request_for(&to_everyone, leased, Duration::from_secs(60)),
        "no broadcast REQUEST for {leased}: the client never rebound\n{}",
        dockvpn.log()
    );
    assert!(
        eventually(150, || !learned().contains("192.168.10.0/24")),
        "the lease never expired:\n{}",
        dockvpn.log()
    );
    let waited = bound_at.elapsed();
    assert!(
        waited >= Duration::from_secs(100),
        "routes went after {waited:?}, before the lease ran out"
    );
    assert!(
        !chain
            .si
            .ip(&["-4", "addr", "show", "dev", "eth0"])
            .contains("10.0.1."),
        "the expired address stayed"
    );
    assert!(
        dockvpn.log().contains("reason=expired"),
        "{}",
        dockvpn.log()
    );
}

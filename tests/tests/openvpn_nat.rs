//! Two stock OpenVPN 2.6 clients behind one NAT address, the NAT handing one client's old
//! source port to the other after a reconnect: the server attributes each packet to its own
//! client (data by peer id, control by session id), so each keeps its own traffic and
//! neither is disconnected by the other's packets.

use std::time::{Duration, Instant};

use docknfv_tests::chain::{link, LEFT_HOST, RIGHT_HOST};
use docknfv_tests::openvpn::{issue_profile, vpn_chain, wait_for_status, OpenvpnClient, CONNECTED};
use docknfv_tests::prereq::require_command;
use docknfv_tests::traffic::ping_eventually;
use docknfv_tests::Netns;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

/// The NAT's public ports: each client's mapping is pinned to one of them, so which port a
/// client gets is the test's choice, not the kernel's.
const FIRST_PORT: u16 = 40001;
const SECOND_PORT: u16 = 40002;
const THIRD_PORT: u16 = 40003;

/// The right host as a NAT router: `lan` prefixes behind it, each client's tunnel traffic
/// leaving from `RIGHT_HOST` on the port given.
struct Nat<'a> {
    router: &'a Netns,
}

impl Nat<'_> {
    fn nft(&self, args: &[&str]) {
        let output = self.router.exec("nft", args);
        assert!(
            output.status.success(),
            "nft {args:?}: {}",
            String::from_utf8_lossy(&output.stderr)
        );
    }

    /// Replaces the mappings: `client address → RIGHT_HOST:port` for the tunnel's UDP.
    fn map(&self, mappings: &[(&str, u16)]) {
        self.nft(&["flush", "chain", "ip", "nat", "postrouting"]);
        for (client, port) in mappings {
            let target = format!("{RIGHT_HOST}:{port}");
            self.nft(&[
                "add",
                "rule",
                "ip",
                "nat",
                "postrouting",
                "ip",
                "saddr",
                client,
                "udp",
                "dport",
                "1194",
                "snat",
                "to",
                &target,
            ]);
        }
    }

    /// Forgets every mapping in use, as a NAT does when they time out or it restarts; the
    /// next packet of each flow gets a mapping from the current rules.
    fn forget_mappings(&self) {
        self.conntrack(&["-F"]);
    }

    /// The NAT's UDP mappings for flows from `client`, one line each.
    fn mappings_of(&self, client: &str) -> String {
        self.conntrack(&["-L", "-p", "udp", "-s", client])
    }

    fn conntrack(&self, args: &[&str]) -> String {
        let output = self.router.exec("conntrack", args);
        assert!(
            output.status.success(),
            "conntrack {args:?}: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        String::from_utf8_lossy(&output.stdout).into_owned()
    }
}

/// A namespace behind the NAT at 172.16.`n`.2, its default route via the router.
fn host_behind(router: &Netns, n: u8) -> (Netns, String) {
    let host = Netns::new(&format!("nat{n}"));
    let address = format!("172.16.{n}.2");
    link(
        &host,
        "eth0",
        &format!("{address}/24"),
        router,
        &format!("lan{n}"),
        &format!("172.16.{n}.1/24"),
    );
    host.ip(&["route", "add", "default", "via", &format!("172.16.{n}.1")]);
    (host, address)
}

/// Where the server sees each client connect from: name → `address:port`.
fn peers(status: &serde_json::Value) -> Vec<(String, String)> {
    let mut peers: Vec<(String, String)> = status["vpn"]["clients"]
        .as_array()
        .map(|clients| {
            clients
                .iter()
                .map(|c| {
                    let field = |name: &str| c[name].as_str().unwrap_or_default().to_owned();
                    (field("name"), field("peer"))
                })
                .collect()
        })
        .unwrap_or_default();
    peers.sort();
    peers
}

fn client<'a>(status: &'a serde_json::Value, name: &str) -> &'a serde_json::Value {
    status["vpn"]["clients"]
        .as_array()
        .and_then(|clients| clients.iter().find(|c| c["name"] == name))
        .unwrap_or_else(|| panic!("no client {name} in {status}"))
}

/// Stops or resumes a process.
fn signal_process(pid: u32, signal: Signal) {
    let pid = Pid::from_raw(i32::try_from(pid).expect("a pid"));
    kill(pid, signal).unwrap_or_else(|e| panic!("{signal} to {pid}: {e}"));
}

fn peer_at(port: u16) -> String {
    format!("{RIGHT_HOST}:{port}")
}

#[test]
fn two_clients_behind_one_nat_keep_their_own_traffic_when_the_nat_reuses_a_port() {
    require_command("nft", "nftables");
    require_command("conntrack", "conntrack");
    let (chain, dockvpn) = vpn_chain(&[]);
    let nat = Nat {
        router: &chain.right_host,
    };
    chain.right_host.set_sysctl("net.ipv4.ip_forward", 1);
    nat.nft(&["add", "table", "ip", "nat"]);
    nat.nft(&[
        "add",
        "chain",
        "ip",
        "nat",
        "postrouting",
        "{ type nat hook postrouting priority srcnat ; }",
    ]);
    let (alice_host, alice_address) = host_behind(&chain.right_host, 1);
    let (bob_host, bob_address) = host_behind(&chain.right_host, 2);
    nat.map(&[(&alice_address, FIRST_PORT), (&bob_address, SECOND_PORT)]);

    let alice_profile = issue_profile(&chain.si, &dockvpn, "alice", None);
    let bob_profile = issue_profile(&chain.si, &dockvpn, "bob", None);
    let mut alice = OpenvpnClient::start(&alice_host, &alice_profile, &[]);
    let bob = OpenvpnClient::start(&bob_host, &bob_profile, &[]);
    for client in [&alice, &bob] {
        client.assert_connected(&dockvpn);
    }
    // The status once the server sees Alice and Bob at these NAT ports.
    let wait_for_ports = |alice_port: u16, bob_port: u16| {
        let expected = vec![
            ("alice".to_owned(), peer_at(alice_port)),
            ("bob".to_owned(), peer_at(bob_port)),
        ];
        let what = format!("alice at port {alice_port} and bob at {bob_port}");
        wait_for_status(&chain.si, &dockvpn, &what, |s| peers(s) == expected)
    };
    let before = wait_for_ports(FIRST_PORT, SECOND_PORT);
    let bob_since = client(&before, "bob")["connected_since_unix"].clone();

    // Alice leaves; the NAT forgets its mappings and from now on gives Alice's next flow
    // Bob's port, and Bob's next packet a new one. Bob is stopped meanwhile (a laptop
    // lid closed), so his session still lives at that port when Alice connects from it.
    alice.process.terminate();
    assert!(
        ping_eventually(&bob_host, LEFT_HOST, 3),
        "bob before the switch"
    );
    signal_process(bob.process.pid(), Signal::SIGSTOP);
    nat.map(&[(&alice_address, SECOND_PORT), (&bob_address, THIRD_PORT)]);
    nat.forget_mappings();
    let alice_again = OpenvpnClient::start(&alice_host, &alice_profile, &[]);
    // The port really is reused: Alice's new flow leaves from Bob's old port while Bob has
    // sent nothing since, so the server still holds Bob's session at that address.
    let reused = format!("dport={SECOND_PORT} ");
    let deadline = Instant::now() + Duration::from_secs(5);
    while !nat.mappings_of(&alice_address).contains(&reused) {
        assert!(
            Instant::now() < deadline,
            "alice's flow never got port {SECOND_PORT}: {}\nalice:\n{}",
            nat.mappings_of(&alice_address),
            alice_again.log()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    // Alice gets in at once, Bob's session waits for him (`status` still lists him).
    alice_again.assert_connected(&dockvpn);
    assert_eq!(nat.mappings_of(&bob_address), "", "bob spoke first");
    // Bob wakes up and talks again, from his new port.
    signal_process(bob.process.pid(), Signal::SIGCONT);
    assert!(
        ping_eventually(&bob_host, LEFT_HOST, 5),
        "bob after the NAT moved him\nbob:\n{}\nserver:\n{}",
        bob.log(),
        dockvpn.log()
    );

    let after = wait_for_ports(SECOND_PORT, THIRD_PORT);
    let context = format!(
        "before: {before}\nafter: {after}\nalice:\n{}\nbob:\n{}\nserver:\n{}",
        alice_again.log(),
        bob.log(),
        dockvpn.log()
    );
    for (name, host) in [("alice", &alice_host), ("bob", &bob_host)] {
        assert!(ping_eventually(host, LEFT_HOST, 3), "{name}\n{context}");
    }
    // Each name at its own tunnel address, as before.
    let addresses = |status: &serde_json::Value| {
        let clients = status["vpn"]["clients"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        clients
            .iter()
            .map(|c| (c["name"].clone(), c["address"].clone()))
            .collect::<Vec<_>>()
    };
    assert_eq!(addresses(&after), addresses(&before), "{context}");
    assert_eq!(after["vpn"]["dropped"]["spoofed_source"], 0, "{context}");
    // Bob never reconnected: one connection in his log, the same session on the server.
    assert_eq!(bob.log().matches(CONNECTED).count(), 1, "{context}");
    assert_eq!(
        client(&after, "bob")["connected_since_unix"],
        bob_since,
        "{context}"
    );
}

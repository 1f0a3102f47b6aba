//! `dockwall mirror` in the namespace chain: a collector namespace running tcpdump sees
//! exactly the copies of the matching packets, nothing else, and nothing after `mirror delete`.

use std::io::{BufRead, BufReader};
use std::net::UdpSocket;
use std::process::{Child, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use docknfv_tests::chain::{
    link, veth_pair, LEFT_HOST, LEFT_HOST_NET, RIGHT_GATEWAY, RIGHT_HOST, RIGHT_NET, SI_LEFT,
    SI_RIGHT,
};
use docknfv_tests::dockwall::Dockwall;
use docknfv_tests::netns::Netns;
use docknfv_tests::prereq::require_command;
use docknfv_tests::traffic::ping;
use docknfv_tests::Chain;
use vnf_core::firewall::mirror::MIRROR_TABLE;

/// The collector on the SI's management leg (eth2).
const COLLECTOR: &str = "10.0.3.9";
const SI_MGMT: &str = "10.0.3.2";
/// The broadcast address of the left subnet (`LEFT_NET`) between the left gateway and the SI.
const LEFT_BROADCAST: &str = "10.0.1.255";
/// The datagrams the mirrors match go to this port on the right host, the sentinel's to the
/// next one.
const MIRRORED_PORT: u16 = 5000;
const SENTINEL_PORT: u16 = 5999;
const DATAGRAMS: usize = 20;
const CAPTURE_TIMEOUT: Duration = Duration::from_secs(10);

/// tcpdump on the collector's interface, one line per unicast IPv4 packet: ARP (which the SI
/// needs to reach the collector), IPv6 and multicast link chatter (IGMP reports of a bridge
/// coming up) are nothing a mirror copies.
struct Capture {
    tcpdump: Child,
    lines: Arc<Mutex<Vec<String>>>,
}

impl Capture {
    fn start(collector: &Netns, interface: &str) -> Capture {
        require_command("tcpdump", "tcpdump");
        let mut tcpdump = collector
            .command("tcpdump")
            .args(["-l", "-n", "-i", interface, "ip and not ip multicast"])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start tcpdump");
        let stdout = tcpdump.stdout.take().expect("tcpdump stdout");
        let lines = Arc::new(Mutex::new(Vec::new()));
        let sink = Arc::clone(&lines);
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                sink.lock().expect("capture lines").push(line);
            }
        });
        // It captures once it says so on stderr.
        let mut stderr = BufReader::new(tcpdump.stderr.take().expect("tcpdump stderr"));
        let mut said = String::new();
        while !said.contains("listening on") {
            let mut line = String::new();
            if stderr.read_line(&mut line).expect("read tcpdump stderr") == 0 {
                panic!("tcpdump exited before capturing: {said}");
            }
            said += &line;
        }
        Capture { tcpdump, lines }
    }

    fn lines(&self) -> Vec<String> {
        self.lines.lock().expect("capture lines").clone()
    }

    /// Waits (bounded) until a captured packet contains `needle`.
    fn wait_for(&self, needle: &str) {
        self.wait_for_count(needle, 1);
    }

    /// Waits (bounded) until `count` captured packets contain `needle`.
    fn wait_for_count(&self, needle: &str, count: usize) {
        let deadline = Instant::now() + CAPTURE_TIMEOUT;
        while self.lines().iter().filter(|l| l.contains(needle)).count() < count {
            assert!(
                Instant::now() < deadline,
                "the collector saw fewer than {count} packets with {needle:?} in \
                 {CAPTURE_TIMEOUT:?}; it saw:\n{}",
                self.lines().join("\n")
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Capture {
    fn drop(&mut self) {
        let _ = self.tcpdump.kill();
        let _ = self.tcpdump.wait();
    }
}

/// `count` UDP datagrams from `from` to `address:port`, nobody listening (the ICMP port
/// unreachable answers come back the other way).
fn send_datagrams(from: &Netns, address: &str, port: u16, count: usize) {
    from.run(|| {
        let socket = UdpSocket::bind("0.0.0.0:0").expect("UDP socket");
        // Some rounds go to a subnet's broadcast address.
        socket.set_broadcast(true).expect("SO_BROADCAST");
        for _ in 0..count {
            // An unreachable answer makes the next send on a connected socket fail: not connected.
            socket
                .send_to(b"mirror", (address, port))
                .expect("send a datagram");
        }
    });
}

/// The captured copies of datagrams to `port` (tcpdump writes `IP SRC.SPORT > DST.PORT: UDP`).
fn copies_to(lines: &[String], address: &str, port: u16) -> usize {
    let needle = format!("> {address}.{port}: UDP");
    lines.iter().filter(|l| l.contains(&needle)).count()
}

/// A collector namespace. It does not route, as a collector must not: with forwarding on it
/// would send the copies on towards their destinations, through the SI again.
fn collector() -> Netns {
    let collector = Netns::new("col");
    collector.set_sysctl("net.ipv4.ip_forward", 0);
    collector
}

/// The chain plus a collector namespace on the SI's third interface (the management leg).
fn chain_with_collector_on_mgmt() -> (Chain, Netns) {
    let chain = Chain::new();
    let collector = collector();
    link(
        &chain.si,
        "eth2",
        &format!("{SI_MGMT}/24"),
        &collector,
        "c0",
        &format!("{COLLECTOR}/24"),
    );
    (chain, collector)
}

fn mirror_id(added: &str) -> String {
    // "mirror 3 added: …"
    added
        .split_whitespace()
        .nth(1)
        .unwrap_or_else(|| panic!("no id in {added:?}"))
        .to_string()
}

#[test]
fn the_collector_sees_exactly_the_mirrored_packets_until_the_mirror_is_deleted() {
    let (chain, collector) = chain_with_collector_on_mgmt();
    let mut dockwall = Dockwall::start(&chain);
    let mirrored = format!("proto udp dport {MIRRORED_PORT}");
    let add_mirrored = [
        "mirror", "add", "--side", "left", "--match", &mirrored, "--to", COLLECTOR,
    ];
    let added = dockwall.ok(&add_mirrored);
    let mirror = mirror_id(&added);
    assert!(
        added.contains("(applied: incremental)"),
        "a mirror joins the rules' table set in place: {added}"
    );
    // The sentinel marks the end of each round: once its copy arrives, every copy sent
    // before it has arrived too (one path, in order).
    dockwall.ok(&[
        "mirror",
        "add",
        "--side",
        "left",
        "--match",
        &format!("proto udp dport {SENTINEL_PORT}"),
        "--to",
        COLLECTOR,
        "--via",
        "mgmt",
    ]);
    assert!(
        !dockwall.nft_table("ip", MIRROR_TABLE).is_empty(),
        "the mirror table is there while run runs"
    );
    dockwall.stop();
    assert_eq!(
        dockwall.nft_table("ip", MIRROR_TABLE),
        "",
        "run removes the mirror table when it stops"
    );
    dockwall.run();

    let capture = Capture::start(&collector, "c0");
    // Not mirrored: another port, another protocol, the other direction, and datagrams to the
    // mirrored port that are not forwarded: to the SI itself and to the left subnet's
    // broadcast address.
    send_datagrams(&chain.left_host, RIGHT_HOST, MIRRORED_PORT + 1, DATAGRAMS);
    assert!(ping(&chain.left_host, RIGHT_HOST), "left reaches right");
    send_datagrams(&chain.right_host, LEFT_HOST, MIRRORED_PORT, DATAGRAMS);
    send_datagrams(&chain.left_host, SI_LEFT, MIRRORED_PORT, DATAGRAMS);
    send_datagrams(
        &chain.left_gateway,
        LEFT_BROADCAST,
        MIRRORED_PORT,
        DATAGRAMS,
    );
    // Mirrored: left→right UDP to the port.
    send_datagrams(&chain.left_host, RIGHT_HOST, MIRRORED_PORT, DATAGRAMS);
    send_datagrams(&chain.left_host, RIGHT_HOST, SENTINEL_PORT, 1);
    capture.wait_for(&format!("> {RIGHT_HOST}.{SENTINEL_PORT}: UDP"));
    let lines = capture.lines();
    assert_eq!(
        copies_to(&lines, RIGHT_HOST, MIRRORED_PORT),
        DATAGRAMS,
        "one copy per datagram sent, after a restart of run:\n{}",
        lines.join("\n")
    );
    assert_eq!(
        lines.len(),
        DATAGRAMS + 1,
        "nothing but the mirrored datagrams and the sentinel:\n{}",
        lines.join("\n")
    );
    assert!(
        lines
            .iter()
            .all(|l| l.contains(&format!("IP {LEFT_HOST}."))),
        "copies are unchanged, from the left host:\n{}",
        lines.join("\n")
    );

    let listing: serde_json::Value =
        serde_json::from_str(&dockwall.ok(&["mirror", "list", "--json"])).expect("list JSON");
    let listed = &listing[0];
    assert_eq!(listed["id"].to_string(), mirror, "{listing}");
    assert_eq!(
        listed["via"], "mgmt",
        "--via defaults to the collector's leg"
    );
    assert_eq!(listed["packets"], DATAGRAMS, "the counter counts copies");
    assert_eq!(listed["state"], "copying", "{listing}");

    dockwall.ok(&["mirror", "delete", &mirror]);
    send_datagrams(&chain.left_host, RIGHT_HOST, MIRRORED_PORT, DATAGRAMS);
    send_datagrams(&chain.left_host, RIGHT_HOST, SENTINEL_PORT, 1);
    // The sentinel's second copy.
    capture.wait_for_count(&format!("> {RIGHT_HOST}.{SENTINEL_PORT}: UDP"), 2);
    assert_eq!(
        copies_to(&capture.lines(), RIGHT_HOST, MIRRORED_PORT),
        DATAGRAMS,
        "no copies after `mirror delete`"
    );

    // A mirror table deleted by hand does not block the next edit: it replaces the tables.
    let deleted = chain
        .si
        .exec("nft", &["delete", "table", "ip", MIRROR_TABLE]);
    assert!(deleted.status.success(), "{deleted:?}");
    let added = dockwall.ok(&add_mirrored);
    let table = dockwall.nft_table("ip", MIRROR_TABLE);
    assert!(
        table.contains(&format!("mirror {}", mirror_id(&added))),
        "the mirror table is back with the new mirror ({added}):\n{table}"
    );
}

#[test]
fn a_collector_on_a_side_never_gets_its_own_traffic_and_off_link_collectors_are_refused() {
    let chain = Chain::new();
    // The right network becomes a bridge in the right gateway with the collector on it.
    let gateway = &chain.right_gateway;
    gateway.ip(&["link", "add", "br0", "type", "bridge"]);
    gateway.ip(&["addr", "del", &format!("{RIGHT_GATEWAY}/24"), "dev", "wan"]);
    gateway.ip(&["link", "set", "wan", "master", "br0"]);
    gateway.ip(&["addr", "add", &format!("{RIGHT_GATEWAY}/24"), "dev", "br0"]);
    gateway.ip(&["link", "set", "br0", "up"]);
    gateway.ip(&["route", "add", LEFT_HOST_NET, "via", SI_RIGHT]);
    let collector = collector();
    let collector_address = "10.0.2.9";
    veth_pair(gateway, "col", &collector, "c0");
    gateway.ip(&["link", "set", "col", "master", "br0"]);
    gateway.ip(&["link", "set", "col", "up"]);
    collector.ip(&[
        "addr",
        "add",
        &format!("{collector_address}/24"),
        "dev",
        "c0",
    ]);
    collector.ip(&["link", "set", "c0", "up"]);
    collector.ip(&["route", "add", "default", "via", SI_RIGHT]);
    chain
        .left_gateway
        .ip(&["route", "add", RIGHT_NET, "via", SI_LEFT]);

    let dockwall = Dockwall::start(&chain);
    let refused = dockwall.cli(&["mirror", "add", "--side", "left", "--to", "192.168.20.50"]);
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(
        !refused.status.success() && stderr.contains("on-link"),
        "a collector behind a gateway is refused:\n{stderr}"
    );
    let refused = dockwall.cli(&[
        "mirror", "add", "--side", "left", "--to", COLLECTOR, "--via", "right",
    ]);
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(
        !refused.status.success() && stderr.contains("not on the right subnet 10.0.2.0/24"),
        "--via a side whose subnet lacks the collector is refused:\n{stderr}"
    );

    // No management leg here: stored, and copying nothing until one comes up.
    dockwall.ok(&[
        "mirror", "add", "--side", "left", "--to", COLLECTOR, "--via", "mgmt",
    ]);
    let listing: serde_json::Value =
        serde_json::from_str(&dockwall.ok(&["mirror", "list", "--json"])).expect("list JSON");
    assert_eq!(
        listing[0]["state"], "waiting for the mgmt side",
        "{listing}"
    );
    dockwall.ok(&["mirror", "add", "--side", "both", "--to", collector_address]);
    let capture = Capture::start(&collector, "c0");
    // The collector's own conversation crosses the SI both ways: none of it is copied.
    for _ in 0..5 {
        assert!(
            ping(&collector, LEFT_HOST),
            "the collector reaches the left host"
        );
    }
    // A copied ping, both ways, ends the round.
    assert!(ping(&chain.left_host, RIGHT_HOST));
    capture.wait_for(&format!("IP {RIGHT_HOST} > {LEFT_HOST}: ICMP echo reply"));
    let lines = capture.lines();
    let copies: Vec<&String> = lines
        .iter()
        .filter(|l| !l.contains(collector_address))
        .collect();
    assert_eq!(
        copies.len(),
        2,
        "the left host's request and the reply, once each:\n{}",
        lines.join("\n")
    );
    let own: Vec<&String> = lines
        .iter()
        .filter(|l| l.contains(collector_address))
        .collect();
    assert_eq!(
        own.len(),
        10,
        "the collector's 5 requests and 5 replies, each seen once, never a copy:\n{}",
        lines.join("\n")
    );
}

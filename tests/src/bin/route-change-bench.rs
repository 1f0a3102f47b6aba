//! How long a DHCP route change takes to reach 50 connected OpenVPN clients, for
//! BENCHMARKS.md (run with `cargo xtask bench`, about 2 minutes): a real dnsmasq on the left
//! gateway sends option 121, `dockvpn run --dhcp left` pushes those routes, 50 stock openvpn
//! clients in the right host's namespace (one profile each, their own tun device and route
//! metric so their routes coexist) connect; then dnsmasq is given one more network. From the
//! moment Dockvpn logs that it learned the change (at the lease renewal) to the moment each
//! client's new route is in the kernel (polled every 50 ms): the last client, and the spread
//! of the reconnects Dockvpn staggers over 5 s.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use docknfv_tests::chain::LEFT_HOST_NET;
use docknfv_tests::measure::median;
use docknfv_tests::openvpn::{
    issue_profile, learned_routes_chain_with, left_dhcp_options, OpenvpnClient, LEARNED_NETWORK,
};
use docknfv_tests::Netns;

const CLIENTS: usize = 50;
/// The lease is two minutes (dnsmasq's least): the renewal that brings the new option comes
/// after about 60 s.
const RENEWAL_WAIT: Duration = Duration::from_secs(100);
/// Past the 5 s spread, room for 50 TLS handshakes on a busy machine.
const PROPAGATION_WAIT: Duration = Duration::from_secs(60);
const POLL: Duration = Duration::from_millis(50);

fn tun(client: usize) -> String {
    format!("tun{client}")
}

/// Client `c`'s route metric: openvpn adds pushed routes "via 10.8.0.1" without a device,
/// so the kernel puts every client's routes on the first tun holding 10.8.0.0/24; the
/// metric is what tells them apart (and lets 50 routes to one network coexist).
fn metric(client: usize) -> u64 {
    100 + client as u64
}

/// The clients that route `network` (one `ip` call for all of them).
fn clients_routing(ns: &Netns, network: &str) -> Vec<usize> {
    let output = ns.exec("ip", &["-j", "-4", "route", "show", network]);
    assert!(output.status.success(), "ip route show {network} failed");
    let routes: Vec<serde_json::Value> =
        serde_json::from_slice(&output.stdout).expect("ip -j output");
    (0..CLIENTS)
        .filter(|&c| {
            routes
                .iter()
                .any(|r| r["metric"].as_u64() == Some(metric(c)))
        })
        .collect()
}

fn main() {
    // SAFETY: single-threaded here; the harness reads it when it builds the binaries.
    unsafe { std::env::set_var("DOCKNFV_PROFILE", "release") };
    let (chain, dnsmasq, dockvpn) = learned_routes_chain_with(&format!("{LEFT_HOST_NET},10.0.1.1"));

    let clients: Vec<OpenvpnClient> = (0..CLIENTS)
        .map(|c| {
            let profile = issue_profile(&chain.si, &dockvpn, &format!("bench{c:02}"), None);
            let metric = metric(c).to_string();
            OpenvpnClient::start(
                &chain.right_host,
                &profile,
                &["--dev", &tun(c), "--route-metric", &metric],
            )
        })
        .collect();
    for client in &clients {
        client.assert_connected(&dockvpn);
    }
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let routing = clients_routing(&chain.right_host, LEFT_HOST_NET);
        let Some(missing) = (0..CLIENTS).find(|c| !routing.contains(c)) else {
            break;
        };
        assert!(
            Instant::now() < deadline,
            "not every client routes {LEFT_HOST_NET} through its tun within 20 s: only {routing:?}; client {missing}:\n{}",
            clients[missing].log()
        );
        std::thread::sleep(POLL);
    }
    assert!(clients_routing(&chain.right_host, LEARNED_NETWORK).is_empty());

    let changed = left_dhcp_options(&format!(
        "{LEFT_HOST_NET},10.0.1.1,{LEARNED_NETWORK},10.0.1.1"
    ));
    dnsmasq.reload(&changed.iter().map(String::as_str).collect::<Vec<_>>());
    dockvpn
        .wait_for_log("routes changed", RENEWAL_WAIT)
        .unwrap_or_else(|e| panic!("{e}"));
    let learned = Instant::now();

    let mut arrived: BTreeMap<usize, f64> = BTreeMap::new();
    while arrived.len() < CLIENTS {
        assert!(
            learned.elapsed() < PROPAGATION_WAIT,
            "only {} of {CLIENTS} clients had {LEARNED_NETWORK} {PROPAGATION_WAIT:?} after Dockvpn learned it; missing: {:?}\nserver:\n{}",
            arrived.len(),
            (0..CLIENTS).filter(|c| !arrived.contains_key(c)).collect::<Vec<_>>(),
            dockvpn.log()
        );
        let now = learned.elapsed().as_secs_f64();
        // A client whose reconnect takes down the tun the others' routes sit on removes
        // them with it; its log keeps the route add however short the route lived.
        let added = format!("net_route_v4_add: {LEARNED_NETWORK}");
        let logged = (0..CLIENTS).filter(|&c| clients[c].log().contains(&added));
        for client in clients_routing(&chain.right_host, LEARNED_NETWORK)
            .into_iter()
            .chain(logged)
        {
            arrived.entry(client).or_insert(now);
        }
        std::thread::sleep(POLL);
    }
    let told = clients
        .iter()
        .filter(|c| {
            c.log()
                .contains("Connection reset command was pushed by server")
        })
        .count();
    assert_eq!(
        told, CLIENTS,
        "every client reconnects on the server's RESTART"
    );

    let mut times: Vec<f64> = arrived.into_values().collect();
    let first = times.iter().copied().fold(f64::INFINITY, f64::min);
    let last = times.iter().copied().fold(0.0, f64::max);
    let median_s = median(&mut times);
    println!("| measure | value |");
    println!("|---|---|");
    println!("| Dockvpn learns the change (\"routes changed\") → the last of {CLIENTS} clients has the new route | **{last:.2} s** |");
    println!("| same, first client / median client | {first:.2} s / {median_s:.2} s |");
    println!(
        "| spread of the reconnects (first → last client with the route) | {:.2} s |",
        last - first
    );
    println!("\nper-client arrival (s after Dockvpn learned the change), sorted: {times:.2?}");
}

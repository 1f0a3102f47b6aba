//! tls-crypt-v2 and tls-crypt with the stock OpenVPN 2.6 client: a v2 profile (its own key,
//! wrapped by the server's) connects; a key from another server gets not one byte back; a
//! v1 profile connects; a flood of forged tls-crypt-v2 resets does not slow a real client.

use std::net::{SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use docknfv_tests::chain::{LEFT_HOST, LEFT_HOST_NET};
use docknfv_tests::dockwall::StateDir;
use docknfv_tests::openvpn::{
    dockvpn_cli, dockvpn_output, issue_profile, openvpn_genkey, start_on_state, status_json, text,
    vpn_chain, wait_for_status, OpenvpnClient,
};
use docknfv_tests::prereq::require_command;
use docknfv_tests::{Chain, Netns, Vnf};

const SERVER: &str = "10.0.2.2:1194";
/// The nft table that counts what the server sends into a client's namespace.
const PROBE_TABLE: &str = "dockvpn_probe";

fn pings(from: &Netns, count: &str) -> bool {
    from.exec("ping", &["-c", count, "-i", "0.3", "-W", "2", LEFT_HOST])
        .status
        .success()
}

/// The `<tag>` block of a profile.
fn inline_block<'a>(profile: &'a str, tag: &str) -> &'a str {
    profile
        .split_once(&format!("<{tag}>\n"))
        .and_then(|(_, rest)| rest.split_once(&format!("</{tag}>")))
        .map(|(block, _)| block)
        .unwrap_or_else(|| panic!("no <{tag}> in {profile}"))
}

fn counter(si: &Netns, dockvpn: &Vnf, name: &str) -> u64 {
    status_json(si, dockvpn)["vpn"]["dropped"][name]
        .as_u64()
        .unwrap_or(0)
}

/// Counts the UDP packets from the server's port that reach `ns` (an nft counter there).
fn start_counting_server_packets(ns: &Netns) {
    require_command("nft", "nftables");
    for command in [
        format!("add table inet {PROBE_TABLE}"),
        format!("add chain inet {PROBE_TABLE} input {{ type filter hook input priority 0 ; }}"),
        format!("add rule inet {PROBE_TABLE} input udp sport 1194 counter"),
    ] {
        let output = ns.exec("nft", &[&command]);
        assert!(output.status.success(), "nft {command}: {}", text(&output));
    }
}

fn server_packets_seen(ns: &Netns) -> u64 {
    let output = ns.exec("nft", &["list", "table", "inet", PROBE_TABLE]);
    let listing = String::from_utf8_lossy(&output.stdout);
    listing
        .split_once("counter packets ")
        .and_then(|(_, rest)| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no counter in {listing}"))
}

#[test]
fn a_tls_crypt_v2_profile_connects_and_another_servers_key_gets_not_one_byte_back() {
    let (chain, dockvpn) = vpn_chain(&[]);
    let profile = issue_profile(&chain.si, &dockvpn, "vera", None);
    assert!(profile.contains("<tls-crypt-v2>"), "{profile}");
    assert!(!profile.contains("<tls-crypt>"), "{profile}");

    // Eve: our CA and her own certificate, but a tls-crypt-v2 key from another server
    // (wrapped by a server key ours never saw).
    let other = StateDir::new();
    let other_cli = |args: &[&str]| dockvpn_cli(&chain.si, other.path(), args);
    other_cli(&["pki", "init"]);
    other_cli(&["client", "add", "vera"]);
    let foreign = other_cli(&["client", "config", "vera", "--remote", SERVER]);
    let eve_profile = profile.replace(
        inline_block(&profile, "tls-crypt-v2"),
        inline_block(&foreign, "tls-crypt-v2"),
    );
    start_counting_server_packets(&chain.right_host);
    let dropped_before = counter(&chain.si, &dockvpn, "unauthenticated_control");
    let eve = OpenvpnClient::start(&chain.right_host, &eve_profile, &[]);
    let _ = wait_for_status(&chain.si, &dockvpn, "eve's resets counted", |status| {
        status["vpn"]["dropped"]["unauthenticated_control"]
            .as_u64()
            .is_some_and(|n| n >= dropped_before + 2)
    });
    assert_eq!(
        server_packets_seen(&chain.right_host),
        0,
        "the server answered eve:\n{}",
        eve.log()
    );
    assert!(!eve.log().contains("Initial packet from"), "{}", eve.log());
    drop(eve);

    let vera = OpenvpnClient::start(&chain.right_host, &profile, &[]);
    vera.assert_connected(&dockvpn);
    assert!(pings(&chain.right_host, "3"), "{}", dockvpn.log());
    assert!(server_packets_seen(&chain.right_host) > 0);
    let status = status_json(&chain.si, &dockvpn);
    assert_eq!(status["vpn"]["tls_crypt"], "v2", "{status}");
    assert_eq!(status["vpn"]["clients"][0]["name"], "vera", "{status}");
    drop(vera);

    // A client key the stock tool wraps with our server key works too: both sides read
    // and write OpenVPN's formats.
    let server_key = dockvpn.state_dir().join("pki/tls-crypt-v2-server.key");
    let stock_key = openvpn_genkey(
        &["--tls-crypt-v2", server_key.to_str().expect("utf-8 path")],
        "tls-crypt-v2-client",
    );
    let stock_profile = profile.replace(inline_block(&profile, "tls-crypt-v2"), &stock_key);
    let stock = OpenvpnClient::start(&chain.right_host, &stock_profile, &[]);
    stock.assert_connected(&dockvpn);
    assert!(pings(&chain.right_host, "2"), "{}", dockvpn.log());
}

#[test]
fn a_tls_crypt_v1_profile_connects() {
    let (chain, dockvpn) = vpn_chain(&["--tls-crypt", "v1"]);
    let profile = issue_profile(&chain.si, &dockvpn, "vic", None);
    assert!(profile.contains("<tls-crypt>"), "{profile}");
    assert!(!profile.contains("<tls-crypt-v2>"), "{profile}");
    let vic = OpenvpnClient::start(&chain.right_host, &profile, &[]);
    vic.assert_connected(&dockvpn);
    assert!(pings(&chain.right_host, "3"), "{}", dockvpn.log());
}

#[test]
fn a_sites_tls_auth_key_imported_serves_tls_auth_profiles_with_either_digest() {
    let chain = Chain::new();
    chain.right_gateway.ip(&["route", "del", LEFT_HOST_NET]);
    let state = StateDir::new();
    let state = state.path();
    let key_path = state.with_extension("ta.key");
    // A static key from the stock tool, as a site already has.
    std::fs::write(&key_path, openvpn_genkey(&[], "secret")).expect("write the key");
    dockvpn_cli(&chain.si, state, &["pki", "init"]);
    let imported = dockvpn_output(
        &chain.si,
        state,
        &[
            "pki",
            "import-tls-auth",
            key_path.to_str().expect("utf-8 path"),
        ],
    );
    let _ = std::fs::remove_file(&key_path);
    assert!(imported.status.success(), "{}", text(&imported));
    dockvpn_cli(&chain.si, state, &["client", "add", "tad"]);
    let dockvpn = start_on_state(&chain, state, &["--tls-crypt", "tls-auth"]);
    let profile = dockvpn_cli(
        &chain.si,
        state,
        &["client", "config", "tad", "--remote", SERVER],
    );
    assert!(profile.contains("<tls-auth>"), "{profile}");
    assert!(profile.contains("key-direction 1"), "{profile}");
    assert!(!profile.contains("<tls-crypt"), "{profile}");
    // The default digest (SHA1), and SHA256 as many sites' profiles say.
    for extra in ["", "auth SHA256\n"] {
        let tad = OpenvpnClient::start(&chain.right_host, &format!("{profile}{extra}"), &[]);
        tad.wait_connected()
            .unwrap_or_else(|e| panic!("{extra}{e}\nserver:\n{}", dockvpn.log()));
        assert!(pings(&chain.right_host, "2"), "{extra}{}", dockvpn.log());
    }
    let status = dockvpn_output(&chain.si, state, &["status", "--json"]);
    let status: serde_json::Value = serde_json::from_slice(&status.stdout).expect("status json");
    assert_eq!(status["vpn"]["tls_crypt"], "tls-auth", "{status}");
}

/// Sends forged P_CONTROL_HARD_RESET_CLIENT_V3 packets (random session, tag and WKc, a
/// plausible WKc length) at `per_second` for `duration`, from a socket in `ns`; counts
/// them in `sent`.
fn flood_forged_v3_resets(
    ns: &Netns,
    server: SocketAddr,
    per_second: u32,
    duration: Duration,
    sent: Arc<AtomicU64>,
) -> std::thread::JoinHandle<()> {
    let socket = ns.run(|| UdpSocket::bind("0.0.0.0:0").expect("bind the flood socket"));
    std::thread::spawn(move || {
        let mut seed = 0x9e37_79b9u32;
        let mut random_byte = move || {
            seed ^= seed << 13;
            seed ^= seed >> 17;
            seed ^= seed << 5;
            seed as u8
        };
        let batch = per_second / 100;
        let started = Instant::now();
        for tick in 0..(duration.as_millis() / 10) as u32 {
            for _ in 0..batch {
                let mut packet: Vec<u8> = (0..350).map(|_| random_byte()).collect();
                packet[0] = 10 << 3;
                let len = packet.len();
                // A WKc of 299 bytes, as a real one with a timestamp.
                packet[len - 2..].copy_from_slice(&299u16.to_be_bytes());
                if socket.send_to(&packet, server).is_ok() {
                    sent.fetch_add(1, Ordering::Relaxed);
                }
            }
            // Pacing, not synchronisation: the next batch is due 10 ms after the last.
            let due = started + Duration::from_millis(10 * u64::from(tick + 1));
            std::thread::sleep(due.saturating_duration_since(Instant::now()));
        }
    })
}

#[test]
fn a_tls_crypt_v2_client_connects_through_a_flood_of_forged_resets() {
    let (chain, dockvpn) = vpn_chain(&[]);
    let profile = issue_profile(&chain.si, &dockvpn, "flo", None);
    let server: SocketAddr = SERVER.parse().expect("address");
    let sent = Arc::new(AtomicU64::new(0));
    let flood = flood_forged_v3_resets(
        &chain.right_host,
        server,
        2_000,
        Duration::from_secs(10),
        sent.clone(),
    );
    // The real client starts once the flood is a second in.
    let deadline = Instant::now() + Duration::from_secs(5);
    while sent.load(Ordering::Relaxed) < 2_000 {
        assert!(Instant::now() < deadline, "the flood does not get going");
        std::thread::sleep(Duration::from_millis(50));
    }
    let started = Instant::now();
    let flo = OpenvpnClient::start(&chain.right_host, &profile, &[]);
    flo.assert_connected(&dockvpn);
    let took = started.elapsed();
    assert!(pings(&chain.right_host, "2"), "{}", dockvpn.log());
    flood.join().expect("flood thread");
    let sent = sent.load(Ordering::Relaxed);
    assert!(
        took < Duration::from_secs(2),
        "connecting took {took:?} during the flood"
    );
    assert_eq!(sent, 20_000);
    let status = status_json(&chain.si, &dockvpn);
    let clients: Vec<&str> = status["vpn"]["clients"]
        .as_array()
        .expect("clients")
        .iter()
        .filter_map(|c| c["name"].as_str())
        .collect();
    assert_eq!(clients, ["flo"], "{status}");
    // No forged reset took a handshake slot, so none was ever refused one.
    assert_eq!(
        status["vpn"]["dropped"]["refused_handshakes"], 0,
        "{status}"
    );
    let _ = wait_for_status(&chain.si, &dockvpn, "forged resets counted", |status| {
        status["vpn"]["dropped"]["unauthenticated_control"]
            .as_u64()
            .is_some_and(|n| n >= sent / 2)
    });
}

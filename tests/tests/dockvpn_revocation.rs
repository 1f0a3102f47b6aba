//! Revocation against the stock OpenVPN 2.6 client: `client revoke` cuts a connected client
//! off before it returns and its certificate never connects again; a certificate saved
//! before `client remove` is refused after a client of the same name is added, while the new
//! one connects; a revoked WireGuard peer (`wireguard-go`) is cut off the same way; bad
//! input changes nothing.

use std::time::{Duration, Instant};

use docknfv_tests::chain::{LEFT_HOST, LEFT_HOST_NET};
use docknfv_tests::openvpn::{
    issue_profile, text, vpn_chain, wait_for_status, OpenvpnClient, CONNECTED,
};
use docknfv_tests::prereq::require_command;
use docknfv_tests::traffic::{ping, ping_eventually};

/// Echo requests a positive check through the tunnel may use (a debug server on a shared
/// machine may lose one).
const TUNNEL_PING_ATTEMPTS: u32 = 5;
/// How long a stock client takes at most to show the server's AUTH_FAILED.
const AUTH_FAILED_WITHIN: Duration = Duration::from_secs(30);

/// A stock client with `profile` that must be refused: its log once AUTH_FAILED shows.
fn refused(
    chain_host: &docknfv_tests::Netns,
    profile: &str,
    server: &docknfv_tests::Vnf,
) -> String {
    let client = OpenvpnClient::start(chain_host, profile, &[]);
    client
        .process
        .wait_for_log("AUTH_FAILED", AUTH_FAILED_WITHIN)
        .unwrap_or_else(|e| panic!("{e}\nclient:\n{}\nserver:\n{}", client.log(), server.log()));
    let log = client.log();
    assert!(!log.contains(CONNECTED), "{log}");
    log
}

#[test]
fn a_revoked_client_is_cut_off_within_two_seconds_and_cannot_connect_again() {
    let (chain, dockvpn) = vpn_chain(&[]);
    let run = |args: &[&str]| dockvpn.cli(&chain.si, "dockvpn", args);

    // Bad input: a clear error, nothing changed.
    let registry = dockvpn.state_dir().join("pki/clients.json");
    assert!(run(&["client", "add", "bob"]).status.success());
    let before = std::fs::read_to_string(&registry).unwrap();
    let output = run(&["client", "revoke", "nobody"]);
    assert!(!output.status.success());
    assert!(
        text(&output).contains("\"nobody\"") && text(&output).contains("client list"),
        "{}",
        text(&output)
    );
    assert_eq!(std::fs::read_to_string(&registry).unwrap(), before);
    // The server holds the CA in memory: a new one while it runs would not reach it.
    let ca = std::fs::read_to_string(dockvpn.state_dir().join("pki/ca.crt")).unwrap();
    let output = run(&["pki", "init", "--force"]);
    assert!(!output.status.success());
    assert!(text(&output).contains("stop it first"), "{}", text(&output));
    assert_eq!(
        std::fs::read_to_string(dockvpn.state_dir().join("pki/ca.crt")).unwrap(),
        ca
    );

    let profile = issue_profile(&chain.si, &dockvpn, "alice", None);
    let client = OpenvpnClient::start(&chain.right_host, &profile, &[]);
    client.assert_connected(&dockvpn);
    assert!(ping_eventually(
        &chain.right_host,
        LEFT_HOST,
        TUNNEL_PING_ATTEMPTS
    ));

    let started = Instant::now();
    let output = run(&["client", "revoke", "alice"]);
    assert!(output.status.success(), "{}", text(&output));
    let took = started.elapsed();
    assert!(
        text(&output).contains("the running server has cut it off"),
        "{}",
        text(&output)
    );
    assert!(took < Duration::from_secs(2), "revoke took {took:?}");
    assert!(
        !ping(&chain.right_host, LEFT_HOST),
        "the tunnel still passes traffic after revocation"
    );
    client
        .process
        .wait_for_log("AUTH_FAILED", AUTH_FAILED_WITHIN)
        .unwrap_or_else(|e| panic!("{e}\nclient:\n{}", client.log()));
    drop(client);

    // The same certificate again: refused in the handshake's end, and counted as revoked.
    refused(&chain.right_host, &profile, &dockvpn);
    dockvpn
        .wait_for_log("is revoked", Duration::from_secs(10))
        .unwrap_or_else(|e| panic!("{e}"));
    wait_for_status(
        &chain.si,
        &dockvpn,
        "a refusal counted as revoked",
        |status| status["vpn"]["refused"]["revoked"].as_u64() >= Some(1),
    );
    let listed = run(&["client", "list"]);
    assert!(
        String::from_utf8_lossy(&listed.stdout).contains("revoked: `dockvpn client renew alice`"),
        "{}",
        text(&listed)
    );
    let crl = run(&["pki", "crl"]);
    assert!(
        String::from_utf8_lossy(&crl.stdout).starts_with("-----BEGIN X509 CRL-----"),
        "{}",
        text(&crl)
    );

    // Renewed: the same address, a new profile connects.
    assert!(run(&["client", "renew", "alice"]).status.success());
    let config = run(&["client", "config", "alice"]);
    let renewed = OpenvpnClient::start(
        &chain.right_host,
        &String::from_utf8(config.stdout).unwrap(),
        &[],
    );
    renewed.assert_connected(&dockvpn);
    let address = chain.right_host.ip(&["-4", "addr", "show", "dev", "tun0"]);
    assert!(address.contains("inet 10.8.0.3/24"), "{address}");
}

#[test]
fn a_certificate_saved_before_client_remove_is_refused_after_the_name_is_added_again() {
    let (chain, dockvpn) = vpn_chain(&[]);
    let run = |args: &[&str]| dockvpn.cli(&chain.si, "dockvpn", args);
    let lost_laptop = issue_profile(&chain.si, &dockvpn, "alice", None);
    let removed = run(&["client", "remove", "alice"]);
    assert!(removed.status.success(), "{}", text(&removed));
    let new_laptop = issue_profile(&chain.si, &dockvpn, "alice", None);

    let log = refused(&chain.right_host, &lost_laptop, &dockvpn);
    assert!(log.contains("revoked"), "{log}");
    let client = OpenvpnClient::start(&chain.right_host, &new_laptop, &[]);
    client.assert_connected(&dockvpn);
    assert!(ping_eventually(
        &chain.right_host,
        LEFT_HOST,
        TUNNEL_PING_ATTEMPTS
    ));
}

/// A userspace WireGuard client (`wireguard-go`) in `ns` on interface `WG_CLIENT`, set up
/// from a wg-quick profile as wg-quick would: keys and peer, its address, a route to the
/// left host's network.
struct WireguardClient {
    _process: docknfv_tests::Vnf,
}

const WG_CLIENT: &str = "wgrv0";

impl WireguardClient {
    fn start(ns: &docknfv_tests::Netns, profile: &str) -> WireguardClient {
        require_command("wireguard-go", "wireguard-go");
        require_command("wg", "wireguard-tools");
        let path = std::env::temp_dir().join(format!("{WG_CLIENT}-{}.conf", std::process::id()));
        std::fs::write(&path, profile).expect("write the profile");
        let stripped = std::process::Command::new("wg-quick")
            .arg("strip")
            .arg(&path)
            .output()
            .expect("wg-quick strip");
        let _ = std::fs::remove_file(&path);
        assert!(stripped.status.success(), "{}", text(&stripped));
        std::fs::write(&path, &stripped.stdout).expect("write the stripped profile");
        let mut command = ns.command("wireguard-go");
        command
            .args(["-f", WG_CLIENT])
            .env("WG_I_PREFER_BUGGY_USERSPACE_TO_POLISHED_KMOD", "1");
        let process = docknfv_tests::Vnf::spawn(command);
        let deadline = Instant::now() + Duration::from_secs(10);
        while !ns.exec("ip", &["link", "show", WG_CLIENT]).status.success() {
            assert!(
                Instant::now() < deadline,
                "wireguard-go made no {WG_CLIENT}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        let set = ns.exec("wg", &["setconf", WG_CLIENT, path.to_str().unwrap()]);
        let _ = std::fs::remove_file(&path);
        assert!(set.status.success(), "{}", text(&set));
        let address = profile
            .lines()
            .find_map(|line| line.strip_prefix("Address = "))
            .expect("an Address line");
        ns.ip(&["addr", "add", address, "dev", WG_CLIENT]);
        ns.ip(&["link", "set", WG_CLIENT, "up"]);
        ns.ip(&["route", "add", LEFT_HOST_NET, "dev", WG_CLIENT]);
        WireguardClient { _process: process }
    }
}

#[test]
fn a_revoked_wireguard_peer_is_cut_off_within_two_seconds_and_gets_no_handshake_again() {
    let (chain, dockvpn) = vpn_chain(&[]);
    let run = |args: &[&str]| dockvpn.cli(&chain.si, "dockvpn", args);
    assert!(run(&["client", "add", "alice"]).status.success());
    let profile = run(&[
        "client",
        "config",
        "alice",
        "--format",
        "wireguard",
        "--remote",
        "10.0.2.2",
    ]);
    assert!(profile.status.success(), "{}", text(&profile));
    let _client = WireguardClient::start(
        &chain.right_host,
        &String::from_utf8(profile.stdout).unwrap(),
    );
    // The server loads a new peer within 2 s; an initiation sent before that is retried
    // after 5 s (WireGuard's REKEY_TIMEOUT).
    assert!(
        ping_eventually(&chain.right_host, LEFT_HOST, 12),
        "no path through WireGuard\nclient:\n{}\nserver:\n{}",
        text(&chain.right_host.exec("wg", &["show", WG_CLIENT])),
        dockvpn.log()
    );

    let started = Instant::now();
    let output = run(&["client", "revoke", "alice"]);
    assert!(output.status.success(), "{}", text(&output));
    let took = started.elapsed();
    assert!(took < Duration::from_secs(2), "revoke took {took:?}");
    assert!(
        !ping(&chain.right_host, LEFT_HOST),
        "the WireGuard tunnel still passes traffic after revocation"
    );
    // The client starts new handshakes (every 5 s): none is answered.
    let handshakes = || {
        chain
            .right_host
            .exec("wg", &["show", WG_CLIENT, "latest-handshakes"])
    };
    let before = text(&handshakes());
    assert!(!ping_eventually(&chain.right_host, LEFT_HOST, 8));
    assert_eq!(text(&handshakes()), before, "a handshake was answered");
}

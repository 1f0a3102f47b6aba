//! Dockvpn against the stock OpenVPN 2.6 client: the client runs in the right host's
//! namespace with the profile `dockvpn client config` printed, connects over UDP to the SI's
//! right address, and reaches the left host only through the tunnel (the right gateway's
//! route to the left networks is removed).

use std::time::Duration;

use docknfv_tests::chain::{LEFT_HOST, LEFT_HOST_NET, LEFT_NET, SI_LEFT};
use docknfv_tests::measure::iperf_tcp_gbps;
use docknfv_tests::openvpn::{
    issue_profile, learned_routes_chain, openvpn_genkey, status_json, text, vpn_chain,
    HostileRelay, OpenvpnClient, CONNECTED, LEARNED_NETWORK,
};
use docknfv_tests::traffic::{ping, ping_eventually, ping_output, tcp_probe, Probe};
use docknfv_tests::{Chain, Netns, Vnf};

/// Echo requests a positive check through the tunnel may use: the server is a debug build
/// and the machine is shared, so one lost second must not fail the test.
const TUNNEL_PING_ATTEMPTS: u32 = 5;

/// The client's routes through tun0, as "destination gateway" strings.
fn tunnel_routes(ns: &Netns) -> Vec<String> {
    let json = ns.ip(&["-j", "-4", "route", "show", "dev", "tun0"]);
    let routes: Vec<serde_json::Value> = serde_json::from_str(&json).expect("ip -j output");
    let mut routes: Vec<String> = routes
        .iter()
        .map(|r| {
            format!(
                "{} {}",
                r["dst"].as_str().unwrap_or_default(),
                r["gateway"].as_str().unwrap_or("link")
            )
        })
        .collect();
    routes.sort();
    routes
}

/// The source address the left host sees on a TCP connection from the right host.
fn left_host_sees(chain: &Chain) -> String {
    let (probe, peer) = tcp_probe(
        &chain.right_host,
        &chain.left_host,
        LEFT_HOST,
        LEFT_HOST,
        5201,
        5201,
    );
    assert_eq!(probe, Probe::Passed);
    peer.map(|p| p.ip().to_string()).unwrap_or_default()
}

/// The connected clients once `check` holds for them (the status file is rewritten every
/// 2 s), or the last status.
fn clients_when(
    si: &Netns,
    dockvpn: &Vnf,
    check: impl Fn(&[serde_json::Value]) -> bool,
) -> Vec<serde_json::Value> {
    let mut last = serde_json::Value::Null;
    for _ in 0..50 {
        last = status_json(si, dockvpn);
        let clients = last["vpn"]["clients"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        if check(&clients) {
            return clients;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    panic!("status never matched: {last}");
}

/// A stock client on the right host with a fresh profile for `name`, once connected.
fn connected_client(chain: &Chain, dockvpn: &Vnf, name: &str) -> OpenvpnClient {
    let client = OpenvpnClient::start(
        &chain.right_host,
        &issue_profile(&chain.si, dockvpn, name, None),
        &[],
    );
    client.assert_connected(dockvpn);
    client
}

#[test]
fn client_connects_gets_exactly_the_pushed_routes_and_reaches_the_left_host() {
    let (chain, mut dockvpn) = vpn_chain(&[]);
    assert!(
        !ping(&chain.right_host, LEFT_HOST),
        "no path without the tunnel"
    );
    let profile = issue_profile(&chain.si, &dockvpn, "alice", None);
    assert!(profile.contains("remote 10.0.2.2 1194"), "{profile}");
    let client = OpenvpnClient::start(&chain.right_host, &profile, &[]);
    client.assert_connected(&dockvpn);

    let address = chain.right_host.ip(&["-4", "addr", "show", "dev", "tun0"]);
    assert!(address.contains("inet 10.8.0.2/24"), "{address}");
    assert_eq!(
        tunnel_routes(&chain.right_host),
        vec![
            format!("{LEFT_NET} 10.8.0.1"),
            "10.8.0.0/24 link".to_owned(),
            format!("{LEFT_HOST_NET} 10.8.0.1")
        ],
        "the left subnet and the --left-route network"
    );
    assert!(
        ping_eventually(&chain.right_host, LEFT_HOST, TUNNEL_PING_ATTEMPTS),
        "ping through the tunnel\n{}",
        dockvpn.log()
    );
    assert_eq!(
        left_host_sees(&chain),
        SI_LEFT,
        "masqueraded to the SI's left address"
    );
    // The SI's own left address, in the pushed left subnet: its reply goes to the pool, which
    // the source rule for that address must not send out of the left side.
    assert!(
        ping_eventually(&chain.right_host, SI_LEFT, TUNNEL_PING_ATTEMPTS),
        "the SI's left address through the tunnel\n{}",
        dockvpn.log()
    );

    let clients = clients_when(&chain.si, &dockvpn, |clients| {
        clients.len() == 1 && clients[0]["bytes_in"].as_u64() > Some(0)
    });
    assert_eq!(clients[0]["name"], "alice");
    assert_eq!(clients[0]["address"], "10.8.0.2");
    assert_eq!(clients[0]["cipher"], "AES-256-GCM");
    assert!(clients[0]["bytes_out"].as_u64() > Some(0));
    let status = status_json(&chain.si, &dockvpn);
    assert_eq!(
        status["vpn"]["routes_pushed"],
        serde_json::json!([LEFT_NET, LEFT_HOST_NET])
    );
    assert!(dockvpn.terminate().success(), "{}", dockvpn.log());
    drop(client);
}

#[test]
fn push_left_subnet_false_pushes_only_the_left_networks() {
    let (chain, dockvpn) = vpn_chain(&["--push-left-subnet", "false"]);
    let _client = connected_client(&chain, &dockvpn, "gina");
    assert_eq!(
        tunnel_routes(&chain.right_host),
        vec![
            "10.8.0.0/24 link".to_owned(),
            format!("{LEFT_HOST_NET} 10.8.0.1")
        ]
    );
}

#[test]
fn two_clients_at_once_one_per_aes_gcm_cipher_and_tls_version_and_an_iperf3_transfer() {
    let (chain, mut dockvpn) = vpn_chain(&[]);
    let alice = OpenvpnClient::start(
        &chain.right_host,
        &issue_profile(&chain.si, &dockvpn, "alice", None),
        &["--data-ciphers", "AES-256-GCM"],
    );
    // The right gateway is a second remote site; its direct route to the left is gone too.
    let bob = OpenvpnClient::start(
        &chain.right_gateway,
        &issue_profile(&chain.si, &dockvpn, "bob", None),
        &["--data-ciphers", "AES-128-GCM", "--tls-version-max", "1.2"],
    );
    alice.assert_connected(&dockvpn);
    bob.assert_connected(&dockvpn);
    assert!(ping_eventually(
        &chain.right_host,
        LEFT_HOST,
        TUNNEL_PING_ATTEMPTS
    ));
    assert!(ping_eventually(
        &chain.right_gateway,
        LEFT_HOST,
        TUNNEL_PING_ATTEMPTS
    ));
    let gbps = iperf_tcp_gbps(&chain.right_host, &chain.left_host, LEFT_HOST, "2");
    assert!(gbps > 0.0, "iperf3 through the tunnel moved nothing");

    let clients = clients_when(&chain.si, &dockvpn, |clients| clients.len() == 2);
    let cipher_of = |name: &str| {
        clients
            .iter()
            .find(|c| c["name"] == name)
            .map(|c| c["cipher"].clone())
    };
    assert_eq!(cipher_of("alice"), Some("AES-256-GCM".into()));
    assert_eq!(cipher_of("bob"), Some("AES-128-GCM".into()));
    assert!(
        bob.log().contains("Data Channel: cipher 'AES-128-GCM'"),
        "{}",
        bob.log()
    );
    // The TLS version each stock client negotiated, as it reports it.
    assert!(
        alice.log().contains("Control Channel: TLSv1.3,"),
        "{}",
        alice.log()
    );
    assert!(
        bob.log().contains("Control Channel: TLSv1.2,"),
        "{}",
        bob.log()
    );
    assert!(dockvpn.terminate().success(), "{}", dockvpn.log());
    // The server told the clients to reconnect as it stopped.
    alice
        .process
        .wait_for_log("server-pushed-connection-reset", Duration::from_secs(5))
        .unwrap_or_else(|e| panic!("{e}\nserver:\n{}", dockvpn.log()));
}

#[test]
fn routes_learned_by_dhcp_option_121_are_pushed() {
    let (chain, _dnsmasq, dockvpn) = learned_routes_chain();
    let _client = connected_client(&chain, &dockvpn, "carol");
    assert_eq!(
        tunnel_routes(&chain.right_host),
        vec![
            format!("{LEFT_NET} 10.8.0.1"),
            "10.8.0.0/24 link".to_owned(),
            format!("{LEARNED_NETWORK} 10.8.0.1"),
            format!("{LEFT_HOST_NET} 10.8.0.1"),
        ],
        "the leased subnet and the learned networks, and no default route (redirect-gateway is off)"
    );
    assert!(
        ping_eventually(&chain.right_host, LEFT_HOST, TUNNEL_PING_ATTEMPTS),
        "{}",
        dockvpn.log()
    );
}

/// The profile with the inline `<tag>` block's content replaced.
fn replace_inline(profile: &str, tag: &str, content: &str) -> String {
    let (head, rest) = profile
        .split_once(&format!("<{tag}>\n"))
        .unwrap_or_else(|| panic!("no <{tag}> in {profile}"));
    let (_, tail) = rest.split_once(&format!("</{tag}>")).unwrap();
    format!("{head}<{tag}>\n{content}</{tag}>{tail}")
}

#[test]
fn a_client_without_the_tls_crypt_key_gets_no_answer_at_all() {
    let (chain, dockvpn) = vpn_chain(&["--tls-crypt", "v1"]);
    let profile = issue_profile(&chain.si, &dockvpn, "eve", None);
    // A valid certificate, but a tls-crypt key of its own (the stock tool makes one).
    let stray_key = openvpn_genkey(&[], "tls-crypt");
    let profile = replace_inline(&profile, "tls-crypt", &stray_key);
    let eve = OpenvpnClient::start(&chain.right_host, &profile, &[]);
    // The client retries its HARD_RESET every couple of seconds; the server answers none.
    let dropped =
        || status_json(&chain.si, &dockvpn)["vpn"]["dropped"]["unauthenticated_control"].as_u64();
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    while dropped() < Some(2) {
        assert!(std::time::Instant::now() < deadline, "{}", dockvpn.log());
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(
        !eve.log().contains("Initial packet from"),
        "the server answered:\n{}",
        eve.log()
    );
    assert!(!eve.log().contains(CONNECTED));
    assert_eq!(
        status_json(&chain.si, &dockvpn)["vpn"]["clients"],
        serde_json::json!([])
    );
}

#[test]
fn a_certificate_from_another_ca_never_gets_past_the_handshake() {
    let (chain, dockvpn) = vpn_chain(&["--tls-crypt", "v1"]);
    let other_ca = std::env::temp_dir().join(format!("dockvpn-other-ca-{}", std::process::id()));
    let run_other = |args: &[&str]| {
        let output = chain
            .si
            .command(docknfv_tests::vnf::binary("dockvpn").to_str().unwrap())
            .args(args)
            .env("DOCKVPN_STATE_DIR", &other_ca)
            .output()
            .expect("dockvpn");
        assert!(output.status.success(), "{}", text(&output));
        String::from_utf8(output.stdout).unwrap()
    };
    run_other(&["pki", "init"]);
    run_other(&["client", "add", "mallory"]);
    let profile = run_other(&[
        "client",
        "config",
        "mallory",
        "--remote",
        "10.0.2.2:1194",
        "--tls-crypt",
        "v1",
    ]);
    let _ = std::fs::remove_dir_all(&other_ca);
    // Mallory trusts our server (our CA in <ca>) and holds our tls-crypt key (say it leaked),
    // but her certificate comes from another CA.
    let ours =
        |file: &str| std::fs::read_to_string(dockvpn.state_dir().join("pki").join(file)).unwrap();
    let profile = replace_inline(&profile, "ca", &ours("ca.crt"));
    let profile = replace_inline(&profile, "tls-crypt", &ours("tls-crypt.key"));
    let mallory = OpenvpnClient::start(&chain.right_host, &profile, &[]);
    let refused = dockvpn
        .wait_for_log("reason=TLS", Duration::from_secs(20))
        .unwrap_or_else(|e| panic!("{e}\nclient:\n{}", mallory.log()));
    assert!(
        refused.contains("client disconnected"),
        "{refused}\n{}",
        mallory.log()
    );
    assert!(!mallory.log().contains(CONNECTED), "{}", mallory.log());
    assert!(!ping(&chain.right_host, LEFT_HOST));
    let status = status_json(&chain.si, &dockvpn);
    assert_eq!(status["vpn"]["clients"], serde_json::json!([]), "{status}");
}

#[test]
fn replayed_tampered_truncated_and_garbage_packets_are_dropped_and_the_client_keeps_working() {
    let (chain, dockvpn) = vpn_chain(&[]);
    let relay = HostileRelay::start(&chain.right_host, "10.0.2.2:1194".parse().unwrap());
    let remote = format!("127.0.0.1:{}", relay.port);
    let client = OpenvpnClient::start(
        &chain.right_host,
        &issue_profile(&chain.si, &dockvpn, "dave", Some(&remote)),
        &[],
    );
    client.assert_connected(&dockvpn);
    // The path answers before the one echo whose loss and duplicates are counted.
    assert!(
        ping_eventually(&chain.right_host, LEFT_HOST, TUNNEL_PING_ATTEMPTS),
        "{}",
        dockvpn.log()
    );
    let output = ping_output(&chain.right_host, LEFT_HOST);
    assert!(
        output.contains(" 0% packet loss"),
        "{output}\n{}",
        dockvpn.log()
    );
    assert!(
        !output.contains("DUP!"),
        "a replay reached the left host:\n{output}"
    );
    let counters = ["replayed_data", "unauthenticated_data", "malformed"];
    let mut status = serde_json::Value::Null;
    for _ in 0..50 {
        status = status_json(&chain.si, &dockvpn);
        if counters
            .iter()
            .all(|c| status["vpn"]["dropped"][c].as_u64() > Some(0))
        {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    for counter in counters {
        assert!(
            status["vpn"]["dropped"][counter].as_u64() > Some(0),
            "{counter}: {status}"
        );
    }
    assert_eq!(status["vpn"]["clients"].as_array().map(Vec::len), Some(1));
    assert!(
        dockvpn.log().contains("dropped VPN input"),
        "drops are logged"
    );
}

#[test]
fn client_commands_refuse_bad_input_with_the_fix() {
    let (chain, dockvpn) = vpn_chain(&[]);
    let run = |args: &[&str]| dockvpn.cli(&chain.si, "dockvpn", args);
    let output = run(&["client", "add", "../etc"]);
    assert!(!output.status.success());
    assert!(text(&output).contains("invalid NAME"), "{}", text(&output));
    let output = run(&["client", "config", "nobody"]);
    assert!(!output.status.success(), "{}", text(&output));
    assert!(
        text(&output).contains("dockvpn client add nobody"),
        "{}",
        text(&output)
    );
    let output = run(&["client", "add", "erin", "--address", "10.9.0.5"]);
    assert!(!output.status.success(), "{}", text(&output));
    assert!(
        text(&output).contains("inside the pool 10.8.0.0/24"),
        "{}",
        text(&output)
    );
    assert!(run(&["client", "add", "erin"]).status.success());
    let output = run(&["client", "add", "erin"]);
    assert!(!output.status.success(), "{}", text(&output));
    assert!(text(&output).contains("exists"), "{}", text(&output));
    let output = run(&["client", "list", "--json"]);
    let list: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(list[0]["name"], "erin");
    assert_eq!(list[0]["address"], "10.8.0.2");
    let key = dockvpn.state_dir().join("pki/clients/erin.key");
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        std::fs::metadata(key).unwrap().permissions().mode() & 0o777,
        0o600
    );
    let output = run(&["pki", "init"]);
    assert!(!output.status.success(), "{}", text(&output));
    assert!(text(&output).contains("--force"), "{}", text(&output));
    let output = run(&["run", "--data-ciphers", "BF-CBC"]);
    assert!(!output.status.success(), "{}", text(&output));
    assert!(
        text(&output).contains("unknown data cipher"),
        "{}",
        text(&output)
    );
}

#[test]
fn without_masquerade_the_left_side_sees_client_addresses_and_routes_the_pool_back() {
    let chain = Chain::new();
    chain.right_gateway.ip(&["route", "del", LEFT_HOST_NET]);
    chain
        .left_gateway
        .ip(&["route", "add", "10.8.0.0/24", "via", "10.0.1.2"]);
    let dockvpn = Vnf::start(
        &chain.si,
        "dockvpn",
        &[
            "run",
            "--left-route",
            LEFT_HOST_NET,
            "--masquerade",
            "false",
        ],
    );
    dockvpn.wait_ready();
    let client = OpenvpnClient::start(
        &chain.right_host,
        &issue_profile(&chain.si, &dockvpn, "frank", None),
        &[],
    );
    client.assert_connected(&dockvpn);
    // The table still filters what clients reach; it only lacks the masquerade rule.
    let table = chain.si.exec("nft", &["list", "table", "ip", "dockvpn"]);
    assert!(table.status.success(), "nft list table: {}", text(&table));
    assert!(
        !String::from_utf8_lossy(&table.stdout).contains("masquerade"),
        "no masquerade: {}",
        text(&table)
    );
    // The left host sees, and answers, the client's own address.
    assert_eq!(left_host_sees(&chain), "10.8.0.2");
}

#[test]
fn a_client_stopped_with_sigterm_leaves_status_within_two_seconds() {
    let (chain, dockvpn) = vpn_chain(&[]);
    let profile = issue_profile(&chain.si, &dockvpn, "alice", None);
    assert!(profile.contains("\nexplicit-exit-notify\n"), "{profile}");
    let mut client = OpenvpnClient::start(&chain.right_host, &profile, &[]);
    client.assert_connected(&dockvpn);
    clients_when(&chain.si, &dockvpn, |clients| clients.len() == 1);

    let stopped = std::time::Instant::now();
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(client.process.pid() as i32),
        nix::sys::signal::Signal::SIGTERM,
    );
    clients_when(&chain.si, &dockvpn, <[serde_json::Value]>::is_empty);
    let gone_after = stopped.elapsed();
    assert!(
        gone_after < Duration::from_secs(2),
        "the client left status after {gone_after:?}\nserver:\n{}",
        dockvpn.log()
    );
    assert!(
        dockvpn.log().contains("the client exited"),
        "{}",
        dockvpn.log()
    );
    assert!(!dockvpn.log().contains("Some("), "{}", dockvpn.log());
    client.process.wait_exit(Duration::from_secs(10));
}

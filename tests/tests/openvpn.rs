//! Dockvpn against the stock OpenVPN 2.6 client: the client runs in the right host's
//! namespace with the profile `dockvpn client config` printed, connects over UDP to the SI's
//! right address, and reaches the left host only through the tunnel (the right gateway's
//! route to the left networks is removed).

use std::time::Duration;

use docknfv_tests::chain::{LEFT_HOST, LEFT_HOST_NET};
use docknfv_tests::openvpn::{issue_profile, text, OpenvpnClient};
use docknfv_tests::traffic::ping;
use docknfv_tests::{Chain, Netns, Vnf};

/// The chain with Dockvpn running (pushing LEFT_HOST_NET) and the right side's direct path
/// to the left removed, so only the tunnel leads there.
fn vpn_chain(extra: &[&str]) -> (Chain, Vnf) {
    let chain = Chain::new();
    chain.right_gateway.ip(&["route", "del", LEFT_HOST_NET]);
    let mut args = vec!["--left-route", LEFT_HOST_NET, "run"];
    args.extend(extra);
    let dockvpn = Vnf::start(&chain.si, "dockvpn", &args);
    dockvpn.wait_ready();
    dockvpn
        .wait_for_log("VPN server listening", Duration::from_secs(10))
        .unwrap_or_else(|e| panic!("{e}"));
    (chain, dockvpn)
}

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

fn status_json(si: &Netns, dockvpn: &Vnf) -> serde_json::Value {
    let output = dockvpn.cli(si, "dockvpn", &["status", "--json"]);
    serde_json::from_slice(&output.stdout).unwrap_or_else(|e| panic!("{e}: {}", text(&output)))
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
        let clients = last["vpn"]["clients"].as_array().cloned().unwrap_or_default();
        if check(&clients) {
            return clients;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    panic!("status never matched: {last}");
}

#[test]
fn client_connects_gets_exactly_the_pushed_routes_and_reaches_the_left_host() {
    let (chain, mut dockvpn) = vpn_chain(&[]);
    assert!(!ping(&chain.right_host, LEFT_HOST), "no path without the tunnel");
    let profile = issue_profile(&chain.si, &dockvpn, "alice", None);
    assert!(profile.contains("remote 10.0.2.2 1194"), "{profile}");
    let client = OpenvpnClient::start(&chain.right_host, &profile, &[]);
    client.wait_connected().unwrap_or_else(|e| panic!("{e}\nserver:\n{}", dockvpn.log()));

    let address = chain.right_host.ip(&["-4", "addr", "show", "dev", "tun0"]);
    assert!(address.contains("inet 10.8.0.2/24"), "{address}");
    assert_eq!(
        tunnel_routes(&chain.right_host),
        vec!["10.8.0.0/24 link".to_owned(), format!("{LEFT_HOST_NET} 10.8.0.1")]
    );
    assert!(ping(&chain.right_host, LEFT_HOST), "ping through the tunnel\n{}", dockvpn.log());

    let clients = clients_when(&chain.si, &dockvpn, |clients| {
        clients.len() == 1 && clients[0]["bytes_in"].as_u64() > Some(0)
    });
    assert_eq!(clients[0]["name"], "alice");
    assert_eq!(clients[0]["address"], "10.8.0.2");
    assert_eq!(clients[0]["cipher"], "AES-256-GCM");
    assert!(clients[0]["bytes_out"].as_u64() > Some(0));
    let status = status_json(&chain.si, &dockvpn);
    assert_eq!(status["vpn"]["routes_pushed"], serde_json::json!([LEFT_HOST_NET]));
    assert!(dockvpn.terminate().success(), "{}", dockvpn.log());
    drop(client);
}

//! The service chain on a real Docker engine: the images `cargo xtask images` built, SIs
//! started with `docker run` on the left network and then `docker network connect`ed to the
//! right one, edited with `docker exec`. Hosts route the other VN via the SI.

use std::time::Duration;

use docknfv_tests::docker::{
    DockerChain, Spec, DNSMASQ_IMAGE, DOCKVPN_IMAGE, DOCKWALL_IMAGE, HOST_IMAGE,
};
use docknfv_tests::openvpn::CONNECTED;

const HEALTHY_WITHIN: Duration = Duration::from_secs(30);

fn dockwall_si(chain: &DockerChain) -> String {
    let mut spec = chain.service_instance("si", DOCKWALL_IMAGE);
    spec.volume = Some("/var/lib/dockwall".into());
    chain.run(spec)
}

#[test]
fn dockwall_chain_routes_filters_keeps_rules_across_restart_and_waits_for_the_right_network() {
    let chain = DockerChain::new();
    let (left_net, right_net) = (chain.left_net.clone(), chain.right_net.clone());
    let left_host = chain.host("left-host", &chain.left, &left_net, &right_net);
    let right_host = chain.host("right-host", &chain.right, &right_net, &left_net);
    let si = dockwall_si(&chain);
    // Only the left network so far: the SI waits for its right side.
    chain
        .wait_for_log(&si, "waiting for sides", Duration::from_secs(15))
        .unwrap_or_else(|e| panic!("{e}"));
    chain.connect(&si, &chain.right, &format!("{right_net}.2"));
    chain.wait_healthy(&si, HEALTHY_WITHIN);

    let (left_ip, right_ip) = (format!("{left_net}.10"), format!("{right_net}.10"));
    assert!(
        chain.ping(&left_host, &right_ip),
        "left → right through the SI"
    );
    assert!(
        chain.ping(&right_host, &left_ip),
        "right → left through the SI"
    );

    chain.exec_ok(&si, &["dockwall", "rule", "add", "deny", "--proto", "icmp"]);
    assert!(!chain.ping(&left_host, &right_ip), "the rule blocks ICMP");
    chain.exec_ok(&si, &["dockwall", "rule", "delete", "1"]);
    assert!(
        chain.ping(&left_host, &right_ip),
        "deleting it restores ICMP"
    );

    chain.exec_ok(
        &si,
        &[
            "dockwall",
            "rule",
            "add",
            "deny",
            "--proto",
            "icmp",
            "-d",
            "right-to-left",
        ],
    );
    chain.restart(&si);
    let logs = chain.logs(&si);
    assert!(
        logs.contains("shutdown requested") && logs.contains("routing removed"),
        "`docker restart` sends SIGTERM: the SI tears its routing down before exiting\n{logs}"
    );
    chain.wait_healthy(&si, HEALTHY_WITHIN);
    let rules = chain.exec_ok(&si, &["dockwall", "rule", "list", "--json"]);
    assert!(
        rules.contains("right-to-left"),
        "the rule survived the restart: {rules}"
    );
    assert!(
        !chain.ping(&right_host, &left_ip),
        "and is enforced after it\n{}\n{}",
        chain.exec(&si, &["dockwall", "status"]).1,
        chain.exec(&si, &["nft", "list", "ruleset"]).1
    );
    assert!(
        chain.ping(&left_host, &right_ip),
        "the other direction still passes"
    );
}

/// `DOCKWALL_MODE=in-network-nat` in `docker run`: the right host, which has no route to the
/// left network, sees left traffic come from the SI's right address, and new connections
/// from the right to the left are dropped even once it has that route.
#[test]
fn dockwall_in_network_nat_from_the_environment_masquerades_left_traffic_and_drops_right_to_left() {
    let chain = DockerChain::new();
    let (left_net, right_net) = (chain.left_net.clone(), chain.right_net.clone());
    let left_host = chain.host("left-host", &chain.left, &left_net, &right_net);
    // A TCP listener that logs each connection's source; no route to the left network.
    let mut listener = Spec::new(
        "right-host",
        HOST_IMAGE,
        &chain.right,
        &format!("{right_net}.10"),
    )
    .with_cmd(&["nc", "-l", "-n", "-v", "-k", "7000"]);
    listener.cap_add = vec!["NET_ADMIN".into()];
    let right_host = chain.run(listener);
    let mut spec = chain.service_instance("si", DOCKWALL_IMAGE);
    spec.env.push("DOCKWALL_MODE=in-network-nat".into());
    let si = chain.run(spec);
    chain.connect(&si, &chain.right, &format!("{right_net}.2"));
    chain.wait_healthy(&si, HEALTHY_WITHIN);
    let (code, status) = chain
        .exec_stdout(&si, &["dockwall", "status", "--json"])
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(code, 0, "dockwall status --json in {si}: {status}");
    let status: serde_json::Value = serde_json::from_str(&status).expect("status JSON");
    assert_eq!(
        status["mode"], "in-network-nat",
        "the mode comes from DOCKWALL_MODE: {status}"
    );

    chain
        .wait_for_log(&right_host, "Listening on", Duration::from_secs(10))
        .unwrap_or_else(|e| panic!("{e}"));
    let right_ip = format!("{right_net}.10");
    let (code, output) = chain.exec(
        &left_host,
        &["nc", "-z", "-n", "-w", "3", &right_ip, "7000"],
    );
    assert_eq!(code, 0, "left → right through the SI: {output}");
    chain
        .wait_for_log(
            &right_host,
            &format!("Connection received on {right_net}.2 "),
            Duration::from_secs(10),
        )
        .unwrap_or_else(|e| panic!("the right host must see the SI's right address: {e}"));

    chain.exec_ok(
        &right_host,
        &[
            "ip",
            "route",
            "add",
            &format!("{left_net}.0/24"),
            "via",
            &format!("{right_net}.2"),
        ],
    );
    let left_ip = format!("{left_net}.10");
    assert!(
        !chain.ping(&right_host, &left_ip),
        "a new right-to-left flow crossed the SI\n{}",
        chain.exec(&si, &["nft", "list", "ruleset"]).1
    );
    assert!(
        chain.ping(&left_host, &right_ip),
        "while left-to-right, and its replies, pass"
    );
}

#[test]
fn an_si_without_net_admin_exits_with_a_clear_message() {
    let chain = DockerChain::new();
    let mut spec = chain.service_instance("si", DOCKWALL_IMAGE);
    spec.cap_add.clear();
    let si = chain.run(spec);
    assert_ne!(chain.wait_exit(&si, Duration::from_secs(20)), 0);
    let logs = chain.logs(&si);
    assert!(logs.contains("--cap-add NET_ADMIN"), "{logs}");
}

#[test]
fn strict_rp_filter_with_read_only_proc_sys_names_the_sysctl_flag() {
    let chain = DockerChain::new();
    let mut spec = chain.service_instance("si", DOCKWALL_IMAGE);
    spec.sysctls = vec![
        ("net.ipv4.ip_forward".into(), "1".into()),
        ("net.ipv4.conf.all.rp_filter".into(), "1".into()),
    ];
    let si = chain.run(spec);
    chain.connect(&si, &chain.right, &format!("{}.2", chain.right_net));
    assert_ne!(chain.wait_exit(&si, Duration::from_secs(20)), 0);
    let logs = chain.logs(&si);
    assert!(
        logs.contains("--sysctl net.ipv4.conf.all.rp_filter=2"),
        "{logs}"
    );
}

#[test]
fn dockvpn_chain_learns_option_121_and_a_stock_openvpn_client_reaches_the_left_host() {
    let chain = DockerChain::new();
    let (left_net, right_net) = (chain.left_net.clone(), chain.right_net.clone());
    // The left host also serves 192.168.77.0/24 (a network behind it), announced by DHCP.
    let left_host = {
        let script = format!(
            "ip addr add 192.168.77.1/32 dev lo && ip route add 10.8.0.0/24 via {left_net}.2 && exec sleep infinity"
        );
        let mut spec = Spec::new(
            "left-host",
            HOST_IMAGE,
            &chain.left,
            &format!("{left_net}.10"),
        )
        .with_cmd(&["sh", "-c", &script]);
        spec.cap_add = vec!["NET_ADMIN".into()];
        chain.run(spec)
    };
    let si_mac = "02:42:0a:c9:00:02";
    let dnsmasq_conf = format!(
        "interface=eth0\nbind-interfaces\ndhcp-range={left_net}.100,{left_net}.150,255.255.255.0,1h\n\
         dhcp-host={si_mac},{left_net}.2\n\
         dhcp-option=option:classless-static-route,192.168.77.0/24,{left_net}.10,0.0.0.0/0,{left_net}.1\n\
         dhcp-option=option:router,{left_net}.1\n"
    );
    let mut dhcp = Spec::new(
        "dhcp",
        DNSMASQ_IMAGE,
        &chain.left,
        &format!("{left_net}.254"),
    );
    // dnsmasq's DHCP server sets ARP entries for its replies.
    dhcp.cap_add = vec!["NET_ADMIN".into()];
    let dhcp = chain.run(
        dhcp.with_cmd(&[
            "sh", "-c",
            &format!("printf '%s' '{dnsmasq_conf}' > /etc/dnsmasq.conf && exec dnsmasq --keep-in-foreground --log-facility=- --log-dhcp --user=root --port=0 --conf-file=/etc/dnsmasq.conf"),
        ]),
    );
    let mut spec = chain.service_instance("vpn", DOCKVPN_IMAGE);
    spec.mac = Some(si_mac.into());
    spec.tun_device = true;
    spec.env.push("VNF_DHCP=left".into());
    spec.volume = Some("/var/lib/dockvpn".into());
    let si = chain.run(spec);
    chain.connect(&si, &chain.right, &format!("{right_net}.2"));
    chain.wait_healthy(&si, HEALTHY_WITHIN);
    let learned = chain.wait_for_output(
        &si,
        &["dockvpn", "status", "--json"],
        "192.168.77.0/24",
        Duration::from_secs(20),
    );
    if let Err(error) = learned {
        panic!(
            "the option-121 route is not learned: {error}\n{}\ndhcp:\n{}",
            chain.logs(&si),
            chain.logs(&dhcp)
        );
    }

    chain.exec_ok(&si, &["dockvpn", "client", "add", "alice"]);
    let profile = chain.exec_ok(&si, &["dockvpn", "client", "config", "alice"]);
    assert!(
        profile.contains(&format!("remote {right_net}.2 1194")),
        "{profile}"
    );
    let mut client = Spec::new(
        "vpn-client",
        HOST_IMAGE,
        &chain.right,
        &format!("{right_net}.20"),
    )
    .with_cmd(&[
        "sh",
        "-c",
        "printf '%s' \"$PROFILE\" > /alice.ovpn && exec openvpn --config /alice.ovpn",
    ]);
    client.cap_add = vec!["NET_ADMIN".into()];
    client.tun_device = true;
    client.env = vec![format!("PROFILE={profile}")];
    let client = chain.run(client);
    chain
        .wait_for_log(&client, CONNECTED, Duration::from_secs(30))
        .unwrap_or_else(|e| panic!("{e}\nserver:\n{}", chain.logs(&si)));
    let routes = chain.exec_ok(&client, &["ip", "route", "show", "dev", "tun0"]);
    assert!(routes.contains("192.168.77.0/24 via 10.8.0.1"), "{routes}");
    assert!(!routes.contains("default"), "{routes}");
    assert!(
        chain.ping(&client, "192.168.77.1"),
        "through the tunnel to the left host\n{}",
        chain.logs(&si)
    );
    let _ = left_host;
}

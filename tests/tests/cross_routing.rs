//! Dockwall in cross mode, started for real in the namespace chain.

use std::time::Duration;

use docknfv_tests::chain::{LEFT_HOST, RIGHT_HOST, SI_LEFT};
use docknfv_tests::traffic::{ping, ping_eventually, tcp_exchange};
use docknfv_tests::{Chain, Vnf};

fn assert_traffic_crosses(chain: &Chain) {
    assert!(
        ping_eventually(&chain.left_host, RIGHT_HOST, 3),
        "left host cannot ping the right host"
    );
    assert!(
        ping(&chain.right_host, LEFT_HOST),
        "right host cannot ping the left host"
    );
    tcp_exchange(&chain.left_host, &chain.right_host, RIGHT_HOST, 5001).expect("TCP left → right");
    tcp_exchange(&chain.right_host, &chain.left_host, LEFT_HOST, 5002).expect("TCP right → left");
}

#[test]
fn hosts_behind_both_gateways_reach_each_other_only_through_the_si() {
    let chain = Chain::new();
    // The SI knows only its connected subnets: without Dockwall nothing crosses.
    chain.si.set_sysctl("net.ipv4.ip_forward", 1);
    assert!(
        !ping(&chain.left_host, RIGHT_HOST),
        "traffic crossed before Dockwall configured the SI"
    );

    let mut dockwall = Vnf::start(&chain.si, "dockwall", &["run"]);
    dockwall.wait_ready();
    assert_traffic_crosses(&chain);

    assert!(
        dockwall.terminate().success(),
        "dockwall did not exit cleanly:\n{}",
        dockwall.log()
    );
    assert!(
        !ping(&chain.left_host, RIGHT_HOST),
        "traffic still crosses after Dockwall removed its routing"
    );
}

#[test]
fn right_side_plugged_in_after_start_is_configured() {
    let chain = Chain::without_right();
    let dockwall = Vnf::start(&chain.si, "dockwall", &["run", "--side-timeout", "20"]);
    dockwall
        .wait_for_log("side ready side=left", Duration::from_secs(10))
        .unwrap_or_else(|e| panic!("{e}"));
    std::thread::sleep(Duration::from_secs(1));
    assert!(
        !dockwall.log().contains("forwarding ready"),
        "ready with one side:\n{}",
        dockwall.log()
    );

    chain.attach_right();
    dockwall.wait_ready();
    assert_traffic_crosses(&chain);
}

#[test]
fn sides_survive_a_restart_that_enumerates_the_legs_in_another_order() {
    let chain = Chain::new();
    let state_dir = std::env::temp_dir().join(format!("sides-restart-{}", std::process::id()));
    let state = state_dir.to_str().expect("utf-8 path");
    let run = ["--state-dir", state, "run", "--side-timeout", "20"];
    let mut dockwall = Vnf::start(&chain.si, "dockwall", &run);
    dockwall.wait_ready();
    let deny = [
        "--state-dir",
        state,
        "rule",
        "add",
        "deny",
        "--proto",
        "icmp",
        "--direction",
        "left-to-right",
    ];
    let added = dockwall.cli(&chain.si, "dockwall", &deny);
    assert!(added.status.success(), "{added:?}");
    assert!(
        !ping(&chain.left_host, RIGHT_HOST),
        "left → right is denied"
    );
    assert!(ping(&chain.right_host, LEFT_HOST), "right → left passes");
    dockwall.terminate();

    chain.replug_left_last();
    assert!(chain.si.link("eth0").index > chain.si.link("eth1").index);
    let dockwall = Vnf::start(&chain.si, "dockwall", &run);
    dockwall.wait_ready();
    assert!(
        dockwall
            .log()
            .contains("side ready side=left interface=eth0"),
        "the left leg keeps the left side:\n{}",
        dockwall.log()
    );
    assert!(
        ping_eventually(&chain.right_host, LEFT_HOST, 3),
        "right → left passes"
    );
    assert!(
        !ping(&chain.left_host, RIGHT_HOST),
        "and the left-to-right rule still applies to the left leg"
    );
    drop(dockwall);
    let _ = std::fs::remove_dir_all(&state_dir);
}

#[test]
fn strict_rp_filter_at_start_is_corrected() {
    let chain = Chain::new();
    for key in ["all", "eth0", "eth1"] {
        chain
            .si
            .set_sysctl(&format!("net.ipv4.conf.{key}.rp_filter"), 1);
    }
    let dockwall = Vnf::start(&chain.si, "dockwall", &["run"]);
    dockwall.wait_ready();
    for key in ["all", "eth0", "eth1"] {
        assert_eq!(
            chain.si.sysctl(&format!("net.ipv4.conf.{key}.rp_filter")),
            2,
            "{key}"
        );
    }
    assert_eq!(chain.si.sysctl("net.ipv4.ip_forward"), 1);
    assert_traffic_crosses(&chain);
}

#[test]
fn strict_rp_filter_with_read_only_proc_sys_is_refused_with_the_flags_to_pass() {
    let chain = Chain::new();
    chain.si.set_sysctl("net.ipv4.ip_forward", 1);
    chain.si.set_sysctl("net.ipv4.conf.all.rp_filter", 1);
    let before = chain.si.routing_snapshot();

    let mut dockwall = Vnf::start_with_read_only_proc_sys(&chain.si, "dockwall", &["run"]);
    let status = dockwall.wait_exit(Duration::from_secs(10));
    assert!(!status.success());
    let log = dockwall.log();
    assert!(log.contains("read-only"), "{log}");
    assert!(
        log.contains("--sysctl net.ipv4.conf.all.rp_filter=2"),
        "{log}"
    );
    assert!(
        !log.contains("--sysctl net.ipv4.ip_forward"),
        "ip_forward was right: {log}"
    );
    assert_eq!(
        chain.si.routing_snapshot(),
        before,
        "routing changed although the start was refused"
    );
    assert_eq!(chain.si.sysctl("net.ipv4.conf.all.rp_filter"), 1);
}

#[test]
fn read_only_proc_sys_with_working_values_is_accepted() {
    let chain = Chain::new();
    chain.si.set_sysctl("net.ipv4.ip_forward", 1);
    chain.si.set_sysctl("net.ipv4.conf.all.rp_filter", 2);
    let dockwall = Vnf::start_with_read_only_proc_sys(&chain.si, "dockwall", &["run"]);
    dockwall.wait_ready();
    assert_traffic_crosses(&chain);
}

#[test]
fn a_changed_side_address_is_followed() {
    let chain = Chain::new();
    let dockwall = Vnf::start(&chain.si, "dockwall", &["run"]);
    dockwall.wait_ready();

    let new_address = "10.0.1.3";
    chain
        .si
        .ip(&["addr", "del", &format!("{SI_LEFT}/24"), "dev", "eth0"]);
    chain
        .si
        .ip(&["addr", "add", &format!("{new_address}/24"), "dev", "eth0"]);
    chain.left_gateway.ip(&[
        "route",
        "replace",
        docknfv_tests::chain::RIGHT_HOST_NET,
        "via",
        new_address,
    ]);

    // Generous: the address events reach a debug build on a shared machine.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let expected = format!("10.0.1.0/24 dev eth0 proto 245 scope link src {new_address}");
    loop {
        let table = chain.si.ip(&["route", "show", "table", "1001"]);
        if table.contains(&expected) {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "table 1001 never followed the new address:\n{table}\n{}",
            dockwall.log()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_traffic_crosses(&chain);
}

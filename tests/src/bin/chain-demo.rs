//! The README's demo: a service chain in namespaces, Dockwall as the SI, traffic crossing it.

use std::time::Duration;

use docknfv_tests::chain::{LEFT_HOST, RIGHT_HOST};
use docknfv_tests::demo::{outcome, step};
use docknfv_tests::dockwall::Dockwall;
use docknfv_tests::traffic::{ping, tcp_exchange};
use docknfv_tests::{Chain, Vnf};

fn main() {
    step("building the chain: left host ─ left gateway ─ [SI] ─ right gateway ─ right host");
    let chain = Chain::new();
    println!(
        "namespaces: {} {} {} {} {}",
        chain.left_host.name(),
        chain.left_gateway.name(),
        chain.si.name(),
        chain.right_gateway.name(),
        chain.right_host.name()
    );
    chain.si.set_sysctl("net.ipv4.ip_forward", 1);
    println!(
        "before Dockwall: ping {LEFT_HOST} → {RIGHT_HOST} {}",
        outcome(ping(&chain.left_host, RIGHT_HOST))
    );

    step("starting `dockwall run` in the SI");
    let mut dockwall = Dockwall::start(&chain);
    println!(
        "{}",
        dockwall.process.as_ref().map(Vnf::log).unwrap_or_default()
    );

    step("what Dockwall installed (ip rule; ip route show table 1001 / 1002)");
    print!("{}", chain.si.ip(&["rule"]));
    print!("{}", chain.si.ip(&["route", "show", "table", "1001"]));
    print!("{}", chain.si.ip(&["route", "show", "table", "1002"]));

    step("traffic crossing the SI");
    let mut all_ok = true;
    for (label, ok) in [
        (
            format!("ping {LEFT_HOST} → {RIGHT_HOST}"),
            ping(&chain.left_host, RIGHT_HOST),
        ),
        (
            format!("ping {RIGHT_HOST} → {LEFT_HOST}"),
            ping(&chain.right_host, LEFT_HOST),
        ),
        (
            format!("TCP  {LEFT_HOST} → {RIGHT_HOST}:5001"),
            tcp_exchange(&chain.left_host, &chain.right_host, RIGHT_HOST, 5001).is_ok(),
        ),
        (
            format!("TCP  {RIGHT_HOST} → {LEFT_HOST}:5002"),
            tcp_exchange(&chain.right_host, &chain.left_host, LEFT_HOST, 5002).is_ok(),
        ),
    ] {
        println!("{label:<40} {}", outcome(ok));
        all_ok &= ok;
    }

    step("a firewall rule, as `docker exec <si> dockwall rule add …` would add it");
    let edit = [
        "rule",
        "add",
        "deny",
        "--direction",
        "left-to-right",
        "--proto",
        "icmp",
    ];
    print!("dockwall {}\n{}", edit.join(" "), dockwall.ok(&edit));
    let blocked = !ping(&chain.left_host, RIGHT_HOST);
    println!("ping {LEFT_HOST} → {RIGHT_HOST} {}", outcome(!blocked));
    print!("dockwall rule list\n{}", dockwall.ok(&["rule", "list"]));
    print!(
        "dockwall rule delete 1\n{}",
        dockwall.ok(&["rule", "delete", "1"])
    );
    let restored = ping(&chain.left_host, RIGHT_HOST);
    println!("ping {LEFT_HOST} → {RIGHT_HOST} {}", outcome(restored));
    all_ok &= blocked && restored;

    step("stopping Dockwall with SIGTERM: it removes its routes, rules and nftables table");
    let status = dockwall
        .process
        .as_mut()
        .map(Vnf::terminate)
        .expect("dockwall run is running");
    std::thread::sleep(Duration::from_millis(100));
    println!("exit: {status}; rules now:\n{}", chain.si.ip(&["rule"]));
    println!(
        "ping {LEFT_HOST} → {RIGHT_HOST} {}",
        outcome(ping(&chain.left_host, RIGHT_HOST))
    );

    step("tearing the chain down");
    drop(chain);
    if all_ok && status.success() {
        println!("demo OK");
    } else {
        eprintln!("demo FAILED");
        std::process::exit(1);
    }
}

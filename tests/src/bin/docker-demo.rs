//! The README's demo on Docker (used when a daemon answers): the chain as containers on two
//! internal networks, a Dockwall SI started with `docker run` on the left network and then
//! `docker network connect`ed to the right one, rules edited with `docker exec`.

use std::time::Duration;

use docknfv_tests::demo::{outcome, step};
use docknfv_tests::docker::{DockerChain, DOCKWALL_IMAGE};

fn main() {
    step("creating the left and right VNs (internal Docker networks)");
    let chain = DockerChain::new();
    let (left_net, right_net) = (chain.left_net.clone(), chain.right_net.clone());
    println!(
        "left {} {left_net}.0/24, right {} {right_net}.0/24",
        chain.left, chain.right
    );
    let left_host = chain.host("left-host", &chain.left, &left_net, &right_net);
    let right_host = chain.host("right-host", &chain.right, &right_net, &left_net);
    let (left_ip, right_ip) = (format!("{left_net}.10"), format!("{right_net}.10"));

    step("docker run the Dockwall SI on the left VN, then docker network connect the right VN");
    let mut spec = chain.service_instance("dockwall", DOCKWALL_IMAGE);
    spec.volume = Some("/var/lib/dockwall".into());
    let si = chain.run(spec);
    chain.connect(&si, &chain.right, &format!("{right_net}.2"));
    chain.wait_healthy(&si, Duration::from_secs(30));
    print!("{}", chain.logs(&si));

    step("traffic between the VNs crosses the SI");
    let mut all_ok = true;
    for (from, to, label) in [
        (
            &left_host,
            &right_ip,
            format!("ping {left_ip} → {right_ip}"),
        ),
        (
            &right_host,
            &left_ip,
            format!("ping {right_ip} → {left_ip}"),
        ),
    ] {
        let ok = chain.ping(from, to);
        println!("{label:<40} {}", outcome(ok));
        all_ok &= ok;
    }

    step("docker exec <si> dockwall rule add deny --proto icmp");
    print!(
        "{}",
        chain.exec_ok(&si, &["dockwall", "rule", "add", "deny", "--proto", "icmp"])
    );
    let blocked = !chain.ping(&left_host, &right_ip);
    println!("ping {left_ip} → {right_ip} {}", outcome(!blocked));
    print!(
        "{}",
        chain.exec_ok(&si, &["dockwall", "rule", "delete", "1"])
    );
    let restored = chain.ping(&left_host, &right_ip);
    println!("ping {left_ip} → {right_ip} {}", outcome(restored));
    all_ok &= blocked && restored;

    step("docker exec <si> dockwall status");
    print!("{}", chain.exec(&si, &["dockwall", "status"]).1);

    step("removing the containers, networks and volume");
    drop(chain);
    if all_ok {
        println!("demo OK (on Docker)");
    } else {
        eprintln!("demo FAILED (on Docker)");
        std::process::exit(1);
    }
}

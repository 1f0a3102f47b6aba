//! Transparent-mode benchmarks for BENCHMARKS.md (run with `cargo xtask bench`): iperf3 TCP
//! throughput and new TCP connections per second left→right through
//! - Dockwall in transparent mode (bridged legs, one subnet),
//! - Dockwall in cross (in-network) mode on the routed chain,
//! - a plain Linux bridge with br_netfilter and the same rules in iptables `physdev`,
//!
//! all with the same policy: default deny, allow TCP left→right, answers by conntrack.
//! Interleaved in one run, the order rotating every round; medians with their spread.

use std::time::Instant;

use docknfv_tests::chain::RIGHT_HOST;
use docknfv_tests::measure::{
    iperf_tcp_gbps, median, new_connections, round_order, spread, IPERF_SECONDS,
};
use docknfv_tests::netns::{output_with_stdin, Netns};
use docknfv_tests::prereq::require_command;
use docknfv_tests::wire::{Wire, WIRE_RIGHT};
use docknfv_tests::{Chain, Vnf};

const ROUNDS: usize = 5;

/// The plain bridge's rules: what Dockwall compiles the policy to, in iptables.
const PHYSDEV_RULES: &str = "*filter
:FORWARD DROP [0:0]
-A FORWARD -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT
-A FORWARD -m conntrack --ctstate INVALID -j DROP
-A FORWARD -p tcp -m physdev --physdev-in eth0 --physdev-out eth1 -j ACCEPT
COMMIT
";

/// Default deny, TCP left→right allowed: the policy every contender enforces.
fn allow_tcp_left_to_right(dockwall: &Vnf, si: &Netns) {
    for args in [
        &["default", "deny"][..],
        &[
            "rule",
            "add",
            "allow",
            "--direction",
            "left-to-right",
            "--proto",
            "tcp",
        ],
    ] {
        let output = dockwall.cli(si, "dockwall", args);
        assert!(
            output.status.success(),
            "dockwall {args:?}: {}",
            String::from_utf8_lossy(&output.stderr)
        );
    }
}

/// A contender: the namespaces a flow goes between and the address it goes to.
struct Path<'a> {
    client: &'a Netns,
    server: &'a Netns,
    address: &'a str,
}

fn main() {
    // SAFETY: single-threaded here; the harness reads it when it builds the binaries.
    unsafe { std::env::set_var("DOCKNFV_PROFILE", "release") };
    require_command("iperf3", "iperf3");
    require_command("iptables-restore", "iptables");
    let started = Instant::now();

    let wire = Wire::new();
    let transparent = Vnf::start(&wire.si, "dockwall", &["run", "--mode", "transparent"]);
    transparent.wait_ready();
    allow_tcp_left_to_right(&transparent, &wire.si);

    let chain = Chain::new();
    let cross = Vnf::start(&chain.si, "dockwall", &["run"]);
    cross.wait_ready();
    allow_tcp_left_to_right(&cross, &chain.si);

    let bridge = Wire::new();
    bridge.bridge_plainly();
    let restore = output_with_stdin(&mut bridge.si.command("iptables-restore"), PHYSDEV_RULES);
    assert!(
        restore.status.success(),
        "iptables-restore: {}",
        String::from_utf8_lossy(&restore.stderr)
    );

    let paths = [
        Path {
            client: &wire.left_host,
            server: &wire.right_host,
            address: WIRE_RIGHT,
        },
        Path {
            client: &chain.left_host,
            server: &chain.right_host,
            address: RIGHT_HOST,
        },
        Path {
            client: &bridge.left_host,
            server: &bridge.right_host,
            address: WIRE_RIGHT,
        },
    ];
    let (mut throughput, mut rate): ([Vec<f64>; 3], [Vec<f64>; 3]) = Default::default();
    let mut failed = [0usize; 3];
    for round in 0..ROUNDS {
        for contender in round_order(round, paths.len()) {
            let path = &paths[contender];
            throughput[contender].push(iperf_tcp_gbps(
                path.client,
                path.server,
                path.address,
                IPERF_SECONDS,
            ));
        }
        let port = 6100 + round as u16;
        for contender in round_order(round, paths.len()) {
            let path = &paths[contender];
            let measured = new_connections(path.client, path.server, path.address, port);
            rate[contender].push(measured.per_second);
            failed[contender] += measured.failed;
        }
    }
    let names = [
        "Dockwall transparent (bridge)",
        "Dockwall in-network (cross routing)",
        "plain bridge, iptables physdev",
    ];
    let throughput_spread = throughput.each_ref().map(|v| spread(v, 2));
    let rate_spread = rate.each_ref().map(|v| spread(v, 0));
    let throughput_samples = format!("{throughput:.2?}");
    let rate_samples = format!("{rate:.0?}");
    let gbps = throughput.each_mut().map(|v| median(v));
    let per_second = rate.each_mut().map(|v| median(v));
    println!("| measure | {} | {} | {} |", names[0], names[1], names[2]);
    println!("|---|---|---|---|");
    println!(
        "| iperf3 TCP left→right, median of {ROUNDS} × {IPERF_SECONDS} s | {:.2} Gbit/s ({}) | {:.2} Gbit/s ({}) | {:.2} Gbit/s ({}) |",
        gbps[0], throughput_spread[0], gbps[1], throughput_spread[1], gbps[2], throughput_spread[2]
    );
    println!(
        "| ratio to transparent | 1 | {:.3} | {:.3} |",
        gbps[1] / gbps[0],
        gbps[2] / gbps[0]
    );
    println!(
        "| new TCP connections/s, median of {ROUNDS} × 1000 | {:.0}/s ({}) | {:.0}/s ({}) | {:.0}/s ({}) |",
        per_second[0], rate_spread[0], per_second[1], rate_spread[1], per_second[2], rate_spread[2]
    );
    println!(
        "| ratio to transparent | 1 | {:.3} | {:.3} |",
        per_second[1] / per_second[0],
        per_second[2] / per_second[0]
    );
    println!(
        "\n{} cores, benchmark took {:.0} s. Samples in the columns' order, throughput (Gbit/s): \
         {throughput_samples}; connections/s: {rate_samples}; failed connection attempts: {failed:?}",
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(0),
        started.elapsed().as_secs_f64()
    );
    println!(
        "The in-network path crosses two more routers (the gateways) than the bridged ones: \
         its ratio is not hop for hop."
    );
}

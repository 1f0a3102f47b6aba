//! Dockwall firewall benchmarks for BENCHMARKS.md (run with `cargo xtask bench`):
//! - iperf3 TCP left→right through Dockwall holding 10,000 deny rules that do not match the
//!   flow, vs. Dockwall with no rules, vs. a plain SI whose FORWARD chain holds the same
//!   10,000 rules linearly in iptables behind an established-accept rule (what ufw builds);
//!   and the new-connection rate through each, where every SYN walks the rules; interleaved,
//!   the order rotating every round, medians with their spread;
//! - `dockwall apply` of the 10,000 rules (a full table replace) and `dockwall rule add` as a
//!   whole process with them present, medians;
//! - RSS of an idle `dockwall run` holding them.

use std::time::{Duration, Instant};

use docknfv_tests::chain::RIGHT_HOST;
use docknfv_tests::dockwall::{deny_rule_set_json, Dockwall};
use docknfv_tests::measure::{
    iperf_gbps, median, new_connections, round_order, rss_kib, spread, IPERF_SECONDS,
};
use docknfv_tests::netns::output_with_stdin;
use docknfv_tests::prereq::require_command;
use docknfv_tests::Chain;

const RULES: usize = 10_000;
/// Interleaved throughput and connection-rate rounds; the spread is printed with each median.
const ROUNDS: usize = 7;
const RULE_ADDS: usize = 20;
const APPLIES: usize = 5;

fn iptables_restore_input() -> String {
    // As ufw builds it: established traffic first, then the rules one after another.
    let mut text = String::from("*filter\n:FORWARD ACCEPT [0:0]\n-A FORWARD -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT\n");
    for i in 0..RULES {
        if i % 2 == 0 {
            text += &format!(
                "-A FORWARD -s 10.{}.{}.{}/32 -p tcp --dport 22 -j DROP\n",
                i >> 16 & 255,
                i >> 8 & 255,
                i & 255
            );
        } else {
            let j = i / 2;
            text += &format!(
                "-A FORWARD -d 100.{}.{}.0/24 -p udp -j DROP\n",
                64 + (j >> 8),
                j & 255
            );
        }
    }
    text + "COMMIT\n"
}

fn timed(dockwall: &Dockwall, args: &[&str]) -> f64 {
    let started = Instant::now();
    dockwall.ok(args);
    started.elapsed().as_secs_f64() * 1000.0
}

fn main() {
    // SAFETY: single-threaded here; the harness reads it when it builds the binaries.
    unsafe { std::env::set_var("DOCKNFV_PROFILE", "release") };
    require_command("iperf3", "iperf3");
    require_command("iptables-restore", "iptables");

    let loaded_chain = Chain::new();
    let mut loaded = Dockwall::start(&loaded_chain);
    std::fs::create_dir_all(loaded.state.path()).expect("state dir");
    // Alternating the default policy makes every apply a full table replace, ending on accept.
    let files: Vec<String> = ["accept", "drop"]
        .iter()
        .map(|policy| {
            let file = loaded.state.path().join(format!("10k-{policy}.json"));
            std::fs::write(&file, deny_rule_set_json(RULES, policy)).expect("write rule set");
            file.to_str().expect("utf-8").to_string()
        })
        .collect();
    let mut applies: Vec<f64> = (0..APPLIES)
        .map(|i| timed(&loaded, &["apply", &files[i % 2]]))
        .collect();
    let mut adds: Vec<f64> = (0..RULE_ADDS)
        .map(|i| {
            timed(
                &loaded,
                &[
                    "rule",
                    "add",
                    "deny",
                    "--proto",
                    "tcp",
                    "--from",
                    &format!("10.200.0.{}", i + 1),
                    "--dport",
                    "22",
                ],
            )
        })
        .collect();
    // A restart loads all of them; measure the ready time and the idle RSS with them.
    loaded.stop();
    let restart = Instant::now();
    loaded.run();
    let ready_with_rules = restart.elapsed().as_secs_f64() * 1000.0;
    std::thread::sleep(Duration::from_secs(1));
    let rss = rss_kib(loaded.process.as_ref().expect("running").pid());

    let empty_chain = Chain::new();
    let _empty = Dockwall::start(&empty_chain);
    let iptables_chain = Chain::new();
    iptables_chain.route_si_statically();
    let restore = output_with_stdin(
        &mut iptables_chain.si.command("iptables-restore"),
        &iptables_restore_input(),
    );
    assert!(
        restore.status.success(),
        "iptables-restore: {}",
        String::from_utf8_lossy(&restore.stderr)
    );

    let chains = [&loaded_chain, &empty_chain, &iptables_chain];
    let (mut throughput, mut setup): ([Vec<f64>; 3], [Vec<f64>; 3]) = Default::default();
    for round in 0..ROUNDS {
        for contender in round_order(round, chains.len()) {
            throughput[contender].push(iperf_gbps(chains[contender]));
        }
        let port = 6000 + round as u16;
        for contender in round_order(round, chains.len()) {
            // New connections: each SYN walks the rule set, where established packets skip it.
            let chain = chains[contender];
            setup[contender].push(
                new_connections(&chain.left_host, &chain.right_host, RIGHT_HOST, port).per_second,
            );
        }
    }
    let [mut with_rules, mut without, mut linear] = throughput;
    let [mut setup_with, mut setup_without, mut setup_linear] = setup;
    let (with_rules_spread, without_spread, linear_spread) = (
        spread(&with_rules, 2),
        spread(&without, 2),
        spread(&linear, 2),
    );
    let (with_rules_median, without_median, linear_median) = (
        median(&mut with_rules),
        median(&mut without),
        median(&mut linear),
    );
    println!("| measure | value |");
    println!("|---|---|");
    println!("| iperf3 TCP through Dockwall with {RULES} non-matching deny rules, median of {ROUNDS} × {IPERF_SECONDS} s | {with_rules_median:.2} Gbit/s (spread {with_rules_spread}) |");
    println!("| same SI setup with no rules, interleaved | {without_median:.2} Gbit/s (spread {without_spread}) |");
    println!(
        "| **ratio {RULES} rules / no rules** | **{:.3}** |",
        with_rules_median / without_median
    );
    println!("| plain SI with the {RULES} rules as a linear iptables FORWARD chain, interleaved | {linear_median:.2} Gbit/s ({:.3} of no rules; spread {linear_spread}) |", linear_median / without_median);
    let (setup_with_spread, setup_without_spread, setup_linear_spread) = (
        spread(&setup_with, 0),
        spread(&setup_without, 0),
        spread(&setup_linear, 0),
    );
    let (setup_with, setup_without, setup_linear) = (
        median(&mut setup_with),
        median(&mut setup_without),
        median(&mut setup_linear),
    );
    println!("| new TCP connections/s through Dockwall with {RULES} rules, median of {ROUNDS} × 1000 | {setup_with:.0}/s ({:.3} of no rules; spread {setup_with_spread}) |", setup_with / setup_without);
    println!("| same with no rules | {setup_without:.0}/s (spread {setup_without_spread}) |");
    println!(
        "| same through the linear iptables chain | {setup_linear:.0}/s ({:.3} of no rules; spread {setup_linear_spread}) |",
        setup_linear / setup_without
    );
    println!("| `dockwall apply` of {RULES} rules (whole process, full table replace), median of {APPLIES} | {:.0} ms |", median(&mut applies));
    println!("| `dockwall rule add` with {RULES} rules present (whole process), median of {RULE_ADDS} | {:.0} ms |", median(&mut adds));
    println!("| `dockwall run` restart → forwarding ready with {RULES} rules | {ready_with_rules:.0} ms |");
    println!("| RSS of idle `dockwall run` with {RULES} rules | {rss} KiB |");
    println!("\nthroughput samples (Gbit/s): with rules {with_rules:.2?}, no rules {without:.2?}, iptables linear {linear:.2?}");
}

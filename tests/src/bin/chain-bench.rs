//! Benchmarks for BENCHMARKS.md (run with `cargo xtask bench`), not timed tests:
//! - time from `dockwall run` to forwarding ready, median of N starts;
//! - iperf3 TCP throughput left→right through the SI with Dockwall's cross routing vs. the
//!   same chain whose SI is a plain router (two static routes in main), interleaved in one
//!   run (the order alternating every round) so machine noise hits both alike;
//! - RSS of an idle `dockwall run`.

use std::process::Command;
use std::time::{Duration, Instant};

use docknfv_tests::measure::{iperf_gbps, median, round_order, rss_kib, IPERF_SECONDS};
use docknfv_tests::prereq::require_command;
use docknfv_tests::{Chain, Vnf};

const READY_RUNS: usize = 20;
const THROUGHPUT_ROUNDS: usize = 7;

fn ready_times(chain: &Chain) -> (Vec<f64>, Vec<f64>) {
    let mut observed = Vec::new();
    let mut self_reported = Vec::new();
    for _ in 0..READY_RUNS {
        let mut dockwall = Vnf::start(&chain.si, "dockwall", &["run"]);
        let line = dockwall
            .wait_for_log("forwarding ready", Duration::from_secs(10))
            .unwrap_or_else(|e| panic!("{e}"));
        observed.push(dockwall.started.elapsed().as_secs_f64() * 1000.0);
        let reported = line
            .split("elapsed_ms=")
            .nth(1)
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|ms| ms.parse::<f64>().ok())
            .expect("elapsed_ms in the ready line");
        self_reported.push(reported);
        assert!(dockwall.terminate().success());
    }
    (observed, self_reported)
}

/// One iperf3 TCP run left host → right host; Gbit/s received.
fn main() {
    // SAFETY: single-threaded at this point; the harness reads it when building binaries.
    unsafe { std::env::set_var("DOCKNFV_PROFILE", "release") };
    require_command("iperf3", "iperf3");
    let started = Instant::now();

    let chain = Chain::new();
    let (mut observed, mut self_reported) = ready_times(&chain);

    let dockwall = Vnf::start(&chain.si, "dockwall", &["run"]);
    dockwall.wait_ready();
    let baseline = Chain::new();
    baseline.route_si_statically();
    let chains = [&chain, &baseline];
    let mut samples = [Vec::new(), Vec::new()];
    for round in 0..THROUGHPUT_ROUNDS {
        for contender in round_order(round, chains.len()) {
            samples[contender].push(iperf_gbps(chains[contender]));
        }
    }
    let [mut with_dockwall, mut plain] = samples;
    std::thread::sleep(Duration::from_secs(1));
    let rss = rss_kib(dockwall.pid());

    let kernel = Command::new("uname")
        .arg("-r")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default();
    let dockwall_median = median(&mut with_dockwall);
    let plain_median = median(&mut plain);
    println!("| measure | value |");
    println!("|---|---|");
    println!("| `dockwall run` → forwarding ready, seen by the harness (spawn to log line), median of {READY_RUNS} | {:.1} ms (min {:.1}, max {:.1}) |", median(&mut observed), observed[0], observed[READY_RUNS - 1]);
    println!("| same, self-reported from process start (`elapsed_ms`), median of {READY_RUNS} | {:.1} ms |", median(&mut self_reported));
    println!("| iperf3 TCP left→right through Dockwall (cross routing), median of {THROUGHPUT_ROUNDS} × {IPERF_SECONDS} s | {dockwall_median:.2} Gbit/s |");
    println!("| iperf3 TCP through a plain forwarding SI (static routes in main), interleaved | {plain_median:.2} Gbit/s |");
    println!(
        "| ratio Dockwall / plain | {:.3} |",
        dockwall_median / plain_median
    );
    println!(
        "| RSS of idle `dockwall run` (release build) | {} KiB |",
        rss
    );
    println!(
        "\nkernel {kernel}, {} cores, benchmark took {:.0} s",
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(0),
        started.elapsed().as_secs_f64()
    );
    println!("throughput samples (Gbit/s): dockwall {with_dockwall:.2?}, plain {plain:.2?}");
}

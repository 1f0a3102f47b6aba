//! The cost of Dockwall's `/metrics` with 10,000 rules, for BENCHMARKS.md (run with `cargo
//! xtask bench`): `dockwall run --metrics-listen` in the SI, scraped over TCP from inside the
//! SI's namespace as Prometheus would; each scrape reads every rule's nft counters. The RSS of
//! `run` with no rules, after a restart that loads the 10,000, after the first scrape and after
//! the last; the time of the first scrape and the median of the following ones.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use docknfv_tests::dockwall::{deny_rule_set_json, Dockwall, StateDir};
use docknfv_tests::measure::{median, rss_kib, spread};
use docknfv_tests::prereq::require_command;
use docknfv_tests::{Chain, Netns, Vnf};

const RULES: usize = 10_000;
const SCRAPES: usize = 50;
const METRICS: &str = "127.0.0.1:9100";

/// `dockwall --state-dir STATE run --metrics-listen METRICS` in the SI, once it forwards and
/// serves metrics.
fn run_with_metrics(dockwall: &Dockwall) -> Vnf {
    let dockwall = dockwall.spawn(&["--metrics-listen", METRICS]);
    dockwall.wait_ready();
    dockwall
        .wait_for_log("serving /metrics", Duration::from_secs(10))
        .unwrap_or_else(|e| panic!("{e}"));
    dockwall
}

/// One GET /metrics from inside the SI: the whole answer and how long it took, from connect
/// to the server closing the connection.
fn scrape(si: &Netns) -> (String, Duration) {
    let address: SocketAddr = METRICS.parse().expect("metrics address");
    si.run(|| {
        let started = Instant::now();
        let mut stream = TcpStream::connect_timeout(&address, Duration::from_secs(2))
            .unwrap_or_else(|e| panic!("connect to {METRICS} in the SI: {e}"));
        stream
            .set_read_timeout(Some(Duration::from_secs(30)))
            .expect("read timeout");
        stream
            .write_all(b"GET /metrics HTTP/1.1\r\nHost: si\r\nConnection: close\r\n\r\n")
            .expect("send the request");
        let mut answer = Vec::new();
        stream
            .read_to_end(&mut answer)
            .unwrap_or_else(|e| panic!("read /metrics: {e}"));
        let took = started.elapsed();
        (String::from_utf8_lossy(&answer).into_owned(), took)
    })
}

/// Scrapes once and checks it is a 200 holding all the rules' counters.
fn checked_scrape(si: &Netns, dockwall: &Vnf) -> (usize, Duration) {
    let (answer, took) = scrape(si);
    let rule_series = answer
        .lines()
        .filter(|l| l.starts_with("dockwall_rule_packets_total{"))
        .count();
    assert!(
        answer.starts_with("HTTP/1.1 200") && rule_series == RULES,
        "/metrics must answer 200 with {RULES} dockwall_rule_packets_total series, had {rule_series}:\n{}\ndockwall:\n{}",
        answer.lines().take(20).collect::<Vec<_>>().join("\n"),
        dockwall.log()
    );
    (answer.len(), took)
}

fn main() {
    // SAFETY: single-threaded here; the harness reads it when it builds the binaries.
    unsafe { std::env::set_var("DOCKNFV_PROFILE", "release") };
    require_command("nft", "nftables");

    let chain = Chain::new();
    let mut dockwall = Dockwall::idle(&chain.si, StateDir::new());
    std::fs::create_dir_all(dockwall.state.path()).expect("state dir");
    let empty = run_with_metrics(&dockwall);
    let rss_without_rules = rss_kib(empty.pid());
    dockwall.process = Some(empty);

    let file = dockwall.state.path().join("10k.json");
    std::fs::write(&file, deny_rule_set_json(RULES, "accept")).expect("write the rule set");
    dockwall.ok(&["apply", file.to_str().expect("utf-8 path")]);
    dockwall.stop();
    // A restart reads the 10,000 rules from the state directory, as after a container restart.
    let loaded = run_with_metrics(&dockwall);
    let rss_with_rules = rss_kib(loaded.pid());

    let (bytes, first) = checked_scrape(&chain.si, &loaded);
    let rss_after_first = rss_kib(loaded.pid());
    let mut times: Vec<f64> = (0..SCRAPES)
        .map(|_| checked_scrape(&chain.si, &loaded).1.as_secs_f64() * 1000.0)
        .collect();
    let rss_after_scrapes = rss_kib(loaded.pid());
    let spread = spread(&times, 1);
    let median_ms = median(&mut times);

    println!("| measure | value |");
    println!("|---|---|");
    println!(
        "| first `/metrics` scrape with {RULES} rules (connect → last byte, from inside the SI) | {:.1} ms ({:.0} KiB) |",
        first.as_secs_f64() * 1000.0,
        bytes as f64 / 1024.0
    );
    println!("| following scrapes, median of {SCRAPES} | {median_ms:.1} ms (spread {spread}) |");
    println!("| RSS of `dockwall run --metrics-listen`, no rules | {rss_without_rules} KiB |");
    println!(
        "| same after a restart that loads the {RULES} rules | {rss_with_rules} KiB (+{} KiB) |",
        rss_with_rules.saturating_sub(rss_without_rules)
    );
    println!(
        "| same after the first scrape | {rss_after_first} KiB (+{} KiB over loaded) |",
        rss_after_first.saturating_sub(rss_with_rules)
    );
    println!(
        "| same after all {} scrapes | {rss_after_scrapes} KiB (+{} KiB over loaded) |",
        SCRAPES + 1,
        rss_after_scrapes.saturating_sub(rss_with_rules)
    );
}

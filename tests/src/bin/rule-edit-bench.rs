//! The cost of one rule-set edit as the rule set grows, for BENCHMARKS.md (run with
//! `cargo xtask bench`, or alone: `cargo run --release -p docknfv-tests --bin rule-edit-bench
//! [RULES]`).
//! With 10,000 and 100,000 rules present, under a running `dockwall run` in a namespace chain:
//! - `dockwall rule add` as a whole process (what `docker exec … dockwall rule add` costs),
//!   median, and its peak RSS (`/usr/bin/time`);
//! - `dockwall apply` of the whole rule set (a full table replace), median, and its peak RSS;
//! - `dockwall status`, which now checks the kernel's table by content, median;
//! - an add in process through `vnf_core::firewall::Session` (what the daemon's API calls):
//!   the first (loads and compiles the old rule set) and the median of the next ones (cached).

use std::process::Output;
use std::time::Instant;

use docknfv_tests::dockwall::{deny_rule_set_json, Dockwall};
use docknfv_tests::measure::median;
use docknfv_tests::prereq::require_command;
use docknfv_tests::Chain;
use vnf_core::firewall::store::Store;
use vnf_core::firewall::{Rule, Session};

const SIZES: [usize; 2] = [10_000, 100_000];
const RULE_ADDS: usize = 10;
const APPLIES: usize = 3;
const STATUSES: usize = 5;
const SESSION_ADDS: usize = 10;

/// Runs `dockwall ARGS` under `/usr/bin/time`: (wall ms, peak RSS KiB).
fn timed(dockwall: &Dockwall, args: &[&str]) -> (f64, u64) {
    let mut command = dockwall.si.command("/usr/bin/time");
    command.arg("-f").arg("peak-rss-kib %M");
    let inner = dockwall.command(args);
    command.arg(inner.get_program()).args(inner.get_args());
    let started = Instant::now();
    let output: Output = command.output().expect("run /usr/bin/time dockwall");
    let elapsed = started.elapsed().as_secs_f64() * 1000.0;
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "dockwall {args:?} failed: {stderr}"
    );
    let rss = stderr
        .lines()
        .find_map(|line| line.strip_prefix("peak-rss-kib "))
        .and_then(|kib| kib.trim().parse().ok())
        .expect("peak RSS from /usr/bin/time");
    (elapsed, rss)
}

fn medians(samples: &[(f64, u64)]) -> (f64, u64) {
    let mut times: Vec<f64> = samples.iter().map(|s| s.0).collect();
    let peak = samples.iter().map(|s| s.1).max().unwrap_or(0);
    (median(&mut times), peak)
}

/// Adds through one `Session` inside the SI, as the daemon would: (first add ms, next adds ms).
fn session_adds(dockwall: &Dockwall) -> (f64, Vec<f64>) {
    let state = dockwall.state.path();
    let assignment = dockwall.assignment();
    dockwall.si.run(|| {
        let store = Store::new(state);
        let mut session = Session::default();
        let mut times: Vec<f64> = (0..=SESSION_ADDS)
            .map(|i| {
                let started = Instant::now();
                session
                    .edit(&store, &assignment, false, |set| {
                        let rule: Rule = serde_json::from_value(serde_json::json!({
                            "id": set.allocate_id(), "action": "deny", "direction": "both",
                            "protocol": "tcp", "source": format!("10.201.0.{}/32", i + 1),
                            "destination_port": "22"}))
                        .expect("a rule");
                        set.rules.push(rule);
                        Ok(())
                    })
                    .expect("session edit");
                started.elapsed().as_secs_f64() * 1000.0
            })
            .collect();
        let first = times.remove(0);
        (first, times)
    })
}

fn main() {
    // SAFETY: single-threaded here; the harness reads it when it builds the binaries.
    unsafe { std::env::set_var("DOCKNFV_PROFILE", "release") };
    require_command("time", "time");
    let sizes: Vec<usize> = match std::env::args().nth(1) {
        Some(size) => vec![size.parse().expect("a rule count")],
        None => SIZES.to_vec(),
    };
    println!("| rules | measure | median | peak RSS |");
    println!("|---|---|---|---|");
    for rules in sizes {
        let chain = Chain::new();
        let dockwall = Dockwall::start(&chain);
        std::fs::create_dir_all(dockwall.state.path()).expect("state dir");
        // Alternating the default policy makes every apply a full table replace.
        let files: Vec<String> = ["accept", "drop"]
            .iter()
            .map(|policy| {
                let file = dockwall.state.path().join(format!("{rules}-{policy}.json"));
                std::fs::write(&file, deny_rule_set_json(rules, policy)).expect("write rules");
                file.to_str().expect("utf-8").to_string()
            })
            .collect();
        let applies: Vec<_> = (0..APPLIES)
            .map(|i| timed(&dockwall, &["apply", &files[(i + 1) % 2]]))
            .collect();
        let adds: Vec<_> = (0..RULE_ADDS)
            .map(|i| {
                let source = format!("10.200.0.{}", i + 1);
                timed(
                    &dockwall,
                    &[
                        "rule", "add", "deny", "--proto", "tcp", "--from", &source, "--dport", "22",
                    ],
                )
            })
            .collect();
        let statuses: Vec<_> = (0..STATUSES)
            .map(|_| timed(&dockwall, &["status"]))
            .collect();
        // Where one add spends its time, from its own debug log.
        let stages = dockwall
            .command(&["rule", "add", "deny", "--proto", "udp", "--dport", "9"])
            .env("RUST_LOG", "vnf_core::firewall=debug")
            .output()
            .expect("dockwall rule add");
        eprintln!(
            "stages of one add with {rules} rules:\n{}",
            String::from_utf8_lossy(&stages.stderr)
        );
        let (first, mut next) = session_adds(&dockwall);
        println!("| {rules} | in-process add through `Session`, first (loads, compiles the old set) | {first:.0} ms | |");
        println!("| {rules} | in-process add through `Session`, median of the next {SESSION_ADDS} (cached) | {:.1} ms | |", median(&mut next));
        for (label, samples) in [
            (
                format!("`dockwall apply` (full replace), median of {APPLIES}"),
                &applies,
            ),
            (
                format!("`dockwall rule add` (whole process), median of {RULE_ADDS}"),
                &adds,
            ),
            (
                format!("`dockwall status` (checks the table's content), median of {STATUSES}"),
                &statuses,
            ),
        ] {
            let (time, rss) = medians(samples);
            println!(
                "| {rules} | {label} | {time:.0} ms | {:.1} MiB |",
                rss as f64 / 1024.0
            );
        }
    }
}

//! Dockwall's REST API for BENCHMARKS.md (run with `cargo xtask bench`), 10,000 rules present:
//! - adding a rule over the API (one HTTP request: connect, POST, the edit, the reply) vs
//!   `dockwall rule add` (the whole process via `ip netns exec`), interleaved, the order
//!   alternating every round, medians with their spread;
//! - the web page: its size and the time to fetch it, and the status document it loads and
//!   polls (every rule with its counters).

use std::time::Instant;

use docknfv_tests::dockwall::deny_rule_set_json;
use docknfv_tests::dockwall_api::{call, start_with_api, token, Reply};
use docknfv_tests::measure::{median, round_order, spread};
use docknfv_tests::Chain;

const RULES: usize = 10_000;
const ROUNDS: usize = 20;
const FETCHES: usize = 20;

fn timed<T>(work: impl FnOnce() -> T) -> (f64, T) {
    let started = Instant::now();
    let value = work();
    (started.elapsed().as_secs_f64() * 1000.0, value)
}

/// "median ms (min–max)"; also returns the median.
fn median_and_spread(values: &mut [f64]) -> (f64, String) {
    let median = median(values);
    (median, format!("{median:.1} ms ({})", spread(values, 1)))
}

fn main() {
    // SAFETY: single-threaded here; the harness reads it when it builds the binaries.
    unsafe { std::env::set_var("DOCKNFV_PROFILE", "release") };
    let chain = Chain::new();
    let dockwall = start_with_api(&chain);
    let token = token(&dockwall);
    let file = dockwall.state.path().join("10k.json");
    std::fs::write(&file, deny_rule_set_json(RULES, "accept")).expect("write rule set");
    dockwall.ok(&["apply", file.to_str().expect("utf-8")]);

    let (mut api, mut cli) = (Vec::new(), Vec::new());
    for round in 0..ROUNDS {
        for contender in round_order(round, 2) {
            let source = format!("10.201.{}.{}/32", round, contender + 1);
            if contender == 0 {
                let body = format!(
                    r#"{{"firewall_rule": {{"action": "deny", "protocol": "tcp", "source_ip_address": "{source}", "destination_port": "22"}}}}"#
                );
                let (ms, reply): (f64, Reply) = timed(|| {
                    call(
                        &chain.si,
                        Some(&token),
                        "POST",
                        "/v2.0/fwaas/firewall_rules",
                        Some(&body),
                    )
                });
                assert_eq!(reply.status, 201, "{reply:?}");
                api.push(ms);
            } else {
                let args = [
                    "rule", "add", "deny", "--proto", "tcp", "--from", &source, "--dport", "22",
                ];
                cli.push(timed(|| dockwall.ok(&args)).0);
            }
        }
    }
    let (mut page_ms, mut status_ms) = (Vec::new(), Vec::new());
    let (mut page_bytes, mut status_bytes) = (0, 0);
    for _ in 0..FETCHES {
        let (ms, page) = timed(|| call(&chain.si, Some(&token), "GET", "/", None));
        assert_eq!(page.status, 200);
        page_ms.push(ms);
        page_bytes = page.body.len();
        let (ms, status) = timed(|| {
            call(
                &chain.si,
                Some(&token),
                "GET",
                "/v2.0/dockwall/status",
                None,
            )
        });
        assert_eq!(status.status, 200);
        status_ms.push(ms);
        status_bytes = status.body.len();
    }
    let (api_median, api_spread) = median_and_spread(&mut api);
    let (cli_median, cli_spread) = median_and_spread(&mut cli);
    println!("| measure ({RULES} rules present) | value |");
    println!("|---|---|");
    println!("| API rule add (one HTTP request), median of {ROUNDS} (min–max) | {api_spread} |");
    println!("| `dockwall rule add` (whole process), interleaved | {cli_spread} |");
    println!(
        "| **ratio API / CLI** | **{:.2}** |",
        api_median / cli_median
    );
    println!("| web page: size | {page_bytes} bytes |");
    println!(
        "| web page: fetch, median of {FETCHES} (min–max) | {} |",
        median_and_spread(&mut page_ms).1
    );
    println!("| status document the page loads and polls: size | {status_bytes} bytes |");
    println!(
        "| status document: fetch, median of {FETCHES} (min–max) | {} |",
        median_and_spread(&mut status_ms).1
    );
}

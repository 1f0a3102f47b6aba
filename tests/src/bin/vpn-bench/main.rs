//! Dockvpn benchmark for BENCHMARKS.md (run with `cargo xtask bench`): connect time (client
//! start → "Initialization Sequence Completed") of the stock openvpn 2.6 client against
//! Dockvpn and against an `openvpn` 2.6 server with the equivalent config (same PKI, pool
//! size, pushed route, ciphers, keepalive), interleaved in one run (alternating which goes
//! first), with tls-crypt-v2 on both; then iperf3 through each tunnel over UDP and over TCP
//! (an `openvpn` server serves one protocol per process, so a second one serves TCP), with
//! each server's CPU seconds per GB carried, interleaved; each server's RSS; then the
//! throughput dip while the client renegotiates its data keys every few seconds under load.
//! Before all that, the WireGuard rows (`wireguard.rs`); after it, the data-path rows of
//! issue 18 (`datapath.rs`). `vpn-bench openvpn`, `vpn-bench wireguard` or `vpn-bench
//! datapath` runs one part.

use std::time::{Duration, Instant};

use docknfv_tests::chain::{LEFT_HOST, SI_LEFT};
use docknfv_tests::measure::{
    cpu_seconds, iperf_interval_bytes, iperf_tcp_report, median, min_max, round_order, rss_kib,
};
use docknfv_tests::openvpn::{issue_profile_with, text, vpn_chain, OpenvpnClient, CONNECTED};
use docknfv_tests::traffic::ping;
use docknfv_tests::{Chain, Vnf};

mod datapath;
mod wireguard;

const ROUNDS: usize = 5;
pub const OPENVPN_PORT: u16 = 1195;
const OPENVPN_TCP_PORT: u16 = 1196;
/// Transfers through each tunnel per protocol, and how long each lasts.
pub const TRANSFER_ROUNDS: usize = 3;
pub const TRANSFER_SECONDS: &str = "5";
/// The client's reneg-sec in the renegotiation row, and how long its stream runs.
const RENEG_SEC: &str = "5";
const RENEG_STREAM_SECONDS: &str = "30";

/// A full-speed iperf3 stream through the tunnel while the client renegotiates every
/// RENEG_SEC: the key changes the client logged, and the lowest and the median 1 s interval.
struct RenegotiationDip {
    renegotiations: usize,
    min_mbps: f64,
    median_mbps: f64,
}

fn renegotiation_dip(chain: &Chain, profile: &str) -> RenegotiationDip {
    let client = OpenvpnClient::start(&chain.right_host, profile, &["--reneg-sec", RENEG_SEC]);
    client.wait_connected().unwrap_or_else(|e| panic!("{e}"));
    let report = iperf_tcp_report(
        &chain.right_host,
        &chain.left_host,
        LEFT_HOST,
        &["-t", RENEG_STREAM_SECONDS],
    );
    let mut mbps: Vec<f64> = iperf_interval_bytes(&report)
        .into_iter()
        .map(|bytes| bytes as f64 * 8.0 / 1e6)
        .collect();
    let renegotiations = client.log().matches("TLS: soft reset").count();
    assert!(
        client.log().matches(CONNECTED).count() == 1,
        "the client reconnected:\n{}",
        client.log()
    );
    drop(client);
    std::thread::sleep(Duration::from_millis(300));
    RenegotiationDip {
        renegotiations,
        min_mbps: min_max(&mbps).0,
        median_mbps: median(&mut mbps),
    }
}

/// One iperf3 TCP stream through the tunnel of `profile`: Gbit/s, and the CPU seconds the
/// server process `server_pid` spent per GB carried.
fn transfer(chain: &Chain, profile: &str, server_pid: u32) -> (f64, f64) {
    let client = OpenvpnClient::start(&chain.right_host, profile, &[]);
    client.wait_connected().unwrap_or_else(|e| panic!("{e}"));
    let carried = tunnel_transfer(chain, server_pid);
    drop(client);
    std::thread::sleep(Duration::from_millis(300));
    carried
}

/// One iperf3 TCP stream (right host → left host) through the tunnel a connected client
/// holds: Gbit/s, and the CPU seconds the server process `server_pid` spent per GB carried.
pub fn tunnel_transfer(chain: &Chain, server_pid: u32) -> (f64, f64) {
    let cpu_before = cpu_seconds(server_pid);
    let report = iperf_tcp_report(
        &chain.right_host,
        &chain.left_host,
        LEFT_HOST,
        &["-t", TRANSFER_SECONDS],
    );
    let cpu = cpu_seconds(server_pid) - cpu_before;
    let received = &report["end"]["sum_received"];
    let gigabytes = received["bytes"].as_f64().expect("bytes") / 1e9;
    let gbps = received["bits_per_second"]
        .as_f64()
        .expect("bits_per_second")
        / 1e9;
    (gbps, cpu / gigabytes)
}

/// An `openvpn` 2.6 server in the SI with Dockvpn's PKI and the equivalent config.
pub fn start_openvpn_server(
    chain: &Chain,
    pki: &std::path::Path,
    proto: &str,
    port: u16,
    n: u8,
) -> Vnf {
    let server_config = format!(
        "dev ovpn{n}\ndev-type tun\nproto {proto}\nport {port}\nserver 10.{pool}.0.0 255.255.255.0\n\
         topology subnet\nca {pki}/ca.crt\ncert {pki}/server.crt\nkey {pki}/server.key\ndh none\n\
         tls-crypt-v2 {pki}/tls-crypt-v2-server.key\nkeepalive 10 60\n\
         data-ciphers AES-256-GCM:AES-128-GCM:CHACHA20-POLY1305\n\
         push \"route 192.168.10.0 255.255.255.0\"\nverb 3\n",
        pool = 9 + n,
        pki = pki.display()
    );
    let config_path =
        std::env::temp_dir().join(format!("vpn-bench-{}-{n}.conf", std::process::id()));
    std::fs::write(&config_path, server_config).expect("write server config");
    // It does not masquerade: the left gateway routes its pool back.
    // `replace`: the datapath part starts one again after the openvpn part's.
    chain.left_gateway.ip(&[
        "route",
        "replace",
        &format!("10.{}.0.0/24", 9 + n),
        "via",
        SI_LEFT,
    ]);
    let mut command = chain.si.command("openvpn");
    command
        .arg("--config")
        .arg(&config_path)
        .args(["--log-append", "/dev/stderr"]);
    let server = Vnf::spawn(command);
    server
        .wait_for_log(CONNECTED, Duration::from_secs(10))
        .unwrap_or_else(|e| panic!("openvpn server: {e}"));
    let _ = std::fs::remove_file(&config_path);
    server
}

fn connect_ms(chain: &Chain, profile: &str) -> (f64, OpenvpnClient) {
    let started = Instant::now();
    let client = OpenvpnClient::start(&chain.right_host, profile, &[]);
    client.wait_connected().unwrap_or_else(|e| panic!("{e}"));
    (started.elapsed().as_secs_f64() * 1000.0, client)
}

fn main() {
    let part = std::env::args().nth(1);
    let (openvpn, wireguard, datapath) = match part.as_deref() {
        None => (true, true, true),
        Some("openvpn") => (true, false, false),
        Some("wireguard") => (false, true, false),
        Some("datapath") => (false, false, true),
        Some(other) => {
            panic!("unknown part {other:?}: vpn-bench [openvpn|wireguard|datapath] (default all)")
        }
    };
    // SAFETY: single-threaded here; the harness reads it when it builds the binaries.
    unsafe { std::env::set_var("DOCKNFV_PROFILE", "release") };
    let (chain, mut dockvpn) = vpn_chain(&[]);
    // First, so its idle RSS row meets a server that has carried nothing yet.
    if wireguard {
        wireguard::rows(&chain, &dockvpn);
    }
    if openvpn {
        openvpn_rows(&chain, &dockvpn);
    }
    if datapath {
        // It restarts Dockvpn with other flags on its own state directory, on the same ports.
        dockvpn.terminate();
        datapath::rows(&chain);
    }
}

/// Dockvpn's OpenVPN transport against `openvpn` servers in the SI.
fn openvpn_rows(chain: &Chain, dockvpn: &Vnf) {
    let dockvpn_profile = issue_profile_with(&chain.si, dockvpn, "bench", &["--proto", "udp"]);
    let tcp_config = ["client", "config", "bench", "--proto", "tcp"];
    let output = dockvpn.cli(&chain.si, "dockvpn", &tcp_config);
    assert!(output.status.success(), "{}", text(&output));
    let dockvpn_tcp_profile = String::from_utf8(output.stdout).expect("utf-8 profile");
    let openvpn_profile = dockvpn_profile.replace(
        "remote 10.0.2.2 1194",
        &format!("remote 10.0.2.2 {OPENVPN_PORT}"),
    );
    let openvpn_tcp_profile = dockvpn_tcp_profile.replace(
        "remote 10.0.2.2 1194",
        &format!("remote 10.0.2.2 {OPENVPN_TCP_PORT}"),
    );
    let pki = dockvpn.state_dir().join("pki");
    let openvpn_server = start_openvpn_server(chain, &pki, "udp", OPENVPN_PORT, 0);
    let openvpn_tcp_server = start_openvpn_server(chain, &pki, "tcp-server", OPENVPN_TCP_PORT, 1);

    let profiles = [&dockvpn_profile, &openvpn_profile];
    let mut samples = [Vec::new(), Vec::new()];
    for round in 0..ROUNDS {
        for server in round_order(round, profiles.len()) {
            let (ms, client) = connect_ms(chain, profiles[server]);
            assert!(
                ping(&chain.right_host, LEFT_HOST),
                "round {round}: no traffic through the tunnel"
            );
            samples[server].push(ms);
            drop(client);
            std::thread::sleep(Duration::from_millis(300));
        }
    }
    let [mut dockvpn_ms, mut openvpn_ms] = samples;
    // Dockvpn UDP, openvpn UDP, Dockvpn TCP, openvpn TCP.
    let contenders = [
        (&dockvpn_profile, dockvpn.pid()),
        (&openvpn_profile, openvpn_server.pid()),
        (&dockvpn_tcp_profile, dockvpn.pid()),
        (&openvpn_tcp_profile, openvpn_tcp_server.pid()),
    ];
    let mut transfers: [Vec<(f64, f64)>; 4] = Default::default();
    for round in 0..TRANSFER_ROUNDS {
        for k in round_order(round, contenders.len()) {
            let (profile, pid) = contenders[k];
            transfers[k].push(transfer(chain, profile, pid));
        }
    }
    let (dockvpn_rss, openvpn_rss) = (rss_kib(dockvpn.pid()), rss_kib(openvpn_server.pid()));
    let (dockvpn_dip, openvpn_dip) = (
        renegotiation_dip(chain, &dockvpn_profile),
        renegotiation_dip(chain, &openvpn_profile),
    );

    println!("VPN benchmark ({ROUNDS} connects each, interleaved, tls-crypt-v2)");
    println!("                         Dockvpn    openvpn server");
    println!(
        "connect time median ms   {:>7.0}    {:>7.0}",
        median(&mut dockvpn_ms),
        median(&mut openvpn_ms)
    );
    println!("connect times ms         {dockvpn_ms:.0?}    {openvpn_ms:.0?}");
    println!(
        "iperf3 through the tunnel: {TRANSFER_ROUNDS} runs of {TRANSFER_SECONDS} s per protocol and server, interleaved; median (min-max)"
    );
    for (proto, dockvpn_k, openvpn_k) in [("UDP", 0, 1), ("TCP", 2, 3)] {
        let column = |k: usize, pick: fn(&(f64, f64)) -> f64| {
            let mut values: Vec<f64> = transfers[k].iter().map(pick).collect();
            let (min, max) = min_max(&values);
            format!("{:.2} ({min:.2}-{max:.2})", median(&mut values))
        };
        println!(
            "{proto} Gbit/s              {:>18}    {:>18}",
            column(dockvpn_k, |t| t.0),
            column(openvpn_k, |t| t.0)
        );
        println!(
            "{proto} server CPU s/GB     {:>18}    {:>18}",
            column(dockvpn_k, |t| t.1),
            column(openvpn_k, |t| t.1)
        );
    }
    println!(
        "server RSS MiB           {:>7.1}    {:>7.1}",
        dockvpn_rss as f64 / 1024.0,
        openvpn_rss as f64 / 1024.0
    );
    println!(
        "renegotiation under load: client reneg-sec {RENEG_SEC}, one {RENEG_STREAM_SECONDS} s iperf3 TCP run each, 1 s intervals"
    );
    println!(
        "soft resets (client log)  {:>7}    {:>7}",
        dockvpn_dip.renegotiations, openvpn_dip.renegotiations
    );
    println!(
        "lowest interval Mbit/s    {:>7.0}    {:>7.0}",
        dockvpn_dip.min_mbps, openvpn_dip.min_mbps
    );
    println!(
        "median interval Mbit/s    {:>7.0}    {:>7.0}",
        dockvpn_dip.median_mbps, openvpn_dip.median_mbps
    );
    println!(
        "lowest / median           {:>7.2}    {:>7.2}",
        dockvpn_dip.min_mbps / dockvpn_dip.median_mbps,
        openvpn_dip.min_mbps / openvpn_dip.median_mbps
    );
}

//! Dockvpn benchmark for BENCHMARKS.md (run with `cargo xtask bench`): connect time (client
//! start → "Initialization Sequence Completed") of the stock openvpn 2.6 client against
//! Dockvpn and against an `openvpn` 2.6 server with the equivalent config (same PKI, pool
//! size, pushed route, ciphers, keepalive), interleaved in one run (alternating which goes
//! first); then one iperf3 TCP run through each tunnel and each server's idle RSS; then the
//! throughput dip while the client renegotiates its data keys every few seconds under load.

use std::time::{Duration, Instant};

use docknfv_tests::chain::{LEFT_HOST, SI_LEFT};
use docknfv_tests::measure::{
    iperf_interval_bytes, iperf_tcp_gbps, iperf_tcp_report, median, min_max, round_order, rss_kib,
};
use docknfv_tests::openvpn::{issue_profile, vpn_chain, OpenvpnClient, CONNECTED};
use docknfv_tests::traffic::ping;
use docknfv_tests::{Chain, Vnf};

const ROUNDS: usize = 5;
const OPENVPN_PORT: u16 = 1195;
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

fn connect_ms(chain: &Chain, profile: &str) -> (f64, OpenvpnClient) {
    let started = Instant::now();
    let client = OpenvpnClient::start(&chain.right_host, profile, &[]);
    client.wait_connected().unwrap_or_else(|e| panic!("{e}"));
    (started.elapsed().as_secs_f64() * 1000.0, client)
}

fn main() {
    // SAFETY: single-threaded here; the harness reads it when it builds the binaries.
    unsafe { std::env::set_var("DOCKNFV_PROFILE", "release") };
    let (chain, dockvpn) = vpn_chain(&[]);
    // The openvpn server does not masquerade: the left gateway routes its pool back.
    chain
        .left_gateway
        .ip(&["route", "add", "10.9.0.0/24", "via", SI_LEFT]);
    let dockvpn_profile = issue_profile(&chain.si, &dockvpn, "bench", None);
    let openvpn_profile = dockvpn_profile.replace(
        "remote 10.0.2.2 1194",
        &format!("remote 10.0.2.2 {OPENVPN_PORT}"),
    );

    let pki = dockvpn.state_dir().join("pki");
    let server_config = format!(
        "dev ovpn0\ndev-type tun\nproto udp\nport {OPENVPN_PORT}\nserver 10.9.0.0 255.255.255.0\n\
         topology subnet\nca {pki}/ca.crt\ncert {pki}/server.crt\nkey {pki}/server.key\ndh none\n\
         tls-crypt-v2 {pki}/tls-crypt-v2-server.key\nkeepalive 10 60\n\
         data-ciphers AES-256-GCM:AES-128-GCM:CHACHA20-POLY1305\n\
         push \"route 192.168.10.0 255.255.255.0\"\nverb 3\n",
        pki = pki.display()
    );
    let config_path = std::env::temp_dir().join(format!("vpn-bench-{}.conf", std::process::id()));
    std::fs::write(&config_path, server_config).expect("write server config");
    let mut command = chain.si.command("openvpn");
    command
        .arg("--config")
        .arg(&config_path)
        .args(["--log-append", "/dev/stderr"]);
    let openvpn_server = Vnf::spawn(command);
    openvpn_server
        .wait_for_log(CONNECTED, Duration::from_secs(10))
        .unwrap_or_else(|e| panic!("openvpn server: {e}"));

    let profiles = [&dockvpn_profile, &openvpn_profile];
    let mut samples = [Vec::new(), Vec::new()];
    for round in 0..ROUNDS {
        for server in round_order(round, profiles.len()) {
            let (ms, client) = connect_ms(&chain, profiles[server]);
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
    let gbps = |profile: &str| {
        let (_, client) = connect_ms(&chain, profile);
        let gbps = iperf_tcp_gbps(&chain.right_host, &chain.left_host, LEFT_HOST, "3");
        drop(client);
        std::thread::sleep(Duration::from_millis(300));
        gbps
    };
    let (dockvpn_gbps, openvpn_gbps) = (gbps(&dockvpn_profile), gbps(&openvpn_profile));
    let (dockvpn_rss, openvpn_rss) = (rss_kib(dockvpn.pid()), rss_kib(openvpn_server.pid()));
    let (dockvpn_dip, openvpn_dip) = (
        renegotiation_dip(&chain, &dockvpn_profile),
        renegotiation_dip(&chain, &openvpn_profile),
    );
    let _ = std::fs::remove_file(&config_path);

    println!(
        "VPN benchmark ({ROUNDS} connects each, interleaved; then one 3 s iperf3 TCP run each)"
    );
    println!("                         Dockvpn    openvpn server");
    println!(
        "connect time median ms   {:>7.0}    {:>7.0}",
        median(&mut dockvpn_ms),
        median(&mut openvpn_ms)
    );
    println!("connect times ms         {dockvpn_ms:.0?}    {openvpn_ms:.0?}");
    println!("iperf3 TCP Gbit/s        {dockvpn_gbps:>7.2}    {openvpn_gbps:>7.2}");
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

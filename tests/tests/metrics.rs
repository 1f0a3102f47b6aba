//! `--metrics-listen`: `/metrics` of both binaries read by Debian's `promtool`, counters that
//! follow real traffic, `/healthz` following `status`, and bad HTTP answered with errors.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream, UdpSocket};
use std::time::{Duration, Instant};

use docknfv_tests::chain::{RIGHT_HOST, SI_RIGHT};
use docknfv_tests::dnsmasq::Dnsmasq;
use docknfv_tests::dockwall::{Dockwall, StateDir};
use docknfv_tests::netns::{output_with_stdin, Netns};
use docknfv_tests::openvpn::{issue_profile, vpn_chain, OpenvpnClient};
use docknfv_tests::prereq::require_command;
use docknfv_tests::{Chain, Vnf};

const METRICS: &str = "127.0.0.1:9100";

/// Sends `request` as is to the SI's metrics address and returns the whole answer ("" when
/// nothing listens yet).
fn exchange(si: &Netns, request: &[u8]) -> String {
    let address: SocketAddr = METRICS.parse().expect("metrics address");
    si.run(|| {
        let Ok(mut stream) = TcpStream::connect_timeout(&address, Duration::from_secs(2)) else {
            return String::new();
        };
        let _ = stream.set_read_timeout(Some(Duration::from_secs(10)));
        let _ = stream.write_all(request);
        let mut answer = Vec::new();
        let _ = stream.read_to_end(&mut answer);
        String::from_utf8_lossy(&answer).into_owned()
    })
}

fn get(si: &Netns, path: &str) -> String {
    exchange(
        si,
        format!("GET {path} HTTP/1.1\r\nHost: si\r\n\r\n").as_bytes(),
    )
}

/// GET `path` until `ready` holds for the answer (up to 20 s).
fn get_until(si: &Netns, path: &str, what: &str, ready: impl Fn(&str) -> bool) -> String {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let answer = get(si, path);
        if ready(&answer) {
            return answer;
        }
        assert!(
            Instant::now() < deadline,
            "GET {path} never showed {what} within 20 s; last answer:\n{answer}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn body(answer: &str) -> &str {
    answer.split_once("\r\n\r\n").map_or("", |(_, body)| body)
}

/// The value of the sample `series` (name and labels exactly as exposed).
fn sample(metrics: &str, series: &str) -> Option<f64> {
    body(metrics).lines().find_map(|line| {
        let value = line.strip_prefix(series)?.strip_prefix(' ')?;
        value.parse().ok()
    })
}

fn promtool_check(metrics: &str) {
    require_command("promtool", "prometheus");
    let output = output_with_stdin(
        std::process::Command::new("promtool").args(["check", "metrics"]),
        body(metrics),
    );
    assert!(
        output.status.success(),
        "promtool check metrics failed:\n{}{}\nexposition:\n{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr),
        body(metrics)
    );
}

/// `dockwall run --metrics-listen METRICS` in the chain's SI, not waiting for the sides.
fn launch_dockwall(chain: &Chain) -> Dockwall<'_> {
    Dockwall::launch_in(&chain.si, StateDir::new(), &["--metrics-listen", METRICS])
}

#[test]
fn dockwall_metrics_pass_promtool_and_a_deny_rule_counts_exactly_the_packets_sent() {
    let chain = Chain::new();
    let mut dockwall = launch_dockwall(&chain);
    dockwall.wait_ready();
    dockwall.ok(&[
        "rule",
        "add",
        "deny",
        "--direction",
        "left-to-right",
        "--proto",
        "icmp",
        "--to",
        RIGHT_HOST,
    ]);
    let series =
        r#"dockwall_rule_packets_total{rule_id="1",action="deny",direction="left_to_right"}"#;
    let before = get_until(&chain.si, "/metrics", "the deny rule", |m| {
        sample(m, series).is_some()
    });
    assert_eq!(sample(&before, series), Some(0.0), "{before}");
    assert_eq!(
        sample(&before, r#"dockwall_rules{action="deny"}"#),
        Some(1.0),
        "{before}"
    );
    assert_eq!(
        sample(&before, "dockwall_edits_total"),
        Some(1.0),
        "{before}"
    );
    let refused = dockwall.cli(&["rule", "delete", "99"]);
    assert!(!refused.status.success(), "deleting rule 99 of 1 must fail");
    let counted = get(&chain.si, "/metrics");
    assert_eq!(
        sample(&counted, "dockwall_failed_edits_total"),
        Some(1.0),
        "{counted}"
    );

    const SENT: u32 = 3;
    let ping = chain.left_host.exec(
        "ping",
        &["-c", &SENT.to_string(), "-i", "0.2", "-W", "1", RIGHT_HOST],
    );
    assert!(
        !ping.status.success(),
        "the deny rule must drop the pings:\n{}",
        String::from_utf8_lossy(&ping.stdout)
    );
    let after = get(&chain.si, "/metrics");
    assert_eq!(sample(&after, series), Some(f64::from(SENT)), "{after}");
    assert!(
        sample(&after, "vnf_reconciles_total").is_some_and(|n| n >= 1.0),
        "{after}"
    );
    assert_eq!(
        sample(&after, r#"vnf_side_ready{side="right"}"#),
        Some(1.0),
        "{after}"
    );
    promtool_check(&after);
    dockwall.stop();
}

#[test]
fn healthz_answers_503_with_the_reason_until_the_sides_are_ready_then_200() {
    let chain = Chain::without_right();
    let mut dockwall = launch_dockwall(&chain);
    let waiting = get_until(&chain.si, "/healthz", "an answer", |a| !a.is_empty());
    assert!(
        waiting.starts_with("HTTP/1.1 503"),
        "healthz before the right side exists:\n{waiting}"
    );
    assert!(
        body(&waiting).contains("right side not ready"),
        "the 503 names what is missing:\n{waiting}"
    );
    chain.attach_right();
    dockwall.wait_ready();
    get_until(&chain.si, "/healthz", "200", |a| {
        a.starts_with("HTTP/1.1 200")
    });
    dockwall.stop();
}

#[test]
fn bad_http_requests_get_errors_and_the_server_keeps_serving() {
    let chain = Chain::new();
    let mut dockwall = launch_dockwall(&chain);
    dockwall.wait_ready();
    get_until(&chain.si, "/metrics", "an answer", |a| !a.is_empty());
    let huge = format!(
        "GET /metrics HTTP/1.1\r\nX-Padding: {}\r\n\r\n",
        "a".repeat(64 * 1024)
    );
    for (request, expected) in [
        (b"\x16\x03\x01garbage\r\n\r\n".to_vec(), "400"),
        (b"GET\r\n\r\n".to_vec(), "400"),
        (huge.into_bytes(), "431"),
        (b"POST /metrics HTTP/1.1\r\n\r\n".to_vec(), "405"),
        (b"GET /secrets HTTP/1.1\r\n\r\n".to_vec(), "404"),
        // Headers that never end: answered once the request time is up.
        (b"GET /metrics HTTP/1.1\r\nHost: si\r\n".to_vec(), "408"),
    ] {
        let answer = exchange(&chain.si, &request);
        assert!(
            answer.starts_with(&format!("HTTP/1.1 {expected} ")),
            "{:?} must get {expected}, got:\n{answer}",
            String::from_utf8_lossy(&request[..request.len().min(40)])
        );
    }
    // Prometheus asks for OpenMetrics; tools that do not get the plain text format.
    let still = exchange(
        &chain.si,
        b"GET /metrics HTTP/1.1\r\nAccept: application/openmetrics-text;version=1.0.0,text/plain;version=0.0.4;q=0.5\r\n\r\n",
    );
    assert!(
        still.starts_with("HTTP/1.1 200")
            && still.contains("Content-Type: application/openmetrics-text")
            && body(&still).ends_with("# EOF\n"),
        "the server keeps serving after bad requests:\n{still}"
    );
    let process = dockwall.process.as_ref().expect("dockwall runs");
    assert!(
        !process.log().contains("panicked"),
        "no panic on bad input:\n{}",
        process.log()
    );
    dockwall.stop();
}

#[test]
fn dockvpn_metrics_pass_promtool_count_a_connected_client_and_drops_of_garbage() {
    let (chain, dockvpn) = vpn_chain(&["--metrics-listen", METRICS]);
    let client = OpenvpnClient::start(
        &chain.right_host,
        &issue_profile(&chain.si, &dockvpn, "alice", None),
        &[],
    );
    client.assert_connected(&dockvpn);
    let connected = r#"dockvpn_clients_connected{transport="openvpn"}"#;
    let metrics = get_until(&chain.si, "/metrics", "alice connected", |m| {
        sample(m, connected) == Some(1.0)
    });
    assert_eq!(
        sample(
            &metrics,
            r#"dockvpn_clients_connected{transport="wireguard"}"#
        ),
        Some(0.0),
        "{metrics}"
    );
    assert_eq!(
        sample(&metrics, r#"dockvpn_handshakes_total{transport="openvpn"}"#),
        Some(1.0),
        "alice's connect is one completed handshake\n{metrics}"
    );
    promtool_check(&metrics);
    assert!(
        get(&chain.si, "/healthz").starts_with("HTTP/1.1 200"),
        "healthz while serving"
    );

    let dropped = |metrics: &str| -> f64 {
        body(metrics)
            .lines()
            .filter(|line| line.starts_with("dockvpn_dropped_total{"))
            .filter_map(|line| line.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    };
    let before = dropped(&metrics);
    let server: SocketAddr = format!("{SI_RIGHT}:1194").parse().expect("server address");
    chain.right_host.run(|| {
        let socket = UdpSocket::bind("0.0.0.0:0").expect("UDP socket");
        for _ in 0..5 {
            socket
                .send_to(b"\xff\x00garbage that is no OpenVPN packet", server)
                .expect("send garbage");
        }
    });
    get_until(&chain.si, "/metrics", "the garbage dropped", |m| {
        dropped(m) >= before + 5.0
    });
    drop(client);
}

#[test]
fn a_handshake_with_a_revoked_certificate_counts_as_revoked() {
    let (chain, dockvpn) = vpn_chain(&["--metrics-listen", METRICS]);
    let revoked = r#"dockvpn_handshake_failures_total{reason="revoked"}"#;
    let metrics = get_until(&chain.si, "/metrics", "the failure series", |m| {
        sample(m, revoked).is_some()
    });
    assert_eq!(sample(&metrics, revoked), Some(0.0), "{metrics}");

    let profile = issue_profile(&chain.si, &dockvpn, "alice", None);
    let output = dockvpn.cli(&chain.si, "dockvpn", &["client", "revoke", "alice"]);
    assert!(output.status.success(), "{output:?}");
    let client = OpenvpnClient::start(&chain.right_host, &profile, &[]);
    client
        .process
        .wait_for_log("AUTH_FAILED", Duration::from_secs(30))
        .unwrap_or_else(|e| panic!("{e}\nclient:\n{}\nserver:\n{}", client.log(), dockvpn.log()));
    let metrics = get_until(&chain.si, "/metrics", "a revoked handshake", |m| {
        sample(m, revoked) >= Some(1.0)
    });
    assert_eq!(
        sample(&metrics, r#"dockvpn_handshakes_total{transport="openvpn"}"#),
        Some(0.0),
        "a refused handshake is no completed one\n{metrics}"
    );
    promtool_check(&metrics);
}

#[test]
fn a_dhcp_nak_and_the_bound_lease_show_in_the_metrics() {
    let chain = Chain::new();
    chain.si.ip(&["addr", "flush", "dev", "eth0"]);
    let _dnsmasq = Dnsmasq::start(
        &chain.left_gateway,
        "wan",
        "10.0.1.50,10.0.1.99,255.255.255.0,2m",
        &["option:router,10.0.1.1"],
    );
    // A stored lease the server never gave: asking for it back (INIT-REBOOT) gets a NAK.
    let state = StateDir::new();
    std::fs::create_dir_all(state.path()).expect("state directory");
    let stale = serde_json::json!({
        "lease": {"address": "10.0.1.200/24", "server": "10.0.1.1", "routers": ["10.0.1.1"], "dns": [], "routes": [],
                  "route_source": "none", "lease_secs": 86400, "renew_secs": 43200, "rebind_secs": 75600},
        "acquired_unix": std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).expect("clock").as_secs(),
    });
    std::fs::write(state.path().join("dhcp-eth0.json"), stale.to_string()).expect("stale lease");
    let path = state.path().to_str().expect("utf-8 path").to_string();
    let mut dockwall = Vnf::start(
        &chain.si,
        "dockwall",
        &[
            "--state-dir",
            &path,
            "run",
            "--dhcp",
            "left",
            "--side-timeout",
            "30",
            "--metrics-listen",
            METRICS,
        ],
    );
    dockwall.wait_ready();
    let metrics = get_until(&chain.si, "/metrics", "the lease bound", |m| {
        sample(m, r#"vnf_dhcp_lease_state{side="left",state="bound"}"#) == Some(1.0)
    });
    assert_eq!(
        sample(&metrics, r#"vnf_dhcp_naks_total{side="left"}"#),
        Some(1.0),
        "{metrics}\nlog:\n{}",
        dockwall.log()
    );
    assert_eq!(
        sample(
            &metrics,
            r#"vnf_dhcp_lease_state{side="left",state="init_reboot"}"#
        ),
        Some(0.0),
        "{metrics}"
    );
    promtool_check(&metrics);
    assert!(dockwall.terminate().success());
}

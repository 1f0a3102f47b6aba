//! Renegotiation under load, with the stock OpenVPN 2.6 client: a TCP stream runs through
//! the tunnel for a minute while the data keys change every 10 s, started by the client or
//! by the server. Every key change completes, the client never reconnects, and the stream
//! never stalls for a whole second.

use docknfv_tests::chain::LEFT_HOST;
use docknfv_tests::measure::{iperf_interval_bytes, iperf_tcp_report};
use docknfv_tests::openvpn::{
    issue_profile, status_json, vpn_chain, wait_for_status, OpenvpnClient, CONNECTED,
};

/// Long enough for six key changes at a 10 s interval.
const STREAM_SECONDS: &str = "62";

/// The stream's rate: steady load without starving the other tests on a shared machine.
const STREAM_RATE: &str = "50M";

/// Runs Dockvpn with `server_args` and a client with `client_args`, streams iperf3 from the
/// right host to the left host through the tunnel, and checks that at least
/// `min_renegotiations` key changes happened without a reconnect or a stalled second.
fn stream_across_renegotiations(server_args: &[&str], client_args: &[&str]) {
    let (chain, dockvpn) = vpn_chain(server_args);
    let profile = issue_profile(&chain.si, &dockvpn, "streamer", None);
    let client = OpenvpnClient::start(&chain.right_host, &profile, client_args);
    client.assert_connected(&dockvpn);
    let connected_since = |status: &serde_json::Value| {
        status["vpn"]["clients"][0]["connected_since_unix"]
            .as_u64()
            .unwrap_or_else(|| panic!("no connected client in {status}"))
    };
    let before = wait_for_status(&chain.si, &dockvpn, "the client", |status| {
        status["vpn"]["clients"][0].is_object()
    });

    let report = iperf_tcp_report(
        &chain.right_host,
        &chain.left_host,
        LEFT_HOST,
        &["-t", STREAM_SECONDS, "-b", STREAM_RATE],
    );
    let intervals = iperf_interval_bytes(&report);
    let after = status_json(&chain.si, &dockvpn);
    let client_log = client.log();
    let context = format!(
        "intervals (bytes): {intervals:?}\nclient:\n{client_log}\nserver:\n{}",
        dockvpn.log()
    );

    assert!(intervals.len() >= 60, "{context}");
    let stalled: Vec<usize> = (0..intervals.len())
        .filter(|&second| intervals[second] == 0)
        .collect();
    assert!(
        stalled.is_empty(),
        "seconds {stalled:?} carried nothing\n{context}"
    );
    let renegotiated = after["vpn"]["clients"][0]["renegotiations"]
        .as_u64()
        .unwrap_or_else(|| panic!("no renegotiation count in {after}"));
    eprintln!(
        "{renegotiated} renegotiations; bytes per second min {} max {}",
        intervals.iter().min().expect("intervals"),
        intervals.iter().max().expect("intervals")
    );
    assert!(
        renegotiated >= 5,
        "{renegotiated} renegotiations\n{context}"
    );
    // No reconnect: one connection on the client's side, the same session on the server's.
    assert_eq!(client_log.matches(CONNECTED).count(), 1, "{context}");
    assert_eq!(
        connected_since(&after),
        connected_since(&before),
        "the server's session was replaced\n{context}"
    );
    for error in ["out of sync", "TLS Error", "TLS key negotiation failed"] {
        assert!(
            !client_log.contains(error),
            "client logged {error:?}\n{context}"
        );
    }
}

#[test]
fn a_stream_survives_the_client_renegotiating_every_10_s() {
    stream_across_renegotiations(&[], &["--reneg-sec", "10"]);
}

#[test]
fn a_stream_survives_the_server_renegotiating_every_10_s() {
    // The client never starts one itself.
    stream_across_renegotiations(&["--reneg-sec", "10"], &["--reneg-sec", "0"]);
}

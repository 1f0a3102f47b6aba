//! Before a client proves it receives at its address, Dockvpn spends almost nothing on it,
//! with the stock OpenVPN 2.6 client: a flood of forged HARD_RESETs from the client's own
//! namespace creates no session (with tls-crypt off the resets are answered statelessly, with
//! tls-crypt they fail to unwrap) and a real client connects through it; a forged HARD_RESET
//! plus ClientHello from an address that never answers gets back fewer bytes than it sent,
//! and no TLS session (so no signature).

use std::net::{SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use docknfv_tests::openvpn::{issue_profile_with, status_json, vpn_chain, OpenvpnClient};
use docknfv_tests::Netns;

const FLOOD_RATE: u32 = 2_000;
const FLOOD_SECONDS: u32 = 10;
/// Distinct source ports the forged resets come from: more than the 64 handshake slots.
const FLOOD_SOCKETS: usize = 100;
/// How soon the real client must connect while the flood runs (it takes under 0.1 s here; a
/// client that loses a packet to a server fault waits for a resend and misses it).
const CONNECT_BOUND: Duration = Duration::from_secs(2);

/// The server's address from the profile's `remote HOST PORT` line.
fn remote(profile: &str) -> SocketAddr {
    let line = profile
        .lines()
        .find_map(|l| l.strip_prefix("remote "))
        .unwrap_or_else(|| panic!("no remote in {profile}"));
    let (host, port) = line.split_once(' ').expect("remote HOST PORT");
    format!("{host}:{port}").parse().expect("an address")
}

/// A P_CONTROL_HARD_RESET_CLIENT_V2 (opcode 7, key 0) with session id `session`, no ACKs,
/// message id 0.
fn forged_reset(session: [u8; 8]) -> Vec<u8> {
    let mut packet = vec![7 << 3];
    packet.extend_from_slice(&session);
    packet.push(0);
    packet.extend_from_slice(&0u32.to_be_bytes());
    packet
}

/// Session ids from a xorshift generator: each forged reset is a new client to the server.
fn session_ids(seed: u64) -> impl Iterator<Item = [u8; 8]> {
    let mut state = seed | 1;
    std::iter::from_fn(move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        Some(state.to_be_bytes())
    })
}

/// Sends FLOOD_RATE forged resets a second for FLOOD_SECONDS from `ns`, paced in 10 ms
/// batches; `running` is cleared when done. Returns the thread, which yields the count sent.
fn start_flood(
    ns: &Netns,
    server: SocketAddr,
    running: Arc<AtomicBool>,
) -> std::thread::JoinHandle<u32> {
    let sockets: Vec<UdpSocket> = ns.run(|| {
        (0..FLOOD_SOCKETS)
            .map(|_| UdpSocket::bind("0.0.0.0:0").expect("bind a flood socket"))
            .collect()
    });
    running.store(true, Ordering::SeqCst);
    std::thread::spawn(move || {
        let batches = FLOOD_SECONDS * 100;
        let per_batch = FLOOD_RATE / 100;
        let start = Instant::now();
        let mut ids = session_ids(0x5eed);
        let mut sent = 0;
        for batch in 0..batches {
            for socket in sockets
                .iter()
                .cycle()
                .skip(sent as usize)
                .take(per_batch as usize)
            {
                let id = ids.next().expect("endless");
                if socket.send_to(&forged_reset(id), server).is_ok() {
                    sent += 1;
                }
            }
            // Pacing, not synchronisation: the next batch is due 10 ms after this one.
            let due = start + Duration::from_millis(10 * u64::from(batch + 1));
            std::thread::sleep(due.saturating_duration_since(Instant::now()));
        }
        running.store(false, Ordering::SeqCst);
        sent
    })
}

/// Floods the server with forged resets from the client's namespace while a real client
/// connects; checks the client connects within CONNECT_BOUND, the server's status shows no
/// handshake from the flood, and, within 5 s of the flood's end, `dropped` (the server's drop
/// counters) satisfies `counted`.
fn a_real_client_connects_through_a_flood(
    tls_crypt: &str,
    counted: impl Fn(&serde_json::Value) -> bool,
) {
    let (chain, dockvpn) = vpn_chain(&["--tls-crypt", tls_crypt]);
    let profile = issue_profile_with(&chain.si, &dockvpn, "alice", &["--tls-crypt", tls_crypt]);
    let running = Arc::new(AtomicBool::new(false));
    let flood = start_flood(&chain.right_host, remote(&profile), running.clone());
    let started = Instant::now();
    let client = OpenvpnClient::start(&chain.right_host, &profile, &[]);
    client.assert_connected(&dockvpn);
    let took = started.elapsed();
    assert!(
        took <= CONNECT_BOUND,
        "connected after {took:?} under the flood\nclient:\n{}",
        client.log()
    );
    // While the flood still runs: the status shows the client and no handshake in progress
    // (status.json is rewritten every 2 s, so this waits up to 5 s).
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let status = status_json(&chain.si, &dockvpn);
        let vpn = &status["vpn"];
        assert!(
            vpn["handshaking"].as_u64() <= Some(1),
            "the flood created handshakes: {vpn}"
        );
        if vpn["clients"].as_array().is_some_and(|c| c.len() == 1) {
            assert_eq!(vpn["handshaking"], 0, "{vpn}");
            break;
        }
        assert!(Instant::now() < deadline, "no client in {vpn}");
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(
        running.load(Ordering::SeqCst),
        "the flood ended before the check"
    );
    let sent = flood.join().expect("the flood thread");
    assert_eq!(sent, FLOOD_RATE * FLOOD_SECONDS, "forged resets sent");
    eprintln!("tls-crypt {tls_crypt}: connected in {took:?} during a flood of {sent} resets");
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let status = status_json(&chain.si, &dockvpn);
        let vpn = &status["vpn"];
        assert_eq!(vpn["handshaking"], 0, "{vpn}");
        assert_eq!(vpn["clients"][0]["name"], "alice", "{vpn}");
        assert_eq!(vpn["dropped"]["refused_handshakes"], 0, "{vpn}");
        if counted(&vpn["dropped"]) {
            break;
        }
        assert!(Instant::now() < deadline, "drops not counted: {vpn}");
        std::thread::sleep(Duration::from_millis(200));
    }
    drop(client);
}

#[test]
fn with_tls_crypt_off_a_reset_flood_creates_no_session_and_a_real_client_connects() {
    // Each forged reset got its small reply and was forgotten: nothing to count.
    a_real_client_connects_through_a_flood("off", |_| true);
}

#[test]
fn with_tls_crypt_a_reset_flood_is_dropped_unanswered_and_a_real_client_connects() {
    // The forged resets fail to unwrap and are counted (a busy kernel may drop a few).
    let floor = u64::from(FLOOD_RATE * FLOOD_SECONDS) * 95 / 100;
    a_real_client_connects_through_a_flood("v1", |dropped| {
        dropped["unauthenticated_control"].as_u64() >= Some(floor)
    });
}

/// A TLS 1.3 ClientHello as a scanner would send it: a record of about 400 bytes (random,
/// session id, suites, signature algorithms, an x25519 key share, padding), enough for a
/// server that parsed it to answer with its certificate and a signature.
fn client_hello() -> Vec<u8> {
    let mut body = vec![0x03, 0x03];
    body.extend(session_ids(0xc1).take(4).flatten()); // random
    body.push(32);
    body.extend(session_ids(0x5e).take(4).flatten()); // legacy session id
    body.extend_from_slice(&[0x00, 0x06, 0x13, 0x01, 0x13, 0x02, 0x13, 0x03, 0x01, 0x00]);
    let mut extensions = Vec::new();
    // supported_versions: TLS 1.3; supported_groups: x25519; key_share: x25519.
    extensions.extend_from_slice(&[0x00, 0x2b, 0x00, 0x03, 0x02, 0x03, 0x04]);
    extensions.extend_from_slice(&[0x00, 0x0a, 0x00, 0x04, 0x00, 0x02, 0x00, 0x1d]);
    extensions.extend_from_slice(&[0x00, 0x33, 0x00, 0x26, 0x00, 0x24, 0x00, 0x1d, 0x00, 0x20]);
    extensions.extend(session_ids(0x4b).take(4).flatten());
    // signature_algorithms: ECDSA P-256 SHA-256, RSA-PSS SHA-256, Ed25519.
    extensions.extend_from_slice(&[0x00, 0x0d, 0x00, 0x08, 0x00, 0x06, 0x04, 0x03, 0x08, 0x04]);
    extensions.extend_from_slice(&[0x08, 0x07]);
    // Padding, as browsers pad their hellos.
    let padding = 238;
    extensions.extend_from_slice(&[0x00, 0x15, 0x00, padding as u8]);
    extensions.extend(std::iter::repeat_n(0, padding));
    body.extend_from_slice(&(extensions.len() as u16).to_be_bytes());
    body.extend(extensions);
    let mut handshake = vec![0x01, 0x00];
    handshake.extend_from_slice(&(body.len() as u16).to_be_bytes());
    handshake.extend(body);
    let mut record = vec![0x16, 0x03, 0x01];
    record.extend_from_slice(&(handshake.len() as u16).to_be_bytes());
    record.extend(handshake);
    record
}

/// A P_CONTROL_V1 from session `session` with message id 1 and `payload`, without ACKs:
/// the forger never saw the server's reply, so it has no server session id to echo.
fn forged_control(session: [u8; 8], payload: &[u8]) -> Vec<u8> {
    let mut packet = vec![4 << 3];
    packet.extend_from_slice(&session);
    packet.push(0);
    packet.extend_from_slice(&1u32.to_be_bytes());
    packet.extend_from_slice(payload);
    packet
}

#[test]
fn a_forged_reset_and_client_hello_get_back_fewer_bytes_than_sent_and_no_tls_session() {
    let (chain, dockvpn) = vpn_chain(&["--tls-crypt", "off"]);
    let profile = issue_profile_with(&chain.si, &dockvpn, "alice", &["--tls-crypt", "off"]);
    let server = remote(&profile);
    // The "victim": a socket that receives whatever the server sends to its address and
    // never answers.
    let socket = chain
        .right_host
        .run(|| UdpSocket::bind("0.0.0.0:0").expect("bind"));
    socket
        .set_read_timeout(Some(Duration::from_millis(100)))
        .expect("timeout");
    let session = session_ids(0xf0).next().expect("an id");
    let hello = client_hello();
    assert!((380..=420).contains(&hello.len()), "{} bytes", hello.len());
    // As a client would: the reset, the hello, and both sent again twice, a second apart.
    let mut bytes_sent = 0;
    let mut bytes_back = 0;
    let mut replies = 0;
    for _ in 0..3 {
        for datagram in [forged_reset(session), forged_control(session, &hello)] {
            bytes_sent += socket.send_to(&datagram, server).expect("send");
        }
        // Everything the server sends within the next second (it would answer a ClientHello
        // within milliseconds, and resend within a second).
        let until = Instant::now() + Duration::from_secs(1);
        let mut buffer = [0u8; 65536];
        while Instant::now() < until {
            if let Ok((n, from)) = socket.recv_from(&mut buffer) {
                assert_eq!(from, server);
                bytes_back += n;
                replies += 1;
            }
        }
    }
    eprintln!("reflection: {bytes_sent} bytes sent, {bytes_back} back in {replies} datagrams");
    assert_eq!(replies, 3, "one stateless reply per reset, nothing else");
    assert!(
        bytes_back < bytes_sent / 10,
        "{bytes_back} bytes back for {bytes_sent} sent"
    );
    // The hellos were dropped for no session; no session means no TLS and no signature.
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let status = status_json(&chain.si, &dockvpn);
        let vpn = &status["vpn"];
        if vpn["dropped"]["unknown_session"].as_u64() >= Some(3) {
            assert_eq!(vpn["handshaking"], 0, "{vpn}");
            break;
        }
        assert!(Instant::now() < deadline, "hellos not counted: {vpn}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

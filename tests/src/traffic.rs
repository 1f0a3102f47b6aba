//! Real traffic between namespaces: ICMP with the system ping, TCP with std sockets on
//! threads that entered the namespaces. Every probe is bounded in count and time.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::time::Duration;

use crate::netns::Netns;

/// One echo request with a one-second deadline.
pub fn ping(from: &Netns, to: &str) -> bool {
    from.exec("ping", &["-c", "1", "-W", "1", "-q", to])
        .status
        .success()
}

/// Pings until one answer or `attempts` tries (one second each) are used up.
pub fn ping_eventually(from: &Netns, to: &str, attempts: u32) -> bool {
    (0..attempts).any(|_| ping(from, to))
}

/// Opens a TCP connection from `client` to `server_address:port` served in `server`, sends a
/// line and reads it back reversed. Err names what failed.
pub fn tcp_exchange(
    client: &Netns,
    server: &Netns,
    server_address: &str,
    port: u16,
) -> Result<(), String> {
    let bind: SocketAddr = format!("{server_address}:{port}")
        .parse()
        .map_err(|e| format!("{e}"))?;
    let listener = server
        .run(|| TcpListener::bind(bind))
        .map_err(|e| format!("bind {bind}: {e}"))?;
    listener.set_nonblocking(false).map_err(|e| e.to_string())?;
    std::thread::scope(|scope| {
        let serve = scope.spawn(|| -> Result<(), String> {
            let (mut stream, _) = listener.accept().map_err(|e| format!("accept: {e}"))?;
            stream
                .set_read_timeout(Some(Duration::from_secs(3)))
                .map_err(|e| e.to_string())?;
            let mut line = [0u8; 5];
            stream
                .read_exact(&mut line)
                .map_err(|e| format!("server read: {e}"))?;
            line.reverse();
            stream
                .write_all(&line)
                .map_err(|e| format!("server write: {e}"))
        });
        let result = client.run(|| -> Result<(), String> {
            let mut stream = TcpStream::connect_timeout(&bind, Duration::from_secs(3))
                .map_err(|e| format!("connect to {bind}: {e}"))?;
            stream
                .set_read_timeout(Some(Duration::from_secs(3)))
                .map_err(|e| e.to_string())?;
            stream
                .write_all(b"hello")
                .map_err(|e| format!("client write: {e}"))?;
            let mut answer = [0u8; 5];
            stream
                .read_exact(&mut answer)
                .map_err(|e| format!("client read: {e}"))?;
            if &answer == b"olleh" {
                Ok(())
            } else {
                Err(format!("unexpected answer {answer:?}"))
            }
        });
        if result.is_err() {
            // Unblock the accept so the scope can end.
            let _ = server.run(|| TcpStream::connect_timeout(&bind, Duration::from_millis(200)));
        }
        let served = serve
            .join()
            .unwrap_or_else(|_| Err("server thread panicked".into()));
        result.and(served)
    })
}

/// How a connection attempt ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Probe {
    /// Data went both ways.
    Passed,
    /// Actively refused: a TCP reset or an ICMP port unreachable.
    Refused,
    /// Nothing came back.
    TimedOut,
}

const PROBE_TIMEOUT: Duration = Duration::from_millis(1500);

/// A TCP connection from `from` to `address:port`, served on that same address and port in
/// `to`: how it went.
pub fn tcp(from: &Netns, to: &Netns, address: &str, port: u16) -> Probe {
    tcp_probe(from, to, address, address, port, port).0
}

/// A TCP connection from `client` to `address:port`, served in `server`; also returns the
/// peer address the server saw (to observe NAT).
pub fn tcp_probe(
    client: &Netns,
    server: &Netns,
    listen: &str,
    connect: &str,
    port: u16,
    connect_port: u16,
) -> (Probe, Option<SocketAddr>) {
    let bind: SocketAddr = format!("{listen}:{port}").parse().expect("listen address");
    let target: SocketAddr = format!("{connect}:{connect_port}")
        .parse()
        .expect("connect address");
    let listener = server
        .run(|| TcpListener::bind(bind))
        .unwrap_or_else(|e| panic!("bind {bind}: {e}"));
    listener
        .set_nonblocking(true)
        .expect("nonblocking listener");
    std::thread::scope(|scope| {
        let serve = scope.spawn(|| -> Option<SocketAddr> {
            let deadline = std::time::Instant::now() + PROBE_TIMEOUT * 2;
            while std::time::Instant::now() < deadline {
                match listener.accept() {
                    Ok((mut stream, peer)) => {
                        let _ = stream.set_nonblocking(false);
                        let _ = stream.set_read_timeout(Some(PROBE_TIMEOUT));
                        let mut byte = [0u8; 1];
                        if stream.read_exact(&mut byte).is_ok() {
                            let _ = stream.write_all(&byte);
                        }
                        return Some(peer);
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(10)),
                }
            }
            None
        });
        let probe = client.run(
            || match TcpStream::connect_timeout(&target, PROBE_TIMEOUT) {
                Ok(mut stream) => {
                    let _ = stream.set_read_timeout(Some(PROBE_TIMEOUT));
                    let mut byte = [7u8; 1];
                    match stream
                        .write_all(&byte)
                        .and_then(|()| stream.read_exact(&mut byte))
                    {
                        Ok(()) => Probe::Passed,
                        Err(_) => Probe::TimedOut,
                    }
                }
                Err(error) if error.kind() == std::io::ErrorKind::ConnectionRefused => {
                    Probe::Refused
                }
                Err(_) => Probe::TimedOut,
            },
        );
        let peer = serve.join().ok().flatten();
        (probe, peer)
    })
}

/// A UDP datagram from `client` to `address:port` echoed by `server`.
pub fn udp_probe(client: &Netns, server: &Netns, address: &str, port: u16) -> Probe {
    let bind: SocketAddr = format!("{address}:{port}").parse().expect("address");
    let socket = server
        .run(|| std::net::UdpSocket::bind(bind))
        .unwrap_or_else(|e| panic!("bind {bind}: {e}"));
    socket
        .set_read_timeout(Some(PROBE_TIMEOUT * 2))
        .expect("timeout");
    std::thread::scope(|scope| {
        scope.spawn(|| {
            let mut buffer = [0u8; 16];
            if let Ok((length, peer)) = socket.recv_from(&mut buffer) {
                let _ = socket.send_to(&buffer[..length], peer);
            }
        });
        let probe = client.run(|| {
            let local = std::net::UdpSocket::bind("0.0.0.0:0").expect("client socket");
            local
                .set_read_timeout(Some(PROBE_TIMEOUT))
                .expect("timeout");
            local.connect(bind).expect("connect");
            let _ = local.send(b"ping");
            let mut buffer = [0u8; 16];
            match local.recv(&mut buffer) {
                Ok(_) => Probe::Passed,
                Err(error) if error.kind() == std::io::ErrorKind::ConnectionRefused => {
                    Probe::Refused
                }
                Err(_) => Probe::TimedOut,
            }
        });
        if probe != Probe::Passed {
            // Unblock the server's receive so the scope ends promptly.
            let _ = server
                .run(|| std::net::UdpSocket::bind("0.0.0.0:0").and_then(|s| s.send_to(b"x", bind)));
        }
        probe
    })
}

/// The summary line of one ping, to tell a drop from an ICMP unreachable.
pub fn ping_output(from: &Netns, to: &str) -> String {
    let output = from.exec("ping", &["-c", "1", "-W", "1", to]);
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// Which way the bytes of a [`tcp_transfer`] flow; the client connects either way.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flow {
    ClientToServer,
    ServerToClient,
}

/// The longest a [`tcp_transfer`] waits for the next bytes, or to hand bytes to the kernel.
const TRANSFER_STALL: Duration = Duration::from_secs(10);

/// A TCP connection from `client` to `address:port` served in `server` carries `bytes` of
/// pseudo-random data one way (`flow`), and the far end must receive exactly those bytes:
/// as many, with the same SHA-256, then the sender's close. Err says what differed. Bounded:
/// no read or write waits longer than 10 s.
pub fn tcp_transfer(
    client: &Netns,
    server: &Netns,
    address: &str,
    port: u16,
    bytes: u64,
    flow: Flow,
) -> Result<(), String> {
    let bind: SocketAddr = format!("{address}:{port}")
        .parse()
        .map_err(|e| format!("{e}"))?;
    let listener = server
        .run(|| TcpListener::bind(bind))
        .map_err(|e| format!("bind {bind}: {e}"))?;
    let connected = client
        .run(|| TcpStream::connect_timeout(&bind, PROBE_TIMEOUT * 2))
        .map_err(|e| format!("connect to {bind}: {e}"))?;
    // The handshake completed, so the connection already waits in the backlog.
    let (accepted, _) = listener.accept().map_err(|e| format!("accept: {e}"))?;
    let (sending, receiving) = match flow {
        Flow::ClientToServer => (connected, accepted),
        Flow::ServerToClient => (accepted, connected),
    };
    for stream in [&sending, &receiving] {
        stream
            .set_read_timeout(Some(TRANSFER_STALL))
            .and_then(|()| stream.set_write_timeout(Some(TRANSFER_STALL)))
            .map_err(|e| e.to_string())?;
    }
    let (sent, received) = std::thread::scope(|scope| {
        let sender = scope.spawn(|| send_pattern(sending, bytes));
        let received = receive_all(receiving);
        (
            sender
                .join()
                .unwrap_or_else(|_| Err("the sender panicked".into())),
            received,
        )
    });
    let sent = sent?;
    let (count, received) = received?;
    if count != bytes {
        return Err(format!("{count} of {bytes} bytes arrived ({flow:?})"));
    }
    if sent.as_ref() != received.as_ref() {
        return Err(format!(
            "{bytes} bytes arrived but not the ones sent: SHA-256 differs ({flow:?})"
        ));
    }
    Ok(())
}

/// Writes `bytes` of a pseudo-random pattern (no period a reordering could hide in), then
/// closes the writing half; the SHA-256 of what it wrote.
fn send_pattern(mut stream: TcpStream, bytes: u64) -> Result<ring::digest::Digest, String> {
    let mut digest = ring::digest::Context::new(&ring::digest::SHA256);
    let mut state = 0x9e37_79b9_7f4a_7c15u64;
    let mut chunk = vec![0u8; 64 * 1024];
    let mut left = bytes;
    while left > 0 {
        let len = chunk.len().min(usize::try_from(left).unwrap_or(usize::MAX));
        for word in chunk[..len].chunks_mut(8) {
            // xorshift64
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            word.copy_from_slice(&state.to_le_bytes()[..word.len()]);
        }
        stream
            .write_all(&chunk[..len])
            .map_err(|e| format!("send after {} bytes: {e}", bytes - left))?;
        digest.update(&chunk[..len]);
        left -= len as u64;
    }
    stream
        .shutdown(std::net::Shutdown::Write)
        .map_err(|e| format!("close after sending: {e}"))?;
    Ok(digest.finish())
}

/// Reads until the sender closes: how many bytes came, and their SHA-256.
fn receive_all(mut stream: TcpStream) -> Result<(u64, ring::digest::Digest), String> {
    let mut digest = ring::digest::Context::new(&ring::digest::SHA256);
    let mut buffer = vec![0u8; 64 * 1024];
    let mut count = 0u64;
    loop {
        match stream.read(&mut buffer) {
            Ok(0) => return Ok((count, digest.finish())),
            Ok(len) => {
                digest.update(&buffer[..len]);
                count += len as u64;
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(format!("receive after {count} bytes: {e}")),
        }
    }
}

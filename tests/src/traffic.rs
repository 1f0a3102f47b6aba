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

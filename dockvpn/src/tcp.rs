//! The TCP listener: one reader and one writer task per connection around the engine's
//! single loop. The reader deframes the stream into packets for the engine; the writer
//! drains a bounded queue of framed packets. A connection lives as long as its session,
//! plus a short grace to start one.

use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use crate::openvpn::link::Link;
use crate::openvpn::tcp_framing::{frame, Deframer};

/// A connection without a session this long after it opened is closed: it never sent a
/// HARD_RESET the engine took (the engine's handshake window covers the rest).
pub const SESSION_DEADLINE: Duration = Duration::from_secs(10);
/// Framed packets queued for one connection; a client that reads slower than this fills
/// is dropped, so memory stays at most this many packets per connection.
const WRITE_QUEUE_PACKETS: usize = 128;
/// A write that makes no progress this long ends the connection's writer; a closed
/// connection's writer gets this long, in all, for what was still queued.
const WRITE_TIMEOUT: Duration = Duration::from_secs(10);
/// At most about this many bytes of queued packets go out in one write.
const WRITE_BATCH_BYTES: usize = 64 * 1024;
/// Packets read from all connections, waiting for the engine (readers pause when full).
const READ_QUEUE_PACKETS: usize = 256;

/// What the connection tasks tell the engine loop.
#[derive(Debug)]
pub enum TcpEvent {
    Packet { link: Link, packet: Vec<u8> },
    Closed { link: Link, reason: String },
}

/// Connections refused and closed by the listener itself, for status.json.
#[derive(Debug, Default, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
pub struct TcpCounters {
    pub open: usize,
    /// Refused at once: the connection limit was reached.
    pub refused_over_limit: u64,
    /// Closed because no session started within the deadline.
    pub closed_without_session: u64,
    /// Closed because the client did not read what the server sent.
    pub closed_slow_reader: u64,
}

struct Connection {
    opened: Instant,
    /// Dropping it lets the writer send what is queued, then close the stream.
    queue: mpsc::Sender<Vec<u8>>,
    reader: JoinHandle<()>,
    writer: JoinHandle<()>,
}

pub struct TcpServer {
    listener: TcpListener,
    connections: HashMap<Link, Connection>,
    next_conn: u64,
    max_connections: usize,
    events_sender: mpsc::Sender<TcpEvent>,
    events: mpsc::Receiver<TcpEvent>,
    counters: TcpCounters,
}

impl TcpServer {
    pub async fn bind(address: SocketAddr, max_connections: usize) -> io::Result<TcpServer> {
        let listener = TcpListener::bind(address).await?;
        let (events_sender, events) = mpsc::channel(READ_QUEUE_PACKETS);
        Ok(TcpServer {
            listener,
            connections: HashMap::new(),
            next_conn: 0,
            max_connections,
            events_sender,
            events,
            counters: TcpCounters::default(),
        })
    }

    /// The counters, with the connections open now.
    pub fn counters(&self) -> TcpCounters {
        TcpCounters {
            open: self.connections.len(),
            ..self.counters
        }
    }

    /// The next packet or closed connection; accepts connections meanwhile. Cancel-safe.
    pub async fn next_event(&mut self) -> TcpEvent {
        loop {
            tokio::select! {
                accepted = self.listener.accept() => match accepted {
                    Ok((stream, peer)) => self.open(stream, peer),
                    Err(error) => tracing::warn!(%error, "TCP accept failed"),
                },
                Some(event) = self.events.recv() => {
                    let link = match &event {
                        TcpEvent::Packet { link, .. } | TcpEvent::Closed { link, .. } => *link,
                    };
                    // Packets still queued from a connection closed since are dropped.
                    if self.connections.contains_key(&link) {
                        if matches!(event, TcpEvent::Closed { .. }) {
                            self.forget(&link);
                        }
                        return event;
                    }
                }
            }
        }
    }

    fn open(&mut self, stream: TcpStream, peer: SocketAddr) {
        if self.connections.len() >= self.max_connections {
            // Dropping the stream closes it: idle connections cannot pile up file descriptors.
            self.counters.refused_over_limit += 1;
            return;
        }
        let _ = stream.set_nodelay(true);
        let link = Link::Tcp {
            conn: self.next_conn,
            peer,
        };
        self.next_conn += 1;
        let (read, write) = stream.into_split();
        let (queue, queued) = mpsc::channel(WRITE_QUEUE_PACKETS);
        let writer = tokio::spawn(write_packets(write, queued));
        let reader = tokio::spawn(read_packets(link, read, self.events_sender.clone()));
        self.connections.insert(
            link,
            Connection {
                opened: Instant::now(),
                queue,
                reader,
                writer,
            },
        );
    }

    /// Queues a packet for the connection; Err when its queue is full (the connection is
    /// closed then). A connection already closed takes nothing.
    pub fn send(&mut self, link: &Link, packet: &[u8]) -> Result<(), String> {
        let Some(connection) = self.connections.get(link) else {
            return Ok(());
        };
        let Some(framed) = frame(packet) else {
            return Err(format!(
                "a packet of {} bytes does not fit a TCP frame",
                packet.len()
            ));
        };
        match connection.queue.try_send(framed) {
            Ok(()) => Ok(()),
            Err(mpsc::error::TrySendError::Full(_)) => {
                self.counters.closed_slow_reader += 1;
                self.close(link);
                Err(format!(
                    "the client did not read its last {WRITE_QUEUE_PACKETS} packets (TCP write queue full)"
                ))
            }
            // The writer ended (write error or timeout); the reader reports the close.
            Err(mpsc::error::TrySendError::Closed(_)) => Ok(()),
        }
    }

    /// Closes a connection after what is queued for it is written.
    pub fn close(&mut self, link: &Link) {
        if let Some(reader) = self.forget(link) {
            reader.abort();
        }
    }

    /// Drops the connection from the table; its writer gets `WRITE_TIMEOUT` to finish, so a
    /// client that reads slowly cannot keep the socket once it no longer counts against the
    /// limit. Returns its reader.
    fn forget(&mut self, link: &Link) -> Option<JoinHandle<()>> {
        let connection = self.connections.remove(link)?;
        let writer = connection.writer;
        tokio::spawn(async move {
            tokio::time::sleep(WRITE_TIMEOUT).await;
            writer.abort();
        });
        Some(connection.reader)
    }

    /// Closes the connections that have had no session for `SESSION_DEADLINE` since they
    /// opened.
    pub fn close_sessionless(&mut self, now: Instant, has_session: impl Fn(&Link) -> bool) {
        let expired: Vec<Link> = self
            .connections
            .iter()
            .filter(|(link, c)| now >= c.opened + SESSION_DEADLINE && !has_session(link))
            .map(|(link, _)| *link)
            .collect();
        for link in expired {
            self.counters.closed_without_session += 1;
            self.close(&link);
        }
    }
}

async fn read_packets(link: Link, mut stream: OwnedReadHalf, events: mpsc::Sender<TcpEvent>) {
    let mut deframer = Deframer::default();
    let mut buffer = vec![0u8; 16 * 1024];
    let reason = loop {
        match stream.read(&mut buffer).await {
            Ok(0) => break "the client closed the TCP connection".to_owned(),
            Ok(length) => match deframer.feed(&buffer[..length]) {
                Ok(packets) => {
                    for packet in packets {
                        if events
                            .send(TcpEvent::Packet { link, packet })
                            .await
                            .is_err()
                        {
                            return;
                        }
                    }
                }
                Err(error) => break format!("TCP stream out of step: {error}"),
            },
            Err(error) => break format!("TCP read: {error}"),
        }
    };
    let _ = events.send(TcpEvent::Closed { link, reason }).await;
}

async fn write_packets(mut stream: OwnedWriteHalf, mut queued: mpsc::Receiver<Vec<u8>>) {
    let mut batch = Vec::with_capacity(WRITE_BATCH_BYTES);
    while let Some(framed) = queued.recv().await {
        // What else is queued already goes out with it: one write, not one per packet.
        batch.clear();
        batch.extend_from_slice(&framed);
        while batch.len() < WRITE_BATCH_BYTES {
            let Ok(more) = queued.try_recv() else {
                break;
            };
            batch.extend_from_slice(&more);
        }
        match tokio::time::timeout(WRITE_TIMEOUT, stream.write_all(&batch)).await {
            Ok(Ok(())) => {}
            Ok(Err(_)) | Err(_) => return,
        }
    }
    let _ = stream.shutdown().await;
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A listener on loopback and one connection to it, accepted.
    async fn server_with_connection() -> (TcpServer, TcpStream, Link) {
        let mut server = TcpServer::bind("127.0.0.1:0".parse().unwrap(), 4)
            .await
            .unwrap();
        let client = TcpStream::connect(server.listener.local_addr().unwrap())
            .await
            .unwrap();
        let (stream, peer) = server.listener.accept().await.unwrap();
        server.open(stream, peer);
        let link = *server.connections.keys().next().unwrap();
        (server, client, link)
    }

    #[tokio::test]
    async fn a_client_that_does_not_read_is_dropped_once_its_queue_is_full() {
        let (mut server, _never_reads, link) = server_with_connection().await;
        let packet = [0u8; 1400];
        // Bounded: 100,000 packets (140 MB) is far beyond the socket buffers and the queue.
        let mut refused = None;
        for sent in 0..100_000 {
            if let Err(reason) = server.send(&link, &packet) {
                refused = Some((sent, reason));
                break;
            }
            // The writer moves what the socket takes.
            tokio::task::yield_now().await;
        }
        let (sent, reason) = refused.expect("the queue of a client that never reads filled");
        assert!(reason.contains("write queue full"), "{reason}");
        assert!(sent >= WRITE_QUEUE_PACKETS, "{sent}");
        assert_eq!(server.counters.closed_slow_reader, 1);
        assert_eq!(server.counters().open, 0);
        assert!(
            server.send(&link, &packet).is_ok(),
            "a closed link takes nothing"
        );
    }

    #[tokio::test]
    async fn packets_arrive_deframed_and_the_close_of_the_stream_ends_the_link() {
        let (mut server, mut client, link) = server_with_connection().await;
        let mut bytes = frame(b"first").unwrap();
        bytes.extend(frame(b"second").unwrap());
        client.write_all(&bytes).await.unwrap();
        drop(client);
        let mut events = Vec::new();
        while events.len() < 3 {
            events.push(match server.next_event().await {
                TcpEvent::Packet { link: from, packet } => {
                    (from, String::from_utf8(packet).unwrap())
                }
                TcpEvent::Closed { link: from, reason } => (from, reason),
            });
        }
        assert_eq!(
            events,
            [
                (link, "first".to_owned()),
                (link, "second".to_owned()),
                (link, "the client closed the TCP connection".to_owned())
            ]
        );
        assert_eq!(server.counters().open, 0);
    }
}

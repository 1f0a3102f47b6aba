//! Where a session's packets come from and go to: a UDP peer address, or one TCP connection.

use std::fmt;
use std::net::SocketAddr;

use serde::{Deserialize, Serialize};

/// A session's transport endpoint; sessions are keyed by it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Link {
    Udp(SocketAddr),
    /// `conn` tells apart connections from the same address (a reconnect reusing its port).
    Tcp {
        conn: u64,
        peer: SocketAddr,
    },
}

impl Link {
    /// The client's address and port.
    pub fn peer(&self) -> SocketAddr {
        match *self {
            Link::Udp(peer) | Link::Tcp { peer, .. } => peer,
        }
    }

    pub fn protocol(&self) -> &'static str {
        match self {
            Link::Udp(_) => "udp",
            Link::Tcp { .. } => "tcp",
        }
    }

    /// The transport delivers in order and without loss (TCP): control packets are not
    /// resent, and a session does not float to another link.
    pub fn is_reliable(&self) -> bool {
        matches!(self, Link::Tcp { .. })
    }
}

/// `udp:1.2.3.4:5` or `tcp:1.2.3.4:5`.
impl fmt::Display for Link {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.protocol(), self.peer())
    }
}

/// The transports `run` serves on its --listen port.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Proto {
    Udp,
    Tcp,
    Both,
}

impl Proto {
    pub fn serves_udp(self) -> bool {
        self != Proto::Tcp
    }

    pub fn serves_tcp(self) -> bool {
        self != Proto::Udp
    }
}

impl std::fmt::Display for Proto {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Proto::Udp => "udp",
            Proto::Tcp => "tcp",
            Proto::Both => "udp+tcp",
        })
    }
}

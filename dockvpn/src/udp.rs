//! A UDP port of the VPN: the batched socket, what each peer last sent to, and the datagrams
//! waiting to go. Bound to 0.0.0.0 it answers each peer from the address that peer's
//! datagrams came to (IP_PKTINFO). Left to itself the kernel picks the source by `main`,
//! where a learned left route may cover the client: the reply would leave from the left
//! address, and vnf-core's `from <right address>` rule could not send it right.

use std::collections::HashMap;
use std::io;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;

use dockvpn::datapath::udp::{BatchSocket, PushError, TxBatch};
use tokio::io::unix::AsyncFd;
use tokio::io::Interest;
use tracing::warn;

/// Peers remembered beyond this are pruned to those with a session.
const MAX_REMEMBERED_PEERS: usize = 4096;

pub struct Listener {
    /// Registered for writability always, and for reading when the engine task receives.
    socket: AsyncFd<Arc<BatchSocket>>,
    /// The local address each peer last sent to: its replies' source.
    local_address: HashMap<SocketAddr, Ipv4Addr>,
    outgoing: TxBatch,
}

impl Listener {
    /// `receives`: whether the engine task reads this socket (else a receive thread does).
    pub fn bind(address: SocketAddr, offload: bool, receives: bool) -> io::Result<Listener> {
        let socket = Arc::new(BatchSocket::bind(address, offload)?);
        let interest = match receives {
            true => Interest::READABLE | Interest::WRITABLE,
            false => Interest::WRITABLE,
        };
        Ok(Listener {
            // SAFETY: the Arc inside the AsyncFd keeps the socket, and so its descriptor,
            // open for as long as the registration lives.
            socket: unsafe { AsyncFd::register_with_interest(socket, interest)? },
            local_address: HashMap::new(),
            outgoing: TxBatch::new(TxBatch::DEFAULT_DATAGRAMS),
        })
    }

    pub fn socket(&self) -> &AsyncFd<Arc<BatchSocket>> {
        &self.socket
    }

    pub fn shared(&self) -> Arc<BatchSocket> {
        self.socket.get_ref().clone()
    }

    /// Remembers where `from`'s datagram came to, for the replies.
    pub fn received(&mut self, from: SocketAddr, local: Option<Ipv4Addr>) {
        if let Some(local) = local {
            if self.local_address.get(&from) != Some(&local) {
                self.local_address.insert(from, local);
            }
        }
    }

    /// Queues `datagram` for `to`, from the address `to` last sent to; a full queue is sent
    /// first.
    pub async fn queue(&mut self, datagram: &[u8], to: SocketAddr) {
        let local = self.local_address.get(&to).copied();
        let mut pushed = self.outgoing.push(to, local, datagram);
        if matches!(pushed, Err(PushError::Full)) {
            self.send_queued().await;
            pushed = self.outgoing.push(to, local, datagram);
        }
        if let Err(error) = pushed {
            warn!(%to, %error, "datagram not sent");
        }
    }

    /// Sends everything queued, waiting while the socket's buffer is full.
    pub async fn send_queued(&mut self) {
        while !self.outgoing.is_empty() {
            match self.socket.get_ref().send_batch(&mut self.outgoing) {
                Ok(()) => return,
                Err(error) if error.kind() == io::ErrorKind::WouldBlock => {
                    match self.socket.writable().await {
                        Ok(mut ready) => ready.clear_ready(),
                        Err(error) => {
                            warn!(%error, "UDP socket unusable; queued datagrams dropped");
                            self.outgoing.clear();
                        }
                    }
                }
                // The batch went out but for the datagrams the kernel refused.
                Err(error) => warn!(%error, "UDP send refused"),
            }
        }
    }

    /// Bounds the memory unauthenticated senders can take: past the limit, only the peers
    /// the engine still has a session with (connected or in their handshake) stay.
    pub fn prune(&mut self, has_session: impl Fn(&SocketAddr) -> bool) {
        if self.local_address.len() > MAX_REMEMBERED_PEERS {
            self.local_address.retain(|peer, _| has_session(peer));
        }
    }
}

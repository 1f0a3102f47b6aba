//! The UDP listener. Bound to 0.0.0.0 it answers each peer from the address that peer's
//! datagrams came to (IP_PKTINFO). Left to itself the kernel picks the source by `main`,
//! where a learned left route may cover the client: the reply would leave from the left
//! address, and vnf-core's `from <right address>` rule could not send it right.

use std::collections::HashMap;
use std::io::{self, IoSlice, IoSliceMut};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::os::fd::AsRawFd;

use nix::sys::socket::{
    recvmsg, sendmsg, setsockopt, sockopt, ControlMessage, ControlMessageOwned, MsgFlags,
    SockaddrIn,
};
use tokio::io::Interest;
use tokio::net::UdpSocket;

/// Peers remembered beyond this are pruned to those with a session.
const MAX_REMEMBERED_PEERS: usize = 4096;

pub struct Listener {
    socket: UdpSocket,
    /// The local address each peer last sent to: its replies' source.
    local_address: HashMap<SocketAddr, Ipv4Addr>,
}

impl Listener {
    pub fn bind(address: SocketAddr) -> io::Result<Listener> {
        let socket = std::net::UdpSocket::bind(address)?;
        socket.set_nonblocking(true)?;
        setsockopt(&socket, sockopt::Ipv4PacketInfo, &true)?;
        Ok(Listener {
            socket: UdpSocket::from_std(socket)?,
            local_address: HashMap::new(),
        })
    }

    /// The next datagram into `buffer`: its length and sender.
    pub async fn recv(&mut self, buffer: &mut [u8]) -> io::Result<(usize, SocketAddr)> {
        loop {
            self.socket.readable().await?;
            let received = self.socket.try_io(Interest::READABLE, || {
                receive_with_local_address(self.socket.as_raw_fd(), buffer)
            });
            match received {
                Ok((length, from, local)) => {
                    if let Some(local) = local {
                        self.local_address.insert(from, local);
                    }
                    return Ok((length, from));
                }
                Err(error) if error.kind() == io::ErrorKind::WouldBlock => continue,
                Err(error) => return Err(error),
            }
        }
    }

    /// Sends `datagram` to `to` from the address `to` last sent to.
    pub async fn send(&self, datagram: &[u8], to: SocketAddr) -> io::Result<()> {
        let (SocketAddr::V4(peer), Some(&local)) = (to, self.local_address.get(&to)) else {
            return self.socket.send_to(datagram, to).await.map(drop);
        };
        loop {
            self.socket.writable().await?;
            let sent = self.socket.try_io(Interest::WRITABLE, || {
                send_from(self.socket.as_raw_fd(), datagram, peer, local)
            });
            match sent {
                Err(error) if error.kind() == io::ErrorKind::WouldBlock => continue,
                other => return other,
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

fn receive_with_local_address(
    fd: i32,
    buffer: &mut [u8],
) -> io::Result<(usize, SocketAddr, Option<Ipv4Addr>)> {
    let mut iov = [IoSliceMut::new(buffer)];
    let mut control = nix::cmsg_space!(libc::in_pktinfo);
    let message = recvmsg::<SockaddrIn>(fd, &mut iov, Some(&mut control), MsgFlags::empty())?;
    let from = message
        .address
        .map(|a| SocketAddr::V4(SocketAddrV4::from(a)))
        .ok_or_else(|| io::Error::other("a datagram without a sender address"))?;
    let local = message.cmsgs()?.find_map(|cmsg| match cmsg {
        ControlMessageOwned::Ipv4PacketInfo(info) => {
            Some(Ipv4Addr::from(u32::from_be(info.ipi_spec_dst.s_addr)))
        }
        _ => None,
    });
    Ok((message.bytes, from, local))
}

fn send_from(fd: i32, datagram: &[u8], to: SocketAddrV4, local: Ipv4Addr) -> io::Result<()> {
    let info = libc::in_pktinfo {
        ipi_ifindex: 0,
        ipi_spec_dst: libc::in_addr {
            s_addr: u32::from(local).to_be(),
        },
        ipi_addr: libc::in_addr { s_addr: 0 },
    };
    sendmsg(
        fd,
        &[IoSlice::new(datagram)],
        &[ControlMessage::Ipv4PacketInfo(&info)],
        MsgFlags::empty(),
        Some(&SockaddrIn::from(to)),
    )?;
    Ok(())
}

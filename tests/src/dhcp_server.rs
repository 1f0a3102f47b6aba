//! A scripted DHCP server for what dnsmasq will not do: the test decides every reply — a
//! forged ACK with another server identifier, T1=0 — and sees every client message. A UDP
//! socket on port 67 in the server's namespace; replies go as broadcasts to the subnet.

use std::net::{Ipv4Addr, SocketAddrV4, UdpSocket};
use std::time::{Duration, Instant};

use dhcproto::v4::{DhcpOption, DhcpOptions, Message, MessageType, Opcode};
use dhcproto::{Decodable, Decoder, Encodable};

use crate::netns::Netns;

pub struct ScriptedServer {
    socket: UdpSocket,
    /// Where replies go: the subnet's broadcast address, port 68.
    broadcast: SocketAddrV4,
}

impl ScriptedServer {
    /// Listens on port 67 in `ns`, whose interface on the client's subnet has `broadcast`
    /// as its broadcast address.
    pub fn start(ns: &Netns, broadcast: Ipv4Addr) -> ScriptedServer {
        let socket = ns.run(|| UdpSocket::bind("0.0.0.0:67").expect("bind UDP 67"));
        socket.set_broadcast(true).expect("SO_BROADCAST");
        ScriptedServer {
            socket,
            broadcast: SocketAddrV4::new(broadcast, 68),
        }
    }

    /// The next client message of `kind` within `timeout`, and when it came; others are
    /// skipped.
    pub fn receive(&self, kind: MessageType, timeout: Duration) -> Option<(Message, Instant)> {
        let deadline = Instant::now() + timeout;
        let mut buffer = [0u8; 1500];
        loop {
            let left = deadline.checked_duration_since(Instant::now())?;
            self.socket
                .set_read_timeout(Some(left.max(Duration::from_millis(1))))
                .expect("read timeout");
            let Ok(length) = self.socket.recv(&mut buffer) else {
                continue;
            };
            let Ok(message) = Message::decode(&mut Decoder::new(&buffer[..length])) else {
                continue;
            };
            if message.opcode() == Opcode::BootRequest && message.opts().msg_type() == Some(kind) {
                return Some((message, Instant::now()));
            }
        }
    }

    /// Answers `request` with `kind` for `address`, claiming `server_id`, with `options`.
    pub fn reply(
        &self,
        request: &Message,
        kind: MessageType,
        address: Ipv4Addr,
        server_id: Ipv4Addr,
        options: &[DhcpOption],
    ) {
        let mut message = Message::default();
        message
            .set_opcode(Opcode::BootReply)
            .set_xid(request.xid())
            .set_flags(request.flags())
            .set_chaddr(request.chaddr())
            .set_yiaddr(address);
        let mut all = DhcpOptions::default();
        all.insert(DhcpOption::MessageType(kind));
        all.insert(DhcpOption::ServerIdentifier(server_id));
        for option in options {
            all.insert(option.clone());
        }
        message.set_opts(all);
        let bytes = message.to_vec().expect("encode the reply");
        self.socket
            .send_to(&bytes, self.broadcast)
            .expect("send the reply");
    }
}

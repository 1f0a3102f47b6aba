//! Which tunnel each VPN address lives behind. The driver owns it and keeps it from the
//! engines' connect and disconnect events; a packet read from tun goes where it says.

use std::collections::HashMap;
use std::net::Ipv4Addr;

/// A connected client as its engine knows it: both engines name clients by a number that
/// survives roaming (OpenVPN's peer id, WireGuard's receiver index).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tunnel {
    OpenVpn(u32),
    WireGuard(u32),
}

impl Tunnel {
    pub fn transport(self) -> &'static str {
        match self {
            Tunnel::OpenVpn(_) => "openvpn",
            Tunnel::WireGuard(_) => "wireguard",
        }
    }
}

#[derive(Debug, Default)]
pub struct AddressBook {
    tunnels: HashMap<Ipv4Addr, Tunnel>,
}

impl AddressBook {
    /// The address is `tunnel`'s from now on; returns the tunnel that had it, if another
    /// (the same client connected over the other transport: the newest connection wins).
    pub fn connected(&mut self, address: Ipv4Addr, tunnel: Tunnel) -> Option<Tunnel> {
        self.tunnels
            .insert(address, tunnel)
            .filter(|previous| *previous != tunnel)
    }

    /// Forgets the address only if `tunnel` still has it (a newer connection keeps it).
    pub fn disconnected(&mut self, address: Ipv4Addr, tunnel: Tunnel) {
        if self.tunnels.get(&address) == Some(&tunnel) {
            self.tunnels.remove(&address);
        }
    }

    pub fn tunnel(&self, address: Ipv4Addr) -> Option<Tunnel> {
        self.tunnels.get(&address).copied()
    }
}

/// The IPv4 destination of a packet read from tun (IPv6 there, the kernel's router
/// solicitations, has nowhere to go).
pub fn ipv4_destination(packet: &[u8]) -> Option<Ipv4Addr> {
    (packet.len() >= 20 && packet[0] >> 4 == 4)
        .then(|| Ipv4Addr::new(packet[16], packet[17], packet[18], packet[19]))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_newest_connection_holds_an_address_until_it_leaves() {
        let alice = Ipv4Addr::new(10, 8, 0, 2);
        let mut book = AddressBook::default();
        assert_eq!(book.connected(alice, Tunnel::OpenVpn(7)), None);
        assert_eq!(book.connected(alice, Tunnel::OpenVpn(7)), None, "a rekey");
        assert_eq!(
            book.connected(alice, Tunnel::WireGuard(9)),
            Some(Tunnel::OpenVpn(7))
        );
        book.disconnected(alice, Tunnel::OpenVpn(7));
        assert_eq!(book.tunnel(alice), Some(Tunnel::WireGuard(9)));
        book.disconnected(alice, Tunnel::WireGuard(9));
        assert_eq!(book.tunnel(alice), None);
    }
}

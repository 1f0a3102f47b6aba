//! DHCP on the wire for a client that has no address yet: an AF_PACKET socket bound to the
//! interface, with a BPF filter that passes only UDP to port 68 (so it works before the
//! interface is addressed and is not subject to rp_filter), and a UDP socket for the
//! unicast of RENEWING and RELEASE. veth hands packets over with the UDP checksum not yet
//! filled in (TP_STATUS_CSUMNOTREADY in PACKET_AUXDATA); those are accepted as they are.

use std::io;
use std::mem::{size_of, zeroed};
use std::net::{Ipv4Addr, UdpSocket};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

use tokio::io::unix::AsyncFd;

pub const CLIENT_PORT: u16 = 68;
pub const SERVER_PORT: u16 = 67;
const IP_HEADER: usize = 20;
const UDP_HEADER: usize = 8;
const MAX_FRAME: usize = 65_535;

/// Classic BPF over the IP header (SOCK_DGRAM delivers packets without the link header):
/// UDP, not a later fragment, destination port 68.
fn client_port_filter() -> [libc::sock_filter; 9] {
    const LD_B_ABS: u16 = 0x30;
    const LD_H_ABS: u16 = 0x28;
    const LDX_B_MSH: u16 = 0xb1;
    const LD_H_IND: u16 = 0x48;
    const JEQ_K: u16 = 0x15;
    const JSET_K: u16 = 0x45;
    const RET_K: u16 = 0x06;
    let op = |code, jt, jf, k| libc::sock_filter { code, jt, jf, k };
    [
        op(LD_B_ABS, 0, 0, 9),                               // A = IP protocol
        op(JEQ_K, 0, 5, u32::from(libc::IPPROTO_UDP as u8)), // not UDP → drop
        op(LD_H_ABS, 0, 0, 6),                               // A = flags + fragment offset
        op(JSET_K, 3, 0, 0x1fff),                            // a later fragment → drop
        op(LDX_B_MSH, 0, 0, 0),                              // X = IP header length
        op(LD_H_IND, 0, 0, 2),                               // A = UDP destination port
        op(JEQ_K, 1, 0, u32::from(CLIENT_PORT)),             // port 68 → keep
        op(RET_K, 0, 0, 0),
        op(RET_K, 0, 0, MAX_FRAME as u32),
    ]
}

fn check(result: libc::c_int) -> io::Result<libc::c_int> {
    if result < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(result)
    }
}

fn set_option<T>(fd: &OwnedFd, level: libc::c_int, name: libc::c_int, value: &T) -> io::Result<()> {
    // SAFETY: value points to a live T of the size passed.
    check(unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            level,
            name,
            (value as *const T).cast(),
            size_of::<T>() as libc::socklen_t,
        )
    })
    .map(drop)
}

pub struct PacketSocket {
    fd: AsyncFd<OwnedFd>,
    interface: i32,
}

impl PacketSocket {
    pub fn open(interface: u32) -> io::Result<PacketSocket> {
        let protocol = (libc::ETH_P_IP as u16).to_be();
        // SAFETY: plain socket(2); the descriptor is owned right below.
        let raw = check(unsafe {
            libc::socket(
                libc::AF_PACKET,
                libc::SOCK_DGRAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
                i32::from(protocol),
            )
        })?;
        // SAFETY: raw is a fresh descriptor nobody else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        let filter = client_port_filter();
        let program = libc::sock_fprog {
            len: filter.len() as u16,
            filter: filter.as_ptr().cast_mut(),
        };
        set_option(&fd, libc::SOL_SOCKET, libc::SO_ATTACH_FILTER, &program)?;
        set_option(
            &fd,
            libc::SOL_PACKET,
            libc::PACKET_AUXDATA,
            &1 as &libc::c_int,
        )?;
        let interface =
            i32::try_from(interface).map_err(|_| io::Error::other("ifindex out of range"))?;
        // SAFETY: a zeroed sockaddr_ll is valid; the fields we need are set below.
        let mut address: libc::sockaddr_ll = unsafe { zeroed() };
        address.sll_family = libc::AF_PACKET as u16;
        address.sll_protocol = protocol;
        address.sll_ifindex = interface;
        // SAFETY: address is a sockaddr_ll of the size passed.
        check(unsafe {
            libc::bind(
                fd.as_raw_fd(),
                (&address as *const libc::sockaddr_ll).cast(),
                size_of::<libc::sockaddr_ll>() as u32,
            )
        })?;
        // SAFETY: the OwnedFd is open and moves into the AsyncFd, which owns it until dropped.
        let fd = unsafe { AsyncFd::register(fd) }
            .map_err(|error| io::Error::other(error.to_string()))?;
        Ok(PacketSocket { fd, interface })
    }

    /// The next DHCP payload for port 68 and its IP source. Packets that fail the IP/UDP
    /// checks are skipped.
    pub async fn recv(&self) -> io::Result<(Ipv4Addr, Vec<u8>)> {
        loop {
            let mut guard = self.fd.readable().await?;
            match guard.try_io(|fd| receive(fd.get_ref())) {
                Ok(Ok(Some(payload))) => return Ok(payload),
                Ok(Ok(None)) => continue,
                Ok(Err(error)) => return Err(error),
                Err(_would_block) => continue,
            }
        }
    }

    /// Sends a DHCP payload from 0.0.0.0:68 to 255.255.255.255:67 as a link broadcast.
    pub fn send_broadcast(&self, payload: &[u8]) -> io::Result<()> {
        let packet = udp_packet(Ipv4Addr::UNSPECIFIED, Ipv4Addr::BROADCAST, payload);
        // SAFETY: a zeroed sockaddr_ll is valid; the fields we need are set below.
        let mut address: libc::sockaddr_ll = unsafe { zeroed() };
        address.sll_family = libc::AF_PACKET as u16;
        address.sll_protocol = (libc::ETH_P_IP as u16).to_be();
        address.sll_ifindex = self.interface;
        address.sll_halen = 6;
        address.sll_addr[..6].copy_from_slice(&[0xff; 6]);
        // SAFETY: packet and address are live for the call, with the lengths passed.
        check(unsafe {
            libc::sendto(
                self.fd.get_ref().as_raw_fd(),
                packet.as_ptr().cast(),
                packet.len(),
                0,
                (&address as *const libc::sockaddr_ll).cast(),
                size_of::<libc::sockaddr_ll>() as u32,
            ) as libc::c_int
        })
        .map(drop)
    }
}

/// One recvmsg: the IP source and UDP payload, or None for a packet to skip.
fn receive(fd: &OwnedFd) -> io::Result<Option<(Ipv4Addr, Vec<u8>)>> {
    let mut frame = vec![0u8; MAX_FRAME];
    let mut control = [0u64; 16];
    let mut iov = libc::iovec {
        iov_base: frame.as_mut_ptr().cast(),
        iov_len: frame.len(),
    };
    // SAFETY: a zeroed msghdr is valid; buffers are set below and live for the call.
    let mut message: libc::msghdr = unsafe { zeroed() };
    message.msg_iov = &mut iov;
    message.msg_iovlen = 1;
    message.msg_control = control.as_mut_ptr().cast();
    message.msg_controllen = size_of::<[u64; 16]>();
    // SAFETY: message describes live buffers.
    let length = unsafe { libc::recvmsg(fd.as_raw_fd(), &mut message, 0) };
    if length < 0 {
        return Err(io::Error::last_os_error());
    }
    frame.truncate(length as usize);
    let mut checksum_ready = true;
    // SAFETY: walking the control messages the kernel filled in, with the libc macros.
    unsafe {
        let mut header = libc::CMSG_FIRSTHDR(&message);
        while !header.is_null() {
            if (*header).cmsg_level == libc::SOL_PACKET
                && (*header).cmsg_type == libc::PACKET_AUXDATA
            {
                let auxdata = std::ptr::read_unaligned(
                    libc::CMSG_DATA(header).cast::<libc::tpacket_auxdata>(),
                );
                checksum_ready = auxdata.tp_status & libc::TP_STATUS_CSUMNOTREADY == 0;
            }
            header = libc::CMSG_NXTHDR(&message, header);
        }
    }
    Ok(udp_payload(&frame, checksum_ready).map(|payload| {
        // udp_payload checked that the IP header is there.
        let source = Ipv4Addr::new(frame[12], frame[13], frame[14], frame[15]);
        (source, payload.to_vec())
    }))
}

/// The UDP payload of an IPv4 packet, if its headers hold together.
pub fn udp_payload(packet: &[u8], checksum_ready: bool) -> Option<&[u8]> {
    let header_length = usize::from(*packet.first()? & 0x0f) * 4;
    if packet[0] >> 4 != 4 || header_length < IP_HEADER {
        return None;
    }
    let total = usize::from(u16::from_be_bytes([*packet.get(2)?, *packet.get(3)?]));
    let packet = packet.get(..total)?;
    let udp = packet.get(header_length..)?;
    let udp_length = usize::from(u16::from_be_bytes([*udp.get(4)?, *udp.get(5)?]));
    if udp_length < UDP_HEADER {
        return None;
    }
    let udp = udp.get(..udp_length)?;
    let sent_checksum = u16::from_be_bytes([udp[6], udp[7]]);
    if checksum_ready && sent_checksum != 0 {
        let source = Ipv4Addr::new(packet[12], packet[13], packet[14], packet[15]);
        let destination = Ipv4Addr::new(packet[16], packet[17], packet[18], packet[19]);
        if udp_checksum(source, destination, udp) != 0 {
            return None;
        }
    }
    udp.get(UDP_HEADER..)
}

fn ones_complement_sum(data: &[u8], mut sum: u32) -> u32 {
    for chunk in data.chunks(2) {
        let word = u16::from_be_bytes([chunk[0], *chunk.get(1).unwrap_or(&0)]);
        sum += u32::from(word);
    }
    sum
}

fn fold(mut sum: u32) -> u16 {
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// The UDP checksum over the pseudo-header and `udp` (0 when `udp` carries a correct one).
fn udp_checksum(source: Ipv4Addr, destination: Ipv4Addr, udp: &[u8]) -> u16 {
    let mut pseudo = Vec::with_capacity(12);
    pseudo.extend_from_slice(&source.octets());
    pseudo.extend_from_slice(&destination.octets());
    pseudo.extend_from_slice(&[0, libc::IPPROTO_UDP as u8]);
    pseudo.extend_from_slice(&(udp.len() as u16).to_be_bytes());
    fold(ones_complement_sum(udp, ones_complement_sum(&pseudo, 0)))
}

/// An IPv4 + UDP packet from port 68 to port 67 around `payload`.
pub fn udp_packet(source: Ipv4Addr, destination: Ipv4Addr, payload: &[u8]) -> Vec<u8> {
    let udp_length = (UDP_HEADER + payload.len()) as u16;
    let total = IP_HEADER as u16 + udp_length;
    let mut packet = Vec::with_capacity(usize::from(total));
    packet.extend_from_slice(&[0x45, 0x10]);
    packet.extend_from_slice(&total.to_be_bytes());
    packet.extend_from_slice(&[0, 0, 0, 0, 64, libc::IPPROTO_UDP as u8, 0, 0]);
    packet.extend_from_slice(&source.octets());
    packet.extend_from_slice(&destination.octets());
    let header_checksum = fold(ones_complement_sum(&packet, 0));
    packet[10..12].copy_from_slice(&header_checksum.to_be_bytes());
    let mut udp = Vec::with_capacity(usize::from(udp_length));
    udp.extend_from_slice(&CLIENT_PORT.to_be_bytes());
    udp.extend_from_slice(&SERVER_PORT.to_be_bytes());
    udp.extend_from_slice(&udp_length.to_be_bytes());
    udp.extend_from_slice(&[0, 0]);
    udp.extend_from_slice(payload);
    let checksum = match udp_checksum(source, destination, &udp) {
        0 => 0xffff,
        sum => sum,
    };
    udp[6..8].copy_from_slice(&checksum.to_be_bytes());
    packet.extend_from_slice(&udp);
    packet
}

/// A UDP socket on the leased address, port 68, bound to the interface: for unicast to the
/// server while RENEWING and for RELEASE. Keeping it open also stops the kernel from
/// answering the server's unicast replies with ICMP port unreachable.
pub fn unicast_socket(address: Ipv4Addr, interface_name: &str) -> io::Result<UdpSocket> {
    // SAFETY: plain socket(2); the descriptor is owned right below.
    let raw =
        check(unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) })?;
    // SAFETY: raw is a fresh descriptor nobody else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(raw) };
    set_option(
        &fd,
        libc::SOL_SOCKET,
        libc::SO_REUSEADDR,
        &1 as &libc::c_int,
    )?;
    let name = interface_name.as_bytes();
    // SAFETY: name points to its bytes for the length passed.
    check(unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_BINDTODEVICE,
            name.as_ptr().cast(),
            name.len() as u32,
        )
    })?;
    let local = libc::sockaddr_in {
        sin_family: libc::AF_INET as u16,
        sin_port: CLIENT_PORT.to_be(),
        sin_addr: libc::in_addr {
            s_addr: u32::from(address).to_be(),
        },
        sin_zero: [0; 8],
    };
    // SAFETY: local is a sockaddr_in of the size passed.
    check(unsafe {
        libc::bind(
            fd.as_raw_fd(),
            (&local as *const libc::sockaddr_in).cast(),
            size_of::<libc::sockaddr_in>() as u32,
        )
    })?;
    Ok(UdpSocket::from(fd))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn built_packets_parse_back_with_valid_checksums() {
        let packet = udp_packet(
            Ipv4Addr::new(10, 0, 1, 2),
            Ipv4Addr::BROADCAST,
            b"dhcp payload",
        );
        assert_eq!(udp_payload(&packet, true), Some(&b"dhcp payload"[..]));
        let mut corrupted = packet.clone();
        *corrupted.last_mut().unwrap() ^= 1;
        assert_eq!(udp_payload(&corrupted, true), None, "bad checksum");
        assert_eq!(
            udp_payload(&corrupted, false).map(<[u8]>::len),
            Some(12),
            "checksum not ready yet: accepted"
        );
        // Found by the fuzzer: a UDP length below the header's own size.
        let mut short_udp = packet.clone();
        short_udp[24..26].copy_from_slice(&0u16.to_be_bytes());
        for truncated in [
            &packet[..3],
            &packet[..25],
            &[0x65u8; 40][..],
            &short_udp[..],
        ] {
            assert_eq!(udp_payload(truncated, true), None);
        }
    }
}

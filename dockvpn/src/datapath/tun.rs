//! A tun device opened by hand, so that it can carry a virtio-net header and take TSO/USO
//! super-packets from the kernel (tokio_tun can do neither).
//!
//! With [`Offload::Auto`] the device is opened with `IFF_VNET_HDR` and offers the kernel
//! checksum, TCP (TSO4) and UDP (USO4) segmentation offload, falling back step by step where
//! the kernel refuses; a TCP stream routed into the tunnel then arrives as a few 64 KiB reads
//! instead of dozens of 1500-byte ones. [`Tun::read_into`] cuts each read into wire packets
//! ([`segment`]); [`Tun::write`] puts a plain header in front of each packet.

use std::fmt;
use std::fs::OpenOptions;
use std::io::{self, IoSlice};
use std::net::Ipv4Addr;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};

use nix::errno::Errno;

use super::offload::{segment, OffloadError, Packets, VirtioNetHdr, VIRTIO_NET_HDR_LEN};

/// The scratch [`Tun::read_into`] needs: the largest super-packet after its header.
pub const READ_SCRATCH_LEN: usize = VIRTIO_NET_HDR_LEN + u16::MAX as usize;

const TUN_DEVICE: &str = "/dev/net/tun";
const PERMISSION_HINT: &str = "the container needs --cap-add NET_ADMIN and --device /dev/net/tun";

/// Whether to ask the kernel for offloads (`--offload`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum Offload {
    /// A virtio-net header with checksum, TSO4 and USO4 offloads, as far as the kernel
    /// accepts them.
    #[default]
    Auto,
    /// A plain tun: one packet per read, no header.
    Off,
}

/// What the opened tun actually does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Offloads {
    /// Every read and write carries a virtio-net header.
    pub vnet_hdr: bool,
    /// The kernel leaves transport checksums to us (`TUN_F_CSUM`).
    pub csum: bool,
    /// The kernel hands over TCP super-packets (`TUN_F_TSO4`).
    pub tso4: bool,
    /// The kernel hands over UDP super-packets (`TUN_F_USO4`, with `TUN_F_USO6`).
    pub uso4: bool,
}

impl Offloads {
    /// A plain tun.
    pub const NONE: Offloads = Offloads {
        vnet_hdr: false,
        csum: false,
        tso4: false,
        uso4: false,
    };

    /// The `TUNSETOFFLOAD` argument.
    fn tun_flags(&self) -> libc::c_uint {
        let mut flags = 0;
        if self.csum {
            flags |= libc::TUN_F_CSUM;
        }
        if self.tso4 {
            flags |= libc::TUN_F_TSO4;
        }
        if self.uso4 {
            // The kernel has one UDP segmentation feature for both families and takes
            // USO4 only together with USO6; `segment` refuses IPv6 super-packets, which
            // the IPv4 tunnel would drop anyway.
            flags |= libc::TUN_F_USO4 | libc::TUN_F_USO6;
        }
        flags
    }
}

/// `csum,tso4,uso4`, or `none`: for the start-up log line.
impl fmt::Display for Offloads {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        let enabled = [
            ("csum", self.csum),
            ("tso4", self.tso4),
            ("uso4", self.uso4),
        ];
        let mut first = true;
        for (name, _) in enabled.iter().filter(|(_, on)| *on) {
            if !first {
                formatter.write_str(",")?;
            }
            formatter.write_str(name)?;
            first = false;
        }
        if first {
            formatter.write_str("none")?;
        }
        Ok(())
    }
}

/// What one [`Tun::read_into`] produced.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TunRead {
    /// This many wire packets were appended.
    Appended(usize),
    /// The read was a packet the kernel should never hand over (a bad header or
    /// super-packet): dropped, the reason for the driver's counters.
    Dropped(OffloadError),
}

/// An open tun device; closing it removes the device.
#[derive(Debug)]
pub struct Tun {
    fd: OwnedFd,
    name: String,
    /// The name as `ifreq` wants it, for the configuration ioctls.
    ifr_name: InterfaceName,
    offloads: Offloads,
}

type InterfaceName = [libc::c_char; libc::IFNAMSIZ];

impl Tun {
    /// Creates the tun device `name` (a `%d` in it picks a free number) and negotiates the
    /// offloads `offload` allows. Offloads the kernel refuses are left off: the most it
    /// accepts of `csum,tso4,uso4` then `csum,tso4`, else a plain tun without a header.
    pub fn open(name: &str, offload: Offload) -> io::Result<Tun> {
        let with_context = |error: io::Error| {
            io::Error::new(
                error.kind(),
                format!("create the tun device {name}: {error} ({PERMISSION_HINT})"),
            )
        };
        if offload == Offload::Auto {
            if let Some(tun) = Tun::open_with_offloads(name).map_err(with_context)? {
                return Ok(tun);
            }
        }
        let (fd, ifr_name) = create(name, libc::IFF_TUN | libc::IFF_NO_PI).map_err(with_context)?;
        Ok(Tun::new(fd, ifr_name, Offloads::NONE))
    }

    /// `None` when the kernel takes neither offload set (the device is closed again).
    fn open_with_offloads(name: &str) -> io::Result<Option<Tun>> {
        let flags = libc::IFF_TUN | libc::IFF_NO_PI | libc::IFF_VNET_HDR;
        let (fd, ifr_name) = match create(name, flags) {
            Ok(created) => created,
            Err(error) if error.raw_os_error() == Some(libc::EINVAL) => return Ok(None),
            Err(error) => return Err(error),
        };
        let header_len = VIRTIO_NET_HDR_LEN as libc::c_int;
        // SAFETY: TUNSETVNETHDRSZ reads one int through the pointer, which outlives the call.
        if Errno::result(unsafe { libc::ioctl(fd.as_raw_fd(), libc::TUNSETVNETHDRSZ, &header_len) })
            .is_err()
        {
            return Ok(None);
        }
        // Legacy headers are in host order unless this is set; offload.rs reads little-endian.
        let little_endian: libc::c_int = 1;
        // SAFETY: TUNSETVNETLE reads one int through the pointer, which outlives the call.
        let set_le = unsafe { libc::ioctl(fd.as_raw_fd(), libc::TUNSETVNETLE, &little_endian) };
        if Errno::result(set_le).is_err() && cfg!(target_endian = "big") {
            return Ok(None);
        }
        let candidates = [
            Offloads {
                vnet_hdr: true,
                csum: true,
                tso4: true,
                uso4: true,
            },
            // Kernels before 6.2 know no USO.
            Offloads {
                vnet_hdr: true,
                csum: true,
                tso4: true,
                uso4: false,
            },
        ];
        for offloads in candidates {
            // SAFETY: TUNSETOFFLOAD takes its argument by value.
            let set = unsafe {
                libc::ioctl(
                    fd.as_raw_fd(),
                    libc::TUNSETOFFLOAD,
                    libc::c_ulong::from(offloads.tun_flags()),
                )
            };
            if Errno::result(set).is_ok() {
                return Ok(Some(Tun::new(fd, ifr_name, offloads)));
            }
        }
        // A header with nothing to offload costs a writev per packet for nothing.
        Ok(None)
    }

    fn new(fd: OwnedFd, ifr_name: InterfaceName, offloads: Offloads) -> Tun {
        let name_bytes: Vec<u8> = ifr_name
            .iter()
            .take_while(|&&byte| byte != 0)
            .map(|&byte| byte as u8)
            .collect();
        Tun {
            fd,
            name: String::from_utf8_lossy(&name_bytes).into_owned(),
            ifr_name,
            offloads,
        }
    }

    /// The device's name as the kernel made it.
    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn offloads(&self) -> Offloads {
        self.offloads
    }

    /// Sets the device's IPv4 address, netmask and MTU, and brings it up.
    pub fn configure(&self, address: Ipv4Addr, netmask: Ipv4Addr, mtu: u32) -> io::Result<()> {
        let context = |what: String| {
            let name = self.name.clone();
            move |error: io::Error| {
                io::Error::new(
                    error.kind(),
                    format!("configure the tun device {name}: {what}: {error} ({PERMISSION_HINT})"),
                )
            }
        };
        let mtu = libc::c_int::try_from(mtu).map_err(|_| {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("tun device {}: MTU {mtu} is out of range", self.name),
            )
        })?;
        // SAFETY: socket() has no memory arguments; the result is checked before use.
        let socket = Errno::result(unsafe {
            libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0)
        })
        .map_err(io::Error::from)
        .map_err(context("open a control socket".into()))?;
        // SAFETY: a fresh descriptor that nothing else owns.
        let socket = unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(socket) };

        let mut request = self.request();
        request.ifr_ifru.ifru_addr = ipv4_sockaddr(address);
        interface_ioctl(&socket, libc::SIOCSIFADDR, &mut request)
            .map_err(context(format!("set address {address}")))?;

        let mut request = self.request();
        request.ifr_ifru.ifru_netmask = ipv4_sockaddr(netmask);
        interface_ioctl(&socket, libc::SIOCSIFNETMASK, &mut request)
            .map_err(context(format!("set netmask {netmask}")))?;

        let mut request = self.request();
        request.ifr_ifru.ifru_mtu = mtu;
        interface_ioctl(&socket, libc::SIOCSIFMTU, &mut request)
            .map_err(context(format!("set MTU {mtu}")))?;

        let mut request = self.request();
        interface_ioctl(&socket, libc::SIOCGIFFLAGS, &mut request)
            .map_err(context("read its flags".into()))?;
        // SAFETY: SIOCGIFFLAGS filled in the flags member of the union.
        unsafe {
            request.ifr_ifru.ifru_flags |= (libc::IFF_UP | libc::IFF_RUNNING) as libc::c_short
        };
        interface_ioctl(&socket, libc::SIOCSIFFLAGS, &mut request)
            .map_err(context("bring it up".into()))
    }

    pub fn set_nonblocking(&self, nonblocking: bool) -> io::Result<()> {
        let fd = self.fd.as_raw_fd();
        // SAFETY: F_GETFL and F_SETFL take no memory arguments.
        let flags = Errno::result(unsafe { libc::fcntl(fd, libc::F_GETFL) })?;
        let flags = if nonblocking {
            flags | libc::O_NONBLOCK
        } else {
            flags & !libc::O_NONBLOCK
        };
        // SAFETY: as above.
        Errno::result(unsafe { libc::fcntl(fd, libc::F_SETFL, flags) })?;
        Ok(())
    }

    /// Reads one packet or super-packet into `scratch` (at least [`READ_SCRATCH_LEN`] bytes,
    /// reused by the caller from read to read) and appends its wire packets to `out`.
    /// An I/O error is the read's (`WouldBlock` when nonblocking and empty); a malformed
    /// super-packet is [`TunRead::Dropped`] and appends nothing.
    pub fn read_into(&self, scratch: &mut [u8], out: &mut Packets) -> io::Result<TunRead> {
        if scratch.len() < READ_SCRATCH_LEN {
            // A shorter buffer would truncate super-packets silently.
            return Err(io::ErrorKind::InvalidInput.into());
        }
        let len = nix::unistd::read(&self.fd, scratch)?;
        let read = &scratch[..len];
        if !self.offloads.vnet_hdr {
            if read.is_empty() {
                return Ok(TunRead::Appended(0));
            }
            out.push(read);
            return Ok(TunRead::Appended(1));
        }
        let outcome = VirtioNetHdr::parse(read)
            .and_then(|(hdr, packet)| segment(&hdr, packet, out))
            .map_or_else(TunRead::Dropped, TunRead::Appended);
        Ok(outcome)
    }

    /// Writes one complete IPv4 or IPv6 packet (checksums done).
    pub fn write(&self, packet: &[u8]) -> io::Result<()> {
        if self.offloads.vnet_hdr {
            self.write_with_header(&VirtioNetHdr::PLAIN, packet)
        } else {
            expect_all_written(nix::unistd::write(&self.fd, packet)?, packet.len())
        }
    }

    /// Writes a packet with its own virtio-net header (a GSO super-packet the kernel will
    /// segment, for instance). `Unsupported` on a tun without headers.
    pub fn write_with_header(&self, hdr: &VirtioNetHdr, packet: &[u8]) -> io::Result<()> {
        if !self.offloads.vnet_hdr {
            return Err(io::ErrorKind::Unsupported.into());
        }
        let header = hdr.encode();
        let written =
            nix::sys::uio::writev(&self.fd, &[IoSlice::new(&header), IoSlice::new(packet)])?;
        expect_all_written(written, header.len() + packet.len())
    }

    /// An `ifreq` naming this device.
    fn request(&self) -> libc::ifreq {
        let mut request = zeroed_request();
        request.ifr_name = self.ifr_name;
        request
    }
}

impl AsRawFd for Tun {
    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

impl AsFd for Tun {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

/// Opens /dev/net/tun and attaches it to a new device; returns the kernel's name for it.
fn create(name: &str, flags: libc::c_int) -> io::Result<(OwnedFd, InterfaceName)> {
    let mut request = interface_request(name)?;
    let fd: OwnedFd = OpenOptions::new()
        .read(true)
        .write(true)
        .open(TUN_DEVICE)
        .map_err(|error| io::Error::new(error.kind(), format!("open {TUN_DEVICE}: {error}")))?
        .into();
    request.ifr_ifru.ifru_flags = flags as libc::c_short;
    // SAFETY: TUNSETIFF reads and writes the ifreq, which outlives the call.
    Errno::result(unsafe { libc::ioctl(fd.as_raw_fd(), libc::TUNSETIFF, &mut request) })?;
    Ok((fd, request.ifr_name))
}

fn zeroed_request() -> libc::ifreq {
    // SAFETY: ifreq is plain data (a name and a union of integers, addresses and a pointer);
    // all zeroes is a valid value of each.
    unsafe { std::mem::zeroed() }
}

/// An `ifreq` carrying `name`, which must fit `IFNAMSIZ` with its NUL.
fn interface_request(name: &str) -> io::Result<libc::ifreq> {
    if name.is_empty() || name.len() >= libc::IFNAMSIZ || name.contains('\0') {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!(
                "tun device name {name:?} must be 1 to {} bytes without NUL",
                libc::IFNAMSIZ - 1
            ),
        ));
    }
    let mut request = zeroed_request();
    for (slot, &byte) in request.ifr_name.iter_mut().zip(name.as_bytes()) {
        *slot = byte as libc::c_char;
    }
    Ok(request)
}

fn interface_ioctl(
    socket: &OwnedFd,
    operation: libc::c_ulong,
    request: &mut libc::ifreq,
) -> io::Result<()> {
    // SAFETY: the SIOC[GS]IF* operations read or write one ifreq, which outlives the call.
    Errno::result(unsafe { libc::ioctl(socket.as_raw_fd(), operation as _, request as *mut _) })?;
    Ok(())
}

fn ipv4_sockaddr(address: Ipv4Addr) -> libc::sockaddr {
    let inet = libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: 0,
        sin_addr: libc::in_addr {
            s_addr: u32::from_ne_bytes(address.octets()),
        },
        sin_zero: [0; 8],
    };
    // SAFETY: sockaddr_in and sockaddr are both the 16-byte C socket address; the kernel
    // reads this one as sockaddr_in because of its family.
    unsafe { std::mem::transmute::<libc::sockaddr_in, libc::sockaddr>(inet) }
}

/// A tun takes or refuses a packet whole; anything else is worth an error, not a retry.
fn expect_all_written(written: usize, expected: usize) -> io::Result<()> {
    if written == expected {
        Ok(())
    } else {
        Err(io::ErrorKind::WriteZero.into())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::datapath::offload::TunWriteBatch;
    use crate::datapath::test_support::{in_new_network_namespace, ones_complement_sum};
    use std::io::Write;
    use std::net::{SocketAddrV4, TcpStream, UdpSocket};
    use std::time::{Duration, Instant};

    use nix::sys::socket::{self, sockopt, AddressFamily, SockFlag, SockType, SockaddrIn};

    const TUN_ADDRESS: Ipv4Addr = Ipv4Addr::new(10, 99, 0, 1);
    const NETMASK: Ipv4Addr = Ipv4Addr::new(255, 255, 255, 0);
    /// Routed into the tun; nobody is there but the test.
    const PEER: Ipv4Addr = Ipv4Addr::new(10, 99, 0, 2);
    const PEER_PORT: u16 = 9999;
    const MTU: usize = 1500;

    fn open_configured(offload: Offload) -> Tun {
        let tun = Tun::open("dvtest%d", offload).expect("open the tun");
        tun.configure(TUN_ADDRESS, NETMASK, MTU as u32)
            .expect("configure the tun");
        tun.set_nonblocking(true).expect("nonblocking");
        eprintln!(
            "{} ({offload:?}): kernel accepted offloads {}",
            tun.name(),
            tun.offloads()
        );
        tun
    }

    /// The next read that yields something, within `deadline`.
    fn next_read(tun: &Tun, scratch: &mut [u8], out: &mut Packets, deadline: Instant) -> usize {
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            assert!(!left.is_zero(), "the tun stayed silent");
            let mut poll = libc::pollfd {
                fd: tun.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: one pollfd, alive for the call.
            unsafe { libc::poll(&mut poll, 1, left.as_millis().min(1000) as libc::c_int) };
            match tun.read_into(scratch, out) {
                Ok(TunRead::Appended(count)) => return count,
                Ok(TunRead::Dropped(reason)) => panic!("the kernel handed over {reason}"),
                Err(error) if error.kind() == io::ErrorKind::WouldBlock => continue,
                Err(error) => panic!("tun read: {error}"),
            }
        }
    }

    fn pseudo_header(packet: &[u8]) -> [u8; 12] {
        let mut pseudo = [0; 12];
        pseudo[..8].copy_from_slice(&packet[12..20]);
        pseudo[9] = packet[9];
        let transport_len = (packet.len() - 20) as u16;
        pseudo[10..].copy_from_slice(&transport_len.to_be_bytes());
        pseudo
    }

    /// A wire-ready IPv4 packet (no options): lengths right, both checksums verify.
    fn assert_valid_ipv4(packet: &[u8]) {
        assert!(packet.len() <= MTU, "a {}-byte packet", packet.len());
        assert_eq!(packet[0], 0x45, "IPv4 without options, no header in front");
        assert_eq!(
            usize::from(u16::from_be_bytes([packet[2], packet[3]])),
            packet.len()
        );
        assert_eq!(
            ones_complement_sum(&[&packet[..20]]),
            0xffff,
            "IPv4 checksum"
        );
        let pseudo = pseudo_header(packet);
        assert_eq!(
            ones_complement_sum(&[&pseudo, &packet[20..]]),
            0xffff,
            "transport checksum"
        );
    }

    /// Fills in both checksums of an IPv4 packet without options.
    fn with_checksums(mut packet: Vec<u8>, checksum_at: usize) -> Vec<u8> {
        let ip_checksum = !ones_complement_sum(&[&packet[..20]]);
        packet[10..12].copy_from_slice(&ip_checksum.to_be_bytes());
        let pseudo = pseudo_header(&packet);
        let transport_checksum = !ones_complement_sum(&[&pseudo, &packet[20..]]);
        packet[checksum_at..checksum_at + 2].copy_from_slice(&transport_checksum.to_be_bytes());
        packet
    }

    fn ipv4_header(
        total_len: usize,
        protocol: u8,
        source: Ipv4Addr,
        destination: Ipv4Addr,
    ) -> Vec<u8> {
        let mut header = vec![0x45, 0];
        header.extend_from_slice(&(total_len as u16).to_be_bytes());
        header.extend_from_slice(&[0, 0, 0x40, 0, 64, protocol, 0, 0]);
        header.extend_from_slice(&source.octets());
        header.extend_from_slice(&destination.octets());
        header
    }

    /// A datagram from the peer to `port` on the tun's address, as a client's would arrive.
    fn datagram_from_peer(port: u16, payload: &[u8]) -> Vec<u8> {
        let mut packet = ipv4_header(28 + payload.len(), 17, PEER, TUN_ADDRESS);
        packet.extend_from_slice(&PEER_PORT.to_be_bytes());
        packet.extend_from_slice(&port.to_be_bytes());
        packet.extend_from_slice(&((8 + payload.len()) as u16).to_be_bytes());
        packet.extend_from_slice(&[0, 0]);
        packet.extend_from_slice(payload);
        with_checksums(packet, 26)
    }

    fn is_udp_to_peer(packet: &[u8]) -> bool {
        packet.len() >= 28
            && packet[0] >> 4 == 4
            && packet[9] == 17
            && packet[16..20] == PEER.octets()
            && packet[22..24] == PEER_PORT.to_be_bytes()
    }

    /// USO came with Linux 6.2: from there on, `Auto` must get it.
    fn kernel_has_uso() -> bool {
        let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").expect("osrelease");
        let mut numbers = release
            .split(|c: char| !c.is_ascii_digit())
            .map(|number| number.parse::<u32>().unwrap_or(0));
        let version = (numbers.next().unwrap_or(0), numbers.next().unwrap_or(0));
        version >= (6, 2)
    }

    fn pattern(len: usize) -> Vec<u8> {
        (0..len)
            .map(|index| (index * 13 + index / 509) as u8)
            .collect()
    }

    /// Writes a datagram into the tun and expects `socket` to receive it.
    fn assert_write_reaches(tun: &Tun, socket: &UdpSocket, payload: &[u8]) {
        let port = socket.local_addr().expect("bound").port();
        tun.write(&datagram_from_peer(port, payload))
            .expect("tun write");
        socket
            .set_read_timeout(Some(Duration::from_secs(5)))
            .expect("timeout");
        let mut buffer = [0; 2048];
        let (len, from) = socket
            .recv_from(&mut buffer)
            .expect("the datagram written into the tun");
        assert_eq!(&buffer[..len], payload);
        assert_eq!(from, SocketAddrV4::new(PEER, PEER_PORT).into());
    }

    #[test]
    fn auto_tun_hands_over_udp_super_packets_that_segment_into_valid_datagrams() {
        in_new_network_namespace("auto_tun_udp", || {
            let tun = open_configured(Offload::Auto);
            let offloads = tun.offloads();
            assert!(
                offloads.vnet_hdr && offloads.csum && offloads.tso4,
                "{offloads}"
            );

            let sender = UdpSocket::bind((TUN_ADDRESS, 0)).expect("bind");
            // The socket hands the stack one 20 KB send cut at 1000 bytes (UDP GSO); with
            // USO4 on, the stack passes it to the tun whole.
            socket::setsockopt(&sender, sockopt::UdpGsoSegment, &1000).expect("UDP_SEGMENT");
            let data = pattern(20_000);
            sender.send_to(&data, (PEER, PEER_PORT)).expect("send");

            let mut scratch = vec![0; READ_SCRATCH_LEN];
            let mut out = Packets::new();
            let mut received = Vec::new();
            let mut most_datagrams_in_one_read = 0;
            let deadline = Instant::now() + Duration::from_secs(5);
            while received.len() < data.len() {
                out.clear();
                next_read(&tun, &mut scratch, &mut out, deadline);
                let mut datagrams = 0;
                // Skip what else the kernel sends (IPv6 router solicitations).
                for packet in out.iter().filter(|packet| is_udp_to_peer(packet)) {
                    assert_valid_ipv4(packet);
                    assert_eq!(
                        usize::from(u16::from_be_bytes([packet[24], packet[25]])),
                        packet.len() - 20
                    );
                    assert_eq!(packet.len(), 1028, "each 1000-byte piece is one datagram");
                    received.extend_from_slice(&packet[28..]);
                    datagrams += 1;
                }
                most_datagrams_in_one_read = most_datagrams_in_one_read.max(datagrams);
            }
            assert!(
                received == data,
                "the datagrams concatenate to what was sent"
            );
            if kernel_has_uso() {
                assert!(offloads.uso4, "Linux >= 6.2 takes USO4, got {offloads}");
                assert!(
                    most_datagrams_in_one_read > 1,
                    "USO4 is on, yet no read held a UDP super-packet"
                );
            }
            eprintln!("UDP: at most {most_datagrams_in_one_read} datagrams from one tun read");

            assert_write_reaches(
                &tun,
                &sender,
                b"a datagram written with a plain vnet header",
            );
        });
    }

    const SERVER_ISN: u32 = 0x1000_0000;
    const TCP_FLAG_SYN: u8 = 0x02;
    const TCP_FLAG_ACK: u8 = 0x10;

    /// A TCP packet from the peer to the tun's address, checksums complete.
    struct FromPeer<'a> {
        ports: (u16, u16),
        sequence: u32,
        ack: u32,
        flags: u8,
        options: &'a [u8],
        payload: &'a [u8],
    }

    fn tcp_from_peer(spec: FromPeer<'_>) -> Vec<u8> {
        let tcp_len = 20 + spec.options.len() + spec.payload.len();
        let mut packet = ipv4_header(20 + tcp_len, 6, PEER, TUN_ADDRESS);
        packet.extend_from_slice(&spec.ports.0.to_be_bytes());
        packet.extend_from_slice(&spec.ports.1.to_be_bytes());
        packet.extend_from_slice(&spec.sequence.to_be_bytes());
        packet.extend_from_slice(&spec.ack.to_be_bytes());
        let data_offset = ((20 + spec.options.len()) / 4) as u8;
        packet.extend_from_slice(&[data_offset << 4, spec.flags, 0xff, 0xff, 0, 0, 0, 0]);
        packet.extend_from_slice(spec.options);
        packet.extend_from_slice(spec.payload);
        with_checksums(packet, 36)
    }

    /// MSS 1460, nothing else.
    const MSS_OPTION: [u8; 4] = [2, 4, 0x05, 0xb4];

    /// The peer's answer to the SYN: MSS 1460, a 64 KiB window.
    fn syn_ack(client_port: u16, client_isn: u32) -> Vec<u8> {
        tcp_from_peer(FromPeer {
            ports: (80, client_port),
            sequence: SERVER_ISN,
            ack: client_isn.wrapping_add(1),
            flags: TCP_FLAG_SYN | TCP_FLAG_ACK,
            options: &MSS_OPTION,
            payload: &[],
        })
    }

    /// (client port, sequence number, flags, payload) of a TCP packet to the peer's port 80.
    fn tcp_to_peer(packet: &[u8]) -> Option<(u16, u32, u8, &[u8])> {
        if packet.len() < 40
            || packet[0] != 0x45
            || packet[9] != 6
            || packet[16..20] != PEER.octets()
        {
            return None;
        }
        let tcp = &packet[20..];
        if tcp[2..4] != 80u16.to_be_bytes() {
            return None;
        }
        let header_len = usize::from(tcp[12] >> 4) * 4;
        Some((
            u16::from_be_bytes([tcp[0], tcp[1]]),
            u32::from_be_bytes([tcp[4], tcp[5], tcp[6], tcp[7]]),
            tcp[13],
            tcp.get(header_len..)?,
        ))
    }

    #[test]
    fn auto_tun_hands_over_tcp_super_packets_that_segment_into_a_valid_stream() {
        in_new_network_namespace("auto_tun_tcp", || {
            let tun = open_configured(Offload::Auto);
            let mut scratch = vec![0; READ_SCRATCH_LEN];
            let mut out = Packets::new();
            let deadline = Instant::now() + Duration::from_secs(5);

            let client = socket::socket(
                AddressFamily::Inet,
                SockType::Stream,
                SockFlag::SOCK_NONBLOCK | SockFlag::SOCK_CLOEXEC,
                None,
            )
            .expect("socket");
            // Send the whole write at once rather than hold its last partial segment.
            socket::setsockopt(&client, sockopt::TcpNoDelay, &true).expect("TCP_NODELAY");
            let peer = SockaddrIn::from(SocketAddrV4::new(PEER, 80));
            match socket::connect(client.as_raw_fd(), &peer) {
                Err(Errno::EINPROGRESS) => {}
                other => panic!("connect: {other:?}"),
            }

            // Play the peer: answer the SYN the stack sends into the tun.
            let (client_port, client_isn) = loop {
                out.clear();
                next_read(&tun, &mut scratch, &mut out, deadline);
                let syn = out.iter().find_map(|packet| {
                    let (port, sequence, flags, _) = tcp_to_peer(packet)?;
                    (flags & TCP_FLAG_SYN != 0).then_some((port, sequence))
                });
                if let Some(syn) = syn {
                    break syn;
                }
            };
            tun.write(&syn_ack(client_port, client_isn))
                .expect("write the SYN-ACK");
            let mut poll = libc::pollfd {
                fd: client.as_raw_fd(),
                events: libc::POLLOUT,
                revents: 0,
            };
            // SAFETY: one pollfd, alive for the call.
            let ready = unsafe { libc::poll(&mut poll, 1, 5000) };
            assert_eq!(ready, 1, "the handshake completes");
            assert_eq!(socket::getsockopt(&client, sockopt::SocketError), Ok(0));

            let mut stream = TcpStream::from(client);
            stream.set_nonblocking(false).expect("blocking");
            // Fits the initial congestion window (10 × 1460), so it all leaves at once.
            let data = pattern(10_000);
            stream.write_all(&data).expect("write the stream");

            let mut received = Vec::new();
            let mut most_segments_in_one_read = 0;
            let mut next_sequence = client_isn.wrapping_add(1);
            while received.len() < data.len() {
                out.clear();
                next_read(&tun, &mut scratch, &mut out, deadline);
                let mut segments = 0;
                for packet in out.iter() {
                    let Some((port, sequence, _, payload)) = tcp_to_peer(packet) else {
                        continue;
                    };
                    if port != client_port || payload.is_empty() {
                        continue;
                    }
                    assert_valid_ipv4(packet);
                    assert!(payload.len() <= 1460, "cut at the MSS we announced");
                    if sequence != next_sequence {
                        // A retransmission of what we already have (we never ACK).
                        assert!(sequence.wrapping_sub(next_sequence) > u32::MAX / 2, "a gap");
                        continue;
                    }
                    received.extend_from_slice(payload);
                    next_sequence = next_sequence.wrapping_add(payload.len() as u32);
                    segments += 1;
                }
                most_segments_in_one_read = most_segments_in_one_read.max(segments);
            }
            assert!(received == data, "the segments concatenate to the stream");
            if tun.offloads().tso4 {
                assert!(
                    most_segments_in_one_read > 1,
                    "TSO4 is on, yet no read held a TCP super-packet"
                );
            }
            eprintln!("TCP: at most {most_segments_in_one_read} segments from one tun read");
        });
    }

    #[test]
    fn off_tun_reads_and_writes_plain_packets_without_a_header() {
        in_new_network_namespace("off_tun", || {
            let tun = open_configured(Offload::Off);
            assert_eq!(tun.offloads(), Offloads::NONE);

            let socket = UdpSocket::bind((TUN_ADDRESS, 0)).expect("bind");
            let payload = b"one datagram through a plain tun";
            socket.send_to(payload, (PEER, PEER_PORT)).expect("send");
            let mut scratch = vec![0; READ_SCRATCH_LEN];
            let mut out = Packets::new();
            let deadline = Instant::now() + Duration::from_secs(5);
            let datagram = loop {
                out.clear();
                assert_eq!(next_read(&tun, &mut scratch, &mut out, deadline), 1);
                if let Some(packet) = out.iter().find(|packet| is_udp_to_peer(packet)) {
                    break packet.to_vec();
                }
            };
            assert_valid_ipv4(&datagram);
            assert_eq!(&datagram[28..], payload);

            assert_write_reaches(&tun, &socket, b"a datagram written without a header");
        });
    }

    #[test]
    fn offloads_display_as_a_list_or_none() {
        let all = Offloads {
            vnet_hdr: true,
            csum: true,
            tso4: true,
            uso4: true,
        };
        assert_eq!(all.to_string(), "csum,tso4,uso4");
        assert_eq!(Offloads { uso4: false, ..all }.to_string(), "csum,tso4");
        assert_eq!(Offloads::NONE.to_string(), "none");
    }

    #[test]
    fn a_name_the_kernel_cannot_take_is_refused_before_opening() {
        let error = Tun::open("a-name-longer-than-ifnamsiz", Offload::Off).expect_err("too long");
        assert_eq!(error.kind(), io::ErrorKind::InvalidInput);
        assert!(
            error.to_string().contains("a-name-longer-than-ifnamsiz"),
            "{error}"
        );
    }

    #[test]
    fn a_short_scratch_is_refused_rather_than_truncating_super_packets() {
        in_new_network_namespace("short_scratch", || {
            let tun = Tun::open("dvtest%d", Offload::Auto).expect("open");
            let error = tun
                .read_into(&mut [0; 1500], &mut Packets::new())
                .expect_err("short scratch");
            assert_eq!(error.kind(), io::ErrorKind::InvalidInput);
        });
    }

    #[test]
    fn the_kernel_takes_a_coalesced_tcp_super_packet_written_to_the_tun() {
        in_new_network_namespace("coalesced_write", || {
            let tun = open_configured(Offload::Auto);
            assert!(tun.offloads().tso4, "{}", tun.offloads());
            let listener = std::net::TcpListener::bind((TUN_ADDRESS, 5000)).expect("listen");
            let mut scratch = vec![0; READ_SCRATCH_LEN];
            let mut out = Packets::new();
            let deadline = Instant::now() + Duration::from_secs(5);
            let ports = (40000, 5000);
            let client_isn = 0x7000_0000u32;

            // Play the client: SYN, read the SYN-ACK, ACK.
            tun.write(&tcp_from_peer(FromPeer {
                ports,
                sequence: client_isn,
                ack: 0,
                flags: TCP_FLAG_SYN,
                options: &MSS_OPTION,
                payload: &[],
            }))
            .expect("write the SYN");
            let server_isn = loop {
                out.clear();
                next_read(&tun, &mut scratch, &mut out, deadline);
                let syn_ack = out.iter().find(|packet| {
                    packet.len() >= 40
                        && packet[9] == 6
                        && packet[16..20] == PEER.octets()
                        && packet[33] == TCP_FLAG_SYN | TCP_FLAG_ACK
                });
                if let Some(packet) = syn_ack {
                    break u32::from_be_bytes([packet[24], packet[25], packet[26], packet[27]]);
                }
            };
            let data = pattern(4 * 1400 + 321);
            let segment = |index: usize, flags: u8| {
                let start = index * 1400;
                tcp_from_peer(FromPeer {
                    ports,
                    sequence: client_isn.wrapping_add(1 + start as u32),
                    ack: server_isn.wrapping_add(1),
                    flags,
                    options: &[],
                    payload: &data[start..data.len().min(start + 1400)],
                })
            };
            tun.write(&tcp_from_peer(FromPeer {
                ports,
                sequence: client_isn.wrapping_add(1),
                ack: server_isn.wrapping_add(1),
                flags: TCP_FLAG_ACK,
                options: &[],
                payload: &[],
            }))
            .expect("write the ACK");
            let mut batch = TunWriteBatch::new();
            for index in 0..5 {
                let flags = if index == 4 {
                    TCP_FLAG_ACK | 0x08
                } else {
                    TCP_FLAG_ACK
                };
                batch.push(&segment(index, flags));
            }
            assert_eq!(batch.len(), 1, "one super-packet");
            let (hdr, super_packet) = batch.get(0).expect("one write");
            assert_eq!(hdr.gso_type, crate::datapath::offload::GSO_TCPV4);
            tun.write_with_header(hdr, super_packet)
                .expect("the kernel takes the super-packet");

            listener.set_nonblocking(false).expect("blocking");
            let (mut accepted, _) = listener.accept().expect("the handshake completed");
            accepted
                .set_read_timeout(Some(Duration::from_secs(5)))
                .expect("timeout");
            let mut received = vec![0; data.len()];
            std::io::Read::read_exact(&mut accepted, &mut received).expect("the stream arrives");
            assert!(received == data, "the stream arrives whole and in order");
        });
    }
}

//! The batched UDP socket: many datagrams per system call (`recvmmsg` / `sendmmsg`), UDP GRO
//! on receive and UDP GSO (`UDP_SEGMENT`) on send where the kernel has them, and the plain
//! path where it has not or `--offload off` asks for it.
//!
//! Like `crate::udp::Listener`, a socket bound to 0.0.0.0 answers each peer from the address
//! that peer's datagrams came to (IP_PKTINFO): left to itself the kernel picks the source by
//! `main`, where a learned left route may cover the client, and the reply would leave from
//! the left address, which vnf-core's `from <right address>` rule cannot send right. So
//! every received datagram carries its local address, and every datagram to send may
//! carry the local address to send it from.
//!
//! No allocation on the data path: `RxBatch` and `TxBatch` allocate every buffer and every
//! `mmsghdr` / `iovec` / address / control array once, in their constructors.
//! `recv_batch` and `send_batch` only index into them and build nothing that grows; errors
//! are `io::Error`s made from an errno or an `ErrorKind`, which do not allocate. The
//! exceptions are log lines on refusals (the one-time GSO warning, a debug line per
//! dropped message), off the steady path.
//!
//! nix has `recvmmsg` / `sendmmsg` over `MultiHeaders`, but they take the buffers as
//! iterators of slices and the send side re-encodes control messages through its own
//! types; owning the arrays here keeps every pointer and length visible in one place.

use std::fmt;
use std::io;
use std::mem::{size_of, zeroed};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, UdpSocket};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, RawFd};
use std::ptr::NonNull;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};

use nix::sys::socket::{getsockopt, setsockopt, sockopt};

/// The largest UDP payload in one IPv4 packet (65535 − 20 IP − 8 UDP): the limit of one
/// datagram and of one GSO message's payload.
pub const MAX_DATAGRAM: usize = 65_507;

/// What the kernel accepts per GSO message (`UDP_MAX_SEGMENTS`).
const MAX_GSO_SEGMENTS: usize = 64;

/// A receive slot holds the largest datagram or GRO super-datagram (both ≤ 64 KiB).
const SLOT_BYTES: usize = 64 * 1024;

/// `sendmmsg` / `recvmmsg` take at most `UIO_MAXIOV` messages per call.
const MAX_MESSAGES_PER_CALL: usize = 1024;

/// A system call interrupted by a signal is retried this many times before giving up.
const EINTR_RETRIES: usize = 8;

const PKTINFO_BYTES: usize = size_of::<libc::in_pktinfo>();
// The kernel writes the GRO segment size as an int, and wants UDP_SEGMENT as a u16.
const GRO_CMSG_BYTES: usize = size_of::<libc::c_int>();
const GSO_CMSG_BYTES: usize = size_of::<u16>();

const fn cmsg_space(data: usize) -> usize {
    // SAFETY: CMSG_SPACE is arithmetic on its argument.
    unsafe { libc::CMSG_SPACE(data as libc::c_uint) as usize }
}
const fn cmsg_len(data: usize) -> usize {
    // SAFETY: CMSG_LEN is arithmetic on its argument.
    unsafe { libc::CMSG_LEN(data as libc::c_uint) as usize }
}

/// Room for the control messages of one datagram: IP_PKTINFO plus UDP_GRO / UDP_SEGMENT.
const CONTROL_BYTES: usize = 64;
const _: () = assert!(cmsg_space(PKTINFO_BYTES) + cmsg_space(GRO_CMSG_BYTES) <= CONTROL_BYTES);
const _: () = assert!(cmsg_space(PKTINFO_BYTES) + cmsg_space(GSO_CMSG_BYTES) <= CONTROL_BYTES);

/// Control-message space, aligned as `cmsghdr` requires.
#[derive(Clone, Copy)]
#[repr(C, align(8))]
struct ControlBuffer([u8; CONTROL_BYTES]);

/// The offloads a socket uses, for the log line: `gro,gso`, `gro`, `gso` or `none`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Offloads {
    /// The kernel hands us coalesced super-datagrams (UDP_GRO).
    pub gro: bool,
    /// Runs of equal datagrams to one peer go as one message (UDP_SEGMENT), up to
    /// `gso_max_segment` bytes per segment.
    pub gso: bool,
    /// The largest segment GSO is used for: lowered when the kernel refuses a size (a
    /// segment above the path MTU), 0 when GSO is off.
    pub gso_max_segment: usize,
}

impl fmt::Display for Offloads {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (self.gro, self.gso) {
            (true, true) => f.write_str("gro,gso"),
            (true, false) => f.write_str("gro"),
            (false, true) => f.write_str("gso"),
            (false, false) => f.write_str("none"),
        }
    }
}

/// What a socket has done since it was bound: for tests, metrics and benchmarks.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SocketStats {
    /// `recvmmsg` calls that returned messages.
    pub receive_calls: u64,
    /// Messages received; a GRO super-datagram is one message.
    pub messages_received: u64,
    /// Datagrams received, GRO super-datagrams counted by their segments.
    pub datagrams_received: u64,
    /// Received datagrams dropped because they did not fit a slot.
    pub truncated: u64,
    /// `sendmmsg` calls that sent messages.
    pub send_calls: u64,
    /// Messages sent; a GSO message is one message.
    pub messages_sent: u64,
    /// Datagrams sent, GSO messages counted by their segments.
    pub datagrams_sent: u64,
    /// Datagrams the kernel refused (no route, not a local address, …) and were dropped.
    pub send_dropped: u64,
    /// GSO messages the kernel refused, whose datagrams were then sent one by one.
    pub gso_refusals: u64,
}

#[derive(Default)]
struct Counters {
    receive_calls: AtomicU64,
    messages_received: AtomicU64,
    datagrams_received: AtomicU64,
    truncated: AtomicU64,
    send_calls: AtomicU64,
    messages_sent: AtomicU64,
    datagrams_sent: AtomicU64,
    send_dropped: AtomicU64,
    gso_refusals: AtomicU64,
}

fn add(counter: &AtomicU64, amount: usize) {
    counter.fetch_add(amount as u64, Ordering::Relaxed);
}

/// A bound IPv4 UDP socket that receives and sends in batches. Methods take `&self`, so a
/// receive thread and a send thread can share it (e.g. in an `Arc`).
pub struct BatchSocket {
    socket: UdpSocket,
    gro: bool,
    /// The largest segment size GSO may be used for; 0 when GSO is off.
    gso_max_segment: AtomicUsize,
    gso_refusal_logged: AtomicBool,
    counters: Counters,
    /// Test-only: the next GSO message fails with this errno without reaching the kernel.
    #[cfg(test)]
    simulated_gso_refusal: std::sync::atomic::AtomicI32,
}

/// The socket buffers a burst needs: a client's TCP window arrives as a burst of
/// datagrams while the engine is busy with the last batch, and the kernel's default
/// (net.core.rmem_default, 208 KiB: about 90 full-size datagrams) overflows and drops
/// them. As wireguard-go does, ask for more; FORCE (CAP_NET_ADMIN) passes the
/// net.core.rmem_max cap, and without it the kernel grants what the cap allows.
const SOCKET_BUFFER_BYTES: usize = 4 << 20;

fn set_buffer_sizes(socket: &UdpSocket) {
    if setsockopt(socket, sockopt::RcvBufForce, &SOCKET_BUFFER_BYTES).is_err() {
        let _ = setsockopt(socket, sockopt::RcvBuf, &SOCKET_BUFFER_BYTES);
    }
    if setsockopt(socket, sockopt::SndBufForce, &SOCKET_BUFFER_BYTES).is_err() {
        let _ = setsockopt(socket, sockopt::SndBuf, &SOCKET_BUFFER_BYTES);
    }
}

impl BatchSocket {
    /// Binds `address` (IPv4 only, as dockvpn's listen addresses are), nonblocking, with
    /// IP_PKTINFO on. With `offload`, UDP GRO is turned on and GSO used where the kernel has
    /// them; without it the socket uses neither (the forced plain path).
    pub fn bind(address: SocketAddr, offload: bool) -> io::Result<BatchSocket> {
        if !address.is_ipv4() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("{address} is not an IPv4 address: the batched UDP socket is IPv4-only"),
            ));
        }
        let socket = UdpSocket::bind(address)?;
        socket.set_nonblocking(true)?;
        setsockopt(&socket, sockopt::Ipv4PacketInfo, &true)?;
        set_buffer_sizes(&socket);
        let gro = offload && setsockopt(&socket, sockopt::UdpGroSegment, &true).is_ok();
        // Reading UDP_SEGMENT fails with ENOPROTOOPT on kernels without UDP GSO (< 4.18).
        let gso = offload && getsockopt(&socket, sockopt::UdpGsoSegment).is_ok();
        Ok(BatchSocket {
            socket,
            gro,
            gso_max_segment: AtomicUsize::new(if gso { MAX_DATAGRAM } else { 0 }),
            gso_refusal_logged: AtomicBool::new(false),
            counters: Counters::default(),
            #[cfg(test)]
            simulated_gso_refusal: std::sync::atomic::AtomicI32::new(0),
        })
    }

    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.socket.local_addr()
    }

    /// Nonblocking (the default): calls return `WouldBlock` instead of waiting, for a
    /// readiness loop (tokio `AsyncFd`, `poll`).
    pub fn set_nonblocking(&self, nonblocking: bool) -> io::Result<()> {
        self.socket.set_nonblocking(nonblocking)
    }

    /// When blocking, how long `recv_batch` waits before returning `WouldBlock`.
    #[cfg(test)]
    fn set_read_timeout(&self, timeout: Option<std::time::Duration>) -> io::Result<()> {
        self.socket.set_read_timeout(timeout)
    }

    pub fn offloads(&self) -> Offloads {
        let gso_max_segment = self.gso_max_segment.load(Ordering::Relaxed);
        Offloads {
            gro: self.gro,
            gso: gso_max_segment > 0,
            gso_max_segment,
        }
    }

    pub fn stats(&self) -> SocketStats {
        let c = &self.counters;
        let load = |counter: &AtomicU64| counter.load(Ordering::Relaxed);
        SocketStats {
            receive_calls: load(&c.receive_calls),
            messages_received: load(&c.messages_received),
            datagrams_received: load(&c.datagrams_received),
            truncated: load(&c.truncated),
            send_calls: load(&c.send_calls),
            messages_sent: load(&c.messages_sent),
            datagrams_sent: load(&c.datagrams_sent),
            send_dropped: load(&c.send_dropped),
            gso_refusals: load(&c.gso_refusals),
        }
    }

    /// A receive batch of the default size.
    #[cfg(test)]
    pub fn rx_batch(&self) -> io::Result<RxBatch> {
        RxBatch::new(RxBatch::DEFAULT_SLOTS)
    }
}

impl AsRawFd for BatchSocket {
    fn as_raw_fd(&self) -> RawFd {
        self.socket.as_raw_fd()
    }
}

impl AsFd for BatchSocket {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.socket.as_fd()
    }
}

// ---------------------------------------------------------------------------------------
// Receive

/// Anonymous memory mapped once: its pages become resident only when the kernel first
/// writes into them, so an idle or small-datagram slot costs one page or none, whatever
/// the allocator would have done with a recycled heap block.
struct LazyPages {
    start: NonNull<u8>,
    len: usize,
}

// SAFETY: LazyPages owns its mapping exclusively, like a Box<[u8]>.
unsafe impl Send for LazyPages {}
unsafe impl Sync for LazyPages {}

impl LazyPages {
    fn new(len: usize) -> io::Result<LazyPages> {
        // SAFETY: a fresh private anonymous mapping aliases nothing.
        let start = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if start == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let start = NonNull::new(start.cast::<u8>()).ok_or_else(io::Error::last_os_error)?;
        Ok(LazyPages { start, len })
    }

    fn as_slice(&self) -> &[u8] {
        // SAFETY: the mapping is `len` readable bytes (zero until written) that live as
        // long as `self`; writes happen only through `&mut self` (recv_batch).
        unsafe { std::slice::from_raw_parts(self.start.as_ptr(), self.len) }
    }
}

impl Drop for LazyPages {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly the mapping made in `new`, which nothing borrows any more.
        unsafe { libc::munmap(self.start.as_ptr().cast(), self.len) };
    }
}

/// What recvmmsg told us about one slot.
#[derive(Clone, Copy)]
struct SlotInfo {
    from: SocketAddrV4,
    local: Option<Ipv4Addr>,
    length: usize,
    /// The GRO segment size: the slot holds `length / segment` datagrams (the last may be
    /// shorter); 0 when the slot holds one datagram.
    segment: usize,
}

/// Reused receive buffers: `slots` messages per `recv_batch`, each up to 64 KiB.
///
/// Memory: the slots are mapped at once but become resident page by page as datagrams land
/// in them, so with ~1.5 KiB datagrams a slot costs one 4 KiB page. The worst case — every
/// slot once filled by a 64 KiB GRO super-datagram or a 64 KiB datagram — is
/// `slots × 64 KiB` resident: 2 MiB for the default 32 slots.
pub struct RxBatch {
    pages: LazyPages,
    slots: usize,
    headers: Box<[libc::mmsghdr]>,
    iovecs: Box<[libc::iovec]>,
    names: Box<[libc::sockaddr_in]>,
    controls: Box<[ControlBuffer]>,
    info: Box<[SlotInfo]>,
    /// Slots filled by the last `recv_batch`.
    filled: usize,
}

// SAFETY: the raw pointers in `headers` / `iovecs` point into this batch's own arrays and
// pages; they are rewritten by every `recv_batch` (which takes `&mut self`) before use.
// Shared references only read the received datagrams (`iter`), never through those
// pointers, so sharing one between threads is sound too.
unsafe impl Send for RxBatch {}
unsafe impl Sync for RxBatch {}

impl RxBatch {
    pub const DEFAULT_SLOTS: usize = 32;

    /// Allocates `slots` (1..=1024) receive slots of 64 KiB, once.
    pub fn new(slots: usize) -> io::Result<RxBatch> {
        let slots = slots.clamp(1, MAX_MESSAGES_PER_CALL);
        let empty = SlotInfo {
            from: SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 0),
            local: None,
            length: 0,
            segment: 0,
        };
        Ok(RxBatch {
            pages: LazyPages::new(slots * SLOT_BYTES)?,
            slots,
            // SAFETY (all three zeroed): plain C structs of integers and raw pointers, for
            // which all-zero is a valid (null) value.
            headers: (0..slots).map(|_| unsafe { zeroed() }).collect(),
            iovecs: (0..slots).map(|_| unsafe { zeroed() }).collect(),
            names: (0..slots).map(|_| unsafe { zeroed() }).collect(),
            controls: vec![ControlBuffer([0; CONTROL_BYTES]); slots].into_boxed_slice(),
            info: vec![empty; slots].into_boxed_slice(),
            filled: 0,
        })
    }

    pub fn is_empty(&self) -> bool {
        self.filled == 0
    }

    /// The datagrams of the last `recv_batch`, GRO super-datagrams split into their
    /// segments, in the order they arrived.
    pub fn iter(&self) -> RxIter<'_> {
        RxIter {
            batch: self,
            slot: 0,
            offset: 0,
        }
    }

    fn slot_bytes(&self, slot: usize, length: usize) -> &[u8] {
        let start = slot * SLOT_BYTES;
        self.pages
            .as_slice()
            .get(start..start + length.min(SLOT_BYTES))
            .unwrap_or(&[])
    }
}

/// One received datagram.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Received<'a> {
    pub from: SocketAddr,
    /// The local address it was sent to (IP_PKTINFO): the source for replies.
    pub local: Option<Ipv4Addr>,
    pub datagram: &'a [u8],
}

pub struct RxIter<'a> {
    batch: &'a RxBatch,
    slot: usize,
    offset: usize,
}

impl<'a> Iterator for RxIter<'a> {
    type Item = Received<'a>;

    fn next(&mut self) -> Option<Received<'a>> {
        let info = self.batch.info.get(..self.batch.filled)?.get(self.slot)?;
        let bytes = self.batch.slot_bytes(self.slot, info.length);
        let step = if info.segment == 0 {
            bytes.len()
        } else {
            info.segment
        };
        let end = (self.offset + step).min(bytes.len());
        let datagram = bytes.get(self.offset..end).unwrap_or(&[]);
        if end >= bytes.len() {
            self.slot += 1;
            self.offset = 0;
        } else {
            self.offset = end;
        }
        Some(Received {
            from: SocketAddr::V4(info.from),
            local: info.local,
            datagram,
        })
    }
}

impl BatchSocket {
    /// Receives up to `batch`'s slot count of messages with one `recvmmsg` and returns how
    /// many it kept (0 when every one was a truncated datagram, dropped and counted); read
    /// them with `batch.iter()`. Nonblocking: `WouldBlock` when nothing
    /// is queued. Blocking: waits for the first message (MSG_WAITFORONE), then takes what
    /// else is queued, or returns `WouldBlock` after the read timeout. On error the batch
    /// is empty.
    pub fn recv_batch(&self, batch: &mut RxBatch) -> io::Result<usize> {
        batch.filled = 0;
        let base = batch.pages.start.as_ptr();
        for slot in 0..batch.slots {
            batch.iovecs[slot] = libc::iovec {
                // SAFETY: slot * SLOT_BYTES < slots * SLOT_BYTES, the mapping's length.
                iov_base: unsafe { base.add(slot * SLOT_BYTES) }.cast(),
                iov_len: SLOT_BYTES,
            };
        }
        // The pointers are taken once, after the last write through a reference, so no
        // later reborrow of these arrays invalidates them before the kernel uses them.
        let names = batch.names.as_mut_ptr();
        let iovecs = batch.iovecs.as_mut_ptr();
        let controls = batch.controls.as_mut_ptr();
        for (slot, header) in batch.headers.iter_mut().enumerate() {
            header.msg_len = 0;
            let message = &mut header.msg_hdr;
            // SAFETY (the three `add`s): slot < slots, the length of each array.
            message.msg_name = unsafe { names.add(slot) }.cast();
            message.msg_namelen = size_of::<libc::sockaddr_in>() as libc::socklen_t;
            message.msg_iov = unsafe { iovecs.add(slot) };
            message.msg_iovlen = 1;
            message.msg_control = unsafe { controls.add(slot) }.cast();
            message.msg_controllen = CONTROL_BYTES as _;
            message.msg_flags = 0;
        }
        let received = retry_interrupted(|| {
            // SAFETY: every header points at this batch's own name, iovec and control
            // buffers, sized as declared, which outlive the call.
            unsafe {
                libc::recvmmsg(
                    self.socket.as_raw_fd(),
                    batch.headers.as_mut_ptr(),
                    batch.slots as libc::c_uint,
                    libc::MSG_WAITFORONE,
                    std::ptr::null_mut(),
                )
            }
        })?;
        let received = received.min(batch.slots);
        let mut datagrams = 0;
        for slot in 0..received {
            let Some(info) = parse_received(
                &batch.headers[slot],
                &batch.names[slot],
                &batch.controls[slot],
            ) else {
                add(&self.counters.truncated, 1);
                continue;
            };
            datagrams += match info.segment {
                0 => 1,
                segment => info.length.div_ceil(segment),
            };
            batch.info[batch.filled] = info;
            // Slot `filled` must hold this message's bytes: move them down when an
            // earlier message was dropped (rare: truncation only).
            if batch.filled != slot {
                let source = slot * SLOT_BYTES;
                let target = batch.filled * SLOT_BYTES;
                // SAFETY: both ranges lie inside the mapping; copy handles any overlap.
                unsafe { std::ptr::copy(base.add(source), base.add(target), info.length) };
            }
            batch.filled += 1;
        }
        add(&self.counters.receive_calls, 1);
        add(&self.counters.messages_received, batch.filled);
        add(&self.counters.datagrams_received, datagrams);
        Ok(batch.filled)
    }
}

/// Sender, local address and GRO segment size of one received message; None when it was
/// truncated past use.
fn parse_received(
    header: &libc::mmsghdr,
    name: &libc::sockaddr_in,
    control: &ControlBuffer,
) -> Option<SlotInfo> {
    let message = &header.msg_hdr;
    let mut length = (header.msg_len as usize).min(SLOT_BYTES);
    let from = if name.sin_family == libc::AF_INET as libc::sa_family_t {
        SocketAddrV4::new(
            Ipv4Addr::from(u32::from_be(name.sin_addr.s_addr)),
            u16::from_be(name.sin_port),
        )
    } else {
        SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 0)
    };
    let mut local = None;
    let mut segment = 0;
    #[allow(clippy::unnecessary_cast)] // size_t on glibc, socklen_t on musl
    let control_length = (message.msg_controllen as usize).min(CONTROL_BYTES);
    for (level, kind, data) in control_messages(&control.0[..control_length]) {
        match (level, kind) {
            (libc::IPPROTO_IP, libc::IP_PKTINFO) if data.len() >= PKTINFO_BYTES => {
                // SAFETY: `data` holds at least one in_pktinfo; read_unaligned copies it.
                let info: libc::in_pktinfo =
                    unsafe { std::ptr::read_unaligned(data.as_ptr().cast()) };
                local = Some(Ipv4Addr::from(u32::from_be(info.ipi_spec_dst.s_addr)));
            }
            (libc::SOL_UDP, libc::UDP_GRO) => {
                segment = match *data {
                    [a, b, c, d, ..] => i32::from_ne_bytes([a, b, c, d]).max(0) as usize,
                    [a, b] => u16::from_ne_bytes([a, b]) as usize,
                    _ => 0,
                };
            }
            _ => {}
        }
    }
    if segment >= length {
        segment = 0;
    }
    if message.msg_flags & libc::MSG_TRUNC != 0 {
        // A cut datagram is useless; of a cut super-datagram, the whole segments are not.
        if segment == 0 {
            return None;
        }
        length -= length % segment;
    }
    Some(SlotInfo {
        from,
        local,
        length,
        segment,
    })
}

/// The (level, type, data) of each control message in `buffer`, bounds-checked.
fn control_messages(buffer: &[u8]) -> impl Iterator<Item = (i32, i32, &[u8])> {
    let header_bytes = cmsg_len(0);
    let mut offset = 0;
    std::iter::from_fn(move || {
        let header_end = offset + size_of::<libc::cmsghdr>();
        let header_bytes_here = buffer.get(offset..header_end)?;
        // SAFETY: the slice holds a whole cmsghdr; read_unaligned copies it.
        let header: libc::cmsghdr =
            unsafe { std::ptr::read_unaligned(header_bytes_here.as_ptr().cast()) };
        #[allow(clippy::unnecessary_cast)] // size_t on glibc, socklen_t on musl
        let total = header.cmsg_len as usize;
        let data = buffer.get(offset + header_bytes..offset.checked_add(total)?)?;
        // Each step advances by at least a header, so the walk ends.
        offset += cmsg_space(total.checked_sub(header_bytes)?);
        Some((header.cmsg_level, header.cmsg_type, data))
    })
}

fn retry_interrupted(mut call: impl FnMut() -> libc::c_int) -> io::Result<usize> {
    let mut attempts = 0;
    loop {
        let result = call();
        if result >= 0 {
            return Ok(result as usize);
        }
        let error = io::Error::last_os_error();
        attempts += 1;
        if error.kind() != io::ErrorKind::Interrupted || attempts > EINTR_RETRIES {
            return Err(error);
        }
    }
}

// ---------------------------------------------------------------------------------------
// Send

/// Why `TxBatch::push` did not take a datagram.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum PushError {
    /// Send the batch (or wait until it is sent), then push again. An empty batch takes
    /// any datagram up to `MAX_DATAGRAM` bytes.
    #[error("the send batch is full: send it, then push again")]
    Full,
    #[error("{0} is not an IPv4 address: the batched UDP socket is IPv4-only")]
    NotIpv4(SocketAddr),
    #[error("a {0}-byte datagram is larger than UDP's {MAX_DATAGRAM}")]
    TooLong(usize),
}

#[derive(Clone, Copy)]
struct TxEntry {
    to: SocketAddrV4,
    local: Option<Ipv4Addr>,
    start: usize,
    length: usize,
}

/// One message of a `sendmmsg` call: `entries` consecutive datagrams, as one GSO message
/// of `segment`-byte segments when `segment` is not 0.
#[derive(Clone, Copy, Default)]
struct PlannedMessage {
    entries: usize,
    segment: usize,
}

/// Reused send buffers: datagrams are copied into one arena by `push` and sent by
/// `BatchSocket::send_batch`.
pub struct TxBatch {
    arena: Box<[u8]>,
    arena_used: usize,
    entries: Box<[TxEntry]>,
    entry_count: usize,
    /// Entries before this one are sent (a send that hit `WouldBlock` resumes here).
    sent: usize,
    headers: Box<[libc::mmsghdr]>,
    iovecs: Box<[libc::iovec]>,
    names: Box<[libc::sockaddr_in]>,
    controls: Box<[ControlBuffer]>,
    plan: Box<[PlannedMessage]>,
}

// SAFETY: the raw pointers in `headers` / `iovecs` point into this batch's own arrays; they
// are rewritten by every `send_batch` (which takes `&mut` of the batch) before use.
unsafe impl Send for TxBatch {}

impl TxBatch {
    pub const DEFAULT_DATAGRAMS: usize = 128;

    /// Room for `datagrams` datagrams of ~2 KiB on average, and at least one of
    /// `MAX_DATAGRAM` bytes; allocated once.
    pub fn new(datagrams: usize) -> TxBatch {
        let datagrams = datagrams.max(1);
        TxBatch::with_capacity(datagrams, (datagrams * 2048).max(MAX_DATAGRAM))
    }

    /// Room for `datagrams` datagrams and `bytes` bytes in all (at least `MAX_DATAGRAM`).
    pub fn with_capacity(datagrams: usize, bytes: usize) -> TxBatch {
        let datagrams = datagrams.max(1);
        let messages = datagrams.min(MAX_MESSAGES_PER_CALL);
        let empty = TxEntry {
            to: SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 0),
            local: None,
            start: 0,
            length: 0,
        };
        TxBatch {
            arena: vec![0; bytes.max(MAX_DATAGRAM)].into_boxed_slice(),
            arena_used: 0,
            entries: vec![empty; datagrams].into_boxed_slice(),
            entry_count: 0,
            sent: 0,
            // SAFETY (all three zeroed): plain C structs of integers and raw pointers, for
            // which all-zero is a valid (null) value.
            headers: (0..messages).map(|_| unsafe { zeroed() }).collect(),
            iovecs: (0..messages).map(|_| unsafe { zeroed() }).collect(),
            names: (0..messages).map(|_| unsafe { zeroed() }).collect(),
            controls: vec![ControlBuffer([0; CONTROL_BYTES]); messages].into_boxed_slice(),
            plan: vec![PlannedMessage::default(); messages].into_boxed_slice(),
        }
    }

    /// Queues a copy of `datagram` for `to`, sent from `local` when given (the address
    /// `to`'s datagrams came to, `Received::local`).
    pub fn push(
        &mut self,
        to: SocketAddr,
        local: Option<Ipv4Addr>,
        datagram: &[u8],
    ) -> Result<(), PushError> {
        let SocketAddr::V4(to) = to else {
            return Err(PushError::NotIpv4(to));
        };
        if datagram.len() > MAX_DATAGRAM {
            return Err(PushError::TooLong(datagram.len()));
        }
        let start = self.arena_used;
        let end = start + datagram.len();
        let (Some(space), Some(entry)) = (
            self.arena.get_mut(start..end),
            self.entries.get_mut(self.entry_count),
        ) else {
            return Err(PushError::Full);
        };
        space.copy_from_slice(datagram);
        *entry = TxEntry {
            to,
            local,
            start,
            length: datagram.len(),
        };
        self.arena_used = end;
        self.entry_count += 1;
        Ok(())
    }

    /// Datagrams pushed and not yet sent.
    pub fn len(&self) -> usize {
        self.entry_count - self.sent
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Forgets every datagram, sent or not. `send_batch` clears the batch itself when it
    /// has sent everything.
    pub fn clear(&mut self) {
        self.arena_used = 0;
        self.entry_count = 0;
        self.sent = 0;
    }

    /// Plans and lays out the messages for the unsent entries, at most one call's worth;
    /// returns how many.
    fn prepare(&mut self, gso_max_segment: usize) -> usize {
        // Raw pointers taken once (see recv_batch): the arena is not touched through a
        // reference again before the kernel reads it.
        let arena = self.arena.as_mut_ptr();
        let mut next = self.sent;
        let mut messages = 0;
        while next < self.entry_count && messages < self.headers.len() {
            let (entries, segment) = self.run_at(next, gso_max_segment);
            let first = self.entries[next];
            let last = self.entries[next + entries - 1];
            self.plan[messages] = PlannedMessage { entries, segment };
            self.names[messages] = sockaddr_in(first.to);
            self.iovecs[messages] = libc::iovec {
                // SAFETY: push put every entry inside the arena.
                iov_base: unsafe { arena.add(first.start) }.cast(),
                // Consecutive entries are adjacent in the arena: one iovec covers the run.
                iov_len: last.start + last.length - first.start,
            };
            let control = &mut self.controls[messages].0;
            let mut control_length = 0;
            if let Some(local) = first.local {
                let info = libc::in_pktinfo {
                    ipi_ifindex: 0,
                    ipi_spec_dst: libc::in_addr {
                        s_addr: u32::from(local).to_be(),
                    },
                    ipi_addr: libc::in_addr { s_addr: 0 },
                };
                // SAFETY: in_pktinfo is plain integers; viewing it as bytes is sound.
                let info_bytes: [u8; PKTINFO_BYTES] = unsafe { std::mem::transmute(info) };
                control_length = write_control_message(
                    control,
                    control_length,
                    libc::IPPROTO_IP,
                    libc::IP_PKTINFO,
                    &info_bytes,
                );
            }
            if segment > 0 {
                control_length = write_control_message(
                    control,
                    control_length,
                    libc::SOL_UDP,
                    libc::UDP_SEGMENT,
                    &(segment as u16).to_ne_bytes(),
                );
            }
            let message = &mut self.headers[messages].msg_hdr;
            message.msg_controllen = control_length as _;
            next += entries;
            messages += 1;
        }
        let names = self.names.as_mut_ptr();
        let iovecs = self.iovecs.as_mut_ptr();
        let controls = self.controls.as_mut_ptr();
        for (index, header) in self.headers[..messages].iter_mut().enumerate() {
            header.msg_len = 0;
            let message = &mut header.msg_hdr;
            // SAFETY (the three `add`s): index < messages ≤ the length of each array.
            message.msg_name = unsafe { names.add(index) }.cast();
            message.msg_namelen = size_of::<libc::sockaddr_in>() as libc::socklen_t;
            message.msg_iov = unsafe { iovecs.add(index) };
            message.msg_iovlen = 1;
            message.msg_control = match message.msg_controllen {
                0 => std::ptr::null_mut(),
                _ => unsafe { controls.add(index) }.cast(),
            };
            message.msg_flags = 0;
        }
        messages
    }

    /// How many entries from `first` go in one message, and their GSO segment size (0 for
    /// a plain message): consecutive datagrams to the same peer from the same local
    /// address, all as long as the first except perhaps a shorter last one, within the
    /// kernel's 64 segments and 64 KiB.
    fn run_at(&self, first: usize, gso_max_segment: usize) -> (usize, usize) {
        let lead = self.entries[first];
        let segment = lead.length;
        if segment == 0 || segment > gso_max_segment {
            return (1, 0);
        }
        let mut entries = 1;
        let mut bytes = segment;
        for entry in &self.entries[first + 1..self.entry_count] {
            if entries == MAX_GSO_SEGMENTS
                || entry.to != lead.to
                || entry.local != lead.local
                || entry.length == 0
                || entry.length > segment
                || bytes + entry.length > MAX_DATAGRAM
            {
                break;
            }
            entries += 1;
            bytes += entry.length;
            if entry.length < segment {
                break;
            }
        }
        match entries {
            1 => (1, 0),
            _ => (entries, segment),
        }
    }
}

fn sockaddr_in(address: SocketAddrV4) -> libc::sockaddr_in {
    // SAFETY: sockaddr_in is plain integers; all-zero is valid and pads sin_zero.
    let mut name: libc::sockaddr_in = unsafe { zeroed() };
    name.sin_family = libc::AF_INET as libc::sa_family_t;
    name.sin_port = address.port().to_be();
    name.sin_addr.s_addr = u32::from(*address.ip()).to_be();
    name
}

/// Writes one control message at `offset` of `buffer`; returns the offset after it. The
/// buffer is sized (checked at compile time) for the messages we write.
fn write_control_message(
    buffer: &mut [u8; CONTROL_BYTES],
    offset: usize,
    level: i32,
    kind: i32,
    data: &[u8],
) -> usize {
    let end = offset + cmsg_space(data.len());
    let Some(space) = buffer.get_mut(offset..end) else {
        return offset;
    };
    space.fill(0);
    // SAFETY: cmsghdr is plain integers; all-zero is valid.
    let mut header: libc::cmsghdr = unsafe { zeroed() };
    header.cmsg_len = cmsg_len(data.len()) as _;
    header.cmsg_level = level;
    header.cmsg_type = kind;
    // SAFETY: `space` holds at least a cmsghdr (cmsg_space(n) ≥ its size);
    // write_unaligned needs no alignment.
    unsafe { std::ptr::write_unaligned(space.as_mut_ptr().cast(), header) };
    space[cmsg_len(0)..cmsg_len(data.len())].copy_from_slice(data);
    end
}

impl BatchSocket {
    /// Sends every unsent datagram in `batch`, runs of equal datagrams to one peer as GSO
    /// messages, in as few `sendmmsg` calls as the kernel takes.
    ///
    /// * `Ok(())`: every datagram went to the kernel (or was dropped, see below); the batch
    ///   is cleared.
    /// * `Err(e)` with `e.kind() == WouldBlock`: the send buffer is full (nonblocking, or
    ///   the write timeout passed). The datagrams sent so far are gone from the batch, the
    ///   rest stay, in order; call again once the socket is writable. Pushing more in
    ///   between is fine.
    /// * `Err(e)` otherwise: the kernel refused some datagrams (no route to that peer, a
    ///   local address that is no longer ours, …); those were dropped and counted in
    ///   `stats().send_dropped`, all others were sent, and the batch is cleared. `e` is the
    ///   first refusal, for the log.
    ///
    /// A GSO message the kernel refuses is not an error: with EIO (the device cannot
    /// checksum for us) GSO is switched off for the socket; with EMSGSIZE (kernels since
    /// 6.x) or EINVAL (older ones) for a segment larger than the route's MTU, which a
    /// plain send would fragment, GSO stays on for smaller segments only. Either way the
    /// datagrams are sent again, one per message, and a warning is logged once.
    pub fn send_batch(&self, batch: &mut TxBatch) -> io::Result<()> {
        let mut first_refusal: Option<io::Error> = None;
        // Every round sends at least one message, drops one, or lowers the GSO limit
        // (at most twice per size: lowered below it, then switched off); bounded.
        let mut rounds_left = 4 * batch.entry_count + 8;
        while batch.sent < batch.entry_count && rounds_left > 0 {
            rounds_left -= 1;
            let gso_max_segment = self.gso_max_segment.load(Ordering::Relaxed);
            let messages = batch.prepare(gso_max_segment);
            let result = self.sendmmsg(batch, messages);
            match result {
                Ok(sent) => {
                    let sent = sent.min(messages);
                    let datagrams: usize = batch.plan[..sent].iter().map(|m| m.entries).sum();
                    batch.sent += datagrams;
                    add(&self.counters.send_calls, 1);
                    add(&self.counters.messages_sent, sent);
                    add(&self.counters.datagrams_sent, datagrams);
                }
                Err(error) if error.kind() == io::ErrorKind::WouldBlock => return Err(error),
                Err(error) => {
                    let refused = batch.plan[0];
                    let errno = error.raw_os_error();
                    if refused.segment > 0
                        && matches!(errno, Some(libc::EIO | libc::EINVAL | libc::EMSGSIZE))
                    {
                        // The kernel answers EINVAL for a source address that is no longer
                        // ours too: only when the run's first datagram goes out on its own
                        // was it GSO that was refused.
                        batch.prepare(0);
                        match self.sendmmsg(batch, 1) {
                            Ok(_) => {
                                batch.sent += 1;
                                add(&self.counters.send_calls, 1);
                                add(&self.counters.messages_sent, 1);
                                add(&self.counters.datagrams_sent, 1);
                                self.gso_refused(refused.segment, &error);
                                continue;
                            }
                            Err(plain) if plain.kind() == io::ErrorKind::WouldBlock => {
                                return Err(plain)
                            }
                            Err(_) => {}
                        }
                    }
                    batch.sent += refused.entries;
                    add(&self.counters.send_dropped, refused.entries);
                    tracing::debug!(%error, "dropped {} datagram(s) the kernel refused", refused.entries);
                    first_refusal.get_or_insert(error);
                }
            }
        }
        if batch.sent < batch.entry_count {
            // Unreachable by the bound above; if it ever is, drop rather than spin.
            add(&self.counters.send_dropped, batch.entry_count - batch.sent);
            first_refusal.get_or_insert(io::Error::from(io::ErrorKind::Other));
        }
        batch.clear();
        match first_refusal {
            Some(error) => Err(error),
            None => Ok(()),
        }
    }

    fn sendmmsg(&self, batch: &mut TxBatch, messages: usize) -> io::Result<usize> {
        #[cfg(test)]
        if batch.plan[0].segment > 0 {
            let errno = self.simulated_gso_refusal.swap(0, Ordering::Relaxed);
            if errno != 0 {
                return Err(io::Error::from_raw_os_error(errno));
            }
        }
        retry_interrupted(|| {
            // SAFETY: `prepare` pointed every header at this batch's own name, iovec,
            // control and arena bytes, which outlive the call.
            unsafe {
                libc::sendmmsg(
                    self.socket.as_raw_fd(),
                    batch.headers.as_mut_ptr(),
                    messages as libc::c_uint,
                    0,
                )
            }
        })
    }

    fn gso_refused(&self, segment: usize, error: &io::Error) {
        add(&self.counters.gso_refusals, 1);
        let errno = error.raw_os_error();
        let limit = if matches!(errno, Some(libc::EINVAL | libc::EMSGSIZE)) {
            segment - 1
        } else {
            0
        };
        self.gso_max_segment.fetch_min(limit, Ordering::Relaxed);
        if !self.gso_refusal_logged.swap(true, Ordering::Relaxed) {
            match limit {
                0 => tracing::warn!(
                    %error,
                    "the kernel refused UDP GSO on {:?}: sending datagrams one by one",
                    self.socket.local_addr().ok()
                ),
                _ => tracing::warn!(
                    %error,
                    "the kernel refused UDP GSO of {segment}-byte segments on {:?} (above \
                     the path MTU?): only segments up to {limit} bytes go as GSO",
                    self.socket.local_addr().ok()
                ),
            }
        } else {
            tracing::debug!(%error, segment, limit, "UDP GSO refused again");
        }
    }

    /// Test-only: the next GSO message fails with `errno` as if the kernel refused it.
    #[cfg(test)]
    fn simulate_gso_refusal(&self, errno: i32) {
        self.simulated_gso_refusal.store(errno, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    //! Each test runs in a thread of its own in a fresh network namespace (we run as root),
    //! so the loopback it uses, and its MTU, are its own.
    use super::*;
    use crate::datapath::test_support::in_new_network_namespace;
    use std::net::UdpSocket;
    use std::process::Command;
    use std::time::{Duration, Instant};

    const LOOPBACK: Ipv4Addr = Ipv4Addr::LOCALHOST;
    const WAIT: Duration = Duration::from_secs(5);

    /// A namespace of its own with `lo` up: the loopback it uses, and its MTU, are its own.
    fn in_fresh_netns<T: Send + 'static>(test: impl FnOnce() -> T + Send + 'static) -> T {
        in_new_network_namespace("a batched-socket test", || {
            ip(&["link", "set", "lo", "up"]);
            test()
        })
    }
    /// Runs `ip` in the calling thread's namespace (a child inherits it).
    fn ip(args: &[&str]) {
        let status = Command::new("ip")
            .args(args)
            .status()
            .expect("the `ip` command (iproute2) is needed");
        assert!(status.success(), "ip {args:?} failed");
    }

    fn bind(offload: bool) -> BatchSocket {
        let socket = BatchSocket::bind(SocketAddr::from((LOOPBACK, 0)), offload).unwrap();
        if offload {
            let offloads = socket.offloads();
            assert!(
                offloads.gro && offloads.gso,
                "this kernel has UDP GRO and GSO"
            );
            assert_eq!(offloads.to_string(), "gro,gso");
        } else {
            assert_eq!(socket.offloads().to_string(), "none");
        }
        socket
    }

    fn plain_receiver() -> UdpSocket {
        let socket = UdpSocket::bind((LOOPBACK, 0)).unwrap();
        socket.set_read_timeout(Some(WAIT)).unwrap();
        socket
    }

    /// `length` bytes that say which datagram they are: sender, sequence, then a pattern.
    fn payload(sender: u8, sequence: u16, length: usize) -> Vec<u8> {
        let [high, low] = sequence.to_be_bytes();
        (0..length)
            .map(|i| match i {
                0 => sender,
                1 => high,
                2 => low,
                _ => (i as u8).wrapping_mul(31).wrapping_add(sender ^ low),
            })
            .collect()
    }

    type Datagram = (SocketAddr, Option<Ipv4Addr>, Vec<u8>);

    /// Receives until `count` datagrams are in (bounded by WAIT).
    fn receive(socket: &BatchSocket, batch: &mut RxBatch, count: usize) -> Vec<Datagram> {
        socket.set_nonblocking(false).unwrap();
        socket
            .set_read_timeout(Some(Duration::from_millis(100)))
            .unwrap();
        let deadline = Instant::now() + WAIT;
        let mut received = Vec::new();
        while received.len() < count && Instant::now() < deadline {
            match socket.recv_batch(batch) {
                Ok(_) => {
                    received.extend(batch.iter().map(|r| (r.from, r.local, r.datagram.to_vec())))
                }
                Err(error) if error.kind() == io::ErrorKind::WouldBlock => {}
                Err(error) => panic!("recv_batch: {error}"),
            }
        }
        assert_eq!(received.len(), count, "datagrams received within {WAIT:?}");
        received
    }

    /// The payloads of the next `count` datagrams at a plain socket.
    fn receive_payloads(socket: &UdpSocket, count: usize) -> Vec<Vec<u8>> {
        receive_plain(socket, count)
            .into_iter()
            .map(|(_, datagram)| datagram)
            .collect()
    }

    fn receive_plain(socket: &UdpSocket, count: usize) -> Vec<(SocketAddr, Vec<u8>)> {
        let mut buffer = vec![0; 65536];
        (0..count)
            .map(|_| {
                let (length, from) = socket.recv_from(&mut buffer).expect("a datagram");
                (from, buffer[..length].to_vec())
            })
            .collect()
    }

    #[test]
    fn datagrams_from_three_senders_arrive_with_sender_local_address_and_order() {
        for offload in [true, false] {
            in_fresh_netns(move || {
                let receiver = bind(offload);
                let to = receiver.local_addr().unwrap();
                let senders: Vec<UdpSocket> = (0..3)
                    .map(|_| UdpSocket::bind((LOOPBACK, 0)).unwrap())
                    .collect();
                let mut batch = RxBatch::new(8).unwrap();
                let mut expected: Vec<Vec<Vec<u8>>> = vec![Vec::new(); 3];
                let mut received = Vec::new();
                // In chunks, so the receive buffer never overflows.
                for chunk in 0..8u16 {
                    for i in chunk * 25..(chunk + 1) * 25 {
                        let sender = (i % 3) as u8;
                        let datagram = payload(sender, i, 3 + (i as usize * 97) % 1500);
                        senders[sender as usize].send_to(&datagram, to).unwrap();
                        expected[sender as usize].push(datagram);
                    }
                    received.extend(receive(&receiver, &mut batch, 25));
                }
                for (sender, socket) in senders.iter().enumerate() {
                    let from = socket.local_addr().unwrap();
                    let got: Vec<Vec<u8>> = received
                        .iter()
                        .filter(|(f, _, _)| *f == from)
                        .map(|(_, _, d)| d.clone())
                        .collect();
                    assert_eq!(got, expected[sender], "sender {sender}, offload {offload}");
                }
                assert!(received
                    .iter()
                    .all(|(_, local, _)| *local == Some(LOOPBACK)));
                let stats = receiver.stats();
                assert_eq!(stats.datagrams_received, 200);
                assert!(stats.receive_calls >= 25, "8 slots: {stats:?}");
            });
        }
    }

    #[test]
    fn a_burst_of_a_thousand_full_size_datagrams_waits_unread_without_a_drop() {
        // What a client's TCP window through the tunnel looks like to a busy engine: the
        // kernel's default receive buffer (208 KiB) keeps only about a hundred of them.
        const BURST: u16 = 1000;
        in_fresh_netns(|| {
            let receiver = bind(true);
            let to = receiver.local_addr().unwrap();
            let sender = UdpSocket::bind((LOOPBACK, 0)).unwrap();
            let sent: Vec<Vec<u8>> = (0..BURST).map(|i| payload(1, i, 1400)).collect();
            for datagram in &sent {
                sender.send_to(datagram, to).unwrap();
            }
            let mut batch = RxBatch::new(64).unwrap();
            let received: Vec<Vec<u8>> = receive(&receiver, &mut batch, sent.len())
                .into_iter()
                .map(|(_, _, datagram)| datagram)
                .collect();
            assert_eq!(
                received.len(),
                sent.len(),
                "the receive buffer overflowed: {} of {BURST} arrived",
                received.len()
            );
            assert!(received == sent, "the burst arrives whole and in order");
        });
    }

    /// 40 datagrams of 1400 bytes and a shorter one, all to `to`.
    fn push_run(batch: &mut TxBatch, to: SocketAddr, sequence_base: u16) -> Vec<Vec<u8>> {
        let datagrams: Vec<Vec<u8>> = (0..41u16)
            .map(|i| payload(9, sequence_base + i, if i < 40 { 1400 } else { 600 }))
            .collect();
        for datagram in &datagrams {
            batch.push(to, None, datagram).unwrap();
        }
        datagrams
    }

    #[test]
    fn a_run_of_equal_datagrams_goes_as_one_gso_message() {
        in_fresh_netns(|| {
            let sender = bind(true);
            let receiver = plain_receiver();
            let to = receiver.local_addr().unwrap();
            let mut batch = TxBatch::new(128);
            let sent = push_run(&mut batch, to, 0);
            sender.send_batch(&mut batch).unwrap();
            assert!(batch.is_empty());
            let stats = sender.stats();
            assert_eq!(
                (stats.send_calls, stats.messages_sent, stats.datagrams_sent),
                (1, 1, 41)
            );
            let received = receive_plain(&receiver, 41);
            let from = sender.local_addr().unwrap();
            assert!(received.iter().all(|(f, _)| *f == from));
            let received: Vec<Vec<u8>> = received.into_iter().map(|(_, d)| d).collect();
            assert_eq!(received, sent);
        });
    }

    #[test]
    fn mixed_destinations_split_into_one_message_per_run() {
        in_fresh_netns(|| {
            let sender = bind(true);
            let (a, b) = (plain_receiver(), plain_receiver());
            let mut batch = TxBatch::new(128);
            for (i, receiver) in [&a, &b, &a].into_iter().enumerate() {
                for j in 0..10u16 {
                    let datagram = payload(i as u8, j, 1000);
                    batch
                        .push(receiver.local_addr().unwrap(), None, &datagram)
                        .unwrap();
                }
            }
            sender.send_batch(&mut batch).unwrap();
            let stats = sender.stats();
            assert_eq!(
                (stats.send_calls, stats.messages_sent, stats.datagrams_sent),
                (1, 3, 30)
            );
            assert_eq!(receive_plain(&a, 20).len(), 20);
            assert_eq!(receive_plain(&b, 10).len(), 10);
        });
    }

    #[test]
    fn the_plain_mode_sends_one_message_per_datagram() {
        in_fresh_netns(|| {
            let sender = bind(false);
            let receiver = plain_receiver();
            let mut batch = TxBatch::new(128);
            let sent = push_run(&mut batch, receiver.local_addr().unwrap(), 0);
            sender.send_batch(&mut batch).unwrap();
            let stats = sender.stats();
            assert_eq!(
                (stats.send_calls, stats.messages_sent, stats.datagrams_sent),
                (1, 41, 41)
            );
            let received = receive_payloads(&receiver, 41);
            assert_eq!(received, sent);
        });
    }

    #[test]
    fn a_gro_receiver_gets_a_gso_burst_as_one_super_datagram_split_on_iteration() {
        in_fresh_netns(|| {
            let sender = bind(true);
            let receiver = bind(true);
            let mut batch = TxBatch::new(128);
            let sent = push_run(&mut batch, receiver.local_addr().unwrap(), 0);
            sender.send_batch(&mut batch).unwrap();
            let mut rx = receiver.rx_batch().unwrap();
            let received: Vec<Vec<u8>> = receive(&receiver, &mut rx, 41)
                .into_iter()
                .map(|(_, _, d)| d)
                .collect();
            assert_eq!(received, sent);
            let stats = receiver.stats();
            eprintln!("GRO over loopback: 41 datagrams sent as 1 GSO message arrived as {stats:?}");
            assert_eq!(stats.datagrams_received, 41);
            assert_eq!(
                stats.messages_received, 1,
                "loopback keeps the GSO skb whole"
            );
        });
    }

    #[test]
    fn gso_refused_for_segments_above_the_mtu_falls_back_for_those_sizes_only() {
        in_fresh_netns(|| {
            // A real refusal: the kernel rejects GSO segments larger than the route's MTU.
            ip(&["link", "set", "lo", "mtu", "1280"]);
            let sender = bind(true);
            let receiver = plain_receiver();
            let to = receiver.local_addr().unwrap();
            let mut batch = TxBatch::new(128);
            let sent = push_run(&mut batch, to, 0);
            sender.send_batch(&mut batch).unwrap();
            let received = receive_payloads(&receiver, 41);
            assert_eq!(received, sent);
            let stats = sender.stats();
            assert_eq!(stats.gso_refusals, 1);
            assert_eq!((stats.datagrams_sent, stats.send_dropped), (41, 0));
            assert_eq!(sender.offloads().gso_max_segment, 1399);

            // Smaller segments still go as GSO.
            for i in 0..30 {
                batch.push(to, None, &payload(1, i, 1000)).unwrap();
            }
            sender.send_batch(&mut batch).unwrap();
            let after = sender.stats();
            assert_eq!(after.messages_sent - stats.messages_sent, 1);
            assert_eq!(receive_plain(&receiver, 30).len(), 30);
        });
    }

    #[test]
    fn gso_refused_with_eio_is_switched_off_and_the_datagrams_still_go() {
        in_fresh_netns(|| {
            // EIO comes from a device without checksum offload, which loopback cannot be
            // made into: simulate that answer for the first GSO message.
            let sender = bind(true);
            sender.simulate_gso_refusal(libc::EIO);
            let receiver = plain_receiver();
            let to = receiver.local_addr().unwrap();
            let mut batch = TxBatch::new(128);
            let sent = push_run(&mut batch, to, 0);
            sender.send_batch(&mut batch).unwrap();
            let received = receive_payloads(&receiver, 41);
            assert_eq!(received, sent);
            assert!(!sender.offloads().gso);
            assert_eq!(sender.offloads().to_string(), "gro");
            let stats = sender.stats();
            assert_eq!((stats.gso_refusals, stats.messages_sent), (1, 41));

            push_run(&mut batch, to, 100);
            sender.send_batch(&mut batch).unwrap();
            assert_eq!(sender.stats().messages_sent, 82);
            assert_eq!(receive_plain(&receiver, 41).len(), 41);
        });
    }

    #[test]
    fn replies_leave_from_the_address_the_peer_sent_to() {
        for offload in [true, false] {
            in_fresh_netns(move || {
                let server =
                    BatchSocket::bind(SocketAddr::from((Ipv4Addr::UNSPECIFIED, 0)), offload)
                        .unwrap();
                let port = server.local_addr().unwrap().port();
                // 127.0.0.0/8 is local on lo: 127.0.0.2 is a second address of ours.
                let second = Ipv4Addr::new(127, 0, 0, 2);
                let client = plain_receiver();
                client.send_to(b"hello", (second, port)).unwrap();
                let mut rx = server.rx_batch().unwrap();
                let received = receive(&server, &mut rx, 1);
                let (from, local, _) = &received[0];
                assert_eq!(*local, Some(second));

                let mut tx = TxBatch::new(16);
                // Two equal and a shorter one: a GSO message when offloading.
                for reply in [&b"reply-1"[..], b"reply-2", b"r3"] {
                    tx.push(*from, *local, reply).unwrap();
                }
                // Without a local address the kernel picks 127.0.0.1 by the route: this
                // is what IP_PKTINFO prevents.
                tx.push(*from, None, b"unpinned").unwrap();
                server.send_batch(&mut tx).unwrap();
                let replies = receive_plain(&client, 4);
                let pinned = SocketAddr::from((second, port));
                let unpinned = SocketAddr::from((LOOPBACK, port));
                let sources: Vec<SocketAddr> = replies.iter().map(|(f, _)| *f).collect();
                assert_eq!(sources, [pinned, pinned, pinned, unpinned]);
                let expected_messages = if offload { 2 } else { 4 };
                assert_eq!(server.stats().messages_sent, expected_messages);
            });
        }
    }

    #[test]
    fn edge_sizes_and_misuse_are_answered_without_panics() {
        in_fresh_netns(|| {
            for offload in [true, false] {
                let receiver = bind(offload);
                let to = receiver.local_addr().unwrap();
                let mut rx = RxBatch::new(4).unwrap();
                let error = receiver.recv_batch(&mut rx).unwrap_err();
                assert_eq!(error.kind(), io::ErrorKind::WouldBlock);
                assert!(rx.is_empty() && rx.iter().next().is_none());

                let sender = bind(offload);
                let mut tx = TxBatch::with_capacity(3, 0);
                let largest = payload(1, 1, MAX_DATAGRAM);
                tx.push(to, None, &[]).unwrap();
                tx.push(to, None, &largest).unwrap();
                assert_eq!(tx.push(to, None, b"x"), Err(PushError::Full));
                sender.send_batch(&mut tx).unwrap();
                let received = receive(&receiver, &mut rx, 2);
                assert_eq!(received[0].2, b"");
                assert_eq!(received[1].2, largest);
            }
            let mut tx = TxBatch::new(4);
            let v6: SocketAddr = "[::1]:9".parse().unwrap();
            assert_eq!(tx.push(v6, None, b"x"), Err(PushError::NotIpv4(v6)));
            let too_long = vec![0; MAX_DATAGRAM + 1];
            let to = SocketAddr::from((LOOPBACK, 9));
            assert_eq!(
                tx.push(to, None, &too_long),
                Err(PushError::TooLong(MAX_DATAGRAM + 1))
            );
            let error = BatchSocket::bind(v6, true).err().unwrap();
            assert_eq!(error.kind(), io::ErrorKind::InvalidInput);
        });
    }

    #[test]
    fn a_run_from_an_address_no_longer_ours_is_dropped_and_gso_stays_on() {
        in_fresh_netns(|| {
            let sender = bind(true);
            let receiver = plain_receiver();
            let to = receiver.local_addr().unwrap();
            let limit = sender.offloads().gso_max_segment;
            let mut batch = TxBatch::new(128);
            // The address a peer once sent to, gone since (a side's address changed).
            let gone = Some(Ipv4Addr::new(192, 0, 2, 7));
            for i in 0..10 {
                batch.push(to, gone, &payload(2, i, 1400)).unwrap();
            }
            batch.push(to, None, b"after").unwrap();
            // Older kernels answer such a source with EINVAL, which also means "segment too
            // large" for GSO; this one says ENETUNREACH, so the EINVAL is simulated.
            sender.simulate_gso_refusal(libc::EINVAL);
            let error = sender.send_batch(&mut batch).unwrap_err();
            assert_eq!(error.raw_os_error(), Some(libc::EINVAL));
            let stats = sender.stats();
            assert_eq!((stats.send_dropped, stats.gso_refusals), (10, 0));
            assert_eq!(sender.offloads().gso_max_segment, limit, "GSO limit kept");
            assert!(sender.offloads().gso);
            let received = receive_plain(&receiver, 1);
            assert_eq!(received[0].1, b"after");
        });
    }

    #[test]
    fn a_refused_destination_is_dropped_and_the_rest_still_go() {
        in_fresh_netns(|| {
            let sender = bind(true);
            let receiver = plain_receiver();
            let to = receiver.local_addr().unwrap();
            let mut tx = TxBatch::new(16);
            tx.push(to, None, b"before").unwrap();
            // No route to this address in a namespace with only lo.
            tx.push(SocketAddr::from(([192, 0, 2, 1], 9)), None, b"lost")
                .unwrap();
            tx.push(to, None, b"after").unwrap();
            let error = sender.send_batch(&mut tx).unwrap_err();
            assert_eq!(error.raw_os_error(), Some(libc::ENETUNREACH));
            assert!(tx.is_empty());
            let received = receive_payloads(&receiver, 2);
            assert_eq!(received, [b"before".to_vec(), b"after".to_vec()]);
            assert_eq!(sender.stats().send_dropped, 1);
        });
    }
}

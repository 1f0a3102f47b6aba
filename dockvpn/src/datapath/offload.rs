//! virtio-net headers and the segmentation of tun super-packets, sans-IO.
//!
//! A tun opened with `IFF_VNET_HDR` and TSO/USO offloads hands userspace what the kernel
//! would hand a NIC: a 10-byte header describing the offload, then one IPv4 packet of up to
//! 64 KiB (a TCP or UDP "super-packet") whose transport checksum holds only the
//! pseudo-header sum. Before it is sealed into the tunnel it must become wire-sized packets
//! with complete checksums: that is [`segment`], which never trusts the header or the
//! packet (typed [`OffloadError`]s, no panics, loops bounded by the packet's length).
//!
//! The other way, [`TunWriteBatch`] joins consecutive TCP segments of a flow into one
//! super-packet with a `GSO_TCPV4` header, so the kernel takes a burst in one write.
//!
//! Byte order: the header's 16-bit fields are little-endian. A tun uses the host's order for
//! these legacy headers unless `TUNSETVNETLE` is set; [`super::tun::Tun`] sets it, so
//! little-endian holds on every host (x86 and arm64 are little-endian anyway).

use std::ops::Range;

/// The size of the legacy `struct virtio_net_hdr` (no `num_buffers`), the tun's default.
pub const VIRTIO_NET_HDR_LEN: usize = 10;

/// `flags`: the transport checksum must be completed from `csum_start`; the field at
/// `csum_start + csum_offset` holds the pseudo-header sum.
pub const NEEDS_CSUM: u8 = 1;
/// `flags`: the checksum was already verified (received packets); nothing to do.
pub const DATA_VALID: u8 = 2;

/// `gso_type`: one packet, no segmentation.
pub const GSO_NONE: u8 = 0;
/// `gso_type`: IPv4 TCP segmentation (TSO).
pub const GSO_TCPV4: u8 = 1;
/// `gso_type`: IPv4 UDP fragmentation offload (UFO), long deprecated; refused.
pub const GSO_UDP: u8 = 3;
/// `gso_type`: IPv6 TCP segmentation; refused (the tunnel carries IPv4, the tun never
/// enables TSO6).
pub const GSO_TCPV6: u8 = 4;
/// `gso_type`: UDP segmentation (USO), split into datagrams of `gso_size` payload bytes.
pub const GSO_UDP_L4: u8 = 5;
/// `gso_type` bit: the TCP stream uses ECN, so CWR belongs on the first segment only.
pub const GSO_ECN: u8 = 0x80;

const IPPROTO_TCP: u8 = 6;
const IPPROTO_UDP: u8 = 17;
const IPV4_MIN_HEADER_LEN: usize = 20;
const TCP_MIN_HEADER_LEN: usize = 20;
const UDP_HEADER_LEN: usize = 8;
const TCP_CHECKSUM_OFFSET: u16 = 16;
const UDP_CHECKSUM_OFFSET: u16 = 6;
const TCP_FLAG_FIN: u8 = 0x01;
const TCP_FLAG_PSH: u8 = 0x08;
const TCP_FLAG_CWR: u8 = 0x80;

/// Why a tun packet could not be turned into wire packets: each is a drop reason the driver
/// counts (see [`OffloadError::reason`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum OffloadError {
    #[error("virtio-net header truncated: {len} of {VIRTIO_NET_HDR_LEN} bytes")]
    TruncatedHeader { len: usize },
    #[error("GSO type {gso_type:#04x} is not handled (only IPv4 TCP and UDP segmentation)")]
    UnsupportedGsoType { gso_type: u8 },
    #[error("header length {hdr_len} exceeds the {packet_len}-byte packet")]
    HeaderLengthOutOfBounds { hdr_len: u16, packet_len: usize },
    #[error(
        "checksum at start {csum_start} + offset {csum_offset} lies outside the {packet_len}-byte packet"
    )]
    ChecksumOutOfBounds {
        csum_start: u16,
        csum_offset: u16,
        packet_len: usize,
    },
    #[error("GSO size is zero")]
    ZeroGsoSize,
    #[error("GSO packet is not IPv4 (version {version})")]
    NotIpv4 { version: u8 },
    #[error("IPv4 header length {header_len} does not fit the {packet_len}-byte packet")]
    Ipv4HeaderLength {
        header_len: usize,
        packet_len: usize,
    },
    #[error("IPv4 total length {total_len} differs from the {packet_len}-byte packet")]
    Ipv4TotalLength { total_len: u16, packet_len: usize },
    #[error("GSO packet is an IPv4 fragment")]
    Ipv4Fragment,
    #[error("GSO type wants IP protocol {expected} but the packet carries {found}")]
    ProtocolMismatch { expected: u8, found: u8 },
    #[error("checksum start {csum_start} is not the transport header at {transport_offset}")]
    ChecksumStartMismatch {
        csum_start: u16,
        transport_offset: usize,
    },
    #[error("checksum offset {csum_offset} is not the transport checksum at {expected}")]
    ChecksumOffsetMismatch { csum_offset: u16, expected: u16 },
    #[error("transport header length {header_len} does not fit the {packet_len}-byte packet")]
    TransportHeaderLength {
        header_len: usize,
        packet_len: usize,
    },
}

impl OffloadError {
    /// A fixed label per variant, for drop counters and metrics.
    pub fn reason(&self) -> &'static str {
        match self {
            OffloadError::TruncatedHeader { .. } => "truncated_header",
            OffloadError::UnsupportedGsoType { .. } => "unsupported_gso_type",
            OffloadError::HeaderLengthOutOfBounds { .. } => "header_length_out_of_bounds",
            OffloadError::ChecksumOutOfBounds { .. } => "checksum_out_of_bounds",
            OffloadError::ZeroGsoSize => "zero_gso_size",
            OffloadError::NotIpv4 { .. } => "not_ipv4",
            OffloadError::Ipv4HeaderLength { .. } => "ipv4_header_length",
            OffloadError::Ipv4TotalLength { .. } => "ipv4_total_length",
            OffloadError::Ipv4Fragment => "ipv4_fragment",
            OffloadError::ProtocolMismatch { .. } => "protocol_mismatch",
            OffloadError::ChecksumStartMismatch { .. } => "checksum_start_mismatch",
            OffloadError::ChecksumOffsetMismatch { .. } => "checksum_offset_mismatch",
            OffloadError::TransportHeaderLength { .. } => "transport_header_length",
        }
    }
}

/// The legacy `struct virtio_net_hdr` (include/uapi/linux/virtio_net.h), little-endian.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct VirtioNetHdr {
    /// [`NEEDS_CSUM`], [`DATA_VALID`].
    pub flags: u8,
    /// [`GSO_NONE`], [`GSO_TCPV4`], [`GSO_UDP_L4`], … possibly with [`GSO_ECN`].
    pub gso_type: u8,
    /// What the kernel calls the header length. For packets from a tun it is the skb's
    /// linear length, which need not be the headers' length, so [`segment`] only bounds it
    /// and reads the real header lengths from the packet.
    pub hdr_len: u16,
    /// Payload bytes per segment.
    pub gso_size: u16,
    /// Where checksumming starts (the transport header for a tun: no link layer).
    pub csum_start: u16,
    /// Where, after `csum_start`, the checksum goes.
    pub csum_offset: u16,
}

impl VirtioNetHdr {
    /// The header for a plain packet written to the tun: no offload, checksums complete.
    pub const PLAIN: VirtioNetHdr = VirtioNetHdr {
        flags: 0,
        gso_type: GSO_NONE,
        hdr_len: 0,
        gso_size: 0,
        csum_start: 0,
        csum_offset: 0,
    };

    /// Splits what a tun read returned into its header and the packet after it.
    pub fn parse(bytes: &[u8]) -> Result<(VirtioNetHdr, &[u8]), OffloadError> {
        let Some((header, packet)) = bytes.split_first_chunk::<VIRTIO_NET_HDR_LEN>() else {
            return Err(OffloadError::TruncatedHeader { len: bytes.len() });
        };
        let field = |at: usize| u16::from_le_bytes([header[at], header[at + 1]]);
        let hdr = VirtioNetHdr {
            flags: header[0],
            gso_type: header[1],
            hdr_len: field(2),
            gso_size: field(4),
            csum_start: field(6),
            csum_offset: field(8),
        };
        Ok((hdr, packet))
    }

    /// The 10 bytes that precede a packet written to the tun.
    pub fn encode(&self) -> [u8; VIRTIO_NET_HDR_LEN] {
        let mut bytes = [0; VIRTIO_NET_HDR_LEN];
        bytes[0] = self.flags;
        bytes[1] = self.gso_type;
        bytes[2..4].copy_from_slice(&self.hdr_len.to_le_bytes());
        bytes[4..6].copy_from_slice(&self.gso_size.to_le_bytes());
        bytes[6..8].copy_from_slice(&self.csum_start.to_le_bytes());
        bytes[8..10].copy_from_slice(&self.csum_offset.to_le_bytes());
        bytes
    }

    pub fn needs_csum(&self) -> bool {
        self.flags & NEEDS_CSUM != 0
    }
}

/// A batch of packets in one reused buffer: after the batch has grown to its working size
/// once, `clear` and refilling allocate nothing.
#[derive(Debug, Default, Clone)]
pub struct Packets {
    data: Vec<u8>,
    spans: Vec<Range<usize>>,
}

impl Packets {
    pub fn new() -> Packets {
        Packets::default()
    }

    /// Empties the batch, keeping its memory.
    pub fn clear(&mut self) {
        self.data.clear();
        self.spans.clear();
    }

    /// How many packets.
    pub fn len(&self) -> usize {
        self.spans.len()
    }

    pub fn is_empty(&self) -> bool {
        self.spans.is_empty()
    }

    /// The packets' bytes in all.
    #[cfg(test)]
    pub fn byte_len(&self) -> usize {
        self.data.len()
    }

    /// Makes room for `packets` more packets of `bytes` more bytes in all.
    pub fn reserve(&mut self, bytes: usize, packets: usize) {
        self.data.reserve(bytes);
        self.spans.reserve(packets);
    }

    /// Appends a copy of `packet`, returned for changes in place.
    pub fn push(&mut self, packet: &[u8]) -> &mut [u8] {
        self.push_joined(packet, &[])
    }

    /// Appends a packet of `len` zero bytes to be built in place.
    #[cfg(test)]
    pub fn push_zeroed(&mut self, len: usize) -> &mut [u8] {
        let start = self.data.len();
        self.data.resize(start + len, 0);
        self.spans.push(start..self.data.len());
        &mut self.data[start..]
    }

    /// Appends one packet made of `head` then `tail` (headers, then a payload), returned for
    /// changes in place.
    pub fn push_joined(&mut self, head: &[u8], tail: &[u8]) -> &mut [u8] {
        let start = self.data.len();
        self.data.extend_from_slice(head);
        self.data.extend_from_slice(tail);
        self.spans.push(start..self.data.len());
        &mut self.data[start..]
    }

    /// Keeps the first `len` packets (a no-op if there are not more).
    pub fn truncate(&mut self, len: usize) {
        if let Some(first_dropped) = self.spans.get(len) {
            self.data.truncate(first_dropped.start);
            self.spans.truncate(len);
        }
    }

    pub fn get(&self, index: usize) -> Option<&[u8]> {
        let span = self.spans.get(index)?;
        self.data.get(span.clone())
    }

    /// The packet at `index`, to seal or rewrite in place.
    #[cfg(test)]
    pub fn get_mut(&mut self, index: usize) -> Option<&mut [u8]> {
        let span = self.spans.get(index)?;
        self.data.get_mut(span.clone())
    }

    pub fn iter(&self) -> Iter<'_> {
        Iter {
            data: &self.data,
            spans: self.spans.iter(),
        }
    }

    /// Appends `bytes` to the last packet (none: nothing happens), returned for changes.
    fn extend_last(&mut self, bytes: &[u8]) -> Option<&mut [u8]> {
        let last = self.spans.last_mut()?;
        self.data.extend_from_slice(bytes);
        last.end = self.data.len();
        let span = last.clone();
        self.data.get_mut(span)
    }
}

impl<'a> IntoIterator for &'a Packets {
    type Item = &'a [u8];
    type IntoIter = Iter<'a>;

    fn into_iter(self) -> Iter<'a> {
        self.iter()
    }
}

/// The packets of a [`Packets`], in order.
#[derive(Debug, Clone)]
pub struct Iter<'a> {
    data: &'a [u8],
    spans: std::slice::Iter<'a, Range<usize>>,
}

impl<'a> Iterator for Iter<'a> {
    type Item = &'a [u8];

    fn next(&mut self) -> Option<&'a [u8]> {
        // Spans are only ever made by the pushes above, so they lie inside `data`.
        self.spans.next().map(|span| &self.data[span.clone()])
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        self.spans.size_hint()
    }
}

impl ExactSizeIterator for Iter<'_> {}

/// Turns one packet read from a tun (its header parsed off) into wire packets appended to
/// `out`, returning how many. A `GSO_NONE` packet goes out as is, its checksum completed if
/// the kernel left that to us; a TCP or UDP super-packet is cut into `gso_size`-byte
/// payloads, each with its own IPv4 and transport headers and checksums. On an error `out`
/// is left as it was.
pub fn segment(
    hdr: &VirtioNetHdr,
    packet: &[u8],
    out: &mut Packets,
) -> Result<usize, OffloadError> {
    let before = out.len();
    let result = segment_into(hdr, packet, out);
    if result.is_err() {
        out.truncate(before);
    }
    result
}

fn segment_into(
    hdr: &VirtioNetHdr,
    packet: &[u8],
    out: &mut Packets,
) -> Result<usize, OffloadError> {
    if usize::from(hdr.hdr_len) > packet.len() {
        return Err(OffloadError::HeaderLengthOutOfBounds {
            hdr_len: hdr.hdr_len,
            packet_len: packet.len(),
        });
    }
    match hdr.gso_type & !GSO_ECN {
        GSO_NONE => complete_checksum(hdr, packet, out),
        GSO_TCPV4 => segment_ipv4(hdr, packet, Transport::Tcp, out),
        GSO_UDP_L4 => segment_ipv4(hdr, packet, Transport::Udp, out),
        _ => Err(OffloadError::UnsupportedGsoType {
            gso_type: hdr.gso_type,
        }),
    }
}

/// One packet out; with `NEEDS_CSUM`, the kernel left the pseudo-header sum in the checksum
/// field, so summing from `csum_start` over it and storing the complement completes it.
fn complete_checksum(
    hdr: &VirtioNetHdr,
    packet: &[u8],
    out: &mut Packets,
) -> Result<usize, OffloadError> {
    if !hdr.needs_csum() {
        out.push(packet);
        return Ok(1);
    }
    let start = usize::from(hdr.csum_start);
    let field = start + usize::from(hdr.csum_offset);
    if field + 2 > packet.len() {
        return Err(OffloadError::ChecksumOutOfBounds {
            csum_start: hdr.csum_start,
            csum_offset: hdr.csum_offset,
            packet_len: packet.len(),
        });
    }
    let copy = out.push(packet);
    let checksum = transport_checksum(fold(sum_be_words(&copy[start..])));
    copy[field..field + 2].copy_from_slice(&checksum.to_be_bytes());
    Ok(1)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Transport {
    Tcp,
    Udp,
}

impl Transport {
    fn protocol(self) -> u8 {
        match self {
            Transport::Tcp => IPPROTO_TCP,
            Transport::Udp => IPPROTO_UDP,
        }
    }

    fn checksum_offset(self) -> u16 {
        match self {
            Transport::Tcp => TCP_CHECKSUM_OFFSET,
            Transport::Udp => UDP_CHECKSUM_OFFSET,
        }
    }
}

fn segment_ipv4(
    hdr: &VirtioNetHdr,
    packet: &[u8],
    transport: Transport,
    out: &mut Packets,
) -> Result<usize, OffloadError> {
    let gso_size = usize::from(hdr.gso_size);
    if gso_size == 0 {
        return Err(OffloadError::ZeroGsoSize);
    }
    let ip_header_len = ipv4_header_len(packet, transport)?;
    if hdr.needs_csum() {
        if usize::from(hdr.csum_start) != ip_header_len {
            return Err(OffloadError::ChecksumStartMismatch {
                csum_start: hdr.csum_start,
                transport_offset: ip_header_len,
            });
        }
        if hdr.csum_offset != transport.checksum_offset() {
            return Err(OffloadError::ChecksumOffsetMismatch {
                csum_offset: hdr.csum_offset,
                expected: transport.checksum_offset(),
            });
        }
    }
    let transport_header_len = match transport {
        Transport::Tcp => tcp_header_len(packet, ip_header_len)?,
        Transport::Udp => UDP_HEADER_LEN,
    };
    let headers_len = ip_header_len + transport_header_len;
    if headers_len > packet.len() {
        return Err(OffloadError::TransportHeaderLength {
            header_len: transport_header_len,
            packet_len: packet.len(),
        });
    }
    let (headers, payload) = packet.split_at(headers_len);
    let first_ip_id = u16::from_be_bytes([headers[4], headers[5]]);

    let segments = payload.len().div_ceil(gso_size).max(1);
    out.reserve(payload.len() + segments * headers_len, segments);
    let mut offset = 0;
    for index in 0..segments {
        let end = payload.len().min(offset + gso_size);
        let segment = out.push_joined(headers, &payload[offset..end]);
        // Shorter than the packet, whose length the IPv4 total length (a u16) equals.
        let segment_len = segment.len() as u16;

        segment[2..4].copy_from_slice(&segment_len.to_be_bytes());
        let ip_id = first_ip_id.wrapping_add(index as u16);
        segment[4..6].copy_from_slice(&ip_id.to_be_bytes());
        segment[10..12].fill(0);
        let ip_checksum = !fold(sum_be_words(&segment[..ip_header_len]));
        segment[10..12].copy_from_slice(&ip_checksum.to_be_bytes());

        let transport_bytes = &mut segment[ip_header_len..];
        match transport {
            Transport::Tcp => {
                // The copied header still holds the super-packet's sequence and flags.
                let first_sequence = u32::from_be_bytes([
                    transport_bytes[4],
                    transport_bytes[5],
                    transport_bytes[6],
                    transport_bytes[7],
                ]);
                let sequence = first_sequence.wrapping_add(offset as u32);
                transport_bytes[4..8].copy_from_slice(&sequence.to_be_bytes());
                let mut flags = transport_bytes[13];
                if end < payload.len() {
                    // FIN and PSH end the burst: they belong to its last segment.
                    flags &= !(TCP_FLAG_FIN | TCP_FLAG_PSH);
                }
                if offset > 0 {
                    // CWR answers one congestion signal: only the first segment carries it.
                    flags &= !TCP_FLAG_CWR;
                }
                transport_bytes[13] = flags;
            }
            Transport::Udp => {
                let udp_len = transport_bytes.len() as u16;
                transport_bytes[4..6].copy_from_slice(&udp_len.to_be_bytes());
            }
        }
        let checksum_at = usize::from(transport.checksum_offset());
        transport_bytes[checksum_at..checksum_at + 2].fill(0);
        let sum = pseudo_header_sum(
            &headers[12..20],
            transport.protocol(),
            transport_bytes.len() as u16,
        ) + sum_be_words(transport_bytes);
        let checksum = transport_checksum(fold(sum));
        transport_bytes[checksum_at..checksum_at + 2].copy_from_slice(&checksum.to_be_bytes());
        offset = end;
    }
    Ok(segments)
}

/// Checks the IPv4 header of a super-packet and returns its length.
fn ipv4_header_len(packet: &[u8], transport: Transport) -> Result<usize, OffloadError> {
    let Some(&version_ihl) = packet.first() else {
        return Err(OffloadError::NotIpv4 { version: 0 });
    };
    let version = version_ihl >> 4;
    if version != 4 {
        return Err(OffloadError::NotIpv4 { version });
    }
    let header_len = usize::from(version_ihl & 0x0f) * 4;
    if header_len < IPV4_MIN_HEADER_LEN || header_len > packet.len() {
        return Err(OffloadError::Ipv4HeaderLength {
            header_len,
            packet_len: packet.len(),
        });
    }
    let total_len = u16::from_be_bytes([packet[2], packet[3]]);
    if usize::from(total_len) != packet.len() {
        return Err(OffloadError::Ipv4TotalLength {
            total_len,
            packet_len: packet.len(),
        });
    }
    let more_fragments_or_offset = u16::from_be_bytes([packet[6], packet[7]]) & 0x3fff;
    if more_fragments_or_offset != 0 {
        return Err(OffloadError::Ipv4Fragment);
    }
    if packet[9] != transport.protocol() {
        return Err(OffloadError::ProtocolMismatch {
            expected: transport.protocol(),
            found: packet[9],
        });
    }
    Ok(header_len)
}

/// The TCP header length from its data offset, checked against the packet.
fn tcp_header_len(packet: &[u8], ip_header_len: usize) -> Result<usize, OffloadError> {
    let Some(&data_offset) = packet.get(ip_header_len + 12) else {
        return Err(OffloadError::TransportHeaderLength {
            header_len: TCP_MIN_HEADER_LEN,
            packet_len: packet.len(),
        });
    };
    let header_len = usize::from(data_offset >> 4) * 4;
    if header_len < TCP_MIN_HEADER_LEN || ip_header_len + header_len > packet.len() {
        return Err(OffloadError::TransportHeaderLength {
            header_len,
            packet_len: packet.len(),
        });
    }
    Ok(header_len)
}

/// The unfolded ones'-complement sum of the IPv4 pseudo header (addresses: 8 bytes).
fn pseudo_header_sum(addresses: &[u8], protocol: u8, transport_len: u16) -> u64 {
    sum_be_words(addresses) + u64::from(protocol) + u64::from(transport_len)
}

/// The unfolded ones'-complement sum of `bytes` read as big-endian 16-bit words (an odd last
/// byte padded with zero). Four bytes at a time: a 32-bit word folds to the sum of its
/// halves, and a u64 cannot overflow for anything shorter than 2^34 bytes.
fn sum_be_words(bytes: &[u8]) -> u64 {
    let mut words = bytes.chunks_exact(4);
    let mut sum: u64 = 0;
    for word in &mut words {
        sum += u64::from(u32::from_be_bytes([word[0], word[1], word[2], word[3]]));
    }
    match *words.remainder() {
        [a] => sum += u64::from(a) << 8,
        [a, b] => sum += u64::from(u16::from_be_bytes([a, b])),
        [a, b, c] => sum += u64::from(u16::from_be_bytes([a, b])) + (u64::from(c) << 8),
        _ => {}
    }
    sum
}

/// Folds a ones'-complement sum to 16 bits.
fn fold(mut sum: u64) -> u16 {
    // Each round at least halves the width: four rounds at most.
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    sum as u16
}

/// The checksum to store for a folded sum. A computed 0 goes out as 0xffff, its
/// ones'-complement twin: for UDP a 0 would mean "no checksum", for TCP both verify.
fn transport_checksum(folded: u16) -> u16 {
    match !folded {
        0 => 0xffff,
        checksum => checksum,
    }
}

/// Packets for the tun, with consecutive in-order TCP/IPv4 segments of one flow coalesced
/// into super-packets (GRO done in userspace): the kernel then takes a burst of a TCP stream
/// in one write and one pass through its stack instead of one per segment. Only a segment
/// that continues the batch's last packet joins it (no flow table), which is what a batch
/// from one peer mostly is. Needs a tun with the virtio-net header and TSO4.
#[derive(Debug, Default)]
pub struct TunWriteBatch {
    packets: Packets,
    headers: Vec<VirtioNetHdr>,
    /// The last packet, while further TCP segments may still join it.
    open_run: Option<TcpRun>,
}

/// A super-packet under construction: the segments after the first must match it.
#[derive(Debug, Clone, Copy)]
struct TcpRun {
    headers_len: usize,
    gso_size: usize,
    next_sequence: u32,
}

/// What coalescing needs of a TCP segment that may take part in it.
#[derive(Debug, Clone, Copy)]
struct TcpSegment {
    headers_len: usize,
    payload_len: usize,
    sequence: u32,
    push: bool,
}

impl TunWriteBatch {
    pub fn new() -> TunWriteBatch {
        TunWriteBatch::default()
    }

    /// Empties the batch, keeping its memory.
    pub fn clear(&mut self) {
        self.packets.clear();
        self.headers.clear();
        self.open_run = None;
    }

    /// How many tun writes the batch holds.
    pub fn len(&self) -> usize {
        self.headers.len()
    }

    pub fn is_empty(&self) -> bool {
        self.headers.is_empty()
    }

    /// Adds one complete packet (checksums done), joining it to the previous one where it
    /// continues the same TCP flow.
    pub fn push(&mut self, packet: &[u8]) {
        let segment = coalescable_tcp_segment(packet);
        if let (Some(segment), Some(run)) = (segment, self.open_run) {
            if self.continues_run(&run, packet, &segment) {
                self.join(run, packet, segment);
                return;
            }
        }
        self.packets.push(packet);
        self.headers.push(VirtioNetHdr::PLAIN);
        self.open_run = segment
            .filter(|segment| !segment.push)
            .map(|segment| TcpRun {
                headers_len: segment.headers_len,
                gso_size: segment.payload_len,
                next_sequence: segment.sequence.wrapping_add(segment.payload_len as u32),
            });
    }

    /// The write at `index`: the header to put in front, then the packet.
    pub fn get(&self, index: usize) -> Option<(&VirtioNetHdr, &[u8])> {
        Some((self.headers.get(index)?, self.packets.get(index)?))
    }

    /// The writes in order: each header to put in front of its packet.
    pub fn iter(&self) -> impl ExactSizeIterator<Item = (&VirtioNetHdr, &[u8])> + '_ {
        self.headers.iter().zip(self.packets.iter())
    }

    fn continues_run(&self, run: &TcpRun, packet: &[u8], segment: &TcpSegment) -> bool {
        let Some(last) = self.packets.get(self.packets.len().wrapping_sub(1)) else {
            return false;
        };
        let headers_len = run.headers_len;
        segment.headers_len == headers_len
            && segment.sequence == run.next_sequence
            && segment.payload_len <= run.gso_size
            && last.len() + segment.payload_len <= usize::from(u16::MAX)
            // Version, TOS; DF, TTL, protocol; addresses.
            && last[..2] == packet[..2]
            && last[6..10] == packet[6..10]
            && last[12..20] == packet[12..20]
            // Ports; acknowledgement; data offset, window (flags were checked); options.
            && last[20..24] == packet[20..24]
            && last[28..33] == packet[28..33]
            && last[34..36] == packet[34..36]
            && last[40..headers_len] == packet[40..headers_len]
    }

    fn join(&mut self, mut run: TcpRun, packet: &[u8], segment: TcpSegment) {
        let Some(joined) = self.packets.extend_last(&packet[segment.headers_len..]) else {
            return;
        };
        // Within u16: `continues_run` checked the sum.
        let total_len = joined.len() as u16;
        joined[2..4].copy_from_slice(&total_len.to_be_bytes());
        joined[10..12].fill(0);
        let ip_checksum = !fold(sum_be_words(&joined[..IPV4_MIN_HEADER_LEN]));
        joined[10..12].copy_from_slice(&ip_checksum.to_be_bytes());
        if segment.push {
            joined[IPV4_MIN_HEADER_LEN + 13] |= TCP_FLAG_PSH;
        }
        // The kernel completes the checksum (NEEDS_CSUM) from the pseudo-header sum.
        let pseudo = pseudo_header_sum(
            &joined[12..20],
            IPPROTO_TCP,
            total_len - IPV4_MIN_HEADER_LEN as u16,
        );
        let checksum_at = IPV4_MIN_HEADER_LEN + usize::from(TCP_CHECKSUM_OFFSET);
        joined[checksum_at..checksum_at + 2].copy_from_slice(&fold(pseudo).to_be_bytes());
        if let Some(header) = self.headers.last_mut() {
            *header = VirtioNetHdr {
                flags: NEEDS_CSUM,
                gso_type: GSO_TCPV4,
                hdr_len: run.headers_len as u16,
                gso_size: run.gso_size as u16,
                csum_start: IPV4_MIN_HEADER_LEN as u16,
                csum_offset: TCP_CHECKSUM_OFFSET,
            };
        }
        run.next_sequence = run.next_sequence.wrapping_add(segment.payload_len as u32);
        // A short or pushed segment ends the burst, as it ends a kernel super-packet.
        let ends_run = segment.push || segment.payload_len < run.gso_size;
        self.open_run = (!ends_run).then_some(run);
    }
}

/// A TCP/IPv4 data segment that may be coalesced: no IP options, no fragment, DF set, only ACK
/// (and PSH) set, some payload, and both checksums right, since the kernel will recompute
/// the joined checksum rather than verify each segment's.
fn coalescable_tcp_segment(packet: &[u8]) -> Option<TcpSegment> {
    const TCP_FLAG_ACK: u8 = 0x10;
    let ip = packet.get(..IPV4_MIN_HEADER_LEN)?;
    let plain_ipv4_tcp = ip[0] == 0x45
        && usize::from(u16::from_be_bytes([ip[2], ip[3]])) == packet.len()
        && u16::from_be_bytes([ip[6], ip[7]]) & 0x3fff == 0
        // Don't-fragment: the kernel numbers the IP ids of a split super-packet itself,
        // which only matters to a packet that may be fragmented.
        && ip[6] & 0x40 != 0
        && ip[9] == IPPROTO_TCP;
    if !plain_ipv4_tcp {
        return None;
    }
    let headers_len = IPV4_MIN_HEADER_LEN + tcp_header_len(packet, IPV4_MIN_HEADER_LEN).ok()?;
    let payload_len = packet.len() - headers_len;
    let flags = packet[IPV4_MIN_HEADER_LEN + 13];
    if payload_len == 0 || flags & !(TCP_FLAG_ACK | TCP_FLAG_PSH) != 0 || flags & TCP_FLAG_ACK == 0
    {
        return None;
    }
    let transport = &packet[IPV4_MIN_HEADER_LEN..];
    let checksums_verify = fold(sum_be_words(ip)) == 0xffff
        && fold(
            pseudo_header_sum(&ip[12..20], IPPROTO_TCP, transport.len() as u16)
                + sum_be_words(transport),
        ) == 0xffff;
    if !checksums_verify {
        return None;
    }
    Some(TcpSegment {
        headers_len,
        payload_len,
        sequence: u32::from_be_bytes([transport[4], transport[5], transport[6], transport[7]]),
        push: flags & TCP_FLAG_PSH != 0,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::datapath::test_support::ones_complement_sum;

    const SOURCE: [u8; 4] = [10, 99, 0, 1];
    const DESTINATION: [u8; 4] = [10, 99, 0, 2];

    fn ipv4_checksum_verifies(packet: &[u8]) -> bool {
        let header_len = usize::from(packet[0] & 0x0f) * 4;
        ones_complement_sum(&[&packet[..header_len]]) == 0xffff
    }

    fn transport_checksum_verifies(packet: &[u8]) -> bool {
        let header_len = usize::from(packet[0] & 0x0f) * 4;
        let transport = &packet[header_len..];
        let length = (transport.len() as u16).to_be_bytes();
        let pseudo = [0, packet[9], length[0], length[1]];
        ones_complement_sum(&[&packet[12..20], &pseudo, transport]) == 0xffff
    }

    fn pattern(len: usize) -> Vec<u8> {
        (0..len)
            .map(|index| (index * 7 + index / 251) as u8)
            .collect()
    }

    /// What the kernel leaves in a checksum field with NEEDS_CSUM: the folded pseudo-header
    /// sum, not complemented.
    fn partial_checksum(packet: &[u8], protocol: u8, header_len: usize) -> [u8; 2] {
        let length = ((packet.len() - header_len) as u16).to_be_bytes();
        let pseudo = [0, protocol, length[0], length[1]];
        ones_complement_sum(&[&packet[12..20], &pseudo]).to_be_bytes()
    }

    fn ipv4_header(total_len: usize, protocol: u8, id: u16, options: &[u8]) -> Vec<u8> {
        let header_len = 20 + options.len();
        let mut header = vec![0x40 | (header_len / 4) as u8, 0];
        header.extend_from_slice(&(total_len as u16).to_be_bytes());
        header.extend_from_slice(&id.to_be_bytes());
        header.extend_from_slice(&[0x40, 0, 64, protocol, 0, 0]); // DF, TTL 64
        header.extend_from_slice(&SOURCE);
        header.extend_from_slice(&DESTINATION);
        header.extend_from_slice(options);
        header
    }

    struct TcpSuper {
        ip_options: Vec<u8>,
        tcp_options: Vec<u8>,
        id: u16,
        sequence: u32,
        flags: u8,
        payload: Vec<u8>,
    }

    /// A TSO super-packet as a tun hands it over: IPv4 total length of the whole, TCP
    /// checksum left partial.
    fn tcp_super_packet(spec: &TcpSuper) -> Vec<u8> {
        let tcp_header_len = 20 + spec.tcp_options.len();
        let total = 20 + spec.ip_options.len() + tcp_header_len + spec.payload.len();
        let mut packet = ipv4_header(total, IPPROTO_TCP, spec.id, &spec.ip_options);
        let ip_header_len = packet.len();
        packet.extend_from_slice(&40000u16.to_be_bytes());
        packet.extend_from_slice(&443u16.to_be_bytes());
        packet.extend_from_slice(&spec.sequence.to_be_bytes());
        packet.extend_from_slice(&0x0102_0304u32.to_be_bytes()); // ack
        packet.push(((tcp_header_len / 4) as u8) << 4);
        packet.push(spec.flags);
        packet.extend_from_slice(&[0xff, 0xff, 0, 0, 0, 0]); // window, checksum, urgent
        packet.extend_from_slice(&spec.tcp_options);
        packet.extend_from_slice(&spec.payload);
        let partial = partial_checksum(&packet, IPPROTO_TCP, ip_header_len);
        packet[ip_header_len + 16..ip_header_len + 18].copy_from_slice(&partial);
        packet
    }

    fn udp_super_packet(id: u16, payload: &[u8]) -> Vec<u8> {
        let total = 20 + 8 + payload.len();
        let mut packet = ipv4_header(total, IPPROTO_UDP, id, &[]);
        packet.extend_from_slice(&5000u16.to_be_bytes());
        packet.extend_from_slice(&6000u16.to_be_bytes());
        packet.extend_from_slice(&((8 + payload.len()) as u16).to_be_bytes());
        packet.extend_from_slice(&[0, 0]);
        packet.extend_from_slice(payload);
        let partial = partial_checksum(&packet, IPPROTO_UDP, 20);
        packet[26..28].copy_from_slice(&partial);
        packet
    }

    fn tso_header(ip_header_len: usize, headers_len: usize, gso_size: u16) -> VirtioNetHdr {
        VirtioNetHdr {
            flags: NEEDS_CSUM,
            gso_type: GSO_TCPV4,
            hdr_len: headers_len as u16,
            gso_size,
            csum_start: ip_header_len as u16,
            csum_offset: TCP_CHECKSUM_OFFSET,
        }
    }

    #[test]
    fn header_round_trips_through_parse_and_encode() {
        let hdr = VirtioNetHdr {
            flags: NEEDS_CSUM,
            gso_type: GSO_TCPV4 | GSO_ECN,
            hdr_len: 0x1234,
            gso_size: 1448,
            csum_start: 20,
            csum_offset: 16,
        };
        let mut bytes = hdr.encode().to_vec();
        assert_eq!(&bytes[2..4], &[0x34, 0x12], "little-endian fields");
        bytes.extend_from_slice(b"packet");
        assert_eq!(VirtioNetHdr::parse(&bytes), Ok((hdr, &b"packet"[..])));
        assert_eq!(
            VirtioNetHdr::parse(&bytes[..9]),
            Err(OffloadError::TruncatedHeader { len: 9 })
        );
        assert_eq!(VirtioNetHdr::PLAIN.encode(), [0; VIRTIO_NET_HDR_LEN]);
    }

    fn check_tso(spec: TcpSuper, gso_size: u16) {
        let packet = tcp_super_packet(&spec);
        let ip_header_len = 20 + spec.ip_options.len();
        let headers_len = ip_header_len + 20 + spec.tcp_options.len();
        let hdr = tso_header(ip_header_len, headers_len, gso_size);
        let mut out = Packets::new();
        out.push(b"already there");

        let count = segment(&hdr, &packet, &mut out).expect("a valid super-packet");

        let expected = spec.payload.len().div_ceil(usize::from(gso_size));
        assert_eq!(count, expected);
        assert_eq!(out.len(), 1 + expected, "appended after what was there");
        assert_eq!(out.get(0), Some(&b"already there"[..]));
        let mut payload = Vec::new();
        for (index, wire) in out.iter().skip(1).enumerate() {
            let wire_payload = &wire[headers_len..];
            assert!(wire_payload.len() <= usize::from(gso_size));
            assert_eq!(&wire[..2], &packet[..2], "version, IHL, TOS");
            assert_eq!(
                usize::from(u16::from_be_bytes([wire[2], wire[3]])),
                wire.len()
            );
            let id = u16::from_be_bytes([wire[4], wire[5]]);
            assert_eq!(id, spec.id.wrapping_add(index as u16));
            assert_eq!(
                &wire[12..ip_header_len],
                &packet[12..ip_header_len],
                "addresses, options"
            );
            assert!(
                ipv4_checksum_verifies(wire),
                "IPv4 checksum of segment {index}"
            );
            assert!(
                transport_checksum_verifies(wire),
                "TCP checksum of segment {index}"
            );
            let tcp = &wire[ip_header_len..];
            let sequence = u32::from_be_bytes([tcp[4], tcp[5], tcp[6], tcp[7]]);
            assert_eq!(sequence, spec.sequence.wrapping_add(payload.len() as u32));
            assert_eq!(&tcp[8..12], &0x0102_0304u32.to_be_bytes(), "ack");
            let tcp_options = ip_header_len + 20..headers_len;
            assert!(
                wire[tcp_options.clone()] == packet[tcp_options],
                "TCP options"
            );
            let flags = tcp[13];
            let last = index + 1 == expected;
            let expected_flags = match (index == 0, last) {
                (true, true) => spec.flags,
                (true, false) => spec.flags & !(TCP_FLAG_FIN | TCP_FLAG_PSH),
                (false, true) => spec.flags & !TCP_FLAG_CWR,
                (false, false) => spec.flags & !(TCP_FLAG_FIN | TCP_FLAG_PSH | TCP_FLAG_CWR),
            };
            assert_eq!(flags, expected_flags, "flags of segment {index}");
            payload.extend_from_slice(wire_payload);
        }
        assert!(
            payload == spec.payload,
            "the payloads concatenate to the original"
        );
    }

    #[test]
    fn tso_super_packet_becomes_mss_segments_with_fixed_headers_and_checksums() {
        check_tso(
            TcpSuper {
                ip_options: vec![],
                tcp_options: vec![],
                id: 0xfffe,            // wraps
                sequence: 0xffff_f000, // wraps
                flags: 0x10 | TCP_FLAG_PSH | TCP_FLAG_FIN | TCP_FLAG_CWR,
                payload: pattern(5000),
            },
            1448,
        );
    }

    #[test]
    fn tso_copies_ip_and_tcp_options_into_every_segment() {
        check_tso(
            TcpSuper {
                ip_options: vec![1, 1, 1, 0], // NOPs, end of list
                tcp_options: vec![1, 1, 8, 10, 0, 0, 0, 1, 0, 0, 0, 2], // timestamps
                id: 7,
                sequence: 1000,
                flags: 0x10 | TCP_FLAG_PSH,
                payload: pattern(4001), // odd length: the checksum pads the last byte
            },
            1000,
        );
    }

    #[test]
    fn tso_payload_of_one_segment_or_none_still_comes_out_once() {
        for len in [0, 1, 1448] {
            let spec = TcpSuper {
                ip_options: vec![],
                tcp_options: vec![],
                id: 1,
                sequence: 5,
                flags: 0x18,
                payload: pattern(len),
            };
            let packet = tcp_super_packet(&spec);
            let mut out = Packets::new();
            assert_eq!(segment(&tso_header(20, 40, 1448), &packet, &mut out), Ok(1));
            let wire = out.get(0).expect("one segment");
            assert_eq!(&wire[40..], &spec.payload[..]);
            assert!(ipv4_checksum_verifies(wire) && transport_checksum_verifies(wire));
        }
    }

    #[test]
    fn uso_super_packet_becomes_datagrams_with_lengths_and_checksums() {
        let payload = pattern(3000);
        let packet = udp_super_packet(41, &payload);
        let hdr = VirtioNetHdr {
            flags: NEEDS_CSUM,
            gso_type: GSO_UDP_L4,
            hdr_len: 28,
            gso_size: 1200,
            csum_start: 20,
            csum_offset: UDP_CHECKSUM_OFFSET,
        };
        let mut out = Packets::new();

        assert_eq!(segment(&hdr, &packet, &mut out), Ok(3));

        let mut joined = Vec::new();
        for (index, wire) in out.iter().enumerate() {
            let datagram_len = if index < 2 { 1200 } else { 600 };
            assert_eq!(wire.len(), 28 + datagram_len);
            assert_eq!(
                usize::from(u16::from_be_bytes([wire[2], wire[3]])),
                wire.len()
            );
            assert_eq!(u16::from_be_bytes([wire[4], wire[5]]), 41 + index as u16);
            assert_eq!(&wire[20..24], &packet[20..24], "ports");
            assert_eq!(
                usize::from(u16::from_be_bytes([wire[24], wire[25]])),
                8 + datagram_len
            );
            assert_ne!(
                &wire[26..28],
                &[0, 0],
                "a UDP checksum of 0 would mean none"
            );
            assert!(
                ipv4_checksum_verifies(wire),
                "IPv4 checksum of datagram {index}"
            );
            assert!(
                transport_checksum_verifies(wire),
                "UDP checksum of datagram {index}"
            );
            joined.extend_from_slice(&wire[28..]);
        }
        assert_eq!(joined, payload);
    }

    #[test]
    fn needs_csum_completes_the_partial_checksum_of_a_plain_packet() {
        let udp = udp_super_packet(1, &pattern(333));
        let tcp = tcp_super_packet(&TcpSuper {
            ip_options: vec![],
            tcp_options: vec![],
            id: 1,
            sequence: 1,
            flags: 0x18,
            payload: pattern(100),
        });
        for (packet, csum_offset) in [(udp, UDP_CHECKSUM_OFFSET), (tcp, TCP_CHECKSUM_OFFSET)] {
            assert!(!transport_checksum_verifies(&packet), "starts partial");
            let hdr = VirtioNetHdr {
                flags: NEEDS_CSUM,
                csum_start: 20,
                csum_offset,
                ..VirtioNetHdr::PLAIN
            };
            let mut out = Packets::new();
            assert_eq!(segment(&hdr, &packet, &mut out), Ok(1));
            let wire = out.get(0).expect("the packet");
            assert!(transport_checksum_verifies(wire));
            let field = 20 + usize::from(csum_offset);
            assert_eq!(&wire[..field], &packet[..field]);
            assert_eq!(&wire[field + 2..], &packet[field + 2..]);
        }
    }

    #[test]
    fn plain_packet_without_needs_csum_goes_out_unchanged() {
        let packet = pattern(77);
        let mut out = Packets::new();
        let hdr = VirtioNetHdr {
            flags: DATA_VALID,
            ..VirtioNetHdr::PLAIN
        };
        assert_eq!(segment(&hdr, &packet, &mut out), Ok(1));
        assert_eq!(out.get(0), Some(&packet[..]));
    }

    #[test]
    fn malformed_super_packets_are_typed_errors_and_leave_out_as_it_was() {
        let good = tcp_super_packet(&TcpSuper {
            ip_options: vec![],
            tcp_options: vec![],
            id: 1,
            sequence: 1,
            flags: 0x10,
            payload: pattern(3000),
        });
        let hdr = tso_header(20, 40, 1448);
        let with = |change: &dyn Fn(&mut Vec<u8>)| {
            let mut packet = good.clone();
            change(&mut packet);
            packet
        };
        let cases: Vec<(VirtioNetHdr, Vec<u8>, OffloadError)> = vec![
            (
                VirtioNetHdr { gso_size: 0, ..hdr },
                good.clone(),
                OffloadError::ZeroGsoSize,
            ),
            (
                VirtioNetHdr {
                    gso_type: GSO_TCPV6,
                    ..hdr
                },
                good.clone(),
                OffloadError::UnsupportedGsoType {
                    gso_type: GSO_TCPV6,
                },
            ),
            (
                VirtioNetHdr {
                    gso_type: GSO_UDP,
                    ..hdr
                },
                good.clone(),
                OffloadError::UnsupportedGsoType { gso_type: GSO_UDP },
            ),
            (
                VirtioNetHdr {
                    hdr_len: 4000,
                    ..hdr
                },
                good.clone(),
                OffloadError::HeaderLengthOutOfBounds {
                    hdr_len: 4000,
                    packet_len: 3040,
                },
            ),
            (
                VirtioNetHdr {
                    gso_type: GSO_UDP_L4,
                    ..hdr
                },
                good.clone(),
                OffloadError::ProtocolMismatch {
                    expected: 17,
                    found: 6,
                },
            ),
            (
                hdr,
                with(&|packet| packet[0] = 0x60),
                OffloadError::NotIpv4 { version: 6 },
            ),
            (
                hdr,
                with(&|packet| packet[0] = 0x44),
                OffloadError::Ipv4HeaderLength {
                    header_len: 16,
                    packet_len: 3040,
                },
            ),
            (
                hdr,
                with(&|packet| packet.truncate(3000)),
                OffloadError::Ipv4TotalLength {
                    total_len: 3040,
                    packet_len: 3000,
                },
            ),
            (
                hdr,
                with(&|packet| packet[6] = 0x20),
                OffloadError::Ipv4Fragment,
            ),
            (
                hdr,
                with(&|packet| packet[32] = 0x40),
                OffloadError::TransportHeaderLength {
                    header_len: 16,
                    packet_len: 3040,
                },
            ),
            (
                VirtioNetHdr {
                    csum_start: 14,
                    ..hdr
                },
                good.clone(),
                OffloadError::ChecksumStartMismatch {
                    csum_start: 14,
                    transport_offset: 20,
                },
            ),
            (
                VirtioNetHdr {
                    csum_offset: 6,
                    ..hdr
                },
                good.clone(),
                OffloadError::ChecksumOffsetMismatch {
                    csum_offset: 6,
                    expected: 16,
                },
            ),
            (
                VirtioNetHdr {
                    gso_type: GSO_NONE,
                    csum_start: 3000,
                    csum_offset: 39,
                    ..hdr
                },
                good.clone(),
                OffloadError::ChecksumOutOfBounds {
                    csum_start: 3000,
                    csum_offset: 39,
                    packet_len: 3040,
                },
            ),
        ];
        for (hdr, packet, expected) in cases {
            let mut out = Packets::new();
            out.push(b"kept");
            assert_eq!(segment(&hdr, &packet, &mut out), Err(expected));
            assert_eq!(out.len(), 1);
            assert_eq!(out.byte_len(), 4);
            assert!(!expected.reason().is_empty());
        }
        let truncated_tcp = &with(&|packet| {
            packet.truncate(30);
            packet[2..4].copy_from_slice(&30u16.to_be_bytes());
        });
        assert_eq!(
            segment(
                &VirtioNetHdr { hdr_len: 0, ..hdr },
                truncated_tcp,
                &mut Packets::new()
            ),
            Err(OffloadError::TransportHeaderLength {
                header_len: 20,
                packet_len: 30
            })
        );
    }

    #[test]
    fn packets_reuse_their_memory_once_grown() {
        let mut packets = Packets::new();
        let fill = |packets: &mut Packets| {
            for len in [1500, 60, 1400, 9000] {
                packets.push(&pattern(len));
            }
            packets.push_zeroed(100)[0] = 0x45;
            packets.push_joined(b"head", b"tail");
        };
        fill(&mut packets);
        let (data_capacity, spans_capacity) = (packets.data.capacity(), packets.spans.capacity());
        let data_pointer = packets.data.as_ptr();
        for _ in 0..10 {
            packets.clear();
            assert!(packets.is_empty());
            fill(&mut packets);
        }
        assert_eq!(packets.data.capacity(), data_capacity);
        assert_eq!(packets.spans.capacity(), spans_capacity);
        assert_eq!(packets.data.as_ptr(), data_pointer, "no reallocation");
        assert_eq!(packets.len(), 6);
        assert_eq!(
            packets.get(4).map(|packet| (packet.len(), packet[0])),
            Some((100, 0x45))
        );
        assert_eq!(packets.get(5), Some(&b"headtail"[..]));
        assert_eq!(packets.get(6), None);
        assert_eq!(packets.iter().len(), 6);
        if let Some(packet) = packets.get_mut(5) {
            packet[0] = b'H';
        }
        assert_eq!((&packets).into_iter().last(), Some(&b"Headtail"[..]));
        packets.truncate(2);
        assert_eq!(packets.byte_len(), 1560);
        packets.truncate(5);
        assert_eq!(packets.len(), 2);
    }

    /// xorshift64*: a fixed-seed generator, so a failure replays.
    struct Rng(u64);

    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
        }

        fn below(&mut self, bound: usize) -> usize {
            (self.next() % bound as u64) as usize
        }
    }

    #[test]
    fn hostile_headers_and_packets_give_errors_or_bounded_output_never_panics() {
        let mut rng = Rng(0x5eed_0ff1_0ad0_0001);
        let valid_tcp = tcp_super_packet(&TcpSuper {
            ip_options: vec![],
            tcp_options: vec![1, 1, 1, 1],
            id: 9,
            sequence: 9,
            flags: 0x19,
            payload: pattern(6000),
        });
        let valid_udp = udp_super_packet(9, &pattern(6000));
        let mut out = Packets::new();
        let mut segmented = 0;
        for _ in 0..20_000 {
            let shape = rng.below(4);
            let mut bytes: Vec<u8> = match shape {
                0 => (0..rng.below(200)).map(|_| rng.next() as u8).collect(),
                1 => valid_tcp.clone(),
                2 => valid_udp.clone(),
                _ => {
                    let mut read = tso_header(20, 44, 1448).encode().to_vec();
                    read.extend_from_slice(&valid_tcp);
                    read
                }
            };
            for _ in 0..rng.below(4) {
                let at = rng.below(bytes.len().max(1));
                if let Some(byte) = bytes.get_mut(at) {
                    *byte = rng.next() as u8;
                }
            }
            if rng.below(4) == 0 {
                let keep = rng.below(bytes.len() + 1);
                bytes.truncate(keep);
            }
            let random_hdr = VirtioNetHdr {
                flags: [0, NEEDS_CSUM, DATA_VALID, rng.next() as u8][rng.below(4)],
                gso_type: [
                    GSO_NONE,
                    GSO_TCPV4,
                    GSO_UDP_L4,
                    GSO_TCPV6,
                    GSO_TCPV4 | GSO_ECN,
                ][rng.below(5)],
                hdr_len: [0, 44, 28, rng.next() as u16][rng.below(4)],
                gso_size: [0, 1, 7, 1448, rng.next() as u16][rng.below(5)],
                csum_start: [20, 0, rng.next() as u16][rng.below(3)],
                csum_offset: [16, 6, rng.next() as u16][rng.below(3)],
            };
            // A whole (mutated) tun read goes through `parse` as the tun code does.
            let (hdr, bytes) = match VirtioNetHdr::parse(&bytes) {
                Ok((parsed, packet)) if shape == 3 => (parsed, packet),
                _ => (random_hdr, &bytes[..]),
            };
            out.clear();
            match segment(&hdr, bytes, &mut out) {
                Ok(count) => {
                    segmented += 1;
                    assert_eq!(out.len(), count);
                    assert!(count >= 1);
                    assert!(count <= bytes.len().max(1), "at most one per payload byte");
                    // Headers are at most 60 + 60 bytes, copied once per segment.
                    assert!(out.byte_len() <= bytes.len() + count * 120);
                    assert!(out.iter().all(|wire| wire.len() <= bytes.len()));
                }
                Err(error) => {
                    assert!(out.is_empty(), "{error}: nothing half-written");
                }
            }
        }
        assert!(segmented > 1000, "the mutations left enough valid inputs");
    }

    /// A TCP segment as a client sends it: both checksums complete.
    fn wire_tcp_segment(id: u16, sequence: u32, flags: u8, payload: &[u8]) -> Vec<u8> {
        let packet = tcp_super_packet(&TcpSuper {
            ip_options: vec![],
            tcp_options: vec![1, 1, 8, 10, 0, 0, 0, 7, 0, 0, 0, 9],
            id,
            sequence,
            flags,
            payload: payload.to_vec(),
        });
        resealed(&packet, &|_| {})
    }

    /// `packet` changed by `change`, with both checksums (IPv4 without options) recomputed.
    fn resealed(packet: &[u8], change: &dyn Fn(&mut Vec<u8>)) -> Vec<u8> {
        let mut packet = packet.to_vec();
        change(&mut packet);
        reseal_tcp(&mut packet);
        assert!(ipv4_checksum_verifies(&packet) && transport_checksum_verifies(&packet));
        packet
    }

    /// Recomputes both checksums of what is taken for TCP/IPv4 without IP options.
    fn reseal_tcp(packet: &mut [u8]) {
        packet[10..12].fill(0);
        let ip_checksum = !ones_complement_sum(&[&packet[..20]]);
        packet[10..12].copy_from_slice(&ip_checksum.to_be_bytes());
        packet[36..38].fill(0);
        let length = ((packet.len() - 20) as u16).to_be_bytes();
        let pseudo = [0, IPPROTO_TCP, length[0], length[1]];
        let tcp_checksum = !ones_complement_sum(&[&packet[12..20], &pseudo, &packet[20..]]);
        packet[36..38].copy_from_slice(&tcp_checksum.to_be_bytes());
    }

    const ACK: u8 = 0x10;

    /// A burst of one flow as the peer's stack sends it: MSS-sized segments, consecutive
    /// ids and sequence numbers, PSH and a short payload at the end.
    fn burst(first_id: u16, first_sequence: u32, payload_lens: &[usize]) -> Vec<Vec<u8>> {
        let mut sequence = first_sequence;
        payload_lens
            .iter()
            .enumerate()
            .map(|(index, &len)| {
                let last = index + 1 == payload_lens.len();
                let flags = if last { ACK | TCP_FLAG_PSH } else { ACK };
                let packet = wire_tcp_segment(
                    first_id.wrapping_add(index as u16),
                    sequence,
                    flags,
                    &pattern(len + index)[index..],
                );
                sequence = sequence.wrapping_add(len as u32);
                packet
            })
            .collect()
    }

    /// Segments what the batch would write, as the kernel would.
    fn resegment(batch: &TunWriteBatch) -> Vec<Vec<u8>> {
        let mut out = Packets::new();
        for (hdr, packet) in batch.iter() {
            segment(hdr, packet, &mut out).expect("the kernel would take it");
        }
        out.iter().map(<[u8]>::to_vec).collect()
    }

    #[test]
    fn a_burst_of_one_flow_becomes_one_super_packet_that_segments_back_exactly() {
        let segments = burst(0xfffe, 0xffff_fa00, &[1448, 1448, 1448, 700]);
        let mut batch = TunWriteBatch::new();
        for packet in &segments {
            batch.push(packet);
        }

        assert_eq!(batch.len(), 1);
        let (hdr, joined) = batch.get(0).expect("one write");
        assert_eq!(
            *hdr,
            VirtioNetHdr {
                flags: NEEDS_CSUM,
                gso_type: GSO_TCPV4,
                hdr_len: 52,
                gso_size: 1448,
                csum_start: 20,
                csum_offset: 16,
            }
        );
        assert_eq!(joined.len(), 52 + 3 * 1448 + 700);
        assert!(
            ipv4_checksum_verifies(joined),
            "ip_rcv checks the joined header"
        );
        // Completed from csum_start as the kernel would, the partial sum gives a valid one.
        let mut completed = Packets::new();
        let as_plain = VirtioNetHdr {
            gso_type: GSO_NONE,
            ..*hdr
        };
        assert_eq!(segment(&as_plain, joined, &mut completed), Ok(1));
        assert!(completed.iter().all(transport_checksum_verifies));
        assert_eq!(joined[33], ACK | TCP_FLAG_PSH, "the burst's PSH");
        assert!(
            resegment(&batch) == segments,
            "segmenting gives back the original packets"
        );

        batch.clear();
        assert!(batch.is_empty());
    }

    #[test]
    fn only_the_continuation_of_the_last_packet_joins_it() {
        let flow_a = burst(1, 1000, &[1000, 1000, 1000, 1000]);
        // Same sequence numbers as A's third segment, another source port.
        let flow_b = [resealed(&flow_a[2], &|packet| packet[21] ^= 1)];
        let order = [&flow_a[0], &flow_a[1], &flow_b[0], &flow_a[2], &flow_a[3]];
        let mut batch = TunWriteBatch::new();
        for packet in order {
            batch.push(packet);
        }

        let gso: Vec<u8> = batch.iter().map(|(hdr, _)| hdr.gso_type).collect();
        assert_eq!(gso, [GSO_TCPV4, GSO_NONE, GSO_TCPV4], "A1+A2, B1, A3+A4");
        assert_eq!(resegment(&batch), order.map(|packet| packet.clone()));
    }

    #[test]
    fn segments_that_must_not_join_stay_separate_and_unchanged() {
        let [first, second] = <[Vec<u8>; 2]>::try_from(burst(1, 1, &[1000, 1000])).expect("two");
        let broken = |change: &dyn Fn(&mut Vec<u8>)| {
            let mut packet = second.clone();
            change(&mut packet);
            packet
        };
        let changed = |change: &dyn Fn(&mut Vec<u8>)| resealed(&second, change);
        let reseal = |id: u16, sequence: u32, flags: u8, len: usize| {
            wire_tcp_segment(id, sequence, flags, &pattern(len))
        };
        let cases = [
            ("a bad TCP checksum", broken(&|packet| packet[100] ^= 1)),
            ("a bad IPv4 checksum", broken(&|packet| packet[8] ^= 1)),
            ("a sequence gap", reseal(2, 1 + 1001, ACK, 1000)),
            ("a larger payload", reseal(2, 1001, ACK, 1001)),
            ("SYN", reseal(2, 1001, ACK | 0x02, 1000)),
            ("FIN", reseal(2, 1001, ACK | TCP_FLAG_FIN, 1000)),
            ("no payload", reseal(2, 1001, ACK, 0)),
            ("another ack", changed(&|packet| packet[31] ^= 1)),
            ("another window", changed(&|packet| packet[35] ^= 1)),
            ("another TTL", changed(&|packet| packet[8] = 1)),
            ("another destination", changed(&|packet| packet[19] ^= 1)),
            ("another port", changed(&|packet| packet[23] ^= 1)),
            ("other TCP options", changed(&|packet| packet[51] ^= 1)),
            ("UDP", udp_super_packet(2, &pattern(1000))),
        ];
        for (why, second) in cases {
            let mut batch = TunWriteBatch::new();
            batch.push(&first);
            batch.push(&second);
            assert_eq!(batch.len(), 2, "{why}");
            assert!(
                batch.iter().all(|(hdr, _)| *hdr == VirtioNetHdr::PLAIN),
                "{why}"
            );
            assert_eq!(
                batch.get(0).map(|(_, packet)| packet),
                Some(&first[..]),
                "{why}"
            );
            assert_eq!(
                batch.get(1).map(|(_, packet)| packet),
                Some(&second[..]),
                "{why}"
            );
        }

        // Segments that may be fragmented keep their own IP ids: not joined.
        let without_df = |packet: &Vec<u8>| resealed(packet, &|packet| packet[6] &= !0x40);
        let mut batch = TunWriteBatch::new();
        batch.push(&without_df(&first));
        batch.push(&without_df(&second));
        assert_eq!(batch.len(), 2, "no DF");

        let mut batch = TunWriteBatch::new();
        for packet in burst(1, 1, &[1000, 500])
            .iter()
            .chain(&burst(3, 1501, &[500]))
        {
            batch.push(packet);
        }
        assert_eq!(batch.len(), 2, "a short segment ends the burst");
    }

    #[test]
    fn super_packets_stay_within_the_ipv4_limit() {
        let segments = burst(1, 1, &[1448; 100]);
        let mut batch = TunWriteBatch::new();
        for packet in &segments {
            batch.push(packet);
        }
        assert!(batch.len() >= 3);
        assert!(batch
            .iter()
            .all(|(_, packet)| packet.len() <= usize::from(u16::MAX)));
        assert!(resegment(&batch) == segments);
    }

    #[test]
    fn hostile_packets_pushed_for_coalescing_never_panic_and_always_resegment() {
        let mut rng = Rng(0x00c0_a1e5_ce00_0001);
        let originals = burst(1, 1, &[1000, 1000, 1000, 1000, 1000, 400]);
        let mut batch = TunWriteBatch::new();
        let mut out = Packets::new();
        let mut joined_writes = 0;
        for _ in 0..2_000 {
            batch.clear();
            let mut pushed_bytes = 0;
            for original in &originals {
                let mut packet = original.clone();
                for _ in 0..rng.below(3) {
                    let at = rng.below(packet.len());
                    packet[at] = rng.next() as u8;
                }
                if rng.below(2) == 0 && packet.len() >= 40 && packet[0] == 0x45 {
                    // Valid checksums over hostile headers reach the comparisons.
                    let total_len = (packet.len() as u16).to_be_bytes();
                    packet[2..4].copy_from_slice(&total_len);
                    reseal_tcp(&mut packet);
                }
                if rng.below(8) == 0 {
                    packet.truncate(rng.below(packet.len()));
                }
                pushed_bytes += packet.len();
                batch.push(&packet);
            }
            assert!(batch.len() <= originals.len());
            let written: usize = batch.iter().map(|(_, packet)| packet.len()).sum();
            assert!(
                written <= pushed_bytes,
                "joining only drops repeated headers"
            );
            for (hdr, packet) in batch.iter() {
                if hdr.gso_type == GSO_TCPV4 {
                    joined_writes += 1;
                    out.clear();
                    assert!(segment(hdr, packet, &mut out).is_ok(), "{hdr:?}");
                    assert!(out.iter().all(|wire| {
                        ipv4_checksum_verifies(wire) && transport_checksum_verifies(wire)
                    }));
                }
            }
        }
        assert!(joined_writes > 100, "enough inputs stayed joinable");
    }
}

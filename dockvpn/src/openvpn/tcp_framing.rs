//! OpenVPN over TCP: each packet is preceded by its length, 16 bits big-endian. Sans-IO: the
//! driver feeds whatever chunks the socket returns (and so can a fuzzer).

/// The longest packet a client sends: a control packet (at most 1250 bytes at OpenVPN's
/// default tls-mtu) plus a tls-crypt-v2 client key (at most 1024), or a data packet of a
/// 1500-byte tun MTU. Longer frames only come from something that is not an OpenVPN client.
pub const MAX_TCP_PACKET: usize = 4096;

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    #[error("a frame of length 0 (OpenVPN never sends one)")]
    Empty,
    #[error("a frame of {0} bytes (longest allowed {MAX_TCP_PACKET})")]
    TooLong(usize),
}

/// The length prefix and the packet, as it goes on the stream; None for a packet too long
/// for the 16-bit prefix.
pub fn frame(packet: &[u8]) -> Option<Vec<u8>> {
    let length = u16::try_from(packet.len()).ok()?;
    let mut framed = Vec::with_capacity(2 + packet.len());
    framed.extend_from_slice(&length.to_be_bytes());
    framed.extend_from_slice(packet);
    Some(framed)
}

/// Reassembles packets from a byte stream cut anywhere; holds at most one partial frame.
#[derive(Debug, Default)]
pub struct Deframer {
    partial: Vec<u8>,
}

impl Deframer {
    /// Takes the next bytes of the stream and returns the packets they complete, in order.
    /// After an error the stream is out of step for good: the connection must be closed.
    pub fn feed(&mut self, chunk: &[u8]) -> Result<Vec<Vec<u8>>, FrameError> {
        self.partial.extend_from_slice(chunk);
        let mut packets = Vec::new();
        let mut at = 0;
        let outcome = loop {
            let Some(prefix) = self.partial.get(at..at + 2) else {
                break Ok(());
            };
            let length = usize::from(u16::from_be_bytes([prefix[0], prefix[1]]));
            if length == 0 {
                break Err(FrameError::Empty);
            }
            if length > MAX_TCP_PACKET {
                break Err(FrameError::TooLong(length));
            }
            let Some(packet) = self.partial.get(at + 2..at + 2 + length) else {
                break Ok(());
            };
            packets.push(packet.to_vec());
            at += 2 + length;
        };
        self.partial.drain(..at);
        outcome.map(|()| packets)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stream(packets: &[&[u8]]) -> Vec<u8> {
        packets.iter().flat_map(|p| frame(p).unwrap()).collect()
    }

    #[test]
    fn a_stream_split_at_every_byte_yields_the_same_packets() {
        let first = [0x38u8; 14];
        let second: Vec<u8> = (0..=255).collect();
        let bytes = stream(&[&first, &second, b"x"]);
        for split in 0..=bytes.len() {
            let mut deframer = Deframer::default();
            let mut packets = deframer.feed(&bytes[..split]).unwrap();
            packets.extend(deframer.feed(&bytes[split..]).unwrap());
            assert_eq!(packets, [&first[..], &second[..], b"x"], "split at {split}");
            assert!(deframer.partial.is_empty());
        }
    }

    #[test]
    fn a_stream_fed_one_byte_at_a_time_yields_each_packet_once_complete() {
        let bytes = stream(&[b"abc", b"de"]);
        let mut deframer = Deframer::default();
        let yielded: Vec<usize> = bytes
            .iter()
            .map(|byte| deframer.feed(&[*byte]).unwrap().len())
            .collect();
        assert_eq!(yielded, [0, 0, 0, 0, 1, 0, 0, 0, 1]);
    }

    #[test]
    fn two_packets_in_one_chunk_come_out_in_order() {
        let mut deframer = Deframer::default();
        let packets = deframer.feed(&stream(&[b"one", b"two"])).unwrap();
        assert_eq!(packets, [b"one", b"two"]);
    }

    #[test]
    fn a_zero_length_frame_is_refused() {
        let mut deframer = Deframer::default();
        let mut bytes = stream(&[b"ok"]);
        bytes.extend_from_slice(&[0, 0]);
        assert_eq!(deframer.feed(&bytes), Err(FrameError::Empty));
    }

    #[test]
    fn a_frame_longer_than_any_client_packet_is_refused_before_its_bytes_arrive() {
        let mut deframer = Deframer::default();
        let too_long = (MAX_TCP_PACKET as u16 + 1).to_be_bytes();
        assert_eq!(
            deframer.feed(&too_long),
            Err(FrameError::TooLong(MAX_TCP_PACKET + 1))
        );
        let longest = stream(&[&[7u8; MAX_TCP_PACKET]]);
        assert_eq!(Deframer::default().feed(&longest).unwrap().len(), 1);
    }

    #[test]
    fn frame_prefixes_the_big_endian_length() {
        assert_eq!(frame(&[9; 258]).unwrap()[..3], [1, 2, 9]);
        assert_eq!(frame(&vec![0; 65536]), None);
    }
}

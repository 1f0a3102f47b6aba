//! The OpenVPN wire format without `--tls-auth`/`--tls-crypt`: one byte of opcode and key id,
//! then for control packets the sender's session id, the ACK array and the reliability
//! layer's message id; for DATA_V2 a 24-bit peer id.

use thiserror::Error;

/// OpenVPN caps the ACK array at 8 ids.
pub const MAX_ACKS: usize = 8;
/// The largest control packet we send.
pub const MAX_CONTROL_PACKET: usize = 1250;
/// Room left for payload in a control packet carrying a full ACK array.
pub const MAX_CONTROL_PAYLOAD: usize = MAX_CONTROL_PACKET - (1 + 8 + 1 + 4 * MAX_ACKS + 8 + 4);

pub type SessionId = [u8; 8];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Opcode {
    SoftResetV1,
    ControlV1,
    AckV1,
    DataV1,
    HardResetClientV2,
    HardResetServerV2,
    DataV2,
}

impl Opcode {
    pub fn from_wire(value: u8) -> Option<Opcode> {
        Some(match value {
            3 => Opcode::SoftResetV1,
            4 => Opcode::ControlV1,
            5 => Opcode::AckV1,
            6 => Opcode::DataV1,
            7 => Opcode::HardResetClientV2,
            8 => Opcode::HardResetServerV2,
            9 => Opcode::DataV2,
            _ => return None,
        })
    }

    pub fn wire(self) -> u8 {
        match self {
            Opcode::SoftResetV1 => 3,
            Opcode::ControlV1 => 4,
            Opcode::AckV1 => 5,
            Opcode::DataV1 => 6,
            Opcode::HardResetClientV2 => 7,
            Opcode::HardResetServerV2 => 8,
            Opcode::DataV2 => 9,
        }
    }

    /// Control opcodes other than ACK_V1 carry a message id and go through the reliability layer.
    pub fn is_reliable(self) -> bool {
        matches!(
            self,
            Opcode::SoftResetV1
                | Opcode::ControlV1
                | Opcode::HardResetClientV2
                | Opcode::HardResetServerV2
        )
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum DecodeError {
    #[error("empty datagram")]
    Empty,
    #[error("unknown opcode {0}")]
    UnknownOpcode(u8),
    #[error("truncated {0}")]
    Truncated(&'static str),
    #[error("{0} ACKs in one packet (at most {MAX_ACKS})")]
    TooManyAcks(usize),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ControlPacket<'a> {
    pub opcode: Opcode,
    pub key_id: u8,
    pub session_id: SessionId,
    pub acks: Vec<u32>,
    /// Present when `acks` is not empty: the session the ACKs are for.
    pub acked_session: Option<SessionId>,
    pub message_id: Option<u32>,
    pub payload: &'a [u8],
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Packet<'a> {
    Control(ControlPacket<'a>),
    /// The whole datagram: its first bytes are authenticated as AEAD additional data.
    Data {
        opcode: Opcode,
        key_id: u8,
        peer_id: Option<u32>,
        datagram: &'a [u8],
    },
}

struct Reader<'a> {
    bytes: &'a [u8],
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize, what: &'static str) -> Result<&'a [u8], DecodeError> {
        if self.bytes.len() < n {
            return Err(DecodeError::Truncated(what));
        }
        let (head, rest) = self.bytes.split_at(n);
        self.bytes = rest;
        Ok(head)
    }

    fn u8(&mut self, what: &'static str) -> Result<u8, DecodeError> {
        Ok(self.take(1, what)?[0])
    }

    fn u32(&mut self, what: &'static str) -> Result<u32, DecodeError> {
        let bytes = self.take(4, what)?;
        Ok(u32::from_be_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]))
    }

    fn session_id(&mut self, what: &'static str) -> Result<SessionId, DecodeError> {
        Ok(self.take(8, what)?.try_into().expect("8 bytes"))
    }
}

pub fn decode(datagram: &[u8]) -> Result<Packet<'_>, DecodeError> {
    let first = *datagram.first().ok_or(DecodeError::Empty)?;
    let opcode = Opcode::from_wire(first >> 3).ok_or(DecodeError::UnknownOpcode(first >> 3))?;
    let key_id = first & 0x07;
    match opcode {
        Opcode::DataV1 => Ok(Packet::Data {
            opcode,
            key_id,
            peer_id: None,
            datagram,
        }),
        Opcode::DataV2 => {
            if datagram.len() < 4 {
                return Err(DecodeError::Truncated("peer id"));
            }
            let peer_id = u32::from_be_bytes([0, datagram[1], datagram[2], datagram[3]]);
            Ok(Packet::Data {
                opcode,
                key_id,
                peer_id: Some(peer_id),
                datagram,
            })
        }
        _ => {
            let mut reader = Reader {
                bytes: &datagram[1..],
            };
            let session_id = reader.session_id("session id")?;
            let ack_count = usize::from(reader.u8("ACK count")?);
            if ack_count > MAX_ACKS {
                return Err(DecodeError::TooManyAcks(ack_count));
            }
            let acks = (0..ack_count)
                .map(|_| reader.u32("ACK id"))
                .collect::<Result<Vec<_>, _>>()?;
            let acked_session = if ack_count > 0 {
                Some(reader.session_id("acked session id")?)
            } else {
                None
            };
            let message_id = if opcode.is_reliable() {
                Some(reader.u32("message id")?)
            } else {
                None
            };
            Ok(Packet::Control(ControlPacket {
                opcode,
                key_id,
                session_id,
                acks,
                acked_session,
                message_id,
                payload: reader.bytes,
            }))
        }
    }
}

impl ControlPacket<'_> {
    pub fn encode(&self) -> Vec<u8> {
        let mut out =
            Vec::with_capacity(1 + 8 + 1 + 4 * self.acks.len() + 8 + 4 + self.payload.len());
        out.push(self.opcode.wire() << 3 | (self.key_id & 0x07));
        out.extend_from_slice(&self.session_id);
        out.push(self.acks.len() as u8);
        for ack in &self.acks {
            out.extend_from_slice(&ack.to_be_bytes());
        }
        if !self.acks.is_empty() {
            out.extend_from_slice(&self.acked_session.unwrap_or_default());
        }
        if let Some(id) = self.message_id {
            out.extend_from_slice(&id.to_be_bytes());
        }
        out.extend_from_slice(self.payload);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn control_packet_round_trips() {
        let packet = ControlPacket {
            opcode: Opcode::ControlV1,
            key_id: 0,
            session_id: [1, 2, 3, 4, 5, 6, 7, 8],
            acks: vec![3, 4],
            acked_session: Some([9; 8]),
            message_id: Some(5),
            payload: b"tls bytes",
        };
        let bytes = packet.encode();
        assert_eq!(bytes[0], 4 << 3);
        assert_eq!(decode(&bytes), Ok(Packet::Control(packet)));
    }

    #[test]
    fn ack_packet_has_no_message_id() {
        let packet = ControlPacket {
            opcode: Opcode::AckV1,
            key_id: 0,
            session_id: [1; 8],
            acks: vec![0],
            acked_session: Some([2; 8]),
            message_id: None,
            payload: &[],
        };
        assert_eq!(packet.encode().len(), 1 + 8 + 1 + 4 + 8);
        assert_eq!(decode(&packet.encode()), Ok(Packet::Control(packet)));
    }

    #[test]
    fn every_truncation_is_an_error_not_a_panic() {
        let bytes = ControlPacket {
            opcode: Opcode::ControlV1,
            key_id: 0,
            session_id: [1; 8],
            acks: vec![1, 2],
            acked_session: Some([2; 8]),
            message_id: Some(7),
            payload: &[],
        }
        .encode();
        for len in 0..bytes.len() {
            assert!(decode(&bytes[..len]).is_err(), "length {len}");
        }
        assert_eq!(decode(&[0xff]), Err(DecodeError::UnknownOpcode(31)));
        let mut too_many = vec![4 << 3];
        too_many.extend_from_slice(&[0; 8]);
        too_many.push(9);
        assert_eq!(decode(&too_many), Err(DecodeError::TooManyAcks(9)));
    }

    #[test]
    fn data_v2_carries_the_peer_id() {
        let datagram = [9 << 3 | 1, 0x01, 0x02, 0x03, 0, 0, 0, 1];
        match decode(&datagram) {
            Ok(Packet::Data {
                opcode: Opcode::DataV2,
                key_id: 1,
                peer_id: Some(0x010203),
                ..
            }) => {}
            other => panic!("{other:?}"),
        }
    }
}

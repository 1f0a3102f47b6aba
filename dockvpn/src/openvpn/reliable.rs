//! The control channel's reliability layer: every reliable control packet has a message id;
//! the receiver ACKs each one it accepts (and each duplicate, in case the ACK was lost) and
//! hands them on in order; the sender keeps a window of unacknowledged packets and resends
//! them with exponential backoff.

use std::collections::{BTreeMap, VecDeque};
use std::time::{Duration, Instant};

use super::packet::{ControlPacket, Opcode, SessionId, MAX_ACKS, MAX_CONTROL_PAYLOAD};

/// Unacknowledged packets in flight (OpenVPN's send buffer count).
pub const SEND_WINDOW: usize = 6;
/// How far ahead of the next expected id a packet is still buffered.
pub const RECEIVE_WINDOW: u32 = 12;
/// Bytes of out-of-order messages held for reassembly, per key: room for the 11 a full
/// receive window can hold ahead of a missing one, at the 1250-byte control packets a stock
/// client sends. Past it, a message is dropped unacknowledged and the peer resends it.
pub const REORDER_BUDGET: usize = 16 * 1024;
const FIRST_RESEND_AFTER: Duration = Duration::from_secs(1);
const LONGEST_RESEND_AFTER: Duration = Duration::from_secs(8);

#[derive(Debug)]
struct InFlight {
    id: u32,
    opcode: Opcode,
    payload: Vec<u8>,
    /// None until first sent.
    resend_at: Option<Instant>,
    backoff: Duration,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Received {
    /// New, in the window: buffered for in-order delivery and ACKed.
    Accepted,
    /// Already seen: ACKed again, otherwise ignored.
    Duplicate,
    /// Too far ahead: dropped without an ACK, the peer will resend.
    OutOfWindow,
    /// Out of order past `REORDER_BUDGET`: dropped without an ACK, the peer will resend.
    OverBudget,
}

/// One reliable packet ready to go out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outgoing {
    pub id: u32,
    pub opcode: Opcode,
    pub payload: Vec<u8>,
}

#[derive(Debug, Default)]
pub struct Reliable {
    next_send_id: u32,
    /// Ordered by id; the first SEND_WINDOW entries may be on the wire.
    unacked: VecDeque<InFlight>,
    next_receive_id: u32,
    received: BTreeMap<u32, (Opcode, Vec<u8>)>,
    pending_acks: Vec<u32>,
    /// The transport itself delivers without loss (TCP): a packet goes out once, and the
    /// window only waits for its ACK.
    lossless_transport: bool,
}

impl Reliable {
    /// Both sides' HARD_RESET (message id 0 each way) already sent and acknowledged: a
    /// session created when a client echoed the server's stateless reset.
    pub fn after_reset() -> Reliable {
        Reliable {
            next_send_id: 1,
            next_receive_id: 1,
            ..Reliable::default()
        }
    }

    /// `lossless`: the link loses nothing (TCP), so nothing is ever resent.
    pub fn lossless(self, lossless: bool) -> Reliable {
        Reliable {
            lossless_transport: lossless,
            ..self
        }
    }

    /// Queues a reliable message; it goes out when the send window has room.
    pub fn send(&mut self, opcode: Opcode, payload: Vec<u8>) {
        let id = self.next_send_id;
        self.next_send_id = self.next_send_id.wrapping_add(1);
        self.unacked.push_back(InFlight {
            id,
            opcode,
            payload,
            resend_at: None,
            backoff: FIRST_RESEND_AFTER,
        });
    }

    pub fn acknowledged(&mut self, id: u32) {
        self.unacked.retain(|packet| packet.id != id);
    }

    pub fn receive(&mut self, id: u32, opcode: Opcode, payload: &[u8]) -> Received {
        let ahead = id.wrapping_sub(self.next_receive_id);
        if ahead >= u32::MAX / 2 || self.received.contains_key(&id) {
            self.schedule_ack(id);
            return Received::Duplicate;
        }
        if ahead >= RECEIVE_WINDOW {
            return Received::OutOfWindow;
        }
        if ahead > 0 && self.buffered_bytes() + payload.len() > REORDER_BUDGET {
            return Received::OverBudget;
        }
        self.received.insert(id, (opcode, payload.to_vec()));
        self.schedule_ack(id);
        Received::Accepted
    }

    /// Payload bytes held until the messages before them arrive.
    fn buffered_bytes(&self) -> usize {
        self.received
            .values()
            .map(|(_, payload)| payload.len())
            .sum()
    }

    fn schedule_ack(&mut self, id: u32) {
        if !self.pending_acks.contains(&id) {
            self.pending_acks.push(id);
        }
    }

    /// The next message in order, if it has arrived.
    pub fn deliver(&mut self) -> Option<(Opcode, Vec<u8>)> {
        let message = self.received.remove(&self.next_receive_id)?;
        self.next_receive_id = self.next_receive_id.wrapping_add(1);
        Some(message)
    }

    /// Up to MAX_ACKS ids to ACK now (piggybacked or in an ACK_V1).
    pub fn take_acks(&mut self) -> Vec<u32> {
        let n = self.pending_acks.len().min(MAX_ACKS);
        self.pending_acks.drain(..n).collect()
    }

    pub fn has_pending_acks(&self) -> bool {
        !self.pending_acks.is_empty()
    }

    /// Takes the ACKs and the message of one control packet from the peer; its ACKs count
    /// only when they are for `local`, this side's session. What became of the message, if
    /// it carried one.
    pub fn on_packet(&mut self, packet: &ControlPacket<'_>, local: SessionId) -> Option<Received> {
        if packet.acked_session.is_none_or(|id| id == local) {
            for &id in &packet.acks {
                self.acknowledged(id);
            }
        }
        packet
            .message_id
            .map(|id| self.receive(id, packet.opcode, packet.payload))
    }

    /// Queues TLS ciphertext as CONTROL_V1 messages that each fit one control packet.
    pub fn send_tls(&mut self, ciphertext: &[u8]) {
        for chunk in ciphertext.chunks(MAX_CONTROL_PAYLOAD) {
            self.send(Opcode::ControlV1, chunk.to_vec());
        }
    }

    /// The encoded control packets of key `key_id` due now from session `local` to `remote`:
    /// new or resent reliable packets with ACKs piggybacked, then bare ACK_V1s for any ACKs
    /// left.
    pub fn datagrams(
        &mut self,
        now: Instant,
        key_id: u8,
        local: SessionId,
        remote: SessionId,
    ) -> Vec<Vec<u8>> {
        let encode = |opcode, acks: Vec<u32>, message_id, payload: &[u8]| {
            ControlPacket {
                opcode,
                key_id,
                session_id: local,
                acked_session: (!acks.is_empty()).then_some(remote),
                acks,
                message_id,
                payload,
            }
            .encode()
        };
        let mut out = Vec::new();
        for packet in self.due(now) {
            out.push(encode(
                packet.opcode,
                self.take_acks(),
                Some(packet.id),
                &packet.payload,
            ));
        }
        while self.has_pending_acks() {
            out.push(encode(Opcode::AckV1, self.take_acks(), None, &[]));
        }
        out
    }

    /// Packets in the window that were never sent or whose resend time has come.
    pub fn due(&mut self, now: Instant) -> Vec<Outgoing> {
        let mut due = Vec::new();
        for packet in self.unacked.iter_mut().take(SEND_WINDOW) {
            if let Some(at) = packet.resend_at {
                if self.lossless_transport || at > now {
                    continue;
                }
                packet.backoff = (packet.backoff * 2).min(LONGEST_RESEND_AFTER);
            }
            packet.resend_at = Some(now + packet.backoff);
            due.push(Outgoing {
                id: packet.id,
                opcode: packet.opcode,
                payload: packet.payload.clone(),
            });
        }
        due
    }

    pub fn next_timeout(&self) -> Option<Instant> {
        if self.lossless_transport {
            return None;
        }
        self.unacked
            .iter()
            .take(SEND_WINDOW)
            .filter_map(|packet| packet.resend_at)
            .min()
    }

    /// Nothing unacknowledged.
    pub fn is_idle(&self) -> bool {
        self.unacked.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message(n: u8) -> Vec<u8> {
        vec![n; 3]
    }

    /// Moves every due packet from `from` to `to`, passing each through `wire` (which may drop,
    /// duplicate or reorder), then returns ACKs. Returns what `to` delivered in order.
    fn exchange(
        from: &mut Reliable,
        to: &mut Reliable,
        now: Instant,
        wire: impl Fn(Vec<Outgoing>) -> Vec<Outgoing>,
    ) -> Vec<Vec<u8>> {
        for packet in wire(from.due(now)) {
            to.receive(packet.id, packet.opcode, &packet.payload);
        }
        while to.has_pending_acks() {
            for id in to.take_acks() {
                from.acknowledged(id);
            }
        }
        std::iter::from_fn(|| to.deliver().map(|(_, payload)| payload)).collect()
    }

    #[test]
    fn window_limits_packets_in_flight() {
        let mut sender = Reliable::default();
        for n in 0..10 {
            sender.send(Opcode::ControlV1, message(n));
        }
        let now = Instant::now();
        assert_eq!(sender.due(now).len(), SEND_WINDOW);
        assert!(
            sender.due(now).is_empty(),
            "nothing due before the resend time"
        );
        sender.acknowledged(0);
        let next = sender.due(now);
        assert_eq!(next.len(), 1);
        assert_eq!(next[0].id, SEND_WINDOW as u32);
    }

    #[test]
    fn loss_is_repaired_by_resending_with_backoff() {
        let mut sender = Reliable::default();
        let mut receiver = Reliable::default();
        for n in 0..3 {
            sender.send(Opcode::ControlV1, message(n));
        }
        let start = Instant::now();
        // The wire drops packet 1 the first time.
        let delivered = exchange(&mut sender, &mut receiver, start, |packets| {
            packets.into_iter().filter(|p| p.id != 1).collect()
        });
        assert_eq!(delivered, vec![message(0)], "2 waits for 1");
        assert_eq!(sender.next_timeout(), Some(start + FIRST_RESEND_AFTER));
        assert!(sender.due(start + Duration::from_millis(500)).is_empty());
        let delivered = exchange(
            &mut sender,
            &mut receiver,
            start + FIRST_RESEND_AFTER,
            |p| p,
        );
        assert_eq!(delivered, vec![message(1), message(2)]);
        assert!(sender.is_idle());
    }

    #[test]
    fn backoff_doubles_up_to_the_cap() {
        let mut sender = Reliable::default();
        sender.send(Opcode::ControlV1, message(0));
        let mut now = Instant::now();
        let mut gaps = Vec::new();
        for _ in 0..6 {
            assert_eq!(sender.due(now).len(), 1);
            let next = sender.next_timeout().unwrap();
            gaps.push((next - now).as_secs());
            now = next;
        }
        assert_eq!(gaps, vec![1, 2, 4, 8, 8, 8]);
    }

    #[test]
    fn over_a_lossless_transport_nothing_is_resent() {
        let mut sender = Reliable::default().lossless(true);
        for n in 0..(SEND_WINDOW as u8 + 1) {
            sender.send(Opcode::ControlV1, message(n));
        }
        let start = Instant::now();
        assert_eq!(sender.due(start).len(), SEND_WINDOW);
        assert_eq!(sender.next_timeout(), None, "no resend timer");
        assert!(sender.due(start + LONGEST_RESEND_AFTER * 4).is_empty());
        sender.acknowledged(0);
        let next = sender.due(start + LONGEST_RESEND_AFTER * 4);
        assert_eq!(next.len(), 1, "the window still moves with the ACKs");
        assert_eq!(next[0].id, SEND_WINDOW as u32);
    }

    #[test]
    fn reordering_and_duplicates_deliver_each_message_once_in_order() {
        let mut sender = Reliable::default();
        let mut receiver = Reliable::default();
        for n in 0..5 {
            sender.send(Opcode::ControlV1, message(n));
        }
        let delivered = exchange(&mut sender, &mut receiver, Instant::now(), |mut packets| {
            packets.reverse();
            let copies = packets.clone();
            packets.extend(copies);
            packets
        });
        assert_eq!(delivered, (0..5).map(message).collect::<Vec<_>>());
        // A late duplicate is ACKed again but not delivered again.
        assert_eq!(
            receiver.receive(2, Opcode::ControlV1, &message(2)),
            Received::Duplicate
        );
        assert_eq!(receiver.take_acks(), vec![2]);
        assert_eq!(receiver.deliver(), None);
    }

    #[test]
    fn packets_beyond_the_receive_window_are_dropped_unacked() {
        let mut receiver = Reliable::default();
        assert_eq!(
            receiver.receive(RECEIVE_WINDOW, Opcode::ControlV1, b"x"),
            Received::OutOfWindow
        );
        assert!(!receiver.has_pending_acks());
        assert_eq!(
            receiver.receive(RECEIVE_WINDOW - 1, Opcode::ControlV1, b"x"),
            Received::Accepted
        );
    }

    #[test]
    fn out_of_order_messages_are_held_only_up_to_the_budget() {
        let mut receiver = Reliable::default();
        let big = vec![0u8; REORDER_BUDGET / 2];
        // Message 0 is missing: 1 and 2 wait for it, 3 would exceed the budget.
        assert_eq!(
            receiver.receive(1, Opcode::ControlV1, &big),
            Received::Accepted
        );
        assert_eq!(
            receiver.receive(2, Opcode::ControlV1, &big),
            Received::Accepted
        );
        assert_eq!(
            receiver.receive(3, Opcode::ControlV1, b"x"),
            Received::OverBudget
        );
        // The next expected message is never refused: it is delivered at once.
        assert_eq!(
            receiver.receive(0, Opcode::ControlV1, &big),
            Received::Accepted
        );
        let delivered = std::iter::from_fn(|| receiver.deliver()).count();
        assert_eq!(delivered, 3);
        assert_eq!(
            receiver.receive(3, Opcode::ControlV1, b"x"),
            Received::Accepted
        );
    }

    #[test]
    fn acks_go_out_at_most_eight_at_a_time() {
        let mut receiver = Reliable::default();
        for id in 0..RECEIVE_WINDOW {
            receiver.receive(id, Opcode::ControlV1, b"x");
        }
        assert_eq!(receiver.take_acks().len(), MAX_ACKS);
        assert_eq!(
            receiver.take_acks().len(),
            RECEIVE_WINDOW as usize - MAX_ACKS
        );
    }
}

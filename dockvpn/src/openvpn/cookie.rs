//! The stateless answer to a client's HARD_RESET, a return-routability check. The server's
//! session id for a new client is an HMAC over the client's address and session id under a
//! secret that rotates every `SECRET_LIFETIME`. The server keeps nothing about the reset.
//! It creates a session only when the client's next packet (ACK_V1 or CONTROL_V1) acknowledges
//! the server's reset (message id 0) for that id, which only a client that receives at its
//! address can do. A forged reset costs one HMAC and one reply about its own size: no memory,
//! no TLS work, no resends. A lost reply is repaired by the client resending its reset.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use ring::hmac;
use ring::rand::SystemRandom;

use super::packet::{ControlPacket, Opcode, SessionId};

/// How long one secret issues session ids; an id stays valid for one more lifetime after,
/// so a handshake that straddles a rotation goes through.
pub const SECRET_LIFETIME: Duration = Duration::from_secs(60);

pub struct SessionCookies {
    current: hmac::Key,
    previous: Option<hmac::Key>,
    rotated_at: Instant,
}

impl SessionCookies {
    pub fn new(now: Instant) -> SessionCookies {
        SessionCookies {
            current: fresh_secret(),
            previous: None,
            rotated_at: now,
        }
    }

    /// The server's session id for the client `client` at `from`.
    pub fn issue(&mut self, now: Instant, from: SocketAddr, client: SessionId) -> SessionId {
        self.rotate(now);
        cookie(&self.current, from, client)
    }

    /// Whether `echoed` is an id issued to this client at this address by the current or the
    /// previous secret.
    pub fn verify(
        &mut self,
        now: Instant,
        from: SocketAddr,
        client: SessionId,
        echoed: SessionId,
    ) -> bool {
        self.rotate(now);
        [Some(&self.current), self.previous.as_ref()]
            .into_iter()
            .flatten()
            .any(|secret| same(&cookie(secret, from, client), &echoed))
    }

    fn rotate(&mut self, now: Instant) {
        let elapsed = now.saturating_duration_since(self.rotated_at);
        if elapsed < SECRET_LIFETIME {
            return;
        }
        let replaced = std::mem::replace(&mut self.current, fresh_secret());
        // After two lifetimes without traffic, the previous secret is expired too.
        self.previous = (elapsed < 2 * SECRET_LIFETIME).then_some(replaced);
        self.rotated_at = now;
    }
}

/// The server's HARD_RESET answering `reset`: it acknowledges the client's message 0 and
/// carries the server's session id, nothing else (26 bytes before any wrapping).
pub fn reset_reply(reset: &ControlPacket<'_>, server_session: SessionId) -> Vec<u8> {
    ControlPacket {
        opcode: Opcode::HardResetServerV2,
        key_id: 0,
        session_id: server_session,
        acks: vec![0],
        acked_session: Some(reset.session_id),
        message_id: Some(0),
        payload: &[],
    }
    .encode()
}

/// The server session id a client's first packet after the reset echoes: an ACK_V1 or
/// CONTROL_V1 on key 0 that acknowledges the server's message 0 (a stock 2.6 client repeats
/// that acknowledgement in its next packets, in case the first was lost).
pub fn echoed_session(packet: &ControlPacket<'_>) -> Option<SessionId> {
    let first_after_reset = matches!(packet.opcode, Opcode::AckV1 | Opcode::ControlV1)
        && packet.key_id == 0
        && packet.acks.contains(&0);
    packet.acked_session.filter(|_| first_after_reset)
}

fn fresh_secret() -> hmac::Key {
    // The system RNG failing leaves nothing sensible to do but stop.
    hmac::Key::generate(hmac::HMAC_SHA256, &SystemRandom::new())
        .expect("the system random number generator works")
}

fn cookie(secret: &hmac::Key, from: SocketAddr, client: SessionId) -> SessionId {
    let mut context = hmac::Context::with_key(secret);
    match from {
        SocketAddr::V4(v4) => context.update(&v4.ip().octets()),
        SocketAddr::V6(v6) => context.update(&v6.ip().octets()),
    }
    context.update(&from.port().to_be_bytes());
    context.update(&client);
    let tag = context.sign();
    let mut id = SessionId::default();
    let len = id.len();
    id.copy_from_slice(&tag.as_ref()[..len]);
    id
}

/// Compares without an early exit, so the time taken tells nothing about the right id.
fn same(a: &SessionId, b: &SessionId) -> bool {
    a.iter().zip(b).fold(0u8, |diff, (x, y)| diff | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    const CLIENT: SessionId = [7; 8];

    fn from(port: u16) -> SocketAddr {
        SocketAddr::from(([192, 0, 2, 10], port))
    }

    #[test]
    fn an_id_is_valid_only_for_the_address_and_client_it_was_issued_to() {
        let now = Instant::now();
        let mut cookies = SessionCookies::new(now);
        let id = cookies.issue(now, from(40000), CLIENT);
        assert!(cookies.verify(now, from(40000), CLIENT, id));
        assert!(
            !cookies.verify(now, from(40001), CLIENT, id),
            "another port"
        );
        assert!(
            !cookies.verify(now, from(40000), [8; 8], id),
            "another client"
        );
        let mut flipped = id;
        flipped[7] ^= 1;
        assert!(!cookies.verify(now, from(40000), CLIENT, flipped));
    }

    #[test]
    fn an_id_survives_one_rotation_and_not_two() {
        let start = Instant::now();
        let mut cookies = SessionCookies::new(start);
        let id = cookies.issue(start, from(40000), CLIENT);
        let after_one = start + SECRET_LIFETIME;
        assert!(cookies.verify(after_one, from(40000), CLIENT, id));
        assert_ne!(cookies.issue(after_one, from(40000), CLIENT), id, "rotated");
        assert!(!cookies.verify(after_one + SECRET_LIFETIME, from(40000), CLIENT, id));
        // A long silence expires both secrets at once.
        let id = cookies.issue(after_one, from(40000), CLIENT);
        let much_later = after_one + 3 * SECRET_LIFETIME;
        assert!(!cookies.verify(much_later, from(40000), CLIENT, id));
    }

    #[test]
    fn only_an_ack_of_message_zero_on_key_zero_echoes_an_id() {
        let packet = |opcode, key_id, acks: Vec<u32>| ControlPacket {
            opcode,
            key_id,
            session_id: CLIENT,
            acked_session: (!acks.is_empty()).then_some([9; 8]),
            acks,
            message_id: opcode.is_reliable().then_some(1),
            payload: &[],
        };
        assert_eq!(
            echoed_session(&packet(Opcode::AckV1, 0, vec![0])),
            Some([9; 8])
        );
        assert_eq!(
            echoed_session(&packet(Opcode::ControlV1, 0, vec![1, 0])),
            Some([9; 8])
        );
        assert_eq!(echoed_session(&packet(Opcode::ControlV1, 0, vec![])), None);
        assert_eq!(echoed_session(&packet(Opcode::AckV1, 0, vec![1])), None);
        assert_eq!(echoed_session(&packet(Opcode::AckV1, 1, vec![0])), None);
        assert_eq!(
            echoed_session(&packet(Opcode::SoftResetV1, 0, vec![0])),
            None
        );
    }
}

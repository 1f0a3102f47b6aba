//! tls-crypt: every control packet is authenticated with HMAC-SHA256 and encrypted with
//! AES-256-CTR under a static key the server and its clients share, so a peer without the
//! key — a scanner, a flood — gets nothing from the server and never reaches TLS.
//!
//! Wrapped layout: `[opcode|key id][session id: 8][packet id: 4][time: 4][tag: 32][ciphertext]`.
//! The tag is the HMAC of everything before it plus the plaintext (the rest of the plain
//! control packet: ACKs, message id, payload); its first 16 bytes are the CTR IV. The static
//! key is OpenVPN's 2048-bit "Static key V1": two {cipher[64], hmac[64]} slots; the server
//! sends with the first and receives with the second (the client the other way round), each
//! using the first 32 bytes of a field.

use std::sync::Arc;

use aes::cipher::{KeyIvInit, StreamCipher};
use rand::RngCore;
use ring::hmac;
use thiserror::Error;

use super::data::ReplayWindow;
use super::tls_auth::TlsAuth;

const STATIC_KEY_LEN: usize = 256;
const SLOT: usize = 128;
const FIELD: usize = 64;
/// Opcode/key id and session id: authenticated, not encrypted.
const HEADER_LEN: usize = 1 + 8;
const PACKET_ID_LEN: usize = 4 + 4;
const TAG_LEN: usize = 32;
/// Bytes tls-crypt adds to a control packet.
const OVERHEAD: usize = PACKET_ID_LEN + TAG_LEN;
const PEM_BEGIN: &str = "-----BEGIN OpenVPN Static key V1-----";
const PEM_END: &str = "-----END OpenVPN Static key V1-----";

type Aes256Ctr = ctr::Ctr128BE<aes::Aes256>;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
pub enum UnwrapError {
    #[error("too short for tls-crypt or tls-auth")]
    Truncated,
    #[error("tls-crypt or tls-auth authentication failed (no key, or another key)")]
    Unauthenticated,
}

/// The shared static key, as OpenVPN writes it (`openvpn --genkey tls-crypt`).
#[derive(Clone)]
pub struct StaticKey([u8; STATIC_KEY_LEN]);

impl StaticKey {
    pub const LEN: usize = STATIC_KEY_LEN;

    pub fn from_bytes(bytes: &[u8]) -> Option<StaticKey> {
        bytes.try_into().ok().map(StaticKey)
    }

    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }

    pub fn generate() -> StaticKey {
        let mut key = [0u8; STATIC_KEY_LEN];
        rand::rng().fill_bytes(&mut key);
        StaticKey(key)
    }

    pub fn to_pem(&self) -> String {
        let mut text = format!("{PEM_BEGIN}\n");
        for line in self.0.chunks(16) {
            for byte in line {
                text.push_str(&format!("{byte:02x}"));
            }
            text.push('\n');
        }
        text.push_str(PEM_END);
        text.push('\n');
        text
    }

    pub fn from_pem(text: &str) -> Result<StaticKey, String> {
        let body = text
            .split_once(PEM_BEGIN)
            .and_then(|(_, rest)| rest.split_once(PEM_END))
            .map(|(body, _)| body)
            .ok_or_else(|| format!("no {PEM_BEGIN} … {PEM_END} block"))?;
        let hex: String = body.chars().filter(|c| !c.is_whitespace()).collect();
        if !hex.is_ascii() {
            return Err("the key holds characters that are not hex digits".into());
        }
        if hex.len() != 2 * STATIC_KEY_LEN {
            return Err(format!(
                "the key holds {} hex digits, not {}",
                hex.len(),
                2 * STATIC_KEY_LEN
            ));
        }
        let mut key = [0u8; STATIC_KEY_LEN];
        for (i, byte) in key.iter_mut().enumerate() {
            *byte = u8::from_str_radix(&hex[2 * i..2 * i + 2], 16)
                .map_err(|_| format!("not hex at byte {i}"))?;
        }
        Ok(StaticKey(key))
    }

    fn slot(&self, index: usize) -> DirectionKey {
        let slot = &self.0[index * SLOT..(index + 1) * SLOT];
        let mut cipher = [0u8; 32];
        cipher.copy_from_slice(&slot[..32]);
        DirectionKey {
            cipher,
            hmac: hmac::Key::new(hmac::HMAC_SHA256, &slot[FIELD..FIELD + 32]),
        }
    }
}

struct DirectionKey {
    cipher: [u8; 32],
    hmac: hmac::Key,
}

impl std::fmt::Debug for DirectionKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("DirectionKey { .. }")
    }
}

/// One side's tls-crypt keys; the per-session state (packet ids, replay window) is `WrapState`.
#[derive(Debug)]
pub struct TlsCrypt {
    send: DirectionKey,
    receive: DirectionKey,
}

impl TlsCrypt {
    pub fn server(key: &StaticKey) -> TlsCrypt {
        TlsCrypt {
            send: key.slot(0),
            receive: key.slot(1),
        }
    }

    /// Whether both were made from the same static key.
    pub fn same_key(&self, other: &TlsCrypt) -> bool {
        self.send.cipher == other.send.cipher && self.receive.cipher == other.receive.cipher
    }

    #[cfg(test)]
    pub fn client(key: &StaticKey) -> TlsCrypt {
        TlsCrypt {
            send: key.slot(1),
            receive: key.slot(0),
        }
    }

    /// Wraps an encoded control packet with the next packet id of `state`.
    pub fn wrap(&self, packet: &[u8], state: &mut WrapState, now_unix: u32) -> Vec<u8> {
        let split = HEADER_LEN.min(packet.len());
        let (header, plaintext) = packet.split_at(split);
        let packet_id = state.next_packet_id();
        let mut out = Vec::with_capacity(packet.len() + OVERHEAD);
        out.extend_from_slice(header);
        out.extend_from_slice(&packet_id.to_be_bytes());
        out.extend_from_slice(&now_unix.to_be_bytes());
        let mut context = hmac::Context::with_key(&self.send.hmac);
        context.update(&out);
        context.update(plaintext);
        let tag = context.sign();
        out.extend_from_slice(tag.as_ref());
        let start = out.len();
        out.extend_from_slice(plaintext);
        apply_ctr(&self.send.cipher, tag.as_ref(), &mut out[start..]);
        out
    }

    /// Authenticates and decrypts a wrapped control packet: the plain packet and its
    /// tls-crypt packet id (for the session's replay check).
    pub fn unwrap(&self, datagram: &[u8]) -> Result<(Vec<u8>, u32), UnwrapError> {
        if datagram.len() < HEADER_LEN + OVERHEAD {
            return Err(UnwrapError::Truncated);
        }
        let (authenticated, rest) = datagram.split_at(HEADER_LEN + PACKET_ID_LEN);
        let (tag, ciphertext) = rest.split_at(TAG_LEN);
        let mut plaintext = ciphertext.to_vec();
        apply_ctr(&self.receive.cipher, tag, &mut plaintext);
        let signed = [authenticated, &plaintext].concat();
        hmac::verify(&self.receive.hmac, &signed, tag).map_err(|_| UnwrapError::Unauthenticated)?;
        let packet_id = u32::from_be_bytes([
            authenticated[HEADER_LEN],
            authenticated[HEADER_LEN + 1],
            authenticated[HEADER_LEN + 2],
            authenticated[HEADER_LEN + 3],
        ]);
        let mut packet = authenticated[..HEADER_LEN].to_vec();
        packet.extend_from_slice(&plaintext);
        Ok((packet, packet_id))
    }
}

/// The key a session's control packets are wrapped with.
#[derive(Debug, Clone)]
pub enum ControlKey {
    /// tls-crypt, or a client's own key under tls-crypt-v2.
    Crypt(Arc<TlsCrypt>),
    Auth(Arc<TlsAuth>),
}

impl ControlKey {
    pub fn wrap(&self, packet: &[u8], state: &mut WrapState, now_unix: u32) -> Vec<u8> {
        match self {
            ControlKey::Crypt(key) => key.wrap(packet, state, now_unix),
            ControlKey::Auth(key) => key.wrap(packet, state, now_unix),
        }
    }

    /// The plain packet and its packet id.
    pub fn unwrap(&self, datagram: &[u8]) -> Result<(Vec<u8>, u32), UnwrapError> {
        match self {
            ControlKey::Crypt(key) => key.unwrap(datagram),
            ControlKey::Auth(key) => key.unwrap(datagram),
        }
    }

    pub fn same_key(&self, other: &ControlKey) -> bool {
        match (self, other) {
            (ControlKey::Crypt(a), ControlKey::Crypt(b)) => a.same_key(b),
            (ControlKey::Auth(a), ControlKey::Auth(b)) => a.same_key(b),
            _ => false,
        }
    }
}

/// A session's control-channel key (None: plain control channel) and packet ids: the last
/// one sent, and the window of those received.
#[derive(Debug, Default)]
pub struct WrapState {
    pub key: Option<ControlKey>,
    next_send_id: u32,
    pub received: ReplayWindow,
}

impl WrapState {
    /// A session's state once the server's stateless reset went out, wrapped with the first
    /// packet id of a fresh state: the session's own packets continue after it.
    pub fn after_stateless_reset() -> WrapState {
        WrapState {
            next_send_id: 1,
            ..WrapState::default()
        }
    }
    /// A fresh state that wraps with `key` (None: plain).
    pub fn with_key(key: Option<ControlKey>) -> WrapState {
        WrapState {
            key,
            ..WrapState::default()
        }
    }

    /// Wraps an outgoing control packet with the session's key, if it has one.
    pub fn seal(&mut self, packet: Vec<u8>, now_unix: u32) -> Vec<u8> {
        match self.key.clone() {
            Some(key) => key.wrap(&packet, self, now_unix),
            None => packet,
        }
    }

    /// The packet id for the next packet sent.
    pub fn next_packet_id(&mut self) -> u32 {
        self.next_send_id = self.next_send_id.wrapping_add(1);
        self.next_send_id
    }
}

/// AES-256-CTR keyed by `key`, with the first 16 bytes of `tag` as its IV (tls-crypt and the
/// tls-crypt-v2 key wrap both do this).
pub(super) fn apply_ctr(key: &[u8; 32], tag: &[u8], data: &mut [u8]) {
    let mut iv = [0u8; 16];
    iv.copy_from_slice(&tag[..16]);
    Aes256Ctr::new(key.into(), &iv.into()).apply_keystream(data);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_wrapped_packet_unwraps_on_the_other_side_only() {
        let key = StaticKey::generate();
        let (server, client) = (TlsCrypt::server(&key), TlsCrypt::client(&key));
        let packet = [0x38, 1, 2, 3, 4, 5, 6, 7, 8, 0, 0, 0, 0, 0, 42, 42];
        let mut state = WrapState::default();
        let wrapped = client.wrap(&packet, &mut state, 1_700_000_000);
        assert_eq!(wrapped.len(), packet.len() + OVERHEAD);
        assert_ne!(
            &wrapped[HEADER_LEN + OVERHEAD..],
            &packet[HEADER_LEN..],
            "encrypted"
        );
        assert_eq!(server.unwrap(&wrapped).unwrap(), (packet.to_vec(), 1));
        // A packet the server wrapped does not pass as one from a client (directions differ).
        assert_eq!(
            server.unwrap(&server.wrap(&packet, &mut state, 0)),
            Err(UnwrapError::Unauthenticated)
        );
        for at in 0..wrapped.len() {
            let mut tampered = wrapped.clone();
            tampered[at] ^= 0x80;
            assert!(server.unwrap(&tampered).is_err(), "byte {at} tampered");
        }
        let other = TlsCrypt::server(&StaticKey::generate());
        assert_eq!(other.unwrap(&wrapped), Err(UnwrapError::Unauthenticated));
        assert_eq!(server.unwrap(&wrapped[..20]), Err(UnwrapError::Truncated));
    }

    #[test]
    fn the_key_round_trips_through_openvpns_text_format() {
        let key = StaticKey::generate();
        let pem = key.to_pem();
        assert!(pem.starts_with("-----BEGIN OpenVPN Static key V1-----\n"));
        assert_eq!(pem.lines().count(), 18);
        assert_eq!(StaticKey::from_pem(&pem).unwrap().0, key.0);
        assert!(StaticKey::from_pem(
            "-----BEGIN OpenVPN Static key V1-----\nzz\n-----END OpenVPN Static key V1-----"
        )
        .is_err());
        assert!(StaticKey::from_pem("garbage").is_err());
        // 512 bytes, but a two-byte character where a hex pair would be cut in half.
        let non_ascii = format!("{PEM_BEGIN}\n{}é0\n{PEM_END}\n", "0".repeat(509));
        assert!(
            StaticKey::from_pem(&non_ascii).is_err(),
            "no panic on non-ASCII"
        );
    }
}

//! The data channel: DATA_V2 packets sealed with an AEAD (AES-GCM or ChaCha20-Poly1305, the
//! same layout for all three). Wire layout:
//! `[opcode|key id][peer id: 3][packet id: 4][tag: 16][ciphertext]`; the first 8 bytes are the
//! additional data; the nonce is the packet id followed by 8 bytes of implicit IV taken from
//! the key material's HMAC slot. Keys come from the TLS exporter (tls-ekm) as OpenVPN's
//! `key2`: two `{cipher[64], hmac[64]}` halves; the client sends with the first, the server
//! with the second.

use ring::aead::{
    Aad, LessSafeKey, Nonce, Tag, UnboundKey, AES_128_GCM, AES_256_GCM, CHACHA20_POLY1305,
};
use thiserror::Error;

use super::packet::Opcode;

pub const KEY_MATERIAL_LEN: usize = 256;
pub const EXPORTER_LABEL: &[u8] = b"EXPORTER-OpenVPN-datakeys";
const KEY_SLOT: usize = 64;
const TAG_LEN: usize = 16;
const HEADER_LEN: usize = 4 + 4;
const IMPLICIT_IV_LEN: usize = 8;
/// How far back an out-of-order packet id is still accepted (OpenVPN's default backtrack).
const REPLAY_WINDOW: u32 = 64;

/// The keepalive payload; never written to tun.
pub const PING_MAGIC: [u8; 16] = [
    0x2a, 0x18, 0x7b, 0xf3, 0x64, 0x1e, 0xb4, 0xcb, 0x07, 0xed, 0x2d, 0x0a, 0x98, 0x1f, 0xc7, 0x48,
];
/// Prefix of OCC messages (option-consistency and explicit-exit), followed by a type byte.
pub const OCC_MAGIC: [u8; 16] = [
    0x28, 0x7f, 0x34, 0x6b, 0xd4, 0xef, 0x7a, 0x81, 0x2d, 0x56, 0xb8, 0xd3, 0xaf, 0xc5, 0x45, 0x9c,
];
pub const OCC_REQUEST: u8 = 0;
pub const OCC_REPLY: u8 = 1;
pub const OCC_EXIT: u8 = 6;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cipher {
    Aes256Gcm,
    Aes128Gcm,
    /// For clients without AES instructions (ARM phones and routers).
    Chacha20Poly1305,
}

impl Cipher {
    pub const ALL: [Cipher; 3] = [
        Cipher::Aes256Gcm,
        Cipher::Aes128Gcm,
        Cipher::Chacha20Poly1305,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Cipher::Aes256Gcm => "AES-256-GCM",
            Cipher::Aes128Gcm => "AES-128-GCM",
            Cipher::Chacha20Poly1305 => "CHACHA20-POLY1305",
        }
    }

    pub fn from_name(name: &str) -> Option<Cipher> {
        Cipher::ALL
            .into_iter()
            .find(|c| c.name().eq_ignore_ascii_case(name))
    }

    fn algorithm(self) -> &'static ring::aead::Algorithm {
        match self {
            Cipher::Aes256Gcm => &AES_256_GCM,
            Cipher::Aes128Gcm => &AES_128_GCM,
            Cipher::Chacha20Poly1305 => &CHACHA20_POLY1305,
        }
    }
}

impl std::fmt::Display for Cipher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
pub enum DataError {
    #[error("packet shorter than header and tag")]
    Truncated,
    #[error("authentication failed")]
    Unauthenticated,
    #[error("packet id {0} replayed or too old")]
    Replayed(u32),
    #[error("packet id space exhausted")]
    PacketIdExhausted,
    #[error("no data key with this key id")]
    NoKey,
}

/// Sliding window over received packet ids: the highest seen and a bitmap of the 64 below.
#[derive(Debug, Default)]
pub struct ReplayWindow {
    highest: u32,
    seen: u64,
}

impl ReplayWindow {
    pub fn check(&self, id: u32) -> Result<(), DataError> {
        if id == 0 {
            return Err(DataError::Replayed(id));
        }
        if id > self.highest {
            return Ok(());
        }
        let back = self.highest - id;
        if back >= REPLAY_WINDOW || self.seen & (1 << back) != 0 {
            return Err(DataError::Replayed(id));
        }
        Ok(())
    }

    /// Records `id`; call only after `check` passed and the packet authenticated.
    pub fn commit(&mut self, id: u32) {
        if id > self.highest {
            let shift = id - self.highest;
            self.seen = if shift >= 64 { 0 } else { self.seen << shift };
            self.seen |= 1;
            self.highest = id;
        } else {
            self.seen |= 1 << (self.highest - id);
        }
    }
}

struct Direction {
    key: LessSafeKey,
    implicit_iv: [u8; IMPLICIT_IV_LEN],
}

impl Direction {
    fn new(cipher: Cipher, half: &[u8]) -> Direction {
        let key_len = cipher.algorithm().key_len();
        let key = UnboundKey::new(cipher.algorithm(), &half[..key_len]).expect("key length");
        let mut implicit_iv = [0; IMPLICIT_IV_LEN];
        implicit_iv.copy_from_slice(&half[KEY_SLOT..KEY_SLOT + IMPLICIT_IV_LEN]);
        Direction {
            key: LessSafeKey::new(key),
            implicit_iv,
        }
    }

    fn nonce(&self, packet_id: u32) -> Nonce {
        let mut nonce = [0; 12];
        nonce[..4].copy_from_slice(&packet_id.to_be_bytes());
        nonce[4..].copy_from_slice(&self.implicit_iv);
        Nonce::assume_unique_for_key(nonce)
    }
}

/// One peer's data-channel keys and packet-id state.
pub struct DataChannel {
    pub cipher: Cipher,
    key_id: u8,
    peer_id: u32,
    send: Direction,
    receive: Direction,
    next_packet_id: u32,
    replay: ReplayWindow,
}

impl std::fmt::Debug for DataChannel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DataChannel")
            .field("cipher", &self.cipher)
            .field("peer_id", &self.peer_id)
            .finish_non_exhaustive()
    }
}

impl DataChannel {
    /// `server` picks which half of the key material sends.
    pub fn new(
        cipher: Cipher,
        material: &[u8; KEY_MATERIAL_LEN],
        server: bool,
        key_id: u8,
        peer_id: u32,
    ) -> DataChannel {
        let client_half = &material[..2 * KEY_SLOT];
        let server_half = &material[2 * KEY_SLOT..];
        let (send, receive) = if server {
            (server_half, client_half)
        } else {
            (client_half, server_half)
        };
        DataChannel {
            cipher,
            key_id,
            peer_id,
            send: Direction::new(cipher, send),
            receive: Direction::new(cipher, receive),
            next_packet_id: 1,
            replay: ReplayWindow::default(),
        }
    }

    /// Close to running out of packet ids (OpenVPN renegotiates at this point too): the
    /// key must be replaced before nonces would repeat.
    pub fn needs_new_key(&self) -> bool {
        self.next_packet_id >= 0xff00_0000
    }

    /// Seals the concatenation of `plaintext` (a framing byte and a payload need no copy
    /// into one slice first) as one DATA_V2 datagram in `out`, whose earlier contents go;
    /// the datagram is sealed in place, so a reused `out` costs no allocation.
    pub fn seal_into(&mut self, plaintext: &[&[u8]], out: &mut Vec<u8>) -> Result<(), DataError> {
        let packet_id = self.next_packet_id;
        self.next_packet_id = packet_id
            .checked_add(1)
            .ok_or(DataError::PacketIdExhausted)?;
        out.clear();
        out.push(Opcode::DataV2.wire() << 3 | self.key_id);
        out.extend_from_slice(&self.peer_id.to_be_bytes()[1..]);
        out.extend_from_slice(&packet_id.to_be_bytes());
        out.extend_from_slice(&[0; TAG_LEN]);
        for part in plaintext {
            out.extend_from_slice(part);
        }
        let (header, rest) = out.split_at_mut(HEADER_LEN);
        let (tag_slot, body) = rest.split_at_mut(TAG_LEN);
        let tag = self
            .send
            .key
            .seal_in_place_separate_tag(self.send.nonce(packet_id), Aad::from(&*header), body)
            .map_err(|_| DataError::Unauthenticated)?;
        tag_slot.copy_from_slice(tag.as_ref());
        Ok(())
    }

    /// `seal_into` a new buffer: for a client or a test, not the server's data path.
    pub fn seal(&mut self, plaintext: &[u8]) -> Result<Vec<u8>, DataError> {
        let mut out = Vec::with_capacity(HEADER_LEN + TAG_LEN + plaintext.len());
        self.seal_into(&[plaintext], &mut out)?;
        Ok(out)
    }

    /// Authenticates and decrypts a whole DATA_V2 datagram into `out` (its earlier contents
    /// go; on an error it holds garbage); replays are refused. The ciphertext is copied into
    /// `out` and opened there, the tag checked where it lies in `datagram`.
    pub fn open_into(&mut self, datagram: &[u8], out: &mut Vec<u8>) -> Result<(), DataError> {
        if datagram.len() < HEADER_LEN + TAG_LEN {
            return Err(DataError::Truncated);
        }
        let (header, rest) = datagram.split_at(HEADER_LEN);
        let packet_id = u32::from_be_bytes([header[4], header[5], header[6], header[7]]);
        self.replay.check(packet_id)?;
        let (tag, ciphertext) = rest.split_at(TAG_LEN);
        let tag = Tag::try_from(tag).map_err(|_| DataError::Truncated)?;
        out.clear();
        out.extend_from_slice(ciphertext);
        self.receive
            .key
            .open_in_place_separate_tag(
                self.receive.nonce(packet_id),
                Aad::from(header),
                tag,
                out,
                0..,
            )
            .map_err(|_| DataError::Unauthenticated)?;
        self.replay.commit(packet_id);
        Ok(())
    }

    /// `open_into` a new buffer: for a client or a test, not the server's data path.
    pub fn open(&mut self, datagram: &[u8]) -> Result<Vec<u8>, DataError> {
        let mut out = Vec::with_capacity(datagram.len());
        self.open_into(datagram, &mut out)?;
        Ok(out)
    }
}

/// What a decrypted data payload is.
#[derive(Debug, PartialEq, Eq)]
pub enum Payload<'a> {
    Ping,
    Occ(u8),
    Ip(&'a [u8]),
}

pub fn classify(plaintext: &[u8]) -> Payload<'_> {
    if plaintext == PING_MAGIC {
        Payload::Ping
    } else if plaintext.len() > OCC_MAGIC.len() && plaintext[..OCC_MAGIC.len()] == OCC_MAGIC {
        Payload::Occ(plaintext[OCC_MAGIC.len()])
    } else {
        Payload::Ip(plaintext)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn material() -> [u8; KEY_MATERIAL_LEN] {
        std::array::from_fn(|i| i as u8)
    }

    #[test]
    fn server_and_client_directions_interoperate() {
        for cipher in Cipher::ALL {
            let mut server = DataChannel::new(cipher, &material(), true, 0, 5);
            let mut client = DataChannel::new(cipher, &material(), false, 0, 5);
            let sealed = server.seal(b"to the client").unwrap();
            assert_eq!(sealed[0], 9 << 3);
            assert_eq!(&sealed[1..4], &[0, 0, 5]);
            assert_eq!(&sealed[4..8], &1u32.to_be_bytes());
            assert_eq!(client.open(&sealed).unwrap(), b"to the client");
            let sealed = client.seal(b"to the server").unwrap();
            assert_eq!(server.open(&sealed).unwrap(), b"to the server");
            // Each side refuses its own packets: the directions use different keys.
            let own = server.seal(b"x").unwrap();
            assert_eq!(server.open(&own), Err(DataError::Unauthenticated));
        }
    }

    #[test]
    fn sealing_and_opening_reuse_the_buffer_they_are_given() {
        let mut server = DataChannel::new(Cipher::Aes256Gcm, &material(), true, 0, 5);
        let mut twin = DataChannel::new(Cipher::Aes256Gcm, &material(), true, 0, 5);
        let mut client = DataChannel::new(Cipher::Aes256Gcm, &material(), false, 0, 5);
        let mut reused = Vec::with_capacity(2048);
        reused.extend_from_slice(&[0xee; 300]);
        let address = reused.as_ptr();
        server
            .seal_into(&[b"\xfa", b"payload"], &mut reused)
            .unwrap();
        assert_eq!(
            reused,
            twin.seal(b"\xfapayload").unwrap(),
            "the parts, concatenated"
        );
        let sealed = reused.clone();
        client.open_into(&sealed, &mut reused).unwrap();
        assert_eq!(reused, b"\xfapayload");
        assert_eq!(reused.as_ptr(), address, "no new buffer");
    }

    #[test]
    fn key_and_implicit_iv_come_from_the_documented_slots() {
        // The server sends with cipher key bytes 128.. and implicit IV bytes 192..200.
        let mut server = DataChannel::new(Cipher::Aes128Gcm, &material(), true, 0, 0);
        let sealed = server.seal(b"abc").unwrap();
        let key = UnboundKey::new(&AES_128_GCM, &material()[128..144]).unwrap();
        let mut nonce = [0u8; 12];
        nonce[..4].copy_from_slice(&1u32.to_be_bytes());
        nonce[4..].copy_from_slice(&material()[192..200]);
        let mut buffer = sealed[24..].to_vec();
        buffer.extend_from_slice(&sealed[8..24]);
        let plain = LessSafeKey::new(key)
            .open_in_place(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(&sealed[..8]),
                &mut buffer,
            )
            .unwrap();
        assert_eq!(plain, b"abc");
    }

    #[test]
    fn replays_and_tampering_are_refused() {
        let mut server = DataChannel::new(Cipher::Aes256Gcm, &material(), true, 0, 1);
        let mut client = DataChannel::new(Cipher::Aes256Gcm, &material(), false, 0, 1);
        let first = client.seal(b"one").unwrap();
        let second = client.seal(b"two").unwrap();
        assert_eq!(server.open(&second).unwrap(), b"two");
        assert_eq!(server.open(&first).unwrap(), b"one", "reordering is fine");
        assert_eq!(server.open(&first), Err(DataError::Replayed(1)));
        let mut tampered = client.seal(b"three").unwrap();
        *tampered.last_mut().unwrap() ^= 1;
        assert_eq!(server.open(&tampered), Err(DataError::Unauthenticated));
        // A forged packet must not move the window: the genuine one still opens.
        let mut genuine = tampered.clone();
        *genuine.last_mut().unwrap() ^= 1;
        assert_eq!(server.open(&genuine).unwrap(), b"three");
        assert_eq!(server.open(&first[..20]), Err(DataError::Truncated));
    }

    #[test]
    fn replay_window_slides() {
        let mut window = ReplayWindow::default();
        for id in [1, 5, 3, 70] {
            window.check(id).unwrap();
            window.commit(id);
        }
        assert_eq!(window.check(5), Err(DataError::Replayed(5)), "seen");
        assert_eq!(window.check(6), Err(DataError::Replayed(6)), "too old");
        assert!(window.check(7).is_ok());
        assert!(window.check(71).is_ok());
        assert_eq!(window.check(0), Err(DataError::Replayed(0)));
    }

    #[test]
    fn keepalive_and_occ_are_recognised() {
        assert_eq!(classify(&PING_MAGIC), Payload::Ping);
        let mut exit = OCC_MAGIC.to_vec();
        exit.push(OCC_EXIT);
        assert_eq!(classify(&exit), Payload::Occ(OCC_EXIT));
        assert_eq!(classify(&[0x45, 0]), Payload::Ip(&[0x45, 0]));
    }
}

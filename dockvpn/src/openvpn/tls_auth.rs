//! tls-auth: every control packet carries an HMAC under a static key and a replay-protected
//! packet id, in clear otherwise. Older than tls-crypt and weaker (the TLS handshake is
//! visible), but it is what sites migrating an existing OpenVPN set-up hand out.
//!
//! Wire layout: `[opcode|key id][session id: 8][hmac][packet id: 4][time: 4][rest]`; the HMAC
//! covers `[packet id][time][opcode|key id][session id][rest]`. The key is OpenVPN's static
//! key; with `key-direction 0` on the server (1 on clients) the server signs with the first
//! slot's HMAC field and checks with the second, using as many bytes as the digest is long.
//! The digest is the profile's `auth` (SHA1 unless it says otherwise).

use ring::hmac;

use super::tls_crypt::{StaticKey, UnwrapError, WrapState};

const HEADER_LEN: usize = 1 + 8;
const PACKET_ID_LEN: usize = 4 + 4;
const SLOT: usize = 128;
const FIELD: usize = 64;

/// The `auth` digests a tls-auth profile may name: SHA1 (the default), SHA256, SHA512.
pub const DIGESTS: [hmac::Algorithm; 3] = [
    hmac::HMAC_SHA1_FOR_LEGACY_USE_ONLY,
    hmac::HMAC_SHA256,
    hmac::HMAC_SHA512,
];

#[derive(Debug)]
pub struct TlsAuth {
    send: hmac::Key,
    receive: hmac::Key,
    tag_len: usize,
    /// The HMAC key bytes both ways, to tell keys apart.
    fingerprint: Vec<u8>,
}

impl TlsAuth {
    /// The server's side (`key-direction 0`) with `digest`.
    pub fn server(key: &StaticKey, digest: hmac::Algorithm) -> TlsAuth {
        TlsAuth::with_slots(key, digest, 0, 1)
    }

    #[cfg(test)]
    pub fn client(key: &StaticKey, digest: hmac::Algorithm) -> TlsAuth {
        TlsAuth::with_slots(key, digest, 1, 0)
    }

    fn with_slots(
        key: &StaticKey,
        digest: hmac::Algorithm,
        send: usize,
        receive: usize,
    ) -> TlsAuth {
        let tag_len = digest.digest_algorithm().output_len();
        let field =
            |slot: usize| &key.as_bytes()[slot * SLOT + FIELD..slot * SLOT + FIELD + tag_len];
        TlsAuth {
            send: hmac::Key::new(digest, field(send)),
            receive: hmac::Key::new(digest, field(receive)),
            tag_len,
            fingerprint: [field(send), field(receive)].concat(),
        }
    }

    pub fn same_key(&self, other: &TlsAuth) -> bool {
        self.fingerprint == other.fingerprint
    }

    pub fn wrap(&self, packet: &[u8], state: &mut WrapState, now_unix: u32) -> Vec<u8> {
        let (header, rest) = packet.split_at(HEADER_LEN.min(packet.len()));
        let mut packet_id = state.next_packet_id().to_be_bytes().to_vec();
        packet_id.extend_from_slice(&now_unix.to_be_bytes());
        let mut context = hmac::Context::with_key(&self.send);
        for part in [&packet_id[..], header, rest] {
            context.update(part);
        }
        [header, context.sign().as_ref(), &packet_id, rest].concat()
    }

    /// Checks a packet's HMAC: the plain packet and its packet id (for the replay window).
    pub fn unwrap(&self, datagram: &[u8]) -> Result<(Vec<u8>, u32), UnwrapError> {
        if datagram.len() < HEADER_LEN + self.tag_len + PACKET_ID_LEN {
            return Err(UnwrapError::Truncated);
        }
        let (header, rest) = datagram.split_at(HEADER_LEN);
        let (tag, rest) = rest.split_at(self.tag_len);
        let (packet_id, rest) = rest.split_at(PACKET_ID_LEN);
        let signed = [packet_id, header, rest].concat();
        hmac::verify(&self.receive, &signed, tag).map_err(|_| UnwrapError::Unauthenticated)?;
        let id = u32::from_be_bytes([packet_id[0], packet_id[1], packet_id[2], packet_id[3]]);
        Ok(([header, rest].concat(), id))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_signed_packet_passes_on_the_other_side_only() {
        let key = StaticKey::generate();
        let packet = [0x38, 1, 2, 3, 4, 5, 6, 7, 8, 0, 0, 0, 0, 0, 42];
        for digest in DIGESTS {
            let (server, client) = (TlsAuth::server(&key, digest), TlsAuth::client(&key, digest));
            let mut state = WrapState::default();
            let wrapped = client.wrap(&packet, &mut state, 1_700_000_000);
            let tag_len = digest.digest_algorithm().output_len();
            assert_eq!(wrapped.len(), packet.len() + tag_len + 8);
            assert_eq!(server.unwrap(&wrapped), Ok((packet.to_vec(), 1)));
            assert!(server.unwrap(&server.wrap(&packet, &mut state, 0)).is_err());
            for at in 0..wrapped.len() {
                let mut tampered = wrapped.clone();
                tampered[at] ^= 1;
                assert!(server.unwrap(&tampered).is_err(), "byte {at}");
            }
            assert_eq!(server.unwrap(&wrapped[..12]), Err(UnwrapError::Truncated));
        }
    }
}

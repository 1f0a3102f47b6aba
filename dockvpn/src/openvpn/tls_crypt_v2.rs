//! tls-crypt-v2: each client holds a tls-crypt key of its own (Kc) and the same key wrapped
//! under the server key (WKc), which only the server can open. The client appends WKc to its
//! first packet (P_CONTROL_HARD_RESET_CLIENT_V3); the server unwraps Kc from it and needs no
//! per-client key on disk, and a key that leaks exposes one client, not all of them.
//!
//! Layout, as OpenVPN's doc/tls-crypt-v2.txt describes it:
//! `WKc = T || AES-256-CTR(Ke, IV = T[..16], Kc || metadata) || len`, where
//! `T = HMAC-SHA256(Ka, len || Kc || metadata)` and `len` is WKc's own length (16-bit, big
//! endian). The server key holds Ke and Ka (the first 32 bytes of its cipher and HMAC
//! fields); metadata is a type byte (1: a 64-bit creation timestamp) and its value.

use base64::Engine;
use rand::RngCore;
use ring::hmac;
use thiserror::Error;

use super::tls_crypt::{apply_ctr, StaticKey};

const SERVER_KEY_LEN: usize = 128;
const FIELD: usize = 64;
const TAG_LEN: usize = 32;
const LEN_FIELD: usize = 2;
/// OpenVPN refuses a WKc longer than this.
const MAX_WRAPPED_LEN: usize = 1024;
/// Metadata type for the key's creation time, as `openvpn --genkey tls-crypt-v2-client` writes it.
const METADATA_TIMESTAMP: u8 = 1;
const SERVER_PEM: &str = "OpenVPN tls-crypt-v2 server key";
const CLIENT_PEM: &str = "OpenVPN tls-crypt-v2 client key";

#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
pub enum UnwrapKeyError {
    #[error("no wrapped client key at the end of the packet")]
    Missing,
    #[error("the wrapped client key does not authenticate under the server key")]
    Unauthenticated,
}

/// The server's key-wrapping key (`pki/tls-crypt-v2-server.key`).
pub struct ServerKey {
    encrypt: [u8; 32],
    authenticate: hmac::Key,
    bytes: [u8; SERVER_KEY_LEN],
}

impl std::fmt::Debug for ServerKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ServerKey { .. }")
    }
}

impl ServerKey {
    pub fn generate() -> ServerKey {
        let mut bytes = [0u8; SERVER_KEY_LEN];
        rand::rng().fill_bytes(&mut bytes);
        ServerKey::from_bytes(bytes)
    }

    fn from_bytes(bytes: [u8; SERVER_KEY_LEN]) -> ServerKey {
        let mut encrypt = [0u8; 32];
        encrypt.copy_from_slice(&bytes[..32]);
        ServerKey {
            encrypt,
            authenticate: hmac::Key::new(hmac::HMAC_SHA256, &bytes[FIELD..FIELD + 32]),
            bytes,
        }
    }

    pub fn to_pem(&self) -> String {
        to_pem(SERVER_PEM, &self.bytes)
    }

    pub fn from_pem(text: &str) -> Result<ServerKey, String> {
        let bytes = from_pem(SERVER_PEM, text)?;
        let bytes: [u8; SERVER_KEY_LEN] = bytes.try_into().map_err(|bytes: Vec<u8>| {
            format!("the key holds {} bytes, not {SERVER_KEY_LEN}", bytes.len())
        })?;
        Ok(ServerKey::from_bytes(bytes))
    }

    /// A new client key and its wrapped form, stamped with `created_unix`.
    pub fn issue_client_key(&self, created_unix: u64) -> ClientKey {
        let key = StaticKey::generate();
        let mut metadata = vec![METADATA_TIMESTAMP];
        metadata.extend_from_slice(&created_unix.to_be_bytes());
        let wrapped = self.wrap(&key, &metadata);
        ClientKey { key, wrapped }
    }

    fn wrap(&self, key: &StaticKey, metadata: &[u8]) -> Vec<u8> {
        let plaintext = [key.as_bytes(), metadata].concat();
        let len = (TAG_LEN + plaintext.len() + LEN_FIELD) as u16;
        let mut context = hmac::Context::with_key(&self.authenticate);
        context.update(&len.to_be_bytes());
        context.update(&plaintext);
        let tag = context.sign();
        let mut wrapped = tag.as_ref().to_vec();
        let start = wrapped.len();
        wrapped.extend_from_slice(&plaintext);
        apply_ctr(&self.encrypt, tag.as_ref(), &mut wrapped[start..]);
        wrapped.extend_from_slice(&len.to_be_bytes());
        wrapped
    }

    /// Splits a P_CONTROL_HARD_RESET_CLIENT_V3 or P_CONTROL_WKC_V1 datagram into the
    /// tls-crypt packet in front and the client key unwrapped from WKc at its end.
    pub fn unwrap_client_key<'a>(
        &self,
        datagram: &'a [u8],
    ) -> Result<(&'a [u8], StaticKey), UnwrapKeyError> {
        let len_at = datagram
            .len()
            .checked_sub(LEN_FIELD)
            .ok_or(UnwrapKeyError::Missing)?;
        let len = usize::from(u16::from_be_bytes([datagram[len_at], datagram[len_at + 1]]));
        let minimum = TAG_LEN + StaticKey::LEN + LEN_FIELD;
        if len < minimum || len > MAX_WRAPPED_LEN || len > datagram.len() {
            return Err(UnwrapKeyError::Missing);
        }
        let (packet, wrapped) = datagram.split_at(datagram.len() - len);
        let (tag, rest) = wrapped.split_at(TAG_LEN);
        let mut plaintext = rest[..rest.len() - LEN_FIELD].to_vec();
        apply_ctr(&self.encrypt, tag, &mut plaintext);
        let signed = [&rest[rest.len() - LEN_FIELD..], &plaintext[..]].concat();
        hmac::verify(&self.authenticate, &signed, tag)
            .map_err(|_| UnwrapKeyError::Unauthenticated)?;
        let key = StaticKey::from_bytes(&plaintext[..StaticKey::LEN])
            .ok_or(UnwrapKeyError::Unauthenticated)?;
        Ok((packet, key))
    }
}

/// What a client's profile carries in `<tls-crypt-v2>`: Kc, and Kc wrapped for the server.
pub struct ClientKey {
    key: StaticKey,
    wrapped: Vec<u8>,
}

impl ClientKey {
    pub fn to_pem(&self) -> String {
        to_pem(CLIENT_PEM, &[self.key.as_bytes(), &self.wrapped].concat())
    }

    pub fn from_pem(text: &str) -> Result<ClientKey, String> {
        let bytes = from_pem(CLIENT_PEM, text)?;
        if bytes.len() <= StaticKey::LEN + TAG_LEN + LEN_FIELD {
            return Err(format!("the key holds only {} bytes", bytes.len()));
        }
        let (key, wrapped) = bytes.split_at(StaticKey::LEN);
        Ok(ClientKey {
            key: StaticKey::from_bytes(key).ok_or("the client key is cut short")?,
            wrapped: wrapped.to_vec(),
        })
    }

    #[cfg(test)]
    pub fn key(&self) -> &StaticKey {
        &self.key
    }

    /// WKc: what the client appends to its first packet.
    pub fn wrapped(&self) -> &[u8] {
        &self.wrapped
    }
}

fn to_pem(label: &str, bytes: &[u8]) -> String {
    let encoded = base64::engine::general_purpose::STANDARD.encode(bytes);
    let mut text = format!("-----BEGIN {label}-----\n");
    for line in encoded.as_bytes().chunks(64) {
        text.push_str(&String::from_utf8_lossy(line));
        text.push('\n');
    }
    text.push_str(&format!("-----END {label}-----\n"));
    text
}

fn from_pem(label: &str, text: &str) -> Result<Vec<u8>, String> {
    let (begin, end) = (
        format!("-----BEGIN {label}-----"),
        format!("-----END {label}-----"),
    );
    let body = text
        .split_once(&begin)
        .and_then(|(_, rest)| rest.split_once(&end))
        .map(|(body, _)| body)
        .ok_or_else(|| format!("no {begin} … {end} block"))?;
    let encoded: String = body.chars().filter(|c| !c.is_whitespace()).collect();
    base64::engine::general_purpose::STANDARD
        .decode(encoded)
        .map_err(|error| format!("the key is not valid base64 ({error})"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_wrapped_client_key_unwraps_under_its_server_key_only() {
        let server = ServerKey::generate();
        let client = server.issue_client_key(1_700_000_000);
        // Kc (256) + tag (32) + type and timestamp (9) + len (2).
        assert_eq!(client.wrapped.len(), 32 + 256 + 9 + 2);
        assert_eq!(&client.wrapped[client.wrapped.len() - 2..], &[1, 43]);
        let packet = [0x50, 1, 2, 3];
        let datagram = [&packet[..], &client.wrapped].concat();
        let (front, key) = server.unwrap_client_key(&datagram).expect("unwraps");
        assert_eq!(front, packet);
        assert_eq!(key.as_bytes(), client.key.as_bytes());

        let other = ServerKey::generate();
        assert_eq!(
            other.unwrap_client_key(&datagram).err(),
            Some(UnwrapKeyError::Unauthenticated)
        );
        for at in packet.len()..datagram.len() - 2 {
            let mut tampered = datagram.clone();
            tampered[at] ^= 1;
            assert!(server.unwrap_client_key(&tampered).is_err(), "byte {at}");
        }
        for short in [&[][..], &[0][..], &[1, 43][..], &datagram[..200]] {
            assert_eq!(
                server.unwrap_client_key(short).err(),
                Some(UnwrapKeyError::Missing)
            );
        }
    }

    #[test]
    fn keys_round_trip_through_openvpns_text_format() {
        let server = ServerKey::generate();
        let pem = server.to_pem();
        assert!(pem.starts_with("-----BEGIN OpenVPN tls-crypt-v2 server key-----\n"));
        assert_eq!(ServerKey::from_pem(&pem).unwrap().bytes, server.bytes);
        let client = server.issue_client_key(0);
        let pem = client.to_pem();
        assert!(pem.starts_with("-----BEGIN OpenVPN tls-crypt-v2 client key-----\n"));
        let read = ClientKey::from_pem(&pem).unwrap();
        assert_eq!(read.wrapped, client.wrapped);
        assert_eq!(read.key.as_bytes(), client.key.as_bytes());
        assert!(ServerKey::from_pem(&client.to_pem()).is_err());
        assert!(ServerKey::from_pem(&to_pem(SERVER_PEM, &[1, 2, 3])).is_err());
        assert!(ClientKey::from_pem(&to_pem(CLIENT_PEM, &[0; 260])).is_err());
        assert!(ServerKey::from_pem(&format!(
            "-----BEGIN {SERVER_PEM}-----\n*é*\n-----END {SERVER_PEM}-----\n"
        ))
        .is_err());
    }
}

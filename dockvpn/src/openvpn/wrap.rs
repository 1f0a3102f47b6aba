//! The control channel's outer layer, in one place: plain, tls-crypt (one key all clients
//! share), tls-auth (a shared HMAC key) or tls-crypt-v2 (a key per client, unwrapped from
//! its first packet). The engine
//! sees plain control packets only, and a packet no valid key opens goes no further.

use std::sync::Arc;

use thiserror::Error;

use super::packet::Opcode;
use super::tls_crypt::{ControlKey, TlsCrypt, UnwrapError};
use super::tls_crypt_v2::{ServerKey, UnwrapKeyError};

/// P_CONTROL_HARD_RESET_CLIENT_V3: a HARD_RESET_CLIENT_V2 with the client's WKc appended.
const HARD_RESET_CLIENT_V3: u8 = 10;
/// P_CONTROL_WKC_V1: a CONTROL_V1 with the client's WKc appended.
const CONTROL_WKC_V1: u8 = 11;

#[derive(Debug, Clone)]
pub enum ControlWrap {
    Plain,
    TlsCrypt(ControlKey),
    /// One key per `auth` digest a profile may use.
    TlsAuth(Vec<ControlKey>),
    TlsCryptV2 {
        server_key: Arc<ServerKey>,
        /// The tls-crypt v1 key, still accepted so profiles issued before v2 keep working.
        shared: Option<ControlKey>,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
pub enum OpenError {
    #[error(transparent)]
    Packet(#[from] UnwrapError),
    #[error(transparent)]
    ClientKey(#[from] UnwrapKeyError),
}

/// A control packet that authenticated: the plain packet, its tls-crypt packet id (for the
/// session's replay window) and the key that opened it (the session answers with it).
#[derive(Debug)]
pub struct Unwrapped {
    pub packet: Vec<u8>,
    pub packet_id: u32,
    pub key: ControlKey,
    /// A tls-crypt-v2 first packet (a V3 reset, opened with the client's own key from its
    /// WKc): its digest, which tells a replay of it.
    pub v2_reset_digest: Option<[u8; 32]>,
}

#[derive(Debug)]
pub enum Opened<'a> {
    /// Data packets, unknown opcodes, and every packet without a wrap: the decoder judges
    /// them.
    Plain(&'a [u8]),
    Unwrapped(Unwrapped),
}

impl ControlWrap {
    /// Opens a datagram; `session_key` is the key of the session at its source, if any.
    pub fn open<'a>(
        &self,
        datagram: &'a [u8],
        session_key: Option<&ControlKey>,
    ) -> Result<Opened<'a>, OpenError> {
        let Some(&first) = datagram.first() else {
            return Ok(Opened::Plain(datagram));
        };
        let opcode = first >> 3;
        let is_control = Opcode::from_wire(opcode)
            .is_some_and(|opcode| !matches!(opcode, Opcode::DataV1 | Opcode::DataV2));
        match self {
            ControlWrap::Plain => Ok(Opened::Plain(datagram)),
            ControlWrap::TlsCryptV2 { server_key, .. }
                if opcode == HARD_RESET_CLIENT_V3 || opcode == CONTROL_WKC_V1 =>
            {
                let (packet, client_key) = server_key.unwrap_client_key(datagram)?;
                let key = ControlKey::Crypt(Arc::new(TlsCrypt::server(&client_key)));
                let mut opened = open_with(&key, packet)?;
                // Past the key, V3 is V2 and WKC_V1 is CONTROL_V1: the engine knows those.
                let plain = if opcode == HARD_RESET_CLIENT_V3 {
                    Opcode::HardResetClientV2
                } else {
                    Opcode::ControlV1
                };
                opened.packet[0] = plain.wire() << 3 | (first & 0x07);
                if opcode == HARD_RESET_CLIENT_V3 {
                    let digest = ring::digest::digest(&ring::digest::SHA256, datagram);
                    opened.v2_reset_digest = digest.as_ref().try_into().ok();
                }
                Ok(Opened::Unwrapped(opened))
            }
            // Data for the data channel, and unknown opcodes for the decoder (malformed).
            _ if !is_control => Ok(Opened::Plain(datagram)),
            _ => {
                let mut result = Err(OpenError::Packet(UnwrapError::Unauthenticated));
                for key in session_key.into_iter().chain(self.static_keys()) {
                    result = open_with(key, datagram).map(Opened::Unwrapped);
                    if result.is_ok() {
                        break;
                    }
                }
                result
            }
        }
    }

    /// The keys every client may use.
    fn static_keys(&self) -> &[ControlKey] {
        match self {
            ControlWrap::Plain => &[],
            ControlWrap::TlsCrypt(key) => std::slice::from_ref(key),
            ControlWrap::TlsAuth(keys) => keys,
            ControlWrap::TlsCryptV2 { shared, .. } => shared.as_slice(),
        }
    }
}

fn open_with(key: &ControlKey, datagram: &[u8]) -> Result<Unwrapped, OpenError> {
    let (packet, packet_id) = key.unwrap(datagram)?;
    Ok(Unwrapped {
        packet,
        packet_id,
        key: key.clone(),
        v2_reset_digest: None,
    })
}

#[cfg(test)]
mod tests {
    use super::super::tls_crypt::{StaticKey, WrapState};
    use super::*;

    /// A plain control packet: opcode and key id, session id, no ACKs, message id, payload.
    fn plain(opcode: u8, key_id: u8) -> Vec<u8> {
        let mut packet = vec![opcode << 3 | key_id];
        packet.extend_from_slice(&[7; 8]);
        packet.extend_from_slice(&[0, 0, 0, 0, 1, 0xab]);
        packet
    }

    #[test]
    fn v3_and_wkc_v1_open_as_the_packets_they_extend_under_the_clients_own_key() {
        let server_key = Arc::new(ServerKey::generate());
        let issued = server_key.issue_client_key(0);
        let client = TlsCrypt::client(issued.key());
        let shared = StaticKey::generate();
        let wrap = ControlWrap::TlsCryptV2 {
            server_key,
            shared: Some(ControlKey::Crypt(Arc::new(TlsCrypt::server(&shared)))),
        };
        let mut state = WrapState::default();
        for (sent, opened_as) in [
            (HARD_RESET_CLIENT_V3, Opcode::HardResetClientV2),
            (CONTROL_WKC_V1, Opcode::ControlV1),
        ] {
            let mut datagram = client.wrap(&plain(sent, 2), &mut state, 0);
            datagram.extend_from_slice(issued.wrapped());
            let Ok(Opened::Unwrapped(opened)) = wrap.open(&datagram, None) else {
                panic!("{sent} does not open");
            };
            assert_eq!(opened.packet, plain(opened_as.wire(), 2));
            // Later packets of the session open with the key it got from its WKc.
            let next = client.wrap(&plain(Opcode::ControlV1.wire(), 2), &mut state, 0);
            assert!(wrap.open(&next, Some(&opened.key)).is_ok());
            assert!(
                wrap.open(&next, None).is_err(),
                "no key without the session"
            );
        }
        // The shared v1 key still opens a HARD_RESET; data is left to the data channel.
        let v1 = TlsCrypt::client(&shared).wrap(&plain(7, 0), &mut state, 0);
        assert!(matches!(wrap.open(&v1, None), Ok(Opened::Unwrapped(_))));
        let data = [Opcode::DataV2.wire() << 3, 0, 0, 1, 9, 9];
        assert!(matches!(wrap.open(&data, None), Ok(Opened::Plain(_))));
        let unknown_opcode = [31 << 3, 0, 0, 1, 9, 9];
        assert!(matches!(
            wrap.open(&unknown_opcode, None),
            Ok(Opened::Plain(_))
        ));
        assert!(matches!(
            ControlWrap::Plain.open(&plain(7, 0), None),
            Ok(Opened::Plain(_))
        ));
    }
}

//! The control channel's outer layer, in one place: plain, tls-crypt (one key all clients
//! share) or tls-crypt-v2 (a key per client, unwrapped from its first packet). The engine
//! sees plain control packets only, and a packet no valid key opens goes no further.

use std::sync::Arc;

use thiserror::Error;

use super::packet::Opcode;
use super::tls_crypt::{TlsCrypt, UnwrapError};
use super::tls_crypt_v2::{ServerKey, UnwrapKeyError};

/// P_CONTROL_HARD_RESET_CLIENT_V3: a HARD_RESET_CLIENT_V2 with the client's WKc appended.
const HARD_RESET_CLIENT_V3: u8 = 10;
/// P_CONTROL_WKC_V1: a CONTROL_V1 with the client's WKc appended.
const CONTROL_WKC_V1: u8 = 11;

#[derive(Debug, Clone)]
pub enum ControlWrap {
    Plain,
    TlsCrypt(Arc<TlsCrypt>),
    TlsCryptV2 {
        server_key: Arc<ServerKey>,
        /// The tls-crypt v1 key, still accepted so profiles issued before v2 keep working.
        shared: Option<Arc<TlsCrypt>>,
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
    pub key: Arc<TlsCrypt>,
}

#[derive(Debug)]
pub enum Opened<'a> {
    /// Data packets, and every packet without tls-crypt: the decoder judges them.
    Plain(&'a [u8]),
    Unwrapped(Unwrapped),
}

impl ControlWrap {
    /// Opens a datagram; `session_key` is the key of the session at its source, if any.
    pub fn open<'a>(
        &self,
        datagram: &'a [u8],
        session_key: Option<&Arc<TlsCrypt>>,
    ) -> Result<Opened<'a>, OpenError> {
        let Some(&first) = datagram.first() else {
            return Ok(Opened::Plain(datagram));
        };
        let opcode = first >> 3;
        let is_data = matches!(
            Opcode::from_wire(opcode),
            Some(Opcode::DataV1 | Opcode::DataV2)
        );
        match self {
            ControlWrap::Plain => Ok(Opened::Plain(datagram)),
            _ if is_data => Ok(Opened::Plain(datagram)),
            ControlWrap::TlsCrypt(key) => Ok(Opened::Unwrapped(open_with(key, datagram)?)),
            ControlWrap::TlsCryptV2 { server_key, .. }
                if opcode == HARD_RESET_CLIENT_V3 || opcode == CONTROL_WKC_V1 =>
            {
                let (packet, client_key) = server_key.unwrap_client_key(datagram)?;
                let key = Arc::new(TlsCrypt::server(&client_key));
                let mut opened = open_with(&key, packet)?;
                // Past the key, V3 is V2 and WKC_V1 is CONTROL_V1: the engine knows those.
                let plain = if opcode == HARD_RESET_CLIENT_V3 {
                    Opcode::HardResetClientV2
                } else {
                    Opcode::ControlV1
                };
                opened.packet[0] = plain.wire() << 3 | (first & 0x07);
                Ok(Opened::Unwrapped(opened))
            }
            ControlWrap::TlsCryptV2 { shared, .. } => {
                let mut result = Err(OpenError::Packet(UnwrapError::Unauthenticated));
                for key in session_key.into_iter().chain(shared.as_ref()) {
                    result = open_with(key, datagram).map(Opened::Unwrapped);
                    if result.is_ok() {
                        break;
                    }
                }
                result
            }
        }
    }
}

fn open_with(key: &Arc<TlsCrypt>, datagram: &[u8]) -> Result<Unwrapped, OpenError> {
    let (packet, packet_id) = key.unwrap(datagram)?;
    Ok(Unwrapped {
        packet,
        packet_id,
        key: key.clone(),
    })
}

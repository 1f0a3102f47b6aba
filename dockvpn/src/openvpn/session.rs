//! One client's control channel: the reliability layer, TLS (rustls) over CONTROL_V1, the
//! key-method 2 exchange and the text messages after it. The server (`server.rs`) owns the
//! decisions that need more than one session: addresses, peer ids, the push reply.

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::Instant;

use rand::RngCore;
use rustls::ServerConnection;

use super::data::{DataChannel, KEY_MATERIAL_LEN};
use super::keymethod::{self, ClientKeyMessage, KeyMethodError};
use super::packet::{ControlPacket, Opcode, SessionId};
use super::reliable::Reliable;

/// The options string sent in key-method 2; clients only compare it and warn on differences.
const OPTIONS_STRING: &str =
    "V4,dev-type tun,link-mtu 1521,tun-mtu 1500,proto UDPv4,auth [null-digest],keysize 256,key-method 2,tls-server";

/// More unread control plaintext than this from one client ends the session.
const MAX_PLAINTEXT_BUFFER: usize = 64 * 1024;

/// What the server must do after a control packet.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Requests {
    /// The key-method exchange is done and the client asks for its configuration.
    pub push: bool,
}

pub struct Session {
    pub peer: SocketAddr,
    pub local_id: SessionId,
    pub remote_id: SessionId,
    pub peer_id: u32,
    reliable: Reliable,
    tls: ServerConnection,
    plaintext: Vec<u8>,
    /// The client's key-method 2 message, once received.
    pub client: Option<ClientKeyMessage>,
    /// The certificate's common name, once the handshake is done.
    pub name: Option<String>,
    pub data: Option<DataChannel>,
    pub address: Option<Ipv4Addr>,
    pub created: Instant,
    pub connected_at: Option<Instant>,
    pub last_received: Instant,
    pub last_sent: Instant,
    pub bytes_in: u64,
    pub bytes_out: u64,
    /// Set when the session ends; it is removed once its last packets are out.
    pub closing: Option<String>,
    push_requested: bool,
}

impl Session {
    pub fn new(
        tls_config: Arc<rustls::ServerConfig>,
        peer: SocketAddr,
        local_id: SessionId,
        remote_id: SessionId,
        peer_id: u32,
        now: Instant,
    ) -> Result<Session, rustls::Error> {
        let mut reliable = Reliable::default();
        reliable.send(Opcode::HardResetServerV2, Vec::new());
        Ok(Session {
            peer,
            local_id,
            remote_id,
            peer_id,
            reliable,
            tls: ServerConnection::new(tls_config)?,
            plaintext: Vec::new(),
            client: None,
            name: None,
            data: None,
            address: None,
            created: now,
            connected_at: None,
            last_received: now,
            last_sent: now,
            bytes_in: 0,
            bytes_out: 0,
            closing: None,
            push_requested: false,
        })
    }

    pub fn is_active(&self) -> bool {
        self.data.is_some() && self.closing.is_none()
    }

    pub fn close(&mut self, reason: impl Into<String>) {
        if self.closing.is_none() {
            self.closing = Some(reason.into());
        }
    }

    /// Feeds one control packet already matched to this session.
    pub fn on_control(&mut self, packet: &ControlPacket<'_>, now: Instant) -> Requests {
        self.last_received = now;
        self.reliable.on_packet(packet, self.local_id);
        while let Some((opcode, payload)) = self.reliable.deliver() {
            match opcode {
                Opcode::HardResetClientV2 => {}
                Opcode::ControlV1 => self.read_tls(&payload),
                Opcode::SoftResetV1 => {
                    self.close("the client asked for key renegotiation, which Dockvpn does not support yet; it reconnects")
                }
                other => self.close(format!("unexpected {other:?} on the control channel")),
            }
            if self.closing.is_some() {
                break;
            }
        }
        if self.closing.is_none() {
            self.read_messages();
        }
        self.queue_tls_output();
        let push = self.push_requested;
        self.push_requested = false;
        Requests { push }
    }

    fn read_tls(&mut self, mut ciphertext: &[u8]) {
        while !ciphertext.is_empty() {
            match self.tls.read_tls(&mut ciphertext) {
                Ok(0) => break,
                Ok(_) => {}
                Err(error) => return self.close(format!("TLS input refused: {error}")),
            }
            if let Err(error) = self.tls.process_new_packets() {
                return self.close(format!("TLS: {error}"));
            }
        }
        if self.name.is_none() && !self.tls.is_handshaking() {
            self.name = self
                .tls
                .peer_certificates()
                .and_then(|chain| chain.first())
                .and_then(|cert| common_name(cert.as_ref()));
            if self.name.is_none() {
                self.close("the client certificate has no common name");
            }
        }
        let mut chunk = [0u8; 4096];
        loop {
            match self.tls.reader().read(&mut chunk) {
                Ok(0) => return self.close("the client closed TLS"),
                Ok(n) => {
                    self.plaintext.extend_from_slice(&chunk[..n]);
                    if self.plaintext.len() > MAX_PLAINTEXT_BUFFER {
                        return self.close("too much unread control-channel data");
                    }
                }
                Err(error) if error.kind() == std::io::ErrorKind::WouldBlock => break,
                Err(error) => return self.close(format!("TLS read: {error}")),
            }
        }
    }

    /// Key-method 2 first, then NUL-terminated text messages.
    fn read_messages(&mut self) {
        if self.client.is_none() && !self.plaintext.is_empty() {
            match keymethod::parse_client_message(&self.plaintext) {
                Ok((message, used)) => {
                    self.plaintext.drain(..used);
                    // Clients that say so get their configuration at once, without waiting
                    // for the PUSH_REQUEST they would send a second later.
                    self.push_requested =
                        message.peer_info.proto() & keymethod::IV_PROTO_REQUEST_PUSH != 0;
                    self.client = Some(message);
                    let mut random = [0u8; keymethod::SERVER_RANDOM_LEN];
                    rand::rng().fill_bytes(&mut random);
                    self.send_plaintext(&keymethod::server_message(OPTIONS_STRING, &random));
                }
                Err(KeyMethodError::Incomplete) => return,
                Err(error) => return self.close(format!("key-method message: {error}")),
            }
        }
        if self.client.is_none() {
            return;
        }
        while let Some(end) = self.plaintext.iter().position(|&b| b == 0) {
            let message: Vec<u8> = self.plaintext.drain(..=end).collect();
            let text = String::from_utf8_lossy(&message[..end]);
            match text.split(',').next().unwrap_or_default() {
                "PUSH_REQUEST" => self.push_requested = self.data.is_none(),
                "EXIT" => self.close("the client exited"),
                "" => {}
                other => {
                    tracing::debug!(peer = %self.peer, message = other, "control message ignored")
                }
            }
        }
    }

    /// Sends one control message as one TLS record.
    pub fn send_plaintext(&mut self, message: &[u8]) {
        if let Err(error) = self.tls.writer().write_all(message) {
            self.close(format!("TLS write: {error}"));
        }
        self.queue_tls_output();
    }

    /// A text message, NUL-terminated as OpenVPN expects.
    pub fn send_text(&mut self, text: &str) {
        let mut message = text.as_bytes().to_vec();
        message.push(0);
        self.send_plaintext(&message);
    }

    fn queue_tls_output(&mut self) {
        let mut ciphertext = Vec::new();
        while self.tls.wants_write() {
            if self.tls.write_tls(&mut ciphertext).is_err() {
                break;
            }
        }
        self.reliable.send_tls(&ciphertext);
    }

    pub fn export_key_material(&self) -> Result<[u8; KEY_MATERIAL_LEN], rustls::Error> {
        let mut material = [0u8; KEY_MATERIAL_LEN];
        self.tls
            .export_keying_material(&mut material, super::data::EXPORTER_LABEL, None)?;
        Ok(material)
    }

    /// Encoded control packets due now.
    pub fn control_datagrams(&mut self, now: Instant) -> Vec<Vec<u8>> {
        self.reliable.datagrams(now, self.local_id, self.remote_id)
    }

    pub fn next_control_timeout(&self) -> Option<Instant> {
        self.reliable.next_timeout()
    }
}

/// The subject CN of a DER certificate.
pub fn common_name(der: &[u8]) -> Option<String> {
    let (_, certificate) = x509_parser::parse_x509_certificate(der).ok()?;
    let name = certificate.subject().iter_common_name().next()?;
    name.as_str().ok().map(str::to_owned)
}

//! One client's session: its key slots (each with its own reliability layer, TLS session
//! (rustls) over CONTROL_V1, key-method 2 exchange and data channel), the text messages on
//! the control channel, and renegotiation — a new key slot replacing the current one while
//! the old one lives on as the lame duck for the transition window. The server
//! (`server.rs`) owns the decisions that need more than one session: addresses, peer ids,
//! the push reply.

use std::io::{Read, Write};
use std::net::Ipv4Addr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rand::RngCore;
use rustls::ServerConnection;

use super::compression::{Framing, Unframed};
use super::data::{Cipher, DataChannel, DataError, KEY_MATERIAL_LEN};
use super::keymethod::{self, ClientKeyMessage, ClientKeySource, KeyMethodError};
use super::link::Link;
use super::packet::{ControlPacket, Opcode, SessionId};
use super::reliable::{Received, Reliable};
use super::tls_crypt::WrapState;
use crate::refusal::Refusal;

/// The options string sent in key-method 2 and in OCC replies; clients only compare it and
/// warn on differences.
pub const OPTIONS_STRING: &str =
    "V4,dev-type tun,link-mtu 1521,tun-mtu 1500,proto UDPv4,auth [null-digest],keysize 256,key-method 2,tls-server";

/// More unread control plaintext than this from one client ends the session.
const MAX_PLAINTEXT_BUFFER: usize = 64 * 1024;

/// A TLS handshake from a client that sends more than this is ended: a stock client's whole
/// flight (hello, certificate chain, verify, finished) is a few KiB, and this caps what
/// rustls may hold for a peer it has not authenticated yet.
pub const MAX_HANDSHAKE_INPUT: usize = 32 * 1024;

/// The key id after `key_id`: 1 to 7, then 1 again (0 only ever names a session's first key).
pub fn next_key_id(key_id: u8) -> u8 {
    match (key_id + 1) & 0x07 {
        0 => 1,
        next => next,
    }
}

/// Where a key's data-channel material comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyDerivation {
    /// The TLS exporter (OpenVPN 2.6 and later).
    TlsEkm,
    /// OpenVPN's TLS 1.0 PRF over the key-method 2 randoms (OpenVPN 2.4 and 2.5).
    Prf,
}

/// What the server must do after a control packet.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Requests {
    /// The key-method exchange is done and the client asks for its configuration.
    pub push: bool,
    /// The packet's message was out of order past the reassembly budget and was dropped.
    pub over_budget: bool,
}

/// One key's control state and, once derived, its data channel (OpenVPN's key state).
struct KeySlot {
    key_id: u8,
    reliable: Reliable,
    tls: ServerConnection,
    plaintext: Vec<u8>,
    /// TLS bytes taken while the handshake runs (bounded by `MAX_HANDSHAKE_INPUT`).
    handshake_input: usize,
    /// The client's key-method 2 message has arrived on this key.
    key_exchanged: bool,
    /// Both sides' key-method 2 randoms, for the PRF.
    client_key_source: ClientKeySource,
    server_random: [u8; keymethod::SERVER_RANDOM_LEN],
    /// The certificate's common name and fingerprint, once this key's handshake is done.
    name: Option<String>,
    certificate: Option<Fingerprint>,
    /// The TLS handshake refused the client's certificate (expired, another CA, ...).
    certificate_refused: bool,
    data: Option<DataChannel>,
    /// When the data channel was derived: the renegotiation timer counts from here.
    established: Option<Instant>,
    /// The client holds this key's data keys (it acknowledged our key-method reply, or sent
    /// data with them): only then does the server send with it.
    confirmed: bool,
    started: Instant,
}

impl KeySlot {
    /// A fresh key state over `reliable` (for key 0 past the reset exchange; for later
    /// keys with the server's SOFT_RESET queued).
    fn new(
        tls_config: Arc<rustls::ServerConfig>,
        key_id: u8,
        reliable: Reliable,
        now: Instant,
    ) -> Result<KeySlot, rustls::Error> {
        Ok(KeySlot {
            key_id,
            reliable,
            tls: ServerConnection::new(tls_config)?,
            plaintext: Vec::new(),
            handshake_input: 0,
            key_exchanged: false,
            client_key_source: ClientKeySource::default(),
            server_random: [0; keymethod::SERVER_RANDOM_LEN],
            name: None,
            certificate: None,
            certificate_refused: false,
            data: None,
            established: None,
            confirmed: false,
            started: now,
        })
    }

    /// Takes one control packet for this key: ACKs, then its reliable messages in order;
    /// what became of its message.
    fn on_packet(
        &mut self,
        packet: &ControlPacket<'_>,
        local: SessionId,
    ) -> Result<Option<Received>, String> {
        let received = self.reliable.on_packet(packet, local);
        let reset = if self.key_id == 0 {
            Opcode::HardResetClientV2
        } else {
            Opcode::SoftResetV1
        };
        while let Some((opcode, payload)) = self.reliable.deliver() {
            match opcode {
                Opcode::ControlV1 => self.read_tls(&payload)?,
                opcode if opcode == reset => {}
                other => return Err(format!("unexpected {other:?} on key {}", self.key_id)),
            }
        }
        Ok(received)
    }

    fn read_tls(&mut self, mut ciphertext: &[u8]) -> Result<(), String> {
        if self.tls.is_handshaking() {
            self.handshake_input += ciphertext.len();
            if self.handshake_input > MAX_HANDSHAKE_INPUT {
                return Err(format!(
                    "the client's TLS handshake exceeds {MAX_HANDSHAKE_INPUT} bytes"
                ));
            }
        }
        while !ciphertext.is_empty() {
            match self.tls.read_tls(&mut ciphertext) {
                Ok(0) => break,
                Ok(_) => {}
                Err(error) => return Err(format!("TLS input refused: {error}")),
            }
            if let Err(error) = self.tls.process_new_packets() {
                self.certificate_refused = matches!(error, rustls::Error::InvalidCertificate(_));
                return Err(format!("TLS: {error}"));
            }
        }
        if self.name.is_none() && !self.tls.is_handshaking() {
            let leaf = self.tls.peer_certificates().and_then(|chain| chain.first());
            self.certificate = leaf.map(|cert| fingerprint(cert.as_ref()));
            self.name = leaf.and_then(|cert| common_name(cert.as_ref()));
            if self.name.is_none() {
                return Err("the client certificate has no common name".into());
            }
        }
        let mut chunk = [0u8; 4096];
        loop {
            match self.tls.reader().read(&mut chunk) {
                Ok(0) => return Err("the client closed TLS".into()),
                Ok(n) => {
                    self.plaintext.extend_from_slice(&chunk[..n]);
                    if self.plaintext.len() > MAX_PLAINTEXT_BUFFER {
                        return Err("too much unread control-channel data".into());
                    }
                }
                Err(error) if error.kind() == std::io::ErrorKind::WouldBlock => return Ok(()),
                Err(error) => return Err(format!("TLS read: {error}")),
            }
        }
    }

    fn send_plaintext(&mut self, message: &[u8]) -> Result<(), String> {
        self.tls
            .writer()
            .write_all(message)
            .map_err(|error| format!("TLS write: {error}"))?;
        self.queue_tls_output();
        Ok(())
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

    /// Derives this key's data channel, from its TLS session (`tls-ekm`) or from the
    /// key-method 2 randoms (PRF).
    fn derive_data_channel(
        &mut self,
        keys: DataKeys,
        ids: (SessionId, SessionId),
        peer_id: u32,
        now: Instant,
    ) -> Result<(), String> {
        let (local, remote) = ids;
        let material = match keys.derivation {
            KeyDerivation::TlsEkm => {
                let mut material = [0u8; KEY_MATERIAL_LEN];
                self.tls
                    .export_keying_material(&mut material, super::data::EXPORTER_LABEL, None)
                    .map_err(|error| format!("TLS exporter: {error}"))?;
                material
            }
            KeyDerivation::Prf => super::prf::key_material(
                &self.client_key_source,
                &self.server_random,
                remote,
                local,
            ),
        };
        let cipher = keys.cipher;
        self.data = Some(DataChannel::new(
            cipher,
            &material,
            true,
            self.key_id,
            peer_id,
        ));
        self.established = Some(now);
        Ok(())
    }
}

/// The previous key after a renegotiation: it still opens (and, until the new key is
/// confirmed, seals) data packets until `expires`.
struct LameDuck {
    slot: KeySlot,
    expires: Instant,
}

/// How a session's data keys are made, fixed when it connects.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DataKeys {
    pub cipher: Cipher,
    pub derivation: KeyDerivation,
}

pub struct Session {
    pub link: Link,
    pub local_id: SessionId,
    pub remote_id: SessionId,
    pub peer_id: u32,
    tls_config: Arc<rustls::ServerConfig>,
    /// The newest key: the one being negotiated, or the one in use.
    key: KeySlot,
    lame_duck: Option<LameDuck>,
    /// The client's key-method 2 message on the first key (its peer info).
    pub client: Option<ClientKeyMessage>,
    /// The certificate's common name, once the first handshake is done; every later key
    /// must be negotiated with the same certificate.
    pub name: Option<String>,
    /// The SHA-256 fingerprint of that certificate: only a registered client's current
    /// certificate is admitted.
    pub certificate: Option<Fingerprint>,
    /// Why the client was refused, when it was (counted once the session ends).
    pub refusal: Option<Refusal>,
    pub keys: Option<DataKeys>,
    /// The compression framing the client's profile makes it use (never compressing).
    pub framing: Framing,
    pub address: Option<Ipv4Addr>,
    pub created: Instant,
    pub connected_at: Option<Instant>,
    pub last_received: Instant,
    pub last_sent: Instant,
    pub bytes_in: u64,
    pub bytes_out: u64,
    /// Completed renegotiations.
    pub renegotiations: u64,
    /// Set when the session ends; it is removed once its last packets are out.
    pub closing: Option<String>,
    push_requested: bool,
    /// tls-crypt packet ids, sent and received (unused without tls-crypt).
    pub wrap: WrapState,
}

impl Session {
    pub fn new(
        tls_config: Arc<rustls::ServerConfig>,
        link: Link,
        local_id: SessionId,
        remote_id: SessionId,
        peer_id: u32,
        wrap: WrapState,
        now: Instant,
    ) -> Result<Session, rustls::Error> {
        Ok(Session {
            link,
            local_id,
            remote_id,
            peer_id,
            // The session exists once the client echoed the server's stateless reset.
            key: KeySlot::new(
                tls_config.clone(),
                0,
                Reliable::after_reset().lossless(link.is_reliable()),
                now,
            )?,
            tls_config,
            lame_duck: None,
            client: None,
            name: None,
            certificate: None,
            refusal: None,
            keys: None,
            framing: Framing::None,
            address: None,
            created: now,
            connected_at: None,
            last_received: now,
            last_sent: now,
            bytes_in: 0,
            bytes_out: 0,
            renegotiations: 0,
            closing: None,
            push_requested: false,
            wrap,
        })
    }

    /// Connected (the client has its configuration) and not closing.
    pub fn is_active(&self) -> bool {
        self.connected_at.is_some() && self.closing.is_none()
    }

    pub fn close(&mut self, reason: impl Into<String>) {
        if self.closing.is_none() {
            self.closing = Some(reason.into());
        }
    }

    /// Whether a control packet with this key id belongs to a key of this session.
    pub fn knows_key(&self, key_id: u8) -> bool {
        self.key.key_id == key_id
            || self
                .lame_duck
                .as_ref()
                .is_some_and(|l| l.slot.key_id == key_id)
    }

    /// A SOFT_RESET with this key id starts a renegotiation: it must name the next key, and
    /// the current one must be in use (not itself still being negotiated).
    pub fn accepts_soft_reset(&self, key_id: u8) -> bool {
        self.is_active() && self.key.confirmed && key_id == next_key_id(self.key.key_id)
    }

    /// Starts a renegotiation (either side may ask): a fresh key slot with the next key id
    /// takes over and announces itself with SOFT_RESET; the current key becomes the lame
    /// duck and keeps working for `transition_window`.
    pub fn renegotiate(&mut self, now: Instant, transition_window: Duration) {
        let key_id = next_key_id(self.key.key_id);
        let mut reliable = Reliable::default().lossless(self.link.is_reliable());
        reliable.send(Opcode::SoftResetV1, Vec::new());
        match KeySlot::new(self.tls_config.clone(), key_id, reliable, now) {
            Ok(fresh) => {
                let previous = std::mem::replace(&mut self.key, fresh);
                self.lame_duck = Some(LameDuck {
                    slot: previous,
                    expires: now + transition_window,
                });
            }
            Err(error) => self.close(format!("renegotiation: TLS session: {error}")),
        }
    }

    /// When the current key was established, while it is in use and no renegotiation runs.
    pub fn key_established(&self) -> Option<Instant> {
        self.key.established.filter(|_| self.key.confirmed)
    }

    /// The current key is close to its packet-id limit.
    pub fn key_worn_out(&self) -> bool {
        self.key
            .data
            .as_ref()
            .is_some_and(DataChannel::needs_new_key)
    }

    /// The key the server seals with (the new one once confirmed, else the lame duck) and
    /// when it was established.
    pub fn sending_key(&self) -> (u8, Option<Instant>) {
        match &self.lame_duck {
            Some(lame_duck) if !self.key.confirmed => {
                (lame_duck.slot.key_id, lame_duck.slot.established)
            }
            _ => (self.key.key_id, self.key.established),
        }
    }

    /// When a renegotiation in progress started (its new key has no data channel yet).
    pub fn renegotiating_since(&self) -> Option<Instant> {
        (self.connected_at.is_some() && self.key.data.is_none()).then_some(self.key.started)
    }

    /// When the lame duck key dies.
    pub fn lame_duck_expires(&self) -> Option<Instant> {
        self.lame_duck.as_ref().map(|l| l.expires)
    }

    /// Drops the lame duck key once its transition window is over; a new key that is
    /// derived but not yet confirmed is the only one left to send with then.
    pub fn expire_lame_duck(&mut self, now: Instant) {
        if self.lame_duck.as_ref().is_some_and(|l| now >= l.expires) {
            self.lame_duck = None;
            if self.key.data.is_some() {
                self.confirm_key();
            }
        }
    }

    /// Feeds one control packet for one of this session's keys (`knows_key`).
    pub fn on_control(&mut self, packet: &ControlPacket<'_>, now: Instant) -> Requests {
        self.last_received = now;
        let local = self.local_id;
        let outcome = if self.key.key_id == packet.key_id {
            self.key.on_packet(packet, local)
        } else if let Some(lame_duck) = self.lame_duck.as_mut() {
            // Late ACKs and resends for the previous key.
            lame_duck.slot.on_packet(packet, local)
        } else {
            Ok(None)
        };
        let over_budget = matches!(outcome, Ok(Some(Received::OverBudget)));
        let outcome = outcome.and_then(|_| self.check_identity());
        let outcome = outcome.and_then(|()| self.read_messages(now));
        if let Err(reason) = outcome {
            if self.key.certificate_refused {
                self.refusal = Some(Refusal::BadCertificate);
            }
            self.close(reason);
        }
        self.key.queue_tls_output();
        if self.key.data.is_some() && self.key.reliable.is_idle() {
            // The client acknowledged our key-method reply: it holds the new key.
            self.confirm_key();
        }
        let push = self.push_requested;
        self.push_requested = false;
        Requests { push, over_budget }
    }

    /// The first handshake names the client; a renegotiation may not change who it is.
    fn check_identity(&mut self) -> Result<(), String> {
        match (&self.name, &self.key.name) {
            (None, Some(name)) => {
                self.name = Some(name.clone());
                self.certificate = self.key.certificate;
            }
            (Some(name), Some(renegotiated)) if name != renegotiated => {
                return Err(format!(
                    "renegotiated with the certificate of {renegotiated:?}, not {name:?}"
                ))
            }
            (Some(name), Some(_)) if self.certificate != self.key.certificate => {
                return Err(format!(
                    "renegotiated with another certificate of {name:?} than it connected with"
                ))
            }
            _ => {}
        }
        Ok(())
    }

    /// Key-method 2 first, then NUL-terminated text messages.
    fn read_messages(&mut self, now: Instant) -> Result<(), String> {
        if !self.key.key_exchanged && !self.key.plaintext.is_empty() {
            let (message, used) = match keymethod::parse_client_message(&self.key.plaintext) {
                Ok(parsed) => parsed,
                Err(KeyMethodError::Incomplete) => return Ok(()),
                Err(error) => return Err(format!("key-method message: {error}")),
            };
            self.key.plaintext.drain(..used);
            self.key.key_exchanged = true;
            self.key.client_key_source = message.key_source.clone();
            rand::rng().fill_bytes(&mut self.key.server_random);
            let reply = keymethod::server_message(OPTIONS_STRING, &self.key.server_random);
            self.key.send_plaintext(&reply)?;
            match self.keys {
                // A renegotiation: cipher and derivation stay, and no second PUSH_REPLY is sent.
                Some(keys) => self.key.derive_data_channel(
                    keys,
                    (self.local_id, self.remote_id),
                    self.peer_id,
                    now,
                )?,
                None => {
                    // Clients that say so get their configuration at once, without waiting
                    // for the PUSH_REQUEST they would send a second later.
                    self.push_requested =
                        message.peer_info.proto() & keymethod::IV_PROTO_REQUEST_PUSH != 0;
                    self.client = Some(message);
                }
            }
        }
        if !self.key.key_exchanged {
            return Ok(());
        }
        while let Some(end) = self.key.plaintext.iter().position(|&b| b == 0) {
            let message: Vec<u8> = self.key.plaintext.drain(..=end).collect();
            let text = String::from_utf8_lossy(&message[..end]);
            match text.split(',').next().unwrap_or_default() {
                "PUSH_REQUEST" => self.push_requested = self.keys.is_none(),
                "EXIT" => return Err("the client exited".into()),
                "" => {}
                other => {
                    tracing::debug!(link = %self.link, message = other, "control message ignored")
                }
            }
        }
        Ok(())
    }

    /// The first key's data channel, when the client gets its configuration.
    pub fn start_data_channel(&mut self, keys: DataKeys, now: Instant) -> Result<(), String> {
        let ids = (self.local_id, self.remote_id);
        self.key.derive_data_channel(keys, ids, self.peer_id, now)?;
        // The PUSH_REPLY going out now tells the client the cipher it derives its keys for.
        self.key.confirmed = true;
        self.keys = Some(keys);
        self.connected_at = Some(now);
        self.last_sent = now;
        Ok(())
    }

    /// Seals a data payload (in the client's compression framing) with the newest key the
    /// client holds, into `datagram`.
    pub fn seal(&mut self, payload: &[u8], datagram: &mut Vec<u8>) -> Result<(), DataError> {
        let data = if self.key.confirmed {
            self.key.data.as_mut()
        } else {
            self.lame_duck.as_mut().and_then(|l| l.slot.data.as_mut())
        };
        let framing = self.framing.prefix(payload);
        data.ok_or(DataError::NoKey)?
            .seal_into(&[framing, payload], datagram)
    }

    /// Opens a data packet into `payload` with the key its key id names (the current one or
    /// the lame duck), and takes off the client's compression framing.
    pub fn open(
        &mut self,
        key_id: u8,
        datagram: &[u8],
        payload: &mut Vec<u8>,
    ) -> Result<Unframed, DataError> {
        if self.key.key_id == key_id {
            let data = self.key.data.as_mut().ok_or(DataError::NoKey)?;
            data.open_into(datagram, payload)?;
            // The client sends with the new key: it has derived it.
            self.confirm_key();
        } else {
            match self.lame_duck.as_mut() {
                Some(lame_duck) if lame_duck.slot.key_id == key_id => lame_duck
                    .slot
                    .data
                    .as_mut()
                    .ok_or(DataError::NoKey)?
                    .open_into(datagram, payload)?,
                _ => return Err(DataError::NoKey),
            }
        }
        Ok(self.framing.unframe(payload))
    }

    /// The client holds the renegotiated key: the server sends with it from now on.
    fn confirm_key(&mut self) {
        if !self.key.confirmed {
            self.key.confirmed = true;
            self.renegotiations += 1;
        }
    }

    /// Sends one control message as one TLS record on the current key.
    pub fn send_plaintext(&mut self, message: &[u8]) {
        if let Err(reason) = self.key.send_plaintext(message) {
            self.close(reason);
        }
    }

    /// A text message, NUL-terminated as OpenVPN expects.
    pub fn send_text(&mut self, text: &str) {
        let mut message = text.as_bytes().to_vec();
        message.push(0);
        self.send_plaintext(&message);
    }

    /// Encoded control packets due now, on every key.
    pub fn control_datagrams(&mut self, now: Instant) -> Vec<Vec<u8>> {
        let (local, remote) = (self.local_id, self.remote_id);
        let mut datagrams = Vec::new();
        if let Some(lame_duck) = self.lame_duck.as_mut() {
            let key_id = lame_duck.slot.key_id;
            datagrams.extend(
                lame_duck
                    .slot
                    .reliable
                    .datagrams(now, key_id, local, remote),
            );
        }
        datagrams.extend(
            self.key
                .reliable
                .datagrams(now, self.key.key_id, local, remote),
        );
        datagrams
    }

    pub fn next_control_timeout(&self) -> Option<Instant> {
        let lame_duck = self
            .lame_duck
            .as_ref()
            .and_then(|l| l.slot.reliable.next_timeout());
        [self.key.reliable.next_timeout(), lame_duck]
            .into_iter()
            .flatten()
            .min()
    }
}

/// A certificate's SHA-256 digest (of its DER encoding).
pub type Fingerprint = [u8; 32];

pub fn fingerprint(der: &[u8]) -> Fingerprint {
    let digest = ring::digest::digest(&ring::digest::SHA256, der);
    digest.as_ref().try_into().expect("SHA-256 is 32 bytes")
}

/// The subject CN of a DER certificate.
pub fn common_name(der: &[u8]) -> Option<String> {
    let (_, certificate) = x509_parser::parse_x509_certificate(der).ok()?;
    let name = certificate.subject().iter_common_name().next()?;
    name.as_str().ok().map(str::to_owned)
}

#[cfg(test)]
mod tests {
    use super::next_key_id;

    #[test]
    fn key_ids_count_one_to_seven_and_skip_zero_when_they_wrap() {
        let mut ids = vec![0];
        for _ in 0..9 {
            ids.push(next_key_id(*ids.last().unwrap()));
        }
        assert_eq!(ids, [0, 1, 2, 3, 4, 5, 6, 7, 1, 2]);
    }
}

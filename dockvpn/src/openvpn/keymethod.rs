//! The key-method 2 exchange inside TLS: after the handshake the client sends its key
//! source, options string, username and password (empty unless its profile has
//! `auth-user-pass`) and peer info; the server answers with
//! its own random halves and a non-empty options string. With `tls-ekm` the data-channel
//! keys come from the TLS exporter; otherwise from both sides' key sources (`prf.rs`).

use thiserror::Error;

const KEY_METHOD_2: u8 = 2;
/// pre_master (48) + random1 (32) + random2 (32), client side.
pub const CLIENT_KEY_SOURCE_LEN: usize = 48 + 32 + 32;
/// The server's random1 + random2.
pub const SERVER_RANDOM_LEN: usize = 64;
/// Longest string field we accept (OpenVPN's options limit is 2048 bytes).
const MAX_STRING: usize = 4096;

/// Peer-info IV_PROTO bits.
pub const IV_PROTO_DATA_V2: u32 = 1 << 1;
pub const IV_PROTO_REQUEST_PUSH: u32 = 1 << 2;
pub const IV_PROTO_TLS_KEY_EXPORT: u32 = 1 << 3;
pub const IV_PROTO_CC_EXIT_NOTIFY: u32 = 1 << 7;

#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum KeyMethodError {
    #[error("more bytes needed")]
    Incomplete,
    #[error("key method {0} (only 2 is supported)")]
    UnsupportedKeyMethod(u8),
    #[error("{0} is {1} bytes long (limit {MAX_STRING})")]
    StringTooLong(&'static str, usize),
    #[error("the {0} string is not NUL-terminated UTF-8")]
    BadString(&'static str),
}

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ClientKeyMessage {
    pub key_source: ClientKeySource,
    pub options: String,
    /// From `auth-user-pass`; None when the client sent neither a username nor a password.
    pub credentials: Option<Credentials>,
    pub peer_info: PeerInfo,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Credentials {
    pub username: String,
    pub password: Password,
}

/// Secret: never printed.
#[derive(Clone, PartialEq, Eq)]
pub struct Password(pub String);

impl std::fmt::Debug for Password {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Password(..)")
    }
}

/// The client's key source: pre_master (48), random1 (32), random2 (32).
#[derive(Clone, PartialEq, Eq)]
pub struct ClientKeySource([u8; CLIENT_KEY_SOURCE_LEN]);

impl ClientKeySource {
    #[cfg(test)]
    pub fn from_bytes(bytes: &[u8; CLIENT_KEY_SOURCE_LEN]) -> ClientKeySource {
        ClientKeySource(*bytes)
    }

    pub fn pre_master(&self) -> &[u8] {
        &self.0[..48]
    }

    pub fn random1(&self) -> &[u8] {
        &self.0[48..80]
    }

    pub fn random2(&self) -> &[u8] {
        &self.0[80..]
    }
}

impl Default for ClientKeySource {
    fn default() -> ClientKeySource {
        ClientKeySource([0; CLIENT_KEY_SOURCE_LEN])
    }
}

/// Secret: never printed.
impl std::fmt::Debug for ClientKeySource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ClientKeySource(..)")
    }
}

/// `KEY=value` lines the client sends about itself.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct PeerInfo(pub Vec<(String, String)>);

impl PeerInfo {
    pub fn parse(text: &str) -> PeerInfo {
        PeerInfo(
            text.lines()
                .filter_map(|line| line.split_once('='))
                .map(|(key, value)| (key.to_owned(), value.to_owned()))
                .collect(),
        )
    }

    pub fn get(&self, key: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    pub fn proto(&self) -> u32 {
        self.get("IV_PROTO")
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    }

    /// The data ciphers the client offers (IV_CIPHERS, colon-separated).
    pub fn ciphers(&self) -> Vec<&str> {
        self.get("IV_CIPHERS")
            .map(|v| v.split(':').filter(|c| !c.is_empty()).collect())
            .unwrap_or_default()
    }
}

struct Reader<'a> {
    bytes: &'a [u8],
    used: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], KeyMethodError> {
        let rest = &self.bytes[self.used..];
        if rest.len() < n {
            return Err(KeyMethodError::Incomplete);
        }
        self.used += n;
        Ok(&rest[..n])
    }

    fn at_end(&self) -> bool {
        self.used == self.bytes.len()
    }

    /// A u16 length (NUL included; 0 = absent) and the string.
    fn string(&mut self, field: &'static str) -> Result<String, KeyMethodError> {
        let len = self.take(2)?;
        let len = usize::from(u16::from_be_bytes([len[0], len[1]]));
        if len == 0 {
            return Ok(String::new());
        }
        if len > MAX_STRING {
            return Err(KeyMethodError::StringTooLong(field, len));
        }
        let bytes = self.take(len)?;
        let (last, text) = bytes.split_last().expect("len > 0");
        if *last != 0 {
            return Err(KeyMethodError::BadString(field));
        }
        String::from_utf8(text.to_vec()).map_err(|_| KeyMethodError::BadString(field))
    }
}

/// Parses the client's key-method 2 message from the start of `plaintext`; returns it and how
/// many bytes it took. Fields after the options string may be absent at the end of the input
/// (older clients stop there).
pub fn parse_client_message(plaintext: &[u8]) -> Result<(ClientKeyMessage, usize), KeyMethodError> {
    let mut reader = Reader {
        bytes: plaintext,
        used: 0,
    };
    reader.take(4)?; // a literal zero
    let method = reader.take(1)?[0];
    if method & 0x0f != KEY_METHOD_2 {
        return Err(KeyMethodError::UnsupportedKeyMethod(method));
    }
    let key_source = reader.take(CLIENT_KEY_SOURCE_LEN)?;
    let key_source = ClientKeySource(key_source.try_into().expect("taken to length"));
    let options = reader.string("options")?;
    let mut message = ClientKeyMessage {
        key_source,
        options,
        ..ClientKeyMessage::default()
    };
    if !reader.at_end() {
        let username = reader.string("username")?;
        let password = reader.string("password")?;
        if !username.is_empty() || !password.is_empty() {
            message.credentials = Some(Credentials {
                username,
                password: Password(password),
            });
        }
    }
    if !reader.at_end() {
        message.peer_info = PeerInfo::parse(&reader.string("peer info")?);
    }
    Ok((message, reader.used))
}

/// The server's key-method 2 message.
pub fn server_message(options: &str, random: &[u8; SERVER_RANDOM_LEN]) -> Vec<u8> {
    let mut out = Vec::with_capacity(4 + 1 + SERVER_RANDOM_LEN + options.len() + 8);
    out.extend_from_slice(&[0; 4]);
    out.push(KEY_METHOD_2);
    out.extend_from_slice(random);
    write_string(&mut out, options);
    out.extend_from_slice(&[0, 0]); // no username
    out.extend_from_slice(&[0, 0]); // no password
    out.extend_from_slice(&[0, 0]); // no peer info
    out
}

fn write_string(out: &mut Vec<u8>, text: &str) {
    out.extend_from_slice(&((text.len() + 1) as u16).to_be_bytes());
    out.extend_from_slice(text.as_bytes());
    out.push(0);
}

#[cfg(test)]
pub fn client_message(options: &str, peer_info: &str) -> Vec<u8> {
    client_message_with_credentials(options, None, peer_info)
}

/// A client's message; `credentials` as `auth-user-pass` sends them (username, password).
#[cfg(test)]
pub fn client_message_with_credentials(
    options: &str,
    credentials: Option<(&str, &str)>,
    peer_info: &str,
) -> Vec<u8> {
    let mut out = vec![0, 0, 0, 0, KEY_METHOD_2];
    out.extend_from_slice(&[7; CLIENT_KEY_SOURCE_LEN]);
    write_string(&mut out, options);
    match credentials {
        Some((username, password)) => {
            write_string(&mut out, username);
            write_string(&mut out, password);
        }
        None => out.extend_from_slice(&[0, 0, 0, 0]),
    }
    write_string(&mut out, peer_info);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_a_client_message_and_its_peer_info() {
        let bytes = client_message(
            "V4,dev-type tun,tls-client",
            "IV_VER=2.6.14\nIV_PROTO=990\nIV_CIPHERS=AES-256-GCM:AES-128-GCM:CHACHA20-POLY1305\n",
        );
        let (message, used) = parse_client_message(&bytes).unwrap();
        assert_eq!(used, bytes.len());
        assert_eq!(message.options, "V4,dev-type tun,tls-client");
        assert_eq!(message.credentials, None);
        assert_eq!(message.peer_info.get("IV_VER"), Some("2.6.14"));
        assert_eq!(message.peer_info.proto() & IV_PROTO_TLS_KEY_EXPORT, 8);
        assert_eq!(
            message.peer_info.ciphers(),
            vec!["AES-256-GCM", "AES-128-GCM", "CHACHA20-POLY1305"]
        );
    }

    #[test]
    fn parses_the_username_and_password_of_auth_user_pass() {
        let bytes =
            client_message_with_credentials("V4", Some(("alice", "s3cret pass")), "IV_PROTO=8\n");
        let (message, used) = parse_client_message(&bytes).unwrap();
        assert_eq!(used, bytes.len());
        let credentials = message.credentials.unwrap();
        assert_eq!(credentials.username, "alice");
        assert_eq!(credentials.password, Password("s3cret pass".into()));
        assert!(!format!("{credentials:?}").contains("s3cret"));
        assert_eq!(message.peer_info.proto(), 8);
        let mut unterminated =
            client_message("V4", "")[..4 + 1 + CLIENT_KEY_SOURCE_LEN + 5].to_vec();
        unterminated.extend_from_slice(&[0, 2, b'a', b'b']);
        assert_eq!(
            parse_client_message(&unterminated),
            Err(KeyMethodError::BadString("username"))
        );
    }

    #[test]
    fn truncated_and_hostile_messages_are_errors() {
        let bytes = client_message("V4", "IV_PROTO=8\n");
        for len in 0..4 + 1 + CLIENT_KEY_SOURCE_LEN + 2 + 3 {
            assert!(parse_client_message(&bytes[..len]).is_err(), "length {len}");
        }
        let mut wrong_method = bytes.clone();
        wrong_method[4] = 1;
        assert_eq!(
            parse_client_message(&wrong_method),
            Err(KeyMethodError::UnsupportedKeyMethod(1))
        );
        let mut huge = bytes[..4 + 1 + CLIENT_KEY_SOURCE_LEN].to_vec();
        huge.extend_from_slice(&u16::MAX.to_be_bytes());
        assert!(matches!(
            parse_client_message(&huge),
            Err(KeyMethodError::StringTooLong("options", _))
        ));
        let mut unterminated = bytes[..4 + 1 + CLIENT_KEY_SOURCE_LEN].to_vec();
        unterminated.extend_from_slice(&[0, 2, b'V', b'4']);
        assert_eq!(
            parse_client_message(&unterminated),
            Err(KeyMethodError::BadString("options"))
        );
    }

    #[test]
    fn server_message_layout() {
        let message = server_message("V4,tls-server", &[1; SERVER_RANDOM_LEN]);
        assert_eq!(&message[..5], &[0, 0, 0, 0, 2]);
        let options = &message[5 + SERVER_RANDOM_LEN..];
        assert_eq!(&options[..2], &[0, 14]);
        assert_eq!(&options[2..16], b"V4,tls-server\0");
        assert_eq!(&options[16..], &[0; 6]);
    }
}

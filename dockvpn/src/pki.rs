//! Dockvpn's PKI and client registry, under `<state-dir>/pki`: a CA, the server certificate
//! (EKU serverAuth, so `remote-cert-tls server` passes), one certificate per client (EKU
//! clientAuth), and `clients.json` with each client's fixed VPN address. Keys are written
//! with mode 0600; every change is serialized by a lock and written atomically.
//! WireGuard lives beside it: the server's static key (`wireguard.key`), and per client a key
//! pair (the private half only when generated here) and a preshared key.
//! Each registry entry is bound to its current certificate (serial and SHA-256 fingerprint);
//! certificates replaced or revoked are listed in the registry and in a CRL (`crl.pem`)
//! signed by the CA.

use std::collections::{BTreeMap, HashSet};
use std::fs::{self, File};
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::SystemTime;

use crate::openvpn::server::{ClientRegistry, RegisteredClient};
use crate::openvpn::session::{fingerprint, Fingerprint};
use crate::password::Auth;
use crate::wireguard::PeerConfig;
use base64::Engine;
use boringtun::x25519::{PublicKey, StaticSecret};
use ipnet::Ipv4Net;
use nix::fcntl::{Flock, FlockArg};
use rand::RngCore;
use rcgen::{
    BasicConstraints, CertificateParams, CertificateRevocationListParams, DistinguishedName,
    DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyIdMethod, KeyPair, KeyUsagePurpose,
    RevokedCertParams, SerialNumber,
};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use serde::{Deserialize, Serialize};
use vnf_core::clock::unix_now;
use vnf_core::{Error, Result};

use crate::openvpn::link::Proto;
use crate::openvpn::tls_crypt::StaticKey;
use crate::openvpn::tls_crypt_v2::{ClientKey, ServerKey};

const CA_NAME: &str = "Dockvpn CA";
/// The shared tls-crypt key, in OpenVPN's static key format.
const TLS_CRYPT_KEY: &str = "tls-crypt.key";
/// A site's tls-auth key, imported (OpenVPN's static key format).
const TLS_AUTH_KEY: &str = "tls-auth.key";
/// The tls-crypt-v2 server key, which wraps each client's own key.
const TLS_CRYPT_V2_SERVER_KEY: &str = "tls-crypt-v2-server.key";
/// A client's tls-crypt-v2 key (its key and the wrapped copy), under `clients/`.
const TLS_CRYPT_V2_CLIENT_KEY: &str = "tls-crypt-v2";
/// The WireGuard server's static private key, base64 as `wg genkey` prints it.
const WIREGUARD_SERVER_KEY: &str = "wireguard.key";
/// A client's WireGuard private key under `clients/` (absent when the client keeps its own).
const WIREGUARD_CLIENT_KEY: &str = "wg.key";
/// A client's WireGuard preshared key under `clients/`.
const WIREGUARD_PRESHARED_KEY: &str = "wg.psk";
pub const SERVER_NAME: &str = "dockvpn-server";
/// The certificate revocation list, PEM.
const CRL: &str = "crl.pem";
/// Client name → Argon2id hash of its password (`client passwd`), mode 0600.
const PASSWORDS: &str = "passwords.json";
const CA_YEARS: i64 = 10;
const LEAF_YEARS: i64 = 5;
/// A client certificate's validity unless `client add --days` says otherwise.
pub const CLIENT_DAYS: u32 = 365 * LEAF_YEARS as u32;
/// How long a CRL is valid for the tools that read it; each revocation issues a new one.
const CRL_DAYS: i64 = 365;

fn fail(message: impl Into<String>) -> Error {
    Error::Vnf(message.into())
}

fn io(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> Error {
    let context = context.into();
    move |source| Error::Io { context, source }
}

fn cert_error(what: &str) -> impl FnOnce(rcgen::Error) -> Error + '_ {
    move |error| fail(format!("{what}: {error}"))
}

/// How the control channel is wrapped; profiles carry the matching key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum TlsCryptMode {
    /// A key per client (`<tls-crypt-v2>`); the v1 key, where one exists, still works
    V2,
    /// One key every client shares (`<tls-crypt>`); `true` before v2 existed
    #[value(alias = "true")]
    V1,
    /// An HMAC on each control packet with a site's existing key (`<tls-auth>`, imported
    /// with `pki import-tls-auth`), for sites migrating their profiles
    #[serde(rename = "tls-auth")]
    TlsAuth,
    /// Plain control channel: every peer reaches TLS
    #[value(alias = "false")]
    Off,
}

impl std::fmt::Display for TlsCryptMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            TlsCryptMode::V2 => "v2",
            TlsCryptMode::V1 => "v1",
            TlsCryptMode::TlsAuth => "tls-auth",
            TlsCryptMode::Off => "off",
        })
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ClientRecord {
    pub name: String,
    pub address: Ipv4Addr,
    /// Seconds since the Unix epoch.
    pub created: u64,
    /// Absent for clients added before WireGuard (they get one when `client config --format
    /// wireguard` first runs).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub wireguard: Option<WireguardIdentity>,
    /// The one certificate that connects as this client (absent for clients added before
    /// certificates were bound: the certificate in its file is the current one).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub certificate: Option<CertificateBinding>,
    /// When `client revoke` cut it off (seconds since the Unix epoch): it keeps its name and
    /// address, and connects again only after `client renew`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revoked: Option<u64>,
    /// The only networks this client may reach (`--allow`); None: all pushed networks.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub allow: Option<Vec<Ipv4Net>>,
}

/// A certificate as the registry knows it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct CertificateBinding {
    /// The serial number, hex.
    pub serial: String,
    /// SHA-256 of the DER certificate, hex.
    pub sha256: String,
    /// The end of its validity (seconds since the Unix epoch).
    pub not_after: i64,
}

/// A certificate that no longer connects.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct RevokedCertificate {
    /// The client it was issued to.
    pub name: String,
    #[serde(flatten)]
    pub certificate: CertificateBinding,
    /// Seconds since the Unix epoch.
    pub revoked: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct WireguardIdentity {
    /// base64, as `wg pubkey` prints it
    pub public_key: String,
    /// The AllowedIPs of the last wg-quick profile printed for this client (None: none
    /// printed yet).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub profile_allowed_ips: Option<Vec<Ipv4Net>>,
}

/// The keys a client's wg-quick profile carries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WireguardProfileKeys {
    pub address: Ipv4Addr,
    /// base64; None when the client brought its own key pair (`--wireguard-public-key`).
    pub private_key: Option<String>,
    /// The client's public key, base64.
    pub public_key: String,
    pub preshared_key: String,
    pub server_public_key: String,
}

#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Registry {
    clients: BTreeMap<String, ClientRecord>,
    /// Every certificate revoked so far (the CRL lists them).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    revoked: Vec<RevokedCertificate>,
}

pub struct Pki {
    dir: PathBuf,
}

impl Pki {
    pub fn new(state_dir: &Path) -> Pki {
        Pki {
            dir: state_dir.join("pki"),
        }
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    pub fn client_path(&self, name: &str, extension: &str) -> PathBuf {
        self.dir.join("clients").join(format!("{name}.{extension}"))
    }

    fn exists(&self) -> bool {
        self.path("ca.crt").exists() && self.path("server.crt").exists()
    }

    /// Holds the PKI lock until dropped.
    fn lock(&self) -> Result<Flock<File>> {
        fs::create_dir_all(self.dir.join("clients")).map_err(io(format!(
            "create {} (is --state-dir writable?)",
            self.dir.display()
        )))?;
        let file = File::create(self.path(".lock")).map_err(io("create the PKI lock file"))?;
        Flock::lock(file, FlockArg::LockExclusive)
            .map_err(|(_, errno)| fail(format!("lock the PKI: {errno}")))
    }

    /// Creates the CA and server certificate. Refuses to replace an existing PKI unless
    /// `force` (which makes every issued profile useless).
    pub fn init(&self, force: bool) -> Result<()> {
        let _lock = self.lock()?;
        if self.exists() && !force {
            return Err(fail(format!(
                "a PKI already exists in {}; pass --force to replace it (every client profile issued so far stops working)",
                self.dir.display()
            )));
        }
        let ca_key = KeyPair::generate().map_err(cert_error("generate the CA key"))?;
        let mut ca = leaf_params(CA_NAME, time::Duration::days(365 * CA_YEARS))?;
        ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let ca_cert = ca.self_signed(&ca_key).map_err(cert_error("sign the CA"))?;
        let issuer = Issuer::new(ca, ca_key);

        let server_key = KeyPair::generate().map_err(cert_error("generate the server key"))?;
        let mut server = leaf_params(SERVER_NAME, time::Duration::days(365 * LEAF_YEARS))?;
        // OpenVPN ignores names; a SAN lets generic TLS clients (and our tests) verify too.
        server.subject_alt_names = vec![rcgen::SanType::DnsName(
            SERVER_NAME.try_into().map_err(cert_error("server name"))?,
        )];
        server.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        let server_cert = server
            .signed_by(&server_key, &issuer)
            .map_err(cert_error("sign the server certificate"))?;

        write_private(&self.path("ca.key"), &issuer.key().serialize_pem())?;
        write_public(&self.path("ca.crt"), &ca_cert.pem())?;
        write_private(&self.path("server.key"), &server_key.serialize_pem())?;
        write_public(&self.path("server.crt"), &server_cert.pem())?;
        write_private(
            &self.path(TLS_CRYPT_V2_SERVER_KEY),
            &ServerKey::generate().to_pem(),
        )?;
        // A new server identity for WireGuard too: every profile is issued again anyway.
        write_private(
            &self.path(WIREGUARD_SERVER_KEY),
            &key_file_text(&new_wireguard_secret()),
        )?;
        let _ = fs::remove_file(self.path(TLS_CRYPT_KEY));
        self.write_crl(&self.load_registry()?)
    }

    /// The server's static private key: `wireguard.key` (base64 like `wg genkey`, mode
    /// 0600), created when missing.
    pub fn wireguard_server_secret(&self) -> Result<[u8; 32]> {
        self.server_side_key(
            WIREGUARD_SERVER_KEY,
            || key_file_text(&new_wireguard_secret()),
            decode_key,
            "a WireGuard private key",
        )
    }

    /// The server's public key, base64.
    pub fn wireguard_public_key(&self) -> Result<String> {
        Ok(wireguard_public_key_of(self.wireguard_server_secret()?))
    }

    /// Every registry client with a WireGuard identity, with its preshared key.
    /// A client whose key files are broken is left out (and logged): it cannot connect, and
    /// the others, and their removal, are unaffected.
    pub fn wireguard_peers(&self) -> Result<Vec<PeerConfig>> {
        // Under the lock, a client being added or removed is seen whole or not at all.
        let _lock = self.lock()?;
        let mut peers = Vec::new();
        for client in self.load_registry()?.clients.into_values() {
            let (Some(identity), None) = (&client.wireguard, &client.revoked) else {
                continue;
            };
            match self.wireguard_peer(&client, identity) {
                Ok(peer) => peers.push(peer),
                Err(error) => {
                    tracing::warn!(client = %client.name, %error, "WireGuard client left out")
                }
            }
        }
        Ok(peers)
    }

    fn wireguard_peer(
        &self,
        client: &ClientRecord,
        identity: &WireguardIdentity,
    ) -> Result<PeerConfig> {
        let public_key = decode_key(&identity.public_key).map_err(|error| {
            fail(format!(
                "{}: the WireGuard public key {:?} of client {:?} is invalid ({error}); remove the client and add it again",
                self.path("clients.json").display(),
                identity.public_key,
                client.name
            ))
        })?;
        Ok(PeerConfig {
            preshared_key: self.client_key(
                &client.name,
                WIREGUARD_PRESHARED_KEY,
                "a WireGuard preshared key",
            )?,
            name: client.name.clone(),
            address: client.address,
            public_key,
        })
    }

    /// A key file of `name`'s; `what` names it in errors.
    fn client_key(&self, name: &str, extension: &str, what: &str) -> Result<[u8; 32]> {
        let path = self.client_path(name, extension);
        let text = fs::read_to_string(&path).map_err(io(format!("read {}", path.display())))?;
        decode_key(&text).map_err(|error| {
            fail(format!(
                "{} is not {what} ({error}); remove the client and add it again, then hand out its new profile",
                path.display()
            ))
        })
    }

    /// Writes `name`'s preshared key and, unless the client keeps its own key pair, its
    /// private key (the caller holds the PKI lock).
    fn issue_wireguard_keys(
        &self,
        name: &str,
        own_public_key: Option<String>,
    ) -> Result<WireguardIdentity> {
        let public_key = match own_public_key {
            Some(public_key) => public_key,
            None => {
                let secret = new_wireguard_secret();
                write_private(
                    &self.client_path(name, WIREGUARD_CLIENT_KEY),
                    &key_file_text(&secret),
                )?;
                wireguard_public_key_of(secret)
            }
        };
        let mut preshared_key = [0u8; 32];
        rand::rng().fill_bytes(&mut preshared_key);
        write_private(
            &self.client_path(name, WIREGUARD_PRESHARED_KEY),
            &key_file_text(&preshared_key),
        )?;
        Ok(WireguardIdentity {
            public_key,
            profile_allowed_ips: None,
        })
    }

    /// The keys for `name`'s wg-quick profile; a client added before WireGuard gets its
    /// key pair and preshared key now.
    pub fn wireguard_profile_keys(&self, name: &str) -> Result<WireguardProfileKeys> {
        self.require()?;
        let server_public_key = self.wireguard_public_key()?;
        let _lock = self.lock()?;
        let mut registry = self.load_registry()?;
        let Some(client) = registry.clients.get(name).cloned() else {
            return Err(no_such_client(name));
        };
        let identity = match client.wireguard {
            Some(identity) => identity,
            None => {
                let identity = self.issue_wireguard_keys(name, None)?;
                registry.clients.insert(
                    name.to_owned(),
                    ClientRecord {
                        wireguard: Some(identity.clone()),
                        ..client.clone()
                    },
                );
                self.save_registry(&registry)?;
                identity
            }
        };
        // Absent for a client that keeps its own private key.
        let private_key = self
            .client_path(name, WIREGUARD_CLIENT_KEY)
            .exists()
            .then(|| self.client_key(name, WIREGUARD_CLIENT_KEY, "a WireGuard private key"))
            .transpose()?
            .map(|key| encode_key(&key));
        Ok(WireguardProfileKeys {
            address: client.address,
            private_key,
            public_key: identity.public_key,
            preshared_key: encode_key(&self.client_key(
                name,
                WIREGUARD_PRESHARED_KEY,
                "a WireGuard preshared key",
            )?),
            server_public_key,
        })
    }

    /// Remembers the AllowedIPs of the profile just printed for `name`, so that `client
    /// list` and `status` can tell when the pushed routes moved on.
    pub fn record_wireguard_profile(&self, name: &str, allowed_ips: &[Ipv4Net]) -> Result<()> {
        let _lock = self.lock()?;
        let mut registry = self.load_registry()?;
        let identity = registry
            .clients
            .get_mut(name)
            .ok_or_else(|| no_such_client(name))?
            .wireguard
            .as_mut()
            .ok_or_else(|| {
                fail(format!(
                    "client {name:?} has no WireGuard keys yet; `dockvpn client config {name} --format wireguard` issues them"
                ))
            })?;
        identity.profile_allowed_ips = Some(allowed_ips.to_vec());
        self.save_registry(&registry)
    }

    /// The mode whose keys this PKI's profiles carry: v2 for a PKI made since tls-crypt-v2
    /// exists, v1 for one made with tls-crypt, off for one made before either.
    pub fn default_tls_crypt_mode(&self) -> TlsCryptMode {
        if self.path(TLS_CRYPT_V2_SERVER_KEY).exists() {
            TlsCryptMode::V2
        } else if self.has_tls_crypt_key() {
            TlsCryptMode::V1
        } else {
            TlsCryptMode::Off
        }
    }

    /// Whether this PKI has the shared tls-crypt (v1) key.
    pub fn has_tls_crypt_key(&self) -> bool {
        self.path(TLS_CRYPT_KEY).exists()
    }

    /// The tls-crypt-v2 server key; created when the PKI has none (the operator turned v2 on).
    pub fn tls_crypt_v2_server_key(&self) -> Result<ServerKey> {
        self.server_side_key(
            TLS_CRYPT_V2_SERVER_KEY,
            || ServerKey::generate().to_pem(),
            ServerKey::from_pem,
            "a tls-crypt-v2 server key",
        )
    }

    /// A key file of the server's, made on first use; `what` names it in errors.
    fn server_side_key<K>(
        &self,
        file: &str,
        generate: impl FnOnce() -> String,
        parse: impl FnOnce(&str) -> std::result::Result<K, String>,
        what: &str,
    ) -> Result<K> {
        self.require()?;
        let path = self.path(file);
        if !path.exists() {
            let _lock = self.lock()?;
            if !path.exists() {
                write_private(&path, &generate())?;
            }
        }
        parse(&self.read(file)?).map_err(|error| {
            fail(format!(
                "{} is not {what} ({error}); delete it and restart to make a new one (every profile that carries it must then be issued again)",
                path.display()
            ))
        })
    }

    /// Copies a site's tls-auth key (`openvpn --genkey secret`) into the PKI, for
    /// `--tls-crypt tls-auth`.
    pub fn import_tls_auth_key(&self, file: &Path) -> Result<()> {
        self.require()?;
        let text = fs::read_to_string(file).map_err(io(format!("read {}", file.display())))?;
        StaticKey::from_pem(&text).map_err(|error| {
            Error::invalid(
                "FILE",
                file.display(),
                format!("not an OpenVPN static key ({error}): give the file named by `tls-auth` in the site's server config"),
            )
        })?;
        let _lock = self.lock()?;
        write_private(&self.path(TLS_AUTH_KEY), &text)
    }

    /// The imported tls-auth key.
    pub fn tls_auth_key(&self) -> Result<StaticKey> {
        let path = self.path(TLS_AUTH_KEY);
        let text = fs::read_to_string(&path).map_err(|_| {
            Error::invalid(
                "--tls-crypt",
                "tls-auth",
                "the PKI has no tls-auth key: import the site's with `dockvpn pki import-tls-auth FILE`",
            )
        })?;
        StaticKey::from_pem(&text).map_err(|error| {
            fail(format!(
                "{} is not a tls-auth key ({error}); import the site's key again with `dockvpn pki import-tls-auth FILE`",
                path.display()
            ))
        })
    }

    /// Whether `name` has a tls-crypt-v2 key: clients added before v2 was on have none,
    /// so their profiles lack it.
    fn has_client_tls_crypt_v2_key(&self, name: &str) -> bool {
        self.client_path(name, TLS_CRYPT_V2_CLIENT_KEY).exists()
    }

    /// The clients whose profiles cannot work in `mode` as issued: in v2, those without a
    /// tls-crypt-v2 key (their profiles carry none; `client config` issues one).
    pub fn clients_needing_new_profile(&self, mode: TlsCryptMode) -> Result<Vec<String>> {
        if mode != TlsCryptMode::V2 {
            return Ok(Vec::new());
        }
        Ok(self
            .load_registry()?
            .clients
            .into_keys()
            .filter(|name| !self.has_client_tls_crypt_v2_key(name))
            .collect())
    }

    /// Wraps a new tls-crypt-v2 key for `name` (the caller holds the PKI lock).
    fn issue_client_tls_crypt_v2_key(&self, name: &str, server_key: &ServerKey) -> Result<()> {
        write_private(
            &self.client_path(name, TLS_CRYPT_V2_CLIENT_KEY),
            &server_key.issue_client_key(unix_now()).to_pem(),
        )
    }

    /// The client's tls-crypt-v2 key, made (and kept) on first use.
    fn client_tls_crypt_v2_key(&self, name: &str) -> Result<ClientKey> {
        let path = self.client_path(name, TLS_CRYPT_V2_CLIENT_KEY);
        if !path.exists() {
            let server_key = self.tls_crypt_v2_server_key()?;
            let _lock = self.lock()?;
            if !path.exists() {
                self.issue_client_tls_crypt_v2_key(name, &server_key)?;
            }
        }
        let text = fs::read_to_string(&path).map_err(io(format!("read {}", path.display())))?;
        ClientKey::from_pem(&text).map_err(|error| {
            fail(format!(
                "{} is not a tls-crypt-v2 client key ({error}); delete it and run `dockvpn client config {name}` again",
                path.display()
            ))
        })
    }

    /// The tls-crypt key the server and every profile share; created when a PKI made before
    /// tls-crypt existed has none (the operator turned it on).
    pub fn tls_crypt_key(&self) -> Result<StaticKey> {
        self.server_side_key(
            TLS_CRYPT_KEY,
            || StaticKey::generate().to_pem(),
            StaticKey::from_pem,
            "a tls-crypt key",
        )
    }

    /// `run` creates the PKI on first start so a new container works without set-up.
    pub fn ensure(&self) -> Result<bool> {
        if self.exists() {
            return Ok(false);
        }
        self.init(false)?;
        Ok(true)
    }

    fn require(&self) -> Result<()> {
        if self.exists() {
            Ok(())
        } else {
            Err(fail(format!(
                "no PKI in {}; run `dockvpn pki init` first (or start `dockvpn run`, which creates it)",
                self.dir.display()
            )))
        }
    }

    fn read(&self, name: &str) -> Result<String> {
        let path = self.path(name);
        fs::read_to_string(&path).map_err(io(format!("read {}", path.display())))
    }

    fn load_registry(&self) -> Result<Registry> {
        self.load_json(
            "clients.json",
            "restore it from a backup — clients cannot be added until it parses",
        )
    }

    /// A JSON file of the PKI (empty when absent); `fix` says what to do when it is corrupt.
    fn load_json<T: serde::de::DeserializeOwned + Default>(
        &self,
        file: &str,
        fix: &str,
    ) -> Result<T> {
        let path = self.path(file);
        match fs::read_to_string(&path) {
            Ok(text) => serde_json::from_str(&text)
                .map_err(|error| fail(format!("{} is corrupt ({error}); {fix}", path.display()))),
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => Ok(T::default()),
            Err(error) => Err(io(format!("read {}", path.display()))(error)),
        }
    }

    fn save_registry(&self, registry: &Registry) -> Result<()> {
        let text = serde_json::to_string_pretty(registry).expect("registry serializes");
        write_atomically(&self.path("clients.json"), text.as_bytes(), 0o644)
    }

    pub fn clients(&self) -> Result<Vec<ClientRecord>> {
        Ok(self.load_registry()?.clients.into_values().collect())
    }

    /// Issues a certificate and a WireGuard key pair for `name` and gives it the next free
    /// address in `pool` (or `address`).
    pub fn add_client(
        &self,
        name: &str,
        pool: Ipv4Net,
        address: Option<Ipv4Addr>,
    ) -> Result<ClientRecord> {
        self.add(name, pool, address, None, CLIENT_DAYS)
    }

    /// Issues a certificate valid for `days` and WireGuard keys (or takes the client's own
    /// public key) for `name`, and gives it the next free address in `pool` (or `address`).
    pub fn add(
        &self,
        name: &str,
        pool: Ipv4Net,
        address: Option<Ipv4Addr>,
        wireguard_public_key: Option<&str>,
        days: u32,
    ) -> Result<ClientRecord> {
        validate_name(name)?;
        let (wireguard_public_key, server_public_key) =
            self.check_credential_request(wireguard_public_key, days)?;
        let _lock = self.lock()?;
        let mut registry = self.load_registry()?;
        if registry.clients.contains_key(name) {
            return Err(fail(format!(
                "client {name:?} exists; `dockvpn client config {name}` prints its profile, `dockvpn client remove {name}` removes it"
            )));
        }
        if let Some(key) = &wireguard_public_key {
            check_wireguard_key_is_free(&registry, key, &server_public_key)?;
        }
        let taken: Vec<Ipv4Addr> = registry.clients.values().map(|c| c.address).collect();
        let server_address = pool.hosts().next();
        let address = match address {
            Some(address) => {
                if !pool.contains(&address)
                    || Some(address) == server_address
                    || address == pool.broadcast()
                    || address == pool.network()
                {
                    return Err(Error::invalid("--address", address, format!("must be a client address inside the pool {pool} (not {}, the server's)", server_address.map(|a| a.to_string()).unwrap_or_default())));
                }
                if taken.contains(&address) {
                    return Err(Error::invalid(
                        "--address",
                        address,
                        "already given to another client",
                    ));
                }
                address
            }
            None => pool
                .hosts()
                .skip(1)
                .find(|a| !taken.contains(a))
                .ok_or_else(|| {
                    fail(format!(
                        "the pool {pool} is full; remove a client or use a larger --pool"
                    ))
                })?,
        };

        let (certificate, wireguard) = self.issue_credentials(name, wireguard_public_key, days)?;
        let record = ClientRecord {
            name: name.to_owned(),
            address,
            created: unix_now(),
            wireguard: Some(wireguard),
            certificate: Some(certificate),
            revoked: None,
            allow: None,
        };
        registry.clients.insert(name.to_owned(), record.clone());
        self.save_registry(&registry)?;
        Ok(record)
    }

    /// Checks what `add` and `renew` are given before the lock: `days`, and the client's own
    /// WireGuard key (normalized); that key and the server's public key.
    fn check_credential_request(
        &self,
        wireguard_public_key: Option<&str>,
        days: u32,
    ) -> Result<(Option<String>, String)> {
        validate_days(days)?;
        let wireguard_public_key = wireguard_public_key
            .map(parse_wireguard_public_key)
            .transpose()?;
        self.require()?;
        Ok((wireguard_public_key, self.wireguard_public_key()?))
    }

    /// Writes `name`'s certificate (valid for `days`) and key, its tls-crypt-v2 key and its
    /// WireGuard keys (the caller holds the PKI lock).
    fn issue_credentials(
        &self,
        name: &str,
        wireguard_public_key: Option<String>,
        days: u32,
    ) -> Result<(CertificateBinding, WireguardIdentity)> {
        let issuer = self.issuer()?;
        let key = KeyPair::generate().map_err(cert_error("generate the client key"))?;
        let mut params = leaf_params(name, time::Duration::days(days.into()))?;
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        let cert = params
            .signed_by(&key, &issuer)
            .map_err(cert_error("sign the client certificate"))?;
        write_private(&self.client_path(name, "key"), &key.serialize_pem())?;
        write_public(&self.client_path(name, "crt"), &cert.pem())?;
        if self.path(TLS_CRYPT_V2_SERVER_KEY).exists() {
            let server_key = ServerKey::from_pem(&self.read(TLS_CRYPT_V2_SERVER_KEY)?)
                .map_err(|error| fail(format!("{TLS_CRYPT_V2_SERVER_KEY}: {error}")))?;
            self.issue_client_tls_crypt_v2_key(name, &server_key)?;
        }
        // A client that brings its own key pair has no private key here (any more).
        if wireguard_public_key.is_some() {
            let _ = fs::remove_file(self.client_path(name, WIREGUARD_CLIENT_KEY));
        }
        let wireguard = self.issue_wireguard_keys(name, wireguard_public_key)?;
        Ok((bind(cert.der())?, wireguard))
    }

    /// The CA as the signer of certificates and CRLs.
    fn issuer(&self) -> Result<Issuer<'static, KeyPair>> {
        Issuer::from_ca_cert_pem(
            &self.read("ca.crt")?,
            KeyPair::from_pem(&self.read("ca.key")?).map_err(cert_error("read the CA key"))?,
        )
        .map_err(cert_error("read the CA certificate"))
    }

    /// The certificate that connects as `client`: the bound one, or for a client from before
    /// binding, the one in its file.
    fn current_certificate(&self, client: &ClientRecord) -> Result<CertificateBinding> {
        if let Some(certificate) = &client.certificate {
            return Ok(certificate.clone());
        }
        let path = self.client_path(&client.name, "crt");
        let text = fs::read_to_string(&path).map_err(io(format!("read {}", path.display())))?;
        let der = CertificateDer::from_pem_slice(text.as_bytes()).map_err(|error| {
            fail(format!(
                "{} is not a certificate ({error}); `dockvpn client renew {}` issues a new one",
                path.display(),
                client.name
            ))
        })?;
        bind(&der)
    }

    /// Lists `client`'s current certificate as revoked (the caller holds the lock, saves the
    /// registry and writes the CRL).
    fn revoke_current(&self, registry: &mut Registry, client: &ClientRecord) -> Result<()> {
        let certificate = self.current_certificate(client)?;
        if !registry
            .revoked
            .iter()
            .any(|revoked| revoked.certificate.sha256 == certificate.sha256)
        {
            registry.revoked.push(RevokedCertificate {
                name: client.name.clone(),
                certificate,
                revoked: unix_now(),
            });
        }
        Ok(())
    }

    /// `client revoke`: the client's certificate and WireGuard key stop working; it keeps
    /// its name and address until `client renew` or `client remove`.
    pub fn revoke_client(&self, name: &str) -> Result<CertificateBinding> {
        self.require()?;
        let _lock = self.lock()?;
        let mut registry = self.load_registry()?;
        let client = registry
            .clients
            .get(name)
            .cloned()
            .ok_or_else(|| unknown_client(name))?;
        if client.revoked.is_some() {
            return Err(Error::invalid(
                "NAME",
                name,
                format!("already revoked: `dockvpn client renew {name}` issues a new certificate, `dockvpn client remove {name}` removes the client"),
            ));
        }
        let certificate = self.current_certificate(&client)?;
        self.revoke_current(&mut registry, &client)?;
        registry.clients.insert(
            name.to_owned(),
            ClientRecord {
                revoked: Some(unix_now()),
                ..client
            },
        );
        self.save_registry(&registry)?;
        self.write_crl(&registry)?;
        Ok(certificate)
    }

    /// `client renew`: a new certificate (valid for `days`) and WireGuard keys for the same
    /// name and address; the old certificate is revoked.
    pub fn renew_client(
        &self,
        name: &str,
        wireguard_public_key: Option<&str>,
        days: u32,
    ) -> Result<ClientRecord> {
        let (wireguard_public_key, server_public_key) =
            self.check_credential_request(wireguard_public_key, days)?;
        let _lock = self.lock()?;
        let mut registry = self.load_registry()?;
        let client = registry
            .clients
            .get(name)
            .cloned()
            .ok_or_else(|| unknown_client(name))?;
        if let Some(key) = &wireguard_public_key {
            check_wireguard_key_is_free(&registry, key, &server_public_key)?;
        }
        self.revoke_current(&mut registry, &client)?;
        let (certificate, wireguard) = self.issue_credentials(name, wireguard_public_key, days)?;
        let record = ClientRecord {
            wireguard: Some(wireguard),
            certificate: Some(certificate),
            revoked: None,
            ..client
        };
        registry.clients.insert(name.to_owned(), record.clone());
        self.save_registry(&registry)?;
        self.write_crl(&registry)?;
        Ok(record)
    }

    /// Removes a client; its certificate is revoked, so a copy kept elsewhere never
    /// connects again, even after a client of the same name is added.
    pub fn remove_client(&self, name: &str) -> Result<()> {
        let _lock = self.lock()?;
        let mut registry = self.load_registry()?;
        let client = registry
            .clients
            .remove(name)
            .ok_or_else(|| unknown_client(name))?;
        self.revoke_current(&mut registry, &client)?;
        self.save_registry(&registry)?;
        self.write_crl(&registry)?;
        let mut passwords = self.load_passwords()?;
        if passwords.remove(name).is_some() {
            self.save_passwords(&passwords)?;
        }
        for extension in [
            "crt",
            "key",
            TLS_CRYPT_V2_CLIENT_KEY,
            WIREGUARD_CLIENT_KEY,
            WIREGUARD_PRESHARED_KEY,
        ] {
            let _ = fs::remove_file(self.client_path(name, extension));
        }
        Ok(())
    }

    /// The registry as the OpenVPN engine admits clients: each client that is not revoked,
    /// with its current certificate, and every revoked certificate.
    pub fn openvpn_registry(&self) -> Result<ClientRegistry> {
        // Under the lock, a client being added or removed is seen whole or not at all.
        let _lock = self.lock()?;
        let registry = self.load_registry()?;
        let mut clients = std::collections::HashMap::new();
        for client in registry.clients.values() {
            if client.revoked.is_some() {
                continue;
            }
            // A client whose certificate cannot be read is left out alone (it cannot
            // connect); the others, and their revocation, are unaffected.
            let certificate = self
                .current_certificate(client)
                .and_then(|certificate| parse_fingerprint(&certificate.sha256));
            match certificate {
                Ok(certificate) => {
                    clients.insert(
                        client.name.clone(),
                        RegisteredClient {
                            address: client.address,
                            certificate,
                        },
                    );
                }
                Err(error) => {
                    tracing::warn!(client = %client.name, %error, "OpenVPN client left out")
                }
            }
        }
        let revoked = registry
            .revoked
            .iter()
            .map(|revoked| parse_fingerprint(&revoked.certificate.sha256))
            .collect::<Result<HashSet<_>>>()?;
        Ok(ClientRegistry {
            clients,
            revoked,
            passwords: self.load_passwords()?.into_iter().collect(),
        })
    }

    /// Fails naming the fix unless `name` is a registered client.
    pub fn require_client(&self, name: &str) -> Result<()> {
        self.require()?;
        match self.load_registry()?.clients.contains_key(name) {
            true => Ok(()),
            false => Err(unknown_client(name)),
        }
    }

    /// `client passwd`: stores the Argon2id hash of `name`'s password.
    pub fn set_password(&self, name: &str, password: &str) -> Result<()> {
        let hash = crate::password::hash(password)?;
        let _lock = self.lock()?;
        if !self.load_registry()?.clients.contains_key(name) {
            return Err(unknown_client(name));
        }
        let mut passwords = self.load_passwords()?;
        passwords.insert(name.to_owned(), hash);
        self.save_passwords(&passwords)
    }

    fn load_passwords(&self) -> Result<BTreeMap<String, String>> {
        self.load_json(
            PASSWORDS,
            "restore it from a backup, or delete it and set each password again (dockvpn client passwd NAME)",
        )
    }

    fn save_passwords(&self, passwords: &BTreeMap<String, String>) -> Result<()> {
        let text = serde_json::to_string_pretty(passwords).expect("passwords serialize");
        write_private(&self.path(PASSWORDS), &text)
    }

    /// The CRL (PEM) listing every revoked client certificate, signed by the CA; made now
    /// for a PKI from before revocation.
    pub fn crl(&self) -> Result<String> {
        self.require()?;
        if !self.path(CRL).exists() {
            let _lock = self.lock()?;
            self.write_crl(&self.load_registry()?)?;
        }
        self.read(CRL)
    }

    /// Signs and writes the CRL for `registry`'s revoked certificates.
    fn write_crl(&self, registry: &Registry) -> Result<()> {
        let now = time::OffsetDateTime::from(SystemTime::now());
        let revoked_certs = registry
            .revoked
            .iter()
            .map(|revoked| {
                Ok(RevokedCertParams {
                    serial_number: SerialNumber::from_slice(&parse_hex(
                        &revoked.certificate.serial,
                    )?),
                    revocation_time: time::OffsetDateTime::from_unix_timestamp(
                        revoked.revoked as i64,
                    )
                    .unwrap_or(now),
                    reason_code: None,
                    invalidity_date: None,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let params = CertificateRevocationListParams {
            this_update: now,
            next_update: now + time::Duration::days(CRL_DAYS),
            // Seconds since the epoch: each CRL's number is larger than the last one's.
            crl_number: SerialNumber::from_slice(&unix_now().to_be_bytes()),
            issuing_distribution_point: None,
            revoked_certs,
            key_identifier_method: KeyIdMethod::Sha256,
        };
        let crl = params
            .signed_by(&self.issuer()?)
            .map_err(cert_error("sign the CRL"))?;
        write_public(
            &self.path(CRL),
            &crl.pem().map_err(cert_error("encode the CRL"))?,
        )
    }

    /// A ready inline `.ovpn` profile for the stock OpenVPN client, carrying the key that
    /// `tls_crypt` asks for: the client's own tls-crypt-v2 key, or the shared tls-crypt key;
    /// with `auth-user-pass` when the server asks for passwords.
    pub fn profile(
        &self,
        name: &str,
        remote: (&str, u16),
        proto: Proto,
        tls_crypt: TlsCryptMode,
        auth: Auth,
    ) -> Result<String> {
        let (remote_host, remote_port) = remote;
        self.require()?;
        if !self.load_registry()?.clients.contains_key(name) {
            return Err(no_such_client(name));
        }
        let read_client = |extension: &str| {
            let path = self.client_path(name, extension);
            fs::read_to_string(&path).map_err(io(format!("read {}", path.display())))
        };
        Ok(format!(
            "# Dockvpn profile for {name}: openvpn --config {name}.ovpn\n\
             client\n\
             dev tun\n\
             {remotes}\
             nobind\n\
             remote-cert-tls server\n\
             {exit_notify}\
             verb 3\n\
             {auth_user_pass}\
             {connections}\
             <ca>\n{ca}</ca>\n\
             <cert>\n{cert}</cert>\n\
             <key>\n{key}</key>\n\
             {tls_crypt}",
            remotes = match proto {
                Proto::Udp => format!("proto udp\nremote {remote_host} {remote_port}\n"),
                Proto::Tcp => format!("proto tcp-client\nremote {remote_host} {remote_port}\n"),
                Proto::Both => String::new(),
            },
            // Each block starts from the options set above it (nobind, explicit-exit-notify),
            // so the blocks come last.
            connections = match proto {
                Proto::Both => format!(
                    "<connection>\nremote {remote_host} {remote_port}\nproto udp\n</connection>\n\
                     <connection>\nremote {remote_host} {remote_port}\nproto tcp-client\n</connection>\n"
                ),
                Proto::Udp | Proto::Tcp => String::new(),
            },
            // A TCP client's server sees it leave when the connection closes (the client
            // would say it ignores the option).
            auth_user_pass = match auth {
                Auth::Cert => "",
                Auth::CertAndPassword => "auth-user-pass\n",
            },
            exit_notify = match proto {
                Proto::Tcp => "",
                Proto::Udp | Proto::Both => "explicit-exit-notify\n",
            },
            ca = self.read("ca.crt")?,
            cert = read_client("crt")?,
            key = read_client("key")?,
            tls_crypt = match tls_crypt {
                TlsCryptMode::V2 => format!(
                    "<tls-crypt-v2>\n{}</tls-crypt-v2>\n",
                    self.client_tls_crypt_v2_key(name)?.to_pem()
                ),
                TlsCryptMode::V1 => format!(
                    "<tls-crypt>\n{}</tls-crypt>\n",
                    self.tls_crypt_key()?.to_pem()
                ),
                TlsCryptMode::TlsAuth => format!(
                    "<tls-auth>\n{}</tls-auth>\nkey-direction 1\n",
                    self.tls_auth_key()?.to_pem()
                ),
                TlsCryptMode::Off => String::new(),
            },
        ))
    }

    /// rustls config: TLS 1.2 and 1.3, client certificates required and verified against
    /// the CA, no session tickets or resumption.
    pub fn server_tls_config(&self) -> Result<Arc<rustls::ServerConfig>> {
        self.require()?;
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let pem_error = |what: &'static str| move |error| fail(format!("read {what}: {error}"));
        let ca = CertificateDer::from_pem_slice(self.read("ca.crt")?.as_bytes())
            .map_err(pem_error("ca.crt"))?;
        let mut roots = rustls::RootCertStore::empty();
        roots
            .add(ca)
            .map_err(|error| fail(format!("load the CA: {error}")))?;
        let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
            roots.into(),
            provider.clone(),
        )
        .build()
        .map_err(|error| fail(format!("client verifier: {error}")))?;
        let chain = vec![
            CertificateDer::from_pem_slice(self.read("server.crt")?.as_bytes())
                .map_err(pem_error("server.crt"))?,
        ];
        let key = PrivateKeyDer::from_pem_slice(self.read("server.key")?.as_bytes())
            .map_err(pem_error("server.key"))?;
        let mut config = rustls::ServerConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
            .map_err(|error| fail(format!("TLS versions: {error}")))?
            .with_client_cert_verifier(verifier)
            .with_single_cert(chain, key)
            .map_err(|error| fail(format!("server certificate: {error}")))?;
        // TLS 1.2 without the extended master secret makes the key exporter unsafe.
        config.require_ems = true;
        config.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
        config.send_tls13_tickets = 0;
        Ok(Arc::new(config))
    }
}

fn unknown_client(name: &str) -> Error {
    Error::invalid(
        "NAME",
        name,
        "no such client (`dockvpn client list` shows them)",
    )
}

/// WireGuard tells peers apart by their public keys alone: a new one must be nobody's yet.
fn check_wireguard_key_is_free(
    registry: &Registry,
    key: &str,
    server_public_key: &str,
) -> Result<()> {
    let owner = registry
        .clients
        .values()
        .find(|client| {
            client
                .wireguard
                .as_ref()
                .is_some_and(|id| id.public_key == key)
        })
        .map(|client| format!("client {:?}", client.name))
        .or_else(|| (key == server_public_key).then(|| "the server".to_owned()));
    match owner {
        Some(owner) => Err(Error::invalid(
            "--wireguard-public-key",
            key,
            format!("already the key of {owner}: give the public key of the new client's own key pair (`wg genkey | wg pubkey`)"),
        )),
        None => Ok(()),
    }
}

fn validate_days(days: u32) -> Result<()> {
    if (1..=36500).contains(&days) {
        Ok(())
    } else {
        Err(Error::invalid(
            "--days",
            days,
            "a client certificate is valid for 1 to 36500 days",
        ))
    }
}

/// The registry's record of a DER certificate.
fn bind(der: &[u8]) -> Result<CertificateBinding> {
    let (_, certificate) = x509_parser::parse_x509_certificate(der)
        .map_err(|error| fail(format!("parse a client certificate: {error}")))?;
    Ok(CertificateBinding {
        serial: hex(certificate.raw_serial()),
        sha256: hex(&fingerprint(der)),
        not_after: certificate.validity().not_after.timestamp(),
    })
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|byte| format!("{byte:02x}")).collect()
}

fn parse_hex(text: &str) -> Result<Vec<u8>> {
    let corrupt = || {
        fail(format!(
            "clients.json: {text:?} is not hex; restore the file from a backup"
        ))
    };
    if text.len() % 2 != 0 {
        return Err(corrupt());
    }
    (0..text.len())
        .step_by(2)
        .map(|i| {
            text.get(i..i + 2)
                .and_then(|pair| u8::from_str_radix(pair, 16).ok())
                .ok_or_else(corrupt)
        })
        .collect()
}

fn parse_fingerprint(text: &str) -> Result<Fingerprint> {
    parse_hex(text)?.try_into().map_err(|_| {
        fail(format!(
            "clients.json: {text:?} is not a SHA-256 fingerprint; restore the file from a backup"
        ))
    })
}

/// Per-client access (`--allow`).
impl Pki {
    /// Limits `name` to `allow` (None: all pushed networks again).
    pub fn set_allow(&self, name: &str, allow: Option<Vec<Ipv4Net>>) -> Result<ClientRecord> {
        let _lock = self.lock()?;
        let mut registry = self.load_registry()?;
        let client = registry
            .clients
            .get_mut(name)
            .ok_or_else(|| no_such_client(name))?;
        client.allow = allow;
        let record = client.clone();
        self.save_registry(&registry)?;
        Ok(record)
    }

    /// The allow list of each client address that has one.
    pub fn allowances(&self) -> Result<std::collections::BTreeMap<Ipv4Addr, Vec<Ipv4Net>>> {
        Ok(self
            .clients()?
            .into_iter()
            .filter_map(|client| Some((client.address, client.allow?)))
            .collect())
    }
}

fn no_such_client(name: &str) -> Error {
    fail(format!(
        "no client named {name:?}; add it with `dockvpn client add {name}`"
    ))
}

/// A client's own WireGuard public key as `wg pubkey` prints it, for `--wireguard-public-key`.
pub fn parse_wireguard_public_key(text: &str) -> Result<String> {
    let key = decode_key(text).map_err(|error| {
        Error::invalid(
            "--wireguard-public-key",
            text,
            format!("{error}: give the client's public key as `wg pubkey` prints it (44 characters of base64 for 32 bytes)"),
        )
    })?;
    Ok(encode_key(&key))
}

/// A new X25519 private key, clamped as `wg genkey` prints it.
fn new_wireguard_secret() -> [u8; 32] {
    let mut secret = [0u8; 32];
    rand::rng().fill_bytes(&mut secret);
    secret[0] &= 248;
    secret[31] &= 127;
    secret[31] |= 64;
    secret
}

fn wireguard_public_key_of(secret: [u8; 32]) -> String {
    encode_key(PublicKey::from(&StaticSecret::from(secret)).as_bytes())
}

fn encode_key(key: &[u8; 32]) -> String {
    base64::engine::general_purpose::STANDARD.encode(key)
}

/// A key file's text, as `wg genkey` writes it.
fn key_file_text(key: &[u8; 32]) -> String {
    format!("{}\n", encode_key(key))
}

/// A 32-byte WireGuard key in base64, as `wg` prints them.
fn decode_key(text: &str) -> std::result::Result<[u8; 32], String> {
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(text.trim())
        .map_err(|error| format!("not base64 ({error})"))?;
    <[u8; 32]>::try_from(bytes.as_slice()).map_err(|_| format!("{} bytes, not 32", bytes.len()))
}

fn leaf_params(common_name: &str, validity: time::Duration) -> Result<CertificateParams> {
    let mut params = CertificateParams::new(Vec::<String>::new())
        .map_err(cert_error("certificate parameters"))?;
    let mut name = DistinguishedName::new();
    name.push(DnType::CommonName, common_name);
    params.distinguished_name = name;
    let now = time::OffsetDateTime::from(SystemTime::now());
    params.not_before = now - time::Duration::days(1);
    params.not_after = now + validity;
    let mut serial = [0u8; 16];
    rand::rng().fill_bytes(&mut serial);
    serial[0] &= 0x7f;
    params.serial_number = Some(SerialNumber::from_slice(&serial));
    params.key_usages = vec![
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::KeyAgreement,
    ];
    Ok(params)
}

/// A client name becomes a file name and a certificate CN.
fn validate_name(name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && !name.starts_with('.')
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | '@'));
    if ok {
        Ok(())
    } else {
        Err(Error::invalid(
            "NAME",
            name,
            "use 1-64 characters from A-Z a-z 0-9 - _ . @, not starting with a dot",
        ))
    }
}

fn write_private(path: &Path, text: &str) -> Result<()> {
    write_atomically(path, text.as_bytes(), 0o600)
}

fn write_public(path: &Path, text: &str) -> Result<()> {
    write_atomically(path, text.as_bytes(), 0o644)
}

fn write_atomically(path: &Path, bytes: &[u8], mode: u32) -> Result<()> {
    vnf_core::fs::write_atomically(path, bytes, mode)
        .map_err(io(format!("write {}", path.display())))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A PKI in a new directory of its own, named by `test`.
    fn fresh_pki(test: &str) -> (PathBuf, Pki) {
        let dir = std::env::temp_dir().join(format!("dockvpn-pki-{test}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        let pki = Pki::new(&dir);
        (dir, pki)
    }

    #[test]
    fn issues_clients_with_stable_addresses_and_private_keys() {
        let (dir, pki) = fresh_pki("clients");
        let pool: Ipv4Net = "10.8.0.0/29".parse().unwrap();
        assert!(pki.add_client("alice", pool, None).is_err(), "no PKI yet");
        pki.init(false).unwrap();
        assert!(pki.init(false).is_err(), "refuses to replace");
        let alice = pki.add_client("alice", pool, None).unwrap();
        let bob = pki.add_client("bob", pool, None).unwrap();
        assert_eq!(alice.address, Ipv4Addr::new(10, 8, 0, 2));
        assert_eq!(bob.address, Ipv4Addr::new(10, 8, 0, 3));
        assert!(pki.add_client("alice", pool, None).is_err());
        assert!(pki.add_client("../x", pool, None).is_err());
        assert!(pki
            .add_client("carol", pool, Some(Ipv4Addr::new(10, 8, 0, 1)))
            .is_err());
        use std::os::unix::fs::PermissionsExt;
        for key in [
            pki.path("ca.key"),
            pki.client_path("alice", "key"),
            pki.path(TLS_CRYPT_V2_SERVER_KEY),
            pki.client_path("alice", TLS_CRYPT_V2_CLIENT_KEY),
        ] {
            assert_eq!(
                fs::metadata(key).unwrap().permissions().mode() & 0o777,
                0o600
            );
        }
        assert_eq!(pki.default_tls_crypt_mode(), TlsCryptMode::V2);
        assert!(!pki.has_tls_crypt_key(), "a new PKI needs no shared key");
        let profile = pki
            .profile(
                "alice",
                ("10.0.2.2", 1194),
                Proto::Udp,
                TlsCryptMode::V2,
                Auth::Cert,
            )
            .unwrap();
        // The layout of every profile issued before TCP.
        assert!(profile.contains("dev tun\nproto udp\nremote 10.0.2.2 1194\nnobind\n"));
        let tcp = pki
            .profile(
                "alice",
                ("10.0.2.2", 443),
                Proto::Tcp,
                TlsCryptMode::V2,
                Auth::Cert,
            )
            .unwrap();
        assert!(tcp.contains("dev tun\nproto tcp-client\nremote 10.0.2.2 443\nnobind\n"));
        assert!(!tcp.contains("explicit-exit-notify"));
        assert!(profile.contains("remote-cert-tls server\nexplicit-exit-notify\nverb 3\n"));
        let both = pki
            .profile(
                "alice",
                ("10.0.2.2", 1194),
                Proto::Both,
                TlsCryptMode::V2,
                Auth::Cert,
            )
            .unwrap();
        assert!(both.contains(
            "dev tun\nnobind\nremote-cert-tls server\nexplicit-exit-notify\nverb 3\n\
             <connection>\nremote 10.0.2.2 1194\nproto udp\n</connection>\n\
             <connection>\nremote 10.0.2.2 1194\nproto tcp-client\n</connection>\n<ca>\n"
        ));
        assert!(profile.contains("<key>\n-----BEGIN PRIVATE KEY-----"));
        let v2_block = "<tls-crypt-v2>\n-----BEGIN OpenVPN tls-crypt-v2 client key-----";
        assert!(profile.contains(v2_block), "{profile}");
        // The same key each time the profile is issued.
        assert_eq!(
            pki.profile(
                "alice",
                ("10.0.2.2", 1194),
                Proto::Udp,
                TlsCryptMode::V2,
                Auth::Cert
            )
            .unwrap(),
            profile
        );
        assert!(pki
            .clients_needing_new_profile(TlsCryptMode::V2)
            .unwrap()
            .is_empty());
        // A client added before v2 existed gets its key with its next profile.
        fs::remove_file(pki.client_path("bob", TLS_CRYPT_V2_CLIENT_KEY)).unwrap();
        assert_eq!(
            pki.clients_needing_new_profile(TlsCryptMode::V2).unwrap(),
            ["bob"]
        );
        assert!(pki
            .profile(
                "bob",
                ("10.0.2.2", 1194),
                Proto::Udp,
                TlsCryptMode::V2,
                Auth::Cert
            )
            .unwrap()
            .contains(v2_block));
        assert!(pki
            .clients_needing_new_profile(TlsCryptMode::V2)
            .unwrap()
            .is_empty());
        pki.server_tls_config().unwrap();
        pki.remove_client("bob").unwrap();
        let carol = pki.add_client("carol", pool, None).unwrap();
        assert_eq!(
            carol.address,
            Ipv4Addr::new(10, 8, 0, 3),
            "freed address reused"
        );
        fs::remove_dir_all(&dir).unwrap();
    }

    fn mode(path: &Path) -> u32 {
        use std::os::unix::fs::PermissionsExt;
        fs::metadata(path).unwrap().permissions().mode() & 0o777
    }

    #[test]
    fn wireguard_keys_are_private_stable_and_go_with_their_client() {
        let (dir, pki) = fresh_pki("wireguard");
        let pool: Ipv4Net = "10.8.0.0/24".parse().unwrap();
        pki.init(false).unwrap();
        let server_key = pki.path(WIREGUARD_SERVER_KEY);
        assert_eq!(mode(&server_key), 0o600, "pki init writes the server key");
        let secret = pki.wireguard_server_secret().unwrap();
        assert_eq!(pki.wireguard_server_secret().unwrap(), secret, "stable");
        assert_eq!(
            pki.wireguard_public_key().unwrap(),
            wireguard_public_key_of(secret)
        );
        // A PKI from before WireGuard gets its key on first use, once.
        fs::remove_file(&server_key).unwrap();
        let created = pki.wireguard_server_secret().unwrap();
        assert_ne!(created, secret);
        assert_eq!(pki.wireguard_server_secret().unwrap(), created);
        assert_eq!(mode(&server_key), 0o600);

        let alice = pki.add_client("alice", pool, None).unwrap();
        let alice_key = pki.client_path("alice", WIREGUARD_CLIENT_KEY);
        let alice_psk = pki.client_path("alice", WIREGUARD_PRESHARED_KEY);
        assert_eq!((mode(&alice_key), mode(&alice_psk)), (0o600, 0o600));
        let identity = alice.wireguard.clone().unwrap();
        let private = decode_key(&fs::read_to_string(&alice_key).unwrap()).unwrap();
        assert_eq!(identity.public_key, wireguard_public_key_of(private));
        assert_eq!(identity.profile_allowed_ips, None);

        // A client with its own key pair: no private key here, the key must be 32 bytes.
        for bad in ["", "not base64!", "AAAA", &encode_key(&[7; 32])[..40]] {
            let error = pki
                .add("bob", pool, None, Some(bad), CLIENT_DAYS)
                .unwrap_err()
                .to_string();
            assert!(error.contains("--wireguard-public-key"), "{error}");
            assert!(error.contains("44 characters of base64"), "{error}");
        }
        let error = pki
            .add("bob", pool, None, Some(&identity.public_key), CLIENT_DAYS)
            .unwrap_err()
            .to_string();
        assert!(
            error.contains("already the key of client \"alice\""),
            "{error}"
        );
        let bob_public = wireguard_public_key_of(new_wireguard_secret());
        let bob = pki
            .add("bob", pool, None, Some(&bob_public), CLIENT_DAYS)
            .unwrap();
        assert_eq!(bob.wireguard.unwrap().public_key, bob_public);
        assert!(!pki.client_path("bob", WIREGUARD_CLIENT_KEY).exists());
        let bob_keys = pki.wireguard_profile_keys("bob").unwrap();
        assert_eq!(bob_keys.private_key, None);
        assert_eq!(
            bob_keys.server_public_key,
            pki.wireguard_public_key().unwrap()
        );

        let peers = pki.wireguard_peers().unwrap();
        assert_eq!(peers.len(), 2);
        assert_eq!(peers[0].name, "alice");
        assert_eq!(peers[0].address, alice.address);
        assert_eq!(encode_key(&peers[0].public_key), identity.public_key);
        assert_eq!(
            peers[0].preshared_key,
            decode_key(&fs::read_to_string(&alice_psk).unwrap()).unwrap()
        );

        // The profile's AllowedIPs are remembered for stale marking.
        let routes: Vec<Ipv4Net> = vec!["10.8.0.1/32".parse().unwrap()];
        pki.record_wireguard_profile("alice", &routes).unwrap();
        let listed = pki.clients().unwrap();
        assert_eq!(
            listed[0].wireguard.as_ref().unwrap().profile_allowed_ips,
            Some(routes)
        );

        // A corrupt key file names itself and the fix.
        fs::write(&server_key, "garbage\n").unwrap();
        let error = pki.wireguard_server_secret().unwrap_err().to_string();
        assert!(error.contains(&server_key.display().to_string()), "{error}");
        assert!(error.contains("delete it"), "{error}");
        // A client with a corrupt preshared key is left out; the others are served.
        fs::write(&alice_psk, "AAAA\n").unwrap();
        let names: Vec<String> = pki
            .wireguard_peers()
            .unwrap()
            .into_iter()
            .map(|p| p.name)
            .collect();
        assert_eq!(names, ["bob"]);
        let alice = pki
            .clients()
            .unwrap()
            .into_iter()
            .find(|c| c.name == "alice")
            .unwrap();
        let error = pki
            .wireguard_peer(&alice, alice.wireguard.as_ref().unwrap())
            .unwrap_err()
            .to_string();
        assert!(error.contains("alice.wg.psk"), "{error}");
        assert!(error.contains("3 bytes, not 32"), "{error}");

        // `pki init --force` makes a new server key.
        fs::write(&server_key, key_file_text(&created)).unwrap();
        pki.init(true).unwrap();
        assert_ne!(pki.wireguard_server_secret().unwrap(), created);

        pki.remove_client("alice").unwrap();
        assert!(!alice_key.exists() && !alice_psk.exists());
        assert_eq!(pki.wireguard_peers().unwrap().len(), 1);
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn revoke_renew_and_remove_keep_the_registry_and_the_crl_in_step() {
        let (dir, pki) = fresh_pki("revoke");
        let pool: Ipv4Net = "10.8.0.0/24".parse().unwrap();
        pki.init(false).unwrap();
        let alice = pki.add("alice", pool, None, None, 30).unwrap();
        pki.add_client("bob", pool, None).unwrap();
        let first = alice.certificate.clone().unwrap();
        let validity = first.not_after - unix_now() as i64;
        assert!((29 * 86400..=30 * 86400).contains(&validity), "{validity}");
        for days in [0, 36501] {
            let error = pki
                .add("carol", pool, None, None, days)
                .unwrap_err()
                .to_string();
            assert!(
                error.contains("--days") && error.contains("1 to 36500"),
                "{error}"
            );
        }

        // Bad input changes nothing.
        let before = fs::read_to_string(pki.path("clients.json")).unwrap();
        let error = pki.revoke_client("mallory").unwrap_err().to_string();
        assert!(
            error.contains("\"mallory\"") && error.contains("client list"),
            "{error}"
        );
        assert_eq!(
            fs::read_to_string(pki.path("clients.json")).unwrap(),
            before
        );

        let revoked = pki.revoke_client("alice").unwrap();
        assert_eq!(revoked, first);
        let error = pki.revoke_client("alice").unwrap_err().to_string();
        assert!(
            error.contains("already revoked") && error.contains("client renew alice"),
            "{error}"
        );
        let registry = pki.openvpn_registry().unwrap();
        assert!(!registry.clients.contains_key("alice"));
        assert!(registry
            .revoked
            .contains(&parse_fingerprint(&first.sha256).unwrap()));
        let peers: Vec<String> = pki
            .wireguard_peers()
            .unwrap()
            .into_iter()
            .map(|p| p.name)
            .collect();
        assert_eq!(
            peers,
            ["bob"],
            "a revoked client's WireGuard key is no peer"
        );
        let crl_serials = |pki: &Pki| -> Vec<String> {
            let pem = pki.crl().unwrap();
            let der =
                rustls::pki_types::CertificateRevocationListDer::from_pem_slice(pem.as_bytes())
                    .unwrap();
            let (_, crl) = x509_parser::parse_x509_crl(&der).unwrap();
            crl.iter_revoked_certificates()
                .map(|c| hex(c.raw_serial()))
                .collect()
        };
        assert_eq!(crl_serials(&pki), std::slice::from_ref(&first.serial));

        // Renewed: the same address, a new certificate and WireGuard key.
        let old_wireguard = alice.wireguard.clone().unwrap().public_key;
        let renewed = pki.renew_client("alice", None, CLIENT_DAYS).unwrap();
        assert_eq!(renewed.address, alice.address);
        assert_eq!(renewed.revoked, None);
        let second = renewed.certificate.clone().unwrap();
        assert_ne!(second.sha256, first.sha256);
        assert_ne!(renewed.wireguard.unwrap().public_key, old_wireguard);
        let registry = pki.openvpn_registry().unwrap();
        assert_eq!(
            registry.clients["alice"].certificate,
            parse_fingerprint(&second.sha256).unwrap()
        );
        assert_eq!(pki.wireguard_peers().unwrap().len(), 2);

        // Removed: the current certificate joins the CRL; a new alice gets a new one.
        let bob = pki.clients().unwrap()[1].certificate.clone().unwrap();
        pki.remove_client("bob").unwrap();
        // Renewing a revoked client listed its certificate once.
        assert_eq!(crl_serials(&pki), [first.serial.clone(), bob.serial]);
        let error = pki.remove_client("bob").unwrap_err().to_string();
        assert!(error.contains("\"bob\""), "{error}");
        // Renewing a connected client revokes its certificate.
        pki.renew_client("alice", None, 1).unwrap();
        assert_eq!(crl_serials(&pki)[2], second.serial);
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_client_from_before_binding_is_bound_to_the_certificate_in_its_file() {
        let (dir, pki) = fresh_pki("unbound");
        let pool: Ipv4Net = "10.8.0.0/24".parse().unwrap();
        pki.init(false).unwrap();
        let alice = pki.add_client("alice", pool, None).unwrap();
        let mut registry = pki.load_registry().unwrap();
        registry.clients.get_mut("alice").unwrap().certificate = None;
        pki.save_registry(&registry).unwrap();
        let certificate = parse_fingerprint(&alice.certificate.unwrap().sha256).unwrap();
        assert_eq!(
            pki.openvpn_registry().unwrap().clients["alice"].certificate,
            certificate
        );
        pki.remove_client("alice").unwrap();
        assert!(pki
            .openvpn_registry()
            .unwrap()
            .revoked
            .contains(&certificate));
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_public_key_is_the_x25519_base_point_times_the_private_key() {
        // RFC 7748, section 6.1: Alice's key pair.
        let hex = |text: &str| -> [u8; 32] {
            let bytes: Vec<u8> = (0..64)
                .step_by(2)
                .map(|i| u8::from_str_radix(&text[i..i + 2], 16).unwrap())
                .collect();
            bytes.try_into().unwrap()
        };
        let private = hex("77076d0a7318a57d3c16c17251b26645df4c2f87ebc0992ab177fba51db92c2a");
        let public = hex("8520f0098930a754748b7ddcb43ef75a0dbf3a0d26381af4eba4a98eaa9b4e6a");
        assert_eq!(wireguard_public_key_of(private), encode_key(&public));
        assert_eq!(decode_key(&key_file_text(&public)), Ok(public));
    }

    #[test]
    fn a_registry_from_before_wireguard_parses_and_its_clients_get_keys_on_first_profile() {
        let (dir, pki) = fresh_pki("before-wireguard");
        pki.init(false).unwrap();
        let old =
            r#"{"clients":{"carol":{"name":"carol","address":"10.8.0.2","created":1700000000}}}"#;
        fs::write(pki.path("clients.json"), old).unwrap();
        let clients = pki.clients().unwrap();
        assert_eq!(clients[0].wireguard, None);
        assert!(pki.wireguard_peers().unwrap().is_empty());
        // Saved again, the old record is written as it was.
        pki.save_registry(&pki.load_registry().unwrap()).unwrap();
        let saved: serde_json::Value =
            serde_json::from_str(&fs::read_to_string(pki.path("clients.json")).unwrap()).unwrap();
        assert_eq!(
            saved,
            serde_json::from_str::<serde_json::Value>(old).unwrap()
        );

        let keys = pki.wireguard_profile_keys("carol").unwrap();
        let private = decode_key(keys.private_key.as_deref().unwrap()).unwrap();
        assert_eq!(keys.public_key, wireguard_public_key_of(private));
        assert_eq!(pki.wireguard_profile_keys("carol").unwrap(), keys, "kept");
        assert_eq!(pki.wireguard_peers().unwrap()[0].name, "carol");
        assert!(pki.wireguard_profile_keys("nobody").is_err());
        fs::remove_dir_all(&dir).unwrap();
    }
}

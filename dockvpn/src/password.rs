//! `--auth cert+password`: client passwords as Argon2id hashes (PHC strings), and their
//! check, which costs the same whether or not the client has a password.

use std::sync::OnceLock;

use argon2::password_hash::rand_core::OsRng;
use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use argon2::Argon2;
use serde::{Deserialize, Serialize};
use vnf_core::{Error, Result};

/// The longest password taken (the key-method string limit leaves room for more; no
/// person types more).
pub const MAX_PASSWORD: usize = 1024;

/// How a client authenticates.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
pub enum Auth {
    /// Its certificate only
    #[default]
    #[serde(rename = "cert")]
    #[value(name = "cert")]
    Cert,
    /// Its certificate and its password (`client passwd`; profiles get `auth-user-pass`)
    #[serde(rename = "cert+password")]
    #[value(name = "cert+password")]
    CertAndPassword,
}

impl std::fmt::Display for Auth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Auth::Cert => "cert",
            Auth::CertAndPassword => "cert+password",
        })
    }
}

/// A new password's Argon2id hash with a fresh salt.
pub fn hash(password: &str) -> Result<String> {
    if password.is_empty() || password.len() > MAX_PASSWORD {
        return Err(Error::invalid(
            "password",
            format!("{} bytes", password.len()),
            format!("give 1 to {MAX_PASSWORD} bytes"),
        ));
    }
    let salt = SaltString::generate(&mut OsRng);
    Argon2::default()
        .hash_password(password.as_bytes(), &salt)
        .map(|hash| hash.to_string())
        .map_err(|error| Error::Vnf(format!("hash the password: {error}")))
}

/// Whether `password` matches `hash`. A client without a hash is checked against a dummy
/// one, so the time taken does not tell whether it has a password.
pub fn verify(hash: Option<&str>, password: &str) -> bool {
    static DUMMY: OnceLock<String> = OnceLock::new();
    let dummy = DUMMY.get_or_init(|| {
        let salt = SaltString::generate(&mut OsRng);
        Argon2::default()
            .hash_password(b"no password is set for this client", &salt)
            .map(|hash| hash.to_string())
            .unwrap_or_default()
    });
    let (stored, exists) = match hash {
        Some(hash) => (hash, true),
        None => (dummy.as_str(), false),
    };
    let Ok(parsed) = PasswordHash::new(stored) else {
        return false;
    };
    let matches = Argon2::default()
        .verify_password(password.as_bytes(), &parsed)
        .is_ok();
    matches && exists
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_hash_verifies_its_password_only() {
        let hash = hash("correct horse").unwrap();
        assert!(hash.starts_with("$argon2id$"), "{hash}");
        assert!(verify(Some(&hash), "correct horse"));
        assert!(!verify(Some(&hash), "correct horsE"));
        assert!(!verify(Some(&hash), ""));
        assert!(!verify(None, "correct horse"));
        assert!(!verify(Some("not a hash"), "correct horse"));
        assert!(super::hash("").is_err());
        assert!(super::hash(&"x".repeat(MAX_PASSWORD + 1)).is_err());
    }
}

//! Why a client was refused, by fixed reason, so the counts can be shown and exported
//! (metrics labels are these names, never free text).

use serde::{Deserialize, Serialize};

/// A refused client's reason.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// The TLS handshake refused its certificate (expired, not yet valid, another CA), or
    /// it is not the current certificate of a registered client.
    BadCertificate,
    /// Its certificate was revoked (`client revoke`, `remove` or `renew`).
    Revoked,
    /// `--auth cert+password`: a wrong or missing password.
    WrongPassword,
}

impl Refusal {
    pub const ALL: [Refusal; 3] = [
        Refusal::BadCertificate,
        Refusal::Revoked,
        Refusal::WrongPassword,
    ];

    /// The reason's label.
    pub fn name(self) -> &'static str {
        match self {
            Refusal::BadCertificate => "bad_certificate",
            Refusal::Revoked => "revoked",
            Refusal::WrongPassword => "wrong_password",
        }
    }
}

/// Refused clients so far, by reason.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Refusals {
    #[serde(default)]
    pub bad_certificate: u64,
    #[serde(default)]
    pub revoked: u64,
    #[serde(default)]
    pub wrong_password: u64,
}

impl Refusals {
    pub fn count(&mut self, refusal: Refusal) {
        *self.counter(refusal) += 1;
    }

    pub fn get(&self, refusal: Refusal) -> u64 {
        match refusal {
            Refusal::BadCertificate => self.bad_certificate,
            Refusal::Revoked => self.revoked,
            Refusal::WrongPassword => self.wrong_password,
        }
    }

    fn counter(&mut self, refusal: Refusal) -> &mut u64 {
        match refusal {
            Refusal::BadCertificate => &mut self.bad_certificate,
            Refusal::Revoked => &mut self.revoked,
            Refusal::WrongPassword => &mut self.wrong_password,
        }
    }
}

//! OpenVPN's own key derivation, for clients without tls-ekm (OpenVPN 2.4 and 2.5): the
//! TLS 1.0 PRF (RFC 2246 section 5: P_MD5 xor P_SHA1 over the two halves of the secret) over
//! the random halves both sides sent in key-method 2.
//!
//! master secret = PRF(client pre_master, "OpenVPN master secret",
//!                     client random1 || server random1), 48 bytes;
//! key block = PRF(master secret, "OpenVPN key expansion",
//!                 client random2 || server random2 || client session id || server session id),
//!             256 bytes, laid out as the tls-ekm material is.

use hmac::{Hmac, Mac};
use md5::Md5;
use ring::hmac as ring_hmac;

use super::data::KEY_MATERIAL_LEN;
use super::keymethod::{ClientKeySource, SERVER_RANDOM_LEN};
use super::packet::SessionId;

const MASTER_SECRET_LEN: usize = 48;
const MASTER_SECRET_LABEL: &[u8] = b"OpenVPN master secret";
const KEY_EXPANSION_LABEL: &[u8] = b"OpenVPN key expansion";

/// The TLS 1.0 PRF: fills `out` from `secret`, `label` and `seed`.
fn tls1_prf(secret: &[u8], label: &[u8], seed: &[u8], out: &mut [u8]) {
    // The halves overlap by one byte when the secret's length is odd.
    let half = secret.len().div_ceil(2);
    let md5_secret = &secret[..half];
    let sha1_secret = &secret[secret.len() - half..];
    let labelled_seed = [label, seed].concat();
    p_hash(
        &mut |parts| hmac_md5(md5_secret, parts),
        &labelled_seed,
        out,
        false,
    );
    let sha1_key = ring_hmac::Key::new(ring_hmac::HMAC_SHA1_FOR_LEGACY_USE_ONLY, sha1_secret);
    p_hash(
        &mut |parts| {
            let mut context = ring_hmac::Context::with_key(&sha1_key);
            parts.iter().for_each(|part| context.update(part));
            context.sign().as_ref().to_vec()
        },
        &labelled_seed,
        out,
        true,
    );
}

fn hmac_md5(secret: &[u8], parts: &[&[u8]]) -> Vec<u8> {
    let mut mac = Hmac::<Md5>::new_from_slice(secret).expect("HMAC takes keys of any length");
    parts.iter().for_each(|part| mac.update(part));
    mac.finalize().into_bytes().to_vec()
}

/// P_hash (RFC 2246 section 5): HMAC(A(i) || seed) for A(1), A(2)… with A(0) = seed,
/// A(i) = HMAC(A(i-1)); written into `out`, or xored into it.
fn p_hash(hmac: &mut dyn FnMut(&[&[u8]]) -> Vec<u8>, seed: &[u8], out: &mut [u8], xor: bool) {
    let mut a = hmac(&[seed]);
    for chunk in out.chunks_mut(a.len()) {
        let block = hmac(&[&a, seed]);
        for (byte, value) in chunk.iter_mut().zip(block) {
            *byte = if xor { *byte ^ value } else { value };
        }
        a = hmac(&[&a]);
    }
}

/// One key's data-channel material from the key-method 2 randoms of both sides and the
/// session ids (client's first).
pub fn key_material(
    client: &ClientKeySource,
    server_random: &[u8; SERVER_RANDOM_LEN],
    client_session: SessionId,
    server_session: SessionId,
) -> [u8; KEY_MATERIAL_LEN] {
    let (server_random1, server_random2) = server_random.split_at(SERVER_RANDOM_LEN / 2);
    let mut master = [0u8; MASTER_SECRET_LEN];
    tls1_prf(
        client.pre_master(),
        MASTER_SECRET_LABEL,
        &[client.random1(), server_random1].concat(),
        &mut master,
    );
    let mut material = [0u8; KEY_MATERIAL_LEN];
    tls1_prf(
        &master,
        KEY_EXPANSION_LABEL,
        &[
            client.random2(),
            server_random2,
            &client_session,
            &server_session,
        ]
        .concat(),
        &mut material,
    );
    material
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hex(text: &str) -> Vec<u8> {
        (0..text.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&text[i..i + 2], 16).unwrap())
            .collect()
    }

    /// The TLS 1.0/1.1 PRF test vector published on the IETF TLS list (secret 48 × 0xab,
    /// label "PRF Testvector", seed 64 × 0xcd, 104 bytes out), used by many TLS stacks.
    #[test]
    fn tls1_prf_matches_the_published_test_vector() {
        let mut out = [0u8; 104];
        tls1_prf(&[0xab; 48], b"PRF Testvector", &[0xcd; 64], &mut out);
        let expected = hex(concat!(
            "d3d4d1e349b5d515044666d51de32bab258cb521b6b053463e354832fd976754",
            "443bcf9a296519bc289abcbc1187e4ebd31e602353776c408aafb74cbc85eff6",
            "9255f9788faa184cbb957a9819d84a5d7eb006eb459d3ae8de9810454b8b2d8f",
            "1afbc655a8c9a013"
        ));
        assert_eq!(out.to_vec(), expected);
    }

    #[test]
    fn every_input_changes_the_key_material() {
        let client = ClientKeySource::from_bytes(&[7; 112]);
        let base = key_material(&client, &[1; 64], [2; 8], [3; 8]);
        assert_ne!(base, key_material(&client, &[1; 64], [3; 8], [2; 8]));
        let mut server_random = [1; 64];
        server_random[63] = 0;
        assert_ne!(base, key_material(&client, &server_random, [2; 8], [3; 8]));
        let mut source = [7; 112];
        source[0] = 0;
        let other = ClientKeySource::from_bytes(&source);
        assert_ne!(base, key_material(&other, &[1; 64], [2; 8], [3; 8]));
    }
}

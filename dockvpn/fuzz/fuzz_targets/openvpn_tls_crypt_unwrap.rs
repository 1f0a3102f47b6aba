//! Arbitrary bytes into tls-crypt unwrap, raw and validly wrapped, then into a tls-crypt server;
//! the entry point lives in dockvpn (`dockvpn::fuzzing::openvpn_tls_crypt_unwrap`), where an
//! ordinary test replays the corpus.

#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| dockvpn::fuzzing::openvpn_tls_crypt_unwrap(data));

//! Arbitrary bytes into the key-method 2 parser and the peer-info reader; the entry point lives in
//! dockvpn (`dockvpn::fuzzing::openvpn_key_method`), where an ordinary test replays the corpus.

#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| dockvpn::fuzzing::openvpn_key_method(data));

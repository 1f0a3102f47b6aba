//! A TCP stream, fed in pieces, into the deframer; the entry point lives in dockvpn
//! (`dockvpn::fuzzing::openvpn_tcp_deframe`), where an ordinary test replays the corpus.

#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| dockvpn::fuzzing::openvpn_tcp_deframe(data));

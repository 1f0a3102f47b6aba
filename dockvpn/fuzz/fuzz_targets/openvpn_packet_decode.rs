//! Arbitrary bytes into the OpenVPN packet decoder and back through the encoder; the entry point
//! lives in dockvpn (`dockvpn::fuzzing::openvpn_packet_decode`), where an ordinary test replays the
//! corpus.

#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| dockvpn::fuzzing::openvpn_packet_decode(data));

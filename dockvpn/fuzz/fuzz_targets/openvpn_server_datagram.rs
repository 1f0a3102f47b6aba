//! The whole OpenVPN engine fed datagrams from three addresses and timeouts; the entry point lives
//! in dockvpn (`dockvpn::fuzzing::openvpn_server_datagram`), where an ordinary test replays the
//! corpus.

#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| dockvpn::fuzzing::openvpn_server_datagram(data));

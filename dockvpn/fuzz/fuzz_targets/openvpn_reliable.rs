//! A sequence of control packets into the reliability layer and a session's receive path; the entry
//! point lives in dockvpn (`dockvpn::fuzzing::openvpn_reliable`), where an ordinary test replays
//! the corpus.

#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| dockvpn::fuzzing::openvpn_reliable(data));

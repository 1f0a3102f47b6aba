//! The whole WireGuard server engine with two registered clients, fed datagrams from three
//! addresses, floods, an honest client's sealed packets and timeouts; the entry point lives in
//! dockvpn (`dockvpn::fuzzing::wireguard_datagram`), where an ordinary test replays the corpus.

#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| dockvpn::fuzzing::wireguard_datagram(data));

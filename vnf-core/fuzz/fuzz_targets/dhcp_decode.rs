//! Arbitrary bytes into everything that reads DHCP from the network; the entry point lives in
//! vnf-core (`vnf_core::fuzzing::dhcp_decode`), where an ordinary test replays the corpus.

#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| vnf_core::fuzzing::dhcp_decode(data));

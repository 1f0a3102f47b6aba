//! Every committed fuzz corpus file (`fuzz/corpus/<target>/*`) replayed through the entry
//! point its fuzz target calls, so an input that once crashed a target fails CI if the bug
//! comes back. A new target plugs in with one line in `entry_point`.

use dockvpn::fuzzing;

/// The function a fuzz target (`fuzz/fuzz_targets/<target>.rs`) feeds its bytes to.
fn entry_point(target: &str) -> Option<fn(&[u8])> {
    match target {
        "openvpn_packet_decode" => Some(fuzzing::openvpn_packet_decode),
        "openvpn_reliable" => Some(fuzzing::openvpn_reliable),
        "openvpn_key_method" => Some(fuzzing::openvpn_key_method),
        "openvpn_tls_crypt_unwrap" => Some(fuzzing::openvpn_tls_crypt_unwrap),
        "openvpn_server_datagram" => Some(fuzzing::openvpn_server_datagram),
        "openvpn_tcp_deframe" => Some(fuzzing::openvpn_tcp_deframe),
        "wireguard_datagram" => Some(fuzzing::wireguard_datagram),
        _ => None,
    }
}

vnf_core::fuzz_corpus_tests!(entry_point);

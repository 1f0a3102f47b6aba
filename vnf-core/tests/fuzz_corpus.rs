//! Every committed fuzz corpus file (`fuzz/corpus/<target>/*`) replayed through the entry
//! point its fuzz target calls, so an input that once crashed a target fails CI if the bug
//! comes back. A new target plugs in with one line in `entry_point`.

/// The function a fuzz target (`fuzz/fuzz_targets/<target>.rs`) feeds its bytes to.
fn entry_point(target: &str) -> Option<fn(&[u8])> {
    match target {
        "dhcp_decode" => Some(vnf_core::fuzzing::dhcp_decode),
        _ => None,
    }
}

vnf_core::fuzz_corpus_tests!(entry_point);

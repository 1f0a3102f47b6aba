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

#[test]
fn every_corpus_file_replays_through_its_target_without_a_panic() {
    vnf_core::fuzzing::replay_corpus(env!("CARGO_MANIFEST_DIR"), entry_point);
}

#[test]
fn every_fuzz_target_has_an_entry_point_and_a_corpus() {
    vnf_core::fuzzing::check_targets(env!("CARGO_MANIFEST_DIR"), entry_point);
}

//! The entry points of the fuzz targets in `vnf-core/fuzz`: each target only calls its
//! function here, and an ordinary test (`tests/fuzz_corpus.rs`) replays every committed
//! corpus file through the same function (`replay_corpus`, shared with the other crates that
//! have fuzz targets), so a crash found once stays fixed in CI.

use std::net::Ipv4Addr;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::time::Instant;

use ipnet::Ipv4Net;

use crate::dhcp::client::{Client, ClientConfig, Lease};
use crate::dhcp::options::{parse_classless, select_routes, Packet, RouteSource};
use crate::dhcp::socket::udp_payload;

/// Arbitrary bytes into everything that reads DHCP from the network: the IP/UDP unwrapping,
/// the option reader with RFC 3396 concatenation and overload, the RFC 3442 route parser,
/// and the client state machine in the states that accept replies. None may panic.
pub fn dhcp_decode(data: &[u8]) {
    let _ = udp_payload(data, true);
    let _ = udp_payload(data, false);
    let _ = parse_classless(data);
    if let Ok(packet) = Packet::parse(data) {
        let _ = select_routes(&packet);
    }

    let config = ClientConfig {
        mac: [2, 0, 0, 0, 0, 1],
        mtu: 1500,
        hostname: None,
        min_prefix: 8,
    };
    let now = Instant::now();
    let mut selecting = Client::new(config.clone(), 1, now);
    selecting.handle_timeout(now);
    // Make the packet's xid and chaddr match so it reaches the message handling.
    let mut reply = data.to_vec();
    if let (Some(transmit), true) = (selecting.poll_transmit(), reply.len() >= 34) {
        reply[4..8].copy_from_slice(&transmit.payload[4..8]);
        reply[28..34].copy_from_slice(&config.mac);
    }
    let server = Ipv4Addr::new(10, 0, 1, 1);
    let _ = selecting.handle_packet(now, server, &reply);
    while selecting.poll_event().is_some() {}

    let stored = Lease {
        address: Ipv4Net::new_assert(Ipv4Addr::new(10, 0, 1, 2), 24),
        server: Ipv4Addr::new(10, 0, 1, 1),
        routers: vec![],
        dns: vec![],
        routes: vec![],
        route_source: RouteSource::None,
        lease_secs: 3600,
        renew_secs: 1800,
        rebind_secs: 3150,
    };
    let mut rebooting = Client::with_stored_lease(config, 2, now, stored);
    if let (Some(transmit), true) = (rebooting.poll_transmit(), reply.len() >= 34) {
        reply[4..8].copy_from_slice(&transmit.payload[4..8]);
    }
    let _ = rebooting.handle_packet(now, server, &reply);
    while rebooting.poll_event().is_some() {}
}

/// The corpus tests of a crate with fuzz targets (its `tests/fuzz_corpus.rs`), given the
/// function that maps a target's name to its entry point (`EntryPoints`).
#[macro_export]
macro_rules! fuzz_corpus_tests {
    ($entry_point:path) => {
        #[test]
        fn every_corpus_file_replays_through_its_target_without_a_panic() {
            $crate::fuzzing::replay_corpus(env!("CARGO_MANIFEST_DIR"), $entry_point);
        }

        #[test]
        fn every_fuzz_target_has_an_entry_point_and_a_corpus() {
            $crate::fuzzing::check_targets(env!("CARGO_MANIFEST_DIR"), $entry_point);
        }
    };
}

/// The function a fuzz target (`fuzz/fuzz_targets/<target>.rs`) feeds its bytes to, by the
/// target's name; None for a name with no target.
pub type EntryPoints = fn(&str) -> Option<fn(&[u8])>;

/// Replays every committed corpus file (`<crate_dir>/fuzz/corpus/<target>/*`) through the
/// entry point its target calls, for the `fuzz_corpus` test of each crate with fuzz targets.
/// Panics naming every input that panics, and for a corpus directory with no target or no
/// input.
pub fn replay_corpus(crate_dir: &str, entry_point: EntryPoints) {
    let fuzz_dir = Path::new(crate_dir).join("fuzz");
    let mut replayed = 0;
    let mut panicked = Vec::new();
    for corpus in entries(&fuzz_dir.join("corpus")) {
        let target = file_name(&corpus);
        let Some(run) = entry_point(&target) else {
            panic!(
                "{} has no known fuzz target: add `{target:?} => Some(…)` to entry_point in the crate's tests/fuzz_corpus.rs",
                corpus.display()
            );
        };
        let inputs = entries(&corpus);
        assert!(!inputs.is_empty(), "{} holds no input", corpus.display());
        for input in inputs {
            let bytes = std::fs::read(&input)
                .unwrap_or_else(|e| panic!("cannot read {}: {e}", input.display()));
            if catch_unwind(AssertUnwindSafe(|| run(&bytes))).is_err() {
                panicked.push(input.display().to_string());
            }
            replayed += 1;
        }
    }
    assert!(
        replayed > 0,
        "no corpus file found under {}",
        fuzz_dir.display()
    );
    assert!(panicked.is_empty(), "these inputs panic: {panicked:#?}");
}

/// Every `<crate_dir>/fuzz/fuzz_targets/<target>.rs` has an entry point and a committed
/// corpus.
pub fn check_targets(crate_dir: &str, entry_point: EntryPoints) {
    let fuzz_dir = Path::new(crate_dir).join("fuzz");
    for source in entries(&fuzz_dir.join("fuzz_targets")) {
        let target = source
            .file_stem()
            .and_then(|n| n.to_str())
            .unwrap_or_default();
        assert!(
            entry_point(target).is_some(),
            "{} has no entry in entry_point (the crate's tests/fuzz_corpus.rs)",
            source.display()
        );
        assert!(
            fuzz_dir.join("corpus").join(target).is_dir(),
            "fuzz target {target} has no committed corpus (fuzz/corpus/{target})"
        );
    }
}

fn file_name(path: &Path) -> String {
    path.file_name()
        .and_then(|n| n.to_str())
        .unwrap_or_default()
        .to_string()
}

/// The entries of `dir`, sorted; panics naming the directory when unreadable.
fn entries(dir: &Path) -> Vec<PathBuf> {
    let mut paths: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", dir.display()))
        .map(|entry| entry.expect("directory entry").path())
        .collect();
    paths.sort();
    paths
}

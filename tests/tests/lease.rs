//! A DHCP lease applied to a real kernel: address lifetime, proto dhcp routes, off-subnet
//! gateways, renewal by difference, removal.

use docknfv_tests::traffic::ping;
use docknfv_tests::Netns;
use vnf_core::kernel::Kernel;
use vnf_core::lease::{BoundLease, LearnedRoute, LeaseApplier, LeaseTarget};

fn learned(routes: &[(&str, &str)]) -> Vec<LearnedRoute> {
    routes
        .iter()
        .map(|(destination, gateway)| LearnedRoute {
            destination: destination.parse().unwrap(),
            gateway: Some(gateway.parse().unwrap()),
        })
        .collect()
}

/// The seconds left of the address's lifetime in `ip addr` output (it counts down while
/// the test runs, so tests check a range).
fn valid_lft(address: &str) -> u64 {
    address
        .split_once("valid_lft ")
        .and_then(|(_, rest)| rest.split_once("sec"))
        .and_then(|(seconds, _)| seconds.parse().ok())
        .unwrap_or_else(|| panic!("no valid_lft in {address}"))
}

/// A client namespace whose eth0 faces a router at 10.0.1.1 that also answers 10.9.9.1.
fn client_and_router() -> (Netns, Netns, u32) {
    let (client, router) = docknfv_tests::chain::client_and_router();
    router.ip(&["addr", "add", "10.9.9.1/32", "dev", "lan"]);
    router.ip(&["addr", "add", "192.168.10.1/24", "dev", "lo"]);
    router.ip(&[
        "route",
        "add",
        "10.0.1.0/24",
        "dev",
        "lan",
        "src",
        "10.9.9.1",
        "metric",
        "10",
    ]);
    let index = client.link("eth0").index;
    (client, router, index)
}

#[test]
fn a_lease_is_installed_renewed_by_difference_and_removed() {
    let (client, router, index) = client_and_router();
    let target = LeaseTarget {
        interface: index,
        table: 254,
        install_default: false,
    };
    let first = BoundLease {
        address: "10.0.1.2/24".parse().unwrap(),
        valid_secs: 60,
        routes: learned(&[
            ("0.0.0.0/0", "10.0.1.1"),
            ("192.168.10.0/24", "10.0.1.1"),
            ("172.16.0.0/12", "10.9.9.1"),
        ]),
    };
    let renewed = BoundLease {
        valid_secs: 120,
        routes: learned(&[
            ("0.0.0.0/0", "10.0.1.1"),
            ("192.168.10.0/24", "10.0.1.1"),
            ("10.20.0.0/16", "10.0.1.1"),
        ]),
        ..first.clone()
    };

    let (installed, renewal, removal) = client.block_on(async {
        let mut applier = LeaseApplier::new(Kernel::connect().unwrap(), target);
        let installed = applier.apply(&first).await.expect("apply lease");
        let address = client.ip(&["-4", "addr", "show", "dev", "eth0"]);
        assert!(address.contains("inet 10.0.1.2/24"), "{address}");
        assert!((50..=60).contains(&valid_lft(&address)), "{address}");
        let routes = client.ip(&["route", "show", "proto", "dhcp"]);
        assert_eq!(
            routes,
            "10.9.9.1 dev eth0 scope link src 10.0.1.2 \n172.16.0.0/12 via 10.9.9.1 dev eth0 \n192.168.10.0/24 via 10.0.1.1 dev eth0 \n",
            "the left default stays out; the off-subnet gateway gets its link route"
        );
        assert!(ping(&client, "192.168.10.1"), "traffic follows the learned route");

        let renewal = applier.apply(&renewed).await.expect("renew lease");
        let address = client.ip(&["-4", "addr", "show", "dev", "eth0"]);
        assert!((110..=120).contains(&valid_lft(&address)), "{address}");
        let removal = applier.remove().await.expect("remove lease");
        (installed, renewal, removal)
    });
    assert_eq!(installed.added.routes.len(), 3);
    let added: Vec<String> = renewal
        .added
        .routes
        .iter()
        .map(|r| r.destination.to_string())
        .collect();
    let removed: Vec<String> = renewal
        .removed
        .routes
        .iter()
        .map(|r| r.destination.to_string())
        .collect();
    assert_eq!(added, ["10.20.0.0/16"], "only the new route is added");
    assert_eq!(
        removed,
        ["10.9.9.1/32", "172.16.0.0/12"],
        "only the dropped route and its link route go"
    );
    assert_eq!(removal.removed.routes.len(), 2);
    assert_eq!(client.ip(&["route", "show", "proto", "dhcp"]), "");
    assert!(!client
        .ip(&["-4", "addr", "show", "dev", "eth0"])
        .contains("10.0.1.2"));
    drop(router);
}

#[test]
fn a_lease_in_a_side_table_keeps_its_default_route() {
    let (client, _router, index) = client_and_router();
    let target = LeaseTarget {
        interface: index,
        table: 1001,
        install_default: true,
    };
    let lease = BoundLease {
        address: "10.0.1.2/24".parse().unwrap(),
        valid_secs: 300,
        routes: learned(&[("0.0.0.0/0", "10.0.1.1")]),
    };
    client.block_on(async {
        let mut applier = LeaseApplier::new(Kernel::connect().unwrap(), target);
        applier.apply(&lease).await.expect("apply lease");
        // Applying the same lease again changes nothing.
        assert!(applier.apply(&lease).await.expect("again").is_empty());
    });
    assert_eq!(
        client.ip(&["route", "show", "table", "1001"]),
        "default via 10.0.1.1 dev eth0 proto dhcp \n"
    );
}

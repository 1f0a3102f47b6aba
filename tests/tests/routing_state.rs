//! vnf-core's routing reconciler against a real kernel: what it installs reads back exactly
//! (through our parser and through iproute2), applying twice is a no-op, teardown restores
//! the namespace, and global mode routes as declared.

use docknfv_tests::chain::{LEFT_GATEWAY, LEFT_HOST, LEFT_HOST_NET, RIGHT_GATEWAY, RIGHT_HOST};
use docknfv_tests::traffic::ping;
use docknfv_tests::Chain;
use vnf_core::kernel::Kernel;
use vnf_core::routing::{
    desired_state, Reconciler, RoutingConfig, RoutingMode, RoutingState, TableId,
};
use vnf_core::side::{assign, SideSelectors};

/// Assigns sides in the current namespace and builds the desired state for `config`.
async fn desired(config: &RoutingConfig) -> (Kernel, RoutingState) {
    let kernel = Kernel::connect().expect("netlink");
    let interfaces = kernel.interfaces().await.expect("dump interfaces");
    let assignment = assign(&SideSelectors::default(), &interfaces).expect("assign sides");
    let state = desired_state(config, &assignment).expect("desired state");
    (kernel, state)
}

fn cross_config(left: u32, right: u32) -> RoutingConfig {
    RoutingConfig {
        left_table: TableId::new(left).unwrap(),
        right_table: TableId::new(right).unwrap(),
        ..RoutingConfig::new(RoutingMode::Cross)
    }
}

#[test]
fn cross_state_reads_back_exactly_and_applying_twice_changes_nothing() {
    let chain = Chain::new();
    let found = chain.si.routing_snapshot();
    // A table id above 255 exercises the attribute path (the header says 252).
    let config = cross_config(100_000, 7);

    let (first, second, read_back, want) = chain.si.block_on(async {
        let (kernel, want) = desired(&config).await;
        let mut reconciler = Reconciler::new(kernel);
        let first = reconciler.apply(&want).await.expect("first apply");
        let second = reconciler.apply(&want).await.expect("second apply");
        let read_back = reconciler.current().await.expect("read back");
        (first, second, read_back, want)
    });
    assert_eq!(want.routes.len(), 4);
    assert_eq!(want.rules.len(), 4);
    assert_eq!(
        first.added, want,
        "first apply adds exactly the desired state"
    );
    assert!(second.is_empty(), "second apply changed: {second}");
    assert_eq!(read_back, want);

    // Cross-check with iproute2, the tool an operator would use.
    let rules = chain.si.ip(&["-4", "rule", "show"]);
    assert!(
        rules.contains("1000:\tfrom all iif eth0 lookup 7 proto 245"),
        "{rules}"
    );
    assert!(
        rules.contains("1001:\tfrom all iif eth1 lookup 100000 proto 245"),
        "{rules}"
    );
    let left_table = chain.si.ip(&["route", "show", "table", "100000"]);
    assert_eq!(
        left_table,
        "default via 10.0.1.1 dev eth0 proto 245 \n10.0.1.0/24 dev eth0 proto 245 scope link src 10.0.1.2 \n"
    );
    let right_table = chain.si.ip(&["route", "show", "table", "7"]);
    assert_eq!(
        right_table,
        "default via 10.0.2.1 dev eth1 proto 245 \n10.0.2.0/24 dev eth1 proto 245 scope link src 10.0.2.2 \n"
    );
    // Lookups through the rules work (a rule without ToTable would fail them with EINVAL).
    chain.si.set_sysctl("net.ipv4.ip_forward", 1);
    let lookup = chain
        .si
        .ip(&["route", "get", RIGHT_HOST, "from", LEFT_HOST, "iif", "eth0"]);
    assert!(
        lookup.contains(&format!("via {RIGHT_GATEWAY} dev eth1 table 7")),
        "{lookup}"
    );

    let removed = chain.si.block_on(async {
        let mut reconciler = Reconciler::new(Kernel::connect().expect("netlink"));
        reconciler.teardown().await.expect("teardown")
    });
    assert_eq!(removed.removed, want);
    assert_eq!(chain.si.routing_snapshot(), found, "teardown left traces");
}

#[test]
fn teardown_removes_only_what_carries_our_tag() {
    let chain = Chain::new();
    // Foreign state in the same tables and priority range must survive.
    chain.si.ip(&[
        "route",
        "add",
        "172.16.0.0/16",
        "via",
        LEFT_GATEWAY,
        "table",
        "1001",
    ]);
    chain.si.ip(&[
        "rule",
        "add",
        "priority",
        "1005",
        "from",
        "172.16.0.0/16",
        "lookup",
        "1001",
    ]);
    let found = chain.si.routing_snapshot();

    let (applied, want, while_applied) = chain.si.block_on(async {
        let (kernel, want) = desired(&cross_config(1001, 1002)).await;
        let mut reconciler = Reconciler::new(kernel);
        let applied = reconciler.apply(&want).await.expect("apply");
        let while_applied = chain.si.routing_snapshot();
        reconciler.teardown().await.expect("teardown");
        (applied, want, while_applied)
    });
    assert_eq!(applied.added, want, "apply installed the desired state");
    assert_ne!(while_applied, found, "apply changed nothing in the kernel");
    assert_eq!(chain.si.routing_snapshot(), found);
}

#[test]
fn stale_state_from_a_killed_run_is_replaced() {
    let chain = Chain::new();
    // What a previous run with other table ids left behind after `kill -9`.
    chain.si.block_on(async {
        let (kernel, old) = desired(&cross_config(2001, 2002)).await;
        Reconciler::new(kernel)
            .apply(&old)
            .await
            .expect("old apply");
    });
    let (changes, read_back, want) = chain.si.block_on(async {
        let (kernel, want) = desired(&cross_config(1001, 1002)).await;
        let mut reconciler = Reconciler::new(kernel);
        let changes = reconciler.apply(&want).await.expect("apply");
        (
            changes,
            reconciler.current().await.expect("read back"),
            want,
        )
    });
    assert_eq!(changes.removed.routes.len(), 4, "{changes}");
    assert_eq!(changes.removed.rules.len(), 4, "{changes}");
    assert_eq!(read_back, want);
    assert_eq!(chain.si.ip(&["route", "show", "table", "2001"]), "");
}

#[test]
fn global_mode_sends_default_right_and_left_networks_left() {
    let chain = Chain::new();
    // Docker puts the default route on the first network; global mode takes it over.
    chain
        .si
        .ip(&["route", "add", "default", "via", LEFT_GATEWAY]);
    chain.si.set_sysctl("net.ipv4.ip_forward", 1);
    let config = RoutingConfig {
        left_routes: vec![LEFT_HOST_NET.parse().unwrap()],
        ..RoutingConfig::new(RoutingMode::Global)
    };

    let second = chain.si.block_on(async {
        let (kernel, want) = desired(&config).await;
        let mut reconciler = Reconciler::new(kernel);
        reconciler.apply(&want).await.expect("apply");
        reconciler.apply(&want).await.expect("second apply")
    });
    assert!(second.is_empty(), "{second}");
    let main = chain.si.ip(&["route", "show", "table", "main"]);
    assert!(
        main.contains(&format!("default via {RIGHT_GATEWAY} dev eth1 proto 245")),
        "{main}"
    );
    assert!(
        main.contains(&format!(
            "{LEFT_HOST_NET} via {LEFT_GATEWAY} dev eth0 proto 245"
        )),
        "{main}"
    );
    assert!(
        !main.contains(&format!("default via {LEFT_GATEWAY}")),
        "{main}"
    );
    assert!(
        ping(&chain.si, LEFT_HOST),
        "the SI cannot reach the left host network"
    );
    assert!(
        ping(&chain.si, RIGHT_HOST),
        "the SI cannot reach the right host via its default"
    );
}

#[test]
fn global_mode_restores_the_displaced_default_at_teardown() {
    let chain = Chain::new();
    chain
        .si
        .ip(&["route", "add", "default", "via", LEFT_GATEWAY]);
    let found = chain.si.routing_snapshot();
    let (applied, want, main) = chain.si.block_on(async {
        let (kernel, want) = desired(&RoutingConfig::new(RoutingMode::Global)).await;
        let mut reconciler = Reconciler::new(kernel);
        let applied = reconciler.apply(&want).await.expect("apply");
        let main = chain.si.ip(&["route", "show", "table", "main"]);
        reconciler.teardown().await.expect("teardown");
        (applied, want, main)
    });
    assert_eq!(applied.added, want, "apply installed the desired state");
    assert!(
        main.contains(&format!("default via {RIGHT_GATEWAY} dev eth1 proto 245"))
            && !main.contains(&format!("default via {LEFT_GATEWAY}")),
        "apply did not displace the left default:\n{main}"
    );
    assert_eq!(chain.si.routing_snapshot(), found);
}

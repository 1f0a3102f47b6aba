//! `dockwall ufw …` in the namespace chain: ufw's words block real traffic across the SI and
//! `ufw delete` opens it again.

use docknfv_tests::chain::{LEFT_HOST, RIGHT_HOST};
use docknfv_tests::dockwall::Dockwall;
use docknfv_tests::traffic::{ping, ping_eventually, tcp, Probe};
use docknfv_tests::Chain;

#[test]
fn ufw_route_deny_icmp_blocks_ping_left_to_right_until_deleted() {
    let chain = Chain::new();
    let dockwall = Dockwall::start(&chain);
    assert!(
        ping_eventually(&chain.left_host, RIGHT_HOST, 3),
        "no rules: ping crosses the SI"
    );

    // The SI's legs in the chain: eth0 is the left side, eth1 the right one.
    let rule = [
        "route", "deny", "in", "on", "eth0", "out", "on", "eth1", "proto", "icmp",
    ];
    let add = [&["ufw"][..], &rule].concat();
    assert_eq!(dockwall.ok(&add), "Rule added\n");
    assert_eq!(dockwall.ok(&add), "Skipping adding existing rule\n");
    assert!(
        !ping(&chain.left_host, RIGHT_HOST),
        "ICMP left→right is denied"
    );
    assert!(
        ping(&chain.right_host, LEFT_HOST),
        "right→left is another direction"
    );
    assert_eq!(
        tcp(&chain.left_host, &chain.right_host, RIGHT_HOST, 7401),
        Probe::Passed,
        "TCP left→right still passes"
    );

    dockwall.ok(&["ufw", "allow", "22/tcp"]);
    assert_eq!(
        dockwall.ok(&["ufw", "status", "numbered"]),
        "Status: active

     To                         Action      From
     --                         ------      ----
[ 1] Anywhere/icmp on eth1      DENY FWD    Anywhere on eth0
[ 2] 22/tcp                     ALLOW IN    Anywhere
"
    );
    let status: serde_json::Value =
        serde_json::from_str(&dockwall.ok(&["ufw", "status", "--json"])).unwrap();
    assert_eq!(status["status"], "active");
    assert_eq!(
        status["rules"][0]["ufw"],
        "route deny in on eth0 out on eth1 proto icmp"
    );
    assert_eq!(status["rules"][0]["rule"]["direction"], "left-to-right");
    assert_eq!(status["rules"][1]["rule"]["direction"], "local");
    assert_eq!(
        dockwall.ok(&["ufw", "enable"]),
        "Firewall is active and enabled on system startup\n"
    );
    assert_eq!(dockwall.ok(&["ufw", "reload"]), "Firewall reloaded\n");
    assert!(
        !ping(&chain.left_host, RIGHT_HOST),
        "reloaded, the rule still blocks"
    );

    let delete = [&["ufw", "route", "delete"][..], &rule[1..]].concat();
    assert_eq!(dockwall.ok(&delete), "Rule deleted\n");
    assert!(
        ping(&chain.left_host, RIGHT_HOST),
        "deleted with the words it was added with, the rule no longer blocks"
    );
    let again = dockwall.cli(&delete);
    assert!(!again.status.success(), "deleting it twice fails");
    assert!(
        String::from_utf8_lossy(&again.stderr).contains("Could not delete non-existent rule"),
        "{}",
        String::from_utf8_lossy(&again.stderr)
    );

    // By number, as `status numbered` shows it.
    dockwall.ok(&add);
    assert!(!ping(&chain.left_host, RIGHT_HOST));
    assert_eq!(
        dockwall.ok(&["ufw", "delete", "2"]),
        "Deleting:\n route deny in on eth0 out on eth1 proto icmp\nRule deleted\n"
    );
    assert!(ping(&chain.left_host, RIGHT_HOST));
    assert_eq!(
        dockwall.ok(&["ufw", "status"]),
        "Status: active

To                         Action      From
--                         ------      ----
22/tcp                     ALLOW       Anywhere
"
    );

    // Another action for the same traffic replaces the rule in place, as in ufw.
    assert_eq!(dockwall.ok(&["ufw", "deny", "22/tcp"]), "Rule updated\n");
    let status: serde_json::Value =
        serde_json::from_str(&dockwall.ok(&["ufw", "status", "--json"])).unwrap();
    assert_eq!(status["rules"].as_array().map(Vec::len), Some(1));
    assert_eq!(status["rules"][0]["ufw"], "deny 22/tcp");
    // Only the tcp half exists: `delete deny 22` (tcp and udp) deletes nothing.
    let partial = dockwall.cli(&["ufw", "delete", "deny", "22"]);
    assert!(
        !partial.status.success(),
        "a line's rules are deleted all or none"
    );
    let after: serde_json::Value =
        serde_json::from_str(&dockwall.ok(&["ufw", "status", "--json"])).unwrap();
    assert_eq!(after, status, "nothing deleted");
    let reloaded: serde_json::Value =
        serde_json::from_str(&dockwall.ok(&["ufw", "reload", "--json"])).unwrap();
    assert_eq!(reloaded["result"], "Firewall reloaded");
    let dry = dockwall.cli(&["ufw", "enable", "--dry-run"]);
    assert!(
        String::from_utf8_lossy(&dry.stderr).contains("only edits"),
        "{}",
        String::from_utf8_lossy(&dry.stderr)
    );
}

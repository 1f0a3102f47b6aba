//! The table test: ufw command lines → the Dockwall rules they make, or the refusal.

use vnf_core::firewall::{Policy, RuleSet};

use super::grammar::{read, SideNames, StatusView, UfwCommand};
use super::{add, delete, status, Added};
use crate::commands::describe;

fn sides() -> SideNames {
    SideNames {
        left: Some("eth0".into()),
        right: Some("eth1".into()),
        mgmt: Some("eth2".into()),
    }
}

fn command(line: &str) -> vnf_core::Result<UfwCommand> {
    let words: Vec<String> = line.split_whitespace().map(str::to_owned).collect();
    read(&words)?.resolve(&sides())
}

/// The rules a line adds, as `dockwall rule list` describes them, joined by " | ".
fn added(line: &str) -> String {
    match command(line) {
        Ok(UfwCommand::Add { rules, at: None }) => {
            rules.iter().map(describe).collect::<Vec<_>>().join(" | ")
        }
        other => panic!("{line}: {other:?}"),
    }
}

#[test]
fn ufw_lines_make_these_rules() {
    let table = [
        ("allow 22/tcp", "allow local proto tcp dport 22"),
        (
            "allow 22",
            "allow local proto tcp dport 22 | allow local proto udp dport 22",
        ),
        ("rule deny 53/udp", "deny local proto udp dport 53"),
        ("allow ssh", "allow local proto tcp dport 22"),
        ("allow http", "allow local proto tcp dport 80"),
        ("allow https", "allow local proto tcp dport 443"),
        (
            "reject 8000:8100/tcp",
            "reject local proto tcp dport 8000:8100",
        ),
        (
            "allow 80,443/tcp",
            "allow local proto tcp dport 80 | allow local proto tcp dport 443",
        ),
        (
            "limit 22/tcp",
            "limit local rate 12/minute proto tcp dport 22",
        ),
        (
            "allow from 10.0.0.0/8 to any port 22 proto tcp",
            "allow local proto tcp from 10.0.0.0/8 dport 22",
        ),
        (
            "deny from 203.0.113.7",
            "deny local proto any from 203.0.113.7/32",
        ),
        (
            "allow proto udp from 10.0.0.0/8 port 53 to 192.0.2.1",
            "allow local proto udp from 10.0.0.0/8 to 192.0.2.1/32 sport 53",
        ),
        (
            "deny log from 198.51.100.0/24 to any port 25 proto tcp comment no-mail",
            "deny local proto tcp from 198.51.100.0/24 dport 25 comment no-mail log",
        ),
        (
            "allow in from 192.0.2.0/24 to any port 22 proto tcp",
            "allow local proto tcp from 192.0.2.0/24 dport 22",
        ),
        (
            "allow from fd00::/64 to any port 22 proto tcp",
            "allow local proto tcp from fd00::/64 dport 22",
        ),
        (
            "allow proto ipv6 from 192.0.2.9",
            "allow local proto 41 from 192.0.2.9/32",
        ),
        (
            "route allow in on eth1 out on eth0 to 10.0.0.0/24 port 80 proto tcp",
            "allow right-to-left proto tcp to 10.0.0.0/24 dport 80",
        ),
        (
            "route deny in on eth0 out on eth1 proto icmp",
            "deny left-to-right proto icmp",
        ),
        (
            "route deny in on left proto icmp",
            "deny left-to-right proto icmp",
        ),
        (
            "route deny out on right proto icmp",
            "deny left-to-right proto icmp",
        ),
        (
            "route reject out on eth0 from any to 192.168.10.0/24",
            "reject right-to-left proto any to 192.168.10.0/24",
        ),
        ("route allow proto gre", "allow both proto 47"),
        (
            "route limit in on eth0 to any port 22 proto tcp",
            "limit left-to-right rate 12/minute proto tcp dport 22",
        ),
        (
            "route deny 25",
            "deny both proto tcp dport 25 | deny both proto udp dport 25",
        ),
    ];
    for (line, rules) in table {
        assert_eq!(added(line), rules, "{line}");
    }
}

#[test]
fn ufw_commands_other_than_add() {
    let table = [
        ("status", UfwCommand::Status(StatusView::Plain)),
        ("status numbered", UfwCommand::Status(StatusView::Numbered)),
        ("status verbose", UfwCommand::Status(StatusView::Verbose)),
        (
            "default deny routed",
            UfwCommand::DefaultRouted(Policy::Drop),
        ),
        (
            "default allow routed",
            UfwCommand::DefaultRouted(Policy::Accept),
        ),
        ("delete 3", UfwCommand::DeleteNumber(3)),
        ("route delete 3", UfwCommand::DeleteNumber(3)),
        ("enable", UfwCommand::Enable),
        ("reload", UfwCommand::Reload),
    ];
    for (line, expected) in table {
        assert_eq!(command(line).unwrap(), expected, "{line}");
    }
    let rules_of = |line: &str| match command(line).unwrap() {
        UfwCommand::Add { rules, .. } | UfwCommand::Delete(rules) => rules,
        other => panic!("{line}: {other:?}"),
    };
    for (line, at) in [
        ("insert 2 deny from 10.1.0.0/16", Some(2)),
        ("prepend deny from 10.1.0.0/16", Some(1)),
        ("route insert 1 deny in on eth0 from 10.1.0.0/16", Some(1)),
    ] {
        assert!(
            matches!(command(line).unwrap(), UfwCommand::Add { at: got, .. } if got == at),
            "{line}"
        );
    }
    // `delete <rule>` makes the rules the same words add.
    for line in ["allow 22", "route deny in on eth0 out on eth1 proto icmp"] {
        let deleted = if let Some(route) = line.strip_prefix("route ") {
            format!("route delete {route}")
        } else {
            format!("delete {line}")
        };
        assert!(matches!(command(&deleted).unwrap(), UfwCommand::Delete(_)));
        assert_eq!(rules_of(&deleted), rules_of(line), "{deleted}");
    }
}

#[test]
fn what_the_model_lacks_is_refused_by_name() {
    let table = [
        ("", "give one"),
        ("frobnicate", "expected allow"),
        ("allow OpenSSH", "application profiles"),
        ("allow from any app OpenSSH", "application profiles"),
        ("allow smtp", "other service names"),
        (
            "allow in on eth0 to any port 22 proto tcp",
            "match every interface",
        ),
        ("allow out 25/tcp", "outgoing traffic"),
        ("deny log-all 22/tcp", "log-all"),
        ("route allow in on eth9", "\"eth9\": is not a side"),
        ("route allow in on eth2", "management interface"),
        ("route allow in on eth0 out on left", "same side"),
        ("route allow in eth0", "route rules name the interface"),
        ("route allow in on eth0 in on eth1", "given twice"),
        ("default reject routed", "accepts or drops"),
        ("default deny", "only routed traffic"),
        ("default allow outgoing", "outgoing traffic"),
        ("default deny sideways", "use `routed`"),
        ("disable", "no off switch"),
        ("logging on", "not supported by Dockwall"),
        ("app list", "not supported by Dockwall"),
        ("status loud", "status numbered"),
        ("allow 70000/tcp", "outside 1-65535"),
        ("allow 22/icmp", "needs protocol tcp"),
        ("allow 22/tpc", "unknown protocol name"),
        ("deny from any", "cut management off"),
        ("allow from 10.0.0.300", "not an IP address"),
        (
            "allow from 10.0.0.0/8 to fd00::1",
            "both be IPv4 or both IPv6",
        ),
        (
            "allow 22/tcp from 10.0.0.0/8",
            "\"from\": PORT[/PROTO] is ufw's short form",
        ),
        (
            "allow 53 proto udp",
            "\"proto\": PORT[/PROTO] is ufw's short form",
        ),
        (
            "allow 53/udp to any",
            "\"to\": PORT[/PROTO] is ufw's short form",
        ),
        (
            "allow proto udp 53",
            "\"53\": PORT[/PROTO] is ufw's short form",
        ),
        (
            "allow out on eth0 to any port 22 proto tcp",
            "\"out\": Dockwall does not filter the SI's own outgoing traffic",
        ),
        (
            "allow 8000:8100",
            "\"8000:8100\": Must specify 'tcp' or 'udp'",
        ),
        ("allow 80,443", "\"80,443\": Must specify 'tcp' or 'udp'"),
        ("allow to any port 80,443", "Must specify 'tcp' or 'udp'"),
        (
            "route allow from 10.0.0.0/8 port 1000:2000",
            "Must specify 'tcp' or 'udp'",
        ),
        ("allow 22/", "after the slash"),
        (
            "allow to any port 22/tcp proto udp",
            "\"22/tcp\": after `port` the protocol goes in `proto`",
        ),
        (
            "allow from any port 53/udp to any port 53/tcp",
            "\"53/udp\": after `port`",
        ),
        ("allow 22/tcp 23/tcp", "unexpected word"),
        ("allow port 22", "follows an address"),
        ("allow proto tcp proto udp", "given twice"),
        ("allow from", "must follow"),
        ("insert 0 allow 22/tcp", "rule number"),
        ("insert", "must follow"),
        ("delete 0", "start at 1"),
        (
            "delete 99999999999999999999",
            "Could not find a rule with this number",
        ),
        (
            "delete insert 2 allow 22/tcp",
            "\"insert\": delete and insert do not go together",
        ),
        (
            "delete prepend allow 22/tcp",
            "\"prepend\": delete and prepend do not go together",
        ),
        (
            "allow 1,2,3,4,5,6,7,8,9,10,11,12,13,14,15,16/tcp",
            "at most 15",
        ),
        (
            "allow 1:2,3:4,5:6,7:8,9:10,11:12,13:14,15:16/tcp",
            "a range counting as 2",
        ),
    ];
    for (line, needle) in table {
        let error = command(line).expect_err(line).to_string();
        assert!(error.contains(needle), "{line}: {error}");
    }
    // Ranges count 2 toward ufw's 15: seven ranges and a port are 15.
    assert!(command("allow 1:2,3:4,5:6,7:8,9:10,11:12,13:14,15/tcp").is_ok());
    let empty = read(&["delete".to_owned(), String::new()])
        .unwrap_err()
        .to_string();
    assert!(empty.contains("delete takes a rule number"), "{empty}");
}

#[test]
fn reading_needs_no_sides() {
    let words: Vec<String> = ["route", "allow", "in", "on", "eth9"]
        .map(str::to_owned)
        .to_vec();
    let read = read(&words).expect("the words alone are right");
    let error = read.resolve(&sides()).unwrap_err().to_string();
    assert!(error.contains("\"eth9\": is not a side"), "{error}");
}

#[test]
fn only_edits_have_a_dry_run() {
    for (line, edits) in [
        ("allow 22/tcp", true),
        ("delete allow 22/tcp", true),
        ("delete 1", true),
        ("default deny routed", true),
        ("status", false),
        ("enable", false),
        ("reload", false),
    ] {
        assert_eq!(command(line).unwrap().edits(), edits, "{line}");
    }
}

#[test]
fn a_rules_ufw_words_make_the_same_rule() {
    let lines = [
        "allow 22/tcp",
        "limit 22/tcp",
        "deny log from 198.51.100.0/24 to any port 25 proto tcp",
        "allow proto udp from 10.0.0.0/8 port 53 to 192.0.2.1",
        "route allow in on eth1 out on eth0 to 10.0.0.0/24 port 80 proto tcp",
        "route deny in on eth0 out on eth1 proto icmp",
        "route reject proto gre",
        "route insert 1 reject from 198.51.100.7",
        "allow from fd00::/64 to fd00::1 port 22 proto tcp",
    ];
    for line in lines {
        let UfwCommand::Add { rules, .. } = command(line).unwrap() else {
            panic!("{line}")
        };
        for rule in rules {
            let words = status::words(&rule, &sides());
            let UfwCommand::Add { rules: again, .. } = command(&words).unwrap() else {
                panic!("{words}")
            };
            assert_eq!(again, vec![rule], "{line} → {words}");
        }
    }
}

fn rules(line: &str) -> Vec<vnf_core::firewall::Rule> {
    match command(line).unwrap() {
        UfwCommand::Add { rules, .. } | UfwCommand::Delete(rules) => rules,
        other => panic!("{line}: {other:?}"),
    }
}

#[test]
fn a_new_action_log_or_limit_updates_the_rule_in_place() {
    let mut set = rule_set(&["allow 22/tcp comment ssh", "deny 53/udp"]);
    let id = set.rules[0].id;
    // (line, updated, what rule 1 then is)
    let table = [
        (
            "deny 22/tcp",
            1,
            "deny local proto tcp dport 22 comment ssh",
        ),
        (
            "deny 22/tcp",
            0,
            "deny local proto tcp dport 22 comment ssh",
        ),
        (
            "limit 22/tcp",
            1,
            "limit local rate 12/minute proto tcp dport 22 comment ssh",
        ),
        (
            "allow log 22/tcp",
            1,
            "allow local proto tcp dport 22 comment ssh log",
        ),
        (
            "allow 22/tcp comment admins",
            1,
            "allow local proto tcp dport 22 comment admins",
        ),
        (
            "insert 2 reject 22/tcp",
            1,
            "reject local proto tcp dport 22 comment admins",
        ),
    ];
    for (line, updated, rule) in table {
        let UfwCommand::Add { rules, at } = command(line).unwrap() else {
            panic!("{line}")
        };
        let added = add(&mut set, rules, at).unwrap();
        assert_eq!(
            added,
            Added {
                ids: vec![],
                updated
            },
            "{line}"
        );
        assert_eq!(set.rules.len(), 2, "{line}: replaced, not appended");
        assert_eq!(describe(&set.rules[0]), rule, "{line}");
        assert_eq!(set.rules[0].id, id, "{line}: the rule keeps its id");
    }
    // A disabled rule added again is enabled again.
    set.rules[1].enabled = false;
    let added = add(&mut set, rules("deny 53/udp"), None).unwrap();
    assert_eq!(added.updated, 1);
    assert!(set.rules[1].enabled);
    assert_eq!(
        add(&mut set, rules("deny 53/udp"), None).unwrap(),
        Added::default()
    );
}

#[test]
fn delete_needs_every_rule_of_the_line() {
    let mut set = rule_set(&["allow 22/tcp"]);
    for line in [
        "delete allow 22",
        "delete deny 22/tcp",
        "delete allow log 22/tcp",
    ] {
        let error = delete(&mut set, &rules(line), line)
            .unwrap_err()
            .to_string();
        assert!(
            error.contains("Could not delete non-existent rule"),
            "{line}: {error}"
        );
        assert_eq!(set.rules.len(), 1, "{line}: nothing deleted");
    }
    let id = set.rules[0].id;
    assert_eq!(
        delete(&mut set, &rules("delete allow 22/tcp"), "").unwrap(),
        vec![id]
    );
    let mut set = rule_set(&["allow 22", "deny 53/udp"]);
    let both = delete(&mut set, &rules("delete allow 22"), "").unwrap();
    assert_eq!(both.len(), 2);
    assert_eq!(describe(&set.rules[0]), "deny local proto udp dport 53");
}

#[test]
fn a_comment_with_a_quote_is_quoted_for_the_shell() {
    let mut rule = rules("allow 22/tcp").remove(0);
    rule.comment = Some("bob's".into());
    assert_eq!(
        status::words(&rule, &sides()),
        r"allow 22/tcp comment 'bob'\''s'"
    );
}

fn rule_set(lines: &[&str]) -> RuleSet {
    let mut set = RuleSet::default();
    for line in lines {
        let UfwCommand::Add { rules, at } = command(line).unwrap() else {
            panic!("{line}")
        };
        add(&mut set, rules, at).unwrap();
    }
    set
}

#[test]
fn existing_rules_are_skipped_and_positions_checked() {
    let mut set = rule_set(&["allow 22/tcp", "route deny in on eth0 proto icmp"]);
    let UfwCommand::Add { rules, at } = command("allow 22").unwrap() else {
        panic!()
    };
    let added = add(&mut set, rules.clone(), at).unwrap();
    assert_eq!(added.ids.len(), 1, "22/tcp exists, 22/udp is new");
    assert_eq!(add(&mut set, rules.clone(), at).unwrap(), Added::default());
    let UfwCommand::Add {
        rules: commented, ..
    } = command("allow 22/tcp comment ssh").unwrap()
    else {
        panic!()
    };
    assert_eq!(
        add(&mut set, commented, None).unwrap(),
        Added {
            ids: vec![],
            updated: 1
        },
        "a new comment updates the existing rule"
    );
    assert_eq!(set.rules[0].comment.as_deref(), Some("ssh"));
    let error = add(&mut set, rules, Some(5)).unwrap_err().to_string();
    assert!(error.contains("Invalid position '5': use 1-4"), "{error}");
    let UfwCommand::Add { rules, at } = command("insert 1 deny from 10.9.0.0/16").unwrap() else {
        panic!()
    };
    add(&mut set, rules, at).unwrap();
    assert_eq!(set.rules[0].source.unwrap().to_string(), "10.9.0.0/16");
}

#[test]
fn status_prints_ufws_table() {
    let mut set = rule_set(&[
        "allow 22/tcp",
        "route deny in on eth0 out on eth1 proto icmp",
        "limit from 10.0.0.0/8 to any port 22 proto tcp comment admins",
        "route allow to 192.0.2.0/24 port 443 proto tcp",
        "route insert 1 reject from 198.51.100.7",
    ]);
    set.default_policy = Policy::Drop;
    let rows: Vec<_> = set
        .rules
        .iter()
        .enumerate()
        .map(|(index, rule)| status::row(rule, index + 1, &sides(), StatusView::Numbered))
        .collect();
    assert_eq!(
        status::render(
            true,
            &status::routed_word(&set),
            &rows,
            StatusView::Numbered
        ),
        "Status: active

     To                         Action      From
     --                         ------      ----
[ 1] Anywhere                   REJECT FWD  198.51.100.7
[ 2] 22/tcp                     ALLOW IN    Anywhere
[ 3] Anywhere/icmp on eth1      DENY FWD    Anywhere on eth0
[ 4] 22/tcp                     LIMIT IN    10.0.0.0/8  # admins
[ 5] 192.0.2.0/24 443/tcp       ALLOW FWD   Anywhere
"
    );
    let plain: Vec<_> = set
        .rules
        .iter()
        .skip(1)
        .take(1)
        .map(|rule| status::row(rule, 1, &sides(), StatusView::Verbose))
        .collect();
    assert_eq!(
        status::render(false, &status::routed_word(&set), &plain, StatusView::Verbose),
        "Status: inactive (no `dockwall run` in this network namespace; the rules below apply when it starts)
Default: allow (incoming), allow (outgoing), deny (routed)

To                         Action      From
--                         ------      ----
22/tcp                     ALLOW IN    Anywhere
"
    );
    assert_eq!(
        status::render(true, "allow", &[], StatusView::Plain),
        "Status: active\n"
    );
}

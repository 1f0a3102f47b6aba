//! The service modes of OpenContrail / Tungsten Fabric service chains, and what each adds to
//! the compiled table. `in-network` is Dockwall's original behaviour and adds nothing.

use std::fmt;

use nftables::expr::{Expression, MetaKey, Range};
use nftables::stmt::Statement;
use serde::{Deserialize, Serialize};

use super::compile::{
    counter, direction_jumps, dnatted, jump_between, matches, meta, payload, rule, string, Sides,
    CHAIN_FROM_LEFT, CHAIN_FROM_RIGHT,
};
use crate::routing::{LEFT_INGRESS_MARK, RIGHT_INGRESS_MARK};
use nftables::schema::Rule as NftRule;

/// How the SI sits between its two networks.
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize, clap::ValueEnum,
)]
#[serde(rename_all = "kebab-case")]
pub enum ServiceMode {
    /// Routes between the sides with a table per side (cross mode); both networks route each
    /// other's prefixes via the SI.
    #[default]
    InNetwork,
    /// Routes like in-network, and masquerades left traffic leaving the right side, so the
    /// right network needs no route back; right-initiated connections reach the left only
    /// through `dockwall nat add dnat` rules.
    InNetworkNat,
    /// A bump in the wire: one IP subnet on both sides, bridged by the SI, whose data legs
    /// carry no IP; no NAT.
    Transparent,
}

impl ServiceMode {
    pub fn is_default(&self) -> bool {
        *self == ServiceMode::InNetwork
    }

    pub fn as_str(self) -> &'static str {
        match self {
            ServiceMode::InNetwork => "in-network",
            ServiceMode::InNetworkNat => "in-network-nat",
            ServiceMode::Transparent => "transparent",
        }
    }
}

impl fmt::Display for ServiceMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// IPPROTO_ICMPV6, and the ICMPv6 types of router solicitation (133) up to neighbour
/// advertisement (136): RS, RA, NS, NA; redirects (137) are left to the rules.
const ICMPV6: u32 = 58;
const ROUTER_SOLICITATION: u32 = 133;
const NEIGHBOR_ADVERTISEMENT: u32 = 136;

/// The comment on the rules a mode adds, so `nft list` says where they come from.
fn mode_comment(mode: ServiceMode, what: &str) -> Option<String> {
    Some(format!("mode {mode}: {what}"))
}

/// The sides the compiled table refers to. Transparent mode tells the sides apart by the
/// mark the bridge table sets (see [`bridge_marks`]), so its inet table depends on no
/// interface or address: edits and `status` compile it alike whatever the legs hold.
pub fn sides_for(mode: ServiceMode, sides: Sides<'_>) -> Sides<'_> {
    match mode {
        ServiceMode::Transparent => Sides::default(),
        _ => sides,
    }
}

/// The forward chain's dispatch into the per-direction chains, after the conntrack rules. In
/// in-network-nat mode a new connection DNAT forwards from the right to the left goes through
/// the right-to-left rules first (their verdicts decide; one they leave undecided is accepted
/// by its DNAT allowance ahead of the direction's default, as in in-network mode), and every
/// other new right-to-left connection is dropped.
pub fn forward_dispatch(mode: ServiceMode, sides: Sides<'_>) -> Vec<NftRule<'static>> {
    if mode == ServiceMode::Transparent {
        // IPv6 neighbour and router discovery is what ARP is for IPv4, which the bridge
        // passes unfiltered: without it a default deny would cut IPv6 across the bridge.
        let discovery = rule(
            vec![
                matches(meta(MetaKey::L4proto), Expression::Number(ICMPV6)),
                matches(
                    payload("icmpv6", "type"),
                    Expression::Range(Box::new(Range {
                        range: [
                            Expression::Number(ROUTER_SOLICITATION),
                            Expression::Number(NEIGHBOR_ADVERTISEMENT),
                        ],
                    })),
                ),
                counter(),
                Statement::Accept(None),
            ],
            mode_comment(mode, "IPv6 neighbour discovery across the bridge"),
        );
        // Bridged packets reach the inet hooks (br_netfilter) with the bridge as both
        // iif and oif: the mark says which leg they came in on.
        return std::iter::once(discovery)
            .chain(
                [
                    (LEFT_INGRESS_MARK, CHAIN_FROM_LEFT),
                    (RIGHT_INGRESS_MARK, CHAIN_FROM_RIGHT),
                ]
                .into_iter()
                .flat_map(|(mark, chain)| {
                    direction_jumps(
                        vec![matches(meta(MetaKey::Mark), Expression::Number(mark))],
                        chain,
                        None,
                    )
                }),
            )
            .collect();
    }
    let (Some(left), Some(right)) = (sides.left, sides.right) else {
        return Vec::new();
    };
    let mut rules = Vec::new();
    if mode == ServiceMode::InNetworkNat {
        rules.extend(direction_jumps(
            vec![
                matches(meta(MetaKey::Iifname), string(&right.name)),
                matches(meta(MetaKey::Oifname), string(&left.name)),
                dnatted(),
            ],
            CHAIN_FROM_RIGHT,
            mode_comment(mode, "DNAT'd right-to-left through the right-to-left rules"),
        ));
        rules.push(rule(
            vec![
                matches(meta(MetaKey::Iifname), string(&right.name)),
                matches(meta(MetaKey::Oifname), string(&left.name)),
                counter(),
                Statement::Drop(None),
            ],
            mode_comment(mode, "right-to-left only through DNAT"),
        ));
    }
    rules.extend(jump_between(&left.name, &right.name, CHAIN_FROM_LEFT));
    rules.extend(jump_between(&right.name, &left.name, CHAIN_FROM_RIGHT));
    rules
}

/// The postrouting rules a mode adds after the operator's NAT rules (which match first):
/// in-network-nat masquerades IPv4 forwarded from the left out of the right side (not the
/// SI's own traffic, nor management's).
pub fn implicit_nat(mode: ServiceMode, sides: Sides<'_>) -> Vec<NftRule<'static>> {
    match (mode, sides.left, sides.right) {
        (ServiceMode::InNetworkNat, Some(left), Some(right)) => vec![rule(
            vec![
                matches(meta(MetaKey::Iifname), string(&left.name)),
                matches(meta(MetaKey::Oifname), string(&right.name)),
                matches(meta(MetaKey::Nfproto), string("ipv4")),
                counter(),
                Statement::Masquerade(None),
            ],
            mode_comment(mode, "masquerade left-to-right out of the right side"),
        )],
        _ => Vec::new(),
    }
}

/// The `bridge` family table of transparent mode: it marks each frame with the leg it came
/// in on, for the inet table's forward chain. The filtering itself happens there, not here:
/// this kernel family has connection tracking only where the kernel was built with
/// nf_conntrack_bridge, while br_netfilter (which the SI's bridge turns on) hands bridged
/// IP packets to the inet hooks with full conntrack everywhere.
pub fn bridge_marks(left: &str, right: &str) -> String {
    format!(
        "table bridge {table} {{\n  chain {chain} {{\n    type filter hook prerouting priority -200; policy accept;\n    iifname \"{left}\" meta mark set {LEFT_INGRESS_MARK:#x}\n    iifname \"{right}\" meta mark set {RIGHT_INGRESS_MARK:#x}\n  }}\n}}\n",
        table = super::compile::TABLE,
        chain = BRIDGE_CHAIN,
    )
}

/// The chain of the bridge table.
pub const BRIDGE_CHAIN: &str = "mark_leg";

#[cfg(test)]
mod tests {
    use super::*;
    use crate::firewall::compile::tests::compile_with_both_sides;
    use crate::firewall::model::{NatKind, NatRule, RuleSet};
    use crate::side::Side;

    fn compiled_text(mode: ServiceMode) -> String {
        let rule_set = RuleSet {
            mode,
            ..RuleSet::default()
        };
        serde_json::to_string(&compile_with_both_sides(&rule_set).chains).unwrap()
    }

    #[test]
    fn in_network_nat_masquerades_out_of_the_right_and_drops_undnatted_right_to_left() {
        let text = compiled_text(ServiceMode::InNetworkNat);
        assert!(
            text.contains("mode in-network-nat: masquerade left-to-right out of the right side")
        );
        assert!(text.contains("mode in-network-nat: right-to-left only through DNAT"));
        assert!(text
            .contains("mode in-network-nat: DNAT'd right-to-left through the right-to-left rules"));
        let plain = compiled_text(ServiceMode::InNetwork);
        assert!(!plain.contains("masquerade"), "in-network adds nothing");
        assert!(!plain.contains("mode "), "in-network adds nothing");
    }

    #[test]
    fn transparent_dispatches_by_mark_and_names_no_interface() {
        let text = compiled_text(ServiceMode::Transparent);
        assert!(!text.contains("eth0") && !text.contains("eth1"), "{text}");
        assert!(text.contains(&LEFT_INGRESS_MARK.to_string()), "{text}");
        assert!(text.contains(&RIGHT_INGRESS_MARK.to_string()), "{text}");
        assert!(
            text.contains("mode transparent: IPv6 neighbour discovery across the bridge"),
            "{text}"
        );
        let marks = bridge_marks("eth0", "eth1");
        assert!(marks.starts_with("table bridge dockwall"), "{marks}");
        assert!(
            marks.contains("iifname \"eth1\" meta mark set 0xd0c0002"),
            "{marks}"
        );
    }

    #[test]
    fn transparent_mode_refuses_nat_rules_naming_why() {
        let mut rule_set = RuleSet {
            mode: ServiceMode::Transparent,
            ..RuleSet::default()
        };
        rule_set.validate().unwrap();
        let id = rule_set.allocate_id();
        rule_set.nat.push(NatRule {
            id,
            kind: NatKind::Masquerade {
                out: Side::Right,
                source: None,
            },
            comment: None,
        });
        let error = rule_set.validate().unwrap_err().to_string();
        assert!(
            error.contains("transparent") && error.contains("NAT rule 1"),
            "{error}"
        );
        rule_set.mode = ServiceMode::InNetworkNat;
        rule_set.validate().unwrap();
    }

    #[test]
    fn state_files_without_a_mode_load_as_in_network_and_stay_unchanged() {
        let old = r#"{"version":1,"default_policy":"accept","rules":[],"nat":[],"next_id":1}"#;
        let rule_set = RuleSet::from_json(old, "old state").unwrap();
        assert_eq!(rule_set.mode, ServiceMode::InNetwork);
        assert_eq!(serde_json::to_string(&rule_set).unwrap(), old);
        let nat = RuleSet {
            mode: ServiceMode::InNetworkNat,
            ..RuleSet::default()
        };
        assert!(serde_json::to_string(&nat)
            .unwrap()
            .contains(r#""mode":"in-network-nat""#));
    }
}

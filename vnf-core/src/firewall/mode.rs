//! The service modes of OpenContrail / Tungsten Fabric service chains, and what each adds to
//! the compiled table. `in-network` is Dockwall's original behaviour and adds nothing.

use std::fmt;

use nftables::expr::{Expression, MetaKey};
use nftables::stmt::{JumpTarget, Statement};
use serde::{Deserialize, Serialize};

use super::compile::{
    counter, jump_between, matches, meta, rule, string, Sides, CHAIN_FROM_LEFT, CHAIN_FROM_RIGHT,
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

/// The forward chain's dispatch into the per-direction chains, after the conntrack and DNAT
/// rules. In in-network-nat mode a new connection from the right to the left that no DNAT
/// rule let through (those are accepted before this) is dropped before any filter rule.
pub fn forward_dispatch(mode: ServiceMode, sides: Sides<'_>) -> Vec<NftRule<'static>> {
    if mode == ServiceMode::Transparent {
        // Bridged packets reach the inet hooks (br_netfilter) with the bridge as both
        // iif and oif: the mark says which leg they came in on.
        return [
            (LEFT_INGRESS_MARK, CHAIN_FROM_LEFT),
            (RIGHT_INGRESS_MARK, CHAIN_FROM_RIGHT),
        ]
        .into_iter()
        .map(|(mark, chain)| {
            rule(
                vec![
                    matches(meta(MetaKey::Mark), Expression::Number(mark)),
                    Statement::Jump(JumpTarget {
                        target: chain.into(),
                    }),
                ],
                None,
            )
        })
        .collect();
    }
    let (Some(left), Some(right)) = (sides.left, sides.right) else {
        return Vec::new();
    };
    let mut rules = Vec::new();
    if mode == ServiceMode::InNetworkNat {
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
    rules.push(jump_between(&left.name, &right.name, CHAIN_FROM_LEFT));
    rules.push(jump_between(&right.name, &left.name, CHAIN_FROM_RIGHT));
    rules
}

/// The postrouting rules a mode adds after the operator's NAT rules (which match first):
/// in-network-nat masquerades everything leaving the right side.
pub fn implicit_nat(mode: ServiceMode, sides: Sides<'_>) -> Vec<NftRule<'static>> {
    match (mode, sides.right) {
        (ServiceMode::InNetworkNat, Some(right)) => vec![rule(
            vec![
                matches(meta(MetaKey::Oifname), string(&right.name)),
                counter(),
                Statement::Masquerade(None),
            ],
            mode_comment(mode, "masquerade out of the right side"),
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

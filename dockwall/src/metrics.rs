//! Dockwall's metrics: per-rule and per-NAT-rule packets and bytes, read from the nft counters
//! at every scrape, rules by action, and how long applying the firewall took.

use std::sync::LazyLock;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;
use vnf_core::firewall::nft::{self, Counters};
use vnf_core::firewall::store::Store;
use vnf_core::firewall::{self, compile, Action, Direction, NatKind};
use vnf_core::metrics::{routing_health, Exporter};
use vnf_core::runtime::RuntimeConfig;
use vnf_core::Result;

/// How long applying the stored firewall took, from `run`'s side changes.
pub static APPLY_SECONDS: LazyLock<Histogram> =
    LazyLock::new(|| Histogram::new(exponential_buckets(0.001, 2.0, 14)));

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RuleLabels {
    rule_id: u64,
    action: &'static str,
    direction: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct NatLabels {
    nat_id: u64,
    kind: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ActionLabels {
    action: &'static str,
}

fn action_label(action: Action) -> &'static str {
    match action {
        Action::Allow => "allow",
        Action::Deny => "deny",
        Action::Reject => "reject",
        Action::Limit => "limit",
    }
}

fn direction_label(direction: Direction) -> &'static str {
    match direction {
        Direction::LeftToRight => "left_to_right",
        Direction::RightToLeft => "right_to_left",
        Direction::Both => "both",
        Direction::Local => "local",
    }
}

fn nat_kind_label(kind: &NatKind) -> &'static str {
    match kind {
        NatKind::Masquerade { .. } => "masquerade",
        NatKind::Snat { .. } => "snat",
        NatKind::Dnat { .. } => "dnat",
    }
}

pub struct FirewallExporter<'a> {
    pub store: &'a Store,
    pub config: RuntimeConfig,
}

impl Exporter for FirewallExporter<'_> {
    async fn register(&self, registry: &mut Registry) -> Result<()> {
        let rule_set = self.store.lock()?.load()?;
        let counters = nft::counters()?;
        let counted = |counters: &Counters, comment: String| {
            counters.get(&comment).copied().unwrap_or_default()
        };
        let (rule_packets, rule_bytes) = (
            Family::<RuleLabels, Counter>::default(),
            Family::<RuleLabels, Counter>::default(),
        );
        let by_action = Family::<ActionLabels, Gauge>::default();
        for action in [Action::Allow, Action::Deny, Action::Reject, Action::Limit] {
            // Every action gets a series, 0 when no rule has it.
            by_action
                .get_or_create(&ActionLabels {
                    action: action_label(action),
                })
                .set(0);
        }
        for rule in &rule_set.rules {
            let labels = RuleLabels {
                rule_id: rule.id,
                action: action_label(rule.action),
                direction: direction_label(rule.direction),
            };
            let (packets, bytes) = counted(&counters, compile::rule_comment(rule.id));
            rule_packets.get_or_create(&labels).inc_by(packets);
            rule_bytes.get_or_create(&labels).inc_by(bytes);
            by_action
                .get_or_create(&ActionLabels {
                    action: action_label(rule.action),
                })
                .inc();
        }
        let (nat_packets, nat_bytes) = (
            Family::<NatLabels, Counter>::default(),
            Family::<NatLabels, Counter>::default(),
        );
        for nat in &rule_set.nat {
            let labels = NatLabels {
                nat_id: nat.id,
                kind: nat_kind_label(&nat.kind),
            };
            let (packets, bytes) = counted(&counters, compile::nat_comment(nat.id));
            nat_packets.get_or_create(&labels).inc_by(packets);
            nat_bytes.get_or_create(&labels).inc_by(bytes);
        }
        let dockwall = registry.sub_registry_with_prefix("dockwall");
        dockwall.register(
            "rule_packets",
            "Packets that matched the filter rule (nft counter)",
            rule_packets,
        );
        dockwall.register(
            "rule_bytes",
            "Bytes that matched the filter rule (nft counter)",
            rule_bytes,
        );
        dockwall.register(
            "nat_packets",
            "Packets (new connections) the NAT rule rewrote (nft counter)",
            nat_packets,
        );
        dockwall.register(
            "nat_bytes",
            "Bytes the NAT rule's counter saw (nft counter)",
            nat_bytes,
        );
        dockwall.register("rules", "Stored filter rules by action", by_action);
        dockwall.register(
            "apply_duration_seconds",
            "Time applying the stored firewall to the kernel took",
            APPLY_SECONDS.clone(),
        );
        Ok(())
    }

    async fn health(&self) -> std::result::Result<(), String> {
        routing_health(&self.config).await?;
        let converged = async {
            let rule_set = self.store.lock()?.load()?;
            let assignment = firewall::current_assignment(&self.config.selectors).await?;
            firewall::is_converged(&rule_set, &assignment)
        };
        match converged.await {
            Ok(true) => Ok(()),
            Ok(false) => Err(format!(
                "the firewall (nft table inet {}) differs from the stored rules",
                compile::TABLE
            )),
            Err(error) => Err(error.to_string()),
        }
    }
}

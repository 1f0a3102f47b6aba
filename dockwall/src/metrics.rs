//! Dockwall's metrics: per-rule and per-NAT-rule packets and bytes, read from the nft counters
//! at every scrape, rules by action, and how long applying the firewall took.

use std::path::PathBuf;
use std::sync::LazyLock;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use serde::{Deserialize, Serialize};
use tracing::warn;
use vnf_core::firewall::nft;
use vnf_core::firewall::store::Store;
use vnf_core::firewall::{self, compile, Action, Direction, NatKind, ServiceMode};
use vnf_core::metrics::{duration_histogram, routing_health, Exporter};
use vnf_core::runtime::RuntimeConfig;
use vnf_core::transparent;
use vnf_core::Result;

/// How long applying the stored firewall took, from `run`'s side changes.
pub static APPLY_SECONDS: LazyLock<Histogram> = LazyLock::new(duration_histogram);

/// Edits are made by other processes (`docker exec … dockwall rule add`): each adds itself to
/// this file in the state directory, which `run` reads when scraped.
#[derive(Debug, Default, Serialize, Deserialize)]
struct EditTally {
    applied: u64,
    failed: u64,
}

fn tally_path(store: &Store) -> PathBuf {
    store.rules_path().with_file_name("edits.json")
}

fn read_tally(store: &Store) -> EditTally {
    std::fs::read(tally_path(store))
        .ok()
        .and_then(|bytes| serde_json::from_slice(&bytes).ok())
        .unwrap_or_default()
}

/// Counts one edit (a dry run is none), under the store's lock so concurrent edits all count.
pub fn count_edit(store: &Store, succeeded: bool) {
    let Ok(_locked) = store.lock() else {
        return;
    };
    let mut tally = read_tally(store);
    if succeeded {
        tally.applied += 1;
    } else {
        tally.failed += 1;
    }
    if let Err(error) = vnf_core::fs::write_json(&tally_path(store), &tally, false) {
        warn!(%error, "could not count the edit for the metrics");
    }
}

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
    pub mode: ServiceMode,
}

impl Exporter for FirewallExporter<'_> {
    async fn register(&self, registry: &mut Registry) -> Result<()> {
        let rule_set = self.store.lock()?.load()?;
        let counters = nft::rule_counters()?;
        let (rule_packets, rule_bytes) = (
            Family::<RuleLabels, Counter>::default(),
            Family::<RuleLabels, Counter>::default(),
        );
        let by_action = Family::<ActionLabels, Gauge>::default();
        for action in [Action::Allow, Action::Deny, Action::Reject, Action::Limit] {
            // Every action gets a series, 0 when no rule has it.
            by_action
                .get_or_create(&ActionLabels {
                    action: action.as_str(),
                })
                .set(0);
        }
        for rule in &rule_set.rules {
            let labels = RuleLabels {
                rule_id: rule.id,
                action: rule.action.as_str(),
                direction: direction_label(rule.direction),
            };
            let (packets, bytes) = nft::counted(&counters, &compile::rule_comment(rule.id));
            rule_packets.get_or_create(&labels).inc_by(packets);
            rule_bytes.get_or_create(&labels).inc_by(bytes);
            by_action
                .get_or_create(&ActionLabels {
                    action: rule.action.as_str(),
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
            let (packets, bytes) = nft::counted(&counters, &compile::nat_comment(nat.id));
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
        let tally = read_tally(self.store);
        let (edits, failed_edits) = (Counter::<u64>::default(), Counter::<u64>::default());
        edits.inc_by(tally.applied);
        failed_edits.inc_by(tally.failed);
        dockwall.register("edits", "Rule set edits applied or stored", edits);
        dockwall.register(
            "failed_edits",
            "Rule set edits refused (bad input, nft errors); they changed nothing",
            failed_edits,
        );
        dockwall.register(
            "apply_duration_seconds",
            "Time applying the stored firewall to the kernel took",
            APPLY_SECONDS.clone(),
        );
        Ok(())
    }

    async fn health(&self) -> std::result::Result<(), String> {
        match self.mode {
            ServiceMode::Transparent => {
                let bridge = transparent::status(&self.config)
                    .await
                    .map_err(|error| error.to_string())?;
                if !bridge.converged {
                    return Err(bridge.render());
                }
            }
            _ => routing_health(&self.config).await?,
        }
        let converged = async {
            let assignment = firewall::current_assignment(&self.config.selectors).await?;
            // Compiling and listing the table take seconds at 100,000 rules: off `run`'s
            // task, which must stay free for signals and side changes.
            let store = self.store.clone();
            tokio::task::spawn_blocking(move || {
                let rule_set = store.lock()?.load()?;
                firewall::is_converged(&rule_set, &assignment)
            })
            .await
            .map_err(|error| vnf_core::Error::Vnf(format!("the firewall check failed: {error}")))?
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

//! The API's documents: FWaaS v2 firewall rules (with Dockwall's extra fields `direction`,
//! `rate` and `log`), and Dockwall's own NAT rules and default policy.

use crate::fwaas;
use ipnet::IpNet;
use serde::de::IgnoredAny;
use serde::{Deserialize, Deserializer, Serialize};
use vnf_core::firewall::{Action, Direction, NatKind, PortRange, Protocol, Rate, Rule};
use vnf_core::{Error, Result};

/// A firewall rule as the API shows it.
#[derive(Debug, Serialize)]
pub struct FirewallRuleView {
    pub id: String,
    pub name: Option<String>,
    pub description: Option<String>,
    pub protocol: Option<String>,
    pub ip_version: Option<u8>,
    pub source_ip_address: Option<String>,
    pub destination_ip_address: Option<String>,
    pub source_port: Option<String>,
    pub destination_port: Option<String>,
    pub action: Action,
    pub enabled: bool,
    /// The implicit policies the rule is in (Neutron's list): its direction's.
    pub firewall_policy_id: Vec<Direction>,
    /// 1 = evaluated first, across all directions.
    pub position: usize,
    pub direction: Direction,
    pub rate: Option<Rate>,
    pub log: bool,
    pub packets: u64,
    pub bytes: u64,
}

impl FirewallRuleView {
    pub fn new(rule: &Rule, position: usize, (packets, bytes): (u64, u64)) -> Self {
        FirewallRuleView {
            id: rule.id.to_string(),
            name: rule.name.clone(),
            description: rule.comment.clone(),
            protocol: (rule.protocol != Protocol::Any).then(|| rule.protocol.to_string()),
            ip_version: rule.ip_version.or(rule.bound_ip_version()),
            source_ip_address: rule.source.map(|n| n.to_string()),
            destination_ip_address: rule.destination.map(|n| n.to_string()),
            source_port: rule.source_port.map(String::from),
            destination_port: rule.destination_port.map(String::from),
            action: rule.action,
            enabled: rule.enabled,
            firewall_policy_id: vec![rule.direction],
            position,
            direction: rule.direction,
            rate: rule.rate,
            log: rule.log,
            packets,
            bytes,
        }
    }
}

/// A present JSON `null` is `Some(None)`: "clear this field", unlike an absent field.
fn nullable<'de, D, T>(deserializer: D) -> std::result::Result<Option<Option<T>>, D::Error>
where
    D: Deserializer<'de>,
    T: Deserialize<'de>,
{
    Option::<T>::deserialize(deserializer).map(Some)
}

/// The fields of a POST (all of them) or a PUT (those to change). Read-only fields such as
/// `id` and the counters are refused, like any unknown field.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FirewallRuleFields {
    #[serde(default, deserialize_with = "nullable")]
    pub name: Option<Option<String>>,
    #[serde(default, deserialize_with = "nullable")]
    pub description: Option<Option<String>>,
    #[serde(default, deserialize_with = "nullable")]
    pub protocol: Option<Option<Protocol>>,
    #[serde(default, deserialize_with = "nullable")]
    pub ip_version: Option<Option<u8>>,
    #[serde(default, deserialize_with = "nullable")]
    pub source_ip_address: Option<Option<String>>,
    #[serde(default, deserialize_with = "nullable")]
    pub destination_ip_address: Option<Option<String>>,
    #[serde(default, deserialize_with = "nullable")]
    pub source_port: Option<Option<PortRange>>,
    #[serde(default, deserialize_with = "nullable")]
    pub destination_port: Option<Option<PortRange>>,
    pub action: Option<Action>,
    pub enabled: Option<bool>,
    pub direction: Option<Direction>,
    #[serde(default, deserialize_with = "nullable")]
    pub rate: Option<Option<Rate>>,
    pub log: Option<bool>,
    /// POST only: where the new rule goes (1 = first) instead of the end.
    pub position: Option<usize>,
    /// Neutron's, accepted and ignored: Dockwall has one project and nothing to share.
    #[serde(rename = "shared")]
    _shared: Option<bool>,
    #[serde(rename = "project_id")]
    _project_id: Option<String>,
    #[serde(rename = "tenant_id")]
    _tenant_id: Option<String>,
    /// Neutron's, ignored: a rule's policy is its direction (`direction`, or `insert_rule`).
    #[serde(rename = "firewall_policy_id")]
    _firewall_policy_id: Option<IgnoredAny>,
    /// Neutron's remote groups: only null (none) is accepted.
    pub source_firewall_group_id: Option<String>,
    pub destination_firewall_group_id: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FirewallRuleBody {
    pub firewall_rule: FirewallRuleFields,
}

fn address(field: &'static str, text: &str) -> Result<IpNet> {
    vnf_core::firewall::model::parse_net(text).ok_or_else(|| {
        Error::invalid(
            field,
            text,
            "not an IP address or CIDR (e.g. 10.0.0.0/8, 192.0.2.7, fd00::/64)",
        )
    })
}

impl FirewallRuleFields {
    /// Writes the given fields into `rule` (a null `ip_version` unbinds the rule from one IP
    /// version).
    pub fn apply_to(self, rule: &mut Rule) -> Result<()> {
        if let Some((field, group)) = fwaas::remote_group(
            &self.source_firewall_group_id,
            &self.destination_firewall_group_id,
        ) {
            return Err(Error::invalid(field, group, fwaas::REMOTE_GROUPS_REFUSED));
        }
        // A field left out keeps its value; a null clears the optional ones.
        fn set<T>(slot: &mut T, given: Option<T>) {
            if let Some(value) = given {
                *slot = value;
            }
        }
        let net = |field, given: Option<Option<String>>| {
            given
                .map(|value| value.map(|text| address(field, &text)).transpose())
                .transpose()
        };
        set(
            &mut rule.source,
            net("source_ip_address", self.source_ip_address)?,
        );
        set(
            &mut rule.destination,
            net("destination_ip_address", self.destination_ip_address)?,
        );
        set(&mut rule.name, self.name);
        set(&mut rule.comment, self.description);
        set(
            &mut rule.protocol,
            self.protocol.map(|value| value.unwrap_or(Protocol::Any)),
        );
        set(&mut rule.source_port, self.source_port);
        set(&mut rule.destination_port, self.destination_port);
        set(&mut rule.action, self.action);
        set(&mut rule.enabled, self.enabled);
        set(&mut rule.direction, self.direction);
        set(&mut rule.rate, self.rate);
        set(&mut rule.log, self.log);
        // Kept as Neutron keeps it; the rule's own validation checks it against the
        // addresses and the protocol.
        set(&mut rule.ip_version, self.ip_version);
        Ok(())
    }
}

/// `PUT /v2.0/fwaas/firewall_policies/{id}/insert_rule`, as FWaaS has it.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InsertRule {
    pub firewall_rule_id: String,
    #[serde(default)]
    pub insert_before: Option<String>,
    #[serde(default)]
    pub insert_after: Option<String>,
}

/// `PUT /v2.0/fwaas/firewall_policies/{id}/remove_rule`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RemoveRule {
    pub firewall_rule_id: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NatRuleFields {
    pub kind: NatKind,
    #[serde(default)]
    pub comment: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NatRuleBody {
    pub nat_rule: NatRuleFields,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DefaultPolicyBody {
    pub default_policy: vnf_core::firewall::Policy,
    /// `left-to-right` or `right-to-left` sets that direction only, as
    /// `dockwall default --direction` does; absent: both, clearing per-direction overrides.
    #[serde(default)]
    pub direction: Option<Direction>,
}

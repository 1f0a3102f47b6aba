//! OpenStack Neutron FWaaS v2 documents ↔ the rule model. A firewall group's ingress policy
//! filters traffic into the protected (left) side, its egress policy traffic out of it.

use std::collections::HashMap;

use ipnet::IpNet;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use vnf_core::firewall::{Action, Direction, PortRange, Protocol, Rule, RuleSet};
use vnf_core::{Error, Result};

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum PolicyRole {
    /// Into the left side (right → left).
    Ingress,
    /// Out of the left side (left → right).
    Egress,
}

impl PolicyRole {
    fn direction(self) -> Direction {
        match self {
            PolicyRole::Ingress => Direction::RightToLeft,
            PolicyRole::Egress => Direction::LeftToRight,
        }
    }
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FirewallRule {
    pub id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    #[serde(default)]
    pub protocol: Option<String>,
    #[serde(default = "ipv4")]
    pub ip_version: u8,
    #[serde(default)]
    pub source_ip_address: Option<String>,
    #[serde(default)]
    pub destination_ip_address: Option<String>,
    #[serde(default)]
    pub source_port: Option<String>,
    #[serde(default)]
    pub destination_port: Option<String>,
    pub action: String,
    #[serde(default = "yes")]
    pub enabled: bool,
    // Accepted as Neutron sends them, not used.
    #[serde(default, skip_serializing)]
    pub tenant_id: Option<Value>,
    #[serde(default, skip_serializing)]
    pub project_id: Option<Value>,
    #[serde(default, skip_serializing)]
    pub shared: Option<Value>,
    #[serde(default, skip_serializing)]
    pub firewall_policy_id: Option<Value>,
    #[serde(default, skip_serializing)]
    pub position: Option<Value>,
}

fn ipv4() -> u8 {
    4
}

fn yes() -> bool {
    true
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FirewallPolicy {
    #[serde(default)]
    pub id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// Rule ids in evaluation order.
    #[serde(default)]
    pub firewall_rules: Vec<String>,
    #[serde(default, skip_serializing)]
    pub tenant_id: Option<Value>,
    #[serde(default, skip_serializing)]
    pub project_id: Option<Value>,
    #[serde(default, skip_serializing)]
    pub audited: Option<Value>,
    #[serde(default, skip_serializing)]
    pub shared: Option<Value>,
    #[serde(default, skip_serializing)]
    pub description: Option<Value>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FirewallGroup {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(default)]
    pub ingress_firewall_policy_id: Option<String>,
    #[serde(default)]
    pub egress_firewall_policy_id: Option<String>,
}

/// Either a firewall group with its policies, or one policy.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Document {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub firewall_group: Option<FirewallGroup>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub firewall_policies: Vec<FirewallPolicy>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub firewall_policy: Option<FirewallPolicy>,
    pub firewall_rules: Vec<FirewallRule>,
}

fn to_model(rule: &FirewallRule, direction: Direction, id: u64) -> Result<Rule> {
    let field = |name: &'static str, value: &str, reason: String| {
        Error::invalid(name, value, format!("firewall_rule {}: {reason}", rule.id))
    };
    let address = |name: &'static str, value: &Option<String>| -> Result<Option<IpNet>> {
        value
            .as_deref()
            .map(|text| {
                let net = text
                    .parse::<IpNet>()
                    .or_else(|_| text.parse::<std::net::IpAddr>().map(IpNet::from))
                    .map_err(|e| field(name, text, e.to_string()))?;
                let version = if net.addr().is_ipv4() { 4 } else { 6 };
                if version != rule.ip_version {
                    return Err(field(
                        name,
                        text,
                        format!("the rule says ip_version {}", rule.ip_version),
                    ));
                }
                Ok(net.trunc())
            })
            .transpose()
    };
    let port = |name: &'static str, value: &Option<String>| -> Result<Option<PortRange>> {
        value
            .as_deref()
            .map(|text| {
                text.parse::<PortRange>()
                    .map_err(|e| field(name, text, e.to_string()))
            })
            .transpose()
    };
    if ![4, 6].contains(&rule.ip_version) {
        return Err(field(
            "ip_version",
            &rule.ip_version.to_string(),
            "use 4 or 6".into(),
        ));
    }
    let mut protocol = match rule.protocol.as_deref() {
        None => Protocol::Any,
        Some(text) => text
            .parse::<Protocol>()
            .map_err(|e| field("protocol", text, e.to_string()))?,
    };
    if protocol == Protocol::Icmp && rule.ip_version == 6 {
        protocol = Protocol::Icmpv6;
    }
    let action = match rule.action.as_str() {
        "allow" => Action::Allow,
        "deny" => Action::Deny,
        "reject" => Action::Reject,
        other => return Err(field("action", other, "use allow, deny or reject".into())),
    };
    let model = Rule {
        id,
        name: rule.name.clone(),
        action,
        rate: None,
        direction,
        protocol,
        source: address("source_ip_address", &rule.source_ip_address)?,
        destination: address("destination_ip_address", &rule.destination_ip_address)?,
        source_port: port("source_port", &rule.source_port)?,
        destination_port: port("destination_port", &rule.destination_port)?,
        enabled: rule.enabled,
        log: false,
        comment: rule.description.clone(),
        external_id: Some(rule.id.clone()),
    };
    model.validate()?;
    Ok(model)
}

/// Replaces the filter rules of `rule_set` with the document's policies; NAT and the default
/// policy stay. `single_as` says what a lone `firewall_policy` is.
pub fn import(rule_set: &mut RuleSet, text: &str, single_as: PolicyRole) -> Result<usize> {
    let document: Document =
        serde_json::from_str(text).map_err(|e| Error::invalid("FWaaS document", "", e))?;
    let rules: HashMap<&str, &FirewallRule> = document
        .firewall_rules
        .iter()
        .map(|r| (r.id.as_str(), r))
        .collect();
    let policy = |id: &str| -> Result<&FirewallPolicy> {
        document
            .firewall_policies
            .iter()
            .find(|p| p.id == id)
            .ok_or_else(|| {
                Error::invalid(
                    "firewall_policy_id",
                    id,
                    "no policy with this id in firewall_policies",
                )
            })
    };
    let mut ordered: Vec<(&FirewallPolicy, Direction)> = Vec::new();
    match (&document.firewall_group, &document.firewall_policy) {
        (Some(group), _) => {
            if let Some(id) = &group.ingress_firewall_policy_id {
                ordered.push((policy(id)?, Direction::RightToLeft));
            }
            if let Some(id) = &group.egress_firewall_policy_id {
                ordered.push((policy(id)?, Direction::LeftToRight));
            }
        }
        (None, Some(single)) => ordered.push((single, single_as.direction())),
        (None, None) => {
            return Err(Error::invalid(
                "FWaaS document",
                "",
                "needs firewall_group (with firewall_policies) or firewall_policy",
            ))
        }
    }
    let mut imported = Vec::new();
    for (policy, direction) in ordered {
        for rule_id in &policy.firewall_rules {
            let rule = rules.get(rule_id.as_str()).ok_or_else(|| {
                Error::invalid(
                    "firewall_rules",
                    rule_id,
                    "the policy lists a rule that is not in firewall_rules",
                )
            })?;
            imported.push(to_model(rule, direction, rule_set.allocate_id())?);
        }
    }
    let count = imported.len();
    rule_set.rules = imported;
    Ok(count)
}

fn from_model(rule: &Rule) -> FirewallRule {
    FirewallRule {
        id: rule
            .external_id
            .clone()
            .unwrap_or_else(|| format!("dockwall-rule-{}", rule.id)),
        name: rule.name.clone(),
        description: rule.comment.clone(),
        protocol: match rule.protocol {
            Protocol::Any => None,
            Protocol::Icmpv6 => Some("icmp".into()),
            other => Some(other.to_string()),
        },
        ip_version: rule.ip_version().unwrap_or(4),
        source_ip_address: rule.source.map(|n| n.to_string()),
        destination_ip_address: rule.destination.map(|n| n.to_string()),
        source_port: rule.source_port.map(String::from),
        destination_port: rule.destination_port.map(String::from),
        action: match rule.action {
            Action::Allow | Action::Limit => "allow",
            Action::Deny => "deny",
            Action::Reject => "reject",
        }
        .into(),
        enabled: rule.enabled,
        ..FirewallRule::default()
    }
}

/// The rule set as a firewall group with an ingress and an egress policy. Rules FWaaS
/// cannot express (to the SI itself, rate limits, both directions) are left out and named
/// in the returned list.
pub fn export(rule_set: &RuleSet) -> (Document, Vec<String>) {
    let mut document = Document {
        firewall_group: Some(FirewallGroup {
            name: Some("dockwall".into()),
            ingress_firewall_policy_id: Some("dockwall-ingress".into()),
            egress_firewall_policy_id: Some("dockwall-egress".into()),
        }),
        ..Document::default()
    };
    let mut ingress = FirewallPolicy {
        id: "dockwall-ingress".into(),
        name: Some("ingress".into()),
        ..Default::default()
    };
    let mut egress = FirewallPolicy {
        id: "dockwall-egress".into(),
        name: Some("egress".into()),
        ..Default::default()
    };
    let mut skipped = Vec::new();
    for rule in &rule_set.rules {
        let policy = match rule.direction {
            Direction::RightToLeft => &mut ingress,
            Direction::LeftToRight => &mut egress,
            Direction::Both | Direction::Local => {
                skipped.push(format!(
                    "rule {}: direction {:?} has no FWaaS form",
                    rule.id, rule.direction
                ));
                continue;
            }
        };
        if rule.action == Action::Limit || rule.log {
            skipped.push(format!(
                "rule {}: rate limits and logging have no FWaaS form",
                rule.id
            ));
            continue;
        }
        let exported = from_model(rule);
        policy.firewall_rules.push(exported.id.clone());
        document.firewall_rules.push(exported);
    }
    document.firewall_policies = vec![ingress, egress];
    (document, skipped)
}

#[cfg(test)]
mod tests {
    use super::*;

    const GROUP: &str = r#"{
      "firewall_group": {"name": "web", "ingress_firewall_policy_id": "p-in", "egress_firewall_policy_id": "p-out"},
      "firewall_policies": [
        {"id": "p-in", "name": "in", "firewall_rules": ["r-ssh", "r-web"], "audited": false, "tenant_id": "t"},
        {"id": "p-out", "firewall_rules": ["r-dns"]}
      ],
      "firewall_rules": [
        {"id": "r-web", "protocol": "tcp", "destination_port": "80:81", "action": "allow", "ip_version": 4, "tenant_id": "t", "shared": false},
        {"id": "r-ssh", "protocol": "tcp", "source_ip_address": "203.0.113.0/24", "destination_port": "22", "action": "reject"},
        {"id": "r-dns", "protocol": "udp", "destination_ip_address": "192.0.2.53", "destination_port": "53", "action": "deny", "enabled": false}
      ]
    }"#;

    #[test]
    fn import_orders_by_policy_and_maps_directions() {
        let mut set = RuleSet::default();
        assert_eq!(import(&mut set, GROUP, PolicyRole::Ingress).unwrap(), 3);
        let ids: Vec<_> = set
            .rules
            .iter()
            .map(|r| r.external_id.as_deref().unwrap())
            .collect();
        assert_eq!(ids, ["r-ssh", "r-web", "r-dns"]);
        assert_eq!(set.rules[0].direction, Direction::RightToLeft);
        assert_eq!(set.rules[0].action, Action::Reject);
        assert_eq!(
            set.rules[1].destination_port,
            Some(PortRange {
                first: 80,
                last: 81
            })
        );
        assert_eq!(set.rules[2].direction, Direction::LeftToRight);
        assert_eq!(
            set.rules[2].destination.unwrap().to_string(),
            "192.0.2.53/32"
        );
        assert!(!set.rules[2].enabled);
    }

    #[test]
    fn export_then_import_round_trips() {
        let mut set = RuleSet::default();
        import(&mut set, GROUP, PolicyRole::Ingress).unwrap();
        let (document, skipped) = export(&set);
        assert!(skipped.is_empty(), "{skipped:?}");
        let mut again = RuleSet::default();
        import(
            &mut again,
            &serde_json::to_string(&document).unwrap(),
            PolicyRole::Ingress,
        )
        .unwrap();
        assert_eq!(again.rules, set.rules);
    }

    #[test]
    fn bad_documents_name_the_field() {
        let cases = [
            (
                r#"{"firewall_policy": {"firewall_rules": ["a"]}, "firewall_rules": [{"id": "a", "action": "permit"}]}"#,
                "action",
            ),
            (
                r#"{"firewall_policy": {"firewall_rules": ["a"]}, "firewall_rules": [{"id": "a", "action": "allow", "ip_version": 4, "source_ip_address": "fd00::1"}]}"#,
                "ip_version 4",
            ),
            (
                r#"{"firewall_policy": {"firewall_rules": ["b"]}, "firewall_rules": [{"id": "a", "action": "allow"}]}"#,
                "not in firewall_rules",
            ),
            (
                r#"{"firewall_policy": {"firewall_rules": []}, "firewall_rules": [{"id": "a", "action": "allow", "colour": 1}]}"#,
                "unknown field `colour`",
            ),
            (
                r#"{"firewall_policy": {"firewall_rules": ["a"]}, "firewall_rules": [{"id": "a", "action": "allow", "protocol": "tcp", "destination_port": "0"}]}"#,
                "outside 1-65535",
            ),
        ];
        for (text, needle) in cases {
            let error = import(&mut RuleSet::default(), text, PolicyRole::Ingress)
                .unwrap_err()
                .to_string();
            assert!(error.contains(needle), "{text}: {error}");
        }
    }
}

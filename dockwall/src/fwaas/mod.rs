//! OpenStack Neutron FWaaS v2 ↔ the rule model. A firewall group's ingress policy filters
//! traffic into the protected (left) side, right → left; its egress policy traffic out of it,
//! left → right. As in Neutron, a direction with a policy ends in the policy's implicit deny,
//! and a direction without one is not filtered.

mod document;

use std::collections::HashMap;

use ipnet::IpNet;
use vnf_core::firewall::{Action, Direction, Policy, PortRange, Protocol, Rule, RuleSet};
use vnf_core::{Error, Result};

pub use document::Document;
use document::{FirewallGroup, FirewallPolicy, FirewallRule, Gathered, Located};

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

/// What an import did, for the operator.
#[derive(Debug)]
pub struct Imported {
    pub rules: usize,
    /// What the operator may not expect: a group administratively down, a policy that drops
    /// everything.
    pub notes: Vec<String>,
}

/// Replaces the filter rules of `rule_set` with the policies of the FWaaS documents in
/// `sources` (name, text); NAT stays and the new rules get fresh ids. Each direction gets
/// Neutron's default: deny where a policy applies, accept where none does. `single_as` says
/// what a lone policy (no group) filters.
pub fn import(
    rule_set: &mut RuleSet,
    sources: &[(String, String)],
    single_as: PolicyRole,
) -> Result<Imported> {
    let mut gathered = Gathered::default();
    for (source, text) in sources {
        gathered.read(source, text)?;
    }
    let rules = distinct(&gathered.rules, "firewall_rule", |r| &r.id, filtering_rule)?;
    let policies = distinct(
        &gathered.policies,
        "firewall_policy",
        |p| &p.id,
        |p| p.firewall_rules.clone(),
    )?;
    let group = match gathered.groups.as_slice() {
        [] => None,
        [one] => Some(one),
        [_, second, ..] => {
            return Err(second.origin.error(
                "firewall_group",
                &second.resource.id,
                None,
                "a second firewall group; import one group at a time (the body of \
                 GET /v2.0/fwaas/firewall_groups/{id})",
            ))
        }
    };
    let chosen = chosen_policies(group, &policies, single_as)?;
    let admin_down = group.is_some_and(|g| g.resource.admin_state_up == Some(false));
    let by_id: HashMap<&str, &Located<FirewallRule>> =
        rules.iter().map(|r| (r.resource.id.as_str(), *r)).collect();
    let mut imported = Vec::new();
    let mut notes = Vec::new();
    for (policy, direction) in &chosen {
        let before = imported.len();
        for (index, rule_id) in policy.resource.firewall_rules.iter().enumerate() {
            let rule = by_id.get(rule_id.as_str()).ok_or_else(|| {
                policy.origin.error(
                    "firewall_policy",
                    &policy.resource.id,
                    Some(&format!("firewall_rules[{index}]")),
                    format!(
                        "rule {rule_id:?} is not among the documents; add the body of \
                         GET /v2.0/fwaas/firewall_rules/{rule_id}"
                    ),
                )
            })?;
            imported.push(to_model(rule, *direction)?);
        }
        if !admin_down && !imported[before..].iter().any(|r| r.enabled) {
            let (role, traffic) = match direction {
                Direction::RightToLeft => ("ingress", "right→left"),
                _ => ("egress", "left→right"),
            };
            notes.push(format!(
                "{role} policy {:?} has no enabled rules: all {traffic} traffic is dropped",
                policy.resource.id
            ));
        }
    }
    // Neutron's implicit deny where a policy filters; open where none does.
    let policy = |direction| {
        Some(
            if admin_down || chosen.iter().any(|(_, d)| *d == direction) {
                Policy::Drop
            } else {
                Policy::Accept
            },
        )
    };
    rule_set.left_to_right_policy = policy(Direction::LeftToRight);
    rule_set.right_to_left_policy = policy(Direction::RightToLeft);
    if admin_down {
        imported.clear();
        notes.push(
            "the firewall group has admin_state_up false: new connections in both directions \
             are dropped; established flows continue until they end"
                .into(),
        );
    }
    for rule in &mut imported {
        rule.id = rule_set.allocate_id();
    }
    let count = imported.len();
    rule_set.rules = imported;
    Ok(Imported {
        rules: count,
        notes,
    })
}

/// The resources with distinct ids, in order; the same id twice is fine when both filter the
/// same (`filtering` picks what does: a rule's match and action, a policy's rules), whatever
/// their names, descriptions or sharing say; the first one is kept.
fn distinct<'a, T, F: PartialEq>(
    all: &'a [Located<T>],
    resource: &str,
    id: impl Fn(&T) -> &String,
    filtering: impl Fn(&T) -> F,
) -> Result<Vec<&'a Located<T>>> {
    let mut seen: HashMap<&String, &Located<T>> = HashMap::new();
    let mut kept = Vec::new();
    for item in all {
        match seen.get(id(&item.resource)) {
            Some(first) if filtering(&first.resource) == filtering(&item.resource) => {}
            Some(first) => {
                return Err(item.origin.error(
                    resource,
                    id(&item.resource),
                    None,
                    format!(
                        "filters differently from the {resource} with this id at {}, {}; give \
                         one version",
                        first.origin.source, first.origin.path
                    ),
                ))
            }
            None => {
                seen.insert(id(&item.resource), item);
                kept.push(item);
            }
        }
    }
    Ok(kept)
}

/// The fields of a rule that decide what it does to traffic.
fn filtering_rule(rule: &FirewallRule) -> FirewallRule {
    FirewallRule {
        id: rule.id.clone(),
        protocol: rule.protocol.clone(),
        ip_version: rule.ip_version,
        source_ip_address: rule.source_ip_address.clone(),
        destination_ip_address: rule.destination_ip_address.clone(),
        source_port: rule.source_port.clone(),
        destination_port: rule.destination_port.clone(),
        source_firewall_group_id: rule.source_firewall_group_id.clone(),
        destination_firewall_group_id: rule.destination_firewall_group_id.clone(),
        action: rule.action.clone(),
        enabled: rule.enabled,
        ..FirewallRule::default()
    }
}

/// The policies to import with the direction each filters.
fn chosen_policies<'a>(
    group: Option<&Located<FirewallGroup>>,
    policies: &[&'a Located<FirewallPolicy>],
    single_as: PolicyRole,
) -> Result<Vec<(&'a Located<FirewallPolicy>, Direction)>> {
    let Some(group) = group else {
        return match policies {
            [one] => Ok(vec![(*one, single_as.direction())]),
            [] => Err(Error::Vnf(
                "FWaaS import: no firewall_group and no firewall_policy among the documents; \
                 rules alone belong to no policy. Add the policy (GET \
                 /v2.0/fwaas/firewall_policies/ID) or the group with its policies"
                    .into(),
            )),
            _ => Err(Error::Vnf(format!(
                "FWaaS import: {} firewall policies and no firewall_group; add the group \
                 (GET /v2.0/fwaas/firewall_groups/ID), which says which policy is ingress and \
                 which egress, or import one policy with --as",
                policies.len()
            ))),
        };
    };
    let mut chosen = Vec::new();
    for (field, id, direction) in [
        (
            "ingress_firewall_policy_id",
            &group.resource.ingress_firewall_policy_id,
            Direction::RightToLeft,
        ),
        (
            "egress_firewall_policy_id",
            &group.resource.egress_firewall_policy_id,
            Direction::LeftToRight,
        ),
    ] {
        let Some(id) = id else { continue };
        let policy = policies
            .iter()
            .find(|p| p.resource.id == *id)
            .ok_or_else(|| {
                group.origin.error(
                    "firewall_group",
                    &group.resource.id,
                    Some(field),
                    format!(
                        "no firewall_policy {id:?} among the documents; add the body of \
                         GET /v2.0/fwaas/firewall_policies/{id}"
                    ),
                )
            })?;
        chosen.push((*policy, direction));
    }
    Ok(chosen)
}

/// Why a rule with a remote firewall group is refused (by the import and by the API).
pub const REMOTE_GROUPS_REFUSED: &str = "remote firewall groups are not supported; match \
     addresses with source_ip_address / destination_ip_address";

/// The first remote firewall group a rule names (source, then destination), with its field;
/// None when both are null, the only form Dockwall takes.
pub fn remote_group<'a>(
    source: &'a Option<String>,
    destination: &'a Option<String>,
) -> Option<(&'static str, &'a String)> {
    [
        ("source_firewall_group_id", source),
        ("destination_firewall_group_id", destination),
    ]
    .into_iter()
    .find_map(|(field, group)| group.as_ref().map(|group| (field, group)))
}

fn to_model(located: &Located<FirewallRule>, direction: Direction) -> Result<Rule> {
    let rule = &located.resource;
    let fail = |field: &str, reason: String| {
        located
            .origin
            .error("firewall_rule", &rule.id, Some(field), reason)
    };
    if let Some((field, group)) = remote_group(
        &rule.source_firewall_group_id,
        &rule.destination_firewall_group_id,
    ) {
        return Err(fail(field, format!("{group:?}: {REMOTE_GROUPS_REFUSED}")));
    }
    // Neutron's default; the model checks it against 4/6 and the addresses.
    let ip_version = rule.ip_version.unwrap_or(4);
    let address = |field: &str, value: &Option<String>| -> Result<Option<IpNet>> {
        let Some(text) = value else { return Ok(None) };
        let net = vnf_core::firewall::model::parse_net(text).ok_or_else(|| {
            fail(
                field,
                format!("{text:?} is not an address or CIDR such as 192.0.2.0/24"),
            )
        })?;
        Ok(Some(net))
    };
    let port = |field: &str, value: &Option<String>| -> Result<Option<PortRange>> {
        let Some(text) = value else { return Ok(None) };
        text.parse::<PortRange>().map(Some).map_err(|e| {
            fail(
                field,
                format!("{e}; write a port as \"N\" or a range as \"A:B\""),
            )
        })
    };
    let mut protocol = match rule.protocol.as_deref() {
        None => Protocol::Any,
        Some(text) => text
            .parse::<Protocol>()
            .map_err(|e| fail("protocol", e.to_string()))?,
    };
    if protocol == Protocol::Icmp && ip_version == 6 {
        protocol = Protocol::Icmpv6;
    }
    let action = match rule.action.as_deref().unwrap_or("deny") {
        "allow" => Action::Allow,
        "deny" => Action::Deny,
        "reject" => Action::Reject,
        other => {
            return Err(fail(
                "action",
                format!("{other:?}: use allow, deny or reject"),
            ))
        }
    };
    let non_empty = |text: &Option<String>| text.clone().filter(|t| !t.is_empty());
    let model = Rule {
        id: 0,
        name: non_empty(&rule.name),
        action,
        rate: None,
        direction,
        protocol,
        ip_version: Some(ip_version),
        source: address("source_ip_address", &rule.source_ip_address)?,
        destination: address("destination_ip_address", &rule.destination_ip_address)?,
        source_port: port("source_port", &rule.source_port)?,
        destination_port: port("destination_port", &rule.destination_port)?,
        enabled: rule.enabled.unwrap_or(true),
        log: false,
        comment: non_empty(&rule.description),
        external_id: Some(rule.id.clone()),
    };
    model.validate_as(VALIDATED_AS).map_err(|e| match e {
        Error::InvalidArgument {
            field,
            value,
            reason,
        } => {
            let reason = reason.strip_prefix(VALIDATED_AS).unwrap_or(&reason);
            let reason = reason.trim_start_matches(": ");
            located.origin.error(
                "firewall_rule",
                &rule.id,
                fwaas_field(field),
                format!("{value}: {reason}"),
            )
        }
        other => located.origin.error("firewall_rule", &rule.id, None, other),
    })?;
    Ok(model)
}

/// How `to_model` names the rule to [`Rule::validate_as`]; its errors name the rule already.
const VALIDATED_AS: &str = "the rule";

/// The FWaaS field a rule model field comes from, for an error's JSON path.
fn fwaas_field(model_field: &str) -> Option<&'static str> {
    Some(match model_field {
        "ip_version" => "ip_version",
        "protocol" => "protocol",
        "source" => "source_ip_address",
        "destination" => "destination_ip_address",
        "source_port" => "source_port",
        "destination_port" => "destination_port",
        "action" => "action",
        _ => return None,
    })
}

const INGRESS_ID: &str = "dockwall-ingress";
const EGRESS_ID: &str = "dockwall-egress";

/// Builds the exported resources; one FWaaS rule may serve several model rules.
struct Exporter {
    rules: Vec<FirewallRule>,
    index: HashMap<String, usize>,
}

impl Exporter {
    /// Adds `rule` to `policy` and returns its id: a rule with the same id and match is
    /// shared (its firewall_policy_id lists both policies), a different one (or the same one
    /// again in one policy) gets `fallback_id`, suffixed -2, -3… until no rule has it.
    fn add(&mut self, mut rule: FirewallRule, fallback_id: String, policy: &str) -> String {
        if let Some(&at) = self.index.get(&rule.id) {
            let existing = &mut self.rules[at];
            let in_policy = existing.firewall_policy_id.iter().any(|p| p == policy);
            let same = FirewallRule {
                firewall_policy_id: existing.firewall_policy_id.clone(),
                ..rule.clone()
            } == *existing;
            if same && !in_policy {
                existing.firewall_policy_id.push(policy.to_string());
                return rule.id;
            }
            rule.id = self.unused_id(fallback_id);
        }
        rule.firewall_policy_id = vec![policy.to_string()];
        self.index.insert(rule.id.clone(), self.rules.len());
        self.rules.push(rule.clone());
        rule.id
    }

    /// `wanted`, or `wanted-N` with the smallest N ≥ 2 that no rule has (found within as
    /// many tries as there are rules).
    fn unused_id(&self, wanted: String) -> String {
        let mut candidate = wanted.clone();
        let mut n = 1;
        while self.index.contains_key(&candidate) {
            n += 1;
            candidate = format!("{wanted}-{n}");
        }
        candidate
    }
}

/// The rule set as the three response bodies Neutron would give for it: the firewall group,
/// its policies and their rules, with notes for the operator. Rules FWaaS cannot express (to
/// the SI itself, rate limits) are left out, a logging rule is exported without its logging;
/// the notes say which. A rule bound to no IP version
/// becomes an IPv4 and an IPv6 rule; a direction whose default is accept but has rules ends
/// in allow-all rules, since FWaaS policies end in deny.
pub fn export(rule_set: &RuleSet) -> (Vec<Document>, Vec<String>) {
    let mut exporter = Exporter {
        rules: Vec::new(),
        index: HashMap::new(),
    };
    let mut ingress = policy(INGRESS_ID, "ingress");
    let mut egress = policy(EGRESS_ID, "egress");
    let mut notes = Vec::new();
    for rule in &rule_set.rules {
        let policies: Vec<&mut FirewallPolicy> = match rule.direction {
            Direction::RightToLeft => vec![&mut ingress],
            Direction::LeftToRight => vec![&mut egress],
            Direction::Both => vec![&mut ingress, &mut egress],
            Direction::Local => {
                notes.push(format!(
                    "rule {} not exported: traffic to the SI itself has no FWaaS form",
                    rule.id
                ));
                continue;
            }
        };
        if rule.action == Action::Limit {
            notes.push(format!(
                "rule {} not exported: rate limits have no FWaaS form",
                rule.id
            ));
            continue;
        }
        if rule.log {
            notes.push(format!(
                "rule {} exported without its logging: FWaaS rules do not log",
                rule.id
            ));
        }
        let versions = match rule.bound_ip_version() {
            Some(version) => vec![version],
            None => vec![4, 6],
        };
        for policy in policies {
            for &version in &versions {
                let mut exported = from_model(rule, version);
                let mut fallback = format!("dockwall-rule-{}", rule.id);
                if versions.len() > 1 {
                    exported.id = format!("{}-ipv{version}", exported.id);
                    fallback = format!("{fallback}-ipv{version}");
                }
                let id = exporter.add(exported, fallback, &policy.id);
                policy.firewall_rules.push(id);
            }
        }
    }
    let mut group = FirewallGroup {
        id: "dockwall".into(),
        name: Some("dockwall".into()),
        admin_state_up: Some(true),
        shared: Some(false),
        ports: Some(Vec::new()),
        ..FirewallGroup::default()
    };
    let mut policies = Vec::new();
    for (mut policy, direction, slot) in [
        (
            ingress,
            Direction::RightToLeft,
            &mut group.ingress_firewall_policy_id,
        ),
        (
            egress,
            Direction::LeftToRight,
            &mut group.egress_firewall_policy_id,
        ),
    ] {
        let accepts = rule_set.policy_for(direction) == Policy::Accept;
        if accepts && policy.firewall_rules.is_empty() {
            continue;
        }
        if accepts {
            for version in [4, 6] {
                let allow_all = FirewallRule {
                    id: format!("{}-accept-ipv{version}", policy.id),
                    name: Some(format!("default accept (IPv{version})")),
                    action: Some("allow".into()),
                    ip_version: Some(version),
                    enabled: Some(true),
                    shared: Some(false),
                    ..FirewallRule::default()
                };
                let id = exporter.add(allow_all.clone(), allow_all.id, &policy.id);
                policy.firewall_rules.push(id);
            }
        }
        *slot = Some(policy.id.clone());
        policies.push(policy);
    }
    let documents = vec![
        Document {
            firewall_group: Some(group),
            ..Document::default()
        },
        Document {
            firewall_policies: Some(policies),
            ..Document::default()
        },
        Document {
            firewall_rules: Some(exporter.rules),
            ..Document::default()
        },
    ];
    (documents, notes)
}

fn policy(id: &str, name: &str) -> FirewallPolicy {
    FirewallPolicy {
        id: id.into(),
        name: Some(name.into()),
        shared: Some(false),
        audited: Some(false),
        ..FirewallPolicy::default()
    }
}

fn from_model(rule: &Rule, ip_version: u8) -> FirewallRule {
    FirewallRule {
        id: rule
            .external_id
            .clone()
            .unwrap_or_else(|| format!("dockwall-rule-{}", rule.id)),
        name: rule.name.clone(),
        description: rule.comment.clone(),
        shared: Some(false),
        protocol: match rule.protocol {
            Protocol::Any => None,
            // FWaaS says icmp for both and tells them apart by ip_version.
            Protocol::Icmpv6 => Some("icmp".into()),
            other => Some(other.to_string()),
        },
        ip_version: Some(ip_version),
        source_ip_address: rule.source.map(|n| n.to_string()),
        destination_ip_address: rule.destination.map(|n| n.to_string()),
        source_port: rule.source_port.map(String::from),
        destination_port: rule.destination_port.map(String::from),
        action: Some(
            match rule.action {
                Action::Allow | Action::Limit => "allow",
                Action::Deny => "deny",
                Action::Reject => "reject",
            }
            .into(),
        ),
        enabled: Some(rule.enabled),
        ..FirewallRule::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const FIXTURES: [(&str, &str); 3] = [
        (
            "firewall-group.json",
            include_str!("../../../tests/fixtures/fwaas/firewall-group.json"),
        ),
        (
            "firewall-policies.json",
            include_str!("../../../tests/fixtures/fwaas/firewall-policies.json"),
        ),
        (
            "firewall-rules.json",
            include_str!("../../../tests/fixtures/fwaas/firewall-rules.json"),
        ),
    ];

    fn sources(texts: &[(&str, &str)]) -> Vec<(String, String)> {
        texts
            .iter()
            .map(|(name, text)| (name.to_string(), text.to_string()))
            .collect()
    }

    fn imported(texts: &[(&str, &str)]) -> Result<RuleSet> {
        let mut set = RuleSet::default();
        import(&mut set, &sources(texts), PolicyRole::Ingress)?;
        Ok(set)
    }

    fn error_of(texts: &[(&str, &str)]) -> String {
        imported(texts).unwrap_err().to_string()
    }

    /// A lone policy holding one rule with `fields` added to a valid rule.
    fn one_rule(fields: &str) -> String {
        format!(
            r#"{{"firewall_policy": {{"id": "p", "firewall_rules": ["a"]}}}}
               {{"firewall_rules": [{{"id": "z", "action": "deny"}},
                 {{"id": "a", "action": "allow", "protocol": "tcp"{fields}}}]}}"#
        )
    }

    #[test]
    fn api_response_bodies_import_in_policy_order_with_neutron_defaults() {
        let set = imported(&FIXTURES).unwrap();
        let names: Vec<_> = set
            .rules
            .iter()
            .map(|r| r.name.as_deref().unwrap())
            .collect();
        assert_eq!(
            names,
            [
                "allow-http",
                "reject-alt-http",
                "ssh-off",
                "no-udp-5301",
                "allow-ipv4-out"
            ]
        );
        assert!(set.rules[..3]
            .iter()
            .all(|r| r.direction == Direction::RightToLeft));
        assert!(set.rules[3..]
            .iter()
            .all(|r| r.direction == Direction::LeftToRight));
        assert_eq!(set.rules[1].action, Action::Reject);
        assert_eq!(
            set.rules[1].destination_port,
            Some(PortRange {
                first: 8000,
                last: 8080
            })
        );
        assert!(!set.rules[2].enabled);
        assert_eq!(set.rules[2].comment.as_deref(), Some("ssh, switched off"));
        assert_eq!(set.rules[1].comment, None, "an empty description is none");
        assert_eq!(set.rules[4].protocol, Protocol::Any);
        assert_eq!(set.rules[4].ip_version, Some(4));
        // Both directions have a policy: both end in FWaaS's implicit deny.
        assert_eq!(set.policy_for(Direction::LeftToRight), Policy::Drop);
        assert_eq!(set.policy_for(Direction::RightToLeft), Policy::Drop);
        set.validate().unwrap();
    }

    #[test]
    fn one_file_of_concatenated_documents_and_the_combined_document_both_import() {
        let concatenated: String = FIXTURES.iter().map(|(_, text)| *text).collect();
        let from_one = imported(&[("all.json", &concatenated)]).unwrap();
        assert_eq!(from_one, imported(&FIXTURES).unwrap());

        let combined = r#"{
          "firewall_group": {"name": "web", "ingress_firewall_policy_id": "p-in"},
          "firewall_policies": [{"id": "p-in", "firewall_rules": ["r-web"]}],
          "firewall_rules": [{"id": "r-web", "protocol": "tcp", "destination_port": "80", "action": "allow"}]
        }"#;
        let set = imported(&[("combined.json", combined)]).unwrap();
        assert_eq!(set.rules.len(), 1);
        assert_eq!(set.policy_for(Direction::RightToLeft), Policy::Drop);
        assert_eq!(
            set.policy_for(Direction::LeftToRight),
            Policy::Accept,
            "no egress policy: left → right stays open"
        );
    }

    #[test]
    fn a_lone_policy_filters_the_direction_asked_for() {
        let mut set = RuleSet::default();
        import(
            &mut set,
            &sources(&[("p", &one_rule(""))]),
            PolicyRole::Egress,
        )
        .unwrap();
        assert_eq!(set.rules[0].direction, Direction::LeftToRight);
        assert_eq!(set.policy_for(Direction::LeftToRight), Policy::Drop);
        assert_eq!(set.policy_for(Direction::RightToLeft), Policy::Accept);
    }

    #[test]
    fn older_releases_field_forms_are_accepted() {
        // `public` before the rename to `shared`, one policy id instead of a list, position.
        let text = one_rule(r#", "public": true, "firewall_policy_id": "p", "position": 1"#);
        imported(&[("old", &text)]).unwrap();
        let text = one_rule(r#", "firewall_policy_id": null, "source_firewall_group_id": null"#);
        imported(&[("nulls", &text)]).unwrap();
    }

    #[test]
    fn errors_name_the_source_the_json_path_the_resource_and_its_id() {
        let cases = [
            (
                one_rule(r#", "colour": "red""#),
                r#"p, document 2, firewall_rules[1].colour: firewall_rule "a": unknown field `colour`"#,
            ),
            (
                one_rule(r#", "destination_port": "0""#),
                r#"p, document 2, firewall_rules[1].destination_port: firewall_rule "a": invalid port "0""#,
            ),
            (
                one_rule(r#", "destination_port": "90:80""#),
                "firewall_rules[1].destination_port",
            ),
            (
                one_rule(r#", "destination_port": 80"#),
                "firewall_rules[1].destination_port: firewall_rule \"a\": invalid type: integer",
            ),
            (
                one_rule(r#", "source_firewall_group_id": "g1""#),
                r#"firewall_rules[1].source_firewall_group_id: firewall_rule "a": "g1": remote firewall groups are not supported"#,
            ),
            (
                one_rule(r#", "destination_firewall_group_id": "g2""#),
                "remote firewall groups are not supported",
            ),
            (
                one_rule(r#", "action": "permit""#),
                r#"firewall_rules[1].action: firewall_rule "a": "permit": use allow, deny or reject"#,
            ),
            (
                one_rule(r#", "source_ip_address": "fd00::1""#),
                r#"firewall_rules[1].ip_version: firewall_rule "a": 4: the addresses are IPv6"#,
            ),
            (
                one_rule(r#", "ip_version": 5"#),
                r#"p, document 2, firewall_rules[1].ip_version: firewall_rule "a": 5: use 4 or 6"#,
            ),
            (
                one_rule(r#", "source_ip_address": "10.0.0.1", "destination_ip_address": "fd00::1""#),
                r#"firewall_rules[1].destination_ip_address: firewall_rule "a": fd00::1/128: source and destination must both be IPv4"#,
            ),
            (
                r#"{"firewall_policy": {"id": "p", "firewall_rules": ["a"]},
                    "firewall_rules": [{"id": "a", "protocol": "icmpv6"}]}"#
                    .into(),
                r#"firewall_rules[0].protocol: firewall_rule "a": icmpv6: icmpv6 is IPv6"#,
            ),
            (
                r#"{"firewall_policy": {"id": "p", "firewall_rules": ["b"]}, "firewall_rules": []}"#.into(),
                r#"firewall_policy.firewall_rules[0]: firewall_policy "p": rule "b" is not among the documents"#,
            ),
            (
                r#"{"firewall_group": {"id": "g", "egress_firewall_policy_id": "q"}}"#.into(),
                r#"firewall_group.egress_firewall_policy_id: firewall_group "g": no firewall_policy "q""#,
            ),
            (
                r#"{"firewall_group": {"id": "g", "colour": 1}}"#.into(),
                r#"firewall_group.colour: firewall_group "g": unknown field"#,
            ),
            (
                r#"{"firewall_policies": [{"id": "p", "colour": 1}]}"#.into(),
                r#"firewall_policies[0].colour: firewall_policy "p": unknown field"#,
            ),
            (r#"{"firewall_rules": []}"#.into(), "no firewall_group and no firewall_policy"),
            (r#"{"firewall_rules": [}"#.into(), "not JSON"),
            (String::new(), "empty"),
            (r#"{"firewall_groups": []}"#.into(), "no firewall_group and no firewall_policy"),
            (
                r#"{"firewall_groups": [{"id": "g1"}, {"id": "g2"}]}"#.into(),
                r#"firewall_groups[1]: firewall_group "g2": a second firewall group; import one group at a time (the body of GET /v2.0/fwaas/firewall_groups/{id})"#,
            ),
        ];
        for (text, needle) in cases {
            let error = error_of(&[("p", &text)]);
            assert!(error.contains(needle), "{text}\n→ {error}\nwants {needle}");
        }
    }

    #[test]
    fn the_same_id_twice_is_one_resource_unless_they_filter_differently() {
        let rule = r#"{"firewall_rule": {"id": "a", "action": "allow", "name": "web"}}"#;
        let policy = r#"{"firewall_policy": {"id": "p", "firewall_rules": ["a"]}}"#;
        let set = imported(&[("1", policy), ("2", rule), ("3", rule)]).unwrap();
        assert_eq!(set.rules.len(), 1);
        // As a rule's own body and as listed with its policy: names, sharing and positions
        // may differ.
        let listed = r#"{"firewall_rules": [{"id": "a", "action": "allow", "name": "www",
            "description": "d", "shared": true, "position": 1, "firewall_policy_id": ["p"]}]}"#;
        let set = imported(&[("1", policy), ("2", rule), ("3", listed)]).unwrap();
        assert_eq!(
            set.rules[0].name.as_deref(),
            Some("web"),
            "the first is kept"
        );
        let renamed = r#"{"firewall_policy": {"id": "p", "firewall_rules": ["a"],
            "name": "other", "audited": true}}"#;
        imported(&[("1", policy), ("2", rule), ("3", renamed)]).unwrap();

        let other = r#"{"firewall_rule": {"id": "a", "action": "deny"}}"#;
        let error = error_of(&[("1", policy), ("2", rule), ("3", other)]);
        assert!(
            error.contains("filters differently from the firewall_rule with this id at 2"),
            "{error}"
        );
        let reordered = r#"{"firewall_policy": {"id": "p", "firewall_rules": []}}"#;
        let error = error_of(&[("1", policy), ("2", rule), ("3", reordered)]);
        assert!(error.contains("filters differently"), "{error}");
    }

    #[test]
    fn a_list_of_one_firewall_group_imports_like_the_group() {
        let mut texts = FIXTURES.to_vec();
        let group = serde_json::from_str::<serde_json::Value>(FIXTURES[0].1).unwrap();
        let listed = serde_json::json!({"firewall_groups": [group["firewall_group"]]}).to_string();
        texts[0] = ("groups.json", &listed);
        assert_eq!(imported(&texts).unwrap(), imported(&FIXTURES).unwrap());
    }

    #[test]
    fn a_policy_with_no_enabled_rules_is_named_in_the_notes() {
        let disabled = r#"{"firewall_policy": {"id": "p", "firewall_rules": ["a"]}}
            {"firewall_rule": {"id": "a", "action": "allow", "enabled": false}}"#;
        let mut set = RuleSet::default();
        let imported = import(&mut set, &sources(&[("p", disabled)]), PolicyRole::Egress).unwrap();
        assert_eq!(
            imported.notes,
            [r#"egress policy "p" has no enabled rules: all left→right traffic is dropped"#]
        );
        let empty = r#"{"firewall_group": {"id": "g", "ingress_firewall_policy_id": "q",
            "egress_firewall_policy_id": "p"}}
            {"firewall_policies": [{"id": "q", "firewall_rules": []},
                                   {"id": "p", "firewall_rules": ["a"]}]}
            {"firewall_rule": {"id": "a", "action": "allow"}}"#;
        let imported = import(&mut set, &sources(&[("g", empty)]), PolicyRole::Ingress).unwrap();
        assert_eq!(
            imported.notes,
            [r#"ingress policy "q" has no enabled rules: all right→left traffic is dropped"#]
        );
    }

    #[test]
    fn an_administratively_down_group_drops_everything() {
        let mut texts = FIXTURES.to_vec();
        let down = FIXTURES[0]
            .1
            .replace(r#""admin_state_up": true"#, r#""admin_state_up": false"#);
        texts[0] = ("down.json", &down);
        let mut set = RuleSet::default();
        let result = import(&mut set, &sources(&texts), PolicyRole::Ingress).unwrap();
        assert_eq!(
            result.notes.len(),
            1,
            "only the group's state: {:?}",
            result.notes
        );
        assert!(result.notes[0].contains("new connections in both directions are dropped"));
        assert!(set.rules.is_empty());
        assert_eq!(set.policy_for(Direction::LeftToRight), Policy::Drop);
        assert_eq!(set.policy_for(Direction::RightToLeft), Policy::Drop);
    }

    fn round_trip(set: &RuleSet) -> RuleSet {
        let (documents, skipped) = export(set);
        assert!(skipped.is_empty(), "{skipped:?}");
        let text: String = documents
            .iter()
            .map(|d| serde_json::to_string_pretty(d).unwrap() + "\n")
            .collect();
        let mut again = RuleSet::default();
        import(
            &mut again,
            &sources(&[("export", &text)]),
            PolicyRole::Ingress,
        )
        .unwrap();
        again
    }

    fn without_ids(set: &RuleSet) -> RuleSet {
        let mut set = set.clone();
        set.rules.iter_mut().for_each(|r| r.id = 0);
        set.next_id = 0;
        set
    }

    #[test]
    fn export_then_import_gives_the_same_rules() {
        let set = imported(&FIXTURES).unwrap();
        let again = round_trip(&set);
        assert_eq!(without_ids(&again), without_ids(&set));
        assert_eq!(export(&again).0, export(&set).0, "and the same export");
    }

    #[test]
    fn rules_fwaas_words_differently_keep_their_meaning() {
        // A both-directions rule bound to no IP version, under default accept: in FWaaS
        // an IPv4 and an IPv6 rule in each policy, each policy ending in allow-all.
        let mut set = RuleSet::default();
        let id = set.allocate_id();
        set.rules.push(Rule {
            protocol: Protocol::Tcp,
            destination_port: Some(PortRange::single(25)),
            ..Rule::new(id, Action::Deny, Direction::Both)
        });
        let (documents, _) = export(&set);
        let rules = documents[2].firewall_rules.as_ref().unwrap();
        let ids: Vec<&str> = rules.iter().map(|r| r.id.as_str()).collect();
        assert_eq!(
            ids,
            [
                "dockwall-rule-1-ipv4",
                "dockwall-rule-1-ipv6",
                "dockwall-ingress-accept-ipv4",
                "dockwall-ingress-accept-ipv6",
                "dockwall-egress-accept-ipv4",
                "dockwall-egress-accept-ipv6"
            ]
        );
        assert_eq!(
            rules[0].firewall_policy_id,
            ["dockwall-ingress", "dockwall-egress"],
            "one FWaaS rule in both policies"
        );
        let again = round_trip(&set);
        assert_eq!(again.rules.len(), 8);
        assert_eq!(again.rules[0].destination_port, Some(PortRange::single(25)));
        assert_eq!(round_trip(&again).rules.len(), 8, "stable from then on");

        // Default accept and no rules: no policy at all.
        let (documents, _) = export(&RuleSet::default());
        let group = documents[0].firewall_group.as_ref().unwrap();
        assert_eq!(group.ingress_firewall_policy_id, None);
        assert_eq!(group.egress_firewall_policy_id, None);
    }

    fn native_rule(set: &mut RuleSet, action: Action, port: u16) -> &mut Rule {
        let id = set.allocate_id();
        set.rules.push(Rule {
            id,
            name: None,
            action,
            rate: None,
            direction: Direction::RightToLeft,
            protocol: Protocol::Tcp,
            ip_version: Some(4),
            source: None,
            destination: None,
            source_port: None,
            destination_port: Some(PortRange::single(port)),
            enabled: true,
            log: false,
            comment: None,
            external_id: None,
        });
        set.rules.last_mut().unwrap()
    }

    #[test]
    fn export_never_writes_one_id_for_two_rules() {
        // An imported rule whose FWaaS id is what native rule 2 would get, and one whose id
        // is what the first fallback would be.
        let mut set = RuleSet::default();
        native_rule(&mut set, Action::Allow, 80).external_id = Some("dockwall-rule-2".into());
        native_rule(&mut set, Action::Deny, 25);
        native_rule(&mut set, Action::Allow, 443).external_id = Some("dockwall-rule-2-2".into());
        let (documents, _) = export(&set);
        let ids: Vec<&str> = documents[2]
            .firewall_rules
            .as_ref()
            .unwrap()
            .iter()
            .map(|r| r.id.as_str())
            .collect();
        assert_eq!(
            ids[..3],
            ["dockwall-rule-2", "dockwall-rule-2-2", "dockwall-rule-3"],
            "then the allow-all rules of default accept"
        );
        let again = round_trip(&set);
        let ports: Vec<_> = again.rules.iter().map(|r| r.destination_port).collect();
        assert_eq!(
            ports[..3],
            [80, 25, 443].map(|p| Some(PortRange::single(p))),
            "all three, in order"
        );
    }

    #[test]
    fn export_keeps_a_logging_rule_without_its_logging_and_leaves_limits_out() {
        let mut set = RuleSet::default();
        native_rule(&mut set, Action::Deny, 25).log = true;
        let limit = native_rule(&mut set, Action::Limit, 22);
        limit.rate = Some("10/second".parse().unwrap());
        let (documents, notes) = export(&set);
        assert_eq!(
            notes,
            [
                "rule 1 exported without its logging: FWaaS rules do not log",
                "rule 2 not exported: rate limits have no FWaaS form"
            ]
        );
        let rules = documents[2].firewall_rules.as_ref().unwrap();
        assert_eq!(rules[0].destination_port.as_deref(), Some("25"));
        assert_eq!(rules[0].action.as_deref(), Some("deny"));
        assert!(
            rules[1..].iter().all(|r| r.id.contains("-accept-")),
            "no other rule: {rules:?}"
        );
    }
}

//! The Neutron FWaaS v2 resources exactly as the API returns them (the neutron-lib API
//! reference, `api-ref/source/v2/fwaas-v2.inc`): every documented field is accepted, any
//! other is refused. Documents come from any number of sources, each holding one or more
//! concatenated JSON documents; every resource remembers where it came from, so an error
//! names the source and the JSON path (`firewall_rules[3].destination_port`).

use serde::de::{Deserializer, Error as _};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use vnf_core::{Error, Result};

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FirewallRule {
    pub id: String,
    #[serde(default)]
    pub name: Option<String>,
    #[serde(default)]
    pub description: Option<String>,
    #[serde(default)]
    pub tenant_id: Option<String>,
    #[serde(default)]
    pub project_id: Option<String>,
    /// `public` in releases before the rename to `shared`.
    #[serde(default, alias = "public")]
    pub shared: Option<bool>,
    /// Null means any protocol.
    #[serde(default)]
    pub protocol: Option<String>,
    /// Neutron's default is 4.
    #[serde(default)]
    pub ip_version: Option<u8>,
    #[serde(default)]
    pub source_ip_address: Option<String>,
    #[serde(default)]
    pub destination_ip_address: Option<String>,
    /// `"N"` or `"A:B"`.
    #[serde(default)]
    pub source_port: Option<String>,
    #[serde(default)]
    pub destination_port: Option<String>,
    /// Remote firewall groups: only null is supported.
    #[serde(default)]
    pub source_firewall_group_id: Option<String>,
    #[serde(default)]
    pub destination_firewall_group_id: Option<String>,
    /// allow, deny or reject; Neutron's default is deny.
    #[serde(default)]
    pub action: Option<String>,
    #[serde(default)]
    pub enabled: Option<bool>,
    /// The policies holding the rule: a list today, one id (or null) in older releases.
    #[serde(default, deserialize_with = "one_or_many")]
    pub firewall_policy_id: Vec<String>,
    /// The rule's place in its policy, in older releases; the policy's list is what counts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub position: Option<u32>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FirewallPolicy {
    #[serde(default)]
    pub id: String,
    #[serde(default)]
    pub name: Option<String>,
    #[serde(default)]
    pub description: Option<String>,
    #[serde(default)]
    pub tenant_id: Option<String>,
    #[serde(default)]
    pub project_id: Option<String>,
    #[serde(default, alias = "public")]
    pub shared: Option<bool>,
    #[serde(default)]
    pub audited: Option<bool>,
    /// Rule ids in evaluation order.
    #[serde(default)]
    pub firewall_rules: Vec<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FirewallGroup {
    #[serde(default)]
    pub id: String,
    #[serde(default)]
    pub name: Option<String>,
    #[serde(default)]
    pub description: Option<String>,
    #[serde(default)]
    pub tenant_id: Option<String>,
    #[serde(default)]
    pub project_id: Option<String>,
    #[serde(default, alias = "public")]
    pub shared: Option<bool>,
    /// False: Neutron blocks all traffic through the group.
    #[serde(default)]
    pub admin_state_up: Option<bool>,
    #[serde(default)]
    pub status: Option<String>,
    /// The Neutron ports the group protects; here the SI's left side is the protected one.
    #[serde(default)]
    pub ports: Option<Vec<String>>,
    #[serde(default)]
    pub ingress_firewall_policy_id: Option<String>,
    #[serde(default)]
    pub egress_firewall_policy_id: Option<String>,
}

/// One JSON document: an API response body (`{"firewall_rule": …}`, `{"firewall_rules":
/// […]}`, …) or several of them merged into one object, as older Dockwall exports were.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Document {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub firewall_group: Option<FirewallGroup>,
    /// `GET /v2.0/fwaas/firewall_groups`: accepted when it lists one group.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub firewall_groups: Option<Vec<FirewallGroup>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub firewall_policy: Option<FirewallPolicy>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub firewall_policies: Option<Vec<FirewallPolicy>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub firewall_rule: Option<FirewallRule>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub firewall_rules: Option<Vec<FirewallRule>>,
}

fn one_or_many<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Vec<String>, D::Error> {
    match Option::<Value>::deserialize(deserializer)? {
        None => Ok(Vec::new()),
        Some(Value::String(id)) => Ok(vec![id]),
        Some(Value::Array(ids)) => ids
            .into_iter()
            .map(|id| match id {
                Value::String(id) => Ok(id),
                other => Err(D::Error::custom(format!(
                    "expected a policy id string, found {other}"
                ))),
            })
            .collect(),
        Some(other) => Err(D::Error::custom(format!(
            "expected null, a policy id or a list of them, found {other}"
        ))),
    }
}

/// Where a resource came from: the source (a file name or `-`) and its JSON path there.
#[derive(Debug, Clone, PartialEq)]
pub struct Origin {
    pub source: String,
    pub path: String,
}

impl Origin {
    /// An error about `field` of this resource (`None`: the resource as a whole).
    pub fn error(
        &self,
        resource: &str,
        id: &str,
        field: Option<&str>,
        reason: impl std::fmt::Display,
    ) -> Error {
        let path = match field {
            Some(field) => format!("{}.{field}", self.path),
            None => self.path.clone(),
        };
        let what = if id.is_empty() {
            resource.to_string()
        } else {
            format!("{resource} {id:?}")
        };
        Error::Vnf(format!(
            "invalid FWaaS document {}, {path}: {what}: {reason}",
            self.source
        ))
    }
}

#[derive(Debug, Clone)]
pub struct Located<T> {
    pub resource: T,
    pub origin: Origin,
}

/// Everything the sources hold, resources of one kind in the order given.
#[derive(Debug, Default)]
pub struct Gathered {
    pub groups: Vec<Located<FirewallGroup>>,
    pub policies: Vec<Located<FirewallPolicy>>,
    pub rules: Vec<Located<FirewallRule>>,
}

impl Gathered {
    /// Parses every document of `text` (concatenated JSON values) from `source`.
    pub fn read(&mut self, source: &str, text: &str) -> Result<()> {
        let stream = serde_json::Deserializer::from_str(text).into_iter::<Value>();
        let mut count = 0;
        for value in stream {
            count += 1;
            let value = value.map_err(|e| {
                Error::Vnf(format!("invalid FWaaS document {source}: not JSON: {e}"))
            })?;
            let at = |path: &str| {
                // Paths are per document; a second document in one source says which it is.
                let document = if count > 1 {
                    format!("document {count}, ")
                } else {
                    String::new()
                };
                Origin {
                    source: source.to_string(),
                    path: format!("{document}{path}"),
                }
            };
            let document: Document = serde_path_to_error::deserialize(&value).map_err(|e| {
                let path = e.path().to_string();
                let (resource, id) = resource_at(&value, e.path());
                at(&path).error(resource, &id, None, e.inner())
            })?;
            let Document {
                firewall_group,
                firewall_groups,
                firewall_policy,
                firewall_policies,
                firewall_rule,
                firewall_rules,
            } = document;
            let many = |name: &'static str| move |index| at(&format!("{name}[{index}]"));
            self.groups
                .extend(located(firewall_group, |_| at("firewall_group")));
            self.groups.extend(located(
                firewall_groups.into_iter().flatten(),
                many("firewall_groups"),
            ));
            self.policies
                .extend(located(firewall_policy, |_| at("firewall_policy")));
            self.policies.extend(located(
                firewall_policies.into_iter().flatten(),
                many("firewall_policies"),
            ));
            self.rules
                .extend(located(firewall_rule, |_| at("firewall_rule")));
            self.rules.extend(located(
                firewall_rules.into_iter().flatten(),
                many("firewall_rules"),
            ));
        }
        if count == 0 {
            return Err(Error::Vnf(format!(
                "invalid FWaaS document {source}: empty; give a firewall_group, \
                 firewall_policy or firewall_rules response body"
            )));
        }
        Ok(())
    }
}

/// The resources with their origins, by index.
fn located<T>(
    resources: impl IntoIterator<Item = T>,
    origin: impl Fn(usize) -> Origin,
) -> impl Iterator<Item = Located<T>> {
    resources
        .into_iter()
        .enumerate()
        .map(move |(index, resource)| Located {
            resource,
            origin: origin(index),
        })
}

/// The resource kind and id enclosing `path` in `document`, for an error message.
fn resource_at(document: &Value, path: &serde_path_to_error::Path) -> (&'static str, String) {
    use serde_path_to_error::Segment;
    let mut resource = "document";
    let mut id = String::new();
    let mut at = document;
    for segment in path.iter() {
        let next = match segment {
            Segment::Map { key } => {
                if let Some(kind) = kind_of(key) {
                    resource = kind;
                }
                at.get(key)
            }
            Segment::Seq { index } => at.get(index),
            _ => None,
        };
        let Some(next) = next else { break };
        at = next;
        if let Some(found) = at.get("id").and_then(Value::as_str) {
            id = found.to_string();
        }
    }
    (resource, id)
}

fn kind_of(key: &str) -> Option<&'static str> {
    match key {
        "firewall_group" | "firewall_groups" => Some("firewall_group"),
        "firewall_policy" | "firewall_policies" => Some("firewall_policy"),
        "firewall_rule" | "firewall_rules" => Some("firewall_rule"),
        _ => None,
    }
}

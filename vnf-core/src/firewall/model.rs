//! The firewall rule model: what operators edit, what the state file stores, what the
//! compiler turns into nftables. Parsing is strict: an unknown field, a bad CIDR, a port out
//! of range or a family mix is an error that names the field and the value.

use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::str::FromStr;

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

use super::mirror::Mirror;
use super::mode::ServiceMode;
use crate::error::{Error, Result};
use crate::side::Side;

pub const FORMAT_VERSION: u32 = 1;

/// A CIDR or a bare address (a host prefix), with the host bits cleared: how every front
/// end (flags, ufw, FWaaS, the API, mirror matches) reads an address; None when it is neither.
pub fn parse_net(text: &str) -> Option<IpNet> {
    text.parse::<IpNet>()
        .map(|net| net.trunc())
        .or_else(|_| text.parse::<std::net::IpAddr>().map(IpNet::from))
        .ok()
}

/// The whole firewall configuration of one SI.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RuleSet {
    pub version: u32,
    /// What happens to forwarded traffic no rule decides, in both directions unless a
    /// direction overrides it below.
    #[serde(default)]
    pub default_policy: Policy,
    /// Overrides `default_policy` for left → right (an imported FWaaS egress policy ends in
    /// its implicit deny).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub left_to_right_policy: Option<Policy>,
    /// Overrides `default_policy` for right → left (FWaaS ingress).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub right_to_left_policy: Option<Policy>,
    /// Rules in evaluation order: the first match decides.
    #[serde(default)]
    pub rules: Vec<Rule>,
    #[serde(default)]
    pub nat: Vec<NatRule>,
    /// Copies of traffic to collectors; absent in files written before mirrors existed.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub mirrors: Vec<Mirror>,
    /// The id the next new rule, NAT rule or mirror gets; ids are never reused.
    #[serde(default = "first_id")]
    pub next_id: u64,
    /// The service mode `dockwall run` last started in: edits compile for it.
    #[serde(default, skip_serializing_if = "ServiceMode::is_default")]
    pub mode: ServiceMode,
}

fn first_id() -> u64 {
    1
}

impl Default for RuleSet {
    fn default() -> Self {
        RuleSet {
            version: FORMAT_VERSION,
            default_policy: Policy::Accept,
            left_to_right_policy: None,
            right_to_left_policy: None,
            rules: Vec::new(),
            nat: Vec::new(),
            mirrors: Vec::new(),
            next_id: first_id(),
            mode: ServiceMode::default(),
        }
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Policy {
    /// The SI forwards with no configuration, as a router would.
    #[default]
    Accept,
    Drop,
}

/// One filter rule.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Rule {
    /// Stable across edits; `delete --id` and counters use it.
    pub id: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    pub action: Action,
    /// For `limit`: the rate above which matching packets are dropped.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate: Option<Rate>,
    pub direction: Direction,
    #[serde(default)]
    pub protocol: Protocol,
    /// 4 or 6: the rule matches only that IP version even without addresses (FWaaS
    /// `ip_version`); none matches both.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ip_version: Option<u8>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<IpNet>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub destination: Option<IpNet>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source_port: Option<PortRange>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub destination_port: Option<PortRange>,
    #[serde(default = "enabled_by_default")]
    pub enabled: bool,
    #[serde(default)]
    pub log: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub comment: Option<String>,
    /// The id the rule had in an imported FWaaS policy, kept for export.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub external_id: Option<String>,
}

fn enabled_by_default() -> bool {
    true
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Action {
    Allow,
    Deny,
    /// Deny and tell the sender: a TCP reset for TCP, ICMP port unreachable otherwise.
    Reject,
    /// Allow up to a rate, drop above it.
    Limit,
}

impl Action {
    /// The action's word, as the state file, the CLI, ufw and metrics labels spell it.
    pub fn as_str(self) -> &'static str {
        match self {
            Action::Allow => "allow",
            Action::Deny => "deny",
            Action::Reject => "reject",
            Action::Limit => "limit",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum Direction {
    LeftToRight,
    RightToLeft,
    Both,
    /// Traffic to the SI itself, from any side.
    Local,
}

/// An IP protocol: a name or a number 0-255.
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize,
)]
#[serde(try_from = "String", into = "String")]
pub enum Protocol {
    #[default]
    Any,
    Tcp,
    Udp,
    Icmp,
    Icmpv6,
    Number(u8),
}

const PROTOCOL_NAMES: &[(&str, u8)] = &[
    ("sctp", 132),
    ("gre", 47),
    ("esp", 50),
    ("ah", 51),
    ("ospf", 89),
];

impl Protocol {
    pub fn carries_ports(self) -> bool {
        matches!(self, Protocol::Tcp | Protocol::Udp) || self == Protocol::Number(132)
    }

    /// The protocol number nftables matches with `meta l4proto`.
    pub fn number(self) -> Option<u8> {
        match self {
            Protocol::Any => None,
            Protocol::Tcp => Some(6),
            Protocol::Udp => Some(17),
            Protocol::Icmp => Some(1),
            Protocol::Icmpv6 => Some(58),
            Protocol::Number(n) => Some(n),
        }
    }
}

impl FromStr for Protocol {
    type Err = Error;

    fn from_str(text: &str) -> Result<Self> {
        let lower = text.trim().to_ascii_lowercase();
        let protocol = match lower.as_str() {
            "" | "any" | "all" => Protocol::Any,
            "tcp" | "6" => Protocol::Tcp,
            "udp" | "17" => Protocol::Udp,
            "icmp" | "1" => Protocol::Icmp,
            "icmpv6" | "ipv6-icmp" | "58" => Protocol::Icmpv6,
            other => match other.parse::<u8>() {
                Ok(n) => Protocol::Number(n),
                Err(_) => match PROTOCOL_NAMES.iter().find(|(name, _)| *name == other) {
                    Some(&(_, n)) => Protocol::Number(n),
                    None => {
                        return Err(Error::invalid(
                            "protocol",
                            text,
                            "unknown protocol name; use tcp, udp, icmp, icmpv6, any, sctp, gre, esp, ah, ospf or a number 0-255",
                        ))
                    }
                },
            },
        };
        Ok(protocol)
    }
}

impl TryFrom<String> for Protocol {
    type Error = Error;
    fn try_from(text: String) -> Result<Self> {
        text.parse()
    }
}

impl From<Protocol> for String {
    fn from(protocol: Protocol) -> String {
        protocol.to_string()
    }
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Protocol::Any => f.write_str("any"),
            Protocol::Tcp => f.write_str("tcp"),
            Protocol::Udp => f.write_str("udp"),
            Protocol::Icmp => f.write_str("icmp"),
            Protocol::Icmpv6 => f.write_str("icmpv6"),
            Protocol::Number(n) => write!(f, "{n}"),
        }
    }
}

/// A port or an inclusive port range, written `N`, `a:b` (FWaaS) or `a-b`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct PortRange {
    pub first: u16,
    pub last: u16,
}

impl PortRange {
    pub fn single(port: u16) -> Self {
        PortRange {
            first: port,
            last: port,
        }
    }

    pub fn is_single(self) -> bool {
        self.first == self.last
    }
}

fn parse_port(text: &str, whole: &str) -> Result<u16> {
    let value: u64 = text
        .trim()
        .parse()
        .map_err(|_| Error::invalid("port", whole, "not a number; use N or FIRST:LAST"))?;
    match u16::try_from(value) {
        Ok(port) if port > 0 => Ok(port),
        _ => Err(Error::invalid(
            "port",
            whole,
            format!("{value} is outside 1-65535"),
        )),
    }
}

impl FromStr for PortRange {
    type Err = Error;

    fn from_str(text: &str) -> Result<Self> {
        let (first, last) = match text.split_once([':', '-']) {
            Some((a, b)) => (parse_port(a, text)?, parse_port(b, text)?),
            None => {
                let port = parse_port(text, text)?;
                (port, port)
            }
        };
        if first > last {
            return Err(Error::invalid(
                "port range",
                text,
                "the first port is above the last",
            ));
        }
        Ok(PortRange { first, last })
    }
}

impl TryFrom<String> for PortRange {
    type Error = Error;
    fn try_from(text: String) -> Result<Self> {
        text.parse()
    }
}

impl From<PortRange> for String {
    fn from(range: PortRange) -> String {
        range.to_string()
    }
}

impl fmt::Display for PortRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.is_single() {
            write!(f, "{}", self.first)
        } else {
            write!(f, "{}:{}", self.first, self.last)
        }
    }
}

/// Packets per time unit, written `10/second`, `30/minute`, `100/hour` or `1000/day`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Rate {
    pub packets: u32,
    pub per: TimeUnit,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum TimeUnit {
    Second,
    Minute,
    Hour,
    Day,
}

impl TimeUnit {
    pub fn as_str(self) -> &'static str {
        match self {
            TimeUnit::Second => "second",
            TimeUnit::Minute => "minute",
            TimeUnit::Hour => "hour",
            TimeUnit::Day => "day",
        }
    }
}

impl FromStr for Rate {
    type Err = Error;

    fn from_str(text: &str) -> Result<Self> {
        let error = || {
            Error::invalid(
                "rate",
                text,
                "use PACKETS/UNIT, e.g. 10/second, 30/minute, 100/hour, 1000/day",
            )
        };
        let (count, unit) = text.split_once('/').ok_or_else(error)?;
        let packets: u32 = count.trim().parse().map_err(|_| error())?;
        if packets == 0 {
            return Err(error());
        }
        let per = match unit.trim() {
            "s" | "second" => TimeUnit::Second,
            "m" | "minute" => TimeUnit::Minute,
            "h" | "hour" => TimeUnit::Hour,
            "d" | "day" => TimeUnit::Day,
            _ => return Err(error()),
        };
        Ok(Rate { packets, per })
    }
}

impl TryFrom<String> for Rate {
    type Error = Error;
    fn try_from(text: String) -> Result<Self> {
        text.parse()
    }
}

impl From<Rate> for String {
    fn from(rate: Rate) -> String {
        format!("{}/{}", rate.packets, rate.per.as_str())
    }
}

/// A NAT rule.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NatRule {
    pub id: u64,
    pub kind: NatKind,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub comment: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase", deny_unknown_fields)]
pub enum NatKind {
    /// Rewrite the source to the SI's address on the `out` side.
    Masquerade {
        out: Side,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        source: Option<IpNet>,
    },
    /// Rewrite the source to a fixed address.
    Snat {
        out: Side,
        to: IpAddr,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        source: Option<IpNet>,
    },
    /// Port-forward (floating-IP style): the SI's address on the `inbound` side, `port`,
    /// goes to `to`; the matching filter allowance comes with it.
    Dnat {
        protocol: Protocol,
        port: u16,
        to: SocketAddr,
        #[serde(default = "right_side", rename = "in")]
        inbound: Side,
    },
}

fn right_side() -> Side {
    Side::Right
}

fn family_of(net: &IpNet) -> u8 {
    match net {
        IpNet::V4(_) => 4,
        IpNet::V6(_) => 6,
    }
}

impl Rule {
    /// A rule that matches all traffic of `direction`, enabled, with no name, log or comment:
    /// what every front end starts from before it sets the match.
    pub fn new(id: u64, action: Action, direction: Direction) -> Rule {
        Rule {
            id,
            name: None,
            action,
            rate: None,
            direction,
            protocol: Protocol::Any,
            source: None,
            destination: None,
            source_port: None,
            destination_port: None,
            enabled: true,
            log: false,
            comment: None,
            external_id: None,
            ip_version: None,
        }
    }

    /// The IP version the rule is bound to by its addresses, its `ip_version` or its
    /// protocol, if any.
    pub fn bound_ip_version(&self) -> Option<u8> {
        self.source
            .as_ref()
            .or(self.destination.as_ref())
            .map(family_of)
            .or(self.ip_version)
            .or(match self.protocol {
                Protocol::Icmp => Some(4),
                Protocol::Icmpv6 => Some(6),
                _ => None,
            })
    }

    pub fn validate(&self) -> Result<()> {
        self.validate_as(&format!("rule {}", self.id))
    }

    /// Checks the rule; errors call it `label` (a rule not yet added is named by the position
    /// and id it would get, not by an id the user has never seen).
    pub fn validate_as(&self, label: &str) -> Result<()> {
        let what = |field: &'static str, value: String, reason: &str| {
            Err(Error::invalid(field, value, format!("{label}: {reason}")))
        };
        if let (Some(source), Some(destination)) = (&self.source, &self.destination) {
            if family_of(source) != family_of(destination) {
                return what(
                    "destination",
                    destination.to_string(),
                    "source and destination must both be IPv4 or both IPv6",
                );
            }
        }
        let family = self
            .source
            .as_ref()
            .or(self.destination.as_ref())
            .map(family_of);
        match (self.ip_version, family) {
            (Some(version), _) if version != 4 && version != 6 => {
                return what("ip_version", version.to_string(), "use 4 or 6")
            }
            (Some(version), Some(family)) if version != family => {
                return what(
                    "ip_version",
                    version.to_string(),
                    &format!("the addresses are IPv{family}"),
                )
            }
            _ => {}
        }
        let family = family.or(self.ip_version);
        match (self.protocol, family) {
            (Protocol::Icmp, Some(6)) => {
                return what(
                    "protocol",
                    "icmp".into(),
                    "icmp is IPv4; use icmpv6 with IPv6 addresses",
                )
            }
            (Protocol::Icmpv6, Some(4)) => {
                return what(
                    "protocol",
                    "icmpv6".into(),
                    "icmpv6 is IPv6; use icmp with IPv4 addresses",
                )
            }
            _ => {}
        }
        for port in [self.source_port, self.destination_port]
            .into_iter()
            .flatten()
        {
            if !self.protocol.carries_ports() {
                return what(
                    "protocol",
                    self.protocol.to_string(),
                    &format!("port {port} needs protocol tcp, udp or sctp"),
                );
            }
        }
        match (self.action, self.rate) {
            (Action::Limit, None) => {
                return what(
                    "rate",
                    "none".into(),
                    "action limit needs a rate such as 10/second",
                )
            }
            (Action::Limit, Some(_)) | (_, None) => {}
            (_, Some(rate)) => {
                return what(
                    "rate",
                    String::from(rate),
                    "a rate only goes with action limit",
                )
            }
        }
        if self.direction == Direction::Local
            && self.protocol == Protocol::Any
            && self.action != Action::Allow
            && self.source.is_none()
        {
            // Locking out every peer of the SI, management included, is almost always a mistake.
            return what(
                "direction",
                "local".into(),
                "denying all traffic to the SI would cut management off; give a source or protocol",
            );
        }
        Ok(())
    }
}

impl NatRule {
    pub fn validate(&self) -> Result<()> {
        self.validate_as(&format!("NAT rule {}", self.id))
    }

    /// Checks the NAT rule; errors call it `label`, as [`Rule::validate_as`] does.
    pub fn validate_as(&self, label: &str) -> Result<()> {
        let side_ok = |side: Side| matches!(side, Side::Left | Side::Right);
        let (side, field) = match &self.kind {
            NatKind::Masquerade { out, .. } | NatKind::Snat { out, .. } => (*out, "out"),
            NatKind::Dnat { inbound, .. } => (*inbound, "in"),
        };
        if !side_ok(side) {
            return Err(Error::invalid(
                field,
                side,
                format!("{label}: use left or right"),
            ));
        }
        match &self.kind {
            NatKind::Snat {
                to,
                source: Some(source),
                ..
            } if to.is_ipv4() != matches!(source, IpNet::V4(_)) => Err(Error::invalid(
                "to",
                to,
                format!("{label}: the address family differs from the source {source}"),
            )),
            NatKind::Dnat { protocol, port, .. } if !protocol.carries_ports() || *port == 0 => {
                Err(Error::invalid(
                    "protocol",
                    protocol,
                    format!("{label}: a port-forward needs tcp or udp and a port 1-65535"),
                ))
            }
            NatKind::Dnat { to, .. } if to.port() == 0 => Err(Error::invalid(
                "to",
                to,
                format!("{label}: give the inner port, ADDRESS:PORT"),
            )),
            _ => Ok(()),
        }
    }
}

impl RuleSet {
    /// Checks every rule and the set as a whole; the error names the rule and the field.
    pub fn validate(&self) -> Result<()> {
        if self.version != FORMAT_VERSION {
            return Err(Error::invalid(
                "version",
                self.version,
                format!("this dockwall reads format {FORMAT_VERSION}"),
            ));
        }
        let mut ids = std::collections::HashSet::new();
        for rule in &self.rules {
            rule.validate()?;
            if !ids.insert(rule.id) {
                return Err(Error::invalid("id", rule.id, "two rules have this id"));
            }
        }
        for nat in &self.nat {
            nat.validate()?;
            if !ids.insert(nat.id) {
                return Err(Error::invalid(
                    "id",
                    nat.id,
                    "a NAT rule shares this id with another rule",
                ));
            }
        }
        for mirror in &self.mirrors {
            mirror.validate()?;
            if !ids.insert(mirror.id) {
                return Err(Error::invalid(
                    "id",
                    mirror.id,
                    "a mirror shares this id with a rule or another mirror",
                ));
            }
        }
        if self.mode == ServiceMode::Transparent {
            if let Some(nat) = self.nat.first() {
                return Err(Error::invalid(
                    "mode",
                    self.mode,
                    format!(
                        "NAT rule {} (and every NAT rule) cannot apply: in transparent mode the \
                         SI bridges one subnet and owns no address on its data legs to translate \
                         to or from; delete the NAT rules (`dockwall nat delete --id ID`) or run \
                         in-network or in-network-nat",
                        nat.id
                    ),
                ));
            }
            if let Some(mirror) = self.mirrors.first() {
                return Err(Error::invalid(
                    "mode",
                    self.mode,
                    format!(
                        "mirror {} (and every mirror) cannot apply: in transparent mode bridged \
                         frames reach the `ip` hook mirrors use only through br_netfilter, with \
                         the bridge as input interface, and the data legs carry no address for a \
                         collector's subnet; delete the mirrors (`dockwall mirror delete ID`) or \
                         run in-network or in-network-nat",
                        mirror.id
                    ),
                ));
            }
        }
        if let Some(&max) = ids.iter().max() {
            if self.next_id <= max {
                return Err(Error::invalid(
                    "next_id",
                    self.next_id,
                    format!("must be above the largest id in use ({max})"),
                ));
            }
        }
        Ok(())
    }

    /// The policy for traffic no rule decides in `direction` (left-to-right or
    /// right-to-left): its override, else `default_policy`.
    pub fn policy_for(&self, direction: Direction) -> Policy {
        let overridden = match direction {
            Direction::LeftToRight => self.left_to_right_policy,
            Direction::RightToLeft => self.right_to_left_policy,
            Direction::Both | Direction::Local => None,
        };
        overridden.unwrap_or(self.default_policy)
    }

    /// Sets what traffic no rule decides gets: in one forwarded direction (an override), or
    /// with no direction in both, clearing the overrides.
    pub fn set_default_policy(
        &mut self,
        policy: Policy,
        direction: Option<Direction>,
    ) -> Result<()> {
        match direction {
            None => {
                self.default_policy = policy;
                self.left_to_right_policy = None;
                self.right_to_left_policy = None;
            }
            Some(Direction::LeftToRight) => self.left_to_right_policy = Some(policy),
            Some(Direction::RightToLeft) => self.right_to_left_policy = Some(policy),
            Some(other) => {
                return Err(Error::invalid(
                    "direction",
                    format!("{other:?}").to_lowercase(),
                    "a default applies to left-to-right or right-to-left (or, without \
                     direction, to both)",
                ))
            }
        }
        Ok(())
    }

    pub fn allocate_id(&mut self) -> u64 {
        let id = self.next_id;
        self.next_id += 1;
        id
    }

    pub fn position_of(&self, id: u64) -> Option<usize> {
        self.rules.iter().position(|r| r.id == id)
    }

    /// Parses and validates a rule set from JSON (a state file or `apply FILE`).
    pub fn from_json(text: &str, origin: &str) -> Result<RuleSet> {
        let set: RuleSet =
            serde_json::from_str(text).map_err(|e| Error::invalid("rule set", origin, e))?;
        set.validate()?;
        Ok(set)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule(json: &str) -> Result<Rule> {
        let rule: Rule = serde_json::from_str(json).map_err(|e| Error::invalid("rule", json, e))?;
        rule.validate()?;
        Ok(rule)
    }

    #[test]
    fn rules_parse_and_round_trip() {
        let text = r#"{"id":7,"action":"deny","direction":"left-to-right","protocol":"tcp","source":"10.0.0.0/8","destination_port":"1000:2000"}"#;
        let parsed = rule(text).unwrap();
        assert_eq!(
            parsed.destination_port,
            Some(PortRange {
                first: 1000,
                last: 2000
            })
        );
        assert!(parsed.enabled);
        let again: Rule = serde_json::from_str(&serde_json::to_string(&parsed).unwrap()).unwrap();
        assert_eq!(again, parsed);
    }

    #[test]
    fn bad_input_names_the_field_and_value() {
        let cases = [
            (
                r#"{"id":1,"action":"deny","direction":"both","colour":"red"}"#,
                "unknown field `colour`",
            ),
            (
                r#"{"id":1,"action":"deny","direction":"both","source":"10.0.0.300/8"}"#,
                "invalid IP address",
            ),
            (
                r#"{"id":1,"action":"deny","direction":"both","protocol":"tcp","destination_port":"70000"}"#,
                "70000 is outside 1-65535",
            ),
            (
                r#"{"id":1,"action":"deny","direction":"both","protocol":"tcp","destination_port":"2000:1000"}"#,
                "first port is above the last",
            ),
            (
                r#"{"id":1,"action":"deny","direction":"both","source":"10.0.0.0/8","destination":"fd00::/64"}"#,
                "both be IPv4 or both IPv6",
            ),
            (
                r#"{"id":1,"action":"deny","direction":"both","protocol":"tpc"}"#,
                "unknown protocol name",
            ),
            (
                r#"{"id":1,"action":"deny","direction":"both","protocol":"icmp","source":"fd00::1/128"}"#,
                "use icmpv6",
            ),
            (
                r#"{"id":1,"action":"deny","direction":"both","destination_port":"22"}"#,
                "needs protocol tcp",
            ),
            (
                r#"{"id":1,"action":"limit","direction":"both"}"#,
                "needs a rate",
            ),
            (
                r#"{"id":1,"action":"deny","direction":"both","ip_version":6,"source":"10.0.0.0/8"}"#,
                "the addresses are IPv4",
            ),
            (
                r#"{"id":1,"action":"deny","direction":"both","ip_version":5}"#,
                "use 4 or 6",
            ),
            (
                r#"{"id":1,"action":"deny","direction":"both","ip_version":6,"protocol":"icmp"}"#,
                "use icmpv6",
            ),
            (
                r#"{"id":1,"action":"deny","direction":"sideways"}"#,
                "unknown variant `sideways`",
            ),
        ];
        for (json, needle) in cases {
            let error = rule(json).unwrap_err().to_string();
            assert!(error.contains(needle), "{json}: {error}");
        }
    }

    #[test]
    fn rule_sets_check_ids_and_version() {
        let mut set = RuleSet::default();
        let id = set.allocate_id();
        set.rules.push(
            rule(&format!(
                r#"{{"id":{id},"action":"allow","direction":"both"}}"#
            ))
            .unwrap(),
        );
        set.validate().unwrap();
        set.next_id = 1;
        assert!(set.validate().unwrap_err().to_string().contains("next_id"));
        let text = r#"{"version":2}"#;
        assert!(RuleSet::from_json(text, "x")
            .unwrap_err()
            .to_string()
            .contains("format 1"));
    }

    #[test]
    fn nat_rules_validate_their_sides_and_ports() {
        let nat: NatRule = serde_json::from_str(
            r#"{"id":1,"kind":{"dnat":{"protocol":"tcp","port":8080,"to":"192.168.10.2:80"}}}"#,
        )
        .unwrap();
        nat.validate().unwrap();
        assert!(matches!(
            nat.kind,
            NatKind::Dnat {
                inbound: Side::Right,
                ..
            }
        ));
        let bad: NatRule =
            serde_json::from_str(r#"{"id":1,"kind":{"masquerade":{"out":"mgmt"}}}"#).unwrap();
        assert!(bad.validate().is_err());
    }
}

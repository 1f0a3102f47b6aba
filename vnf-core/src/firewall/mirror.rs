//! Traffic mirroring: a copy of every IPv4 packet that arrives on a side to be forwarded
//! (optionally only those a rule-style match selects) goes to a collector with nftables
//! `dup to COLLECTOR device DEV`.
//!
//! - The copy: the packet as it arrived (addresses, ports, payload), except that the kernel
//!   (nf_dup_ipv4) lowers its TTL by one in prerouting and sets Don't Fragment, so a copy
//!   larger than the `via` interface's MTU is dropped, not fragmented. Copies are untracked.
//!
//! - Where: `dup` exists only in the `ip`/`ip6`/`netdev` families, not in `inet`, so mirrors
//!   live in their own table `ip dockwall_mirror`, written in the same nft transaction as
//!   `inet dockwall` (one apply, all or nothing).
//! - Which packets: a prerouting chain at raw priority matches by input interface, so each
//!   packet is copied once, as it arrived: before conntrack, NAT and the filter (packets the
//!   firewall then drops are copied too). `fib daddr type unicast` leaves out packets to the
//!   SI itself, broadcasts and multicasts: only traffic to forward is copied (DNAT
//!   port-forwards, addressed to the SI as they arrive, are not). `--side both`
//!   copies both directions of a conversation, each packet once.
//! - No loops: `dup` sends the copy with the collector as next hop, so the
//!   collector must be on the `via` interface's subnet. Behind a gateway the copy would be
//!   routed to its real destination (a duplicate) or back through the SI. A mirror whose
//!   collector is off that subnet is refused when added and not compiled when the subnet
//!   changes. Packets from or to the collector are never copied, so its own traffic across
//!   the SI cannot feed back, and the kernel copies nothing while it sends a copy, so no
//!   copy is copied again in the SI. The collector must not route (ip_forward=0), or it
//!   forwards what it receives.
//! - Transparent mode is refused (see `RuleSet::validate`): bridged frames reach these hooks
//!   only through br_netfilter with the bridge as input interface, and the data legs carry no
//!   address for a collector's subnet.

use std::fmt;
use std::net::Ipv4Addr;
use std::str::FromStr;

use ipnet::IpNet;
use nftables::expr::{Expression, Fib, FibFlag, FibResult, MetaKey, NamedExpression};
use nftables::schema::{Chain, Rule as NftRule};
use nftables::stmt::{Dup, Match, Operator, Statement};
use nftables::types::{NfChainPolicy, NfChainType, NfFamily, NfHook};
use serde::{Deserialize, Serialize};

use super::compile::{
    counter, match_statements, matches, meta, payload, rule, string, CompiledChain, Sides,
};
use super::model::{parse_net, Action, Direction, PortRange, Protocol, Rule};
use crate::error::{Error, Result};
use crate::side::{ReadySide, Side};

/// The table mirrors live in (see the module documentation for why it is not `inet`).
pub const MIRROR_TABLE: &str = "dockwall_mirror";
pub const CHAIN_MIRROR: &str = "mirror_ingress";
/// Before conntrack (-200): a copy of the packet as it arrived.
const RAW_PRIORITY: i32 = -300;

/// One mirror: a copy of the matching packets arriving on `side` goes to `to` out of `via`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Mirror {
    /// From the rule set's id space; `mirror delete --id` and the counters use it.
    pub id: u64,
    pub side: MirrorSide,
    #[serde(default, rename = "match")]
    pub matching: MirrorMatch,
    /// The collector: it must be on `via`'s subnet.
    pub to: Ipv4Addr,
    /// The side whose interface the copies leave by.
    pub via: Side,
}

/// The packets arriving on which side are copied.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum MirrorSide {
    Left,
    Right,
    /// From either side: each forwarded packet once, whichever way it goes.
    Both,
}

impl MirrorSide {
    pub fn sides(self) -> &'static [Side] {
        match self {
            MirrorSide::Left => &[Side::Left],
            MirrorSide::Right => &[Side::Right],
            MirrorSide::Both => &[Side::Left, Side::Right],
        }
    }
}

/// What a mirror copies, in a rule's terms; written `proto udp from CIDR to CIDR sport
/// PORTS dport PORTS` (any subset, in any order), as `rule list` describes rules.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MirrorMatch {
    #[serde(default)]
    pub protocol: Protocol,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<IpNet>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub destination: Option<IpNet>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source_port: Option<PortRange>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub destination_port: Option<PortRange>,
}

const MATCH_WORDS: &str = "use `proto P`, `from CIDR`, `to CIDR`, `sport PORTS`, `dport PORTS`, \
     e.g. \"proto udp to 192.168.20.0/24 dport 5000:5010\"";

impl MirrorMatch {
    /// The match as an allow rule: rules and mirrors check and compile a match one way.
    fn as_rule(&self, id: u64) -> Rule {
        Rule {
            protocol: self.protocol,
            source: self.source,
            destination: self.destination,
            source_port: self.source_port,
            destination_port: self.destination_port,
            ..Rule::new(id, Action::Allow, Direction::Both)
        }
    }

    /// Checks the match as a rule's, and that it is IPv4; errors call it `label`.
    pub fn validate_as(&self, label: &str) -> Result<()> {
        let rule = self.as_rule(0);
        rule.validate_as(label)?;
        if rule.bound_ip_version() == Some(6) {
            return Err(Error::invalid(
                "match",
                self,
                format!("{label}: mirrors copy IPv4 packets (the collector is IPv4); match IPv4 addresses"),
            ));
        }
        Ok(())
    }
}

impl FromStr for MirrorMatch {
    type Err = Error;

    fn from_str(text: &str) -> Result<Self> {
        let mut matching = MirrorMatch::default();
        let words: Vec<&str> = text.split_whitespace().collect();
        let mut seen: Vec<&str> = Vec::new();
        for pair in words.chunks(2) {
            let [key, value] = *pair else {
                return Err(Error::invalid(
                    "match",
                    text,
                    format!("`{}` needs a value; {MATCH_WORDS}", pair[0]),
                ));
            };
            if seen.contains(&key) {
                return Err(Error::invalid(
                    "match",
                    text,
                    format!("`{key}` given twice; a match takes each word once"),
                ));
            }
            seen.push(key);
            let net = |value: &str| {
                parse_net(value).ok_or_else(|| {
                    Error::invalid("match", text, format!("`{key} {value}`: not a CIDR"))
                })
            };
            match key {
                "proto" => matching.protocol = value.parse()?,
                "from" => matching.source = Some(net(value)?),
                "to" => matching.destination = Some(net(value)?),
                "sport" => matching.source_port = Some(value.parse()?),
                "dport" => matching.destination_port = Some(value.parse()?),
                other => {
                    return Err(Error::invalid(
                        "match",
                        text,
                        format!("unknown word `{other}`; {MATCH_WORDS}"),
                    ))
                }
            }
        }
        Ok(matching)
    }
}

impl fmt::Display for MirrorMatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "proto {}", self.protocol)?;
        for (word, value) in [
            ("from", self.source.map(|n| n.to_string())),
            ("to", self.destination.map(|n| n.to_string())),
            ("sport", self.source_port.map(String::from)),
            ("dport", self.destination_port.map(String::from)),
        ] {
            if let Some(value) = value {
                write!(f, " {word} {value}")?;
            }
        }
        Ok(())
    }
}

impl Mirror {
    pub fn validate(&self) -> Result<()> {
        self.validate_as(&format!("mirror {}", self.id))
    }

    /// Checks the mirror; errors call it `label`, as [`Rule::validate_as`] does.
    pub fn validate_as(&self, label: &str) -> Result<()> {
        self.matching.validate_as(label)?;
        let to = self.to;
        if to.is_unspecified() || to.is_loopback() || to.is_multicast() || to.is_broadcast() {
            return Err(Error::invalid(
                "to",
                to,
                format!("{label}: the collector needs a unicast address"),
            ));
        }
        Ok(())
    }
}

/// Whether the collector `to` is on-link on `via` (as this side is now) and not the SI itself:
/// the one case where a copy reaches it and nothing else. Err says why not.
pub fn check_collector(to: Ipv4Addr, via: &ReadySide) -> Result<()> {
    if via.address.addr() == to {
        return Err(Error::invalid(
            "to",
            to,
            format!(
                "that is the SI's own {} address; give the collector's",
                via.side
            ),
        ));
    }
    let subnet = via.subnet();
    if subnet.prefix_len() < 31 && (to == subnet.network() || to == subnet.broadcast()) {
        return Err(Error::invalid(
            "to",
            to,
            format!(
                "that is the {} subnet {subnet}'s network or broadcast address, no host's; \
                 give the collector's own address",
                via.side
            ),
        ));
    }
    if !subnet.contains(&to) {
        return Err(Error::invalid(
            "to",
            to,
            format!(
                "not on the {} subnet {} ({}): a copy goes to the collector as next hop, \
                 so it must be on-link there (behind a gateway the copy would go \
                 to its real destination); put the collector on that subnet or pick \
                 another --via",
                via.side,
                via.subnet(),
                via.name
            ),
        ));
    }
    Ok(())
}

/// The side whose subnet holds `collector`, for a mirror given no `--via`.
pub fn side_reaching(collector: Ipv4Addr, sides: Sides<'_>) -> Option<Side> {
    Side::ALL.into_iter().find(|&side| {
        sides
            .get(side)
            .is_some_and(|ready| ready.subnet().contains(&collector))
    })
}

/// The comment that ties a mirror's nft rules (one per side) to the model, for counters.
pub fn mirror_comment(id: u64) -> String {
    format!("mirror {id}")
}

/// Whether a mirror copies with the sides as they are now, and if not, why.
#[derive(Debug)]
pub enum Readiness<'a> {
    /// Copies the packets arriving on `inputs` out of `via`.
    Copying {
        via: &'a ReadySide,
        inputs: Vec<&'a str>,
    },
    /// The side the copies leave by is not up.
    WaitingForVia,
    /// No side the mirror copies from is up.
    WaitingForMirrored,
    /// The collector is not on-link on `via` as it is now (or is the SI itself): the mirror
    /// is left out, never sent through a gateway.
    NotCopying(Error),
}

impl Mirror {
    /// What [`compile_mirrors`] does with this mirror; `mirror list` shows the same.
    pub fn readiness<'a>(&self, sides: Sides<'a>) -> Readiness<'a> {
        let Some(via) = sides.get(self.via) else {
            return Readiness::WaitingForVia;
        };
        if let Err(error) = check_collector(self.to, via) {
            return Readiness::NotCopying(error);
        }
        let mut inputs: Vec<&str> = Vec::new();
        for &side in self.side.sides() {
            // Dockwall waits for its second leg, so left and right are two interfaces; were
            // they ever one, each packet would still be copied once.
            match sides.get(side) {
                Some(ready) if !inputs.contains(&ready.name.as_str()) => inputs.push(&ready.name),
                _ => {}
            }
        }
        if inputs.is_empty() {
            return Readiness::WaitingForMirrored;
        }
        Readiness::Copying { via, inputs }
    }
}

/// The mirror chain: one rule per mirrored side of each mirror that is
/// [`Readiness::Copying`].
pub fn compile_mirrors(mirrors: &[Mirror], sides: Sides<'_>) -> CompiledChain {
    let mut rules = Vec::new();
    for mirror in mirrors {
        let Readiness::Copying { via, inputs } = mirror.readiness(sides) else {
            continue;
        };
        let collector = mirror.to.to_string();
        for input in inputs {
            let mut statements = vec![
                matches(meta(MetaKey::Iifname), string(input)),
                matches(
                    Expression::Named(NamedExpression::Fib(Fib {
                        result: FibResult::Type,
                        flags: [FibFlag::Daddr].into_iter().collect(),
                    })),
                    string("unicast"),
                ),
                differs(payload("ip", "saddr"), string(&collector)),
                differs(payload("ip", "daddr"), string(&collector)),
            ];
            statements.extend(match_statements(&mirror.matching.as_rule(mirror.id)));
            statements.push(counter());
            statements.push(Statement::Dup(Dup {
                addr: string(&collector),
                dev: Some(string(&via.name)),
            }));
            rules.push(NftRule {
                family: NfFamily::IP,
                table: MIRROR_TABLE.into(),
                chain: CHAIN_MIRROR.into(),
                ..rule(statements, Some(mirror_comment(mirror.id)))
            });
        }
    }
    CompiledChain {
        chain: Chain {
            family: NfFamily::IP,
            table: MIRROR_TABLE.into(),
            name: CHAIN_MIRROR.into(),
            _type: Some(NfChainType::Filter),
            hook: Some(NfHook::Prerouting),
            prio: Some(RAW_PRIORITY),
            policy: Some(NfChainPolicy::Accept),
            ..Chain::default()
        },
        rules,
    }
}

fn differs(left: Expression<'static>, right: Expression<'static>) -> Statement<'static> {
    Statement::Match(Match {
        left,
        right,
        op: Operator::NEQ,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::firewall::compile::tests::side;

    fn mirror(side: MirrorSide, to: &str, via: Side) -> Mirror {
        Mirror {
            id: 1,
            side,
            matching: "proto udp dport 5000".parse().unwrap(),
            to: to.parse().unwrap(),
            via,
        }
    }

    #[test]
    fn matches_parse_print_and_check() {
        let text = "proto udp from 10.0.0.0/8 to 192.0.2.7 sport 1:2 dport 53";
        let parsed: MirrorMatch = text.parse().unwrap();
        assert_eq!(
            parsed.to_string(),
            "proto udp from 10.0.0.0/8 to 192.0.2.7/32 sport 1:2 dport 53"
        );
        for (bad, needle) in [
            ("proto", "`proto` needs a value"),
            ("colour red", "unknown word `colour`"),
            ("from 10.0.0.300", "not a CIDR"),
            ("proto tpc", "unknown protocol name"),
            ("proto udp dport 1 dport 2", "`dport` given twice"),
        ] {
            let error = bad.parse::<MirrorMatch>().unwrap_err().to_string();
            assert!(error.contains(needle), "{bad}: {error}");
        }
        let mut ports_without_protocol = mirror(MirrorSide::Left, "10.0.3.9", Side::Management);
        ports_without_protocol.matching.protocol = Protocol::Any;
        assert!(ports_without_protocol
            .validate()
            .unwrap_err()
            .to_string()
            .contains("needs protocol tcp"));
        let mut ipv6 = mirror(MirrorSide::Left, "10.0.3.9", Side::Management);
        ipv6.matching.source = Some("fd00::/64".parse().unwrap());
        assert!(ipv6.validate().unwrap_err().to_string().contains("IPv4"));
    }

    #[test]
    fn state_files_without_mirrors_load_and_mirror_ids_are_checked() {
        let old =
            r#"{"version":1,"rules":[{"id":1,"action":"deny","direction":"both"}],"next_id":2}"#;
        let mut set = crate::firewall::RuleSet::from_json(old, "old state").unwrap();
        assert!(set.mirrors.is_empty());
        assert!(!serde_json::to_string(&set).unwrap().contains("mirrors"));
        let mut clash = mirror(MirrorSide::Left, "10.0.3.9", Side::Management);
        clash.id = 1;
        set.mirrors.push(clash);
        assert!(set
            .validate()
            .unwrap_err()
            .to_string()
            .contains("a mirror shares this id"));
        set.mirrors[0].id = set.allocate_id();
        let text = serde_json::to_string(&set).unwrap();
        assert_eq!(
            crate::firewall::RuleSet::from_json(&text, "new state").unwrap(),
            set
        );
    }

    #[test]
    fn one_rule_per_mirrored_side_and_only_to_an_on_link_collector() {
        let (left, right, mgmt) = (
            side(Side::Left, "eth0", "10.0.1.2/24"),
            side(Side::Right, "eth1", "10.0.2.2/24"),
            side(Side::Management, "eth2", "10.0.3.2/24"),
        );
        let sides = Sides {
            left: Some(&left),
            right: Some(&right),
            management: Some(&mgmt),
        };
        assert_eq!(
            side_reaching("10.0.3.9".parse().unwrap(), sides),
            Some(Side::Management)
        );
        assert_eq!(side_reaching("192.0.2.1".parse().unwrap(), sides), None);
        let both = mirror(MirrorSide::Both, "10.0.3.9", Side::Management);
        let chain = compile_mirrors(std::slice::from_ref(&both), sides);
        assert_eq!(chain.rules.len(), 2);
        let text = serde_json::to_string(&chain.rules[0]).unwrap();
        assert!(
            text.contains(r#"{"dup":{"addr":"10.0.3.9","dev":"eth2"}}"#),
            "{text}"
        );
        // Off-link: via the right side, 10.0.3.9 is behind a gateway.
        let off_link = mirror(MirrorSide::Left, "10.0.3.9", Side::Right);
        assert!(check_collector(off_link.to, &right)
            .unwrap_err()
            .to_string()
            .contains("must be on-link"));
        assert!(compile_mirrors(&[off_link], sides).rules.is_empty());
        let own_address = mirror(MirrorSide::Left, "10.0.3.2", Side::Management);
        assert!(check_collector(own_address.to, &mgmt).is_err());
        for no_host in ["10.0.3.0", "10.0.3.255"] {
            let error = check_collector(no_host.parse().unwrap(), &mgmt)
                .unwrap_err()
                .to_string();
            assert!(error.contains("network or broadcast address"), "{error}");
        }
        // On a /31 both addresses are hosts.
        let point_to_point = side(Side::Management, "eth2", "10.0.4.0/31");
        check_collector("10.0.4.1".parse().unwrap(), &point_to_point).unwrap();
    }

    #[test]
    fn readiness_says_what_a_mirror_waits_for() {
        let (left, mgmt) = (
            side(Side::Left, "eth0", "10.0.1.2/24"),
            side(Side::Management, "eth2", "10.0.3.2/24"),
        );
        let only_mgmt = Sides {
            management: Some(&mgmt),
            ..Sides::default()
        };
        let right = mirror(MirrorSide::Right, "10.0.3.9", Side::Management);
        assert!(matches!(
            right.readiness(only_mgmt),
            Readiness::WaitingForMirrored
        ));
        assert!(compile_mirrors(std::slice::from_ref(&right), only_mgmt)
            .rules
            .is_empty());
        let left_up = Sides {
            left: Some(&left),
            ..only_mgmt
        };
        let both = mirror(MirrorSide::Both, "10.0.3.9", Side::Management);
        match both.readiness(left_up) {
            Readiness::Copying { via, inputs } => {
                assert_eq!((via.name.as_str(), inputs), ("eth2", vec!["eth0"]))
            }
            other => panic!("{other:?}"),
        }
        let via_left = mirror(MirrorSide::Both, "10.0.1.9", Side::Left);
        assert!(matches!(
            via_left.readiness(only_mgmt),
            Readiness::WaitingForVia
        ));
    }

    #[test]
    fn transparent_mode_refuses_mirrors_naming_why() {
        let mut set = crate::firewall::RuleSet {
            mode: crate::firewall::mode::ServiceMode::Transparent,
            ..crate::firewall::RuleSet::default()
        };
        let mut copy = mirror(MirrorSide::Left, "10.0.3.9", Side::Management);
        copy.id = set.allocate_id();
        set.mirrors.push(copy);
        let error = set.validate().unwrap_err().to_string();
        assert!(
            error.contains("transparent") && error.contains("mirror 1") && error.contains("bridge"),
            "{error}"
        );
        set.mode = crate::firewall::mode::ServiceMode::InNetwork;
        set.validate().unwrap();
    }
}

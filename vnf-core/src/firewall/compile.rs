//! Rule set → one nftables table. Within a stretch of consecutive rules with the same verdict,
//! rules of the same shape become one lookup in a named set with a counter per element, so
//! 10,000 rules are a handful of set lookups, not a 10,000-rule linear chain. First-match
//! order is kept: only rules with the same verdict are regrouped (whichever matches, the
//! outcome is the same; a packet matching two of them may be counted on the other one), and
//! an element that overlaps one already in a set goes to a new set.

use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::hash::{Hash, Hasher};
use std::net::IpAddr;

use ipnet::IpNet;
use nftables::expr::{
    Elem, Expression, Meta, MetaKey, NamedExpression, Payload, PayloadField, Prefix, Range, CT,
};
use nftables::schema::{Chain, Rule as NftRule, Set, SetFlag, SetType, SetTypeValue};
use nftables::stmt::{
    AnonymousCounter, Counter, JumpTarget, Limit, Log, Mangle, Match, NATFamily, Operator, Reject,
    RejectType, Statement, NAT,
};
use nftables::types::{NfChainPolicy, NfChainType, NfFamily, NfHook};
use serde::Serialize;

use super::mirror::compile_mirrors;
use super::mode;
use super::model::{Action, Direction, NatKind, Policy, PortRange, Protocol, Rule, RuleSet};
use crate::routing::{LEFT_INGRESS_MARK, RIGHT_INGRESS_MARK};
use crate::side::{Assignment, ReadySide, Side};

/// The one table Dockwall owns; nothing outside it is ever touched.
pub const TABLE: &str = "dockwall";
pub const CHAIN_FORWARD: &str = "filter_forward";
pub const CHAIN_INPUT: &str = "filter_input";
pub const CHAIN_FROM_LEFT: &str = "from_left";
pub const CHAIN_FROM_RIGHT: &str = "from_right";
/// What follows a direction's rules (port-forward allowances, the direction's default), in a
/// chain of its own so that a new rule is an append to the rules chain.
pub const CHAIN_FROM_LEFT_END: &str = "from_left_end";
pub const CHAIN_FROM_RIGHT_END: &str = "from_right_end";
pub const CHAIN_TO_SI: &str = "to_si";
pub const CHAIN_PREROUTING: &str = "nat_prerouting";
pub const CHAIN_MARK_INGRESS: &str = "mark_ingress";
pub const CHAIN_POSTROUTING: &str = "nat_postrouting";
const FILTER_PRIORITY: i32 = 0;
const MANGLE_PRIORITY: i32 = -150;
const DSTNAT_PRIORITY: i32 = -100;
const SRCNAT_PRIORITY: i32 = 100;

/// The sides the firewall refers to by interface name and address.
#[derive(Debug, Clone, Copy, Default)]
pub struct Sides<'a> {
    pub left: Option<&'a ReadySide>,
    pub right: Option<&'a ReadySide>,
    /// Only mirrors use it (a collector on the management leg).
    pub management: Option<&'a ReadySide>,
}

impl<'a> Sides<'a> {
    pub fn from_assignment(assignment: &'a Assignment) -> Self {
        Sides {
            left: assignment.ready(Side::Left),
            right: assignment.ready(Side::Right),
            management: assignment.ready(Side::Management),
        }
    }

    pub fn get(&self, side: Side) -> Option<&'a ReadySide> {
        match side {
            Side::Left => self.left,
            Side::Right => self.right,
            Side::Management => self.management,
        }
    }
}

/// A chain with its rules, in order.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct CompiledChain {
    pub chain: Chain<'static>,
    pub rules: Vec<NftRule<'static>>,
}

/// The whole table, in a form that can be diffed against the previous compile.
#[derive(Debug, Clone, PartialEq)]
pub struct Compiled {
    pub chains: Vec<CompiledChain>,
    pub sets: BTreeMap<String, Set<'static>>,
    /// Identifies what was compiled (rules, sides, compiler), cheaper than hashing the output.
    pub fingerprint: String,
}

/// Bump when the compiler's output for the same input changes.
const COMPILER_REVISION: u32 = 6;

/// A 64-bit FNV-1a hasher: deterministic across runs, unlike std's randomly keyed SipHash.
struct Fnv(u64);

impl Hasher for Fnv {
    fn write(&mut self, bytes: &[u8]) {
        for &byte in bytes {
            self.0 = (self.0 ^ u64::from(byte)).wrapping_mul(0x0100_0000_01b3);
        }
    }

    fn finish(&self) -> u64 {
        self.0
    }
}

fn fingerprint(rule_set: &RuleSet, sides: Sides<'_>) -> String {
    let mut hash = Fnv(0xcbf2_9ce4_8422_2325);
    // The management leg matters only to mirrors sent out of it: other rule sets keep their
    // fingerprint (and counters) when it comes or goes.
    let management = rule_set
        .mirrors
        .iter()
        .any(|m| m.via == Side::Management)
        .then_some(sides.management);
    (
        rule_set,
        sides.left,
        sides.right,
        management,
        COMPILER_REVISION,
        env!("CARGO_PKG_VERSION"),
    )
        .hash(&mut hash);
    format!("{:016x}", hash.finish())
}

pub fn compile(rule_set: &RuleSet, sides: Sides<'_>) -> Compiled {
    let sides = mode::sides_for(rule_set.mode, sides);
    let mut compiled = Compiled {
        chains: Vec::new(),
        sets: BTreeMap::new(),
        fingerprint: fingerprint(rule_set, sides),
    };
    let policy = match rule_set.default_policy {
        Policy::Accept => NfChainPolicy::Accept,
        Policy::Drop => NfChainPolicy::Drop,
    };

    // The side a packet arrived on, for the routing's reply rules (see routing::LEFT_INGRESS_MARK).
    let marks = [
        (sides.left, LEFT_INGRESS_MARK),
        (sides.right, RIGHT_INGRESS_MARK),
    ]
    .into_iter()
    .filter_map(|(side, mark)| {
        let side = side?;
        Some(rule(
            vec![
                matches(meta(MetaKey::Iifname), string(&side.name)),
                Statement::Mangle(Mangle {
                    key: meta(MetaKey::Mark),
                    value: Expression::Number(mark),
                }),
            ],
            None,
        ))
    })
    .collect();
    compiled.chains.push(base_chain(
        CHAIN_MARK_INGRESS,
        NfHook::Prerouting,
        NfChainType::Filter,
        MANGLE_PRIORITY,
        NfChainPolicy::Accept,
        marks,
    ));

    let mut forward = vec![
        conntrack_rule(&["established", "related"], Statement::Accept(None)),
        conntrack_rule(&["invalid"], Statement::Drop(None)),
    ];
    forward.extend(mode::forward_dispatch(rule_set.mode, sides));
    compiled.chains.push(base_chain(
        CHAIN_FORWARD,
        NfHook::Forward,
        NfChainType::Filter,
        FILTER_PRIORITY,
        policy,
        forward,
    ));

    let input = vec![
        conntrack_rule(&["established", "related"], Statement::Accept(None)),
        conntrack_rule(&["invalid"], Statement::Drop(None)),
        rule(
            vec![
                matches(meta(MetaKey::Iifname), string("lo")),
                Statement::Accept(None),
            ],
            None,
        ),
        rule(
            vec![Statement::Jump(JumpTarget {
                target: CHAIN_TO_SI.into(),
            })],
            None,
        ),
    ];
    compiled.chains.push(base_chain(
        CHAIN_INPUT,
        NfHook::Input,
        NfChainType::Filter,
        FILTER_PRIORITY,
        NfChainPolicy::Accept,
        input,
    ));

    // Which rule ids each set holds, to share a set between the two forward chains.
    let mut set_members = HashMap::new();
    let forward_chains = [
        (CHAIN_FROM_LEFT, "fl", Direction::LeftToRight, Side::Left),
        (CHAIN_FROM_RIGHT, "fr", Direction::RightToLeft, Side::Right),
    ];
    let mut ends = Vec::new();
    for (chain, set_prefix, direction, inbound) in forward_chains {
        let selected: Vec<&Rule> = rule_set
            .rules
            .iter()
            .filter(|r| r.enabled && (r.direction == direction || r.direction == Direction::Both))
            .collect();
        let rules = compile_filter_chain(
            &selected,
            chain,
            set_prefix,
            &mut compiled.sets,
            &mut set_members,
        );
        compiled.chains.push(regular_chain(chain, rules));
        // After the rules, so an explicit deny also stops port-forwarded traffic (as in
        // Neutron), and before the direction's default, so an implicit deny does not.
        let end = end_of(chain);
        let mut end_rules = dnat_allowances(rule_set, sides, inbound, end);
        end_rules.push(direction_default(rule_set, direction).with_chain(end));
        ends.push(regular_chain(end, end_rules));
    }
    compiled.chains.extend(ends);
    let local: Vec<&Rule> = rule_set
        .rules
        .iter()
        .filter(|r| r.enabled && r.direction == Direction::Local)
        .collect();
    let rules = compile_filter_chain(
        &local,
        CHAIN_TO_SI,
        "si",
        &mut compiled.sets,
        &mut set_members,
    );
    compiled.chains.push(regular_chain(CHAIN_TO_SI, rules));

    let (prerouting, mut postrouting) = nat_rules(rule_set, sides);
    postrouting.extend(mode::implicit_nat(rule_set.mode, sides));
    compiled.chains.push(base_chain(
        CHAIN_PREROUTING,
        NfHook::Prerouting,
        NfChainType::NAT,
        DSTNAT_PRIORITY,
        NfChainPolicy::Accept,
        prerouting,
    ));
    compiled.chains.push(base_chain(
        CHAIN_POSTROUTING,
        NfHook::Postrouting,
        NfChainType::NAT,
        SRCNAT_PRIORITY,
        NfChainPolicy::Accept,
        postrouting,
    ));
    compiled
        .chains
        .push(compile_mirrors(&rule_set.mirrors, sides));
    compiled
}

fn regular_chain(name: &'static str, rules: Vec<NftRule<'static>>) -> CompiledChain {
    CompiledChain {
        chain: Chain {
            family: NfFamily::INet,
            table: TABLE.into(),
            name: name.into(),
            ..Chain::default()
        },
        rules,
    }
}

/// The verdict, with a counter, for the traffic of `direction` (left-to-right or
/// right-to-left) that no rule decides: FWaaS's implicit deny when a policy applies.
fn direction_default(rule_set: &RuleSet, direction: Direction) -> NftRule<'static> {
    let verdict = match rule_set.policy_for(direction) {
        Policy::Accept => Statement::Accept(None),
        Policy::Drop => Statement::Drop(None),
    };
    rule(vec![counter(), verdict], Some(default_comment(direction)))
}

/// The comment of a direction's default verdict, for its counter.
pub fn default_comment(direction: Direction) -> String {
    let name = serde_json::to_value(direction)
        .ok()
        .and_then(|v| v.as_str().map(str::to_string))
        .unwrap_or_default();
    format!("default {name}")
}

/// The comment that ties nft objects to a model rule, for counters.
pub fn rule_comment(id: u64) -> String {
    format!("rule {id}")
}

pub fn nat_comment(id: u64) -> String {
    format!("nat {id}")
}

/// What a rule matches on, without the values: rules of one shape share a set.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct Shape {
    ip_version: Option<u8>,
    protocol: Protocol,
    source: bool,
    destination: bool,
    source_port: bool,
    destination_port: bool,
    action: Action,
    log: bool,
}

impl Shape {
    fn of(rule: &Rule) -> Shape {
        Shape {
            ip_version: rule.bound_ip_version(),
            protocol: rule.protocol,
            source: rule.source.is_some(),
            destination: rule.destination.is_some(),
            source_port: rule.source_port.is_some(),
            destination_port: rule.destination_port.is_some(),
            action: rule.action,
            log: rule.log,
        }
    }

    /// Rules whose relative order does not matter among rules of the same verdict: not
    /// limits (each has its own rate) and not logged (the first match logs).
    fn groupable(&self) -> bool {
        self.action != Action::Limit && !self.log
    }

    fn verdict(&self) -> Action {
        self.action
    }

    /// Only groupable rules with at least one value to look up share a set.
    fn mergeable(&self) -> bool {
        self.groupable()
            && (self.source || self.destination || self.source_port || self.destination_port)
    }
}

/// A rule's match values as inclusive numeric ranges per field, for overlap checks.
fn key_ranges(rule: &Rule) -> Vec<(u128, u128)> {
    let mut ranges: Vec<(u128, u128)> = [rule.source, rule.destination]
        .into_iter()
        .flatten()
        .map(|net| match net {
            IpNet::V4(v4) => (
                u128::from(u32::from(v4.network())),
                u128::from(u32::from(v4.broadcast())),
            ),
            IpNet::V6(v6) => (u128::from(v6.network()), u128::from(v6.broadcast())),
        })
        .collect();
    ranges.extend(
        [rule.source_port, rule.destination_port]
            .into_iter()
            .flatten()
            .map(|p| (u128::from(p.first), u128::from(p.last))),
    );
    ranges
}

fn overlaps(a: &[(u128, u128)], b: &[(u128, u128)]) -> bool {
    a.iter().zip(b).all(|(x, y)| x.0 <= y.1 && y.0 <= x.1)
}

type Key = Vec<(u128, u128)>;

/// A run of rules that compiles into one set lookup. Its elements never overlap, which
/// keeps the overlap check cheap: single-field keys are disjoint intervals in a sorted map
/// (one lookup), multi-field point keys a hash set; only multi-field keys with ranges are
/// scanned.
struct Run<'r> {
    shape: Shape,
    rules: Vec<&'r Rule>,
    single_field: BTreeMap<u128, u128>,
    points: HashSet<Key>,
    ranges: Vec<Key>,
    /// Any element a prefix or port range: the set needs the interval flag.
    has_ranges: bool,
}

impl<'r> Run<'r> {
    fn new(rule: &'r Rule, key: Key) -> Self {
        let mut run = Run {
            shape: Shape::of(rule),
            rules: Vec::new(),
            single_field: BTreeMap::new(),
            points: HashSet::new(),
            ranges: Vec::new(),
            has_ranges: false,
        };
        run.push(rule, key);
        run
    }

    fn push(&mut self, rule: &'r Rule, key: Key) {
        self.has_ranges |= key.iter().any(|(lo, hi)| lo != hi);
        match key.as_slice() {
            [(lo, hi)] => {
                self.single_field.insert(*lo, *hi);
            }
            _ if key.iter().all(|(lo, hi)| lo == hi) => {
                self.points.insert(key);
            }
            _ => self.ranges.push(key),
        }
        self.rules.push(rule);
    }

    fn accepts(&self, rule: &Rule, key: &Key) -> bool {
        if !self.shape.mergeable() || Shape::of(rule) != self.shape {
            return false;
        }
        if let [(lo, hi)] = key.as_slice() {
            // The disjoint interval starting closest below `hi` is the only one that can overlap.
            return self
                .single_field
                .range(..=*hi)
                .next_back()
                .is_none_or(|(_, &end)| end < *lo);
        }
        if self.ranges.iter().any(|r| overlaps(r, key)) {
            return false;
        }
        if key.iter().all(|(lo, hi)| lo == hi) {
            !self.points.contains(key)
        } else {
            !self.points.iter().any(|p| overlaps(p, key))
        }
    }
}

fn compile_filter_chain(
    rules: &[&Rule],
    chain: &str,
    set_prefix: &str,
    sets: &mut BTreeMap<String, Set<'static>>,
    members: &mut HashMap<String, Vec<u64>>,
) -> Vec<NftRule<'static>> {
    let mut runs: Vec<Run> = Vec::new();
    let mut block_start = 0;
    for &rule in rules {
        // A block is a stretch of rules with one verdict: whichever of them matches, the
        // outcome is the same, so within it rules may be grouped by shape in any order.
        let same_verdict = runs.last().is_some_and(|run| {
            run.shape.groupable()
                && Shape::of(rule).groupable()
                && run.shape.verdict() == Shape::of(rule).verdict()
        });
        if !same_verdict {
            block_start = runs.len();
        }
        let key = key_ranges(rule);
        match runs[block_start..]
            .iter_mut()
            .find(|run| run.accepts(rule, &key))
        {
            Some(run) => run.push(rule, key),
            None => runs.push(Run::new(rule, key)),
        }
    }
    let mut compiled = Vec::new();
    for run in runs {
        if run.rules.len() == 1 {
            compiled.extend(single_rule(chain, run.rules[0]));
            continue;
        }
        // Named after the oldest rule in the run, so appending rules keeps the name stable.
        let anchor = run.rules.iter().map(|r| r.id).min().unwrap_or_default();
        let first = run.rules[0];
        let (fields, types) = lookup_fields(first);
        // A run of `both` rules usually comes out the same in both directions: one set serves
        // both chains, halving what the kernel holds. Elements follow from their rules, so
        // equal rule ids mean an equal set. Any difference gets a set per chain.
        let ids: Vec<u64> = run.rules.iter().map(|r| r.id).collect();
        let shared = format!("b{anchor}");
        let both_only = run.rules.iter().all(|r| r.direction == Direction::Both);
        let name = match members.get(&shared) {
            Some(existing) if both_only && *existing == ids => shared,
            None if both_only => shared,
            _ => format!("{set_prefix}{anchor}"),
        };
        if !sets.contains_key(&name) {
            let elements: Vec<Expression<'static>> = run
                .rules
                .iter()
                .map(|r| {
                    Expression::Named(NamedExpression::Elem(Elem {
                        val: Box::new(key_value(r)),
                        timeout: None,
                        expires: None,
                        comment: Some(rule_comment(r.id).into()),
                        counter: None,
                    }))
                })
                .collect();
            let set = Set {
                family: NfFamily::INet,
                table: TABLE.into(),
                name: name.clone().into(),
                set_type: if types.len() == 1 {
                    SetTypeValue::Single(types[0])
                } else {
                    SetTypeValue::Concatenated(types.into())
                },
                flags: run
                    .has_ranges
                    .then(|| [SetFlag::Interval].into_iter().collect()),
                elem: Some(elements.into()),
                ..Set::default()
            };
            sets.insert(name.clone(), set);
            members.insert(name.clone(), ids);
        }
        let mut statements = version_match(first);
        statements.extend(protocol_match(first.protocol));
        let left = if fields.len() == 1 {
            fields.into_iter().next().unwrap_or_else(|| string(""))
        } else {
            Expression::Named(NamedExpression::Concat(fields))
        };
        statements.push(matches(left, string(&format!("@{name}"))));
        statements.extend(verdict(first));
        compiled.push(rule(statements, Some(format!("set {name}"))).with_chain(chain));
    }
    compiled
}

/// The payload expressions a rule looks up and the set types they have.
fn lookup_fields(rule: &Rule) -> (Vec<Expression<'static>>, Vec<SetType>) {
    let mut fields = Vec::new();
    let mut types = Vec::new();
    for (net, field) in [(rule.source, "saddr"), (rule.destination, "daddr")] {
        if let Some(net) = net {
            let (protocol, set_type) = match net {
                IpNet::V4(_) => ("ip", SetType::Ipv4Addr),
                IpNet::V6(_) => ("ip6", SetType::Ipv6Addr),
            };
            fields.push(payload(protocol, field));
            types.push(set_type);
        }
    }
    for (port, field) in [
        (rule.source_port, "sport"),
        (rule.destination_port, "dport"),
    ] {
        if port.is_some() {
            fields.push(payload("th", field));
            types.push(SetType::InetService);
        }
    }
    (fields, types)
}

fn key_value(rule: &Rule) -> Expression<'static> {
    let mut values: Vec<Expression<'static>> = [rule.source, rule.destination]
        .into_iter()
        .flatten()
        .map(net_value)
        .collect();
    values.extend(
        [rule.source_port, rule.destination_port]
            .into_iter()
            .flatten()
            .map(port_value),
    );
    if values.len() == 1 {
        values.remove(0)
    } else {
        Expression::Named(NamedExpression::Concat(values))
    }
}

fn net_value(net: IpNet) -> Expression<'static> {
    if net.prefix_len() == net.max_prefix_len() {
        string(&net.addr().to_string())
    } else {
        Expression::Named(NamedExpression::Prefix(Prefix {
            addr: Box::new(string(&net.network().to_string())),
            len: u32::from(net.prefix_len()),
        }))
    }
}

fn port_value(port: PortRange) -> Expression<'static> {
    if port.is_single() {
        Expression::Number(u32::from(port.first))
    } else {
        Expression::Range(Box::new(Range {
            range: [
                Expression::Number(u32::from(port.first)),
                Expression::Number(u32::from(port.last)),
            ],
        }))
    }
}

/// The inline matches of a rule's IP version, protocol, addresses and ports.
pub(super) fn match_statements(model: &Rule) -> Vec<Statement<'static>> {
    let mut matching = version_match(model);
    matching.extend(protocol_match(model.protocol));
    for (net, field) in [(model.source, "saddr"), (model.destination, "daddr")] {
        if let Some(net) = net {
            let protocol = if net.addr().is_ipv4() { "ip" } else { "ip6" };
            matching.push(matches(payload(protocol, field), net_value(net)));
        }
    }
    for (port, field) in [
        (model.source_port, "sport"),
        (model.destination_port, "dport"),
    ] {
        if let Some(port) = port {
            matching.push(matches(payload("th", field), port_value(port)));
        }
    }
    matching
}

/// A rule that did not merge: inline matches, its own counter.
fn single_rule(chain: &str, model: &Rule) -> Vec<NftRule<'static>> {
    let mut matching = match_statements(model);
    let comment = Some(rule_comment(model.id));
    let mut rules = Vec::new();
    if let (Action::Limit, Some(rate)) = (model.action, model.rate) {
        let mut over = matching.clone();
        over.push(Statement::Limit(Limit {
            rate: rate.packets,
            rate_unit: None,
            per: Some(rate.per.as_str().into()),
            burst: None,
            burst_unit: None,
            inv: Some(true),
        }));
        over.push(counter());
        over.push(Statement::Drop(None));
        rules.push(rule(over, comment.clone()).with_chain(chain));
    }
    matching.push(counter());
    matching.extend(verdict(model));
    rules.push(rule(matching, comment).with_chain(chain));
    rules
}

fn verdict(model: &Rule) -> Vec<Statement<'static>> {
    let mut statements = Vec::new();
    if model.log {
        statements.push(Statement::Log(Some(Log {
            prefix: Some(format!("dockwall rule {} ", model.id).into()),
            group: None,
            snaplen: None,
            queue_threshold: None,
            level: None,
            flags: None,
        })));
    }
    statements.push(match model.action {
        Action::Allow | Action::Limit => Statement::Accept(None),
        Action::Deny => Statement::Drop(None),
        Action::Reject if model.protocol == Protocol::Tcp => Statement::Reject(Some(Reject {
            _type: Some(RejectType::TCPReset),
            expr: None,
        })),
        // The inet default: ICMP(v6) port unreachable.
        Action::Reject => Statement::Reject(None),
    });
    statements
}

/// `meta nfproto` for a rule whose `ip_version` is not already implied by an address match.
fn version_match(model: &Rule) -> Vec<Statement<'static>> {
    match model.ip_version {
        Some(version) if model.source.is_none() && model.destination.is_none() => {
            let family = if version == 6 { "ipv6" } else { "ipv4" };
            vec![matches(meta(MetaKey::Nfproto), string(family))]
        }
        _ => Vec::new(),
    }
}

fn protocol_match(protocol: Protocol) -> Vec<Statement<'static>> {
    match protocol.number() {
        Some(number) => vec![matches(
            meta(MetaKey::L4proto),
            Expression::Number(u32::from(number)),
        )],
        None => Vec::new(),
    }
}

/// Accepts for the port-forwards into `inbound`'s side, in `chain`.
fn dnat_allowances(
    rule_set: &RuleSet,
    sides: Sides<'_>,
    inbound: Side,
    chain: &'static str,
) -> Vec<NftRule<'static>> {
    let mut rules = Vec::new();
    for nat in &rule_set.nat {
        let NatKind::Dnat {
            protocol,
            to,
            inbound: nat_inbound,
            ..
        } = &nat.kind
        else {
            continue;
        };
        if *nat_inbound != inbound {
            continue;
        }
        let (Some(inside), Some(outside)) = (sides.get(other_side(inbound)), sides.get(inbound))
        else {
            continue;
        };
        let IpAddr::V4(address) = to.ip() else {
            continue;
        };
        let mut statements = vec![
            matches(meta(MetaKey::Iifname), string(&outside.name)),
            matches(meta(MetaKey::Oifname), string(&inside.name)),
        ];
        statements.extend(protocol_match(*protocol));
        statements.push(matches(
            payload("ip", "daddr"),
            string(&address.to_string()),
        ));
        statements.push(matches(
            payload("th", "dport"),
            Expression::Number(u32::from(to.port())),
        ));
        statements.push(dnatted());
        statements.push(counter());
        statements.push(Statement::Accept(None));
        rules.push(rule(statements, Some(nat_comment(nat.id))).with_chain(chain));
    }
    rules
}

/// Matches a connection a DNAT rule translated.
pub(super) fn dnatted() -> Statement<'static> {
    // A bit test: `==` would demand that dnat is the only status bit set.
    Statement::Match(Match {
        left: ct("status"),
        right: string("dnat"),
        op: Operator::IN,
    })
}

fn other_side(side: Side) -> Side {
    if side == Side::Left {
        Side::Right
    } else {
        Side::Left
    }
}

fn nat_rules(
    rule_set: &RuleSet,
    sides: Sides<'_>,
) -> (Vec<NftRule<'static>>, Vec<NftRule<'static>>) {
    let (mut prerouting, mut postrouting) = (Vec::new(), Vec::new());
    for nat in &rule_set.nat {
        let comment = Some(nat_comment(nat.id));
        match &nat.kind {
            NatKind::Dnat {
                protocol,
                port,
                to,
                inbound,
            } => {
                let (Some(side), IpAddr::V4(to_address)) = (sides.get(*inbound), to.ip()) else {
                    continue;
                };
                let mut statements = vec![matches(meta(MetaKey::Iifname), string(&side.name))];
                statements.push(matches(
                    payload("ip", "daddr"),
                    string(&side.address.addr().to_string()),
                ));
                statements.extend(protocol_match(*protocol));
                statements.push(matches(
                    payload("th", "dport"),
                    Expression::Number(u32::from(*port)),
                ));
                statements.push(counter());
                statements.push(Statement::DNAT(Some(NAT {
                    addr: Some(string(&to_address.to_string())),
                    family: Some(NATFamily::IP),
                    port: Some(Expression::Number(u32::from(to.port()))),
                    flags: None,
                })));
                prerouting.push(rule(statements, comment).with_chain(CHAIN_PREROUTING));
            }
            NatKind::Masquerade { out, source } | NatKind::Snat { out, source, .. } => {
                let Some(side) = sides.get(*out) else {
                    continue;
                };
                let mut statements = vec![matches(meta(MetaKey::Oifname), string(&side.name))];
                if let Some(source) = source {
                    let protocol = if source.addr().is_ipv4() { "ip" } else { "ip6" };
                    statements.push(matches(payload(protocol, "saddr"), net_value(*source)));
                }
                statements.push(counter());
                statements.push(match &nat.kind {
                    NatKind::Snat { to, .. } => Statement::SNAT(Some(NAT {
                        addr: Some(string(&to.to_string())),
                        family: Some(if to.is_ipv4() {
                            NATFamily::IP
                        } else {
                            NATFamily::IP6
                        }),
                        port: None,
                        flags: None,
                    })),
                    _ => Statement::Masquerade(None),
                });
                postrouting.push(rule(statements, comment).with_chain(CHAIN_POSTROUTING));
            }
        }
    }
    (prerouting, postrouting)
}

fn base_chain(
    name: &str,
    hook: NfHook,
    chain_type: NfChainType,
    priority: i32,
    policy: NfChainPolicy,
    rules: Vec<NftRule<'static>>,
) -> CompiledChain {
    CompiledChain {
        chain: Chain {
            family: NfFamily::INet,
            table: TABLE.into(),
            name: name.to_string().into(),
            _type: Some(chain_type),
            hook: Some(hook),
            prio: Some(priority),
            policy: Some(policy),
            ..Chain::default()
        },
        rules: rules.into_iter().map(|r| r.with_chain(name)).collect(),
    }
}

trait WithChain {
    fn with_chain(self, chain: &str) -> Self;
}

impl WithChain for NftRule<'static> {
    fn with_chain(mut self, chain: &str) -> Self {
        self.chain = Cow::Owned(chain.to_string());
        self
    }
}

pub(super) fn rule(
    statements: Vec<Statement<'static>>,
    comment: Option<String>,
) -> NftRule<'static> {
    NftRule {
        family: NfFamily::INet,
        table: TABLE.into(),
        chain: Cow::Borrowed(""),
        expr: statements.into(),
        handle: None,
        index: None,
        comment: comment.map(Cow::Owned),
    }
}

fn conntrack_rule(states: &[&str], verdict: Statement<'static>) -> NftRule<'static> {
    let right = if states.len() == 1 {
        string(states[0])
    } else {
        Expression::List(states.iter().map(|s| string(s)).collect())
    };
    rule(
        vec![
            Statement::Match(Match {
                left: ct("state"),
                right,
                op: Operator::IN,
            }),
            verdict,
        ],
        None,
    )
}

/// The chain after a direction's rules chain.
fn end_of(chain: &str) -> &'static str {
    if chain == CHAIN_FROM_LEFT {
        CHAIN_FROM_LEFT_END
    } else {
        CHAIN_FROM_RIGHT_END
    }
}

/// For packets matching `conditions`: a jump to a direction's rules chain, then (when they
/// return without a verdict) a jump to the chain after it (see [`CHAIN_FROM_LEFT_END`]).
pub(super) fn direction_jumps(
    conditions: Vec<Statement<'static>>,
    chain: &str,
    comment: Option<String>,
) -> [NftRule<'static>; 2] {
    let jump = |target: &str, comment: Option<String>| {
        let mut statements = conditions.clone();
        statements.push(Statement::Jump(JumpTarget {
            target: target.to_string().into(),
        }));
        rule(statements, comment)
    };
    [jump(chain, comment.clone()), jump(end_of(chain), comment)]
}

pub(super) fn jump_between(from: &str, to: &str, chain: &str) -> [NftRule<'static>; 2] {
    direction_jumps(
        vec![
            matches(meta(MetaKey::Iifname), string(from)),
            matches(meta(MetaKey::Oifname), string(to)),
        ],
        chain,
        None,
    )
}

pub fn matches(left: Expression<'static>, right: Expression<'static>) -> Statement<'static> {
    Statement::Match(Match {
        left,
        right,
        op: Operator::EQ,
    })
}

pub fn meta(key: MetaKey) -> Expression<'static> {
    Expression::Named(NamedExpression::Meta(Meta { key }))
}

pub fn ct(key: &str) -> Expression<'static> {
    Expression::Named(NamedExpression::CT(CT {
        key: key.to_string().into(),
        family: None,
        dir: None,
    }))
}

pub fn payload(protocol: &str, field: &str) -> Expression<'static> {
    Expression::Named(NamedExpression::Payload(Payload::PayloadField(
        PayloadField {
            protocol: protocol.to_string().into(),
            field: field.to_string().into(),
        },
    )))
}

pub fn string(text: &str) -> Expression<'static> {
    Expression::String(text.to_string().into())
}

pub(super) fn counter() -> Statement<'static> {
    Statement::Counter(Counter::Anonymous(Some(AnonymousCounter {
        packets: None,
        bytes: None,
    })))
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;
    use crate::firewall::model::{NatRule, Rate};

    /// A side that is up, for the firewall's unit tests.
    pub(in crate::firewall) fn side(side: Side, name: &str, address: &str) -> ReadySide {
        ReadySide {
            side,
            index: 2,
            name: name.into(),
            address: address.parse().unwrap(),
        }
    }

    fn deny_tcp_from(set: &mut RuleSet, source: &str, port: u16) -> u64 {
        let id = set.allocate_id();
        set.rules.push(Rule {
            protocol: Protocol::Tcp,
            source: Some(source.parse().unwrap()),
            destination_port: Some(PortRange::single(port)),
            ..Rule::new(id, Action::Deny, Direction::LeftToRight)
        });
        id
    }

    fn comments(chain: &CompiledChain) -> Vec<&str> {
        chain
            .rules
            .iter()
            .map(|r| r.comment.as_deref().unwrap_or_default())
            .collect()
    }

    fn chain<'c>(compiled: &'c Compiled, name: &str) -> &'c CompiledChain {
        compiled
            .chains
            .iter()
            .find(|c| c.chain.name == name)
            .unwrap()
    }

    pub(in crate::firewall) fn compile_with_both_sides(set: &RuleSet) -> Compiled {
        let (left, right) = (
            side(Side::Left, "eth0", "10.0.1.2/24"),
            side(Side::Right, "eth1", "10.0.2.2/24"),
        );
        compile(
            set,
            Sides {
                left: Some(&left),
                right: Some(&right),
                management: None,
            },
        )
    }

    #[test]
    fn same_shape_rules_become_one_set_lookup() {
        let mut set = RuleSet::default();
        for i in 0..100 {
            deny_tcp_from(
                &mut set,
                &format!("10.9.{}.{}/32", i / 250, i % 250 + 1),
                22,
            );
        }
        let compiled = compile_with_both_sides(&set);
        assert_eq!(comments(chain(&compiled, CHAIN_FROM_LEFT)), ["set fl1"]);
        let lookup = &compiled.sets["fl1"];
        assert_eq!(lookup.elem.as_ref().unwrap().len(), 100);
        assert!(chain(&compiled, CHAIN_FROM_RIGHT).rules.is_empty());
    }

    #[test]
    fn interleaved_shapes_with_one_verdict_still_share_sets() {
        let mut set = RuleSet::default();
        for i in 0..50 {
            deny_tcp_from(&mut set, &format!("10.9.0.{}/32", i + 1), 22);
            let id = deny_tcp_from(&mut set, &format!("172.16.{i}.0/24"), 22);
            let rule = set.rules.iter_mut().find(|r| r.id == id).unwrap();
            rule.protocol = Protocol::Udp;
            rule.destination_port = None;
        }
        let compiled = compile_with_both_sides(&set);
        assert_eq!(
            comments(chain(&compiled, CHAIN_FROM_LEFT)),
            ["set fl1", "set fl2"]
        );
        assert_eq!(compiled.sets.len(), 2);
        assert!(compiled
            .sets
            .values()
            .all(|s| s.elem.as_ref().unwrap().len() == 50));
    }

    #[test]
    fn order_is_kept_across_verdicts_and_overlaps() {
        let mut set = RuleSet::default();
        deny_tcp_from(&mut set, "10.0.0.0/8", 22);
        deny_tcp_from(&mut set, "192.0.2.0/24", 22);
        // Overlaps the first: must not join its set, or the order would be lost.
        deny_tcp_from(&mut set, "10.1.0.0/16", 22);
        let allow = deny_tcp_from(&mut set, "198.51.100.7/32", 22);
        set.rules.last_mut().unwrap().action = Action::Allow;
        let compiled = compile_with_both_sides(&set);
        assert_eq!(
            comments(chain(&compiled, CHAIN_FROM_LEFT)),
            ["set fl1", "rule 3", &*rule_comment(allow),]
        );
    }

    #[test]
    fn limit_is_a_drop_over_the_rate_then_an_accept() {
        let mut set = RuleSet::default();
        let id = deny_tcp_from(&mut set, "10.0.0.0/8", 22);
        set.rules[0].action = Action::Limit;
        set.rules[0].rate = Some("10/second".parse::<Rate>().unwrap());
        let compiled = compile_with_both_sides(&set);
        let rules = &chain(&compiled, CHAIN_FROM_LEFT).rules;
        assert_eq!(rules.len(), 2);
        assert!(rules
            .iter()
            .all(|r| r.comment.as_deref() == Some(&*rule_comment(id))));
        assert!(matches!(rules[0].expr.last(), Some(Statement::Drop(_))));
        assert!(matches!(rules[1].expr.last(), Some(Statement::Accept(_))));
    }

    #[test]
    fn rules_wait_for_their_sides() {
        let mut set = RuleSet::default();
        deny_tcp_from(&mut set, "10.0.0.0/8", 22);
        let left = side(Side::Left, "eth0", "10.0.1.2/24");
        let compiled = compile(
            &set,
            Sides {
                left: Some(&left),
                ..Sides::default()
            },
        );
        let forward = chain(&compiled, CHAIN_FORWARD);
        assert!(
            forward
                .rules
                .iter()
                .all(|r| !r.expr.iter().any(|s| matches!(s, Statement::Jump(_)))),
            "no jump without both sides"
        );
        assert_eq!(chain(&compiled, CHAIN_MARK_INGRESS).rules.len(), 1);
    }

    #[test]
    fn each_direction_ends_in_its_own_counted_default() {
        let set = RuleSet {
            right_to_left_policy: Some(Policy::Drop),
            ..RuleSet::default()
        };
        let compiled = compile_with_both_sides(&set);
        assert!(chain(&compiled, CHAIN_FROM_RIGHT).rules.is_empty());
        let from_right = &chain(&compiled, CHAIN_FROM_RIGHT_END).rules;
        assert_eq!(
            comments(chain(&compiled, CHAIN_FROM_RIGHT_END)),
            ["default right-to-left"]
        );
        assert!(matches!(from_right[0].expr[0], Statement::Counter(_)));
        assert!(matches!(
            from_right[0].expr.last(),
            Some(Statement::Drop(_))
        ));
        let from_left = &chain(&compiled, CHAIN_FROM_LEFT_END).rules;
        assert!(matches!(
            from_left[0].expr.last(),
            Some(Statement::Accept(_))
        ));
    }

    #[test]
    fn port_forwards_come_after_the_rules_and_before_the_default() {
        let mut set = RuleSet {
            right_to_left_policy: Some(Policy::Drop),
            ..RuleSet::default()
        };
        let deny = deny_tcp_from(&mut set, "192.0.2.0/24", 7401);
        set.rules[0].direction = Direction::RightToLeft;
        let nat = set.allocate_id();
        set.nat.push(NatRule {
            id: nat,
            kind: NatKind::Dnat {
                protocol: Protocol::Tcp,
                port: 8080,
                to: "10.0.1.9:7401".parse().unwrap(),
                inbound: Side::Right,
            },
            comment: None,
        });
        let compiled = compile_with_both_sides(&set);
        assert_eq!(
            comments(chain(&compiled, CHAIN_FROM_RIGHT)),
            [&*rule_comment(deny)]
        );
        assert_eq!(
            comments(chain(&compiled, CHAIN_FROM_RIGHT_END)),
            [&*nat_comment(nat), "default right-to-left"]
        );
        assert_eq!(
            comments(chain(&compiled, CHAIN_FROM_LEFT_END)),
            ["default left-to-right"],
            "a port-forward into the right side only"
        );
        assert!(
            chain(&compiled, CHAIN_FORWARD)
                .rules
                .iter()
                .all(|r| r.comment.is_none()),
            "nothing ahead of the direction chains"
        );
    }

    #[test]
    fn ip_version_without_addresses_matches_nfproto() {
        let mut set = RuleSet::default();
        deny_tcp_from(&mut set, "10.0.0.0/8", 22);
        set.rules[0].source = None;
        set.rules[0].ip_version = Some(6);
        let compiled = compile_with_both_sides(&set);
        let rule = &chain(&compiled, CHAIN_FROM_LEFT).rules[0];
        assert_eq!(
            rule.expr[0],
            matches(meta(MetaKey::Nfproto), string("ipv6"))
        );
        set.rules[0].source = Some("fd00::/8".parse().unwrap());
        let compiled = compile_with_both_sides(&set);
        let rule = &chain(&compiled, CHAIN_FROM_LEFT).rules[0];
        assert!(
            !rule
                .expr
                .contains(&matches(meta(MetaKey::Nfproto), string("ipv6"))),
            "the address match implies the version"
        );
    }

    #[test]
    fn appending_a_rule_of_the_same_shape_is_an_element_add() {
        let mut set = RuleSet::default();
        deny_tcp_from(&mut set, "10.9.0.1/32", 22);
        deny_tcp_from(&mut set, "10.9.0.2/32", 22);
        let old = compile_with_both_sides(&set);
        deny_tcp_from(&mut set, "10.9.0.3/32", 22);
        let new = compile_with_both_sides(&set);
        let no_counters = |_: &nftables::schema::Chain<'static>| Ok(Default::default());
        let batch = crate::firewall::nft::incremental_batch(&old, &new, &no_counters)
            .unwrap()
            .unwrap();
        let text = crate::firewall::nft::render(batch).unwrap();
        assert!(text.contains(r#"{"add":{"element""#), "{text}");
        assert!(!text.contains("flush"), "no chain rewritten: {text}");

        // A rule of a new shape is a rule appended to its direction's chain: the port-forward
        // allowances and the default live in the chain after it, so nothing is rewritten
        // and no counter is read (reading them lists the whole table).
        let with_new_shape = {
            let mut set = set.clone();
            let id = deny_tcp_from(&mut set, "10.9.0.4/32", 22);
            let rule = set.rules.iter_mut().find(|r| r.id == id).unwrap();
            rule.protocol = Protocol::Udp;
            rule.source = None;
            compile_with_both_sides(&set)
        };
        let counters_read = |chain: &nftables::schema::Chain<'static>| -> crate::Result<_> {
            panic!("counters of {} read: the chain is rewritten", chain.name)
        };
        let batch = crate::firewall::nft::incremental_batch(&new, &with_new_shape, &counters_read)
            .unwrap()
            .unwrap();
        let text = crate::firewall::nft::render(batch).unwrap();
        assert!(text.contains(r#"{"add":{"rule""#), "{text}");
        assert!(!text.contains("flush"), "no chain rewritten: {text}");

        set.default_policy = Policy::Drop;
        let changed_policy = compile_with_both_sides(&set);
        assert!(
            crate::firewall::nft::incremental_batch(&new, &changed_policy, &no_counters)
                .unwrap()
                .is_none()
        );
    }
}

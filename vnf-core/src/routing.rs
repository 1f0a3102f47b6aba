//! Dual-homed policy routing, nmstate style: build the desired routes and rules from the
//! ready sides, diff them against what the kernel holds that carries our tag, apply the
//! difference, read back and verify. Applying twice changes nothing; teardown removes
//! exactly what carries our tag.

use std::collections::BTreeSet;
use std::fmt;
use std::net::{IpAddr, Ipv4Addr};
use std::str::FromStr;

use ipnet::Ipv4Net;
use netlink_packet_route::route::{
    RouteAddress, RouteAttribute, RouteMessage, RouteProtocol, RouteScope, RouteType,
};
use netlink_packet_route::rule::{RuleAction, RuleAttribute, RuleMessage};
use netlink_packet_route::AddressFamily;
use serde::Serialize;
use tracing::{info, warn};

use crate::error::{Error, Result};
use crate::kernel::{is_errno, Kernel};
use crate::side::{gateway_for, Assignment, Layout, ReadySide, Side};

/// Route protocol number tagging every route we install (`ip route show proto 245`).
pub const ROUTE_PROTOCOL: u8 = 245;
/// RTPROT_DHCP: routes learned from a DHCP lease (`ip route show proto dhcp`).
pub const DHCP_ROUTE_PROTOCOL: u8 = 16;
/// Our rules sit in this priority range (and carry `ROUTE_PROTOCOL`): after the `local`
/// rule at 0, so local delivery is decided first, and before `main` at 32766.
pub const RULE_PRIORITY_FIRST: u32 = 1000;
pub const RULE_PRIORITY_LAST: u32 = 1099;
const RULE_PRIORITY_FROM_LEFT: u32 = RULE_PRIORITY_FIRST;
const RULE_PRIORITY_FROM_RIGHT: u32 = RULE_PRIORITY_FIRST + 1;
const RULE_PRIORITY_REPLY_LEFT: u32 = RULE_PRIORITY_FIRST + 2;
const RULE_PRIORITY_REPLY_RIGHT: u32 = RULE_PRIORITY_FIRST + 3;
/// Global mode: the VPN pool lives behind the tun in `main`; what the SI sends to it stays
/// there, whatever its source address (a client pinging the SI's left address).
const RULE_PRIORITY_TO_VPN_POOL: u32 = RULE_PRIORITY_FIRST + 4;
/// Global mode: what the SI itself sends from a side's address follows that side's table, so
/// replies leave by the side the request came in on whatever routes `main` learned.
const RULE_PRIORITY_FROM_RIGHT_ADDRESS: u32 = RULE_PRIORITY_FIRST + 5;
const RULE_PRIORITY_FROM_LEFT_ADDRESS: u32 = RULE_PRIORITY_FIRST + 6;
const RULE_PRIORITY_FROM_MANAGEMENT_ADDRESS: u32 = RULE_PRIORITY_FIRST + 7;

/// Firewall marks for packets that arrived on the left / right side (the firewall sets
/// them). With net.ipv4.fwmark_reflect=1 the replies the SI itself generates for forwarded
/// packets (TCP resets, ICMP unreachable, fragmentation needed) carry the mark too; they have
/// no incoming interface, so the iif rules miss them and `main` has no route to hosts behind
/// the gateways. The mark rules send them back out of the side they came from.
pub const LEFT_INGRESS_MARK: u32 = 0x0d0c_0001;
pub const RIGHT_INGRESS_MARK: u32 = 0x0d0c_0002;

pub const MAIN_TABLE: u32 = 254;
pub const DEFAULT_LEFT_TABLE: u32 = 1001;
pub const DEFAULT_RIGHT_TABLE: u32 = 1002;
/// Global mode: the management side's table (its connected subnet only).
pub const DEFAULT_MANAGEMENT_TABLE: u32 = 1003;
/// rtm_table is a u8; larger ids travel in the RTA_TABLE/FRA_TABLE attribute.
const RT_TABLE_UNSPEC: u8 = 0;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum RoutingMode {
    /// A table per side; traffic arriving on one side looks up the other side's table.
    Cross,
    /// `main` holds the default via the right side and the left networks via the left side.
    Global,
}

/// A routing table id that is ours to fill: not unspec (0) and not default/main/local.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub struct TableId(u32);

impl TableId {
    pub fn new(id: u32) -> Result<Self> {
        match id {
            0 => Err(Error::invalid("table id", id, "0 is not a table (RT_TABLE_UNSPEC); use 1-252 or 256-4294967295")),
            253..=255 => Err(Error::invalid(
                "table id",
                id,
                "253, 254 and 255 are the kernel's default, main and local tables; use 1-252 or 256-4294967295",
            )),
            _ => Ok(TableId(id)),
        }
    }

    pub fn get(self) -> u32 {
        self.0
    }
}

impl FromStr for TableId {
    type Err = Error;

    fn from_str(text: &str) -> Result<Self> {
        let id = text
            .trim()
            .parse::<u32>()
            .map_err(|_| Error::invalid("table id", text, "not a number in 1-4294967295"))?;
        TableId::new(id)
    }
}

impl fmt::Display for TableId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RoutingConfig {
    pub mode: RoutingMode,
    pub left_table: TableId,
    pub right_table: TableId,
    /// Global mode: the table `from <management address>` looks up.
    pub management_table: TableId,
    pub left_gateway: Option<Ipv4Addr>,
    pub right_gateway: Option<Ipv4Addr>,
    /// Global mode: networks behind the left gateway (static until DHCP supplies them).
    pub left_routes: Vec<Ipv4Net>,
    /// Global mode: the network the VNF serves itself (Dockvpn's pool); a learned left
    /// route inside it is refused.
    pub vpn_pool: Option<Ipv4Net>,
    /// Global mode: install learned def1 halves (0.0.0.0/1, 128.0.0.0/1) like any route.
    pub accept_wide_left_routes: bool,
}

impl RoutingConfig {
    pub fn new(mode: RoutingMode) -> Self {
        RoutingConfig {
            mode,
            left_table: TableId(DEFAULT_LEFT_TABLE),
            right_table: TableId(DEFAULT_RIGHT_TABLE),
            management_table: TableId(DEFAULT_MANAGEMENT_TABLE),
            left_gateway: None,
            right_gateway: None,
            left_routes: Vec::new(),
            vpn_pool: None,
            accept_wide_left_routes: false,
        }
    }

    pub fn validate(&self) -> Result<()> {
        // Both modes fill a table per side (global mode for the SI's own traffic).
        if self.left_table == self.right_table {
            return Err(Error::invalid(
                "right table id",
                self.right_table,
                "equals the left table id; each side needs its own table",
            ));
        }
        if let Some(default) = self.left_routes.iter().find(|r| r.prefix_len() == 0) {
            return Err(Error::invalid(
                "left route",
                default,
                "the default route always points right; list the left networks explicitly",
            ));
        }
        Ok(())
    }

    /// The cross-mode table of a side.
    pub fn table(&self, side: Side) -> u32 {
        match side {
            Side::Right => self.right_table.get(),
            _ => self.left_table.get(),
        }
    }

    fn gateway(&self, side: Side) -> Option<Ipv4Addr> {
        match side {
            Side::Right => self.right_gateway,
            _ => self.left_gateway,
        }
    }

    /// Global mode: the right side's gateway. One-armed, the leg has one gateway, which
    /// `--left-gateway` or the left lease may name as well.
    pub(crate) fn right_gateway_for(&self, assignment: &Assignment) -> Option<Ipv4Addr> {
        match assignment.layout {
            Layout::OneArmed => self.right_gateway.or(self.left_gateway),
            Layout::DualHomed => self.right_gateway,
        }
    }

    /// Global mode: the configured left routes that equal a connected subnet, which
    /// `desired_state` leaves to the kernel.
    pub fn left_routes_already_connected(&self, assignment: &Assignment) -> Vec<Ipv4Net> {
        let connected: Vec<Ipv4Net> = [Side::Left, Side::Right]
            .into_iter()
            .filter_map(|side| assignment.ready(side).map(ReadySide::subnet))
            .collect();
        self.left_routes
            .iter()
            .copied()
            .filter(|network| self.mode == RoutingMode::Global && connected.contains(network))
            .collect()
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Scope {
    Link,
    Universe,
}

/// One route as we install it and as we read it back.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
pub struct RouteSpec {
    /// ROUTE_PROTOCOL, or DHCP_ROUTE_PROTOCOL for lease routes.
    pub protocol: u8,
    pub table: u32,
    pub destination: Ipv4Net,
    pub gateway: Option<Ipv4Addr>,
    pub oif: u32,
    pub source: Option<Ipv4Addr>,
    pub scope: Scope,
    pub metric: u32,
}

impl fmt::Display for RouteSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.destination)?;
        if let Some(gateway) = self.gateway {
            write!(f, " via {gateway}")?;
        }
        write!(f, " oif {} table {}", self.oif, self.table)?;
        if let Some(source) = self.source {
            write!(f, " src {source}")?;
        }
        Ok(())
    }
}

impl RouteSpec {
    fn to_message(&self) -> RouteMessage {
        let mut message = RouteMessage::default();
        let header = &mut message.header;
        header.address_family = AddressFamily::Inet;
        header.destination_prefix_length = self.destination.prefix_len();
        header.table = u8::try_from(self.table).unwrap_or(RT_TABLE_UNSPEC);
        header.protocol = RouteProtocol::from(self.protocol);
        header.scope = match self.scope {
            Scope::Link => RouteScope::Link,
            Scope::Universe => RouteScope::Universe,
        };
        header.kind = RouteType::Unicast;
        let attributes = &mut message.attributes;
        attributes.push(RouteAttribute::Table(self.table));
        if self.destination.prefix_len() > 0 {
            attributes.push(RouteAttribute::Destination(RouteAddress::Inet(
                self.destination.network(),
            )));
        }
        if let Some(gateway) = self.gateway {
            attributes.push(RouteAttribute::Gateway(RouteAddress::Inet(gateway)));
        }
        attributes.push(RouteAttribute::Oif(self.oif));
        if let Some(source) = self.source {
            attributes.push(RouteAttribute::PrefSource(RouteAddress::Inet(source)));
        }
        attributes.push(RouteAttribute::Priority(self.metric));
        message
    }

    /// Reads a kernel route back; `None` for routes that do not carry `protocol`.
    fn from_message(message: &RouteMessage, protocol: u8) -> Option<RouteSpec> {
        if message.header.address_family != AddressFamily::Inet
            || u8::from(message.header.protocol) != protocol
        {
            return None;
        }
        let mut spec = RouteSpec {
            protocol,
            table: u32::from(message.header.table),
            destination: Ipv4Net::new(
                Ipv4Addr::UNSPECIFIED,
                message.header.destination_prefix_length,
            )
            .ok()?,
            gateway: None,
            oif: 0,
            source: None,
            scope: if message.header.scope == RouteScope::Link {
                Scope::Link
            } else {
                Scope::Universe
            },
            metric: 0,
        };
        for attribute in &message.attributes {
            match attribute {
                RouteAttribute::Table(table) => spec.table = *table,
                RouteAttribute::Destination(RouteAddress::Inet(ip)) => {
                    spec.destination = Ipv4Net::new(*ip, spec.destination.prefix_len()).ok()?;
                }
                RouteAttribute::Gateway(RouteAddress::Inet(ip)) => spec.gateway = Some(*ip),
                RouteAttribute::Oif(oif) => spec.oif = *oif,
                RouteAttribute::PrefSource(RouteAddress::Inet(ip)) => spec.source = Some(*ip),
                RouteAttribute::Priority(metric) => spec.metric = *metric,
                _ => {}
            }
        }
        Some(spec)
    }

    /// What makes two routes collide in the kernel (EEXIST), whoever owns them.
    fn collides_with(&self, message: &RouteMessage) -> bool {
        let table = message
            .attributes
            .iter()
            .find_map(|a| match a {
                RouteAttribute::Table(t) => Some(*t),
                _ => None,
            })
            .unwrap_or(u32::from(message.header.table));
        let destination = message.attributes.iter().find_map(|a| match a {
            RouteAttribute::Destination(RouteAddress::Inet(ip)) => Some(*ip),
            _ => None,
        });
        let metric = message
            .attributes
            .iter()
            .find_map(|a| match a {
                RouteAttribute::Priority(p) => Some(*p),
                _ => None,
            })
            .unwrap_or(0);
        message.header.address_family == AddressFamily::Inet
            && table == self.table
            && message.header.destination_prefix_length == self.destination.prefix_len()
            && destination.unwrap_or(Ipv4Addr::UNSPECIFIED) == self.destination.network()
            && metric == self.metric
            && message.header.tos == 0
    }
}

/// One policy rule: packets arriving on `iif`, carrying `fwmark`, or sent from `from`,
/// look up `table`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
pub struct RuleSpec {
    pub priority: u32,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub from: Option<Ipv4Addr>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub to: Option<Ipv4Net>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub iif: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fwmark: Option<u32>,
    pub table: u32,
}

impl fmt::Display for RuleSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:", self.priority)?;
        if let Some(from) = self.from {
            write!(f, " from {from}")?;
        }
        if let Some(to) = self.to {
            write!(f, " to {to}")?;
        }
        if let Some(iif) = &self.iif {
            write!(f, " iif {iif}")?;
        }
        if let Some(mark) = self.fwmark {
            write!(f, " fwmark {mark:#x}")?;
        }
        write!(f, " lookup {}", self.table)
    }
}

impl RuleSpec {
    fn to_message(&self) -> RuleMessage {
        let mut message = RuleMessage::default();
        message.header.family = AddressFamily::Inet;
        message.header.table = u8::try_from(self.table).unwrap_or(RT_TABLE_UNSPEC);
        // Without ToTable the kernel accepts the rule but every lookup through it fails.
        message.header.action = RuleAction::ToTable;
        message.attributes = vec![
            RuleAttribute::Priority(self.priority),
            RuleAttribute::Table(self.table),
            RuleAttribute::Protocol(RouteProtocol::Other(ROUTE_PROTOCOL)),
        ];
        if let Some(from) = self.from {
            message.header.src_len = 32;
            message
                .attributes
                .push(RuleAttribute::Source(IpAddr::V4(from)));
        }
        if let Some(to) = self.to {
            message.header.dst_len = to.prefix_len();
            message
                .attributes
                .push(RuleAttribute::Destination(IpAddr::V4(to.network())));
        }
        if let Some(iif) = &self.iif {
            message.attributes.push(RuleAttribute::Iifname(iif.clone()));
        }
        if let Some(mark) = self.fwmark {
            message.attributes.push(RuleAttribute::FwMark(mark));
            message.attributes.push(RuleAttribute::FwMask(u32::MAX));
        }
        message
    }

    fn from_message(message: &RuleMessage) -> Option<RuleSpec> {
        let mut ours = false;
        let mut spec = RuleSpec {
            priority: 0,
            from: None,
            to: None,
            iif: None,
            fwmark: None,
            table: u32::from(message.header.table),
        };
        for attribute in &message.attributes {
            match attribute {
                RuleAttribute::Protocol(p) => ours = *p == RouteProtocol::Other(ROUTE_PROTOCOL),
                RuleAttribute::Priority(p) => spec.priority = *p,
                RuleAttribute::Iifname(name) => spec.iif = Some(name.clone()),
                RuleAttribute::Source(IpAddr::V4(ip)) if message.header.src_len == 32 => {
                    spec.from = Some(*ip);
                }
                RuleAttribute::Destination(IpAddr::V4(ip)) => {
                    spec.to = Ipv4Net::new(*ip, message.header.dst_len).ok();
                }
                RuleAttribute::FwMark(mark) => spec.fwmark = Some(*mark),
                RuleAttribute::Table(t) => spec.table = *t,
                _ => {}
            }
        }
        if message.header.action != RuleAction::ToTable {
            // A broken rule of ours can never equal a desired one, so the diff removes it.
            spec.table = 0;
        }
        let in_range = (RULE_PRIORITY_FIRST..=RULE_PRIORITY_LAST).contains(&spec.priority);
        (ours && in_range).then_some(spec)
    }
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct RoutingState {
    pub routes: BTreeSet<RouteSpec>,
    pub rules: BTreeSet<RuleSpec>,
}

impl RoutingState {
    pub fn is_empty(&self) -> bool {
        self.routes.is_empty() && self.rules.is_empty()
    }
}

/// The routes and rules the ready sides call for. Sides that are not ready contribute
/// nothing; cross rules wait for both sides so that one side's traffic never falls
/// through to `main` half-configured.
pub fn desired_state(config: &RoutingConfig, assignment: &Assignment) -> Result<RoutingState> {
    let mut state = RoutingState::default();
    let left = assignment.ready(Side::Left);
    let right = assignment.ready(Side::Right);
    match config.mode {
        RoutingMode::Cross => {
            for side in [left, right].into_iter().flatten() {
                let table = config.table(side.side);
                let gateway = gateway_for(side, config.gateway(side.side))?;
                state.routes.insert(connected_route(side, table));
                state.routes.insert(RouteSpec {
                    gateway: Some(gateway),
                    ..default_route(side, table)
                });
            }
            if let (Some(left), Some(right)) = (left, right) {
                let (left_table, right_table) = (config.left_table.get(), config.right_table.get());
                state.rules.extend([
                    RuleSpec {
                        priority: RULE_PRIORITY_FROM_LEFT,
                        from: None,
                        to: None,
                        iif: Some(left.name.clone()),
                        fwmark: None,
                        table: right_table,
                    },
                    RuleSpec {
                        priority: RULE_PRIORITY_FROM_RIGHT,
                        from: None,
                        to: None,
                        iif: Some(right.name.clone()),
                        fwmark: None,
                        table: left_table,
                    },
                    RuleSpec {
                        priority: RULE_PRIORITY_REPLY_LEFT,
                        from: None,
                        to: None,
                        iif: None,
                        fwmark: Some(LEFT_INGRESS_MARK),
                        table: left_table,
                    },
                    RuleSpec {
                        priority: RULE_PRIORITY_REPLY_RIGHT,
                        from: None,
                        to: None,
                        iif: None,
                        fwmark: Some(RIGHT_INGRESS_MARK),
                        table: right_table,
                    },
                ]);
            }
        }
        RoutingMode::Global => {
            if let Some(right) = right {
                let gateway = gateway_for(right, config.right_gateway_for(assignment))?;
                state.routes.insert(RouteSpec {
                    gateway: Some(gateway),
                    ..default_route(right, MAIN_TABLE)
                });
            }
            if let Some(left) = left {
                let gateway = gateway_for(left, config.left_gateway)?;
                let connected = config.left_routes_already_connected(assignment);
                for &network in &config.left_routes {
                    if connected.contains(&network) {
                        continue;
                    }
                    state.routes.insert(RouteSpec {
                        destination: network,
                        gateway: Some(gateway),
                        ..default_route(left, MAIN_TABLE)
                    });
                }
            }
            add_source_rules(&mut state, config, assignment)?;
        }
    }
    Ok(state)
}

/// Global mode: a table per ready side (its connected subnet and, for left and right, the
/// default via its gateway) and `from <side address> lookup <side table>`. A learned left
/// route may cover a client's address; the SI's replies to that client still leave right.
/// The management table holds only its subnet: other management traffic falls through to
/// `main` as before. One address serving two sides (one leg) gets one rule, the right one's.
fn add_source_rules(
    state: &mut RoutingState,
    config: &RoutingConfig,
    assignment: &Assignment,
) -> Result<()> {
    let sides = [
        (
            Side::Right,
            config.right_table.get(),
            RULE_PRIORITY_FROM_RIGHT_ADDRESS,
        ),
        (
            Side::Left,
            config.left_table.get(),
            RULE_PRIORITY_FROM_LEFT_ADDRESS,
        ),
        (
            Side::Management,
            config.management_table.get(),
            RULE_PRIORITY_FROM_MANAGEMENT_ADDRESS,
        ),
    ];
    let mut sources = BTreeSet::new();
    for (side, table, priority) in sides {
        let Some(ready) = assignment.ready(side) else {
            continue;
        };
        if !sources.insert(ready.address.addr()) {
            continue;
        }
        state.routes.insert(connected_route(ready, table));
        if side != Side::Management {
            let configured = match side {
                Side::Right => config.right_gateway_for(assignment),
                _ => config.gateway(side),
            };
            let gateway = gateway_for(ready, configured)?;
            state.routes.insert(RouteSpec {
                gateway: Some(gateway),
                ..default_route(ready, table)
            });
        }
        state.rules.insert(RuleSpec {
            priority,
            from: Some(ready.address.addr()),
            to: None,
            iif: None,
            fwmark: None,
            table,
        });
    }
    if let (Some(pool), false) = (config.vpn_pool, sources.is_empty()) {
        state.rules.insert(RuleSpec {
            priority: RULE_PRIORITY_TO_VPN_POOL,
            from: None,
            to: Some(pool.trunc()),
            iif: None,
            fwmark: None,
            table: MAIN_TABLE,
        });
    }
    Ok(())
}

fn connected_route(side: &ReadySide, table: u32) -> RouteSpec {
    RouteSpec {
        protocol: ROUTE_PROTOCOL,
        table,
        destination: side.subnet(),
        gateway: None,
        oif: side.index,
        source: Some(side.address.addr()),
        scope: Scope::Link,
        metric: 0,
    }
}

fn default_route(side: &ReadySide, table: u32) -> RouteSpec {
    RouteSpec {
        protocol: ROUTE_PROTOCOL,
        table,
        destination: Ipv4Net::default(),
        gateway: None,
        oif: side.index,
        source: None,
        scope: Scope::Universe,
        metric: 0,
    }
}

/// What one apply changed, for the log and the tests.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Changes {
    pub added: RoutingState,
    pub removed: RoutingState,
}

impl Changes {
    pub fn is_empty(&self) -> bool {
        self.added.is_empty() && self.removed.is_empty()
    }
}

impl fmt::Display for Changes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut parts = Vec::new();
        parts.extend(self.removed.rules.iter().map(|r| format!("-rule {r}")));
        parts.extend(self.removed.routes.iter().map(|r| format!("-route {r}")));
        parts.extend(self.added.routes.iter().map(|r| format!("+route {r}")));
        parts.extend(self.added.rules.iter().map(|r| format!("+rule {r}")));
        f.write_str(&parts.join("; "))
    }
}

/// Which slice of the kernel's routing state a reconciler owns.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Slice {
    /// Routes and rules tagged ROUTE_PROTOCOL: side tables, cross rules, global routes.
    Sides,
    /// Routes tagged DHCP_ROUTE_PROTOCOL through one interface in one table: one lease.
    Lease { table: u32, oif: u32 },
}

/// Owns a slice of the kernel's routing state and converges it on a desired state.
pub struct Reconciler {
    kernel: Kernel,
    slice: Slice,
    /// Foreign routes we replaced (Docker's default via the first network in global
    /// mode); put back at teardown.
    displaced: Vec<RouteMessage>,
}

impl Reconciler {
    /// The reconciler of the side routing (protocol 245).
    pub fn new(kernel: Kernel) -> Self {
        Reconciler {
            kernel,
            slice: Slice::Sides,
            displaced: Vec::new(),
        }
    }

    /// The reconciler of one lease's routes (proto dhcp via `oif` in `table`); it never
    /// touches rules and never displaces a foreign route.
    pub fn for_lease(kernel: Kernel, table: u32, oif: u32) -> Self {
        Reconciler {
            kernel,
            slice: Slice::Lease { table, oif },
            displaced: Vec::new(),
        }
    }

    /// Everything in the kernel that belongs to this reconciler's slice.
    pub async fn current(&self) -> Result<RoutingState> {
        let routes = self.kernel.routes_v4().await?;
        Ok(match self.slice {
            Slice::Sides => RoutingState {
                routes: routes
                    .iter()
                    .filter_map(|m| RouteSpec::from_message(m, ROUTE_PROTOCOL))
                    .collect(),
                rules: self
                    .kernel
                    .rules_v4()
                    .await?
                    .iter()
                    .filter_map(RuleSpec::from_message)
                    .collect(),
            },
            Slice::Lease { table, oif } => RoutingState {
                routes: routes
                    .iter()
                    .filter_map(|m| RouteSpec::from_message(m, DHCP_ROUTE_PROTOCOL))
                    .filter(|r| r.table == table && r.oif == oif)
                    .collect(),
                rules: BTreeSet::new(),
            },
        })
    }

    /// Makes the kernel hold exactly `desired` of our routes and rules, then verifies it.
    pub async fn apply(&mut self, desired: &RoutingState) -> Result<Changes> {
        let current = self.current().await?;
        let changes = Changes {
            added: RoutingState {
                routes: desired
                    .routes
                    .difference(&current.routes)
                    .cloned()
                    .collect(),
                rules: desired.rules.difference(&current.rules).cloned().collect(),
            },
            removed: RoutingState {
                routes: current
                    .routes
                    .difference(&desired.routes)
                    .cloned()
                    .collect(),
                rules: current.rules.difference(&desired.rules).cloned().collect(),
            },
        };
        if changes.is_empty() {
            return Ok(changes);
        }

        for rule in &changes.removed.rules {
            ignore_missing(
                self.kernel
                    .delete_rule(&rule.to_string(), rule.to_message())
                    .await,
            )?;
        }
        for route in &changes.removed.routes {
            ignore_missing(
                self.kernel
                    .delete_route(&route.to_string(), route.to_message())
                    .await,
            )?;
        }
        // Connected routes first: the kernel resolves a gateway through the same table.
        let mut additions: Vec<&RouteSpec> = changes.added.routes.iter().collect();
        additions.sort_by_key(|r| r.gateway.is_some());
        for route in additions {
            self.add_route(route).await?;
        }
        for rule in &changes.added.rules {
            self.kernel
                .add_rule(&rule.to_string(), rule.to_message())
                .await?;
        }

        let after = self.current().await?;
        if after != *desired {
            return Err(Error::Verify(describe_difference(desired, &after)));
        }
        Ok(changes)
    }

    async fn add_route(&mut self, route: &RouteSpec) -> Result<()> {
        let description = route.to_string();
        match self
            .kernel
            .add_route(&description, route.to_message(), false)
            .await
        {
            Err(error) if is_errno(&error, libc::EEXIST) && self.slice == Slice::Sides => {
                let foreign = self.kernel.routes_v4().await?.into_iter().find(|m| {
                    route.collides_with(m)
                        && [ROUTE_PROTOCOL, DHCP_ROUTE_PROTOCOL]
                            .iter()
                            .all(|&p| RouteSpec::from_message(m, p).is_none())
                });
                if let Some(foreign) = foreign {
                    info!(route = %description, "replacing a foreign route with the same destination; it is restored at teardown");
                    self.displaced.push(restorable(foreign));
                }
                self.kernel
                    .add_route(&description, route.to_message(), true)
                    .await
            }
            other => other,
        }
    }

    /// Removes every route and rule we tagged and puts displaced foreign routes back.
    pub async fn teardown(&mut self) -> Result<Changes> {
        let changes = self.apply(&RoutingState::default()).await?;
        for route in std::mem::take(&mut self.displaced) {
            if let Err(error) = self
                .kernel
                .add_route("restore displaced route", route, false)
                .await
            {
                if !is_errno(&error, libc::EEXIST) {
                    warn!(%error, "could not restore a displaced route");
                }
            }
        }
        Ok(changes)
    }
}

/// A route that vanished under us (the kernel flushes routes of a downed link) is gone
/// already, which is what a delete wants.
fn ignore_missing(result: Result<()>) -> Result<()> {
    match result {
        Err(error)
            if [libc::ESRCH, libc::ENOENT, libc::ENODEV]
                .iter()
                .any(|&e| is_errno(&error, e)) =>
        {
            Ok(())
        }
        other => other,
    }
}

/// Keeps only what re-creating the route needs (dumps carry cache info the kernel refuses).
fn restorable(mut route: RouteMessage) -> RouteMessage {
    route.attributes.retain(|a| {
        matches!(
            a,
            RouteAttribute::Table(_)
                | RouteAttribute::Destination(_)
                | RouteAttribute::Gateway(_)
                | RouteAttribute::Oif(_)
                | RouteAttribute::PrefSource(_)
                | RouteAttribute::Priority(_)
        )
    });
    route.header.flags = Default::default();
    route
}

fn describe_difference(desired: &RoutingState, actual: &RoutingState) -> String {
    let mut parts = Vec::new();
    parts.extend(
        desired
            .routes
            .difference(&actual.routes)
            .map(|r| format!("missing route {r}")),
    );
    parts.extend(
        actual
            .routes
            .difference(&desired.routes)
            .map(|r| format!("unexpected route {r}")),
    );
    parts.extend(
        desired
            .rules
            .difference(&actual.rules)
            .map(|r| format!("missing rule {r}")),
    );
    parts.extend(
        actual
            .rules
            .difference(&desired.rules)
            .map(|r| format!("unexpected rule {r}")),
    );
    parts.join("; ")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::side::{assign, Interface, SideSelectors};

    fn assignment(right_up: bool) -> Assignment {
        let interfaces = [
            Interface {
                index: 2,
                name: "eth0".into(),
                mac: None,
                ethernet: true,
                up: true,
                mtu: 1500,
                addresses: vec!["10.0.1.2/24".parse().unwrap()],
            },
            Interface {
                index: 3,
                name: "eth1".into(),
                mac: None,
                ethernet: true,
                up: right_up,
                mtu: 1500,
                addresses: vec!["10.0.2.2/24".parse().unwrap()],
            },
        ];
        assign(&SideSelectors::default(), &interfaces).unwrap()
    }

    #[test]
    fn cross_mode_builds_a_table_per_side_and_crossed_rules() {
        let config = RoutingConfig::new(RoutingMode::Cross);
        let state = desired_state(&config, &assignment(true)).unwrap();
        let routes: Vec<String> = state.routes.iter().map(ToString::to_string).collect();
        assert_eq!(
            routes,
            [
                "0.0.0.0/0 via 10.0.1.1 oif 2 table 1001",
                "10.0.1.0/24 oif 2 table 1001 src 10.0.1.2",
                "0.0.0.0/0 via 10.0.2.1 oif 3 table 1002",
                "10.0.2.0/24 oif 3 table 1002 src 10.0.2.2",
            ]
        );
        let rules: Vec<String> = state.rules.iter().map(ToString::to_string).collect();
        assert_eq!(
            rules,
            [
                "1000: iif eth0 lookup 1002",
                "1001: iif eth1 lookup 1001",
                "1002: fwmark 0xd0c0001 lookup 1001",
                "1003: fwmark 0xd0c0002 lookup 1002"
            ]
        );
    }

    #[test]
    fn cross_rules_wait_for_both_sides() {
        let state =
            desired_state(&RoutingConfig::new(RoutingMode::Cross), &assignment(false)).unwrap();
        assert_eq!(state.routes.len(), 2);
        assert!(state.rules.is_empty());
    }

    #[test]
    fn global_mode_points_default_right_and_left_networks_left() {
        let mut config = RoutingConfig::new(RoutingMode::Global);
        config.left_routes = vec![
            "192.168.10.0/24".parse().unwrap(),
            "10.0.1.0/24".parse().unwrap(),
        ];
        config.right_gateway = Some("10.0.2.254".parse().unwrap());
        let state = desired_state(&config, &assignment(true)).unwrap();
        let main: Vec<String> = state
            .routes
            .iter()
            .filter(|r| r.table == MAIN_TABLE)
            .map(ToString::to_string)
            .collect();
        assert_eq!(
            main,
            [
                "0.0.0.0/0 via 10.0.2.254 oif 3 table 254",
                "192.168.10.0/24 via 10.0.1.1 oif 2 table 254"
            ]
        );
    }

    #[test]
    fn global_mode_sends_the_sis_own_traffic_by_the_side_of_its_source_address() {
        let mut config = RoutingConfig::new(RoutingMode::Global);
        config.right_gateway = Some("10.0.2.254".parse().unwrap());
        config.vpn_pool = Some("10.8.0.0/24".parse().unwrap());
        let state = desired_state(&config, &assignment(true)).unwrap();
        let side_tables: Vec<String> = state
            .routes
            .iter()
            .filter(|r| r.table != MAIN_TABLE)
            .map(ToString::to_string)
            .collect();
        assert_eq!(
            side_tables,
            [
                "0.0.0.0/0 via 10.0.1.1 oif 2 table 1001",
                "10.0.1.0/24 oif 2 table 1001 src 10.0.1.2",
                "0.0.0.0/0 via 10.0.2.254 oif 3 table 1002",
                "10.0.2.0/24 oif 3 table 1002 src 10.0.2.2",
            ]
        );
        let rules: Vec<String> = state.rules.iter().map(ToString::to_string).collect();
        assert_eq!(
            rules,
            [
                "1004: to 10.8.0.0/24 lookup 254",
                "1005: from 10.0.2.2 lookup 1002",
                "1006: from 10.0.1.2 lookup 1001"
            ],
            "the pool stays behind the tun in main, whatever the source"
        );
        let without_right = desired_state(&config, &assignment(false)).unwrap();
        let rules: Vec<String> = without_right
            .rules
            .iter()
            .map(ToString::to_string)
            .collect();
        assert_eq!(
            rules,
            [
                "1004: to 10.8.0.0/24 lookup 254",
                "1006: from 10.0.1.2 lookup 1001"
            ]
        );
    }

    #[test]
    fn one_leg_serving_two_sides_gets_one_source_rule_and_management_its_subnet() {
        let ready = |side, index, name: &str, address: &str| ReadySide {
            side,
            index,
            name: name.into(),
            address: address.parse().unwrap(),
        };
        let assignment = Assignment {
            interfaces: [None, None, None],
            ready: [
                Some(ready(Side::Left, 2, "eth0", "10.0.1.2/24")),
                Some(ready(Side::Right, 2, "eth0", "10.0.1.2/24")),
                Some(ready(Side::Management, 4, "eth2", "172.31.0.5/24")),
            ],
            layout: Layout::OneArmed,
        };
        let state = desired_state(&RoutingConfig::new(RoutingMode::Global), &assignment).unwrap();
        let rules: Vec<String> = state.rules.iter().map(ToString::to_string).collect();
        assert_eq!(
            rules,
            [
                "1005: from 10.0.1.2 lookup 1002",
                "1007: from 172.31.0.5 lookup 1003"
            ]
        );
        let management: Vec<String> = state
            .routes
            .iter()
            .filter(|r| r.table == DEFAULT_MANAGEMENT_TABLE)
            .map(ToString::to_string)
            .collect();
        assert_eq!(
            management,
            ["172.31.0.0/24 oif 4 table 1003 src 172.31.0.5"]
        );
    }

    #[test]
    fn one_armed_global_mode_routes_default_and_left_networks_out_of_the_one_leg() {
        let leg = assignment(true).interfaces[0].clone().unwrap();
        let selectors = SideSelectors {
            single_leg: crate::side::SingleLeg::ServesBothSides,
            ..Default::default()
        };
        let one_armed = assign(&selectors, &[leg]).unwrap();
        let mut config = RoutingConfig::new(RoutingMode::Global);
        config.left_routes = vec![
            "192.168.10.0/24".parse().unwrap(),
            "10.0.1.0/24".parse().unwrap(),
        ];
        config.left_gateway = Some("10.0.1.254".parse().unwrap());
        let state = desired_state(&config, &one_armed).unwrap();
        let routes: Vec<String> = state.routes.iter().map(ToString::to_string).collect();
        assert_eq!(
            routes,
            [
                "0.0.0.0/0 via 10.0.1.254 oif 2 table 254",
                "192.168.10.0/24 via 10.0.1.254 oif 2 table 254",
                "0.0.0.0/0 via 10.0.1.254 oif 2 table 1002",
                "10.0.1.0/24 oif 2 table 1002 src 10.0.1.2"
            ],
            "the leg's one gateway, given as --left-gateway, serves both sides"
        );
        let rules: Vec<String> = state.rules.iter().map(ToString::to_string).collect();
        assert_eq!(
            rules,
            ["1005: from 10.0.1.2 lookup 1002"],
            "one source rule for the one address"
        );
        assert_eq!(
            config.left_routes_already_connected(&one_armed),
            vec!["10.0.1.0/24".parse::<Ipv4Net>().unwrap()]
        );
    }

    #[test]
    fn messages_round_trip_including_large_table_ids() {
        let route = RouteSpec {
            protocol: ROUTE_PROTOCOL,
            table: 100_000,
            destination: "10.0.1.0/24".parse().unwrap(),
            gateway: None,
            oif: 7,
            source: Some("10.0.1.2".parse().unwrap()),
            scope: Scope::Link,
            metric: 0,
        };
        let message = route.to_message();
        assert_eq!(message.header.table, RT_TABLE_UNSPEC);
        assert_eq!(
            RouteSpec::from_message(&message, ROUTE_PROTOCOL),
            Some(route)
        );

        let rule = RuleSpec {
            priority: 1000,
            from: Some("10.0.2.2".parse().unwrap()),
            to: Some("10.8.0.0/24".parse().unwrap()),
            iif: Some("eth0".into()),
            fwmark: Some(LEFT_INGRESS_MARK),
            table: 70_000,
        };
        let mut message = rule.to_message();
        assert_eq!(message.header.action, RuleAction::ToTable);
        // The kernel reports RT_TABLE_COMPAT (252) in the header for ids above 255.
        message.header.table = 252;
        assert_eq!(RuleSpec::from_message(&message), Some(rule));
    }

    #[test]
    fn foreign_routes_and_rules_are_not_ours() {
        let mut route = RouteSpec {
            protocol: ROUTE_PROTOCOL,
            table: 254,
            destination: Ipv4Net::default(),
            gateway: Some("10.0.1.1".parse().unwrap()),
            oif: 2,
            source: None,
            scope: Scope::Universe,
            metric: 0,
        }
        .to_message();
        route.header.protocol = RouteProtocol::Boot;
        assert_eq!(RouteSpec::from_message(&route, ROUTE_PROTOCOL), None);

        let rule = |priority| RuleSpec {
            priority,
            from: None,
            to: None,
            iif: Some("eth0".into()),
            fwmark: None,
            table: 1001,
        };
        assert_eq!(
            RuleSpec::from_message(&rule(5000).to_message()),
            None,
            "outside our priority range"
        );
        let mut untagged = rule(RULE_PRIORITY_FIRST).to_message();
        assert_eq!(
            RuleSpec::from_message(&untagged),
            Some(rule(RULE_PRIORITY_FIRST)),
            "tagged and in range: ours"
        );
        untagged
            .attributes
            .retain(|a| !matches!(a, RuleAttribute::Protocol(_)));
        assert_eq!(
            RuleSpec::from_message(&untagged),
            None,
            "in our range without the protocol tag"
        );
    }

    #[test]
    fn table_ids_are_validated() {
        for bad in ["0", "253", "254", "255", "-1", "x"] {
            let error = bad.parse::<TableId>().unwrap_err().to_string();
            assert!(error.contains("table id"), "{error}");
        }
        assert_eq!("100000".parse::<TableId>().unwrap().get(), 100_000);
        let mut config = RoutingConfig::new(RoutingMode::Cross);
        config.right_table = config.left_table;
        assert!(config.validate().is_err());
    }
}

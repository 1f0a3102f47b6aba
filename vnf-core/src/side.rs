//! Which interface is the left, the right and the management side.
//!
//! Pure logic over a snapshot of the namespace's interfaces, so that the rules are
//! unit-tested without root; `kernel` supplies the snapshot and `runtime` re-runs the
//! assignment on every link or address event.

use std::fmt;
use std::net::Ipv4Addr;
use std::str::FromStr;

use ipnet::Ipv4Net;
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::side_memory::RememberedSides;

#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    Hash,
    PartialOrd,
    Ord,
    Serialize,
    Deserialize,
    clap::ValueEnum,
)]
#[serde(rename_all = "lowercase")]
pub enum Side {
    Left,
    Right,
    #[serde(rename = "mgmt")]
    #[value(name = "mgmt")]
    Management,
}

impl Side {
    pub const ALL: [Side; 3] = [Side::Left, Side::Right, Side::Management];

    pub fn as_str(self) -> &'static str {
        match self {
            Side::Left => "left",
            Side::Right => "right",
            Side::Management => "mgmt",
        }
    }
}

impl fmt::Display for Side {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// How the operator pins a side to an interface.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SideSelector {
    Name(String),
    Mac([u8; 6]),
    /// The interface holding an IPv4 address inside this subnet.
    Cidr(Ipv4Net),
}

impl SideSelector {
    fn matches(&self, interface: &Interface) -> bool {
        match self {
            SideSelector::Name(name) => interface.name == *name,
            SideSelector::Mac(mac) => interface.mac == Some(*mac),
            SideSelector::Cidr(net) => interface.addresses.iter().any(|a| net.contains(&a.addr())),
        }
    }

    /// Two selectors that could pick the same interface.
    fn overlaps(&self, other: &SideSelector) -> bool {
        match (self, other) {
            (SideSelector::Name(a), SideSelector::Name(b)) => a == b,
            (SideSelector::Mac(a), SideSelector::Mac(b)) => a == b,
            (SideSelector::Cidr(a), SideSelector::Cidr(b)) => a.contains(b) || b.contains(a),
            _ => false,
        }
    }
}

impl fmt::Display for SideSelector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SideSelector::Name(name) => write!(f, "name:{name}"),
            SideSelector::Mac(mac) => write!(f, "mac:{}", format_mac(mac)),
            SideSelector::Cidr(net) => write!(f, "cidr:{net}"),
        }
    }
}

/// Accepts `name:eth1`, `mac:02:42:ac:11:00:02`, `cidr:10.0.1.0/24`, or the bare value
/// (a `/` means a CIDR, six hex pairs a MAC, anything else an interface name).
impl FromStr for SideSelector {
    type Err = Error;

    fn from_str(text: &str) -> Result<Self> {
        let text = text.trim();
        if let Some(name) = text.strip_prefix("name:") {
            return parse_name(name);
        }
        if let Some(mac) = text.strip_prefix("mac:") {
            return parse_mac(mac).map(SideSelector::Mac);
        }
        if let Some(cidr) = text.strip_prefix("cidr:") {
            return parse_cidr(cidr);
        }
        if text.contains('/') {
            parse_cidr(text)
        } else if looks_like_mac(text) {
            parse_mac(text).map(SideSelector::Mac)
        } else {
            parse_name(text)
        }
    }
}

fn parse_name(name: &str) -> Result<SideSelector> {
    // IFNAMSIZ is 16 including the NUL; the kernel also refuses '/', ':' and whitespace.
    let valid = !name.is_empty()
        && name.len() <= 15
        && !name.contains(['/', ':'])
        && !name.chars().any(char::is_whitespace);
    if valid {
        Ok(SideSelector::Name(name.to_string()))
    } else {
        Err(Error::invalid(
            "side selector",
            name,
            "not an interface name (1-15 characters, no '/', ':' or spaces); use name:IF, mac:MAC or cidr:NET/LEN",
        ))
    }
}

fn parse_cidr(text: &str) -> Result<SideSelector> {
    text.parse::<Ipv4Net>()
        .map(|net| SideSelector::Cidr(net.trunc()))
        .map_err(|_| Error::invalid("side selector", text, "not an IPv4 CIDR like 10.0.1.0/24"))
}

fn looks_like_mac(text: &str) -> bool {
    let parts: Vec<&str> = text.split([':', '-']).collect();
    parts.len() == 6
        && parts
            .iter()
            .all(|p| p.len() == 2 && p.chars().all(|c| c.is_ascii_hexdigit()))
}

fn parse_mac(text: &str) -> Result<[u8; 6]> {
    let error = || {
        Error::invalid(
            "side selector",
            text,
            "not a MAC address like 02:42:ac:11:00:02",
        )
    };
    if !looks_like_mac(text) {
        return Err(error());
    }
    let mut mac = [0u8; 6];
    for (byte, part) in mac.iter_mut().zip(text.split([':', '-'])) {
        *byte = u8::from_str_radix(part, 16).map_err(|_| error())?;
    }
    Ok(mac)
}

pub fn format_mac(mac: &[u8; 6]) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// Per-side selectors; a side without one takes the interface it had before a restart
/// (`remembered`) when that is present, else the next interface in order of appearance.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SideSelectors {
    pub left: Option<SideSelector>,
    pub right: Option<SideSelector>,
    pub management: Option<SideSelector>,
    pub remembered: RememberedSides,
    pub single_leg: SingleLeg,
}

/// What a VNF does while it has only one Ethernet leg.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum SingleLeg {
    /// Wait for the second leg (Dockwall: a firewall between two networks needs both).
    #[default]
    WaitForSecond,
    /// Without a `--right` selector, the one leg serves as both sides (Dockvpn one-armed).
    ServesBothSides,
}

/// How the sides map onto legs.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Layout {
    /// A leg per side (or sides still missing).
    #[default]
    DualHomed,
    /// One leg is the left and the right side: its address, subnet and gateway serve both.
    OneArmed,
}

impl SideSelectors {
    pub fn get(&self, side: Side) -> Option<&SideSelector> {
        match side {
            Side::Left => self.left.as_ref(),
            Side::Right => self.right.as_ref(),
            Side::Management => self.management.as_ref(),
        }
    }

    /// Refuses selectors that could pick one interface for two sides, before anything runs.
    pub fn validate(&self) -> Result<()> {
        for (i, &first) in Side::ALL.iter().enumerate() {
            for &second in &Side::ALL[i + 1..] {
                if let (Some(a), Some(b)) = (self.get(first), self.get(second)) {
                    if a.overlaps(b) {
                        return Err(Error::OverlappingSelectors {
                            first,
                            second,
                            detail: format!("{first}={a}, {second}={b}"),
                        });
                    }
                }
            }
        }
        Ok(())
    }

    pub fn describe(&self, side: Side) -> String {
        match (self.get(side), self.remembered.get(side)) {
            (Some(selector), _) => selector.to_string(),
            (None, Some(mac)) => format!(
                "order of appearance (#{}), remembered mac:{}",
                side_position(side) + 1,
                format_mac(&mac)
            ),
            (None, None) => format!("order of appearance (#{})", side_position(side) + 1),
        }
    }

    fn uses_cidr(&self) -> bool {
        Side::ALL
            .iter()
            .any(|&s| matches!(self.get(s), Some(SideSelector::Cidr(_))))
    }
}

/// The index of `side` in `Side::ALL`, for arrays kept per side.
pub fn side_position(side: Side) -> usize {
    Side::ALL.iter().position(|&s| s == side).unwrap_or(0)
}

/// One interface of the namespace as the kernel reports it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Interface {
    pub index: u32,
    pub name: String,
    #[serde(serialize_with = "serialize_mac")]
    pub mac: Option<[u8; 6]>,
    /// Ethernet-like (veth, Docker and Contrail ports); loopback, tun and WireGuard are not.
    pub ethernet: bool,
    pub up: bool,
    pub mtu: u32,
    /// IPv4 addresses with their prefix, primary first.
    pub addresses: Vec<Ipv4Net>,
}

fn serialize_mac<S: serde::Serializer>(mac: &Option<[u8; 6]>, s: S) -> Result<S::Ok, S::Error> {
    match mac {
        Some(mac) => s.serialize_some(&format_mac(mac)),
        None => s.serialize_none(),
    }
}

impl Interface {
    /// The address the side uses: the one inside a CIDR selector, else the primary.
    fn side_address(&self, selector: Option<&SideSelector>) -> Option<Ipv4Net> {
        match selector {
            Some(SideSelector::Cidr(net)) => self
                .addresses
                .iter()
                .copied()
                .find(|a| net.contains(&a.addr())),
            _ => self.addresses.first().copied(),
        }
    }
}

/// A side whose interface is up and addressed: ready to route.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize)]
pub struct ReadySide {
    pub side: Side,
    pub index: u32,
    pub name: String,
    /// The SI's own address with the subnet's prefix length.
    pub address: Ipv4Net,
}

impl ReadySide {
    pub fn subnet(&self) -> Ipv4Net {
        self.address.trunc()
    }
}

/// The result of matching interfaces to sides. An assigned interface that is not ready yet
/// (down or unaddressed) is kept so the runtime can say what it is waiting for.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Assignment {
    pub interfaces: [Option<Interface>; 3],
    pub ready: [Option<ReadySide>; 3],
    pub layout: Layout,
}

impl Assignment {
    pub fn is_one_armed(&self) -> bool {
        self.layout == Layout::OneArmed
    }

    pub fn interface(&self, side: Side) -> Option<&Interface> {
        self.interfaces[side_position(side)].as_ref()
    }

    pub fn ready(&self, side: Side) -> Option<&ReadySide> {
        self.ready[side_position(side)].as_ref()
    }

    /// Why a side is not ready, for the waiting log and the timeout error.
    pub fn waiting_reason(&self, side: Side, selectors: &SideSelectors) -> String {
        match self.interface(side) {
            None if selectors.get(side).is_some() => {
                format!("no interface matches {}", selectors.describe(side))
            }
            None if side == Side::Right
                && selectors.single_leg == SingleLeg::WaitForSecond
                && self.interface(Side::Left).is_some() =>
            {
                "no Ethernet interface #2 yet (order of appearance): this VNF needs two legs, attach the right network (docker network connect RIGHT_NETWORK SI)".into()
            }
            None => format!(
                "no Ethernet interface #{} yet (order of appearance)",
                side_position(side) + 1
            ),
            Some(interface) if !interface.up => format!("{} is down", interface.name),
            Some(interface) => format!("{} has no IPv4 address yet", interface.name),
        }
    }
}

/// Matches interfaces to sides: explicit selectors first, then the remaining Ethernet-like
/// interfaces in order of appearance (ifindex) fill the sides that have no selector.
pub fn assign(selectors: &SideSelectors, interfaces: &[Interface]) -> Result<Assignment> {
    let mut ordered: Vec<&Interface> = interfaces.iter().collect();
    ordered.sort_by_key(|i| i.index);

    let mut chosen: [Option<&Interface>; 3] = [None, None, None];
    for &side in &Side::ALL {
        let Some(selector) = selectors.get(side) else {
            continue;
        };
        chosen[side_position(side)] = ordered.iter().copied().find(|i| selector.matches(i));
    }
    for (i, &first) in Side::ALL.iter().enumerate() {
        for &second in &Side::ALL[i + 1..] {
            if let (Some(a), Some(b)) =
                (chosen[side_position(first)], chosen[side_position(second)])
            {
                if a.index == b.index {
                    return Err(Error::AmbiguousInterface {
                        interface: a.name.clone(),
                        first,
                        second,
                    });
                }
            }
        }
    }

    // Interfaces claimed by any selector never fill a defaulted side. With CIDR selectors an
    // interface is only recognisable once addressed, so unaddressed ones wait.
    let claimed = |i: &Interface| {
        Side::ALL
            .iter()
            .any(|&s| selectors.get(s).is_some_and(|sel| sel.matches(i)))
    };
    let mut defaults: Vec<&Interface> = ordered
        .iter()
        .copied()
        .filter(|i| i.ethernet && !claimed(i))
        .filter(|i| !selectors.uses_cidr() || !i.addresses.is_empty())
        .collect();
    let defaulted = || {
        Side::ALL
            .into_iter()
            .filter(|&side| selectors.get(side).is_none())
    };
    for side in defaulted() {
        let remembered = selectors.remembered.get(side);
        if let Some(found) = defaults
            .iter()
            .position(|i| remembered.is_some() && i.mac == remembered)
        {
            chosen[side_position(side)] = Some(defaults.remove(found));
        }
    }
    let mut defaults = defaults.into_iter();
    for side in defaulted() {
        if chosen[side_position(side)].is_none() {
            chosen[side_position(side)] = defaults.next();
        }
    }

    // One leg and no --right: the leg is both sides, when the VNF allows it.
    let one_armed = selectors.single_leg == SingleLeg::ServesBothSides
        && selectors.right.is_none()
        && chosen[side_position(Side::Right)].is_none()
        && chosen[side_position(Side::Left)].is_some();
    let mut assignment = Assignment::default();
    if one_armed {
        chosen[side_position(Side::Right)] = chosen[side_position(Side::Left)];
        assignment.layout = Layout::OneArmed;
    }
    for &side in &Side::ALL {
        let position = side_position(side);
        let Some(interface) = chosen[position] else {
            continue;
        };
        assignment.interfaces[position] = Some(interface.clone());
        if !interface.up {
            continue;
        }
        let selector = match side {
            Side::Right if one_armed => selectors.get(Side::Left),
            _ => selectors.get(side),
        };
        if let Some(address) = interface.side_address(selector) {
            assignment.ready[position] = Some(ReadySide {
                side,
                index: interface.index,
                name: interface.name.clone(),
                address,
            });
        }
    }
    Ok(assignment)
}

/// The gateway of a side: given explicitly, or the first host address of its subnet.
pub fn gateway_for(side: &ReadySide, explicit: Option<Ipv4Addr>) -> Result<Ipv4Addr> {
    let subnet = side.subnet();
    let gateway = match explicit {
        Some(gateway) => {
            if !subnet.contains(&gateway) {
                return Err(Error::GatewayOutsideSubnet {
                    side: side.side,
                    gateway,
                    subnet,
                });
            }
            gateway
        }
        None => {
            if subnet.prefix_len() >= 31 {
                return Err(Error::NoDefaultGateway {
                    side: side.side,
                    subnet,
                });
            }
            Ipv4Addr::from(u32::from(subnet.network()) + 1)
        }
    };
    if gateway == side.address.addr() {
        return Err(Error::GatewayIsOwnAddress {
            side: side.side,
            gateway,
        });
    }
    Ok(gateway)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn iface(index: u32, name: &str, mac: u8, addrs: &[&str]) -> Interface {
        Interface {
            index,
            name: name.into(),
            mac: Some([2, 0, 0, 0, 0, mac]),
            ethernet: true,
            up: true,
            mtu: 1500,
            addresses: addrs.iter().map(|a| a.parse().unwrap()).collect(),
        }
    }

    fn lo() -> Interface {
        Interface {
            index: 1,
            name: "lo".into(),
            mac: None,
            ethernet: false,
            up: true,
            mtu: 65536,
            addresses: vec!["127.0.0.1/8".parse().unwrap()],
        }
    }

    fn ready_name(a: &Assignment, side: Side) -> Option<&str> {
        a.ready(side).map(|r| r.name.as_str())
    }

    #[test]
    fn selectors_parse_prefixed_and_bare() {
        assert_eq!(
            "eth1".parse::<SideSelector>().unwrap(),
            SideSelector::Name("eth1".into())
        );
        assert_eq!(
            "name:eth1".parse::<SideSelector>().unwrap(),
            SideSelector::Name("eth1".into())
        );
        assert_eq!(
            "02:42:AC:11:00:02".parse::<SideSelector>().unwrap(),
            SideSelector::Mac([2, 0x42, 0xac, 0x11, 0, 2])
        );
        assert_eq!(
            "10.0.1.7/24".parse::<SideSelector>().unwrap(),
            SideSelector::Cidr("10.0.1.0/24".parse().unwrap())
        );
        for bad in [
            "",
            "mac:02:42",
            "cidr:10.0.0.0/33",
            "a/b",
            "much-too-long-name0",
            "cidr:fe80::/64",
        ] {
            let error = bad.parse::<SideSelector>().unwrap_err().to_string();
            assert!(error.contains("side selector"), "{bad}: {error}");
        }
    }

    #[test]
    fn default_order_skips_loopback_and_non_ethernet() {
        let mut tun = iface(5, "tun0", 9, &["10.8.0.1/24"]);
        tun.ethernet = false;
        let interfaces = [
            lo(),
            iface(7, "eth1", 2, &["10.0.2.2/24"]),
            tun,
            iface(3, "eth0", 1, &["10.0.1.2/24"]),
        ];
        let a = assign(&SideSelectors::default(), &interfaces).unwrap();
        assert_eq!(ready_name(&a, Side::Left), Some("eth0"));
        assert_eq!(ready_name(&a, Side::Right), Some("eth1"));
        assert_eq!(ready_name(&a, Side::Management), None);
    }

    #[test]
    fn remembered_macs_keep_the_sides_when_the_order_changes() {
        // After a restart the right network's interface (MAC …:02) came up first.
        let interfaces = [
            iface(5, "eth1", 2, &["10.0.2.2/24"]),
            iface(6, "eth0", 1, &["10.0.1.2/24"]),
        ];
        let mut selectors = SideSelectors::default();
        let a = assign(&selectors, &interfaces).unwrap();
        assert_eq!(ready_name(&a, Side::Left), Some("eth1"), "by order alone");
        selectors.remembered.set(Side::Left, [2, 0, 0, 0, 0, 1]);
        selectors.remembered.set(Side::Right, [2, 0, 0, 0, 0, 2]);
        let a = assign(&selectors, &interfaces).unwrap();
        assert_eq!(ready_name(&a, Side::Left), Some("eth0"));
        assert_eq!(ready_name(&a, Side::Right), Some("eth1"));

        // Only the right one is back: it keeps its side, the left waits for another.
        let a = assign(&selectors, &interfaces[..1]).unwrap();
        assert_eq!(ready_name(&a, Side::Left), None);
        assert_eq!(ready_name(&a, Side::Right), Some("eth1"));

        // A remembered interface that is gone: the side falls back to order of appearance.
        let replaced = [iface(7, "eth0", 9, &["10.0.1.2/24"]), interfaces[0].clone()];
        let a = assign(&selectors, &replaced).unwrap();
        assert_eq!(ready_name(&a, Side::Left), Some("eth0"));
        assert_eq!(ready_name(&a, Side::Right), Some("eth1"));

        // An explicit selector wins over what was remembered.
        selectors.left = Some("eth1".parse().unwrap());
        let a = assign(&selectors, &interfaces).unwrap();
        assert_eq!(ready_name(&a, Side::Left), Some("eth1"));
        assert_eq!(ready_name(&a, Side::Right), Some("eth0"));
    }

    #[test]
    fn selectors_take_precedence_and_defaults_fill_the_rest() {
        let interfaces = [
            iface(2, "eth0", 1, &["10.0.1.2/24"]),
            iface(3, "eth1", 2, &["10.0.2.2/24"]),
            iface(4, "eth2", 3, &["192.168.9.2/24"]),
        ];
        let selectors = SideSelectors {
            left: Some("eth1".parse().unwrap()),
            management: Some("cidr:192.168.9.0/24".parse().unwrap()),
            ..Default::default()
        };
        let a = assign(&selectors, &interfaces).unwrap();
        assert_eq!(ready_name(&a, Side::Left), Some("eth1"));
        assert_eq!(ready_name(&a, Side::Right), Some("eth0"));
        assert_eq!(ready_name(&a, Side::Management), Some("eth2"));

        let by_mac = SideSelectors {
            right: Some(SideSelector::Mac([2, 0, 0, 0, 0, 1])),
            ..Default::default()
        };
        let a = assign(&by_mac, &interfaces).unwrap();
        assert_eq!(ready_name(&a, Side::Right), Some("eth0"));
        assert_eq!(ready_name(&a, Side::Left), Some("eth1"));
    }

    #[test]
    fn cidr_selector_picks_matching_secondary_address() {
        let interfaces = [iface(2, "eth0", 1, &["10.0.1.2/24", "172.16.5.2/16"])];
        let selectors = SideSelectors {
            left: Some("172.16.0.0/16".parse().unwrap()),
            ..Default::default()
        };
        let a = assign(&selectors, &interfaces).unwrap();
        assert_eq!(
            a.ready(Side::Left).unwrap().address,
            "172.16.5.2/16".parse::<Ipv4Net>().unwrap()
        );
    }

    #[test]
    fn side_is_assigned_but_not_ready_while_down_or_unaddressed() {
        let mut down = iface(2, "eth0", 1, &["10.0.1.2/24"]);
        down.up = false;
        let a = assign(&SideSelectors::default(), &[down, iface(3, "eth1", 2, &[])]).unwrap();
        assert!(a.ready(Side::Left).is_none());
        assert!(a.ready(Side::Right).is_none());
        let selectors = SideSelectors::default();
        assert_eq!(a.waiting_reason(Side::Left, &selectors), "eth0 is down");
        assert_eq!(
            a.waiting_reason(Side::Right, &selectors),
            "eth1 has no IPv4 address yet"
        );
        assert_eq!(
            a.waiting_reason(Side::Management, &selectors),
            "no Ethernet interface #3 yet (order of appearance)"
        );
    }

    #[test]
    fn one_leg_serves_both_sides_only_where_allowed_and_without_a_right_selector() {
        let leg = iface(2, "eth0", 1, &["172.17.0.2/16"]);
        let one_armed = SideSelectors {
            single_leg: SingleLeg::ServesBothSides,
            ..Default::default()
        };
        let a = assign(&one_armed, std::slice::from_ref(&leg)).unwrap();
        assert!(a.is_one_armed());
        assert_eq!(a.ready(Side::Left).unwrap().address, leg.addresses[0]);
        assert_eq!(a.ready(Side::Right).unwrap().name, "eth0");
        assert_eq!(a.ready(Side::Right).unwrap().side, Side::Right);
        assert_eq!(ready_name(&a, Side::Management), None);

        // A second leg: dual-homed again.
        let two = [leg.clone(), iface(3, "eth1", 2, &["10.0.2.2/24"])];
        let a = assign(&one_armed, &two).unwrap();
        assert_eq!(a.layout, Layout::DualHomed);
        assert_eq!(ready_name(&a, Side::Right), Some("eth1"));

        // An explicit --right waits for its interface.
        let pinned = SideSelectors {
            right: Some("eth1".parse().unwrap()),
            ..one_armed.clone()
        };
        let a = assign(&pinned, std::slice::from_ref(&leg)).unwrap();
        assert!(!a.is_one_armed());
        assert_eq!(ready_name(&a, Side::Right), None);

        // A VNF that needs two legs waits, and says so.
        let selectors = SideSelectors::default();
        let a = assign(&selectors, std::slice::from_ref(&leg)).unwrap();
        assert!(!a.is_one_armed());
        assert_eq!(ready_name(&a, Side::Right), None);
        let reason = a.waiting_reason(Side::Right, &selectors);
        assert!(reason.contains("needs two legs"), "{reason}");
    }

    #[test]
    fn overlapping_selectors_are_refused() {
        let same_name = SideSelectors {
            left: Some("eth0".parse().unwrap()),
            right: Some("name:eth0".parse().unwrap()),
            ..Default::default()
        };
        assert!(matches!(
            same_name.validate(),
            Err(Error::OverlappingSelectors { .. })
        ));
        let nested = SideSelectors {
            left: Some("10.0.0.0/8".parse().unwrap()),
            management: Some("10.1.0.0/16".parse().unwrap()),
            ..Default::default()
        };
        let error = nested.validate().unwrap_err().to_string();
        assert!(
            error.contains("left=cidr:10.0.0.0/8, mgmt=cidr:10.1.0.0/16"),
            "{error}"
        );
        let disjoint = SideSelectors {
            left: Some("10.0.1.0/24".parse().unwrap()),
            right: Some("10.0.2.0/24".parse().unwrap()),
            ..Default::default()
        };
        disjoint.validate().unwrap();
    }

    #[test]
    fn one_interface_matching_two_kinds_of_selector_is_ambiguous() {
        let selectors = SideSelectors {
            left: Some("eth0".parse().unwrap()),
            right: Some("10.0.1.0/24".parse().unwrap()),
            ..Default::default()
        };
        let error = assign(&selectors, &[iface(2, "eth0", 1, &["10.0.1.2/24"])]).unwrap_err();
        assert!(matches!(error, Error::AmbiguousInterface { .. }));
    }

    #[test]
    fn gateway_defaults_to_first_host_and_is_validated() {
        let side = ReadySide {
            side: Side::Left,
            index: 2,
            name: "eth0".into(),
            address: "10.0.1.2/24".parse().unwrap(),
        };
        assert_eq!(
            gateway_for(&side, None).unwrap(),
            Ipv4Addr::new(10, 0, 1, 1)
        );
        assert_eq!(
            gateway_for(&side, Some("10.0.1.254".parse().unwrap())).unwrap(),
            Ipv4Addr::new(10, 0, 1, 254)
        );
        let outside = gateway_for(&side, Some("10.9.9.1".parse().unwrap()))
            .unwrap_err()
            .to_string();
        assert!(
            outside.contains("--left-gateway inside 10.0.1.0/24"),
            "{outside}"
        );
        let own = ReadySide {
            address: "10.0.1.1/24".parse().unwrap(),
            ..side.clone()
        };
        assert!(matches!(
            gateway_for(&own, None),
            Err(Error::GatewayIsOwnAddress { .. })
        ));
        let point_to_point = ReadySide {
            address: "10.0.1.1/32".parse().unwrap(),
            ..side
        };
        assert!(matches!(
            gateway_for(&point_to_point, None),
            Err(Error::NoDefaultGateway { .. })
        ));
    }
}

//! What clients may reach through the tunnel, enforced in a table of our own (`ip dockvpn`)
//! that is built as nft JSON (an interface name is a JSON string, never script text) and
//! replaced whole in one `nft -j -f -` transaction, together with the source NAT out of the
//! left side.
//!
//! - Forwarded from the tun: only out of the left side, and only to the pushed networks
//!   (anything there with redirect-gateway). A client with an allow list reaches only the
//!   parts of those inside its list. The rest (the right side, other clients) is dropped.
//! - To the SI itself from the tun: ping of the server's tunnel address, or of an SI address
//!   inside the networks the client may reach, and replies to what the SI sent. Nothing else:
//!   no service of the SI and no other address of it (management) answers through the tunnel.

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;
use std::sync::{Arc, Mutex};

use ipnet::Ipv4Net;
use nftables::expr::{Expression, MetaKey, NamedExpression, Prefix};
use nftables::schema::{
    Chain, NfCmd, NfListObject, NfObject, Nftables, Rule, Set, SetFlag, SetType, SetTypeValue,
    Table,
};
use nftables::stmt::{Match, Operator, Statement};
use nftables::types::{NfChainPolicy, NfChainType, NfFamily, NfHook};
use tracing::warn;
use vnf_core::firewall::compile::{ct, matches, meta, payload, string};
use vnf_core::{Error, Result};

const TABLE: &str = "dockvpn";
/// Where clients without an allow list may go.
const PUSHED: &str = "pushed";
/// The addresses of clients with an allow list.
const LIMITED: &str = "limited_clients";
/// `client address . network` for each client with an allow list.
const CLIENT_NETWORKS: &str = "client_networks";

/// Everything the table is built from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Access {
    pub tun: String,
    pub server_address: Ipv4Addr,
    pub pool: Ipv4Net,
    /// The left interface, while the left side is ready.
    pub left: Option<String>,
    pub masquerade: bool,
    pub redirect_gateway: bool,
    pub pushed: BTreeSet<Ipv4Net>,
    /// The allow list of each client address that has one.
    pub allowances: BTreeMap<Ipv4Addr, Vec<Ipv4Net>>,
}

/// The networks a client may reach: the pushed ones (everything with redirect-gateway), cut
/// down to its allow list when it has one.
pub fn client_networks(
    allow: Option<&[Ipv4Net]>,
    pushed: &BTreeSet<Ipv4Net>,
    redirect_gateway: bool,
) -> BTreeSet<Ipv4Net> {
    let mut reachable = pushed.clone();
    if redirect_gateway {
        reachable.insert(Ipv4Net::default());
    }
    let Some(allow) = allow else {
        return reachable;
    };
    reachable
        .iter()
        .flat_map(|route| allow.iter().filter_map(|net| overlap(*route, *net)))
        .collect()
}

/// The entries of an allow list that lie outside every pushed network: they grant nothing.
pub fn outside_pushed(allow: &[Ipv4Net], pushed: &BTreeSet<Ipv4Net>) -> Vec<Ipv4Net> {
    allow
        .iter()
        .filter(|net| pushed.iter().all(|route| overlap(*route, **net).is_none()))
        .copied()
        .collect()
}

/// The common part of two CIDR networks (one holds the other, or they are disjoint).
fn overlap(a: Ipv4Net, b: Ipv4Net) -> Option<Ipv4Net> {
    if a.contains(&b) {
        Some(b)
    } else if b.contains(&a) {
        Some(a)
    } else {
        None
    }
}

/// The table as the kernel holds it, shared by the side observer (left interface, pushed
/// networks) and the VPN driver (allow lists); every change replaces it whole.
#[derive(Clone)]
pub struct AccessTable {
    state: Arc<Mutex<(Access, Option<Access>)>>,
}

impl AccessTable {
    pub fn new(access: Access) -> AccessTable {
        AccessTable {
            state: Arc::new(Mutex::new((access, None))),
        }
    }

    /// Changes what the table is built from and applies it when it differs from the kernel's.
    pub fn update(&self, change: impl FnOnce(&mut Access)) -> Result<()> {
        let mut state = self
            .state
            .lock()
            .map_err(|_| Error::Vnf("the access table's lock was poisoned".to_owned()))?;
        let (wanted, applied) = &mut *state;
        change(wanted);
        if applied.as_ref() == Some(wanted) {
            return Ok(());
        }
        apply(wanted)?;
        *applied = Some(wanted.clone());
        Ok(())
    }

    /// Removes the table; the next update builds it again.
    pub fn remove(&self) -> Result<()> {
        if let Ok(mut state) = self.state.lock() {
            state.1 = None;
        }
        let batch = vec![
            add(NfListObject::Table(table())),
            NfObject::CmdObject(NfCmd::Delete(NfListObject::Table(table()))),
        ];
        send(batch)
    }

    /// The allow list of each client, from the registry.
    pub fn set_allowances(&self, allowances: BTreeMap<Ipv4Addr, Vec<Ipv4Net>>) {
        if let Err(error) = self.update(|access| access.allowances = allowances) {
            warn!(%error, "client allow lists not applied to the kernel; keeping the last ones");
        }
    }
}

fn apply(access: &Access) -> Result<()> {
    send(batch(access))
}

fn send(batch: Vec<NfObject<'static>>) -> Result<()> {
    let text = serde_json::to_string(&Nftables {
        objects: batch.into(),
    })
    .map_err(|error| Error::Vnf(format!("render the dockvpn nft table: {error}")))?;
    vnf_core::firewall::nft::nft(&["-j", "-f", "-"], Some(&text)).map(drop)
}

fn table() -> Table<'static> {
    Table {
        family: NfFamily::IP,
        name: TABLE.into(),
        handle: None,
    }
}

fn add(object: NfListObject<'static>) -> NfObject<'static> {
    NfObject::CmdObject(NfCmd::Add(object))
}

fn prefix(net: Ipv4Net) -> Expression<'static> {
    Expression::Named(NamedExpression::Prefix(Prefix {
        addr: Box::new(string(&net.network().to_string())),
        len: u32::from(net.prefix_len()),
    }))
}

fn set(
    name: &str,
    set_type: SetTypeValue<'static>,
    interval: bool,
    elements: Vec<Expression<'static>>,
) -> NfObject<'static> {
    add(NfListObject::Set(Box::new(Set {
        family: NfFamily::IP,
        table: TABLE.into(),
        name: name.to_owned().into(),
        set_type,
        flags: interval.then(|| [SetFlag::Interval].into_iter().collect()),
        elem: (!elements.is_empty()).then(|| elements.into()),
        ..Set::default()
    })))
}

fn base_chain(
    name: &str,
    chain_type: NfChainType,
    hook: NfHook,
    priority: i32,
) -> NfObject<'static> {
    add(NfListObject::Chain(Chain {
        family: NfFamily::IP,
        table: TABLE.into(),
        name: name.to_owned().into(),
        _type: Some(chain_type),
        hook: Some(hook),
        prio: Some(priority),
        policy: Some(NfChainPolicy::Accept),
        ..Chain::default()
    }))
}

fn rule(chain: &str, statements: Vec<Statement<'static>>) -> NfObject<'static> {
    add(NfListObject::Rule(Rule {
        family: NfFamily::IP,
        table: TABLE.into(),
        chain: chain.to_owned().into(),
        expr: statements.into(),
        handle: None,
        index: None,
        comment: None,
    }))
}

fn in_set(left: Expression<'static>, set: &str) -> Statement<'static> {
    matches(left, string(&format!("@{set}")))
}

fn not_in_set(left: Expression<'static>, set: &str) -> Statement<'static> {
    Statement::Match(Match {
        left,
        right: string(&format!("@{set}")),
        op: Operator::NEQ,
    })
}

fn source_and_destination() -> Expression<'static> {
    Expression::Named(NamedExpression::Concat(vec![
        payload("ip", "saddr"),
        payload("ip", "daddr"),
    ]))
}

/// Accepts, after `first` matched, a packet from a client without an allow list to a pushed
/// network and one from a client with a list to its networks.
fn reach_rules(chain: &str, first: &[Statement<'static>]) -> [NfObject<'static>; 2] {
    let with = |checks: Vec<Statement<'static>>| {
        let mut statements = first.to_vec();
        statements.extend(checks);
        statements.push(Statement::Accept(None));
        rule(chain, statements)
    };
    [
        with(vec![
            not_in_set(payload("ip", "saddr"), LIMITED),
            in_set(payload("ip", "daddr"), PUSHED),
        ]),
        with(vec![in_set(source_and_destination(), CLIENT_NETWORKS)]),
    ]
}

/// The transaction that replaces the table: create it if missing, delete it, build it.
fn batch(access: &Access) -> Vec<NfObject<'static>> {
    let reachable = client_networks(None, &access.pushed, access.redirect_gateway);
    let aggregated = |nets: &BTreeSet<Ipv4Net>| Ipv4Net::aggregate(&nets.iter().copied().collect());
    let client_elements = access
        .allowances
        .iter()
        .flat_map(|(address, allow)| {
            let networks = client_networks(Some(allow), &access.pushed, access.redirect_gateway);
            aggregated(&networks).into_iter().map(move |net| {
                Expression::Named(NamedExpression::Concat(vec![
                    string(&address.to_string()),
                    prefix(net),
                ]))
            })
        })
        .collect();
    let mut batch = vec![
        add(NfListObject::Table(table())),
        NfObject::CmdObject(NfCmd::Delete(NfListObject::Table(table()))),
        add(NfListObject::Table(table())),
        set(
            PUSHED,
            SetTypeValue::Single(SetType::Ipv4Addr),
            true,
            aggregated(&reachable).into_iter().map(prefix).collect(),
        ),
        set(
            LIMITED,
            SetTypeValue::Single(SetType::Ipv4Addr),
            false,
            access
                .allowances
                .keys()
                .map(|address| string(&address.to_string()))
                .collect(),
        ),
        set(
            CLIENT_NETWORKS,
            SetTypeValue::Concatenated(vec![SetType::Ipv4Addr, SetType::Ipv4Addr].into()),
            true,
            client_elements,
        ),
        base_chain("forward", NfChainType::Filter, NfHook::Forward, 0),
        base_chain("input", NfChainType::Filter, NfHook::Input, 0),
        base_chain("postrouting", NfChainType::NAT, NfHook::Postrouting, 100),
    ];
    let from_tun = || matches(meta(MetaKey::Iifname), string(&access.tun));
    let established = || {
        Statement::Match(Match {
            left: ct("state"),
            right: Expression::List(vec![string("established"), string("related")]),
            op: Operator::IN,
        })
    };
    // Replies (and their ICMP errors) to connections made towards a client pass.
    batch.push(rule(
        "forward",
        vec![from_tun(), established(), Statement::Accept(None)],
    ));
    if let Some(left) = &access.left {
        let to_left = || matches(meta(MetaKey::Oifname), string(left));
        batch.extend(reach_rules("forward", &[from_tun(), to_left()]));
        if access.masquerade {
            batch.push(rule(
                "postrouting",
                vec![
                    to_left(),
                    matches(payload("ip", "saddr"), prefix(access.pool)),
                    Statement::Masquerade(None),
                ],
            ));
        }
    }
    batch.push(rule("forward", vec![from_tun(), Statement::Drop(None)]));

    let ping = || matches(payload("icmp", "type"), string("echo-request"));
    batch.push(rule(
        "input",
        vec![from_tun(), established(), Statement::Accept(None)],
    ));
    batch.push(rule(
        "input",
        vec![
            from_tun(),
            ping(),
            matches(
                payload("ip", "daddr"),
                string(&access.server_address.to_string()),
            ),
            Statement::Accept(None),
        ],
    ));
    batch.extend(reach_rules("input", &[from_tun(), ping()]));
    batch.push(rule("input", vec![from_tun(), Statement::Drop(None)]));
    batch
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nets(list: &[&str]) -> Vec<Ipv4Net> {
        list.iter().map(|n| n.parse().expect("a network")).collect()
    }

    #[test]
    fn a_client_network_is_the_common_part_of_its_allow_list_and_the_pushed_routes() {
        let pushed: BTreeSet<Ipv4Net> = nets(&["10.1.0.0/16", "192.168.10.0/24"])
            .into_iter()
            .collect();
        let allow = nets(&["10.1.2.0/24", "192.168.0.0/16", "172.16.0.0/12"]);
        assert_eq!(
            client_networks(Some(&allow), &pushed, false),
            nets(&["10.1.2.0/24", "192.168.10.0/24"])
                .into_iter()
                .collect()
        );
        assert_eq!(outside_pushed(&allow, &pushed), nets(&["172.16.0.0/12"]));
        assert_eq!(client_networks(None, &pushed, false), pushed);
        assert_eq!(
            client_networks(Some(&allow), &BTreeSet::new(), true),
            allow.iter().copied().collect(),
            "with redirect-gateway the allow list is the client's whole reach"
        );
    }

    #[test]
    fn an_interface_name_with_a_quote_stays_one_json_string() {
        let access = Access {
            tun: "tun\"0".to_owned(),
            server_address: Ipv4Addr::new(10, 8, 0, 1),
            pool: "10.8.0.0/24".parse().expect("a network"),
            left: Some("eth\" accept".to_owned()),
            masquerade: true,
            redirect_gateway: false,
            pushed: BTreeSet::new(),
            allowances: BTreeMap::new(),
        };
        let text = serde_json::to_string(&Nftables {
            objects: batch(&access).into(),
        })
        .expect("JSON");
        let parsed: serde_json::Value = serde_json::from_str(&text).expect("valid JSON");
        let names: Vec<&str> = parsed["nftables"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|object| object["add"]["rule"]["expr"][0]["match"]["right"].as_str())
            .collect();
        assert!(names.contains(&"tun\"0"), "{names:?}");
        assert!(text.contains(r#"eth\" accept"#), "{text}");
    }
}

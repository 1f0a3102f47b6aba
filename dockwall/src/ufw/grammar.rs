//! ufw's command words → what they mean in Dockwall's rule model. Pure: the interface names
//! of the sides come in as [`SideNames`], so the table test needs no kernel.

use ipnet::IpNet;
use vnf_core::firewall::model::TimeUnit;
use vnf_core::firewall::{Action, Direction, Policy, PortRange, Protocol, Rate, Rule};
use vnf_core::side::Side;
use vnf_core::{Error, Result};

/// ufw's `limit`: deny a source after 6 connections in 30 seconds. The model's limit is one
/// rate for all sources together; established traffic is accepted before any rule, so it
/// counts new connections: 12 a minute is the same pace.
pub const UFW_LIMIT: Rate = Rate {
    packets: 12,
    per: TimeUnit::Minute,
};

/// ufw's service names for common ports (its `allow ssh`), with the protocol they mean.
const SERVICES: [(&str, u16); 3] = [("ssh", 22), ("http", 80), ("https", 443)];

/// ufw's protocol names that the model knows only by number.
const PROTOCOL_NUMBERS: [(&str, u8); 3] = [("ipv6", 41), ("igmp", 2), ("vrrp", 112)];

/// ufw caps a port list at 15 ports, a range counting as 2; so does this (each entry becomes
/// a rule).
const MAX_PORT_LIST: usize = 15;

/// The interfaces that serve the sides now, as the side assignment sees them.
#[derive(Debug, Clone, Default)]
pub struct SideNames {
    pub left: Option<String>,
    pub right: Option<String>,
    pub mgmt: Option<String>,
}

impl SideNames {
    /// The interface name ufw's `on IF` uses for a side (the side's name while it has none).
    pub fn interface(&self, side: Side) -> &str {
        let name = match side {
            Side::Left => &self.left,
            Side::Right => &self.right,
            Side::Management => &self.mgmt,
        };
        name.as_deref().unwrap_or(side.as_str())
    }

    fn side_of(&self, name: &str) -> Result<Side> {
        for side in [Side::Left, Side::Right] {
            if name == side.as_str() || self.interface(side) == name {
                return Ok(side);
            }
        }
        let reason = if self.mgmt.as_deref() == Some(name) {
            "is the management interface; route rules filter what crosses between left and right"
        } else {
            "is not a side of this SI"
        };
        let described = |side: Side| match self.interface(side) {
            name if name == side.as_str() => format!("{side} (no interface yet)"),
            name => format!("{side} ({name})"),
        };
        Err(Error::invalid(
            "interface",
            name,
            format!(
                "{reason}: use {} or {}, by interface name or side name",
                described(Side::Left),
                described(Side::Right)
            ),
        ))
    }
}

/// What a ufw command line asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UfwCommand {
    /// Add rules (one ufw rule can be several Dockwall rules: `allow 22` is tcp and udp), at
    /// a 1-based position (`insert N`, `prepend`) or at the end.
    Add {
        rules: Vec<Rule>,
        at: Option<usize>,
    },
    /// Delete the rules these words make.
    Delete(Vec<Rule>),
    /// Delete the rule numbered N in `status numbered`.
    DeleteNumber(usize),
    Status(StatusView),
    /// `default allow|deny routed`: the forward policy.
    DefaultRouted(Policy),
    Enable,
    Reload,
}

impl UfwCommand {
    /// Whether the command edits the rule set (what `--dry-run` can show).
    pub fn edits(&self) -> bool {
        !matches!(
            self,
            UfwCommand::Status(_) | UfwCommand::Enable | UfwCommand::Reload
        )
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StatusView {
    Plain,
    Numbered,
    Verbose,
}

fn refused(word: &str, reason: impl ToString) -> Error {
    Error::invalid("ufw word", word, reason)
}

fn missing(after: &str, what: &str) -> Error {
    Error::invalid("ufw command", after, format!("{what} must follow"))
}

/// A command line read, its route interfaces (`in on IF`, `out on IF`) not yet known as
/// sides: reading needs no kernel, so a mistake in the words is told before the sides are
/// looked up.
#[derive(Debug)]
pub struct ReadCommand {
    command: UfwCommand,
    interfaces: Interfaces,
}

impl ReadCommand {
    fn without_interfaces(command: UfwCommand) -> Self {
        ReadCommand {
            command,
            interfaces: Interfaces::default(),
        }
    }

    /// The command, its route rules' direction given by the interfaces they name.
    pub fn resolve(mut self, sides: &SideNames) -> Result<UfwCommand> {
        if let UfwCommand::Add { rules, .. } | UfwCommand::Delete(rules) = &mut self.command {
            if let Some(direction) = self.interfaces.direction(sides)? {
                for rule in rules {
                    rule.direction = direction;
                }
            }
        }
        Ok(self.command)
    }
}

/// The interfaces a route rule names.
#[derive(Debug, Default)]
struct Interfaces {
    inbound: Option<String>,
    outbound: Option<String>,
}

impl Interfaces {
    /// The direction of a route rule naming these interfaces; None when it names none.
    fn direction(&self, sides: &SideNames) -> Result<Option<Direction>> {
        let side = |name: &Option<String>| name.as_deref().map(|n| sides.side_of(n)).transpose();
        match (side(&self.inbound)?, side(&self.outbound)?) {
            (Some(a), Some(b)) if a == b => Err(refused(
                self.outbound.as_deref().unwrap_or_default(),
                "in and out are the same side; Dockwall filters what crosses from one side to \
                 the other",
            )),
            (Some(Side::Left), _) | (None, Some(Side::Right)) => Ok(Some(Direction::LeftToRight)),
            (Some(_), _) | (None, Some(_)) => Ok(Some(Direction::RightToLeft)),
            (None, None) => Ok(None),
        }
    }
}

/// Reads a ufw command line; [`ReadCommand::resolve`] then gives what it asks for.
pub fn read(words: &[String]) -> Result<ReadCommand> {
    let words: Vec<&str> = words.iter().map(String::as_str).collect();
    let command = match words.as_slice() {
        [] => Err(Error::invalid(
            "ufw command",
            "",
            "give one, e.g. `allow 22/tcp`, `status numbered` or `delete 3`",
        )),
        ["status"] => Ok(UfwCommand::Status(StatusView::Plain)),
        ["status", "numbered"] => Ok(UfwCommand::Status(StatusView::Numbered)),
        ["status", "verbose"] => Ok(UfwCommand::Status(StatusView::Verbose)),
        ["status", other, ..] => Err(refused(
            other,
            "use `status`, `status numbered` or `status verbose`",
        )),
        ["enable"] => Ok(UfwCommand::Enable),
        ["reload"] => Ok(UfwCommand::Reload),
        ["disable"] => Err(refused(
            "disable",
            "Dockwall filters while `dockwall run` runs and has no off switch; to let everything \
             through use `default allow routed` and delete the rules",
        )),
        ["default", rest @ ..] => parse_default(rest),
        [command @ ("logging" | "reset" | "show" | "app" | "version"), ..] => Err(refused(
            command,
            "this ufw command is not supported by Dockwall (rules, status, default routed, \
             enable and reload are)",
        )),
        _ => return parse_rule_command(&words),
    }?;
    Ok(ReadCommand::without_interfaces(command))
}

fn parse_default(rest: &[&str]) -> Result<UfwCommand> {
    let (policy, direction) = match rest {
        [policy] => (*policy, "incoming"),
        [policy, direction] => (*policy, *direction),
        _ => return Err(missing("default", "allow|deny routed")),
    };
    let policy = match policy {
        "allow" => Policy::Accept,
        "deny" => Policy::Drop,
        "reject" => {
            return Err(refused(
                "reject",
                "Dockwall's default policy accepts or drops; use `default deny routed`",
            ))
        }
        other => {
            return Err(refused(
                other,
                "use `default allow routed` or `default deny routed`",
            ))
        }
    };
    match direction {
        "routed" => Ok(UfwCommand::DefaultRouted(policy)),
        "incoming" => Err(refused(
            direction,
            "Dockwall accepts traffic to the SI unless a rule (`ufw deny …`) says otherwise; only \
             routed traffic has a default policy: add `routed`",
        )),
        "outgoing" => Err(refused(
            direction,
            "Dockwall does not filter the SI's own outgoing traffic; only routed traffic has a \
             default policy: `default allow|deny routed`",
        )),
        other => Err(refused(other, "use `routed`")),
    }
}

/// `[rule] [route] [delete] [insert N | prepend] ACTION …` and `[route] delete N`.
fn parse_rule_command(words: &[&str]) -> Result<ReadCommand> {
    let (mut route, mut delete, mut at) = (false, false, None);
    // The word that gave the position, for a refusal.
    let mut at_word = "";
    let mut rest = words;
    loop {
        match rest {
            ["rule", tail @ ..] => rest = tail,
            ["route", tail @ ..] => {
                route = true;
                rest = tail;
            }
            ["delete", ""] => {
                return Err(refused(
                    "",
                    "delete takes a rule number (see `status numbered`) or the words the rule \
                     was added with",
                ))
            }
            ["delete", number] if number.bytes().all(|b| b.is_ascii_digit()) => {
                return match number.parse() {
                    Ok(0) => Err(refused(
                        number,
                        "rule numbers start at 1; see `status numbered`",
                    )),
                    Ok(n) => Ok(ReadCommand::without_interfaces(UfwCommand::DeleteNumber(n))),
                    // Only digits: too many of them for any rule set.
                    Err(_) => Err(refused(
                        number,
                        "Could not find a rule with this number; see `status numbered`",
                    )),
                };
            }
            ["delete", tail @ ..] => {
                delete = true;
                rest = tail;
            }
            ["insert", number, tail @ ..] => {
                at = Some(position(number)?);
                at_word = "insert";
                rest = tail;
            }
            ["insert"] => return Err(missing("insert", "a rule number")),
            ["prepend", tail @ ..] => {
                at = Some(1);
                at_word = "prepend";
                rest = tail;
            }
            _ => break,
        }
    }
    let (action, tail) = match rest {
        [action, tail @ ..] => (parse_action(action)?, tail),
        [] => {
            return Err(missing(
                words.last().unwrap_or(&""),
                "allow|deny|reject|limit",
            ))
        }
    };
    let (rules, interfaces) = parse_rule(action, tail, route)?;
    let command = match (delete, at) {
        (true, Some(_)) => {
            return Err(refused(
                at_word,
                format!("delete and {at_word} do not go together"),
            ))
        }
        (true, None) => UfwCommand::Delete(rules),
        (false, at) => UfwCommand::Add { rules, at },
    };
    Ok(ReadCommand {
        command,
        interfaces,
    })
}

fn position(word: &str) -> Result<usize> {
    word.parse().ok().filter(|&n: &usize| n > 0).ok_or_else(|| {
        refused(
            word,
            "insert takes a rule number (1 = first), as `status numbered` shows",
        )
    })
}

fn parse_action(word: &str) -> Result<Action> {
    match word {
        "allow" => Ok(Action::Allow),
        "deny" => Ok(Action::Deny),
        "reject" => Ok(Action::Reject),
        "limit" => Ok(Action::Limit),
        other => Err(refused(
            other,
            "expected allow, deny, reject or limit (or status, delete N, insert N, route, default)",
        )),
    }
}

/// The words after the action, gathered before they become rules.
#[derive(Default)]
struct Words {
    interfaces: Interfaces,
    log: bool,
    protocol: Option<Protocol>,
    source: Option<Option<IpNet>>,
    destination: Option<Option<IpNet>>,
    source_ports: Option<Vec<PortRange>>,
    destination_ports: Option<Vec<PortRange>>,
    /// The protocol a service name after `port` brings (`to any port ssh`).
    implied_protocol: Option<Protocol>,
    /// The short form `PORT[/PROTO]` or a service name.
    short: Option<(Vec<PortRange>, Option<Protocol>)>,
    comment: Option<String>,
}

fn parse_rule(action: Action, tail: &[&str], route: bool) -> Result<(Vec<Rule>, Interfaces)> {
    let mut words = Words::default();
    let mut rest = tail.iter().copied().peekable();
    while let Some(word) = rest.next() {
        match word {
            "out" if !route => {
                return Err(refused(
                    "out",
                    "Dockwall does not filter the SI's own outgoing traffic; for traffic \
                     crossing the SI use `route … out on IF`",
                ))
            }
            "in" | "out" => match rest.next_if_eq(&"on") {
                Some(_) => {
                    let name = next(&mut rest, "on", "an interface name")?.to_owned();
                    if !route {
                        return Err(refused(
                            "on",
                            format!(
                                "Dockwall's rules for traffic to the SI match every interface; \
                                 for traffic crossing the SI write `route {} {word} on {name} …`",
                                action.as_str()
                            ),
                        ));
                    }
                    let slot = if word == "in" {
                        &mut words.interfaces.inbound
                    } else {
                        &mut words.interfaces.outbound
                    };
                    if slot.replace(name).is_some() {
                        return Err(refused(word, format!("`{word} on` is given twice")));
                    }
                }
                None if route => {
                    return Err(refused(
                        word,
                        format!("route rules name the interface: `{word} on IF`"),
                    ))
                }
                // ufw's `in` is what a rule without `route` means anyway.
                None => {}
            },
            "log" => words.log = true,
            "log-all" => {
                return Err(refused(
                    "log-all",
                    "established traffic is accepted before any rule, so only new connections \
                     can be logged: use `log`",
                ))
            }
            "proto" | "from" | "to" if words.short.is_some() => {
                return Err(short_form_conflict(word))
            }
            "proto" => {
                if words.protocol.is_some() {
                    return Err(refused("proto", "`proto` is given twice"));
                }
                words.protocol = Some(parse_protocol(next(&mut rest, "proto", "a protocol")?)?);
            }
            "from" | "to" => {
                let address = parse_address(next(&mut rest, word, "an address, a CIDR or any")?)?;
                let ports = match rest.next_if(|w| *w == "port" || *w == "app") {
                    Some("app") => return Err(app_refused()),
                    Some(_) => {
                        let port = next(&mut rest, "port", "a port")?;
                        if port.contains('/') {
                            return Err(refused(
                                port,
                                "after `port` the protocol goes in `proto`, as in ufw: \
                                 `to any port 22 proto tcp`",
                            ));
                        }
                        let (ports, implied) = parse_ports(port)?;
                        // `port ssh` brings its protocol, as in the short form.
                        words.implied_protocol = words.implied_protocol.or(implied);
                        Some(ports)
                    }
                    None => None,
                };
                let (slot, port_slot) = if word == "from" {
                    (&mut words.source, &mut words.source_ports)
                } else {
                    (&mut words.destination, &mut words.destination_ports)
                };
                if slot.replace(address).is_some() {
                    return Err(refused(word, format!("`{word}` is given twice")));
                }
                *port_slot = ports;
            }
            "port" => {
                return Err(refused(
                    "port",
                    "`port` follows an address: `to any port 22` or `from 10.0.0.0/8 port 53`",
                ))
            }
            "app" => return Err(app_refused()),
            "comment" => {
                words.comment = Some(next(&mut rest, "comment", "the comment text")?.to_owned())
            }
            other if words.short.is_none() => {
                let short = parse_ports(other)?;
                if words.source.is_some() || words.destination.is_some() || words.protocol.is_some()
                {
                    return Err(short_form_conflict(other));
                }
                words.short = Some(short);
            }
            other => return Err(refused(other, "unexpected word after the port")),
        }
    }
    let interfaces = std::mem::take(&mut words.interfaces);
    Ok((into_rules(action, words, route)?, interfaces))
}

/// The word after `after`, which must be `what`.
fn next<'a>(rest: &mut impl Iterator<Item = &'a str>, after: &str, what: &str) -> Result<&'a str> {
    rest.next().ok_or_else(|| missing(after, what))
}

/// `word` (from, to, proto or a port) together with ufw's short form `PORT[/PROTO]`.
fn short_form_conflict(word: &str) -> Error {
    refused(
        word,
        "PORT[/PROTO] is ufw's short form; with from/to/proto write the port as `to any port N`",
    )
}

fn app_refused() -> Error {
    refused(
        "app",
        "ufw application profiles are not supported; give the port, e.g. `to any port 22 proto tcp`",
    )
}

fn parse_protocol(word: &str) -> Result<Protocol> {
    match PROTOCOL_NUMBERS.iter().find(|(name, _)| *name == word) {
        Some(&(_, number)) => Ok(Protocol::Number(number)),
        None => word.parse(),
    }
}

fn parse_address(word: &str) -> Result<Option<IpNet>> {
    if word == "any" {
        return Ok(None);
    }
    crate::parse_net(word)
        .map(Some)
        .map_err(|reason| Error::invalid("address", word, reason))
}

/// `22`, `22/tcp`, `8000:8100/udp`, `80,443/tcp`, `ssh`: the ports and the protocol after
/// the slash (a service name brings its own).
pub fn parse_ports(word: &str) -> Result<(Vec<PortRange>, Option<Protocol>)> {
    let (ports, protocol) = match word.split_once('/') {
        Some((_, "")) => {
            return Err(refused(
                word,
                "give the protocol after the slash, e.g. 22/tcp",
            ))
        }
        Some((ports, protocol)) => (ports, Some(parse_protocol(protocol)?)),
        None => (word, None),
    };
    if let Some(&(_, port)) = SERVICES.iter().find(|(name, _)| *name == ports) {
        return Ok((
            vec![PortRange::single(port)],
            protocol.or(Some(Protocol::Tcp)),
        ));
    }
    if !ports.starts_with(|c: char| c.is_ascii_digit()) {
        return Err(refused(
            word,
            "expected PORT[/PROTO] (22/tcp, 8000:8100/udp, 80,443/tcp) or ssh, http, https; \
             other service names and ufw application profiles are not supported",
        ));
    }
    let list: Vec<PortRange> = ports.split(',').map(str::parse).collect::<Result<_>>()?;
    let counted: usize = list.iter().map(|range| port_count(*range)).sum();
    if counted > MAX_PORT_LIST {
        return Err(refused(
            word,
            format!("at most {MAX_PORT_LIST} ports in a list, a range counting as 2"),
        ));
    }
    Ok((list, protocol))
}

/// What a list entry counts toward ufw's cap.
fn port_count(range: PortRange) -> usize {
    if range.is_single() {
        1
    } else {
        2
    }
}

/// More than one port (a list or a range), which ufw takes only with tcp or udp.
fn several(ports: &Option<Vec<PortRange>>) -> bool {
    ports
        .as_ref()
        .is_some_and(|list| list.iter().map(|range| port_count(*range)).sum::<usize>() > 1)
}

/// The rules the words make; a route rule goes both ways until [`ReadCommand::resolve`] gives it the
/// direction of the interfaces it names.
fn into_rules(action: Action, words: Words, route: bool) -> Result<Vec<Rule>> {
    let direction = if route {
        Direction::Both
    } else {
        Direction::Local
    };
    let (short_ports, short_protocol) = match words.short {
        Some((ports, protocol)) => (Some(ports), protocol),
        None => (None, None),
    };
    let destination_ports = short_ports.or(words.destination_ports);
    let protocol = short_protocol.or(words.protocol).or(words.implied_protocol);
    let has_ports = destination_ports.is_some() || words.source_ports.is_some();
    if protocol.is_none() && (several(&destination_ports) || several(&words.source_ports)) {
        let list = |ports: &Option<Vec<PortRange>>| {
            ports
                .iter()
                .flatten()
                .map(|p| p.to_string())
                .collect::<Vec<_>>()
                .join(",")
        };
        let named = if several(&destination_ports) {
            list(&destination_ports)
        } else {
            list(&words.source_ports)
        };
        return Err(refused(
            &named,
            "Must specify 'tcp' or 'udp' with multiple ports, as in ufw: 8000:8100/tcp or \
             `proto tcp`",
        ));
    }
    // ufw means tcp and udp by a port without a protocol; a Dockwall rule has one protocol.
    let protocols = match protocol {
        None if has_ports => vec![Protocol::Tcp, Protocol::Udp],
        protocol => vec![protocol.unwrap_or_default()],
    };
    let optional = |ports: Option<Vec<PortRange>>| match ports {
        Some(list) => list.into_iter().map(Some).collect(),
        None => vec![None],
    };
    let source_ports: Vec<Option<PortRange>> = optional(words.source_ports);
    let destination_ports: Vec<Option<PortRange>> = optional(destination_ports);
    let mut rules = Vec::new();
    for &protocol in &protocols {
        for &source_port in &source_ports {
            for &destination_port in &destination_ports {
                let rule = Rule {
                    rate: (action == Action::Limit).then_some(UFW_LIMIT),
                    protocol,
                    source: words.source.flatten(),
                    destination: words.destination.flatten(),
                    source_port,
                    destination_port,
                    log: words.log,
                    comment: words.comment.clone(),
                    ..Rule::new(0, action, direction)
                };
                rule.validate_as("the ufw rule")?;
                rules.push(rule);
            }
        }
    }
    Ok(rules)
}

/// Whether two rules filter the same way (ids, names, comments and enabling aside): what
/// `delete <rule>` deletes.
pub fn same_rule(a: &Rule, b: &Rule) -> bool {
    same_traffic(a, b) && (a.action, a.rate, a.log) == (b.action, b.rate, b.log)
}

/// Whether two rules match the same traffic, whatever they do with it: what ufw updates in
/// place (its "Rule updated") when only the action, rate, log or comment differ.
pub fn same_traffic(a: &Rule, b: &Rule) -> bool {
    let traffic = |rule: &Rule| Rule {
        id: 0,
        name: None,
        action: Action::Allow,
        rate: None,
        log: false,
        enabled: true,
        comment: None,
        external_id: None,
        ..rule.clone()
    };
    traffic(a) == traffic(b)
}

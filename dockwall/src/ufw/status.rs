//! Rules shown the way ufw shows them: the `status` table and the words that make a rule.

use ipnet::IpNet;
use serde::Serialize;
use vnf_core::firewall::{Direction, Policy, PortRange, Protocol, Rule, RuleSet};
use vnf_core::side::Side;

use super::grammar::{SideNames, StatusView, UFW_LIMIT};

/// One line of the `status` table.
#[derive(Debug, Serialize)]
pub struct Row<'a> {
    pub number: usize,
    pub to: String,
    pub action: String,
    pub from: String,
    /// The ufw command that adds this rule.
    pub ufw: String,
    pub rule: &'a Rule,
}

/// ufw's word for a default policy.
pub fn policy_word(policy: Policy) -> &'static str {
    match policy {
        Policy::Accept => "allow",
        Policy::Drop => "deny",
    }
}

/// ufw's one routed default, or each direction's when they differ (an FWaaS import or
/// `dockwall default --direction` can set them apart).
pub fn routed_word(set: &RuleSet) -> String {
    let (left, right) = (
        set.policy_for(Direction::LeftToRight),
        set.policy_for(Direction::RightToLeft),
    );
    if left == right {
        policy_word(left).to_owned()
    } else {
        format!(
            "{} left-to-right, {} right-to-left",
            policy_word(left),
            policy_word(right)
        )
    }
}

/// `text` in single quotes for a shell, a quote in it as `'\''`.
fn quoted(text: &str) -> String {
    format!("'{}'", text.replace('\'', r"'\''"))
}

/// `(in, out)` sides of a route rule, by its direction.
fn route_sides(direction: Direction) -> Option<(Side, Side)> {
    match direction {
        Direction::LeftToRight => Some((Side::Left, Side::Right)),
        Direction::RightToLeft => Some((Side::Right, Side::Left)),
        Direction::Both | Direction::Local => None,
    }
}

/// An address as ufw writes it: a host without its /32 or /128.
fn address(net: IpNet) -> String {
    if net.prefix_len() == net.max_prefix_len() {
        net.addr().to_string()
    } else {
        net.to_string()
    }
}

/// ufw's address column: the address (`Anywhere`), the port with its protocol, the interface.
fn endpoint(
    net: Option<IpNet>,
    port: Option<PortRange>,
    protocol: Protocol,
    interface: Option<&str>,
) -> String {
    let address = net.map_or("Anywhere".to_owned(), address);
    let mut text = match port {
        Some(port) if net.is_none() => format!("{port}/{protocol}"),
        Some(port) => format!("{address} {port}/{protocol}"),
        None if protocol != Protocol::Any => format!("{address}/{protocol}"),
        None => address,
    };
    if let Some(interface) = interface {
        text += &format!(" on {interface}");
    }
    text
}

pub fn row<'a>(rule: &'a Rule, number: usize, sides: &SideNames, view: StatusView) -> Row<'a> {
    let interfaces =
        route_sides(rule.direction).map(|(i, o)| (sides.interface(i), sides.interface(o)));
    let mut action = rule.action.as_str().to_ascii_uppercase();
    if rule.direction != Direction::Local {
        action += " FWD";
    } else if view != StatusView::Plain {
        action += " IN";
    }
    if rule.log {
        action += " (log)";
    }
    // The protocol shows with each port, and on the destination when there is none.
    let protocol_on = |has: bool| if has { rule.protocol } else { Protocol::Any };
    let mut from = endpoint(
        rule.source,
        rule.source_port,
        protocol_on(rule.source_port.is_some()),
        interfaces.map(|(i, _)| i),
    );
    // What ufw has no column for, after the source as ufw puts its comment.
    if let Some(rate) = rule.rate.filter(|&rate| rate != UFW_LIMIT) {
        from += &format!(" (rate {})", String::from(rate));
    }
    if !rule.enabled {
        from += " (disabled)";
    }
    if let Some(comment) = &rule.comment {
        from += &format!("  # {comment}");
    }
    Row {
        number,
        to: endpoint(
            rule.destination,
            rule.destination_port,
            protocol_on(rule.destination_port.is_some() || rule.source_port.is_none()),
            interfaces.map(|(_, o)| o),
        ),
        action,
        from,
        ufw: words(rule, sides),
        rule,
    }
}

/// The table ufw's `status [numbered|verbose]` prints.
pub fn render(active: bool, routed: &str, rows: &[Row<'_>], view: StatusView) -> String {
    let mut text = if active {
        "Status: active\n".to_owned()
    } else {
        "Status: inactive (no `dockwall run` in this network namespace; the rules below apply \
         when it starts)\n"
            .to_owned()
    };
    if view == StatusView::Verbose {
        text += &format!("Default: allow (incoming), allow (outgoing), {routed} (routed)\n");
    }
    if rows.is_empty() {
        return text;
    }
    let indent = if view == StatusView::Numbered {
        "     "
    } else {
        ""
    };
    text += &format!("\n{indent}{:<26} {:<11} From\n", "To", "Action");
    text += &format!("{indent}{:<26} {:<11} ----\n", "--", "------");
    for row in rows {
        if view == StatusView::Numbered {
            text += &format!("[{:>2}] ", row.number);
        }
        text += &format!("{:<26} {:<11} {}\n", row.to, row.action, row.from);
    }
    text
}

/// The ufw command line that makes `rule` (for rules made otherwise, the closest ufw words;
/// a rate other than ufw's limit has none).
pub fn words(rule: &Rule, sides: &SideNames) -> String {
    let mut words: Vec<String> = Vec::new();
    if rule.direction != Direction::Local {
        words.push("route".into());
    }
    words.push(rule.action.as_str().into());
    if let Some((inbound, outbound)) = route_sides(rule.direction) {
        words.push(format!("in on {}", sides.interface(inbound)));
        words.push(format!("out on {}", sides.interface(outbound)));
    }
    if rule.log {
        words.push("log".into());
    }
    let short_form = rule.direction == Direction::Local
        && rule.source.is_none()
        && rule.destination.is_none()
        && rule.source_port.is_none()
        && rule.destination_port.is_some()
        && rule.protocol != Protocol::Any;
    if let (true, Some(port)) = (short_form, rule.destination_port) {
        words.push(format!("{port}/{}", rule.protocol));
    } else {
        if rule.protocol != Protocol::Any {
            words.push(format!("proto {}", rule.protocol));
        }
        let any = |net: Option<IpNet>| net.map_or("any".to_owned(), address);
        if rule.source.is_some() || rule.source_port.is_some() {
            words.push(format!("from {}", any(rule.source)));
            if let Some(port) = rule.source_port {
                words.push(format!("port {port}"));
            }
        }
        if rule.destination.is_some() || rule.destination_port.is_some() {
            words.push(format!("to {}", any(rule.destination)));
            if let Some(port) = rule.destination_port {
                words.push(format!("port {port}"));
            }
        }
    }
    if let Some(comment) = &rule.comment {
        words.push(format!("comment {}", quoted(comment)));
    }
    words.join(" ")
}

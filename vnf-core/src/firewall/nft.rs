//! Talking to nftables: one `nft -j -f -` transaction per change, so a change applies whole
//! or not at all. A change that only adds or removes set elements or rewrites a few chains
//! is sent as that difference (still one transaction); anything else replaces the table.
//! A marker chain named after a fingerprint of what was applied tells whether the kernel
//! still holds the previous compile, so the difference is only used when it is valid.

use std::collections::{BTreeMap, HashMap};
use std::io::Write;
use std::process::{Command, Stdio};

use nftables::expr::{Expression, NamedExpression};
use nftables::schema::{
    Chain, Element, FlushObject, NfCmd, NfListObject, NfObject, Rule as NftRule, Set, Table,
};
use nftables::stmt::{AnonymousCounter, Counter, Statement};
use nftables::types::NfFamily;
use serde::de::IgnoredAny;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use tracing::debug;

use super::compile::{Compiled, TABLE};
use super::mirror::MIRROR_TABLE;
use crate::error::{Error, Result};

pub(super) const MARKER_PREFIX: &str = "applied_";

/// The empty chain whose name says which compile the table was applied from.
pub fn marker_chain_name(fingerprint: &str) -> String {
    format!("{MARKER_PREFIX}{fingerprint}")
}

/// How a change reached the kernel.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ApplyKind {
    Unchanged,
    Incremental,
    /// The difference went to the kernel over nfnetlink, without `nft` (see `netlink`).
    Netlink,
    Full,
}

/// Packet and byte counts per rule comment ("rule 7", "nat 3").
pub type Counters = BTreeMap<String, (u64, u64)>;

/// The packets and bytes counted under `comment`; zero when the kernel has none (yet).
pub fn counted(counters: &Counters, comment: &str) -> (u64, u64) {
    counters.get(comment).copied().unwrap_or_default()
}

fn table() -> Table<'static> {
    Table {
        family: NfFamily::INet,
        name: TABLE.into(),
        handle: None,
    }
}

/// Every table Dockwall owns: the firewall and the mirrors (see `mirror` for why two).
fn tables() -> [Table<'static>; 2] {
    [
        table(),
        Table {
            family: NfFamily::IP,
            name: MIRROR_TABLE.into(),
            handle: None,
        },
    ]
}

/// How the nft command line names a family.
fn family_word(family: NfFamily) -> &'static str {
    match family {
        NfFamily::IP => "ip",
        NfFamily::IP6 => "ip6",
        NfFamily::ARP => "arp",
        NfFamily::Bridge => "bridge",
        NfFamily::NetDev => "netdev",
        NfFamily::INet => "inet",
    }
}

pub(super) fn plain_chain(name: &str) -> Chain<'static> {
    Chain {
        family: NfFamily::INet,
        table: TABLE.into(),
        name: name.to_string().into(),
        ..Chain::default()
    }
}

fn add(object: NfListObject<'static>) -> NfObject<'static> {
    NfObject::CmdObject(NfCmd::Add(object))
}

/// The transaction that replaces the whole tables: create each if missing, delete it, build it.
pub fn full_batch(compiled: &Compiled) -> Vec<NfObject<'static>> {
    let mut batch = drop_tables();
    batch.extend(tables().map(|table| add(NfListObject::Table(table))));
    batch.extend(
        compiled
            .sets
            .values()
            .map(|set| add(NfListObject::Set(Box::new(set.clone())))),
    );
    batch.extend(
        compiled
            .chains
            .iter()
            .map(|c| add(NfListObject::Chain(c.chain.clone()))),
    );
    for chain in &compiled.chains {
        batch.extend(
            chain
                .rules
                .iter()
                .map(|r| add(NfListObject::Rule(r.clone()))),
        );
    }
    batch.push(add(NfListObject::Chain(plain_chain(&marker_chain_name(
        &compiled.fingerprint,
    )))));
    batch
}

fn element_value(element: &Expression<'static>) -> Expression<'static> {
    match element {
        Expression::Named(NamedExpression::Elem(elem)) => (*elem.val).clone(),
        other => other.clone(),
    }
}

/// The elements only in `before` and only in `after`. An edit usually inserts or removes a
/// few elements and keeps the order of the rest: a linear walk finds that; anything else is
/// matched by the rule comment every element carries.
fn element_difference<'a>(
    before: &'a [Expression<'static>],
    after: &'a [Expression<'static>],
) -> (Vec<&'a Expression<'static>>, Vec<Expression<'static>>) {
    if let Some(added) = inserted(before, after) {
        return (Vec::new(), added.into_iter().cloned().collect());
    }
    if let Some(removed) = inserted(after, before) {
        return (removed, Vec::new());
    }
    let by_comment =
        |list: &'a [Expression<'static>]| -> HashMap<&'a str, &'a Expression<'static>> {
            list.iter().map(|e| (element_comment(e), e)).collect()
        };
    let (before_map, after_map) = (by_comment(before), by_comment(after));
    let removed = before
        .iter()
        .filter(|e| after_map.get(element_comment(e)) != Some(e))
        .collect();
    let added = after
        .iter()
        .filter(|e| before_map.get(element_comment(e)) != Some(e))
        .cloned()
        .collect();
    (removed, added)
}

/// When `longer` is `shorter` with elements inserted (order kept), those elements.
fn inserted<'a>(
    shorter: &[Expression<'static>],
    longer: &'a [Expression<'static>],
) -> Option<Vec<&'a Expression<'static>>> {
    let mut extra = Vec::new();
    let mut remaining = shorter.iter().peekable();
    for element in longer {
        if remaining.peek() == Some(&element) {
            remaining.next();
        } else {
            extra.push(element);
        }
    }
    remaining.peek().is_none().then_some(extra)
}

fn element_comment<'a>(element: &'a Expression<'static>) -> &'a str {
    match element {
        Expression::Named(NamedExpression::Elem(elem)) => {
            elem.comment.as_deref().unwrap_or_default()
        }
        _ => "",
    }
}

fn elements<'a>(set: &'a Set<'static>) -> &'a [Expression<'static>] {
    set.elem.as_deref().unwrap_or_default()
}

fn element_batch(set: &Set<'static>, elements: Vec<Expression<'static>>) -> Element<'static> {
    Element {
        family: NfFamily::INet,
        table: TABLE.into(),
        name: set.name.clone(),
        elem: elements.into(),
    }
}

/// Counter values of a chain's rules, keyed by comment and occurrence (a limit rule is two
/// nft rules with one comment).
pub type ChainCounters = HashMap<(String, usize), (usize, usize)>;

/// Re-adds a flushed chain's rules with the counts they had, so an edit elsewhere in the
/// chain does not zero them.
fn with_counters(rules: &[NftRule<'static>], counts: &ChainCounters) -> Vec<NftRule<'static>> {
    let mut seen: HashMap<String, usize> = HashMap::new();
    rules
        .iter()
        .map(|rule| {
            let Some(comment) = rule.comment.as_deref() else {
                return rule.clone();
            };
            let occurrence = seen.entry(comment.to_string()).or_default();
            let key = (comment.to_string(), *occurrence);
            *occurrence += 1;
            let Some(&(packets, bytes)) = counts.get(&key) else {
                return rule.clone();
            };
            let expr = rule
                .expr
                .iter()
                .map(|statement| match statement {
                    Statement::Counter(Counter::Anonymous(_)) => {
                        Statement::Counter(Counter::Anonymous(Some(AnonymousCounter {
                            packets: Some(packets),
                            bytes: Some(bytes),
                        })))
                    }
                    other => other.clone(),
                })
                .collect::<Vec<_>>();
            NftRule {
                expr: expr.into(),
                ..rule.clone()
            }
        })
        .collect()
}

/// The transaction that turns `old` into `new` in place, or None when the shape changed
/// too much (chain headers, set types) and the table must be replaced. `counts` reads the
/// counters of a chain about to be rewritten.
pub fn incremental_batch<'a>(
    old: &'a Compiled,
    new: &'a Compiled,
    counts: &dyn Fn(&Chain<'static>) -> Result<ChainCounters>,
) -> Result<Option<Vec<NfObject<'static>>>> {
    let headers = |c: &Compiled| c.chains.iter().map(|c| c.chain.clone()).collect::<Vec<_>>();
    if headers(old) != headers(new) {
        return Ok(None);
    }
    // First: fails the whole transaction unless the kernel holds the old compile.
    let mut batch = vec![NfObject::CmdObject(NfCmd::Delete(NfListObject::Chain(
        plain_chain(&marker_chain_name(&old.fingerprint)),
    )))];
    for (name, set) in &new.sets {
        match old.sets.get(name) {
            None => batch.push(add(NfListObject::Set(Box::new(set.clone())))),
            Some(previous) => {
                // The compiler sets only these; elements are compared below.
                let same_header = previous.set_type == set.set_type && previous.flags == set.flags;
                if !same_header {
                    return Ok(None);
                }
                let (removed, added) = element_difference(elements(previous), elements(set));
                let removed: Vec<_> = removed.into_iter().map(element_value).collect();
                if !removed.is_empty() {
                    batch.push(NfObject::CmdObject(NfCmd::Delete(NfListObject::Element(
                        element_batch(set, removed),
                    ))));
                }
                if !added.is_empty() {
                    batch.push(add(NfListObject::Element(element_batch(set, added))));
                }
            }
        }
    }
    for (chain_old, chain_new) in old.chains.iter().zip(&new.chains) {
        if chain_old.rules == chain_new.rules {
            continue;
        }
        // Rules only appended (what `rule add` does): add them, and the chain's counters
        // need not be read (nft loads every set element to list a chain).
        if let Some(appended) = chain_new.rules.strip_prefix(chain_old.rules.as_slice()) {
            batch.extend(appended.iter().map(|r| add(NfListObject::Rule(r.clone()))));
        } else {
            let counts = counts(&chain_new.chain)?;
            batch.push(NfObject::CmdObject(NfCmd::Flush(FlushObject::Chain(
                chain_new.chain.clone(),
            ))));
            batch.extend(
                with_counters(&chain_new.rules, &counts)
                    .into_iter()
                    .map(|r| add(NfListObject::Rule(r))),
            );
        }
    }
    for (name, set) in &old.sets {
        if !new.sets.contains_key(name) {
            // Naming the set is enough; its elements need not travel (nor be copied).
            batch.push(NfObject::CmdObject(NfCmd::Delete(NfListObject::Set(
                Box::new(Set {
                    family: NfFamily::INet,
                    table: TABLE.into(),
                    name: set.name.clone(),
                    set_type: set.set_type.clone(),
                    ..Set::default()
                }),
            ))));
        }
    }
    batch.push(add(NfListObject::Chain(plain_chain(&marker_chain_name(
        &new.fingerprint,
    )))));
    Ok(Some(batch))
}

/// The batch as nft JSON. Sets get a `counter` statement, so every element counts its own
/// packets (the crate does not model set statements).
pub fn render(batch: Vec<NfObject<'static>>) -> Result<String> {
    /// `{"add": {"set": {…, "stmt": [{"counter": null}]}}}`: every element counts its packets.
    #[derive(Serialize)]
    struct AddCountingSet<'a> {
        add: SetObject<'a>,
    }
    #[derive(Serialize)]
    struct SetObject<'a> {
        set: CountingSet<'a>,
    }
    #[derive(Serialize)]
    struct CountingSet<'a> {
        #[serde(flatten)]
        set: &'a Set<'static>,
        stmt: [CounterStatement; 1],
    }
    #[derive(Serialize)]
    struct CounterStatement {
        counter: (),
    }
    // Written object by object, without a serde_json::Value tree: for a big batch that tree
    // costs more than nft itself.
    let mut text = String::from(r#"{"nftables":["#);
    for (index, object) in batch.iter().enumerate() {
        if index > 0 {
            text.push(',');
        }
        let rendered = match object {
            NfObject::CmdObject(NfCmd::Add(NfListObject::Set(set))) => {
                serde_json::to_string(&AddCountingSet {
                    add: SetObject {
                        set: CountingSet {
                            set,
                            stmt: [CounterStatement { counter: () }],
                        },
                    },
                })
            }
            other => serde_json::to_string(other),
        };
        text.push_str(&rendered.map_err(json_error)?);
    }
    text.push_str("]}");
    Ok(text)
}

fn json_error(error: serde_json::Error) -> Error {
    Error::Io {
        context: "render nftables JSON".into(),
        source: error.into(),
    }
}

/// Runs `nft ARGS`, with `stdin` piped in when given; its stdout, or its stderr as the error.
pub fn nft(args: &[&str], stdin: Option<&str>) -> Result<String> {
    let mut child = Command::new("nft")
        .args(args)
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|source| Error::Io {
            context: "run nft (install the nftables package)".into(),
            source,
        })?;
    if let (Some(input), Some(mut pipe)) = (stdin, child.stdin.take()) {
        pipe.write_all(input.as_bytes())
            .map_err(|source| Error::Io {
                context: "send the ruleset to nft".into(),
                source,
            })?;
    }
    let output = child.wait_with_output().map_err(|source| Error::Io {
        context: "wait for nft".into(),
        source,
    })?;
    if !output.status.success() {
        return Err(Error::Nft(format!(
            "nft {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&output.stderr).trim()
        )));
    }
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

/// The fingerprint of what the kernel holds, from the marker chain (cheap: chain headers only).
pub fn kernel_fingerprint() -> Result<Option<String>> {
    let listing = nft(&["-j", "list", "chains", "inet"], None)?;
    let value: Value = serde_json::from_str(&listing).map_err(json_error)?;
    Ok(value["nftables"]
        .as_array()
        .into_iter()
        .flatten()
        .find_map(|object| {
            let chain = object.get("chain")?;
            (chain["table"] == TABLE)
                .then(|| {
                    chain["name"]
                        .as_str()?
                        .strip_prefix(MARKER_PREFIX)
                        .map(str::to_string)
                })
                .flatten()
        }))
}

/// Applies `new`, as a difference from `old` when the kernel provably holds `old`.
pub fn apply(old: Option<&Compiled>, new: &Compiled) -> Result<ApplyKind> {
    match old {
        // An edit: the difference goes out with the old marker's deletion as its first step,
        // so it applies only if the kernel holds exactly the old compile (the transaction
        // fails whole otherwise), without a separate listing.
        Some(old) if old.fingerprint == new.fingerprint => Ok(ApplyKind::Unchanged),
        Some(old) => {
            let started = std::time::Instant::now();
            // A chain whose counters cannot be read (a table deleted by hand) means the
            // kernel does not hold `old`: replace, as when the difference fails.
            match incremental_batch(old, new, &chain_counters) {
                Ok(Some(batch)) => {
                    if let Some(message) = super::netlink::encode(&batch, new) {
                        match super::netlink::send(&message) {
                            Ok(()) => {
                                debug!(
                                    elapsed_ms = started.elapsed().as_millis() as u64,
                                    "difference applied over nfnetlink"
                                );
                                return Ok(ApplyKind::Netlink);
                            }
                            Err(error) => {
                                debug!(%error, "nfnetlink refused the difference; trying nft")
                            }
                        }
                    }
                    let text = render(batch)?;
                    debug!(
                        elapsed_ms = started.elapsed().as_millis() as u64,
                        bytes = text.len(),
                        "difference rendered"
                    );
                    match nft(&["-j", "-f", "-"], Some(&text)) {
                        Ok(_) => return Ok(ApplyKind::Incremental),
                        Err(error) => {
                            debug!(%error, "difference not applicable; replacing the tables")
                        }
                    }
                }
                Ok(None) => {}
                Err(error) => debug!(%error, "counters unreadable; replacing the tables"),
            }
            replace(new)
        }
        // A (re)start or a side change: keep the table when it already holds this compile, so
        // its counters survive; by content, not by the marker's name (a flushed table keeps
        // its marker). Without this compile's marker it differs for sure: no listing (seconds
        // at 100,000 rules) on the way to forwarding.
        None if kernel_fingerprint()?.as_ref() != Some(&new.fingerprint) => replace(new),
        None => {
            let differences = super::verify::kernel_differences(new)?;
            if differences.is_empty() {
                return Ok(ApplyKind::Unchanged);
            }
            debug!(
                ?differences,
                "the kernel differs from the compile; replacing the table"
            );
            replace(new)
        }
    }
}

/// Replaces the whole table with `new` in one transaction.
pub fn replace(new: &Compiled) -> Result<ApplyKind> {
    nft(&["-j", "-f", "-"], Some(&render(full_batch(new))?))?;
    Ok(ApplyKind::Full)
}

/// The counters of one of our chains. `-t` (terse) leaves the named sets' elements out of
/// the output; nft 1.0.6 still loads them into its cache first, which is most of an edit's
/// time at 100,000 rules (see BENCHMARKS.md).
fn chain_counters(chain: &Chain<'static>) -> Result<ChainCounters> {
    let listing = nft(
        &[
            "-j",
            "-t",
            "list",
            "chain",
            family_word(chain.family),
            &chain.table,
            &chain.name,
        ],
        None,
    )?;
    let value: Value = serde_json::from_str(&listing).map_err(json_error)?;
    let mut counts = ChainCounters::new();
    let mut seen: HashMap<String, usize> = HashMap::new();
    for object in value["nftables"].as_array().into_iter().flatten() {
        let Some(rule) = object.get("rule") else {
            continue;
        };
        let (Some(comment), Some(counter)) = (
            rule["comment"].as_str(),
            rule["expr"]
                .as_array()
                .into_iter()
                .flatten()
                .find_map(|s| s.get("counter")),
        ) else {
            continue;
        };
        let occurrence = seen.entry(comment.to_string()).or_default();
        let as_count = |v: &Value| {
            v.as_u64()
                .and_then(|n| usize::try_from(n).ok())
                .unwrap_or(0)
        };
        counts.insert(
            (comment.to_string(), *occurrence),
            (as_count(&counter["packets"]), as_count(&counter["bytes"])),
        );
        *occurrence += 1;
    }
    Ok(counts)
}

/// Removes our tables, if present.
pub fn delete_table() -> Result<()> {
    nft(&["-j", "-f", "-"], Some(&render(drop_tables())?)).map(drop)
}

/// Our tables' removal, whether or not they exist (an add first makes the delete valid).
fn drop_tables() -> Vec<NfObject<'static>> {
    tables()
        .into_iter()
        .flat_map(|table| {
            [
                add(NfListObject::Table(table.clone())),
                NfObject::CmdObject(NfCmd::Delete(NfListObject::Table(table))),
            ]
        })
        .collect()
}

/// Per-rule, per-NAT-rule and per-direction-default counters, read from our table only (the
/// crate cannot parse every construct other tables may hold, and we never look at them).
pub fn rule_counters() -> Result<Counters> {
    counters_in(list_table()?.as_deref())
}

/// Per-mirror counters, from the mirrors' table only (small: the firewall table is not read).
pub fn mirror_counters() -> Result<Counters> {
    counters_in(list_mirror_table()?.as_deref())
}

/// `nft -j list table inet dockwall`, or None when the table is absent.
pub fn list_table() -> Result<Option<String>> {
    list(&table())
}

/// `nft -j list table ip dockwall_mirror`, or None when the table is absent.
pub fn list_mirror_table() -> Result<Option<String>> {
    let [_, mirror] = tables();
    list(&mirror)
}

/// `nft -j list table FAMILY NAME`, or None when the table is absent.
pub(crate) fn list(table: &Table<'static>) -> Result<Option<String>> {
    let family = family_word(table.family);
    match nft(&["-j", "list", "table", family, &table.name], None) {
        Ok(listing) => Ok(Some(listing)),
        Err(Error::Nft(message)) if message.contains("No such file") => Ok(None),
        Err(error) => Err(error),
    }
}

/// Per-rule counters in a listing from [`list_table`] (none without the table). Read into
/// just comments and counts, never a JSON tree of the whole table (at 100,000 rules that tree
/// took hundreds of MB).
pub fn counters_in(listing: Option<&str>) -> Result<Counters> {
    #[derive(Deserialize)]
    struct Listing {
        nftables: Vec<Listed>,
    }
    #[derive(Deserialize)]
    struct Listed {
        rule: Option<CountedRule>,
        set: Option<CountedSet>,
    }
    #[derive(Deserialize)]
    struct CountedRule {
        comment: Option<String>,
        #[serde(default)]
        expr: Vec<Statement>,
    }
    #[derive(Deserialize)]
    struct Statement {
        counter: Option<Count>,
    }
    #[derive(Deserialize)]
    struct CountedSet {
        #[serde(default)]
        elem: Vec<Element>,
    }
    /// A set element with a comment and counter, or a bare value (no counter to read).
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Element {
        Counted { elem: CountedElement },
        Bare(IgnoredAny),
    }
    #[derive(Deserialize)]
    struct CountedElement {
        comment: Option<String>,
        counter: Option<Count>,
    }
    #[derive(Deserialize, Default, Clone, Copy)]
    struct Count {
        #[serde(default)]
        packets: u64,
        #[serde(default)]
        bytes: u64,
    }

    let Some(listing) = listing else {
        return Ok(Counters::new());
    };
    let listing: Listing = serde_json::from_str(listing).map_err(json_error)?;
    let mut counters = Counters::new();
    let mut add_up = |comment: Option<String>, count: Option<Count>| {
        if let (Some(comment), Some(count)) = (comment, count) {
            let entry = counters.entry(comment).or_default();
            entry.0 += count.packets;
            entry.1 += count.bytes;
        }
    };
    for object in listing.nftables {
        if let Some(rule) = object.rule {
            add_up(rule.comment, rule.expr.iter().find_map(|s| s.counter));
        }
        for element in object.set.into_iter().flat_map(|set| set.elem) {
            if let Element::Counted { elem } = element {
                add_up(elem.comment, elem.counter);
            }
        }
    }
    Ok(counters)
}

//! Whether the kernel's table holds what a compile says, by content rather than by the
//! marker chain's name alone: `nft flush table` keeps chains (the marker too) and sets but
//! empties them, and a rule or set element deleted by hand leaves the marker in place.
//!
//! One `nft -j list table` is read as a stream that keeps only names and counts (rules per
//! chain, elements per set, which chains and sets exist), never the listed rules or elements
//! themselves, so the check stays small at 100,000 rules. Counts catch a flush, a deletion and
//! an addition; a rule replaced by hand with a different one of the same count is not caught.

use std::collections::BTreeMap;

use serde::de::IgnoredAny;
use serde::Deserialize;

use super::compile::{Compiled, TABLE};
use super::mirror::MIRROR_TABLE;
use super::mode::BRIDGE_CHAIN;
use super::nft::{counters_in, list_mirror_table, list_table, marker_chain_name, Counters};
use crate::error::{Error, Result};

/// Dockwall's tables as nft lists them, read once for both the check and the counters (at
/// 100,000 rules a listing costs about as much as the rest of `status`).
#[derive(Debug, Default)]
pub struct Listings {
    /// `table inet dockwall`; None when absent.
    pub firewall: Option<String>,
    /// `table ip dockwall_mirror`; None when absent.
    pub mirror: Option<String>,
}

impl Listings {
    pub fn read() -> Result<Self> {
        Ok(Listings {
            firewall: list_table()?,
            mirror: list_mirror_table()?,
        })
    }

    /// Per-rule and per-mirror counters.
    pub fn counters(&self) -> Result<Counters> {
        let mut counters = counters_in(self.firewall.as_deref())?;
        counters.extend(counters_in(self.mirror.as_deref())?);
        Ok(counters)
    }
}

/// What the kernel's table holds, reduced to names and counts.
#[derive(Debug, Default, PartialEq, Eq)]
struct Shape {
    /// Rules per chain, every chain of the table (the marker too).
    chains: BTreeMap<String, usize>,
    /// Elements per set.
    sets: BTreeMap<String, usize>,
}

#[derive(Deserialize)]
struct Listing {
    nftables: Vec<Listed>,
}

/// One object of the listing; everything but the names and counts is skipped unread.
#[derive(Deserialize)]
struct Listed {
    chain: Option<Named>,
    set: Option<ListedSet>,
    rule: Option<ListedRule>,
}

#[derive(Deserialize)]
struct Named {
    name: String,
}

#[derive(Deserialize)]
struct ListedSet {
    name: String,
    /// Only counted: `IgnoredAny` is zero-sized, so the elements are never kept.
    #[serde(default)]
    elem: Vec<IgnoredAny>,
}

#[derive(Deserialize)]
struct ListedRule {
    chain: String,
}

fn parse(listing: &str) -> Result<Shape> {
    let listing: Listing = serde_json::from_str(listing).map_err(|error| {
        Error::Nft(format!(
            "cannot read an `nft -j list table` of Dockwall's: {error}"
        ))
    })?;
    let mut shape = Shape::default();
    for object in listing.nftables {
        if let Some(chain) = object.chain {
            shape.chains.entry(chain.name).or_default();
        }
        if let Some(set) = object.set {
            shape.sets.insert(set.name, set.elem.len());
        }
        if let Some(rule) = object.rule {
            *shape.chains.entry(rule.chain).or_default() += 1;
        }
    }
    Ok(shape)
}

/// The chains a compile puts into `table`, with their rule counts.
fn expected_chains(compiled: &Compiled, table: &str) -> BTreeMap<String, usize> {
    compiled
        .chains
        .iter()
        .filter(|c| c.chain.table == table)
        .map(|c| (c.chain.name.to_string(), c.rules.len()))
        .collect()
}

/// The shape a compile puts into the kernel's `inet` table.
fn expected(compiled: &Compiled) -> Shape {
    let mut chains = expected_chains(compiled, TABLE);
    chains.insert(marker_chain_name(&compiled.fingerprint), 0);
    let sets = compiled
        .sets
        .values()
        .map(|set| {
            let elements = set.elem.as_deref().map_or(0, <[_]>::len);
            (set.name.to_string(), elements)
        })
        .collect();
    Shape { chains, sets }
}

/// How `held` differs from `wanted`, one line per chain or set, in words.
fn differences(held: &Shape, wanted: &Shape) -> Vec<String> {
    let mut found = Vec::new();
    let mut compare = |kind: &str,
                       items: &str,
                       held: &BTreeMap<String, usize>,
                       wanted: &BTreeMap<String, usize>| {
        for (name, &count) in wanted {
            match held.get(name) {
                None if name.starts_with(super::nft::MARKER_PREFIX) => found.push(format!(
                    "{kind} {name} is missing: the table was not applied from these rules"
                )),
                None => found.push(format!("{kind} {name} is missing")),
                Some(&held) if held != count => found.push(format!(
                    "{kind} {name} holds {held} {items}, the stored rules compile to {count}"
                )),
                Some(_) => {}
            }
        }
        for name in held.keys().filter(|name| !wanted.contains_key(*name)) {
            found.push(format!(
                "{kind} {name} is not in the compile of the stored rules"
            ));
        }
    };
    compare("chain", "rules", &held.chains, &wanted.chains);
    compare("set", "elements", &held.sets, &wanted.sets);
    found
}

/// How the kernel's table differs from `compiled`, one sentence per difference; empty when
/// it holds exactly the compile's chains, sets, rule counts and element counts.
pub fn kernel_differences(compiled: &Compiled) -> Result<Vec<String>> {
    differences_in(&Listings::read()?, compiled)
}

/// The same, in listings read before.
pub fn differences_in(listings: &Listings, compiled: &Compiled) -> Result<Vec<String>> {
    let mut found = match &listings.firewall {
        None => vec![format!("table inet {TABLE} is missing")],
        Some(listing) => differences(&parse(listing)?, &expected(compiled)),
    };
    let wanted = Shape {
        chains: expected_chains(compiled, MIRROR_TABLE),
        sets: BTreeMap::new(),
    };
    match &listings.mirror {
        None => found.push(format!("table ip {MIRROR_TABLE} is missing")),
        Some(listing) => found.extend(differences(&parse(listing)?, &wanted)),
    }
    Ok(found)
}

/// How transparent mode's `table bridge dockwall` (listed with `nft -j`; None: absent)
/// differs from what it must hold: its one chain, marking the frames of each of the two legs.
pub fn bridge_differences(listing: Option<&str>) -> Result<Vec<String>> {
    let Some(listing) = listing else {
        return Ok(vec![format!("table bridge {TABLE} is missing")]);
    };
    let wanted = Shape {
        chains: BTreeMap::from([(BRIDGE_CHAIN.to_string(), 2)]),
        sets: BTreeMap::new(),
    };
    Ok(differences(&parse(listing)?, &wanted)
        .into_iter()
        .map(|difference| format!("table bridge {TABLE}: {difference}"))
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    const LISTING: &str = r#"{"nftables": [{"metainfo": {"version": "1.0.6", "json_schema_version": 1}},
        {"table": {"family": "inet", "name": "dockwall", "handle": 1}},
        {"set": {"family": "inet", "name": "s0", "table": "dockwall", "type": "ipv4_addr", "handle": 3,
            "elem": [{"elem": {"val": "10.0.0.1", "counter": {"packets": 0, "bytes": 0}, "comment": "rule 1"}}, "10.0.0.2"]}},
        {"set": {"family": "inet", "name": "empty", "table": "dockwall", "type": "ipv4_addr", "handle": 4}},
        {"chain": {"family": "inet", "table": "dockwall", "name": "from_left", "handle": 5}},
        {"chain": {"family": "inet", "table": "dockwall", "name": "applied_x", "handle": 6}},
        {"rule": {"family": "inet", "table": "dockwall", "chain": "from_left", "handle": 7, "expr": [{"accept": null}]}},
        {"rule": {"family": "inet", "table": "dockwall", "chain": "from_left", "handle": 8, "expr": [{"drop": null}]}}]}"#;

    #[test]
    fn a_listing_becomes_names_and_counts() {
        let shape = parse(LISTING).unwrap();
        assert_eq!(
            shape.chains,
            BTreeMap::from([("applied_x".into(), 0), ("from_left".into(), 2)])
        );
        assert_eq!(
            shape.sets,
            BTreeMap::from([("empty".into(), 0), ("s0".into(), 2)])
        );
    }

    #[test]
    fn each_difference_is_named() {
        let held = parse(LISTING).unwrap();
        assert!(differences(&held, &parse(LISTING).unwrap()).is_empty());
        let mut wanted = parse(LISTING).unwrap();
        wanted.chains.insert("from_left".into(), 3);
        wanted.sets.remove("empty");
        wanted.chains.remove("applied_x");
        wanted.chains.insert("applied_y".into(), 0);
        assert_eq!(
            differences(&held, &wanted),
            [
                "chain applied_y is missing: the table was not applied from these rules",
                "chain from_left holds 2 rules, the stored rules compile to 3",
                "chain applied_x is not in the compile of the stored rules",
                "set empty is not in the compile of the stored rules",
            ]
        );
    }
}

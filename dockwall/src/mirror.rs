//! `dockwall mirror add|list|delete`: copies of the traffic crossing the SI to a collector
//! (see `vnf_core::firewall::mirror`). Stored and applied like the rules, in one edit.

use std::net::Ipv4Addr;
use std::path::Path;
use std::process::ExitCode;

use clap::Subcommand;
use serde::Serialize;
use vnf_core::cli::{JsonArgs, SideArgs};
use vnf_core::firewall::compile::Sides;
use vnf_core::firewall::mirror::{
    check_collector, mirror_comment, side_reaching, Mirror, MirrorMatch, MirrorSide, Readiness,
};
use vnf_core::firewall::nft;
use vnf_core::firewall::store::Store;
use vnf_core::firewall::{self, RuleSet};
use vnf_core::side::{Assignment, Side};
use vnf_core::{Error, Result};

use crate::commands::{spelled, to_json, Answer, Editor};
use crate::EditArgs;

#[derive(Subcommand, Debug)]
pub enum MirrorCommand {
    /// Copy the IPv4 packets arriving on a side to a collector (nftables `dup`)
    ///
    /// Every matching packet that arrives on --side to be forwarded is copied once, as it
    /// arrived: in prerouting (table `ip dockwall_mirror`, priority raw), before conntrack,
    /// NAT and the filter, so packets the rules then drop are copied too. Packets to the SI
    /// itself (DNAT port-forwards too), broadcasts and multicasts are not copied; `--side
    /// both` copies both directions, each packet once. The kernel lowers a copy's TTL by one
    /// and sets Don't Fragment: a copy larger than the --via leg's MTU is dropped. Not in
    /// transparent mode.
    ///
    /// The copy goes to the collector as next hop, so the collector must be on the --via
    /// side's subnet (an off-link one is refused). Packets from or to the collector are never
    /// copied, so its own traffic is not fed back to it. It must not route (ip_forward=0): one
    /// that does sends the copies on, through the SI again, where they are copied again.
    Add {
        /// Copy the packets arriving on this side (both: from either side)
        #[arg(long, value_enum)]
        side: MirrorSide,
        /// Only these packets: any of `proto P`, `from CIDR`, `to CIDR`, `sport PORTS`,
        /// `dport PORTS`, e.g. --match "proto udp to 192.168.20.0/24 dport 5000" [default:
        /// every IPv4 packet]
        #[arg(long = "match", value_name = "MATCH")]
        matching: Option<MirrorMatch>,
        /// The collector's IPv4 address, on the --via side's subnet
        #[arg(long, value_name = "IPV4")]
        to: Ipv4Addr,
        /// The side the copies leave by [default: the side whose subnet holds --to]
        #[arg(long, value_enum)]
        via: Option<Side>,
        #[command(flatten)]
        edit: EditArgs,
    },
    /// List the mirrors with the packets and bytes copied, and whether each is in the kernel
    List {
        #[command(flatten)]
        output: JsonArgs,
        #[command(flatten)]
        sides: SideArgs,
    },
    /// Delete a mirror by its id (`mirror list` shows it)
    Delete {
        /// The mirror's id
        #[arg(
            required_unless_present = "id",
            conflicts_with = "id",
            value_name = "ID"
        )]
        mirror: Option<u64>,
        /// The mirror's id, as a flag
        #[arg(long = "id", value_name = "ID")]
        id: Option<u64>,
        #[command(flatten)]
        edit: EditArgs,
    },
}

pub async fn run<'a>(
    store: &'a Store,
    state_dir: &Path,
    editor: impl Fn(&EditArgs) -> Editor<'a>,
    command: MirrorCommand,
) -> Result<ExitCode> {
    match command {
        MirrorCommand::Add {
            side,
            matching,
            to,
            via,
            edit,
        } => {
            let matching = matching.unwrap_or_default();
            let editor = editor(&edit);
            let assignment = editor.assignment().await?;
            let via = via_side(to, via, &assignment)?;
            editor.run_described_for(&assignment, |set| {
                let mirror = Mirror {
                    id: set.allocate_id(),
                    side,
                    matching,
                    to,
                    via,
                };
                mirror.validate_as(&format!("the new mirror (id {})", mirror.id))?;
                let message = format!(
                    "mirror {} added: {} arriving on {} copied to {to} via {via}",
                    mirror.id,
                    mirror.matching,
                    spelled(&side)
                );
                set.mirrors.push(mirror);
                Ok(message)
            })
        }
        MirrorCommand::Delete { mirror, id, edit } => {
            let id = id.or(mirror).unwrap_or_default();
            let editor = editor(&edit);
            let outcome = editor
                .edit(|set| {
                    let index = set.mirrors.iter().position(|m| m.id == id).ok_or_else(|| {
                        Error::invalid(
                            "id",
                            id,
                            "no mirror has this id; see `dockwall mirror list`",
                        )
                    })?;
                    set.mirrors.remove(index);
                    Ok(())
                })
                .await?;
            editor.report(&outcome, &format!("mirror {id} deleted"), Answer::Dockwall)
        }
        MirrorCommand::List { output, sides } => {
            let assignment = firewall::current_assignment(&sides.selectors(state_dir)).await?;
            list(store, &assignment, output.json)
        }
    }
}

/// The side the copies leave by: as given, checked against that side's subnet when it is up
/// (when it is not, the mirror applies once it is, if the collector is on-link then); or the
/// side whose subnet holds the collector.
fn via_side(collector: Ipv4Addr, via: Option<Side>, assignment: &Assignment) -> Result<Side> {
    let sides = Sides::from_assignment(assignment);
    match via {
        Some(side) => {
            if let Some(ready) = sides.get(side) {
                check_collector(collector, ready)?;
            }
            Ok(side)
        }
        None => side_reaching(collector, sides).ok_or_else(|| {
            let subnets: Vec<String> = Side::ALL
                .into_iter()
                .filter_map(|side| Some(format!("{side} {}", sides.get(side)?.subnet())))
                .collect();
            Error::invalid(
                "to",
                collector,
                format!(
                    "on no side's subnet ({}): a copy goes to the collector as next hop, \
                     so it must be on-link; put it on a side's or the mgmt leg's \
                     subnet, or give --via for a side that is not up yet",
                    if subnets.is_empty() {
                        "no side is up".to_string()
                    } else {
                        subnets.join(", ")
                    }
                ),
            )
        }),
    }
}

#[derive(Serialize)]
struct ListedMirror<'a> {
    #[serde(flatten)]
    mirror: &'a Mirror,
    /// `copying`, or why the mirror is not in the kernel now.
    state: String,
    packets: u64,
    bytes: u64,
}

/// Whether the mirror compiles for the sides as they are now (see `compile_mirrors`).
fn state(mirror: &Mirror, sides: Sides<'_>) -> String {
    match mirror.readiness(sides) {
        Readiness::Copying { .. } => "copying".to_string(),
        Readiness::WaitingForVia => format!("waiting for the {} side", mirror.via),
        Readiness::WaitingForMirrored => match mirror.side {
            MirrorSide::Both => "waiting for the left or right side".to_string(),
            side => format!("waiting for the {} side", spelled(&side)),
        },
        Readiness::NotCopying(error) => format!("not copying: {error}"),
    }
}

fn list(store: &Store, assignment: &Assignment, json: bool) -> Result<ExitCode> {
    let sides = Sides::from_assignment(assignment);
    let rule_set: RuleSet = store.lock()?.load()?;
    let counters = nft::mirror_counters()?;
    let listed: Vec<ListedMirror> = rule_set
        .mirrors
        .iter()
        .map(|mirror| {
            let (packets, bytes) = nft::counted(&counters, &mirror_comment(mirror.id));
            ListedMirror {
                mirror,
                state: state(mirror, sides),
                packets,
                bytes,
            }
        })
        .collect();
    if json {
        println!("{}", to_json(&listed)?);
    } else {
        for entry in &listed {
            let mirror = entry.mirror;
            let what = format!(
                "{} arriving on {} to {} via {}",
                mirror.matching,
                spelled(&mirror.side),
                mirror.to,
                mirror.via
            );
            println!(
                "id {:<5} {:<70} {:>10} pkts {:>12} bytes  {}",
                mirror.id, what, entry.packets, entry.bytes, entry.state
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}

//! Transparent mode (bump in the wire): the SI owns a Linux bridge enslaving its left and
//! right legs, which carry no IP address; one subnet spans both sides. The firewall filters
//! the bridged traffic: the bridge hands IP packets to the inet hooks (its per-bridge
//! `nf_call_iptables` switch, br_netfilter) where conntrack works, and the `bridge dockwall`
//! table marks each frame with the leg it came in on. Management stays routed.
//!
//! Without addresses the sides are found by selector (name or MAC: a CIDR selector cannot
//! match an unaddressed leg) or by order of appearance; the SI's own bridge never counts as
//! a leg. The legs' IPv4 addresses are taken off while bridged and put back on exit; they
//! are written to the state dir first, so the next start (in any mode) puts them back after
//! a run that could not (kill -9, --on-exit keep).

use std::future::Future;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::Instant;

use futures::{StreamExt, TryStreamExt};
use ipnet::Ipv4Net;
use netlink_packet_route::link::{LinkAttribute, LinkFlags, LinkMessage};
use rtnetlink::{Handle, LinkBridge, LinkUnspec};
use serde::{Deserialize, Serialize};
use tracing::{error, info, warn};

use crate::error::{Error, Result};
use crate::firewall::compile::TABLE;
use crate::firewall::mode::bridge_marks;
use crate::firewall::nft::{self, nft};
use crate::firewall::verify;
use crate::kernel::{is_errno, Kernel};
use crate::runtime::{require_net_admin, sleep_until, OnExit, RuntimeConfig, SidesObserver};
use crate::side::{assign, Assignment, Interface, Side, SideSelector};

/// The bridge the SI creates between its legs.
pub const BRIDGE: &str = "dockwall0";

/// Where br_netfilter's per-namespace switches live; without them the bridge forwards
/// without ever reaching the inet hooks, so nothing would be filtered.
const BR_NETFILTER: &str = "/proc/sys/net/bridge/bridge-nf-call-iptables";

/// The file in the state dir recording the legs before they are bridged.
const LEGS_FILE: &str = "transparent-legs.json";

/// A leg as it was before the SI bridged it, to put back on exit or on the next start.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Leg {
    name: String,
    addresses: Vec<Ipv4Net>,
}

/// Runs transparent mode until `shutdown` completes (Ok) or the legs never appear (Err).
pub async fn run(
    config: RuntimeConfig,
    started: Instant,
    shutdown: impl Future<Output = ()>,
    observer: &mut dyn SidesObserver,
) -> Result<()> {
    validate(&config)?;
    require_net_admin()?;
    let kernel = Kernel::connect()?;
    let handle = kernel.handle();
    tokio::pin!(shutdown);
    info!(
        left = %config.selectors.describe(Side::Left),
        right = %config.selectors.describe(Side::Right),
        bridge = BRIDGE,
        "starting in transparent mode"
    );
    let assignment = tokio::select! {
        found = wait_for_legs(&config, started) => found?,
        () = &mut shutdown => {
            info!("shutdown requested");
            return Ok(());
        }
    };
    let legs: Vec<Leg> = [Side::Left, Side::Right]
        .into_iter()
        .filter_map(|side| assignment.interface(side))
        .map(|interface| Leg {
            name: interface.name.clone(),
            addresses: interface.addresses.clone(),
        })
        .collect();
    let setup = async {
        // The firewall is in place before the bridge forwards anything.
        observer.sides_changed(&assignment)?;
        let (left, right) = leg_names(&assignment)?;
        save_legs(&config.state_dir, &legs)?;
        nft(&["-f", "-"], Some(&replace_bridge_table(&left, &right)))?;
        bridge_legs(handle, &assignment).await?;
        info!(
            elapsed_ms = started.elapsed().as_millis() as u64,
            bridge = BRIDGE,
            %left,
            %right,
            "forwarding ready"
        );
        Ok(())
    }
    .await;
    // A setup that failed half-way is always undone, whatever --on-exit says.
    let on_exit = match &setup {
        Ok(()) => {
            shutdown.await;
            info!("shutdown requested");
            config.on_exit
        }
        Err(error) => {
            error!(%error, "stopping; undoing the setup");
            OnExit::Remove
        }
    };
    // The bridge goes first: without it nothing is forwarded while the firewall goes.
    match on_exit {
        OnExit::Remove => {
            if let Err(error) = restore(handle, &config.state_dir, &legs).await {
                error!(%error, "could not restore the legs");
            }
        }
        OnExit::Keep => info!(
            "bridge left in place (--on-exit keep); the next start puts the legs' addresses back"
        ),
    }
    if let Err(error) = observer.shutdown(on_exit) {
        error!(%error, "shutdown incomplete");
    }
    setup
}

/// Undoes what a transparent run left behind (killed, or --on-exit keep): removes the
/// bridge and the bridge table and gives the recorded legs their addresses back. Every
/// `run` calls it first, whatever its mode, so an in-network run after a transparent one
/// finds its legs addressed.
pub async fn recover(state_dir: &Path) -> Result<()> {
    let legs = load_legs(state_dir)?;
    let kernel = Kernel::connect()?;
    let handle = kernel.handle();
    let stale_bridge = link_index(handle, BRIDGE).await?.is_some();
    let stale_table = nft(&["list", "table", "bridge", TABLE], None).is_ok();
    if legs.is_none() && !stale_bridge && !stale_table {
        return Ok(());
    }
    warn!(
        bridge = BRIDGE,
        legs = ?legs,
        "an earlier transparent run left its bridge or legs behind (killed, or --on-exit keep); undoing it"
    );
    restore(handle, state_dir, legs.as_deref().unwrap_or_default()).await
}

/// What transparent mode cannot do, refused before anything changes (and before `run`
/// records the mode with the rules).
pub fn validate(config: &RuntimeConfig) -> Result<()> {
    config.selectors.validate()?;
    if !Path::new(BR_NETFILTER).exists() {
        return Err(Error::Vnf(format!(
            "transparent mode needs br_netfilter ({BR_NETFILTER} is missing): without it the \
             bridge forwards without filtering; run `modprobe br_netfilter` on the host"
        )));
    }
    if !config.dhcp.sides.is_empty() {
        return Err(Error::invalid(
            "dhcp",
            "set",
            "transparent mode bridges the legs and gives them no address to lease; drop --dhcp / VNF_DHCP",
        ));
    }
    for side in [Side::Left, Side::Right] {
        if let Some(SideSelector::Cidr(net)) = config.selectors.get(side) {
            return Err(Error::invalid(
                if side == Side::Left { "left" } else { "right" },
                format!("cidr:{net}"),
                "in transparent mode the legs carry no address; pin the side by name: or mac:",
            ));
        }
    }
    Ok(())
}

/// Keeps the kernel's errno, so callers can tell EEXIST from a failure.
fn netlink_error(operation: String) -> impl FnOnce(rtnetlink::Error) -> Error {
    move |error| Error::Netlink {
        operation,
        source: match &error {
            rtnetlink::Error::NetlinkError(message) => message.to_io(),
            _ => std::io::Error::other(error.to_string()),
        },
    }
}

fn legs_path(state_dir: &Path) -> PathBuf {
    state_dir.join(LEGS_FILE)
}

/// Records the legs (written whole, then renamed, synced: it must survive a crash) before
/// anything about them changes.
fn save_legs(state_dir: &Path, legs: &[Leg]) -> Result<()> {
    let path = legs_path(state_dir);
    crate::fs::write_json(&path, &legs, true).map_err(|source| Error::Io {
        context: format!("record the legs in {}", path.display()),
        source,
    })
}

fn load_legs(state_dir: &Path) -> Result<Option<Vec<Leg>>> {
    let path = legs_path(state_dir);
    let text = match std::fs::read_to_string(&path) {
        Ok(text) => text,
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(source) => {
            return Err(Error::Io {
                context: format!("read the recorded legs {}", path.display()),
                source,
            })
        }
    };
    serde_json::from_str(&text).map(Some).map_err(|error| {
        Error::Vnf(format!(
            "{} is unreadable ({error}); give the legs their addresses back by hand and delete it",
            path.display()
        ))
    })
}

/// The namespace's interfaces without the SI's own bridge, which is no leg.
async fn legs_and_others(kernel: &Kernel) -> Result<Vec<Interface>> {
    let mut interfaces = kernel.interfaces().await?;
    interfaces.retain(|i| i.name != BRIDGE);
    Ok(interfaces)
}

/// Waits (on link events, bounded by the side timeout) until both legs are present.
async fn wait_for_legs(config: &RuntimeConfig, started: Instant) -> Result<Assignment> {
    let mut events = Kernel::watch()?;
    let kernel = Kernel::connect()?;
    let give_up_at = config
        .side_timeout
        .map(|timeout| tokio::time::Instant::from_std(started + timeout));
    loop {
        let interfaces = legs_and_others(&kernel).await?;
        let assignment = assign(&config.selectors, &interfaces)?;
        if assignment.interface(Side::Left).is_some() && assignment.interface(Side::Right).is_some()
        {
            return Ok(assignment);
        }
        tokio::select! {
            event = events.next() => {
                if event.is_none() {
                    return Err(Error::Vnf("the link event socket closed".into()));
                }
                while events.try_recv().is_ok() {}
            }
            () = sleep_until(give_up_at) => {
                let missing: Vec<String> = [Side::Left, Side::Right]
                    .into_iter()
                    .filter(|&side| assignment.interface(side).is_none())
                    .map(|side| format!("{side}: {}", assignment.waiting_reason(side, &config.selectors)))
                    .collect();
                return Err(Error::Vnf(format!(
                    "transparent mode needs two legs; after {} s still missing {}",
                    started.elapsed().as_secs(),
                    missing.join("; ")
                )));
            }
        }
    }
}

fn leg_names(assignment: &Assignment) -> Result<(String, String)> {
    let name = |side| {
        assignment
            .interface(side)
            .map(|i| i.name.clone())
            .ok_or_else(|| Error::Vnf(format!("the {side} leg went away")))
    };
    Ok((name(Side::Left)?, name(Side::Right)?))
}

/// How the bridge table differs from its chain with a mark rule per leg (flushed or edited
/// by hand), one sentence each; empty when it holds exactly that.
fn bridge_table_differences() -> Result<Vec<String>> {
    let table = nftables::schema::Table {
        family: nftables::types::NfFamily::Bridge,
        name: TABLE.into(),
        handle: None,
    };
    verify::bridge_differences(nft::list(&table)?.as_deref())
}

/// `run`'s periodic check of the bridge table: re-creates it for the legs of `assignment`
/// (the one `run` applied) when it differs. Returns what differed, empty when nothing did.
pub fn repair_bridge_table(assignment: &Assignment) -> Result<Vec<String>> {
    let differences = bridge_table_differences()?;
    if !differences.is_empty() {
        let (left, right) = leg_names(assignment)?;
        nft(&["-f", "-"], Some(&replace_bridge_table(&left, &right)))?;
    }
    Ok(differences)
}

/// One nft transaction that replaces the bridge table whole.
fn replace_bridge_table(left: &str, right: &str) -> String {
    drop_bridge_table() + &bridge_marks(left, right)
}

/// The bridge table's removal, whether or not it exists.
fn drop_bridge_table() -> String {
    format!("add table bridge {TABLE}\ndelete table bridge {TABLE}\n")
}

async fn link_index(handle: &Handle, name: &str) -> Result<Option<u32>> {
    Ok(links(handle)
        .await?
        .into_iter()
        .find(|link| link.name == name)
        .map(|link| link.index))
}

/// Takes the legs' IPv4 addresses off, creates the bridge and enslaves both legs.
async fn bridge_legs(handle: &Handle, assignment: &Assignment) -> Result<()> {
    let bridge_message = LinkBridge::new(BRIDGE)
        .nf_call_iptables(true)
        .nf_call_ip6tables(true)
        .build();
    handle
        .link()
        .add(bridge_message)
        .execute()
        .await
        .map_err(netlink_error(format!("create the bridge {BRIDGE}")))?;
    let bridge = link_index(handle, BRIDGE)
        .await?
        .ok_or_else(|| Error::Vnf(format!("the bridge {BRIDGE} vanished after creation")))?;
    for side in [Side::Left, Side::Right] {
        let Some(interface) = assignment.interface(side) else {
            continue;
        };
        for address in &interface.addresses {
            delete_address(handle, interface.index, address).await?;
        }
        handle
            .link()
            .set(
                LinkUnspec::new_with_index(interface.index)
                    .controller(bridge)
                    .up()
                    .build(),
            )
            .execute()
            .await
            .map_err(netlink_error(format!(
                "enslave the {side} leg {} to {BRIDGE}",
                interface.name
            )))?;
        info!(%side, leg = %interface.name, removed = ?interface.addresses, "leg bridged");
    }
    Ok(())
}

async fn delete_address(handle: &Handle, index: u32, address: &Ipv4Net) -> Result<()> {
    let mut found = handle
        .address()
        .get()
        .set_link_index_filter(index)
        .set_address_filter(IpAddr::V4(address.addr()))
        .execute();
    while let Some(message) = found
        .try_next()
        .await
        .map_err(netlink_error(format!("find address {address}")))?
    {
        handle
            .address()
            .del(message)
            .execute()
            .await
            .map_err(netlink_error(format!("delete address {address}")))?;
    }
    Ok(())
}

/// Removes the bridge and the bridge table and gives the legs their addresses back, each
/// step tried whatever the others did (an address already back is no failure); the record
/// of the legs goes only once all of it worked, so a later start can try again.
async fn restore(handle: &Handle, state_dir: &Path, legs: &[Leg]) -> Result<()> {
    let mut failures: Vec<String> = Vec::new();
    let links = links(handle).await?;
    if let Some(bridge) = links.iter().find(|link| link.name == BRIDGE) {
        if let Err(error) = handle
            .link()
            .del(bridge.index)
            .execute()
            .await
            .map_err(netlink_error(format!("delete the bridge {BRIDGE}")))
        {
            failures.push(error.to_string());
        }
    }
    if let Err(error) = nft(&["-f", "-"], Some(&drop_bridge_table())) {
        failures.push(error.to_string());
    }
    for leg in legs {
        let Some(link) = links.iter().find(|link| link.name == leg.name) else {
            warn!(leg = %leg.name, addresses = ?leg.addresses, "the leg is gone; nothing to give back");
            continue;
        };
        for address in &leg.addresses {
            let added = handle
                .address()
                .add(link.index, IpAddr::V4(address.addr()), address.prefix_len())
                .execute()
                .await
                .map_err(netlink_error(format!(
                    "give {} its address {address} back",
                    leg.name
                )));
            match added {
                Err(error) if !is_errno(&error, libc::EEXIST) => failures.push(error.to_string()),
                _ => {}
            }
        }
    }
    if !failures.is_empty() {
        return Err(Error::Vnf(format!(
            "restoring the legs failed: {}",
            failures.join("; ")
        )));
    }
    match std::fs::remove_file(legs_path(state_dir)) {
        Err(error) if error.kind() != std::io::ErrorKind::NotFound => {
            warn!(%error, "could not delete the record of the legs");
        }
        _ => {}
    }
    info!(bridge = BRIDGE, "bridge removed, legs restored");
    Ok(())
}

/// A link's name, up flag and bridge (controller), as `status` reports them.
#[derive(Debug, Clone)]
struct Link {
    index: u32,
    name: String,
    up: bool,
    controller: Option<u32>,
}

async fn links(handle: &Handle) -> Result<Vec<Link>> {
    let messages: Vec<LinkMessage> = handle
        .link()
        .get()
        .execute()
        .try_collect()
        .await
        .map_err(netlink_error("dump links".into()))?;
    Ok(messages
        .into_iter()
        .map(|message| {
            let mut link = Link {
                index: message.header.index,
                name: String::new(),
                up: message.header.flags.contains(LinkFlags::Up),
                controller: None,
            };
            for attribute in message.attributes {
                match attribute {
                    LinkAttribute::IfName(name) => link.name = name,
                    LinkAttribute::Controller(index) => link.controller = Some(index),
                    _ => {}
                }
            }
            link
        })
        .collect())
}

/// One leg as `status` sees it.
#[derive(Debug, Clone, Serialize)]
pub struct LegStatus {
    pub side: Side,
    pub interface: Option<String>,
    pub bridged: bool,
    /// IPv4 addresses still on the leg (none once bridged).
    pub addresses: Vec<Ipv4Net>,
}

/// Transparent mode's half of `status`: the bridge, the legs, the bridge table.
#[derive(Debug, Clone, Serialize)]
pub struct Status {
    /// br_netfilter present: without it the bridge forwards unfiltered.
    pub br_netfilter: bool,
    pub bridge: String,
    pub bridge_up: bool,
    pub legs: Vec<LegStatus>,
    /// The bridge table holds its chain and a mark rule per leg.
    pub bridge_table: bool,
    /// How it differs when not.
    pub bridge_table_differences: Vec<String>,
    /// br_netfilter present, bridge up, both legs in it without IPv4 addresses, the bridge
    /// table complete.
    pub converged: bool,
}

pub async fn status(config: &RuntimeConfig) -> Result<Status> {
    let kernel = Kernel::connect()?;
    let links = links(kernel.handle()).await?;
    let bridge = links.iter().find(|link| link.name == BRIDGE);
    let assignment = assign(&config.selectors, &legs_and_others(&kernel).await?)?;
    let legs: Vec<LegStatus> = [Side::Left, Side::Right]
        .into_iter()
        .map(|side| {
            let interface = assignment.interface(side);
            let bridged = match (interface, bridge) {
                (Some(interface), Some(bridge)) => links.iter().any(|link| {
                    link.index == interface.index && link.controller == Some(bridge.index)
                }),
                _ => false,
            };
            LegStatus {
                side,
                interface: interface.map(|i| i.name.clone()),
                bridged,
                addresses: interface.map(|i| i.addresses.clone()).unwrap_or_default(),
            }
        })
        .collect();
    let bridge_table_differences = bridge_table_differences()?;
    let bridge_table = bridge_table_differences.is_empty();
    let bridge_up = bridge.is_some_and(|b| b.up);
    let br_netfilter = Path::new(BR_NETFILTER).exists();
    let converged = br_netfilter
        && bridge_up
        && bridge_table
        && legs
            .iter()
            .all(|leg| leg.bridged && leg.addresses.is_empty());
    Ok(Status {
        br_netfilter,
        bridge: BRIDGE.into(),
        bridge_up,
        legs,
        bridge_table,
        bridge_table_differences,
        converged,
    })
}

impl Status {
    pub fn render(&self) -> String {
        let mut text = format!(
            "transparent mode: bridge {} {}; bridge table {}\n",
            self.bridge,
            if self.bridge_up {
                "up"
            } else {
                "MISSING or down"
            },
            if self.bridge_table {
                "present"
            } else {
                "MISSING or altered (no leg marks: traffic bypasses the per-direction rules)"
            }
        );
        for difference in &self.bridge_table_differences {
            text += &format!("  differs: {difference}\n");
        }
        if !self.br_netfilter {
            text += &format!(
                "  br_netfilter MISSING ({BR_NETFILTER}): bridged traffic is NOT filtered; run `modprobe br_netfilter` on the host\n"
            );
        }
        for leg in &self.legs {
            let state = match (&leg.interface, leg.bridged) {
                (None, _) => "no interface".to_string(),
                (Some(name), true) if leg.addresses.is_empty() => {
                    format!("{name}, bridged, no IPv4")
                }
                (Some(name), bridged) => format!(
                    "{name}, {}, IPv4 {:?}",
                    if bridged { "bridged" } else { "NOT bridged" },
                    leg.addresses
                ),
            };
            text += &format!("  {}: {state}\n", leg.side);
        }
        text += &format!(
            "  {}\n",
            if self.converged {
                "converged"
            } else {
                "NOT converged (is `run --mode transparent` running?)"
            }
        );
        text
    }
}

//! Transparent mode (bump in the wire): the SI owns a Linux bridge enslaving its left and
//! right legs, which carry no IP address; one subnet spans both sides. The firewall filters
//! the bridged traffic: the bridge hands IP packets to the inet hooks (its per-bridge
//! `nf_call_iptables` switch, br_netfilter) where conntrack works, and the `bridge dockwall`
//! table marks each frame with the leg it came in on. Management stays routed.
//!
//! Without addresses the sides are found by selector (name or MAC: a CIDR selector cannot
//! match an unaddressed leg) or by order of appearance; the SI's own bridge never counts as
//! a leg. The legs' IPv4 addresses are taken off while bridged and put back on exit.

use std::future::Future;
use std::net::IpAddr;
use std::time::Instant;

use futures::{StreamExt, TryStreamExt};
use ipnet::Ipv4Net;
use netlink_packet_route::link::{LinkAttribute, LinkFlags, LinkMessage};
use rtnetlink::{Handle, LinkBridge, LinkUnspec};
use serde::Serialize;
use tracing::{error, info, warn};

use crate::error::{Error, Result};
use crate::firewall::compile::TABLE;
use crate::firewall::mode::bridge_marks;
use crate::firewall::nft::nft;
use crate::kernel::Kernel;
use crate::runtime::{require_net_admin, sleep_until, OnExit, RuntimeConfig, SidesObserver};
use crate::side::{assign, Assignment, Interface, Side, SideSelector};

/// The bridge the SI creates between its legs.
pub const BRIDGE: &str = "dockwall0";

/// A leg as it was before the SI bridged it, to put back on exit.
#[derive(Debug, Clone)]
struct Leg {
    index: u32,
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
    let handle = connect()?;
    tokio::pin!(shutdown);
    info!(
        left = %config.selectors.describe(Side::Left),
        right = %config.selectors.describe(Side::Right),
        bridge = BRIDGE,
        "starting in transparent mode"
    );
    remove_stale_bridge(&handle).await?;
    let assignment = tokio::select! {
        found = wait_for_legs(&config, started) => found?,
        () = &mut shutdown => {
            info!("shutdown requested");
            return Ok(());
        }
    };
    let mut legs = Vec::new();
    let outcome = async {
        // The firewall is in place before the bridge forwards anything.
        observer.sides_changed(&assignment)?;
        let (left, right) = leg_names(&assignment)?;
        nft(&["-f", "-"], Some(&replace_bridge_table(&left, &right)))?;
        bridge_legs(&handle, &assignment, &mut legs).await?;
        info!(
            elapsed_ms = started.elapsed().as_millis() as u64,
            bridge = BRIDGE,
            %left,
            %right,
            "forwarding ready"
        );
        shutdown.await;
        info!("shutdown requested");
        Ok(())
    }
    .await;
    if let Err(error) = &outcome {
        error!(%error, "stopping");
    }
    // The bridge goes first: without it nothing is forwarded while the firewall goes.
    match config.on_exit {
        OnExit::Remove => {
            if let Err(error) = unbridge(&handle, &legs).await {
                error!(%error, "could not restore the legs");
            }
        }
        OnExit::Keep => info!("bridge left in place (--on-exit keep)"),
    }
    if let Err(error) = observer.shutdown(config.on_exit) {
        error!(%error, "shutdown incomplete");
    }
    outcome
}

/// What transparent mode cannot do, refused before anything changes.
fn validate(config: &RuntimeConfig) -> Result<()> {
    config.selectors.validate()?;
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

fn connect() -> Result<Handle> {
    let (connection, handle, _) = rtnetlink::new_connection().map_err(|source| Error::Netlink {
        operation: "open socket".into(),
        source,
    })?;
    tokio::spawn(connection);
    Ok(handle)
}

fn netlink_error(operation: String) -> impl FnOnce(rtnetlink::Error) -> Error {
    move |error| Error::Netlink {
        operation,
        source: std::io::Error::other(error.to_string()),
    }
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

/// One nft transaction that replaces the bridge table whole.
fn replace_bridge_table(left: &str, right: &str) -> String {
    format!(
        "add table bridge {TABLE}\ndelete table bridge {TABLE}\n{}",
        bridge_marks(left, right)
    )
}

/// A bridge a killed run left behind would hold the legs: remove it, so they can be
/// bridged afresh. Their addresses are gone with that run; say so.
async fn remove_stale_bridge(handle: &Handle) -> Result<()> {
    if let Some(bridge) = link_index(handle, BRIDGE).await? {
        warn!(
            bridge = BRIDGE,
            "a bridge from an earlier run is here (killed without cleanup?); removing it: the legs' old addresses cannot be restored"
        );
        handle
            .link()
            .del(bridge)
            .execute()
            .await
            .map_err(netlink_error(format!("delete the stale bridge {BRIDGE}")))?;
    }
    Ok(())
}

async fn link_index(handle: &Handle, name: &str) -> Result<Option<u32>> {
    Ok(links(handle)
        .await?
        .into_iter()
        .find(|link| link.name == name)
        .map(|link| link.index))
}

/// Takes the legs' IPv4 addresses off, creates the bridge and enslaves both legs. `legs`
/// records each leg before it is changed, so a failure half-way is undone on exit.
async fn bridge_legs(handle: &Handle, assignment: &Assignment, legs: &mut Vec<Leg>) -> Result<()> {
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
        legs.push(Leg {
            index: interface.index,
            name: interface.name.clone(),
            addresses: interface.addresses.clone(),
        });
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

/// Removes the bridge and the bridge table and gives the legs their addresses back.
async fn unbridge(handle: &Handle, legs: &[Leg]) -> Result<()> {
    if let Some(bridge) = link_index(handle, BRIDGE).await? {
        handle
            .link()
            .del(bridge)
            .execute()
            .await
            .map_err(netlink_error(format!("delete the bridge {BRIDGE}")))?;
    }
    nft(
        &["-f", "-"],
        Some(&format!(
            "add table bridge {TABLE}\ndelete table bridge {TABLE}\n"
        )),
    )?;
    for leg in legs {
        for address in &leg.addresses {
            handle
                .address()
                .add(leg.index, IpAddr::V4(address.addr()), address.prefix_len())
                .execute()
                .await
                .map_err(netlink_error(format!(
                    "give {} its address {address} back",
                    leg.name
                )))?;
        }
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
    pub bridge: String,
    pub bridge_up: bool,
    pub legs: Vec<LegStatus>,
    pub bridge_table: bool,
    /// Bridge up, both legs in it without IPv4 addresses, the bridge table present.
    pub converged: bool,
}

pub async fn status(config: &RuntimeConfig) -> Result<Status> {
    let handle = connect()?;
    let kernel = Kernel::connect()?;
    let links = links(&handle).await?;
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
    let bridge_table = nft(&["list", "table", "bridge", TABLE], None).is_ok();
    let bridge_up = bridge.is_some_and(|b| b.up);
    let converged = bridge_up
        && bridge_table
        && legs
            .iter()
            .all(|leg| leg.bridged && leg.addresses.is_empty());
    Ok(Status {
        bridge: BRIDGE.into(),
        bridge_up,
        legs,
        bridge_table,
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
                "MISSING"
            }
        );
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

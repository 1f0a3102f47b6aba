//! `status`: what the kernel holds now, read back fresh, and whether it is what `run` wants.
//! Exit code 0 only when both sides are ready and routing is converged (a health check).

use std::fmt::Write as _;

use serde::Serialize;

use crate::dhcp::client_status::{read_running, DhcpClientStatus};
use crate::dhcp::driver::{lease_file, read_stored, StoredLease};
use crate::error::Result;
use crate::kernel::Kernel;
use crate::lease::LearnedRoute;
use crate::route_guard::{read_screening, SideScreening};
use crate::routing::{desired_state, Reconciler, RouteSpec, RoutingMode, RoutingState};
use crate::runtime::{with_lease_gateways, RuntimeConfig};
use crate::side::{assign, Interface, Layout, ReadySide, Side};

#[derive(Debug, Serialize)]
pub struct Status {
    pub mode: RoutingMode,
    /// One-armed: one leg serves as left and right side.
    pub layout: Layout,
    pub sides: Vec<SideStatus>,
    /// Our routes and rules as the kernel holds them.
    pub routing: RoutingState,
    /// The DHCP sides' learned routes as `run` split them: installed, or refused and why.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub learned_routes: Vec<SideScreening>,
    /// Both sides ready and the kernel holding exactly the desired routing.
    pub converged: bool,
    pub problems: Vec<String>,
}

#[derive(Debug, Serialize)]
pub struct SideStatus {
    pub side: Side,
    /// The stored DHCP lease of a DHCP side.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dhcp: Option<StoredLease>,
    /// What the running DHCP client of a DHCP side is doing (selecting, bound, …).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dhcp_client: Option<DhcpClientStatus>,
    pub selector: String,
    pub interface: Option<Interface>,
    pub ready: Option<ReadySide>,
    pub waiting_for: Option<String>,
}

/// Reads the namespace the way `run` with `config` sees it.
pub async fn collect(config: &RuntimeConfig) -> Result<Status> {
    config.selectors.validate()?;
    let kernel = Kernel::connect()?;
    let interfaces = kernel.interfaces().await?;
    let assignment = assign(&config.selectors, &interfaces)?;
    let routing = Reconciler::new(kernel).current().await?;

    let mut problems = Vec::new();
    let sides: Vec<SideStatus> = Side::ALL
        .into_iter()
        .map(|side| {
            let ready = assignment.ready(side).cloned();
            // A management leg nobody asked for and nobody plugged in is not awaited.
            let optional_and_absent = side == Side::Management
                && assignment.interface(side).is_none()
                && config.selectors.get(side).is_none();
            let waiting_for = (ready.is_none() && !optional_and_absent)
                .then(|| assignment.waiting_reason(side, &config.selectors));
            if side != Side::Management {
                if let Some(reason) = &waiting_for {
                    problems.push(format!("{side} side not ready: {reason}"));
                }
            }
            let dhcp_interface = assignment
                .interface(side)
                .filter(|_| config.dhcp.sides.contains(&side));
            let dhcp = dhcp_interface
                .and_then(|interface| read_stored(&lease_file(&config.state_dir, &interface.name)));
            let dhcp_client = dhcp_interface.and_then(|i| read_running(&config.state_dir, &i.name));
            if let Some(problem) =
                dhcp_interface.and_then(|i| dhcp_problem(side, i, dhcp_client.as_ref()))
            {
                problems.push(problem);
            }
            SideStatus {
                side,
                dhcp,
                dhcp_client,
                selector: config.selectors.describe(side),
                interface: assignment.interface(side).cloned(),
                ready,
                waiting_for,
            }
        })
        .collect();
    let leases = sides
        .iter()
        .filter_map(|s: &SideStatus| Some((s.side, s.dhcp.clone()?.lease)));
    let routing_config = with_lease_gateways(&config.routing, &assignment, leases);
    match desired_state(&routing_config, &assignment) {
        Ok(desired) if desired != routing => {
            problems.push("routing differs from the desired state (is `run` running?)".into())
        }
        Ok(_) => {}
        Err(error) => problems.push(error.to_string()),
    }
    Ok(Status {
        mode: config.routing.mode,
        layout: assignment.layout,
        sides,
        routing,
        learned_routes: read_screening(&config.state_dir),
        converged: problems.is_empty(),
        problems,
    })
}

/// A DHCP side is healthy only with a lease: until then its routes are missing.
fn dhcp_problem(
    side: Side,
    interface: &Interface,
    client: Option<&DhcpClientStatus>,
) -> Option<String> {
    match client {
        Some(client) if client.is_bound() => None,
        Some(client) => Some(format!(
            "{side} side has no DHCP lease yet: {}",
            client.describe()
        )),
        None => Some(format!(
            "{side} side: no DHCP client runs on {} (is `run` running with --dhcp {side}?)",
            interface.name
        )),
    }
}

impl Status {
    /// The human-readable form, with interface names instead of ifindexes.
    pub fn render(&self) -> String {
        let mut out = String::new();
        let state = if self.converged {
            "converged"
        } else {
            "NOT converged"
        };
        let mode = match self.mode {
            RoutingMode::Cross => "cross",
            RoutingMode::Global => "global",
        };
        let layout = match self.layout {
            Layout::OneArmed => " (one-armed: one leg serves as left and right side)",
            Layout::DualHomed => "",
        };
        let _ = writeln!(out, "{mode} routing{layout}: {state}");
        for side in &self.sides {
            let _ = match (&side.ready, &side.waiting_for) {
                (Some(ready), _) => writeln!(
                    out,
                    "  {:<5} {} {} ({})",
                    side.side, ready.name, ready.address, side.selector
                ),
                (None, Some(reason)) => writeln!(out, "  {:<5} - {reason}", side.side),
                (None, None) => writeln!(out, "  {}: none (optional)", side.side),
            };
        }
        for side in &self.sides {
            if let Some(client) = &side.dhcp_client {
                let _ = writeln!(out, "  dhcp  {} {}", side.side, client.describe());
            }
            if let Some(stored) = &side.dhcp {
                let routes: Vec<String> =
                    stored.lease.routes.iter().map(describe_learned).collect();
                let _ = writeln!(
                    out,
                    "  dhcp  {} lease {} from {} for {} s; routes ({}): {}",
                    side.side,
                    stored.lease.address,
                    stored.lease.server,
                    stored.lease.lease_secs,
                    stored.lease.route_source,
                    routes.join(", ")
                );
            }
        }
        for learned in &self.learned_routes {
            for route in &learned.screened.installed {
                let _ = writeln!(
                    out,
                    "  learned {} {} installed",
                    learned.side,
                    describe_learned(route)
                );
            }
            for refused in &learned.screened.refused {
                let _ = writeln!(
                    out,
                    "  learned {} {} REFUSED: {}",
                    learned.side,
                    describe_learned(&refused.route),
                    refused.reason
                );
            }
        }
        for rule in &self.routing.rules {
            let _ = writeln!(out, "  rule  {rule}");
        }
        for route in &self.routing.routes {
            let _ = writeln!(out, "  route {}", self.describe_route(route));
        }
        for problem in &self.problems {
            let _ = writeln!(out, "  problem: {problem}");
        }
        out
    }

    fn describe_route(&self, route: &RouteSpec) -> String {
        let device = self
            .sides
            .iter()
            .filter_map(|s| s.interface.as_ref())
            .find(|i| i.index == route.oif)
            .map_or_else(|| format!("ifindex {}", route.oif), |i| i.name.clone());
        let mut text = format!("table {} {}", route.table, route.destination);
        if let Some(gateway) = route.gateway {
            let _ = write!(text, " via {gateway}");
        }
        let _ = write!(text, " dev {device}");
        if let Some(source) = route.source {
            let _ = write!(text, " src {source}");
        }
        text
    }
}

fn describe_learned(route: &LearnedRoute) -> String {
    match route.gateway {
        Some(gateway) => format!("{} via {gateway}", route.destination),
        None => format!("{} on-link", route.destination),
    }
}

//! `status`: what the kernel holds now, read back fresh, and whether it is what `run` wants.
//! Exit code 0 only when both sides are ready and routing is converged (a health check).

use std::fmt::Write as _;

use serde::Serialize;

use crate::error::Result;
use crate::kernel::Kernel;
use crate::routing::{desired_state, Reconciler, RouteSpec, RoutingMode, RoutingState};
use crate::runtime::RuntimeConfig;
use crate::side::{assign, Interface, ReadySide, Side};

#[derive(Debug, Serialize)]
pub struct Status {
    pub mode: RoutingMode,
    pub sides: Vec<SideStatus>,
    /// Our routes and rules as the kernel holds them.
    pub routing: RoutingState,
    /// Both sides ready and the kernel holding exactly the desired routing.
    pub converged: bool,
    pub problems: Vec<String>,
}

#[derive(Debug, Serialize)]
pub struct SideStatus {
    pub side: Side,
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
    let sides = Side::ALL
        .into_iter()
        .map(|side| {
            let ready = assignment.ready(side).cloned();
            let waiting_for = ready
                .is_none()
                .then(|| assignment.waiting_reason(side, &config.selectors));
            if side != Side::Management {
                if let Some(reason) = &waiting_for {
                    problems.push(format!("{side} side not ready: {reason}"));
                }
            }
            SideStatus {
                side,
                selector: config.selectors.describe(side),
                interface: assignment.interface(side).cloned(),
                ready,
                waiting_for,
            }
        })
        .collect();
    match desired_state(&config.routing, &assignment) {
        Ok(desired) if desired != routing => {
            problems.push("routing differs from the desired state (is `run` running?)".into())
        }
        Ok(_) => {}
        Err(error) => problems.push(error.to_string()),
    }
    Ok(Status {
        mode: config.routing.mode,
        sides,
        routing,
        converged: problems.is_empty(),
        problems,
    })
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
        let _ = writeln!(out, "{mode} routing: {state}");
        for side in &self.sides {
            let _ = match (&side.ready, &side.waiting_for) {
                (Some(ready), _) => writeln!(
                    out,
                    "  {:<5} {} {} ({})",
                    side.side, ready.name, ready.address, side.selector
                ),
                (None, Some(reason)) => writeln!(out, "  {:<5} - {reason}", side.side),
                (None, None) => Ok(()),
            };
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

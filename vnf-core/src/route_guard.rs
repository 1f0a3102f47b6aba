//! Which learned left routes may enter `main` in global mode. A route learned on the left
//! that is as specific as the right subnet, the management subnet or the VPN pool wins the
//! longest match over them and sends their traffic left; the default and its def1 halves
//! take everything else. Those are refused, each for a named reason. Wider routes that only
//! contain such a network (`10.0.0.0/8`) lose the longest match and are installed.

use std::fmt;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};

use ipnet::Ipv4Net;
use serde::{Deserialize, Serialize};

use crate::lease::LearnedRoute;
use crate::routing::RoutingConfig;
use crate::side::{gateway_for, Assignment, Side};

/// Why a learned route stays out of the kernel.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum Refusal {
    /// The default belongs to the right side.
    DefaultRoute,
    /// 0.0.0.0/1 or 128.0.0.0/1: together a default route.
    Def1Half,
    RightSubnet {
        subnet: Ipv4Net,
    },
    RightGateway {
        gateway: Ipv4Addr,
    },
    ManagementSubnet {
        subnet: Ipv4Net,
    },
    VpnPool {
        pool: Ipv4Net,
    },
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Refusal::DefaultRoute => write!(f, "the default route belongs to the right side"),
            Refusal::Def1Half => write!(
                f,
                "a def1 half acts as a default route and would take the right side's traffic; pass --accept-wide-left-routes to install it"
            ),
            Refusal::RightSubnet { subnet } => {
                write!(f, "it would capture the right subnet {subnet}")
            }
            Refusal::RightGateway { gateway } => {
                write!(f, "it would capture the right gateway {gateway}")
            }
            Refusal::ManagementSubnet { subnet } => {
                write!(f, "it would capture the management subnet {subnet}")
            }
            Refusal::VpnPool { pool } => write!(f, "it would capture the VPN pool {pool}"),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct RefusedRoute {
    pub route: LearnedRoute,
    pub reason: Refusal,
}

/// A lease's routes split into those installed (and pushed) and those refused.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Screened {
    pub installed: Vec<LearnedRoute>,
    pub refused: Vec<RefusedRoute>,
}

/// What a learned route must not capture. The default guard refuses nothing.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RouteGuard {
    active: bool,
    accept_wide: bool,
    right_subnet: Option<Ipv4Net>,
    right_gateway: Option<Ipv4Addr>,
    management_subnet: Option<Ipv4Net>,
    vpn_pool: Option<Ipv4Net>,
}

impl RouteGuard {
    /// The guard for the left lease in global mode, from the sides ready now.
    pub fn for_global_left(config: &RoutingConfig, assignment: &Assignment) -> RouteGuard {
        let right = assignment.ready(Side::Right);
        RouteGuard {
            active: true,
            accept_wide: config.accept_wide_left_routes,
            right_subnet: right.map(|r| r.subnet()),
            right_gateway: right
                .and_then(|r| gateway_for(r, config.right_gateway_for(assignment)).ok()),
            management_subnet: assignment.ready(Side::Management).map(|r| r.subnet()),
            vpn_pool: config.vpn_pool.map(|pool| pool.trunc()),
        }
    }

    /// Splits `routes`, in their order.
    pub fn screen(&self, routes: &[LearnedRoute]) -> Screened {
        let mut screened = Screened::default();
        for &route in routes {
            match self.refusal(route.destination) {
                Some(reason) => screened.refused.push(RefusedRoute { route, reason }),
                None => screened.installed.push(route),
            }
        }
        screened
    }

    fn refusal(&self, destination: Ipv4Net) -> Option<Refusal> {
        if !self.active {
            return None;
        }
        // A route inside `network` (or equal to it) wins the longest match over its route.
        let captures = |network: Ipv4Net| network.contains(&destination);
        match destination.prefix_len() {
            0 => return Some(Refusal::DefaultRoute),
            1 if !self.accept_wide => return Some(Refusal::Def1Half),
            _ => {}
        }
        if let (Some(gateway), Some(subnet)) = (self.right_gateway, self.right_subnet) {
            if destination.contains(&gateway) && destination.prefix_len() > subnet.prefix_len() {
                return Some(Refusal::RightGateway { gateway });
            }
        }
        if let Some(subnet) = self.right_subnet.filter(|&s| captures(s)) {
            return Some(Refusal::RightSubnet { subnet });
        }
        if let Some(subnet) = self.management_subnet.filter(|&s| captures(s)) {
            return Some(Refusal::ManagementSubnet { subnet });
        }
        if let Some(pool) = self.vpn_pool.filter(|&p| captures(p)) {
            return Some(Refusal::VpnPool { pool });
        }
        None
    }
}

/// One DHCP side's learned routes as `run` installed them, for `status` (another process).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SideScreening {
    pub side: Side,
    #[serde(flatten)]
    pub screened: Screened,
}

pub fn screening_file(state_dir: &Path) -> PathBuf {
    state_dir.join("learned-routes.json")
}

/// What `run` last wrote; empty when it never did (no DHCP, or not running).
pub fn read_screening(state_dir: &Path) -> Vec<SideScreening> {
    std::fs::read_to_string(screening_file(state_dir))
        .ok()
        .and_then(|text| serde_json::from_str(&text).ok())
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn route(destination: &str) -> LearnedRoute {
        LearnedRoute {
            destination: destination.parse().unwrap(),
            gateway: Some("10.0.1.1".parse().unwrap()),
        }
    }

    fn guard(accept_wide: bool) -> RouteGuard {
        RouteGuard {
            active: true,
            accept_wide,
            right_subnet: Some("10.0.2.0/24".parse().unwrap()),
            right_gateway: Some("10.0.2.1".parse().unwrap()),
            management_subnet: Some("172.31.0.0/24".parse().unwrap()),
            vpn_pool: Some("10.8.0.0/24".parse().unwrap()),
        }
    }

    fn reasons(guard: &RouteGuard, destinations: &[&str]) -> Vec<Option<Refusal>> {
        destinations
            .iter()
            .map(|d| guard.refusal(d.parse().unwrap()))
            .collect()
    }

    #[test]
    fn routes_that_would_capture_the_right_side_are_refused_by_name() {
        let pool: Ipv4Net = "10.8.0.0/24".parse().unwrap();
        let right: Ipv4Net = "10.0.2.0/24".parse().unwrap();
        assert_eq!(
            reasons(
                &guard(false),
                &[
                    "0.0.0.0/0",
                    "0.0.0.0/1",
                    "128.0.0.0/1",
                    "10.0.2.0/24",
                    "10.0.2.0/25",
                    "10.0.2.128/25",
                    "172.31.0.0/24",
                    "10.8.0.0/24",
                    "10.8.0.64/26",
                ]
            ),
            [
                Some(Refusal::DefaultRoute),
                Some(Refusal::Def1Half),
                Some(Refusal::Def1Half),
                Some(Refusal::RightSubnet { subnet: right }),
                Some(Refusal::RightGateway {
                    gateway: "10.0.2.1".parse().unwrap()
                }),
                Some(Refusal::RightSubnet { subnet: right }),
                Some(Refusal::ManagementSubnet {
                    subnet: "172.31.0.0/24".parse().unwrap()
                }),
                Some(Refusal::VpnPool { pool }),
                Some(Refusal::VpnPool { pool }),
            ]
        );
    }

    #[test]
    fn wider_routes_and_unrelated_ones_are_installed() {
        assert_eq!(
            reasons(
                &guard(false),
                &["10.0.0.0/8", "2.0.0.0/7", "192.168.10.0/24"]
            ),
            [None, None, None]
        );
        assert_eq!(
            reasons(&guard(true), &["0.0.0.0/1", "128.0.0.0/1", "0.0.0.0/0"]),
            [None, None, Some(Refusal::DefaultRoute)]
        );
        assert_eq!(
            reasons(&RouteGuard::default(), &["0.0.0.0/1", "10.0.2.0/24"]),
            [None, None]
        );
    }

    #[test]
    fn screening_keeps_the_order_and_splits() {
        let screened = guard(false).screen(&[
            route("10.61.11.0/24"),
            route("0.0.0.0/1"),
            route("10.0.0.0/8"),
        ]);
        assert_eq!(
            screened.installed,
            [route("10.61.11.0/24"), route("10.0.0.0/8")]
        );
        assert_eq!(screened.refused.len(), 1);
        assert_eq!(screened.refused[0].reason, Refusal::Def1Half);
    }
}

//! A DHCP lease in the kernel: the address with the lease's lifetime, then on-link routes,
//! then gateway routes — a gateway outside the leased subnet first gets a /32 link route, or
//! the kernel refuses routes through it — all tagged `proto dhcp`, in the table the caller
//! chooses (Dockvpn: main; Dockwall: that side's table). A renewal changes only the
//! difference; expiry or a NAK removes everything.

use std::collections::BTreeSet;
use std::net::Ipv4Addr;

use ipnet::Ipv4Net;
use serde::{Deserialize, Serialize};

use crate::error::Result;
use crate::kernel::{is_errno, Kernel, TimedAddress};
use crate::routing::{Changes, Reconciler, RouteSpec, RoutingState, Scope, DHCP_ROUTE_PROTOCOL};

/// One route a lease carries (option 121, 249, or 33 + 3). No gateway means on-link.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct LearnedRoute {
    pub destination: Ipv4Net,
    pub gateway: Option<Ipv4Addr>,
}

/// Where and how a lease is installed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LeaseTarget {
    pub interface: u32,
    pub table: u32,
    /// False in global mode on the left: Neutron appends 0.0.0.0/0 to the host routes, and
    /// the default belongs to the right side. The route stays in the feed, not in the kernel.
    pub install_default: bool,
}

/// What the kernel should hold for one bound lease.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BoundLease {
    pub address: Ipv4Net,
    pub valid_secs: u32,
    pub routes: Vec<LearnedRoute>,
}

/// The routes `lease` asks for at `target`, link routes included.
pub fn desired_routes(target: LeaseTarget, lease: &BoundLease) -> BTreeSet<RouteSpec> {
    let route = |destination: Ipv4Net, gateway: Option<Ipv4Addr>| RouteSpec {
        protocol: DHCP_ROUTE_PROTOCOL,
        table: target.table,
        destination,
        gateway,
        oif: target.interface,
        source: gateway.is_none().then(|| lease.address.addr()),
        scope: if gateway.is_none() {
            Scope::Link
        } else {
            Scope::Universe
        },
        metric: 0,
    };
    let subnet = lease.address.trunc();
    let mut routes = BTreeSet::new();
    for learned in &lease.routes {
        if learned.destination.prefix_len() == 0 && !target.install_default {
            continue;
        }
        // 0.0.0.0 as a router means on-link (RFC 3442).
        let gateway = learned.gateway.filter(|g| !g.is_unspecified());
        if let Some(gateway) = gateway {
            if !subnet.contains(&gateway) {
                routes.insert(route(Ipv4Net::from(gateway), None));
            }
        }
        if learned.destination == subnet
            && gateway.is_none()
            && target.table == crate::routing::MAIN_TABLE
        {
            // The kernel already routes the leased subnet in main through the address.
            continue;
        }
        routes.insert(route(learned.destination, gateway));
    }
    routes
}

/// Installs, renews and removes one interface's lease.
pub struct LeaseApplier {
    kernel: Kernel,
    target: LeaseTarget,
    routes: Reconciler,
    address: Option<TimedAddress>,
}

impl LeaseApplier {
    pub fn new(kernel: Kernel, target: LeaseTarget) -> Self {
        LeaseApplier {
            routes: Reconciler::for_lease(kernel.clone(), target.table, target.interface),
            kernel,
            target,
            address: None,
        }
    }

    /// Puts the lease in the kernel: a renewal refreshes the address lifetime and changes
    /// only the routes that differ.
    pub async fn apply(&mut self, lease: &BoundLease) -> Result<Changes> {
        let address = TimedAddress {
            interface: self.target.interface,
            address: lease.address,
            valid_secs: lease.valid_secs,
        };
        if let Some(previous) = self.address.filter(|a| a.address != lease.address) {
            // A new address: routes via the old one go first, then the old address.
            self.routes.apply(&RoutingState::default()).await?;
            self.remove_address(previous).await?;
        }
        self.kernel.put_address(&address).await?;
        self.address = Some(address);
        let desired = RoutingState {
            routes: desired_routes(self.target, lease),
            rules: BTreeSet::new(),
        };
        self.routes.apply(&desired).await
    }

    /// Changes only the routes of the installed lease (what may be installed changed),
    /// leaving its address and lifetime alone; nothing without an installed lease.
    pub async fn replace_routes(&mut self, routes: &[LearnedRoute]) -> Result<Changes> {
        let Some(address) = self.address else {
            return Ok(Changes::default());
        };
        let lease = BoundLease {
            address: address.address,
            valid_secs: address.valid_secs,
            routes: routes.to_vec(),
        };
        self.routes
            .apply(&RoutingState {
                routes: desired_routes(self.target, &lease),
                rules: BTreeSet::new(),
            })
            .await
    }

    /// Expiry, NAK or release: the lease's routes, then its address.
    pub async fn remove(&mut self) -> Result<Changes> {
        let changes = self.routes.apply(&RoutingState::default()).await?;
        if let Some(address) = self.address.take() {
            self.remove_address(address).await?;
        }
        Ok(changes)
    }

    async fn remove_address(&self, address: TimedAddress) -> Result<()> {
        match self.kernel.delete_address(&address).await {
            // Already gone: its lifetime ran out in the kernel.
            Err(error) if is_errno(&error, libc::EADDRNOTAVAIL) => Ok(()),
            other => other,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lease(routes: &[(&str, Option<&str>)]) -> BoundLease {
        BoundLease {
            address: "10.0.1.2/24".parse().unwrap(),
            valid_secs: 3600,
            routes: routes
                .iter()
                .map(|(d, g)| LearnedRoute {
                    destination: d.parse().unwrap(),
                    gateway: g.map(|g| g.parse().unwrap()),
                })
                .collect(),
        }
    }

    fn describe(routes: &BTreeSet<RouteSpec>) -> Vec<String> {
        routes.iter().map(ToString::to_string).collect()
    }

    #[test]
    fn gateways_outside_the_subnet_get_a_link_route_first() {
        let target = LeaseTarget {
            interface: 5,
            table: 1001,
            install_default: true,
        };
        let routes = desired_routes(
            target,
            &lease(&[
                ("192.168.10.0/24", Some("10.9.9.1")),
                ("172.16.0.0/12", Some("0.0.0.0")),
            ]),
        );
        assert_eq!(
            describe(&routes),
            [
                "10.9.9.1/32 oif 5 table 1001 src 10.0.1.2",
                "172.16.0.0/12 oif 5 table 1001 src 10.0.1.2",
                "192.168.10.0/24 via 10.9.9.1 oif 5 table 1001",
            ]
        );
        assert!(routes.iter().all(|r| r.protocol == DHCP_ROUTE_PROTOCOL));
    }

    #[test]
    fn a_left_default_stays_out_of_the_kernel_in_global_mode() {
        let learned = lease(&[
            ("0.0.0.0/0", Some("10.0.1.1")),
            ("192.168.10.0/24", Some("10.0.1.1")),
            ("10.0.1.0/24", None),
        ]);
        let global_left = LeaseTarget {
            interface: 5,
            table: 254,
            install_default: false,
        };
        assert_eq!(
            describe(&desired_routes(global_left, &learned)),
            ["192.168.10.0/24 via 10.0.1.1 oif 5 table 254"]
        );
        let side_table = LeaseTarget {
            interface: 5,
            table: 1001,
            install_default: true,
        };
        assert_eq!(desired_routes(side_table, &learned).len(), 3);
    }
}

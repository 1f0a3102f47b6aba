//! A bump in the wire, for transparent mode: the left and right hosts share one subnet and
//! the SI sits between them on two legs, plus a routed management leg.
//!
//! ```text
//! left host ──eth0─ SI ─eth1── right host        SI ─eth2── mgmt
//! 10.50.0.1     (.250)   (.251)   10.50.0.2      10.60.0.2   10.60.0.1
//! ```
//!
//! The SI's data legs start with addresses, as Docker gives them; transparent mode takes
//! them off while it bridges and puts them back on exit.

use crate::chain::link;
use crate::netns::Netns;
use crate::prereq::require_chain_tools;

pub const WIRE_LEFT: &str = "10.50.0.1";
pub const WIRE_RIGHT: &str = "10.50.0.2";
pub const SI_LEFT_LEG: &str = "10.50.0.250/24";
pub const SI_RIGHT_LEG: &str = "10.50.0.251/24";
pub const SI_MGMT: &str = "10.60.0.2";

pub struct Wire {
    pub left_host: Netns,
    pub si: Netns,
    pub right_host: Netns,
    pub mgmt: Netns,
}

impl Wire {
    pub fn new() -> Wire {
        require_chain_tools();
        let wire = Wire {
            left_host: Netns::new("tl"),
            si: Netns::new("ts"),
            right_host: Netns::new("tr"),
            mgmt: Netns::new("tm"),
        };
        link(
            &wire.left_host,
            "eth0",
            &format!("{WIRE_LEFT}/24"),
            &wire.si,
            "eth0",
            SI_LEFT_LEG,
        );
        link(
            &wire.si,
            "eth1",
            SI_RIGHT_LEG,
            &wire.right_host,
            "eth0",
            &format!("{WIRE_RIGHT}/24"),
        );
        link(
            &wire.si,
            "eth2",
            &format!("{SI_MGMT}/24"),
            &wire.mgmt,
            "eth0",
            "10.60.0.1/24",
        );
        wire
    }

    /// The IPv4 addresses on one of the SI's legs, as `ADDR/LEN`.
    pub fn leg_addresses(&self, leg: &str) -> Vec<String> {
        self.si
            .link(leg)
            .addresses
            .iter()
            .map(|a| a.to_string())
            .collect()
    }

    /// The baseline the benchmark compares against: a plain Linux bridge in the SI with
    /// br_netfilter on (the bridge's nf_call_iptables), the legs unaddressed, no Dockwall.
    pub fn bridge_plainly(&self) {
        for leg in ["eth0", "eth1"] {
            self.si.ip(&["addr", "flush", "dev", leg]);
        }
        self.si.ip(&[
            "link",
            "add",
            "br0",
            "type",
            "bridge",
            "nf_call_iptables",
            "1",
        ]);
        for leg in ["eth0", "eth1"] {
            self.si.ip(&["link", "set", leg, "master", "br0"]);
        }
        self.si.ip(&["link", "set", "br0", "up"]);
    }
}

impl Default for Wire {
    fn default() -> Self {
        Wire::new()
    }
}

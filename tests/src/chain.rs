//! A service chain in namespaces, the shape of an OpenContrail service chain:
//!
//! ```text
//! left host ── left gateway ──eth0─ SI ─eth1── right gateway ── right host
//! 192.168.10.2  .10.1 | 10.0.1.1   .1.2  .2.2   10.0.2.1 | .20.1  192.168.20.2
//! ```
//!
//! The hosts' networks are not connected to the SI: the gateways leak each other's host
//! network via the SI (what a Contrail network policy does), and the SI must reach them
//! through its per-side default routes.

use crate::netns::Netns;
use crate::prereq::require_chain_tools;

pub const LEFT_HOST: &str = "192.168.10.2";
pub const LEFT_HOST_NET: &str = "192.168.10.0/24";
pub const LEFT_GATEWAY: &str = "10.0.1.1";
pub const SI_LEFT: &str = "10.0.1.2";
pub const LEFT_NET: &str = "10.0.1.0/24";
pub const SI_RIGHT: &str = "10.0.2.2";
pub const RIGHT_NET: &str = "10.0.2.0/24";
pub const RIGHT_GATEWAY: &str = "10.0.2.1";
pub const RIGHT_HOST_NET: &str = "192.168.20.0/24";
pub const RIGHT_HOST: &str = "192.168.20.2";

pub struct Chain {
    pub left_host: Netns,
    pub left_gateway: Netns,
    pub si: Netns,
    pub right_gateway: Netns,
    pub right_host: Netns,
}

impl Chain {
    /// The whole chain, the SI with both legs (eth0 left, eth1 right) up and addressed.
    pub fn new() -> Chain {
        let chain = Chain::without_right();
        chain.attach_right();
        chain
    }

    /// The chain with the SI attached only on the left, as after `docker run` and before
    /// `docker network connect`.
    pub fn without_right() -> Chain {
        require_chain_tools();
        let chain = Chain {
            left_host: Netns::new("lh"),
            left_gateway: Netns::new("lgw"),
            si: Netns::new("si"),
            right_gateway: Netns::new("rgw"),
            right_host: Netns::new("rh"),
        };
        link(
            &chain.left_host,
            "eth0",
            &format!("{LEFT_HOST}/24"),
            &chain.left_gateway,
            "lan",
            "192.168.10.1/24",
        );
        chain
            .left_host
            .ip(&["route", "add", "default", "via", "192.168.10.1"]);
        link(
            &chain.left_gateway,
            "wan",
            &format!("{LEFT_GATEWAY}/24"),
            &chain.si,
            "eth0",
            &format!("{SI_LEFT}/24"),
        );
        chain
            .left_gateway
            .ip(&["route", "add", RIGHT_HOST_NET, "via", SI_LEFT]);
        chain.left_gateway.set_sysctl("net.ipv4.ip_forward", 1);

        link(
            &chain.right_host,
            "eth0",
            &format!("{RIGHT_HOST}/24"),
            &chain.right_gateway,
            "lan",
            "192.168.20.1/24",
        );
        chain
            .right_host
            .ip(&["route", "add", "default", "via", "192.168.20.1"]);
        chain.right_gateway.set_sysctl("net.ipv4.ip_forward", 1);
        chain
    }

    /// Plugs the SI's right leg (eth1) into the right gateway.
    pub fn attach_right(&self) {
        link(
            &self.si,
            "eth1",
            &format!("{SI_RIGHT}/24"),
            &self.right_gateway,
            "wan",
            &format!("{RIGHT_GATEWAY}/24"),
        );
        self.right_gateway
            .ip(&["route", "add", LEFT_HOST_NET, "via", SI_RIGHT]);
    }

    /// Unplugs the SI's left leg and plugs it in again with the same MAC and address, so it
    /// now comes after the right leg in order of appearance, as `docker restart` may do.
    pub fn replug_left_last(&self) {
        let mac = self.si.link("eth0").mac.expect("eth0 has a MAC");
        self.si.ip(&["link", "del", "eth0"]);
        link(
            &self.left_gateway,
            "wan",
            &format!("{LEFT_GATEWAY}/24"),
            &self.si,
            "eth0",
            &format!("{SI_LEFT}/24"),
        );
        self.si.ip(&[
            "link",
            "set",
            "eth0",
            "address",
            &vnf_core::side::format_mac(&mac),
        ]);
        self.left_gateway
            .ip(&["route", "add", RIGHT_HOST_NET, "via", SI_LEFT]);
    }

    /// One more remote site on the right: a namespace at 172.17.`n`.2/24 wired to the right
    /// gateway (its `site<n>` at 172.17.`n`.1), default route via the gateway. The SI reaches
    /// it by its right-side default route; nothing routes it to the left.
    pub fn add_right_site(&self, n: u8) -> (Netns, String) {
        let site = Netns::new(&format!("rs{n}"));
        let (address, gateway) = (format!("172.17.{n}.2"), format!("172.17.{n}.1"));
        link(
            &site,
            "eth0",
            &format!("{address}/24"),
            &self.right_gateway,
            &format!("site{n}"),
            &format!("{gateway}/24"),
        );
        site.ip(&["route", "add", "default", "via", &gateway]);
        (site, address)
    }

    /// The baseline the benchmark compares against: the SI as a plain router with two
    /// static routes in `main`, no extra tables or rules.
    pub fn route_si_statically(&self) {
        self.si.set_sysctl("net.ipv4.ip_forward", 1);
        self.si
            .ip(&["route", "add", LEFT_HOST_NET, "via", LEFT_GATEWAY]);
        self.si
            .ip(&["route", "add", RIGHT_HOST_NET, "via", RIGHT_GATEWAY]);
    }
}

/// Where the hosts of [`plain_path`] sit.
pub const PLAIN_PATH_CLIENT: &str = "10.9.0.1";
pub const PLAIN_PATH_SERVER: &str = "10.9.0.2";

/// Two namespaces joined by one veth pair, (client at PLAIN_PATH_CLIENT, server at
/// PLAIN_PATH_SERVER): the baseline a tunnel's behaviour is compared against.
pub fn plain_path() -> (Netns, Netns) {
    require_chain_tools();
    let (client, server) = (Netns::new("ppc"), Netns::new("pps"));
    link(
        &client,
        "eth0",
        &format!("{PLAIN_PATH_CLIENT}/24"),
        &server,
        "eth0",
        &format!("{PLAIN_PATH_SERVER}/24"),
    );
    (client, server)
}

impl Default for Chain {
    fn default() -> Self {
        Chain::new()
    }
}

/// A veth pair between two namespaces, both ends addressed and up.
pub fn link(a: &Netns, a_name: &str, a_address: &str, b: &Netns, b_name: &str, b_address: &str) {
    veth_pair(a, a_name, b, b_name);
    a.ip(&["addr", "add", a_address, "dev", a_name]);
    b.ip(&["addr", "add", b_address, "dev", b_name]);
    a.ip(&["link", "set", a_name, "up"]);
    b.ip(&["link", "set", b_name, "up"]);
}

/// A DHCP client's view: `client` with an unaddressed `eth0`, wired to `router`'s `lan`
/// at 10.0.1.1/24, both up.
pub fn client_and_router() -> (Netns, Netns) {
    require_chain_tools();
    let (client, router) = (Netns::new("dc"), Netns::new("dr"));
    veth_pair(&client, "eth0", &router, "lan");
    client.ip(&["link", "set", "eth0", "up"]);
    router.ip(&["addr", "add", "10.0.1.1/24", "dev", "lan"]);
    router.ip(&["link", "set", "lan", "up"]);
    (client, router)
}

/// A veth pair, `a_name` in `a` and its peer `b_name` in `b`, both down and unaddressed.
pub fn veth_pair(a: &Netns, a_name: &str, b: &Netns, b_name: &str) {
    a.ip(&[
        "link",
        "add",
        "name",
        a_name,
        "type",
        "veth",
        "peer",
        "name",
        b_name,
        "netns",
        b.name(),
    ]);
}

//! Thin rtnetlink access: dumps and single changes with explicit flags, and the event feed.
//! Everything that decides *what* to change lives in `side` and `routing`.

use std::io;
use std::net::IpAddr;

use futures::channel::mpsc::UnboundedReceiver;
use futures::StreamExt;
use netlink_packet_core::{
    NetlinkMessage, NetlinkPayload, NLM_F_ACK, NLM_F_CREATE, NLM_F_DUMP, NLM_F_EXCL, NLM_F_REPLACE,
    NLM_F_REQUEST,
};
use netlink_packet_route::address::{AddressAttribute, AddressMessage, CacheInfo};
use netlink_packet_route::link::{LinkAttribute, LinkFlags, LinkLayerType, LinkMessage};
use netlink_packet_route::route::RouteMessage;
use netlink_packet_route::rule::RuleMessage;
use netlink_packet_route::{AddressFamily, RouteNetlinkMessage};
use netlink_sys::SocketAddr;
use rtnetlink::{Handle, MulticastGroup};

use crate::error::{Error, Result};
use crate::side::Interface;

/// A request connection to the rtnetlink socket of the current thread's namespace.
#[derive(Clone)]
pub struct Kernel {
    handle: Handle,
}

/// Link and IPv4 address notifications; each item only says "something changed".
pub type KernelEvents = UnboundedReceiver<(NetlinkMessage<RouteNetlinkMessage>, SocketAddr)>;

impl Kernel {
    /// Opens the socket and spawns its driver on the current tokio runtime.
    pub fn connect() -> Result<Self> {
        let (connection, handle, _) =
            rtnetlink::new_connection().map_err(|source| Error::Netlink {
                operation: "open socket".into(),
                source,
            })?;
        tokio::spawn(connection);
        Ok(Kernel { handle })
    }

    /// The rtnetlink handle, for the requests this type has no method for.
    pub fn handle(&self) -> &Handle {
        &self.handle
    }

    /// Subscribes to link and IPv4 address changes. Subscribe before the first dump so that
    /// no change between the dump and the subscription is missed.
    pub fn watch() -> Result<KernelEvents> {
        let groups = [MulticastGroup::Link, MulticastGroup::Ipv4Ifaddr];
        let (connection, _, events) =
            rtnetlink::new_multicast_connection(&groups).map_err(|source| Error::Netlink {
                operation: "subscribe to link and address events".into(),
                source,
            })?;
        tokio::spawn(connection);
        Ok(events)
    }

    async fn request(
        &self,
        operation: &str,
        message: RouteNetlinkMessage,
        flags: u16,
    ) -> Result<Vec<RouteNetlinkMessage>> {
        let failed = |source| Error::Netlink {
            operation: operation.to_string(),
            source,
        };
        let mut request = NetlinkMessage::from(message);
        request.header.flags = flags;
        let mut responses = self
            .handle
            .clone()
            .request(request)
            .map_err(|e| failed(io::Error::other(e.to_string())))?;
        let mut replies = Vec::new();
        while let Some(response) = responses.next().await {
            match response.payload {
                NetlinkPayload::InnerMessage(inner) => replies.push(inner),
                NetlinkPayload::Error(error) => {
                    if let Some(code) = error.code {
                        return Err(failed(io::Error::from_raw_os_error(-code.get())));
                    }
                }
                _ => {}
            }
        }
        Ok(replies)
    }

    async fn dump(
        &self,
        operation: &str,
        message: RouteNetlinkMessage,
    ) -> Result<Vec<RouteNetlinkMessage>> {
        self.request(operation, message, NLM_F_REQUEST | NLM_F_DUMP)
            .await
    }

    async fn change(
        &self,
        operation: String,
        message: RouteNetlinkMessage,
        flags: u16,
    ) -> Result<()> {
        self.request(&operation, message, NLM_F_REQUEST | NLM_F_ACK | flags)
            .await
            .map(drop)
    }

    /// Every interface of the namespace with its IPv4 addresses, primary first.
    pub async fn interfaces(&self) -> Result<Vec<Interface>> {
        let links = self
            .dump(
                "dump links",
                RouteNetlinkMessage::GetLink(LinkMessage::default()),
            )
            .await?;
        let mut address_request = AddressMessage::default();
        address_request.header.family = AddressFamily::Inet;
        let addresses = self
            .dump(
                "dump addresses",
                RouteNetlinkMessage::GetAddress(address_request),
            )
            .await?;

        let mut interfaces: Vec<Interface> = links
            .into_iter()
            .filter_map(|m| match m {
                RouteNetlinkMessage::NewLink(link) => Some(interface_from(&link)),
                _ => None,
            })
            .collect();
        for message in addresses {
            let RouteNetlinkMessage::NewAddress(address) = message else {
                continue;
            };
            let Some(local) = address.attributes.iter().find_map(|a| match a {
                AddressAttribute::Local(IpAddr::V4(ip)) => Some(*ip),
                _ => None,
            }) else {
                continue;
            };
            let Ok(net) = ipnet::Ipv4Net::new(local, address.header.prefix_len) else {
                continue;
            };
            if let Some(interface) = interfaces
                .iter_mut()
                .find(|i| i.index == address.header.index)
            {
                interface.addresses.push(net);
            }
        }
        Ok(interfaces)
    }

    pub async fn routes_v4(&self) -> Result<Vec<RouteMessage>> {
        let mut request = RouteMessage::default();
        request.header.address_family = AddressFamily::Inet;
        let replies = self
            .dump("dump routes", RouteNetlinkMessage::GetRoute(request))
            .await?;
        Ok(replies
            .into_iter()
            .filter_map(|m| match m {
                RouteNetlinkMessage::NewRoute(route) => Some(route),
                _ => None,
            })
            .collect())
    }

    pub async fn rules_v4(&self) -> Result<Vec<RuleMessage>> {
        let mut request = RuleMessage::default();
        request.header.family = AddressFamily::Inet;
        let replies = self
            .dump("dump rules", RouteNetlinkMessage::GetRule(request))
            .await?;
        Ok(replies
            .into_iter()
            .filter_map(|m| match m {
                RouteNetlinkMessage::NewRule(rule) => Some(rule),
                _ => None,
            })
            .collect())
    }

    /// Adds a route; `replace` takes over an existing route with the same key instead of
    /// failing with EEXIST.
    pub async fn add_route(
        &self,
        description: &str,
        route: RouteMessage,
        replace: bool,
    ) -> Result<()> {
        let flags = NLM_F_CREATE | if replace { NLM_F_REPLACE } else { NLM_F_EXCL };
        self.change(
            format!("add route {description}"),
            RouteNetlinkMessage::NewRoute(route),
            flags,
        )
        .await
    }

    pub async fn delete_route(&self, description: &str, route: RouteMessage) -> Result<()> {
        self.change(
            format!("delete route {description}"),
            RouteNetlinkMessage::DelRoute(route),
            0,
        )
        .await
    }

    pub async fn add_rule(&self, description: &str, rule: RuleMessage) -> Result<()> {
        self.change(
            format!("add rule {description}"),
            RouteNetlinkMessage::NewRule(rule),
            NLM_F_CREATE | NLM_F_EXCL,
        )
        .await
    }

    pub async fn delete_rule(&self, description: &str, rule: RuleMessage) -> Result<()> {
        self.change(
            format!("delete rule {description}"),
            RouteNetlinkMessage::DelRule(rule),
            0,
        )
        .await
    }
}

fn interface_from(link: &LinkMessage) -> Interface {
    let mut name = String::new();
    let mut mac = None;
    let mut mtu = 1500;
    for attribute in &link.attributes {
        match attribute {
            LinkAttribute::IfName(n) => name = n.clone(),
            LinkAttribute::Address(bytes) => mac = <[u8; 6]>::try_from(bytes.as_slice()).ok(),
            LinkAttribute::Mtu(value) => mtu = *value,
            _ => {}
        }
    }
    Interface {
        index: link.header.index,
        name,
        mac,
        ethernet: link.header.link_layer_type == LinkLayerType::Ether,
        up: link.header.flags.contains(LinkFlags::Up),
        mtu,
        addresses: Vec::new(),
    }
}

/// An IPv4 address to put on an interface, with the lifetime a lease gave it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TimedAddress {
    pub interface: u32,
    pub address: ipnet::Ipv4Net,
    /// Seconds until the kernel removes the address by itself.
    pub valid_secs: u32,
}

impl TimedAddress {
    fn message(&self) -> AddressMessage {
        let mut message = AddressMessage::default();
        message.header.family = AddressFamily::Inet;
        message.header.prefix_len = self.address.prefix_len();
        message.header.index = self.interface;
        message.attributes = vec![
            AddressAttribute::Local(IpAddr::V4(self.address.addr())),
            AddressAttribute::Address(IpAddr::V4(self.address.addr())),
        ];
        if self.address.prefix_len() < 31 {
            message
                .attributes
                .push(AddressAttribute::Broadcast(self.address.broadcast()));
        }
        message
    }
}

impl Kernel {
    /// Adds the address, or refreshes its lifetime when it is there already.
    pub async fn put_address(&self, address: &TimedAddress) -> Result<()> {
        let mut message = address.message();
        let mut lifetime = CacheInfo::default();
        lifetime.ifa_preferred = address.valid_secs;
        lifetime.ifa_valid = address.valid_secs;
        message
            .attributes
            .push(AddressAttribute::CacheInfo(lifetime));
        self.change(
            format!(
                "add address {} to ifindex {}",
                address.address, address.interface
            ),
            RouteNetlinkMessage::NewAddress(message),
            NLM_F_CREATE | NLM_F_REPLACE,
        )
        .await
    }

    pub async fn delete_address(&self, address: &TimedAddress) -> Result<()> {
        self.change(
            format!(
                "delete address {} from ifindex {}",
                address.address, address.interface
            ),
            RouteNetlinkMessage::DelAddress(address.message()),
            0,
        )
        .await
    }
}

/// True when a netlink error is the given errno (EEXIST, ESRCH, ...).
pub fn is_errno(error: &Error, errno: i32) -> bool {
    matches!(error, Error::Netlink { source, .. } if source.raw_os_error() == Some(errno))
}

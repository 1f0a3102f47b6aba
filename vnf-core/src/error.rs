//! One error type for the runtime: every variant names what was wrong and what to do.

use std::net::Ipv4Addr;

use ipnet::Ipv4Net;

use crate::side::Side;

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("invalid {field} {value:?}: {reason}")]
    InvalidArgument {
        field: &'static str,
        value: String,
        reason: String,
    },

    #[error("{first} and {second} side selectors overlap ({detail}): one interface cannot serve two sides; make the selectors disjoint")]
    OverlappingSelectors {
        first: Side,
        second: Side,
        detail: String,
    },

    #[error("interface {interface} matches the selectors of both the {first} and the {second} side; make the selectors disjoint")]
    AmbiguousInterface {
        interface: String,
        first: Side,
        second: Side,
    },

    #[error("gave up after {waited_secs} s waiting for the {missing} side(s): {detail}. Interfaces present: {present}. Attach the missing network (docker network connect), fix the selector, or raise --side-timeout")]
    SideTimeout {
        missing: String,
        waited_secs: u64,
        detail: String,
        present: String,
    },

    #[error("{side} gateway {gateway} is outside the {side} subnet {subnet}; pass a --{side}-gateway inside {subnet}")]
    GatewayOutsideSubnet {
        side: Side,
        gateway: Ipv4Addr,
        subnet: Ipv4Net,
    },

    #[error("{side} gateway {gateway} is the SI's own {side} address; pass --{side}-gateway with the router of the {side} network")]
    GatewayIsOwnAddress { side: Side, gateway: Ipv4Addr },

    #[error("{side} subnet {subnet} has no host address to default the gateway to; pass --{side}-gateway")]
    NoDefaultGateway { side: Side, subnet: Ipv4Net },

    #[error("{0}")]
    Sysctl(String),

    #[error("netlink {operation} failed: {source}")]
    Netlink {
        operation: String,
        #[source]
        source: std::io::Error,
    },

    #[error("{0}")]
    Nft(String),

    #[error("kernel state differs from the desired state after applying: {0}")]
    Verify(String),

    /// A VNF-specific failure whose message already names the cause and the fix.
    #[error("{0}")]
    Vnf(String),

    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
}

impl Error {
    pub fn invalid(field: &'static str, value: impl ToString, reason: impl ToString) -> Self {
        Error::InvalidArgument {
            field,
            value: value.to_string(),
            reason: reason.to_string(),
        }
    }

    /// Configuration errors cannot be fixed by waiting; kernel errors during hot-plug may be,
    /// e.g. an interface's sysctl directory vanishing while it is unplugged.
    pub fn is_transient(&self) -> bool {
        match self {
            Error::Netlink { .. } | Error::Verify(_) => true,
            Error::Io { source, .. } => source.kind() == std::io::ErrorKind::NotFound,
            _ => false,
        }
    }
}

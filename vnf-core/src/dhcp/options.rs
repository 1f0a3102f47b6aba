//! Reading DHCP replies byte by byte: the BOOTP header, every option instance concatenated
//! (RFC 3396, including `file`/`sname` when option 52 overloads them), and our own RFC 3442
//! classless-route parser — all-or-nothing, host bits masked, router 0.0.0.0 meaning
//! on-link. Nothing here panics on any input; everything malformed is an error value.

use std::collections::BTreeMap;
use std::fmt;
use std::net::Ipv4Addr;

use ipnet::Ipv4Net;
use serde::{Deserialize, Serialize};

use crate::lease::LearnedRoute;

pub const SUBNET_MASK: u8 = 1;
pub const ROUTER: u8 = 3;
pub const DNS: u8 = 6;
pub const STATIC_ROUTES: u8 = 33;
pub const LEASE_TIME: u8 = 51;
pub const OVERLOAD: u8 = 52;
pub const MESSAGE_TYPE: u8 = 53;
pub const SERVER_ID: u8 = 54;
pub const RENEWAL_TIME: u8 = 58;
pub const REBINDING_TIME: u8 = 59;
pub const CLASSLESS_ROUTES: u8 = 121;
pub const MS_CLASSLESS_ROUTES: u8 = 249;

const MAGIC_COOKIE: [u8; 4] = [99, 130, 83, 99];
const OPTIONS_OFFSET: usize = 240;
const SNAME: std::ops::Range<usize> = 44..108;
const FILE: std::ops::Range<usize> = 108..236;
const PAD: u8 = 0;
const END: u8 = 255;

/// Why a packet or option was not usable.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Malformed(pub String);

impl fmt::Display for Malformed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

fn malformed(reason: impl Into<String>) -> Malformed {
    Malformed(reason.into())
}

/// The fixed BOOTP fields a client needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    pub op: u8,
    pub xid: u32,
    pub yiaddr: Ipv4Addr,
    pub chaddr: [u8; 6],
}

/// A parsed reply: header plus every option, instances concatenated in RFC 3396 order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Packet {
    pub header: Header,
    pub options: BTreeMap<u8, Vec<u8>>,
}

fn walk(
    field: &[u8],
    into: &mut BTreeMap<u8, Vec<u8>>,
    stop_at_end: bool,
) -> Result<(), Malformed> {
    let mut at = 0;
    while at < field.len() {
        let code = field[at];
        match code {
            PAD => at += 1,
            END => return Ok(()),
            _ => {
                let length = *field
                    .get(at + 1)
                    .ok_or_else(|| malformed(format!("option {code} has no length byte")))?
                    as usize;
                let value = field.get(at + 2..at + 2 + length).ok_or_else(|| {
                    malformed(format!("option {code} claims {length} bytes past the end"))
                })?;
                into.entry(code).or_default().extend_from_slice(value);
                at += 2 + length;
            }
        }
    }
    if stop_at_end {
        Err(malformed("options end without the end option"))
    } else {
        Ok(())
    }
}

impl Packet {
    pub fn parse(bytes: &[u8]) -> Result<Packet, Malformed> {
        if bytes.len() < OPTIONS_OFFSET {
            return Err(malformed(format!(
                "{} bytes is shorter than a BOOTP header with cookie",
                bytes.len()
            )));
        }
        if bytes[236..240] != MAGIC_COOKIE {
            return Err(malformed("no DHCP magic cookie"));
        }
        let mut chaddr = [0u8; 6];
        chaddr.copy_from_slice(&bytes[28..34]);
        let header = Header {
            op: bytes[0],
            xid: u32::from_be_bytes([bytes[4], bytes[5], bytes[6], bytes[7]]),
            yiaddr: Ipv4Addr::new(bytes[16], bytes[17], bytes[18], bytes[19]),
            chaddr,
        };
        let mut options = BTreeMap::new();
        // Some servers omit the end option when the packet ends with the options; accept it.
        walk(&bytes[OPTIONS_OFFSET..], &mut options, false)?;
        let overload = options
            .get(&OVERLOAD)
            .and_then(|v| v.first().copied())
            .unwrap_or(0);
        if overload & 1 != 0 {
            walk(&bytes[FILE], &mut options, false)?;
        }
        if overload & 2 != 0 {
            walk(&bytes[SNAME], &mut options, false)?;
        }
        Ok(Packet { header, options })
    }

    pub fn byte(&self, code: u8) -> Option<u8> {
        self.options
            .get(&code)
            .filter(|v| v.len() == 1)
            .map(|v| v[0])
    }

    pub fn u32(&self, code: u8) -> Option<u32> {
        let value = self.options.get(&code)?;
        let bytes: [u8; 4] = value.as_slice().try_into().ok()?;
        Some(u32::from_be_bytes(bytes))
    }

    pub fn address(&self, code: u8) -> Option<Ipv4Addr> {
        self.addresses(code).into_iter().next()
    }

    /// A list of addresses; empty when absent or not a multiple of four bytes.
    pub fn addresses(&self, code: u8) -> Vec<Ipv4Addr> {
        match self.options.get(&code) {
            Some(value) if !value.is_empty() && value.len() % 4 == 0 => value
                .chunks_exact(4)
                .map(|c| Ipv4Addr::new(c[0], c[1], c[2], c[3]))
                .collect(),
            _ => Vec::new(),
        }
    }
}

/// Where a lease's routes came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum RouteSource {
    /// RFC 3442 option 121.
    Classless,
    /// Option 249, Microsoft's copy of 121.
    MicrosoftClassless,
    /// Option 33 (classful) plus the first router of option 3 as the default.
    StaticAndRouter,
    None,
}

impl std::fmt::Display for RouteSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            RouteSource::Classless => "option 121",
            RouteSource::MicrosoftClassless => "option 249",
            RouteSource::StaticAndRouter => "options 33 + 3",
            RouteSource::None => "no route options",
        })
    }
}

/// Parses a classless route option (121 or 249). All-or-nothing.
pub fn parse_classless(value: &[u8]) -> Result<Vec<LearnedRoute>, Malformed> {
    if value.is_empty() {
        return Err(malformed("empty"));
    }
    let mut routes = Vec::new();
    let mut at = 0;
    while at < value.len() {
        let width = value[at];
        if width > 32 {
            return Err(malformed(format!(
                "entry {} has a prefix width of {width} (> 32)",
                routes.len() + 1
            )));
        }
        let significant = usize::from(width).div_ceil(8);
        let entry = value
            .get(at + 1..at + 1 + significant + 4)
            .ok_or_else(|| malformed(format!("entry {} is truncated", routes.len() + 1)))?;
        let mut destination = [0u8; 4];
        destination[..significant].copy_from_slice(&entry[..significant]);
        let router = Ipv4Addr::new(
            entry[significant],
            entry[significant + 1],
            entry[significant + 2],
            entry[significant + 3],
        );
        let net = Ipv4Net::new(Ipv4Addr::from(destination), width)
            .map_err(|_| malformed(format!("entry {} has an invalid prefix", routes.len() + 1)))?
            .trunc();
        routes.push(LearnedRoute {
            destination: net,
            gateway: (!router.is_unspecified()).then_some(router),
        });
        at += 1 + significant + 4;
    }
    Ok(routes)
}

/// The classful network of an address (option 33 carries no masks).
fn classful(destination: Ipv4Addr) -> Ipv4Net {
    let width = match destination.octets()[0] {
        0..=127 => 8,
        128..=191 => 16,
        _ => 24,
    };
    // A destination with bits beyond its class is a host route.
    let natural = Ipv4Net::new(destination, width).unwrap_or_default();
    if natural.network() == destination {
        natural
    } else {
        Ipv4Net::from(destination)
    }
}

/// The routes a reply carries, by RFC 3442 precedence, and why a classless option was
/// ignored, if one was.
pub fn select_routes(packet: &Packet) -> (Vec<LearnedRoute>, RouteSource, Vec<String>) {
    let mut rejected = Vec::new();
    for (code, source) in [
        (CLASSLESS_ROUTES, RouteSource::Classless),
        (MS_CLASSLESS_ROUTES, RouteSource::MicrosoftClassless),
    ] {
        if let Some(value) = packet.options.get(&code) {
            match parse_classless(value) {
                Ok(routes) => return (routes, source, rejected),
                Err(reason) => rejected.push(format!("option {code} ignored: {reason}")),
            }
        }
    }
    let mut routes = Vec::new();
    if let Some(value) = packet.options.get(&STATIC_ROUTES) {
        if value.len() % 8 == 0 {
            for pair in value.chunks_exact(8) {
                let destination = Ipv4Addr::new(pair[0], pair[1], pair[2], pair[3]);
                if destination.is_unspecified() {
                    continue;
                }
                routes.push(LearnedRoute {
                    destination: classful(destination),
                    gateway: Some(Ipv4Addr::new(pair[4], pair[5], pair[6], pair[7])),
                });
            }
        } else {
            rejected.push(format!(
                "option 33 ignored: {} bytes is not a list of address pairs",
                value.len()
            ));
        }
    }
    if let Some(router) = packet.address(ROUTER) {
        routes.push(LearnedRoute {
            destination: Ipv4Net::default(),
            gateway: Some(router),
        });
    }
    let source = if routes.is_empty() {
        RouteSource::None
    } else {
        RouteSource::StaticAndRouter
    };
    (routes, source, rejected)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn routes(list: &[LearnedRoute]) -> Vec<String> {
        list.iter()
            .map(|r| match r.gateway {
                Some(g) => format!("{} via {g}", r.destination),
                None => format!("{} on-link", r.destination),
            })
            .collect()
    }

    /// A BOOTREPLY with the given option bytes after the cookie (end option appended).
    fn reply(options: &[u8]) -> Vec<u8> {
        let mut packet = vec![0u8; 240];
        packet[0] = 2;
        packet[236..240].copy_from_slice(&MAGIC_COOKIE);
        packet.extend_from_slice(options);
        packet.push(END);
        packet
    }

    fn select(options: &[u8]) -> (Vec<String>, RouteSource, Vec<String>) {
        let packet = Packet::parse(&reply(options)).unwrap();
        let (list, source, rejected) = select_routes(&packet);
        (routes(&list), source, rejected)
    }

    #[test]
    fn several_classless_routes_with_router_zero_and_masked_host_bits() {
        // 10.0.255.0/20 unmasked as dnsmasq sends it; 169.254.169.254/32; 192.168.0.0/16 on-link.
        let value = [
            20, 10, 0, 255, 10, 0, 1, 1, 32, 169, 254, 169, 254, 10, 0, 1, 1, 16, 192, 168, 0, 0,
            0, 0,
        ];
        let mut options = vec![CLASSLESS_ROUTES, value.len() as u8];
        options.extend_from_slice(&value);
        let (list, source, rejected) = select(&options);
        assert_eq!(
            list,
            [
                "10.0.240.0/20 via 10.0.1.1",
                "169.254.169.254/32 via 10.0.1.1",
                "192.168.0.0/16 on-link"
            ]
        );
        assert_eq!(source, RouteSource::Classless);
        assert!(rejected.is_empty());
    }

    #[test]
    fn a_default_inside_121_wins_over_option_3() {
        let options = [
            CLASSLESS_ROUTES,
            5,
            0,
            10,
            0,
            1,
            254,
            ROUTER,
            4,
            10,
            0,
            1,
            1,
        ];
        assert_eq!(select(&options).0, ["0.0.0.0/0 via 10.0.1.254"]);
    }

    #[test]
    fn invalid_121_is_ignored_whole_and_the_next_source_used() {
        for (value, reason) in [
            (vec![33, 10, 0, 0, 0, 0, 10, 0, 1, 1], "width of 33"),
            (vec![24, 10, 1, 2, 10, 0, 1], "truncated"),
            (vec![], "empty"),
        ] {
            let mut options = vec![CLASSLESS_ROUTES, value.len() as u8];
            options.extend_from_slice(&value);
            options.extend_from_slice(&[ROUTER, 4, 10, 0, 1, 1]);
            let (list, source, rejected) = select(&options);
            assert_eq!(list, ["0.0.0.0/0 via 10.0.1.1"], "{reason}");
            assert_eq!(source, RouteSource::StaticAndRouter);
            assert!(rejected[0].contains(reason), "{rejected:?}");
        }
    }

    #[test]
    fn split_instances_are_concatenated_adjacent_and_not() {
        // One route split across two 121 instances, with another option between them.
        let options = [
            CLASSLESS_ROUTES,
            3,
            24,
            10,
            9,
            CLASSLESS_ROUTES,
            0,
            DNS,
            4,
            1,
            1,
            1,
            1,
            CLASSLESS_ROUTES,
            5,
            1,
            10,
            0,
            1,
            1,
        ];
        assert_eq!(select(&options).0, ["10.9.1.0/24 via 10.0.1.1"]);
    }

    #[test]
    fn overloaded_file_field_carries_the_rest_of_121() {
        let mut packet = reply(&[OVERLOAD, 1, 1, CLASSLESS_ROUTES, 2, 8, 10]);
        packet[FILE.start..FILE.start + 7].copy_from_slice(&[
            CLASSLESS_ROUTES,
            4,
            10,
            0,
            1,
            1,
            END,
        ]);
        let parsed = Packet::parse(&packet).unwrap();
        assert_eq!(
            routes(&select_routes(&parsed).0),
            ["10.0.0.0/8 via 10.0.1.1"]
        );
    }

    #[test]
    fn option_249_when_121_is_absent_and_33_with_3_otherwise() {
        let options = [
            MS_CLASSLESS_ROUTES,
            6,
            8,
            172,
            10,
            0,
            1,
            1,
            ROUTER,
            4,
            10,
            0,
            1,
            1,
        ];
        assert_eq!(
            select(&options),
            (
                vec!["172.0.0.0/8 via 10.0.1.1".to_string()],
                RouteSource::MicrosoftClassless,
                vec![]
            )
        );

        let options = [
            STATIC_ROUTES,
            16,
            0,
            0,
            0,
            0,
            10,
            0,
            1,
            9,
            172,
            16,
            0,
            0,
            10,
            0,
            1,
            2,
            ROUTER,
            4,
            10,
            0,
            1,
            1,
        ];
        assert_eq!(
            select(&options).0,
            ["172.16.0.0/16 via 10.0.1.2", "0.0.0.0/0 via 10.0.1.1"]
        );
    }

    #[test]
    fn twenty_eight_host_routes_fit_in_one_option() {
        let mut value = Vec::new();
        for i in 0..28u8 {
            value.extend_from_slice(&[32, 10, 8, 0, i, 10, 0, 1, 1]);
        }
        assert_eq!(value.len(), 252);
        let mut options = vec![CLASSLESS_ROUTES, value.len() as u8];
        options.extend_from_slice(&value);
        assert_eq!(select(&options).0.len(), 28);
    }

    #[test]
    fn malformed_packets_are_errors_not_panics() {
        assert!(Packet::parse(&[0u8; 10]).is_err());
        let mut no_cookie = reply(&[]);
        no_cookie[236] = 0;
        assert!(Packet::parse(&no_cookie).is_err());
        let truncated = &reply(&[CLASSLESS_ROUTES, 200, 1, 2])[..];
        assert!(Packet::parse(&truncated[..truncated.len() - 1]).is_err());
    }
}

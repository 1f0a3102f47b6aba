//! WireGuard client profiles: the wg-quick text, its QR codes for phones, and whether a
//! profile printed earlier still routes what the server pushes now. WireGuard has no push:
//! a client's AllowedIPs are whatever its profile said when it was handed out.

use std::collections::BTreeSet;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};

use clap::Args;
use ipnet::Ipv4Net;
use qrcode::render::unicode::Dense1x2;
use qrcode::{Color, QrCode};
use tracing::warn;
use vnf_core::{Error, Result};

use dockvpn::access::client_networks;
use dockvpn::pki::{ClientRecord, Pki, WireguardProfileKeys};

use crate::vpn::VpnStatus;

/// The port profiles name when no server has said which it serves.
pub const DEFAULT_PORT: u16 = 51820;
/// Keeps NAT and firewall state on the client's path open, so the server can always reach it.
const PERSISTENT_KEEPALIVE_SECS: u16 = 25;
/// Pixels per QR module in the PNG: a few, so a phone reads it off a screen.
const PNG_PIXELS_PER_MODULE: usize = 8;
/// The light border the QR standard asks for, in modules.
const PNG_QUIET_ZONE_MODULES: usize = 4;
const WIREGUARD: &str = "WireGuard (--format wireguard)";

#[derive(Args, Debug)]
pub struct WireguardProfileArgs {
    /// The profile's AllowedIPs instead of the running server's routes (needed when no
    /// server runs); `client list` still compares them with what the server pushes
    #[arg(
        long,
        value_name = "CIDR[,CIDR…]",
        value_delimiter = ',',
        help_heading = WIREGUARD
    )]
    allowed_ips: Vec<Ipv4Net>,

    /// Print the profile as a QR code for the terminal (scan it with the WireGuard app)
    #[arg(long, help_heading = WIREGUARD)]
    qr: bool,

    /// Write the profile as a QR code to this PNG file (mode 0600: it holds the private key)
    #[arg(long, value_name = "FILE", help_heading = WIREGUARD)]
    qr_png: Option<PathBuf>,
}

impl WireguardProfileArgs {
    /// The first WireGuard-only option given, for refusing it with `--format openvpn`.
    pub fn first_given(&self) -> Option<&'static str> {
        if !self.allowed_ips.is_empty() {
            Some("--allowed-ips")
        } else if self.qr {
            Some("--qr")
        } else if self.qr_png.is_some() {
            Some("--qr-png")
        } else {
            None
        }
    }
}

/// Prints (or writes as QR codes) `name`'s wg-quick profile with the endpoint `host:port`,
/// and records its AllowedIPs so that a later change of the pushed routes marks it stale.
pub fn issue(
    pki: &Pki,
    name: &str,
    host: &str,
    port: u16,
    running: Option<&VpnStatus>,
    args: &WireguardProfileArgs,
) -> Result<()> {
    let allowed_ips = if args.allowed_ips.is_empty() {
        let status = running.ok_or_else(|| {
            Error::Vnf(
                "no VPN server runs, so the routes a WireGuard profile needs are unknown: start `dockvpn run` first, or give them with --allowed-ips CIDR[,CIDR…] (`dockvpn client list` marks the profile stale when they differ from what the server pushes)".into(),
            )
        })?;
        let allow = pki
            .clients()?
            .into_iter()
            .find(|client| client.name == name)
            .and_then(|client| client.allow);
        allowed_ips(status, allow.as_deref())
    } else {
        normalized(&args.allowed_ips)
    };
    if running.is_some_and(|status| status.wireguard.is_none()) {
        warn!("the running server does not serve WireGuard (is it started with --wireguard-listen off?); this profile connects once it does");
    }
    let keys = pki.wireguard_profile_keys(name)?;
    if keys.private_key.is_none() {
        if let Some(flag) = [("--qr", args.qr), ("--qr-png", args.qr_png.is_some())]
            .into_iter()
            .find_map(|(flag, given)| given.then_some(flag))
        {
            return Err(Error::invalid(
                flag,
                name,
                "the client keeps its own private key (added with --wireguard-public-key), so a QR code of its profile could not connect: print the profile without QR options and let the client add its PrivateKey line",
            ));
        }
    }
    let profile = render(name, &keys, host, port, &allowed_ips);
    let code = (args.qr || args.qr_png.is_some())
        .then(|| qr_code(&profile))
        .transpose()?;
    match &code {
        Some(code) => {
            if let Some(path) = &args.qr_png {
                write_png(code, path)?;
                eprintln!(
                    "wrote {name}'s WireGuard profile as a QR code to {} (mode 0600: it holds the private key)",
                    path.display()
                );
            }
            if args.qr {
                print!("{}", terminal_qr(code));
            }
        }
        None => print!("{profile}"),
    }
    // What was handed out, not what was meant to be: recorded once written.
    pki.record_wireguard_profile(name, &allowed_ips)
}

/// The AllowedIPs a profile printed now holds: the routes the running server pushes (cut
/// down to the client's allow list, `allow`) and its own tunnel address, or everything when
/// it redirects the default gateway and the client is not limited.
pub fn allowed_ips(status: &VpnStatus, allow: Option<&[Ipv4Net]>) -> Vec<Ipv4Net> {
    if status.redirect_gateway && allow.is_none() {
        return vec![Ipv4Net::new_assert(Ipv4Addr::UNSPECIFIED, 0)];
    }
    let pushed: BTreeSet<Ipv4Net> = status.routes_pushed.iter().copied().collect();
    let mut allowed: Vec<Ipv4Net> = client_networks(allow, &pushed, status.redirect_gateway)
        .into_iter()
        .collect();
    allowed.push(Ipv4Net::from(status.server_address));
    normalized(&allowed)
}

/// Networks in one order without duplicates, so that two route sets compare equal.
fn normalized(networks: &[Ipv4Net]) -> Vec<Ipv4Net> {
    let set: BTreeSet<Ipv4Net> = networks.iter().map(Ipv4Net::trunc).collect();
    set.into_iter().collect()
}

/// Whether `client` holds a profile whose AllowedIPs differ from `current` (what a profile
/// printed now would hold); a client never handed a WireGuard profile is not stale.
pub fn is_stale(client: &ClientRecord, current: &[Ipv4Net]) -> bool {
    client
        .wireguard
        .as_ref()
        .and_then(|identity| identity.profile_allowed_ips.as_deref())
        .is_some_and(|printed| normalized(printed) != current)
}

/// The names of the clients whose profiles are stale against the running server's routes;
/// none when no server runs (the routes are unknown then).
pub fn stale_clients(clients: &[ClientRecord], running: Option<&VpnStatus>) -> Vec<String> {
    let Some(status) = running else {
        return Vec::new();
    };
    clients
        .iter()
        .filter(|client| is_stale(client, &allowed_ips(status, client.allow.as_deref())))
        .map(|client| client.name.clone())
        .collect()
}

pub const STALE_NOTE: &str = "profile stale: routes changed";

/// The wg-quick profile.
fn render(
    name: &str,
    keys: &WireguardProfileKeys,
    host: &str,
    port: u16,
    allowed_ips: &[Ipv4Net],
) -> String {
    let private_key = match &keys.private_key {
        Some(key) => format!("PrivateKey = {key}\n"),
        None => format!(
            "# This client keeps its own private key (its public key: {}): add the line\n# PrivateKey = <that private key>\n",
            keys.public_key
        ),
    };
    let allowed_ips: Vec<String> = allowed_ips.iter().map(ToString::to_string).collect();
    // Address is a /32: with the pool's prefix, wg-quick would route every other client's
    // address into the tunnel. The server's tunnel address is reached through AllowedIPs.
    format!(
        "# Dockvpn WireGuard profile for {name}: save it as e.g. dockvpn.conf, then `wg-quick up ./dockvpn.conf`\n\
         [Interface]\n\
         {private_key}\
         Address = {address}/32\n\
         \n\
         [Peer]\n\
         PublicKey = {server_public_key}\n\
         PresharedKey = {preshared_key}\n\
         Endpoint = {host}:{port}\n\
         AllowedIPs = {allowed_ips}\n\
         PersistentKeepalive = {PERSISTENT_KEEPALIVE_SECS}\n",
        address = keys.address,
        server_public_key = keys.server_public_key,
        preshared_key = keys.preshared_key,
        allowed_ips = allowed_ips.join(", "),
    )
}

fn qr_code(profile: &str) -> Result<QrCode> {
    QrCode::new(profile.as_bytes()).map_err(|error| {
        Error::Vnf(format!(
            "the profile does not fit in a QR code ({error}); hand out the text instead (it has {} bytes)",
            profile.len()
        ))
    })
}

/// Half-block characters, two modules a character, black on white whatever the terminal's
/// colours (scanners expect dark modules on a light ground).
fn terminal_qr(code: &QrCode) -> String {
    const BLACK_ON_WHITE: &str = "\x1b[30;47m";
    const RESET: &str = "\x1b[0m";
    let rendered = code.render::<Dense1x2>().quiet_zone(true).build();
    rendered
        .lines()
        .map(|line| format!("{BLACK_ON_WHITE}{line}{RESET}\n"))
        .collect()
}

/// A grey-scale PNG, `PNG_PIXELS_PER_MODULE` pixels a module inside a quiet zone.
fn write_png(code: &QrCode, path: &Path) -> Result<()> {
    let modules = code.width();
    let side = (modules + 2 * PNG_QUIET_ZONE_MODULES) * PNG_PIXELS_PER_MODULE;
    let mut pixels = vec![u8::MAX; side * side];
    for (index, color) in code.to_colors().into_iter().enumerate() {
        if color != Color::Dark {
            continue;
        }
        let left = (index % modules + PNG_QUIET_ZONE_MODULES) * PNG_PIXELS_PER_MODULE;
        let top = (index / modules + PNG_QUIET_ZONE_MODULES) * PNG_PIXELS_PER_MODULE;
        for row in top..top + PNG_PIXELS_PER_MODULE {
            pixels[row * side + left..row * side + left + PNG_PIXELS_PER_MODULE].fill(0);
        }
    }
    let png_error = |error: png::EncodingError| Error::Vnf(format!("encode the QR PNG: {error}"));
    let mut bytes = Vec::new();
    {
        let side =
            u32::try_from(side).map_err(|_| Error::Vnf("the QR code is too large".into()))?;
        let mut encoder = png::Encoder::new(&mut bytes, side, side);
        encoder.set_color(png::ColorType::Grayscale);
        encoder.set_depth(png::BitDepth::Eight);
        let mut writer = encoder.write_header().map_err(png_error)?;
        writer.write_image_data(&pixels).map_err(png_error)?;
    }
    vnf_core::fs::write_atomically(path, &bytes, 0o600).map_err(|source| Error::Io {
        context: format!("write --qr-png {}", path.display()),
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keys(private_key: Option<&str>) -> WireguardProfileKeys {
        WireguardProfileKeys {
            address: Ipv4Addr::new(10, 8, 0, 2),
            private_key: private_key.map(str::to_owned),
            public_key: "CLIENTPUB=".into(),
            preshared_key: "PSK=".into(),
            server_public_key: "SERVERPUB=".into(),
        }
    }

    #[test]
    fn a_profile_routes_the_pushed_networks_and_the_server_address() {
        let allowed = normalized(&[
            "192.168.50.0/24".parse().unwrap(),
            "10.8.0.1/32".parse().unwrap(),
            "192.168.50.7/24".parse().unwrap(),
        ]);
        let profile = render("alice", &keys(Some("PRIV=")), "10.0.2.2", 51820, &allowed);
        assert!(profile.contains(
            "[Interface]\nPrivateKey = PRIV=\nAddress = 10.8.0.2/32\n\n[Peer]\nPublicKey = SERVERPUB=\nPresharedKey = PSK=\nEndpoint = 10.0.2.2:51820\nAllowedIPs = 10.8.0.1/32, 192.168.50.0/24\nPersistentKeepalive = 25\n"
        ), "{profile}");
        let own_key = render("bob", &keys(None), "h", 1, &allowed);
        assert!(!own_key.contains("\nPrivateKey"), "{own_key}");
        assert!(
            own_key.contains("# PrivateKey = <that private key>\n"),
            "{own_key}"
        );
    }

    #[test]
    fn only_a_changed_route_set_marks_a_profile_stale() {
        let current = normalized(&[
            "10.8.0.1/32".parse().unwrap(),
            "192.168.50.0/24".parse().unwrap(),
        ]);
        let client = |printed: Option<Vec<Ipv4Net>>| ClientRecord {
            name: "alice".into(),
            address: Ipv4Addr::new(10, 8, 0, 2),
            created: 0,
            wireguard: Some(dockvpn::pki::WireguardIdentity {
                public_key: "K=".into(),
                profile_allowed_ips: printed,
            }),
            certificate: None,
            revoked: None,
            allow: None,
        };
        assert!(!is_stale(&client(None), &current), "no profile printed");
        let reordered = vec![current[1], current[0]];
        assert!(!is_stale(&client(Some(reordered)), &current));
        assert!(is_stale(&client(Some(current[..1].to_vec())), &current));
    }

    #[test]
    fn a_limited_clients_allowed_ips_are_the_pushed_routes_inside_its_allow_list() {
        let status: VpnStatus = serde_json::from_value(serde_json::json!({
            "pid": 1, "listen": "0.0.0.0:1194", "tun": "tun0", "pool": "10.8.0.0/24",
            "server_address": "10.8.0.1",
            "routes_pushed": ["10.0.1.0/24", "192.168.10.0/24"],
            "redirect_gateway": false, "clients": [], "dropped": {}, "updated_unix": 0,
            "tls_crypt": "v2"
        }))
        .expect("a status");
        let allow: Vec<Ipv4Net> = vec!["192.168.0.0/16".parse().unwrap()];
        assert_eq!(
            allowed_ips(&status, Some(&allow)),
            normalized(&[
                "10.8.0.1/32".parse().unwrap(),
                "192.168.10.0/24".parse().unwrap()
            ])
        );
        assert_eq!(
            allowed_ips(&status, None).len(),
            3,
            "not limited: every pushed route"
        );
    }
}
